/* Stress test for the engine's C API, meant to be built with sanitizers:
 *
 *   cc -O1 -g -fsanitize=address,undefined -Inative native/stress.c native/relay.c native/transparent.c native/affinity.c -lpthread
 *   cc -O1 -g -fsanitize=thread -Inative native/stress.c native/relay.c native/transparent.c native/affinity.c -lpthread
 *
 * tests/relay/test_native.py builds and runs it (ASan+UBSan, and TSan when the
 * toolchain has it). Loopback TCP only. Each round opens a batch of relayed
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
 * and no pin is left to the refusing endpoint.
 * Exit status 0 on success; a message on stderr otherwise.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
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

#define SETUP_CLIENTS 256

static void setup_phase(void)
{
    struct uproxy_engine *e = uproxy_engine_new(4, 64 * 1024, 2);
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

int main(void)
{
    int fds_before = count_fds();
    int lc = listener(), lb = listener();
    struct uproxy_engine *e = uproxy_engine_new(4, 64 * 1024, 2); /* a small pool: copies too */
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
    if (count_fds() != fds_before)
        FAIL("fds: %d before, %d after", fds_before, count_fds());
    printf("stress: %d connections ok (splice %lu B, copy %lu B)\n", ROUNDS * BATCH,
           (unsigned long)st.splice_bytes, (unsigned long)st.copy_bytes);
    return 0;
}
