//! The upstream network-policy-api conformance tests for cluster policies
//! (tests/data/cnp-scenarios.json: 24 ClusterNetworkPolicy tests and 24 of the older
//! AdminNetworkPolicy/BaselineAdminNetworkPolicy ones), every step and probe, SCTP
//! included: through the evaluator against upstream's expectation, and through the
//! rulesets compile() builds for each node, which must agree with the evaluator.

use std::collections::BTreeMap;
use std::net::IpAddr;

use twill_policy::compile::{compile, Decision, Options, Ruleset};
use twill_policy::eval::{allowed, Endpoint};
use twill_policy::model::Snapshot;
use twill_policy_testkit::cluster::{
    load_cluster_conformance, ClusterConformance, ClusterProbe, Placement, CLUSTER_SCENARIOS,
};

fn conformance() -> ClusterConformance {
    load_cluster_conformance(CLUSTER_SCENARIOS).unwrap()
}

/// The evaluator's verdict for a probe; a hostNetwork server is its node's address.
fn evaluate(snap: &Snapshot, placement: &Placement, probe: &ClusterProbe) -> (bool, Vec<String>) {
    let src = snap.pod(&probe.from).expect("client pod");
    let dst_ip = placement.ip(&probe.to).unwrap();
    let dst = snap.pod(&probe.to).expect("server pod");
    let to = if dst.host_network {
        Endpoint::ip(snap, dst_ip)
    } else {
        Endpoint::pod(dst)
    };
    let v = allowed(snap, &Endpoint::pod(src), &to, probe.port, probe.protocol);
    (v.allowed, v.reasons)
}

/// The compiled verdict: the client's node judges the packet (forward chain, or input
/// chain when it is addressed to that node itself), then the node that owns the
/// destination address judges it as it arrives (forward chain for a pod, input chain for
/// the node's own address).
fn decide(
    rulesets: &BTreeMap<String, Ruleset>,
    placement: &Placement,
    probe: &ClusterProbe,
) -> bool {
    let (src_node, sip) = &placement.pods[&probe.from];
    let (dst_node, dip) = &placement.pods[&probe.to];
    let to_node = |node: &str, ip: &IpAddr| placement.nodes.get(node) == Some(ip);
    let l4 = Some((probe.protocol, probe.port));
    rulesets[src_node].decide_packet(*sip, *dip, l4, to_node(src_node, dip)) == Decision::Accept
        && rulesets[dst_node].decide_packet(*sip, *dip, l4, to_node(dst_node, dip))
            == Decision::Accept
}

#[test]
fn every_upstream_cluster_policy_probe_through_evaluator_and_compiled_rulesets() {
    let conf = conformance();
    let placement = Placement::pure(&conf.world);
    assert_eq!(conf.scenarios.len(), 48);
    let (mut steps, mut probes, mut failures) = (0, 0, Vec::new());
    for sc in &conf.scenarios {
        for (si, step) in sc.steps.iter().enumerate() {
            steps += 1;
            let snap = conf
                .world
                .snapshot(step, &placement)
                .unwrap_or_else(|e| panic!("{} step {si}: {e:#}", sc.id));
            assert!(
                snap.broken_cluster.is_empty() && !snap.cluster_policies.is_empty(),
                "{} step {si}: {:?}",
                sc.id,
                snap.broken_cluster
            );
            let rulesets: BTreeMap<String, Ruleset> = placement
                .nodes
                .keys()
                .map(|n| (n.clone(), compile(&snap, n, &Options::default())))
                .collect();
            for probe in &step.probes {
                probes += 1;
                let (got, reasons) = evaluate(&snap, &placement, probe);
                let compiled = decide(&rulesets, &placement, probe);
                let what = format!(
                    "{} step {si} ({}): {} -> {} {}/{}",
                    sc.id, step.title, probe.from, probe.to, probe.protocol, probe.port
                );
                if got != probe.allowed {
                    failures.push(format!(
                        "{what}: evaluator allowed={got}, upstream expects {}; {reasons:?}",
                        probe.allowed
                    ));
                }
                if compiled != got {
                    failures.push(format!(
                        "{what}: compiled allowed={compiled}, evaluator {got}; {reasons:?}"
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!((steps, probes), (188, 590));
    eprintln!("{steps} steps, {probes} probes: evaluator = upstream = compiled rulesets");
}

/// What a step writes as manifests: the world's five namespaces, ten pods (two of them
/// hostNetwork, with their node's address), three nodes, then the step's objects with
/// pod addresses filled in.
#[test]
fn a_step_is_written_as_the_world_plus_its_objects() {
    let conf = conformance();
    let placement = Placement::pure(&conf.world);
    let sc = conf
        .scenarios
        .iter()
        .find(|s| s.id == "CNPAdminTierEgressInlineCIDRPeers")
        .unwrap();
    let step = sc.steps.last().unwrap();
    let items = conf.world.objects(step, &placement).unwrap();
    let count = |k: &str| items.iter().filter(|o| o["kind"] == k).count();
    assert_eq!(
        (count("Namespace"), count("Pod"), count("Node")),
        (5, 10, 3)
    );
    let centaur = items
        .iter()
        .find(|o| o["metadata"]["name"] == "centaur-1")
        .unwrap();
    assert_eq!(centaur["status"]["podIP"], "198.18.0.2");
    let cnp = items.last().unwrap();
    assert_eq!(cnp["kind"], "ClusterNetworkPolicy");
    let luna = placement
        .ip("network-policy-conformance-ravenclaw/luna-lovegood-0")
        .unwrap();
    assert_eq!(
        cnp["spec"]["egress"][0]["to"][0]["networks"][0],
        format!("{luna}/32")
    );
    assert!(!cnp.to_string().contains("${"), "{cnp}");
}

/// The data itself: every probe names world pods (clients never hostNetwork), every
/// step's objects name their kind's API version, and the ANP/BANP scenarios use v1alpha1
/// objects while the CNP ones use v1alpha2 only.
#[test]
fn scenario_data_is_consistent_with_its_world() {
    let conf = conformance();
    for sc in &conf.scenarios {
        let cnp = sc.id.starts_with("CNP");
        for step in &sc.steps {
            assert!(!step.probes.is_empty(), "{}: {}", sc.id, step.title);
            for p in &step.probes {
                let from = conf.world.pod(&p.from).expect("client in the world");
                assert!(!from.host_network, "{}: client {}", sc.id, p.from);
                assert!(
                    conf.world.pod(&p.to).is_some(),
                    "{}: server {}",
                    sc.id,
                    p.to
                );
                let servers = if conf.world.pod(&p.to).unwrap().host_network {
                    &conf.world.host_network_servers
                } else {
                    &conf.world.pod_servers
                };
                assert!(
                    servers
                        .iter()
                        .any(|s| s.protocol == p.protocol && s.port == p.port),
                    "{}: nothing serves {}/{} on {}",
                    sc.id,
                    p.protocol,
                    p.port,
                    p.to
                );
            }
            for o in &step.objects {
                let (kind, api) = (
                    o["kind"].as_str().unwrap(),
                    o["apiVersion"].as_str().unwrap(),
                );
                let want = match kind {
                    "NetworkPolicy" => "networking.k8s.io/v1",
                    "ClusterNetworkPolicy" => "policy.networking.k8s.io/v1alpha2",
                    _ => "policy.networking.k8s.io/v1alpha1",
                };
                assert_eq!(api, want, "{}: {kind}", sc.id);
                if kind != "NetworkPolicy" {
                    assert_eq!(cnp, kind == "ClusterNetworkPolicy", "{}: {kind}", sc.id);
                }
            }
        }
    }
}
