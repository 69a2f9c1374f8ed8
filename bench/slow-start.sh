#!/usr/bin/env bash
# Time-to-ready of a slow-starting pod on the single-node cluster (hack/cluster-up.sh): started
# cold vs restored from a pod checkpoint through the patched kubelet, in the same run. The pod
# stands in for a Python or Java service that works for seconds before it serves: it computes
# (WARMUP_LOOPS shell iterations), fills 64 MiB of its memory, then starts an HTTP server; its
# readiness probe asks that server. Time-to-ready is from `kubectl apply` to the pod's Ready
# condition (kubectl wait), median of N runs each. Target: restored >= 10x faster.
#
# Usage: bench/slow-start.sh [N]   (N=3). The cluster is brought up when it is down, and down
# again afterwards. Environment: WARMUP_LOOPS (default 10000000, about 10 s of work on this machine).
set -euo pipefail
exec </dev/null
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/../hack/lib.sh"
# shellcheck source=hack/node-lib.sh
. "$(dirname "$0")/../hack/node-lib.sh"
# shellcheck source=hack/cluster-lib.sh
. "$(dirname "$0")/../hack/cluster-lib.sh"
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
require_root
cd "$PODSNAP_ROOT"

runs=${1:-3}
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number, not $runs"
loops=${WARMUP_LOOPS:-10000000}
[[ $loops =~ ^[0-9]+$ ]] || die "WARMUP_LOOPS must be a number"

cluster_was_up=0
if pid_running "$(component_pidfile kubelet)" kubelet >/dev/null; then
	cluster_was_up=1
else
	hack/cluster-up.sh
fi
KUBE_BIN=$(cat "$CLUSTER_RUN/kube-bin")
kubectl() { "$KUBE_BIN/kubectl" --kubeconfig "$ADMIN_KUBECONFIG" "$@"; }

pods=()
finish() {
	local rc=$? p
	for p in "${pods[@]}"; do
		kubectl delete pod "$p" --ignore-not-found --grace-period=1 --wait=false >/dev/null 2>&1 || true
	done
	[ "$cluster_was_up" = 1 ] || hack/cluster-down.sh || true
	exit "$rc"
}
trap finish EXIT

# pod NAME [CHECKPOINT]: the slow-starting pod's manifest, restored from CHECKPOINT when given.
pod() {
	local annotations=""
	[ -z "${2:-}" ] || annotations="annotations: {checkpoint.k8s.io/restore-from: \"$2\"}"
	cat <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: $1
  labels: {app: slow-start}
  $annotations
spec:
  runtimeClassName: podsnap
  terminationGracePeriodSeconds: 1
  containers:
    - name: service
      image: docker.io/library/busybox:1.37.0
      command:
        - sh
        - -c
        - |
          i=0; while [ \$i -lt $loops ]; do i=\$((i+1)); done
          model=\$(head -c 67108864 /dev/zero | tr '\\0' m)
          mkdir -p /www && echo ready > /www/index.html
          exec httpd -f -p 8080 -h /www
      readinessProbe:
        httpGet: {path: /, port: 8080}
        periodSeconds: 1
        failureThreshold: 1
YAML
}

# time_to_ready NAME [CHECKPOINT]: seconds from apply to Ready.
time_to_ready() {
	local t0 t1
	pods+=("$1")
	t0=$(date +%s.%N)
	pod "$@" | kubectl apply -f - >/dev/null
	kubectl wait --for=condition=Ready "pod/$1" --timeout 600s >/dev/null
	t1=$(date +%s.%N)
	awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f\n", b - a}'
}

cold=()
for ((i = 1; i <= runs; i++)); do
	t=$(time_to_ready "slow-cold-$i")
	cold+=("$t")
	log "cold start $i: ${t}s to ready"
	if [ "$i" = 1 ]; then
		answer=$(kubectl create --raw "/api/v1/nodes/$NODE_NAME/proxy/checkpointpod/default/slow-cold-1?timeout=300" -f /dev/null)
		checkpoint=$(basename "$(echo "$answer" | jq -r '.items[0]')")
		log "checkpointed slow-cold-1 (ready) into $checkpoint"
	fi
	kubectl delete pod "slow-cold-$i" --grace-period=1 --wait=true >/dev/null
done
restored=()
for ((i = 1; i <= runs; i++)); do
	t=$(time_to_ready "slow-restored-$i" "$checkpoint")
	restored+=("$t")
	log "restore $i: ${t}s to ready"
	kubectl delete pod "slow-restored-$i" --grace-period=1 --wait=true >/dev/null
done

cold_median=$(printf '%s\n' "${cold[@]}" | median)
restored_median=$(printf '%s\n' "${restored[@]}" | median)
printf '\nslow-starting pod, time to Ready (median of %d, seconds)\n' "$runs"
printf '%-34s %10s\n' "cold start (runtimeClass podsnap)" "$(printf '%.2f' "$cold_median")"
printf '%-34s %10s\n' "restored from its pod checkpoint" "$(printf '%.2f' "$restored_median")"
awk -v r="$restored_median" -v c="$cold_median" \
	'BEGIN {printf "RATIO restored/cold time-to-ready %.3f (%.1fx faster; target >= 10x)\n", r / c, c / r}'
