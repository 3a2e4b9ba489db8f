"""deploy/monitoring/ stays consistent with what uproxy exports: the PodMonitor finds the pods
and the port, and every query of the Grafana dashboard names metrics (and labels) that uproxy
really exports. kubernetes-mixin's kube-proxy dashboard is checked the same way: the panels the
README says work unchanged must, the others must not (so the README cannot go stale).

No cluster here: the overlay's JSON patch is applied by a small function that does what
kustomize would (test, replace, add)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from uproxy.cli import build_parser, settings_from_args
from uproxy.connections import ConnTable
from uproxy.metrics import Metrics
from uproxy.status.collect import register_live_collector

REPO = Path(__file__).parents[2]
MONITORING = REPO / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"

# kubernetes-mixin's kube-proxy dashboard (dashboards/proxy.libsonnet): each panel and the
# metrics its queries use, with its selector job="kube-proxy".
MIXIN_KUBE_PROXY = {
    "Up": {"up"},
    "Rules Sync Rate": {"kubeproxy_sync_proxy_rules_duration_seconds_count"},
    "Rule Sync Latency 99th Quantile": {"kubeproxy_sync_proxy_rules_duration_seconds_bucket"},
    "Network Programming Rate": {"kubeproxy_network_programming_duration_seconds_count"},
    "Network Programming Latency 99th Quantile": {
        "kubeproxy_network_programming_duration_seconds_bucket"},
    "Kube API Request Rate": {"rest_client_requests_total"},
    "Post Request Latency 99th Quantile": {"rest_client_request_duration_seconds_bucket"},
    "Get Request Latency 99th Quantile": {"rest_client_request_duration_seconds_bucket"},
    "Memory": {"process_resident_memory_bytes"},
    "CPU usage": {"process_cpu_seconds_total"},
    "Goroutines": {"go_goroutines"},
}
# Prometheus adds these itself for every target.
SYNTHETIC = {"up": set(), "scrape_duration_seconds": set()}
TARGET_LABELS = {"job", "instance", "node", "le"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset", "sum", "min", "max", "avg", "count", "group", "stddev",
            "stdvar", "topk", "bottomk", "quantile", "count_values"}  # aggregations take by()


def exported() -> dict[str, set[str]]:
    """Every sample name uproxy's /metrics can carry, with its label names."""
    metrics = Metrics()
    register_live_collector(metrics.registry, ConnTable())
    registry: CollectorRegistry = metrics.registry
    out: dict[str, set[str]] = dict(SYNTHETIC)
    for collector in list(registry._collector_to_names):  # every family, sampled or not
        describe = getattr(collector, "describe", None)
        families = list(describe()) if describe else list(collector.collect())
        for family in families:
            labels = set(getattr(family, "_labelnames", ()))
            labels |= set(getattr(collector, "_labelnames", ()))
            for sample in family.samples:
                labels |= set(sample.labels)
            if family.type == "counter":
                names = [family.name + "_total"]
            elif family.type == "histogram":
                names = [family.name + s for s in ("_bucket", "_count", "_sum")]
                labels.add("le")
            else:
                names = [family.name]
            for name in names:
                out.setdefault(name, set()).update(labels)
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, keywords or labels)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1 ",
                  text)
    names = set()
    for m in re.finditer(r"(?<![\w$])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        if m.group(2) or m.group(1) in KEYWORDS:
            continue
        names.add(m.group(1))
    return names


def label_names(expr: str) -> set[str]:
    """Label names in matchers and in by/without/on/ignoring clauses."""
    labels = set()
    for block in re.findall(r"\{([^}]*)\}", re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)):
        labels.update(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", block))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels.update(n.strip() for n in group.split(",") if n.strip())
    return labels


def test_the_parser_finds_names_and_skips_the_rest() -> None:
    expr = ('histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{job="x", '
            'instance=~"$i"}[5m]))) / ignoring(endpoint) group_left sum(b_total) - time()')
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert label_names(expr) == {"job", "instance", "le", "endpoint"}


def dashboard_exprs() -> list[tuple[str, str]]:
    data = json.loads(DASHBOARD.read_text())
    out = []
    for panel in data["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for variable in data["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            m = re.fullmatch(r"label_values\((.*), (\w+)\)", query)
            assert m, query
            out.append((f"${variable['name']}", m[1]))
    return out


def test_dashboard_queries_use_only_exported_metrics_and_labels() -> None:
    names = exported()
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    used: set[str] = set()
    for title, expr in exprs:
        found = metric_names(expr)
        assert found, (title, expr)
        missing = found - set(names)
        assert not missing, f"{title}: {sorted(missing)} not exported by uproxy"
        known = set().union(*(names[n] for n in found)) | TARGET_LABELS
        unknown = label_names(expr) - known
        assert not unknown, f"{title}: labels {sorted(unknown)} not on {sorted(found)}"
        used |= found
    # The dashboard shows the traffic views: per service port and per endpoint.
    assert {"uproxy_connections_total", "uproxy_endpoint_connections_total",
            "uproxy_endpoint_bytes_total", "uproxy_endpoint_connections_active",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket"} <= used


def test_kube_proxy_mixin_panels_that_work_unchanged_are_the_ones_the_readme_lists() -> None:
    names = set(exported())
    working = {title for title, needs in MIXIN_KUBE_PROXY.items() if needs <= names}
    assert working == {"Up", "Rules Sync Rate", "Rule Sync Latency 99th Quantile",
                       "Network Programming Rate", "Network Programming Latency 99th Quantile",
                       "Memory", "CPU usage"}
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Prometheus and Grafana", 1)[1].split("\n## ", 1)[0]
    bullets = [" ".join(b.split()) for b in section.split("\n- ")[1:]]
    for title in MIXIN_KUBE_PROXY:
        bullet = next((b for b in bullets if f"*{title}*" in b), None)
        assert bullet is not None, f"the README does not say whether {title!r} works"
        assert bullet.startswith("works" if title in working else "does not"), bullet


def _apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = op["path"].strip("/").split("/")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] == "test":
            assert (node[int(last)] if isinstance(node, list) else node[last]) == op["value"], op
        elif op["op"] == "replace":
            if isinstance(node, list):
                node[int(last)] = op["value"]
            else:
                node[last] = op["value"]
        elif op["op"] == "add" and last == "-":
            node.append(op["value"])
        else:
            raise AssertionError(f"unexpected patch op {op}")
    return doc


def test_podmonitor_finds_the_pods_and_their_metrics_port() -> None:
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../", "podmonitor.yaml"]
    (patch,) = kustomization["patches"]
    daemonset = yaml.safe_load((REPO / "deploy" / "daemonset.yaml").read_text())
    patched = _apply_json_patch(daemonset, yaml.safe_load(patch["patch"]))
    container = patched["spec"]["template"]["spec"]["containers"][0]
    assert "ports" not in container  # hostNetwork: a declared port would be a hostPort

    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert monitor["kind"] == "PodMonitor"
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = patched["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [
        patched["metadata"]["namespace"]]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    # The port the PodMonitor scrapes is where the patched args put the status server.
    args = settings_from_args(build_parser().parse_args(
        [a.replace("$(NODE_NAME)", "node-1").replace("$(POD_IP)", "192.0.2.7")
         for a in container["args"]]))
    address = next(r for r in endpoint["relabelings"] if r["targetLabel"] == "__address__")
    assert address["sourceLabels"] == ["__meta_kubernetes_pod_ip"]
    host, port = address["replacement"].replace("$1", "192.0.2.7").rsplit(":", 1)
    assert args.status_address == (host, int(port))
    assert any(e["name"] == "POD_IP" and e["valueFrom"]["fieldRef"]["fieldPath"] ==
               "status.podIP" for e in container["env"])
    # The job label kubernetes-mixin selects kube-proxy by.
    assert {"targetLabel": "job", "replacement": "kube-proxy"} in endpoint["relabelings"]
    (generated,) = kustomization["configMapGenerator"]
    assert generated["options"]["labels"] == {"grafana_dashboard": "1"}
    (source,) = generated["files"]
    assert (MONITORING / source.split("=", 1)[1]).is_file()
