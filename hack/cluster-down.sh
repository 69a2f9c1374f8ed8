#!/usr/bin/env bash
# Stop the single-node cluster cluster-up.sh started, and only that: its pods are deleted through
# the API (then any the kubelet left, by their kubelet labels), the kubelet, scheduler,
# controller manager, apiserver and etcd are stopped by their pid files, the kubelet's mounts and
# cgroups are removed, and its state (etcd data, kubelet root dir with pod checkpoints, pod logs)
# is deleted; the PKI and kubeconfigs are kept for the next cluster-up. The test node
# (containerd, podsnapd) stays up: hack/node-down.sh stops it. --node: run node-down.sh too.
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=hack/node-lib.sh
. "$(dirname "$0")/node-lib.sh"
# shellcheck source=hack/cluster-lib.sh
. "$(dirname "$0")/cluster-lib.sh"
require_root

delete_pods() {
	local kubectl
	kubectl=$(cat "$CLUSTER_RUN/kube-bin" 2>/dev/null || true)/kubectl
	[ -x "$kubectl" ] || return 0
	pid_running "$(component_pidfile kube-apiserver)" kube-apiserver >/dev/null || return 0
	pid_running "$(component_pidfile kubelet)" kubelet >/dev/null || return 0
	log "deleting every pod through the API"
	timeout 120 "$kubectl" --kubeconfig "$ADMIN_KUBECONFIG" delete pods --all --all-namespaces \
		--grace-period 5 --wait=true --timeout 90s >/dev/null 2>&1 || log "warning: deleting pods through the API failed"
}

# Sandboxes this cluster's kubelet created that are still there.
remove_kubelet_sandboxes() {
	local id
	containerd_answers || return 0
	for id in $(node_crictl pods -q 2>/dev/null || true); do
		# The kubelet of this cluster is the only one that stores pod logs under its log dir.
		if node_crictl inspectp "$id" 2>/dev/null | grep -qE "\"log_?[dD]irectory\": \"$KUBELET_POD_LOGS/"; then
			log "removing the kubelet's pod sandbox $id"
			node_crictl --timeout 60s stopp "$id" >/dev/null 2>&1 || true
			node_crictl --timeout 60s rmp -f "$id" >/dev/null 2>&1 || log "warning: rmp $id failed"
		fi
	done
}

unmount_kubelet_root() {
	local m
	[ -d "$KUBELET_ROOT" ] || return 0
	for m in $(findmnt -rn -o TARGET | grep -E "^$KUBELET_ROOT(/|$)" | sort -r || true); do
		umount "$m" 2>/dev/null || umount -l "$m" || log "warning: cannot unmount $m"
	done
}

remove_cgroups() {
	local hierarchy dir
	for hierarchy in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
		dir=${hierarchy%/}$KUBELET_CGROUP_ROOT
		[ -d "$dir" ] || continue
		find "$dir" -depth -type d -exec rmdir {} \; 2>/dev/null || true
		[ -d "$dir" ] && log "warning: $dir is still there (processes left in it?)"
	done
	return 0
}

main() {
	# The controller first: it must not re-create the pods deleted next.
	stop_pidfile "$(component_pidfile podsnap-controller)" podsnap-controller 10
	stop_node_agent
	delete_pods
	for c in kubelet kube-scheduler kube-controller-manager; do
		stop_pidfile "$(component_pidfile "$c")" "$c" 30
	done
	remove_kubelet_sandboxes
	unmount_kubelet_root
	for c in kube-apiserver etcd; do
		stop_pidfile "$(component_pidfile "$c")" "$c" 30
	done
	remove_cgroups
	rm -rf "$CLUSTER_ETCD_DATA" "$KUBELET_ROOT" "${KUBELET_POD_LOGS%/pods}"
	rm -f "$CLUSTER_RUN"/*.pid
	log "cluster down (logs kept in $CLUSTER_RUN)"
	if [ "${1:-}" = --node ]; then
		"$PODSNAP_ROOT/hack/node-down.sh"
	fi
}
main "$@"
