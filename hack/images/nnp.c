/* nnp: Kubernetes' e2e image "nonewprivs" (test/images/nonewprivs/nnp.go) in C. Installed
 * set-user-ID root; prints the effective uid, which stays the caller's under no_new_privs. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
	printf("Effective uid: %d\n", (int)geteuid());
	return 0;
}
