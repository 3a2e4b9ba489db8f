"""``python -m bench [--quick] [--only bulk,conn,...] [--rounds N] [--baseline REV]``.

Installs the load tools when missing (as root, ``apt-get``), runs the
side-by-side benchmark in a namespace lab (:mod:`bench.run`), prints the main
table and writes ``bench/RESULTS.md`` and ``bench/results.png``
(:mod:`bench.report`). ``--quick`` is for development: 1 round, 2 s tests,
fewer idle connections and services; it writes ``RESULTS-quick.md`` unless
``--out`` says otherwise, so a quick run never overwrites the real results.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.peers import ALL_PEERS, BASELINE, NATIVE, OPTIONAL_PEERS
from bench.run import TESTS, Options

HERE = Path(__file__).resolve().parent
TOOLS = {"wrk": "wrk", "iperf3": "iperf3", "haproxy": "haproxy", "nginx": "nginx",
         "dnsperf": "dnsperf", "conntrack": "conntrack", "curl": "curl", "ss": "iproute2"}
NGINX_STREAM = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def ensure_tools() -> None:
    missing = sorted({pkg for tool, pkg in TOOLS.items()
                      if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()})
    if not NGINX_STREAM.exists():
        missing.append("libnginx-mod-stream")
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"bench: missing {' '.join(missing)}; run as root to install them")
    print(f"bench: installing {' '.join(missing)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"bench: {' '.join(argv[:2])} failed: "
                             f"{proc.stderr.strip().splitlines()[-1:] or proc.returncode}")


def resolve_commit(rev: str) -> str:
    """The full hash of ``rev`` in this repository, or "" (not a commit, no git)."""
    try:
        out = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--verify", "--quiet",
                              f"{rev}^{{commit}}"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def parse_args(argv: Sequence[str] | None) -> tuple[Options, Path]:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="1 round, 2 s tests (development)")
    p.add_argument("--only", default=",".join(TESTS), help=f"comma list of {','.join(TESTS)}")
    p.add_argument("--peers", default=None, help="comma list of peers (default: all)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--out", type=Path, default=None, help="markdown output path")
    p.add_argument("--baseline", metavar="REV", default=None,
                   help="also run uproxy native as it was at this commit of the repository "
                        "(the peer 'uproxy baseline', right after uproxy native): whether "
                        "anything regressed, in the same run")
    a = p.parse_args(argv)
    only = tuple(t.strip() for t in a.only.split(",") if t.strip())
    bad = [t for t in only if t not in TESTS]
    if bad:
        p.error(f"--only: unknown test(s) {', '.join(bad)} (known: {', '.join(TESTS)})")
    peers: tuple[str, ...] = ALL_PEERS
    if a.peers:
        by_key = {n.lower().replace(" ", "-"): n for n in (*ALL_PEERS, *OPTIONAL_PEERS)}
        wanted = [t.strip().lower().replace(" ", "-") for t in a.peers.split(",") if t.strip()]
        unknown = [w for w in wanted if w not in by_key]
        if unknown:
            p.error(f"--peers: unknown {', '.join(unknown)} (known: {', '.join(by_key)})")
        peers = tuple(by_key[w] for w in wanted)
    baseline = ""
    if a.baseline:
        baseline = resolve_commit(a.baseline)
        if not baseline:
            p.error(f"--baseline: {a.baseline!r} is not a commit of {HERE.parent}")
        at = peers.index(NATIVE) + 1 if NATIVE in peers else len(peers)
        peers = (*peers[:at], BASELINE, *peers[at:])
    opts = Options(only=only, peers=peers, baseline=baseline)
    if a.quick:
        opts.rounds, opts.seconds = 1, 2.0
        opts.idle_count, opts.scale_services, opts.rest_seconds, opts.changes = 2000, 2000, 3, 10
        opts.takeover_conns = 2000
        opts.scale_starts = 1
    if a.rounds is not None:
        opts.rounds = max(1, a.rounds)
    if a.seconds is not None:
        opts.seconds = max(1.0, a.seconds)
    out = a.out or HERE / ("RESULTS-quick.md" if a.quick else "RESULTS.md")
    return opts, out


def main(argv: Sequence[str] | None = None) -> int:
    opts, out = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    try:  # before the run, not after it: a wrong --out must not cost its results
        out.parent.mkdir(parents=True, exist_ok=True)
        out.touch()
    except OSError as exc:
        print(f"bench: --out {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    ensure_tools()
    from bench import report, run

    started = time.monotonic()
    mach = run.machine()
    try:
        res = run.run(opts)
    except KeyboardInterrupt:
        print("bench: interrupted; lab torn down", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started
    png = out.with_name("results.png" if out.name == "RESULTS.md" else out.stem + ".png")
    note = report.write_chart(res, opts.peers, png)
    text = report.render_markdown(res, opts, mach, chart_note=note, elapsed=elapsed)
    out.write_text(text)
    print()
    print(report.main_table(res, list(opts.peers)))
    print()
    from bench.parse import render_targets
    print(render_targets(report.targets(res)))
    print()
    print(report.scale_table(res))
    print(f"\nwrote {out} and ({note})")
    if res.errors:
        print(f"{len(res.errors)} error(s) during the run: see {out.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
