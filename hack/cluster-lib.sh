# shellcheck shell=bash
# shellcheck disable=SC2034 # the layout variables are used by the scripts that source this
# The single-node Kubernetes cluster's layout and helpers, shared by cluster-up.sh,
# cluster-down.sh, demo.sh and the e2e tests' harness. Sourced after lib.sh and node-lib.sh.
#
# The cluster runs on the test node (node-up.sh: containerd with podsnap, CNI, podsnapd): etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler and the patched kubelet, whose runtime
# endpoint is podsnapd. Every process has a pid file here and is stopped through it only; all
# state is under $CLUSTER_LIB and $CLUSTER_RUN.

CLUSTER_RUN=${PODSNAP_CLUSTER_RUN:-/run/podsnap-cluster}
CLUSTER_LIB=${PODSNAP_CLUSTER_LIB:-/var/lib/podsnap-cluster}
CLUSTER_PKI=$CLUSTER_LIB/pki
CLUSTER_ETCD_DATA=$CLUSTER_LIB/etcd
# The kubelet's --root-dir: pod volumes, and pod checkpoints under pod-checkpoints/.
KUBELET_ROOT=$CLUSTER_LIB/kubelet
KUBELET_POD_LOGS=/var/log/podsnap-cluster/pods
# Every pod's cgroups go below this cgroup (kubelet's cgroupRoot), in each hierarchy.
KUBELET_CGROUP_ROOT=/podsnap-cluster
NODE_NAME=${PODSNAP_NODE_NAME:-podsnap-node}
# The node's InternalIP, where the apiserver reaches the kubelet (a kubelet refuses a loopback
# node IP): the source address of the default route unless PODSNAP_NODE_IP says otherwise.
node_ip() {
	if [ -n "${PODSNAP_NODE_IP:-}" ]; then
		echo "$PODSNAP_NODE_IP"
		return
	fi
	ip -4 route get 1.1.1.1 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "src") {print $(i + 1); exit}}'
}
APISERVER_PORT=${PODSNAP_APISERVER_PORT:-16443}
APISERVER_URL=https://127.0.0.1:$APISERVER_PORT
ETCD_CLIENT_PORT=${PODSNAP_ETCD_PORT:-23790}
ETCD_PEER_PORT=$((ETCD_CLIENT_PORT + 10))
KUBELET_PORT=10250
SERVICE_CIDR=10.96.0.0/16
# The cluster administrator's kubeconfig.
ADMIN_KUBECONFIG=$CLUSTER_LIB/admin.kubeconfig
CLUSTER_COMPONENTS=(podsnap-controller podsnap-node-agent kubelet kube-scheduler kube-controller-manager kube-apiserver etcd)
# podsnap-controller (crates/controller), run beside the cluster with its own client certificate.
PODSNAP_CONTROLLER_BINARY=${PODSNAP_CONTROLLER_BINARY:-$PODSNAP_ROOT/target/debug/podsnap-controller}
# Its Prometheus metrics: http://127.0.0.1:$PODSNAP_CONTROLLER_METRICS_PORT/metrics.
PODSNAP_CONTROLLER_METRICS_PORT=${PODSNAP_CONTROLLER_METRICS_PORT:-16480}

# kube_bin: the directory of the patched Kubernetes binaries (built, cached, by kube-build.sh).
kube_bin() {
	local bin
	bin=$("$PODSNAP_ROOT/hack/kube-build.sh") || die "building Kubernetes failed"
	echo "$bin"
}

cluster_kubectl() { "$KUBE_BIN/kubectl" --kubeconfig "$ADMIN_KUBECONFIG" "$@"; }

component_pidfile() { echo "$CLUSTER_RUN/$1.pid"; }
# component_exe NAME: the executable's name of a component (the node agent is podsnapd run as
# `podsnapd node-agent`).
component_exe() { if [ "$1" = podsnap-node-agent ]; then echo podsnapd; else echo "$1"; fi; }

# stop_node_agent: stop podsnapd's node agent (also one an older cluster-up started as
# `podsnap-controller node-agent`).
stop_node_agent() {
	local pidfile
	pidfile=$(component_pidfile podsnap-node-agent)
	if pid_running "$pidfile" podsnap-controller >/dev/null; then
		stop_pidfile "$pidfile" podsnap-controller 10
	fi
	stop_pidfile "$pidfile" podsnapd 10
}
component_log() { echo "$CLUSTER_RUN/$1.log"; }
