//! Pulls for restores on this node. The controller lists, in a PodCheckpoint's
//! `status.pullNodes`, the nodes that restored pods of its image were bound to; the agent
//! watches PodCheckpoints (which it may read, and which hold no pod spec; it reads no pods) and
//! pulls the image of each Ready one that lists its node into the kubelet's checkpoint
//! directory, under the name of its location ([`images::pull`]). The kubelet, which may try the
//! restore before the pull is done, fails that attempt (the checkpoint is not there yet) and
//! restores on its next sync.
//!
//! A pulled checkpoint stays while its PodCheckpoint lists this node (a restored pod whose
//! sandbox is lost is restored from it again); once the object is gone or lists it no more, it
//! is removed after the agent's `pulled_ttl`. Checkpoints the kubelet took on this node are
//! never touched here.
//!
//! A pull that fails is tried again after a pause (10 s, doubling to 5 min) while its
//! PodCheckpoint still asks for it, and is reported as a Warning event `PullFailed` on the
//! PodCheckpoint (the restored pod meanwhile waits, its restore failing as "not found": never a
//! fresh start), with the reason: a registry that is down, a tampered blob, an encrypted image this
//! node has no key for.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, watcher};
use kube::{Api, Resource, ResourceExt};

use podsnap_checkpoint_api::{PodCheckpoint, PodCheckpointPhase};

use crate::Agent;
use crate::images::{self, PullOutcome};

/// How often pulled checkpoints are looked at for removal.
const GC_PERIOD: Duration = Duration::from_secs(30);

/// What a PodCheckpoint asks this node for: its checkpoint, by name, from its image.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Wanted {
    /// The checkpoint's directory name (of its location).
    pub name: String,
    /// The PodCheckpoint's name.
    pub object: String,
    pub image: String,
    pub namespace: String,
    /// The PodCheckpoint's UID: the kubelet record in the image must name it.
    pub uid: String,
    /// The Secret with the registry's credentials it names, if any.
    pub secret_name: Option<String>,
}

/// The pull a PodCheckpoint asks of `node`, if any: Ready, with an image, listing the node.
pub fn wanted(checkpoint: &PodCheckpoint, node: &str) -> Option<Wanted> {
    let status = checkpoint.status.as_ref()?;
    if status.phase != Some(PodCheckpointPhase::Ready)
        || !status.pull_nodes.iter().any(|n| n == node)
    {
        return None;
    }
    let image = status.image.as_ref()?.reference.clone();
    let name = status.checkpoint_location.as_ref()?.dir_name()?;
    Some(Wanted {
        name: name.to_string(),
        object: checkpoint.name_any(),
        image,
        namespace: checkpoint.namespace()?,
        uid: checkpoint.uid()?,
        secret_name: checkpoint.spec.image_secret_name().map(str::to_string),
    })
}

/// The checkpoints the PodCheckpoints ask this node to keep, as the watch tells: a relist
/// (Init … InitDone) is gathered aside and replaces the known set only once whole, and nothing is
/// known (so nothing collected) before the first list is.
#[derive(Debug, Default)]
pub struct InUse {
    objects: BTreeMap<String, BTreeSet<String>>,
    relisting: Option<BTreeMap<String, BTreeSet<String>>>,
    synced: bool,
    /// Checkpoint names whose PodCheckpoint is being deleted: kept, not pulled again.
    pub deleting: BTreeSet<String>,
}

impl InUse {
    /// Takes in one watch event, for `node`.
    pub fn note(&mut self, event: &watcher::Event<PodCheckpoint>, node: &str) {
        let key =
            |c: &PodCheckpoint| format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any());
        let names = |c: &PodCheckpoint| -> BTreeSet<String> {
            wanted(c, node).map(|w| w.name).into_iter().collect()
        };
        if let watcher::Event::Apply(c) | watcher::Event::InitApply(c) | watcher::Event::Delete(c) =
            event
        {
            for name in names(c) {
                let gone = matches!(event, watcher::Event::Delete(_));
                if !gone && c.meta().deletion_timestamp.is_some() {
                    self.deleting.insert(name);
                } else {
                    self.deleting.remove(&name);
                }
            }
        }
        match event {
            watcher::Event::Apply(c) => {
                self.objects.insert(key(c), names(c));
            }
            watcher::Event::Delete(c) => {
                self.objects.remove(&key(c));
            }
            watcher::Event::Init => self.relisting = Some(BTreeMap::new()),
            watcher::Event::InitApply(c) => {
                self.relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key(c), names(c));
            }
            watcher::Event::InitDone => {
                self.objects = self.relisting.take().unwrap_or_default();
                self.synced = true;
            }
        }
    }

    /// The checkpoint names in use, once the PodCheckpoints are known.
    pub fn names(&self) -> Option<BTreeSet<String>> {
        let mut names: BTreeSet<String> = self.objects.values().flatten().cloned().collect();
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
    let checkpoints: Api<PodCheckpoint> = Api::all(agent.client.clone());
    let in_use: Arc<Mutex<InUse>> = Arc::default();
    let pulls: Arc<Mutex<Pulls>> = Arc::default();
    let gc = collect(agent.clone(), in_use.clone(), pulls.clone());
    let recorder = Recorder::new(
        agent.client.clone(),
        Reporter {
            controller: "podsnap-node-agent".into(),
            instance: Some(agent.node.clone()),
        },
    );
    let retry = retry(
        agent.clone(),
        recorder.clone(),
        in_use.clone(),
        pulls.clone(),
    );
    let watch = watcher(checkpoints, watcher::Config::default())
        .default_backoff()
        .for_each(|event| {
            let agent = agent.clone();
            let recorder = recorder.clone();
            let in_use = in_use.clone();
            let pulls = pulls.clone();
            async move {
                let event = match event {
                    Ok(event) => event,
                    Err(e) => {
                        tracing::warn!(error = %e, "watching PodCheckpoints");
                        return;
                    }
                };
                in_use
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .note(&event, &agent.node);
                let checkpoint = match &event {
                    watcher::Event::Apply(c) | watcher::Event::InitApply(c) => c,
                    _ => return,
                };
                if checkpoint.meta().deletion_timestamp.is_none()
                    && let Some(wanted) = wanted(checkpoint, &agent.node)
                {
                    start_pull(&agent, &recorder, &pulls, wanted);
                }
            }
        });
    futures::join!(watch, gc, retry);
}

/// How often failed pulls are looked at for another try.
const RETRY_PERIOD: Duration = Duration::from_secs(5);

/// Tries failed pulls again once their pause has passed, while their PodCheckpoint still asks
/// for them (the watch says nothing new about an object that did not change).
async fn retry(
    agent: Arc<Agent>,
    recorder: Recorder,
    in_use: Arc<Mutex<InUse>>,
    pulls: Arc<Mutex<Pulls>>,
) {
    loop {
        tokio::time::sleep(RETRY_PERIOD).await;
        let (wanted, deleting) = {
            let in_use = in_use.lock().unwrap_or_else(|e| e.into_inner());
            // Nothing is known before the first list: nothing is forgotten either.
            let Some(names) = in_use.names() else {
                continue;
            };
            (names, in_use.deleting.clone())
        };
        let due: Vec<Wanted> = {
            let mut pulls = pulls.lock().unwrap_or_else(|e| e.into_inner());
            // Those no longer asked for, or whose object is being deleted, are forgotten.
            pulls
                .failed
                .retain(|w, _| wanted.contains(&w.name) && !deleting.contains(&w.name));
            let now = Instant::now();
            pulls
                .failed
                .iter()
                .filter(|(_, (not_before, _))| now >= *not_before)
                .map(|(w, _)| w.clone())
                .collect()
        };
        for wanted in due {
            start_pull(&agent, &recorder, &pulls, wanted);
        }
    }
}

/// The most bytes of an event's note.
const MAX_NOTE: usize = 1024;

/// `note` cut to at most [`MAX_NOTE`] bytes, on a character boundary.
fn note_of(note: &str) -> String {
    let mut end = note.len().min(MAX_NOTE);
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    note[..end].to_string()
}

/// Publishes an event about the PodCheckpoint a pull is for (a failure to publish is logged).
/// One recorder for the agent: repeated events of a pull that keeps failing become one series.
async fn publish(
    recorder: &Recorder,
    wanted: &Wanted,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let regarding = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(PodCheckpoint::api_version(&()).into_owned()),
        kind: Some(PodCheckpoint::kind(&()).into_owned()),
        namespace: Some(wanted.namespace.clone()),
        name: Some(wanted.object.clone()),
        uid: Some(wanted.uid.clone()),
        ..Default::default()
    };
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note_of(&note)),
        action: "Pull".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &regarding).await {
        tracing::warn!(error = %e, "publish event");
    }
}

/// Starts pulling `wanted` unless a pull of that checkpoint is under way, or one failed and its
/// pause has not passed.
fn start_pull(agent: &Arc<Agent>, recorder: &Recorder, pulls: &Arc<Mutex<Pulls>>, wanted: Wanted) {
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
    let recorder = recorder.clone();
    let pulls = pulls.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let credentials =
            match crate::copied_credentials(&agent, &wanted.uid, wanted.secret_name.as_deref())
                .await
            {
                Ok(crate::Copied::Own) => Ok(None),
                Ok(crate::Copied::Credentials(config)) => Ok(Some(config)),
                Ok(crate::Copied::NotYet(why) | crate::Copied::Refused(why)) => {
                    Err(format!("registry credentials: {why}"))
                }
                Err(e) => Err(format!("reading the registry credentials: {e}")),
            };
        let result = match credentials {
            Ok(credentials) => {
                images::pull(
                    &agent.registry,
                    &agent.pins_dir,
                    &agent.checkpoints_dir,
                    &wanted.name,
                    &wanted.image,
                    &wanted.namespace,
                    &wanted.uid,
                    agent.max_pull_bytes,
                    credentials.as_deref(),
                )
                .await
            }
            Err(e) => Err(e),
        };
        let note = match &result {
            Ok(PullOutcome::Pulled { size }) => Some((
                EventType::Normal,
                "Pulled",
                format!(
                    "node {}: pulled {} ({size} bytes) in {:.1}s",
                    agent.node,
                    wanted.image,
                    started.elapsed().as_secs_f64()
                ),
            )),
            Ok(PullOutcome::Present) => None,
            Err(message) => Some((
                EventType::Warning,
                "PullFailed",
                format!("node {}: {message}", agent.node),
            )),
        };
        if let Some((type_, reason, note)) = note {
            publish(&recorder, &wanted, type_, reason, note).await;
        }
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
/// no PodCheckpoint asks this node to keep that have not been asked for during the agent's `pulled_ttl`, and what pulls that did not
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

    fn checkpoint(name: &str, status: serde_json::Value) -> PodCheckpoint {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodCheckpoint",
            "metadata": {"name": name, "namespace": "team", "uid": format!("uid-{name}")},
            "spec": {"sourcePodName": "p"},
            "status": status,
        }))
        .unwrap()
    }

    fn ready(name: &str, nodes: &[&str]) -> PodCheckpoint {
        checkpoint(
            name,
            serde_json::json!({
                "phase": "Ready", "nodeName": "n1",
                "checkpointLocation": format!("/var/lib/kubelet/pod-checkpoints/checkpoint-{name}"),
                "image": {"reference": format!("r.example/x@sha256:{name}"), "size": 1},
                "pullNodes": nodes,
            }),
        )
    }

    #[test]
    fn a_checkpoint_asks_a_pull_of_the_nodes_it_lists_once_ready_with_an_image() {
        assert_eq!(
            wanted(&ready("a", &["n2"]), "n2"),
            Some(Wanted {
                name: "checkpoint-a".into(),
                object: "a".into(),
                image: "r.example/x@sha256:a".into(),
                namespace: "team".into(),
                uid: "uid-a".into(),
                secret_name: None,
            })
        );
        assert_eq!(wanted(&ready("a", &["n2"]), "n3"), None);
        assert_eq!(wanted(&ready("a", &[]), "n2"), None);
        let mut pushing = ready("a", &["n2"]);
        pushing.status.as_mut().unwrap().phase = Some(PodCheckpointPhase::Checkpointing);
        assert_eq!(wanted(&pushing, "n2"), None);
        let mut local = ready("a", &["n2"]);
        local.status.as_mut().unwrap().image = None;
        assert_eq!(wanted(&local, "n2"), None);
    }

    #[test]
    fn the_checkpoints_in_use_follow_the_watch_and_a_relist_replaces_them_whole() {
        let mut in_use = InUse::default();
        let node = "n2";
        let names = |in_use: &InUse| in_use.names().map(|n| n.into_iter().collect::<Vec<_>>());
        // Nothing is known before the first list is done: nothing may be collected.
        in_use.note(&watcher::Event::Init, node);
        in_use.note(&watcher::Event::InitApply(ready("a", &[node])), node);
        assert_eq!(names(&in_use), None);
        in_use.note(&watcher::Event::InitDone, node);
        assert_eq!(names(&in_use), Some(vec!["checkpoint-a".to_string()]));
        in_use.note(&watcher::Event::Apply(ready("b", &[node])), node);
        in_use.note(&watcher::Event::Apply(ready("c", &["n9"])), node);
        in_use.note(&watcher::Event::Delete(ready("a", &[node])), node);
        assert_eq!(names(&in_use), Some(vec!["checkpoint-b".to_string()]));
        // A relist: until it is done, what was known still counts, with what it saw.
        in_use.note(&watcher::Event::Init, node);
        in_use.note(&watcher::Event::InitApply(ready("d", &[node])), node);
        assert_eq!(
            names(&in_use),
            Some(vec!["checkpoint-b".to_string(), "checkpoint-d".to_string()])
        );
        in_use.note(&watcher::Event::InitDone, node);
        assert_eq!(names(&in_use), Some(vec!["checkpoint-d".to_string()]));
    }

    #[test]
    fn an_event_note_is_cut_to_1024_bytes_on_a_character_boundary() {
        assert_eq!(note_of("short"), "short");
        let long = "é".repeat(600);
        let cut = note_of(&long);
        assert!(
            cut.len() <= MAX_NOTE && cut.len() >= MAX_NOTE - 1,
            "{}",
            cut.len()
        );
        assert!(long.starts_with(&cut));
    }
}
