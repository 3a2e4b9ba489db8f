"""Running a command from the daemon without the event loop's own spawn.

:func:`spawn` runs one process to its end from a worker thread with ``subprocess``
(``vfork``). Not the event loop's own spawn: uvloop's ``fork`` copies the whole daemon's
page tables, ~30-60 ms of the loop's time per process once 10,000 Services are loaded,
against ~3 ms here (``bench/ANALYSIS.md``, "Start-up with 10,000 Services"). Used by the
edges that run iptables, nft and ip.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence


async def spawn(argv: Sequence[str], stdin: str | None = None,
                timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to its end (``stdin`` fed as text, else /dev/null); its result.

    Raises ``OSError`` (cannot run) and ``subprocess.TimeoutExpired`` (killed).
    """
    def call() -> subprocess.CompletedProcess[bytes]:
        if stdin is not None:
            return subprocess.run(list(argv), input=stdin.encode(), capture_output=True,
                                  timeout=timeout, check=False)
        return subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, check=False)

    return await asyncio.get_running_loop().run_in_executor(None, call)
