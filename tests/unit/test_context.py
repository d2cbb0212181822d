"""Contexts (``consumers.Context``): named defaults for the client commands, under the
environment and the flags, as the ``nats`` CLI has them."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from consumers import Context


@pytest.fixture(autouse=True)
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("SEALSTREAM_CONTEXT", raising=False)
    return tmp_path / "sealstream"


def test_a_saved_context_is_loaded_back_and_selected(config: Path) -> None:
    assert Context.load(None, {}) is None  # none selected, none named
    saved = Context(
        name="demo",
        nats_url="nats://127.0.0.1:4333",
        token_file="/s/token",
        cluster="demo",
        streams=("http_events", "orders"),
    )
    path = saved.save(select=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Context.load(None, {}) == saved
    assert Context.names() == ["demo"]
    Context(name="other", cluster="c2").save()
    assert Context.load(None, {}) == saved, "saving another does not select it"
    assert Context.load(None, {"SEALSTREAM_CONTEXT": "other"}).cluster == "c2"  # type: ignore[union-attr]
    Context.select("other")
    assert Context.load(None, {}).cluster == "c2"  # type: ignore[union-attr]


def test_the_environment_wins_over_the_context() -> None:
    ctx = Context(name="demo", nats_url="nats://a:1", token_file="/t", trust_store="/ts")
    env = ctx.under({"NATS_URL": "nats://b:2", "HOME": "/h"})
    assert (env["NATS_URL"], env["SEALSTREAM_TOKEN_FILE"], env["HOME"]) == (
        "nats://b:2",
        "/t",
        "/h",
    )
    # a token given as a value wins over the context's token file
    assert "SEALSTREAM_TOKEN_FILE" not in ctx.under({"SEALSTREAM_TOKEN": "x.y.z"})


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("nope", "--context nope: no such context"),
        ("../etc", "context name '../etc': use letters, digits"),
        ("-x", "context name '-x': use letters, digits"),
    ],
)
def test_a_context_that_cannot_be_is_refused_in_one_line(name: str, error: str) -> None:
    with pytest.raises(ValueError, match="^" + error.replace("(", r"\(")) as err:
        Context.load(name, {})
    assert "\n" not in str(err.value)
