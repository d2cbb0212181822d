"""The README as a new user reads it: its command table is the commands' parsers, every
option has help, and every code block (shell and Python) runs as written, in order, in a
fresh directory against a real ``sealstream up`` and the context it writes; a block that runs
until Ctrl-C ends with 0 and no traceback when it gets one.

A block may be preceded by ``<!-- readme-test: skip (why) -->``, ``background`` (started and
kept running until the end, as ``up`` in its own terminal), ``reader`` (a consumer in a
terminal of its own: the next blocks run once the producer serves its session; it ends by
itself or on Ctrl-C at the end, with 0 either way) or ``until Ctrl-C``. The blocks after
``up`` get the ``OTEL_EXPORTER_OTLP_ENDPOINT`` it printed, as a user exports it; the OTLP
collector the README exports to is an OTLP/HTTP sink of this test."""

from __future__ import annotations

import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.commands import commands, table

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV = Path(sys.executable).parent.parent
_BLOCK = re.compile(
    r"(?:<!-- readme-test: (?P<mark>[^>]*?) -->\n)?```(?P<lang>sh|python)\n(?P<code>.*?)```",
    re.S,
)


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    code: str
    mark: str

    @property
    def what(self) -> str:
        return f"README.md line {self.line} ({self.lang})"


def blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    return [
        Block(text.count("\n", 0, m.start("code")), m["lang"], m["code"], m["mark"] or "")
        for m in _BLOCK.finditer(text)
    ]


def test_the_command_table_is_made_from_the_parsers() -> None:
    """``python -m tests.support.commands`` prints the table the README holds."""
    text = README.read_text(encoding="utf-8")
    held = text.split("<!-- commands: begin -->\n")[1].split("<!-- commands: end -->")[0]
    assert held == table()


def test_every_option_has_help() -> None:
    for words, parser, text in commands():
        assert text, f"{words} says nothing of what it does"
        for action in parser._actions:
            if action.option_strings and action.help != "==SUPPRESS==":
                assert action.help, f"{words} {action.option_strings[0]} has no help"


def test_only_the_make_targets_are_not_run() -> None:
    skipped = [b for b in blocks() if b.mark.startswith("skip")]
    assert [b.mark for b in skipped] == [
        "skip (make demo runs until Ctrl-C and make test runs every test)"
    ]


#: where the README's export command sends what it decrypts
COLLECTOR = ("127.0.0.1", 14318)


@pytest.fixture
def collector() -> Iterator[list[str]]:
    """An OTLP/HTTP endpoint at :data:`COLLECTOR` that accepts every export; the paths it got."""
    got: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            got.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(COLLECTOR, Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        server.shutdown()
        server.server_close()


def _sessions(project: Path) -> int:
    """The sessions ``up``'s producer has opened so far (its log)."""
    log = project / ".sealstream" / "producer.log"
    return log.read_text(errors="replace").count("session.opened") if log.exists() else 0


def _env(project: Path, *, nats_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEALSTREAM_", "NATS_"))}
    env |= {"XDG_CONFIG_HOME": str(project / "config"), "PYTHONUNBUFFERED": "1"}
    return env | ({"NATS_URL": nats_url} if nats_url else {})


def _start(block: Block, project: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    if block.lang == "python":
        script = project / f"block-{block.line}.py"
        script.write_text(block.code, encoding="utf-8")
        argv = [str(VENV / "bin" / "python"), str(script)]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    with (project / f"block-{block.line}.err").open("w") as err:
        return subprocess.Popen(
            argv,
            cwd=project,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,  # its own process group, as a terminal's job: Ctrl-C
        )


def _interrupt(proc: subprocess.Popen[str]) -> int:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh directory with the project's virtualenv at ``.venv``, as in a clone."""
    (tmp_path / ".venv").symlink_to(VENV)
    return tmp_path


@pytest.mark.timeout(300)
def test_every_readme_block_runs_as_written(
    project: Path, nats_url: str, collector: list[str]
) -> None:
    background: list[subprocess.Popen[str]] = []
    readers: list[tuple[Block, subprocess.Popen[str]]] = []
    exported: dict[str, str] = {}  # what up said to export
    try:
        for block in blocks():
            if block.mark.startswith("skip"):
                continue
            # the producer snippet reads NATS_URL for a server it may publish to (up's NATS has
            # no user for a second cluster): the session's server
            producing = "ProducerConfig.from_env" in block.code
            env = _env(project, nats_url=nats_url if producing else None) | exported
            opened = _sessions(project)
            proc = _start(block, project, env)
            assert proc.stdout is not None
            err = project / f"block-{block.line}.err"
            if block.mark == "background":
                background.append(proc)
                for line in proc.stdout:
                    if m := re.search(r"export (OTEL_EXPORTER_OTLP_ENDPOINT)=(\S+)", line):
                        exported[m[1]] = m[2]
                    if "Ctrl-C stops" in line:
                        break
                else:
                    pytest.fail(f"{block.what} ended: {err.read_text()}")
                continue
            if block.mark == "reader":
                readers.append((block, proc))
                deadline = time.monotonic() + 60
                while _sessions(project) == opened:  # another process's file: nothing to await
                    assert proc.poll() is None, f"{block.what} ended: {err.read_text()}"
                    assert time.monotonic() < deadline, f"{block.what}: no session opened"
                    time.sleep(0.1)
                continue
            if block.mark == "until Ctrl-C":
                first = proc.stdout.readline()
                assert first, f"{block.what} printed nothing: {err.read_text()}"
                assert _interrupt(proc) == 0, f"{block.what}: {err.read_text()}"
            else:
                assert proc.wait(timeout=120) == 0, f"{block.what}: {err.read_text()}"
            proc.stdout.close()
            assert "Traceback" not in err.read_text(), f"{block.what}: {err.read_text()}"
            assert "error:" not in err.read_text(), f"{block.what}: {err.read_text()}"
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" in exported
        # the program's span, log record and metric: decrypted, and exported to the collector
        deadline = time.monotonic() + 60
        while len(collector) < 3:  # the exporter delivers on its own time
            assert time.monotonic() < deadline, f"the collector got {collector}"
            time.sleep(0.1)
        assert sorted(collector) == ["/v1/logs", "/v1/metrics", "/v1/traces"]
        shown = ""
        for block, proc in readers:
            err = project / f"block-{block.line}.err"
            assert proc.stdout is not None
            # one with --limit ends by itself, the others on Ctrl-C
            limited = "--limit" in block.code
            ended = (proc.wait(timeout=60) if limited else _interrupt(proc)) == 0
            shown += proc.stdout.read()
            assert ended, f"{block.what}: {err.read_text()} {shown}"
            assert proc.wait() == 0, f"{block.what}: {err.read_text()}"
        for line in ("otlp_traces: 1 request, 1 spans", "order 1042 charged", "currency=EUR"):
            assert line in shown, shown
    finally:
        for _, proc in readers:
            if proc.poll() is None:
                _interrupt(proc)
            assert proc.stdout is not None
            proc.stdout.close()
        for proc in background:
            assert _interrupt(proc) == 0
            assert proc.stdout is not None
            proc.stdout.close()
