# shellcheck shell=bash
# shellcheck disable=SC2034 # the settings are used by the scripts that source this
# Shared settings for the Vagrant scripts (vagrant-box.sh, vagrant-smoke.sh): the box podsnap
# builds offline, where it is cached, and the libvirt daemons the smoke test may have to start on
# a host without an init system. Sourced after lib.sh, never executed.

# The box: a Debian bookworm VM for the libvirt provider, built here with mmdebstrap.
export PODSNAP_BOX_NAME=${PODSNAP_BOX_NAME:-podsnap/bookworm}
VAGRANT_CACHE=$PODSNAP_CACHE/vagrant
# The binaries a VM's node runs, staged for the rsync synced folder (Vagrantfile: PODSNAP_PAYLOAD).
export PODSNAP_PAYLOAD=${PODSNAP_PAYLOAD:-$VAGRANT_CACHE/payload}
# Disk of the box in GiB (sparse: the qcow2 holds only what is written).
BOX_DISK_GIB=20
# The box's packages: init, ssh and rsync for Vagrant, a kernel, what the node's scripts run
# (iptables, iproute2, jq, curl, the registry) and the libraries CRIU and runc link.
BOX_PACKAGES=(systemd systemd-sysv dbus udev linux-image-amd64 initramfs-tools openssh-server sudo
	rsync iproute2 iptables nftables kmod ca-certificates procps util-linux mount psmisc jq curl
	docker-registry libseccomp2 libbsd0 libgnutls30 libnftables1 libprotobuf-c1 libnl-3-200 libnet1
	libuuid1 libjansson4 libxtables12 libmnl0 libnftnl11 iputils-ping)
# Vagrant's well-known insecure key (Debian's package or HashiCorp's): the box lets it in once,
# Vagrant replaces it on first boot. Empty when Vagrant is not installed.
VAGRANT_INSECURE_PUB=$(find /usr/share/rubygems-integration/all/gems /opt/vagrant/embedded/gems \
	-path "*/vagrant-[0-9]*/keys/vagrant.pub" 2>/dev/null | sort -V | tail -n 1 || true)

# vagrant_env: Vagrant's state for the scripts: the libvirt system daemon, no network lookups.
vagrant_env() {
	export VAGRANT_DEFAULT_PROVIDER=libvirt
	export VAGRANT_CHECKPOINT_DISABLE=1
	export VAGRANT_BOX_UPDATE_CHECK_DISABLE=1
	export LIBVIRT_DEFAULT_URI=qemu:///system
}

# host_has_kvm: true when the CPU virtualises full guests (VT-x or AMD-V) and /dev/kvm is usable.
# A /dev/kvm that serves only paravirtualised (PVM) guests is not enough for a stock kernel.
host_has_kvm() { [ -w /dev/kvm ] && grep -qE '^flags.*\b(vmx|svm)\b' /proc/cpuinfo; }
