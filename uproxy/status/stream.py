"""The live connection stream: connection events in, bounded and batched messages out.

Why it is shaped this way: with 10,000 open connections (or a thousand opening
per second) a message per event, or the whole table per message, would make
the page and the server the bottleneck. So:

- the :class:`ConnHub` subscribes once to the daemon's connection table and
  only records *which* connections opened, changed or closed (a dict insert
  per event; nothing at all while no one watches);
- every ``flush_interval`` (250 ms) it turns the pending events into at most
  one ``batch`` message per watcher: rows opened (only while the watcher sees
  fewer than its ``limit``), rows updated and ids closed among the rows it
  sees. A connection that opened and closed within one interval is never sent, so the
  hub subscribes as ``brief_blind``: the native relay's short connections (opened and
  closed within one of its batches, or its 50 ms hold) cost it no entry at all;
- every ``snapshot_interval`` each watcher gets a ``snapshot``: the first
  ``limit`` matching connections (oldest first, so rows do not jump) with
  fresh byte counts (read from the relay counters for those rows only), and
  per-service counts of the whole table. Byte counts are never pushed per chunk;
- each watcher has a small bounded queue; a watcher that cannot keep up loses
  batches and gets a snapshot instead, so a slow browser costs no memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from uproxy.connections import Conn, ConnTable
from uproxy.status.views import matches

log = logging.getLogger("uproxy.status")

FLUSH_INTERVAL = 0.25
SNAPSHOT_INTERVAL = 1.0
QUEUE_SIZE = 16
DEFAULT_LIMIT = 200
MAX_LIMIT = 5000


class Watcher:
    """One subscriber (an open stream): its filter, its row limit and the rows it shows."""

    def __init__(self, *, service: str, limit: int) -> None:
        self.service = service
        self.limit = limit
        self.visible: set[int] = set()
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(QUEUE_SIZE)
        self.next_snapshot = 0.0  # due at once
        self.dropped = 0

    def offer(self, message: str) -> None:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped += 1
            self.next_snapshot = 0.0  # what it missed comes back as a snapshot

    def end(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


def sse(event: str, data: dict[str, Any]) -> str:
    """One server-sent event (the JSON has no newlines, so one ``data:`` line)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class ConnHub:
    def __init__(self, conns: ConnTable, *, flush_interval: float = FLUSH_INTERVAL,
                 snapshot_interval: float = SNAPSHOT_INTERVAL,
                 clock: Callable[[], float] = time.time) -> None:
        self.conns = conns
        self.flush_interval = flush_interval
        self.snapshot_interval = snapshot_interval
        self.clock = clock
        self.watchers: set[Watcher] = set()
        self._opened: dict[int, Conn] = {}
        self._updated: dict[int, Conn] = {}
        self._closed: dict[int, Conn] = {}
        self._have_watchers = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.messages_sent = 0

    # lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        # (the table hears of us with the first watcher: with nobody watching, it need not
        # tell anyone of each connection, and the engine's short ones need no entry at all)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="status-stream")

    async def close(self) -> None:
        self._unsubscribe()
        for watcher in list(self.watchers):
            watcher.end()
        self.watchers.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def add(self, *, service: str = "", limit: int = DEFAULT_LIMIT) -> Watcher:
        watcher = Watcher(service=service, limit=max(1, min(limit, MAX_LIMIT)))
        self.watchers.add(watcher)
        self._have_watchers.set()
        self.conns.brief_blind.add(self._on_event)
        self.conns.subscribers.add(self._on_event)
        return watcher

    def _unsubscribe(self) -> None:
        self.conns.subscribers.discard(self._on_event)
        self.conns.brief_blind.discard(self._on_event)

    def remove(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)
        if not self.watchers:
            self._have_watchers.clear()
            self._unsubscribe()
            self._opened.clear()  # (what _on_event kept for watchers no longer there)
            self._updated.clear()
            self._closed.clear()

    # events (called synchronously by the connection table) --------------------------------
    def _on_event(self, event: str, conn: Conn) -> None:
        if not self.watchers:
            return
        if event == "open":
            self._opened[conn.id] = conn
        elif event == "update":
            if conn.id not in self._opened:
                self._updated[conn.id] = conn
        elif event == "close":
            self._updated.pop(conn.id, None)
            if self._opened.pop(conn.id, None) is None:
                self._closed[conn.id] = conn

    # the flush loop --------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await self._have_watchers.wait()
            try:
                self.flush()
            except Exception:  # never let one bad row end every stream
                log.exception("live connection stream: flush failed; resending snapshots")
                for watcher in self.watchers:
                    watcher.next_snapshot = 0.0
            await asyncio.sleep(self.flush_interval)

    def flush(self) -> None:
        """Send every watcher what changed since the last flush (or a due snapshot)."""
        opened, self._opened = self._opened, {}
        updated, self._updated = self._updated, {}
        closed, self._closed = self._closed, {}
        now = self.clock()
        rows: dict[int, dict[str, Any]] = {}

        def row(conn: Conn) -> dict[str, Any]:
            if conn.id not in rows:
                rows[conn.id] = conn.as_dict(now)
            return rows[conn.id]

        counts: tuple[Counter[str], list[Conn]] | None = None
        for watcher in list(self.watchers):
            if now >= watcher.next_snapshot:
                if counts is None:
                    table = list(self.conns)
                    counts = (Counter(str(c.service) for c in table), table)
                self._snapshot(watcher, now, counts[0], counts[1], row)
                continue
            gone = [i for i in closed if i in watcher.visible]
            watcher.visible.difference_update(gone)
            changed = [row(c) for i, c in updated.items() if i in watcher.visible]
            new = []
            for conn in opened.values():
                if len(watcher.visible) >= watcher.limit:
                    break
                if matches(conn.service, watcher.service) and conn.state != "closed":
                    watcher.visible.add(conn.id)
                    new.append(row(conn))
            if gone or changed or new:
                watcher.offer(sse("batch", {"opened": new, "updated": changed, "closed": gone,
                                            "total": len(self.conns)}))
                self.messages_sent += 1

    def _snapshot(self, watcher: Watcher, now: float, counts: Counter[str], table: list[Conn],
                  row: Callable[[Conn], dict[str, Any]]) -> None:
        items: list[dict[str, Any]] = []
        matched = 0
        for conn in table:
            if matches(conn.service, watcher.service):
                matched += 1
                if len(items) < watcher.limit:
                    items.append(row(conn))
        watcher.visible = {item["id"] for item in items}
        watcher.next_snapshot = now + self.snapshot_interval
        watcher.offer(sse("snapshot", {
            "total": len(table), "matched": matched, "limit": watcher.limit,
            "counts": dict(sorted(counts.items())), "items": items,
        }))
        self.messages_sent += 1
