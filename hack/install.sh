#!/usr/bin/env bash
# Install everything podsnap's node, tests and demo need, idempotently, cached in $PODSNAP_CACHE:
# Debian packages, CRIU from source, containerd/runc/crictl/critest/CNI/checkpointctl from their
# Go modules. Each built artefact is keyed by version and recipe, so a rerun costs seconds.
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
require_root
mkdir -p "$PODSNAP_BIN" "$PODSNAP_CACHE/src" "$PODSNAP_CACHE/stamps"
export DEBIAN_FRONTEND=noninteractive
BUSYBOX_VERSION=1.37.0
# Upstream tarballs as Debian ships them, pinned: criu_4.1.1.orig.tar.xz, busybox_1.37.0.orig.tar.bz2.
CRIU_ORIG_SHA256=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
BUSYBOX_ORIG_SHA256=3311dff32e746499f4df0d5df04d7eb396382d7e108bb9250e7b519b837043a4

APT_PACKAGES=(
	build-essential pkg-config git curl xz-utils zstd jq dpkg-dev patch
	libseccomp-dev iptables iproute2 util-linux procps psmisc
	libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler protobuf-compiler python3-protobuf libnl-3-dev
	libnet1-dev libcap-dev libbsd-dev libgnutls28-dev libnftables-dev uuid-dev
	docker-registry shellcheck busybox-static bzip2 python3 openssl
	podman netavark aardvark-dns conmon mmdebstrap binutils skopeo
	vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils dnsmasq-base
	extlinux rsync
)

# stamp NAME RECIPE: true when NAME was built with this exact RECIPE before.
stamp_ok() { [ -f "$PODSNAP_CACHE/stamps/$1" ] && [ "$(cat "$PODSNAP_CACHE/stamps/$1")" = "$2" ]; }
stamp_set() { printf '%s' "$2" >"$PODSNAP_CACHE/stamps/$1"; }

install_apt() {
	local missing=()
	for p in "${APT_PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	apt-get update -q
	apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
}

# Debian's trixie suite carries CRIU 4.1.1's upstream tarball; bookworm's CRIU 3.17 fails on this
# kernel. Only the source is fetched: trixie binaries would pull a newer libc.
trixie_sources() {
	local list=/etc/apt/sources.list.d/podsnap-trixie-src.sources mirror
	if [ ! -f "$list" ]; then
		mirror=$(debian_mirror) || exit 1
		printf 'Types: deb-src\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror" >"$list"
		apt-get update -q
	fi
}

# debian_mirror: the Debian mirror apt uses here.
debian_mirror() {
	local uri
	uri=$(grep -hoE '^URIs: *[^ ]+' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1 | awk '{print $2}')
	[ -n "$uri" ] || uri=$(grep -hoE '^deb +[^ ]+' /etc/apt/sources.list 2>/dev/null | head -1 | awk '{print $2}')
	[ -n "$uri" ] || die "cannot find the Debian mirror in apt's configuration"
	echo "${uri%/}"
}

# trixie_source PKG [SPEC]: download PKG's source (SPEC: what apt-get source gets, default PKG/trixie).
trixie_source() {
	trixie_sources
	(cd "$PODSNAP_CACHE/src" && apt-get source --download-only "${2:-$1/trixie}" </dev/null) || true
}

# debian_orig PKG VERSION EXT SHA256 [SPEC]: $PODSNAP_CACHE/src/PKG_VERSION.orig.tar.EXT, the
# upstream tarball Debian ships, with the sha256 podsnap was tested with. From trixie's source
# index (SPEC: what apt-get source gets, default PKG/trixie); once trixie moves past VERSION (its
# .dsc gone, as criu's 4.1.1-1 on 2026-12-02), straight from the pool by name while a suite still
# refers to it.
debian_orig() {
	local pkg=$1 version=$2 ext=$3 sha256=$4 spec=${5:-} tarball mirror
	tarball="$PODSNAP_CACHE/src/${pkg}_$version.orig.tar.$ext"
	[ -f "$tarball" ] || trixie_source "$pkg" ${spec:+"$spec"}
	if [ ! -f "$tarball" ]; then
		mirror=$(debian_mirror) || exit 1
		curl -fsSL --retry 3 -o "$tarball.tmp" "$mirror/pool/main/${pkg:0:1}/$pkg/${pkg}_$version.orig.tar.$ext" ||
			die "$pkg $version's source is neither in trixie's index nor in the Debian pool"
		mv "$tarball.tmp" "$tarball"
	fi
	if ! echo "$sha256  $tarball" | sha256sum --check --quiet >/dev/null 2>&1; then
		rm -f "$tarball"
		die "${pkg}_$version.orig.tar.$ext does not have the sha256 podsnap pins ($sha256): removed"
	fi
}

# CRIU with podsnap's patches (hack/criu-*.patch, each saying why at its top): TCP/UDP sockets on
# Linux >= 6.16 (sockopt-eopnotsupp), restore into a pod's existing user namespace
# (join-userns-at-clone), rlimits of such tasks without CAP_SYS_RESOURCE (rlimits-from-proc),
# their read-only sysfs where the host's is read-only (userns-mount-with-its-flags), no
# conntrack dump of the pod's (external) netns without --tcp-established (external-netns-conntrack),
# a restored task joining its cgroup v1 hierarchies without the global lock (cgroup-v1-self-move),
# no kernel probes in every CRIU that only `criu check` reads (check-only-probes), and its kernel
# facts cached in RUNDIR=$CRIU_RUNDIR, made when missing (kdat-cache-dir; hack/node-up.sh mounts a
# tmpfs there where /run is none, as CRIU keeps the cache only on a tmpfs).
install_criu() {
	local patches recipe
	patches=$(cat "$PODSNAP_ROOT"/hack/criu-"$CRIU_VERSION"-*.patch | sha256sum | cut -c1-12)
	recipe="criu-$CRIU_VERSION-r3-$patches-rundir=$CRIU_RUNDIR"
	stamp_ok criu "$recipe" && [ -x "$PODSNAP_BIN/criu" ] && return 0
	local tarball="$PODSNAP_CACHE/src/criu_$CRIU_VERSION.orig.tar.xz" dir patch
	debian_orig criu "$CRIU_VERSION" xz "$CRIU_ORIG_SHA256"
	dir=$(mktemp -d)
	tar -C "$dir" -xf "$tarball"
	for patch in "$PODSNAP_ROOT"/hack/criu-"$CRIU_VERSION"-*.patch; do
		patch -d "$dir/criu-$CRIU_VERSION" -p1 --quiet <"$patch"
	done
	make -C "$dir/criu-$CRIU_VERSION" -j"$(nproc)" RUNDIR="$CRIU_RUNDIR" criu >/dev/null
	install -m 0755 "$dir/criu-$CRIU_VERSION/criu/criu" "$PODSNAP_BIN/criu"
	rm -rf "$dir"
	"$PODSNAP_BIN/criu" --version
	stamp_set criu "$recipe"
}

# The test images' busybox (hack/mkimage.py): upstream's defconfig, static. Debian's busybox-static
# cannot serve: its shell runs applets in-process instead of exec'ing them from PATH
# (FEATURE_SH_STANDALONE), which defeats critest's MaskedPaths spec (it masks /bin/ls and expects
# `sh -c ls` to fail), and it lacks applets critest runs (pgrep, ipcs). 1.37.0 is the version
# cri-tools' test images are built from; trixie carries its tarball. Takes ~40 s on 2 cores.
install_busybox() {
	local recipe="busybox-$BUSYBOX_VERSION-defconfig-static-r1" tarball dir version
	stamp_ok busybox "$recipe" && [ -x "$PODSNAP_BIN/busybox" ] && return 0
	tarball="$PODSNAP_CACHE/src/busybox_$BUSYBOX_VERSION.orig.tar.bz2"
	if [ ! -f "$tarball" ]; then
		trixie_sources
		version=$(apt-cache showsrc busybox | awk -v v="$BUSYBOX_VERSION" '$1 == "Version:" && $2 ~ ("^([0-9]+:)?" v "-") {print $2}' | sort -V | tail -1)
	fi
	debian_orig busybox "$BUSYBOX_VERSION" bz2 "$BUSYBOX_ORIG_SHA256" ${version:+"busybox=$version"}
	dir=$(mktemp -d)
	tar -C "$dir" -xjf "$tarball"
	(cd "$dir/busybox-$BUSYBOX_VERSION" && make defconfig >/dev/null &&
		sed -i -e 's/^# CONFIG_STATIC is not set/CONFIG_STATIC=y/' -e 's/^CONFIG_TC=y/# CONFIG_TC is not set/' .config &&
		{ yes "" || true; } | make oldconfig >/dev/null &&
		make -j"$(nproc)" busybox >/dev/null 2>&1)
	install -m 0755 "$dir/busybox-$BUSYBOX_VERSION/busybox" "$PODSNAP_BIN/busybox"
	rm -rf "$dir"
	stamp_set busybox "$recipe"
}

# go_module MODULE VERSION: print a writable copy of the module's source tree.
go_module() {
	local dir src
	dir=$(GOFLAGS=-mod=mod go mod download -json "$1@$2" | jq -r .Dir)
	[ -d "$dir" ] || die "go mod download $1@$2 failed"
	src=$(mktemp -d)
	cp -r "$dir/." "$src/"
	chmod -R u+w "$src"
	echo "$src"
}

install_containerd() {
	local recipe="containerd-$CONTAINERD_VERSION-r1" src
	stamp_ok containerd "$recipe" && return 0
	src=$(go_module github.com/containerd/containerd/v2 "$CONTAINERD_VERSION")
	(cd "$src" && GOFLAGS=-mod=mod CGO_ENABLED=1 go build -tags "no_btrfs" -trimpath \
		-ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
		-o "$PODSNAP_BIN/" ./cmd/containerd ./cmd/ctr ./cmd/containerd-shim-runc-v2)
	rm -rf "$src"
	stamp_set containerd "$recipe"
}

install_runc() {
	local recipe="runc-$RUNC_VERSION-r1" src
	stamp_ok runc "$recipe" && return 0
	src=$(go_module github.com/opencontainers/runc "$RUNC_VERSION")
	(cd "$src" && GOFLAGS=-mod=mod CGO_ENABLED=1 go build -tags seccomp -trimpath \
		-ldflags "-s -w -X main.version=${RUNC_VERSION#v}" -o "$PODSNAP_BIN/runc" .)
	rm -rf "$src"
	stamp_set runc "$recipe"
}

install_cri_tools() {
	local recipe="cri-tools-$CRI_TOOLS_VERSION-r1" src
	stamp_ok cri-tools "$recipe" && return 0
	src=$(go_module sigs.k8s.io/cri-tools "$CRI_TOOLS_VERSION")
	(cd "$src" && GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRI_TOOLS_VERSION" \
		-o "$PODSNAP_BIN/crictl" ./cmd/crictl &&
		GOFLAGS=-mod=mod go test -c -trimpath -o "$PODSNAP_BIN/critest" ./cmd/critest)
	rm -rf "$src"
	stamp_set cri-tools "$recipe"
}

install_cni() {
	local recipe="cni-$CNI_PLUGINS_VERSION-r1" src
	stamp_ok cni "$recipe" && return 0
	src=$(go_module github.com/containernetworking/plugins "$CNI_PLUGINS_VERSION")
	mkdir -p "$PODSNAP_CACHE/cni/bin"
	(cd "$src" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$PODSNAP_CACHE/cni/bin/" \
		./plugins/main/bridge ./plugins/main/loopback ./plugins/ipam/host-local ./plugins/meta/portmap)
	rm -rf "$src"
	stamp_set cni "$recipe"
}

# critest --parallel N hands the run to the ginkgo CLI, which must be on PATH: build it at the
# version cri-tools pins in its go.mod, so the CLI and the suite compiled into critest match.
install_ginkgo() {
	local gomod version recipe src
	gomod=$(GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/cri-tools@$CRI_TOOLS_VERSION" | jq -r .GoMod)
	version=$(awk '$1 == "github.com/onsi/ginkgo/v2" {print $2; exit}' "$gomod")
	[ -n "$version" ] || die "cannot find ginkgo's version in $gomod"
	recipe="ginkgo-$version-r1"
	stamp_ok ginkgo "$recipe" && [ -x "$PODSNAP_BIN/ginkgo" ] && return 0
	src=$(go_module github.com/onsi/ginkgo/v2 "$version")
	(cd "$src" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$PODSNAP_BIN/ginkgo" ./ginkgo)
	rm -rf "$src"
	stamp_set ginkgo "$recipe"
}

install_checkpointctl() {
	local recipe="checkpointctl-$CHECKPOINTCTL_VERSION-r1" src
	stamp_ok checkpointctl "$recipe" && return 0
	src=$(go_module github.com/checkpoint-restore/checkpointctl "$CHECKPOINTCTL_VERSION")
	(cd "$src" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$PODSNAP_BIN/checkpointctl" .)
	rm -rf "$src"
	stamp_set checkpointctl "$recipe"
}

main() {
	local t0
	t0=$(date +%s)
	step apt install_apt
	step criu install_criu
	step busybox install_busybox
	step runc install_runc
	step containerd install_containerd
	step cni install_cni
	step cri-tools install_cri_tools
	step ginkgo install_ginkgo
	step checkpointctl install_checkpointctl
	# youki's libcontainer and libcgroups with podsnap's patch series (libcontainer-patches/,
	# libcgroups-patches/), which the workspace builds from third_party/.
	step libcontainer "$PODSNAP_ROOT/hack/libcontainer.sh"
	log "install done in $(($(date +%s) - t0))s"
}
main "$@"
