"""UDP: flows from clients to endpoints, relayed datagram by datagram.

A *flow* is (listener, client address): the first datagram from a client on a
proxy or NodePort socket chooses an endpoint and opens a connected backend
socket to it; later datagrams of the flow go through that socket, and whatever
the endpoint sends back leaves from the socket (and the address) the request
arrived on. One concept per module:

* :mod:`.proxy` -- :class:`UdpProxy`: the wiring, each flow's life, entries;
* :mod:`.listener` -- a bound socket for one service port in one scope;
* :mod:`.flow` -- one flow and its reply address (``IP_PKTINFO``);
* :mod:`.python_path` and :mod:`.native_path` -- the two twins that move the
  bytes (the socket module, one call per datagram; ``recvmmsg``/``sendmmsg``
  batches in C). Both behave the same and the tests run on both: per-datagram
  drop accounting, the retry of a refused datagram on a new flow, replies from
  the arrival address (``IP_PKTINFO`` / ``IPV6_PKTINFO``), in both families;
* :mod:`.conntrack_cleanup` -- when stale conntrack entries are deleted;

and, in the pure core, :mod:`uproxy.flowtable` (the LRU: expiry and eviction),
:mod:`uproxy.flowsetup` (the new-flow and refused-flow decisions) and
:mod:`uproxy.balance` (which endpoints may serve). With no usable endpoint a
datagram is dropped and counted (there is no UDP equivalent of a RST worth
sending).
"""

from uproxy.flowtable import FlowLru
from uproxy.proxy.udp.flow import IP_PKTINFO, Flow
from uproxy.proxy.udp.listener import UdpListener
from uproxy.proxy.udp.proxy import DEFAULT_MAX_FLOWS, UdpProxy, default_max_flows

__all__ = ["DEFAULT_MAX_FLOWS", "IP_PKTINFO", "Flow", "FlowLru", "UdpListener", "UdpProxy",
           "default_max_flows"]
