"""Fixtures of the system tests beyond the session's server (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sealstream.server import ServerOptions, free_port
from tests.support.broker import Broker

__all__ = ["broker"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A single nats-server with a file store on a port of its own, not yet started; stopped
    after the test if it runs."""
    b = Broker(ServerOptions(port=free_port(), store_dir=tmp_path / "js"))
    yield b
    b.stop()
