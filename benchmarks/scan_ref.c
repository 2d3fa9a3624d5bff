/*
 * scan_ref.c -- C reference for benchmarks/scan_overhead.py.
 *
 * Does the same work as the Python side of the benchmark with raw syscalls, so
 * the Python/C ratio shows what pagescan adds on top of the PAGEMAP_SCAN ioctl.
 * It is driven line by line over stdin/stdout so that the two sides can take
 * turns (C batch, Python batch, C batch, ...) and share the machine's noise.
 * Times are CLOCK_MONOTONIC, or this thread's CPU time with the argument "cpu"
 * (CLOCK_THREAD_CPUTIME_ID, as Python's time.thread_time_ns()).  Commands:
 *
 *   setup BYTES DIRTY_PAGES SEED RETURN_MASK
 *                   map BYTES of private anonymous memory (MADV_NOHUGEPAGE)
 *                   and one written page for workload (a) -> "ok NPAGES"
 *   populate OFFSET LENGTH
 *                   write every page of that part of the range -> "ok"
 *   arm             register the range with a WP_ASYNC userfaultfd (mode WP)
 *                   and write-protect it (UFFDIO_WRITEPROTECT) -> "ok"
 *   a CALLS         CALLS one-page scans of that page   -> "ok NS_TOTAL"
 *   dirty           write DIRTY_PAGES random pages      -> "ok"
 *   b               dirty, then time one get-and-write-protect scan of the
 *                   whole range                         -> "ok NS PAGES REGIONS"
 *   c               time one scan of the whole range with every category in
 *                   RETURN_MASK and no masks            -> "ok NS PAGES REGIONS"
 *   quit            unmap, close, exit 0
 *
 * The driver populates the two sides' ranges in alternating chunks, so that both
 * get their physical pages from the allocator under the same conditions (how
 * scattered the pages are changes the cost of a page-table walk noticeably).
 * Any failure prints "error ..." and exits 1.  The dirty pages are drawn with
 * splitmix64 exactly as the Python side does, so both sides dirty the same
 * page indices and must report the same counts.
 *
 * The system headers may predate Linux 6.7 (no PAGEMAP_SCAN), so every struct
 * and ioctl number used here is declared in ref_common.h from the kernel's UAPI
 * layout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/ioctl.h>
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

/* ---- state ---------------------------------------------------------------- */

static long page_size;
static int pagemap_fd = -1;
static int uffd = -1;
static unsigned char *mem; /* the big range for (b) and (c) */
static size_t mem_len;
static uint64_t npages;
static unsigned char *one_page; /* the page for (a) */
static unsigned char *chosen; /* per-round "already drawn" marks */
static uint64_t dirty_pages;
static uint64_t rng_state;
static uint64_t all_categories;
static struct ref_page_region *vec; /* region buffer, reused by every call */
static uint64_t vec_cap;

static clockid_t clock_id = CLOCK_MONOTONIC;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(clock_id, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* splitmix64: the same sequence as _SplitMix64 in scan_overhead.py. */
static uint64_t next_random(void)
{
	uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

static int scan(uint64_t start, uint64_t end, uint64_t flags, uint64_t mask,
		uint64_t return_mask, struct ref_page_region *out, uint64_t out_len,
		uint64_t *walk_end)
{
	struct ref_pm_scan_arg arg = {
		.size = sizeof(arg),
		.flags = flags,
		.start = start,
		.end = end,
		.vec = (uint64_t)(uintptr_t)out,
		.vec_len = out_len,
		.category_mask = mask,
		.return_mask = return_mask,
	};
	int n = ioctl(pagemap_fd, REF_PAGEMAP_SCAN, &arg);

	if (walk_end)
		*walk_end = arg.walk_end;
	return n;
}

static uint64_t count_pages(int n)
{
	uint64_t pages = 0;

	for (int i = 0; i < n; i++)
		pages += (vec[i].end - vec[i].start) / (uint64_t)page_size;
	return pages;
}

/*
 * Whether a scan of [start, end) that wrote n regions walked the whole range.
 * Linux (6.7 .. at least 6.18) leaves walk_end stale after a call that returned
 * more than 512 regions and then completed; a real stop point is never before
 * the end of the last region returned, so walk_end < that end means "complete"
 * (pagescan applies the same correction; hugetlb is not involved here).
 */
static int walked_all(int n, uint64_t walk_end, uint64_t end)
{
	return walk_end == end || (n > 0 && walk_end < vec[n - 1].end);
}

static void do_setup(uint64_t bytes, uint64_t dirty, uint64_t seed, uint64_t return_mask)
{
	if (mem)
		fail("setup twice");
	mem_len = bytes;
	npages = bytes / (uint64_t)page_size;
	dirty_pages = dirty;
	rng_state = seed;
	all_categories = return_mask;
	if (npages == 0 || bytes % (uint64_t)page_size || dirty > npages)
		fail("bad setup arguments");

	pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (pagemap_fd < 0)
		die("open /proc/self/pagemap");

	one_page = mmap(NULL, (size_t)page_size, PROT_READ | PROT_WRITE,
			MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (one_page == MAP_FAILED)
		die("mmap one page");
	memset(one_page, 1, (size_t)page_size);

	mem = mmap(NULL, mem_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	if (madvise(mem, mem_len, MADV_NOHUGEPAGE))
		die("madvise MADV_NOHUGEPAGE");

	chosen = calloc(npages, 1);
	/* The same buffer size the Python side ends up with in (c). */
	vec_cap = npages < 65536 ? npages : 65536;
	if (vec_cap < dirty_pages)
		vec_cap = dirty_pages;
	vec = calloc(vec_cap, sizeof(*vec));
	if (!chosen || !vec)
		fail("out of memory");
	printf("ok %" PRIu64 "\n", npages);
}

static void do_populate(uint64_t offset, uint64_t len)
{
	if (offset > mem_len || len > mem_len - offset)
		fail("populate: range outside the mapping");
	memset(mem + offset, 1, len); /* every page present and written */
	printf("ok\n");
}

static void do_arm(void)
{
	if (uffd >= 0)
		fail("armed twice");
	uffd = ref_arm_wp_async(mem, mem_len);
	printf("ok\n");
}

static void do_a(uint64_t calls)
{
	uint64_t start = (uint64_t)(uintptr_t)one_page;
	uint64_t end = start + (uint64_t)page_size;
	struct ref_page_region region;
	uint64_t t0, t1;

	t0 = now_ns();
	for (uint64_t i = 0; i < calls; i++) {
		if (scan(start, end, 0, 0, all_categories, &region, 1, NULL) != 1)
			die("PAGEMAP_SCAN one page");
	}
	t1 = now_ns();
	printf("ok %" PRIu64 "\n", t1 - t0);
}

static void dirty_round(void)
{
	uint64_t done = 0;

	memset(chosen, 0, npages);
	while (done < dirty_pages) {
		uint64_t page = next_random() % npages;

		if (chosen[page])
			continue;
		chosen[page] = 1;
		mem[page * (uint64_t)page_size] = 2;
		done++;
	}
}

static void do_b(void)
{
	uint64_t start = (uint64_t)(uintptr_t)mem;
	uint64_t end = start + mem_len;
	uint64_t walk_end, t0, t1;
	int n;

	dirty_round();
	t0 = now_ns();
	n = scan(start, end, REF_PM_SCAN_WP_MATCHING, REF_PAGE_IS_WRITTEN,
		 REF_PAGE_IS_WRITTEN, vec, dirty_pages, &walk_end);
	t1 = now_ns();
	if (n < 0)
		die("PAGEMAP_SCAN get-and-write-protect");
	if (!walked_all(n, walk_end, end))
		fail("get-and-write-protect scan did not complete");
	printf("ok %" PRIu64 " %" PRIu64 " %d\n", t1 - t0, count_pages(n), n);
}

static void do_c(void)
{
	uint64_t start = (uint64_t)(uintptr_t)mem;
	uint64_t end = start + mem_len;
	uint64_t walk_end, t0, t1;
	int n;

	t0 = now_ns();
	n = scan(start, end, 0, 0, all_categories, vec, vec_cap, &walk_end);
	t1 = now_ns();
	if (n < 0)
		die("PAGEMAP_SCAN full-category");
	if (!walked_all(n, walk_end, end))
		fail("full-category scan did not complete (region buffer too small)");
	printf("ok %" PRIu64 " %" PRIu64 " %d\n", t1 - t0, count_pages(n), n);
}

static void cleanup(void)
{
	if (uffd >= 0)
		close(uffd);
	if (mem && mem != MAP_FAILED)
		munmap(mem, mem_len);
	if (one_page && one_page != MAP_FAILED)
		munmap(one_page, (size_t)page_size);
	if (pagemap_fd >= 0)
		close(pagemap_fd);
	free(chosen);
	free(vec);
}

int main(int argc, char **argv)
{
	char line[256];

	if (argc > 1 && strcmp(argv[1], "cpu") == 0)
		clock_id = CLOCK_THREAD_CPUTIME_ID;
	else if (argc > 1 && strcmp(argv[1], "wall") != 0)
		fail("usage: scan_ref [wall|cpu]");
	page_size = sysconf(_SC_PAGESIZE);
	setvbuf(stdout, NULL, _IOLBF, 0);
	while (fgets(line, sizeof(line), stdin)) {
		uint64_t x, y, z, w;

		if (sscanf(line, "setup %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64, &x, &y, &z, &w) == 4) {
			do_setup(x, y, z, w);
		} else if (!mem) {
			if (strncmp(line, "quit", 4) == 0)
				break;
			fail("setup first");
		} else if (sscanf(line, "populate %" SCNu64 " %" SCNu64, &x, &y) == 2) {
			do_populate(x, y);
		} else if (strncmp(line, "arm", 3) == 0) {
			do_arm();
		} else if (uffd < 0) {
			fail("arm first");
		} else if (sscanf(line, "a %" SCNu64, &x) == 1) {
			do_a(x);
		} else if (strncmp(line, "dirty", 5) == 0) {
			dirty_round();
			printf("ok\n");
		} else if (line[0] == 'b') {
			do_b();
		} else if (line[0] == 'c') {
			do_c();
		} else if (strncmp(line, "quit", 4) == 0) {
			break;
		} else {
			fail("unknown command");
		}
	}
	cleanup();
	return 0;
}
