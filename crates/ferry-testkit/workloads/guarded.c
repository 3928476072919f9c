/*
 * guarded DIR N_MIB [THREADS]: holds N MiB of pseudo-random bytes in a private anonymous
 * mapping with guard regions in it (madvise(MADV_GUARD_INSTALL), kernel 6.13+): its first page
 * and one page in its middle. THREADS more threads (default none) run on stacks of their own,
 * 8 MiB private anonymous mappings whose lowest page is a guard region, as glibc 2.42 and later
 * make every thread stack; each wakes every 10 ms and checks a canary on its stack (a restore
 * that got a stack wrong makes the process exit with code 3).
 *
 * On SIGUSR1 writes "fnv64:<hash of the buffer's pages outside the guards> guards:<guard pages
 * the kernel still reports>/<guard pages installed>" to DIR/hash.<host pid>. Writes
 * DIR/ready.<host pid> once the memory is filled and the threads run; exits with code 2 (after
 * writing DIR/unsupported.<host pid>) where the kernel has no guard regions.
 *
 * Built by ferry-testkit's build script. Files are named by the host pid (/proc is the host's
 * even inside a new pid namespace), read anew at each write: restored copies get new pids.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif
#define PAGE 4096UL
#define STACK (8UL << 20)
#define PM_GUARD (1ULL << 58)

static const char *dir;
static unsigned char *buf;
static size_t size;
static unsigned long guards[64];
static int nguards;
static volatile sig_atomic_t hash_requested;

static int host_pid(void)
{
	char link[32] = { 0 };
	if (readlink("/proc/self", link, sizeof(link) - 1) < 0)
		return getpid();
	return atoi(link);
}

static void write_atomic(const char *what, const char *text)
{
	char path[4096], tmp[4200];
	int fd;
	snprintf(path, sizeof(path), "%s/%s.%d", dir, what, host_pid());
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text) || close(fd) || rename(tmp, path))
		exit(4);
}

static void guard(unsigned long addr)
{
	if (madvise((void *)addr, PAGE, MADV_GUARD_INSTALL)) {
		if (errno == EINVAL) {
			write_atomic("unsupported", strerror(errno));
			exit(2);
		}
		exit(5);
	}
	guards[nguards++] = addr;
}

/* Guard pages the kernel reports (bit 58 of /proc/self/pagemap). */
static int guards_present(void)
{
	int fd = open("/proc/self/pagemap", O_RDONLY), n = 0;
	for (int i = 0; fd >= 0 && i < nguards; i++) {
		uint64_t e = 0;
		if (pread(fd, &e, sizeof(e), (guards[i] / PAGE) * sizeof(e)) == sizeof(e) && (e & PM_GUARD))
			n++;
	}
	if (fd >= 0)
		close(fd);
	return n;
}

static int is_guard(unsigned long addr)
{
	for (int i = 0; i < nguards; i++)
		if (guards[i] == addr)
			return 1;
	return 0;
}

static void *tick(void *canary_seed)
{
	volatile uint64_t canary[64];
	for (int i = 0; i < 64; i++)
		canary[i] = (uintptr_t)canary_seed * 0x9e3779b97f4a7c15ULL + i;
	for (;;) {
		struct timespec ts = { 0, 10 * 1000 * 1000 };
		nanosleep(&ts, NULL);
		for (int i = 0; i < 64; i++)
			if (canary[i] != (uintptr_t)canary_seed * 0x9e3779b97f4a7c15ULL + i)
				exit(3);
	}
	return NULL;
}

static void on_usr1(int sig)
{
	(void)sig;
	hash_requested = 1;
}

int main(int argc, char **argv)
{
	uint64_t x;
	int threads;
	char text[128];

	if (argc < 3)
		return 1;
	dir = argv[1];
	size = strtoul(argv[2], NULL, 10) << 20;
	threads = argc > 3 ? atoi(argv[3]) : 0;
	if (size < 4 * PAGE || threads < 0 || threads > 32)
		return 1;
	buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED)
		return 1;
	x = ((uint64_t)time(NULL) << 20) ^ (uint64_t)host_pid() ^ 0x2545f4914f6cdd1dULL;
	for (size_t i = 0; i < size; i += 8) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		memcpy(buf + i, &x, 8);
	}
	guard((unsigned long)buf);
	guard((unsigned long)buf + (size / 2 / PAGE) * PAGE);
	for (int t = 0; t < threads; t++) {
		pthread_attr_t attr;
		pthread_t th;
		void *stack = mmap(NULL, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
		if (stack == MAP_FAILED)
			return 1;
		guard((unsigned long)stack);
		pthread_attr_init(&attr);
		pthread_attr_setstack(&attr, (char *)stack + PAGE, STACK - PAGE);
		if (pthread_create(&th, &attr, tick, (void *)(uintptr_t)(t + 1)))
			return 1;
	}
	signal(SIGUSR1, on_usr1);
	write_atomic("ready", "");
	for (;;) {
		struct timespec ts = { 0, 10 * 1000 * 1000 };
		nanosleep(&ts, NULL);
		if (!hash_requested)
			continue;
		hash_requested = 0;
		uint64_t h = 0xcbf29ce484222325ULL;
		for (unsigned long p = 0; p < size; p += PAGE) {
			if (is_guard((unsigned long)buf + p))
				continue;
			for (unsigned long i = p; i < p + PAGE; i++) {
				h ^= buf[i];
				h *= 0x100000001b3ULL;
			}
		}
		snprintf(text, sizeof(text), "fnv64:%016llx guards:%d/%d", (unsigned long long)h, guards_present(),
			 nguards);
		write_atomic("hash", text);
	}
}
