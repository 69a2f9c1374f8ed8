//! Pulls for restores on this node: the agent watches the metadata of the pods bound to its node
//! (field selector `spec.nodeName=<node>`; names, namespaces and annotations are all it reads of
//! them) and, for each annotated `checkpoint.k8s.io/restore-image`, pulls that image into the
//! kubelet's checkpoint directory under the name `checkpoint.k8s.io/restore-from` gives
//! ([`images::pull`]). The kubelet, which may try the restore before the pull is done, fails that
//! attempt (the checkpoint is not there yet) and restores on its next sync.
//!
//! Pulled checkpoints that no pod on this node names any more are removed once they have been
//! unused for the agent's `pulled_ttl` (a restore of the same checkpoint soon after finds it
//! here); checkpoints the kubelet took on this node are never touched here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use kube::{Api, ResourceExt};

use podsnap_checkpoint_api::{PodCheckpoint, PodCheckpointPhase, RESTORE_FROM, RESTORE_IMAGE};

use crate::Agent;
use crate::images::{self, PullOutcome};

/// How often pulled checkpoints are looked at for removal.
const GC_PERIOD: Duration = Duration::from_secs(30);

/// What a pod asks this node for: a checkpoint, by name, from an image.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Wanted {
    pub name: String,
    pub image: String,
    pub namespace: String,
}

/// The checkpoint a pod's annotations ask to be pulled, if any.
pub fn wanted(pod: &PartialObjectMeta<Pod>) -> Option<Wanted> {
    let annotations = pod.metadata.annotations.as_ref()?;
    let image = annotations.get(RESTORE_IMAGE)?;
    let from = annotations.get(RESTORE_FROM)?;
    // The kubelet takes a name or the path it returned; the agent pulls by name.
    let name = from.rsplit('/').next().unwrap_or_default();
    Some(Wanted {
        name: name.to_string(),
        image: image.clone(),
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
    })
}

/// The checkpoints the pods on this node name, as the watch tells: a relist (Init … InitDone)
/// is gathered aside and replaces the known set only once whole, and nothing is known (so
/// nothing collected) before the first list is.
#[derive(Debug, Default)]
pub struct InUse {
    pods: BTreeMap<String, BTreeSet<String>>,
    relisting: Option<BTreeMap<String, BTreeSet<String>>>,
    synced: bool,
}

impl InUse {
    /// Takes in one watch event.
    pub fn note(&mut self, event: &watcher::Event<PartialObjectMeta<Pod>>) {
        let key = |pod: &PartialObjectMeta<Pod>| {
            format!(
                "{}/{}",
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default()
            )
        };
        let names = |pod: &PartialObjectMeta<Pod>| -> BTreeSet<String> {
            wanted(pod).map(|w| w.name).into_iter().collect()
        };
        match event {
            watcher::Event::Apply(pod) => {
                self.pods.insert(key(pod), names(pod));
            }
            watcher::Event::Delete(pod) => {
                self.pods.remove(&key(pod));
            }
            watcher::Event::Init => self.relisting = Some(BTreeMap::new()),
            watcher::Event::InitApply(pod) => {
                self.relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key(pod), names(pod));
            }
            watcher::Event::InitDone => {
                self.pods = self.relisting.take().unwrap_or_default();
                self.synced = true;
            }
        }
    }

    /// The checkpoint names in use, once the pods on this node are known.
    pub fn names(&self) -> Option<BTreeSet<String>> {
        let mut names: BTreeSet<String> = self.pods.values().flatten().cloned().collect();
        // Until a relist is done, what it has seen counts too.
        names.extend(
            self.relisting
                .iter()
                .flat_map(|m| m.values().flatten().cloned()),
        );
        self.synced.then_some(names)
    }
}

/// Pulls under way, and when a failed one may be tried again.
#[derive(Debug, Default)]
struct Pulls {
    running: BTreeSet<String>,
    failed: BTreeMap<Wanted, (Instant, Duration)>,
}

/// The first pause after a failed pull; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(10);
const MAX_RETRY: Duration = Duration::from_secs(300);

/// Runs the pull watch and the garbage collection of pulled checkpoints until the watch ends.
pub async fn run(agent: Arc<Agent>) {
    // Metadata only: nothing of the pods' specs is fetched.
    let pods: Api<PartialObjectMeta<Pod>> = Api::all(agent.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", agent.node));
    let in_use: Arc<Mutex<InUse>> = Arc::default();
    let pulls: Arc<Mutex<Pulls>> = Arc::default();
    let gc = collect(agent.clone(), in_use.clone(), pulls.clone());
    let watch = watcher(pods, config).default_backoff().for_each(|event| {
        let agent = agent.clone();
        let in_use = in_use.clone();
        let pulls = pulls.clone();
        async move {
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(error = %e, "watching this node's pods");
                    return;
                }
            };
            in_use
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .note(&event);
            let pod = match &event {
                watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => pod,
                _ => return,
            };
            if pod.metadata.deletion_timestamp.is_none()
                && let Some(wanted) = wanted(pod)
            {
                start_pull(&agent, &pulls, wanted);
            }
        }
    });
    futures::join!(watch, gc);
}

/// The UID of the Ready PodCheckpoint in `namespace` whose image is `image`: a pod may have a
/// checkpoint image pulled only when a PodCheckpoint of its own namespace published it (its
/// node's agent pushed it and wrote the reference), never any image a pod's author names.
async fn publisher(agent: &Agent, namespace: &str, image: &str) -> Result<String, String> {
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(agent.client.clone(), namespace);
    let list = checkpoints
        .list(&Default::default())
        .await
        .map_err(|e| format!("listing the PodCheckpoints of {namespace}: {e}"))?;
    list.items
        .iter()
        .find(|c| {
            let status = c.status.as_ref();
            status.and_then(|s| s.phase) == Some(PodCheckpointPhase::Ready)
                && status
                    .and_then(|s| s.image.as_ref())
                    .is_some_and(|i| i.reference == image)
        })
        .and_then(|c| c.uid())
        .ok_or_else(|| {
            format!("no Ready PodCheckpoint in namespace {namespace} has image {image}: not pulled")
        })
}

/// Starts pulling `wanted` unless a pull of that checkpoint is under way, or one failed and its
/// pause has not passed.
fn start_pull(agent: &Arc<Agent>, pulls: &Arc<Mutex<Pulls>>, wanted: Wanted) {
    {
        let mut pulls = pulls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((not_before, _)) = pulls.failed.get(&wanted)
            && Instant::now() < *not_before
        {
            return;
        }
        if !pulls.running.insert(wanted.name.clone()) {
            return;
        }
    }
    let agent = agent.clone();
    let pulls = pulls.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let result = match publisher(&agent, &wanted.namespace, &wanted.image).await {
            Ok(uid) => {
                images::pull(
                    &agent.registry,
                    &agent.pins_dir,
                    &agent.checkpoints_dir,
                    &wanted.name,
                    &wanted.image,
                    &wanted.namespace,
                    &uid,
                    agent.max_pull_bytes,
                )
                .await
            }
            Err(e) => Err(e),
        };
        let mut pulls = pulls.lock().unwrap_or_else(|e| e.into_inner());
        pulls.running.remove(&wanted.name);
        match result {
            Ok(outcome) => {
                if let PullOutcome::Pulled { size } = outcome {
                    tracing::info!(
                        checkpoint = %wanted.name,
                        image = %wanted.image,
                        size,
                        seconds = started.elapsed().as_secs_f64(),
                        "pulled a checkpoint for a restore on this node"
                    );
                }
                pulls.failed.remove(&wanted);
            }
            Err(message) => {
                let pause = pulls
                    .failed
                    .get(&wanted)
                    .map_or(FIRST_RETRY, |(_, last)| (*last * 2).min(MAX_RETRY));
                tracing::warn!(
                    checkpoint = %wanted.name,
                    image = %wanted.image,
                    %message,
                    retry_after = ?pause,
                    "pulling a checkpoint for a restore on this node failed"
                );
                pulls.failed.insert(wanted, (Instant::now() + pause, pause));
            }
        }
    });
}

/// Every [`GC_PERIOD`], once the pods on this node are known: removes pulled checkpoints no pod
/// here names that have not been used for the agent's `pulled_ttl`, and what pulls that did not
/// finish left behind.
async fn collect(agent: Arc<Agent>, in_use: Arc<Mutex<InUse>>, pulls: Arc<Mutex<Pulls>>) {
    let mut last_used: BTreeMap<String, SystemTime> = BTreeMap::new();
    loop {
        tokio::time::sleep(GC_PERIOD).await;
        let Some(named) = in_use.lock().unwrap_or_else(|e| e.into_inner()).names() else {
            continue;
        };
        let running = pulls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running
            .clone();
        for stale in images::stale_pulls(&agent.checkpoints_dir, &running) {
            let removed = if stale.is_dir() {
                std::fs::remove_dir_all(&stale)
            } else {
                std::fs::remove_file(&stale)
            };
            match removed {
                Ok(()) => {
                    tracing::info!(path = %stale.display(), "removed what a pull that did not finish left")
                }
                Err(e) => {
                    tracing::warn!(path = %stale.display(), error = %e, "removing what a pull left")
                }
            }
        }
        let now = SystemTime::now();
        for (name, pulled_at) in images::pulled_checkpoints(&agent.checkpoints_dir) {
            if named.contains(&name) || running.contains(&name) {
                last_used.insert(name, now);
                continue;
            }
            let since = *last_used.get(&name).unwrap_or(&pulled_at);
            if now.duration_since(since).unwrap_or_default() < agent.pulled_ttl {
                continue;
            }
            match images::remove_pulled(&agent.checkpoints_dir, &name) {
                Ok(()) => {
                    tracing::info!(checkpoint = %name, "removed a pulled checkpoint no pod here uses");
                    last_used.remove(&name);
                }
                Err(message) => {
                    tracing::warn!(checkpoint = %name, %message, "removing a pulled checkpoint")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, annotations: &[(&str, &str)]) -> PartialObjectMeta<Pod> {
        let mut pod = PartialObjectMeta::<Pod>::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.namespace = Some("team".into());
        pod.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        pod
    }

    #[test]
    fn a_pod_wants_a_pull_only_with_both_annotations() {
        let image = "r.example/x@sha256:00";
        assert_eq!(wanted(&pod("a", &[(RESTORE_FROM, "checkpoint-a")])), None);
        assert_eq!(wanted(&pod("a", &[(RESTORE_IMAGE, image)])), None);
        let both = pod(
            "a",
            &[
                (
                    RESTORE_FROM,
                    "/var/lib/kubelet/pod-checkpoints/checkpoint-a",
                ),
                (RESTORE_IMAGE, image),
            ],
        );
        assert_eq!(
            wanted(&both),
            Some(Wanted {
                name: "checkpoint-a".into(),
                image: image.into(),
                namespace: "team".into(),
            })
        );
    }

    #[test]
    fn the_checkpoints_in_use_follow_the_watch_and_a_relist_replaces_them_whole() {
        let mut in_use = InUse::default();
        let restoring = |name: &str| {
            pod(
                name,
                &[
                    (RESTORE_FROM, name),
                    (RESTORE_IMAGE, "r.example/x@sha256:00"),
                ],
            )
        };
        let names = |in_use: &InUse| in_use.names().map(|n| n.into_iter().collect::<Vec<_>>());
        // Nothing is known before the first list is done: nothing may be collected.
        in_use.note(&watcher::Event::Init);
        in_use.note(&watcher::Event::InitApply(restoring("checkpoint-a")));
        assert_eq!(names(&in_use), None);
        in_use.note(&watcher::Event::InitDone);
        assert_eq!(names(&in_use), Some(vec!["checkpoint-a".to_string()]));
        in_use.note(&watcher::Event::Apply(restoring("checkpoint-b")));
        in_use.note(&watcher::Event::Apply(pod("c", &[])));
        in_use.note(&watcher::Event::Delete(restoring("checkpoint-a")));
        assert_eq!(names(&in_use), Some(vec!["checkpoint-b".to_string()]));
        // A relist: until it is done, what was known still counts, with what it saw.
        in_use.note(&watcher::Event::Init);
        in_use.note(&watcher::Event::InitApply(restoring("checkpoint-d")));
        assert_eq!(
            names(&in_use),
            Some(vec!["checkpoint-b".to_string(), "checkpoint-d".to_string()])
        );
        in_use.note(&watcher::Event::InitDone);
        assert_eq!(names(&in_use), Some(vec!["checkpoint-d".to_string()]));
    }
}
