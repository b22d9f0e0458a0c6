/* RTP load generator for bench/run_media.py: the Python generator's loop in C.
 *
 *   rtpgen send SECONDS RATE < spec    paced sender: RATE packets/s from every socket
 *   rtpgen recv < spec                 counts what arrives per socket until SIGTERM
 *
 * spec: one line per endpoint, "FD IP PORT": an already bound UDP socket (inherited
 * from run_media.py) and where its RTP goes. The sender sends 172-byte RTP packets
 * (12-byte header, 160 bytes of payload: G.711 20 ms), the endpoints in 10 slices per
 * 1/RATE s so the load is spread, and prints JSON with what it sent and how late it
 * fell; the receiver drains with recvmmsg and prints JSON with what it got. Bounded:
 * the sender stops after SECONDS, the receiver when told (run_media.py) or after 600 s.
 *   cc -O2 -o rtpgen rtpgen.c   (run_media.py does this itself)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EP 20000
#define SLICES 10
#define BATCH 64

static int fds[MAX_EP];
static struct sockaddr_in dst[MAX_EP];
static uint64_t counts[MAX_EP];
static volatile sig_atomic_t stop;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int read_spec(void) {
    char ip[64];
    int fd, port, n = 0;
    while (n < MAX_EP && scanf("%d %63s %d", &fd, ip, &port) == 3) {
        fds[n] = fd;
        memset(&dst[n], 0, sizeof dst[n]);
        dst[n].sin_family = AF_INET;
        dst[n].sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, ip, &dst[n].sin_addr) != 1) return -1;
        n++;
    }
    return n;
}

static void print_counts(const char *key, int n) {
    printf("\"%s\": [", key);
    for (int i = 0; i < n; i++) printf(i ? ",%llu" : "%llu", (unsigned long long)counts[i]);
    printf("]");
}

static int sender(int n, double seconds, double rate) {
    unsigned char buf[172];
    uint16_t seq[MAX_EP] = {0};
    uint64_t fails = 0, late = 0, ticks = 0;
    double tick = 1.0 / rate / SLICES, max_lag = 0, start = now() + 0.05, end = start + seconds;
    memset(buf, 0, sizeof buf);
    buf[0] = 0x80;
    for (int i = 12; i < 172; i++) buf[i] = (unsigned char)i;
    for (uint64_t k = 0;; k++) {
        double due = start + k * tick, t = now();
        if (due >= end) break;
        if (due > t) {
            struct timespec ts = {(time_t)(due - t), (long)((due - t - (time_t)(due - t)) * 1e9)};
            nanosleep(&ts, NULL);
        } else {
            if (t - due > max_lag) max_lag = t - due;
            if (t - due > 0.02) late++;
        }
        for (int i = (int)(k % SLICES); i < n; i += SLICES) {
            uint32_t ts32 = htonl((uint32_t)seq[i] * 160), ssrc = htonl((uint32_t)i);
            uint16_t s = htons(seq[i]);
            memcpy(buf + 2, &s, 2);
            memcpy(buf + 4, &ts32, 4);
            memcpy(buf + 8, &ssrc, 4);
            if (sendto(fds[i], buf, sizeof buf, 0, (struct sockaddr *)&dst[i], sizeof dst[i]) < 0)
                fails++;
            else {
                counts[i]++;
                seq[i]++;
            }
        }
        ticks++;
    }
    printf("{");
    print_counts("sent", n);
    printf(", \"fails\": %llu, \"wall\": %.4f, \"max_lag_ms\": %.1f, \"late_ticks\": %llu, \"ticks\": %llu}\n",
           (unsigned long long)fails, now() - start, max_lag * 1e3, (unsigned long long)late,
           (unsigned long long)ticks);
    return 0;
}

static void on_term(int sig) { (void)sig; stop = 1; }

static int receiver(int n) {
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    static unsigned char bufs[BATCH][2048];
    struct epoll_event ev, out[256];
    int ep = epoll_create1(0);
    double deadline = now() + 600;
    signal(SIGTERM, on_term);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = sizeof bufs[i];
        memset(&msgs[i], 0, sizeof msgs[i]);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    for (int i = 0; i < n; i++) {
        ev.events = EPOLLIN;
        ev.data.u32 = (uint32_t)i;
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) < 0) return 1;
    }
    while (!stop && now() < deadline) {
        int k = epoll_wait(ep, out, 256, 200);
        for (int j = 0; j < k; j++) {
            int i = (int)out[j].data.u32, got;
            while ((got = recvmmsg(fds[i], msgs, BATCH, MSG_DONTWAIT, NULL)) > 0) counts[i] += (uint64_t)got;
        }
    }
    printf("{");
    print_counts("got", n);
    printf("}\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    int n = read_spec();
    if (n <= 0) return 2;
    if (!strcmp(argv[1], "send") && argc == 4) return sender(n, atof(argv[2]), atof(argv[3]));
    if (!strcmp(argv[1], "recv")) return receiver(n);
    return 2;
}
