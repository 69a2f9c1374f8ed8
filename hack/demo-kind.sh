#!/usr/bin/env bash
# The podsnap demo on the kind cluster (hack/demo.sh --kind): the seed talk's counting pod on a
# worker, checkpointed with a PodCheckpoint, deleted, and restored under its own name with a
# PodRestore by podsnap-controller (deployed from deploy/); its log counts on from the checkpoint.
# Installs and builds what it needs (cached), brings the kind cluster up (hack/kind-up.sh), and
# takes it down again unless --keep is given.
set -euo pipefail
exec </dev/null
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=hack/kind-lib.sh
. "$(dirname "$0")/kind-lib.sh"
require_root
cd "$PODSNAP_ROOT"

keep=0
[ "${1:-}" = "--keep" ] && keep=1

step install hack/install.sh
step build cargo build -p containerd-shim-podsnap-v2 -p podsnapd -p podsnap-controller -p podsnap-cni
KUBE_BIN=$(step kube-build hack/kube-build.sh)
kubectl() { kind_kubectl "$@"; }
show() {
	printf '\n$ kubectl %s\n' "$*" >&2
	kubectl "$@"
}
cleanup() {
	if [ "$keep" = 1 ]; then
		log "kept the kind cluster: export KUBECONFIG=$KIND_KUBECONFIG; kubectl is $KUBE_BIN/kubectl"
		return
	fi
	hack/kind-down.sh || true
}
trap cleanup EXIT
step kind-up hack/kind-up.sh

last_count() { kubectl logs "$1" | sed -n 's/^count: \([0-9]*\)$/\1/p' | tail -1; }

show get nodes
show apply -f examples/counter-pod.yaml
kubectl wait --for=condition=Ready pod/counter-app --timeout 180s >/dev/null
sleep 6
show get pods -o wide
show logs counter-app

show apply -f examples/checkpoint.yaml
kubectl wait --for=jsonpath='{.status.phase}'=Ready podcheckpoint/counter-checkpoint --timeout 180s >/dev/null
before=$(last_count counter-app)
show get podcheckpoints
show delete pod counter-app --wait=true
show apply -f examples/restore.yaml
kubectl wait --for=jsonpath='{.status.phase}'=Completed podrestore/counter-restore --timeout 180s >/dev/null
kubectl wait --for=condition=Ready pod/counter-app --timeout 180s >/dev/null
sleep 4
show get podrestores
show get pods -o wide
show logs counter-app
first=$(kubectl logs counter-app | sed -n 's/^count: \([0-9]*\)$/\1/p' | awk 'NR == 1')
[ -n "$first" ] || die "the restored pod logged no count"
if [ "$first" -le 0 ] || [ "$first" -gt $((before + 1)) ]; then
	die "the restored pod started at count $first, not from the checkpoint (the counter was at $before when it was deleted)"
fi
log "the restored counter went on from count $((first - 1)): its first line is count: $first"
kubectl delete podrestore counter-restore --wait=true >/dev/null
kubectl delete pod counter-app --grace-period=1 --wait=true >/dev/null
kubectl delete podcheckpoint counter-checkpoint --wait=true >/dev/null
