//! Prometheus metrics of the controller, named as KEP-5823 names the PodCheckpoint object
//! metrics: `podcheckpoint_phase_total{phase}` (phase transitions),
//! `podcheckpoint_ready_condition_total{status,reason}` (transitions of the `Ready` condition;
//! both as this controller writes or sees them: a kubelet that takes a checkpoint from Pending to
//! Ready between two of its reconciles is counted once, into Ready; an object first seen after
//! a restart is counted from then on)
//! and `podcheckpoint_reconcile_duration_seconds` (one PodCheckpoint reconcile), served in the
//! Prometheus text format at `/metrics` on `--metrics-bind-address`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::api::PodCheckpointPhase;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConditionLabels {
    status: String,
    reason: String,
}

/// The controller's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    phase: Family<PhaseLabels, Counter>,
    ready_condition: Family<ConditionLabels, Counter>,
    reconcile: Histogram,
    /// The phase and Ready condition (status, reason) each PodCheckpoint was last seen with, by
    /// UID.
    seen: Mutex<HashMap<String, Seen>>,
}

type Seen = (Option<PodCheckpointPhase>, Option<(String, String)>);

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let phase = Family::<PhaseLabels, Counter>::default();
        registry.register(
            "podcheckpoint_phase",
            "Transitions of PodCheckpoint objects into each phase",
            phase.clone(),
        );
        let ready_condition = Family::<ConditionLabels, Counter>::default();
        registry.register(
            "podcheckpoint_ready_condition",
            "Transitions of the Ready condition of PodCheckpoint objects, by status and reason",
            ready_condition.clone(),
        );
        // 5 ms to ~10 minutes.
        let reconcile = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            300.0, 600.0,
        ]);
        registry.register(
            "podcheckpoint_reconcile_duration_seconds",
            "Duration of one PodCheckpoint reconcile (validation, pod spec, finalizers, retention)",
            reconcile.clone(),
        );
        Metrics {
            registry,
            phase,
            ready_condition,
            reconcile,
            seen: Mutex::default(),
        }
    }
}

impl Metrics {
    /// A PodCheckpoint moved from phase `from` to `to` (nothing when they are the same).
    pub fn phase_transition(&self, from: Option<PodCheckpointPhase>, to: PodCheckpointPhase) {
        if from != Some(to) {
            self.phase
                .get_or_create(&PhaseLabels {
                    phase: to.to_string(),
                })
                .inc();
        }
    }

    /// A PodCheckpoint's Ready condition became `status` with `reason`.
    pub fn ready_condition(&self, status: &str, reason: &str) {
        self.ready_condition
            .get_or_create(&ConditionLabels {
                status: status.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// The PodCheckpoint `uid` is now in `phase` with its Ready condition `ready` (status,
    /// reason), as written or seen; `None` leaves either as it was. Counts the transitions from
    /// what it was last seen with; the first sight of an object counts nothing.
    pub fn observe(
        &self,
        uid: &str,
        phase: Option<PodCheckpointPhase>,
        ready: Option<(String, String)>,
    ) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let Some(before) = seen.get_mut(uid) else {
            seen.insert(uid.to_string(), (phase, ready));
            return;
        };
        if let Some(phase) = phase {
            self.phase_transition(before.0, phase);
            before.0 = Some(phase);
        }
        if let Some(ready) = ready
            && before.1.as_ref() != Some(&ready)
        {
            self.ready_condition(&ready.0, &ready.1);
            before.1 = Some(ready);
        }
    }

    /// Forgets a PodCheckpoint being deleted.
    pub fn forget(&self, uid: &str) {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }

    /// One PodCheckpoint reconcile took `took`.
    pub fn reconciled(&self, took: Duration) {
        self.reconcile.observe(took.as_secs_f64());
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Serves `/metrics` (and `/healthz`) over plain HTTP on `addr` until the task is dropped. Only
/// binding fails it: a failed accept (out of file descriptors) is logged and retried.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics at /metrics");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&request, &metrics)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}

fn answer(request: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        (&hyper::Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".into()),
        (&hyper::Method::GET, _) => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        ),
    };
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_it_sees_change_only() {
        let metrics = Metrics::default();
        use PodCheckpointPhase::{Checkpointing, Pending, Ready};
        let ready = |s: &str, r: &str| Some((s.to_string(), r.to_string()));
        // Ready when first seen (a restart): nothing counted.
        metrics.observe("old", Some(Ready), ready("True", "CheckpointCompleted"));
        metrics.observe("new", None, None);
        metrics.observe("new", Some(Pending), ready("False", "Pending"));
        metrics.observe("new", None, None);
        metrics.observe("new", Some(Pending), ready("False", "Pending"));
        metrics.observe("new", Some(Ready), ready("True", "CheckpointCompleted"));
        metrics.forget("new");
        let text = metrics.encode();
        for line in [
            "podcheckpoint_phase_total{phase=\"Pending\"} 1",
            "podcheckpoint_phase_total{phase=\"Ready\"} 1",
            "podcheckpoint_ready_condition_total{status=\"False\",reason=\"Pending\"} 1",
            "podcheckpoint_ready_condition_total{status=\"True\",reason=\"CheckpointCompleted\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains(&format!("phase=\"{Checkpointing}\"")));
        assert!(metrics.seen.lock().unwrap().len() == 1);
    }

    #[test]
    fn counts_transitions_with_the_keps_names() {
        let metrics = Metrics::default();
        use PodCheckpointPhase::{Checkpointing, Ready};
        metrics.phase_transition(None, Checkpointing);
        metrics.phase_transition(Some(Checkpointing), Checkpointing);
        metrics.phase_transition(Some(Checkpointing), Ready);
        metrics.ready_condition("True", "CheckpointCompleted");
        metrics.reconciled(Duration::from_millis(30));
        let text = metrics.encode();
        for line in [
            "# TYPE podcheckpoint_phase counter",
            "podcheckpoint_phase_total{phase=\"Checkpointing\"} 1",
            "podcheckpoint_phase_total{phase=\"Ready\"} 1",
            "podcheckpoint_ready_condition_total{status=\"True\",reason=\"CheckpointCompleted\"} 1",
            "podcheckpoint_reconcile_duration_seconds_count 1",
            "podcheckpoint_reconcile_duration_seconds_bucket{le=\"0.05\"} 1",
            "podcheckpoint_reconcile_duration_seconds_bucket{le=\"0.025\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
