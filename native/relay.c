/* uproxy native relay engine. See uproxy_native.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "uproxy_native.h"

ssize_t uproxy_splice_move(int from_fd, int to_fd, int pipe_r, int pipe_w, size_t len)
{
    ssize_t in = splice(from_fd, NULL, pipe_w, NULL, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (in < 0)
        return -errno;
    if (in == 0)
        return 0;
    ssize_t left = in;
    while (left > 0) {
        ssize_t out = splice(pipe_r, NULL, to_fd, NULL, (size_t)left, SPLICE_F_MOVE);
        if (out < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        left -= out;
    }
    return in;
}
