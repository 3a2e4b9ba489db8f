"""The benchmark's baseline peer (``python -m bench --baseline REV``): uproxy as it was at a
commit of this repository, unpacked and built beside the checkout, runs for real.

The tree is this checkout's own HEAD (any commit goes the same way): ``git archive``, its
native module built, then ``uproxy run`` from that tree in the lab's node namespace -- the
daemon's working directory and its native module are the tree's, not the checkout's, and a
Service reaches the echo pod through it. An older uproxy lacks some of the flags the lab's
:class:`NodeProxy` passes; those are left out by what the tree's ``--help`` lists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.peers import build_baseline
from uproxy.demo.lab import Lab, LabError
from uproxy.demo.node import NodeProxy, endpoint_slice, service

ROOT = Path(__file__).resolve().parents[2]


def _head() -> str:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no commit to build a baseline from")
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_the_baseline_tree_runs_its_own_uproxy_through_a_cluster_ip(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(pods=1, name_hint="baseline")
    tree = build_baseline(_head(), lab.workdir)
    assert (tree / ".built").exists()
    assert list((tree / "uproxy").glob("_native*.so")), "its native module was not built"
    assert build_baseline(_head(), lab.workdir) == tree  # built once per run
    lab.start_echo(1, tcp_ports=(9876,))
    node = NodeProxy(lab, name="baseline", source=tree)
    assert node.knows("--state-dir") and not node.knows("--no-such-flag")
    node.write("echo.yaml", service("echo", "10.0.0.77", [{"port": 80, "targetPort": 9876}]),
               endpoint_slice("echo", [lab.pod_ip(1)],
                              [{"name": "", "port": 9876, "protocol": "TCP"}]))
    node.start()
    try:
        assert node.proc is not None
        pid = node.proc.pid
        # the namespace runner execs python: the daemon is the spawned process itself
        assert Path(os.readlink(f"/proc/{pid}/cwd")) == tree
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert str(tree / "uproxy" / "_native") in maps, "not the tree's native module"
        assert str(ROOT / "uproxy" / "_native") not in maps
        echo = lab.probe("echo", "10.0.0.77", "80", "--bytes", str(1 << 20))
        assert echo["ok"] and echo["received"] == 1 << 20, echo
    finally:
        assert node.stop() == 0


def test_a_revision_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    _head()
    with pytest.raises(LabError) as info:
        build_baseline("0" * 40, tmp_path)
    text = str(info.value)
    assert text.startswith("baseline 000000000000: git archive failed: ") and "\n" not in text
