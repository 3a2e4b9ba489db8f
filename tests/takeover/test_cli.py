"""Two real ``uproxy run`` processes and one state dir: the second takes over from the first.

Socket-only (``UPROXY_MANAGE_IPTABLES=false``), status and health on loopback port 0,
no manifests: what is checked is the processes' lifecycle, not the data path
(tests/takeover/test_lab.py does that in the lab).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.waiting import wait_until


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _start(procs: list[subprocess.Popen[str]], tmp_path: Path, **env: str
           ) -> subprocess.Popen[str]:
    (tmp_path / "m").mkdir(exist_ok=True)
    log = open(tmp_path / f"uproxy-{len(procs)}.log", "w")  # noqa: SIM115 (closed by the child)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uproxy", "run", "--manifests", str(tmp_path / "m"),
         "--state-dir", str(tmp_path / "state"), "--status-address", "127.0.0.1:0",
         "--healthz-address", "127.0.0.1:0", "--loop", "asyncio"],
        env={**os.environ, "UPROXY_MANAGE_IPTABLES": "false", **env},
        stdout=log, stderr=subprocess.STDOUT, text=True)
    log.close()
    procs.append(proc)
    return proc


def _log(tmp_path: Path, index: int) -> str:
    return (tmp_path / f"uproxy-{index}.log").read_text()


def _serving(tmp_path: Path, index: int) -> bool:
    return "synced" in _log(tmp_path, index) or "took over" in _log(tmp_path, index)


def _created(path: Path) -> int:
    try:
        return path.stat().st_ctime_ns
    except FileNotFoundError:
        return 0


def test_the_old_one_exits_0_after_handing_over(procs: list[subprocess.Popen[str]],
                                                tmp_path: Path) -> None:
    sock = tmp_path / "state" / "takeover.sock"
    old = _start(procs, tmp_path)
    wait_until(lambda: _created(sock), timeout=15)
    first = _created(sock)
    new = _start(procs, tmp_path)
    assert old.wait(20) == 0
    assert "stopped after handing over" in _log(tmp_path, 0)
    wait_until(lambda: _created(sock) not in (0, first), timeout=15)  # the new one's now
    assert new.poll() is None
    new.send_signal(signal.SIGTERM)
    assert new.wait(20) == 0
    assert not (tmp_path / "state" / "takeover.sock").exists()  # the last one cleans up


def test_with_after_handover_wait_the_old_one_idles_until_sigterm(
        procs: list[subprocess.Popen[str]], tmp_path: Path) -> None:
    old = _start(procs, tmp_path, UPROXY_AFTER_HANDOVER="wait")
    wait_until(lambda: (tmp_path / "state" / "takeover.sock").exists(), timeout=15)
    new = _start(procs, tmp_path, UPROXY_AFTER_HANDOVER="wait")
    wait_until(lambda: "waiting for SIGTERM" in _log(tmp_path, 0), timeout=20)
    wait_until(lambda: "took over" in _log(tmp_path, 1), timeout=15)
    assert old.poll() is None and new.poll() is None
    old.send_signal(signal.SIGTERM)
    assert old.wait(20) == 0
    # The idle old one's exit leaves the new one's socket in place for the next upgrade.
    assert (tmp_path / "state" / "takeover.sock").exists() and new.poll() is None
    new.send_signal(signal.SIGTERM)
    assert new.wait(20) == 0
