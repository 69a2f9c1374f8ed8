#!/usr/bin/env bash
# Stop the test node that hack/node-up.sh started and leave nothing of it running: remove every
# pod of our containerd through CRI (so CNI releases addresses and port mappings; a containerd
# that died is started again for that), kill what is left of our containers through our own runc
# state, stop containerd and the registry by their pid files, stop leftover shims found through
# the bootstrap.json files in our state dir, unmount whatever is still mounted under our
# directories and delete the CNI bridge. Safe to run twice, or when the node is half up. Images
# stay: containerd's content in $PODSNAP_NODE_LIB, the registry's in $PODSNAP_CACHE/registry.
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=hack/node-lib.sh
. "$(dirname "$0")/node-lib.sh"
require_root

remove_pods() {
	local pods ns ids id
	containerd_answers || return 0
	pods=$(node_crictl pods -q 2>/dev/null || true)
	if [ -n "$pods" ]; then
		log "removing $(echo "$pods" | wc -l) pod(s)"
		for id in $pods; do
			node_crictl --timeout 60s stopp "$id" >/dev/null 2>&1 || log "warning: stopp $id failed"
		done
		node_crictl --timeout 60s rmp -f -a >/dev/null 2>&1 || log "warning: rmp -a failed"
	fi
	# Tasks created outside CRI (ctr, e2e tests) in any namespace.
	for ns in $(ctr --address "$CONTAINERD_SOCK" namespaces ls -q 2>/dev/null || true); do
		ids=$(ctr --address "$CONTAINERD_SOCK" -n "$ns" tasks ls -q 2>/dev/null || true)
		for id in $ids; do
			log "killing task $ns/$id"
			timeout 20 ctr --address "$CONTAINERD_SOCK" -n "$ns" tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1 || true
			timeout 20 ctr --address "$CONTAINERD_SOCK" -n "$ns" tasks delete -f "$id" >/dev/null 2>&1 || true
		done
	done
}

# Containers our runc shim started that survived (containerd was already gone, or CRI failed).
kill_runc_leftovers() {
	local root id
	[ -d "$RUNC_ROOT" ] || return 0
	for root in "$RUNC_ROOT"/*/; do
		[ -d "$root" ] || continue
		for id in $(runc --root "$root" list -q 2>/dev/null || true); do
			log "killing leftover runc container $id"
			runc --root "$root" kill -a "$id" KILL >/dev/null 2>&1 || true
			runc --root "$root" delete -f "$id" >/dev/null 2>&1 || true
		done
	done
}

# Shims our containerd started and that outlived it. containerd records each shim's socket in
# the bundle's bootstrap.json under our state dir: the process listening there is the shim (and
# its command line must name our containerd's socket).
stop_shims() {
	local f addr pid n
	for f in "$CONTAINERD_STATE"/io.containerd.runtime.v2.task/*/*/bootstrap.json; do
		[ -f "$f" ] || continue
		addr=$(jq -r '.address // empty' "$f" 2>/dev/null || true)
		addr=${addr#unix://}
		[ -n "$addr" ] || continue
		for pid in $({ ss -Hxlp "src $addr" 2>/dev/null || true; } | { grep -oE 'pid=[0-9]+' || true; } | cut -d= -f2 | sort -u); do
			tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF "$CONTAINERD_SOCK" || continue
			log "stopping leftover shim pid $pid ($(basename "$(dirname "$f")"))"
			kill -TERM "$pid" 2>/dev/null || true
			for ((n = 0; n < 50; n++)); do
				kill -0 "$pid" 2>/dev/null || break
				sleep 0.1
			done
			kill -KILL "$pid" 2>/dev/null || true
		done
	done
}

# Every mount point under our directories, deepest first.
our_mounts() {
	awk '{print $5}' /proc/self/mountinfo | while read -r m; do
		m=$(printf '%b' "${m//\\/\\0}")
		case $m in
		"$PODSNAP_NODE_RUN" | "$PODSNAP_NODE_RUN"/* | "$PODSNAP_NODE_LIB" | "$PODSNAP_NODE_LIB"/*) echo "$m" ;;
		esac
	done | awk '{print length($0) " " $0}' | sort -rn | cut -d' ' -f2-
}

unmount_leftovers() {
	local m n=0
	while read -r m; do
		[ -n "$m" ] || continue
		umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "warning: cannot unmount $m"
		n=$((n + 1))
	done < <(our_mounts)
	[ "$n" = 0 ] || log "unmounted $n leftover mount(s)"
}

delete_bridge() {
	if ip link show "$PODSNAP_BRIDGE" >/dev/null 2>&1; then
		log "deleting bridge $PODSNAP_BRIDGE"
		ip link delete "$PODSNAP_BRIDGE" || log "warning: cannot delete $PODSNAP_BRIDGE"
	fi
}

# Tasks of ours still alive although containerd is not (it crashed or was killed): start it
# again so that CRI can remove the pods properly, CNI DEL included.
restart_if_orphans() {
	local bundles
	pid_running "$CONTAINERD_PIDFILE" containerd >/dev/null && return 0
	[ -f "$CONTAINERD_CONFIG" ] || return 0
	bundles=$(find "$CONTAINERD_STATE/io.containerd.runtime.v2.task" -mindepth 2 -maxdepth 2 -type d 2>/dev/null | head -1)
	[ -n "$bundles" ] || return 0
	log "containerd is not running but has left tasks behind: restarting it to remove them"
	start_containerd || log "warning: containerd does not start again; killing the leftovers directly"
}

main() {
	stop_pidfile "$PODSNAPD_PIDFILE" podsnapd 10
	rm -f "$PODSNAPD_SOCK"
	restart_if_orphans
	remove_pods
	stop_pidfile "$CONTAINERD_PIDFILE" containerd 30
	kill_runc_leftovers
	stop_shims
	registry_down
	unmount_leftovers
	# The tmpfs node-up mounted for CRIU's kernel cache, and nothing else there.
	if [ "$(findmnt -n -o SOURCE --mountpoint "$CRIU_RUNDIR" 2>/dev/null)" = "$CRIU_RUNDIR_TMPFS" ]; then
		umount "$CRIU_RUNDIR" || log "warning: cannot unmount $CRIU_RUNDIR"
	fi
	delete_bridge
	# No pod is left, so no address is allocated: drop host-local's records, and sockets.
	rm -rf "$CNI_IPAM_DIR" "$CONTAINERD_TMPDIR"
	rm -f "$CONTAINERD_SOCK" "$CONTAINERD_SOCK.ttrpc" "$NRI_SOCKET"
	log "node down"
}
main "$@"
