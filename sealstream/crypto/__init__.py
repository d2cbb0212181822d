"""Sealing and opening: consumer keys, cluster and user identities, trust store, session crypto.

Producers and consumers import this; the proxy never does (it is blind by construction).
"""

from sealstream.crypto._group import (
    GROUP_COALESCE_S,
    GroupMember,
    GroupSeal,
    GroupSealer,
    MemberSession,
)
from sealstream.crypto._jose import (
    GRANTS_TYP,
    PROOF_TYP,
    ClusterIdentity,
    ConsumerKey,
    KeyKind,
    UserIdentity,
    jws_header,
    verify_grants,
    verify_proof,
)
from sealstream.crypto._session import (
    DEFAULT_MAX_PLAINTEXT,
    Batch,
    ConsumerSession,
    End,
    Policy,
    ProducerSession,
    Rotation,
    encode_rows,
)
from sealstream.crypto._trust import TrustStore

__all__ = [
    "DEFAULT_MAX_PLAINTEXT",
    "GRANTS_TYP",
    "GROUP_COALESCE_S",
    "PROOF_TYP",
    "Batch",
    "ClusterIdentity",
    "ConsumerKey",
    "ConsumerSession",
    "End",
    "GroupMember",
    "GroupSeal",
    "GroupSealer",
    "KeyKind",
    "MemberSession",
    "Policy",
    "ProducerSession",
    "Rotation",
    "TrustStore",
    "UserIdentity",
    "encode_rows",
    "jws_header",
    "verify_grants",
    "verify_proof",
]
