"""The Kubernetes API source: list, then watch, Services, EndpointSlices and this Node.

Shaped after client-go's reflector, one small loop per watched resource
(:class:`_Reflector`): list (paged with ``limit``/``continue``), remember the
list's ``resourceVersion``, watch from it with bookmarks and a server-side
timeout, and advance the version on every event. ``410 Gone`` (on the watch
request, as an ``ERROR`` event, or an expired ``continue`` token) means the
version is too old: re-list and :meth:`~uproxy.state.Store.replace`, which also
deletes what vanished while we were away. Everything else that can go wrong
with the network or the server (drops, 5xx, 429 with ``Retry-After``, a stream
that goes silent past the inactivity timeout) is retried with capped
exponential backoff and jitter, logged once per distinct problem.

kubernetes_asyncio is used only for configuration, authentication and its
aiohttp transport; responses are read raw (``_preload_content=False``) and the
JSON goes to the store as plain dicts in API shape, because the model parses
API dicts, not the generated classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from uproxy.model import Problem, object_ref
from uproxy.sources import SourceHooks
from uproxy.state import Key, Store, key_of

log = logging.getLogger("uproxy.kube")

#: (API group, version, resource) of everything this source lists and watches.
#: The RBAC in deploy/ grants exactly list+watch on these (tests check it).
WATCHED = [
    ("", "v1", "services"),
    ("discovery.k8s.io", "v1", "endpointslices"),
    ("", "v1", "nodes"),
]

ZONE_LABEL = "topology.kubernetes.io/zone"
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"
ORIGIN = "apiserver"
_MAX_RETRY_AFTER = 600.0
_REPEAT_LOG_INTERVAL = 60.0


class ConfigError(Exception):
    """The API client cannot be configured (one line, fit to print as is)."""


@dataclass(frozen=True, slots=True)
class KubeSettings:
    """Tuning of the list+watch loops (the defaults suit a real cluster)."""

    page_size: int = 500
    """Objects per list page (``limit``); continued with the ``continue`` token."""
    watch_timeout_seconds: int = 300
    """``timeoutSeconds`` asked of the server: it ends each watch after this long."""
    inactivity_timeout: float = 90.0
    """Seconds without a line on a watch before reconnecting (bookmarks come about once a
    minute, so a healthy stream is never silent that long)."""
    backoff_initial: float = 0.2
    """First retry delay in seconds after a failure; doubles per failure, with jitter."""
    backoff_max: float = 30.0
    """Cap of the retry delay in seconds."""


# --- configuration ------------------------------------------------------------


async def load_configuration(kubeconfig: str | None, master: str | None) -> Any:
    """A kubernetes_asyncio ``Configuration``: kubeconfig, else $KUBECONFIG, else in-cluster."""
    cfg = k8s_client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG") or None
    if path:
        path = path.split(os.pathsep)[0]
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: kubeconfig file not found")
        try:
            await k8s_config.load_kube_config(
                config_file=path, client_configuration=cfg, persist_config=False
            )
        except Exception as exc:  # the loader raises many types for one cause: a bad file
            raise ConfigError(f"{path}: bad kubeconfig: {_one_line(exc)}") from None
    else:
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except Exception as exc:
            if master:
                cfg.host = master
            else:
                raise ConfigError(
                    "no kubeconfig given (--kubeconfig or $KUBECONFIG) and not running in a pod: "
                    f"{_one_line(exc)}"
                ) from None
    if master:
        cfg.host = master.rstrip("/")
    if not str(cfg.host or "").startswith(("http://", "https://")):
        raise ConfigError(f"API server URL {cfg.host!r} must start with http:// or https://")
    return cfg


async def check_config(kubeconfig: str | None, master: str | None) -> None:
    """Validate the client configuration at start-up; raises :class:`ConfigError`."""
    await load_configuration(kubeconfig, master)


def _one_line(what: object) -> str:
    text = " ".join(str(what).split())
    if not text and isinstance(what, BaseException):
        text = type(what).__name__
    return text[:300]


# --- errors and backoff -----------------------------------------------------


class _Gone(Exception):
    """The resourceVersion (or continue token) is too old: re-list."""


class _Retry(Exception):
    """A failure worth retrying; ``retry_after`` is the server's wish, if any."""

    def __init__(
        self, message: str, retry_after: float | None = None, *, relist: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.relist = relist


class _Backoff:
    """Capped exponential backoff with full jitter in the upper half."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial = initial
        self.cap = cap
        self.failures = 0

    def next_delay(self) -> float:
        base = min(self.cap, self.initial * (2 ** min(self.failures, 30)))
        self.failures += 1
        delay: float = base * random.uniform(0.5, 1.0)
        return delay

    def reset(self) -> None:
        self.failures = 0


class _LogLimiter:
    """One line per distinct problem; the same line again only after a quiet minute.

    A retry storm (the same failure every few seconds) thus logs one line a
    minute, with the count of the lines it held back.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._seen: dict[str, tuple[float, int]] = {}  # line -> (logged at, held back since)
        self.failing = False

    def _emit(self, level: int, line: str) -> None:
        now = time.monotonic()
        last = self._seen.get(line)
        if last is not None and now - last[0] < _REPEAT_LOG_INTERVAL:
            self._seen[line] = (last[0], last[1] + 1)
            return
        suffix = f" (repeated {last[1]} times)" if last is not None and last[1] else ""
        if len(self._seen) > 64:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < _REPEAT_LOG_INTERVAL}
        self._seen[line] = (now, 0)
        self._log.log(level, "%s%s", line, suffix)

    def warn(self, line: str) -> None:
        self.failing = True
        self._emit(logging.WARNING, line)

    def recovered(self, line: str) -> None:
        if self.failing:
            self.failing = False
            self._emit(logging.INFO, line)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, min(float(value), _MAX_RETRY_AFTER))
    except ValueError:
        return None


def _status_error(what: str, status: int, body: bytes, headers: Mapping[str, str]) -> Exception:
    try:
        message = str(json.loads(body).get("message") or "")
    except (ValueError, AttributeError):
        message = ""
    detail = f"{what}: HTTP {status}" + (f": {_one_line(message)}" if message else "")
    if status == 410:
        return _Gone(detail)
    return _Retry(detail, _retry_after(headers))


# --- one resource ---------------------------------------------------------------


class _Reflector:
    """List+watch of one resource, feeding ``on_list`` (a snapshot) and ``on_event``."""

    def __init__(
        self,
        api: Any,
        *,
        path: str,
        what: str,
        settings: KubeSettings,
        field_selector: str | None,
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self._api = api
        self._path = path
        self._what = what
        self._settings = settings
        self._field_selector = field_selector
        self._on_list = on_list
        self._on_event = on_event
        self._backoff = _Backoff(settings.backoff_initial, settings.backoff_max)
        self._problems = _LogLimiter(log)
        self._progress = False  # a watch event arrived since the last (re)connect

    async def run(self) -> None:
        version: str | None = None
        gone_in_a_row = 0
        while True:
            self._progress = False
            try:
                if version is None:
                    version = await self._list()
                version, healthy = await self._watch(version)
                if healthy:
                    self._backoff.reset()
                    gone_in_a_row = 0
                    continue
                # The server ended a watch at once without sending anything: not a
                # failure, but reconnecting at once would spin.
                await asyncio.sleep(self._backoff.next_delay())
            except _Gone as gone:
                log.info("%s: %s; listing again", self._what, gone)
                version = None
                gone_in_a_row = 0 if self._progress else gone_in_a_row + 1
                if gone_in_a_row > 1:  # 410 right after a fresh list: do not spin
                    await asyncio.sleep(self._backoff.next_delay())
            except _Retry as err:
                if err.relist:
                    version = None
                await self._failed(str(err), err.retry_after)
            except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
                await self._failed(f"{type(exc).__name__}: {_one_line(exc)}")
            except Exception as exc:  # never let one resource take the source down
                await self._failed(f"unexpected {type(exc).__name__}: {_one_line(exc)}")

    async def _failed(self, problem: str, retry_after: float | None = None) -> None:
        if self._progress:  # the connection worked for a while: start the backoff over
            self._backoff.reset()
        self._problems.warn(f"{self._what}: {problem}")
        delay = self._backoff.next_delay()
        if retry_after is not None:
            delay = max(delay, retry_after)
        await asyncio.sleep(delay)

    async def _get(self, query: list[tuple[str, str]], timeout: aiohttp.ClientTimeout) -> Any:
        if self._field_selector:
            query = [*query, ("fieldSelector", self._field_selector)]
        return await self._api.call_api(
            self._path,
            "GET",
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout,
        )

    async def _list(self) -> str:
        items: list[dict[str, Any]] = []
        token: str | None = None
        limit = str(self._settings.page_size)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=10, sock_read=self._settings.inactivity_timeout
        )
        while True:
            query = [("limit", limit)] + ([("continue", token)] if token else [])
            resp = await self._get(query, timeout)
            async with resp:
                body = await resp.read()
                if resp.status != 200:
                    raise _status_error("list", resp.status, body, resp.headers)
            doc = json.loads(body)
            if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict):
                raise _Retry("list: response is not a list")
            page = doc.get("items") or []
            items.extend(obj for obj in page if isinstance(obj, dict))
            meta = doc["metadata"]
            token = meta.get("continue") or None
            if token is None:
                version = str(meta.get("resourceVersion") or "")
                if not version:
                    raise _Retry("list: no resourceVersion in the list")
                self._on_list(items)
                self._problems.recovered(f"{self._what}: listed {len(items)} objects")
                return version

    async def _watch(self, version: str) -> tuple[str, bool]:
        """Follow one watch; returns (last version, whether it was a normal stream)."""
        query = [
            ("watch", "true"),
            ("resourceVersion", version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(self._settings.watch_timeout_seconds)),
        ]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
        inactivity = self._settings.inactivity_timeout
        started = time.monotonic()
        events = 0
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that
        # arrives as its inner call completes, and the source would then never stop.
        async with asyncio.timeout(inactivity):
            resp = await self._get(query, timeout)
        async with resp:
            if resp.status != 200:
                body = await resp.read()
                raise _status_error("watch", resp.status, body, resp.headers)
            self._problems.recovered(f"{self._what}: watching again")
            while True:
                try:
                    async with asyncio.timeout(inactivity):
                        line = await resp.content.readline()
                except TimeoutError:
                    raise _Retry(
                        f"watch: nothing received for {inactivity:g}s; reconnecting"
                    ) from None
                if not line:
                    healthy = events > 0 or time.monotonic() - started >= 1.0
                    return version, healthy
                if not line.strip():
                    continue
                event = json.loads(line)
                kind = event.get("type") if isinstance(event, dict) else None
                obj = event.get("object") if isinstance(event, dict) else None
                if not isinstance(kind, str) or not isinstance(obj, dict):
                    raise _Retry("watch: malformed event")
                if kind == "ERROR":
                    code = obj.get("code")
                    message = _one_line(obj.get("message") or obj.get("reason") or "")
                    if code == 410:
                        raise _Gone(f"watch: 410 Gone: {message}")
                    # e.g. "too large resource version" after an etcd restore: the
                    # version is no good; a fresh list always is.
                    raise _Retry(f"watch: error event {code}: {message}", relist=True)
                events += 1
                self._progress = True
                meta = obj.get("metadata")
                new_version = meta.get("resourceVersion") if isinstance(meta, dict) else None
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._on_event(kind, obj)
                elif kind != "BOOKMARK":
                    log.debug("%s: ignoring event type %s", self._what, kind)
                if new_version:
                    version = str(new_version)


# --- the source -------------------------------------------------------------------


def _path(group: str, version: str, resource: str) -> str:
    return f"/api/{version}/{resource}" if not group else f"/apis/{group}/{version}/{resource}"


class KubeSource:
    """Services and EndpointSlices from the API into a Store; this node's zone and state."""

    name = "kube"

    def __init__(
        self,
        *,
        kubeconfig: str | None,
        master: str | None,
        node_name: str,
        settings: KubeSettings | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.master = master
        self.node_name = node_name
        self.settings = settings or KubeSettings()
        self.node_zone: str | None = None
        self.node_terminating = False
        self.node_seen = False
        self._node_missing_logged = False
        self._listed: set[str] = set()
        self._synced = False
        self._logged: dict[tuple[str, Key], set[str]] = {}

    async def run(self, store: Store, hooks: SourceHooks) -> None:
        """List and watch until cancelled; never raises for what the server sends."""
        cfg = await load_configuration(self.kubeconfig, self.master)
        api = k8s_client.ApiClient(configuration=cfg)
        try:
            reflectors = [
                self._reflector(api, store, hooks, "Service", WATCHED[0]),
                self._reflector(api, store, hooks, "EndpointSlice", WATCHED[1]),
                _Reflector(
                    api,
                    path=_path(*WATCHED[2]),
                    what="nodes",
                    settings=self.settings,
                    field_selector=f"metadata.name={self.node_name}",
                    on_list=lambda items: self._node_list(items, hooks),
                    on_event=lambda kind, obj: self._node_event(kind, obj, hooks),
                ),
            ]
            async with asyncio.TaskGroup() as group:
                for r in reflectors:
                    group.create_task(r.run())
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(api.close())

    def _reflector(
        self,
        api: Any,
        store: Store,
        hooks: SourceHooks,
        kind: str,
        gvr: tuple[str, str, str],
    ) -> _Reflector:
        api_version = f"{gvr[0]}/{gvr[1]}" if gvr[0] else gvr[1]

        def on_list(items: list[dict[str, Any]]) -> None:
            before = store.generation
            for obj in items:  # list items come without kind; messages want it
                obj.setdefault("kind", kind)
                obj.setdefault("apiVersion", api_version)
            problems = store.replace(kind, [(obj, ORIGIN) for obj in items])
            # (both maps cost a pass over every item: 10,000 services, ~50 ms)
            if problems:
                self._report(kind, {object_ref(o): key_of(o) for o in items}, problems)
            logged = [k for k in self._logged if k[0] == kind]
            if logged:
                present = {key_of(obj) for obj in items}
                for stale in [k for k in logged if k[1] not in present]:
                    del self._logged[stale]
            self._listed.add(kind)
            if store.generation != before:
                hooks.changed()
            if not self._synced and {"Service", "EndpointSlice"} <= self._listed:
                self._synced = True
                hooks.synced()

        def on_event(event: str, obj: dict[str, Any]) -> None:
            key = key_of(obj)
            if key is None:
                log.warning("%s: %s event without metadata.name; skipped", gvr[2], event)
                return
            if event == "DELETED":
                self._logged.pop((kind, key), None)
                changed = store.remove(kind, *key)
            else:
                before = store.generation
                self._report(kind, {object_ref(obj): key}, store.apply(kind, obj, ORIGIN))
                changed = store.generation != before
            if changed:
                hooks.changed()

        return _Reflector(
            api,
            path=_path(*gvr),
            what=gvr[2],
            settings=self.settings,
            field_selector=None,
            on_list=on_list,
            on_event=on_event,
        )

    def _report(self, kind: str, keys: Mapping[str, Key | None], problems: list[Problem]) -> None:
        """Log each problem once (an object re-sent with the same problem stays quiet)."""
        for p in problems:
            key = keys.get(p.obj) or ("", p.obj)
            seen = self._logged.setdefault((kind, key), set())
            line = str(p)
            if line not in seen:
                seen.add(line)
                log.warning("%s", line)

    # The node: zone and whether it is going away (topology and graceful drain).

    def _node_list(self, items: list[dict[str, Any]], hooks: SourceHooks) -> None:
        mine = [o for o in items if (o.get("metadata") or {}).get("name") == self.node_name]
        if not mine:
            if not self.node_seen and not self._node_missing_logged:
                self._node_missing_logged = True
                log.warning(
                    "node %s: not found in the API (check --hostname-override)", self.node_name
                )
            self._set_node(None, hooks)
        else:
            self._set_node(mine[0], hooks)

    def _node_event(self, event: str, obj: dict[str, Any], hooks: SourceHooks) -> None:
        meta = obj.get("metadata")
        if not isinstance(meta, dict) or meta.get("name") != self.node_name:
            return
        self._set_node(None if event == "DELETED" else obj, hooks)

    def _set_node(self, node: dict[str, Any] | None, hooks: SourceHooks) -> None:
        zone: str | None = None
        terminating = False
        if node is not None:
            self.node_seen = True
            meta = node.get("metadata") or {}
            labels = meta.get("labels") or {}
            if isinstance(labels, dict) and isinstance(labels.get(ZONE_LABEL), str):
                zone = labels[ZONE_LABEL]
            taints = (node.get("spec") or {}).get("taints") or []
            tainted = isinstance(taints, list) and any(
                isinstance(t, dict) and t.get("key") == TO_BE_DELETED_TAINT for t in taints
            )
            terminating = bool(meta.get("deletionTimestamp")) or tainted
        if (zone, terminating) != (self.node_zone, self.node_terminating):
            self.node_zone, self.node_terminating = zone, terminating
            log.info("node %s: zone=%s terminating=%s", self.node_name, zone, terminating)
            hooks.changed()
