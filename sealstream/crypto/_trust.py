"""The consumer's trust store: pinned cluster signing keys (public Ed25519 JWKs) per cluster id.

File format (JSON): ``{"version": 1, "clusters": {"<cluster_id>": [<public JWK>, ...]}}``.
Trust-on-first-use is an explicit opt-in: with ``tofu=True`` the first key a cluster presents
(embedded in its signed key envelope) is pinned and saved; later keys must match a pin.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from sealstream.crypto._jose import check_signing_jwk
from sealstream.errors import TrustError, WireError
from sealstream.ids import check_cluster_id
from sealstream.jwk import thumbprint

__all__ = ["TrustStore"]

log = structlog.get_logger(__name__)


class TrustStore:
    """cluster id -> {kid: public JWK}. Saved atomically to ``path`` when it changes."""

    def __init__(
        self,
        clusters: Mapping[str, list[Mapping[str, Any]]] | None = None,
        *,
        path: Path | None = None,
        tofu: bool = False,
    ) -> None:
        self.path = path
        self.tofu = tofu
        self._keys: dict[str, dict[str, dict[str, Any]]] = {}
        for cluster, jwks in (clusters or {}).items():
            for jwk in jwks:
                self._put(cluster, jwk)

    @classmethod
    def load(cls, path: Path, *, tofu: bool = False) -> TrustStore:
        """Read a trust store file; a missing file is an empty store bound to ``path``."""
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path=path, tofu=tofu)
        try:
            data = json.loads(raw)
            clusters = data["clusters"]
            if data.get("version") != 1 or not isinstance(clusters, dict):
                raise TypeError("bad layout")
            return cls(clusters, path=path, tofu=tofu)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise TrustError(f"trust store {path} is not a sealstream trust store") from exc

    def _put(self, cluster: str, jwk: Mapping[str, Any]) -> str:
        try:
            check_cluster_id(cluster)
        except WireError as exc:
            raise TrustError(str(exc)) from exc
        public = check_signing_jwk(jwk)
        kid = thumbprint(public)
        self._keys.setdefault(cluster, {})[kid] = public
        return kid

    def add(self, cluster: str, jwk: Mapping[str, Any]) -> str:
        """Pin a cluster key (and save); returns its kid (thumbprint)."""
        kid = self._put(cluster, jwk)
        self.save()
        log.info("trust.pinned", cluster=cluster, kid=kid)
        return kid

    def get(self, cluster: str, kid: str) -> dict[str, Any] | None:
        return self._keys.get(cluster, {}).get(kid)

    def clusters(self) -> dict[str, list[str]]:
        return {c: sorted(keys) for c, keys in self._keys.items()}

    def knows(self, cluster: str) -> bool:
        return bool(self._keys.get(cluster))

    def save(self) -> None:
        if self.path is None:
            return
        data = {
            "version": 1,
            "clusters": {c: list(keys.values()) for c, keys in sorted(self._keys.items())},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".trust-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, self.path)
