//! An in-process stand-in for the API server, for the reconcilers' tests: a [`kube::Client`] whose
//! requests go to a map of objects by path instead of a cluster. It keeps every request it was
//! sent, in order, so a test can check what a reconcile did and in which order.
//!
//! It knows just enough of the API: GET of an object (404 `NotFound` when absent) or of a
//! namespaced collection (a list), POST to a collection (409 `AlreadyExists` when the name is
//! taken; a UID and resourceVersion are assigned), PATCH as a JSON merge patch (of the object, or
//! of its status through `/status`; a `metadata.resourceVersion` in the patch is a precondition,
//! 409 `Conflict` when the object has moved on), DELETE of an object (404 when absent; a list's
//! label selector is not applied). Events sent are accepted and kept only as
//! requests; events listed are those a test put. Anything else (a node proxy, say) is 405.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};

/// One request the fake was sent.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    pub body: Value,
}

impl Seen {
    /// `"METHOD path"`, for assertions on the order of requests.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    seen: Vec<Seen>,
    next_version: u64,
}

/// The fake API server. Cheap to clone: clones share their state.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

/// The path of a namespaced object: `/api/v1/namespaces/{ns}/{plural}/{name}` for the core group,
/// `/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}` for others.
pub fn path_of(api_version: &str, plural: &str, namespace: &str, name: &str) -> String {
    let prefix = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    format!("{prefix}/namespaces/{namespace}/{plural}/{name}")
}

impl FakeApi {
    /// A client whose requests this fake answers.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    /// Stores `object` at `path`.
    pub fn put(&self, path: &str, object: Value) {
        self.state
            .lock()
            .unwrap()
            .objects
            .insert(path.to_string(), object);
    }

    /// Removes the object at `path`.
    pub fn remove(&self, path: &str) {
        self.state.lock().unwrap().objects.remove(path);
    }

    /// The object at `path`, if any.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    fn answer(&self, seen: Seen) -> (u16, Value) {
        let mut state = self.state.lock().unwrap();
        state.seen.push(seen.clone());
        if seen.path.contains("/events") && seen.method != "GET" {
            return (201, seen.body);
        }
        // After `namespaces/{ns}/`: {plural} (a collection), {plural}/{name} (an object),
        // {plural}/{name}/{subresource}.
        let Some((_, rest)) = seen.path.split_once("/namespaces/") else {
            return status(404, "NotFound", &format!("{} is not namespaced", seen.path));
        };
        let depth = rest.split('/').count() - 1;
        match (&*seen.method, depth) {
            ("GET", 1) => {
                let prefix = format!("{}/", seen.path);
                let items: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|(path, _)| {
                        path.strip_prefix(&prefix)
                            .is_some_and(|name| !name.contains('/'))
                    })
                    .map(|(_, object)| object.clone())
                    .collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}),
                )
            }
            ("GET", 2) => match state.objects.get(&seen.path) {
                Some(object) => (200, object.clone()),
                None => status(404, "NotFound", &format!("{} not found", seen.path)),
            },
            ("POST", 1) => {
                let name = seen.body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let path = format!("{}/{name}", seen.path);
                if state.objects.contains_key(&path) {
                    return status(409, "AlreadyExists", &format!("{name} already exists"));
                }
                state.next_version += 1;
                let mut object = seen.body.clone();
                object["metadata"]["uid"] = json!(format!("uid-of-{name}"));
                object["metadata"]["resourceVersion"] = json!(state.next_version.to_string());
                state.objects.insert(path, object.clone());
                (201, object)
            }
            ("PATCH", 2 | 3) => {
                let path = seen.path.trim_end_matches("/status").to_string();
                let Some(object) = state.objects.get_mut(&path) else {
                    return status(404, "NotFound", &format!("{path} not found"));
                };
                let mut patch = seen.body.clone();
                if let Some(meta) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                    // The compare-and-swap the finalizer patches carry.
                    if let Some(expected) = meta.remove("resourceVersion")
                        && expected != object["metadata"]["resourceVersion"]
                    {
                        return status(409, "Conflict", "the object has been modified");
                    }
                }
                merge(object, &patch);
                state.next_version += 1;
                let version = state.next_version.to_string();
                let object = state.objects.get_mut(&path).unwrap();
                object["metadata"]["resourceVersion"] = json!(version);
                (200, object.clone())
            }
            ("DELETE", 2) => match state.objects.remove(&seen.path) {
                Some(object) => (200, object),
                None => status(404, "NotFound", &format!("{} not found", seen.path)),
            },
            _ => status(405, "MethodNotAllowed", &seen.line()),
        }
    }
}

/// An API `Status` answer.
fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
               "code": code, "reason": reason, "message": message}),
    )
}

/// A JSON merge patch (RFC 7386) of `target` with `patch`.
pub fn merge(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let object = target.as_object_mut().unwrap();
    for (key, value) in fields {
        if value.is_null() {
            object.remove(key);
        } else {
            merge(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

impl tower::Service<Request<kube::client::Body>> for FakeApi {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<kube::client::Body>) -> Self::Future {
        let fake = self.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let seen = Seen {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let (code, answer) = fake.answer(seen);
            Ok(Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(answer.to_string())))
                .expect("a valid response"))
        })
    }
}

/// A reconcile context whose client talks to `fake`.
pub fn context(fake: &FakeApi) -> std::sync::Arc<crate::Context> {
    std::sync::Arc::new(crate::Context {
        client: fake.client(),
        reporter: kube::runtime::events::Reporter {
            controller: "podsnap-controller".into(),
            instance: None,
        },
        keep_last: 0,
        system_namespace: "podsnap-system".into(),
        metrics: Default::default(),
        checkpoints: kube::runtime::reflector::store::Writer::default().as_reader(),
        restores: kube::runtime::reflector::store::Writer::default().as_reader(),
    })
}
