#!/usr/bin/env bash
# Build podsnap's Vagrant box offline and stage what a VM's node runs:
#
#   hack/vagrant-box.sh box       the libvirt box $PODSNAP_BOX_NAME: a Debian bookworm rootfs
#                                 (mmdebstrap from the apt mirror this host uses, cached by package
#                                 list) with a kernel, systemd, sshd and Vagrant's insecure key, on a
#                                 whole-disk ext4 that extlinux boots; qcow2 + metadata.json, added
#                                 with `vagrant box add`. Rebuilt only when its recipe changes.
#   hack/vagrant-box.sh payload   $PODSNAP_PAYLOAD: the binaries built on this host (containerd,
#                                 runc, the patched CRIU, crictl, CNI plugins, podsnapd, the shim,
#                                 the podsnap CLI, stripped) and the registry's images, which the
#                                 Vagrantfile rsyncs into the VM: provisioning needs no network.
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=hack/node-lib.sh
. "$(dirname "$0")/node-lib.sh"
# shellcheck source=hack/vagrant-lib.sh
. "$(dirname "$0")/vagrant-lib.sh"
require_root
vagrant_env

TARGET_DIR=${CARGO_TARGET_DIR:-$PODSNAP_ROOT/target}/debug
work=""
mnt=""
cleanup() {
	if [ -n "$mnt" ] && mountpoint -q "$mnt"; then umount "$mnt" || true; fi
	if [ -n "$work" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

# The recipe: everything that goes into the box.
box_recipe() {
	{
		printf '%s\n' "${BOX_PACKAGES[@]}" "$BOX_DISK_GIB"
		cat "$0" "$PODSNAP_ROOT/hack/vagrant-lib.sh" "$VAGRANT_INSECURE_PUB"
	} | sha256sum | cut -c1-12
}

# rootfs_tarball: the bookworm rootfs with BOX_PACKAGES, built once per package list.
rootfs_tarball() {
	local hash tarball
	hash=$(printf '%s\n' "${BOX_PACKAGES[@]}" | sha256sum | cut -c1-12)
	tarball=$VAGRANT_CACHE/rootfs-$hash.tar
	bookworm_rootfs "$tarball" box "${BOX_PACKAGES[@]}"
	echo "$tarball"
}

# customize ROOT: what makes the rootfs a Vagrant box that boots under libvirt.
customize() {
	local root=$1 kver
	echo podsnap-vm >"$root/etc/hostname"
	printf '127.0.0.1\tlocalhost\n127.0.1.1\tpodsnap-vm\n' >"$root/etc/hosts"
	printf 'LABEL=podsnap-root / ext4 defaults,noatime 0 1\n' >"$root/etc/fstab"
	# DHCP on the first NIC (Vagrant's management network): systemd-networkd.
	cat >"$root/etc/systemd/network/80-dhcp.network" <<'EOF'
[Match]
Name=eth* en*

[Network]
DHCP=yes
EOF
	# The vagrant user: sudo without a password, Vagrant's insecure key.
	chroot "$root" useradd --create-home --shell /bin/bash vagrant
	install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
	install -m 0600 -o 1000 -g 1000 "$VAGRANT_INSECURE_PUB" "$root/home/vagrant/.ssh/authorized_keys"
	printf 'vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n' >"$root/etc/sudoers.d/vagrant"
	chmod 0440 "$root/etc/sudoers.d/vagrant"
	# Every VM gets its own ssh host keys, made on first boot.
	rm -f "$root"/etc/ssh/ssh_host_*
	cat >"$root/etc/systemd/system/podsnap-ssh-hostkeys.service" <<'EOF'
[Unit]
Description=ssh host keys of this VM (podsnap box)
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
	printf 'UseDNS no\n' >"$root/etc/ssh/sshd_config.d/podsnap.conf"
	systemctl --root="$root" enable systemd-networkd.service ssh.service podsnap-ssh-hostkeys.service >/dev/null 2>&1 ||
		die "could not enable the box's services"
	# Debian's docker-registry starts on :5000, where the node (hack/node-up.sh) runs its own.
	systemctl --root="$root" mask docker-registry.service >/dev/null 2>&1 ||
		die "could not mask docker-registry.service in the box"
	# Boot: extlinux on the whole-disk ext4. cgroup v1 (hybrid), as on the hosts podsnap is tested on.
	kver=$(find "$root/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sed 's/^vmlinuz-//' | sort -V | tail -n 1)
	if [ -z "$kver" ] || [ ! -f "$root/boot/initrd.img-$kver" ]; then
		die "the box rootfs has no kernel and initrd"
	fi
	mkdir -p "$root/boot/extlinux"
	cat >"$root/boot/extlinux/extlinux.conf" <<EOF
DEFAULT linux
TIMEOUT 1
LABEL linux
  LINUX /boot/vmlinuz-$kver
  INITRD /boot/initrd.img-$kver
  APPEND root=LABEL=podsnap-root rw console=ttyS0,115200 net.ifnames=0 systemd.unified_cgroup_hierarchy=0
EOF
}

build_box() {
	local recipe stamp tarball img
	[ -n "$VAGRANT_INSECURE_PUB" ] || die "Vagrant's insecure key is missing: run hack/install.sh (vagrant)"
	command -v extlinux >/dev/null || die "extlinux is missing: run hack/install.sh"
	command -v qemu-img >/dev/null || die "qemu-img is missing: run hack/install.sh"
	mkdir -p "$VAGRANT_CACHE"
	recipe=$(box_recipe)
	stamp=$VAGRANT_CACHE/box.recipe
	if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$recipe" ] &&
		grep -q "^$PODSNAP_BOX_NAME " <<<"$(vagrant box list 2>/dev/null)"; then
		log "box $PODSNAP_BOX_NAME is current (recipe $recipe)"
		return 0
	fi
	tarball=$(rootfs_tarball)
	# A build killed half-way left its directory (and perhaps its loop mount): ours, by name.
	local stale
	for stale in "$VAGRANT_CACHE"/build.*; do
		[ -d "$stale" ] || continue
		if mountpoint -q "$stale/root"; then umount "$stale/root"; fi
		rm -rf "$stale"
	done
	work=$(mktemp -d "$VAGRANT_CACHE/build.XXXXXX")
	mnt=$work/root
	img=$work/box.raw
	mkdir "$mnt"
	log "building box $PODSNAP_BOX_NAME (recipe $recipe)"
	truncate -s "${BOX_DISK_GIB}G" "$img"
	# extlinux reads ext4 without the 64bit feature.
	mkfs.ext4 -q -L podsnap-root -O ^64bit "$img"
	mount -o loop "$img" "$mnt"
	tar -xpf "$tarball" -C "$mnt" --numeric-owner --xattrs --xattrs-include='*'
	customize "$mnt"
	extlinux --install "$mnt/boot/extlinux" >/dev/null 2>&1 || die "extlinux could not install its boot loader"
	umount "$mnt"
	qemu-img convert -O qcow2 "$img" "$work/box.img"
	rm -f "$img"
	printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %s}\n' "$BOX_DISK_GIB" >"$work/metadata.json"
	tar -cf "$work/podsnap.box" -C "$work" metadata.json box.img
	vagrant box add --force --name "$PODSNAP_BOX_NAME" "$work/podsnap.box" >&2 || die "vagrant box add failed"
	echo "$recipe" >"$stamp"
	log "box $PODSNAP_BOX_NAME added ($(du -h "$work/box.img" | cut -f1) qcow2)"
}

# strip_copy SRC DST: an executable without its debug information.
strip_copy() {
	[ -x "$1" ] || die "$1 is missing: run hack/install.sh and cargo build"
	install -D -m 0755 "$1" "$2"
	objcopy --strip-debug "$2" 2>/dev/null || true
}

# The payload keeps the host's layout under PODSNAP_CACHE, so the node's scripts find everything
# where they look on the host; podsnap's own binaries go to payload/target.
stage_payload() {
	local t
	log "staging the VM payload in $PODSNAP_PAYLOAD"
	install -d -m 0700 "$PODSNAP_PAYLOAD"
	for t in containerd containerd-shim-runc-v2 ctr runc crictl criu checkpointctl busybox; do
		strip_copy "$PODSNAP_BIN/$t" "$PODSNAP_PAYLOAD/bin/$t"
	done
	for t in "$CNI_BIN_DIR"/*; do
		strip_copy "$t" "$PODSNAP_PAYLOAD/cni/bin/$(basename "$t")"
	done
	for t in podsnapd containerd-shim-podsnap-v2 podsnap podsnap-ipam; do
		strip_copy "$TARGET_DIR/$t" "$PODSNAP_PAYLOAD/target/$t"
	done
	[ -d "$REGISTRY_STORAGE/docker" ] || die "the registry has no images: run hack/images.sh"
	mkdir -p "$PODSNAP_PAYLOAD/registry"
	rsync -a --delete "$REGISTRY_STORAGE/" "$PODSNAP_PAYLOAD/registry/"
	du -sh "$PODSNAP_PAYLOAD" | awk '{print "payload: " $1}' >&2
}

case ${1:-} in
box) build_box ;;
payload) stage_payload ;;
*) die "usage: hack/vagrant-box.sh box|payload" ;;
esac
