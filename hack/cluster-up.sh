#!/usr/bin/env bash
# Bring up a single-node Kubernetes cluster on this machine: the test node (node-up.sh), then
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the patched kubelet
# (kubelet-patches/, feature gates PodLevelCheckpointRestore and PodCheckpointEndpoint) with podsnapd as its CRI endpoint, a
# `podsnap` RuntimeClass, and an admin kubeconfig at $ADMIN_KUBECONFIG. Binaries are built from
# the Go module proxy and cached (kube-build.sh). Idempotent. Stop it with hack/cluster-down.sh.
#
# hack/cluster-up.sh --podsnap-controller: (re)start only podsnap-controller and podsnapd's node agent
# on a cluster that is up (after a rebuild, or to restart it mid-operation in a test).
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=hack/node-lib.sh
. "$(dirname "$0")/node-lib.sh"
# shellcheck source=hack/cluster-lib.sh
. "$(dirname "$0")/cluster-lib.sh"
require_root

# cert NAME CN ORG [SAN]: a key and a certificate signed by the cluster CA.
cert() {
	local name=$1 cn=$2 org=$3 san=${4:-} subj want ext
	subj="/CN=$cn"
	[ -z "$org" ] || subj="/O=$org$subj"
	# Kept while its subject is still the one wanted (a changed identity gets a new one).
	want="subject=CN=$cn${org:+,O=$org}"
	if [ -f "$CLUSTER_PKI/$name.crt" ] &&
		[ "$(openssl x509 -noout -subject -nameopt RFC2253 -in "$CLUSTER_PKI/$name.crt" 2>/dev/null)" = "$want" ]; then
		return 0
	fi
	ext=$(mktemp)
	{
		echo "basicConstraints=CA:FALSE"
		echo "keyUsage=critical,digitalSignature,keyEncipherment"
		echo "extendedKeyUsage=serverAuth,clientAuth"
		[ -z "$san" ] || echo "subjectAltName=$san"
	} >"$ext"
	openssl genrsa -out "$CLUSTER_PKI/$name.key" 2048 2>/dev/null
	openssl req -new -key "$CLUSTER_PKI/$name.key" -subj "$subj" -out "$CLUSTER_PKI/$name.csr" 2>/dev/null
	openssl x509 -req -in "$CLUSTER_PKI/$name.csr" -CA "$CLUSTER_PKI/ca.crt" -CAkey "$CLUSTER_PKI/ca.key" \
		-CAcreateserial -days 365 -extfile "$ext" -out "$CLUSTER_PKI/$name.crt" 2>/dev/null
	rm -f "$CLUSTER_PKI/$name.csr" "$ext"
}

# kubeconfig FILE CERT_NAME: a kubeconfig for the apiserver with that client certificate.
kubeconfig() {
	local file=$1 name=$2
	cat >"$file" <<KC
apiVersion: v1
kind: Config
clusters:
- name: podsnap
  cluster:
    server: $APISERVER_URL
    certificate-authority-data: $(base64 -w0 "$CLUSTER_PKI/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 "$CLUSTER_PKI/$name.crt")
    client-key-data: $(base64 -w0 "$CLUSTER_PKI/$name.key")
contexts:
- name: podsnap
  context: {cluster: podsnap, user: $name, namespace: default}
current-context: podsnap
KC
	chmod 0600 "$file"
}

make_pki() {
	mkdir -p "$CLUSTER_PKI"
	chmod 0700 "$CLUSTER_LIB" "$CLUSTER_PKI"
	if [ ! -f "$CLUSTER_PKI/ca.crt" ]; then
		openssl genrsa -out "$CLUSTER_PKI/ca.key" 2048 2>/dev/null
		openssl req -x509 -new -key "$CLUSTER_PKI/ca.key" -subj "/CN=podsnap-cluster-ca" -days 3650 \
			-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
			-out "$CLUSTER_PKI/ca.crt" 2>/dev/null
	fi
	cert apiserver kube-apiserver "" "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
	cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
	cert admin podsnap-admin system:masters
	cert controller-manager system:kube-controller-manager ""
	cert scheduler system:kube-scheduler ""
	cert podsnap-controller podsnap-controller ""
	# Its node is in its name: the podsnap-node-agent admission policy (deploy/rbac.yaml) holds
	# it to checkpoints on this node.
	cert podsnap-node-agent "podsnap:node-agent:$NODE_NAME" podsnap:node-agents
	cert kubelet "system:node:$NODE_NAME" system:nodes
	cert "kubelet-serving-$NODE_IP" "$NODE_NAME" "" "IP:$NODE_IP,IP:127.0.0.1,DNS:$NODE_NAME,DNS:localhost"
	if [ ! -f "$CLUSTER_PKI/sa.key" ]; then
		openssl genrsa -out "$CLUSTER_PKI/sa.key" 2048 2>/dev/null
		openssl rsa -in "$CLUSTER_PKI/sa.key" -pubout -out "$CLUSTER_PKI/sa.pub" 2>/dev/null
	fi
	chmod 0600 "$CLUSTER_PKI"/*.key
	kubeconfig "$ADMIN_KUBECONFIG" admin
	kubeconfig "$CLUSTER_LIB/controller-manager.kubeconfig" controller-manager
	kubeconfig "$CLUSTER_LIB/scheduler.kubeconfig" scheduler
	kubeconfig "$CLUSTER_LIB/podsnap-controller.kubeconfig" podsnap-controller
	kubeconfig "$CLUSTER_LIB/podsnap-node-agent.kubeconfig" podsnap-node-agent
	kubeconfig "$CLUSTER_LIB/kubelet.kubeconfig" kubelet
}

# start NAME CMD...: run a component in its own session, logging to its log, pid in its pid file.
start() {
	local name=$1 pidfile
	shift
	pidfile=$(component_pidfile "$name")
	if pid_running "$pidfile" "$(component_exe "$name")" >/dev/null; then
		log "$name is already running (pid $(cat "$pidfile"))"
		return 0
	fi
	setsid "$@" </dev/null >>"$(component_log "$name")" 2>&1 &
	echo $! >"$pidfile"
	log "started $name (pid $!)"
}

# wait_for COMPONENT WHAT SECONDS CMD...: retry CMD until it succeeds; fail at once, with the end
# of its log, when the component has exited.
# component_alive NAME: whether the component started by `start` runs (or is about to: setsid
# has not exec'd it yet).
component_alive() {
	local pidfile pid exe
	pidfile=$(component_pidfile "$1")
	pid_running "$pidfile" "$(component_exe "$1")" >/dev/null && return 0
	pid=$(cat "$pidfile" 2>/dev/null) || return 1
	exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
	[ "${exe##*/}" = setsid ]
}

wait_for() {
	local component=$1 what=$2 seconds=$3 i
	shift 3
	for ((i = 0; i < seconds * 2; i++)); do
		"$@" >/dev/null 2>&1 && return 0
		if ! component_alive "$component"; then
			tail -5 "$(component_log "$component")" >&2 || true
			die "$component exited before $what was ready (log: $(component_log "$component"))"
		fi
		sleep 0.5
	done
	die "$what is not ready after ${seconds}s (log: $(component_log "$component"))"
}

check_ports() {
	local port owner
	for port in "$APISERVER_PORT" "$ETCD_CLIENT_PORT" "$ETCD_PEER_PORT" "$KUBELET_PORT" "$PODSNAP_CONTROLLER_METRICS_PORT"; do
		owner=$(port_owner "$port")
		[ -z "$owner" ] && continue
		# Ours when a component of ours listens there.
		local ours=0 c
		for c in "${CLUSTER_COMPONENTS[@]}"; do
			[ "$(pid_running "$(component_pidfile "$c")" "$(component_exe "$c")" 2>/dev/null)" = "$owner" ] && ours=1
		done
		[ "$ours" = 1 ] || die "TCP port $port is taken by pid $owner: stop it or set PODSNAP_APISERVER_PORT/PODSNAP_ETCD_PORT/PODSNAP_CONTROLLER_METRICS_PORT"
	done
}

start_etcd() {
	mkdir -p "$CLUSTER_ETCD_DATA"
	chmod 0700 "$CLUSTER_ETCD_DATA"
	start etcd "$KUBE_BIN/etcd" --name podsnap --data-dir "$CLUSTER_ETCD_DATA" \
		--listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
		--listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-cluster "podsnap=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls "" \
		--quota-backend-bytes 2147483648 --unsafe-no-fsync
	wait_for etcd etcd 30 curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_CLIENT_PORT/health"
}

start_apiserver() {
	start kube-apiserver "$KUBE_BIN/kube-apiserver" \
		--etcd-servers "http://127.0.0.1:$ETCD_CLIENT_PORT" \
		--bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
		--tls-cert-file "$CLUSTER_PKI/apiserver.crt" --tls-private-key-file "$CLUSTER_PKI/apiserver.key" \
		--client-ca-file "$CLUSTER_PKI/ca.crt" \
		--kubelet-client-certificate "$CLUSTER_PKI/apiserver-kubelet-client.crt" \
		--kubelet-client-key "$CLUSTER_PKI/apiserver-kubelet-client.key" \
		--kubelet-preferred-address-types InternalIP \
		--service-account-issuer https://kubernetes.default.svc.cluster.local \
		--service-account-key-file "$CLUSTER_PKI/sa.pub" \
		--service-account-signing-key-file "$CLUSTER_PKI/sa.key" \
		--service-cluster-ip-range "$SERVICE_CIDR" \
		--authorization-mode Node,RBAC \
		--enable-admission-plugins NodeRestriction \
		--allow-privileged=true \
		--endpoint-reconciler-type none \
		--profiling=false
	wait_for kube-apiserver kube-apiserver 90 cluster_kubectl get --raw /readyz
}

start_controllers() {
	start kube-controller-manager "$KUBE_BIN/kube-controller-manager" \
		--kubeconfig "$CLUSTER_LIB/controller-manager.kubeconfig" \
		--authentication-kubeconfig "$CLUSTER_LIB/controller-manager.kubeconfig" \
		--authorization-kubeconfig "$CLUSTER_LIB/controller-manager.kubeconfig" \
		--bind-address 127.0.0.1 --secure-port 10257 \
		--root-ca-file "$CLUSTER_PKI/ca.crt" \
		--service-account-private-key-file "$CLUSTER_PKI/sa.key" \
		--cluster-signing-cert-file "$CLUSTER_PKI/ca.crt" --cluster-signing-key-file "$CLUSTER_PKI/ca.key" \
		--use-service-account-credentials=true \
		--leader-elect=false
	start kube-scheduler "$KUBE_BIN/kube-scheduler" \
		--kubeconfig "$CLUSTER_LIB/scheduler.kubeconfig" \
		--authentication-kubeconfig "$CLUSTER_LIB/scheduler.kubeconfig" \
		--authorization-kubeconfig "$CLUSTER_LIB/scheduler.kubeconfig" \
		--bind-address 127.0.0.1 --secure-port 10259 --leader-elect=false
}

write_kubelet_config() {
	cat >"$CLUSTER_LIB/kubelet-config.yaml" <<KC
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $CLUSTER_PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $CLUSTER_PKI/kubelet-serving-$NODE_IP.crt
tlsPrivateKeyFile: $CLUSTER_PKI/kubelet-serving-$NODE_IP.key
containerRuntimeEndpoint: unix://$PODSNAPD_SOCK
imageServiceEndpoint: unix://$PODSNAPD_SOCK
runtimeRequestTimeout: 5m
cgroupDriver: cgroupfs
cgroupRoot: $KUBELET_CGROUP_ROOT
failCgroupV1: false
failSwapOn: false
podLogsDir: $KUBELET_POD_LOGS
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
# PodCheckpointEndpoint: the admin's POST /checkpointpod (the tests and the README use it).
featureGates:
  PodLevelCheckpointRestore: true
  PodCheckpointEndpoint: true
KC
}

# The kubelet's cgroupRoot must exist in every hierarchy; a new cpuset needs its parent's CPUs and
# memory nodes before anything can join it.
make_cgroup_root() {
	local hierarchy dir f
	for hierarchy in /sys/fs/cgroup/*/; do
		[ -f "${hierarchy}cgroup.procs" ] || continue
		dir=${hierarchy%/}$KUBELET_CGROUP_ROOT
		mkdir -p "$dir"
		for f in cpuset.cpus cpuset.mems; do
			if [ -f "$dir/$f" ] && [ -z "$(cat "$dir/$f")" ]; then
				cat "${hierarchy}$f" >"$dir/$f"
			fi
		done
	done
}

start_kubelet() {
	make_cgroup_root
	mkdir -p "$KUBELET_ROOT" "$KUBELET_POD_LOGS"
	chmod 0700 "$KUBELET_ROOT"
	write_kubelet_config
	start kubelet "$KUBE_BIN/kubelet" --config "$CLUSTER_LIB/kubelet-config.yaml" \
		--kubeconfig "$CLUSTER_LIB/kubelet.kubeconfig" --root-dir "$KUBELET_ROOT" \
		--hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --v 2
	wait_for kubelet "node $NODE_NAME" 120 node_ready
}

node_ready() {
	[ "$(cluster_kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

apply_defaults() {
	cluster_kubectl apply -f - >/dev/null <<'YAML'
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata:
  name: podsnap
handler: podsnap
YAML
	# The default service account exists once the controller manager has made it.
	wait_for kube-controller-manager "the default service account" 60 cluster_kubectl -n default get serviceaccount default
	# The PodCheckpoint/PodRestore API, its RBAC, and the controller.
	cluster_kubectl apply -f "$PODSNAP_ROOT/deploy/crds/" >/dev/null
	cluster_kubectl apply -f "$PODSNAP_ROOT/deploy/rbac.yaml" >/dev/null
	wait_for kube-apiserver "the checkpoint.k8s.io CRDs" 60 cluster_kubectl wait --for condition=Established --timeout 5s \
		crd/podcheckpoints.checkpoint.k8s.io crd/podrestores.checkpoint.k8s.io crd/podmigrations.checkpoint.k8s.io
}

start_podsnap_controller() {
	if [ ! -x "$PODSNAP_CONTROLLER_BINARY" ]; then
		log "warning: $PODSNAP_CONTROLLER_BINARY is not built: no podsnap-controller (cargo build -p podsnap-controller)"
		return 0
	fi
	# A rebuilt controller replaces the running one.
	stop_pidfile "$(component_pidfile podsnap-controller)" podsnap-controller 10
	stop_node_agent
	start podsnap-controller "$PODSNAP_CONTROLLER_BINARY" --kubeconfig "$CLUSTER_LIB/podsnap-controller.kubeconfig" \
		--keep-last "${PODSNAP_KEEP_LAST:-3}" --metrics-bind-address "127.0.0.1:$PODSNAP_CONTROLLER_METRICS_PORT"
	wait_for podsnap-controller "its /healthz" 30 http_ok 127.0.0.1 "$PODSNAP_CONTROLLER_METRICS_PORT" /healthz
	# podsnapd's node agent removes deleted checkpoints' data on this node (deletion policy Delete).
	[ -x "$PODSNAPD_BINARY" ] || die "$PODSNAPD_BINARY is not built (cargo build -p podsnapd)"
	start podsnap-node-agent "$PODSNAPD_BINARY" node-agent --kubeconfig "$CLUSTER_LIB/podsnap-node-agent.kubeconfig" \
		--node "$NODE_NAME" --checkpoints-dir "$KUBELET_ROOT/pod-checkpoints"
}

# http_ok HOST PORT PATH: whether GET http://HOST:PORT/PATH answers 200 (bash's /dev/tcp).
http_ok() {
	local reply
	exec 3<>"/dev/tcp/$1/$2" || return 1
	printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$3" "$1" >&3
	IFS= read -r -t 5 reply <&3 || true
	exec 3<&- 3>&-
	[[ $reply == "HTTP/1."?" 200"* ]]
}

main() {
	if [ "${1:-}" = --podsnap-controller ]; then
		[ -f "$CLUSTER_LIB/podsnap-controller.kubeconfig" ] || die "the cluster is not up (hack/cluster-up.sh)"
		start_podsnap_controller
		return
	fi
	[ $# -eq 0 ] || die "usage: hack/cluster-up.sh [--podsnap-controller]"
	local t0
	t0=$(date +%s)
	KUBE_BIN=$(kube_bin)
	export KUBE_BIN
	NODE_IP=$(node_ip)
	[ -n "$NODE_IP" ] || die "cannot tell this machine's IPv4 address (no default route): set PODSNAP_NODE_IP"
	"$PODSNAP_ROOT/hack/node-up.sh"
	[ -S "$PODSNAPD_SOCK" ] || die "podsnapd is not running on $PODSNAPD_SOCK: build it (cargo build -p podsnapd) and rerun"
	mkdir -p "$CLUSTER_RUN" "$CLUSTER_LIB"
	echo "$KUBE_BIN" >"$CLUSTER_RUN/kube-bin"
	check_ports
	make_pki
	start_etcd
	start_apiserver
	start_controllers
	start_kubelet
	apply_defaults
	start_podsnap_controller
	log "cluster up in $(($(date +%s) - t0))s: export KUBECONFIG=$ADMIN_KUBECONFIG; kubectl is $KUBE_BIN/kubectl"
}
main "$@"
