"""compose.yaml and the Dockerfile: their structure, and every sealstream service run as a local
process exactly as compose would run it, with no Docker engine.

The local run maps what a container sees onto this machine: ``NATS_URL`` onto the session's
nats-server, ``/run/secrets/<name>`` onto the secret's file in a project directory whose
``.sealstream/`` is made by ``sealstream up``'s ``prepare_state``, and each named volume onto an
empty directory (a fresh volume). It follows the setup steps written at the top of
compose.yaml, then starts the back end and runs the consumer service's command.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from producers import otlp_config
from sealops._stack import prepare_state, source_streams
from sealstream.crypto import ClusterIdentity
from sealstream.server import EmbeddedServer, ServerOptions, free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BIN = Path(sys.executable).parent
SEALSTREAM_SERVICES = ("proxy", "producer", "consumer")
#: a name of an environment variable that sealstream reads
ENV_NAME = re.compile(r"SEALSTREAM_[A-Z0-9_]+|NATS_URL")
SECRETS_DIR = "/run/secrets"
STATE_DIR = "./.sealstream/"

# --- compose.yaml as compose reads it ------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<invalid>))"
)


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's ``$$``, ``$NAME``, ``${NAME}``, ``${NAME:-default}`` and ``${NAME-default}``;
    an unset variable without a default is an error here (compose would use "")."""

    def value(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        if m["invalid"] is not None:
            raise ValueError(f"unsupported interpolation in {text!r}")
        name = m["braced"] or m["named"]
        found = variables.get(name)
        if m["op"] == ":-" and not found:
            return m["default"]
        if m["op"] == "-" and found is None:
            return m["default"]
        if found is None:
            raise ValueError(f"${name} is not set and has no default in {text!r}")
        return found

    return _VARIABLE.sub(value, text)


def _interpolated(node: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [_interpolated(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: _interpolated(item, variables) for key, item in node.items()}
    return node


def load_compose(variables: Mapping[str, str] | None = None) -> dict[str, Any]:
    """compose.yaml with YAML anchors and merge keys resolved, then interpolated."""
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(raw, dict)
    doc = _interpolated(raw, variables or {})
    assert isinstance(doc, dict)
    return doc


def command(service: Mapping[str, Any]) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(arg) for arg in cmd]


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = [item.partition("=") for item in env]
        assert all(sep for _, sep, _ in pairs), f"pass-through variables in {env}"
        return {name: value for name, _, value in pairs}
    assert all(value is not None for value in env.values()), f"pass-through variables in {env}"
    return {str(name): str(value) for name, value in env.items()}


def secret_mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Path in the container -> name of the top-level secret mounted there."""
    mounts: dict[str, str] = {}
    for entry in service.get("secrets") or []:
        if isinstance(entry, str):
            source = target = entry
        else:
            source = entry["source"]
            target = entry.get("target", source)
        mounts[target if target.startswith("/") else f"{SECRETS_DIR}/{target}"] = source
    return mounts


def volume_mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Path in the container -> source of the volume mounted there."""
    mounts: dict[str, str] = {}
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            source, target = entry.split(":")[:2]
        else:
            source, target = entry["source"], entry["target"]
        mounts[target] = source
    return mounts


def console_scripts() -> dict[str, str]:
    """Console script -> ``module:function`` of its entry point (pyproject.toml)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    scripts: dict[str, str] = project["scripts"]
    return scripts


def env_names_read_by(package: str) -> set[str]:
    """The string constants in a package's source that name an environment variable."""
    names: set[str] = set()
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and ENV_NAME.fullmatch(node.value)
            ):
                names.add(node.value)
    return names


def parse_args(argv: list[str]) -> Any:
    """Parse a service command with its console script's own argument parser."""
    module = console_scripts()[argv[0]].partition(":")[0]
    return importlib.import_module(module)._parser().parse_args(argv[1:])


# --- the static checks ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def test_every_variable_has_a_default() -> None:
    """``docker compose up`` with an empty environment and no .env works."""
    load_compose({})


def test_services(compose: dict[str, Any]) -> None:
    assert {"nats", *SEALSTREAM_SERVICES} <= set(compose["services"])


def test_nats_is_the_official_image_with_jetstream_and_a_healthcheck(
    compose: dict[str, Any],
) -> None:
    nats = compose["services"]["nats"]
    m = re.fullmatch(r"nats:(\d+)\.(\d+)(?:\.\d+)?(?:-alpine[\d.]*)?", nats["image"])
    assert m, f"not the official nats image: {nats['image']}"  # no registry, no namespace
    assert (int(m[1]), int(m[2])) >= (2, 11)  # a replay reads in batches (2.11)
    argv = command(nats)
    assert "-js" in argv or "--jetstream" in argv
    monitor = argv[argv.index("-m") + 1] if "-m" in argv else argv[argv.index("--http_port") + 1]
    check = " ".join(nats["healthcheck"]["test"])
    assert f":{monitor}/healthz" in check
    # The default image is FROM scratch: only the alpine variant has wget for the check.
    assert "-alpine" in nats["image"]
    store = argv[argv.index("-sd") + 1] if "-sd" in argv else argv[argv.index("--store_dir") + 1]
    volumes = volume_mounts(nats)
    assert volumes.get(store) in compose["volumes"], "the JetStream store is not on a volume"


@pytest.mark.parametrize("name", SEALSTREAM_SERVICES)
def test_sealstream_service_runs_one_of_our_commands(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    assert "entrypoint" not in service, "the command must be the whole argv"
    argv = command(service)
    scripts = console_scripts()
    assert argv[0] in scripts, f"{name} runs {argv[0]!r}, not one of {sorted(scripts)}"
    parse_args(argv)  # the console script accepts its arguments
    assert service["build"]["context"] == "."
    assert service["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    assert int(service["build"]["args"]["UID"]) != 0
    assert service["image"] == compose["services"]["proxy"]["image"], "one image for all roles"


@pytest.mark.parametrize("name", SEALSTREAM_SERVICES)
def test_environment_names_are_read_by_the_command(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    package = console_scripts()[command(service)[0]].partition(".")[0]
    read = env_names_read_by(package) | env_names_read_by("sealstream")  # the core reads some
    assert "NATS_URL" in read, f"the scan of {package}/ found nothing"
    unknown = set(environment(service)) - read
    assert not unknown, f"{name} sets {sorted(unknown)}, which {package}/ never reads"
    assert urlsplit(environment(service)["NATS_URL"]).netloc == "nats:4222"


@pytest.mark.parametrize("name", SEALSTREAM_SERVICES)
def test_secrets_and_volumes(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    top = compose.get("secrets") or {}
    for source in secret_mounts(service).values():
        assert source in top, f"{name} uses secret {source!r}, not in the top-level secrets"
        assert top[source]["file"].startswith(STATE_DIR), top[source]
    for source in volume_mounts(service).values():
        assert source in (compose.get("volumes") or {}), f"{name}: {source!r} is not a named volume"
    # A path in the environment lies on a secret or on a volume, never in the image.
    for value in environment(service).values():
        if value.startswith("/"):
            mounts = [*secret_mounts(service), *volume_mounts(service)]
            assert any(value == m or value.startswith(m + "/") for m in mounts), value


def test_dependencies_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in SEALSTREAM_SERVICES:
        assert services[name]["depends_on"]["nats"]["condition"] == "service_healthy", name
    for name in ("proxy", "producer"):  # a health check, run below; the consumer waits for it
        assert services[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        assert services["consumer"]["depends_on"][name]["condition"] == "service_healthy"
    assert services["consumer"]["profiles"] == ["consumer"]
    assert all("profiles" not in services[name] for name in ("nats", "proxy", "producer"))


def test_producer_key_is_the_one_the_trust_store_pins(compose: dict[str, Any]) -> None:
    producer = compose["services"]["producer"]
    env = environment(producer)
    source = secret_mounts(producer)[env["SEALSTREAM_KEY_FILE"]]
    assert compose["secrets"][source]["file"] == f"{STATE_DIR}cluster-key.jwk"
    assert env["SEALSTREAM_SOURCES"] == "http_events,host_metrics,otlp:0.0.0.0:4318:4317"


def test_the_producer_receives_otlp_on_the_hosts_loopback(compose: dict[str, Any]) -> None:
    """The receiver listens on its container's interfaces, on the ports compose publishes on
    the host's 127.0.0.1 only (as ``sealstream up --otlp``)."""
    producer = compose["services"]["producer"]
    otlp = otlp_config(environment(producer)["SEALSTREAM_SOURCES"].split(","))
    assert otlp is not None
    assert otlp.host == "0.0.0.0"
    assert producer["ports"] == [
        f"127.0.0.1:{otlp.port}:{otlp.port}",
        f"127.0.0.1:{otlp.grpc_port}:{otlp.grpc_port}",
    ]
    assert (otlp.port, otlp.grpc_port) == (4318, 4317)  # what the OpenTelemetry SDKs default to


def test_every_role_has_its_own_nats_user(compose: dict[str, Any]) -> None:
    nats = compose["services"]["nats"]
    conf = secret_mounts(nats)
    assert command(nats)[:2] == ["-c", next(iter(conf))]
    assert compose["secrets"][conf[next(iter(conf))]]["file"] == f"{STATE_DIR}nats.conf"
    users = {
        name: environment(compose["services"][name]).get("SEALSTREAM_NATS_USER")
        for name in SEALSTREAM_SERVICES
    }
    # consumers have no NATS user: they log in with their session id and token, through the
    # auth callout that the proxy answers with the issuer key made by `sealstream up`
    assert users == {"proxy": "proxy", "producer": "producer-demo", "consumer": None}
    consumer = compose["services"]["consumer"]
    assert not any("NATS_PASSWORD" in key for key in environment(consumer))
    proxy = compose["services"]["proxy"]
    seed = secret_mounts(proxy)[environment(proxy)["SEALSTREAM_CALLOUT_ISSUER_SEED_FILE"]]
    assert compose["secrets"][seed]["file"] == f"{STATE_DIR}callout-issuer.nk"


def test_consumer_command(compose: dict[str, Any]) -> None:
    producer = compose["services"]["producer"]
    up_default = importlib.import_module("sealops._cli")._parser().parse_args(["up"]).cluster
    args = parse_args(command(compose["services"]["consumer"]))
    assert args.output == "jsonl"
    assert args.cluster == environment(producer)["SEALSTREAM_CLUSTER"] == up_default
    assert not args.limit, "by default the consumer runs until it is stopped"
    chosen = load_compose({"SEALSTREAM_CLUSTER": "c-7", "SEALSTREAM_CONSUME_LIMIT": "7"})
    args = parse_args(command(chosen["services"]["consumer"]))
    assert (args.cluster, args.limit) == ("c-7", 7)
    assert environment(chosen["services"]["producer"])["SEALSTREAM_CLUSTER"] == "c-7"


# --- the Dockerfile ---------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        word, _, rest = (pending + stripped).partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def test_dockerfile() -> None:
    instructions = dockerfile()
    froms = [args.split()[0] for word, args in instructions if word == "FROM"]
    assert len(froms) >= 2, "not a multi-stage build"
    assert set(froms) == {"python:3.11-slim"}
    runs = [args for word, args in instructions if word == "RUN"]
    installs = [r for r in runs if re.search(r"pip install(\s+-\S+)*\s+\.(\s|$)", r)]
    assert installs, "the project is not installed with pip install ."
    assert not any("[dev]" in r for r in runs), "dev extras in the image"
    assert all(word != "ENTRYPOINT" for word, _ in instructions)
    # The last USER, with build arguments at their defaults, is not root.
    defaults = {a.partition("=")[0]: a.partition("=")[2] for w, a in instructions if w == "ARG"}
    users = [args for word, args in instructions if word == "USER"]
    assert users, "no USER: the image runs as root"
    user = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults[m[1]], users[-1]).partition(":")[0]
    assert user not in ("", "root", "0"), users[-1]
    # No credentials in the image: nothing copied from .sealstream/, no secret in ENV or ARG.
    for word, args in instructions:
        if word in ("COPY", "ADD"):
            assert ".sealstream" not in args
            sources = [a for a in args.split()[:-1] if not a.startswith("--")]
            if {".", "./"} & set(sources):  # the whole context: .dockerignore must keep it out
                assert ".sealstream" in DOCKERIGNORE.read_text(encoding="utf-8")
        if word in ("ENV", "ARG"):
            assert not re.search(r"SEALSTREAM_|SECRET|TOKEN|PASSWORD|KEY", args, re.I), args


def test_dockerignore() -> None:
    entries = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".sealstream", ".venv", ".git", "build"} <= entries
    assert {".mypy_cache", ".ruff_cache", ".pytest_cache", "**/__pycache__"} <= entries


# --- the services, run locally ---------------------------------------------------------------


def host_env() -> dict[str, str]:
    """This machine's environment less sealstream's variables."""
    return {k: v for k, v in os.environ.items() if not ENV_NAME.fullmatch(k)}


@dataclass
class Host:
    """What compose would mount into a service's container, mapped onto local paths."""

    compose: dict[str, Any]
    project: Path  # where compose.yaml would be: relative secret files resolve against it
    volumes: Path  # one directory per named volume
    nats_url: str
    #: each container has its own network namespace; here each service needs its own port
    ports: dict[str, str] = field(default_factory=dict)

    def mounts(self, name: str) -> dict[str, Path]:
        service = self.compose["services"][name]
        mounts = {
            target: self.project / self.compose["secrets"][source]["file"]
            for target, source in secret_mounts(service).items()
        }
        for target, source in volume_mounts(service).items():
            mounts[target] = self.volumes / source
            mounts[target].mkdir(mode=0o700, parents=True, exist_ok=True)  # a fresh volume
        return mounts

    def path(self, name: str, value: str) -> str:
        """A path in the service's container -> the local path; anything else as it is."""
        option, eq, rest = value.partition("=")
        if eq and option.startswith("--"):
            return f"{option}={self.path(name, rest)}"
        for target, local in self.mounts(name).items():
            if value == target:
                return str(local)
            if value.startswith(target.rstrip("/") + "/"):
                return str(local / value[len(target.rstrip("/")) + 1 :])
        return value

    def argv(self, name: str, argv: list[str] | None = None) -> list[str]:
        """A command run in the service's container (its own by default), for this machine."""
        argv = command(self.compose["services"][name]) if argv is None else argv
        script = BIN / argv[0]
        assert script.is_file(), f"{argv[0]} is not installed in {BIN}"
        return [str(script), *(self.path(name, arg) for arg in argv[1:])]

    def env(self, name: str) -> dict[str, str]:
        """This machine's environment less sealstream's variables, plus the service's."""
        env = host_env()
        for key, value in environment(self.compose["services"][name]).items():
            env[key] = self.nats_url if key == "NATS_URL" else self.path(name, value)
        if "SEALSTREAM_METRICS_PORT" in env:
            env["SEALSTREAM_METRICS_PORT"] = self.ports.setdefault(name, str(free_port()))
        if otlp_config(env.get("SEALSTREAM_SOURCES", "").split(",")) is not None:
            # the receiver on this machine's loopback, on ports of its own
            http = self.ports.setdefault(f"{name}-otlp", str(free_port()))
            grpc = self.ports.setdefault(f"{name}-otlp-grpc", str(free_port()))
            env["SEALSTREAM_SOURCES"] = ",".join(
                f"otlp:127.0.0.1:{http}:{grpc}" if s.startswith("otlp") else s
                for s in env["SEALSTREAM_SOURCES"].split(",")
            )
        return env

    def healthcheck(self, name: str) -> int:
        """Exit status of the service's health check, run as the container would run it."""
        test = [str(arg) for arg in self.compose["services"][name]["healthcheck"]["test"]]
        if test[0] == "CMD-SHELL":
            argv = ["sh", "-c", " ".join(test[1:])]
        else:
            assert test[0] == "CMD", test
            argv = [sys.executable if test[1] == "python" else test[1], *test[2:]]
        done = subprocess.run(argv, env=self.env(name), capture_output=True, timeout=30)
        return done.returncode


@dataclass
class Running:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, event: str, *, timeout: float = 30.0) -> str:
        """The first log line with ``event``; fails if the process exits first."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.text().splitlines():
                if event in line:
                    return line
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited {self.proc.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: no {event} within {timeout} s:\n{self.text()}")
            time.sleep(0.1)

    def stop(self, *, timeout: float = 15.0) -> int:
        """SIGINT (Ctrl-C; compose sends SIGTERM, which the commands treat alike), then kill."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"{self.name} ignored SIGINT for {timeout} s:\n{self.text()}")
        return self.proc.returncode


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    """Start a service's process in the background; every one is killed at the end."""
    running: list[Running] = []

    def start_service(host: Host, name: str) -> Running:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                host.argv(name),
                env=host.env(name),
                cwd=host.volumes,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        running.append(Running(name, proc, log))
        return running[-1]

    yield start_service
    for r in running:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


def run(argv: list[str], *, env: Mapping[str, str] | None = None, timeout: float = 30.0) -> str:
    """Run a command to completion; its stdout, after checking it exited 0 cleanly."""
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


@pytest.mark.slow
def test_services_run_and_the_consumer_decrypts(
    request: pytest.FixtureRequest, tmp_path: Path, start: Any
) -> None:
    cluster = f"compose-{secrets.token_hex(4)}"  # its own cluster on the shared server
    limit = 5
    compose = load_compose({"SEALSTREAM_CLUSTER": cluster, "SEALSTREAM_CONSUME_LIMIT": str(limit)})
    host = Host(compose, project=tmp_path / "project", volumes=tmp_path / "volumes", nats_url="")
    host.volumes.mkdir()
    state = host.project / STATE_DIR

    # Setup step 1: the credentials of `sealstream up --otlp --dir .sealstream`.
    prepare_state(state, cluster, source_streams("http_events,host_metrics,otlp"))
    for source in compose["secrets"].values():
        assert (host.project / source["file"]).is_file(), f"sealstream up makes no {source}"
    kid = ClusterIdentity.load(state / "cluster-key.jwk").kid

    # The nats service: its configuration, one least-privilege user per role.
    nats_conf = host.project / compose["secrets"]["nats_conf"]["file"]
    server = EmbeddedServer(ServerOptions(config_file=nats_conf))
    host.nats_url = server.start()
    request.addfinalizer(server.stop)

    # `docker compose up`: the back end.
    proxy = start(host, "proxy")
    producer = start(host, "producer")
    proxy.wait_for("proxy.started")
    started = producer.wait_for("producer.started")
    assert f"cluster={cluster}" in started
    assert f"kid={kid}" in started, "the producer does not sign with the key on its volume"

    for name in ("proxy", "producer"):  # compose marks them healthy; the consumer waits
        deadline = time.monotonic() + 15
        while host.healthcheck(name) != 0:
            assert time.monotonic() < deadline, f"{name} is not healthy"
            time.sleep(0.2)

    # an application on the host exports OTLP/HTTP to the published port
    request_body = ExportTraceServiceRequest().SerializeToString()
    answer = urllib.request.urlopen(
        urllib.request.Request(
            f"http://127.0.0.1:{host.ports['producer-otlp']}/v1/traces",
            data=request_body,
            headers={"Content-Type": "application/x-protobuf"},
        ),
        timeout=30,
    )
    assert answer.status == 200
    ExportTraceServiceResponse.FromString(answer.read())

    # `SEALSTREAM_CONSUME_LIMIT=5 docker compose run --rm consumer`
    out = run(host.argv("consumer"), env=host.env("consumer"), timeout=60)
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) >= limit
    assert {r["stream"] for r in records} <= {"http_events", "host_metrics"}
    assert all(isinstance(r["seq"], int) and isinstance(r["row"], dict) for r in records)

    # The back end stayed up, and stops cleanly.
    for service in (proxy, producer):
        assert service.proc.poll() is None, f"{service.name} exited:\n{service.text()}"
    for service in (proxy, producer):
        assert service.stop() == 0, service.text()
        assert "Traceback" not in service.text(), service.text()
    assert "proxy.stopped" in proxy.text()
    assert "producer.stopped" in producer.text()
    assert host.healthcheck("proxy") != 0, "the health check passes with no proxy"
