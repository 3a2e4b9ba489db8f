"""List+watch of one resource, shaped after client-go's reflector.

List (paged with ``limit``/``continue``), remember the list's
``resourceVersion``, watch from it with bookmarks and a server-side timeout,
and advance the version on every event. ``410 Gone`` (on the watch request, as
an ``ERROR`` event, or an expired ``continue`` token) means the version is too
old: list again, and the owner replaces its snapshot. Everything else that can
go wrong with the network or the server (drops, 5xx, 429 with ``Retry-After``,
a stream that goes silent past the inactivity timeout) is retried with capped
exponential backoff and jitter, logged once per distinct problem.

Responses are read raw (``_preload_content=False``): the JSON goes to the
callbacks as plain dicts in API shape, because the model parses API dicts, not
kubernetes_asyncio's generated classes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from uproxy.settings import KubeSettings
from uproxy.sources.kube.backoff import Backoff, LogLimiter
from uproxy.sources.kube.config import one_line

log = logging.getLogger("uproxy.kube")

_MAX_RETRY_AFTER = 600.0


class Gone(Exception):
    """The resourceVersion (or continue token) is too old: re-list."""


class Retry(Exception):
    """A failure worth retrying; ``retry_after`` is the server's wish, if any."""

    def __init__(
        self, message: str, retry_after: float | None = None, *, relist: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.relist = relist


def retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, min(float(value), _MAX_RETRY_AFTER))
    except ValueError:
        return None


def status_error(what: str, status: int, body: bytes, headers: Mapping[str, str]) -> Exception:
    try:
        message = str(json.loads(body).get("message") or "")
    except (ValueError, AttributeError):
        message = ""
    detail = f"{what}: HTTP {status}" + (f": {one_line(message)}" if message else "")
    if status == 410:
        return Gone(detail)
    return Retry(detail, retry_after(headers))


def api_path(group: str, version: str, resource: str) -> str:
    return f"/api/{version}/{resource}" if not group else f"/apis/{group}/{version}/{resource}"


class Reflector:
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
        self._backoff = Backoff(settings.backoff_initial, settings.backoff_max)
        self._problems = LogLimiter(log)
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
            except Gone as gone:
                log.info("%s: %s; listing again", self._what, gone)
                version = None
                gone_in_a_row = 0 if self._progress else gone_in_a_row + 1
                if gone_in_a_row > 1:  # 410 right after a fresh list: do not spin
                    await asyncio.sleep(self._backoff.next_delay())
            except Retry as err:
                if err.relist:
                    version = None
                await self._failed(str(err), err.retry_after)
            except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
                await self._failed(f"{type(exc).__name__}: {one_line(exc)}")
            except Exception as exc:  # never let one resource take the source down
                await self._failed(f"unexpected {type(exc).__name__}: {one_line(exc)}")

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
                    raise status_error("list", resp.status, body, resp.headers)
            doc = json.loads(body)
            if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict):
                raise Retry("list: response is not a list")
            page = doc.get("items") or []
            items.extend(obj for obj in page if isinstance(obj, dict))
            meta = doc["metadata"]
            token = meta.get("continue") or None
            if token is None:
                version = str(meta.get("resourceVersion") or "")
                if not version:
                    raise Retry("list: no resourceVersion in the list")
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
                raise status_error("watch", resp.status, body, resp.headers)
            self._problems.recovered(f"{self._what}: watching again")
            while True:
                try:
                    async with asyncio.timeout(inactivity):
                        line = await resp.content.readline()
                except TimeoutError:
                    raise Retry(
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
                    raise Retry("watch: malformed event")
                if kind == "ERROR":
                    code = obj.get("code")
                    message = one_line(obj.get("message") or obj.get("reason") or "")
                    if code == 410:
                        raise Gone(f"watch: 410 Gone: {message}")
                    # e.g. "too large resource version" after an etcd restore: the
                    # version is no good; a fresh list always is.
                    raise Retry(f"watch: error event {code}: {message}", relist=True)
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
