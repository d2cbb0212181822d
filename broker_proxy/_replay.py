"""Replay: a session's stored envelopes, read from its cluster's store (docs/protocol.md,
"Lossless delivery") and published on its inbox again, byte for byte, in ``seq`` order."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import structlog

from broker_proxy._core import ProxyCore
from broker_proxy._registry import SessionEntry
from sealstream import SessionError, WireError
from sealstream.store import stream_name
from sealstream.wire import decode_envelope

__all__ = ["has_store", "replay"]

log = structlog.get_logger(__name__)

#: published envelopes between two flushes (nats-py's own buffer stays small)
_FLUSH_EVERY = 256
#: JetStream's error code for "stream not found" (another is "no message found")
_NO_STREAM = 10059
_NO_STORE = "no store: this deployment is at most once"


async def replay(core: ProxyCore, entry: SessionEntry, after: int) -> int:
    """Publish on the session's inbox every stored envelope of its data subject whose ``seq``
    is greater than ``after``, once per ``seq``; how many. SessionError ``bad_request``
    without a store, ``cluster_unavailable`` (passing) when the store is out of reach."""
    js = core.nc.jetstream(timeout=core.config.control_timeout_s)
    name = stream_name(core.config.prefix, entry.cluster)
    subject = core.subjects.data(entry.cluster, entry.session)
    inbox = core.subjects.inbox(entry.session)
    max_size = core.config.limits.envelope_bytes
    try:
        try:
            last = (await js.get_last_msg(name, subject)).seq
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == _NO_STREAM:
                raise SessionError("bad_request", _NO_STORE) from None
            return 0  # nothing stored for the session (yet, or any more)
        sub = await js.subscribe(subject, stream=name, ordered_consumer=True)
        published = 0
        seq = after
        try:
            while True:
                msg = await sub.next_msg(timeout=core.config.control_timeout_s)
                try:
                    env = decode_envelope(msg.data, max_size=max_size)
                except WireError as exc:  # the store holds what the subject took: count it
                    log.info("replay.skipped", session=entry.session, reason=exc.reason)
                else:
                    if env.session == entry.session and env.seq > seq:
                        await core.nc.publish(inbox, msg.data)
                        seq = env.seq
                        published += 1
                        if published % _FLUSH_EVERY == 0:
                            await core.nc.flush(timeout=core.config.control_timeout_s)
                if msg.metadata.sequence.stream >= last:
                    break
        finally:
            await sub.unsubscribe()
    except nats.js.errors.ServiceUnavailableError:  # no JetStream at all
        raise SessionError("bad_request", _NO_STORE) from None
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise SessionError(
            "cluster_unavailable", f"the store is out of reach: {exc!r}", retry=True
        ) from None
    log.info("session.replayed", session=entry.session, after=after, envelopes=published)
    return published


async def has_store(core: ProxyCore, cluster: str) -> bool:
    """Whether the cluster keeps a store (its stream exists); False when it cannot be told."""
    js = core.nc.jetstream(timeout=core.config.control_timeout_s)
    try:
        await js.stream_info(stream_name(core.config.prefix, cluster))
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
        return False
    return True
