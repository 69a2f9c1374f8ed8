#!/usr/bin/env bash
# Lay out youki's libcontainer and libcgroups as the workspace builds them: each crate from
# crates.io (pinned by version and sha256, cached in $PODSNAP_CACHE/src) with its patch series
# (libcontainer-patches/*.patch, libcgroups-patches/*.patch) applied in order, at
# third_party/<crate> (ignored by git; the workspace Cargo.toml's [patch.crates-io] points
# there). A patch that no longer applies fails, naming it.
#
# Each tree is laid out again in a temporary directory on every run and compared with the one in
# place: identical, it is left alone (cargo keeps its build); made from other patches, it is
# replaced; edited by hand (same patches, other content), the run fails, because such an edit
# would be lost: put it in a patch (see libcontainer-patches/README.md). hack/install.sh runs
# this, so the README's two commands and CI always build the patched crates.
#
#   hack/libcontainer.sh                    lay out third_party/libcontainer and
#                                           third_party/libcgroups (cheap when up to date)
#   hack/libcontainer.sh --base DIR [CRATE] only lay out the pristine CRATE (libcontainer, the
#                                           default, or libcgroups) in DIR, as a git repository
#                                           with one commit, to edit its series there (git am -3)
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"

# The crates, their versions and the sha256 of their .crate files as published.
declare -A VERSION=([libcontainer]=0.7.0 [libcgroups]=0.7.0)
declare -A SHA256=(
	[libcontainer]=2c28770cf8fb3acca0d168a10f5d9f8333d304af0b2ff5654029822d222d19f0
	[libcgroups]=d85e8f0bca12f0d04fdd8f14858022018cd1667b4f971d6b09058fe90323e19d
)
STAMP=.podsnap-patches

base="" base_crate=libcontainer
case ${1:-} in
"") ;;
--base)
	base=${2:?--base needs a directory}
	base_crate=${3:-libcontainer}
	[ -n "${VERSION[$base_crate]:-}" ] || die "unknown crate $base_crate (libcontainer or libcgroups)"
	;;
*) die "unknown argument $1 (see the header of $0)" ;;
esac

# crate_path NAME: where the crate's file is cached.
crate_path() { echo "$PODSNAP_CACHE/src/$1-${VERSION[$1]}.crate"; }

# fetch_crate NAME: the crate's file, downloaded once (or taken from cargo's cache) and checked
# every time.
fetch_crate() {
	local name=$1 version=${VERSION[$1]} sha256=${SHA256[$1]} crate cached
	local url=https://static.crates.io/crates/$name/$name-$version.crate
	crate=$(crate_path "$name")
	mkdir -p "$PODSNAP_CACHE/src"
	if [ ! -f "$crate" ]; then
		cached=$(find "$HOME/.cargo/registry/cache" -name "$name-$version.crate" 2>/dev/null | head -1 || true)
		if [ -n "$cached" ]; then
			cp "$cached" "$crate.part"
		else
			curl -fsSL --retry 3 -o "$crate.part" "$url" || die "download $url failed"
		fi
		mv "$crate.part" "$crate"
	fi
	echo "$sha256  $crate" | sha256sum --check --quiet - ||
		die "$crate is not $name $version as published (sha256 $sha256): remove it and rerun"
}

# pristine CRATE_FILE DIR: the crate's files in DIR, without cargo's bookkeeping.
pristine() {
	mkdir -p "$2"
	tar -xzf "$1" -C "$2" --strip-components=1
	rm -f "$2/.cargo_vcs_info.json" "$2/Cargo.toml.orig" "$2/Cargo.lock"
}

if [ -n "$base" ]; then
	[ ! -e "$base" ] || die "$base exists: give a new directory"
	fetch_crate "$base_crate"
	pristine "$(crate_path "$base_crate")" "$base"
	git -C "$base" init -q
	git -C "$base" add -A
	git -C "$base" -c user.name=podsnap -c user.email=podsnap@localhost commit -q \
		-m "$base_crate ${VERSION[$base_crate]} from crates.io"
	log "pristine $base_crate ${VERSION[$base_crate]} in $base: apply the series with git am -3 $PODSNAP_ROOT/$base_crate-patches/*.patch"
	exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/podsnap-youki.XXXXXX")
trap 'rm -rf "$work"' EXIT

# lay_out NAME: third_party/NAME, the crate with NAME-patches/*.patch applied.
lay_out() {
	local name=$1 patches=$PODSNAP_ROOT/$1-patches target=$PODSNAP_ROOT/third_party/$1
	local inputs patch series
	fetch_crate "$name"
	shopt -s nullglob
	series=("$patches"/*.patch)
	shopt -u nullglob
	[ ${#series[@]} -gt 0 ] || die "no patches in $patches"
	inputs=$( (echo "${SHA256[$name]}" && cat "${series[@]}") | sha256sum | cut -c1-16)

	pristine "$(crate_path "$name")" "$work/$name"
	for patch in "${series[@]}"; do
		git -C "$work/$name" apply --whitespace=nowarn "$patch" ||
			die "$(basename "$patch") no longer applies to $name ${VERSION[$name]} (see libcontainer-patches/README.md)"
	done
	echo "$inputs" >"$work/$name/$STAMP"

	if [ -d "$target" ] && diff -r -q "$work/$name" "$target" >/dev/null 2>&1; then
		return 0
	fi
	if [ -d "$target" ] && [ "$(cat "$target/$STAMP" 2>/dev/null || true)" = "$inputs" ]; then
		diff -r -u "$work/$name" "$target" | head -40 >&2 || true
		die "$target was edited by hand (above): move the change into a patch in $patches, or remove $target to lay it out again"
	fi
	rm -rf "$target"
	mkdir -p "$(dirname "$target")"
	mv "$work/$name" "$target"
	log "$name ${VERSION[$name]} with ${#series[@]} patches laid out in $target"
}

lay_out libcontainer
lay_out libcgroups
