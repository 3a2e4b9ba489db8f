"""This node's Node through the API: its primary IPs (``--nodeport-addresses primary``)
and its zone for topology follow the Node object."""

from __future__ import annotations

from tests.support.waiting import wait_until_async

from .apiserver import FakeApiServer, node
from .test_kube_source import NODE, api, kubeconfig, running

__all__ = ["api", "kubeconfig"]  # the fixtures, shared with test_kube_source


async def test_node_ips_and_zone_follow_the_node(api: FakeApiServer, kubeconfig: str) -> None:
    mine = node(NODE, zone="zone-a")
    mine["status"] = {"addresses": [{"type": "Hostname", "address": NODE},
                                    {"type": "InternalIP", "address": "10.0.0.5"}]}
    api.create(mine)
    async with running(kubeconfig) as (source, _store, hooks):
        await wait_until_async(lambda: source.node_ips == ("10.0.0.5",), timeout=10,
                               message="node IPs")
        assert source.node_zone == "zone-a"
        changes = hooks.changes
        mine["status"]["addresses"][1]["address"] = "10.0.0.6"
        mine["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-b"
        api.update(mine)
        await wait_until_async(lambda: (source.node_ips, source.node_zone)
                               == (("10.0.0.6",), "zone-b"), timeout=10, message="moved")
        assert hooks.changes > changes
