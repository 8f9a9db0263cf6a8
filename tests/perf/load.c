/* Load generator and backend for tests/perf/bench.py (Linux, epoll).
 *
 *   load server PORT                  SMTP-ish backend on 127.0.0.1:PORT: greets "220 bench",
 *                                     answers a QUIT line with "221 bye" and closes, echoes
 *                                     every other line.
 *   load churn HOST PORT CONC SECS    CONC concurrent sessions (connect, read 220, send QUIT,
 *                                     read 221, read EOF, close) for SECS seconds.
 *                                     Prints "sessions N rate R errors E".
 *   load rr HOST PORT COUNT           one connection: read the greeting, then COUNT round
 *                                     trips of a 64-byte line. Prints "p50_us X p99_us Y".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF 4096

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static struct sockaddr_in addr_of(const char *host, const char *port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)atoi(port));
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address: %s\n", host);
        exit(2);
    }
    return a;
}

/* ---------------------------------------------------------------- server */

struct conn {
    char in[BUF];
    size_t inlen;
    char *out;
    size_t outlen, outcap;
    int closing; /* close once `out` is flushed */
    int used;
};

static struct conn *conns;
static int nconns;

static struct conn *conn_get(int fd) {
    if (fd >= nconns) {
        int n = nconns ? nconns : 1024;
        while (n <= fd) n *= 2;
        conns = realloc(conns, (size_t)n * sizeof *conns);
        if (!conns) die("realloc");
        memset(conns + nconns, 0, (size_t)(n - nconns) * sizeof *conns);
        nconns = n;
    }
    return &conns[fd];
}

static void conn_close(int ep, int fd) {
    struct conn *c = conn_get(fd);
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    free(c->out);
    memset(c, 0, sizeof *c);
}

static void queue(struct conn *c, const char *p, size_t n) {
    if (c->outlen + n > c->outcap) {
        size_t cap = c->outcap ? c->outcap : BUF;
        while (cap < c->outlen + n) cap *= 2;
        c->out = realloc(c->out, cap);
        if (!c->out) die("realloc");
        c->outcap = cap;
    }
    memcpy(c->out + c->outlen, p, n);
    c->outlen += n;
}

/* Write what we can; returns -1 when the connection is finished (closed). */
static int flush_out(int ep, int fd, struct conn *c) {
    while (c->outlen > 0) {
        ssize_t w = send(fd, c->out, c->outlen, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) break;
            conn_close(ep, fd);
            return -1;
        }
        memmove(c->out, c->out + w, c->outlen - (size_t)w);
        c->outlen -= (size_t)w;
    }
    if (c->outlen == 0 && c->closing) {
        conn_close(ep, fd);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN | (c->outlen ? EPOLLOUT : 0), .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
    return 0;
}

static void on_readable(int ep, int fd) {
    struct conn *c = conn_get(fd);
    for (;;) {
        if (c->inlen == sizeof c->in) c->inlen = 0; /* over-long line: drop it */
        ssize_t r = recv(fd, c->in + c->inlen, sizeof c->in - c->inlen, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) break;
            conn_close(ep, fd);
            return;
        }
        if (r == 0) { /* peer closed: nothing more to answer */
            conn_close(ep, fd);
            return;
        }
        c->inlen += (size_t)r;
        size_t start = 0;
        for (size_t i = 0; i < c->inlen && !c->closing; i++) {
            if (c->in[i] != '\n') continue;
            size_t len = i + 1 - start;
            if (len >= 4 && strncasecmp(c->in + start, "QUIT", 4) == 0) {
                queue(c, "221 bye\r\n", 9);
                c->closing = 1;
            } else {
                queue(c, c->in + start, len);
            }
            start = i + 1;
        }
        memmove(c->in, c->in + start, c->inlen - start);
        c->inlen -= start;
        if (c->closing) break;
    }
    flush_out(ep, fd, c);
}

static void __attribute__((noreturn)) run_server(const char *port) {
    struct sockaddr_in a = addr_of("127.0.0.1", port);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    if (ls < 0) die("socket");
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(ls, 4096) < 0) die("listen");
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                for (;;) {
                    int s = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (s < 0) break; /* EAGAIN, or EMFILE: retry on the next wakeup */
                    set_nodelay(s);
                    struct conn *c = conn_get(s);
                    memset(c, 0, sizeof *c);
                    c->used = 1;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = s};
                    epoll_ctl(ep, EPOLL_CTL_ADD, s, &cev);
                    queue(c, "220 bench\r\n", 11);
                    flush_out(ep, s, c);
                }
                continue;
            }
            struct conn *c = conn_get(fd);
            if (!c->used) continue;
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                on_readable(ep, fd);
            } else if (evs[i].events & EPOLLOUT) {
                flush_out(ep, fd, c);
            }
        }
    }
}

/* ---------------------------------------------------------------- churn */

enum { S_CONNECT, S_GREET, S_BYE, S_EOF };

struct sess {
    int fd;
    int state;
    char buf[256];
    size_t len;
};

static int sess_open(int ep, struct sess *s, const struct sockaddr_in *a, int idx) {
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (s->fd < 0) return -1;
    s->state = S_CONNECT;
    s->len = 0;
    if (connect(s->fd, (const struct sockaddr *)a, sizeof *a) < 0 && errno != EINPROGRESS) {
        close(s->fd);
        s->fd = -1;
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u32 = (uint32_t)idx};
    epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
    return 0;
}

/* Advance a session; returns 1 when it completed, -1 on error, 0 when it needs more. */
static int sess_step(int ep, struct sess *s, int idx) {
    if (s->state == S_CONNECT) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) return -1;
        s->state = S_GREET;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)idx};
        epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
    }
    for (;;) {
        if (s->len >= sizeof s->buf - 1) return -1;
        ssize_t r = recv(s->fd, s->buf + s->len, sizeof s->buf - 1 - s->len, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return 0;
            return -1;
        }
        if (r == 0) return s->state == S_EOF ? 1 : -1;
        s->len += (size_t)r;
        s->buf[s->len] = 0;
        if (s->state == S_GREET && memchr(s->buf, '\n', s->len)) {
            if (strncmp(s->buf, "220", 3) != 0) return -1;
            s->len = 0;
            if (send(s->fd, "QUIT\r\n", 6, MSG_NOSIGNAL) != 6) return -1;
            s->state = S_BYE;
        } else if (s->state == S_BYE && memchr(s->buf, '\n', s->len)) {
            if (strncmp(s->buf, "221", 3) != 0) return -1;
            s->len = 0;
            s->state = S_EOF; /* wait for the server's FIN: the client never holds TIME_WAIT */
        } else if (s->state == S_EOF) {
            s->len = 0;
        }
    }
}

static int run_churn(const char *host, const char *port, int conc, double secs) {
    struct sockaddr_in a = addr_of(host, port);
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    struct sess *ss = calloc((size_t)conc, sizeof *ss);
    if (!ss) die("calloc");
    long done = 0, errors = 0;
    double t0 = now(), end = t0 + secs;
    for (int i = 0; i < conc; i++)
        if (sess_open(ep, &ss[i], &a, i) < 0) errors++;
    struct epoll_event evs[256];
    while (now() < end) {
        int n = epoll_wait(ep, evs, 256, 50);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int idx = (int)evs[i].data.u32;
            struct sess *s = &ss[idx];
            if (s->fd < 0) continue;
            int r = sess_step(ep, s, idx);
            if (r == 0) continue;
            if (r > 0) done++; else errors++;
            epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
            close(s->fd);
            s->fd = -1;
            if (now() < end && sess_open(ep, s, &a, idx) < 0) errors++;
        }
        for (int i = 0; i < conc; i++) /* reopen slots whose connect() failed outright */
            if (ss[i].fd < 0 && now() < end && sess_open(ep, &ss[i], &a, i) < 0) {
                errors++;
                usleep(1000);
            }
    }
    double el = now() - t0;
    for (int i = 0; i < conc; i++)
        if (ss[i].fd >= 0) close(ss[i].fd);
    printf("sessions %ld rate %.1f errors %ld\n", done, (double)done / el, errors);
    return 0;
}

/* ---------------------------------------------------------------- rr */

/* Read exactly `want` bytes (handles short reads). */
static int read_full(int fd, char *buf, size_t want) {
    size_t got = 0;
    while (got < want) {
        ssize_t r = recv(fd, buf + got, want - got, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static int run_rr(const char *host, const char *port, int count) {
    struct sockaddr_in a = addr_of(host, port);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    set_nodelay(fd);
    char buf[BUF], msg[64];
    memset(msg, 'x', sizeof msg);
    msg[63] = '\n';
    size_t got = 0; /* read the greeting line */
    while (!memchr(buf, '\n', got)) {
        ssize_t r = recv(fd, buf + got, sizeof buf - got, 0);
        if (r <= 0) die("greeting");
        got += (size_t)r;
    }
    double *lat = malloc((size_t)count * sizeof *lat);
    if (!lat) die("malloc");
    for (int i = 0; i < count; i++) {
        double t = now();
        if (send(fd, msg, sizeof msg, MSG_NOSIGNAL) != (ssize_t)sizeof msg) die("send");
        if (read_full(fd, buf, sizeof msg) < 0) die("echo");
        lat[i] = (now() - t) * 1e6;
    }
    close(fd);
    qsort(lat, (size_t)count, sizeof *lat, cmp_double);
    printf("p50_us %.1f p99_us %.1f\n", lat[count / 2], lat[(count * 99) / 100]);
    free(lat);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc == 3 && strcmp(argv[1], "server") == 0) run_server(argv[2]);
    if (argc == 6 && strcmp(argv[1], "churn") == 0)
        return run_churn(argv[2], argv[3], atoi(argv[4]), atof(argv[5]));
    if (argc == 5 && strcmp(argv[1], "rr") == 0 && atoi(argv[4]) > 0)
        return run_rr(argv[2], argv[3], atoi(argv[4]));
    fprintf(stderr, "usage: load server PORT | load churn HOST PORT CONC SECS | "
                    "load rr HOST PORT COUNT\n");
    return 2;
}
