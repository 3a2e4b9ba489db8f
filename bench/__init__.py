"""The side-by-side benchmark behind ``make bench``: uproxy against kernel DNAT, nginx and HAProxy.

Split so the pure part (:mod:`bench.parse`: tool output -> numbers -> tables)
is unit-tested on its own, apart from the parts that need root and a
namespace lab (:mod:`bench.peers`, :mod:`bench.run`) and the clients that run
inside the lab (:mod:`bench.hold`, :mod:`bench.changes`).
"""
