/* A minimal static HTTP/1.0 file server standing in for nginx and httpd in critest's images
 * (no container registry is reachable here, so the upstream images cannot be pulled).
 * What critest checks of those images, and so what this does:
 *   - GET / on the container port answers 200 (networking, port mapping, port forward);
 *   - nginx writes its pid to /var/run/nginx.pid and its process is named "nginx" (HostPID);
 *   - nginx's PID 1 shows "nginx: master process" in /proc/1/cmdline (PID namespace modes);
 *   - httpd writes a line containing "httpd" to its log (multi-container log test).
 * Usage: nginx|httpd [-g DIRECTIVES (ignored)] [-p PORT] [-r DOCROOT] [-P PIDFILE] */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#define NGINX_TITLE "nginx: master process nginx -g daemon off;"

static void on_signal(int signo) {
	(void)signo;
	_exit(0);
}

static void serve(int conn, const char *root) {
	char req[4096], path[PATH_MAX], head[256], buf[8192];
	size_t len = 0;
	ssize_t n;
	struct timeval tv = {5, 0};

	setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	while (len < sizeof(req) - 1 && (n = read(conn, req + len, sizeof(req) - 1 - len)) > 0) {
		len += (size_t)n;
		req[len] = 0;
		if (strstr(req, "\r\n\r\n") || strstr(req, "\n\n"))
			break;
	}
	req[len] = 0;

	char method[16] = "", uri[2048] = "";
	if (sscanf(req, "%15s %2047s", method, uri) != 2 || uri[0] != '/' || strstr(uri, "..")) {
		dprintf(conn, "HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
		return;
	}
	char *q = strchr(uri, '?');
	if (q)
		*q = 0;
	snprintf(path, sizeof(path), "%s%s%s", root, uri, uri[strlen(uri) - 1] == '/' ? "index.html" : "");

	int fd = open(path, O_RDONLY);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		const char *body = "404 Not Found\n";
		dprintf(conn, "HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n%s",
			strlen(body), strcmp(method, "HEAD") ? body : "");
		if (fd >= 0)
			close(fd);
		return;
	}
	int hl = snprintf(head, sizeof(head), "HTTP/1.0 200 OK\r\nContent-Type: text/html\r\nContent-Length: %lld\r\nConnection: close\r\n\r\n",
			  (long long)st.st_size);
	if (write(conn, head, (size_t)hl) == hl && strcmp(method, "HEAD") != 0)
		while ((n = read(fd, buf, sizeof(buf))) > 0 && write(conn, buf, (size_t)n) == n)
			;
	close(fd);
}

int main(int argc, char **argv) {
	const char *name = strcmp(argv[0], NGINX_TITLE) == 0 ? "nginx" : strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];
	int nginx = strcmp(name, "httpd") != 0;
	const char *root = nginx ? "/usr/share/nginx/html" : "/usr/local/apache2/htdocs";
	const char *pidfile = nginx ? "/var/run/nginx.pid" : "/usr/local/apache2/logs/httpd.pid";
	int port = 80, opt;

	/* Like nginx's setproctitle: re-exec with the master's title as argv[0]. The kernel names
	 * the process after the file executed, so comm stays "nginx". */
	if (nginx && strcmp(argv[0], NGINX_TITLE) != 0) {
		char self[PATH_MAX];
		ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
		if (n > 0) {
			self[n] = 0;
			argv[0] = NGINX_TITLE;
			execv(self, argv);
		}
	}

	while ((opt = getopt(argc, argv, "g:p:r:P:")) != -1) {
		switch (opt) {
		case 'g':
			break;
		case 'p':
			port = atoi(optarg);
			break;
		case 'r':
			root = optarg;
			break;
		case 'P':
			pidfile = optarg;
			break;
		default:
			fprintf(stderr, "usage: %s [-g directives] [-p port] [-r docroot] [-P pidfile]\n", name);
			return 2;
		}
	}

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGQUIT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	int one = 1, zero = 0, s = socket(AF_INET6, SOCK_STREAM, 0);
	struct sockaddr_storage ss;
	socklen_t sl;
	memset(&ss, 0, sizeof(ss));
	if (s >= 0) {
		struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
		setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
		a6->sin6_family = AF_INET6;
		a6->sin6_addr = in6addr_any;
		a6->sin6_port = htons((unsigned short)port);
		sl = sizeof(*a6);
	} else {
		struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
		s = socket(AF_INET, SOCK_STREAM, 0);
		a4->sin_family = AF_INET;
		a4->sin_addr.s_addr = htonl(INADDR_ANY);
		a4->sin_port = htons((unsigned short)port);
		sl = sizeof(*a4);
	}
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (s < 0 || bind(s, (struct sockaddr *)&ss, sl) < 0 || listen(s, 64) < 0) {
		fprintf(stderr, "%s: cannot listen on port %d: %s\n", name, port, strerror(errno));
		return 1;
	}

	FILE *pf = fopen(pidfile, "w");
	if (pf) {
		fprintf(pf, "%d\n", (int)getpid());
		fclose(pf);
	}
	fprintf(stderr, "%s: podsnap stand-in web server (pid %d) serving %s on port %d\n", name, (int)getpid(), root, port);

	for (;;) {
		int conn = accept(s, NULL, NULL);
		if (conn < 0)
			continue;
		serve(conn, root);
		close(conn);
	}
}
