"""The one polling helper: wait until a condition holds, or fail saying what never happened.

Every wait in the tests goes through :func:`wait_until` (blocking: lab tests, subprocesses)
or :func:`wait_until_async` (inside a running loop). Both have floors, because the tests
share small, busy machines: a timeout below :data:`MIN_TIMEOUT` is raised to it, an
interval below :data:`MIN_INTERVAL` is raised to it (no busy spinning), and the condition
is always checked once more at the deadline, so a slow check (a probe that takes seconds)
still gets its last look. A wait that must prove something happens *quickly* keeps its
own, larger timeout as its bound; a wait for something that must *not* happen is not a
poll and does not belong here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

MIN_TIMEOUT = 2.0
MIN_INTERVAL = 0.01

Message = str | Callable[[], str]


def _failure(message: Message, timeout: float) -> AssertionError:
    text = message() if callable(message) else message
    return AssertionError(f"not true after {timeout:g}s: {text or 'condition'}")


def wait_until(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.05,
               message: Message = "") -> T:
    """Call ``predicate`` until it returns something truthy, and return that value.

    After ``timeout`` seconds, raise :class:`AssertionError` with ``message`` (a string, or
    a callable giving one at that moment, e.g. showing the last state seen).
    """
    timeout, interval = max(timeout, MIN_TIMEOUT), max(interval, MIN_INTERVAL)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise _failure(message, timeout)
        time.sleep(min(interval, left))


async def wait_until_async(predicate: Callable[[], T] | Callable[[], Awaitable[T]],
                           timeout: float = 5.0, interval: float = 0.05,
                           message: Message = "") -> T:
    """:func:`wait_until` inside a running loop: sleeps without blocking it, and
    ``predicate`` may be a coroutine function."""
    timeout, interval = max(timeout, MIN_TIMEOUT), max(interval, MIN_INTERVAL)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        left = deadline - time.monotonic()
        if left <= 0:
            raise _failure(message, timeout)
        await asyncio.sleep(min(interval, left))
