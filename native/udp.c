/* uproxy native UDP batching. See uproxy_native.h for the contract.
 *
 * Why this shape: a DNS query through a userspace proxy costs four socket
 * calls (receive from the client, send to the endpoint, receive the reply,
 * send it to the client). recvmmsg/sendmmsg move up to UPROXY_UDP_BATCH
 * datagrams per call, so a busy socket costs one call per direction per
 * wake-up instead of one per datagram, and Python (which keeps the flow table)
 * looks at each *source* once per batch, never at a payload: datagrams are
 * grouped by source address here, and a group is sent to its flow's connected
 * socket with one sendmmsg straight from the receive buffers.
 *
 * Everything runs on the caller's thread (the event loop); nothing blocks
 * (the sockets are non-blocking and MSG_DONTWAIT is passed anyway).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "uproxy_native.h"

#define CONTROL_SIZE CMSG_SPACE(sizeof(struct in_pktinfo))
#define CONTROL6_SIZE CMSG_SPACE(sizeof(struct in6_pktinfo))
#define GSO_CONTROL_SIZE CMSG_SPACE(sizeof(uint16_t))

struct uproxy_udp_priv {
    struct mmsghdr msgs[UPROXY_UDP_BATCH];
    struct iovec iov[UPROXY_UDP_BATCH];
    struct sockaddr_in6 addr[UPROXY_UDP_BATCH]; /* room for either family */
    union {
        char buf[CONTROL6_SIZE];
        struct cmsghdr align;
    } control[UPROXY_UDP_BATCH];
    unsigned char *bufs; /* UPROXY_UDP_BATCH buffers of UPROXY_UDP_BUFSIZE bytes */
};

struct uproxy_udp_batch *uproxy_udp_batch_new(void)
{
    struct uproxy_udp_batch *b = calloc(1, sizeof(*b));
    if (b == NULL)
        return NULL;
    b->priv = calloc(1, sizeof(*b->priv));
    if (b->priv == NULL) {
        free(b);
        return NULL;
    }
    /* Large enough to be mmapped: pages are committed only as datagrams touch them. */
    b->priv->bufs = malloc((size_t)UPROXY_UDP_BATCH * UPROXY_UDP_BUFSIZE);
    if (b->priv->bufs == NULL) {
        free(b->priv);
        free(b);
        return NULL;
    }
    b->gso = UPROXY_UDP_GSO_MAX_SEGMENT;
    for (int i = 0; i < UPROXY_UDP_BATCH; i++) {
        b->priv->iov[i].iov_base = b->priv->bufs + (size_t)i * UPROXY_UDP_BUFSIZE;
        b->priv->iov[i].iov_len = UPROXY_UDP_BUFSIZE;
    }
    return b;
}

void uproxy_udp_batch_free(struct uproxy_udp_batch *b)
{
    if (b == NULL)
        return;
    free(b->priv->bufs);
    free(b->priv);
    free(b);
}

/* IPv4: the packed address and port. IPv6: src6 gets address and port, the key is
 * their FNV-1a hash (grouping compares src6 too, so a collision cannot merge two). */
static uint64_t source_key(const struct sockaddr_in6 *sa, socklen_t len, uint8_t *src6)
{
    if (len >= sizeof(struct sockaddr_in6) && sa->sin6_family == AF_INET6) {
        memcpy(src6, &sa->sin6_addr, 16);
        memcpy(src6 + 16, &sa->sin6_port, 2);
        uint64_t h = 1469598103934665603ULL;
        for (int i = 0; i < 18; i++)
            h = (h ^ src6[i]) * 1099511628211ULL;
        return h;
    }
    const struct sockaddr_in *s4 = (const struct sockaddr_in *)(const void *)sa;
    if (len < sizeof(struct sockaddr_in) || s4->sin_family != AF_INET)
        return 0;
    return ((uint64_t)ntohl(s4->sin_addr.s_addr) << UPROXY_UDP_KEY_PORT_BITS)
           | ntohs(s4->sin_port);
}

/* IPv4: the header destination (host order); IPv6: 0 and the address in dst6; -1: none. */
static int64_t header_dst(struct msghdr *mh, uint8_t *dst6)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c != NULL; c = CMSG_NXTHDR(mh, c)) {
        if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO
            && c->cmsg_len >= CMSG_LEN(sizeof(struct in_pktinfo))) {
            struct in_pktinfo pi;
            memcpy(&pi, CMSG_DATA(c), sizeof(pi));
            return (int64_t)ntohl(pi.ipi_addr.s_addr);
        }
        if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO
            && c->cmsg_len >= CMSG_LEN(sizeof(struct in6_pktinfo))) {
            struct in6_pktinfo pi;
            memcpy(&pi, CMSG_DATA(c), sizeof(pi));
            memcpy(dst6, &pi.ipi6_addr, 16);
            return 0;
        }
    }
    return -1;
}

int uproxy_udp_recv(int fd, struct uproxy_udp_batch *b, int want_source)
{
    struct uproxy_udp_priv *p = b->priv;
    b->count = 0;
    b->ngroups = 0;
    for (int i = 0; i < UPROXY_UDP_BATCH; i++) {
        struct msghdr *mh = &p->msgs[i].msg_hdr;
        p->iov[i].iov_len = UPROXY_UDP_BUFSIZE;
        mh->msg_iov = &p->iov[i];
        mh->msg_iovlen = 1;
        mh->msg_flags = 0;
        if (want_source) {
            mh->msg_name = &p->addr[i];
            mh->msg_namelen = sizeof(p->addr[i]);
            mh->msg_control = p->control[i].buf;
            mh->msg_controllen = CONTROL6_SIZE;
        } else {
            mh->msg_name = NULL;
            mh->msg_namelen = 0;
            mh->msg_control = NULL;
            mh->msg_controllen = 0;
        }
    }
    int n;
    do {
        n = recvmmsg(fd, p->msgs, UPROXY_UDP_BATCH, MSG_DONTWAIT, NULL);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    if (n == 0)
        return -EAGAIN;
    b->count = n;
    if (!want_source) {
        for (int i = 0; i < n; i++) {
            b->len[i] = p->msgs[i].msg_len;
            b->key[i] = 0;
            b->dst[i] = -1;
            b->order[i] = (uint8_t)i;
        }
        b->group[0] = 0;
        b->group[1] = (uint8_t)n;
        b->ngroups = 1;
        return n;
    }
    /* Group by source, groups in order of first appearance, datagrams in arrival order
     * within a group (a counting sort over at most UPROXY_UDP_BATCH distinct keys). */
    uint8_t gid[UPROXY_UDP_BATCH];
    uint64_t gkey[UPROXY_UDP_BATCH];
    int gfirst[UPROXY_UDP_BATCH];
    int gcount[UPROXY_UDP_BATCH];
    int ng = 0;
    for (int i = 0; i < n; i++) {
        struct msghdr *mh = &p->msgs[i].msg_hdr;
        b->len[i] = p->msgs[i].msg_len;
        b->key[i] = source_key(&p->addr[i], mh->msg_namelen, b->src6[i]);
        b->dst[i] = header_dst(mh, b->dst6[i]);
        bool v6 = p->addr[i].sin6_family == AF_INET6;
        int g = 0;
        while (g < ng && (gkey[g] != b->key[i]
                          || (v6 && memcmp(b->src6[gfirst[g]], b->src6[i], 18) != 0)))
            g++;
        if (g == ng) {
            gkey[ng] = b->key[i];
            gfirst[ng] = i;
            gcount[ng] = 0;
            ng++;
        }
        gcount[g]++;
        gid[i] = (uint8_t)g;
    }
    int fill[UPROXY_UDP_BATCH];
    int at = 0;
    for (int g = 0; g < ng; g++) {
        b->group[g] = (uint8_t)at;
        fill[g] = at;
        at += gcount[g];
    }
    b->group[ng] = (uint8_t)n;
    for (int i = 0; i < n; i++)
        b->order[fill[gid[i]]++] = (uint8_t)i;
    b->ngroups = ng;
    return n;
}

/* sendmmsg of msgs[0..n): returns how many were sent, or -errno when the first failed. */
static int send_some(int fd, struct mmsghdr *msgs, int n)
{
    int r;
    do {
        r = sendmmsg(fd, msgs, (unsigned)n, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
}

/* What the kernel says when it cannot segment on this path (no checksum offload,
 * segment larger than the path MTU, a kernel without UDP_SEGMENT). */
static bool gso_refused(int err)
{
    return err == EINVAL || err == EIO || err == EOPNOTSUPP || err == ENOPROTOOPT
        || err == EMSGSIZE;
}

/* The messages to send for positions [from, to): with GSO, a run of datagrams of one
 * length (the last may be shorter) becomes one message with UDP_SEGMENT, which the
 * kernel routes, filters and NATs once and splits into the same datagrams. */
struct wire {
    struct mmsghdr msgs[UPROXY_UDP_BATCH];
    struct iovec iov[UPROXY_UDP_BATCH];
    int first[UPROXY_UDP_BATCH]; /* first position of message m */
    int count[UPROXY_UDP_BATCH]; /* datagrams in message m */
    int seg[UPROXY_UDP_BATCH];   /* its segment size (the first datagram's length) */
    union {
        char buf[CONTROL6_SIZE + GSO_CONTROL_SIZE];
        struct cmsghdr align;
    } control[UPROXY_UDP_BATCH];
};

/* Where a reply leaves from: IPv4 spec_dst >= 0, or IPv6 spec6 (16 bytes), or neither. */
struct source {
    int64_t spec_dst;
    const unsigned char *spec6;
};

static int plan(struct uproxy_udp_batch *b, struct wire *w, int from, int to, void *name,
                socklen_t namelen, struct source src)
{
    int64_t spec_dst = src.spec6 != NULL ? 0 : src.spec_dst;
    size_t pktinfo = src.spec6 != NULL ? CONTROL6_SIZE : CONTROL_SIZE;
    struct uproxy_udp_priv *p = b->priv;
    int m = 0, k = from;
    while (k < to) {
        int seg = (int)b->len[b->order[k]];
        int n = 1;
        size_t total = (size_t)seg;
        if (seg > 0 && seg <= b->gso) {
            while (k + n < to && n < UPROXY_UDP_GSO_MAX_SEGMENTS) {
                int len = (int)b->len[b->order[k + n]];
                if (len > seg || len == 0 || total + (size_t)len > UPROXY_UDP_GSO_MAX_BYTES)
                    break;
                total += (size_t)len;
                n++;
                if (len < seg) /* a shorter datagram ends the run */
                    break;
            }
        }
        for (int j = 0; j < n; j++) {
            int i = b->order[k + j];
            w->iov[k - from + j].iov_base = p->iov[i].iov_base;
            w->iov[k - from + j].iov_len = b->len[i];
        }
        struct msghdr *mh = &w->msgs[m].msg_hdr;
        memset(mh, 0, sizeof(*mh));
        mh->msg_name = name;
        mh->msg_namelen = namelen;
        mh->msg_iov = &w->iov[k - from];
        mh->msg_iovlen = (size_t)n;
        if (spec_dst >= 0 || n > 1) {
            memset(&w->control[m], 0, sizeof(w->control[m]));
            mh->msg_control = w->control[m].buf;
            mh->msg_controllen = (spec_dst >= 0 ? pktinfo : 0)
                               + (n > 1 ? GSO_CONTROL_SIZE : 0);
            struct cmsghdr *c = CMSG_FIRSTHDR(mh);
            if (src.spec6 != NULL) {
                c->cmsg_level = IPPROTO_IPV6;
                c->cmsg_type = IPV6_PKTINFO;
                c->cmsg_len = CMSG_LEN(sizeof(struct in6_pktinfo));
                struct in6_pktinfo pi = {.ipi6_ifindex = 0};
                memcpy(&pi.ipi6_addr, src.spec6, 16);
                memcpy(CMSG_DATA(c), &pi, sizeof(pi));
                c = CMSG_NXTHDR(mh, c);
            } else if (spec_dst >= 0) {
                c->cmsg_level = IPPROTO_IP;
                c->cmsg_type = IP_PKTINFO;
                c->cmsg_len = CMSG_LEN(sizeof(struct in_pktinfo));
                struct in_pktinfo pi = {.ipi_ifindex = 0};
                pi.ipi_spec_dst.s_addr = htonl((uint32_t)spec_dst);
                memcpy(CMSG_DATA(c), &pi, sizeof(pi));
                c = CMSG_NXTHDR(mh, c);
            }
            if (n > 1) {
                uint16_t size = (uint16_t)seg;
                c->cmsg_level = SOL_UDP;
                c->cmsg_type = UDP_SEGMENT;
                c->cmsg_len = CMSG_LEN(sizeof(size));
                memcpy(CMSG_DATA(c), &size, sizeof(size));
            }
        }
        w->first[m] = k;
        w->count[m] = n;
        w->seg[m] = seg;
        m++;
        k += n;
    }
    return m;
}

static uint64_t bytes_of(struct uproxy_udp_batch *b, int first, int count)
{
    uint64_t total = 0;
    for (int k = first; k < first + count; k++)
        total += b->len[b->order[k]];
    return total;
}

static void merge(struct uproxy_udp_sent *out, const struct uproxy_udp_sent *more)
{
    out->sent += more->sent;
    out->busy += more->busy;
    out->failed += more->failed;
    out->bytes += more->bytes;
    if (more->err) {
        out->err = more->err;
        if (out->err_at < 0)
            out->err_at = more->err_at;
    }
}

/* Send positions [from, to); `stop_on_error`: stop at the first error other than EAGAIN
 * (else drop that message's datagrams and go on). `probe` (a connected socket whose
 * endpoint has not answered yet): the first datagram alone, then SO_ERROR, then the rest,
 * so that a local endpoint's ICMP refusal (delivered during that send) stops the batch
 * right after the first datagram -- what one send per datagram would see. */
static void send_range(int fd, struct uproxy_udp_batch *b, int from, int to, void *name,
                       socklen_t namelen, struct source spec_dst, bool stop_on_error,
                       bool probe, struct uproxy_udp_sent *out)
{
    struct wire w;
    memset(out, 0, sizeof(*out));
    out->err_at = -1;
    if (from < 0 || to > b->count || from >= to)
        return;
    if (probe && to - from > 1) {
        send_range(fd, b, from, from + 1, name, namelen, spec_dst, stop_on_error, false, out);
        if (out->err)
            return;
        int soerr = 0;
        socklen_t len = sizeof(soerr);
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) == 0 && soerr != 0) {
            out->err = soerr;
            out->err_at = from + 1;
            return;
        }
        struct uproxy_udp_sent rest;
        send_range(fd, b, from + 1, to, name, namelen, spec_dst, stop_on_error, false, &rest);
        merge(out, &rest);
        return;
    }
    int nm = plan(b, &w, from, to, name, namelen, spec_dst);
    int m = 0;
    bool after_partial = false;
    while (m < nm) {
        /* sendmmsg drops the error of a message that failed after others were sent. If
         * that message then goes through on its own, the error was an asynchronous one
         * (an ICMP error the kernel reports once, e.g. port unreachable, which loopback
         * and veth deliver during the send itself): the endpoint refused. */
        int r = send_some(fd, &w.msgs[m], after_partial ? 1 : nm - m);
        if (r > 0) {
            for (int j = m; j < m + r; j++) {
                out->sent += w.count[j];
                out->bytes += bytes_of(b, w.first[j], w.count[j]);
            }
            m += r;
            if (after_partial && stop_on_error) {
                out->err = ECONNREFUSED;
                out->err_at = m < nm ? w.first[m] : to;
                return;
            }
            after_partial = !after_partial && m < nm;
            continue;
        }
        after_partial = false;
        int err = -r;
        if (w.count[m] > 1 && gso_refused(err)) {
            /* Too large a segment for the path MTU: only smaller runs use GSO from now
             * on. Anything else (no checksum offload, IPsec...): no GSO at all. */
            b->gso = (err == EINVAL || err == EMSGSIZE) && w.seg[m] > 1 ? w.seg[m] - 1 : 0;
            struct uproxy_udp_sent more;
            send_range(fd, b, w.first[m], to, name, namelen, spec_dst, stop_on_error, false,
                       &more);
            merge(out, &more);
            return;
        }
        if (err == EAGAIN || err == EWOULDBLOCK) {
            out->busy += w.count[m]; /* dropped; try the next */
        } else if (stop_on_error) {
            out->err = err;
            out->err_at = w.first[m];
            return;
        } else {
            out->failed += w.count[m];
            out->err = err;
            if (out->err_at < 0)
                out->err_at = w.first[m];
        }
        m++;
    }
}

int uproxy_udp_send(int fd, struct uproxy_udp_batch *b, int from, int to, int probe,
                    struct uproxy_udp_sent *out)
{
    struct source none = {.spec_dst = -1, .spec6 = NULL};
    send_range(fd, b, from, to, NULL, 0, none, true, probe != 0, out);
    return out->sent;
}

int uproxy_udp_reply(int fd, struct uproxy_udp_batch *b, uint32_t ip, uint16_t port,
                     int64_t spec_dst, struct uproxy_udp_sent *out)
{
    struct sockaddr_in to;
    memset(&to, 0, sizeof(to));
    to.sin_family = AF_INET;
    to.sin_addr.s_addr = htonl(ip);
    to.sin_port = htons(port);
    struct source src = {.spec_dst = spec_dst, .spec6 = NULL};
    send_range(fd, b, 0, b->count, &to, sizeof(to), src, false, false, out);
    return out->sent;
}

int uproxy_udp_reply6(int fd, struct uproxy_udp_batch *b, const unsigned char *addr,
                      uint16_t port, const unsigned char *spec_dst,
                      struct uproxy_udp_sent *out)
{
    struct sockaddr_in6 to;
    memset(&to, 0, sizeof(to));
    to.sin6_family = AF_INET6;
    memcpy(&to.sin6_addr, addr, 16);
    to.sin6_port = htons(port);
    struct source src = {.spec_dst = -1, .spec6 = spec_dst};
    send_range(fd, b, 0, b->count, &to, sizeof(to), src, false, false, out);
    return out->sent;
}

int uproxy_udp_copy(struct uproxy_udp_batch *b, int index, unsigned char *dst, int size)
{
    if (index < 0 || index >= b->count)
        return -1;
    int n = (int)b->len[index];
    if (n > size)
        n = size;
    memcpy(dst, b->priv->bufs + (size_t)index * UPROXY_UDP_BUFSIZE, (size_t)n);
    return n;
}
