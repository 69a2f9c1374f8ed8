#!/usr/bin/env bash
# The podsnap demo, as in the seed talk, on a real single-node Kubernetes cluster: a counting pod
# (runtimeClassName: podsnap) is checkpointed by a PodCheckpoint, which its kubelet takes itself
# (KEP-5823; no controller runs here), deleted, and created again with the annotation
# checkpoint.k8s.io/restore-from naming that PodCheckpoint: the kubelet restores it through CRI
# RestorePod and its log counts on from the checkpoint instead of from 0, at the address it had
# (podsnap.io/keep-ip). Installs and builds what it needs (cached), brings the cluster up, and
# takes it down again unless --keep is given.
#
# hack/demo.sh --kind [--keep]: the same demo on the kind cluster, with PodCheckpoint and
# PodRestore (hack/demo-kind.sh).
set -euo pipefail
exec </dev/null
if [ "${1:-}" = --kind ]; then
	shift
	exec bash "$(dirname "$0")/demo-kind.sh" "$@"
fi
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=hack/node-lib.sh
. "$(dirname "$0")/node-lib.sh"
# shellcheck source=hack/cluster-lib.sh
. "$(dirname "$0")/cluster-lib.sh"
require_root
cd "$PODSNAP_ROOT"

keep=0
[ "${1:-}" = "--keep" ] && keep=1

step install hack/install.sh
step build cargo build -p containerd-shim-podsnap-v2 -p podsnapd -p podsnap-cli -p podsnap-cni
KUBE_BIN=$(step kube-build hack/kube-build.sh)
step images hack/images.sh
step cluster-up hack/cluster-up.sh

kubectl() { "$KUBE_BIN/kubectl" --kubeconfig "$ADMIN_KUBECONFIG" "$@"; }
show() {
	printf '\n$ kubectl %s\n' "$*" >&2
	kubectl "$@"
}
cleanup() {
	if [ "$keep" = 1 ]; then
		log "kept the cluster: export KUBECONFIG=$ADMIN_KUBECONFIG; kubectl is $KUBE_BIN/kubectl"
		return
	fi
	kubectl delete pod counter-app --ignore-not-found --grace-period=1 --wait=true --timeout 60s >/dev/null 2>&1 || true
	hack/cluster-down.sh --node || true
}
trap cleanup EXIT

# last_count POD: the highest "count: N" in the pod's log.
last_count() { kubectl logs "$1" | sed -n 's/^count: \([0-9]*\)$/\1/p' | tail -1; }

show apply -f examples/counter-pod.yaml
kubectl wait --for=condition=Ready pod/counter-app --timeout 180s >/dev/null
sleep 6
show get pods -o wide
show logs counter-app

before=$(last_count counter-app)
ip=$(kubectl get pod counter-app -o jsonpath='{.status.podIP}')
kubectl delete podcheckpoint counter-checkpoint --ignore-not-found --wait=true >/dev/null
show apply -f examples/checkpoint.yaml
printf "\n$ kubectl wait --for=jsonpath='{.status.phase}'=Ready podcheckpoint/counter-checkpoint\n" >&2
if ! kubectl wait --for=jsonpath='{.status.phase}'=Ready podcheckpoint/counter-checkpoint --timeout 180s >&2; then
	kubectl get podcheckpoint counter-checkpoint -o yaml >&2 || true
	die "the kubelet did not checkpoint counter-app"
fi
after=$(last_count counter-app)
show get podcheckpoints -o wide
show get podcheckpoint counter-checkpoint -o jsonpath='{.status.conditions[0]}{"\n"}{.status.checkpointLocation}{"\n"}'
show get events --field-selector involvedObject.name=counter-checkpoint
log "checkpointed while the counter was between $before and $after"

show delete pod counter-app --wait=true
show apply -f examples/counter-pod-restore-ref.yaml
kubectl wait --for=condition=Ready pod/counter-app --timeout 180s >/dev/null
sleep 4
show get pods -o wide
show logs counter-app
show get events --field-selector involvedObject.name=counter-app,reason=RestoreSucceeded
first=$(kubectl logs counter-app | sed -n 's/^count: \([0-9]*\)$/\1/p' | awk 'NR == 1')
[ -n "$first" ] || die "the restored pod logged no count"
if [ "$first" -le 0 ] || [ "$first" -lt $((before + 1)) ] || [ "$first" -gt $((after + 1)) ]; then
	die "the restored pod started at count $first, not from the checkpoint (counter was at $before..$after)"
fi
log "the restored counter went on from count $((first - 1)): its first line is count: $first"
restored_ip=$(kubectl get pod counter-app -o jsonpath='{.status.podIP}')
[ "$restored_ip" = "$ip" ] || die "the restored pod has address $restored_ip, not its old $ip (podsnap.io/keep-ip)"
log "and it kept its address $ip (podsnap.io/keep-ip)"
