"""What a cluster grants this identity (docs/protocol.md, "Grants"): a grants request signed
by the identity key, through the proxy to the cluster, whose answer is signed by the cluster's
key and checked here against the trust store and the request."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from consumers._session import session_connection
from sealstream import IntegrityError, SessionError, TrustError
from sealstream.control import Granted, GrantsRequest
from sealstream.crypto import TrustStore, jws_header, verify_grants
from sealstream.ids import check_cluster_id, is_stream
from sealstream.jwk import b64u_encode_bytes
from sealstream.nats import release

if TYPE_CHECKING:
    from consumers._endpoint import Endpoint

__all__ = ["Grants", "ask_grants"]


@dataclass(frozen=True, slots=True)
class Grants:
    """A cluster's answer: the streams it offers, those its policy grants ``identity`` (the
    identity id; ``""`` from a producer that trusts the relay's authorization and checks no
    identity), and until when (Unix seconds; None: no end)."""

    cluster: str
    identity: str
    offered: tuple[str, ...]
    granted: tuple[str, ...]
    until: int | None


async def ask_grants(client: Endpoint, cluster: str) -> Grants:
    """Ask ``cluster`` what it grants the client's identity. A refusal raises SessionError
    (``forbidden`` with the cluster's reason), an answer not signed by a pinned key TrustError,
    an answer that does not match the request IntegrityError."""
    cluster = check_cluster_id(cluster)
    identity = client.config.identity
    if identity is None:
        raise SessionError(
            "forbidden",
            "no identity key: create one with 'sealstream-consume identity create' or pass "
            "--identity",
            retriable=False,
        )
    proof, jti = identity.prove_grants(cluster=cluster)
    request = GrantsRequest(cluster, proof, client.token(), client.config.authz)
    # with the auth callout, a connection of its own, logged in as an id that opens nothing
    login_id = b64u_encode_bytes(os.urandom(32)).decode("ascii")
    own = await session_connection(client, login_id, on_closed=_nothing)
    nc = None if own is None else own[0]
    try:
        answer = await client.request(client.subjects.api_grants, request, Granted, nc=nc)
    finally:
        await release(nc)
    return _checked(answer.grants, client.trust, cluster=cluster, identity=identity.kid, jti=jti)


async def _nothing() -> None:
    return None


def _checked(token: str, trust: TrustStore, *, cluster: str, identity: str, jti: str) -> Grants:
    try:
        kid = jws_header(token.encode("ascii")).get("kid")
    except UnicodeEncodeError:
        raise IntegrityError() from None
    key = trust.get(cluster, kid) if isinstance(kid, str) else None
    if key is None:
        raise TrustError(
            f"cluster {cluster!r} answered with a key the trust store does not pin"
            " ('sealstream-consume trust add' pins it)"
        )
    claims = verify_grants(token, key)
    offered, granted = _names(claims, "offered"), _names(claims, "granted")
    until = claims.get("until")
    if (
        claims.get("cluster") != cluster
        or claims.get("identity") not in (identity, "")
        or claims.get("jti") != jti
        or offered is None
        or granted is None
        or not set(granted) <= set(offered)
        or not (until is None or (type(until) is int))
    ):
        raise IntegrityError()
    return Grants(cluster, claims["identity"], offered, granted, until)


def _names(claims: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    value = claims.get(key)
    if not isinstance(value, list) or not all(is_stream(s) for s in value):
        return None
    return tuple(value)
