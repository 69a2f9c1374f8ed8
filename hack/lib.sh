#!/usr/bin/env bash
# Shared settings for podsnap's hack/ scripts: where the toolchain is cached, where a node keeps
# its state, and small helpers. Sourced, never executed.

PODSNAP_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PODSNAP_ROOT
# Built tools live outside the repository, keyed by version, so reruns cost nothing.
export PODSNAP_CACHE=${PODSNAP_CACHE:-/var/cache/podsnap}
export PODSNAP_BIN=$PODSNAP_CACHE/bin
# A node's runtime state (sockets, pid files) and persistent state (images, snapshots).
export PODSNAP_NODE_RUN=${PODSNAP_NODE_RUN:-/run/podsnap-node}
export PODSNAP_NODE_LIB=${PODSNAP_NODE_LIB:-/var/lib/podsnap-node}
export CONTAINERD_SOCK=$PODSNAP_NODE_RUN/containerd/containerd.sock
export PODSNAP_REGISTRY=127.0.0.1:5000

# Pinned versions of everything built from source.
export CRIU_VERSION=4.1.1
# Where CRIU caches what it probed of the kernel (its RUNDIR, built in; kept only on a tmpfs).
export CRIU_RUNDIR=/run/criu
# The name of the tmpfs hack/node-up.sh mounts there where /run is no tmpfs.
export CRIU_RUNDIR_TMPFS=podsnap-criu-cache
export CONTAINERD_VERSION=v2.4.2
export RUNC_VERSION=v1.3.7
export CRI_TOOLS_VERSION=v1.37.0
export CNI_PLUGINS_VERSION=v1.10.0
export CHECKPOINTCTL_VERSION=v1.4.0
# Kubernetes: k8s.io/kubernetes with kubelet-patches/ applied; staging modules k8s.io/* at the
# matching v0.x (from the Go module proxy); etcd at the version Kubernetes pins.
export KUBERNETES_VERSION=v1.37.2

export PATH=$PODSNAP_BIN:/usr/local/go/bin:$HOME/.cargo/bin:/usr/sbin:/sbin:$PATH

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# step NAME CMD...: run a step, logging how long it took.
step() {
	local name=$1 start rc
	shift
	start=$(date +%s)
	log "==> $name"
	"$@"
	rc=$?
	log "<== $name: rc=$rc in $(($(date +%s) - start))s"
	return $rc
}

# bookworm_rootfs TARBALL WHAT PACKAGE...: a Debian bookworm minbase rootfs with PACKAGES, as a
# tarball, built by mmdebstrap from the mirror apt uses unless TARBALL exists (never half-written).
bookworm_rootfs() {
	local tarball=$1 what=$2
	shift 2
	[ -f "$tarball" ] && return 0
	log "building the $what rootfs (mmdebstrap bookworm, $# packages)"
	if ! mmdebstrap --quiet --variant=minbase --include="$(
		IFS=,
		echo "$*"
	)" --format=tar bookworm "$tarball.tmp" >&2; then
		rm -f "$tarball.tmp"
		die "mmdebstrap could not build the $what rootfs (it needs the Debian mirror apt uses)"
	fi
	mv "$tarball.tmp" "$tarball"
}

require_root() { [ "$(id -u)" = 0 ] || die "must run as root (containerd, CRIU and cgroups need it)"; }
