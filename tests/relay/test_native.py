"""The compiled module: it imports, its functions work on real fds, and the fallback switch works.

Real socketpairs, pipes and loopback TCP only. The relay contract itself
(both implementations, both loops) is tested in tests/relay/test_relay.py;
here we check the C pieces directly, without an event loop where possible.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support.sockets import congestion, congestion_choices, own_tcp_socket
from uproxy import native
from uproxy.proxy.nativerelay import default_max_pipes
from uproxy.proxy.pyrelay import PyRelay
from uproxy.proxy.relay import make_relay

needs_native = pytest.mark.skipif(not native.AVAILABLE, reason=native.REASON)


def test_native_module_is_built_and_active() -> None:
    # A checkout that was installed with pip must have the compiled module;
    # a silent fallback to Python here would hide a broken build.
    assert native.AVAILABLE, native.REASON
    assert native.ACTIVE == "native"
    assert native.describe() == "relay path: native (compiled module loaded)"


@pytest.mark.parametrize("value", ["1", "yes"])
def test_no_native_env_forces_python(value: str) -> None:
    # The cli reads UPROXY_NO_NATIVE and tells uproxy.native before the daemon starts
    # (cmd_run); `uproxy run` end to end is tests/integration/test_tcp.py's python flavours.
    code = (
        "import asyncio, os, sys, uproxy.native as n\n"
        "from uproxy.proxy.relay import make_relay\n"
        "n.select(no_native=os.environ.get('UPROXY_NO_NATIVE', '') not in ('', '0'))\n"
        "assert 'uproxy._native' not in sys.modules\n"  # never loaded, so never in the way
        "loop = asyncio.new_event_loop()\n"
        "print(n.ACTIVE, make_relay(loop).name, sep=',')\n"
        "print(n.REASON)\n"
        "loop.close()\n"
        "n.lib()\n"  # must refuse: the Python path is active
    )
    env = {**os.environ, "UPROXY_NO_NATIVE": value}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.stdout.split("\n")[:2] == ["python,python", "UPROXY_NO_NATIVE is set"]
    assert proc.returncode == 1
    assert "RuntimeError: native relay not active: UPROXY_NO_NATIVE is set" in proc.stderr


def test_importing_native_reads_no_environment() -> None:
    # Nothing below the cli reads os.environ: without select(), the compiled module is used.
    code = "import uproxy.native as n\nprint(n.describe())\n"
    env = {**os.environ, "UPROXY_NO_NATIVE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"relay path: {'native' if native.AVAILABLE else 'python'} " \
        f"({native.REASON})\n"


@needs_native
def test_select_switches_the_path_and_back() -> None:
    try:
        native.select(no_native=True, reason="asked for in a test")
        assert (native.ACTIVE, native.AVAILABLE) == ("python", False)
        assert native.describe() == "relay path: python (asked for in a test)"
        with pytest.raises(RuntimeError, match="native relay not active: asked for in a test"):
            native.ffi()
    finally:
        native.select(no_native=False)
    assert native.describe() == "relay path: native (compiled module loaded)"


HEADER = Path(__file__).resolve().parents[2] / "native" / "uproxy_native.h"


def test_cdef_is_the_headers_marked_part() -> None:
    # The build reads the header (uproxy/_native_build.py): no second copy to drift.
    from uproxy._native_build import BEGIN, CDEF, END, cdef_from_header

    text = HEADER.read_text()
    assert cdef_from_header(text) == CDEF
    marked = text.split(BEGIN)[1].split(END)[0]
    functions = set(re.findall(r"\b(uproxy_\w+)\(", marked))
    assert {"uproxy_engine_new", "uproxy_udp_send"} <= functions
    assert functions == set(re.findall(r"\b(uproxy_\w+)\(", CDEF))
    assert "/*" not in CDEF and "#include" not in CDEF and "[UPROXY_" not in CDEF
    with pytest.raises(ValueError, match="cdef begin"):
        cdef_from_header(text.replace(BEGIN, ""))


@needs_native
def test_the_module_exports_every_constant_and_function_of_the_header() -> None:
    lib = native.lib()
    marked = HEADER.read_text().split("/* cdef begin */")[1].split("/* cdef end */")[0]
    defines = re.findall(r"^#define (UPROXY_\w+) ([^/\n]+)", marked, re.M)
    assert len(defines) >= 10
    for name, value in defines:
        assert getattr(lib, name) == eval(value), name  # our own header
    for name in re.findall(r"\b(uproxy_\w+)\(", marked):
        assert callable(getattr(lib, name)), name


@needs_native
def test_splice_move_on_socketpairs_and_a_pipe() -> None:
    lib = native.lib()
    a_near, a_far = socket.socketpair()
    b_near, b_far = socket.socketpair()
    r, w = os.pipe()
    try:
        payload = os.urandom(50_000)
        a_far.sendall(payload)
        moved = 0
        while moved < len(payload):
            n = lib.uproxy_splice_move(a_near.fileno(), b_near.fileno(), r, w, 1 << 16)
            assert n > 0, os.strerror(-n)
            moved += n
        assert moved == len(payload)
        got = b""
        while len(got) < len(payload):
            got += b_far.recv(1 << 16)
        assert got == payload
        # Nothing queued: -EAGAIN (the pipe was empty, so the socket is).
        a_near.setblocking(False)
        assert lib.uproxy_splice_move(a_near.fileno(), b_near.fileno(), r, w, 1 << 16) \
            == -errno.EAGAIN
        # EOF: 0.
        a_far.shutdown(socket.SHUT_WR)
        assert lib.uproxy_splice_move(a_near.fileno(), b_near.fileno(), r, w, 1 << 16) == 0
        # A bad fd is an error code, not a crash.
        assert lib.uproxy_splice_move(-1, b_near.fileno(), r, w, 16) == -errno.EBADF
    finally:
        for s in (a_near, a_far, b_near, b_far):
            s.close()
        os.close(r)
        os.close(w)


@needs_native
def test_splice_move_waits_for_a_full_nonblocking_destination() -> None:
    """It drains the pipe fully even when the destination is full at first."""
    lib = native.lib()
    src_near, src_far = socket.socketpair()
    dst_near, dst_far = socket.socketpair()
    r, w = os.pipe()
    try:
        dst_near.setblocking(False)
        filler = b"f" * 4096
        filled = 0
        try:
            while True:
                filled += dst_near.send(filler)
        except BlockingIOError:
            pass
        payload = os.urandom(30_000)
        src_far.sendall(payload)
        # Another thread reads the destination, so it frees up while we wait.
        received = bytearray()

        def reader() -> None:
            while len(received) < filled + len(payload):
                select.select([dst_far], [], [], 5)
                received.extend(dst_far.recv(1 << 16))

        t = threading.Thread(target=reader)
        t.start()
        moved = 0
        while moved < len(payload):
            n = lib.uproxy_splice_move(src_near.fileno(), dst_near.fileno(), r, w, 1 << 16)
            assert n > 0, os.strerror(-n)
            moved += n
        t.join(10)
        assert bytes(received[filled:]) == payload
    finally:
        for s in (src_near, src_far, dst_near, dst_far):
            s.close()
        os.close(r)
        os.close(w)


@needs_native
def test_engine_lifecycle_probes_pipe_size_and_frees_its_fds() -> None:
    lib, ffi = native.lib(), native.ffi()
    before = len(os.listdir("/proc/self/fd"))
    engine = lib.uproxy_engine_new(8, 256 * 1024, 4)
    assert engine != ffi.NULL
    stats = ffi.new("struct uproxy_engine_stats *")
    lib.uproxy_engine_stats(engine, stats)
    assert lib.UPROXY_PIPE_SIZE_MIN <= stats.pipe_size <= 256 * 1024
    assert (stats.pipes_max, stats.pipes_total, stats.pipes_in_use, stats.conns_live) \
        == (8, 0, 0, 0)
    efd = lib.uproxy_engine_eventfd(engine)
    lib.uproxy_engine_stop(engine)
    lib.uproxy_engine_stop(engine)  # idempotent
    select.select([efd], [], [], 5)
    assert lib.uproxy_engine_stopped(engine) == 1
    done = ffi.new("struct uproxy_done[4]")
    assert lib.uproxy_engine_poll(engine, done, 4) == 0
    # After stop it refuses new work and leaves the fds with the caller.
    a, b = socket.socketpair()
    assert lib.uproxy_engine_add(engine, a.fileno(), b.fileno(), 1) == ffi.NULL
    assert ffi.errno == errno.ESHUTDOWN
    a.send(b"still mine")
    assert b.recv(100) == b"still mine"
    a.close()
    b.close()
    lib.uproxy_engine_free(engine)
    assert len(os.listdir("/proc/self/fd")) == before


@needs_native
def test_close_hears_the_engine_stop_even_when_a_batch_drained_its_wake_up() -> None:
    # A wake-up already pending when close() asks the engine to stop runs a batch while
    # the engine is stopping: the batch reads "not stopped", then its poll drains the
    # eventfd that the engine's last wake-up wrote. No reader call comes after that, so
    # the batch must look again (a CI run's old uproxy waited forever in close() here).
    # Batches run back to back while the engine stops, as such a reader call would.
    from uproxy.proxy.nativerelay import NativeRelay

    for _ in range(200):
        loop = asyncio.new_event_loop()
        try:
            relay = NativeRelay(loop)
            lib, engine = relay._lib, relay._raw
            relay._stopped = loop.create_future()  # what close() does first ...
            lib.uproxy_engine_stop(engine)
            while not lib.uproxy_engine_stopped(engine):  # ... batches during the stop
                relay._on_completions()

            async def heard(relay: NativeRelay = relay) -> bool:
                assert relay._stopped is not None
                try:
                    await asyncio.wait_for(asyncio.shield(relay._stopped), 1.0)
                except TimeoutError:
                    return False
                return True

            assert loop.run_until_complete(heard())
            loop.run_until_complete(relay.close())
        finally:
            loop.close()


@needs_native
def test_engine_relays_a_socketpair_without_an_event_loop() -> None:
    """The C API alone: add, counters, completion through the eventfd, release."""
    lib, ffi = native.lib(), native.ffi()
    engine = lib.uproxy_engine_new(4, 64 * 1024, 4)
    client_far, client_near = socket.socketpair()
    backend_near, backend_far = socket.socketpair()
    try:
        conn = lib.uproxy_engine_add(engine, client_near.detach(), backend_near.detach(), 42)
        assert conn != ffi.NULL
        client_far.sendall(b"up" * 1000)
        got = b""
        while len(got) < 2000:
            got += backend_far.recv(4096)
        backend_far.sendall(b"down")
        assert client_far.recv(100) == b"down"
        client_far.shutdown(socket.SHUT_WR)
        assert backend_far.recv(100) == b""
        backend_far.close()
        assert client_far.recv(100) == b""
        efd = lib.uproxy_engine_eventfd(engine)
        done = ffi.new("struct uproxy_done[4]")
        n = 0
        for _ in range(50):
            select.select([efd], [], [], 0.1)
            n = lib.uproxy_engine_poll(engine, done, 4)
            if n:
                break
        assert n == 1
        d = done[0]
        assert (d.token, d.bytes_up, d.bytes_down) == (42, 2000, 4)
        assert (d.reason, d.side, d.err) == (lib.UPROXY_DONE_CLOSED, -1, 0)
        assert (d.client_fd, d.backend_fd, d.pending_up_len, d.pending_down_len) \
            == (-1, -1, 0, 0)  # only a detach hands fds back
        assert (conn.bytes_up, conn.bytes_down) == (2000, 4)
        lib.uproxy_engine_release(engine, d.conn)
    finally:
        client_far.close()
        backend_far.close()
        lib.uproxy_engine_free(engine)


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("sanitizer", ["address,undefined", "thread"])
def test_engine_stress_under_sanitizers(tmp_path: Path, sanitizer: str) -> None:
    """native/stress.c: 512 connections ended every which way, racing the engine
    thread; every one completes exactly once; the engine's own set-ups; listening
    sockets opened in batches (native/sockets.c) where the port walk says, pushed in
    batches to a running engine and removed while clients connect through them; no
    fd left, no sanitizer report."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "stress"
    native_dir = REPO / "native"
    build = subprocess.run(
        [cc, "-O1", "-g", "-Wall", "-Wextra", "-Werror", f"-fsanitize={sanitizer}",
         "-fno-sanitize-recover=all", f"-I{native_dir}", str(native_dir / "stress.c"),
         str(native_dir / "relay.c"), str(native_dir / "transparent.c"),
         str(native_dir / "affinity.c"), str(native_dir / "sockets.c"), "-lpthread", "-o",
         str(exe)],
        capture_output=True, text=True, timeout=120)
    if build.returncode != 0 and "sanitize" in build.stderr and "unrecognized" in build.stderr:
        pytest.skip(f"compiler lacks -fsanitize={sanitizer}")
    assert build.returncode == 0, build.stderr
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1", "TSAN_OPTIONS": "halt_on_error=1"}
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, env=env)
    if sanitizer == "thread" and "unexpected memory mapping" in proc.stderr:
        pytest.skip("ThreadSanitizer cannot run with this kernel's memory layout")
    assert proc.returncode == 0, proc.stderr
    assert "512 connections ok" in proc.stdout
    assert "listening sockets opened as the walk says" in proc.stdout
    assert "81 listeners pushed in batches" in proc.stdout
    assert "WARNING" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr


def test_make_relay_follows_the_switch() -> None:
    loop = asyncio.new_event_loop()
    try:
        relay = make_relay(loop)
        assert relay.name == native.ACTIVE
        loop.run_until_complete(relay.close())
        twin = make_relay(loop, prefer_native=False)
        assert isinstance(twin, PyRelay)
        loop.run_until_complete(twin.close())
    finally:
        loop.close()


@pytest.mark.parametrize("pipe_size", [64 * 1024, 256 * 1024, 1024 * 1024])
def test_default_pool_stays_within_half_the_user_pipe_budget(pipe_size: int) -> None:
    soft_pages = int(Path("/proc/sys/fs/pipe-user-pages-soft").read_text())
    n = default_max_pipes(pipe_size)
    assert 0 <= n <= 1024
    if soft_pages:
        assert n * pipe_size <= soft_pages * os.sysconf("SC_PAGE_SIZE") // 2
        assert n >= 1  # the kernel default budget (64 MiB) always leaves room for some


@needs_native
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_engine_gives_the_listeners_congestion_control_to_the_backend_socket(
        family: int) -> None:
    """A listener with its own TCP_CONGESTION: the engine's backend socket gets it (the
    accepted one inherits it); a listener left alone leaves the netns default."""
    default, other = congestion_choices(family)
    if not other:
        pytest.skip(f"no congestion control allowed besides {default}")
    lib, ffi = native.lib(), native.ffi()
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    backend = socket.socket(family, socket.SOCK_STREAM)
    backend.bind((host, 0))
    backend.listen(8)
    backend.settimeout(5)
    engine = lib.uproxy_engine_new(4, 64 * 1024, 4)
    timeouts = ffi.new("double[]", [1.0])
    assert lib.uproxy_engine_setup_config(engine, timeouts, 1, 5.0, 0.05, 1.0, 0.2) == 0
    keep: list[socket.socket] = [backend]
    try:
        for want in (other[0], ""):
            lsock = socket.socket(family, socket.SOCK_STREAM)
            keep.append(lsock)
            if want:
                lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, want.encode())
            lsock.bind((host, 0))
            lsock.listen(8)
            lid = lib.uproxy_engine_listener_add(engine, lsock.fileno())
            assert lid >= 0
            addr = socket.inet_pton(family, host)
            rc = lib.uproxy_engine_listener_set(
                engine, lid, 1, 4 if family == socket.AF_INET else 6, 1, addr,
                ffi.new("int[]", [backend.getsockname()[1]]), ffi.new("int[]", [0]),
                ffi.new("double[]", [0.0]), ffi.NULL, 0, -1, 0.0)
            assert rc == 0
            client = socket.create_connection(lsock.getsockname()[:2], timeout=5)
            keep.append(client)
            served, engine_side = backend.accept()
            keep.append(served)
            client.sendall(b"ping")
            assert served.recv(10) == b"ping"  # relayed: the set-up is over
            out = own_tcp_socket(engine_side, backend.getsockname())
            near = own_tcp_socket(lsock.getsockname(), client.getsockname())
            assert out is not None and near is not None
            keep += [out, near]
            assert (congestion(out), congestion(near)) == ((want, want) if want
                                                             else (default, default))
    finally:
        lib.uproxy_engine_free(engine)
        for s in keep:
            s.close()


@needs_native
def test_engine_pin_table_grows_and_round_trips_every_pin() -> None:
    """native/affinity.c through the engine's API: 5,000 pins of both families (the table
    grows several times) import, count and export exactly; importing them again only
    refreshes them; expired ones are not exported and the sweep frees them; forgetting a
    group frees its pins only."""
    lib, ffi = native.lib(), native.ffi()
    engine = lib.uproxy_engine_new(0, 64 * 1024, 0)
    assert engine != ffi.NULL
    try:
        n = 5000
        pins = ffi.new("struct uproxy_pin[]", n)
        for i in range(n):
            p = pins[i]
            p.group = i % 3
            p.family = 6 if i % 2 else 4
            raw = i.to_bytes(4, "big")
            p.client[0:4] = raw if p.family == 4 else b"\xfd\x00\x00\x01"
            if p.family == 6:
                p.client[12:16] = raw
            p.endpoint_family = 4
            p.endpoint[0:4] = bytes([10, 0, 0, 1 + i % 7])
            p.endpoint_port = 8000 + i % 5
            p.idle = 5.0 if i % 10 else 100.0  # every tenth expired (timeout 60 s)
            p.timeout = 60.0
        assert lib.uproxy_engine_affinity_import(engine, pins, n) == n
        assert lib.uproxy_engine_affinity_import(engine, pins, n) == n  # (refreshed, not added)
        assert lib.uproxy_engine_affinity_count(engine) == n
        out = ffi.new("struct uproxy_pin[]", n)
        live = n - n // 10
        assert lib.uproxy_engine_affinity_export(engine, out, n) == live
        got = {(out[i].group, bytes(out[i].client), bytes(out[i].endpoint)[:4],
                out[i].endpoint_port) for i in range(live)}
        want = {(pins[i].group, bytes(pins[i].client), bytes(pins[i].endpoint)[:4],
                 pins[i].endpoint_port) for i in range(n) if i % 10}
        assert got == want
        assert all(4.0 < out[i].idle < 10.0 and out[i].timeout == 60.0 for i in range(live))
        assert lib.uproxy_engine_affinity_sweep(engine) == n // 10
        assert lib.uproxy_engine_affinity_count(engine) == live
        in_group_1 = sum(1 for i in range(n) if i % 10 and i % 3 == 1)
        assert lib.uproxy_engine_affinity_forget(engine, 1) == in_group_1
        assert lib.uproxy_engine_affinity_count(engine) == live - in_group_1
        bad = ffi.new("struct uproxy_pin[]", 1)  # family 0, timeout 0: skipped
        assert lib.uproxy_engine_affinity_import(engine, bad, 1) == 0
    finally:
        lib.uproxy_engine_free(engine)


@needs_native
def test_listeners_added_in_one_call_each_get_their_own_result() -> None:
    """``NativeRelay.listeners_add`` (a start's 10,000 listeners in one C call): per
    listener its id or add's error (that one only), and set's error apart (the listener
    stays added, as after a failed ``listener_set``); the others serve their endpoints."""
    from uproxy.proxy.nativerelay import NativeRelay

    loop = asyncio.new_event_loop()
    keep: list[socket.socket] = []
    try:
        relay = NativeRelay(loop)
        backends, listeners = {}, {}
        for family, host in ((4, "127.0.0.1"), (6, "::1")):
            af = socket.AF_INET6 if family == 6 else socket.AF_INET
            backends[family] = socket.socket(af, socket.SOCK_STREAM)
            listeners[family] = socket.socket(af, socket.SOCK_STREAM)
            for sock in (backends[family], listeners[family]):
                keep.append(sock)
                sock.bind((host, 0))
                sock.listen(8)
                sock.settimeout(5)
        spare = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        keep.append(spare)
        spare.bind(("::1", 0))
        spare.listen(8)

        def push(sock: socket.socket, family: int, backend: socket.socket | None,
                 timeout: float = 0.0) -> tuple[int, int, int, list[tuple[str, int, int, float]],
                                                list[bool], int, int, float]:
            eps = [] if backend is None else [(*backend.getsockname()[:2], 0, 0.0)]
            return (sock.fileno(), 1, family, eps, [], 0, -1, timeout)

        results = relay.listeners_add([
            push(listeners[4], 4, backends[4]),
            (-1, 1, 4, [], [], 0, -1, 0.0),  # not a socket: its add fails
            push(spare, 6, backends[6], timeout=5.0),  # affinity without a group: set fails
            push(listeners[6], 6, backends[6]),
        ])
        (id4, err4), (bad, _), (spare_id, spare_err), (id6, err6) = results
        assert id4 >= 0 and err4 == 0 and id6 >= 0 and err6 == 0
        assert bad == -errno.EBADF
        assert spare_id >= 0 and spare_err == -errno.EINVAL
        assert len({id4, spare_id, id6}) == 3
        for family in (4, 6):
            client = socket.create_connection(listeners[family].getsockname()[:2], timeout=5)
            keep.append(client)
            served, _ = backends[family].accept()
            keep.append(served)
            client.sendall(b"ping")
            assert served.recv(10) == b"ping"  # the engine relayed it to its own endpoint
        loop.run_until_complete(relay.close())
        with pytest.raises(OSError, match="relay closed"):
            relay.listeners_add([push(listeners[4], 4, backends[4])])
    finally:
        loop.close()
        for s in keep:
            s.close()
