"""Prometheus metrics and a health endpoint for the proxy and the producer.

Services keep plain integer counters on the hot path (no locks, no label lookups per
message); a collector reads them at scrape time. A small asyncio HTTP server serves
``/metrics`` (Prometheus text format, via prometheus-client) and ``/healthz``.
"""

from __future__ import annotations

import asyncio
import bisect
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["Histogram", "MetricsServer", "Sample", "collector_registry"]

log = structlog.get_logger(__name__)

_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1, 1.0)


class Histogram:
    """A fixed-bucket latency histogram: ``observe`` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Iterable[float] = _BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


@dataclass(frozen=True, slots=True)
class Sample:
    """One metric read at scrape time: a counter or gauge, optionally split by one label."""

    name: str
    help: str
    kind: str  # "counter" | "gauge"
    value: float | Mapping[str, int]
    label: str = "reason"


def _family(sample: Sample) -> Metric:
    labelled = isinstance(sample.value, Mapping)
    labels = [sample.label] if labelled else None
    family: Metric
    if sample.kind == "counter":
        family = CounterMetricFamily(sample.name, sample.help, labels=labels)
    else:
        family = GaugeMetricFamily(sample.name, sample.help, labels=labels)
    if isinstance(sample.value, Mapping):
        for key, count in sorted(sample.value.items()):
            family.add_metric([key], float(count))
    else:
        family.add_metric([], float(sample.value))
    return family


class _Collector(Collector):
    def __init__(
        self, samples: Callable[[], list[Sample]], histograms: Mapping[str, tuple[str, Histogram]]
    ) -> None:
        self._samples = samples
        self._histograms = histograms

    def collect(self) -> Iterable[Metric]:
        for sample in self._samples():
            yield _family(sample)
        for name, (text, hist) in self._histograms.items():
            yield HistogramMetricFamily(name, text, buckets=hist.cumulative(), sum_value=hist.total)


def collector_registry(
    samples: Callable[[], list[Sample]],
    histograms: Mapping[str, tuple[str, Histogram]] | None = None,
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(samples, histograms or {}))
    return registry


class MetricsServer:
    """``async with MetricsServer(registry, healthy, host=..., port=...)``: serves
    ``GET /metrics`` and ``GET /healthz`` (200 when ``healthy()``, else 503)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        healthy: Callable[[], bool],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._registry = registry
        self._healthy = healthy
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("metrics server not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info("metrics.listening", host=self._host, port=self.port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request.split()
            path = parts[1].decode("ascii", "replace") if len(parts) >= 2 else ""
            if parts[:1] != [b"GET"]:
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                status, body = "200 OK", generate_latest(self._registry)
                ctype = "text/plain; version=0.0.4; charset=utf-8"
            elif path == "/healthz":
                ok = self._healthy()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype = "application/json"
                body = json.dumps({"status": "ok" if ok else "unavailable"}).encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
