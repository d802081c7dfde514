/* mmstress: exercise the user page-table paths whose PTE loops run in lazy MMU mode.
 * mprotect -> change_pte_range, mremap -> move_ptes, madvise(DONTNEED)/munmap -> zap_pte_range,
 * fork of a large mapping -> copy_pte_range. Usage: mmstress ITERATIONS */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define SMALL (1UL << 20)   /* 1 MiB */
#define LARGE (8UL << 20)   /* 8 MiB for the fork */

static void touch(char *p, size_t len) {
    for (size_t off = 0; off < len; off += 4096)
        p[off] = (char)off;
}

int main(int argc, char **argv) {
    int iterations = argc > 1 ? atoi(argv[1]) : 5;
    long sum = 0;
    for (int i = 0; i < iterations; i++) {
        char *p = mmap(NULL, SMALL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) { perror("mmap"); return 1; }
        touch(p, SMALL);
        if (mprotect(p, SMALL, PROT_READ)) { perror("mprotect"); return 1; }
        sum += p[4096];
        if (mprotect(p, SMALL, PROT_READ | PROT_WRITE)) { perror("mprotect"); return 1; }
        char *q = mremap(p, SMALL, 2 * SMALL, MREMAP_MAYMOVE);
        if (q == MAP_FAILED) { perror("mremap"); return 1; }
        touch(q, 2 * SMALL);
        if (madvise(q, SMALL, MADV_DONTNEED)) { perror("madvise"); return 1; }
        touch(q, SMALL);
        if (munmap(q, 2 * SMALL)) { perror("munmap"); return 1; }

        char *big = mmap(NULL, LARGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (big == MAP_FAILED) { perror("mmap"); return 1; }
        touch(big, LARGE);
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid == 0) {
            touch(big, LARGE / 4);  /* COW faults in the child */
            _exit(0);
        }
        int st;
        waitpid(pid, &st, 0);
        munmap(big, LARGE);
    }
    printf("mmstress: %d iterations ok (%ld)\n", iterations, sum);
    return 0;
}
