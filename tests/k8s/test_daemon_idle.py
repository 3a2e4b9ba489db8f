"""The daemon's own CPU while the API server is down at start (issue 14, "the control plane
under bad conditions"): a node booting before its control plane.

The real ``uproxy run`` runs as a subprocess against the fake API server, which answers
errors or has its port closed. Its CPU time (utime + stime from ``/proc``) over three
seconds must stay small: with nothing to do the daemon waits, it does not spin. It stays
not-ready meanwhile (``/readyz`` 503) and is ready as soon as the API answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.waiting import wait_until_async

from .apiserver import FakeApiServer, endpoint_slice, node, service

REPO = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: CPU seconds the idle daemon may use in MEASURE seconds (retries every <= 1 s, three
#: resources). A spinning sync loop uses a whole core: 3 s, or >= 0.6 s on a busy machine.
MEASURE = 3.0
CPU_BUDGET = 0.3


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def readyz(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(bookmark_interval=0.3)
    await server.start()
    server.apply(node("node-a"))
    server.apply(service("web", cluster_ip="10.96.0.10"))
    server.apply(endpoint_slice("web", ["10.0.0.1"]))
    try:
        yield server
    finally:
        await server.stop()


@contextlib.contextmanager
def uproxy_run(kubeconfig: Path, health_port: int,
               log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "UPROXY_MANAGE_IPTABLES": "false",
           "UPROXY_KUBE_BACKOFF_INITIAL": "0.2s", "UPROXY_KUBE_BACKOFF_MAX": "1s"}
    log_file = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uproxy", "run", "--kubeconfig", str(kubeconfig),
         "--hostname-override", "node-a", "--bind-address", "127.0.0.1",
         "--nodeport-addresses", "127.0.0.1/32",
         "--status-address", f"127.0.0.1:{free_port()}",
         "--healthz-address", f"127.0.0.1:{health_port}"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log_file.close()


@pytest.mark.parametrize("down", ["errors", "closed"])
async def test_api_down_at_start_uses_no_cpu_then_serves(
    api: FakeApiServer, tmp_path: Path, down: str
) -> None:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    if down == "errors":
        api.fail_next(1_000_000, 503)
    else:
        api.outage(3600, refuse=True)
    health = free_port()
    with uproxy_run(kubeconfig, health, tmp_path / "uproxy.log") as proc:
        async def status() -> int | None:
            return await asyncio.to_thread(readyz, health)

        await wait_until_async(status, timeout=30, interval=0.2,
                               message="the health server to answer")
        assert await status() == 503  # not ready
        before = cpu_seconds(proc.pid)
        await asyncio.sleep(MEASURE)
        used = cpu_seconds(proc.pid) - before
        assert proc.poll() is None, (tmp_path / "uproxy.log").read_text()
        assert used < CPU_BUDGET, f"{used:.2f} CPU seconds in {MEASURE:g} s with the API down"
        assert await status() == 503
        # The API answers: ready within the backoff cap (1 s) plus a list.
        if down == "errors":
            api._fail.clear()
        else:
            api._outage_until = 0.0
            if api._reopen is not None:
                api._reopen.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await api._reopen
            await api._open_port()

        async def ready() -> bool:
            return await status() == 200

        await wait_until_async(ready, timeout=10, interval=0.2,
                               message="ready once the API answers")
        # and ready with nothing to do: no CPU either (watches open, no events)
        before = cpu_seconds(proc.pid)
        await asyncio.sleep(MEASURE)
        used = cpu_seconds(proc.pid) - before
        assert used < CPU_BUDGET, f"{used:.2f} CPU seconds in {MEASURE:g} s when idle"
