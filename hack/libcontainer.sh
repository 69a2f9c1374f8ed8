#!/usr/bin/env bash
# Lay out youki's libcontainer as the workspace builds it: the crate from crates.io (pinned by
# version and sha256, cached in $PODSNAP_CACHE/src) with libcontainer-patches/*.patch applied in
# order, at third_party/libcontainer (ignored by git; the workspace Cargo.toml's
# [patch.crates-io] points there). A patch that no longer applies fails, naming it.
#
# The tree is laid out again in a temporary directory on every run and compared with the one in
# place: identical, it is left alone (cargo keeps its build); made from other patches, it is
# replaced; edited by hand (same patches, other content), the run fails, because such an edit
# would be lost: put it in a patch (see libcontainer-patches/README.md). hack/install.sh runs
# this, so the README's two commands and CI always build the patched crate.
#
#   hack/libcontainer.sh             lay out third_party/libcontainer (cheap when up to date)
#   hack/libcontainer.sh --base DIR  only lay out the pristine crate in DIR, as a git repository
#                                    with one commit, to edit the series there (git am -3)
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"

VERSION=0.7.0
SHA256=2c28770cf8fb3acca0d168a10f5d9f8333d304af0b2ff5654029822d222d19f0
CRATE_URL=https://static.crates.io/crates/libcontainer/libcontainer-$VERSION.crate
PATCHES=$PODSNAP_ROOT/libcontainer-patches
TARGET=$PODSNAP_ROOT/third_party/libcontainer
STAMP=.podsnap-patches

base=""
case ${1:-} in
"") ;;
--base)
	base=${2:?--base needs a directory}
	;;
*) die "unknown argument $1 (see the header of $0)" ;;
esac

# The crate file, downloaded once and checked every time.
crate=$PODSNAP_CACHE/src/libcontainer-$VERSION.crate
mkdir -p "$PODSNAP_CACHE/src"
if [ ! -f "$crate" ]; then
	cached=$(find "$HOME/.cargo/registry/cache" -name "libcontainer-$VERSION.crate" 2>/dev/null | head -1 || true)
	if [ -n "$cached" ]; then
		cp "$cached" "$crate.part"
	else
		curl -fsSL --retry 3 -o "$crate.part" "$CRATE_URL" || die "download $CRATE_URL failed"
	fi
	mv "$crate.part" "$crate"
fi
echo "$SHA256  $crate" | sha256sum --check --quiet - ||
	die "$crate is not libcontainer $VERSION as published (sha256 $SHA256): remove it and rerun"

# pristine DIR: the crate's files in DIR, without cargo's bookkeeping.
pristine() {
	mkdir -p "$1"
	tar -xzf "$crate" -C "$1" --strip-components=1
	rm -f "$1/.cargo_vcs_info.json" "$1/Cargo.toml.orig" "$1/Cargo.lock"
}

if [ -n "$base" ]; then
	[ ! -e "$base" ] || die "$base exists: give a new directory"
	pristine "$base"
	git -C "$base" init -q
	git -C "$base" add -A
	git -C "$base" -c user.name=podsnap -c user.email=podsnap@localhost commit -q -m "libcontainer $VERSION from crates.io"
	log "pristine libcontainer $VERSION in $base: apply the series with git am -3 $PATCHES/*.patch"
	exit 0
fi

shopt -s nullglob
series=("$PATCHES"/*.patch)
[ ${#series[@]} -gt 0 ] || die "no patches in $PATCHES"
inputs=$( (echo "$SHA256" && cat "${series[@]}") | sha256sum | cut -c1-16)

work=$(mktemp -d "${TMPDIR:-/tmp}/podsnap-libcontainer.XXXXXX")
trap 'rm -rf "$work"' EXIT
pristine "$work/tree"
for patch in "${series[@]}"; do
	git -C "$work/tree" apply --whitespace=nowarn "$patch" ||
		die "$(basename "$patch") no longer applies to libcontainer $VERSION (see libcontainer-patches/README.md)"
done
echo "$inputs" >"$work/tree/$STAMP"

if [ -d "$TARGET" ] && diff -r -q "$work/tree" "$TARGET" >/dev/null 2>&1; then
	exit 0
fi
if [ -d "$TARGET" ] && [ "$(cat "$TARGET/$STAMP" 2>/dev/null || true)" = "$inputs" ]; then
	diff -r -u "$work/tree" "$TARGET" | head -40 >&2 || true
	die "$TARGET was edited by hand (above): move the change into a patch in $PATCHES, or remove $TARGET to lay it out again"
fi
rm -rf "$TARGET"
mkdir -p "$(dirname "$TARGET")"
mv "$work/tree" "$TARGET"
log "libcontainer $VERSION with ${#series[@]} patches laid out in $TARGET"
