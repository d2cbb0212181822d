"""Consumer configuration: one frozen dataclass, environment parsing only in ``from_env``."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealstream import KeyMode
from sealstream.crypto import KeyKind, Policy, UserIdentity
from sealstream.nats import NatsAuth

__all__ = ["ClientConfig", "TokenFile", "default_identity_file", "default_trust_store"]


def _config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "sealstream"


def default_trust_store() -> Path:
    return _config_dir() / "trust.json"


def default_identity_file() -> Path:
    """Where ``sealstream-consume identity create`` puts the user's identity key."""
    return _config_dir() / "identity.jwk"


@dataclass(frozen=True, slots=True)
class TokenFile:
    """A token kept in a file, read again for every session request: replace the file's
    contents with a fresh token (same user) and a long session goes on past the old one's
    expiry. Reads once at creation, so a missing file fails at start."""

    path: Path

    def __post_init__(self) -> None:
        self()

    def __call__(self) -> str:
        token = self.path.read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"token file {self.path} is empty")
        return token


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    nats_url: str = "nats://127.0.0.1:4222"
    nats_auth: NatsAuth = field(default_factory=NatsAuth)
    prefix: str = "sealstream"
    #: the token, or a function returning the current one, called for every session request
    #: (see :class:`TokenFile`); a function that cannot give one raises OSError or ValueError
    token: str | Callable[[], str] = field(default="", repr=False)
    trust_store: Path = field(default_factory=default_trust_store)
    #: the user's identity key: it signs the proof each open carries, which the cluster's
    #: policy checks (None: no proof; only a cluster that trusts the relay serves it)
    identity: UserIdentity | None = None
    #: an issuer token naming ``identity`` (``cnf.jkt``), for clusters that trust its issuer
    authz: str | None = field(default=None, repr=False)
    tofu: bool = False
    key_kind: KeyKind = "rsa"
    key_mode: KeyMode = "session"
    #: per-message mode (Pixie's scheme, a bench baseline) has NO sender authentication: a
    #: relay can forge rows. Refused unless this is set: nothing user-facing sets it.
    unauthenticated_per_message: bool = False
    policy: Policy = "fail"
    allow_zip: bool = False
    queue_size: int = 10_000
    request_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.key_kind not in ("rsa", "x25519", "p256"):
            raise ValueError(f"key kind must be rsa, x25519 or p256, not {self.key_kind!r}")
        if self.key_mode not in ("session", "per-message", "group"):
            raise ValueError(
                f"key mode must be session, per-message or group, not {self.key_mode!r}"
            )
        if self.key_mode == "per-message" and not self.unauthenticated_per_message:
            raise ValueError(
                "per-message mode has no sender authentication (a relay can forge rows): "
                "use session or group mode (unauthenticated_per_message=True for a bench only)"
            )
        if self.key_mode == "group" and self.allow_zip:
            raise ValueError("zip is not available in group mode")
        if self.queue_size < 1 or self.request_timeout_s <= 0:
            raise ValueError("queue_size and request_timeout_s must be positive")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: Any) -> ClientConfig:
        """``NATS_URL``, ``SEALSTREAM_PREFIX``, ``SEALSTREAM_TOKEN`` (or
        ``SEALSTREAM_TOKEN_FILE``), ``SEALSTREAM_TRUST_STORE``, ``SEALSTREAM_IDENTITY_FILE``
        (else the default identity file, if it exists); flags (overrides) win."""
        values: dict[str, Any] = {}
        values["nats_auth"] = NatsAuth.from_env(env)
        if env.get("NATS_URL"):
            values["nats_url"] = env["NATS_URL"]
        if env.get("SEALSTREAM_PREFIX"):
            values["prefix"] = env["SEALSTREAM_PREFIX"]
        if overrides.get("token") is None:  # a token given as a flag: the env's is not read
            if env.get("SEALSTREAM_TOKEN_FILE"):
                values["token"] = TokenFile(Path(env["SEALSTREAM_TOKEN_FILE"]))
            elif env.get("SEALSTREAM_TOKEN"):
                values["token"] = env["SEALSTREAM_TOKEN"]
        if env.get("SEALSTREAM_TRUST_STORE"):
            values["trust_store"] = Path(env["SEALSTREAM_TRUST_STORE"])
        if overrides.get("identity") is None:
            identity_file = Path(env.get("SEALSTREAM_IDENTITY_FILE") or default_identity_file())
            if env.get("SEALSTREAM_IDENTITY_FILE") or identity_file.exists():
                values["identity"] = UserIdentity.load(identity_file)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
