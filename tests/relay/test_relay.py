"""The relay contract, on real loopback TCP, for both implementations on both loops.

Every test runs four times: (asyncio | uvloop) x (native | python), the ``flavor``
fixture. A test is a coroutine run on a fresh loop of its kind; ``Rig`` makes the two
TCP pairs a proxy would hold (a "client" connected to one listener, a "backend" accepted
from another) and hands the proxy-side ends to the relay under test. Only
127.0.0.1 is used. No root needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import time
from dataclasses import dataclass, field

import pytest

from tests.support.matrix import Flavor, relay_for, run_on
from tests.support.sockets import segments_in, send_with_fin
from tests.support.waiting import wait_until_async
from uproxy.proxy.nativerelay import NativeRelay
from uproxy.proxy.pyrelay import PyRelay
from uproxy.proxy.relay import Relay, RelayHandle, RelayResult

LINGER_RST = struct.pack("ii", 1, 0)
MiB = 1024 * 1024


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Pair:
    """One relayed connection: the test's client and server ends, and the relay handle."""

    client: socket.socket
    server: socket.socket
    handle: RelayHandle
    results: list[RelayResult] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Rig:
    """Two listeners on 127.0.0.1: one the client dials, one standing in for the backend."""

    def __init__(self, loop: asyncio.AbstractEventLoop, relay: Relay) -> None:
        self.loop = loop
        self.relay = relay
        self.front = self._listener()
        self.back = self._listener()
        self.pairs: list[Pair] = []

    @staticmethod
    def _listener() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(512)
        return s

    def connect(self, *, backend_sndbuf: int = 0, server_rcvbuf: int = 0) -> Pair:
        client = socket.create_connection(self.front.getsockname())
        accepted, _ = self.front.accept()
        to_backend = socket.create_connection(self.back.getsockname())
        server, _ = self.back.accept()
        if backend_sndbuf:  # fixed buffer sizes shape where a stalled relay holds bytes
            to_backend.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, backend_sndbuf)
        if server_rcvbuf:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, server_rcvbuf)
        for s in (client, server):
            s.setblocking(False)
        holder: list[Pair] = []

        def on_done(result: RelayResult) -> None:
            pair = holder[0]
            pair.results.append(result)
            pair.done.set()

        handle = self.relay.start(accepted, to_backend, on_done)
        pair = Pair(client, server, handle)
        holder.append(pair)
        self.pairs.append(pair)
        return pair

    async def __aenter__(self) -> Rig:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.relay.close()
        for p in self.pairs:
            p.client.close()
            p.server.close()
        self.front.close()
        self.back.close()


async def recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, min(n - len(buf), 1 * MiB))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def recv_to_eof(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := await loop.sock_recv(sock, 1 * MiB):
        buf += chunk
    return bytes(buf)


async def expect_reset(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Read until the socket fails; it must fail with ECONNRESET, not end with EOF."""
    with pytest.raises(ConnectionResetError):
        while await loop.sock_recv(sock, 65536):
            pass
        raise AssertionError("clean EOF where a reset was expected")


# ---- tests -----------------------------------------------------------------


def test_echo_both_ways_and_clean_close(flavor: Flavor) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with Rig(loop, relay_for(flavor, loop)) as rig:
            p = rig.connect()
            await loop.sock_sendall(p.client, b"hello backend")
            assert await recv_exactly(loop, p.server, 13) == b"hello backend"
            await loop.sock_sendall(p.server, b"hello client!")
            assert await recv_exactly(loop, p.client, 13) == b"hello client!"
            # The engine thread adds to the counters right after each send, so they may
            # trail what the peer already read for a moment.
            handle = p.handle
            await wait_until_async(lambda: (handle.bytes_up, handle.bytes_down) == (13, 13),
                                   message="counters at 13/13")
            assert p.handle.native is flavor.native
            p.client.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(loop, p.server) == b""
            p.server.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(loop, p.client) == b""
            await p.done.wait()
            assert p.results == [RelayResult(13, 13, None)]
            assert rig.relay.active() == 0

    run_on(flavor, body)


def test_large_transfer_both_ways_concurrently(flavor: Flavor) -> None:
    size = 64 * MiB
    blocks = [os.urandom(MiB) for _ in range(16)]

    def stream() -> list[bytes]:
        return [blocks[(i * 7) % 16] for i in range(size // MiB)]

    expected = hashlib.sha256(b"".join(stream())).hexdigest()

    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with Rig(loop, relay_for(flavor, loop)) as rig:
            p = rig.connect()

            async def send(sock: socket.socket) -> None:
                for block in stream():
                    await loop.sock_sendall(sock, block)
                sock.shutdown(socket.SHUT_WR)

            async def digest(sock: socket.socket) -> tuple[str, int]:
                h, n = hashlib.sha256(), 0
                while chunk := await loop.sock_recv(sock, MiB):
                    h.update(chunk)
                    n += len(chunk)
                return h.hexdigest(), n

            results = await asyncio.gather(send(p.client), send(p.server),
                                           digest(p.server), digest(p.client))
            assert results[2] == (expected, size)
            assert results[3] == (expected, size)
            await p.done.wait()
            assert p.results == [RelayResult(size, size, None)]
            assert rig.relay.pipes_in_use() == rig.relay.buffers_in_use() == 0
            if isinstance(rig.relay, NativeRelay):  # bulk goes through pipes
                assert rig.relay.stats()["splice_bytes"] > size

    run_on(flavor, body, timeout=50)


@pytest.mark.parametrize("first", ["client", "backend"])
def test_half_close_keeps_the_other_direction(flavor: Flavor, first: str) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with Rig(loop, relay_for(flavor, loop)) as rig:
            p = rig.connect()
            closer, other = (p.client, p.server) if first == "client" else (p.server, p.client)
            # Data queued right before the EOF must all arrive before it.
            request = os.urandom(3 * MiB)
            await loop.sock_sendall(closer, request)
            closer.shutdown(socket.SHUT_WR)
            await asyncio.sleep(0.05)  # let the relay see data and EOF before anyone reads
            assert await recv_to_eof(loop, other) == request
            # The other way is still open: several writes after the EOF all arrive.
            for part in (b"late ", b"reply ", b"after EOF"):
                await loop.sock_sendall(other, part)
            assert await recv_exactly(loop, closer, 20) == b"late reply after EOF"
            assert not p.done.is_set()
            other.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(loop, closer) == b""
            await p.done.wait()
            up, down = (len(request), 20) if first == "client" else (20, len(request))
            assert p.results == [RelayResult(up, down, None)]

    run_on(flavor, body)


@pytest.mark.parametrize("first", ["client", "backend"])
def test_the_relay_counts_backends_that_got_its_fin_first(flavor: Flavor, first: str) -> None:
    """``closes_first()``: a connection whose client ended first gives the backend our FIN
    before its own (our socket to it lingers in TIME_WAIT: transparent mode sweeps then);
    one whose backend ended first does not (no sweep for HTTP/1.0-style closes)."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with Rig(loop, relay_for(flavor, loop)) as rig:
            relay = rig.relay
            assert isinstance(relay, (NativeRelay, PyRelay))
            assert relay.closes_first() == 0
            p = rig.connect()
            closer, other = (p.client, p.server) if first == "client" else (p.server, p.client)
            await loop.sock_sendall(closer, b"bye")
            closer.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(loop, other) == b"bye"
            other.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(loop, closer) == b""
            await p.done.wait()
            assert relay.closes_first() == (1 if first == "client" else 0)

    run_on(flavor, body)


@pytest.mark.parametrize("first", ["client", "backend"])
def test_a_fin_that_came_with_the_last_bytes_leaves_with_them(flavor: Flavor,
                                                              first: str) -> None:
    """A side whose last bytes and FIN came in one segment (a server's write + close, an
    HTTP/1.0 client's request + SHUT_WR): the native engine sends those bytes with
    MSG_MORE and its SHUT_WR puts the FIN on their segment -- the other side receives one
    segment, not two (the kernel's count, TCP_INFO). The Python twin relays the same bytes
    and EOF (it sends the FIN in a segment of its own)."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with Rig(loop, relay_for(flavor, loop)) as rig:
            relay = rig.relay
            p = rig.connect()
            closer, other = (p.client, p.server) if first == "client" else (p.server, p.client)
            for a, b in ((p.client, p.server), (p.server, p.client)):  # the relay is running
                await loop.sock_sendall(a, b"hi")
                assert await recv_exactly(loop, b, 2) == b"hi"
            before = segments_in(other)
            merged = relay.stats().get("fins_with_data", 0)
            send_with_fin(closer, b"the last bytes")
            assert await recv_to_eof(loop, other) == b"the last bytes"
            after = segments_in(other)
            if flavor.native:
                assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
                assert relay.stats()["fins_with_data"] == merged + 1
            else:
                assert after[1] - before[1] == 1
            other.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(loop, closer) == b""
            await p.done.wait()
            assert p.results[0].error is None

    run_on(flavor, body)


@pytest.mark.parametrize("who", ["client", "backend"])
def test_reset_propagates_as_reset(flavor: Flavor, who: str) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with Rig(loop, relay_for(flavor, loop)) as rig:
            p = rig.connect()
            await loop.sock_sendall(p.client, b"ping")
            assert await recv_exactly(loop, p.server, 4) == b"ping"
            resetter, other = (p.client, p.server) if who == "client" else (p.server, p.client)
            resetter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            resetter.close()
            await expect_reset(loop, other)
            await p.done.wait()
            assert p.results == [RelayResult(4, 0, f"reset by {who}")]

    run_on(flavor, body)


def test_reset_after_half_close_reaches_the_backend(flavor: Flavor) -> None:
    """The client sends EOF, then resets: the backend, still talking, gets reset too."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with Rig(loop, relay_for(flavor, loop)) as rig:
            p = rig.connect()
            p.client.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(loop, p.server) == b""
            p.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            p.client.close()
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                for _ in range(500):
                    await loop.sock_sendall(p.server, b"late" * 1000)
                    await asyncio.sleep(0.01)
            await p.done.wait()
            assert len(p.results) == 1
            assert p.results[0].error == "reset by client"

    run_on(flavor, body)


def test_abort_resets_both_sides(flavor: Flavor) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with Rig(loop, relay_for(flavor, loop)) as rig:
            p = rig.connect()
            await loop.sock_sendall(p.server, b"x" * 1000)
            assert await recv_exactly(loop, p.client, 1000) == b"x" * 1000
            p.handle.abort()
            await expect_reset(loop, p.client)
            await expect_reset(loop, p.server)
            await p.done.wait()
            p.handle.abort()  # after the end: nothing happens, on_done is not called again
            await asyncio.sleep(0.05)
            assert p.results == [RelayResult(0, 1000, "aborted")]

    run_on(flavor, body)


def test_idle_connection_stays_open_and_holds_no_pipe(flavor: Flavor) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with Rig(loop, relay_for(flavor, loop)) as rig:
            p = rig.connect()
            await loop.sock_sendall(p.client, b"a" * 100_000)
            await recv_exactly(loop, p.server, 100_000)
            await asyncio.sleep(0.3)
            assert rig.relay.pipes_in_use() == rig.relay.buffers_in_use() == 0
            assert not p.done.is_set()
            assert rig.relay.active() == 1
            await loop.sock_sendall(p.server, b"still here")
            assert await recv_exactly(loop, p.client, 10) == b"still here"
            assert rig.relay.pipes_in_use() == 0

    run_on(flavor, body)


def test_half_closed_idle_connection_does_not_spin(flavor: Flavor) -> None:
    """After an EOF the relay waits quietly: no busy loop on a readable-at-EOF socket."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with Rig(loop, relay_for(flavor, loop)) as rig:
            pairs = [rig.connect() for _ in range(10)]
            for p in pairs:
                p.client.shutdown(socket.SHUT_WR)
                p.server.sendall(b"hello")
            for p in pairs:
                assert await recv_to_eof(loop, p.server) == b""
                assert await recv_exactly(loop, p.client, 5) == b"hello"
            cpu = time.process_time()  # all threads, the engine's included
            await asyncio.sleep(0.5)
            assert time.process_time() - cpu < 0.1
            assert rig.relay.active() == 10
            for p in pairs:
                await loop.sock_sendall(p.server, b"bye")
                assert await recv_exactly(loop, p.client, 3) == b"bye"

    run_on(flavor, body)


def test_stalled_reader_backpressure_then_drain(flavor: Flavor) -> None:
    """A reader that stops reading stalls the sender (no unbounded buffering);
    the relay holds one pipe or buffer with the stuck bytes, and gives it back after."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with Rig(loop, relay_for(flavor, loop)) as rig:
            p = rig.connect()
            payload = os.urandom(32 * MiB)
            sender = asyncio.ensure_future(loop.sock_sendall(p.client, payload))
            relay = rig.relay
            # The stuck bytes sit in one place: a pipe or a copy buffer.
            await wait_until_async(lambda: relay.pipes_in_use() + relay.buffers_in_use() == 1,
                                   message="stuck bytes held")
            await asyncio.sleep(0.2)
            assert not sender.done()  # nobody reads on the backend side: it must stall
            stalled_at = p.handle.bytes_up
            assert 0 < stalled_at < len(payload)
            got = await recv_exactly(loop, p.server, len(payload))
            await sender
            assert got == payload
            assert p.handle.bytes_up == len(payload)
            assert rig.relay.pipes_in_use() == rig.relay.buffers_in_use() == 0

    run_on(flavor, body)


def test_counters_readable_mid_transfer(flavor: Flavor) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with Rig(loop, relay_for(flavor, loop)) as rig:
            p = rig.connect()
            total = 16 * MiB
            seen: list[int] = []

            async def read_slowly() -> None:
                got = 0
                while got < total:
                    got += len(await loop.sock_recv(p.server, 256 * 1024))
                    seen.append(p.handle.bytes_up)

            reader = asyncio.ensure_future(read_slowly())
            await loop.sock_sendall(p.client, b"z" * total)
            await reader
            # The native counters are updated by the engine thread right after each
            # splice, so they may trail what the reader already has by one chunk.
            assert seen == sorted(seen)
            assert 0 < seen[0] < total and seen[-1] <= total
            assert p.handle.bytes_down == 0
            p.client.shutdown(socket.SHUT_WR)
            p.server.shutdown(socket.SHUT_WR)
            await p.done.wait()
            assert (p.handle.bytes_up, p.handle.bytes_down) == (total, 0)
            assert p.results == [RelayResult(total, 0, None)]

    run_on(flavor, body)


def test_two_hundred_concurrent_connections(flavor: Flavor) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with Rig(loop, relay_for(flavor, loop)) as rig:
            pairs = [rig.connect() for _ in range(200)]
            assert rig.relay.active() == 200

            async def exchange(i: int, p: Pair) -> None:
                req = f"request {i} ".encode() * (i + 1)
                resp = f"response {i} ".encode() * (2 * i + 1)
                await loop.sock_sendall(p.client, req)
                p.client.shutdown(socket.SHUT_WR)
                assert await recv_to_eof(loop, p.server) == req
                await loop.sock_sendall(p.server, resp)
                p.server.shutdown(socket.SHUT_WR)
                assert await recv_to_eof(loop, p.client) == resp
                await p.done.wait()
                assert p.results == [RelayResult(len(req), len(resp), None)]
                assert (p.handle.bytes_up, p.handle.bytes_down) == (len(req), len(resp))

            await asyncio.gather(*(exchange(i, p) for i, p in enumerate(pairs)))
            assert rig.relay.active() == 0
            assert rig.relay.pipes_in_use() == rig.relay.buffers_in_use() == 0

    run_on(flavor, body)


def test_sockets_the_loop_accepted_and_connected_hand_over_cleanly(flavor: Flavor) -> None:
    """As the TCP proxy does it: loop.sock_accept / loop.sock_connect, then start().
    Sequential connections reuse fd numbers, so a registration the loop kept on
    a handed-over fd would show up here."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with Rig(loop, relay_for(flavor, loop)) as rig:
            rig.front.setblocking(False)
            for i in range(50):
                client = socket.socket()
                client.setblocking(False)
                accepted_task = asyncio.ensure_future(loop.sock_accept(rig.front))
                await loop.sock_connect(client, rig.front.getsockname())
                accepted, _ = await accepted_task
                to_backend = socket.socket()
                to_backend.setblocking(False)
                await loop.sock_connect(to_backend, rig.back.getsockname())
                server, _ = rig.back.accept()
                server.setblocking(False)
                results: list[RelayResult] = []
                done = asyncio.Event()

                def on_done(r: RelayResult, results: list[RelayResult] = results,
                            done: asyncio.Event = done) -> None:
                    results.append(r)
                    done.set()

                rig.relay.start(accepted, to_backend, on_done)
                assert accepted.fileno() == -1 or not flavor.native
                msg = f"message {i}".encode()
                await loop.sock_sendall(client, msg)
                assert await recv_exactly(loop, server, len(msg)) == msg
                await loop.sock_sendall(server, msg[::-1])
                assert await recv_exactly(loop, client, len(msg)) == msg[::-1]
                client.close()
                server.close()
                await done.wait()
                assert results == [RelayResult(len(msg), len(msg), None)]

    run_on(flavor, body)


def test_close_aborts_live_connections_and_leaves_no_fds(flavor: Flavor) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        before = fd_count()
        async with Rig(loop, relay_for(flavor, loop)) as rig:
            pairs = [rig.connect() for _ in range(20)]
            # Half stay idle, half have data stuck in flight (nobody reads the server side).
            blob = b"q" * 32 * MiB
            senders = [asyncio.ensure_future(loop.sock_sendall(p.client, blob))
                       for p in pairs[:10]]
            relay = rig.relay
            # (Native: pipes holding data are closed with the connection, never pooled.)
            await wait_until_async(lambda: relay.pipes_in_use() + relay.buffers_in_use() == 10,
                                   message="10 connections hold stuck bytes")
            assert not any(s.done() for s in senders)
            await rig.relay.close()
            for p in pairs:
                assert [r.error for r in p.results] == ["aborted"]
            outcomes = await asyncio.gather(*senders, return_exceptions=True)
            assert all(isinstance(o, ConnectionResetError | BrokenPipeError) for o in outcomes)
            for p in pairs[10:]:
                await expect_reset(loop, p.client)
            for p in pairs:
                await expect_reset(loop, p.server)
            assert rig.relay.active() == 0
            await rig.relay.close()  # idempotent
        assert fd_count() == before

    run_on(flavor, body)


def test_start_after_close_is_refused_with_resets(flavor: Flavor) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with Rig(loop, relay_for(flavor, loop)) as rig:
            await rig.relay.close()
            p = rig.connect()
            await expect_reset(loop, p.client)
            await expect_reset(loop, p.server)
            await p.done.wait()
            await asyncio.sleep(0.05)
            assert p.results == [RelayResult(0, 0, "relay closed")]
            assert (p.handle.bytes_up, p.handle.bytes_down, p.handle.native) \
                == (0, 0, flavor.native)
            p.handle.abort()  # harmless
            assert rig.relay.active() == 0
            assert rig.relay.stats()["conns_live"] == 0

    run_on(flavor, body)


# ---- native only: the pipe pool --------------------------------------------


def test_native_reset_while_stalled_propagates_at_once(native_flavor: Flavor) -> None:
    """A client reset while its bytes wait for a stalled backend resets the backend
    without waiting for it to read (the Python twin only notices at its next write)."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with Rig(loop, relay_for(native_flavor, loop)) as rig:
            p = rig.connect()
            relay = rig.relay
            sender = asyncio.ensure_future(loop.sock_sendall(p.client, b"s" * 32 * MiB))
            await wait_until_async(lambda: relay.pipes_in_use() + relay.buffers_in_use() == 1,
                                   message="stuck bytes held")
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            p.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            p.client.close()
            await p.done.wait()
            assert [r.error for r in p.results] == ["reset by client"]
            assert relay.pipes_in_use() == relay.buffers_in_use() == 0
            await expect_reset(loop, p.server)

    run_on(native_flavor, body)


def test_native_pool_shrinks_after_a_burst(native_flavor: Flavor) -> None:
    """Pipes go back to the pool empty, and only a few idle ones are kept open."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        relay = NativeRelay(loop, keep_free_pipes=4)
        async with Rig(loop, relay) as rig:
            blob = os.urandom(8 * MiB)
            peaks = []
            # A direction goes bulk (pipes) only while its reads fill the 64 KiB buffer; on
            # a loaded machine the sender can trickle and the stalls hold copy buffers
            # instead. So burst again (at most 3 times) until one takes more than 4 pipes.
            for _ in range(3):
                # A roomy socket toward the backend lets reads go bulk (pipes) before
                # the small buffer at the far end stalls them.
                pairs = [rig.connect(backend_sndbuf=MiB, server_rcvbuf=64 * 1024)
                         for _ in range(24)]
                senders = [asyncio.ensure_future(loop.sock_sendall(p.client, blob))
                           for p in pairs]
                await wait_until_async(lambda: relay.pipes_in_use() + relay.buffers_in_use() == 24,
                                       message="24 stalled connections hold their bytes")
                peaks.append(relay.stats()["pipes_total"])
                got = await asyncio.gather(
                    *(recv_exactly(loop, p.server, len(blob)) for p in pairs))
                assert all(g == blob for g in got)
                await asyncio.gather(*senders)
                stats = relay.stats()
                assert stats["pipes_in_use"] == stats["bufs_in_use"] == 0
                assert stats["pipes_total"] <= 4  # back to the pool's bound after each burst
                if peaks[-1] > 4:
                    break
            assert peaks[-1] > 4, f"no burst took more pipes than the pool keeps: {peaks}"
            assert relay.stats()["pipes_total"] == 4

    run_on(native_flavor, body)


@pytest.mark.parametrize("max_pipes", [0, 1])
def test_native_pool_bound_and_copy_path(native_flavor: Flavor, max_pipes: int) -> None:
    """The pool never grows past its bound; without a free pipe, bytes are copied
    instead with the same stream semantics (max_pipes=0: copy only)."""
    flavor = native_flavor

    async def body() -> None:
        loop = asyncio.get_running_loop()
        relay = NativeRelay(loop, max_pipes=max_pipes)
        async with Rig(loop, relay) as rig:
            hog, p = rig.connect(), rig.connect()
            # The hog's reader is stalled: its stuck bytes hold a pipe or a buffer.
            hog_data = os.urandom(8 * MiB)
            hog_send = asyncio.ensure_future(loop.sock_sendall(hog.client, hog_data))
            await wait_until_async(lambda: relay.pipes_in_use() + relay.buffers_in_use() == 1,
                                   message="the hog's stuck bytes held")

            data = os.urandom(4 * MiB)
            await loop.sock_sendall(p.client, data)
            p.client.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(loop, p.server) == data
            await loop.sock_sendall(p.server, data[:1000])
            p.server.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(loop, p.client) == data[:1000]
            await p.done.wait()
            assert p.results == [RelayResult(len(data), 1000, None)]

            assert await recv_exactly(loop, hog.server, len(hog_data)) == hog_data
            await hog_send
            stats = relay.stats()
            assert stats["pipes_total"] <= max_pipes
            assert stats["pipes_in_use"] == stats["bufs_in_use"] == 0
            assert stats["splice_bytes"] + stats["copy_bytes"] == len(hog_data) + len(data) + 1000
            assert stats["copy_bytes"] > 0  # the first read of each direction is a copy
            if max_pipes == 0:
                assert stats["splice_bytes"] == 0

    run_on(flavor, body)
