"""The edge of transparent mode: probe, apply and remove its rules; open backend sockets.

:mod:`uproxy.transparent` decides and renders; this module does the I/O:

* :meth:`Transparent.start` finds out whether the node allows the mode by doing it
  (there is no module to load and nothing to ask): an ``IP_TRANSPARENT`` socket, the
  mangle chain with its ``-m socket`` rule, the ``ip rule`` and its table. Whatever
  refuses turns the mode off for that family, said in one line, and uproxy connects
  from the node's address as before;
* :meth:`Transparent.repair` runs at every full sync: puts back a deleted rule, hook,
  routing rule or route, and re-reads the node's addresses and on-link prefixes the
  decision needs;
* :meth:`Transparent.cleanup` removes all of it (``uproxy cleanup``, a clean
  shutdown after the open connections are done, and a start after a crash);
* :meth:`Transparent.note_closed` (a TCP connection closed) sweeps, shortly after,
  the TIME_WAIT sockets that backend sockets bound to a client's address left in the
  node (:mod:`uproxy.proxy.sockdiag` says why they must go); :meth:`cleanup` at a stop
  sweeps them too, with every other closing state;
* :func:`backend_socket` opens a TCP or UDP backend socket, bound to the client's
  address when :meth:`Transparent.source_for` says so.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import shutil
import socket
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from uproxy import rules, transparent
from uproxy.model import Endpoint
from uproxy.proxy import sockdiag
from uproxy.spawn import spawn
from uproxy.transparent import FAMILIES, NodeLinks

log = logging.getLogger("uproxy.transparent")

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75  # Python 3.11 has no socket.IPV6_TRANSPARENT
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_CACHE_MAX = 4096
LINKS_REFRESH_MIN = 1.0  # seconds between on-demand re-reads of the node's links, doubling
LINKS_REFRESH_MAX = 30.0  # while a read finds nothing new (an endpoint that is never on-link)
SWEEP_DELAY = 0.5
"""Seconds from a connection's close to the TIME_WAIT sweep: closes arriving meanwhile
share it, and a client reusing the 4-tuple loses at most its first SYN (retried at 1 s)."""


def backend_socket(family: int, kind: int, source: str | None) -> socket.socket:
    """A non-blocking backend socket; bound to ``source`` (the client's address) with
    ``IP_TRANSPARENT`` when given.

    The port is left to ``connect`` (``IP_BIND_ADDRESS_NO_PORT`` for TCP), so the
    kernel picks one that is free for the whole 4-tuple. If the transparent bind is
    refused (the capability was dropped, the address is in use), the socket is opened
    plainly: the backend sees the node, and the connection still works.
    """
    sock = socket.socket(family, kind)
    sock.setblocking(False)
    if source is None:
        return sock
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
    except OSError as exc:
        sock.close()
        log.debug("transparent bind to %s refused (%s); connecting from the node", source, exc)
        sock = socket.socket(family, kind)
        sock.setblocking(False)
    return sock


class Transparent:
    """Whether backend connections go from the client's address, per family, and the
    rules that make their replies come back."""

    def __init__(self, node_name: str = "") -> None:
        self.node_name = node_name  # endpoints of this node: replies come back through it
        self.families: set[int] = set()  # families the mode is on for
        self.links = NodeLinks()
        self.refused: dict[int, str] = {}
        self._cache: dict[tuple[str, str, bool, bool, bool], str | None] = {}
        self._links_read = 0.0  # monotonic time of the last read
        self._links_wait = LINKS_REFRESH_MIN
        self._links_task: asyncio.Task[None] | None = None
        self._sweep: asyncio.TimerHandle | asyncio.Task[None] | None = None
        self._sweep_again = False  # a close during a sweep: sweep once more after it
        self.sweep_refused = ""  # why sweeping is off (said once)
        self.swept = 0  # TIME_WAIT sockets destroyed while running
        self.sweeps = 0  # sweeps run while running (each a walk of the node's sockets)
        # the endpoints' addresses and ports (the daemon's): a sweep destroys only sockets
        # whose peer is one of them; None (``uproxy cleanup``: no table) -- any peer
        self.backends: Callable[[], Collection[tuple[str, int]]] | None = None

    @property
    def active(self) -> bool:
        return bool(self.families)

    def source_for(self, client_ip: str, endpoint: Endpoint, *, external: bool,
                   external_local: bool) -> str | None:
        """The client's address to connect to ``endpoint`` from, or None (the node's)."""
        if not self.families:
            return None
        endpoint_ip = endpoint.ip
        here = bool(self.node_name) and endpoint.node_name == self.node_name
        key = (client_ip, endpoint_ip, external, external_local, here)
        try:
            return self._cache[key]
        except KeyError:
            pass
        family = 6 if ":" in endpoint_ip else 4
        got = None
        if family in self.families:
            got = transparent.transparent_source(client_ip, endpoint_ip, external=external,
                                                 external_local=external_local,
                                                 links=self.links, endpoint_here=here)
            if here and got is None and self._links_unknown(endpoint_ip):
                return None  # not cached: asked again until the links are read
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[key] = got
        return got

    def links_known(self, endpoint_ip: str, then: Callable[[], None] | None = None) -> bool:
        """Whether the links cover ``endpoint_ip`` (an endpoint of this node); when not,
        a re-read is started (see :meth:`_links_unknown`), and ``then`` called after it."""
        if not self._links_unknown(endpoint_ip):
            return True
        task = self._links_task
        if then is not None and task is not None and not task.done():
            task.add_done_callback(lambda _: then())
        return False

    def _links_unknown(self, endpoint_ip: str) -> bool:
        """An endpoint of this node with no on-link route: the links were read before its
        interface existed (a CNI creates its bridge with the first pod). Read them again
        soon rather than at the next full sync; the connections meanwhile go from the node."""
        try:
            if self.links.interface_of(ipaddress.ip_address(endpoint_ip)) is not None:
                return False
        except ValueError:
            return False
        busy = self._links_task is not None and not self._links_task.done()
        if not busy and time.monotonic() - self._links_read >= self._links_wait:
            self._links_task = asyncio.get_running_loop().create_task(self._read_links())
        return True

    # TIME_WAIT sweeps ---------------------------------------------------------------------
    def note_closed(self) -> None:
        """A TCP connection closed: sweep the TIME_WAIT sockets in :data:`SWEEP_DELAY`
        (one sweep for every close until then; none while nothing closes)."""
        if not self.families or self.sweep_refused:
            return
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(SWEEP_DELAY, self._sweep_now)
        elif isinstance(self._sweep, asyncio.Task):
            self._sweep_again = True

    def _sweep_now(self) -> None:
        self._sweep = asyncio.get_running_loop().create_task(self._sweep_task())

    async def _sweep_task(self) -> None:
        try:
            self.sweeps += 1
            self.swept += await self.sweep(self.links.local)
        finally:
            self._sweep = None
            if self._sweep_again:
                self._sweep_again = False
                self.note_closed()

    async def sweep(self, node_local: frozenset[str], states: int = sockdiag.TIME_WAIT) -> int:
        """Destroy the TCP sockets in ``states`` bound to an address not the node's and
        connected to one of :attr:`backends` (in a thread: a dump of thousands takes
        milliseconds). How many went."""
        if self.sweep_refused:
            return 0
        try:
            remotes = self.backends() if self.backends is not None else None
            done = await asyncio.to_thread(sockdiag.sweep, node_local, states,
                                           remotes=remotes)
        except OSError as exc:
            self.sweep_refused = exc.strerror or str(exc)
            log.warning("cannot destroy transparent TIME_WAIT sockets (%s): a client that "
                        "reuses one's address and port to reach the pod directly waits up "
                        "to 60s", self.sweep_refused)
            return 0
        if done.destroyed:
            log.debug("destroyed %d of %d TIME_WAIT sockets (transparent)", done.destroyed,
                      done.seen)
        return done.destroyed

    # Lifecycle ------------------------------------------------------------------------------
    async def start(self, *, wanted: bool, why_not: str = "") -> None:
        """Turn the mode on where the node allows it, or off (removing what an earlier
        run left) when not ``wanted`` (``--masquerade-all``; ``why_not`` is logged).

        Rules an earlier run left are kept as they are, not removed and added again:
        connections that run handed over, or whose replies are still on the way, keep
        arriving in their sockets.
        """
        if not wanted:
            await self.cleanup()
            if why_not:
                log.info("transparent backend connections off (%s): backends see the "
                         "node's address", why_not)
            return
        # The families side by side: each is a few iptables/ip processes in a row, and
        # they touch different tables (start-up figures: bench/ANALYSIS.md).
        reasons = await asyncio.gather(*(self._enable(family) for family in FAMILIES))
        for family, reason in zip(FAMILIES, reasons, strict=True):
            if reason is None:
                self.families.add(family)
            else:
                self.refused[family] = reason
                await self._remove(family)
        await self._read_links()
        if self.families == set(FAMILIES):
            log.info("transparent backend connections on: backends see the client's address")
        elif self.families:
            (on,) = self.families
            (off, reason), = self.refused.items()
            log.info("transparent backend connections on for IPv%d only (IPv%d refused: %s)",
                     on, off, reason)
        else:
            log.warning("transparent backend connections refused (%s): backends see the "
                        "node's address", self.refused.get(4, "?"))

    async def _enable(self, family: int) -> str | None:
        """Probe and apply one family; the reason it is refused, or None when on."""
        cmd = "ip6tables" if family == 6 else "iptables"
        for tool in (f"{cmd}-save", f"{cmd}-restore", "ip"):
            if shutil.which(tool) is None:
                return f"{tool} not found"
        try:
            probe = backend_socket_probe(family)
        except OSError as exc:
            return f"IP_TRANSPARENT: {exc.strerror or exc}"
        probe.close()
        _, error = await self._ensure_mangle(family)
        return error or await self._ensure_routing(family)

    async def _ensure_mangle(self, family: int) -> tuple[bool, str | None]:
        """The chain with its rule and one hook, changed only where it differs.
        Returns (changed, the reason it failed)."""
        cmd = "ip6tables" if family == 6 else "iptables"
        rc, saved = await _run(f"{cmd}-save", "-t", "mangle", output=True)
        if rc != 0:
            return False, f"{cmd}-save failed"
        if transparent.chain_intact(saved):
            return False, None
        hooks = [line for line in rules.hook_lines(saved) if transparent.CHAIN in line]
        for extra in hooks[1:]:
            await _run(cmd, "-w", "5", "-t", "mangle", "-D", *_unquote(extra.split()[1:]))
        rc, err = await _run(f"{cmd}-restore", "--noflush", "-w", "5",
                             stdin=transparent.render_mangle(hooks=not hooks))
        if rc != 0:
            return True, f"{cmd} mangle rule with -m socket refused: {err}"
        return True, None

    async def _ensure_routing(self, family: int) -> str | None:
        flag = f"-{family}"
        rc, err = await _run("ip", flag, "route", "replace", *transparent.route_spec(family))
        if rc != 0:
            return f"ip route table {transparent.TABLE}: {err}"
        rc, out = await _run("ip", flag, "rule", "show", output=True)
        if rc != 0:
            return f"ip rule: {out}"
        count = transparent.count_rules(out)
        for _ in range(count - 1):  # duplicates (added by hand, or a race of two runs)
            await _run("ip", flag, "rule", "del", *transparent.rule_spec(pref=False))
        if count == 0:
            rc, err = await _run("ip", flag, "rule", "add", *transparent.rule_spec())
            if rc != 0:
                return f"ip rule: {err}"
        return None

    async def repair(self) -> int:
        """Full sync: put back what someone removed; re-read the links. Returns repairs made."""
        repaired = 0
        for family in sorted(self.families):
            changed, error = await self._ensure_mangle(family)
            if error is not None:
                log.error("transparent mode: restoring the IPv%d mangle rule: %s", family, error)
            repaired += changed
            flag = f"-{family}"
            _, route = await _run("ip", flag, "route", "show", "table", str(transparent.TABLE),
                                  output=True)
            _, shown = await _run("ip", flag, "rule", "show", output=True)
            if not transparent.route_present(route) or transparent.count_rules(shown) != 1:
                reason = await self._ensure_routing(family)
                if reason is not None:
                    log.error("transparent mode: restoring IPv%d policy routing: %s", family,
                              reason)
                repaired += 1
        if repaired:
            log.warning("re-applied %d transparent-mode rules someone removed", repaired)
        await self._read_links()
        return repaired

    async def cleanup(self, *, sweep: bool = False) -> int:
        """Remove uproxy's mangle chain, hook, routing rules and table, both families.

        With ``sweep`` (a stop that handed nothing over, ``uproxy cleanup``), then destroy
        the closing sockets transparent connections left, in every closing state (after
        the rules: a late FIN from a pod goes on to the client then, not into a socket that
        would linger). Not at a start with the mode off: a takeover's half-closed
        connections are in those states too."""
        removed = 0
        for family in FAMILIES:
            removed += await self._remove(family)
        if self._links_task is not None:
            self._links_task.cancel()
        self._sweep_again = False
        if isinstance(self._sweep, asyncio.Task):
            await asyncio.wait([self._sweep])
        if isinstance(self._sweep, asyncio.TimerHandle):
            self._sweep.cancel()
        self._sweep = None
        if sweep:
            await self._sweep_closing()
        self.families.clear()
        self._cache.clear()
        return removed

    async def _sweep_closing(self) -> None:
        rc, out = await _run("ip", "-j", "addr", "show", output=True)
        try:
            addrs = json.loads(out) if rc == 0 and out.strip() else None
        except ValueError:
            addrs = None
        if isinstance(addrs, list):  # (without the node's addresses, nothing is swept)
            destroyed = await self.sweep(transparent.parse_links(addrs, ()).local,
                                         sockdiag.CLOSING)
            if destroyed:
                log.info("destroyed %d closing transparent sockets", destroyed)

    async def _remove(self, family: int) -> int:
        removed = 0
        cmd = "ip6tables" if family == 6 else "iptables"
        if shutil.which(f"{cmd}-save") is not None:
            rc, saved = await _run(f"{cmd}-save", "-t", "mangle", output=True)
            if rc == 0:
                for line in rules.hook_lines(saved):
                    if transparent.CHAIN not in line:
                        continue
                    argv = line.split()
                    argv[0] = "-D"
                    await _run(cmd, "-w", "5", "-t", "mangle", *_unquote(argv))
                    removed += 1
                chains = {c for c in rules.uproxy_chains(saved) if c == transparent.CHAIN}
                text = transparent.render_mangle_cleanup(chains)
                if text:
                    await _run(f"{cmd}-restore", "--noflush", "-w", "5", stdin=text)
                    removed += len(chains)
        if shutil.which("ip") is not None:
            flag = f"-{family}"
            _, shown = await _run("ip", flag, "rule", "show", output=True)
            for _ in range(transparent.count_rules(shown)):
                rc, _err = await _run("ip", flag, "rule", "del", *transparent.rule_spec(pref=False))
                removed += rc == 0
            _, route = await _run("ip", flag, "route", "show", "table", str(transparent.TABLE),
                                  output=True)
            if transparent.route_present(route):
                rc, _err = await _run("ip", flag, "route", "del", *transparent.route_spec(family))
                removed += rc == 0
        return removed

    async def _read_links(self) -> None:
        if not self.families:
            return
        self._links_read = time.monotonic()
        data: list[list[dict[str, Any]]] = []
        outputs = await asyncio.gather(*(_run(*argv, output=True) for argv in (
            ("ip", "-j", "addr", "show"), ("ip", "-j", "-4", "route", "show"),
            ("ip", "-j", "-6", "route", "show"))))
        for rc, out in outputs:
            try:
                parsed = json.loads(out) if rc == 0 and out.strip() else []
            except ValueError:
                parsed = []
            data.append(parsed if isinstance(parsed, list) else [])
        links = transparent.parse_links(data[0], data[1] + data[2])
        if links != self.links:
            self.links = links
            self._cache.clear()
            self._links_wait = LINKS_REFRESH_MIN
        else:
            self._links_wait = min(self._links_wait * 2, LINKS_REFRESH_MAX)


def backend_socket_probe(family: int) -> socket.socket:
    """A socket with the transparent option set (raises OSError when refused)."""
    sock = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        if family == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    except OSError:
        sock.close()
        raise
    return sock


async def _run(*argv: str, stdin: str | None = None, output: bool = False) -> tuple[int, str]:
    """Run one command; (exit code, stdout when ``output`` else the first stderr line)."""
    try:
        proc = await spawn(argv, stdin)
    except OSError as exc:
        return 127, str(exc)
    out, err = proc.stdout, proc.stderr
    if output:
        return proc.returncode or 0, out.decode(errors="replace")
    first = (err.decode(errors="replace").strip().splitlines() or [""])[0]
    return proc.returncode or 0, first


def _unquote(argv: Sequence[str]) -> list[str]:
    """Re-join a save line split on spaces where a quoted comment held spaces."""
    out: list[str] = []
    buf: list[str] | None = None
    for part in argv:
        if buf is not None:
            buf.append(part)
            if part.endswith('"'):
                out.append(" ".join(buf)[1:-1])
                buf = None
        elif part.startswith('"') and part.endswith('"') and len(part) > 1:
            out.append(part[1:-1])
        elif part.startswith('"'):
            buf = [part]
        else:
            out.append(part)
    return out
