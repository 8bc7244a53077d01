//! Lab tests of twilld in Kubernetes mode: the fake
//! API server (`twill-fake-apiserver`) runs in the lab's switch namespace on 198.18.0.1:6443,
//! twilld runs on each node with `--kube-subnet-mgr --kube-api-url=...` and `NODE_NAME`. The
//! test drives the API server through its Unix control socket (no packet leaves a lab
//! namespace). Root only, except the RBAC check.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Cluster, DEADLINE};
use serde_json::{json, Value};
use twill_fake_apiserver::client;
use twill_lab::{Ipv4Net, Lab};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const API: &str = "http://198.18.0.1:6443";
const A: &str = "flannel.alpha.coreos.com/";

struct Kube {
    c: Cluster,
    socket: PathBuf,
    net_conf: String,
}

fn kube_cluster(name: &str, nodes: &[&str]) -> Kube {
    let mut lab = Lab::new(name).expect("lab");
    let socket = lab.dir().join("api.sock");
    let bin = twill_lab::bin_path("twill-fake-apiserver");
    let sw = lab.switch_ns();
    for n in nodes {
        lab.add_node(n).expect("node");
    }
    lab.spawn(
        &sw,
        "apiserver",
        &[
            bin.to_str().unwrap(),
            "--listen",
            "198.18.0.1:6443",
            "--control-socket",
            socket.to_str().unwrap(),
        ],
        &[],
    )
    .expect("spawn fake apiserver");
    let deadline = Instant::now() + DEADLINE;
    while client::request(&socket, "GET", "/api/v1/nodes", "", "").is_err() {
        assert!(Instant::now() < deadline, "fake API server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let net_conf = lab.dir().join("net-conf.json");
    std::fs::write(&net_conf, VXLAN).unwrap();
    let k = Kube {
        c: Cluster::from_lab(lab),
        socket,
        net_conf: net_conf.to_string_lossy().into_owned(),
    };
    for (i, n) in nodes.iter().enumerate() {
        k.create_node(n, &format!("10.244.{}.0/24", i + 1), json!({}));
    }
    k
}

impl Kube {
    fn call(&self, method: &str, path: &str, ctype: &str, body: Value) -> Value {
        client::call(&self.socket, method, path, ctype, &body)
    }

    fn create_node(&self, name: &str, cidr: &str, annotations: Value) {
        self.call(
            "POST",
            "/api/v1/nodes",
            "application/json",
            json!({"metadata": {"name": name, "annotations": annotations},
                   "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}}),
        );
    }

    fn node(&self, name: &str) -> Value {
        self.call("GET", &format!("/api/v1/nodes/{name}"), "", Value::Null)
    }

    fn annotate(&self, name: &str, annotations: Value) {
        self.call(
            "PATCH",
            &format!("/api/v1/nodes/{name}"),
            "application/merge-patch+json",
            json!({"metadata": {"annotations": annotations}}),
        );
    }

    fn delete_node(&self, name: &str) {
        self.call("DELETE", &format!("/api/v1/nodes/{name}"), "", Value::Null);
    }

    fn control(&self, what: &str) {
        self.call("POST", &format!("/fake/{what}"), "", Value::Null);
    }

    /// The requests the daemons made (not the test's own).
    fn requests(&self) -> Vec<Value> {
        self.call("GET", "/fake/requests", "", Value::Null)
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r["userAgent"] != client::TEST_CLIENT)
            .collect()
    }

    fn start(&mut self, node: &str) {
        let conf = format!("--net-config-path={}", self.net_conf);
        let api = format!("--kube-api-url={API}");
        self.c.start_env(
            node,
            &["--kube-subnet-mgr", &api, &conf],
            &[("NODE_NAME", node)],
        );
    }
}

/// Annotations exactly as flanneld writes them for a vxlan node.
fn flannel_annotations(public_ip: &str, mac: &str) -> Value {
    json!({
        format!("{A}kube-subnet-manager"): "true",
        format!("{A}backend-type"): "vxlan",
        format!("{A}backend-data"): format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
        format!("{A}public-ip"): public_ip,
    })
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

/// The (resource, verb) pairs a request log shows, in RBAC terms.
fn verbs_used(requests: &[Value]) -> BTreeSet<(String, String)> {
    requests
        .iter()
        .map(|r| {
            let mut resource = r["resource"].as_str().unwrap_or("").to_string();
            if r["subresource"] == "status" {
                resource.push_str("/status");
            }
            let watch = r["query"]["watch"] == "true" || r["query"]["watch"] == "1";
            let verb = match r["method"].as_str().unwrap_or("") {
                "GET" if watch => "watch",
                "GET" if r["name"].is_null() => "list",
                "GET" => "get",
                "PATCH" => "patch",
                "PUT" => "update",
                "POST" => "create",
                "DELETE" => "delete",
                other => other,
            };
            (resource, verb.to_string())
        })
        .collect()
}

#[test]
fn kube_three_nodes_flannel_annotations_peers_changes_and_deletions() {
    if !twill_lab::require_root() {
        return;
    }
    let nodes = ["n1", "n2", "n3"];
    let mut k = kube_cluster("kube3", &nodes);
    // A Flannel node of the same cluster, annotated by hand exactly as flanneld would.
    let flannel_mac = "0a:58:0a:f4:04:00";
    k.create_node(
        "flannel4",
        "10.244.4.0/24",
        flannel_annotations("198.18.0.44", flannel_mac),
    );
    for n in nodes {
        k.start(n);
    }
    let envs: BTreeMap<&str, _> = nodes.iter().map(|n| (*n, k.c.wait_ready(n))).collect();

    for (i, n) in nodes.iter().enumerate() {
        // subnet.env from the podCIDR.
        let text = std::fs::read_to_string(k.c.subnet_file(n)).unwrap();
        assert_eq!(
            text,
            format!(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{}.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
                i + 1
            )
        );
        // The annotations, exactly what flanneld writes (and so what flanneld expects).
        let node = k.node(n);
        let mac = k.c.mac(n, "flannel.1");
        let addr = k.c.lab.node(n).addr.to_string();
        let ann = node["metadata"]["annotations"].as_object().unwrap().clone();
        let ours: serde_json::Map<String, Value> = ann
            .into_iter()
            .filter(|(key, _)| key.starts_with(A))
            .collect();
        assert_eq!(Value::Object(ours), flannel_annotations(&addr, &mac), "{n}");
        // NetworkUnavailable=False, reason FlannelIsUp (set after ready).
        let deadline = Instant::now() + DEADLINE;
        loop {
            let conds = k.node(n)["status"]["conditions"].clone();
            let ok = conds.as_array().is_some_and(|c| {
                c.iter().any(|c| {
                    c["type"] == "NetworkUnavailable"
                        && c["status"] == "False"
                        && c["reason"] == "FlannelIsUp"
                        && c["message"] == "Flannel is running on this node"
                })
            });
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "{n}: conditions {conds}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // Every node programs the other two and the hand-annotated Flannel node.
    let peer = |m: &str| {
        (
            envs[m].subnet_network().unwrap(),
            k.c.lab.node(m).addr,
            k.c.mac(m, "flannel.1"),
        )
    };
    let f4 = (
        net("10.244.4.0/24"),
        Ipv4Addr::new(198, 18, 0, 44),
        flannel_mac.to_string(),
    );
    for n in nodes {
        let want: Vec<_> = nodes
            .iter()
            .filter(|m| **m != n)
            .map(|m| peer(m))
            .chain([f4.clone()])
            .collect();
        k.c.wait_entries(n, "flannel.1", "all peers", |e| {
            want.iter().all(|(s, ip, mac)| e.has_peer(s, *ip, mac)) && e.routes.len() == 3
        });
    }

    // Pods on the three twill nodes reach each other.
    let pods: Vec<(String, String, Ipv4Addr)> = nodes
        .iter()
        .map(|n| {
            let name = format!("p{n}");
            let ip = k.c.pod(n, &name, &envs[n]);
            (name.clone(), k.c.lab.ns(&name), ip)
        })
        .collect();
    for (_, from, _) in &pods {
        for (to_name, _, to_ip) in &pods {
            assert!(
                k.c.lab.wait_ping(from, (*to_ip).into(), DEADLINE),
                "{from} cannot reach {to_name} ({to_ip})"
            );
        }
    }

    // A changed annotation (new public IP and new VtepMAC) is reprogrammed everywhere.
    let new_mac = "0a:58:0a:f4:04:99";
    k.annotate("flannel4", flannel_annotations("198.18.0.45", new_mac));
    for n in nodes {
        k.c.wait_entries(n, "flannel.1", "flannel4's new IP and MAC", |e| {
            e.has_peer(&f4.0, Ipv4Addr::new(198, 18, 0, 45), new_mac)
                && !e.fdb.iter().any(|f| f.starts_with(flannel_mac))
        });
    }

    // A node deleted from the API disappears from every peer.
    k.delete_node("flannel4");
    for n in nodes {
        k.c.wait_entries(n, "flannel.1", "flannel4 gone", |e| {
            !e.mentions(&f4.0) && e.routes.len() == 2
        });
    }
    let s3 = envs["n3"].subnet_network().unwrap();
    k.delete_node("n3");
    for n in ["n1", "n2"] {
        k.c.wait_entries(n, "flannel.1", "n3 gone", |e| {
            !e.mentions(&s3) && e.routes.len() == 1
        });
    }

    // Annotations are patched only when they differ: a restarted twilld on n1 (same MAC, same
    // IP) sends no annotation patch, only the condition.
    let patches = |k: &Kube| {
        k.requests()
            .iter()
            .filter(|r| {
                r["method"] == "PATCH"
                    && r["name"] == "n1"
                    && r["body"]["metadata"]["annotations"].is_object()
            })
            .count()
    };
    let before = patches(&k);
    assert_eq!(before, 1, "n1's annotations patched once at first start");
    k.c.kill("n1", twill_lab::Signal::SIGTERM);
    std::fs::remove_file(k.c.subnet_file("n1")).unwrap();
    k.start("n1");
    k.c.wait_ready("n1");
    assert_eq!(
        patches(&k),
        before,
        "unchanged annotations were patched again"
    );
    for r in k.requests() {
        if r["method"] == "PATCH" {
            assert_eq!(r["subresource"], "status", "{r}");
            assert_eq!(
                r["contentType"], "application/strategic-merge-patch+json",
                "{r}"
            );
        }
    }

    // Every verb twilld used is in the one list the RBAC test checks.
    let declared: BTreeSet<(String, String)> = twill::registry::kube::API_VERBS
        .iter()
        .map(|(r, v)| (r.to_string(), v.to_string()))
        .collect();
    let used = verbs_used(&k.requests());
    assert!(
        used.is_subset(&declared),
        "used {used:?}, declared {declared:?}"
    );
}

#[test]
fn kube_watch_cut_and_410_lose_nothing() {
    if !twill_lab::require_root() {
        return;
    }
    let mut k = kube_cluster("kubew", &["n1", "n2"]);
    k.create_node(
        "f1",
        "10.244.11.0/24",
        flannel_annotations("198.18.0.51", "0a:58:0a:f4:0b:00"),
    );
    for n in ["n1", "n2"] {
        k.start(n);
    }
    for n in ["n1", "n2"] {
        k.c.wait_ready(n);
        k.c.wait_entries(n, "flannel.1", "f1 programmed", |e| {
            e.mentions(&net("10.244.11.0/24")) && e.routes.len() == 2
        });
    }

    // 1. Watches cut mid-stream; while they are down f1 is deleted and f2 added. The watcher
    // resumes from its resourceVersion and sees both.
    k.control("hold");
    k.delete_node("f1");
    k.create_node(
        "f2",
        "10.244.12.0/24",
        flannel_annotations("198.18.0.52", "0a:58:0a:f4:0c:00"),
    );
    std::thread::sleep(Duration::from_millis(500));
    k.control("release");
    for n in ["n1", "n2"] {
        k.c.wait_entries(n, "flannel.1", "after a cut: f1 gone, f2 there", |e| {
            !e.mentions(&net("10.244.11.0/24"))
                && e.has_peer(
                    &net("10.244.12.0/24"),
                    Ipv4Addr::new(198, 18, 0, 52),
                    "0a:58:0a:f4:0c:00",
                )
        });
    }

    // 2. Cut again, change things, then compact: resuming gets 410 Gone, the watcher
    // re-lists, and the deletion it never saw as an event still removes f2.
    let lists_before = k
        .requests()
        .iter()
        .filter(|r| r["method"] == "GET" && r["query"]["watch"].is_null() && r["name"].is_null())
        .count();
    k.control("hold");
    k.delete_node("f2");
    k.create_node(
        "f3",
        "10.244.13.0/24",
        flannel_annotations("198.18.0.53", "0a:58:0a:f4:0d:00"),
    );
    k.control("compact");
    std::thread::sleep(Duration::from_millis(500));
    k.control("release");
    for n in ["n1", "n2"] {
        k.c.wait_entries(n, "flannel.1", "after a 410: f2 gone, f3 there", |e| {
            !e.mentions(&net("10.244.12.0/24"))
                && e.has_peer(
                    &net("10.244.13.0/24"),
                    Ipv4Addr::new(198, 18, 0, 53),
                    "0a:58:0a:f4:0d:00",
                )
                && e.routes.len() == 2
        });
    }
    let lists_after = k
        .requests()
        .iter()
        .filter(|r| r["method"] == "GET" && r["query"]["watch"].is_null() && r["name"].is_null())
        .count();
    assert!(
        lists_after >= lists_before + 2,
        "no re-list after the 410 ({lists_before} -> {lists_after})"
    );
    for n in ["n1", "n2"] {
        assert!(k.c.lab.is_running(k.c.daemon(n)), "{}", k.c.log(n));
    }
}

#[test]
fn kube_net_conf_errors_use_flannels_text() {
    if !twill_lab::require_root() {
        return;
    }
    let mut k = kube_cluster("kubee", &["n1"]);
    // podCIDR outside Network.
    std::fs::write(
        &k.net_conf,
        r#"{"Network":"10.99.0.0/16","Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap();
    k.start("n1");
    let id = k.c.daemon("n1");
    let _ = k.c.lab.wait(id, Duration::from_secs(30));
    let log = k.c.log("n1");
    assert!(
        log.contains(r#"subnet "10.99.0.0/16" specified in the flannel net config doesn't contain "10.244.1.0/24" PodCIDR of the "n1" node"#),
        "{log}"
    );
    // Missing file.
    std::fs::remove_file(&k.net_conf).unwrap();
    k.start("n1");
    let id = k.c.daemon("n1");
    let _ = k.c.lab.wait(id, Duration::from_secs(30));
    let log = k.c.log("n1");
    assert!(
        log.contains("failed to read net conf: open ") && log.contains("no such file or directory"),
        "{log}"
    );
}

/// The events on node objects the fake API server holds (events.k8s.io/v1, namespace
/// default, where kube's Recorder puts events about cluster-scoped objects).
fn events(k: &Kube) -> Vec<Value> {
    k.call(
        "GET",
        "/apis/events.k8s.io/v1/namespaces/default/events",
        "",
        Value::Null,
    )["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until an event with `reason` about node `regarding` exists; returns it.
fn wait_event(k: &Kube, regarding: &str, reason: &str) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let all = events(k);
        if let Some(e) = all
            .iter()
            .find(|e| e["reason"] == reason && e["regarding"]["name"] == regarding)
        {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {reason} event about {regarding}; events: {all:#?}\nlog:\n{}",
            k.c.log(regarding)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn kube_events_lease_acquired_lost_reacquired_and_peer_skipped() {
    if !twill_lab::require_root() {
        return;
    }
    let mut k = kube_cluster("kev", &["n1"]);
    // A peer whose public-ip annotation is garbage: skipped, with an event naming it.
    let mut broken = flannel_annotations("198.18.0.44", "0a:58:0a:f4:09:00");
    broken[format!("{A}public-ip")] = json!("not-an-address");
    k.create_node("broken", "10.244.9.0/24", broken);
    k.start("n1");
    k.c.wait_ready("n1");

    let acquired = wait_event(&k, "n1", "LeaseAcquired");
    assert_eq!(acquired["type"], "Normal");
    assert_eq!(acquired["reportingController"], "twilld");
    assert_eq!(acquired["regarding"]["kind"], "Node");
    assert!(
        acquired["note"]
            .as_str()
            .unwrap()
            .starts_with("subnet 10.244.1.0/24, public IP 198.18.0.11"),
        "{acquired:#}"
    );
    let skipped = wait_event(&k, "n1", "PeerLeaseSkipped");
    assert_eq!(skipped["type"], "Warning");
    assert_eq!(skipped["related"]["kind"], "Node");
    assert_eq!(skipped["related"]["name"], "broken");
    let note = skipped["note"].as_str().unwrap();
    assert!(
        note.contains("broken") && note.contains("public-ip"),
        "{note}"
    );

    // Someone removes n1's flannel annotations: twilld writes them back, with events.
    let ours = k.node("n1")["metadata"]["annotations"].clone();
    let removed: serde_json::Map<String, Value> = ours
        .as_object()
        .unwrap()
        .keys()
        .filter(|key| key.starts_with(A))
        .map(|key| (key.clone(), Value::Null))
        .collect();
    assert!(removed.len() >= 4, "{ours:#}");
    k.annotate("n1", Value::Object(removed));
    let lost = wait_event(&k, "n1", "LeaseLost");
    assert_eq!(lost["type"], "Warning");
    let back = wait_event(&k, "n1", "LeaseReacquired");
    assert_eq!(back["type"], "Normal");
    let deadline = Instant::now() + DEADLINE;
    while k.node("n1")["metadata"]["annotations"] != ours {
        assert!(
            Instant::now() < deadline,
            "annotations not written back: {:#}",
            k.node("n1")["metadata"]["annotations"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Written back once: no loop of re-acquires.
    std::thread::sleep(Duration::from_secs(2));
    let lost_events: Vec<Value> = events(&k)
        .into_iter()
        .filter(|e| e["reason"] == "LeaseLost")
        .collect();
    assert_eq!(lost_events.len(), 1, "{lost_events:#?}");
    assert!(lost_events[0]["series"].is_null(), "{lost_events:#?}");
}
