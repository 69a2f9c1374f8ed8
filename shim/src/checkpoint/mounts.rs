//! Which of a container's mounts CRIU must treat as external at dump, and where each comes
//! from in the new container at restore.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use oci_spec::runtime::Spec;

use super::{ExternalMount, Metadata};

/// One line of `/proc/<pid>/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub dev: String,
    pub root: String,
    pub mount_point: String,
    pub fs_type: String,
    pub super_options: String,
    /// Whether its propagation is shared (a `shared:N` optional field).
    pub shared: bool,
}

/// Parses mountinfo text. Not `procfs`'s parser: it keeps the super options in a map, losing
/// their order, and a cgroup v1 mount's super options name its hierarchy's directory in that
/// order (`cpu,cpuacct`), which a restore binds again.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some(MountInfo {
                dev: fields.get(2)?.to_string(),
                root: unescape(fields.get(3)?),
                mount_point: unescape(fields.get(4)?),
                fs_type: right.first()?.to_string(),
                super_options: right.get(2).unwrap_or(&"").to_string(),
                shared: fields.iter().skip(6).any(|f| f.starts_with("shared:")),
            })
        })
        .collect()
}

fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// File systems CRIU dumps and restores itself when the container has the whole of them.
const CRIU_FILESYSTEMS: [&str; 6] = ["proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup2"];

/// Decides which of the container's mounts are external, from its mountinfo and spec.
pub fn external_mounts(mounts: &[MountInfo], spec: &Spec) -> anyhow::Result<Vec<ExternalMount>> {
    let bind_destinations: Vec<String> = spec
        .mounts()
        .iter()
        .flatten()
        .filter(|m| crate::mount_sources::is_bind(m))
        .map(|m| m.destination().display().to_string())
        .collect();
    let whole: Vec<&MountInfo> = mounts.iter().filter(|m| m.root == "/").collect();
    // A node from the host's /dev: devtmpfs, or the file system that holds the host's /dev
    // nodes (a tmpfs where the host is itself a container, as a kind node is).
    let host_dev = host_dev_file_system();
    let from_host_dev =
        |m: &MountInfo| m.fs_type == "devtmpfs" || host_dev.as_deref() == Some(m.dev.as_str());
    let mut external = Vec::new();
    for m in mounts.iter().filter(|m| m.mount_point != "/") {
        if bind_destinations.contains(&m.mount_point) {
            external.push(ExternalMount::Spec {
                destination: m.mount_point.clone(),
            });
        } else if m.root == "/" && CRIU_FILESYSTEMS.contains(&m.fs_type.as_str()) {
            // CRIU dumps it.
        } else if whole
            .iter()
            .any(|w| w.dev == m.dev && w.mount_point != "/" && w.mount_point != m.mount_point)
        {
            // A bind of part of a file system the container mounts whole: CRIU resolves it.
        } else if m.fs_type == "cgroup" {
            let controller = m
                .super_options
                .split(',')
                .filter(|o| *o != "rw" && *o != "ro")
                .collect::<Vec<_>>()
                .join(",");
            external.push(ExternalMount::Cgroup {
                destination: m.mount_point.clone(),
                controller,
                whole: m.root == "/",
            });
        } else if from_host_dev(m) && m.root == "/null" {
            external.push(ExternalMount::DevNull {
                destination: m.mount_point.clone(),
            });
        } else if from_host_dev(m)
            && m.mount_point.strip_prefix("/dev") == Some(m.root.as_str())
            && bindable_device(spec, &m.mount_point)
        {
            // The host's node of the same path, bound by the runtime for a container in a
            // user namespace (which cannot create device nodes).
            external.push(ExternalMount::Device {
                destination: m.mount_point.clone(),
            });
        } else {
            bail!(
                "mount {} ({} {}) comes from outside the container and is not in its spec: \
                 it cannot be checkpointed",
                m.mount_point,
                m.fs_type,
                m.root
            );
        }
    }
    Ok(external)
}

/// The `major:minor` of the file system holding the host's `/dev/null`, as mountinfo names it.
fn host_dev_file_system() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata("/dev/null").ok()?.dev();
    Some(format!(
        "{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    ))
}

/// Devices every OCI container has (runtime-spec's "default devices").
const DEFAULT_DEVICES: [&str; 6] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
];

/// Whether the host's device node at `path` may be bound into a container of `spec`: one of
/// the default devices, or one the spec lists.
fn bindable_device(spec: &Spec, path: &str) -> bool {
    DEFAULT_DEVICES.contains(&path)
        || spec
            .linux()
            .as_ref()
            .and_then(|l| l.devices().as_ref())
            .is_some_and(|d| d.iter().any(|d| d.path() == Path::new(path)))
}

/// The cgroup v1 controllers of `pid` (from `/proc/<pid>/cgroup`, in the kernel's order),
/// without named hierarchies and the unified one.
pub(super) fn v1_controllers(pid: i32) -> Vec<String> {
    procfs::process::Process::new(pid)
        .and_then(|p| p.cgroups())
        .map(|groups| {
            groups
                .into_iter()
                .flat_map(|g| g.controllers)
                .filter(|c| !c.is_empty() && !c.starts_with("name="))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether any of the external mount sources lies on a mount with shared propagation in the
/// shim's mount namespace (then CRIU must restore mounts with its compat engine).
pub(super) fn needs_compat_mounts(sources: &[(String, String)]) -> bool {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    sources
        .iter()
        .any(|(_, source)| on_shared_mount(Path::new(source), &mountinfo))
}

/// Whether `path` lies on a mount whose propagation is shared, per `mountinfo`: the mount with
/// the longest mount point containing it (the last such line, when mounts are stacked).
pub fn on_shared_mount(path: &Path, mountinfo: &str) -> bool {
    let mut best: Option<(usize, bool)> = None;
    for m in parse_mountinfo(mountinfo) {
        if !path.starts_with(&m.mount_point) {
            continue;
        }
        let depth = Path::new(&m.mount_point).components().count();
        if best.is_none_or(|(d, _)| depth >= d) {
            best = Some((depth, m.shared));
        }
    }
    best.is_some_and(|(_, shared)| shared)
}

/// Cgroup v1 controllers the runtime (libcontainer) makes a cgroup of the container's own in.
/// In every other hierarchy (misc, rdma, named ones such as `name=systemd`) the container's
/// processes stay in the cgroup of their parent, this shim, and the runtime binds that one.
const MANAGED_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "hugetlb",
    "pids",
    "perf_event",
    "memory",
    "blkio",
    "net_prio",
    "net_cls",
    "freezer",
];

/// Mount options that appear among a cgroup v1 mount's super options beside its controllers.
const CGROUP_OPTIONS: &[&str] = &["xattr", "noprefix", "clone_children", "cpuset_v2_mode"];

/// What the new container's cgroup mount for hierarchy `controller` (the checkpoint's super
/// options: `cpu,cpuacct`, `misc`, `xattr,name=systemd`) binds: what the runtime binds for a new
/// container, never a path from the archive. A managed controller: the container's cgroup
/// (`relative`, the new container's cgroups path). Any other hierarchy: the container's cgroup
/// there if the runtime made one, else the cgroup this process is in (from `proc_cgroup`, the
/// text of `/proc/self/cgroup`), which is the hierarchy's root where this process is at its root
/// (a v1 host's misc hierarchy), exactly as a container created fresh would get it.
///
/// The descriptor only names a hierarchy this host has mounted, at its own directory under
/// `/sys/fs/cgroup` (`destination`): anything else is refused.
fn cgroup_source(
    controller: &str,
    destination: &str,
    relative: &Path,
    proc_cgroup: &str,
    exists: impl Fn(&Path) -> bool,
) -> anyhow::Result<PathBuf> {
    let named = controller.split(',').find(|c| c.starts_with("name="));
    // /proc/self/cgroup names a hierarchy by its controllers, or by `name=` alone; the
    // hierarchy's directory is the controllers, or the name without `name=`.
    let controllers = controller
        .split(',')
        .filter(|c| !c.contains('=') && !CGROUP_OPTIONS.contains(c))
        .collect::<Vec<_>>()
        .join(",");
    let (key, hierarchy) = match named {
        Some(n) => (n.to_string(), n.trim_start_matches("name=").to_string()),
        None => (controllers.clone(), controllers),
    };
    ensure!(
        !hierarchy.is_empty() && !hierarchy.contains('/'),
        "the checkpoint names cgroup hierarchy {controller:?}: refused"
    );
    let base = Path::new("/sys/fs/cgroup").join(&hierarchy);
    ensure!(
        Path::new(destination) == base,
        "the checkpoint mounts cgroup hierarchy {controller:?} at {destination}, not at {}: refused",
        base.display()
    );
    ensure!(
        exists(&base),
        "the checkpoint mounts cgroup hierarchy {hierarchy}, which this host has not mounted at {}",
        base.display()
    );
    let container = base.join(relative);
    let managed = controller
        .split(',')
        .any(|c| MANAGED_CONTROLLERS.contains(&c));
    if managed || exists(&container) {
        return Ok(container);
    }
    let own = own_cgroup_in(proc_cgroup, &key)
        .with_context(|| format!("this process is in no cgroup of hierarchy {key}"))?;
    Ok(base.join(own.strip_prefix("/").unwrap_or(&own)))
}

fn own_cgroup_in(proc_cgroup: &str, controller: &str) -> Option<PathBuf> {
    proc_cgroup.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        (controllers == controller).then(|| PathBuf::from(path))
    })
}

/// Where each external mount of the checkpoint comes from in the new container.
pub fn mount_sources(
    metadata: &Metadata,
    spec: &Spec,
    cgroup_path: &Path,
) -> anyhow::Result<Vec<(String, String)>> {
    let relative = cgroup_path.strip_prefix("/").unwrap_or(cgroup_path);
    metadata
        .external_mounts
        .iter()
        .map(|m| {
            let source = match m {
                ExternalMount::Spec { destination } => spec
                    .mounts()
                    .iter()
                    .flatten()
                    .find(|s| s.destination() == Path::new(destination))
                    .and_then(|s| s.source().clone())
                    .with_context(|| {
                        format!("the checkpoint has a bind mount at {destination} that the new container's spec lacks")
                    })?,
                ExternalMount::Cgroup {
                    controller,
                    destination,
                    ..
                } => {
                    // The runtime binds cgroup hierarchies only into a container whose spec
                    // mounts the cgroup file system.
                    ensure!(
                        spec.mounts().iter().flatten().any(|s| {
                            s.typ().as_deref() == Some("cgroup")
                                && s.destination() == Path::new("/sys/fs/cgroup")
                        }),
                        "the checkpoint has a cgroup mount at {destination} and the new \
                         container's spec mounts no cgroup file system at /sys/fs/cgroup: refused"
                    );
                    let proc_cgroup = fs::read_to_string("/proc/self/cgroup")
                        .context("reading /proc/self/cgroup")?;
                    cgroup_source(controller, destination, relative, &proc_cgroup, |p| {
                        p.exists()
                    })
                    .with_context(|| format!("cgroup mount at {destination}"))?
                }
                ExternalMount::DevNull { .. } => PathBuf::from("/dev/null"),
                ExternalMount::Device { destination } => {
                    // A path from the checkpoint becomes a host path only when the new spec
                    // grants that device.
                    ensure!(
                        bindable_device(spec, destination),
                        "the checkpoint binds the host's device {destination:?}, which the new \
                         container's spec does not grant: refused"
                    );
                    PathBuf::from(destination)
                }
            };
            let source = source.display().to_string();
            ensure!(
                Path::new(&source).exists(),
                "source {source} of mount {} does not exist",
                m.destination()
            );
            Ok((m.destination().to_string(), source))
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
148 91 0:59 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
149 148 0:69 / /proc rw,nosuid - proc proc rw
150 148 0:70 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
151 150 0:71 / /dev/pts rw - devpts devpts rw,gid=5
153 148 0:64 / /sys ro - sysfs sysfs rw
154 153 0:72 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
155 154 0:29 /k8s.io/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
163 154 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
164 148 254:0 /var/lib/sandboxes/x/hostname /etc/hostname rw - ext4 /dev/vda rw
167 150 0:56 / /dev/shm rw - tmpfs shm rw,size=65536k
170 149 0:69 /sys /proc/sys ro - proc proc rw
171 149 0:5 /null /proc/kcore rw - devtmpfs udev rw
";

    #[test]
    fn own_cgroup_reads_the_named_hierarchy_of_proc_self_cgroup() {
        let proc_cgroup = "9:name=systemd:/system.slice/containerd.service\n\
                           1:cpu:/kubelet/kubepods/pod1/c1\n0::/kubelet/kubepods/pod1/c1\n";
        assert_eq!(
            own_cgroup_in(proc_cgroup, "name=systemd"),
            Some(PathBuf::from("/system.slice/containerd.service"))
        );
        assert_eq!(
            own_cgroup_in(proc_cgroup, "cpu"),
            Some(PathBuf::from("/kubelet/kubepods/pod1/c1"))
        );
        assert_eq!(own_cgroup_in(proc_cgroup, "memory"), None);
    }

    #[test]
    fn a_cgroup_mount_binds_what_the_runtime_binds_for_a_new_container() {
        let proc_cgroup = "14:misc:/\n13:rdma:/shim\n\
                           9:name=systemd:/system.slice/containerd.service\n\
                           3:cpu,cpuacct:/shim\n0::/shim\n";
        let relative = Path::new("kubepods/pod1/c2");
        // Each hierarchy is mounted; no container cgroup exists yet.
        let none = |p: &Path| p.parent() == Some(Path::new("/sys/fs/cgroup"));
        let dir = |controller: &str| {
            let named = controller.split(',').find_map(|c| c.strip_prefix("name="));
            format!("/sys/fs/cgroup/{}", named.unwrap_or(controller))
        };
        let source = |controller: &str, exists: &dyn Fn(&Path) -> bool| {
            cgroup_source(controller, &dir(controller), relative, proc_cgroup, exists).unwrap()
        };
        // A controller the runtime manages: the new container's own cgroup, even before it exists.
        assert_eq!(
            source("cpu,cpuacct", &none),
            Path::new("/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/c2")
        );
        // misc where the runtime made the container no cgroup: where this shim is, here its
        // root, as a fresh container gets it; the checkpoint's "whole" plays no part.
        assert_eq!(source("misc", &none), Path::new("/sys/fs/cgroup/misc"));
        assert_eq!(source("rdma", &none), Path::new("/sys/fs/cgroup/rdma/shim"));
        // A named hierarchy, with or without xattr: the shim's cgroup there.
        for named in ["name=systemd", "xattr,name=systemd"] {
            assert_eq!(
                source(named, &none),
                Path::new("/sys/fs/cgroup/systemd/system.slice/containerd.service")
            );
        }
        // Where the runtime did make the container a cgroup, that one.
        let all = |_: &Path| true;
        assert_eq!(
            source("misc", &all),
            Path::new("/sys/fs/cgroup/misc/kubepods/pod1/c2")
        );
        // A hierarchy this process is not in: an error, not a guess.
        let err =
            cgroup_source("net_cls_x", &dir("net_cls_x"), relative, proc_cgroup, none).unwrap_err();
        assert!(
            err.to_string().contains("no cgroup of hierarchy net_cls_x"),
            "{err}"
        );
        // Descriptors the dump could not have written: refused before any path is bound.
        let unmounted = |_: &Path| false;
        for (controller, destination, exists) in [
            // only options, no hierarchy (it would match the cgroup v2 line)
            (
                "xattr",
                "/sys/fs/cgroup/xattr",
                &none as &dyn Fn(&Path) -> bool,
            ),
            // a hierarchy at another hierarchy's directory, or at the cgroup root
            ("name=systemd", "/sys/fs/cgroup/memory", &none),
            ("misc", "/sys/fs/cgroup", &none),
            // a hierarchy this host has not mounted
            ("name=elsewhere", "/sys/fs/cgroup/elsewhere", &unmounted),
        ] {
            let err = cgroup_source(controller, destination, relative, proc_cgroup, exists)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("refused") || err.contains("not mounted"),
                "{controller}: {err}"
            );
        }
    }

    /// A spec with one bind mount per `(destination, source)`.
    pub(crate) fn spec_with_binds(binds: &[(&str, &str)]) -> Spec {
        let mut spec = Spec::default();
        let mounts = binds
            .iter()
            .map(|(destination, source)| {
                oci_spec::runtime::MountBuilder::default()
                    .destination(*destination)
                    .typ("bind")
                    .source(*source)
                    .options(vec!["rbind".to_string()])
                    .build()
                    .unwrap()
            })
            .collect();
        spec.set_mounts(Some(mounts));
        spec
    }

    #[test]
    fn a_source_on_a_shared_mount_is_told_apart() {
        let mountinfo = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
90 22 254:0 /var/lib/k /var/lib/k rw,relatime shared:301 - ext4 /dev/vda rw
91 90 0:55 / /var/lib/k/pods/u/volumes/x rw shared:302 - tmpfs tmpfs rw
92 22 0:56 / /tmp/priv rw - tmpfs tmpfs rw
";
        assert!(on_shared_mount(
            Path::new("/var/lib/k/pods/u/etc-hosts"),
            mountinfo
        ));
        assert!(on_shared_mount(
            Path::new("/var/lib/k/pods/u/volumes/x/file"),
            mountinfo
        ));
        assert!(!on_shared_mount(Path::new("/tmp/priv/data"), mountinfo));
        assert!(!on_shared_mount(Path::new("/var/lib/kx/file"), mountinfo));
        assert!(!on_shared_mount(Path::new("/srv"), mountinfo));
    }

    #[test]
    fn this_process_s_v1_controllers_are_read_without_named_hierarchies() {
        let controllers = v1_controllers(std::process::id() as i32);
        let listed = fs::read_to_string("/proc/self/cgroup").unwrap();
        for c in &controllers {
            assert!(!c.starts_with("name="), "{c}");
            assert!(listed.contains(c.as_str()), "{c} not in\n{listed}");
        }
        // On this cgroup v1 host every process has controllers (memory, pids, ...).
        if listed.lines().any(|l| l.contains(":memory:")) {
            assert!(controllers.iter().any(|c| c == "memory"), "{controllers:?}");
        }
        assert!(v1_controllers(-1).is_empty());
    }

    #[test]
    fn mountinfo_fields_are_parsed() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 12);
        assert_eq!(mounts[7].mount_point, "/sys/fs/cgroup/systemd");
        assert_eq!(mounts[7].super_options, "rw,name=systemd");
        assert_eq!(
            parse_mountinfo("1 2 0:1 /a\\040b /c - ext4 x rw")[0].root,
            "/a b"
        );
    }

    #[test]
    fn host_binds_cgroups_and_masks_are_external_the_rest_is_criu_s() {
        let spec = spec_with_binds(&[
            ("/etc/hostname", "/host/etc/hostname"),
            ("/dev/shm", "/host/dev/shm"),
        ]);
        let external = external_mounts(&parse_mountinfo(MOUNTINFO), &spec).unwrap();
        assert_eq!(
            external,
            vec![
                ExternalMount::Cgroup {
                    destination: "/sys/fs/cgroup/cpu".into(),
                    controller: "cpu".into(),
                    whole: false
                },
                ExternalMount::Cgroup {
                    destination: "/sys/fs/cgroup/systemd".into(),
                    controller: "name=systemd".into(),
                    whole: true
                },
                ExternalMount::Spec {
                    destination: "/etc/hostname".into()
                },
                ExternalMount::Spec {
                    destination: "/dev/shm".into()
                },
                ExternalMount::DevNull {
                    destination: "/proc/kcore".into()
                },
            ]
        );
    }

    #[test]
    fn device_nodes_bound_from_the_host_are_external_only_when_granted() {
        let info = parse_mountinfo(
            "1 0 0:1 / / rw - overlay overlay rw\n\
             2 1 0:5 /zero /dev/zero rw,nosuid - devtmpfs udev rw\n\
             3 1 0:5 /fuse /dev/fuse rw,nosuid - devtmpfs udev rw\n",
        );
        let err = external_mounts(&info, &Spec::default()).unwrap_err();
        assert!(err.to_string().contains("/dev/fuse"), "{err}");
        let external = external_mounts(&info[..2], &Spec::default()).unwrap();
        assert_eq!(
            external,
            vec![ExternalMount::Device {
                destination: "/dev/zero".into()
            }]
        );
        // Where the host's /dev is a tmpfs (a kind node), its nodes are told by its device.
        let dev = host_dev_file_system().unwrap();
        let info = parse_mountinfo(&format!(
            "2 1 {dev} /zero /dev/zero rw - tmpfs tmpfs rw\n\
             3 1 {dev} /null /proc/kcore rw - tmpfs tmpfs rw\n\
             4 1 0:99 /zero /dev/full rw - tmpfs tmpfs rw\n"
        ));
        let err = external_mounts(&info, &Spec::default()).unwrap_err();
        assert!(err.to_string().contains("/dev/full"), "{err}");
        assert_eq!(
            external_mounts(&info[..2], &Spec::default()).unwrap(),
            vec![
                ExternalMount::Device {
                    destination: "/dev/zero".into()
                },
                ExternalMount::DevNull {
                    destination: "/proc/kcore".into()
                }
            ]
        );
        // Not the node of another path, and never a device the new spec does not grant.
        let other = parse_mountinfo("2 1 0:5 /sda /dev/zero rw - devtmpfs udev rw\n");
        assert!(external_mounts(&other, &Spec::default()).is_err());
        for destination in ["/dev/fuse", "/etc/shadow", "/dev/../etc/shadow"] {
            let metadata = Metadata {
                external_mounts: vec![ExternalMount::Device {
                    destination: destination.into(),
                }],
                ..Metadata::current()
            };
            let err =
                mount_sources(&metadata, &Spec::default(), Path::new("/k8s.io/x")).unwrap_err();
            assert!(err.to_string().contains("does not grant"), "{err}");
        }
    }

    #[test]
    fn a_host_mount_missing_from_the_spec_cannot_be_checkpointed() {
        let err = external_mounts(&parse_mountinfo(MOUNTINFO), &Spec::default()).unwrap_err();
        assert!(err.to_string().contains("/etc/hostname"), "{err}");
    }

    #[test]
    fn restore_needs_every_spec_mount_the_checkpoint_had() {
        let metadata = Metadata {
            external_mounts: vec![ExternalMount::Spec {
                destination: "/data".into(),
            }],
            ..Metadata::current()
        };
        let err = mount_sources(&metadata, &Spec::default(), Path::new("/k8s.io/x")).unwrap_err();
        assert!(err.to_string().contains("/data"), "{err}");
    }
}
