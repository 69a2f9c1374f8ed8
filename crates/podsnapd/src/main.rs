//! `podsnapd`: command line, logging and signals around [`podsnapd::run`] (the CRI server) and
//! `podsnapd node-agent` ([`podsnap_node_agent`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use cri_api::{RuntimeServiceClient, unix_channel};
use podsnapd::pod::PodCheckpointService;
use podsnapd::{DEFAULT_CONTAINERD, DEFAULT_LISTEN, ServerConfig};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// The CRI server of podsnap: serves CheckpointPod and RestorePod, forwards every other CRI call
/// to containerd. Point kubelet's --container-runtime-endpoint and --image-service-endpoint (or
/// crictl's) at --listen. Logging: RUST_LOG (default info).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// The unix socket to serve CRI on (created mode 0600).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_LISTEN)]
    listen: PathBuf,
    /// containerd's CRI socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTAINERD)]
    containerd: PathBuf,
    /// Seconds that calls in flight may still run after SIGTERM or SIGINT.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    shutdown_grace: u64,
}

#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// Run this node's agent instead of the CRI server: remove the node-local data of deleted
    /// PodCheckpoints whose deletion policy is Delete (the `checkpoint.k8s.io/node-data`
    /// finalizer), then that finalizer; push checkpoints stored as images; pull them for
    /// restores on this node.
    NodeAgent {
        /// A kubeconfig; $KUBECONFIG or the in-cluster configuration when not given.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// This node's name, as PodCheckpoints' status.nodeName gives it.
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// The kubelet's pod checkpoint directory (<root-dir>/pod-checkpoints).
        #[arg(long, default_value = "/var/lib/kubelet/pod-checkpoints")]
        checkpoints_dir: PathBuf,
        /// podsnapd's pins of checkpoint manifests.
        #[arg(long, default_value = podsnap_checkpoint_format::pins::PIN_DIR)]
        pins_dir: PathBuf,
        /// A registry (host:port) reached over plain HTTP instead of HTTPS (repeat for several,
        /// or separate with commas).
        #[arg(
            long = "insecure-registry",
            value_name = "HOST:PORT",
            value_delimiter = ',',
            env = "PODSNAP_INSECURE_REGISTRIES"
        )]
        insecure: Vec<String>,
        /// A Docker config file (a kubernetes.io/dockerconfigjson Secret's payload) with
        /// registry credentials; anonymous where it has none.
        #[arg(long, value_name = "FILE")]
        auth_file: Option<PathBuf>,
        /// PEM certificates of authorities trusted for HTTPS registries besides the system's
        /// (a registry with a private CA); none where it does not exist.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// An age identity file (`podsnap keygen`; a Secret's key) with the private keys that
        /// open encrypted checkpoint images pulled here; none where it does not exist.
        #[arg(long, value_name = "FILE")]
        identity_file: Option<PathBuf>,
        /// The most bytes one pulled checkpoint may unpack to.
        #[arg(long, value_name = "BYTES", default_value_t = 64 << 30)]
        max_pull_size: u64,
        /// Seconds a pulled checkpoint no pod on this node names is kept.
        #[arg(long, value_name = "SECONDS", default_value_t = 600)]
        pulled_ttl: u64,
        /// The namespace of the controller's copies of PodCheckpoints' registry credentials
        /// (podsnap's own, in `deploy/`).
        #[arg(long, env = "POD_NAMESPACE", default_value = podsnap_node_agent::SYSTEM_NAMESPACE)]
        credentials_namespace: String,
    },
}

/// kubelet's CRI message size limit: ListContainers on a busy node exceeds tonic's 4 MiB.
const MAX_MESSAGE_SIZE: usize = 16 << 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(Mode::NodeAgent {
        kubeconfig,
        node,
        checkpoints_dir,
        pins_dir,
        insecure,
        auth_file,
        ca_file,
        identity_file,
        max_pull_size,
        pulled_ttl,
        credentials_namespace,
    }) = args.mode
    {
        anyhow::ensure!(!node.is_empty(), "--node is empty");
        for dir in [&checkpoints_dir, &pins_dir] {
            anyhow::ensure!(
                dir.is_absolute(),
                "{} is not an absolute path",
                dir.display()
            );
        }
        let client = podsnap_node_agent::client(kubeconfig.as_deref()).await?;
        let agent = podsnap_node_agent::Agent {
            client,
            node,
            checkpoints_dir,
            pins_dir,
            registry: podsnap_node_agent::RegistryConfig {
                insecure: insecure.into_iter().filter(|r| !r.is_empty()).collect(),
                auth_file,
                ca_file,
                identity_file,
            },
            max_pull_bytes: max_pull_size,
            pulled_ttl: Duration::from_secs(pulled_ttl),
            credentials_namespace,
        };
        return node_agent(agent).await;
    }

    let containerd = RuntimeServiceClient::new(unix_channel(&args.containerd))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    tokio::spawn(report_containerd(
        containerd.clone(),
        args.containerd.clone(),
    ));
    let checkpointer = Arc::new(PodCheckpointService::new(containerd));

    let config = ServerConfig {
        listen: args.listen,
        containerd: args.containerd,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
    };
    let shutdown = shutdown_signal().context("installing signal handlers")?;
    podsnapd::run(&config, checkpointer, shutdown)
        .await
        .context("serving CRI")?;
    tracing::info!("podsnapd stopped");
    Ok(())
}

/// `podsnapd node-agent`: runs until SIGTERM or SIGINT.
async fn node_agent(agent: podsnap_node_agent::Agent) -> anyhow::Result<()> {
    tracing::info!(
        node = %agent.node,
        dir = %agent.checkpoints_dir.display(),
        insecure = ?agent.registry.insecure,
        "podsnapd node agent started"
    );
    let shutdown = shutdown_signal().context("installing signal handlers")?;
    tokio::select! {
        _ = podsnap_node_agent::run(agent) => {}
        _ = shutdown => {}
    }
    tracing::info!("podsnapd node agent stopped");
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
    })
}

/// Logs which containerd answers behind podsnapd, or that none does yet (calls then fail with
/// Unavailable until it is up; podsnapd keeps serving).
async fn report_containerd(
    mut containerd: RuntimeServiceClient<tonic::transport::Channel>,
    socket: PathBuf,
) {
    let mut request = tonic::Request::new(cri_api::v1::VersionRequest::default());
    request.set_timeout(Duration::from_secs(10));
    match containerd.version(request).await {
        Ok(version) => {
            let version = version.into_inner();
            tracing::info!(
                socket = %socket.display(),
                runtime = %version.runtime_name,
                version = %version.runtime_version,
                cri = %version.runtime_api_version,
                "containerd CRI is up"
            );
        }
        Err(status) => tracing::warn!(
            socket = %socket.display(),
            code = ?status.code(),
            message = status.message(),
            "containerd CRI does not answer yet"
        ),
    }
}
