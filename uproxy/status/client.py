"""``uproxy get services|endpoints|connections``: kubectl-style tables from the status API.

The client only reads the JSON API (stdlib ``urllib``, bounded timeout), so
it works against any running uproxy it can reach and needs no event loop.
The tables follow ``kubectl get``: upper-case headers, columns padded to the
widest cell plus three spaces, ``<none>`` for empty cells and kubectl's
human-readable ages (``9s``, ``6m49s``, ``11m``, ``1h``, ``2d``).

Columns: services ``NAME TYPE CLUSTER-IP EXTERNAL-IP PORT(S) AGE``; endpoints
``NAME ENDPOINTS AGE``; connections ``CLIENT SERVICE BACKEND PROTO AGE
BYTES-IN BYTES-OUT STATE PATH`` where BYTES-IN is what the client sent and
BYTES-OUT what it received. A NAMESPACE column is added (first) with ``-o
wide`` or when objects from several namespaces are listed; ``-o wide`` adds
SELECTOR and PROXY-PORT(S) to services, prints every endpoint (and a second
table of each endpoint's traffic: ``ENDPOINT SERVICE READY OPEN CONNECTIONS
FAILED BYTES-IN BYTES-OUT UDP-FLOWS``, CONNECTIONS counting TCP connections
since start and UDP-FLOWS the flows held now), and adds ID and SCOPE to
connections with exact byte counts.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO

from uproxy.status.views import endpoints_column

TIMEOUT = 5.0
PADDING = 3
ALIASES = {"svc": "services", "ep": "endpoints", "conn": "connections"}


class Unreachable(Exception):
    """The status server could not be reached or answered badly: one line for the user."""


def human_duration(seconds: float | None) -> str:
    """kubectl's ages: ``45s``, ``2m3s``, ``11m``, ``3h2m``, ``20h``, ``3d4h``, ``2y5d``."""
    if seconds is None:
        return "<unknown>"
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        years, days = hours // 24 // 365, (hours // 24) % 365
        return f"{years}y{days}d" if days else f"{years}y"
    return f"{hours // 24 // 365}y"


def human_bytes(n: int) -> str:
    """``512``, ``12.0Ki``, ``3.4Mi``, ``1.2Gi`` (binary units, as Kubernetes quantities)."""
    value = float(n)
    for unit in ("", "Ki", "Mi", "Gi", "Ti"):
        if value < 1024 or unit == "Ti":
            return f"{n}" if not unit else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to the widest cell plus three spaces; the last column is not padded."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(widths[i] + PADDING) for i, cell in enumerate(row[:-1])]
        lines.append(("".join(cells) + str(row[-1])).rstrip())
    return "\n".join(lines) + "\n"


def _or_none(values: Sequence[str]) -> str:
    return ",".join(values) if values else "<none>"


def _ports_column(ports: list[dict[str, Any]]) -> str:
    out = []
    for p in ports:
        node = f":{p['nodePort']}" if p.get("nodePort") else ""
        out.append(f"{p.get('port')}{node}/{p.get('protocol') or 'TCP'}")
    return _or_none(out)


def _external_ip(item: dict[str, Any]) -> str:
    if item.get("type") == "ExternalName":
        return str(item.get("externalName") or "<none>")
    addresses = [*item.get("loadBalancerIPs", []), *item.get("externalIPs", [])]
    if item.get("type") == "LoadBalancer" and not item.get("loadBalancerIPs"):
        return ",".join(["<pending>", *item.get("externalIPs", [])])
    return _or_none(addresses)


def _selector(item: dict[str, Any]) -> str:
    selector = item.get("selector") or {}
    return _or_none([f"{k}={v}" for k, v in sorted(selector.items())])


def _with_namespace(items: list[dict[str, Any]], wide: bool) -> bool:
    return wide or len({i.get("namespace") for i in items}) > 1


def _proxy_ports(port: dict[str, Any]) -> str:
    """``40001``, or one port per family (``40001,40002``) for a dual-stack service port."""
    per_family = port.get("proxyPorts") or {}
    return ",".join(str(per_family[f]) for f in ("IPv4", "IPv6") if f in per_family) \
        or str(port["proxyPort"])


def services_table(data: dict[str, Any], *, wide: bool = False) -> str:
    items = data.get("items", [])
    ns = _with_namespace(items, wide)
    header = ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    if wide:
        header += ["SELECTOR", "PROXY-PORT(S)", "CLUSTER-IPS"]
    rows = []
    for item in items:
        row = [item["name"], item.get("type") or "ClusterIP",
               item.get("clusterIP") or "<none>", _external_ip(item),
               _ports_column(item.get("ports", [])), human_duration(item.get("age"))]
        if wide:
            proxied = [f"{p['port']}->{_proxy_ports(p)}/{p.get('protocol') or 'TCP'}"
                       for p in item.get("ports", []) if p.get("proxyPort")]
            row += [_selector(item), _or_none(proxied), _or_none(item.get("clusterIPs") or [])]
        rows.append(([item.get("namespace", "")] if ns else []) + row)
    return format_table((["NAMESPACE"] if ns else []) + header, rows)


def endpoints_table(data: dict[str, Any], *, wide: bool = False) -> str:
    items = data.get("items", [])
    ns = _with_namespace(items, wide)
    header = ["NAME", "ENDPOINTS", "AGE"]
    if wide:
        header += ["NOT-READY"]
    rows = []
    for item in items:
        addresses = item.get("addresses", [])
        row = [item["name"], endpoints_column(addresses, limit=None if wide else 3),
               human_duration(item.get("age"))]
        if wide:
            not_ready = sorted({f"{e['ip']}:{e['port']}" for e in item.get("endpoints", [])
                                if not e.get("ready")})
            row.append(_or_none(not_ready))
        rows.append(([item.get("namespace", "")] if ns else []) + row)
    table = format_table((["NAMESPACE"] if ns else []) + header, rows)
    return table + "\n" + endpoint_traffic_table(items) if wide else table


def endpoint_traffic_table(items: list[dict[str, Any]]) -> str:
    """One row per endpoint of each service port, with its counters (``-o wide``)."""
    header = ["NAMESPACE", "NAME", "ENDPOINT", "PORT", "READY", "OPEN", "CONNECTIONS",
              "FAILED", "BYTES-IN", "BYTES-OUT", "UDP-FLOWS"]
    rows = []
    for item in items:
        for e in item.get("endpoints", []):
            t = e.get("traffic") or {}
            host = f"[{e['ip']}]" if ":" in str(e["ip"]) else str(e["ip"])
            rows.append([item.get("namespace", ""), item["name"], f"{host}:{e['port']}",
                         f"{e.get('portName') or '<unset>'}/{e.get('protocol') or 'TCP'}",
                         "true" if e.get("ready") else "false", str(t.get("open", 0)),
                         str(t.get("opened", 0)), str(t.get("failed", 0)),
                         str(t.get("bytesUp", 0)), str(t.get("bytesDown", 0)),
                         str(t.get("udpFlows", 0))])
    return format_table(header, rows)


def connections_table(data: dict[str, Any], *, wide: bool = False) -> str:
    header = ["CLIENT", "SERVICE", "BACKEND", "PROTO", "AGE", "BYTES-IN", "BYTES-OUT", "STATE",
              "PATH"]
    if wide:
        header = ["ID", *header, "SCOPE"]
    rows = []
    size = (lambda n: str(n)) if wide else human_bytes
    for c in data.get("items", []):
        row = [c["client"], c["service"], c.get("backend") or "<none>", c["protocol"],
               human_duration(c.get("age")), size(int(c.get("bytes_up", 0))),
               size(int(c.get("bytes_down", 0))), c["state"],
               "native" if c.get("native") else "python"]
        if wide:
            row = [str(c["id"]), *row, c.get("scope", "")]
        rows.append(row)
    return format_table(header, rows)


TABLES = {"services": services_table, "endpoints": endpoints_table,
          "connections": connections_table}


def fetch(status: str, path: str, *, timeout: float = TIMEOUT) -> dict[str, Any]:
    """GET ``status`` + ``path`` as JSON; any failure is an :class:`Unreachable`."""
    base = status if "://" in status else f"http://{status}"
    url = base.rstrip("/") + path
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise Unreachable(f"{status!r} is not an http(s) URL")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise Unreachable(f"HTTP {exc.code} {exc.reason} for {path}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        text = getattr(reason, "strerror", None) or str(reason)
        raise Unreachable(text) from None
    except TimeoutError:
        raise Unreachable(f"no answer within {timeout:g}s") from None
    except (OSError, ValueError) as exc:
        raise Unreachable(getattr(exc, "strerror", None) or str(exc)) from None
    try:
        data = json.loads(body)
    except ValueError:
        raise Unreachable(f"{path} did not return JSON (is this a uproxy status server?)") from None
    if not isinstance(data, dict):
        raise Unreachable(f"{path} returned unexpected JSON (is this a uproxy status server?)")
    return data


def get(what: str, *, status: str, output: str | None, out: TextIO | None = None,
        err: TextIO | None = None) -> int:
    """``uproxy get``: print the table (or JSON); 1 when the status server is unreachable."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    kind = ALIASES.get(what, what)
    if kind not in TABLES:
        print(f"uproxy: unknown resource {what!r} (services, endpoints, connections)", file=err)
        return 2
    try:
        data = fetch(status, f"/api/v1/{kind}")
    except Unreachable as exc:
        print(f"uproxy: cannot reach the status server at {status}: {exc}", file=err)
        return 1
    if output == "json":
        out.write(json.dumps(data, indent=2) + "\n")
        return 0
    if not data.get("items"):
        print("No resources found.", file=err)
        return 0
    out.write(TABLES[kind](data, wide=output == "wide"))
    if kind == "connections" and data.get("matched", 0) > len(data["items"]):
        print(f"(showing {len(data['items'])} of {data['matched']} connections)", file=err)
    return 0
