//! Lab tests of what twilld shows of itself, with real daemons in an etcd-mode cluster as the
//! quick start runs it: `/metrics` scraped from inside the node's namespace follows what the
//! test does (a peer added, a route deleted by hand, a VXLAN packet from a non-peer), and
//! `twilld status --output json` matches the kernel's entries read with `ip -j` and
//! `bridge -j`, and names a lasting mismatch with exit status 1. Root only.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Instant;

use common::{cluster, Cluster, DEADLINE, POLL};
use serde_json::Value;

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HEALTHZ_PORT: u16 = 8081;

fn healthz_flags() -> [String; 2] {
    [
        format!("--healthz-port={HEALTHZ_PORT}"),
        "--healthz-ip=127.0.0.1".to_string(),
    ]
}

/// The value of the sample `series` (name with labels, e.g. `twilld_peers_known` or
/// `twilld_drift_repairs_total{component="peers"}`) in a scrape; `None` when absent.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn scrape(c: &Cluster, node: &str) -> String {
    c.http_get(node, HEALTHZ_PORT, "/metrics")
}

/// Waits until `series` on `node` satisfies `pred`; its value then.
fn wait_metric(c: &Cluster, node: &str, series: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = scrape(c, node);
        if let Some(v) = sample(&text, series).filter(|v| pred(*v)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{series} on {node} never as wanted; last scrape:\n{text}\nlog:\n{}",
            c.log(node)
        );
        std::thread::sleep(POLL);
    }
}

/// `twilld status --output json` against `node`'s socket (twill-policy not asked): the exit
/// code and the JSON.
fn status(c: &Cluster, node: &str) -> (i32, Value) {
    let socket = c.lab.node(node).twilld_socket();
    let out = Command::new(common::twilld_bin())
        .args(["status", "--output", "json", "--policy-socket", ""])
        .arg("--twilld-socket")
        .arg(&socket)
        .output()
        .expect("run twilld status");
    let text = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "twilld status: not JSON ({e}):\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().expect("exit code"), json)
}

/// twill's entries on `node` as the kernel lists them (`ip -j route`, `ip -j neigh`,
/// `bridge -j fdb`), in the status's one-line text.
fn kernel_entries(c: &Cluster, node: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for r in c
        .ip_json(node, &["route", "show", "table", "main"])
        .as_array()
        .unwrap()
    {
        let (Some(dst), Some(gw)) = (r["dst"].as_str(), r["gateway"].as_str()) else {
            continue;
        };
        if !dst.starts_with("10.244.") {
            continue;
        }
        let onlink = r["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "onlink"));
        out.insert(format!(
            "route {dst} via {gw} dev {}{}",
            r["dev"].as_str().unwrap(),
            if onlink { " onlink" } else { "" }
        ));
    }
    for n in c
        .ip_json(node, &["neigh", "show", "dev", "flannel.1"])
        .as_array()
        .unwrap()
    {
        let permanent = n["state"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x == "PERMANENT"));
        if permanent {
            out.insert(format!(
                "neighbor {} lladdr {} dev flannel.1",
                n["dst"].as_str().unwrap(),
                n["lladdr"].as_str().unwrap()
            ));
        }
    }
    for f in c
        .bridge_json(node, &["fdb", "show", "dev", "flannel.1"])
        .as_array()
        .unwrap()
    {
        if let Some(dst) = f["dst"].as_str() {
            out.insert(format!(
                "fdb {} dst {dst} dev flannel.1",
                f["mac"].as_str().unwrap()
            ));
        }
    }
    out
}

/// Every entry the status says the kernel holds (per peer, and stale).
fn status_kernel(status: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for p in status["twilld"]["peers"].as_array().unwrap() {
        for e in p["kernel"].as_array().unwrap() {
            out.insert(e.as_str().unwrap().to_string());
        }
    }
    for e in status["twilld"]["stale_kernel_entries"].as_array().unwrap() {
        out.insert(e.as_str().unwrap().to_string());
    }
    out
}

/// Waits until the status of `node` and the kernel's listing agree, read back to back (a
/// pass in between makes them differ for one round), and returns that status.
fn status_matching_kernel(c: &Cluster, node: &str) -> (i32, Value) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (code, s) = status(c, node);
        let kernel = kernel_entries(c, node);
        if status_kernel(&s) == kernel {
            return (code, s);
        }
        assert!(
            Instant::now() < deadline,
            "status never matched the kernel:\nstatus {s:#}\nkernel {kernel:#?}"
        );
        std::thread::sleep(POLL);
    }
}

fn n2_route(c: &Cluster) -> String {
    let env = twill_formats::subnet_env::SubnetEnv::read(&c.subnet_file("n2")).unwrap();
    let subnet = env.subnet_network().expect("n2's subnet");
    subnet.to_string()
}

#[test]
fn metrics_follow_peers_drift_repairs_and_guard_drops() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("obsm", &["n1", "n2", "n3"], VXLAN);
    let hz = healthz_flags();
    c.start("n1", &[&hz[0], &hz[1]]);
    c.wait_ready("n1");
    let first = wait_metric(&c, "n1", "twilld_reconciles_total{result=\"ok\"}", |v| {
        v >= 1.0
    });
    assert!(first >= 1.0);
    let text = scrape(&c, "n1");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{text}"
    );
    assert_eq!(sample(&text, "twilld_peers_known"), Some(0.0), "{text}");
    // etcd mode: the lease expires in about a day (Flannel's TTL), computed at the scrape.
    let expiry = sample(&text, "twilld_lease_expiry_seconds").expect("lease expiry");
    assert!(
        expiry > 23.0 * 3600.0 && expiry <= 24.0 * 3600.0,
        "{expiry}"
    );

    // A node added: known and programmed grow, and route/neighbour/FDB replaces are counted.
    c.start("n2", &[]);
    c.wait_ready("n2");
    wait_metric(&c, "n1", "twilld_peers_known", |v| v == 1.0);
    wait_metric(&c, "n1", "twilld_peers_programmed", |v| v == 1.0);
    let text = scrape(&c, "n1");
    for kind in ["route_replace", "neighbor_replace", "fdb_replace"] {
        let series = format!("twilld_kernel_operations_total{{kind=\"{kind}\"}}");
        assert!(sample(&text, &series) >= Some(1.0), "{series}:\n{text}");
    }
    let repairs = "twilld_drift_repairs_total{component=\"peers\"}";
    let before = sample(&text, repairs).expect("repairs series");

    // A route deleted by hand: put back, and counted as a drift repair.
    let route = n2_route(&c);
    c.lab
        .exec_ok(&c.ns("n1"), &["ip", "route", "del", &route])
        .expect("delete the route");
    wait_metric(&c, "n1", repairs, |v| v > before);
    let deadline = Instant::now() + DEADLINE;
    while !c
        .entries("n1", "flannel.1")
        .routes
        .iter()
        .any(|r| r.starts_with(&route))
    {
        assert!(Instant::now() < deadline, "route {route} not put back");
        std::thread::sleep(POLL);
    }

    // A VXLAN packet from a node that holds no lease: dropped by the underlay guard, counted.
    let guard = "twilld_underlay_guard_dropped_packets_total{rule=\"vxlan_from_non_peer\"}";
    let dropped = sample(&scrape(&c, "n1"), guard).expect("guard series");
    let n1_addr = c.lab.node("n1").addr;
    let send = format!("echo not-a-peer > /dev/udp/{n1_addr}/8472");
    c.lab
        .exec_ok(&c.ns("n3"), &["bash", "-c", &send])
        .expect("send a VXLAN packet from n3");
    wait_metric(&c, "n1", guard, |v| v > dropped);
}

#[test]
fn status_matches_the_kernel_and_names_a_lasting_mismatch() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("obss", &["n1", "n2", "n3"], VXLAN);
    let hz = healthz_flags();
    c.start("n1", &[&hz[0], &hz[1]]);
    c.start("n2", &[]);
    c.start("n3", &[]);
    for n in ["n1", "n2", "n3"] {
        c.wait_ready(n);
    }
    // Both peers programmed: the status equals the kernel's listing, in sync, exit 0.
    let deadline = Instant::now() + DEADLINE;
    let (code, s) = loop {
        let (code, s) = status_matching_kernel(&c, "n1");
        if s["twilld"]["peers"].as_array().unwrap().len() == 2 && code == 0 {
            break (code, s);
        }
        assert!(
            Instant::now() < deadline,
            "never healthy with 2 peers: {s:#}"
        );
        std::thread::sleep(POLL);
    };
    assert_eq!(code, 0);
    assert_eq!(s["problems"], Value::Array(vec![]), "{s:#}");
    let t = &s["twilld"];
    assert_eq!(t["ready"], true);
    assert_eq!(t["backend"], "vxlan");
    let env = twill_formats::subnet_env::SubnetEnv::read(&c.subnet_file("n1")).unwrap();
    assert_eq!(
        t["lease"]["subnet"],
        env.subnet_network().unwrap().to_string()
    );
    assert_eq!(t["lease"]["public_ip"], c.lab.node("n1").addr.to_string());
    assert_eq!(t["lease"]["vtep_mac"], c.mac("n1", "flannel.1"));
    assert!(t["lease"]["expires_in_seconds"].as_i64().unwrap() > 23 * 3600);
    for p in t["peers"].as_array().unwrap() {
        assert_eq!(p["desired"], p["kernel"], "{p:#}");
        assert_eq!(p["desired"].as_array().unwrap().len(), 3, "{p:#}");
    }
    let guard = &t["underlay_guard"];
    assert_eq!(guard["desired_peers"], guard["kernel_peers"]);
    let peers: Vec<String> = ["n2", "n3"]
        .iter()
        .map(|n| c.lab.node(n).addr.to_string())
        .collect();
    assert_eq!(guard["kernel_peers"], serde_json::json!(peers));

    // A route deleted by hand: whatever the status shows at each moment is what the kernel
    // holds, and once put back the peer is in sync again.
    let route = n2_route(&c);
    c.lab
        .exec_ok(&c.ns("n1"), &["ip", "route", "del", &route])
        .expect("delete the route");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (code, s) = status_matching_kernel(&c, "n1");
        let back = status_kernel(&s)
            .iter()
            .any(|e| e.starts_with(&format!("route {route} ")));
        if back && code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "route {route} never back: {s:#}");
        std::thread::sleep(POLL);
    }

    // A lease twill cannot program (a host-gw lease in a VXLAN network): a lasting problem,
    // named, with exit status 1.
    c.lab
        .etcdctl(&[
            "put",
            "/coreos.com/network/subnets/10.244.200.0-24",
            r#"{"PublicIP":"198.18.0.99","BackendType":"host-gw"}"#,
        ])
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    let s = loop {
        let (code, s) = status(&c, "n1");
        if code == 1 {
            break s;
        }
        assert_eq!(code, 0, "{s:#}");
        assert!(
            Instant::now() < deadline,
            "the skipped lease never shown: {s:#}"
        );
        std::thread::sleep(POLL);
    };
    let problems: Vec<&str> = s["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(
        problems,
        ["peer lease 10.244.200.0-24 skipped: lease 10.244.200.0-24: BackendType: is \"host-gw\", this node uses \"vxlan\""]
    );
    let skipped = "twilld_peer_leases_skipped{reason=\"backend_type_mismatch\"}";
    assert_eq!(sample(&scrape(&c, "n1"), skipped), Some(1.0));
    assert_eq!(s["twilld"]["skipped_peers"][0]["lease"], "10.244.200.0-24");
    // The table names it too.
    let socket = c.lab.node("n1").twilld_socket();
    let out = Command::new(common::twilld_bin())
        .args(["status", "--policy-socket", ""])
        .arg("--twilld-socket")
        .arg(&socket)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{table}");
    assert!(table.contains("Skipped leases (1):"), "{table}");
    assert!(table.contains("10.244.200.0-24"), "{table}");
    assert!(table.contains("Problems (1):"), "{table}");

    // twilld gone: unreachable is a problem too.
    c.kill("n1", twill_lab::Signal::SIGTERM);
    let (code, s) = status(&c, "n1");
    assert_eq!(code, 1);
    let problem = s["problems"][0].as_str().unwrap();
    assert!(problem.starts_with("twilld unreachable: "), "{problem}");
    assert_eq!(s["twilld"], Value::Null);
}

#[test]
fn status_usage_errors_exit_2() {
    let out = Command::new(common::twilld_bin())
        .args(["status", "--output", "yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--output"), "{err}");
}
