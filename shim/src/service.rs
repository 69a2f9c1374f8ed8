//! The shim's lifecycle as containerd drives it: `start` (spawn or reuse the pod's shim),
//! `delete` (clean up after a shim that died), serving the Task API, and the background work
//! that feeds it: reaped exits, OOM notifications and the event publisher.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::DeleteResponse;
use containerd_shim::asynchronous::monitor::monitor_subscribe;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{ExitSignal, Shim, spawn};
use containerd_shim::monitor::Topic;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::util::convert_to_timestamp;
use containerd_shim::{Config, Error, Flags, StartOpts};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::cgroup::ContainerCgroup;
use crate::container::{STATE_ROOT, destroy_container, unmount_rootfs};
use crate::task::PodTask;

/// Annotations that name the pod (group) a container belongs to; one shim serves a group.
pub const GROUP_LABELS: [&str; 3] = [
    "io.kubernetes.cri.sandbox-id",
    "io.containerd.podsnap.v2.group",
    "io.containerd.runc.v2.group",
];

pub struct Service {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

/// The group (pod) a bundle's container belongs to, or the container id itself.
pub fn grouping(spec: &oci_spec::runtime::Spec, id: &str) -> String {
    spec.annotations()
        .as_ref()
        .and_then(|a| GROUP_LABELS.iter().find_map(|label| a.get(*label)))
        .cloned()
        .unwrap_or_else(|| id.to_string())
}

#[async_trait]
impl Shim for Service {
    type T = PodTask;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Self {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let spec = oci_spec::runtime::Spec::load("config.json").map_err(|e| {
            Error::InvalidArgument(format!("container {}: config.json: {e}", opts.id))
        })?;
        let group = grouping(&spec, &opts.id);
        let address = spawn(opts, &group, Vec::new()).await?;
        tokio::fs::write("address", &address)
            .await
            .map_err(|e| Error::Other(format!("write address file: {e}")))?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // The shim's own logger is set up only when it serves: here what goes wrong goes to
        // stderr, which containerd logs as the cleanup's warnings.
        if log::set_logger(&DELETE_LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Warn);
        }
        // First, whatever else fails or runs out of time: a shim that died mid-restore left its
        // expanded page images, the pod's memory.
        tokio::task::spawn_blocking(|| crate::scratch::sweep(Path::new(crate::scratch::ROOT)))
            .await
            .map_err(|e| Error::Other(e.to_string()))?;
        let bundle = std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?;
        let id = self.id.clone();
        let state_dir = Path::new(STATE_ROOT).join(&self.namespace).join(&id);
        tokio::task::spawn_blocking(move || {
            // First the bind sources staged for a user-namespace container: containerd removes
            // the bundle next, and must not descend into the volumes they expose.
            crate::mount_sources::release(&bundle);
            let spec = oci_spec::runtime::Spec::load(bundle.join("config.json")).ok();
            let cgroup = spec
                .as_ref()
                .map(|s| ContainerCgroup::of(s, &id))
                .unwrap_or_else(|| ContainerCgroup::of(&Default::default(), &id));
            destroy_container(&id, &state_dir, &cgroup);
            let root = spec
                .as_ref()
                .and_then(|s| s.root().as_ref().map(|r| r.path().clone()))
                .unwrap_or_else(|| "rootfs".into());
            unmount_rootfs(&bundle.join(root));
            let _ = std::fs::remove_file(podsnap_pod_api::socket_path(&id));
        })
        .await
        .map_err(|e| Error::Other(e.to_string()))?;
        let mut resp = DeleteResponse::new();
        resp.exit_status = 137;
        resp.exited_at = Some(convert_to_timestamp(Some(OffsetDateTime::now_utc()))).into();
        Ok(resp)
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        let _ = std::fs::remove_file(podsnap_pod_api::socket_path(&self.id));
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> PodTask {
        // Scratch directories of shims that died (a host that crashed runs no `delete` for them).
        tokio::task::spawn_blocking(|| crate::scratch::sweep(Path::new(crate::scratch::ROOT)));
        let (events_tx, mut events_rx): (crate::task::EventSender, _) = mpsc::unbounded_channel();
        let namespace = self.namespace.clone();
        tokio::spawn(async move {
            while let Some((topic, event)) = events_rx.recv().await {
                if let Err(e) = publisher
                    .publish(Context::default(), &topic, &namespace, event)
                    .await
                {
                    log::warn!("publish {topic}: {e}");
                }
            }
        });
        let (oom_tx, mut oom_rx) = mpsc::unbounded_channel();
        let task = PodTask::new(&self.namespace, events_tx, self.exit.clone(), oom_tx);
        let oom_task = task.clone();
        tokio::spawn(async move {
            while let Some(container_id) = oom_rx.recv().await {
                oom_task.send_oom(container_id);
            }
        });
        let socket = podsnap_pod_api::socket_path(&self.id);
        let pod_task = task.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::pod_checkpoint::serve(pod_task, socket).await {
                log::error!("pod socket: {e:#}");
            }
        });
        match monitor_subscribe(Topic::Pid).await {
            Ok(mut subscription) => {
                let exit_task = task.clone();
                tokio::spawn(async move {
                    while let Some(event) = subscription.rx.recv().await {
                        exit_task.on_exit(event).await;
                    }
                });
            }
            Err(e) => log::error!("cannot watch process exits: {e}"),
        }
        task
    }

    fn runtime_info(
        runtime_id: &str,
        _options: Option<&containerd_shim::protos::protobuf::well_known_types::any::Any>,
    ) -> containerd_shim::Result<containerd_shim::protos::types::introspection::RuntimeInfo> {
        Ok(crate::info::runtime_info(runtime_id))
    }
}

/// The `delete` subcommand's logger: this crate's warnings and errors, one line each, to
/// stderr (its stdout carries the answer to containerd). libcgroups' notes about controllers
/// this host lacks would repeat with every delete.
struct DeleteLogger;

static DELETE_LOGGER: DeleteLogger = DeleteLogger;

impl log::Log for DeleteLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn
            && metadata.target().starts_with(env!("CARGO_CRATE_NAME"))
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            // Never a panic (eprintln!'s) when nobody reads stderr any more (containerd
            // restarted): the cleanup goes on.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "{}: {}",
                record.level(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_of_a_cri_pod_share_the_sandbox_group() {
        let mut spec = oci_spec::runtime::Spec::default();
        let mut annotations = std::collections::HashMap::new();
        annotations.insert(
            "io.kubernetes.cri.sandbox-id".to_string(),
            "sb1".to_string(),
        );
        spec.set_annotations(Some(annotations));
        assert_eq!(grouping(&spec, "c1"), "sb1");
        assert_eq!(grouping(&oci_spec::runtime::Spec::default(), "c2"), "c2");
    }
}
