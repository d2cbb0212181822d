"""Real figures of this machine, read with psutil in a worker thread."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import psutil  # type: ignore[import-untyped,unused-ignore]

from producers.sources._rows import Row, Sleep, check_positive

__all__ = ["HostMetrics"]


@dataclass(frozen=True, slots=True)
class _NetMark:
    mono_ns: int
    sent: int
    recv: int


def _net_mark() -> _NetMark:
    net = psutil.net_io_counters()
    if net is None:  # no interface at all
        return _NetMark(time.monotonic_ns(), 0, 0)
    return _NetMark(time.monotonic_ns(), int(net.bytes_sent), int(net.bytes_recv))


def _host_prime() -> _NetMark:
    psutil.cpu_percent(interval=None)  # the first call only sets the baseline
    return _net_mark()


def _rate(now: int, before: int, seconds: float) -> float:
    return max(0, now - before) / seconds if seconds > 0 else 0.0


def _host_sample(prev: _NetMark) -> tuple[Row, _NetMark]:
    """One row of host figures (blocking: run it in a thread)."""
    t_ns = time.time_ns()
    cpu = float(psutil.cpu_percent(interval=None))
    mem = psutil.virtual_memory()
    swap = psutil.swap_memory()
    mark = _net_mark()
    disk = psutil.disk_io_counters()
    seconds = (mark.mono_ns - prev.mono_ns) / 1e9
    row: Row = {
        "time_": t_ns,
        "cpu_percent": cpu,
        "load1": float(psutil.getloadavg()[0]),
        "mem_total": int(mem.total),
        "mem_available": int(mem.available),
        "mem_percent": float(mem.percent),
        "swap_percent": float(swap.percent),
        "net_bytes_sent": mark.sent,
        "net_bytes_recv": mark.recv,
        "net_send_rate": _rate(mark.sent, prev.sent, seconds),
        "net_recv_rate": _rate(mark.recv, prev.recv, seconds),
        "disk_read_bytes": int(disk.read_bytes) if disk is not None else 0,
        "disk_write_bytes": int(disk.write_bytes) if disk is not None else 0,
        "procs": len(psutil.pids()),
        "boot_time": float(psutil.boot_time()),
    }
    return row, mark


class HostMetrics:
    """Real figures of this machine, one row every ``interval`` seconds.

    Counters (``net_bytes_*``, ``disk_*_bytes``) are totals since boot; ``net_*_rate`` are
    bytes per second since the previous row; ``boot_time`` is in unix seconds, ``time_`` in
    unix nanoseconds. psutil is called in a worker thread.
    """

    def __init__(self, *, interval: float = 1.0, sleep: Sleep = asyncio.sleep) -> None:
        self.stream: str = "host_metrics"
        self.interval = check_positive("interval", interval)
        self._sleep = sleep

    async def rows(self) -> AsyncGenerator[list[Row], None]:
        prev = await asyncio.to_thread(_host_prime)
        while True:
            await self._sleep(self.interval)
            row, prev = await asyncio.to_thread(_host_sample, prev)
            yield [row]
