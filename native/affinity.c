/* ClientIP session affinity for the engine's connection set-up: the pin table.
 *
 * The C twin of uproxy.balance.Balancer's pins: (affinity group, client address)
 * -> endpoint address and last use. The group is the service port (Python numbers
 * them): every listener of one service port, of either family, shares its pins.
 * A pin is used when it was used within the timeout and its endpoint is still
 * among the listener's usable ones (addresses compared; relay.c decides that),
 * and every use refreshes it. Expired pins are freed lazily (a lookup that finds
 * one) and by uproxy_affinity_sweep (Python calls it at every sync), so the table
 * holds at most the clients of the last timeout. The engine thread sweeps a few
 * buckets after each accept batch (uproxy_affinity_sweep_some), so the table keeps
 * pace with the pins it makes without a long hold of the lock.
 *
 * Memory: one malloc'd struct pin per client (64 bytes) plus one bucket pointer
 * (load factor <= 1): 88 bytes of RSS a pin with the allocator's header (measured
 * with 1,000,000 pins). A lookup and its refresh cost about 130 ns with 1,000 pins.
 *
 * One mutex: the engine thread looks up and pins, the event loop thread exports,
 * imports, sweeps and forgets groups. Uncontended but for those rare calls.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "affinity.h"

struct pin {
    struct pin *next;
    int64_t last_ms;     /* CLOCK_MONOTONIC ms of the last use */
    uint32_t group;
    uint32_t timeout_ms; /* the group's timeout when last used (for the sweep) */
    uint16_t ep_port;    /* host order */
    uint8_t cfam, efam;  /* 4 or 6 */
    uint8_t client[16];
    uint8_t ep[16];
};

struct uproxy_affinity {
    pthread_mutex_t lock;
    struct pin **b;
    size_t nb, n;
    size_t sweep_at; /* uproxy_affinity_sweep_some's cursor */
};

static uint64_t pin_hash(uint32_t group, int cfam, const uint8_t *client)
{
    /* FNV-1a then a final mix: client addresses are not chosen by an attacker
     * to collide beyond what a per-service bucket chain tolerates. */
    uint64_t h = 1469598103934665603ull ^ group;
    h *= 1099511628211ull;
    int len = cfam == 6 ? 16 : 4;
    for (int i = 0; i < len; i++) {
        h ^= client[i];
        h *= 1099511628211ull;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h;
}

struct uproxy_affinity *uproxy_affinity_new(void)
{
    struct uproxy_affinity *a = calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->nb = 64;
    a->b = calloc(a->nb, sizeof *a->b);
    if (!a->b || pthread_mutex_init(&a->lock, NULL) != 0) {
        free(a->b);
        free(a);
        return NULL;
    }
    return a;
}

void uproxy_affinity_free(struct uproxy_affinity *a)
{
    if (!a)
        return;
    for (size_t i = 0; i < a->nb; i++) {
        struct pin *p = a->b[i];
        while (p) {
            struct pin *next = p->next;
            free(p);
            p = next;
        }
    }
    free(a->b);
    pthread_mutex_destroy(&a->lock);
    free(a);
}

/* The slot pointing at the pin of (group, client), or at the NULL ending its chain. */
static struct pin **pin_slot(struct uproxy_affinity *a, uint32_t group, int cfam,
                             const uint8_t *client)
{
    struct pin **pp = &a->b[pin_hash(group, cfam, client) & (a->nb - 1)];
    int len = cfam == 6 ? 16 : 4;
    for (; *pp; pp = &(*pp)->next) {
        struct pin *p = *pp;
        if (p->group == group && p->cfam == cfam && memcmp(p->client, client, len) == 0)
            break;
    }
    return pp;
}

static void grow(struct uproxy_affinity *a)
{
    size_t nb = a->nb * 2;
    struct pin **b = calloc(nb, sizeof *b);
    if (!b)
        return; /* longer chains, still correct */
    for (size_t i = 0; i < a->nb; i++) {
        struct pin *p = a->b[i];
        while (p) {
            struct pin *next = p->next;
            struct pin **slot = &b[pin_hash(p->group, p->cfam, p->client) & (nb - 1)];
            p->next = *slot;
            *slot = p;
            p = next;
        }
    }
    free(a->b);
    a->b = b;
    a->nb = nb;
}

static void pin_fill(struct pin *p, const struct uproxy_affinity_key *k,
                     const struct uproxy_affinity_ep *ep, int64_t last_ms, int64_t timeout_ms)
{
    p->group = k->group;
    p->cfam = (uint8_t)k->family;
    memset(p->client, 0, sizeof p->client);
    memcpy(p->client, k->addr, k->family == 6 ? 16 : 4);
    p->efam = (uint8_t)ep->family;
    memset(p->ep, 0, sizeof p->ep);
    memcpy(p->ep, ep->addr, ep->family == 6 ? 16 : 4);
    p->ep_port = ep->port;
    p->last_ms = last_ms;
    p->timeout_ms = timeout_ms > UINT32_MAX ? UINT32_MAX : (uint32_t)timeout_ms;
}

/* Insert or overwrite; false on ENOMEM. Under the lock. */
static bool pin_put(struct uproxy_affinity *a, const struct uproxy_affinity_key *k,
                    const struct uproxy_affinity_ep *ep, int64_t last_ms, int64_t timeout_ms)
{
    struct pin **pp = pin_slot(a, k->group, k->family, k->addr);
    struct pin *p = *pp;
    if (p) {
        pin_fill(p, k, ep, last_ms, timeout_ms);
        return true;
    }
    p = malloc(sizeof *p);
    if (!p)
        return false;
    pin_fill(p, k, ep, last_ms, timeout_ms); /* (before grow() rehashes it) */
    p->next = NULL;
    *pp = p;
    if (++a->n > a->nb)
        grow(a);
    return true;
}

static void pin_unlink(struct uproxy_affinity *a, struct pin **pp)
{
    struct pin *p = *pp;
    *pp = p->next;
    free(p);
    a->n--;
}

int uproxy_affinity_lookup(struct uproxy_affinity *a, const struct uproxy_affinity_key *k,
                           int64_t now_ms, int64_t timeout_ms, struct uproxy_affinity_ep *out)
{
    pthread_mutex_lock(&a->lock);
    struct pin **pp = pin_slot(a, k->group, k->family, k->addr);
    struct pin *p = *pp;
    int found = 0;
    if (p && now_ms - p->last_ms <= timeout_ms) {
        out->family = p->efam;
        memcpy(out->addr, p->ep, sizeof out->addr);
        out->port = p->ep_port;
        found = 1;
    } else if (p) {
        pin_unlink(a, pp); /* expired */
    }
    pthread_mutex_unlock(&a->lock);
    return found;
}

void uproxy_affinity_pin(struct uproxy_affinity *a, const struct uproxy_affinity_key *k,
                         const struct uproxy_affinity_ep *ep, int64_t now_ms, int64_t timeout_ms)
{
    pthread_mutex_lock(&a->lock);
    pin_put(a, k, ep, now_ms, timeout_ms); /* no memory: this client just is not pinned */
    pthread_mutex_unlock(&a->lock);
}

static bool ep_equal(const struct pin *p, const struct uproxy_affinity_ep *ep)
{
    return p->efam == ep->family && p->ep_port == ep->port &&
           memcmp(p->ep, ep->addr, ep->family == 6 ? 16 : 4) == 0;
}

void uproxy_affinity_drop(struct uproxy_affinity *a, const struct uproxy_affinity_key *k,
                          const struct uproxy_affinity_ep *ep)
{
    pthread_mutex_lock(&a->lock);
    struct pin **pp = pin_slot(a, k->group, k->family, k->addr);
    if (*pp && (!ep || ep_equal(*pp, ep)))
        pin_unlink(a, pp);
    pthread_mutex_unlock(&a->lock);
}

/* Buckets walked per hold of the lock by a sweep: the engine thread, choosing for a
 * client meanwhile, waits for at most that many (a sweep of 1,000,000 pins in one
 * hold took 270 ms). */
#define SWEEP_CHUNK 1024

/* Free the pins matching: expired by now (sweep), or of `group` (forget). A table
 * that grows between two chunks may have a few pins skipped: they go at the next
 * sweep (or the next lookup finds them expired). */
static int remove_if(struct uproxy_affinity *a, int64_t now_ms, bool by_group, uint32_t group)
{
    int freed = 0;
    pthread_mutex_lock(&a->lock);
    for (size_t i = 0; i < a->nb; i++) {
        if (i && i % SWEEP_CHUNK == 0) {
            pthread_mutex_unlock(&a->lock);
            pthread_mutex_lock(&a->lock);
            if (i >= a->nb)
                break;
        }
        struct pin **pp = &a->b[i];
        while (*pp) {
            struct pin *p = *pp;
            bool gone = by_group ? p->group == group : now_ms - p->last_ms > (int64_t)p->timeout_ms;
            if (gone) {
                pin_unlink(a, pp);
                freed++;
            } else {
                pp = &p->next;
            }
        }
    }
    pthread_mutex_unlock(&a->lock);
    return freed;
}

void uproxy_affinity_sweep_some(struct uproxy_affinity *a, int64_t now_ms, size_t buckets)
{
    pthread_mutex_lock(&a->lock);
    if (a->n) {
        for (size_t k = 0; k < buckets && k < a->nb; k++) {
            size_t i = a->sweep_at++ & (a->nb - 1);
            struct pin **pp = &a->b[i];
            while (*pp) {
                if (now_ms - (*pp)->last_ms > (int64_t)(*pp)->timeout_ms)
                    pin_unlink(a, pp);
                else
                    pp = &(*pp)->next;
            }
        }
    }
    pthread_mutex_unlock(&a->lock);
}

int uproxy_affinity_sweep(struct uproxy_affinity *a, int64_t now_ms)
{
    return remove_if(a, now_ms, false, 0);
}

int uproxy_affinity_forget(struct uproxy_affinity *a, uint32_t group)
{
    return remove_if(a, 0, true, group);
}

int uproxy_affinity_count(struct uproxy_affinity *a)
{
    pthread_mutex_lock(&a->lock);
    int n = (int)a->n;
    pthread_mutex_unlock(&a->lock);
    return n;
}

int uproxy_affinity_export(struct uproxy_affinity *a, struct uproxy_pin *out, int max,
                           int64_t now_ms)
{
    pthread_mutex_lock(&a->lock);
    int n = 0;
    for (size_t i = 0; i < a->nb; i++) {
        for (struct pin *p = a->b[i]; p; p = p->next) {
            if (now_ms - p->last_ms > (int64_t)p->timeout_ms)
                continue; /* expired: not worth handing over */
            if (n < max) {
                struct uproxy_pin *o = &out[n];
                memset(o, 0, sizeof *o);
                o->group = (int)p->group;
                o->family = p->cfam;
                memcpy(o->client, p->client, sizeof o->client);
                o->endpoint_family = p->efam;
                memcpy(o->endpoint, p->ep, sizeof o->endpoint);
                o->endpoint_port = p->ep_port;
                o->idle = (double)(now_ms - p->last_ms) / 1000.0;
                o->timeout = (double)p->timeout_ms / 1000.0;
            }
            n++;
        }
    }
    pthread_mutex_unlock(&a->lock);
    return n;
}

int uproxy_affinity_import(struct uproxy_affinity *a, const struct uproxy_pin *pins, int n,
                           int64_t now_ms)
{
    int done = 0;
    pthread_mutex_lock(&a->lock);
    for (int i = 0; i < n; i++) {
        const struct uproxy_pin *p = &pins[i];
        if ((p->family != 4 && p->family != 6) ||
            (p->endpoint_family != 4 && p->endpoint_family != 6) || p->group < 0 ||
            p->endpoint_port < 0 || p->endpoint_port > 65535 || p->timeout <= 0)
            continue;
        struct uproxy_affinity_key k = {.group = (uint32_t)p->group, .family = p->family};
        memcpy(k.addr, p->client, sizeof k.addr);
        struct uproxy_affinity_ep ep = {.family = p->endpoint_family,
                                        .port = (uint16_t)p->endpoint_port};
        memcpy(ep.addr, p->endpoint, sizeof ep.addr);
        int64_t idle = p->idle > 0 ? (int64_t)(p->idle * 1000.0 + 0.5) : 0;
        if (pin_put(a, &k, &ep, now_ms - idle, (int64_t)(p->timeout * 1000.0 + 0.5)))
            done++;
    }
    pthread_mutex_unlock(&a->lock);
    return done;
}
