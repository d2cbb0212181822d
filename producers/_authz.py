"""Who may read this cluster: the policy of authorized consumer identities, the check of the
proof every ``open`` carries, and the replay cache (docs/protocol.md, "Authorization held by
the cluster").

Pure logic but for reading and writing the policy file; time is a parameter. A refused open
is a :class:`SessionError` ``forbidden`` whose message is the contract's one-line reason (it
never echoes the proof or token).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from sealstream import IntegrityError, SessionError, WireError
from sealstream.control import ControlGrants, ControlOpen
from sealstream.crypto import GRANTS_TYP, PROOF_TYP, jws_header, verify_proof
from sealstream.ids import check_stream
from sealstream.jwk import b64u_decode, thumbprint

__all__ = [
    "MAX_JTI",
    "POLICY_FILE_NAME",
    "WINDOW_S",
    "Authorized",
    "Authorizer",
    "AuthzPolicy",
    "IssuerGrant",
    "KeyGrant",
    "page_registration",
]

log = structlog.get_logger(__name__)

#: how far a proof's ``iat`` may be from the producer's clock, either side, in seconds
WINDOW_S: Final = 120
#: accepted ``jti`` values remembered at most; beyond, opens are refused rather than forgotten
MAX_JTI: Final = 100_000
#: the policy file's name, in the cluster key file's directory
POLICY_FILE_NAME: Final = "authorized.json"
_CLAIMS: Final = frozenset({"cluster", "session", "streams", "key_mode", "iat", "jti"})
_GRANTS_CLAIMS: Final = frozenset({"cluster", "iat", "jti"})
_JTI: Final = re.compile(r"[A-Za-z0-9_-]{22,128}")


def public_ed25519(jwk: object) -> dict[str, Any]:
    """The public members of an Ed25519 JWK (an identity or an issuer key), or ValueError."""
    if not isinstance(jwk, Mapping) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise ValueError("not an Ed25519 public JWK (kty OKP, crv Ed25519)")
    if "d" in jwk:
        raise ValueError("the JWK holds a private key: give the public key only")
    x = jwk.get("x")
    try:
        if not isinstance(x, str) or len(b64u_decode(x)) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
    except ValueError as exc:
        raise ValueError(f"bad Ed25519 public key: {exc}") from None
    return {"crv": "Ed25519", "kty": "OKP", "x": x}


def _until(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("until must be integer Unix seconds or null")
    return value


def _name(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError("name must be a string or null")
    return value


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """A consumer identity the cluster authorizes: the streams it may read, until when."""

    jwk: dict[str, Any]
    streams: frozenset[str]
    until: int | None = None
    name: str | None = None

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until

    def to_json(self) -> dict[str, Any]:
        return {
            "jwk": self.jwk,
            "streams": sorted(self.streams),
            "until": self.until,
            "name": self.name,
        }


@dataclass(frozen=True, slots=True)
class IssuerGrant:
    """A customer-owned issuer key whose tokens (``cnf.jkt``) authorize identities."""

    jwk: dict[str, Any]
    until: int | None = None
    name: str | None = None

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until

    def to_json(self) -> dict[str, Any]:
        return {"jwk": self.jwk, "until": self.until, "name": self.name}


@dataclass(frozen=True, slots=True)
class AuthzPolicy:
    """The policy file's content: identities and issuers, by key id (RFC 7638 thumbprint).

    File (JSON, mode 0600): ``{"version": 1, "keys": {"<id>": {"jwk", "streams", "until",
    "name"}}, "issuers": {"<id>": {"jwk", "until", "name"}}}``.
    """

    keys: Mapping[str, KeyGrant] = field(default_factory=dict)
    issuers: Mapping[str, IssuerGrant] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: object) -> AuthzPolicy:
        """Parse the file's JSON; raise ValueError on a bad layout. An entry whose id is not
        its key's thumbprint is skipped (and logged): it authorizes nothing."""
        if not isinstance(data, dict) or data.get("version") != 1:
            raise ValueError("not a version 1 sealstream authorization policy")
        keys_in, issuers_in = data.get("keys", {}), data.get("issuers", {})
        if not isinstance(keys_in, dict) or not isinstance(issuers_in, dict):
            raise ValueError("keys and issuers must be JSON objects")
        keys: dict[str, KeyGrant] = {}
        for kid, entry in keys_in.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("streams"), list):
                raise ValueError(f"key {kid}: an entry needs jwk and streams")
            try:
                streams = frozenset(check_stream(s) for s in entry["streams"])
            except WireError as exc:
                raise ValueError(f"key {kid}: {exc}") from None
            grant = KeyGrant(
                public_ed25519(entry.get("jwk")),
                streams,
                _until(entry.get("until")),
                _name(entry.get("name")),
            )
            if _checked_id(kid, grant.jwk):
                keys[kid] = grant
        issuers: dict[str, IssuerGrant] = {}
        for kid, entry in issuers_in.items():
            if not isinstance(entry, dict):
                raise ValueError(f"issuer {kid}: an entry needs a jwk")
            issuer = IssuerGrant(
                public_ed25519(entry.get("jwk")),
                _until(entry.get("until")),
                _name(entry.get("name")),
            )
            if _checked_id(kid, issuer.jwk):
                issuers[kid] = issuer
        return cls(keys, issuers)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "keys": {kid: g.to_json() for kid, g in sorted(self.keys.items())},
            "issuers": {kid: g.to_json() for kid, g in sorted(self.issuers.items())},
        }

    @classmethod
    def load(cls, path: Path) -> AuthzPolicy:
        """Read a policy file (FileNotFoundError if there is none; ValueError if bad)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not UTF-8") from exc
        return cls.from_json(data)

    @classmethod
    def load_or_empty(cls, path: Path) -> AuthzPolicy:
        try:
            return cls.load(path)
        except FileNotFoundError:
            return cls()

    def save(self, path: Path) -> None:
        """Write atomically (a new file, mode 0600, renamed over the old one)."""
        text = json.dumps(self.to_json(), indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:  # mkstemp makes it 0600
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def with_key(
        self,
        jwk: Mapping[str, Any],
        streams: Iterable[str],
        *,
        until: int | None = None,
        name: str | None = None,
    ) -> tuple[AuthzPolicy, str]:
        """This policy with ``jwk`` authorized for ``streams`` (replacing its entry); the new
        policy and the key's id."""
        public = public_ed25519(jwk)
        chosen = frozenset(check_stream(s) for s in streams)
        if not chosen:
            raise ValueError("authorize at least one stream")
        kid = thumbprint(public)
        keys = {**self.keys, kid: KeyGrant(public, chosen, _until(until), _name(name))}
        return AuthzPolicy(keys, self.issuers), kid

    def with_issuer(
        self, jwk: Mapping[str, Any], *, until: int | None = None, name: str | None = None
    ) -> tuple[AuthzPolicy, str]:
        public = public_ed25519(jwk)
        kid = thumbprint(public)
        issuers = {**self.issuers, kid: IssuerGrant(public, _until(until), _name(name))}
        return AuthzPolicy(self.keys, issuers), kid

    def without(self, kid: str) -> AuthzPolicy:
        """This policy without the key or issuer ``kid``; KeyError if it holds neither."""
        if kid not in self.keys and kid not in self.issuers:
            raise KeyError(kid)
        keys = {k: g for k, g in self.keys.items() if k != kid}
        issuers = {k: g for k, g in self.issuers.items() if k != kid}
        return AuthzPolicy(keys, issuers)


def _checked_id(kid: str, jwk: dict[str, Any]) -> bool:
    if thumbprint(jwk) == kid:
        return True
    log.error("authz.entry_ignored", kid=kid, reason="id is not the key's thumbprint")
    return False


@dataclass(frozen=True, slots=True)
class Authorized:
    """What an accepted proof established: the identity (its id and name), the streams it may
    read, until when, and the issuer that vouched for it (None: listed in the policy)."""

    identity: str
    name: str | None
    streams: frozenset[str]
    until: float | None
    issuer: str | None = None


class Authorizer:
    """The producer's side of authorization: the policy (re-read from ``path`` when it
    changes), the proof check and the replay cache. ``check`` answers an open with
    :class:`Authorized`, or refuses it (SessionError ``forbidden``, the reason its message)."""

    def __init__(
        self,
        path: Path,
        *,
        cluster: str,
        window_s: float = WINDOW_S,
        max_jti: int = MAX_JTI,
    ) -> None:
        self.path = path
        self.cluster = cluster
        self.window_s = window_s
        self.max_jti = max_jti
        self.policy = AuthzPolicy()
        self._stamp: tuple[int, int, int] | None = None
        self._loaded = False
        self._seen: dict[str, float] = {}  # jti -> when it leaves the window

    def refresh(self) -> bool:
        """Re-read the policy if the file changed (mtime, size or inode); True if it did. A
        file gone or unreadable authorizes nothing."""
        try:
            st = self.path.stat()
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if self._loaded and stamp == self._stamp:
            return False
        self._stamp, self._loaded = stamp, True
        try:
            self.policy = AuthzPolicy.load(self.path)
        except (OSError, ValueError) as exc:
            self.policy = AuthzPolicy()
            log.error("authz.policy_unusable", path=str(self.path), error=str(exc)[:200])
            return True
        log.info(
            "authz.policy_loaded",
            path=str(self.path),
            keys=len(self.policy.keys),
            issuers=len(self.policy.issuers),
        )
        return True

    def check(self, request: ControlOpen, *, now: float) -> Authorized:
        """The producer's checks of a (decoded, hence well-formed) open, in the contract's
        order; SessionError ``forbidden`` with the first failed check's reason."""
        who, claims = self._verified(request.proof, request.authz, PROOF_TYP, now)
        self._claims(claims, request, who.streams)
        self._fresh(claims, now)
        return who

    def grants(self, request: ControlGrants, *, now: float) -> tuple[Authorized, str]:
        """The checks of a grants request (those of an open, on the grants proof's three
        claims): who asks, what the policy grants it, and the proof's ``jti``; SessionError
        ``forbidden``."""
        who, claims = self._verified(request.proof, request.authz, GRANTS_TYP, now)
        if (
            set(claims) != _GRANTS_CLAIMS
            or not isinstance(claims["cluster"], str)
            or not _fresh_form(claims)
        ):
            raise _forbidden("malformed claims")
        if claims["cluster"] != self.cluster:
            raise _forbidden("proof is for another cluster")
        self._fresh(claims, now)
        return who, claims["jti"]

    def _verified(
        self, proof: str | None, authz: str | None, typ: str, now: float
    ) -> tuple[Authorized, dict[str, Any]]:
        """Steps 1 to 4: who signed ``proof`` (a ``typ`` proof), what it may read, and the
        proof's claims (not yet checked)."""
        if proof is None:
            raise _forbidden("no proof")
        try:
            header = jws_header(proof.encode("ascii"))
        except (IntegrityError, UnicodeEncodeError):
            raise _forbidden("malformed proof") from None
        kid = header.get("kid")
        if (
            header.get("alg") != "Ed25519"
            or header.get("typ") != typ
            or "crit" in header
            or not isinstance(kid, str)
        ):
            raise _forbidden("malformed proof")
        grant = self.policy.keys.get(kid)
        issuer: str | None = None
        until: float | None
        if grant is not None:
            key, allowed, until, name = grant.jwk, grant.streams, grant.until, grant.name
        elif authz is not None:
            allowed, until, issuer = self._issued(authz, kid, now)
            name = None
            try:
                key = public_ed25519(header.get("jwk"))
            except ValueError:
                raise _forbidden("malformed proof") from None
            if thumbprint(key) != kid:
                raise _forbidden("malformed proof")
        else:
            raise _forbidden("key not authorized")
        try:
            claims = verify_proof(proof, key, typ=typ)
        except IntegrityError:
            raise _forbidden("bad signature") from None
        if until is not None and now >= until:
            raise _forbidden("authorization expired")
        return Authorized(kid, name, allowed, until, issuer), claims

    def _claims(
        self,
        claims: dict[str, Any],
        request: ControlOpen,
        allowed: frozenset[str],
    ) -> None:
        """SessionError ``forbidden`` (with why) unless the proof's claims match the open."""
        asked = claims.get("streams")
        if (
            set(claims) - {"zip"} != _CLAIMS
            or not isinstance(claims.get("zip", False), bool)
            or not all(isinstance(claims[k], str) for k in ("cluster", "session", "key_mode"))
            or not isinstance(asked, list)
            or not all(isinstance(s, str) for s in asked)
            or not _fresh_form(claims)
        ):
            raise _forbidden("malformed claims")
        if claims["cluster"] != self.cluster:
            raise _forbidden("proof is for another cluster")
        # the codec bound the open's session to its key
        if claims["session"] != request.session:
            raise _forbidden("proof is for another session")
        requested = set(request.streams)
        if set(asked) != requested:
            raise _forbidden("proof is for other streams")
        missing = sorted(requested - allowed)
        if missing:
            raise _forbidden(f"stream {missing[0]!r:.70} not authorized")
        if claims["key_mode"] != request.key_mode:
            raise _forbidden("proof is for another key mode")
        if claims.get("zip", False) is not request.zip:  # a relay must not turn compression on
            raise _forbidden("proof is for another zip")

    def _fresh(self, claims: dict[str, Any], now: float) -> None:
        """Steps 6 and 7 (``iat`` within the window, ``jti`` never accepted before), then the
        ``jti`` is remembered: one cache for opens and grants requests."""
        iat, jti = claims["iat"], claims["jti"]
        if iat < now - self.window_s:
            raise _forbidden("proof expired")
        if iat > now + self.window_s:
            raise _forbidden("proof from the future")
        seen = self._seen.get(jti)
        if seen is not None and seen >= now:
            raise _forbidden("proof replayed")
        if len(self._seen) >= self.max_jti:
            self._seen = {j: t for j, t in self._seen.items() if t >= now}
            if len(self._seen) >= self.max_jti:
                raise _forbidden("too many opens")
        self._seen[jti] = iat + self.window_s

    def _issued(self, token: str, kid: str, now: float) -> tuple[frozenset[str], float | None, str]:
        """An issuer token (``authz``) for identity ``kid``: (streams, until, issuer id); or
        SessionError ``forbidden`` with why it does not authorize."""
        refused = "issuer token refused"
        try:
            issuer_id = jws_header(token.encode("ascii")).get("kid")
        except (IntegrityError, UnicodeEncodeError):
            raise _forbidden(refused) from None
        issuer = self.policy.issuers.get(issuer_id) if isinstance(issuer_id, str) else None
        if issuer is None or not issuer.active(now):
            raise _forbidden(refused)
        assert isinstance(issuer_id, str)
        try:
            claims = verify_proof(token, issuer.jwk, typ=None)
        except IntegrityError:
            raise _forbidden(refused) from None
        cnf, exp, nbf, aud = (claims.get(k) for k in ("cnf", "exp", "nbf", "aud"))
        streams = claims.get("streams")
        if not _number(exp) or (nbf is not None and not _number(nbf)):
            raise _forbidden(refused)
        assert isinstance(exp, int | float)
        if not isinstance(streams, list) or not all(isinstance(s, str) for s in streams):
            raise _forbidden(refused)
        if not isinstance(cnf, dict) or cnf.get("jkt") != kid:
            raise _forbidden("issuer token is for another key")
        if aud is not None:
            if not isinstance(aud, str | list):
                raise _forbidden(refused)
            if self.cluster not in ([aud] if isinstance(aud, str) else aud):
                raise _forbidden("issuer token is for another cluster")
        if now >= exp or (nbf is not None and now < nbf):
            raise _forbidden("authorization expired")
        until = float(exp) if issuer.until is None else min(float(exp), issuer.until)
        return frozenset(streams), until, issuer_id

    def allows(self, who: Authorized, streams: frozenset[str], now: float) -> bool:
        """Whether a live session opened by ``who`` for ``streams`` is still authorized."""
        if who.issuer is not None:  # the token's expiry is fixed; the issuer may be revoked
            issuer = self.policy.issuers.get(who.issuer)
            alive = who.until is None or now < who.until
            return alive and issuer is not None and issuer.active(now)
        grant = self.policy.keys.get(who.identity)
        return grant is not None and grant.active(now) and streams <= grant.streams


def _forbidden(reason: str) -> SessionError:
    return SessionError("forbidden", reason)


def unverified_jti(proof: str) -> str:
    """A proof's ``jti``, unverified (a producer without a policy echoes it, checking nothing);
    "" when it cannot be read."""
    try:
        claims = json.loads(b64u_decode(proof.split(".")[1]))
    except (IndexError, ValueError, RecursionError):
        return ""
    jti = claims.get("jti") if isinstance(claims, dict) else None
    return jti if isinstance(jti, str) and _JTI.fullmatch(jti) else ""


def _fresh_form(claims: Mapping[str, Any]) -> bool:
    """``iat`` an integer and ``jti`` of the contract's form."""
    jti = claims.get("jti")
    return type(claims.get("iat")) is int and isinstance(jti, str) and bool(_JTI.fullmatch(jti))


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


#: how long a page's registration authorizes it (renewed when the page registers again)
REGISTRATION_S = 7 * 24 * 3600


def page_registration(
    policy_file: Path, *, name: str
) -> Callable[[Mapping[str, Any], Sequence[str]], str]:
    """Registration for the browser page served by ``up``/``demo``, which own this cluster's
    policy: authorize a page's public identity key for streams in ``policy_file`` (adding to
    what its entry already allows, keeping its expiry and name); returns the key's id.

    The policy is the producer's code; the page's server (in ``consumers``, which may not
    import it) is handed this function by the ``sealstream`` command."""

    def authorize(jwk: Mapping[str, Any], streams: Sequence[str]) -> str:
        policy = AuthzPolicy.load_or_empty(policy_file)
        _, kid = policy.with_key(jwk, streams)  # validates the key (ValueError)
        granted = policy.keys.get(kid)
        # a page's registration lasts a week (the demo token's lifetime), renewed as it is used
        horizon = int(time.time()) + REGISTRATION_S
        if granted is None:
            policy.with_key(jwk, streams, until=horizon, name=name)[0].save(policy_file)
        elif not set(streams) <= granted.streams or (
            granted.until is not None and granted.until < horizon - REGISTRATION_S / 2
        ):
            wanted = sorted(set(streams) | granted.streams)
            until = None if granted.until is None else max(int(granted.until), horizon)
            updated, _ = policy.with_key(jwk, wanted, until=until, name=granted.name)
            updated.save(policy_file)
        return kid

    return authorize
