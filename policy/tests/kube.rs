//! Must-be-shown 4 and 5 for twill-policy: the upstream conformance scenarios with namespaces,
//! pods and policies served by the fake Kubernetes API server instead of files. For every
//! step the objects are changed through the API (labels updated, policies deleted and
//! created), the API source follows through its watches, and then (a) the snapshot it yields
//! compiles, for each of the three nodes, to exactly the nftables table compiled from the
//! step's own objects (as from files), and (b) every probe of the step gives the expected
//! verdict for all 72 pairs. Every third step is made while the watches are cut, and every
//! sixth also compacts the history, so the source must resume or re-list (410) without losing
//! a deletion. The server runs in-process on 127.0.0.1 (loopback only); no root needed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use twill_fake_apiserver::{FakeApiServer, POLICY_GROUP, POLICY_RESOURCES};
use twill_policy::compile::{compile, Options};
use twill_policy::eval::{allowed, Endpoint};
use twill_policy::model::{Pod, Snapshot, Tier};
use twill_policy::source::kube::{KubeApiSource, KubeOptions};
use twill_policy::source::Source;
use twill_policy_testkit::conformance::{
    load_scenarios, namespaces, pairs, pods, step_snapshot, substitute_ips, SCENARIOS,
};

const NP: &str = "networking.k8s.io";

fn pod_json(p: &Pod) -> Value {
    let ports: Vec<Value> = p
        .ports
        .iter()
        .map(|c| json!({"name": c.name, "containerPort": c.port, "protocol": c.protocol.nft().to_uppercase()}))
        .collect();
    json!({
        "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
        "spec": {"nodeName": p.node, "containers": [{"name": "c", "ports": ports}]},
        "status": {"phase": p.phase, "podIP": p.ips[0].to_string(),
                   "podIPs": p.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>()},
    })
}

fn start_server() -> (FakeApiServer, String) {
    let srv = FakeApiServer::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let s = srv.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            s.serve_tcp(l).await.unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    (srv, format!("http://{addr}"))
}

fn rendered(snap: &Snapshot) -> Vec<String> {
    ["n1", "n2", "n3"]
        .iter()
        .map(|n| compile(snap, n, &Options::default()).render())
        .collect()
}

#[test]
fn conformance_scenarios_with_objects_from_the_api() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let scenarios = load_scenarios(SCENARIOS).unwrap();
    let (srv, url) = start_server();
    let empty = Default::default();
    for ns in namespaces(&empty) {
        srv.put(
            "",
            "namespaces",
            "",
            json!({"metadata": {"name": ns.name, "labels": ns.labels}}),
        );
    }
    for p in pods(&empty) {
        srv.put("", "pods", &p.namespace, pod_json(&p));
    }
    let mut src = KubeApiSource::start(KubeOptions {
        api_url: url,
        ..KubeOptions::default()
    });
    let mut live: BTreeSet<(String, String)> = BTreeSet::new();
    let (mut steps, mut checked, mut failures) = (0usize, 0usize, Vec::new());
    for sc in &scenarios {
        for (si, step) in sc.steps.iter().enumerate() {
            steps += 1;
            let cut = steps % 3 == 0;
            if cut {
                srv.hold();
            }
            // The step's world through the API.
            for ns in namespaces(&step.namespace_labels) {
                srv.put(
                    "",
                    "namespaces",
                    "",
                    json!({"metadata": {"name": ns.name, "labels": ns.labels}}),
                );
            }
            for p in pods(&step.pod_labels) {
                srv.put("", "pods", &p.namespace, pod_json(&p));
            }
            let mut want_live = BTreeSet::new();
            for pol in &step.policies {
                let v: Value =
                    serde_json::from_str(&substitute_ips(&pol.to_string()).unwrap()).unwrap();
                let ns = v["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string();
                let name = v["metadata"]["name"].as_str().unwrap().to_string();
                srv.put(NP, "networkpolicies", &ns, v);
                want_live.insert((ns, name));
            }
            for (ns, name) in live.difference(&want_live) {
                srv.delete("networkpolicies", ns, name);
            }
            live = want_live;
            if cut {
                if steps % 6 == 0 {
                    srv.compact();
                }
                std::thread::sleep(Duration::from_millis(50));
                srv.release();
            }
            // The source converges on the step's world.
            let want = step_snapshot(step).unwrap();
            let want_tables = rendered(&want);
            let deadline = Instant::now() + Duration::from_secs(30);
            let snap = loop {
                match src.snapshot() {
                    Ok(s) if rendered(&s) == want_tables => break s,
                    Ok(_) | Err(_) if Instant::now() > deadline => {
                        let reqs = srv.requests();
                        let tail: Vec<String> = reqs
                            .iter()
                            .rev()
                            .take(8)
                            .map(|r| format!("{} {} {}", r["method"], r["path"], r["query"]))
                            .collect();
                        panic!("{} step {si}: the API source did not converge on the step's objects: {:?}\nlast requests: {tail:#?}", sc.id, src.snapshot().map(|s| rendered(&s) == want_tables))
                    }
                    _ => {
                        src.wait_change(Duration::from_millis(200));
                    }
                }
            };
            for probe in &step.probes {
                for (s, d) in pairs() {
                    let from = Endpoint::pod(snap.pod(&s).unwrap());
                    let to = Endpoint::pod(snap.pod(&d).unwrap());
                    let v = allowed(&snap, &from, &to, probe.port, probe.protocol);
                    let want_denied = probe.expect_denied.contains(&format!("{s}->{d}"));
                    checked += 1;
                    if v.allowed == want_denied {
                        failures.push(format!(
                            "{} step {si} {}/{} {s}->{d}: got allowed={}",
                            sc.id, probe.protocol, probe.port, v.allowed
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(checked, 65 * 72);
    // The source used only the verbs it declares.
    let declared: BTreeSet<(String, String)> = twill_policy::source::kube::API_VERBS
        .iter()
        .map(|(r, v)| (r.to_string(), v.to_string()))
        .collect();
    for r in srv.requests() {
        let watch = r["query"]["watch"] == "true";
        let verb = if watch { "watch" } else { "list" };
        assert_eq!(r["method"], "GET", "{r}");
        let key = (
            r["resource"].as_str().unwrap().to_string(),
            verb.to_string(),
        );
        assert!(declared.contains(&key), "undeclared {key:?}");
    }
    let relists = srv
        .requests()
        .iter()
        .filter(|r| r["query"]["watch"].is_null())
        .count();
    assert!(relists > 3, "the 410s caused no re-list ({relists} lists)");
    eprintln!("{steps} steps through the API, {checked} pairs, all as expected; {relists} lists");
}

/// A server that accepts connections and never answers: the source drops each silent
/// connection after its read timeout, logs it, and tries again (it used to wait forever).
#[test]
fn a_silent_api_server_does_not_stall_the_source() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(c); // open and silent
        }
    });
    let mut src = KubeApiSource::start(KubeOptions {
        api_url: format!("http://{addr}"),
        read_timeout: Duration::from_secs(1),
        ..KubeOptions::default()
    });
    src.initial_timeout = Duration::from_millis(100);
    // Every list hangs on its first connection; after the read timeout each is dropped and
    // retried after its backoff, on a new connection.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let err = src.snapshot().unwrap_err().to_string();
        let n = accepted.load(std::sync::atomic::Ordering::SeqCst);
        if n >= 6 && err.contains("last error") {
            assert!(err.contains("no initial list of"), "{err}");
            assert!(
                err.to_lowercase().contains("timed out") || err.to_lowercase().contains("timeout"),
                "{err}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{n} connections; {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits (generously) until the source's snapshot satisfies `done`; panics with `what` and
/// the last snapshot's cluster policies and errors otherwise.
fn converge(src: &mut KubeApiSource, what: &str, done: impl Fn(&Snapshot) -> bool) -> Snapshot {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = src.snapshot();
        match s {
            Ok(s) if done(&s) => return s,
            other if Instant::now() > deadline => {
                let shown = other.map(|s| {
                    let keys: Vec<(String, u16)> = s
                        .cluster_policies
                        .iter()
                        .map(|p| (p.key(), p.priority))
                        .collect();
                    let errors: Vec<String> =
                        s.broken_cluster.iter().map(|e| e.to_string()).collect();
                    (keys, errors, s.policies.len(), s.nodes.len())
                });
                panic!("{what}: the API source did not get there: {shown:?}")
            }
            _ => {
                src.wait_change(Duration::from_millis(200));
            }
        }
    }
}

fn cnp(name: &str, priority: i64) -> Value {
    json!({"metadata": {"name": name}, "spec": {"tier": "Admin", "priority": priority,
        "subject": {"namespaces": {"matchLabels": {"tenant": "a"}}},
        "ingress": [{"name": "no-b", "action": "Deny", "from": [{"namespaces": {"matchLabels": {"tenant": "b"}}}]}]}})
}

fn keys(s: &Snapshot) -> Vec<(String, u16)> {
    s.cluster_policies
        .iter()
        .map(|p| (p.key(), p.priority))
        .collect()
}

/// ClusterNetworkPolicies, AdminNetworkPolicies, the BaselineAdminNetworkPolicy and Nodes
/// created, changed and deleted through the API show in the source's snapshots; one the
/// parser rejects is reported in `broken_cluster`, and with the last enforced snapshot its
/// last readable version stays in force (as `run` does it).
#[test]
fn cluster_policies_and_nodes_from_the_api() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let (srv, url) = start_server();
    srv.put(
        "",
        "nodes",
        "",
        json!({"metadata": {"name": "n1", "labels": {"role": "worker"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.1"},
                                     {"type": "Hostname", "address": "n1"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    srv.put(
        POLICY_GROUP,
        "clusternetworkpolicies",
        "",
        cnp("deny-b", 10),
    );
    let mut src = KubeApiSource::start(KubeOptions {
        api_url: url,
        ..KubeOptions::default()
    });
    let s = converge(&mut src, "first CNP", |s| {
        keys(s) == [("cnp/deny-b".into(), 10)]
    });
    assert_eq!(s.cluster_policies[0].tier, Tier::Admin);
    assert_eq!(s.cluster_policies[0].ingress[0].name, "no-b");
    assert_eq!(s.nodes.len(), 1);
    assert_eq!(
        s.nodes[0].addresses,
        vec!["198.18.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
    // Changed, and joined by an ANP and the BANP.
    srv.put(
        POLICY_GROUP,
        "clusternetworkpolicies",
        "",
        cnp("deny-b", 20),
    );
    srv.put(
        POLICY_GROUP,
        "adminnetworkpolicies",
        "",
        json!({"metadata": {"name": "dns"}, "spec": {"priority": 1, "subject": {"namespaces": {}},
            "egress": [{"action": "Allow", "to": [{"nodes": {}}], "ports": [{"portNumber": {"protocol": "UDP", "port": 53}}]}]}}),
    );
    srv.put(
        POLICY_GROUP,
        "baselineadminnetworkpolicies",
        "",
        json!({"metadata": {"name": "default"}, "spec": {"subject": {"namespaces": {}},
            "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}}),
    );
    let enforced = converge(&mut src, "changed CNP, ANP, BANP", |s| {
        keys(s)
            == [
                ("anp/dns".into(), 1),
                ("cnp/deny-b".into(), 20),
                ("banp/default".into(), 1000),
            ]
    });
    assert!(
        enforced.broken_cluster.is_empty(),
        "{:?}",
        enforced.broken_cluster
    );
    // A broken edit: reported, and left out of the source's snapshot; the last enforced
    // snapshot's version stays in force.
    srv.put(
        POLICY_GROUP,
        "clusternetworkpolicies",
        "",
        cnp("deny-b", 5000),
    );
    let mut s = converge(&mut src, "broken CNP", |s| !s.broken_cluster.is_empty());
    assert_eq!(
        s.broken_cluster[0].to_string(),
        "ClusterNetworkPolicy deny-b: spec.priority: 5000 must be between 0 and 1000"
    );
    assert!(
        s.broken.is_empty(),
        "a cluster-scoped error breaks no namespace"
    );
    assert_eq!(
        keys(&s),
        [("anp/dns".into(), 1), ("banp/default".into(), 1000)]
    );
    s.keep_readable_cluster_policies(&enforced);
    assert_eq!(keys(&s), keys(&enforced));
    // Deleted: gone, and so is its error. A Node's status changes that leave its addresses
    // alone are no change.
    srv.delete("clusternetworkpolicies", "", "deny-b");
    srv.delete("adminnetworkpolicies", "", "dns");
    let s = converge(&mut src, "deleted CNP and ANP", |s| {
        keys(s) == [("banp/default".into(), 1000)] && s.broken_cluster.is_empty()
    });
    assert_eq!(s.nodes.len(), 1);
    // The source used only the verbs it declares, on the versions the CRDs serve.
    for r in srv.requests() {
        let path = r["path"].as_str().unwrap();
        match r["resource"].as_str().unwrap() {
            "clusternetworkpolicies" => {
                assert!(
                    path.starts_with("/apis/policy.networking.k8s.io/v1alpha2/"),
                    "{path}"
                )
            }
            "adminnetworkpolicies" | "baselineadminnetworkpolicies" => {
                assert!(
                    path.starts_with("/apis/policy.networking.k8s.io/v1alpha1/"),
                    "{path}"
                )
            }
            _ => {}
        }
    }
}

/// Without the `policy.networking.k8s.io` CRDs (404) the source is ready and NetworkPolicies
/// are enforced as before; a CRD installed later is picked up, and a 404 after that keeps its
/// policies.
#[test]
fn without_the_crds_network_policies_are_enforced_and_a_crd_installed_later_is_read() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let (srv, url) = start_server();
    for r in POLICY_RESOURCES {
        srv.set_absent(r, true);
    }
    srv.put("", "namespaces", "", json!({"metadata": {"name": "a"}}));
    srv.put(
        NP,
        "networkpolicies",
        "a",
        json!({"metadata": {"name": "deny-all", "namespace": "a"}, "spec": {"podSelector": {}}}),
    );
    let mut src = KubeApiSource::start(KubeOptions {
        api_url: url,
        ..KubeOptions::default()
    });
    src.initial_timeout = Duration::from_secs(60);
    let s = src.snapshot().expect("ready without the CRDs");
    assert_eq!(s.policies.len(), 1);
    assert_eq!(s.policies[0].key(), "a/deny-all");
    assert!(s.cluster_policies.is_empty() && s.broken_cluster.is_empty());
    // The CRD is installed and a policy created: the source finds it on a retry.
    srv.put(POLICY_GROUP, "clusternetworkpolicies", "", cnp("late", 3));
    srv.set_absent("clusternetworkpolicies", false);
    let s = converge(&mut src, "CRD installed later", |s| {
        keys(s) == [("cnp/late".into(), 3)]
    });
    assert_eq!(s.policies.len(), 1);
    // Then the server answers 404 for it again (as an API server does for a while after a
    // restart): the watch is cut, the source asks again and gets the 404, and keeps the
    // policy rather than lifting it.
    let asked_before = cnp_requests(&srv);
    srv.set_absent("clusternetworkpolicies", true);
    let deadline = Instant::now() + Duration::from_secs(60);
    while cnp_requests(&srv) <= asked_before {
        assert!(
            Instant::now() < deadline,
            "the source never asked again after the cut"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The answer (404) is handled on the watcher's thread; give it time to land.
    src.wait_change(Duration::from_secs(1));
    let s = src.snapshot().expect("snapshot after a 404");
    assert_eq!(
        keys(&s),
        [("cnp/late".into(), 3)],
        "a 404 lifted the policy"
    );
    assert_eq!(s.policies.len(), 1);
}

/// Requests for ClusterNetworkPolicies the fake API server has seen.
fn cnp_requests(srv: &FakeApiServer) -> usize {
    srv.requests()
        .iter()
        .filter(|r| r["resource"] == "clusternetworkpolicies")
        .count()
}
