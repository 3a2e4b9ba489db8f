"""native/transparent.c against its reference, uproxy.transparent.transparent_source.

The engine decides per connection, in C, whether a backend connection goes from the
client's address. Three kinds of test:

* parity: the C answer and the Python answer over generated tables (hand-built node
  topologies crossed with every address of interest, and random topologies with a
  fixed seed), asserting the same answer for each case and that the table reaches
  every branch (so a parity test that compares two constant functions fails);
* named expectations, run on both implementations: written from the rules
  (transparent_source's docstring), not from either implementation, so an
  assumption both share wrongly is caught;
* the C interface itself: bytes in, IPv4-mapped handling with the family of the
  socket, refusals, prefixes masked, the dev lookup, and the Python caller
  (Transparent.source_for) with a family switched off.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from uproxy import native
from uproxy.model import Endpoint
from uproxy.transparent import NodeLinks, _address, transparent_source

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.REASON)

if native.AVAILABLE:
    from uproxy.proxy.native_links import NativeLinks
    from uproxy.proxy.transparent import Transparent

FLAGS = [(ext, loc, here) for ext in (False, True) for loc in (False, True)
         for here in (False, True)]

# --- topologies ------------------------------------------------------------------------

# The lab's node: the client ns on vc0, the pods on br0, the node network on eth0 (uplink).
LAB = NodeLinks(frozenset({"10.99.0.1", "172.17.0.1", "fd00:99::1", "fd00:17::1"}),
                (("10.99.0.0/24", "vc0"), ("172.17.0.0/24", "br0"),
                 ("fd00:99::/64", "vc0"), ("fd00:17::/64", "br0"),
                 ("192.168.1.0/24", "eth0"), ("2001:db8:1::/64", "eth0")),
                frozenset({"eth0"}))

# Nested and overlapping prefixes, both families: /8 on the uplink, narrower ones on
# bridges, per-pod host routes (Calico), a duplicate /24 on another device (the first
# one added wins, as the kernel's first route), prefixes not on a byte boundary, a
# prefix written with host bits set, an uplink with several prefixes.
NESTED = NodeLinks(
    frozenset({"10.0.0.1", "10.1.2.1", "fd00::1", "fd00:1:2:3::1",
               "fd00:0:0::9",  # not canonical: never matches in Python, so not in C
               "::ffff:10.1.2.9",  # mapped: Python compares IPv4 text, never matches
               "fe80::1%eth0",  # scoped: never matches either
               "10.1.2.10"}),
    (("10.0.0.0/8", "eth0"), ("10.1.0.0/16", "br0"), ("10.1.2.0/24", "br1"),
     ("10.1.2.0/24", "br2"), ("10.1.2.3/32", "cali0"), ("10.1.2.4/32", "cali1"),
     ("10.1.2.128/25", "br3"), ("10.1.2.192/26", "br1"), ("10.9.9.9/16", "br5"),
     ("100.64.0.0/10", "eth1"), ("100.64.0.0/12", "tun0"),
     ("fd00::/8", "eth0"), ("fd00:1::/32", "br0"), ("fd00:1:2::/48", "br1"),
     ("fd00:1:2:3::/64", "br2"), ("fd00:1:2:3::5/128", "cali0"),
     ("fd00:1:2:3:8000::/65", "br3"), ("fd00:1:2:3::/64", "br4"),
     ("::ffff:0:0/96", "map0"),  # mapped prefix: clients are IPv4 by then, never matches
     ("not a prefix", "br9")),
    frozenset({"eth0", "eth1"}))

# Everything on-link (an all-covering IPv6 route on a non-uplink), one IPv4 uplink.
WIDE = NodeLinks(frozenset({"192.0.2.1"}),
                 (("::/0", "wg0"), ("0.0.0.0/0", "eth0"), ("192.0.2.0/24", "eth0"),
                  ("198.51.100.0/24", "br0")),
                 frozenset({"eth0"}))

EMPTY = NodeLinks()

TOPOLOGIES = {"lab": LAB, "nested": NESTED, "wide": WIDE, "empty": EMPTY}

SPECIAL = ["127.0.0.1", "127.0.0.0", "127.9.8.0", "127.255.255.254", "0.0.0.0", "224.0.0.1",
           "239.255.255.255", "223.255.255.255", "240.0.0.1", "255.255.255.255", "169.254.1.1",
           "8.8.8.8",
           "::1", "::", "ff02::1", "ff05::1:3", "fe80::1", "::2", "2001:db8:ffff::1",
           "::7f00:1",  # IPv4-compatible, not mapped: an IPv6 address, not loopback
           "::ffff:127.0.0.1", "::ffff:0.0.0.0", "::ffff:224.0.0.5", "::ffff:8.8.8.8"]


def addresses_of(links: NodeLinks) -> list[str]:
    """Addresses of interest on ``links``: every local, and inside each prefix its first,
    second, a middle and its last address; plus the mapped forms of IPv4 ones."""
    out = set(SPECIAL)
    for text in links.local:
        ip = _address(text)
        if ip is not None:
            out.add(str(ip))
    for prefix, _ in links.on_link:
        try:
            net = ipaddress.ip_network(prefix, strict=False)
        except ValueError:
            continue
        size = net.num_addresses
        for i in {0, 1 % size, size // 2, size - 1}:
            out.add(str(net.network_address + i))
    mapped = [f"::ffff:{a}" for a in sorted(out) if "." in a and ":" not in a]
    return sorted(out) + mapped[::3]


# --- the two implementations ----------------------------------------------------------


def py_source(links: NodeLinks, _native: Any, client: str, endpoint: str, ext: bool,
              loc: bool, here: bool) -> str | None:
    return transparent_source(client, endpoint, external=ext, external_local=loc, links=links,
                              endpoint_here=here)


def c_source(_links: NodeLinks, built: Any, client: str, endpoint: str, ext: bool, loc: bool,
             here: bool) -> str | None:
    got: str | None = built.source(client, endpoint, external=ext, external_local=loc,
                                   endpoint_here=here)
    return got


def compare(links: NodeLinks, cases: Iterator[tuple[str, str, bool, bool, bool]]) -> Counter[str]:
    """Both answers for every case; asserts they agree; counts the outcomes."""
    built = NativeLinks(links)
    seen: Counter[str] = Counter()
    for client, endpoint, ext, loc, here in cases:
        want = py_source(links, None, client, endpoint, ext, loc, here)
        got = c_source(links, built, client, endpoint, ext, loc, here)
        assert got == want, (client, endpoint, f"external={ext} external_local={loc} "
                             f"endpoint_here={here}", links)
        seen["client" if want is not None else "node"] += 1
        seen[reason(links, client, endpoint, ext, loc, here)] += 1
    return seen


def reason(links: NodeLinks, client_text: str, endpoint_text: str, ext: bool, loc: bool,
           here: bool) -> str:
    """Which rule decided (for coverage of the table, not for the answer)."""
    client, endpoint = _address(client_text), _address(endpoint_text)
    assert client is not None and endpoint is not None
    if client.version != endpoint.version:
        return "families differ"
    if ext and not loc:
        return "external, policy Cluster"
    if client == endpoint:
        return "hairpin"
    if client.is_loopback or client.is_unspecified or client.is_multicast:
        return "special client"
    if str(client) in links.local:
        return "local client"
    if endpoint.is_loopback or str(endpoint) in links.local:
        return "local endpoint"
    cdev, edev = links.interface_of(client), links.interface_of(endpoint)
    if here and edev is None:
        return "endpoint link unknown"
    if cdev is not None and cdev == edev:
        return "same link"
    if not here and cdev is None:
        return "remote endpoint, routed client"
    if not here and cdev in links.default_devs:
        return "remote endpoint, uplink client"
    return "transparent"


ALL_REASONS = {"families differ", "external, policy Cluster", "hairpin", "special client",
               "local client", "local endpoint", "endpoint link unknown", "same link",
               "remote endpoint, routed client", "remote endpoint, uplink client",
               "transparent"}


# --- parity -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_parity_on_hand_built_topologies(name: str) -> None:
    links = TOPOLOGIES[name]
    pool = addresses_of(links)
    rng = random.Random(f"pairs-{name}")
    # Every flag combination for pairs drawn from the pool (all pairs is ~10^4 per
    # topology: a fixed-seed sample of them plus every address against itself).
    pairs = [(a, a) for a in pool]
    pairs += [(rng.choice(pool), rng.choice(pool)) for _ in range(600)]
    seen = compare(links, ((c, e, *flags) for c, e in pairs for flags in FLAGS))
    assert seen["client"] + seen["node"] >= 1000
    if links is not EMPTY:
        assert seen["client"] >= 30 and seen["node"] >= 30, seen
    else:
        assert seen["client"] == 0  # no links: never transparent


def test_parity_table_reaches_every_rule() -> None:
    """Across the hand-built topologies every rule decides some case: the parity above
    compares the two implementations on every branch, not on one."""
    total: Counter[str] = Counter()
    for name, links in TOPOLOGIES.items():
        pool = addresses_of(links)
        rng = random.Random(f"reasons-{name}")
        pairs = [(rng.choice(pool), rng.choice(pool)) for _ in range(300)]
        total += compare(links, ((c, e, *flags) for c, e in pairs for flags in FLAGS))
    missing = ALL_REASONS - set(total)
    assert not missing, (missing, total)


def random_links(rng: random.Random) -> NodeLinks:
    """A node with overlapping prefixes in a small space (so they nest and collide),
    both families, a few devices of which some are uplinks, a few local addresses."""
    devs = [f"d{i}" for i in range(rng.randint(1, 5))]
    on_link = []
    for _ in range(rng.randint(0, 12)):
        if rng.random() < 0.5:
            length = rng.choice([8, 12, 16, 20, 23, 24, 25, 27, 30, 31, 32])
            addr = ipaddress.IPv4Address(0x0A000000 | rng.getrandbits(12) << rng.choice([0, 4, 8]))
            on_link.append((f"{addr}/{length}", rng.choice(devs)))
        else:
            length = rng.choice([8, 32, 48, 63, 64, 65, 96, 120, 127, 128])
            addr = ipaddress.IPv6Address((0xFD00 << 112) | rng.getrandbits(16) << rng.choice(
                [0, 8, 56, 64]))
            on_link.append((f"{addr}/{length}", rng.choice(devs)))
    local = {str(ipaddress.IPv4Address(0x0A000000 | rng.getrandbits(12)))
             for _ in range(rng.randint(0, 3))}
    local |= {str(ipaddress.IPv6Address((0xFD00 << 112) | rng.getrandbits(16)))
              for _ in range(rng.randint(0, 2))}
    uplinks = frozenset(d for d in devs if rng.random() < 0.3)
    return NodeLinks(frozenset(local), tuple(on_link), uplinks)


def _network(prefix: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(prefix, strict=False)
    except ValueError:
        return None


def random_address(rng: random.Random, links: NodeLinks) -> str:
    roll = rng.random()
    nets = [n for n in (_network(p) for p, _ in links.on_link) if n is not None]
    if roll < 0.45 and nets:  # inside a prefix (often several, nested)
        net = rng.choice(nets)
        bits = net.max_prefixlen - net.prefixlen
        text = str(net.network_address + rng.getrandbits(min(bits, 16)) if bits else
                   net.network_address)
    elif roll < 0.55 and links.local:
        text = rng.choice(sorted(links.local))
    elif roll < 0.65:
        text = rng.choice(SPECIAL)
    elif roll < 0.85:
        text = str(ipaddress.IPv4Address(0x0A000000 | rng.getrandbits(12)))
    else:
        text = str(ipaddress.IPv6Address((0xFD00 << 112) | rng.getrandbits(16)))
    if "." in text and ":" not in text and rng.random() < 0.15:
        text = f"::ffff:{text}"  # a v4 client seen on a dual-stack socket
    return text


def test_parity_on_random_topologies() -> None:
    rng = random.Random(20261201)
    seen: Counter[str] = Counter()
    for _ in range(150):
        links = random_links(rng)
        cases = []
        for _ in range(40):
            client = random_address(rng, links)
            endpoint = client if rng.random() < 0.05 else random_address(rng, links)
            cases.append((client, endpoint, *rng.choice(FLAGS)))
        seen += compare(links, iter(cases))
    assert seen["client"] >= 300 and seen["node"] >= 300, seen
    assert {"same link", "transparent", "remote endpoint, uplink client",
            "endpoint link unknown", "hairpin", "local client"} <= set(seen), seen


def test_interface_lookup_matches_nodelinks() -> None:
    """uproxy_links_dev_of is NodeLinks.interface_of (longest prefix, first added among
    equal lengths), mapped addresses looked up as IPv4."""
    rng = random.Random(7)
    checked = 0
    for links in [*TOPOLOGIES.values(), *(random_links(rng) for _ in range(100))]:
        built = NativeLinks(links)
        pool = addresses_of(links) + [random_address(rng, links) for _ in range(30)]
        for text in pool:
            ip = _address(text)
            assert ip is not None
            assert built.interface_of(text) == links.interface_of(ip), (text, links)
            checked += 1
    assert checked > 3000


# --- named expectations, both implementations -------------------------------------------


@pytest.fixture(params=["python", "native"])
def source(request: pytest.FixtureRequest) -> Any:
    fn = py_source if request.param == "python" else c_source
    built: dict[int, Any] = {}

    def ask(client: str, endpoint: str, *, links: NodeLinks = LAB, external: bool = False,
            local: bool = False, here: bool = True) -> str | None:
        key = id(links)
        if key not in built:
            built[key] = NativeLinks(links) if request.param == "native" else None
        return fn(links, built[key], client, endpoint, external, local, here)

    return ask


CLIENT, POD1, POD2, REMOTE_POD = "10.99.0.2", "172.17.0.2", "172.17.0.3", "10.244.7.9"


def test_named_cluster_ip_from_a_routed_client_keeps_its_address(source: Any) -> None:
    assert source(CLIENT, POD1) == CLIENT
    assert source(REMOTE_POD, POD1) == REMOTE_POD
    assert source(POD1, REMOTE_POD, here=False) == POD1
    assert source("fd00:99::2", "fd00:17::3") == "fd00:99::2"


def test_named_remote_endpoints_keep_it_only_for_this_nodes_pods(source: Any) -> None:
    assert source(CLIENT, REMOTE_POD, here=False) == CLIENT  # on-link on vc0, not an uplink
    assert source("10.50.0.9", REMOTE_POD, here=False) is None  # behind a router
    assert source("192.168.1.50", REMOTE_POD, here=False) is None  # on the uplink
    assert source("2001:db8:1::50", "fd00:5::9", here=False) is None  # on the uplink, IPv6
    assert source("192.168.1.50", POD1) == "192.168.1.50"  # the endpoint here: fine


def test_named_external_traffic_only_under_local_policy(source: Any) -> None:
    assert source(CLIENT, POD1, external=True, local=True) == CLIENT
    assert source(CLIENT, POD1, external=True) is None
    assert source(CLIENT, POD1, local=True) == CLIENT  # cluster traffic: policy irrelevant


def test_named_node_and_special_clients_go_from_the_node(source: Any) -> None:
    for client in ("10.99.0.1", "172.17.0.1", "127.0.0.1", "127.200.0.1", "0.0.0.0",
                   "224.0.0.1", "239.1.2.3", "::ffff:127.0.0.1", "::ffff:10.99.0.1"):
        assert source(client, POD1) is None, client
    for client in ("::1", "::", "ff02::1", "ff0e::5", "fd00:99::1"):
        assert source(client, "fd00:17::2") is None, client
    # near misses: not loopback, not multicast, not the node's
    assert source("128.0.0.1", POD1) == "128.0.0.1"
    assert source("223.255.255.255", POD1) == "223.255.255.255"
    assert source("240.0.0.1", POD1) == "240.0.0.1"  # reserved, not multicast
    assert source("::2", "fd00:17::2") == "::2"
    assert source("::7f00:1", "fd00:17::2") == "::7f00:1"  # IPv4-compatible is not loopback
    assert source("fe00::1", "fd00:17::2") == "fe00::1"


def test_named_hairpin_local_and_unknown_endpoints_go_from_the_node(source: Any) -> None:
    assert source(POD1, POD1) is None
    assert source("fd00:17::2", "fd00:17::2") is None
    assert source("::ffff:172.17.0.2", POD1) is None  # the same address, mapped
    assert source(CLIENT, "172.17.0.1") is None  # host-network endpoint
    assert source(CLIENT, "127.0.0.1") is None
    assert source("fd00:99::2", "::1") is None
    assert source(CLIENT, "10.244.9.9") is None  # said to be here, no on-link route
    assert source(CLIENT, "10.244.9.9", here=False) == CLIENT


def test_named_same_link_goes_from_the_node(source: Any) -> None:
    assert source(POD1, POD2) is None
    assert source("fd00:17::2", "fd00:17::3") is None
    calico = NodeLinks(frozenset(), (("10.244.1.5", "caliA"), ("10.244.1.6", "caliB")))
    assert source("10.244.1.5", "10.244.1.6", links=calico) == "10.244.1.5"


def test_named_longest_prefix_and_first_of_equal_ones_decide(source: Any) -> None:
    links = NodeLinks(frozenset(), (("10.0.0.0/8", "eth0"), ("10.1.0.0/16", "br0"),
                                    ("10.1.2.0/24", "brA"), ("10.1.2.0/24", "brB"),
                                    ("10.1.3.0/25", "brC"), ("10.1.3.128/25", "brD")))
    assert source("10.1.0.2", "10.1.0.3", links=links) is None  # both br0
    assert source("10.2.0.2", "10.1.0.3", links=links) == "10.2.0.2"  # eth0 vs br0
    assert source("10.1.2.9", "10.1.2.7", links=links) is None  # both brA (first /24)
    assert source("10.1.0.9", "10.1.2.7", links=links) == "10.1.0.9"  # br0 vs brA
    assert source("10.1.3.1", "10.1.3.200", links=links) == "10.1.3.1"  # brC vs brD
    assert source("10.1.3.127", "10.1.3.1", links=links) is None  # both brC


def test_named_mapped_clients_count_as_ipv4(source: Any) -> None:
    assert source("::ffff:10.99.0.2", POD1) == CLIENT
    assert source(CLIENT, "::ffff:172.17.0.2") == CLIENT
    assert source("::ffff:10.99.0.2", "fd00:17::2") is None  # the families differ
    assert source("fd00:99::2", POD1) is None
    assert source("::ffff:172.17.0.3", POD1) is None  # same bridge, mapped
    assert source("not an address", POD1) is None


# --- the C interface itself -------------------------------------------------------------


def lib() -> Any:
    return native.lib()


def b(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def test_c_mapped_client_with_the_sockets_family() -> None:
    """A dual-stack listener's client comes as family 6 ::ffff:a.b.c.d: asked with the
    endpoint mapped too (or the client's last four bytes with family 4), it is IPv4."""
    built = NativeLinks(LAB)
    ask = lib().uproxy_transparent_source
    mapped_client, mapped_pod = b("::ffff:10.99.0.2"), b("::ffff:172.17.0.2")
    assert ask(built.ptr, 6, mapped_client, mapped_pod, 0, 0, 1) == 1
    assert ask(built.ptr, 4, mapped_client[12:], b(POD1), 0, 0, 1) == 1
    assert ask(built.ptr, 6, mapped_client, b("fd00:17::2"), 0, 0, 1) == 0  # families differ
    assert ask(built.ptr, 6, b("::ffff:172.17.0.3"), mapped_pod, 0, 0, 1) == 0  # same bridge
    assert ask(built.ptr, 6, b("::ffff:127.0.0.1"), mapped_pod, 0, 0, 1) == 0  # loopback
    assert ask(built.ptr, 6, b("fd00:99::2"), b("fd00:17::2"), 0, 0, 1) == 1
    assert ask(built.ptr, 6, b("fd00:99::2"), b("fd00:17::2"), 1, 0, 1) == 0
    assert ask(built.ptr, 6, b("fd00:99::2"), b("fd00:17::2"), 1, 1, 1) == 1


def test_c_refuses_bad_input_and_answers_no_for_it() -> None:
    ffi, c = native.ffi(), lib()
    links = ffi.gc(c.uproxy_links_new(), c.uproxy_links_free)
    assert c.uproxy_links_add_local(links, 5, b(CLIENT)) < 0
    assert c.uproxy_links_add_onlink(links, 4, b("10.0.0.0"), 33, 0, 0) < 0
    assert c.uproxy_links_add_onlink(links, 6, b("fd00::"), 129, 0, 0) < 0
    assert c.uproxy_links_add_onlink(links, 4, b("10.0.0.0"), -1, 0, 0) < 0
    assert c.uproxy_links_add_onlink(links, 4, b("10.0.0.0"), 8, -1, 0) < 0
    assert c.uproxy_links_add_onlink(links, 3, b("10.0.0.0"), 8, 0, 0) < 0
    assert c.uproxy_links_add_onlink(links, 4, b("10.0.0.0"), 8, 0, 0) == 0
    assert c.uproxy_links_add_onlink(links, 4, b("10.1.0.0"), 16, 1, 0) == 0
    assert c.uproxy_transparent_source(links, 4, b("10.2.0.1"), b("10.1.0.1"), 0, 0, 1) == 1
    assert c.uproxy_transparent_source(links, 5, b("10.2.0.1"), b("10.1.0.1"), 0, 0, 1) == 0
    assert c.uproxy_transparent_source(ffi.NULL, 4, b("10.2.0.1"), b("10.1.0.1"), 0, 0, 1) == 0
    assert c.uproxy_links_dev_of(ffi.NULL, 4, b("10.2.0.1")) == -1
    assert c.uproxy_links_dev_of(links, 7, b("10.2.0.1")) == -1


def test_c_masks_host_bits_and_handles_odd_lengths() -> None:
    ffi, c = native.ffi(), lib()
    links = ffi.gc(c.uproxy_links_new(), c.uproxy_links_free)
    assert c.uproxy_links_add_onlink(links, 4, b("10.1.2.3"), 16, 3, 0) == 0  # 10.1.0.0/16
    assert c.uproxy_links_add_onlink(links, 4, b("10.1.2.3"), 0, 9, 0) == 0  # 0.0.0.0/0
    assert c.uproxy_links_add_onlink(links, 6, b("fd00:1:2:3:ffff::"), 65, 4, 0) == 0
    assert c.uproxy_links_add_onlink(links, 4, b("192.168.7.77"), 31, 5, 0) == 0
    assert c.uproxy_links_dev_of(links, 4, b("10.1.200.1")) == 3
    assert c.uproxy_links_dev_of(links, 4, b("11.0.0.1")) == 9
    assert c.uproxy_links_dev_of(links, 6, b("fd00:1:2:3:8000::1")) == 4
    assert c.uproxy_links_dev_of(links, 6, b("fd00:1:2:3:7fff::1")) == -1
    assert c.uproxy_links_dev_of(links, 4, b("192.168.7.76")) == 5
    assert c.uproxy_links_dev_of(links, 4, b("192.168.7.78")) == 9
    assert c.uproxy_links_dev_of(links, 6, b("::ffff:10.1.0.1")) == 3  # looked up as IPv4


def test_c_local_set_grows_and_finds_every_address() -> None:
    """An IPVS-mode node holds every ClusterIP as a local address: thousands of them."""
    ffi, c = native.ffi(), lib()
    links = ffi.gc(c.uproxy_links_new(), c.uproxy_links_free)
    assert c.uproxy_links_add_onlink(links, 4, b("10.0.0.0"), 8, 0, 0) == 0
    assert c.uproxy_links_add_onlink(links, 4, b("172.16.0.0"), 12, 1, 0) == 0
    services = [ipaddress.IPv4Address("10.96.0.0") + i * 7 for i in range(5000)]
    for ip in services:
        assert c.uproxy_links_add_local(links, 4, ip.packed) == 0
    assert c.uproxy_links_add_local(links, 4, services[0].packed) == 0  # twice: harmless
    pod = b("172.16.0.5")
    for ip in services:
        assert c.uproxy_transparent_source(links, 4, ip.packed, pod, 0, 0, 1) == 0
        neighbour = (ip + 1).packed
        assert c.uproxy_transparent_source(links, 4, neighbour, pod, 0, 0, 1) == 1


def test_detached_links_are_the_callers_to_free() -> None:
    built = NativeLinks(LAB)
    ptr = built.detach()
    del built
    assert lib().uproxy_links_dev_of(ptr, 4, b(POD1)) >= 0  # still alive
    lib().uproxy_links_free(ptr)


async def ask_both(proxy: Any, built: Any, cases: list[tuple[str, str, bool, bool, bool]]
                   ) -> int:
    """Each case of both callers (inside a loop: source_for may schedule a links read);
    asserts they agree; returns how many went from the client's address."""
    transparent_answers = 0
    for client, endpoint_ip, ext, loc, here in cases:
        endpoint = Endpoint(endpoint_ip, 80, node_name="node-a" if here else "node-b")
        want = proxy.source_for(client, endpoint, external=ext, external_local=loc)
        got = built.source(client, endpoint_ip, external=ext, external_local=loc,
                           endpoint_here=here)
        assert got == want, (proxy.families, client, endpoint_ip, ext, loc, here)
        transparent_answers += want is not None
    return transparent_answers


def test_source_for_with_a_family_switched_off_matches_the_python_caller() -> None:
    """Transparent.source_for (the Python caller) answers None for a family whose mode
    is off; NativeLinks built with the families on leaves that family's routes out, so
    the C answer is None there too."""
    rng = random.Random(11)
    pool = addresses_of(LAB)
    # EndpointSlice addresses are never IPv4-mapped (source_for takes the family from
    # the endpoint's text, so a mapped one would count as IPv6 there).
    endpoints = [a for a in pool if not a.startswith("::ffff:")]
    for families in ({4}, {6}, {4, 6}, set()):
        proxy = Transparent(node_name="node-a")
        proxy.families = set(families)
        proxy.links = LAB
        proxy._links_wait = math.inf  # never start a links read from this test
        cases = [(rng.choice(pool), rng.choice(endpoints), *rng.choice(FLAGS))
                 for _ in range(400)]
        answered = asyncio.run(ask_both(proxy, NativeLinks(LAB, families), cases))
        assert (answered > 0) == bool(families), families
