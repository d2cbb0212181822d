"""Proxy configuration: one frozen dataclass, environment parsing only in ``from_env``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealstream import TokenVerifier
from sealstream.control import KEEPALIVE_MAX_S, KEEPALIVE_MIN_S
from sealstream.nats import NatsAuth
from sealstream.natsjwt import AccountKey

__all__ = ["CalloutConfig", "Limits", "ProxyConfig"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CalloutConfig:
    """The auth callout: its issuer key and what it grants."""

    #: the account nkey that signs user JWTs (its public key is the server's ``issuer``)
    issuer: AccountKey = field(repr=False)
    #: the configured account consumers are placed in (the user JWT's ``aud``)
    account: str = "SEALSTREAM"
    #: a user JWT expires at most this long after the token's ``exp``: longer than the token
    #: check's 30 s leeway, so that an expired session ends with the keepalive's clear
    #: ``unauthorized`` before the broker drops its connection
    grace_s: float = 60.0
    max_subscriptions: int = 16
    max_payload: int = 64 * 1024
    #: authorization requests above this size are not read (a 64 KiB password fits, to be
    #: answered with a reason)
    max_request_bytes: int = 256 * 1024
    queue_group: str = "sealstream-auth"

    def __post_init__(self) -> None:
        if not 0 <= self.grace_s <= 3600:
            raise ValueError("grace_s must be within 0..3600 s")
        if self.max_subscriptions < 2 or self.max_payload < 1024 or self.max_request_bytes < 4096:
            raise ValueError("callout limits too small for a consumer")

    @classmethod
    def from_seed_file(cls, path: Path, **overrides: Any) -> CalloutConfig:
        """The issuer seed from a file (``SA...``, as ``sealstream up`` writes it)."""
        return cls(issuer=AccountKey.from_text(path.read_bytes()), **overrides)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> CalloutConfig | None:
        """``SEALSTREAM_CALLOUT_ISSUER_SEED_FILE`` (None without it) and
        ``SEALSTREAM_CALLOUT_ACCOUNT``."""
        seed_file = env.get("SEALSTREAM_CALLOUT_ISSUER_SEED_FILE")
        if not seed_file:
            return None
        extra: dict[str, Any] = {}
        if env.get("SEALSTREAM_CALLOUT_ACCOUNT"):
            extra["account"] = env["SEALSTREAM_CALLOUT_ACCOUNT"]
        return cls.from_seed_file(Path(seed_file), **extra)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Per-user and per-session limits; exceeding one is ``limit_exceeded`` and counted."""

    sessions_per_user: int = 32
    streams_per_session: int = 16
    envelope_bytes: int = 1024 * 1024
    pending_requests: int = 256
    #: relay rate per session (token bucket): sustained envelopes/s and burst
    session_rate: float = 20_000.0
    session_burst: float = 40_000.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    nats_url: str = "nats://127.0.0.1:4222"
    nats_auth: NatsAuth = field(default_factory=NatsAuth)
    prefix: str = "sealstream"
    token_secret: bytes | None = field(default=None, repr=False)
    issuer_jwk: Mapping[str, Any] | None = None
    keepalive_s: float = 10.0
    #: a session of a cluster that keeps a store outlives its last keepalive this long (at
    #: least 3 keepalives): a consumer cut off for longer than that still comes back to it
    #: and gets what it missed from the store
    store_grace_s: float = 120.0
    #: a session that the proxy ended (expiry, its cluster's word) stays known this long for
    #: its owner's last resume (the store's default retention):
    #: the consumer reads what was sealed for it before it opens a new one
    ended_keep_s: float = 600.0
    #: where a cluster's store is: "" the proxy's own JetStream; else the JetStream domain
    #: named by this template with ``{cluster}`` (e.g. ``site-{cluster}``: a store in each
    #: site's leaf node, read across the link)
    store_domain: str = ""
    control_timeout_s: float = 5.0
    queue_group: str = "sealstream-proxy"
    limits: Limits = field(default_factory=Limits)
    #: Prometheus ``/metrics`` and ``/healthz`` (off unless a port is given; 0 = any free port)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    #: share sessions between instances through a JetStream key-value bucket (HA); off for a
    #: single in-memory proxy on a server without JetStream
    shared_registry: bool = True
    #: replicas of the registry's bucket when this instance creates it (3 on a 3-node hub)
    registry_replicas: int = 1
    #: answer the NATS auth callout (consumers log in with their token) in this process
    callout: CalloutConfig | None = None

    def __post_init__(self) -> None:
        if not KEEPALIVE_MIN_S <= self.keepalive_s <= KEEPALIVE_MAX_S:
            # the consumers clamp the interval to these bounds (docs/protocol.md): outside
            # them, they would keep their sessions alive at another pace than the expiry's
            raise ValueError(
                f"keepalive_s must be {KEEPALIVE_MIN_S:g} to {KEEPALIVE_MAX_S:g} seconds"
            )
        if self.control_timeout_s <= 0:
            raise ValueError("control_timeout_s must be positive")
        if not 0 <= self.store_grace_s <= 86_400:
            raise ValueError("store_grace_s must be 0 to 86400 seconds")
        if not 0 <= self.ended_keep_s <= 86_400:
            raise ValueError("ended_keep_s must be 0 to 86400 seconds")
        if self.store_domain and "{cluster}" not in self.store_domain:
            raise ValueError("store_domain names each cluster's domain: it holds {cluster}")
        if not 1 <= self.registry_replicas <= 5:
            raise ValueError("registry_replicas must be within 1..5 (JetStream's limit)")
        if (self.token_secret is None) == (self.issuer_jwk is None):
            raise ValueError("configure exactly one of a token secret or an issuer key")

    def verifier(self) -> TokenVerifier:
        return TokenVerifier(secret=self.token_secret, issuer_jwk=self.issuer_jwk)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: Any) -> ProxyConfig:
        """``NATS_URL``, ``SEALSTREAM_PREFIX``, ``SEALSTREAM_TOKEN_SECRET_FILE`` (or
        ``SEALSTREAM_TOKEN_SECRET``), ``SEALSTREAM_ISSUER_JWK_FILE``, ``SEALSTREAM_KEEPALIVE_S``,
        ``SEALSTREAM_STORE_GRACE_S``, ``SEALSTREAM_ENDED_KEEP_S``, ``SEALSTREAM_STORE_DOMAIN``,
        ``SEALSTREAM_CALLOUT_ISSUER_SEED_FILE`` (the auth callout, see :class:`CalloutConfig`),
        ``SEALSTREAM_REGISTRY_REPLICAS``."""
        values: dict[str, Any] = {}
        values["callout"] = CalloutConfig.from_env(env)
        values["nats_auth"] = NatsAuth.from_env(env)
        if "NATS_URL" in env:
            values["nats_url"] = env["NATS_URL"]
        if "SEALSTREAM_PREFIX" in env:
            values["prefix"] = env["SEALSTREAM_PREFIX"]
        if "SEALSTREAM_KEEPALIVE_S" in env:
            values["keepalive_s"] = float(env["SEALSTREAM_KEEPALIVE_S"])
        if "SEALSTREAM_STORE_GRACE_S" in env:
            values["store_grace_s"] = float(env["SEALSTREAM_STORE_GRACE_S"])
        if "SEALSTREAM_ENDED_KEEP_S" in env:
            values["ended_keep_s"] = float(env["SEALSTREAM_ENDED_KEEP_S"])
        if env.get("SEALSTREAM_STORE_DOMAIN"):
            values["store_domain"] = env["SEALSTREAM_STORE_DOMAIN"]
        if env.get("SEALSTREAM_TOKEN_SECRET_FILE"):
            values["token_secret"] = read_secret(Path(env["SEALSTREAM_TOKEN_SECRET_FILE"]))
        elif env.get("SEALSTREAM_TOKEN_SECRET"):
            values["token_secret"] = env["SEALSTREAM_TOKEN_SECRET"].encode("utf-8")
        if env.get("SEALSTREAM_METRICS_PORT"):
            values["metrics_port"] = int(env["SEALSTREAM_METRICS_PORT"])
        if env.get("SEALSTREAM_METRICS_HOST"):
            values["metrics_host"] = env["SEALSTREAM_METRICS_HOST"]
        if env.get("SEALSTREAM_SHARED_REGISTRY"):
            values["shared_registry"] = env["SEALSTREAM_SHARED_REGISTRY"].lower() not in (
                "0",
                "false",
                "no",
                "off",
            )
        if env.get("SEALSTREAM_REGISTRY_REPLICAS"):
            values["registry_replicas"] = int(env["SEALSTREAM_REGISTRY_REPLICAS"])
        if env.get("SEALSTREAM_ISSUER_JWK_FILE"):
            path = Path(env["SEALSTREAM_ISSUER_JWK_FILE"])
            values["issuer_jwk"] = json.loads(path.read_text(encoding="utf-8"))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def read_secret(path: Path) -> bytes:
    """A token secret file: its bytes, without a trailing newline."""
    return path.read_bytes().rstrip(b"\r\n")
