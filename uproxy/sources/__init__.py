"""Where the desired state comes from: manifests on disk or the Kubernetes API.

A source fills a :class:`~uproxy.state.Store` and tells the daemon through a
:class:`SourceHooks` when it changed something and when its first complete
view is in (only then are rules applied at all). Problems with single objects
are logged by the source, one line each, and never stop it.
"""

from __future__ import annotations

from typing import Protocol

from uproxy.state import Store


class SourceHooks(Protocol):
    def changed(self) -> None:
        """The store changed: schedule a (rate-limited) sync."""

    def synced(self) -> None:
        """The first complete state is in the store (idempotent)."""


class Source(Protocol):
    name: str

    async def run(self, store: Store, hooks: SourceHooks) -> None:
        """Fill ``store`` and follow changes until cancelled. Never raises for bad input."""
