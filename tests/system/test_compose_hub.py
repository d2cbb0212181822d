"""compose.hub.yaml: its structure, the servers' configurations ``sealstream up --topology hub``
writes for it, and every sealstream service run as a local process exactly as compose would
run it (its environment and secrets), against the same topology on loopback.

The hub's and the leaves' configurations name the compose services (``hub-0:6222``...), so
here the servers run the local twins of those files (same accounts, users and permissions,
loopback ports): ``test_compose_configurations_are_the_local_ones_renamed`` checks they are
twins."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sealops._hub import HUB_CLUSTERS, HubServers, prepare_hub
from tests.system.test_compose import (
    ROOT,
    Host,
    _interpolated,
    command,
    console_scripts,
    env_names_read_by,
    environment,
    parse_args,
    run,
    secret_mounts,
    start,
    volume_mounts,
)

__all__ = ["start"]  # the fixture, shared with test_compose

COMPOSE = ROOT / "compose.hub.yaml"
STATE_DIR = "./.sealstream/hub/"
HUBS = ("hub-0", "hub-1", "hub-2")
LEAVES = tuple(f"leaf-{c}" for c in HUB_CLUSTERS)
PROXIES = ("proxy-a", "proxy-b")
PRODUCERS = tuple(f"producer-{c}" for c in HUB_CLUSTERS)
CONSUMERS = tuple(f"consumer-{c}" for c in HUB_CLUSTERS)
SEALSTREAM_SERVICES = (*PROXIES, *PRODUCERS, *CONSUMERS)


def load(variables: dict[str, str] | None = None) -> dict[str, Any]:
    doc = _interpolated(yaml.safe_load(COMPOSE.read_text(encoding="utf-8")), variables or {})
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project directory after setup step 1 (``sealstream up --topology hub``'s state)."""
    project = tmp_path_factory.mktemp("project")
    prepare_hub(project / STATE_DIR, HUB_CLUSTERS)
    return project


def test_every_variable_has_a_default() -> None:
    load({})


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {*HUBS, *LEAVES, *SEALSTREAM_SERVICES}


@pytest.mark.parametrize("name", HUBS + LEAVES)
def test_nats_servers_are_the_official_image_with_a_healthcheck(
    compose: dict[str, Any], project: Path, name: str
) -> None:
    service = compose["services"][name]
    m = re.fullmatch(r"nats:(\d+)\.(\d+)(?:\.\d+)?-alpine[\d.]*", service["image"])
    assert m is not None, service["image"]
    assert (int(m[1]), int(m[2])) >= (2, 11)  # a replay reads in batches (2.11)
    argv = command(service)
    conf = secret_mounts(service)
    assert argv[:2] == ["-c", next(iter(conf))]
    monitor = argv[argv.index("-m") + 1]
    assert f":{monitor}/healthz" in " ".join(service["healthcheck"]["test"])
    text = (project / compose["secrets"][conf[next(iter(conf))]]["file"]).read_text()
    assert f'server_name: "{name if name in HUBS else "site-" + name[5:]}"' in text
    # JetStream in the configuration (a site's: the cluster's store), on the node's volume
    store = re.search(r'store_dir: "([^"]+)"', text)
    assert store is not None
    assert volume_mounts(service)[store[1]] in compose["volumes"]
    if name not in HUBS:
        assert f'domain: "site-{name[5:]}"' in text
        assert "listen" not in text  # dials out only


def test_compose_configurations_are_the_local_ones_renamed(project: Path) -> None:
    """Same text but for the hosts, ports and store directory."""
    state = project / STATE_DIR

    def normal(text: str) -> str:
        text = re.sub(r"(127\.0\.0\.1|hub-\d):\d+", "HOST", text)
        return re.sub(r'store_dir: "[^"]+"', "STORE", text)

    for i in range(3):
        local = (state / f"hub-{i}.conf").read_text()
        assert normal((state / "compose" / f"hub-{i}.conf").read_text()) == normal(local)
    for c in HUB_CLUSTERS:
        local = (state / f"site-{c}" / "leaf.conf").read_text()
        assert normal((state / "compose" / f"leaf-{c}.conf").read_text()) == normal(local)
        for hub in HUBS:
            assert f"@{hub}:7422" in (state / "compose" / f"leaf-{c}.conf").read_text()


@pytest.mark.parametrize("name", SEALSTREAM_SERVICES)
def test_sealstream_services(compose: dict[str, Any], project: Path, name: str) -> None:
    service = compose["services"][name]
    argv = command(service)
    assert argv[0] in console_scripts()
    parse_args(argv)
    assert service["image"] == "sealstream:local"
    assert service["build"]["context"] == "."
    package = console_scripts()[argv[0]].partition(".")[0]
    read = env_names_read_by(package) | env_names_read_by("sealstream")
    env = environment(service)
    assert not set(env) - read, f"{name} sets variables {package}/ never reads"
    for source in secret_mounts(service).values():
        assert compose["secrets"][source]["file"].startswith(STATE_DIR)
        assert (project / compose["secrets"][source]["file"]).is_file(), source
    for value in env.values():
        if value.startswith("/"):
            assert value in secret_mounts(service), value
    hosts = {u.split("//")[1].split(":")[0] for u in env["NATS_URL"].split(",")}
    if name in PRODUCERS:  # only its own site's leaf node
        cluster = env["SEALSTREAM_CLUSTER"]
        assert hosts == {f"leaf-{cluster}"}
        assert env["SEALSTREAM_NATS_USER"] == f"producer-{cluster}"
        leaf = (project / STATE_DIR / "compose" / f"leaf-{cluster}.conf").read_text()
        password = project / compose["secrets"][f"nats_producer_{cluster}_password"]["file"]
        assert json.dumps(password.read_text()) in leaf
    else:  # any hub node
        assert hosts == set(HUBS)
    if name in CONSUMERS:
        assert not any("NATS_USER" in k or "NATS_PASSWORD" in k for k in env)
        assert parse_args(argv).cluster == name.removeprefix("consumer-")
    if name in PROXIES:
        assert env["SEALSTREAM_REGISTRY_REPLICAS"] == "3"
        assert env["SEALSTREAM_STORE_DOMAIN"] == "site-{cluster}"  # the sites' stores
    if name in PRODUCERS:
        assert env["SEALSTREAM_STORE"] == "1"


@pytest.mark.slow
def test_services_run_on_the_topology_and_each_consumer_decrypts_its_cluster(
    tmp_path: Path, start: Any
) -> None:
    compose = load({"SEALSTREAM_CONSUME_LIMIT": "5"})
    project = tmp_path / "project"
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    _, nodes = prepare_hub(project / STATE_DIR, HUB_CLUSTERS)
    servers = HubServers(project / STATE_DIR, nodes, HUB_CLUSTERS)
    asyncio.run(servers.start())
    try:
        hub_url = ",".join(servers.hub_urls)

        def host(name: str) -> Host:
            cluster = environment(compose["services"][name]).get("SEALSTREAM_CLUSTER")
            url = servers.leaves[cluster].url if cluster is not None else hub_url
            return Host(compose, project=project, volumes=volumes, nats_url=url)

        running = [start(host(name), name) for name in (*PROXIES, *PRODUCERS)]
        for r in running:
            r.wait_for("proxy.started" if r.name in PROXIES else "producer.started")
        for name in CONSUMERS:
            out = run(host(name).argv(name), env=host(name).env(name), timeout=90)
            records = [json.loads(line) for line in out.splitlines()]
            assert len(records) >= 5, name
        for r in running:
            assert r.stop() == 0, r.text()
            assert "Traceback" not in r.text(), r.text()
    finally:
        asyncio.run(servers.stop())
