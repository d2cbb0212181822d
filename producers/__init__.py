"""producers: the cluster agent and its telemetry sources."""

from producers._agent import Agent
from producers._batcher import Batching
from producers._config import ProducerConfig
from producers._sources import HostMetrics, HttpEvents, JsonLines, Records, Source

__all__ = [
    "Agent",
    "Batching",
    "HostMetrics",
    "HttpEvents",
    "JsonLines",
    "ProducerConfig",
    "Records",
    "Source",
]
