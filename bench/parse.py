"""The pure half of the benchmark: tool output -> numbers, numbers -> tables.

Kept free of subprocesses and namespaces so that tests/tools/test_bench.py can
check it against recorded tool output, and so a parse failure names the tool
and shows what it printed instead of ending in a bare ``KeyError``.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class ParseError(ValueError):
    """A tool printed something we cannot read (message names the tool)."""


# ------------------------------------------------------------------------------- wrk
_WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_WRK_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.M)
_WRK_TOTAL = re.compile(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m|h),", re.M)
_WRK_PCT = re.compile(r"^\s+(50|75|90|99)%\s+([0-9.]+)(us|ms|s|m|h)\s*$", re.M)
_WRK_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests_per_sec: float
    requests: int
    # seconds; absent without --latency
    p50: float | None = None
    p99: float | None = None
    errors: int = 0
    non_2xx: int = 0


def parse_wrk(text: str) -> WrkResult:
    """Read wrk's human output (``wrk [--latency] ...``)."""
    rps = _WRK_RPS.search(text)
    total = _WRK_TOTAL.search(text)
    if rps is None or total is None:
        raise ParseError(f"wrk: no 'Requests/sec' in its output: {text.strip()[-500:]!r}")
    pct = {m.group(1): float(m.group(2)) * _WRK_UNITS[m.group(3)]
           for m in _WRK_PCT.finditer(text)}
    err = _WRK_ERRORS.search(text)
    errors = sum(int(g) for g in err.groups()) if err else 0
    non = _WRK_NON2XX.search(text)
    return WrkResult(
        requests_per_sec=float(rps.group(1)), requests=int(total.group(1)),
        p50=pct.get("50"), p99=pct.get("99"), errors=errors,
        non_2xx=int(non.group(1)) if non else 0,
    )


# ---------------------------------------------------------------------------- iperf3
@dataclass(frozen=True, slots=True)
class IperfResult:
    bits_per_second: float
    bytes: int
    seconds: float


def parse_iperf3(text: str) -> IperfResult:
    """Read ``iperf3 -c ... -J``: the receiver's side of the sum (what really arrived)."""
    try:
        doc: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(f"iperf3: output is not JSON ({exc}): {text.strip()[-300:]!r}") from None
    if not isinstance(doc, dict):
        raise ParseError("iperf3: output is not a JSON object")
    if doc.get("error"):
        raise ParseError(f"iperf3: {doc['error']}")
    try:
        recv = doc["end"]["sum_received"]
        return IperfResult(bits_per_second=float(recv["bits_per_second"]),
                           bytes=int(recv["bytes"]), seconds=float(recv["seconds"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ParseError(f"iperf3: no end.sum_received in its JSON ({exc!r})") from None


# --------------------------------------------------------------------------- dnsperf
_DNS_SENT = re.compile(r"Queries sent:\s+(\d+)")
_DNS_DONE = re.compile(r"Queries completed:\s+(\d+)")
_DNS_LOST = re.compile(r"Queries lost:\s+(\d+)")
_DNS_QPS = re.compile(r"Queries per second:\s+([0-9.]+)")


@dataclass(frozen=True, slots=True)
class DnsperfResult:
    qps: float
    sent: int
    completed: int
    lost: int


def parse_dnsperf(text: str) -> DnsperfResult:
    """Read dnsperf's ``Statistics:`` block."""
    found = [r.search(text) for r in (_DNS_QPS, _DNS_SENT, _DNS_DONE, _DNS_LOST)]
    if any(m is None for m in found):
        raise ParseError(f"dnsperf: no statistics in its output: {text.strip()[-500:]!r}")
    qps, sent, done, lost = (m.group(1) for m in found if m is not None)
    return DnsperfResult(qps=float(qps), sent=int(sent), completed=int(done), lost=int(lost))


# ----------------------------------------------------------------------------- /proc
def parse_proc_stat_cpu(text: str, *, ticks: int = 100, children: bool = False) -> float:
    """utime+stime in seconds from one ``/proc/PID/stat`` line (comm may hold spaces);
    ``children``: plus cutime+cstime (the children it has waited for: nft, iptables)."""
    rest = text.rpartition(")")[2].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15, cutime and
    # cstime 16 and 17
    try:
        return sum(int(x) for x in rest[11:15 if children else 13]) / ticks
    except (IndexError, ValueError):
        raise ParseError(f"/proc/PID/stat: unexpected line {text[:200]!r}") from None


def parse_machine_cpu(text: str, *, ticks: int = 100) -> tuple[float, float]:
    """(busy, all) CPU seconds of every CPU since boot from ``/proc/stat``'s ``cpu`` line:
    busy is user+nice+system+irq+softirq (guest time is inside user), all adds idle and
    iowait (steal, time the host took, is neither)."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            try:
                user, nice, system, idle, iowait, irq, softirq = (int(x) for x in fields[1:8])
            except ValueError:
                break
            busy = user + nice + system + irq + softirq
            return busy / ticks, (busy + idle + iowait) / ticks
    raise ParseError(f"/proc/stat: no cpu line with 7 counters in {text[:200]!r}")


def parse_vmrss_kib(status_text: str) -> int:
    """``VmRSS`` of a ``/proc/PID/status`` text, in KiB."""
    m = re.search(r"^VmRSS:\s+(\d+) kB", status_text, re.M)
    if m is None:
        raise ParseError("/proc/PID/status: no VmRSS line")
    return int(m.group(1))


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` of a Prometheus histogram.

    ``buckets`` are cumulative ``(le, count)`` pairs, ``+Inf`` last. Returns
    None for an empty histogram. The answer is an upper bound, not interpolated:
    we report "p99 <= X" honestly rather than a made-up value inside a bucket.
    """
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    for le, count in ordered:
        if count >= rank:
            return le
    return ordered[-1][0]


def parse_histogram(metrics_text: str, name: str) -> list[tuple[float, float]]:
    """Cumulative buckets of one (label-less) histogram from Prometheus text format."""
    out: list[tuple[float, float]] = []
    pat = re.compile(rf'^{re.escape(name)}_bucket\{{le="([^"]+)"\}} ([0-9.e+-]+)$', re.M)
    for m in pat.finditer(metrics_text):
        le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
        out.append((le, float(m.group(2))))
    return out


# ------------------------------------------------------------------------ statistics
def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of the samples, None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    idx = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered) - 1e-9) - 1))
    return ordered[idx]


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


# ---------------------------------------------------------------------------- tables
@dataclass(slots=True)
class Figure:
    """One measured quantity across peers: samples per peer (one per round)."""

    key: str
    title: str
    unit: str
    higher_is_better: bool = True
    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, peer: str, value: float | None) -> None:
        if value is not None:
            self.samples.setdefault(peer, []).append(value)

    def median(self, peer: str) -> float | None:
        return median(self.samples.get(peer, []))


def fmt_num(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    mag = abs(value)
    if mag >= 1000:
        return f"{value:,.0f}"
    if mag >= 100:
        return f"{value:.0f}"
    if mag >= 10:
        return f"{value:.1f}"
    if mag >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def render_table(fig: Figure, peers: Sequence[str], *, kernel: str, nginx: str) -> str:
    """Markdown table: peer | median | samples | ratio to kernel DNAT | ratio to nginx."""
    lines = [f"| peer | median ({fig.unit}) | rounds | vs {kernel} | vs {nginx} |",
             "|---|---:|---|---:|---:|"]
    base_k, base_n = fig.median(kernel), fig.median(nginx)
    for peer in peers:
        med = fig.median(peer)
        rounds = ", ".join(fmt_num(v) for v in fig.samples.get(peer, [])) or "-"
        lines.append(f"| {peer} | {fmt_num(med)} | {rounds} | {fmt_ratio(ratio(med, base_k))} "
                     f"| {fmt_ratio(ratio(med, base_n))} |")
    return "\n".join(lines)


def render_summary(figures: Sequence[Figure], peers: Sequence[str], *, kernel: str,
                   nginx: str) -> str:
    """One wide markdown table: a row per figure, a column per peer (median, ratio to kernel)."""
    head = "| figure | " + " | ".join(peers) + " |"
    lines = [head, "|---|" + "---:|" * len(peers)]
    for fig in figures:
        cells = []
        base_k, base_n = fig.median(kernel), fig.median(nginx)
        for peer in peers:
            med = fig.median(peer)
            if med is None:
                cells.append("n/a")
                continue
            r = ratio(med, base_k) if base_k is not None else ratio(med, base_n)
            tag = "" if r is None or peer in (kernel,) else \
                f" ({fmt_ratio(r)}{'' if base_k is not None else ' nginx'})"
            cells.append(f"{fmt_num(med)}{tag}")
        lines.append(f"| {fig.title} ({fig.unit}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Target:
    text: str
    met: bool | None  # None: not measured
    detail: str


def render_targets(targets: Sequence[Target]) -> str:
    lines = ["| target (from the issues) | result | measured |", "|---|---|---|"]
    for t in targets:
        verdict = "not measured" if t.met is None else ("**met**" if t.met else "**not met**")
        lines.append(f"| {t.text} | {verdict} | {t.detail} |")
    return "\n".join(lines)


def check(value: float | None, op: str, bound: float | None) -> bool | None:
    """``value OP bound`` with None meaning "not measured"."""
    if value is None or bound is None:
        return None
    ops: Mapping[str, bool] = {"<=": value <= bound, ">=": value >= bound,
                               "<": value < bound, ">": value > bound}
    return ops[op]
