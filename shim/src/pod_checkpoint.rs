//! Pod checkpoint: several containers of the pod captured as one consistent cut, served on the
//! shim's pod socket to podsnapd ([`podsnap_pod_api`]).
//!
//! Every selected container is frozen before any is captured and all stay frozen until every
//! capture finished (or failed, or the deadline passed); then all are thawed, whatever
//! happened. The captures run in parallel, one CRIU per container. A failed pod checkpoint
//! removes what it wrote.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use podsnap_pod_api::{ContainerCapture, PodRequest, PodResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use std::sync::{Arc, Condvar, Mutex};

use crate::cgroup::ContainerCgroup;
use crate::checkpoint::{self, BeforeSeize, CheckpointOptions, DumpTarget, Follower};
use crate::container::State;
use crate::error::Error;
use crate::task::PodTask;
use crate::thaw_guard::{ThawGuard, Watchdog};

/// The shim's own binary, which runs the thaw guard.
const SELF_EXE: &str = "/proc/self/exe";

/// One container to capture, copied out of the pod state.
struct Capture {
    id: String,
    pid: i32,
    spec: oci_spec::runtime::Spec,
    rootfs: PathBuf,
    cgroup: ContainerCgroup,
    upperdir: Option<PathBuf>,
}

/// Where a pod's CRIUs wait, started and set up, until the whole pod is frozen (their
/// `pre-dump` notification, before they seize any task).
struct FreezeGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// Its capture has not reached the gate yet.
    Pending,
    /// Its CRIU waits at the gate.
    Waiting,
    /// Its capture ended without reaching the gate (it failed before its CRIU was ready).
    Ended,
}

struct GateState {
    arrivals: Vec<Arrival>,
    /// Set once: whether the CRIUs go on (the pod is frozen) or give up.
    open: Option<bool>,
}

/// What [`FreezeGate::arrivals`] saw.
enum Arrivals {
    AllWaiting,
    SomeEnded,
    Expired,
}

impl FreezeGate {
    fn new(captures: usize) -> Self {
        FreezeGate {
            state: Mutex::new(GateState {
                arrivals: vec![Arrival::Pending; captures],
                open: None,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Capture `i`'s CRIU is ready: waits until the gate opens (`Ok`) or is closed (`Err`).
    fn wait(&self, i: usize) -> Result<(), String> {
        let mut state = self.lock();
        state.arrivals[i] = Arrival::Waiting;
        self.changed.notify_all();
        loop {
            match state.open {
                Some(true) => return Ok(()),
                Some(false) => {
                    return Err(
                        "the pod checkpoint gave up before the freeze (see the other containers)"
                            .into(),
                    );
                }
                None => state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }

    /// Capture `i` ended (its thread returns).
    fn ended(&self, i: usize) {
        let mut state = self.lock();
        if state.arrivals[i] == Arrival::Pending {
            state.arrivals[i] = Arrival::Ended;
            self.changed.notify_all();
        }
    }

    /// Waits until every capture waits at the gate, or one ended without reaching it, or the
    /// deadline passed; in the last two cases the gate is closed (its CRIUs give up).
    fn arrivals(&self, deadline: Option<Instant>) -> Arrivals {
        let seen = self.arrive(deadline);
        if !matches!(seen, Arrivals::AllWaiting) {
            self.open(false);
        }
        seen
    }

    fn arrive(&self, deadline: Option<Instant>) -> Arrivals {
        let mut state = self.lock();
        loop {
            if state.arrivals.contains(&Arrival::Ended) {
                return Arrivals::SomeEnded;
            }
            if state.arrivals.iter().all(|a| *a == Arrival::Waiting) {
                return Arrivals::AllWaiting;
            }
            state = match deadline {
                None => self.changed.wait(state).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Arrivals::Expired;
                    }
                    self.changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Lets the waiting CRIUs go on (`true`) or makes them give up; the first call decides.
    fn open(&self, go: bool) {
        let mut state = self.lock();
        state.open.get_or_insert(go);
        self.changed.notify_all();
    }

    /// Whether the gate let the CRIUs go on.
    fn opened(&self) -> bool {
        self.lock().open == Some(true)
    }

    /// The captures whose CRIU was waiting when the gate closed.
    fn turned_back(&self) -> Vec<usize> {
        let state = self.lock();
        if state.open == Some(true) {
            return Vec::new();
        }
        (0..state.arrivals.len())
            .filter(|i| state.arrivals[*i] == Arrival::Waiting)
            .collect()
    }
}

/// Marks capture `.1` ended when dropped (see [`FreezeGate::ended`]).
struct Ended<'a>(&'a FreezeGate, usize);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.ended(self.1);
    }
}

/// Closes the gate when dropped, unless it was opened: no CRIU waits forever.
struct GateCloser<'a>(&'a FreezeGate);

impl Drop for GateCloser<'_> {
    fn drop(&mut self) {
        self.0.open(false);
    }
}

/// The answer for a failed request: the error's code and message.
fn failed(error: Error) -> PodResponse {
    PodResponse::Failed {
        code: error.pod_code(),
        message: error.to_string(),
    }
}

/// The answer for several failures (one per container): the first one's code, every message.
fn failed_all(errors: Vec<Error>) -> PodResponse {
    let code = errors
        .first()
        .map_or(podsnap_pod_api::ErrorCode::Internal, Error::pod_code);
    PodResponse::Failed {
        code,
        message: errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// Serves the pod socket until the shim exits.
pub async fn serve(task: PodTask, socket: PathBuf) -> anyhow::Result<()> {
    let dir = socket.parent().context("pod socket has no directory")?;
    checkpoint::private_dir(dir)?;
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("listen on {}", socket.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let task = task.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(task, stream).await {
                log::warn!("pod socket: {e:#}");
            }
        });
    }
}

async fn handle(task: PodTask, mut stream: UnixStream) -> anyhow::Result<()> {
    let len = stream.read_u32().await?;
    anyhow::ensure!(len <= podsnap_pod_api::MAX_MESSAGE, "request too large");
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data).await?;
    let response = match serde_json::from_slice::<PodRequest>(&data) {
        Ok(request) => checkpoint_sandbox(&task, request).await,
        Err(e) => failed(Error::InvalidArgument(format!(
            "malformed pod request: {e}"
        ))),
    };
    let mut out = Vec::new();
    podsnap_pod_api::write_message(&mut out, &response)?;
    let sent = async {
        stream.write_all(&out).await?;
        stream.flush().await
    }
    .await;
    if let Err(e) = sent {
        // The caller (podsnapd) is gone: nobody will adopt what was written, so it goes.
        if let PodResponse::Checkpointed { containers, .. } = &response {
            for container in containers {
                let _ = tokio::fs::remove_dir_all(&container.dir).await;
            }
            if let Some(output) = containers.first().and_then(|c| c.dir.parent()) {
                let _ = tokio::fs::remove_dir_all(output.join(crate::volumes::VOLUMES_DIR)).await;
            }
            log::warn!(
                "pod socket: the caller went away before the answer; its checkpoint was removed"
            );
        }
        return Err(e.into());
    }
    Ok(())
}

async fn checkpoint_sandbox(task: &PodTask, request: PodRequest) -> PodResponse {
    let PodRequest::CheckpointSandbox {
        container_ids,
        output_dir,
        leave_running,
        tcp_established,
        timeout_ms,
    } = request;
    if container_ids.is_empty() {
        return failed(Error::InvalidArgument("no containers to checkpoint".into()));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = container_ids.iter().find(|id| !seen.insert(*id)) {
        return failed(Error::InvalidArgument(format!(
            "container {dup} is listed twice"
        )));
    }
    if !output_dir.is_absolute() || !output_dir.is_dir() {
        return failed(Error::InvalidArgument(format!(
            "output directory {} is not an existing absolute directory",
            output_dir.display()
        )));
    }
    // No lifecycle operation runs during the capture (no container is created, started or
    // removed, see `PodTask`'s locks); the container map itself is only read here, so exits,
    // state and wait go on.
    // The deadline counts from here: waiting for an operation under way (a container's own
    // checkpoint, a start) is part of it, and a caller that gave up is not checkpointed later.
    let requested = Instant::now();
    let pod_ops = task.ops.clone().write_owned();
    let _pod_ops = match timeout_ms.map(Duration::from_millis) {
        Some(limit) => match tokio::time::timeout(limit, pod_ops).await {
            Ok(guard) => guard,
            Err(_) => {
                return failed(Error::DeadlineExceeded(format!(
                    "the deadline ({limit:?}) passed while another operation on the pod's \
                     containers was under way; nothing was frozen"
                )));
            }
        },
        None => pod_ops.await,
    };
    let pod = task.pod.lock().await;
    let mut captures = Vec::new();
    for id in &container_ids {
        let Some(container) = pod.containers.get(id) else {
            return failed(Error::NotFound(format!(
                "container {id} is not in this pod"
            )));
        };
        if container.init.state != State::Running {
            return failed(Error::FailedPrecondition(format!(
                "container {id} is not running ({:?})",
                container.init.state
            )));
        }
        if let Some(refusal) = checkpoint::userns::refusal(id, &container.spec) {
            return failed(Error::FailedPrecondition(refusal));
        }
        captures.push(Capture {
            id: id.clone(),
            pid: container.init.pid,
            spec: container.spec.clone(),
            rootfs: container.rootfs(),
            cgroup: container.cgroup.clone(),
            upperdir: container.upperdir.clone(),
        });
    }
    // Every other running container of the pod (the sandbox's, sidecars, ephemeral ones) is
    // frozen too: they share the pod's volumes and network, and the cut must be consistent.
    let bystanders: Vec<ContainerCgroup> = pod
        .containers
        .iter()
        .filter(|(id, c)| !container_ids.contains(id) && c.init.state == State::Running)
        .map(|(_, c)| c.cgroup.clone())
        .collect();
    let opts = CheckpointOptions {
        exit: !leave_running,
        open_tcp: tcp_established,
        ..Default::default()
    };
    drop(pod);
    let timeout =
        timeout_ms.map(|ms| Duration::from_millis(ms).saturating_sub(requested.elapsed()));
    let result = tokio::task::spawn_blocking(move || {
        capture_pod(&captures, &bystanders, &output_dir, &opts, timeout)
    })
    .await;
    match result {
        Ok(response) => response,
        Err(e) => failed(Error::internal(format!("pod checkpoint task: {e}"))),
    }
}

/// Freezes all, captures all in parallel, thaws all: on success, error, deadline (the
/// watchdog thaws at the deadline whatever still runs) and panic alike, and a guard process
/// thaws them should the shim die meanwhile ([`ThawGuard`]).
fn capture_pod(
    captures: &[Capture],
    bystanders: &[ContainerCgroup],
    output_dir: &Path,
    opts: &CheckpointOptions,
    timeout: Option<Duration>,
) -> PodResponse {
    let start = Instant::now();
    let deadline = timeout.map(|t| start + t);
    let guard = ThawGuard::start(Path::new(SELF_EXE));
    // Each CRIU is reported to the guard process as it starts: should the shim die, the guard
    // waits for them to end before its last thaw.
    let opts = &CheckpointOptions {
        // Should the shim die, the guard waits for them up to the deadline and a minute more
        // (an hour without one), then thaws again all the same.
        criu_started: guard.criu_started(
            timeout.map_or(Duration::from_secs(3600), |t| t + Duration::from_secs(60)),
        ),
        ..opts.clone()
    };
    let guard = Arc::new(Mutex::new(guard));
    let watchdog = Watchdog::start(guard.clone(), deadline);
    let expired = || deadline.is_some_and(|d| Instant::now() >= d);
    let guard_started = start.elapsed();
    // The CRIUs start before the freeze: each, set up, waits at the gate (its `pre-dump`) until
    // the whole pod is frozen, so that their start-up is not part of the freeze window.
    let gate = Arc::new(FreezeGate::new(captures.len()));
    let mut first_freeze = Instant::now();
    let mut ready = None;
    let mut frozen = None;
    let mut captured = None;
    let mut response = None;
    // The page hashers of the captured containers, in `containers`' order.
    let mut followers = Vec::new();
    let results: Vec<anyhow::Result<(ContainerCapture, Follower)>> = std::thread::scope(|scope| {
        // Whatever happens below (a panic included, a thread that cannot start), the CRIUs at
        // the gate are let go.
        let _closed = GateCloser(&gate);
        let handles: Vec<_> = captures
            .iter()
            .enumerate()
            .map(|(i, capture)| {
                let gate = gate.clone();
                let opts = CheckpointOptions {
                    before_seize: Some(BeforeSeize(Arc::new({
                        let gate = gate.clone();
                        move || gate.wait(i)
                    }))),
                    ..opts.clone()
                };
                scope.spawn(move || {
                    // Ended however the capture ends, a panic included.
                    let _ended = Ended(&gate, i);
                    capture_container(capture, output_dir, &opts, deadline)
                })
            })
            .collect();
        match gate.arrivals(deadline) {
            Arrivals::AllWaiting => {
                ready = Some(start.elapsed());
                // The freeze window starts here.
                first_freeze = Instant::now();
                let to_freeze: Vec<(&str, &ContainerCgroup)> = captures
                    .iter()
                    .map(|c| (c.id.as_str(), &c.cgroup))
                    .chain(bystanders.iter().map(|c| ("(not captured)", c)))
                    .collect();
                let freezing = guard
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .freeze_all(&to_freeze);
                if let Err((id, e)) = freezing {
                    response = Some(failed(Error::internal(format!(
                        "container {id}: freeze: {e:#}"
                    ))));
                } else if expired() {
                    response = Some(failed(Error::DeadlineExceeded(
                        "the deadline passed while the pod was being frozen".into(),
                    )));
                }
                if response.is_none() {
                    frozen = Some(first_freeze.elapsed());
                }
                gate.open(response.is_none());
            }
            // A capture failed before its CRIU was ready: its error says why.
            Arrivals::SomeEnded => {}
            Arrivals::Expired => {
                response = Some(failed(Error::DeadlineExceeded(
                    "the deadline passed while CRIU was starting; nothing was frozen".into(),
                )));
            }
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("capture thread panicked")))
            })
            .collect()
    });
    let response = if !gate.opened() {
        // Those the gate turned back failed because of another's failure, which says why.
        let turned_back = gate.turned_back();
        let (theirs, own): (Vec<_>, Vec<_>) = results
            .into_iter()
            .enumerate()
            .filter_map(|(i, r)| r.err().map(|e| (i, Error::from(e))))
            .partition(|(i, _)| turned_back.contains(i));
        let own: Vec<Error> = own.into_iter().map(|(_, e)| e).collect();
        match response {
            Some(response) => response,
            None if !own.is_empty() => failed_all(own),
            None if !theirs.is_empty() => failed_all(theirs.into_iter().map(|(_, e)| e).collect()),
            None => failed(Error::internal(
                "the pod checkpoint gave up before the freeze".to_string(),
            )),
        }
    } else {
        let mut containers = Vec::new();
        let mut errors = Vec::new();
        for result in results {
            match result {
                Ok((capture, follower)) => {
                    containers.push(capture);
                    followers.push(follower);
                }
                Err(e) => errors.push(Error::from(e)),
            }
        }
        captured = Some(first_freeze.elapsed());
        // The pod's emptyDir volumes, in the same cut: while the pod is still frozen.
        if errors.is_empty()
            && !expired()
            && let Err(e) = crate::volumes::capture(
                &crate::volumes::empty_dirs(captures.iter().map(|c| &c.spec)),
                output_dir,
            )
        {
            errors.push(Error::from(e));
        }
        if expired() {
            errors.insert(
                0,
                Error::DeadlineExceeded("the deadline passed during the capture".into()),
            );
            failed_all(errors)
        } else if errors.is_empty() {
            PodResponse::Checkpointed {
                containers,
                freeze_window_ms: 0,
            }
        } else {
            failed_all(errors)
        }
    };
    // Thaw everything we asked to freeze, whatever happened: a pod is never left frozen. The
    // caller hears the answer only after this.
    drop(watchdog);
    let thaw_errors = match Arc::try_unwrap(guard) {
        Ok(guard) => {
            let guard = guard.into_inner().unwrap_or_else(|e| e.into_inner());
            if guard.expired() {
                log::warn!(
                    "pod checkpoint: the deadline passed while frozen; the watchdog thawed the pod"
                );
            }
            guard.finish()
        }
        // Not expected (the watchdog, its only other owner, has been joined): thaw all the same.
        Err(shared) => {
            let guard = shared.lock().unwrap_or_else(|e| e.into_inner());
            guard.thaw_all()
        }
    };
    let response = match response {
        PodResponse::Checkpointed { .. } if !thaw_errors.is_empty() => {
            failed(Error::internal(thaw_errors.join("; ")))
        }
        other => other,
    };
    let window = first_freeze.elapsed().as_millis() as u64;
    let thawed = Instant::now();
    // Hashing the images needs no frozen pod: the followers hashed most of the pages while
    // CRIU wrote them; seal them after the thaw, in parallel.
    let response = match response {
        PodResponse::Checkpointed { containers, .. } => {
            let sealed: Vec<anyhow::Result<()>> = std::thread::scope(|scope| {
                let handles: Vec<_> = containers
                    .iter()
                    .zip(std::mem::take(&mut followers))
                    .map(|(c, follower)| {
                        scope.spawn(move || checkpoint::seal(&c.dir.join("checkpoint"), follower))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("seal thread panicked")))
                    })
                    .collect()
            });
            let errors: Vec<String> = sealed
                .into_iter()
                .filter_map(|r| r.err().map(|e| format!("{e:#}")))
                .collect();
            if errors.is_empty() {
                PodResponse::Checkpointed {
                    containers,
                    freeze_window_ms: window,
                }
            } else {
                failed(Error::internal(errors.join("; ")))
            }
        }
        failure => failure,
    };
    log::info!(
        "pod capture: thaw guard started in {} ms, CRIU ready at {} ms; freeze window {window} ms \
         (all frozen at {} ms, captured at {} ms); sealed in {} ms",
        guard_started.as_millis(),
        ready.map_or(0, |d| d.as_millis()),
        frozen.map_or(0, |d| d.as_millis()),
        captured.map_or(0, |d| d.as_millis()),
        thawed.elapsed().as_millis()
    );
    match response {
        PodResponse::Checkpointed { containers, .. } => PodResponse::Checkpointed {
            containers,
            freeze_window_ms: window,
        },
        failure => {
            for capture in captures {
                let _ = std::fs::remove_dir_all(output_dir.join(&capture.id));
            }
            let _ = std::fs::remove_dir_all(output_dir.join(crate::volumes::VOLUMES_DIR));
            failure
        }
    }
}

fn capture_container(
    capture: &Capture,
    output_dir: &Path,
    opts: &CheckpointOptions,
    deadline: Option<Instant>,
) -> anyhow::Result<(ContainerCapture, Follower)> {
    let started = Instant::now();
    // Not `private_dir`: should the caller remove its output directory meanwhile (it gave up),
    // it must not come back.
    let dir = output_dir.join(&capture.id);
    checkpoint::new_private_dir(&dir)?;
    checkpoint::new_private_dir(&dir.join("checkpoint"))?;
    let mut opts = opts.clone();
    if let Some(deadline) = deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(
            !left.is_zero(),
            "container {}: deadline exceeded before its dump",
            capture.id
        );
        opts.timeout = Some(left);
    }
    let target = DumpTarget {
        id: &capture.id,
        pid: capture.pid,
        spec: &capture.spec,
        rootfs: &capture.rootfs,
        freezer: capture
            .cgroup
            .v1_dir("freezer")
            .or_else(|| capture.cgroup.v2_dir()),
    };
    let follower = checkpoint::dump_unsealed(&target, &dir.join("checkpoint"), &opts)?;
    if let Some(upper) = &capture.upperdir {
        crate::rootfs_diff::capture(upper, &dir)
            .with_context(|| format!("container {}: capture writable layer", capture.id))?;
    }
    Ok((
        ContainerCapture {
            container_id: capture.id.clone(),
            dir,
            dump_ms: started.elapsed().as_millis() as u64,
        },
        follower,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `captures` threads, each doing `capture(i, gate)`, and the main thread's side of the
    /// gate; returns what the main thread saw and each capture's outcome.
    fn run_gate(
        captures: usize,
        deadline: Option<Instant>,
        go: bool,
        capture: impl Fn(usize, &FreezeGate) -> Result<(), String> + Sync,
    ) -> (&'static str, Vec<Result<(), String>>, Vec<usize>) {
        let gate = FreezeGate::new(captures);
        let (seen, outcomes) = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..captures)
                .map(|i| {
                    let (gate, capture) = (&gate, &capture);
                    scope.spawn(move || {
                        let _ended = Ended(gate, i);
                        capture(i, gate)
                    })
                })
                .collect();
            let _closed = GateCloser(&gate);
            let seen = match gate.arrivals(deadline) {
                Arrivals::AllWaiting => {
                    gate.open(go);
                    "all waiting"
                }
                Arrivals::SomeEnded => "some ended",
                Arrivals::Expired => "expired",
            };
            let outcomes: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            (seen, outcomes)
        });
        (seen, outcomes, gate.turned_back())
    }

    #[test]
    fn the_gate_opens_once_every_criu_waits_at_it() {
        let (seen, outcomes, turned_back) = run_gate(3, None, true, |i, gate| {
            std::thread::sleep(Duration::from_millis(10 * i as u64));
            gate.wait(i)
        });
        assert_eq!(seen, "all waiting");
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        assert!(turned_back.is_empty());
    }

    #[test]
    fn a_capture_failing_before_its_criu_is_ready_turns_the_others_back() {
        let (seen, outcomes, turned_back) = run_gate(3, None, true, |i, gate| {
            if i == 1 {
                std::thread::sleep(Duration::from_millis(20));
                return Err("mountinfo unreadable".into());
            }
            gate.wait(i)
        });
        assert_eq!(seen, "some ended");
        assert_eq!(outcomes[1], Err("mountinfo unreadable".into()));
        for i in [0, 2] {
            assert!(
                outcomes[i]
                    .as_ref()
                    .unwrap_err()
                    .contains("gave up before the freeze"),
                "{outcomes:?}"
            );
        }
        assert_eq!(turned_back, vec![0, 2]);
    }

    #[test]
    fn a_freeze_that_fails_turns_every_criu_back() {
        let (seen, outcomes, turned_back) = run_gate(2, None, false, |i, gate| gate.wait(i));
        assert_eq!(seen, "all waiting");
        assert!(outcomes.iter().all(Result::is_err), "{outcomes:?}");
        assert_eq!(turned_back, vec![0, 1]);
    }

    #[test]
    fn a_deadline_passing_before_every_criu_is_ready_turns_the_late_ones_back_too() {
        let deadline = Some(Instant::now() + Duration::from_millis(30));
        let (seen, outcomes, turned_back) = run_gate(2, deadline, true, |i, gate| {
            if i == 1 {
                std::thread::sleep(Duration::from_millis(200));
            }
            gate.wait(i)
        });
        assert_eq!(seen, "expired");
        assert!(outcomes.iter().all(Result::is_err), "{outcomes:?}");
        assert_eq!(turned_back, vec![0, 1]);
    }

    #[test]
    fn the_first_decision_stands() {
        let gate = FreezeGate::new(1);
        gate.open(true);
        gate.open(false);
        assert!(gate.opened());
        assert_eq!(gate.wait(0), Ok(()));
    }

    #[test]
    fn a_capture_that_panics_before_its_criu_is_ready_turns_the_others_back() {
        let gate = FreezeGate::new(2);
        let seen = std::thread::scope(|scope| {
            let _closed = GateCloser(&gate);
            let waiting = scope.spawn(|| {
                let _ended = Ended(&gate, 0);
                gate.wait(0)
            });
            let panicked = scope.spawn(|| {
                let _ended = Ended(&gate, 1);
                panic!("capture thread panics");
            });
            let seen = matches!(gate.arrivals(None), Arrivals::SomeEnded);
            assert!(panicked.join().is_err());
            assert!(waiting.join().unwrap().is_err());
            seen
        });
        assert!(seen, "a panicked capture counts as ended");
    }
}
