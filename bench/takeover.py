"""The takeover figure (issue 15): replace a running uproxy holding many services and
connections, and measure how long the handover takes and the longest wait a client saw.

Runs inside the scale measurement (the daemon there already serves
``--scale-services`` services): ``bench.hold`` opens ``count`` idle connections through
the churn service, ``bench.stall`` keeps one keep-alive connection and a stream of new
connections busy, and a second ``uproxy run`` with the same ``--state-dir`` takes over.
Figures: the old process's own timing of the exchange (its log line "handed everything
to pid ... in X ms"), the new process's time from its start to its first sync, the
connections that came over, and the stall client's longest gaps and errors.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uproxy.demo.lab import Lab, LabError, terminate

HANDED = re.compile(r"handed everything to pid \d+ in ([\d.]+) ms")
MOVED = re.compile(r"handed over (\d+) connections")


def _json_line(lab: Lab, log_name: str) -> dict[str, Any] | None:
    lines = [line for line in lab.log(log_name).splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


FD_MARGIN = 300
"""Descriptors a uproxy holds besides listeners and connections (status, health, epoll,
pipes, the UDP side, the takeover socket), with room to spare."""


def nofile_hard() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def connections_that_fit(services: int, wanted: int) -> int:
    """Idle connections a uproxy with ``services`` listeners can hold within the hard
    open-files limit (two fds each); the new process of a takeover needs as many."""
    hard = nofile_hard()
    if hard < 0:  # RLIM_INFINITY
        return wanted
    return max(0, min(wanted, (hard - services - FD_MARGIN) // 2))


def measure(lab: Lab, s: dict[str, Any], *, root: Path, vip: str, port: int, count: int,
            argv: list[str], old: subprocess.Popen[bytes], old_log: str,
            log: Callable[[str], None]) -> subprocess.Popen[bytes]:
    """Take over from ``old`` (started with ``argv``); returns the new process."""
    env = ["env", f"PYTHONPATH={root}", sys.executable, "-m"]
    holder = lab.spawn("client", [*env, "bench.hold", vip, str(port), "--count", str(count),
                                  "--hold", "600", "--max-time", "120"], "takeover-hold")
    deadline = time.monotonic() + 150
    while (held := _json_line(lab, "takeover-hold")) is None:
        if holder.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"bench.hold: {lab.log('takeover-hold')[-800:]}")
        time.sleep(0.2)
    seconds = 12.0
    stall = lab.spawn("client", [*env, "bench.stall", vip, str(port), "--seconds",
                                 str(seconds)], "takeover-stall")
    time.sleep(2.0)
    started = time.monotonic()
    new = lab.spawn("node", argv, "uproxy-takeover")
    try:
        return _measure(lab, s, new=new, old=old, old_log=old_log, started=started,
                        deadline=deadline, seconds=seconds, stall=stall, holder=holder,
                        held=held, log=log)
    except BaseException:
        # A failed takeover leaves the old process serving (as it should): stop both, so
        # the runs that follow find the node's ports free.
        for proc in (new, stall, holder, old):
            terminate(proc, 30)
        raise


def _measure(lab: Lab, s: dict[str, Any], *, new: subprocess.Popen[bytes],
             old: subprocess.Popen[bytes], old_log: str, started: float, deadline: float,
             seconds: float, stall: subprocess.Popen[bytes], holder: subprocess.Popen[bytes],
             held: dict[str, Any], log: Callable[[str], None]) -> subprocess.Popen[bytes]:
    try:
        code = old.wait(120)
    except subprocess.TimeoutExpired:
        raise LabError(f"the old uproxy did not hand over: {lab.log(old_log)[-1500:]}"
                       ) from None
    s["takeover_wall_s"] = time.monotonic() - started  # includes the new one's start-up
    while "synced" not in lab.log("uproxy-takeover"):
        if new.poll() is not None or time.monotonic() > deadline + 120:
            raise LabError(f"the new uproxy: {lab.log('uproxy-takeover')[-1500:]}")
        time.sleep(0.05)
    s["takeover_to_sync_s"] = time.monotonic() - started
    stall.wait(seconds + 30)
    terminate(holder, 10)
    handed = HANDED.search(lab.log(old_log))
    moved = MOVED.search(lab.log(old_log))
    s["takeover_old_exit"] = code
    s["takeover_held"] = held.get("open")
    s["takeover_exchange_ms"] = float(handed.group(1)) if handed else None
    s["takeover_moved"] = int(moved.group(1)) if moved else None
    s["takeover_stall"] = _json_line(lab, "takeover-stall")
    log(f"  takeover: {s['takeover_moved']} connections ({held.get('open')} held idle) and "
        f"{s.get('services')} services handed over in {s['takeover_exchange_ms']} ms "
        f"(old exited {code}); new process start -> first sync "
        f"{s['takeover_to_sync_s']:.2f} s; client view: {s['takeover_stall']}")
    return new
