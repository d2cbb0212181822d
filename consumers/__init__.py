"""consumers: the client library (verify, decrypt, order, policy), the OTLP exporter and the
CLI."""

from consumers._cli import consume
from consumers._client import Client
from consumers._config import (
    ClientConfig,
    Context,
    TokenFile,
    default_identity_file,
    default_trust_store,
)
from consumers._grants import Grants
from consumers._otlp import ExportConfig, OtlpExporter
from consumers._subscription import Resumed, Stats, Subscription
from consumers._web import WebConfig, WebServer
from sealstream.crypto import Batch, ConsumerKey, TrustStore, UserIdentity

__all__ = [
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
]
