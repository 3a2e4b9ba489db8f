"""The benchmark's pure parts: tool output parsing, statistics, tables, kube-proxy rule text.

Tool outputs below are in the exact formats of the Debian wrk 4.1, iperf3 -J and
dnsperf 2.10 the benchmark runs; a format change must fail here, not in a
15-minute run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import parse
from bench.parse import Figure, ParseError
from bench.peers import kube_proxy_rules

WRK_LATENCY = """\
Running 5s test @ http://10.0.0.10:80/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.07ms  620.43us  18.12ms   88.10%
    Req/Sec    24.01k     2.11k   28.40k    71.00%
  Latency Distribution
     50%    0.98ms
     75%    1.22ms
     90%    1.61ms
     99%    3.18ms
  238912 requests in 5.00s, 35.09MB read
Requests/sec:  47722.91
Transfer/sec:      7.01MB
"""

WRK_CLOSE = """\
Running 5s test @ http://10.0.0.10:80/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.61ms    1.01ms  21.40ms   79.00%
    Req/Sec     2.90k   210.00     3.30k    68.00%
  28845 requests in 5.00s, 4.18MB read
  Socket errors: connect 3, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   5768.80
Transfer/sec:    856.21KB
"""

DNSPERF = """\
DNS Performance Testing Tool
Version 2.10.0

[Status] Command line: dnsperf -s 10.0.0.10 -p 53 -d queries.txt -l 2 -c 1 -q 100 -t 2
[Status] Sending queries (to 10.0.0.10:53)
[Status] Testing complete (time limit)

Statistics:

  Queries sent:         113747
  Queries completed:    113740 (99.99%)
  Queries lost:         7 (0.01%)

  Response codes:       NOERROR 113740 (100.00%)
  Average packet size:  request 31, response 47
  Run time (s):         2.000512
  Queries per second:   56855.9

  Average Latency (s):  0.001731 (min 0.000041, max 0.012002)
"""


def test_wrk_with_latency_distribution() -> None:
    r = parse.parse_wrk(WRK_LATENCY)
    assert r.requests_per_sec == pytest.approx(47722.91)
    assert r.requests == 238912
    assert r.p50 == pytest.approx(0.98e-3)
    assert r.p99 == pytest.approx(3.18e-3)
    assert (r.errors, r.non_2xx) == (0, 0)


def test_wrk_errors_and_no_latency_block() -> None:
    r = parse.parse_wrk(WRK_CLOSE)
    assert r.requests_per_sec == pytest.approx(5768.8)
    assert r.p50 is None and r.p99 is None
    assert r.errors == 6 and r.non_2xx == 4


def test_wrk_latency_units_us_and_s() -> None:
    text = WRK_LATENCY.replace("0.98ms", "870.00us").replace("3.18ms", "1.20s")
    r = parse.parse_wrk(text)
    assert r.p50 == pytest.approx(870e-6)
    assert r.p99 == pytest.approx(1.2)


def test_wrk_failure_names_the_tool() -> None:
    with pytest.raises(ParseError, match=r"^wrk: .*unable to connect"):
        parse.parse_wrk("unable to connect to 10.0.0.10:80 Connection refused\n")


def test_iperf3_reads_the_receivers_sum() -> None:
    doc = {"start": {}, "end": {
        "sum_sent": {"bytes": 9_000_000_000, "bits_per_second": 14.4e9, "seconds": 5.0},
        "sum_received": {"bytes": 8_400_000_000, "bits_per_second": 13.45e9, "seconds": 5.0004}}}
    r = parse.parse_iperf3(json.dumps(doc))
    assert r.bits_per_second == pytest.approx(13.45e9)
    assert r.bytes == 8_400_000_000


def test_iperf3_error_and_garbage() -> None:
    with pytest.raises(ParseError, match="iperf3: error - unable to connect"):
        parse.parse_iperf3(json.dumps({"start": {}, "end": {},
                                       "error": "error - unable to connect to server"}))
    with pytest.raises(ParseError, match="not JSON"):
        parse.parse_iperf3("iperf3: error\n")
    with pytest.raises(ParseError, match="sum_received"):
        parse.parse_iperf3(json.dumps({"end": {}}))


def test_dnsperf_statistics() -> None:
    r = parse.parse_dnsperf(DNSPERF)
    assert r.qps == pytest.approx(56855.9)
    assert (r.sent, r.completed, r.lost) == (113747, 113740, 7)
    with pytest.raises(ParseError, match=r"^dnsperf"):
        parse.parse_dnsperf("[Fatal] invalid server\n")


def test_proc_stat_and_status() -> None:
    # comm with spaces and a parenthesis, as /proc allows
    stat = "4242 (py thon) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1 2 3"
    assert parse.parse_proc_stat_cpu(stat, ticks=100) == pytest.approx(3.25)
    assert parse.parse_proc_stat_cpu(stat, ticks=100, children=True) == pytest.approx(3.25)
    waited = "4242 (nft) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 40 10 20 0 3 0 1 2 3"
    assert parse.parse_proc_stat_cpu(waited, ticks=100, children=True) == pytest.approx(3.75)
    assert parse.parse_vmrss_kib("Name:\tx\nVmRSS:\t   44628 kB\nThreads:\t3\n") == 44628
    with pytest.raises(ParseError):
        parse.parse_vmrss_kib("Name:\tzombie\n")


def test_machine_cpu_counts_busy_time_of_every_cpu_and_leaves_out_steal() -> None:
    stat = ("cpu  1000 20 300 5000 80 7 93 400 0 0\n"
            "cpu0 500 10 150 2500 40 3 47 200 0 0\n"
            "intr 12345 0 0\n")
    busy, total = parse.parse_machine_cpu(stat, ticks=100)
    assert busy == pytest.approx(14.2)  # user, nice, system, irq, softirq
    assert total == pytest.approx(14.2 + 50.8)  # + idle, iowait; steal in neither
    with pytest.raises(ParseError, match="/proc/stat"):
        parse.parse_machine_cpu("cpu0 1 2 3 4 5 6 7\n")


def test_histogram_quantile_is_the_bucket_bound() -> None:
    text = (
        'kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.01"} 30.0\n'
        'kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.05"} 39.0\n'
        'kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="2.5"} 40.0\n'
        'kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="+Inf"} 40.0\n'
        'kubeproxy_sync_proxy_rules_duration_seconds_count 40.0\n'
    )
    buckets = parse.parse_histogram(text, "kubeproxy_sync_proxy_rules_duration_seconds")
    assert buckets[-1] == (float("inf"), 40.0)
    assert parse.histogram_quantile(buckets, 0.5) == 0.01
    assert parse.histogram_quantile(buckets, 0.9) == 0.05
    assert parse.histogram_quantile(buckets, 0.99) == 2.5
    assert parse.histogram_quantile([(float("inf"), 0.0)], 0.5) is None


def test_median_percentile_ratio() -> None:
    assert parse.median([3.0, 1.0, 2.0]) == 2.0
    assert parse.median([]) is None
    samples = [float(i) for i in range(1, 101)]
    assert parse.percentile(samples, 0.5) == 50.0
    assert parse.percentile(samples, 0.99) == 99.0
    assert parse.percentile([7.0], 0.99) == 7.0
    assert parse.ratio(5.0, 10.0) == 0.5
    assert parse.ratio(5.0, None) is None and parse.ratio(5.0, 0.0) is None


def test_table_has_median_and_ratios_to_both_baselines() -> None:
    fig = Figure("conn", "new connections", "conn/s")
    for peer, values in {"kernel": [100.0, 120.0, 110.0], "uproxy": [60.0, 50.0, 55.0],
                         "nginx": [110.0]}.items():
        for v in values:
            fig.add(peer, v)
    fig.add("uproxy", None)  # a failed round is not a sample
    table = parse.render_table(fig, ["kernel", "uproxy", "nginx", "haproxy"],
                               kernel="kernel", nginx="nginx")
    rows = table.splitlines()
    assert rows[0] == "| peer | median (conn/s) | rounds | vs kernel | vs nginx |"
    assert rows[3] == "| uproxy | 55.0 | 60.0, 50.0, 55.0 | 0.50x | 0.50x |"
    assert rows[2] == "| kernel | 110 | 100, 120, 110 | 1.00x | 1.00x |"
    assert rows[5] == "| haproxy | n/a | - | n/a | n/a |"


def test_summary_falls_back_to_nginx_when_the_kernel_has_no_value() -> None:
    fig = Figure("idle_rss", "RSS per idle connection", "KiB", higher_is_better=False)
    fig.add("uproxy", 1.75)
    fig.add("nginx", 9.1)
    text = parse.render_summary([fig], ["kernel", "uproxy", "nginx"], kernel="kernel",
                                nginx="nginx")
    assert "| RSS per idle connection (KiB) | n/a | 1.75 (0.19x nginx) | 9.10 (1.00x nginx) |" \
        in text


def test_targets_render_and_check() -> None:
    assert parse.check(0.9, ">=", 0.85) is True
    assert parse.check(0.8, ">=", 0.85) is False
    assert parse.check(None, ">=", 0.85) is None
    text = parse.render_targets([parse.Target("a", True, "x"), parse.Target("b", False, "y"),
                                 parse.Target("c", None, "n/a")])
    assert "| a | **met** | x |" in text
    assert "| b | **not met** | y |" in text
    assert "| c | not measured | n/a |" in text


def test_kube_proxy_rules_match_the_seeds_shape() -> None:
    text = kube_proxy_rules([("bench/web:http", "10.0.0.10", 80, "tcp",
                              ("172.17.0.2", "172.17.0.3"))])
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    svc = [ln for ln in lines if ln.startswith("-A KUBE-SERVICES")]
    assert len(svc) == 1
    assert '-d 10.0.0.10/32 -p tcp -m comment --comment "bench/web:http cluster IP" ' \
           "-m tcp --dport 80 -j KUBE-SVC-" in svc[0]
    chain = svc[0].rsplit(" ", 1)[1]
    assert f":{chain} - [0:0]" in lines
    jumps = [ln for ln in lines if ln.startswith(f"-A {chain} ")]
    assert "-m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-" in jumps[0]
    assert "statistic" not in jumps[1]
    dnat = sorted(ln.rsplit(" ", 1)[1] for ln in lines if "-j DNAT" in ln)
    assert dnat == ["172.17.0.2:80", "172.17.0.3:80"]
    assert sum(1 for ln in lines if ln.endswith("-j KUBE-SERVICES")) == 2  # PREROUTING, OUTPUT


def test_kube_proxy_rules_for_ipv6_use_128_and_bracketed_dnat() -> None:
    """Issue 13's kernel peer over IPv6: the same chains for ``ip6tables-restore``."""
    text = kube_proxy_rules([("bench/web:http", "fd00:96::a", 80, "tcp",
                              ("fd00:17::2", "fd00:17::3"))])
    lines = text.splitlines()
    svc = [ln for ln in lines if ln.startswith("-A KUBE-SERVICES")]
    assert len(svc) == 1 and "-d fd00:96::a/128 -p tcp " in svc[0]
    dnat = sorted(ln.rsplit(" ", 1)[1] for ln in lines if "-j DNAT" in ln)
    assert dnat == ["[fd00:17::2]:80", "[fd00:17::3]:80"]
    assert sum(1 for ln in lines if "--probability 0.50000000000" in ln) == 1


class _FakePeer:
    """Only the capability flags :func:`bench.run.applies` reads (no process behind it)."""

    name = "p"

    def __init__(self, *, tcp: bool, udp: bool, ipv6: bool, bulk_only: bool = False) -> None:
        self.tcp, self.udp, self.ipv6, self.bulk_only = tcp, udp, ipv6, bulk_only

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def pids(self) -> list[int]:
        return []


def test_ipv6_tests_run_only_on_peers_with_an_ipv6_path() -> None:
    from bench.run import DATA_TESTS, IPV6_TESTS, TESTS, applies

    assert set(IPV6_TESTS) <= set(TESTS) and set(IPV6_TESTS) <= set(DATA_TESTS)
    both = _FakePeer(tcp=True, udp=True, ipv6=True)
    v4_only = _FakePeer(tcp=True, udp=True, ipv6=False)
    udp_only = _FakePeer(tcp=False, udp=True, ipv6=True)
    assert all(applies(t, both) for t in DATA_TESTS)
    assert [t for t in DATA_TESTS if applies(t, v4_only)] == \
        ["bulk", "conn", "keepalive", "status", "dns"]
    assert [t for t in DATA_TESTS if applies(t, udp_only)] == ["dns", "dns6"]
    bulk_only = _FakePeer(tcp=True, udp=False, ipv6=False, bulk_only=True)
    assert [t for t in DATA_TESTS if applies(t, bulk_only)] == ["bulk"]


def test_only_accepts_the_ipv6_tests_and_they_are_in_the_default_set() -> None:
    from bench.__main__ import parse_args

    opts, _ = parse_args(["--quick", "--only", "conn6,keepalive6,dns6",
                          "--peers", "kernel DNAT,uproxy native"])
    assert opts.only == ("conn6", "keepalive6", "dns6")
    assert opts.peers == ("kernel DNAT", "uproxy native")
    default, _ = parse_args([])
    assert {"conn6", "keepalive6", "dns6"} <= set(default.only)


def test_ipv6_rows_and_target_against_kernel_over_ipv6() -> None:
    from bench.peers import KERNEL, NATIVE
    from bench.report import ipv6_target, main_table
    from bench.run import new_results

    res = new_results()
    none_yet = ipv6_target(res)
    assert none_yet.met is None  # nothing measured is "not measured", never "met"
    for key, kernel, native in (("conn", 100.0, 50.0), ("conn6", 100.0, 46.0),
                                ("ka", 200.0, 100.0), ("ka6", 100.0, 50.0),
                                ("dns", 10.0, 9.0), ("dns6", 10.0, 8.2),
                                ("ka_p99", 1.0, 2.0), ("ka6_p99", 1.0, 2.5)):
        res.fig(key).add(KERNEL, kernel)
        res.fig(key).add(NATIVE, native)
    t = ipv6_target(res)
    assert t.met is True  # 0.46/0.50 = 0.92, 0.50/0.50 = 1.0, 0.82/0.90 = 0.91
    assert "new conn/s 0.46x of kernel over IPv6 vs 0.50x over IPv4 (0.92x)" in t.detail
    assert "keep-alive p99 2.50x of kernel's over IPv6 vs 2.00x over IPv4" in t.detail
    res.fig("dns6").samples[NATIVE] = [8.0]  # 0.80/0.90 = 0.89: more than 10% worse
    assert ipv6_target(res).met is False
    table = main_table(res, [KERNEL, NATIVE])
    assert "| IPv6: new connections (1 HTTP request each) (conn/s) | 100 | 46.0 (0.46x) |" \
        in table
    assert "| IPv6: DNS over UDP (queries/s) | 10.0 | 8.00 (0.80x) |" in table


def test_the_status_target_is_the_median_of_each_rounds_pair() -> None:
    from bench.peers import NATIVE
    from bench.report import targets
    from bench.run import Results, new_results

    def status(res: Results) -> parse.Target:
        return next(t for t in targets(res) if t.text.startswith("status page"))

    res = new_results()
    assert status(res).met is None  # no pair measured: "n/a", never "met"
    # Three rounds: with 900 vs 1000 without (-10%), 1010 vs 1000 (+1%), 990 vs 1000 (-1%).
    # The medians of each side alone (990 vs 1000) would say -1% too; the pairs decide.
    for w, wo in ((900.0, 1000.0), (1010.0, 1000.0), (990.0, 1000.0)):
        res.fig("conn_watch").add(NATIVE, w)
        res.fig("conn_nowatch").add(NATIVE, wo)
        res.fig("ka_watch").add(NATIVE, 2 * w)
        res.fig("ka_nowatch").add(NATIVE, 2 * wo)
    res.fig("conn").add(NATIVE, 5000.0)  # the round's own conn figure plays no part
    t = status(res)
    assert t.met is True
    assert "new conn/s lost 1.0% (per round -10.0%, +1.0%, -1.0%)" in t.detail
    res.fig("ka_watch").samples[NATIVE] = [1800.0, 1900.0, 1940.0]  # -10%, -5%, -3%
    t = status(res)
    assert t.met is False
    assert "keep-alive req/s lost 5.0%" in t.detail


def test_an_unwritable_out_path_is_one_line_before_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["--quick", "--out", str(blocker / "RESULTS.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"bench: --out {blocker / 'RESULTS.md'}: "), err


def test_baseline_puts_its_peer_right_after_uproxy_native_and_a_bad_rev_is_refused(
        capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import parse_args, resolve_commit
    from bench.peers import BASELINE, KERNEL, NATIVE, NGINX

    head = resolve_commit("HEAD")
    if not head:
        pytest.skip("not a git checkout")
    opts, _ = parse_args(["--baseline", "HEAD", "--peers", "kernel DNAT,uproxy native,nginx"
                          " stream"])
    assert opts.peers == (KERNEL, NATIVE, BASELINE, NGINX) and opts.baseline == head
    opts, _ = parse_args(["--baseline", head[:10], "--peers", "nginx stream"])
    assert opts.peers == (NGINX, BASELINE)  # no uproxy native in the run: last
    default, _ = parse_args([])
    assert BASELINE not in default.peers and default.baseline == ""
    with pytest.raises(SystemExit) as info:
        parse_args(["--baseline", "no-such-rev-anywhere"])
    assert info.value.code == 2
    assert "--baseline: 'no-such-rev-anywhere' is not a commit of" in capsys.readouterr().err


def test_the_no_regression_target_is_uproxy_against_its_baseline() -> None:
    from bench.peers import BASELINE, NATIVE, NGINX
    from bench.report import BASELINE_FIGS, baseline_target
    from bench.run import new_results

    res = new_results()
    t = baseline_target(res)
    assert t.met is None and "--baseline REV" in t.detail  # never "met" unmeasured
    base = {"bulk": 10.0, "conn": 6000.0, "ka": 30000.0, "dns": 40000.0, "ka_p99": 4.0,
            "idle_rss": 1.5}
    assert {k for k, _, _ in BASELINE_FIGS} == set(base)
    for key, value in base.items():
        res.fig(key).add(BASELINE, value)
        res.fig(key).add(NATIVE, value * (0.96 if key == "conn" else 1.0))
        res.fig(key).add(NGINX, value * 5)  # other peers play no part
    t = baseline_target(res)
    assert t.met is True
    assert "new conn/s 0.96x" in t.detail and "idle KiB per connection 1.00x" in t.detail
    res.fig("ka_p99").samples[NATIVE] = [4.5]  # 1.125x: worse by more than 10%
    assert baseline_target(res).met is False
    res.fig("ka_p99").samples[NATIVE] = [4.0]
    res.fig("dns").samples[NATIVE] = [37000.0]  # 0.925x
    assert baseline_target(res).met is False
    res.fig("idle_rss").samples.clear()  # not every figure measured: not a verdict
    t = baseline_target(res)
    assert t.met is None and "not every figure measured" in t.detail
