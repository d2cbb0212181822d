"""sealstream: the shared core of the end-to-end encrypted telemetry pipeline.

Wire format, identifiers, tokens, NATS plumbing and the embedded server. Sealing and opening
live in :mod:`sealstream.crypto`, which the proxy never imports.
"""

from sealstream.control import OpenRequest
from sealstream.errors import (
    BrokerError,
    IntegrityError,
    SealstreamError,
    SessionError,
    TrustError,
    WireError,
)
from sealstream.ids import SESSION_STREAM, Subjects
from sealstream.jwk import check_public_jwk, thumbprint
from sealstream.log import configure_logging
from sealstream.tokens import Claims, TokenVerifier, mint_token
from sealstream.wire import (
    Envelope,
    KeyMode,
    Notice,
    decode_envelope,
    decode_inbox,
    encode_envelope,
)

__all__ = [
    "SESSION_STREAM",
    "BrokerError",
    "Claims",
    "Envelope",
    "IntegrityError",
    "KeyMode",
    "Notice",
    "OpenRequest",
    "SealstreamError",
    "SessionError",
    "Subjects",
    "TokenVerifier",
    "TrustError",
    "WireError",
    "check_public_jwk",
    "configure_logging",
    "decode_envelope",
    "decode_inbox",
    "encode_envelope",
    "mint_token",
    "thumbprint",
]
