/* udp_reference: the smallest userspace UDP relay of uproxy's shape, in C, for the benchmark.
 *
 *     udp_reference [-c] PORT IP:PORT [IP:PORT ...]
 *
 * What it is for: the DNS target asks uproxy for 0.95x of kernel DNAT. This program
 * answers "how close can *any* userspace relay of this design get on this machine?":
 * the same interception (iptables REDIRECT to PORT), the same batching code uproxy
 * uses (native/udp.c: recvmmsg, grouping by client, sendmmsg with GSO, replies with
 * IP_PKTINFO), one connected backend socket per client, and nothing else -- no Python,
 * no event loop library, no flow expiry, no metrics. `make bench` runs it as the peer
 * "UDP reference (C)"; `native/bench_udp.py --peers kernel,native,reference` too.
 *
 * -c: also give each client a connected socket of its own (SO_REUSEPORT, bound to the
 * address the client sent to), so that both directions use connected sockets (cached
 * routes, early demux) -- the other design a relay could choose.
 *
 * Not a proxy: at most MAX_FLOWS clients, never forgotten; endpoints chosen round-robin
 * per new client; errors are counted and ignored. It runs until killed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "uproxy_native.h"

#define MAX_FLOWS 1024
#define MAX_BACKENDS 16
#define LISTENER ((uint64_t)-1)
#define CLIENT_SIDE (1ull << 32) /* epoll tag bit: the flow's own client socket (-c) */

struct flow {
    uint64_t key; /* client address << 16 | port, as udp.c makes it */
    int backend_fd;
    int client_fd; /* -c only, else -1 */
    int64_t spec_dst;
};

static struct flow flows[MAX_FLOWS];
static int nflows;
static struct sockaddr_in backends[MAX_BACKENDS];
static int nbackends;
static int port;
static bool connected_mode;

static int fail(const char *what)
{
    fprintf(stderr, "udp_reference: %s: %s\n", what, strerror(errno));
    return 2;
}

static int parse_backend(const char *arg, struct sockaddr_in *out)
{
    char ip[64];
    const char *colon = strrchr(arg, ':');
    if (colon == NULL || (size_t)(colon - arg) >= sizeof(ip))
        return -1;
    memcpy(ip, arg, (size_t)(colon - arg));
    ip[colon - arg] = '\0';
    memset(out, 0, sizeof(*out));
    out->sin_family = AF_INET;
    out->sin_port = htons((uint16_t)atoi(colon + 1));
    return inet_pton(AF_INET, ip, &out->sin_addr) == 1 ? 0 : -1;
}

static int watch(int ep, int fd, uint64_t tag)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag};
    return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

/* The flow of client `key`, opened on first sight; NULL when the table is full or a socket
 * call failed (the datagrams are then dropped). */
static struct flow *flow_of(int ep, uint64_t key, int64_t spec_dst)
{
    for (int i = 0; i < nflows; i++)
        if (flows[i].key == key)
            return &flows[i];
    if (nflows == MAX_FLOWS)
        return NULL;
    struct flow *f = &flows[nflows];
    f->key = key;
    f->spec_dst = spec_dst;
    f->client_fd = -1;
    f->backend_fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (f->backend_fd < 0)
        return NULL;
    const struct sockaddr_in *to = &backends[nflows % nbackends];
    if (connect(f->backend_fd, (const struct sockaddr *)to, sizeof(*to)) < 0
        || watch(ep, f->backend_fd, (uint64_t)nflows) < 0) {
        close(f->backend_fd);
        return NULL;
    }
    if (connected_mode && spec_dst >= 0) {
        int one = 1, fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        struct sockaddr_in local = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        struct sockaddr_in peer = {.sin_family = AF_INET, .sin_port = htons((uint16_t)key)};
        local.sin_addr.s_addr = htonl((uint32_t)spec_dst);
        peer.sin_addr.s_addr = htonl((uint32_t)(key >> 16));
        if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0
            || bind(fd, (struct sockaddr *)&local, sizeof(local)) < 0
            || connect(fd, (struct sockaddr *)&peer, sizeof(peer)) < 0
            || watch(ep, fd, CLIENT_SIDE | (uint64_t)nflows) < 0) {
            if (fd >= 0)
                close(fd);
            close(f->backend_fd);
            return NULL;
        }
        f->client_fd = fd;
    }
    nflows++;
    return f;
}

int main(int argc, char **argv)
{
    int arg = 1;
    if (arg < argc && strcmp(argv[arg], "-c") == 0) {
        connected_mode = true;
        arg++;
    }
    if (argc - arg < 2) {
        fprintf(stderr, "usage: udp_reference [-c] PORT IP:PORT [IP:PORT ...]\n");
        return 2;
    }
    port = atoi(argv[arg++]);
    for (; arg < argc && nbackends < MAX_BACKENDS; arg++)
        if (parse_backend(argv[arg], &backends[nbackends++]) < 0) {
            fprintf(stderr, "udp_reference: %s: not IPv4:port\n", argv[arg]);
            return 2;
        }
    int one = 1, rcvbuf = 4 << 20;
    int lfd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0)
        return fail("socket");
    setsockopt(lfd, IPPROTO_IP, IP_PKTINFO, &one, sizeof(one));
    setsockopt(lfd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf)); /* as uproxy's listeners */
    if (connected_mode)
        setsockopt(lfd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    struct sockaddr_in any = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (bind(lfd, (struct sockaddr *)&any, sizeof(any)) < 0)
        return fail("bind");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0 || watch(ep, lfd, LISTENER) < 0)
        return fail("epoll");
    struct uproxy_udp_batch *up = uproxy_udp_batch_new(), *down = uproxy_udp_batch_new();
    if (up == NULL || down == NULL)
        return fail("batch");
    struct uproxy_udp_sent out;
    struct epoll_event events[64];
    fprintf(stderr, "udp_reference: listening on :%d, %d endpoint(s)%s\n", port, nbackends,
            connected_mode ? ", connected client sockets" : "");
    for (;;) {
        int n = epoll_wait(ep, events, 64, -1);
        if (n < 0 && errno != EINTR)
            return fail("epoll_wait");
        for (int i = 0; i < n; i++) {
            uint64_t tag = events[i].data.u64;
            if (tag == LISTENER) { /* clients -> their flows' backend sockets */
                if (uproxy_udp_recv(lfd, up, 1) <= 0)
                    continue;
                for (int g = 0; g < up->ngroups; g++) {
                    int from = up->group[g], to = up->group[g + 1];
                    struct flow *f = flow_of(ep, up->key[up->order[from]], up->dst[up->order[from]]);
                    if (f != NULL)
                        uproxy_udp_send(f->backend_fd, up, from, to, 0, &out);
                }
            } else if (tag & CLIENT_SIDE) { /* -c: a client's own socket -> its backend */
                struct flow *f = &flows[tag & 0xffffffffu];
                int got = uproxy_udp_recv(f->client_fd, up, 0);
                if (got > 0)
                    uproxy_udp_send(f->backend_fd, up, 0, got, 0, &out);
            } else { /* an endpoint's replies -> its client */
                struct flow *f = &flows[tag];
                int got = uproxy_udp_recv(f->backend_fd, down, 0);
                if (got <= 0)
                    continue;
                if (f->client_fd >= 0)
                    uproxy_udp_send(f->client_fd, down, 0, got, 0, &out);
                else
                    uproxy_udp_reply(lfd, down, (uint32_t)(f->key >> 16), (uint16_t)f->key,
                                     f->spec_dst, &out);
            }
        }
    }
}
