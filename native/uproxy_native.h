/* uproxy native relay: the C side of uproxy._native (cffi, API mode).
 *
 * Every declaration here is mirrored in uproxy/_native_build.py's cdef.
 */
#ifndef UPROXY_NATIVE_H
#define UPROXY_NATIVE_H

#include <stddef.h>
#include <sys/types.h>

/* Move up to `len` bytes from socket `from_fd` to socket `to_fd` through the
 * pipe (pipe_r, pipe_w) with splice(2), so the payload never leaves the kernel.
 * Fills the pipe only when it is empty and drains it fully before returning.
 * Returns the number of bytes moved, 0 at EOF of from_fd, or -errno. */
ssize_t uproxy_splice_move(int from_fd, int to_fd, int pipe_r, int pipe_w, size_t len);

#endif
