"""The blind relay: session control in, ciphertext through, by subject and header only.

It never imports the decrypting code (an import-linter contract and a subprocess test hold
that), never parses an envelope ``body``, and forwards relayed payloads byte for byte. Its
jobs, one module each: the relay (``_relay``), the session API (``_control``) and liveness
(``_liveness``), over the state they share (``_core``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog

from broker_proxy._callout import AuthResponder
from broker_proxy._config import ProxyConfig
from broker_proxy._control import SessionApi
from broker_proxy._core import ProxyCore
from broker_proxy._liveness import Liveness
from broker_proxy._registry import SessionRegistry
from broker_proxy._relay import Relay
from broker_proxy._shared import SharedRegistry, bucket_name
from sealstream import TokenVerifier
from sealstream.metrics import Histogram, MetricsServer, Sample, collector_registry
from sealstream.nats import connect, redact_url, release, settle
from sealstream.resource import AsyncResource

__all__ = ["Proxy"]

log = structlog.get_logger(__name__)


class Proxy(AsyncResource):
    """``async with Proxy(config):`` serves until the block exits.

    Counters: ``relayed`` envelopes and ``relayed_bytes``; ``rejected`` envelopes by reason;
    ``refused`` control requests by error code.
    """

    def __init__(
        self,
        config: ProxyConfig,
        *,
        verifier: TokenVerifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._verifier = verifier or config.verifier()
        super().__init__()
        self._core = ProxyCore(config, clock=clock)
        self._relay = Relay(self._core)
        self._api = SessionApi(self._core, self._verifier)
        self._liveness = Liveness(self._core)
        self.metrics: MetricsServer | None = None
        self.callout: AuthResponder | None = None
        if config.callout is not None:
            self.callout = AuthResponder(config.callout, self._verifier, prefix=config.prefix)

    # --- what the jobs count ------------------------------------------------------------------

    @property
    def registry(self) -> SessionRegistry:
        return self._core.registry

    @property
    def relayed(self) -> int:
        return self._relay.relayed

    @property
    def relayed_bytes(self) -> int:
        return self._relay.relayed_bytes

    @property
    def group_envelopes(self) -> int:
        """Group mode: group envelopes received."""
        return self._relay.group_envelopes

    @property
    def group_deliveries(self) -> int:
        """Group mode: inbox deliveries made of group envelopes."""
        return self._relay.group_deliveries

    @property
    def rejected(self) -> Counter[str]:
        return self._relay.rejected

    @property
    def relay_latency(self) -> Histogram:
        return self._relay.latency

    @property
    def refused(self) -> Counter[str]:
        return self._api.refused

    @property
    def replayed(self) -> int:
        """Envelopes published again from the store (resume requests)."""
        return self._api.replayed

    @property
    def pending_peak(self) -> int:
        """The most session requests served at once (bounded by ``limits.pending_requests``)."""
        return self._api.pending_peak

    @property
    def _nc(self) -> Any:
        return self._core.nc

    @property
    def _tg(self) -> asyncio.TaskGroup | None:
        return self._core.tg

    # --- lifecycle ----------------------------------------------------------------------------

    async def _start(self) -> None:
        core = self._core
        auth = self.config.nats_auth
        core.nc = await connect(
            self.config.nats_url,
            name="sealstream-proxy",
            user=auth.user,
            password=auth.password,
            disconnected_cb=self._liveness.on_disconnected,
            reconnected_cb=self._liveness.on_reconnected,
        )
        self._stack.push_async_callback(release, core.nc)
        tg = core.tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._stack.callback(self._liveness.stop)  # runs first: lets the expiry loop end
        if self.config.shared_registry:
            # load every live session before serving: a restarted instance loses none
            core.shared = SharedRegistry(
                core.registry,
                bucket=bucket_name(self.config.prefix),
                replicas=self.config.registry_replicas,
                clock=core.clock,
            )
            await core.shared.open(core.nc)
            watch = tg.create_task(core.shared.watch())
            self._stack.callback(watch.cancel)
            async with asyncio.timeout(10):
                await core.shared.ready.wait()
        group = self.config.queue_group
        subjects = core.subjects
        await core.nc.subscribe(subjects.api_all, queue=group, cb=self._api.on_request)
        # data and group subjects on one subscription: a member's key envelope and the group
        # batch sealed after it are relayed in the order they came
        await core.nc.subscribe(subjects.relay_all, queue=group, cb=self._relay.on_message)
        if self.callout is not None:
            await self.callout.subscribe(core.nc)
        tg.create_task(self._liveness.run())
        await settle(core.nc)
        if self.config.metrics_port is not None:
            registry = collector_registry(
                self.samples,
                {
                    "sealstream_proxy_relay_seconds": (
                        "time to relay one envelope",
                        self.relay_latency,
                    )
                },
            )
            self.metrics = MetricsServer(
                registry,
                lambda: bool(core.nc is not None and core.nc.is_connected),
                host=self.config.metrics_host,
                port=self.config.metrics_port,
            )
            await self._stack.enter_async_context(self.metrics)
        log.info("proxy.started", url=redact_url(self.config.nats_url), prefix=self.config.prefix)

    async def aclose(self) -> None:
        """Stop serving; idempotent."""
        stack, self._stack = self._stack, contextlib.AsyncExitStack()
        await stack.aclose()
        if self._core.tg is not None:
            self._core.tg = None
            log.info(
                "proxy.stopped",
                relayed=self.relayed,
                rejected=sum(self.rejected.values()),
                rejected_by_reason=dict(self.rejected),
            )

    def samples(self) -> list[Sample]:
        """The proxy's metrics, read at scrape time."""
        return [
            Sample("sealstream_proxy_sessions", "open sessions", "gauge", len(self.registry)),
            Sample(
                "sealstream_proxy_envelopes_relayed", "envelopes relayed", "counter", self.relayed
            ),
            Sample(
                "sealstream_proxy_relayed_bytes", "bytes relayed", "counter", self.relayed_bytes
            ),
            Sample(
                "sealstream_proxy_envelopes_replayed",
                "envelopes published again from the store (resume requests)",
                "counter",
                self.replayed,
            ),
            Sample(
                "sealstream_proxy_group_envelopes",
                "group envelopes received (group mode)",
                "counter",
                self.group_envelopes,
            ),
            Sample(
                "sealstream_proxy_group_deliveries",
                "inbox deliveries of group envelopes",
                "counter",
                self.group_deliveries,
            ),
            Sample(
                "sealstream_proxy_envelopes_rejected",
                "envelopes dropped, by reason",
                "counter",
                self.rejected,
            ),
            Sample(
                "sealstream_proxy_requests_refused",
                "session requests refused, by code",
                "counter",
                self.refused,
                label="code",
            ),
            *(self.callout.samples() if self.callout is not None else []),
        ]
