"""cffi build script (API, out-of-line mode) for ``uproxy._native``.

The C sources live in ``native/`` at the top of the repository; setup.py names
this file in ``cffi_modules`` so that ``pip install`` compiles the module.
API mode (a real C extension compiled against the header) rather than ABI
mode, so struct layouts and constants come from the compiler, not from us.
The cdef mirrors ``native/uproxy_native.h``; ``struct uproxy_conn`` is partial
(``...;``) because only its counters are meant to be read from Python.
"""

from pathlib import Path

from cffi import FFI  # type: ignore[import-untyped]  # no stubs; build-time only

# Relative to the project root, where setuptools runs the build.
NATIVE_DIR = Path("native")

CDEF = """
#define UPROXY_DONE_CLOSED ...
#define UPROXY_DONE_RESET ...
#define UPROXY_DONE_ERROR ...
#define UPROXY_DONE_ABORTED ...
#define UPROXY_SIDE_CLIENT ...
#define UPROXY_SIDE_BACKEND ...

struct uproxy_engine;

struct uproxy_conn {
    uint64_t bytes_up;
    uint64_t bytes_down;
    uint64_t token;
    ...;
};

struct uproxy_done {
    struct uproxy_conn *conn;
    uint64_t token;
    uint64_t bytes_up;
    uint64_t bytes_down;
    int reason;
    int side;
    int err;
};

struct uproxy_engine_stats {
    uint64_t conns_live;
    uint64_t pipes_in_use;
    uint64_t pipes_total;
    uint64_t pipes_max;
    uint64_t pipe_size;
    uint64_t splice_bytes;
    uint64_t copy_bytes;
    uint64_t bufs_in_use;
};

ssize_t uproxy_splice_move(int from_fd, int to_fd, int pipe_r, int pipe_w, size_t len);

struct uproxy_engine *uproxy_engine_new(int max_pipes, int want_pipe_size, int keep_free);
int uproxy_engine_eventfd(struct uproxy_engine *e);
struct uproxy_conn *uproxy_engine_add(struct uproxy_engine *e, int client_fd, int backend_fd,
                                      uint64_t token);
void uproxy_engine_abort(struct uproxy_engine *e, struct uproxy_conn *c);
void uproxy_engine_release(struct uproxy_engine *e, struct uproxy_conn *c);
int uproxy_engine_poll(struct uproxy_engine *e, struct uproxy_done *out, int max);
void uproxy_engine_stop(struct uproxy_engine *e);
int uproxy_engine_stopped(struct uproxy_engine *e);
void uproxy_engine_stats(struct uproxy_engine *e, struct uproxy_engine_stats *out);
void uproxy_engine_free(struct uproxy_engine *e);

#define UPROXY_UDP_BATCH ...
#define UPROXY_UDP_BUFSIZE ...
#define UPROXY_UDP_GSO_MAX_SEGMENT ...
#define UPROXY_UDP_GSO_MAX_SEGMENTS ...
#define UPROXY_UDP_GSO_MAX_BYTES ...

struct uproxy_udp_batch {
    int count;
    int ngroups;
    uint32_t len[];
    uint64_t key[];
    int64_t dst[];
    uint8_t order[];
    uint8_t group[];
    int gso;
    ...;
};

struct uproxy_udp_sent {
    int sent;
    int busy;
    int failed;
    int err;
    int err_at;
    uint64_t bytes;
};

struct uproxy_udp_batch *uproxy_udp_batch_new(void);
void uproxy_udp_batch_free(struct uproxy_udp_batch *b);
int uproxy_udp_recv(int fd, struct uproxy_udp_batch *b, int want_source);
int uproxy_udp_send(int fd, struct uproxy_udp_batch *b, int from, int to, int probe,
                    struct uproxy_udp_sent *out);
int uproxy_udp_reply(int fd, struct uproxy_udp_batch *b, uint32_t ip, uint16_t port,
                     int64_t spec_dst, struct uproxy_udp_sent *out);
int uproxy_udp_copy(struct uproxy_udp_batch *b, int index, unsigned char *dst, int size);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "uproxy._native",
    '#include "uproxy_native.h"',
    sources=[str(NATIVE_DIR / "relay.c"), str(NATIVE_DIR / "udp.c")],
    depends=[str(NATIVE_DIR / "uproxy_native.h")],
    include_dirs=[str(NATIVE_DIR)],
    libraries=["pthread"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
