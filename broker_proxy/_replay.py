"""Replay: a session's stored envelopes, read from its cluster's store (docs/protocol.md,
"Lossless delivery") and published on its inbox again, byte for byte, in ``seq`` order."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import structlog
from nats.js.api import ConsumerConfig, DeliverPolicy

from broker_proxy._core import ProxyCore
from broker_proxy._registry import SessionEntry
from sealstream import SessionError, WireError
from sealstream.control import Replayed
from sealstream.groupwire import decode_group_envelope
from sealstream.store import stream_name
from sealstream.wire import decode_envelope

__all__ = ["has_store", "replay"]

log = structlog.get_logger(__name__)

#: published envelopes between two flushes (nats-py's own buffer stays small)
_FLUSH_EVERY = 256
#: JetStream's error code for "stream not found" (another is "no message found")
_NO_STREAM = 10059
_NO_STORE = "no store: this deployment is at most once"


async def replay(
    core: ProxyCore,
    entry: SessionEntry,
    after: int,
    *,
    limit: int | None = None,
    cursor: int | None = None,
    group: str | None = None,
) -> Replayed:
    """Publish on the session's inbox every stored envelope of its data subject whose ``seq``
    is greater than ``after`` (of ``group``'s subject, whose ``gseq``: a group member), once
    per ``seq``, in stream order: all of them, or a page of at most ``limit`` read from the
    stream position ``cursor`` on (the previous page's answer; a hint that only skips
    envelopes not asked for). SessionError ``bad_request`` without a store, or for a group
    the session is not a member of; ``cluster_unavailable`` (passing) when the store is out
    of reach."""
    js = core.nc.jetstream(timeout=core.config.control_timeout_s)
    name = stream_name(core.config.prefix, entry.cluster)
    if group is None:
        subject = core.subjects.data(entry.cluster, entry.session)
    elif entry.key_mode == "group" and group in entry.streams:
        subject = core.subjects.group(entry.cluster, group)
    else:
        raise SessionError("bad_request", f"the session is not a member of group {group!r}")
    decode = decode_envelope if group is None else decode_group_envelope
    inbox = core.subjects.inbox(entry.session)
    max_size = core.config.limits.envelope_bytes
    published, first, more, position = 0, None, False, None
    try:
        try:
            last = (await js.get_last_msg(name, subject)).seq
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == _NO_STREAM:
                raise SessionError("bad_request", _NO_STORE) from None
            return Replayed(0)  # nothing stored for the session (yet, or any more)
        config = (
            None
            if cursor is None or cursor > last
            else ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=cursor
            )
        )
        sub = await js.subscribe(subject, stream=name, ordered_consumer=True, config=config)
        seq = after
        try:
            while True:
                msg = await sub.next_msg(timeout=core.config.control_timeout_s)
                position = msg.metadata.sequence.stream
                try:
                    env = decode(msg.data, max_size=max_size)
                except WireError as exc:  # the store holds what the subject took: count it
                    log.info("replay.skipped", session=entry.session, reason=exc.reason)
                else:
                    # a group envelope names no session (the same bytes go to every member)
                    ours = group is not None or env.session == entry.session
                    if ours and env.seq > seq:
                        await core.nc.publish(inbox, msg.data)
                        seq = env.seq
                        first = env.seq if first is None else first
                        published += 1
                        if published % _FLUSH_EVERY == 0:
                            await core.nc.flush(timeout=core.config.control_timeout_s)
                if position >= last:
                    break
                if limit is not None and published >= limit:
                    more = True
                    break
        finally:
            await sub.unsubscribe()
    except nats.js.errors.ServiceUnavailableError:  # no JetStream at all
        raise SessionError("bad_request", _NO_STORE) from None
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise SessionError(
            "cluster_unavailable", f"the store is out of reach: {exc!r}", retry=True
        ) from None
    log.info(
        "session.replayed", session=entry.session, group=group, after=after, envelopes=published
    )
    if limit is None:
        return Replayed(published, first=first)
    next_at = None if position is None else position + 1
    return Replayed(published, more=more, cursor=next_at, first=first)


async def has_store(core: ProxyCore, cluster: str) -> bool:
    """Whether the cluster keeps a store (its stream exists); False when it cannot be told."""
    js = core.nc.jetstream(timeout=core.config.control_timeout_s)
    try:
        await js.stream_info(stream_name(core.config.prefix, cluster))
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
        return False
    return True
