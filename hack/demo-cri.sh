#!/usr/bin/env bash
# The node-level demo (no Kubernetes): a counting pod on the podsnap runtime is checkpointed as a whole through
# podsnapd's CRI CheckpointPod, removed, and restored through RestorePod into a new pod (new
# sandbox, new IP): its log counts on from where it was. Installs and builds what it needs,
# brings the node up, and takes it down again unless --keep is given. PODSNAP_OFFLINE=1: install and
# build nothing, use the binaries in PODSNAP_TARGET_DIR and the registry's images as they are (a VM
# provisioned by vagrant/Vagrantfile).
set -euo pipefail
exec </dev/null
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
require_root
cd "$PODSNAP_ROOT"

keep=0
[ "${1:-}" = "--keep" ] && keep=1

# shellcheck source=hack/node-lib.sh
. "$PODSNAP_ROOT/hack/node-lib.sh"
if [ "${PODSNAP_OFFLINE:-0}" = 1 ]; then
	step node-up env PODSNAP_SKIP_IMAGES=1 hack/node-up.sh
else
	step install hack/install.sh
	step build cargo build -p containerd-shim-podsnap-v2 -p podsnapd -p podsnap-cli -p podsnap-cni
	step images hack/images.sh
	step node-up hack/node-up.sh
fi

PODSNAPD_SOCK=$PODSNAP_NODE_RUN/podsnapd.sock
[ -S "$PODSNAPD_SOCK" ] || die "podsnapd is not listening on $PODSNAPD_SOCK"
export CONTAINER_RUNTIME_ENDPOINT=unix://$PODSNAPD_SOCK
crictl() { "$PODSNAP_BIN/crictl" --config "$PODSNAP_NODE_RUN/etc/crictl.yaml" --runtime-endpoint "unix://$PODSNAPD_SOCK" --image-endpoint "unix://$PODSNAPD_SOCK" --timeout 60s "$@"; }
podsnap() { "$PODSNAP_TARGET_DIR/podsnap" --runtime-endpoint "unix://$PODSNAPD_SOCK" "$@"; }

work=$(mktemp -d /tmp/podsnap-demo.XXXXXX)
pods=()
cleanup() {
	local p
	for p in "${pods[@]}"; do
		if [ "$keep" = 1 ]; then
			log "kept pod $p"
		else
			crictl stopp "$p" >/dev/null 2>&1 || true
			crictl rmp -f "$p" >/dev/null 2>&1 || true
		fi
	done
	rm -rf "$work"
	if [ "$keep" = 0 ]; then
		hack/node-down.sh || true
	fi
}
trap cleanup EXIT

cat >"$work/pod.json" <<JSON
{"metadata": {"name": "demo-counter", "namespace": "default", "uid": "demo-counter-$$"},
 "log_directory": "$work/logs", "linux": {"security_context": {"namespace_options": {"pid": 1}}}}
JSON
# The restored pod is a new pod (as the kubelet makes it): its own UID and log directory.
cat >"$work/restored-pod.json" <<JSON
{"metadata": {"name": "demo-counter", "namespace": "default", "uid": "demo-counter-restored-$$"},
 "log_directory": "$work/logs-restored", "linux": {"security_context": {"namespace_options": {"pid": 1}}}}
JSON
cat >"$work/counter.json" <<'JSON'
{"metadata": {"name": "counter"},
 "image": {"image": "127.0.0.1:5000/podsnap/busybox:latest"},
 "command": ["sh", "-c", "i=0; while true; do i=$((i+1)); echo \"count $i\"; sleep 1; done"],
 "log_path": "counter.log", "linux": {"security_context": {"namespace_options": {"pid": 1}}}}
JSON

log "running a counting pod on runtime handler podsnap"
crictl pull 127.0.0.1:5000/podsnap/busybox:latest >/dev/null
pod=$(crictl runp --runtime podsnap "$work/pod.json")
pods+=("$pod")
ctr=$(crictl create "$pod" "$work/counter.json" "$work/pod.json")
crictl start "$ctr" >/dev/null
sleep 5
crictl logs "$ctr" | tail -n 3
ip=$(crictl inspectp "$pod" | jq -r .status.network.ip)
log "pod $pod has IP $ip"

checkpoint=$PODSNAP_NODE_LIB/checkpoints/demo-$(date +%Y%m%d-%H%M%S)
mkdir -p "$(dirname "$checkpoint")"
mkdir -m 0700 "$checkpoint"
log "checkpointing the pod into $checkpoint"
podsnap pod checkpoint "$pod" "$checkpoint"
last=$(crictl logs "$ctr" | tail -n 1)
log "the original pod printed \"$last\" by the time of the checkpoint; removing it"
crictl stopp "$pod" >/dev/null
crictl rmp "$pod" >/dev/null
pods=()

log "restoring the pod from $checkpoint"
restored=$(podsnap pod restore "$checkpoint" --pod-config "$work/restored-pod.json" --container-config "$work/counter.json" --start)
echo "$restored"
new_pod=$(echo "$restored" | awk 'NR == 1')
new_ctr=$(echo "$restored" | awk -F '\t' '$2 == "counter" {print $1}')
if [ -z "$new_pod" ] || [ -z "$new_ctr" ]; then die "podsnap pod restore printed no pod/container ids"; fi
pods+=("$new_pod")
sleep 3
log "the restored pod $new_pod has IP $(crictl inspectp "$new_pod" | jq -r .status.network.ip); its log:"
crictl logs "$new_ctr" | awk 'NR <= 3'
first=$(crictl logs "$new_ctr" | awk 'NR == 1 {print $2}')
[ "${first:-0}" -gt 1 ] || die "the restored counter started again from ${first:-nothing}"
log "the restored counter went on from count $first: checkpoint and restore worked"
