"""This node's zone for topology: a ``kind: Node`` manifest, or ``--node-zone`` over it.

(Through the API the zone comes from the watched Node: tests/k8s/test_kube_source.py,
``test_node_zone_and_termination``.)
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.status.support import running_stack
from tests.support.waiting import wait_until_async

NODE = "status-test-node"  # the stack's --hostname-override


def node(name: str, zone: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}}


async def test_zone_from_a_node_manifest_follows_edits(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        daemon = stack.daemon
        assert daemon.balancer.zone is None
        path = stack.manifest_dir / "node.yaml"
        path.write_text(json.dumps(node("other-node", "zone-x")) + "\n---\n"
                        + json.dumps(node(NODE, "zone-a")))
        await wait_until_async(lambda: daemon.balancer.zone == "zone-a", timeout=10,
                               message=lambda: f"zone-a, not {daemon.balancer.zone}")
        path.write_text(json.dumps(node(NODE, "zone-b")))
        await wait_until_async(lambda: daemon.balancer.zone == "zone-b", timeout=10,
                               message=lambda: f"zone-b, not {daemon.balancer.zone}")


async def test_the_flag_wins_over_the_node(tmp_path: Path) -> None:
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "node.yaml").write_text(json.dumps(node(NODE, "zone-a")))
    async with running_stack(tmp_path, node_zone="zone-z") as stack:
        assert stack.daemon.balancer.zone == "zone-z"
