"""The embedded nats-server and the client plumbing, against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from structlog.testing import capture_logs

from sealstream.errors import BrokerError
from sealstream.nats import connect, redact_url, settle
from sealstream.server import EmbeddedServer, ServerOptions, find_nats_server, free_port


def _info(port: int) -> dict[str, Any]:
    """The INFO the server sends to a new TCP client."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        buf = b""
        while b"\r\n" not in buf:
            chunk = sock.recv(4096)
            assert chunk, "server closed the connection before INFO"
            buf += chunk
    line = buf.split(b"\r\n", 1)[0]
    assert line.startswith(b"INFO ")
    info: dict[str, Any] = json.loads(line[5:])
    return info


def test_find_nats_server() -> None:
    path = find_nats_server()
    assert path.name.startswith("nats-server")
    assert path.is_file()


def test_start_stop_is_idempotent() -> None:
    server = EmbeddedServer()
    url = server.start()
    try:
        assert url == server.url == f"nats://127.0.0.1:{server.port}"
        assert server.running
        assert server.pid > 0
        assert _info(server.port)["jetstream"] is True
        with pytest.raises(RuntimeError):
            server.start()
    finally:
        server.stop()
    server.stop()
    assert not server.running
    with pytest.raises(RuntimeError):
        _ = server.pid
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_stop_without_start_is_a_no_op() -> None:
    """Stopping a server never started leaves it as it was: not running, and startable."""
    server = EmbeddedServer()
    server.stop()
    assert not server.running
    with pytest.raises(RuntimeError):
        _ = server.pid
    server.start()
    try:
        assert server.running
    finally:
        server.stop()
    assert not server.running


async def test_async_context_manager() -> None:
    async with EmbeddedServer(ServerOptions(jetstream=False)) as server:
        client = await connect(server.url, name="test-ctx")
        try:
            assert client.is_connected
        finally:
            await client.drain()
    assert not server.running


async def test_publish_subscribe_round_trip(nc: Any) -> None:
    sub = await nc.subscribe("test.round.trip")
    await nc.publish("test.round.trip", b"hello")
    msg = await sub.next_msg(timeout=5)
    assert msg.data == b"hello"
    await sub.unsubscribe()


async def test_settle_pings_after_the_subscription_is_on_the_wire(nats_url: str) -> None:
    """``settle`` returns on the PONG to a PING sent after the SUB: the server has registered
    the subscription before any other connection is told to use it. One ``flush`` is not
    that (nats-py writes its PING ahead of the queued SUB): a proxy that had just started
    answered a request with "no responders". Checked on the bytes the client sent."""
    sent = bytearray()
    relays: list[asyncio.Task[None]] = []
    upstream = urlsplit(nats_url)

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, tap: bool) -> None:
        while data := await src.read(65536):
            if tap:
                sent.extend(data)
            dst.write(data)
            await dst.drain()
        dst.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(upstream.hostname, upstream.port)
        relays.append(asyncio.create_task(pipe(reader, up_writer, tap=True)))
        relays.append(asyncio.create_task(pipe(up_reader, writer, tap=False)))

    listener = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    client = await connect(f"nats://127.0.0.1:{port}", name="test-settle")
    try:
        before = len(sent)  # the handshake, complete: connect waited for its PONG
        await client.subscribe("test.settle", cb=_pong)
        await settle(client)
        wire = bytes(sent[before:])
        assert wire.index(b"SUB test.settle ") < wire.rindex(b"PING\r\n"), wire
    finally:
        await client.close()
        listener.close()
        await listener.wait_closed()
        async with asyncio.timeout(5):
            await asyncio.gather(*relays)


async def _pong(msg: Any) -> None:
    await msg.respond(b"pong")


async def _stopped(pid: int) -> None:
    """Return once every thread of ``pid`` is stopped: ``kill`` only queues SIGSTOP, and a
    thread running on another core answers a PING sent meanwhile."""
    async with asyncio.timeout(5):
        while not _all_stopped(pid):
            await asyncio.sleep(0.01)


def _all_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (``T``); one that has exited counts."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            state = (task / "stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            continue
        if state not in ("T", "t"):
            return False
    return True


async def test_settle_on_a_server_that_does_not_answer_is_a_passing_broker_error() -> None:
    """A server stalled after the connection was made (SIGSTOP: a real process that stops
    answering) makes ``settle`` raise the project's passing error, not nats-py's timeout: a
    session's open retries it (a flush timing out there ended a consumer's subscription)."""
    with EmbeddedServer(ServerOptions(jetstream=False)) as server:
        client = await connect(server.url, name="test-stalled", connect_timeout=1)
        os.kill(server.pid, signal.SIGSTOP)
        try:
            await _stopped(server.pid)
            with pytest.raises(BrokerError, match="did not answer") as caught:
                await settle(client, timeout_s=1)
            assert caught.value.retriable
        finally:
            os.kill(server.pid, signal.SIGCONT)
            await client.close()


async def test_jetstream_is_enabled(nc: Any) -> None:
    info = await nc.jetstream().account_info()
    assert info.limits is not None


async def test_connect_to_closed_port_raises_broker_error() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(BrokerError, match="cannot reach NATS at") as caught:
        await connect(f"nats://127.0.0.1:{port}", name="test-refused", connect_timeout=1)
    assert time.monotonic() - started < 3
    assert caught.value.retriable
    assert caught.value.__cause__ is not None


async def test_connect_error_hides_password() -> None:
    port = free_port()
    with pytest.raises(BrokerError) as caught:
        await connect(f"nats://bob:s3cret@127.0.0.1:{port}", name="t", connect_timeout=0.5)
    assert "s3cret" not in str(caught.value)
    assert redact_url("nats://bob:s3cret@h:1") == "nats://h:1"


async def test_restarted_server_on_same_port_is_reached_by_reconnect(tmp_path: Path) -> None:
    first = EmbeddedServer(ServerOptions(store_dir=tmp_path / "js"))
    first.start()
    port = first.port
    reconnected = {"sub": asyncio.Event(), "pub": asyncio.Event()}

    def on_reconnect(role: str) -> Any:
        async def cb() -> None:
            reconnected[role].set()

        return cb

    second: EmbeddedServer | None = None
    sub_nc = pub_nc = None
    try:
        sub_nc = await connect(first.url, name="test-sub", reconnected_cb=on_reconnect("sub"))
        pub_nc = await connect(first.url, name="test-pub", reconnected_cb=on_reconnect("pub"))
        sub = await sub_nc.subscribe("test.restart")
        await sub_nc.flush()

        await asyncio.to_thread(first.stop)
        second = EmbeddedServer(ServerOptions(port=port, store_dir=tmp_path / "js"))
        assert await asyncio.to_thread(second.start) == f"nats://127.0.0.1:{port}"

        async with asyncio.timeout(10):
            await reconnected["sub"].wait()
            await reconnected["pub"].wait()
        await settle(sub_nc)  # the subscription has been replayed to the new server
        await pub_nc.publish("test.restart", b"after")
        await pub_nc.flush()
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"after"
    finally:
        for client in (pub_nc, sub_nc):
            if client is not None:
                await client.drain()
        first.stop()
        if second is not None:
            second.stop()


def test_bad_config_fails_fast(tmp_path: Path) -> None:
    config = tmp_path / "bad.conf"
    config.write_text("this is { not a config\n")
    log_file = tmp_path / "server.log"
    server = EmbeddedServer(ServerOptions(config_file=config, log_file=log_file))
    started = time.monotonic()
    with pytest.raises(BrokerError, match="exited with code") as caught:
        server.start()
    assert time.monotonic() - started < 5
    assert "Parse error" in str(caught.value)
    assert "Parse error" in log_file.read_text()
    assert not server.running
    server.stop()


def test_port_in_use_fails(nats_server: EmbeddedServer) -> None:
    server = EmbeddedServer(ServerOptions(port=nats_server.port, jetstream=False))
    with pytest.raises(BrokerError, match="exited with code"):
        server.start()


def test_max_payload_is_combined_with_config_file(tmp_path: Path) -> None:
    config = tmp_path / "server.conf"
    config.write_text('server_name: "sealstream-test"\nmax_payload: 5000\n')
    options = ServerOptions(config_file=config, max_payload=2048, jetstream=False)
    with EmbeddedServer(options) as server:
        info = _info(server.port)
    assert info["server_name"] == "sealstream-test"
    assert info["max_payload"] == 2048


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="port"):
        ServerOptions(port=70000)
    with pytest.raises(TypeError):
        ServerOptions(extra_args="-DV")


async def test_slow_consumer_errors_are_rate_limited(nats_url: str) -> None:
    with capture_logs() as logs:
        client = await connect(nats_url, name="test-slow")
        release = asyncio.Event()

        async def stuck(msg: Any) -> None:
            await release.wait()

        await client.subscribe("test.slow", cb=stuck, pending_msgs_limit=1)
        await client.flush()
        for _ in range(200):
            await client.publish("test.slow", b"x")
        await client.flush()
        await asyncio.sleep(0.2)
        release.set()
        await client.close()
    errors = [e for e in logs if e["event"] == "nats.error"]
    closed = [e for e in logs if e["event"] == "nats.closed"]
    assert len(errors) == 1, errors
    assert errors[0]["error_type"] == "SlowConsumerError"
    assert closed[0]["errors_suppressed"] > 100


async def test_wrong_password_is_not_retriable() -> None:
    options = ServerOptions(jetstream=False, extra_args=("--user", "alice", "--pass", "right"))
    async with EmbeddedServer(options) as server:
        with pytest.raises(BrokerError, match="Authorization Violation") as caught:
            await connect(server.url, name="t", user="alice", password="wrong", connect_timeout=1)
        assert not caught.value.retriable
        client = await connect(server.url, name="t", user="alice", password="right")
        await client.drain()


async def test_cancelled_async_start_leaves_no_server() -> None:
    server = EmbeddedServer(ServerOptions(jetstream=False))

    async def enter() -> None:
        async with server:
            await asyncio.sleep(60)

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(enter())
        await asyncio.sleep(0.005)
        task.cancel()
    assert task.cancelled()
    assert not server.running
