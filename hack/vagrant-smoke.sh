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
	# The Vagrantfile needs a staged payload; validation looks at the configuration only, so an
	# empty one will do, unless the real one is there.
	local empty
	empty=$(mktemp -d)
	# shellcheck disable=SC2064 # expand now: the directory is this function's
	trap "rm -rf '$empty'" RETURN
	if [ ! -d "$PODSNAP_PAYLOAD" ]; then export PODSNAP_PAYLOAD=$empty; fi
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
	refused "vagrant-box.sh payload" PODSNAP_PAYLOAD="$empty/none"
	refused PODSNAP_VM_ACCEL PODSNAP_VM_ACCEL=xen
	refused PODSNAP_GPU_PCI PODSNAP_VM_ACCEL=kvm PODSNAP_GPU_PCI=65:00
	refused PODSNAP_GPU_PCI PODSNAP_VM_ACCEL=tcg PODSNAP_GPU_PCI=0000:65:00.0
	refused PODSNAP_GPU_PCI PODSNAP_VM_ACCEL=kvm PODSNAP_GPU_PCI=0000:65:00.9
	refused PODSNAP_VM_CPUS PODSNAP_VM_CPUS=many
	refused PODSNAP_VM_MEMORY PODSNAP_VM_MEMORY=0
	# An empty PODSNAP_GPU_PCI is no GPU.
	PODSNAP_VM_ACCEL=tcg PODSNAP_GPU_PCI='' vagrant validate >/dev/null || die "vagrant validate failed with an empty PODSNAP_GPU_PCI"
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

# Everything the smoke test makes in libvirt carries its own name, so cleanup removes it by name.
POOL=podsnap-vagrant
POOL_DIR=$VAGRANT_CACHE/pool
NETWORK=podsnap-vagrant
DOMAIN=podsnap-vm
VAGRANT_RUN=/run/podsnap-vagrant
export VAGRANT_DOTFILE_PATH=$VAGRANT_CACHE/state
export PODSNAP_VM_POOL=$POOL
export PODSNAP_VM_NETWORK=$NETWORK
export PODSNAP_VM_NETWORK_ADDRESS=${PODSNAP_VM_NETWORK_ADDRESS:-192.168.123.0/24}
export PODSNAP_VM_CPUS=${PODSNAP_VM_CPUS:-2}
export PODSNAP_VM_MEMORY=${PODSNAP_VM_MEMORY:-4096}
export PODSNAP_VM_CONSOLE_LOG=$VAGRANT_CACHE/console.log
for t in vagrant virsh libvirtd virtlogd qemu-system-x86_64 rsync; do
	command -v "$t" >/dev/null || die "$t is missing: run hack/install.sh"
done

virsh_() { virsh -c qemu:///system "$@"; }
started=()     # daemons this script started (stopped again, by pid file and name)
autostarted="" # networks a libvirtd started here brought up (stopped again)
vm_mine=0      # the domain is ours once we checked it did not exist before
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
		if [ "$d" = virtlogd ] && [ -S /run/libvirt/virtlogd-sock ] && pgrep -x virtlogd >/dev/null; then
			continue
		fi
		"$d" --daemon --pid-file "$VAGRANT_RUN/$d.pid" || die "$d did not start"
		started+=("$d")
	done
	for ((i = 0; i < 60; i++)); do
		if virsh_ version >/dev/null 2>&1; then
			# A stock libvirt autostarts its networks (default: virbr0 and a dnsmasq).
			autostarted=$(virsh_ net-list --name 2>/dev/null)
			return 0
		fi
		sleep 0.5
	done
	die "libvirtd does not answer on qemu:///system (see /var/log/libvirt)"
}

libvirt_down() {
	local i
	for ((i = ${#started[@]} - 1; i >= 0; i--)); do
		stop_pidfile "$VAGRANT_RUN/${started[$i]}.pid" "${started[$i]}" 20
		rm -f "$VAGRANT_RUN/${started[$i]}.pid"
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
	local left=() n active
	if [ "$vm_mine" = 1 ] && virsh_ dominfo "$DOMAIN" >/dev/null 2>&1; then left+=("domain $DOMAIN"); fi
	virsh_ pool-info "$POOL" >/dev/null 2>&1 && left+=("storage pool $POOL")
	virsh_ net-info "$NETWORK" >/dev/null 2>&1 && left+=("network $NETWORK")
	active=$(virsh_ net-list --name 2>/dev/null)
	for n in $autostarted; do
		grep -qxF "$n" <<<"$active" && left+=("active network $n")
	done
	[ -d "$POOL_DIR" ] && left+=("$POOL_DIR")
	if [ ${#left[@]} -gt 0 ]; then printf '%s\n' "${left[@]}"; fi
}

cleanup() {
	local rc=$? n remaining=""
	trap - EXIT
	if [ "$keep" = 1 ] && [ "$rc" = 0 ]; then
		log "kept VM $DOMAIN: cd vagrant && sudo VAGRANT_DOTFILE_PATH=$VAGRANT_DOTFILE_PATH PODSNAP_VM_POOL=$POOL PODSNAP_VM_NETWORK=$NETWORK vagrant ssh"
		for n in "${started[@]}"; do log "kept $n running (pid file $VAGRANT_RUN/$n.pid)"; done
		exit 0
	fi
	if virsh_ version >/dev/null 2>&1; then
		if [ "$vm_mine" = 1 ]; then
			vm_vagrant destroy -f >/dev/null 2>&1 || true
			if virsh_ dominfo "$DOMAIN" >/dev/null 2>&1; then
				virsh_ destroy "$DOMAIN" >/dev/null 2>&1 || true
				virsh_ undefine "$DOMAIN" --remove-all-storage >/dev/null 2>&1 || true
			fi
		fi
		pool_down
		# The VM's management network (vagrant-libvirt makes it, named by the Vagrantfile).
		if virsh_ net-info "$NETWORK" >/dev/null 2>&1; then
			virsh_ net-destroy "$NETWORK" >/dev/null 2>&1 || true
			virsh_ net-undefine "$NETWORK" >/dev/null 2>&1 || true
		fi
		for n in $autostarted; do virsh_ net-destroy "$n" >/dev/null 2>&1 || true; done
		remaining=$(leftovers)
	fi
	libvirt_down
	if [ "$registry_mine" = 1 ]; then registry_down; fi
	if [ -n "$remaining" ]; then
		log "error: left behind: $(echo "$remaining" | paste -sd ',' -) (Vagrant's state kept in $VAGRANT_DOTFILE_PATH)"
		rc=1
	else
		rm -rf "$VAGRANT_DOTFILE_PATH"
	fi
	exit "$rc"
}
trap cleanup EXIT

start=$(date +%s)
step youki hack/libcontainer.sh
step build cargo build -p containerd-shim-podsnap-v2 -p podsnapd -p podsnap-cli -p podsnap-cni
registry_answers || registry_mine=1
step images hack/images.sh
step payload hack/vagrant-box.sh payload
step box hack/vagrant-box.sh box
step libvirt libvirt_up
if virsh_ dominfo "$DOMAIN" >/dev/null 2>&1; then
	die "a VM named $DOMAIN exists (not this run's): destroy it (virsh destroy $DOMAIN; virsh undefine $DOMAIN --remove-all-storage)"
fi
vm_mine=1
pool_up
rm -f "$PODSNAP_VM_CONSOLE_LOG"
if [ "${PODSNAP_VM_ACCEL:-}" = kvm ] || { [ -z "${PODSNAP_VM_ACCEL:-}" ] && host_has_kvm; }; then
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
