//! The per-container files of a pod checkpoint that other tools read: `config.dump` and
//! `spec.dump`, in the layout CRI-O, containerd and `checkpointctl` share (checkpointctl's
//! `show` and `inspect` print them), plus the timestamps they hold.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// `config.dump`: which container this was, from which image, on which runtime.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDump {
    pub id: String,
    pub name: String,
    pub rootfs_image: String,
    pub rootfs_image_ref: String,
    pub rootfs_image_name: String,
    pub runtime: String,
    /// RFC 3339, UTC.
    pub created_time: String,
    /// RFC 3339, UTC.
    pub checkpointed_time: String,
}

/// `config.dump`'s file name.
pub const CONFIG_DUMP: &str = "config.dump";
/// `spec.dump`'s file name: the container's OCI spec.
pub const SPEC_DUMP: &str = "spec.dump";

/// Writes `config.dump` and `spec.dump` (new root-only files, synced) into a container's
/// directory.
pub fn write(dir: &Path, config: &ConfigDump, spec: &serde_json::Value) -> std::io::Result<()> {
    let write = |name: &str, data: Vec<u8>| -> std::io::Result<()> {
        let mut file = crate::private_file(&dir.join(name))?;
        file.write_all(&data)?;
        file.sync_all()
    };
    write(
        CONFIG_DUMP,
        serde_json::to_vec_pretty(config).map_err(std::io::Error::other)?,
    )?;
    write(
        SPEC_DUMP,
        serde_json::to_vec_pretty(spec).map_err(std::io::Error::other)?,
    )
}

/// `secs` seconds after the Unix epoch as RFC 3339 in UTC (`2026-12-02T07:51:55Z`).
pub fn rfc3339(secs: i64) -> String {
    // Civil-from-days (Howard Hinnant), to avoid a date crate for one timestamp.
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Now, as [`rfc3339`].
pub fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_198_162), "2026-12-02T07:56:02Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        let now = rfc3339_now();
        assert_eq!(now.len(), 20, "{now}");
    }

    #[test]
    fn config_dump_has_checkpointctl_s_field_names_and_the_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let config = ConfigDump {
            id: "abc".into(),
            name: "counter".into(),
            rootfs_image: "sha256:1".into(),
            rootfs_image_ref: "sha256:1".into(),
            rootfs_image_name: "busybox:1".into(),
            runtime: "podsnap".into(),
            created_time: rfc3339(0),
            checkpointed_time: rfc3339(60),
        };
        write(
            dir.path(),
            &config,
            &serde_json::json!({"ociVersion": "1.2.0"}),
        )
        .unwrap();
        let read: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(CONFIG_DUMP)).unwrap()).unwrap();
        for key in [
            "id",
            "name",
            "rootfsImage",
            "rootfsImageRef",
            "rootfsImageName",
            "runtime",
            "createdTime",
            "checkpointedTime",
        ] {
            assert!(read.get(key).is_some(), "{key} missing: {read}");
        }
        use std::os::unix::fs::PermissionsExt;
        for name in [CONFIG_DUMP, SPEC_DUMP] {
            let mode = std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Never overwritten: a second write fails.
        assert!(write(dir.path(), &config, &serde_json::Value::Null).is_err());
    }
}
