"""The command line (uproxy.cli) as a user meets it: a subprocess, its exit code, its stderr.

Every failing case here must stop before the daemon starts (nothing is bound,
no iptables rule is touched); each asserts a one-line message and no traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from uproxy import nftrules
from uproxy.rules import KEEP_NAT_V4, KEEP_NAT_V6
from uproxy.transparent import MARK_RULE, render_mangle, rule_spec

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: multi-port, namespace: default}
spec:
  clusterIP: 10.0.0.180
  ports:
  - {name: port1, port: 6789, targetPort: 6789}
  - {name: port2, port: 9876, targetPort: 9876}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: multi-port-x1
  namespace: default
  labels: {kubernetes.io/service-name: multi-port}
addressType: IPv4
ports: [{name: port1, port: 6789}, {name: port2, port: 9876}]
endpoints: [{addresses: [172.17.0.5]}, {addresses: [172.17.0.6]}]
"""

EXPECTED_RULES = [
    '-A UPROXY-SERVICES -d 10.0.0.180/32 -p tcp -m comment --comment '
    '"default/multi-port:port1 cluster IP" -m tcp --dport 6789 -j REDIRECT --to-ports 40000',
    '-A UPROXY-SERVICES -d 10.0.0.180/32 -p tcp -m comment --comment '
    '"default/multi-port:port2 cluster IP" -m tcp --dport 9876 -j REDIRECT --to-ports 40001',
]

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def manifests() -> Iterator[Path]:
    """A world-readable manifest directory (pytest's tmp_path is private to root)."""
    with tempfile.TemporaryDirectory(prefix="uproxy-cli-") as d:
        os.chmod(d, 0o755)
        path = Path(d) / "multi-port.yaml"
        path.write_text(SERVICE)
        path.chmod(0o644)
        yield Path(d)


def uproxy(*args: str, as_nobody: bool = False,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    prefix: list[str] = []
    if as_nobody:
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            pytest.fail("running as nobody needs root and setpriv (util-linux)", pytrace=False)
        prefix = NOBODY
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("UPROXY_")}
    full_env.update(env or {})
    return subprocess.run([*prefix, sys.executable, "-m", "uproxy", *args], capture_output=True,
                          text=True, timeout=30, env=full_env, cwd="/")


def assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert done.stdout == ""
    return lines[0]


def test_rules_prints_restore_text(manifests: Path) -> None:
    done = uproxy("rules", "--manifests", str(manifests), "--interception", "iptables")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    body = [ln for ln in done.stdout.splitlines() if not ln.startswith("#")]
    assert body == ["*nat", ":UPROXY-SERVICES - [0:0]", *EXPECTED_RULES, KEEP_NAT_V4, "COMMIT",
                    *render_mangle(hooks=True).splitlines()]
    assert f"#   ip -4 rule add {' '.join(rule_spec())}; " in done.stdout


EXPECTED_ELEMENTS = [("default/multi-port:port1 cluster IP", "10.0.0.180", 6789, "TCP", 40000),
                     ("default/multi-port:port2 cluster IP", "10.0.0.180", 9876, "TCP", 40001)]


@pytest.mark.parametrize("mode", ["nftables", "auto"])
def test_rules_prints_the_nft_table(manifests: Path, mode: str) -> None:
    if mode == "auto" and shutil.which("nft") is None:
        pytest.skip("auto prints the nft text only where nft is installed")
    done = uproxy("rules", "--manifests", str(manifests), *(
        ["--interception", mode] if mode != "auto" else []))
    assert done.returncode == 0, done.stderr
    v4, _, mangle = done.stdout.partition("# transparent mode")
    assert "# nft -f (IPv4)" in v4 and "table ip uproxy {" in v4 and "UPROXY-SERVICES" not in v4
    assert "ip6" not in v4  # no IPv6 Service: no IPv6 table
    assert nftrules.parse_elements(v4) == EXPECTED_ELEMENTS
    assert "redirect to : ip daddr . meta l4proto . th dport map @services" in v4
    assert MARK_RULE in mangle  # transparent mode stays in iptables


@pytest.mark.lab  # needs root to drop it
def test_rules_needs_no_root(manifests: Path) -> None:
    done = uproxy("rules", "--manifests", str(manifests / "multi-port.yaml"),
                  "--proxy-port-range", "50000-50010", "--interception", "iptables",
                  as_nobody=True)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert [ln.replace("5000", "4000") for ln in done.stdout.splitlines()
            if ln.startswith("-A ")] == [*EXPECTED_RULES, KEEP_NAT_V4, MARK_RULE]


def test_rules_with_a_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert_one_line_error(uproxy("rules", "--manifests", str(missing)), str(missing))


def test_rules_with_a_bad_port_range(manifests: Path) -> None:
    done = uproxy("rules", "--manifests", str(manifests), "--proxy-port-range", "9-1")
    assert_one_line_error(done, "9-1")


def test_run_with_a_missing_manifest_path(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    # Without iptables management the manifest check is the first one, root or not.
    done = uproxy("run", "--manifests", str(missing), env={"UPROXY_MANAGE_IPTABLES": "false"})
    assert_one_line_error(done, str(missing))


def test_run_with_a_bad_flag_value(manifests: Path) -> None:
    done = uproxy("run", "--manifests", str(manifests), "--sync-period", "banana")
    assert_one_line_error(done, "--sync-period", "banana")


def test_run_with_an_unknown_congestion_control(manifests: Path) -> None:
    done = uproxy("run", "--manifests", str(manifests), "--relay-congestion-control", "nosuchcc",
                  env={"UPROXY_MANAGE_IPTABLES": "false"})
    assert_one_line_error(done, "--relay-congestion-control nosuchcc", "allowed here")
    done = uproxy("run", "--manifests", str(manifests), "--relay-congestion-control", "a b",
                  env={"UPROXY_MANAGE_IPTABLES": "false"})
    assert_one_line_error(done, "--relay-congestion-control", "not a congestion control name")


def test_run_with_a_bad_engine_thread_count(manifests: Path) -> None:
    for value in ("0", "65", "many"):
        done = uproxy("run", "--manifests", str(manifests), "--engine-threads", value,
                      env={"UPROXY_MANAGE_IPTABLES": "false"})
        assert_one_line_error(done, "--engine-threads", value)
    done = uproxy("run", "--manifests", str(manifests), env={"UPROXY_ENGINE_THREADS": "-1",
                                                            "UPROXY_MANAGE_IPTABLES": "false"})
    assert_one_line_error(done, "UPROXY_ENGINE_THREADS", "-1")


def test_run_with_a_bad_environment_value(manifests: Path) -> None:
    done = uproxy("run", "--manifests", str(manifests), env={"UPROXY_SYNC_PERIOD": "soon"})
    assert_one_line_error(done, "UPROXY_SYNC_PERIOD", "soon")


@pytest.mark.lab  # needs root to drop it
def test_run_as_nobody_needs_root(manifests: Path) -> None:
    done = uproxy("run", "--manifests", str(manifests), as_nobody=True)
    assert_one_line_error(done, "root")


def test_unknown_subcommand() -> None:
    assert_one_line_error(uproxy("frobnicate"), "invalid choice", "frobnicate")


def test_unknown_flag() -> None:
    done = uproxy("run", "--no-such-flag")
    assert_one_line_error(done, "--no-such-flag")


def test_no_subcommand() -> None:
    assert_one_line_error(uproxy(), "required")


MIXED = """\
apiVersion: v1
kind: Service
metadata: {name: 'we"ird\\\\name', namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.0.0.50
  externalIPs: [192.0.2.10]
  ports:
  - {name: web, port: 80, nodePort: 30080}
  - {name: bad, port: 70000}
status:
  loadBalancer: {ingress: [{ip: 198.51.100.7}]}
"""


def test_rules_with_problems_external_and_hostile_names(manifests: Path) -> None:
    f = manifests / "mixed.yaml"
    f.write_text(MIXED)
    done = uproxy("rules", "--manifests", str(f), "--interception", "iptables")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1, errors
    assert f"{f}: Service default/" in errors[0]
    assert "spec.ports[1].port: 70000 is outside 1-65535" in errors[0]
    rules = [ln for ln in done.stdout.splitlines() if ln.startswith("-A ")]
    assert rules == [
        '-A UPROXY-SERVICES -d 10.0.0.50/32 -p tcp -m comment --comment '
        '"default/we_ird__name:web cluster IP" -m tcp --dport 80 -j REDIRECT --to-ports 40000',
        '-A UPROXY-SERVICES -d 192.0.2.10/32 -p tcp -m comment --comment '
        '"default/we_ird__name:web external IP" -m tcp --dport 80 -j REDIRECT --to-ports 40001',
        '-A UPROXY-SERVICES -d 198.51.100.7/32 -p tcp -m comment --comment '
        '"default/we_ird__name:web loadbalancer IP" -m tcp --dport 80 -j REDIRECT --to-ports 40001',
        KEEP_NAT_V4, MARK_RULE,
    ]


def test_run_with_a_bad_config_file(manifests: Path) -> None:
    cfg = manifests / "uproxy-config.yaml"
    cfg.write_text("sync_period: whenever\n")
    done = uproxy("run", "--config", str(cfg), "--manifests", str(manifests / "multi-port.yaml"))
    assert_one_line_error(done, str(cfg), "sync_period", "whenever")
    done = uproxy("run", "--config", str(manifests / "missing.yaml"))
    assert_one_line_error(done, str(manifests / "missing.yaml"))


def test_run_with_two_sources(manifests: Path) -> None:
    done = uproxy("run", "--manifests", str(manifests), "--kubeconfig", "/dev/null",
                  env={"UPROXY_MANAGE_IPTABLES": "false"})
    assert_one_line_error(done, "--manifests", "--kubeconfig")


V6 = """\
apiVersion: v1
kind: Service
metadata: {name: v6, namespace: default}
spec:
  clusterIP: fd00::10
  ports: [{port: 80}]
"""


def test_rules_with_a_port_range_too_small(manifests: Path) -> None:
    done = uproxy("rules", "--manifests", str(manifests), "--proxy-port-range", "40000-40000")
    assert_one_line_error(done, "40000-40000")


def test_rules_prints_both_families(manifests: Path) -> None:
    (manifests / "v6.yaml").write_text(V6)
    done = uproxy("rules", "--manifests", str(manifests), "--interception", "iptables")
    assert done.returncode == 0, done.stderr
    v4, _, v6 = done.stdout.partition("# ip6tables-restore --noflush (IPv6)\n")
    assert "-d fd00::10/128" not in v4 and "-d 10." in v4
    body6 = v6.splitlines()
    assert body6[:2] == ["*nat", ":UPROXY-SERVICES - [0:0]"] and body6[-1] == "COMMIT"
    [rule] = [ln.rsplit(" ", 1) for ln in body6 if "fd00::10" in ln]
    assert rule[0] == ('-A UPROXY-SERVICES -d fd00::10/128 -p tcp -m comment --comment '
                       '"default/v6: cluster IP" -m tcp --dport 80 -j REDIRECT --to-ports')
    assert 40000 <= int(rule[1]) < 50000
    assert KEEP_NAT_V6 in body6 and "-d 10." not in v6


def test_rules_prints_both_families_nft(manifests: Path) -> None:
    (manifests / "v6.yaml").write_text(V6)
    done = uproxy("rules", "--manifests", str(manifests), "--interception", "nftables")
    assert done.returncode == 0, done.stderr
    v4, _, v6 = done.stdout.partition("# nft -f (IPv6)\n")
    v6 = v6.partition("# transparent mode")[0]
    assert "table ip uproxy {" in v4 and "table ip6 uproxy {" in v6
    assert [e[1] for e in nftrules.parse_elements(v4)] == ["10.0.0.180", "10.0.0.180"]
    [(comment, address, port, proto, to_port)] = nftrules.parse_elements(v6)
    assert (comment, address, port, proto) == ("default/v6: cluster IP", "fd00::10", 80, "TCP")
    assert 40000 <= to_port < 50000 and "ip6 daddr . meta l4proto" in v6


def test_run_with_nftables_asked_for_but_missing(manifests: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("run checks for root before it looks for nft")
    bin_dir = tmp_path / "bin"  # iptables but no nft on the PATH
    bin_dir.mkdir()
    for tool in ("iptables", "iptables-save", "iptables-restore"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    done = uproxy("run", "--manifests", str(manifests), "--interception", "nftables",
                  env={"PATH": str(bin_dir)})
    assert_one_line_error(done, "--interception nftables", "nft not found")
