//! Root-only (~25 s): `twill-policy run` reading cluster-scoped policy from a real (fake) API
//! server, on a lab node with two pods on its bridge.
//!
//! - The `policy.networking.k8s.io` resources answer 404 (CRDs not installed): the source is
//!   ready anyway, the NetworkPolicy that isolates x/b is enforced (a -> b refused, `/readyz`
//!   200), and the missing kinds are logged.
//! - The ClusterNetworkPolicy CRD is installed with a policy the parser rejects: it is picked
//!   up on a retry, logged with field and value, counted as a source error, breaks no
//!   namespace (the NetworkPolicy is still enforced), and the snapshot is not a good one:
//!   `/readyz` turns 503 after `--ready-max-age`.
//! - The policy fixed: `/readyz` 200 again.
//!
//! The API server and the HTTP clients run on threads that entered the node's namespace.

use std::time::{Duration, Instant};

use serde_json::json;
use twill_fake_apiserver::{FakeApiServer, POLICY_GROUP, POLICY_RESOURCES};
use twill_lab::Lab;

mod common;
use common::{connects, http_get, node_with_pods_a_and_b, policy_bin, serve_api_in, wait_for};

const HEALTH: &str = "127.0.0.1:9754";
const METRICS: &str = "127.0.0.1:9753";
const API: &str = "127.0.0.1:16443";
/// `--ready-max-age`: above the loop's 10 s heartbeat, so a good state never flaps.
const READY_MAX_AGE: u64 = 15;

fn code(netns: &str, path: &str) -> Option<u16> {
    http_get(netns, HEALTH, path).map(|(c, _)| c)
}

fn metrics(netns: &str) -> String {
    http_get(netns, METRICS, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

fn pod(name: &str, ip: &str) -> serde_json::Value {
    json!({"metadata": {"name": name, "namespace": "x", "labels": {"pod": name}},
           "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn cnp(priority: i64) -> serde_json::Value {
    json!({"metadata": {"name": "tenants"},
           "spec": {"tier": "Admin", "priority": priority, "subject": {"namespaces": {}},
                    "ingress": [{"action": "Pass", "from": [{"namespaces": {}}]}]}})
}

#[test]
fn cluster_policy_sources_without_crds_and_with_a_broken_policy() {
    if !twill_lab::require_root() {
        return;
    }
    let mut lab = Lab::new("polcnp").unwrap();
    let (node, a, _b) = node_with_pods_a_and_b(&mut lab);

    let srv = FakeApiServer::new();
    for r in POLICY_RESOURCES {
        srv.set_absent(r, true);
    }
    srv.put("", "namespaces", "", json!({"metadata": {"name": "x"}}));
    srv.put("", "pods", "x", pod("a", "10.244.1.2"));
    srv.put("", "pods", "x", pod("b", "10.244.1.3"));
    srv.put(
        "networking.k8s.io",
        "networkpolicies",
        "x",
        json!({"metadata": {"name": "isolate-b", "namespace": "x"},
               "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}}),
    );
    serve_api_in(&node.netns, &srv, API);
    let bin = policy_bin().display().to_string();
    let max_age = READY_MAX_AGE.to_string();
    let id = lab
        .spawn(
            &node.netns,
            "policy",
            &[
                bin.as_str(),
                "--kube-api-url",
                &format!("http://{API}"),
                "--pod-cidr",
                "10.244.1.0/24",
                "run",
                "--status-socket",
                node.dir.join("policy.sock").to_str().unwrap(),
                "--ready-max-age",
                &max_age,
            ],
            &[("NODE_NAME", "n1"), ("NO_COLOR", "1")],
        )
        .unwrap();

    // Without the CRDs: ready, and the NetworkPolicy enforced.
    wait_for(
        "/readyz 200 without the CRDs",
        || code(&node.netns, "/readyz") == Some(200),
        || lab.log(id),
    );
    assert!(!connects(&lab, &a.netns, "10.244.1.3"), "{}", lab.log(id));
    let log = lab.log(id);
    for kind in [
        "ClusterNetworkPolicy",
        "AdminNetworkPolicy",
        "BaselineAdminNetworkPolicy",
    ] {
        assert!(
            log.lines().any(|l| l.contains("does not serve this kind")
                && l.contains(&format!("kind=\"{kind}\""))),
            "{kind} not logged as absent:\n{log}"
        );
    }

    // The CRD installed, with a policy that cannot be read (priority out of range).
    srv.put(POLICY_GROUP, "clusternetworkpolicies", "", cnp(5000));
    srv.set_absent("clusternetworkpolicies", false);
    let t0 = Instant::now();
    wait_for(
        "the broken ClusterNetworkPolicy logged",
        || {
            lab.log(id).contains(
                "ClusterNetworkPolicy tenants: spec.priority: 5000 must be between 0 and 1000",
            )
        },
        || lab.log(id),
    );
    wait_for(
        "a source error counted",
        || metrics(&node.netns).contains("twill_policy_sync_errors_total{kind=\"source\"}"),
        || metrics(&node.netns),
    );
    let m = metrics(&node.netns);
    assert!(m.contains("twill_policy_broken_namespaces 0"), "{m}");
    assert!(!connects(&lab, &a.netns, "10.244.1.3"), "{}", lab.log(id));
    // Not good: /readyz fails once the last good snapshot is older than the max age.
    let deadline = Instant::now() + Duration::from_secs(READY_MAX_AGE + 30);
    while code(&node.netns, "/readyz") != Some(503) {
        assert!(Instant::now() < deadline, "still ready:\n{}", lab.log(id));
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "/readyz 503 {:.1} s after the broken policy was written",
        t0.elapsed().as_secs_f64()
    );

    // Fixed: good again.
    srv.put(POLICY_GROUP, "clusternetworkpolicies", "", cnp(5));
    wait_for(
        "/readyz 200 after the fix",
        || code(&node.netns, "/readyz") == Some(200),
        || lab.log(id),
    );
    assert!(lab.is_running(id), "{}", lab.log(id));
    lab.teardown().unwrap();
}
