"""``sealstream-consume web``: serve the browser consumer (``consumers/web/dist``) and its
configuration from the user's own machine.

The page verifies and decrypts in the browser; this server only hands it static files and
``/config.json`` (the NATS WebSocket URL, the token, the cluster, the streams and the cluster
keys pinned in the local trust store). The token makes ``/config.json`` a secret: the server
binds 127.0.0.1 by default, answers only requests whose ``Host`` is the address it serves
(a DNS-rebinding page cannot read it), and marks every answer ``no-store``. The stdlib
``http.server`` runs in one thread; nothing here decrypts.

Registration (opt-in): given ``WebConfig.authorize`` (``sealstream demo`` and ``up`` pass one
that writes their local cluster's policy), ``POST /authorize`` with the page's public identity
JWK authorizes it for the configured streams (for a week, renewed as the page registers again).
It is accepted only from the page's own origin (``Origin`` and ``Host`` both this server's).
Both ``/config.json`` and ``/authorize`` also want the page's key: a secret of the run that
the printed URL carries in its fragment, so that another local user or process, which can
reach 127.0.0.1 as well, gets neither the token nor a registration. Without it
(``sealstream-consume web``) nothing here writes a policy: the page shows its fingerprint for
the cluster's operator.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlencode

import structlog

from sealstream.crypto import KeyKind, TrustStore
from sealstream.ids import Subjects, check_cluster_id, check_stream

__all__ = ["PAGE_KEY_HEADER", "WEB_DIST", "Authorize", "WebConfig", "WebServer"]

log = structlog.get_logger(__name__)

#: the header the page sends its key in (see WebServer._page_key)
PAGE_KEY_HEADER = "X-Sealstream-Page-Key"
#: the built page (committed; ``make web`` rebuilds it)
WEB_DIST = Path(__file__).resolve().parent / "web" / "dist"
_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/sealstream-web.js": ("sealstream-web.js", "text/javascript; charset=utf-8"),
}
#: authorizes a public identity JWK for streams in a cluster's policy; returns its id (its
#: RFC 7638 thumbprint); raises ValueError for a JWK that is not a public Ed25519 key
Authorize = Callable[[Mapping[str, Any], Sequence[str]], str]
#: the largest registration body read
_MAX_BODY = 4096
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
    "connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class WebConfig:
    """What the page is told. ``token`` is called for every ``/config.json`` request (a
    renewed token file is picked up by the page's next keepalive). ``nats_user`` and
    ``nats_password`` are for a NATS server with static users (no auth callout): without them
    the page connects as user = its session id, password = the token. ``authorize``, when
    given, lets the page register its identity key (``POST /authorize``): only for a server
    that owns the cluster's policy on this machine (``sealstream demo``/``up``), which also
    give ``policy_file``, the policy's path, for the operator's command the page prints."""

    nats_ws_url: str
    cluster: str
    streams: Sequence[str]
    token: Callable[[], str] = field(repr=False)
    trust: TrustStore
    prefix: str = "sealstream"
    key_kind: KeyKind = "x25519"
    nats_user: str | None = None
    nats_password: str | None = field(default=None, repr=False)
    authorize: Authorize | None = field(default=None, repr=False)
    policy_file: str | None = None

    def __post_init__(self) -> None:
        check_cluster_id(self.cluster)
        for s in self.streams:
            check_stream(s)
        Subjects(self.prefix)
        if not self.nats_ws_url.startswith(("ws://", "wss://")):
            raise ValueError("the NATS WebSocket URL must start with ws:// or wss://")

    def page_config(self) -> dict[str, Any]:
        pinned = {
            c: [self.trust.get(c, kid) for kid in kids] for c, kids in self.trust.clusters().items()
        }
        out: dict[str, Any] = {
            "nats_ws_url": self.nats_ws_url,
            "prefix": self.prefix,
            "token": self.token(),
            "cluster": self.cluster,
            "streams": list(self.streams),
            "trusted_keys": {self.cluster: pinned.get(self.cluster, [])},
            "key": self.key_kind,
            "register": self.authorize is not None,
        }
        if self.nats_user is not None:
            out["nats_user"] = self.nats_user
            out["nats_password"] = self.nats_password or ""
        if self.policy_file is not None:
            out["policy_file"] = self.policy_file
        return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a page closed mid-answer is not an error worth a traceback on the terminal
        log.debug("web.connection_lost", client=str(client_address))


class WebServer:
    """The page's server, in a thread: ``with WebServer(config, port=0) as web: web.url``."""

    def __init__(
        self, config: WebConfig, *, host: str = "127.0.0.1", port: int = 0, dist: Path = WEB_DIST
    ) -> None:
        self.config = config
        self.dist = dist
        if not (dist / "index.html").is_file():
            raise FileNotFoundError(f"the page is not built in {dist}: run 'make web'")
        self._httpd = _Server((host, port), self._handler())
        self._thread: threading.Thread | None = None
        self._authorize_lock = threading.Lock()
        #: refused registrations and configuration requests, by reason
        self.refused: Counter[str] = Counter()
        # The page's key, a secret of this run: the URL printed for the user carries it in
        # its fragment (never sent in a request line or a Referer), and the page sends it back
        # for /config.json (which holds the token) and /authorize. Another local user or
        # process can reach 127.0.0.1 too, but not the terminal that printed it.
        self._page_key = secrets.token_urlsafe(24)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def url(self) -> str:
        """The page's address, with its key in the fragment: what to open."""
        return self.link()

    def link(self, **query: str) -> str:
        """:attr:`url` with query parameters (``key=p256``: the ephemeral key kind)."""
        q = f"?{urlencode(query)}" if query else ""
        return f"http://{self.host}:{self.port}/{q}#key={self._page_key}"

    def _page_key_ok(self, headers: Message, what: str) -> bool:
        given = headers.get(PAGE_KEY_HEADER) or ""
        if hmac.compare_digest(given.encode(), self._page_key.encode()):
            return True
        self.refused["no page key"] += 1
        log.warning("web.refused", reason="no page key", what=what)
        return False

    def _allowed_hosts(self) -> set[str]:
        hosts = {f"{self.host}:{self.port}"}
        if self.host in ("127.0.0.1", "::1", "localhost"):
            hosts |= {f"localhost:{self.port}", f"127.0.0.1:{self.port}", f"[::1]:{self.port}"}
        return hosts

    def _register(self, headers: Message, body: bytes) -> tuple[HTTPStatus, bytes]:
        """``POST /authorize``: the page's public JWK, authorized for the configured streams
        if this server offers registration and the request comes from its own page."""
        authorize = self.config.authorize
        origin = headers.get("Origin")
        reason = None
        if authorize is None:
            reason, status = "not offered", HTTPStatus.NOT_FOUND
        elif not self._page_key_ok(headers, "authorize"):
            return HTTPStatus.FORBIDDEN, b"no page key\n"
        elif origin is None or origin != f"http://{headers.get('Host')}":
            reason, status = "foreign origin", HTTPStatus.FORBIDDEN
        elif (headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            reason, status = "not json", HTTPStatus.UNSUPPORTED_MEDIA_TYPE
        if reason is not None:
            self.refused[reason] += 1
            log.warning("web.authorize_refused", reason=reason, origin=str(origin)[:100])
            return status, f"{reason}\n".encode()
        assert authorize is not None
        try:
            request = json.loads(body)
            jwk = request.get("jwk") if isinstance(request, dict) else None
            if not isinstance(jwk, dict):
                raise ValueError('expected {"jwk": <public Ed25519 JWK>}')
            with self._authorize_lock:  # one policy write at a time
                kid = authorize(jwk, self.config.streams)
        except (ValueError, RecursionError) as exc:
            self.refused["bad key"] += 1
            log.warning("web.authorize_refused", reason="bad key", error=str(exc)[:200])
            return HTTPStatus.BAD_REQUEST, b"bad key\n"
        except OSError as exc:  # the policy file cannot be read or written
            self.refused["policy unavailable"] += 1
            log.error("web.authorize_failed", reason="policy unavailable", error=str(exc)[:200])
            return HTTPStatus.SERVICE_UNAVAILABLE, b"policy unavailable\n"
        log.info("web.authorized", identity=kid, streams=list(self.config.streams))
        answer = {"ok": True, "identity": kid, "streams": list(self.config.streams)}
        return HTTPStatus.OK, json.dumps(answer).encode("utf-8")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "sealstream-web"
            sys_version = ""

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("web.request", path=self.path.split("?")[0], status=args[1:2])

            def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Security-Policy", _CSP)
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Referrer-Policy", "no-referrer")
                self.send_header("Cross-Origin-Resource-Policy", "same-origin")
                self.end_headers()
                self.wfile.write(body)

            def _host_ok(self) -> bool:
                if self.headers.get("Host") in server._allowed_hosts():
                    return True
                log.warning("web.refused_host", host=str(self.headers.get("Host"))[:100])
                self._send(HTTPStatus.MISDIRECTED_REQUEST, b"wrong host\n", "text/plain")
                return False

            def do_POST(self) -> None:
                if not self._host_ok():
                    return
                if self.path.split("?", 1)[0] != "/authorize":
                    self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
                    return
                try:
                    length = int(self.headers.get("Content-Length") or "0")
                except ValueError:
                    length = -1
                if not 0 < length <= _MAX_BODY:
                    server.refused["bad size"] += 1
                    log.warning("web.authorize_refused", reason="bad size")
                    self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"bad size\n", "text/plain")
                    return
                body = self.rfile.read(length)
                status, answer = server._register(self.headers, body)
                kind = "application/json" if status == HTTPStatus.OK else "text/plain"
                self._send(status, answer, kind)

            def do_GET(self) -> None:
                if not self._host_ok():
                    return
                path = self.path.split("?", 1)[0]
                if path == "/config.json":
                    if not server._page_key_ok(self.headers, "config"):
                        self._send(HTTPStatus.FORBIDDEN, b"no page key\n", "text/plain")
                        return
                    try:
                        body = json.dumps(server.config.page_config()).encode("utf-8")
                    except (OSError, ValueError) as exc:  # the token file cannot be read
                        log.warning("web.config_unavailable", error=str(exc))
                        self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"no token\n", "text/plain")
                        return
                    self._send(HTTPStatus.OK, body, "application/json")
                    return
                entry = _FILES.get(path)
                if entry is None:
                    self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
                    return
                name, content_type = entry
                self._send(HTTPStatus.OK, (server.dist / name).read_bytes(), content_type)

        return Handler

    def start(self) -> str:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="sealstream-web", daemon=True
        )
        self._thread.start()
        log.info("web.started", url=self.url)
        return self.url

    def stop(self) -> None:
        """Stop serving and release the port; idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._httpd.shutdown()
            thread.join()
        self._httpd.server_close()

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
