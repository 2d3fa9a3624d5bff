/*
 * ref_common.h -- what the C references (scan_ref.c, track_ref.c) share: the
 * kernel's UAPI structs and ioctl numbers for PAGEMAP_SCAN and userfaultfd,
 * declared here from the kernel's layout (system headers may predate Linux 6.7),
 * the error exits of the line protocol, and arming a range for WP-async tracking.
 */
#ifndef REF_COMMON_H
#define REF_COMMON_H

#include <errno.h>
#include <fcntl.h>
#include <linux/ioctl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

/* ---- PAGEMAP_SCAN (include/uapi/linux/fs.h, Linux 6.7) -------------------- */

struct ref_pm_scan_arg {
	uint64_t size;
	uint64_t flags;
	uint64_t start;
	uint64_t end;
	uint64_t walk_end;
	uint64_t vec;
	uint64_t vec_len;
	uint64_t max_pages;
	uint64_t category_inverted;
	uint64_t category_mask;
	uint64_t category_anyof_mask;
	uint64_t return_mask;
};

struct ref_page_region {
	uint64_t start;
	uint64_t end;
	uint64_t categories;
};

#define REF_PAGEMAP_SCAN _IOWR('f', 16, struct ref_pm_scan_arg)
#define REF_PM_SCAN_WP_MATCHING (1ULL << 0)
#define REF_PAGE_IS_WRITTEN (1ULL << 1)

_Static_assert(sizeof(struct ref_pm_scan_arg) == 96, "pm_scan_arg is 96 bytes");
_Static_assert(sizeof(struct ref_page_region) == 24, "page_region is 24 bytes");
_Static_assert(REF_PAGEMAP_SCAN == 0xC0606610u, "PAGEMAP_SCAN number");

/* ---- userfaultfd (include/uapi/linux/userfaultfd.h) ------------------------ */

struct ref_uffdio_api {
	uint64_t api;
	uint64_t features;
	uint64_t ioctls;
};

struct ref_uffdio_range {
	uint64_t start;
	uint64_t len;
};

struct ref_uffdio_register {
	struct ref_uffdio_range range;
	uint64_t mode;
	uint64_t ioctls;
};

struct ref_uffdio_writeprotect {
	struct ref_uffdio_range range;
	uint64_t mode;
};

#define REF_UFFD_API 0xAAULL
#define REF_UFFD_FEATURE_WP_ASYNC (1ULL << 15)
#define REF_UFFDIO_REGISTER_MODE_WP 2ULL
#define REF_UFFDIO_WRITEPROTECT_MODE_WP 1ULL
#define REF_UFFDIO_API _IOWR(0xAA, 0x3F, struct ref_uffdio_api)
#define REF_UFFDIO_REGISTER _IOWR(0xAA, 0x00, struct ref_uffdio_register)
#define REF_UFFDIO_WRITEPROTECT _IOWR(0xAA, 0x06, struct ref_uffdio_writeprotect)

_Static_assert(REF_UFFDIO_API == 0xC018AA3Fu, "UFFDIO_API number");
_Static_assert(REF_UFFDIO_REGISTER == 0xC020AA00u, "UFFDIO_REGISTER number");
_Static_assert(REF_UFFDIO_WRITEPROTECT == 0xC018AA06u, "UFFDIO_WRITEPROTECT number");

#if defined(__NR_userfaultfd)
#define REF_NR_USERFAULTFD __NR_userfaultfd
#elif defined(__x86_64__)
#define REF_NR_USERFAULTFD 323
#else
#error "unknown userfaultfd syscall number for this architecture"
#endif

/* ---- the line protocol's error exits ---------------------------------------- */

static void die(const char *what)
{
	printf("error %s: %s\n", what, strerror(errno));
	fflush(stdout);
	exit(1);
}

static void fail(const char *what)
{
	printf("error %s\n", what);
	fflush(stdout);
	exit(1);
}

/* ---- write-protect tracking ------------------------------------------------ */

/* Write-protect [addr, addr + len) on uffd (UFFDIO_WRITEPROTECT, mode WP). */
static void ref_write_protect(int uffd, const void *addr, uint64_t len)
{
	struct ref_uffdio_writeprotect wp;

	memset(&wp, 0, sizeof(wp));
	wp.range.start = (uint64_t)(uintptr_t)addr;
	wp.range.len = len;
	wp.mode = REF_UFFDIO_WRITEPROTECT_MODE_WP;
	if (ioctl(uffd, REF_UFFDIO_WRITEPROTECT, &wp))
		die("UFFDIO_WRITEPROTECT");
}

/* A WP_ASYNC userfaultfd with [addr, addr + len) registered (mode WP) and armed. */
static int ref_arm_wp_async(const void *addr, uint64_t len)
{
	struct ref_uffdio_api api = { .api = REF_UFFD_API, .features = REF_UFFD_FEATURE_WP_ASYNC };
	struct ref_uffdio_register reg;
	int fd = (int)syscall(REF_NR_USERFAULTFD, O_CLOEXEC | O_NONBLOCK);

	if (fd < 0)
		die("userfaultfd");
	if (ioctl(fd, REF_UFFDIO_API, &api))
		die("UFFDIO_API (WP_ASYNC)");
	memset(&reg, 0, sizeof(reg));
	reg.range.start = (uint64_t)(uintptr_t)addr;
	reg.range.len = len;
	reg.mode = REF_UFFDIO_REGISTER_MODE_WP;
	if (ioctl(fd, REF_UFFDIO_REGISTER, &reg))
		die("UFFDIO_REGISTER");
	ref_write_protect(fd, addr, len);
	return fd;
}

#endif /* REF_COMMON_H */
