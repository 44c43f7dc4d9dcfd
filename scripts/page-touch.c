/* How fast this machine hands out fresh memory: touches 1 GiB of new anonymous memory (one
 * write a 4 KB page), frees it, waits, and again, four times; with transparent huge pages asked
 * for (1) or refused (0). On a VM whose balloon reports free pages to the host
 * (/sys/module/page_reporting/parameters/reported_kib grows), memory freed in 2 MB blocks goes
 * back to the host, and touching it again waits for the host: compare a wait of 0 s (freed
 * memory not yet reported) with a wait of 5 s. BENCHMARKS.md, "2,000 x 20,000, measured".
 *
 *   cc -O2 -o /tmp/page-touch scripts/page-touch.c
 *   /tmp/page-touch 1 0; /tmp/page-touch 1 5; /tmp/page-touch 0 0; /tmp/page-touch 0 5
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static double touch(size_t n, int huge) {
    char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap of 1 GiB");
        exit(1);
    }
    madvise(p, n, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    double t = now();
    for (size_t i = 0; i < n; i += 4096) p[i] = 1;
    t = now() - t;
    munmap(p, n);
    return t;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s HUGE(0|1) WAIT_SECS\n", argv[0]);
        return 2;
    }
    size_t n = (size_t)1 << 30;
    int huge = atoi(argv[1]);
    double wait = atof(argv[2]);
    for (int round = 0; round < 4; round++) {
        double t = touch(n, huge);
        printf("huge pages %d, wait %.0f s: 1 GiB touched in %.3f s (%.2f GB/s)\n", huge, wait, t,
               1.0 / t);
        usleep((useconds_t)(wait * 1e6));
    }
    return 0;
}
