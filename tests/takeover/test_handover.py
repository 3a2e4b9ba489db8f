"""The takeover's I/O (uproxy/proxy/handover.py) with real Unix sockets and real fds.

The running side is a :class:`HandoverServer` on an event loop with a stand-in
daemon holding real listening sockets; the new side is :func:`take_over` (in a
thread, as it blocks) or a raw client that misbehaves on purpose.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from uproxy.proxy.handover import HandoverServer, Received, TakeoverExit, netns_id, take_over
from uproxy.takeover import VERSION, FrameDecoder, Item, encode


class StandIn:
    """The daemon's side of a takeover, holding ``count`` real listening sockets."""

    def __init__(self, count: int) -> None:
        self.socks = []
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(8)
            self.socks.append(sock)
        self.paused = self.released = False
        self.resumed: list[str] = []
        self.log: list[str] = []  # settle, unsettle and pause, in order
        self.rules_done: asyncio.Event | None = None  # settle waits for it (rules in flight)
        self.held = False

    async def settle(self) -> None:
        try:
            if self.rules_done is not None:
                await self.rules_done.wait()
        except asyncio.CancelledError:
            self.log.append("settle given up")
            raise
        self.held = True
        self.log.append("settled")

    def settle_at_once(self) -> bool:
        if self.rules_done is not None and not self.rules_done.is_set():
            return False
        self.held = True
        self.log.append("settled at once")
        return True

    def unsettle(self) -> None:
        if self.held:
            self.held = False
            self.log.append("unsettled")

    def pause(self) -> None:
        self.paused = True
        self.log.append("paused")

    def inventory(self) -> list[tuple[Item, list[socket.socket]]]:
        return [(Item("listener", {"port": s.getsockname()[1]}), [s]) for s in self.socks]

    def resume(self, reason: str) -> None:
        self.resumed.append(reason)

    def release(self) -> None:
        self.released = True
        for sock in self.socks:
            sock.close()

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def _serving(tmp_path: Path, stand_in: StandIn, new_side: Callable[[], object], *,
             rules_for: float | None = None, settle_wait: float = 5.0) -> object:
    """Run ``new_side`` in a thread while a HandoverServer serves ``stand_in``; with
    ``rules_for``, the stand-in's rules work in flight ends that many seconds after the
    start (never, when it is longer than the test)."""

    async def main() -> object:
        server = HandoverServer(asyncio.get_running_loop(), str(tmp_path), stand_in, timeout=5)
        server.settle_wait = settle_wait
        if rules_for is not None:
            done = stand_in.rules_done = asyncio.Event()
            asyncio.get_running_loop().call_later(rules_for, done.set)
        server.start()
        try:
            return await asyncio.to_thread(new_side)
        finally:
            server.close()

    return asyncio.run(main())


def test_no_running_uproxy_means_a_fresh_start(tmp_path: Path) -> None:
    assert take_over(str(tmp_path)) is None
    assert take_over(str(tmp_path / "missing")) is None


def test_a_stale_socket_of_a_crashed_uproxy_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "takeover.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # bound, never listening: what a killed process leaves
    assert take_over(str(tmp_path)) is None
    assert not path.exists()


def test_every_listening_socket_comes_over_in_batches_and_keeps_its_backlog(
        tmp_path: Path) -> None:
    stand_in = StandIn(300)  # more than one SCM_RIGHTS message holds
    waiting = socket.create_connection(stand_in.socks[299].getsockname())  # in the backlog
    try:
        ports = [s.getsockname()[1] for s in stand_in.socks]
        received = _serving(tmp_path, stand_in, lambda: take_over(str(tmp_path)))
        assert isinstance(received, Received)
        assert stand_in.paused and stand_in.released and not stand_in.resumed
        items = received.of_kind("listener")
        assert [item.meta["port"] for item, _ in items] == ports
        assert [socks[0].getsockname()[1] for _, socks in items] == ports
        last = items[-1][1][0]
        last.settimeout(5)
        accepted, _ = last.accept()  # the connection that waited during the switch
        accepted.close()
        assert received.close_unclaimed(set()) == 300
    finally:
        waiting.close()
        stand_in.close()
    # The socket file is the new uproxy's to replace now: the old one leaves it alone.
    assert (tmp_path / "takeover.sock").exists()


def test_the_rules_in_flight_finish_before_anything_is_paused_or_sent(tmp_path: Path) -> None:
    """An nft -f that the old process started before the hello lands before the new
    process's first sync: the old one settles (serving on) before it pauses and offers."""
    stand_in = StandIn(2)
    began = time.monotonic()
    received = _serving(tmp_path, stand_in, lambda: take_over(str(tmp_path)), rules_for=0.4)
    assert isinstance(received, Received)
    assert time.monotonic() - began >= 0.4
    assert stand_in.log == ["settled", "paused"]  # and the lock is kept: released
    assert stand_in.released and stand_in.held
    received.close_unclaimed(set())


def test_a_failed_takeover_lets_the_rules_work_go_on(tmp_path: Path) -> None:
    stand_in = StandIn(2)

    def script(sock: socket.socket, decoder: FrameDecoder) -> object:
        sock.sendall(encode({"type": "hello", "version": VERSION, "netns": netns_id()}))
        return _frames(sock, decoder, "offer")  # then goes away without "owned"

    _serving(tmp_path, stand_in, _raw(tmp_path, script), rules_for=0.1)
    assert stand_in.log == ["settled", "paused", "unsettled"]
    assert not stand_in.released and len(stand_in.resumed) == 1
    # with nothing in flight: settled in the hello's callback, and unsettled just the same
    stand_in.log.clear()
    stand_in.rules_done = None
    _serving(tmp_path, stand_in, _raw(tmp_path, script))
    assert stand_in.log == ["settled at once", "paused", "unsettled"]
    assert not stand_in.released and len(stand_in.resumed) == 2
    stand_in.close()


def test_rules_that_never_finish_hold_a_takeover_up_only_for_the_settle_wait(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stand_in = StandIn(1)
    began = time.monotonic()
    received = _serving(tmp_path, stand_in, lambda: take_over(str(tmp_path)),
                        rules_for=60.0, settle_wait=0.3)
    assert isinstance(received, Received) and stand_in.released
    assert 0.3 <= time.monotonic() - began < 5.0
    assert stand_in.log == ["settle given up", "paused"] and not stand_in.held
    assert "rules still being applied after 0.3s; handing over anyway" in caplog.text
    received.close_unclaimed(set())


def _raw(tmp_path: Path, script: Callable[[socket.socket, FrameDecoder], object]
         ) -> Callable[[], object]:
    def run() -> object:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(5)
        sock.connect(str(tmp_path / "takeover.sock"))
        try:
            return script(sock, FrameDecoder())
        finally:
            sock.close()
    return run


def _frames(sock: socket.socket, decoder: FrameDecoder, until: str) -> list[dict[str, object]]:
    frames: list[dict[str, object]] = []
    while not any(f["type"] == until for f in frames):
        data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 253)
        for fd in fds:
            os.close(fd)
        assert data, frames
        frames += decoder.feed(data)
    return frames


def test_another_format_is_refused_and_the_old_keeps_serving(tmp_path: Path) -> None:
    stand_in = StandIn(1)

    def script(sock: socket.socket, decoder: FrameDecoder) -> object:
        sock.sendall(encode({"type": "hello", "version": VERSION + 1, "netns": netns_id()}))
        return _frames(sock, decoder, "refuse")

    frames = _serving(tmp_path, stand_in, _raw(tmp_path, script))
    assert isinstance(frames, list) and "format 2" in str(frames[-1]["reason"])
    assert not stand_in.paused and not stand_in.released
    stand_in.close()


def test_a_peer_in_another_network_namespace_is_refused(tmp_path: Path) -> None:
    stand_in = StandIn(1)

    def script(sock: socket.socket, decoder: FrameDecoder) -> object:
        sock.sendall(encode({"type": "hello", "version": VERSION, "netns": "net:[1]"}))
        return _frames(sock, decoder, "refuse")

    frames = _serving(tmp_path, stand_in, _raw(tmp_path, script))
    assert isinstance(frames, list) and "namespace" in str(frames[-1]["reason"])
    assert not stand_in.paused
    stand_in.close()


def test_a_new_uproxy_that_dies_half_way_leaves_the_old_serving(tmp_path: Path) -> None:
    stand_in = StandIn(3)

    def script(sock: socket.socket, decoder: FrameDecoder) -> object:
        sock.sendall(encode({"type": "hello", "version": VERSION, "netns": netns_id()}))
        return _frames(sock, decoder, "offer")  # then goes away without "owned"

    _serving(tmp_path, stand_in, _raw(tmp_path, script))
    assert stand_in.paused and not stand_in.released
    assert len(stand_in.resumed) == 1
    for sock in stand_in.socks:  # still open, still listening
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    stand_in.close()


def test_a_new_uproxy_owning_fewer_fds_than_sent_leaves_the_old_serving(tmp_path: Path) -> None:
    stand_in = StandIn(2)

    def script(sock: socket.socket, decoder: FrameDecoder) -> object:
        sock.sendall(encode({"type": "hello", "version": VERSION, "netns": netns_id()}))
        _frames(sock, decoder, "fds")
        sock.sendall(encode({"type": "owned", "fds": 1}))
        return sock.recv(100)

    _serving(tmp_path, stand_in, _raw(tmp_path, script))
    assert not stand_in.released and "1 of 2" in stand_in.resumed[0]
    stand_in.close()


def _fake_old(tmp_path: Path, answer: Callable[[socket.socket], None]) -> threading.Thread:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "takeover.sock"))
    listener.listen(1)

    def serve() -> None:
        with listener:
            peer, _ = listener.accept()
            with peer:
                peer.settimeout(5)
                peer.recv(1 << 16)  # hello
                answer(peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_the_new_one_exits_2_when_refused(tmp_path: Path) -> None:
    thread = _fake_old(tmp_path, lambda peer: peer.sendall(
        encode({"type": "refuse", "reason": "handover format 1 is not this uproxy's 9"})))
    with pytest.raises(TakeoverExit) as caught:
        take_over(str(tmp_path), timeout=5)
    thread.join(5)
    assert caught.value.code == 2 and "format 1" in caught.value.line


def test_the_new_one_does_not_serve_when_the_old_vanishes_after_owned(tmp_path: Path) -> None:
    kept = socket.socket()

    def answer(peer: socket.socket) -> None:
        peer.sendall(encode({"type": "offer", "items": [{"kind": "listener", "fds": 1}],
                             "fds": 1}))
        socket.send_fds(peer, [encode({"type": "fds", "index": 0, "count": 1})], [kept.fileno()])
        peer.recv(1 << 16)  # owned; then gone without "released"

    thread = _fake_old(tmp_path, answer)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(TakeoverExit) as caught:
        take_over(str(tmp_path), timeout=5)
    thread.join(5)
    kept.close()
    assert caught.value.code == 1 and "not serving its sockets twice" in caught.value.line
    assert len(os.listdir("/proc/self/fd")) <= before  # the received copy was closed


def test_uproxy_run_says_why_in_one_line_and_exits_2_when_refused(tmp_path: Path) -> None:
    thread = _fake_old(tmp_path, lambda peer: peer.sendall(
        encode({"type": "refuse", "reason": "handover format 1 is not this uproxy's 9"})))
    manifests = tmp_path / "m"
    manifests.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "uproxy", "run", "--manifests", str(manifests),
         "--state-dir", str(tmp_path), "--status-address", "127.0.0.1:0",
         "--healthz-address", "127.0.0.1:0"],
        env={**os.environ, "UPROXY_MANAGE_IPTABLES": "false"},
        capture_output=True, text=True, timeout=30, check=False)
    thread.join(5)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "uproxy: takeover refused by the running uproxy: "
        "handover format 1 is not this uproxy's 9"), done.stderr
    assert "Traceback" not in done.stderr
