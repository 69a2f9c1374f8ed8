//! The CustomResourceDefinitions of `PodCheckpoint` and `PodRestore`, generated from the Rust
//! types (`#[derive(CustomResource, KubeSchema)]` and their `#[kube]`, `#[x_kube]` and
//! `#[schemars]` attributes), and their YAML as `deploy/crds/` holds it.
//!
//! `cargo run -p podsnap-checkpoint-api --bin crdgen` rewrites `deploy/crds/`;
//! the unit test `deploy_crds_are_the_generated_ones` fails while they differ.
//!
//! One change is made to what kube generates: optional fields are not `nullable` (nor is `null`
//! one of an optional enum's values). These types
//! leave an unset field out (`skip_serializing_if`), never write `null`, and the API server then
//! prunes a `null` someone else sends (defaulting the field where it has a default) instead of
//! storing it, as the hand-written CRDs had it.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

use crate::{PodCheckpoint, PodMigration, PodRestore};

/// What a CRD's file in `deploy/crds/` starts with, after the "generated" line.
const HEADERS: [(&str, &str); 3] = [
    (
        "podcheckpoints.yaml",
        "# PodCheckpoint (KEP-5823): a checkpoint of one running pod, taken by podsnap-controller through\n\
         # the kubelet's pod checkpoint API (kubelet-patches/) on the pod's node.\n",
    ),
    (
        "podrestores.yaml",
        "# PodRestore (KEP-5823): one or more pods restored from a Ready PodCheckpoint, on the checkpoint's\n\
         # node, by podsnap-controller (the kubelet restores them: checkpoint.k8s.io/restore-from).\n",
    ),
    (
        "podmigrations.yaml",
        "# PodMigration (podsnap's, beside KEP-5823's kinds): one running pod moved to another node\n\
         # through a checkpoint image by podsnap-controller (PodCheckpoint, PodRestore, source deleted).\n",
    ),
];

/// The CRDs, each with the name of its file in `deploy/crds/`.
pub fn crds() -> [(&'static str, CustomResourceDefinition); 3] {
    let [(checkpoints, _), (restores, _), (migrations, _)] = HEADERS;
    [
        (checkpoints, not_nullable(PodCheckpoint::crd())),
        (restores, not_nullable(PodRestore::crd())),
        (migrations, not_nullable(PodMigration::crd())),
    ]
}

/// Each CRD's file in `deploy/crds/`: name and YAML.
pub fn crd_files() -> Result<Vec<(&'static str, String)>, String> {
    crds()
        .into_iter()
        .zip(HEADERS)
        .map(|((file, crd), (_, header))| {
            let yaml = serde_saphyr::to_string(&crd)
                .map_err(|e| format!("{file}: serialise the CRD as YAML: {e}"))?;
            let newline = if yaml.ends_with('\n') { "" } else { "\n" };
            Ok((
                file,
                format!(
                    "# Generated from crates/checkpoint-api (cargo run -p podsnap-checkpoint-api --bin crdgen): do not edit.\n{header}{yaml}{newline}"
                ),
            ))
        })
        .collect()
}

fn not_nullable(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            strip_nullable(schema);
        }
    }
    crd
}

fn strip_nullable(schema: &mut JSONSchemaProps) {
    if schema.nullable.take().is_some()
        && let Some(values) = &mut schema.enum_
    {
        values.retain(|v| !v.0.is_null());
    }
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        strip_nullable(child);
    }
    match &mut schema.items {
        Some(JSONSchemaPropsOrArray::Schema(item)) => strip_nullable(item),
        Some(JSONSchemaPropsOrArray::Schemas(items)) => items.iter_mut().for_each(strip_nullable),
        None => {}
    }
    if let Some(JSONSchemaPropsOrBool::Schema(extra)) = &mut schema.additional_properties {
        strip_nullable(extra);
    }
    for list in [&mut schema.all_of, &mut schema.any_of, &mut schema.one_of] {
        list.iter_mut().flatten().for_each(strip_nullable);
    }
}

/// The schema of a field that holds any object, kept as it is (a pod spec).
pub fn preserved_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// The schema of `status.checkpointLocation`: KEP-5823's `CheckpointSource` (see
/// [`crate::CheckpointLocation`]).
pub fn checkpoint_location(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Where the checkpoint's data is on status.nodeName (KEP-5823's CheckpointSource).",
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {
                "description": "NodeLocal: kept in the kubelet's checkpoint root on its node.",
                "type": "string",
                "enum": ["NodeLocal"],
            },
            "nodeLocal": {
                "type": "object",
                "required": ["path"],
                "properties": {
                    "path": {
                        "description": "The checkpoint directory, relative to the kubelet's checkpoint root (<root-dir>/pod-checkpoints).",
                        "type": "string",
                        "maxLength": 253,
                    },
                },
            },
        },
        "x-kubernetes-validations": [{
            "rule": "self.type != 'NodeLocal' || has(self.nodeLocal)",
            "message": "a NodeLocal location has nodeLocal.path",
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `deploy/crds/`: this crate's directory is crates/checkpoint-api.
    fn deploy_crds() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds")
    }

    #[test]
    fn deploy_crds_are_the_generated_ones() {
        for (file, yaml) in crd_files().unwrap() {
            let path = deploy_crds().join(file);
            let found = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            assert!(
                found == yaml,
                "{} is not what the types in crates/checkpoint-api generate: run \
                 `cargo run -p podsnap-checkpoint-api --bin crdgen`\n--- generated:\n{yaml}",
                path.display()
            );
        }
    }
}
