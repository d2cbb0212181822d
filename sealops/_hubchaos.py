"""``sealstream chaos --topology hub``: faults on the hub-and-leaves topology while consumers
of both customer clusters stream, then the same report as ``sealstream chaos``.

The topology is ``sealstream up --topology hub``'s (:mod:`sealops._hub`), with each site's
producer fed numbered JSON lines on stdin (``{"run": 1, "n": i, "t": ns}``) so that every
consumer counts duplicates and rows out of order; each keeps its store in its leaf node
(``--no-store``: at most once). The faults, in the order given and cycled: ``hub-node`` (a
random hub node killed, restarted after 1-5 s), ``proxy`` (one of the two, the same), ``leaf``
(a random site's leaf node killed for ``--leaf-outage`` seconds, 30 by default, then
restarted on its port), ``link`` (a random site's link to the hub cut as long, its leaf node
and producer up: the site's WAN down).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from consumers import ClientConfig
from producers import POLICY_FILE_NAME
from sealops._chaos import Fault, Seen, _consume, _pct
from sealops._hub import HubBackend, hub_backend
from sealstream import KeyMode
from sealstream.crypto import UserIdentity

__all__ = ["HUB_FAULTS", "hub_chaos", "hub_run"]

HUB_FAULTS = ("hub-node", "proxy", "leaf", "link")
_STREAM = "chaos"


def _plan(duration: float, kinds: list[str], leaf_s: float, rng: random.Random) -> list[Fault]:
    faults: list[Fault] = []
    t = 15.0  # warm-up: every consumer streaming
    while True:
        kind = kinds[len(faults) % len(kinds)]
        down = leaf_s if kind in ("leaf", "link") else rng.uniform(1, 5)
        if t + down + 20 > duration:
            return faults
        faults.append(Fault(kind, round(t, 1), round(down, 1)))
        t += down + rng.uniform(20, 25)


async def _producer(be: HubBackend, cluster: str, *, store: bool) -> asyncio.subprocess.Process:
    """A site's producer reading rows on stdin (``jsonl:-``), on its leaf node (its store
    there, unless ``store`` is False)."""
    site = be.site(cluster)
    env = {
        **os.environ,
        "NATS_URL": be.servers.leaves[cluster].url,
        "SEALSTREAM_NATS_USER": be.creds.roles.producers[cluster].user,
        "SEALSTREAM_NATS_PASSWORD_FILE": str(site / f"nats-producer-{cluster}.password"),
        "SEALSTREAM_CLUSTER": cluster,
        "SEALSTREAM_KEY_FILE": str(site / "cluster-key.jwk"),
        "SEALSTREAM_POLICY_FILE": str(site / POLICY_FILE_NAME),
        "SEALSTREAM_STORE": "1" if store else "0",
    }
    args = ["producers", "--source", f"jsonl:-:{_STREAM}", "--log-level", "info"]
    with (site / "producer.log").open("ab") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            *args,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=log,
            stderr=log,
        )


async def _feed(proc: asyncio.subprocess.Process, rate: float) -> None:
    """Rows at ``rate`` per second on the producer's stdin until it exits or is cancelled;
    while the producer does not read (its ``emit`` waits for its store, its leaf node being
    down), the feed waits too, as a source told to wait does."""
    assert proc.stdin is not None
    tick = 0.05
    n = 0
    with contextlib.suppress(ConnectionError):
        while proc.returncode is None:
            lines = []
            for _ in range(max(1, round(rate * tick))):
                lines.append(json.dumps({"run": 1, "n": n, "t": time.time_ns()}) + "\n")
                n += 1
            proc.stdin.write("".join(lines).encode())
            await proc.stdin.drain()
            await asyncio.sleep(tick)


async def _stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.terminate()
        try:
            async with asyncio.timeout(15):
                return await proc.wait()
        except TimeoutError:
            proc.kill()
    return await proc.wait()


async def _inject(be: HubBackend, fault: Fault, rng: random.Random) -> str:
    """Kill the fault's victim, wait its outage, start it again; the victim's name."""
    if fault.kind == "hub-node":
        i = rng.randrange(len(be.servers.hub))
        server = be.servers.hub[i]
        await be.servers.kill(server)
        await asyncio.sleep(fault.down_s)
        await be.servers.restart(server)
        return be.servers.nodes[i].name
    if fault.kind == "proxy":
        name = rng.choice(sorted(be.proxies))
        await be.kill(be.proxies[name])
        await asyncio.sleep(fault.down_s)
        await be.start_proxy(name)
        return f"proxy-{name}"
    cluster = rng.choice(be.clusters)
    if fault.kind == "link":
        link = be.servers.links[cluster]
        await link.cut()
        await asyncio.sleep(fault.down_s)
        await link.start()
        return f"link-{cluster}"
    leaf = be.servers.leaves[cluster]
    await be.servers.kill(leaf)
    await asyncio.sleep(fault.down_s)
    await be.servers.restart(leaf)
    return f"leaf-{cluster}"


async def hub_chaos(args: argparse.Namespace, kinds: list[str]) -> dict[str, Any]:
    """The run; its result in ``sealstream chaos``'s shape."""
    rng = random.Random(args.seed)  # noqa: S311 - a reproducible schedule, not a secret
    faults = _plan(args.duration, kinds, args.leaf_outage, rng)
    codes: dict[str, int | None] = {}
    with tempfile.TemporaryDirectory(prefix="sealstream-hubchaos-") as tmp:
        state = Path(tmp) / "hub"
        sources = f"jsonl:-:{_STREAM}"  # the sites' policies authorize the stream
        async with hub_backend(
            state=state, sources=sources, rate=1.0, producers=False, relay_links=True
        ) as be:
            seen: dict[str, list[Seen]] = {
                c: [Seen() for _ in range(args.consumers)] for c in be.clusters
            }
            started = time.monotonic()
            async with asyncio.TaskGroup() as tg:
                producers = {c: await _producer(be, c, store=args.store) for c in be.clusters}
                feeders = [tg.create_task(_feed(p, args.rate)) for p in producers.values()]
                consumers = [
                    tg.create_task(
                        _consume(_config(be, c, args.key_mode), s, cluster=c, stream=_STREAM)
                    )
                    for c, group in seen.items()
                    for s in group
                ]
                for fault in faults:
                    await asyncio.sleep(max(0.0, started + fault.at_s - time.monotonic()))
                    print(f"chaos: {fault.kind} down for {fault.down_s} s", file=sys.stderr)
                    victim = await _inject(be, fault, rng)
                    fault.kind = f"{fault.kind} ({victim})"  # what the report shows
                    fault.restarted_ns = time.time_ns()
                await asyncio.sleep(max(0.0, started + args.duration - time.monotonic()))
                last = faults[-1].restarted_ns if faults else 0
                everyone = [s for group in seen.values() for s in group]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(30):
                        while not all(s.recovery_after(last) is not None for s in everyone):  # noqa: ASYNC110
                            await asyncio.sleep(0.5)
                for task in [*consumers, *feeders]:
                    task.cancel()
                for cluster, proc in producers.items():
                    codes[f"producer-{cluster}"] = await _stop(proc)
            await be.stop()
            codes |= {f"proxy-{n}": c.proc.returncode for n, c in be.proxies.items()}
            tracebacks = await asyncio.to_thread(_keep_logs, state, args.out / "logs")
    everyone = [s for group in seen.values() for s in group]
    for fault in faults:  # a leaf's fault is recovered by its own cluster's consumers
        fault.recovery_s = [
            r for s in everyone if (r := s.recovery_after(fault.restarted_ns)) is not None
        ]
    recoveries = [r for f in faults for r in f.recovery_s]
    return {
        "what": (
            f"`sealstream chaos --topology hub --duration {args.duration:g} --seed {args.seed}` "
            f"({args.rate:g} rows/s a site"
            + (", group mode" if args.key_mode == "group" else "")
            + (", each site's store in its leaf node" if args.store else ", no store")
            + "): on the 3-node hub with two proxies and two "
            f"sites behind leaf nodes, hub nodes, proxies and leaf nodes killed and restarted, "
            f"and sites' links cut (leaf nodes and links down {args.leaf_outage:g} s), while "
            f"library consumers "
            f"(`resume=True`, {args.consumers} a cluster) stream. Consumers "
            + ", ".join(f"{i}: {c}" for i, c in enumerate(c for c in seen for _ in seen[c]))
            + "."
        ),
        "seed": args.seed,
        "store": args.store,
        "duration_s": args.duration,
        "rate": args.rate,
        "consumers": [
            {
                "cluster": c,
                **{k: v for k, v in asdict(s).items() if k not in ("last", "seen", "arrivals")},
                "missing": s.missing,
            }
            for c, group in seen.items()
            for s in group
        ],
        "faults": [asdict(f) for f in faults],
        "unrecovered": sum(len(everyone) - len(f.recovery_s) for f in faults),
        "recovery_p50_s": _pct(recoveries, 0.5),
        "recovery_max_s": max(recoveries) if recoveries else None,
        "tracebacks": tracebacks,
        "exit_codes": codes,
    }


def _keep_logs(state: Path, dest: Path) -> dict[str, int]:
    """Copy every server's and role's log to ``dest``; the tracebacks in each."""
    dest.mkdir(parents=True, exist_ok=True)
    counts = {}
    for log in [*state.glob("*.log"), *state.glob("site-*/*.log")]:
        name = log.name if log.parent == state else f"{log.parent.name}-{log.name}"
        shutil.copyfile(log, dest / name)
        counts[name.removesuffix(".log")] = log.read_text(errors="replace").count("Traceback")
    return counts


def _config(be: HubBackend, cluster: str, key_mode: KeyMode) -> ClientConfig:
    site = be.site(cluster)
    return ClientConfig(
        nats_url=be.consumer_url,
        token=(site / "token").read_text(encoding="ascii").strip(),
        trust_store=site / "trust.json",
        identity=UserIdentity.load(site / "identity.jwk"),
        key_kind="x25519",
        key_mode=key_mode,
        policy="discard",
        request_timeout_s=3.0,
    )


async def hub_run(args: argparse.Namespace) -> dict[str, Any]:
    """The chaos run on the hub topology, with the fault kinds ``--faults`` names."""
    kinds = [k for k in (args.faults or ",".join(HUB_FAULTS)).split(",") if k]
    if not set(kinds) <= set(HUB_FAULTS):
        raise ValueError(f"fault kinds on the hub are {', '.join(HUB_FAULTS)}")
    return await hub_chaos(args, kinds)
