"""Which relay implementation is active: the compiled ``uproxy._native`` or the Python twin.

Importing uproxy never fails because the compiled module is missing: the
pure-Python path is used instead. The wiring chooses once, before anything
relays: :func:`select` with ``no_native=True`` (``UPROXY_NO_NATIVE=1``, read
by the cli, not here) forces the Python twin and the compiled module is never
loaded; without a choice the compiled module is loaded the first time anyone
asks. The outcome is :data:`ACTIVE` and :data:`REASON` (logged at start-up and
shown on the status page).
"""

from __future__ import annotations

import importlib
from typing import Any

NO_NATIVE_REASON = "UPROXY_NO_NATIVE is set"

_lib: Any = None
_ffi: Any = None
# Set by select() or at the first look (see __getattr__): "native" or "python", why, and
# whether the compiled module is loaded and in use.
ACTIVE: str
REASON: str
AVAILABLE: bool


def select(*, no_native: bool, reason: str = NO_NATIVE_REASON) -> None:
    """Choose the relay path: the Python twin when ``no_native`` (``reason`` says why),
    else the compiled module when it loads."""
    if no_native:
        _choose(None, reason)
    else:
        _load()


def _load() -> None:
    try:
        mod = importlib.import_module("uproxy._native")
    except ImportError as exc:  # not built (e.g. a source checkout without install)
        _choose(None, f"compiled module unavailable ({exc})")
    else:
        _choose(mod, "compiled module loaded")


def _choose(mod: Any, reason: str) -> None:
    global _lib, _ffi, ACTIVE, REASON, AVAILABLE
    _lib, _ffi = (mod.lib, mod.ffi) if mod is not None else (None, None)
    AVAILABLE = mod is not None
    ACTIVE = "native" if AVAILABLE else "python"
    REASON = reason


def _chosen() -> None:
    if "REASON" not in globals():
        _load()


def __getattr__(name: str) -> str | bool:
    # ACTIVE, REASON and AVAILABLE before any select(): the default choice.
    if name in ("ACTIVE", "REASON", "AVAILABLE"):
        _load()
        value: str | bool = globals()[name]
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lib() -> Any:
    """The cffi ``lib`` of the compiled module; raises if the Python path is active."""
    _chosen()
    if _lib is None:
        raise RuntimeError(f"native relay not active: {REASON}")
    return _lib


def ffi() -> Any:
    """The cffi ``ffi`` of the compiled module; raises if the Python path is active."""
    _chosen()
    if _ffi is None:
        raise RuntimeError(f"native relay not active: {REASON}")
    return _ffi


def describe() -> str:
    """One line for the start-up log: which path moves the bytes and why."""
    _chosen()
    return f"relay path: {ACTIVE} ({REASON})"
