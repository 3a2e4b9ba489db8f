"""The service-proxy-name label through the files source and a running daemon (sockets only).

Editing the label in a manifest is a change like any other: the listeners close and open
again (e2e "should implement service.kubernetes.io/service-proxy-name", on one node).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.status.support import Stack, manifests, running_stack, write_manifests
from tests.support.waiting import wait_until_async
from uproxy.model import PROXY_NAME_LABEL, ServicePortName

ECHO = ServicePortName("default", "echo", "tcp", "TCP")


def _relabel(stack: Stack, labels: dict[str, str]) -> None:
    objs = manifests(stack.backend_port, stack.node_port)
    objs[0]["metadata"]["labels"] = labels
    write_manifests(stack.manifest_dir, objs)


@pytest.mark.parametrize("proxy_name", [None, "uproxy"])
async def test_label_toggled_in_a_manifest_closes_and_reopens_the_listeners(
    tmp_path: Path, proxy_name: str | None
) -> None:
    ours = {} if proxy_name is None else {PROXY_NAME_LABEL: proxy_name}
    async with running_stack(tmp_path, wait_ready=False, service_proxy_name=proxy_name) as stack:
        daemon = stack.daemon
        if proxy_name is not None:  # unlabelled: not ours with the flag
            await wait_until_async(lambda: daemon.ready, timeout=10, message="ready")
            assert ECHO not in daemon.served
            _relabel(stack, ours)

        def listening() -> bool:
            return any(key.name == ECHO for key in daemon.listeners)

        await wait_until_async(listening, timeout=10, message="echo served")
        _relabel(stack, {PROXY_NAME_LABEL: "foo-bar"})
        await wait_until_async(lambda: not listening() and ECHO not in daemon.served,
                               timeout=10, message="echo no longer served")
        _relabel(stack, ours)
        await wait_until_async(listening, timeout=10, message="echo served again")
