"""broker_proxy: the blind relay between clusters and consumers."""

from broker_proxy._callout import AuthService
from broker_proxy._config import CalloutConfig, Limits, ProxyConfig
from broker_proxy._proxy import Proxy
from broker_proxy._registry import SessionEntry, SessionRegistry
from broker_proxy._shared import bucket_name

__all__ = [
    "AuthService",
    "CalloutConfig",
    "Limits",
    "Proxy",
    "ProxyConfig",
    "SessionEntry",
    "SessionRegistry",
    "bucket_name",
]
