/* RTP load generator for bench/run_media.py: the Python generator's loop in C.
 *
 *   rtpgen send SECONDS RATE [sendto] < spec   paced sender: RATE packets/s from every socket
 *   rtpgen recv [DRAIN_MS] < spec              counts what arrives per socket until SIGTERM
 *
 * spec: one line per endpoint, "FD IP PORT": an already bound UDP socket (inherited
 * from run_media.py) and where its RTP goes. The sender sends 172-byte RTP packets
 * (12-byte header, 160 bytes of payload: G.711 20 ms), the endpoints in 10 slices per
 * 1/RATE s so the load is spread, and prints JSON with what it sent and how late it
 * fell.
 *
 * Sending. By default one raw socket (IPPROTO_RAW, the IP and UDP headers written
 * here, UDP checksum computed) sends each slice with sendmmsg(2), up to 1,024
 * datagrams per system call, each with the source address and port its endpoint
 * socket is bound to: on the wire and to the relay the packets are the endpoint's,
 * but the generator pays one system call per slice instead of one per packet.
 * "sendto" as 4th argument: one sendto(2) per packet on the endpoint's own socket
 * (the earlier generator). run_media.py starts one sender per CPU, each pinned, each
 * with its share of the endpoints: the kernel does the forwarding inline in the
 * sender's system call, so one sender alone is one core's worth of load.
 *
 * Receiving: no epoll and no wake-ups. Every DRAIN_MS (default 200) the receiver
 * empties every socket with recvmmsg(2) (many datagrams per call; the sockets'
 * buffers are sized for it by run_media.py) and sleeps again, so a datagram's
 * delivery costs its sender only the enqueue on the socket, never a wake-up of this
 * process, the same for every target; prints JSON with what it got.
 * Bounded: the sender stops after SECONDS, the receiver when told (run_media.py,
 * SIGTERM: one last drain) or after 600 s.
 *   cc -O2 -o rtpgen rtpgen.c   (run_media.py does this itself)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EP 20000
#define SLICES 10
#define BATCH 64
#define MMSG 1024
#define RTP_LEN 172
#define PKT_LEN (20 + 8 + RTP_LEN)

static int fds[MAX_EP];
static struct sockaddr_in dst[MAX_EP], src[MAX_EP];
static uint64_t counts[MAX_EP];
static volatile sig_atomic_t stop;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_s(double s) {
    if (s <= 0) return;
    struct timespec ts = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

static int read_spec(void) {
    char ip[64];
    int fd, port, n = 0;
    while (n < MAX_EP && scanf("%d %63s %d", &fd, ip, &port) == 3) {
        socklen_t len = sizeof src[n];
        fds[n] = fd;
        memset(&dst[n], 0, sizeof dst[n]);
        dst[n].sin_family = AF_INET;
        dst[n].sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, ip, &dst[n].sin_addr) != 1) return -1;
        if (getsockname(fd, (struct sockaddr *)&src[n], &len) < 0) return -1;
        n++;
    }
    return n;
}

static void print_counts(const char *key, int n) {
    printf("\"%s\": [", key);
    for (int i = 0; i < n; i++) printf(i ? ",%llu" : "%llu", (unsigned long long)counts[i]);
    printf("]");
}

static void rtp_header(unsigned char *p, int i, uint16_t seq) {
    uint32_t ts32 = htonl((uint32_t)seq * 160), ssrc = htonl((uint32_t)i);
    uint16_t s = htons(seq);
    p[0] = 0x80;
    p[1] = 0;
    memcpy(p + 2, &s, 2);
    memcpy(p + 4, &ts32, 4);
    memcpy(p + 8, &ssrc, 4);
}

/* IPv4 + UDP headers of endpoint i's packet (RTP already in place), UDP checksum
 * over the pseudo-header; the kernel fills the IP checksum, length and id. */
static void ip_udp_header(unsigned char *p, int i) {
    uint32_t sum = 0;
    uint16_t w;
    memset(p, 0, 28);
    p[0] = 0x45;
    w = htons(PKT_LEN);
    memcpy(p + 2, &w, 2);
    p[8] = 64;
    p[9] = IPPROTO_UDP;
    memcpy(p + 12, &src[i].sin_addr, 4);
    memcpy(p + 16, &dst[i].sin_addr, 4);
    memcpy(p + 20, &src[i].sin_port, 2);
    memcpy(p + 22, &dst[i].sin_port, 2);
    w = htons(8 + RTP_LEN);
    memcpy(p + 24, &w, 2);
    for (int k = 12; k < 20; k += 2) sum += (uint32_t)(p[k] << 8 | p[k + 1]); /* addresses */
    sum += IPPROTO_UDP + 8 + RTP_LEN;
    for (int k = 20; k < PKT_LEN; k += 2) sum += (uint32_t)(p[k] << 8 | p[k + 1]);
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    w = htons((uint16_t)~sum ? (uint16_t)~sum : 0xffff);
    memcpy(p + 26, &w, 2);
}

static int sender(int n, double seconds, double rate, int use_sendto) {
    static unsigned char pkts[MMSG][PKT_LEN];
    static struct mmsghdr msgs[MMSG];
    static struct iovec iov[MMSG];
    static int idx[MMSG];
    uint16_t seq[MAX_EP] = {0};
    uint64_t fails = 0, late = 0, ticks = 0, calls = 0;
    double tick = 1.0 / rate / SLICES, max_lag = 0, start = now() + 0.05, end = start + seconds;
    int raw = -1;
    if (!use_sendto && (raw = socket(AF_INET, SOCK_RAW, IPPROTO_RAW)) < 0) {
        perror("raw socket");
        return 1;
    }
    for (int m = 0; m < MMSG; m++) {
        for (int b = 0; b < 160; b++) pkts[m][28 + 12 + b] = (unsigned char)(b + 12);
        iov[m].iov_len = PKT_LEN;
        msgs[m].msg_hdr.msg_iovlen = 1;
        msgs[m].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
    }
    for (uint64_t k = 0;; k++) {
        double due = start + k * tick, t = now();
        int m = 0;
        if (due >= end) break;
        if (due > t) {
            sleep_s(due - t);
        } else {
            if (t - due > max_lag) max_lag = t - due;
            if (t - due > 0.02) late++;
        }
        for (int i = (int)(k % SLICES); i < n; i += SLICES) {
            if (use_sendto) {
                rtp_header(pkts[0] + 28, i, seq[i]);
                if (sendto(fds[i], pkts[0] + 28, RTP_LEN, 0, (struct sockaddr *)&dst[i], sizeof dst[i]) < 0)
                    fails++;
                else {
                    counts[i]++;
                    seq[i]++;
                }
                calls++;
                continue;
            }
            rtp_header(pkts[m] + 28, i, seq[i]);
            ip_udp_header(pkts[m], i);
            iov[m].iov_base = pkts[m];
            msgs[m].msg_hdr.msg_iov = &iov[m];
            msgs[m].msg_hdr.msg_name = &dst[i];
            idx[m++] = i;
            if (m == MMSG || i + SLICES >= n) {
                int done = 0;
                while (done < m) {
                    int r = sendmmsg(raw, msgs + done, (unsigned)(m - done), 0);
                    calls++;
                    if (r <= 0) { /* the first unsent one failed: count it, go on */
                        fails++;
                        done++;
                        continue;
                    }
                    for (int j = done; j < done + r; j++) {
                        counts[idx[j]]++;
                        seq[idx[j]]++;
                    }
                    done += r;
                }
                m = 0;
            }
        }
        ticks++;
    }
    printf("{");
    print_counts("sent", n);
    printf(", \"fails\": %llu, \"wall\": %.4f, \"max_lag_ms\": %.1f, \"late_ticks\": %llu, \"ticks\": %llu,"
           " \"syscalls\": %llu}\n",
           (unsigned long long)fails, now() - start, max_lag * 1e3, (unsigned long long)late,
           (unsigned long long)ticks, (unsigned long long)calls);
    return 0;
}

static void on_term(int sig) { (void)sig; stop = 1; }

static void drain(int n, struct mmsghdr *msgs) {
    for (int i = 0; i < n; i++) {
        int got;
        while ((got = recvmmsg(fds[i], msgs, BATCH, MSG_DONTWAIT, NULL)) > 0) {
            counts[i] += (uint64_t)got;
            if (got < BATCH) break;
        }
    }
}

static int receiver(int n, double every) {
    static struct mmsghdr msgs[BATCH];
    static struct iovec iov[BATCH];
    static unsigned char bufs[BATCH][2048];
    double deadline = now() + 600;
    signal(SIGTERM, on_term);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = sizeof bufs[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    while (!stop && now() < deadline) {
        drain(n, msgs);
        sleep_s(every); /* SIGTERM interrupts it */
    }
    drain(n, msgs);
    printf("{");
    print_counts("got", n);
    printf("}\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    int n = read_spec();
    if (n <= 0) return 2;
    if (!strcmp(argv[1], "send") && (argc == 4 || argc == 5))
        return sender(n, atof(argv[2]), atof(argv[3]), argc == 5 && !strcmp(argv[4], "sendto"));
    if (!strcmp(argv[1], "recv")) return receiver(n, argc > 2 ? atof(argv[2]) / 1e3 : 0.2);
    return 2;
}
