//! `podsnap`, the podsnap CLI: pod checkpoint and restore through a CRI runtime endpoint
//! (podsnapd's socket by default). Installed as `kubectl-podsnap` (a symlink to this binary on
//! the PATH) it is also the kubectl plugin `kubectl podsnap ...`, with the same arguments; it
//! then still talks CRI on the node it runs on, not to the API server.
//!
//! This module owns the command line and error reporting; the commands are `checkpoint` and
//! `restore`, the CRI JSON configs `config`, the calls and deadlines `cri`.

mod checkpoint;
mod config;
mod cri;
mod duration;
mod error;
mod options;
mod restore;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use cri_api::CriEndpoint;

use crate::checkpoint::CheckpointPod;
use crate::duration::parse_duration;
use crate::restore::RestorePod;

/// Checkpoint and restore Kubernetes pods on this node (CRI CheckpointPod / RestorePod).
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
    /// Pod checkpoint and restore.
    #[command(subcommand)]
    Pod(PodCommand),
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
        /// Start every restored container afterwards (StartContainer), as kubelet would.
        #[arg(long)]
        start: bool,
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
    let endpoint = cli.runtime_endpoint;
    let context = format!("runtime endpoint {endpoint}");
    let result = match cli.command {
        Command::Pod(PodCommand::Checkpoint {
            sandbox_id,
            output_dir,
            containers,
            options,
            timeout,
        }) => {
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
        Command::Pod(PodCommand::Restore {
            checkpoint_dir,
            pod_config,
            container_configs,
            runtime_handler,
            options,
            timeout,
            start,
        }) => {
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
