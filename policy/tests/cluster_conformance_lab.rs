//! Root-only: the upstream network-policy-api conformance tests for cluster policies
//! (`tests/data/cnp-scenarios.json`: ClusterNetworkPolicy v1alpha2, and the older
//! AdminNetworkPolicy/BaselineAdminNetworkPolicy v1alpha1) on a real twill cluster.
//!
//! etcd on the switch; three nodes running twilld (VXLAN, --ip-masq), pods through
//! twill-cni and `twill-policy run` as tests/conformance_lab.rs has them (both built by
//! tests/common/twill_cluster.rs); the eight conformance pods (harry-potter-0/1,
//! draco-malfoy-0/1, cedric-diggory-0/1, luna-lovegood-0/1) attached through twill-cni
//! and spread over the nodes in turn, each serving TCP 80/8080 and UDP 53/5353; the two
//! hostNetwork pods centaur-0/1 on n1 and n2, whose servers (upstream's host-network
//! ports) run in the node's own namespace bound to its address (as upstream binds them to
//! the host IP); `twill-policy run --manifests
//! DIR` on every node. Each scenario step is written to DIR as one JSON List (namespaces
//! with the step's labels, pods with spec.nodeName and the addresses CNI gave them, nodes
//! with their addresses, the step's objects); the test waits until every node's table
//! carries the ruleset id of that step, runs the step's probes in parallel (TCP connect,
//! UDP echo; 1 s timeouts) and compares each with upstream's expectation. Updates are
//! file rewrites: nothing restarts.
//!
//! SCTP probes are skipped: this kernel has no SCTP sockets. tests/cluster_scenarios.rs
//! checks them through the evaluator and the compiled rulesets.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::twill_cluster::{
    add_serving_pod, finish, manifests_dir, probe_all, serve_in, spawn_policy_run,
    start_twilld_nodes, subnet_file_options, wait_applied, write_manifests,
};
use serde_json::json;
use twill_lab::{Lab, ProcId};
use twill_policy::model::Protocol;
use twill_policy_testkit::cluster::{
    load_cluster_conformance, ClusterConformance, ClusterProbe, ClusterStep, Placement, Server,
    CLUSTER_SCENARIOS,
};

const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// `PROTO:PORT` of the servers that can be probed here (SCTP cannot).
fn server_args(servers: &[Server]) -> Vec<String> {
    servers
        .iter()
        .filter(|s| s.protocol != Protocol::Sctp)
        .map(|s| format!("{}:{}", s.protocol, s.port))
        .collect()
}

struct World {
    lab: Lab,
    conf: ClusterConformance,
    placement: Placement,
    /// `ns/pod` -> the network namespace its client runs in (hostNetwork: the node's).
    netns: BTreeMap<String, String>,
    dir: PathBuf,
    policy_procs: BTreeMap<String, ProcId>,
    twilld: BTreeMap<String, ProcId>,
}

impl World {
    fn new(name: &str) -> World {
        let conf = load_cluster_conformance(CLUSTER_SCENARIOS).unwrap();
        let mut lab = Lab::new(name).expect("lab");
        let twilld = start_twilld_nodes(&mut lab, &NODES);
        let mut placement = Placement::default();
        for n in NODES {
            placement
                .nodes
                .insert(n.to_string(), IpAddr::V4(lab.node(n).addr));
        }
        let mut netns = BTreeMap::new();
        let (mut next_pod, mut next_host) = (0, 0);
        for (i, p) in conf.world.pods.iter().enumerate() {
            let (node, ns, ip) = if p.host_network {
                // The node's own namespace and address; its servers listen there.
                let n = NODES[next_host % NODES.len()];
                next_host += 1;
                let node = lab.node(n).clone();
                let servers: Vec<String> = server_args(&conf.world.host_network_servers)
                    .into_iter()
                    .map(|s| format!("{s}:{}", node.addr))
                    .collect();
                serve_in(&mut lab, &node.netns, &format!("srv-{}", p.name), &servers);
                (n, node.netns, IpAddr::V4(node.addr))
            } else {
                let n = NODES[next_pod % NODES.len()];
                next_pod += 1;
                let servers = server_args(&conf.world.pod_servers);
                let pod = add_serving_pod(&mut lab, n, &format!("p{i}"), &servers);
                (n, pod.netns.clone(), IpAddr::V4(pod.ip()))
            };
            placement.pods.insert(p.key(), (node.to_string(), ip));
            netns.insert(p.key(), ns);
        }
        let dir = manifests_dir(&lab);
        World {
            lab,
            conf,
            placement,
            netns,
            dir,
            policy_procs: BTreeMap::new(),
            twilld,
        }
    }

    fn subnet_file(&self, n: &str) -> PathBuf {
        self.lab.node(n).dir.join("subnet.env")
    }

    fn start_policy(&mut self) {
        for n in NODES {
            let extra = [
                "--subnet-file".to_string(),
                self.subnet_file(n).to_str().unwrap().into(),
            ];
            let id = spawn_policy_run(&mut self.lab, n, &self.dir, &extra);
            self.policy_procs.insert(n.to_string(), id);
        }
    }

    /// Replaces the manifests with the world as of `step`; returns how many cluster
    /// policies it holds.
    fn write(&self, step: &ClusterStep) -> usize {
        let items = self.conf.world.objects(step, &self.placement).unwrap();
        let doc = json!({"apiVersion": "v1", "kind": "List", "items": items});
        write_manifests(&self.lab, &self.dir, &doc);
        step.objects
            .iter()
            .filter(|o| o["kind"] != "NetworkPolicy")
            .count()
    }

    /// Waits until every node enforces the manifests now in the directory (with the pod
    /// CIDR each node reads from its subnet.env), which must hold `cluster_policies` of
    /// them, all readable; returns how long that took.
    fn wait_applied(&mut self, cluster_policies: usize) -> Duration {
        let opts = subnet_file_options(&self.lab, &NODES);
        let opts = |n: &str| opts[n].clone();
        let (snap, took) = wait_applied(&mut self.lab, &self.dir, &self.policy_procs, &opts);
        assert!(
            snap.broken_cluster.is_empty() && snap.cluster_policies.len() == cluster_policies,
            "{} of {cluster_policies} cluster policies read: {:?}",
            snap.cluster_policies.len(),
            snap.broken_cluster
        );
        took
    }

    /// Runs `probes` (all clients in parallel, each client's targets in parallel); returns
    /// whether each connected, in order.
    fn probe(&self, probes: &[&ClusterProbe]) -> Vec<bool> {
        let target = |p: &ClusterProbe| {
            let ip = self.placement.ip(&p.to).unwrap();
            (
                self.netns[&p.from].clone(),
                format!("{}:{ip}:{}", p.protocol, p.port),
            )
        };
        let mut by_client: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in probes {
            let (ns, t) = target(p);
            by_client.entry(ns).or_default().push(t);
        }
        let got = probe_all(&by_client);
        probes
            .iter()
            .map(|p| {
                let (ns, t) = target(p);
                got[&ns][&t]
            })
            .collect()
    }
}

fn describe(p: &ClusterProbe) -> String {
    format!("{} -> {} {}/{}", p.from, p.to, p.protocol, p.port)
}

#[test]
fn upstream_cluster_policy_conformance_in_a_three_node_lab() {
    if !twill_lab::require_root() {
        return;
    }
    let t0 = Instant::now();
    let mut w = World::new("cnpconf");
    w.start_policy();
    // No policy: every probe target answers (waits for VXLAN/ARP to settle), so that a
    // "denied" later is the policy's doing and not a server or route missing.
    let empty = ClusterStep {
        title: "no policy".into(),
        objects: vec![],
        namespace_labels: BTreeMap::new(),
        probes: vec![],
    };
    let none = w.write(&empty);
    w.wait_applied(none);
    let every_target: Vec<ClusterProbe> = {
        let mut seen = BTreeMap::new();
        for sc in &w.conf.scenarios {
            for st in &sc.steps {
                for p in st.probes.iter().filter(|p| p.protocol != Protocol::Sctp) {
                    seen.entry(describe(p)).or_insert_with(|| p.clone());
                }
            }
        }
        seen.into_values().collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let refs: Vec<&ClusterProbe> = every_target.iter().collect();
        let closed: Vec<String> = w
            .probe(&refs)
            .iter()
            .zip(&every_target)
            .filter(|(ok, _)| !**ok)
            .map(|(_, p)| describe(p))
            .collect();
        if closed.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no policy, still blocked: {closed:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "lab ready in {:?}: {} distinct probes all connect without policy",
        t0.elapsed(),
        every_target.len()
    );

    let mut failures = Vec::new();
    let mut applied = Vec::new();
    let (mut probed, mut skipped_sctp) = (0, 0);
    let scenarios = w.conf.scenarios.clone();
    for sc in &scenarios {
        for (si, step) in sc.steps.iter().enumerate() {
            let cluster_policies = w.write(step);
            let took = w.wait_applied(cluster_policies);
            applied.push(took.as_secs_f64());
            let (sctp, probes): (Vec<&ClusterProbe>, Vec<&ClusterProbe>) = step
                .probes
                .iter()
                .partition(|p| p.protocol == Protocol::Sctp);
            skipped_sctp += sctp.len();
            let mut got = w.probe(&probes);
            probed += probes.len();
            // As upstream (PokeServer polls until the expectation holds), a mismatch is
            // re-probed before it counts; twice here, since on two shared cores a probe's
            // 1 s can pass before an allowed peer is scheduled.
            for _ in 0..2 {
                let wrong: Vec<usize> = (0..probes.len())
                    .filter(|&i| got[i] != probes[i].allowed)
                    .collect();
                if wrong.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
                let again: Vec<&ClusterProbe> = wrong.iter().map(|&i| probes[i]).collect();
                for (k, ok) in w.probe(&again).into_iter().enumerate() {
                    got[wrong[k]] = ok;
                }
            }
            let mut bad = 0;
            for (p, ok) in probes.iter().zip(&got) {
                if *ok != p.allowed {
                    bad += 1;
                    failures.push(format!(
                        "{} step {si} ({}): {}: connected={ok}, upstream expects {}",
                        sc.id,
                        step.title,
                        describe(p),
                        p.allowed
                    ));
                }
            }
            eprintln!(
                "{} step {si}: {} probes {}{} [enforced {:.0} ms after the write]",
                sc.id,
                probes.len(),
                if bad == 0 { "ok" } else { "MISMATCH" },
                if sctp.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", {} SCTP SKIPPED (this kernel has no SCTP sockets; \
                         tests/cluster_scenarios.rs checks them)",
                        sctp.len()
                    )
                },
                took.as_secs_f64() * 1000.0
            );
        }
    }
    // Nothing restarted: the same twilld and twill-policy processes ran throughout.
    let what = format!("{probed} probes, {skipped_sctp} SCTP probes skipped");
    finish(
        w.lab,
        [&w.policy_procs, &w.twilld],
        &what,
        applied,
        t0,
        &failures,
    );
}
