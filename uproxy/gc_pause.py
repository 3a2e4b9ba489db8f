"""No cyclic garbage collection while the daemon builds its first state.

Loading thousands of services allocates hundreds of thousands of containers
that all stay alive (parsed manifests, the store, the table, listeners), and
every collector pass would walk them, again and again; the load makes almost no
garbage cycles (reference counting frees the rest at once), so nothing is lost
by waiting. Collection resumes once the daemon is ready, when it stops, or
after :data:`GC_PAUSE_MAX` at the latest. (The measurements behind this are in
``bench/ANALYSIS.md``, "uproxy/gc_pause.py".)
"""

from __future__ import annotations

import asyncio
import gc

GC_PAUSE_MAX = 60.0
"""Start-up runs without the cyclic garbage collector until ready, at most this long."""


class GcPause:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._timer: asyncio.TimerHandle | None = None  # set while paused

    def pause(self) -> None:
        """Turn the collector off (if it is on) until :meth:`resume` or :data:`GC_PAUSE_MAX`."""
        if gc.isenabled():
            gc.disable()
            self._timer = self.loop.call_later(GC_PAUSE_MAX, self.resume)

    def resume(self) -> None:
        """Collect as usual again (only if :meth:`pause` turned it off).

        ``gc.freeze()`` first moves everything alive now -- the start-up state, which
        lives as long as the daemon -- out of the collector's sight, so neither the
        collection the re-enable would trigger nor any later full pass walks it again.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            gc.freeze()
            gc.enable()
