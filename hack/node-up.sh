#!/usr/bin/env bash
# Start the single-machine test node: the local registry (with every test image pushed, see
# images.sh) and a containerd 2.x of our own with the CRI plugin, runtime handlers `runc`
# (default) and `podsnap` (containerd-shim-podsnap-v2), CNI bridge $PODSNAP_BRIDGE and registry
# mirrors to the local registry. Idempotent: when the node is up it only refreshes the shim link
# and the images. Stop it with hack/node-down.sh.
#
# Environment: PODSNAP_SHIM (shim binary; default target/debug/containerd-shim-podsnap-v2),
# PODSNAP_SKIP_IMAGES=1 (do not run images.sh), PODSNAP_POD_CIDR, PODSNAP_BRIDGE,
# CONTAINERD_LOG_LEVEL (default info). A second node on the same machine: other PODSNAP_NODE_RUN,
# PODSNAP_NODE_LIB, PODSNAP_BRIDGE and PODSNAP_POD_CIDR, and PODSNAP_SHARED_REGISTRY=1 to use the
# first node's registry.
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=hack/node-lib.sh
. "$(dirname "$0")/node-lib.sh"
require_root

check_tools() {
	local t
	for t in containerd containerd-shim-runc-v2 runc crictl criu; do
		[ -x "$PODSNAP_BIN/$t" ] || die "$PODSNAP_BIN/$t is missing: run hack/install.sh"
	done
	for t in bridge host-local loopback portmap; do
		[ -x "$CNI_BIN_DIR/$t" ] || die "CNI plugin $CNI_BIN_DIR/$t is missing: run hack/install.sh"
	done
	command -v iptables >/dev/null || die "iptables is missing (portmap and CRIU need it): run hack/install.sh"
}

# The podsnap shim: containerd looks up containerd-shim-podsnap-v2 on its PATH, $NODE_BIN first.
# podsnap-ipam, the CNI IPAM plugin that keeps a restored pod's address: in $NODE_BIN too, one of
# the CNI plugin directories.
link_shim() {
	mkdir -p "$NODE_BIN"
	ln -sfn "$PODSNAP_SHIM" "$NODE_BIN/containerd-shim-podsnap-v2"
	if [ ! -x "$PODSNAP_SHIM" ]; then
		log "warning: $PODSNAP_SHIM is not built yet: runtime handler 'podsnap' will fail until it is (the link is in place)"
	fi
	ln -sfn "$PODSNAP_IPAM" "$NODE_BIN/podsnap-ipam"
}

# The pod network: bridge $PODSNAP_BRIDGE, addresses from host-local through podsnap-ipam (so
# that a restore with podsnap.io/keep-ip gets the checkpointed pod's address), or from
# host-local alone while podsnap-ipam is not built. Written beside and moved into place, so
# containerd (which reloads the directory on change) never sees no network; rewritten on every
# node-up, so a node started before the build gets podsnap-ipam on the next. With `running`,
# containerd is up already: it reads its CNI plugin directories only when it starts, so
# podsnap-ipam is configured only if they include $NODE_BIN (a node started by an older
# node-up.sh keeps host-local until it is restarted; bridge would find no podsnap-ipam).
write_cni_config() {
	local ipam_type=podsnap-ipam
	if [ ! -x "$PODSNAP_IPAM" ]; then
		log "warning: $PODSNAP_IPAM is not built yet: pods get addresses from host-local alone, and a restore with podsnap.io/keep-ip fails (cargo build -p podsnap-cni, then hack/node-up.sh again)"
		ipam_type=host-local
	elif [ "${1:-}" = running ] && ! grep -qF "\"$NODE_BIN\"" "$CONTAINERD_CONFIG" 2>/dev/null; then
		log "warning: the running containerd does not look for CNI plugins in $NODE_BIN: pods get addresses from host-local alone until the node is restarted (hack/node-down.sh; hack/node-up.sh)"
		ipam_type=host-local
	fi
	mkdir -p "$CNI_CONF_DIR" "$CNI_IPAM_DIR"
	find "$CNI_CONF_DIR" -maxdepth 1 \( -type f -o -type l \) \( -name '*.conf' -o -name '*.conflist' -o -name '*.json' \) \
		! -name 10-podsnap.conflist -delete
	cat >"$CNI_CONF_DIR/.10-podsnap.conflist.new" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "podsnap",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$PODSNAP_BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "promiscMode": true,
      "ipam": {
        "type": "$ipam_type",
        "delegate": "host-local",
        "dataDir": "$CNI_IPAM_DIR",
        "ranges": [[{ "subnet": "$PODSNAP_POD_CIDR" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
EOF
	mv -f "$CNI_CONF_DIR/.10-podsnap.conflist.new" "$CNI_CONF_DIR/10-podsnap.conflist"
}

# hosts.toml per registry: pull and resolve from the local registry over plain http. `server`
# points there too, so containerd never falls back to the (unreachable) upstream.
write_registry_hosts() {
	local reg dir
	rm -rf "$REGISTRY_HOSTS_DIR"
	for reg in "${MIRRORED_REGISTRIES[@]}" _default; do
		dir=$REGISTRY_HOSTS_DIR/$reg
		mkdir -p "$dir"
		cat >"$dir/hosts.toml" <<EOF
# Written by hack/node-up.sh (podsnap): $reg is served by the node's local registry.
server = "http://$PODSNAP_REGISTRY"

[host."http://$PODSNAP_REGISTRY"]
  capabilities = ["pull", "resolve"]
EOF
	done
}

write_containerd_config() {
	mkdir -p "$NODE_ETC" "$CONTAINERD_ROOT" "$CONTAINERD_STATE" "$RUNC_ROOT" "$(dirname "$NRI_SOCKET")" \
		"$PODSNAP_NODE_LIB/nri/plugins" "$PODSNAP_NODE_LIB/nri/conf.d" "$PODSNAP_NODE_LIB/opt"
	cat >"$CONTAINERD_CONFIG" <<EOF
# Written by hack/node-up.sh (podsnap): the test node's containerd. Nothing here is shared with a
# system containerd: own root, state, sockets, CNI, NRI socket and registry configuration.
version = 3
root = "$CONTAINERD_ROOT"
state = "$CONTAINERD_STATE"

[grpc]
  address = "$CONTAINERD_SOCK"

[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"

[debug]
  level = "${CONTAINERD_LOG_LEVEL:-info}"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$PODSNAP_NODE_LIB/opt"

  [plugins."io.containerd.nri.v1.nri"]
    disable = false
    disable_connections = false
    socket_path = "$NRI_SOCKET"
    plugin_path = "$PODSNAP_NODE_LIB/nri/plugins"
    plugin_config_path = "$PODSNAP_NODE_LIB/nri/conf.d"

  [plugins."io.containerd.cri.v1.images"]
    snapshotter = "overlayfs"
    [plugins."io.containerd.cri.v1.images".pinned_images]
      sandbox = "$SANDBOX_IMAGE"
    [plugins."io.containerd.cri.v1.images".registry]
      config_path = "$REGISTRY_HOSTS_DIR"

  [plugins."io.containerd.cri.v1.runtime"]
    # Root lacks CAP_SYS_RESOURCE here: a negative oom_score_adj cannot be written.
    restrict_oom_score_adj = true
    # Pod network namespaces under our state dir, not /run/netns (which podman shares).
    netns_mounts_under_state_dir = true
    [plugins."io.containerd.cri.v1.runtime".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
          BinaryName = "$PODSNAP_BIN/runc"
          Root = "$RUNC_ROOT"
          SystemdCgroup = false
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.podsnap]
        runtime_type = "io.containerd.podsnap.v2"
        # podsnapd's RestorePod marks containers to restore with podsnap.io/* annotations;
        # only this handler passes them through to the shim.
        container_annotations = ["podsnap.io/*"]
    [plugins."io.containerd.cri.v1.runtime".cni]
      bin_dirs = ["$CNI_BIN_DIR", "$NODE_BIN"]
      conf_dir = "$CNI_CONF_DIR"
      max_conf_num = 1

  [plugins."io.containerd.grpc.v1.cri"]
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
EOF
	cat >"$CRICTL_CONFIG" <<EOF
runtime-endpoint: unix://$CONTAINERD_SOCK
image-endpoint: unix://$CONTAINERD_SOCK
timeout: 30
EOF
}

# The pod CIDR must not be routed elsewhere already (podman's cni-podman0 uses 10.88.0.0/16 too).
check_pod_cidr() {
	local routes
	routes=$(ip -4 -o route show "$PODSNAP_POD_CIDR" 2>/dev/null | grep -v "dev $PODSNAP_BRIDGE " || true)
	[ -z "$routes" ] || die "pod CIDR $PODSNAP_POD_CIDR is already routed ($routes): stop what uses it (podman?) or set PODSNAP_POD_CIDR"
}

# podsnapd in front of containerd; restarted on every node-up so a rebuilt binary is used.
start_podsnapd() {
	local i
	stop_pidfile "$PODSNAPD_PIDFILE" podsnapd 10
	if [ ! -x "$PODSNAPD_BINARY" ]; then
		log "warning: $PODSNAPD_BINARY is not built: no podsnapd (cargo build -p podsnapd)"
		return 0
	fi
	rm -f "$PODSNAPD_SOCK"
	setsid "$PODSNAPD_BINARY" --listen "$PODSNAPD_SOCK" --containerd "$CONTAINERD_SOCK" \
		</dev/null >>"$PODSNAPD_LOG" 2>&1 &
	echo $! >"$PODSNAPD_PIDFILE"
	for ((i = 0; i < 100; i++)); do
		[ -S "$PODSNAPD_SOCK" ] && return 0
		sleep 0.1
	done
	die "podsnapd did not listen on $PODSNAPD_SOCK (see $PODSNAPD_LOG)"
}

# CRIU caches what it probed of the kernel in $CRIU_RUNDIR, and only on a tmpfs, so that a boot
# drops it (hack/criu-4.1.1-kdat-cache-dir.patch). Where /run is a tmpfs, as on a systemd host,
# CRIU makes the directory itself; where it is not (this VM), every CRIU would probe the kernel
# again (about 8 ms), so the node mounts a small tmpfs there (node-down unmounts it).
criu_cache_dir() {
	# A temporary file a killed CRIU left would keep every later one from saving the cache.
	rm -f "$CRIU_RUNDIR/criu.kdat.tmp"
	[ "$(stat -f -c %T /run)" = tmpfs ] && return 0
	mountpoint -q "$CRIU_RUNDIR" && return 0
	[ -d "$CRIU_RUNDIR" ] || mkdir -m 0700 "$CRIU_RUNDIR"
	mount -t tmpfs -o mode=0700,size=1m,nosuid,nodev,noexec "$CRIU_RUNDIR_TMPFS" "$CRIU_RUNDIR" ||
		log "warning: cannot mount a tmpfs on $CRIU_RUNDIR: CRIU keeps no kernel cache"
}

main() {
	check_tools
	mkdir -p "$PODSNAP_NODE_RUN" "$PODSNAP_NODE_LIB"
	criu_cache_dir
	link_shim
	registry_up
	if [ "${PODSNAP_SKIP_IMAGES:-0}" != 1 ]; then
		"$PODSNAP_ROOT/hack/images.sh"
	fi
	if pid_running "$CONTAINERD_PIDFILE" containerd >/dev/null; then
		containerd_answers || die "containerd (pid $(cat "$CONTAINERD_PIDFILE")) runs but does not answer CRI: run hack/node-down.sh"
		log "node is already up (containerd pid $(cat "$CONTAINERD_PIDFILE"))"
		write_cni_config running
		start_podsnapd
		return 0
	fi
	[ -S "$CONTAINERD_SOCK" ] && ! containerd_answers && rm -f "$CONTAINERD_SOCK" "$CONTAINERD_SOCK.ttrpc"
	containerd_answers && die "something else serves $CONTAINERD_SOCK without our pid file"
	check_pod_cidr
	write_cni_config
	write_registry_hosts
	write_containerd_config
	start_containerd || die "containerd did not come up"
	start_podsnapd
	log "node up: export CONTAINER_RUNTIME_ENDPOINT=unix://$CONTAINERD_SOCK (or crictl --config $CRICTL_CONFIG)"
}
main "$@"
