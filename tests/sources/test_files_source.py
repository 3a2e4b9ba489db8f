"""The manifests source (uproxy.sources.files): reading, following edits, keeping good content."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.support.waiting import wait_until_async
from uproxy.model import ServicePortName
from uproxy.sources.files import FilesSource
from uproxy.state import Store

SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: multi-port
  namespace: default
spec:
  clusterIP: 10.0.0.180
  ports:
  - name: port1
    port: 6789
    targetPort: 6789
  - name: port2
    port: 9876
    targetPort: 9876
"""

SLICE = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: multi-port-x1
  namespace: default
  labels:
    kubernetes.io/service-name: multi-port
addressType: IPv4
ports:
- name: port1
  port: 6789
- name: port2
  port: 9876
endpoints:
- addresses: [172.17.0.5]
- addresses: [172.17.0.6]
"""

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: multi-port
spec:
  replicas: 2
"""

PORT1 = ServicePortName("default", "multi-port", "port1", "TCP")
LOG = "uproxy.files"


def write(path: Path, text: str) -> None:
    """Write like an editor would; move mtime on so a same-size edit is still seen."""
    before = path.stat().st_mtime_ns if path.exists() else None
    path.write_text(text)
    if before is not None:
        os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def endpoints(store: Store, name: ServicePortName = PORT1) -> list[str]:
    return [str(e) for e in store.table()[name].endpoints]


def test_multi_document_yaml_with_unknown_kinds(tmp_path: Path) -> None:
    f = tmp_path / "all.yaml"
    write(f, "---\n".join([DEPLOYMENT, SERVICE, SLICE, "just a string\n", ""]))
    store = Store()
    assert FilesSource((str(f),)).load(store) is True
    assert endpoints(store) == ["172.17.0.5:6789", "172.17.0.6:6789"]
    assert store.keys("Service") == {("default", "multi-port")}


def test_kind_list_and_json_in_a_directory(tmp_path: Path) -> None:
    svc = yaml.safe_load(SERVICE)
    sl = yaml.safe_load(SLICE)
    write(tmp_path / "a-list.yaml", yaml.safe_dump({"apiVersion": "v1", "kind": "List",
                                                    "items": [svc]}))
    write(tmp_path / "b-slice.json", json.dumps(sl))
    write(tmp_path / "notes.txt", "not a manifest: [")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "ignored.yaml", SERVICE.replace("multi-port", "nested"))
    store = Store()
    assert FilesSource((str(tmp_path),)).load(store) is True
    assert endpoints(store) == ["172.17.0.5:6789", "172.17.0.6:6789"]
    assert store.keys("Service") == {("default", "multi-port")}


def test_an_edit_is_picked_up(tmp_path: Path) -> None:
    write(tmp_path / "svc.yaml", SERVICE)
    write(tmp_path / "slice.yaml", SLICE)
    store = Store()
    source = FilesSource((str(tmp_path),))
    assert source.load(store) is True
    assert source.load(store) is False  # nothing changed
    g = store.generation
    write(tmp_path / "slice.yaml", SLICE.replace("172.17.0.6", "172.17.0.7"))
    assert source.load(store) is True
    assert store.generation > g
    assert endpoints(store) == ["172.17.0.5:6789", "172.17.0.7:6789"]


def test_touch_without_change_reports_no_change(tmp_path: Path) -> None:
    f = tmp_path / "svc.yaml"
    write(f, SERVICE)
    store = Store()
    source = FilesSource((str(f),))
    source.load(store)
    write(f, SERVICE)
    assert source.load(store) is False


def test_syntax_error_keeps_the_last_good_content(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "slice.yaml"
    write(f, SLICE)
    write(tmp_path / "svc.yaml", SERVICE)
    store = Store()
    source = FilesSource((str(tmp_path),))
    source.load(store)
    before = endpoints(store)
    caplog.set_level(logging.INFO, logger=LOG)
    write(f, SLICE + "- addresses: [172.17.0.9\n  bad: {\n")
    assert source.load(store) is False
    assert endpoints(store) == before
    errors = [r for r in caplog.records if r.name == LOG and r.levelno >= logging.ERROR]
    assert len(errors) == 1
    line = errors[0].getMessage()
    assert "\n" not in line
    assert line.startswith(f"{f}: not valid YAML")
    assert "keeping its last good content" in line
    # Polling again does not repeat the line.
    assert source.load(store) is False
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    # Fixed: the new content is used.
    write(f, SLICE.replace("172.17.0.6", "172.17.0.8"))
    assert source.load(store) is True
    assert endpoints(store) == ["172.17.0.5:6789", "172.17.0.8:6789"]


def test_bad_json_from_the_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "svc.json"
    write(f, '{"kind": "Service", ')
    caplog.set_level(logging.INFO, logger=LOG)
    store = Store()
    FilesSource((str(f),)).load(store)
    assert store.table() == {}
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage().startswith(f"{f}: not valid JSON")
    assert "\n" not in record.getMessage()


def test_duplicate_object_in_two_files_first_kept(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "a.yaml", SERVICE)
    write(tmp_path / "b.yaml", SERVICE.replace("10.0.0.180", "10.0.0.181"))
    caplog.set_level(logging.INFO, logger=LOG)
    store = Store()
    FilesSource((str(tmp_path),)).load(store)
    assert store.table()[PORT1].port.cluster_ips == ("10.0.0.180",)
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    line = record.getMessage()
    assert "\n" not in line
    assert line.startswith(f"{tmp_path / 'b.yaml'}: Service default/multi-port")
    assert "already defined in" in line and str(tmp_path / "a.yaml") in line


def test_deleting_a_file_removes_its_objects(tmp_path: Path) -> None:
    write(tmp_path / "svc.yaml", SERVICE)
    write(tmp_path / "slice.yaml", SLICE)
    store = Store()
    source = FilesSource((str(tmp_path),))
    source.load(store)
    (tmp_path / "slice.yaml").unlink()
    assert source.load(store) is True
    assert endpoints(store) == []
    (tmp_path / "svc.yaml").unlink()
    assert source.load(store) is True
    assert store.table() == {}


def test_bad_object_is_logged_with_its_file(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "svc.yaml"
    write(f, SERVICE.replace("port: 9876", "port: 98760"))
    caplog.set_level(logging.INFO, logger=LOG)
    store = Store()
    FilesSource((str(f),)).load(store)
    assert [str(n) for n in store.table()] == ["default/multi-port:port1"]
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == (
        f"{f}: Service default/multi-port: spec.ports[1].port: 98760 is outside 1-65535")


def test_malformed_list_and_binary_file_are_one_line_each(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "svc.yaml"
    write(f, SERVICE)
    write(tmp_path / "binary.yaml", "")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    caplog.set_level(logging.INFO, logger=LOG)
    store = Store()
    source = FilesSource((str(tmp_path),))
    source.load(store)
    assert store.keys("Service") == {("default", "multi-port")}
    write(f, "kind: List\nitems: 5\n")
    source.load(store)
    assert store.keys("Service") == {("default", "multi-port")}  # last good content kept
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 2, lines
    assert lines[0].startswith(str(tmp_path / "binary.yaml") + ": ")
    assert lines[1].startswith(f"{f}: List: items must be a list")
    assert all("\n" not in line for line in lines)


def test_duplicate_takes_over_when_the_first_file_goes(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", SERVICE)
    write(tmp_path / "b.yaml", SERVICE.replace("10.0.0.180", "10.0.0.181"))
    store = Store()
    source = FilesSource((str(tmp_path),))
    source.load(store)
    (tmp_path / "a.yaml").unlink()
    assert source.load(store) is True
    assert store.table()[PORT1].port.cluster_ips == ("10.0.0.181",)


def test_broken_at_start_then_fixed(tmp_path: Path) -> None:
    f = tmp_path / "svc.yaml"
    write(f, "kind: Service\nmetadata: {name: [\n")
    store = Store()
    source = FilesSource((str(f),))
    assert source.load(store) is False
    write(f, SERVICE)
    assert source.load(store) is True
    assert PORT1 in store.table()


def _svc(name: str, ip: str, port: int = 80) -> str:
    return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n"
            f"spec: {{clusterIP: {ip}, ports: [{{port: {port}}}]}}\n")


def test_incremental_load_matches_a_fresh_read_after_every_edit(tmp_path: Path) -> None:
    """Only changed files are applied; the store must still equal a full fresh read:
    objects moving between files, duplicates taking over, deletions, broken files."""
    edits: list[tuple[str, str | None]] = [
        ("a.yaml", _svc("x", "10.0.0.1") + "---\n" + _svc("y", "10.0.0.2")),
        ("b.yaml", _svc("y", "10.0.0.3") + "---\n" + _svc("z", "10.0.0.4")),
        ("c.json", json.dumps({"kind": "List", "items": [yaml.safe_load(SERVICE),
                                                         yaml.safe_load(SLICE)]})),
        ("a.yaml", _svc("x", "10.0.0.1", 81)),            # y moves to b's copy
        ("b.yaml", "kind: Service\nmetadata: {name: [\n"),  # broken: b's last good kept
        ("a.yaml", None),                                  # x gone
        ("b.yaml", _svc("z", "10.0.0.5") + "---\n" + _svc("z", "10.0.0.6")),  # repeated
        ("d.yaml", _svc("z", "10.0.0.7") + "---\n" + SLICE),  # later file: b's z wins
        ("b.yaml", None),                                  # now d's z
        ("c.json", None),                                  # the slice stays (d has it)
        ("d.yaml", SERVICE),
    ]
    store = Store()
    source = FilesSource((str(tmp_path),))
    broken = False  # while b.yaml is broken a fresh reader lacks its last good content
    for name, text in edits:
        if text is None:
            (tmp_path / name).unlink()
        else:
            write(tmp_path / name, text)
        if name == "b.yaml":
            broken = text is not None and "[\n" in text
        source.load(store)
        fresh = Store()
        FilesSource((str(tmp_path),)).load(fresh)
        if broken:
            assert store.keys("Service") >= {("default", "y"), ("default", "z")}
            continue
        assert store.table() == fresh.table(), (name, text)
        for kind in ("Service", "EndpointSlice"):
            assert store.raw(kind) == fresh.raw(kind), (name, kind)


async def test_a_write_wakes_the_source_before_the_next_poll(tmp_path: Path) -> None:
    """inotify: with a 30 s poll, an edit is still seen at once."""
    write(tmp_path / "svc.yaml", SERVICE)
    store = Store()

    class Hooks:
        changes = 0

        def changed(self) -> None:
            self.changes += 1

        def synced(self) -> None:
            pass

    hooks = Hooks()
    source = FilesSource((str(tmp_path),), poll_interval=30.0)
    task = asyncio.create_task(source.run(store, hooks))
    try:
        await wait_until_async(lambda: hooks.changes > 0, timeout=2, interval=0.01,
                               message="the first read")
        assert hooks.changes == 1
        (tmp_path / "slice.yaml.tmp").write_text(SLICE)
        (tmp_path / "slice.yaml.tmp").rename(tmp_path / "slice.yaml")  # as editors save
        await wait_until_async(lambda: hooks.changes == 2, timeout=2, interval=0.01,
                               message="the rename noticed")
        assert hooks.changes == 2, "the rename was not noticed within 2 s"
        assert endpoints(store) == ["172.17.0.5:6789", "172.17.0.6:6789"]
        write(tmp_path / "svc.yaml", SERVICE.replace("10.0.0.180", "10.0.0.181"))
        await wait_until_async(lambda: hooks.changes == 3, timeout=2, interval=0.01,
                               message="the edit noticed")
        assert hooks.changes == 3
        assert store.table()[PORT1].port.cluster_ips == ("10.0.0.181",)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_first_load_hands_the_loop_turns(tmp_path: Path) -> None:
    """At start the daemon's rule set-up (a chain of iptables/nft processes) needs loop
    turns while the manifests load: the first load gives some, every few hundred objects,
    and ends with the store a plain load() fills; later loads are one piece."""
    items = []
    for i in range(1000):
        svc = yaml.safe_load(SERVICE.replace("multi-port", f"svc-{i}")
                             .replace("10.0.0.180", f"10.1.{i // 250}.{i % 250 + 1}"))
        items += [svc, yaml.safe_load(SLICE.replace("multi-port", f"svc-{i}"))]
    (tmp_path / "many.json").write_text(json.dumps({"kind": "List", "items": items}))
    store, plain = Store(), Store()
    assert FilesSource((str(tmp_path),)).load(plain) is True
    turns = 0
    loading = True

    async def beside() -> None:
        nonlocal turns
        while loading:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(beside())
    await asyncio.sleep(0)  # (it has started)
    turns = 0
    source = FilesSource((str(tmp_path),))
    assert await source._first_load(store) is True
    loading = False
    await other
    assert turns >= 2000 // 200 - 1, f"the loop ran {turns} times during the first load"
    assert store.table() == plain.table()
    assert len(store.table()) == 2000
    assert store.raw("EndpointSlice") == plain.raw("EndpointSlice")
    turns, loading = 0, True
    other = asyncio.create_task(beside())
    await asyncio.sleep(0)
    turns = 0
    write(tmp_path / "many.json", json.dumps({"kind": "List", "items": items[:-2]}))
    assert source.load(store) is True  # a later load: in one piece
    loading = False
    await other
    assert turns <= 1
    assert len(store.table()) == 1998


def test_libyaml_reads_what_the_pure_loader_reads_and_errors_keep_its_words(
        tmp_path: Path) -> None:
    """The files source parses with libyaml's safe loader when PyYAML has it: the same
    objects as the pure-Python one (YAML 1.1 booleans, anchors, numbers), the same error
    line."""
    from uproxy.sources.files import _FAST_LOADER, read_objects

    text = SERVICE + textwrap.dedent("""\
        ---
        apiVersion: v1
        kind: Endpoints
        metadata: &meta {name: multi-port, namespace: default, labels: {on: yes, n: 010}}
        subsets:
        - addresses: [{ip: 172.17.0.5}, {ip: "172.17.0.6"}]
          ports: [{port: 6789, name: port1}, {port: 0x10, name: hex}]
        copy: *meta
        """)
    f = tmp_path / "all.yaml"
    write(f, text)
    assert [obj for _, obj in read_objects(f)] == list(yaml.safe_load_all(text))
    if getattr(yaml, "CSafeLoader", None) is not None:
        assert _FAST_LOADER is yaml.CSafeLoader
    bad = tmp_path / "bad.yaml"
    write(bad, SERVICE + "  oops: [1\n  bad: {\n")
    with pytest.raises(ValueError) as got:
        read_objects(bad)
    try:
        list(yaml.safe_load_all(bad.read_text()))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        assert mark is not None
        assert str(got.value) == f"not valid YAML at line {mark.line + 1}: {exc.problem}"
    else:
        raise AssertionError("the pure loader read the broken file")
