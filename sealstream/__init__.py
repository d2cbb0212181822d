"""sealstream: the shared core of the end-to-end encrypted telemetry pipeline.

Wire format, identifiers, tokens, NATS plumbing and the embedded server. Sealing and opening
live in :mod:`sealstream.crypto`, which the proxy never imports.
"""

from sealstream._errors import (
    BrokerError,
    IntegrityError,
    SealstreamError,
    SessionError,
    TrustError,
    WireError,
)
from sealstream._ids import SESSION_STREAM, Subjects
from sealstream._jwk import check_public_jwk, thumbprint
from sealstream._log import configure_logging
from sealstream._tokens import Claims, TokenVerifier, mint_token
from sealstream._wire import (
    Envelope,
    KeyMode,
    Notice,
    OpenRequest,
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
