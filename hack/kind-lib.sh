# shellcheck shell=bash
# shellcheck disable=SC2034 # the layout variables are used by the scripts that source this
# podsnap's kind cluster: its names, where its state lives, and podman configured for this kind of
# host. Shared by kind-image.sh, kind-up.sh, kind-down.sh, demo.sh --kind and the e2e harness.
# Sourced after lib.sh.
#
# kind runs with its podman provider and Debian's podman, rootful (rootless podman needs cgroup
# v2). Every podman call, kind's included, reads $CONTAINERS_CONF, written here, because a host
# like this one differs from podman's defaults in four ways:
# - no systemd as PID 1: cgroupfs cgroup manager, file events logger, k8s-file container logs;
# - cgroup v1 with a hybrid cgroup2 mount that has a controller: crun refuses to start anything
#   ("cgroups in hybrid mode not supported"), runc (the one hack/install.sh builds) does not;
# - no CAP_SYS_RESOURCE: podman's default ulimits (nofile 1048576, nproc 4194304) are above this
#   host's hard limits and every container fails in setrlimit, so they are capped at those limits
#   (nproc at most 32768: podman lowers its own limit to that before it starts the runtime);
# - netavark with aardvark-dns, so that nodes and the registry resolve each other by name.

KIND_VERSION=v0.33.0
KIND_BIN=$PODSNAP_CACHE/kind/$KIND_VERSION/kind
# The cluster, its podman network (kind's own name for it) and its registry container.
KIND_CLUSTER=${PODSNAP_KIND_CLUSTER:-podsnap}
KIND_NETWORK=kind
KIND_REGISTRY_NAME=$KIND_CLUSTER-registry
# A second registry, as a private one is: HTTPS with a certificate of its own CA (made by
# kind-up.sh; the node agents trust it through the ConfigMap podsnap-registry-ca), and only
# user podsnap, password s3cret:with-colon (Basic auth; a test bed's credentials). Nodes reach
# it as $KIND_PRIVATE_REGISTRY_NAME:5000; it is not published on the host.
KIND_PRIVATE_REGISTRY_NAME=$KIND_CLUSTER-private-registry
# shellcheck disable=SC2016 # a bcrypt hash, not an expansion
KIND_PRIVATE_REGISTRY_HTPASSWD='podsnap:$2b$04$AsJ5hGONhd99Vt81c1oThukojKwBfw9hQ1qE..z28rza1E7LJPeU6'
# The registry, published on the host for pushes; nodes pull from $KIND_REGISTRY_NAME:5000.
KIND_REGISTRY=127.0.0.1:${PODSNAP_KIND_REGISTRY_PORT:-5001}
# State of one cluster (its name in the path unless it is the default one).
if [ "$KIND_CLUSTER" = podsnap ]; then
	KIND_RUN=${PODSNAP_KIND_RUN:-/run/podsnap-kind}
	KIND_REGISTRY_STORAGE=$PODSNAP_CACHE/kind/registry
else
	KIND_RUN=${PODSNAP_KIND_RUN:-/run/podsnap-kind-$KIND_CLUSTER}
	KIND_REGISTRY_STORAGE=$PODSNAP_CACHE/kind/registry-$KIND_CLUSTER
fi
# Set on what kind-up.sh creates beside kind's own (registry, network), and checked by kind-down.sh.
KIND_LABEL=io.podsnap.kind.cluster=$KIND_CLUSTER
# kind-up.sh creates /lib/modules (kind bind-mounts it) where the host has none, and says so here.
KIND_LIB_MODULES_MARK=$PODSNAP_CACHE/kind/created-lib-modules
# The cluster administrator's kubeconfig (the API server published on 127.0.0.1 by kind).
KIND_KUBECONFIG=$KIND_RUN/kubeconfig
# Images this script family builds (removed by kind-down.sh --images, by these names only).
KIND_IMAGE_REPO=localhost/podsnap-kind
KIND_NODE_IMAGE_REPO=localhost/podsnap-node
# Pod network: each node's podCIDR (from the controller manager) on a bridge, routes between nodes.
KIND_POD_SUBNET=10.244.0.0/16
KIND_SERVICE_SUBNET=10.97.0.0/16

export KIND_EXPERIMENTAL_PROVIDER=podman
export CONTAINERS_CONF=$PODSNAP_CACHE/kind/containers.conf

# podman_config: write $CONTAINERS_CONF for this host (see above).
podman_config() {
	local nofile nproc
	nofile=$(ulimit -Hn)
	nproc=$(ulimit -Hu)
	[ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
	[ "$nofile" = unlimited ] && nofile=1048576
	mkdir -p "$(dirname "$CONTAINERS_CONF")"
	cat >"$CONTAINERS_CONF.tmp" <<EOF
# Written by hack/kind-lib.sh: podman for podsnap's kind cluster on this host.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "podsnap-runc"

[engine.runtimes]
podsnap-runc = ["$PODSNAP_BIN/runc"]

[network]
network_backend = "netavark"
EOF
	mv "$CONTAINERS_CONF.tmp" "$CONTAINERS_CONF"
}

# kind_kube_bin: the patched Kubernetes binaries' directory (built and cached by kube-build.sh).
kind_kube_bin() { "$PODSNAP_ROOT/hack/kube-build.sh" | tail -1; }
kind_cli() { "$KIND_BIN" "$@"; }
kind_kubectl() { "$KUBE_BIN/kubectl" --kubeconfig "$KIND_KUBECONFIG" "$@"; }

# has_label KIND NAME: whether podman object NAME (container, network) carries $KIND_LABEL.
has_label() {
	local labels=.Labels
	[ "$1" = container ] && labels=.Config.Labels
	[ "$(podman "$1" inspect --format "{{index $labels \"${KIND_LABEL%%=*}\"}}" "$2" 2>/dev/null)" = "$KIND_CLUSTER" ]
}

# kind_nodes: the cluster's node containers, by kind's cluster label.
kind_nodes() {
	podman ps -a --filter "label=io.x-k8s.kind.cluster=$KIND_CLUSTER" --format '{{.Names}}' | sort
}

# kind_check_podman: podman and its helpers are here, or say what to install.
kind_check_podman() {
	local t
	for t in podman mmdebstrap; do
		command -v "$t" >/dev/null || die "$t is missing: run hack/install.sh (Debian packages podman, mmdebstrap)"
	done
	[ -x /usr/lib/podman/netavark ] || die "netavark is missing: run hack/install.sh (Debian package netavark)"
	[ -x "$PODSNAP_BIN/runc" ] || die "$PODSNAP_BIN/runc is missing: run hack/install.sh"
}

# build_kind: kind itself, from the Go module proxy, cached by version.
build_kind() {
	[ -x "$KIND_BIN" ] && return 0
	mkdir -p "$(dirname "$KIND_BIN")"
	GOBIN=$(dirname "$KIND_BIN") CGO_ENABLED=0 GOFLAGS=-mod=mod go install -trimpath "sigs.k8s.io/kind@$KIND_VERSION"
	"$KIND_BIN" version >/dev/null
}
