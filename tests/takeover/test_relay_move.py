"""Moving a live connection from one relay to another (what a takeover does to it).

Real TCP sockets on loopback. The "other process" is a second relay on the same
loop that gets duplicates of the fds, as the receiving process gets them over
``SCM_RIGHTS``; the first relay then releases its own (close only: no FIN, no RST).
The whole matrix: both relays are the flavor's (the native engine hands the
connection back with what its pipe or buffer held, and takes one with that state).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket

import pytest

from tests.support.matrix import LOOPS, Flavor, relay_for, run_on
from uproxy.proxy.nativerelay import NativeRelay, NativeRelayHandle
from uproxy.proxy.pyrelay import PyRelay, PyRelayHandle
from uproxy.proxy.relay import (
    HANDED_OVER,
    AdoptingRelay,
    MovableHandle,
    Relay,
    RelayHandle,
    RelayResult,
    RelayState,
)


def _pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    near = socket.create_connection(listener.getsockname())
    far, _ = listener.accept()
    listener.close()
    for sock in (near, far):
        sock.setblocking(False)
    return near, far


def _dup(sock: socket.socket) -> socket.socket:
    return socket.socket(fileno=socket.dup(sock.fileno()))


async def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        chunk = await loop.sock_recv(sock, min(1 << 16, n - len(out)))
        assert chunk, f"EOF after {len(out)} of {n}"
        out += chunk
    return bytes(out)


def _assert_held_by(relay: Relay, handle: RelayHandle, flavor: Flavor) -> None:
    """The adopting relay is the flavor's and holds the connection itself (no fallback)."""
    if flavor.native:
        assert isinstance(relay, NativeRelay) and isinstance(handle, NativeRelayHandle)
        assert handle._twin is None and relay._resumed is None
        assert handle._conn is not None and list(relay._live.values()) == [handle]  # engine's
    else:
        assert isinstance(relay, PyRelay) and isinstance(handle, PyRelayHandle)
        assert relay.active() == 1


async def _wait_for(moved: list[RelayResult]) -> None:
    for _ in range(500):
        if moved:
            return
        await asyncio.sleep(0.01)


async def _stuck(relay: Relay, handle: RelayHandle, holding: int) -> None:
    """Until the relay holds bytes in ``holding`` places and its counters stop moving."""
    last = (-1, -1)
    for _ in range(200):
        now = (handle.bytes_up, handle.bytes_down)
        if relay.buffers_in_use() + relay.pipes_in_use() == holding and now == last:
            return
        last = now
        await asyncio.sleep(0.1)
    raise AssertionError(f"never stuck: {relay.stats()}")


def test_a_connection_moved_with_bytes_pending_both_ways_and_a_half_close_is_adopted_by_the_flavors_relay(  # noqa: E501
        flavor: Flavor) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        client, client_side = _pair()
        backend_side, backend = _pair()
        results: list[RelayResult] = []
        old, new = relay_for(flavor, loop), relay_for(flavor, loop)
        handle = old.start(client_side, backend_side, results.append)
        up_data = bytes(range(256)) * (32 << 10)  # 8 MiB each way, read by nobody yet
        down_data = bytes(reversed(range(256))) * (32 << 10)
        sending_up = loop.create_task(loop.sock_sendall(client, up_data))

        async def send_down() -> None:
            await loop.sock_sendall(backend, down_data)
            backend.shutdown(socket.SHUT_WR)  # the backend is done: its FIN waits behind

        sending_down = loop.create_task(send_down())
        await _stuck(old, handle, 2)  # a buffer or pipe stuck each way

        assert isinstance(handle, MovableHandle) and handle.pause()
        state = handle.state()
        assert state.pending_up and state.pending_down
        copies = [_dup(s) for s in handle.sockets()]
        handle.release()
        assert results == [RelayResult(state.up, state.down, HANDED_OVER)]
        assert old.active() == 0 and old.buffers_in_use() + old.pipes_in_use() == 0

        moved: list[RelayResult] = []
        assert isinstance(new, AdoptingRelay)
        adopted = new.adopt(copies[0], copies[1], state, moved.append)
        _assert_held_by(new, adopted, flavor)
        got_up, got_down = await asyncio.gather(_recv_exactly(backend, len(up_data)),
                                                _recv_exactly(client, len(down_data)))
        assert hashlib.sha256(got_up).digest() == hashlib.sha256(up_data).digest()
        assert hashlib.sha256(got_down).digest() == hashlib.sha256(down_data).digest()
        await sending_up
        await sending_down
        assert await loop.sock_recv(client, 1) == b""  # the backend's half-close came through
        assert adopted.bytes_up == len(up_data) and adopted.bytes_down == len(down_data)
        await loop.sock_sendall(client, b"still up")  # ... and the other way still flows
        assert await _recv_exactly(backend, 8) == b"still up"
        assert not moved
        client.shutdown(socket.SHUT_WR)
        assert await loop.sock_recv(backend, 1) == b""
        await _wait_for(moved)
        assert moved == [RelayResult(len(up_data) + 8, len(down_data), None)]
        client.close()
        backend.close()
        await old.close()
        await new.close()

    run_on(flavor, body)


def test_an_adopted_eof_gets_its_shutdown_after_the_pending_bytes(flavor: Flavor) -> None:
    """A state with an EOF already read and bytes still pending that way (the contract,
    whoever wrote it): those bytes first, then SHUT_WR; counters go on from the state."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        client, client_side = _pair()
        backend_side, backend = _pair()
        relay = relay_for(flavor, loop)
        await loop.sock_sendall(backend, b" and newer")  # queued in the socket: read after
        moved: list[RelayResult] = []
        state = RelayState(1000, 2000, b"pending up", b"pending down", eof_up=True)
        assert isinstance(relay, AdoptingRelay)
        handle = relay.adopt(client_side, backend_side, state, moved.append)
        _assert_held_by(relay, handle, flavor)
        assert await _recv_exactly(backend, 10) == b"pending up"
        assert await loop.sock_recv(backend, 1) == b""  # the client's EOF, after its bytes
        assert await _recv_exactly(client, 22) == b"pending down and newer"
        assert handle.bytes_up == 1010 and handle.bytes_down == 2022
        backend.shutdown(socket.SHUT_WR)
        assert await loop.sock_recv(client, 1) == b""
        await _wait_for(moved)
        assert moved == [RelayResult(1010, 2022, None)]
        client.close()
        backend.close()
        await relay.close()

    run_on(flavor, body)


def test_a_connection_moves_mid_transfer_with_its_bytes_counters_and_half_close(
        flavor: Flavor) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        client, client_side = _pair()  # client <-> relay's client socket
        backend_side, backend = _pair()  # relay's backend socket <-> backend
        results: list[RelayResult] = []
        old, new = relay_for(flavor, loop), relay_for(flavor, loop)
        handle = old.start(client_side, backend_side, results.append)
        data = bytes(range(256)) * (64 << 10)  # 16 MiB up, read by nobody yet: backpressure
        sending = loop.create_task(loop.sock_sendall(client, data))
        await loop.sock_sendall(backend, b"hello down")
        assert await _recv_exactly(client, 10) == b"hello down"
        last = -1
        for _ in range(200):  # until the relay is stuck holding bytes the backend won't take
            if (old.buffers_in_use() or old.pipes_in_use()) and handle.bytes_up == last:
                break
            last = handle.bytes_up
            await asyncio.sleep(0.1)
        assert old.buffers_in_use() + old.pipes_in_use() == 1

        assert isinstance(handle, MovableHandle) and handle.pause()
        state = handle.state()
        assert state.pending_up and state.down == 10 and not state.eof_up
        copies = [_dup(s) for s in handle.sockets()]  # the new process's fds
        handle.release()
        assert results == [RelayResult(state.up, 10, HANDED_OVER)]
        assert old.active() == 0 and old.pipes_in_use() == 0 and old.buffers_in_use() == 0

        moved: list[RelayResult] = []
        assert isinstance(new, AdoptingRelay)
        adopted = new.adopt(copies[0], copies[1], state, moved.append)
        _assert_held_by(new, adopted, flavor)
        received = await _recv_exactly(backend, len(data))
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        await sending
        client.shutdown(socket.SHUT_WR)  # half-close after the move ...
        assert await loop.sock_recv(backend, 1) == b""
        await loop.sock_sendall(backend, b"bye")  # ... the other way still flows
        assert await _recv_exactly(client, 3) == b"bye"
        backend.close()
        assert await loop.sock_recv(client, 1) == b""
        for _ in range(200):
            if moved:
                break
            await asyncio.sleep(0.01)
        assert moved == [RelayResult(len(data), 13, None)]  # counted from the first byte
        client.close()
        await old.close()
        await new.close()

    run_on(flavor, body)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_paused_connection_resumes_where_it_stopped(loop_name: str) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        client, client_side = _pair()
        backend_side, backend = _pair()
        relay = PyRelay(loop)
        results: list[RelayResult] = []
        handle = relay.start(client_side, backend_side, results.append)
        handle.pause()
        await loop.sock_sendall(client, b"while paused")
        await asyncio.sleep(0.05)
        assert handle.state() == RelayState(0, 0)  # nothing moved while paused
        handle.resume()  # the takeover failed
        assert await _recv_exactly(backend, 12) == b"while paused"
        client.close()
        backend.close()
        await relay.close()

    run_on(loop_name, body)


def test_a_native_connection_whose_takeover_fails_goes_on_in_this_process(
        native_flavor: Flavor) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        client, client_side = _pair()
        backend_side, backend = _pair()
        relay = relay_for(native_flavor, loop)
        results: list[RelayResult] = []
        handle = relay.start(client_side, backend_side, results.append)
        await loop.sock_sendall(client, b"before")
        assert await _recv_exactly(backend, 6) == b"before"
        assert isinstance(handle, MovableHandle) and handle.pause()
        await loop.sock_sendall(client, b"while detached")
        handle.resume()  # back on the engine, with the bytes it had read
        assert relay.active() == 1 and handle._conn is not None  # the engine's
        assert handle._twin is None and relay._resumed is None  # not on a Python twin
        assert await _recv_exactly(backend, 14) == b"while detached"
        await loop.sock_sendall(backend, b"back")
        assert await _recv_exactly(client, 4) == b"back"
        assert handle.bytes_up == 20 and handle.bytes_down == 4  # counted on
        assert handle.pause()  # a later takeover can move it again
        assert handle.state() == RelayState(20, 4)
        handle.resume()
        await loop.sock_sendall(client, b"!")
        assert await _recv_exactly(backend, 1) == b"!"
        client.close()
        backend.close()
        for _ in range(200):
            if results:
                break
            await asyncio.sleep(0.01)
        assert results and results[0].bytes_up == 21 and results[0].bytes_down == 4
        await relay.close()

    run_on(native_flavor, body)


def test_a_native_connection_that_ended_is_not_moved(native_flavor: Flavor) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        client, client_side = _pair()
        backend_side, backend = _pair()
        relay = relay_for(native_flavor, loop)
        results: list[RelayResult] = []
        handle = relay.start(client_side, backend_side, results.append)
        client.close()
        backend.close()
        for _ in range(200):
            if results:
                break
            await asyncio.sleep(0.01)
        assert isinstance(handle, MovableHandle) and not handle.pause()
        await relay.close()

    run_on(native_flavor, body)
