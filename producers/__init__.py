"""producers: the cluster agent, its telemetry sources (the OTLP receiver among them) and its
authorization policy."""

from producers._agent import Agent
from producers._authz import (
    POLICY_FILE_NAME,
    Authorized,
    Authorizer,
    AuthzPolicy,
    page_registration,
)
from producers._batcher import Batching
from producers._config import ProducerConfig, otlp_config
from producers._otlp import OtlpConfig, OtlpReceiver
from producers.sources import HostMetrics, HttpEvents, JsonLines, Records, Source

__all__ = [
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
]
