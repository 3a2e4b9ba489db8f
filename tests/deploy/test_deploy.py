"""deploy/ stays consistent with the code: flags, ports, RBAC, image.

The manifests cannot be applied here (no cluster), so these tests check what
would break on a real one: a flag the CLI contract does not know, a probe on
the wrong port, RBAC that misses (or over-grants) what the watcher requests.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from uproxy.cli import build_parser, settings_from_args
from uproxy.settings import Settings
from uproxy.sources.kube import WATCHED

REPO = Path(__file__).parents[2]
DEPLOY = REPO / "deploy"
HEALTHZ_PORT = 10256
# The names the design fixes for ``uproxy run`` ("keep these names stable; add, don't
# rename"; kube-proxy's where it has one). Written here so that the test needs nothing
# outside the repository; a manifest may use only these, and only as ``uproxy run`` parses.
CONTRACT = frozenset({
    "--manifests", "--kubeconfig", "--master", "--hostname-override", "--bind-address",
    "--nodeport-addresses", "--proxy-port-range", "--udp-timeout", "--sync-period",
    "--min-sync-period", "--service-proxy-name", "--masquerade-all", "--state-dir",
    "--status-address", "--healthz-address", "--loop", "--config", "--log-format", "-v",
})
# Granted besides WATCHED: v1 Endpoints, for selector-less services written by hand.
EXTRA_READ = {("", "endpoints")}


def _docs() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append(doc)
    return out


def _one(kind: str) -> dict[str, Any]:
    found = [d for d in _docs() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    containers = _one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _flags(args: list[str]) -> dict[str, str | None]:
    flags: dict[str, str | None] = {}
    for i, arg in enumerate(args):
        if not arg.startswith("-"):
            continue
        name, eq, value = arg.partition("=")
        if eq:
            flags[name] = value
        elif i + 1 < len(args) and not args[i + 1].startswith("-"):
            flags[name] = args[i + 1]
        else:
            flags[name] = None
    return flags


def test_manifests_parse_and_name_themselves() -> None:
    docs = _docs()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "ServiceAccount"]
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"] == "uproxy"
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        assert (DEPLOY / name).is_file(), name
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}


def test_daemonset_runs_uproxy_on_the_node() -> None:
    ds = _one("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert (
        ds["spec"]["selector"]["matchLabels"].items()
        <= ds["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["serviceAccountName"] == _one("ServiceAccount")["metadata"]["name"]
    c = _container()
    caps = c["securityContext"]["capabilities"]["add"]
    assert {"NET_ADMIN", "NET_RAW"} <= set(caps)
    # node name from the downward API, handed to --hostname-override
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    command = c.get("command", []) + c["args"]
    assert command[:2] == ["uproxy", "run"]
    assert _flags(c["args"])["--hostname-override"] == "$(NODE_NAME)"
    # the xtables lock is the host's, shared with every other iptables user
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    lock = [name for name, path in mounts.items() if path == "/run/xtables.lock"]
    assert lock and volumes[lock[0]]["hostPath"]["path"] == "/run/xtables.lock"
    assert volumes[lock[0]]["hostPath"]["type"] == "FileOrCreate"


def test_health_ports_match() -> None:
    c = _container()
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": HEALTHZ_PORT}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": HEALTHZ_PORT}
    assert "ports" not in c  # with hostNetwork a port is a hostPort: no surge pod could start
    healthz = _flags(c["args"]).get("--healthz-address")
    assert healthz is not None and healthz.rsplit(":", 1)[1] == str(HEALTHZ_PORT)


def _run_settings(argv: list[str]) -> Settings:
    """``argv`` (after ``uproxy``) read as ``uproxy run`` reads it: the parser, then the
    settings loader, so an unknown flag or a bad value fails here as it would at start."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"uproxy refuses the DaemonSet's arguments: {argv}", pytrace=False)
    return settings_from_args(args)


def test_daemonset_flags_are_in_the_cli_contract() -> None:
    c = _container()
    used = set(_flags(c["args"]))
    assert "--hostname-override" in used  # the flags were found at all
    assert used <= CONTRACT, f"not in the command-line contract: {sorted(used - CONTRACT)}"
    argv = (c.get("command", []) + c["args"])[1:]  # after "uproxy": run and its flags
    settings = _run_settings(argv)
    assert settings.hostname_override == "$(NODE_NAME)"
    assert settings.healthz_address[1] == HEALTHZ_PORT


def test_rbac_covers_exactly_what_the_watcher_requests() -> None:
    role = _one("ClusterRole")
    read: dict[tuple[str, str], set[str]] = {}
    write: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        verbs = set(rule["verbs"])
        assert "*" not in verbs
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource)
                target = read if verbs <= {"get", "list", "watch"} else write
                target.setdefault((group, resource), set()).update(verbs)
    wanted = {(group, resource) for group, _version, resource in WATCHED}
    assert set(read) == wanted | EXTRA_READ
    assert all(verbs == {"list", "watch"} for verbs in read.values()), read
    events = {"create", "patch"}
    assert write == {("", "events"): events, ("events.k8s.io", "events"): events}

    binding = _one("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    account = _one("ServiceAccount")
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]
    assert _one("DaemonSet")["metadata"]["namespace"] == account["metadata"]["namespace"]


def test_dockerfile_builds_from_python_slim_with_iptables_and_conntrack() -> None:
    # One image for the DaemonSet and the compose stack: the top-level Dockerfile.
    assert not (DEPLOY / "Dockerfile").exists()
    text = (REPO / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f == "python:3.11-slim" for f in froms)
    final = text.rsplit("\nFROM ", 1)[1]
    install = re.search(r"apt-get install[^\n]*\n?[^\n]*", final)
    assert install is not None
    assert {"iptables", "conntrack", "iproute2", "nftables"} <= set(install.group(0).split())
    assert "pip install" in final and "uproxy" in final
    # everything the build stage copies from the repository exists
    for line in re.findall(r"^COPY\s+(?!--)(.+)$", text, re.M):
        for copied in line.split()[:-1]:
            assert (REPO / copied).exists(), f"Dockerfile copies missing {copied}"


def test_a_rollout_is_a_takeover_on_every_node() -> None:
    """maxSurge 1 / maxUnavailable 0 starts the new pod beside the old one; both see the
    same state directory on the host, and the old one idles after handing over."""
    ds = _one("DaemonSet")
    rolling = ds["spec"]["updateStrategy"]["rollingUpdate"]
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (1, 0)
    c = _container()
    state_dir = _flags(c["args"])["--state-dir"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts[state_dir]]["hostPath"] == {"path": state_dir,
                                                      "type": "DirectoryOrCreate"}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert _run_settings(["run", *c["args"][1:]]).state_dir == state_dir
    assert env["UPROXY_AFTER_HANDOVER"] == "wait"
