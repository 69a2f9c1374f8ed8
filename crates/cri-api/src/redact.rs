//! `Debug` for the CRI messages that carry secrets. `api.proto` marks their fields
//! `debug_redact`, which prost does not implement: `gen.sh` generates them without `Debug`
//! (`skip_debug`) and this module writes it, printing which secrets are set but never their value.

use std::fmt;

use crate::v1::AuthConfig;

/// What `Debug` prints instead of a secret that is set.
const REDACTED: &str = "<redacted>";

fn secret(value: &str) -> &'static str {
    if value.is_empty() { "" } else { REDACTED }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("username", &self.username)
            .field("password", &secret(&self.password))
            .field("auth", &secret(&self.auth))
            .field("server_address", &self.server_address)
            .field("identity_token", &secret(&self.identity_token))
            .field("registry_token", &secret(&self.registry_token))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_config_debug_hides_every_secret() {
        let auth = AuthConfig {
            username: "alice".into(),
            password: "hunter2".into(),
            auth: "YWxpY2U6aHVudGVyMg==".into(),
            server_address: "registry.example".into(),
            identity_token: "id-token".into(),
            registry_token: "reg-token".into(),
        };
        let printed = format!("{auth:?}");
        for secret in ["hunter2", "YWxpY2U6aHVudGVyMg==", "id-token", "reg-token"] {
            assert!(!printed.contains(secret), "{secret} leaked: {printed}");
        }
        assert!(
            printed.contains("alice") && printed.contains("registry.example"),
            "{printed}"
        );
        assert!(printed.contains(REDACTED), "{printed}");
    }
}
