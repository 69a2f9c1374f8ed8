#!/usr/bin/env bash
# Runs every podsnap test, as README's test command and CI do: install the toolchain (cached),
# lint, unit tests, bring up a node, end-to-end tests against it, critest for both runtime
# handlers, and tear the node down again.
#
# Every phase runs under a time limit and with no stdin, so a hung test fails the run instead of
# stalling it; each phase logs how long it took.
set -euo pipefail
exec </dev/null
# A CI runner may start us in no session of our own (PID 1's session 0 here): give the run its
# own, as a login shell would, so nothing under test inherits a session leader CRIU cannot see.
if [ "$(ps -o sid= -p $$ | tr -d ' ')" != "$$" ] && [ -z "${PODSNAP_TEST_SESSION:-}" ]; then
	export PODSNAP_TEST_SESSION=1
	exec setsid --wait bash "$0" "$@"
fi
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
require_root
cd "$PODSNAP_ROOT"

# CI builds a fresh clone once: incremental compilation only costs it disk (gigabytes) and time.
if [ "${CI:-}" = true ]; then
	export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
fi

T0=$(date +%s)
# The whole run must end within PODSNAP_TEST_BUDGET seconds (CI allows 90 minutes): each phase's
# limit is cut to what is left, so a hang fails the run with its phase named.
BUDGET=${PODSNAP_TEST_BUDGET:-4800}
# phase NAME LIMIT_SECONDS CMD...: one step of the run, killed if it outlives its limit.
phase() {
	local name=$1 limit=$2 left
	shift 2
	left=$((T0 + BUDGET - $(date +%s)))
	if [ "$left" -le 30 ]; then
		log "FAILED: no time left for $name (budget ${BUDGET}s)"
		exit 1
	fi
	[ "$limit" -le "$left" ] || limit=$left
	if ! step "$name" timeout --kill-after=30 "$limit" "$@"; then
		log "FAILED: $name (after $(($(date +%s) - T0))s in all)"
		exit 1
	fi
}

node_started=0
cluster_started=0
kind_started=0
cleanup() {
	if [ "$kind_started" = 1 ]; then
		timeout 600 "$PODSNAP_ROOT/hack/kind-down.sh" || log "kind-down failed"
	fi
	if [ "$cluster_started" = 1 ]; then
		timeout 300 "$PODSNAP_ROOT/hack/cluster-down.sh" || log "cluster-down failed"
	fi
	if [ "$node_started" = 1 ]; then
		timeout 300 "$PODSNAP_ROOT/hack/node-down.sh" || log "node-down failed"
	fi
}
trap cleanup EXIT

# The kubelet taints a node short of disk (disk-pressure) and no test pod would start: say so early.
avail_gib=$(($(df --output=avail -k / | tail -1) / 1024 / 1024))
if [ "$avail_gib" -lt 15 ]; then
	log "warning: only ${avail_gib} GiB free on /: the cluster tests need room (checkpoints, images, builds)"
fi

phase install 2400 hack/install.sh
phase fmt 300 cargo fmt --all -- --check
phase clippy 1800 cargo clippy --workspace --all-targets --locked -- -D warnings
phase shellcheck 120 shellcheck -x hack/*.sh bench/*.sh .ci/run crates/cri-api/gen.sh
# The Vagrantfile, for every setting it documents (the VM itself: hack/vagrant-smoke.sh, not CI).
phase vagrant-validate 300 hack/vagrant-smoke.sh --validate
# The checked-in CRI code (prost/tonic messages and the CLI's serde) is what gen.sh generates.
phase gen-check 600 crates/cri-api/gen.sh --check
phase build 1200 cargo build --workspace --all-targets --locked
# Unit tests, and the integration tests that need no node (podsnapd's node test runs later).
phase unit 900 cargo test --workspace --exclude podsnap-e2e --exclude podsnapd --locked -- --test-threads=1
phase unit-podsnapd 600 cargo test -p podsnapd --locked --lib --bins --test forward_raw
# The kubelet patch series applied to k8s.io/kubernetes, Kubernetes built (cached by version and
# patch hash), and the patched packages' Go unit tests.
phase kubelet-patches 2400 hack/kube-build.sh --test
phase images 1200 hack/images.sh
node_started=1
phase node-up 600 hack/node-up.sh
# faults.rs kills CRIU, podsnapd and containerd mid-checkpoint and starts them again as
# node-up.sh does: the node is whole for the phases after it.
phase e2e 2400 cargo test -p podsnap-e2e --locked --lib --test pods --test checkpoint --test pod_checkpoint --test faults -- --test-threads=1
phase podsnapd-node 600 cargo test -p podsnapd --locked --test crictl_through_podsnapd -- --test-threads=1
# critest against containerd directly, for both handlers (podsnap's pass set must cover
# runc's), then the podsnap handler through podsnapd, which must not change it.
phase critest 1800 hack/critest.sh
phase critest-podsnapd 1800 hack/critest.sh --endpoint "unix://$PODSNAP_NODE_RUN/podsnapd.sock"
# The single-node Kubernetes cluster with the patched kubelet on this node: pod checkpoint and
# restore through Kubernetes.
cluster_started=1
phase cluster-up 900 hack/cluster-up.sh
phase e2e-cluster 1800 cargo test -p podsnap-e2e --locked --test cluster --test controller --test load -- --test-threads=1
phase cluster-down 300 hack/cluster-down.sh
cluster_started=0
phase node-down 300 hack/node-down.sh
node_started=0
# Three nodes on kind (podman containers from podsnap's node image, built here offline), podsnap
# deployed from deploy/ as a user deploys it: the e2e tests that need more than one node.
kind_started=1
phase kind-up 1800 hack/kind-up.sh --nodes 3
phase e2e-kind 1200 cargo test -p podsnap-e2e --locked --test kind -- --test-threads=1
# The cluster suite again, unchanged in what it asserts, on kind: its pods on the first worker,
# podsnap as deploy/ deploys it, node files, logs and processes reached with podman exec.
phase e2e-kind-cluster 2400 env PODSNAP_E2E_CLUSTER=kind cargo test -p podsnap-e2e --locked --test cluster --test controller --test load -- --test-threads=1
phase kind-down 600 hack/kind-down.sh
kind_started=0
log "all tests passed in $(($(date +%s) - T0))s"
