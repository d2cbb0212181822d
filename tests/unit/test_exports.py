"""Each package's public API is its ``__all__``, pinned here (as httpx's
tests/test_exported_members.py does): adding or removing a name is a deliberate change."""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import pytest

EXPECTED: dict[str, list[str]] = {
    "sealstream": [
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
    ],
    "sealstream.crypto": [
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
    ],
    "producers": [
        "POLICY_FILE_NAME",
        "Agent",
        "Authorized",
        "Authorizer",
        "AuthzPolicy",
        "Batching",
        "HostMetrics",
        "HttpEvents",
        "JsonLines",
        "OtlpConfig",
        "OtlpReceiver",
        "ProducerConfig",
        "Records",
        "Source",
        "otlp_config",
        "page_registration",
    ],
    "producers.sources": [
        "CheckedRows",
        "HostMetrics",
        "HttpEvents",
        "JsonLines",
        "Records",
        "RejectReason",
        "Row",
        "Scalar",
        "Source",
        "check_rows",
        "plain_rows",
        "validate_row",
    ],
    "broker_proxy": [
        "AuthService",
        "CalloutConfig",
        "Limits",
        "Proxy",
        "ProxyConfig",
        "SessionEntry",
        "SessionRegistry",
        "bucket_name",
    ],
    "consumers": [
        "Batch",
        "Client",
        "ClientConfig",
        "ConsumerKey",
        "Context",
        "ExportConfig",
        "Grants",
        "OtlpExporter",
        "Resumed",
        "Stats",
        "Subscription",
        "TokenFile",
        "TrustStore",
        "UserIdentity",
        "WebConfig",
        "WebServer",
        "consume",
        "default_identity_file",
        "default_trust_store",
    ],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_all_is_pinned(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert exported == EXPECTED[name]
    assert len(set(exported)) == len(exported)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_exported_name_exists(name: str) -> None:
    module = importlib.import_module(name)
    for member in module.__all__:
        assert getattr(module, member, None) is not None, f"{name}.{member} is missing"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_public_member_is_exported(name: str) -> None:
    """Nothing public besides ``__all__`` (private ``_x`` modules and subpackages aside): an
    ``__init__`` only re-exports."""
    module = importlib.import_module(name)
    public = {
        m
        for m in dir(module)
        if not m.startswith("_") and not isinstance(getattr(module, m), types.ModuleType)
    }
    assert public == set(module.__all__)


def test_shared_names_are_the_same_objects() -> None:
    """consumers re-exports the crypto types it hands out; they are sealstream's own."""
    consumers = importlib.import_module("consumers")
    crypto = importlib.import_module("sealstream.crypto")
    for member in ("Batch", "ConsumerKey", "TrustStore"):
        assert getattr(consumers, member) is getattr(crypto, member)


#: the shared core's public modules: what the roles and tools import from it
CORE_MODULES = sorted(
    p.stem
    for p in (Path(__file__).resolve().parents[2] / "sealstream").glob("*.py")
    if not p.stem.startswith("_")
)


def test_the_core_has_its_public_modules() -> None:
    assert CORE_MODULES == [
        "control",
        "errors",
        "groupwire",
        "ids",
        "jwk",
        "log",
        "metrics",
        "nats",
        "natsconf",
        "natsjwt",
        "otlp",
        "resource",
        "run",
        "server",
        "store",
        "tokens",
        "topology",
        "wire",
    ]


@pytest.mark.parametrize("stem", CORE_MODULES)
def test_each_public_core_module_says_what_it_exports(stem: str) -> None:
    module = importlib.import_module(f"sealstream.{stem}")
    exported = module.__all__
    assert exported, f"sealstream.{stem} exports nothing"
    assert len(set(exported)) == len(exported)
    for member in exported:
        assert getattr(module, member, None) is not None, f"sealstream.{stem}.{member} is missing"
