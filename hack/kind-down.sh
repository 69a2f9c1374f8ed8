#!/usr/bin/env bash
# Remove podsnap's kind cluster: its nodes (and their /var volumes), its registry container, and
# the kind network when nothing else is on it. Only what hack/kind-up.sh made, by name or label;
# another kind cluster on this host is left alone.
#
# Usage: hack/kind-down.sh [--images]   --images: also remove the images hack/kind-image.sh built
#                                       ($KIND_NODE_IMAGE_REPO:*, $KIND_IMAGE_REPO/*) and the
#                                       registry's storage.
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=hack/kind-lib.sh
. "$(dirname "$0")/kind-lib.sh"
require_root

images=0
case "${1:-}" in
"") ;;
--images) images=1 ;;
*) die "usage: hack/kind-down.sh [--images]" ;;
esac
command -v podman >/dev/null || {
	log "no podman here: no kind cluster to remove"
	exit 0
}
podman_config

# kind labels each node's /var volume with the node's name.
nodes=$(kind_nodes)
if [ -x "$KIND_BIN" ] && "$KIND_BIN" get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER"; then
	step kind-delete "$KIND_BIN" delete cluster --name "$KIND_CLUSTER" --kubeconfig "$KIND_RUN/kubeconfig"
fi
# Nodes kind could not remove (a half-made cluster), by kind's cluster label, with their volumes.
for node in $(kind_nodes); do
	podman rm -f -v "$node" >/dev/null
done
for node in $nodes; do
	for volume in $(podman volume ls -q --filter "label=$node=true" 2>/dev/null); do
		podman volume rm -f "$volume" >/dev/null
	done
done
for registry in "$KIND_REGISTRY_NAME" "$KIND_PRIVATE_REGISTRY_NAME"; do
	if has_label container "$registry"; then
		podman rm -f "$registry" >/dev/null
	fi
done
# The kind network only when kind-up.sh made it and nothing else is on it.
if has_label network "$KIND_NETWORK" && [ -z "$(podman ps -a --filter "network=$KIND_NETWORK" -q)" ]; then
	podman network rm "$KIND_NETWORK" >/dev/null
fi
if [ -f "$KIND_LIB_MODULES_MARK" ]; then
	rmdir /lib/modules 2>/dev/null || true
	rm -f "$KIND_LIB_MODULES_MARK"
fi
rm -rf "$KIND_RUN"
# Nothing of ours may be left: say what if something is.
left=$(
	kind_nodes
	for registry in "$KIND_REGISTRY_NAME" "$KIND_PRIVATE_REGISTRY_NAME"; do
		has_label container "$registry" && echo "$registry"
	done
	for node in $nodes; do podman volume ls -q --filter "label=$node=true"; done
)
[ -z "$left" ] || die "left behind after removing kind cluster $KIND_CLUSTER: $(echo "$left" | tr '\n' ' ')"
if [ "$images" = 1 ]; then
	for image in $(podman images --format '{{.Repository}}:{{.Tag}}' | grep -E "^($KIND_NODE_IMAGE_REPO:|$KIND_IMAGE_REPO/)"); do
		podman rmi -f "$image" >/dev/null
	done
	rm -rf "$KIND_REGISTRY_STORAGE"
fi
log "kind cluster $KIND_CLUSTER removed"
