/*
 * rollup_ref.c -- the C reference for `pagescan ps` (benchmarks/stat.py): read every
 * process's /proc/PID/smaps_rollup, the least any per-process memory tool reads.
 *
 * Line protocol on stdin/stdout, so that one process serves every round: each line
 * read asks for one pass over /proc (opendir, then open, one read, close for every
 * numeric entry; kernel threads fail to open and are skipped); the answer is one line,
 * "BYTES NS": the bytes read and the pass's own time (CLOCK_MONOTONIC). EOF ends it.
 */
#include <ctype.h>
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char buf[1 << 14];

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long one_pass(void)
{
	char path[64];
	long long total = 0;
	struct dirent *d;
	DIR *proc = opendir("/proc");

	if (!proc)
		return -1;
	while ((d = readdir(proc)) != NULL) {
		int fd;
		ssize_t n;

		if (!isdigit((unsigned char)d->d_name[0]))
			continue;
		snprintf(path, sizeof(path), "/proc/%s/smaps_rollup", d->d_name);
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		n = read(fd, buf, sizeof(buf));
		if (n > 0)
			total += n;
		close(fd);
	}
	closedir(proc);
	return total;
}

int main(void)
{
	char line[64];

	while (fgets(line, sizeof(line), stdin)) {
		long long t0 = now_ns();
		long long bytes = one_pass();

		printf("%lld %lld\n", bytes, now_ns() - t0);
		fflush(stdout);
	}
	return 0;
}
