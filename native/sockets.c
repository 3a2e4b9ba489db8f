/* Listening sockets opened in batches (uproxy.proxy.ports.PortAllocator.open_many):
 * a start opens one per service port and family, 10,000 and more, and Python's
 * socket, setsockopt, bind and listen cost ~17 us each where these take a third. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "uproxy_native.h"

/* One socket of family `family` (4/6), unbound; -errno. SO_REUSEADDR for TCP only:
 * two UDP sockets that both have it may bind one address and port (the walk would
 * hand out a port another service's socket holds, and take its datagrams). */
static int open_one(int kind, int family)
{
    int fd = socket(family == 6 ? AF_INET6 : AF_INET, kind | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    if ((kind == SOCK_STREAM &&
         setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) ||
        (family == 6 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) < 0)) {
        int err = -errno;
        close(fd);
        return err;
    }
    return fd;
}

static int bind_port(int fd, int family, const unsigned char *addr, int port)
{
    if (family == 6) {
        struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port)};
        memcpy(&a.sin6_addr, addr, 16);
        return bind(fd, (struct sockaddr *)&a, sizeof a) < 0 ? -errno : 0;
    }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    memcpy(&a.sin_addr, addr, 4);
    return bind(fd, (struct sockaddr *)&a, sizeof a) < 0 ? -errno : 0;
}

/* bind, and listen for TCP; -errno (EADDRINUSE from either) */
static int bind_listen(int fd, int kind, int family, const unsigned char *addr, int port,
                       int backlog)
{
    int rc = bind_port(fd, family, addr, port);
    if (rc == 0 && kind == SOCK_STREAM && listen(fd, backlog) < 0)
        rc = -errno;
    return rc;
}

/* whether fd has a local port (a bind that succeeded) */
static int bound_to(int fd)
{
    struct sockaddr_storage a;
    socklen_t len = sizeof a;
    if (getsockname(fd, (struct sockaddr *)&a, &len) < 0)
        return 1; /* unknown: start afresh */
    return a.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&a)->sin6_port != 0
                                   : ((struct sockaddr_in *)&a)->sin_port != 0;
}

int uproxy_open_listeners(int n, int kind, const int *families, const unsigned char *addrs,
                          const int *ports, int low, int high, int *cursor,
                          const unsigned char *avoid, int backlog, int *fds, int *bound)
{
    if (n < 0 || low < 1 || high < low || high > 65535 || *cursor < low || *cursor > high)
        return -EINVAL;
    for (int i = 0; i < n; i++)
        if (families[i] != 4 && families[i] != 6)
            return -EINVAL;
    int size = high - low + 1;
    for (int i = 0; i < n; i++) {
        const unsigned char *addr = addrs + 16 * (size_t)i;
        int family = families[i], fd = open_one(kind, family), rc = 0, port = ports[i];
        bound[i] = 0;
        if (fd < 0) {
            fds[i] = fd;
            continue;
        }
        if (port) {
            rc = bind_listen(fd, kind, family, addr, port, backlog);
        } else { /* PortAllocator.open's walk: from the cursor, skipping avoided ports */
            rc = -EADDRINUSE;
            for (int tries = 0; tries < size; tries++) {
                port = *cursor;
                *cursor = port >= high ? low : port + 1;
                if (avoid[port - low])
                    continue;
                rc = bind_listen(fd, kind, family, addr, port, backlog);
                if (rc != -EADDRINUSE)
                    break;
                if (kind == SOCK_STREAM && bound_to(fd)) {
                    /* listen's EADDRINUSE (another socket listened on the port between
                     * our bind and listen): the walk goes on, on a fresh socket, as
                     * Python's does */
                    close(fd);
                    if ((fd = open_one(kind, family)) < 0) {
                        rc = fd;
                        break;
                    }
                }
            }
        }
        if (rc < 0) {
            if (fd >= 0)
                close(fd);
            fds[i] = rc;
            continue;
        }
        fds[i] = fd;
        bound[i] = port;
    }
    return n;
}
