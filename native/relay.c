/* uproxy native relay engine. See uproxy_native.h for the shape and the contract.
 *
 * Threading: everything below "engine thread" runs only on the engine thread,
 * except the fields guarded by e->lock (the command list, the completion list,
 * the stopping flag) and the statistics/counters (relaxed atomics).
 *
 * Per connection and direction the state machine is:
 *   pipe (or copy buffer) holds data -> drain it to dst while dst is writable;
 *   empty and src saw EOF             -> shutdown(dst, SHUT_WR) once;
 *   empty and src is readable         -> bulk: take a pipe, fill it once from src;
 *                                        else (or no free pipe): recv into the
 *                                        scratch buffer, send, keep the rest.
 * A direction turns bulk when a recv fills the 64 KiB scratch buffer and
 * stops being bulk when a splice brings less than that (or nothing).
 * A pipe is filled only when empty and drained fully before src is read
 * again, so EAGAIN from splice is never ambiguous, and it goes back to the
 * pool only when empty. Readiness is tracked per fd from edge-triggered
 * events and cleared on EAGAIN, so EPOLLRDHUP cannot make the thread spin.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <linux/sockios.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include "uproxy_native.h"
#include "affinity.h"

#define SCRATCH_SIZE (64 * 1024)
#define MAX_EVENTS 256
#define UPROXY_NOTIFY_MS 40    /* under load: at most one wake-up of Python per this */
#define UPROXY_NOTIFY_BATCH 1024 /* ... or this many records queued */

#define CMD_ADD 1u
#define CMD_ABORT 2u
#define CMD_RELEASE 4u
#define CMD_DETACH 8u

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
            if (errno == EAGAIN) { /* non-blocking to_fd is full: wait, the pipe must drain */
                struct pollfd pfd = {.fd = to_fd, .events = POLLOUT};
                if (poll(&pfd, 1, -1) < 0 && errno != EINTR)
                    return -errno;
                continue;
            }
            return -errno;
        }
        left -= out;
    }
    return in;
}

/* ---- data structures ---------------------------------------------------- */

struct pipe_slot {
    int r, w;
    struct pipe_slot *next;
};

/* Sizes are uint32_t: a pipe holds at most its size (<= 1 MiB by default) and a
 * copy buffer at most SCRATCH_SIZE, or what a takeover hands over (a socket's
 * queue, far below 4 GiB). Kept small: an idle connection is mostly this. */
struct direction {
    struct pipe_slot *pipe; /* non-NULL only while it holds data */
    char *buf;              /* copy path: bytes read but not yet sent */
    uint32_t in_pipe;
    uint32_t buf_off, buf_len;
    bool bulk; /* the last read filled its buffer: use a pipe next */
    bool eof;  /* src returned EOF */
    bool shut; /* dst got SHUT_WR (after everything was delivered) */
    bool corked; /* the last send to dst had MSG_MORE (src's FIN is in): dst's
                  * SHUT_WR takes it out with the FIN, or dir_pump uncorks it */
};

struct conn;

/* What an epoll registration carries (data.u64): 0 for the wake-up eventfd, a
 * listener's address | 2, or a connection's address | its side (0 or 1). Both
 * structs are malloc'd, so the low bits are free; a connection needs no
 * per-side record for this. */
#define TAG_LISTENER 2u
#define TAG_MASK 3u

static inline uint64_t tag_conn(struct conn *c, int side) { return (uintptr_t)c | (unsigned)side; }

/* The endpoints pushed for a listener (uproxy_engine_listener_set); shared by
 * the listener and every set-up that started with them (reference counted). */
struct ep_entry {
    struct sockaddr_storage sa;
    socklen_t len;
    int index;
    bool here; /* on this node (transparent decisions) */
    int64_t link_reported; /* ms: when UPROXY_EV_NO_LINK last went out for it */
    int64_t avoid_until; /* ms, CLOCK_MONOTONIC; written by the engine thread too */
};

struct epset {
    int refs; /* atomic */
    int has_service;
    int transparent; /* UPROXY_TP_* */
    uint32_t aff_group;
    int64_t aff_timeout_ms; /* ClientIP affinity's timeout; 0: no affinity */
    int n;
    struct ep_entry ent[];
};

/* TCP_CA_NAME_MAX in the kernel */
#define CC_NAME_MAX 16

struct listener {
    int id, fd;
    /* the listener's TCP_CONGESTION when it is not the netns default (set at add):
     * the backend sockets of its connections get it too; "" leaves them alone */
    char cc[CC_NAME_MAX];
    /* guarded by e->lock */
    struct epset *eps;
    bool user_paused, fd_paused, removed, registered;
    struct listener *dead_next;
    int active; /* atomic: 0 once paused or removed (the accept loop checks it) */
    /* engine thread */
    int64_t resume_at;
    bool in_pause_list;
    struct listener *pause_next;
};

/* The set-up state of an engine-made connection: allocated at accept, freed
 * once it is connected (or refused), so an idle relayed connection does not
 * carry it. */
struct setup {
    struct epset *eps;
    int listener, attempt, ntried, cur, queue;
    int tried[UPROXY_SETUP_MAX_ATTEMPTS];
    int64_t deadline, fd_deadline;
    struct conn *tprev, *tnext;
    struct sockaddr_storage client;
    char cc[CC_NAME_MAX]; /* the listener's congestion control for the backend socket, "" */
};

/* Kept small (an idle relayed connection is this, two sockets and the Python
 * side's record): the completion is built from these fields when polled, and
 * the set-up state lives apart (struct setup). Fields written by different
 * threads are separate bytes, never bit-fields of one word. */
struct conn {
    struct uproxy_conn pub; /* first: the pointer handed to Python */
    struct uproxy_engine *owner; /* the engine (thread) of its group that relays it */
    int fd[2];              /* UPROXY_SIDE_CLIENT, UPROXY_SIDE_BACKEND */
    struct direction dir[2]; /* 0: client -> backend, 1: backend -> client */
    struct conn *prev, *next; /* all conns the engine thread knows */
    struct setup *su;         /* non-NULL while accepted and not connected yet */
    struct tw_req *tw;        /* transparent, our FIN first: its TIME_WAIT to destroy */
    /* after a detach: the bytes each direction held (freed with the conn) */
    char *held[2];
    uint32_t held_len[2];
    /* the completion (written before it is queued, read by uproxy_engine_poll) */
    int err;
    int8_t reason, side;
    bool detached;
    /* engine thread */
    bool readable[2], writable[2];
    bool hup[2]; /* an event reported EPOLLRDHUP/EPOLLHUP: never trust a short read */
    bool live, closed, released;
    bool registered[2]; /* in epoll already (the backend, from its connect) */
    bool nonblocking;   /* both fds known non-blocking */
    bool tp;            /* the engine bound the backend socket to the client's address */
    bool foreign;       /* added by uproxy_engine_add*: not set up here (the socket says) */
    bool tw_left;       /* transparent, our FIN first, and no exact address: count it */
    /* guarded by e->lock */
    bool cmd_queued;
    unsigned cmds;
    struct conn *cmd_next;
    struct conn *done_next;
};

struct old_links {
    struct uproxy_links *links;
    struct old_links *next;
};

/* A FIFO of set-ups waiting with one fixed delay: deadline-ordered by construction. */
struct timer_queue {
    struct conn *head, *tail;
};

struct uproxy_engine {
    int epfd, wakefd, donefd;
    pthread_t thread;
    bool thread_started;
    bool lock_ready;

    pthread_mutex_t lock;
    struct conn *cmd_head, *cmd_tail;
    struct conn *done_head, *done_tail;
    bool stopping;
    int stopped; /* atomic */

    /* engine thread only */
    struct conn *all;
    struct pipe_slot *free_pipes;
    int free_count, keep_free;
    int max_pipes, pipe_size;
    char *scratch;

    struct uproxy_engine_stats stats; /* written by the engine thread, atomically */

    /* connection set-up: configuration (set before any listener exists) */
    int64_t timeout_ms[UPROXY_SETUP_MAX_ATTEMPTS];
    int ntimeouts;
    int64_t avoid_ms, fd_retry_ms, fd_wait_ms, fd_pause_ms;
    /* guarded by e->lock */
    struct listener **listeners;
    int nlisteners, cap_listeners;
    struct listener *dead;
    struct uproxy_event *evq;
    int evq_len, evq_cap;
    struct listener *accepting; /* atomic: the listener the accept loop is on */
    struct uproxy_links *links; /* read by the engine thread, swapped under the lock */
    struct old_links *old_links; /* replaced, freed by the engine thread */
    char cc_default[CC_NAME_MAX]; /* the netns's TCP congestion control ("": not read yet) */
    struct uproxy_affinity *aff; /* ClientIP pins (its own lock) */
    /* engine thread */
    struct timer_queue tq[UPROXY_SETUP_MAX_ATTEMPTS + 1]; /* per attempt; the last: fd waits */
    struct listener *pause_head, *pause_tail;
    uint64_t setup_tokens, rng;
    int ev_pending;     /* events and completions queued since Python was last woken */
    struct tw_req *tw_batch; /* SOCK_DESTROY requests sent at the end of the round */
    int tw_n;
    int diagfd;         /* NETLINK_SOCK_DIAG, opened at the first request (-1: not yet) */
    bool tw_off;        /* the kernel refused: count them as left (the caller sweeps) */
    int64_t notify_at;  /* ms: when Python is woken for them (0: nothing pending) */
    int64_t notified;   /* ms: when Python was last woken for them */

    /* A group of engine threads (uproxy_engine_new_threads): the leader is the handle
     * Python holds; every API call on it applies to the group (listeners, endpoints,
     * links, stop), reads the group's events and completions, or goes to the engine
     * that owns the connection. The others share the leader's eventfd (donefd), its
     * ClientIP pins (aff) and its endpoint sets, and accept on the same listening
     * sockets (EPOLLEXCLUSIVE: one engine woken per connection). */
    struct uproxy_engine *leader; /* NULL: this is a leader (or alone) */
    struct uproxy_engine **group; /* leader of more than one: all, itself first */
    int ngroup;                   /* leader: how many (1 when alone) */
    int member;                   /* index in the group (0: the leader) */
    unsigned next_add;            /* leader: round robin of uproxy_engine_add* */
};

static inline int group_size(const struct uproxy_engine *e) { return e->ngroup > 1 ? e->ngroup : 1; }
static inline struct uproxy_engine *group_at(struct uproxy_engine *e, int i)
{
    return i ? e->group[i] : e;
}
/* Several engines accept on the same listening sockets. */
static inline bool grouped(const struct uproxy_engine *e) { return e->leader || e->ngroup > 1; }

static inline void stat_set(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline uint64_t stat_get(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
/* Single writer (the engine thread): load + store is enough, no RMW needed. */
static inline void stat_add(uint64_t *p, uint64_t v) { stat_set(p, stat_get(p) + v); }

static void wake(int fd)
{
    uint64_t one = 1;
    while (write(fd, &one, sizeof one) < 0 && errno == EINTR)
        ;
}

static void drain_eventfd(int fd)
{
    uint64_t v;
    while (read(fd, &v, sizeof v) < 0 && errno == EINTR)
        ;
}

/* ---- pipe pool (engine thread) ------------------------------------------ */

static int probe_pipe_size(int want)
{
    int fds[2];
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) < 0)
        return -1;
    int got = -1;
    for (int size = want; size >= UPROXY_PIPE_SIZE_MIN; size /= 2) {
        int r = fcntl(fds[1], F_SETPIPE_SZ, size);
        if (r >= size) {
            got = r;
            break;
        }
    }
    if (got < 0)
        got = fcntl(fds[1], F_GETPIPE_SZ);
    close(fds[0]);
    close(fds[1]);
    return got;
}

static struct pipe_slot *pool_get(struct uproxy_engine *e)
{
    struct pipe_slot *p = e->free_pipes;
    if (p) {
        e->free_pipes = p->next;
        e->free_count--;
    } else {
        if ((int)stat_get(&e->stats.pipes_total) >= e->max_pipes)
            return NULL;
        int fds[2];
        if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) < 0)
            return NULL; /* EMFILE and friends: copy instead */
        if (fcntl(fds[1], F_SETPIPE_SZ, e->pipe_size) < e->pipe_size) {
            /* Over the per-user pipe page limit: a small pipe is no better than copying. */
            close(fds[0]);
            close(fds[1]);
            return NULL;
        }
        p = malloc(sizeof *p);
        if (!p) {
            close(fds[0]);
            close(fds[1]);
            return NULL;
        }
        p->r = fds[0];
        p->w = fds[1];
        stat_add(&e->stats.pipes_total, 1);
    }
    p->next = NULL;
    stat_add(&e->stats.pipes_in_use, 1);
    return p;
}

/* A pipe that may still hold data is closed, never pooled. */
static void pool_discard(struct uproxy_engine *e, struct pipe_slot *p)
{
    close(p->r);
    close(p->w);
    free(p);
    stat_set(&e->stats.pipes_in_use, stat_get(&e->stats.pipes_in_use) - 1);
    stat_set(&e->stats.pipes_total, stat_get(&e->stats.pipes_total) - 1);
}

/* Only ever called with an empty pipe. Beyond e->keep_free idle ones it is
 * closed, so a past burst does not keep its fds and pipe pages forever. */
static void pool_put(struct uproxy_engine *e, struct pipe_slot *p)
{
    if (e->free_count >= e->keep_free) {
        pool_discard(e, p);
        return;
    }
    p->next = e->free_pipes;
    e->free_pipes = p;
    e->free_count++;
    stat_set(&e->stats.pipes_in_use, stat_get(&e->stats.pipes_in_use) - 1);
}

/* ---- connections (engine thread) ---------------------------------------- */

static void reset_close(int fd)
{
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

/* Queue c's completion (its reason, side and err set; built in uproxy_engine_poll). */
/* Python is woken for it at the end of the round (notify_python), or at once. */
static void done_queue(struct uproxy_engine *e, struct conn *c, bool at_once)
{
    pthread_mutex_lock(&e->lock);
    c->done_next = NULL;
    if (e->done_tail)
        e->done_tail->done_next = c;
    else
        e->done_head = c;
    e->done_tail = c;
    pthread_mutex_unlock(&e->lock);
    if (at_once)
        wake(e->donefd);
    else
        e->ev_pending++;
}

/* ---- transparent TIME_WAIT sockets (engine thread) ------------------------
 * A backend socket bound to the client's address that sends its FIN first ends
 * as a TIME_WAIT socket clientIP:E <-> pod:port here, which would take the pod's
 * SYN-ACK to that client reaching the pod directly from port E (see
 * uproxy/proxy/sockdiag.py). The engine destroys it once the backend's FIN is
 * read, by its exact address: per round, one netlink send asks for the noted
 * addresses (an O(1) lookup each), a second destroys those the kernel says are
 * in TIME_WAIT, by their cookie -- that socket and no other, also when the
 * backend's FIN crossed ours (then there is none: our socket closed passively and
 * its port is free for the next connection). The caller's sweep, a walk of every
 * socket of the node, is left for the ones it cannot (tw_left). */

#define TW_BATCH 64

struct tw_req {
    struct nlmsghdr nh;
    struct inet_diag_req_v2 r;
};

/* Our FIN goes first to the backend (called before the shutdown): note the
 * socket's exact address while it is connected, if it is transparent. */
static void tw_note(struct conn *c)
{
    if (c->tw || c->tw_left || (!c->tp && !c->foreign))
        return;
    int fd = c->fd[UPROXY_SIDE_BACKEND];
    struct sockaddr_storage local, peer;
    socklen_t ll = sizeof local, pl = sizeof peer;
    if (getsockname(fd, (struct sockaddr *)&local, &ll) < 0
        || getpeername(fd, (struct sockaddr *)&peer, &pl) < 0
        || peer.ss_family != local.ss_family)
        return; /* reset already: nothing will linger */
    int v6 = local.ss_family == AF_INET6;
    if (c->foreign) { /* handed to the engine: the socket says whether it is transparent */
        int on = 0;
        socklen_t ol = sizeof on;
        if (getsockopt(fd, v6 ? SOL_IPV6 : SOL_IP, v6 ? IPV6_TRANSPARENT : IP_TRANSPARENT,
                       &on, &ol) < 0 || !on)
            return;
    }
    struct tw_req *q = calloc(1, sizeof *q);
    if (!q) {
        c->tw_left = true;
        return;
    }
    q->nh.nlmsg_len = sizeof *q;
    q->nh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    q->nh.nlmsg_flags = NLM_F_REQUEST;
    q->r.sdiag_family = (uint8_t)local.ss_family;
    q->r.sdiag_protocol = IPPROTO_TCP;
    q->r.idiag_states = 1U << 6; /* TCP_TIME_WAIT */
    struct inet_diag_sockid *id = &q->r.id;
    if (v6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&local, *b = (struct sockaddr_in6 *)&peer;
        id->idiag_sport = a->sin6_port;
        id->idiag_dport = b->sin6_port;
        memcpy(id->idiag_src, &a->sin6_addr, 16);
        memcpy(id->idiag_dst, &b->sin6_addr, 16);
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&local, *b = (struct sockaddr_in *)&peer;
        id->idiag_sport = a->sin_port;
        id->idiag_dport = b->sin_port;
        memcpy(id->idiag_src, &a->sin_addr, 4);
        memcpy(id->idiag_dst, &b->sin_addr, 4);
    }
    id->idiag_cookie[0] = id->idiag_cookie[1] = INET_DIAG_NOCOOKIE;
    c->tw = q;
}

/* Send `n` requests; the kernel answers them within send(). Read the answers
 * without waiting: with `keep`, each TIME_WAIT socket's request is rewritten in
 * place into a SOCK_DESTROY of that socket (its cookie) and the count returned;
 * otherwise (the destroys) failures other than ENOENT are counted in *refused. */
static int tw_send(struct uproxy_engine *e, struct tw_req *reqs, int n, bool keep, int *refused)
{
    if (send(e->diagfd, reqs, (size_t)n * sizeof *reqs, 0) < 0) {
        *refused += n;
        return 0;
    }
    int out = 0;
    for (int tries = 0; tries <= n; tries++) { /* at most one answer per request */
        char buf[8192] __attribute__((aligned(8)));
        ssize_t got = recv(e->diagfd, buf, sizeof buf, MSG_DONTWAIT);
        if (got <= 0)
            break;
        int left = (int)got;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, left);
             h = NLMSG_NEXT(h, left)) {
            if (h->nlmsg_type == NLMSG_ERROR && h->nlmsg_len >= NLMSG_LENGTH(sizeof(int))) {
                int err = -((struct nlmsgerr *)NLMSG_DATA(h))->error;
                if (err && err != ENOENT) /* ENOENT: gone, or never one (crossed FINs) */
                    (*refused)++;
            } else if (keep && h->nlmsg_type == SOCK_DIAG_BY_FAMILY
                       && h->nlmsg_len >= NLMSG_LENGTH(sizeof(struct inet_diag_msg))
                       && out < n) {
                struct inet_diag_msg *m = NLMSG_DATA(h);
                if (m->idiag_state != 6) /* not TIME_WAIT: someone else's now, or closing */
                    continue;
                struct tw_req *d = &reqs[out++];
                d->nh.nlmsg_type = SOCK_DESTROY;
                d->r.sdiag_family = m->idiag_family;
                d->r.id = m->id;
            }
        }
    }
    return out;
}

/* The round's noted sockets: ask, then destroy the ones in TIME_WAIT. */
static void tw_flush(struct uproxy_engine *e)
{
    int n = e->tw_n;
    if (!n)
        return;
    e->tw_n = 0;
    if (!e->tw_off && e->diagfd < 0) {
        e->diagfd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, NETLINK_SOCK_DIAG);
        e->tw_off = e->diagfd < 0;
    }
    if (e->tw_off) {
        stat_add(&e->stats.tw_left, (uint64_t)n);
        return;
    }
    int refused = 0;
    int found = tw_send(e, e->tw_batch, n, true, &refused);
    int destroyed = found;
    if (!refused && found) {
        int failed = 0;
        tw_send(e, e->tw_batch, found, false, &failed);
        refused += failed;
        destroyed -= failed;
    }
    if (refused) { /* EPERM, EOPNOTSUPP: the caller's sweep says why, once */
        e->tw_off = true;
        stat_add(&e->stats.tw_left, (uint64_t)(refused > n ? n : refused));
    }
    stat_add(&e->stats.tw_destroyed, (uint64_t)(destroyed > 0 ? destroyed : 0));
}

/* The connection ends: its noted TIME_WAIT socket exists now if the backend's
 * FIN was read after ours (a reset before that sends RST instead: nothing lingers). */
static void tw_close(struct uproxy_engine *e, struct conn *c)
{
    struct tw_req *q = c->tw;
    c->tw = NULL;
    bool lingers = c->dir[1].eof;
    if (c->tw_left && lingers)
        stat_add(&e->stats.tw_left, 1);
    if (!q)
        return;
    if (lingers) {
        if (!e->tw_batch)
            e->tw_batch = malloc(TW_BATCH * sizeof *e->tw_batch);
        if (e->tw_off || !e->tw_batch) {
            stat_add(&e->stats.tw_left, 1);
        } else {
            e->tw_batch[e->tw_n++] = *q;
            if (e->tw_n == TW_BATCH)
                tw_flush(e);
        }
    }
    free(q);
}

static void conn_finish(struct uproxy_engine *e, struct conn *c, int reason, int side, int err)
{
    if (c->closed)
        return;
    c->closed = true;
    bool rst = reason != UPROXY_DONE_CLOSED;
    if (c->tw || c->tw_left)
        tw_close(e, c);
    for (int s = 0; s < 2; s++) {
        /* Explicit DEL: a forked child may still share the file, and then
         * close() alone would leave the registration (and its pointer) behind. */
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, c->fd[s], NULL);
        if (rst)
            reset_close(c->fd[s]);
        else
            close(c->fd[s]);
        c->fd[s] = -1;
        struct direction *d = &c->dir[s];
        if (d->pipe) {
            pool_discard(e, d->pipe);
            d->pipe = NULL;
        }
        if (d->buf) {
            free(d->buf);
            d->buf = NULL;
            stat_set(&e->stats.bufs_in_use, stat_get(&e->stats.bufs_in_use) - 1);
        }
    }
    if (c->live) {
        c->live = false;
        stat_set(&e->stats.conns_live, stat_get(&e->stats.conns_live) - 1);
    }
    c->reason = (int8_t)reason;
    c->side = (int8_t)side;
    c->err = err;
    done_queue(e, c, false);
}

/* The bytes direction `d` holds (copy buffer or pipe), moved into a malloc'd block.
 * False when they cannot be (no memory, a pipe read failing): then nothing moved. */
static bool dir_take(struct uproxy_engine *e, struct direction *d, char **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    if (d->buf) {
        *len = d->buf_len - d->buf_off;
        *out = malloc(*len ? *len : 1);
        if (!*out)
            return false;
        memcpy(*out, d->buf + d->buf_off, *len);
        free(d->buf);
        d->buf = NULL;
        stat_set(&e->stats.bufs_in_use, stat_get(&e->stats.bufs_in_use) - 1);
        return true;
    }
    if (d->pipe) {
        char *block = malloc(d->in_pipe);
        if (!block)
            return false;
        size_t got = 0;
        while (got < d->in_pipe) {
            ssize_t n = read(d->pipe->r, block + got, d->in_pipe - got);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) { /* cannot happen: the pipe holds exactly in_pipe bytes */
                free(block);
                return false;
            }
            got += (size_t)n;
        }
        pool_put(e, d->pipe); /* empty now */
        d->pipe = NULL;
        d->in_pipe = 0;
        *out = block;
        *len = got;
    }
    return true;
}

/* Hand the connection back (CMD_DETACH): stop watching both fds, take out what
 * each direction holds, queue the completion; the fds stay open. An EOF whose
 * direction is empty gets its SHUT_WR now, as the next pump would have sent it,
 * so the receiver only ever has to send SHUT_WR after pending bytes. */
static void conn_detach(struct uproxy_engine *e, struct conn *c)
{
    if (c->closed)
        return;
    for (int di = 0; di < 2; di++) {
        struct direction *d = &c->dir[di];
        if (d->eof && !d->shut && !d->buf && !d->pipe) {
            shutdown(c->fd[1 - di], SHUT_WR);
            d->shut = true;
        }
    }
    if (c->dir[0].shut && c->dir[1].shut) {
        conn_finish(e, c, UPROXY_DONE_CLOSED, -1, 0);
        return;
    }
    for (int di = 0; di < 2; di++) {
        size_t len;
        if (!dir_take(e, &c->dir[di], &c->held[di], &len)) {
            conn_finish(e, c, UPROXY_DONE_ERROR, -1, ENOMEM); /* nothing lost silently */
            return;
        }
        c->held_len[di] = (uint32_t)len;
    }
    c->closed = true;
    for (int s = 0; s < 2; s++)
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, c->fd[s], NULL);
    if (c->live) {
        c->live = false;
        stat_set(&e->stats.conns_live, stat_get(&e->stats.conns_live) - 1);
    }
    c->reason = UPROXY_DONE_DETACHED;
    c->side = -1;
    c->detached = true; /* fd[] are the caller's now; nothing here closes them again */
    done_queue(e, c, true); /* a takeover waits for it (NativeRelayHandle.pause) */
}

static void conn_fail(struct uproxy_engine *e, struct conn *c, int side, int err)
{
    int reason = (err == ECONNRESET || err == EPIPE) ? UPROXY_DONE_RESET : UPROXY_DONE_ERROR;
    conn_finish(e, c, reason, side, err);
}

/* Move what can be moved one way. Returns false when the connection ended. */
static bool dir_pump_once(struct uproxy_engine *e, struct conn *c, int di)
{
    struct direction *d = &c->dir[di];
    int src = di, dst = 1 - di;
    uint64_t *moved = di == 0 ? &c->pub.bytes_up : &c->pub.bytes_down;

    for (;;) {
        if (d->pipe) {
            if (!c->writable[dst])
                return true;
            ssize_t n = splice(d->pipe->r, NULL, c->fd[dst], NULL, d->in_pipe,
                               SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n == 0) { /* not expected with data in the pipe; wait rather than spin */
                c->writable[dst] = false;
                return true;
            }
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN) {
                    c->writable[dst] = false;
                    return true;
                }
                conn_fail(e, c, dst, errno);
                return false;
            }
            d->in_pipe -= (uint32_t)n;
            stat_add(moved, (uint64_t)n);
            stat_add(&e->stats.splice_bytes, (uint64_t)n);
            if (d->in_pipe == 0) {
                pool_put(e, d->pipe);
                d->pipe = NULL;
            }
            continue;
        }
        if (d->buf) {
            if (!c->writable[dst])
                return true;
            ssize_t n = send(c->fd[dst], d->buf + d->buf_off, d->buf_len - d->buf_off,
                             MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN) {
                    c->writable[dst] = false;
                    return true;
                }
                conn_fail(e, c, dst, errno);
                return false;
            }
            d->buf_off += (uint32_t)n;
            stat_add(moved, (uint64_t)n);
            stat_add(&e->stats.copy_bytes, (uint64_t)n);
            if (d->buf_off == d->buf_len) {
                free(d->buf);
                d->buf = NULL;
                stat_set(&e->stats.bufs_in_use, stat_get(&e->stats.bufs_in_use) - 1);
            }
            continue;
        }
        if (d->eof) {
            if (!d->shut) {
                /* our FIN first: the backend socket will linger in TIME_WAIT (a
                 * transparent one is destroyed at close, see tw_note) */
                if (dst == UPROXY_SIDE_BACKEND && !c->dir[1].eof && !c->hup[UPROXY_SIDE_BACKEND]) {
                    stat_add(&e->stats.closes_first, 1);
                    tw_note(c);
                }
                shutdown(c->fd[dst], SHUT_WR); /* the FIN carries corked bytes along */
                d->shut = true;
                if (d->corked)
                    stat_add(&e->stats.fins_with_data, 1);
                d->corked = false;
            }
            return true;
        }
        if (!c->readable[src])
            return true;

        /* Small reads (requests, interactive traffic) are cheaper as recv/send
         * and need no pipe; once a read fills the scratch buffer the direction
         * is bulk and uses a pipe while one is free. */
        struct pipe_slot *p = d->bulk ? pool_get(e) : NULL;
        if (p) {
            ssize_t n = splice(c->fd[src], NULL, p->w, NULL, (size_t)e->pipe_size,
                               SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n > 0) {
                d->pipe = p;
                d->in_pipe = (uint32_t)n;
                if (n < SCRATCH_SIZE)
                    d->bulk = false;
                continue;
            }
            int err = errno;
            pool_put(e, p); /* nothing went in */
            if (n == 0) {
                d->eof = true;
                continue;
            }
            if (err == EINTR)
                continue;
            if (err == EAGAIN) { /* the pipe was empty, so the socket is */
                c->readable[src] = false;
                d->bulk = false;
                return true;
            }
            conn_fail(e, c, src, err);
            return false;
        }

        /* Copy through the scratch buffer; keep only what dst refuses. */
        ssize_t n = recv(c->fd[src], e->scratch, SCRATCH_SIZE, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                c->readable[src] = false;
                return true;
            }
            conn_fail(e, c, src, errno);
            return false;
        }
        if (n == 0) {
            d->eof = true;
            continue;
        }
        if (n == SCRATCH_SIZE) {
            d->bulk = true;
        } else if (!c->hup[src]) {
            /* A short TCP read emptied the receive queue. Anything arriving after
             * the event we are handling raises a new edge, and a FIN that came
             * before it would have shown as EPOLLRDHUP (hup), so we can skip the
             * read that would only say EAGAIN. */
            c->readable[src] = false;
        }
        /* src's FIN is in (hup) and this short read emptied its queue: these are
         * the direction's last bytes and the next recv says EOF. MSG_MORE holds
         * them in dst's write queue for the SHUT_WR right after, which sets FIN
         * on that same segment: one packet (data+FIN) instead of two, and one
         * ACK fewer from the peer. */
        int more = n < SCRATCH_SIZE && c->hup[src] ? MSG_MORE : 0;
        ssize_t sent = 0;
        if (c->writable[dst]) {
            sent = send(c->fd[dst], e->scratch, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT | more);
            if (sent < 0) {
                if (errno != EAGAIN && errno != EINTR) {
                    conn_fail(e, c, dst, errno);
                    return false;
                }
                if (errno == EAGAIN)
                    c->writable[dst] = false;
                sent = 0;
            }
            stat_add(moved, (uint64_t)sent);
            stat_add(&e->stats.copy_bytes, (uint64_t)sent);
            if (sent > 0 && more)
                d->corked = true;
        }
        if (sent < n) {
            d->buf = malloc((size_t)(n - sent));
            if (!d->buf) {
                conn_finish(e, c, UPROXY_DONE_ERROR, -1, ENOMEM);
                return false;
            }
            stat_add(&e->stats.bufs_in_use, 1);
            memcpy(d->buf, e->scratch + sent, (size_t)(n - sent));
            d->buf_off = 0;
            d->buf_len = (uint32_t)(n - sent);
        }
    }
}

/* dir_pump_once, and then no byte stays corked: if src's EOF did not follow
 * the bytes sent with MSG_MORE (not expected: the FIN was in before them),
 * push them now (TCP_CORK off pushes what is queued, Nagle as dst had it). */
static bool dir_pump(struct uproxy_engine *e, struct conn *c, int di)
{
    if (!dir_pump_once(e, c, di))
        return false;
    struct direction *d = &c->dir[di];
    if (d->corked) {
        int off = 0;
        setsockopt(c->fd[1 - di], IPPROTO_TCP, TCP_CORK, &off, sizeof off);
        d->corked = false;
    }
    return true;
}

static void conn_pump(struct uproxy_engine *e, struct conn *c)
{
    if (!dir_pump(e, c, 0) || !dir_pump(e, c, 1))
        return;
    if (c->dir[0].shut && c->dir[1].shut)
        conn_finish(e, c, UPROXY_DONE_CLOSED, -1, 0);
}

static void setup_event(struct uproxy_engine *e, struct conn *c, uint32_t events);

static void conn_event(struct uproxy_engine *e, struct conn *c, int s, uint32_t ev)
{
    if (c->closed)
        return;
    if (c->su) {
        if (s == UPROXY_SIDE_BACKEND)
            setup_event(e, c, ev);
        return;
    }
    if (ev & EPOLLERR) {
        /* Also catches a reset on a side we no longer read (after its EOF). */
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd[s], SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err) {
            conn_fail(e, c, s, err);
            return;
        }
    }
    if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        c->hup[s] = true;
    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        c->readable[s] = true;
    if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR))
        c->writable[s] = true;
    conn_pump(e, c);
}

static void conn_start(struct uproxy_engine *e, struct conn *c)
{
    c->next = e->all;
    c->prev = NULL;
    if (e->all)
        e->all->prev = c;
    e->all = c;
    c->live = true;
    stat_add(&e->stats.conns_live, 1);
    for (int di = 0; di < 2; di++) /* bytes it came with (uproxy_engine_add_state) */
        if (c->dir[di].buf)
            stat_add(&e->stats.bufs_in_use, 1);
    for (int s = 0; s < 2; s++) {
        if (!c->nonblocking) {
            int fl = fcntl(c->fd[s], F_GETFL);
            if (fl >= 0 && !(fl & O_NONBLOCK))
                fcntl(c->fd[s], F_SETFL, fl | O_NONBLOCK);
        }
        if (c->registered[s])
            continue;
        struct epoll_event ev = {
            .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
            .data.u64 = tag_conn(c, s),
        };
        if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, c->fd[s], &ev) < 0) {
            int err = errno;
            conn_finish(e, c, UPROXY_DONE_ERROR, s, err);
            return;
        }
    }
    /* Data may already be queued: the initial pass sees it without waiting for an edge. */
    c->readable[0] = c->readable[1] = true;
    c->writable[0] = c->writable[1] = true;
    conn_pump(e, c);
}

static void conn_free(struct uproxy_engine *e, struct conn *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        e->all = c->next;
    if (c->next)
        c->next->prev = c->prev;
    free(c->held[0]);
    free(c->held[1]);
    free(c->tw);
    free(c);
}

/* ---- connection set-up (engine thread unless said) ----------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t rng_next(struct uproxy_engine *e)
{
    /* xorshift64*: plenty for a uniform pick among a few endpoints */
    uint64_t x = e->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    e->rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static void eps_ref(struct epset *s)
{
    if (s)
        __atomic_add_fetch(&s->refs, 1, __ATOMIC_RELAXED);
}

static void eps_unref(struct epset *s)
{
    if (s && __atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(s);
}

static void addr_out(const struct sockaddr_storage *ss, unsigned char *addr, int *port)
{
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        memcpy(addr, &a->sin6_addr, 16);
        *port = ntohs(a->sin6_port);
    } else {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        memcpy(addr, &a->sin_addr, 4);
        *port = ntohs(a->sin_port);
    }
}

/* Queue an event for Python (the eventfd is written once per round, see engine_main). */
static void ev_push(struct uproxy_engine *e, const struct uproxy_event *ev)
{
    pthread_mutex_lock(&e->lock);
    if (e->evq_len == e->evq_cap) {
        int cap = e->evq_cap ? e->evq_cap * 2 : 256;
        struct uproxy_event *q = realloc(e->evq, (size_t)cap * sizeof *q);
        if (!q) { /* an event lost beats a crash; the connection itself is unaffected */
            pthread_mutex_unlock(&e->lock);
            return;
        }
        e->evq = q;
        e->evq_cap = cap;
    }
    e->evq[e->evq_len++] = *ev;
    pthread_mutex_unlock(&e->lock);
    e->ev_pending++;
}

static void ev_for(struct conn *c, int kind, struct uproxy_event *ev)
{
    *ev = (struct uproxy_event){.kind = kind, .listener = c->su->listener, .endpoint = -1,
                                .attempts = c->su->attempt, .family = c->su->client.ss_family};
    addr_out(&c->su->client, ev->client_addr, &ev->client_port);
    if (c->su->eps && c->su->cur >= 0) {
        struct ep_entry *t = &c->su->eps->ent[c->su->cur];
        ev->endpoint = t->index;
        addr_out(&t->sa, ev->endpoint_addr, &ev->endpoint_port);
    }
}

static void tq_push(struct uproxy_engine *e, struct conn *c, int q, int64_t deadline)
{
    struct timer_queue *t = &e->tq[q];
    c->su->queue = q;
    c->su->deadline = deadline;
    c->su->tnext = NULL;
    c->su->tprev = t->tail;
    if (t->tail)
        t->tail->su->tnext = c;
    else
        t->head = c;
    t->tail = c;
}

static void tq_remove(struct uproxy_engine *e, struct conn *c)
{
    if (c->su->queue < 0)
        return;
    struct timer_queue *t = &e->tq[c->su->queue];
    if (c->su->tprev)
        c->su->tprev->su->tnext = c->su->tnext;
    else
        t->head = c->su->tnext;
    if (c->su->tnext)
        c->su->tnext->su->tprev = c->su->tprev;
    else
        t->tail = c->su->tprev;
    c->su->tprev = c->su->tnext = NULL;
    c->su->queue = -1;
}

/* Caller holds e->lock. */
static struct listener *listener_get(struct uproxy_engine *e, int id)
{
    return id >= 0 && id < e->nlisteners ? e->listeners[id] : NULL;
}

/* Caller holds e->lock: register the fd with epoll exactly when it should accept. */
static void listener_update(struct uproxy_engine *e, struct listener *l)
{
    bool want = !l->user_paused && !l->fd_paused && !l->removed && l->eps;
    __atomic_store_n(&l->active, !l->user_paused && !l->removed, __ATOMIC_SEQ_CST);
    if (want == l->registered)
        return;
    if (want) {
        /* Level-triggered: a batch cut short is picked up at the next wait. In a group
         * every engine waits on the socket: a connection wakes one of them, not all. */
        struct epoll_event ev = {.events = EPOLLIN | (grouped(e) ? EPOLLEXCLUSIVE : 0),
                                 .data.u64 = (uintptr_t)l | TAG_LISTENER};
        if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, l->fd, &ev) == 0)
            l->registered = true;
    } else {
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, l->fd, NULL);
        l->registered = false;
    }
}

/* Out of fds: stop accepting on `id` for fd_pause ms (the kernel keeps the backlog). */
static void listener_fd_pause(struct uproxy_engine *e, int id, int err)
{
    pthread_mutex_lock(&e->lock);
    struct listener *l = listener_get(e, id);
    bool first = false;
    if (l && !l->fd_paused) {
        l->fd_paused = true;
        listener_update(e, l);
        first = true;
    }
    pthread_mutex_unlock(&e->lock);
    if (!first)
        return;
    l->resume_at = now_ms() + e->fd_pause_ms;
    if (!l->in_pause_list) {
        l->in_pause_list = true;
        l->pause_next = NULL;
        if (e->pause_tail)
            e->pause_tail->pause_next = l;
        else
            e->pause_head = l;
        e->pause_tail = l;
    }
    struct uproxy_event ev = {.kind = UPROXY_EV_NO_FDS, .listener = id, .endpoint = -1, .err = err};
    ev_push(e, &ev);
}

static bool fd_errno(int err)
{
    return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}

static void aff_key(const struct setup *su, struct uproxy_affinity_key *k)
{
    memset(k, 0, sizeof *k);
    k->group = su->eps->aff_group;
    if (su->client.ss_family == AF_INET6) {
        k->family = 6;
        memcpy(k->addr, &((const struct sockaddr_in6 *)&su->client)->sin6_addr, 16);
    } else {
        k->family = 4;
        memcpy(k->addr, &((const struct sockaddr_in *)&su->client)->sin_addr, 4);
    }
}

static void aff_ep(const struct ep_entry *t, struct uproxy_affinity_ep *ep)
{
    memset(ep, 0, sizeof *ep);
    if (t->sa.ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&t->sa;
        ep->family = 6;
        memcpy(ep->addr, &a->sin6_addr, 16);
        ep->port = ntohs(a->sin6_port);
    } else {
        const struct sockaddr_in *a = (const struct sockaddr_in *)&t->sa;
        ep->family = 4;
        memcpy(ep->addr, &a->sin_addr, 4);
        ep->port = ntohs(a->sin_port);
    }
}

static bool setup_tried(const struct setup *su, int i)
{
    for (int k = 0; k < su->ntried; k++)
        if (su->tried[k] == i)
            return true;
    return false;
}

static int setup_choose_uniform(struct uproxy_engine *e, struct conn *c, int64_t now);

/* Balancer.choose: with ClientIP affinity, the client's pin when it is still
 * usable (listed, not tried for this connection, used within the timeout), else
 * the uniform choice below, pinned. */
static int setup_choose(struct uproxy_engine *e, struct conn *c, int64_t now)
{
    struct epset *s = c->su->eps;
    if (s->aff_timeout_ms <= 0 || !e->aff)
        return setup_choose_uniform(e, c, now);
    struct uproxy_affinity_key k;
    struct uproxy_affinity_ep pinned, ep;
    aff_key(c->su, &k);
    if (uproxy_affinity_lookup(e->aff, &k, now, s->aff_timeout_ms, &pinned)) {
        for (int i = 0; i < s->n; i++) {
            aff_ep(&s->ent[i], &ep);
            if (ep.family == pinned.family && ep.port == pinned.port &&
                memcmp(ep.addr, pinned.addr, sizeof ep.addr) == 0 && !setup_tried(c->su, i)) {
                uproxy_affinity_pin(e->aff, &k, &ep, now, s->aff_timeout_ms);
                return i;
            }
        }
        uproxy_affinity_drop(e->aff, &k, NULL); /* its endpoint is not usable now */
    }
    int i = setup_choose_uniform(e, c, now);
    if (i >= 0) {
        aff_ep(&s->ent[i], &ep);
        uproxy_affinity_pin(e->aff, &k, &ep, now, s->aff_timeout_ms);
    }
    return i;
}

/* Uniform among the endpoints not tried for this client and not avoided; among
 * the avoided ones when that is all; -1 when every one was tried. */
static int setup_choose_uniform(struct uproxy_engine *e, struct conn *c, int64_t now)
{
    struct epset *s = c->su->eps;
    int healthy = 0, untried = 0;
    for (int pass = 0; pass < 2; pass++) {
        int pick = -1;
        if (pass == 1) {
            if (healthy)
                pick = (int)(rng_next(e) % (uint64_t)healthy);
            else if (untried)
                pick = (int)(rng_next(e) % (uint64_t)untried);
            else
                return -1;
        }
        for (int i = 0; i < s->n; i++) {
            if (setup_tried(c->su, i))
                continue;
            bool ok = __atomic_load_n(&s->ent[i].avoid_until, __ATOMIC_RELAXED) <= now;
            if (pass == 0) {
                untried++;
                healthy += ok;
            } else if (!healthy || ok) {
                if (pick-- == 0)
                    return i;
            }
        }
    }
    return -1;
}

/* The client gets a RST and the set-up is gone. */
static void setup_refuse(struct uproxy_engine *e, struct conn *c, int reason, int err)
{
    struct uproxy_event ev;
    ev_for(c, UPROXY_EV_REFUSED, &ev);
    ev.reason = reason;
    ev.err = err;
    ev_push(e, &ev);
    tq_remove(e, c);
    if (c->fd[1] >= 0) {
        if (c->registered[1])
            epoll_ctl(e->epfd, EPOLL_CTL_DEL, c->fd[1], NULL);
        close(c->fd[1]);
    }
    reset_close(c->fd[0]);
    eps_unref(c->su->eps);
    stat_set(&e->stats.setups_live, stat_get(&e->stats.setups_live) - 1);
    stat_add(&e->stats.setups_refused, 1);
    free(c->su);
    free(c);
}

static void setup_connect(struct uproxy_engine *e, struct conn *c);
static void conn_start(struct uproxy_engine *e, struct conn *c);

static void setup_connected(struct uproxy_engine *e, struct conn *c)
{
    tq_remove(e, c);
    c->su->attempt++;
    struct uproxy_event ev;
    ev_for(c, UPROXY_EV_OPENED, &ev);
    ev.token = c->pub.token;
    ev.conn = &c->pub;
    ev_push(e, &ev);
    eps_unref(c->su->eps);
    free(c->su); /* a relayed connection carries no set-up state */
    c->su = NULL;
    stat_set(&e->stats.setups_live, stat_get(&e->stats.setups_live) - 1);
    stat_add(&e->stats.setups_opened, 1);
    conn_start(e, c);
}

/* The attempt at c->su->cur failed (err; ETIMEDOUT for the timeout): avoid that
 * endpoint, then the next attempt or the RST. */
static void setup_failed(struct uproxy_engine *e, struct conn *c, int err)
{
    int64_t now = now_ms();
    struct ep_entry *t = &c->su->eps->ent[c->su->cur];
    int64_t until = now + e->avoid_ms;
    __atomic_store_n(&t->avoid_until, until, __ATOMIC_RELAXED);
    pthread_mutex_lock(&e->lock); /* the listener's newer list, if it changed meanwhile */
    struct listener *l = listener_get(e, c->su->listener);
    if (l && l->eps && l->eps != c->su->eps) {
        for (int i = 0; i < l->eps->n; i++) {
            struct ep_entry *o = &l->eps->ent[i];
            if (o->len == t->len && memcmp(&o->sa, &t->sa, t->len) == 0)
                __atomic_store_n(&o->avoid_until, until, __ATOMIC_RELAXED);
        }
    }
    pthread_mutex_unlock(&e->lock);
    if (c->su->eps->aff_timeout_ms > 0 && e->aff) { /* Balancer.connect_failed: its pin goes */
        struct uproxy_affinity_key k;
        struct uproxy_affinity_ep ep;
        aff_key(c->su, &k);
        aff_ep(t, &ep);
        uproxy_affinity_drop(e->aff, &k, &ep);
    }
    struct uproxy_event ev;
    ev_for(c, UPROXY_EV_CONNECT_FAILED, &ev);
    ev.err = err;
    ev_push(e, &ev);
    c->su->tried[c->su->ntried++] = c->su->cur;
    c->su->attempt++;
    c->su->fd_deadline = 0; /* an attempt ended: the next NoSocket starts a new episode */
    if (c->su->attempt >= e->ntimeouts) {
        setup_refuse(e, c, UPROXY_REFUSED_ALL_FAILED, err);
        return;
    }
    int next = setup_choose(e, c, now);
    if (next < 0) {
        setup_refuse(e, c, UPROXY_REFUSED_ALL_FAILED, err);
        return;
    }
    c->su->cur = next;
    setup_connect(e, c);
}

/* Transparent mode: bind `s` to the client's address when the decision says so.
 * False when the bind was refused (then `s` must be replaced by a plain socket). */
static bool setup_transparent(struct uproxy_engine *e, struct conn *c, struct ep_entry *t, int s)
{
    struct epset *eps = c->su->eps;
    c->tp = false;
    if (!(eps->transparent & UPROXY_TP_ON) || c->su->client.ss_family != t->sa.ss_family)
        return true;
    unsigned char client[16], endpoint[16];
    int cport, eport;
    addr_out(&c->su->client, client, &cport);
    addr_out(&t->sa, endpoint, &eport);
    int v6 = t->sa.ss_family == AF_INET6;
    pthread_mutex_lock(&e->lock); /* only the pointer: old links are freed on this thread */
    struct uproxy_links *links = e->links;
    pthread_mutex_unlock(&e->lock);
    if (links && t->here && uproxy_links_dev_of(links, v6 ? 6 : 4, endpoint) < 0) {
        int64_t now = now_ms();
        /* (the sets are shared by a group's engines: a race reports it twice, harmlessly) */
        if (now - __atomic_load_n(&t->link_reported, __ATOMIC_RELAXED) >= 1000) {
            /* the links may predate its interface */
            __atomic_store_n(&t->link_reported, now, __ATOMIC_RELAXED);
            struct uproxy_event ev;
            ev_for(c, UPROXY_EV_NO_LINK, &ev);
            ev_push(e, &ev);
        }
    }
    if (!links || !uproxy_transparent_source(links, v6 ? 6 : 4, client, endpoint,
                                             !!(eps->transparent & UPROXY_TP_EXTERNAL),
                                             !!(eps->transparent & UPROXY_TP_EXTERNAL_LOCAL),
                                             t->here))
        return true;
    int one = 1;
    struct sockaddr_storage src = c->su->client;
    socklen_t len;
    if (v6) {
        ((struct sockaddr_in6 *)&src)->sin6_port = 0;
        len = sizeof(struct sockaddr_in6);
        if (setsockopt(s, IPPROTO_IPV6, IPV6_TRANSPARENT, &one, sizeof one) < 0)
            return false;
    } else {
        ((struct sockaddr_in *)&src)->sin_port = 0;
        len = sizeof(struct sockaddr_in);
        if (setsockopt(s, SOL_IP, IP_TRANSPARENT, &one, sizeof one) < 0)
            return false;
    }
    /* The port is left to connect (a free one for the whole 4-tuple). */
    if (setsockopt(s, SOL_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one) < 0)
        return false;
    c->tp = bind(s, (struct sockaddr *)&src, len) == 0;
    return c->tp;
}

static void setup_connect(struct uproxy_engine *e, struct conn *c)
{
    struct ep_entry *t = &c->su->eps->ent[c->su->cur];
    int s = socket(t->sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s >= 0 && !setup_transparent(e, c, t, s)) {
        /* Refused (no capability, address in use): from the node, and it still works. */
        close(s);
        s = socket(t->sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    }
    if (s < 0) {
        int err = errno;
        if (fd_errno(err)) {
            int64_t now = now_ms();
            if (!c->su->fd_deadline)
                c->su->fd_deadline = now + e->fd_wait_ms;
            if (now < c->su->fd_deadline) {
                listener_fd_pause(e, c->su->listener, err);
                tq_push(e, c, UPROXY_SETUP_MAX_ATTEMPTS, now + e->fd_retry_ms);
                return;
            }
        }
        setup_refuse(e, c, UPROXY_REFUSED_NO_SOCKET, err);
        return;
    }
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* The client has spoken already (the usual case: its request came right after its
     * handshake): the handshake's last ACK to the endpoint can wait and leave with
     * those bytes, one segment instead of two, and the endpoint's accept finds them
     * there. TCP_DEFER_ACCEPT on a connecting socket does that (the kernel sends the
     * ACK alone after 200 ms at most). Never for a client that has not spoken: a
     * server-first protocol's greeting must not wait for that ACK. */
    int inq = 0;
    if (ioctl(c->fd[0], SIOCINQ, &inq) == 0 && inq > 0
        && setsockopt(s, IPPROTO_TCP, TCP_DEFER_ACCEPT, &one, sizeof one) == 0)
        stat_add(&e->stats.acks_with_data, 1);
    if (c->su->cc[0]) /* failing leaves the default: still a working connection */
        setsockopt(s, IPPROTO_TCP, TCP_CONGESTION, c->su->cc, (socklen_t)strlen(c->su->cc));
    c->fd[1] = s;
    if (connect(s, (struct sockaddr *)&t->sa, t->len) == 0) {
        setup_connected(e, c);
        return;
    }
    int err = errno;
    if (err == EINPROGRESS) {
        /* The relay's own registration, made now: conn_start need not add it again. */
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                                 .data.u64 = tag_conn(c, UPROXY_SIDE_BACKEND)};
        if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, s, &ev) == 0) {
            c->registered[1] = true;
            tq_push(e, c, c->su->attempt, now_ms() + e->timeout_ms[c->su->attempt]);
            return;
        }
        err = errno;
    }
    close(s);
    c->fd[1] = -1;
    setup_failed(e, c, err);
}

static void setup_drop_backend(struct uproxy_engine *e, struct conn *c)
{
    if (c->registered[1])
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, c->fd[1], NULL);
    c->registered[1] = false;
    close(c->fd[1]);
    c->fd[1] = -1;
}

/* An event on a connecting backend socket. */
static void setup_event(struct uproxy_engine *e, struct conn *c, uint32_t events)
{
    if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
        return;
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd[1], SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err == 0 && !(events & (EPOLLERR | EPOLLHUP))) {
        /* This event is the backend's edge: what it says about data and a FIN that
         * arrived with the connect must reach the relay (no other edge will come). */
        c->hup[UPROXY_SIDE_BACKEND] = (events & EPOLLRDHUP) != 0;
        setup_connected(e, c);
        return;
    }
    if (err == 0)
        err = ECONNREFUSED;
    tq_remove(e, c);
    setup_drop_backend(e, c);
    setup_failed(e, c, err);
}

static void setup_start(struct uproxy_engine *e, struct listener *l, struct epset *eps, int fd,
                        const struct sockaddr_storage *client)
{
    struct conn *c = calloc(1, sizeof *c);
    struct setup *su = c ? calloc(1, sizeof *su) : NULL;
    if (!su) {
        free(c);
        reset_close(fd);
        return;
    }
    c->su = su;
    c->owner = e;
    /* unique in the group: Python keys connections by token */
    c->pub.token = UPROXY_SETUP_TOKEN
                   | (++e->setup_tokens * UPROXY_ENGINE_THREADS_MAX + (uint64_t)e->member);
    c->fd[0] = fd;
    c->fd[1] = -1;
    c->nonblocking = true;
    c->su->listener = l->id;
    c->su->queue = -1;
    c->su->cur = -1;
    c->su->client = *client;
    memcpy(c->su->cc, l->cc, sizeof l->cc);
    c->su->eps = eps;
    eps_ref(eps);
    stat_add(&e->stats.setups_live, 1);
    if (!eps || !eps->has_service) {
        setup_refuse(e, c, UPROXY_REFUSED_NO_SERVICE, 0);
        return;
    }
    int first = setup_choose(e, c, now_ms());
    if (first < 0) {
        setup_refuse(e, c, UPROXY_REFUSED_NO_ENDPOINTS, 0);
        return;
    }
    c->su->cur = first;
    setup_connect(e, c);
}

#define ACCEPT_MAX 64

static void listener_event(struct uproxy_engine *e, struct listener *l)
{
    /* Handshake with pause/remove: they clear l->active, then wait while
     * e->accepting is l; we publish e->accepting, then check l->active. */
    __atomic_store_n(&e->accepting, l, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&l->active, __ATOMIC_SEQ_CST))
        goto out;
    pthread_mutex_lock(&e->lock);
    struct epset *eps = l->eps;
    eps_ref(eps);
    pthread_mutex_unlock(&e->lock);
    for (int i = 0; i < ACCEPT_MAX; i++) {
        if (i && !__atomic_load_n(&l->active, __ATOMIC_SEQ_CST))
            break;
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        int fd = accept4(l->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            int err = errno;
            if (err == EINTR || err == ECONNABORTED || err == EPROTO)
                continue;
            if (fd_errno(err))
                listener_fd_pause(e, l->id, err);
            break; /* EAGAIN, or an error the next wake-up will see again */
        }
        setup_start(e, l, eps, fd, &ss);
    }
    eps_unref(eps);
out:
    __atomic_store_n(&e->accepting, NULL, __ATOMIC_SEQ_CST);
}

/* Timers due by now: attempt timeouts, fd waits, paused listeners. */
static void run_timers(struct uproxy_engine *e)
{
    int64_t now = now_ms();
    for (int q = 0; q <= UPROXY_SETUP_MAX_ATTEMPTS; q++) {
        struct conn *c;
        while ((c = e->tq[q].head) && c->su->deadline <= now) {
            tq_remove(e, c);
            if (q == UPROXY_SETUP_MAX_ATTEMPTS) {
                setup_connect(e, c); /* the fd wait is over: try the socket again */
            } else {
                setup_drop_backend(e, c);
                setup_failed(e, c, ETIMEDOUT);
            }
        }
    }
    struct listener *l;
    while ((l = e->pause_head) && l->resume_at <= now) {
        e->pause_head = l->pause_next;
        if (!e->pause_head)
            e->pause_tail = NULL;
        l->in_pause_list = false;
        pthread_mutex_lock(&e->lock);
        l->fd_paused = false;
        listener_update(e, l);
        pthread_mutex_unlock(&e->lock);
    }
}

/* epoll_wait's timeout: until the nearest deadline (-1: none). */
static int next_timeout(struct uproxy_engine *e)
{
    int64_t best = INT64_MAX;
    for (int q = 0; q <= UPROXY_SETUP_MAX_ATTEMPTS; q++)
        if (e->tq[q].head && e->tq[q].head->su->deadline < best)
            best = e->tq[q].head->su->deadline;
    if (e->pause_head && e->pause_head->resume_at < best)
        best = e->pause_head->resume_at;
    if (e->notify_at && e->notify_at < best)
        best = e->notify_at;
    if (best == INT64_MAX)
        return -1;
    int64_t wait = best - now_ms();
    return wait <= 0 ? 0 : wait > 60000 ? 60000 : (int)wait;
}

/* Removed listeners, freed where no event of a batch can still point to them. */
static void free_dead_listeners(struct uproxy_engine *e)
{
    pthread_mutex_lock(&e->lock);
    struct listener *l = e->dead;
    e->dead = NULL;
    struct old_links *old = e->old_links;
    e->old_links = NULL;
    pthread_mutex_unlock(&e->lock);
    while (old) {
        struct old_links *next = old->next;
        uproxy_links_free(old->links);
        free(old);
        old = next;
    }
    while (l) {
        struct listener *next = l->dead_next;
        if (l->in_pause_list) { /* unlink (rare: removed while paused for fds) */
            struct listener **pp = &e->pause_head, *prev = NULL;
            while (*pp && *pp != l) {
                prev = *pp;
                pp = &(*pp)->pause_next;
            }
            if (*pp) {
                *pp = l->pause_next;
                if (e->pause_tail == l)
                    e->pause_tail = prev;
            }
        }
        eps_unref(l->eps);
        free(l);
        l = next;
    }
}

static void setup_abort_all(struct uproxy_engine *e)
{
    for (int q = 0; q <= UPROXY_SETUP_MAX_ATTEMPTS; q++)
        while (e->tq[q].head)
            setup_refuse(e, e->tq[q].head, UPROXY_REFUSED_ABORTED, 0);
}

/* Run queued commands; returns true when the engine is stopping. */
static bool run_commands(struct uproxy_engine *e)
{
    pthread_mutex_lock(&e->lock);
    struct conn *list = e->cmd_head;
    e->cmd_head = e->cmd_tail = NULL;
    bool stopping = e->stopping;
    pthread_mutex_unlock(&e->lock);

    while (list) {
        pthread_mutex_lock(&e->lock);
        struct conn *c = list;
        list = c->cmd_next;
        unsigned cmds = c->cmds;
        c->cmds = 0;
        c->cmd_queued = false;
        c->cmd_next = NULL;
        pthread_mutex_unlock(&e->lock);

        if (cmds & CMD_ADD)
            conn_start(e, c);
        if (cmds & CMD_ABORT)
            conn_finish(e, c, UPROXY_DONE_ABORTED, -1, 0);
        if (cmds & CMD_DETACH)
            conn_detach(e, c);
        if (cmds & CMD_RELEASE) {
            c->released = true;
            if (c->closed)
                conn_free(e, c);
        }
    }
    return stopping;
}

/* Wake Python for what the engine queued (set-up events, completions): at once after a
 * quiet spell, but under load at most once every UPROXY_NOTIFY_MS (or when
 * UPROXY_NOTIFY_BATCH records wait), not once per connection. The records are
 * bookkeeping (table, metrics); connections never wait for Python. Engine thread, at
 * the end of each round. */
static void notify_python(struct uproxy_engine *e)
{
    if (!e->ev_pending)
        return;
    int64_t now = now_ms();
    if (now >= e->notified + UPROXY_NOTIFY_MS || e->ev_pending >= UPROXY_NOTIFY_BATCH) {
        e->ev_pending = 0;
        e->notify_at = 0;
        e->notified = now;
        wake(e->donefd);
    } else {
        e->notify_at = e->notified + UPROXY_NOTIFY_MS;
    }
}

static void *engine_main(void *arg)
{
    struct uproxy_engine *e = arg;
    struct epoll_event evs[MAX_EVENTS];
    bool stopping = false;
    while (!stopping) {
        int n = epoll_wait(e->epfd, evs, MAX_EVENTS, next_timeout(e));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break; /* cannot happen with a valid epfd; stop rather than spin */
        }
        bool woken = false, accepted = false;
        for (int i = 0; i < n; i++) {
            uint64_t tag = evs[i].data.u64;
            if (tag == 0)
                woken = true;
            else if (tag & TAG_LISTENER) {
                listener_event(e, (struct listener *)(uintptr_t)(tag & ~(uint64_t)TAG_MASK));
                accepted = true;
            } else {
                conn_event(e, (struct conn *)(uintptr_t)(tag & ~(uint64_t)TAG_MASK),
                           (int)(tag & 1), evs[i].events);
            }
        }
        run_timers(e);
        if (accepted) /* expired pins go at the pace new ones come (twice a batch's worth) */
            uproxy_affinity_sweep_some(e->aff, now_ms(), 2 * ACCEPT_MAX);
        /* Commands run after the batch, so a release never frees a conn that a
         * later event of the same batch still points to. */
        if (woken) {
            drain_eventfd(e->wakefd);
            stopping = run_commands(e);
            free_dead_listeners(e);
        }
        tw_flush(e);
        notify_python(e);
    }
    pthread_mutex_lock(&e->lock);
    e->stopping = true; /* also when epoll_wait failed: refuse new work from now on */
    pthread_mutex_unlock(&e->lock);
    run_commands(e);
    setup_abort_all(e);
    for (struct conn *c = e->all; c; c = c->next)
        conn_finish(e, c, UPROXY_DONE_ABORTED, -1, 0);
    tw_flush(e);
    pthread_mutex_lock(&e->lock); /* no accepting from now on */
    for (int i = 0; i < e->nlisteners; i++) {
        struct listener *l = e->listeners[i];
        if (l) {
            l->removed = true;
            listener_update(e, l);
        }
    }
    pthread_mutex_unlock(&e->lock);
    __atomic_store_n(&e->stopped, 1, __ATOMIC_RELEASE);
    wake(e->donefd);
    return NULL;
}

/* ---- API (event loop thread) -------------------------------------------- */

static void enqueue(struct uproxy_engine *e, struct conn *c, unsigned cmd)
{
    /* Caller holds e->lock. */
    c->cmds |= cmd;
    if (!c->cmd_queued) {
        c->cmd_queued = true;
        c->cmd_next = NULL;
        if (e->cmd_tail)
            e->cmd_tail->cmd_next = c;
        else
            e->cmd_head = c;
        e->cmd_tail = c;
    }
}

/* One engine and its thread; `leader`: a member of its group (shares its eventfd and pins). */
static struct uproxy_engine *engine_create(int max_pipes, int want_pipe_size, int keep_free,
                                           struct uproxy_engine *leader, int member)
{
    struct uproxy_engine *e = calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->epfd = e->wakefd = e->donefd = e->diagfd = -1;
    e->leader = leader;
    e->member = member;
    e->max_pipes = max_pipes < 0 ? 0 : max_pipes;
    e->keep_free = keep_free < 0 ? 0 : keep_free;
    e->scratch = malloc(SCRATCH_SIZE);
    e->aff = leader ? leader->aff : uproxy_affinity_new();
    if (!e->scratch || !e->aff)
        goto fail;
    if (getrandom(&e->rng, sizeof e->rng, GRND_NONBLOCK) != sizeof e->rng)
        e->rng = (uint64_t)now_ms() * 0x9E3779B97F4A7C15ULL;
    e->rng |= 1;
    static const int64_t timeouts[] = {250, 500, 1000, 2000};
    e->ntimeouts = 4;
    memcpy(e->timeout_ms, timeouts, sizeof timeouts);
    e->avoid_ms = 5000;
    e->fd_retry_ms = 50;
    e->fd_wait_ms = 2000;
    e->fd_pause_ms = 200;
    for (int q = 0; q <= UPROXY_SETUP_MAX_ATTEMPTS; q++)
        e->tq[q].head = e->tq[q].tail = NULL;
    e->pipe_size = probe_pipe_size(want_pipe_size < UPROXY_PIPE_SIZE_MIN ? UPROXY_PIPE_SIZE_MIN
                                                                         : want_pipe_size);
    if (e->pipe_size <= 0)
        e->max_pipes = 0;
    e->stats.pipes_max = (uint64_t)e->max_pipes;
    e->stats.pipe_size = e->pipe_size > 0 ? (uint64_t)e->pipe_size : 0;
    if (pthread_mutex_init(&e->lock, NULL) != 0)
        goto fail;
    e->lock_ready = true;
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    e->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    e->donefd = leader ? leader->donefd : eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e->epfd < 0 || e->wakefd < 0 || e->donefd < 0)
        goto fail;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0};
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->wakefd, &ev) < 0)
        goto fail;

    /* The thread must not take the process's asynchronous signals (Python
     * handles them on the main thread); SIGPIPE stays as the process has it. */
    sigset_t all, old;
    sigfillset(&all);
    sigdelset(&all, SIGPIPE);
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGFPE);
    sigdelset(&all, SIGILL);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&e->thread, NULL, engine_main, e);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        errno = rc;
        goto fail;
    }
    e->thread_started = true;
    return e;

fail: {
    int err = errno;
    uproxy_engine_free(e);
    errno = err;
    return NULL;
}
}

struct uproxy_engine *uproxy_engine_new(int max_pipes, int want_pipe_size, int keep_free)
{
    return engine_create(max_pipes, want_pipe_size, keep_free, NULL, 0);
}

struct uproxy_engine *uproxy_engine_new_threads(int threads, int max_pipes, int want_pipe_size,
                                                int keep_free)
{
    if (threads < 1 || threads > UPROXY_ENGINE_THREADS_MAX) {
        errno = EINVAL;
        return NULL;
    }
    /* The pipe budget is the group's: split between the engines. */
    int share = max_pipes < 0 ? 0 : max_pipes / threads;
    if (max_pipes > 0 && share < 1)
        share = 1;
    struct uproxy_engine *e = engine_create(threads > 1 ? share : max_pipes, want_pipe_size,
                                            keep_free, NULL, 0);
    if (!e || threads == 1)
        return e;
    e->group = calloc((size_t)threads, sizeof *e->group);
    if (!e->group) {
        uproxy_engine_free(e);
        errno = ENOMEM;
        return NULL;
    }
    e->group[0] = e;
    e->ngroup = 1;
    for (int i = 1; i < threads; i++) {
        struct uproxy_engine *m = engine_create(share, want_pipe_size, keep_free, e, i);
        if (!m) {
            int err = errno;
            uproxy_engine_free(e);
            errno = err;
            return NULL;
        }
        e->group[e->ngroup++] = m;
    }
    return e;
}

int uproxy_engine_threads(struct uproxy_engine *e) { return group_size(e); }

/* struct uproxy_engine_stats is uint64_t fields only: read (and summed) as an array. */
#define STATS_WORDS (sizeof(struct uproxy_engine_stats) / sizeof(uint64_t))
_Static_assert(sizeof(struct uproxy_engine_stats) == STATS_WORDS * sizeof(uint64_t),
               "uproxy_engine_stats: uint64_t fields only");

static void stats_one(struct uproxy_engine *m, struct uproxy_engine_stats *out)
{
    const uint64_t *from = (const uint64_t *)&m->stats;
    uint64_t *to = (uint64_t *)out;
    for (size_t k = 0; k < STATS_WORDS; k++)
        to[k] = stat_get(&from[k]);
}

void uproxy_engine_thread_stats(struct uproxy_engine *e, int i, struct uproxy_engine_stats *out)
{
    memset(out, 0, sizeof *out);
    if (i >= 0 && i < group_size(e))
        stats_one(group_at(e, i), out);
}

int uproxy_engine_eventfd(struct uproxy_engine *e) { return e->donefd; }

/* Queue a prepared connection for the engine thread (CMD_ADD); from then on it owns it.
 * NULL with errno ESHUTDOWN (and `c` freed, its copy buffers too) after stop. */
static struct uproxy_conn *conn_add(struct uproxy_engine *e, struct conn *c, int client_fd,
                                    int backend_fd, uint64_t token)
{
    e = group_at(e, (int)(e->next_add++ % (unsigned)group_size(e))); /* (a takeover's many) */
    c->owner = e;
    c->pub.token = token;
    c->fd[0] = client_fd;
    c->fd[1] = backend_fd;
    c->foreign = true;
    pthread_mutex_lock(&e->lock);
    if (e->stopping) {
        pthread_mutex_unlock(&e->lock);
        free(c->dir[0].buf);
        free(c->dir[1].buf);
        free(c);
        errno = ESHUTDOWN;
        return NULL;
    }
    enqueue(e, c, CMD_ADD);
    pthread_mutex_unlock(&e->lock);
    wake(e->wakefd);
    return &c->pub;
}

struct uproxy_conn *uproxy_engine_add(struct uproxy_engine *e, int client_fd, int backend_fd,
                                      uint64_t token)
{
    struct conn *c = calloc(1, sizeof *c);
    if (!c) {
        errno = ENOMEM;
        return NULL;
    }
    return conn_add(e, c, client_fd, backend_fd, token);
}

/* A direction's bytes already read: a copy buffer the pump drains before reading src. */
static bool dir_preload(struct direction *d, const char *bytes, size_t len)
{
    if (!len)
        return true;
    if (len > UINT32_MAX)
        return false;
    d->buf = malloc(len);
    if (!d->buf)
        return false;
    memcpy(d->buf, bytes, len);
    d->buf_off = 0;
    d->buf_len = (uint32_t)len;
    return true;
}

struct uproxy_conn *uproxy_engine_add_state(struct uproxy_engine *e, int client_fd,
                                            int backend_fd, uint64_t token, uint64_t up,
                                            uint64_t down, const char *pending_up,
                                            size_t pending_up_len, const char *pending_down,
                                            size_t pending_down_len, int eof_up, int eof_down)
{
    struct conn *c = calloc(1, sizeof *c);
    if (!c || !dir_preload(&c->dir[0], pending_up, pending_up_len)
        || !dir_preload(&c->dir[1], pending_down, pending_down_len)) {
        if (c) {
            free(c->dir[0].buf);
            free(c);
        }
        errno = ENOMEM;
        return NULL;
    }
    /* Written before the conn is published (the command list's lock orders them). */
    c->pub.bytes_up = up;
    c->pub.bytes_down = down;
    c->dir[0].eof = eof_up != 0;
    c->dir[1].eof = eof_down != 0;
    return conn_add(e, c, client_fd, backend_fd, token);
}

void uproxy_engine_abort(struct uproxy_engine *e, struct uproxy_conn *pc)
{
    struct conn *c = (struct conn *)pc;
    e = c->owner; /* (in a group: the engine relaying it) */
    pthread_mutex_lock(&e->lock);
    bool queued = !e->stopping;
    if (queued)
        enqueue(e, c, CMD_ABORT);
    pthread_mutex_unlock(&e->lock);
    if (queued)
        wake(e->wakefd);
}

void uproxy_engine_detach(struct uproxy_engine *e, struct uproxy_conn *pc)
{
    struct conn *c = (struct conn *)pc;
    e = c->owner; /* (in a group: the engine relaying it) */
    pthread_mutex_lock(&e->lock);
    bool queued = !e->stopping;
    if (queued)
        enqueue(e, c, CMD_DETACH);
    pthread_mutex_unlock(&e->lock);
    if (queued)
        wake(e->wakefd);
}

void uproxy_engine_release(struct uproxy_engine *e, struct uproxy_conn *pc)
{
    struct conn *c = (struct conn *)pc;
    e = c->owner; /* (in a group: the engine relaying it) */
    pthread_mutex_lock(&e->lock);
    /* After stop the conn is freed by uproxy_engine_free. No wake: freeing can
     * wait for the next command. */
    if (!e->stopping)
        enqueue(e, c, CMD_RELEASE);
    pthread_mutex_unlock(&e->lock);
}

static int poll_done(struct uproxy_engine *e, struct uproxy_done *out, int max, bool release);

int uproxy_engine_poll(struct uproxy_engine *e, struct uproxy_done *out, int max)
{
    return poll_done(e, out, max, false);
}

int uproxy_engine_poll_release(struct uproxy_engine *e, struct uproxy_done *out, int max)
{
    return poll_done(e, out, max, true);
}

static int poll_one(struct uproxy_engine *e, struct uproxy_done *out, int max, bool release,
                    bool *more);

static int poll_done(struct uproxy_engine *e, struct uproxy_done *out, int max, bool release)
{
    drain_eventfd(e->donefd);
    int n = 0;
    bool more = false;
    for (int i = 0; i < group_size(e); i++)
        n += poll_one(group_at(e, i), out + n, max - n, release, &more);
    if (more)
        wake(e->donefd);
    return n;
}

/* One engine's completions (the group's eventfd is the caller's). */
static int poll_one(struct uproxy_engine *e, struct uproxy_done *out, int max, bool release,
                    bool *more)
{
    int n = 0;
    pthread_mutex_lock(&e->lock);
    while (n < max && e->done_head) {
        struct conn *c = e->done_head;
        e->done_head = c->done_next;
        if (!e->done_head)
            e->done_tail = NULL;
        /* The engine thread wrote these before queueing c (under this lock) and
         * touches none of them again: the completion is built here. */
        struct uproxy_done *d = &out[n++];
        *d = (struct uproxy_done){
            .conn = &c->pub,
            .token = c->pub.token,
            .bytes_up = stat_get(&c->pub.bytes_up),
            .bytes_down = stat_get(&c->pub.bytes_down),
            .reason = c->reason,
            .side = c->side,
            .err = c->err,
            .client_fd = -1,
            .backend_fd = -1,
        };
        if (c->detached) {
            d->client_fd = c->fd[0];
            d->backend_fd = c->fd[1];
            d->pending_up = c->held[0];
            d->pending_up_len = c->held_len[0];
            d->pending_down = c->held[1];
            d->pending_down_len = c->held_len[1];
            d->eof_up = c->dir[0].eof;
            d->eof_down = c->dir[1].eof;
        } else if (release && !e->stopping) {
            /* as uproxy_engine_release, under the lock already held: no call per record */
            enqueue(e, c, CMD_RELEASE);
        }
    }
    *more = *more || e->done_head != NULL;
    pthread_mutex_unlock(&e->lock);
    return n;
}

static void stop_one(struct uproxy_engine *e)
{
    pthread_mutex_lock(&e->lock);
    bool first = !e->stopping;
    e->stopping = true;
    pthread_mutex_unlock(&e->lock);
    if (first && e->wakefd >= 0)
        wake(e->wakefd);
}

void uproxy_engine_stop(struct uproxy_engine *e)
{
    for (int i = 0; i < group_size(e); i++)
        stop_one(group_at(e, i));
}

int uproxy_engine_stopped(struct uproxy_engine *e)
{
    for (int i = 0; i < group_size(e); i++)
        if (!__atomic_load_n(&group_at(e, i)->stopped, __ATOMIC_ACQUIRE))
            return 0;
    return 1;
}

void uproxy_engine_stats(struct uproxy_engine *e, struct uproxy_engine_stats *out)
{
    stats_one(e, out);
    for (int i = 1; i < group_size(e); i++) { /* the group's sums */
        struct uproxy_engine_stats m;
        stats_one(group_at(e, i), &m);
        const uint64_t *add = (const uint64_t *)&m;
        uint64_t *sum = (uint64_t *)out;
        for (size_t k = 0; k < STATS_WORDS; k++)
            sum[k] += add[k];
    }
    out->pipe_size = stat_get(&e->stats.pipe_size); /* (not a sum: the group's one size) */
}

/* ---- set-up API (event loop thread) -------------------------------------- */

static int64_t secs_ms(double s) { return s <= 0 ? 0 : (int64_t)(s * 1000.0 + 0.5); }

int uproxy_engine_setup_config(struct uproxy_engine *e, const double *timeouts, int n,
                               double avoid_seconds, double fd_retry, double fd_wait,
                               double fd_pause)
{
    if (n < 1 || n > UPROXY_SETUP_MAX_ATTEMPTS)
        return -EINVAL;
    for (int g = 0; g < group_size(e); g++) {
        struct uproxy_engine *m = group_at(e, g);
        pthread_mutex_lock(&m->lock);
        for (int i = 0; i < n; i++)
            m->timeout_ms[i] = secs_ms(timeouts[i]);
        m->ntimeouts = n;
        m->avoid_ms = secs_ms(avoid_seconds);
        m->fd_retry_ms = secs_ms(fd_retry);
        m->fd_wait_ms = secs_ms(fd_wait);
        m->fd_pause_ms = secs_ms(fd_pause);
        pthread_mutex_unlock(&m->lock);
    }
    return 0;
}

/* The congestion control set on listening socket `fd` (TCP_CONGESTION), into
 * `out`, when it differs from what a new socket of its family gets; else "".
 * A proxy's backend socket is a second sender in series with the client's: with
 * a pacing one (BBR without the fq qdisc paces with a timer per socket) that
 * costs the relay CPU and bulk throughput (bench/ANALYSIS.md, bulk), so the
 * caller can choose another for both legs by setting it on the listener. */
static void listener_cc(struct uproxy_engine *e, int fd, char *out)
{
    out[0] = 0;
    char mine[CC_NAME_MAX] = {0};
    socklen_t len = sizeof mine - 1;
    if (getsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, mine, &len) < 0 || !mine[0])
        return;
    pthread_mutex_lock(&e->lock);
    if (!e->cc_default[0]) { /* once: what a new socket gets in this netns */
        int probe = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        len = sizeof e->cc_default - 1;
        if (probe < 0 || getsockopt(probe, IPPROTO_TCP, TCP_CONGESTION, e->cc_default, &len) < 0)
            e->cc_default[0] = 0;
        if (probe >= 0)
            close(probe);
    }
    if (e->cc_default[0] && strncmp(mine, e->cc_default, sizeof mine) != 0)
        memcpy(out, mine, sizeof mine);
    pthread_mutex_unlock(&e->lock);
}

/* A listener of one engine on `fd`: with id `id` (-1: the next free one) and the
 * congestion control `cc` for its backend sockets. Its id or -errno. */
static int listener_add_one(struct uproxy_engine *e, int fd, int id, const char *cc)
{
    struct listener *l = calloc(1, sizeof *l);
    if (!l)
        return -ENOMEM;
    l->fd = fd;
    memcpy(l->cc, cc, sizeof l->cc);
    pthread_mutex_lock(&e->lock);
    if (e->stopping) {
        pthread_mutex_unlock(&e->lock);
        free(l);
        return -ESHUTDOWN;
    }
    int want = id < 0 ? e->nlisteners : id;
    if (want >= e->cap_listeners) {
        int cap = e->cap_listeners ? e->cap_listeners * 2 : 64;
        if (cap <= want)
            cap = want + 64;
        struct listener **ls = realloc(e->listeners, (size_t)cap * sizeof *ls);
        if (!ls) {
            pthread_mutex_unlock(&e->lock);
            free(l);
            return -ENOMEM;
        }
        e->listeners = ls;
        e->cap_listeners = cap;
    }
    for (int i = e->nlisteners; i < want; i++) /* (a member that missed one: a gap) */
        e->listeners[i] = NULL;
    l->id = want;
    e->listeners[want] = l;
    if (want >= e->nlisteners)
        e->nlisteners = want + 1;
    listener_update(e, l); /* (registers it with its first endpoint list) */
    pthread_mutex_unlock(&e->lock);
    return l->id;
}

int uproxy_engine_listener_add(struct uproxy_engine *e, int fd)
{
    /* The engine thread must never block in accept4 (a shared file flag: Python's
     * listening sockets are non-blocking already). */
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -errno;
    if (!(fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -errno;
    char cc[CC_NAME_MAX];
    listener_cc(e, fd, cc);
    int id = listener_add_one(e, fd, -1, cc);
    /* The group's engines all accept on it, under the same id. */
    for (int i = 1; id >= 0 && i < group_size(e); i++) {
        int rc = listener_add_one(group_at(e, i), fd, id, cc);
        if (rc < 0) {
            uproxy_engine_listener_remove(e, id);
            return rc;
        }
    }
    return id;
}

int uproxy_engine_listener_set(struct uproxy_engine *e, int id, int has_service, int family,
                               int n, const unsigned char *addrs, const int *ports,
                               const int *indexes, const double *avoid_until,
                               const int *here, int transparent, int affinity_group,
                               double affinity_timeout)
{
    if (n < 0 || (family != 4 && family != 6) || (affinity_timeout > 0 && affinity_group < 0))
        return -EINVAL;
    struct epset *s = calloc(1, sizeof *s + (size_t)n * sizeof s->ent[0]);
    if (!s)
        return -ENOMEM;
    s->refs = 1;
    s->has_service = has_service;
    s->transparent = transparent;
    s->n = n;
    if (affinity_timeout > 0) {
        s->aff_group = (uint32_t)affinity_group;
        s->aff_timeout_ms = secs_ms(affinity_timeout);
    }
    /* CLOCK_MONOTONIC seconds (Python's time.monotonic()) to our milliseconds. */
    for (int i = 0; i < n; i++) {
        struct ep_entry *t = &s->ent[i];
        if (family == 6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&t->sa;
            a->sin6_family = AF_INET6;
            memcpy(&a->sin6_addr, addrs + 16 * i, 16);
            a->sin6_port = htons((uint16_t)ports[i]);
            t->len = sizeof *a;
        } else {
            struct sockaddr_in *a = (struct sockaddr_in *)&t->sa;
            a->sin_family = AF_INET;
            memcpy(&a->sin_addr, addrs + 4 * i, 4);
            a->sin_port = htons((uint16_t)ports[i]);
            t->len = sizeof *a;
        }
        t->index = indexes[i];
        t->here = here && here[i];
        t->avoid_until = avoid_until[i] > 0 ? (int64_t)(avoid_until[i] * 1000.0) : 0;
    }
    /* One set for the group (its engines' failure marks are shared too). */
    bool taken = false;
    for (int g = 0; g < group_size(e); g++) {
        struct uproxy_engine *m = group_at(e, g);
        pthread_mutex_lock(&m->lock);
        struct listener *l = listener_get(m, id);
        struct epset *old = NULL;
        if (l && !l->removed) {
            old = l->eps;
            eps_ref(s);
            l->eps = s;
            listener_update(m, l); /* the first list starts accepting */
            taken = taken || g == 0;
        }
        pthread_mutex_unlock(&m->lock);
        eps_unref(old);
    }
    eps_unref(s); /* (ours: freed here when no listener took it) */
    return taken ? 0 : -ENOENT;
}

int uproxy_engine_listeners_add(struct uproxy_engine *e, int n, const int *fds,
                                const int *has_service, const int *families,
                                const int *counts, const unsigned char *addrs,
                                const int *ports, const int *indexes,
                                const double *avoid_until, const int *here,
                                const int *transparent, const int *affinity_groups,
                                const double *affinity_timeouts, int *ids, int *errs)
{
    if (n < 0)
        return -EINVAL;
    for (int i = 0; i < n; i++)
        if (counts[i] < 0 || (families[i] != 4 && families[i] != 6))
            return -EINVAL;
    size_t ep = 0, off = 0; /* the first endpoint of listener i in the flat arrays */
    for (int i = 0; i < n; i++) {
        int c = counts[i];
        errs[i] = 0;
        ids[i] = uproxy_engine_listener_add(e, fds[i]);
        if (ids[i] >= 0)
            errs[i] = uproxy_engine_listener_set(
                e, ids[i], has_service[i], families[i], c, addrs + off, ports + ep,
                indexes + ep, avoid_until + ep, here ? here + ep : NULL, transparent[i],
                affinity_groups[i], affinity_timeouts[i]);
        ep += (size_t)c;
        off += (size_t)c * (families[i] == 6 ? 16 : 4);
    }
    return n;
}

static void set_links_one(struct uproxy_engine *e, struct uproxy_links *links);

void uproxy_engine_set_links(struct uproxy_engine *e, struct uproxy_links *links)
{
    for (int i = 1; i < group_size(e); i++) /* (one links object, one reference each) */
        set_links_one(group_at(e, i), uproxy_links_ref(links));
    set_links_one(e, links);
}

static void set_links_one(struct uproxy_engine *e, struct uproxy_links *links)
{
    struct old_links *node = malloc(sizeof *node);
    pthread_mutex_lock(&e->lock);
    struct uproxy_links *old = e->links;
    e->links = links;
    if (old && node) {
        node->links = old;
        node->next = e->old_links;
        e->old_links = node;
        node = NULL;
    }
    pthread_mutex_unlock(&e->lock);
    if (old && node) { /* no memory for the list: leak one links object rather than race */
        free(node);
        return;
    }
    free(node);
    wake(e->wakefd); /* the old one is freed after the engine's current round */
}

/* Wait until the accept loop is off `l` (it checks l->active at every accept). */
static void listener_quiesce(struct uproxy_engine *e, struct listener *l)
{
    while (__atomic_load_n(&e->accepting, __ATOMIC_SEQ_CST) == l)
        sched_yield();
}

static void listener_pause_one(struct uproxy_engine *e, int id)
{
    pthread_mutex_lock(&e->lock);
    struct listener *l = listener_get(e, id);
    if (l && !l->removed) {
        l->user_paused = true;
        listener_update(e, l);
    }
    pthread_mutex_unlock(&e->lock);
    if (l)
        listener_quiesce(e, l);
}

void uproxy_engine_listener_pause(struct uproxy_engine *e, int id)
{
    for (int i = 0; i < group_size(e); i++)
        listener_pause_one(group_at(e, i), id);
}

static void listener_resume_one(struct uproxy_engine *e, int id)
{
    pthread_mutex_lock(&e->lock);
    struct listener *l = listener_get(e, id);
    if (l && !l->removed && !e->stopping) {
        l->user_paused = false;
        listener_update(e, l);
    }
    pthread_mutex_unlock(&e->lock);
}

void uproxy_engine_listener_resume(struct uproxy_engine *e, int id)
{
    for (int i = 0; i < group_size(e); i++)
        listener_resume_one(group_at(e, i), id);
}

static void listener_remove_one(struct uproxy_engine *e, int id)
{
    pthread_mutex_lock(&e->lock);
    struct listener *l = listener_get(e, id);
    if (l) {
        e->listeners[id] = NULL;
        l->removed = true;
        listener_update(e, l);
        l->dead_next = e->dead;
        e->dead = l;
    }
    pthread_mutex_unlock(&e->lock);
    if (l) {
        listener_quiesce(e, l);
        wake(e->wakefd); /* freed by the engine thread after its batch */
    }
}

void uproxy_engine_listener_remove(struct uproxy_engine *e, int id)
{
    for (int i = 0; i < group_size(e); i++)
        listener_remove_one(group_at(e, i), id);
}

int uproxy_engine_affinity_export(struct uproxy_engine *e, struct uproxy_pin *out, int max)
{
    return uproxy_affinity_export(e->aff, out, max < 0 ? 0 : max, now_ms());
}

int uproxy_engine_affinity_import(struct uproxy_engine *e, const struct uproxy_pin *pins, int n)
{
    return uproxy_affinity_import(e->aff, pins, n, now_ms());
}

int uproxy_engine_affinity_sweep(struct uproxy_engine *e)
{
    return uproxy_affinity_sweep(e->aff, now_ms());
}

int uproxy_engine_affinity_forget(struct uproxy_engine *e, int group)
{
    return group < 0 ? 0 : uproxy_affinity_forget(e->aff, (uint32_t)group);
}

int uproxy_engine_affinity_count(struct uproxy_engine *e) { return uproxy_affinity_count(e->aff); }

static int events_one(struct uproxy_engine *e, struct uproxy_event *out, int max, bool *more);

int uproxy_engine_events(struct uproxy_engine *e, struct uproxy_event *out, int max)
{
    int n = 0;
    bool more = false;
    for (int i = 0; i < group_size(e); i++)
        n += events_one(group_at(e, i), out + n, max - n, &more);
    if (more)
        wake(e->donefd);
    return n;
}

/* One engine's set-up events (the group's eventfd is the caller's). */
static int events_one(struct uproxy_engine *e, struct uproxy_event *out, int max, bool *more)
{
    pthread_mutex_lock(&e->lock);
    int n = e->evq_len < max ? e->evq_len : max;
    if (n > 0) { /* (evq is NULL until the first event: memcpy from NULL is undefined) */
        memcpy(out, e->evq, (size_t)n * sizeof *out);
        memmove(e->evq, e->evq + n, (size_t)(e->evq_len - n) * sizeof *out);
        e->evq_len -= n;
    } else {
        n = 0;
    }
    *more = *more || e->evq_len > 0;
    pthread_mutex_unlock(&e->lock);
    return n;
}

void uproxy_engine_free(struct uproxy_engine *e)
{
    if (!e)
        return;
    if (e->group) { /* the others first: they share this one's eventfd and pins */
        for (int i = 1; i < e->ngroup; i++)
            uproxy_engine_free(e->group[i]);
        free(e->group);
        e->group = NULL;
        e->ngroup = 1;
    }
    if (e->thread_started) {
        stop_one(e);
        pthread_join(e->thread, NULL);
    }
    while (e->all) /* all closed by now; freed whether released or not */
        conn_free(e, e->all);
    if (e->lock_ready)
        free_dead_listeners(e);
    for (int i = 0; i < e->nlisteners; i++) {
        if (e->listeners[i]) {
            eps_unref(e->listeners[i]->eps);
            free(e->listeners[i]);
        }
    }
    free(e->listeners);
    free(e->evq);
    if (e->links)
        uproxy_links_free(e->links);
    while (e->free_pipes) {
        struct pipe_slot *p = e->free_pipes;
        e->free_pipes = p->next;
        close(p->r);
        close(p->w);
        free(p);
    }
    if (e->epfd >= 0)
        close(e->epfd);
    if (e->wakefd >= 0)
        close(e->wakefd);
    if (e->donefd >= 0 && !e->leader)
        close(e->donefd);
    if (e->diagfd >= 0)
        close(e->diagfd);
    free(e->tw_batch);
    if (e->lock_ready)
        pthread_mutex_destroy(&e->lock);
    free(e->scratch);
    if (!e->leader)
        uproxy_affinity_free(e->aff);
    free(e);
}
