/*
 * track_ref.c -- C reference for benchmarks/tracking.py: WriteWatch's work done
 * with raw syscalls, so that every writewatch figure can be read against it.
 *
 * One region of private anonymous memory (MADV_NOHUGEPAGE, every 64-bit word 1,
 * as tracking.py's Region), registered on a WP_ASYNC userfaultfd (mode WP) and
 * armed.  Each round receives the page indices the Python methods write in that
 * round (one share per thread, in writing order), and does what tracking.py's
 * measure() does around a method:
 *
 *   1. store a new 64-bit value at the first word of each page (T threads, each
 *      its own share, started together): "raw" wall time of the stores;
 *   2. the same stores again (the pages are now unarmed): "base" wall time;
 *   3. fused: one PAGEMAP_SCAN over the region with PM_SCAN_WP_MATCHING,
 *      category_mask = return_mask = PAGE_IS_WRITTEN (get and re-arm in one
 *      walk); not fused: the same scan without WP_MATCHING, then
 *      UFFDIO_WRITEPROTECT of the whole region;
 *   4. check that exactly the pages written were reported (not timed).
 *
 * Commands, one per line on stdin, answered on stdout:
 *
 *   setup NPAGES                      -> "ok"
 *   round FUSED T N1 .. NT I1 .. IN   (N = N1 + .. + NT page indices)
 *                                     -> "ok RAW_NS BASE_NS GET_NS RESET_NS PAGES"
 *   quit
 *
 * Times are CLOCK_MONOTONIC (tracking.py times with time.perf_counter_ns).  Any
 * failure prints "error ..." and exits 1.  The structs and ioctl numbers are
 * declared in ref_common.h from the kernel's UAPI layout (system headers may
 * predate 6.7).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/ioctl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "ref_common.h"

#define MAX_THREADS 64

static long page_size;
static uint64_t *mem;
static size_t mem_len;
static uint64_t npages;
static int pagemap_fd = -1;
static int uffd = -1;
static struct ref_page_region *vec;
static unsigned char *expected;
static uint64_t *indices;
static uint64_t value = 1;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void do_setup(uint64_t pages)
{
	size_t words;

	if (mem || !pages)
		fail("bad setup");
	npages = pages;
	mem_len = (size_t)pages * (size_t)page_size;
	mem = mmap(NULL, mem_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	if (madvise(mem, mem_len, MADV_NOHUGEPAGE))
		die("madvise MADV_NOHUGEPAGE");
	words = mem_len / sizeof(uint64_t);
	for (size_t i = 0; i < words; i++)
		mem[i] = 1;
	vec = calloc(npages, sizeof(*vec)); /* room for every page: one call always completes */
	expected = calloc(npages, 1);
	indices = calloc(npages, sizeof(*indices));
	if (!vec || !expected || !indices)
		fail("out of memory");
	memset(vec, 0, npages * sizeof(*vec)); /* fault the buffer in before timing */

	pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (pagemap_fd < 0)
		die("open /proc/self/pagemap");
	uffd = ref_arm_wp_async(mem, mem_len);
	printf("ok\n");
}

struct share {
	const uint64_t *pages;
	uint64_t n;
	uint64_t start, end;
	pthread_barrier_t *barrier;
};

static void store(const uint64_t *pages, uint64_t n)
{
	uint64_t words_per_page = (uint64_t)page_size / sizeof(uint64_t);

	for (uint64_t i = 0; i < n; i++)
		((volatile uint64_t *)mem)[pages[i] * words_per_page] = value;
}

static void *writer(void *arg)
{
	struct share *s = arg;

	pthread_barrier_wait(s->barrier);
	s->start = now_ns();
	store(s->pages, s->n);
	s->end = now_ns();
	return NULL;
}

/* Wall ns of the stores: one thread inline, or T threads started together. */
static uint64_t timed_write(int threads, const uint64_t *counts)
{
	struct share shares[MAX_THREADS];
	pthread_t tids[MAX_THREADS];
	pthread_barrier_t barrier;
	uint64_t first = UINT64_MAX, last = 0, off = 0, t0;

	if (threads == 1) {
		t0 = now_ns();
		store(indices, counts[0]);
		return now_ns() - t0;
	}
	if (pthread_barrier_init(&barrier, NULL, (unsigned)threads))
		fail("pthread_barrier_init");
	for (int i = 0; i < threads; i++) {
		shares[i] = (struct share){ .pages = indices + off, .n = counts[i], .barrier = &barrier };
		off += counts[i];
		if (pthread_create(&tids[i], NULL, writer, &shares[i]))
			fail("pthread_create");
	}
	for (int i = 0; i < threads; i++) {
		pthread_join(tids[i], NULL);
		if (shares[i].start < first)
			first = shares[i].start;
		if (shares[i].end > last)
			last = shares[i].end;
	}
	pthread_barrier_destroy(&barrier);
	return last - first;
}

static int scan(uint64_t flags, uint64_t *walk_end)
{
	struct ref_pm_scan_arg arg = {
		.size = sizeof(arg),
		.flags = flags,
		.start = (uint64_t)(uintptr_t)mem,
		.end = (uint64_t)(uintptr_t)mem + mem_len,
		.vec = (uint64_t)(uintptr_t)vec,
		.vec_len = npages,
		.category_mask = REF_PAGE_IS_WRITTEN,
		.return_mask = REF_PAGE_IS_WRITTEN,
	};
	int n = ioctl(pagemap_fd, REF_PAGEMAP_SCAN, &arg);

	if (n < 0)
		die("PAGEMAP_SCAN");
	*walk_end = arg.walk_end;
	return n;
}

static void do_round(int fused, int threads, const uint64_t *counts, uint64_t total)
{
	uint64_t raw, base, t0, t1, t2, walk_end, pages = 0, base_addr = (uint64_t)(uintptr_t)mem;
	int n;

	value++;
	raw = timed_write(threads, counts);
	base = timed_write(threads, counts);
	t0 = now_ns();
	n = scan(fused ? REF_PM_SCAN_WP_MATCHING : 0, &walk_end);
	t1 = now_ns();
	if (!fused)
		ref_write_protect(uffd, mem, mem_len);
	t2 = now_ns();

	/* The check (not timed): exactly the pages written, and the walk completed. */
	if (walk_end != base_addr + mem_len && !(n > 0 && walk_end < vec[n - 1].end))
		fail("scan did not complete");
	memset(expected, 0, npages);
	for (uint64_t i = 0; i < total; i++)
		expected[indices[i]] = 1;
	for (int i = 0; i < n; i++) {
		for (uint64_t a = vec[i].start; a < vec[i].end; a += (uint64_t)page_size) {
			uint64_t p = (a - base_addr) / (uint64_t)page_size;

			if (p >= npages || expected[p] != 1)
				fail("reported a page that was not written");
			expected[p] = 2;
			pages++;
		}
	}
	for (uint64_t i = 0; i < total; i++)
		if (expected[indices[i]] != 2)
			fail("missed a written page");
	printf("ok %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", raw, base, t1 - t0,
	       fused ? 0 : t2 - t1, pages);
}

/* "round FUSED T N1 .. NT I1 .. IN": parsed in place from one long line. */
static void parse_round(char *line)
{
	uint64_t counts[MAX_THREADS], total = 0;
	char *p = line + 6, *e;
	long fused, threads;

	fused = strtol(p, &e, 10);
	threads = strtol(e, &e, 10);
	if (threads < 1 || threads > MAX_THREADS)
		fail("round: bad thread count");
	for (long i = 0; i < threads; i++) {
		counts[i] = strtoull(e, &e, 10);
		total += counts[i];
	}
	if (!total || total > npages)
		fail("round: bad page count");
	for (uint64_t i = 0; i < total; i++) {
		char *before = e;

		indices[i] = strtoull(e, &e, 10);
		if (e == before || indices[i] >= npages)
			fail("round: bad page index");
	}
	do_round((int)fused, (int)threads, counts, total);
}

int main(void)
{
	size_t cap = 0;
	char *line = NULL;
	uint64_t x;

	page_size = sysconf(_SC_PAGESIZE);
	while (getline(&line, &cap, stdin) > 0) {
		if (strncmp(line, "round ", 6) == 0) {
			if (!mem)
				fail("round before setup");
			parse_round(line);
		} else if (sscanf(line, "setup %" SCNu64, &x) == 1) {
			do_setup(x);
		} else if (strncmp(line, "quit", 4) == 0) {
			break;
		} else {
			fail("unknown command");
		}
		fflush(stdout);
	}
	free(line);
	return 0;
}
