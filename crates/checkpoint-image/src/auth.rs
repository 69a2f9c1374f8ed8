//! Registry credentials from a Kubernetes Secret of type `kubernetes.io/dockerconfigjson`: the
//! Secret a PodCheckpoint names for pushing, and the pod's `imagePullSecrets` for pulling.
//!
//! The `.dockerconfigjson` key holds `{"auths": {"<registry>": {...}}}`, where an entry has
//! `auth` (base64 of `user:password`) or `username` and `password`. Keys are written many ways
//! (`registry.example:5000`, `https://registry.example:5000/v1/`, Docker Hub's legacy
//! `https://index.docker.io/v1/`); [`credentials`] matches them on the host and port alone. An
//! entry with only an `identitytoken` (an OAuth refresh token) is refused rather than ignored,
//! so a push does not silently go out anonymously.

use std::collections::BTreeMap;

use base64::Engine;
use serde::Deserialize;

/// Largest `.dockerconfigjson` accepted (a Secret is at most 1 MiB).
const MAX_CONFIG: usize = 1 << 20;

/// A registry's user name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

// Never print a password, not even in a debug log.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why a `.dockerconfigjson` gave no credentials.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the .dockerconfigjson is larger than {MAX_CONFIG} bytes")]
    TooLarge,
    #[error("the .dockerconfigjson does not parse: {0}")]
    Malformed(String),
    #[error("the .dockerconfigjson entry for {registry} {reason}")]
    BadEntry { registry: String, reason: String },
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Deserialize, Default)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// The host and port a key or reference names: no scheme, no path, Docker Hub's aliases as
/// `docker.io`, lower case.
fn host(key: &str) -> String {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = rest
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

/// The credentials `dockerconfigjson` holds for `registry` (`host[:port]`, as an image
/// reference names it), `None` if it has none for it.
pub fn credentials(
    dockerconfigjson: &[u8],
    registry: &str,
) -> Result<Option<Credentials>, AuthError> {
    if dockerconfigjson.len() > MAX_CONFIG {
        return Err(AuthError::TooLarge);
    }
    // Where, not what: serde's message can quote a value, a password say.
    let config: DockerConfig = serde_json::from_slice(dockerconfigjson).map_err(|e| {
        AuthError::Malformed(format!(
            "{:?} error at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    let wanted = host(registry);
    let Some((key, entry)) = config.auths.iter().find(|(key, _)| host(key) == wanted) else {
        return Ok(None);
    };
    let bad = |reason: &str| AuthError::BadEntry {
        registry: key.clone(),
        reason: reason.to_string(),
    };
    let pair = entry
        .username
        .as_ref()
        .filter(|u| !u.is_empty())
        .zip(entry.password.as_ref());
    if let Some((username, password)) = pair {
        return Ok(Some(Credentials {
            username: username.clone(),
            password: password.clone(),
        }));
    }
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad("has an `auth` that is not base64"))?;
        let decoded =
            String::from_utf8(decoded).map_err(|_| bad("has an `auth` that is not UTF-8"))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| bad("has an `auth` that is not user:password"))?;
        if username.is_empty() {
            return Err(bad("has an `auth` with an empty user name"));
        }
        return Ok(Some(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        }));
    }
    if entry.identitytoken.is_some() {
        return Err(bad(
            "has only an identitytoken (an OAuth refresh token), which podsnap does not support: \
             give a username and password (or an access token as the password)",
        ));
    }
    Err(bad("has neither `auth` nor `username` and `password`"))
}

/// A `.dockerconfigjson` with one entry: `credentials` for `registry` (`host[:port]`), as
/// [`credentials`] reads it back. The copy of a Secret's entry that podsnap's controller gives
/// the node agents holds this and nothing else of the Secret.
pub fn single_entry(registry: &str, credentials: &Credentials) -> Vec<u8> {
    let auth = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", credentials.username, credentials.password));
    serde_json::to_vec(&serde_json::json!({"auths": {host(registry): {"auth": auth}}}))
        .expect("a JSON object of strings serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn a_broken_config_is_refused_without_quoting_it() {
        for broken in [
            r#"{"auths": "hunter2-secret"}"#,
            r#"{"auths": {"r.example": {"password": 12345678}}}"#,
        ] {
            let err = credentials(broken.as_bytes(), "r.example")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("line 1") && !err.contains("hunter2") && !err.contains("12345678"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_single_entry_config_reads_back_for_its_registry_only() {
        let robot = Credentials {
            username: "robot".into(),
            password: "p:ss wörd".into(),
        };
        let config = single_entry("Registry.Example:5000", &robot);
        let text = String::from_utf8_lossy(&config).into_owned();
        assert_eq!(
            credentials(&config, "registry.example:5000").unwrap(),
            Some(robot),
            "{text}"
        );
        assert_eq!(
            credentials(&config, "registry.example").unwrap(),
            None,
            "{text}"
        );
        assert!(!text.contains("p:ss"), "{text}");
    }

    #[test]
    fn auth_and_username_password_entries_are_read_by_host_and_port() {
        let config = format!(
            r#"{{"auths": {{
                "registry.example:5000": {{"auth": "{}"}},
                "https://ghcr.io/v1/": {{"username": "bot", "password": "p:w"}},
                "https://index.docker.io/v1/": {{"auth": "{}"}}
            }}}}"#,
            b64("alice:s3cr:et"),
            b64("hub:pw")
        );
        let get = |registry| credentials(config.as_bytes(), registry).unwrap();
        assert_eq!(
            get("registry.example:5000"),
            Some(Credentials {
                username: "alice".into(),
                password: "s3cr:et".into()
            })
        );
        assert_eq!(get("ghcr.io").unwrap().password, "p:w");
        assert_eq!(get("docker.io").unwrap().username, "hub");
        assert_eq!(get("registry-1.docker.io").unwrap().username, "hub");
        // Another port is another registry.
        assert_eq!(get("registry.example"), None);
        assert_eq!(get("quay.io"), None);
    }

    #[test]
    fn entries_that_give_no_usable_credentials_are_errors_not_anonymous() {
        for (entry, reason) in [
            (r#"{"identitytoken": "t"}"#, "identitytoken"),
            (r#"{"auth": "not base64!"}"#, "not base64"),
            (
                &format!(r#"{{"auth": "{}"}}"#, b64("nocolon")),
                "user:password",
            ),
            (
                &format!(r#"{{"auth": "{}"}}"#, b64(":pw")),
                "empty user name",
            ),
            ("{}", "neither"),
        ] {
            let config = format!(r#"{{"auths": {{"r.example": {entry}}}}}"#);
            let err = credentials(config.as_bytes(), "r.example").unwrap_err();
            assert!(err.to_string().contains(reason), "{entry}: {err}");
        }
        assert!(matches!(
            credentials(br#"{"auths": []}"#, "r"),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            credentials(&vec![b' '; MAX_CONFIG + 1], "r"),
            Err(AuthError::TooLarge)
        ));
    }

    #[test]
    fn a_password_is_never_printed() {
        let c = Credentials {
            username: "alice".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
