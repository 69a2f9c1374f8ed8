//! An in-process stand-in for the API server, for the tests of the CLI's waits: a
//! [`kube::Client`] whose requests it answers for one object, as podsnap-controller's fake API
//! does for its reconcilers (there a map of objects; here one object and scripted watches).
//!
//! It knows a GET of the object (404 `NotFound` when it is gone), a LIST of its collection (the
//! object, if any, as the only item) and a WATCH of the collection: each WATCH sends the next
//! scripted batch of events and then stays open, sending nothing more (one with no batch left
//! only stays open). The object is what the events sent so far made it, so a LIST or GET after a
//! WATCH sees it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::StreamBody;
use http_body_util::combinators::UnsyncBoxBody;
use serde_json::{Value, json};

/// The body of an answer: whole, or a watch's events and then nothing, open.
type Body = UnsyncBoxBody<Bytes, Infallible>;

struct State {
    /// The object's path, `/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}`.
    path: String,
    object: Option<Value>,
    /// The events each WATCH sends, in order.
    watches: VecDeque<Vec<Value>>,
    /// `"METHOD path?query"` of each request, in order.
    seen: Vec<String>,
}

/// The fake API server. Cheap to clone: clones share their state.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

impl FakeApi {
    /// A fake that serves `object` (its `metadata.namespace` and `metadata.name` place it under
    /// `/apis/{api_version}/namespaces/{ns}/{plural}`) until the scripted events change it.
    pub fn new(plural: &str, object: Value) -> Self {
        let path = format!(
            "/apis/{}/namespaces/{}/{plural}/{}",
            object["apiVersion"].as_str().unwrap(),
            object["metadata"]["namespace"].as_str().unwrap(),
            object["metadata"]["name"].as_str().unwrap(),
        );
        FakeApi {
            state: Arc::new(Mutex::new(State {
                path,
                object: Some(object),
                watches: VecDeque::new(),
                seen: Vec::new(),
            })),
        }
    }

    /// The next WATCH sends these events (`{"type": ..., "object": ...}`).
    pub fn then_watch(&self, events: Vec<Value>) -> &Self {
        self.state.lock().unwrap().watches.push_back(events);
        self
    }

    /// A client whose requests this fake answers.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    /// Every request so far, in order: `"METHOD path?query"`.
    pub fn seen(&self) -> Vec<String> {
        self.state.lock().unwrap().seen.clone()
    }

    fn answer(&self, method: &str, path: &str, query: &str) -> (u16, Body) {
        let mut state = self.state.lock().unwrap();
        state.seen.push(format!("{method} {path}?{query}"));
        let collection = state.path.rsplit_once('/').unwrap().0.to_string();
        match method {
            "GET" if path == state.path => match &state.object {
                Some(object) => (200, whole(object)),
                None => status(404, "NotFound", &format!("{path} not found")),
            },
            "GET" if path == collection && query.split('&').any(|q| q == "watch=true") => {
                let events = state.watches.pop_front().unwrap_or_default();
                for event in &events {
                    state.object = match event["type"].as_str() {
                        Some("ADDED" | "MODIFIED") => Some(event["object"].clone()),
                        Some("DELETED") => None,
                        _ => state.object.take(),
                    };
                }
                let lines = events
                    .into_iter()
                    .map(|event| Ok(Frame::data(Bytes::from(format!("{event}\n")))));
                let open: BoxStream<'static, _> =
                    stream::iter(lines).chain(stream::pending()).boxed();
                (200, UnsyncBoxBody::new(StreamBody::new(open)))
            }
            "GET" if path == collection => {
                let items: Vec<Value> = state.object.iter().cloned().collect();
                (
                    200,
                    whole(&json!({"apiVersion": "v1", "kind": "List",
                                  "metadata": {"resourceVersion": "1"}, "items": items})),
                )
            }
            _ => status(405, "MethodNotAllowed", &format!("{method} {path}")),
        }
    }
}

fn whole(value: &Value) -> Body {
    UnsyncBoxBody::new(http_body_util::Full::new(Bytes::from(value.to_string())))
}

/// An API `Status` answer.
fn status(code: u16, reason: &str, message: &str) -> (u16, Body) {
    (
        code,
        whole(
            &json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                      "code": code, "reason": reason, "message": message}),
        ),
    )
}

impl tower::Service<Request<kube::client::Body>> for FakeApi {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<kube::client::Body>) -> Self::Future {
        let (code, body) = self.answer(
            request.method().as_str(),
            request.uri().path(),
            request.uri().query().unwrap_or_default(),
        );
        Box::pin(async move {
            Ok(Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(body)
                .expect("a valid response"))
        })
    }
}
