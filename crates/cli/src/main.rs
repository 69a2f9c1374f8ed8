//! `podsnap`, the podsnap CLI. Installed as `kubectl-podsnap` (a symlink to this binary on the
//! PATH) it is also the kubectl plugin `kubectl podsnap ...`, with the same arguments.
//!
//! `checkpoint`, `restore`, `list`, `inspect` and `delete` work on PodCheckpoint / PodRestore
//! objects through the API server (`kube_cmd`); `pod checkpoint` / `pod restore` talk CRI to a
//! runtime endpoint on this node (podsnapd's socket by default), without Kubernetes;
//! `pod push` / `pod pull` move a checkpoint directory to and from an OCI registry (`transfer`).
//!
//! This module owns the command line and error reporting; the CRI commands are `checkpoint` and
//! `restore`, the CRI JSON configs `config`, the calls and deadlines `cri`.

mod checkpoint;
mod config;
mod cri;
mod duration;
mod error;
#[cfg(test)]
mod fake_api;
mod kube_cmd;
mod migrate;
mod options;
mod restore;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use cri_api::CriEndpoint;

use crate::checkpoint::CheckpointPod;
use crate::duration::parse_duration;
use crate::restore::RestorePod;

/// Checkpoint and restore Kubernetes pods: PodCheckpoint / PodRestore through the API server, or
/// CRI CheckpointPod / RestorePod on this node (`pod ...`).
///
/// Also usable as the kubectl plugin `kubectl podsnap`: symlink this binary as
/// `kubectl-podsnap` somewhere on the PATH.
#[derive(Debug, Parser)]
#[command(name = "podsnap", version)]
struct Cli {
    /// CRI endpoint of the runtime (podsnapd).
    #[arg(
        long,
        global = true,
        env = "CONTAINER_RUNTIME_ENDPOINT",
        default_value = "unix:///run/podsnap-node/podsnapd.sock",
        value_parser = parse_endpoint
    )]
    runtime_endpoint: CriEndpoint,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checkpoint a pod: create a PodCheckpoint and wait until it is Ready (or Failed).
    Checkpoint {
        /// The pod to checkpoint.
        pod: String,
        #[command(flatten)]
        namespace: Namespace,
        /// The PodCheckpoint's name (default: <pod>-<time>).
        #[arg(long)]
        name: Option<String>,
        /// How long the checkpoint itself may take, in seconds (the runtime's default if unset).
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(i32).range(1..=3600))]
        timeout_seconds: Option<i32>,
        /// What deleting the PodCheckpoint does to its data: Retain or Delete.
        #[arg(long, value_parser = ["Retain", "Delete"])]
        deletion_policy: Option<String>,
        /// Also push the checkpoint to this registry repository (registry/path, no tag) as an
        /// OCI image, so that it can be restored on any node (storage type Image).
        #[arg(long, value_name = "REGISTRY/REPOSITORY")]
        image: Option<String>,
        /// Encrypt the image to this age public key (age1…; repeat for several): only nodes
        /// holding a matching private key can restore it.
        #[arg(long, value_name = "AGE_PUBLIC_KEY", requires = "image")]
        encrypt_to: Vec<String>,
        /// Push (and pull) with the credentials of this Secret of the namespace (type
        /// kubernetes.io/dockerconfigjson), its entry for the image's registry.
        #[arg(long, value_name = "SECRET", requires = "image")]
        registry_secret: Option<String>,
        /// How long to wait for the outcome.
        #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = parse_duration)]
        wait: Duration,
    },
    /// Restore pods from a PodCheckpoint: create a PodRestore and wait until it is Completed.
    Restore {
        /// The PodCheckpoint to restore.
        checkpoint: String,
        #[command(flatten)]
        namespace: Namespace,
        /// How many independent pods to restore (warm start).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=100))]
        replicas: Option<i32>,
        /// The restored pod's name, for a single pod (suspend/resume under the same name).
        #[arg(long)]
        pod_name: Option<String>,
        /// The PodRestore's name (default: <checkpoint>-restore-<time>).
        #[arg(long)]
        name: Option<String>,
        /// The node to restore on (a checkpoint stored as an image: any node; unset, the
        /// scheduler places the pods).
        #[arg(long)]
        node: Option<String>,
        /// Restore lazily: the pods run while their memory streams in.
        #[arg(long)]
        lazy: bool,
        /// How long to wait for the outcome.
        #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = parse_duration)]
        wait: Duration,
    },
    /// List the PodCheckpoints of a namespace.
    List {
        #[command(flatten)]
        namespace: Namespace,
    },
    /// Show a PodCheckpoint: status, and on its node the checkpoint's containers, sizes, CRIU
    /// and kernel versions.
    Inspect {
        checkpoint: String,
        #[command(flatten)]
        namespace: Namespace,
        /// The kubelet's checkpoint root on this machine (`<root-dir>/pod-checkpoints`), which
        /// the PodCheckpoint's location is relative to.
        #[arg(
            long,
            env = "PODSNAP_CHECKPOINTS_DIR",
            default_value = "/var/lib/kubelet/pod-checkpoints"
        )]
        checkpoints_dir: std::path::PathBuf,
    },
    /// Delete a PodCheckpoint.
    Delete {
        checkpoint: String,
        #[command(flatten)]
        namespace: Namespace,
    },
    /// Move a running pod to another node through a checkpoint image: PodCheckpoint (pushed),
    /// PodRestore on the target, then the source pod deleted once the restored one runs (it gets
    /// a new name, <pod>-m-<time>). Any failure deletes what was created; the source runs on.
    Migrate {
        /// The pod to move.
        pod: String,
        #[command(flatten)]
        namespace: Namespace,
        #[command(flatten)]
        options: migrate::MigrateOptions,
    },
    /// Cordon a node and migrate every running podsnap pod on it (all namespaces) elsewhere,
    /// one after another; other pods are left to `kubectl drain`.
    Drain {
        /// The node to drain.
        node: String,
        #[command(flatten)]
        options: migrate::MigrateOptions,
    },
    /// Make a key pair for encrypted checkpoint images: the private key (an age identity
    /// file) to FILE (0600) or stdout, the public key (age1…, for --encrypt-to) to stderr.
    Keygen {
        /// Where the private key goes (it must not exist).
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Pod checkpoint and restore over CRI on this node (no Kubernetes).
    #[command(subcommand)]
    Pod(PodCommand),
}

/// The namespace of a Kubernetes command.
#[derive(Debug, clap::Args)]
struct Namespace {
    /// The namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long = "namespace")]
    namespace: Option<String>,
}

#[derive(Debug, Subcommand)]
enum PodCommand {
    /// Checkpoint a running pod into a directory (created if missing; must be empty).
    Checkpoint {
        /// The pod sandbox's ID (as `crictl pods` shows it; a unique prefix will do).
        sandbox_id: String,
        /// Where the checkpoint goes.
        output_dir: PathBuf,
        /// A container to include (repeat for several); default: every running container.
        #[arg(long = "container", value_name = "ID")]
        containers: Vec<String>,
        /// A runtime option key=value (repeat for several), e.g. podsnap.io/... keys.
        #[arg(long = "option", value_name = "KEY=VALUE")]
        options: Vec<String>,
        /// Deadline of the whole checkpoint (e.g. 120s, 2m, 1m30s).
        #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Restore a pod from a checkpoint directory into a new sandbox (containers CREATED).
    Restore {
        /// The checkpoint directory.
        checkpoint_dir: PathBuf,
        /// The pod sandbox config, in the JSON `crictl runp` takes.
        #[arg(long, value_name = "FILE")]
        pod_config: PathBuf,
        /// A container config, in the JSON `crictl create` takes; one per checkpointed container.
        #[arg(long = "container-config", value_name = "FILE", required = true)]
        container_configs: Vec<PathBuf>,
        /// The runtime handler (RuntimeClass handler) that restores the pod.
        #[arg(long, value_name = "HANDLER", default_value = "podsnap")]
        runtime_handler: String,
        /// A runtime option key=value (repeat for several).
        #[arg(long = "option", value_name = "KEY=VALUE")]
        options: Vec<String>,
        /// Deadline of the restore (e.g. 120s, 2m).
        #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
        timeout: Duration,
        /// Start every restored container afterwards (StartContainer, all at once).
        #[arg(long)]
        start: bool,
    },
    /// Push a pod checkpoint directory to an OCI registry as a podsnap checkpoint artifact;
    /// prints it by digest.
    Push {
        /// The checkpoint directory (it must verify).
        checkpoint_dir: PathBuf,
        /// Where it goes: registry/repository[:tag].
        reference: String,
        #[command(flatten)]
        registry: transfer::RegistryArgs,
        /// zstd level of the layers.
        #[arg(long, default_value_t = podsnap_checkpoint_image::DEFAULT_LEVEL)]
        level: i32,
        /// A file remembering the layers pushed, so a second push sends only what changed.
        #[arg(long, value_name = "FILE")]
        layer_cache: Option<PathBuf>,
        /// Encrypt the image to this age public key (repeat for several).
        #[arg(long, value_name = "AGE_PUBLIC_KEY")]
        encrypt_to: Vec<String>,
    },
    /// Pull a podsnap checkpoint artifact into a new directory, every blob and file verified;
    /// prints its digest.
    Pull {
        /// registry/repository:tag or registry/repository@sha256:...
        reference: String,
        /// The checkpoint directory to create (it must not exist).
        checkpoint_dir: PathBuf,
        #[command(flatten)]
        registry: transfer::RegistryArgs,
        /// The most bytes of files the checkpoint may unpack to.
        #[arg(long, value_name = "BYTES", default_value_t = 256 << 30)]
        max_size: u64,
        /// An age identity file (podsnap keygen) opening an encrypted image.
        #[arg(long, value_name = "FILE")]
        identity_file: Option<PathBuf>,
    },
}

fn parse_endpoint(text: &str) -> Result<CriEndpoint, String> {
    text.parse()
        .map_err(|err: cri_api::EndpointError| err.to_string())
}

/// The name to show in help and errors: `kubectl podsnap` when run as the kubectl plugin.
fn invoked_as() -> String {
    let argv0 = std::env::args_os().next().map(PathBuf::from);
    match argv0.as_deref().and_then(|path| path.file_name()) {
        Some(name) if name == "kubectl-podsnap" => "kubectl podsnap".into(),
        _ => "podsnap".into(),
    }
}

fn main() -> ExitCode {
    let name = invoked_as();
    let matches = Cli::command().bin_name(&name).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{name}: error: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{name}: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let pod_command = match cli.command {
        Command::Checkpoint {
            pod,
            namespace,
            name,
            timeout_seconds,
            deletion_policy,
            image,
            encrypt_to,
            registry_secret,
            wait,
        } => {
            let target = kube_cmd::Target::new(namespace.namespace).await?;
            let options = kube_cmd::CheckpointOptions {
                name,
                timeout_seconds,
                deletion_policy,
                image,
                encrypt_to,
                registry_secret,
                source_pod_uid: None,
            };
            return kube_cmd::checkpoint(&target, &pod, options, wait).await;
        }
        Command::Restore {
            checkpoint,
            namespace,
            replicas,
            pod_name,
            name,
            node,
            lazy,
            wait,
        } => {
            let target = kube_cmd::Target::new(namespace.namespace).await?;
            let options = kube_cmd::RestoreOptions {
                replicas,
                pod_name,
                name,
                node,
                lazy,
            };
            return kube_cmd::restore(&target, &checkpoint, options, wait).await;
        }
        Command::List { namespace } => {
            let target = kube_cmd::Target::new(namespace.namespace).await?;
            return kube_cmd::list(&target).await;
        }
        Command::Inspect {
            checkpoint,
            namespace,
            checkpoints_dir,
        } => {
            let target = kube_cmd::Target::new(namespace.namespace).await?;
            return kube_cmd::inspect(&target, &checkpoint, &checkpoints_dir).await;
        }
        Command::Delete {
            checkpoint,
            namespace,
        } => {
            let target = kube_cmd::Target::new(namespace.namespace).await?;
            return kube_cmd::delete(&target, &checkpoint).await;
        }
        Command::Migrate {
            pod,
            namespace,
            options,
        } => {
            let target = kube_cmd::Target::new(namespace.namespace).await?;
            return migrate::migrate(&target, &pod, &options).await;
        }
        Command::Drain { node, options } => {
            let target = kube_cmd::Target::new(None).await?;
            return migrate::drain(target.client, &node, &options).await;
        }
        Command::Keygen { output } => return transfer::keygen(output.as_deref()),
        Command::Pod(command) => command,
    };
    let endpoint = cli.runtime_endpoint;
    let context = format!("runtime endpoint {endpoint}");
    let result = match pod_command {
        PodCommand::Push {
            checkpoint_dir,
            reference,
            registry,
            level,
            layer_cache,
            encrypt_to,
        } => {
            let options = transfer::PushArgs {
                level,
                layer_cache,
                encrypt_to,
            };
            return transfer::push(&checkpoint_dir, &reference, &registry, options).await;
        }
        PodCommand::Pull {
            reference,
            checkpoint_dir,
            registry,
            max_size,
            identity_file,
        } => {
            return transfer::pull(
                &reference,
                &checkpoint_dir,
                &registry,
                max_size,
                identity_file.as_deref(),
            )
            .await;
        }
        PodCommand::Checkpoint {
            sandbox_id,
            output_dir,
            containers,
            options,
            timeout,
        } => {
            checkpoint::checkpoint_pod(
                &endpoint,
                CheckpointPod {
                    sandbox_id,
                    output_dir,
                    containers,
                    options,
                    timeout,
                },
            )
            .await
        }
        PodCommand::Restore {
            checkpoint_dir,
            pod_config,
            container_configs,
            runtime_handler,
            options,
            timeout,
            start,
        } => {
            restore::restore_pod(
                &endpoint,
                RestorePod {
                    checkpoint_dir,
                    pod_config,
                    container_configs,
                    runtime_handler,
                    options,
                    timeout,
                    start,
                },
            )
            .await
        }
    };
    result.map_err(|err| {
        let context = if err.unreachable() {
            format!("{context} (is podsnapd running there? --runtime-endpoint or CONTAINER_RUNTIME_ENDPOINT chooses another)")
        } else {
            context
        };
        let from_runtime = err.involves_runtime();
        let err = anyhow::Error::new(err);
        if from_runtime { err.context(context) } else { err }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn push_and_pull_take_registry_flags_and_defaults() {
        let cli = Cli::try_parse_from([
            "podsnap",
            "pod",
            "push",
            "/cp",
            "reg:5000/a/b:1",
            "--insecure-registry",
            "reg:5000",
        ])
        .unwrap();
        let Command::Pod(PodCommand::Push {
            checkpoint_dir,
            reference,
            registry,
            level,
            layer_cache,
            ..
        }) = cli.command
        else {
            panic!("not push");
        };
        assert_eq!(checkpoint_dir, PathBuf::from("/cp"));
        assert_eq!(reference, "reg:5000/a/b:1");
        assert_eq!(registry.insecure, ["reg:5000"]);
        assert_eq!(level, podsnap_checkpoint_image::DEFAULT_LEVEL);
        assert!(layer_cache.is_none());
        let cli =
            Cli::try_parse_from(["podsnap", "pod", "pull", "reg/a@sha256:00", "/cp"]).unwrap();
        let Command::Pod(PodCommand::Pull { max_size, .. }) = cli.command else {
            panic!("not pull");
        };
        assert_eq!(max_size, 256 << 30);
        assert!(Cli::try_parse_from(["podsnap", "pod", "pull", "reg/a:1"]).is_err());
    }

    #[test]
    fn checkpoint_flags_parse_repeated_and_with_defaults() {
        let cli = Cli::try_parse_from([
            "podsnap",
            "pod",
            "checkpoint",
            "abc",
            "/tmp/out",
            "--container",
            "c1",
            "--container",
            "c2",
            "--option",
            "podsnap.io/x=1",
            "--timeout",
            "1m30s",
        ])
        .unwrap();
        let Command::Pod(PodCommand::Checkpoint {
            sandbox_id,
            containers,
            options,
            timeout,
            ..
        }) = cli.command
        else {
            panic!("not checkpoint");
        };
        assert_eq!(sandbox_id, "abc");
        assert_eq!(containers, ["c1", "c2"]);
        assert_eq!(options, ["podsnap.io/x=1"]);
        assert_eq!(timeout, Duration::from_secs(90));
    }

    #[test]
    fn restore_needs_a_container_config_and_defaults_to_the_podsnap_handler() {
        assert!(
            Cli::try_parse_from(["podsnap", "pod", "restore", "/cp", "--pod-config", "p.json"])
                .is_err()
        );
        let cli = Cli::try_parse_from([
            "podsnap",
            "--runtime-endpoint",
            "unix:///tmp/x.sock",
            "pod",
            "restore",
            "/cp",
            "--pod-config",
            "p.json",
            "--container-config",
            "a.json",
            "--container-config",
            "b.json",
            "--start",
        ])
        .unwrap();
        assert_eq!(
            cli.runtime_endpoint.socket(),
            std::path::Path::new("/tmp/x.sock")
        );
        let Command::Pod(PodCommand::Restore {
            container_configs,
            runtime_handler,
            start,
            timeout,
            ..
        }) = cli.command
        else {
            panic!("not restore");
        };
        assert_eq!(container_configs.len(), 2);
        assert_eq!(runtime_handler, "podsnap");
        assert!(start);
        assert_eq!(timeout, Duration::from_secs(120));
    }

    #[test]
    fn bad_endpoint_and_timeout_are_usage_errors() {
        assert!(
            Cli::try_parse_from([
                "podsnap",
                "--runtime-endpoint",
                "tcp://x:1",
                "pod",
                "checkpoint",
                "a",
                "/o"
            ])
            .is_err()
        );
        assert!(
            Cli::try_parse_from([
                "podsnap",
                "pod",
                "checkpoint",
                "a",
                "/o",
                "--timeout",
                "soon"
            ])
            .is_err()
        );
    }
}
