#!/usr/bin/env bash
# Smoke test of the node (hack/node-up.sh): run a busybox pod with crictl on a runtime handler,
# check its log and an exec, and remove it.
#
# Usage: hack/node-smoke.sh [HANDLER]   (HANDLER: runc (default) or podsnap)
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=hack/node-lib.sh
. "$(dirname "$0")/node-lib.sh"
require_root

handler=${1:-runc}
image=${SMOKE_IMAGE:-docker.io/library/busybox:latest}
containerd_answers || die "the node is not up: run hack/node-up.sh"

work=$(mktemp -d /tmp/podsnap-smoke.XXXXXX)
pod=""
cleanup() {
	if [ -n "$pod" ]; then
		node_crictl stopp "$pod" >/dev/null 2>&1 || true
		node_crictl rmp -f "$pod" >/dev/null 2>&1 || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT

token="podsnap-smoke-$handler-$$-$RANDOM"
cat >"$work/pod.json" <<EOF
{
  "metadata": {"name": "smoke-$handler-$$", "namespace": "podsnap-smoke", "uid": "$token", "attempt": 0},
  "log_directory": "$work/logs",
  "linux": {}
}
EOF
cat >"$work/ctr.json" <<EOF
{
  "metadata": {"name": "busybox"},
  "image": {"image": "$image"},
  "command": ["sh", "-c", "echo $token; echo pid \$\$ on \$(hostname); exec sleep 600"],
  "log_path": "busybox.log",
  "linux": {}
}
EOF

# crictl warns that the pod has no cgroup_parent (containerd then picks one): expected here.
quiet() { "$@" 2> >(grep -v 'cgroup_parent is not set' >&2); }

start=$(date +%s.%N)
node_crictl pull "$image" >/dev/null
pod=$(quiet node_crictl runp --runtime "$handler" "$work/pod.json")
ctr=$(quiet node_crictl create "$pod" "$work/ctr.json" "$work/pod.json")
node_crictl start "$ctr" >/dev/null
for ((i = 0; i < 100; i++)); do
	node_crictl logs "$ctr" 2>/dev/null | grep -q "^$token\$" && break
	sleep 0.1
done
node_crictl logs "$ctr" 2>&1 | grep -q "^$token\$" || {
	node_crictl logs "$ctr" >&2 || true
	die "handler $handler: the container's log lacks $token"
}
state=$(node_crictl inspect -o go-template --template '{{.status.state}}' "$ctr")
[ "$state" = CONTAINER_RUNNING ] || die "handler $handler: container state $state, want CONTAINER_RUNNING"
out=$(node_crictl exec -s "$ctr" sh -c 'echo exec-ok') || die "handler $handler: exec failed"
[ "$out" = exec-ok ] || die "handler $handler: exec printed '$out', want exec-ok"
ip=$(node_crictl inspectp -o go-template --template '{{.status.network.ip}}' "$pod")
node_crictl stopp "$pod" >/dev/null
node_crictl rmp "$pod" >/dev/null
pod=""
log "smoke ok: handler $handler, image $image, pod ip $ip, $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN {printf "%.1f", e - s}')s"
