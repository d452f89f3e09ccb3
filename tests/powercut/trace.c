/*
 * fetter's power-cut trace: an LD_PRELOAD library that records, for every file under one
 * directory, what a power cut could lose — each write with its data, each truncation, creation,
 * rename, unlink and mkdir, and each sync (fsync, fdatasync, syncfs; sync_file_range is recorded
 * but syncs nothing durable) — in the order the calls returned. The power-loss test
 * (tests/tests/power_loss.rs) replays the trace up to a cut point keeping only what was synced.
 *
 * Environment: FETTER_TRACE_PREFIX (absolute directory whose files are traced),
 * FETTER_TRACE_OUT (the trace file, appended).
 *
 * Record: [u32 length of the rest][u8 op][u64 CLOCK_REALTIME ns when the call returned]
 *         [u64 arg][u8 flags][u32 n][path 1][u32 n][path 2][data...]
 * Paths are resolved through /proc/self/fd (an unlinked file's ends in " (deleted)").
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum {
    OP_CREATE = 1,   /* path 1 created (O_CREAT of a path that did not exist) */
    OP_WRITE = 2,    /* arg = offset, data */
    OP_TRUNCATE = 3, /* arg = new length */
    OP_FSYNC = 4,    /* file or directory; fdatasync too */
    OP_SYNCFS = 5,
    OP_UNLINK = 6,
    OP_RENAME = 7, /* path 1 -> path 2 */
    OP_MKDIR = 8,
    OP_SYNC_FILE_RANGE = 9,
    OP_RMDIR = 10,
};

#define FLAG_TRUNCATED 1

static pthread_mutex_t trace_lock = PTHREAD_MUTEX_INITIALIZER;
static int trace_fd = -1;
static char prefix[PATH_MAX];
static size_t prefix_len;
static int ready;

#define REAL(name) real_##name
#define DECLARE_REAL(ret, name, ...)                                                              \
    static ret (*real_##name)(__VA_ARGS__);                                                       \
    static void load_##name(void) {                                                               \
        if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name);                                  \
    }

DECLARE_REAL(int, open, const char *, int, ...)
DECLARE_REAL(int, open64, const char *, int, ...)
DECLARE_REAL(int, openat, int, const char *, int, ...)
DECLARE_REAL(int, openat64, int, const char *, int, ...)
DECLARE_REAL(ssize_t, write, int, const void *, size_t)
DECLARE_REAL(ssize_t, pwrite, int, const void *, size_t, off_t)
DECLARE_REAL(ssize_t, pwrite64, int, const void *, size_t, off_t)
DECLARE_REAL(ssize_t, writev, int, const struct iovec *, int)
DECLARE_REAL(int, ftruncate, int, off_t)
DECLARE_REAL(int, ftruncate64, int, off_t)
DECLARE_REAL(int, fsync, int)
DECLARE_REAL(int, fdatasync, int)
DECLARE_REAL(int, syncfs, int)
DECLARE_REAL(int, sync_file_range, int, off_t, off_t, unsigned int)
DECLARE_REAL(int, unlink, const char *)
DECLARE_REAL(int, unlinkat, int, const char *, int)
DECLARE_REAL(int, rename, const char *, const char *)
DECLARE_REAL(int, renameat, int, const char *, int, const char *)
DECLARE_REAL(int, renameat2, int, const char *, int, const char *, unsigned int)
DECLARE_REAL(int, mkdir, const char *, mode_t)
DECLARE_REAL(int, mkdirat, int, const char *, mode_t)
DECLARE_REAL(int, rmdir, const char *)

static void init(void) {
    if (ready) return;
    const char *p = getenv("FETTER_TRACE_PREFIX");
    const char *out = getenv("FETTER_TRACE_OUT");
    load_open();
    load_open64();
    load_openat();
    load_openat64();
    load_write();
    load_pwrite();
    load_pwrite64();
    load_writev();
    load_ftruncate();
    load_ftruncate64();
    load_fsync();
    load_fdatasync();
    load_syncfs();
    load_sync_file_range();
    load_unlink();
    load_unlinkat();
    load_rename();
    load_renameat();
    load_renameat2();
    load_mkdir();
    load_mkdirat();
    load_rmdir();
    if (p && out && strlen(p) < sizeof(prefix)) {
        strcpy(prefix, p);
        prefix_len = strlen(prefix);
        trace_fd = REAL(open)(out, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    }
    ready = 1;
}

__attribute__((constructor)) static void trace_constructor(void) { init(); }

static int under_prefix(const char *path) {
    return trace_fd >= 0 && path && strncmp(path, prefix, prefix_len) == 0 &&
           (path[prefix_len] == '/' || path[prefix_len] == 0);
}

/* The path `fd` refers to, into out (size PATH_MAX); 0 if it is not under the prefix. */
static int fd_path(int fd, char *out) {
    char link[64];
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, PATH_MAX - 1);
    if (n <= 0) return 0;
    out[n] = 0;
    return under_prefix(out);
}

/* An absolute form of `path` relative to `dirfd` (AT_FDCWD: the working directory). */
static void abs_path(int dirfd, const char *path, char *out) {
    if (path[0] == '/') {
        snprintf(out, PATH_MAX, "%s", path);
        return;
    }
    char base[PATH_MAX];
    if (dirfd == AT_FDCWD) {
        if (!getcwd(base, sizeof(base))) base[0] = 0;
    } else {
        char link[64];
        snprintf(link, sizeof(link), "/proc/self/fd/%d", dirfd);
        ssize_t n = readlink(link, base, sizeof(base) - 1);
        base[n > 0 ? n : 0] = 0;
    }
    snprintf(out, PATH_MAX, "%s/%s", base, path);
}

static void put(char **at, const void *src, size_t n) {
    memcpy(*at, src, n);
    *at += n;
}

static void record(uint8_t op, uint64_t arg, uint8_t flags, const char *p1, const char *p2,
                   const void *data, size_t data_len) {
    uint32_t n1 = p1 ? (uint32_t)strlen(p1) : 0, n2 = p2 ? (uint32_t)strlen(p2) : 0;
    size_t rest = 1 + 8 + 8 + 1 + 4 + n1 + 4 + n2 + data_len;
    char *buf = malloc(4 + rest);
    if (!buf) abort();
    char *at = buf;
    uint32_t len = (uint32_t)rest;
    put(&at, &len, 4);
    put(&at, &op, 1);
    at += 8; /* time, filled under the lock */
    put(&at, &arg, 8);
    put(&at, &flags, 1);
    put(&at, &n1, 4);
    if (n1) put(&at, p1, n1);
    put(&at, &n2, 4);
    if (n2) put(&at, p2, n2);
    if (data_len) put(&at, data, data_len);
    int saved = errno;
    pthread_mutex_lock(&trace_lock);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t ns = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    memcpy(buf + 5, &ns, 8);
    size_t off = 0;
    while (off < 4 + rest) {
        ssize_t w = REAL(write)(trace_fd, buf + off, 4 + rest - off);
        if (w <= 0) abort(); /* a trace with a hole would prove nothing */
        off += (size_t)w;
    }
    pthread_mutex_unlock(&trace_lock);
    free(buf);
    errno = saved;
}

static int after_open(int fd, int existed, int flags) {
    if (fd < 0 || trace_fd < 0) return fd;
    char path[PATH_MAX];
    if (!fd_path(fd, path)) return fd;
    int created = (flags & O_CREAT) && !existed;
    int truncated = (flags & O_TRUNC) != 0;
    if (created || truncated)
        record(created ? OP_CREATE : OP_TRUNCATE, 0, truncated ? FLAG_TRUNCATED : 0, path, NULL,
               NULL, 0);
    return fd;
}

static int exists_at(int dirfd, const char *path) {
    struct stat st;
    return fstatat(dirfd, path, &st, 0) == 0;
}

#define OPEN_BODY(call, dirfd)                                                                     \
    init();                                                                                        \
    mode_t mode = 0;                                                                               \
    if (flags & (O_CREAT | O_TMPFILE)) {                                                           \
        va_list ap;                                                                                \
        va_start(ap, flags);                                                                       \
        mode = va_arg(ap, mode_t);                                                                 \
        va_end(ap);                                                                                \
    }                                                                                              \
    int existed = (flags & O_CREAT) ? exists_at(dirfd, path) : 1;                                  \
    int fd = call;                                                                                 \
    return after_open(fd, existed, flags);

int open(const char *path, int flags, ...) { OPEN_BODY(REAL(open)(path, flags, mode), AT_FDCWD) }
int open64(const char *path, int flags, ...) { OPEN_BODY(REAL(open64)(path, flags, mode), AT_FDCWD) }
int openat(int dirfd, const char *path, int flags, ...) {
    OPEN_BODY(REAL(openat)(dirfd, path, flags, mode), dirfd)
}
int openat64(int dirfd, const char *path, int flags, ...) {
    OPEN_BODY(REAL(openat64)(dirfd, path, flags, mode), dirfd)
}

static void after_write(int fd, off_t offset, const void *buf, ssize_t n) {
    if (n <= 0 || trace_fd < 0) return;
    char path[PATH_MAX];
    if (fd_path(fd, path)) record(OP_WRITE, (uint64_t)offset, 0, path, NULL, buf, (size_t)n);
}

ssize_t write(int fd, const void *buf, size_t count) {
    init();
    off_t at = -1;
    if (fd != trace_fd && trace_fd >= 0 && fd > 2) {
        int fl = fcntl(fd, F_GETFL);
        at = (fl >= 0 && (fl & O_APPEND)) ? lseek(fd, 0, SEEK_END) : lseek(fd, 0, SEEK_CUR);
    }
    ssize_t n = REAL(write)(fd, buf, count);
    if (at >= 0) after_write(fd, at, buf, n);
    return n;
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    init();
    off_t at = -1;
    if (trace_fd >= 0 && fd > 2) {
        int fl = fcntl(fd, F_GETFL);
        at = (fl >= 0 && (fl & O_APPEND)) ? lseek(fd, 0, SEEK_END) : lseek(fd, 0, SEEK_CUR);
    }
    ssize_t n = REAL(writev)(fd, iov, iovcnt);
    if (at >= 0 && n > 0) {
        char path[PATH_MAX];
        if (fd_path(fd, path)) {
            ssize_t left = n;
            off_t off = at;
            for (int i = 0; i < iovcnt && left > 0; i++) {
                size_t take = iov[i].iov_len < (size_t)left ? iov[i].iov_len : (size_t)left;
                record(OP_WRITE, (uint64_t)off, 0, path, NULL, iov[i].iov_base, take);
                off += (off_t)take;
                left -= (ssize_t)take;
            }
        }
    }
    return n;
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    init();
    ssize_t n = REAL(pwrite)(fd, buf, count, offset);
    after_write(fd, offset, buf, n);
    return n;
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    init();
    ssize_t n = REAL(pwrite64)(fd, buf, count, offset);
    after_write(fd, offset, buf, n);
    return n;
}

static void fd_op(int fd, uint8_t op, uint64_t arg) {
    if (trace_fd < 0) return;
    char path[PATH_MAX];
    if (fd_path(fd, path)) record(op, arg, 0, path, NULL, NULL, 0);
}

int ftruncate(int fd, off_t length) {
    init();
    int r = REAL(ftruncate)(fd, length);
    if (r == 0) fd_op(fd, OP_TRUNCATE, (uint64_t)length);
    return r;
}

int ftruncate64(int fd, off_t length) {
    init();
    int r = REAL(ftruncate64)(fd, length);
    if (r == 0) fd_op(fd, OP_TRUNCATE, (uint64_t)length);
    return r;
}

int fsync(int fd) {
    init();
    int r = REAL(fsync)(fd);
    if (r == 0) fd_op(fd, OP_FSYNC, 0);
    return r;
}

int fdatasync(int fd) {
    init();
    int r = REAL(fdatasync)(fd);
    if (r == 0) fd_op(fd, OP_FSYNC, 0);
    return r;
}

int syncfs(int fd) {
    init();
    int r = REAL(syncfs)(fd);
    if (r == 0 && trace_fd >= 0) record(OP_SYNCFS, 0, 0, NULL, NULL, NULL, 0);
    return r;
}

int sync_file_range(int fd, off_t offset, off_t nbytes, unsigned int flags) {
    init();
    int r = REAL(sync_file_range)(fd, offset, nbytes, flags);
    if (r == 0) fd_op(fd, OP_SYNC_FILE_RANGE, 0);
    return r;
}

static void path_op(uint8_t op, int dirfd, const char *path) {
    if (trace_fd < 0) return;
    char abs[PATH_MAX];
    abs_path(dirfd, path, abs);
    if (under_prefix(abs)) record(op, 0, 0, abs, NULL, NULL, 0);
}

int unlink(const char *path) {
    init();
    int r = REAL(unlink)(path);
    if (r == 0) path_op(OP_UNLINK, AT_FDCWD, path);
    return r;
}

int unlinkat(int dirfd, const char *path, int flags) {
    init();
    int r = REAL(unlinkat)(dirfd, path, flags);
    if (r == 0) path_op((flags & AT_REMOVEDIR) ? OP_RMDIR : OP_UNLINK, dirfd, path);
    return r;
}

int rmdir(const char *path) {
    init();
    int r = REAL(rmdir)(path);
    if (r == 0) path_op(OP_RMDIR, AT_FDCWD, path);
    return r;
}

static void rename_op(int olddirfd, const char *oldpath, int newdirfd, const char *newpath) {
    if (trace_fd < 0) return;
    char a[PATH_MAX], b[PATH_MAX];
    abs_path(olddirfd, oldpath, a);
    abs_path(newdirfd, newpath, b);
    if (under_prefix(a) || under_prefix(b)) record(OP_RENAME, 0, 0, a, b, NULL, 0);
}

int rename(const char *oldpath, const char *newpath) {
    init();
    int r = REAL(rename)(oldpath, newpath);
    if (r == 0) rename_op(AT_FDCWD, oldpath, AT_FDCWD, newpath);
    return r;
}

/* The directory fds stay valid across the call, so the paths are resolved after it. */
int renameat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath) {
    init();
    int r = REAL(renameat)(olddirfd, oldpath, newdirfd, newpath);
    if (r == 0) rename_op(olddirfd, oldpath, newdirfd, newpath);
    return r;
}

int renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath,
              unsigned int flags) {
    init();
    int r = REAL(renameat2)(olddirfd, oldpath, newdirfd, newpath, flags);
    if (r == 0) rename_op(olddirfd, oldpath, newdirfd, newpath);
    return r;
}

int mkdir(const char *path, mode_t mode) {
    init();
    int r = REAL(mkdir)(path, mode);
    if (r == 0) path_op(OP_MKDIR, AT_FDCWD, path);
    return r;
}

int mkdirat(int dirfd, const char *path, mode_t mode) {
    init();
    int r = REAL(mkdirat)(dirfd, path, mode);
    if (r == 0) path_op(OP_MKDIR, dirfd, path);
    return r;
}
