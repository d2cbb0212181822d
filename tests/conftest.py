"""Shared fixtures: one real nats-server per test session, and a client per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from sealstream.nats import connect
from sealstream.server import EmbeddedServer

__all__ = ["nats_server", "nats_url", "nc"]


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedServer]:
    """A nats-server with JetStream on a port it chose itself, for the whole session."""
    with EmbeddedServer() as server:
        yield server


@pytest.fixture(scope="session")
def nats_url(nats_server: EmbeddedServer) -> str:
    """Client URL of the session's server."""
    return nats_server.url


@pytest_asyncio.fixture
async def nc(nats_url: str) -> AsyncIterator[Any]:
    """A client of the session's server, drained after the test."""
    client = await connect(nats_url, name="test")
    try:
        yield client
    finally:
        if not client.is_closed:
            await client.drain()
