/* tcp_reference: uproxy's TCP engine with nothing around it, for the benchmark.
 *
 *     tcp_reference [-t THREADS] PORT IP:PORT [IP:PORT ...] [-- PORT IP:PORT ...]
 *
 * What it is for: the new-connections target asks uproxy for 1.1x nginx stream and
 * no more proxy CPU per connection than nginx. This program answers "how far can
 * uproxy's own design go on this machine without Python?": the same engine
 * (native/relay.c: accept4 batches, the endpoint choice, non-blocking connect with
 * the per-attempt timeouts, splice/copy relay on one engine thread) fed by the same
 * interception (iptables REDIRECT to PORT), with the control thread only draining
 * the engine's events and completions -- no event loop, no connection table, no
 * metrics, no transparent mode (connections go from the node's address). `make bench`
 * runs it as the peer "C TCP relay" beside uproxy native.
 *
 * -t: engine threads (uproxy_engine_new_threads; uproxy's --engine-threads), 1 by default.
 * Each "PORT IP:PORT ..." group (separated by "--") is one listener on 0.0.0.0:PORT
 * and its endpoints (IPv4). Not a proxy: endpoints never change, errors are counted
 * and printed at exit. It runs until SIGTERM/SIGINT.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "uproxy_native.h"

#define MAX_ENDPOINTS 64
#define DRAIN 256

static volatile sig_atomic_t stopping;

static void on_signal(int sig) {
    (void)sig;
    stopping = 1;
}

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (fd < 0)
        return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* inherited by accepted */
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 4096) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int add_listener(struct uproxy_engine *e, int port, char **specs, int n) {
    unsigned char addrs[MAX_ENDPOINTS * 4];
    int ports[MAX_ENDPOINTS], indexes[MAX_ENDPOINTS];
    double avoid[MAX_ENDPOINTS];
    int fd, id;
    if (n < 1 || n > MAX_ENDPOINTS) {
        fprintf(stderr, "tcp_reference: port %d: 1 to %d endpoints\n", port, MAX_ENDPOINTS);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        char host[64];
        const char *colon = strrchr(specs[i], ':');
        size_t len = colon ? (size_t)(colon - specs[i]) : 0;
        if (!colon || len >= sizeof host) {
            fprintf(stderr, "tcp_reference: bad endpoint %s (IP:PORT)\n", specs[i]);
            return -1;
        }
        memcpy(host, specs[i], len);
        host[len] = 0;
        if (inet_pton(AF_INET, host, addrs + 4 * i) != 1) {
            fprintf(stderr, "tcp_reference: bad endpoint %s (IPv4:PORT)\n", specs[i]);
            return -1;
        }
        ports[i] = atoi(colon + 1);
        indexes[i] = i;
        avoid[i] = 0;
    }
    fd = listen_on(port);
    if (fd < 0) {
        fprintf(stderr, "tcp_reference: listen on port %d: %s\n", port, strerror(errno));
        return -1;
    }
    id = uproxy_engine_listener_add(e, fd);
    if (id < 0 || uproxy_engine_listener_set(e, id, 1, 4, n, addrs, ports, indexes, avoid,
                                              NULL, 0, -1, 0) < 0) {
        fprintf(stderr, "tcp_reference: the engine refused port %d\n", port);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    static const double timeouts[] = {0.25, 0.5, 1.0, 2.0}; /* uproxy.connect.CONNECT_TIMEOUTS */
    static struct uproxy_event events[DRAIN];
    static struct uproxy_done done[DRAIN];
    unsigned long long opened = 0, refused = 0, failed = 0, closed = 0;
    struct uproxy_engine *e;
    int efd, threads = 1, first = 1;
    if (argc > 2 && strcmp(argv[1], "-t") == 0) {
        threads = atoi(argv[2]);
        first = 3;
    }
    if (argc < first + 2 || threads < 1) {
        fprintf(stderr, "usage: tcp_reference [-t THREADS] PORT IP:PORT [IP:PORT ...] "
                        "[-- PORT IP:PORT ...]\n");
        return 2;
    }
    /* uproxy's defaults (nativerelay.py) */
    e = uproxy_engine_new_threads(threads, 1024, 256 * 1024, 16);
    if (!e) {
        perror("tcp_reference: engine");
        return 1;
    }
    if (uproxy_engine_setup_config(e, timeouts, 4, 5.0, 0.05, 2.0, 0.2) < 0) {
        fprintf(stderr, "tcp_reference: set-up config refused\n");
        return 1;
    }
    for (int i = first; i < argc;) {
        int j = i + 1;
        while (j < argc && strcmp(argv[j], "--") != 0)
            j++;
        if (add_listener(e, atoi(argv[i]), argv + i + 1, j - i - 1) < 0)
            return 2;
        i = j + 1;
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGPIPE, SIG_IGN);
    efd = uproxy_engine_eventfd(e);
    printf("tcp_reference: ready (%d engine thread%s)\n", threads, threads == 1 ? "" : "s");
    fflush(stdout);
    while (!stopping) {
        struct pollfd p = {.fd = efd, .events = POLLIN};
        uint64_t count;
        int n;
        if (poll(&p, 1, 500) <= 0)
            continue;
        if (read(efd, &count, sizeof count) < 0 && errno != EAGAIN)
            break;
        while ((n = uproxy_engine_events(e, events, DRAIN)) > 0)
            for (int i = 0; i < n; i++) {
                opened += events[i].kind == UPROXY_EV_OPENED;
                refused += events[i].kind == UPROXY_EV_REFUSED;
                failed += events[i].kind == UPROXY_EV_CONNECT_FAILED;
            }
        while ((n = uproxy_engine_poll(e, done, DRAIN)) > 0)
            for (int i = 0; i < n; i++) {
                closed++;
                uproxy_engine_release(e, done[i].conn);
            }
    }
    uproxy_engine_free(e);
    printf("tcp_reference: %llu opened, %llu closed, %llu refused, %llu failed connects\n",
           opened, closed, refused, failed);
    return 0;
}
