"""The node's links as the native engine reads them: a ``struct uproxy_links``.

The engine decides per connection whether a backend connection goes from the
client's address (``uproxy_transparent_source``, native/transparent.c, the C twin
of :func:`uproxy.transparent.transparent_source`) without calling Python. What
that decision knows about the node is a :class:`~uproxy.transparent.NodeLinks`;
:class:`NativeLinks` builds the C form of one, once per links read (the C object
is immutable after: the engine swaps pointers, and the old one is freed when the
engine no longer reads it).

Mapping, chosen so the C answers are Python's (tests/core/test_transparent_native.py
asserts it over a generated table):

* interface names become small ints (:attr:`NativeLinks.devs`, sorted names
  numbered from 0): the decision only compares interfaces;
* an interface in ``default_devs`` is an uplink: every prefix on it is added with
  the uplink flag;
* on-link prefixes are parsed as NodeLinks parses them (``ip_network(strict=False)``;
  unparsable ones skipped), in NodeLinks' order, so equal lengths keep Python's
  first match;
* a local address is added only where its text is the canonical form
  ``str(ip_address(text))``: Python compares canonical client text with the
  set's strings, so another spelling never matches there and must not here;
* ``families``: the routes of a family that is not in it are left out, which makes
  every answer of that family 0 -- what :meth:`Transparent.source_for` answers for a
  family whose transparent mode is off.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Iterable
from typing import Any

from uproxy import native
from uproxy.transparent import FAMILIES, NodeLinks

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class NativeLinks:
    """A ``struct uproxy_links`` built from a :class:`NodeLinks`; freed with this object
    unless :meth:`detach` handed it over."""

    def __init__(self, links: NodeLinks, families: Iterable[int] = FAMILIES) -> None:
        lib, ffi = self._lib, self._ffi = native.lib(), native.ffi()
        wanted = frozenset(families)
        raw = lib.uproxy_links_new()
        if raw == ffi.NULL:
            raise MemoryError("uproxy_links_new")
        self._raw: Any = raw
        self._owned: Any = ffi.gc(raw, lib.uproxy_links_free)
        names = sorted({dev for _, dev in links.on_link})
        self.devs: dict[str, int] = {name: i for i, name in enumerate(names)}
        self._names = names
        for text in sorted(links.local):
            ip = _canonical(text)
            if ip is not None:
                _check(lib.uproxy_links_add_local(raw, ip.version, ip.packed), "local", text)
        for prefix, dev in links.on_link:
            try:
                net = ipaddress.ip_network(prefix, strict=False)
            except ValueError:
                continue  # NodeLinks skips it too
            if net.version not in wanted:
                continue
            rc = lib.uproxy_links_add_onlink(raw, net.version, net.network_address.packed,
                                             net.prefixlen, self.devs[dev],
                                             int(dev in links.default_devs))
            _check(rc, "on-link", prefix)

    @property
    def ptr(self) -> Any:
        """The ``struct uproxy_links *`` to hand to C (valid while this object lives,
        or until whoever :meth:`detach` handed it to frees it)."""
        return self._raw

    def detach(self) -> Any:
        """Hand the C object over: it is no longer freed with this object; the new owner
        calls ``uproxy_links_free``."""
        if self._owned is not None:
            self._ffi.gc(self._owned, None)
            self._owned = None
        return self._raw

    def interface_of(self, ip_text: str) -> str | None:
        """:meth:`NodeLinks.interface_of` through ``uproxy_links_dev_of``."""
        ip = _address(ip_text)
        if ip is None:
            return None
        dev = self._lib.uproxy_links_dev_of(self._raw, ip.version, ip.packed)
        return None if dev < 0 else self._names[dev]

    def source(self, client_ip: str, endpoint_ip: str, *, external: bool,
               external_local: bool, endpoint_here: bool = True) -> str | None:
        """:func:`uproxy.transparent.transparent_source` (same arguments and answer) asked
        of ``uproxy_transparent_source``: for tests and callers holding text."""
        client, endpoint = _address(client_ip), _address(endpoint_ip)
        if client is None or endpoint is None:
            return None
        family, client_bytes, endpoint_bytes = _pair(client, endpoint)
        got = self._lib.uproxy_transparent_source(self._raw, family, client_bytes,
                                                  endpoint_bytes, int(external),
                                                  int(external_local), int(endpoint_here))
        if not got:
            return None
        mapped = client.ipv4_mapped if isinstance(client, ipaddress.IPv6Address) else None
        return str(mapped or client)


def _check(rc: int, what: str, text: str) -> None:
    if rc == -errno.ENOMEM:
        raise MemoryError(f"uproxy_links: adding {what} {text}")
    if rc != 0:
        raise ValueError(f"uproxy_links: {what} {text} refused ({rc})")


def _address(text: str) -> IPAddress | None:
    """The address as typed, scope dropped (mapped addresses stay IPv6: C maps them)."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _canonical(text: str) -> IPAddress | None:
    ip = _address(text)
    return ip if ip is not None and str(ip) == text else None


def _pair(client: IPAddress, endpoint: IPAddress) -> tuple[int, bytes, bytes]:
    """One family for both: where the versions differ, the IPv4 one goes as
    ``::ffff:a.b.c.d`` (C reads a mapped address as IPv4, as Python does)."""
    if client.version == endpoint.version:
        return client.version, client.packed, endpoint.packed
    return 6, _as6(client), _as6(endpoint)


def _as6(ip: IPAddress) -> bytes:
    return ip.packed if ip.version == 6 else b"\0" * 10 + b"\xff\xff" + ip.packed
