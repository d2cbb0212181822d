"""Consumer tokens: signature, expiry, not-before, claim types, pinned algorithm."""

from __future__ import annotations

import json

import pytest
from jwcrypto import jwk as jc_jwk
from jwcrypto import jws as jc_jws

from sealstream import SessionError, TokenVerifier, mint_token

SECRET = b"s" * 32


def test_valid_token() -> None:
    claims = TokenVerifier(secret=SECRET).verify(
        mint_token(sub="alice", clusters=["c1"], secret=SECRET)
    )
    assert claims.sub == "alice"
    assert claims.allows("c1")
    assert not claims.allows("c2")
    star = TokenVerifier(secret=SECRET).verify(mint_token(sub="ops", clusters=["*"], secret=SECRET))
    assert star.allows("anything")


def test_issuer_key_tokens() -> None:
    issuer = jc_jwk.JWK.generate(kty="OKP", crv="Ed25519")
    token = mint_token(sub="bob", clusters=["c1"], issuer_jwk=issuer.export_private(as_dict=True))
    verifier = TokenVerifier(issuer_jwk=issuer.export_public(as_dict=True))
    assert verifier.verify(token).sub == "bob"
    with pytest.raises(ValueError):
        TokenVerifier(issuer_jwk=issuer.export_private(as_dict=True))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not.a.token",
        mint_token(sub="a", clusters=["c1"], secret=b"x" * 32),  # wrong secret
        mint_token(sub="a", clusters=["c1"], secret=SECRET, now=0),  # expired
        mint_token(sub="a", clusters=["c1"], secret=SECRET, ttl_s=-120),  # expired just now
    ],
)
def test_refused_tokens(token: str) -> None:
    with pytest.raises(SessionError) as err:
        TokenVerifier(secret=SECRET).verify(token)
    assert err.value.code == "unauthorized"


def _signed(claims: dict[str, object], alg: str = "HS256", key: jc_jwk.JWK | None = None) -> str:
    key = key or jc_jwk.JWK(kty="oct", k=jc_jwk.base64url_encode(SECRET))
    obj = jc_jws.JWS(json.dumps(claims).encode())
    obj.add_signature(key, alg=alg, protected=json.dumps({"alg": alg}))
    return str(obj.serialize(compact=True))


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "a", "clusters": ["c1"]},  # no exp: never accepted (jwcrypto's check_claims trap)
        {"sub": "a", "clusters": ["c1"], "exp": "never"},
        {"sub": "a", "clusters": ["c1"], "exp": 2**40, "nbf": 2**40},
        {"clusters": ["c1"], "exp": 2**40},
        {"sub": "a", "clusters": "c1", "exp": 2**40},
        {"sub": "a", "clusters": ["bad id"], "exp": 2**40},
        {"sub": "a", "clusters": ["c1"], "exp": True},
        {"sub": "a", "clusters": ["c1"], "exp": float("inf")},  # JSON Infinity: never expires
        {"sub": "a", "clusters": ["c1"], "exp": float("nan")},
        {"sub": "a", "clusters": ["c1"], "exp": 2**40, "nbf": "now"},
        {"sub": "a", "clusters": ["c1"], "exp": 1_000.5},  # expired, as a float
    ],
)
def test_bad_claims(claims: dict[str, object]) -> None:
    with pytest.raises(SessionError):
        TokenVerifier(secret=SECRET).verify(_signed(claims))


def test_numeric_dates_may_be_fractional() -> None:
    """RFC 7519's NumericDate allows a non-integer number of seconds."""
    claims = {"sub": "a", "clusters": ["c1"], "exp": 2**40 + 0.5, "nbf": 1_000.25}
    assert TokenVerifier(secret=SECRET).verify(_signed(claims)).exp == 2**40


def test_header_cannot_choose_the_algorithm() -> None:
    token = _signed(
        {"sub": "a", "clusters": ["c1"], "exp": 2**40},
        alg="HS512",
        key=jc_jwk.JWK(kty="oct", k=jc_jwk.base64url_encode(SECRET * 2)),
    )
    with pytest.raises(SessionError):
        TokenVerifier(secret=SECRET * 2).verify(token)


def test_short_secret_is_misuse() -> None:
    with pytest.raises(ValueError):
        TokenVerifier(secret=b"short")
