"""Consumer configuration: one frozen dataclass, environment parsing only in ``from_env``."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sealstream import KeyMode
from sealstream.crypto import KeyKind, Policy, UserIdentity
from sealstream.nats import NatsAuth

__all__ = [
    "ClientConfig",
    "Context",
    "TokenFile",
    "default_identity_file",
    "default_trust_store",
]


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
    #: the inbox queue's bounds, in envelopes and in bytes: past them an envelope is let go
    #: (read again from the cluster's store when it keeps one, else dropped and counted)
    queue_size: int = 10_000
    queue_bytes: int = 8 * 1024 * 1024
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
        if self.queue_size < 1 or self.queue_bytes < 1 or self.request_timeout_s <= 0:
            raise ValueError("queue_size, queue_bytes and request_timeout_s must be positive")

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


_CONTEXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: a context's members and the environment variable each stands in for
_CONTEXT_ENV: Mapping[str, str] = {
    "nats_url": "NATS_URL",
    "prefix": "SEALSTREAM_PREFIX",
    "token_file": "SEALSTREAM_TOKEN_FILE",
    "trust_store": "SEALSTREAM_TRUST_STORE",
    "identity": "SEALSTREAM_IDENTITY_FILE",
    "nats_ws_url": "SEALSTREAM_NATS_WS_URL",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Context:
    """A named set of defaults for the client commands, as the ``nats`` CLI has them: where
    NATS is, the token file, trust store and identity, the cluster and its streams.
    ``sealstream up`` writes one; ``--context NAME`` (or ``SEALSTREAM_CONTEXT``, else the
    selected one) picks it. Flags and environment variables win over it.

    Files: ``$XDG_CONFIG_HOME/sealstream/context/NAME.json`` (JSON of these members) and
    ``$XDG_CONFIG_HOME/sealstream/context.txt`` (the selected name)."""

    name: str
    nats_url: str | None = None
    nats_ws_url: str | None = None
    prefix: str | None = None
    token_file: str | None = None
    trust_store: str | None = None
    identity: str | None = None
    cluster: str | None = None
    streams: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _CONTEXT_NAME.fullmatch(self.name):
            raise ValueError(f"context name {self.name!r}: use letters, digits, '_', '.', '-'")

    @staticmethod
    def directory() -> Path:
        return _config_dir() / "context"

    @staticmethod
    def path(name: str) -> Path:
        return Context.directory() / f"{name}.json"

    @staticmethod
    def selected() -> str | None:
        """The selected context's name (``context.txt``), if any."""
        try:
            name = (_config_dir() / "context.txt").read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return name or None

    @classmethod
    def load(cls, name: str | None, env: Mapping[str, str] = os.environ) -> Context | None:
        """Context ``name``; else ``SEALSTREAM_CONTEXT``'s, else the selected one, else None.
        A named context that does not exist is a ValueError."""
        chosen = name or env.get("SEALSTREAM_CONTEXT") or cls.selected()
        if chosen is None:
            return None
        Context(name=chosen)  # a valid name, before it becomes a path
        path = cls.path(chosen)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(
                f"--context {chosen}: no such context ({path}); 'sealstream up' writes one"
            ) from None
        except (OSError, ValueError) as exc:
            raise ValueError(f"--context {chosen}: unreadable {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"--context {chosen}: {path} is not a JSON object")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "name"}
        if not all(v is None or isinstance(v, str) for k, v in known.items() if k != "streams"):
            raise ValueError(f"--context {chosen}: {path}: values must be strings")
        known["streams"] = tuple(str(s) for s in known.get("streams") or ())
        return cls(name=chosen, **known)

    @classmethod
    def names(cls) -> list[str]:
        """The contexts saved on this machine, by name."""
        return sorted(p.stem for p in cls.directory().glob("*.json"))

    @classmethod
    def select(cls, name: str) -> None:
        """Make context ``name`` (which must exist) the default."""
        if cls.load(name) is not None:
            _write_atomically(_config_dir() / "context.txt", name + "\n")

    def save(self, *, select: bool = False) -> Path:
        """Write this context (atomically, mode 0600); ``select``: make it the default."""
        path = self.path(self.name)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if k != "name" and v is not None}
        data["streams"] = list(self.streams)
        _write_atomically(path, json.dumps(data, indent=2) + "\n")
        if select:
            self.select(self.name)
        return path

    def env(self) -> dict[str, str]:
        """The members that stand in for environment variables, as those variables."""
        values = {var: getattr(self, k) for k, var in _CONTEXT_ENV.items()}
        return {var: v for var, v in values.items() if v}

    def under(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` over this context's values: a variable set in ``env`` wins (and a token
        given as ``SEALSTREAM_TOKEN`` wins over the context's token file)."""
        mine = self.env()
        if env.get("SEALSTREAM_TOKEN"):
            mine.pop("SEALSTREAM_TOKEN_FILE", None)
        return {**mine, **{k: v for k, v in env.items() if v}}


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:  # mkstemp makes it 0600
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
