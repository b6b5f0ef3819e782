/*
 * An LD_PRELOAD shim that makes writes or syncs of the files under one
 * directory fail with EIO, for keyclaim's storage fault tests (R10.8).
 *
 * The control file named by KEYCLAIM_EIO_CONTROL holds one line,
 * "<mode> <directory>", read at every intercepted call: mode "write" fails
 * write, pwrite, pwrite64 and writev on files under the directory, mode
 * "sync" fails fsync and fdatasync on them, any other mode (or no file)
 * fails nothing. Every failure it injects appends a byte to the file named
 * by KEYCLAIM_EIO_COUNT, when set, so that a test can tell that the fault
 * was hit.
 *
 * A failed write writes nothing; a failed sync leaves what was written in
 * the page cache (as Linux does after a failed fsync: the data may or may
 * not reach the disk).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
typedef ssize_t (*pwrite64_fn)(int, const void *, size_t, off64_t);
typedef ssize_t (*writev_fn)(int, const struct iovec *, int);
typedef int (*sync_fn)(int);

static void count_fault(void) {
    const char *count = getenv("KEYCLAIM_EIO_COUNT");
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

/* Whether a call of kind `what` ("write" or "sync") on `fd` is to fail. */
static int faulty(int fd, const char *what) {
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
    if (strncmp(path, dir, len) == 0 && (path[len] == '/' || path[len] == '\0')) {
        count_fault();
        return 1;
    }
    return 0;
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
    return real_write(fd, buf, count);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite, pwrite_fn);
    if (faulty(fd, "write")) {
        errno = EIO;
        return -1;
    }
    return real_pwrite(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t offset) {
    REAL(pwrite64, pwrite64_fn);
    if (faulty(fd, "write")) {
        errno = EIO;
        return -1;
    }
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

int fsync(int fd) {
    REAL(fsync, sync_fn);
    if (faulty(fd, "sync")) {
        errno = EIO;
        return -1;
    }
    return real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync, sync_fn);
    if (faulty(fd, "sync")) {
        errno = EIO;
        return -1;
    }
    return real_fdatasync(fd);
}
