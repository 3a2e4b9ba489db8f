"""The manifests source: Services, EndpointSlices and Endpoints from YAML/JSON on disk.

Paths are files or directories (``*.yaml``, ``*.yml``, ``*.json``, not
recursive), each file multi-document or a ``kind: List``. The files are
polled for changes (size, mtime, inode) a few times a second — cheap, and it
works on every filesystem and with editors that replace files. On Linux an
inotify watch on the directories wakes the poll at once when a file is
written or moved in, so an edit is applied in milliseconds, not at the next
tick. A file that no longer parses keeps its last good content, with one log
line, so a typo while editing never tears services down.

Only the objects of changed files are applied to the store: with 10,000
services in one file and a small file edited beside it, a change costs the
small file's objects, not 20,000 comparisons.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uproxy.sources import SourceHooks
from uproxy.state import KINDS, Store, key_of

log = logging.getLogger("uproxy.files")

SUFFIXES = (".yaml", ".yml", ".json")
POLL_INTERVAL = 0.25
#: libyaml's parser with the safe constructor when PyYAML was built with it: the same
#: objects, ten times faster (a two-document edit: 0.5 ms, not 5 ms, of every change's
#: latency). Errors are worded by the pure loader, parsing again (rare, and the same words
#: with or without libyaml).
_FAST_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
YIELD_EVERY = 200  # objects applied between two loop turns in the first load (a few ms)


class ManifestError(Exception):
    """A path given at start-up cannot be used: one line for the user."""


Ref = tuple[str, tuple[str, str]]  # (kind, (namespace, name))


@dataclass(slots=True)
class _FileState:
    stamp: tuple[int, int, int]
    named: dict[Ref, Mapping[str, Any]] = field(default_factory=dict)  # first of each name
    repeated: list[Ref] = field(default_factory=list)  # names defined again in this file
    unnamed: list[tuple[str, Mapping[str, Any]]] = field(default_factory=list)

    @classmethod
    def of(cls, stamp: tuple[int, int, int],
           objects: list[tuple[str, Mapping[str, Any]]]) -> _FileState:
        state = cls(stamp)
        for kind, obj in objects:
            key = key_of(obj)
            if key is None:
                state.unnamed.append((kind, obj))
            elif (kind, key) in state.named:
                state.repeated.append((kind, key))
            else:
                state.named[(kind, key)] = obj
        return state


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
            docs = list(yaml.load_all(text, Loader=_FAST_LOADER))
        except yaml.YAMLError:
            docs = _pure_yaml(text)  # (raises the error as the pure loader words it)
    return list(_objects(docs))


def _pure_yaml(text: str) -> list[Any]:
    """``text``'s documents through PyYAML's pure-Python loader; raises ValueError."""
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"not valid YAML{where}: {problem}") from None


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
        self._defined_in: dict[Ref, set[Path]] = {}  # which files name each object

    def load(self, store: Store) -> bool:
        """Re-read changed files and apply their objects to the store; True if it changed."""
        steps = self._load(store)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                changed: bool = done.value
                return changed

    async def _first_load(self, store: Store) -> bool:
        """:meth:`load`, handing the loop a turn every :data:`YIELD_EVERY` objects.

        At start the daemon does not sync before ``synced()``, but its rule
        set-up (cleanup of an earlier run, hooks, transparent mode's probe: a chain
        of ``iptables``/``nft``/``ip`` processes) waits for loop turns between its
        steps; with 20,000 objects parsed in one go it waited for all of them
        (``bench/ANALYSIS.md``, "Start-up with 10,000 Services"). Later loads stay
        in one piece, so a sync never sees half of a file's change.
        """
        steps = self._load(store)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                changed: bool = done.value
                return changed
            await asyncio.sleep(0)

    def _load(self, store: Store) -> Generator[None, None, bool]:
        """The body of :meth:`load`: yields now and then; returns True if the store changed."""
        current = manifest_files(self.paths)
        order = {path: i for i, path in enumerate(current)}  # the first definition wins
        changed: dict[Path, _FileState | None] = {}  # path -> its state before
        for path in current:
            stamp = _stamp(path)
            state = self._files.get(path)
            if stamp is None or (state is not None and state.stamp == stamp):
                continue
            try:
                objects = read_objects(path)
            except (ValueError, OSError, UnicodeDecodeError) as exc:
                kept = state is not None and bool(state.named or state.unnamed)
                keeping = " (keeping its last good content)" if kept else ""
                msg = exc.strerror if isinstance(exc, OSError) else str(exc)
                log.error("%s: %s%s", path, msg, keeping)
                if state is not None:
                    state.stamp = stamp
                else:
                    self._files[path] = _FileState(stamp)
                continue
            self._files[path] = _FileState.of(stamp, objects)
            changed[path] = state
            yield
        for gone in [p for p in self._files if p not in order]:
            changed[gone] = self._files.pop(gone)
        if not changed:
            return False
        before = store.generation
        touched: dict[Ref, None] = {}  # in file order, so problems are logged in that order
        for path, old in changed.items():
            for ref in old.named if old is not None else ():
                owners = self._defined_in[ref]
                owners.discard(path)
                if not owners:
                    del self._defined_in[ref]
                touched[ref] = None
            new = self._files.get(path)
            if new is None:
                continue
            for ref in new.named:
                self._defined_in.setdefault(ref, set()).add(path)
                touched[ref] = None
            for ref in new.repeated:
                _log_duplicate(path, ref, path)
            for kind, obj in new.unnamed:
                for problem in store.apply(kind, obj, str(path)):
                    log.error("%s", problem)
        named = {path: (state.named, str(path)) for path, state in self._files.items()}
        defined_in, apply = self._defined_in, store.apply
        for count, ref in enumerate(touched, 1):
            if count % YIELD_EVERY == 0:
                yield
            kind, key = ref
            defined = defined_in.get(ref)
            if not defined:
                store.remove(kind, *key)
                continue
            if len(defined) == 1:
                (first,) = defined
            else:
                first, *others = sorted(defined, key=order.__getitem__)
                for path in others:
                    _log_duplicate(path, ref, first)
            by_ref, origin = named[first]
            for problem in apply(kind, by_ref[ref], origin, key=key):
                log.error("%s", problem)
        return store.generation != before

    async def run(self, store: Store, hooks: SourceHooks) -> None:
        await self._first_load(store)
        hooks.changed()
        hooks.synced()
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        notify = _Inotify.open(self.paths)
        if notify is not None:

            def notified() -> None:
                if notify.drain():
                    wake.set()

            loop.add_reader(notify.fd, notified)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval):
                        await wake.wait()
                wake.clear()
                try:
                    if self.load(store):
                        hooks.changed()
                except OSError as exc:  # a directory vanished, permissions changed...
                    log.error("reading manifests: %s", exc)
        finally:
            if notify is not None:
                loop.remove_reader(notify.fd)
                notify.close()


def _log_duplicate(path: Path, ref: Ref, first: Path) -> None:
    kind, (namespace, name) = ref
    log.error("%s: %s %s/%s: metadata.name: already defined in %s; ignored",
              path, kind, namespace, name, first)


class _Inotify:
    """Wake-ups for writes and renames in the manifest directories (Linux; else None).

    Only a hint: the poll still decides what changed, so a missed or spurious
    event costs nothing but a stat of each file. ``IN_CLOSE_WRITE``, not
    ``IN_MODIFY``, so a file is read once its writer is done with it.
    """

    MASK = (0x8 | 0x40 | 0x80 | 0x200 | 0x400 | 0x800 | 0x4)
    # IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF,
    # IN_ATTRIB (touch)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, paths: tuple[str, ...]) -> _Inotify | None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init, add = libc.inotify_init1, libc.inotify_add_watch
        except (OSError, AttributeError):
            return None
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            log.debug("inotify unavailable (%s); polling only", os.strerror(ctypes.get_errno()))
            return None
        dirs = {str(Path(p) if Path(p).is_dir() else Path(p).parent) for p in paths}
        watched = sum(add(fd, os.fsencode(d), cls.MASK) >= 0 for d in sorted(dirs))
        if not watched:
            os.close(fd)
            return None
        return cls(fd)

    def drain(self) -> bool:
        """Read every queued event (their content does not matter); True if there were any."""
        got = False
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self.fd, 65536):
                got = True
        return got

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
