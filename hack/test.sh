#!/usr/bin/env bash
# Runs every podsnap test, as README's test command and CI do: install the toolchain (cached),
# lint, unit tests, bring up a node, end-to-end tests against it, critest for both runtime
# handlers, and tear the node down again.
#
# Every phase runs under a time limit and with no stdin, so a hung test fails the run instead of
# stalling it; each phase logs how long it took.
set -euo pipefail
exec </dev/null
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
require_root
cd "$PODSNAP_ROOT"

T0=$(date +%s)
# phase NAME LIMIT_SECONDS CMD...: one step of the run, killed if it outlives its limit.
phase() {
	local name=$1 limit=$2
	shift 2
	if ! step "$name" timeout --kill-after=30 "$limit" "$@"; then
		log "FAILED: $name (after $(($(date +%s) - T0))s in all)"
		exit 1
	fi
}

node_started=0
cleanup() {
	if [ "$node_started" = 1 ]; then
		timeout 300 "$PODSNAP_ROOT/hack/node-down.sh" || log "node-down failed"
	fi
}
trap cleanup EXIT

phase install 2400 hack/install.sh
phase fmt 300 cargo fmt --all -- --check
phase clippy 1800 cargo clippy --workspace --all-targets --locked -- -D warnings
phase shellcheck 120 shellcheck -x hack/*.sh .ci/run
phase build 1200 cargo build --workspace --all-targets --locked
phase unit 900 cargo test --workspace --exclude podsnap-e2e --locked -- --test-threads=1
phase images 1200 hack/images.sh
node_started=1
phase node-up 600 hack/node-up.sh
phase e2e 2400 cargo test -p podsnap-e2e --locked -- --test-threads=1
phase critest 2400 hack/critest.sh
log "all tests passed in $(($(date +%s) - T0))s"
