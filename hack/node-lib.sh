# shellcheck shell=bash
# shellcheck disable=SC2034 # the layout variables are used by the scripts that source this
# The single-machine test node's layout and helpers, shared by node-up.sh, node-down.sh,
# images.sh, critest.sh and node-smoke.sh. Sourced after lib.sh, never executed.
#
# Everything a node runs is ours alone: its own containerd (root $PODSNAP_NODE_LIB/containerd,
# state $PODSNAP_NODE_RUN/containerd, socket $CONTAINERD_SOCK), its own registry on
# $PODSNAP_REGISTRY, CNI bridge $PODSNAP_BRIDGE. Processes are started with pid files and stopped
# through them only.

NODE_ETC=$PODSNAP_NODE_RUN/etc
REGISTRY_PIDFILE=$PODSNAP_NODE_RUN/registry.pid
REGISTRY_LOG=$PODSNAP_NODE_RUN/registry.log
REGISTRY_CONFIG=$NODE_ETC/registry.yml
# Images persist across node restarts (and reboots): the registry's storage is in the cache.
REGISTRY_STORAGE=$PODSNAP_CACHE/registry
REGISTRY_BIN=${REGISTRY_BIN:-/usr/bin/docker-registry}
CONTAINERD_PIDFILE=$PODSNAP_NODE_RUN/containerd.pid
CONTAINERD_LOG=$PODSNAP_NODE_RUN/containerd.log
# podsnapd: the node's CRI endpoint for kubelet and crictl (CheckpointPod/RestorePod, the rest
# forwarded to containerd).
# podsnap's own binaries: cargo's debug build, or PODSNAP_TARGET_DIR where they were built elsewhere
# (a VM provisioned with hack/vagrant-box.sh's payload).
PODSNAP_TARGET_DIR=${PODSNAP_TARGET_DIR:-${CARGO_TARGET_DIR:-$PODSNAP_ROOT/target}/debug}
PODSNAPD_BINARY=${PODSNAPD_BINARY:-$PODSNAP_TARGET_DIR/podsnapd}
PODSNAPD_SOCK=$PODSNAP_NODE_RUN/podsnapd.sock
PODSNAPD_PIDFILE=$PODSNAP_NODE_RUN/podsnapd.pid
PODSNAPD_LOG=$PODSNAP_NODE_RUN/podsnapd.log
CONTAINERD_CONFIG=$NODE_ETC/containerd.toml
CONTAINERD_ROOT=$PODSNAP_NODE_LIB/containerd
CONTAINERD_TMPDIR=$PODSNAP_NODE_LIB/tmp
CONTAINERD_STATE=$PODSNAP_NODE_RUN/containerd
# runc's state for containers of our containerd (the runc shim's Root option).
RUNC_ROOT=$PODSNAP_NODE_RUN/runc
# containerd finds containerd-shim-podsnap-v2 on its PATH: this directory comes first.
NODE_BIN=$PODSNAP_NODE_RUN/bin
PODSNAP_SHIM=${PODSNAP_SHIM:-$PODSNAP_TARGET_DIR/containerd-shim-podsnap-v2}
PODSNAP_IPAM=${PODSNAP_IPAM:-$PODSNAP_TARGET_DIR/podsnap-ipam}
REGISTRY_HOSTS_DIR=$NODE_ETC/certs.d
CNI_CONF_DIR=$NODE_ETC/cni/net.d
CNI_BIN_DIR=$PODSNAP_CACHE/cni/bin
CNI_IPAM_DIR=$PODSNAP_NODE_RUN/cni/ipam
NRI_SOCKET=$PODSNAP_NODE_RUN/nri/nri.sock
PODSNAP_BRIDGE=${PODSNAP_BRIDGE:-podsnap0}
PODSNAP_POD_CIDR=${PODSNAP_POD_CIDR:-10.88.0.0/16}
CRICTL_CONFIG=$NODE_ETC/crictl.yaml
SANDBOX_IMAGE=registry.k8s.io/pause:3.10.2
# Registries whose images the node pulls from $PODSNAP_REGISTRY (plain http) instead.
MIRRORED_REGISTRIES=(docker.io registry-1.docker.io registry.k8s.io k8s.gcr.io gcr.io quay.io ghcr.io
	mcr.microsoft.com public.ecr.aws "$PODSNAP_REGISTRY" "localhost:${PODSNAP_REGISTRY##*:}")

# crictl against our containerd.
node_crictl() {
	crictl --config "$CRICTL_CONFIG" --runtime-endpoint "unix://$CONTAINERD_SOCK" \
		--image-endpoint "unix://$CONTAINERD_SOCK" "$@"
}

# pid_running PIDFILE NAME: print the pid in PIDFILE when that process is alive and its
# executable is named NAME (so a stale pid file whose pid was reused is not believed).
pid_running() {
	local pid exe
	[ -f "$1" ] || return 1
	pid=$(cat "$1" 2>/dev/null) || return 1
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
	exe=${exe% (deleted)}
	[ "${exe##*/}" = "$2" ] || return 1
	echo "$pid"
}

# stop_pidfile PIDFILE NAME [SECONDS]: SIGTERM the process, SIGKILL it after SECONDS (default
# 20), wait until it is gone, remove the pid file.
stop_pidfile() {
	local pidfile=$1 name=$2 timeout=${3:-20} pid i
	if pid=$(pid_running "$pidfile" "$name"); then
		log "stopping $name (pid $pid)"
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < timeout * 10; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			log "$name (pid $pid) ignored SIGTERM for ${timeout}s: SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
			for ((i = 0; i < 100; i++)); do
				kill -0 "$pid" 2>/dev/null || break
				sleep 0.1
			done
		fi
		kill -0 "$pid" 2>/dev/null && die "$name (pid $pid) does not exit"
	fi
	rm -f "$pidfile"
}

# port_owner PORT: the pids listening on TCP PORT (empty when none).
port_owner() {
	{ ss -Hltnp "sport = :$1" 2>/dev/null || true; } | { grep -oE 'pid=[0-9]+' || true; } | cut -d= -f2 | sort -u
}

registry_url() { echo "http://$PODSNAP_REGISTRY/v2/"; }

registry_answers() { curl -fsS --noproxy '*' -o /dev/null --max-time 2 "$(registry_url)" 2>/dev/null; }

# registry_up: start Debian's docker-registry (distribution 2.8) on $PODSNAP_REGISTRY, storage
# in $REGISTRY_STORAGE. A no-op when ours is already running.
registry_up() {
	local pid i owner
	if pid=$(pid_running "$REGISTRY_PIDFILE" docker-registry) && registry_answers; then
		return 0
	fi
	if [ "${PODSNAP_SHARED_REGISTRY:-0}" = 1 ]; then
		# A second node on this machine (PODSNAP_NODE_RUN/PODSNAP_NODE_LIB of its own) uses the
		# registry the first one runs, and neither starts nor stops it.
		registry_answers || die "PODSNAP_SHARED_REGISTRY=1 but nothing answers on $PODSNAP_REGISTRY"
		return 0
	fi
	[ -x "$REGISTRY_BIN" ] || die "$REGISTRY_BIN is missing: run hack/install.sh (Debian package docker-registry)"
	owner=$(port_owner "${PODSNAP_REGISTRY##*:}")
	if [ -n "$owner" ]; then
		die "port ${PODSNAP_REGISTRY##*:} is taken by pid(s) $(echo "$owner" | tr '\n' ' ')(not ours); stop it (Debian's own docker-registry service listens there too)"
	fi
	mkdir -p "$NODE_ETC" "$REGISTRY_STORAGE"
	cat >"$REGISTRY_CONFIG" <<EOF
# Written by hack/node-lib.sh (podsnap): the node's local image registry.
version: 0.1
log:
  level: warn
  fields:
    service: podsnap-registry
storage:
  filesystem:
    rootdirectory: $REGISTRY_STORAGE
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: $PODSNAP_REGISTRY
  headers:
    X-Content-Type-Options: [nosniff]
EOF
	log "starting registry on $PODSNAP_REGISTRY (storage $REGISTRY_STORAGE, log $REGISTRY_LOG)"
	setsid "$REGISTRY_BIN" serve "$REGISTRY_CONFIG" >>"$REGISTRY_LOG" 2>&1 </dev/null &
	echo $! >"$REGISTRY_PIDFILE"
	for ((i = 0; i < 200; i++)); do
		registry_answers && return 0
		pid_running "$REGISTRY_PIDFILE" docker-registry >/dev/null || break
		sleep 0.1
	done
	tail -n 20 "$REGISTRY_LOG" >&2 || true
	stop_pidfile "$REGISTRY_PIDFILE" docker-registry 5
	die "registry did not come up on $PODSNAP_REGISTRY"
}

registry_down() { stop_pidfile "$REGISTRY_PIDFILE" docker-registry 10; }

containerd_answers() { node_crictl --timeout 5s info >/dev/null 2>&1; }

# start_containerd: start containerd with the config node-up.sh wrote; wait until CRI answers
# (return 1, containerd stopped again, when it does not within a minute).
start_containerd() {
	local pid i
	log "starting containerd $("$PODSNAP_BIN/containerd" --version | awk '{print $3}') (config $CONTAINERD_CONFIG, log $CONTAINERD_LOG)"
	# containerd's temporary files (a CRI CheckpointContainer leaves a whole checkpoint in a
	# ctrd-checkpoint* directory) stay in the node's own directory, removed by node-down.
	mkdir -p "$CONTAINERD_TMPDIR"
	chmod 0700 "$CONTAINERD_TMPDIR"
	(
		export PATH="$NODE_BIN:$PODSNAP_BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
		export TMPDIR="$CONTAINERD_TMPDIR"
		exec setsid "$PODSNAP_BIN/containerd" --config "$CONTAINERD_CONFIG" >>"$CONTAINERD_LOG" 2>&1 </dev/null
	) &
	pid=$!
	echo "$pid" >"$CONTAINERD_PIDFILE"
	for ((i = 0; i < 600; i++)); do
		containerd_answers && { log "containerd is up (pid $pid, socket $CONTAINERD_SOCK)"; return 0; }
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	tail -n 30 "$CONTAINERD_LOG" >&2 || true
	stop_pidfile "$CONTAINERD_PIDFILE" containerd 10
	log "error: containerd did not answer CRI on $CONTAINERD_SOCK (log: $CONTAINERD_LOG)"
	return 1
}
