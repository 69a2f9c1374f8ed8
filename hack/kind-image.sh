#!/usr/bin/env bash
# Build podsnap's kind images here, offline (no registry is reachable from this machine, and
# kindest/base's systemd refuses cgroup v1):
#
#   hack/kind-image.sh node   the node image, localhost/podsnap-node:<kubernetes version>-<recipe>:
#                             a Debian bookworm rootfs (mmdebstrap, cached by package list) with
#                             systemd, containerd, runc, the patched CRIU, CNI plugins, the patched
#                             kubelet, kubeadm, kubectl, podsnapd and the podsnap shim, and kind's
#                             node contract (its entrypoint, the kubelet and containerd units,
#                             /kind/version). Prints its reference.
#   hack/kind-image.sh push   the images the cluster pulls, pushed to the kind registry
#                             ($KIND_REGISTRY, which must be up): the control plane kubeadm asks
#                             for (kube-apiserver, kube-controller-manager, kube-scheduler,
#                             kube-proxy, etcd, from the same build as the kubelet), podsnap's own
#                             (podsnap-controller, podsnapd's node agent) and hack/mkimage.py's test
#                             images (pause, busybox, ...).
#
# Every image is labelled io.podsnap.kind.recipe with a hash of what went into it; an image whose
# recipe is current is not built again.
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=hack/node-lib.sh
. "$(dirname "$0")/node-lib.sh"
# shellcheck source=hack/kind-lib.sh
. "$(dirname "$0")/kind-lib.sh"
require_root

# The node's packages: systemd as init, what kind's entrypoint and kubeadm run (iptables,
# iproute2, mount, findmnt, conntrack, socat, ...), and the libraries CRIU and runc link.
ROOTFS_PACKAGES=(systemd systemd-sysv dbus iproute2 iptables nftables kmod ca-certificates procps
	util-linux mount conntrack socat ethtool ebtables libseccomp2 libbsd0 libgnutls30 libnftables1
	libprotobuf-c1 libnl-3-200 libnet1 libuuid1 libjansson4 libxtables12 libmnl0 libnftnl11)
KIND_SRC=$(go env GOMODCACHE)/sigs.k8s.io/kind@$KIND_VERSION
TARGET_DIR=${CARGO_TARGET_DIR:-$PODSNAP_ROOT/target}/debug

recipe_of() { sha256sum "$@" | sha256sum | cut -c1-12; }

# prune_older REF: remove the other tags of REF's repository (earlier builds); one still used by a
# container stays (podman rmi without --force refuses it).
prune_older() {
	local old
	for old in $(podman images --format '{{.Repository}}:{{.Tag}}' | grep -F "${1%:*}:" | grep -vxF "$1"); do
		[ "${old%:*}" = "${1%:*}" ] || continue
		podman rmi "$old" >/dev/null 2>&1 || true
	done
	# Untagged leftovers of this script's earlier builds (by its label), and nothing else.
	podman image prune --force --filter label=io.podsnap.kind.recipe >/dev/null 2>&1 || true
}
image_recipe() {
	podman image inspect --format '{{index .Labels "io.podsnap.kind.recipe"}}' "$1" 2>/dev/null || true
}

# base_image: the Debian rootfs as an image, cached by its package list.
base_image() {
	local hash tarball ref
	hash=$(printf '%s\n' bookworm "${ROOTFS_PACKAGES[@]}" | sha256sum | cut -c1-12)
	ref=$KIND_IMAGE_REPO/base:$hash
	if podman image exists "$ref"; then
		echo "$ref"
		return 0
	fi
	tarball=$PODSNAP_CACHE/kind/rootfs-$hash.tar
	bookworm_rootfs "$tarball" node "${ROOTFS_PACKAGES[@]}"
	podman import --quiet "$tarball" "$ref" >/dev/null || die "podman could not import $tarball"
	echo "$ref"
}

# strip_copy SRC DST: an executable without its debug information (images stay small).
strip_copy() {
	install -D -m 0755 "$1" "$2"
	objcopy --strip-debug "$2" 2>/dev/null || true
}

# node_overlay DIR: everything the node image adds to the rootfs.
node_overlay() {
	local dir=$1 t kube_bin
	kube_bin=$(kind_kube_bin)
	for t in containerd containerd-shim-runc-v2 ctr runc crictl criu; do
		strip_copy "$PODSNAP_BIN/$t" "$dir/usr/local/bin/$t"
	done
	for t in kubelet kubeadm kubectl; do
		strip_copy "$kube_bin/$t" "$dir/usr/bin/$t"
	done
	strip_copy "$TARGET_DIR/podsnapd" "$dir/usr/local/bin/podsnapd"
	strip_copy "$TARGET_DIR/containerd-shim-podsnap-v2" "$dir/usr/local/bin/containerd-shim-podsnap-v2"
	mkdir -p "$dir/opt/cni/bin"
	for t in bridge host-local loopback portmap; do
		strip_copy "$CNI_BIN_DIR/$t" "$dir/opt/cni/bin/$t"
	done
	strip_copy "$TARGET_DIR/podsnap-ipam" "$dir/opt/cni/bin/podsnap-ipam"
	# kind's node contract, from kind's own module source (its containerd config is replaced).
	mkdir -p "$dir/etc/systemd/system" "$dir/etc/default" "$dir/kind"
	install -m 0755 "$KIND_SRC/images/base/files/usr/local/bin/entrypoint" "$dir/usr/local/bin/entrypoint"
	for t in kubelet.slice kubelet.service kubelet.service.d containerd.service undo-mount-hacks.service; do
		cp -r "$KIND_SRC/images/base/files/etc/systemd/system/$t" "$dir/etc/systemd/system/"
	done
	cp -r "$KIND_SRC/images/base/files/etc/sysctl.d" "$dir/etc/"
	cp "$KIND_SRC/images/base/files/etc/default/kubelet" "$dir/etc/default/"
	cp -r "$KIND_SRC/images/base/files/kind/bin" "$dir/kind/"
	# The module cache is read-only, executables included.
	chmod -R u+w "$dir"
	chmod 0755 "$dir"/kind/bin/*
	# kind's units run containerd from /usr/local/bin and the kubelet from /usr/bin (above).
	echo "$KUBERNETES_VERSION" >"$dir/kind/version"
	mkdir -p "$dir/etc/containerd" "$dir/etc/containerd/certs.d" "$dir/etc/systemd/system/multi-user.target.wants"
	node_containerd_config >"$dir/etc/containerd/config.toml"
	node_registry_hosts "$dir/etc/containerd/certs.d"
	# podsnapd: the kubelet's CRI endpoint, in front of containerd.
	cat >"$dir/etc/systemd/system/podsnapd.service" <<'EOF'
[Unit]
Description=podsnapd: CRI with pod checkpoint and restore, in front of containerd
After=containerd.service
Requires=containerd.service
Before=kubelet.service

[Service]
ExecStartPre=/bin/mkdir -p /run/podsnap-node
ExecStart=/usr/local/bin/podsnapd --listen /run/podsnap-node/podsnapd.sock --containerd /run/containerd/containerd.sock
Restart=always
RestartSec=1
KillMode=process

[Install]
WantedBy=multi-user.target
EOF
	ln -sf /etc/systemd/system/podsnapd.service "$dir/etc/systemd/system/multi-user.target.wants/podsnapd.service"
	for t in containerd kubelet undo-mount-hacks; do
		ln -sf "/etc/systemd/system/$t.service" "$dir/etc/systemd/system/multi-user.target.wants/$t.service"
	done
	# The kubelet waits for podsnapd (its CRI endpoint) as kind's unit makes it wait for containerd.
	mkdir -p "$dir/etc/systemd/system/kubelet.service.d"
	printf '[Unit]\nAfter=podsnapd.service\nWants=podsnapd.service\n' >"$dir/etc/systemd/system/kubelet.service.d/20-podsnap.conf"
	ln -sf /dev/null "$dir/etc/systemd/system/systemd-binfmt.service"
}

# node_containerd_config: containerd 2.x in the node as hack/node-up.sh configures it on the host:
# runc and the podsnap runtime handler, cgroupfs (the kubelet's driver here), oom_score_adj
# restricted, and the kind registry as mirror of every registry.
node_containerd_config() {
	cat <<EOF
version = 3

[plugins]
  [plugins."io.containerd.cri.v1.images"]
    snapshotter = "overlayfs"
    [plugins."io.containerd.cri.v1.images".pinned_images]
      sandbox = "$SANDBOX_IMAGE"
    [plugins."io.containerd.cri.v1.images".registry]
      config_path = "/etc/containerd/certs.d"

  # This host grants no CAP_SYS_RESOURCE, privileged nodes included: an oom_score_adj below the
  # node's own cannot be set (runc fails "can't get final child's PID from pipe").
  [plugins."io.containerd.cri.v1.runtime"]
    restrict_oom_score_adj = true
    [plugins."io.containerd.cri.v1.runtime".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
          SystemdCgroup = false
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.podsnap]
        runtime_type = "io.containerd.podsnap.v2"
        container_annotations = ["podsnap.io/*"]
    [plugins."io.containerd.cri.v1.runtime".cni]
      bin_dirs = ["/opt/cni/bin"]
      conf_dir = "/etc/cni/net.d"
      max_conf_num = 1
EOF
}

# node_registry_hosts DIR: every registry the node pulls from is the kind registry (plain http,
# by its container name on the kind network), as hack/node-up.sh does with the host's.
node_registry_hosts() {
	local reg
	for reg in "${MIRRORED_REGISTRIES[@]}" "localhost:${KIND_REGISTRY##*:}" "$KIND_REGISTRY" _default; do
		mkdir -p "$1/$reg"
		cat >"$1/$reg/hosts.toml" <<EOF
server = "http://$KIND_REGISTRY_NAME:5000"

[host."http://$KIND_REGISTRY_NAME:5000"]
  capabilities = ["pull", "resolve"]
EOF
	done
}


node_image() {
	local base overlay ctx recipe ref t
	[ -d "$KIND_SRC" ] || (cd /tmp && GOFLAGS=-mod=mod go mod download "sigs.k8s.io/kind@$KIND_VERSION")
	for t in podsnapd containerd-shim-podsnap-v2 podsnap-ipam; do
		[ -x "$TARGET_DIR/$t" ] || die "$TARGET_DIR/$t is not built: cargo build --workspace"
	done
	base=$(base_image) || exit 1
	ctx=$(mktemp -d)
	# shellcheck disable=SC2064 # expand now: the directory is this call's
	trap "rm -rf '$ctx'" EXIT
	overlay=$ctx/overlay
	mkdir -p "$overlay"
	node_overlay "$overlay"
	recipe=$( (
		echo "$base"
		cd "$overlay" && find . -type f -print0 | sort -z | xargs -0 sha256sum
		find . -type l -printf '%p -> %l\n' | sort
	) | sha256sum | cut -c1-12)
	ref=$KIND_NODE_IMAGE_REPO:$KUBERNETES_VERSION-$recipe
	if [ "$(image_recipe "$ref")" = "$recipe" ]; then
		echo "$ref"
		return 0
	fi
	cat >"$ctx/Containerfile" <<EOF
FROM $base
COPY overlay/ /
ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]
STOPSIGNAL SIGRTMIN+3
LABEL io.podsnap.kind.recipe=$recipe
EOF
	log "building $ref"
	podman build --quiet --pull=never --network=none -t "$ref" "$ctx" >/dev/null
	prune_older "$ref"
	echo "$ref"
}

# image_from_base REF RECIPE FILE:DEST...: the rootfs image plus files (stripped executables),
# built unless REF already carries RECIPE.
image_from_base() {
	local ref=$1 recipe=$2 base ctx spec
	shift 2
	[ "$(image_recipe "$ref")" = "$recipe" ] && return 0
	base=$(base_image) || exit 1
	ctx=$(mktemp -d)
	{
		echo "FROM $base"
		for spec in "$@"; do
			strip_copy "${spec%%:*}" "$ctx/files${spec#*:}"
		done
		echo "COPY files/ /"
		echo "LABEL io.podsnap.kind.recipe=$recipe"
	} >"$ctx/Containerfile"
	podman build --quiet --pull=never --network=none -t "$ref" "$ctx" >/dev/null
	rm -rf "$ctx"
}

# push REF TARGET: REF pushed to the kind registry as TARGET (a repository path and tag).
push() {
	podman push --quiet --tls-verify=false "$1" "docker://$KIND_REGISTRY/$2" >/dev/null
}

# registry_image: the kind registry's own image: Debian's docker-registry on the rootfs.
registry_image() {
	local recipe ref=$KIND_IMAGE_REPO/registry:2
	recipe=$(recipe_of /usr/bin/docker-registry "$0")
	image_from_base "$ref" "$recipe" /usr/bin/docker-registry:/usr/bin/docker-registry
	echo "$ref"
}

push_images() {
	local kube_bin image name tag recipe ref t images
	kube_bin=$(kind_kube_bin)
	images=$("$kube_bin/kubeadm" config images list --kubernetes-version "$KUBERNETES_VERSION") ||
		die "kubeadm config images list failed"
	for name in kube-apiserver kube-controller-manager kube-scheduler kube-proxy etcd; do
		grep -q "^registry.k8s.io/$name:" <<<"$images" || die "kubeadm does not list registry.k8s.io/$name: $images"
	done
	curl -fsS --noproxy '*' -o /dev/null --max-time 2 "http://$KIND_REGISTRY/v2/" ||
		die "the kind registry does not answer on $KIND_REGISTRY: hack/kind-up.sh starts it"
	# The control plane, under the names kubeadm asks for (registry.k8s.io is mirrored to the
	# kind registry). CoreDNS is not built here: the cluster runs without the DNS add-on.
	while read -r image; do
		name=${image#registry.k8s.io/}
		tag=${name##*:}
		name=${name%:*}
		case "$name" in
		kube-apiserver | kube-controller-manager | kube-scheduler | kube-proxy | etcd) ;;
		*) continue ;;
		esac
		recipe=$(recipe_of "$kube_bin/$name" "$0")
		ref=$KIND_IMAGE_REPO/$name:$tag
		image_from_base "$ref" "$recipe" "$kube_bin/$name:/usr/local/bin/$name"
		push "$ref" "$name:$tag"
	done <<<"$images"
	# podsnap's own: the controller, and podsnapd for the node agent.
	for t in podsnap-controller podsnapd; do
		[ -x "$TARGET_DIR/$t" ] || die "$TARGET_DIR/$t is not built: cargo build --workspace"
		recipe=$(recipe_of "$TARGET_DIR/$t" "$0")
		ref=$KIND_IMAGE_REPO/$t:$recipe
		image_from_base "$ref" "$recipe" "$TARGET_DIR/$t:/usr/local/bin/$t"
		prune_older "$ref"
		push "$ref" "podsnap/$t:$recipe"
		echo "$t=localhost:${KIND_REGISTRY##*:}/podsnap/$t:$recipe"
	done
	# The test and demo images (pause, busybox, ...), as the host's node has them.
	python3 "$PODSNAP_ROOT/hack/mkimage.py" --registry "$KIND_REGISTRY" --busybox "$PODSNAP_BIN/busybox" >&2
}

main() {
	kind_check_podman
	podman_config
	case "${1:-}" in
	node) node_image ;;
	push) push_images ;;
	registry) registry_image ;;
	*) die "usage: hack/kind-image.sh node|push|registry" ;;
	esac
}
main "$@"
