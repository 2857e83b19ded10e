/*
 * pause: the sandbox ("infra") process of a wgcni lab pod.
 *
 * It holds the pod's namespaces open and does nothing else: it sleeps in pause(2),
 * reaps any child re-parented to it (it is PID 1 of the pod's PID namespace), and
 * exits 0 on SIGINT or SIGTERM so that StopPodSandbox completes without a SIGKILL.
 * Built with `gcc -static` so that the image needs no libraries.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void exit_on_signal(int signo)
{
	(void)signo;
	_exit(0);
}

static void reap_children(int signo)
{
	(void)signo;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
}

static int install(int signo, void (*handler)(int))
{
	struct sigaction action;

	memset(&action, 0, sizeof(action));
	action.sa_handler = handler;
	action.sa_flags = SA_RESTART;
	sigemptyset(&action.sa_mask);
	return sigaction(signo, &action, NULL);
}

int main(void)
{
	if (install(SIGINT, exit_on_signal) != 0 || install(SIGTERM, exit_on_signal) != 0 ||
	    install(SIGCHLD, reap_children) != 0)
		return 1;
	for (;;)
		pause();
	return 0;
}
