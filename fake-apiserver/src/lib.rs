//! A small fake Kubernetes API server for twill's tests: real HTTP (axum), objects kept as JSON,
//! enough of the API for twilld's Kubernetes subnet manager and twill-policy's API source to
//! run unmodified against it.
//!
//! What it serves (core `api/v1`, `apis/networking.k8s.io/v1` and
//! `apis/policy.networking.k8s.io/{v1alpha2,v1alpha1}`):
//! - resources `nodes`, `namespaces` (cluster-scoped), `pods`, `networkpolicies` (namespaced;
//!   also listed and watched across all namespaces), the cluster-scoped
//!   `clusternetworkpolicies` (v1alpha2), `adminnetworkpolicies` and
//!   `baselineadminnetworkpolicies` (v1alpha1) of `policy.networking.k8s.io`, and any other
//!   plural name under the same paths (stored the same way); objects carry the `kind` and
//!   `apiVersion` of their resource;
//! - `GET` of a collection: a `<Kind>List` carrying `metadata.resourceVersion`;
//! - `GET ...?watch=true&resourceVersion=R`: a newline-delimited stream of `ADDED`, `MODIFIED`,
//!   `DELETED` events after `R` (replayed from history, then live), `BOOKMARK` events every
//!   second when `allowWatchBookmarks=true`, an `ERROR` event carrying a `Status` with code 410
//!   (`Expired`) when `R` is older than the last compaction, and the end of the stream after
//!   `timeoutSeconds`;
//! - `GET`, `POST` (create), `PUT` (replace), `DELETE` of single objects, and `PATCH` of objects
//!   and their `status` subresource with `application/merge-patch+json` and
//!   `application/strategic-merge-patch+json`;
//! - `fieldSelector` `metadata.name=`, `metadata.namespace=` and `spec.nodeName=` (equality only);
//! - test controls under `/fake/`: `POST /fake/compact` (every resourceVersion seen so far
//!   becomes too old: watches resuming from it get 410), `POST /fake/cut` (every open watch
//!   stream is closed mid-stream), `POST /fake/hold` and `POST /fake/release` (cut, and refuse
//!   new watches with 503 until released), `GET /fake/requests` (method, path, query and content type of
//!   every API request so far, for asserting which verbs a program used), `POST
//!   /fake/absent/<resource>` and `POST /fake/present/<resource>` (the resource answers every
//!   request with 404 `404 page not found`, as a real server does for a CRD that is not
//!   installed, and its open watches end; then serves again, with the objects it had).
//!
//! Where it differs from a real API server (deliberately small):
//! - no authentication, authorization, admission, validation, defaulting or OpenAPI schema;
//!   objects are stored as given, plus `metadata.resourceVersion`, `uid` and
//!   `creationTimestamp`; `metadata.generation` is not maintained;
//! - one global resourceVersion counter (as etcd has), but no consistency options:
//!   `resourceVersionMatch`, `limit` and `continue` are ignored (a list is always complete and
//!   current), `labelSelector` is ignored, only the field selectors above are understood;
//! - a field-selector watch filters events by the object's current state only: an object that
//!   stops matching is not reported as `DELETED` to that watch;
//! - strategic merge patch knows merge keys for `conditions`, `addresses`, `taints`,
//!   `containers`, `ports`... only by the rule "lists of objects that all have a `type` or
//!   `name` key are merged on that key"; other lists are replaced, and `$patch`/`$retainKeys`
//!   directives are not supported; JSON patch and server-side apply answer 415;
//! - `PATCH`/`PUT` of the main resource keeps the old `status`, and of `status` keeps the old
//!   `spec` (as the registry strategies for nodes and pods do), but no other field is protected;
//! - deleting a namespace does not delete the objects in it; there are no finalizers, no
//!   graceful deletion and no garbage collection;
//! - no protobuf, no HTTP/2, no `Table` output, no discovery beyond what kube's client needs
//!   (it needs none for typed `Api`s);
//! - HTTPS ([`FakeApiServer::serve_tls`], a certificate the caller makes) only encrypts: no
//!   client certificates are asked for and bearer tokens are not checked.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

/// One change to the store, as watch streams report it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// (resource, namespace ("" for cluster-scoped), name) -> object.
    objects: BTreeMap<(String, String, String), Value>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410.
    compacted: u64,
    requests: Vec<Value>,
    uid: u64,
    /// Resources that answer 404, as if their CRD were not installed (see `/fake/absent/`).
    absent: std::collections::BTreeSet<String>,
}

/// The server's state; clone it to share it between the HTTP server and in-process callers.
#[derive(Clone)]
pub struct FakeApiServer {
    store: Arc<Mutex<Store>>,
    changes: broadcast::Sender<Change>,
    cut: broadcast::Sender<()>,
    /// While set, new watch requests are refused with 503 (see `/fake/hold`).
    held: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for FakeApiServer {
    fn default() -> Self {
        Self::new()
    }
}

/// `Node` for `nodes`, and so on; unknown plurals drop their last `s` and are capitalised.
pub fn kind_of(resource: &str) -> String {
    match resource {
        "nodes" => "Node".into(),
        "namespaces" => "Namespace".into(),
        "pods" => "Pod".into(),
        "networkpolicies" => "NetworkPolicy".into(),
        "clusternetworkpolicies" => "ClusterNetworkPolicy".into(),
        "adminnetworkpolicies" => "AdminNetworkPolicy".into(),
        "baselineadminnetworkpolicies" => "BaselineAdminNetworkPolicy".into(),
        other => {
            let s = other.strip_suffix('s').unwrap_or(other);
            let mut c = s.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        }
    }
}

/// The group `policy.networking.k8s.io`, whose resources are served at their own versions.
pub const POLICY_GROUP: &str = "policy.networking.k8s.io";

/// The resources of [`POLICY_GROUP`] (cluster-scoped).
pub const POLICY_RESOURCES: [&str; 3] = [
    "clusternetworkpolicies",
    "adminnetworkpolicies",
    "baselineadminnetworkpolicies",
];

/// The version `resource` of `group` is served at: `v1alpha2` for ClusterNetworkPolicy,
/// `v1alpha1` for AdminNetworkPolicy and BaselineAdminNetworkPolicy, `v1` for the rest.
pub fn version_of(group: &str, resource: &str) -> &'static str {
    match (group, resource) {
        (POLICY_GROUP, "clusternetworkpolicies") => "v1alpha2",
        (POLICY_GROUP, "adminnetworkpolicies" | "baselineadminnetworkpolicies") => "v1alpha1",
        _ => "v1",
    }
}

fn api_version_of(group: &str, resource: &str) -> String {
    let version = version_of(group, resource);
    if group.is_empty() {
        version.into()
    } else {
        format!("{group}/{version}")
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
        "message":message,"reason":reason,"code":code});
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn json_response(v: &Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn merge_key(list: &[Value]) -> Option<&'static str> {
    ["type", "name"]
        .into_iter()
        .find(|k| !list.is_empty() && list.iter().all(|v| v.get(k).is_some_and(|x| x.is_string())))
}

/// Strategic merge patch, simplified: objects merge as in a merge patch; a list of objects
/// that all carry a `type` (or else `name`) key is merged element by element on that key;
/// every other list is replaced.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                    continue;
                }
                let slot = t.entry(k.clone()).or_insert(Value::Null);
                match (slot.as_array_mut(), v.as_array()) {
                    (Some(old), Some(new)) if merge_key(new).is_some() => {
                        let key = merge_key(new).expect("checked");
                        for item in new {
                            match old.iter_mut().find(|o| o.get(key) == item.get(key)) {
                                Some(o) => strategic_merge_patch(o, item),
                                None => old.push(item.clone()),
                            }
                        }
                    }
                    _ => strategic_merge_patch(slot, v),
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// A parsed API path.
#[derive(Debug, Clone)]
struct Target {
    group: String,
    version: String,
    resource: String,
    namespace: String,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => (String::new(), "v1", rest),
        ["apis", g, v, rest @ ..] => (g.to_string(), *v, rest),
        _ => return None,
    };
    let t = |resource: &str, namespace: &str, name: Option<&str>, status: bool| Target {
        group: group.clone(),
        version: version.to_string(),
        resource: resource.to_string(),
        namespace: namespace.to_string(),
        name: name.map(String::from),
        status,
    };
    Some(match rest {
        [r] => t(r, "", None, false),
        ["namespaces", ns, r] => t(r, ns, None, false),
        ["namespaces", ns, r, n] => t(r, ns, Some(n), false),
        ["namespaces", ns, r, n, "status"] => t(r, ns, Some(n), true),
        [r, n] => t(r, "", Some(n), false),
        [r, n, "status"] => t(r, "", Some(n), true),
        _ => return None,
    })
}

fn query_map(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or(""), 16) {
                    Ok(x) => {
                        out.push(x);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `metadata.name=a,spec.nodeName=b` as (path, value) pairs.
fn field_selector(q: &BTreeMap<String, String>) -> Vec<(Vec<String>, String)> {
    q.get("fieldSelector")
        .map(|s| {
            s.split(',')
                .filter_map(|t| {
                    let (k, v) = t.split_once("==").or_else(|| t.split_once('='))?;
                    Some((k.split('.').map(String::from).collect(), v.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn matches(obj: &Value, sel: &[(Vec<String>, String)]) -> bool {
    sel.iter().all(|(path, want)| {
        let mut v = obj;
        for p in path {
            v = v.get(p).unwrap_or(&Value::Null);
        }
        v.as_str().unwrap_or("") == want
    })
}

fn now() -> String {
    // RFC 3339 without a date library: seconds since the epoch, rendered as a civil date.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86400;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl FakeApiServer {
    pub fn new() -> FakeApiServer {
        let (changes, _) = broadcast::channel(65536);
        let (cut, _) = broadcast::channel(16);
        FakeApiServer {
            store: Arc::new(Mutex::new(Store::default())),
            changes,
            cut,
            held: Arc::default(),
        }
    }

    /// The axum router serving the API and the `/fake/` controls.
    pub fn router(&self) -> Router {
        Router::new().fallback(handle).with_state(self.clone())
    }

    /// Serves on `listener` until the process ends.
    pub async fn serve_tcp(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }

    /// Serves on a Unix socket (the tests' control channel: it works across network
    /// namespaces without any packet leaving one).
    pub async fn serve_unix(self, listener: tokio::net::UnixListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }

    /// Serves HTTPS on `listener` until the process ends, as a real API server does, so
    /// in-cluster clients (`KUBERNETES_SERVICE_HOST`, the service account's `ca.crt`) work
    /// unmodified. Handshakes run in tasks of their own: a client that stalls its handshake
    /// holds up nobody else.
    pub async fn serve_tls(
        self,
        listener: tokio::net::TcpListener,
        tls: tokio_rustls::TlsAcceptor,
    ) -> std::io::Result<()> {
        let local = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, as axum does.
                        tracing::warn!(error = %e, "accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    match tls.accept(tcp).await {
                        Ok(stream) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Err(e) => tracing::warn!(%peer, error = %e, "TLS handshake"),
                    }
                });
            }
        });
        axum::serve(TlsListener { rx, local }, self.router()).await
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store.lock().expect("store").rv
    }

    /// Makes every resourceVersion seen so far too old for a watch (as etcd compaction does).
    pub fn compact(&self) {
        let mut s = self.store.lock().expect("store");
        s.compacted = s.rv + 1;
        s.history.clear();
    }

    /// Closes every open watch stream.
    pub fn cut_watches(&self) {
        let _ = self.cut.send(());
    }

    /// Closes every open watch stream and refuses new watches (503) until [`Self::release`]:
    /// changes made meanwhile reach watchers only through resuming or re-listing.
    pub fn hold(&self) {
        self.held.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut_watches();
    }

    pub fn release(&self) {
        self.held.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stores `obj` as a new version and reports the change; `None` deletes.
    fn commit(
        &self,
        s: &mut Store,
        group: &str,
        resource: &str,
        key: (String, String, String),
        obj: Option<Value>,
    ) -> Option<Value> {
        let old = s.objects.get(&key).cloned();
        let (kind, mut object) = match (&old, obj) {
            (None, None) => return None,
            (Some(o), None) => ("DELETED", o.clone()),
            (None, Some(n)) => ("ADDED", n),
            (Some(o), Some(n)) => {
                let mut a = o.clone();
                let mut b = n.clone();
                for x in [&mut a, &mut b] {
                    if let Some(m) = x.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.remove("resourceVersion");
                    }
                }
                if a == b {
                    return Some(o.clone()); // a no-op write: no new version, no event
                }
                ("MODIFIED", n)
            }
        };
        s.rv += 1;
        let rv = s.rv;
        if kind == "ADDED" {
            s.uid += 1;
            let uid = format!("00000000-0000-4000-8000-{:012}", s.uid);
            let meta = object
                .as_object_mut()
                .map(|m| m.entry("metadata").or_insert(json!({})));
            if let Some(Value::Object(meta)) = meta {
                meta.entry("uid").or_insert(json!(uid));
                meta.entry("creationTimestamp").or_insert(json!(now()));
            }
        }
        if let Some(o) = object.as_object_mut() {
            if kind != "DELETED" {
                // A deleted object is reported as it was stored.
                o.insert("kind".into(), json!(kind_of(resource)));
                o.insert("apiVersion".into(), json!(api_version_of(group, resource)));
            }
            let meta = o.entry("metadata").or_insert(json!({}));
            meta["resourceVersion"] = json!(rv.to_string());
            meta["name"] = json!(key.2);
            if !key.1.is_empty() {
                meta["namespace"] = json!(key.1);
            }
        }
        if kind == "DELETED" {
            s.objects.remove(&key);
        } else {
            s.objects.insert(key, object.clone());
        }
        let change = Change {
            rv,
            resource: resource.to_string(),
            kind,
            object: object.clone(),
        };
        s.history.push(change.clone());
        let _ = self.changes.send(change);
        Some(object)
    }

    /// Creates or replaces an object in-process (tests that run the server in their own
    /// process). `namespace` is "" for cluster-scoped resources.
    pub fn put(&self, group: &str, resource: &str, namespace: &str, obj: Value) -> Value {
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        let mut s = self.store.lock().expect("store");
        self.commit(
            &mut s,
            group,
            resource,
            (resource.into(), namespace.into(), name),
            Some(obj),
        )
        .unwrap_or(Value::Null)
    }

    /// Deletes an object in-process.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) {
        let mut s = self.store.lock().expect("store");
        self.commit(
            &mut s,
            "",
            resource,
            (resource.into(), namespace.into(), name.into()),
            None,
        );
    }

    /// An object as stored.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.store
            .lock()
            .expect("store")
            .objects
            .get(&(resource.into(), namespace.into(), name.into()))
            .cloned()
    }

    /// Makes `resource` answer 404 to every request, as a resource whose CRD is not installed
    /// does (and ends its open watches), or serve again (`absent` false) with the objects it
    /// had. See `/fake/absent/`.
    pub fn set_absent(&self, resource: &str, absent: bool) {
        let mut s = self.store.lock().expect("store");
        if absent {
            s.absent.insert(resource.to_string());
        } else {
            s.absent.remove(resource);
        }
        drop(s);
        if absent {
            self.cut_watches();
        }
    }

    /// The requests seen so far (see `GET /fake/requests`).
    pub fn requests(&self) -> Vec<Value> {
        self.store.lock().expect("store").requests.clone()
    }
}

async fn handle(State(srv): State<FakeApiServer>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = query_map(req.uri().query());
    let headers = req.headers().clone();
    let body = match axum::body::to_bytes(req.into_body(), 64 << 20).await {
        Ok(b) => b,
        Err(e) => return status(400, "BadRequest", &e.to_string()),
    };
    if let Some(ctl) = path.strip_prefix("/fake/") {
        return control(&srv, &method, ctl);
    }
    let Some(t) = parse_path(&path) else {
        return status(
            404,
            "NotFound",
            &format!("the server could not find {path}"),
        );
    };
    let ctype = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    srv.store.lock().expect("store").requests.push(json!({
        "method": method.as_str(), "path": path, "query": query, "contentType": ctype,
        "resource": t.resource, "subresource": if t.status { "status" } else { "" },
        "name": t.name, "namespace": t.namespace,
        "body": serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null),
        "userAgent": headers.get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or(""),
    }));
    // A CRD that is not installed (or a version not served): the path is unknown to the server.
    let absent = srv
        .store
        .lock()
        .expect("store")
        .absent
        .contains(&t.resource);
    if absent || (t.group == POLICY_GROUP && t.version != version_of(&t.group, &t.resource)) {
        return (
            StatusCode::NOT_FOUND,
            [("content-type", "text/plain; charset=utf-8")],
            "404 page not found\n",
        )
            .into_response();
    }
    match (&method, &t.name) {
        (&Method::GET, None)
            if is_true(query.get("watch"))
                && srv.held.load(std::sync::atomic::Ordering::SeqCst) =>
        {
            status(503, "ServiceUnavailable", "watches are held by the test")
        }
        (&Method::GET, None) if is_true(query.get("watch")) => watch(&srv, &t, &query),
        (&Method::GET, None) => list(&srv, &t, &query),
        (&Method::GET, Some(n)) => match srv.get(&t.resource, &t.namespace, n) {
            Some(o) => json_response(&o),
            None => not_found(&t, n),
        },
        (&Method::POST, None) => write(&srv, &t, None, &headers, &body, Write::Create),
        (&Method::PUT, Some(n)) => write(&srv, &t, Some(n), &headers, &body, Write::Replace),
        (&Method::PATCH, Some(n)) => write(&srv, &t, Some(n), &headers, &body, Write::Patch),
        (&Method::DELETE, Some(n)) => {
            let mut s = srv.store.lock().expect("store");
            let key = (t.resource.clone(), t.namespace.clone(), n.clone());
            match srv.commit(&mut s, &t.group, &t.resource, key, None) {
                Some(o) => json_response(&o),
                None => not_found(&t, n),
            }
        }
        _ => status(405, "MethodNotAllowed", "method not allowed"),
    }
}

fn is_true(v: Option<&String>) -> bool {
    matches!(v.map(String::as_str), Some("true" | "1"))
}

fn not_found(t: &Target, name: &str) -> Response {
    status(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", t.resource),
    )
}

fn control(srv: &FakeApiServer, method: &Method, what: &str) -> Response {
    match (method, what) {
        (&Method::POST, "compact") => {
            srv.compact();
            json_response(&json!({"compacted": srv.resource_version()}))
        }
        (&Method::POST, "cut") => {
            srv.cut_watches();
            json_response(&json!({"cut": true}))
        }
        (&Method::POST, "hold") => {
            srv.hold();
            json_response(&json!({"held": true}))
        }
        (&Method::POST, "release") => {
            srv.release();
            json_response(&json!({"held": false}))
        }
        (&Method::GET, "requests") => json_response(&Value::Array(srv.requests())),
        (&Method::POST, w) if w.starts_with("absent/") || w.starts_with("present/") => {
            let (state, resource) = w.split_once('/').expect("checked");
            srv.set_absent(resource, state == "absent");
            json_response(&json!({"resource": resource, "absent": state == "absent"}))
        }
        _ => status(404, "NotFound", what),
    }
}

fn list(srv: &FakeApiServer, t: &Target, q: &BTreeMap<String, String>) -> Response {
    let sel = field_selector(q);
    let s = srv.store.lock().expect("store");
    let items: Vec<Value> = s
        .objects
        .iter()
        .filter(|((r, ns, _), o)| {
            *r == t.resource && (t.namespace.is_empty() || *ns == t.namespace) && matches(o, &sel)
        })
        .map(|(_, o)| o.clone())
        .collect();
    json_response(&json!({
        "kind": format!("{}List", kind_of(&t.resource)),
        "apiVersion": api_version_of(&t.group, &t.resource),
        "metadata": {"resourceVersion": s.rv.to_string()},
        "items": items,
    }))
}

fn watch(srv: &FakeApiServer, t: &Target, q: &BTreeMap<String, String>) -> Response {
    let sel = field_selector(q);
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = is_true(q.get("allowWatchBookmarks"));
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1800);
    let kind = kind_of(&t.resource);
    let api_version = api_version_of(&t.group, &t.resource);
    let relevant = {
        let t = t.clone();
        move |c: &Change| {
            c.resource == t.resource
                && (t.namespace.is_empty()
                    || c.object["metadata"]["namespace"].as_str() == Some(t.namespace.as_str()))
                && matches(&c.object, &sel)
        }
    };
    let line = |kind: &str, object: &Value| {
        let mut s = json!({"type": kind, "object": object}).to_string();
        s.push('\n');
        Bytes::from(s)
    };
    // Under the lock: decide 410, take the backlog, subscribe: nothing is lost or doubled.
    let (backlog, mut live, mut cut, start_rv) = {
        let s = srv.store.lock().expect("store");
        let backlog: Result<Vec<Change>, ()> = if from == 0 {
            // resourceVersion "" or "0": every current object as ADDED, then changes.
            let mut v: Vec<Change> = s
                .objects
                .iter()
                .filter(|((r, _, _), _)| *r == t.resource)
                .map(|(_, o)| Change {
                    rv: 0,
                    resource: t.resource.clone(),
                    kind: "ADDED",
                    object: o.clone(),
                })
                .collect();
            v.retain(&relevant);
            Ok(v)
        } else if from < s.compacted {
            Err(())
        } else {
            Ok(s.history
                .iter()
                .filter(|c| c.rv > from && relevant(c))
                .cloned()
                .collect())
        };
        (backlog, srv.changes.subscribe(), srv.cut.subscribe(), s.rv)
    };
    let backlog = match backlog {
        Ok(b) => b,
        Err(()) => {
            let err = json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
                "message": format!("too old resource version: {from} ({start_rv})"),
                "reason":"Expired","code":410});
            let body = Body::from(line("ERROR", &err));
            return ([("content-type", "application/json")], body).into_response();
        }
    };
    let stream = async_stream(move |tx: tokio::sync::mpsc::Sender<Bytes>| async move {
        let mut last = start_rv;
        for c in backlog {
            if tx.send(line(c.kind, &c.object)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                c = live.recv() => match c {
                    Ok(c) => {
                        if c.rv <= start_rv { continue; }
                        last = last.max(c.rv);
                        if relevant(&c) && tx.send(line(c.kind, &c.object)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let b = json!({"kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": last.to_string(),
                            "annotations": {"k8s.io/initial-events-end": "true"}}});
                    if tx.send(line("BOOKMARK", &b)).await.is_err() { return; }
                }
                _ = cut.recv() => return,
                _ = &mut deadline => return,
            }
        }
    });
    (
        [
            ("content-type", "application/json"),
            ("transfer-encoding", "chunked"),
        ],
        Body::from_stream(stream.map(Ok::<Bytes, std::convert::Infallible>)),
    )
        .into_response()
}

/// Connections whose TLS handshake [`FakeApiServer::serve_tls`] completed.
struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        std::net::SocketAddr,
    )>,
    local: std::net::SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accepting task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// A TLS acceptor for `serve_tls` from PEM files: the server's certificate chain (leaf first)
/// and its private key (PKCS#8, PKCS#1 or SEC1).
pub fn tls_acceptor(
    cert_pem: &std::path::Path,
    key_pem: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert_pem)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("--tls-cert {}", cert_pem.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "--tls-cert {}: no certificate in the file",
        cert_pem.display()
    );
    let key = PrivateKeyDer::from_pem_file(key_pem)
        .with_context(|| format!("--tls-key {}", key_pem.display()))?;
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("--tls-cert and --tls-key do not make a usable pair")?;
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}

/// A stream fed by a task (a dependency-free `async_stream`).
fn async_stream<F, Fut>(f: F) -> impl futures::Stream<Item = Bytes>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

enum Write {
    Create,
    Replace,
    Patch,
}

fn write(
    srv: &FakeApiServer,
    t: &Target,
    name: Option<&String>,
    headers: &HeaderMap,
    body: &Bytes,
    how: Write,
) -> Response {
    let input: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return status(400, "BadRequest", &format!("invalid JSON: {e}")),
    };
    let name = match name {
        Some(n) => n.clone(),
        None => match input["metadata"]["name"].as_str() {
            Some(n) => n.to_string(),
            None => return status(422, "Invalid", "metadata.name: Required value"),
        },
    };
    let ns = if t.namespace.is_empty() && t.resource != "namespaces" {
        input["metadata"]["namespace"]
            .as_str()
            .filter(|_| matches!(how, Write::Create) && t.resource != "nodes")
            .unwrap_or("")
            .to_string()
    } else {
        t.namespace.clone()
    };
    let key = (t.resource.clone(), ns, name.clone());
    let mut s = srv.store.lock().expect("store");
    let old = s.objects.get(&key).cloned();
    let new = match (&how, &old) {
        (Write::Create, Some(_)) => {
            return status(
                409,
                "AlreadyExists",
                &format!("{} \"{name}\" already exists", t.resource),
            )
        }
        (Write::Create, None) => input,
        (_, None) => return not_found(t, &name),
        (Write::Replace, Some(_)) => input,
        (Write::Patch, Some(o)) => {
            let ctype = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let mut n = o.clone();
            match ctype.split(';').next().unwrap_or("").trim() {
                "application/merge-patch+json" => merge_patch(&mut n, &input),
                "application/strategic-merge-patch+json" => strategic_merge_patch(&mut n, &input),
                other => {
                    return status(
                        415,
                        "UnsupportedMediaType",
                        &format!("the fake API server does not support patch type {other:?}"),
                    )
                }
            }
            n
        }
    };
    let mut new = new;
    if let (Some(o), Some(obj)) = (&old, new.as_object_mut()) {
        // The status subresource changes only status (and metadata); the main resource
        // never changes status.
        let keep = if t.status { "spec" } else { "status" };
        match o.get(keep) {
            Some(v) => {
                obj.insert(keep.into(), v.clone());
            }
            None => {
                obj.remove(keep);
            }
        }
    }
    match srv.commit(&mut s, &t.group, &t.resource, key, Some(new)) {
        Some(o) => {
            let code = if old.is_none() { 201 } else { 200 };
            (
                StatusCode::from_u16(code).expect("code"),
                [("content-type", "application/json")],
                o.to_string(),
            )
                .into_response()
        }
        None => status(500, "InternalError", "commit failed"),
    }
}

/// Files of a throwaway cluster CA and a server certificate it signed, for tests that serve
/// the fake API server over HTTPS.
#[derive(Clone, Debug)]
pub struct TestCertificates {
    /// The CA's certificate (PEM): what a pod's service-account `ca.crt` holds.
    pub ca_cert: std::path::PathBuf,
    /// The server's certificate (PEM), for `--tls-cert`.
    pub server_cert: std::path::PathBuf,
    /// The server's private key (PEM), for `--tls-key`.
    pub server_key: std::path::PathBuf,
}

/// Makes a CA and a server certificate for `server_ip` (EC P-256, valid two days) in `dir`
/// with the `openssl` command, as a cluster's CA signs its API server's certificate.
pub fn test_certificates(
    dir: &std::path::Path,
    server_ip: std::net::IpAddr,
) -> anyhow::Result<TestCertificates> {
    use anyhow::Context;
    fn openssl(args: &[&str]) -> anyhow::Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .context("running openssl (package openssl)")?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let (ca_key, ca_crt) = (path("ca.key"), path("ca.crt"));
    let (key, csr, crt, ext) = (
        path("apiserver.key"),
        path("apiserver.csr"),
        path("apiserver.crt"),
        path("apiserver.ext"),
    );
    let new_key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(new_key);
    ca.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_crt,
        "-days",
        "2",
        "-subj",
        "/CN=twill-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&ca)?;
    let mut req = vec!["req"];
    req.extend(new_key);
    req.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=kube-apiserver"]);
    openssl(&req)?;
    std::fs::write(
        &ext,
        format!(
            "subjectAltName=IP:{server_ip}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        ),
    )
    .with_context(|| format!("writing {ext}"))?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &crt,
        "-days",
        "2",
        "-extfile",
        &ext,
    ])?;
    Ok(TestCertificates {
        ca_cert: ca_crt.into(),
        server_cert: crt.into(),
        server_key: key.into(),
    })
}

/// A blocking HTTP/1.1 client over a Unix socket, for tests that drive the server from the
/// root namespace (no packet is sent anywhere). Returns (status code, body).
pub mod client {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;

    /// The User-Agent of this client, so request logs can tell the test's own calls apart.
    pub const TEST_CLIENT: &str = "twill-fake-apiserver-client";

    pub fn request(
        socket: &Path,
        method: &str,
        path: &str,
        content_type: &str,
        body: &str,
    ) -> std::io::Result<(u16, String)> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: fake\r\nUser-Agent: {TEST_CLIENT}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let chunked = head.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        });
        let body = if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        };
        Ok((code, body))
    }

    fn dechunk(mut s: &str) -> String {
        let mut out = String::new();
        while let Some((size, rest)) = s.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || rest.len() < n {
                break;
            }
            out.push_str(&rest[..n]);
            s = rest[n..].trim_start_matches("\r\n");
        }
        out
    }

    /// `request` that expects a 2xx JSON answer.
    pub fn call(
        socket: &Path,
        method: &str,
        path: &str,
        content_type: &str,
        body: &serde_json::Value,
    ) -> serde_json::Value {
        let text = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let (code, answer) = request(socket, method, path, content_type, &text)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert!(
            (200..300).contains(&code),
            "{method} {path}: HTTP {code}: {answer}"
        );
        serde_json::from_str(&answer).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategic_merge_merges_conditions_on_type_and_merge_patch_replaces_lists() {
        let mut node = json!({"status": {"conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}]}});
        let patch = json!({"status": {"conditions": [
            {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}]}});
        let mut merged = node.clone();
        strategic_merge_patch(&mut merged, &patch);
        assert_eq!(
            merged["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"},
                   {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}])
        );
        merge_patch(&mut node, &patch);
        assert_eq!(node["status"]["conditions"].as_array().unwrap().len(), 1);
        let mut ann = json!({"metadata": {"annotations": {"a": "1", "b": "2"}}});
        merge_patch(
            &mut ann,
            &json!({"metadata": {"annotations": {"a": null, "c": "3"}}}),
        );
        assert_eq!(ann["metadata"]["annotations"], json!({"b": "2", "c": "3"}));
    }

    #[test]
    fn paths_and_selectors() {
        let t = parse_path("/api/v1/nodes/n1/status").unwrap();
        assert_eq!(
            (t.resource.as_str(), t.name.as_deref(), t.status),
            ("nodes", Some("n1"), true)
        );
        let t = parse_path("/apis/networking.k8s.io/v1/namespaces/x/networkpolicies").unwrap();
        assert_eq!(
            (t.group.as_str(), t.namespace.as_str()),
            ("networking.k8s.io", "x")
        );
        let q = query_map(Some("fieldSelector=metadata.name%3Dn1&watch=1"));
        assert!(matches(
            &json!({"metadata": {"name": "n1"}}),
            &field_selector(&q)
        ));
        assert!(!matches(
            &json!({"metadata": {"name": "n2"}}),
            &field_selector(&q)
        ));
    }
}
