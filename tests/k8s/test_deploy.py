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

from uproxy.sources.kube import WATCHED

REPO = Path(__file__).parents[2]
DEPLOY = REPO / "deploy"
DESIGN = REPO.parent / "shared" / "DESIGN.md"
HEALTHZ_PORT = 10256
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
    assert [p["containerPort"] for p in c["ports"]] == [HEALTHZ_PORT]
    healthz = _flags(c["args"]).get("--healthz-address")
    assert healthz is not None and healthz.rsplit(":", 1)[1] == str(HEALTHZ_PORT)


def test_daemonset_flags_are_in_the_cli_contract() -> None:
    if not DESIGN.is_file():
        pytest.skip(f"{DESIGN} not present: cannot read the command-line contract")
    text = DESIGN.read_text()
    section = text.split("## Command-line contract", 1)[1].split("\n## ", 1)[0]
    contract = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-v)\b", section))
    assert "--hostname-override" in contract  # the contract was found at all
    used = set(_flags(_container()["args"]))
    assert used <= contract, f"not in DESIGN.md's contract: {sorted(used - contract)}"


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
    assert {"iptables", "conntrack"} <= set(install.group(0).split())
    assert "pip install" in final and "uproxy" in final
    # everything the build stage copies from the repository exists
    for line in re.findall(r"^COPY\s+(?!--)(.+)$", text, re.M):
        for copied in line.split()[:-1]:
            assert (REPO / copied).exists(), f"Dockerfile copies missing {copied}"
