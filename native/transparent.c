/* uproxy native transparent-source decision. See uproxy_native.h for the contract.
 *
 * The C twin of uproxy.transparent.transparent_source (the pure-Python reference;
 * read its docstring for *why* each case connects from the node's address): the
 * engine decides per connection, without calling Python, whether the backend
 * connection is opened from the client's address (1) or the node's (0).
 * tests/core/test_transparent_native.py runs both over a generated table and
 * asserts the same answer for every case.
 *
 * What the decision knows about the node (uproxy.transparent.NodeLinks) is built
 * by Python at every links read (uproxy/proxy/native_links.py) into a struct
 * uproxy_links and never changed after: the engine swaps the pointer, so readers
 * need no lock. Lookups only read.
 *
 *   local addresses: an open-addressing hash set (IPVS-mode nodes carry every
 *                    ClusterIP as a local address: thousands of entries);
 *   on-link prefixes: an array kept sorted longest prefix first, in the order
 *                    they were added among equal lengths (Python's stable sort),
 *                    so the first match is NodeLinks.interface_of's answer.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "uproxy_native.h"

struct links_addr {
    uint8_t family; /* 4 or 6; 0 marks an empty hash slot */
    unsigned char addr[16]; /* IPv4 in the first 4 bytes, the rest zero */
};

struct links_net {
    uint8_t family;
    uint8_t prefixlen;
    bool uplink;
    int dev;
    unsigned char prefix[16]; /* masked to prefixlen */
};

struct uproxy_links {
    struct links_addr *local; /* hash set, local_cap slots (a power of two) */
    size_t local_cap, local_count;
    struct links_net *nets; /* longest prefix first */
    size_t net_cap, net_count;
};

static int addr_len(int family)
{
    return family == 4 ? 4 : family == 6 ? 16 : 0;
}

struct uproxy_links *uproxy_links_new(void)
{
    return calloc(1, sizeof(struct uproxy_links));
}

void uproxy_links_free(struct uproxy_links *links)
{
    if (links == NULL)
        return;
    free(links->local);
    free(links->nets);
    free(links);
}

/* FNV-1a over the family and the address bytes. */
static size_t addr_hash(const struct links_addr *a)
{
    uint64_t h = 1469598103934665603ULL ^ a->family;
    h *= 1099511628211ULL;
    for (int i = 0; i < addr_len(a->family); i++) {
        h ^= a->addr[i];
        h *= 1099511628211ULL;
    }
    return (size_t)(h ^ (h >> 29));
}

static bool addr_eq(const struct links_addr *a, const struct links_addr *b)
{
    return a->family == b->family && memcmp(a->addr, b->addr, 16) == 0;
}

/* The slot holding `a`, or the empty slot where it would go. */
static struct links_addr *local_slot(struct links_addr *table, size_t cap,
                                     const struct links_addr *a)
{
    size_t mask = cap - 1;
    for (size_t i = addr_hash(a) & mask;; i = (i + 1) & mask) {
        if (table[i].family == 0 || addr_eq(&table[i], a))
            return &table[i];
    }
}

static int local_grow(struct uproxy_links *links)
{
    size_t cap = links->local_cap ? links->local_cap * 2 : 16;
    struct links_addr *table = calloc(cap, sizeof(*table));
    if (table == NULL)
        return -ENOMEM;
    for (size_t i = 0; i < links->local_cap; i++) {
        if (links->local[i].family != 0)
            *local_slot(table, cap, &links->local[i]) = links->local[i];
    }
    free(links->local);
    links->local = table;
    links->local_cap = cap;
    return 0;
}

int uproxy_links_add_local(struct uproxy_links *links, int family, const unsigned char *addr)
{
    int len = addr_len(family);
    if (links == NULL || len == 0 || addr == NULL)
        return -EINVAL;
    /* At most half full: probes stay short and there is always an empty slot. */
    if ((links->local_count + 1) * 2 > links->local_cap) {
        int rc = local_grow(links);
        if (rc < 0)
            return rc;
    }
    struct links_addr a = {.family = (uint8_t)family};
    memcpy(a.addr, addr, (size_t)len);
    struct links_addr *slot = local_slot(links->local, links->local_cap, &a);
    if (slot->family == 0) {
        *slot = a;
        links->local_count++;
    }
    return 0;
}

static bool is_local(const struct uproxy_links *links, const struct links_addr *a)
{
    if (links->local_count == 0)
        return false;
    return local_slot(links->local, links->local_cap, a)->family != 0;
}

static bool prefix_match(const unsigned char *addr, const unsigned char *prefix, int prefixlen)
{
    int whole = prefixlen / 8, bits = prefixlen % 8;
    if (memcmp(addr, prefix, (size_t)whole) != 0)
        return false;
    if (bits == 0)
        return true;
    unsigned char mask = (unsigned char)(0xff << (8 - bits));
    return (addr[whole] & mask) == prefix[whole];
}

int uproxy_links_add_onlink(struct uproxy_links *links, int family, const unsigned char *prefix,
                            int prefixlen, int dev, int uplink)
{
    int len = addr_len(family);
    if (links == NULL || len == 0 || prefix == NULL || prefixlen < 0 || prefixlen > len * 8
        || dev < 0)
        return -EINVAL;
    if (links->net_count == links->net_cap) {
        size_t cap = links->net_cap ? links->net_cap * 2 : 16;
        struct links_net *nets = realloc(links->nets, cap * sizeof(*nets));
        if (nets == NULL)
            return -ENOMEM;
        links->nets = nets;
        links->net_cap = cap;
    }
    struct links_net net = {.family = (uint8_t)family, .prefixlen = (uint8_t)prefixlen,
                            .uplink = uplink != 0, .dev = dev};
    /* Masked, as ipaddress.ip_network(prefix, strict=False) does. */
    memcpy(net.prefix, prefix, (size_t)len);
    for (int i = 0; i < len; i++) {
        int keep = prefixlen - i * 8;
        if (keep <= 0)
            net.prefix[i] = 0;
        else if (keep < 8)
            net.prefix[i] &= (unsigned char)(0xff << (8 - keep));
    }
    /* After every prefix at least as long: longest first, equal lengths in the order
     * added (Python sorts the routes by -prefixlen with a stable sort). */
    size_t at = links->net_count;
    while (at > 0 && links->nets[at - 1].prefixlen < prefixlen)
        at--;
    memmove(&links->nets[at + 1], &links->nets[at],
            (links->net_count - at) * sizeof(*links->nets));
    links->nets[at] = net;
    links->net_count++;
    return 0;
}

/* The first (longest) on-link prefix holding `a`, or NULL (routed via a gateway). */
static const struct links_net *net_of(const struct uproxy_links *links,
                                      const struct links_addr *a)
{
    for (size_t i = 0; i < links->net_count; i++) {
        const struct links_net *net = &links->nets[i];
        if (net->family == a->family && prefix_match(a->addr, net->prefix, net->prefixlen))
            return net;
    }
    return NULL;
}

static const unsigned char V4_MAPPED[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

/* `addr` of `family` as the decision sees it: an IPv4-mapped IPv6 address
 * (::ffff:a.b.c.d, a v4 client on a dual-stack socket) is the IPv4 address, as
 * uproxy.transparent._address makes it. False for a family other than 4 or 6. */
static bool to_addr(int family, const unsigned char *addr, struct links_addr *out)
{
    memset(out, 0, sizeof(*out));
    if (addr == NULL)
        return false;
    if (family == 4) {
        out->family = 4;
        memcpy(out->addr, addr, 4);
        return true;
    }
    if (family != 6)
        return false;
    if (memcmp(addr, V4_MAPPED, sizeof(V4_MAPPED)) == 0) {
        out->family = 4;
        memcpy(out->addr, addr + 12, 4);
    } else {
        out->family = 6;
        memcpy(out->addr, addr, 16);
    }
    return true;
}

int uproxy_links_dev_of(const struct uproxy_links *links, int family, const unsigned char *addr)
{
    struct links_addr a;
    if (links == NULL || !to_addr(family, addr, &a))
        return -1;
    const struct links_net *net = net_of(links, &a);
    return net ? net->dev : -1;
}

static const unsigned char V6_ZERO[16];

/* ipaddress's is_loopback: 127.0.0.0/8, ::1. */
static bool is_loopback(const struct links_addr *a)
{
    if (a->family == 4)
        return a->addr[0] == 127;
    return memcmp(a->addr, V6_ZERO, 15) == 0 && a->addr[15] == 1;
}

/* ipaddress's is_unspecified: 0.0.0.0, ::. */
static bool is_unspecified(const struct links_addr *a)
{
    return memcmp(a->addr, V6_ZERO, (size_t)addr_len(a->family)) == 0;
}

/* ipaddress's is_multicast: 224.0.0.0/4, ff00::/8. */
static bool is_multicast(const struct links_addr *a)
{
    if (a->family == 4)
        return (a->addr[0] & 0xf0) == 0xe0;
    return a->addr[0] == 0xff;
}

int uproxy_transparent_source(const struct uproxy_links *links, int family,
                              const unsigned char *client, const unsigned char *endpoint,
                              int external, int external_local, int endpoint_here)
{
    struct links_addr c, e;
    if (links == NULL || !to_addr(family, client, &c) || !to_addr(family, endpoint, &e))
        return 0;
    if (c.family != e.family)
        return 0; /* a mapped client against an IPv6 endpoint, or the reverse */
    if (external && !external_local)
        return 0; /* kube-proxy masquerades external traffic under policy Cluster */
    if (addr_eq(&c, &e))
        return 0; /* hairpin */
    if (is_loopback(&c) || is_unspecified(&c) || is_multicast(&c) || is_local(links, &c))
        return 0; /* the node's own traffic */
    if (is_loopback(&e) || is_local(links, &e))
        return 0; /* a host-network endpoint: replies never pass PREROUTING */
    const struct links_net *client_net = net_of(links, &c);
    const struct links_net *endpoint_net = net_of(links, &e);
    if (endpoint_here && endpoint_net == NULL)
        return 0; /* its link is not known yet (uproxy_links_dev_of says -1) */
    if (client_net != NULL && endpoint_net != NULL && client_net->dev == endpoint_net->dev)
        return 0; /* the same link: the endpoint answers the client over L2 */
    if (!endpoint_here && (client_net == NULL || client_net->uplink))
        return 0; /* only this node's pods get replies from another node back here */
    return 1;
}
