//! `podsnap pod checkpoint`: checkpoint a running pod into a directory through CRI
//! `CheckpointPod`, capturing the containers named on the command line or else every running
//! container of the pod.
//!
//! The output directory is the caller's, as CRI says: it is created when missing (mode 0700),
//! must be empty, and is removed again only if this command created it and the call failed.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cri_api::v1::{
    CheckpointPodRequest, ContainerFilter, ContainerState, ContainerStateValue,
    ListContainersRequest, PodSandboxStatusRequest,
};
use cri_api::{CriEndpoint, RuntimeServiceClient};
use tonic::transport::Channel;

use crate::cri::{LOOKUP_TIMEOUT, answer, runtime_client, with_timeout};
use crate::error::CliError;
use crate::options::parse_options;

/// What to checkpoint, as the command line says.
#[derive(Debug)]
pub struct CheckpointPod {
    pub sandbox_id: String,
    pub output_dir: PathBuf,
    pub containers: Vec<String>,
    pub options: Vec<String>,
    pub timeout: Duration,
}

/// Runs the command: progress on stderr, nothing on stdout.
pub async fn checkpoint_pod(
    endpoint: &CriEndpoint,
    command: CheckpointPod,
) -> Result<(), CliError> {
    let options = parse_options(&command.options)?;
    let output_dir = std::path::absolute(&command.output_dir)
        .map_err(CliError::io("resolving", &command.output_dir))?;
    let mut runtime = runtime_client(endpoint);

    let status = answer(
        "PodSandboxStatus",
        LOOKUP_TIMEOUT,
        runtime.pod_sandbox_status(with_timeout(
            PodSandboxStatusRequest {
                pod_sandbox_id: command.sandbox_id.clone(),
                verbose: false,
            },
            LOOKUP_TIMEOUT,
        )),
    )
    .await?
    .status
    .ok_or_else(|| {
        CliError::Usage(format!(
            "the runtime sent no status for pod {}",
            command.sandbox_id
        ))
    })?;
    let sandbox_id = status.id;
    let pod_name = status
        .metadata
        .map(|metadata| format!("{}/{}", metadata.namespace, metadata.name))
        .unwrap_or_else(|| sandbox_id.clone());

    let containers = if command.containers.is_empty() {
        running_containers(&mut runtime, &sandbox_id).await?
    } else {
        command.containers
    };
    if containers.is_empty() {
        return Err(CliError::Usage(format!(
            "pod {pod_name} ({sandbox_id}) has no running containers to checkpoint"
        )));
    }

    let created = prepare_output_dir(&output_dir)?;
    eprint!(
        "checkpointing pod {pod_name} ({}, {} container{}) into {} ... ",
        short_id(&sandbox_id),
        containers.len(),
        if containers.len() == 1 { "" } else { "s" },
        output_dir.display()
    );
    let started = Instant::now();
    let request = CheckpointPodRequest {
        pod_sandbox_id: sandbox_id,
        output_path: output_dir.to_string_lossy().into_owned(),
        container_ids: containers,
        options,
    };
    let result = answer(
        "CheckpointPod",
        command.timeout,
        runtime.checkpoint_pod(with_timeout(request, command.timeout)),
    )
    .await;
    match result {
        Ok(_) => {
            eprintln!("done in {:.1}s", started.elapsed().as_secs_f64());
            Ok(())
        }
        Err(err) => {
            eprintln!("failed after {:.1}s", started.elapsed().as_secs_f64());
            if created {
                // Only an empty directory goes: the runtime removes its partial output itself.
                let _ = std::fs::remove_dir(&output_dir);
            }
            Err(err)
        }
    }
}

/// The IDs of the pod's running containers.
async fn running_containers(
    runtime: &mut RuntimeServiceClient<Channel>,
    sandbox_id: &str,
) -> Result<Vec<String>, CliError> {
    let filter = ContainerFilter {
        pod_sandbox_id: sandbox_id.to_string(),
        state: Some(ContainerStateValue {
            state: ContainerState::ContainerRunning.into(),
        }),
        ..Default::default()
    };
    let listed = answer(
        "ListContainers",
        LOOKUP_TIMEOUT,
        runtime.list_containers(with_timeout(
            ListContainersRequest {
                filter: Some(filter),
            },
            LOOKUP_TIMEOUT,
        )),
    )
    .await?;
    Ok(listed
        .containers
        .into_iter()
        .map(|container| container.id)
        .collect())
}

/// Makes sure `dir` is an empty directory; returns whether it was created here.
fn prepare_output_dir(dir: &Path) -> Result<bool, CliError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(CliError::Usage(format!(
                    "output directory {} is not empty",
                    dir.display()
                )));
            }
            Ok(false)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(CliError::io("creating output directory", dir))?;
            Ok(true)
        }
        Err(err) => Err(CliError::io("reading output directory", dir)(err)),
    }
}

/// The first 13 characters of an ID, as crictl shows them.
pub fn short_id(id: &str) -> &str {
    id.get(..13).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_dir_is_created_0700_or_must_be_empty() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("checkpoint");
        assert!(prepare_output_dir(&out).unwrap(), "created");
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(!prepare_output_dir(&out).unwrap(), "existing and empty");
        std::fs::write(out.join("stray"), b"x").unwrap();
        let err = prepare_output_dir(&out).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
        let err = prepare_output_dir(&dir.path().join("no/such/parent"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("creating output directory"), "{err}");
    }

    #[test]
    fn short_ids_are_crictl_length() {
        assert_eq!(short_id("0123456789abcdef0123"), "0123456789abc");
        assert_eq!(short_id("abc"), "abc");
    }
}
