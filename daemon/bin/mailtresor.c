/*
 * mailtresor: the administrator's command (/usr/bin/mailtresor).
 *
 * `mailtresor search` and `mailtresor show` are answered by the running
 * daemon over its query socket when it runs with the same configuration
 * file (daemon/mailtresor/query.py: the protocol, who may ask, what is
 * logged).  This front end does no more than that: find the socket, send
 * the command line, copy the answer to stdout and stderr, exit with its
 * code.  Every other command -- and search or show when no daemon answers,
 * or it declines -- is the Python command: this program replaces itself,
 * before it has written anything, with
 *
 *     MAILTRESOR_PYTHON -I -m mailtresor ARGUMENTS...
 *
 * It runs with its caller's rights, reads one configuration file, parses
 * no mail and holds no key.  Why a C program at all: docs/DESIGN-NOTES.md
 * section 14 (a Python process costs more to start than notmuch costs to
 * search).
 *
 * The names below are the Python package's (tests/test_command.py checks
 * that they agree).
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef MAILTRESOR_PYTHON
#define MAILTRESOR_PYTHON "/usr/bin/python3"     /* `make deps` gives the venv's */
#endif

/* The defaults (a test build points them into its own directory). */
#ifndef CONFIG_PATH
#define CONFIG_PATH "/etc/mailtresor/mailtresor.toml"
#endif
#ifndef RUNTIME_DIRECTORY
#define RUNTIME_DIRECTORY "/run/mailtresor"
#endif
#define CONFIG_ENV_VAR "MAILTRESOR_CONFIG"
#define SOCKET_NAME "query.sock"
#define NO_DAEMON_ENV_VAR "MAILTRESOR_NO_DAEMON"    /* set, not "": never ask */
#define MAGIC "MTQ1"
#define FRAME_OUT 'o'
#define FRAME_ERR 'e'
#define FRAME_EXIT 'x'
#define FRAME_DECLINE 'd'

#define MAX_CONFIG_SIZE (1 << 20)     /* a larger file is not scanned: no guess */
#define ANSWER_TIMEOUT 300            /* seconds, for each read from the socket */

static const char *const served[] = { "search", "show", NULL };

/* The Python command, with the same arguments; returns only if it cannot run. */
static void run_python(int argc, char **argv)
{
    char **args = calloc((size_t)argc + 4, sizeof *args);

    if (args != NULL) {
        args[0] = MAILTRESOR_PYTHON;
        args[1] = "-I";               /* no PYTHON* variables, no current directory */
        args[2] = "-m";
        args[3] = "mailtresor";
        memcpy(args + 4, argv + 1, (size_t)argc * sizeof *args);   /* with argv's NULL */
        signal(SIGPIPE, SIG_DFL);
        execv(MAILTRESOR_PYTHON, args);
    }
    fprintf(stderr, "mailtresor: cannot run %s: %s\n", MAILTRESOR_PYTHON, strerror(errno));
    exit(127);
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v';
}

/* [start, end) without surrounding white space. */
static void strip(const char **start, const char **end)
{
    while (*start < *end && is_space(**start))
        (*start)++;
    while (*end > *start && is_space((*end)[-1]))
        (*end)--;
}

static int equals(const char *s, const char *e, const char *word)
{
    size_t n = strlen(word);
    return (size_t)(e - s) == n && memcmp(s, word, n) == 0;
}

/*
 * [appliance] runtime_directory of a configuration file, read just well
 * enough to find the query socket: a plain quoted string, or the default
 * when the section does not name one.  Written any other way (escapes,
 * multi-line strings, twice, unquoted, empty): 0, no guess, and the
 * Python command runs.  A relative directory is relative to the current
 * one, as it is for the daemon.  A wrong guess is harmless: the daemon
 * checks that the request names its own configuration file before it
 * answers.
 */
static int runtime_directory(const char *text, size_t size, char *out, size_t out_size)
{
    const char *line = text, *limit = text + size;
    int in_appliance = 0, found = 0;

    if (memchr(text, '\0', size) != NULL)
        return 0;
    while (line < limit) {
        const char *nl = memchr(line, '\n', (size_t)(limit - line));
        const char *s = line, *e = nl ? nl : limit;

        line = nl ? nl + 1 : limit;
        strip(&s, &e);
        if (s < e && *s == '[') {
            const char *hash = memchr(s, '#', (size_t)(e - s));
            const char *he = hash ? hash : e;
            strip(&s, &he);
            in_appliance = equals(s, he, "[appliance]");
            continue;
        }
        if (!in_appliance || (size_t)(e - s) < 17 || memcmp(s, "runtime_directory", 17) != 0)
            continue;
        const char *eq = memchr(s, '=', (size_t)(e - s));
        if (eq == NULL)
            continue;
        const char *ks = s, *ke = eq;
        strip(&ks, &ke);
        if (!equals(ks, ke, "runtime_directory"))
            continue;
        const char *vs = eq + 1, *ve = e;
        strip(&vs, &ve);
        if (vs == ve || (*vs != '"' && *vs != '\''))
            return 0;
        const char *close = memchr(vs + 1, *vs, (size_t)(ve - vs - 1));
        if (close == NULL || memchr(vs, '\\', (size_t)(close - vs)) != NULL)
            return 0;
        const char *rs = close + 1, *re = ve;
        strip(&rs, &re);
        if (rs < re && *rs != '#')
            return 0;
        size_t n = (size_t)(close - vs - 1);
        if (found || n == 0 || n >= out_size)
            return 0;
        memcpy(out, vs + 1, n);
        out[n] = '\0';
        found = 1;
    }
    if (!found) {
        if (sizeof RUNTIME_DIRECTORY > out_size)
            return 0;
        memcpy(out, RUNTIME_DIRECTORY, sizeof RUNTIME_DIRECTORY);
    }
    return 1;
}

/* The whole file, NUL-terminated, in *text; 0 when it cannot be read. */
static int read_file(const char *path, char **text, size_t *size)
{
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    size_t got = 0;

    if (fd < 0)
        return 0;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > MAX_CONFIG_SIZE
            || (*text = malloc((size_t)st.st_size + 1)) == NULL) {
        close(fd);
        return 0;
    }
    while (got < (size_t)st.st_size) {
        ssize_t n = read(fd, *text + got, (size_t)st.st_size - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;                      /* shrunk while read: scan what there is */
        got += (size_t)n;
    }
    close(fd);
    (*text)[got] = '\0';
    *size = got;
    return 1;
}

/* All of n bytes from the socket: 1; end of stream or error: 0. */
static int read_exactly(int fd, char *buf, size_t n)
{
    while (n > 0) {
        ssize_t got = recv(fd, buf, n, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return 0;
        buf += got;
        n -= (size_t)got;
    }
    return 1;
}

static int write_all(int fd, const char *buf, size_t n)
{
    while (n > 0) {
        ssize_t put = write(fd, buf, n);
        if (put < 0 && errno == EINTR)
            continue;
        if (put < 0)
            return 0;
        buf += put;
        n -= (size_t)put;
    }
    return 1;
}

static void fail(const char *format, ...)
{
    va_list ap;

    fputs("mailtresor: ", stderr);
    va_start(ap, format);
    vfprintf(stderr, format, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/*
 * Ask the daemon.  Returns (for the Python command to run) when no daemon
 * answers for this configuration file; otherwise exits with the answer's code.
 */
static void ask_daemon(const char *config, int argc, char **argv)
{
    char path[PATH_MAX], directory[sizeof ((struct sockaddr_un *)0)->sun_path];
    struct sockaddr_un address = { .sun_family = AF_UNIX };
    struct timeval timeout = { .tv_sec = ANSWER_TIMEOUT };
    char *text, *request, head[5], buf[65536];
    size_t size, length, i;
    int fd, wrote = 0;

    if (realpath(config, path) == NULL || !read_file(path, &text, &size))
        return;
    if (!runtime_directory(text, size, directory, sizeof directory)) {
        free(text);
        return;
    }
    free(text);
    if ((size_t)snprintf(address.sun_path, sizeof address.sun_path, "%s/%s", directory, SOCKET_NAME)
            >= sizeof address.sun_path)
        return;

    /* MAGIC, length (4 bytes, big-endian), then NUL-separated fields:
     * the configuration file's real path and the arguments from the
     * command name on. */
    length = strlen(path);
    for (i = 1; i < (size_t)argc; i++)
        length += 1 + strlen(argv[i]);
    if (length > UINT32_MAX || (request = malloc(8 + length)) == NULL)
        return;
    memcpy(request, MAGIC, 4);
    request[4] = (char)(length >> 24);
    request[5] = (char)(length >> 16);
    request[6] = (char)(length >> 8);
    request[7] = (char)length;
    size = (size_t)(stpcpy(request + 8, path) - request);
    for (i = 1; i < (size_t)argc; i++) {
        request[size++] = '\0';
        size = (size_t)(stpcpy(request + size, argv[i]) - request);
    }

    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        free(request);
        return;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    if (connect(fd, (struct sockaddr *)&address, sizeof address) != 0
            || send(fd, request, size, MSG_NOSIGNAL) != (ssize_t)size) {
        free(request);
        close(fd);
        return;                         /* no daemon, or it refused to listen */
    }
    free(request);
    signal(SIGPIPE, SIG_IGN);           /* a closed stdout is an error from write() */

    /* Frames: kind (1 byte), length (4 bytes, big-endian), data. */
    while (read_exactly(fd, head, sizeof head)) {
        size_t n = (size_t)(unsigned char)head[1] << 24 | (size_t)(unsigned char)head[2] << 16
                   | (size_t)(unsigned char)head[3] << 8 | (size_t)(unsigned char)head[4];

        if (head[0] == FRAME_DECLINE && !wrote) {
            close(fd);                  /* not for this daemon: the command runs itself */
            return;
        }
        if (head[0] == FRAME_EXIT) {
            char digits[4] = { 0 };
            char *end;
            long code;

            if (n < 1 || n > 3 || !read_exactly(fd, digits, n))
                break;
            code = strtol(digits, &end, 10);
            if (*end != '\0' || digits[0] < '0' || digits[0] > '9' || code > 255)
                break;
            exit((int)code);
        }
        if (head[0] != FRAME_OUT && head[0] != FRAME_ERR)
            break;
        wrote = 1;
        while (n > 0) {
            size_t chunk = n < sizeof buf ? n : sizeof buf;
            if (!read_exactly(fd, buf, chunk))
                fail("the daemon stopped answering half way");
            if (!write_all(head[0] == FRAME_OUT ? 1 : 2, buf, chunk)) {
                if (errno == EPIPE)
                    exit(0);            /* as the command does: a closed pipe ends it quietly */
                fail("cannot write the answer: %s", strerror(errno));
            }
            n -= chunk;
        }
    }
    if (!wrote) {
        close(fd);                      /* it went away before answering */
        return;
    }
    fail("the daemon stopped answering half way");
}

int main(int argc, char **argv)
{
    const char *config = NULL, *no_daemon = getenv(NO_DAEMON_ENV_VAR);
    int i = 1, j;

    while (i < argc) {                  /* the options before the command */
        if (strcmp(argv[i], "--config") == 0 && i + 1 < argc) {
            config = argv[i + 1];
            i += 2;
        } else if (strncmp(argv[i], "--config=", 9) == 0) {
            config = argv[i] + 9;
            i += 1;
        } else {
            break;
        }
    }
    if (i < argc && (no_daemon == NULL || *no_daemon == '\0')) {
        int is_served = 0, wants_help = 0;

        for (j = 0; served[j] != NULL; j++)
            is_served |= strcmp(argv[i], served[j]) == 0;
        for (j = i + 1; j < argc; j++)
            wants_help |= strcmp(argv[j], "-h") == 0 || strcmp(argv[j], "--help") == 0;
        if (is_served && !wants_help) {
            if (config == NULL || *config == '\0')
                config = getenv(CONFIG_ENV_VAR);
            if (config == NULL || *config == '\0')
                config = CONFIG_PATH;
            ask_daemon(config, argc - i + 1, argv + i - 1);
        }
    }
    run_python(argc, argv);
    return 127;
}
