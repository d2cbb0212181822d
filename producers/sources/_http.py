"""Synthetic HTTP events shaped like Pixie's ``http_events`` table, paced on a clock."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncGenerator, Callable
from typing import Final

import structlog

from producers.sources._rows import Row, Sleep, check_positive

__all__ = ["HttpEvents"]

log = structlog.get_logger(__name__)

_TICK: Final = 0.1
#: A clock step larger than this (or backwards) restarts the pacing instead of catching up.
_MAX_STEP_NS: Final = 5 * 10**9

# (method, path template, weight): templates take ``n`` and ``m`` ids.
_ENDPOINTS: Final[tuple[tuple[str, str, int], ...]] = (
    ("GET", "/api/v1/products/{n}", 22),
    ("GET", "/api/v1/products?page={m}", 10),
    ("GET", "/api/v1/users/{n}", 12),
    ("GET", "/api/v1/orders/{n}", 8),
    ("GET", "/api/v1/carts/{n}", 8),
    ("GET", "/healthz", 6),
    ("GET", "/metrics", 4),
    ("POST", "/api/v1/orders", 9),
    ("POST", "/api/v1/carts/{n}/items", 7),
    ("POST", "/api/v1/auth/login", 4),
    ("PUT", "/api/v1/users/{n}/profile", 4),
    ("PUT", "/api/v1/carts/{n}/items/{m}", 2),
    ("DELETE", "/api/v1/carts/{n}/items/{m}", 3),
    ("DELETE", "/api/v1/sessions/{n}", 1),
)
_ENDPOINT_CUM: Final = tuple(
    sum(weight for _, _, weight in _ENDPOINTS[: i + 1]) for i in range(len(_ENDPOINTS))
)
_OK_STATUS: Final = {"GET": 200, "POST": 201, "PUT": 200, "DELETE": 204}


class HttpEvents:
    """Synthetic HTTP events shaped like Pixie's ``http_events`` table.

    Emits ``rate`` rows per second in total, in batches every ~0.1 s. The count is derived from
    the time elapsed on ``clock`` since the start, so the long-run rate is exact whatever the
    sleeps overshoot. Rows are deterministic for a given ``seed`` and ``clock``.
    """

    def __init__(
        self,
        *,
        rate: float = 50.0,
        seed: int | None = None,
        clock: Callable[[], int] = time.time_ns,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.stream: str = "http_events"
        self.rate = check_positive("rate", rate)
        self._rng = random.Random(seed)  # noqa: S311 - synthetic data, not secrets
        self._clock = clock
        self._sleep = sleep
        rng = self._rng
        self._upids = [
            f"{rng.randint(1, 3)}:{rng.randint(100, 65535)}:{rng.randint(10**5, 10**8)}"
            for _ in range(6)
        ]
        self._clients = [
            f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
            for _ in range(48)
        ]

    async def rows(self) -> AsyncGenerator[list[Row], None]:
        start = prev = self._clock()
        emitted = 0
        while True:
            await self._sleep(_TICK)
            now = self._clock()
            if now < prev or now - prev > _MAX_STEP_NS:
                log.warning("http_events.clock_step", stream=self.stream, step_ns=now - prev)
                start = prev = now
                emitted = 0
                continue
            due = math.floor(self.rate * (now - start) / 1e9 + 1e-6)
            count = due - emitted
            if count > 0:
                emitted = due
                span = now - prev
                yield [self._event(prev + span * (i + 1) // count) for i in range(count)]
            prev = now

    def _event(self, t_ns: int) -> Row:
        rng = self._rng
        method, template, _ = rng.choices(_ENDPOINTS, cum_weights=_ENDPOINT_CUM)[0]
        path = template.format(n=rng.randint(1, 99_999), m=rng.randint(1, 400))
        draw = rng.random()
        if draw < 0.92:
            status = _OK_STATUS[method]
        elif draw < 0.93:
            status = 301 if method == "GET" else _OK_STATUS[method]
        elif draw < 0.975:
            status = 404
        elif draw < 0.995:
            status = 500
        else:
            status = 503
        latency = rng.lognormvariate(math.log(4e6), 0.9)
        if status == 500:
            latency *= 3.0
        elif status == 503:
            latency *= 0.1
        req_size = int(rng.lognormvariate(math.log(600), 0.7)) if method in ("POST", "PUT") else 0
        if status in (204, 301):
            resp_size = 0
        elif status >= 400:
            resp_size = rng.randint(40, 240)
        else:
            resp_size = int(rng.lognormvariate(math.log(2500), 1.0))
        return {
            "time_": t_ns,
            "upid": rng.choice(self._upids),
            "remote_addr": rng.choice(self._clients),
            "remote_port": rng.randint(32768, 60999),
            "req_method": method,
            "req_path": path,
            "resp_status": status,
            "latency_ns": max(1, int(latency)),
            "req_body_size": req_size,
            "resp_body_size": resp_size,
        }
