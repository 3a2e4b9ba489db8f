/* A sanitizer run of native/transparent.c (tests/core/test_transparent_native.py builds
 * it with -fsanitize=address,undefined and with -fsanitize=thread).
 *
 * Builds a uproxy_links as large as a busy node's (thousands of local addresses, as
 * an IPVS-mode node holds every ClusterIP; hundreds of on-link routes, nested, both
 * families, lengths off byte boundaries), answers a fixed set of queries on one
 * thread, then has several threads answer them again at once on the same object:
 * every answer must be the same, and the sanitizers must stay quiet (no race: the
 * object is read-only once built; no out-of-bounds read; nothing leaked).
 * The answers' correctness is the Python parity test's job, not this one's.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "uproxy_native.h"

#define QUERIES 5000
#define THREADS 4

struct query {
    int family;
    unsigned char client[16], endpoint[16];
    int external, external_local, here;
    int answer, client_dev;
};

static struct uproxy_links *links;
static struct query queries[QUERIES];

static unsigned long long state = 0x9e3779b97f4a7c15ULL;

static unsigned rnd(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (unsigned)(state >> 16);
}

/* An address in a small space (10.0.x.y, fd00::xxxx:yyyy) so prefixes overlap;
 * sometimes IPv4-mapped when family is 6. */
static void address(int family, unsigned char *out)
{
    memset(out, 0, 16);
    unsigned r = rnd();
    if (family == 4) {
        out[0] = 10;
        out[2] = (unsigned char)(r & 0x0f);
        out[3] = (unsigned char)(r >> 8);
    } else if (r % 8 == 0) {
        out[10] = out[11] = 0xff;
        out[12] = 10;
        out[14] = (unsigned char)((r >> 4) & 0x0f);
        out[15] = (unsigned char)(r >> 12);
    } else {
        out[0] = 0xfd;
        out[13] = (unsigned char)(r & 0x0f);
        out[14] = (unsigned char)(r >> 8);
        out[15] = (unsigned char)(r >> 16);
    }
}

static int answer(const struct query *q)
{
    return uproxy_transparent_source(links, q->family, q->client, q->endpoint, q->external,
                                     q->external_local, q->here);
}

static void *reader(void *arg)
{
    long bad = 0;
    (void)arg;
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < QUERIES; i++) {
            const struct query *q = &queries[i];
            if (answer(q) != q->answer
                || uproxy_links_dev_of(links, q->family, q->client) != q->client_dev)
                bad++;
        }
    }
    return (void *)bad;
}

int main(void)
{
    links = uproxy_links_new();
    if (links == NULL)
        return 2;
    for (int i = 0; i < 3000; i++) {
        int family = i % 3 == 0 ? 6 : 4;
        unsigned char a[16];
        address(family, a);
        if (family == 6 && a[10] == 0xff)
            continue;
        if (uproxy_links_add_local(links, family, a) != 0)
            return 2;
    }
    for (int i = 0; i < 400; i++) {
        int family = i % 2 ? 6 : 4;
        unsigned char p[16];
        address(family, p);
        if (family == 6 && p[10] == 0xff)
            continue;
        int len = family == 4 ? 25 + (int)(rnd() % 8) : 108 + (int)(rnd() % 21);
        if (uproxy_links_add_onlink(links, family, p, len, (int)(rnd() % 12), rnd() % 4 == 0) != 0)
            return 2;
    }
    int transparent = 0, on_link = 0;
    for (int i = 0; i < QUERIES; i++) {
        struct query *q = &queries[i];
        q->family = i % 2 ? 6 : 4;
        address(q->family, q->client);
        if (rnd() % 10 == 0)
            memcpy(q->endpoint, q->client, 16);
        else
            address(q->family, q->endpoint);
        q->external = (int)(rnd() % 2);
        q->external_local = (int)(rnd() % 2);
        q->here = (int)(rnd() % 2);
        q->answer = answer(q);
        q->client_dev = uproxy_links_dev_of(links, q->family, q->client);
        transparent += q->answer;
        on_link += q->client_dev >= 0;
    }
    pthread_t threads[THREADS];
    for (int t = 0; t < THREADS; t++) {
        if (pthread_create(&threads[t], NULL, reader, NULL) != 0)
            return 2;
    }
    long bad = 0;
    for (int t = 0; t < THREADS; t++) {
        void *got;
        pthread_join(threads[t], &got);
        bad += (long)got;
    }
    uproxy_links_free(links);
    if (bad != 0 || transparent == 0 || transparent == QUERIES || on_link == 0) {
        fprintf(stderr, "bad answers: %ld, transparent: %d of %d\n", bad, transparent, QUERIES);
        return 1;
    }
    printf("%d queries ok (%d transparent, %d clients on-link), %d threads\n", QUERIES,
           transparent, on_link, THREADS);
    return 0;
}
