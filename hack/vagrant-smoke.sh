#!/usr/bin/env bash
# Smoke test of the Vagrant VM (vagrant/Vagrantfile), offline: build the box and the payload
# (hack/vagrant-box.sh), start libvirt's daemons when nothing else runs them (a host without an
# init system), `vagrant up` (the provisioner starts the node inside the VM from the rsynced
# binaries), run the node-level demo in the VM (a counting pod checkpointed through podsnapd and
# restored into a new pod, hack/demo-cri.sh), then destroy the VM and remove the storage pool, the
# networks and the daemons it started. It fails if anything of its own is left behind.
#
# Usage: hack/vagrant-smoke.sh [--keep]   (--keep: leave the VM running; `vagrant destroy` later)
#        hack/vagrant-smoke.sh --validate  `vagrant validate` for each CPU mode and a GPU, and bad
#                                          settings refused with a clear error; no VM (a CI phase)
# Environment: PODSNAP_VM_CPUS (default 2), PODSNAP_VM_MEMORY (MiB, default 4096), PODSNAP_VM_ACCEL
# (see the Vagrantfile). Under software emulation a boot takes minutes: this is not a CI phase.
set -euo pipefail
exec </dev/null
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=hack/node-lib.sh
. "$(dirname "$0")/node-lib.sh"
# shellcheck source=hack/vagrant-lib.sh
. "$(dirname "$0")/vagrant-lib.sh"
require_root
vagrant_env
cd "$PODSNAP_ROOT"

# validate: the Vagrantfile is valid with every setting it documents, and refuses bad ones.
validate() {
	local out
	command -v vagrant >/dev/null || die "vagrant is missing: run hack/install.sh"
	grep -q '^vagrant-libvirt ' <<<"$(vagrant plugin list 2>/dev/null)" || die "vagrant-libvirt is missing: run hack/install.sh"
	cd "$PODSNAP_ROOT/vagrant"
	vagrant validate >/dev/null || die "vagrant validate failed with the default settings"
	PODSNAP_VM_ACCEL=tcg vagrant validate >/dev/null || die "vagrant validate failed with PODSNAP_VM_ACCEL=tcg"
	PODSNAP_VM_ACCEL=kvm PODSNAP_GPU_PCI=0000:65:00.0 vagrant validate >/dev/null ||
		die "vagrant validate failed with PODSNAP_VM_ACCEL=kvm PODSNAP_GPU_PCI=0000:65:00.0"
	# Bad settings: refused, naming the setting.
	refused() {
		local what=$1
		shift
		if out=$(env "$@" vagrant validate 2>&1); then die "vagrant validate accepted $*"; fi
		grep -q "$what" <<<"$out" || die "vagrant validate refused $* without naming $what: $out"
	}
	refused PODSNAP_VM_ACCEL PODSNAP_VM_ACCEL=xen
	refused PODSNAP_GPU_PCI PODSNAP_VM_ACCEL=kvm PODSNAP_GPU_PCI=65:00
	refused PODSNAP_GPU_PCI PODSNAP_VM_ACCEL=tcg PODSNAP_GPU_PCI=0000:65:00.0
	refused PODSNAP_VM_CPUS PODSNAP_VM_CPUS=many
	log "vagrant validate: the Vagrantfile is valid and refuses bad settings"
}

keep=0
case ${1:-} in
"") ;;
--keep) keep=1 ;;
--validate)
	validate
	exit 0
	;;
*) die "usage: hack/vagrant-smoke.sh [--keep|--validate]" ;;
esac

POOL=podsnap-vagrant
POOL_DIR=$VAGRANT_CACHE/pool
DOMAIN=podsnap-vm
VAGRANT_RUN=/run/podsnap-vagrant
export VAGRANT_DOTFILE_PATH=$VAGRANT_CACHE/state
export PODSNAP_VM_POOL=$POOL
export PODSNAP_VM_CPUS=${PODSNAP_VM_CPUS:-2}
export PODSNAP_VM_MEMORY=${PODSNAP_VM_MEMORY:-4096}
export PODSNAP_VM_CONSOLE_LOG=$VAGRANT_CACHE/console.log
for t in vagrant virsh libvirtd virtlogd qemu-system-x86_64 rsync; do
	command -v "$t" >/dev/null || die "$t is missing: run hack/install.sh"
done

virsh_() { virsh -c qemu:///system "$@"; }
started=()
nets_before=""
registry_mine=0 # images.sh starts the node's registry when it is down: stopped again at the end

# libvirt_up: libvirtd and virtlogd, started here (pid files in $VAGRANT_RUN) unless already
# answering; only what this script started is stopped again.
libvirt_up() {
	local d i
	if virsh_ version >/dev/null 2>&1; then
		log "libvirtd is already running: using it"
		return 0
	fi
	mkdir -p "$VAGRANT_RUN" /var/log/libvirt /var/lib/libvirt /run/libvirt
	for d in virtlogd libvirtd; do
		if [ -S "/run/libvirt/$d-sock" ] && [ "$d" = virtlogd ] && pgrep -x virtlogd >/dev/null; then
			continue
		fi
		"$d" --daemon --pid-file "$VAGRANT_RUN/$d.pid" || die "$d did not start"
		started+=("$d")
	done
	for ((i = 0; i < 60; i++)); do
		virsh_ version >/dev/null 2>&1 && return 0
		sleep 0.5
	done
	die "libvirtd does not answer on qemu:///system (see /var/log/libvirt)"
}

libvirt_down() {
	local i d pid
	for ((i = ${#started[@]} - 1; i >= 0; i--)); do
		d=${started[$i]}
		pid=$(cat "$VAGRANT_RUN/$d.pid" 2>/dev/null) || continue
		kill "$pid" 2>/dev/null || true
		for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
		rm -f "$VAGRANT_RUN/$d.pid"
	done
	started=()
}

# pool_up: a directory pool of our own for the box volume and the VM's disk.
pool_up() {
	mkdir -p "$POOL_DIR"
	# qemu runs as libvirt-qemu: it must reach the disks (libvirt makes them its own, 0600).
	chmod 0711 "$POOL_DIR"
	if ! virsh_ pool-info "$POOL" >/dev/null 2>&1; then
		virsh_ pool-define-as "$POOL" dir --target "$POOL_DIR" >/dev/null
	fi
	[[ $(virsh_ pool-info "$POOL") =~ State:\ +running ]] || virsh_ pool-start "$POOL" >/dev/null
}

pool_down() {
	local v
	virsh_ pool-info "$POOL" >/dev/null 2>&1 || return 0
	for v in $(virsh_ vol-list "$POOL" 2>/dev/null | awk 'NR > 2 && NF { print $1 }'); do
		virsh_ vol-delete --pool "$POOL" "$v" >/dev/null || true
	done
	virsh_ pool-destroy "$POOL" >/dev/null 2>&1 || true
	virsh_ pool-undefine "$POOL" >/dev/null || true
	rmdir "$POOL_DIR" 2>/dev/null || true
}

vm_vagrant() { (cd "$PODSNAP_ROOT/vagrant" && vagrant "$@"); }

leftovers() {
	local left=()
	virsh_ dominfo "$DOMAIN" >/dev/null 2>&1 && left+=("domain $DOMAIN")
	virsh_ pool-info "$POOL" >/dev/null 2>&1 && left+=("storage pool $POOL")
	local n
	for n in $(virsh_ net-list --all --name 2>/dev/null); do
		grep -qx "$n" <<<"$nets_before" || left+=("network $n")
	done
	[ -d "$POOL_DIR" ] && left+=("$POOL_DIR")
	printf '%s\n' "${left[@]}"
}

cleanup() {
	local rc=$? n left
	trap - EXIT
	if [ "$keep" = 1 ] && [ "$rc" = 0 ]; then
		log "kept VM $DOMAIN: cd vagrant && VAGRANT_DOTFILE_PATH=$VAGRANT_DOTFILE_PATH vagrant ssh"
		exit 0
	fi
	if virsh_ version >/dev/null 2>&1; then
		vm_vagrant destroy -f >/dev/null 2>&1 || true
		if virsh_ dominfo "$DOMAIN" >/dev/null 2>&1; then
			virsh_ destroy "$DOMAIN" >/dev/null 2>&1 || true
			virsh_ undefine "$DOMAIN" --remove-all-storage >/dev/null 2>&1 || true
		fi
		pool_down
		# Networks vagrant-libvirt made for this VM (its management network).
		for n in $(virsh_ net-list --all --name 2>/dev/null); do
			grep -qx "$n" <<<"$nets_before" && continue
			virsh_ net-destroy "$n" >/dev/null 2>&1 || true
			virsh_ net-undefine "$n" >/dev/null 2>&1 || true
		done
		left=$(leftovers)
	else
		left=""
	fi
	rm -rf "$VAGRANT_DOTFILE_PATH"
	libvirt_down
	if [ "$registry_mine" = 1 ]; then registry_down; fi
	if [ -n "$left" ]; then
		log "error: left behind: $left"
		rc=1
	fi
	exit "$rc"
}
trap cleanup EXIT

start=$(date +%s)
step build cargo build -p containerd-shim-podsnap-v2 -p podsnapd -p podsnap-cli
registry_answers || registry_mine=1
step images hack/images.sh
step payload hack/vagrant-box.sh payload
step box hack/vagrant-box.sh box
step libvirt libvirt_up
nets_before=$(virsh_ net-list --all --name)
virsh_ dominfo "$DOMAIN" >/dev/null 2>&1 &&
	die "a VM named $DOMAIN exists: destroy it (cd vagrant && vagrant destroy) or virsh undefine it"
pool_up
rm -f "$PODSNAP_VM_CONSOLE_LOG"
if host_has_kvm; then
	log "the VM runs on KVM (host-passthrough CPU)"
else
	log "no VT-x/AMD-V here: the VM runs under software emulation (TCG, Nehalem CPU); boot takes minutes"
fi
# vagrant's progress meter is one line per percent: keep the log readable.
up() { vm_vagrant up --provider libvirt 2>&1 | tr '\r' '\n' | grep -v '^.*Progress: ' || return "${PIPESTATUS[0]}"; }
step vagrant-up up || die "vagrant up failed (the VM's console: $PODSNAP_VM_CONSOLE_LOG)"
step demo-in-vm vm_vagrant ssh -c \
	'sudo PODSNAP_OFFLINE=1 PODSNAP_TARGET_DIR=/var/cache/podsnap/target /podsnap/hack/demo-cri.sh' ||
	die "the demo failed in the VM"
log "vagrant smoke test passed in $(($(date +%s) - start))s"
