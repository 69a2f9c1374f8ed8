//! Pod and container configs in the JSON that `crictl runp` and `crictl create` take (the CRI
//! messages' Go JSON: snake_case field names, enums as numbers), converted into the CRI types
//! `RestorePod` carries.
//!
//! A subset of fields is supported: the ones a restore needs or may set. A field outside it is
//! an error naming it, not silently dropped. As conveniences beyond crictl, enums may also be
//! written by their proto names (`"NODE"`, `"TCP"`, `"RuntimeDefault"`), and `null` counts as
//! absent everywhere. Like crictl, a pod without a `metadata.uid` gets a fresh one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cri_api::v1::{
    self, Capability, ContainerConfig, ContainerMetadata, DnsConfig, HugepageLimit, ImageSpec,
    Int64Value, KeyValue, LinuxContainerConfig, LinuxContainerResources,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount,
    MountPropagation, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    PortMapping, Protocol, SeLinuxOption, SecurityProfile, security_profile,
};
use serde::{Deserialize, Deserializer};

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
    let json: PodJson = read_json(path)?;
    pod_config(json).map_err(|what| ConfigError::Invalid {
        path: path.to_path_buf(),
        what,
    })
}

/// Reads a container config (`crictl create`'s JSON).
pub fn read_container_config(path: &Path) -> Result<ContainerConfig, ConfigError> {
    let json: ContainerJson = read_json(path)?;
    container_config(json).map_err(|what| ConfigError::Invalid {
        path: path.to_path_buf(),
        what,
    })
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ConfigError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// `null` as the type's default, as Go's encoding/json reads it.
fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// An enum field: its number, or its proto name.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum EnumJson {
    Number(i32),
    Name(String),
}

impl Default for EnumJson {
    fn default() -> Self {
        EnumJson::Number(0)
    }
}

impl EnumJson {
    /// The enum's number, checked to be one that `E` has.
    fn resolve<E: TryFrom<i32> + Into<i32>>(
        &self,
        field: &str,
        from_name: fn(&str) -> Option<E>,
    ) -> Result<i32, String> {
        match self {
            EnumJson::Number(number) => E::try_from(*number)
                .map(Into::into)
                .map_err(|_| format!("{field}: {number} is not a valid value")),
            EnumJson::Name(name) => from_name(name)
                .map(Into::into)
                .ok_or_else(|| format!("{field}: {name:?} is not a valid value")),
        }
    }
}

type Labels = HashMap<String, String>;

// ---- pod ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodJson {
    #[serde(default)]
    metadata: Option<PodMetadataJson>,
    #[serde(default, deserialize_with = "nullable")]
    hostname: String,
    #[serde(default, deserialize_with = "nullable")]
    log_directory: String,
    #[serde(default)]
    dns_config: Option<DnsConfigJson>,
    #[serde(default, deserialize_with = "nullable")]
    port_mappings: Vec<PortMappingJson>,
    #[serde(default, deserialize_with = "nullable")]
    labels: Labels,
    #[serde(default, deserialize_with = "nullable")]
    annotations: Labels,
    #[serde(default)]
    linux: Option<LinuxPodJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodMetadataJson {
    #[serde(default, deserialize_with = "nullable")]
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    uid: String,
    #[serde(default, deserialize_with = "nullable")]
    namespace: String,
    #[serde(default, deserialize_with = "nullable")]
    attempt: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsConfigJson {
    #[serde(default, deserialize_with = "nullable")]
    servers: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    searches: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    options: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortMappingJson {
    #[serde(default, deserialize_with = "nullable")]
    protocol: EnumJson,
    #[serde(default, deserialize_with = "nullable")]
    container_port: i32,
    #[serde(default, deserialize_with = "nullable")]
    host_port: i32,
    #[serde(default, deserialize_with = "nullable")]
    host_ip: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinuxPodJson {
    #[serde(default, deserialize_with = "nullable")]
    cgroup_parent: String,
    #[serde(default)]
    security_context: Option<PodSecurityJson>,
    #[serde(default, deserialize_with = "nullable")]
    sysctls: Labels,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodSecurityJson {
    #[serde(default)]
    namespace_options: Option<NamespaceOptionJson>,
    #[serde(default)]
    selinux_options: Option<SeLinuxJson>,
    #[serde(default)]
    run_as_user: Option<Int64Json>,
    #[serde(default)]
    run_as_group: Option<Int64Json>,
    #[serde(default, deserialize_with = "nullable")]
    readonly_rootfs: bool,
    #[serde(default, deserialize_with = "nullable")]
    supplemental_groups: Vec<i64>,
    #[serde(default, deserialize_with = "nullable")]
    privileged: bool,
    #[serde(default)]
    seccomp: Option<SecurityProfileJson>,
    #[serde(default)]
    apparmor: Option<SecurityProfileJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceOptionJson {
    #[serde(default, deserialize_with = "nullable")]
    network: EnumJson,
    #[serde(default, deserialize_with = "nullable")]
    pid: EnumJson,
    #[serde(default, deserialize_with = "nullable")]
    ipc: EnumJson,
    #[serde(default, deserialize_with = "nullable")]
    target_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeLinuxJson {
    #[serde(default, deserialize_with = "nullable")]
    user: String,
    #[serde(default, deserialize_with = "nullable")]
    role: String,
    #[serde(default, deserialize_with = "nullable", rename = "type")]
    kind: String,
    #[serde(default, deserialize_with = "nullable")]
    level: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Int64Json {
    #[serde(default, deserialize_with = "nullable")]
    value: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecurityProfileJson {
    #[serde(default, deserialize_with = "nullable")]
    profile_type: EnumJson,
    #[serde(default, deserialize_with = "nullable")]
    localhost_ref: String,
}

fn pod_config(json: PodJson) -> Result<PodSandboxConfig, String> {
    let metadata = json.metadata.ok_or("metadata is not set")?;
    if metadata.name.is_empty() || metadata.namespace.is_empty() {
        return Err("metadata.name and metadata.namespace must be set".into());
    }
    let uid = if metadata.uid.is_empty() {
        fresh_uid()?
    } else {
        metadata.uid
    };
    let port_mappings = json
        .port_mappings
        .into_iter()
        .map(|port| {
            Ok(PortMapping {
                protocol: port
                    .protocol
                    .resolve("port_mappings.protocol", Protocol::from_str_name)?,
                container_port: port.container_port,
                host_port: port.host_port,
                host_ip: port.host_ip,
            })
        })
        .collect::<Result<_, String>>()?;
    let linux = json
        .linux
        .map(|linux| -> Result<_, String> {
            Ok(LinuxPodSandboxConfig {
                cgroup_parent: linux.cgroup_parent,
                security_context: linux.security_context.map(pod_security).transpose()?,
                sysctls: linux.sysctls,
                ..Default::default()
            })
        })
        .transpose()?;
    Ok(PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: metadata.name,
            uid,
            namespace: metadata.namespace,
            attempt: metadata.attempt,
        }),
        hostname: json.hostname,
        log_directory: json.log_directory,
        dns_config: json.dns_config.map(|dns| DnsConfig {
            servers: dns.servers,
            searches: dns.searches,
            options: dns.options,
        }),
        port_mappings,
        labels: json.labels,
        annotations: json.annotations,
        linux,
        ..Default::default()
    })
}

fn pod_security(json: PodSecurityJson) -> Result<LinuxSandboxSecurityContext, String> {
    Ok(LinuxSandboxSecurityContext {
        namespace_options: json.namespace_options.map(namespace_options).transpose()?,
        selinux_options: json.selinux_options.map(selinux),
        run_as_user: json.run_as_user.map(|v| Int64Value { value: v.value }),
        run_as_group: json.run_as_group.map(|v| Int64Value { value: v.value }),
        readonly_rootfs: json.readonly_rootfs,
        supplemental_groups: json.supplemental_groups,
        privileged: json.privileged,
        seccomp: json
            .seccomp
            .map(|p| security_profile(p, "seccomp"))
            .transpose()?,
        apparmor: json
            .apparmor
            .map(|p| security_profile(p, "apparmor"))
            .transpose()?,
        ..Default::default()
    })
}

fn namespace_options(json: NamespaceOptionJson) -> Result<NamespaceOption, String> {
    let mode = |value: &EnumJson, field| value.resolve(field, NamespaceMode::from_str_name);
    Ok(NamespaceOption {
        network: mode(&json.network, "namespace_options.network")?,
        pid: mode(&json.pid, "namespace_options.pid")?,
        ipc: mode(&json.ipc, "namespace_options.ipc")?,
        target_id: json.target_id,
        ..Default::default()
    })
}

fn selinux(json: SeLinuxJson) -> SeLinuxOption {
    SeLinuxOption {
        user: json.user,
        role: json.role,
        r#type: json.kind,
        level: json.level,
    }
}

fn security_profile(json: SecurityProfileJson, field: &str) -> Result<SecurityProfile, String> {
    Ok(SecurityProfile {
        profile_type: json.profile_type.resolve(
            &format!("{field}.profile_type"),
            security_profile::ProfileType::from_str_name,
        )?,
        localhost_ref: json.localhost_ref,
    })
}

/// A new pod UID, as crictl makes one when the config has none.
fn fresh_uid() -> Result<String, String> {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|uuid| uuid.trim().to_string())
        .map_err(|err| format!("metadata.uid is not set and no UUID could be made: {err}"))
}

// ---- container ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerJson {
    #[serde(default)]
    metadata: Option<ContainerMetadataJson>,
    #[serde(default)]
    image: Option<ImageJson>,
    #[serde(default, deserialize_with = "nullable")]
    command: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    args: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    working_dir: String,
    #[serde(default, deserialize_with = "nullable")]
    envs: Vec<KeyValueJson>,
    #[serde(default, deserialize_with = "nullable")]
    mounts: Vec<MountJson>,
    #[serde(default, deserialize_with = "nullable")]
    labels: Labels,
    #[serde(default, deserialize_with = "nullable")]
    annotations: Labels,
    #[serde(default, deserialize_with = "nullable")]
    log_path: String,
    #[serde(default, deserialize_with = "nullable")]
    stdin: bool,
    #[serde(default, deserialize_with = "nullable")]
    stdin_once: bool,
    #[serde(default, deserialize_with = "nullable")]
    tty: bool,
    #[serde(default)]
    linux: Option<LinuxContainerJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerMetadataJson {
    #[serde(default, deserialize_with = "nullable")]
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    attempt: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageJson {
    #[serde(default, deserialize_with = "nullable")]
    image: String,
    #[serde(default, deserialize_with = "nullable")]
    annotations: Labels,
    #[serde(default, deserialize_with = "nullable")]
    user_specified_image: String,
    #[serde(default, deserialize_with = "nullable")]
    runtime_handler: String,
    #[serde(default, deserialize_with = "nullable")]
    image_ref: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyValueJson {
    #[serde(default, deserialize_with = "nullable")]
    key: String,
    /// A string, as crictl writes it (the proto field is bytes since cri-api v0.34).
    #[serde(default, deserialize_with = "nullable")]
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MountJson {
    #[serde(default, deserialize_with = "nullable")]
    container_path: String,
    #[serde(default, deserialize_with = "nullable")]
    host_path: String,
    #[serde(default, deserialize_with = "nullable")]
    readonly: bool,
    #[serde(default, deserialize_with = "nullable")]
    selinux_relabel: bool,
    #[serde(default, deserialize_with = "nullable")]
    propagation: EnumJson,
    #[serde(default, deserialize_with = "nullable")]
    recursive_read_only: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinuxContainerJson {
    #[serde(default)]
    resources: Option<ResourcesJson>,
    #[serde(default)]
    security_context: Option<ContainerSecurityJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourcesJson {
    #[serde(default, deserialize_with = "nullable")]
    cpu_period: i64,
    #[serde(default, deserialize_with = "nullable")]
    cpu_quota: i64,
    #[serde(default, deserialize_with = "nullable")]
    cpu_shares: i64,
    #[serde(default, deserialize_with = "nullable")]
    memory_limit_in_bytes: i64,
    #[serde(default, deserialize_with = "nullable")]
    oom_score_adj: i64,
    #[serde(default, deserialize_with = "nullable")]
    cpuset_cpus: String,
    #[serde(default, deserialize_with = "nullable")]
    cpuset_mems: String,
    #[serde(default, deserialize_with = "nullable")]
    hugepage_limits: Vec<HugepageLimitJson>,
    #[serde(default, deserialize_with = "nullable")]
    unified: Labels,
    #[serde(default, deserialize_with = "nullable")]
    memory_swap_limit_in_bytes: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HugepageLimitJson {
    #[serde(default, deserialize_with = "nullable")]
    page_size: String,
    #[serde(default, deserialize_with = "nullable")]
    limit: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerSecurityJson {
    #[serde(default)]
    capabilities: Option<CapabilityJson>,
    #[serde(default, deserialize_with = "nullable")]
    privileged: bool,
    #[serde(default)]
    namespace_options: Option<NamespaceOptionJson>,
    #[serde(default)]
    selinux_options: Option<SeLinuxJson>,
    #[serde(default)]
    run_as_user: Option<Int64Json>,
    #[serde(default)]
    run_as_group: Option<Int64Json>,
    #[serde(default, deserialize_with = "nullable")]
    run_as_username: String,
    #[serde(default, deserialize_with = "nullable")]
    readonly_rootfs: bool,
    #[serde(default, deserialize_with = "nullable")]
    supplemental_groups: Vec<i64>,
    #[serde(default, deserialize_with = "nullable")]
    no_new_privs: bool,
    #[serde(default, deserialize_with = "nullable")]
    masked_paths: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    readonly_paths: Vec<String>,
    #[serde(default)]
    seccomp: Option<SecurityProfileJson>,
    #[serde(default)]
    apparmor: Option<SecurityProfileJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CapabilityJson {
    #[serde(default, deserialize_with = "nullable")]
    add_capabilities: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    drop_capabilities: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    add_ambient_capabilities: Vec<String>,
}

fn container_config(json: ContainerJson) -> Result<ContainerConfig, String> {
    let metadata = json.metadata.ok_or("metadata is not set")?;
    if metadata.name.is_empty() {
        return Err("metadata.name is not set".into());
    }
    let image = json.image.ok_or("image is not set")?;
    if image.image.is_empty() {
        return Err("image.image is not set".into());
    }
    let mounts = json
        .mounts
        .into_iter()
        .map(|mount| {
            Ok(Mount {
                container_path: mount.container_path,
                host_path: mount.host_path,
                readonly: mount.readonly,
                selinux_relabel: mount.selinux_relabel,
                propagation: mount
                    .propagation
                    .resolve("mounts.propagation", MountPropagation::from_str_name)?,
                recursive_read_only: mount.recursive_read_only,
                ..Default::default()
            })
        })
        .collect::<Result<_, String>>()?;
    let linux = json
        .linux
        .map(|linux| -> Result<_, String> {
            Ok(LinuxContainerConfig {
                resources: linux.resources.map(resources),
                security_context: linux.security_context.map(container_security).transpose()?,
            })
        })
        .transpose()?;
    Ok(ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: metadata.name,
            attempt: metadata.attempt,
        }),
        image: Some(ImageSpec {
            image: image.image,
            annotations: image.annotations,
            user_specified_image: image.user_specified_image,
            runtime_handler: image.runtime_handler,
            image_ref: image.image_ref,
        }),
        command: json.command,
        args: json.args,
        working_dir: json.working_dir,
        envs: json
            .envs
            .into_iter()
            .map(|env| KeyValue {
                key: env.key,
                value: env.value.into_bytes(),
            })
            .collect(),
        mounts,
        labels: json.labels,
        annotations: json.annotations,
        log_path: json.log_path,
        stdin: json.stdin,
        stdin_once: json.stdin_once,
        tty: json.tty,
        linux,
        ..Default::default()
    })
}

fn resources(json: ResourcesJson) -> LinuxContainerResources {
    LinuxContainerResources {
        cpu_period: json.cpu_period,
        cpu_quota: json.cpu_quota,
        cpu_shares: json.cpu_shares,
        memory_limit_in_bytes: json.memory_limit_in_bytes,
        oom_score_adj: json.oom_score_adj,
        cpuset_cpus: json.cpuset_cpus,
        cpuset_mems: json.cpuset_mems,
        hugepage_limits: json
            .hugepage_limits
            .into_iter()
            .map(|limit| HugepageLimit {
                page_size: limit.page_size,
                limit: limit.limit,
            })
            .collect(),
        unified: json.unified,
        memory_swap_limit_in_bytes: json.memory_swap_limit_in_bytes,
    }
}

fn container_security(
    json: ContainerSecurityJson,
) -> Result<LinuxContainerSecurityContext, String> {
    Ok(LinuxContainerSecurityContext {
        capabilities: json.capabilities.map(|caps| Capability {
            add_capabilities: caps.add_capabilities,
            drop_capabilities: caps.drop_capabilities,
            add_ambient_capabilities: caps.add_ambient_capabilities,
        }),
        privileged: json.privileged,
        namespace_options: json.namespace_options.map(namespace_options).transpose()?,
        selinux_options: json.selinux_options.map(selinux),
        run_as_user: json.run_as_user.map(|v| Int64Value { value: v.value }),
        run_as_group: json.run_as_group.map(|v| Int64Value { value: v.value }),
        run_as_username: json.run_as_username,
        readonly_rootfs: json.readonly_rootfs,
        supplemental_groups: json.supplemental_groups,
        no_new_privs: json.no_new_privs,
        masked_paths: json.masked_paths,
        readonly_paths: json.readonly_paths,
        seccomp: json
            .seccomp
            .map(|p| security_profile(p, "seccomp"))
            .transpose()?,
        apparmor: json
            .apparmor
            .map(|p| security_profile(p, "apparmor"))
            .transpose()?,
        ..Default::default()
    })
}

/// The container's name in a config, for messages.
pub fn container_name(config: &ContainerConfig) -> &str {
    config
        .metadata
        .as_ref()
        .map_or("", |metadata| &metadata.name)
}

/// `namespace/name` of a pod config, for messages.
pub fn pod_name(config: &v1::PodSandboxConfig) -> String {
    config
        .metadata
        .as_ref()
        .map(|metadata| format!("{}/{}", metadata.namespace, metadata.name))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Result<PodSandboxConfig, String> {
        pod_config(serde_json::from_value(json).map_err(|e| e.to_string())?)
    }

    fn container(json: serde_json::Value) -> Result<ContainerConfig, String> {
        container_config(serde_json::from_value(json).map_err(|e| e.to_string())?)
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
}
