#!/usr/bin/env bash
# Build every image critest (cri-tools v1.37.0) and the demo pull, and push them to the node's
# local registry ($PODSNAP_REGISTRY, started here when it is not running). Images are built by
# hack/mkimage.py from Debian's static busybox; see its header for the list and for what happens
# to critest's digest-pinned image. Tags already in the registry with the current recipe are
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
# The images have no libc: their busybox must be the static one (ldd fails on static binaries).
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
	die "/bin/busybox is not Debian's static busybox: run hack/install.sh (package busybox-static)"
fi
mkdir -p "$PODSNAP_NODE_RUN"
registry_up
python3 "$PODSNAP_ROOT/hack/mkimage.py" --registry "$PODSNAP_REGISTRY" --busybox /bin/busybox "$@"
