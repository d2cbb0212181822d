"""The store: a JetStream stream per cluster keeping the sealed envelopes its producer
publishes (ciphertext, byte for byte), so that a consumer can ask for what it missed.

docs/protocol.md, "Lossless delivery (the store)": the stream ``<prefix>_store_<cluster>``
over ``<prefix>.cluster.<cluster>.data.*`` and ``.group.*``, file storage, bounded by age and
bytes, the oldest going first. Without a store a deployment is at most once, as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from sealstream.errors import BrokerError
from sealstream.ids import Subjects, check_cluster_id

__all__ = ["Store", "ensure_stream", "last_group_envelopes", "stream_name"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Store:
    """How a cluster's envelopes are kept: ``max_age_s`` and ``max_bytes`` bound the stream
    (the oldest go first), ``replicas`` 3 on a clustered server; ``ack_timeout_s`` is how
    long a publish waits for the stream's acknowledgement before it is tried again."""

    max_age_s: float = 600.0
    max_bytes: int = 256 * 1024 * 1024
    replicas: int = 1
    ack_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_age_s <= 0 or self.max_bytes < 1024 * 1024:
            raise ValueError("a store keeps envelopes for a positive age and at least 1 MiB")
        if not 1 <= self.replicas <= 5:
            raise ValueError(f"replicas must be in 1..5, got {self.replicas}")
        if self.ack_timeout_s <= 0:
            raise ValueError("ack_timeout_s must be positive")

    def stream_config(self, prefix: str, cluster: str) -> StreamConfig:
        subjects = Subjects(prefix)
        return StreamConfig(
            name=stream_name(prefix, cluster),
            description=f"sealed envelopes of cluster {cluster} (ciphertext only)",
            subjects=[subjects.data(cluster, "*"), subjects.group(cluster, "*")],
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=self.max_age_s,
            max_bytes=self.max_bytes,
            num_replicas=self.replicas,
            allow_direct=True,  # a replay's batched read (docs/protocol.md)
        )


def stream_name(prefix: str, cluster: str) -> str:
    """The store's stream for a cluster (a stream name has no ``.``)."""
    Subjects(prefix)  # checks the prefix
    return f"{prefix.replace('.', '_')}_store_{check_cluster_id(cluster)}"


async def ensure_stream(js: Any, store: Store, *, prefix: str, cluster: str) -> str:
    """Create the cluster's stream, or bring its limits to ``store``'s; its name.
    BrokerError when the server has no JetStream (a store is never assumed)."""
    config = store.stream_config(prefix, cluster)
    try:
        try:
            await js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(config)
        else:
            await js.update_stream(config)
    except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
        raise BrokerError(
            "the NATS server has no JetStream: the store cannot be kept there", retriable=False
        ) from exc
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        raise BrokerError(f"cannot create the store {config.name}: {exc!r}") from exc
    return str(config.name)


async def last_group_envelopes(
    js: Any, name: str, *, prefix: str, cluster: str, streams: Iterable[str]
) -> dict[str, bytes]:
    """The last group envelope the store ``name`` keeps of each stream (a stream without one
    is left out), as stored: where a restarted producer's groups go on from (its
    ``GroupSealer`` checks that it is the cluster's own). BrokerError when the store cannot
    be read."""
    subjects = Subjects(prefix)
    last: dict[str, bytes] = {}
    for stream in streams:
        try:
            msg = await js.get_last_msg(name, subjects.group(cluster, stream))
        except nats.js.errors.NotFoundError:
            continue  # nothing kept of that group (yet, or any more)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise BrokerError(f"cannot read the store {name}: {exc!r}") from exc
        last[stream] = bytes(msg.data or b"")
    return last
