//! What `containerd-shim-podsnap-v2 -info` reports: the OCI runtime features of the runtime
//! behind the shim (youki's libcontainer), in the runtime-spec `features.json` form containerd
//! reads to decide what it may ask of a runtime handler (recursive read-only mounts, user
//! namespaces with idmapped mounts, ...). Claiming a feature here makes containerd use it, so
//! only what libcontainer implements is listed.

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};

/// The type URL containerd registers for runtime-spec `Features` (JSON-encoded).
const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// Mount options libcontainer understands, recursive (`r*`, via mount_setattr) ones included.
const MOUNT_OPTIONS: &[&str] = &[
    "async",
    "atime",
    "bind",
    "defaults",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "iversion",
    "lazytime",
    "loud",
    "mand",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "noiversion",
    "nolazytime",
    "nomand",
    "norelatime",
    "nostrictatime",
    "nosuid",
    "nosymfollow",
    "private",
    "ratime",
    "rbind",
    "rdev",
    "rdiratime",
    "relatime",
    "remount",
    "rexec",
    "rnoatime",
    "rnodev",
    "rnodiratime",
    "rnoexec",
    "rnorelatime",
    "rnostrictatime",
    "rnosuid",
    "rnosymfollow",
    "ro",
    "rprivate",
    "rrelatime",
    "rro",
    "rrw",
    "rshared",
    "rslave",
    "rstrictatime",
    "rsuid",
    "rsymfollow",
    "runbindable",
    "rw",
    "shared",
    "silent",
    "slave",
    "strictatime",
    "suid",
    "symfollow",
    "sync",
    "unbindable",
    "idmap",
    "ridmap",
];

/// The runtime-spec features document.
pub fn features() -> serde_json::Value {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.1",
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": MOUNT_OPTIONS,
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "time", "user", "uts"],
            "cgroup": {"v1": true, "v2": true, "systemd": false, "systemdUser": false, "rdma": false},
            "seccomp": {"enabled": true},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
            "intelRdt": {"enabled": false},
            "mountExtensions": {"idmap": {"enabled": true}},
        },
        "annotations": {
            "io.podsnap.libcontainer.version": "0.7.0",
            "io.podsnap.checkpoint": "criu",
        },
    })
}

/// The RuntimeInfo answer to `-info`.
pub fn runtime_info(runtime_id: &str) -> RuntimeInfo {
    let mut features_any = Any::new();
    features_any.type_url = FEATURES_TYPE_URL.to_string();
    features_any.value = serde_json::to_vec(&features()).expect("static JSON");
    let mut version = RuntimeVersion::new();
    version.version = env!("CARGO_PKG_VERSION").to_string();
    RuntimeInfo {
        name: runtime_id.to_string(),
        version: Some(version).into(),
        features: Some(features_any).into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_claim_rro_and_user_namespaces_with_idmap() {
        let f = features();
        let options: Vec<&str> = f["mountOptions"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(options.contains(&"rro"));
        assert!(
            f["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n == "user")
        );
        assert_eq!(f["linux"]["mountExtensions"]["idmap"]["enabled"], true);
        let info = runtime_info("io.containerd.podsnap.v2");
        assert_eq!(info.features.type_url, FEATURES_TYPE_URL);
    }
}
