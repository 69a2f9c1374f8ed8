#!/usr/bin/env bash
# Pod checkpoint and restore of a 1 GiB pod through the kubelet on the single-node cluster
# (hack/cluster-up.sh), against raw CRIU on the same program outside any container, in the same
# run: issue 13's first two rows as a user meets them.
#
#   checkpoint  the kubelet's endpoint (`kubectl create --raw .../checkpointpod/...`: API server
#               node proxy, kubelet, CRI CheckpointPod to podsnapd, the shim, CRIU), answered;
#               and a PodCheckpoint object created until its status is Ready (the kubelet
#               watches it, takes it, writes the status);
#               against raw `criu dump --leave-running`;
#   restore     a pod whose `checkpoint.k8s.io/restore-from` names that checkpoint, bound to the
#               node (no scheduler), from `kubectl apply` until its container runs (the kubelet's
#               RestorePod and StartContainer, the status written and watched), and the runtime's
#               part of it (podsnapd's RestorePod begun until containerd's StartContainer
#               answered, from their logs);
#               against raw `criu restore --restore-detached`.
#
# The pod runs memtest (e2e/fixtures/memtest.c: 1 GiB of a pattern that does not compress) from
# a hostPath; after every restore through the kubelet memtest checks each word of the restored
# memory (untimed), and a bad word fails the benchmark. Every timed step starts after a `sync` and in memory the host
# backs (this VM returns free memory to its host; see bench/src/pod.rs). Median of N each.
#
# Usage: bench/kubelet.sh [N]   (N=5; hack/bench.sh kubelet [N] runs it with the release shim and
# podsnapd). The cluster is brought up when it is down, and down again afterwards.
# Environment: KUBELET_BENCH_MIB (default 1024).
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

runs=${1:-5}
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number, not $runs"
mib=${KUBELET_BENCH_MIB:-1024}
[[ $mib =~ ^[1-9][0-9]*$ ]] || die "KUBELET_BENCH_MIB must be a positive number, not $mib"
for t in gcc jq python3; do
	command -v "$t" >/dev/null || die "$t is missing: run hack/install.sh"
done

cluster_was_up=0
if pid_running "$(component_pidfile kubelet)" kubelet >/dev/null; then
	cluster_was_up=1
else
	hack/cluster-up.sh
fi
KUBE_BIN=$(cat "$CLUSTER_RUN/kube-bin")
kubectl() { "$KUBE_BIN/kubectl" --kubeconfig "$ADMIN_KUBECONFIG" "$@"; }

work=$(mktemp -d /var/tmp/podsnap-bench-kubelet.XXXXXX)
chmod 0755 "$work"
pods=() objects=() checkpoints=()
raw_pid=
finish() {
	local rc=$? p
	[ -z "$raw_pid" ] || kill -KILL -- "-$raw_pid" 2>/dev/null || true
	for p in "${pods[@]}"; do
		kubectl delete pod "$p" --ignore-not-found --grace-period=1 --wait=true --timeout=60s >/dev/null 2>&1 || true
	done
	for p in "${objects[@]}"; do
		kubectl delete podcheckpoint "$p" --ignore-not-found --wait=true --timeout=60s >/dev/null 2>&1 || true
	done
	for p in "${checkpoints[@]}"; do
		rm -rf -- "$p"
	done
	rm -rf "$work"
	[ "$cluster_was_up" = 1 ] || hack/cluster-down.sh || true
	exit "$rc"
}
trap finish EXIT

# memtest: for the pod (read from a hostPath, its files in the container's /tmp) and for the raw
# runs (its files in $work).
build_memtest "$work"

# pod NAME [CHECKPOINT]: the memtest pod's manifest, bound to the node, restored from CHECKPOINT
# when given.
pod() {
	local annotations=""
	[ -z "${2:-}" ] || annotations="annotations: {checkpoint.k8s.io/restore-from: \"$2\"}"
	cat <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: $1
  $annotations
spec:
  runtimeClassName: podsnap
  nodeName: $NODE_NAME
  terminationGracePeriodSeconds: 1
  volumes:
    - name: bench
      hostPath: {path: $work, type: Directory}
  containers:
    - name: memtest
      image: docker.io/library/busybox:1.37.0
      command: [/bench/memtest, "$mib"]
      volumeMounts:
        - {name: bench, mountPath: /bench, readOnly: true}
YAML
}

# memtest_ready NAME: waits until memtest in pod NAME has filled its memory.
memtest_ready() {
	for _ in $(seq 240); do
		kubectl exec "$1" -- cat /tmp/memtest.ready >/dev/null 2>&1 && return 0
		sleep 0.25
	done
	die "memtest in $1 did not fill its memory"
}

# memtest_check NAME: memtest in pod NAME checks every word of its memory; a bad one is fatal.
memtest_check() {
	local out
	# shellcheck disable=SC2016 # expanded by the container's shell
	out=$(kubectl exec "$1" -- sh -c \
		'rm -f /tmp/memtest.result; kill -USR1 1;
		 for i in $(seq 200); do [ -f /tmp/memtest.result ] && break; usleep 100000; done;
		 cat /tmp/memtest.result' 2>&1) || true
	grep -q ' 0 bad words' <<<"$out" || die "the restored memtest in $1: $out"
	echo "$out"
}

# runtime_restore POD PODSNAPD_OFFSET CONTAINERD_OFFSET: seconds from podsnapd's RestorePod of
# POD (its "restoring pod" line) to containerd's "StartContainer ... returns successfully" for
# POD's container, read from both logs after the offsets (both log UTC, to the microsecond).
runtime_restore() {
	local id
	id=$(kubectl get pod "$1" -o jsonpath='{.status.containerStatuses[0].containerID}')
	id=${id#containerd://}
	[ -n "$id" ] || die "pod $1 has no container ID"
	python3 - "$1" "$id" "$PODSNAPD_LOG" "$2" "$CONTAINERD_LOG" "$3" <<'PY'
import re, sys
from datetime import datetime, timezone
name, cid, plog, poff, clog, coff = sys.argv[1:]
def stamp(text):
    # RFC 3339: podsnapd writes UTC ("Z"), containerd its local time's offset.
    m = re.search(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", text)
    zone = timezone.utc if m.group(3) == "Z" else datetime.strptime(m.group(3).replace(":", ""), "%z").tzinfo
    frac = float("0" + (m.group(2) or ".0"))
    return datetime.fromisoformat(m.group(1)).replace(tzinfo=zone).timestamp() + frac
def lines(path, offset):
    with open(path, "rb") as f:
        f.seek(int(offset))
        return [re.sub(r"\x1b\[[0-9;]*m", "", l.decode("utf-8", "replace")) for l in f]
start = next((stamp(l) for l in lines(plog, poff)
              if f"RestorePod{{pod=default/{name} " in l and ": restoring pod " in l), None)
end = next((stamp(l) for l in lines(clog, coff)
            if f'StartContainer for \\"{cid}\\" returns successfully' in l), None)
if start is None or end is None:
    sys.exit(f"no RestorePod of {name} in {plog}, or no StartContainer of {cid} in {clog}")
print("%.3f" % (end - start))
PY
}

raw_once() {
	local dump=$work/raw-$1
	start_raw_memtest "$work" "$mib"
	mkdir "$dump"
	sync
	warm
	secs "$PODSNAP_BIN/criu" dump -t "$raw_pid" --leave-running -o dump.log -v2 -D "$dump" >>"$work/raw-dump"
	# The original goes first (CRIU restores the same pid).
	kill -KILL -- "-$raw_pid"
	wait "$raw_pid" 2>/dev/null || true
	sync
	warm
	secs "$PODSNAP_BIN/criu" restore --restore-detached -o restore.log -v2 -D "$dump" >>"$work/raw-restore"
	kill -KILL -- "-$raw_pid" 2>/dev/null || true
	raw_pid=
	rm -rf "$dump"
	log "[run $1] raw criu dump $(tail -n1 "$work/raw-dump")s, raw criu restore $(tail -n1 "$work/raw-restore")s"
}

# checkpoint_endpoint POD OUT: the kubelet's checkpoint of POD through its endpoint; its answer
# in OUT.
checkpoint_endpoint() {
	kubectl create --raw "/api/v1/nodes/$NODE_NAME/proxy/checkpointpod/default/$1?timeout=300" -f /dev/null >"$2"
}

# restore_running NAME CHECKPOINT: pod NAME restored from CHECKPOINT, applied until it runs.
restore_running() {
	pod "$1" "$2" | kubectl apply -f - >/dev/null
	kubectl wait --for condition=Ready --timeout 300s "pod/$1" >/dev/null
}

kubelet_once() {
	local name=bench-kubelet-$1 restored=bench-kubelet-$1-restored checkpoint offsets events
	pods+=("$name")
	pod "$name" | kubectl apply -f - >/dev/null
	kubectl wait --for condition=Ready --timeout 120s "pod/$name" >/dev/null
	memtest_ready "$name"
	sleep 1

	# The kubelet's checkpoint endpoint, answered.
	sync
	warm
	secs checkpoint_endpoint "$name" "$work/answer" >>"$work/endpoint"
	checkpoint=$(jq -r '.items[0]' "$work/answer")
	[ -d "$checkpoint" ] || die "the kubelet answered no checkpoint directory: $(cat "$work/answer")"
	checkpoints+=("$checkpoint")

	# A PodCheckpoint object, created until Ready (its data removed with it afterwards).
	sync
	warm
	secs checkpoint_via_kubelet "$name" "$name" >>"$work/object"
	kubectl delete podcheckpoint "$name" --wait=true --timeout=120s >/dev/null
	kubectl delete pod "$name" --grace-period=1 --wait=true --timeout=120s >/dev/null

	# The restore: a pod restored from the endpoint's checkpoint, until its container runs.
	pods+=("$restored")
	offsets=("$(stat -c %s "$PODSNAPD_LOG")" "$(stat -c %s "$CONTAINERD_LOG")")
	sync
	warm
	secs restore_running "$restored" "$checkpoint" >>"$work/restore"
	runtime_restore "$restored" "${offsets[@]}" >"$work/one" || die "the runtime's part of the restore of $restored is not in the logs"
	cat "$work/one" >>"$work/restore-cri"
	events=$(kubectl get events --field-selector "involvedObject.name=$restored,reason=RestoreSucceeded" -o name)
	[ -n "$events" ] ||
		die "the kubelet reported no RestoreSucceeded for $restored: $(kubectl get events --field-selector "involvedObject.name=$restored" 2>&1)"
	memtest_check "$restored" >"$work/check"
	log "[run $1] checkpoint endpoint $(tail -n1 "$work/endpoint")s, PodCheckpoint to Ready $(tail -n1 "$work/object")s, restore to running $(tail -n1 "$work/restore")s (runtime $(tail -n1 "$work/restore-cri")s); $(cat "$work/check")"
	kubectl delete pod "$restored" --grace-period=1 --wait=true --timeout=120s >/dev/null
	rm -rf -- "$checkpoint"
}

for r in $(seq "$runs"); do
	kubelet_once "$r"
	raw_once "$r"
done

col() { median <"$work/$1"; }
endpoint=$(col endpoint) object=$(col object) restore=$(col restore) restore_cri=$(col restore-cri)
raw_dump=$(col raw-dump) raw_restore=$(col raw-restore)
cat <<EOF

Pod of one container x ${mib} MiB through the kubelet, median of $runs ($(date -u '+%Y-%m-%d %H:%M UTC')):
  checkpoint, the kubelet's endpoint (answered)          $(printf '%.3f' "$endpoint") s
  checkpoint, a PodCheckpoint created to Ready            $(printf '%.3f' "$object") s
  raw criu dump --leave-running                           $(printf '%.3f' "$raw_dump") s
  restore, pod applied to its container running          $(printf '%.3f' "$restore") s
    of which RestorePod to StartContainer answered     $(printf '%.3f' "$restore_cri") s
  raw criu restore --restore-detached                     $(printf '%.3f' "$raw_restore") s
RATIO checkpoint endpoint / raw criu dump $(printf '%.2f' "$(div "$endpoint" "$raw_dump")") (target <= 1.2)
RATIO PodCheckpoint to Ready / raw criu dump $(printf '%.2f' "$(div "$object" "$raw_dump")")
RATIO restore to running / raw criu restore $(printf '%.2f' "$(div "$restore" "$raw_restore")") (target <= 1.2)
RATIO RestorePod to started / raw criu restore $(printf '%.2f' "$(div "$restore_cri" "$raw_restore")")
EOF
