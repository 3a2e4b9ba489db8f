"""Wiring: source -> store -> bounded-frequency sync -> sockets + iptables rules.

One :class:`Daemon` per process. The source fills the store and calls
``changed()``; syncs are batched (at most one per ``--min-sync-period``) and
repeated every ``--sync-period`` (which also re-inserts hooks and rules that
someone deleted: that repair runs beside the syncs that follow, so an endpoint
change is not held up by it; rule changes wait for it). A sync diffs the
desired table against what is served, opens and closes listening sockets,
hands the changed entries to the protocol proxies, and updates the
interception (``--interception``): by default the map of uproxy's nftables
tables (:mod:`uproxy.nftrules`; element deltas, the whole tables in one
``nft -f`` at start and at every full sync), else the ``UPROXY-SERVICES``
chain, rendered whole and applied with one ``iptables-restore`` per address
family (``ip6tables-restore`` for IPv6). A family the node lacks is skipped
with one log line at start. Nothing is applied before the source's first
complete view is in, so a partial rule set never replaces a good one.

This module is the wiring only; each concept it wires lives in its own module:
the listener set (:mod:`uproxy.proxy.listeners`), which address redirects to
which proxy port (:mod:`uproxy.redirects`), the per-service diff
(:class:`uproxy.state.Served`) and the start-up GC pause (:mod:`uproxy.gc_pause`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import faulthandler
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from uproxy import native, nftrules
from uproxy.balance import Balancer
from uproxy.connections import ConnTable
from uproxy.events import NFT_REPAIRED, RULES_REPAIRED, EventLog
from uproxy.filter_rules import filter_rules_of, render_filter
from uproxy.gc_pause import GcPause
from uproxy.iptables import Iptables, IptablesError
from uproxy.metrics import Metrics
from uproxy.model import ServicePort, ServicePortName
from uproxy.nftables import Nftables, NftablesError
from uproxy.proxy.families import ipv6_missing
from uproxy.proxy.handover import Received, Session, TakeoverExit
from uproxy.proxy.listeners import Listener, ListenerKey, ListenerSet, Listening
from uproxy.proxy.node_addresses import nodeport_addresses
from uproxy.proxy.ports import PortAllocator
from uproxy.proxy.relay import engine_threads, make_relay
from uproxy.proxy.tcp import TcpProxy
from uproxy.proxy.tcp_takeover import TcpMover
from uproxy.proxy.transparent import Transparent
from uproxy.redirects import redirects_of
from uproxy.rules import Redirect, render
from uproxy.settings import Settings
from uproxy.sources import Source
from uproxy.state import Entry, Served, Store
from uproxy.status.health import local_ready_count
from uproxy.status.service_health import HealthCheckPorts
from uproxy.takeover import Item

if TYPE_CHECKING:
    from uproxy.proxy.udp.takeover import UdpMover
    from uproxy.status.view import DaemonView

__all__ = ["Daemon", "ListenerKey"]  # ListenerKey: where callers found it before the split

log = logging.getLogger("uproxy")

#: The shortest wait between two passes of the sync loop when nothing woke it.
SYNC_WAIT_FLOOR = 0.1


class ProtocolProxy(Listening, Protocol):
    @property
    def entries(self) -> dict[ServicePortName, Entry]: ...
    def update_entries(self, changes: Mapping[ServicePortName, Entry | None]) -> None: ...
    def rules_applied(self) -> None: ...
    async def drain(self, grace: float) -> None: ...


class Daemon:
    def __init__(self, settings: Settings, source: Source,
                 takeover: Session | None = None) -> None:
        self.settings = settings
        self.source = source
        self.store = Store(proxy_name=settings.service_proxy_name,
                           synthesize_hints=bool(settings.manifests))
        self.metrics = Metrics()
        self.conns = ConnTable()
        self.events = EventLog()
        self.balancer = Balancer(node_name=settings.hostname_override)
        self.iptables = Iptables() if settings.manage_iptables else None
        # IPv6 nat (None: not managed, or the node lacks IPv6 / ip6tables; see start())
        self.ip6tables = Iptables(family=6) if settings.manage_iptables else None
        self._no_ipv6 = ipv6_missing()
        # nat interception through uproxy's nftables tables (None: the iptables chain); start()
        self.nft: Nftables | None = None
        self._nft_applied: list[Redirect] | None = None  # what the nft maps hold (None: unknown)
        self._nft_text: tuple[list[Redirect], tuple[int, ...], str] | None = None  # _nft_whole
        self.allocator = PortAllocator(settings.proxy_port_range)
        self.loop = asyncio.get_running_loop()
        self.relay = make_relay(self.loop, threads=engine_threads(settings.engine_threads))
        self.transparent = Transparent(settings.hostname_override)  # on: _prepare_iptables
        self.transparent.backends = self._backend_addresses
        self._backends: frozenset[tuple[str, int]] | None = None  # (None: the table changed)
        self._backends_before: frozenset[tuple[str, int]] = frozenset()
        tcp = TcpProxy(loop=self.loop, relay=self.relay, balancer=self.balancer,
                       conns=self.conns, metrics=self.metrics, transparent=self.transparent,
                       congestion=settings.relay_congestion_control)
        self.proxies: dict[str, ProtocolProxy] = {"TCP": tcp}
        self._tcp = tcp
        self._tcp_mover = TcpMover(tcp)
        self.metrics.affinity_pins.set_function(  # (read at scrape time)
            lambda: self.balancer.affinity_count() + tcp.affinity_count())
        self.metrics.time_wait_from(lambda: ({"at_close": tcp.time_wait_destroyed(),
                                              "sweep": self.transparent.swept},
                                             self.transparent.sweeps))
        self.metrics.engine_threads_from(self.relay.thread_stats)
        self._add_udp()
        self._served = Served()
        self.listener_set = self._listener_set(self._no_ipv6 is None)
        self.redirects: list[Redirect] = []
        self.started = time.time()
        self.source_synced = False
        self.rules_applied = False
        self._hooks_in_place = False  # the PREROUTING/OUTPUT jumps were checked since start
        self._prepare: asyncio.Task[None] | None = None
        # transparent mode's start (part of _prepare): the first sync's engine push waits
        # for it, so each listener is pushed once with its transparent bits (issue 16)
        self._transparent_started: asyncio.Future[None] | None = None
        self._hooks_started: asyncio.Future[None] | None = None  # (the rest of _prepare)
        # set when the first sync's rules process starts (nft -f or iptables-restore in
        # its worker thread): the engine push runs beside it, not before it
        self._kernel_started: asyncio.Event | None = None
        self._start_error: Exception | None = None  # the clean-up at start failed (raised)
        # The earlier run's rules are gone (or there is nothing to clean): no listener
        # opens before, so its redirects never reach one of our sockets.
        self._cleaned_up = asyncio.Event()
        self.last_sync: float | None = None  # wall clock of the last successful sync
        self.queued_since: float | None = None  # wall clock of the oldest unapplied change
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._last_rules: dict[int, str] = {}  # family -> restore text last applied
        # trigger-time annotations observed, per service; services changed, not observed yet
        self._observed_triggers: dict[tuple[str, str], set[str]] = {}
        self._unobserved: set[tuple[str, str]] = set()
        self._warned: set[str] = set()
        self._redirects_by_name: dict[ServicePortName, list[Redirect]] = {}
        self._key_claims: dict[nftrules.Key, int] = {}  # map key -> service ports claiming it
        self._tasks: list[asyncio.Task[Any]] = []
        self._gc = GcPause(self.loop)
        # Takeover: the running uproxy we take over from once our source is loaded (its
        # rules stay meanwhile), and what we hand to the next one.
        self.takeover = takeover
        self.takeover_error: TakeoverExit | None = None
        self.after_takeover: Callable[[Received], Awaitable[None]] | None = None  # the cli's
        self.handed_over = False
        self.exit_watchdog: threading.Timer | None = None  # set once handed over
        self.server_sockets: dict[str, socket.socket] = {}  # status/health, set by the cli
        self._adopted_flows: list[tuple[Item, list[socket.socket]]] = []
        self.health_checks = HealthCheckPorts(local_endpoints=self._local_ready,
                                              healthy=self.healthy)
        self._hc_ports: dict[ServicePortName, int] = {}  # health-check node port per port
        self._hc_pending = False  # the health-check ports open differ from _hc_ports' wish
        # UPROXY-FIREWALL lines per service port and family, and the text last applied
        self._filter_by_name: dict[tuple[ServicePortName, int], list[str]] = {}
        self._filter_text: dict[int, str] = {}
        self._filter_hooks_in_place = False
        # The kernel's rules change under this lock only (nft/iptables-restore never
        # interleave); a full sync's repair holds it in the background (``repairing``).
        self._rules_lock = asyncio.Lock()
        self._settled = False  # a takeover holds the rules lock (settle/unsettle)
        self._repair: asyncio.Task[None] | None = None

    def _adopt(self, adopted: Received) -> None:
        """Serve what came over: listeners (claimed by the next sync), connections at once."""
        self._adopted_flows = adopted.of_kind("udp")
        self._adopt_listeners(adopted)
        for item, (sock, *_) in adopted.of_kind("health_check"):
            self.health_checks.adopted[(str(item.meta["address"]), int(item.meta["port"]))] = sock
        for item, (client, backend) in adopted.of_kind("tcp"):
            self._tcp_mover.adopt(item.meta, client, backend)
        for item, _ in adopted.of_kind("affinity"):
            pins = [(ServicePortName(*pin[:4]), pin[4], (pin[5], pin[6]), pin[7])
                    for pin in item.meta["pins"]]
            now = time.monotonic()
            # TCP's pins are the engine's when it sets connections up; the rest the balancer's
            self.balancer.import_affinity(self._tcp.import_affinity(pins, now), now)
        log.info("took over %d listening sockets and %d connections; keeping the rules in place",
                 len(self.listener_set.adopted), len(self.conns))
        self.events.takeover(self.settings.state_dir,
                             f"took over {len(self.listener_set.adopted)} listening sockets "
                             f"and {len(self.conns)} connections")

    async def _take_over(self) -> bool:
        """Our source is loaded: take everything from the running uproxy now (False: failed)."""
        session, self.takeover = self.takeover, None
        assert session is not None
        try:
            adopted = session.take()
        except TakeoverExit as exc:
            self.takeover_error = exc
            self.stop()
            return False
        self._adopt(adopted)
        if self.after_takeover is not None:
            await self.after_takeover(adopted)
        return True
    def _listener_set(self, ipv6: bool) -> ListenerSet:
        return ListenerSet(self.allocator, self.settings.bind_address,
                           self.settings.nodeport_addresses, (4, 6) if ipv6 else (4,))

    @property
    def families(self) -> tuple[int, ...]:
        """The address families served (4, and 6 unless the node lacks it)."""
        return self.listener_set.families

    def _nat_tables(self) -> list[tuple[int, Iptables]]:
        """(family, runner) of every nat table uproxy manages."""
        return [(f, t) for f, t in ((4, self.iptables), (6, self.ip6tables)) if t is not None]

    def _nat_chains(self) -> list[tuple[int, Iptables]]:
        """The nat tables that hold uproxy's ``UPROXY-SERVICES`` chain: none with nftables."""
        return [] if self.nft is not None else self._nat_tables()

    @property
    def interception(self) -> str:
        """``nftables`` or ``iptables``: how connections are sent to uproxy's sockets."""
        return "nftables" if self.nft is not None else "iptables"

    async def _choose_interception(self) -> None:
        """``--interception``: nftables when asked for or usable (auto), else iptables.

        The other mechanism's leftovers of an earlier run are removed by start()."""
        mode = self.settings.interception
        nft = Nftables()
        why = None if mode == "iptables" else await nft.available()
        if mode != "iptables" and why is None:
            self.nft = nft
            log.info("interception: nftables (tables ip/ip6 uproxy, one map lookup per new "
                     "connection)")
        elif mode == "nftables":  # the CLI checked this at start; it went away since
            raise NftablesError(f"--interception nftables: {why}")
        else:
            log.info("interception: iptables chain %s%s", "UPROXY-SERVICES",
                     f" ({why})" if why else "")

    async def _check_ipv6(self) -> None:
        """One log line when IPv6 is not served, and why; never an error."""
        reason = self._no_ipv6
        if reason is None and self.ip6tables is not None:
            reason = await self.ip6tables.unusable()
        if reason is None:
            return
        self.ip6tables = None
        if 6 in self.listener_set.families:
            self.listener_set = self._listener_set(False)
        log.info("IPv6 is not served: %s; IPv6 Service addresses are skipped", reason)

    def _add_udp(self) -> None:
        self._udp_mover: UdpMover | None = None
        try:
            from uproxy.proxy.udp import UdpProxy
        except ImportError:
            return
        self.proxies["UDP"] = udp = UdpProxy(
            loop=self.loop, balancer=self.balancer, conns=self.conns, metrics=self.metrics,
            settings=self.settings, max_flows=self.settings.udp_max_flows,
            transparent=self.transparent)
        from uproxy.proxy.udp.takeover import UdpMover

        self._udp_mover = UdpMover(udp)

    def _backend_addresses(self) -> frozenset[tuple[str, int]]:
        """Every endpoint's address and port, and those of the table before the last
        change (a connection to an endpoint just removed leaves its TIME_WAIT socket too):
        the peers whose transparent TIME_WAIT sockets a sweep destroys. Computed again
        only after the table changed."""
        if self._backends is None:
            now = frozenset(_canonical(ep.ip, ep.port) for entry in self.served.values()
                            for ep in entry.endpoints)
            self._backends = now | self._backends_before
            self._backends_before = now
        return self._backends

    @property
    def served(self) -> dict[ServicePortName, Entry]:
        """The table as last synced."""
        return self._served.table

    @property
    def listeners(self) -> dict[ListenerKey, Listener]:
        return self.listener_set.listeners

    def listener_ports(self) -> list[tuple[ListenerKey, int]]:
        """Every open listener with its port (for the status server)."""
        return [(key, listener.port) for key, listener in self.listener_set.listeners.items()]

    # SourceHooks -----------------------------------------------------------------------
    def changed(self) -> None:
        if self.queued_since is None:
            self.queued_since = time.time()
        self._wake.set()

    def synced(self) -> None:
        if not self.source_synced:
            self.source_synced = True
            self._wake.set()

    # Health (kube-proxy's /healthz meaning) ----------------------------------------------
    def healthy(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if self.queued_since is None:
            return True
        return now - self.queued_since <= 2 * self.settings.sync_period

    @property
    def ready(self) -> bool:
        return self.source_synced and self.rules_applied

    @property
    def node_terminating(self) -> bool:
        """The source says this node is going away (deletionTimestamp or autoscaler taint)."""
        return bool(getattr(self.source, "node_terminating", False))

    @property
    def node_zone(self) -> str | None:
        """This node's zone (topology): ``--node-zone``, else its Node object's label."""
        return (self.settings.node_zone or getattr(self.source, "node_zone", None)
                or self.store.node_zone(self.settings.hostname_override))

    # Lifecycle ----------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        log.info("%s", native.describe())
        log.info("event loop: %s", type(self.loop).__module__.split(".")[0])
        log.addHandler(self.events.handler)
        self._gc.pause()
        if self.iptables is not None:  # (two probes: ip6tables-save, nft -f; side by side)
            await asyncio.gather(self._check_ipv6(), self._choose_interception())
        else:
            await self._check_ipv6()
        if self.takeover is not None:
            # The rules point at the running uproxy's proxy ports, which come over with their
            # sockets: leave them until our first sync renders the same ones.
            log.info("a uproxy runs with --state-dir %s: taking it over once the %s source "
                     "is loaded", self.settings.state_dir, self.source.name)
            if self.iptables is not None:  # its mangle rules and routing stay; ours too
                self._prepare = self.loop.create_task(self._start_transparent(),
                                                      name="transparent")
                self._transparent_started = self._prepare
                self._tasks.append(self._prepare)
        elif self.iptables is not None:
            self._prepare = self.loop.create_task(self._prepare_iptables(), name="iptables")
            self._tasks.append(self._prepare)
        if self._prepare is None or self.takeover is not None:
            self._cleaned_up.set()  # (nothing to clean: not managed, or taken over as is)
        self._tasks.append(self.loop.create_task(self._run_source(), name="source"))
        self._tasks.append(self.loop.create_task(self._sync_loop(), name="sync"))

    async def _cleanup_earlier_run(self) -> None:
        """Remove what an earlier run left (its chains, hooks, other-mode tables)."""
        # (the families side by side: each is a few iptables-save/-restore in a row)
        removed = sum(await asyncio.gather(*(table.cleanup() for _, table in self._nat_tables())))
        if self.nft is None:  # an earlier nftables-mode run's tables would win over the chain
            with contextlib.suppress(NftablesError):
                removed += await Nftables().cleanup()
        else:  # a family no longer served keeps no table (the others are replaced)
            with contextlib.suppress(NftablesError):
                gone = set(await self.nft.tables()) - set(self.families)
                await self.nft.restore(nftrules.render_cleanup(gone) if gone else "")
                removed += len(gone)
        if removed:
            log.info("replaced %d uproxy rules and chains left by an earlier run", removed)

    async def _prepare_iptables(self) -> None:
        """The earlier run's leftovers removed, the empty chain and its hooks, transparent
        mode on: all while the source is still loading.

        ``iptables -C``/``-I`` on iptables-nft read the whole nat table, so with many
        rules each call is slow, and the first sync would make four of them. Done here
        they overlap the source's first list instead (figures: ``bench/ANALYSIS.md``,
        "uproxy/daemon.py"). The clean-up ran in start() before the source began; it
        is ten processes in a row, so it runs here too, beside the first load
        ("Start-up with 10,000 Services"); a failure there stops the daemon as before.
        Transparent mode's probe (mangle table, policy routing) touches nothing the
        clean-up and the hooks do, so it runs beside them.
        """
        self._transparent_started = asyncio.ensure_future(self._start_transparent())
        self._hooks_started = asyncio.ensure_future(self._cleanup_then_hooks())
        await asyncio.gather(self._hooks_started, self._transparent_started)

    async def _cleanup_then_hooks(self) -> None:
        assert self.iptables is not None
        try:
            await self._cleanup_earlier_run()
        except Exception as exc:  # start() used to raise it: the daemon stops with it
            self._start_error = exc
            self.stop()
            return
        finally:
            self._cleaned_up.set()
        await self._prepare_hooks()

    async def _prepare_hooks(self) -> None:
        try:
            # One restore per family (the two side by side), so it runs beside the source's
            # first list even while that list holds the loop; cleanup() has just removed
            # every hook.
            await asyncio.gather(*(
                table.restore(("" if self.nft is not None
                               else render([], family=family, hooks=True))
                              + render_filter((), hooks=True))
                for family, table in self._nat_tables()))
            self._hooks_in_place = self._filter_hooks_in_place = True
            # what UPROXY-FIREWALL holds now: the first sync restores it only if it differs
            self._filter_text = {family: render_filter(()) for family, _ in self._nat_tables()}
        except (IptablesError, OSError) as exc:  # the first sync tries again and reports it
            log.debug("preparing iptables: %s", exc)

    async def _start_transparent(self) -> None:
        """Before the first rules: the first connection already goes from the client."""
        masquerade_all = self.settings.masquerade_all
        await self.transparent.start(wanted=not masquerade_all,
                                     why_not="--masquerade-all" if masquerade_all else "")

    async def _run_source(self) -> None:
        try:
            await self.source.run(self.store, self)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the %s source stopped", self.source.name)
            self.stop()

    async def run(self) -> None:
        """Start, serve until stop() (or SIGTERM/SIGINT), then shut down cleanly."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stop)
        try:
            await self.start()
            await self._stop.wait()
            if self._start_error is not None:
                raise self._start_error
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.remove_signal_handler(sig)
            await self.shutdown()

    async def shutdown(self) -> None:
        self._gc.resume()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._repair is not None:  # (cancelled by release() after a handover)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._repair  # our own rule removal below must come after it
        self.listener_set.close_all()
        # (after a handover: the probes this process accepted get their answers first)
        await self.health_checks.close(linger=HEALTH_CHECK_LINGER if self.handed_over else 0.0)
        if self.takeover is not None or self.takeover_error is not None:
            # Never took over: the running uproxy keeps serving with its rules.
            if self.takeover is not None:
                self.takeover.close()
            log.info("stopped without taking over")
            return
        if self.handed_over:  # the new uproxy serves the rules, sockets and connections now
            # (TCP: attempts that were still connecting; not UDP: its drain would delete
            # conntrack entries that the new uproxy's flows use)
            await self.proxies["TCP"].drain(self.settings.shutdown_grace)
            log.info("stopped after handing over")
            return
        if self.iptables is not None and self.rules_applied:
            # Stop intercepting new connections, but keep NAT alive for open ones.
            for family, table in self._nat_chains():
                try:
                    await table.restore(render([], family=family))
                except IptablesError as exc:
                    log.error("removing rules at shutdown: %s", exc)
            if self.nft is not None:  # empty maps; the tables' nat chains stay registered
                try:
                    await self.nft.restore("".join(nftrules.render([], family=f)
                                                   for f in self.families))
                except NftablesError as exc:
                    log.error("removing rules at shutdown: %s", exc)
        self.relay.catch_up()  # (the engine's set-ups still held are connections too)
        open_conns = len(self.conns)
        if open_conns:
            log.info("letting %d open connections finish (up to %.1fs)", open_conns,
                     self.settings.shutdown_grace)
        for proxy in self.proxies.values():
            await proxy.drain(self.settings.shutdown_grace)
        for _, table in self._nat_tables():
            try:
                await table.cleanup()
            except IptablesError as exc:
                log.error("removing rules at shutdown: %s", exc)
        if self.nft is not None:  # after the drain: open connections keep their NAT till here
            try:
                await self.nft.cleanup()
            except NftablesError as exc:
                log.error("removing nftables tables at shutdown: %s", exc)
        if self.iptables is not None:
            # after the drain: open connections need it; then their closing sockets go
            await self.transparent.cleanup(sweep=True)
        log.info("stopped")
        log.removeHandler(self.events.handler)

    # Sync -----------------------------------------------------------------------------------
    async def _sync_loop(self) -> None:
        last_full = 0.0
        last_run = 0.0
        while True:
            # Before the first complete state there is nothing to resync: wait for the
            # source alone (no timeout that is already zero). After it, every wait has a
            # floor, so a daemon with nothing to do never spins (issue 14).
            timeout: float | None = None
            if self.source_synced:
                timeout = max(SYNC_WAIT_FLOOR,
                              self.settings.sync_period - (time.monotonic() - last_full))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # not wait_for: see sources/kube.py
                    await self._wake.wait()
            # Batch bursts: at most one sync per min-sync-period.
            wait = self.settings.min_sync_period - (time.monotonic() - last_run)
            if wait > 0:
                await asyncio.sleep(wait)
            self._wake.clear()
            if not self.source_synced:
                continue
            if self.takeover is not None and not await self._take_over():
                return
            full = time.monotonic() - last_full >= self.settings.sync_period
            last_run = time.monotonic()
            try:
                await self.sync(full=full)
            except Exception:  # never let one bad sync end the daemon
                log.exception("sync failed")
                self.metrics.sync_errors.inc()
            if full:
                last_full = time.monotonic()

    async def sync(self, *, full: bool = False) -> None:
        """Apply what changed since the last sync; ``full`` also re-applies the rules.

        Incremental: only the services the store recomputed are diffed, their
        listeners and redirects updated, the protocol proxies given their new entries,
        and the rules rendered again only when a redirect changed (an endpoint change
        alone does not touch iptables or nft; a redirect change sends the nft map the
        changed service ports' element delta). Each step costs what changed, not the
        table (issue 16).
        """
        if not self._cleaned_up.is_set():  # the first sync, while start's clean-up runs
            await self._cleaned_up.wait()
            if self._start_error is not None:
                return
        started = time.monotonic()
        self.balancer.zone = self.node_zone
        self.listener_set.node_ips = (getattr(self.source, "node_ips", ())
                                      or self.store.node_ips(self.settings.hostname_override))
        queued = self.queued_since
        self.queued_since = None
        services = self.store.take_changed()
        self._unobserved |= services
        diff = self._served.update(self.store, services)
        if diff:
            self._backends = None
        self.events.table_changed(diff)
        table = self.served
        for entry in diff.removed:
            self.listener_set.close(entry.port.name)
        touched = [*diff.added, *(new for _, new in diff.changed)]
        # The first sync (10,000 Services at start) opens the sockets, starts the rules
        # with their ports, and hands the listeners to the engine with their endpoints
        # while nft/iptables-restore runs in its worker thread (issue 16's start-up).
        overlap = self.iptables is not None and not self.rules_applied
        if overlap:
            self._tcp.defer()
        try:
            self._ensure_all_listeners([entry.port for entry in touched])
        except BaseException:
            self._tcp.undefer()
            raise
        if self.listener_set.adopted:  # the first sync claimed what it wanted; no one wants these
            closed = self.listener_set.close_unclaimed()
            log.info("closed %d taken-over sockets no service wants any more", closed)
        if full:  # retry ports that were taken; follow node address changes for NodePorts
            done = {e.port.name for e in touched}
            for name, entry in table.items():
                if name not in done and (entry.port.node_port
                                         or name in self.listener_set.bind_failures):
                    self._ensure_listeners(entry.port)
                    touched.append(entry)
        rules_changed = False
        delta = nftrules.RulesDelta(self.redirects)  # the changed service ports' redirects
        for entry in diff.removed:
            gone = self._redirects_by_name.pop(entry.port.name, None)
            if gone:
                rules_changed = True
                delta.change(self._key_claims, gone, [])
        for entry in touched:
            new_redirects = self._redirects_of(entry)
            old_redirects = self._redirects_by_name.get(entry.port.name, [])
            if new_redirects != old_redirects:
                rules_changed = True
                delta.change(self._key_claims, old_redirects, new_redirects)
                if new_redirects:
                    self._redirects_by_name[entry.port.name] = new_redirects
                else:
                    self._redirects_by_name.pop(entry.port.name, None)
        if rules_changed:
            self.redirects = [r for rs in self._redirects_by_name.values() for r in rs]
        # Each protocol proxy gets what changed, never the whole table (issue 16: an
        # endpoint change among 10,000 services costs one service's work). When the rules
        # overlap, TCP's listeners (deferred: not accepting yet) get theirs while the rules
        # apply; the others' sockets already read, so theirs come before the loop turns.
        changes: dict[str, dict[ServicePortName, Entry | None]] = {}
        for entry in diff.removed:
            changes.setdefault(entry.port.protocol, {})[entry.port.name] = None
        for entry in touched:
            changes.setdefault(entry.port.protocol, {})[entry.port.name] = entry
        later = changes.pop("TCP", {}) if overlap else {}
        # (the filter lines of this sync's entries: computed now, applied with the rules)
        dirty = (self._filter_update(diff.removed, touched, full) if self.iptables is not None
                 else set())
        try:
            for proto, changed in changes.items():
                if proto in self.proxies:
                    self.proxies[proto].update_entries(changed)
            if self._adopted_flows:  # the first sync opened the listeners they belong to
                self._adopt_flows()
            rules: asyncio.Future[bool] | None = None
            if overlap:  # its first step renders the text and starts the process
                kernel = self._kernel_started = asyncio.Event()
                rules = asyncio.ensure_future(self._apply_rules(
                    rules_changed=rules_changed, delta=delta, dirty=dirty, full=full,
                    queued=queued))
                await asyncio.sleep(0)
                tp_start = self._transparent_started
                if later and tp_start is not None and not tp_start.done():
                    # (pushed before transparent mode is known, all 10,000 would be pushed
                    # again once it is: ~0.2 s; the rules wait for it too)
                    await asyncio.wait([tp_start])
                hooks = self._hooks_started
                if later and (hooks is None or hooks.done()) and not kernel.is_set():
                    # The set-up is over: the rules' process starts first, then the push
                    # (~0.15 s of the loop at 10,000) runs beside it, not before it. (While
                    # the hooks are still being made, the push goes first, beside them.)
                    underway = asyncio.ensure_future(kernel.wait())
                    await asyncio.wait([rules, underway], return_when=asyncio.FIRST_COMPLETED)
                    underway.cancel()
                self._kernel_started = None
                if later and "TCP" in self.proxies:
                    self.proxies["TCP"].update_entries(later)
        finally:
            self._tcp.undefer()  # (a listener no change named starts accepting as it was)
        if rules is not None:
            applied = await rules
        elif (full and self.rules_applied and self.iptables is not None and not self.repairing
              and not rules_changed and not dirty):
            # The repair only (whole tables, hooks: 0.4-1.3 s at 10,000 Services): beside
            # the syncs that follow, so an endpoint change is applied meanwhile; a sync
            # that changes rules waits for it (the rules lock). A full sync with rule
            # changes of its own applies them before it is done, as any sync.
            self._repair = self.loop.create_task(self._repair_rules(
                rules_changed=False, delta=delta, dirty=dirty, queued=queued), name="repair")
            applied = True
        else:  # (a full sync while the last repair still runs: its own changes only)
            applied = await self._apply_rules(
                rules_changed=rules_changed, delta=delta, dirty=dirty,
                full=full and not self.repairing, queued=queued)
        if not applied:
            return
        self.rules_applied = True
        if self.ready:
            self._gc.resume()
        for proxy in self.proxies.values():
            proxy.rules_applied()
        self.last_sync = time.time()
        self.balancer.prune(table, time.monotonic())
        self._tcp.prune_affinity()
        await self._sync_health_checks(diff.removed, touched, full)
        if full:
            self.relay.catch_up()  # (a held set-up's service tally is not idle)
            self.conns.prune(table)
        self._observe_programming_latency()
        elapsed = time.monotonic() - started
        self.metrics.sync_duration.observe(elapsed)
        self.events.synced(diff, elapsed, len(table))
        self.metrics.sync_last.set(self.last_sync)
        if diff:
            log.info("synced %d service ports (+%d -%d ~%d) in %.1f ms", len(table),
                     len(diff.added), len(diff.removed), len(diff.changed), elapsed * 1000)

    @property
    def repairing(self) -> bool:
        """A full sync's repair of the rules is in flight (in the background)."""
        return self._repair is not None and not self._repair.done()

    async def _repair_rules(self, *, rules_changed: bool, delta: nftrules.RulesDelta,
                            dirty: set[int], queued: float | None) -> None:
        """A full sync's kernel part, beside the syncs that follow (its failure is logged
        and counted by :meth:`_apply_rules`; the next sync replaces what is unknown)."""
        started = time.monotonic()
        log.debug("repairing the rules (whole tables, hooks) beside the syncs")
        try:
            applied = await self._apply_rules(rules_changed=rules_changed, delta=delta,
                                              dirty=dirty, full=True, queued=queued)
        except Exception:  # (nothing awaits this task's result: say it here)
            log.exception("repairing the rules failed")
            self.metrics.sync_errors.inc()
            applied = False
        elapsed = time.monotonic() - started
        if applied:
            self.metrics.sync_full_duration.observe(elapsed)
        log.debug("rules repair %s in %.1f ms", "done" if applied else "failed", elapsed * 1000)

    def _kernel_work(self, *, rules_changed: bool, dirty: set[int], full: bool) -> bool:
        """Whether a sync must touch the kernel's rules (an endpoint change alone does not:
        it neither waits for a repair in flight nor runs nft/iptables)."""
        if full or rules_changed or dirty or not self.rules_applied or self._prepare is not None:
            return True
        if not self._hooks_in_place or not self._filter_hooks_in_place:
            return True
        if any(family not in self._filter_text for family, _ in self._nat_tables()):
            return True
        return self._nft_applied is None if self.nft is not None else not self._last_rules

    async def _apply_rules(self, *, rules_changed: bool, delta: nftrules.RulesDelta,
                           dirty: set[int], full: bool, queued: float | None) -> bool:
        """The kernel's rules for this sync (nft maps or iptables chains, the filter chain,
        the hooks); False when applying failed (logged; the next sync tries again).
        Under the rules lock, so after a repair in flight, and only when there is work."""
        if self.iptables is None or not self._kernel_work(rules_changed=rules_changed,
                                                          dirty=dirty, full=full):
            return True
        async with self._rules_lock:
            return await self._apply_rules_locked(rules_changed=rules_changed, delta=delta,
                                                  dirty=dirty, full=full, queued=queued)

    async def _apply_rules_locked(self, *, rules_changed: bool, delta: nftrules.RulesDelta,
                                  dirty: set[int], full: bool, queued: float | None) -> bool:
        if self._prepare is not None:
            await self._prepare
            self._prepare = None
        if self.iptables is not None:
            try:
                if self.nft is not None:
                    await self._apply_nft(changed=rules_changed, delta=delta,
                                          full=full or not self.rules_applied)
                elif rules_changed or full or not self.rules_applied:
                    if rules_changed or not self._last_rules:
                        self._last_rules = {}  # (an error below leaves it empty: redo all)
                        texts = {f: render(self.redirects, family=f)
                                 for f, _ in self._nat_chains()}
                    else:
                        texts = self._last_rules
                    self._kernel_starts()
                    for family, ipt in self._nat_chains():  # one restore per family
                        await ipt.restore(texts[family])
                    self._last_rules = texts
                await self._restore_filter(dirty, full)
                # (the first sync counts as full; its hooks were just put in place)
                if not self._hooks_in_place or (full and self.rules_applied):
                    added = 0
                    for _, ipt in self._nat_chains():
                        added += await ipt.ensure_hooks()
                    if added and self._hooks_in_place:
                        log.warning("re-inserted %d uproxy hooks someone removed", added,
                                    extra=RULES_REPAIRED)
                    self._hooks_in_place = True
            except (IptablesError, NftablesError) as exc:
                log.error("applying rules: %s", exc)
                self.metrics.sync_errors.inc()
                # (a repair fails after later syncs: the oldest unapplied change stays)
                self.queued_since = min(t for t in (self.queued_since, queued or time.time())
                                        if t is not None)
                self._last_rules = {}  # render and apply again next time
                self._nft_applied = None
                self._filter_text = {}
                return False
            if full and self.rules_applied and self.transparent.active:  # (just applied at start)
                await self.transparent.repair()
        return True

    async def _apply_nft(self, *, changed: bool, full: bool,
                         delta: nftrules.RulesDelta | None = None) -> None:
        """The nft maps of both families (:mod:`uproxy.nftrules`), in one ``nft -f``.

        Incremental syncs send the element deltas since the last apply; the first
        sync, every full sync (the repair: anything deleted or added in uproxy's
        tables is put right) and a failed delta replace the whole tables, rendered
        once from all redirects.
        """
        assert self.nft is not None
        families = self.families
        if not full and self._nft_applied is not None:
            if not changed:
                return
            old, new = self._nft_applied, self.redirects
            redirects = new  # (a sync waiting for the rules lock may assign a newer list)
            if delta is not None and delta.exact and delta.since is old:
                old, new = delta.old, delta.new  # (the same delta: see RulesDelta)
            text = "".join(nftrules.render_changes(old, new, family=f) for f in families)
            try:
                await self.nft.restore(text)
                self._nft_applied = redirects
                return
            except NftablesError as exc:
                log.warning("nftables update failed, replacing the tables: %s", exc)
        if full and self.rules_applied:  # the repair: say so when a table had gone
            missing = set(families) - set(await self.nft.tables())
            if missing:
                log.warning("re-created the nftables tables someone removed: %s",
                            ", ".join(f"{nftrules.family_keyword(f)} {nftrules.TABLE}"
                                      for f in sorted(missing)), extra=NFT_REPAIRED)
        redirects = self.redirects
        try:  # (what the maps hold stays known meanwhile: endpoint syncs need not wait)
            text = self._nft_whole(redirects, families)
            self._kernel_starts()
            await self.nft.restore(text)
        except BaseException:
            self._nft_applied = None
            raise
        self._nft_applied = redirects

    def _kernel_starts(self) -> None:
        """The first sync's rules process is about to start (see sync: its push waits)."""
        if self._kernel_started is not None:
            self._kernel_started.set()

    def _nft_whole(self, redirects: list[Redirect], families: tuple[int, ...]) -> str:
        """The whole tables' text, rendered again only when the redirects changed (a sync
        assigns a new list then): a full sync's repair at 10,000 Services re-sends the
        text without holding the loop to render it (~0.1-0.2 s)."""
        cached = self._nft_text
        if cached is None or cached[0] is not redirects or cached[1] != families:
            text = "".join(nftrules.render(redirects, family=f) for f in families)
            cached = self._nft_text = (redirects, families, text)
        return cached[2]

    def _observe_programming_latency(self) -> None:
        """Each new trigger-time stamp of the services changed since the last successful
        sync, once (only those: the others' slices have not changed)."""
        now = time.time()
        services, self._unobserved = self._unobserved, set()
        for service in services:
            current = self.store.trigger_times_of(service)
            for stamp in current - self._observed_triggers.get(service, set()):
                try:
                    when = datetime.datetime.fromisoformat(
                        stamp.replace("Z", "+00:00")).timestamp()
                except ValueError:
                    continue
                if 0 <= now - when < 3600:
                    self.metrics.network_programming.observe(now - when)
            if current:
                self._observed_triggers[service] = current
            else:
                self._observed_triggers.pop(service, None)

    def _filter_update(self, removed: list[Entry], touched: list[Entry], full: bool) -> set[int]:
        """The filter table's lines (:mod:`uproxy.filter_rules`) of this sync's entries;
        the families whose lines changed (:meth:`_restore_filter` applies them)."""
        families = self._nat_tables()
        dirty: set[int] = set()  # families whose lines changed
        for entry in removed:
            for family, _ in families:
                if self._filter_by_name.pop((entry.port.name, family), None) is not None:
                    dirty.add(family)
        if full:  # source ranges also depend on the node's IPs: follow them
            touched = [*touched, *(e for e in self.served.values() if e.port.source_ranges)]
        for entry in touched:
            for family, _ in families:
                key = (entry.port.name, family)
                lines = filter_rules_of(entry, node_name=self.settings.hostname_override,
                                        node_ips=self.listener_set.node_ips, family=family)
                if lines == self._filter_by_name.get(key, []):
                    continue
                dirty.add(family)
                if lines:
                    self._filter_by_name[key] = lines
                else:
                    del self._filter_by_name[key]
        return dirty

    async def _restore_filter(self, dirty: set[int], full: bool) -> None:
        """The filter table: one restore per family when a line changed (and at full syncs)."""
        families = self._nat_tables()
        for family, table in families:  # one restore per family, when a line changed
            if family not in dirty and family in self._filter_text and not full:
                continue  # (rendering it walks every line: not at each endpoint change)
            text = render_filter(line for key in sorted(self._filter_by_name) if key[1] == family
                                 for line in self._filter_by_name[key])
            # (the first sync counts as full; start just wrote the chain and its hooks)
            if text != self._filter_text.get(family) or (full and self.rules_applied):
                await table.restore(text)
                self._filter_text[family] = text
        if not self._filter_hooks_in_place or (full and self.rules_applied):
            added = 0
            for _, table in families:
                added += await table.ensure_filter_hooks()
            if added and self._filter_hooks_in_place:
                log.warning("re-inserted %d uproxy filter hooks someone removed", added)
            self._filter_hooks_in_place = True

    async def _sync_health_checks(self, removed: list[Entry], touched: list[Entry],
                                  full: bool) -> None:
        """Open, move and close health-check node ports as the Services say (kube-proxy
        calls its SyncServices after every successful sync, too)."""
        changed = self._hc_pending
        for entry in removed:
            changed |= self._hc_ports.pop(entry.port.name, None) is not None
        for entry in touched:
            name, port = entry.port.name, entry.port.health_check_node_port
            if port:
                changed |= self._hc_ports.get(name) != port
                self._hc_ports[name] = port
            else:
                changed |= self._hc_ports.pop(name, None) is not None
        if not changed and not full:
            return  # (the usual endpoint change: no walk over every health-check port)
        wanted = {name.service: port for name, port in self._hc_ports.items()}
        self._hc_pending = wanted != self.health_checks.ports()
        if not self._hc_pending and not full:
            return  # nothing to open or close (node addresses are followed at full syncs)
        cidrs = self.settings.nodeport_addresses
        addresses = (("0.0.0.0", "::") if not cidrs
                     else tuple(nodeport_addresses(cidrs, self.listener_set.node_ips)))
        await self.health_checks.sync(wanted, addresses)
        self._hc_pending = wanted != self.health_checks.ports()  # (a bind failed: retry)
        if self.health_checks.adopted:  # a takeover brought ports no Service wants any more
            self.health_checks.close_unclaimed()

    def _local_ready(self, service: tuple[str, str]) -> int:
        table = self.served
        return local_ready_count((ep for name in self._hc_ports if name.service == service
                                  if name in table for ep in table[name].endpoints),
                                 self.settings.hostname_override)

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def _ensure_all_listeners(self, ports: list[ServicePort]) -> None:
        """:meth:`_ensure_listeners` of each (new ClusterIP ports' sockets opened together)."""
        wanted = []
        for port in ports:
            proxy = self.proxies.get(port.protocol)
            if proxy is None:
                self._ensure_listeners(port)  # (says once that it is skipped)
            else:
                wanted.append((port, proxy))
        self.listener_set.ensure_many(wanted)

    def _ensure_listeners(self, port: ServicePort) -> None:
        proxy = self.proxies.get(port.protocol)
        if proxy is None:
            self._warn_once(f"proto:{port.name}", "%s: %s services are not proxied yet; skipped",
                            port.name, port.protocol)
            return
        self.listener_set.ensure(port, proxy)

    # Takeover ------------------------------------------------------------------------------
    def _adopt_listeners(self, adopted: Received) -> None:
        for item, (sock, *_) in adopted.of_kind("listener"):
            m = item.meta
            name = ServicePortName(m["namespace"], m["name"], m["port_name"], m["protocol"])
            key = ListenerKey(name, m["scope"], m["address"], m["port"], int(m.get("family", 4)))
            self.listener_set.adopt(key, sock)

    def _adopt_flows(self) -> None:
        flows, self._adopted_flows = self._adopted_flows, []
        now, kept = time.monotonic(), 0
        for item, (sock, *_) in flows:
            if self._udp_mover is not None:
                kept += self._udp_mover.adopt(item.meta, sock, now)
            else:
                sock.close()
        log.info("took over %d of %d UDP flows", kept, len(flows))

    async def settle(self) -> None:
        """A new uproxy said hello: the rules work in flight finishes (start-up's
        preparation, a sync's or a repair's ``nft -f``/``iptables-restore``, whose
        processes run to their end even when their task is cancelled) and none starts
        after it: the rules lock stays ours until :meth:`unsettle`, and for good once
        handed over, so nothing of ours lands after the new uproxy's first sync."""
        if self._prepare is not None:
            with contextlib.suppress(Exception):  # (its failure is the first sync's to say)
                await asyncio.shield(self._prepare)
        await self._rules_lock.acquire()
        self._settled = True

    def settle_at_once(self) -> bool:
        """:meth:`settle` when nothing is in flight: the free lock taken without a loop turn
        (``acquire`` on a free ``asyncio.Lock`` returns without suspending)."""
        if self._rules_lock.locked() or (self._prepare is not None and not self._prepare.done()):
            return False
        step = self._rules_lock.acquire()
        try:
            step.send(None)
        except StopIteration:
            self._settled = True
            return True
        step.close()  # (it would have waited after all: settle() will)
        return False

    def unsettle(self) -> None:
        """The takeover did not happen: rules work goes on."""
        if self._settled:
            self._settled = False
            self._rules_lock.release()

    def pause(self) -> None:
        """A new uproxy takes over: stop accepting (the backlogs wait for it)."""
        for listener in self.listener_set.listeners.values():
            listener.pause()
        self._tcp_mover.pause()
        if self._udp_mover is not None:
            self._udp_mover.pause()
        self.health_checks.pause()

    def inventory(self) -> list[tuple[Item, list[socket.socket]]]:
        items: list[tuple[Item, list[socket.socket]]] = []
        for key, listener in self.listener_set.listeners.items():
            meta = {"protocol": key.name.protocol, "namespace": key.name.namespace,
                    "name": key.name.name, "port_name": key.name.port, "scope": key.scope,
                    "address": key.address, "port": key.port, "bound": listener.port,
                    "family": key.family}
            items.append((Item("listener", meta), [listener.sock]))
        for which, sock in self.server_sockets.items():
            items.append((Item("server", {"which": which}), [sock]))
        for address, port, sock in self.health_checks.sockets():
            items.append((Item("health_check", {"address": address, "port": port}), [sock]))
        now = time.monotonic()
        pins = [[n.namespace, n.name, n.port, n.protocol, client, ip, port, idle]
                for n, client, (ip, port), idle in (self.balancer.export_affinity(now)
                                                    + self._tcp.export_affinity(now))]
        items.append((Item("affinity", {"pins": pins}, fds=0), []))
        if self._udp_mover is not None:
            items += self._udp_mover.inventory(time.monotonic())
        return items + self._tcp_mover.inventory()

    def resume(self, reason: str) -> None:
        task = self.loop.create_task(self.health_checks.resume(), name="health-checks")
        self._tasks.append(task)
        self._tcp_mover.resume()
        if self._udp_mover is not None:
            self._udp_mover.resume()
        for listener in self.listener_set.listeners.values():
            listener.resume()

    def release(self) -> None:
        """The new uproxy owns every socket: close our copies quietly and stop (exit 0)."""
        self.handed_over = True
        if self.repairing:  # the rules are the new uproxy's: nothing more from us
            assert self._repair is not None
            self._repair.cancel()
        self.exit_watchdog = _exit_watchdog(self.settings.shutdown_grace + HANDED_OVER_EXIT_SLACK)
        moved = self._tcp_mover.release()
        flows = self._udp_mover.release() if self._udp_mover is not None else 0
        log.info("handed over %d connections and %d UDP flows", moved, flows)
        for listener in self.listener_set.listeners.values():
            listener.release()
        self.listener_set.listeners.clear()
        for sock in self.server_sockets.values():
            sock.close()
        self.stop()

    def _redirects_of(self, entry: Entry) -> list[Redirect]:
        """The rules of one service port: each of its addresses -> its listener's port."""
        name = entry.port.name
        redirects = redirects_of(entry.port, self.listener_set.proxy_ports(name),
                                 families=self.listener_set.families)
        for r in redirects.skipped:  # start() said once why the family is not served
            log.debug("%s: %s %s skipped: IPv%d is not served", name, r.kind, r.address,
                      r.family)
        return redirects.rules


HEALTH_CHECK_LINGER = 1.0
"""Seconds a uproxy that handed over gives its health-check node ports' accepted probes."""

HANDED_OVER_EXIT_SLACK = 5.0
"""Seconds beyond --shutdown-grace in which a uproxy that handed everything over must be gone."""


def _exit_watchdog(seconds: float) -> threading.Timer:
    """After a handover nothing here serves anyone: the new uproxy owns every socket, and
    the connections still finishing here are aborted after the grace anyway. So whatever
    holds this process up (a bug) must not hold up the upgrade, which waits for it to
    go: after ``seconds`` it says so in one line, writes every thread's stack (to find
    the bug) and exits 0. Cancelled by whoever keeps the process on on purpose
    (``UPROXY_AFTER_HANDOVER=wait``)."""
    def expire() -> None:
        log.warning("handed over %.0fs ago and still not stopped: exiting now (every "
                    "thread's stack follows)", seconds)
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
        os._exit(0)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.name = "handed-over-exit"
    timer.start()
    return timer


if TYPE_CHECKING:
    def _status_view(daemon: Daemon) -> DaemonView:
        return daemon  # mypy checks here that the daemon offers what the status server reads


def _canonical(ip: str, port: int) -> tuple[str, int]:
    """An endpoint's address as the kernel shows it (IPv6 compressed), and its port."""
    if ":" not in ip:
        return ip, port
    try:
        return str(ipaddress.ip_address(ip)), port
    except ValueError:
        return ip, port
