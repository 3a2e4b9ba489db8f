"""UDP flows in a takeover: each flow's backend socket and client travel, so it keeps its endpoint.

A flow is a connected backend socket plus who it answers (client address, the
address replies leave from, the native path's packed key): the old process
stops reading the backend sockets, hands them over with that, and closes its
copies; the new one re-creates each flow on the listener that came over with
the same service port, scope and port, in the old LRU order with its idle time.
Replies that arrive in between wait in the socket's receive buffer. The old
process does not delete conntrack entries when it hands over: they are the new
one's now (a deleted entry would send a reply out untranslated).
"""

from __future__ import annotations

import socket
from typing import Any

from uproxy.model import Endpoint, ServicePortName
from uproxy.proxy.udp.flow import Flow
from uproxy.proxy.udp.listener import UdpListener
from uproxy.proxy.udp.proxy import UdpProxy
from uproxy.takeover import Item, pack_bytes, unpack_bytes


class UdpMover:
    """The UDP proxy's part of a takeover, on either side."""

    def __init__(self, proxy: UdpProxy) -> None:
        self.proxy = proxy

    def _reader(self, listener: UdpListener) -> Any:
        proxy = self.proxy
        if listener.batched and proxy.native_path is not None:
            return proxy.native_path.backend_batch
        return proxy.python_path.backend_readable

    # The old process --------------------------------------------------------------------
    def pause(self) -> None:
        for flow in self.proxy.flows:
            self.proxy.loop.remove_reader(flow.fd)

    def inventory(self, now: float) -> list[tuple[Item, list[socket.socket]]]:
        out: list[tuple[Item, list[socket.socket]]] = []
        for flow in self.proxy.flows:  # least recently used first
            listener, name = flow.listener, flow.listener.name
            meta = {"namespace": name.namespace, "name": name.name, "port_name": name.port,
                    "protocol": name.protocol, "scope": listener.scope, "port": listener.port,
                    "batched": listener.batched, "client": list(flow.client),
                    "family": listener.family,
                    # the native path's key: an int (IPv4) or 18 bytes (IPv6)
                    "key": flow.key if isinstance(flow.key, int) else None,
                    "key6": flow.key.hex() if isinstance(flow.key, bytes) else None,
                    "reply_to6": None if flow.reply_to6 is None else [
                        flow.reply_to6[0].hex(), flow.reply_to6[1],
                        None if flow.reply_to6[2] is None else flow.reply_to6[2].hex()],
                    "endpoint": list(flow.endpoint.address),
                    "reply_src": None if flow.reply_src is None else pack_bytes(flow.reply_src),
                    "reply_to": list(flow.reply_to), "up": flow.bytes_up,
                    "down": flow.bytes_down, "started": flow.conn.started,
                    "idle": max(0.0, now - flow.last)}
            out.append((Item("udp", meta), [flow.sock]))
        return out

    def resume(self) -> None:
        for flow in self.proxy.flows:
            self.proxy.loop.add_reader(flow.fd, self._reader(flow.listener), flow)

    def release(self) -> int:
        """Close our copies of the backend sockets (the new process holds them)."""
        flows = list(self.proxy.flows)
        for flow in flows:
            self.proxy.close_flow(flow, "handed over")
        return len(flows)

    # The new process --------------------------------------------------------------------
    def adopt(self, meta: dict[str, Any], sock: socket.socket, now: float) -> bool:
        """Re-create one flow on its listener; False (socket closed) when there is none."""
        proxy = self.proxy
        name = ServicePortName(meta["namespace"], meta["name"], meta["port_name"],
                               meta["protocol"])
        listener = next((lst for lst in proxy.listeners if lst.name == name
                         and lst.scope == meta["scope"] and lst.port == meta["port"]
                         and lst.family == int(meta.get("family", 4))), None)
        if listener is None or listener.batched != meta["batched"]:
            sock.close()  # its service port is gone, or the other path keys flows otherwise
            return False
        raw = meta["client"]  # as the old process's socket gave it (IPv6: four fields)
        client = (str(raw[0]), int(raw[1]))
        # The Python path keys flows by the whole address (IPv6: with flow info and scope)
        # and hands it on whole in the next takeover.
        full: Any = (*client, *(int(v) for v in raw[2:4]))
        key: object = full
        if listener.batched:
            key = bytes.fromhex(meta["key6"]) if meta.get("key6") else int(meta["key"])
        address = (str(meta["endpoint"][0]), int(meta["endpoint"][1]))
        entry = proxy.entries.get(name)
        endpoint = next((e for e in (entry.endpoints if entry else ()) if e.address == address),
                        Endpoint(*address))
        conn = proxy.conns.open(protocol="UDP", service=name, client=client,
                                scope=listener.scope)
        conn.started = float(meta["started"])
        reply_src = None if meta["reply_src"] is None else unpack_bytes(meta["reply_src"])
        flow = Flow(listener, key, full, endpoint, sock, conn, reply_src)
        ip, port, spec = meta["reply_to"]
        flow.reply_to = (int(ip), int(port), int(spec))
        if meta.get("reply_to6"):
            addr6, port6, spec6 = meta["reply_to6"]
            flow.reply_to6 = (bytes.fromhex(addr6), int(port6),
                              None if spec6 is None else bytes.fromhex(spec6))
        flow.bytes_up, flow.bytes_down = int(meta["up"]), int(meta["down"])
        listener.flows[key] = flow
        proxy.flows.add(flow, now)
        flow.last = now - float(meta["idle"])  # adopted oldest first: the LRU order holds
        proxy.conns.established(conn, address, flow)
        proxy.metrics.udp_flows_active.labels(str(name)).inc()
        proxy.loop.add_reader(flow.fd, self._reader(listener), flow)
        proxy.arm_sweeper()
        return True
