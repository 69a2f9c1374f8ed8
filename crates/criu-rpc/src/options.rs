//! Options of a dump, pre-dump and restore, and their mapping onto CRIU's `criu_opts` message.
//!
//! The builders here hold paths and flags only; opening the images and work directories, duplicating
//! inherited fds and talking to CRIU belong to the session code, which hands the resulting fd numbers
//! to [`DumpOptions::to_criu_opts`] / [`RestoreOptions::to_criu_opts`]. Options default to CRIU's
//! defaults; a flag left off is not sent, so CRIU's configuration files still apply to it.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};

use crate::error::ErrorKind;
use crate::rpc;

/// CRIU's default log level (4: debug), the level runc and containerd use: failures are
/// explained by the lines just before them.
pub const DEFAULT_LOG_LEVEL: i32 = 4;

/// How CRIU handles cgroups (`--manage-cgroups=MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CgroupMode {
    /// Neither dump nor restore cgroups (`ignore`).
    Ignore,
    /// Dump cgroup membership, restore no properties (`none`).
    None,
    /// Restore properties only (`props`).
    Props,
    /// Restore properties of cgroups CRIU creates; leave existing ones (`soft`).
    Soft,
    /// Restore all properties (`full`).
    Full,
    /// Require every cgroup to be absent before restore (`strict`).
    Strict,
    /// CRIU's default mode (`default`).
    Default,
}

impl CgroupMode {
    fn to_rpc(self) -> rpc::CriuCgMode {
        match self {
            CgroupMode::Ignore => rpc::CriuCgMode::Ignore,
            CgroupMode::None => rpc::CriuCgMode::CgNone,
            CgroupMode::Props => rpc::CriuCgMode::Props,
            CgroupMode::Soft => rpc::CriuCgMode::Soft,
            CgroupMode::Full => rpc::CriuCgMode::Full,
            CgroupMode::Strict => rpc::CriuCgMode::Strict,
            CgroupMode::Default => rpc::CriuCgMode::Default,
        }
    }
}

/// How CRIU locks the network of a dumped net namespace (`--network-lock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetworkLockMethod {
    /// `iptables-restore` rules (CRIU's default; needs `iptables`).
    Iptables,
    /// An nftables table.
    Nftables,
    /// Do not lock; the caller locks the network itself.
    Skip,
}

impl NetworkLockMethod {
    fn to_rpc(self) -> rpc::CriuNetworkLockMethod {
        match self {
            NetworkLockMethod::Iptables => rpc::CriuNetworkLockMethod::Iptables,
            NetworkLockMethod::Nftables => rpc::CriuNetworkLockMethod::Nftables,
            NetworkLockMethod::Skip => rpc::CriuNetworkLockMethod::Skip,
        }
    }
}

/// How a pre-dump reads memory (`--pre-dump-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PreDumpMode {
    /// vmsplice pages into pipes (CRIU's default).
    Splice,
    /// `process_vm_readv`: less time frozen, more copying.
    VmRead,
}

impl PreDumpMode {
    fn to_rpc(self) -> rpc::CriuPreDumpMode {
        match self {
            PreDumpMode::Splice => rpc::CriuPreDumpMode::Splice,
            PreDumpMode::VmRead => rpc::CriuPreDumpMode::VmRead,
        }
    }
}

/// A page server: on dump, where to send pages (`--page-server --address --port`); with
/// `lazy_pages`, the port the lazy-pages server listens on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PageServer {
    /// Address of the page server; `None` for a lazy-pages listener on all addresses.
    pub address: Option<String>,
    /// TCP port.
    pub port: u16,
}

/// Options both a dump and a restore take.
#[derive(Debug, Clone)]
struct CommonOptions {
    images_dir: PathBuf,
    work_dir: Option<PathBuf>,
    log_file: Option<String>,
    log_level: i32,
    leave_stopped: bool,
    tcp_established: bool,
    tcp_close: bool,
    tcp_skip_in_flight: bool,
    ext_unix_sk: bool,
    shell_job: bool,
    file_locks: bool,
    evasive_devices: bool,
    link_remap: bool,
    manage_cgroups: Option<CgroupMode>,
    ext_mounts: Vec<(String, String)>,
    external: Vec<String>,
    auto_ext_mnt: bool,
    ext_sharing: bool,
    ext_masters: bool,
    skip_mounts: Vec<String>,
    enable_fs: Vec<String>,
    root: Option<PathBuf>,
    orphan_pts_master: bool,
    lazy_pages: bool,
    page_server: Option<PageServer>,
    network_lock: Option<NetworkLockMethod>,
    lsm_profile: Option<String>,
    config_file: Option<PathBuf>,
    timeout_secs: Option<u32>,
    cpu_check: bool,
}

impl CommonOptions {
    fn new(images_dir: PathBuf) -> Self {
        CommonOptions {
            images_dir,
            work_dir: None,
            log_file: None,
            log_level: DEFAULT_LOG_LEVEL,
            leave_stopped: false,
            tcp_established: false,
            tcp_close: false,
            tcp_skip_in_flight: false,
            ext_unix_sk: false,
            shell_job: false,
            file_locks: false,
            evasive_devices: false,
            link_remap: false,
            manage_cgroups: None,
            ext_mounts: Vec::new(),
            external: Vec::new(),
            auto_ext_mnt: false,
            ext_sharing: false,
            ext_masters: false,
            skip_mounts: Vec::new(),
            enable_fs: Vec::new(),
            root: None,
            orphan_pts_master: false,
            lazy_pages: false,
            page_server: None,
            network_lock: None,
            lsm_profile: None,
            config_file: None,
            timeout_secs: None,
            cpu_check: false,
        }
    }

    fn validate(&self, default_log: &str) -> Result<(), ErrorKind> {
        let log = self.log_file.as_deref().unwrap_or(default_log);
        if log.is_empty() || log.contains('/') {
            return Err(ErrorKind::InvalidOptions(format!(
                "log file {log:?} must be a plain file name (CRIU writes it into the work directory)"
            )));
        }
        if !(0..=4).contains(&self.log_level) {
            return Err(ErrorKind::InvalidOptions(format!(
                "log level {} is not in 0..=4",
                self.log_level
            )));
        }
        Ok(())
    }

    fn to_criu_opts(
        &self,
        images_dir_fd: RawFd,
        work_dir_fd: Option<RawFd>,
        default_log: &str,
    ) -> rpc::CriuOpts {
        let mut opts = rpc::CriuOpts {
            images_dir_fd,
            work_dir_fd,
            log_file: Some(
                self.log_file
                    .clone()
                    .unwrap_or_else(|| default_log.to_owned()),
            ),
            log_level: Some(self.log_level),
            leave_stopped: flag(self.leave_stopped),
            tcp_established: flag(self.tcp_established),
            tcp_close: flag(self.tcp_close),
            tcp_skip_in_flight: flag(self.tcp_skip_in_flight),
            ext_unix_sk: flag(self.ext_unix_sk),
            shell_job: flag(self.shell_job),
            file_locks: flag(self.file_locks),
            evasive_devices: flag(self.evasive_devices),
            link_remap: flag(self.link_remap),
            ext_mnt: self
                .ext_mounts
                .iter()
                .map(|(key, val)| rpc::ExtMountMap {
                    key: key.clone(),
                    val: val.clone(),
                })
                .collect(),
            external: self.external.clone(),
            auto_ext_mnt: flag(self.auto_ext_mnt),
            ext_sharing: flag(self.ext_sharing),
            ext_masters: flag(self.ext_masters),
            skip_mnt: self.skip_mounts.clone(),
            enable_fs: self.enable_fs.clone(),
            root: self.root.as_deref().map(path_string),
            orphan_pts_master: flag(self.orphan_pts_master),
            lazy_pages: flag(self.lazy_pages),
            ps: self.page_server.as_ref().map(|ps| rpc::CriuPageServerInfo {
                address: ps.address.clone(),
                port: Some(i32::from(ps.port)),
                pid: None,
                fd: None,
            }),
            lsm_profile: self.lsm_profile.clone(),
            config_file: self.config_file.as_deref().map(path_string),
            timeout: self.timeout_secs,
            // CRIU adds CPU_CAP_IMAGE to what an RPC asks for: cpuinfo.img is written on dump and
            // checked on restore.
            cpu_cap: self.cpu_check.then_some(crate::CPU_CAP_DEFAULT),
            ..Default::default()
        };
        if let Some(mode) = self.manage_cgroups {
            opts.manage_cgroups = Some(mode != CgroupMode::Ignore);
            opts.set_manage_cgroups_mode(mode.to_rpc());
        }
        if let Some(method) = self.network_lock {
            opts.set_network_lock(method.to_rpc());
        }
        opts
    }
}

fn flag(on: bool) -> Option<bool> {
    on.then_some(true)
}

fn path_string(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Generates the builder setters [`DumpOptions`] and [`RestoreOptions`] share.
macro_rules! common_setters {
    () => {
        /// Directory CRIU writes its log (and, on restore, temporary files) into; default: the
        /// images directory. Opened by the client and passed to CRIU as an fd.
        pub fn work_dir(mut self, dir: impl Into<PathBuf>) -> Self {
            self.common.work_dir = Some(dir.into());
            self
        }

        /// Log file name inside the work directory (no `/`); default `dump.log`, `pre-dump.log`
        /// or `restore.log`.
        pub fn log_file(mut self, name: impl Into<String>) -> Self {
            self.common.log_file = Some(name.into());
            self
        }

        /// Log level 0 (errors only) ..= 4 (debug); default [`DEFAULT_LOG_LEVEL`].
        pub fn log_level(mut self, level: i32) -> Self {
            self.common.log_level = level;
            self
        }

        /// Leave the tasks stopped (SIGSTOP) after the dump or restore (`--leave-stopped`).
        pub fn leave_stopped(mut self, on: bool) -> Self {
            self.common.leave_stopped = on;
            self
        }

        /// Record the CPU's features in the images (`cpuinfo.img`) on dump, and on restore refuse
        /// a CPU lacking the FPU or instructions they record (`--cpu-cap=fpu,ins`, CRIU's
        /// default checks, which over RPC it makes only when asked).
        pub fn cpu_check(mut self, on: bool) -> Self {
            self.common.cpu_check = on;
            self
        }

        /// Checkpoint/restore established TCP connections (`--tcp-established`; containerd's
        /// `open_tcp`).
        pub fn tcp_established(mut self, on: bool) -> Self {
            self.common.tcp_established = on;
            self
        }

        /// Close established TCP connections instead of restoring them (`--tcp-close`).
        pub fn tcp_close(mut self, on: bool) -> Self {
            self.common.tcp_close = on;
            self
        }

        /// Skip TCP connections still in the handshake (`--skip-in-flight`).
        pub fn tcp_skip_in_flight(mut self, on: bool) -> Self {
            self.common.tcp_skip_in_flight = on;
            self
        }

        /// Allow unix sockets connected to peers outside the dump (`--ext-unix-sk`; containerd's
        /// `external_unix_sockets`).
        pub fn ext_unix_sk(mut self, on: bool) -> Self {
            self.common.ext_unix_sk = on;
            self
        }

        /// The tasks were started from a shell: their session or controlling terminal lies outside
        /// the dumped tree (`--shell-job`; containerd's `terminal`).
        pub fn shell_job(mut self, on: bool) -> Self {
            self.common.shell_job = on;
            self
        }

        /// Checkpoint/restore file locks (`--file-locks`; containerd's `file_locks`).
        pub fn file_locks(mut self, on: bool) -> Self {
            self.common.file_locks = on;
            self
        }

        /// Allow device files to be looked up by device number only (`--evasive-devices`).
        pub fn evasive_devices(mut self, on: bool) -> Self {
            self.common.evasive_devices = on;
            self
        }

        /// Allow link remapping of deleted-but-open files (`--link-remap`).
        pub fn link_remap(mut self, on: bool) -> Self {
            self.common.link_remap = on;
            self
        }

        /// Cgroup handling (`--manage-cgroups=MODE`).
        pub fn manage_cgroups(mut self, mode: CgroupMode) -> Self {
            self.common.manage_cgroups = Some(mode);
            self
        }

        /// Marks a mount as external (`ext_mnt`): on dump `key` is the mount point and `val` the
        /// name written into the images; on restore `key` is that name and `val` the host path to
        /// bind in its place.
        pub fn ext_mount(mut self, key: impl Into<String>, val: impl Into<String>) -> Self {
            self.common.ext_mounts.push((key.into(), val.into()));
            self
        }

        /// Names an external resource (`--external`), e.g. `mnt[/data]:data`, `net[4026531992]:host`,
        /// `unix[12345]`, `tty[88:0]`, `file[mnt_id:inode]`, `dev[major/minor]:name`.
        pub fn external(mut self, spec: impl Into<String>) -> Self {
            self.common.external.push(spec.into());
            self
        }

        /// Detect external mounts automatically (`--ext-mount-map auto`).
        pub fn auto_ext_mnt(mut self, on: bool) -> Self {
            self.common.auto_ext_mnt = on;
            self
        }

        /// Allow external mounts to share peer groups (`--enable-external-sharing`).
        pub fn ext_sharing(mut self, on: bool) -> Self {
            self.common.ext_sharing = on;
            self
        }

        /// Allow external mounts to be slaves of outside masters (`--enable-external-masters`).
        pub fn ext_masters(mut self, on: bool) -> Self {
            self.common.ext_masters = on;
            self
        }

        /// Skips a mount point (`--skip-mnt`).
        pub fn skip_mount(mut self, path: impl Into<String>) -> Self {
            self.common.skip_mounts.push(path.into());
            self
        }

        /// Lets CRIU dump/restore mounts of this file system type (`--enable-fs`).
        pub fn enable_fs(mut self, fs: impl Into<String>) -> Self {
            self.common.enable_fs.push(fs.into());
            self
        }

        /// Root of the tasks' mount namespace (`--root`): the container's rootfs.
        pub fn root(mut self, root: impl Into<PathBuf>) -> Self {
            self.common.root = Some(root.into());
            self
        }

        /// Handle a pty whose slave is open but whose master is outside the dump
        /// (`--orphan-pts-master`). On restore CRIU sends the new master fd with the
        /// `orphan-pts-master` notification; it lands in
        /// [`RestoreResult::orphan_pts_master`](crate::RestoreResult::orphan_pts_master) unless a
        /// callback takes it.
        pub fn orphan_pts_master(mut self, on: bool) -> Self {
            self.common.orphan_pts_master = on;
            self
        }

        /// Lazy migration (`--lazy-pages`): on dump, keep pages for a lazy-pages server (see
        /// [`page_server`](Self::page_server)); on restore, fetch them through userfaultfd.
        pub fn lazy_pages(mut self, on: bool) -> Self {
            self.common.lazy_pages = on;
            self
        }

        /// Page server to send pages to, or the lazy-pages port (`--page-server`, `--address`,
        /// `--port`).
        pub fn page_server(mut self, address: Option<String>, port: u16) -> Self {
            self.common.page_server = Some(PageServer { address, port });
            self
        }

        /// Network lock method (`--network-lock`); CRIU's default is iptables.
        pub fn network_lock(mut self, method: NetworkLockMethod) -> Self {
            self.common.network_lock = Some(method);
            self
        }

        /// LSM profile to restore with, or to check on dump (`--lsm-profile`, e.g.
        /// `apparmor:name`).
        pub fn lsm_profile(mut self, profile: impl Into<String>) -> Self {
            self.common.lsm_profile = Some(profile.into());
            self
        }

        /// CRIU configuration file that overrides every RPC option (`--config`).
        pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
            self.common.config_file = Some(path.into());
            self
        }

        /// Seconds CRIU may spend freezing/seizing tasks (`--timeout`); default 10.
        pub fn timeout_secs(mut self, secs: u32) -> Self {
            self.common.timeout_secs = Some(secs);
            self
        }

        /// The images directory.
        pub fn images_dir(&self) -> &Path {
            &self.common.images_dir
        }

        /// The work directory, if one was given.
        pub fn work_dir_path(&self) -> Option<&Path> {
            self.common.work_dir.as_deref()
        }
    };
}

/// Options of a dump or pre-dump of one process tree.
///
/// ```
/// use criu_rpc::{CgroupMode, DumpOptions};
/// let opts = DumpOptions::new(1234, "/var/lib/pod/ctr/checkpoint")
///     .work_dir("/run/pod/ctr/criu-work")
///     .leave_running(true)
///     .manage_cgroups(CgroupMode::Soft)
///     .ext_mount("/etc/hostname", "/etc/hostname");
/// assert_eq!(opts.pid(), 1234);
/// ```
#[derive(Debug, Clone)]
pub struct DumpOptions {
    pid: i32,
    common: CommonOptions,
    leave_running: bool,
    freeze_cgroup: Option<PathBuf>,
    track_mem: bool,
    parent_image: Option<PathBuf>,
    ghost_limit: Option<u32>,
    auto_dedup: bool,
    empty_net_ns: bool,
    pre_dump_mode: Option<PreDumpMode>,
    irmap_scan_paths: Vec<String>,
    force_irmap: bool,
    cgroup_dump_controllers: Vec<String>,
}

impl DumpOptions {
    /// Dump the tree rooted at `pid` into `images_dir` (which must exist).
    pub fn new(pid: i32, images_dir: impl Into<PathBuf>) -> Self {
        DumpOptions {
            pid,
            common: CommonOptions::new(images_dir.into()),
            leave_running: false,
            freeze_cgroup: None,
            track_mem: false,
            parent_image: None,
            ghost_limit: None,
            auto_dedup: false,
            empty_net_ns: false,
            pre_dump_mode: None,
            irmap_scan_paths: Vec::new(),
            force_irmap: false,
            cgroup_dump_controllers: Vec::new(),
        }
    }

    common_setters!();

    /// The root pid of the dumped tree.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Keep the tasks running after the dump (`--leave-running`); without it they are killed
    /// (containerd's `exit` is the opposite of this).
    pub fn leave_running(mut self, on: bool) -> Self {
        self.leave_running = on;
        self
    }

    /// Freeze the tasks with this freezer cgroup instead of one by one (`--freeze-cgroup`): a
    /// path like `/sys/fs/cgroup/freezer/pod/ctr` (v1) or `/sys/fs/cgroup/pod/ctr` (v2).
    pub fn freeze_cgroup(mut self, cgroup: impl Into<PathBuf>) -> Self {
        self.freeze_cgroup = Some(cgroup.into());
        self
    }

    /// Track memory changes for a later incremental dump (`--track-mem`). Needs soft-dirty page
    /// tracking; without it the dump fails with [`ErrorKind::Unsupported`] before CRIU starts.
    pub fn track_mem(mut self, on: bool) -> Self {
        self.track_mem = on;
        self
    }

    /// The previous (pre-)dump, relative to the images directory (`--prev-images-dir`), e.g.
    /// `../pre-dump-1`.
    pub fn parent_image(mut self, dir: impl Into<PathBuf>) -> Self {
        self.parent_image = Some(dir.into());
        self
    }

    /// Largest deleted file CRIU copies into the images, in bytes (`--ghost-limit`).
    pub fn ghost_limit(mut self, bytes: u32) -> Self {
        self.ghost_limit = Some(bytes);
        self
    }

    /// Punch holes into parent images' pages once copied (`--auto-dedup`).
    pub fn auto_dedup(mut self, on: bool) -> Self {
        self.auto_dedup = on;
        self
    }

    /// Dump the net namespace empty: only its loopback, no interfaces or rules (`--empty-ns net`;
    /// containerd's `empty_namespaces: ["network"]`), for a network that CNI recreates on restore.
    pub fn empty_net_ns(mut self, on: bool) -> Self {
        self.empty_net_ns = on;
        self
    }

    /// How a pre-dump reads memory (`--pre-dump-mode`).
    pub fn pre_dump_mode(mut self, mode: PreDumpMode) -> Self {
        self.pre_dump_mode = Some(mode);
        self
    }

    /// Adds a path where CRIU looks for files by inode (`--irmap-scan-path`).
    pub fn irmap_scan_path(mut self, path: impl Into<String>) -> Self {
        self.irmap_scan_paths.push(path.into());
        self
    }

    /// Resolve inotify/fanotify watch paths by scanning even when not needed (`--force-irmap`).
    pub fn force_irmap(mut self, on: bool) -> Self {
        self.force_irmap = on;
        self
    }

    /// Dump only these cgroup controllers (`--cgroup-dump-controller`).
    pub fn cgroup_dump_controller(mut self, controller: impl Into<String>) -> Self {
        self.cgroup_dump_controllers.push(controller.into());
        self
    }

    /// Whether the dump needs soft-dirty memory tracking.
    pub(crate) fn needs_mem_track(&self) -> bool {
        self.track_mem
    }

    pub(crate) fn validate(&self, default_log: &str) -> Result<(), ErrorKind> {
        if self.pid <= 0 {
            // CRIU dumps the requesting process (this one) when no pid is set: never ask for that.
            return Err(ErrorKind::InvalidOptions(format!(
                "pid {} is not a process id",
                self.pid
            )));
        }
        self.common.validate(default_log)
    }

    /// The `criu_opts` for this dump, given the fds the client opened.
    pub(crate) fn to_criu_opts(
        &self,
        images_dir_fd: RawFd,
        work_dir_fd: Option<RawFd>,
        default_log: &str,
        notify_scripts: bool,
    ) -> rpc::CriuOpts {
        let mut opts = self
            .common
            .to_criu_opts(images_dir_fd, work_dir_fd, default_log);
        opts.pid = Some(self.pid);
        opts.leave_running = flag(self.leave_running);
        opts.freeze_cgroup = self.freeze_cgroup.as_deref().map(path_string);
        opts.track_mem = flag(self.track_mem);
        opts.parent_img = self.parent_image.as_deref().map(path_string);
        opts.ghost_limit = self.ghost_limit;
        opts.auto_dedup = flag(self.auto_dedup);
        opts.empty_ns = self.empty_net_ns.then_some(CLONE_NEWNET);
        if let Some(mode) = self.pre_dump_mode {
            opts.set_pre_dump_mode(mode.to_rpc());
        }
        opts.irmap_scan_paths = self.irmap_scan_paths.clone();
        opts.force_irmap = flag(self.force_irmap);
        opts.cgroup_dump_controller = self.cgroup_dump_controllers.clone();
        opts.notify_scripts = flag(notify_scripts);
        opts
    }

    pub(crate) fn work_or_images_dir(&self) -> &Path {
        self.common
            .work_dir
            .as_deref()
            .unwrap_or(&self.common.images_dir)
    }

    pub(crate) fn log_file_or(&self, default_log: &'static str) -> String {
        self.common
            .log_file
            .clone()
            .unwrap_or_else(|| default_log.to_owned())
    }
}

/// `CLONE_NEWNET`, the only namespace CRIU accepts in `empty_ns`.
const CLONE_NEWNET: u32 = 0x4000_0000;

/// An fd the restored tasks inherit in place of the resource `key` names in the images.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InheritFd<'fd> {
    pub(crate) key: &'fd str,
    pub(crate) fd: BorrowedFd<'fd>,
}

/// Options of a restore.
///
/// The lifetime ties [`inherit_fd`](Self::inherit_fd)'s fds to the options: they must stay open
/// until the restore returns.
///
/// ```
/// use criu_rpc::RestoreOptions;
/// let opts = RestoreOptions::new("/var/lib/pod/ctr/checkpoint")
///     .root("/run/pod/ctr/rootfs")
///     .rst_sibling(true)
///     .cgroup_root(None, "/pod/ctr");
/// assert!(opts.images_dir().ends_with("checkpoint"));
/// ```
#[derive(Debug, Clone)]
pub struct RestoreOptions<'fd> {
    common: CommonOptions,
    rst_sibling: bool,
    inherit_fds: Vec<(String, BorrowedFd<'fd>)>,
    cgroup_roots: Vec<(Option<String>, String)>,
    lsm_mount_context: Option<String>,
    weak_sysctls: bool,
    mntns_compat_mode: bool,
    join_user_namespace: Option<PathBuf>,
}

impl<'fd> RestoreOptions<'fd> {
    /// Restore from `images_dir`.
    pub fn new(images_dir: impl Into<PathBuf>) -> Self {
        RestoreOptions {
            common: CommonOptions::new(images_dir.into()),
            rst_sibling: false,
            inherit_fds: Vec::new(),
            cgroup_roots: Vec::new(),
            lsm_mount_context: None,
            weak_sysctls: false,
            mntns_compat_mode: false,
            join_user_namespace: None,
        }
    }

    common_setters!();

    /// Make the restored root task a child of the calling process instead of `criu swrk`
    /// (`--restore-sibling`), so the caller can wait for it. Without it, the task is orphaned when
    /// swrk exits and reparented to the nearest subreaper or init.
    pub fn rst_sibling(mut self, on: bool) -> Self {
        self.rst_sibling = on;
        self
    }

    /// Give the restored tasks `fd` in place of the resource `key` names in the images
    /// (`--inherit-fd fd[N]:key`), e.g. `pipe:[1234]` for a stdio pipe or `file[mnt:ino]`.
    /// The fd is duplicated into `criu swrk`; the caller keeps ownership.
    pub fn inherit_fd(mut self, key: impl Into<String>, fd: BorrowedFd<'fd>) -> Self {
        self.inherit_fds.push((key.into(), fd));
        self
    }

    /// Restore the cgroups of `controller` (all controllers for `None`) under `path`
    /// (`--cgroup-root [controller:]path`).
    pub fn cgroup_root(mut self, controller: Option<String>, path: impl Into<String>) -> Self {
        self.cgroup_roots.push((controller, path.into()));
        self
    }

    /// SELinux mount context for restored mounts (`--lsm-mount-context`).
    pub fn lsm_mount_context(mut self, context: impl Into<String>) -> Self {
        self.lsm_mount_context = Some(context.into());
        self
    }

    /// Skip sysctls the kernel lacks instead of failing (`--weak-sysctls`).
    pub fn weak_sysctls(mut self, on: bool) -> Self {
        self.weak_sysctls = on;
        self
    }

    /// Restore mounts with the old mount engine (`--mntns-compat-mode`).
    pub fn mntns_compat_mode(mut self, on: bool) -> Self {
        self.mntns_compat_mode = on;
        self
    }

    /// Restore into the existing user namespace at `path` (`--join-ns user:path`), e.g. a pod
    /// sandbox's `/proc/PID/ns/user`. With podsnap's CRIU patch
    /// (`hack/criu-4.1.1-join-userns-at-clone.patch`), when the images hold
    /// a user namespace the root task is cloned inside this one, so its new pid, mount, ipc and
    /// uts namespaces belong to it; needs [`rst_sibling`](Self::rst_sibling).
    pub fn join_user_namespace(mut self, path: impl Into<PathBuf>) -> Self {
        self.join_user_namespace = Some(path.into());
        self
    }

    pub(crate) fn inherit_fds(&self) -> impl Iterator<Item = InheritFd<'_>> {
        self.inherit_fds
            .iter()
            .map(|(key, fd)| InheritFd { key, fd: *fd })
    }

    pub(crate) fn wants_orphan_pts_master(&self) -> bool {
        self.common.orphan_pts_master
    }

    pub(crate) fn validate(&self, default_log: &str) -> Result<(), ErrorKind> {
        for (key, fd) in &self.inherit_fds {
            if key.is_empty() {
                return Err(ErrorKind::InvalidOptions(format!(
                    "inherit_fd for fd {} has an empty key",
                    fd.as_raw_fd()
                )));
            }
        }
        self.common.validate(default_log)
    }

    /// The `criu_opts` for this restore. `inherited` holds, in [`inherit_fds`](Self::inherit_fds)
    /// order, the fd numbers the swrk child has for the inherited fds.
    pub(crate) fn to_criu_opts(
        &self,
        images_dir_fd: RawFd,
        work_dir_fd: Option<RawFd>,
        default_log: &str,
        notify_scripts: bool,
        inherited: &[RawFd],
    ) -> rpc::CriuOpts {
        debug_assert_eq!(inherited.len(), self.inherit_fds.len());
        let mut opts = self
            .common
            .to_criu_opts(images_dir_fd, work_dir_fd, default_log);
        opts.rst_sibling = flag(self.rst_sibling);
        opts.inherit_fd = self
            .inherit_fds
            .iter()
            .zip(inherited)
            .map(|((key, _), fd)| rpc::InheritFd {
                key: key.clone(),
                fd: *fd,
            })
            .collect();
        opts.cg_root = self
            .cgroup_roots
            .iter()
            .map(|(ctrl, path)| rpc::CgroupRoot {
                ctrl: ctrl.clone(),
                path: path.clone(),
            })
            .collect();
        opts.lsm_mount_context = self.lsm_mount_context.clone();
        opts.weak_sysctls = flag(self.weak_sysctls);
        opts.mntns_compat_mode = flag(self.mntns_compat_mode);
        opts.join_ns = self
            .join_user_namespace
            .iter()
            .map(|path| rpc::JoinNamespace {
                ns: "user".to_string(),
                ns_file: path.display().to_string(),
                extra_opt: None,
            })
            .collect();
        opts.notify_scripts = flag(notify_scripts);
        opts
    }

    pub(crate) fn work_or_images_dir(&self) -> &Path {
        self.common
            .work_dir
            .as_deref()
            .unwrap_or(&self.common.images_dir)
    }

    pub(crate) fn log_file_or(&self, default_log: &'static str) -> String {
        self.common
            .log_file
            .clone()
            .unwrap_or_else(|| default_log.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::os::fd::AsFd;

    #[test]
    fn dump_options_map_onto_criu_opts() {
        let opts = DumpOptions::new(4242, "/images")
            .work_dir("/work")
            .leave_running(true)
            .tcp_established(true)
            .ext_unix_sk(true)
            .shell_job(true)
            .file_locks(true)
            .manage_cgroups(CgroupMode::Soft)
            .freeze_cgroup("/sys/fs/cgroup/freezer/pod")
            .ext_mount("/etc/hosts", "/etc/hosts")
            .external("mnt[/data]:data")
            .external("net[4026531992]:extnet")
            .root("/rootfs")
            .orphan_pts_master(true)
            .page_server(Some("10.0.0.2".into()), 27)
            .lazy_pages(true)
            .track_mem(true)
            .parent_image("../parent")
            .ghost_limit(1 << 20)
            .network_lock(NetworkLockMethod::Nftables)
            .empty_net_ns(true)
            .log_file("custom.log")
            .log_level(2);
        let req = opts.to_criu_opts(7, Some(8), "dump.log", true);
        assert_eq!(req.images_dir_fd, 7);
        assert_eq!(req.work_dir_fd, Some(8));
        assert_eq!(req.pid, Some(4242));
        assert_eq!(req.log_file.as_deref(), Some("custom.log"));
        assert_eq!(req.log_level, Some(2));
        assert_eq!(req.leave_running, Some(true));
        assert_eq!(req.tcp_established, Some(true));
        assert_eq!(req.ext_unix_sk, Some(true));
        assert_eq!(req.shell_job, Some(true));
        assert_eq!(req.file_locks, Some(true));
        assert_eq!(req.manage_cgroups, Some(true));
        assert_eq!(req.manage_cgroups_mode(), rpc::CriuCgMode::Soft);
        assert_eq!(
            req.freeze_cgroup.as_deref(),
            Some("/sys/fs/cgroup/freezer/pod")
        );
        assert_eq!(
            req.ext_mnt,
            [rpc::ExtMountMap {
                key: "/etc/hosts".into(),
                val: "/etc/hosts".into()
            }]
        );
        assert_eq!(req.external, ["mnt[/data]:data", "net[4026531992]:extnet"]);
        assert_eq!(req.root.as_deref(), Some("/rootfs"));
        assert_eq!(req.orphan_pts_master, Some(true));
        let ps = req.ps.as_ref().unwrap();
        assert_eq!(
            (ps.address.as_deref(), ps.port),
            (Some("10.0.0.2"), Some(27))
        );
        assert_eq!(req.lazy_pages, Some(true));
        assert_eq!(req.track_mem, Some(true));
        assert_eq!(req.parent_img.as_deref(), Some("../parent"));
        assert_eq!(req.ghost_limit, Some(1 << 20));
        assert_eq!(req.network_lock(), rpc::CriuNetworkLockMethod::Nftables);
        assert_eq!(req.empty_ns, Some(0x4000_0000));
        assert_eq!(req.notify_scripts, Some(true));
        assert_eq!(req.rst_sibling, None, "rst_sibling is restore-only");
    }

    #[test]
    fn defaults_send_only_what_is_needed() {
        let req = DumpOptions::new(1, "/i").to_criu_opts(3, None, "dump.log", false);
        assert_eq!(req.log_file.as_deref(), Some("dump.log"));
        assert_eq!(req.log_level, Some(DEFAULT_LOG_LEVEL));
        assert_eq!(req.work_dir_fd, None);
        assert_eq!(req.leave_running, None);
        assert_eq!(req.shell_job, None);
        assert_eq!(req.manage_cgroups, None);
        assert_eq!(req.manage_cgroups_mode, None);
        assert_eq!(req.network_lock, None);
        assert_eq!(req.notify_scripts, None);
        assert_eq!(req.empty_ns, None);
        // Unset, CRIU's own defaults apply.
        assert_eq!(req.network_lock(), rpc::CriuNetworkLockMethod::Iptables);
        assert_eq!(req.ghost_limit(), 0x100000);
    }

    #[test]
    fn ignore_cgroup_mode_turns_manage_cgroups_off() {
        let req = DumpOptions::new(1, "/i")
            .manage_cgroups(CgroupMode::Ignore)
            .to_criu_opts(3, None, "d.log", false);
        assert_eq!(req.manage_cgroups, Some(false));
        assert_eq!(req.manage_cgroups_mode(), rpc::CriuCgMode::Ignore);
    }

    #[test]
    fn restore_options_map_onto_criu_opts() {
        let stdin = std::fs::File::open("/dev/null").unwrap();
        let opts = RestoreOptions::new("/images")
            .rst_sibling(true)
            .root("/rootfs")
            .inherit_fd("pipe:[1234]", stdin.as_fd())
            .ext_mount("data", "/host/data")
            .external("mnt[data]:/host/data")
            .cgroup_root(None, "/pod/ctr")
            .cgroup_root(Some("memory".into()), "/mem/pod")
            .manage_cgroups(CgroupMode::Full)
            .tcp_established(true)
            .file_locks(true)
            .lazy_pages(true)
            .orphan_pts_master(true);
        let req = opts.to_criu_opts(5, None, "restore.log", true, &[42]);
        assert_eq!(req.images_dir_fd, 5);
        assert_eq!(req.pid, None, "restore sends no pid");
        assert_eq!(req.log_file.as_deref(), Some("restore.log"));
        assert_eq!(req.rst_sibling, Some(true));
        assert_eq!(req.root.as_deref(), Some("/rootfs"));
        assert_eq!(
            req.inherit_fd,
            [rpc::InheritFd {
                key: "pipe:[1234]".into(),
                fd: 42
            }]
        );
        assert_eq!(
            req.ext_mnt,
            [rpc::ExtMountMap {
                key: "data".into(),
                val: "/host/data".into()
            }]
        );
        assert_eq!(req.external, ["mnt[data]:/host/data"]);
        assert_eq!(
            req.cg_root,
            [
                rpc::CgroupRoot {
                    ctrl: None,
                    path: "/pod/ctr".into()
                },
                rpc::CgroupRoot {
                    ctrl: Some("memory".into()),
                    path: "/mem/pod".into()
                }
            ]
        );
        assert_eq!(req.manage_cgroups_mode(), rpc::CriuCgMode::Full);
        assert_eq!(req.tcp_established, Some(true));
        assert_eq!(req.file_locks, Some(true));
        assert_eq!(req.lazy_pages, Some(true));
        assert_eq!(req.orphan_pts_master, Some(true));
        assert_eq!(req.notify_scripts, Some(true));
        assert_eq!(req.leave_running, None);
    }

    #[test]
    fn invalid_options_are_refused_before_criu_starts() {
        assert!(
            DumpOptions::new(0, "/i").validate("dump.log").is_err(),
            "pid 0 would dump ourselves"
        );
        assert!(DumpOptions::new(-5, "/i").validate("dump.log").is_err());
        assert!(
            DumpOptions::new(1, "/i")
                .log_file("sub/dump.log")
                .validate("dump.log")
                .is_err()
        );
        assert!(
            DumpOptions::new(1, "/i")
                .log_level(7)
                .validate("dump.log")
                .is_err()
        );
        assert!(DumpOptions::new(1, "/i").validate("dump.log").is_ok());
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(
            RestoreOptions::new("/i")
                .inherit_fd("", null.as_fd())
                .validate("r.log")
                .is_err()
        );
    }

    #[test]
    fn criu_opts_survive_encode_and_decode() {
        let req = rpc::CriuReq {
            r#type: rpc::CriuReqType::Dump as i32,
            opts: Some(DumpOptions::new(99, "/i").leave_running(true).to_criu_opts(
                3,
                Some(4),
                "dump.log",
                true,
            )),
            ..Default::default()
        };
        let bytes = req.encode_to_vec();
        let back = rpc::CriuReq::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.r#type(), rpc::CriuReqType::Dump);
    }
}
