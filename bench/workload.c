/*
 * Benchmark workload: holds N MiB of anonymous memory and sleeps.
 *
 *   workload MIB READY_FILE [random|typical [REWRITE_PERCENT]]
 *
 * random (the default): fills MIB MiB of private anonymous memory with pseudo-random bytes
 * (xoshiro256**, seeded from getrandom(2), so every run holds different data and no page is zero
 * or shareable).
 *
 * typical: the memory is cut into blocks of 16 pages (64 KiB); exactly half of the blocks, chosen
 * at random, are written with zeros (resident zero pages, not untouched ones: CRIU dumps them);
 * each page of the other half is, at random with equal odds, either
 *   - a "struct" page: 64 records of 64 bytes { u64 id (a global counter), u64 timestamp
 *     (1764000000000 + id * 1000 + rand % 1000), u32 kind (rand % 8), u32 flags (rand & 0x0303),
 *     char name[24] (one of 32 words, NUL padded), u64 value (rand % 100000),
 *     u64 link (0x7f3a00000000 + (rand % 65536) * 64) }, or
 *   - a "text" page: log lines such as
 *     "2026-11-25T07:41:09.123Z INFO worker-3 GET /api/v1/orders/48211 id=1234 user=delta
 *     status=200 bytes=5123 ms=12\n" with every field drawn at random from a small set or range,
 *     cut at the end of the page.
 *
 * Then it writes "ready <mib> <checksum>\n" to READY_FILE and waits for signals, forever:
 *   SIGUSR1: computes the checksum of its memory, writes "sum <checksum>\n" to READY_FILE.sum
 *   SIGUSR2: rewrites REWRITE_PERCENT % (default 5) of its pages, distinct pages chosen at random,
 *            with new random bytes, then writes "rewritten <pages> <checksum>\n" to
 *            READY_FILE.rewritten
 * (each file is written to a temporary name and renamed). The checksum is a 64-bit FNV-1a over
 * the memory's 64-bit words. Compiled by bench/run with `cc -O2` at bench time. It is meant to be
 * the PID 1 of its own pid namespace; such a process ignores SIGTERM, so it is stopped with
 * SIGKILL.
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
#include <sys/prctl.h>
#include <sys/random.h>
#include <unistd.h>

#define PAGE 4096
#define BLOCK_PAGES 16

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

static const char *words[32] = {
	"alpha",   "bravo",  "charlie", "delta",  "echo",     "foxtrot", "golf",    "hotel",
	"india",   "juliet", "kilo",    "lima",   "mike",     "november", "oscar",  "papa",
	"quebec",  "romeo",  "sierra",  "tango",  "uniform",  "victor",  "whiskey", "xray",
	"yankee",  "zulu",   "orders",  "users",  "sessions", "carts",   "invoices", "stock",
};

struct rec {
	uint64_t id;
	uint64_t ts;
	uint32_t kind;
	uint32_t flags;
	char name[24];
	uint64_t value;
	uint64_t link;
};
_Static_assert(sizeof(struct rec) == 64, "record size");

static uint64_t rec_id;

static void struct_page(char *page)
{
	struct rec *r = (struct rec *)page;
	for (int i = 0; i < PAGE / (int)sizeof(struct rec); i++, r++) {
		uint64_t id = rec_id++;
		r->id = id;
		r->ts = 1764000000000ULL + id * 1000 + next() % 1000;
		r->kind = next() % 8;
		r->flags = next() & 0x0303;
		memset(r->name, 0, sizeof(r->name));
		strcpy(r->name, words[next() % 32]);
		r->value = next() % 100000;
		r->link = 0x7f3a00000000ULL + (next() % 65536) * 64;
	}
}

static void text_page(char *page)
{
	static const char *levels[] = {"INFO", "INFO", "INFO", "WARN", "DEBUG"};
	static const char *methods[] = {"GET", "GET", "GET", "POST", "PUT", "DELETE"};
	static const int statuses[] = {200, 200, 200, 201, 304, 404, 500};
	char buf[PAGE + 256];
	size_t n = 0;
	while (n < PAGE) {
		n += snprintf(buf + n, sizeof(buf) - n,
			      "2026-11-25T07:%02u:%02u.%03uZ %s worker-%u %s /api/v1/%s/%u id=%llu "
			      "user=%s status=%d bytes=%u ms=%u\n",
			      (unsigned)(next() % 60), (unsigned)(next() % 60), (unsigned)(next() % 1000),
			      levels[next() % 5], (unsigned)(next() % 8), methods[next() % 6],
			      words[26 + next() % 6], (unsigned)(next() % 100000),
			      (unsigned long long)rec_id++, words[next() % 26],
			      statuses[next() % 7], (unsigned)(next() % 20000), (unsigned)(next() % 200));
	}
	memcpy(page, buf, PAGE);
}

static void random_fill(uint64_t *p, size_t words_n)
{
	for (size_t i = 0; i < words_n; i++)
		p[i] = next();
}

static uint64_t checksum(const uint64_t *p, size_t words_n)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < words_n; i++)
		h = (h ^ p[i]) * 0x100000001b3ULL;
	return h;
}

static int write_file(const char *path, const char *text)
{
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -1;
	size_t n = strlen(text);
	if (write(fd, text, n) != (ssize_t)n) {
		close(fd);
		return -1;
	}
	if (close(fd) != 0 || rename(tmp, path) != 0)
		return -1;
	return 0;
}

static volatile sig_atomic_t want_sum, want_rewrite;

static void on_signal(int sig)
{
	if (sig == SIGUSR1)
		want_sum = 1;
	else
		want_rewrite = 1;
}

int main(int argc, char **argv)
{
	if (argc < 3 || argc > 5) {
		fprintf(stderr, "usage: %s MIB READY_FILE [random|typical [REWRITE_PERCENT]]\n", argv[0]);
		return 2;
	}
	char *end;
	unsigned long mib = strtoul(argv[1], &end, 10);
	if (*end || mib == 0) {
		fprintf(stderr, "bad size: %s\n", argv[1]);
		return 2;
	}
	int typical = 0;
	if (argc >= 4) {
		if (strcmp(argv[3], "typical") == 0)
			typical = 1;
		else if (strcmp(argv[3], "random") != 0) {
			fprintf(stderr, "bad mode: %s\n", argv[3]);
			return 2;
		}
	}
	double rewrite_percent = 5.0;
	if (argc == 5) {
		rewrite_percent = strtod(argv[4], &end);
		if (*end || rewrite_percent < 0 || rewrite_percent > 100) {
			fprintf(stderr, "bad percent: %s\n", argv[4]);
			return 2;
		}
	}
	size_t len = (size_t)mib << 20;
	size_t npages = len / PAGE;

	if (getrandom(s, sizeof(s), 0) != sizeof(s)) {
		perror("getrandom");
		return 1;
	}
	char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	uint64_t *p = (uint64_t *)mem;
	if (!typical) {
		random_fill(p, len / sizeof(uint64_t));
	} else {
		size_t nblocks = npages / BLOCK_PAGES;
		unsigned char *zero = malloc(nblocks ? nblocks : 1);
		if (!zero) {
			perror("malloc");
			return 1;
		}
		for (size_t b = 0; b < nblocks; b++)
			zero[b] = b < nblocks / 2;
		for (size_t b = nblocks; b > 1; b--) { /* Fisher-Yates */
			size_t j = next() % b;
			unsigned char t = zero[b - 1];
			zero[b - 1] = zero[j];
			zero[j] = t;
		}
		for (size_t pg = 0; pg < npages; pg++) {
			char *page = mem + pg * PAGE;
			size_t b = pg / BLOCK_PAGES;
			if (b < nblocks && zero[b])
				memset(page, 0, PAGE); /* a write fault: a real, resident page of zeros */
			else if (next() & 1)
				struct_page(page);
			else
				text_page(page);
		}
		free(zero);
	}
	uint64_t sum = checksum(p, len / sizeof(uint64_t));

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL) != 0 || sigaction(SIGUSR2, &sa, NULL) != 0) {
		perror("sigaction");
		return 1;
	}

	char line[256], path[4096];
	snprintf(line, sizeof(line), "ready %lu %016llx\n", mib, (unsigned long long)sum);
	if (write_file(argv[2], line) != 0) {
		perror("write ready file");
		return 1;
	}
	for (;;) {
		/* pause(), not sigsuspend(): a task seized in pause() is restored in pause(). The bench
		 * sends one signal and waits for the answer, so a signal never arrives while the loop
		 * is busy and none is lost. */
		pause();
		if (want_rewrite) {
			want_rewrite = 0;
			size_t count = (size_t)(npages * rewrite_percent / 100.0);
			uint32_t *idx = malloc(npages * sizeof(uint32_t));
			if (!idx) {
				perror("malloc");
				return 1;
			}
			for (size_t i = 0; i < npages; i++)
				idx[i] = i;
			for (size_t i = 0; i < count; i++) { /* partial Fisher-Yates: distinct pages */
				size_t j = i + next() % (npages - i);
				uint32_t t = idx[i];
				idx[i] = idx[j];
				idx[j] = t;
				random_fill((uint64_t *)(mem + (size_t)idx[i] * PAGE), PAGE / sizeof(uint64_t));
			}
			free(idx);
			sum = checksum(p, len / sizeof(uint64_t));
			snprintf(line, sizeof(line), "rewritten %zu %016llx\n", count, (unsigned long long)sum);
			snprintf(path, sizeof(path), "%s.rewritten", argv[2]);
			if (write_file(path, line) != 0) {
				perror("write rewritten file");
				return 1;
			}
		}
		if (want_sum) {
			want_sum = 0;
			sum = checksum(p, len / sizeof(uint64_t));
			snprintf(line, sizeof(line), "sum %016llx\n", (unsigned long long)sum);
			snprintf(path, sizeof(path), "%s.sum", argv[2]);
			if (write_file(path, line) != 0) {
				perror("write sum file");
				return 1;
			}
		}
	}
}
