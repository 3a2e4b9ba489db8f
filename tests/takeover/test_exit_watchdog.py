"""A uproxy that handed everything over does not hold up the upgrade, whatever hangs in it."""

from __future__ import annotations

import subprocess
import sys
import time

HANGS = """
import logging, sys, threading, time
logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(message)s")
from uproxy.daemon import _exit_watchdog
_exit_watchdog(0.3)
threading.Event().wait(30)  # a shutdown step that never returns
"""

STOPS = """
import sys, time
from uproxy.daemon import _exit_watchdog
_exit_watchdog(0.3).cancel()  # UPROXY_AFTER_HANDOVER=wait: staying on is the point
time.sleep(1.0)
print("still here", flush=True)
"""


def test_a_hung_old_uproxy_exits_after_the_grace_with_every_threads_stack() -> None:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HANGS], capture_output=True, text=True,
                          timeout=20)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert took < 15, took  # not the 30 s the hang would take
    assert "still not stopped: exiting now" in done.stderr, done.stderr
    assert "Thread 0x" in done.stderr and "in wait" in done.stderr, done.stderr  # the stacks


def test_a_cancelled_watchdog_leaves_the_process_alone() -> None:
    done = subprocess.run([sys.executable, "-c", STOPS], capture_output=True, text=True,
                          timeout=20)
    assert done.returncode == 0, done.stderr
    assert "still here" in done.stdout and "exiting now" not in done.stderr, done.stderr
