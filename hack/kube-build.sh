#!/usr/bin/env bash
# Build the Kubernetes side of the test cluster from module sources: k8s.io/kubernetes at
# $KUBERNETES_VERSION from the Go module proxy, its staging modules (k8s.io/*) at the matching
# v0.x, with kubelet-patches/*.patch applied in order (a patch that does not apply fails the
# build). Builds kubelet, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# kubeadm and kube-proxy (the last two for the kind node image, hack/kind-image.sh) and etcd (at
# the version Kubernetes pins) into $PODSNAP_CACHE/kube/<version>-<patch hash>/bin, so a
# rerun with the same version and patches costs nothing. Prints that bin directory.
#
#   hack/kube-build.sh            build (cached)
#   hack/kube-build.sh --test     also run the patched packages' Go unit tests
#   hack/kube-build.sh --tree DIR leave the patched source tree in DIR
#   hack/kube-build.sh --base DIR only lay out the unpatched tree in DIR, as a git repository with
#                                 one commit, and stop: rebase the series there (`git am -3`, see
#                                 kubelet-patches/README.md)
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"

run_tests=0
tree=""
base=""
while [ $# -gt 0 ]; do
	case $1 in
	--test) run_tests=1 ;;
	--tree)
		tree=$2
		shift
		;;
	--base)
		base=$2
		shift
		;;
	*) die "unknown argument $1 (see the header of $0)" ;;
	esac
	shift
done

# The packages the patches touch, whose unit tests --test runs.
PATCHED_PACKAGES=(
	./pkg/kubelet/podcheckpoint/
	./pkg/kubelet/prober/
	./pkg/kubelet/server/
	./pkg/kubelet/kuberuntime/
)
# The tests of pkg/kubelet itself that the patches add (the whole package's own tests are
# upstream's and take far longer): the PodCheckpoint taker's.
KUBELET_PACKAGE_TESTS='^TestPodCheckpointTaker'

patch_hash=$(cat "$PODSNAP_ROOT"/kubelet-patches/*.patch | sha256sum | cut -c1-12)
KUBE_DIR=$PODSNAP_CACHE/kube/$KUBERNETES_VERSION-$patch_hash
staging_version=v0.${KUBERNETES_VERSION#v1.}

# prepare_tree DIR [--unpatched]: the module source, staging modules from the proxy, patches
# applied (unless --unpatched).
prepare_tree() {
	local dir=$1 src patch
	src=$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | jq -r .Dir)
	[ -d "$src" ] || die "go mod download k8s.io/kubernetes@$KUBERNETES_VERSION failed"
	rm -rf "$dir"
	mkdir -p "$dir"
	cp -r "$src/." "$dir/"
	chmod -R u+w "$dir"
	# The module zip leaves out staging/ (each is a module of its own): take them from the proxy.
	rm -f "$dir/go.work" "$dir/go.work.sum"
	sed -i -E "s#^(\s*)(k8s\.io/[a-z0-9-]+) => \./staging/src/k8s\.io/[a-z0-9-]+\$#\1\2 => \2 $staging_version#" "$dir/go.mod"
	! grep -q '=> \./staging' "$dir/go.mod" || die "go.mod of k8s.io/kubernetes@$KUBERNETES_VERSION still replaces a module with ./staging"
	[ "${2:-}" != --unpatched ] || return 0
	for patch in "$PODSNAP_ROOT"/kubelet-patches/*.patch; do
		if ! patch -d "$dir" -p1 --forward --quiet --batch <"$patch"; then
			die "kubelet-patches/$(basename "$patch") does not apply to k8s.io/kubernetes@$KUBERNETES_VERSION: rebase it (see kubelet-patches/README.md)"
		fi
	done
	find "$dir" -name '*.orig' -delete
}

build() {
	local dir=$1
	mkdir -p "$KUBE_DIR/bin"
	(cd "$dir" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath \
		-ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION-podsnap -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${KUBERNETES_VERSION#v1.} -X k8s.io/component-base/version.gitTreeState=clean" \
		-o "$KUBE_DIR/bin/" ./cmd/kubelet ./cmd/kube-apiserver ./cmd/kube-controller-manager ./cmd/kube-scheduler ./cmd/kubectl \
		./cmd/kubeadm ./cmd/kube-proxy)
	# etcd at the version Kubernetes pins (go.etcd.io/etcd/server/v3 is in its module graph).
	(cd "$dir" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$KUBE_DIR/bin/etcd" go.etcd.io/etcd/server/v3)
}

main() {
	local dir recipe
	mkdir -p "$PODSNAP_CACHE/stamps" "$PODSNAP_CACHE/kube"
	if [ -n "$base" ]; then
		prepare_tree "$base" --unpatched
		(cd "$base" && git init -q && git add -A &&
			git -c user.name=podsnap -c user.email=podsnap@localhost commit -qm "k8s.io/kubernetes@$KUBERNETES_VERSION, staging modules from the proxy")
		log "unpatched tree in $base: cd there and run git am -3 $PODSNAP_ROOT/kubelet-patches/*.patch"
		return 0
	fi
	recipe="kube-$KUBERNETES_VERSION-$patch_hash-r2"
	dir=${tree:-$(mktemp -d)}
	if [ -n "$tree" ] || [ "$run_tests" = 1 ] || ! stamp_ok kube "$recipe" || [ ! -x "$KUBE_DIR/bin/kubelet" ]; then
		step kube-source prepare_tree "$dir"
	fi
	if ! stamp_ok kube "$recipe" || [ ! -x "$KUBE_DIR/bin/kubelet" ]; then
		step kube-build build "$dir"
		stamp_set kube "$recipe"
		# Builds for other versions or patches are not used again: keep the cache to one.
		find "$PODSNAP_CACHE/kube" -mindepth 1 -maxdepth 1 -type d ! -path "$KUBE_DIR" -exec rm -rf {} +
	fi
	if [ "$run_tests" = 1 ]; then
		(cd "$dir" && step kubelet-patch-tests env GOFLAGS=-mod=mod go test "${PATCHED_PACKAGES[@]}")
		(cd "$dir" && step kubelet-taker-tests env GOFLAGS=-mod=mod go test -run "$KUBELET_PACKAGE_TESTS" ./pkg/kubelet/)
	fi
	[ -n "$tree" ] || rm -rf "$dir"
	echo "$KUBE_DIR/bin"
}

stamp_ok() { [ -f "$PODSNAP_CACHE/stamps/$1" ] && [ "$(cat "$PODSNAP_CACHE/stamps/$1")" = "$2" ]; }
stamp_set() { printf '%s' "$2" >"$PODSNAP_CACHE/stamps/$1"; }
main
