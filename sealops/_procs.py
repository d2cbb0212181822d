"""The bench's process control: the role processes it spawns, stops and samples.

:class:`Launcher` starts the real proxy (``python -m broker_proxy``) and the bench workers
(:mod:`sealops._worker`) against the run's NATS server, each with its own log file;
:class:`Child` speaks to a worker by JSON lines on stdin/stdout and stops any child for sure;
:class:`Proc` samples a process's CPU seconds and RSS (a child, or the nats-server). A child
gets SIGTERM when the bench process dies, however it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import nats.errors
import psutil

from sealstream.errors import SealstreamError
from sealstream.ids import Subjects
from sealstream.nats import connect
from sealstream.wire import encode_map

__all__ = ["Child", "Launcher", "Proc", "proxy_counts"]

#: lines of a child's log quoted when it fails
_TAIL: Final = 30


def death_signal() -> Callable[[], None] | None:
    """For a child, before exec: SIGTERM when the bench process dies, however it dies (a
    worker also exits at the end of its stdin; the proxy has no stdin to watch). Linux's
    ``prctl(PR_SET_PDEATHSIG)``, looked up here in the parent; None elsewhere."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    set_pdeathsig = 1

    def arm() -> None:
        prctl(set_pdeathsig, signal.SIGTERM)

    return arm


class Child:
    """A child process; workers speak JSON lines on stdin/stdout, and every child's stderr
    (and the proxy's stdout) goes to a log file quoted when something fails."""

    def __init__(self, name: str, role: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.role = role
        self.proc = proc
        self.log = log
        self.ps = psutil.Process(proc.pid)
        self.targets: list[str] = []
        self.result: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def sampled(self, role: str | None = None) -> Proc:
        """This child, for CPU and RSS samples (under ``role``, by default its own)."""
        return Proc(role or self.role, self.pid, self.ps)

    @classmethod
    async def spawn(
        cls,
        name: str,
        role: str,
        argv: list[str],
        *,
        log: Path,
        config: dict[str, Any] | None,
        env: dict[str, str] | None = None,
    ) -> Child:
        sink: IO[bytes]
        with log.open("ab") as sink:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.PIPE if config is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE if config is not None else sink,
                stderr=sink,
                env=env,
                preexec_fn=death_signal(),
            )
        child = cls(name, role, proc, log)
        if config is not None:
            await child.send(config)
        return child

    def tail(self) -> str:
        try:
            lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-_TAIL:])

    def fail(self, what: str) -> SealstreamError:
        return SealstreamError(f"bench {self.name}: {what}; its log ends with:\n{self.tail()}")

    async def send(self, msg: dict[str, Any]) -> None:
        stdin = self.proc.stdin
        if stdin is None or stdin.is_closing():
            raise self.fail("its stdin is closed")
        stdin.write(json.dumps(msg).encode() + b"\n")
        try:
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise self.fail("it went away") from None

    async def expect(
        self,
        events: str | Iterable[str],
        *,
        timeout_s: float,
        on_progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """The next event named in ``events``; progress events feed ``on_progress``."""
        wanted = {events} if isinstance(events, str) else set(events)
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    line = await stdout.readline()
                    if not line:
                        await self.proc.wait()
                        raise self.fail(f"exited ({self.proc.returncode}) before {wanted}")
                    msg = json.loads(line)
                    event = msg.get("event")
                    if event in wanted:
                        return dict(msg)
                    if event == "progress":
                        if on_progress is not None:
                            on_progress(int(msg["n"]))
                    elif event == "error":
                        raise self.fail(str(msg.get("message")))
        except TimeoutError:
            raise self.fail(f"no {sorted(wanted)} within {timeout_s:.0f} s") from None

    async def stop(self, *, grace_s: float = 10.0) -> None:
        """Ask a worker to quit (end of its stdin), then terminate, then kill. Whatever goes
        wrong reading its last words, the process is reaped."""
        proc = self.proc
        try:
            if proc.stdin is not None and not proc.stdin.is_closing():
                with contextlib.suppress(OSError, RuntimeError):
                    proc.stdin.write(b'{"cmd": "quit"}\n')
                    proc.stdin.close()
            elif proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            if proc.stdout is not None:
                # RuntimeError: a read still pending elsewhere (a failed start-up)
                with contextlib.suppress(TimeoutError, ValueError, RuntimeError, OSError):
                    async with asyncio.timeout(grace_s):
                        while line := await proc.stdout.readline():
                            with contextlib.suppress(ValueError):
                                msg = json.loads(line)
                                if isinstance(msg, dict) and msg.get("event") == "bye":
                                    self.result = msg
            await asyncio.wait_for(proc.wait(), timeout=grace_s)
        except TimeoutError:
            pass
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), timeout=5.0)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()


@dataclass(slots=True)
class Proc:
    role: str
    pid: int
    ps: psutil.Process

    def cpu(self) -> float:
        try:
            t = self.ps.cpu_times()
        except psutil.Error:
            return 0.0
        return float(t.user + t.system)

    def rss_mb(self) -> float:
        try:
            return self.ps.memory_info().rss / 1e6
        except psutil.Error:
            return 0.0

    def peak_mb(self) -> float:
        """The high-water mark of RSS (Linux ``VmHWM``), else the current RSS."""
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024 / 1e6
        except OSError:
            pass
        return self.rss_mb()


@dataclass
class Launcher:
    """Spawns the role processes of a run: against ``nats_url``, under the run's own subject
    ``prefix``, each child's log numbered in ``state``. The caller's exit stack stops them."""

    nats_url: str
    state: Path
    prefix: str
    cluster: str
    token_secret_file: Path
    spawned: int = 0

    def log_path(self, name: str) -> Path:
        self.spawned += 1
        return self.state / f"{self.spawned:03d}-{name}.log"

    async def worker(
        self, stack: contextlib.AsyncExitStack, name: str, role: str, config: dict[str, Any]
    ) -> Child:
        argv = [sys.executable, "-m", "sealops._worker", role]
        cfg = {"nats_url": self.nats_url, "prefix": self.prefix, "cluster": self.cluster, **config}
        child = await Child.spawn(name, role, argv, log=self.log_path(name), config=cfg)
        stack.push_async_callback(child.stop)
        return child

    async def proxy(
        self,
        stack: contextlib.AsyncExitStack,
        *,
        nats_url: str | None = None,
        callout_seed: Path | None = None,
    ) -> Child:
        """The proxy, on the run's server (or ``nats_url``, credentials included), answering the
        NATS auth callout when given the issuer's seed file."""
        argv = [
            sys.executable,
            "-m",
            "broker_proxy",
            "--prefix",
            self.prefix,
            "--token-secret-file",
            str(self.token_secret_file),
            "--log-level",
            "info",
            "--log-json",
        ]
        # the URL by environment: it may hold credentials, which a command line shows to all
        env = {**os.environ, "NATS_URL": nats_url or self.nats_url}
        if callout_seed is not None:
            env["SEALSTREAM_CALLOUT_ISSUER_SEED_FILE"] = str(callout_seed)
        log = self.log_path("proxy")
        child = await Child.spawn("proxy", "proxy", argv, log=log, config=None, env=env)
        stack.push_async_callback(child.stop)
        if nats_url is None:
            await self._wait_proxy(child)
        else:  # the orchestrator has no user there: the proxy's log says when it serves
            deadline = time.monotonic() + 30.0
            while "proxy.started" not in log.read_text(encoding="utf-8", errors="replace"):
                if child.proc.returncode is not None:
                    raise child.fail("exited during startup")
                if time.monotonic() > deadline:
                    raise child.fail("not serving after 30 s")
                await asyncio.sleep(0.05)
        return child

    async def _wait_proxy(self, proxy: Child) -> None:
        """Ready when it answers a (malformed) keepalive request."""
        nc = await connect(self.nats_url, name="bench-orchestrator")
        try:
            deadline = time.monotonic() + 30.0
            while True:
                if proxy.proc.returncode is not None:
                    raise proxy.fail("exited during startup")
                try:
                    await nc.request(
                        Subjects(self.prefix).api_keepalive, encode_map({}), timeout=1.0
                    )
                    return
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    if time.monotonic() > deadline:
                        raise proxy.fail("not serving after 30 s") from None
                    await asyncio.sleep(0.05)
        finally:
            await nc.close()


def proxy_counts(log: Path) -> dict[str, Any]:
    """``relayed`` and ``rejected`` from the proxy's ``proxy.stopped`` log line."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            msg = json.loads(line)
            if isinstance(msg, dict) and msg.get("event") == "proxy.stopped":
                return {
                    "relayed": msg.get("relayed"),
                    "rejected": msg.get("rejected"),
                    "rejected_by_reason": msg.get("rejected_by_reason"),
                }
    return {}
