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
sockets in the given states (kernel-filtered), per family, then ``SOCK_DESTROY`` for
each whose local address is not one of the node's -- only ``IP_TRANSPARENT`` makes
such sockets. The messages are small fixed structs (``linux/inet_diag.h``), written
here with :mod:`struct`; this module only talks to the kernel, the decision of when to
sweep is :class:`uproxy.proxy.transparent.Transparent`'s.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable
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
_BATCH = 400  # destroy requests per send (each 72 bytes)


class DestroyUnsupported(OSError):
    """The kernel refuses ``SOCK_DESTROY`` (built without it, or not for this state)."""


@dataclass(frozen=True, slots=True)
class Swept:
    seen: int  # sockets in the states asked for
    destroyed: int  # transparent ones destroyed


@dataclass(frozen=True, slots=True)
class _Sock:
    family: int
    local: str
    sockid: bytes  # the raw inet_diag_sockid, cookie included, as the dump gave it


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    ip = ipaddress.IPv6Address(raw)
    mapped = ip.ipv4_mapped
    return str(mapped) if mapped is not None else str(ip)


def sweep(node_local: Iterable[str], states: int = TIME_WAIT,
          families: Iterable[int] = (socket.AF_INET, socket.AF_INET6)) -> Swept:
    """Destroy the TCP sockets in ``states`` whose local address is not node-local.

    Raises :class:`DestroyUnsupported` when the kernel refuses ``SOCK_DESTROY``, and
    OSError when it refuses the netlink socket or the dump (no CAP_NET_ADMIN)."""
    local = set(node_local)

    def transparent(s: _Sock) -> bool:
        if s.local in local:
            return False
        ip = ipaddress.ip_address(s.local)
        return not (ip.is_loopback or ip.is_unspecified)

    seen = destroyed = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        for family in families:
            socks = _dump(nl, family, states)
            seen += len(socks)
            destroyed += _destroy(nl, [s for s in socks if transparent(s)])
    return Swept(seen, destroyed)


def _request(kind: int, flags: int, seq: int, family: int, states: int, sockid: bytes) -> bytes:
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, states) + sockid
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


def _dump(nl: socket.socket, family: int, states: int) -> list[_Sock]:
    empty_id = bytes(_SOCKID.size)
    nl.send(_request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, family, states,
                     empty_id))
    socks: list[_Sock] = []
    id_at, id_end = _MSG_HEAD.size, _MSG_HEAD.size + _SOCKID.size
    for _ in range(1_000_000):  # bounded: each read returns at least one message or raises
        data = nl.recv(1 << 16)
        for kind, _seq, payload in _messages(data):
            if kind == NLMSG_DONE:
                return socks
            if kind == NLMSG_ERROR:
                (err,) = _ERR.unpack_from(payload)
                raise OSError(-err, f"sock_diag dump: {os.strerror(-err)}")
            if len(payload) < id_end:
                continue
            sockid = payload[id_at:id_end]
            socks.append(_Sock(payload[0], _address(payload[0], sockid[4:20]), sockid))
    return socks


def _destroy(nl: socket.socket, socks: list[_Sock]) -> int:
    """``SOCK_DESTROY`` each (in batches, acked one by one); how many went."""
    destroyed = 0
    for start in range(0, len(socks), _BATCH):
        batch = socks[start:start + _BATCH]
        nl.send(b"".join(_request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, i, s.family, 0,
                                  s.sockid) for i, s in enumerate(batch)))
        pending = len(batch)
        while pending > 0:
            data = nl.recv(1 << 16)
            for kind, _seq, payload in _messages(data):
                if kind != NLMSG_ERROR:
                    continue
                pending -= 1
                (err,) = _ERR.unpack_from(payload)
                if err == 0:
                    destroyed += 1
                elif -err == errno.EOPNOTSUPP:
                    raise DestroyUnsupported(-err, "SOCK_DESTROY: " + os.strerror(-err))
                elif -err != errno.ENOENT:  # ENOENT: gone meanwhile (expired, or reused)
                    raise OSError(-err, "SOCK_DESTROY: " + os.strerror(-err))
    return destroyed
