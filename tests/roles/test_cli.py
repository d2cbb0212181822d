"""The real commands, run as subprocesses against the session's nats-server (and, for
``sealstream up|demo``, against the embedded server they start themselves)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgpack
import psutil
import pytest
from rich.console import Console

from broker_proxy._cli import _parser as proxy_parser
from consumers._view import JsonLinesWriter, LiveTable
from producers import OtlpConfig, otlp_config
from producers._cli import _parser as producer_parser
from producers._cli import source_specs
from sealops._stack import otlp_ports, source_streams
from sealstream import TokenVerifier
from sealstream.crypto import Batch, ClusterIdentity, TrustStore
from sealstream.nats import connect
from sealstream.otlp import OTLP_STREAMS
from tests.support.otlp_sink import OtlpSink, run_app
from tests.support.pipeline import Tap

BIN = Path(sys.executable).parent
CLUSTER = "c1"
STREAM = ("--stream", "http_events")
#: no inherited configuration may steer the commands: no context, no default identity or trust
#: store (a configuration directory that does not exist)
_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("SEALSTREAM_", "NATS_", "XDG_"))}
_ENV["XDG_CONFIG_HOME"] = "/nonexistent/sealstream-test-config"


def _cmd(name: str, *args: str | Path) -> list[str]:
    path = BIN / name
    assert path.is_file(), f"{name} is not installed next to {sys.executable}"
    return [str(path), *(str(a) for a in args)]


def _run(
    name: str, *args: str | Path, timeout: float = 30, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _cmd(name, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_ENV,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _wait_for(
    predicate: Callable[[], bool], *, timeout: float, what: str, proc: Any = None
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


@dataclass
class Service:
    """A long-running command with stdout and stderr in a file."""

    proc: subprocess.Popen[bytes]
    log: Path

    def wait_for(self, needle: str, timeout: float = 20) -> None:
        _wait_for(lambda: needle in _text(self.log), timeout=timeout, what=needle, proc=self.proc)

    def interrupt(self, timeout: float = 10) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _start(
    log: Path, argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> Service:
    out: IO[bytes]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env or _ENV, cwd=cwd
        )
    return Service(proc, log)


@dataclass
class Setup:
    """Credentials made with the commands themselves, for a private subject prefix."""

    dir: Path
    nats_url: str
    prefix: str
    secret_file: Path
    key_file: Path
    trust_store: Path
    identity_file: Path

    def token(self, *clusters: str, ttl: int = 3600) -> str:
        args: list[str | Path] = ["token", "--secret-file", self.secret_file, "--sub", "alice"]
        for cluster in clusters:
            args += ["--cluster", cluster]
        args += ["--ttl", str(ttl)]
        done = _run("sealstream-proxy", *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def proxy(self) -> Service:
        return _start(
            self.dir / f"proxy-{secrets.token_hex(2)}.log",
            _cmd(
                "sealstream-proxy",
                "--nats-url",
                self.nats_url,
                "--prefix",
                self.prefix,
                "--token-secret-file",
                self.secret_file,
            ),
        )

    def producer(self, source: str = "http_events", cluster: str = CLUSTER) -> Service:
        return _start(
            self.dir / f"producer-{secrets.token_hex(2)}.log",
            _cmd(
                "sealstream-producer",
                "--cluster",
                cluster,
                "--nats-url",
                self.nats_url,
                "--prefix",
                self.prefix,
                "--key-file",
                self.key_file,
                "--source",
                source,
                "--rate",
                "200",
            ),
        )

    def consume(
        self, *args: str | Path, token: str, trust_store: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return _run(
            "sealstream-consume",
            "--output",
            "jsonl",
            "--key",
            "x25519",
            "--nats-url",
            self.nats_url,
            "--prefix",
            self.prefix,
            "--token",
            token,
            "--trust-store",
            trust_store or self.trust_store,
            "--identity",
            self.identity_file,
            *args,
        )


@pytest.fixture(scope="module")
def setup(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """Token secret, cluster key (``sealstream-producer key``), a trust store that pins it
    (``sealstream-consume trust add``), and a user identity (``sealstream-consume identity
    create``) that the cluster authorizes (``sealstream-producer authorize add``)."""
    d = tmp_path_factory.mktemp("cli")
    secret_file = d / "token-secret"
    secret_file.write_text(secrets.token_hex(32) + "\n", encoding="ascii")
    key_file = d / "cluster-key.jwk"
    shown = _run("sealstream-producer", "key", "--key-file", key_file)
    assert shown.returncode == 0, shown.stderr
    jwk_file = d / "cluster.pub.jwk"
    jwk_file.write_text(shown.stdout, encoding="utf-8")
    trust_store = d / "trust.json"
    pinned = _run(
        "sealstream-consume",
        "trust",
        "add",
        "--cluster",
        CLUSTER,
        "--jwk-file",
        jwk_file,
        "--trust-store",
        trust_store,
    )
    assert pinned.returncode == 0, pinned.stderr
    identity_file = d / "identity.jwk"
    made = _run("sealstream-consume", "identity", "create", "--file", identity_file)
    assert made.returncode == 0, made.stderr
    public = d / "identity.pub.jwk"
    public.write_text(made.stdout, encoding="utf-8")
    added = _run(
        "sealstream-producer",
        "authorize",
        "add",
        "--key-file",
        key_file,
        "--jwk-file",
        public,
        "--stream",
        "http_events",
        *("--stream", "otlp_traces", "--stream", "otlp_metrics", "--stream", "otlp_logs"),
        "--name",
        "alice",
    )
    assert added.returncode == 0, added.stderr
    return Setup(
        d, nats_url, f"t{secrets.token_hex(4)}", secret_file, key_file, trust_store, identity_file
    )


@pytest.fixture(scope="module")
def backend(setup: Setup) -> Iterator[tuple[Service, Service]]:
    """``sealstream-proxy`` and ``sealstream-producer`` running, for the module."""
    proxy, producer = setup.proxy(), setup.producer()
    try:
        proxy.wait_for("proxy.started")
        producer.wait_for("producer.started")
        yield proxy, producer
    finally:
        proxy.kill()
        producer.kill()


# --- credentials --------------------------------------------------------------------------


def test_token_command_mints_a_verifiable_token(setup: Setup) -> None:
    token = setup.token(CLUSTER, "other")
    secret = setup.secret_file.read_bytes().rstrip(b"\n")
    claims = TokenVerifier(secret=secret).verify(token)
    assert claims.sub == "alice"
    assert claims.clusters == (CLUSTER, "other")
    assert claims.exp - time.time() == pytest.approx(3600, abs=60)


def test_key_command_prints_the_public_key_only(setup: Setup) -> None:
    shown = _run("sealstream-producer", "key", "--key-file", setup.key_file)
    assert shown.returncode == 0, shown.stderr
    jwk = json.loads(shown.stdout)
    assert jwk["kty"] == "OKP"
    assert jwk["crv"] == "Ed25519"
    assert jwk["x"]
    assert "d" not in jwk
    # the private key stays in its file, readable by its owner only
    assert "d" in json.loads(setup.key_file.read_text(encoding="utf-8"))
    assert stat.S_IMODE(setup.key_file.stat().st_mode) == 0o600
    # the same key every time: the file is reused, never overwritten
    again = _run("sealstream-producer", "key", "--key-file", setup.key_file)
    assert json.loads(again.stdout) == jwk


def test_trust_add_pins_the_cluster_key(setup: Setup) -> None:
    store = json.loads(setup.trust_store.read_text(encoding="utf-8"))
    jwk = json.loads(_run("sealstream-producer", "key", "--key-file", setup.key_file).stdout)
    assert store["clusters"][CLUSTER] == [jwk]
    listed = _run("sealstream-consume", "trust", "list", "--trust-store", setup.trust_store)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith(f"{CLUSTER}\t")


# --- consuming ------------------------------------------------------------------------------


def test_consume_prints_decrypted_rows(setup: Setup, backend: tuple[Service, Service]) -> None:
    done = setup.consume(
        "--cluster",
        CLUSTER,
        "--stream",
        "http_events",
        "--limit",
        "20",
        "--retry",
        "10",
        token=setup.token(CLUSTER),
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 20
    for line in lines:
        record = json.loads(line)
        assert record["stream"] == "http_events"
        assert isinstance(record["seq"], int)
        assert isinstance(record["ts"], int)
        row = record["row"]
        assert row["req_method"] in {"GET", "POST", "PUT", "DELETE"}
        assert isinstance(row["resp_status"], int)


def test_consume_in_group_mode(setup: Setup, backend: tuple[Service, Service]) -> None:
    """``--key-mode group``: the rows come as group batches (sealed once for all readers)."""
    done = setup.consume(
        "--cluster",
        CLUSTER,
        "--stream",
        "http_events",
        "--key-mode",
        "group",
        "--policy",
        "fail",
        "--limit",
        "10",
        "--retry",
        "10",
        token=setup.token(CLUSTER),
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == 10
    assert {r["stream"] for r in records} == {"http_events"}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_otlp_in_through_the_producer_and_out_through_consume_export(
    setup: Setup, tmp_path: Path, protocol: str
) -> None:
    """``sealstream-producer --source otlp:HOST:HTTP_PORT:GRPC_PORT`` takes an SDK
    application's OTLP; ``sealstream-consume export`` re-exports it, unchanged, to an OTLP
    endpoint, over OTLP/HTTP or OTLP/gRPC."""
    otlp = dataclasses.replace(setup, prefix=f"t{secrets.token_hex(4)}")
    services = [otlp.proxy(), otlp.producer("otlp:127.0.0.1:0:0")]
    grpc = protocol == "grpc"
    try:
        await asyncio.to_thread(services[0].wait_for, "proxy.started")
        await asyncio.to_thread(services[1].wait_for, "protocol=grpc")
        pattern = r"otlp\.listening.*port=(\d+) protocol=(\w+)"
        ports = {name: port for port, name in re.findall(pattern, _text(services[1].log))}
        async with OtlpSink() as sink:
            services.append(
                _start(
                    tmp_path / "export.log",
                    _cmd(
                        "sealstream-consume",
                        *("--key", "x25519", "--nats-url", otlp.nats_url, "--prefix"),
                        *(otlp.prefix, "--token", otlp.token(CLUSTER), "--identity"),
                        *(otlp.identity_file, "--trust-store", otlp.trust_store),
                        *("--cluster", CLUSTER, "--retry", "10", "--log-level", "info"),
                        *("export", "--otlp-endpoint", sink.grpc_url if grpc else sink.url),
                        *("--protocol", "grpc" if grpc else "http/protobuf"),
                        *("--header", "X-Tenant=t-1"),
                    ),
                )
            )
            await asyncio.to_thread(services[2].wait_for, "session.opened")
            endpoint = f"127.0.0.1:{ports['grpc']}" if grpc else f"http://127.0.0.1:{ports['http']}"
            sent = await run_app(endpoint, tmp_path / "sent", "cli", protocol=protocol)
            await asyncio.wait_for(sink.wait_for(len(sent)), 30)
            assert services[2].interrupt() == 0
        expected = [(f"/{s.service}/Export" if grpc else s.path, b) for s, b in sent]
        assert [(r.path, r.body) for r in sink.received] == expected
        assert {r.headers["x-tenant" if grpc else "X-Tenant"] for r in sink.received} == {"t-1"}
        summary = f"exported {len(sent)} OTLP requests, undelivered 0; lost 0, dropped 0"
        assert summary in _text(services[2].log)
    finally:
        for service in services:
            service.kill()


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert done.stdout == ""
    return errors[0]


def test_consume_with_a_bad_token_fails_clearly(
    setup: Setup, backend: tuple[Service, Service]
) -> None:
    head, _, sig = setup.token(CLUSTER).rpartition(".")
    forged = f"{head}.{'B' if sig[0] == 'A' else 'A'}{sig[1:]}"  # its signature changed
    line = _one_error_line(setup.consume("--cluster", CLUSTER, *STREAM, token=forged))
    assert "unauthorized" in line


def test_consume_on_a_cluster_the_token_does_not_allow_fails_clearly(
    setup: Setup, backend: tuple[Service, Service]
) -> None:
    line = _one_error_line(setup.consume("--cluster", CLUSTER, *STREAM, token=setup.token("other")))
    assert "forbidden" in line


def test_consume_with_an_identity_the_cluster_does_not_authorize_fails_clearly(
    setup: Setup, backend: tuple[Service, Service]
) -> None:
    stranger = setup.dir / "stranger.jwk"
    made = _run("sealstream-consume", "identity", "create", "--file", stranger)
    assert made.returncode == 0, made.stderr
    done = setup.consume(
        "--cluster", CLUSTER, *STREAM, "--identity", stranger, token=setup.token(CLUSTER)
    )
    line = _one_error_line(done)
    assert line.startswith("error: forbidden: key not authorized: give the cluster's operator")
    assert "identity show" in line  # what to do about it


def test_consume_on_an_unknown_cluster_fails_clearly(
    setup: Setup, backend: tuple[Service, Service]
) -> None:
    done = setup.consume(
        "--cluster", "nobody", *STREAM, "--retry", "0", token=setup.token("nobody")
    )
    assert "cluster_unavailable" in _one_error_line(done)


def test_consume_with_an_untrusted_cluster_key_fails_clearly(
    setup: Setup, backend: tuple[Service, Service]
) -> None:
    other = setup.dir / "other-trust.json"
    TrustStore.load(other).add("other", ClusterIdentity.generate().public_jwk)
    done = setup.consume(
        "--cluster", CLUSTER, *STREAM, token=setup.token(CLUSTER), trust_store=other
    )
    line = _one_error_line(done)
    assert "trust" in line
    assert CLUSTER in line


def test_whoami_and_streams_say_what_the_cluster_grants(
    setup: Setup, backend: tuple[Service, Service]
) -> None:
    """Asked of the cluster: a stream offered and granted, one offered and not granted (a
    second cluster's producer offers ``orders``, which the policy does not grant), and the one
    line that says why when the cluster cannot be asked."""
    records = setup.dir / "orders.jsonl"
    records.write_text('{"n": 1}\n', encoding="utf-8")
    trust = setup.dir / "two-clusters.json"
    store = TrustStore.load(trust)
    for cluster in (CLUSTER, "c2"):
        store.add(cluster, ClusterIdentity.load(setup.key_file).public_jwk)
    producer = setup.producer(f"jsonl:{records}:orders", cluster="c2")
    try:
        producer.wait_for("producer.started")
        token = setup.token(CLUSTER, "c2")
        done = setup.consume("--cluster", "c2", "streams", token=token, trust_store=trust)
        assert (done.returncode, done.stderr) == (0, "")
        assert done.stdout.splitlines() == ["orders  not granted"]
        done = setup.consume("--cluster", CLUSTER, "streams", token=token, trust_store=trust)
        assert done.stdout.splitlines() == ["http_events  granted"]
        done = setup.consume("--cluster", CLUSTER, "whoami", token=token, trust_store=trust)
        assert done.returncode == 0, done.stderr
        assert "granted by cluster c1  http_events (granted)" in done.stdout.splitlines()
        done = setup.consume("--cluster", "c2", "whoami", token=token, trust_store=trust)
        assert "granted by cluster c2  nothing (offers orders)" in done.stdout.splitlines()
    finally:
        producer.kill()
    stranger = setup.dir / "stranger-grants.jwk"
    assert _run("sealstream-consume", "identity", "create", "--file", stranger).returncode == 0
    done = setup.consume(
        "--cluster", CLUSTER, "--identity", stranger, "whoami", token=token, trust_store=trust
    )
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stdout.splitlines() if line.startswith("granted by")]
    assert said == [
        "granted by cluster c1  unknown (forbidden: key not authorized: give the cluster's "
        "operator your public key ('sealstream-consume identity show' prints it) for "
        "'sealstream-producer authorize add')"
    ]
    done = setup.consume(
        "--cluster", CLUSTER, "--identity", stranger, "streams", token=token, trust_store=trust
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: forbidden: key not authorized: give")
    assert len(done.stderr.splitlines()) == 1


async def test_consume_shows_a_relays_forgeries_by_reason_at_exit(
    setup: Setup, backend: tuple[Service, Service]
) -> None:
    """Under ``--policy discard`` (the default) what a relay forges is refused, the rows go on,
    and the exit summary (stderr; stdout holds the rows) says which envelopes were refused
    and why."""
    async with Tap(setup.nats_url, f"{setup.prefix}.inbox.>") as tap:
        consumed = asyncio.create_task(
            asyncio.to_thread(
                setup.consume,
                *("--cluster", CLUSTER, *STREAM, "--duration", "6", "--retry", "10"),
                token=setup.token(CLUSTER),
            )
        )
        deadline = time.monotonic() + 20
        while len(tap.messages) < 3:  # the key envelope and data
            assert not consumed.done(), consumed.result().stderr
            assert time.monotonic() < deadline, "no envelope reached the consumer's inbox"
            await asyncio.sleep(0.05)
        genuine = tap.messages[-1]
        nc = await connect(setup.nats_url, name="hostile-relay")
        try:
            for payload in (b"\x80", msgpack.packb({"rows": [{"req_path": "FORGED"}]})):
                await nc.publish(genuine.subject, payload)  # garbage, then plaintext
            await nc.publish(genuine.subject, genuine.data)  # replayed
            await nc.flush()
        finally:
            await nc.close()
        done = await consumed
    assert done.returncode == 0, done.stderr
    assert "FORGED" not in done.stdout
    assert len(done.stdout.splitlines()) > 10  # the rows went on
    summary = done.stderr.splitlines()[-1]
    assert summary.startswith("rejected 3 (malformed 2, replay 1), lost 0, dropped 0"), summary


# --- stopping ---------------------------------------------------------------------------------


def test_sigint_stops_proxy_and_producer_cleanly(setup: Setup) -> None:
    # a cluster of its own: one producer serves a cluster (the module's backend serves c1)
    proxy, producer = setup.proxy(), setup.producer(cluster="c-sigint")
    try:
        proxy.wait_for("proxy.started")
        producer.wait_for("producer.started")
        assert producer.interrupt() == 0
        assert proxy.interrupt() == 0
    finally:
        proxy.kill()
        producer.kill()
    for service, stopped in ((proxy, "proxy.stopped"), (producer, "producer.stopped")):
        text = _text(service.log)
        assert "Traceback" not in text
        assert stopped in text


# --- sealstream up | demo -------------------------------------------------------------------


def _descendants(pid: int) -> dict[int, str]:
    try:
        return {p.pid: p.name() for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_demo_prints_decrypted_rows(tmp_path: Path) -> None:
    """``sealstream demo`` starts its own nats-server, proxy and producer, shows 5 decrypted
    rows, and leaves no process behind."""
    out = tmp_path / "demo.out"
    err = tmp_path / "demo.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            _cmd(
                "sealstream",
                "demo",
                "--output",
                "jsonl",
                "--limit",
                "5",
                "--key",
                "x25519",
                "--sources",
                "http_events",
                "--dir",
                tmp_path / "state",
            ),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=_ENV,
            cwd=tmp_path,
        )
    children: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            children.update(_descendants(proc.pid))
            time.sleep(0.05)
        assert proc.poll() == 0, _text(err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in _text(err)
    lines = _text(out).splitlines()
    assert len(lines) == 5
    for line in lines:
        record = json.loads(line)
        assert record["stream"] == "http_events"
        assert isinstance(record["row"]["latency_ns"], int)
    assert any("nats-server" in name for name in children.values()), children
    _wait_for(
        lambda: not any(_alive(pid) for pid in children),
        timeout=5,
        what=f"children of demo to exit: {children}",
    )


def test_up_stops_with_its_children_on_sigint(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "config"  # where up writes its context
    env = {**_ENV, "XDG_CONFIG_HOME": str(config)}
    up = _start(
        tmp_path / "up.log", _cmd("sealstream", "up", "--dir", state), cwd=tmp_path, env=env
    )
    children: dict[int, str] = {}
    try:
        up.wait_for("sealstream is up", timeout=30)
        _wait_for(
            lambda: (
                "proxy.started" in _text(state / "proxy.log")
                and "producer.started" in _text(state / "producer.log")
            ),
            timeout=30,
            what="proxy and producer to start",
            proc=up.proc,
        )
        children = _descendants(up.proc.pid)
        assert len(children) >= 3, children  # nats-server, proxy, producer
        assert up.interrupt(timeout=20) == 0
        _wait_for(
            lambda: not any(_alive(pid) for pid in children),
            timeout=5,
            what=f"children of up to exit: {children}",
        )
    finally:
        up.kill()
        for pid in children:  # clean up after a failure; they are gone on success
            if _alive(pid):
                psutil.Process(pid).kill()
    assert "Traceback" not in _text(up.log)
    # they stopped on their own, cleanly, before up returned
    assert "proxy.stopped" in _text(state / "proxy.log")
    assert "producer.stopped" in _text(state / "producer.log")
    # consumers log in through the auth callout, answered by the proxy: no consumer password
    assert "auth.serving" in _text(state / "proxy.log")
    assert (state / "callout-issuer.nk").stat().st_mode & 0o777 == 0o600
    conf = _text(state / "nats.conf")
    assert "auth_callout" in conf
    assert 'user: "consumer"' not in conf
    assert not (state / "nats-consumer.password").exists()
    assert "@" not in _text(state / "consumer.url")
    context = json.loads(_text(config / "sealstream" / "context" / "demo.json"))
    assert context["nats_url"] == _text(state / "consumer.url")
    assert context["streams"] == ["http_events", "host_metrics"]
    assert _text(config / "sealstream" / "context.txt") == "demo\n"


def test_jsonl_output_keeps_envelope_fields_apart_from_columns() -> None:
    """A column named ``stream`` or ``seq`` cannot relabel a row: those fields come from the
    authenticated header, the row is nested. Bytes are written as base64, and what JSON (or
    the table) cannot hold as msgpack gives it, bytes map keys and NaN, is still shown."""
    out = io.StringIO()
    rows = [{"stream": "spoofed", "seq": 999, "raw": b"\x00\x01"}]
    JsonLinesWriter(out).add(Batch("http_events", 7, 1_700_000_000_000_000_000, rows))
    record = json.loads(out.getvalue())
    assert record == {
        "stream": "http_events",
        "seq": 7,
        "ts": 1_700_000_000_000_000_000,
        "row": {"stream": "spoofed", "seq": 999, "raw": "AAE="},
    }
    # what JSON cannot hold as it is (msgpack allows bytes map keys, NaN): still one line
    out = io.StringIO()
    odd = [{"m": {b"\x00": [float("nan"), float("inf")], 3: True}}]
    JsonLinesWriter(out).add(Batch("http_events", 8, 1, odd))
    assert json.loads(out.getvalue())["row"] == {"m": {"AA==": ["nan", "inf"], "3": True}}
    table = LiveTable("c1", "s")
    bytes_keyed: dict[Any, Any] = {b"time_raw": 1, "time_": 2 * 10**18}
    table.add(Batch("http_events", 9, 1, [bytes_keyed]))
    rendered = io.StringIO()
    Console(file=rendered, width=120).print(table.render())
    assert "dGltZV9yYXc=" in rendered.getvalue()  # the bytes column name, as base64


@pytest.mark.parametrize(
    ("parser", "argv", "expected"),
    [
        (proxy_parser, ["--token-secret-file", "s", "--keepalive", "3", "run"], {"keepalive": 3.0}),
        (proxy_parser, ["run", "--token-secret-file", "s"], {"keepalive": None}),
        (producer_parser, ["--cluster", "demo", "--rate", "7", "run"], {"rate": 7.0}),
        (producer_parser, ["run", "--cluster", "demo"], {"rate": 50.0}),
    ],
)
def test_options_before_or_after_run_are_kept(
    parser: Callable[[], argparse.ArgumentParser], argv: list[str], expected: dict[str, Any]
) -> None:
    """``--opt x run`` once lost ``--opt``: the subcommand's defaults overwrote it."""
    args = parser().parse_args(argv)
    assert args.command == "run"
    given = {"token_secret_file": Path("s")} if parser is proxy_parser else {"cluster": "demo"}
    assert {k: getattr(args, k) for k in (*given, *expected)} == {**given, **expected}
    assert args.log_level == "info"
    assert args.log_json is False


def test_the_otlp_source_names_its_addresses() -> None:
    assert otlp_config(["http_events"]) is None
    assert otlp_config(["otlp"]) == OtlpConfig(port=4318, grpc_port=4317)
    assert otlp_config(["otlp:0.0.0.0"]) == OtlpConfig(host="0.0.0.0", grpc_port=4317)
    assert otlp_config(["otlp:h:0:off"]) == OtlpConfig(host="h", port=0, grpc_port=None)
    assert otlp_config(["otlp:h:1:2"]) == OtlpConfig(host="h", port=1, grpc_port=2)
    assert otlp_config(["otlp"], token="t") == OtlpConfig(grpc_port=4317, token="t")
    for bad in (["otlp:h:x"], ["otlp:h:1:-2"], ["otlp:h:1:2:3"], ["otlp", "otlp:h"]):
        with pytest.raises(ValueError, match="otlp"):
            otlp_config(bad)


def test_sources_before_and_after_run_are_joined() -> None:
    def specs(*argv: str, env: dict[str, str] | None = None) -> list[str]:
        return source_specs(producer_parser().parse_args(argv), env or {})

    assert specs("--source", "a", "run", "--source", "b") == ["a", "b"]
    assert specs("run", "--source", "b") == ["b"]
    assert specs("--source", "a") == ["a"]
    assert specs("run", env={"SEALSTREAM_SOURCES": "x,y"}) == ["x", "y"]
    assert specs() == ["http_events", "host_metrics"]


def test_demo_on_a_pipe_prints_rows_as_lines_while_it_runs(tmp_path: Path) -> None:
    """Without ``--output``, a stdout that is not a terminal gets JSON lines as rows arrive,
    not a live table that shows nothing until the end."""
    out = tmp_path / "demo.out"
    with out.open("wb") as stdout:
        proc = subprocess.Popen(
            _cmd(
                "sealstream",
                "demo",
                "--key",
                "x25519",
                "--sources",
                "http_events",
                "--dir",
                tmp_path / "state",
            ),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            env=_ENV,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 60
        while len(_text(out).splitlines()) < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, "demo exited"
            time.sleep(0.1)
        assert proc.poll() is None  # still running: the lines came while it streams
        lines = _text(out).splitlines()
        assert len(lines) >= 3
        assert json.loads(lines[0])["stream"] == "http_events"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "Ctrl-C ends demo as it ends every command"


def test_up_serves_your_own_records_from_a_file_and_from_its_stdin(tmp_path: Path) -> None:
    """``up --sources jsonl:FILE:orders,jsonl:-:events``: the printed command names every
    stream; the file's records wait for the stream's first reader, who gets them all, exactly
    (nanosecond integers included); what is piped into ``up`` is read as it comes."""
    orders = [{"id": n, "total": 9.5, "ts": 1_796_588_367_312_858_562 + n} for n in range(5)]
    (tmp_path / "orders.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in orders), encoding="utf-8"
    )
    env = {**_ENV, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    sources = "jsonl:orders.jsonl:orders,jsonl:-:events"
    with (tmp_path / "up.log").open("wb") as log:
        up = subprocess.Popen(
            _cmd("sealstream", "up", "--dir", tmp_path / "state", "--sources", sources),
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=log,
            env=env,
            cwd=tmp_path,
        )
    pipe = up.stdin
    assert pipe is not None
    stop = threading.Event()

    def feed() -> None:  # a live source: an event every 50 ms until the reader has its rows
        n = 0
        with contextlib.suppress(BrokenPipeError):
            while not stop.wait(0.05):
                pipe.write(json.dumps({"kind": "login", "n": n}).encode() + b"\n")
                pipe.flush()
                n += 1

    feeder = threading.Thread(target=feed)
    try:
        _wait_for(
            lambda: "Ctrl-C stops everything." in _text(tmp_path / "up.log"),
            timeout=60,
            what="up to be ready",
            proc=up,
        )
        assert "--stream orders --stream events\n" in _text(tmp_path / "up.log")
        feeder.start()
        rows = {}
        for stream, limit in (("orders", len(orders)), ("events", 3)):
            done = subprocess.run(
                [
                    *_cmd("sealstream-consume", "--stream", stream, "--output", "jsonl"),
                    "--limit",
                    str(limit),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            rows[stream] = [json.loads(line)["row"] for line in done.stdout.splitlines()]
        assert rows["orders"] == orders
        numbers = [r["n"] for r in rows["events"]]
        assert numbers == sorted(numbers)
        assert len(numbers) == 3
    finally:
        stop.set()
        if feeder.is_alive():
            feeder.join()
        pipe.close()
        up.send_signal(signal.SIGINT)
        try:
            assert up.wait(timeout=30) == 0
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()


def test_up_gives_the_otlp_receiver_free_ports_when_those_asked_for_are_taken() -> None:
    assert otlp_ports("http_events,host_metrics") == ("http_events,host_metrics", None, None)
    assert source_streams("http_events,otlp:127.0.0.1:0:off") == ["http_events", *OTLP_STREAMS]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sources, endpoint, grpc = otlp_ports(f"http_events,otlp:127.0.0.1:{port}:{port}")
    assert endpoint is not None
    assert grpc is not None
    free = int(endpoint.rpartition(":")[2])
    assert port not in (free, grpc)
    assert sources == f"http_events,otlp:127.0.0.1:{free}:{grpc}"
    assert endpoint == f"http://127.0.0.1:{free}"
    assert otlp_ports("otlp:127.0.0.1:0:off")[2] is None


async def test_up_otlp_takes_an_sdk_export_and_a_consumer_reads_it(tmp_path: Path) -> None:
    """``sealstream up --otlp``: the printed ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes the
    OpenTelemetry SDK's exports, the policy grants the OTLP streams to the local identity,
    and the printed consume command reads each export request back, unchanged."""
    env = {**_ENV, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    up = _start(
        tmp_path / "up.log",
        _cmd("sealstream", "up", "--dir", tmp_path / "state", "--sources", "http_events", "--otlp"),
        cwd=tmp_path,
        env=env,
    )
    services = [up]
    try:
        await asyncio.to_thread(up.wait_for, "Ctrl-C stops everything.", 60)
        said = _text(up.log)
        endpoint = re.search(
            r"export OTEL_EXPORTER_OTLP_ENDPOINT=(http://127\.0\.0\.1:\d+)\n", said
        )
        assert endpoint is not None, said
        printed = re.search(r"\n  (\S*sealstream-consume .*)\n", said)
        assert printed is not None, said
        argv = printed[1].split()
        assert argv[1:] == [
            *("--stream", "http_events"),
            *("--stream", "otlp_traces"),
            *("--stream", "otlp_metrics"),
            *("--stream", "otlp_logs"),
        ]
        # the printed command, less http_events (rows of its own, at their rate)
        reader = _start(
            tmp_path / "rows.jsonl",
            [*argv[:1], *argv[3:], "--output", "jsonl"],
            cwd=tmp_path,
            env=env,
        )
        services.append(reader)
        producer_log = tmp_path / "state" / "producer.log"
        await asyncio.to_thread(
            _wait_for,
            lambda: "session.opened" in _text(producer_log),
            timeout=60,
            what="the reader's session",
            proc=reader.proc,
        )
        sent = await run_app(endpoint[1], tmp_path / "sent", "up-otlp")
        assert {s.name for s, _ in sent} == {"traces", "metrics", "logs"}

        def rows() -> list[dict[str, Any]]:
            lines = _text(reader.log).splitlines()
            return [json.loads(line) for line in lines if line.startswith("{")]

        await asyncio.to_thread(
            _wait_for, lambda: len(rows()) >= len(sent), timeout=60, what="the rows"
        )
        got = [(r["stream"], base64.b64decode(r["row"]["otlp"])) for r in rows()]
        assert sorted(got) == sorted((s.stream, body) for s, body in sent)
        assert reader.interrupt() == 0
    finally:
        reader_and_up = services[::-1]
        for service in reader_and_up:  # Ctrl-C: up stops its children
            if service.proc.poll() is None:
                service.proc.send_signal(signal.SIGINT)
                try:
                    service.proc.wait(timeout=30)
                finally:
                    service.kill()
    assert up.proc.returncode == 0, _text(up.log)


async def test_demo_otlp_shows_an_sdk_export_in_its_view(tmp_path: Path) -> None:
    """``sealstream demo --otlp``: the view reads the OTLP streams too (lines, piped), and
    says where applications export to (on stderr, apart from the rows)."""
    env = {**_ENV, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    argv = _cmd("sealstream", "demo", "--dir", tmp_path / "state", "--sources", "host_metrics")
    out, err = tmp_path / "rows.jsonl", tmp_path / "demo.err"
    with out.open("wb") as rows_file, err.open("wb") as err_file:
        demo = subprocess.Popen(  # noqa: ASYNC220 - one child, started once
            [*argv, "--otlp", "--output", "jsonl"],
            stdin=subprocess.DEVNULL,
            stdout=rows_file,
            stderr=err_file,
            env=env,
            cwd=tmp_path,
        )
    try:
        pattern = re.compile(r"export OTEL_EXPORTER_OTLP_ENDPOINT=(http://127\.0\.0\.1:\d+)\n")
        producer_log = tmp_path / "state" / "producer.log"
        await asyncio.to_thread(
            _wait_for,
            lambda: (
                pattern.search(_text(err)) is not None and "session.opened" in _text(producer_log)
            ),
            timeout=60,
            what="the demo's view",
            proc=demo,
        )
        endpoint = pattern.search(_text(err))
        assert endpoint is not None
        sent = await run_app(endpoint[1], tmp_path / "sent", "demo-otlp")

        def otlp() -> list[tuple[str, bytes]]:
            rows = [json.loads(line) for line in _text(out).splitlines()]
            return [
                (r["stream"], base64.b64decode(r["row"]["otlp"]))
                for r in rows
                if "otlp" in r["row"]
            ]

        await asyncio.to_thread(
            _wait_for, lambda: len(otlp()) >= len(sent), timeout=60, what="rows"
        )
        assert sorted(otlp()) == sorted((s.stream, body) for s, body in sent)
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(demo.wait, 30)
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
    assert demo.returncode == 0, _text(err)
