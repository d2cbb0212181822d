"""Every deliberate mistake an operator makes with the commands ends in one line that says
what to do (issue 23): the table below runs each against a real ``sealstream up`` (and its
context) and checks the exact line and the exit status; no traceback, nothing on stdout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from sealstream.crypto import UserIdentity

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Up:
    """A running ``sealstream up``: its state directory, and the environment (a private
    configuration directory, where it wrote and selected its context) to run commands in."""

    dir: Path
    state: Path
    env: dict[str, str]
    pid: int

    def run(
        self, name: str, *args: str | Path, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / name), *(str(a) for a in args)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env or self.env,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def token(self, *clusters: str, ttl: int = 3600) -> str:
        args: list[str | Path] = ["token", "--secret-file", self.state / "token-secret"]
        args += ["--sub", "bob"]
        done = self.run(
            "sealstream-proxy", *args, *(f"--cluster={c}" for c in clusters), "--ttl", str(ttl)
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


def _clean_env(config: Path) -> dict[str, str]:
    """This machine's environment less sealstream's, with a private configuration directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEALSTREAM_", "NATS_"))}
    return {**env, "XDG_CONFIG_HOME": str(config)}


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    d = tmp_path_factory.mktemp("up")
    env = _clean_env(d / "config")
    out = d / "up.out"
    with out.open("wb") as f:
        proc = subprocess.Popen(
            [str(BIN / "sealstream"), "up", "--dir", str(d / "state"), "--sources", "http_events"],
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=d,
        )
    try:
        deadline = time.monotonic() + 60
        while b"Ctrl-C stops everything." not in out.read_bytes():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        yield Up(d, d / "state", env, proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=30) == 0  # Ctrl-C ends up as it ends every command
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


Mistake = tuple[list[str | Path], dict[str, str] | None, int, str]


@pytest.fixture(scope="module")
def mistakes(up: Up) -> dict[str, Mistake]:
    """What -> (command, environment, exit status, the line)."""
    key_file = up.state / "cluster-key.jwk"
    policy = up.state / "authorized.json"
    public = up.dir / "bob.pub.jwk"
    if not public.exists():
        public.write_text(json.dumps(UserIdentity.generate().public_jwk), encoding="utf-8")
    token_file = up.dir / "demo2.token"
    token_file.write_text(up.token("demo", "demo2"), encoding="ascii")
    expired = up.dir / "expired.token"
    expired.write_text(up.token("demo", ttl=-120), encoding="ascii")
    nats_url = (up.state / "consumer.url").read_text(encoding="utf-8")
    (producer,) = (p.pid for p in psutil.Process(up.pid).children() if "producers" in p.cmdline())
    bare = _clean_env(up.dir / "no-config")  # no context, no default identity
    consume: list[str | Path] = ["sealstream-consume", "--output", "jsonl", "--limit", "1"]
    authorize = ["sealstream-producer", "authorize"]
    port = _closed_port()
    table: list[tuple[str, list[str | Path], dict[str, str] | None, int, str]] = [
        (
            "a policy command that finds no policy",
            [*authorize, "add", "--jwk-file", public, "--stream", "orders"],
            bare,
            2,
            "error: authorize add needs the cluster's policy: give --key-file (the policy is "
            "beside it) or --policy-file",
        ),
        (
            "list where there is no policy",
            [*authorize, "list", "--key-file", up.dir / "cluster-key.jwk"],
            None,
            2,
            f"error: --key-file: there is no policy at {up.dir / 'authorized.json'}",
        ),
        (
            "an expiry in the past",
            [
                *authorize,
                "add",
                "--key-file",
                key_file,
                "--jwk-file",
                public,
                "--stream",
                "x",
                "--until",
                "2020-01-01",
            ],
            None,
            2,
            "error: --until 2020-01-01: that is in the past",
        ),
        (
            "a missing JWK file",
            [
                *authorize,
                "add",
                "--key-file",
                key_file,
                "--jwk-file",
                up.dir / "nope.jwk",
                "--stream",
                "x",
            ],
            None,
            2,
            f"error: --jwk-file {up.dir / 'nope.jwk'}: no such file",
        ),
        (
            "revoking an id that begins with '-' and is not there",
            [*authorize, "revoke", "--policy-file", policy, "--thumbprint", "-not-there"],
            None,
            2,
            f"error: -not-there is not in {policy}",
        ),
        (
            "a mistyped producer key file",
            ["sealstream-producer", "--cluster", "demo", "--key-file", up.dir / "typo.jwk"],
            None,
            2,
            f"error: --key-file {up.dir / 'typo.jwk'}: no such file (create the cluster's "
            f"signing key once with 'sealstream-producer key --key-file {up.dir / 'typo.jwk'}')",
        ),
        (
            "trust list without a trust store",
            ["sealstream-consume", "trust", "list"],
            bare,
            2,
            f"error: --trust-store {up.dir / 'no-config/sealstream/trust.json'}: no such file "
            "(pin the cluster's key with 'sealstream-consume trust add', or give --tofu)",
        ),
        (
            "a mistyped trust store",
            [*consume, "--stream", "http_events", "--trust-store", up.dir / "typo.json"],
            None,
            2,
            f"error: --trust-store {up.dir / 'typo.json'}: no such file (pin the cluster's key "
            "with 'sealstream-consume trust add', or give --tofu)",
        ),
        (
            "a mistyped identity",
            [*consume, "--stream", "http_events", "--identity", up.dir / "typo.jwk"],
            None,
            2,
            f"error: --identity {up.dir / 'typo.jwk'}: no such file",
        ),
        (
            "no stream",
            consume,
            None,
            2,
            "error: --stream is required (demo offers http_events)",
        ),
        (
            "an unknown context",
            [*consume, "--stream", "http_events", "--context", "nope"],
            None,
            2,
            "error: --context nope: no such context "
            f"({up.dir / 'config/sealstream/context/nope.json'}); 'sealstream up' writes one",
        ),
        (
            "a stream the cluster does not grant",
            [*consume, "--stream", "orders"],
            None,
            1,
            "error: forbidden: stream 'orders' not authorized: ask the cluster's operator for "
            "it ('sealstream-producer authorize add --key-file CLUSTER-KEY --jwk-file "
            "YOURS.pub.jwk --stream STREAM')",
        ),
        (
            "a cluster the token does not allow",
            [*consume, "--stream", "http_events", "--cluster", "other"],
            None,
            1,
            "error: forbidden: token does not allow cluster 'other': check --cluster, or use "
            "a token for this cluster",
        ),
        (
            "a cluster nobody serves",
            [*consume, "--stream", "http_events", "--cluster", "demo2", "--token-file", token_file],
            None,
            1,
            "error: cluster_unavailable: no producer serves cluster 'demo2': check --cluster, "
            "or start the cluster's producer",
        ),
        (
            "an expired token",
            [*consume, "--stream", "http_events", "--token-file", expired],
            None,
            1,
            "error: unauthorized: NATS refused the connection: token expired: get a fresh token",
        ),
        (
            "no identity, for a cluster that checks who reads",
            [
                *consume,
                "--stream",
                "http_events",
                "--cluster",
                "demo",
                "--nats-url",
                nats_url,
                "--token-file",
                up.state / "token",
                "--trust-store",
                up.state / "trust.json",
            ],
            bare,
            1,
            "error: forbidden: this cluster checks who reads it and you gave no identity: give "
            "--identity FILE ('sealstream-consume identity create' makes one, for its operator "
            "to authorize)",
        ),
        (
            "NATS down",
            [*consume, "--stream", "http_events", "--nats-url", f"nats://127.0.0.1:{port}"],
            None,
            1,
            f"error: cannot reach NATS at nats://127.0.0.1:{port}: connection refused: is it "
            "running? (--nats-url, NATS_URL or the context)",
        ),
        (
            "a second producer for a cluster",
            [
                "sealstream-producer",
                "--cluster",
                "demo",
                "--key-file",
                key_file,
                "--source",
                "http_events",
                "--log-level",
                "warning",
            ],
            {
                **up.env,
                "NATS_URL": nats_url,
                "SEALSTREAM_NATS_USER": "producer-demo",
                "SEALSTREAM_NATS_PASSWORD_FILE": str(up.state / "nats-producer-demo.password"),
            },
            2,
            f"error: cluster 'demo' already has a producer (process {producer} on "
            f"{socket.gethostname()}): stop it, or give this one another --cluster",
        ),
        (
            "a missing token secret",
            [
                "sealstream-proxy",
                "token",
                "--token-secret-file",
                up.dir / "nope",
                "--sub",
                "a",
                "--cluster",
                "demo",
            ],
            None,
            2,
            f"error: --token-secret-file {up.dir / 'nope'}: no such file",
        ),
        (
            "a second up on the same state directory",
            ["sealstream", "up", "--dir", up.state],
            None,
            2,
            f"error: {up.state} is in use by process {up.pid} (sealstream up): stop it, or "
            "give another --dir",
        ),
    ]
    return {what: (argv, env, status, line) for what, argv, env, status, line in table}


MISTAKES = [
    "a policy command that finds no policy",
    "list where there is no policy",
    "an expiry in the past",
    "a missing JWK file",
    "revoking an id that begins with '-' and is not there",
    "a mistyped producer key file",
    "trust list without a trust store",
    "a mistyped trust store",
    "a mistyped identity",
    "no stream",
    "an unknown context",
    "a stream the cluster does not grant",
    "a cluster the token does not allow",
    "a cluster nobody serves",
    "an expired token",
    "no identity, for a cluster that checks who reads",
    "NATS down",
    "a second producer for a cluster",
    "a missing token secret",
    "a second up on the same state directory",
]


@pytest.mark.parametrize("what", MISTAKES)
def test_a_mistake_ends_in_one_line_that_says_what_to_do(
    up: Up, mistakes: dict[str, Mistake], what: str
) -> None:
    assert sorted(mistakes) == sorted(MISTAKES)
    argv, env, status, line = mistakes[what]
    done = up.run(str(argv[0]), *argv[1:], env=env)
    assert (done.returncode, _one_line(done)) == (status, line)
    assert not (up.dir / "authorized.json").exists(), "no stray policy file"
    assert not (up.dir / "typo.jwk").exists(), "no key made for a mistyped name"


def test_a_closed_pipe_ends_the_reader_quietly(up: Up) -> None:
    """``sealstream-consume --output jsonl | head -2``: exit 0, nothing on stderr."""
    reader = subprocess.Popen(
        [str(BIN / "sealstream-consume"), "--stream", "http_events", "--output", "jsonl"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=up.env,
        cwd=up.dir,
    )
    assert reader.stdout is not None
    assert reader.stderr is not None
    first = reader.stdout.readline()
    assert json.loads(first)["stream"] == "http_events"
    reader.stdout.close()  # as head does after its lines
    assert reader.wait(timeout=30) == 0
    with reader.stderr:
        assert reader.stderr.read() == b""


@pytest.mark.parametrize(
    "argv",
    [
        ["sealstream-consume", "--stream", "http_events", "--output", "jsonl"],
        ["sealstream-consume", "web", "--port", "0"],
    ],
    ids=["consume", "web"],
)
def test_ctrl_c_ends_a_command_with_0_and_nothing_on_stderr(up: Up, argv: list[str]) -> None:
    """As a terminal's Ctrl-C: SIGINT to the command's process group, once it shows output."""
    proc = subprocess.Popen(
        [str(BIN / argv[0]), *argv[1:]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=up.env,
        cwd=up.dir,
        start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    with proc.stdout, proc.stderr:
        assert proc.stdout.readline()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.stderr.read() == b""
