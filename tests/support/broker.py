"""A nats-server that the fault tests kill and start again."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from sealstream.server import EmbeddedServer, ServerOptions


@dataclass
class Broker:
    """A nats-server that can be killed and started again on the same port and store."""

    options: ServerOptions
    server: EmbeddedServer | None = None

    def start(self) -> str:
        self.server = EmbeddedServer(self.options)
        return self.server.start()

    def kill(self) -> None:
        assert self.server is not None
        os.kill(self.server.pid, signal.SIGKILL)
        self.server.stop()
        self.server = None
