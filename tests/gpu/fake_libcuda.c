/*
 * A fake libcuda for CPU-only tests of shim/gpu: the checkpoint entry points with the driver's real
 * per-process state machine, plus fault injection. Built by tests/gpu/conftest.py with gcc.
 *
 *   cuCheckpointProcessLock        RUNNING      -> LOCKED        else CUDA_ERROR_ILLEGAL_STATE (401)
 *   cuCheckpointProcessCheckpoint  LOCKED       -> CHECKPOINTED  else 401
 *   cuCheckpointProcessRestore     CHECKPOINTED -> LOCKED        else 401
 *   cuCheckpointProcessUnlock      LOCKED       -> RUNNING       else 401
 *   FAILED accepts nothing. Every call before cuInit -> CUDA_ERROR_NOT_INITIALIZED (3).
 *   A pid that does not exist, or is not a "CUDA process", -> CUDA_ERROR_INVALID_VALUE (1).
 *
 * Environment (read at every call, so a test can change it between calls):
 *   FAKE_CUDA_STATE_DIR      folder for all observable state (required by the checkpoint calls):
 *                              state.<pid>  the pid's state: running | locked | checkpointed | failed
 *                              calls.log    one line per call: "<call> <pid> [timeoutMs] -> <rc>"
 *                              faults       fault rules, read at every call (below)
 *   FAKE_CUDA_DEVICE_PREFIX  a pid with an open fd whose path starts with this is a CUDA process (its
 *                            state starts RUNNING); so is any pid that already has a state file
 *   FAKE_CUDA_DEVICES        comma-separated device names (default "Fake GPU"), "" for none
 *   FAKE_CUDA_DEVICE_MEM     bytes per device (default 80 GiB)
 *   FAKE_CUDA_DRIVER_VERSION cuDriverGetVersion's answer (default 13000)
 *
 * Fault rules, one per line: "<op> <pid|*> <action> [arg] [once]"
 *   op:     init | getstate | lock | checkpoint | restore | unlock
 *   action: fail CODE       return CODE, state unchanged
 *           failstate CODE  the process becomes FAILED, return CODE
 *           delay MS        sleep MS, then act normally; for lock with timeoutMs > 0 and MS > timeoutMs:
 *                           sleep timeoutMs and return CUDA_ERROR_TIMEOUT (909), state left RUNNING, as the
 *                           driver documents for a lock that times out
 *           stall MS        sleep MS ignoring any timeout, then act normally (a driver that hangs)
 *   once:   the rule is used once (the fake comments it out in the file)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef struct { unsigned char bytes[16]; } CUuuid;

enum { RUNNING = 0, LOCKED = 1, CHECKPOINTED = 2, FAILED = 3 };
static const char *state_names[] = {"running", "locked", "checkpointed", "failed"};

#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_OUT_OF_MEMORY 2
#define CUDA_ERROR_NOT_INITIALIZED 3
#define CUDA_ERROR_NO_DEVICE 100
#define CUDA_ERROR_INVALID_DEVICE 101
#define CUDA_ERROR_OPERATING_SYSTEM 304
#define CUDA_ERROR_ILLEGAL_STATE 401
#define CUDA_ERROR_NOT_SUPPORTED 801
#define CUDA_ERROR_TIMEOUT 909
#define CUDA_ERROR_UNKNOWN 999

static struct { int code; const char *name; const char *text; } errors[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {304, "CUDA_ERROR_OPERATING_SYSTEM", "OS call failed or operation not supported on this OS"},
    {401, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state"},
    {801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {909, "CUDA_ERROR_TIMEOUT", "wait operation timed out"},
    {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

static int initialized;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;  /* guards state-file read-modify-write */

static const char *state_dir(void) { return getenv("FAKE_CUDA_STATE_DIR"); }

static void log_call(const char *fmt, ...) {
    const char *dir = state_dir();
    if (!dir) return;
    char path[4096], line[512];
    snprintf(path, sizeof path, "%s/calls.log", dir);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) return;
    if (write(fd, line, n) < 0) { /* best effort */ }
    close(fd);
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

/* Fault lookup: the first matching rule for (op, pid). Returns 1 and fills action/arg when found. */
static int find_fault(const char *op, int pid, char *action, long *arg) {
    const char *dir = state_dir();
    if (!dir) return 0;
    char path[4096];
    snprintf(path, sizeof path, "%s/faults", dir);
    int fd = open(path, O_RDWR);
    if (fd < 0) return 0;
    flock(fd, LOCK_EX);
    char buf[16384];
    ssize_t len = read(fd, buf, sizeof buf - 1);
    int found = 0;
    if (len > 0) {
        buf[len] = 0;
        char *line = buf;
        while (line && *line) {
            char *next = strchr(line, '\n');
            if (next) *next = 0;
            char rop[32], rpid[32], ract[32], a4[32] = "", a5[32] = "";
            int n = sscanf(line, "%31s %31s %31s %31s %31s", rop, rpid, ract, a4, a5);
            if (line[0] != '#' && n >= 3 && strcmp(rop, op) == 0 &&
                (strcmp(rpid, "*") == 0 || atoi(rpid) == pid)) {
                strcpy(action, ract);
                *arg = (n >= 4 && strcmp(a4, "once") != 0) ? atol(a4) : 0;
                int once = strcmp(a4, "once") == 0 || strcmp(a5, "once") == 0;
                if (once) {  /* comment the rule out in place: same length file, one '#' replaces ' ' */
                    off_t off = line - buf;
                    if (pwrite(fd, "#", 1, off) != 1) { /* best effort */ }
                }
                found = 1;
                break;
            }
            line = next ? next + 1 : NULL;
        }
    }
    flock(fd, LOCK_UN);
    close(fd);
    return found;
}

static int pid_exists(int pid) { return pid > 0 && (kill(pid, 0) == 0 || errno == EPERM); }

static int opens_device(int pid) {
    const char *prefix = getenv("FAKE_CUDA_DEVICE_PREFIX");
    if (!prefix || !*prefix) return 0;
    char dpath[64], lpath[512], target[4096];
    snprintf(dpath, sizeof dpath, "/proc/%d/fd", pid);
    DIR *d = opendir(dpath);
    if (!d) return 0;
    struct dirent *e;
    int hit = 0;
    while (!hit && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        snprintf(lpath, sizeof lpath, "%s/%s", dpath, e->d_name);
        ssize_t n = readlink(lpath, target, sizeof target - 1);
        if (n <= 0) continue;
        target[n] = 0;
        hit = strncmp(target, prefix, strlen(prefix)) == 0;
    }
    closedir(d);
    return hit;
}

static void write_state(int pid, int st) {
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s/state.%d", state_dir(), pid);
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)gettid());
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fprintf(f, "%s\n", state_names[st]);
    fclose(f);
    rename(tmp, path);
}

/* Current state of pid, -1 when it is not a CUDA process. Caller holds mu. */
static int read_state(int pid) {
    char path[4096], buf[32] = "";
    snprintf(path, sizeof path, "%s/state.%d", state_dir(), pid);
    FILE *f = fopen(path, "r");
    if (!f) {
        if (!opens_device(pid)) return -1;
        write_state(pid, RUNNING);  /* first contact: make the state observable */
        return RUNNING;
    }
    if (!fgets(buf, sizeof buf, f)) buf[0] = 0;
    fclose(f);
    buf[strcspn(buf, "\n")] = 0;
    for (int i = 0; i < 4; i++)
        if (strcmp(buf, state_names[i]) == 0) return i;
    return FAILED;
}

/* One checkpoint operation: faults, then the transition from `from` to `to`. */
static CUresult transition(const char *op, int pid, int from, int to, unsigned timeout_ms) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!state_dir()) return CUDA_ERROR_NOT_SUPPORTED;
    if (!pid_exists(pid)) return CUDA_ERROR_INVALID_VALUE;
    char action[32];
    long arg = 0;
    if (find_fault(op, pid, action, &arg)) {
        if (strcmp(action, "fail") == 0) return (CUresult)arg;
        if (strcmp(action, "failstate") == 0) {
            pthread_mutex_lock(&mu);
            if (read_state(pid) >= 0) write_state(pid, FAILED);
            pthread_mutex_unlock(&mu);
            return (CUresult)arg;
        }
        if (strcmp(action, "delay") == 0) {
            if (strcmp(op, "lock") == 0 && timeout_ms > 0 && arg > (long)timeout_ms) {
                sleep_ms(timeout_ms);
                return CUDA_ERROR_TIMEOUT;  /* the driver leaves the process RUNNING */
            }
            sleep_ms(arg);
        } else if (strcmp(action, "stall") == 0) {
            sleep_ms(arg);
        }
    }
    pthread_mutex_lock(&mu);
    int st = read_state(pid);
    CUresult rc;
    if (st < 0) rc = CUDA_ERROR_INVALID_VALUE;
    else if (st != from) rc = CUDA_ERROR_ILLEGAL_STATE;
    else { write_state(pid, to); rc = CUDA_SUCCESS; }
    pthread_mutex_unlock(&mu);
    return rc;
}

CUresult cuInit(unsigned int flags) {
    char action[32];
    long arg = 0;
    CUresult rc = CUDA_SUCCESS;
    if (flags != 0) rc = CUDA_ERROR_INVALID_VALUE;
    else if (find_fault("init", 0, action, &arg) && strcmp(action, "fail") == 0) rc = (CUresult)arg;
    if (rc == CUDA_SUCCESS) initialized = 1;
    log_call("cuInit %u -> %d", flags, rc);
    return rc;
}

CUresult cuCheckpointProcessGetState(int pid, int *state) {
    CUresult rc;
    char action[32];
    long arg = 0;
    if (!initialized) rc = CUDA_ERROR_NOT_INITIALIZED;
    else if (!state) rc = CUDA_ERROR_INVALID_VALUE;
    else if (!state_dir()) rc = CUDA_ERROR_NOT_SUPPORTED;
    else if (!pid_exists(pid)) rc = CUDA_ERROR_INVALID_VALUE;
    else if (find_fault("getstate", pid, action, &arg) && strcmp(action, "fail") == 0) rc = (CUresult)arg;
    else {
        pthread_mutex_lock(&mu);
        int st = read_state(pid);
        pthread_mutex_unlock(&mu);
        if (st < 0) rc = CUDA_ERROR_INVALID_VALUE;
        else { *state = st; rc = CUDA_SUCCESS; }
    }
    log_call("cuCheckpointProcessGetState %d -> %d", pid, rc);
    return rc;
}

/* The args structs are 64 bytes whose reserved fields must be zero; check them like a strict driver. */
static int reserved_nonzero(const void *p, size_t off, size_t len) {
    const unsigned char *b = (const unsigned char *)p + off;
    for (size_t i = 0; i < len; i++)
        if (b[i]) return 1;
    return 0;
}

CUresult cuCheckpointProcessLock(int pid, void *args) {
    unsigned timeout_ms = 0;
    CUresult rc;
    if (args && reserved_nonzero(args, 4, 60)) rc = CUDA_ERROR_INVALID_VALUE;
    else {
        if (args) memcpy(&timeout_ms, args, sizeof timeout_ms);
        rc = transition("lock", pid, RUNNING, LOCKED, timeout_ms);
    }
    log_call("cuCheckpointProcessLock %d %u -> %d", pid, timeout_ms, rc);
    return rc;
}

CUresult cuCheckpointProcessCheckpoint(int pid, void *args) {
    CUresult rc = (args && reserved_nonzero(args, 0, 64)) ? CUDA_ERROR_INVALID_VALUE
                                                          : transition("checkpoint", pid, LOCKED, CHECKPOINTED, 0);
    log_call("cuCheckpointProcessCheckpoint %d -> %d", pid, rc);
    return rc;
}

CUresult cuCheckpointProcessRestore(int pid, void *args) {
    /* gpuPairs NULL, gpuPairsCount 0, reserved zero: the whole struct is zero when no remap is asked */
    CUresult rc = (args && reserved_nonzero(args, 0, 64)) ? CUDA_ERROR_INVALID_VALUE
                                                          : transition("restore", pid, CHECKPOINTED, LOCKED, 0);
    log_call("cuCheckpointProcessRestore %d -> %d", pid, rc);
    return rc;
}

CUresult cuCheckpointProcessUnlock(int pid, void *args) {
    CUresult rc = (args && reserved_nonzero(args, 0, 64)) ? CUDA_ERROR_INVALID_VALUE
                                                          : transition("unlock", pid, LOCKED, RUNNING, 0);
    log_call("cuCheckpointProcessUnlock %d -> %d", pid, rc);
    return rc;
}

CUresult cuGetErrorName(CUresult code, const char **out) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
        if (errors[i].code == code) { *out = errors[i].name; return CUDA_SUCCESS; }
    *out = NULL;
    return CUDA_ERROR_INVALID_VALUE;
}

CUresult cuGetErrorString(CUresult code, const char **out) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
        if (errors[i].code == code) { *out = errors[i].text; return CUDA_SUCCESS; }
    *out = NULL;
    return CUDA_ERROR_INVALID_VALUE;
}

CUresult cuDriverGetVersion(int *version) {
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    const char *v = getenv("FAKE_CUDA_DRIVER_VERSION");
    *version = v ? atoi(v) : 13000;
    return CUDA_SUCCESS;
}

/* Device queries: names from FAKE_CUDA_DEVICES. */
static int device_name(int index, char *out, size_t len) {
    const char *all = getenv("FAKE_CUDA_DEVICES");
    if (!all) all = "Fake GPU";
    int i = 0;
    const char *p = all;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (i == index) {
            if (out) { snprintf(out, len, "%.*s", (int)n, p); }
            return 1;
        }
        i++;
        if (!end) break;
        p = end + 1;
    }
    return 0;
}

CUresult cuDeviceGetCount(int *count) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    int n = 0;
    while (device_name(n, NULL, 0)) n++;
    *count = n;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *dev, int ordinal) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!dev) return CUDA_ERROR_INVALID_VALUE;
    if (!device_name(ordinal, NULL, 0)) return CUDA_ERROR_INVALID_DEVICE;
    *dev = ordinal;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    return device_name(dev, name, (size_t)len) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (!device_name(dev, NULL, 0)) return CUDA_ERROR_INVALID_DEVICE;
    const char *m = getenv("FAKE_CUDA_DEVICE_MEM");
    *bytes = m ? (size_t)strtoull(m, NULL, 10) : (size_t)80 << 30;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!uuid) return CUDA_ERROR_INVALID_VALUE;
    if (!device_name(dev, NULL, 0)) return CUDA_ERROR_INVALID_DEVICE;
    for (int i = 0; i < 16; i++) uuid->bytes[i] = (unsigned char)(0xf0 + dev + i);
    return CUDA_SUCCESS;
}
