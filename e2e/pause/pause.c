/* The kubelet lab's pause image: the process that holds a pod's namespaces.
 * It sleeps until SIGTERM or SIGINT and exits 0, and reaps every child that
 * is reparented to it (it is PID 1 of the pod's PID namespace when the pod
 * shares one). Built static (`cc -static -Os`) into a FROM-scratch image. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
	(void)sig;
	_exit(0);
}

static void reap(int sig) {
	(void)sig;
	while (waitpid(-1, 0, WNOHANG) > 0) {
	}
}

int main(void) {
	struct sigaction term = {.sa_handler = stop};
	struct sigaction child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
	sigaction(SIGTERM, &term, 0);
	sigaction(SIGINT, &term, 0);
	sigaction(SIGCHLD, &child, 0);
	for (;;) {
		pause();
	}
}
