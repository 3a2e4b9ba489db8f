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
 *   local addresses: a hash set (an IPVS-mode node holds every ClusterIP as a
 *                    local address: thousands of them);
 *   on-link prefixes: a hash table keyed by (family, length, masked prefix), and
 *                    per family the lengths present, longest first. A lookup masks
 *                    the address to each length in turn and probes: the first hit
 *                    is the longest matching prefix, at a cost that grows with the
 *                    number of distinct lengths (a handful), not of routes (Calico
 *                    adds one /32 per pod). Two routes of one length that hold the
 *                    same address have the same masked prefix: the first added is
 *                    kept, as NodeLinks' stable sort makes the first one win.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "uproxy_native.h"

/* A local address (prefixlen 0) or an on-link prefix (prefixlen >= 0, masked). */
struct links_entry {
    uint8_t family; /* 4 or 6; 0 marks an empty slot */
    uint8_t prefixlen;
    bool uplink;
    int dev;
    unsigned char addr[16]; /* IPv4 in the first 4 bytes, the rest zero */
};

/* Open addressing, linear probing, at most half full (probes stay short and there
 * is always an empty slot to stop at). */
struct links_table {
    struct links_entry *slots;
    size_t cap, count; /* cap: 0 or a power of two */
};

struct uproxy_links {
    struct links_table local;
    struct links_table nets;
    /* The prefix lengths present, longest first: [0] IPv4, [1] IPv6. */
    uint8_t lens[2][129];
    int nlens[2];
    int refs; /* atomic: the engines of a group share one (uproxy_links_ref) */
};

static int addr_len(int family)
{
    return family == 4 ? 4 : family == 6 ? 16 : 0;
}

struct uproxy_links *uproxy_links_new(void)
{
    struct uproxy_links *links = calloc(1, sizeof(struct uproxy_links));
    if (links)
        links->refs = 1;
    return links;
}

struct uproxy_links *uproxy_links_ref(struct uproxy_links *links)
{
    if (links)
        __atomic_add_fetch(&links->refs, 1, __ATOMIC_RELAXED);
    return links;
}

void uproxy_links_free(struct uproxy_links *links)
{
    if (links == NULL || __atomic_sub_fetch(&links->refs, 1, __ATOMIC_ACQ_REL) > 0)
        return;
    free(links->local.slots);
    free(links->nets.slots);
    free(links);
}

static size_t entry_hash(const struct links_entry *e)
{
    uint64_t h = 1469598103934665603ULL;
    h = (h ^ e->family) * 1099511628211ULL;
    h = (h ^ e->prefixlen) * 1099511628211ULL;
    for (int i = 0; i < addr_len(e->family); i++)
        h = (h ^ e->addr[i]) * 1099511628211ULL;
    /* FNV's low bits mix poorly; finish with murmur3's fmix64 (the index is the low bits). */
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return (size_t)h;
}

static bool entry_key_eq(const struct links_entry *a, const struct links_entry *b)
{
    return a->family == b->family && a->prefixlen == b->prefixlen
        && memcmp(a->addr, b->addr, 16) == 0;
}

/* The slot holding `key`, or the empty slot where it would go. */
static struct links_entry *table_slot(const struct links_table *t, const struct links_entry *key)
{
    size_t mask = t->cap - 1;
    for (size_t i = entry_hash(key) & mask;; i = (i + 1) & mask) {
        if (t->slots[i].family == 0 || entry_key_eq(&t->slots[i], key))
            return &t->slots[i];
    }
}

static const struct links_entry *table_find(const struct links_table *t,
                                            const struct links_entry *key)
{
    if (t->count == 0)
        return NULL;
    const struct links_entry *slot = table_slot(t, key);
    return slot->family != 0 ? slot : NULL;
}

/* Adds `e` unless its key is there already (the first one added stays). */
static int table_add(struct links_table *t, const struct links_entry *e)
{
    if ((t->count + 1) * 2 > t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 16;
        struct links_table grown = {.slots = calloc(cap, sizeof(struct links_entry)),
                                    .cap = cap, .count = t->count};
        if (grown.slots == NULL)
            return -ENOMEM;
        for (size_t i = 0; i < t->cap; i++) {
            if (t->slots[i].family != 0)
                *table_slot(&grown, &t->slots[i]) = t->slots[i];
        }
        free(t->slots);
        *t = grown;
    }
    struct links_entry *slot = table_slot(t, e);
    if (slot->family == 0) {
        *slot = *e;
        t->count++;
    }
    return 0;
}

/* Zero the bits of `addr` past `prefixlen`. */
static void mask_to(unsigned char *addr, int len, int prefixlen)
{
    for (int i = 0; i < len; i++) {
        int keep = prefixlen - i * 8;
        if (keep <= 0)
            addr[i] = 0;
        else if (keep < 8)
            addr[i] &= (unsigned char)(0xff << (8 - keep));
    }
}

int uproxy_links_add_local(struct uproxy_links *links, int family, const unsigned char *addr)
{
    int len = addr_len(family);
    if (links == NULL || len == 0 || addr == NULL)
        return -EINVAL;
    struct links_entry e = {.family = (uint8_t)family};
    memcpy(e.addr, addr, (size_t)len);
    return table_add(&links->local, &e);
}

int uproxy_links_add_onlink(struct uproxy_links *links, int family, const unsigned char *prefix,
                            int prefixlen, int dev, int uplink)
{
    int len = addr_len(family);
    if (links == NULL || len == 0 || prefix == NULL || prefixlen < 0 || prefixlen > len * 8
        || dev < 0)
        return -EINVAL;
    struct links_entry e = {.family = (uint8_t)family, .prefixlen = (uint8_t)prefixlen,
                            .uplink = uplink != 0, .dev = dev};
    memcpy(e.addr, prefix, (size_t)len);
    mask_to(e.addr, len, prefixlen); /* as ipaddress.ip_network(strict=False) */
    int rc = table_add(&links->nets, &e);
    if (rc < 0)
        return rc;
    uint8_t *lens = links->lens[family == 6];
    int *n = &links->nlens[family == 6], at = 0;
    while (at < *n && lens[at] > prefixlen)
        at++;
    if (at == *n || lens[at] != prefixlen) {
        memmove(&lens[at + 1], &lens[at], (size_t)(*n - at));
        lens[at] = (uint8_t)prefixlen;
        (*n)++;
    }
    return 0;
}

/* The longest on-link prefix holding `a` (family and address of a key), or NULL
 * (routed via a gateway). */
static const struct links_entry *net_of(const struct uproxy_links *links,
                                        const struct links_entry *a)
{
    if (links->nets.count == 0)
        return NULL;
    int len = addr_len(a->family), idx = a->family == 6;
    struct links_entry key = *a;
    for (int i = 0; i < links->nlens[idx]; i++) {
        int prefixlen = links->lens[idx][i];
        /* Longest first: each step only clears more bits of the same key. */
        mask_to(key.addr, len, prefixlen);
        key.prefixlen = (uint8_t)prefixlen;
        const struct links_entry *hit = table_find(&links->nets, &key);
        if (hit != NULL)
            return hit;
    }
    return NULL;
}

static const unsigned char V4_MAPPED[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

/* `addr` of `family` as the decision sees it: an IPv4-mapped IPv6 address
 * (::ffff:a.b.c.d, a v4 client on a dual-stack socket) is the IPv4 address, as
 * uproxy.transparent._address makes it. False for a family other than 4 or 6. */
static bool to_addr(int family, const unsigned char *addr, struct links_entry *out)
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
    struct links_entry a;
    if (links == NULL || !to_addr(family, addr, &a))
        return -1;
    const struct links_entry *net = net_of(links, &a);
    return net ? net->dev : -1;
}

static bool is_local(const struct uproxy_links *links, const struct links_entry *a)
{
    return table_find(&links->local, a) != NULL;
}

static const unsigned char V6_ZERO[16];

/* ipaddress's is_loopback: 127.0.0.0/8, ::1. */
static bool is_loopback(const struct links_entry *a)
{
    if (a->family == 4)
        return a->addr[0] == 127;
    return memcmp(a->addr, V6_ZERO, 15) == 0 && a->addr[15] == 1;
}

/* ipaddress's is_unspecified: 0.0.0.0, ::. */
static bool is_unspecified(const struct links_entry *a)
{
    return memcmp(a->addr, V6_ZERO, (size_t)addr_len(a->family)) == 0;
}

/* ipaddress's is_multicast: 224.0.0.0/4, ff00::/8. */
static bool is_multicast(const struct links_entry *a)
{
    if (a->family == 4)
        return (a->addr[0] & 0xf0) == 0xe0;
    return a->addr[0] == 0xff;
}

int uproxy_transparent_source(const struct uproxy_links *links, int family,
                              const unsigned char *client, const unsigned char *endpoint,
                              int external, int external_local, int endpoint_here)
{
    struct links_entry c, e;
    if (links == NULL || !to_addr(family, client, &c) || !to_addr(family, endpoint, &e))
        return 0;
    if (c.family != e.family)
        return 0; /* a mapped client against an IPv6 endpoint, or the reverse */
    if (external && !external_local)
        return 0; /* kube-proxy masquerades external traffic under policy Cluster */
    if (entry_key_eq(&c, &e))
        return 0; /* hairpin */
    if (is_loopback(&c) || is_unspecified(&c) || is_multicast(&c) || is_local(links, &c))
        return 0; /* the node's own traffic */
    if (is_loopback(&e) || is_local(links, &e))
        return 0; /* a host-network endpoint: replies never pass PREROUTING */
    const struct links_entry *client_net = net_of(links, &c);
    const struct links_entry *endpoint_net = net_of(links, &e);
    if (endpoint_here && endpoint_net == NULL)
        return 0; /* its link is not known yet (uproxy_links_dev_of says -1) */
    if (client_net != NULL && endpoint_net != NULL && client_net->dev == endpoint_net->dev)
        return 0; /* the same link: the endpoint answers the client over L2 */
    if (!endpoint_here && (client_net == NULL || client_net->uplink))
        return 0; /* only this node's pods get replies from another node back here */
    return 1;
}
