#!/usr/bin/env bash
# Run critest (cri-tools v1.37.0) against the node's containerd (hack/node-up.sh) once per runtime
# handler, podsnap and runc by default, one after the other in the same run, and compare: the set
# of specs passing with podsnap must equal the set passing with runc, except for the differences
# listed in hack/critest-known-differences.txt, each with its reason. A listed difference that no
# longer differs fails the run too, so the list stays honest.
#
# Usage: hack/critest.sh [--handlers "podsnap runc"] [--parallel N] [--focus REGEX] [--out DIR]
#                        [--endpoint unix:///path.sock] [-- EXTRA-CRITEST-ARGS...]
# --endpoint: the CRI socket to test (default our containerd's; e.g. podsnapd's, which forwards
# to it). NRI specs still use containerd's NRI socket.
# Environment: CRITEST_HANDLERS, CRITEST_PARALLEL (default 4), CRITEST_FLAKE_ATTEMPTS (default 2),
# CRITEST_OUT (default /tmp/podsnap-critest), CRITEST_KNOWN (the known-differences file),
# CRITEST_ENDPOINT. Reports: $CRITEST_OUT/<handler>/{report.json,junit.xml,critest.log}.
# Time on this 2-core machine, --parallel 4: about 1 minute per handler (1.8 with --parallel 1).
#
# Specs skipped for EVERY handler, because they cannot pass on this machine for any runtime:
#   - "public image with digest should be pulled and removed": critest pulls
#     gcr.io/k8s-staging-cri-tools/test-image-digest@sha256:9700f9a2..., a digest of upstream's
#     multi-arch manifest list. No registry is reachable and a digest cannot be rebuilt locally
#     (hack/mkimage.py pushes the repository's tag, not those bytes), so the pull fails whatever
#     the runtime. Every other image critest uses is built locally (hack/images.sh).
#   - "NRI plugin synchronization should receive information about all containers without the
#     race condition during initialization": it skips itself when containerd (not the runtime)
#     loses a container created during a late plugin's Synchronize, which happens at random here
#     (pass or skip from run to run, with runc as with podsnap), so it cannot compare handlers.
#   - "NRI plugin synchronization should receive a callback for container created during the
#     Synchronize call": the same race, from the other side (seen skipping itself with podsnap and
#     passing with runc in one run, and the reverse in another).
#   - "Image Identifier Consistency should return the same image identifier across all APIs":
#     it removes a container it never stopped, counting on the image's `sh` to have exited by
#     then; whether CRI has seen that exit is a race (it failed now and then with podsnap, whose
#     exit reaches containerd a few ms later than runc's), not a check of image identifiers.
# Everything else runs; specs that skip themselves (AppArmor absent from this kernel, optional
# features) are reported as skipped by critest itself.
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=hack/node-lib.sh
. "$(dirname "$0")/node-lib.sh"
require_root

handlers=${CRITEST_HANDLERS:-podsnap runc}
parallel=${CRITEST_PARALLEL:-4}
# A spec that fails and then passes on a retry counts as passed and is listed as flaky. Some of
# critest's NRI specs race with events of the spec before them, for runc as for podsnap.
flake_attempts=${CRITEST_FLAKE_ATTEMPTS:-2}
out=${CRITEST_OUT:-/tmp/podsnap-critest}
focus=""
endpoint=${CRITEST_ENDPOINT:-unix://$CONTAINERD_SOCK}
extra=()
known=${CRITEST_KNOWN:-$PODSNAP_ROOT/hack/critest-known-differences.txt}
# Regexes (ginkgo --skip) of specs that no runtime can pass here; see the header.
SKIPS=(
	'public image with digest should be pulled and removed'
	'should receive information about all containers without the race condition during initialization'
	'should receive a callback for container created during the Synchronize call'
	'should return the same image identifier across all APIs'
)

while [ $# -gt 0 ]; do
	case $1 in
	--handlers) handlers=$2; shift 2 ;;
	--parallel) parallel=$2; shift 2 ;;
	--focus) focus=$2; shift 2 ;;
	--out) out=$2; shift 2 ;;
	--endpoint) endpoint=$2; shift 2 ;;
	--) shift; extra=("$@"); break ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument $1 (see --help)" ;;
	esac
done

[ -x "$PODSNAP_BIN/critest" ] || die "$PODSNAP_BIN/critest is missing: run hack/install.sh"
if [ "$parallel" -gt 1 ]; then
	command -v ginkgo >/dev/null || die "critest --parallel needs the ginkgo CLI on PATH: run hack/install.sh"
fi
containerd_answers || die "the node is not up: run hack/node-up.sh"
crictl --runtime-endpoint "$endpoint" --image-endpoint "$endpoint" --timeout 5s info >/dev/null 2>&1 ||
	die "nothing answers CRI on $endpoint"
for h in $handlers; do
	if [ "$h" = podsnap ] && [ ! -x "$NODE_BIN/containerd-shim-podsnap-v2" ]; then
		die "handler podsnap: $NODE_BIN/containerd-shim-podsnap-v2 -> $(readlink "$NODE_BIN/containerd-shim-podsnap-v2" || echo nothing) is not an executable: build the shim (cargo build) first"
	fi
done

skip_regex=$(IFS='|'; echo "${SKIPS[*]}")

# Pods that a critest run left behind (critest names their namespaces cri-test-namespace*) would
# hold host ports and addresses for the next run: remove them.
remove_leftover_pods() {
	local ids
	ids=$(node_crictl pods -q --namespace '^cri-test-namespace' 2>/dev/null || true)
	[ -n "$ids" ] || return 0
	log "removing $(echo "$ids" | wc -l) pod(s) left by critest"
	# shellcheck disable=SC2086 # one argument per id
	node_crictl stopp $ids >/dev/null 2>&1 || true
	# shellcheck disable=SC2086
	node_crictl rmp -f $ids >/dev/null 2>&1 || true
}

# unmount_under DIR: lazily unmount whatever critest's mount-propagation specs left mounted
# below DIR (deepest first), so the directory can be removed.
unmount_under() {
	local m
	awk -v d="$1/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
		umount -l "$m" 2>/dev/null || true
	done
}

run_handler() {
	local h=$1 dir=$out/$1 args start rc=0
	unmount_under "$dir"
	rm -rf "$dir"
	mkdir -p "$dir"
	args=(
		--runtime-endpoint "$endpoint" --image-endpoint "$endpoint"
		--runtime-handler "$h" --nri-socket "$NRI_SOCKET"
		--ginkgo.skip "$skip_regex"
		--ginkgo.json-report "$dir/report.json" --ginkgo.junit-report "$dir/junit.xml"
		--ginkgo.no-color --ginkgo.timeout 60m --ginkgo.flake-attempts "$flake_attempts"
	)
	[ -z "$focus" ] || args+=(--ginkgo.focus "$focus")
	# --parallel 1 would trip ginkgo's check against `go test -parallel`: one process is the default.
	[ "$parallel" -le 1 ] || args+=(--parallel "$parallel")
	remove_leftover_pods
	log "critest $CRI_TOOLS_VERSION, handler $h, --parallel $parallel, $endpoint (log $dir/critest.log)"
	start=$(date +%s)
	# critest --parallel runs `ginkgo` in the working directory and leaves a directory in $TMPDIR
	# per run; specs make host directories there too: keep all of it in $dir.
	mkdir -p "$dir/tmp"
	(cd "$dir" && TMPDIR=$dir/tmp "$PODSNAP_BIN/critest" "${args[@]}" "${extra[@]}") >"$dir/critest.log" 2>&1 </dev/null || rc=$?
	echo "$(($(date +%s) - start))" >"$dir/seconds"
	echo "$rc" >"$dir/rc"
	log "handler $h: critest rc=$rc in $(($(date +%s) - start))s"
	remove_leftover_pods
	[ -s "$dir/report.json" ] || { tail -n 30 "$dir/critest.log" >&2; die "handler $h: critest wrote no report ($dir/report.json)"; }
}

for h in $handlers; do
	run_handler "$h"
done

# shellcheck disable=SC2086 # one argument per handler
python3 - "$out" "$known" "$focus" $handlers <<'EOF'
import json, os, sys

out, known_path, focus, handlers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]


flaky = {}


def specs(handler):
    """{spec name: state} from ginkgo's JSON report."""
    result = {}
    flaky[handler] = []
    for suite in json.load(open(os.path.join(out, handler, "report.json"))):
        for spec in suite.get("SpecReports") or []:
            if spec.get("LeafNodeType") != "It":
                continue
            name = " ".join((spec.get("ContainerHierarchyTexts") or []) + [spec["LeafNodeText"]])
            name = " ".join(name.split())
            state = spec["State"]
            if state not in ("passed", "skipped", "pending"):
                state = "failed"  # failed, panicked, timedout, interrupted, aborted
            result[name] = state
            if state == "passed" and (spec.get("NumAttempts") or 1) > 1:
                flaky[handler].append(name)
    return result


def read(path, default=""):
    try:
        return open(path).read().strip()
    except OSError:
        return default


results = {h: specs(h) for h in handlers}
print()
print(f"{'handler':<10} {'passed':>7} {'failed':>7} {'skipped':>8} {'total':>6} {'flaky':>6} {'minutes':>8}  critest rc")
for h in handlers:
    states = list(results[h].values())
    secs = int(read(os.path.join(out, h, "seconds"), "0"))
    print(f"{h:<10} {states.count('passed'):>7} {states.count('failed'):>7} "
          f"{states.count('skipped') + states.count('pending'):>8} {len(states):>6} {len(flaky[h]):>6} "
          f"{secs / 60:>8.1f}  {read(os.path.join(out, h, 'rc'), '?')}")
for h in handlers:
    failed = sorted(n for n, s in results[h].items() if s == "failed")
    if failed:
        print(f"\nfailed with {h}:")
        for n in failed:
            print(f"  - {n}")
    if flaky[h]:
        print(f"\nflaky with {h} (failed, then passed on a retry):")
        for n in sorted(flaky[h]):
            print(f"  - {n}")

if len(handlers) < 2:
    states = list(results[handlers[0]].values())
    sys.exit(1 if "failed" in states else 0)

# Parity: the first handler against each other one (podsnap against runc by default).
known = {}
bad_entries = []
for lineno, line in enumerate(read(known_path).splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    name, sep, reason = line.partition(" :: ")
    if not sep or not reason.strip():
        bad_entries.append(f"{known_path}:{lineno}: want '<spec name> :: <reason>', got {line!r}")
        continue
    known[" ".join(name.split())] = reason.strip()

status = 0
subject = handlers[0]
for base in handlers[1:]:
    a, b = results[subject], results[base]
    pa = {n for n, s in a.items() if s == "passed"}
    pb = {n for n, s in b.items() if s == "passed"}
    # A spec runc passes must pass with podsnap (unless listed as known). One that passes with
    # podsnap but not with runc is no regression of podsnap's: reported, never failing the run
    # (critest's NRI specs race with containerd and occasionally fail for runc).
    diff = {n: f"passes with {base}, {a.get(n, 'absent')} with {subject}" for n in pb - pa}
    extra = sorted(pa - pb)
    unexpected = sorted(n for n in diff if n not in known)
    expected = sorted(n for n in diff if n in known)
    # With --focus, entries for specs outside the focus (skipped by both) are not judged.
    stale = sorted(n for n in known if n not in diff
                   and not (focus and a.get(n, "skipped") == "skipped" and b.get(n, "skipped") == "skipped"))
    print(f"\nparity {subject} vs {base}: {len(pa)} vs {len(pb)} passed, {len(diff)} difference(s), "
          f"{len(expected)} known, {len(unexpected)} unexpected, {len(stale)} stale known")
    for n in expected:
        print(f"  known:      {n}\n              {diff[n]} ({known[n]})")
    for n in unexpected:
        print(f"  UNEXPECTED: {n}\n              {diff[n]}")
    for n in stale:
        print(f"  STALE:      {n}\n              listed in {os.path.basename(known_path)} but no longer differs: remove it")
    for n in extra:
        print(f"  {base}-only failure (not a podsnap regression): {n}\n              {b.get(n, 'absent')} with {base}")
    if unexpected or stale:
        status = 1
for e in bad_entries:
    print(f"  BAD ENTRY:  {e}")
    status = 1
print("\nparity OK" if status == 0 else "\nparity FAILED")
sys.exit(status)
EOF
