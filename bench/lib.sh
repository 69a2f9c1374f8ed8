# shellcheck shell=bash
# Helpers of the shell benchmarks (bench/migrate.sh, bench/kubelet.sh, bench/slow-start.sh), sourced
# after hack/lib.sh: timing, medians, memory the host backs, and memtest (e2e/fixtures/memtest.c)
# built for a pod and for raw CRIU runs.

# warm: touches and frees 1.5 GiB. This VM returns free memory to its host, which faults it back
# in at first touch; the step after it (podsnap's or the reference's) works in memory the host
# backs, as bench/src/pod.rs does.
warm() { dd if=/dev/zero of=/dev/null bs=1536M count=1 status=none; }

# secs CMD...: runs CMD (its stdout discarded), prints its wall time in seconds. Call it outside
# $(...) where CMD changes the caller's variables, and append its output to a file instead.
secs() {
	local t0 t1
	t0=$(date +%s.%N)
	# errexit does not reach into $(...): a failure is returned, and the caller's assignment fails.
	"$@" >/dev/null || return
	t1=$(date +%s.%N)
	awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}'
}

# add A B / div A B: arithmetic on seconds.
add() { awk -v a="$1" -v b="$2" 'BEGIN {print a + b}'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN {print a / b}'; }

# median: of the numbers on stdin, one per line.
median() { sort -g | awk '{v[NR]=$1} END {if (NR % 2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }

# build_memtest DIR: DIR/memtest (its files in /tmp, for a pod) and DIR/memtest-raw (its files in
# DIR, for the raw runs), static.
build_memtest() {
	gcc -O2 -static -o "$1/memtest" "$PODSNAP_ROOT/e2e/fixtures/memtest.c"
	sed "s|\"/tmp/memtest\\.|\"$1/memtest.|g" "$PODSNAP_ROOT/e2e/fixtures/memtest.c" >"$1/memtest-raw.c"
	gcc -O2 -static -o "$1/memtest-raw" "$1/memtest-raw.c"
}

# start_raw_memtest DIR MIB: DIR/memtest-raw over MIB in a session of its own (its pid, the
# session's, in raw_pid), once it has filled its memory.
start_raw_memtest() {
	rm -f "$1/memtest.ready"
	setsid "$1/memtest-raw" "$2" </dev/null >/dev/null 2>&1 &
	# shellcheck disable=SC2034 # the caller's
	raw_pid=$!
	for _ in $(seq 240); do [ -f "$1/memtest.ready" ] && break; sleep 0.25; done
	[ -f "$1/memtest.ready" ] || die "the raw memtest did not fill its memory"
}

# checkpoint_via_kubelet NAME POD: a PodCheckpoint NAME of POD (node-local, its data removed
# with it), created and waited for until Ready; NAME is added to the caller's `objects` (for its
# cleanup). Needs the caller's `kubectl`.
checkpoint_via_kubelet() {
	objects+=("$1")
	kubectl apply -f - >/dev/null <<YAML
apiVersion: checkpoint.k8s.io/v1alpha1
kind: PodCheckpoint
metadata: {name: $1, namespace: default}
spec: {sourcePodName: $2, deletionPolicy: Delete}
YAML
	kubectl wait --for=jsonpath='{.status.phase}'=Ready --timeout=300s "podcheckpoint/$1"
}
