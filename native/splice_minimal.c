/* splice_minimal: the smallest splice(2) relay there is, for the benchmark's bulk row.
 *
 *     splice_minimal [-p PIPE_BYTES] [-c CONGESTION] PORT IP:PORT
 *
 * What it is for: the bulk target asks a userspace relay for 0.85x of kernel DNAT's
 * single-stream throughput. uproxy's engine (and the C TCP relay, which is that engine
 * without Python) stay near 0.7x. This program answers "is that the engine, or any
 * relay of this shape?": none of the engine's code, no epoll, no state machine. Each
 * accepted connection (interception: the same iptables REDIRECT to PORT) gets a
 * blocking connect to IP:PORT from the node's address and one thread per direction
 * that does nothing but splice(in -> pipe) and splice(pipe -> out) until EOF, then
 * shutdown(SHUT_WR). That is the fewest system calls and wake-ups a relay through a
 * second TCP connection can make; what it still pays is the second connection itself
 * (the node's TCP receive of the client's stream, its ACKs, the node's TCP send to the
 * endpoint and that leg's ACKs), which kernel DNAT does not have.
 *
 * -p: the pipe size (F_SETPIPE_SZ), 256 KiB by default as uproxy's engine. -c: a TCP
 * congestion control for both of the relay's sockets (TCP_CONGESTION on the listener,
 * which accepted sockets inherit, and on each connecting socket), the namespace's default
 * when not given: how much of the gap is the second sender's pacing. IPv4 only,
 * one endpoint, errors end the connection; it runs until killed. `make bench` runs it as
 * the peer "minimal splice relay" (bulk row only: a thread pair per connection is not a
 * design for many short connections).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static struct sockaddr_in endpoint;
static int pipe_bytes = 256 * 1024;
static const char *congestion;

struct half {
    int from, to;
    struct half *other; /* the reverse direction: the last one out closes both sockets */
    int done;
    pthread_mutex_t *lock;
};

/* One direction is over: the second one to get here closes both sockets and frees. */
static void finish(struct half *h) {
    pthread_mutex_lock(h->lock);
    h->done = 1;
    int last = h->other->done;
    pthread_mutex_unlock(h->lock);
    if (last) {
        close(h->from);
        close(h->to);
        pthread_mutex_destroy(h->lock);
        free(h->lock);
        free(h->other);
        free(h);
    }
}

static void *pump(void *arg) {
    struct half *h = arg;
    int p[2];
    if (pipe2(p, O_CLOEXEC) == 0) {
        fcntl(p[1], F_SETPIPE_SZ, pipe_bytes);
        for (;;) {
            ssize_t in = splice(h->from, NULL, p[1], NULL, (size_t)pipe_bytes, SPLICE_F_MOVE);
            if (in <= 0)
                break;
            while (in > 0) {
                ssize_t out = splice(p[0], NULL, h->to, NULL, (size_t)in, SPLICE_F_MOVE);
                if (out <= 0)
                    goto out;
                in -= out;
            }
        }
    out:
        close(p[0]);
        close(p[1]);
    }
    shutdown(h->to, SHUT_WR);
    finish(h);
    return NULL;
}

static void start(int client) {
    int server = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    if (server >= 0 && congestion) /* from its first segment on */
        setsockopt(server, IPPROTO_TCP, TCP_CONGESTION, congestion, (socklen_t)strlen(congestion));
    if (server < 0 || connect(server, (struct sockaddr *)&endpoint, sizeof endpoint) < 0) {
        if (server >= 0)
            close(server);
        close(client);
        return;
    }
    setsockopt(server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct half *a = calloc(1, sizeof *a), *b = calloc(1, sizeof *b);
    pthread_mutex_t *lock = malloc(sizeof *lock);
    pthread_t t;
    pthread_attr_t attr;
    if (!a || !b || !lock) {
        free(a), free(b), free(lock);
        close(server), close(client);
        return;
    }
    pthread_mutex_init(lock, NULL);
    *a = (struct half){.from = client, .to = server, .other = b, .lock = lock};
    *b = (struct half){.from = server, .to = client, .other = a, .lock = lock};
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &attr, pump, a) != 0) {
        close(server), close(client);
        pthread_mutex_destroy(lock);
        free(a), free(b), free(lock);
    } else if (pthread_create(&t, &attr, pump, b) != 0) {
        shutdown(server, SHUT_RDWR); /* a's splices end; b never ran */
        shutdown(client, SHUT_RDWR);
        finish(b);
    }
    pthread_attr_destroy(&attr);
}

int main(int argc, char **argv) {
    int opt;
    while ((opt = getopt(argc, argv, "p:c:")) != -1) {
        if (opt == 'p')
            pipe_bytes = atoi(optarg);
        else if (opt == 'c')
            congestion = optarg;
        else
            goto usage;
    }
    if (argc - optind != 2 || pipe_bytes <= 0)
        goto usage;
    char host[64];
    int port = atoi(argv[optind]), eport;
    if (sscanf(argv[optind + 1], "%63[^:]:%d", host, &eport) != 2 ||
        inet_pton(AF_INET, host, &endpoint.sin_addr) != 1)
        goto usage;
    endpoint.sin_family = AF_INET;
    endpoint.sin_port = htons((uint16_t)eport);
    signal(SIGPIPE, SIG_IGN);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* inherited by accepted */
    if (congestion &&
        setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, congestion, (socklen_t)strlen(congestion)) < 0) {
        fprintf(stderr, "splice_minimal: congestion control %s: %s\n", congestion, strerror(errno));
        return 2;
    }
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 128) < 0) {
        fprintf(stderr, "splice_minimal: port %d: %s\n", port, strerror(errno));
        return 2;
    }
    for (;;) {
        int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
        if (c >= 0)
            start(c);
        else if (errno != EINTR && errno != ECONNABORTED)
            usleep(1000);
    }
usage:
    fprintf(stderr, "usage: splice_minimal [-p PIPE_BYTES] [-c CONGESTION] PORT IP:PORT\n");
    return 2;
}
