"""The proxy's session registry (pure: time is a parameter): a session of a cluster that keeps
a store outlives its last keepalive by its grace, every other one by the registry's ttl."""

from __future__ import annotations

from broker_proxy._registry import MAX_ENDED, SessionRegistry

SESSION, STORED = "-" + "A" * 42, "_" + "B" * 42  # ids starting with the edges of base64url


def _registry() -> SessionRegistry:
    registry = SessionRegistry(ttl_s=30.0, max_grace_s=120.0)
    for session, grace in ((SESSION, 0.0), (STORED, 120.0)):
        registry.add(session, cluster="c1", user="u", streams=("s",), now=0.0, grace_s=grace)
    return registry


def test_a_store_session_outlives_its_keepalive_by_its_grace() -> None:
    registry = _registry()
    assert registry.max_ttl_s == 120.0
    assert [e.session for e in registry.expire(now=30.0)] == [SESSION]
    assert registry.expire(now=119.9) == []
    assert [e.session for e in registry.expire(now=120.0)] == [STORED]
    assert len(registry) == 0


def test_a_keepalive_and_an_outage_give_each_session_its_own_span() -> None:
    registry = _registry()
    registry.touch(SESSION, now=100.0)
    registry.touch(STORED, now=100.0)
    entries = {e.session: e.expires_at for e in registry.entries()}
    assert entries == {SESSION: 130.0, STORED: 220.0}
    registry.extend(now=200.0)  # after a broker outage
    assert {e.session: e.expires_at for e in registry.entries()} == {SESSION: 230.0, STORED: 320.0}


def test_a_grace_shorter_than_the_ttl_changes_nothing() -> None:
    registry = SessionRegistry(ttl_s=30.0)
    entry = registry.add(SESSION, cluster="c1", user="u", streams=(), now=0.0, grace_s=5.0)
    assert (entry.expires_at, registry.max_ttl_s) == (30.0, 30.0)


def test_an_ended_session_is_kept_for_its_owners_last_resume_only() -> None:
    """An expired or ended session leaves the live registry (no relay, no keepalive, no count
    against its user) but stays known for ``ended_keep_s``; a closed one is simply gone; the
    ended ones are bounded, the oldest going first."""
    registry = SessionRegistry(ttl_s=30.0, ended_keep_s=600.0)
    registry.add(SESSION, cluster="c1", user="u", streams=("s",), now=0.0)
    registry.add(STORED, cluster="c1", user="u", streams=("s",), now=0.0)
    assert [e.session for e in registry.expire(now=30.0)] == [SESSION, STORED]
    assert (len(registry), registry.sessions_of("u"), registry.get(SESSION)) == (0, 0, None)
    ended = registry.ended(SESSION, now=629.9)
    assert ended is not None
    assert (ended.cluster, ended.user) == ("c1", "u")
    assert registry.ended(SESSION, now=630.0) is None  # past its keep
    registry.prune_ended(now=630.0)
    assert registry.ended(STORED, now=0.0) is None  # pruned
    registry.add(SESSION, cluster="c1", user="u", streams=("s",), now=700.0)
    registry.remove(SESSION)  # closed by its consumer: not kept
    assert registry.ended(SESSION, now=700.0) is None
    assert SessionRegistry(ttl_s=30.0).end(SESSION, now=0.0) is None
    kept = SessionRegistry(ttl_s=30.0, ended_keep_s=1.0)
    for i in range(MAX_ENDED + 1):
        kept.add(f"s{i}", cluster="c1", user="u", streams=(), now=0.0)
        kept.end(f"s{i}", now=0.0)
    assert kept.ended("s0", now=0.0) is None
    assert kept.ended(f"s{MAX_ENDED}", now=0.0) is not None
