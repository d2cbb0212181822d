"""The browser consumer in a real Chromium (Debian's ``chromium``, driven by Playwright; no
browser download): the page served by ``consumers._web`` opens a session over NATS WebSocket,
verifies and decrypts ``http_events`` in the page, refuses a hostile relay's envelopes, and the
wire never carries a plaintext row.

The NATS server here has a WebSocket listener and no authorization, so any user/password is
accepted: the page connects as user = its session id, password = its token, as it will with
the auth callout. The producer holds a policy (``make_stack``): the page's identity key is
authorized the way a user gets it, by the page's registration with a server that owns the
policy (as ``sealstream demo`` does), or by an operator authorizing the key the page shows."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright
from structlog.testing import capture_logs

from broker_proxy import Proxy
from consumers._web import PAGE_KEY_HEADER, WebConfig, WebServer
from producers import (
    Agent,
    HostMetrics,
    HttpEvents,
    OtlpConfig,
    OtlpReceiver,
    Source,
    page_registration,
)
from producers._authz import AuthzPolicy
from sealops._webbench import CHROMIUM, CHROMIUM_ARGS
from sealstream import TokenVerifier
from sealstream.control import Opened, encode
from sealstream.crypto import (
    ClusterIdentity,
    ProducerSession,
    TrustStore,
    UserIdentity,
    encode_rows,
)
from sealstream.jwk import thumbprint
from sealstream.nats import connect
from sealstream.natsconf import Credentials, server_config
from sealstream.natsjwt import AccountKey
from sealstream.otlp import OTLP_STREAMS
from sealstream.server import EmbeddedServer, ServerOptions, free_port
from sealstream.store import Store
from sealstream.wire import notice
from tests.support.otlp_sink import run_app
from tests.support.pipeline import Recording, Stack, Tap, contains_marker, make_stack

BUILD = Path(__file__).resolve().parents[2] / "build"
FORGED = "FORGED-ROW-7d3e"
ROWS_IN_DOM = 'section[data-stream="http_events"] table.rows tbody tr'


@pytest.fixture(scope="module")
def ws_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    conf = tmp_path_factory.mktemp("ws") / "nats.conf"
    conf.write_text('websocket {\n  host: "127.0.0.1"\n  port: -1\n  no_tls: true\n}\n')
    with EmbeddedServer(ServerOptions(config_file=conf)) as server:
        yield server


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    if not await asyncio.to_thread(CHROMIUM.exists):
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's Chromium (apt-get install -y chromium); "
            "the browser test never downloads a browser"
        )
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@contextlib.asynccontextmanager
async def _page(
    browser: Browser, url: str, *, errors: list[str] | None = None, **options: Any
) -> AsyncIterator[Page]:
    """A new page of ``browser`` (``options`` as ``new_page`` takes them) at ``url``, closed
    after; the page's uncaught errors go to ``errors`` when given."""
    page = await browser.new_page(**options)
    try:
        if errors is not None:
            page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(url)
        yield page
    finally:
        await page.close()


def _web(server: EmbeddedServer, st: Stack, **changes: Any) -> WebServer:
    """The page's server for this stack; it registers the page's key in the stack's policy
    (as ``sealstream demo`` does) unless ``authorize=None``."""
    assert server.websocket_url is not None
    options: dict[str, Any] = {
        "nats_ws_url": server.websocket_url,
        "cluster": st.cluster,
        "streams": ["http_events"],
        "token": st.token,
        "trust": st.trust(),
        "prefix": st.prefix,
        "authorize": page_registration(st.policy_file, name="page"),
        **changes,
    }
    return WebServer(WebConfig(**options))


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Poll ``check`` (a bound, not a timing assertion). The page's Content-Security-Policy
    forbids eval, so conditions are read from the DOM here rather than in the page."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("the page did not get there")
        await asyncio.sleep(0.05)


async def _number(page: Page, selector: str) -> int:
    return int(await _text(page, selector) or 0)


async def _text(page: Page, selector: str) -> str:
    return (await page.text_content(selector)) or ""


async def _rows(page: Page) -> int:
    return await _number(page, "#rows")


async def _more(page: Page, selector: str, than: int) -> bool:
    return await _number(page, selector) > than


async def _genuine_inbox(tap: Tap, inbox: str) -> list[bytes]:
    await tap.flush()
    return [m.data for m in tap.on(inbox)]


def _repack(payload: bytes, **changes: Any) -> bytes:
    m = msgpack.unpackb(payload, raw=False)
    m.update(changes)
    return msgpack.packb(m, use_bin_type=True)


def _flip_body(payload: bytes) -> bytes:
    m = msgpack.unpackb(payload, raw=False)
    body = bytearray(m["body"])
    i = body.rindex(b".") - 5  # inside the ciphertext
    body[i] = ord("B") if body[i] != ord("B") else ord("C")
    m["body"] = bytes(body)
    return msgpack.packb(m, use_bin_type=True)


async def test_the_page_decrypts_http_events_and_refuses_a_hostile_relay(
    ws_server: EmbeddedServer, browser: Browser
) -> None:
    source = Recording(HttpEvents(rate=100, seed=11))
    async with (
        make_stack(ws_server.url, sources=[source], streams=["http_events"]) as st,
        Tap(ws_server.url) as tap,
    ):
        with _web(ws_server, st) as web:
            errors: list[str] = []
            async with _page(browser, web.url, errors=errors) as page:
                # decrypted rows in the DOM (X25519, the default), and the count keeps rising
                table_rows = page.locator(ROWS_IN_DOM)

                async def any_row() -> bool:
                    return await table_rows.count() > 0

                await until(any_row)
                assert await _text(page, "#key") == "x25519"
                first = await _rows(page)
                await until(lambda: _more(page, "#rows", first + 20))
                assert await page.get_attribute("#status", "data-state") == "verified"
                assert await _text(page, "#signer") == st.identity.kid
                assert await _text(page, "#rejected") == "0"
                sid = await _text(page, "#session")
                inbox = st.subjects.inbox(sid)
                assert sid in st.agent.sessions
                # the cluster accepted the page's proof: the session's reader is the page's key
                kid = await _text(page, "#identity")
                reader = st.agent.sessions[sid].reader
                assert reader is not None
                assert reader.identity == kid != st.user.kid
                assert "authorized by this machine's cluster" in await _text(page, "#authorization")

                # the hostile relay: forged key envelope, forged per-message data, bit flips,
                # replays, all published straight to the page's inbox
                jwk = await page.evaluate("window.sealstream.subscription.session.key.publicJwk")
                assert set(jwk) == {"kty", "crv", "x", "alg"}  # public members only
                assert not await page.evaluate(
                    "window.sealstream.subscription.session.key.privateKey.extractable"
                )
                forged_rows = encode_rows([{"req_path": FORGED, "upid": FORGED}])
                forger = ProducerSession(
                    ClusterIdentity.generate(), cluster=st.cluster, session=sid, consumer_jwk=jwk
                )
                forger.seq = 10**9
                downgrade = ProducerSession(
                    st.identity,  # even the real cluster key cannot make unsigned data pass
                    cluster=st.cluster,
                    session=sid,
                    consumer_jwk=jwk,
                    key_mode="per-message",
                )
                downgrade.seq = 2 * 10**9
                genuine = await _genuine_inbox(tap, inbox)
                assert len(genuine) >= 3
                hostile = [
                    *forger.seal("http_events", forged_rows),
                    *downgrade.seal("http_events", forged_rows),
                    genuine[0],  # the key envelope, replayed
                    genuine[-1],  # data, replayed
                    _repack(_flip_body(genuine[-1]), seq=3 * 10**9),  # flipped, seq moved on
                    _repack(_flip_body(genuine[-1])),  # flipped in place
                    msgpack.packb({"rows": [{"req_path": FORGED}]}),  # plaintext
                ]
                nc = await connect(ws_server.url, name="hostile-relay")
                try:
                    for payload in hostile:
                        await nc.publish(inbox, payload)
                    await nc.flush()
                finally:
                    await nc.close()
                await until(lambda: _more(page, "#rejected", len(hostile) - 1))
                reasons = await _text(page, "#reasons")
                for reason in ("untrusted_key", "unknown_kid", "bad_alg", "replay", "malformed"):
                    assert reason in reasons, reasons
                # the session goes on, and nothing forged ever reached the DOM
                after = await _rows(page)
                await until(lambda: _more(page, "#rows", after + 10))
                assert FORGED not in await page.content()
                assert await page.get_attribute("#status", "data-state") == "verified"

                # rows the page shows are rows the producer made (the DOM holds the newest 50)
                shown = await page.eval_on_selector_all(
                    f"{ROWS_IN_DOM} td:nth-child(6)",
                    "cells => cells.map(c => c.textContent)",
                )
                made = {r["req_path"] for r in source.rows_seen}
                assert shown
                assert set(shown) <= made
                BUILD.mkdir(exist_ok=True)
                await page.screenshot(path=str(BUILD / "web.png"), full_page=False)
                assert errors == []

        # the relay (the tap sees every subject) never carried a plaintext row
        await tap.flush()
        markers = {r["req_path"] for r in source.rows_seen[:200]} | {
            r["remote_addr"] for r in source.rows_seen[:50]
        }
        assert len(markers) > 20
        relayed = [m for m in tap.messages if m.subject.startswith(f"{st.prefix}.")]
        assert relayed
        leaked = [
            (m.subject, mark)
            for m in relayed
            if m.subject != inbox or m.data not in hostile
            for mark in markers
            if contains_marker(m.data, mark)
        ]
        assert leaked == []


HTTP = 'section[data-stream="http_events"]'
#: uPlot's canvas is drawn at the device's pixel ratio: colours are compared loosely
_INK = """([canvas, rgb]) => {
  const {data} = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  let n = 0;
  for (let i = 0; i < data.length; i += 4) {
    const d = Math.abs(data[i] - rgb[0]) + Math.abs(data[i + 1] - rgb[1]) + Math.abs(data[i + 2] - rgb[2]);
    if (data[i + 3] > 200 && d < 60) n++;
  }
  return n;
}"""
#: the series' colours (charts.js): the first line of a chart, 2xx for the statuses
_FIRST_SERIES = {
    "rows": (0x2F, 0x6F, 0xDE),
    "latency": (0x2F, 0x6F, 0xDE),
    "status": (0x2B, 0x8A, 0x3E),
}


async def _column(page: Page, section: str, name: str) -> list[str]:
    """The cells of column ``name`` of a stream's table, newest first, as shown."""
    heads = await page.eval_on_selector_all(
        f"{section} table.rows thead th", "ths => ths.map(t => t.textContent)"
    )
    if name not in heads:
        return []
    selector = f"{section} table.rows tbody tr td:nth-child({heads.index(name) + 1})"
    return list(await page.eval_on_selector_all(selector, "cells => cells.map(c => c.textContent)"))


async def _points(page: Page, section: str, chart: str) -> int:
    value = await page.get_attribute(f'{section} figure[data-chart="{chart}"]', "data-points")
    return int(value or 0)


async def test_the_page_charts_formats_filters_and_pauses(
    ws_server: EmbeddedServer, browser: Browser
) -> None:
    """The view: a tab per stream; charts drawn from the decrypted rows, their series growing;
    cells as their columns read (local times, durations, sizes); a header that says how many
    rows were received above the newest 50; a filter and a pause."""
    sources: list[Source] = [HttpEvents(rate=100, seed=5), HostMetrics(interval=0.2)]
    async with make_stack(ws_server.url, sources=sources, streams=[]) as st:
        streams = ["http_events", "host_metrics"]
        with _web(ws_server, st, streams=streams) as web:
            errors: list[str] = []
            async with _page(
                browser, web.url, errors=errors, viewport={"width": 1280, "height": 800}
            ) as page:
                await page.wait_for_selector("#tabs .tab")
                tabs = await page.eval_on_selector_all(
                    "#tabs .tab", "ts => ts.map(t => t.dataset.stream)"
                )
                assert tabs == streams
                assert await page.is_visible(HTTP)
                assert not await page.is_visible('section[data-stream="host_metrics"]')

                async def full_table() -> bool:
                    return await page.locator(ROWS_IN_DOM).count() == 50

                await until(full_table, timeout=20)
                header = await _text(page, f"{HTTP} .count")
                received = re.fullmatch(r"([\d,]+) rows received · the newest 50 below", header)
                assert received, header
                assert int(received.group(1).replace(",", "")) >= 50
                for column, form in [
                    ("time_", r"\d\d:\d\d:\d\d\.\d{3}"),
                    ("latency_ns", r"\d+(\.\d+)? (ns|µs|ms|s)"),
                    ("resp_body_size", r"\d+(\.\d+)? (B|KiB|MiB)"),
                    ("resp_status", r"[1-5]\d\d"),
                ]:
                    cells = await _column(page, HTTP, column)
                    assert cells
                    assert all(re.fullmatch(form, c) for c in cells), (column, cells[:5])

                # the charts: drawn (their canvas holds their first series' colour), and growing
                for chart in ("rows", "latency", "status"):
                    await until(partial(_more_points, page, HTTP, chart, 1), timeout=20)
                    before = await _points(page, HTTP, chart)
                    await until(partial(_more_points, page, HTTP, chart, before), timeout=10)
                    canvas = await page.query_selector(
                        f'{HTTP} figure[data-chart="{chart}"] canvas'
                    )
                    assert await page.evaluate(_INK, [canvas, _FIRST_SERIES[chart]]) > 20, chart
                await page.click('#tabs .tab[data-stream="host_metrics"]')
                host = 'section[data-stream="host_metrics"]'
                assert await page.is_visible(host)
                assert not await page.is_visible(HTTP)
                for chart in ("percent", "load", "network"):
                    await until(partial(_more_points, page, host, chart, 2), timeout=20)
                assert all(
                    re.fullmatch(r"\d+\.\d %", c) for c in await _column(page, host, "cpu_percent")
                )
                await page.click('#tabs .tab[data-stream="http_events"]')

                # the filter: only 4xx and 5xx, the header says how many of the kept rows match
                await page.fill(f"{HTTP} input.filter", "resp_status>=400")

                async def only_errors() -> bool:
                    cells = await _column(page, HTTP, "resp_status")
                    return bool(cells) and all(int(c) >= 400 for c in cells)

                await until(only_errors, timeout=20)
                assert "match the filter" in await _text(page, f"{HTTP} .count")
                await page.fill(f"{HTTP} input.filter", "resp_status>=")
                assert await page.get_attribute(f"{HTTP} input.filter", "aria-invalid") == "true"
                assert "nothing after '>='" in await _text(page, f"{HTTP} .filter-error")
                await page.fill(f"{HTTP} input.filter", "")
                await until(full_table)

                # pause: the table and the charts stand still while rows are still counted
                await page.click("#pause")
                assert await page.get_attribute("#pause", "aria-pressed") == "true"
                frozen = await _column(page, HTTP, "time_")
                points = await _points(page, HTTP, "rows")
                counted = await _rows(page)
                await until(lambda: _more(page, "#rows", counted + 200), timeout=20)
                assert await _column(page, HTTP, "time_") == frozen
                assert await _points(page, HTTP, "rows") == points
                await page.click("#pause")

                async def moving() -> bool:
                    return await _column(page, HTTP, "time_") != frozen

                await until(moving)
                assert errors == []


async def _more_points(page: Page, section: str, chart: str, than: int) -> bool:
    return await _points(page, section, chart) > than


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("token", "token refused"),
        ("trust", "untrusted signer"),
        ("cluster", "cluster unavailable"),
    ],
)
async def test_the_page_says_what_went_wrong(
    ws_server: EmbeddedServer, browser: Browser, case: str, expected: str
) -> None:
    async with make_stack(ws_server.url, sources=[HttpEvents(rate=50, seed=3)]) as st:
        cases: dict[str, dict[str, Any]] = {
            "token": {"token": lambda: st.token(clusters=["elsewhere"]) + "x"},
            "trust": {"trust": TrustStore({st.cluster: [ClusterIdentity.generate().public_jwk]})},
            "cluster": {"cluster": "gone", "token": lambda: st.token(clusters=["gone"])},
        }
        changes = cases[case]
        with _web(ws_server, st, **changes) as web:
            async with _page(browser, web.url) as page:

                async def failed() -> bool:
                    state = await page.get_attribute("#status", "data-state")
                    # an unavailable cluster is passing: the page says so while it retries
                    return state == ("retrying" if case == "cluster" else "error")

                await until(failed, timeout=15)
                status = await _text(page, "#status")
                assert status.startswith(expected), status
                assert "\n" not in status
                assert await page.locator(ROWS_IN_DOM).count() == 0


async def test_the_page_is_a_group_member(ws_server: EmbeddedServer, browser: Browser) -> None:
    """``?mode=group``: the page opens a group-mode session (its proof says so), receives the
    stream's group key in its own key envelope and opens the one batch sealed for all."""
    source = HttpEvents(rate=100, seed=12)
    async with make_stack(ws_server.url, sources=[source], streams=["http_events"]) as st:
        with _web(ws_server, st) as web:
            async with _page(browser, web.link(mode="group")) as page:
                await until(lambda: _more(page, "#rows", 20))
                assert await page.get_attribute("#status", "data-state") == "verified"
                assert await _text(page, "#rejected") == "0"
                sid = await _text(page, "#session")
                assert type(st.agent.sessions[sid].crypto).__name__ == "MemberSession"
                assert st.agent.groups["http_events"].rotations >= 1
                assert st.proxy.group_deliveries > 0


def _page_key(web: WebServer) -> dict[str, str]:
    """The header with the page's key, which the printed URL carries in its fragment."""
    return {PAGE_KEY_HEADER: web.url.split("#key=", 1)[1]}


def test_config_json_refuses_other_hosts(ws_server: EmbeddedServer) -> None:
    """A DNS-rebinding page (another Host) cannot read the token, nor can a local process
    that does not have the page's key (the printed URL's fragment)."""
    import http.client

    config = WebConfig(
        nats_ws_url="ws://127.0.0.1:1",
        cluster="c1",
        streams=["http_events"],
        token=lambda: "secret-token",
        trust=TrustStore(),
    )
    with WebServer(config) as web:
        conn = http.client.HTTPConnection(web.host, web.port, timeout=5)
        conn.request(
            "GET", "/config.json", headers={"Host": f"evil.example:{web.port}", **_page_key(web)}
        )
        refused = conn.getresponse()
        assert refused.status == 421
        assert b"secret-token" not in refused.read()
        for wrong in ({}, {PAGE_KEY_HEADER: "guess"}):
            conn.request("GET", "/config.json", headers=wrong)
            refused = conn.getresponse()
            assert refused.status == 403
            assert b"secret-token" not in refused.read()
        assert web.refused == {"no page key": 2}
        conn.request("GET", "/config.json", headers=_page_key(web))
        ok = conn.getresponse()
        assert ok.status == 200
        assert ok.getheader("Cache-Control") == "no-store"
        assert json.loads(ok.read())["token"] == "secret-token"
        conn.close()


async def test_the_page_keeps_its_session_alive_closes_it_and_shows_the_end(
    ws_server: EmbeddedServer, browser: Browser
) -> None:
    keepalive = 1.0  # the least a proxy offers: an expiry after 3 s
    async with make_stack(
        ws_server.url,
        sources=[HttpEvents(rate=50, seed=4)],
        streams=["http_events"],
        keepalive_s=keepalive,
    ) as st:
        with _web(ws_server, st) as web:
            # keepalives from the page (each with a token read again from /config.json): the
            # session outlives many expiry periods of 3 intervals
            async with _page(browser, web.url) as page:
                await until(lambda: _more(page, "#rows", 0))
                sid = await _text(page, "#session")
                rows = await _rows(page)
                await asyncio.sleep(8 * keepalive)
                assert sid in st.proxy.registry
                assert await _rows(page) > rows
                assert await page.get_attribute("#status", "data-state") == "verified"
                # leaving the page closes the session at the proxy (a close, not an expiry)
                with capture_logs() as logs:
                    await page.close(run_before_unload=True)

                    async def forgotten() -> bool:
                        return sid not in st.proxy.registry

                    await until(forgotten)
            events = {(e["event"], e.get("reason")) for e in logs if e.get("session") == sid}
            assert ("session.closed", "consumer") in events, events  # the proxy's
            assert not any(event == "session.expired" for event, _ in events), events

            # the producer ends the session: the page says so, signed
            async with _page(browser, web.url) as page:
                await until(lambda: _more(page, "#rows", 0))
                await st.agent.aclose()

                async def ended() -> bool:
                    return await page.get_attribute("#status", "data-state") == "ended"

                await until(ended)
                assert (await _text(page, "#status")).startswith("session ended by the cluster: ")


@pytest.mark.parametrize("kind", ["p256", "rsa"])
async def test_every_key_kind_opens_in_the_page(
    ws_server: EmbeddedServer, browser: Browser, kind: str
) -> None:
    """P-256 and RSA-OAEP-256/4096 (Pixie's) key pairs, made by WebCrypto in the page."""
    async with make_stack(
        ws_server.url, sources=[HttpEvents(rate=50, seed=6)], streams=["http_events"]
    ) as st:
        with _web(ws_server, st) as web:
            async with _page(browser, web.link(key=kind)) as page:
                await until(lambda: _more(page, "#rows", 0), timeout=30)
                assert await _text(page, "#key") == kind
                jwk = await page.evaluate("window.sealstream.subscription.session.key.publicJwk")
                expected = {"p256": ("EC", "ECDH-ES+A256KW"), "rsa": ("RSA", "RSA-OAEP-256")}[kind]
                assert (jwk["kty"], jwk["alg"]) == expected
                if kind == "rsa":
                    assert len(jwk["n"]) == 683  # 4096 bits in base64url
                # the private key cannot leave WebCrypto
                extractable = await page.evaluate(
                    "window.sealstream.subscription.session.key.privateKey.extractable"
                )
                assert extractable is False
                assert await _text(page, "#rejected") == "0"


def test_the_generated_server_config_has_a_loopback_websocket_listener(tmp_path: Path) -> None:
    conf = tmp_path / "nats.conf"
    issuer = AccountKey.generate().public_key
    conf.write_text(server_config(Credentials.generate(["c1"]), issuer=issuer, websocket=True))
    with EmbeddedServer(ServerOptions(config_file=conf, jetstream=False)) as server:
        assert server.websocket_url is not None
        assert server.websocket_url.startswith("ws://127.0.0.1:")
    conf.write_text(server_config(Credentials.generate(["c1"]), issuer=issuer))
    with EmbeddedServer(ServerOptions(config_file=conf, jetstream=False)) as server:
        assert server.websocket_url is None


def _state_is(page: Page, state: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await page.get_attribute("#status", "data-state") == state

    return check


@contextlib.asynccontextmanager
async def _restartable_server(tmp_path: Path, **options: Any) -> AsyncIterator[EmbeddedServer]:
    """A nats-server with a WebSocket listener, both on ports chosen once, so that it can be
    stopped and started again on them; stopped after."""
    conf = tmp_path / "nats.conf"
    ws_port = free_port()
    conf.write_text(f'websocket {{\n  host: "127.0.0.1"\n  port: {ws_port}\n  no_tls: true\n}}\n')
    server = EmbeddedServer(ServerOptions(config_file=conf, port=free_port(), **options))
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def test_the_page_rides_out_a_broker_restart(tmp_path: Path, browser: Browser) -> None:
    """The broker restarts on the same ports: the page says it lost the connection, the
    client reconnects by itself, and the session's rows come again."""
    async with (
        _restartable_server(tmp_path) as server,
        make_stack(
            server.url,
            sources=[HttpEvents(rate=50, seed=8)],
            streams=["http_events"],
            shared_registry=False,  # the proxy's registry outlives the broker's restart
        ) as st,
    ):
        with _web(server, st) as web:
            async with _page(browser, web.url) as page:
                await until(lambda: _more(page, "#rows", 0))
                await asyncio.to_thread(server.stop)

                await until(_state_is(page, "reconnecting"))
                assert "reconnecting" in await _text(page, "#status")
                rows = await _rows(page)
                await asyncio.to_thread(server.start)
                await until(_state_is(page, "verified"), timeout=20)
                await until(lambda: _more(page, "#rows", rows + 10), timeout=20)
                assert await _text(page, "#rejected") == "0"


async def test_the_page_connects_as_its_session_with_its_token(
    tmp_path: Path, browser: Browser
) -> None:
    """The connection convention of the auth callout: NATS user = the session id, password =
    the token. A server that does not know that user refuses it, and the page says the
    token was refused."""
    conf = tmp_path / "nats.conf"
    conf.write_text(
        'authorization { users: [{user: "someone-else", password: "not-the-token"}] }\n'
        + 'websocket {\n  host: "127.0.0.1"\n  port: -1\n  no_tls: true\n}\n'
    )
    log_file = tmp_path / "nats.log"
    options = ServerOptions(config_file=conf, jetstream=False, log_file=log_file)
    with EmbeddedServer(options) as server:
        assert server.websocket_url is not None
        config = WebConfig(
            nats_ws_url=server.websocket_url,
            cluster="c1",
            streams=["http_events"],
            token=lambda: "the-token",
            trust=TrustStore(),
        )
        with WebServer(config) as web:
            async with _page(browser, web.url) as page:
                await until(_state_is(page, "error"))
                status = await _text(page, "#status")
                assert status.startswith("token refused"), status
                sid = await page.evaluate("window.sealstream.subscription.session.session")
    assert f'User "{sid}"' in log_file.read_text()


async def _identity(page: Page) -> tuple[str, bool, str]:
    """The page's fingerprint, whether its private key is extractable, and what WebCrypto
    says when asked to export it."""
    kid = await _text(page, "#identity")
    extractable = await page.evaluate("window.sealstream.identity.privateKey.extractable")
    export = await page.evaluate(
        "crypto.subtle.exportKey('jwk', window.sealstream.identity.privateKey)"
        ".then(() => 'exported', (e) => e.name)"
    )
    return kid, extractable, export


async def test_a_page_the_cluster_does_not_authorize_says_so_until_an_operator_does(
    ws_server: EmbeddedServer, browser: Browser
) -> None:
    """``sealstream-consume web`` writes no policy: the page's open is refused ``forbidden``
    in one line naming its identity and the command; once the operator authorizes the public
    JWK the page shows, a reload (same identity, from IndexedDB) opens the session."""
    async with make_stack(
        ws_server.url, sources=[HttpEvents(rate=50, seed=9)], streams=["http_events"]
    ) as st:
        with _web(ws_server, st, authorize=None) as web:
            async with _page(browser, web.url) as page:
                await until(_state_is(page, "error"), timeout=15)
                status = await _text(page, "#status")
                kid, extractable, export = await _identity(page)
                assert len(kid) == 43
                assert status == (
                    "not authorized by the cluster (key not authorized): this page's identity "
                    f"{kid}; authorize it with: sealstream-producer authorize add --key-file "
                    "CLUSTER-KEY --jwk-file sealstream-web-identity.jwk --stream http_events"
                )
                assert "operator" in await _text(page, "#authorization")
                assert await page.locator(ROWS_IN_DOM).count() == 0
                assert await _rows(page) == 0
                assert st.agent.sessions == {}
                # the private key never leaves WebCrypto
                assert extractable is False
                assert export == "InvalidAccessError"

                # the operator authorizes the public JWK the page shows (and offers to download)
                jwk = json.loads(await _text(page, "#identity-jwk"))
                assert set(jwk) == {"kty", "crv", "x"}
                assert await _text(page, "#authorize-command") in status
                policy = AuthzPolicy.load(st.policy_file)
                policy.with_key(jwk, ["http_events"], name="browser")[0].save(st.policy_file)

                await page.reload()
                await until(lambda: _more(page, "#rows", 0))
                assert await page.get_attribute("#status", "data-state") == "verified"
                # the same identity after the reload, still not extractable
                assert await _identity(page) == (kid, False, "InvalidAccessError")
                sid = await _text(page, "#session")
                reader = st.agent.sessions[sid].reader
                assert reader is not None
                assert reader.identity == kid


def _post(
    web: WebServer,
    body: object,
    *,
    origin: str | None,
    host: str | None = None,
    key: bool = True,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(web.host, web.port, timeout=5)
    headers = {"Content-Type": "application/json", "Host": host or f"{web.host}:{web.port}"}
    if key:
        headers |= _page_key(web)
    if origin is not None:
        headers["Origin"] = origin
    try:
        conn.request("POST", "/authorize", body=json.dumps(body), headers=headers)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def test_registration_is_taken_only_from_the_pages_own_origin(tmp_path: Path) -> None:
    policy_file = tmp_path / "authorized.json"
    config = WebConfig(
        nats_ws_url="ws://127.0.0.1:1",
        cluster="c1",
        streams=["http_events"],
        token=lambda: "secret-token",
        trust=TrustStore(),
        authorize=page_registration(policy_file, name="page"),
    )
    key = UserIdentity.generate().public_jwk
    with WebServer(config) as web:
        own = f"http://{web.host}:{web.port}"
        # another site's page (a cross-site form or fetch carries its own Origin), a request
        # without Origin, a rebinding host: refused, and nothing written
        assert _post(web, {"jwk": key}, origin=f"http://evil.example:{web.port}")[0] == 403
        assert _post(web, {"jwk": key}, origin=f"http://localhost:{web.port + 1}")[0] == 403
        assert _post(web, {"jwk": key}, origin=None)[0] == 403
        assert _post(web, {"jwk": key}, origin=own, host=f"evil.example:{web.port}")[0] == 421
        assert not policy_file.exists()
        assert web.refused == {"foreign origin": 3}
        # a local process without the page's key (it could forge Origin, not the key)
        assert _post(web, {"jwk": key}, origin=own, key=False)[0] == 403
        assert not policy_file.exists()
        assert web.refused == {"foreign origin": 3, "no page key": 1}
        # a private key, or not an Ed25519 key: refused
        UserIdentity.load_or_create(tmp_path / "user.jwk")
        private = json.loads((tmp_path / "user.jwk").read_text())
        assert _post(web, {"jwk": private}, origin=own)[0] == 400
        x25519 = {**key, "crv": "X25519"}
        assert _post(web, {"jwk": x25519}, origin=own)[0] == 400
        assert not policy_file.exists()
        # the page itself: authorized for the configured streams, in the policy file
        status, answer = _post(web, {"jwk": key}, origin=own)
        assert status == 200, answer
        kid = json.loads(answer)["identity"]
        grant = AuthzPolicy.load(policy_file).keys[kid]
        assert grant.streams == {"http_events"}
        assert grant.until is not None  # a week, renewed when the page registers again
        assert 6 * 86400 < grant.until - time.time() <= 7 * 86400
        assert policy_file.stat().st_mode & 0o777 == 0o600

    # sealstream-consume web (no policy of its own) offers no registration
    plain = WebConfig(
        nats_ws_url="ws://127.0.0.1:1",
        cluster="c1",
        streams=["http_events"],
        token=lambda: "secret-token",
        trust=TrustStore(),
    )
    with WebServer(plain) as web:
        assert _post(web, {"jwk": key}, origin=f"http://{web.host}:{web.port}")[0] == 404


async def test_the_page_against_sealstream_up(tmp_path: Path, browser: Browser) -> None:
    """The defaults a user gets: ``sealstream up`` (embedded nats-server with the auth
    callout, the proxy, a producer enforcing its policy) serves the page; the page registers
    its key with the cluster (for the OTLP streams too, with ``--otlp``) and shows decrypted
    rows; the operator's command it shows names the cluster's policy."""
    state = tmp_path / "state"
    port = free_port()
    log = tmp_path / "up.log"
    argv = [str(Path(sys.executable).parent / "sealstream"), "up", "--dir", str(state)]
    argv += ["--sources", "http_events", "--otlp", "--rate", "50", "--web-port", str(port)]
    with log.open("wb") as out:
        up = subprocess.Popen(  # noqa: ASYNC220 - one child, started once
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            cwd=tmp_path,
            env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")},  # its context
        )
    # the address `up` prints, with the page's key in its fragment, as a user would copy it
    printed = re.compile(rf"http://127\.0\.0\.1:{port}/#key=[A-Za-z0-9_-]+")
    try:

        async def serving() -> bool:
            assert up.poll() is None, log.read_text()
            producer_log = state / "producer.log"
            started = producer_log.exists() and "producer.started" in producer_log.read_text()
            return started and printed.search(log.read_text()) is not None

        await until(serving, timeout=60)
        url = printed.search(log.read_text())
        assert url is not None
        async with _page(browser, url.group(0)) as page:
            try:

                async def shown() -> bool:  # the table is redrawn 4 times a second
                    return await page.locator(ROWS_IN_DOM).count() > 0

                await until(shown, timeout=30)
            except TimeoutError:
                raise AssertionError(await _text(page, "#status")) from None
            assert await _rows(page) > 0
            assert await page.get_attribute("#status", "data-state") == "verified"
            kid = await _text(page, "#identity")
            assert "authorized by this machine's cluster" in await _text(page, "#authorization")
            grant = AuthzPolicy.load(state / "authorized.json").keys[kid]
            assert grant.streams == {"http_events", "otlp_traces", "otlp_metrics", "otlp_logs"}
            assert await _text(page, "#authorize-command") == (
                "sealstream-producer authorize add --policy-file "
                f"{(state / 'authorized.json').resolve()} --jwk-file sealstream-web-identity.jwk "
                "--stream http_events --stream otlp_traces --stream otlp_metrics --stream otlp_logs"
            )
    finally:
        up.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(up.wait, 20)
        except subprocess.TimeoutExpired:
            up.kill()
            await asyncio.to_thread(up.wait)
    assert "Traceback" not in log.read_text()
    assert up.returncode == 0


# --- issue 19: no unauthenticated mode, forged keys only counted, the page resumes -----------


@pytest.mark.parametrize("mode", ["per-message", "none"])
async def test_a_link_cannot_switch_sender_authentication_off(
    ws_server: EmbeddedServer, browser: Browser, mode: str
) -> None:
    """``?mode=per-message`` (no sender authentication: a relay could forge rows) or any
    other mode than session and group: refused with one line, and no session is opened."""
    async with make_stack(ws_server.url, sources=[HttpEvents(rate=50, seed=21)]) as st:
        with _web(ws_server, st) as web:
            async with _page(browser, web.link(mode=mode)) as page:
                await until(_state_is(page, "error"))
                status = await _text(page, "#status")
                assert status.startswith("refused: this page opens session or group mode only")
                assert "\n" not in status
                assert await _text(page, "#session") == "-"
                assert len(st.proxy.registry) == 0
                assert st.agent.sessions == {}


async def test_a_forged_key_envelope_raced_ahead_of_the_genuine_one_is_only_counted(
    ws_server: EmbeddedServer, browser: Browser
) -> None:
    """The relay sees the page's open before the cluster answers: its own key envelope,
    sealed to the open's key and delivered first, is refused as ``untrusted_key``; the
    cluster's key follows and rows flow, the page verified."""
    async with make_stack(
        ws_server.url, sources=[HttpEvents(rate=100, seed=22)], streams=["http_events"]
    ) as st:
        relay = await connect(ws_server.url, name="hostile-relay")
        stack_tap = contextlib.AsyncExitStack()
        raced: list[str] = []

        async def race(msg: Any) -> None:
            jwk = msgpack.unpackb(msg.data, raw=False)["jwk"]
            sid = thumbprint(jwk)
            forger = ProducerSession(
                ClusterIdentity.generate(), cluster=st.cluster, session=sid, consumer_jwk=jwk
            )
            forger.seq = 10**9  # refused as untrusted, not as a replay, wherever it lands
            for payload in forger.start():
                await relay.publish(st.subjects.inbox(sid), payload)
            await relay.flush()
            raced.append(sid)

        try:
            await relay.subscribe(st.subjects.api_open, cb=race)
            await relay.flush()
            with _web(ws_server, st) as web:
                tap = await stack_tap.enter_async_context(
                    Tap(ws_server.url, f"{st.prefix}.inbox.>")
                )
                async with _page(browser, web.url) as page:
                    await until(lambda: _more(page, "#rows", 20))
                    sid = await _text(page, "#session")
                    assert raced == [sid]
                    await tap.flush()
                    first = tap.on(st.subjects.inbox(sid))[0].data
                    assert msgpack.unpackb(first, raw=False)["seq"] == 10**9  # the race was won
                    assert await page.get_attribute("#status", "data-state") == "verified"
                    assert await _text(page, "#signer") == st.identity.kid
                    assert await _text(page, "#reasons") == "untrusted_key: 1"
        finally:
            await stack_tap.aclose()
            await relay.close()


@pytest.mark.parametrize(
    ("mode", "stored"), [("session", False), ("group", False), ("group", True)]
)
async def test_a_forged_expiry_notice_costs_a_new_session_not_the_end(
    tmp_path: Path, browser: Browser, mode: str, stored: bool
) -> None:
    """Notices are unauthenticated: ``expired`` makes the page open a new session with a
    fresh key (as sealstream-consume does), says so with the rows it lost, and streams on. A
    group member's new session with a store goes on with its group's line and kept keys
    (the carried state does not stand in the way of the new session's first key)."""
    async with (
        _restartable_server(tmp_path, store_dir=tmp_path / "js") as server,
        make_stack(
            server.url,
            sources=[HttpEvents(rate=100, seed=23)],
            streams=["http_events"],
            store=Store() if stored else None,
        ) as st,
    ):
        with _web(server, st) as web:
            async with _page(browser, web.link(mode=mode)) as page:
                await until(lambda: _more(page, "#rows", 5))
                first = await _text(page, "#session")
                nc = await connect(server.url, name="hostile-relay")
                try:
                    await nc.publish(st.subjects.inbox(first), notice(first, "expired", "forged"))
                    await nc.flush()
                finally:
                    await nc.close()

                async def resumed() -> bool:
                    return await page.locator("#resumed").count() > 0

                await until(resumed)
                line = await _text(page, "#resumed")
                said = (
                    r"resumed at .+: what the group sealed since .+ is read from the store, "
                    r"what it no longer has is counted in gaps \(.+forged\)"
                    if stored
                    else r"resumed at .+, rows between .+ and .+ lost \(.+forged\)"
                )
                assert re.fullmatch(said, line)
                await until(_state_is(page, "verified"))
                second = await _text(page, "#session")
                assert second != first
                assert second in st.agent.sessions
                rows = await _rows(page)
                await until(lambda: _more(page, "#rows", rows + 5))
                assert await _text(page, "#rejected") == "0"


async def test_an_open_answered_for_another_session_ends_at_once(
    ws_server: EmbeddedServer, browser: Browser
) -> None:
    """A relay that answers the page's open for another session tampers: the page says so and
    stops, it does not retry the open as it would a late or busy proxy."""
    async with make_stack(ws_server.url, sources=[HttpEvents(rate=10, seed=31)]) as st:
        relay = await connect(ws_server.url, name="hostile-relay")
        other = "-" + "A" * 41 + "_"  # a valid session id, never the page's own key's
        opens: list[str] = []

        async def answer(msg: Any) -> None:
            opens.append(thumbprint(msgpack.unpackb(msg.data, raw=False)["jwk"]))
            await msg.respond(encode(Opened(other, f"hostile.inbox.{other}", 10.0)))

        try:
            await relay.subscribe("hostile.api.session.open", cb=answer)
            await relay.flush()
            with _web(ws_server, st, prefix="hostile") as web:
                async with _page(browser, web.url) as page:
                    # a retried open stays "retrying" for 30 s
                    await until(_state_is(page, "error"))
                    status = await _text(page, "#status")
                    assert status == "relay not trusted: the proxy answered for another session"
                    assert len(opens) == 1
                    assert opens[0] != other
        finally:
            await relay.close()


async def test_the_page_resumes_after_a_broker_and_cluster_restart(
    tmp_path: Path, browser: Browser
) -> None:
    """The broker restarts, and the cluster's producer with it (it forgets its sessions): the
    proxy ends the page's session, and the page opens a new one with a fresh key, says which
    rows it lost, and streams on."""
    async with (
        _restartable_server(tmp_path) as server,
        make_stack(
            server.url,
            sources=[HttpEvents(rate=50, seed=24)],
            streams=["http_events"],
            keepalive_s=1.0,
            shared_registry=False,  # the proxy's registry outlives the broker's restart
        ) as st,
    ):
        with _web(server, st) as web:
            async with _page(browser, web.url) as page:
                await until(lambda: _more(page, "#rows", 0))
                first = await _text(page, "#session")
                await asyncio.to_thread(server.stop)
                await until(_state_is(page, "reconnecting"))
                await st.agent._nc.close()  # the producer goes down too: no end envelope
                await asyncio.to_thread(server.start)
                async with Agent(
                    st.agent.config,
                    identity=st.identity,
                    sources=[HttpEvents(rate=50, seed=25)],
                    streams=["http_events"],
                ) as agent:

                    async def resumed() -> bool:
                        return await page.locator("#resumed").count() > 0

                    await until(resumed, timeout=30)
                    await until(_state_is(page, "verified"), timeout=20)
                    second = await _text(page, "#session")
                    assert second != first
                    assert second in agent.sessions
                    assert "rows between" in await _text(page, "#resumed")
                    rows = await _rows(page)
                    await until(lambda: _more(page, "#rows", rows + 10), timeout=20)


async def test_the_page_reads_an_ended_sessions_store_before_its_next_session(
    tmp_path: Path, browser: Browser
) -> None:
    """The proxy goes away while the producer seals on into its store, then the producer dies
    and comes back (it forgets its sessions): the new proxy ends the page's session on the
    cluster's word, and the page first reads what the store kept of it (the proxy keeps an
    ended session for its owner's last resume), then opens a new one: no gap, no rejection."""
    async with (
        _restartable_server(tmp_path, store_dir=tmp_path / "js") as server,
        make_stack(
            server.url,
            sources=[HttpEvents(rate=50, seed=26)],
            streams=["http_events"],
            keepalive_s=1.0,
            store=Store(),
        ) as st,
    ):
        with _web(server, st) as web:
            async with _page(browser, web.url) as page:
                await until(lambda: _more(page, "#rows", 20))
                first = await _text(page, "#session")
                await st.proxy.aclose()  # no relay: what is sealed now is only stored
                await asyncio.sleep(1.5)
                await st.agent._nc.close()  # the producer dies: no end envelope
                async with (
                    Proxy(
                        st.proxy.config, verifier=TokenVerifier(secret=st.secret, leeway_s=30)
                    ) as proxy,
                    Agent(
                        st.agent.config,
                        identity=st.identity,
                        sources=[HttpEvents(rate=50, seed=27)],
                        streams=["http_events"],
                    ) as agent,
                ):

                    async def resumed() -> bool:
                        return await page.locator("#resumed").count() > 0

                    await until(resumed, timeout=30)
                    await until(_state_is(page, "verified"), timeout=20)
                    assert await _text(page, "#session") not in (first, "")
                    rows = await _rows(page)
                    await until(lambda: _more(page, "#rows", rows + 10), timeout=20)
                    assert proxy.replayed > 0  # the ended session's stored envelopes
                    assert agent.sessions
                    assert await _text(page, "#gaps") == "0 (0 lost)"
                    assert await _text(page, "#rejected") == "0"


@pytest.mark.parametrize("mode", ["session", "group"])
async def test_the_page_keeps_its_session_through_a_broker_restart_with_a_store(
    tmp_path: Path, browser: Browser, mode: str
) -> None:
    """With a store (docs/protocol.md, "Lossless delivery") the page keeps its session
    through a broker restart on its file store: it holds what arrives past a gap, asks for a
    replay (of its group's batches too, as a group member), and shows no gap, no rejection,
    no new session."""
    async with (
        _restartable_server(tmp_path, store_dir=tmp_path / "js") as server,
        make_stack(
            server.url,
            sources=[HttpEvents(rate=50, seed=9)],
            streams=["http_events"],
            shared_registry=False,  # the proxy's registry outlives the broker's restart
            store=Store(),
        ) as st,
    ):
        with _web(server, st) as web:
            async with _page(browser, web.link(mode=mode)) as page:
                await until(lambda: _more(page, "#rows", 0))
                session = await _text(page, "#session")
                await asyncio.to_thread(server.stop)
                await until(_state_is(page, "reconnecting"))
                rows = await _rows(page)
                await asyncio.to_thread(server.start)
                await until(_state_is(page, "verified"), timeout=20)
                await until(lambda: _more(page, "#rows", rows + 20), timeout=20)
                assert await _text(page, "#gaps") == "0 (0 lost)"
                assert await _text(page, "#rejected") == "0"
                assert await _text(page, "#session") == session


async def test_the_page_reads_otlp_streams_from_the_sdk_as_spans_records_and_points(
    ws_server: EmbeddedServer, browser: Browser, tmp_path: Path
) -> None:
    """An application on the stock OpenTelemetry SDK exports OTLP/HTTP to the producer's
    receiver; the page decodes the sealed export requests and shows a line per span (its
    name, kind, duration, status), per data point and per log record."""
    marker = f"mk{secrets.token_hex(4)}"
    streams = list(OTLP_STREAMS)
    async with (
        make_stack(ws_server.url, streams=streams) as st,
        OtlpReceiver(st.agent, config=OtlpConfig(port=0, grpc_port=None)) as receiver,
    ):
        with _web(ws_server, st, streams=streams) as web:
            errors: list[str] = []
            async with _page(
                browser, web.url, errors=errors, viewport={"width": 1280, "height": 800}
            ) as page:
                # the receiver seals only for sessions reading: the page's must be open first
                await until(_state_is(page, "verified"))
                await run_app(f"http://127.0.0.1:{receiver.port}", tmp_path / "sent", marker)
                traces = 'section[data-stream="otlp_traces"]'

                async def spans() -> bool:
                    return len(await _column(page, traces, "name")) == 3

                await until(spans, timeout=20)
                names = await _column(page, traces, "name")
                assert sorted(names) == sorted(
                    f"{n}-{marker}" for n in ("parent", "child", "logged")
                )
                assert set(await _column(page, traces, "service")) == {f"svc-{marker}"}
                assert "server" in await _column(page, traces, "kind")
                assert f"error: failed-{marker}" in await _column(page, traces, "status")
                durations = await _column(page, traces, "duration_ns")
                assert all(re.fullmatch(r"\d+(\.\d+)? (ns|µs|ms|s)", d) for d in durations)
                assert all(
                    re.fullmatch(r"[0-9a-f]{32}", t)
                    for t in await _column(page, traces, "trace_id")
                )
                header = await _text(page, f"{traces} .count")
                assert re.fullmatch(
                    r"\d+ requests? received · 3 spans · the newest 3 lines below", header
                )
                BUILD.mkdir(exist_ok=True)
                await page.screenshot(path=str(BUILD / "web-otlp-traces.png"))

                for stream, column, want in [
                    (
                        "otlp_metrics",
                        "type",
                        {"sum", "gauge", "histogram", "exponential_histogram"},
                    ),
                    ("otlp_logs", "body", {f"body-{marker}", f"{{kv={marker}}}"}),
                ]:
                    await page.click(f'#tabs .tab[data-stream="{stream}"]')
                    section = f'section[data-stream="{stream}"]'

                    async def shown(section: str = section, column: str = column) -> bool:
                        return bool(await _column(page, section, column))

                    await until(shown, timeout=20)
                    assert want <= set(await _column(page, section, column)), stream
                    await page.screenshot(path=str(BUILD / f"web-{stream.replace('_', '-')}.png"))
                logs = 'section[data-stream="otlp_logs"]'
                assert {"WARN", "ERROR"} <= set(await _column(page, logs, "severity"))
                assert errors == []
