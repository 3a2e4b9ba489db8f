"""The manifests source: Services, EndpointSlices and Endpoints from YAML/JSON on disk.

Paths are files or directories (``*.yaml``, ``*.yml``, ``*.json``, not
recursive), each file multi-document or a ``kind: List``. The files are
polled for changes (size, mtime, inode) a few times a second — cheap, and it
works on every filesystem and with editors that replace files. A file that no
longer parses keeps its last good content, with one log line, so a typo while
editing never tears services down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uproxy.sources import SourceHooks
from uproxy.state import KINDS, Store, key_of

log = logging.getLogger("uproxy.files")

SUFFIXES = (".yaml", ".yml", ".json")
POLL_INTERVAL = 0.25


class ManifestError(Exception):
    """A path given at start-up cannot be used: one line for the user."""


@dataclass(slots=True)
class _FileState:
    stamp: tuple[int, int, int]
    objects: list[tuple[str, Mapping[str, Any]]] = field(default_factory=list)


def check_paths(paths: tuple[str, ...]) -> None:
    """Start-up validation: every path exists and is a file or directory we can read."""
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ManifestError(f"{p}: no such file or directory (--manifests)")
        if not (path.is_file() or path.is_dir()) or not os.access(path, os.R_OK):
            raise ManifestError(f"{p}: not a readable file or directory (--manifests)")


def manifest_files(paths: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(sorted(c for c in path.iterdir() if c.suffix in SUFFIXES and c.is_file()))
        elif path.is_file():
            out.append(path)
    return out


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def read_objects(path: Path) -> list[tuple[str, Mapping[str, Any]]]:
    """Every Service/EndpointSlice/Endpoints in one file; raises ValueError on a syntax error."""
    text = path.read_text()
    if path.suffix == ".json":
        try:
            docs: list[Any] = [json.loads(text)]
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
    else:
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"not valid YAML{where}: {problem}") from None
    return list(_objects(docs))


def _objects(docs: list[Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for doc in docs:
        if not isinstance(doc, Mapping):
            continue
        kind = doc.get("kind")
        if kind == "List" or (isinstance(kind, str) and kind.endswith("List")):
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise ValueError(f"{kind}: items must be a list")
            yield from _objects(items)
        elif kind in KINDS:
            yield str(kind), doc


class FilesSource:
    """Reads the manifests, then follows edits until cancelled."""

    name = "files"

    def __init__(self, paths: tuple[str, ...], *, poll_interval: float = POLL_INTERVAL) -> None:
        self.paths = paths
        self.poll_interval = poll_interval
        self._files: dict[Path, _FileState] = {}

    def load(self, store: Store) -> bool:
        """Re-read changed files and push the whole set into the store; True if it changed."""
        changed_files = False
        current = manifest_files(self.paths)
        for path in current:
            stamp = _stamp(path)
            state = self._files.get(path)
            if stamp is None or (state is not None and state.stamp == stamp):
                continue
            changed_files = True
            try:
                objects = read_objects(path)
            except (ValueError, OSError, UnicodeDecodeError) as exc:
                keeping = " (keeping its last good content)" if state and state.objects else ""
                msg = exc.strerror if isinstance(exc, OSError) else str(exc)
                log.error("%s: %s%s", path, msg, keeping)
                self._files[path] = _FileState(stamp, state.objects if state else [])
                continue
            self._files[path] = _FileState(stamp, objects)
        for gone in [p for p in self._files if p not in current]:
            del self._files[gone]
            changed_files = True
        if not changed_files:
            return False
        before = store.generation
        by_kind: dict[str, list[tuple[Mapping[str, Any], str]]] = {k: [] for k in KINDS}
        seen: dict[tuple[str, tuple[str, str]], Path] = {}
        for path, state in self._files.items():
            for kind, obj in state.objects:
                key = key_of(obj)
                if key is not None:
                    first = seen.get((kind, key))
                    if first is None:
                        seen[(kind, key)] = path
                    else:
                        log.error("%s: %s %s/%s: metadata.name: already defined in %s; ignored",
                                  path, kind, key[0], key[1], first)
                        continue
                by_kind[kind].append((obj, str(path)))
        for kind, objs in by_kind.items():
            for problem in store.replace(kind, objs):
                log.error("%s", problem)
        return store.generation != before

    async def run(self, store: Store, hooks: SourceHooks) -> None:
        self.load(store)
        hooks.changed()
        hooks.synced()
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                if self.load(store):
                    hooks.changed()
            except OSError as exc:  # a directory vanished, permissions changed...
                log.error("reading manifests: %s", exc)
