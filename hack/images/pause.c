/* pause: the sandbox ("infra") container's process, as in Kubernetes' build/pause/linux/pause.c.
 * Holds the pod's namespaces, reaps orphans (it is PID 1 when the pod shares a PID namespace)
 * and exits cleanly on SIGINT/SIGTERM. Built statically into podsnap's local pause image. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void sigdown(int signo) {
	psignal(signo, "Shutting down, got signal");
	exit(0);
}

static void sigreap(int signo) {
	(void)signo;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
}

int main(int argc, char **argv) {
	struct sigaction down, reap;

	if (argc > 1 && (strcmp(argv[1], "-v") == 0 || strcmp(argv[1], "--version") == 0)) {
		printf("pause (podsnap local image)\n");
		return 0;
	}
	if (getpid() != 1)
		fprintf(stderr, "Warning: pause should be the first process\n");

	memset(&down, 0, sizeof(down));
	down.sa_handler = sigdown;
	if (sigaction(SIGINT, &down, NULL) < 0 || sigaction(SIGTERM, &down, NULL) < 0)
		return 1;
	memset(&reap, 0, sizeof(reap));
	reap.sa_handler = sigreap;
	reap.sa_flags = SA_NOCLDSTOP;
	if (sigaction(SIGCHLD, &reap, NULL) < 0)
		return 3;

	for (;;)
		pause();
	return 42;
}
