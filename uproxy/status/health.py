"""kube-proxy's health answers, byte for byte: ``/healthz``, ``/livez`` and the
health-check node port (pure: values in, status and body out).

* ``/healthz`` and ``/livez`` (``pkg/proxy/healthcheck/proxier_health.go``): Go's
  ``json.Marshal`` of ProxyHealth, fields in this order, no trailing newline::

    {"lastUpdated":"…","currentTime":"…","nodeEligible":true,"healthy":true,
     "status":{"IPv4":{"lastUpdated":"…","healthy":true}}}

  ``healthy`` is the proxy's own health (no update waited more than twice the sync
  period); ``/healthz`` answers 503 when that is false or the node is not eligible (being
  deleted, or tainted ToBeDeletedByClusterAutoscaler), ``/livez`` ignores the node and
  has no ``nodeEligible``. On a 200 the top ``lastUpdated`` is *now* (kube-proxy's
  compatibility trick); the per-family one is the last sync's. ``status`` is absent
  before the first sync. uproxy syncs all families in one pass, so every family it serves
  shows the same values. Unlike the newest kube-proxy, a node whose Node object was never
  seen (``--manifests`` without a ``kind: Node``) counts as eligible, as kube-proxy did
  before 1.29.
* the health-check node port (``service_health.go``): any path and method, 200 when the
  service has local ready endpoints and the proxy is healthy, else 503, with
  ``X-Load-Balancing-Endpoint-Weight`` and a tab-indented body without a final newline.

Times are Go's RFC3339Nano in UTC: fractional seconds without trailing zeros.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable

from uproxy.model import Endpoint

GO_ZERO_TIME = "0001-01-01T00:00:00Z"
JSON_HEADERS = {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff"}


def go_time(when: float | None) -> str:
    """Seconds since the epoch -> Go's RFC3339Nano in UTC; None -> Go's zero time."""
    if when is None:
        return GO_ZERO_TIME
    nanos = round(when * 1e6) * 1000  # a float holds microseconds, not nanoseconds
    seconds, frac = divmod(nanos, 1_000_000_000)
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f".{frac:09d}".rstrip("0") if frac else ""
    return f"{stamp}{fraction}Z"


def proxy_health(*, healthy: bool, last_sync: float | None, now: float,
                 node_eligible: bool | None, families: Iterable[str] = ("IPv4",),
                 ) -> tuple[int, bytes]:
    """``/healthz`` (``node_eligible`` given) or ``/livez`` (None): status and body."""
    ok = healthy and node_eligible is not False
    body: dict[str, object] = {
        "lastUpdated": go_time(now if ok else last_sync),
        "currentTime": go_time(now),
    }
    if node_eligible is not None:
        body["nodeEligible"] = node_eligible
    body["healthy"] = healthy
    if last_sync is not None:
        body["status"] = {family: {"lastUpdated": go_time(last_sync), "healthy": healthy}
                          for family in sorted(families)}
    return (200 if ok else 503), json.dumps(body, separators=(",", ":")).encode()


def service_health(namespace: str, name: str, local_endpoints: int,
                   proxy_healthy: bool) -> tuple[int, dict[str, str], bytes]:
    """The health-check node port's answer: status, headers (in kube-proxy's order), body."""
    body = (
        "{\n"
        '\t"service": {\n'
        f"\t\t\"namespace\": {json.dumps(namespace)},\n"
        f"\t\t\"name\": {json.dumps(name)}\n"
        "\t},\n"
        f'\t"localEndpoints": {local_endpoints},\n'
        f'\t"serviceProxyHealthy": {"true" if proxy_healthy else "false"}\n'
        "}"
    )
    headers = {**JSON_HEADERS, "X-Load-Balancing-Endpoint-Weight": str(local_endpoints)}
    status = 200 if local_endpoints and proxy_healthy else 503
    return status, headers, body.encode()


def local_ready_count(endpoints: Iterable[Endpoint], node_name: str) -> int:
    """kube-proxy's ``localEndpoints``: ready endpoints on this node, by IP across all the
    service's ports (a pod serving two ports counts once; terminating ones never count)."""
    return len({e.ip for e in endpoints if e.ready and e.node_name == node_name})
