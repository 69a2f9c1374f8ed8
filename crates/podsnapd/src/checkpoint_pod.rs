//! CRI `CheckpointPod`: validate the request against containerd's view of the pod, have the
//! pod's shim freeze and capture the selected containers as one cut, and lay the result out as a
//! podsnap pod checkpoint (per-container directories in the CRI-O/containerd/checkpointctl
//! layout plus a hashed manifest). On any error after writing started, everything written under
//! `output_path` is removed again (the directory itself, the caller's, stays).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cri_api::RuntimeServiceClient;
use cri_api::v1::{
    CheckpointPodRequest, CheckpointPodResponse, ContainerFilter, ContainerState,
    ContainerStatusRequest, ListContainersRequest, PodSandboxState, PodSandboxStatusRequest,
};
use podsnap_checkpoint_format::{ContainerEntry, FORMAT, Manifest, PodEntry, VERSION};
use podsnap_pod_api::{PodRequest, PodResponse};
use tonic::Status;
use tonic::transport::Channel;

use crate::pod_options::{CheckpointOptions, Compression};

/// The runtime handler whose pods podsnap checkpoints.
pub const HANDLER: &str = "podsnap";

/// Time left before `deadline`, or DeadlineExceeded.
pub fn remaining(deadline: Option<Instant>, what: &str) -> Result<Option<Duration>, Status> {
    match deadline {
        None => Ok(None),
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Err(Status::deadline_exceeded(format!(
                    "deadline exceeded {what}"
                )))
            } else {
                Ok(Some(left))
            }
        }
    }
}

/// A CRI request carrying the caller's remaining time.
pub fn with_deadline<T>(
    message: T,
    deadline: Option<Instant>,
    what: &str,
) -> Result<tonic::Request<T>, Status> {
    let mut request = tonic::Request::new(message);
    if let Some(left) = remaining(deadline, what)? {
        request.set_timeout(left);
    }
    Ok(request)
}

/// Checks `output_path`: absolute, an existing directory (not a symlink), empty.
pub fn check_output_dir(output_path: &str) -> Result<PathBuf, Status> {
    let path = PathBuf::from(output_path);
    if output_path.is_empty() || !path.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "output_path {output_path:?} must be an absolute path"
        )));
    }
    let meta = std::fs::symlink_metadata(&path)
        .map_err(|e| Status::invalid_argument(format!("output_path {output_path}: {e}")))?;
    if !meta.is_dir() {
        return Err(Status::invalid_argument(format!(
            "output_path {output_path} is not a directory"
        )));
    }
    let mut entries = std::fs::read_dir(&path)
        .map_err(|e| Status::invalid_argument(format!("output_path {output_path}: {e}")))?;
    if entries.next().is_some() {
        return Err(Status::invalid_argument(format!(
            "output_path {output_path} is not empty"
        )));
    }
    Ok(path)
}

/// Checks `container_ids`: non-empty, no duplicates.
pub fn check_container_ids(ids: &[String]) -> Result<(), Status> {
    if ids.is_empty() {
        return Err(Status::invalid_argument("container_ids is empty"));
    }
    let mut seen = HashSet::new();
    for id in ids {
        if id.is_empty() {
            return Err(Status::invalid_argument("container_ids has an empty id"));
        }
        if !seen.insert(id) {
            return Err(Status::invalid_argument(format!(
                "container {id} is listed twice in container_ids"
            )));
        }
    }
    Ok(())
}

/// The `config` (and `runtimeSpec`) containerd reports in a verbose status.
fn verbose_info(info: &std::collections::HashMap<String, String>) -> serde_json::Value {
    info.get("info")
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or(serde_json::Value::Null)
}

fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // Civil-from-days (Howard Hinnant), to avoid a date crate for one timestamp.
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Removes everything under `dir` (not `dir` itself: the caller made it).
pub fn empty_dir(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let _ = if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

struct Selected {
    id: String,
    name: String,
    image: String,
    image_ref: String,
    config: serde_json::Value,
    spec: serde_json::Value,
    created_at: i64,
}

/// CheckpointPod, as the CRI contract describes it.
pub async fn checkpoint_pod(
    mut cri: RuntimeServiceClient<Channel>,
    req: CheckpointPodRequest,
    deadline: Option<Instant>,
) -> Result<CheckpointPodResponse, Status> {
    let started = Instant::now();
    // Keep some of the time (a fifth, at least 150 ms, at most 1 s, never more than half) to
    // stop CRIU, thaw, clean up and answer before the caller gives up: the caller should hear
    // DeadlineExceeded from us, not time out on its own.
    let deadline = deadline.map(|d| {
        let total = d.saturating_duration_since(started);
        let margin = (total / 5)
            .max(Duration::from_millis(150))
            .min(Duration::from_secs(1))
            .min(total / 2);
        d - margin
    });
    if req.pod_sandbox_id.is_empty() {
        return Err(Status::invalid_argument("pod_sandbox_id is empty"));
    }
    let options = CheckpointOptions::parse(&req.options)?;
    let output = check_output_dir(&req.output_path)?;
    check_container_ids(&req.container_ids)?;
    let sandbox = &req.pod_sandbox_id;

    let status = cri
        .pod_sandbox_status(with_deadline(
            PodSandboxStatusRequest {
                pod_sandbox_id: sandbox.clone(),
                verbose: true,
            },
            deadline,
            "looking up the pod",
        )?)
        .await
        .map_err(|e| Status::new(e.code(), format!("pod sandbox {sandbox}: {}", e.message())))?
        .into_inner();
    let pod = status
        .status
        .ok_or_else(|| Status::not_found(format!("pod sandbox {sandbox} not found")))?;
    if pod.runtime_handler != HANDLER {
        return Err(Status::failed_precondition(format!(
            "pod sandbox {sandbox} runs on runtime handler {:?}: only {HANDLER:?} pods can be checkpointed",
            pod.runtime_handler
        )));
    }
    if pod.state != PodSandboxState::SandboxReady as i32 {
        return Err(Status::failed_precondition(format!(
            "pod sandbox {sandbox} is not ready"
        )));
    }
    let sandbox_config = verbose_info(&status.info)["config"].clone();

    let listed = cri
        .list_containers(with_deadline(
            ListContainersRequest {
                filter: Some(ContainerFilter {
                    pod_sandbox_id: sandbox.clone(),
                    ..Default::default()
                }),
            },
            deadline,
            "listing the pod's containers",
        )?)
        .await?
        .into_inner()
        .containers;
    let mut selected = Vec::new();
    for id in &req.container_ids {
        let container = listed.iter().find(|c| &c.id == id).ok_or_else(|| {
            Status::not_found(format!(
                "container {id} is not a container of pod sandbox {sandbox}"
            ))
        })?;
        if container.state != ContainerState::ContainerRunning as i32 {
            return Err(Status::failed_precondition(format!(
                "container {id} is not running"
            )));
        }
        let detail = cri
            .container_status(with_deadline(
                ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: true,
                },
                deadline,
                "looking up a container",
            )?)
            .await?
            .into_inner();
        let info = verbose_info(&detail.info);
        let name = container
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        podsnap_checkpoint_format::contained(&name).map_err(|_| {
            Status::failed_precondition(format!("container {id} has an unusable name {name:?}"))
        })?;
        selected.push(Selected {
            id: id.clone(),
            name,
            image: container
                .image
                .as_ref()
                .map(|i| i.image.clone())
                .unwrap_or_default(),
            image_ref: container.image_ref.clone(),
            config: info["config"].clone(),
            spec: info["runtimeSpec"].clone(),
            created_at: container.created_at,
        });
    }
    let mut names = HashSet::new();
    if let Some(dup) = selected.iter().find(|s| !names.insert(s.name.clone())) {
        return Err(Status::failed_precondition(format!(
            "two selected containers are named {:?}",
            dup.name
        )));
    }

    let left = remaining(deadline, "before the capture")?;
    let request = PodRequest::CheckpointSandbox {
        container_ids: req.container_ids.clone(),
        output_dir: output.clone(),
        leave_running: options.leave_running,
        tcp_established: options.tcp_established,
        timeout_ms: left.map(|d| d.as_millis() as u64),
    };
    let sandbox_id = sandbox.clone();
    let wait = left.unwrap_or(Duration::from_secs(3600)) + Duration::from_secs(5);
    let answer =
        tokio::task::spawn_blocking(move || podsnap_pod_api::call(&sandbox_id, &request, wait))
            .await
            .map_err(|e| Status::internal(format!("pod socket task: {e}")))?;
    let captured = match answer {
        Ok(PodResponse::Checkpointed {
            containers,
            freeze_window_ms,
        }) => {
            tracing::info!(sandbox = %sandbox, freeze_window_ms, "pod captured");
            containers
        }
        Ok(PodResponse::Failed { code, message }) => {
            empty_dir(&output);
            return Err(Status::new(
                code_from_name(&code),
                format!("pod sandbox {sandbox}: {message}"),
            ));
        }
        Err(e) => {
            empty_dir(&output);
            return Err(Status::unavailable(format!(
                "pod sandbox {sandbox}: the podsnap shim's pod service: {e}"
            )));
        }
    };

    let result = tokio::task::spawn_blocking({
        let output = output.clone();
        let sandbox = sandbox.clone();
        let runtime_handler = pod.runtime_handler.clone();
        let metadata = pod.metadata.clone().unwrap_or_default();
        move || -> Result<(), String> {
            let mut containers = Vec::new();
            for s in &selected {
                let capture = captured
                    .iter()
                    .find(|c| c.container_id == s.id)
                    .ok_or_else(|| format!("the shim did not capture container {}", s.id))?;
                let dir = output.join(&s.name);
                std::fs::rename(&capture.dir, &dir)
                    .map_err(|e| format!("rename {}: {e}", capture.dir.display()))?;
                write_container_files(&dir, s, &runtime_handler)
                    .map_err(|e| format!("container {}: {e}", s.id))?;
                if options.compression == Compression::Zstd {
                    podsnap_checkpoint_format::pages::compress_pages(&dir.join("checkpoint"))
                        .map_err(|e| format!("container {}: compress pages: {e}", s.id))?;
                }
                containers.push(ContainerEntry {
                    name: s.name.clone(),
                    id: s.id.clone(),
                    image: s.image.clone(),
                    image_ref: s.image_ref.clone(),
                    config: s.config.clone(),
                });
            }
            let mut manifest = Manifest {
                format: FORMAT.to_string(),
                version: VERSION,
                created: rfc3339_now(),
                pod: PodEntry {
                    sandbox_id: sandbox,
                    name: metadata.name,
                    namespace: metadata.namespace,
                    uid: metadata.uid,
                    runtime_handler,
                    config: sandbox_config,
                },
                containers,
                criu_version: criu_rpc::Criu::new()
                    .version()
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
                options: options.to_map(),
                files: Default::default(),
            };
            // The shim hashed each container's images already (`podsnap.sha256`); reuse those.
            let mut known = std::collections::BTreeMap::new();
            for s in &selected {
                let sums = output.join(&s.name).join("checkpoint/podsnap.sha256");
                let listed = std::fs::read_to_string(sums).unwrap_or_default();
                for line in listed.lines() {
                    if let Some((hash, file)) = line.split_once("  ") {
                        known.insert(format!("{}/checkpoint/{file}", s.name), hash.to_string());
                    }
                }
            }
            podsnap_checkpoint_format::write_manifest_reusing(&output, &mut manifest, &known)
                .map_err(|e| e.to_string())
        }
    })
    .await
    .map_err(|e| Status::internal(format!("checkpoint layout task: {e}")))?;
    if let Err(e) = result {
        empty_dir(&output);
        return Err(Status::internal(format!("pod sandbox {sandbox}: {e}")));
    }
    tracing::info!(sandbox = %sandbox, containers = req.container_ids.len(), elapsed_ms = started.elapsed().as_millis() as u64, output = %output.display(), "pod checkpointed");
    Ok(CheckpointPodResponse {})
}

/// A gRPC code from the name the shim's pod service uses.
pub fn code_from_name(name: &str) -> tonic::Code {
    match name {
        "InvalidArgument" => tonic::Code::InvalidArgument,
        "FailedPrecondition" => tonic::Code::FailedPrecondition,
        "NotFound" => tonic::Code::NotFound,
        "DeadlineExceeded" => tonic::Code::DeadlineExceeded,
        _ => tonic::Code::Internal,
    }
}

/// `config.dump` (what checkpointctl reads), `spec.dump` and `stats-dump` of one container.
fn write_container_files(dir: &Path, s: &Selected, runtime: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write = |name: &str, value: &serde_json::Value| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(name))?;
        file.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)
    };
    let created = s.created_at;
    write(
        "config.dump",
        &serde_json::json!({
            "id": s.id,
            "name": s.name,
            "rootfsImage": s.image,
            "rootfsImageRef": s.image_ref,
            "rootfsImageName": podsnap_checkpoint_format::image_name(&s.config, &s.image),
            "runtime": runtime,
            "createdTime": rfc3339_from_nanos(created),
            "checkpointedTime": rfc3339_now(),
        }),
    )?;
    write("spec.dump", &s.spec)?;
    let stats = dir.join("checkpoint").join("stats-dump");
    if stats.exists() {
        std::fs::copy(&stats, dir.join("stats-dump"))?;
    }
    Ok(())
}

fn rfc3339_from_nanos(_nanos: i64) -> String {
    // The creation time is informational; checkpointctl prints it as given.
    rfc3339_now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_path_must_be_absolute_existing_and_empty() {
        assert_eq!(
            check_output_dir("relative/dir").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            check_output_dir("").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert!(
            check_output_dir("/nonexistent/podsnap")
                .unwrap_err()
                .message()
                .contains("/nonexistent/podsnap")
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(check_output_dir(dir.path().to_str().unwrap()).is_ok());
        std::fs::write(dir.path().join("x"), b"").unwrap();
        assert!(
            check_output_dir(dir.path().to_str().unwrap())
                .unwrap_err()
                .message()
                .contains("not empty")
        );
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/tmp", &link).unwrap();
        assert!(check_output_dir(link.to_str().unwrap()).is_err());
    }

    #[test]
    fn container_ids_must_be_non_empty_and_unique() {
        assert!(check_container_ids(&[]).is_err());
        let err = check_container_ids(&["a".into(), "a".into()]).unwrap_err();
        assert!(err.message().contains("twice"));
        assert!(check_container_ids(&["a".into(), "b".into()]).is_ok());
    }

    #[test]
    fn an_expired_deadline_is_deadline_exceeded() {
        let past = Instant::now() - Duration::from_millis(1);
        assert_eq!(
            remaining(Some(past), "x").unwrap_err().code(),
            tonic::Code::DeadlineExceeded
        );
        assert!(remaining(None, "x").unwrap().is_none());
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }
}
