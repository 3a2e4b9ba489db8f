"""cffi build script (API, out-of-line mode) for ``uproxy._native``.

The C sources live in ``native/`` at the top of the repository; setup.py names
this file in ``cffi_modules`` so that ``pip install`` compiles the module.
"""

from pathlib import Path

from cffi import FFI

# Relative to the project root, where setuptools runs the build.
NATIVE_DIR = Path("native")

CDEF = """
ssize_t uproxy_splice_move(int from_fd, int to_fd, int pipe_r, int pipe_w, size_t len);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "uproxy._native",
    '#include "uproxy_native.h"',
    sources=[str(NATIVE_DIR / "relay.c")],
    depends=[str(NATIVE_DIR / "uproxy_native.h")],
    include_dirs=[str(NATIVE_DIR)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
