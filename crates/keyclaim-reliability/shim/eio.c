/*
 * An LD_PRELOAD shim that makes writes or syncs of the files under one
 * directory fail with EIO, for keyclaim's storage fault tests (R10.8).
 *
 * The control file named by KEYCLAIM_EIO_CONTROL holds one line,
 * "<mode> <directory>", read at every intercepted call: mode "write" fails
 * write, pwrite, pwrite64 and writev on files under the directory, mode
 * "sync" fails fsync and fdatasync on them, any other mode (or no file)
 * fails nothing. Every failure it injects appends a byte to the file named
 * by KEYCLAIM_EIO_COUNT, and every write a failed sync loses one to the
 * file named by KEYCLAIM_EIO_LOST, when set, so that a test can tell that
 * the fault was hit.
 *
 * A failed write writes nothing; a failed sync leaves what was written in
 * the page cache (as Linux does after a failed fsync: the data may or may
 * not reach the disk).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
typedef ssize_t (*pwrite64_fn)(int, const void *, size_t, off64_t);
typedef ssize_t (*writev_fn)(int, const struct iovec *, int);
typedef int (*sync_fn)(int);

/* Appends a byte to the file named by the environment variable `name`. */
static void count_in(const char *name) {
    const char *count = getenv(name);
    if (count == NULL) {
        return;
    }
    int fd = open(count, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        return;
    }
    static write_fn real_write;
    if (real_write == NULL) {
        real_write = (write_fn)dlsym(RTLD_NEXT, "write");
    }
    if (real_write != NULL) {
        (void)real_write(fd, "x", 1);
    }
    close(fd);
}

/* Whether the fault is on in mode `what` ("write" or "sync") for `fd`: a
 * file under the control file's directory. */
static int in_mode(int fd, const char *what) {
    const char *control = getenv("KEYCLAIM_EIO_CONTROL");
    if (control == NULL) {
        return 0;
    }
    char line[4200];
    int cfd = open(control, O_RDONLY | O_CLOEXEC);
    if (cfd < 0) {
        return 0;
    }
    ssize_t n = read(cfd, line, sizeof line - 1);
    close(cfd);
    if (n <= 0) {
        return 0;
    }
    line[n] = '\0';
    char *dir = strchr(line, ' ');
    if (dir == NULL) {
        return 0;
    }
    *dir++ = '\0';
    char *end = strchr(dir, '\n');
    if (end != NULL) {
        *end = '\0';
    }
    if (strcmp(line, what) != 0 || dir[0] == '\0') {
        return 0;
    }
    char link[64];
    char path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t m = readlink(link, path, sizeof path - 1);
    if (m <= 0) {
        return 0;
    }
    path[m] = '\0';
    size_t len = strlen(dir);
    return strncmp(path, dir, len) == 0 && (path[len] == '/' || path[len] == '\0');
}

/* Whether a call of kind `what` on `fd` is to fail (and counts it). */
static int faulty(int fd, const char *what) {
    if (in_mode(fd, what)) {
        count_in("KEYCLAIM_EIO_COUNT");
        return 1;
    }
    return 0;
}

/* The writes to one file descriptor since the fault came on: what each
 * overwrote, newest first, and the file's length before the first. */
struct undo {
    off_t offset;
    size_t len;
    char *old;
    struct undo *next;
};

struct tracked {
    int fd;
    off_t length;
    struct undo *undo;
    struct tracked *next;
};

static struct tracked *tracked_files;
static pthread_mutex_t tracked_lock = PTHREAD_MUTEX_INITIALIZER;

static struct tracked **find_tracked(int fd) {
    struct tracked **t = &tracked_files;
    while (*t != NULL && (*t)->fd != fd) {
        t = &(*t)->next;
    }
    return t;
}

/* Drops what is kept for `fd` (synced, or closed). */
static void forget(int fd) {
    pthread_mutex_lock(&tracked_lock);
    struct tracked **at = find_tracked(fd);
    struct tracked *t = *at;
    if (t != NULL) {
        *at = t->next;
        while (t->undo != NULL) {
            struct undo *u = t->undo;
            t->undo = u->next;
            free(u->old);
            free(u);
        }
        free(t);
    }
    pthread_mutex_unlock(&tracked_lock);
}

/* Keeps what a write of `len` bytes at `offset` of `fd` is about to
 * overwrite, while the fault is on in mode "sync". */
static void remember(int fd, off_t offset, size_t len) {
    if (!in_mode(fd, "sync")) {
        return;
    }
    pthread_mutex_lock(&tracked_lock);
    struct tracked *t = *find_tracked(fd);
    if (t == NULL) {
        struct stat st;
        t = calloc(1, sizeof *t);
        if (t == NULL || fstat(fd, &st) != 0) {
            free(t);
            pthread_mutex_unlock(&tracked_lock);
            return;
        }
        t->fd = fd;
        t->length = st.st_size;
        t->next = tracked_files;
        tracked_files = t;
    }
    struct undo *u = calloc(1, sizeof *u);
    char *old = malloc(len > 0 ? len : 1);
    if (u == NULL || old == NULL) {
        free(u);
        free(old);
        pthread_mutex_unlock(&tracked_lock);
        return;
    }
    ssize_t n = pread(fd, old, len, offset);
    u->offset = offset;
    u->len = n > 0 ? (size_t)n : 0;
    u->old = old;
    u->next = t->undo;
    t->undo = u;
    pthread_mutex_unlock(&tracked_lock);
}

typedef int (*close_fn)(int);

/* Puts back what the writes to `fd` since the fault came on overwrote. */
static void lose_unsynced(int fd, pwrite_fn real_pwrite) {
    size_t lost = 0;
    pthread_mutex_lock(&tracked_lock);
    struct tracked *t = *find_tracked(fd);
    if (t != NULL) {
        for (struct undo *u = t->undo; u != NULL; u = u->next) {
            (void)real_pwrite(fd, u->old, u->len, u->offset);
            lost++;
        }
        (void)ftruncate(fd, t->length);
    }
    pthread_mutex_unlock(&tracked_lock);
    forget(fd);
    /* Counted once the lock is released: counting opens and closes a file,
     * and close takes the lock. */
    while (lost-- > 0) {
        count_in("KEYCLAIM_EIO_LOST");
    }
}

#define REAL(name, type)                                                       \
    static type real_##name;                                                   \
    if (real_##name == NULL) {                                                 \
        real_##name = (type)dlsym(RTLD_NEXT, #name);                           \
    }                                                                          \
    if (real_##name == NULL) {                                                 \
        errno = ENOSYS;                                                        \
        return -1;                                                             \
    }

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write, write_fn);
    if (faulty(fd, "write")) {
        errno = EIO;
        return -1;
    }
    off_t at = lseek(fd, 0, SEEK_CUR);
    if (at >= 0) {
        remember(fd, at, count);
    }
    return real_write(fd, buf, count);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite, pwrite_fn);
    if (faulty(fd, "write")) {
        errno = EIO;
        return -1;
    }
    remember(fd, offset, count);
    return real_pwrite(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t offset) {
    REAL(pwrite64, pwrite64_fn);
    if (faulty(fd, "write")) {
        errno = EIO;
        return -1;
    }
    remember(fd, offset, count);
    return real_pwrite64(fd, buf, count, offset);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    REAL(writev, writev_fn);
    if (faulty(fd, "write")) {
        errno = EIO;
        return -1;
    }
    return real_writev(fd, iov, iovcnt);
}

/* A sync that fails loses the unsynced writes; one that succeeds makes
 * them durable. */
static int sync_with(int fd, sync_fn real_sync) {
    REAL(pwrite, pwrite_fn);
    if (faulty(fd, "sync")) {
        lose_unsynced(fd, real_pwrite);
        errno = EIO;
        return -1;
    }
    int rc = real_sync(fd);
    if (rc == 0) {
        forget(fd);
    }
    return rc;
}

int fsync(int fd) {
    REAL(fsync, sync_fn);
    return sync_with(fd, real_fsync);
}

int fdatasync(int fd) {
    REAL(fdatasync, sync_fn);
    return sync_with(fd, real_fdatasync);
}

int close(int fd) {
    REAL(close, close_fn);
    forget(fd);
    return real_close(fd);
}
