/* uproxy native relay: the C side of uproxy._native (cffi, API mode).
 *
 * The part between the "cdef begin" and "cdef end" markers is the cffi cdef:
 * uproxy/_native_build.py reads it at build time (comments and preprocessor
 * lines dropped, except `#define NAME value`, whose value cffi takes from the
 * compiler; array lengths named by a macro become [...]). Keep it to plain
 * declarations cffi can parse; Python reads every constant it needs from here
 * (uproxy._native.lib.NAME) instead of repeating the number.
 *
 * The engine: Python accepts, picks a backend and connects, then hands both
 * fds to the engine (uproxy_engine_add), which owns them from then on. One
 * engine thread (epoll, edge-triggered) moves bytes both ways: bulk with
 * splice(2) through pipes taken from a bounded pool only while data is in
 * flight; small reads (a read that did not fill the 64 KiB scratch buffer),
 * and everything while the pool is empty, with recv/send through the scratch
 * buffer, keeping only what the destination refused. When a connection ends the engine closes both fds and queues a completion; it
 * signals the event loop through an eventfd (uproxy_engine_eventfd), and the
 * loop drains the queue with uproxy_engine_poll. The engine thread never calls
 * into Python; the only shared state is the command list and the completion
 * list (one mutex), the per-connection byte counters (written with relaxed
 * atomic stores, read as plain aligned 64-bit loads) and the pool statistics.
 */
#ifndef UPROXY_NATIVE_H
#define UPROXY_NATIVE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* cdef begin */

/* Move up to `len` bytes from socket `from_fd` to socket `to_fd` through the
 * pipe (pipe_r, pipe_w) with splice(2), so the payload never leaves the kernel.
 * Fills the pipe only when it is empty and drains it fully before returning
 * (waiting with poll(2) if to_fd is non-blocking and full), so it must be
 * called with an empty pipe. A one-shot building block for tests and tools;
 * the engine below does the same without ever blocking. Returns the number of
 * bytes moved, 0 at EOF of from_fd, or -errno. */
ssize_t uproxy_splice_move(int from_fd, int to_fd, int pipe_r, int pipe_w, size_t len);

/* Why a connection ended (uproxy_done.reason). */
#define UPROXY_DONE_CLOSED 0  /* both sides sent EOF and everything was delivered */
#define UPROXY_DONE_RESET 1   /* `side` reset (ECONNRESET/EPIPE); the other side got RST */
#define UPROXY_DONE_ERROR 2   /* `side` failed with errno `err`; both sides got RST */
#define UPROXY_DONE_ABORTED 3 /* uproxy_engine_abort or uproxy_engine_stop; both got RST */
#define UPROXY_DONE_DETACHED 4 /* uproxy_engine_detach: both fds are the caller's again */

#define UPROXY_SIDE_CLIENT 0
#define UPROXY_SIDE_BACKEND 1

/* The smallest pipe the engine settles for: it asks for want_pipe_size and
 * halves it down to this when the kernel refuses. */
#define UPROXY_PIPE_SIZE_MIN (64 * 1024)

struct uproxy_engine;

/* A relayed connection. Only the two counters are public: they are updated by
 * the engine thread with relaxed atomic stores and may be read at any time
 * until the connection is released. */
struct uproxy_conn {
    uint64_t bytes_up;   /* client -> backend, delivered to the backend socket */
    uint64_t bytes_down; /* backend -> client, delivered to the client socket */
    uint64_t token;      /* the caller's id, echoed in the completion */
    /* private fields follow in relay.c */
};

struct uproxy_done {
    struct uproxy_conn *conn;
    uint64_t token;
    uint64_t bytes_up;
    uint64_t bytes_down;
    int reason;
    int side; /* -1 when no side is to blame */
    int err;  /* errno for UPROXY_DONE_RESET / UPROXY_DONE_ERROR, else 0 */
    /* UPROXY_DONE_DETACHED only: the fds, the bytes read but not yet written each
     * way (valid until release), and which side's EOF was read (its peer already
     * got SHUT_WR when no bytes are pending that way). Otherwise the fds are -1
     * and the rest 0. */
    int client_fd;
    int backend_fd;
    const char *pending_up;
    size_t pending_up_len;
    const char *pending_down;
    size_t pending_down_len;
    int eof_up;
    int eof_down;
};

struct uproxy_engine_stats {
    uint64_t conns_live;    /* added and not yet closed */
    uint64_t pipes_in_use;  /* pipes holding (or about to hold) a connection's data */
    uint64_t pipes_total;   /* pipes open (in use + idle in the pool) */
    uint64_t pipes_max;     /* pool bound */
    uint64_t pipe_size;     /* bytes per pipe after probing */
    uint64_t splice_bytes;  /* bytes delivered through pipes */
    uint64_t copy_bytes;    /* bytes delivered through the copy path */
    uint64_t bufs_in_use;   /* copy buffers holding bytes the destination refused so far */
    uint64_t setups_live;   /* accepted by the engine, still connecting to an endpoint */
    uint64_t setups_opened; /* set up by the engine and relayed (ever) */
    uint64_t setups_refused; /* accepted by the engine and reset (ever) */
    uint64_t closes_first;   /* backends that got uproxy's FIN before sending theirs
                              * (ever): each such socket lingers in TIME_WAIT here */
    uint64_t tw_destroyed;   /* of those, transparent ones (bound to the client's
                              * address) whose TIME_WAIT socket the engine destroyed
                              * at close by its exact address (SOCK_DESTROY) */
    uint64_t tw_left;        /* transparent ones it could not (no SOCK_DESTROY, a
                              * socket it cannot name): the caller sweeps those */
    uint64_t fins_with_data; /* SHUT_WRs whose FIN left on the segment of the direction's
                              * last bytes (their sender's FIN had come with them) */
    uint64_t acks_with_data; /* backend connects whose handshake's last ACK waited for
                              * the client's first bytes (already there: TCP_DEFER_ACCEPT) */
};

/* Probe the pipe size (tries `want`, then halves down to 64 KiB, within
 * F_SETPIPE_SZ's limits), start the engine thread. `max_pipes` bounds the pool
 * (0: always copy); at most `keep_free` idle pipes stay open for reuse.
 * NULL with errno set on failure. */
struct uproxy_engine *uproxy_engine_new(int max_pipes, int want_pipe_size, int keep_free);

/* uproxy_engine_new with `threads` engine threads (1 to UPROXY_ENGINE_THREADS_MAX),
 * one handle: every listener is accepted on by all of them (EPOLLEXCLUSIVE: a new
 * connection wakes one), a connection stays on the thread that accepted it (one
 * added with uproxy_engine_add* goes to the next thread in turn), and the calls
 * below apply to the group: one eventfd, the events and completions of all
 * threads, one table of ClientIP pins, one endpoint set per listener (a failed
 * connect avoids the endpoint for every thread), the sums in the stats, the pipe
 * budget `max_pipes` split between them. NULL with errno set on failure. */
struct uproxy_engine *uproxy_engine_new_threads(int threads, int max_pipes, int want_pipe_size,
                                                int keep_free);
#define UPROXY_ENGINE_THREADS_MAX 64
int uproxy_engine_threads(struct uproxy_engine *e);
/* Thread `i`'s own figures (0: the leader; all zero for an i out of range). */
void uproxy_engine_thread_stats(struct uproxy_engine *e, int i, struct uproxy_engine_stats *out);

/* The eventfd that becomes readable when completions are queued. */
int uproxy_engine_eventfd(struct uproxy_engine *e);

/* Hand two connected sockets to the engine. On success the engine owns both
 * fds (it sets O_NONBLOCK and closes them when done). NULL with errno set
 * (ESHUTDOWN after uproxy_engine_stop, ENOMEM): the caller still owns them. */
struct uproxy_conn *uproxy_engine_add(struct uproxy_engine *e, int client_fd, int backend_fd,
                                      uint64_t token);

/* uproxy_engine_add for a connection relayed until now elsewhere (a takeover, or
 * one taken back with uproxy_engine_detach), with its relay state as a
 * UPROXY_DONE_DETACHED completion describes it: the counters start from `up`
 * and `down`; the pending bytes (copied: the caller keeps its buffers) are
 * delivered first, in order, before anything newly read that way; an EOF
 * already read (`eof_up`: the client's) gives its peer SHUT_WR once that
 * way's pending bytes are delivered (again, harmlessly, when none are).
 * NULL with errno set (ESHUTDOWN, ENOMEM): the caller still owns the fds. */
struct uproxy_conn *uproxy_engine_add_state(struct uproxy_engine *e, int client_fd,
                                            int backend_fd, uint64_t token, uint64_t up,
                                            uint64_t down, const char *pending_up,
                                            size_t pending_up_len, const char *pending_down,
                                            size_t pending_down_len, int eof_up, int eof_down);

/* Reset both sides of `c` (no-op when it already ended). Only before release. */
void uproxy_engine_abort(struct uproxy_engine *e, struct uproxy_conn *c);

/* Stop relaying `c` without closing anything (a takeover moves it to another
 * process): its completion, reason UPROXY_DONE_DETACHED, hands back both fds
 * and the bytes the engine held (its pipes are read out). A connection that
 * ends first completes as usual. Only before release. */
void uproxy_engine_detach(struct uproxy_engine *e, struct uproxy_conn *c);

/* The caller is done with `c` (after its completion): the engine frees it. */
void uproxy_engine_release(struct uproxy_engine *e, struct uproxy_conn *c);

/* Copy up to `max` queued completions into `out`; returns how many. */
int uproxy_engine_poll(struct uproxy_engine *e, struct uproxy_done *out, int max);

/* As uproxy_engine_poll, and every completion but UPROXY_DONE_DETACHED is released
 * at once (its `conn` must not be used again); a detached one waits for
 * uproxy_engine_release as usual. */
int uproxy_engine_poll_release(struct uproxy_engine *e, struct uproxy_done *out, int max);

/* Abort every connection and let the thread exit; completions for all of them
 * are queued before uproxy_engine_stopped() turns 1. Idempotent. */
void uproxy_engine_stop(struct uproxy_engine *e);
int uproxy_engine_stopped(struct uproxy_engine *e);

void uproxy_engine_stats(struct uproxy_engine *e, struct uproxy_engine_stats *out);

/* Stop (if needed), join the thread, close every fd, free everything. */
void uproxy_engine_free(struct uproxy_engine *e);

/* ---- connection set-up in the engine (listeners) ---------------------------
 *
 * A listening socket registered with uproxy_engine_listener_add is accepted on
 * by the engine thread (accept4 in batches); for each client it chooses an
 * endpoint among those Python pushed last (uproxy_engine_listener_set):
 * uniformly at random among the ones not avoided (a failed connect avoids an
 * endpoint for `avoid_seconds`), the avoided ones when nothing else is left,
 * never one already tried for this client (with ClientIP affinity, the client's
 * pin first: see uproxy_pin below); connects without blocking, with
 * the per-attempt timeouts of uproxy_engine_setup_config (one attempt per
 * timeout); when every attempt failed, or nothing is usable, the client gets
 * a RST. Out of fds: accept4 failing pauses the listener for `fd_pause`
 * seconds; socket() failing lets the client wait, retrying every `fd_retry`
 * seconds for at most `fd_wait`. A connected pair is relayed as if added
 * with uproxy_engine_add (its token has UPROXY_SETUP_TOKEN set). Python owns
 * the listening socket (the engine never closes it) and hears of what happened
 * through uproxy_engine_events (same eventfd as the completions; drain the
 * events before the completions: an OPENED always comes before its DONE). */
#define UPROXY_EV_OPENED 1         /* relayed: token, conn, endpoint, attempts */
#define UPROXY_EV_CONNECT_FAILED 2 /* one attempt failed: endpoint, err (ETIMEDOUT: timeout) */
#define UPROXY_EV_REFUSED 3        /* the client got a RST: reason, err, attempts */
#define UPROXY_EV_NO_FDS 4         /* out of fds (err): the listener pauses */
#define UPROXY_EV_NO_LINK 5        /* transparent: an endpoint on this node with no on-link
                                    * route (endpoint; at most once a second per endpoint):
                                    * the links may be stale, read them again */

#define UPROXY_REFUSED_NO_SERVICE 0   /* the listener has no service (pushed has_service 0) */
#define UPROXY_REFUSED_NO_ENDPOINTS 1 /* nothing usable for the first attempt */
#define UPROXY_REFUSED_ALL_FAILED 2   /* every attempt failed, or nothing left to try */
#define UPROXY_REFUSED_NO_SOCKET 3    /* no backend socket (err), after waiting for fds */
#define UPROXY_REFUSED_ABORTED 4      /* the engine stopped */

#define UPROXY_SETUP_MAX_ATTEMPTS 8

struct uproxy_links; /* native/transparent.c (declared with its functions below) */

struct uproxy_event {
    int kind;
    int listener;           /* the listener's id */
    uint64_t token;         /* OPENED */
    struct uproxy_conn *conn; /* OPENED: as uproxy_engine_add returns it */
    int endpoint;           /* the pushed index of the endpoint, -1 */
    int attempts;           /* attempts that got a socket and ended (OPENED: + the one that worked) */
    int err;
    int reason;             /* REFUSED */
    int family;             /* AF_INET / AF_INET6 of the addresses below */
    unsigned char client_addr[16];
    int client_port;
    unsigned char endpoint_addr[16];
    int endpoint_port;
};

/* Timeouts (seconds, one per attempt, at most UPROXY_SETUP_MAX_ATTEMPTS),
 * failure avoidance, out-of-fds waits. Call once, before adding listeners.
 * 0, or -EINVAL. */
int uproxy_engine_setup_config(struct uproxy_engine *e, const double *timeouts, int n,
                               double avoid_seconds, double fd_retry, double fd_wait,
                               double fd_pause);

/* Accept on `fd` (a listening TCP socket, the caller's; made non-blocking)
 * from its first uproxy_engine_listener_set on (until then the kernel keeps
 * the backlog). A congestion control set on `fd` (TCP_CONGESTION, before this
 * call) other than the netns default is given to the backend sockets too (the
 * accepted ones inherit it from `fd`); by default nothing is set.
 * Returns its id (>= 0), or -errno. */
int uproxy_engine_listener_add(struct uproxy_engine *e, int fd);

/* Transparent mode for a listener's connections (uproxy_engine_listener_set's
 * `transparent`, bits): on for its family; its traffic is external (NodePort,
 * externalIP, LoadBalancer IP); its service has externalTrafficPolicy Local. */
#define UPROXY_TP_ON 1
#define UPROXY_TP_EXTERNAL 2
#define UPROXY_TP_EXTERNAL_LOCAL 4

/* The endpoints new clients of listener `id` may go to: n addresses of `family`
 * (4 or 16 bytes each in `addrs`), their ports (host order), the indexes
 * events report them by, and until when each is avoided (CLOCK_MONOTONIC
 * seconds, 0: not). has_service 0: the listener serves nothing (refuse).
 * With UPROXY_TP_ON in `transparent`, each backend socket is bound to the
 * client's address (IP_TRANSPARENT, port left to connect) when
 * uproxy_transparent_source says so for the links of uproxy_engine_set_links
 * (`here`: per endpoint, 1 when it is on this node; NULL: none is), and opened
 * plainly when the bind is refused. Connections already connecting keep the
 * list they started with. 0 or -errno. */
int uproxy_engine_listener_set(struct uproxy_engine *e, int id, int has_service, int family,
                               int n, const unsigned char *addrs, const int *ports,
                               const int *indexes, const double *avoid_until,
                               const int *here, int transparent, int affinity_group,
                               double affinity_timeout);

/* uproxy_engine_listener_add then uproxy_engine_listener_set for `n` listeners in one
 * call (a start hands the engine 10,000: one call instead of 20,000 from Python).
 * Listener i is fds[i] with counts[i] endpoints, taken in order from the flat arrays
 * (addrs: 4 or 16 bytes each by families[i]; here may be NULL); per listener:
 * ids[i] = its id or add's -errno (nothing else done for it), errs[i] = set's 0 or
 * -errno (the listener stays added without endpoints, as after a failed set).
 * Returns n, or -EINVAL (nothing done). */
int uproxy_engine_listeners_add(struct uproxy_engine *e, int n, const int *fds,
                                const int *has_service, const int *families,
                                const int *counts, const unsigned char *addrs,
                                const int *ports, const int *indexes,
                                const double *avoid_until, const int *here,
                                const int *transparent, const int *affinity_groups,
                                const double *affinity_timeouts, int *ids, int *errs);

/* ClientIP session affinity (native/affinity.c), uproxy.balance.Balancer's rule:
 * a listener pushed with affinity_timeout > 0 pins each client address to the
 * endpoint chosen for it in `affinity_group` (the caller's number for the
 * service port: every listener of one service port, either family, shares its
 * pins). A client whose pin was used within the timeout and whose endpoint
 * (address and port) is still in the listener's list, and not already tried
 * for this connection, goes there (refreshing the pin); otherwise the endpoint
 * is chosen as without affinity and pinned. A failed connect to a pinned
 * endpoint drops the pin (the next attempt chooses and pins anew). Expired pins
 * are freed when a lookup finds them and by uproxy_engine_affinity_sweep. */
struct uproxy_pin {
    int group;
    int family;               /* the client's: 4 or 6 */
    unsigned char client[16]; /* 4 or 16 bytes, network order */
    int endpoint_family;
    unsigned char endpoint[16];
    int endpoint_port;        /* host order */
    double idle;              /* seconds since its last use */
    double timeout;           /* seconds */
};

/* The pins not expired, up to `max` into `out`; returns how many there are (call
 * again with a larger `out` when that is more than `max`). */
int uproxy_engine_affinity_export(struct uproxy_engine *e, struct uproxy_pin *out, int max);
/* Pins handed over (idle seconds: clocks differ); invalid ones are skipped.
 * Returns how many were taken. */
int uproxy_engine_affinity_import(struct uproxy_engine *e, const struct uproxy_pin *pins, int n);
/* Free the expired pins; returns how many. */
int uproxy_engine_affinity_sweep(struct uproxy_engine *e);
/* Free every pin of `group` (its service port is gone or lost its affinity). */
int uproxy_engine_affinity_forget(struct uproxy_engine *e, int group);
int uproxy_engine_affinity_count(struct uproxy_engine *e);

/* The node's links for transparent decisions (native/transparent.c): the
 * engine owns `links` from now on (NULL: none, every connection from the
 * node's address) and frees the one it replaces once its thread no longer
 * reads it. */
void uproxy_engine_set_links(struct uproxy_engine *e, struct uproxy_links *links);

/* Stop / start accepting (the kernel keeps the backlog). When pause returns the
 * engine accepts no more on it. */
void uproxy_engine_listener_pause(struct uproxy_engine *e, int id);
void uproxy_engine_listener_resume(struct uproxy_engine *e, int id);

/* Forget the listener; when it returns the engine no longer touches its fd
 * (the caller may close it). */
void uproxy_engine_listener_remove(struct uproxy_engine *e, int id);

/* Copy up to `max` queued set-up events into `out`; returns how many. */
int uproxy_engine_events(struct uproxy_engine *e, struct uproxy_event *out, int max);

/* The bit every engine-made connection's token has (Python's tokens stay below). */
#define UPROXY_SETUP_TOKEN 0x4000000000000000

/* ---- UDP batching (native/udp.c) ------------------------------------------
 *
 * One batch holds up to UPROXY_UDP_BATCH received datagrams in preallocated
 * buffers of UPROXY_UDP_BUFSIZE bytes (larger than the largest IPv4 UDP
 * payload, 65,507 bytes, and the IPv6 one, 65,527: nothing is ever truncated).
 * The event loop calls these on its own thread; no function blocks. Either
 * family: an IPv4 source is packed into its key; an IPv6 source does not fit
 * one integer, so its address and port are in src6 (the key is then only a
 * hash for grouping) and replies go with uproxy_udp_reply6. */
#define UPROXY_UDP_BATCH 64
#define UPROXY_UDP_BUFSIZE 65536
/* A source key (uproxy_udp_batch.key): the IPv4 address (host order) shifted
 * left by this many bits, or'ed with the port (host order). */
#define UPROXY_UDP_KEY_PORT_BITS 16
/* UDP GSO (UDP_SEGMENT) for runs of equal-sized datagrams: segment size bound (fits
 * every sane path MTU; a path that cannot segment turns it off), segments and bytes
 * per message */
#define UPROXY_UDP_GSO_MAX_SEGMENT 1232
#define UPROXY_UDP_GSO_MAX_SEGMENTS 64
#define UPROXY_UDP_GSO_MAX_BYTES 60000

struct uproxy_udp_priv;

struct uproxy_udp_batch {
    int count;                                /* datagrams received */
    int ngroups;                              /* distinct sources */
    uint32_t len[UPROXY_UDP_BATCH];           /* payload length of datagram i */
    uint64_t key[UPROXY_UDP_BATCH];           /* source: see UPROXY_UDP_KEY_PORT_BITS */
    int64_t dst[UPROXY_UDP_BATCH];            /* IP_PKTINFO header destination (host order), -1 */
    uint8_t order[UPROXY_UDP_BATCH];          /* datagram indexes grouped by source */
    uint8_t group[UPROXY_UDP_BATCH + 1];      /* group g is order[group[g] .. group[g + 1]) */
    int gso; /* runs of equal-sized datagrams up to this size leave as one UDP_SEGMENT
              * message; _new sets UPROXY_UDP_GSO_MAX_SEGMENT, a refusal lowers it (below
              * the refused size for EINVAL/EMSGSIZE: path MTU; else to 0: off) */
    struct uproxy_udp_priv *priv;
    /* IPv6 sources (want_source on an AF_INET6 socket): address and port (network
     * order) of datagram i, and its IPV6_PKTINFO header destination (dst[i] is 0 when
     * there is one, -1 when not) */
    uint8_t src6[UPROXY_UDP_BATCH][18];
    uint8_t dst6[UPROXY_UDP_BATCH][16];
};

struct uproxy_udp_sent {
    int sent;       /* datagrams the kernel accepted */
    int busy;       /* dropped: the socket buffer was full (EAGAIN) */
    int failed;     /* dropped for another error (uproxy_udp_reply only) */
    int err;        /* that error's errno, 0 if none */
    int err_at;     /* position (index into order) of the first failed one, -1 if none */
    uint64_t bytes; /* payload bytes of the datagrams sent */
};

/* NULL on ENOMEM. */
struct uproxy_udp_batch *uproxy_udp_batch_new(void);
void uproxy_udp_batch_free(struct uproxy_udp_batch *b);

/* One recvmmsg of up to UPROXY_UDP_BATCH datagrams from `fd`. With
 * `want_source` (a listener with IP_PKTINFO on): fills key/dst and groups by
 * source (groups in order of first appearance, arrival order within each);
 * else one group in arrival order. Returns the count, or -errno (-EAGAIN when
 * nothing was waiting; a connected socket's ICMP error, e.g. -ECONNREFUSED). */
int uproxy_udp_recv(int fd, struct uproxy_udp_batch *b, int want_source);

/* Send the datagrams at order[from .. to) on the connected socket `fd` with
 * sendmmsg. A datagram the socket refuses with EAGAIN is dropped (`busy`) and
 * the next one tried; any other error stops: `err`, and `err_at` is the
 * position of the datagram not sent (it and the rest are left to the caller;
 * `err_at` == `to` when only the error is left). An asynchronous error (ICMP)
 * that sendmmsg reported between two datagrams and then dropped is reported
 * as ECONNREFUSED after the datagram it stopped (sent on its own to learn
 * that). With `probe` (the endpoint has not answered yet) the first datagram
 * goes alone and SO_ERROR is read before the rest: a local endpoint's refusal
 * then stops the batch after it (`err_at` = from + 1), as one send per
 * datagram would. Returns out->sent. */
int uproxy_udp_send(int fd, struct uproxy_udp_batch *b, int from, int to, int probe,
                    struct uproxy_udp_sent *out);

/* Send every datagram of the batch, in order, from the unconnected socket `fd`
 * to ip:port (host order); with spec_dst >= 0, each leaves with IP_PKTINFO
 * ipi_spec_dst = spec_dst (the source address the client sent to). A datagram
 * that fails is dropped (`busy` or `failed`, last errno in `err`) and the rest
 * still go. Returns out->sent. */
int uproxy_udp_reply(int fd, struct uproxy_udp_batch *b, uint32_t ip, uint16_t port,
                     int64_t spec_dst, struct uproxy_udp_sent *out);

/* The same to an IPv6 client: `addr` 16 bytes, `port` host order; with spec_dst
 * (16 bytes, or NULL) each datagram leaves with IPV6_PKTINFO ipi6_addr = spec_dst. */
int uproxy_udp_reply6(int fd, struct uproxy_udp_batch *b, const unsigned char *addr,
                      uint16_t port, const unsigned char *spec_dst,
                      struct uproxy_udp_sent *out);

/* Copy up to `size` bytes of datagram `index` into dst (for tests and tools);
 * returns the bytes copied, -1 for a bad index. */
int uproxy_udp_copy(struct uproxy_udp_batch *b, int index, unsigned char *dst, int size);

/* --- transparent source (native/transparent.c) ---------------------------
 * The C twin of uproxy.transparent.transparent_source: whether a backend
 * connection is opened from the client's address (1) or the node's (0), from
 * what the node's links say (uproxy.transparent.NodeLinks, built into a struct
 * uproxy_links by uproxy/proxy/native_links.py).
 *
 * Addresses are in network order: 4 bytes for family 4, 16 for family 6.
 * `family` describes both `client` and `endpoint`. An IPv4-mapped IPv6 address
 * (::ffff:a.b.c.d) given with family 6 is taken as the IPv4 address a.b.c.d,
 * as Python's uproxy.transparent._address does, for the client and the
 * endpoint alike: a dual-stack socket's mapped client against an IPv4 endpoint
 * is asked with family 6 and the endpoint mapped too (or with family 4 and the
 * client's last 4 bytes); a mapped client against a real IPv6 endpoint is 0
 * (the families differ), as in Python. A family other than 4 or 6 is 0.
 *
 * Thread safety: a uproxy_links is built by one thread (new, add_*) and is
 * immutable after: any number of threads may then call uproxy_links_dev_of and
 * uproxy_transparent_source on it concurrently without a lock (lookups only
 * read). Never add to one that readers may already hold: build a new one, swap
 * the pointer, free the old one once no reader can still be using it. */
struct uproxy_links;

/* An empty set of links (every answer 0, as with an empty NodeLinks); NULL on ENOMEM. */
struct uproxy_links *uproxy_links_new(void);
void uproxy_links_free(struct uproxy_links *links); /* drops one reference */
/* One more reference (the engines of a group share one links object). */
struct uproxy_links *uproxy_links_ref(struct uproxy_links *links);

/* One of the node's own addresses (family 4 or 6; an IPv4-mapped address is
 * kept as IPv6 and so never matches: give IPv4 addresses as family 4). Adding
 * one twice is harmless. 0, -ENOMEM, or -EINVAL (bad family, NULL). */
int uproxy_links_add_local(struct uproxy_links *links, int family, const unsigned char *addr);

/* One on-link route: prefix/prefixlen (bits past prefixlen are ignored, as
 * ip_network(strict=False) does) on interface `dev` (an id >= 0 chosen by the
 * caller; equal ids mean the same interface); `uplink` 1 when that interface
 * carries a default route (give the same flag for every prefix of one dev).
 * Longest prefix wins; among equal lengths, the one added first (NodeLinks'
 * order). 0, -ENOMEM, or -EINVAL (bad family or prefixlen, dev < 0). */
int uproxy_links_add_onlink(struct uproxy_links *links, int family, const unsigned char *prefix,
                            int prefixlen, int dev, int uplink);

/* The dev of the on-link route `addr` is on (longest prefix first, as
 * NodeLinks.interface_of), or -1 (routed via a gateway; bad family; NULL
 * links). A mapped address is looked up as IPv4. An endpoint of this node for
 * which this is -1 is what Python's Transparent._links_unknown reports: the
 * links were read before its interface existed; ask Python to read them again. */
int uproxy_links_dev_of(const struct uproxy_links *links, int family, const unsigned char *addr);

/* 1: connect to `endpoint` from `client`'s address; 0: from the node's. The
 * cases (uproxy.transparent.transparent_source's docstring says why): 0 for an
 * external client (`external`: NodePort, externalIP, LoadBalancer IP) unless
 * `external_local` (externalTrafficPolicy: Local); hairpin; a loopback,
 * unspecified, multicast or local client; a loopback or local endpoint; an
 * endpoint on this node (`endpoint_here`) with no on-link route; client and
 * endpoint on-link on the same dev; an endpoint elsewhere (`endpoint_here` 0)
 * and a client not on-link or on-link on an uplink. NULL links: 0. Whether
 * transparent mode is on for the family at all is the caller's question
 * (native_links leaves out the routes of a family that is off, which makes
 * every answer of that family 0). */
int uproxy_transparent_source(const struct uproxy_links *links, int family,
                              const unsigned char *client, const unsigned char *endpoint,
                              int external, int external_local, int endpoint_here);

/* ---- listening sockets in batches (native/sockets.c) ----------------------
 *
 * Open `n` sockets of `kind` (SOCK_STREAM or SOCK_DGRAM) as uproxy.proxy.ports.bind
 * does (non-blocking, close-on-exec, SO_REUSEADDR for TCP, IPV6_V6ONLY for IPv6, bound,
 * listening with `backlog` when SOCK_STREAM): socket i of family families[i] (4 or
 * 6) on the address at addrs + 16 * i (the first 4 bytes for IPv4), port ports[i];
 * port 0: PortAllocator.open's walk, the first port of [low, high] from *cursor
 * (wrapping) whose avoid[port - low] is 0 and that binds, *cursor moved past every
 * port tried (EADDRINUSE when none is left; another bind error ends the walk).
 * Per socket: fds[i] = its fd (the caller's) or -errno, bound[i] = its port.
 * Returns n, or -EINVAL (nothing done). */
int uproxy_open_listeners(int n, int kind, const int *families, const unsigned char *addrs,
                          const int *ports, int low, int high, int *cursor,
                          const unsigned char *avoid, int backlog, int *fds, int *bound);

/* cdef end */

#endif
