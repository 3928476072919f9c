/*
 * Benchmark workload: holds N MiB of random (incompressible) anonymous memory and sleeps.
 *
 *   workload MIB READY_FILE
 *
 * Fills MIB MiB of private anonymous memory with pseudo-random bytes (xoshiro256**, seeded from
 * getrandom(2), so every run holds different data and no page is zero or shareable), then writes
 * "ready <mib> <checksum>\n" to READY_FILE and waits in pause() forever. Compiled by bench/run with
 * `cc -O2` at bench time. It is meant to be the PID 1 of its own pid namespace; such a process
 * ignores SIGTERM, so it is stopped with SIGKILL.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <unistd.h>

static uint64_t s[4];

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static inline uint64_t next(void)
{
	uint64_t result = rotl(s[1] * 5, 7) * 9;
	uint64_t t = s[1] << 17;
	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl(s[3], 45);
	return result;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s MIB READY_FILE\n", argv[0]);
		return 2;
	}
	char *end;
	unsigned long mib = strtoul(argv[1], &end, 10);
	if (*end || mib == 0) {
		fprintf(stderr, "bad size: %s\n", argv[1]);
		return 2;
	}
	size_t len = (size_t)mib << 20;

	if (getrandom(s, sizeof(s), 0) != sizeof(s)) {
		perror("getrandom");
		return 1;
	}
	uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	uint64_t sum = 0;
	for (size_t i = 0; i < len / sizeof(uint64_t); i++) {
		uint64_t v = next();
		p[i] = v;
		sum += v;
	}

	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.tmp", argv[2]);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		perror("open ready file");
		return 1;
	}
	char line[128];
	int n = snprintf(line, sizeof(line), "ready %lu %016llx\n", mib, (unsigned long long)sum);
	if (write(fd, line, n) != n || close(fd) != 0 || rename(tmp, argv[2]) != 0) {
		perror("write ready file");
		return 1;
	}
	for (;;)
		pause();
}
