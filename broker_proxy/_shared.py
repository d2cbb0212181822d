"""The session registry shared by proxy instances, in a NATS JetStream key-value bucket.

Every instance keeps a local :class:`SessionRegistry` (the data path reads only that) fed by a
watch on the bucket, so any instance relays, keeps alive or closes any session, and an
instance that restarts loads every live session. Writes go to the bucket first. Expiry is
claimed with an optimistic delete (expected last revision), so exactly one instance tells the
consumer and the cluster. The bucket's own max age is a backstop for when no instance runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import msgpack
import nats.errors
import nats.js.errors
import structlog

from broker_proxy._registry import SessionEntry, SessionRegistry
from sealstream import BrokerError
from sealstream.ids import check_session_id

__all__ = ["SharedRegistry", "bucket_name"]

log = structlog.get_logger(__name__)

_MISS_TTL = 2.0
_LOOKUPS_PER_S = 200.0


_IO_ERRORS = (nats.errors.Error, TimeoutError)


def _unavailable(exc: BaseException) -> BrokerError:
    return BrokerError(f"session registry unavailable: {exc!r}")


def bucket_name(prefix: str) -> str:
    return prefix.replace(".", "_") + "_sessions"


def _encode(entry: SessionEntry, expires_unix: float, *, ended: bool = False) -> bytes:
    """A session's value; an ended one (kept for its owner's last resume until
    ``expires_unix``) says ``"ended": true``."""
    value: dict[str, Any] = {
        "cluster": entry.cluster,
        "user": entry.user,
        "streams": list(entry.streams),
        "expires": expires_unix,
        "key_mode": entry.key_mode,
        "grace": entry.grace_s,
    }
    if ended:
        value["ended"] = True
    return msgpack.packb(value)


class SharedRegistry:
    """Write-through to the bucket; reads from the local cache ``local``."""

    def __init__(
        self,
        local: SessionRegistry,
        *,
        bucket: str,
        replicas: int = 1,
        clock: Any = time.monotonic,
    ):
        self.local = local
        self.bucket = bucket
        self.replicas = replicas
        self._clock = clock
        self._kv: Any = None
        self._revisions: dict[str, int] = {}
        self._misses: dict[str, float] = {}
        self._budget = _LOOKUPS_PER_S
        self._budget_at = clock()
        self.ready = asyncio.Event()

    async def open(self, nc: Any) -> None:
        js = nc.jetstream(timeout=5.0)
        try:
            try:
                self._kv = await js.key_value(self.bucket)
            except nats.js.errors.BucketNotFoundError:
                self._kv = await self._create(js)
            else:
                await self._raise_ttl(js)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BrokerError(
                f"the session registry needs JetStream ({exc!r}): run nats-server with -js, "
                "or set SEALSTREAM_SHARED_REGISTRY=0 for a single in-memory proxy"
            ) from exc

    async def _create(self, js: Any) -> Any:
        """The bucket; a replicated one is retried for 10 s while a JetStream cluster that
        answers already cannot yet place it (a bad request until its peers are current)."""
        deadline = asyncio.get_running_loop().time() + (10.0 if self.replicas > 1 else 0.0)
        while True:
            try:
                return await js.create_key_value(
                    bucket=self.bucket,
                    history=1,
                    ttl=self._max_age(),
                    replicas=self.replicas,
                )
            except nats.js.errors.BadRequestError:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
                await asyncio.sleep(0.25)

    async def _raise_ttl(self, js: Any) -> None:
        """A bucket made with a shorter max age (an earlier release, a smaller store grace)
        would let a live session's entry age out: raise it (never lower it: another instance
        may keep sessions longer)."""
        info = await js.stream_info(f"KV_{self.bucket}")
        wanted = self._max_age()
        if info.config.max_age and info.config.max_age < wanted:  # 0: no max age at all
            await js.update_stream(dataclasses.replace(info.config, max_age=wanted))
            log.info("registry.ttl_raised", was_s=info.config.max_age, now_s=wanted)

    def _max_age(self) -> float:
        """The bucket's max age: past any live session's expiry and any ended one's keep."""
        return max(2 * self.local.max_ttl_s, self.local.ended_keep_s, 1.0)

    async def watch(self) -> None:
        """Apply the bucket's changes to the local cache until cancelled."""
        watcher = await self._kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:  # the initial values are loaded
                    self.ready.set()
                    log.info("registry.loaded", sessions=len(self.local))
                    continue
                self._apply(entry)
        finally:
            await asyncio.shield(watcher.stop())

    def _apply(self, entry: Any) -> None:
        session = entry.key
        if entry.operation in ("DEL", "PURGE"):
            self.local.remove(session)
            self.local.drop_ended(session)
            self._revisions.pop(session, None)
            return
        try:
            check_session_id(session)
            data = msgpack.unpackb(entry.value, raw=False)
            expires = float(data["expires"])
            fields = (str(data["cluster"]), str(data["user"]), tuple(map(str, data["streams"])))
            key_mode = str(data.get("key_mode", "session"))
            grace = float(data.get("grace", 0.0))
            ended = data.get("ended") is True
        except (ValueError, TypeError, KeyError, msgpack.UnpackException):
            log.warning("registry.bad_entry", session=session[:64])
            return
        now = self._clock()
        local_expiry = now + (expires - time.time())
        if ended:  # ended by an instance: kept for its owner's last resume only
            self._revisions.pop(session, None)
            gone = self.local.remove(session)
            if gone is None:
                cluster, user, streams = fields
                gone = SessionEntry(
                    session, cluster, user, streams, now, key_mode=key_mode, grace_s=grace
                )
            self.local.keep_ended(gone, until=local_expiry)
            return
        self._revisions[session] = int(entry.revision)
        current = self.local.get(session)
        if current is None:
            cluster, user, streams = fields
            added = self.local.add(
                session,
                cluster=cluster,
                user=user,
                streams=streams,
                now=now,
                key_mode=key_mode,
                grace_s=grace,
            )
            added.expires_at = local_expiry
        else:
            current.expires_at = max(current.expires_at, local_expiry)

    def _expiry_unix(self, entry: SessionEntry) -> float:
        return time.time() + self.local.ttl_of(entry)

    async def create(self, entry: SessionEntry) -> bool:
        """Store a new session; False if another instance already holds it."""
        try:
            rev = await self._kv.create(entry.session, _encode(entry, self._expiry_unix(entry)))
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except _IO_ERRORS as exc:
            raise _unavailable(exc) from exc
        self._revisions[entry.session] = rev
        return True

    async def touch(self, entry: SessionEntry) -> None:
        try:
            self._revisions[entry.session] = await self._kv.put(
                entry.session, _encode(entry, self._expiry_unix(entry))
            )
        except _IO_ERRORS as exc:
            raise _unavailable(exc) from exc

    async def delete(self, session: str) -> None:
        self._revisions.pop(session, None)
        try:
            await self._kv.delete(session)
        except _IO_ERRORS as exc:
            raise _unavailable(exc) from exc

    async def claim(self, session: str, ended: SessionEntry | None = None) -> bool:
        """End a session only if nobody changed it since we saw it: True for the one
        instance that wins (and so tells the consumer and the cluster). ``ended`` (the proxy
        ended it) is then kept in the bucket, marked ended, for its owner's last resume on any
        instance; a session closed by its consumer is deleted."""
        rev = self._revisions.pop(session, None)
        try:
            if ended is not None and self.local.ended_keep_s > 0:
                value = _encode(ended, time.time() + self.local.ended_keep_s, ended=True)
                if rev is None:  # never seen here with a revision: as the delete, unguarded
                    await self._kv.put(session, value)
                else:
                    await self._kv.update(session, value, last=rev)
            else:
                await self._kv.delete(session, last=rev)
        except nats.js.errors.APIError:
            return False
        except _IO_ERRORS as exc:
            raise _unavailable(exc) from exc
        return True

    async def lookup(self, session: str) -> SessionEntry | None:
        """A session the watch has not delivered yet (it was created an instant ago on
        another instance); misses are remembered for a moment so garbage cannot hammer
        the bucket."""
        now = self._clock()
        if self._misses.get(session, 0.0) > now:
            return None
        self._budget = min(_LOOKUPS_PER_S, self._budget + (now - self._budget_at) * _LOOKUPS_PER_S)
        self._budget_at = now
        if self._budget < 1.0:
            return None
        self._budget -= 1.0
        try:
            entry = await self._kv.get(session)
        except nats.js.errors.NotFoundError:  # never created, or deleted
            if len(self._misses) > 10_000:
                self._misses.clear()
            self._misses[session] = now + _MISS_TTL
            return None
        except _IO_ERRORS as exc:
            log.warning("registry.lookup_failed", error=repr(exc))
            return None
        self._apply(entry)
        return self.local.get(session)
