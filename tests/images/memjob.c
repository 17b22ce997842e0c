/*
 * memjob: a deterministic in-memory workload that proves process memory survived a checkpoint.
 *
 * State: N MiB of 4 KiB pages plus a version counter per page. Page p at version v holds words
 * generated from (seed, p, v), so the whole state after step k is a pure function of
 * (mib, mutate, seed, k). Each step bumps the version of a pseudo-random fraction of pages,
 * rewrites them, hashes ALL memory (pages and versions) and prints `step=<k> checksum=<hex16>`.
 *
 *   memjob --mib N --mutate F --seed S [--interval-ms MS] [--steps K] [--log PATH]
 *   memjob --mib N --mutate F --seed S --replay K      print the checksum after step K, exit
 *   SIGUSR1: regenerate every page from its version and compare (`verify=ok` / `verify=FAIL`).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_WORDS (4096 / 8)

static uint64_t *pages;
static uint32_t *versions;
static uint64_t npages, seed;
static volatile sig_atomic_t verify_requested;
static int log_fd = -1;

static uint64_t mix(uint64_t x) { /* splitmix64 finalizer */
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static void fill_page(uint64_t *dst, uint64_t p, uint32_t v) {
    uint64_t s = mix(seed ^ mix(p * 0x100000001b3ULL + v));
    for (int i = 0; i < PAGE_WORDS; i++) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; dst[i] = s; }
}

static void mutate(uint64_t step, double fraction) {
    uint64_t n = (uint64_t)(npages * fraction);
    if (n == 0 && fraction > 0) n = 1;
    for (uint64_t j = 0; j < n; j++) {
        uint64_t p = mix(seed ^ mix(step * 0x9e3779b1ULL + j)) % npages;
        versions[p]++;
        fill_page(pages + p * PAGE_WORDS, p, versions[p]);
    }
}

static uint64_t checksum(void) {
    uint64_t h = 0xcbf29ce484222325ULL, total = npages * PAGE_WORDS;
    for (uint64_t i = 0; i < total; i++) h = (h ^ pages[i]) * 0x100000001b3ULL + (h >> 29);
    for (uint64_t p = 0; p < npages; p++) h = (h ^ versions[p]) * 0x100000001b3ULL;
    return h;
}

static int verify_all(uint64_t *bad_page) {
    uint64_t tmp[PAGE_WORDS];
    for (uint64_t p = 0; p < npages; p++) {
        fill_page(tmp, p, versions[p]);
        if (memcmp(tmp, pages + p * PAGE_WORDS, sizeof tmp) != 0) { *bad_page = p; return 0; }
    }
    return 1;
}

static void emit(const char *line) {
    size_t len = strlen(line);
    if (write(STDOUT_FILENO, line, len) < 0) { /* stdout may be gone after a restore; the log stays */ }
    if (log_fd >= 0 && write(log_fd, line, len) < 0) { perror("memjob: log"); }
}

static void on_usr1(int sig) { (void)sig; verify_requested = 1; }

static void usage(void) {
    fprintf(stderr, "usage: memjob --mib N --mutate F --seed S [--interval-ms MS] [--steps K] "
                    "[--log PATH] [--replay K]\n");
    exit(2);
}

int main(int argc, char **argv) {
    uint64_t mib = 16, steps = 0, replay = 0; double fraction = 0.05; long interval_ms = 500;
    int do_replay = 0; const char *log_path = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) usage();
        if (!strcmp(a, "--mib")) mib = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--mutate")) fraction = strtod(v, NULL);
        else if (!strcmp(a, "--seed")) seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--interval-ms")) interval_ms = strtol(v, NULL, 10);
        else if (!strcmp(a, "--steps")) steps = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--log")) log_path = v;
        else if (!strcmp(a, "--replay")) { replay = strtoull(v, NULL, 10); do_replay = 1; }
        else usage();
        i++;
    }
    if (mib == 0 || fraction < 0 || fraction > 1) usage();
    npages = mib * 256;
    pages = mmap(NULL, npages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    versions = calloc(npages, sizeof *versions);
    if (pages == MAP_FAILED || !versions) { perror("memjob: alloc"); return 1; }
    for (uint64_t p = 0; p < npages; p++) fill_page(pages + p * PAGE_WORDS, p, 0);

    char line[160];
    if (do_replay) {
        for (uint64_t s = 1; s <= replay; s++) mutate(s, fraction);
        printf("step=%llu checksum=%016llx\n", (unsigned long long)replay, (unsigned long long)checksum());
        return 0;
    }
    if (log_path && (log_fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644)) < 0) {
        perror("memjob: open log"); return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGUSR1, on_usr1);
    snprintf(line, sizeof line, "memjob start mib=%llu mutate=%g seed=%llu pid=%d\n",
             (unsigned long long)mib, fraction, (unsigned long long)seed, getpid());
    emit(line);
    for (uint64_t s = 1; steps == 0 || s <= steps; s++) {
        mutate(s, fraction);
        snprintf(line, sizeof line, "step=%llu checksum=%016llx\n", (unsigned long long)s,
                 (unsigned long long)checksum());
        emit(line);
        if (verify_requested) {
            uint64_t bad = 0;
            verify_requested = 0;
            if (verify_all(&bad)) snprintf(line, sizeof line, "verify=ok step=%llu pages=%llu\n",
                                           (unsigned long long)s, (unsigned long long)npages);
            else snprintf(line, sizeof line, "verify=FAIL step=%llu page=%llu\n",
                          (unsigned long long)s, (unsigned long long)bad);
            emit(line);
            if (strstr(line, "FAIL")) return 3;
        }
        struct timespec ts = {interval_ms / 1000, (interval_ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
    }
    emit("memjob done\n");
    return 0;
}
