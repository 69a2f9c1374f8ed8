//! What a restore may never do: run a process with more than the new container's spec grants.
//!
//! CRIU restores every thread's credentials, capabilities, securebits, no_new_privs, seccomp
//! filter and LSM label from the checkpoint's images, not from the spec the container was
//! created with. Before CRIU runs, [`check_credentials`] compares what the images hold
//! ([`podsnap_checkpoint_format::creds`]) with the new spec and refuses, naming the difference,
//! anything the spec would not give a process it started itself:
//! - user and group ids other than the spec's, unless the spec grants `CAP_SETUID`/`CAP_SETGID`
//!   (then the process could have switched itself); supplementary groups beyond the spec's;
//! - any capability outside the spec's bounding and permitted sets; a bounding set larger than
//!   the spec's;
//! - no `no_new_privs` where the spec sets `noNewPrivileges`;
//! - no seccomp filter where the spec has a seccomp profile (the spec's filter itself is
//!   compared one level up: podsnapd refuses a restore whose seccomp profile differs from the
//!   checkpointed one);
//! - another LSM label than the spec's AppArmor profile or SELinux label.
//!
//! [`check_metadata`] refuses external-mount descriptors that would bind something from the
//! host that the new container is not given: nothing from an archive is ever joined onto a
//! host path unchecked.

use std::path::{Component, Path};

use anyhow::{bail, ensure};
use libcontainer::capabilities::CapabilityExt;
use oci_spec::runtime::{Capabilities, Spec};
use podsnap_checkpoint_format::creds::{SECCOMP_MODE_FILTER, ThreadCredentials};

use crate::checkpoint::{ExternalMount, Metadata};

const CAP_SETGID: u64 = 1 << 6;
const CAP_SETUID: u64 = 1 << 7;

fn mask(caps: Option<&Capabilities>) -> u64 {
    caps.into_iter()
        .flatten()
        .map(|c| c.to_cap().index())
        .filter(|i| *i < 64)
        .fold(0, |acc, i| acc | (1u64 << i))
}

/// Capability numbers named, for messages (`CAP_SYS_ADMIN`, ...; `cap 41` when unnamed).
fn names(bits: u64) -> String {
    (0..64)
        .filter(|i| bits & (1u64 << i) != 0)
        .map(|i| {
            caps::all()
                .into_iter()
                .find(|c| c.index() == i)
                .map_or_else(|| format!("cap {i}"), |c| c.to_string())
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// What the new container's spec grants its processes.
struct Granted {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    bounding: u64,
    /// Every capability the spec gives in any set but bounding.
    any: u64,
    /// What the container's process holds once it runs: for a non-root user, execve leaves
    /// only the ambient set (file capabilities aside, which the bounding set still limits).
    held: u64,
    no_new_privs: bool,
    seccomp: bool,
    lsm: Option<String>,
}

impl Granted {
    fn of(spec: &Spec) -> Self {
        let process = spec.process().as_ref();
        let user = process.map(|p| p.user());
        let caps = process.and_then(|p| p.capabilities().as_ref());
        let set = |f: fn(&oci_spec::runtime::LinuxCapabilities) -> &Option<Capabilities>| {
            mask(caps.and_then(|c| f(c).as_ref()))
        };
        let lsm = process.and_then(|p| {
            p.apparmor_profile()
                .clone()
                .or_else(|| p.selinux_label().clone())
                .filter(|l| !l.is_empty())
        });
        let uid = user.map_or(0, |u| u.uid());
        let any = set(|c| c.permitted())
            | set(|c| c.effective())
            | set(|c| c.inheritable())
            | set(|c| c.ambient());
        Granted {
            uid,
            gid: user.map_or(0, |u| u.gid()),
            groups: user
                .and_then(|u| u.additional_gids().clone())
                .unwrap_or_default(),
            bounding: set(|c| c.bounding()),
            any,
            held: if uid == 0 { any } else { set(|c| c.ambient()) },
            no_new_privs: process.and_then(|p| p.no_new_privileges()).unwrap_or(false),
            seccomp: spec.linux().as_ref().is_some_and(|l| l.seccomp().is_some()),
            lsm,
        }
    }
}

/// The LSM label without AppArmor's mode suffix (`profile (enforce)` → `profile`).
fn label(profile: &str) -> &str {
    profile
        .rsplit_once(" (")
        .map_or(profile, |(name, _)| name)
        .trim()
}

/// Refuses a restore whose checkpointed threads would run with more than `spec` grants.
pub fn check_credentials(spec: &Spec, threads: &[ThreadCredentials]) -> anyhow::Result<()> {
    let granted = Granted::of(spec);
    for t in threads {
        let who = format!("checkpointed thread {} ({})", t.tid, t.comm);
        let ids = |kind: &str, ids: &[u32; 4], want: u32| -> anyhow::Result<()> {
            ensure!(
                ids.iter().all(|id| *id == want),
                "{who} runs with {kind}s {ids:?} but the new container's spec runs as {kind} {want} \
                 without the capability to change it"
            );
            Ok(())
        };
        if granted.held & CAP_SETUID == 0 {
            ids("uid", &t.uids, granted.uid)?;
        }
        if granted.held & CAP_SETGID == 0 {
            ids("gid", &t.gids, granted.gid)?;
            let extra: Vec<u32> = t
                .groups
                .iter()
                .copied()
                .filter(|g| *g != granted.gid && !granted.groups.contains(g))
                .collect();
            ensure!(
                extra.is_empty(),
                "{who} has supplementary groups {extra:?} that the new container's spec does not grant"
            );
        }
        let allowed = granted.bounding | granted.any;
        for (set, bits) in [
            ("permitted", t.permitted),
            ("effective", t.effective),
            ("inheritable", t.inheritable),
            ("ambient", t.ambient),
        ] {
            let extra = bits & !allowed;
            ensure!(
                extra == 0,
                "{who} has {set} capabilities {} that the new container's spec does not grant",
                names(extra)
            );
        }
        let extra = t.bounding & !granted.bounding;
        ensure!(
            extra == 0,
            "{who} has capabilities {} in its bounding set that the new container's spec drops",
            names(extra)
        );
        ensure!(
            !granted.no_new_privs || t.no_new_privs,
            "{who} runs without no_new_privs but the new container's spec sets noNewPrivileges"
        );
        ensure!(
            !granted.seccomp || t.seccomp_mode == SECCOMP_MODE_FILTER,
            "{who} runs without a seccomp filter but the new container's spec has a seccomp profile"
        );
        let had = t.lsm_profile.as_deref().map(label).filter(|l| {
            // No LSM, or one that confines nothing, is what a spec without a label gets.
            !l.is_empty() && *l != "unconfined"
        });
        match (&granted.lsm, had) {
            (None, None) => {}
            (Some(want), Some(got)) if label(want) == got => {}
            (want, got) => bail!(
                "{who} runs with LSM label {got:?} but the new container's spec asks for {want:?}"
            ),
        }
    }
    Ok(())
}

/// Whether `path` is absolute and has no `.`/`..` components.
fn clean_absolute(path: &str) -> bool {
    let path = Path::new(path);
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// Refuses external-mount descriptors a dump could not have written, before any of their
/// values is joined onto a host path: destinations must be clean absolute paths; a cgroup
/// mount's controller must be a cgroup v1 hierarchy name (letters, digits, `_`, `,`, and a
/// `name=` prefix), mounted inside the container under `/sys/fs/cgroup`. What a cgroup mount
/// binds is not taken from the descriptor at all: `checkpoint::mounts::mount_sources` binds what
/// the runtime binds for a new container.
pub fn check_metadata(metadata: &Metadata) -> anyhow::Result<()> {
    for m in &metadata.external_mounts {
        let destination = m.destination();
        ensure!(
            clean_absolute(destination),
            "the checkpoint's mount descriptor names destination {destination:?}: not a clean absolute path"
        );
        if let ExternalMount::Cgroup { controller, .. } = m {
            let hierarchy = controller
                .split(',')
                .find_map(|c| c.strip_prefix("name="))
                .unwrap_or(controller);
            let valid = !hierarchy.is_empty()
                && hierarchy
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b',')
                && controller
                    .split(',')
                    .all(|c| !c.is_empty() && c.len() <= 64);
            ensure!(
                valid,
                "the checkpoint's cgroup mount at {destination} names controller {controller:?}: refused"
            );
            ensure!(
                Path::new(destination).starts_with("/sys/fs/cgroup"),
                "the checkpoint's cgroup mount is at {destination}, outside /sys/fs/cgroup: refused"
            );
        }
    }
    for name in &metadata.external_namespaces {
        ensure!(
            name == "network" || name == "pid",
            "the checkpoint joins an external {name:?} namespace: only network and pid are known"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxSeccompBuilder, ProcessBuilder,
        UserBuilder,
    };

    fn root_caps() -> u64 {
        // containerd's default set: chown, dac_override, fsetid, fowner, mknod, net_raw,
        // setgid, setuid, setfcap, setpcap, net_bind_service, sys_chroot, kill, audit_write.
        0xa80425fb
    }

    fn thread(uid: u32, caps: u64) -> ThreadCredentials {
        ThreadCredentials {
            tid: 1,
            comm: "sh".into(),
            uids: [uid; 4],
            gids: [uid; 4],
            groups: vec![],
            inheritable: 0,
            permitted: caps,
            effective: caps,
            bounding: caps,
            ambient: 0,
            securebits: 0,
            no_new_privs: true,
            seccomp_mode: SECCOMP_MODE_FILTER,
            lsm_profile: None,
        }
    }

    fn spec(uid: u32, caps: &[Capability], nnp: bool, seccomp: bool) -> Spec {
        let set: Capabilities = caps.iter().copied().collect();
        let process = ProcessBuilder::default()
            .user(UserBuilder::default().uid(uid).gid(uid).build().unwrap())
            .capabilities(
                LinuxCapabilitiesBuilder::default()
                    .bounding(set.clone())
                    .effective(set.clone())
                    .permitted(set)
                    .build()
                    .unwrap(),
            )
            .no_new_privileges(nnp)
            .build()
            .unwrap();
        let mut spec = Spec::default();
        spec.set_process(Some(process));
        let mut linux = LinuxBuilder::default().build().unwrap();
        if seccomp {
            linux.set_seccomp(Some(LinuxSeccompBuilder::default().build().unwrap()));
        }
        spec.set_linux(Some(linux));
        spec
    }

    fn default_caps() -> Vec<Capability> {
        use Capability::*;
        vec![
            Chown,
            DacOverride,
            Fsetid,
            Fowner,
            Mknod,
            NetRaw,
            Setgid,
            Setuid,
            Setfcap,
            Setpcap,
            NetBindService,
            SysChroot,
            Kill,
            AuditWrite,
        ]
    }

    #[test]
    fn a_root_checkpoint_under_the_same_root_spec_restores() {
        check_credentials(
            &spec(0, &default_caps(), true, true),
            &[thread(0, root_caps())],
        )
        .unwrap();
    }

    #[test]
    fn a_root_checkpoint_under_a_restricted_spec_is_refused_naming_the_difference() {
        // runAsUser 65534, drop ALL, as Pod Security's restricted level asks.
        let restricted = spec(65534, &[], true, true);
        let err = check_credentials(&restricted, &[thread(0, root_caps())]).unwrap_err();
        assert!(err.to_string().contains("uid"), "{err}");
        // Even a checkpoint of uid 65534 that kept capabilities is refused.
        let err = check_credentials(&restricted, &[thread(65534, 1 << 21)]).unwrap_err();
        assert!(err.to_string().contains("CAP_SYS_ADMIN"), "{err}");
    }

    #[test]
    fn a_less_privileged_checkpoint_restores_under_a_richer_spec() {
        check_credentials(
            &spec(0, &default_caps(), false, false),
            &[thread(0, 0), thread(0, 1 << 0)],
        )
        .unwrap();
    }

    #[test]
    fn no_new_privs_seccomp_and_lsm_must_hold() {
        let mut t = thread(0, root_caps());
        t.no_new_privs = false;
        let err = check_credentials(&spec(0, &default_caps(), true, false), &[t]).unwrap_err();
        assert!(err.to_string().contains("no_new_privs"), "{err}");
        let mut t = thread(0, root_caps());
        t.seccomp_mode = 0;
        let err = check_credentials(&spec(0, &default_caps(), false, true), &[t]).unwrap_err();
        assert!(err.to_string().contains("seccomp"), "{err}");
        let mut t = thread(0, root_caps());
        t.lsm_profile = Some("unconfined".into());
        check_credentials(&spec(0, &default_caps(), false, false), &[t.clone()]).unwrap();
        t.lsm_profile = Some("host-admin (enforce)".into());
        let err = check_credentials(&spec(0, &default_caps(), false, false), &[t]).unwrap_err();
        assert!(err.to_string().contains("LSM"), "{err}");
    }

    #[test]
    fn a_non_root_spec_with_default_capabilities_does_not_take_a_root_checkpoint() {
        // Pod Security "baseline" with runAsUser 1000: CAP_SETUID is in the spec's sets, but a
        // non-root process holds none of them after execve.
        let err = check_credentials(
            &spec(1000, &default_caps(), false, false),
            &[thread(0, root_caps())],
        )
        .unwrap_err();
        assert!(err.to_string().contains("uid"), "{err}");
        check_credentials(
            &spec(1000, &default_caps(), false, false),
            &[thread(1000, 0)],
        )
        .unwrap();
    }

    #[test]
    fn extra_groups_without_setgid_are_refused() {
        let mut t = thread(1000, 0);
        t.groups = vec![0];
        let err = check_credentials(&spec(1000, &[], false, false), &[t]).unwrap_err();
        assert!(err.to_string().contains("groups"), "{err}");
    }

    fn cgroup(controller: &str, destination: &str, whole: bool) -> Metadata {
        Metadata {
            version: 1,
            external_mounts: vec![ExternalMount::Cgroup {
                destination: destination.into(),
                controller: controller.into(),
                whole,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn mount_descriptors_that_would_reach_host_paths_are_refused() {
        check_metadata(&cgroup("cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct", false)).unwrap();
        check_metadata(&cgroup("name=systemd", "/sys/fs/cgroup/systemd", true)).unwrap();
        // A whole hierarchy in the descriptor binds nothing more: the source is the runtime's.
        check_metadata(&cgroup("misc", "/sys/fs/cgroup/misc", true)).unwrap();
        check_metadata(&cgroup("memory", "/sys/fs/cgroup/memory", true)).unwrap();
        for (controller, destination, whole) in [
            ("../../../etc/shadow", "/sys/fs/cgroup/x", false),
            ("/etc/shadow", "/sys/fs/cgroup/x", false),
            ("cpu", "/etc/passwd", false),
            ("cpu", "/sys/fs/cgroup/../../etc", false),
            ("", "/sys/fs/cgroup/x", false),
        ] {
            let err = check_metadata(&cgroup(controller, destination, whole)).unwrap_err();
            assert!(
                err.to_string().contains("refused") || err.to_string().contains("clean"),
                "{err}"
            );
        }
        let spec_mount = Metadata {
            version: 1,
            external_mounts: vec![ExternalMount::Spec {
                destination: "data/../../x".into(),
            }],
            ..Default::default()
        };
        assert!(check_metadata(&spec_mount).is_err());
        let namespaces = Metadata {
            version: 1,
            external_namespaces: vec!["user".into()],
            ..Default::default()
        };
        assert!(check_metadata(&namespaces).is_err());
    }
}
