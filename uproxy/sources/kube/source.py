"""The Kubernetes API source: Services, EndpointSlices and this Node into the store.

One :class:`~uproxy.sources.kube.reflector.Reflector` per watched resource, run
side by side; the source turns their lists into
:meth:`~uproxy.state.Store.replace` (which also deletes what vanished while
the watch was away) and their events into ``apply``/``remove``, logs each
object's problems once, and says ``synced`` when Services and EndpointSlices
have both been listed. The Node gives this node's zone (topology) and whether
it is going away (graceful drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from kubernetes_asyncio import client as k8s_client

from uproxy.model import Problem, node_host_ips, object_ref
from uproxy.settings import KubeSettings
from uproxy.sources import SourceHooks
from uproxy.sources.kube.config import load_configuration
from uproxy.sources.kube.reflector import Reflector, api_path
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
        self.node_ips: tuple[str, ...] = ()  # primary IP per family (--nodeport-addresses primary)
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
                Reflector(
                    api,
                    path=api_path(*WATCHED[2]),
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
    ) -> Reflector:
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

        return Reflector(
            api,
            path=api_path(*gvr),
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
            ips = node_host_ips(node)
            if ips != self.node_ips:
                self.node_ips = ips
                hooks.changed()
        if (zone, terminating) != (self.node_zone, self.node_terminating):
            self.node_zone, self.node_terminating = zone, terminating
            log.info("node %s: zone=%s terminating=%s", self.node_name, zone, terminating)
            hooks.changed()
