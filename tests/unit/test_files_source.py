"""The manifests source (uproxy.sources.files): reading, following edits, keeping good content."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import yaml

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
