"""Deleting stale conntrack entries for UDP services, with the ``conntrack`` tool.

Why at all: UDP has no connection end, so the kernel keeps an entry for as
long as a client keeps sending, and every datagram refreshes it. A client
that keeps its source port (DNS forwarders and stub resolvers often do) stays
mapped to whatever the *first* datagram was NATed to, forever:

* **A service port goes away** (or its ClusterIP/externalIP/LB IP, or it is
  re-created): the entries ``client -> ClusterIP:port`` still say
  "REDIRECT to proxy port P" although P is closed (clients get ICMP errors) or,
  worse, later reused by another service. They are deleted, so the next datagram
  is evaluated against the current rules.
* **A frontend appears** (a new service, or uproxy restarted and bound new proxy
  ports): entries for ``client -> ClusterIP:port`` made before our rule existed
  are not NATed at all (the datagrams go to the node's sink route), and entries
  from an earlier run point to an old proxy port. Both are deleted; entries
  already NATed to the *current* proxy port are kept (deleting one between a
  request and its reply would lose that reply).
* **An endpoint goes away**: what matters for uproxy is that the flow's own
  backend socket is closed (the UDP proxy does that), so the next datagram of
  the client picks another endpoint; the client's ``client -> ClusterIP``
  mapping to the proxy socket stays valid and is kept. Entries whose reply
  source is the endpoint (our backend sockets' entries, and any DNAT to it made
  by someone else, e.g. kube-proxy during a migration) are deleted, as
  kube-proxy does, so ``conntrack -L`` does not keep showing a dead backend.
* NodePorts are not NATed by uproxy (the client talks to our socket directly),
  so their entries are never stale and are left alone.

How: ``conntrack -D`` with filters makes the tool dump the whole table once
per command (measured: ~17 ms per ``-D`` line against 5,000 entries, even with
an exact tuple), so one command per stale frontend does not scale to a restart
with thousands of UDP services. Instead one ``conntrack -L -p udp`` dump is
parsed here, matched against the stale set in Python (set lookups), and only
the entries actually found are deleted by exact original tuple, in one
``conntrack -R -`` batch fed on stdin. Typically only a handful match. Each command
runs from a worker thread (:mod:`uproxy.spawn`) with a bounded timeout; a missing
binary is logged once and otherwise ignored (the proxy works without it, just less
tidily).
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from uproxy.spawn import spawn

log = logging.getLogger("uproxy.conntrack")

LIST_TIMEOUT = 10.0
DELETE_TIMEOUT_PER_ENTRY = 0.25


@dataclass(frozen=True, slots=True)
class CtEntry:
    """One conntrack entry: the original and the reply tuple."""

    protocol: str
    orig_src: str
    orig_dst: str
    orig_sport: int
    orig_dport: int
    reply_src: str
    reply_dst: str
    reply_sport: int
    reply_dport: int

    @property
    def family(self) -> int:
        return 6 if ":" in self.orig_src else 4

    def delete_line(self) -> str:
        """The ``conntrack -R`` line deleting exactly this entry (by its original tuple)."""
        fam = " -f ipv6" if self.family == 6 else ""
        return (f"-D{fam} -p {self.protocol} -s {self.orig_src} -d {self.orig_dst} "
                f"--sport {self.orig_sport} --dport {self.orig_dport}")


@dataclass(frozen=True, slots=True)
class Stale:
    """A set of entries to delete.

    ``orig_dst``: entries whose original destination is this frontend
    (``ClusterIP, port``), except, with ``keep_reply_port``, those already
    redirected to that (current) proxy port. ``reply_src``: entries whose reply
    comes from this endpoint.
    """

    orig_dst: tuple[str, int] | None = None
    reply_src: tuple[str, int] | None = None
    keep_reply_port: int | None = None

    @staticmethod
    def frontend(ip: str, port: int, *, keep_reply_port: int | None = None) -> Stale:
        return Stale(orig_dst=(ip, port), keep_reply_port=keep_reply_port)

    @staticmethod
    def endpoint(ip: str, port: int) -> Stale:
        return Stale(reply_src=(ip, port))

    @property
    def family(self) -> int:
        addr = self.orig_dst or self.reply_src
        return 6 if addr is not None and ":" in addr[0] else 4


def parse_entries(text: str, protocol: str = "udp") -> list[CtEntry]:
    """Entries of ``protocol`` from ``conntrack -L`` output (other lines are skipped)."""
    out: list[CtEntry] = []
    for line in text.splitlines():
        tokens = line.split()
        if not tokens or tokens[0] != protocol:
            continue
        orig: dict[str, str] = {}
        reply: dict[str, str] = {}
        for token in tokens[1:]:
            key, sep, value = token.partition("=")
            if not sep or key not in ("src", "dst", "sport", "dport"):
                continue
            (reply if key in orig else orig).setdefault(key, value)
        try:
            out.append(CtEntry(protocol, orig["src"], orig["dst"], int(orig["sport"]),
                               int(orig["dport"]), reply["src"], reply["dst"],
                               int(reply["sport"]), int(reply["dport"])))
        except (KeyError, ValueError):
            continue
    return out


def select(entries: Iterable[CtEntry], stale: Iterable[Stale]) -> list[CtEntry]:
    """The entries that match any of ``stale`` (pure; O(entries + stale))."""
    frontends: dict[tuple[str, int], int | None] = {}
    endpoints: set[tuple[str, int]] = set()
    for s in stale:
        if s.orig_dst is not None:
            # Deleting everything wins over keeping the current port's entries.
            if s.orig_dst in frontends and frontends[s.orig_dst] != s.keep_reply_port:
                frontends[s.orig_dst] = None
            else:
                frontends[s.orig_dst] = s.keep_reply_port
        if s.reply_src is not None:
            endpoints.add(s.reply_src)
    out = []
    for e in entries:
        dst = (e.orig_dst, e.orig_dport)
        if dst in frontends:
            keep = frontends[dst]
            if keep is None or e.reply_sport != keep or e.reply_src == e.orig_dst:
                out.append(e)
                continue
        if (e.reply_src, e.reply_sport) in endpoints:
            out.append(e)
    return out


class Conntrack:
    """Runs the ``conntrack`` tool; one call at a time per instance is the caller's job."""

    def __init__(self, *, binary: str = "conntrack", timeout: float = LIST_TIMEOUT,
                 enabled: bool = True) -> None:
        self.binary = binary
        self.timeout = timeout
        self.available = enabled  # False: do nothing (tests outside a namespace of their own)
        self.deleted_total = 0
        self.calls = 0
        self._warned: set[str] = set()

    async def delete(self, stale: Collection[Stale], *, protocol: str = "udp") -> int:
        """Delete the entries matching ``stale``; returns how many were found and deleted."""
        self.calls += 1
        if not stale or not self.available:
            return 0
        deleted = 0
        for family in sorted({s.family for s in stale}):
            wanted = [s for s in stale if s.family == family]
            # (without -f the tool lists every family: name it, so each is listed once)
            fam = ["-f", "ipv6"] if family == 6 else ["-f", "ipv4"]
            listing = await self._run(["-L", *fam, "-p", protocol], timeout=self.timeout)
            if listing is None:
                return deleted
            listed = parse_entries(listing, protocol)
            found = select(listed, wanted)
            log.debug("IPv%d: %d stale sets, %d %s entries listed, %d to delete", family,
                      len(wanted), len(listed), protocol, len(found))
            if not found:
                continue
            batch = "".join(e.delete_line() + "\n" for e in found)
            timeout = self.timeout + DELETE_TIMEOUT_PER_ENTRY * len(found)
            if await self._run(["-R", "-"], timeout=timeout, stdin=batch) is None:
                return deleted
            deleted += len(found)
            log.debug("deleted %d stale conntrack entries", len(found))
        self.deleted_total += deleted
        return deleted

    def _warn(self, message: str) -> None:
        """A problem is logged once as a warning; the same problem again only at debug."""
        if message in self._warned:
            log.debug("%s", message)
            return
        if len(self._warned) > 100:
            self._warned.clear()
        self._warned.add(message)
        log.warning("%s", message)

    async def _run(self, args: list[str], *, timeout: float,
                   stdin: str | None = None) -> str | None:
        """Run the tool (from a worker thread, :func:`uproxy.spawn.spawn`); its stdout, or
        None after logging why not."""
        try:
            proc = await spawn([self.binary, *args], stdin=stdin, timeout=timeout)
        except FileNotFoundError:
            self.available = False
            log.warning("the %r tool is not installed: stale UDP conntrack entries are not "
                        "deleted (install conntrack)", self.binary)
            return None
        except OSError as exc:
            self._warn(f"cannot run {self.binary}: {exc.strerror or exc}")
            return None
        except subprocess.TimeoutExpired:
            self._warn(f"{self.binary} {args[0]} timed out after {timeout:.1f}s")
            return None
        text_err = proc.stderr.decode(errors="replace").strip()
        # Exit 1 with "0 flow entries have been deleted" only means nothing matched.
        if proc.returncode != 0 and not (proc.returncode == 1 and "0 flow entries" in text_err):
            line = text_err.splitlines()[0] if text_err else ""
            self._warn(f"{self.binary} {' '.join(args)} failed (exit {proc.returncode}): {line}")
            return None
        return proc.stdout.decode(errors="replace")
