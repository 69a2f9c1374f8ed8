//! The containerd Task API (v3) for every container of the pod this shim serves: request
//! validation, the container map, process exits and the events containerd expects
//! (TaskCreate/Start/Exit/ExecAdded/ExecStarted/OOM/Paused/Resumed/Delete).
//!
//! Container lifecycle mechanics live in [`crate::container`]; this module decides what may
//! happen in which state and with which error code.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use containerd_shim::api::{
    ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest,
    PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse,
    StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest,
    WaitResponse,
};
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::event::Event;
use containerd_shim::monitor::{ExitEvent, Subject};
use containerd_shim::protos::api::{CheckpointTaskRequest, CloseIORequest, ProcessInfo};
use containerd_shim::protos::events::task::{
    TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO,
    TaskOOM, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext};
use containerd_shim::util::{convert_to_any, convert_to_timestamp};
use oci_spec::runtime::LinuxResources;
use time::OffsetDateTime;
use tokio::sync::{Mutex, OwnedMutexGuard, OwnedRwLockReadGuard, RwLock, mpsc};

use crate::container::{Container, DRAIN_LIMIT, ExitInfo, Process, State};
use crate::error::Error;
use crate::stdio::StdioPaths;

/// Events on their way to containerd: (topic, event).
pub type EventSender = mpsc::UnboundedSender<(String, Box<dyn MessageDyn>)>;

/// How long an exit reaped before its pid was recorded is remembered.
const EARLY_EXIT_TTL: Duration = Duration::from_secs(30);

/// Every container of the pod, and exits not yet matched to a process.
#[derive(Default)]
pub struct Pod {
    pub containers: HashMap<String, Container>,
    early_exits: HashMap<i32, (i32, OffsetDateTime, Instant)>,
}

/// The Task service of one shim (one pod).
///
/// Locks, always taken in this order, each only as long as it must be held:
/// 1. [`PodTask::ops`], shared by every lifecycle operation (create, start, delete, kill,
///    pause, resume, exec, update, checkpoint) and held exclusively by a pod checkpoint, so
///    that no container is created, started or removed while the pod is being cut;
/// 2. each container's [`Container::op`], one lifecycle operation per container at a time (a
///    kill waits for a dump of the same container to finish, as it would for runc);
/// 3. [`PodTask::pod`], the container map, held only for bookkeeping and never across a
///    dump: exits are recorded, and `state`, `wait`, `pids`, `stats` and `connect` answer,
///    while a container or the whole pod is being checkpointed.
#[derive(Clone)]
pub struct PodTask {
    pub pod: Arc<Mutex<Pod>>,
    pub ops: Arc<RwLock<()>>,
    namespace: String,
    events: EventSender,
    exit: Arc<ExitSignal>,
    oom: mpsc::UnboundedSender<String>,
}

/// How long before ttrpc's deadline of a Start a restore must be committed to be answered:
/// containerd's own deadline passed a little earlier (the request's transit), and the answer
/// needs to travel back.
const ANSWER_MARGIN: Duration = Duration::from_millis(250);

/// How long the kill of a restore whose caller had gone waits for its exit.
const ABANDONED_RESTORE_EXIT: Duration = Duration::from_secs(10);

fn container_mut<'a>(pod: &'a mut Pod, id: &str) -> crate::error::Result<&'a mut Container> {
    pod.containers
        .get_mut(id)
        .ok_or_else(|| Error::NotFound(format!("container {id} not found")))
}

/// A lifecycle operation in progress on one container ([`PodTask::begin`]).
struct OpGuard {
    _container: OwnedMutexGuard<()>,
    _pod: OwnedRwLockReadGuard<()>,
}

fn exec_id(id: &str) -> Option<&str> {
    (!id.is_empty()).then_some(id)
}

/// An exit to publish once the process's output has drained.
struct PendingExit {
    container_id: String,
    exec_id: String,
    pid: i32,
    info: ExitInfo,
    stdio: crate::stdio::ShimStdio,
    exited: tokio::sync::watch::Sender<Option<ExitInfo>>,
}

impl PodTask {
    pub fn new(
        namespace: &str,
        events: EventSender,
        exit: Arc<ExitSignal>,
        oom: mpsc::UnboundedSender<String>,
    ) -> Self {
        Self {
            pod: Arc::default(),
            ops: Arc::default(),
            namespace: namespace.to_string(),
            events,
            exit,
            oom,
        }
    }

    /// Begins a lifecycle operation on container `id`: waits for a pod checkpoint and for
    /// another operation on the same container to finish. Hold the guard for the operation.
    async fn begin(&self, id: &str) -> crate::error::Result<OpGuard> {
        let pod_ops = self.ops.clone().read_owned().await;
        let op = {
            let mut pod = self.pod.lock().await;
            container_mut(&mut pod, id)?.op.clone()
        };
        Ok(OpGuard {
            _container: op.lock_owned().await,
            _pod: pod_ops,
        })
    }

    pub fn send_event(&self, event: impl Event + 'static) {
        let topic = event.topic();
        if self.events.send((topic.clone(), Box::new(event))).is_err() {
            log::warn!("event {topic} dropped: publisher gone");
        }
    }

    /// Publishes an OOM event for `container_id`.
    pub fn send_oom(&self, container_id: String) {
        self.send_event(TaskOOM {
            container_id,
            ..Default::default()
        });
    }

    /// Records the exit of a reaped child and publishes it once its output has drained.
    pub async fn on_exit(&self, event: ExitEvent) {
        let Subject::Pid(pid) = event.subject else {
            return;
        };
        let now = OffsetDateTime::now_utc();
        let mut pod = self.pod.lock().await;
        let pending = mark_exited(&mut pod, pid, event.exit_code, now);
        if pending.is_none() {
            pod.early_exits
                .retain(|_, (_, _, seen)| seen.elapsed() < EARLY_EXIT_TTL);
            pod.early_exits
                .insert(pid, (event.exit_code, now, Instant::now()));
        }
        drop(pod);
        if let Some(pending) = pending {
            self.publish_exit(pending);
        }
    }

    fn publish_exit(&self, mut pending: PendingExit) {
        let task = self.clone();
        tokio::spawn(async move {
            // containerd waits for the process's output itself (it reads the FIFOs to EOF), so
            // the exit is published at once; the copying finishes in the background.
            let id = if pending.exec_id.is_empty() {
                pending.container_id.clone()
            } else {
                pending.exec_id.clone()
            };
            task.send_event(TaskExit {
                container_id: pending.container_id,
                id,
                pid: pending.pid as u32,
                exit_status: pending.info.status,
                exited_at: Some(convert_to_timestamp(Some(pending.info.at))).into(),
                ..Default::default()
            });
            pending.exited.send_replace(Some(pending.info));
            pending.stdio.drain(DRAIN_LIMIT).await;
        });
    }

    /// Pause (`frozen`) or resume a running (paused) container through its freezer cgroup.
    async fn set_frozen(&self, id: &str, frozen: bool) -> crate::error::Result<()> {
        let (from, to, not) = if frozen {
            (State::Running, State::Paused, "running")
        } else {
            (State::Paused, State::Running, "paused")
        };
        let _op = self.begin(id).await?;
        let mut pod = self.pod.lock().await;
        let container = container_mut(&mut pod, id)?;
        if container.init.state != from {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not {not}"
            )));
        }
        let cgroup = container.cgroup.clone();
        tokio::task::spawn_blocking(move || cgroup.freeze(frozen))
            .await
            .map_err(|e| Error::internal(e.to_string()))?
            .map_err(|e| Error::internal(format!("container {id}: {e:#}")))?;
        container.init.state = to;
        Ok(())
    }

    /// What follows the start of a container's init (`pid`): its OOM notifications and the
    /// `TaskStart` event.
    fn started(&self, container: &Container, pid: i32) {
        if let Err(e) = crate::oom::watch(&container.cgroup, &container.id, self.oom.clone()) {
            log::warn!("container {}: no OOM notifications: {e:#}", container.id);
        }
        self.send_event(TaskStart {
            container_id: container.id.clone(),
            pid: pid as u32,
            ..Default::default()
        });
    }

    /// Kills container `id`, restored after the caller of its Start had gone or too close to its
    /// deadline (containerd answered the start as failed and deletes the task next), and waits for its init's exit to be
    /// recorded, so that the delete, held by the restore's operation lock until this returns,
    /// finds it stopped.
    async fn kill_abandoned_restore(&self, id: &str) {
        log::warn!(
            "container {id}: restored after containerd gave up on its start, or too late to answer it: killed"
        );
        let exited = {
            let mut pod = self.pod.lock().await;
            let Ok(container) = container_mut(&mut pod, id) else {
                return;
            };
            let mut exited = container.init.exited.subscribe();
            if let Err(e) = container.kill(None, libc::SIGKILL as u32, true).await {
                log::warn!("container {id}: kill the abandoned restore: {e}");
            }
            async move { exited.wait_for(|e| e.is_some()).await.is_ok() }
        };
        if !matches!(
            tokio::time::timeout(ABANDONED_RESTORE_EXIT, exited).await,
            Ok(true)
        ) {
            log::warn!(
                "container {id}: no exit of the abandoned restore within \
                 {ABANDONED_RESTORE_EXIT:?}"
            );
        }
    }

    /// Applies an exit that was reaped before `pid` was recorded, if there was one.
    fn claim_early_exit(&self, pod: &mut Pod, pid: i32) {
        if let Some((code, at, _)) = pod.early_exits.remove(&pid)
            && let Some(pending) = mark_exited(pod, pid, code, at)
        {
            self.publish_exit(pending);
        }
    }
}

/// Marks the process with `pid` exited; for a container's init, kills what is left in its PID
/// namespace, as runc's shim does.
fn mark_exited(pod: &mut Pod, pid: i32, code: i32, at: OffsetDateTime) -> Option<PendingExit> {
    for container in pod.containers.values_mut() {
        let own_pid_ns = container.has_own_pid_namespace();
        let cgroup = container.cgroup.clone();
        let container_id = container.id.clone();
        let process: Option<&mut Process> = if container.init.pid == pid {
            Some(&mut container.init)
        } else {
            container.execs.values_mut().find(|p| p.pid == pid)
        };
        let Some(process) = process else { continue };
        if process.state == State::Stopped {
            return None;
        }
        process.set_exited(code, at);
        if process.exec_id.is_empty() && own_pid_ns {
            for pid in cgroup.pids().unwrap_or_default() {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        return Some(PendingExit {
            container_id,
            exec_id: process.exec_id.clone(),
            pid,
            info: process.exit.expect("just set"),
            stdio: std::mem::take(&mut process.stdio),
            exited: process.exited.clone(),
        });
    }
    None
}

#[async_trait]
impl Task for PodTask {
    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let mut pod = self.pod.lock().await;
        let container = container_mut(&mut pod, &req.id)?;
        let process = container.process(exec_id(&req.exec_id))?;
        Ok(process.state_response(container))
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        log::info!("create container {} (bundle {})", req.id, req.bundle);
        let _pod_ops = self.ops.clone().read_owned().await;
        let mut pod = self.pod.lock().await;
        if pod.containers.contains_key(&req.id) {
            return Err(
                Error::AlreadyExists(format!("container {} already exists", req.id)).into(),
            );
        }
        let container = Container::create(&self.namespace, &req).await?;
        let pid = container.init.pid;
        pod.containers.insert(req.id.clone(), container);
        self.claim_early_exit(&mut pod, pid);
        drop(pod);
        self.send_event(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            })
            .into(),
            checkpoint: req.checkpoint.clone(),
            pid: pid as u32,
            ..Default::default()
        });
        Ok(CreateTaskResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn start(&self, ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        // containerd's own deadline passes before ttrpc's timer, which starts when the request
        // arrives: a restore committed after this point may answer nobody.
        let answer_by = (ctx.timeout_nano > 0).then(|| {
            Instant::now()
                + Duration::from_nanos(ctx.timeout_nano as u64).saturating_sub(ANSWER_MARGIN)
        });
        let op = self.begin(&req.id).await?;
        let mut pod = self.pod.lock().await;
        let container = container_mut(&mut pod, &req.id)?;
        let pid = if let Some(exec) = exec_id(&req.exec_id) {
            let pid = container.start_exec(exec).await?;
            self.claim_early_exit(&mut pod, pid);
            self.send_event(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid: pid as u32,
                ..Default::default()
            });
            pid
        } else {
            match container.init.state {
                State::Created => {}
                State::Stopped => {
                    return Err(Error::FailedPrecondition(format!(
                        "container {}: init process has already exited",
                        req.id
                    ))
                    .into());
                }
                State::Running | State::Paused => {
                    return Err(Error::FailedPrecondition(format!(
                        "container {} was already started",
                        req.id
                    ))
                    .into());
                }
            }
            if container.checkpoint.is_some() {
                // A restore: run without the container map (seconds for a large container),
                // so exits, state and wait of the pod's other containers go on meanwhile; this
                // container's own operation lock keeps it as it is. It runs to its end on a
                // task of its own, lock included, even when containerd gives up on this Start
                // (its deadline drops this future): CRIU's thread goes on either way, and the
                // delete containerd sends after a failed start, let in meanwhile, removed the
                // container under CRIU (which then made its cgroups again, left behind). That
                // delete now waits for the restore; a restore that succeeded after its caller
                // gave up is killed first (containerd answered the start as failed), so the
                // delete finds it stopped.
                let job = container.restore_job()?;
                drop(pod);
                let task = self.clone();
                let id = req.id.clone();
                let (answer, answered) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    let _op = op;
                    let restored = job.await;
                    let mut pod = task.pod.lock().await;
                    let committed = restored.and_then(|restored| {
                        Ok(container_mut(&mut pod, &id)?.commit_restore(restored))
                    });
                    let pid = match committed {
                        Ok(pid) => pid,
                        Err(e) => {
                            drop(pod);
                            if let Err(Err(e)) = answer.send(Err(e)) {
                                log::warn!(
                                    "container {id}: restore failed after containerd gave up \
                                     on its start: {e}"
                                );
                            }
                            return;
                        }
                    };
                    task.claim_early_exit(&mut pod, pid);
                    let late = answer_by.is_some_and(|by| Instant::now() >= by);
                    if !late && let Ok(container) = container_mut(&mut pod, &id) {
                        task.started(container, pid);
                    }
                    drop(pod);
                    let answered = if late {
                        let _ = answer.send(Err(Error::DeadlineExceeded(format!(
                            "container {id}: restored after its start's deadline"
                        ))));
                        false
                    } else {
                        answer.send(Ok(pid)).is_ok()
                    };
                    if !answered {
                        task.kill_abandoned_restore(&id).await;
                    }
                });
                let pid = answered.await.map_err(|_| {
                    Error::internal(format!(
                        "container {}: the restore ended unanswered",
                        req.id
                    ))
                })??;
                return Ok(StartResponse {
                    pid: pid as u32,
                    ..Default::default()
                });
            }
            let pid = container.start_init().await?;
            self.started(container, pid);
            pid
        };
        Ok(StartResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        let _op = self.begin(&req.id).await?;
        let mut pod = self.pod.lock().await;
        let container = container_mut(&mut pod, &req.id)?;
        if let Some(exec) = exec_id(&req.exec_id) {
            let process = container.process(Some(exec))?;
            if matches!(process.state, State::Running | State::Paused) {
                return Err(Error::FailedPrecondition(format!(
                    "container {}: exec {exec} is still running",
                    req.id
                ))
                .into());
            }
            let process = container.execs.remove(exec).expect("checked above");
            return Ok(delete_response(&process));
        }
        if matches!(container.init.state, State::Running | State::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "container {} is still running: kill it before delete",
                req.id
            ))
            .into());
        }
        container.destroy().await;
        let mut container = pod.containers.remove(&req.id).expect("looked up above");
        if container.init.exit.is_none() {
            // Created but never started: the init was killed by destroy.
            container.init.set_exited(137, OffsetDateTime::now_utc());
        }
        drop(pod);
        let resp = delete_response(&container.init);
        self.send_event(TaskDelete {
            container_id: req.id.clone(),
            pid: resp.pid,
            exit_status: resp.exit_status,
            exited_at: resp.exited_at.clone(),
            id: req.id.clone(),
            ..Default::default()
        });
        Ok(resp)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let cgroup = {
            let mut pod = self.pod.lock().await;
            container_mut(&mut pod, &req.id)?.cgroup.clone()
        };
        let pids = tokio::task::spawn_blocking(move || cgroup.pids())
            .await
            .map_err(|e| Error::internal(e.to_string()))?
            .map_err(|e| Error::internal(format!("container {}: {e:#}", req.id)))?;
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid: pid.as_raw() as u32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        self.set_frozen(&req.id, true).await?;
        self.send_event(TaskPaused {
            container_id: req.id.clone(),
            ..Default::default()
        });
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        self.set_frozen(&req.id, false).await?;
        self.send_event(TaskResumed {
            container_id: req.id.clone(),
            ..Default::default()
        });
        Ok(Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        let _op = self.begin(&req.id).await?;
        let mut pod = self.pod.lock().await;
        let container = container_mut(&mut pod, &req.id)?;
        container
            .kill(exec_id(&req.exec_id), req.signal, req.all)
            .await?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let _op = self.begin(&req.id).await?;
        let mut pod = self.pod.lock().await;
        let container = container_mut(&mut pod, &req.id)?;
        if req.exec_id.is_empty() {
            return Err(
                Error::InvalidArgument(format!("container {}: exec id is empty", req.id)).into(),
            );
        }
        if container.execs.contains_key(&req.exec_id) {
            return Err(Error::AlreadyExists(format!(
                "container {}: exec {} already exists",
                req.id, req.exec_id
            ))
            .into());
        }
        if container.init.state != State::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running: cannot exec",
                req.id
            ))
            .into());
        }
        let spec: oci_spec::runtime::Process = serde_json::from_slice(
            &req.spec
                .as_ref()
                .map(|a| a.value.clone())
                .unwrap_or_default(),
        )
        .map_err(|e| {
            Error::InvalidArgument(format!(
                "container {}: exec {}: process spec: {e}",
                req.id, req.exec_id
            ))
        })?;
        let mut process = Process::new(
            &req.exec_id,
            StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
        );
        process.spec = Some(spec);
        container.execs.insert(req.exec_id.clone(), process);
        drop(pod);
        self.send_event(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let mut pod = self.pod.lock().await;
        let container = container_mut(&mut pod, &req.id)?;
        let process = container.process(exec_id(&req.exec_id))?;
        process
            .stdio
            .resize(req.width, req.height)
            .map_err(|e| Error::FailedPrecondition(format!("container {}: {e:#}", req.id)))?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        let mut pod = self.pod.lock().await;
        let container = container_mut(&mut pod, &req.id)?;
        container
            .process_mut(exec_id(&req.exec_id))?
            .stdio
            .close_stdin();
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let resources: LinuxResources = serde_json::from_slice(
            &req.resources
                .as_ref()
                .map(|a| a.value.clone())
                .unwrap_or_default(),
        )
        .map_err(|e| Error::InvalidArgument(format!("container {}: resources: {e}", req.id)))?;
        let _op = self.begin(&req.id).await?;
        let cgroup = {
            let mut pod = self.pod.lock().await;
            container_mut(&mut pod, &req.id)?.cgroup.clone()
        };
        tokio::task::spawn_blocking(move || cgroup.update(&resources))
            .await
            .map_err(|e| Error::internal(e.to_string()))?
            .map_err(|e| Error::internal(format!("container {}: {e:#}", req.id)))?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let mut exited = {
            let mut pod = self.pod.lock().await;
            let container = container_mut(&mut pod, &req.id)?;
            container.process(exec_id(&req.exec_id))?.exited.subscribe()
        };
        let info = exited
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| {
                Error::NotFound(format!(
                    "container {}: process deleted while waiting",
                    req.id
                ))
            })?
            .expect("waited for Some");
        Ok(WaitResponse {
            exit_status: info.status,
            exited_at: Some(convert_to_timestamp(Some(info.at))).into(),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let cgroup = {
            let mut pod = self.pod.lock().await;
            container_mut(&mut pod, &req.id)?.cgroup.clone()
        };
        let metrics = tokio::task::spawn_blocking(move || cgroup.metrics())
            .await
            .map_err(|e| Error::internal(e.to_string()))?
            .map_err(|e| Error::internal(format!("container {}: {e:#}", req.id)))?;
        let stats = convert_to_any(Box::new(metrics))
            .map_err(|e| Error::internal(format!("container {}: {e}", req.id)))?;
        Ok(StatsResponse {
            stats: Some(stats).into(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        let mut pod = self.pod.lock().await;
        let task_pid = container_mut(&mut pod, &req.id)?.init.pid;
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: task_pid as u32,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        if self.pod.lock().await.containers.is_empty() {
            self.exit.signal();
        }
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        let opts = checkpoint_options(&req)?;
        let images = opts
            .image_path
            .clone()
            .unwrap_or_else(|| std::path::PathBuf::from(&req.path));
        if !images.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "container {}: checkpoint path {:?} is not absolute",
                req.id, images
            ))
            .into());
        }
        let _op = self.begin(&req.id).await?;
        let mut pod = self.pod.lock().await;
        let container = container_mut(&mut pod, &req.id)?;
        let was_paused = match container.init.state {
            State::Running => false,
            State::Paused => true,
            State::Created | State::Stopped => {
                return Err(Error::FailedPrecondition(format!(
                    "container {} is not running: cannot checkpoint it",
                    req.id
                ))
                .into());
            }
        };
        let spec = container.spec.clone();
        let rootfs = container.rootfs();
        let cgroup = container.cgroup.clone();
        let pid = container.init.pid;
        // The dump runs without the container map: exits, state and wait go on meanwhile.
        drop(pod);
        let id = req.id.clone();
        tokio::task::spawn_blocking(move || {
            let target = crate::checkpoint::DumpTarget {
                id: &id,
                pid,
                spec: &spec,
                rootfs: &rootfs,
                freezer: cgroup.v1_dir("freezer").or_else(|| cgroup.v2_dir()),
            };
            crate::checkpoint::dump_frozen(&target, &cgroup, was_paused, &images, &opts)
        })
        .await
        .map_err(|e| Error::internal(format!("container {}: {e}", req.id)))?
        .map_err(Error::from)?;
        self.send_event(TaskCheckpointed {
            container_id: req.id.clone(),
            checkpoint: req.path.clone(),
            ..Default::default()
        });
        Ok(Empty::new())
    }
}

/// containerd's runc `CheckpointOptions` from the request (defaults when absent).
fn checkpoint_options(
    req: &CheckpointTaskRequest,
) -> ttrpc::Result<crate::checkpoint::CheckpointOptions> {
    use containerd_shim::protos::protobuf::Message;
    let Some(any) = req.options.as_ref() else {
        return Ok(Default::default());
    };
    if !any.type_url.is_empty()
        && !any
            .type_url
            .ends_with("containerd.runc.v1.CheckpointOptions")
    {
        return Err(Error::InvalidArgument(format!(
            "container {}: unsupported checkpoint options type {}",
            req.id, any.type_url
        ))
        .into());
    }
    let o = containerd_shim::protos::shim::oci::CheckpointOptions::parse_from_bytes(&any.value)
        .map_err(|e| {
            Error::InvalidArgument(format!("container {}: checkpoint options: {e}", req.id))
        })?;
    if !o.empty_namespaces.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "container {}: empty_namespaces ({}) is not supported",
            req.id,
            o.empty_namespaces.join(",")
        ))
        .into());
    }
    let path = |p: &str| (!p.is_empty()).then(|| std::path::PathBuf::from(p));
    Ok(crate::checkpoint::CheckpointOptions {
        exit: o.exit,
        open_tcp: o.open_tcp,
        external_unix_sockets: o.external_unix_sockets,
        terminal: o.terminal,
        file_locks: o.file_locks,
        image_path: path(&o.image_path),
        work_path: path(&o.work_path),
        timeout: None,
        criu_started: None,
        before_seize: None,
    })
}

fn delete_response(process: &Process) -> DeleteResponse {
    let mut resp = DeleteResponse::new();
    resp.pid = process.pid.max(0) as u32;
    if let Some(exit) = process.exit {
        resp.exit_status = exit.status;
        resp.exited_at = Some(convert_to_timestamp(Some(exit.at))).into();
    }
    resp
}
