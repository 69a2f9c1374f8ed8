#!/usr/bin/env bash
# Vendor Kubernetes' CRI api.proto (runtime.v1) into proto/api.proto and regenerate from it, with
# the generator in gen/ (a cargo project of its own, its versions pinned by gen/Cargo.lock):
# - src/runtime_v1.rs (tonic-prost-build): the messages, the RuntimeService and ImageService
#   clients, and their servers (with default stubs, so a server implements only the RPCs it
#   serves and the rest answer Unimplemented);
# - src/runtime_v1.serde.rs (pbjson-build): serde for every message and enum in the proto3 JSON
#   mapping, compiled only with the crate's `serde` feature.
#
# Normal builds need neither protoc nor a build script: the vendored proto and the generated files
# are committed. Rerun this when moving to a newer k8s.io/cri-api or generator, then review the
# diffs.
#
# Usage: crates/cri-api/gen.sh [--check] [path/to/api.proto]
# Default: api.proto of k8s.io/cri-api $CRI_API_VERSION from the Go module cache, downloaded
# with `go mod download` when it is not there yet. A path to the vendored proto/api.proto (or any
# file gen.sh vendored) is used as it is, so the Rust code can be regenerated without go.
# --check: write nothing; fail, showing the diff, unless the committed files are exactly what
# this run generates.
# Needs protoc (Debian: protobuf-compiler), cargo with access to crates.io (or the crates of
# gen/Cargo.lock in its cache), and go for the default proto.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cri_api_version=${CRI_API_VERSION:-v0.37.0}
check=0
if [ "${1:-}" = --check ]; then
	check=1
	shift
fi
case ${1:-} in -*)
	echo "usage: $0 [--check] [path/to/api.proto]" >&2
	exit 2
	;;
esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# version_of CRATE: CRATE's version in the generator's lockfile.
version_of() {
	awk -v name="name = \"$1\"" '$0 == name { getline; gsub(/^version = "|"$/, ""); print; exit }' \
		"$here/gen/Cargo.lock"
}
tonic_version=$(version_of tonic-prost-build)
pbjson_version=$(version_of pbjson-build)
if [ -z "$tonic_version" ] || [ -z "$pbjson_version" ]; then
	echo "gen.sh: tonic-prost-build or pbjson-build missing from gen/Cargo.lock" >&2
	exit 1
fi

proto=${1:-}
if [ -z "$proto" ]; then
	export PATH=$PATH:/usr/local/go/bin
	command -v go >/dev/null || { echo "gen.sh: go not found; pass api.proto's path" >&2; exit 1; }
	moddir=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "k8s.io/cri-api@$cri_api_version" |
		sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
	proto=$moddir/pkg/apis/runtime/v1/api.proto
	[ -f "$proto" ] || { echo "gen.sh: $proto missing" >&2; exit 1; }
fi
[ -f "$proto" ] || { echo "gen.sh: $proto missing" >&2; exit 1; }
command -v protoc >/dev/null || { echo "gen.sh: protoc not found (apt-get install protobuf-compiler)" >&2; exit 1; }

# Everything is generated into $work/result first; then installed, or with --check compared.
result=$work/result
mkdir -p "$result/proto" "$result/src"

# The vendored copy: upstream's file with a provenance note after its licence header, and without
# gogoproto (older cri-api releases import gogo.proto and annotate messages with its options;
# v0.37.0 has none, the filter keeps regeneration working for releases that do).
vendored_note='^// Vendored by crates/cri-api/gen.sh from k8s.io/cri-api '
if grep -q "$vendored_note" "$proto"; then
	# Vendored before: its note names the release (for the generated files' headers).
	cri_api_version=$(sed -n "s|${vendored_note}||p" "$proto" | head -1)
	cp "$proto" "$result/proto/api.proto"
else
	sha=$(sha256sum "$proto" | cut -d' ' -f1)
	awk -v ver="$cri_api_version" -v sha="$sha" '
		/^import "github.com\/gogo\/protobuf\/gogoproto\/gogo.proto";/ { next }
		/^option \(gogoproto\.[a-z_]+\) = [a-z]+;$/ { next }
		{ gsub(/ ?\[\(gogoproto\.[a-z_]+\) = [^]]*\]/, "") }
		{ print }
		!noted && /^\*\/$/ {
			print ""
			print "// Vendored by crates/cri-api/gen.sh from k8s.io/cri-api " ver
			print "// pkg/apis/runtime/v1/api.proto (sha256 " sha "),"
			print "// with gogoproto imports and options removed. Do not edit: rerun gen.sh."
			noted = 1
		}
	' "$proto" >"$result/proto/api.proto"
fi
grep -q -e "gogoproto\." -e "gogo\.proto" "$result/proto/api.proto" && { echo "gen.sh: gogoproto left in $proto after filtering" >&2; exit 1; }

# protoc < 22 (Debian 12 has 3.21) does not know the field option `debug_redact`, which
# api.proto puts on AuthConfig's secrets; prost ignores it anyway. protoc reads a copy without it,
# and the crate redacts those fields in its own Debug impl instead (skip_debug in gen/src/main.rs).
mkdir -p "$work/protoc-input" "$work/out"
sed -e 's/ \[debug_redact = true\]//' "$result/proto/api.proto" >"$work/protoc-input/api.proto"
redacted=$(grep -c 'debug_redact = true' "$result/proto/api.proto" || true)
if [ "$(awk '/^message AuthConfig \{/,/^\}/' "$result/proto/api.proto" | grep -c 'debug_redact = true')" != "$redacted" ]; then
	echo "gen.sh: debug_redact is used outside AuthConfig now: extend skip_debug and src/redact.rs" >&2
	exit 1
fi

# The generator builds in the workspace's (git-ignored) target directory, under a folder of its
# own, so a rerun or --check does not compile it again.
CARGO_TARGET_DIR=${CRI_API_GEN_TARGET_DIR:-$here/../../target/cri-api-gen} \
	cargo run -q --locked --manifest-path "$here/gen/Cargo.toml" -- \
	"$work/protoc-input/api.proto" "$work/out"

{
	printf '// @generated by crates/cri-api/gen.sh (tonic-prost-build %s) from k8s.io/cri-api %s\n' \
		"$tonic_version" "$cri_api_version"
	printf '// pkg/apis/runtime/v1/api.proto, vendored as proto/api.proto. Do not edit: rerun gen.sh.\n\n'
	cat "$work/out/runtime.v1.rs"
} >"$result/src/runtime_v1.rs"
{
	printf '// @generated by crates/cri-api/gen.sh (pbjson-build %s) from k8s.io/cri-api %s\n' \
		"$pbjson_version" "$cri_api_version"
	printf '// pkg/apis/runtime/v1/api.proto, vendored as proto/api.proto. Do not edit: rerun gen.sh.\n\n'
	cat "$work/out/runtime.v1.serde.rs"
} >"$result/src/runtime_v1.serde.rs"

files=(proto/api.proto src/runtime_v1.rs src/runtime_v1.serde.rs)
if [ "$check" = 1 ]; then
	stale=0
	for f in "${files[@]}"; do
		if ! diff -u --label "committed crates/cri-api/$f" --label "generated crates/cri-api/$f" \
			"$here/$f" "$result/$f" >"$work/diff" 2>&1; then
			stale=1
			head -n 200 "$work/diff" >&2
		fi
	done
	if [ "$stale" = 1 ]; then
		echo "gen.sh --check: the committed files differ from what gen.sh generates (diff above): rerun crates/cri-api/gen.sh and commit" >&2
		exit 1
	fi
	echo "gen.sh --check: ${files[*]} are up to date"
else
	for f in "${files[@]}"; do
		cp "$result/$f" "$here/$f"
	done
	echo "wrote ${files[*]/#/$here/}"
fi
