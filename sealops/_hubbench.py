"""``sealstream bench-hub``: the hub-and-leaves topology at scale on this machine.

Real nats-servers (the 3-node hub, a leaf node per customer cluster) and real proxy processes
(1 to 3, measured with psutil); the producers (``producers.Agent`` with ``HttpEvents``, on
their site's leaf node) run in this process, the consumers (``consumers.Client``, each session
on its own NATS connection logged in through the auth callout on any hub node) in ``--readers``
reader processes (``python -m sealops._hubbench``, JSON lines on stdin and stdout), which
bound what is delivered: the report says how busy they were.

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
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from consumers import Client, ClientConfig, Resumed
from producers import POLICY_FILE_NAME, Agent, HttpEvents, ProducerConfig
from sealops._hub import HubBackend, HubServers, prepare_hub, site_dir
from sealops._procs import Child
from sealstream.crypto import ClusterIdentity, UserIdentity
from sealstream.errors import BrokerError, SealstreamError, SessionError
from sealstream.log import configure_logging
from sealstream.nats import NatsAuth
from sealstream.run import run
from sealstream.tokens import mint_token

__all__ = ["bench_hub_main"]

_STREAM = "http_events"


@dataclass
class _Session:
    rows: int = 0
    #: wall-clock time of the last row (compared with the orchestrator's, another process)
    last_row: float = 0.0
    resumed: int = 0
    failed: str | None = None


async def _read(client: Client, cluster: str, s: _Session, opened: asyncio.Semaphore) -> None:
    async with client:
        sub = client.subscribe(cluster, [_STREAM], resume=True, retry_s=120, resume_timeout_s=600)
        try:
            async with opened:
                await sub.__aenter__()
        except SessionError as exc:  # a measurement too: counted, the others go on
            s.failed = exc.code
            return
        except BrokerError:
            s.failed = "broker"
            return
        try:
            async for item in sub:
                if isinstance(item, Resumed):
                    s.resumed += 1
                else:
                    s.rows += len(item.rows)
                    s.last_row = time.time()
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


def _client(cfg: dict[str, Any], cluster: str, user: str) -> Client:
    """A client of its own per session (each logs in on its own connection anyway), with a
    token of its own user: the proxy holds at most 32 sessions a user."""
    state = Path(cfg["state"])
    site = site_dir(state, cluster)
    secret = (state / "token-secret").read_bytes()
    return Client(
        ClientConfig(
            nats_url=cfg["consumer_url"],
            token=mint_token(sub=user, clusters=[cluster], ttl_s=3600, secret=secret),
            trust_store=site / "trust.json",
            identity=UserIdentity.load(site / "identity.jwk"),
            key_kind="x25519",
            key_mode=cfg["key_mode"],
            policy="discard",
            request_timeout_s=10.0,
        )
    )


def _stats(sessions: list[_Session], since: float) -> dict[str, Any]:
    """A reader's sessions, summed: what the orchestrator's phases wait for."""
    return {
        "sessions": len(sessions),
        "started": sum(1 for s in sessions if s.rows or s.failed),
        "rows": sum(s.rows for s in sessions),
        # opened sessions that received a row since ``since``, and those that did not
        "fed": sum(1 for s in sessions if s.last_row >= since),
        "unfed": sum(1 for s in sessions if not s.failed and s.last_row < since),
        "resumed": sum(1 for s in sessions if s.resumed),
        "failed": dict(Counter(s.failed for s in sessions if s.failed)),
        "cpu_s": _cpu([psutil.Process()]),
    }


async def _reader() -> int:
    """A reader process: the sessions its config names, each read by a client of its own;
    answers ``stats`` commands until the end of its stdin."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    cfg = json.loads(await reader.readline())
    sessions = [_Session() for _ in cfg["sessions"]]
    opened = asyncio.Semaphore(cfg["concurrency"])
    async with asyncio.TaskGroup() as tg:
        tasks = [
            tg.create_task(_read(_client(cfg, cluster, f"bench-{i}"), cluster, s, opened))
            for (i, cluster), s in zip(cfg["sessions"], sessions, strict=True)
        ]
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd.get("cmd") != "stats":
                break
            print(json.dumps({"event": "stats", **_stats(sessions, cmd["since"])}), flush=True)
        for task in tasks:
            task.cancel()
    print(json.dumps({"event": "bye"}), flush=True)
    return 0


class _Readers:
    """The reader processes, asked together."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children

    async def stats(self, since: float = float("inf")) -> dict[str, Any]:
        for child in self.children:
            await child.send({"cmd": "stats", "since": since})
        answers = [await c.expect("stats", timeout_s=60) for c in self.children]
        total: dict[str, Any] = {
            k: sum(a[k] for a in answers)
            for k in ("sessions", "started", "rows", "fed", "unfed", "resumed", "cpu_s")
        }
        failed: Counter[str] = Counter()
        for a in answers:
            failed.update(a["failed"])
        total["failed"] = dict(failed)
        return total

    async def until(
        self, predicate: Any, timeout_s: float, since: float = float("inf")
    ) -> float | None:
        """Seconds until ``predicate(stats)`` holds, asked every 0.5 s; None after
        ``timeout_s``."""
        start = time.monotonic()
        while not predicate(await self.stats(since)):
            if time.monotonic() - start > timeout_s:
                return None
            await asyncio.sleep(0.5)
        return time.monotonic() - start


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


async def _spawn_readers(
    args: argparse.Namespace,
    be: HubBackend,
    clusters: list[str],
    stack: contextlib.AsyncExitStack,
) -> _Readers:
    """The sessions over ``--readers`` processes, round robin (each session's cluster too);
    each one stopped with ``stack``, however far the spawning got."""
    shares: list[list[tuple[int, str]]] = [[] for _ in range(args.readers)]
    for i in range(args.sessions):
        shares[i % args.readers].append((i, clusters[i % len(clusters)]))
    children = []
    for k, share in enumerate(shares):
        cfg = {
            "consumer_url": be.consumer_url,
            "state": str(be.state),
            "sessions": share,
            "concurrency": max(1, args.concurrency // args.readers),
            "key_mode": args.key_mode,
        }
        argv = [sys.executable, "-m", "sealops._hubbench"]
        log = be.state / f"reader-{k}.log"
        child = await Child.spawn(f"reader-{k}", "reader", argv, log=log, config=cfg)
        stack.push_async_callback(child.stop)
        children.append(child)
    return _Readers(children)


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.readers < 1 or args.sessions < 1 or args.clusters < 1:
        raise SealstreamError("--readers, --sessions and --clusters must be at least 1")
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
            rss0 = _rss_mb(proxies)
            t0 = time.monotonic()
            readers = await _spawn_readers(args, be, clusters, stack)
            n = args.sessions
            open_s = await readers.until(lambda st: st["started"] >= n, args.timeout)
            everyone_at = time.monotonic() - t0
            opened = await readers.stats()
            # steady state
            w0_wall, w0 = time.time(), time.monotonic()
            cpu0, mine0 = _cpu(proxies), _cpu([me])
            await asyncio.sleep(args.window)
            steady = await readers.stats(since=w0_wall)
            w = time.monotonic() - w0
            rows_s = (steady["rows"] - opened["rows"]) / w
            proxy_cpu = (_cpu(proxies) - cpu0) / w
            mine_cpu = (_cpu([me]) - mine0) / w
            readers_cpu = (steady["cpu_s"] - opened["cpu_s"]) / w
            rss1 = _rss_mb(proxies)
            # a hub node dies (each connection chose its node at random: about a third)
            victim = 0
            killed = time.time()
            await servers.kill(servers.hub[victim])
            back_s = await readers.until(  # every session that opened
                lambda st: st["unfed"] == 0, args.timeout, since=killed
            )
            resumed = (await readers.stats())["resumed"]
            await servers.restart(servers.hub[victim])
    return {
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version()},
        "clusters": args.clusters,
        "proxies": args.proxies,
        "sessions": n,
        "readers": args.readers,
        "key_mode": args.key_mode,
        "rate_per_cluster": args.rate,
        "open": {
            "all_receiving_s": round(everyone_at, 2) if open_s is not None else None,
            "sessions_per_s": round(n / everyone_at, 1) if open_s is not None else None,
            "opened": opened["started"],
            "failed": opened["failed"],
        },
        "steady": {
            "window_s": round(w, 1),
            "rows_per_s": round(rows_s, 1),
            "sessions_fed": steady["fed"],
            "proxy_cpu_cores": round(proxy_cpu, 3),
            "proxy_cpu_ms_per_session_s": round(1000 * proxy_cpu / n, 3),
            "proxy_rss_mb": round(rss1, 1),
            "proxy_rss_kb_per_session": round(1000 * (rss1 - rss0) / n, 1),
            "bench_process_cpu_cores": round(mine_cpu, 2),
            "readers_cpu_cores": round(readers_cpu, 2),
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
            f"cluster, {r.get('key_mode', 'session')} mode, on {r['machine']['cpus']} CPUs "
            f"(producers in the bench process, {s['bench_process_cpu_cores']} cores busy; "
            f"consumers in {r.get('readers', 1)} reader processes, "
            f"{s.get('readers_cpu_cores', '-')} cores busy).",
            "",
            "| measure | value |",
            "|---|--:|",
            f"| every session open and receiving (each a callout login and an open) "
            f"| {o['all_receiving_s']} s, {o['sessions_per_s']} sessions/s "
            f"({o.get('opened', '-')} receiving or refused; failed: {o['failed'] or 'none'}) |",
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


if __name__ == "__main__":  # a reader process (see _spawn_readers)
    configure_logging(level="error")
    sys.exit(run(_reader))
