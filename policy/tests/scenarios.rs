//! The evaluator against every scenario, step, probe and pair of the upstream
//! conformance suite (tests/data/netpol-scenarios.json), and against corner cases of the
//! spec in the conformance world plus a hostNetwork pod.

use std::collections::BTreeMap;
use std::net::IpAddr;

use twill_policy::eval::{allowed, Endpoint};
use twill_policy::model::{from_json_value, NetworkPolicyObject, Protocol, Snapshot};
use twill_policy_testkit::conformance::{self, load_scenarios, pairs, step_snapshot, SCENARIOS};

#[test]
fn evaluator_passes_every_scenario_probe() {
    let scenarios = load_scenarios(SCENARIOS).unwrap();
    assert_eq!(scenarios.len(), 48);
    let (mut probes, mut checked, mut failures) = (0, 0, Vec::new());
    for sc in &scenarios {
        for (si, step) in sc.steps.iter().enumerate() {
            let snap = step_snapshot(step).unwrap();
            for probe in &step.probes {
                probes += 1;
                for (s, d) in pairs() {
                    let from = Endpoint::pod(snap.pod(&s).unwrap());
                    let to = Endpoint::pod(snap.pod(&d).unwrap());
                    let v = allowed(&snap, &from, &to, probe.port, probe.protocol);
                    let want_denied = probe.expect_denied.contains(&format!("{s}->{d}"));
                    checked += 1;
                    if v.allowed == want_denied {
                        failures.push(format!(
                            "{} step {si} {}/{} {s}->{d}: got allowed={} want {}; {:?}",
                            sc.id, probe.protocol, probe.port, v.allowed, !want_denied, v.reasons
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(probes, 65);
    assert_eq!(checked, 65 * 72);
    eprintln!("evaluator: {probes} probes, {checked} pairs, all as expected");
}

fn world(policies: serde_json::Value) -> Snapshot {
    let pols = policies
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            from_json_value::<NetworkPolicyObject>(p.clone())
                .unwrap()
                .into_model()
                .unwrap()
        })
        .collect::<Vec<_>>();
    let mut pods = conformance::pods(&BTreeMap::new());
    let mut host = pods[0].clone();
    host.name = "h".into();
    host.host_network = true;
    host.ips = vec!["198.18.0.11".parse().unwrap()];
    pods.push(host);
    Snapshot::new(conformance::namespaces(&BTreeMap::new()), pods, pols)
}

fn check(snap: &Snapshot, from: &str, to: &str, port: u16, proto: Protocol) -> bool {
    let ep = |s: &str| match s.parse::<IpAddr>() {
        Ok(ip) => Endpoint::ip(snap, ip),
        Err(_) => Endpoint::pod(snap.pod(s).unwrap()),
    };
    allowed(snap, &ep(from), &ep(to), port, proto).allowed
}

#[test]
fn end_port_and_protocol_leakage() {
    let s = world(
        serde_json::json!([{"metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 1000, "endPort": 1010, "protocol": "UDP"}]}]}}]),
    );
    assert!(check(&s, "y/a", "x/a", 1000, Protocol::Udp));
    assert!(check(&s, "y/a", "x/a", 1010, Protocol::Udp));
    assert!(!check(&s, "y/a", "x/a", 1011, Protocol::Udp));
    assert!(!check(&s, "y/a", "x/a", 1005, Protocol::Tcp));
    assert!(!check(&s, "y/a", "x/a", 1005, Protocol::Sctp));
}

#[test]
fn egress_named_port_resolves_against_destination() {
    let s = world(
        serde_json::json!([{"metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                 "egress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]}}]),
    );
    assert!(check(&s, "x/a", "z/c", 81, Protocol::Udp));
    assert!(!check(&s, "x/a", "z/c", 80, Protocol::Udp));
    assert!(!check(&s, "x/a", "z/c", 81, Protocol::Tcp));
    // An external address can never match a named port.
    assert!(!check(&s, "x/a", "192.0.2.1", 81, Protocol::Udp));
}

#[test]
fn ipblock_except_is_per_peer_and_hostnetwork_is_node_traffic() {
    let s = world(
        serde_json::json!([{"metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
            {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}},
            {"ipBlock": {"cidr": "10.244.2.3/32"}},
            {"namespaceSelector": {}}]}]}},
        {"metadata": {"name": "q", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"from": [
            {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}},
            {"ipBlock": {"cidr": "10.244.2.3/32"}}]}]}}]),
    );
    assert!(
        check(&s, "y/b", "x/b", 80, Protocol::Tcp),
        "second peer allows"
    );
    assert!(!check(&s, "y/a", "x/b", 80, Protocol::Tcp), "excepted");
    assert!(check(&s, "z/a", "x/b", 80, Protocol::Tcp));
    assert!(!check(&s, "192.0.2.1", "x/b", 80, Protocol::Tcp));
    // namespaceSelector {} = every pod, but not external addresses or hostNetwork pods.
    assert!(!check(&s, "192.0.2.1", "x/a", 80, Protocol::Tcp));
    assert!(!check(&s, "x/h", "x/a", 80, Protocol::Tcp));
    // hostNetwork pods are never isolated.
    assert!(check(&s, "y/a", "x/h", 80, Protocol::Tcp));
    // IPv6 address of a pod is not in an IPv4 block, but selectors still match.
    assert!(!check(&s, "fd00:10:244:3::2", "x/b", 80, Protocol::Tcp));
    assert!(check(&s, "fd00:10:244:3::2", "x/a", 80, Protocol::Tcp));
}
