"""KubeSource against the fake API server over real HTTP: list, watch, and everything that breaks.

The source fills a real Store; the server records every request, so the tests
can count retries (bounded, never a busy loop) and see re-lists after 410.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.support.matrix import run_on
from tests.support.waiting import wait_until_async
from uproxy.cli import kubeconfig_path
from uproxy.settings import Settings
from uproxy.sources.kube import ConfigError, KubeSettings, KubeSource, check_config
from uproxy.state import Store

from .apiserver import FakeApiServer, Request, endpoint_slice, node, service

NODE = "node-a"
FAST = KubeSettings(
    page_size=500,
    watch_timeout_seconds=300,
    inactivity_timeout=5.0,
    backoff_initial=0.05,
    backoff_max=0.5,
)


class Hooks:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.changes = 0
        self.synced_count = 0
        self.services_at_sync: set[tuple[str, str]] | None = None
        self.slices_at_sync: set[tuple[str, str]] | None = None

    def changed(self) -> None:
        self.changes += 1

    def synced(self) -> None:
        self.synced_count += 1
        if self.services_at_sync is None:
            self.services_at_sync = self.store.keys("Service")
            self.slices_at_sync = self.store.keys("EndpointSlice")


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(bookmark_interval=0.3)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def kubeconfig(api: FakeApiServer, tmp_path: Path) -> str:
    return str(api.write_kubeconfig(tmp_path / "kubeconfig"))


@contextlib.asynccontextmanager
async def running(
    kubeconfig: str, settings: KubeSettings = FAST
) -> AsyncIterator[tuple[KubeSource, Store, Hooks]]:
    source = KubeSource(kubeconfig=kubeconfig, master=None, node_name=NODE, settings=settings)
    store = Store()
    hooks = Hooks(store)
    task = asyncio.create_task(source.run(store, hooks))
    try:
        yield source, store, hooks
        assert not task.done(), task  # the source never ends by itself
    finally:
        task.cancel()
        # Bounded: a source that swallowed its cancel must fail the test, not hang the run.
        done, _ = await asyncio.wait([task], timeout=10)
        assert done, "the source did not stop within 10 s of being cancelled"
        with contextlib.suppress(asyncio.CancelledError):
            await task


def svc_keys(store: Store) -> set[tuple[str, str]]:
    return store.keys("Service")


def endpoint_ips(store: Store, name: str) -> list[str]:
    return sorted(
        ep.ip
        for entry in store.table().values()
        if entry.port.name.name == name
        for ep in entry.endpoints
    )


async def test_create_update_delete_reach_the_store(api: FakeApiServer, kubeconfig: str) -> None:
    api.create(service("web", cluster_ip="10.96.0.10"))
    api.create(endpoint_slice("web", ["10.244.1.5"]))
    async with running(kubeconfig) as (_source, store, hooks):
        await wait_until_async(lambda: hooks.synced_count == 1, timeout=10, message="synced")
        assert svc_keys(store) == {("default", "web")}
        assert endpoint_ips(store, "web") == ["10.244.1.5"]

        api.create(service("db", namespace="data", cluster_ip="10.96.0.11", port=5432))
        await wait_until_async(
            lambda: ("data", "db") in svc_keys(store), timeout=10, message="db added"
        )

        changes = hooks.changes
        api.update(endpoint_slice("web", ["10.244.1.5", "10.244.2.7"]))
        await wait_until_async(
            lambda: endpoint_ips(store, "web") == ["10.244.1.5", "10.244.2.7"], timeout=10
        )
        assert hooks.changes > changes

        # Dual stack: an IPv6 slice of the same service is just another slice.
        api.create(endpoint_slice("web", ["fd00::5"], name="web-v6", address_type="IPv6"))
        await wait_until_async(
            lambda: ("default", "web-v6") in store.keys("EndpointSlice"), timeout=10
        )

        api.delete("Service", "default", "web")
        await wait_until_async(
            lambda: ("default", "web") not in svc_keys(store), timeout=10, message="web deleted"
        )
        assert svc_keys(store) == {("data", "db")}
        assert hooks.synced_count == 1


async def test_lists_are_paged(api: FakeApiServer, kubeconfig: str) -> None:
    for i in range(53):
        api.create(service(f"s{i:02}"))
        api.create(endpoint_slice(f"s{i:02}", [f"10.244.0.{i + 1}"]))
    settings = dataclasses.replace(FAST, page_size=7)
    async with running(kubeconfig, settings) as (_source, store, hooks):
        await wait_until_async(lambda: hooks.synced_count == 1, timeout=10, message="synced")
        assert len(svc_keys(store)) == 53
        assert len(store.keys("EndpointSlice")) == 53
        assert hooks.services_at_sync is not None and len(hooks.services_at_sync) == 53
        lists = api.list_requests("services")
        assert len(lists) == 8  # ceil(53 / 7)
        assert all(r.query.get("limit") == "7" for r in lists)
        assert sum("continue" in r.query for r in lists) == 7


async def test_expired_continue_token_restarts_the_list(
    api: FakeApiServer, kubeconfig: str
) -> None:
    for i in range(10):
        api.create(service(f"s{i}"))
    api.compact_on_continue = 1  # etcd compacts between the first and the second page
    settings = KubeSettings(page_size=3, inactivity_timeout=5.0, backoff_initial=0.05)
    async with running(kubeconfig, settings) as (_source, store, hooks):
        await wait_until_async(lambda: hooks.synced_count == 1, timeout=10, message="synced")
        assert len(svc_keys(store)) == 10
        first_pages = [r for r in api.list_requests("services") if "continue" not in r.query]
        assert len(first_pages) == 2  # the list started over after the 410


async def test_deletion_missed_during_a_drop_is_applied_after_410(
    api: FakeApiServer, kubeconfig: str
) -> None:
    api.create(service("keep"))
    api.create(service("gone"))
    api.create(endpoint_slice("gone", ["10.244.3.3"]))
    async with running(kubeconfig) as (_source, store, hooks):
        await wait_until_async(lambda: hooks.synced_count == 1, timeout=10, message="synced")
        await wait_until_async(
            lambda: len(api.watch_requests("services")) == 1, timeout=10, message="watching"
        )
        lists_before = len(api.list_requests("services"))
        # No await between these: the source cannot see the deletion on a stream.
        api.drop_streams()
        api.delete("Service", "default", "gone")
        api.delete("EndpointSlice", "default", "gone-abc")
        api.compact()
        await wait_until_async(
            lambda: svc_keys(store) == {("default", "keep")}, timeout=10, message="gone removed"
        )
        await wait_until_async(
            lambda: not store.keys("EndpointSlice"), timeout=10, message="slice removed"
        )
        assert len(api.list_requests("services")) == lists_before + 1  # one re-list
        # And it keeps watching from the new list's version.
        api.create(service("after"))
        await wait_until_async(
            lambda: ("default", "after") in svc_keys(store), timeout=10, message="after"
        )
        assert hooks.synced_count == 1


async def test_500_is_retried_with_backoff(api: FakeApiServer, kubeconfig: str) -> None:
    api.fail_next(4, 500)
    api.create(service("web"))
    async with running(kubeconfig) as (_source, store, hooks):
        await wait_until_async(
            lambda: hooks.synced_count == 1, timeout=10, message="synced despite 500s"
        )
        assert svc_keys(store) == {("default", "web")}


async def test_429_retry_after_is_honoured(api: FakeApiServer, kubeconfig: str) -> None:
    api.create(service("web"))
    async with running(kubeconfig) as (_source, store, hooks):
        await wait_until_async(lambda: hooks.synced_count == 1, timeout=10, message="synced")
        await wait_until_async(
            lambda: len(api.watch_requests("services")) == 1, timeout=10, message="watching"
        )
        api.fail_next(1, 429, retry_after=1.5)
        api.drop_streams()

        def rejected() -> Request | None:
            return next((r for r in api.requests if r.status == 429), None)

        def retry() -> Request | None:
            first = rejected()
            return next(
                (
                    r
                    for r in api.requests
                    if first and r.at > first.at and r.resource == first.resource
                ),
                None,
            )

        await wait_until_async(lambda: retry() is not None, timeout=10, message="retry after 429")
        first, again = rejected(), retry()
        assert first is not None and again is not None
        assert again.at - first.at >= 1.4  # waited as the server asked
        api.create(service("later"))
        await wait_until_async(
            lambda: ("default", "later") in svc_keys(store), timeout=10, message="later"
        )


async def test_persistent_errors_never_busy_loop(
    api: FakeApiServer, kubeconfig: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="uproxy.kube")
    api.fail_next(100_000, 500)
    async with running(kubeconfig) as (_source, _store, hooks):
        await asyncio.sleep(3.0)
        count = len(api.requests)
        # backoff 0.05 s doubling to a 0.5 s cap, three resources: a few dozen at most.
        assert 6 <= count <= 60, count
        # and the log says it once per resource, not once per retry
        lines = [r.getMessage() for r in caplog.records if "HTTP 500" in r.getMessage()]
        assert sorted(lines) == [
            f"{what}: list: HTTP 500: injected 500"
            for what in ("endpointslices", "nodes", "services")
        ]
        assert hooks.synced_count == 0
        api._fail.clear()
        await wait_until_async(
            lambda: hooks.synced_count == 1, timeout=10, message="recovers when the server does"
        )


async def test_silent_stream_is_reconnected_after_the_inactivity_timeout(
    api: FakeApiServer, kubeconfig: str
) -> None:
    api.bookmark_interval = 3600.0  # the server sends nothing at all
    settings = KubeSettings(inactivity_timeout=0.5, backoff_initial=0.05, backoff_max=0.5)
    async with running(kubeconfig, settings) as (_source, store, hooks):
        await wait_until_async(lambda: hooks.synced_count == 1, timeout=10, message="synced")
        await wait_until_async(
            lambda: len(api.watch_requests("services")) >= 3, timeout=10, message="reconnects"
        )
        # The store is still followed after the reconnects.
        api.create(service("late"))
        await wait_until_async(
            lambda: ("default", "late") in svc_keys(store), timeout=10, message="late"
        )


async def test_bookmarks_keep_a_quiet_stream_alive(api: FakeApiServer, kubeconfig: str) -> None:
    api.bookmark_interval = 0.2
    settings = KubeSettings(inactivity_timeout=1.5, backoff_initial=0.05, backoff_max=0.5)
    async with running(kubeconfig, settings) as (_source, _store, hooks):
        await wait_until_async(lambda: hooks.synced_count == 1, timeout=10, message="synced")
        await asyncio.sleep(2.5)
        assert len(api.watch_requests("services")) == 1


async def test_stalled_stream_with_held_events_reconnects(
    api: FakeApiServer, kubeconfig: str
) -> None:
    api.bookmark_interval = 3600.0
    settings = KubeSettings(inactivity_timeout=0.5, backoff_initial=0.05, backoff_max=0.5)
    async with running(kubeconfig, settings) as (_source, store, hooks):
        await wait_until_async(lambda: hooks.synced_count == 1, timeout=10, message="synced")
        api.stalled = True
        api.create(service("held"))
        watches = len(api.watch_requests("services"))
        await wait_until_async(
            lambda: len(api.watch_requests("services")) > watches, timeout=10, message="reconnect"
        )
        assert ("default", "held") not in svc_keys(store)
        api.stalled = False
        await wait_until_async(
            lambda: ("default", "held") in svc_keys(store), timeout=10, message="held arrives"
        )


async def test_synced_only_after_both_lists(api: FakeApiServer, kubeconfig: str) -> None:
    api.create(service("web"))
    api.create(endpoint_slice("web", ["10.244.1.1"]))
    api.hold_lists("endpointslices")
    async with running(kubeconfig) as (_source, store, hooks):
        await wait_until_async(
            lambda: ("default", "web") in svc_keys(store), timeout=10, message="services listed"
        )
        await asyncio.sleep(0.3)
        assert hooks.synced_count == 0
        api.release_lists("endpointslices")
        await wait_until_async(lambda: hooks.synced_count == 1, timeout=10, message="synced")
        assert hooks.slices_at_sync == {("default", "web-abc")}
        # A later re-list does not sync again.
        api.drop_streams()
        api.compact()
        await wait_until_async(
            lambda: len(api.list_requests("services")) == 2, timeout=10, message="re-list"
        )
        await asyncio.sleep(0.2)
        assert hooks.synced_count == 1


@pytest.mark.parametrize("refuse", [False, True], ids=["503", "refused"])
async def test_outage_keeps_state_and_converges(
    api: FakeApiServer, kubeconfig: str, refuse: bool
) -> None:
    api.create(service("old"))
    api.create(service("stays"))
    async with running(kubeconfig) as (_source, store, hooks):
        await wait_until_async(lambda: hooks.synced_count == 1, timeout=10, message="synced")
        api.outage(2.0, refuse=refuse)
        api.delete("Service", "default", "old")
        api.create(service("new"))
        api.compact()  # and the history went while the server was down
        await asyncio.sleep(1.0)
        assert svc_keys(store) == {("default", "old"), ("default", "stays")}
        await wait_until_async(
            lambda: svc_keys(store) == {("default", "new"), ("default", "stays")},
            timeout=10,
            message="converged",
        )


async def test_bad_object_is_skipped_with_one_log_line(
    api: FakeApiServer, kubeconfig: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad = service("broken")
    bad["spec"]["ports"][0]["port"] = 70000
    api.create(bad)
    api.create(service("good"))
    caplog.set_level(logging.WARNING, logger="uproxy.kube")
    async with running(kubeconfig) as (_source, store, hooks):
        await wait_until_async(lambda: hooks.synced_count == 1, timeout=10, message="synced")
        api.create(service("good2"))
        await wait_until_async(lambda: ("default", "good2") in svc_keys(store), timeout=10)
        assert {e.port.name.name for e in store.table().values()} == {"good", "good2"}
        # A re-list brings the same bad object again: still one line.
        api.drop_streams()
        api.compact()
        await wait_until_async(
            lambda: len(api.list_requests("services")) == 2, timeout=10, message="re-list"
        )
        api.create(service("good3"))
        await wait_until_async(lambda: ("default", "good3") in svc_keys(store), timeout=10)
    lines = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "spec.ports[0]" in lines[0] and "\n" not in lines[0]


async def test_node_zone_and_termination(api: FakeApiServer, kubeconfig: str) -> None:
    api.create(node(NODE, zone="zone-a"))
    api.create(node("other", zone="zone-b"))
    async with running(kubeconfig) as (source, _store, hooks):
        await wait_until_async(lambda: source.node_zone == "zone-a", timeout=10, message="zone")
        assert source.node_terminating is False
        assert all(
            r.query.get("fieldSelector") == f"metadata.name={NODE}"
            for r in api.requests
            if r.resource == "nodes"
        )
        changes = hooks.changes
        api.update(
            node(
                NODE,
                zone="zone-a",
                taints=[
                    {"key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule"}
                ],
            )
        )
        await wait_until_async(lambda: source.node_terminating, timeout=10, message="tainted")
        assert hooks.changes > changes
        api.update(node("other", zone="zone-c"))
        await asyncio.sleep(0.2)
        assert source.node_zone == "zone-a"
        marked = node(NODE, zone="zone-a")
        marked["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        api.update(marked)
        await wait_until_async(lambda: source.node_terminating, timeout=10, message="being deleted")


async def test_check_config(tmp_path: Path, kubeconfig: str) -> None:
    await check_config(kubeconfig, None)
    await check_config(kubeconfig, "http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="not found") as missing:
        await check_config(str(tmp_path / "nope"), None)
    assert str(tmp_path / "nope") in str(missing.value)
    broken = tmp_path / "broken"
    broken.write_text("clusters: [ {name: x\n")
    with pytest.raises(ConfigError, match="bad kubeconfig") as bad:
        await check_config(str(broken), None)
    assert "\n" not in str(bad.value)
    empty = tmp_path / "empty"
    empty.write_text("apiVersion: v1\nkind: Config\n")
    with pytest.raises(ConfigError):
        await check_config(str(empty), None)


async def test_watch_ended_by_the_server_resumes_from_the_last_version(
    api: FakeApiServer, kubeconfig: str
) -> None:
    api.create(service("web"))
    settings = dataclasses.replace(FAST, watch_timeout_seconds=1)
    async with running(kubeconfig, settings) as (_source, store, hooks):
        await wait_until_async(lambda: hooks.synced_count == 1, timeout=10, message="synced")
        # A write to another kind moves the global version; only bookmarks tell the
        # services watch about it.
        api.create(endpoint_slice("web", ["10.244.9.9"]))
        moved_to = api.resource_version
        await wait_until_async(
            lambda: any(
                int(r.query["resourceVersion"]) >= moved_to for r in api.watch_requests("services")
            ),
            timeout=10,
            message="a watch resumed from a bookmark's version",
        )
        watches = api.watch_requests("services")
        assert all(r.query["timeoutSeconds"] == "1" for r in watches)
        assert all(r.query["allowWatchBookmarks"] == "true" for r in watches)
        versions = [int(r.query["resourceVersion"]) for r in watches]
        assert versions == sorted(versions)
        assert len(api.list_requests("services")) == 1  # resumed, never re-listed
        api.update(service("web", cluster_ip="10.96.7.7"))
        await wait_until_async(
            lambda: store.raw("Service")[("default", "web")]["spec"]["clusterIP"] == "10.96.7.7",
            timeout=10,
        )


async def test_http_410_on_a_watch_request_relists(api: FakeApiServer, kubeconfig: str) -> None:
    api.create(service("web"))
    async with running(kubeconfig) as (_source, _store, hooks):
        await wait_until_async(lambda: hooks.synced_count == 1, timeout=10, message="synced")
        await wait_until_async(
            lambda: len(api.watch_requests()) == 3, timeout=10, message="three watches"
        )
        assert len(api.list_requests()) == 3
        api.fail_next(1, 410)
        api.drop_streams()
        await wait_until_async(
            lambda: any(r.status == 410 for r in api.requests), timeout=10, message="the 410"
        )
        gone = next(r for r in api.requests if r.status == 410)
        await wait_until_async(
            lambda: len(api.list_requests(gone.resource)) == 2,
            timeout=10,
            message="re-list after 410",
        )
        await asyncio.sleep(0.3)
        assert len(api.list_requests()) == 4  # only that resource listed again


@pytest.mark.parametrize(
    "scenario",
    [
        test_create_update_delete_reach_the_store,
        test_deletion_missed_during_a_drop_is_applied_after_410,
        test_silent_stream_is_reconnected_after_the_inactivity_timeout,
        test_429_retry_after_is_honoured,
    ],
    ids=lambda f: f.__name__.removeprefix("test_"),
)
def test_on_uvloop(
    tmp_path: Path, scenario: Callable[[FakeApiServer, str], Awaitable[None]]
) -> None:
    """The daemon runs on uvloop by default: the same scenarios on it."""

    async def main() -> None:
        server = FakeApiServer(bookmark_interval=0.3)
        await server.start()
        try:
            await scenario(server, str(server.write_kubeconfig(tmp_path / "kubeconfig")))
        finally:
            await server.stop()

    run_on("uvloop", main, timeout=None)


async def test_bounded_history_expires_old_versions(tmp_path: Path) -> None:
    server = FakeApiServer(history_size=5, bookmark_interval=3600.0)
    await server.start()
    try:
        kubeconfig = str(server.write_kubeconfig(tmp_path / "kubeconfig"))
        server.create(service("first"))
        async with running(kubeconfig) as (_source, store, hooks):
            await wait_until_async(lambda: hooks.synced_count == 1, timeout=10, message="synced")
            server.outage(1.0)  # streams cut; meanwhile more changes than the history holds
            server.delete("Service", "default", "first")
            for i in range(10):
                server.create(service(f"s{i}"))
            want = {("default", f"s{i}") for i in range(10)}
            await wait_until_async(lambda: svc_keys(store) == want, timeout=10, message="converged")
            assert len(server.list_requests("services")) == 2  # 410, then one re-list
    finally:
        await server.stop()


async def test_fake_server_runs_as_a_program(tmp_path: Path) -> None:
    manifest = tmp_path / "objects.yaml"
    manifest.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
        "spec: {clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}\n"
    )
    kubeconfig = tmp_path / "kubeconfig"
    repo = Path(__file__).parents[2]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.k8s.apiserver", "--kubeconfig", str(kubeconfig),
        "--load", str(manifest), cwd=repo, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"fake API server on http://127.0.0.1:" in line
        async with running(str(kubeconfig)) as (_source, store, hooks):
            await wait_until_async(lambda: hooks.synced_count == 1, timeout=10, message="synced")
            assert svc_keys(store) == {("default", "web")}
    finally:
        proc.terminate()
        await proc.wait()


async def test_config_from_the_environment(
    kubeconfig: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cli reads the environment once and hands the source the path ($KUBECONFIG last).
    none = Settings()
    await check_config(kubeconfig_path(none, {"KUBECONFIG": kubeconfig}), None)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="not running in a pod"):
        await check_config(kubeconfig_path(none, {}), None)
    with pytest.raises(ConfigError, match="must start with http"):
        await check_config(kubeconfig, "127.0.0.1:6443")


async def test_error_event_too_large_version_relists(api: FakeApiServer, kubeconfig: str) -> None:
    api.create(service("web"))
    api.create(service("old"))
    async with running(kubeconfig) as (_source, store, hooks):
        await wait_until_async(lambda: hooks.synced_count == 1, timeout=10, message="synced")
        api.restore_from_backup(api.resource_version - 5)
        api.drop_streams()
        api.delete("Service", "default", "old")
        await wait_until_async(
            lambda: svc_keys(store) == {("default", "web")}, timeout=10, message="re-listed"
        )
        assert len(api.list_requests("services")) == 2
