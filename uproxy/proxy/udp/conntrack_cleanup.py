"""When to delete the stale UDP conntrack entries that service and endpoint changes leave.

What is stale (see :mod:`uproxy.conntrack` for why each matters): a frontend
(``ClusterIP/externalIP/LB IP : port``) that went away, appeared, or now
redirects to another proxy port; and an endpoint address that no longer serves
any UDP service port -- derived from :func:`uproxy.balance.serving_addresses`,
the same rule that picks endpoints for new flows and closes flows to endpoints
that may no longer serve.

When: only after the daemon has applied the rules of the change
(:meth:`ConntrackCleanup.rules_applied`; until a daemon first calls it,
:data:`RULES_GRACE` after the change). Deleting earlier would let a client's
next datagram re-create the old mapping from the old rules. Deletions run in
one task at a time; what a later sync adds waits for its own rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping

from uproxy.balance import serving_addresses
from uproxy.conntrack import Conntrack, Stale
from uproxy.model import ServicePortName
from uproxy.redirects import family_of, frontends
from uproxy.state import Entry

log = logging.getLogger("uproxy.udp")

RULES_GRACE = 0.5  # without a rules_applied() call, flush conntrack this long after a change

Frontend = tuple[str, int]


def udp_frontends(entries: Mapping[ServicePortName, Entry],
                  proxy_ports: Mapping[tuple[ServicePortName, str, int], int]
                  ) -> dict[Frontend, int]:
    """(address, port) -> proxy port (0: none bound), for every UDP ClusterIP, externalIP
    and LB IP redirected; ``proxy_ports``: the bound listeners' ports by (name, scope,
    family)."""
    out: dict[Frontend, int] = {}
    for name, entry in entries.items():
        out.update(frontends_of(name, entry, proxy_ports))
    return out


def frontends_of(name: ServicePortName, entry: Entry,
                 proxy_ports: Mapping[tuple[ServicePortName, str, int], int]
                 ) -> dict[Frontend, int]:
    """:func:`udp_frontends` of one service port."""
    port = entry.port
    if port.protocol != "UDP":
        return {}
    return {(address, port.port): proxy_ports.get((name, scope, family_of(address)), 0)
            for scope, _kind, address in frontends(port)}


def stale_between(before: Mapping[Frontend, int], after: Mapping[Frontend, int],
                  served_before: set[tuple[str, int]],
                  served_after: set[tuple[str, int]]) -> list[Stale]:
    """What to delete when the frontends and serving endpoints change as given."""
    stale: list[Stale] = []
    for frontend, proxy_port in after.items():
        if before.get(frontend) != proxy_port:  # new, or now redirected elsewhere
            stale.append(Stale.frontend(*frontend, keep_reply_port=proxy_port or None))
    stale.extend(Stale.frontend(*f) for f in before.keys() - after.keys())
    stale.extend(Stale.endpoint(*a) for a in served_before - served_after)
    return stale


class ConntrackCleanup:
    """Remembers what was served, queues what went stale, deletes it once rules are in."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conntrack: Conntrack) -> None:
        self.loop = loop
        self.conntrack = conntrack
        # What is served, kept one service port at a time so a sync's cost follows what it
        # changed: each frontend's owners (the last one's proxy port counts, as when one
        # table is walked in order) and each serving endpoint's count of service ports.
        self._owners: dict[Frontend, dict[ServicePortName, int]] = {}
        self._serving: dict[tuple[str, int], int] = {}
        self._frontends_of: dict[ServicePortName, dict[Frontend, int]] = {}
        self._endpoints_of: dict[ServicePortName, set[tuple[str, int]]] = {}
        self._stale: list[Stale] = []  # found at a sync, rules not applied yet
        self._ready: list[Stale] = []  # rules applied: to delete
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._hooked = False

    def _frontend(self, frontend: Frontend) -> int | None:
        owners = self._owners.get(frontend)
        return next(reversed(owners.values())) if owners else None

    def entries_changed(self, entries: Mapping[ServicePortName, Entry],
                        proxy_ports: Mapping[tuple[ServicePortName, str, int], int],
                        node_name: str,
                        names: Iterable[ServicePortName] | None = None) -> None:
        """``entries`` is what is served now; ``names``: the service ports whose entry or
        listeners changed (None: any may have, ``entries`` is the whole table)."""
        if names is None:
            names = [*entries, *(n for n in self._frontends_of.keys() | self._endpoints_of.keys()
                                 if n not in entries)]
        # Each frontend's and endpoint's state before this change, taken when first touched
        # (only these names change them).
        before: dict[Frontend, int | None] = {}
        was_served: dict[tuple[str, int], bool] = {}
        owners_of, serving = self._owners, self._serving
        for name in names:
            for frontend in self._frontends_of.pop(name, ()):
                if frontend not in before:
                    before[frontend] = self._frontend(frontend)
                owners = owners_of[frontend]
                del owners[name]
                if not owners:
                    del owners_of[frontend]
            for address in self._endpoints_of.pop(name, ()):
                was_served.setdefault(address, True)
                count = serving[address] - 1
                if count:
                    serving[address] = count
                else:
                    del serving[address]
            entry = entries.get(name)
            if entry is None:
                continue
            mine = frontends_of(name, entry, proxy_ports)
            if mine:
                self._frontends_of[name] = mine
                for frontend, port in mine.items():
                    if frontend not in before:
                        before[frontend] = self._frontend(frontend)
                    owners_of.setdefault(frontend, {})[name] = port
            addresses = serving_addresses((entry,), node_name=node_name)
            if addresses:
                self._endpoints_of[name] = addresses
                for address in addresses:
                    if address not in was_served:
                        was_served[address] = address in serving
                    serving[address] = serving.get(address, 0) + 1
        after = {f: now for f in before if (now := self._frontend(f)) is not None}
        self._stale.extend(stale_between(
            {f: was for f, was in before.items() if was is not None}, after,
            {a for a, served in was_served.items() if served},
            {a for a in was_served if a in serving}))
        if self._stale and not self._hooked and self._timer is None:
            # no rules_applied() is coming for this sync: give the rules a moment
            self._timer = self.loop.call_later(RULES_GRACE, self._timer_fired)

    def rules_applied(self) -> None:
        """The daemon applied the rules of the last change: safe to delete what is pending."""
        self._hooked = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._start()

    def _timer_fired(self) -> None:
        self._timer = None
        self._start()

    def _start(self) -> None:
        # Only what is pending now is known to be covered by applied rules; what a later
        # sync adds waits for its own rules_applied() (or timer).
        self._ready.extend(self._stale)
        self._stale.clear()
        if not self._ready or (self._task is not None and not self._task.done()):
            return
        self._task = self.loop.create_task(self._flush(), name="udp-conntrack")

    async def _flush(self) -> None:
        while self._ready:
            batch, self._ready = self._ready, []
            try:
                await self.conntrack.delete(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("deleting stale conntrack entries failed")

    @property
    def pending(self) -> list[Stale]:
        """Deletions not done yet (waiting for rules, or running)."""
        return [*self._ready, *self._stale]

    async def flush(self) -> None:
        """Delete pending stale entries now and wait (for tests and shutdown)."""
        self._ready.extend(self._stale)
        self._stale.clear()
        if self._task is not None and not self._task.done():
            await self._task
        await self._flush()

    async def shutdown(self, grace: float) -> None:
        """Forget every frontend (the rules are gone), giving the deletions ``grace`` s."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stale.extend(Stale.frontend(*f) for f in self._owners)
        self._owners, self._frontends_of = {}, {}
        self._start()
        if self._task is not None and not self._task.done():
            try:
                async with asyncio.timeout(grace):
                    await asyncio.shield(self._task)
            except Exception:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
        self._stale.clear()
        self._ready.clear()
