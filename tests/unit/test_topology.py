"""The hub-and-leaves configuration: what each account exports and imports, what a leaf link
may carry, and what a site's leaf node listens for (the real servers run it in
tests/system/test_hub.py)."""

from __future__ import annotations

import re

import pytest

from sealstream.natsconf import RoleUser
from sealstream.topology import (
    HubCredentials,
    HubNode,
    account_name,
    hub_config,
    leaf_config,
)

NODES = [HubNode(name=f"hub-{i}", host=f"h{i}") for i in range(3)]


@pytest.fixture(scope="module")
def creds() -> HubCredentials:
    # ids at the edges of the cluster-id alphabet
    return HubCredentials.generate(["-a", "b_", "c" * 64])


def test_credentials_round_trip(creds: HubCredentials) -> None:
    again = HubCredentials.from_json(creds.to_json())
    assert again == creds
    assert again.clusters == ["-a", "b_", "c" * 64]


def test_a_leaf_link_per_cluster() -> None:
    creds = HubCredentials.generate(["x"])
    with pytest.raises(ValueError, match="one leaf link"):
        HubCredentials(creds.roles, {"y": RoleUser("leaf-y", "p")})


def test_hub_node_routes_to_the_others_only(creds: HubCredentials) -> None:
    text = hub_config(NODES, 1, creds, issuer="A" * 56, store_dir="/data")
    assert 'server_name: "hub-1"' in text
    routes = re.search(r"routes: \[(.*)\]", text)
    assert routes is not None
    assert routes.group(1) == '"nats-route://h0:6222", "nats-route://h2:6222"'
    assert 'listen: "h1:7422"' in text
    assert 'store_dir: "/data"' in text
    with pytest.raises(ValueError):
        hub_config(NODES, 3, creds, issuer="A" * 56, store_dir="/data")


def test_each_cluster_exports_only_its_subjects_to_the_hub_account(creds: HubCredentials) -> None:
    text = hub_config(NODES, 0, creds, issuer="A" * 56, store_dir="/data")
    for c in creds.clusters:
        account = account_name(c)
        start = text.index(f"  {account}: {{")
        block = text[start : text.index("\n  }", start)]
        assert f'stream: "sealstream.cluster.{c}.data.*"' in block
        assert f'stream: "sealstream.cluster.{c}.group.*"' in block
        assert f'service: "sealstream.cluster.{c}.control"' in block
        # and of the site's store, its info and one message's read, in the site's domain
        stream = f"sealstream_store_{c}"
        assert f'service: "$JS.site-{c}.API.STREAM.INFO.{stream}"' in block
        assert f'service: "$JS.site-{c}.API.STREAM.MSG.GET.{stream}"' in block
        assert f'service: "$JS.site-{c}.API.DIRECT.GET.{stream}"' in block
        assert block.count('accounts: ["SEALSTREAM"]') == 6
        assert block.count("$JS.") == 6  # the three exports, and the link's three reads
        # its only user is the leaf link, usable on the leafnode port only
        assert block.count("user:") == 1
        assert 'allowed_connection_types: ["LEAFNODE"]' in block
        others = [o for o in creds.clusters if o != c]
        assert not any(f".cluster.{o}." in block for o in others)
    assert text.count(f'account: "{account_name("-a")}"') == 6  # six imports, no more


def test_site_leaf_node_dials_out_only(creds: HubCredentials) -> None:
    text = leaf_config("b_", creds, NODES, store_dir="/data")
    link = creds.links["b_"]
    for n in NODES:
        assert f"nats-leaf://{link.user}:{link.password}@{n.host}:7422" in text
    assert "listen" not in text  # no inbound leafnode port, no routes
    assert "cluster:" not in text
    assert text.count("user:") == 1  # the producer
    assert creds.roles.producers["b_"].user in text
    assert ".cluster.-a." not in text
    # the cluster's store, in the site's own JetStream domain
    assert 'jetstream: {\n  store_dir: "/data"\n  domain: "site-b_"\n}' in text
