"""NATS nkeys and JWTs (v2), for the broker's auth callout (pure: no I/O).

A NATS JWT is ``base64url(header).base64url(claims).base64url(signature)`` (unpadded), the
header ``{"typ":"JWT","alg":"ed25519-nkey"}``, the signature Ed25519 over the first two parts
by the issuer's nkey; ``jti`` is the unpadded base32 SHA-512/256 of the JSON of the standard
claims (``aud exp jti iat iss name nbf sub``, empty ones omitted, ``jti`` itself empty), as
nats-io/jwt's ``ClaimsData.hash`` computes it. An nkey public key is the base32 of a prefix
byte, the 32-byte Ed25519 key and a CRC-16 (little endian); a seed likewise, with two prefix
bytes. Signing goes through the ``nkeys`` package; verifying a public key is done here (that
package only verifies with a seed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import nkeys
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sealstream.errors import WireError

__all__ = [
    "HEADER",
    "AccountKey",
    "Signer",
    "decode_jwt",
    "encode_jwt",
    "is_public_key",
]

HEADER: Final = {"typ": "JWT", "alg": "ed25519-nkey"}
#: the standard claims hashed into ``jti``, in nats-io/jwt's ``ClaimsData`` field order
_STANDARD: Final = ("aud", "exp", "jti", "iat", "iss", "name", "nbf", "sub")
_PREFIX: Final = {
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
    "server": nkeys.PREFIX_BYTE_SERVER,
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
}


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64u(text: str) -> bytes:
    if not text or len(text) % 4 == 1:
        raise WireError("malformed", "bad base64url in a NATS JWT")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise WireError("malformed", "bad base64url in a NATS JWT") from None


def _go_json(value: Any) -> str:
    """JSON as Go's ``encoding/json`` writes it: compact, ``<>&`` escaped."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _public_key_bytes(public: str, kind: str) -> bytes:
    """The raw Ed25519 key of an nkey public key of ``kind``; WireError if it is not one."""
    try:
        raw = base64.b32decode(public.encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise WireError("bad_key", f"not an nkey {kind} public key") from None
    if len(raw) != 35 or raw[0] != _PREFIX[kind]:
        raise WireError("bad_key", f"not an nkey {kind} public key")
    if nkeys.crc16(bytearray(raw[:-2])) != int.from_bytes(raw[-2:], "little"):
        raise WireError("bad_key", f"not an nkey {kind} public key (checksum)")
    return raw[1:33]


def is_public_key(value: object, kind: str) -> bool:
    """``value`` is a well-formed nkey public key of ``kind`` (account, user, server)."""
    if not isinstance(value, str) or len(value) != 56:
        return False
    try:
        _public_key_bytes(value, kind)
    except WireError:
        return False
    return True


class Signer(Protocol):
    """An nkey that signs: its public key (``A...`` for an account) and Ed25519 signatures."""

    @property
    def public_key(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class AccountKey:
    """An account nkey pair: the auth callout's issuer. ``seed`` is secret (``SA...``)."""

    seed: bytes = field(repr=False)
    public_key: str = field(init=False)

    def __post_init__(self) -> None:
        try:
            pair = nkeys.from_seed(bytearray(self.seed))
            public = bytes(pair.public_key).decode("ascii")
        except (nkeys.NkeysError, ValueError, binascii.Error) as exc:
            raise ValueError("not an nkey seed") from exc
        if not public.startswith("A"):
            raise ValueError("the callout issuer must be an account nkey (seed 'SA...')")
        object.__setattr__(self, "public_key", public)

    @classmethod
    def generate(cls) -> AccountKey:
        seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_ACCOUNT)
        return cls(bytes(seed))

    @classmethod
    def from_text(cls, text: str | bytes) -> AccountKey:
        """A seed as stored in a file (surrounding whitespace ignored)."""
        raw = text.encode("ascii") if isinstance(text, str) else text
        return cls(raw.strip())

    def sign(self, data: bytes) -> bytes:
        pair = nkeys.from_seed(bytearray(self.seed))
        signature: bytes = pair.sign(data)
        return signature


def encode_jwt(claims: dict[str, Any], key: Signer, *, now: float | None = None) -> str:
    """Sign ``claims`` (``sub`` required) as a NATS JWT v2: sets ``iss``, ``iat`` and ``jti``."""
    if not claims.get("sub"):
        raise ValueError("a NATS JWT needs a subject")
    body = dict(claims)
    body["iss"] = key.public_key
    body["iat"] = int(time.time() if now is None else now)
    body.pop("jti", None)
    standard = {k: body[k] for k in _STANDARD if body.get(k)}
    digest = hashlib.new("sha512_256", _go_json(standard).encode("utf-8")).digest()
    body["jti"] = base64.b32encode(digest).rstrip(b"=").decode("ascii")
    signing_input = f"{_b64u(_go_json(HEADER).encode())}.{_b64u(_go_json(body).encode())}"
    signature = key.sign(signing_input.encode("ascii"))
    return f"{signing_input}.{_b64u(signature)}"


def decode_jwt(token: str | bytes, *, issuer_kind: str, max_size: int) -> dict[str, Any]:
    """The claims of a NATS JWT whose signature verifies with its own ``iss`` (a public key
    of ``issuer_kind``). Size is checked first; any defect is a :class:`WireError`."""
    if len(token) > max_size:
        raise WireError("oversize", f"NATS JWT over {max_size} bytes")
    try:
        text = token.decode("ascii") if isinstance(token, bytes) else token
    except UnicodeDecodeError:
        raise WireError("malformed", "a NATS JWT is ASCII") from None
    parts = text.strip().split(".")
    if len(parts) != 3:
        raise WireError("malformed", "a NATS JWT has three parts")
    try:
        header = json.loads(_unb64u(parts[0]))
        claims = json.loads(_unb64u(parts[1]))
    except (ValueError, RecursionError):
        raise WireError("malformed", "a NATS JWT part is not JSON") from None
    if not isinstance(header, dict) or str(header.get("typ", "")).upper() != "JWT":
        raise WireError("malformed", "not a JWT header")
    if str(header.get("alg", "")).lower() != HEADER["alg"]:
        raise WireError("bad_algorithm", "a NATS JWT is signed with ed25519-nkey")
    if not isinstance(claims, dict):
        raise WireError("malformed", "NATS JWT claims are a JSON object")
    issuer = claims.get("iss")
    if not isinstance(issuer, str):
        raise WireError("malformed", "a NATS JWT needs an issuer")
    public = Ed25519PublicKey.from_public_bytes(_public_key_bytes(issuer, issuer_kind))
    try:
        public.verify(_unb64u(parts[2]), f"{parts[0]}.{parts[1]}".encode("ascii"))
    except InvalidSignature:
        raise WireError("bad_signature", "NATS JWT signature does not verify") from None
    return claims
