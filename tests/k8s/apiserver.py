"""A fake Kubernetes API server that speaks the real list+watch protocol over HTTP.

Tests drive the real client (kubernetes_asyncio's transport in
``uproxy.sources.kube``) against it, so nothing in the client is patched.
It keeps what matters for a watcher and nothing else: one increasing
resourceVersion across kinds (as etcd), paged lists with ``limit``/``continue``
served from a snapshot, newline-delimited watch events from a resourceVersion,
bookmarks, server-side ``timeoutSeconds``, a bounded event history so that a
too-old version gets ``410 Gone``, and ``fieldSelector`` on name/namespace.

Test controls are plain methods: mutate objects, drop or stall streams, fail
the next N requests (500, 429 with Retry-After), compact the history, and
outages (503 for a while, or the port closed). Every request is recorded in
:attr:`FakeApiServer.requests`. Runs in-process on the test's event loop.

Run as a program (``python -m tests.k8s.apiserver``), e.g. inside a lab's node
namespace where the real daemon can reach it, the same controls are offered on
a separate HTTP app on a unix socket (``--control PATH``; :class:`Control` is
its client). A pathname unix socket is reachable from every network namespace,
so the test drives the server from the root namespace without sending a packet,
and the API port itself stays protocol-true (no extra routes, no auth bypass).
Controls arrive as a list of operations applied in order with no ``await``
between them, so "cut the streams, delete, compact" is atomic for watchers, as
it is when a test calls the methods in-process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import http.client
import itertools
import json
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

TOKEN = "uproxy-test-token"

# plural -> (kind, apiVersion, namespaced, path)
RESOURCES: dict[str, tuple[str, str, bool, str]] = {
    "services": ("Service", "v1", True, "/api/v1/services"),
    "endpointslices": (
        "EndpointSlice",
        "discovery.k8s.io/v1",
        True,
        "/apis/discovery.k8s.io/v1/endpointslices",
    ),
    "nodes": ("Node", "v1", False, "/api/v1/nodes"),
}
PLURAL_OF_KIND = {kind: plural for plural, (kind, *_rest) in RESOURCES.items()}

Obj = dict[str, Any]
Key = tuple[str, str]


@dataclass
class Request:
    """One request the server saw."""

    path: str
    query: dict[str, str]
    at: float
    status: int = 200  # what the middleware answered itself (401, 503, injected), else 200

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")

    @property
    def resource(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(eq=False)
class _Watcher:
    plural: str
    field_selector: dict[str, str]
    queue: asyncio.Queue[tuple[str, Obj] | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[Any] | None = None


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _parse_selector(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip().rstrip("=")] = v.strip().lstrip("=")
    return out


def _matches(obj: Obj, selector: dict[str, str]) -> bool:
    meta = obj.get("metadata") or {}
    for k, v in selector.items():
        if k == "metadata.name" and meta.get("name") != v:
            return False
        if k == "metadata.namespace" and meta.get("namespace") != v:
            return False
    return True


class FakeApiServer:
    """The fake server; ``await start()``, use the controls, ``await stop()``."""

    def __init__(self, *, history_size: int = 1000, bookmark_interval: float = 60.0) -> None:
        self.history_size = history_size
        self.bookmark_interval = bookmark_interval
        self.requests: list[Request] = []
        self.stalled = False
        self._rv = 100
        self._floor = self._rv  # watches from a version below this get 410
        self._history: deque[tuple[int, str, str, Obj]] = deque()
        self._objects: dict[str, dict[Key, Obj]] = {p: {} for p in RESOURCES}
        self._snapshots: dict[str, tuple[int, list[Obj]]] = {}
        self._watchers: set[_Watcher] = set()
        self._fail: list[tuple[int, float | None]] = []  # (status, retry_after) per next request
        self._outage_until = 0.0
        self._held: dict[str, asyncio.Event] = {}
        self.compact_on_continue = 0  # compact before serving this many continue pages
        self._runner: web.AppRunner | None = None
        self._control_runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._reopen: asyncio.Task[None] | None = None
        self.port = 0

    # --- lifecycle --------------------------------------------------------------

    async def start(self, *, control: Path | None = None) -> None:
        """Listen on 127.0.0.1 (``port``, 0 = any); with ``control``, also serve the controls."""
        app = web.Application(middlewares=[self._middleware])
        for plural, (*_rest, path) in RESOURCES.items():
            app.router.add_get(path, self._make_handler(plural))
        self._runner = web.AppRunner(
            app, shutdown_timeout=0.5, handler_cancellation=True, access_log=None
        )
        await self._runner.setup()
        await self._open_port()
        if control is not None:
            capp = web.Application(client_max_size=256 << 20)
            capp.router.add_post("/ops", self._control_ops)
            capp.router.add_get("/requests", self._control_requests)
            capp.router.add_get("/state", self._control_state)
            self._control_runner = web.AppRunner(capp, shutdown_timeout=0.5, access_log=None)
            await self._control_runner.setup()
            with contextlib.suppress(FileNotFoundError):
                control.unlink()
            await web.UnixSite(self._control_runner, str(control)).start()

    async def _open_port(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        if not self.port:
            sockets = getattr(self._site._server, "sockets", None)  # asyncio's or uvloop's
            assert sockets, "the site is not listening"
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._reopen is not None:
            self._reopen.cancel()
        self.drop_streams()
        if self._control_runner is not None:
            await self._control_runner.cleanup()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path) -> Path:
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "test"}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(doc, indent=1))  # JSON is YAML
        return path

    # --- objects ------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    def create(self, obj: Obj) -> Obj:
        return self._put(obj, "ADDED")

    def update(self, obj: Obj) -> Obj:
        return self._put(obj, "MODIFIED")

    def apply(self, obj: Obj) -> Obj:
        """Create or update, whichever fits."""
        plural = PLURAL_OF_KIND[obj["kind"]]
        exists = self._key(plural, obj) in self._objects[plural]
        return self._put(obj, "MODIFIED" if exists else "ADDED")

    def delete(self, kind: str, namespace: str | None, name: str) -> None:
        plural = PLURAL_OF_KIND[kind]
        namespaced = RESOURCES[plural][2]
        key = ((namespace or "default") if namespaced else "", name)
        obj = self._objects[plural].pop(key)
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._bump())
        self._record(plural, "DELETED", obj)

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        plural = PLURAL_OF_KIND[kind]
        key = ((namespace or "default") if RESOURCES[plural][2] else "", name)
        found = self._objects[plural].get(key)
        return copy.deepcopy(found) if found is not None else None

    def _key(self, plural: str, obj: Obj) -> Key:
        meta = obj["metadata"]
        return ((meta.get("namespace") or "default") if RESOURCES[plural][2] else "", meta["name"])

    def _put(self, obj: Obj, event: str) -> Obj:
        plural = PLURAL_OF_KIND[obj["kind"]]
        kind, api_version, namespaced, _path = RESOURCES[plural]
        obj = copy.deepcopy(obj)
        obj["apiVersion"] = api_version
        meta = obj.setdefault("metadata", {})
        if namespaced:
            meta.setdefault("namespace", "default")
        key = self._key(plural, obj)
        old = self._objects[plural].get(key)
        if event == "ADDED" and old is not None:
            raise KeyError(f"{kind} {key} exists")
        if event == "MODIFIED" and old is None:
            raise KeyError(f"{kind} {key} does not exist")
        meta["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        meta["resourceVersion"] = str(self._bump())
        self._objects[plural][key] = obj
        self._record(plural, event, obj)
        return copy.deepcopy(obj)

    def _bump(self) -> int:
        self._rv += 1
        return self._rv

    def _record(self, plural: str, event: str, obj: Obj) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        self._history.append((rv, plural, event, copy.deepcopy(obj)))
        while len(self._history) > self.history_size:
            self._floor = self._history.popleft()[0]
        for w in list(self._watchers):
            if w.plural == plural and _matches(obj, w.field_selector):
                w.queue.put_nowait((event, copy.deepcopy(obj)))

    # --- test controls --------------------------------------------------------------

    def restore_from_backup(self, version: int) -> None:
        """Roll the version counter back (etcd restored): newer versions are 'too large'."""
        self._rv = version
        self._floor = min(self._floor, version)
        self._history = deque(e for e in self._history if e[0] <= version)

    def compact(self) -> None:
        """Forget all history (as etcd compaction): every version handed out so far gets 410.

        The counter moves on first (in etcd some write always happened meanwhile), so
        even a client that saw the very latest version must re-list.
        """
        self._bump()
        self._history.clear()
        self._floor = self._rv

    def drop_streams(self) -> None:
        """Cut every open watch connection abruptly."""
        for w in list(self._watchers):
            w.queue.put_nowait(None)

    def fail_next(self, count: int, status: int = 500, *, retry_after: float | None = None) -> None:
        """Answer the next ``count`` requests with ``status`` (429 carries Retry-After)."""
        self._fail.extend([(status, retry_after)] * count)

    def outage(self, seconds: float, *, refuse: bool = False) -> None:
        """An API outage: open streams are cut; then 503 (or the port closed) for ``seconds``."""
        self.drop_streams()
        # Keep-alive connections survive a closed port: they get 503 meanwhile.
        self._outage_until = time.monotonic() + seconds
        if not refuse:
            return

        async def closed_for_a_while() -> None:
            assert self._site is not None
            await self._site.stop()
            await asyncio.sleep(seconds)
            await self._open_port()

        self._reopen = asyncio.get_running_loop().create_task(closed_for_a_while())

    def hold_lists(self, resource: str) -> None:
        """Let list requests of ``resource`` wait (a slow server) until :meth:`release_lists`."""
        self._held[resource] = asyncio.Event()

    def release_lists(self, resource: str) -> None:
        self._held.pop(resource).set()

    def watchers(self) -> dict[str, int]:
        """Open watch streams per resource."""
        out = dict.fromkeys(RESOURCES, 0)
        for w in self._watchers:
            out[w.plural] += 1
        return out

    def run_ops(self, ops: list[Obj]) -> list[Any]:
        """Apply control operations in order, with no ``await`` between them.

        Each is ``{"op": NAME, ...}``: ``apply``/``create``/``update`` (``objects``: a
        list), ``delete`` (``kind``, ``namespace``, ``name``), ``get`` (same keys),
        ``drop``, ``compact``, ``fail`` (``count``, ``status``, ``retryAfter``),
        ``outage`` (``seconds``, ``refuse``), ``hold``/``release`` (``resource``),
        ``stall`` (``on``). Returns one result per operation (``get``: the object or
        None, object writes: their new resourceVersions, else None). Raises
        ValueError naming the first bad operation; the ones before it stay applied.
        """
        results: list[Any] = []
        for i, op in enumerate(ops):
            name = op.get("op") if isinstance(op, dict) else None
            try:
                results.append(self._run_op(str(name), op))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ValueError(f"operation {i} ({name}): {type(exc).__name__}: {exc}") from None
        return results

    def _run_op(self, name: str, op: Obj) -> Any:
        if name in ("apply", "create", "update"):
            write = {"apply": self.apply, "create": self.create, "update": self.update}[name]
            return [write(obj)["metadata"]["resourceVersion"] for obj in op["objects"]]
        if name in ("delete", "get"):
            what = (str(op["kind"]), op.get("namespace"), str(op["name"]))
            return self.delete(*what) if name == "delete" else self.get(*what)
        if name == "drop":
            self.drop_streams()
        elif name == "compact":
            self.compact()
        elif name == "fail":
            retry_after = op.get("retryAfter")
            self.fail_next(
                int(op.get("count", 1)),
                int(op.get("status", 500)),
                retry_after=None if retry_after is None else float(retry_after),
            )
        elif name == "outage":
            self.outage(float(op["seconds"]), refuse=bool(op.get("refuse", False)))
        elif name == "hold":
            self.hold_lists(str(op["resource"]))
        elif name == "release":
            self.release_lists(str(op["resource"]))
        elif name == "stall":
            self.stalled = bool(op.get("on", True))
        else:
            raise ValueError("unknown operation")
        return None

    async def _control_ops(self, request: web.Request) -> web.Response:
        try:
            ops = await request.json()
            if isinstance(ops, dict):
                ops = [ops]
            if not isinstance(ops, list):
                raise ValueError("the body must be a JSON list of operations")
            results = self.run_ops(ops)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"results": results, "resourceVersion": self._rv})

    async def _control_requests(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since") or 0)
        return web.json_response(
            [
                {"path": r.path, "query": r.query, "at": r.at, "status": r.status,
                 "watch": r.watch, "resource": r.resource}
                for r in self.requests[since:]
            ]
        )  # fmt: skip

    async def _control_state(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "resourceVersion": self._rv,
                "watchers": self.watchers(),
                "requests": len(self.requests),
                "held": sorted(self._held),
                "objects": {p: len(o) for p, o in self._objects.items()},
            }
        )

    def watch_requests(self, resource: str | None = None) -> list[Request]:
        return [r for r in self.requests if r.watch and resource in (None, r.resource)]

    def list_requests(self, resource: str | None = None) -> list[Request]:
        return [r for r in self.requests if not r.watch and resource in (None, r.resource)]

    # --- HTTP -------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        seen = Request(request.path, dict(request.query), time.monotonic())
        self.requests.append(seen)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            seen.status = 401
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        if time.monotonic() < self._outage_until:
            seen.status = 503
            return web.json_response(
                _status(503, "ServiceUnavailable", "the server is currently unable to handle it"),
                status=503,
            )
        if self._fail:
            status, retry_after = self._fail.pop(0)
            seen.status = status
            headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
            reason = {410: "Expired", 429: "TooManyRequests", 503: "ServiceUnavailable"}.get(
                status, "InternalError"
            )
            return web.json_response(
                _status(status, reason, f"injected {status}"), status=status, headers=headers
            )
        result: web.StreamResponse = await handler(request)
        return result

    def _make_handler(self, plural: str) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            if request.query.get("watch") in ("true", "1"):
                return await self._watch(request, plural)
            held = self._held.get(plural)
            if held is not None:
                await held.wait()
            return self._list(request, plural)

        return handle

    def _list(self, request: web.Request, plural: str) -> web.StreamResponse:
        kind, api_version, _ns, _path = RESOURCES[plural]
        selector = _parse_selector(request.query.get("fieldSelector"))
        try:
            limit = int(request.query.get("limit") or 0)
        except ValueError:
            return web.json_response(_status(400, "BadRequest", "bad limit"), status=400)
        token = request.query.get("continue")
        if token and self.compact_on_continue > 0:
            self.compact_on_continue -= 1
            self.compact()
        if token:
            try:
                state = json.loads(base64.urlsafe_b64decode(token.encode()))
                rv, offset, snap_id = int(state["rv"]), int(state["start"]), str(state["id"])
            except (ValueError, KeyError, TypeError):
                return web.json_response(_status(400, "BadRequest", "bad continue"), status=400)
            if rv < self._floor or snap_id not in self._snapshots:
                return web.json_response(
                    _status(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent "
                        "list result. You can start a new list without the continue parameter.",
                    ),
                    status=410,
                )
            items = self._snapshots[snap_id][1]
        else:
            rv, offset, snap_id = self._rv, 0, uuid.uuid4().hex
            # Stored objects are never changed in place (every write stores a new
            # copy), so a snapshot needs only shallow copies: list items come
            # without kind/apiVersion. (A deep copy of 20,000 objects cost 1.5 s.)
            items = [
                {k: v for k, v in o.items() if k not in ("kind", "apiVersion")}
                for _k, o in sorted(self._objects[plural].items())
                if _matches(o, selector)
            ]
            self._snapshots[snap_id] = (rv, items)
        end = offset + limit if limit > 0 else len(items)
        page = items[offset:end]
        meta: Obj = {"resourceVersion": str(rv)}
        if end < len(items):
            state = {"rv": rv, "start": end, "id": snap_id}
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(state).encode()).decode()
            meta["remainingItemCount"] = len(items) - end
        else:
            self._snapshots.pop(snap_id, None)
        body = {"kind": f"{kind}List", "apiVersion": api_version, "metadata": meta, "items": page}
        return web.json_response(body)

    async def _watch(self, request: web.Request, plural: str) -> web.StreamResponse:
        kind, api_version, _ns, _path = RESOURCES[plural]
        selector = _parse_selector(request.query.get("fieldSelector"))
        bookmarks = request.query.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        since_text = request.query.get("resourceVersion") or "0"
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        watcher = _Watcher(plural, selector)
        # Replay and registration happen with no await between them: no event is lost.
        if since_text == "0":
            for o in sorted(self._objects[plural].values(), key=lambda o: o["metadata"]["name"]):
                if _matches(o, selector):
                    watcher.queue.put_nowait(("ADDED", copy.deepcopy(o)))
        else:
            since = int(since_text)
            if since > self._rv:  # as after an etcd restore from backup
                await response.prepare(request)
                too_large = _status(
                    504, "Timeout", f"Too large resource version: {since}, current: {self._rv}"
                )
                await response.write(
                    json.dumps({"type": "ERROR", "object": too_large}).encode() + b"\n"
                )
                await response.write_eof()
                return response
            if since < self._floor:
                await response.prepare(request)
                gone = _status(410, "Expired", f"too old resource version: {since} ({self._floor})")
                await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                await response.write_eof()
                return response
            for rv, p, event, obj in self._history:
                if p == plural and rv > since and _matches(obj, selector):
                    watcher.queue.put_nowait((event, copy.deepcopy(obj)))
        self._watchers.add(watcher)
        try:
            await response.prepare(request)
            deadline = time.monotonic() + timeout
            next_bookmark = time.monotonic() + self.bookmark_interval
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                wait = min(deadline, next_bookmark) - now
                try:
                    async with asyncio.timeout(max(wait, 0.001)):
                        item = await watcher.queue.get()
                except TimeoutError:
                    if bookmarks and not self.stalled and time.monotonic() >= next_bookmark:
                        mark = {
                            "kind": kind,
                            "apiVersion": api_version,
                            "metadata": {"resourceVersion": str(self._rv)},
                        }
                        await response.write(
                            json.dumps({"type": "BOOKMARK", "object": mark}).encode() + b"\n"
                        )
                    next_bookmark = time.monotonic() + self.bookmark_interval
                    continue
                if item is None:  # drop: cut the connection mid-stream
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                while self.stalled:  # hold events, send nothing, keep the socket open
                    await asyncio.sleep(0.05)
                    if time.monotonic() >= deadline:
                        break
                event, obj = item
                await response.write(json.dumps({"type": event, "object": obj}).encode() + b"\n")
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return response
        except ConnectionError:
            return response
        finally:
            self._watchers.discard(watcher)


# --- object builders for tests -----------------------------------------------------


_counter = itertools.count(1)


def service(
    name: str,
    *,
    namespace: str = "default",
    cluster_ip: str | None = None,
    port: int = 80,
    target_port: int | str = 8080,
    protocol: str = "TCP",
) -> Obj:
    ip = cluster_ip or f"10.96.{next(_counter) % 250}.{next(_counter) % 250 + 1}"
    return {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": [
                {"name": "http", "port": port, "targetPort": target_port, "protocol": protocol}
            ],
        },
    }


def endpoint_slice(
    service_name: str,
    ips: list[str],
    *,
    name: str | None = None,
    namespace: str = "default",
    port: int = 8080,
    address_type: str = "IPv4",
    port_name: str = "http",
) -> Obj:
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name or f"{service_name}-abc",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": address_type,
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": True, "serving": True, "terminating": False},
            }
            for ip in ips
        ],
    }


def node(name: str, *, zone: str | None = None, taints: list[Obj] | None = None) -> Obj:
    labels = {"kubernetes.io/hostname": name}
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "labels": labels},
        "spec": {"taints": taints or []},
    }


# --- the control channel's client (for a server running as a program) ----------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ControlError(RuntimeError):
    """The control channel refused an operation (the message says which and why)."""


class Control:
    """Blocking client of ``--control PATH``: one connection per call, nothing to close."""

    def __init__(self, path: Path | str, *, timeout: float = 30.0) -> None:
        self.path = str(path)
        self.timeout = timeout

    def _call(self, method: str, url: str, body: Any = None) -> Any:
        conn = _UnixConnection(self.path, self.timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            payload = json.loads(resp.read() or b"null")
        finally:
            conn.close()
        if resp.status != 200:
            raise ControlError(f"{method} {url}: HTTP {resp.status}: {payload}")
        return payload

    def ops(self, *ops: Obj) -> list[Any]:
        """Apply operations atomically (see :meth:`FakeApiServer.run_ops`)."""
        results: list[Any] = self._call("POST", "/ops", list(ops))["results"]
        return results

    def apply(self, *objects: Obj) -> None:
        self.ops({"op": "apply", "objects": list(objects)})

    def delete(self, kind: str, namespace: str | None, name: str) -> None:
        self.ops({"op": "delete", "kind": kind, "namespace": namespace, "name": name})

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        found: Obj | None = self.ops(
            {"op": "get", "kind": kind, "namespace": namespace, "name": name}
        )[0]
        return found

    def state(self) -> Obj:
        state: Obj = self._call("GET", "/state")
        return state

    def requests(self, since: int = 0) -> list[Obj]:
        seen: list[Obj] = self._call("GET", f"/requests?since={since}")
        return seen


# --- as a program: a fake cluster for trying `uproxy run --kubeconfig` by hand -------


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.k8s.apiserver --kubeconfig PATH [--load FILE.yaml]... [--control P]``."""
    import argparse

    import yaml

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kubeconfig", type=Path, required=True, help="written at start")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--load", type=Path, action="append", default=[],
        help="objects: YAML documents, or (*.json) a List or an array",
    )  # fmt: skip
    parser.add_argument("--bookmark-interval", type=float, default=60.0)
    parser.add_argument("--history-size", type=int, default=1000)
    parser.add_argument("--control", type=Path, help="serve the test controls on this unix socket")
    parser.add_argument(
        "--hold", action="append", default=[], metavar="RESOURCE",
        help="hold lists of RESOURCE (e.g. endpointslices) until released over --control",
    )  # fmt: skip
    args = parser.parse_args(argv)

    async def serve() -> None:
        server = FakeApiServer(
            history_size=args.history_size, bookmark_interval=args.bookmark_interval
        )
        server.port = args.port
        for path in args.load:
            text = path.read_text()
            docs = [json.loads(text)] if path.suffix == ".json" else yaml.safe_load_all(text)
            for doc in docs:
                if isinstance(doc, list):
                    items = doc
                elif doc and doc.get("kind") == "List":
                    items = doc.get("items", [])
                else:
                    items = [doc]
                for obj in items:
                    if obj and obj.get("kind") in PLURAL_OF_KIND:
                        server.apply(obj)
        for resource in args.hold:
            server.hold_lists(resource)
        await server.start(control=args.control)
        tmp = args.kubeconfig.with_name(args.kubeconfig.name + ".tmp")
        server.write_kubeconfig(tmp)
        tmp.replace(args.kubeconfig)  # whoever waits for the file sees it whole
        print(f"fake API server on {server.url}; kubeconfig {args.kubeconfig}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
