//! `podsnap pod restore`: restore a pod from a checkpoint directory through CRI `RestorePod`,
//! with pod and container configs in crictl's JSON, and with `--start` start every restored
//! container, all at once (the restored processes run from `StartContainer` on, as CRI says;
//! the patched kubelet still starts them one after another).
//!
//! Prints the new sandbox ID on stdout, then one `container-id<TAB>name` line per container.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cri_api::CriEndpoint;
use cri_api::v1::{RestorePodRequest, StartContainerRequest};

use crate::checkpoint::short_id;
use crate::config::{container_name, pod_name, read_container_config, read_pod_config};
use crate::cri::{LOOKUP_TIMEOUT, answer, runtime_client, with_timeout};
use crate::error::CliError;
use crate::options::parse_options;

/// What to restore, as the command line says.
#[derive(Debug)]
pub struct RestorePod {
    pub checkpoint_dir: PathBuf,
    pub pod_config: PathBuf,
    pub container_configs: Vec<PathBuf>,
    pub runtime_handler: String,
    pub options: Vec<String>,
    pub timeout: Duration,
    pub start: bool,
}

/// Runs the command.
pub async fn restore_pod(endpoint: &CriEndpoint, command: RestorePod) -> Result<(), CliError> {
    let options = parse_options(&command.options)?;
    let checkpoint_dir = std::path::absolute(&command.checkpoint_dir)
        .map_err(CliError::io("resolving", &command.checkpoint_dir))?;
    if !checkpoint_dir.is_dir() {
        return Err(CliError::Usage(format!(
            "checkpoint {} is not a directory",
            checkpoint_dir.display()
        )));
    }
    let config = read_pod_config(&command.pod_config)?;
    let container_configs = command
        .container_configs
        .iter()
        .map(|path| read_container_config(path))
        .collect::<Result<Vec<_>, _>>()?;
    let mut names: Vec<&str> = container_configs.iter().map(container_name).collect();
    names.sort_unstable();
    if let Some(twice) = names.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(CliError::Usage(format!(
            "two container configs are named {:?}: names must be unique",
            twice[0]
        )));
    }
    let mut runtime = runtime_client(endpoint);

    let count = container_configs.len();
    eprint!(
        "restoring pod {} ({count} container{}) from {} with runtime handler {:?} ... ",
        pod_name(&config),
        if count == 1 { "" } else { "s" },
        checkpoint_dir.display(),
        command.runtime_handler
    );
    let started = Instant::now();
    let request = RestorePodRequest {
        checkpoint_path: checkpoint_dir.to_string_lossy().into_owned(),
        config: Some(config),
        runtime_handler: command.runtime_handler,
        options,
        container_configs,
    };
    let restored = match answer(
        "RestorePod",
        command.timeout,
        runtime.restore_pod(with_timeout(request, command.timeout)),
    )
    .await
    {
        Ok(restored) => restored,
        Err(err) => {
            eprintln!("failed after {:.1}s", started.elapsed().as_secs_f64());
            return Err(err);
        }
    };
    eprintln!(
        "done in {:.1}s: sandbox {}",
        started.elapsed().as_secs_f64(),
        short_id(&restored.pod_sandbox_id)
    );
    println!("{}", restored.pod_sandbox_id);
    for container in &restored.restored_containers {
        println!("{}\t{}", container.container_id, container.name);
    }

    if command.start {
        // All at once: their restores (CRIU, verification, layers) overlap.
        eprintln!(
            "starting {count} container{} ...",
            if count == 1 { "" } else { "s" }
        );
        let starts = restored.restored_containers.iter().map(|container| {
            let mut runtime = runtime.clone();
            async move {
                let started = Instant::now();
                let result = answer(
                    "StartContainer",
                    LOOKUP_TIMEOUT,
                    runtime.start_container(with_timeout(
                        StartContainerRequest {
                            container_id: container.container_id.clone(),
                        },
                        LOOKUP_TIMEOUT,
                    )),
                )
                .await;
                match &result {
                    Ok(_) => eprintln!(
                        "started container {} ({}) in {:.1}s",
                        container.name,
                        short_id(&container.container_id),
                        started.elapsed().as_secs_f64()
                    ),
                    Err(_) => eprintln!(
                        "container {} ({}) failed to start",
                        container.name,
                        short_id(&container.container_id)
                    ),
                }
                result.map_err(|err| (container, err))
            }
        });
        let results = futures::future::join_all(starts).await;
        if let Some(Err((container, err))) = results.into_iter().find(Result::is_err) {
            return Err(CliError::Start {
                name: container.name.clone(),
                container_id: container.container_id.clone(),
                sandbox_id: restored.pod_sandbox_id.clone(),
                source: Box::new(err),
            });
        }
    }
    Ok(())
}
