"""The README as a new user reads it: its command table is the commands' parsers, every
option has help, and every code block (shell and Python) runs as written, in order, in a
fresh directory against a real ``sealstream up`` and the context it writes; a block that runs
until Ctrl-C ends with 0 and no traceback when it gets one.

A block may be preceded by ``<!-- readme-test: skip (why) -->``, ``background`` (started and
kept running until the end, as ``up`` in its own terminal) or ``until Ctrl-C``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
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


def test_only_the_make_targets_and_the_otlp_flow_are_not_run() -> None:
    """The OTLP flow needs an application and a collector (tests/roles/test_cli.py runs it)."""
    skipped = [b for b in blocks() if b.mark.startswith("skip")]
    assert [b.mark.split("(")[1].split(":")[0] for b in skipped] == [
        "make demo runs until Ctrl-C and make test runs every test)",
        "OTLP",
        "OTLP",
        "OTLP",
    ]


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
def test_every_readme_block_runs_as_written(project: Path, nats_url: str) -> None:
    background: list[subprocess.Popen[str]] = []
    try:
        for block in blocks():
            if block.mark.startswith("skip"):
                continue
            # the producer snippet reads NATS_URL for a server it may publish to (up's NATS has
            # no user for a second cluster): the session's server
            producing = "ProducerConfig.from_env" in block.code
            env = _env(project, nats_url=nats_url if producing else None)
            proc = _start(block, project, env)
            assert proc.stdout is not None
            err = project / f"block-{block.line}.err"
            if block.mark == "background":
                background.append(proc)
                for line in proc.stdout:
                    if "Ctrl-C stops" in line:
                        break
                else:
                    pytest.fail(f"{block.what} ended: {err.read_text()}")
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
    finally:
        for proc in background:
            assert _interrupt(proc) == 0
            assert proc.stdout is not None
            proc.stdout.close()
