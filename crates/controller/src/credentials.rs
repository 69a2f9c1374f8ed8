//! Registry credentials for the node agents, per PodCheckpoint stored as an image.
//!
//! A PodCheckpoint may name, in `spec.storage.image.secretName`, a Secret of type
//! `kubernetes.io/dockerconfigjson` in its own namespace, as a pod names its `imagePullSecrets`
//! (whoever may create a PodCheckpoint in a namespace may use that namespace's registry Secrets,
//! as whoever may create a pod there may). The node agents read no Secret of any user's
//! namespace: this controller copies the Secret's one entry for the image's registry (and
//! nothing else of it) into an immutable Secret in its own namespace, named by the
//! PodCheckpoint's UID ([`registry_credentials_name`]), which the agents read by name for the
//! push and for every pull of that image.
//!
//! A Secret that gives no credentials (missing, another type, no entry for the registry, an
//! entry that cannot be used) fails a PodCheckpoint still Pending, before anything is
//! checkpointed; one the kubelet already took gets a copy that holds the reason
//! ([`REGISTRY_CREDENTIALS_ERROR`]), with which its agent fails the push rather than pushing
//! anonymously. Copies go when their PodCheckpoint goes ([`remove`] on its deletion,
//! [`collect`] for any left behind).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use podsnap_checkpoint_image::auth;

use crate::api::{
    POD_CHECKPOINT_ANNOTATION, PodCheckpoint, REGISTRY_CREDENTIALS_ERROR, REGISTRY_CREDENTIALS_FOR,
    registry_credentials_name,
};
use crate::{Context, Error};

/// The type of Secret a registry's credentials are kept in.
const DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";
/// Its key.
const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";

/// The registry (`host[:port]`) of a repository the controller checked (`registry/path`).
fn registry_of(repository: &str) -> &str {
    repository.split_once('/').map_or(repository, |(r, _)| r)
}

/// The `.dockerconfigjson` with only `secret`'s entry for `registry`, or why it gives none.
fn entry_for(secret: &Secret, what: &str, registry: &str) -> Result<Vec<u8>, String> {
    let type_ = secret.type_.as_deref().unwrap_or("Opaque");
    if type_ != DOCKER_CONFIG_JSON {
        return Err(format!(
            "{what} is of type {type_}, not {DOCKER_CONFIG_JSON}"
        ));
    }
    let Some(config) = secret
        .data
        .as_ref()
        .and_then(|d| d.get(DOCKER_CONFIG_JSON_KEY))
    else {
        return Err(format!("{what} has no {DOCKER_CONFIG_JSON_KEY}"));
    };
    match auth::credentials(&config.0, registry) {
        Ok(Some(credentials)) => Ok(auth::single_entry(registry, &credentials)),
        Ok(None) => Err(format!("{what} has no credentials for registry {registry}")),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// The copy for the agents of `object` (UID `uid`): `entry`, or no credentials and the reason.
fn copy_of(
    object: &PodCheckpoint,
    uid: &str,
    namespace: &str,
    entry: &Result<Vec<u8>, String>,
) -> Secret {
    let mut annotations = BTreeMap::from([(
        POD_CHECKPOINT_ANNOTATION.to_string(),
        format!(
            "{}/{}",
            object.namespace().unwrap_or_default(),
            object.name_any()
        ),
    )]);
    let config = match entry {
        Ok(config) => config.clone(),
        Err(message) => {
            annotations.insert(REGISTRY_CREDENTIALS_ERROR.to_string(), message.clone());
            br#"{"auths":{}}"#.to_vec()
        }
    };
    Secret {
        metadata: ObjectMeta {
            name: Some(registry_credentials_name(uid)),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (REGISTRY_CREDENTIALS_FOR.to_string(), uid.to_string()),
                (
                    "app.kubernetes.io/part-of".to_string(),
                    "podsnap".to_string(),
                ),
            ])),
            annotations: Some(annotations),
            ..Default::default()
        },
        type_: Some(DOCKER_CONFIG_JSON.to_string()),
        immutable: Some(true),
        data: Some(BTreeMap::from([(
            DOCKER_CONFIG_JSON_KEY.to_string(),
            ByteString(config),
        )])),
        ..Default::default()
    }
}

/// Makes sure the agents have `object`'s registry credentials, when it names a Secret: copies
/// its entry for the image's registry once (a copy that exists is kept). Returns why the Secret
/// gives none, which the copy then says too.
pub async fn ensure(ctx: &Context, object: &PodCheckpoint) -> Result<Option<String>, Error> {
    let (Some(secret_name), Some(repository)) = (
        object.spec.image_secret_name(),
        object.spec.image_repository(),
    ) else {
        return Ok(None);
    };
    let uid = object
        .uid()
        .ok_or_else(|| Error::Other(format!("PodCheckpoint {} has no UID", object.name_any())))?;
    let copies: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.system_namespace);
    if let Some(copy) = copies.get_opt(&registry_credentials_name(&uid)).await? {
        return Ok(copy.annotations().get(REGISTRY_CREDENTIALS_ERROR).cloned());
    }
    let namespace = object.namespace().unwrap_or_else(|| "default".into());
    let what = format!("Secret {namespace}/{secret_name} (spec.storage.image.secretName)");
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let registry = registry_of(repository);
    let entry = match secrets.get_opt(secret_name).await? {
        Some(secret) => entry_for(&secret, &what, registry),
        None => Err(format!("{what} does not exist")),
    };
    let copy = copy_of(object, &uid, &ctx.system_namespace, &entry);
    match copies.create(&PostParams::default(), &copy).await {
        Ok(_) => {
            tracing::info!(checkpoint = %object.name_any(), secret = %secret_name, %registry, ok = entry.is_ok(), "copied the registry credentials for the node agents");
        }
        // Made meanwhile by a reconcile before this one: it read the same Secret.
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(entry.err())
}

/// When `object` names no Secret, the credentials of the pods restoring it: the first entry
/// for the image's registry among their `imagePullSecrets` (`pull_secrets`: each pod's
/// namespace and Secret names, in order) is copied for the agents that pull it, as the kubelet
/// pulls a pod's images with them. Nothing is copied when none has one (the agents use their
/// own), nor when a copy exists.
pub async fn ensure_from_pull_secrets(
    ctx: &Context,
    object: &PodCheckpoint,
    pull_secrets: &[(String, String)],
) -> Result<(), Error> {
    let Some(repository) = object.spec.image_repository() else {
        return Ok(());
    };
    if object.spec.image_secret_name().is_some() || pull_secrets.is_empty() {
        return Ok(());
    }
    let Some(uid) = object.uid() else {
        return Ok(());
    };
    let copies: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.system_namespace);
    if copies
        .get_opt(&registry_credentials_name(&uid))
        .await?
        .is_some()
    {
        return Ok(());
    }
    let registry = registry_of(repository);
    for (namespace, name) in pull_secrets {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
        let what = format!("Secret {namespace}/{name} (imagePullSecrets)");
        let Some(secret) = secrets.get_opt(name).await? else {
            continue;
        };
        match entry_for(&secret, &what, registry) {
            Ok(config) => {
                let copy = copy_of(object, &uid, &ctx.system_namespace, &Ok(config));
                match copies.create(&PostParams::default(), &copy).await {
                    Ok(_) => {
                        tracing::info!(checkpoint = %object.name_any(), secret = %what, %registry, "copied a restored pod's registry credentials for the node agents");
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
                return Ok(());
            }
            Err(why) => tracing::debug!(checkpoint = %object.name_any(), "not used: {why}"),
        }
    }
    Ok(())
}

/// Removes the agents' copy of `object`'s registry credentials, if there is one.
pub async fn remove(ctx: &Context, object: &PodCheckpoint) -> Result<(), Error> {
    let Some(uid) = object
        .uid()
        .filter(|_| object.spec.image_repository().is_some())
    else {
        return Ok(());
    };
    let copies: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.system_namespace);
    crate::delete_ignoring_absent(
        copies
            .delete(&registry_credentials_name(&uid), &DeleteParams::default())
            .await,
    )
}

/// Removes the copies whose PodCheckpoint no longer exists (deleted while this controller was
/// not running, or without a finalizer that brought its deletion here), as `checkpoints` (a
/// synced store of every PodCheckpoint) has them once the copies are listed: a copy made for a
/// PodCheckpoint the store has not seen yet would otherwise go.
pub async fn collect(
    ctx: &Context,
    checkpoints: &kube::runtime::reflector::Store<PodCheckpoint>,
) -> Result<usize, Error> {
    let copies: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.system_namespace);
    let listed = copies
        .list(&ListParams::default().labels(REGISTRY_CREDENTIALS_FOR))
        .await?;
    let existing: std::collections::BTreeSet<String> =
        checkpoints.state().iter().filter_map(|c| c.uid()).collect();
    let mut removed = 0;
    for copy in listed {
        let owner = copy.labels().get(REGISTRY_CREDENTIALS_FOR);
        // Only podsnap's own: its label and its name.
        let ours = owner.is_some_and(|uid| copy.name_any() == registry_credentials_name(uid));
        if ours && owner.is_some_and(|uid| !existing.contains(uid)) {
            match copies
                .delete(&copy.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => removed += 1,
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    use base64::Engine;
    use serde_json::{Value, json};

    use crate::fake_api::{FakeApi, context, path_of};

    fn checkpoint(secret_name: Option<&str>) -> PodCheckpoint {
        let mut image = json!({"repository": "registry.example:5000/team/web"});
        if let Some(name) = secret_name {
            image["secretName"] = json!(name);
        }
        serde_json::from_value(json!({
            "apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodCheckpoint",
            "metadata": {"name": "c", "namespace": "team", "uid": "ckpt-uid"},
            "spec": {"sourcePodName": "web", "storage": {"type": "Image", "image": image}},
        }))
        .unwrap()
    }

    fn secret(type_: &str, config: Value) -> Value {
        let config = base64::engine::general_purpose::STANDARD.encode(config.to_string());
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "regcred", "namespace": "team"},
            "type": type_,
            "data": {".dockerconfigjson": config},
        })
    }

    fn both(user: &str) -> Value {
        json!({"auths": {
            "registry.example:5000": {"username": user, "password": "hunter2"},
            "other.example": {"username": "elsewhere", "password": "not-for-this-registry"},
        }})
    }

    const COPY: &str = "podsnap-registry-ckpt-uid";

    fn copy_path() -> String {
        path_of("v1", "secrets", "podsnap-system", COPY)
    }

    #[tokio::test]
    async fn the_named_secrets_entry_for_the_registry_and_nothing_else_is_copied_once() {
        let fake = FakeApi::default();
        fake.put(
            &path_of("v1", "secrets", "team", "regcred"),
            secret(DOCKER_CONFIG_JSON, both("robot")),
        );
        let ctx = context(&fake);
        assert_eq!(
            ensure(&ctx, &checkpoint(Some("regcred"))).await.unwrap(),
            None
        );
        let copy: Secret = serde_json::from_value(fake.get(&copy_path()).unwrap()).unwrap();
        assert_eq!(copy.type_.as_deref(), Some(DOCKER_CONFIG_JSON));
        assert_eq!(copy.immutable, Some(true));
        assert_eq!(copy.labels()[REGISTRY_CREDENTIALS_FOR], "ckpt-uid");
        let config = &copy.data.as_ref().unwrap()[DOCKER_CONFIG_JSON_KEY].0;
        let robot = auth::credentials(config, "registry.example:5000")
            .unwrap()
            .unwrap();
        assert_eq!(
            (robot.username.as_str(), robot.password.as_str()),
            ("robot", "hunter2")
        );
        assert_eq!(auth::credentials(config, "other.example").unwrap(), None);
        // A second reconcile keeps the copy: the Secret changed since is not read again.
        fake.put(
            &path_of("v1", "secrets", "team", "regcred"),
            secret(DOCKER_CONFIG_JSON, both("changed")),
        );
        assert_eq!(
            ensure(&ctx, &checkpoint(Some("regcred"))).await.unwrap(),
            None
        );
        let again: Secret = serde_json::from_value(fake.get(&copy_path()).unwrap()).unwrap();
        assert_eq!(again.data, copy.data);
    }

    #[tokio::test]
    async fn a_secret_that_gives_no_credentials_is_named_in_the_copy_and_the_answer() {
        let cases = [
            (
                None,
                "Secret team/regcred (spec.storage.image.secretName) does not exist",
            ),
            (
                Some(secret("Opaque", both("robot"))),
                "is of type Opaque, not kubernetes.io/dockerconfigjson",
            ),
            (
                Some(secret(
                    DOCKER_CONFIG_JSON,
                    json!({"auths": {"other.example": {"auth": "dTpw"}}}),
                )),
                "has no credentials for registry registry.example:5000",
            ),
            (
                Some(secret(
                    DOCKER_CONFIG_JSON,
                    json!({"auths": {"registry.example:5000": {"identitytoken": "t"}}}),
                )),
                "identitytoken",
            ),
        ];
        for (stored, expected) in cases {
            let fake = FakeApi::default();
            if let Some(stored) = stored {
                fake.put(&path_of("v1", "secrets", "team", "regcred"), stored);
            }
            let ctx = context(&fake);
            let refused = ensure(&ctx, &checkpoint(Some("regcred")))
                .await
                .unwrap()
                .unwrap_or_default();
            assert!(refused.contains(expected), "{refused}");
            let copy: Secret = serde_json::from_value(fake.get(&copy_path()).unwrap()).unwrap();
            assert_eq!(copy.annotations()[REGISTRY_CREDENTIALS_ERROR], refused);
            let config = &copy.data.as_ref().unwrap()[DOCKER_CONFIG_JSON_KEY].0;
            assert_eq!(
                auth::credentials(config, "registry.example:5000").unwrap(),
                None
            );
        }
    }

    #[tokio::test]
    async fn a_restored_pods_pull_secret_with_an_entry_for_the_registry_is_copied() {
        let fake = FakeApi::default();
        // In the restoring pod's namespace: one for another registry, one for this one.
        let mut other = secret(
            DOCKER_CONFIG_JSON,
            json!({"auths": {"other.example": {"auth": "dTpw"}}}),
        );
        other["metadata"] = json!({"name": "other", "namespace": "elsewhere"});
        fake.put(&path_of("v1", "secrets", "elsewhere", "other"), other);
        let mut this = secret(DOCKER_CONFIG_JSON, both("puller"));
        this["metadata"] = json!({"name": "pull", "namespace": "elsewhere"});
        fake.put(&path_of("v1", "secrets", "elsewhere", "pull"), this);
        let ctx = context(&fake);
        let pull_secrets = [
            ("elsewhere".to_string(), "missing".to_string()),
            ("elsewhere".to_string(), "other".to_string()),
            ("elsewhere".to_string(), "pull".to_string()),
        ];
        // A checkpoint that names its own Secret keeps to it.
        ensure_from_pull_secrets(&ctx, &checkpoint(Some("regcred")), &pull_secrets)
            .await
            .unwrap();
        assert!(fake.get(&copy_path()).is_none());
        ensure_from_pull_secrets(&ctx, &checkpoint(None), &pull_secrets[..2])
            .await
            .unwrap();
        assert!(
            fake.get(&copy_path()).is_none(),
            "no entry for the registry: no copy"
        );
        ensure_from_pull_secrets(&ctx, &checkpoint(None), &pull_secrets)
            .await
            .unwrap();
        let copy: Secret = serde_json::from_value(fake.get(&copy_path()).unwrap()).unwrap();
        let config = &copy.data.as_ref().unwrap()[DOCKER_CONFIG_JSON_KEY].0;
        let puller = auth::credentials(config, "registry.example:5000")
            .unwrap()
            .unwrap();
        assert_eq!(puller.username, "puller");
        assert!(copy.annotations().get(REGISTRY_CREDENTIALS_ERROR).is_none());
    }

    #[tokio::test]
    async fn a_checkpoint_naming_no_secret_gets_no_copy() {
        let fake = FakeApi::default();
        let ctx = context(&fake);
        assert_eq!(ensure(&ctx, &checkpoint(None)).await.unwrap(), None);
        assert!(fake.get(&copy_path()).is_none());
        assert!(fake.seen().is_empty(), "{:?}", fake.seen());
    }

    #[tokio::test]
    async fn copies_whose_checkpoint_is_gone_are_removed_and_no_other() {
        let fake = FakeApi::default();
        let ctx = context(&fake);
        let copy = |uid: &str| {
            serde_json::to_value(copy_of(
                &checkpoint(Some("regcred")),
                uid,
                "podsnap-system",
                &Ok(b"{}".to_vec()),
            ))
            .unwrap()
        };
        fake.put(
            &path_of("v1", "secrets", "podsnap-system", "podsnap-registry-kept"),
            copy("kept"),
        );
        fake.put(
            &path_of("v1", "secrets", "podsnap-system", "podsnap-registry-gone"),
            copy("gone"),
        );
        let mut writer = kube::runtime::reflector::store::Writer::<PodCheckpoint>::default();
        let mut kept = checkpoint(Some("regcred"));
        kept.metadata.uid = Some("kept".into());
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(kept));
        assert_eq!(collect(&ctx, &writer.as_reader()).await.unwrap(), 1);
        assert!(
            fake.get(&path_of(
                "v1",
                "secrets",
                "podsnap-system",
                "podsnap-registry-kept"
            ))
            .is_some()
        );
        assert!(
            fake.get(&path_of(
                "v1",
                "secrets",
                "podsnap-system",
                "podsnap-registry-gone"
            ))
            .is_none()
        );
    }
}
