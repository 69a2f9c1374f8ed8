#!/usr/bin/env bash
# Bring up podsnap's kind cluster, offline: kind (built from the Go module proxy) with its podman
# provider, nodes from the podsnap node image (hack/kind-image.sh node), a registry container on
# the kind network that every node pulls from, pod networking (a bridge per node on its podCIDR,
# routes between nodes), and podsnap deployed from deploy/ as a user deploys it (kubectl apply -k,
# the controller as a Deployment, podsnapd's node agent as a DaemonSet). CRIU is checked in every
# node before anything runs. The admin kubeconfig is written to $KIND_KUBECONFIG.
#
# Usage: hack/kind-up.sh [--nodes N]   N nodes: one control plane and N-1 workers (default 3; with
#                                      1 the control plane runs pods too). Idempotent: a cluster
#                                      that is up with N nodes is left as it is (podsnap's
#                                      deployment is brought up to date).
# Stop it with hack/kind-down.sh.
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=hack/kind-lib.sh
. "$(dirname "$0")/kind-lib.sh"
require_root

NODES=3
while [ $# -gt 0 ]; do
	case "$1" in
	--nodes)
		[ $# -ge 2 ] || die "usage: hack/kind-up.sh [--nodes N]"
		NODES=$2
		shift 2
		;;
	*) die "usage: hack/kind-up.sh [--nodes N]" ;;
	esac
done
[[ $NODES =~ ^[1-9]$ ]] || die "--nodes wants a number of nodes from 1 to 9, not '$NODES'"

# Each node holds a kubelet, containerd, podsnapd and its pods' checkpoints; the control plane
# etcd and the API server besides.
MIN_DISK_GIB=$((10 + 3 * NODES))
MIN_MEM_GIB=$((2 + NODES))

check_host() {
	local avail_gib mem_gib
	kind_check_podman
	avail_gib=$(($(df --output=avail -k /var/lib/containers 2>/dev/null | tail -1 || df --output=avail -k / | tail -1) / 1024 / 1024))
	[ "$avail_gib" -ge "$MIN_DISK_GIB" ] ||
		die "only ${avail_gib} GiB free for podman's storage (/var/lib/containers): $NODES nodes need ${MIN_DISK_GIB} GiB; free some, or use --nodes $((NODES - 1))"
	mem_gib=$(($(awk '/MemAvailable/ {print $2}' /proc/meminfo) / 1024 / 1024))
	[ "$mem_gib" -ge "$MIN_MEM_GIB" ] ||
		die "only ${mem_gib} GiB of memory available: $NODES nodes need ${MIN_MEM_GIB} GiB; use fewer (--nodes)"
	# kind bind-mounts /lib/modules into every node.
	if [ ! -d /lib/modules ]; then
		mkdir -p /lib/modules "$(dirname "$KIND_LIB_MODULES_MARK")"
		touch "$KIND_LIB_MODULES_MARK"
	fi
}

# cluster_is_up: our cluster exists, answers, and has the nodes asked for.
cluster_is_up() {
	[ -f "$KIND_KUBECONFIG" ] && [ -f "$KIND_RUN/kube-bin" ] || return 1
	[ "$(kind_nodes | wc -l)" -eq "$NODES" ] || return 1
	"$(cat "$KIND_RUN/kube-bin")/kubectl" --kubeconfig "$KIND_KUBECONFIG" get --raw /readyz >/dev/null 2>&1
}

# check_stale: a cluster of our name that is not the one asked for is refused before anything is
# built or changed.
check_stale() {
	local listed
	listed=$(kind_nodes)
	[ -n "$listed" ] || return 0
	cluster_is_up ||
		die "a kind cluster named $KIND_CLUSTER exists but is not the one asked for ($NODES nodes, answering): remove it with hack/kind-down.sh"
}

# check_node_image REF: the nodes of a cluster that is up run REF (a rebuilt shim or podsnapd
# would otherwise go untested without a word).
check_node_image() {
	local node image
	for node in $(kind_nodes); do
		image=$(podman container inspect --format '{{.ImageName}}' "$node")
		[ "$image" = "$1" ] ||
			die "node $node runs $image, not the node image just built ($1): hack/kind-down.sh, then hack/kind-up.sh again"
	done
}

# registry_run NAME STORAGE CONFIG [PODMAN-ARGS...]: the registry container NAME on the kind
# network (docker-registry, storage in STORAGE, configuration file CONFIG), unless it runs.
registry_run() {
	local name=$1 storage=$2 config=$3 image
	shift 3
	if [ "$(podman container inspect --format '{{.State.Running}}' "$name" 2>/dev/null)" = true ]; then
		return 0
	fi
	if podman container exists "$name"; then
		has_label container "$name" ||
			die "a container named $name exists and is not this script's: remove or rename it"
		podman rm -f "$name" >/dev/null
	fi
	image=$("$PODSNAP_ROOT/hack/kind-image.sh" registry)
	podman run -d --name "$name" --network "$KIND_NETWORK" \
		--label "$KIND_LABEL" "$@" \
		--volume "$storage:/var/lib/registry" \
		--volume "$config:/etc/docker/registry/config.yml:ro" \
		"$image" /usr/bin/docker-registry serve /etc/docker/registry/config.yml >/dev/null
}

# private_registry_pki DIR: a CA (ca.crt) and the private registry's certificate it signed
# (server.crt, server.key, for its name on the kind network), made once per cluster.
private_registry_pki() {
	local dir=$1
	[ -s "$dir/server.crt" ] && [ -s "$dir/ca.crt" ] && return 0
	(
		set -e
		cd "$dir"
		umask 077
		openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
			-subj "/CN=podsnap kind registry CA" -keyout ca.key -out ca.crt 2>/dev/null
		openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
			-subj "/CN=$KIND_PRIVATE_REGISTRY_NAME" -keyout server.key -out server.csr 2>/dev/null
		printf 'subjectAltName=DNS:%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' \
			"$KIND_PRIVATE_REGISTRY_NAME" >server.ext
		openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
			-extfile server.ext -out server.crt 2>/dev/null
		chmod 0644 ca.crt server.crt
	) || die "openssl could not make the private registry's certificates in $dir"
}

# The cluster's registry (anonymous, plain HTTP, published on the host), and a private one
# (HTTPS with its own CA, Basic auth for $KIND_PRIVATE_REGISTRY_HTPASSWD's user), for
# PodCheckpoints that name a registry Secret.
registry_up() {
	local private=$KIND_RUN/private-registry
	mkdir -p "$KIND_REGISTRY_STORAGE" "$private/storage"
	podman network exists "$KIND_NETWORK" || podman network create --label "$KIND_LABEL" "$KIND_NETWORK" >/dev/null
	cat >"$KIND_RUN/registry.yml" <<'EOF'
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: /var/lib/registry
http:
  addr: :5000
EOF
	private_registry_pki "$private"
	printf '%s\n' "$KIND_PRIVATE_REGISTRY_HTPASSWD" >"$private/htpasswd"
	cat "$KIND_RUN/registry.yml" - >"$private/registry.yml" <<'EOF'
  tls:
    certificate: /etc/docker/registry/tls/server.crt
    key: /etc/docker/registry/tls/server.key
auth:
  htpasswd:
    realm: podsnap-kind
    path: /etc/docker/registry/htpasswd
EOF
	registry_run "$KIND_REGISTRY_NAME" "$KIND_REGISTRY_STORAGE" "$KIND_RUN/registry.yml" \
		--publish "$KIND_REGISTRY:5000"
	registry_run "$KIND_PRIVATE_REGISTRY_NAME" "$private/storage" "$private/registry.yml" \
		--volume "$private/htpasswd:/etc/docker/registry/htpasswd:ro" \
		--volume "$private/server.crt:/etc/docker/registry/tls/server.crt:ro" \
		--volume "$private/server.key:/etc/docker/registry/tls/server.key:ro"
	wait_for registry "the kind registry on $KIND_REGISTRY" 30 \
		curl -fsS --noproxy '*' -o /dev/null --max-time 2 "http://$KIND_REGISTRY/v2/"
	wait_for registry "$KIND_PRIVATE_REGISTRY_NAME running" 30 \
		test "$(podman container inspect --format '{{.State.Running}}' "$KIND_PRIVATE_REGISTRY_NAME")" = true
}

# wait_for WHAT DESCRIPTION SECONDS CMD...: until CMD succeeds, or die naming it.
wait_for() {
	local what=$1 desc=$2 seconds=$3 i
	shift 3
	for ((i = 0; i < seconds; i++)); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 1
	done
	die "$what: no $desc after ${seconds}s"
}

kind_config() {
	local i
	cat <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  # Pod networking is a bridge per node and routes between nodes (pod_network below): kindnetd's
  # image cannot be pulled here.
  disableDefaultCNI: true
  podSubnet: $KIND_POD_SUBNET
  serviceSubnet: $KIND_SERVICE_SUBNET
kubeadmConfigPatches:
  # The kubelet's CRI endpoint is podsnapd (in front of containerd); no CoreDNS (not built here).
  - |
    kind: InitConfiguration
    nodeRegistration:
      criSocket: unix:///run/podsnap-node/podsnapd.sock
    skipPhases: [preflight, addon/coredns]
  - |
    kind: JoinConfiguration
    nodeRegistration:
      criSocket: unix:///run/podsnap-node/podsnapd.sock
  # cgroup v1 (this host has no other) and cgroupfs, as containerd and the podsnap shim use it.
  - |
    kind: KubeletConfiguration
    cgroupDriver: cgroupfs
    failCgroupV1: false
    runtimeRequestTimeout: 5m
    featureGates:
      PodLevelCheckpointRestore: true
      PodCheckpointEndpoint: true
nodes:
  - role: control-plane
EOF
	for ((i = 1; i < NODES; i++)); do
		echo "  - role: worker"
	done
}

# criu_check: CRIU can checkpoint in every node, before anything runs there.
criu_check() {
	local node out
	for node in $(kind_nodes); do
		out=$(podman exec "$node" criu check 2>&1) ||
			die "criu check fails in node $node: $out"
		log "criu check in $node: $out"
	done
}

# cluster_pki: the cluster's CA and the API server's kubelet client pair, from the control-plane
# node into $KIND_RUN/pki (root's alone), for the tests that sign a client certificate or reach
# a kubelet as the API server does. kind-down removes $KIND_RUN.
cluster_pki() {
	local file
	install -d -m 0700 "$KIND_RUN/pki"
	for file in ca.crt ca.key apiserver-kubelet-client.crt apiserver-kubelet-client.key; do
		podman exec "$KIND_CLUSTER-control-plane" cat "/etc/kubernetes/pki/$file" >"$KIND_RUN/pki/$file.tmp" ||
			die "cannot read /etc/kubernetes/pki/$file in $KIND_CLUSTER-control-plane"
		chmod 0600 "$KIND_RUN/pki/$file.tmp"
		mv "$KIND_RUN/pki/$file.tmp" "$KIND_RUN/pki/$file"
	done
}

# pod_network: each node's podCIDR on a bridge (bridge + host-local through podsnap-ipam, as on
# the host's node: a restore with podsnap.io/keep-ip gets its checkpointed address), and
# a route to every other node's podCIDR through that node's address on the kind network.
pod_network() {
	local node cidr ip other other_cidr other_ip
	for node in $(kind_nodes); do
		cidr=$(kind_kubectl get node "$node" -o jsonpath='{.spec.podCIDR}')
		[ -n "$cidr" ] || die "node $node has no podCIDR (kube-controller-manager allocates them)"
		podman exec -i "$node" sh -c 'mkdir -p /etc/cni/net.d && cat >/etc/cni/net.d/10-podsnap.conflist' <<EOF
{
  "cniVersion": "1.0.0",
  "name": "podsnap",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "podsnap0",
      "isGateway": true,
      "ipMasq": true,
      "promiscMode": true,
      "ipam": {
        "type": "podsnap-ipam",
        "delegate": "host-local",
        "ranges": [[{ "subnet": "$cidr" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
EOF
		for other in $(kind_nodes); do
			[ "$other" != "$node" ] || continue
			other_cidr=$(kind_kubectl get node "$other" -o jsonpath='{.spec.podCIDR}')
			[ -n "$other_cidr" ] || die "node $other has no podCIDR (kube-controller-manager allocates them)"
			other_ip=$(kind_kubectl get node "$other" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
			podman exec "$node" ip route replace "$other_cidr" via "$other_ip"
		done
		ip=$(kind_kubectl get node "$node" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
		log "node $node ($ip): pods on $cidr"
	done
}

# deploy_podsnap CONTROLLER_IMAGE PODSNAPD_IMAGE: deploy/ as a user applies it, with our images.
deploy_podsnap() {
	local overlay=$KIND_RUN/deploy
	rm -rf "$overlay"
	mkdir -p "$overlay"
	cp -r "$PODSNAP_ROOT/deploy/." "$overlay/"
	(cd "$overlay" && "$KUBE_BIN/kubectl" kustomize . >/dev/null) || die "deploy/ does not build with kustomize"
	# Tags quoted: a recipe hash such as 6404969003e0 is a number to YAML.
	cat >>"$overlay/kustomization.yaml" <<EOF
images:
  - name: podsnap/podsnap-controller
    newName: ${1%:*}
    newTag: "${1##*:}"
  - name: podsnap/podsnapd
    newName: ${2%:*}
    newTag: "${2##*:}"
# The node agents push and pull checkpoint images to and from the cluster's registry (plain
# HTTP); the private one is HTTPS, its CA in the ConfigMap podsnap-registry-ca.
patches:
  - target:
      kind: ConfigMap
      name: podsnap-node-agent
    patch: |-
      - op: replace
        path: /data/insecure-registries
        value: "$KIND_REGISTRY_NAME:5000"
EOF
	# The private registry's CA, there before the agents start (they mount it, optional).
	kind_kubectl create namespace podsnap-system --dry-run=client -o yaml | kind_kubectl apply -f - >/dev/null
	kind_kubectl -n podsnap-system create configmap podsnap-registry-ca \
		--from-file=ca.crt="$KIND_RUN/private-registry/ca.crt" --dry-run=client -o yaml |
		kind_kubectl apply -f - >/dev/null
	# The CRDs first: the rest names their kinds.
	kind_kubectl apply -f "$overlay/crds/" >/dev/null
	kind_kubectl wait --for condition=Established --timeout 60s \
		crd/podcheckpoints.checkpoint.k8s.io crd/podrestores.checkpoint.k8s.io crd/podmigrations.checkpoint.k8s.io >/dev/null
	kind_kubectl apply -k "$overlay" >/dev/null
	kind_kubectl -n podsnap-system rollout status deployment/podsnap-controller --timeout 180s >&2
	kind_kubectl -n podsnap-system rollout status daemonset/podsnap-node-agent --timeout 180s >&2
}

main() {
	local node_image images controller_image podsnapd_image config
	kind_check_podman
	podman_config
	check_stale
	check_host
	KUBE_BIN=$(kind_kube_bin)
	mkdir -p "$KIND_RUN"
	echo "$KUBE_BIN" >"$KIND_RUN/kube-bin"
	step kind-build build_kind
	step kind-registry registry_up
	node_image=$(step kind-node-image "$PODSNAP_ROOT/hack/kind-image.sh" node)
	images=$(step kind-images "$PODSNAP_ROOT/hack/kind-image.sh" push)
	controller_image=$(sed -n 's/^podsnap-controller=//p' <<<"$images")
	podsnapd_image=$(sed -n 's/^podsnapd=//p' <<<"$images")
	if ! cluster_is_up; then
		config=$KIND_RUN/kind.yaml
		kind_config >"$config"
		step kind-create kind_cli create cluster --name "$KIND_CLUSTER" --image "$node_image" \
			--config "$config" --kubeconfig "$KIND_KUBECONFIG" ${PODSNAP_KIND_RETAIN:+--retain}
		chmod 0600 "$KIND_KUBECONFIG"
	else
		check_node_image "$node_image"
		log "kind cluster $KIND_CLUSTER is up ($NODES nodes, node image $node_image)"
	fi
	step criu-check criu_check
	step cluster-pki cluster_pki
	step pod-network pod_network
	wait_for kubelet "Ready nodes" 180 kind_kubectl wait --for condition=Ready --timeout 5s node --all
	step deploy-podsnap deploy_podsnap "$controller_image" "$podsnapd_image"
	log "kind cluster $KIND_CLUSTER up: export KUBECONFIG=$KIND_KUBECONFIG"
	kind_kubectl get nodes -o wide >&2
}
main
