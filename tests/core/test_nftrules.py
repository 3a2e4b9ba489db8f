"""Rendering ``nft -f`` text (uproxy.nftrules): golden tables, deltas, cleanup, render -> parse.

The element comments copy kube-proxy's (``namespace/name:port kind``), like
:mod:`tests.core.test_rules` does for the iptables chain. When the ``nft``
binary is present, the rendered text is also checked by ``nft --check``
(parsing and evaluation in user space, nothing sent to the kernel).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uproxy import nftrules
from uproxy.model import ServicePortName
from uproxy.nftrules import (
    COMMENT_MAX,
    elements,
    parse_elements,
    render,
    render_changes,
    render_cleanup,
    uproxy_tables,
)
from uproxy.rules import KIND_CLUSTER, KIND_EXTERNAL, KIND_LOADBALANCER, Redirect, safe_comment

PORT1 = ServicePortName("default", "multi-port", "port1", "TCP")
PORT2 = ServicePortName("default", "multi-port", "port2", "TCP")
SIMPLE = ServicePortName("namingthings", "simpleservice", "", "TCP")
DNS = ServicePortName("kube-system", "kube-dns", "dns", "UDP")


def seed_redirects() -> list[Redirect]:
    return [
        Redirect(PORT2, KIND_CLUSTER, "10.0.0.180", 9876, "TCP", 40001),
        Redirect(PORT1, KIND_CLUSTER, "10.0.0.180", 6789, "TCP", 40000),
        Redirect(DNS, KIND_CLUSTER, "10.0.0.10", 53, "UDP", 40004),
        Redirect(SIMPLE, KIND_CLUSTER, "172.30.40.155", 80, "TCP", 40002),
        Redirect(SIMPLE, KIND_EXTERNAL, "192.0.2.10", 80, "TCP", 40003),
        Redirect(SIMPLE, KIND_LOADBALANCER, "198.51.100.7", 80, "TCP", 40003),
        Redirect(SIMPLE, KIND_CLUSTER, "fd00:10::9c", 80, "TCP", 40005),
        Redirect(DNS, KIND_CLUSTER, "fd00:10::a", 53, "UDP", 40006),
    ]


GOLDEN_V4 = """\
table ip uproxy
delete table ip uproxy
table ip uproxy {
\tmap services {
\t\ttype ipv4_addr . inet_proto . inet_service : inet_service
\t\telements = { 10.0.0.180 . tcp . 6789 comment "default/multi-port:port1 cluster IP" : 40000,
\t\t\t     10.0.0.180 . tcp . 9876 comment "default/multi-port:port2 cluster IP" : 40001,
\t\t\t     10.0.0.10 . udp . 53 comment "kube-system/kube-dns:dns cluster IP" : 40004,
\t\t\t     172.30.40.155 . tcp . 80 comment "namingthings/simpleservice: cluster IP" : 40002,
\t\t\t     192.0.2.10 . tcp . 80 comment "namingthings/simpleservice: external IP" : 40003,
\t\t\t     198.51.100.7 . tcp . 80 comment "namingthings/simpleservice: loadbalancer IP" : 40003 }
\t}
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat - 1; policy accept;
\t\tmeta l4proto { tcp, udp, sctp } redirect to : ip daddr . meta l4proto . th dport \
map @services comment "uproxy service portals"
\t}
\tchain output {
\t\ttype nat hook output priority -101; policy accept;
\t\tmeta l4proto { tcp, udp, sctp } redirect to : ip daddr . meta l4proto . th dport \
map @services comment "uproxy service portals"
\t}
}
"""

GOLDEN_V6 = """\
table ip6 uproxy
delete table ip6 uproxy
table ip6 uproxy {
\tmap services {
\t\ttype ipv6_addr . inet_proto . inet_service : inet_service
\t\telements = { fd00:10::a . udp . 53 comment "kube-system/kube-dns:dns cluster IP" : 40006,
\t\t\t     fd00:10::9c . tcp . 80 comment "namingthings/simpleservice: cluster IP" : 40005 }
\t}
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat - 1; policy accept;
\t\tmeta l4proto { tcp, udp, sctp } redirect to : ip6 daddr . meta l4proto . th dport \
map @services comment "uproxy service portals"
\t}
\tchain output {
\t\ttype nat hook output priority -101; policy accept;
\t\tmeta l4proto { tcp, udp, sctp } redirect to : ip6 daddr . meta l4proto . th dport \
map @services comment "uproxy service portals"
\t}
}
"""


def nft_check(text: str) -> None:
    """``nft --check -f -``: nft parses and evaluates the text without touching the kernel's rules.

    Needs root (nft opens a netlink socket even to check); skipped without nft or root.
    """
    nft = shutil.which("nft")
    if nft is None:
        pytest.skip("nft not installed")
    proc = subprocess.run([nft, "--check", "-f", "-"], input=text, capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip("nft --check needs root")
    assert proc.returncode == 0, proc.stderr


def test_render_golden_ipv4() -> None:
    assert render(seed_redirects(), family=4) == GOLDEN_V4


def test_render_golden_ipv6() -> None:
    assert render(seed_redirects(), family=6) == GOLDEN_V6


def test_rendered_text_is_accepted_by_nft() -> None:
    nft_check(GOLDEN_V4 + GOLDEN_V6)


def test_render_empty_table_keeps_map_and_hooks() -> None:
    text = render([], family=4)
    assert "elements" not in text
    assert "type ipv4_addr . inet_proto . inet_service : inet_service" in text
    assert text.count("redirect to : ip daddr . meta l4proto . th dport map @services") == 2
    assert parse_elements(text) == []
    nft_check(text)


def test_render_replaces_the_table_in_one_file() -> None:
    """Create-if-missing, delete, then the full table: one transaction, works with or without it."""
    lines = render(seed_redirects(), family=4).splitlines()
    assert lines[:3] == ["table ip uproxy", "delete table ip uproxy", "table ip uproxy {"]
    assert "flush ruleset" not in "\n".join(lines)


def test_render_order_is_stable() -> None:
    redirects = seed_redirects()
    expected = render(redirects, family=4)
    rng = random.Random(16)
    for _ in range(20):
        shuffled = redirects[:]
        rng.shuffle(shuffled)
        assert render(shuffled, family=4) == expected


def test_render_comments_are_sanitised_and_fit_nft() -> None:
    evil = ServicePortName('ns"; flush ruleset; #', "x{}" + "y" * 300, "p\nq", "TCP")
    text = render([Redirect(evil, KIND_CLUSTER, "10.0.0.1", 80, "TCP", 40000)], family=4)
    ((comment, *_),) = parse_elements(text)
    assert comment == safe_comment(f"{evil} {KIND_CLUSTER}")[:COMMENT_MAX]
    assert len(comment) == COMMENT_MAX
    assert '"' not in comment and "{" not in comment and ";" not in comment
    assert "flush ruleset" not in text.replace("flush ruleset_", "")
    nft_check(text)


def test_render_duplicate_key_keeps_the_first_in_rule_order() -> None:
    """An externalIP equal to another Service's ClusterIP: a map key can exist once."""
    other = ServicePortName("default", "aaa", "http", "TCP")
    redirects = [Redirect(SIMPLE, KIND_CLUSTER, "10.0.0.5", 80, "TCP", 40002),
                 Redirect(other, KIND_EXTERNAL, "10.0.0.5", 80, "TCP", 40009)]
    assert [r.to_port for r in elements(redirects, family=4)] == [40009]
    text = render(redirects, family=4)
    assert [e[4] for e in parse_elements(text)] == [40009]
    nft_check(text)


def test_render_same_address_and_port_for_tcp_and_udp_are_two_elements() -> None:
    tcp = ServicePortName("kube-system", "kube-dns", "dns-tcp", "TCP")
    redirects = [Redirect(DNS, KIND_CLUSTER, "10.0.0.10", 53, "UDP", 40004),
                 Redirect(tcp, KIND_CLUSTER, "10.0.0.10", 53, "TCP", 40005)]
    assert sorted(e[3:] for e in parse_elements(render(redirects, family=4))) == [
        ("TCP", 40005), ("UDP", 40004)]


def test_render_changes_adds_deletes_and_moves() -> None:
    old = seed_redirects()
    moved = Redirect(PORT1, KIND_CLUSTER, "10.0.0.180", 6789, "TCP", 40100)
    added = Redirect(SIMPLE, KIND_EXTERNAL, "192.0.2.11", 8080, "TCP", 40101)
    new = [moved if r.name == PORT1 else r for r in old if r.name != PORT2] + [added]
    assert render_changes(old, new, family=4) == (
        "delete element ip uproxy services { 10.0.0.180 . tcp . 6789, 10.0.0.180 . tcp . 9876 }\n"
        'add element ip uproxy services { 10.0.0.180 . tcp . 6789 comment '
        '"default/multi-port:port1 cluster IP" : 40100, 192.0.2.11 . tcp . 8080 comment '
        '"namingthings/simpleservice: external IP" : 40101 }\n'
    )
    assert render_changes(old, new, family=6) == ""
    assert render_changes(old, list(reversed(old)), family=4) == ""


def apply_delta(table_text: str, delta: str) -> list[tuple[str, str, int, str, int]]:
    """What the map holds after ``delta`` (as nft applies it: deletes must exist, adds must not
    conflict), read back as :func:`parse_elements` tuples."""
    current = {(a, p, proto): (c, to) for c, a, p, proto, to in parse_elements(table_text)}
    for line in delta.splitlines():
        body = line[line.index("{") + 1:line.rindex("}")]
        if line.startswith("delete"):
            for part in body.split(","):
                a, proto, p = (x.strip() for x in part.split(" . "))
                del current[(a, int(p), proto.upper())]  # KeyError: nft would refuse it
        else:
            for c, a, port, proto, to in parse_elements("elements = {" + body + "}"):
                assert (a, port, proto) not in current, "nft would refuse: File exists"
                current[(a, port, proto)] = (c, to)
    return sorted((c, a, p, proto, to) for (a, p, proto), (c, to) in current.items())


def test_render_changes_then_parse_equals_full_render() -> None:
    old = seed_redirects()
    new = [Redirect(r.name, r.kind, r.address, r.port, r.protocol, r.to_port + 1) for r in old[:3]]
    for family in (4, 6):
        delta = render_changes(old, new, family=family)
        assert apply_delta(render(old, family=family), delta) == sorted(
            parse_elements(render(new, family=family)))


def test_render_cleanup_deletes_only_uproxy_tables() -> None:
    assert render_cleanup() == (
        "table ip uproxy\ndelete table ip uproxy\ntable ip6 uproxy\ndelete table ip6 uproxy\n")
    assert render_cleanup([6]) == "table ip6 uproxy\ndelete table ip6 uproxy\n"
    assert render_cleanup([]) == ""
    nft_check(render_cleanup())


def test_parse_reads_nft_list_output() -> None:
    """The shape ``nft list table ip uproxy`` prints (nft 1.0.6): tabs, ``to :ip``, no comment."""
    listed = (
        "table ip uproxy {\n\tmap services {\n"
        "\t\ttype ipv4_addr . inet_proto . inet_service : inet_service\n"
        '\t\telements = { 10.0.0.10 . tcp . 80 comment "default/web:http cluster IP" : 40000,\n'
        "\t\t\t     10.0.0.53 . udp . 53 : 40001, 10.0.0.54 . sctp . 9 : 40002 }\n\t}\n\n"
        "\tchain prerouting {\n\t\ttype nat hook prerouting priority dstnat - 1; policy accept;\n"
        "\t\tmeta l4proto { tcp, udp, sctp } redirect to :ip daddr . meta l4proto . th dport map "
        '@services comment "uproxy service portals"\n\t}\n}\n'
    )
    assert parse_elements(listed) == [
        ("default/web:http cluster IP", "10.0.0.10", 80, "TCP", 40000),
        ("", "10.0.0.53", 53, "UDP", 40001),
        ("", "10.0.0.54", 9, "SCTP", 40002),
    ]


def test_uproxy_tables_from_list_tables() -> None:
    text = "table ip filter\ntable ip6 uproxy\ntable ip uproxy_probe\ntable inet uproxy\n" \
           "table ip uproxy\n"
    assert uproxy_tables(text) == [4, 6]
    assert uproxy_tables("table ip nat\n") == []


def test_uproxy_tables_from_list_chains() -> None:
    """What ``nft list chains`` prints (the daemon asks it: see Nftables.tables)."""
    text = ("table ip uproxy {\n\tchain output {\n\t\ttype nat hook output priority -100; "
            "policy accept;\n\t}\n}\ntable ip uproxyx {\n}\ntable inet uproxy {\n}\n"
            "table ip6 uproxy {\n\tchain prerouting {\n\t}\n}\n")
    assert uproxy_tables(text) == [4, 6]
    assert uproxy_tables("table ip uproxyx {\n}\ntable inet uproxy {\n}\n") == []


def test_family_keyword() -> None:
    assert nftrules.family_keyword(4) == "ip"
    assert nftrules.family_keyword(6) == "ip6"


_names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
                 max_size=30)
_v4 = st.integers(min_value=1, max_value=2**32 - 2).map(lambda n: str(ipaddress.IPv4Address(n)))
_v6 = st.integers(min_value=1, max_value=2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
_redirect = st.builds(
    Redirect,
    name=st.builds(ServicePortName, _names, _names, _names, st.sampled_from(["TCP", "UDP"])),
    kind=st.sampled_from([KIND_CLUSTER, KIND_EXTERNAL, KIND_LOADBALANCER]),
    address=st.one_of(_v4, _v6),
    port=st.integers(min_value=1, max_value=65535),
    protocol=st.sampled_from(["TCP", "UDP", "SCTP"]),
    to_port=st.integers(min_value=1, max_value=65535),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_redirect, max_size=30))
def test_render_parse_round_trip(redirects: list[Redirect]) -> None:
    for family in (4, 6):
        text = render(redirects, family=family)
        parsed = parse_elements(text)
        want = [(r.comment[:COMMENT_MAX], r.address, r.port, r.protocol, r.to_port)
                for r in elements(redirects, family=family)]
        assert parsed == want
        assert len({(a, p, proto) for _, a, p, proto, _ in parsed}) == len(parsed)


def _with_moves(pool: list[Redirect]) -> list[Redirect]:
    """The pool plus, per redirect, the same key on another proxy port and under another kind."""
    return [*pool, *(dataclasses.replace(r, to_port=r.to_port % 65535 + 1) for r in pool),
            *(dataclasses.replace(r, kind=KIND_EXTERNAL if r.kind != KIND_EXTERNAL
                                  else KIND_CLUSTER) for r in pool)]


@settings(max_examples=200, deadline=None)
@given(st.lists(_redirect, min_size=1, max_size=12).map(_with_moves).flatmap(
    lambda pool: st.tuples(st.lists(st.sampled_from(pool), max_size=12),
                           st.lists(st.sampled_from(pool), max_size=12))))
def test_render_changes_applied_to_old_gives_new(old_new: tuple[list[Redirect],
                                                                 list[Redirect]]) -> None:
    """Any two tables (drawn from one pool, so keys overlap and move): the delta is accepted
    as nft would (no missing delete, no conflicting add) and leaves exactly the new table."""
    old, new = old_new
    for family in (4, 6):
        delta = render_changes(old, new, family=family)
        assert apply_delta(render(old, family=family), delta) == sorted(
            parse_elements(render(new, family=family)))


# --- the element delta from the changed service ports alone (issue 16) -----------------------
_DELTA_NAMES = [ServicePortName("default", f"svc-{i}", "http", "TCP") for i in range(5)]
_DELTA_ADDRESSES = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1", "fd00::2"]


def _random_redirects(rng: random.Random, name: ServicePortName) -> list[Redirect]:
    return [Redirect(name, rng.choice((KIND_CLUSTER, KIND_EXTERNAL)),
                     rng.choice(_DELTA_ADDRESSES), rng.choice((80, 443)),
                     rng.choice(("TCP", "UDP")), rng.choice((40000, 40001, 40002)))
            for _ in range(rng.randint(0, 3))]


def test_the_delta_of_the_changed_service_ports_is_the_whole_lists_delta_when_exact() -> None:
    """RulesDelta: each sync's redirects taken away and put in, of the changed service
    ports only, give the nft text the whole lists give, unless another service port claims
    a touched key (then it says it is not exact). Few addresses: conflicts happen."""
    rng = random.Random(16)
    by_name: dict[ServicePortName, list[Redirect]] = {}
    claims: dict[nftrules.Key, int] = {}
    exact = inexact = 0
    for _ in range(500):
        before = [r for rs in by_name.values() for r in rs]
        delta = nftrules.RulesDelta(before)
        for name in rng.sample(_DELTA_NAMES, rng.randint(1, 2)):
            old = by_name.get(name, [])
            new = [] if rng.random() < 0.2 else _random_redirects(rng, name)
            if new == old:
                continue
            delta.change(claims, old, new)
            if new:
                by_name[name] = new
            else:
                by_name.pop(name, None)
        after = [r for rs in by_name.values() for r in rs]
        assert claims == {k: n for k, n in
                          ((k, sum(k in {nftrules.key(r) for r in rs} for rs in by_name.values()))
                           for k in {nftrules.key(r) for r in after}) if n}
        if not delta.exact:
            inexact += 1
            continue
        exact += 1
        for family in (4, 6):
            assert render_changes(delta.old, delta.new, family=family) == render_changes(
                before, after, family=family)
    assert exact > 100 and inexact > 20, (exact, inexact)
