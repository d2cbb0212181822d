"""``sealstream bench-hub``: the hub-and-leaves topology at scale on this machine.

Real nats-servers (the 3-node hub, a leaf node per customer cluster) and real proxy processes
(1 to 3, measured with psutil); the producers (``producers.Agent`` with ``HttpEvents``, on
their site's leaf node) and the consumers (``consumers.Client``, each session on its own NATS
connection logged in through the auth callout on any hub node) run in this process, which
therefore bounds what is delivered: the report says how busy it was.

Phases, each timed: every session opens (logins and opens per second, with at most
``--concurrency`` in flight); a window in steady state (rows/s delivered, sessions that
received rows, proxy CPU and memory per session); the hub node most consumers are logged in
on is killed (the time until every session received a row again, and how many had to resume
on a new session).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from consumers import Client, ClientConfig, Resumed
from producers import POLICY_FILE_NAME, Agent, HttpEvents, ProducerConfig
from sealops._hub import HubBackend, HubServers, prepare_hub
from sealstream.crypto import ClusterIdentity, UserIdentity
from sealstream.errors import SealstreamError, SessionError
from sealstream.log import configure_logging
from sealstream.nats import NatsAuth
from sealstream.run import run
from sealstream.tokens import mint_token

__all__ = ["bench_hub_main"]

_STREAM = "http_events"


@dataclass
class _Session:
    rows: int = 0
    last_row: float = 0.0
    resumed: int = 0
    failed: str | None = None


@dataclass
class _Run:
    sessions: list[_Session] = field(default_factory=list)


async def _read(client: Client, cluster: str, s: _Session, opened: asyncio.Semaphore) -> None:
    async with client:
        sub = client.subscribe(cluster, [_STREAM], resume=True, retry_s=120, resume_timeout_s=600)
        try:
            async with opened:
                await sub.__aenter__()
        except SessionError as exc:  # a measurement too: counted, the others go on
            s.failed = exc.code
            return
        try:
            async for item in sub:
                if isinstance(item, Resumed):
                    s.resumed += 1
                else:
                    s.rows += len(item.rows)
                    s.last_row = time.monotonic()
        finally:
            await sub.aclose()


def _agent(be: HubBackend, cluster: str, rate: float) -> Agent:
    site = be.site(cluster)
    role = be.creds.roles.producers[cluster]
    config = ProducerConfig(
        cluster=cluster,
        nats_url=be.servers.leaves[cluster].url,
        nats_auth=NatsAuth(role.user, role.password),
        key_file=site / "cluster-key.jwk",
        policy_file=site / POLICY_FILE_NAME,
        max_sessions=100_000,
    )
    identity = ClusterIdentity.load(site / "cluster-key.jwk")
    return Agent(config, identity=identity, sources=[HttpEvents(rate=rate)])


def _client(be: HubBackend, cluster: str, user: str) -> Client:
    """A client of its own per session (each logs in on its own connection anyway), with a
    token of its own user: the proxy holds at most 32 sessions a user."""
    site = be.site(cluster)
    secret = (be.state / "token-secret").read_bytes()
    return Client(
        ClientConfig(
            nats_url=be.consumer_url,
            token=mint_token(sub=user, clusters=[cluster], ttl_s=3600, secret=secret),
            trust_store=site / "trust.json",
            identity=UserIdentity.load(site / "identity.jwk"),
            key_kind="x25519",
            policy="discard",
            request_timeout_s=10.0,
        )
    )


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _rss_mb(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss / 1e6
    return total


async def _until(predicate: Any, timeout_s: float) -> float | None:
    """Seconds until ``predicate()`` holds, polled every 50 ms; None after ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            return None
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    clusters = [f"c{i:02d}" for i in range(args.clusters)]
    me = psutil.Process()
    with tempfile.TemporaryDirectory(prefix="sealstream-benchhub-") as tmp:
        state = Path(tmp) / "hub"
        creds, nodes = prepare_hub(state, clusters, [_STREAM])
        async with (
            HubServers(state, nodes, clusters) as servers,
            contextlib.AsyncExitStack() as stack,
        ):
            be = HubBackend(state, servers, creds, sources=_STREAM, rate=args.rate)
            stack.push_async_callback(be.stop)
            for name in "abc"[: args.proxies]:
                await be.start_proxy(name)
            for name, child in be.proxies.items():
                log = state / f"proxy-{name}.log"
                if await _until(lambda log=log: "proxy.started" in log.read_text(), 60) is None:
                    raise SealstreamError(f"proxy {name} did not start: {child.tail()}")
            for c in clusters:
                await stack.enter_async_context(_agent(be, c, args.rate))
            proxies = [psutil.Process(c.pid) for c in be.proxies.values()]
            run = _Run([_Session() for _ in range(args.sessions)])
            opened = asyncio.Semaphore(args.concurrency)
            rss0 = _rss_mb(proxies)
            async with asyncio.TaskGroup() as tg:
                t0 = time.monotonic()
                tasks = []
                for i, session in enumerate(run.sessions):
                    cluster = clusters[i % len(clusters)]
                    client = _client(be, cluster, f"bench-{i}")
                    tasks.append(tg.create_task(_read(client, cluster, session, opened)))
                open_s = await _until(
                    lambda: all(s.rows or s.failed for s in run.sessions), args.timeout
                )
                everyone_at = time.monotonic() - t0
                # steady state
                rows0, cpu0, mine0, w0 = (
                    sum(s.rows for s in run.sessions),
                    _cpu(proxies),
                    _cpu([me]),
                    time.monotonic(),
                )
                await asyncio.sleep(args.window)
                w = time.monotonic() - w0
                rows_s = (sum(s.rows for s in run.sessions) - rows0) / w
                proxy_cpu = (_cpu(proxies) - cpu0) / w
                mine_cpu = (_cpu([me]) - mine0) / w
                fed = sum(1 for s in run.sessions if s.last_row >= w0)
                rss1 = _rss_mb(proxies)
                # a hub node dies (each connection chose its node at random: about a third)
                victim = 0
                killed = time.monotonic()
                await servers.kill(servers.hub[victim])
                back_s = await _until(  # every session that opened
                    lambda: all(s.last_row > killed for s in run.sessions if not s.failed),
                    args.timeout,
                )
                resumed = sum(1 for s in run.sessions if s.resumed)
                await servers.restart(servers.hub[victim])
                for task in tasks:
                    task.cancel()
    n = args.sessions
    return {
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version()},
        "clusters": args.clusters,
        "proxies": args.proxies,
        "sessions": n,
        "rate_per_cluster": args.rate,
        "open": {
            "all_receiving_s": round(everyone_at, 2) if open_s is not None else None,
            "sessions_per_s": round(n / everyone_at, 1) if open_s is not None else None,
            "failed": dict(Counter(s.failed for s in run.sessions if s.failed)),
        },
        "steady": {
            "window_s": round(w, 1),
            "rows_per_s": round(rows_s, 1),
            "sessions_fed": fed,
            "proxy_cpu_cores": round(proxy_cpu, 3),
            "proxy_cpu_ms_per_session_s": round(1000 * proxy_cpu / n, 3),
            "proxy_rss_mb": round(rss1, 1),
            "proxy_rss_kb_per_session": round(1000 * (rss1 - rss0) / n, 1),
            "bench_process_cpu_cores": round(mine_cpu, 2),
        },
        "node_kill": {
            "victim": nodes[victim].name,
            "all_receiving_again_s": round(back_s, 2) if back_s is not None else None,
            "sessions_resumed": resumed,
        },
    }


def _report(r: dict[str, Any]) -> str:
    o, s, k = r["open"], r["steady"], r["node_kill"]
    return "\n".join(
        [
            "# Hub bench",
            "",
            f"{r['sessions']} sessions over {r['clusters']} customer clusters behind leaf nodes, "
            f"{r['proxies']} proxies on the 3-node hub, {r['rate_per_cluster']:g} rows/s a "
            f"cluster, on {r['machine']['cpus']} CPUs (producers and consumers in the bench "
            f"process, {s['bench_process_cpu_cores']} cores busy).",
            "",
            "| measure | value |",
            "|---|--:|",
            f"| every session open and receiving (each a callout login and an open) "
            f"| {o['all_receiving_s']} s, {o['sessions_per_s']} sessions/s "
            f"(failed: {o['failed'] or 'none'}) |",
            f"| rows/s delivered (all sessions) | {s['rows_per_s']} |",
            f"| sessions receiving rows in the window | {s['sessions_fed']} / {r['sessions']} |",
            f"| proxy CPU, all proxies | {s['proxy_cpu_cores']} cores, "
            f"{s['proxy_cpu_ms_per_session_s']} ms per session per s |",
            f"| proxy RSS, all proxies | {s['proxy_rss_mb']} MB, "
            f"{s['proxy_rss_kb_per_session']} kB per session |",
            f"| {k['victim']} killed (about a third of the sessions on it): every session "
            f"receiving again | {k['all_receiving_again_s']} s, {k['sessions_resumed']} "
            "resumed on a new session |",
            "",
        ]
    )


def _write(out: Path, result: dict[str, Any]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "hub.json").write_text(json.dumps(result, indent=2) + "\n")
    text = _report(result)
    (out / "hub.md").write_text(text)
    return text


def bench_hub_main(args: argparse.Namespace) -> int:
    """Run, write ``hub.md`` and ``hub.json`` to ``args.out``; SIGINT or SIGTERM stops the
    run and every server and process it started."""
    configure_logging(level="error")

    async def go() -> int:
        result = await _bench(args)
        print(await asyncio.to_thread(_write, args.out, result))
        return 0

    return run(go, interrupted=130)
