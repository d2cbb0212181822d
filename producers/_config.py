"""Producer configuration: one frozen dataclass, environment parsing only in ``from_env``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producers._authz import POLICY_FILE_NAME
from producers._batcher import Batching
from producers._otlp import OtlpConfig
from sealstream.crypto import Rotation
from sealstream.ids import check_cluster_id
from sealstream.nats import NatsAuth
from sealstream.store import Store

__all__ = ["ProducerConfig", "otlp_config"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProducerConfig:
    cluster: str
    nats_url: str = "nats://127.0.0.1:4222"
    nats_auth: NatsAuth = field(default_factory=NatsAuth)
    prefix: str = "sealstream"
    key_file: Path = Path("cluster-key.jwk")
    #: who may read (docs/protocol.md, "Authorization held by the cluster"); None: the file
    #: ``authorized.json`` beside ``key_file``
    policy_file: Path | None = None
    #: no policy, no proof: serve every open the relay forwards (Pixie's model: the relay's
    #: operator can then read everything)
    trust_relay_authorization: bool = False
    #: how often the agent itself re-reads the policy and ends the sessions of readers no
    #: longer authorized (revoked, expired): it does not wait for the relay's pings
    authz_check_s: float = 2.0
    batching: Batching = field(default_factory=Batching)
    rotation: Rotation = field(default_factory=Rotation)
    max_sessions: int = 1000
    #: sealed envelopes kept per session while the broker is unreachable or slow; beyond it
    #: the oldest data envelopes are dropped (and counted)
    buffer_bytes: int = 4 * 1024 * 1024
    #: and all sessions together (the largest session's buffer gives way first)
    buffer_total_bytes: int = 64 * 1024 * 1024
    #: after a reconnect, how long buffered envelopes wait for a proxy to show it is back
    resume_hold_s: float = 5.0
    #: keep the sealed envelopes in a JetStream stream (docs/protocol.md, "Lossless
    #: delivery"): publish acknowledgement, ``emit`` returns once stored; None: at most once
    store: Store | None = None
    #: Prometheus ``/metrics`` and ``/healthz`` (off unless a port is given; 0 = any free port)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        check_cluster_id(self.cluster)
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be positive")
        if self.buffer_bytes < 1024 * 1024:
            raise ValueError("buffer_bytes must be at least 1 MiB (one envelope)")
        if self.buffer_total_bytes < self.buffer_bytes:
            raise ValueError("buffer_total_bytes must be at least buffer_bytes")
        if self.authz_check_s <= 0:
            raise ValueError("authz_check_s must be positive")
        if self.resume_hold_s < 0:
            raise ValueError("resume_hold_s must not be negative")

    @property
    def authz_file(self) -> Path:
        """The policy file in use."""
        return self.policy_file or self.key_file.parent / POLICY_FILE_NAME

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: Any) -> ProducerConfig:
        """``SEALSTREAM_CLUSTER``, ``NATS_URL``, ``SEALSTREAM_PREFIX``, ``SEALSTREAM_KEY_FILE``,
        ``SEALSTREAM_BUFFER_BYTES``, ``SEALSTREAM_POLICY_FILE``, ``SEALSTREAM_STORE`` (``1``:
        keep the envelopes in JetStream, with ``SEALSTREAM_STORE_REPLICAS``); keyword
        overrides (from command-line flags) win when not None."""
        values: dict[str, Any] = {}
        values["nats_auth"] = NatsAuth.from_env(env)
        for name, key in (
            ("SEALSTREAM_CLUSTER", "cluster"),
            ("NATS_URL", "nats_url"),
            ("SEALSTREAM_PREFIX", "prefix"),
        ):
            if env.get(name):
                values[key] = env[name]
        if env.get("SEALSTREAM_KEY_FILE"):
            values["key_file"] = Path(env["SEALSTREAM_KEY_FILE"])
        if env.get("SEALSTREAM_BUFFER_BYTES"):
            values["buffer_bytes"] = int(env["SEALSTREAM_BUFFER_BYTES"])
        if env.get("SEALSTREAM_POLICY_FILE"):
            values["policy_file"] = Path(env["SEALSTREAM_POLICY_FILE"])
        if env.get("SEALSTREAM_METRICS_PORT"):
            values["metrics_port"] = int(env["SEALSTREAM_METRICS_PORT"])
        if env.get("SEALSTREAM_METRICS_HOST"):
            values["metrics_host"] = env["SEALSTREAM_METRICS_HOST"]
        store = env.get("SEALSTREAM_STORE", "")
        if store not in ("", "0", "1"):
            raise ValueError(f"SEALSTREAM_STORE must be 0 or 1, not {store!r}")
        if store == "1":
            values["store"] = Store(replicas=int(env.get("SEALSTREAM_STORE_REPLICAS") or 1))
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "cluster" not in values:
            raise ValueError("a cluster id is required (--cluster or SEALSTREAM_CLUSTER)")
        return cls(**values)


def otlp_config(specs: list[str], *, token: str | None = None) -> OtlpConfig | None:
    """The OTLP receiver asked for by ``otlp[:HOST[:HTTP_PORT[:GRPC_PORT]]]`` among ``specs``
    (127.0.0.1, 4318 and 4317 by default; port 0: any free port; GRPC_PORT ``off``: HTTP
    only), requiring the bearer ``token`` when one is given."""
    given = [s for s in specs if s == "otlp" or s.startswith("otlp:")]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError("give one otlp source")
    host, http, grpc, *rest = [*given[0].split(":")[1:], "", "", ""]
    if any(rest) or not (http or "0").isdigit() or not (grpc in ("", "off") or grpc.isdigit()):
        raise ValueError(f"source {given[0]!r}: use otlp[:HOST[:HTTP_PORT[:GRPC_PORT|off]]]")
    return OtlpConfig(
        host=host or "127.0.0.1",
        port=int(http or 4318),
        grpc_port=None if grpc == "off" else int(grpc or 4317),
        token=token,
    )
