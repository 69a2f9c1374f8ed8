#!/usr/bin/env bash
# Benchmarks podsnap against containerd's runc shim and raw CRIU (bench/, podsnap-bench): builds
# the shim and podsnap-bench (for `kubelet`, the shim and podsnapd) in release, points the
# node's `podsnap` handler at the release shim (hack/node-up.sh with PODSNAP_SHIM; the node is
# started when it is down), runs the benchmarks, and then points the node back at the debug
# shim, or takes it down again when this script brought it up. Pods already running keep the
# shim they were started with. The pod benchmark
# goes through podsnapd and the podsnap CLI: for it both are built in release too, and the node's
# podsnapd is restarted from the release build (PODSNAPD_BINARY), then from the debug one again.
#
# Usage: hack/bench.sh                          podsnap-bench start, checkpoint, pod, then registry
#        hack/bench.sh start|checkpoint|pod|registry [N]
#                                               one of them (see target/release/podsnap-bench help)
#        hack/bench.sh slow-start [N]           bench/slow-start.sh: time-to-ready of a slow-starting
#                                               pod on the Kubernetes cluster, cold vs restored
#        hack/bench.sh migrate [N]              bench/migrate.sh: downtime of a 1 GiB pod moved
#                                               across kind workers vs its parts measured alone
#        hack/bench.sh kubelet [N]              bench/kubelet.sh: a 1 GiB pod checkpointed and
#                                               restored through the kubelet on the single-node
#                                               cluster (release shim and podsnapd) vs raw CRIU
#
# Environment: PODSNAP_BENCH_SKIP_BUILD=1 (use the release binaries already built),
# PODSNAP_BENCH_DIR (where checkpoint images go; default /var/tmp).
set -euo pipefail
exec </dev/null
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=hack/node-lib.sh
. "$(dirname "$0")/node-lib.sh"
require_root
cd "$PODSNAP_ROOT"

if [ "${1:-}" = slow-start ]; then
	shift
	exec bench/slow-start.sh "$@"
fi
if [ "${1:-}" = migrate ]; then
	shift
	exec bench/migrate.sh "$@"
fi

release=$PODSNAP_ROOT/target/release
release_shim=$release/containerd-shim-podsnap-v2
bench=$release/podsnap-bench
packages=(-p containerd-shim-podsnap-v2 -p podsnap-bench)
binaries=("$release_shim" "$bench")
node_env=("PODSNAP_SHIM=$release_shim")
if [ "${1:-}" = kubelet ]; then
	# bench/kubelet.sh drives the cluster with kubectl and raw CRIU: the release shim and
	# podsnapd under the kubelet, neither podsnap-bench nor the CLI.
	packages=(-p containerd-shim-podsnap-v2 -p podsnapd)
	binaries=("$release_shim" "$release/podsnapd")
	node_env+=("PODSNAPD_BINARY=$release/podsnapd")
elif [ $# = 0 ] || [ "$1" = pod ]; then
	packages+=(-p podsnapd -p podsnap-cli)
	binaries+=("$release/podsnapd" "$release/podsnap")
	node_env+=("PODSNAPD_BINARY=$release/podsnapd")
elif [ "$1" = registry ]; then
	# Push and pull are the CLI's: it is built in release; the checkpoint it moves is made by
	# whichever podsnapd runs (its time is not measured here).
	packages+=(-p podsnap-cli)
	binaries+=("$release/podsnap")
fi

if [ "${PODSNAP_BENCH_SKIP_BUILD:-0}" != 1 ]; then
	# The patched libcontainer and libcgroups the workspace builds (cheap when up to date).
	"$PODSNAP_ROOT/hack/libcontainer.sh"
	step "release build (fat LTO: minutes)" timeout --kill-after=30 3600 \
		cargo build --release "${packages[@]}"
fi
for b in "${binaries[@]}"; do
	[ -x "$b" ] || die "$b is not built"
done

node_was_up=0
containerd_answers && node_was_up=1

restore_node() {
	local rc=$?
	if [ "$node_was_up" = 1 ]; then
		log "pointing the node back at the debug shim (and podsnapd)"
		env -u PODSNAP_SHIM -u PODSNAPD_BINARY PODSNAP_SKIP_IMAGES=1 "$PODSNAP_ROOT/hack/node-up.sh" ||
			log "warning: hack/node-up.sh could not relink the debug shim"
	else
		timeout 300 "$PODSNAP_ROOT/hack/node-down.sh" || log "warning: hack/node-down.sh failed"
	fi
	exit "$rc"
}
trap restore_node EXIT

# A node that is up only gets the link changed (no image refresh: others may be using it).
env "${node_env[@]}" PODSNAP_SKIP_IMAGES=$node_was_up timeout 600 "$PODSNAP_ROOT/hack/node-up.sh"

run_bench() {
	step "podsnap-bench $*" env PODSNAP_CLI="$release/podsnap" \
		timeout --kill-after=30 3600 "$bench" "$@"
}
if [ "${1:-}" = kubelet ]; then
	shift
	# The cluster's node-up (when bench/kubelet.sh brings the cluster up) keeps the release
	# binaries; the kubelet talks to the release podsnapd.
	step "bench/kubelet.sh $*" env "${node_env[@]}" timeout --kill-after=30 3600 bench/kubelet.sh "$@"
elif [ $# = 0 ]; then
	run_bench start
	run_bench checkpoint
	run_bench pod
	run_bench registry
else
	run_bench "$@"
fi
