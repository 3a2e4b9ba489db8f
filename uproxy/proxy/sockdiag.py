"""The edge: destroy the node's closing TCP sockets that transparent mode left behind.

A transparent backend socket is bound to the client's address. When uproxy closes it
first (the client closed first, or uproxy stopped), the kernel keeps it in TIME_WAIT
for 60 s as ``clientIP:E <-> podIP:port`` -- in the node's namespace, where packets of
any other connection with that 4-tuple pass (the client reaching the pod directly from
port E: headless Services, pod IPs, another proxy's DNAT). IP early demux finds the
TIME_WAIT socket for the pod's forwarded SYN-ACK and ``ip_forward`` drops a packet that
carries a socket; with uproxy's ``-m socket --transparent`` mark rule (it matches
TIME_WAIT sockets too) the SYN-ACK is delivered to the TIME_WAIT socket instead. Either
way that connection hangs until the TIME_WAIT socket expires (bench/ANALYSIS.md,
"Transparent mode's TIME_WAIT sockets").

So uproxy destroys them, as ``ss -K`` does: a ``NETLINK_SOCK_DIAG`` dump of the TCP
sockets in the given states whose local address is not one of the node's -- only
``IP_TRANSPARENT`` makes such sockets -- then ``SOCK_DESTROY`` for each. The kernel
filters both (the state mask, and a small ``inet_diag`` bytecode that rejects the
node's own addresses), so a node holding thousands of TIME_WAIT sockets of its own
costs a sweep little for them (bench/ANALYSIS.md has the figures). The messages are
small fixed structs (``linux/inet_diag.h``), written here with :mod:`struct`; this
module only talks to the kernel, the decision of when to sweep is
:class:`uproxy.proxy.transparent.Transparent`'s.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300

TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_TIME_WAIT, TCP_LAST_ACK, TCP_CLOSING = 4, 5, 6, 9, 11
TIME_WAIT = 1 << TCP_TIME_WAIT
CLOSING = TIME_WAIT | (1 << TCP_FIN_WAIT1) | (1 << TCP_FIN_WAIT2) | (1 << TCP_LAST_ACK) \
    | (1 << TCP_CLOSING)
"""Every state of a socket uproxy already closed (at stop: no process owns them)."""

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states (then the sockid)
_SOCKID = struct.Struct("=HH16s16sI8s")  # sport, dport (big-endian), src, dst, if, cookie
_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans (then the sockid)
_ERR = struct.Struct("=i")
_ATTR = struct.Struct("=HH")  # nlattr: len, type
_BC_OP = struct.Struct("=BBH")  # inet_diag_bc_op: code, yes, no
_HOSTCOND = struct.Struct("=BBxxi")  # family, prefix_len, port (-1: any), then the address
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_JMP, INET_DIAG_BC_S_COND = 1, 7  # (enum inet_diag_bc_op code)
_BC_MAX = 60_000  # ``no`` is 16 bits: beyond this many bytes of filter, filter here instead
_BATCH = 400  # destroy requests per send (each 72 bytes)


class DestroyUnsupported(OSError):
    """The kernel refuses ``SOCK_DESTROY`` (built without it, or not for this state)."""


@dataclass(frozen=True, slots=True)
class Swept:
    seen: int  # sockets in the states asked for, not bound to the node's addresses
    destroyed: int  # of those, destroyed


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    ip = ipaddress.IPv6Address(raw)
    mapped = ip.ipv4_mapped
    return str(mapped) if mapped is not None else str(ip)


def sweep(node_local: Iterable[str], states: int = TIME_WAIT,
          families: Iterable[int] = (socket.AF_INET, socket.AF_INET6),
          remotes: Collection[tuple[str, int]] | None = None) -> Swept:
    """Destroy the TCP sockets in ``states`` whose local address is not node-local
    (and, given ``remotes``, whose peer is one of those addresses and ports: uproxy's
    endpoints, so another transparent proxy's sockets to other peers are left alone).

    Raises :class:`DestroyUnsupported` when the kernel refuses ``SOCK_DESTROY``, and
    OSError when it refuses the netlink socket, the dump or the destroy (no
    CAP_NET_ADMIN)."""
    local = set(node_local)
    v4 = [("127.0.0.0", 8), *((a, 32) for a in local if ipaddress.ip_address(a).version == 4)]
    v6 = [("::1", 128), *((a, 128) for a in local if ipaddress.ip_address(a).version == 6)]
    seen = destroyed = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        for family in families:
            # (an IPv6 socket may be bound to a v4-mapped address: the kernel matches an
            # IPv4 condition against it)
            bytecode = _reject_sources(v4 + v6 if family == socket.AF_INET6 else v4)
            ids = _dump(nl, family, states, bytecode)
            if not bytecode:  # (too many addresses for a kernel filter: filter here)
                ids = [i for i in ids if _foreign(family, i, local)]
            if remotes is not None:
                ids = [i for i in ids if _peer(family, i) in remotes]
            seen += len(ids)
            destroyed += _destroy(nl, family, ids)
    return Swept(seen, destroyed)


def _peer(family: int, sockid: bytes) -> tuple[str, int]:
    """The remote address and port of a raw ``inet_diag_sockid``."""
    return _address(family, sockid[20:36]), int.from_bytes(sockid[2:4], "big")


def _foreign(family: int, sockid: bytes, local: set[str]) -> bool:
    address = _address(family, sockid[4:20])
    ip = ipaddress.ip_address(address)
    return address not in local and not (ip.is_loopback or ip.is_unspecified)


def _reject_sources(prefixes: list[tuple[str, int]]) -> bytes:
    """``inet_diag`` bytecode that rejects sockets bound to any of ``prefixes``.

    The kernel follows ``yes`` in sequence and jumps by ``no``; running off the end by
    exactly 0 accepts, by 4 rejects. Per prefix: a source condition whose ``yes`` goes on
    to a jump to the reject point and whose ``no`` skips that jump."""
    blocks = []
    for address, prefix_len in prefixes:
        ip = ipaddress.ip_address(address)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        cond = _HOSTCOND.pack(family, prefix_len, -1) + ip.packed
        size = _BC_OP.size + len(cond)
        blocks.append((size, cond))
    total = sum(size + _BC_OP.size for size, _ in blocks)
    if total > _BC_MAX:
        return b""
    out, at = [], 0
    for size, cond in blocks:
        out.append(_BC_OP.pack(INET_DIAG_BC_S_COND, size, size + _BC_OP.size) + cond)
        at += size
        out.append(_BC_OP.pack(INET_DIAG_BC_JMP, _BC_OP.size, total - at + 4))
        at += _BC_OP.size
    return b"".join(out)


def _request(kind: int, flags: int, seq: int, family: int, states: int, sockid: bytes,
             bytecode: bytes = b"") -> bytes:
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, states) + sockid
    if bytecode:
        body += _ATTR.pack(_ATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    return _NLMSG.pack(_NLMSG.size + len(body), kind, flags, seq, 0) + body


def _messages(data: bytes) -> Iterable[tuple[int, int, bytes]]:
    """(type, seq, payload) of each netlink message in ``data``."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _flags, seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            break
        yield kind, seq, data[offset + _NLMSG.size:offset + length]
        offset += (length + 3) & ~3


def _dump(nl: socket.socket, family: int, states: int, bytecode: bytes) -> list[bytes]:
    """The raw ``inet_diag_sockid`` (cookie included) of each socket the dump returns."""
    empty_id = bytes(_SOCKID.size)
    nl.send(_request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, family, states,
                     empty_id, bytecode))
    ids: list[bytes] = []
    id_at, id_end = _MSG_HEAD.size, _MSG_HEAD.size + _SOCKID.size
    for _ in range(1_000_000):  # bounded: each read returns at least one message or raises
        data = nl.recv(1 << 16)
        for kind, _seq, payload in _messages(data):
            if kind == NLMSG_DONE:
                return ids
            if kind == NLMSG_ERROR:
                (err,) = _ERR.unpack_from(payload)
                raise OSError(-err, f"sock_diag dump: {os.strerror(-err)}")
            if len(payload) >= id_end:
                ids.append(payload[id_at:id_end])
    return ids


def _destroy(nl: socket.socket, family: int, ids: list[bytes]) -> int:
    """``SOCK_DESTROY`` each, in batches; how many went.

    Without ``NLM_F_ACK`` the kernel answers only failures, and it handles a batch
    within ``send`` (sock_diag runs in the sender's context), so the failures are
    queued when it returns: read them without waiting."""
    head = _request(SOCK_DESTROY, NLM_F_REQUEST, 0, family, 0, b"")
    head = _NLMSG.pack(len(head) + _SOCKID.size, SOCK_DESTROY, NLM_F_REQUEST, 0, 0) \
        + head[_NLMSG.size:]
    destroyed = 0
    for start in range(0, len(ids), _BATCH):
        batch = ids[start:start + _BATCH]
        nl.send(b"".join([head + sockid for sockid in batch]))
        failed = 0
        for _ in range(len(batch)):  # bounded: at most one answer per request
            try:
                data = nl.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            for kind, _seq, payload in _messages(data):
                if kind != NLMSG_ERROR:
                    continue
                (err,) = _ERR.unpack_from(payload)
                if err == 0:
                    continue
                failed += 1
                if -err == errno.EOPNOTSUPP:
                    raise DestroyUnsupported(-err, "SOCK_DESTROY: " + os.strerror(-err))
                if -err != errno.ENOENT:  # ENOENT: gone meanwhile (expired, or reused)
                    raise OSError(-err, "SOCK_DESTROY: " + os.strerror(-err))
        destroyed += len(batch) - failed
    return destroyed


# --- one socket by its exact address ------------------------------------------------------

_NOCOOKIE = b"\xff" * 8
_SOL_IPV6, _IPV6_TRANSPARENT = 41, 75
_IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)

Named = tuple[int, tuple[str, int], tuple[str, int]]
"""(family, local (address, port), peer (address, port)) of a TCP socket."""


def transparent_name(sock: socket.socket) -> Named | None:
    """The exact address of a connected socket bound to an address not the node's
    (``IP_TRANSPARENT``), or None (not transparent, or not connected)."""
    v6 = sock.family == socket.AF_INET6
    try:
        on = sock.getsockopt(_SOL_IPV6 if v6 else socket.SOL_IP,
                             _IPV6_TRANSPARENT if v6 else _IP_TRANSPARENT)
        if not on:
            return None
        local, peer = sock.getsockname(), sock.getpeername()
    except OSError:
        return None
    return (6 if v6 else 4), (local[0], local[1]), (peer[0], peer[1])


def _exact_id(name: Named) -> bytes:
    family, (src, sport), (dst, dport) = name
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    return _SOCKID.pack(socket.htons(sport), socket.htons(dport),
                        socket.inet_pton(af, src).ljust(16, b"\0"),
                        socket.inet_pton(af, dst).ljust(16, b"\0"), 0, _NOCOOKIE)


class Exact:
    """``SOCK_DESTROY`` of one TIME_WAIT socket by its exact address: O(1) lookups in the
    kernel, where :func:`sweep` walks every socket of the namespace. The relays use it for
    the socket a transparent backend connection leaves when the backend's FIN is read
    after ours. It asks first and destroys by the answer's cookie, so only a socket in
    TIME_WAIT goes, never another one with the address (when the FINs crossed, ours
    closed passively and left none)."""

    def __init__(self) -> None:
        self._nl: socket.socket | None = None

    def destroy(self, name: Named) -> bool:
        """True when destroyed, False when there is none; OSError when refused."""
        if self._nl is None:
            self._nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                     NETLINK_SOCK_DIAG)
        af = socket.AF_INET6 if name[0] == 6 else socket.AF_INET
        self._nl.send(_request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 2, af, TIME_WAIT,
                               _exact_id(name)))
        data = self._nl.recv(1 << 12)
        for kind, _seq, payload in _messages(data):
            if kind == NLMSG_ERROR:
                (err,) = _ERR.unpack_from(payload)
                if -err == errno.ENOENT:
                    return False
                raise OSError(-err, "sock_diag: " + os.strerror(-err))
            if kind == SOCK_DIAG_BY_FAMILY and len(payload) >= _MSG_HEAD.size + _SOCKID.size:
                if payload[1] != TCP_TIME_WAIT:
                    return False
                sockid = payload[_MSG_HEAD.size:_MSG_HEAD.size + _SOCKID.size]
                return _destroy(self._nl, af, [sockid]) == 1
        return False

    def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None
