//! The Kubernetes API as a source: Namespaces, Pods, NetworkPolicies, Nodes and the
//! cluster-scoped policies of `policy.networking.k8s.io` (ClusterNetworkPolicy v1alpha2,
//! AdminNetworkPolicy and BaselineAdminNetworkPolicy v1alpha1, read as
//! [`kube::api::DynamicObject`]s) through kube's watchers (list, then watch from the list's resourceVersion; the watch resumes from the last
//! resourceVersion or bookmark when a stream ends, and re-lists after 410 Gone). Each re-list
//! replaces that kind's objects wholesale, so a deletion missed while a watch was down is still
//! seen. Every pod of the cluster is kept (policies select peers on any node); only this node's
//! pods get per-pod rules, which `compile(snapshot, node)` decides.
//!
//! The watchers run on a thread of their own with a small tokio runtime, behind the synchronous
//! [`Source`] trait.
//!
//! Nothing here gives up or spins: building the client (kubeconfig, in-cluster config) is
//! retried, and so is every failed list or watch, after a delay that doubles from 0.8 s to
//! 30 s with jitter ([`retry_backoff`], twill-runtime's one backoff);
//! every failure is logged with the delay. Every call has a bound (the client comes from
//! twill-runtime's one builder): connect 10 s,
//! a list or watch response that stays silent for [`READ_TIMEOUT`] is dropped, and watches
//! ask the server to end them after [`WATCH_TIMEOUT`] (the watcher also drops one idle for
//! that plus 5 s), so a hung connection cannot stall the source.
//!
//! A resource the server does not have (404: its CRD is not installed) counts as listed and
//! empty, so a cluster without the `policy.networking.k8s.io` CRDs is enforced as before; this
//! is logged once, and the list is tried again with the same backoff, so a CRD installed later
//! is picked up. Cluster-scoped objects that cannot be read go to
//! [`Snapshot::broken_cluster`].

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::Value;

use super::{ObjectError, Source, SourceError};
use crate::model::cluster::{cluster_policy_from_value, node_from_value, GROUP};
use crate::model::{
    from_json_value, ClusterPolicyKind, NamespaceObject, NetworkPolicyObject, PodObject, Snapshot,
};

/// Every Kubernetes API call twill-policy makes, as (resource, verb): the one list the RBAC test
/// compares with kube-flannel.yml's ClusterRole (once that manifest exists).
pub const API_VERBS: &[(&str, &str)] = &[
    ("namespaces", "list"),
    ("namespaces", "watch"),
    ("pods", "list"),
    ("pods", "watch"),
    ("networkpolicies", "list"),
    ("networkpolicies", "watch"),
    ("nodes", "list"),
    ("nodes", "watch"),
    ("clusternetworkpolicies", "list"),
    ("clusternetworkpolicies", "watch"),
    ("adminnetworkpolicies", "list"),
    ("adminnetworkpolicies", "watch"),
    ("baselineadminnetworkpolicies", "list"),
    ("baselineadminnetworkpolicies", "watch"),
];

/// The kinds watched, in the order of [`State::objects`].
const KINDS: [&str; 7] = [
    "Namespace",
    "Pod",
    "NetworkPolicy",
    "Node",
    "ClusterNetworkPolicy",
    "AdminNetworkPolicy",
    "BaselineAdminNetworkPolicy",
];
const NODE: usize = 3;
/// The cluster policy kinds, at indices 4.. of [`KINDS`].
const CLUSTER_POLICY_KINDS: [ClusterPolicyKind; 3] = [
    ClusterPolicyKind::ClusterNetworkPolicy,
    ClusterPolicyKind::AdminNetworkPolicy,
    ClusterPolicyKind::BaselineAdminNetworkPolicy,
];
const FIRST_CLUSTER_POLICY: usize = 4;

/// The API resource of a cluster policy kind (cluster-scoped, group
/// `policy.networking.k8s.io`).
fn api_resource(kind: ClusterPolicyKind) -> ApiResource {
    let version = kind.api_version().rsplit('/').next().unwrap_or_default();
    ApiResource {
        group: GROUP.into(),
        version: version.into(),
        api_version: kind.api_version().into(),
        kind: kind.as_str().into(),
        plural: kind.plural().into(),
    }
}

/// Connect timeout of every API call.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Server-side timeout of every watch (`timeoutSeconds`): the server ends it, the watcher
/// resumes from the last resourceVersion.
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest silence on a response (list or watch) before the connection is dropped; longer
/// than [`WATCH_TIMEOUT`] so that an idle but healthy watch is ended by the server first.
pub const READ_TIMEOUT: Duration = Duration::from_secs(75);

/// Longest delay between two attempts (before jitter).
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// The delays between attempts after errors (client construction, each watch): 0.8 s
/// doubling to [`MAX_RETRY_DELAY`], each plus a random jitter of up to itself, forever.
pub fn retry_backoff() -> impl Iterator<Item = Duration> {
    twill_runtime::backoff::retry_delays(Duration::from_millis(800), MAX_RETRY_DELAY)
}

#[derive(Default)]
struct State {
    /// Per kind: "ns/name" -> object JSON.
    objects: [BTreeMap<String, Value>; KINDS.len()],
    ready: [bool; KINDS.len()],
    /// Per kind: the server answered 404 (no CRD); listed as empty meanwhile.
    absent: [bool; KINDS.len()],
    generation: u64,
    /// The source cannot work at all (no async runtime); reported by every snapshot.
    fatal: Option<String>,
    /// The latest client or watch error, reported while an initial list is missing.
    last_error: Option<String>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// Where the API is: `--kubeconfig` and/or `--kube-api-url`, else in-cluster.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    pub api_url: String,
    pub kubeconfig: String,
    /// Longest silence on a response before the connection is dropped ([`READ_TIMEOUT`]).
    pub read_timeout: Duration,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            api_url: String::new(),
            kubeconfig: String::new(),
            read_timeout: READ_TIMEOUT,
        }
    }
}

/// The API source. Dropping it leaves the watcher thread running until the process ends.
pub struct KubeApiSource {
    shared: Arc<Shared>,
    seen: u64,
    /// How long `snapshot` waits for the initial lists.
    pub initial_timeout: Duration,
}

async fn client(opts: &KubeOptions) -> Result<Client, twill_runtime::kube::ClientError> {
    twill_runtime::kube::client(&twill_runtime::kube::ClientOptions {
        api_url: opts.api_url.clone(),
        kubeconfig: opts.kubeconfig.clone(),
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(opts.read_timeout),
    })
    .await
}

/// [`client`], retried with [`retry_backoff`] until it succeeds; every failure is logged
/// with the delay before the next attempt and kept as the source's last error.
async fn client_retrying(opts: &KubeOptions, shared: &Shared) -> Client {
    let mut delays = retry_backoff();
    loop {
        match client(opts).await {
            Ok(c) => return c,
            Err(e) => {
                // anyhow's "{:#}" writes the error and each of its causes.
                let e = anyhow::Error::new(e);
                let delay = delays.next().unwrap_or(MAX_RETRY_DELAY);
                tracing::warn!("Kubernetes client: {e:#}; retrying in {delay:?}");
                shared.state.lock().expect("state").last_error =
                    Some(format!("Kubernetes client: {e:#}"));
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The parts of a Node that policy reads (name, labels, addresses): the rest (conditions,
/// heartbeat times, images) changes often and means nothing here, and an update that
/// changes none of these parts is then no change at all.
fn node_shape(v: Value) -> Value {
    serde_json::json!({
        "kind": "Node",
        "metadata": {"name": v["metadata"]["name"], "labels": v["metadata"]["labels"]},
        "status": {"addresses": v["status"]["addresses"]},
    })
}

/// Whether `e` says the server does not have the resource (its CRD is not installed).
fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// Watches one kind into `shared.state.objects[idx]`. `shape` turns an object's JSON into
/// what is kept (and compared: an update that keeps it the same wakes nobody).
async fn follow<K>(api: Api<K>, idx: usize, shared: Arc<Shared>, shape: fn(Value) -> Value)
where
    K: kube::Resource + Clone + Debug + Send + serde::de::DeserializeOwned + serde::Serialize,
    K: 'static,
{
    let key = |o: &K| {
        let m = o.meta();
        format!(
            "{}/{}",
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default()
        )
    };
    let value = |o: &K| {
        let mut v = serde_json::to_value(o).unwrap_or(Value::Null);
        v["kind"] = Value::String(KINDS[idx].into());
        shape(v)
    };
    let config = watcher::Config::default().timeout(WATCH_TIMEOUT.as_secs() as u32);
    // Our own backoff rather than kube's default_backoff(): that one is reset by every
    // non-error item, and a failing initial list yields Event::Init before each error, so
    // it retried an unreachable API every ~1 s forever. This one is reset only by progress
    // (a complete list or a change).
    let mut stream = watcher(api, config).boxed();
    let mut delays = retry_backoff();
    let mut buffer = BTreeMap::new();
    /// What an event asks of the loop after the state is updated.
    enum Next {
        Progress,
        Failed(String),
        /// 404: the kind is not served (no CRD).
        NotServed,
    }
    while let Some(ev) = stream.next().await {
        let next = {
            let mut st = shared.state.lock().expect("state");
            let next = match ev {
                Ok(watcher::Event::Init) => {
                    buffer.clear();
                    continue;
                }
                Ok(watcher::Event::InitApply(o)) => {
                    buffer.insert(key(&o), value(&o));
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    st.objects[idx] = std::mem::take(&mut buffer);
                    st.ready[idx] = true;
                    if std::mem::take(&mut st.absent[idx]) {
                        tracing::info!(kind = KINDS[idx], "the API server serves it now");
                    }
                    Next::Progress
                }
                Ok(watcher::Event::Apply(o)) => {
                    let (k, v) = (key(&o), value(&o));
                    if st.objects[idx].get(&k) == Some(&v) {
                        continue;
                    }
                    st.objects[idx].insert(k, v);
                    Next::Progress
                }
                Ok(watcher::Event::Delete(o)) => {
                    st.objects[idx].remove(&key(&o));
                    Next::Progress
                }
                Err(e) if is_not_found(&e) => {
                    buffer.clear();
                    if !st.ready[idx] {
                        // Never listed: no CRD. Listed, and empty; said once, tried again with
                        // the backoff, so a CRD installed later is read.
                        if !std::mem::replace(&mut st.absent[idx], true) {
                            tracing::info!(
                                kind = KINDS[idx],
                                "the API server does not serve this kind (its CRD is not installed?): enforcing without it, and looking again with backoff"
                            );
                        }
                        st.ready[idx] = true;
                        st.generation += 1;
                        shared.changed.notify_all();
                    } else if !std::mem::replace(&mut st.absent[idx], true) {
                        // Served before: an API server answers 404 for custom resources for a
                        // while after it or etcd restarts, and dropping the objects then would
                        // lift every Admin Deny until the next list. They stay; a CRD that
                        // was really removed takes its policies with it at the next restart.
                        tracing::warn!(
                            kind = KINDS[idx],
                            objects = st.objects[idx].len(),
                            "the API server answers 404 for a kind it served: keeping its objects, and looking again with backoff"
                        );
                    }
                    Next::NotServed
                }
                Err(e) => {
                    let e = chain(&e);
                    st.last_error = Some(format!("{} watch: {e}", KINDS[idx]));
                    Next::Failed(e)
                }
            };
            if matches!(next, Next::Progress) {
                st.generation += 1;
                shared.changed.notify_all();
            }
            next
        };
        match next {
            Next::Progress => delays = retry_backoff(),
            Next::NotServed => {
                let delay = delays.next().unwrap_or(MAX_RETRY_DELAY);
                tracing::debug!(kind = KINDS[idx], "not served; looking again in {delay:?}");
                tokio::time::sleep(delay).await;
            }
            Next::Failed(e) => {
                let delay = delays.next().unwrap_or(MAX_RETRY_DELAY);
                tracing::warn!(
                    kind = KINDS[idx],
                    error = %e,
                    "watch failed; retrying in {delay:?}"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// `e` and its sources, joined by ": " (kube's own message stops at "client error
/// (Connect)"; the cause, e.g. "Connection refused", is further down the chain).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

impl KubeApiSource {
    /// Starts the watchers (on a thread of their own).
    pub fn start(opts: KubeOptions) -> KubeApiSource {
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("kube-watch".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("cannot start the Kubernetes API source: {e}");
                        let mut st = sh.state.lock().expect("state");
                        st.fatal = Some(format!("no async runtime: {e}"));
                        // One wake-up so the caller reports it; wait_change then waits.
                        st.generation += 1;
                        sh.changed.notify_all();
                        return;
                    }
                };
                rt.block_on(async move {
                    let c = client_retrying(&opts, &sh).await;
                    let same = |v| v;
                    let cluster = |i: usize| {
                        let kind = CLUSTER_POLICY_KINDS[i - FIRST_CLUSTER_POLICY];
                        let ar = api_resource(kind);
                        follow(
                            Api::<DynamicObject>::all_with(c.clone(), &ar),
                            i,
                            sh.clone(),
                            same,
                        )
                    };
                    futures::join!(
                        follow(Api::<Namespace>::all(c.clone()), 0, sh.clone(), same),
                        follow(Api::<Pod>::all(c.clone()), 1, sh.clone(), same),
                        follow(Api::<NetworkPolicy>::all(c.clone()), 2, sh.clone(), same),
                        follow(Api::<Node>::all(c.clone()), NODE, sh.clone(), node_shape),
                        cluster(FIRST_CLUSTER_POLICY),
                        cluster(FIRST_CLUSTER_POLICY + 1),
                        cluster(FIRST_CLUSTER_POLICY + 2),
                    );
                });
            })
            .expect("spawning the watcher thread");
        KubeApiSource {
            shared,
            seen: 0,
            initial_timeout: Duration::from_secs(60),
        }
    }
}

fn source_error(origin: &str, message: String) -> SourceError {
    SourceError {
        errors: vec![ObjectError {
            origin: origin.into(),
            document: None,
            item: None,
            object: String::new(),
            namespace: None,
            field: String::new(),
            message,
        }],
    }
}

impl Source for KubeApiSource {
    fn snapshot(&mut self) -> Result<Snapshot, SourceError> {
        let deadline = Instant::now() + self.initial_timeout;
        let mut st = self.shared.state.lock().expect("state");
        while !st.ready.iter().all(|r| *r) && st.fatal.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing: Vec<&str> = (0..KINDS.len())
                    .filter(|i| !st.ready[*i])
                    .map(|i| KINDS[i])
                    .collect();
                let last = st
                    .last_error
                    .as_ref()
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default();
                // Seen: the next wait_change waits for a new event instead of returning
                // at once (the watchers retry on their own).
                self.seen = st.generation;
                return Err(source_error(
                    "Kubernetes API",
                    format!("no initial list of {} yet{last}", missing.join(", ")),
                ));
            }
            st = self.shared.changed.wait_timeout(st, left).expect("state").0;
        }
        if let Some(e) = &st.fatal {
            self.seen = st.generation;
            return Err(source_error("Kubernetes API", e.clone()));
        }
        self.seen = st.generation;
        let mut errors = Vec::new();
        // The key is `namespace/name` (`/name` for a Namespace): every error here names
        // the namespace it breaks, and only that one fails closed.
        let err = |kind: &str, key: &str, field: String, message: String| {
            let (ns, name) = key.split_once('/').unwrap_or(("", key));
            let (ns, object) = if kind == "Namespace" {
                (name, format!("{kind} {name}"))
            } else {
                (ns, format!("{kind} {key}"))
            };
            ObjectError {
                origin: object.clone(),
                document: None,
                item: None,
                object,
                namespace: Some(if ns.is_empty() { "default" } else { ns }.to_string()),
                field,
                message,
            }
        };
        let mut namespaces = Vec::new();
        for (k, v) in &st.objects[0] {
            match from_json_value::<NamespaceObject>(v.clone()).and_then(|o| o.into_model()) {
                Ok(n) => namespaces.push(n),
                Err(e) => errors.push(err("Namespace", k, e.field, e.message)),
            }
        }
        let mut pods = Vec::new();
        for (k, v) in &st.objects[1] {
            match from_json_value::<PodObject>(v.clone()).and_then(|o| o.into_model()) {
                Ok(p) => pods.push(p),
                Err(e) => errors.push(err("Pod", k, e.field, e.message)),
            }
        }
        let mut policies = Vec::new();
        for (k, v) in &st.objects[2] {
            match from_json_value::<NetworkPolicyObject>(v.clone()).and_then(|o| o.into_model()) {
                Ok(p) => policies.push(p),
                Err(e) => errors.push(err("NetworkPolicy", k, e.field, e.message)),
            }
        }
        // Cluster-scoped: the key is `/name`; errors break no namespace.
        let mut broken_cluster = Vec::new();
        let cluster_err = |kind: &str, key: &str, e: crate::model::FieldError| {
            let object = format!("{kind} {}", key.trim_start_matches('/'));
            ObjectError {
                origin: object.clone(),
                object,
                field: e.field,
                message: e.message,
                ..ObjectError::default()
            }
        };
        let mut nodes = Vec::new();
        for (k, v) in &st.objects[NODE] {
            match node_from_value(v.clone()) {
                Ok(n) => nodes.push(n),
                Err(e) => broken_cluster.push(cluster_err("Node", k, e)),
            }
        }
        let mut cluster_policies = Vec::new();
        for (i, kind) in CLUSTER_POLICY_KINDS.into_iter().enumerate() {
            for (k, v) in &st.objects[FIRST_CLUSTER_POLICY + i] {
                let mut v = v.clone();
                // The resource decides what the object is, whatever it says itself.
                v["kind"] = kind.as_str().into();
                v["apiVersion"] = kind.api_version().into();
                match cluster_policy_from_value(v) {
                    Ok(p) => cluster_policies.push(p),
                    Err(e) => broken_cluster.push(cluster_err(kind.as_str(), k, e)),
                }
            }
        }
        let mut s = Snapshot::new(namespaces, pods, policies)
            .with_broken(
                errors
                    .into_iter()
                    .map(|e| (e.namespace.clone().unwrap_or_default(), e)),
            )
            .with_cluster_policies(cluster_policies)
            .with_nodes(nodes);
        s.broken_cluster = broken_cluster;
        Ok(s)
    }

    fn wait_change(&mut self, timeout: Duration) -> bool {
        let st = self.shared.state.lock().expect("state");
        let seen = self.seen;
        let (st, _) = self
            .shared
            .changed
            // Only a new event wakes us: a fatal error is reported once (its own event), then
            // this waits like any quiet source instead of returning at once forever.
            .wait_timeout_while(st, timeout, |s| s.generation == seen)
            .expect("state");
        st.generation != seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source whose watchers have listed `objects` (per kind, in [`KINDS`] order: key ->
    /// object); the kinds not given are listed and empty.
    fn listed<const N: usize>(objects: [Vec<(&str, Value)>; N]) -> KubeApiSource {
        let shared = Arc::new(Shared::default());
        {
            let mut st = shared.state.lock().unwrap();
            st.ready = [true; KINDS.len()];
            for (i, objs) in objects.into_iter().enumerate() {
                st.objects[i] = objs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            }
        }
        KubeApiSource {
            shared,
            seen: 0,
            initial_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn cluster_scoped_objects_are_read_and_their_errors_break_no_namespace() {
        let node = |name: &str, heartbeat: &str| {
            node_shape(
                serde_json::json!({"kind": "Node", "metadata": {"name": name,
                "labels": {"role": "worker"}, "resourceVersion": heartbeat},
                "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.1"}],
                    "conditions": [{"type": "Ready", "lastHeartbeatTime": heartbeat}]}}),
            )
        };
        // A heartbeat is no change: what is kept of a Node is the same.
        assert_eq!(node("n1", "1"), node("n1", "2"));
        let cnp = |name: &str, tier: &str| {
            // As the API serves it; kind and apiVersion come from the resource anyway.
            serde_json::json!({"metadata": {"name": name},
                "spec": {"tier": tier, "priority": 1, "subject": {"namespaces": {}}}})
        };
        let mut src = listed([
            vec![(
                "/a",
                serde_json::json!({"kind": "Namespace", "metadata": {"name": "a"}}),
            )],
            vec![],
            vec![],
            vec![
                ("/n1", node("n1", "1")),
                (
                    "/n2",
                    serde_json::json!({"metadata": {"name": "n2"},
                        "status": {"addresses": [{"type": "ExternalIP", "address": "x"}]}}),
                ),
            ],
            vec![("/good", cnp("good", "Admin")), ("/bad", cnp("bad", "Top"))],
            vec![],
            vec![(
                "/default",
                serde_json::json!({"metadata": {"name": "default"}, "spec": {"subject": {"namespaces": {}}}}),
            )],
        ]);
        let s = src.snapshot().unwrap();
        let keys: Vec<String> = s.cluster_policies.iter().map(|p| p.key()).collect();
        assert_eq!(keys, ["cnp/good", "banp/default"]);
        assert_eq!(s.nodes.len(), 1);
        let errors: Vec<String> = s.broken_cluster.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            errors,
            [
                r#"Node n2: status.addresses[0].address: "x" is not an IP address"#,
                r#"ClusterNetworkPolicy bad: spec.tier: "Top" is not one of Admin, Baseline"#,
            ]
        );
        assert!(s.broken.is_empty());
        assert!(s.broken_cluster.iter().all(|e| e.namespace.is_none()));
    }

    #[test]
    fn an_object_that_cannot_be_read_breaks_only_its_namespace() {
        let pod = |ns: &str, name: &str, ip: &str| {
            serde_json::json!({"kind": "Pod", "metadata": {"name": name, "namespace": ns},
                "spec": {"nodeName": "n1"}, "status": {"podIP": ip}})
        };
        let mut src = listed([
            vec![
                (
                    "/a",
                    serde_json::json!({"kind": "Namespace", "metadata": {"name": "a"}}),
                ),
                (
                    "/c",
                    serde_json::json!({"kind": "Namespace", "metadata": {"name": "c", "labels": "x"}}),
                ),
            ],
            vec![
                ("a/p", pod("a", "p", "10.0.0.1")),
                ("b/q", pod("b", "q", "10.0.0.2")),
                ("c/r", pod("c", "r", "10.0.0.3")),
            ],
            vec![
                (
                    "a/bad",
                    serde_json::json!({"kind": "NetworkPolicy", "metadata": {"name": "bad", "namespace": "a"},
                        "spec": {"ingress": [{"from": [{"ipBlock": {"cidr": "not-a-cidr"}}]}]}}),
                ),
                (
                    "b/good",
                    serde_json::json!({"kind": "NetworkPolicy", "metadata": {"name": "good", "namespace": "b"},
                        "spec": {"ingress": [{"from": [{"ipBlock": {"cidr": "010.0.0.1/8"}}]}]}}),
                ),
            ],
        ]);
        let s = src.snapshot().unwrap();
        let broken: Vec<&str> = s.broken.keys().map(String::as_str).collect();
        assert_eq!(broken, ["a", "c"]);
        let e = &s.broken["a"][0];
        assert_eq!(
            e.to_string(),
            r#"NetworkPolicy a/bad: spec.ingress[0].from[0].ipBlock.cidr: "not-a-cidr" is not a CIDR"#
        );
        assert_eq!(
            s.broken["c"][0].to_string(),
            r#"Namespace c: metadata.labels: invalid type: string "x", expected a map"#
        );
        // Everything readable is there: b's policy (a CIDR the API server accepts) and all
        // three pods (a's and c's still own their addresses; they are just closed).
        assert_eq!(s.policies.len(), 1);
        assert_eq!(s.policies[0].key(), "b/good");
        assert_eq!(s.pods.len(), 3);
    }
}
