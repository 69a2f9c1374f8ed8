//! `podsnap-controller`: reconciles `PodCheckpoint` and `PodRestore` objects
//! (`checkpoint.k8s.io/v1alpha1`, KEP-5823), and podsnap's `PodMigration` ([`migration`]). A PodCheckpoint is taken through the kubelet's pod
//! checkpoint API (`POST /checkpointpod/{namespace}/{pod}`, kubelet-patches/) on the source pod's
//! node, reached through the API server's node proxy; a PodRestore creates pods annotated
//! `checkpoint.k8s.io/restore-from: <PodCheckpoint>`, pinned to the checkpoint's node, which the
//! kubelet restores after reading that PodCheckpoint.
//!
//! Every object ends Ready/Completed or Failed with a reason; a failure is not retried (no retry
//! storm). An object found mid-checkpoint after a restart is failed cleanly: the kubelet and the
//! runtime thaw the pod and remove partial data themselves.

use podsnap_checkpoint_api as api;
use podsnap_checkpoint_api::finalizers;
mod checkpoint;
mod credentials;
#[cfg(test)]
mod fake_api;
mod metrics;
mod migration;
mod restore;
mod status;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

use api::{PodCheckpoint, PodMigration, PodRestore};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// A kubeconfig; in-cluster configuration or $KUBECONFIG when not given.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// Keep at most this many Ready PodCheckpoints per source pod (per namespace and pod name):
    /// when a new one is Ready the oldest beyond it are deleted. 0 keeps them all.
    #[arg(long, env = "PODSNAP_KEEP_LAST", default_value_t = 0)]
    keep_last: usize,
    /// Where to serve Prometheus metrics (`/metrics`) over HTTP; "0" serves none.
    #[arg(long, default_value = "127.0.0.1:8080")]
    metrics_bind_address: String,
    /// The namespace the node agents read their copies of registry credentials in (this
    /// controller's own, in `deploy/`).
    #[arg(long, env = "POD_NAMESPACE", default_value = api::SYSTEM_NAMESPACE)]
    namespace: String,
}

/// What every reconcile needs.
pub struct Context {
    pub client: Client,
    pub reporter: Reporter,
    /// Retention: Ready checkpoints kept per source pod (0: all).
    pub keep_last: usize,
    /// Where the node agents' copies of registry credentials are kept ([`credentials`]).
    pub system_namespace: String,
    pub metrics: Arc<metrics::Metrics>,
    /// Every PodCheckpoint, as the PodCheckpoint controller's reflector has them (retention).
    pub checkpoints: Store<PodCheckpoint>,
    /// Every PodRestore, as the PodRestore controller's reflector has them (is a checkpoint in
    /// use).
    pub restores: Store<PodRestore>,
}

/// Why a reconcile failed (it is retried after a pause).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Other(String),
}

/// A deletion's result, where the object being gone already is done too.
pub(crate) fn delete_ignoring_absent<T>(result: Result<T, kube::Error>) -> Result<(), Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn requeue_on_error<K, C>(_: Arc<K>, error: &Error, _: Arc<C>) -> Action {
    tracing::warn!(%error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// The PodRestores (in `store`) of `checkpoint`: what its changes reconcile.
fn restores_of(
    store: &Store<PodRestore>,
    checkpoint: &PodCheckpoint,
) -> Vec<ObjectRef<PodRestore>> {
    let key = (
        checkpoint.namespace().unwrap_or_else(|| "default".into()),
        checkpoint.name_any(),
    );
    store
        .state()
        .iter()
        .filter(|r| r.checkpoint_key() == key)
        .map(|r| ObjectRef::from_obj(r.as_ref()))
        .collect()
}

/// The PodMigration that created `object` (a PodCheckpoint or PodRestore annotated with its
/// name): their changes reconcile it.
fn migration_of<K: kube::Resource>(object: K) -> Option<ObjectRef<PodMigration>> {
    let name = object
        .meta()
        .annotations
        .as_ref()?
        .get(api::MIGRATION_ANNOTATION)?
        .clone();
    Some(ObjectRef::new(&name).within(object.meta().namespace.as_deref()?))
}

/// The PodCheckpoint a bound pod restores from by reference (its `checkpoint.k8s.io/restore-from`
/// names the object): the pod's changes reconcile it, so that an image checkpoint is pulled to
/// the node of a pod created to restore it, by a PodRestore or by anyone else.
fn checkpoint_restored_by(pod: Pod) -> Option<ObjectRef<PodCheckpoint>> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_ref())?;
    let value = pod.annotations().get(api::RESTORE_FROM)?;
    let (namespace, name) = api::restore_reference(value, &pod.namespace()?)?;
    Some(ObjectRef::new(&name).within(&namespace))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    let client = Client::try_from(config)?;
    let checkpoints = Controller::new(
        Api::<PodCheckpoint>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default(),
        checkpoint_restored_by,
    );
    // A PodRestore waits for its checkpoint to be Ready and for its pods to run: their watch
    // events reconcile it (its pods carry its controller owner reference).
    let restores = Controller::new(
        Api::<PodRestore>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Pod>::all(client.clone()), watcher::Config::default());
    let restore_store = restores.store();
    let restores = restores.watches(
        Api::<PodCheckpoint>::all(client.clone()),
        watcher::Config::default(),
        move |checkpoint| restores_of(&restore_store, &checkpoint),
    );
    // A PodMigration follows the PodCheckpoint and PodRestore it created.
    let migrations = Controller::new(
        Api::<PodMigration>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches(
        Api::<PodCheckpoint>::all(client.clone()),
        watcher::Config::default(),
        migration_of,
    )
    .watches(
        Api::<PodRestore>::all(client.clone()),
        watcher::Config::default(),
        migration_of,
    );
    let context = Arc::new(Context {
        client: client.clone(),
        reporter: Reporter {
            controller: "podsnap-controller".into(),
            instance: std::env::var("HOSTNAME").ok(),
        },
        keep_last: args.keep_last,
        system_namespace: args.namespace.clone(),
        metrics: Arc::new(metrics::Metrics::default()),
        checkpoints: checkpoints.store(),
        restores: restores.store(),
    });
    let serve_metrics = async {
        if args.metrics_bind_address == "0" {
            return std::future::pending().await;
        }
        let addr = args.metrics_bind_address.parse().map_err(|e| {
            anyhow::anyhow!(
                "--metrics-bind-address {:?}: {e}",
                args.metrics_bind_address
            )
        })?;
        metrics::serve(addr, context.metrics.clone())
            .await
            .map_err(|e| anyhow::anyhow!("serve metrics on {addr}: {e}"))
    };
    // Copies of registry credentials whose PodCheckpoint went without this controller seeing
    // it go (its deletion removes a copy when it comes here).
    let collect_credentials = async {
        let store = context.checkpoints.clone();
        if store.wait_until_ready().await.is_err() {
            return std::future::pending().await;
        }
        loop {
            match credentials::collect(&context, &store).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    removed = n,
                    "removed registry credentials of deleted PodCheckpoints"
                ),
                Err(error) => tracing::warn!(%error, "collecting registry credentials"),
            }
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    };
    tracing::info!("podsnap-controller started");
    let checkpoints = checkpoints
        .run(
            checkpoint::reconcile_timed,
            requeue_on_error,
            context.clone(),
        )
        .for_each(|_| async {});
    let restores = restores
        .run(restore::reconcile, requeue_on_error, context.clone())
        .for_each(|_| async {});
    let migrations = migrations
        .run(migration::reconcile, requeue_on_error, context.clone())
        .for_each(|_| async {});
    tokio::select! {
        _ = checkpoints => {}
        _ = restores => {}
        _ = migrations => {}
        result = serve_metrics => result?,
        () = collect_credentials => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
    }
    Ok(())
}
