"""A nats-server that the fault tests kill and start again, and a cluster of them."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from sealstream.server import EmbeddedServer, ServerOptions, free_port


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

    def stop(self) -> None:
        """Stop it if it runs (gracefully)."""
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def port(self) -> int:
        assert self.options.port is not None, "a Broker restarts on a port of its own"
        return self.options.port


def cluster_nodes(directory: Path, *, size: int = 3, jetstream: bool = True) -> list[Broker]:
    """The nodes of one NATS cluster on loopback, routed to each other, not yet started: each
    on a port of its own (kept when it is started again) with, under ``jetstream``, a store
    of its own in ``directory``."""
    ports = [free_port() for _ in range(size)]
    routes = [free_port() for _ in range(size)]
    nodes: list[Broker] = []
    for i in range(size):
        others = ", ".join(f'"nats-route://127.0.0.1:{r}"' for j, r in enumerate(routes) if j != i)
        conf = directory / f"n{i}.conf"
        conf.write_text(
            f'server_name: "n{i}"\n'
            "cluster {\n"
            '  name: "sealstream-test"\n'
            f"  listen: 127.0.0.1:{routes[i]}\n"
            f"  routes: [{others}]\n"
            "}\n"
        )
        options = ServerOptions(
            config_file=conf,
            port=ports[i],
            jetstream=jetstream,
            store_dir=directory / f"js{i}" if jetstream else None,
        )
        nodes.append(Broker(options))
    return nodes
