//! The `podsnap.io/...` options of CheckpointPod and RestorePod. Any other key, and any value
//! that is not one of the documented ones, is refused with InvalidArgument (the CRI contract:
//! unsupported options are rejected, never silently ignored).

use std::collections::HashMap;

use tonic::Status;

/// Keep the pod running after the checkpoint (`true`, default) or stop it (`false`).
pub const LEAVE_RUNNING: &str = "podsnap.io/leave-running";
/// Checkpoint established TCP connections (`true`/`false`, default `false`).
pub const TCP_ESTABLISHED: &str = "podsnap.io/tcp-established";
/// Compress the memory pages: `none` (default) or `zstd`.
pub const COMPRESSION: &str = "podsnap.io/compression";

/// Page compression of a pod checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
        }
    }
}

/// The options of a CheckpointPod call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointOptions {
    pub leave_running: bool,
    pub tcp_established: bool,
    pub compression: Compression,
}

fn boolean(key: &str, value: &str) -> Result<bool, Status> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(Status::invalid_argument(format!(
            "option {key}={other:?}: expected true or false"
        ))),
    }
}

impl CheckpointOptions {
    pub fn parse(options: &HashMap<String, String>) -> Result<Self, Status> {
        let mut parsed = CheckpointOptions {
            leave_running: true,
            tcp_established: false,
            compression: Compression::None,
        };
        let mut keys: Vec<_> = options.keys().collect();
        keys.sort();
        for key in keys {
            let value = options[key].as_str();
            match key.as_str() {
                LEAVE_RUNNING => parsed.leave_running = boolean(key, value)?,
                TCP_ESTABLISHED => parsed.tcp_established = boolean(key, value)?,
                COMPRESSION => {
                    parsed.compression = match value {
                        "none" => Compression::None,
                        "zstd" => Compression::Zstd,
                        other => {
                            return Err(Status::invalid_argument(format!(
                                "option {key}={other:?}: expected none or zstd"
                            )));
                        }
                    }
                }
                other => {
                    return Err(Status::invalid_argument(format!(
                        "unknown checkpoint option {other:?} (known: {LEAVE_RUNNING}, {TCP_ESTABLISHED}, {COMPRESSION})"
                    )));
                }
            }
        }
        Ok(parsed)
    }

    /// The options as the manifest records them.
    pub fn to_map(&self) -> std::collections::BTreeMap<String, String> {
        [
            (LEAVE_RUNNING, self.leave_running.to_string()),
            (TCP_ESTABLISHED, self.tcp_established.to_string()),
            (COMPRESSION, self.compression.as_str().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// Restore lazily (`true`) or not (`false`, default): the containers run while their memory
/// streams in. A RestorePod option, or an annotation of the pod (the kubelet sends no options).
pub const LAZY_RESTORE: &str = podsnap_checkpoint_format::grant::LAZY_RESTORE_ANNOTATION;

/// Give the restored pod the addresses the checkpointed pod had (`true`) or whatever the
/// network hands out (`false`, default): for a pod suspended and resumed on the same node. A
/// RestorePod option, or an annotation of the pod. Needs `podsnap-ipam` as the network's IPAM
/// plugin (`podsnap_cni`); an address that is taken fails the restore.
pub const KEEP_IP: &str = "podsnap.io/keep-ip";

/// The options of a RestorePod call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    pub lazy: bool,
    pub keep_ip: bool,
}

impl RestoreOptions {
    /// The call's options; a pod annotation ([`LAZY_RESTORE`], [`KEEP_IP`]) counts when the
    /// options do not say. An unknown key or a bad value is refused.
    pub fn parse(
        options: &HashMap<String, String>,
        pod_annotations: &HashMap<String, String>,
    ) -> Result<Self, Status> {
        let mut parsed = RestoreOptions::default();
        if let Some(value) = pod_annotations.get(LAZY_RESTORE) {
            parsed.lazy = boolean(&format!("pod annotation {LAZY_RESTORE}"), value)?;
        }
        if let Some(value) = pod_annotations.get(KEEP_IP) {
            parsed.keep_ip = boolean(&format!("pod annotation {KEEP_IP}"), value)?;
        }
        let mut keys: Vec<_> = options.keys().collect();
        keys.sort();
        for key in keys {
            let value = options[key].as_str();
            match key.as_str() {
                LAZY_RESTORE => parsed.lazy = boolean(key, value)?,
                KEEP_IP => parsed.keep_ip = boolean(key, value)?,
                other => {
                    return Err(Status::invalid_argument(format!(
                        "unknown restore option {other:?} (known: {LAZY_RESTORE}, {KEEP_IP})"
                    )));
                }
            }
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_leave_the_pod_running_uncompressed() {
        let o = CheckpointOptions::parse(&HashMap::new()).unwrap();
        assert!(o.leave_running && !o.tcp_established);
        assert_eq!(o.compression, Compression::None);
    }

    #[test]
    fn known_keys_are_parsed() {
        let o = CheckpointOptions::parse(&map(&[
            (LEAVE_RUNNING, "false"),
            (TCP_ESTABLISHED, "true"),
            (COMPRESSION, "zstd"),
        ]))
        .unwrap();
        assert!(!o.leave_running && o.tcp_established);
        assert_eq!(o.compression, Compression::Zstd);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_invalid_arguments_naming_them() {
        let err = CheckpointOptions::parse(&map(&[("podsnap.io/turbo", "on")])).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("podsnap.io/turbo"),
            "{}",
            err.message()
        );
        let err = CheckpointOptions::parse(&map(&[(COMPRESSION, "lz4")])).unwrap_err();
        assert!(err.message().contains("lz4"), "{}", err.message());
        let err = CheckpointOptions::parse(&map(&[(LEAVE_RUNNING, "yes")])).unwrap_err();
        assert!(err.message().contains("yes"), "{}", err.message());
    }

    #[test]
    fn restore_options_come_from_the_call_or_else_the_pod_annotation() {
        let none = HashMap::new();
        assert!(!RestoreOptions::parse(&none, &none).unwrap().lazy);
        assert!(
            RestoreOptions::parse(&map(&[(LAZY_RESTORE, "true")]), &none)
                .unwrap()
                .lazy
        );
        assert!(
            RestoreOptions::parse(&none, &map(&[(LAZY_RESTORE, "true")]))
                .unwrap()
                .lazy
        );
        // The call's option wins over the annotation.
        assert!(
            !RestoreOptions::parse(
                &map(&[(LAZY_RESTORE, "false")]),
                &map(&[(LAZY_RESTORE, "true")])
            )
            .unwrap()
            .lazy
        );
        let err = RestoreOptions::parse(&map(&[("x", "y")]), &none).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(LAZY_RESTORE), "{}", err.message());
        let keep = RestoreOptions::parse(&none, &map(&[(KEEP_IP, "true")])).unwrap();
        assert!(keep.keep_ip && !keep.lazy);
        assert!(
            !RestoreOptions::parse(&map(&[(KEEP_IP, "false")]), &map(&[(KEEP_IP, "true")]))
                .unwrap()
                .keep_ip
        );
        let err = RestoreOptions::parse(&none, &map(&[(KEEP_IP, "1")])).unwrap_err();
        assert!(err.message().contains(KEEP_IP), "{}", err.message());
        let err = RestoreOptions::parse(&none, &map(&[(LAZY_RESTORE, "yes")])).unwrap_err();
        assert!(
            err.message().contains("pod annotation") && err.message().contains("yes"),
            "{}",
            err.message()
        );
    }
}
