/* Stress test for the engine's C API, meant to be built with sanitizers:
 *
 *   cc -O1 -g -fsanitize=address,undefined -Inative native/stress.c native/relay.c native/transparent.c native/affinity.c native/sockets.c -lpthread
 *   cc -O1 -g -fsanitize=thread -Inative native/stress.c native/relay.c native/transparent.c native/affinity.c native/sockets.c -lpthread
 *
 * tests/relay/test_native.py builds and runs it (ASan+UBSan, and TSan when the
 * toolchain has it). Loopback only (TCP; the UDP sockets are only opened; IPv6
 * on ::1 when it is there, else a note on stderr and IPv4 only). Each round opens a batch of relayed
 * connections and ends each one a different way (clean half-closes, a reset
 * from either side, an abort, or left open for stop), racing the engine
 * thread; then checks that every connection completed exactly once with the
 * expected reason, and at the end that no fd is left open. Half of them come in
 * with a relay state (uproxy_engine_add_state: bytes pending both ways, some
 * with the client's EOF already read). A second engine
 * then sets connections up itself (a registered listener, one endpoint that
 * answers and one that refuses, two short attempts, ClientIP affinity for 16
 * client addresses) while the main thread pauses, resumes and re-pushes the
 * listener, reads, sweeps, forgets and imports pins, and finally removes it:
 * every client is either relayed (OPENED, then DONE) or reset (REFUSED), once,
 * and no pin is left to the refusing endpoint. Then listening sockets opened in
 * batches (uproxy_open_listeners: TCP and UDP on two threads at once, both
 * families, a taken port, avoided ports, a foreign address, a range that runs out)
 * must be what the port walk says, checked against a model of it; and batches of
 * TCP listeners pushed with uproxy_engine_listeners_add (a closed fd, a duplicate
 * and a bad affinity among them) to an engine that relays clients from four
 * threads to an echo server while the main thread removes, pauses, re-pushes and
 * pushes more (sockets_phase, push_phase).
 * Every engine here is a group (uproxy_engine_new_threads: two or three engine
 * threads behind one handle), which covers the single engine's code too.
 * Exit status 0 on success; a message on stderr otherwise.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <stdbool.h>
#include <stdint.h>

#include "uproxy_native.h"

#define ROUNDS 8
#define BATCH 64

#define FAIL(...)                                                                                  \
    do {                                                                                           \
        fprintf(stderr, "stress: " __VA_ARGS__);                                                  \
        fputc('\n', stderr);                                                                       \
        exit(1);                                                                                   \
    } while (0)

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    int n = 0;
    while (readdir(d))
        n++;
    closedir(d);
    return n;
}

static int listener(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 1024) < 0)
        FAIL("listener: %s", strerror(errno));
    return fd;
}

/* A connected pair through listener `l`: *near is accepted, *far dialled. */
static void tcp_pair(int l, int *near, int *far)
{
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    getsockname(l, (struct sockaddr *)&a, &len);
    *far = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (*far < 0 || connect(*far, (struct sockaddr *)&a, sizeof a) < 0)
        FAIL("connect: %s", strerror(errno));
    *near = accept4(l, NULL, NULL, SOCK_CLOEXEC);
    if (*near < 0)
        FAIL("accept: %s", strerror(errno));
}

static void rst_close(int fd)
{
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

struct slot {
    struct uproxy_conn *conn;
    int client, backend; /* the far ends, held by the test */
    int how; /* 0 clean, 1 client RST, 2 backend RST, 3 abort, 4 left for stop, 5 detach */
    int completions;
    int reason;
};

static int drain(struct uproxy_engine *e, struct slot *slots, int stopping)
{
    struct uproxy_done done[16];
    int total = 0, n;
    /* (uproxy_engine_poll_release, as the Python side polls: only the detached ones
     * are released here; the set-up stress below uses poll + release) */
    while ((n = uproxy_engine_poll_release(e, done, 16)) > 0) {
        for (int i = 0; i < n; i++) {
            struct slot *s = &slots[done[i].token];
            if (done[i].conn != s->conn)
                FAIL("token %lu: conn pointer mismatch", (unsigned long)done[i].token);
            s->completions++;
            s->reason = done[i].reason;
            if (done[i].reason == UPROXY_DONE_DETACHED) {
                /* The held bytes are readable until release; the fds are ours to close. */
                volatile unsigned sum = 0;
                for (size_t k = 0; k < done[i].pending_up_len; k++)
                    sum += (unsigned char)done[i].pending_up[k];
                for (size_t k = 0; k < done[i].pending_down_len; k++)
                    sum += (unsigned char)done[i].pending_down[k];
                (void)sum;
                if (done[i].client_fd < 0 || done[i].backend_fd < 0)
                    FAIL("token %lu: detached without fds", (unsigned long)done[i].token);
                close(done[i].client_fd);
                close(done[i].backend_fd);
            }
            if (!stopping && done[i].reason == UPROXY_DONE_DETACHED)
                uproxy_engine_release(e, done[i].conn);
        }
        total += n;
    }
    return total;
}

static int port_of(int fd)
{
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    return ntohs(a.sin_port);
}

/* port_of for either family. */
static int port_of_any(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
        FAIL("getsockname: %s", strerror(errno));
    return ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                          : ((struct sockaddr_in *)&ss)->sin_port);
}

#define SETUP_CLIENTS 256

static void setup_phase(void)
{
    struct uproxy_engine *e = uproxy_engine_new_threads(2, 4, 64 * 1024, 2); /* a group */
    if (!e)
        FAIL("setup engine_new: %s", strerror(errno));
    static const double timeouts[] = {0.05, 0.05};
    if (uproxy_engine_setup_config(e, timeouts, 2, 5.0, 0.01, 0.2, 0.02) != 0)
        FAIL("setup_config");
    int lp = listener(), lb = listener();
    fcntl(lb, F_SETFL, O_NONBLOCK); /* the test accepts on it without waiting */
    int refusing = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(refusing, (struct sockaddr *)&a, sizeof a) < 0)
        FAIL("bind: %s", strerror(errno));
    int id = uproxy_engine_listener_add(e, lp);
    if (id < 0)
        FAIL("listener_add: %s", strerror(-id));
    unsigned char addrs[8];
    uint32_t lo = htonl(INADDR_LOOPBACK);
    memcpy(addrs, &lo, 4);
    memcpy(addrs + 4, &lo, 4);
    int ports[2] = {port_of(lb), port_of(refusing)}, idx[2] = {0, 1}, here[2] = {0, 0};
    double avoid[2] = {0, 0};
    /* ClientIP affinity (group 7): clients from 16 addresses, each pinned; a pin to the
     * refusing endpoint is dropped by its failure and the retry re-pins. */
    if (uproxy_engine_listener_set(e, id, 1, 4, 2, addrs, ports, idx, avoid, here, 0, 7, 60.0) != 0)
        FAIL("listener_set");
    /* A second listener whose only endpoint refuses: its clients get RSTs. */
    int lr = listener();
    int rid = uproxy_engine_listener_add(e, lr);
    if (rid < 0 || uproxy_engine_listener_set(e, rid, 1, 4, 1, addrs + 4, ports + 1, idx, avoid,
                                              NULL, 0, -1, 0) != 0)
        FAIL("refusing listener");
    struct sockaddr_in pa = a, ra = a;
    pa.sin_port = htons((uint16_t)port_of(lp));
    ra.sin_port = htons((uint16_t)port_of(lr));
    static int clients[SETUP_CLIENTS];
    int efd = uproxy_engine_eventfd(e);
    int ended = 0, opened = 0, refused = 0, done = 0;
    static struct uproxy_event evs[64];
    struct uproxy_done dn[64];
    for (int i = 0; i < SETUP_CLIENTS; i++) {
        clients[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        struct sockaddr_in *to = i % 8 == 3 ? &ra : &pa;
        struct sockaddr_in from = {.sin_family = AF_INET,
                                   .sin_addr.s_addr = htonl(INADDR_LOOPBACK + 1 + (uint32_t)(i % 16))};
        if (bind(clients[i], (struct sockaddr *)&from, sizeof from) < 0)
            FAIL("client bind: %s", strerror(errno));
        if (connect(clients[i], (struct sockaddr *)to, sizeof *to) < 0 && errno != EINPROGRESS)
            FAIL("client connect: %s", strerror(errno));
        if (i % 16 == 5)
            uproxy_engine_listener_pause(e, id);
        if (i % 16 == 9)
            uproxy_engine_listener_resume(e, id);
        if (i % 32 == 17) /* a new list while set-ups use the old one */
            uproxy_engine_listener_set(e, id, 1, 4, 2, addrs, ports, idx, avoid, here, 0, 7, 60.0);
        if (i % 8 == 1) { /* the pin table from this thread while the engine pins */
            static struct uproxy_pin pins[8];
            uproxy_engine_affinity_export(e, pins, 8);
            uproxy_engine_affinity_count(e);
            uproxy_engine_affinity_sweep(e);
        }
        if (i % 64 == 33)
            uproxy_engine_affinity_forget(e, 7);
        if (i == 40) { /* one handed over, for a client that never comes */
            struct uproxy_pin pin = {.group = 7, .family = 4, .endpoint_family = 4,
                                     .endpoint_port = port_of(lb), .idle = 1.0, .timeout = 60.0};
            uint32_t c = htonl(INADDR_LOOPBACK + 100);
            memcpy(pin.client, &c, 4);
            memcpy(pin.endpoint, &lo, 4);
            if (uproxy_engine_affinity_import(e, &pin, 1) != 1)
                FAIL("affinity import");
        }
        int b;
        while ((b = accept4(lb, NULL, NULL, SOCK_NONBLOCK)) >= 0)
            close(b); /* the backend answers, then ends: the relay ends too */
    }
    bool closed = false;
    for (int spins = 0; ended < SETUP_CLIENTS && spins < 4000; spins++) {
        if (!closed && opened + refused == SETUP_CLIENTS) { /* every client set up: end them */
            for (int i = 0; i < SETUP_CLIENTS; i++)
                close(clients[i]);
            closed = true;
        }
        int b;
        while ((b = accept4(lb, NULL, NULL, SOCK_NONBLOCK)) >= 0)
            close(b);
        struct pollfd p = {.fd = efd, .events = POLLIN};
        poll(&p, 1, 5);
        int n;
        while ((n = uproxy_engine_events(e, evs, 64)) > 0) {
            for (int k = 0; k < n; k++) {
                if (evs[k].kind == UPROXY_EV_OPENED)
                    opened++;
                else if (evs[k].kind == UPROXY_EV_REFUSED)
                    refused++, ended++;
            }
        }
        while ((n = uproxy_engine_poll(e, dn, 64)) > 0) {
            for (int k = 0; k < n; k++) {
                if (!(dn[k].token & UPROXY_SETUP_TOKEN))
                    FAIL("a completion without the set-up token");
                uproxy_engine_release(e, dn[k].conn);
                done++, ended++;
            }
        }
    }
    if (ended != SETUP_CLIENTS || done != opened)
        FAIL("set-up: %d of %d ended (opened %d, done %d, refused %d)", ended, SETUP_CLIENTS,
             opened, done, refused);
    if (refused != SETUP_CLIENTS / 8)
        FAIL("set-up: %d reset, expected %d", refused, SETUP_CLIENTS / 8);
    static struct uproxy_pin pins[64];
    int npins = uproxy_engine_affinity_export(e, pins, 64);
    if (npins < 2 || npins > 17 || npins != uproxy_engine_affinity_count(e))
        FAIL("affinity: %d pins exported, %d counted", npins, uproxy_engine_affinity_count(e));
    for (int k = 0; k < npins; k++)
        if (pins[k].group != 7 || pins[k].endpoint_port != port_of(lb))
            FAIL("affinity: a pin to port %d of group %d left", pins[k].endpoint_port,
                 pins[k].group);
    uproxy_engine_listener_remove(e, id);
    uproxy_engine_stop(e);
    while (!uproxy_engine_stopped(e)) {
        struct pollfd p = {.fd = efd, .events = POLLIN};
        poll(&p, 1, 100);
        uproxy_engine_events(e, evs, 64);
    }
    struct uproxy_engine_stats st;
    uproxy_engine_stats(e, &st);
    if (st.setups_live || st.conns_live)
        FAIL("set-up after stop: %lu setting up, %lu live", (unsigned long)st.setups_live,
             (unsigned long)st.conns_live);
    uproxy_engine_free(e);
    close(lp);
    close(lr);
    close(lb);
    close(refusing);
    printf("stress: %d set-ups ok (%d relayed, %d reset)\n", SETUP_CLIENTS, opened, refused);
}

/* ---- listening sockets in batches (native/sockets.c) and the batched push ----------
 *
 * uproxy_open_listeners is checked against a model of PortAllocator.open's walk kept
 * here (the cursor, the avoided ports, every port bound on loopback by anyone in this
 * program): each returned fd must be the socket the header promises on the port the
 * model says, each error the one the model says. The windows are probed free first
 * (other tests run beside this one), below the ephemeral range. */

#define WIN 16       /* ports in the sockets phase's window */
#define WALK_MAX 32  /* entries per call */

static bool have_ipv6 = true;
static uint32_t rng_state;

static uint32_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

/* The loopback of family 4 or 6 as the API packs it (16 bytes, IPv4 in the first 4). */
static void loopback(int family, unsigned char out[16])
{
    memset(out, 0, 16);
    if (family == 6) {
        out[15] = 1;
    } else {
        uint32_t lo = htonl(INADDR_LOOPBACK);
        memcpy(out, &lo, 4);
    }
}

static socklen_t sockaddr_of(int family, int port, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof *ss);
    if (family == 6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_addr = in6addr_loopback;
        a->sin6_port = htons((uint16_t)port);
        return sizeof *a;
    }
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a->sin_port = htons((uint16_t)port);
    return sizeof *a;
}

/* A plain socket (no SO_REUSEADDR: it excludes the API's) bound on loopback; -errno. */
static int bound_socket(int family, int kind, int port)
{
    struct sockaddr_storage ss;
    socklen_t len = sockaddr_of(family, port, &ss);
    int fd = socket(family == 6 ? AF_INET6 : AF_INET, kind | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    if (family == 6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, len) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    return fd;
}

/* The first of `count` consecutive ports free for TCP and UDP on both loopbacks. */
static int free_window(int count)
{
    for (int attempt = 0; attempt < 200; attempt++) {
        int low = 15000 + (int)(rng() % 15000), ok = 1;
        for (int port = low; ok && port < low + count; port++)
            for (int k = 0; ok && k < 4; k++) {
                int family = k & 1 ? 6 : 4;
                if (family == 6 && !have_ipv6)
                    continue;
                int fd = bound_socket(family, k & 2 ? SOCK_DGRAM : SOCK_STREAM, port);
                ok = fd >= 0;
                if (fd >= 0)
                    close(fd);
            }
        if (ok)
            return low;
    }
    FAIL("no %d consecutive free ports found", count);
}

static int sockopt(int fd, int level, int name)
{
    int v = -1;
    socklen_t len = sizeof v;
    if (getsockopt(fd, level, name, &v, &len) < 0)
        FAIL("getsockopt(%d, %d): %s", level, name, strerror(errno));
    return v;
}

/* fd is what uproxy_open_listeners promises: `kind`, `family`, on loopback:`port`,
 * non-blocking, close-on-exec, IPv6 only, listening and SO_REUSEADDR when TCP. */
static void check_listener(int fd, int kind, int family, int port)
{
    int domain = family == 6 ? AF_INET6 : AF_INET;
    if (sockopt(fd, SOL_SOCKET, SO_TYPE) != kind || sockopt(fd, SOL_SOCKET, SO_DOMAIN) != domain)
        FAIL("fd %d: type %d domain %d, expected %d %d", fd, sockopt(fd, SOL_SOCKET, SO_TYPE),
             sockopt(fd, SOL_SOCKET, SO_DOMAIN), kind, domain);
    if (sockopt(fd, SOL_SOCKET, SO_ACCEPTCONN) != (kind == SOCK_STREAM))
        FAIL("fd %d (kind %d): SO_ACCEPTCONN %d", fd, kind, sockopt(fd, SOL_SOCKET, SO_ACCEPTCONN));
    if (sockopt(fd, SOL_SOCKET, SO_REUSEADDR) != (kind == SOCK_STREAM))
        FAIL("fd %d (kind %d): SO_REUSEADDR %d", fd, kind, sockopt(fd, SOL_SOCKET, SO_REUSEADDR));
    if (family == 6 && sockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY) != 1)
        FAIL("fd %d: not IPv6 only", fd);
    if (!(fcntl(fd, F_GETFL) & O_NONBLOCK) || !(fcntl(fd, F_GETFD) & FD_CLOEXEC))
        FAIL("fd %d: blocking or inheritable", fd);
    struct sockaddr_storage got, want;
    socklen_t len = sizeof got, wlen = sockaddr_of(family, port, &want);
    if (getsockname(fd, (struct sockaddr *)&got, &len) < 0 || len != wlen ||
        memcmp(&got, &want, wlen) != 0)
        FAIL("fd %d: not bound to loopback port %d (family %d)", fd, port, family);
}

/* What the caller knows of one window: PortAllocator.open's walk, replayed. */
struct walk {
    int low, high, cursor;
    unsigned char avoid[WIN + 16];
    unsigned char used[2][WIN + 16]; /* [IPv6?][port - low]: bound on that loopback */
};

struct entry {
    int family;
    int port; /* fixed; 0: the walk */
    bool bad; /* an address that is not the host's (192.0.2.1): EADDRNOTAVAIL */
};

/* The port the API must give `en` (0: none, *err its errno), the model moved on. */
static int walk_expect(struct walk *w, const struct entry *en, int *err)
{
    unsigned char *used = w->used[en->family == 6];
    *err = 0;
    if (en->port) {
        if (used[en->port - w->low]) {
            *err = EADDRINUSE;
            return 0;
        }
        used[en->port - w->low] = 1;
        return en->port;
    }
    for (int tries = 0; tries <= w->high - w->low; tries++) {
        int port = w->cursor;
        w->cursor = port >= w->high ? w->low : port + 1;
        if (w->avoid[port - w->low])
            continue;
        if (en->bad) { /* (the address is refused before the port is looked at) */
            *err = EADDRNOTAVAIL;
            return 0;
        }
        if (used[port - w->low])
            continue;
        used[port - w->low] = 1;
        return port;
    }
    *err = EADDRINUSE;
    return 0;
}

/* One uproxy_open_listeners call for `n` entries, checked against the model; the fds
 * opened (or -errno) into out. */
static void open_checked(struct walk *w, int kind, const struct entry *ent, int n, int *out)
{
    int families[WALK_MAX], ports[WALK_MAX], bound[WALK_MAX], cursor = w->cursor;
    unsigned char addrs[16 * WALK_MAX];
    for (int i = 0; i < n; i++) {
        families[i] = ent[i].family;
        ports[i] = ent[i].port;
        loopback(ent[i].family, addrs + 16 * i);
        if (ent[i].bad) {
            static const unsigned char test_net[4] = {192, 0, 2, 1};
            memcpy(addrs + 16 * i, test_net, 4);
        }
        bound[i] = -1;
    }
    int rc = uproxy_open_listeners(n, kind, families, addrs, ports, w->low, w->high, &cursor,
                                   w->avoid, 64, out, bound);
    if (rc != n)
        FAIL("open_listeners (kind %d): %d", kind, rc);
    for (int i = 0; i < n; i++) {
        int err, port = walk_expect(w, &ent[i], &err);
        if (port && (out[i] < 0 || bound[i] != port))
            FAIL("open_listeners (kind %d) #%d: fd %d port %d, expected port %d", kind, i,
                 out[i], bound[i], port);
        if (port)
            check_listener(out[i], kind, ent[i].family, port);
        else if (out[i] != -err || bound[i] != 0)
            FAIL("open_listeners (kind %d) #%d: fd %d port %d, expected -%s", kind, i, out[i],
                 bound[i], strerror(err));
    }
    if (cursor != w->cursor)
        FAIL("open_listeners (kind %d): cursor %d, expected %d", kind, cursor, w->cursor);
}

struct walk_run {
    struct walk w;
    int kind;
    int fds[3][WALK_MAX];
    int n[3];
};

/* A fixed port taken beforehand (low + 1, IPv4), two avoided (low + 2, low + 5), a
 * start near the top (the walk wraps), a foreign address, both families, a fixed port
 * free on IPv6 only, then a call that runs out. One kind per run: TCP's and UDP's
 * port spaces are their own, so the two runs go on two threads at once (as
 * PortAllocator.open_ahead's worker calls it beside the event loop). */
static void *walk_main(void *arg)
{
    struct walk_run *r = arg;
    struct walk *w = &r->w;
    int v6 = have_ipv6 ? 6 : 4;
    const struct entry first[] = {
        {4, 0, false}, {v6, 0, false}, {4, w->low + 1, false}, {4, 0, false}, {4, 0, true},
        {4, 0, false}, {v6, w->low + 1, false}, {v6, 0, false}, {4, w->low + 3, false},
    };
    r->n[0] = sizeof first / sizeof first[0];
    open_checked(w, r->kind, first, r->n[0], r->fds[0]);
    struct entry rest[WIN + 2]; /* more than are left: the range runs out */
    r->n[1] = WIN + 2;
    for (int i = 0; i < r->n[1]; i++)
        rest[i] = (struct entry){i % 3 == 1 ? v6 : 4, 0, false};
    open_checked(w, r->kind, rest, r->n[1], r->fds[1]);
    int full = 0;
    for (int i = 0; i < r->n[1]; i++)
        full += r->fds[1][i] == -EADDRINUSE;
    if (!full)
        FAIL("open_listeners (kind %d): the range never ran out", r->kind);
    /* Freed ports come back, from where the cursor stands. */
    for (int i = 0; i < 3; i++) {
        int fd = r->fds[1][i];
        if (fd >= 0) {
            w->used[rest[i].family == 6][port_of_any(fd) - w->low] = 0;
            close(fd);
            r->fds[1][i] = -1;
        }
    }
    const struct entry again[] = {{4, 0, false}, {v6, 0, false}, {4, 0, false}, {4, 0, false}};
    r->n[2] = sizeof again / sizeof again[0];
    open_checked(w, r->kind, again, r->n[2], r->fds[2]);
    return NULL;
}

static void sockets_phase(void)
{
    int probe = bound_socket(6, SOCK_STREAM, 0);
    if (probe < 0) {
        have_ipv6 = false;
        fprintf(stderr, "stress: no IPv6 loopback (%s): IPv4 only\n", strerror(-probe));
    } else {
        close(probe);
    }
    int low = free_window(WIN);
    struct walk_run runs[2];
    int taken[2];
    for (int k = 0; k < 2; k++) {
        struct walk_run *r = &runs[k];
        memset(r, 0, sizeof *r);
        r->kind = k ? SOCK_DGRAM : SOCK_STREAM;
        r->w.low = low;
        r->w.high = low + WIN - 1;
        r->w.cursor = r->w.high - 1;
        r->w.avoid[2] = r->w.avoid[5] = 1;
        taken[k] = bound_socket(4, r->kind, low + 1);
        if (taken[k] < 0 || (r->kind == SOCK_STREAM && listen(taken[k], 8) < 0))
            FAIL("taking port %d: %s", low + 1, strerror(-taken[k]));
        r->w.used[0][1] = 1;
    }
    /* Bad arguments: nothing done, the cursor where it was. */
    int fam[2] = {4, 5}, ports[2] = {0, 0}, fds[2] = {-7, -7}, bound[2], cursor = low;
    unsigned char addrs[32] = {0};
    if (uproxy_open_listeners(2, SOCK_STREAM, fam, addrs, ports, low, low + WIN - 1, &cursor,
                              runs[0].w.avoid, 64, fds, bound) != -EINVAL || fds[0] != -7 ||
        cursor != low)
        FAIL("open_listeners with family 5: not EINVAL, or something done");
    cursor = low + WIN;
    fam[1] = 4;
    if (uproxy_open_listeners(2, SOCK_STREAM, fam, addrs, ports, low, low + WIN - 1, &cursor,
                              runs[0].w.avoid, 64, fds, bound) != -EINVAL || fds[0] != -7)
        FAIL("open_listeners with the cursor past the range: not EINVAL");
    if (uproxy_open_listeners(0, SOCK_STREAM, fam, addrs, ports, low, low + WIN - 1, &cursor,
                              runs[0].w.avoid, 64, fds, bound) != -EINVAL) /* (cursor still bad) */
        FAIL("open_listeners of none with a bad cursor: not EINVAL");

    pthread_t udp;
    if (pthread_create(&udp, NULL, walk_main, &runs[1]) != 0)
        FAIL("pthread_create");
    walk_main(&runs[0]);
    pthread_join(udp, NULL);
    int opened = 0;
    for (int k = 0; k < 2; k++) {
        for (int c = 0; c < 3; c++)
            for (int i = 0; i < runs[k].n[c]; i++)
                if (runs[k].fds[c][i] >= 0) {
                    opened++;
                    close(runs[k].fds[c][i]);
                }
        close(taken[k]);
    }
    printf("stress: %d listening sockets opened as the walk says (IPv6 %s)\n", opened,
           have_ipv6 ? "too" : "absent");
}

/* The batched push: per round, PUSH_N listeners from uproxy_open_listeners (both
 * families) pushed with uproxy_engine_listeners_add among three bad entries (a closed
 * fd, a duplicate fd, an affinity with no group), then CLIENT_THREADS threads connect
 * through them to an echo server while the main thread removes the duplicate (the
 * original must keep accepting), pauses and resumes one, re-pushes another's list,
 * removes and closes some (their clients may be reset, no one else's), and pushes
 * more listeners, all while the engine thread accepts and relays. Three rounds pass
 * the engine's first 64 listener slots (its array grows under a running engine). */
#define PUSH_ROUNDS 3
#define PUSH_N 20
#define PUSH_EXTRA 4 /* pushed mid-traffic */
#define CLIENT_THREADS 4
#define CLIENT_CONNS 40
#define MSG 64

struct echo {
    int fd[2]; /* loopback listeners (fd[1] -1 without IPv6) */
    int port[2];
    int stop[2];
};

/* Read to EOF, send it back, close: one connection at a time. */
static void *echo_main(void *arg)
{
    struct echo *s = arg;
    for (;;) {
        struct pollfd p[3] = {{s->stop[0], POLLIN, 0}, {s->fd[0], POLLIN, 0}, {s->fd[1], POLLIN, 0}};
        if (poll(p, 3, -1) < 0)
            continue;
        if (p[0].revents)
            return NULL;
        for (int k = 1; k < 3; k++) {
            if (!(p[k].revents & POLLIN))
                continue;
            int c = accept4(p[k].fd, NULL, NULL, SOCK_CLOEXEC);
            if (c < 0)
                continue;
            struct timeval tv = {10, 0};
            setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
            char buf[4 * MSG];
            size_t got = 0;
            ssize_t r;
            while (got < sizeof buf && (r = recv(c, buf + got, sizeof buf - got, 0)) > 0)
                got += (size_t)r;
            if (r == 0)
                send(c, buf, got, MSG_NOSIGNAL);
            close(c); /* (a relay reset by its client: the error ends it the same) */
        }
    }
}

/* One client through listener `port`: true when it got its message back, false when
 * refused or reset; a hang (10 s) fails the program. */
static bool echo_through(int family, int port, const char *tag)
{
    char msg[MSG] = {0}, back[2 * MSG];
    snprintf(msg, sizeof msg, "%s via port %d", tag, port);
    struct sockaddr_storage ss;
    socklen_t len = sockaddr_of(family, port, &ss);
    int fd = socket(family == 6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        FAIL("client socket: %s", strerror(errno));
    struct timeval tv = {10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    bool ok = false;
    if (connect(fd, (struct sockaddr *)&ss, len) == 0) {
        if (send(fd, msg, sizeof msg, MSG_NOSIGNAL) == (ssize_t)sizeof msg) {
            shutdown(fd, SHUT_WR);
            size_t got = 0;
            ssize_t r;
            while (got < sizeof back && (r = recv(fd, back + got, sizeof back - got, 0)) > 0)
                got += (size_t)r;
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                FAIL("%s: no answer in 10 s", msg);
            ok = r == 0 && got == sizeof msg && memcmp(msg, back, sizeof msg) == 0;
        }
    } else if (errno != ECONNREFUSED && errno != ECONNRESET) {
        /* (reset: the listener was closed between the handshake and connect's return,
         * its accept queue reset; the caller knows whether it was doomed) */
        FAIL("%s: connect: %s", msg, strerror(errno));
    }
    close(fd);
    return ok;
}

struct push_round {
    int family[PUSH_N], port[PUSH_N];
    int doomed[PUSH_N];       /* removed and closed while clients run (atomic) */
    int ok, reset, progress;  /* clients (atomic) */
    int step;                 /* the main thread's (atomic): see push_phase */
};

struct client_arg {
    struct push_round *r;
    int thread;
};

static void *client_main(void *arg)
{
    struct client_arg *a = arg;
    struct push_round *r = a->r;
    for (int k = 0; k < CLIENT_CONNS; k++) {
        /* Connection k waits for the main thread's step 6k / CLIENT_CONNS: its removals,
         * pause and pushes land between the clients' connections, never all after. */
        while (__atomic_load_n(&r->step, __ATOMIC_SEQ_CST) < 6 * k / CLIENT_CONNS)
            usleep(200);
        int i = (a->thread * 7 + k * 3) % PUSH_N; /* (each thread: every listener twice) */
        char tag[32];
        snprintf(tag, sizeof tag, "client %d.%d", a->thread, k);
        bool ok = echo_through(r->family[i], r->port[i], tag);
        if (!ok && !__atomic_load_n(&r->doomed[i], __ATOMIC_SEQ_CST))
            FAIL("%s via listener %d (port %d): reset, and the listener is still there", tag,
                 i, r->port[i]);
        __atomic_add_fetch(ok ? &r->ok : &r->reset, 1, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&r->progress, 1, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

struct push_counts {
    int opened, refused, failed, done;
};

static void push_drain(struct uproxy_engine *e, struct push_counts *c)
{
    static struct uproxy_event evs[64];
    struct uproxy_done dn[64];
    int n;
    while ((n = uproxy_engine_events(e, evs, 64)) > 0)
        for (int k = 0; k < n; k++) {
            c->opened += evs[k].kind == UPROXY_EV_OPENED;
            c->refused += evs[k].kind == UPROXY_EV_REFUSED;
            c->failed += evs[k].kind == UPROXY_EV_CONNECT_FAILED;
        }
    while ((n = uproxy_engine_poll(e, dn, 64)) > 0)
        for (int k = 0; k < n; k++) {
            if (!(dn[k].token & UPROXY_SETUP_TOKEN))
                FAIL("push: a completion without the set-up token");
            uproxy_engine_release(e, dn[k].conn);
            c->done++;
        }
}

/* uproxy_engine_listeners_add's arrays, filled by batch_add. */
struct push_batch {
    int n, fds[PUSH_N + 8], has_service[PUSH_N + 8], families[PUSH_N + 8], counts[PUSH_N + 8];
    unsigned char addrs[2 * 16 * (PUSH_N + 8)];
    int ports[2 * (PUSH_N + 8)], indexes[2 * (PUSH_N + 8)];
    double avoid[2 * (PUSH_N + 8)];
    int transparent[PUSH_N + 8], groups[PUSH_N + 8];
    double timeouts[PUSH_N + 8];
    int ids[PUSH_N + 8], errs[PUSH_N + 8];
    size_t off;
    int ep;
};

/* Listener `fd` into the batch; its endpoints: the echo server, after a refusing port
 * when `refusing` (the second attempt then goes to the echo). */
static void batch_add(struct push_batch *b, int fd, int family, const struct echo *echo,
                      const int *refusing, double aff_timeout)
{
    int i = b->n++, alen = family == 6 ? 16 : 4;
    b->fds[i] = fd;
    b->has_service[i] = 1;
    b->families[i] = family;
    b->counts[i] = refusing ? 2 : 1;
    b->transparent[i] = 0;
    b->groups[i] = -1;
    b->timeouts[i] = aff_timeout;
    int ports[2] = {refusing ? refusing[family == 6] : echo->port[family == 6],
                    echo->port[family == 6]};
    for (int k = 0; k < b->counts[i]; k++) {
        unsigned char a[16];
        loopback(family, a);
        memcpy(b->addrs + b->off, a, (size_t)alen);
        b->off += (size_t)alen;
        b->ports[b->ep] = ports[k];
        b->indexes[b->ep] = k;
        b->avoid[b->ep] = 0;
        b->ep++;
    }
}

/* A new endpoint list for listener `id` (as batch_add builds one); 0 or -errno. */
static int push_list(struct uproxy_engine *e, int id, int family, const struct echo *echo,
                     const int *refusing)
{
    unsigned char a[32];
    loopback(family, a);
    loopback(family, a + (family == 6 ? 16 : 4));
    int ports[2] = {refusing ? refusing[family == 6] : 0, echo->port[family == 6]};
    int idx[2] = {0, 1}, n = refusing ? 2 : 1;
    double never[2] = {0, 0};
    return uproxy_engine_listener_set(e, id, 1, family, n, a, ports + 2 - n, idx, never, NULL,
                                      0, -1, 0);
}

static int push_batch(struct uproxy_engine *e, struct push_batch *b)
{
    return uproxy_engine_listeners_add(e, b->n, b->fds, b->has_service, b->families, b->counts,
                                       b->addrs, b->ports, b->indexes, b->avoid, NULL,
                                       b->transparent, b->groups, b->timeouts, b->ids, b->errs);
}

static void push_phase(void)
{
    struct uproxy_engine *e = uproxy_engine_new_threads(2, 4, 64 * 1024, 2); /* a group */
    if (!e)
        FAIL("push engine_new: %s", strerror(errno));
    static const double timeouts[] = {1.0, 1.0};
    if (uproxy_engine_setup_config(e, timeouts, 2, 5.0, 0.01, 0.2, 0.02) != 0)
        FAIL("push setup_config");
    struct uproxy_event none;
    if (uproxy_engine_events(e, &none, 1) != 0) /* (no event yet: not even a queue) */
        FAIL("push: an event before any listener");
    struct echo echo = {{-1, -1}, {0, 0}, {-1, -1}};
    int refusing[2] = {0, 0}, refusing_fd[2] = {-1, -1};
    for (int k = 0; k < 1 + have_ipv6; k++) {
        echo.fd[k] = bound_socket(k ? 6 : 4, SOCK_STREAM, 0);
        refusing_fd[k] = bound_socket(k ? 6 : 4, SOCK_STREAM, 0); /* bound, not listening */
        if (echo.fd[k] < 0 || refusing_fd[k] < 0 || listen(echo.fd[k], 1024) < 0)
            FAIL("echo: %s", strerror(errno));
        echo.port[k] = port_of_any(echo.fd[k]);
        refusing[k] = port_of_any(refusing_fd[k]);
    }
    if (pipe2(echo.stop, O_CLOEXEC) < 0)
        FAIL("pipe: %s", strerror(errno));
    pthread_t echo_thread;
    if (pthread_create(&echo_thread, NULL, echo_main, &echo) != 0)
        FAIL("pthread_create");
    int low = free_window(PUSH_N + 8), cursor = low, efd = uproxy_engine_eventfd(e);
    unsigned char avoid[PUSH_N + 8] = {0};
    struct push_counts cnt = {0, 0, 0, 0};
    int relayed = 0, reset = 0, pushed = 0;
    for (int round = 0; round < PUSH_ROUNDS; round++) {
        static struct push_round r;
        memset(&r, 0, sizeof r);
        int families[PUSH_N], ports[PUSH_N] = {0}, fds[PUSH_N], bound[PUSH_N];
        unsigned char addrs[16 * PUSH_N];
        for (int i = 0; i < PUSH_N; i++) {
            families[i] = have_ipv6 && i % 4 == 3 ? 6 : 4;
            loopback(families[i], addrs + 16 * i);
        }
        if (uproxy_open_listeners(PUSH_N, SOCK_STREAM, families, addrs, ports, low,
                                  low + PUSH_N + 7, &cursor, avoid, 1024, fds, bound) != PUSH_N)
            FAIL("push: open_listeners");
        for (int i = 0; i < PUSH_N; i++) {
            if (fds[i] < 0)
                FAIL("push: listener %d: %s", i, strerror(-fds[i]));
            check_listener(fds[i], SOCK_STREAM, families[i], bound[i]);
            r.family[i] = families[i];
            r.port[i] = bound[i];
        }
        /* The batch: the PUSH_N, with a closed fd after #3 (its endpoints still take
         * their place in the flat arrays), a duplicate of #0 after #8 and an affinity
         * without a group after #13: a wrong offset would send later ones astray. */
        static struct push_batch b;
        memset(&b, 0, sizeof b);
        int at[PUSH_N], bad_fd = -1, dup = -1, noaff = -1;
        int aff_fd = listener();
        for (int i = 0; i < PUSH_N; i++) {
            at[i] = b.n;
            batch_add(&b, fds[i], families[i], &echo, i % 2 ? refusing : NULL, 0);
            if (i == 3) {
                bad_fd = b.n;
                batch_add(&b, 1 << 20, 4, &echo, refusing, 0); /* (past any fd: EBADF) */
            } else if (i == 8) {
                dup = b.n;
                batch_add(&b, fds[0], families[0], &echo, NULL, 0);
            } else if (i == 13) {
                noaff = b.n;
                batch_add(&b, aff_fd, 4, &echo, refusing, 60.0); /* (group -1) */
            }
        }
        if (push_batch(e, &b) != b.n)
            FAIL("push: listeners_add");
        int last = -1;
        for (int i = 0; i < PUSH_N; i++) {
            int id = b.ids[at[i]];
            if (id <= last || b.errs[at[i]] != 0)
                FAIL("push: listener %d: id %d (after %d), err %d", i, id, last, b.errs[at[i]]);
            last = id;
        }
        if (b.ids[bad_fd] != -EBADF || b.errs[bad_fd] != 0)
            FAIL("push: a closed fd: id %d err %d", b.ids[bad_fd], b.errs[bad_fd]);
        if (b.ids[dup] < 0 || b.errs[dup] != 0)
            FAIL("push: a duplicate: id %d err %d", b.ids[dup], b.errs[dup]);
        if (b.ids[noaff] < 0 || b.errs[noaff] != -EINVAL)
            FAIL("push: affinity without a group: id %d err %d", b.ids[noaff], b.errs[noaff]);
        pushed += b.n;

        pthread_t threads[CLIENT_THREADS];
        struct client_arg args[CLIENT_THREADS];
        for (int t = 0; t < CLIENT_THREADS; t++) {
            args[t] = (struct client_arg){&r, t};
            if (pthread_create(&threads[t], NULL, client_main, &args[t]) != 0)
                FAIL("pthread_create");
        }
        static struct push_batch more;
        int extra_fds[PUSH_EXTRA], step = 0, turn = 0;
        const int total = CLIENT_THREADS * CLIENT_CONNS;
        /* Step s once s * CLIENT_CONNS / 8 connections per thread are done (before step
         * s + 1 each client may go up to (s + 1) * CLIENT_CONNS / 6: no deadlock, and
         * every step lands mid-traffic). */
        while (__atomic_load_n(&r.progress, __ATOMIC_SEQ_CST) < total || step < 6) {
            int progress = __atomic_load_n(&r.progress, __ATOMIC_SEQ_CST);
            if (progress < CLIENT_THREADS * step * CLIENT_CONNS / 8) {
                /* (not yet) */
            } else if (step == 0) { /* the duplicate goes; #0 must keep accepting */
                uproxy_engine_listener_remove(e, b.ids[dup]);
                step++;
            } else if (step == 1) {
                uproxy_engine_listener_pause(e, b.ids[at[2]]);
                usleep(2000);
                uproxy_engine_listener_resume(e, b.ids[at[2]]);
                uproxy_engine_listener_remove(e, b.ids[noaff]);
                close(aff_fd);
                step++;
            } else if (step == 2) { /* #4 loses its refusing endpoint (it had none: even) */
                if (push_list(e, b.ids[at[4]], families[4], &echo, NULL) != 0)
                    FAIL("push: listener_set");
                step++;
            } else if (step == 3) { /* removed and closed mid-traffic */
                for (int i = 5; i < PUSH_N; i += 6) {
                    __atomic_store_n(&r.doomed[i], 1, __ATOMIC_SEQ_CST);
                    uproxy_engine_listener_remove(e, b.ids[at[i]]);
                    close(fds[i]);
                }
                step++;
            } else if (step == 4) { /* a push while the engine relays */
                memset(&more, 0, sizeof more);
                for (int k = 0; k < PUSH_EXTRA; k++) {
                    extra_fds[k] = listener();
                    batch_add(&more, extra_fds[k], 4, &echo, k % 2 ? refusing : NULL, 0);
                }
                if (push_batch(e, &more) != PUSH_EXTRA)
                    FAIL("push: listeners_add mid-traffic");
                for (int k = 0; k < PUSH_EXTRA; k++)
                    if (more.ids[k] < 0 || more.errs[k] != 0)
                        FAIL("push: mid-traffic #%d: id %d err %d", k, more.ids[k], more.errs[k]);
                pushed += PUSH_EXTRA;
                step++;
            } else if (step == 5) { /* through them, from this thread too */
                for (int k = 0; k < PUSH_EXTRA; k++)
                    if (!echo_through(4, port_of(extra_fds[k]), "main"))
                        FAIL("push: not relayed through a listener pushed mid-traffic");
                step++;
            }
            __atomic_store_n(&r.step, step, __ATOMIC_SEQ_CST);
            /* Every turn new lists for four listeners (odd ones: the refusing endpoint
             * too), racing the engine thread reading the old ones and marking their
             * endpoints avoided; a removed one's id is gone. */
            for (int k = 0; k < 4; k++) {
                int j = (turn++ * 2 + 1) % PUSH_N;
                int rc = push_list(e, b.ids[at[j]], families[j], &echo, refusing);
                if (rc != (__atomic_load_n(&r.doomed[j], __ATOMIC_SEQ_CST) ? -ENOENT : 0))
                    FAIL("push: a new list for listener %d: %d", j, rc);
            }
            struct pollfd p = {.fd = efd, .events = POLLIN};
            poll(&p, 1, 2);
            push_drain(e, &cnt);
        }
        for (int t = 0; t < CLIENT_THREADS; t++)
            pthread_join(threads[t], NULL);
        for (int i = 0; i < PUSH_N; i++)
            if (!r.doomed[i]) {
                uproxy_engine_listener_remove(e, b.ids[at[i]]);
                close(fds[i]);
            }
        for (int k = 0; k < PUSH_EXTRA; k++) {
            uproxy_engine_listener_remove(e, more.ids[k]);
            close(extra_fds[k]);
        }
        /* Every connection the engine opened ends (the clients read to EOF). */
        struct uproxy_engine_stats st;
        for (int spins = 0; spins < 2000; spins++) {
            uproxy_engine_stats(e, &st);
            push_drain(e, &cnt);
            if (cnt.done == cnt.opened && !st.setups_live && !st.conns_live)
                break;
            struct pollfd p = {.fd = efd, .events = POLLIN};
            poll(&p, 1, 5);
        }
        if (cnt.done != cnt.opened || st.setups_live || st.conns_live)
            FAIL("push round %d: %d opened, %d done, %lu setting up, %lu live", round,
                 cnt.opened, cnt.done, (unsigned long)st.setups_live,
                 (unsigned long)st.conns_live);
        relayed += r.ok;
        reset += r.reset;
    }
    if (cnt.refused)
        FAIL("push: %d clients refused by the engine (the echo server always answers)",
             cnt.refused);
    if (!cnt.failed)
        FAIL("push: no connect to a refusing endpoint ever failed");
    uproxy_engine_stop(e);
    while (!uproxy_engine_stopped(e)) {
        struct pollfd p = {.fd = efd, .events = POLLIN};
        poll(&p, 1, 100);
        push_drain(e, &cnt);
    }
    push_drain(e, &cnt);
    uproxy_engine_free(e);
    if (write(echo.stop[1], "x", 1) != 1)
        FAIL("echo stop: %s", strerror(errno));
    pthread_join(echo_thread, NULL);
    for (int k = 0; k < 2; k++) {
        if (echo.fd[k] >= 0)
            close(echo.fd[k]);
        if (refusing_fd[k] >= 0)
            close(refusing_fd[k]);
        close(echo.stop[k]);
    }
    printf("stress: %d listeners pushed in batches, %d clients relayed, %d reset (removed "
           "mid-traffic), %d failed connects retried\n",
           pushed, relayed + PUSH_ROUNDS * PUSH_EXTRA, reset, cnt.failed);
}

int main(void)
{
    int fds_before = count_fds();
    int lc = listener(), lb = listener();
    /* a group of three engine threads (connections added go to each in turn), a small
     * pool: copies too */
    struct uproxy_engine *e = uproxy_engine_new_threads(3, 4, 64 * 1024, 2);
    if (!e)
        FAIL("engine_new: %s", strerror(errno));
    static char payload[300 * 1024];
    memset(payload, 'p', sizeof payload);
    static struct slot slots[ROUNDS * BATCH];
    int efd = uproxy_engine_eventfd(e);
    int pending_stop = 0;

    for (int round = 0; round < ROUNDS; round++) {
        int base = round * BATCH;
        for (int i = 0; i < BATCH; i++) {
            struct slot *s = &slots[base + i];
            int cn, bn;
            tcp_pair(lc, &cn, &s->client);
            tcp_pair(lb, &bn, &s->backend);
            s->how = (base + i) % 6;
            if ((i / 6) % 2) /* as a takeover brings it: counters, bytes read, an EOF */
                s->conn = uproxy_engine_add_state(e, cn, bn, (uint64_t)(base + i), 7, 11,
                                                  payload, 1000, payload, 3000,
                                                  (i / 12) % 2, 0);
            else
                s->conn = uproxy_engine_add(e, cn, bn, (uint64_t)(base + i));
            if (!s->conn)
                FAIL("add: %s", strerror(errno));
            /* Some bytes in flight, sometimes more than a pipe holds. */
            size_t len = (i % 3 == 0) ? sizeof payload : 100;
            if (send(s->client, payload, len, MSG_DONTWAIT) < 0 && errno != EAGAIN)
                FAIL("send: %s", strerror(errno));
        }
        for (int i = 0; i < BATCH; i++) {
            struct slot *s = &slots[base + i];
            switch (s->how) {
            case 0:
                shutdown(s->client, SHUT_WR);
                shutdown(s->backend, SHUT_WR);
                break;
            case 1:
                rst_close(s->client);
                s->client = -1;
                break;
            case 2:
                rst_close(s->backend);
                s->backend = -1;
                break;
            case 3:
                uproxy_engine_abort(e, s->conn);
                uproxy_engine_abort(e, s->conn); /* twice: still one completion */
                break;
            case 5:
                uproxy_engine_detach(e, s->conn);
                uproxy_engine_detach(e, s->conn); /* twice: still one completion */
                break;
            default:
                pending_stop++;
            }
        }
        /* Clean ones need their bytes read to finish: read everything everywhere. */
        int want = 0, got = 0;
        for (int i = 0; i < BATCH; i++)
            want += slots[base + i].how != 4;
        for (int spins = 0; got < want && spins < 2000; spins++) {
            for (int i = 0; i < BATCH; i++) {
                struct slot *s = &slots[base + i];
                char buf[65536];
                if (s->client >= 0)
                    while (recv(s->client, buf, sizeof buf, MSG_DONTWAIT) > 0)
                        ;
                if (s->backend >= 0)
                    while (recv(s->backend, buf, sizeof buf, MSG_DONTWAIT) > 0)
                        ;
            }
            struct pollfd p = {.fd = efd, .events = POLLIN};
            poll(&p, 1, 5);
            got += drain(e, slots, 0);
        }
        int finished = 0;
        for (int i = 0; i < BATCH; i++)
            finished += slots[base + i].completions;
        if (finished != want)
            FAIL("round %d: %d of %d connections completed", round, finished, want);
    }

    struct uproxy_engine_stats st;
    uproxy_engine_stats(e, &st);
    if (st.conns_live != (uint64_t)pending_stop)
        FAIL("conns_live %lu, expected %d", (unsigned long)st.conns_live, pending_stop);
    if (st.pipes_total > 4)
        FAIL("pool grew past its bound: %lu", (unsigned long)st.pipes_total);

    uproxy_engine_stop(e);
    while (!uproxy_engine_stopped(e)) {
        struct pollfd p = {.fd = efd, .events = POLLIN};
        poll(&p, 1, 100);
        drain(e, slots, 1);
    }
    drain(e, slots, 1);

    static const int expect[6] = {UPROXY_DONE_CLOSED, UPROXY_DONE_RESET, UPROXY_DONE_RESET,
                                  UPROXY_DONE_ABORTED, UPROXY_DONE_ABORTED,
                                  UPROXY_DONE_DETACHED};
    for (int i = 0; i < ROUNDS * BATCH; i++) {
        struct slot *s = &slots[i];
        if (s->completions != 1)
            FAIL("conn %d (how %d): %d completions", i, s->how, s->completions);
        if (s->reason != expect[s->how])
            FAIL("conn %d (how %d): reason %d, expected %d", i, s->how, s->reason,
                 expect[s->how]);
        if (s->client >= 0)
            close(s->client);
        if (s->backend >= 0)
            close(s->backend);
    }
    uproxy_engine_stats(e, &st);
    if (st.conns_live || st.pipes_in_use || st.bufs_in_use)
        FAIL("after stop: live %lu, pipes %lu, bufs %lu", (unsigned long)st.conns_live,
             (unsigned long)st.pipes_in_use, (unsigned long)st.bufs_in_use);
    uproxy_engine_free(e);
    close(lc);
    close(lb);
    setup_phase();
    rng_state = (uint32_t)getpid() * 2654435761u ^ (uint32_t)time(NULL);
    if (!rng_state)
        rng_state = 1;
    sockets_phase();
    push_phase();
    if (count_fds() != fds_before)
        FAIL("fds: %d before, %d after", fds_before, count_fds());
    printf("stress: %d connections ok (splice %lu B, copy %lu B)\n", ROUNDS * BATCH,
           (unsigned long)st.splice_bytes, (unsigned long)st.copy_bytes);
    return 0;
}
