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
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};

use podsnap_checkpoint_api::{RESTORE_FROM, RESTORE_IMAGE};

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

/// Runs the pull watch and the garbage collection of pulled checkpoints until the watch ends.
pub async fn run(agent: Arc<Agent>) {
    // Metadata only: nothing of the pods' specs is fetched.
    let pods: Api<PartialObjectMeta<Pod>> = Api::all(agent.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", agent.node));
    // Checkpoint names of the pods on this node (for the collection), and pulls in flight.
    let in_use: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> = Arc::default();
    let pulling: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let gc = collect(agent.clone(), in_use.clone());
    let watch = watcher(pods, config).default_backoff().for_each(|event| {
        let agent = agent.clone();
        let in_use = in_use.clone();
        let pulling = pulling.clone();
        async move {
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(error = %e, "watching this node's pods");
                    return;
                }
            };
            note(&in_use, &event);
            let pods: Vec<&PartialObjectMeta<Pod>> = match &event {
                watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => vec![pod],
                _ => Vec::new(),
            };
            for pod in pods {
                if pod.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                if let Some(wanted) = wanted(pod) {
                    start_pull(&agent, &pulling, wanted);
                }
            }
        }
    });
    futures::join!(watch, gc);
}

/// Keeps `in_use` (pod key → checkpoint names) up to date with a watch event.
fn note(
    in_use: &Mutex<BTreeMap<String, BTreeSet<String>>>,
    event: &watcher::Event<PartialObjectMeta<Pod>>,
) {
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
    let mut in_use = in_use.lock().unwrap_or_else(|e| e.into_inner());
    match event {
        watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
            in_use.insert(key(pod), names(pod));
        }
        watcher::Event::Delete(pod) => {
            in_use.remove(&key(pod));
        }
        // A relist: what it lists replaces what was known (InitApply adds them back).
        watcher::Event::Init => in_use.clear(),
        watcher::Event::InitDone => {}
    }
}

/// Starts pulling `wanted` unless a pull of that checkpoint is already under way.
fn start_pull(agent: &Arc<Agent>, pulling: &Arc<Mutex<BTreeSet<String>>>, wanted: Wanted) {
    if !pulling
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(wanted.name.clone())
    {
        return;
    }
    let agent = agent.clone();
    let pulling = pulling.clone();
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let result = images::pull(
            &agent.registry,
            &agent.pins_dir,
            &agent.checkpoints_dir,
            &wanted.name,
            &wanted.image,
            &wanted.namespace,
            agent.max_pull_bytes,
        )
        .await;
        match result {
            Ok(PullOutcome::Pulled { size }) => tracing::info!(
                checkpoint = %wanted.name,
                image = %wanted.image,
                size,
                seconds = started.elapsed().as_secs_f64(),
                "pulled a checkpoint for a restore on this node"
            ),
            Ok(PullOutcome::Present) => {
                tracing::debug!(checkpoint = %wanted.name, "checkpoint already here")
            }
            Err(message) => tracing::warn!(
                checkpoint = %wanted.name,
                image = %wanted.image,
                %message,
                "pulling a checkpoint for a restore on this node failed; tried again when the pod changes"
            ),
        }
        pulling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&wanted.name);
    });
}

/// Every [`GC_PERIOD`], removes pulled checkpoints no pod on this node names that have not been
/// used for the agent's `pulled_ttl`.
async fn collect(agent: Arc<Agent>, in_use: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>) {
    let mut last_used: BTreeMap<String, SystemTime> = BTreeMap::new();
    loop {
        tokio::time::sleep(GC_PERIOD).await;
        let named: BTreeSet<String> = in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flatten()
            .cloned()
            .collect();
        let now = SystemTime::now();
        for (name, pulled_at) in images::pulled_checkpoints(&agent.checkpoints_dir) {
            if named.contains(&name) {
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
    fn the_checkpoints_in_use_follow_the_watch() {
        let in_use = Mutex::new(BTreeMap::new());
        let restoring = pod(
            "a",
            &[
                (RESTORE_FROM, "checkpoint-a"),
                (RESTORE_IMAGE, "r.example/x@sha256:00"),
            ],
        );
        note(&in_use, &watcher::Event::Apply(restoring.clone()));
        note(&in_use, &watcher::Event::Apply(pod("b", &[])));
        let named = |m: &Mutex<BTreeMap<String, BTreeSet<String>>>| -> Vec<String> {
            m.lock().unwrap().values().flatten().cloned().collect()
        };
        assert_eq!(named(&in_use), vec!["checkpoint-a".to_string()]);
        note(&in_use, &watcher::Event::Delete(restoring.clone()));
        assert!(named(&in_use).is_empty());
        // A relist starts over from what it lists.
        note(&in_use, &watcher::Event::Apply(restoring.clone()));
        note(&in_use, &watcher::Event::Init);
        assert!(named(&in_use).is_empty());
        note(&in_use, &watcher::Event::InitApply(restoring));
        assert_eq!(named(&in_use), vec!["checkpoint-a".to_string()]);
    }
}
