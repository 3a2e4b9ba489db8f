"""cffi build script (API, out-of-line mode) for ``uproxy._native``.

The C sources live in ``native/`` at the top of the repository; setup.py names
this file in ``cffi_modules`` so that ``pip install`` compiles the module.
API mode (a real C extension compiled against the header) rather than ABI
mode, so struct layouts and constants come from the compiler, not from us.

The interface is written once, in ``native/uproxy_native.h``: the cdef is the
part of the header between its ``cdef begin`` and ``cdef end`` markers, made
digestible for cffi's parser by :func:`cdef_from_header` (no comments, no
preprocessor lines but ``#define NAME ...``, array lengths left to the
compiler).
"""

import re
from pathlib import Path

from cffi import FFI  # type: ignore[import-untyped]  # no stubs; build-time only

# Relative to the project root, where setuptools runs the build.
NATIVE_DIR = Path("native")
HEADER = Path(__file__).resolve().parent.parent / NATIVE_DIR / "uproxy_native.h"
BEGIN, END = "/* cdef begin */", "/* cdef end */"

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINE = re.compile(r"\s*#\s*define\s+(\w+)\s+\S")
_NAMED_LENGTH = re.compile(r"\[[^\]]*[A-Za-z_][^\]]*\]")


def cdef_from_header(text: str) -> str:
    """The cffi cdef for the header ``text``: its marked part, as cffi's parser takes it.

    ``#define NAME value`` becomes ``#define NAME ...`` (cffi asks the compiler
    for the value, so Python reads ``lib.NAME``); other preprocessor lines go;
    ``[UPROXY_UDP_BATCH]`` and the like become ``[...]`` (the compiler's length).
    """
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"the header must hold one {BEGIN!r} and one {END!r}")
    body = _COMMENT.sub(" ", text.split(BEGIN)[1].split(END)[0])
    lines = []
    for line in body.splitlines():
        define = _DEFINE.match(line)
        if define:
            lines.append(f"#define {define.group(1)} ...")
        elif not line.lstrip().startswith("#") and line.strip():
            lines.append(line.rstrip())
    return _NAMED_LENGTH.sub("[...]", "\n".join(lines)) + "\n"


CDEF = cdef_from_header(HEADER.read_text())

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "uproxy._native",
    '#include "uproxy_native.h"',
    sources=[str(NATIVE_DIR / "relay.c"), str(NATIVE_DIR / "udp.c"),
             str(NATIVE_DIR / "transparent.c"), str(NATIVE_DIR / "affinity.c"),
             str(NATIVE_DIR / "sockets.c")],
    depends=[str(NATIVE_DIR / "uproxy_native.h"), str(NATIVE_DIR / "affinity.h")],
    include_dirs=[str(NATIVE_DIR)],
    libraries=["pthread"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
