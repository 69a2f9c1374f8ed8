//! A restore runs within what the new pod's spec grants, or not at all: RestorePod compares
//! the security settings of the requested pod and container configs with those the checkpoint
//! was taken under, and refuses any difference, naming it.
//!
//! CRIU restores credentials, capabilities, seccomp, no_new_privs and the LSM label from the
//! checkpoint's images, so the only safe restore is one whose new spec asks for exactly what the
//! checkpointed one had: user, groups, capabilities, privileged, seccomp, no_new_privs,
//! AppArmor/SELinux, read-only rootfs, masked and read-only paths, host namespaces and user
//! namespace mappings, devices and sysctls. (The shim checks the CRIU images themselves
//! against the OCI spec again, before any process exists: `shim/src/restore_policy.rs`.)
//!
//! The checkpointed configs are the JSON containerd reports in a verbose status (Go's encoding
//! of the CRI messages: snake_case fields, zero values omitted, `Int64Value` as `{"value":
//! n}`, enums as numbers); the requested ones are turned into the same shape, and both are
//! compared field by field with zero values and absent fields treated alike.

use std::collections::BTreeMap;

use cri_api::v1::{
    ContainerConfig, LinuxContainerSecurityContext, LinuxSandboxSecurityContext, NamespaceOption,
    PodSandboxConfig, SeLinuxOption, SecurityProfile,
};
use serde_json::{Value, json};

/// How a field is compared.
#[derive(Clone, Copy)]
enum Kind {
    /// As is.
    Exact,
    /// An unordered list.
    Set,
    /// A list of capability names: unordered, case and `CAP_` prefix ignored.
    Capabilities,
    /// An `Int64Value` message: set (to a number, 0 included, which Go omits) or not set.
    Int64Value,
    /// A `UserNamespace` message: its mode, and the container side of its uid and gid
    /// mappings. The host side is the kubelet's choice for each pod, so a restore may land
    /// elsewhere on the host; the shim moves the writable layer's owners there, and the
    /// processes keep their ids inside the namespace (`shim/src/checkpoint/userns.rs`).
    UserNamespace,
}

/// Where a pod's or a container's security context is in its config (containerd's JSON).
const CONTEXT: &str = "/linux/security_context";

/// Security-context fields a pod sandbox and a container both have, below [`CONTEXT`].
const SHARED_CONTEXT: &[(&str, Kind)] = &[
    ("/namespace_options/network", Kind::Exact),
    ("/namespace_options/pid", Kind::Exact),
    ("/namespace_options/ipc", Kind::Exact),
    ("/namespace_options/userns_options", Kind::UserNamespace),
    ("/selinux_options", Kind::Exact),
    ("/run_as_user", Kind::Int64Value),
    ("/run_as_group", Kind::Int64Value),
    ("/readonly_rootfs", Kind::Exact),
    ("/supplemental_groups", Kind::Set),
    ("/supplemental_groups_policy", Kind::Exact),
    ("/privileged", Kind::Exact),
    ("/seccomp", Kind::Exact),
    ("/apparmor", Kind::Exact),
    ("/seccomp_profile_path", Kind::Exact),
];

/// Security-context fields only a container has, below [`CONTEXT`].
const CONTAINER_CONTEXT: &[(&str, Kind)] = &[
    ("/capabilities/add_capabilities", Kind::Capabilities),
    ("/capabilities/drop_capabilities", Kind::Capabilities),
    ("/capabilities/add_ambient_capabilities", Kind::Capabilities),
    ("/run_as_username", Kind::Exact),
    ("/no_new_privs", Kind::Exact),
    ("/masked_paths", Kind::Set),
    ("/readonly_paths", Kind::Set),
    ("/apparmor_profile", Kind::Exact),
];

/// A container's security fields outside its security context.
const CONTAINER_OTHER: &[(&str, Kind)] = &[("/devices", Kind::Set)];

/// A pod sandbox's security fields outside its security context.
const SANDBOX_OTHER: &[(&str, Kind)] = &[("/linux/sysctls", Kind::Exact)];

/// Zero values and absent fields compare alike (Go's `omitempty` drops them).
fn normalise(value: Option<&Value>, kind: Kind) -> Value {
    if let Kind::Int64Value = kind {
        return match value {
            Some(Value::Object(o)) => o.get("value").cloned().unwrap_or(json!(0)),
            _ => Value::Null,
        };
    }
    if let Kind::UserNamespace = kind {
        return match normalise(value, Kind::Exact) {
            Value::Object(mut o) => {
                for ids in ["uids", "gids"] {
                    if let Some(Value::Array(maps)) = o.get_mut(ids) {
                        for map in maps.iter_mut() {
                            if let Value::Object(fields) = map {
                                fields.remove("host_id");
                            }
                            *map = normalise(Some(map), Kind::Exact);
                        }
                        maps.sort_by_key(|v| v.to_string());
                    }
                }
                Value::Object(o)
            }
            other => other,
        };
    }
    let value = match value {
        None | Some(Value::Null) => return Value::Null,
        Some(Value::Bool(false)) => return Value::Null,
        Some(Value::Number(n)) if n.as_f64() == Some(0.0) => return Value::Null,
        Some(Value::String(s)) if s.is_empty() => return Value::Null,
        Some(Value::Array(a)) if a.is_empty() => return Value::Null,
        Some(Value::Object(o)) => {
            let kept: serde_json::Map<String, Value> = o
                .iter()
                .map(|(k, v)| (k.clone(), normalise(Some(v), Kind::Exact)))
                .filter(|(_, v)| !v.is_null())
                .collect();
            return if kept.is_empty() {
                Value::Null
            } else {
                Value::Object(kept)
            };
        }
        Some(v) => v.clone(),
    };
    match (kind, value) {
        (Kind::Set, Value::Array(items)) => {
            let mut items: Vec<Value> = items
                .iter()
                .map(|v| normalise(Some(v), Kind::Exact))
                .collect();
            items.sort_by_key(|v| v.to_string());
            items.dedup();
            Value::Array(items)
        }
        (Kind::Capabilities, Value::Array(items)) => {
            let mut names: Vec<String> = items
                .iter()
                .filter_map(|v| v.as_str())
                .map(|s| {
                    let upper = s.to_ascii_uppercase();
                    upper.strip_prefix("CAP_").unwrap_or(&upper).to_string()
                })
                .collect();
            names.sort();
            names.dedup();
            json!(names)
        }
        (_, v) => v,
    }
}

/// The fields in which `requested` differs from `checkpointed`, each as
/// `field: checkpoint <value>, requested <value>`: the security-context fields `context`
/// (below [`CONTEXT`]), then the fields `other` (from the config's root).
fn differences(
    checkpointed: &Value,
    requested: &Value,
    context: &[&[(&str, Kind)]],
    other: &[(&str, Kind)],
) -> Vec<String> {
    let fields = context
        .iter()
        .flat_map(|list| list.iter())
        .map(|(pointer, kind)| (format!("{CONTEXT}{pointer}"), *kind))
        .chain(
            other
                .iter()
                .map(|(pointer, kind)| (pointer.to_string(), *kind)),
        );
    fields
        .filter_map(|(pointer, kind)| {
            let old = normalise(checkpointed.pointer(&pointer), kind);
            let new = normalise(requested.pointer(&pointer), kind);
            (old != new).then(|| {
                let name = pointer.trim_start_matches('/').replace('/', ".");
                format!("{name}: checkpoint {old}, requested {new}")
            })
        })
        .collect()
}

fn profile(p: &Option<SecurityProfile>) -> Value {
    p.as_ref().map_or(
        Value::Null,
        |p| json!({"profile_type": p.profile_type, "localhost_ref": p.localhost_ref}),
    )
}

fn selinux(s: &Option<SeLinuxOption>) -> Value {
    s.as_ref().map_or(
        Value::Null,
        |s| json!({"user": s.user, "role": s.role, "type": s.r#type, "level": s.level}),
    )
}

fn namespaces(n: &Option<NamespaceOption>) -> Value {
    n.as_ref().map_or(Value::Null, |n| {
        let userns = n.userns_options.as_ref().map_or(Value::Null, |u| {
            let ids = |m: &[cri_api::v1::IdMapping]| -> Value {
                m.iter()
                    .map(|m| {
                        json!({"host_id": m.host_id, "container_id": m.container_id, "length": m.length})
                    })
                    .collect()
            };
            json!({"mode": u.mode, "uids": ids(&u.uids), "gids": ids(&u.gids)})
        });
        json!({"network": n.network, "pid": n.pid, "ipc": n.ipc, "userns_options": userns})
    })
}

// The deprecated fields are still what older kubelets send: they must match too.
#[allow(deprecated)]
fn container_context(c: &LinuxContainerSecurityContext) -> Value {
    json!({
        "capabilities": c.capabilities.as_ref().map(|c| json!({
            "add_capabilities": c.add_capabilities,
            "drop_capabilities": c.drop_capabilities,
            "add_ambient_capabilities": c.add_ambient_capabilities,
        })),
        "privileged": c.privileged,
        "namespace_options": namespaces(&c.namespace_options),
        "selinux_options": selinux(&c.selinux_options),
        "run_as_user": c.run_as_user.as_ref().map(|v| json!({"value": v.value})),
        "run_as_group": c.run_as_group.as_ref().map(|v| json!({"value": v.value})),
        "run_as_username": c.run_as_username,
        "readonly_rootfs": c.readonly_rootfs,
        "supplemental_groups": c.supplemental_groups,
        "supplemental_groups_policy": c.supplemental_groups_policy,
        "no_new_privs": c.no_new_privs,
        "masked_paths": c.masked_paths,
        "readonly_paths": c.readonly_paths,
        "seccomp": profile(&c.seccomp),
        "apparmor": profile(&c.apparmor),
        "apparmor_profile": c.apparmor_profile,
        "seccomp_profile_path": c.seccomp_profile_path,
    })
}

#[allow(deprecated)]
fn sandbox_context(c: &LinuxSandboxSecurityContext) -> Value {
    json!({
        "namespace_options": namespaces(&c.namespace_options),
        "selinux_options": selinux(&c.selinux_options),
        "run_as_user": c.run_as_user.as_ref().map(|v| json!({"value": v.value})),
        "run_as_group": c.run_as_group.as_ref().map(|v| json!({"value": v.value})),
        "readonly_rootfs": c.readonly_rootfs,
        "supplemental_groups": c.supplemental_groups,
        "supplemental_groups_policy": c.supplemental_groups_policy,
        "privileged": c.privileged,
        "seccomp": profile(&c.seccomp),
        "apparmor": profile(&c.apparmor),
        "seccomp_profile_path": c.seccomp_profile_path,
    })
}

/// A requested container config's security fields in containerd's JSON shape.
pub fn container_json(config: &ContainerConfig) -> Value {
    let devices: Vec<Value> = config
        .devices
        .iter()
        .map(|d| {
            json!({"container_path": d.container_path, "host_path": d.host_path, "permissions": d.permissions})
        })
        .collect();
    json!({
        "linux": config.linux.as_ref().map(|l| json!({
            "security_context": l.security_context.as_ref().map(container_context),
        })),
        "devices": devices,
    })
}

/// A requested sandbox config's security fields in containerd's JSON shape.
pub fn sandbox_json(config: &PodSandboxConfig) -> Value {
    json!({
        "linux": config.linux.as_ref().map(|l| json!({
            "security_context": l.security_context.as_ref().map(sandbox_context),
            "sysctls": l.sysctls.iter().collect::<BTreeMap<_, _>>(),
        })),
    })
}

/// The differences between a checkpointed container config and the requested one.
pub fn container_differences(checkpointed: &Value, requested: &ContainerConfig) -> Vec<String> {
    differences(
        checkpointed,
        &container_json(requested),
        &[SHARED_CONTEXT, CONTAINER_CONTEXT],
        CONTAINER_OTHER,
    )
}

/// The differences between the checkpointed sandbox config and the requested one.
pub fn sandbox_differences(checkpointed: &Value, requested: &PodSandboxConfig) -> Vec<String> {
    differences(
        checkpointed,
        &sandbox_json(requested),
        &[SHARED_CONTEXT],
        SANDBOX_OTHER,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use cri_api::v1::{Capability, Int64Value, LinuxContainerConfig, LinuxPodSandboxConfig};

    /// A checkpointed config as containerd reports it: a root container with the default
    /// capabilities, RuntimeDefault seccomp.
    fn root_checkpoint() -> Value {
        json!({
            "metadata": {"name": "app"},
            "linux": {"security_context": {
                "namespace_options": {"pid": 1},
                "run_as_user": {},
                "seccomp": {"profile_type": 0},
                "masked_paths": ["/proc/kcore", "/proc/keys"],
                "readonly_paths": ["/proc/bus"]
            }}
        })
    }

    fn requested(context: LinuxContainerSecurityContext) -> ContainerConfig {
        ContainerConfig {
            linux: Some(LinuxContainerConfig {
                security_context: Some(context),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn same_as_root() -> LinuxContainerSecurityContext {
        LinuxContainerSecurityContext {
            namespace_options: Some(NamespaceOption {
                pid: 1,
                ..Default::default()
            }),
            run_as_user: Some(Int64Value { value: 0 }),
            seccomp: Some(SecurityProfile::default()),
            masked_paths: vec!["/proc/keys".into(), "/proc/kcore".into()],
            readonly_paths: vec!["/proc/bus".into()],
            ..Default::default()
        }
    }

    #[test]
    fn an_explicit_root_user_is_not_an_unset_one() {
        let mut context = same_as_root();
        context.run_as_user = None;
        let mut checkpoint = root_checkpoint();
        checkpoint["linux"]["security_context"]
            .as_object_mut()
            .unwrap()
            .remove("run_as_user");
        assert!(container_differences(&checkpoint, &requested(context.clone())).is_empty());
        checkpoint["linux"]["security_context"]["run_as_user"] = json!({});
        let text = container_differences(&checkpoint, &requested(context)).join("; ");
        assert!(
            text.contains("run_as_user: checkpoint 0, requested null"),
            "{text}"
        );
    }

    #[test]
    fn the_same_security_context_restores() {
        assert_eq!(
            container_differences(&root_checkpoint(), &requested(same_as_root())),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_restricted_spec_for_a_root_checkpoint_is_refused_naming_each_field() {
        let mut restricted = same_as_root();
        restricted.run_as_user = Some(Int64Value { value: 65534 });
        restricted.no_new_privs = true;
        restricted.capabilities = Some(Capability {
            drop_capabilities: vec!["ALL".into()],
            ..Default::default()
        });
        restricted.seccomp = Some(SecurityProfile {
            profile_type: 0,
            ..Default::default()
        });
        let diff = container_differences(&root_checkpoint(), &requested(restricted));
        let text = diff.join("; ");
        assert!(
            text.contains("run_as_user: checkpoint 0, requested 65534"),
            "{text}"
        );
        assert!(text.contains("no_new_privs"), "{text}");
        assert!(text.contains("drop_capabilities"), "{text}");
        assert_eq!(diff.len(), 3, "{text}");
    }

    #[test]
    fn a_user_namespace_may_move_on_the_host_but_not_inside() {
        let mapping = |host_id: u32, container_id: u32, length: u32| cri_api::v1::IdMapping {
            host_id,
            container_id,
            length,
        };
        let with = |maps: Vec<cri_api::v1::IdMapping>| {
            let mut context = same_as_root();
            context.namespace_options.as_mut().unwrap().userns_options =
                Some(cri_api::v1::UserNamespace {
                    mode: 0,
                    uids: maps.clone(),
                    gids: maps,
                });
            requested(context)
        };
        let mut checkpoint = root_checkpoint();
        // Go's JSON omits a zero container_id.
        checkpoint["linux"]["security_context"]["namespace_options"]["userns_options"] = json!({
            "uids": [{"host_id": 65536 * 23, "length": 65536}],
            "gids": [{"host_id": 65536 * 23, "length": 65536}],
        });
        for host in [65536 * 23, 65536 * 24] {
            let diff = container_differences(&checkpoint, &with(vec![mapping(host, 0, 65536)]));
            assert!(diff.is_empty(), "{diff:?}");
        }
        for maps in [
            vec![mapping(65536 * 24, 1, 65536)],
            vec![mapping(65536 * 24, 0, 1000)],
            vec![],
        ] {
            let text = container_differences(&checkpoint, &with(maps)).join("; ");
            assert!(text.contains("userns_options"), "{text}");
        }
        let text = container_differences(&checkpoint, &requested(same_as_root())).join("; ");
        assert!(text.contains("userns_options"), "{text}");
    }

    #[test]
    fn privileged_devices_and_capability_spelling() {
        let mut checkpoint = root_checkpoint();
        checkpoint["linux"]["security_context"]["capabilities"] =
            json!({"add_capabilities": ["CAP_NET_ADMIN"]});
        let mut context = same_as_root();
        context.capabilities = Some(Capability {
            add_capabilities: vec!["net_admin".into()],
            ..Default::default()
        });
        assert!(container_differences(&checkpoint, &requested(context.clone())).is_empty());
        context.privileged = true;
        let mut config = requested(context);
        config.devices.push(cri_api::v1::Device {
            container_path: "/dev/sda".into(),
            host_path: "/dev/sda".into(),
            permissions: "rwm".into(),
        });
        let text = container_differences(&checkpoint, &config).join("; ");
        assert!(text.contains("privileged"), "{text}");
        assert!(text.contains("devices"), "{text}");
    }

    #[test]
    fn host_namespaces_and_sysctls_of_the_pod_must_match() {
        let checkpoint = json!({"linux": {"security_context": {"namespace_options": {"pid": 1}}}});
        let mut config = PodSandboxConfig {
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        pid: 1,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(sandbox_differences(&checkpoint, &config).is_empty());
        let linux = config.linux.as_mut().unwrap();
        // NODE (2): the host's network namespace.
        linux
            .security_context
            .as_mut()
            .unwrap()
            .namespace_options
            .as_mut()
            .unwrap()
            .network = 2;
        linux
            .sysctls
            .insert("net.ipv4.ip_unprivileged_port_start".into(), "0".into());
        let text = sandbox_differences(&checkpoint, &config).join("; ");
        assert!(text.contains("namespace_options.network"), "{text}");
        assert!(text.contains("sysctls"), "{text}");
    }
}
