"""producers: the cluster agent, its telemetry sources and its authorization policy."""

from producers._agent import Agent
from producers._authz import Authorized, Authorizer, AuthzPolicy
from producers._batcher import Batching
from producers._config import ProducerConfig
from producers._sources import HostMetrics, HttpEvents, JsonLines, Records, Source

__all__ = [
    "Agent",
    "Authorized",
    "Authorizer",
    "AuthzPolicy",
    "Batching",
    "HostMetrics",
    "HttpEvents",
    "JsonLines",
    "ProducerConfig",
    "Records",
    "Source",
]
