/* The engine's ClientIP pin table (native/affinity.c); internal to the engine:
 * Python reaches it through the uproxy_engine_affinity_* calls of relay.c. */
#ifndef UPROXY_AFFINITY_H
#define UPROXY_AFFINITY_H

#include <stdint.h>

#include "uproxy_native.h"

struct uproxy_affinity;

/* A client of an affinity group: address of `family` 4 or 6 (4 or 16 bytes used). */
struct uproxy_affinity_key {
    uint32_t group;
    int family;
    uint8_t addr[16];
};

/* An endpoint: address of `family` 4 or 6, port in host order. */
struct uproxy_affinity_ep {
    int family;
    uint8_t addr[16];
    uint16_t port;
};

struct uproxy_affinity *uproxy_affinity_new(void);
void uproxy_affinity_free(struct uproxy_affinity *a);

/* 1 and the pinned endpoint in `out` when the client's pin was used within
 * `timeout_ms` (the group's current timeout); an expired pin is freed (0). */
int uproxy_affinity_lookup(struct uproxy_affinity *a, const struct uproxy_affinity_key *k,
                           int64_t now_ms, int64_t timeout_ms, struct uproxy_affinity_ep *out);

/* Pin the client to `ep` (or refresh its pin), last used now. */
void uproxy_affinity_pin(struct uproxy_affinity *a, const struct uproxy_affinity_key *k,
                         const struct uproxy_affinity_ep *ep, int64_t now_ms, int64_t timeout_ms);

/* Drop the client's pin (only when it is to `ep`, if not NULL). */
void uproxy_affinity_drop(struct uproxy_affinity *a, const struct uproxy_affinity_key *k,
                          const struct uproxy_affinity_ep *ep);

/* Free the expired pins of the next `buckets` buckets (a cursor walks the table). */
void uproxy_affinity_sweep_some(struct uproxy_affinity *a, int64_t now_ms, size_t buckets);

/* Free the expired pins / every pin of `group`; how many were freed. */
int uproxy_affinity_sweep(struct uproxy_affinity *a, int64_t now_ms);
int uproxy_affinity_forget(struct uproxy_affinity *a, uint32_t group);
int uproxy_affinity_count(struct uproxy_affinity *a);

/* The pins not expired (up to `max` into `out`); returns how many there are. */
int uproxy_affinity_export(struct uproxy_affinity *a, struct uproxy_pin *out, int max,
                           int64_t now_ms);
/* Pin each valid one (last use now - idle); returns how many were taken. */
int uproxy_affinity_import(struct uproxy_affinity *a, const struct uproxy_pin *pins, int n,
                           int64_t now_ms);

#endif
