#!/usr/bin/env bash
# Migration downtime of a 1 GiB pod from one kind worker to the other (`podsnap migrate`,
# through the kind cluster's registry) against the sum of its parts measured alone on this
# machine in the same run: raw `criu dump --leave-running` of the same program (memtest, 1 GiB
# of a pattern that does not compress), `skopeo copy` of those dump's bytes to the same registry
# and back (transfer only), and raw `criu restore --restore-detached`. Median of N runs each.
# Target (issue 12): migration downtime <= 1.3x the sum of the parts; the largest part is named.
#
# The pod prints a line every 0.2 s; podsnap migrate reports the downtime from the source's last
# line before the checkpoint was asked for to the replacement's first (kubelet timestamps), and
# its parts: the wait for that last line (up to the 0.2 s period, not the migration's doing),
# checkpoint and push, restore to running, running to first output. The ratio compares what the
# migration does (downtime less that wait) with the parts. After each migration memtest checks
# every word of the replacement's memory (untimed): a bad word fails the benchmark.
#
# kind runs podsnap's debug build (hack/kind-up.sh; hashing and zstd are optimised even there,
# Cargo.toml's profile.dev.package); CRIU is the same release build on both sides.
#
# Usage: bench/migrate.sh [N]   (N=3; hack/bench.sh migrate [N]). The kind cluster is brought up
# (3 nodes) when it is down, and down again afterwards. Environment: MIGRATE_MIB (default 1024).
# Each run leaves about 2 GiB in the kind registry's storage, which does not delete:
# hack/kind-down.sh --images removes it.
set -euo pipefail
exec </dev/null
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/../hack/lib.sh"
# shellcheck source=hack/kind-lib.sh
. "$(dirname "$0")/../hack/kind-lib.sh"
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
require_root
cd "$PODSNAP_ROOT"

runs=${1:-3}
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number, not $runs"
mib=${MIGRATE_MIB:-1024}
[[ $mib =~ ^[1-9][0-9]*$ ]] || die "MIGRATE_MIB must be a positive number, not $mib"
for t in gcc skopeo unshare python3; do
	command -v "$t" >/dev/null || die "$t is missing: run hack/install.sh"
done
podman_config

kind_was_up=0
if [ -f "$KIND_KUBECONFIG" ] && [ "$(kind_nodes | wc -l)" -ge 3 ]; then
	kind_was_up=1
else
	hack/kind-up.sh --nodes 3
fi
KUBE_BIN=$(cat "$KIND_RUN/kube-bin")
kubectl() { "$KUBE_BIN/kubectl" --kubeconfig "$KIND_KUBECONFIG" "$@"; }
podsnap() { KUBECONFIG=$KIND_KUBECONFIG "$PODSNAP_ROOT/target/debug/podsnap" "$@"; }
[ -x "$PODSNAP_ROOT/target/debug/podsnap" ] || die "target/debug/podsnap is not built (cargo build -p podsnap-cli)"

work=$(mktemp -d /var/tmp/podsnap-bench-migrate.XXXXXX)
pods=() objects=()
raw_pid=
finish() {
	local rc=$? p
	[ -z "$raw_pid" ] || kill -KILL -- "-$raw_pid" 2>/dev/null || true
	for p in "${pods[@]}"; do
		kubectl delete pod "$p" --ignore-not-found --grace-period=1 --wait=false >/dev/null 2>&1 || true
	done
	for p in "${objects[@]}"; do
		kubectl delete podrestore,podcheckpoint "$p" --ignore-not-found --wait=false >/dev/null 2>&1 || true
	done
	rm -rf "$work"
	[ "$kind_was_up" = 1 ] || hack/kind-down.sh || true
	exit "$rc"
}
trap finish EXIT

# memtest: for the pod (its files in the container's /tmp) and for the raw runs (in $work).
build_memtest "$work"

# The pod's image: a static busybox and memtest, pushed to the kind registry.
mkdir -p "$work/image/tmp"
cp "$PODSNAP_BIN/busybox" "$work/memtest" "$work/image/"
printf 'FROM scratch\nCOPY busybox /bin/busybox\nCOPY memtest /bin/memtest\nCOPY tmp /tmp\n' >"$work/image/Containerfile"
image=$KIND_REGISTRY/bench/memtest:$(cat "$work/image/busybox" "$work/image/memtest" | sha256sum | cut -c1-12)
podman build --quiet --network=none -t "$image" "$work/image" >/dev/null
podman push --quiet --tls-verify=false "$image" >/dev/null

mapfile -t workers < <(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' -o name | sed 's|^node/||')
[ "${#workers[@]}" -ge 2 ] || die "the kind cluster has ${#workers[@]} workers, the benchmark wants 2"
from=${workers[0]} to=${workers[1]}

# layout DIR OUT: an OCI image layout at OUT with DIR (a CRIU dump) as one uncompressed tar layer.
layout() {
	tar -C "$1" -cf "$work/layer.tar" .
	python3 - "$work/layer.tar" "$2" <<'PY'
import hashlib, json, os, shutil, sys
layer, out = sys.argv[1], sys.argv[2]
blobs = os.path.join(out, "blobs", "sha256")
os.makedirs(blobs)
def put(data=None, path=None):
    h = hashlib.sha256()
    if path:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        size = os.path.getsize(path)
        shutil.move(path, os.path.join(blobs, h.hexdigest()))
    else:
        h.update(data)
        size = len(data)
        open(os.path.join(blobs, h.hexdigest()), "wb").write(data)
    return "sha256:" + h.hexdigest(), size
ld, ls = put(path=layer)
cd, cs = put(json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [ld]}}).encode())
md, ms = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ls}]}).encode())
open(os.path.join(out, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": "latest"}}]},
    open(os.path.join(out, "index.json"), "w"))
PY
}

# skopeo with an empty blob info cache of its own (it would otherwise mount a blob it saw in
# another repository instead of sending it), as bench/src/registry.rs runs it.
skopeo_fresh() {
	unshare --mount --propagation private sh -c \
		'mount -t tmpfs -o mode=0700 podsnap-bench /var/lib/containers/cache && exec skopeo "$@"' skopeo "$@"
}

# migrate_once N: one migration of a fresh pod; appends "downtime caused wait ckpt restore first"
# to $work/migrate.
migrate_once() {
	local name=bench-mig-$1 out line new checkpoint
	pods+=("$name")
	kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $name, namespace: default}
spec:
  runtimeClassName: podsnap
  nodeName: $from
  terminationGracePeriodSeconds: 1
  containers:
    - name: memtest
      image: $image
      command:
        - /bin/busybox
        - sh
        - -c
        - |
          /bin/memtest $mib &
          i=0; while :; do i=\$((i+1)); echo "tick \$i"; /bin/busybox usleep 200000; done
YAML
	kubectl wait --for condition=Ready --timeout 120s "pod/$name" >/dev/null
	for _ in $(seq 120); do
		kubectl exec "$name" -- /bin/busybox cat /tmp/memtest.ready >/dev/null 2>&1 && break
		sleep 0.5
	done
	kubectl exec "$name" -- /bin/busybox cat /tmp/memtest.ready >/dev/null ||
		die "memtest in $name did not fill its memory"
	sleep 1
	# Issue 13's row: a node-local PodCheckpoint of the same pod through the kubelet, created to
	# Ready (the pod runs on), against the raw dump below.
	warm
	secs checkpoint_via_kubelet "$name-ckpt" "$name" >>"$work/kubelet"
	kubectl delete podcheckpoint "$name-ckpt" --wait=true --timeout=120s >/dev/null
	echo "[run $1] PodCheckpoint through the kubelet, created to Ready: $(tail -n1 "$work/kubelet")s" >&2
	warm
	out=$(podsnap migrate "$name" --image "$KIND_REGISTRY_NAME:5000/bench/mig" --to "$to" 2>&1) ||
		die "podsnap migrate $name failed: $out"
	line=$(grep '^downtime ' <<<"$out") || die "podsnap migrate printed no downtime: $out"
	new=$( (grep -P '\t' <<<"$out" || true) | tail -n1 | cut -f1)
	checkpoint=$( (grep -P '\t' <<<"$out" || true) | tail -n1 | cut -f3)
	if [ -z "$new" ] || [ -z "$checkpoint" ]; then
		die "podsnap migrate named no new pod: $out"
	fi
	pods+=("$new")
	objects+=("$checkpoint")
	echo "[run $1] $line" >&2
	python3 - "$line" >>"$work/migrate" <<'PY'
import re, sys
line = sys.argv[1]
total = float(re.match(r"downtime ([0-9.]+)s", line).group(1))
parts = dict((k, float(v)) for k, v in re.findall(r"(output to checkpoint asked|checkpoint and push|restore to running|running to first output) ([0-9.]+)s", line))
wait = parts["output to checkpoint asked"]
print(total, total - wait, wait, parts["checkpoint and push"], parts["restore to running"], parts["running to first output"])
PY
	# Every word of the replacement's memory, checked by memtest itself.
	# shellcheck disable=SC2016 # expanded by the container's shell
	kubectl exec "$new" -- /bin/busybox sh -c \
		'/bin/busybox rm -f /tmp/memtest.result; /bin/busybox kill -USR1 $(/bin/busybox pidof memtest);
		 for i in $(/bin/busybox seq 100); do [ -f /tmp/memtest.result ] && break; /bin/busybox usleep 100000; done;
		 /bin/busybox cat /tmp/memtest.result' >"$work/check" 2>&1 || true
	grep -q ' 0 bad words' "$work/check" || die "the migrated memtest in $new: $(cat "$work/check")"
	kubectl delete podrestore,podcheckpoint "$checkpoint" --wait=true --timeout=120s >/dev/null
}

# parts_once N: raw dump, transfer, raw restore of memtest-raw; appends "dump transfer restore".
parts_once() {
	local dump=$work/raw-$1 pulled=$work/pulled-$1 t_dump t_push t_pull t_restore
	start_raw_memtest "$work" "$mib"
	mkdir "$dump"
	sync
	warm
	t_dump=$(secs "$PODSNAP_BIN/criu" dump -t "$raw_pid" --leave-running -o dump.log -v2 -D "$dump")
	layout "$dump" "$work/layout-$1"
	sync
	warm
	t_push=$(secs skopeo_fresh copy --quiet --dest-tls-verify=false "oci:$work/layout-$1:latest" \
		"docker://$KIND_REGISTRY/bench/raw-$1:1")
	rm -rf "$work/layout-$1"
	warm
	t_pull=$(secs skopeo_fresh copy --quiet --src-tls-verify=false "docker://$KIND_REGISTRY/bench/raw-$1:1" \
		"oci:$pulled:latest")
	rm -rf "$pulled"
	# The restore: the original goes first (CRIU restores the same pid).
	kill -KILL -- "-$raw_pid"
	wait "$raw_pid" 2>/dev/null || true
	sync
	warm
	t_restore=$(secs "$PODSNAP_BIN/criu" restore --restore-detached -o restore.log -v2 -D "$dump")
	kill -KILL -- "-$raw_pid" 2>/dev/null || true
	raw_pid=
	rm -rf "$dump"
	echo "[run $1] raw criu dump ${t_dump}s, skopeo push ${t_push}s, skopeo pull ${t_pull}s, raw criu restore ${t_restore}s" >&2
	echo "$t_dump $(add "$t_push" "$t_pull") $t_restore" >>"$work/parts"
}

for r in $(seq "$runs"); do
	migrate_once "$r"
	parts_once "$r"
done

col() { awk -v c="$2" '{print $c}' "$work/$1" | median; }
downtime=$(col migrate 1) caused=$(col migrate 2) wait_=$(col migrate 3)
ckpt=$(col migrate 4) restore=$(col migrate 5) first=$(col migrate 6)
dump=$(col parts 1) transfer=$(col parts 2) raw_restore=$(col parts 3)
via_kubelet=$(median <"$work/kubelet")
sum=$(add "$(add "$dump" "$transfer")" "$raw_restore")
largest=$(printf '%s\traw criu dump\n%s\ttransfer (skopeo copy both ways)\n%s\traw criu restore\n' \
	"$dump" "$transfer" "$raw_restore" | sort -g -r | head -n1 | cut -f2)
cat <<EOF

Migration of a ${mib} MiB pod across kind workers, median of $runs ($(date -u '+%Y-%m-%d %H:%M UTC')):
  podsnap migrate downtime (as printed)           $(printf '%.2f' "$downtime") s
    of which the wait for the source's last line  $(printf '%.2f' "$wait_") s (not the migration's)
    checkpoint and push                           $(printf '%.2f' "$ckpt") s
    restore to running (schedule, pull, restore)  $(printf '%.2f' "$restore") s
    running to first output                       $(printf '%.2f' "$first") s
  the migration's part of the downtime            $(printf '%.2f' "$caused") s
  sum of the parts measured alone                 $(printf '%.2f' "$sum") s
    raw criu dump --leave-running                 $(printf '%.2f' "$dump") s
    skopeo copy to the registry and back          $(printf '%.2f' "$transfer") s
    raw criu restore --restore-detached           $(printf '%.2f' "$raw_restore") s
  largest part: $largest
  ratio: migration / sum of parts = $(printf '%.2f' "$(div "$caused" "$sum")") (target <= 1.3)

Pod checkpoint of that pod through the kubelet (a node-local PodCheckpoint, created to Ready):
  PodCheckpoint                                   $(printf '%.2f' "$via_kubelet") s
  raw criu dump --leave-running                   $(printf '%.2f' "$dump") s
  ratio: PodCheckpoint / raw criu dump = $(printf '%.2f' "$(div "$via_kubelet" "$dump")") (issue 13's target <= 1.2)
EOF
