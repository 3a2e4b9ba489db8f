"""Waiting between retries, and saying so without flooding the log.

:class:`Backoff` is client-go's capped exponential backoff with jitter;
:class:`LogLimiter` turns a retry storm into one line a minute.
"""

from __future__ import annotations

import logging
import random
import time

_REPEAT_LOG_INTERVAL = 60.0


class Backoff:
    """Capped exponential backoff with full jitter in the upper half."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial = initial
        self.cap = cap
        self.failures = 0

    def next_delay(self) -> float:
        base = min(self.cap, self.initial * (2 ** min(self.failures, 30)))
        self.failures += 1
        delay: float = base * random.uniform(0.5, 1.0)
        return delay

    def reset(self) -> None:
        self.failures = 0


class LogLimiter:
    """One line per distinct problem; the same line again only after a quiet minute.

    A retry storm (the same failure every few seconds) thus logs one line a
    minute, with the count of the lines it held back.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._seen: dict[str, tuple[float, int]] = {}  # line -> (logged at, held back since)
        self.failing = False

    def _emit(self, level: int, line: str) -> None:
        now = time.monotonic()
        last = self._seen.get(line)
        if last is not None and now - last[0] < _REPEAT_LOG_INTERVAL:
            self._seen[line] = (last[0], last[1] + 1)
            return
        suffix = f" (repeated {last[1]} times)" if last is not None and last[1] else ""
        if len(self._seen) > 64:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < _REPEAT_LOG_INTERVAL}
        self._seen[line] = (now, 0)
        self._log.log(level, "%s%s", line, suffix)

    def warn(self, line: str) -> None:
        self.failing = True
        self._emit(logging.WARNING, line)

    def recovered(self, line: str) -> None:
        if self.failing:
            self.failing = False
            self._emit(logging.INFO, line)
