//! The `podsnap-ipam` plugin's work, apart from process plumbing: which plugin to delegate to,
//! and what to give it on stdin.
//!
//! Configured as the IPAM plugin of a CNI network (`"ipam": {"type": "podsnap-ipam",
//! "delegate": "host-local", ...host-local's own keys}`), it runs the delegate with the same
//! environment and the same network configuration, with `ipam.type` set to the delegate and
//! `delegate` removed. On `ADD` for a pod with an address grant ([`crate::grant`]) it also sets
//! `runtimeConfig.ips` to the granted addresses (the CNI `ips` capability convention, which
//! host-local honours): the delegate then allocates exactly those, or fails.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use serde_json::{Map, Value, json};

use crate::grant::IpGrant;

/// The plugin's own name (its `ipam.type`).
pub const PLUGIN: &str = "podsnap-ipam";
/// The IPAM plugin delegated to when the configuration names none.
pub const DEFAULT_DELEGATE: &str = "host-local";
/// The CNI version of errors written when the configuration does not say.
const DEFAULT_CNI_VERSION: &str = "1.0.0";

/// CNI's well-known error codes used here.
pub mod code {
    /// Invalid environment variables.
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
}

/// A failure of the plugin itself (not of its delegate), as CNI reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{PLUGIN}: {msg}")]
pub struct PluginError {
    pub code: u32,
    pub msg: String,
}

impl PluginError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
        }
    }

    /// The error as CNI's error result (JSON, written to stdout).
    pub fn to_json(&self, cni_version: &str) -> String {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.to_string(),
        })
        .to_string()
    }
}

/// What to run: the delegate plugin's name and its stdin.
#[derive(Debug, Clone, PartialEq)]
pub struct Delegation {
    pub plugin: String,
    pub stdin: Vec<u8>,
    /// The addresses asked of the delegate, when a grant asked for them.
    pub requested: Vec<IpAddr>,
}

/// The CNI versions the plugin speaks: those of host-local (containernetworking/plugins 1.x),
/// whose results it passes through.
pub const SUPPORTED_VERSIONS: [&str; 7] = [
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

/// The answer to `VERSION`, given without the delegate (a runtime may call VERSION with
/// `CNI_PATH` unset, and with no network configuration).
pub fn version_result(stdin: &[u8]) -> String {
    json!({
        "cniVersion": cni_version(stdin),
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

/// The `cniVersion` of a network configuration, for error results.
pub fn cni_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| DEFAULT_CNI_VERSION.to_string())
}

/// The value of `key` in `CNI_ARGS` (`K=V;K=V`), if present and not empty.
pub fn cni_arg<'a>(cni_args: &'a str, key: &str) -> Option<&'a str> {
    cni_args
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// The pod UID containerd's CRI passes in `CNI_ARGS`.
pub fn pod_uid(cni_args: &str) -> Option<&str> {
    cni_arg(cni_args, "K8S_POD_UID")
}

fn plugin_name_ok(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The delegation for `command` (`CNI_COMMAND`) with network configuration `stdin`; `grant`
/// only counts for `ADD`.
pub fn delegation(
    command: &str,
    stdin: &[u8],
    grant: Option<&IpGrant>,
) -> Result<Delegation, PluginError> {
    let mut config: Map<String, Value> = serde_json::from_slice(stdin).map_err(|e| {
        PluginError::new(
            code::DECODE,
            format!("the network configuration is not a JSON object: {e}"),
        )
    })?;
    let Some(ipam) = config.get_mut("ipam") else {
        return Err(PluginError::new(
            code::INVALID_CONFIG,
            "the network configuration has no \"ipam\" object",
        ));
    };
    let ipam = ipam
        .as_object_mut()
        .ok_or_else(|| PluginError::new(code::INVALID_CONFIG, "\"ipam\" is not a JSON object"))?;
    let plugin = match ipam.remove("delegate") {
        None => DEFAULT_DELEGATE.to_string(),
        Some(Value::String(name)) => name,
        Some(other) => {
            return Err(PluginError::new(
                code::INVALID_CONFIG,
                format!("ipam.delegate must be a plugin name, not {other}"),
            ));
        }
    };
    if !plugin_name_ok(&plugin) || plugin == PLUGIN {
        return Err(PluginError::new(
            code::INVALID_CONFIG,
            format!(
                "ipam.delegate {plugin:?} is not the name of another IPAM plugin (a file in CNI_PATH)"
            ),
        ));
    }
    ipam.insert("type".to_string(), Value::String(plugin.clone()));
    let requested = match grant {
        Some(grant) if command == "ADD" => grant.ips.clone(),
        _ => Vec::new(),
    };
    if !requested.is_empty() {
        let runtime = config
            .entry("runtimeConfig")
            .or_insert_with(|| Value::Object(Map::new()));
        if !runtime.is_object() {
            *runtime = Value::Object(Map::new());
        }
        runtime
            .as_object_mut()
            .expect("made an object above")
            .insert(
                "ips".to_string(),
                Value::Array(
                    requested
                        .iter()
                        .map(|ip| Value::String(ip.to_string()))
                        .collect(),
                ),
            );
    }
    let stdin = serde_json::to_vec(&config).map_err(|e| {
        PluginError::new(
            code::INVALID_CONFIG,
            format!("write the delegate's configuration: {e}"),
        )
    })?;
    Ok(Delegation {
        plugin,
        stdin,
        requested,
    })
}

/// The executable `plugin` in `cni_path` (`CNI_PATH`, directories separated by `:`).
pub fn find_plugin(plugin: &str, cni_path: &str) -> Result<PathBuf, PluginError> {
    cni_path
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| PathBuf::from(dir).join(plugin))
        .find(|path| {
            std::fs::metadata(path)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| {
            PluginError::new(
                code::INVALID_ENVIRONMENT,
                format!("IPAM plugin {plugin:?} is not in CNI_PATH {cni_path:?}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Vec<u8> {
        json!({
            "cniVersion": "1.0.0",
            "name": "podsnap",
            "type": "bridge",
            "bridge": "podsnap0",
            "ipam": {
                "type": "podsnap-ipam",
                "delegate": "host-local",
                "ranges": [[{"subnet": "10.88.0.0/16"}]],
            },
        })
        .to_string()
        .into_bytes()
    }

    fn grant() -> IpGrant {
        IpGrant {
            ips: vec!["10.88.0.9".parse().unwrap()],
        }
    }

    fn parsed(d: &Delegation) -> Value {
        serde_json::from_slice(&d.stdin).unwrap()
    }

    #[test]
    fn without_a_grant_the_delegate_gets_the_same_configuration_under_its_own_type() {
        for command in ["ADD", "DEL", "CHECK", "GC", "STATUS"] {
            let d = delegation(command, &config(), None).unwrap();
            assert_eq!(d.plugin, "host-local");
            let v = parsed(&d);
            assert_eq!(v["ipam"]["type"], "host-local");
            assert!(v["ipam"].get("delegate").is_none());
            assert_eq!(v["ipam"]["ranges"][0][0]["subnet"], "10.88.0.0/16");
            assert!(v.get("runtimeConfig").is_none());
            assert!(d.requested.is_empty());
        }
    }

    #[test]
    fn a_grant_asks_for_its_addresses_on_add_only() {
        let d = delegation("ADD", &config(), Some(&grant())).unwrap();
        assert_eq!(parsed(&d)["runtimeConfig"]["ips"], json!(["10.88.0.9"]));
        assert_eq!(d.requested, grant().ips);
        // DEL releases whatever the container holds: no request.
        let d = delegation("DEL", &config(), Some(&grant())).unwrap();
        assert!(parsed(&d).get("runtimeConfig").is_none());
        // The runtime's own runtimeConfig keys are kept; its ips are replaced by the grant's.
        let mut v: Value = serde_json::from_slice(&config()).unwrap();
        v["runtimeConfig"] = json!({"portMappings": [], "ips": ["10.88.5.5"]});
        let d = delegation("ADD", v.to_string().as_bytes(), Some(&grant())).unwrap();
        let out = parsed(&d);
        assert_eq!(out["runtimeConfig"]["ips"], json!(["10.88.0.9"]));
        assert_eq!(out["runtimeConfig"]["portMappings"], json!([]));
    }

    #[test]
    fn the_delegate_defaults_to_host_local_and_must_be_another_plugin_name() {
        let mut v: Value = serde_json::from_slice(&config()).unwrap();
        v["ipam"].as_object_mut().unwrap().remove("delegate");
        let d = delegation("ADD", v.to_string().as_bytes(), None).unwrap();
        assert_eq!(d.plugin, "host-local");
        for bad in [
            json!("../../bin/sh"),
            json!("podsnap-ipam"),
            json!(""),
            json!(7),
        ] {
            v["ipam"]["delegate"] = bad.clone();
            let err = delegation("ADD", v.to_string().as_bytes(), None).unwrap_err();
            assert_eq!(err.code, code::INVALID_CONFIG, "{bad}");
        }
    }

    #[test]
    fn version_is_answered_without_a_delegate_and_a_configuration_without_ipam_is_refused() {
        let bare = br#"{"cniVersion": "0.4.0"}"#;
        let version: Value = serde_json::from_str(&version_result(bare)).unwrap();
        assert_eq!(version["cniVersion"], "0.4.0");
        assert!(
            version["supportedVersions"]
                .as_array()
                .unwrap()
                .contains(&json!("1.0.0"))
        );
        let err = delegation("ADD", bare, None).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        let err = delegation("ADD", b"not json", None).unwrap_err();
        assert_eq!(err.code, code::DECODE);
        let err_json: Value = serde_json::from_str(&err.to_json("0.4.0")).unwrap();
        assert_eq!(err_json["code"], 6);
        assert_eq!(err_json["cniVersion"], "0.4.0");
        assert!(
            err_json["msg"]
                .as_str()
                .unwrap()
                .starts_with("podsnap-ipam: ")
        );
    }

    #[test]
    fn the_pod_uid_comes_from_cni_args() {
        let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;\
                    K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=5f0e-11";
        assert_eq!(pod_uid(args), Some("5f0e-11"));
        assert_eq!(pod_uid("IgnoreUnknown=1"), None);
        assert_eq!(pod_uid("K8S_POD_UID="), None);
        assert_eq!(cni_version(&config()), "1.0.0");
        assert_eq!(cni_version(b"{}"), "1.0.0");
    }

    #[test]
    fn the_delegate_is_an_executable_file_found_in_cni_path() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("host-local"), "not executable").unwrap();
        std::fs::write(b.join("host-local"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(b.join("host-local"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let path = format!("{}:{}", a.display(), b.display());
        assert_eq!(
            find_plugin("host-local", &path).unwrap(),
            b.join("host-local")
        );
        let err = find_plugin("static", &path).unwrap_err();
        assert_eq!(err.code, code::INVALID_ENVIRONMENT);
        assert!(err.msg.contains("static"), "{err}");
    }
}
