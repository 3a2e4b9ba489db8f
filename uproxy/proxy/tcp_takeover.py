"""Established TCP connections in a takeover: pause, describe, release; adopt on the other side.

A relayed connection is two sockets plus what its relay holds: the byte
counters, bytes read from one side and not yet written to the other, and
which EOFs were seen. All of it travels (:class:`uproxy.proxy.relay.RelayState`),
so the new process carries on where the old one stopped: no byte lost or
repeated, half-closed connections stay half-closed, and the status page shows
the connection's original age and byte counts.

Both relay paths' handles can be paused (:class:`~uproxy.proxy.relay.MovableHandle`):
the Python twin just stops its callbacks; the native engine, asked on its own
thread, stops watching the connection and hands back its fds and the bytes its
copy buffer or pipe held (``uproxy_engine_detach``). Adopted connections run
on the new process's own relay: the native engine takes a connection with its
state (``uproxy_engine_add_state``: counters to count on from, the pending
bytes delivered first, the SHUT_WR an EOF already read owes), the Python twin
likewise (``UPROXY_NO_NATIVE``). A native connection whose takeover fails goes
back onto the old process's engine the same way (onto a Python twin only if the
engine refuses it, out of memory).
"""

from __future__ import annotations

import socket
from typing import Any

from uproxy.connections import Conn
from uproxy.model import ServicePortName
from uproxy.proxy.pyrelay import PyRelay
from uproxy.proxy.relay import AdoptingRelay, MovableHandle, RelayResult, RelayState
from uproxy.proxy.tcp import TcpProxy
from uproxy.takeover import Item, pack_bytes, unpack_bytes


class TcpMover:
    """The TCP proxy's part of a takeover, on either side."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self._paused: list[tuple[Conn, MovableHandle]] = []

    # The old process --------------------------------------------------------------------
    def pause(self) -> None:
        self._paused = []
        self.proxy.relay.catch_up()  # (the engine's held set-ups become live connections)
        # (a list: pausing a native connection runs completions, which remove ended ones)
        live = list(self.proxy.live.values())
        for _, handle in live:
            request = getattr(handle, "request_pause", None)  # the engine's: ask all at once
            if request is not None:
                request()
        for conn, handle in live:
            if isinstance(handle, MovableHandle) and handle.pause():
                self._paused.append((conn, handle))

    def inventory(self) -> list[tuple[Item, list[socket.socket]]]:
        out: list[tuple[Item, list[socket.socket]]] = []
        for conn, handle in self._paused:
            state, name = handle.state(), conn.service
            meta = {"namespace": name.namespace, "name": name.name, "port_name": name.port,
                    "protocol": name.protocol, "client": list(conn.client), "scope": conn.scope,
                    "started": conn.started, "backend": list(conn.backend or ("", 0)),
                    "up": state.up, "down": state.down,
                    "pending_up": pack_bytes(state.pending_up),
                    "pending_down": pack_bytes(state.pending_down),
                    "eof_up": state.eof_up, "eof_down": state.eof_down}
            out.append((Item("tcp", meta, fds=2), list(handle.sockets())))
        return out

    def resume(self) -> None:
        for _, handle in self._paused:
            handle.resume()
        self._paused = []

    def release(self) -> int:
        for _, handle in self._paused:
            handle.release()
        count, self._paused = len(self._paused), []
        return count

    # The new process --------------------------------------------------------------------
    def adopt(self, meta: dict[str, Any], client: socket.socket, backend: socket.socket) -> Conn:
        """Relay a connection that came over, from exactly where the old process paused it."""
        proxy = self.proxy
        name = ServicePortName(meta["namespace"], meta["name"], meta["port_name"],
                               meta["protocol"])
        state = RelayState(int(meta["up"]), int(meta["down"]),
                           unpack_bytes(meta["pending_up"]), unpack_bytes(meta["pending_down"]),
                           bool(meta["eof_up"]), bool(meta["eof_down"]))
        conn = proxy.conns.open(protocol="TCP", service=name,
                                client=(meta["client"][0], int(meta["client"][1])),
                                scope=meta["scope"])
        conn.started = float(meta["started"])  # its age counts from the first accept
        active = proxy.metrics.connections_active.labels(str(name), "TCP")
        up = proxy.metrics.bytes_total.labels(str(name), "up")
        down = proxy.metrics.bytes_total.labels(str(name), "down")
        active.inc()

        def done(result: RelayResult) -> None:
            active.dec()
            up.inc(max(0, result.bytes_up - state.up))  # this process's share
            down.inc(max(0, result.bytes_down - state.down))
            proxy.conns.close(conn, bytes_up=result.bytes_up, bytes_down=result.bytes_down,
                              error=result.error)
            proxy.closed_one()  # (a transparent one may leave a TIME_WAIT socket)

        relay: AdoptingRelay  # the proxy's own: the native engine when it is active
        if isinstance(proxy.relay, AdoptingRelay):
            relay = proxy.relay
        elif isinstance(proxy.adopted_relay, AdoptingRelay):
            relay = proxy.adopted_relay
        else:  # a relay that cannot adopt: a Python twin beside it
            twin = PyRelay(proxy.loop)
            relay = proxy.adopted_relay = twin
        handle = relay.adopt(client, backend, state, done)
        if conn.state != "closed":
            proxy.conns.established(conn, (meta["backend"][0], int(meta["backend"][1])), handle)
        return conn
