"""The loop x relay-path matrix, defined once: (asyncio | uvloop) x (native | python).

uproxy's data path has two twins, the cffi engine (``native/``) and the pure-Python one,
and it runs on either event loop; a test of the data path runs on every combination, as
uvloop's suite runs each network test on both loops and aiohttp's parametrises its
fixtures over the C and Python parsers. The combinations live here and nowhere else:

- ``flavor`` (tests/conftest.py) parametrises a test over :data:`FLAVORS`;
  ``native_flavor`` over :data:`NATIVE_FLAVORS` (both loops, native path: what only
  the engine has, such as its pipe pool).
- :func:`run_on` runs a coroutine on a fresh loop of the flavor's kind.
- :func:`relay_for` builds the flavor's relay (native: :data:`NATIVE_THREADS` engine
  threads); in-process proxies take ``flavor.native``;
  the daemon in the lab takes ``NodeProxy(lab, loop=flavor.loop, native=flavor.native)``.

:func:`select_path` is the harness's only question to :mod:`uproxy.native`: whether the
native path can run in this process. A native flavor is skipped (with the reason) when it
cannot; that skip is never silent in CI, because ``test_native_module_is_built_and_active``
fails on the same cause.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop

from uproxy import native
from uproxy.proxy.nativerelay import NativeRelay
from uproxy.proxy.pyrelay import PyRelay
from uproxy.proxy.relay import Relay

LOOPS = ("asyncio", "uvloop")
PATHS = ("native", "python")


@dataclass(frozen=True)
class Flavor:
    """One cell of the matrix: an event loop and a relay path."""

    loop: str  # "asyncio" | "uvloop"
    path: str  # "native" | "python"

    @property
    def native(self) -> bool:
        return self.path == "native"

    def __str__(self) -> str:  # the test id: "uvloop-native", "asyncio-python", ...
        return f"{self.loop}-{self.path}"


FLAVORS = tuple(Flavor(loop, path) for loop in LOOPS for path in PATHS)
NATIVE_FLAVORS = tuple(f for f in FLAVORS if f.native)

_LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def select_path(flavor: Flavor) -> Flavor:
    """Make sure ``flavor``'s relay path can run here, or skip the test saying why.

    The one place the harness asks :mod:`uproxy.native` which twin is in use; when that
    choice moves (e.g. to ``native.select(no_native)``), adapt this function only.
    """
    if flavor.native and native.ACTIVE != "native":
        pytest.skip(f"native path not active: {native.REASON}")
    return flavor


NATIVE_THREADS = 2
"""Engine threads of the native flavor's relay: a group (``--engine-threads``), as the daemon
runs on a machine with two cores or more; tests that need one thread say ``threads=1``."""


def relay_for(flavor: Flavor, loop: asyncio.AbstractEventLoop, **native_opts: int) -> Relay:
    """The relay twin of ``flavor`` (``native_opts`` go to the native engine only)."""
    if flavor.native:
        native_opts.setdefault("threads", NATIVE_THREADS)
        return NativeRelay(loop, **native_opts)
    return PyRelay(loop)


def run_on(where: Flavor | str, main: Callable[[], Coroutine[Any, Any, None]], *,
           timeout: float | None = 30.0) -> None:
    """Run ``main()`` on a fresh event loop of ``where``'s kind (a flavor or a loop name),
    bounded by ``timeout`` seconds so a hang fails this test instead of the whole run."""
    loop_name = where.loop if isinstance(where, Flavor) else where
    factory = _LOOP_FACTORIES[loop_name]

    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await main()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(bounded())
