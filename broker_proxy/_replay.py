"""Replay: a session's stored envelopes, read from its cluster's store (docs/protocol.md,
"Lossless delivery") and published on its inbox again, byte for byte, in ``seq`` order."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import structlog

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
#: stored messages asked for in one read, and their bytes at most (the store answers a batch)
_BATCH = 256
_BATCH_BYTES = 4 * 1024 * 1024
_NO_STORE = "no store: this deployment is at most once"
#: JetStream's error code for "stream not found" (another is "no message found")
_NO_STREAM = 10059
#: a replica behind the leader is asked again this many times, this long apart
_STALE_TRIES = 20
_STALE_PAUSE_S = 0.05


@dataclass(frozen=True, slots=True)
class _Stored:
    position: int  # its stream sequence
    data: bytes
    pending: int | None  # messages of the subject after it (None: not said)


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
    seq = after
    try:
        last = await _last(core, entry.cluster, subject)  # when asked, from the leader
        at = cursor if cursor is not None and cursor <= last else 1
        stale = 0
        while last and (position is None or position < last):
            batch = await _read(core, entry.cluster, subject, at)
            if not batch:
                # a replica that lags behind the leader answered: ask again (another may)
                stale += 1
                if stale > _STALE_TRIES:
                    log.warning("replay.store_behind", session=entry.session, at=at, last=last)
                    break
                await asyncio.sleep(_STALE_PAUSE_S)
                continue
            for stored in batch:
                position = stored.position
                try:
                    env = decode(stored.data, max_size=max_size)
                except WireError as exc:  # the store holds what the subject took: count it
                    log.info("replay.skipped", session=entry.session, reason=exc.reason)
                else:
                    # a group envelope names no session (the same bytes go to every member)
                    ours = group is not None or env.session == entry.session
                    if ours and env.seq > seq:
                        await core.nc.publish(inbox, stored.data)
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
            if more:
                break
            at = batch[-1].position + 1
    except (nats.errors.Error, TimeoutError) as exc:
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


async def _last(core: ProxyCore, cluster: str, subject: str) -> int:
    """The stream sequence of the last message of ``subject`` in the cluster's store (0:
    none), from the stream's leader. SessionError ``bad_request`` when there is no store (no
    such stream; no JetStream at all on the proxy's own server: a site's that does not
    answer is out of reach, passing)."""
    js = _store_js(core, cluster)
    try:
        return int((await js.get_last_msg(stream_name(core.config.prefix, cluster), subject)).seq)
    except nats.js.errors.NotFoundError as exc:
        if exc.err_code == _NO_STREAM:
            raise SessionError("bad_request", _NO_STORE) from None
        return 0  # nothing stored of the subject (yet, or any more)
    except nats.js.errors.ServiceUnavailableError:
        if _domain(core, cluster) is None:
            raise SessionError("bad_request", _NO_STORE) from None
        raise SessionError(
            "cluster_unavailable", "the site's store is out of reach", retry=True
        ) from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # a malformed answer
        raise _malformed(exc) from None


async def _read(core: ProxyCore, cluster: str, subject: str, at: int) -> list[_Stored]:
    """One batched read of the cluster's store (JetStream's direct get): the messages of
    ``subject`` from stream sequence ``at`` on, at most ``_BATCH`` of them and about
    ``_BATCH_BYTES``, in stream order; [] when there are none (any replica answers: one
    behind the leader may answer [] or stop short). A request and its replies, which cross
    accounts and leaf links (docs/protocol.md, "A store at each site"). A site's store is not
    trusted to answer well: a malformed or out-of-order answer is ``cluster_unavailable``,
    never an exception of another kind."""
    domain = _domain(core, cluster)
    api = "$JS.API" if domain is None else f"$JS.{domain}.API"
    name = stream_name(core.config.prefix, cluster)
    ask = {"seq": at, "next_by_subj": subject, "batch": _BATCH, "max_bytes": _BATCH_BYTES}
    nc = core.nc
    sub = await nc.subscribe(nc.new_inbox())
    try:
        await nc.publish(f"{api}.DIRECT.GET.{name}", json.dumps(ask).encode(), reply=sub.subject)
        out: list[_Stored] = []
        while True:
            msg = await sub.next_msg(timeout=core.config.control_timeout_s)
            headers = msg.headers or {}
            status = headers.get("Status")
            if status is None:
                try:
                    stored = _Stored(
                        int(headers["Nats-Sequence"]),
                        msg.data,
                        int(headers["Nats-Num-Pending"]) if "Nats-Num-Pending" in headers else None,
                    )
                except (KeyError, ValueError) as exc:
                    raise _malformed(exc) from None
                if stored.position < (out[-1].position + 1 if out else at):
                    raise _malformed(ValueError(f"stream sequence {stored.position} out of order"))
                out.append(stored)
                if len(out) >= _BATCH or stored.pending == 0:
                    return out  # all that was asked for (its end marker is not waited for)
            elif status in ("204", "404"):  # the batch's end; nothing (more) from ``at`` on
                return out
            else:  # no responders (a site's link down, a store starting), or an error
                detail = f"{status} {headers.get('Description', '')}".strip()
                raise SessionError(
                    "cluster_unavailable", f"the store did not answer: {detail}", retry=True
                )
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


def _malformed(exc: Exception) -> SessionError:
    log.warning("replay.malformed_answer", error=repr(exc))
    return SessionError("cluster_unavailable", "the store answered malformed", retry=True)


def _domain(core: ProxyCore, cluster: str) -> str | None:
    """The JetStream domain of the cluster's store: None (the proxy's own JetStream), or
    ``store_domain`` with ``{cluster}`` (the site's leaf node)."""
    template = core.config.store_domain
    return template.replace("{cluster}", cluster) if template else None


def _store_js(core: ProxyCore, cluster: str) -> Any:
    return core.nc.jetstream(timeout=core.config.control_timeout_s, domain=_domain(core, cluster))


async def has_store(core: ProxyCore, cluster: str) -> bool:
    """Whether the cluster keeps a store (its stream exists); False when it cannot be told."""
    js = _store_js(core, cluster)
    try:
        await js.stream_info(stream_name(core.config.prefix, cluster))
    # a malformed answer (a site's store is not trusted) tells nothing either
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError, ValueError, TypeError, KeyError):
        return False
    return True
