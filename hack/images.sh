#!/usr/bin/env bash
# Build every image critest (cri-tools v1.37.0) and the demo pull, and push them to the node's
# local registry ($PODSNAP_REGISTRY, started here when it is not running). Images are built by
# hack/mkimage.py from the static busybox hack/install.sh builds; see its header for the list and
# for what happens to critest's digest-pinned image. Tags already in the registry with the current recipe are
# skipped, so a rerun takes about a second.
#
# Usage: hack/images.sh [--force] [--list]
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=hack/node-lib.sh
. "$(dirname "$0")/node-lib.sh"

if [ "${1:-}" = --list ]; then
	exec python3 "$PODSNAP_ROOT/hack/mkimage.py" --list
fi
require_root
# The images have no libc: their busybox must be static (ldd fails on static binaries).
busybox=$PODSNAP_BIN/busybox
if [ ! -x "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
	die "$busybox is missing or not static: run hack/install.sh"
fi
mkdir -p "$PODSNAP_NODE_RUN"
registry_up
changed=$(mktemp)
trap 'rm -f "$changed"' EXIT
python3 "$PODSNAP_ROOT/hack/mkimage.py" --registry "$PODSNAP_REGISTRY" --busybox "$busybox" --changed "$changed" "$@"
# A running node may hold an older build of a rebuilt image: drop it, the next use pulls anew.
if [ -s "$changed" ] && containerd_answers; then
	while read -r ref; do
		node_crictl rmi "$ref" >/dev/null 2>&1 && log "removed the node's old copy of $ref"
	done <"$changed"
fi
exit 0
