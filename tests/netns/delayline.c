/*
 * delayline: the userspace link emulator of the mqvpn namespace testbed.
 *
 * The kernel of the test machines has no netem, so delay, loss and friends are done here.  One
 * process serves one emulated path and bridges two interfaces of the router namespace at layer 2
 * with AF_PACKET sockets:
 *
 *     up:   frames received on IF_A  -> held, impaired -> sent out of IF_B
 *     down: frames received on IF_B  -> held, impaired -> sent out of IF_A
 *
 * Every frame is held until its due time (arrival + delay +- jitter) in a min-heap, so reordering
 * falls out naturally.  Frames are sent through the qdisc of the output interface, so a tbf there
 * acts as the bottleneck queue after the delay (its tail drops come back here as ENOBUFS and are
 * counted as drop_tx).
 *
 * Each direction has its own thread (epoll + timerfd on CLOCK_MONOTONIC).  When traffic flows its
 * socket is not watched by epoll but drained with recvmmsg() every poll period (500 us), and due
 * frames go out with sendmmsg() in batches on that grid (+-poll/2), so the number of wakeups is
 * bounded whatever the packet rate.  Arrival times come from kernel receive timestamps, so the
 * polling does not add to the delay.  When idle, a thread sleeps in epoll and a frame wakes it.
 * The kernel runs what follows a sent frame (forwarding, the receiver's stack) inside sendmmsg(),
 * so under load the threads need real-time priority (--rt) to stay on time.
 *
 * Control: text commands, one per line, on stdin; one reply line each on stdout.  EOF on stdin
 * ends the process (so it never outlives the test that started it).
 *
 *   set up|down|both key=value...   delay jitter (ms)  loss  burst_p  burst_len  reorder
 *                                   reorder_ms  dup  corrupt (probabilities 0..1)  limit (packets)
 *                                   blackhole (0/1)  drop_next (packets)  seed
 *   get                             parameters as JSON
 *   stats                           counters as JSON
 *   reset                           zero the counters
 *   ping                            "ok"
 *   quit
 *
 *   stats also has, per direction: late_sum_us/late_max_us (how late frames went out),
 *   wakeups, busy_us, loop_max_us, ts_fallback (frames without a usable kernel timestamp).
 *
 * Other mode:  delayline offload IF...  turns checksum/segmentation/GRO offloads off (no ethtool
 * binary on the test machines), so frames on the path are real wire-sized frames with complete
 * checksums.  (IF+gro leaves GRO on.)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <linux/ethtool.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_DRAIN 1024 /* frames per socket per wakeup before the other work gets a turn */

static uint64_t poll_ns = 500000;   /* drain period while traffic flows */
static uint64_t window_ns = 200000; /* frames due within +-window/2 of a wakeup go out together */
static size_t slot_size = 2048;     /* bytes of frame a buffer holds */
static int rt_prio;                 /* SCHED_FIFO priority of the worker threads (0: normal) */

/* ------------------------------------------------------------------------------------------ */

static uint64_t now_ns(clockid_t c)
{
    struct timespec ts;
    clock_gettime(c, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

struct rng {
    uint64_t s[4];
};

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(struct rng *r) /* xoshiro256** */
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

static void rng_seed(struct rng *r, uint64_t seed)
{
    for (int i = 0; i < 4; i++) { /* splitmix64 */
        uint64_t z = (seed += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        r->s[i] = z ^ (z >> 31);
    }
}

static double uniform(struct rng *r) { return (double)(rng_next(r) >> 11) * 0x1.0p-53; }

static int chance(struct rng *r, double p) { return p > 0 && (p >= 1 || uniform(r) < p); }

/* ------------------------------------------------------------------------------------------ */

struct pkt {
    uint64_t due;
    uint64_t seq;
    uint32_t len;
    unsigned char data[];
};

struct pool { /* free buffers; one per direction, so no locking */
    struct pkt **free;
    size_t n, cap;
};

static struct pkt *pkt_get(struct pool *pl)
{
    if (pl->n)
        return pl->free[--pl->n];
    struct pkt *p = malloc(sizeof(struct pkt) + slot_size);
    if (!p) {
        perror("malloc");
        exit(3);
    }
    return p;
}

static void pkt_put(struct pool *pl, struct pkt *p)
{
    if (pl->n == pl->cap) {
        pl->cap = pl->cap ? pl->cap * 2 : 256;
        pl->free = realloc(pl->free, pl->cap * sizeof *pl->free);
        if (!pl->free) {
            perror("realloc");
            exit(3);
        }
    }
    pl->free[pl->n++] = p;
}

struct params {
    double delay_ms, jitter_ms, loss, burst_p, burst_len, reorder, reorder_ms, dup, corrupt;
    long limit, drop_next;
    int blackhole;
};

#define STATS(X)                                                                                   \
    X(rx) X(rx_bytes) X(tx) X(tx_bytes) X(drop_loss) X(drop_burst) X(drop_blackhole)                 \
    X(drop_next) X(drop_limit) X(drop_tx) X(drop_trunc) X(dup) X(corrupt) X(reorder) X(control)       \
    X(oversize) X(qlen) X(qmax) X(late_max_us) X(late_sum_us) X(wakeups) X(busy_us) X(loop_max_us) X(ts_fallback)

struct stats {
#define X(n) uint64_t n;
    STATS(X)
#undef X
};

/* One direction: its own thread, receive socket, heap, timer, pool and random generator.  The
 * lock guards params, stats, and the heap against the control thread. */
struct dir {
    const char *name;
    int rx, tx; /* socket indices */
    pthread_mutex_t lock;
    struct params p;
    struct stats s;
    struct pkt **heap;
    size_t n, cap;
    uint64_t seq, last_due;
    int in_burst, polling, ep, tfd;
    struct rng rng;
    struct pool pool;
};

static int sock[2], ifindex[2], mtu[2];
static const char *ifname[2];
static struct dir dirs[2];

static int before(const struct pkt *a, const struct pkt *b)
{
    return a->due < b->due || (a->due == b->due && a->seq < b->seq);
}

static void heap_push(struct dir *d, struct pkt *p)
{
    if (d->n == d->cap) {
        d->cap = d->cap ? d->cap * 2 : 1024;
        d->heap = realloc(d->heap, d->cap * sizeof *d->heap);
        if (!d->heap) {
            perror("realloc");
            exit(3);
        }
    }
    size_t i = d->n++;
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (!before(p, d->heap[up]))
            break;
        d->heap[i] = d->heap[up];
        i = up;
    }
    d->heap[i] = p;
    if (d->n > d->s.qmax)
        d->s.qmax = d->n;
}

static struct pkt *heap_pop(struct dir *d)
{
    struct pkt *top = d->heap[0], *last = d->heap[--d->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= d->n)
            break;
        if (c + 1 < d->n && before(d->heap[c + 1], d->heap[c]))
            c++;
        if (!before(d->heap[c], last))
            break;
        d->heap[i] = d->heap[c];
        i = c;
    }
    if (d->n)
        d->heap[i] = last;
    return top;
}

/* ------------------------------------------------------------------------------------------ */
/* Corruption: flip one bit of the transport payload (UDP, TCP, ICMP, ICMPv6) and patch the
 * transport checksum (RFC 1624), so the packet is delivered and the application sees the damage
 * (for QUIC: an AEAD failure), instead of the kernel dropping it as a bad checksum. */

static int corrupt_frame(struct rng *r, unsigned char *f, size_t len)
{
    size_t l3 = ETH_HLEN, th, end, csum_off, hlen;
    unsigned proto;
    uint16_t et = (uint16_t)(f[12] << 8 | f[13]);
    if (et == ETH_P_IP) {
        if (len < l3 + 20 || (f[l3] >> 4) != 4)
            return 0;
        size_t ihl = (size_t)(f[l3] & 15) * 4, tot = (size_t)(f[l3 + 2] << 8 | f[l3 + 3]);
        if (((f[l3 + 6] & 0x1f) << 8 | f[l3 + 7]) != 0) /* not the first fragment */
            return 0;
        proto = f[l3 + 9];
        th = l3 + ihl;
        end = l3 + tot;
    } else if (et == ETH_P_IPV6) {
        if (len < l3 + 40 || (f[l3] >> 4) != 6)
            return 0;
        proto = f[l3 + 6];
        th = l3 + 40;
        end = th + (size_t)(f[l3 + 4] << 8 | f[l3 + 5]);
    } else
        return 0;
    if (end > len)
        return 0;
    switch (proto) {
    case IPPROTO_UDP: hlen = 8, csum_off = 6; break;
    case IPPROTO_TCP:
        if (th + 20 > end)
            return 0;
        hlen = (size_t)(f[th + 12] >> 4) * 4, csum_off = 16;
        break;
    case IPPROTO_ICMP:
    case IPPROTO_ICMPV6: hlen = 8, csum_off = 2; break;
    default: return 0;
    }
    if (th + hlen >= end)
        return 0; /* no payload */
    size_t pos = th + hlen + (size_t)(rng_next(r) % (end - th - hlen));
    size_t w = th + ((pos - th) & ~(size_t)1);
    uint16_t old = (uint16_t)(f[w] << 8 | (w + 1 < end ? f[w + 1] : 0));
    f[pos] ^= (unsigned char)(1u << (rng_next(r) % 8));
    uint16_t new = (uint16_t)(f[w] << 8 | (w + 1 < end ? f[w + 1] : 0));
    unsigned char *c = f + th + csum_off;
    uint16_t hc = (uint16_t)(c[0] << 8 | c[1]);
    if (proto == IPPROTO_UDP && et == ETH_P_IP && hc == 0)
        return 1; /* IPv4 UDP without checksum */
    uint32_t sum = (uint16_t)~hc + (uint32_t)(uint16_t)~old + new;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    hc = (uint16_t)~sum;
    if (proto == IPPROTO_UDP && hc == 0)
        hc = 0xffff;
    c[0] = (unsigned char)(hc >> 8);
    c[1] = (unsigned char)hc;
    return 1;
}

/* Link-local control traffic is spared the random impairments (it is still delayed, queued and
 * blackholed): non-IP frames (ARP), IPv4 224.0.0.0/24 (IGMP and friends), IPv6 ff02::/16 (MLD,
 * multicast ND).  So a test counting its own packets is not disturbed by a stray MLD report. */
static int is_control(const unsigned char *f, size_t len)
{
    uint16_t et = (uint16_t)(f[12] << 8 | f[13]);
    if (et == ETH_P_IP)
        return len < ETH_HLEN + 20 || (f[ETH_HLEN + 16] == 224 && f[ETH_HLEN + 17] == 0 && f[ETH_HLEN + 18] == 0);
    if (et == ETH_P_IPV6)
        return len < ETH_HLEN + 40 || (f[ETH_HLEN + 24] == 0xff && (f[ETH_HLEN + 25] & 0x0f) == 0x02);
    return 1;
}

/* One received frame: drop it (return 0, caller recycles the buffer) or queue it (return 1). */
static int admit(struct dir *d, struct pkt *k, uint64_t arrival)
{
    struct params *p = &d->p;
    d->s.rx++;
    d->s.rx_bytes += k->len;
    if ((size_t)k->len > (size_t)mtu[d->rx] + ETH_HLEN + 4)
        d->s.oversize++; /* a GSO/GRO frame slipped through: offloads are not off */
    if (p->blackhole) {
        d->s.drop_blackhole++;
        return 0;
    }
    int ip = !is_control(k->data, k->len);
    if (!ip)
        d->s.control++;
    if (ip) {
        if (p->drop_next > 0) {
            p->drop_next--;
            d->s.drop_next++;
            return 0;
        }
        if (!d->in_burst && chance(&d->rng, p->burst_p))
            d->in_burst = 1;
        if (d->in_burst) {
            if (p->burst_len <= 1 || chance(&d->rng, 1.0 / p->burst_len))
                d->in_burst = 0;
            d->s.drop_burst++;
            return 0;
        }
        if (chance(&d->rng, p->loss)) {
            d->s.drop_loss++;
            return 0;
        }
    }
    if ((long)d->n >= p->limit) {
        d->s.drop_limit++;
        return 0;
    }
    if (ip && chance(&d->rng, p->corrupt) && corrupt_frame(&d->rng, k->data, k->len))
        d->s.corrupt++;
    double ms = p->delay_ms;
    if (p->jitter_ms > 0)
        ms += (2 * uniform(&d->rng) - 1) * p->jitter_ms;
    if (ms < 0)
        ms = 0;
    uint64_t due = arrival + (uint64_t)(ms * 1e6);
    if (ip && chance(&d->rng, p->reorder)) {
        due += (uint64_t)(p->reorder_ms * 1e6); /* held back: later frames overtake it */
        d->s.reorder++;
    } else {
        if (due < d->last_due)
            due = d->last_due; /* jitter and delay changes keep the order, like a real link */
        d->last_due = due;
    }
    k->due = due;
    k->seq = d->seq++;
    heap_push(d, k);
    if (ip && chance(&d->rng, p->dup) && (long)d->n < p->limit) {
        struct pkt *c = pkt_get(&d->pool);
        memcpy(c, k, sizeof *k + k->len);
        c->seq = d->seq++;
        heap_push(d, c);
        d->s.dup++;
    }
    return 1;
}

/* ------------------------------------------------------------------------------------------ */

/* Read everything waiting on the direction's socket; returns the number of frames read. */
static int drain(struct dir *d)
{
    struct mmsghdr m[BATCH];
    struct iovec iov[BATCH];
    struct pkt *b[BATCH];
    union {
        char buf[CMSG_SPACE(sizeof(struct timespec))];
        struct cmsghdr align;
    } ctl[BATCH];
    int total = 0, errors = 0;
    for (int i = 0; i < BATCH; i++)
        b[i] = pkt_get(&d->pool);
    while (total < MAX_DRAIN) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = b[i]->data;
            iov[i].iov_len = slot_size;
            memset(&m[i].msg_hdr, 0, sizeof m[i].msg_hdr);
            m[i].msg_hdr.msg_iov = &iov[i];
            m[i].msg_hdr.msg_iovlen = 1;
            m[i].msg_hdr.msg_control = ctl[i].buf;
            m[i].msg_hdr.msg_controllen = sizeof ctl[i].buf;
        }
        int n = recvmmsg(sock[d->rx], m, BATCH, MSG_DONTWAIT | MSG_TRUNC, NULL);
        if (n <= 0) {
            if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && ++errors < 4)
                continue; /* ENETDOWN and the like are reported once; read on */
            break;
        }
        uint64_t mono = now_ns(CLOCK_MONOTONIC), real = now_ns(CLOCK_REALTIME);
        pthread_mutex_lock(&d->lock);
        for (int i = 0; i < n; i++) {
            uint64_t arrival = mono;
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&m[i].msg_hdr); c; c = CMSG_NXTHDR(&m[i].msg_hdr, c)) {
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
                    struct timespec ts;
                    memcpy(&ts, CMSG_DATA(c), sizeof ts);
                    uint64_t t = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
                    if (t <= real && real - t < 50000000ull)
                        arrival = mono - (real - t); /* it arrived that long ago */
                    else if (t <= mono + 50000000ull && t + 50000000ull >= mono)
                        arrival = t < mono ? t : mono; /* a monotonic send time (TCP's) kept along */
                    else
                        d->s.ts_fallback++;
                }
            }
            b[i]->len = m[i].msg_len;
            if ((m[i].msg_hdr.msg_flags & MSG_TRUNC) || m[i].msg_len > slot_size || m[i].msg_len < ETH_HLEN) {
                d->s.rx++;
                d->s.drop_trunc++;
                continue;
            }
            if (admit(d, b[i], arrival))
                b[i] = pkt_get(&d->pool);
        }
        pthread_mutex_unlock(&d->lock);
        total += n;
        if (n < BATCH)
            break;
    }
    for (int i = 0; i < BATCH; i++)
        pkt_put(&d->pool, b[i]);
    return total;
}

/* Send every frame due by ``until``.  The heap is only touched under the lock; sendmmsg() runs
 * without it, since it may take long: the kernel processes what follows on the path inline. */
static void release(struct dir *d, uint64_t until)
{
    struct mmsghdr m[BATCH];
    struct iovec iov[BATCH];
    struct pkt *b[BATCH];
    for (;;) {
        int n = 0;
        pthread_mutex_lock(&d->lock);
        while (n < BATCH && d->n && d->heap[0]->due <= until) {
            b[n] = heap_pop(d);
            iov[n].iov_base = b[n]->data;
            iov[n].iov_len = b[n]->len;
            memset(&m[n].msg_hdr, 0, sizeof m[n].msg_hdr);
            m[n].msg_hdr.msg_iov = &iov[n];
            m[n].msg_hdr.msg_iovlen = 1;
            n++;
        }
        pthread_mutex_unlock(&d->lock);
        if (!n)
            return;
        uint64_t sent = 0, bytes = 0, late_sum = 0, late_max = 0, failed = 0;
        int i = 0;
        while (i < n) {
            int r = sendmmsg(sock[d->tx], m + i, (unsigned)(n - i), MSG_DONTWAIT);
            if (r > 0) {
                uint64_t t = now_ns(CLOCK_MONOTONIC);
                for (int j = i; j < i + r; j++) {
                    uint64_t late = t > b[j]->due ? (t - b[j]->due) / 1000 : 0;
                    sent++;
                    bytes += b[j]->len;
                    late_sum += late;
                    if (late > late_max)
                        late_max = late;
                }
                i += r;
            } else if (r < 0 && errno == EINTR) {
                continue;
            } else {
                failed++; /* ENOBUFS: the rate limiter's queue is full; or the link is down */
                i++;
            }
        }
        for (int j = 0; j < n; j++)
            pkt_put(&d->pool, b[j]);
        pthread_mutex_lock(&d->lock);
        d->s.tx += sent;
        d->s.tx_bytes += bytes;
        d->s.late_sum_us += late_sum;
        if (late_max > d->s.late_max_us)
            d->s.late_max_us = late_max;
        d->s.drop_tx += failed;
        pthread_mutex_unlock(&d->lock);
    }
}

/* The thread of one direction. */
static void *worker(void *arg)
{
    struct dir *d = arg;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0};
    epoll_ctl(d->ep, EPOLL_CTL_ADD, sock[d->rx], &ev);
    ev.data.u32 = 1;
    epoll_ctl(d->ep, EPOLL_CTL_ADD, d->tfd, &ev);
    uint64_t armed = 0;
    for (;;) {
        struct epoll_event evs[4];
        int n = epoll_wait(d->ep, evs, 4, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            exit(1);
        }
        uint64_t woke = now_ns(CLOCK_MONOTONIC);
        int ready = 0;
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u32 == 0)
                ready = 1;
            else {
                uint64_t x;
                if (read(d->tfd, &x, sizeof x) < 0) { /* spurious */
                }
                armed = 0;
            }
        }
        /* While traffic flows the socket is not watched but drained every poll period, and frames
         * go out on that grid (within +-poll/2 of their due time); when idle, epoll wakes us for
         * a frame and a timer for the first due time + window/2. */
        if (ready || d->polling) {
            int got = drain(d);
            if (got && !d->polling) {
                struct epoll_event w = {.events = 0, .data.u32 = 0};
                epoll_ctl(d->ep, EPOLL_CTL_MOD, sock[d->rx], &w);
                d->polling = 1;
            } else if (!got && d->polling) {
                struct epoll_event w = {.events = EPOLLIN, .data.u32 = 0};
                epoll_ctl(d->ep, EPOLL_CTL_MOD, sock[d->rx], &w);
                d->polling = 0;
            }
        }
        uint64_t half = (d->polling && poll_ns > window_ns ? poll_ns : window_ns) / 2;
        uint64_t now = now_ns(CLOCK_MONOTONIC);
        release(d, now + half);
        uint64_t next = UINT64_MAX;
        pthread_mutex_lock(&d->lock);
        if (d->polling)
            next = now + poll_ns;
        else if (d->n)
            next = d->heap[0]->due + half;
        uint64_t spent = now_ns(CLOCK_MONOTONIC) - woke;
        d->s.wakeups++;
        d->s.busy_us += spent / 1000;
        if (spent / 1000 > d->s.loop_max_us)
            d->s.loop_max_us = spent / 1000;
        pthread_mutex_unlock(&d->lock);
        if (next != armed) {
            struct itimerspec its = {0};
            if (next != UINT64_MAX) {
                its.it_value.tv_sec = (time_t)(next / 1000000000ull);
                its.it_value.tv_nsec = (long)(next % 1000000000ull);
            }
            timerfd_settime(d->tfd, TFD_TIMER_ABSTIME, &its, NULL);
            armed = next == UINT64_MAX ? 0 : next;
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */

static void out(const char *s)
{
    size_t n = strlen(s);
    while (n) {
        ssize_t w = write(1, s, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            exit(0);
        }
        s += w;
        n -= (size_t)w;
    }
}

static int set_param(struct params *p, const char *k, const char *v)
{
    char *e;
    double x = strtod(v, &e);
    if (e == v || *e)
        return -1;
#define D(name, key, lo, hi)                                                                       \
    if (!strcmp(k, key)) {                                                                         \
        if (x < (lo) || x > (hi))                                                                  \
            return -1;                                                                             \
        p->name = x;                                                                               \
        return 0;                                                                                  \
    }
    D(delay_ms, "delay", 0, 600000)
    D(jitter_ms, "jitter", 0, 600000)
    D(loss, "loss", 0, 1)
    D(burst_p, "burst_p", 0, 1)
    D(burst_len, "burst_len", 0, 1e9)
    D(reorder, "reorder", 0, 1)
    D(reorder_ms, "reorder_ms", 0, 600000)
    D(dup, "dup", 0, 1)
    D(corrupt, "corrupt", 0, 1)
#undef D
    if (!strcmp(k, "limit") && x >= 1 && x <= 1e7) {
        p->limit = (long)x;
        return 0;
    }
    if (!strcmp(k, "drop_next") && x >= 0 && x <= 1e12) {
        p->drop_next = (long)x;
        return 0;
    }
    if (!strcmp(k, "blackhole") && (x == 0 || x == 1)) {
        p->blackhole = (int)x;
        return 0;
    }
    return -1;
}

static void command(char *line)
{
    char buf[4096], *save = NULL, *tok = strtok_r(line, " \t\r", &save);
    if (!tok) {
        out("err empty\n");
        return;
    }
    if (!strcmp(tok, "ping")) {
        out("ok\n");
    } else if (!strcmp(tok, "quit")) {
        out("ok\n");
        exit(0);
    } else if (!strcmp(tok, "reset")) {
        for (int i = 0; i < 2; i++) {
            pthread_mutex_lock(&dirs[i].lock);
            memset(&dirs[i].s, 0, sizeof dirs[i].s);
            dirs[i].s.qmax = dirs[i].n;
            pthread_mutex_unlock(&dirs[i].lock);
        }
        out("ok\n");
    } else if (!strcmp(tok, "set")) {
        char *which = strtok_r(NULL, " \t\r", &save);
        int lo, hi;
        if (which && !strcmp(which, "up"))
            lo = 0, hi = 0;
        else if (which && !strcmp(which, "down"))
            lo = 1, hi = 1;
        else if (which && !strcmp(which, "both"))
            lo = 0, hi = 1;
        else {
            out("err direction must be up, down or both\n");
            return;
        }
        struct params np[2];
        for (int i = 0; i < 2; i++) {
            pthread_mutex_lock(&dirs[i].lock);
            np[i] = dirs[i].p;
            pthread_mutex_unlock(&dirs[i].lock);
        }
        uint64_t seed = 0;
        int have_seed = 0, named_drop_next = 0;
        while ((tok = strtok_r(NULL, " \t\r", &save))) {
            char *eq = strchr(tok, '=');
            if (!eq) {
                snprintf(buf, sizeof buf, "err bad token %s\n", tok);
                out(buf);
                return;
            }
            *eq = 0;
            named_drop_next |= !strcmp(tok, "drop_next");
            if (!strcmp(tok, "seed")) {
                seed = strtoull(eq + 1, NULL, 0);
                have_seed = 1;
                continue;
            }
            for (int i = lo; i <= hi; i++)
                if (set_param(&np[i], tok, eq + 1)) {
                    snprintf(buf, sizeof buf, "err bad value %s=%s\n", tok, eq + 1);
                    out(buf);
                    return;
                }
        }
        for (int i = 0; i < 2; i++) {
            pthread_mutex_lock(&dirs[i].lock);
            if (i >= lo && i <= hi) {
                /* a drop_next still counting down survives a set that does not name it */
                long pending = dirs[i].p.drop_next;
                dirs[i].p = np[i];
                if (!named_drop_next)
                    dirs[i].p.drop_next = pending;
                if (np[i].burst_p == 0)
                    dirs[i].in_burst = 0;
            }
            if (have_seed)
                rng_seed(&dirs[i].rng, seed + (uint64_t)i);
            pthread_mutex_unlock(&dirs[i].lock);
        }
        out("ok\n");
    } else if (!strcmp(tok, "get")) {
        size_t o = 0;
        o += (size_t)snprintf(buf + o, sizeof buf - o, "{");
        for (int i = 0; i < 2; i++) {
            pthread_mutex_lock(&dirs[i].lock);
            struct params pc = dirs[i].p, *p = &pc;
            pthread_mutex_unlock(&dirs[i].lock);
            o += (size_t)snprintf(buf + o, sizeof buf - o,
                                  "%s\"%s\":{\"delay\":%g,\"jitter\":%g,\"loss\":%g,\"burst_p\":%g,"
                                  "\"burst_len\":%g,\"reorder\":%g,\"reorder_ms\":%g,\"dup\":%g,"
                                  "\"corrupt\":%g,\"limit\":%ld,\"blackhole\":%d,\"drop_next\":%ld}",
                                  i ? "," : "", dirs[i].name, p->delay_ms, p->jitter_ms, p->loss,
                                  p->burst_p, p->burst_len, p->reorder, p->reorder_ms, p->dup,
                                  p->corrupt, p->limit, p->blackhole, p->drop_next);
        }
        snprintf(buf + o, sizeof buf - o, "}\n");
        out(buf);
    } else if (!strcmp(tok, "stats")) {
        size_t o = 0;
        o += (size_t)snprintf(buf + o, sizeof buf - o, "{");
        for (int i = 0; i < 2; i++) {
            pthread_mutex_lock(&dirs[i].lock);
            struct stats sc = dirs[i].s, *s = &sc;
            s->qlen = dirs[i].n;
            pthread_mutex_unlock(&dirs[i].lock);
            o += (size_t)snprintf(buf + o, sizeof buf - o, "%s\"%s\":{", i ? "," : "", dirs[i].name);
            const char *sep = "";
#define X(n)                                                                                       \
    o += (size_t)snprintf(buf + o, sizeof buf - o, "%s\"" #n "\":%" PRIu64, sep, s->n);            \
    sep = ",";
            STATS(X)
#undef X
            o += (size_t)snprintf(buf + o, sizeof buf - o, "}");
        }
        snprintf(buf + o, sizeof buf - o, "}\n");
        out(buf);
    } else {
        snprintf(buf, sizeof buf, "err unknown command %s\n", tok);
        out(buf);
    }
}

static char line[65536];
static size_t line_n;

static void read_stdin(void)
{
    ssize_t r = read(0, line + line_n, sizeof line - 1 - line_n);
    if (r == 0)
        exit(0); /* whoever started us is gone */
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return;
        exit(0);
    }
    line_n += (size_t)r;
    char *start = line, *nl;
    while ((nl = memchr(start, '\n', line_n - (size_t)(start - line)))) {
        *nl = 0;
        command(start);
        start = nl + 1;
    }
    line_n -= (size_t)(start - line);
    memmove(line, start, line_n);
    if (line_n == sizeof line - 1)
        line_n = 0; /* an absurd line: forget it */
}

/* ------------------------------------------------------------------------------------------ */

static int open_port(int i)
{
    /* protocol 0 first: no frames of other interfaces are queued before bind() */
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return perror("socket"), -1;
    ifindex[i] = (int)if_nametoindex(ifname[i]);
    if (!ifindex[i])
        return fprintf(stderr, "delayline: no interface %s\n", ifname[i]), -1;
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL), .sll_ifindex = ifindex[i]};
    if (bind(fd, (struct sockaddr *)&sll, sizeof sll))
        return perror("bind"), -1;
    int one = 1, big = 64 << 20;
    if (setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one))
        return perror("PACKET_IGNORE_OUTGOING"), -1;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big);
    setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
    struct packet_mreq mr = {.mr_ifindex = ifindex[i], .mr_type = PACKET_MR_PROMISC};
    setsockopt(fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mr, sizeof mr);
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", ifname[i]);
    mtu[i] = ioctl(fd, SIOCGIFMTU, &ifr) == 0 ? ifr.ifr_mtu : 1500;
    return fd;
}

static int run(int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (!strncmp(argv[i], "--poll-us=", 10))
            poll_ns = strtoull(argv[i] + 10, NULL, 0) * 1000;
        else if (!strncmp(argv[i], "--window-us=", 12))
            window_ns = strtoull(argv[i] + 12, NULL, 0) * 1000;
        else if (!strncmp(argv[i], "--rt=", 5))
            rt_prio = atoi(argv[i] + 5);

        else if (!ifname[0])
            ifname[0] = argv[i];
        else if (!ifname[1])
            ifname[1] = argv[i];
        else
            return fprintf(stderr, "usage: delayline run IF_A IF_B [--poll-us=N] [--window-us=N] [--rt=PRIO]\n"), 2;
    }
    if (!ifname[1])
        return fprintf(stderr, "usage: delayline run IF_A IF_B [--poll-us=N] [--window-us=N] [--rt=PRIO]\n"), 2;
    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_TIMERSLACK, 1000UL); /* 1 us: the default 50 us would blur the delay */
    uint64_t seed;
    if (getrandom(&seed, sizeof seed, 0) != sizeof seed)
        seed = now_ns(CLOCK_REALTIME) ^ (uint64_t)getpid();
    for (int i = 0; i < 2; i++)
        if ((sock[i] = open_port(i)) < 0)
            return 1;
    int m = mtu[0] > mtu[1] ? mtu[0] : mtu[1];
    if ((size_t)m + 64 > slot_size)
        slot_size = (size_t)m + 64;
    for (int i = 0; i < 2; i++) {
        struct dir *d = &dirs[i];
        *d = (struct dir){.name = i ? "down" : "up", .rx = i, .tx = 1 - i, .p = {.limit = 10000}};
        pthread_mutex_init(&d->lock, NULL);
        rng_seed(&d->rng, seed + (uint64_t)i);
        d->ep = epoll_create1(EPOLL_CLOEXEC);
        d->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (d->ep < 0 || d->tfd < 0)
            return perror("epoll/timerfd"), 1;
    }
    if (rt_prio > 0) { /* the worker threads inherit it; the control thread (this one) drops it */
        struct sched_param sp = {.sched_priority = rt_prio};
        if (sched_setscheduler(0, SCHED_FIFO, &sp))
            perror("delayline: SCHED_FIFO");
    }
    for (int i = 0; i < 2; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, &dirs[i]))
            return fprintf(stderr, "delayline: pthread_create failed\n"), 1;
    }
    if (rt_prio > 0) {
        struct sched_param sp = {.sched_priority = 0};
        pthread_setschedparam(pthread_self(), SCHED_OTHER, &sp);
    }
    out("ready\n");
    for (;;)
        read_stdin(); /* exits on EOF */
}

/* ------------------------------------------------------------------------------------------ */

static int wanted(const char *f)
{
    static const char *exact[] = {"generic-segmentation-offload", "generic-receive-offload", "rx-gro-list",
                                  "rx-udp-gro-forwarding", "large-receive-offload", "rx-gro-hw", NULL};
    for (int i = 0; exact[i]; i++)
        if (!strcmp(f, exact[i]))
            return 1;
    return !strncmp(f, "tx-", 3) && (strstr(f, "checksum") || strstr(f, "segmentation") || strstr(f, "gso"));
}

static int offload_off(const char *arg)
{
    char name[IFNAMSIZ + 8];
    snprintf(name, sizeof name, "%s", arg);
    char *plus = strchr(name, '+');
    int gro = plus && !strcmp(plus, "+gro");
    if (plus)
        *plus = 0;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), rc = 1;
    struct ifreq ifr = {0};
    if (strlen(name) >= IFNAMSIZ) {
        fprintf(stderr, "delayline: bad interface name %s\n", name);
        return 1;
    }
    memcpy(ifr.ifr_name, name, strlen(name) + 1);
    struct {
        struct ethtool_sset_info h;
        uint32_t len[1];
    } ssi = {.h = {.cmd = ETHTOOL_GSSET_INFO, .sset_mask = 1ull << ETH_SS_FEATURES}};
    ifr.ifr_data = (void *)&ssi;
    if (fd < 0 || ioctl(fd, SIOCETHTOOL, &ifr) || !ssi.h.sset_mask) {
        fprintf(stderr, "delayline: %s: no feature list: %s\n", name, strerror(errno));
        return 1;
    }
    uint32_t n = ssi.len[0], blocks = (n + 31) / 32;
    struct ethtool_gstrings *gs = calloc(1, sizeof *gs + (size_t)n * ETH_GSTRING_LEN);
    struct ethtool_sfeatures *sf = calloc(1, sizeof *sf + blocks * sizeof(struct ethtool_set_features_block));
    struct ethtool_gfeatures *gf = calloc(1, sizeof *gf + blocks * sizeof(struct ethtool_get_features_block));
    gs->cmd = ETHTOOL_GSTRINGS;
    gs->string_set = ETH_SS_FEATURES;
    gs->len = n;
    ifr.ifr_data = (void *)gs;
    if (ioctl(fd, SIOCETHTOOL, &ifr)) {
        fprintf(stderr, "delayline: %s: GSTRINGS: %s\n", name, strerror(errno));
        goto done;
    }
    sf->cmd = ETHTOOL_SFEATURES;
    sf->size = blocks;
    for (uint32_t i = 0; i < n; i++) {
        const char *f = (char *)gs->data + (size_t)i * ETH_GSTRING_LEN;
        if (wanted(f))
            sf->features[i / 32].valid |= 1u << (i % 32);
        if (gro && !strcmp(f, "generic-receive-offload"))
            sf->features[i / 32].requested |= 1u << (i % 32);
    }
    ifr.ifr_data = (void *)sf;
    if (ioctl(fd, SIOCETHTOOL, &ifr) < 0) {
        fprintf(stderr, "delayline: %s: SFEATURES: %s\n", name, strerror(errno));
        goto done;
    }
    gf->cmd = ETHTOOL_GFEATURES;
    gf->size = blocks;
    ifr.ifr_data = (void *)gf;
    if (ioctl(fd, SIOCETHTOOL, &ifr)) {
        fprintf(stderr, "delayline: %s: GFEATURES: %s\n", name, strerror(errno));
        goto done;
    }
    rc = 0;
    for (uint32_t i = 0; i < n; i++) {
        const char *f = (char *)gs->data + (size_t)i * ETH_GSTRING_LEN;
        if (wanted(f) && !(gro && !strcmp(f, "generic-receive-offload")) &&
            (gf->features[i / 32].active & (1u << (i % 32))) &&
            (gf->features[i / 32].available & (1u << (i % 32)))) {
            fprintf(stderr, "delayline: %s: could not turn off %s\n", name, f);
            rc = 1;
        }
    }
done:
    free(gs);
    free(sf);
    free(gf);
    close(fd);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "run"))
        return run(argc - 2, argv + 2);
    if (argc >= 2 && !strcmp(argv[1], "offload")) {
        int rc = 0;
        for (int i = 2; i < argc; i++)
            rc |= offload_off(argv[i]);
        return rc;
    }
    fprintf(stderr, "usage: delayline run IF_A IF_B | delayline offload IF[+gro]...\n");
    return 2;
}
