//! Pod and container configs in the JSON that `crictl runp` and `crictl create` take (the CRI
//! messages' Go JSON: snake_case field names, enums as numbers), read into the CRI types that
//! `RestorePod` carries.
//!
//! The JSON is decoded by the serde that `cri-api` generates (its `serde` feature: the proto3 JSON
//! mapping); this module keeps only what that does not say:
//! - A subset of fields is supported: the ones a restore needs or may set (`POD`,
//!   `CONTAINER`). A field outside it is an error naming it, not silently dropped.
//! - `null` counts as absent for every field, as Go's encoding/json reads it.
//! - An env's `value` is a plain string, as crictl writes it (the proto field is bytes since
//!   cri-api v0.34, which the proto3 mapping would take as base64).
//! - A pod without a `metadata.uid` gets a fresh one, like crictl does; a pod needs a name and a
//!   namespace, a container a name and an image.
//!
//! As conveniences beyond crictl, enums may also be written by their proto names (`"NODE"`,
//! `"TCP"`, `"RuntimeDefault"`), and integers as strings of them (`"1000"`), as the proto3
//! mapping allows.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use cri_api::v1::{ContainerConfig, PodSandboxConfig};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Why a config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

/// Reads a pod sandbox config (`crictl runp`'s JSON).
pub fn read_pod_config(path: &Path) -> Result<PodSandboxConfig, ConfigError> {
    pod_config(read_json(path)?).map_err(|what| ConfigError::Invalid {
        path: path.to_path_buf(),
        what,
    })
}

/// Reads a container config (`crictl create`'s JSON).
pub fn read_container_config(path: &Path) -> Result<ContainerConfig, ConfigError> {
    container_config(read_json(path)?).map_err(|what| ConfigError::Invalid {
        path: path.to_path_buf(),
        what,
    })
}

fn read_json(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ConfigError::Json {
        path: path.to_path_buf(),
        source,
    })
}

// ---- the supported subset ----

/// The supported fields of a message, by their proto (and Go JSON) names.
type Fields = &'static [(&'static str, Field)];

/// What a supported field holds.
enum Field {
    /// A scalar, a list of scalars or a map: taken whole, as the generated decoder reads it.
    Leaf,
    /// Bytes written as a plain string (UTF-8), not as the proto3 mapping's base64.
    PlainBytes,
    /// A message, of which only these fields are supported.
    Message(Fields),
    /// A list of messages, of which only these fields are supported.
    Repeated(Fields),
}

use Field::{Leaf, Message, PlainBytes, Repeated};

/// `PodSandboxConfig`.
const POD: Fields = &[
    (
        "metadata",
        Message(&[
            ("name", Leaf),
            ("uid", Leaf),
            ("namespace", Leaf),
            ("attempt", Leaf),
        ]),
    ),
    ("hostname", Leaf),
    ("log_directory", Leaf),
    (
        "dns_config",
        Message(&[("servers", Leaf), ("searches", Leaf), ("options", Leaf)]),
    ),
    (
        "port_mappings",
        Repeated(&[
            ("protocol", Leaf),
            ("container_port", Leaf),
            ("host_port", Leaf),
            ("host_ip", Leaf),
        ]),
    ),
    ("labels", Leaf),
    ("annotations", Leaf),
    (
        "linux",
        Message(&[
            ("cgroup_parent", Leaf),
            (
                "security_context",
                Message(&[
                    ("namespace_options", Message(NAMESPACE_OPTIONS)),
                    ("selinux_options", Message(SELINUX)),
                    ("run_as_user", Message(INT64)),
                    ("run_as_group", Message(INT64)),
                    ("readonly_rootfs", Leaf),
                    ("supplemental_groups", Leaf),
                    ("privileged", Leaf),
                    ("seccomp", Message(SECURITY_PROFILE)),
                    ("apparmor", Message(SECURITY_PROFILE)),
                ]),
            ),
            ("sysctls", Leaf),
        ]),
    ),
];

/// `ContainerConfig`.
const CONTAINER: Fields = &[
    ("metadata", Message(&[("name", Leaf), ("attempt", Leaf)])),
    (
        "image",
        Message(&[
            ("image", Leaf),
            ("annotations", Leaf),
            ("user_specified_image", Leaf),
            ("runtime_handler", Leaf),
            ("image_ref", Leaf),
        ]),
    ),
    ("command", Leaf),
    ("args", Leaf),
    ("working_dir", Leaf),
    ("envs", Repeated(&[("key", Leaf), ("value", PlainBytes)])),
    (
        "mounts",
        Repeated(&[
            ("container_path", Leaf),
            ("host_path", Leaf),
            ("readonly", Leaf),
            ("selinux_relabel", Leaf),
            ("propagation", Leaf),
            ("recursive_read_only", Leaf),
        ]),
    ),
    ("labels", Leaf),
    ("annotations", Leaf),
    ("log_path", Leaf),
    ("stdin", Leaf),
    ("stdin_once", Leaf),
    ("tty", Leaf),
    (
        "linux",
        Message(&[
            (
                "resources",
                Message(&[
                    ("cpu_period", Leaf),
                    ("cpu_quota", Leaf),
                    ("cpu_shares", Leaf),
                    ("memory_limit_in_bytes", Leaf),
                    ("oom_score_adj", Leaf),
                    ("cpuset_cpus", Leaf),
                    ("cpuset_mems", Leaf),
                    (
                        "hugepage_limits",
                        Repeated(&[("page_size", Leaf), ("limit", Leaf)]),
                    ),
                    ("unified", Leaf),
                    ("memory_swap_limit_in_bytes", Leaf),
                ]),
            ),
            (
                "security_context",
                Message(&[
                    (
                        "capabilities",
                        Message(&[
                            ("add_capabilities", Leaf),
                            ("drop_capabilities", Leaf),
                            ("add_ambient_capabilities", Leaf),
                        ]),
                    ),
                    ("privileged", Leaf),
                    ("namespace_options", Message(NAMESPACE_OPTIONS)),
                    ("selinux_options", Message(SELINUX)),
                    ("run_as_user", Message(INT64)),
                    ("run_as_group", Message(INT64)),
                    ("run_as_username", Leaf),
                    ("readonly_rootfs", Leaf),
                    ("supplemental_groups", Leaf),
                    ("no_new_privs", Leaf),
                    ("masked_paths", Leaf),
                    ("readonly_paths", Leaf),
                    ("seccomp", Message(SECURITY_PROFILE)),
                    ("apparmor", Message(SECURITY_PROFILE)),
                ]),
            ),
        ]),
    ),
];

const NAMESPACE_OPTIONS: Fields = &[
    ("network", Leaf),
    ("pid", Leaf),
    ("ipc", Leaf),
    ("target_id", Leaf),
    (
        "userns_options",
        Message(&[
            ("mode", Leaf),
            ("uids", Repeated(ID_MAPPING)),
            ("gids", Repeated(ID_MAPPING)),
        ]),
    ),
];
const ID_MAPPING: Fields = &[("host_id", Leaf), ("container_id", Leaf), ("length", Leaf)];
const SELINUX: Fields = &[
    ("user", Leaf),
    ("role", Leaf),
    ("type", Leaf),
    ("level", Leaf),
];
const INT64: Fields = &[("value", Leaf)];
const SECURITY_PROFILE: Fields = &[("profile_type", Leaf), ("localhost_ref", Leaf)];

/// Readies `json` (a message with `fields`, found at `path`) for the generated decoder: drops its
/// `null` fields, refuses one outside the subset, and encodes plain-string bytes as base64.
/// Values of the wrong type are left to the decoder, which names them.
fn normalize(json: &mut Value, fields: Fields, path: &str) -> Result<(), String> {
    let Value::Object(object) = json else {
        return Ok(());
    };
    object.retain(|_, value| !value.is_null());
    for (name, value) in object.iter_mut() {
        let at = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        match fields.iter().find(|(known, _)| known == name) {
            None => {
                let names: Vec<&str> = fields.iter().map(|(name, _)| *name).collect();
                return Err(format!(
                    "{at}: unknown or unsupported field (supported here: {})",
                    names.join(", ")
                ));
            }
            Some((_, Leaf)) => {}
            Some((_, PlainBytes)) => {
                if let Value::String(text) = value {
                    *text = base64::engine::general_purpose::STANDARD.encode(&text);
                }
            }
            Some((_, Message(inner))) => normalize(value, inner, &at)?,
            Some((_, Repeated(inner))) => {
                if let Value::Array(items) = value {
                    for (index, item) in items.iter_mut().enumerate() {
                        normalize(item, inner, &format!("{at}[{index}]"))?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Decodes a message with `fields` from `json`; errors name the field (`linux.resources.cpu_quota`).
fn decode<T: DeserializeOwned>(mut json: Value, fields: Fields) -> Result<T, String> {
    normalize(&mut json, fields, "")?;
    serde_path_to_error::deserialize(&json).map_err(|err| {
        let message = err.inner().to_string();
        // pbjson reads a number through an untagged enum (a JSON number or a string of one),
        // whose error says neither what was wrong nor with which value.
        if message.contains("untagged enum") {
            let value = pointer(err.path()).and_then(|at| json.pointer(&at));
            return format!(
                "{}: {} is not a valid value: expected a number the field can hold",
                err.path(),
                value.map_or_else(|| "the value".to_string(), Value::to_string)
            );
        }
        // pbjson's message for an enum number it does not know says "expected" twice.
        err.to_string().replace("expected expected ", "expected ")
    })
}

/// The JSON pointer (`/linux/resources/cpu_quota`) of a decoder's error path.
fn pointer(path: &serde_path_to_error::Path) -> Option<String> {
    use serde_path_to_error::Segment;
    let mut pointer = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => pointer += &format!("/{index}"),
            Segment::Map { key } => {
                pointer += "/";
                pointer += &key.replace('~', "~0").replace('/', "~1");
            }
            Segment::Enum { .. } | Segment::Unknown => return None,
        }
    }
    Some(pointer)
}

// ---- pod ----

fn pod_config(json: Value) -> Result<PodSandboxConfig, String> {
    let mut config: PodSandboxConfig = decode(json, POD)?;
    let metadata = config.metadata.as_mut().ok_or("metadata is not set")?;
    if metadata.name.is_empty() || metadata.namespace.is_empty() {
        return Err("metadata.name and metadata.namespace must be set".into());
    }
    if metadata.uid.is_empty() {
        metadata.uid = fresh_uid()?;
    }
    Ok(config)
}

/// A new pod UID, as crictl makes one when the config has none.
fn fresh_uid() -> Result<String, String> {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|uuid| uuid.trim().to_string())
        .map_err(|err| format!("metadata.uid is not set and no UUID could be made: {err}"))
}

// ---- container ----

fn container_config(json: Value) -> Result<ContainerConfig, String> {
    let config: ContainerConfig = decode(json, CONTAINER)?;
    let metadata = config.metadata.as_ref().ok_or("metadata is not set")?;
    if metadata.name.is_empty() {
        return Err("metadata.name is not set".into());
    }
    let image = config.image.as_ref().ok_or("image is not set")?;
    if image.image.is_empty() {
        return Err("image.image is not set".into());
    }
    Ok(config)
}

/// The container's name in a config, for messages.
pub fn container_name(config: &ContainerConfig) -> &str {
    config
        .metadata
        .as_ref()
        .map_or("", |metadata| &metadata.name)
}

/// `namespace/name` of a pod config, for messages.
pub fn pod_name(config: &PodSandboxConfig) -> String {
    config
        .metadata
        .as_ref()
        .map(|metadata| format!("{}/{}", metadata.namespace, metadata.name))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    use cri_api::v1::{MountPropagation, NamespaceMode, Protocol, security_profile};

    fn pod(json: Value) -> Result<PodSandboxConfig, String> {
        pod_config(json)
    }

    fn container(json: Value) -> Result<ContainerConfig, String> {
        container_config(json)
    }

    #[test]
    fn crictl_pod_config_converts_field_by_field() {
        let config = pod(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "u-1", "attempt": 2},
            "hostname": "web-0",
            "log_directory": "/var/log/pods/web",
            "dns_config": {"servers": ["10.0.0.10"], "searches": ["svc.local"], "options": ["ndots:5"]},
            "port_mappings": [{"protocol": 1, "container_port": 53, "host_port": 5353, "host_ip": "127.0.0.1"},
                              {"protocol": "SCTP", "container_port": 9}],
            "labels": {"app": "web"},
            "annotations": {"note": "x"},
            "linux": {
                "cgroup_parent": "/kubepods/pod-u-1",
                "sysctls": {"net.ipv4.ip_forward": "1"},
                "security_context": {"namespace_options": {"network": 2, "pid": "CONTAINER", "ipc": 0}}
            }
        }))
        .unwrap();
        let metadata = config.metadata.as_ref().unwrap();
        assert_eq!(
            (metadata.name.as_str(), metadata.namespace.as_str()),
            ("web", "default")
        );
        assert_eq!((metadata.uid.as_str(), metadata.attempt), ("u-1", 2));
        assert_eq!(config.hostname, "web-0");
        assert_eq!(config.log_directory, "/var/log/pods/web");
        assert_eq!(config.dns_config.as_ref().unwrap().options, ["ndots:5"]);
        assert_eq!(config.port_mappings.len(), 2);
        assert_eq!(config.port_mappings[0].protocol, Protocol::Udp as i32);
        assert_eq!(config.port_mappings[0].host_port, 5353);
        assert_eq!(config.port_mappings[1].protocol, Protocol::Sctp as i32);
        assert_eq!(config.labels["app"], "web");
        assert_eq!(config.annotations["note"], "x");
        let linux = config.linux.as_ref().unwrap();
        assert_eq!(linux.cgroup_parent, "/kubepods/pod-u-1");
        assert_eq!(linux.sysctls["net.ipv4.ip_forward"], "1");
        let ns = linux
            .security_context
            .as_ref()
            .unwrap()
            .namespace_options
            .as_ref()
            .unwrap();
        assert_eq!(ns.network, NamespaceMode::Node as i32);
        assert_eq!(ns.pid, NamespaceMode::Container as i32);
        assert_eq!(ns.ipc, NamespaceMode::Pod as i32);
    }

    #[test]
    fn pod_without_uid_gets_a_fresh_one_and_without_name_is_rejected() {
        let one = pod(serde_json::json!({"metadata": {"name": "a", "namespace": "b"}})).unwrap();
        let two = pod(serde_json::json!({"metadata": {"name": "a", "namespace": "b"}})).unwrap();
        let (one, two) = (&one.metadata.unwrap().uid, &two.metadata.unwrap().uid);
        assert_eq!(one.len(), 36, "{one}");
        assert_ne!(one, two);
        assert!(pod(serde_json::json!({"metadata": {"name": "a"}})).is_err());
        assert!(pod(serde_json::json!({"hostname": "x"})).is_err());
    }

    #[test]
    fn crictl_container_config_converts_field_by_field() {
        let config = container(serde_json::json!({
            "metadata": {"name": "app", "attempt": 1},
            "image": {"image": "127.0.0.1:5000/podsnap/busybox:latest"},
            "command": ["sh", "-c"],
            "args": ["sleep 1000"],
            "working_dir": "/tmp",
            "envs": [{"key": "MODE", "value": "warm"}],
            "mounts": [{"container_path": "/data", "host_path": "/srv/data", "readonly": true, "propagation": 2},
                       {"container_path": "/x", "host_path": "/y", "propagation": "PROPAGATION_HOST_TO_CONTAINER"}],
            "labels": {"tier": "1"},
            "annotations": {"a": "b"},
            "log_path": "app/0.log",
            "tty": true,
            "linux": {
                "resources": {"cpu_quota": 50000, "cpu_period": 100000, "memory_limit_in_bytes": 268435456,
                              "hugepage_limits": [{"page_size": "2MB", "limit": 0}], "unified": {"memory.high": "max"}},
                "security_context": {
                    "capabilities": {"add_capabilities": ["NET_ADMIN"], "drop_capabilities": ["ALL"]},
                    "run_as_user": {"value": 1000},
                    "readonly_rootfs": true,
                    "no_new_privs": true,
                    "namespace_options": {"pid": 1},
                    "seccomp": {"profile_type": "RuntimeDefault"},
                    "masked_paths": ["/proc/kcore"]
                }
            }
        }))
        .unwrap();
        assert_eq!(container_name(&config), "app");
        assert_eq!(config.metadata.as_ref().unwrap().attempt, 1);
        assert_eq!(
            config.image.as_ref().unwrap().image,
            "127.0.0.1:5000/podsnap/busybox:latest"
        );
        assert_eq!(config.command, ["sh", "-c"]);
        assert_eq!(config.args, ["sleep 1000"]);
        assert_eq!(config.working_dir, "/tmp");
        assert_eq!(config.envs[0].key, "MODE");
        assert_eq!(config.envs[0].value, b"warm");
        assert_eq!(
            config.mounts[0].propagation,
            MountPropagation::PropagationBidirectional as i32
        );
        assert!(config.mounts[0].readonly);
        assert_eq!(
            config.mounts[1].propagation,
            MountPropagation::PropagationHostToContainer as i32
        );
        assert_eq!(config.log_path, "app/0.log");
        assert!(config.tty);
        let linux = config.linux.as_ref().unwrap();
        let resources = linux.resources.as_ref().unwrap();
        assert_eq!((resources.cpu_quota, resources.cpu_period), (50000, 100000));
        assert_eq!(resources.memory_limit_in_bytes, 256 << 20);
        assert_eq!(resources.hugepage_limits[0].page_size, "2MB");
        assert_eq!(resources.unified["memory.high"], "max");
        let security = linux.security_context.as_ref().unwrap();
        assert_eq!(
            security.capabilities.as_ref().unwrap().drop_capabilities,
            ["ALL"]
        );
        assert_eq!(security.run_as_user.as_ref().unwrap().value, 1000);
        assert!(security.readonly_rootfs && security.no_new_privs);
        assert_eq!(
            security.namespace_options.as_ref().unwrap().pid,
            NamespaceMode::Container as i32
        );
        assert_eq!(
            security.seccomp.as_ref().unwrap().profile_type,
            security_profile::ProfileType::RuntimeDefault as i32
        );
        assert_eq!(security.masked_paths, ["/proc/kcore"]);
    }

    #[test]
    fn crictl_sample_configs_with_nulls_and_empty_linux_are_accepted() {
        // crictl's documented examples, and Go's habit of writing null for empty fields.
        let sandbox = pod(serde_json::json!({
            "metadata": {"name": "nginx-sandbox", "namespace": "default", "attempt": 1, "uid": "hdishd83djaidwnduwk28bcsb"},
            "log_directory": "/tmp",
            "labels": null,
            "port_mappings": null,
            "linux": {}
        }))
        .unwrap();
        assert!(sandbox.labels.is_empty() && sandbox.port_mappings.is_empty());
        let busybox = container(serde_json::json!({
            "metadata": {"name": "busybox"},
            "image": {"image": "busybox"},
            "command": ["top"],
            "log_path": "busybox.0.log",
            "envs": null,
            "linux": {}
        }))
        .unwrap();
        assert_eq!(busybox.command, ["top"]);
    }

    #[test]
    fn unsupported_fields_and_bad_values_are_errors_that_name_them() {
        let err = container(serde_json::json!({
            "metadata": {"name": "a"}, "image": {"image": "b"},
            "devices": [{"host_path": "/dev/kvm"}]
        }))
        .unwrap_err();
        assert!(err.contains("devices"), "{err}");
        let err = pod(serde_json::json!({
            "metadata": {"name": "a", "namespace": "b"},
            "linux": {"security_context": {"namespace_options": {"network": 7}}}
        }))
        .unwrap_err();
        assert!(
            err.contains("namespace_options.network") && err.contains('7'),
            "{err}"
        );
        let err = pod(serde_json::json!({
            "metadata": {"name": "a", "namespace": "b"},
            "port_mappings": [{"protocol": "QUIC"}]
        }))
        .unwrap_err();
        assert!(err.contains("QUIC"), "{err}");
        assert!(
            container(serde_json::json!({"metadata": {"name": "a"}}))
                .unwrap_err()
                .contains("image")
        );
        assert!(
            container(serde_json::json!({"image": {"image": "b"}}))
                .unwrap_err()
                .contains("metadata")
        );
    }

    #[test]
    fn files_are_read_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("c.json");
        std::fs::write(
            &good,
            r#"{"metadata": {"name": "a"}, "image": {"image": "b"}}"#,
        )
        .unwrap();
        assert_eq!(container_name(&read_container_config(&good).unwrap()), "a");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{ not json").unwrap();
        let err = read_pod_config(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.json"), "{err}");
        let err = read_pod_config(&dir.path().join("absent.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("absent.json"), "{err}");
    }

    #[test]
    fn every_supported_field_is_one_the_generated_decoder_knows() {
        // Each leaf of the subset set to null, decoded as it is: the decoder may refuse the null,
        // but not the field.
        fn leaves(fields: Fields, path: &mut Vec<(&'static str, bool)>, out: &mut Vec<Value>) {
            for (name, field) in fields {
                match field {
                    Leaf | PlainBytes => {
                        let mut json = Value::Null;
                        for &(name, repeated) in path.iter().chain([&(*name, false)]).rev() {
                            let object =
                                Value::Object([(name.to_string(), json)].into_iter().collect());
                            json = if repeated {
                                Value::Array(vec![object])
                            } else {
                                object
                            };
                        }
                        out.push(json);
                    }
                    Message(inner) | Repeated(inner) => {
                        path.push((name, matches!(field, Repeated(_))));
                        leaves(inner, path, out);
                        path.pop();
                    }
                }
            }
        }
        fn check<T: DeserializeOwned + std::fmt::Debug>(fields: Fields) -> usize {
            let mut probes = Vec::new();
            leaves(fields, &mut Vec::new(), &mut probes);
            for probe in &probes {
                if let Err(err) = serde_path_to_error::deserialize::<_, T>(probe) {
                    assert!(!err.to_string().contains("unknown field"), "{probe}: {err}");
                }
            }
            probes.len()
        }
        assert_eq!(check::<PodSandboxConfig>(POD), 41);
        assert_eq!(check::<ContainerConfig>(CONTAINER), 66);
    }

    #[test]
    fn errors_name_the_field_by_its_path() {
        let err = pod(serde_json::json!({
            "metadata": {"name": "a", "namespace": "b"},
            "linux": {"security_context": {"namespace_options": {"userns_options": {"uid_mappings": []}}}}
        }))
        .unwrap_err();
        assert!(
            err.starts_with(
                "linux.security_context.namespace_options.userns_options.uid_mappings: "
            ) && err.contains("mode, uids, gids"),
            "{err}"
        );
        let err = container(serde_json::json!({
            "metadata": {"name": "a"}, "image": {"image": "b"},
            "mounts": [{"container_path": "/a"}, {"container_path": "/b", "image_sub_path": "x"}]
        }))
        .unwrap_err();
        assert!(err.starts_with("mounts[1].image_sub_path: "), "{err}");
        // lowerCamelCase, which the proto3 mapping would take, is not crictl's JSON.
        let err = pod(
            serde_json::json!({"metadata": {"name": "a", "namespace": "b"}, "logDirectory": "/x"}),
        )
        .unwrap_err();
        assert!(err.starts_with("logDirectory: "), "{err}");
        let err =
            pod(serde_json::json!({"metadata": {"name": "a", "namespace": "b", "attempt": -1}}))
                .unwrap_err();
        assert!(
            err.starts_with("metadata.attempt: -1 is not a valid value"),
            "{err}"
        );
        let err = container(serde_json::json!({
            "metadata": {"name": "a"}, "image": {"image": "b"},
            "linux": {"resources": {"cpu_quota": "lots"}}
        }))
        .unwrap_err();
        assert!(
            err.starts_with("linux.resources.cpu_quota: invalid digit"),
            "{err}"
        );
        let err = container(
            serde_json::json!({"metadata": {"name": "a"}, "image": {"image": "b"}, "tty": "yes"}),
        )
        .unwrap_err();
        assert!(err.starts_with("tty: invalid type: string"), "{err}");
        let err = pod(serde_json::json!({"metadata": {"name": "a", "namespace": "b"}, "port_mappings": [{"protocol": 9}]}))
            .unwrap_err();
        assert!(
            err.starts_with(
                "port_mappings[0].protocol: invalid value: integer `9`, expected one of"
            ),
            "{err}"
        );
    }

    #[test]
    fn env_values_are_plain_strings_and_integers_may_be_strings() {
        let config = container(serde_json::json!({
            "metadata": {"name": "a", "attempt": "3"}, "image": {"image": "b"},
            "envs": [{"key": "A", "value": "not base64: x=1 ü"}, {"key": "EMPTY", "value": null}, {"key": "B", "value": ""}],
            "linux": {"resources": {"memory_limit_in_bytes": "268435456"}}
        }))
        .unwrap();
        assert_eq!(config.envs[0].value, "not base64: x=1 ü".as_bytes());
        assert!(config.envs[1].value.is_empty() && config.envs[2].value.is_empty());
        assert_eq!(config.metadata.unwrap().attempt, 3);
        assert_eq!(
            config
                .linux
                .unwrap()
                .resources
                .unwrap()
                .memory_limit_in_bytes,
            256 << 20
        );
        // null stays an error where Go's encoding/json refuses it too: inside lists and maps.
        let err = container(serde_json::json!({
            "metadata": {"name": "a"}, "image": {"image": "b"}, "labels": {"x": null}
        }))
        .unwrap_err();
        assert!(err.starts_with("labels.x: "), "{err}");
    }
}
