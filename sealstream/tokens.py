"""Consumer access tokens: JWTs as JWS compact (jwcrypto's JWS only, never its JWE/JWT
modules, so the proxy that verifies them stays blind), with our own claim checks.

Claims: ``sub`` (user), ``exp`` (required), ``nbf``/``iat`` (optional), ``clusters`` (list of
cluster ids the holder may open sessions on; ``"*"`` allows all).
Keys: an HS256 shared secret (>= 32 bytes), or an issuer public key (Ed25519, P-256 or RSA)
whose algorithm is pinned by its type; a token's header never chooses the algorithm.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

from jwcrypto import jwk as _jwk
from jwcrypto import jws as _jws
from jwcrypto.common import JWException

from sealstream.errors import SessionError
from sealstream.ids import is_cluster_id
from sealstream.jwk import b64u_encode

__all__ = ["MIN_SECRET", "Claims", "TokenVerifier", "mint_token"]

MIN_SECRET: Final = 32
_MAX_TOKEN: Final = 8192


def _alg_for(key: _jwk.JWK) -> str:
    kty, crv = key.get("kty"), key.get("crv")
    if kty == "oct":
        return "HS256"
    if kty == "OKP" and crv == "Ed25519":
        return "Ed25519"
    if kty == "EC" and crv == "P-256":
        return "ES256"
    if kty == "RSA":
        return "RS256"
    raise ValueError(f"unsupported token key type {kty}/{crv}")


def _secret_key(secret: bytes) -> _jwk.JWK:
    if len(secret) < MIN_SECRET:
        raise ValueError(f"token secret must be at least {MIN_SECRET} bytes")
    return _jwk.JWK(kty="oct", k=b64u_encode(secret))


@dataclass(frozen=True, slots=True)
class Claims:
    sub: str
    clusters: tuple[str, ...]
    exp: int

    def allows(self, cluster: str) -> bool:
        return "*" in self.clusters or cluster in self.clusters


def _unauthorized(message: str) -> SessionError:
    return SessionError("unauthorized", message)


class TokenVerifier:
    """Verifies consumer tokens with one pinned key and algorithm."""

    def __init__(
        self,
        *,
        secret: bytes | None = None,
        issuer_jwk: Mapping[str, Any] | None = None,
        leeway_s: int = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (secret is None) == (issuer_jwk is None):
            raise ValueError("give exactly one of secret or issuer_jwk")
        if secret is not None:
            self._key = _secret_key(secret)
        else:
            assert issuer_jwk is not None
            if {"d", "k", "p", "q"} & issuer_jwk.keys():
                raise ValueError("issuer_jwk must be a public key")
            self._key = _jwk.JWK(**issuer_jwk)
        self._alg = _alg_for(self._key)
        self._leeway = leeway_s
        self._clock = clock

    def verify(self, token: str) -> Claims:
        """Check signature, ``exp``, ``nbf`` and the claim types; raise ``SessionError``
        (code ``unauthorized``) otherwise. Whether a cluster is allowed is the caller's call
        (``forbidden``)."""
        if not token or len(token) > _MAX_TOKEN:
            raise _unauthorized("missing or oversized token")
        obj = _jws.JWS()
        obj.allowed_algs = [self._alg]
        try:
            obj.deserialize(token)
            obj.verify(self._key, alg=self._alg)
            claims = json.loads(obj.payload)
        except (JWException, ValueError, TypeError, UnicodeDecodeError, RecursionError) as exc:
            raise _unauthorized("invalid token") from exc
        if not isinstance(claims, dict):
            raise _unauthorized("invalid token claims")
        now = self._clock()
        exp, nbf, sub, clusters = (
            claims.get("exp"),
            claims.get("nbf", 0),
            claims.get("sub"),
            claims.get("clusters"),
        )
        if not _numeric_date(exp):
            raise _unauthorized("token lacks a valid exp")
        if not _numeric_date(nbf):
            raise _unauthorized("token has an invalid nbf")
        if exp + self._leeway < now:
            raise _unauthorized("token expired")
        if nbf - self._leeway > now:
            raise _unauthorized("token not yet valid")
        if not isinstance(sub, str) or not sub or len(sub) > 256:
            raise _unauthorized("token lacks a subject")
        if not isinstance(clusters, list) or not all(
            c == "*" or is_cluster_id(c) for c in clusters
        ):
            raise _unauthorized("token lacks a valid clusters claim")
        return Claims(sub, tuple(clusters), int(exp))


def mint_token(
    *,
    sub: str,
    clusters: Sequence[str],
    ttl_s: int = 3600,
    secret: bytes | None = None,
    issuer_jwk: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """Mint a token (development and tests: HS256 secret, or an issuer private JWK)."""
    if (secret is None) == (issuer_jwk is None):
        raise ValueError("give exactly one of secret or issuer_jwk")
    key = _secret_key(secret) if secret is not None else _jwk.JWK(**(issuer_jwk or {}))
    alg = _alg_for(key)
    issued = int(time.time() if now is None else now)
    claims = {"sub": sub, "clusters": list(clusters), "iat": issued, "exp": issued + ttl_s}
    obj = _jws.JWS(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
    obj.add_signature(key, alg=alg, protected=json.dumps({"alg": alg, "typ": "JWT"}))
    return str(obj.serialize(compact=True))


def _numeric_date(value: object) -> TypeGuard[int | float]:
    """RFC 7519 NumericDate: seconds, an integer or not, finite (a bool is not a number)."""
    return type(value) is int or (type(value) is float and math.isfinite(value))
