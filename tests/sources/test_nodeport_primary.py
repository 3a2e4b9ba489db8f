"""``--nodeport-addresses primary``: the node's primary address (kube-proxy's meaning).

The primary IPs come from the Node object's ``status.addresses`` (InternalIP before
ExternalIP, one per family, as kube-proxy's ``GetNodeHostIPs``), through the API or a
``kind: Node`` manifest; without one, from the default route's source address. Loopback
addresses are never used.
"""

from __future__ import annotations

from typing import Any

import pytest

from uproxy.model import node_host_ips
from uproxy.proxy.node_addresses import nodeport_addresses, primary_addresses
from uproxy.settings import SettingsError, load
from uproxy.state import Store


def node(*addresses: tuple[str, str]) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": "n1"},
            "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]}}


@pytest.mark.parametrize(("addresses", "expected"), [
    ((), ()),
    ((("Hostname", "n1"), ("InternalIP", "10.0.0.5")), ("10.0.0.5",)),
    ((("ExternalIP", "203.0.113.5"), ("InternalIP", "10.0.0.5")), ("10.0.0.5",)),
    ((("InternalIP", "10.0.0.5"), ("InternalIP", "10.0.0.6"), ("InternalIP", "fd00::5")),
     ("10.0.0.5", "fd00::5")),
    ((("InternalIP", "fd00::5"), ("InternalIP", "10.0.0.5")), ("fd00::5", "10.0.0.5")),
    ((("ExternalIP", "203.0.113.5"),), ("203.0.113.5",)),
    ((("InternalIP", "not-an-ip"), ("InternalIP", "10.0.0.7")), ("10.0.0.7",)),
])
def test_node_host_ips(addresses: tuple[tuple[str, str], ...], expected: tuple[str, ...]) -> None:
    assert node_host_ips(node(*addresses)) == expected
    store = Store()
    store.apply("Node", node(*addresses))
    assert store.node_ips("n1") == expected


def test_primary_uses_the_node_ips_and_never_loopback() -> None:
    assert nodeport_addresses(("primary",), ("10.0.0.5", "fd00::5")) == ["10.0.0.5"]
    assert primary_addresses(("fd00::5", "10.0.0.5")) == ["10.0.0.5"]
    assert primary_addresses(("127.0.0.1",)) == []
    # without a Node: the default route's source, if this namespace has one (never loopback)
    assert all(not a.startswith("127.") for a in primary_addresses(()))


def test_the_setting() -> None:
    assert load({}, env={"UPROXY_NODEPORT_ADDRESSES": "primary"}).nodeport_addresses == (
        "primary",)
    assert load({}, env={"UPROXY_NODEPORT_ADDRESSES": "10.0.0.0/8"}).nodeport_addresses == (
        "10.0.0.0/8",)
    with pytest.raises(SettingsError):
        load({}, env={"UPROXY_NODEPORT_ADDRESSES": "primary,10.0.0.0/8"})
