"""Public JWK validation and RFC 7638 thumbprints (pure: no crypto library, so the proxy can
use it while staying structurally blind)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final

from sealstream._errors import WireError

__all__ = [
    "KEY_ALGS",
    "MIN_RSA_BITS",
    "b64u_decode",
    "b64u_encode",
    "check_public_jwk",
    "thumbprint",
]

#: Key-management algorithms a consumer key may use, by key type.
KEY_ALGS: Final = {"RSA": "RSA-OAEP-256", "OKP": "ECDH-ES+A256KW", "EC": "ECDH-ES+A256KW"}
MIN_RSA_BITS: Final = 2048
MAX_RSA_BITS: Final = 8192
_PRIVATE: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_REQUIRED: Final = {
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
    "EC": ("crv", "kty", "x", "y"),
}
_CURVES: Final = {"OKP": {"X25519": 32}, "EC": {"P-256": 32}}


def b64u_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text: str | bytes) -> bytes:
    """Strict base64url without padding; raises ValueError."""
    raw = text.encode("ascii") if isinstance(text, str) else bytes(text)
    if b"=" in raw or len(raw) % 4 == 1:
        raise ValueError("not unpadded base64url")
    try:
        out = base64.b64decode(raw + b"=" * (-len(raw) % 4), altchars=b"-_", validate=True)
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc
    if b64u_encode(out).encode("ascii") != raw:  # non-canonical trailing bits
        raise ValueError("non-canonical base64url")
    return out


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint, base64url: the session id of a consumer key."""
    kty = jwk.get("kty")
    if kty not in _REQUIRED:
        raise WireError("bad_jwk", f"unsupported kty {kty!r:.20}")
    members = {k: jwk[k] for k in _REQUIRED[kty]}
    canon = json.dumps(members, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return b64u_encode(hashlib.sha256(canon.encode("utf-8")).digest())


def check_public_jwk(jwk: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a consumer's public encryption JWK; return it normalised with its ``alg``.

    Public members only, RSA of 2048 to 8192 bits, curves X25519 or P-256, ``alg`` absent or
    the one allowed for its type, ``use`` absent or ``enc``.
    """
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in jwk.items()):
        raise WireError("bad_jwk", "JWK members must be strings")
    if _PRIVATE & jwk.keys():
        raise WireError("private_jwk", "JWK carries private key material")
    kty = jwk.get("kty")
    if kty not in _REQUIRED:
        raise WireError("bad_jwk", f"unsupported kty {kty!r:.20}")
    missing = [k for k in _REQUIRED[kty] if k not in jwk]
    if missing:
        raise WireError("bad_jwk", f"JWK lacks {missing}")
    alg = jwk.get("alg", KEY_ALGS[kty])
    if alg != KEY_ALGS[kty]:
        raise WireError("bad_alg", f"alg {alg!r:.30} not allowed for {kty}")
    if jwk.get("use", "enc") != "enc":
        raise WireError("bad_jwk", "JWK use must be 'enc'")
    try:
        if kty == "RSA":
            n = b64u_decode(jwk["n"])
            e = int.from_bytes(b64u_decode(jwk["e"]), "big")
            bits = int.from_bytes(n, "big").bit_length()
            if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS or e < 3 or e % 2 == 0:
                raise WireError("weak_key", f"RSA key of {bits} bits is not allowed")
        else:
            size = _CURVES[kty].get(jwk["crv"])
            if size is None:
                raise WireError("bad_curve", f"curve {jwk['crv']!r:.20} not allowed")
            coords = ("x",) if kty == "OKP" else ("x", "y")
            if any(len(b64u_decode(jwk[c])) != size for c in coords):
                raise WireError("bad_jwk", "coordinate has the wrong length")
    except ValueError as exc:
        raise WireError("bad_jwk", "JWK member is not base64url") from exc
    out = {k: jwk[k] for k in _REQUIRED[kty]}
    out["alg"] = alg
    return out
