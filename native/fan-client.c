/* fan-client: the thin client of `fan` and `fan-ipam`, without a Python interpreter.
 *
 * A runtime starts the plugin for every pod start and stop; when the node
 * agent's plugin server runs, all this process does is hand the call over
 * (cni_fan/wire.py) and print the answer, so starting an interpreter for it
 * is most of the call's cost. This program does what cni_fan/entry.py's
 * call_server does, byte for byte on the wire; when that would run the call
 * locally, it execs the Python program `cni-fan` next to its own executable
 * (argv[0] and CNI_FAN_PLUGIN name the plugin, CNI_FAN_AGENT_SOCKET=none
 * keeps it from asking the server again), with the bytes it read as stdin.
 * See docs/architecture.md, "The per-call path".
 *
 * Build: cc -O2 -Wall -Wextra -DCNI_FAN_VERSION='"x.y.z"' (native/build.sh).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef CNI_FAN_VERSION
#error "CNI_FAN_VERSION must be defined (cni_fan.__version__; native/build.sh does it)"
#endif

#define DEFAULT_SOCKET "/run/cni-fan/plugin.sock"
#define CONNECT_TIMEOUT_MS 2000
#define TRY_AGAIN_LATER 11
#define INVALID_ENVIRONMENT 4
#define FALLBACK (-1)
#define MAX_MESSAGE (4u << 20)
#define LOCAL_PROGRAM "cni-fan"
static const char MAGIC[8] = "CNIFAN1\n";

extern char **environ;

struct buf {
    unsigned char *data;
    size_t len, cap;
};

static void die_oom(void) {
    static const char msg[] = "fan-client: out of memory\n";
    if (write(2, msg, sizeof msg - 1) < 0) { /* nothing left to report to */ }
    _exit(1);
}

static void put(struct buf *b, const void *data, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        unsigned char *grown = realloc(b->data, cap);
        if (!grown) die_oom();
        b->data = grown;
        b->cap = cap;
    }
    if (n) memcpy(b->data + b->len, data, n);
    b->len += n;
}

static void put_u32(struct buf *b, uint32_t v) {
    unsigned char be[4] = {v >> 24, v >> 16, v >> 8, v};
    put(b, be, 4);
}

static void put_field(struct buf *b, const void *data, size_t n) {
    put_u32(b, (uint32_t)n);
    put(b, data, n);
}

static int write_all(int fd, const unsigned char *data, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, data, n);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return -1;
        data += w;
        n -= (size_t)w;
    }
    return 0;
}

/* A CNI error as entry._try_again writes it: `why` loses its quotes and backslashes, like there. */
static void cni_error(struct buf *out, int code, const char *msg, const char *why) {
    char head[64];
    int n = snprintf(head, sizeof head, "{\"cniVersion\": \"1.0.0\", \"code\": %d, \"msg\": \"", code);
    put(out, head, (size_t)n);
    put(out, msg, strlen(msg));
    put(out, "\", \"details\": \"", 15);
    for (const char *p = why; *p; p++) {
        char c = *p == '"' ? '\'' : *p == '\\' ? '/' : *p;
        put(out, &c, 1);
    }
    put(out, "\"}\n", 3);
}

static void try_again(struct buf *out, const char *why) {
    cni_error(out, TRY_AGAIN_LATER, "the cni-fan plugin server stopped before answering", why);
}

static void errno_text(char *dst, size_t n, int err) {
    snprintf(dst, n, "[Errno %d] %s", err, strerror(err));
}

/* Strict UTF-8 (what Python's bytes.decode() accepts). */
static int valid_utf8(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t more;
        uint32_t cp, min;
        if (c < 0x80) { i++; continue; }
        if ((c & 0xe0) == 0xc0) { more = 1; cp = c & 0x1f; min = 0x80; }
        else if ((c & 0xf0) == 0xe0) { more = 2; cp = c & 0x0f; min = 0x800; }
        else if ((c & 0xf8) == 0xf0) { more = 3; cp = c & 0x07; min = 0x10000; }
        else return 0;
        for (size_t k = 1; k <= more; k++) {
            if (i + k >= n || (s[i + k] & 0xc0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
        i += more + 1;
    }
    return 1;
}

static size_t skip_space(const unsigned char *s, size_t at, size_t n) {
    while (at < n && (s[at] == ' ' || s[at] == '\t' || s[at] == '\r' || s[at] == '\n')) at++;
    return at;
}

/* entry._json_string_after(stdin, b"agentSocket"): a malloc'd plain string value, or NULL. */
static char *agent_socket_in(const unsigned char *s, size_t n) {
    static const char key[] = "\"agentSocket\"";
    const unsigned char *hit = memmem(s, n, key, sizeof key - 1);
    if (!hit) return NULL;
    size_t at = skip_space(s, (size_t)(hit - s) + sizeof key - 1, n);
    if (at >= n || s[at] != ':') return NULL;
    at = skip_space(s, at + 1, n);
    if (at >= n || s[at] != '"') return NULL;
    const unsigned char *end = memchr(s + at + 1, '"', n - at - 1);
    if (!end) return NULL;
    size_t len = (size_t)(end - (s + at + 1));
    const unsigned char *value = s + at + 1;
    if (len == 0 || memchr(value, '\\', len) || !valid_utf8(value, len)) return NULL;
    char *copy = strndup((const char *)value, len);
    if (!copy) die_oom();
    return copy;
}

/* entry._socket_path: NULL when no server is to be asked. */
static const char *socket_path(const unsigned char *stdin_data, size_t n) {
    const char *override = getenv("CNI_FAN_AGENT_SOCKET");
    if (override) return (*override && strcmp(override, "none") != 0) ? override : NULL;
    if (memmem(stdin_data, n, "\"agentSocket\"", 13)) {
        char *path = agent_socket_in(stdin_data, n);
        return path && path[0] == '/' ? path : NULL;
    }
    return DEFAULT_SOCKET;
}

static int connect_with_timeout(int sock, const char *path) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    size_t len = strlen(path);
    if (len >= sizeof addr.sun_path) return -1;
    memcpy(addr.sun_path, path, len);
    int flags = fcntl(sock, F_GETFL);
    if (flags < 0 || fcntl(sock, F_SETFL, flags | O_NONBLOCK) < 0) return -1;
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
        if (errno != EINPROGRESS) return -1;
        struct pollfd p = {.fd = sock, .events = POLLOUT};
        int err = 0;
        socklen_t err_len = sizeof err;
        if (poll(&p, 1, CONNECT_TIMEOUT_MS) != 1) return -1;
        if (getsockopt(sock, SOL_SOCKET, SO_ERROR, &err, &err_len) < 0 || err) return -1;
    }
    return fcntl(sock, F_SETFL, flags);
}

/* entry._netlink_socket_in: -1 when `pod_fd` is no namespace to enter; -2 (with `why`) when stuck in it. */
static int netlink_socket_in(int pod_fd, int own_ns, char *why, size_t why_len) {
    if (setns(pod_fd, CLONE_NEWNET) < 0) return -1;
    int sock = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, 0 /* NETLINK_ROUTE */);
    if (setns(own_ns, CLONE_NEWNET) < 0) {
        char err[160];
        errno_text(err, sizeof err, errno);
        snprintf(why, why_len, "cannot return to the caller's network namespace: %s", err);
        return -2;
    }
    return sock;
}

static const char *env_value(const char *name) {
    const char *v = getenv(name);
    return v ? v : "";
}

static int is_pod_netlink_call(const char *plugin, const char *command) {
    return strcmp(plugin, "fan") == 0 && (strcmp(command, "ADD") == 0 || strcmp(command, "CHECK") == 0);
}

static void encode_request(struct buf *msg, const char *plugin, const char *netns, const struct buf *in) {
    struct buf body = {0};
    put_field(&body, CNI_FAN_VERSION, strlen(CNI_FAN_VERSION));
    put_field(&body, plugin, strlen(plugin));
    put_field(&body, netns, strlen(netns));
    put_field(&body, in->data, in->len);
    for (char **e = environ; *e; e++)
        if (strncmp(*e, "CNI_", 4) == 0 && strchr(*e, '=')) put_field(&body, *e, strlen(*e));
    put(msg, MAGIC, sizeof MAGIC);
    put_u32(msg, (uint32_t)body.len);
    put(msg, body.data, body.len);
    free(body.data);
}

static int send_request(int sock, const struct buf *msg, const int *fds, int nfds) {
    char control[CMSG_SPACE(4 * sizeof(int))];
    memset(control, 0, sizeof control);
    struct iovec iov = {.iov_base = msg->data, .iov_len = msg->len};
    struct msghdr hdr = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = CMSG_SPACE(nfds * sizeof(int))};
    struct cmsghdr *c = CMSG_FIRSTHDR(&hdr);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    ssize_t sent;
    do sent = sendmsg(sock, &hdr, MSG_NOSIGNAL); while (sent < 0 && errno == EINTR);
    if (sent < 0) return -1;
    for (size_t at = (size_t)sent; at < msg->len;) {
        ssize_t w = send(sock, msg->data + at, msg->len - at, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return -1;
        at += (size_t)w;
    }
    return 0;
}

/* wire._read_exact: 0, or -1 with `why` set as Python's exception text would read. */
static int read_exact(int sock, unsigned char *dst, size_t n, char *why, size_t why_len) {
    for (size_t got = 0; got < n;) {
        ssize_t r = recv(sock, dst + got, n - got < (1u << 16) ? n - got : (1u << 16), 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { errno_text(why, why_len, errno); return -1; }
        if (r == 0) { snprintf(why, why_len, "peer closed the connection mid-message"); return -1; }
        got += (size_t)r;
    }
    return 0;
}

/* wire.read_message + decode_reply: the exit code, the body in `reply`; -1 with `why` when malformed. */
static int read_reply(int sock, struct buf *reply, int *code, char *why, size_t why_len) {
    unsigned char head[12];
    if (read_exact(sock, head, sizeof head, why, why_len) < 0) return -1;
    if (memcmp(head, MAGIC, sizeof MAGIC) != 0) { snprintf(why, why_len, "not a cni-fan message"); return -1; }
    uint32_t length = (uint32_t)head[8] << 24 | (uint32_t)head[9] << 16 | (uint32_t)head[10] << 8 | head[11];
    if (length > MAX_MESSAGE) { snprintf(why, why_len, "message of %u bytes is too large", length); return -1; }
    reply->data = malloc(length ? length : 1);
    if (!reply->data) die_oom();
    if (read_exact(sock, reply->data, length, why, why_len) < 0) return -1;
    if (length < 4) { snprintf(why, why_len, "reply too short to hold an exit code"); return -1; }
    const unsigned char *d = reply->data;
    *code = (int32_t)((uint32_t)d[0] << 24 | (uint32_t)d[1] << 16 | (uint32_t)d[2] << 8 | d[3]);
    reply->len = length;
    return 0;
}

/* entry.call_server: 1 with the answer in `out` and `*code`, or 0 to run the call locally. */
static int call_server(const char *path, const char *plugin, const struct buf *in, struct buf *out, int *code) {
    struct stat st;
    if (stat(path, &st) < 0) return 0;
    const char *netns_path = env_value("CNI_NETNS");
    int own_ns = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (own_ns < 0) return 0;
    int pod_fd = *netns_path ? open(netns_path, O_RDONLY | O_CLOEXEC) : -1;
    int fds[4] = {own_ns, 2, pod_fd, -1}, nfds = pod_fd >= 0 ? 3 : 2;
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect_with_timeout(sock, path) < 0) return 0;  /* no server: run locally */
    if (pod_fd >= 0 && is_pod_netlink_call(plugin, env_value("CNI_COMMAND"))) {
        char why[256];
        int netlink = netlink_socket_in(pod_fd, own_ns, why, sizeof why);
        if (netlink == -2) {  /* stuck in the pod's namespace: running locally there would be wrong */
            try_again(out, why);
            *code = 1;
            return 1;
        }
        if (netlink >= 0) fds[nfds++] = netlink;
    }
    struct buf msg = {0};
    encode_request(&msg, plugin, pod_fd >= 0 ? netns_path : "", in);
    if (send_request(sock, &msg, fds, nfds) < 0) return 0;  /* nothing reached the server: run locally */
    free(msg.data);
    struct buf reply = {0};
    char why[256];
    if (read_reply(sock, &reply, code, why, sizeof why) < 0) {
        try_again(out, why);
        *code = 1;
        return 1;
    }
    if (*code == FALLBACK) return 0;  /* e.g. the agent runs another version during an upgrade */
    put(out, reply.data + 4, reply.len - 4);
    return 1;
}

/* Run the call in the Python program beside this executable; returns only when that cannot start. */
static void run_locally(const char *plugin, const struct buf *in, struct buf *out) {
    char exe[4096], why[4400];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - sizeof LOCAL_PROGRAM - 1);
    if (n < 0) {
        errno_text(why, sizeof why, errno);
        cni_error(out, TRY_AGAIN_LATER, "cannot find the local cni-fan program: /proc/self/exe", why);
        return;
    }
    exe[n] = '\0';
    char *slash = strrchr(exe, '/');
    strcpy(slash ? slash + 1 : exe, LOCAL_PROGRAM);
    int mem = memfd_create("cni-fan-stdin", 0);
    if (mem < 0 || write_all(mem, in->data, in->len) < 0 || lseek(mem, 0, SEEK_SET) < 0
            || dup2(mem, 0) < 0) {
        errno_text(why, sizeof why, errno);
        cni_error(out, TRY_AGAIN_LATER, "cannot hand the call to the local cni-fan program", why);
        return;
    }
    if (mem != 0) close(mem);
    if (setenv("CNI_FAN_AGENT_SOCKET", "none", 1) < 0 || setenv("CNI_FAN_PLUGIN", plugin, 1) < 0) die_oom();
    char *argv[] = {(char *)plugin, NULL};
    execv(exe, argv);
    char err[160];
    errno_text(err, sizeof err, errno);
    snprintf(why, sizeof why, "%s: %s", exe, err);
    cni_error(out, TRY_AGAIN_LATER, "no plugin server answered and the local cni-fan program cannot start", why);
}

int main(int argc, char **argv) {
    (void)argc;
    const char *name = argv[0] ? argv[0] : "";
    const char *plugin = strrchr(name, '/') ? strrchr(name, '/') + 1 : name;
    struct buf out = {0};
    int code = 1;
    if (strcmp(plugin, "fan") != 0 && strcmp(plugin, "fan-ipam") != 0) {
        char why[300];
        snprintf(why, sizeof why, "started as %.200s; install it as fan or fan-ipam", plugin);
        cni_error(&out, INVALID_ENVIRONMENT, "fan-client runs only as fan or fan-ipam", why);
        fprintf(stderr, "fan-client: started as %s, not as fan or fan-ipam\n", plugin);
    } else {
        struct buf in = {0};
        unsigned char chunk[65536];
        for (;;) {
            ssize_t r = read(0, chunk, sizeof chunk);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            put(&in, chunk, (size_t)r);
        }
        const char *path = socket_path(in.data ? in.data : (const unsigned char *)"", in.len);
        if (!path || !call_server(path, plugin, &in, &out, &code)) {
            run_locally(plugin, &in, &out);
            fprintf(stderr, "fan-client: %.*s", (int)out.len, (const char *)out.data);
            code = 1;
        }
    }
    if (write_all(1, out.data, out.len) < 0) {
        perror("fan-client: writing the answer");
        return 1;
    }
    return code;
}
