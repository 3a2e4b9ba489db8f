"""Which relay implementation is active: the compiled ``uproxy._native`` or the Python twin.

Importing uproxy never fails because the compiled module is missing: the
pure-Python path is used instead. ``UPROXY_NO_NATIVE=1`` forces it. The choice
is made once, at import, and is visible as :data:`ACTIVE` (logged at start-up
and shown on the status page).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

_lib: Any = None
_ffi: Any = None
REASON: str

if os.environ.get("UPROXY_NO_NATIVE", "") not in ("", "0"):
    REASON = "UPROXY_NO_NATIVE is set"
else:
    try:
        _mod = importlib.import_module("uproxy._native")
        _lib, _ffi = _mod.lib, _mod.ffi
        REASON = "compiled module loaded"
    except ImportError as exc:  # not built (e.g. a source checkout without install)
        REASON = f"compiled module unavailable ({exc})"

AVAILABLE: bool = _lib is not None
ACTIVE: str = "native" if AVAILABLE else "python"


def lib() -> Any:
    """The cffi ``lib`` of the compiled module; raises if the Python path is active."""
    if _lib is None:
        raise RuntimeError(f"native relay not active: {REASON}")
    return _lib


def ffi() -> Any:
    """The cffi ``ffi`` of the compiled module; raises if the Python path is active."""
    if _ffi is None:
        raise RuntimeError(f"native relay not active: {REASON}")
    return _ffi


def describe() -> str:
    """One line for the start-up log: which path moves the bytes and why."""
    return f"relay path: {ACTIVE} ({REASON})"
