"""Measurements of the browser consumer in Debian's Chromium (a tool, not a test):

- page load to the first decrypted row, per key kind (X25519, P-256, RSA-4096), against a
  real stack (proxy + producer streaming ``http_events`` at 200 rows/s, so up to one 0.1 s
  source tick is included);
- decrypted envelopes per second in the page (verification, decryption, decoding and the
  live table) at 1 KiB and 16 KiB bodies: a minimal open responder stands in for the proxy
  and envelopes sealed by the real ProducerSession are published straight to the inbox.

Run: ``sealstream bench-web [--out DIR]`` (default ``build/web-bench``): writes ``report.json``
and ``report.md``. Needs Python's playwright (a dev dependency, imported only here) and
Debian's Chromium at ``/usr/bin/chromium``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from broker_proxy import Proxy, ProxyConfig
from consumers import WebConfig, WebServer
from producers import Agent, AuthzPolicy, Batching, HttpEvents, ProducerConfig, page_registration
from sealstream import configure_logging, mint_token
from sealstream.crypto import ClusterIdentity, ProducerSession, TrustStore, encode_rows
from sealstream.jwk import thumbprint
from sealstream.nats import connect
from sealstream.server import EmbeddedServer, ServerOptions
from sealstream.wire import decode_map, encode_map

if TYPE_CHECKING:
    from playwright.async_api import Browser

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "web_bench_main"]

RUNS: Final = 3
#: Debian's Chromium, never a downloaded browser (the browser tests drive it too)
CHROMIUM: Final = Path("/usr/bin/chromium")
CHROMIUM_ARGS: Final = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
_CLUSTER: Final = "bench"
_STREAM: Final = "http_events"


@contextlib.asynccontextmanager
async def _stack(server: EmbeddedServer) -> AsyncIterator[WebConfig]:
    """A proxy and a producer streaming ``http_events`` at 200 rows/s on ``server``, and the
    page's configuration for them (it registers its identity with the producer's policy, as
    with ``sealstream demo``)."""
    assert server.websocket_url is not None
    secret = os.urandom(32)
    identity = ClusterIdentity.generate()
    with tempfile.TemporaryDirectory(prefix="sealstream-web-bench-") as tmp:
        policy_file = Path(tmp) / "authorized.json"
        AuthzPolicy().save(policy_file)
        async with (
            Proxy(ProxyConfig(nats_url=server.url, token_secret=secret, shared_registry=False)),
            Agent(
                ProducerConfig(
                    cluster=_CLUSTER,
                    nats_url=server.url,
                    batching=Batching(max_delay_s=0.02),
                    policy_file=policy_file,
                ),
                identity=identity,
                sources=[HttpEvents(rate=200, seed=5)],
            ),
        ):
            yield WebConfig(
                nats_ws_url=server.websocket_url,
                cluster=_CLUSTER,
                streams=[_STREAM],
                token=lambda: mint_token(sub="bench", clusters=[_CLUSTER], secret=secret),
                trust=TrustStore({_CLUSTER: [identity.public_jwk]}),
                authorize=page_registration(policy_file, name="bench page"),
            )


async def _poll(page: Any, expr: str, until: float, bound_s: float = 60.0) -> float:
    deadline = time.monotonic() + bound_s
    while True:
        value = float(await page.evaluate(expr) or 0)
        if value >= until:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(expr)
        await asyncio.sleep(0.01)


async def first_rows(server: EmbeddedServer, browser: Browser) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    async with _stack(server) as config:
        with WebServer(config) as web:
            for kind in ("x25519", "p256", "rsa"):
                out[kind] = []
                for _ in range(RUNS):
                    page = await browser.new_page()
                    await page.goto(web.link(key=kind))
                    ms = await _poll(page, "Number(document.body.dataset.firstRowMs || 0)", 1)
                    out[kind].append(ms)
                    await page.close()
    return out


async def throughput(
    server: EmbeddedServer, browser: Browser, body_bytes: int, n: int
) -> dict[str, float]:
    """Envelopes of ~``body_bytes`` published to the page's inbox as fast as NATS takes them."""
    prefix = "bench"
    identity = ClusterIdentity.generate()
    opened: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    nc = await connect(server.url, name="bench-open-responder")

    async def on_open(msg: Any) -> None:
        req = decode_map(msg.data)
        sid = thumbprint(req["jwk"])
        await msg.respond(encode_map({"ok": True, "session": sid, "keepalive_s": 600}))
        if not opened.done():
            opened.set_result({"sid": sid, "jwk": req["jwk"]})

    async def on_other(msg: Any) -> None:
        await msg.respond(encode_map({"ok": True, "keepalive_s": 600}))

    await nc.subscribe(f"{prefix}.api.session.open", cb=on_open)
    await nc.subscribe(f"{prefix}.api.session.keepalive", cb=on_other)
    await nc.subscribe(f"{prefix}.api.session.close", cb=on_other)
    await nc.flush()
    assert server.websocket_url is not None
    config = WebConfig(
        nats_ws_url=server.websocket_url,
        cluster="bench",
        streams=["load"],
        token=lambda: "unused",
        trust=TrustStore({"bench": [identity.public_jwk]}),
        prefix=prefix,
    )
    try:
        with WebServer(config) as web:
            page = await browser.new_page()
            await page.goto(web.url)
            session = await asyncio.wait_for(opened, 30)
            producer = ProducerSession(
                identity, cluster="bench", session=session["sid"], consumer_jwk=session["jwk"]
            )
            # one row whose msgpack is ~body_bytes; the JWE adds base64 (4/3) and the header
            plain = encode_rows(
                [{"blob": os.urandom(body_bytes * 3 // 4 - 40).hex()[: body_bytes * 3 // 4 - 40]}]
            )
            envelopes = producer.start() + [
                e for _ in range(n) for e in producer.seal("load", plain)
            ]
            sizes = [len(e) for e in envelopes[1:]]
            inbox = f"{prefix}.inbox.{session['sid']}"
            start = time.monotonic()
            for e in envelopes:
                await nc.publish(inbox, e)
            await nc.flush()
            published = time.monotonic() - start
            await _poll(page, "window.sealstream.subscription.batches", n, bound_s=300)
            elapsed = time.monotonic() - start
            rejected = await page.evaluate("window.sealstream.subscription.session.rejectedTotal")
            await page.close()
    finally:
        await nc.close()
    return {
        "envelopes": n,
        "envelope_bytes": statistics.mean(sizes),
        "seconds": elapsed,
        "envelopes_per_s": n / elapsed,
        "publish_seconds": published,
        "rejected": rejected,
    }


async def run(out: Path) -> dict[str, Any]:
    from playwright.async_api import async_playwright  # a dev dependency: only for this tool

    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "nats.conf"
        conf.write_text('websocket {\n  host: "127.0.0.1"\n  port: -1\n  no_tls: true\n}\n')
        with EmbeddedServer(ServerOptions(config_file=conf)) as server:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(
                    executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
                )
                try:
                    first = await first_rows(server, browser)
                    load = {
                        "1KiB": await throughput(server, browser, 1024, 5000),
                        "16KiB": await throughput(server, browser, 16 * 1024, 1000),
                    }
                    version = browser.version
                finally:
                    await browser.close()
    report = {"chromium": version, "first_row_ms": first, "throughput": load}
    _write(out, report)
    return report


def _write(out: Path, report: dict[str, Any]) -> None:
    first, load, version = report["first_row_ms"], report["throughput"], report["chromium"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    lines = [
        "# The browser consumer, measured",
        "",
        f"Chromium {version} (headless, Debian), {os.cpu_count()} cores; {RUNS} runs each.",
        "",
        "| key | page load to first decrypted row (ms, median) | runs |",
        "|---|---|---|",
    ]
    for kind, values in first.items():
        runs = ", ".join(f"{v:.0f}" for v in values)
        lines.append(f"| {kind} | {statistics.median(values):.0f} | {runs} |")
    lines += [
        "",
        "| body | envelope bytes | envelopes | decrypted envelopes/s in the page |",
        "|---|---|---|---|",
    ]
    for name, r in load.items():
        size, rate = f"{r['envelope_bytes']:.0f}", f"{r['envelopes_per_s']:.0f}"
        lines.append(f"| {name} | {size} | {r['envelopes']} | {rate} |")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def web_bench_main(args: argparse.Namespace) -> int:
    configure_logging(level="error")  # a page's close asks for no reply: the responder warns
    if not CHROMIUM.exists():
        print(f"error: {CHROMIUM} is missing (apt-get install chromium)")
        return 2
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("error: the browser bench needs playwright (pip install -e '.[dev]')")
        return 2
    asyncio.run(run(args.out))
    print((args.out / "report.md").read_text(encoding="utf-8"))
    return 0
