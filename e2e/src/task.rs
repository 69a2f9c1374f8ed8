//! A container created with `ctr run` outside CRI, in the tests' own containerd namespace
//! ([`CTR_NAMESPACE`]), so a test can reach Task API calls CRI does not expose (kill of an
//! exec id, pause, a bad rootfs). Dropping it kills and deletes its task and the container.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::command::Finished;
use crate::leaks::Footprint;
use crate::node::{BUSYBOX, CTR_NAMESPACE, Handler, Node};

/// A container (and maybe a task) of namespace [`CTR_NAMESPACE`].
pub struct CtrContainer {
    pub node: &'static Node,
    pub id: String,
    pub handler: Handler,
}

impl CtrContainer {
    /// A fresh container id for a test named `name`.
    pub fn unique_id(name: &str) -> String {
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        format!(
            "e2e-{name}-{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// `ctr run -d` of busybox running `argv` on `handler`; panics unless the task starts.
    pub fn run_detached(handler: Handler, name: &str, argv: &[&str]) -> CtrContainer {
        let container = Self::unstarted(handler, name);
        container.pull_busybox();
        let out = container.run(&["-d", BUSYBOX], argv);
        let node = container.node;
        assert!(
            out.success(),
            "{}\n{}",
            out.report(),
            node.log_excerpt(&[&container.id])
        );
        container
    }

    /// A container id that `ctr run` will be tried with (see [`CtrContainer::run`]); the guard
    /// removes whatever that leaves.
    pub fn unstarted(handler: Handler, name: &str) -> CtrContainer {
        CtrContainer {
            node: Node::get(),
            id: Self::unique_id(name),
            handler,
        }
    }

    /// Pulls [`BUSYBOX`] into [`CTR_NAMESPACE`] (a no-op when it is there).
    pub fn pull_busybox(&self) {
        self.node
            .ctr(CTR_NAMESPACE, ["image", "pull", "--plain-http", BUSYBOX]);
    }

    /// `ctr run --runtime <handler> <source...> <id> <argv...>`, whatever its outcome;
    /// `source` is an image (with flags such as `-d`) or `--rootfs <dir>`.
    pub fn run(&self, source: &[&str], argv: &[&str]) -> Finished {
        let args = ["run", "--runtime", self.handler.runtime_type()]
            .iter()
            .chain(source)
            .chain([&self.id.as_str()])
            .chain(argv)
            .copied()
            .collect::<Vec<_>>();
        self.node.ctr_try(CTR_NAMESPACE, args)
    }

    /// `ctr task <verb> <flags...> <id> <argv...>`, whatever its outcome.
    pub fn task(&self, verb: &str, flags: &[&str], argv: &[&str]) -> Finished {
        let args = ["task", verb]
            .iter()
            .chain(flags)
            .chain([&self.id.as_str()])
            .chain(argv)
            .copied()
            .collect::<Vec<_>>();
        self.node.ctr_try(CTR_NAMESPACE, args)
    }

    /// The task's status (`RUNNING`, `STOPPED`, ...), `None` without a task.
    pub fn status(&self) -> Option<String> {
        self.node.task_status(CTR_NAMESPACE, &self.id)
    }

    /// What the container may leave behind: its own shim (no pod groups it).
    pub fn footprint(&self) -> Footprint {
        Footprint {
            handler: self.handler,
            namespace: CTR_NAMESPACE.to_string(),
            shim_id: Some(self.id.clone()),
            ids: vec![self.id.clone()],
        }
    }
}

impl Drop for CtrContainer {
    fn drop(&mut self) {
        // Best effort and silent: most of these fail when the test already cleaned up.
        let id = self.id.as_str();
        for args in [
            &["task", "kill", "--all", "--signal", "SIGKILL", id][..],
            &["task", "delete", "--force", id],
            &["container", "delete", id],
        ] {
            if let Err(e) = self
                .node
                .ctr_command(CTR_NAMESPACE, args.iter().copied())
                .run()
            {
                eprintln!("cleanup of ctr container {id}: {e}");
            }
        }
        self.node.remove_ctr_leftovers();
    }
}
