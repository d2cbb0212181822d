"""The one typed wrapper around jwcrypto and cryptography for sealing and opening.

Services call recipes (``seal_dir``/``open_dir``, ``seal_to_key``/``open_with_key``,
``sign_claims``/``verify_claims``, ``UserIdentity.prove``/``verify_proof``) and never choose
algorithms: the allow-list is pinned here.
Sizes are capped before any crypto, and every failure to open or verify raises the one opaque
:class:`IntegrityError` (the reason is returned to the caller's counter through
:class:`Rejected`, never in the exception).

Hot path: data JWEs (``alg=dir``, ``enc=A256GCM``) are produced and parsed here directly on
``cryptography``'s AESGCM in exactly the JWE compact serialization (RFC 7516 section 7.1),
which is ~20x cheaper than building a jwcrypto ``JWE`` per message. jwcrypto is kept for key
envelopes, per-message JWEs and signatures; tests cross-check both paths against jwcrypto and
joserfc.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from jwcrypto import jwe as _jwe
from jwcrypto import jwk as _jwk
from jwcrypto import jws as _jws
from jwcrypto.common import JWException

from sealstream.control import MAX_GRANTS, MAX_PROOF
from sealstream.errors import IntegrityError, TrustError
from sealstream.jwk import (
    b64u_decode,
    b64u_encode_bytes,
    check_public_jwk,
    thumbprint,
)

__all__ = [
    "ENC",
    "PROOF_TYP",
    "SIG_ALG",
    "ClusterIdentity",
    "Compact",
    "ConsumerKey",
    "KeyKind",
    "Rejected",
    "UserIdentity",
    "aead",
    "check_signing_jwk",
    "inflate_if",
    "jws_header",
    "open_dir",
    "open_with_key",
    "parse_compact",
    "seal_dir",
    "seal_protected",
    "seal_to_key",
    "sign_claims",
    "verify_claims",
    "verify_proof",
]

ENC: Final = "A256GCM"
SIG_ALG: Final = "Ed25519"
KeyKind = Literal["rsa", "x25519", "p256"]
_MAX_HEADER: Final = 4096
_MAX_JWS: Final = 16 * 1024
PROOF_TYP: Final = "sealstream-open+jwt"
#: the ``typ`` of a grants proof (a user's) and of a cluster's grants answer
GRANTS_TYP: Final = "sealstream-grants+jwt"
GRANTS_ANSWER_TYP: Final = "sealstream-grants-answer+jwt"
_NONCE: Final = 12
_TAG: Final = 16
_CRYPTO_ERRORS = (JWException, ValueError, TypeError, KeyError, InvalidTag, zlib.error)


class Rejected(IntegrityError):
    """Internal carrier of a rejection reason; callers see only :class:`IntegrityError`.

    ``reason`` is for counters and DEBUG logs. Its message and class behave as the base.
    """

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


# --- consumer key pairs ---------------------------------------------------------------------


class ConsumerKey:
    """A consumer's ephemeral key pair. The private half stays in this object's memory: it has
    no export, and its repr names only the kind and the session id."""

    __slots__ = ("_key", "alg", "kind", "public_jwk", "session_id")

    def __init__(self, key: _jwk.JWK, kind: KeyKind) -> None:
        self._key = key
        self.kind: KeyKind = kind
        self.public_jwk: dict[str, Any] = check_public_jwk(key.export_public(as_dict=True))
        self.alg: str = self.public_jwk["alg"]
        self.session_id: str = thumbprint(self.public_jwk)

    @classmethod
    def generate(cls, kind: KeyKind = "rsa", *, rsa_bits: int = 4096) -> ConsumerKey:
        if kind == "rsa":
            if rsa_bits < 2048:
                raise ValueError("RSA keys must have at least 2048 bits")
            key = _jwk.JWK.generate(kty="RSA", size=rsa_bits)
            # jwcrypto keeps a generated key as numbers and rebuilds it at first use, checking
            # it (~0.4 s for 4096 bits, on the way to the first row). The check is for keys
            # from elsewhere; this one comes from cryptography's generator, in this process.
            key.unsafe_skip_rsa_key_validation = True
        elif kind == "x25519":
            key = _jwk.JWK.generate(kty="OKP", crv="X25519")
        elif kind == "p256":
            key = _jwk.JWK.generate(kty="EC", crv="P-256")
        else:
            raise ValueError(f"unknown key kind {kind!r}")
        return cls(key, kind)

    @classmethod
    async def agenerate(cls, kind: KeyKind = "rsa", *, rsa_bits: int = 4096) -> ConsumerKey:
        """Generate off the event loop (RSA-4096 takes about a second)."""
        return await asyncio.to_thread(cls.generate, kind, rsa_bits=rsa_bits)

    def __repr__(self) -> str:
        return f"ConsumerKey(kind={self.kind!r}, session_id={self.session_id!r})"


# --- cluster identity -----------------------------------------------------------------------


def check_signing_jwk(jwk: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a public Ed25519 cluster signing JWK; return its public members."""
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or "d" in jwk:
        raise TrustError("a cluster key must be a public Ed25519 JWK (kty OKP, crv Ed25519)")
    x = jwk.get("x")
    try:
        if not isinstance(x, str) or len(b64u_decode(x)) != 32:
            raise TrustError("Ed25519 public key must be 32 bytes")
    except ValueError as exc:
        raise TrustError("Ed25519 public key is not base64url") from exc
    return {"crv": "Ed25519", "kty": "OKP", "x": x}


class _SigningKey:
    """A long-term Ed25519 signing key kept in a JWK file (mode 0600)."""

    __slots__ = ("_key", "kid", "public_jwk")
    _what = "a signing key"

    def __init__(self, key: _jwk.JWK) -> None:
        if key.get("kty") != "OKP" or key.get("crv") != "Ed25519" or not key.has_private:
            raise TrustError(f"{self._what} is a private Ed25519 key")
        self._key = key
        self.public_jwk: dict[str, Any] = check_signing_jwk(key.export_public(as_dict=True))
        self.kid: str = thumbprint(self.public_jwk)

    @classmethod
    def generate(cls) -> Self:
        return cls(_jwk.JWK.generate(kty="OKP", crv="Ed25519"))

    @classmethod
    def load_or_create(cls, path: Path) -> Self:
        """Load the key file, or create it (mode 0600, never overwritten) if absent."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls.load(path)
        identity = cls.generate()
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(identity._key.export_private())
        return identity

    @classmethod
    def load(cls, path: Path) -> Self:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TrustError(f"{path} is readable by others: chmod 600 it")
        try:
            key = _jwk.JWK.from_json(path.read_text(encoding="utf-8"))
        except (JWException, ValueError) as exc:
            raise TrustError(f"{path} is not a JWK file") from exc
        return cls(key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kid={self.kid!r})"


class ClusterIdentity(_SigningKey):
    """A cluster's long-term Ed25519 signing key."""

    __slots__ = ()
    _what = "a cluster identity"

    def sign_grants(self, claims: Mapping[str, Any]) -> str:
        """The signed answer to a grants request (docs/protocol.md, "Grants")."""
        return sign_claims(self, claims, embed_jwk=False, typ=GRANTS_ANSWER_TYP).decode("ascii")


class UserIdentity(_SigningKey):
    """A consumer's long-term Ed25519 identity key: it signs the proof sent with every open
    (see docs/protocol.md, "Authorization held by the cluster"). ``kid`` (its thumbprint) is
    what a cluster's policy authorizes."""

    __slots__ = ()
    _what = "a user identity"

    def prove(
        self,
        *,
        cluster: str,
        session: str,
        streams: Sequence[str],
        key_mode: str,
        zip: bool = False,
        now: float | None = None,
        jti: str | None = None,
    ) -> str:
        """The proof for one open: a JWS compact over the open's cluster, session id,
        streams, key mode and (when asked for) compression, the time (``now``) and a random
        ``jti`` (128 bits)."""
        claims: dict[str, Any] = {
            "cluster": cluster,
            "session": session,
            "streams": list(streams),
            "key_mode": key_mode,
            "iat": int(time.time() if now is None else now),
            "jti": jti or b64u_encode_bytes(os.urandom(16)).decode("ascii"),
        }
        if zip:
            claims["zip"] = True
        return sign_claims(self, claims, typ=PROOF_TYP).decode("ascii")

    def prove_grants(
        self, *, cluster: str, now: float | None = None, jti: str | None = None
    ) -> tuple[str, str]:
        """The proof for one grants request, and its ``jti`` (the answer echoes it)."""
        jti = jti or b64u_encode_bytes(os.urandom(16)).decode("ascii")
        claims = {"cluster": cluster, "iat": int(time.time() if now is None else now), "jti": jti}
        return sign_claims(self, claims, typ=GRANTS_TYP).decode("ascii"), jti


# --- JWS claims -----------------------------------------------------------------------------


def sign_claims(
    identity: _SigningKey,
    claims: Mapping[str, Any],
    *,
    embed_jwk: bool = True,
    typ: str = "JWT",
) -> bytes:
    """JWS compact (``alg`` Ed25519, ``kid`` = key thumbprint) over JSON claims."""
    header: dict[str, Any] = {"alg": SIG_ALG, "kid": identity.kid, "typ": typ}
    if embed_jwk:  # lets a consumer that opted into trust-on-first-use pin the key
        header["jwk"] = identity.public_jwk
    token = _jws.JWS(json.dumps(dict(claims), separators=(",", ":")).encode("utf-8"))
    token.add_signature(identity._key, alg=SIG_ALG, protected=json.dumps(header))
    return str(token.serialize(compact=True)).encode("ascii")


def jws_header(token: bytes) -> dict[str, Any]:
    """The protected header of a JWS compact, parsed strictly (not verified)."""
    if len(token) > _MAX_JWS or token.count(b".") != 2:
        raise Rejected("bad_jws")
    return _json_object(token.split(b".", 1)[0], "bad_jws")


def verify_claims(token: bytes, public_jwk: Mapping[str, Any]) -> dict[str, Any]:
    """Verify a JWS compact with exactly ``alg`` Ed25519 against one public key."""
    header = jws_header(token)
    if header.get("alg") != SIG_ALG or header.get("crit") is not None:
        raise Rejected("bad_sig_alg")
    try:
        key = _jwk.JWK(**public_jwk)
        obj = _jws.JWS()
        obj.allowed_algs = [SIG_ALG]
        obj.deserialize(token.decode("ascii"))
        obj.verify(key, alg=SIG_ALG)
        payload = obj.payload
    except (*_CRYPTO_ERRORS, UnicodeDecodeError) as exc:
        raise Rejected("bad_signature") from exc
    claims = _json_object_raw(payload, "bad_claims")
    return claims


def verify_proof(
    token: str, public_jwk: Mapping[str, Any], *, typ: str | None = PROOF_TYP
) -> dict[str, Any]:
    """Verify an open proof (or, with ``typ=None``, an issuer token): a JWS compact with
    exactly ``alg`` Ed25519, signed by ``public_jwk``, and with ``typ`` when given. Returns the
    claims; every failure is the one opaque :class:`Rejected`."""
    if len(token) > MAX_PROOF:
        raise Rejected("bad_jws")
    try:
        raw = token.encode("ascii")
    except UnicodeEncodeError as exc:
        raise Rejected("bad_jws") from exc
    if typ is not None and jws_header(raw).get("typ") != typ:
        raise Rejected("bad_typ")
    return verify_claims(raw, public_jwk)


def verify_grants(token: str, public_jwk: Mapping[str, Any]) -> dict[str, Any]:
    """Verify a cluster's grants answer (``typ``, ``alg`` Ed25519, signed by ``public_jwk``);
    its claims, or the one opaque :class:`Rejected`."""
    if len(token) > MAX_GRANTS:
        raise Rejected("bad_jws")
    try:
        raw = token.encode("ascii")
    except UnicodeEncodeError as exc:
        raise Rejected("bad_jws") from exc
    if jws_header(raw).get("typ") != GRANTS_ANSWER_TYP:
        raise Rejected("bad_typ")
    return verify_claims(raw, public_jwk)


# --- compact JWE ----------------------------------------------------------------------------


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate member")
    return out


#: built once: ``json.loads`` with a hook builds a decoder per call, half the cost of a header
_STRICT_JSON: Final = json.JSONDecoder(object_pairs_hook=_no_dupes)


def _json_object_raw(raw: bytes, reason: str) -> dict[str, Any]:
    """A JSON object in UTF-8 (RFC 7515/7516 headers, JWT claims), duplicate members refused."""
    try:
        value = _STRICT_JSON.decode(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise Rejected(reason) from exc
    if not isinstance(value, dict):
        raise Rejected(reason)
    return value


def _json_object(b64: bytes, reason: str) -> dict[str, Any]:
    if len(b64) > _MAX_HEADER:
        raise Rejected(reason)
    try:
        raw = b64u_decode(b64)
    except ValueError as exc:
        raise Rejected(reason) from exc
    return _json_object_raw(raw, reason)


class Compact(NamedTuple):
    """A JWE compact serialization, split and strictly decoded (not yet decrypted). A named
    tuple: one is built per data message, and a tuple costs a third of a frozen dataclass."""

    header: dict[str, Any]
    protected: bytes  # the base64url header as sent: the AEAD's additional data
    encrypted_key: bytes
    iv: bytes
    ciphertext: bytes
    tag: bytes


def parse_compact(token: bytes) -> Compact:
    """Split and decode a JWE compact; reject, before any crypto, anything that is not five
    canonical base64url parts (plaintext, a JWS, JSON serialization) or whose ``enc`` is not
    A256GCM. Canonical decoding matters: a changed padding bit must not pass unnoticed."""
    parts = token.split(b".")
    if len(parts) != 5:
        raise Rejected("not_jwe")
    header = _json_object(parts[0], "bad_header")
    if "crit" in header:
        raise Rejected("crit_header")
    if header.get("enc") != ENC:
        raise Rejected("bad_enc")
    try:
        ek = b64u_decode(parts[1]) if parts[1] else b""
        iv = b64u_decode(parts[2])
        ct = b64u_decode(parts[3])
        tag = b64u_decode(parts[4])
    except ValueError as exc:
        raise Rejected("bad_base64") from exc
    if len(iv) != _NONCE or len(tag) != _TAG:
        raise Rejected("bad_sizes")
    return Compact(header, parts[0], ek, iv, ct, tag)


_COMPACT_JSON: Final = json.JSONEncoder(separators=(",", ":"))


def _encode_header(header: Mapping[str, Any]) -> bytes:
    return b64u_encode_bytes(_COMPACT_JSON.encode(header).encode("utf-8"))


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def _inflate(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(wbits=-zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit)
    except zlib.error as exc:
        raise Rejected("bad_zip") from exc
    if d.unconsumed_tail or not d.eof:
        raise Rejected("zip_bomb")
    return out


def seal_dir(
    aead: AESGCM,
    header: Mapping[str, Any],
    plaintext: bytes,
    *,
    nonce: bytes | None = None,
) -> bytes:
    """Encrypt to a compact JWE with ``alg=dir``, ``enc=A256GCM`` and this protected header.

    ``header`` must hold ``alg``/``enc``/``kid``; with ``"zip": "DEF"`` the plaintext is
    deflated first. ``nonce`` is a parameter for known-answer tests only.
    """
    if header.get("alg") != "dir" or header.get("enc") != ENC:
        raise ValueError("seal_dir needs alg=dir, enc=A256GCM")
    return seal_protected(
        aead, _encode_header(header), plaintext, deflate=header.get("zip") == "DEF", nonce=nonce
    )


def seal_protected(
    aead: AESGCM,
    protected: bytes,
    plaintext: bytes,
    *,
    deflate: bool = False,
    nonce: bytes | None = None,
) -> bytes:
    """:func:`seal_dir` with the protected header already encoded (base64url of its JSON),
    for a caller that builds it from a template; it must say ``alg`` dir, ``enc`` A256GCM,
    and ``zip`` DEF exactly when ``deflate``."""
    if deflate:
        plaintext = _deflate(plaintext)
    iv = os.urandom(_NONCE) if nonce is None else nonce
    sealed = aead.encrypt(iv, plaintext, protected)
    return b".".join(
        (
            protected,
            b"",
            b64u_encode_bytes(iv),
            b64u_encode_bytes(sealed[:-_TAG]),
            b64u_encode_bytes(sealed[-_TAG:]),
        )
    )


def open_dir(aead: AESGCM, jwe: Compact, *, max_plaintext: int) -> bytes:
    """Decrypt a ``dir``/A256GCM JWE from :func:`parse_compact` (whose header the caller has
    checked). Raises :class:`Rejected`."""
    if jwe.encrypted_key:
        raise Rejected("bad_alg")
    if len(jwe.ciphertext) > max_plaintext:
        raise Rejected("bad_sizes")
    try:
        return aead.decrypt(jwe.iv, jwe.ciphertext + jwe.tag, jwe.protected)
    except InvalidTag as exc:
        raise Rejected("bad_tag") from exc


def inflate_if(header: Mapping[str, Any], plaintext: bytes, *, limit: int, allow: bool) -> bytes:
    """Apply ``zip`` from an authenticated header: only ``DEF``, only if asked for, capped."""
    zip_ = header.get("zip")
    if zip_ is None:
        return plaintext
    if zip_ != "DEF" or not allow:
        raise Rejected("zip_not_allowed")
    return _inflate(plaintext, limit)


def seal_to_key(
    public_jwk: Mapping[str, Any], header: Mapping[str, Any], plaintext: bytes
) -> bytes:
    """Encrypt to a consumer's public key (``alg`` from the validated JWK, ``enc`` A256GCM)."""
    jwk = check_public_jwk(public_jwk)
    full = {**header, "alg": jwk["alg"], "enc": ENC}  # jwcrypto deflates if zip=DEF
    try:
        obj = _jwe.JWE(plaintext, protected=json.dumps(full, separators=(",", ":")))
        obj.add_recipient(_jwk.JWK(**jwk))
        return str(obj.serialize(compact=True)).encode("ascii")
    except JWException as exc:
        raise ValueError("cannot encrypt to this key") from exc


def open_with_key(
    key: ConsumerKey,
    token: bytes,
    *,
    max_plaintext: int,
    allow_zip: bool,
) -> bytes:
    """Decrypt a JWE addressed to this consumer key (header already checked by the caller:
    ``alg`` must equal the key's). Raises :class:`Rejected`."""
    obj = _jwe.JWE()
    obj.allowed_algs = [key.alg, ENC]
    try:
        obj.deserialize(token.decode("ascii"))
        obj.decrypt(key._key, max_plaintext=max_plaintext)
        plaintext = obj.plaintext
    except (*_CRYPTO_ERRORS, UnicodeDecodeError) as exc:
        raise Rejected("bad_decrypt") from exc
    if not isinstance(plaintext, bytes):
        raise Rejected("bad_decrypt")
    return plaintext


def aead(key: bytes) -> AESGCM:
    if len(key) != 32:
        raise ValueError("A256GCM needs a 32-byte key")
    return AESGCM(key)
