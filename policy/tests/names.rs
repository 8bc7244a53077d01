//! Every valid Kubernetes object compiles to a table nft accepts: names,
//! namespaces, label keys and values and port names at the API server's limits go through
//! validation (`into_model`) and compile; the full table is checked with the real
//! `nft -c`, loaded, and the incremental transaction ([`TableDef::diff`]) to a second
//! generated snapshot is checked against it, inside a private network namespace. Objects
//! the model holds without validation (any UTF-8 name) must still render to a table nft
//! accepts, without panicking.
//!
//! The nft part needs root; outside CI it is skipped with a message when not root, with
//! `CI=true` it must run.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};
use twill_policy::compile::{compile, Options, COMMENT_MAX, LOG_PREFIX_MAX, NAME_MAX};
use twill_policy::model::{
    from_json_value, ContainerPort, LabelSelector, Labels, Namespace, NamespaceObject,
    NetworkPolicy, NetworkPolicyObject, Peer, Pod, PodObject, PolicyPort, PolicyType, Port,
    Protocol, Rule, Snapshot,
};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A private network namespace for nft, deleted on drop (also when a case panics).
struct Netns(String);

impl Netns {
    /// None (with a message) when not root outside CI; under `CI=true` root is required.
    fn new(tag: &str) -> Option<Netns> {
        if !is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: the nft checks need root (a private network namespace)"
            );
            eprintln!("skipping the nft checks: they need root (a private network namespace)");
            return None;
        }
        let name = format!("twpnames-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        Some(Netns(name))
    }

    /// `nft [-c] -f -` with `script` in the namespace: Err(stderr) when rejected.
    fn nft(&self, check: bool, script: &str) -> Result<(), String> {
        let mut args = vec!["netns", "exec", &self.0, "nft"];
        if check {
            args.push("-c");
        }
        args.extend(["-f", "-"]);
        let mut child = Command::new("ip")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Every quoted string of the script is within nft's limits, every name too.
fn assert_within_limits(script: &str) {
    for line in script.lines() {
        let limit = if line.contains("log prefix") {
            LOG_PREFIX_MAX
        } else {
            COMMENT_MAX
        };
        let parts: Vec<&str> = line.split('"').collect();
        assert!(parts.len() % 2 == 1, "unbalanced quotes: {line}");
        for (i, part) in parts.iter().enumerate() {
            if i % 2 == 1 && parts[i - 1].ends_with("counter name ") {
                assert!(part.len() <= NAME_MAX, "{} bytes: {line}", part.len());
            } else if i % 2 == 1 {
                assert!(part.len() <= limit, "{} bytes: {line}", part.len());
            } else {
                for word in part.split_whitespace() {
                    let word = word.trim_start_matches('@').trim_end_matches([',', ';']);
                    assert!(word.len() <= NAME_MAX, "{} bytes: {line}", word.len());
                }
            }
        }
    }
}

/// Compiles `a` and `b` for node n1; checks both full scripts with `nft -c`, loads `a`,
/// checks the incremental transaction from `a` to `b` against it, and checks that the
/// transaction, once applied, gives a table whose own incremental check back to `a` passes.
fn check_pair(ns: Option<&Netns>, a: &Snapshot, b: &Snapshot) -> Result<(), TestCaseError> {
    let opts = Options {
        pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
        ..Options::default()
    };
    let (ta, tb) = (
        compile(a, "n1", &opts).table_def(),
        compile(b, "n1", &opts).table_def(),
    );
    let (sa, sb) = (ta.render(), tb.render());
    assert_within_limits(&sa);
    assert_within_limits(&sb);
    let diff = tb.diff(&ta).map(|(d, _)| d);
    let back = ta.diff(&tb).map(|(d, _)| d);
    if let Some(d) = &diff {
        assert_within_limits(d);
    }
    let Some(ns) = ns else {
        return Ok(());
    };
    for s in [&sa, &sb] {
        ns.nft(true, s)
            .map_err(|e| TestCaseError::fail(format!("nft -c rejected the table: {e}\n{s}")))?;
    }
    ns.nft(false, &sa)
        .map_err(|e| TestCaseError::fail(format!("nft -f rejected the table: {e}\n{sa}")))?;
    if let Some(d) = diff {
        ns.nft(true, &d).map_err(|e| {
            TestCaseError::fail(format!("nft -c rejected the transaction: {e}\n{d}"))
        })?;
        ns.nft(false, &d).map_err(|e| {
            TestCaseError::fail(format!("nft -f rejected the transaction: {e}\n{d}"))
        })?;
        if let Some(back) = back {
            ns.nft(true, &back).map_err(|e| {
                TestCaseError::fail(format!("nft -c rejected the way back: {e}\n{back}"))
            })?;
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ valid objects at the limits

/// An RFC 1123 label of 1..=63 characters, often exactly 63.
fn dns_label() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?",
        "[a-z0-9][a-z0-9-]{61}[a-z0-9]",
    ]
}

/// An RFC 1123 subdomain, often 253 characters (labels of up to 63 joined by dots, cut).
fn dns_subdomain() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?",
        proptest::collection::vec("[a-z0-9][a-z0-9-]{55,61}[a-z0-9]", 3..=5).prop_map(|parts| {
            let mut s = parts.join(".");
            s.truncate(253);
            while s.ends_with(['-', '.']) {
                s.pop();
            }
            s
        }),
    ]
}

/// A label key: an optional subdomain prefix then a name of up to 63.
fn label_key() -> impl Strategy<Value = String> {
    (
        prop::option::of(dns_subdomain()),
        prop_oneof![
            "[A-Za-z0-9]([A-Za-z0-9._-]{0,6}[A-Za-z0-9])?",
            "[A-Za-z0-9][A-Za-z0-9._-]{61}[A-Za-z0-9]",
        ],
    )
        .prop_map(|(prefix, name)| match prefix {
            Some(p) => format!("{p}/{name}"),
            None => name,
        })
}

fn label_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[A-Za-z0-9]([A-Za-z0-9._-]{0,6}[A-Za-z0-9])?",
        "[A-Za-z0-9][A-Za-z0-9._-]{61}[A-Za-z0-9]",
    ]
}

/// An IANA_SVC_NAME: up to 15 of a-z, 0-9 and single '-', at least one letter.
fn port_name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z]", "[a-z](-?[a-z0-9]){6,7}", "[a-z][a-z0-9]{13}[a-z]"]
}

/// Wire objects (Namespace, Pod and NetworkPolicy JSON) of a small cluster with names,
/// labels and ports drawn at the limits: `n` pods on node n1, each policy selecting pods
/// by one of their labels, with peers by pod and namespace labels and named ports.
fn wire_cluster() -> impl Strategy<Value = Vec<(&'static str, Value)>> {
    let nss = proptest::collection::vec(
        (
            dns_label(),
            proptest::collection::btree_map(label_key(), label_value(), 0..3),
        ),
        1..3,
    );
    let pods = proptest::collection::vec(
        (
            dns_subdomain(),
            proptest::collection::btree_map(label_key(), label_value(), 1..3),
            port_name(),
            any::<u8>(),
        ),
        1..4,
    );
    let policies = proptest::collection::vec((dns_subdomain(), any::<u8>(), any::<u8>()), 1..4);
    (nss, pods, policies).prop_map(|(nss, pods, policies)| {
        let mut out = Vec::new();
        for (name, labels) in &nss {
            out.push((
                "Namespace",
                json!({"metadata": {"name": name, "labels": labels}}),
            ));
        }
        for (i, (name, labels, port, ns)) in pods.iter().enumerate() {
            let (ns_name, _) = &nss[*ns as usize % nss.len()];
            out.push((
                "Pod",
                json!({
                    "metadata": {"name": name, "namespace": ns_name, "labels": labels},
                    "spec": {"nodeName": "n1", "containers": [{"ports": [
                        {"name": port, "containerPort": 8000 + i, "protocol": "TCP"},
                        {"name": port, "containerPort": 9000 + i, "protocol": "UDP"},
                    ]}]},
                    "status": {"podIPs": [
                        {"ip": format!("10.244.1.{}", 10 + i)},
                        {"ip": format!("fd00:1::{:x}", 10 + i)},
                    ]},
                }),
            ));
        }
        for (name, a, b) in &policies {
            let (_, plabels, port, ns) = &pods[*a as usize % pods.len()];
            let (ns_name, ns_labels) = &nss[*ns as usize % nss.len()];
            let (pk, pv) = plabels.iter().next().expect("one label at least");
            let (_, peer_labels, peer_port, _) = &pods[*b as usize % pods.len()];
            let ns_sel = match ns_labels.iter().next() {
                Some((k, v)) => json!({"matchLabels": {k: v}}),
                None => json!({"matchExpressions": [{"key": pk, "operator": "Exists"}]}),
            };
            out.push((
                "NetworkPolicy",
                json!({
                    "metadata": {"name": name, "namespace": ns_name},
                    "spec": {
                        "podSelector": {"matchLabels": {pk: pv}},
                        "policyTypes": ["Ingress", "Egress"],
                        "ingress": [
                            {"from": [{"podSelector": {"matchLabels": peer_labels}}],
                             "ports": [{"port": port}, {"port": 80}]},
                            {"from": [{"namespaceSelector": ns_sel, "podSelector": {}},
                                      {"ipBlock": {"cidr": "198.18.0.0/16", "except": ["198.18.1.0/24"]}}]},
                        ],
                        "egress": [
                            {"to": [{"podSelector": {"matchExpressions": [
                                {"key": pk, "operator": "In", "values": [pv]}]}}],
                             "ports": [{"port": peer_port, "protocol": "UDP"}, {"port": peer_port}]},
                        ],
                    },
                }),
            ));
        }
        out
    })
}

/// Through the API-server validation and defaulting: every generated object must pass.
fn snapshot_of(objs: &[(&str, Value)]) -> Snapshot {
    let (mut nss, mut pods, mut pols) = (Vec::new(), Vec::new(), Vec::new());
    for (kind, v) in objs {
        let what = format!("{kind} {v}");
        match *kind {
            "Namespace" => nss.push(
                from_json_value::<NamespaceObject>(v.clone())
                    .and_then(|o| o.into_model())
                    .unwrap_or_else(|e| panic!("{what}: {e}")),
            ),
            "Pod" => pods.push(
                from_json_value::<PodObject>(v.clone())
                    .and_then(|o| o.into_model())
                    .unwrap_or_else(|e| panic!("{what}: {e}")),
            ),
            _ => pols.push(
                from_json_value::<NetworkPolicyObject>(v.clone())
                    .and_then(|o| o.into_model())
                    .unwrap_or_else(|e| panic!("{what}: {e}")),
            ),
        }
    }
    Snapshot::new(nss, pods, pols)
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        // No regression files in the source tree; a failure prints its input.
        failure_persistence: None,
        ..Config::default()
    })
}

#[test]
fn valid_objects_at_the_limits_compile_to_tables_nft_accepts() {
    let ns = Netns::new("valid");
    runner(24)
        .run(&(wire_cluster(), wire_cluster()), |(a, b)| {
            check_pair(ns.as_ref(), &snapshot_of(&a), &snapshot_of(&b))
        })
        .unwrap();
}

// ------------------------------------------------------------------ any UTF-8 in the model

/// Any string, biased towards what breaks quoting, escaping and byte slicing.
fn any_name() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[\"\\\\$é☃😀\u{301}\n\t a/.-]{1,40}",
        "[é☃😀\"]{60,200}",
        ".{250,300}",
    ]
    .prop_map(|s| if s.is_empty() { "x".into() } else { s })
}

/// A snapshot built directly (no validation): `n` pods on n1 in namespaces with arbitrary
/// names, each selected by a policy with an arbitrary name.
fn raw_cluster() -> impl Strategy<Value = Snapshot> {
    proptest::collection::vec((any_name(), any_name(), any_name(), any::<bool>()), 1..4).prop_map(
        |objs| {
            let mut pods = Vec::new();
            let mut pols = Vec::new();
            let mut nss = Vec::new();
            for (i, (ns, pod, pol, named)) in objs.into_iter().enumerate() {
                let labels: Labels = [("app".to_string(), format!("a{i}"))].into();
                pods.push(Pod {
                    namespace: ns.clone(),
                    name: pod,
                    labels: labels.clone(),
                    node: Some("n1".into()),
                    ips: vec![
                        IpAddr::V4(Ipv4Addr::new(10, 244, 1, 10 + i as u8)),
                        IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 10 + i as u16)),
                    ],
                    host_network: false,
                    ports: vec![ContainerPort {
                        name: Some("http".into()),
                        port: 8080,
                        protocol: Protocol::Tcp,
                    }],
                    phase: None,
                    terminating: false,
                });
                let port = if named {
                    Port::Named("http".into())
                } else {
                    Port::Range(80, 81)
                };
                let rule = Rule {
                    peers: vec![Peer::Pods {
                        pods: LabelSelector::default(),
                        namespaces: Some(LabelSelector::default()),
                    }],
                    ports: vec![PolicyPort {
                        protocol: Protocol::Tcp,
                        port: Some(port),
                    }],
                };
                pols.push(NetworkPolicy {
                    namespace: ns.clone(),
                    name: pol,
                    pod_selector: LabelSelector {
                        match_labels: labels,
                        match_expressions: vec![],
                    },
                    policy_types: vec![PolicyType::Ingress, PolicyType::Egress],
                    ingress: vec![rule.clone()],
                    egress: vec![rule],
                });
                nss.push(Namespace::new(&ns, Labels::new()));
            }
            Snapshot::new(nss, pods, pols)
        },
    )
}

#[test]
fn any_utf8_name_in_the_model_renders_to_a_table_nft_accepts() {
    let ns = Netns::new("raw");
    runner(24)
        .run(&(raw_cluster(), raw_cluster()), |(a, b)| {
            check_pair(ns.as_ref(), &a, &b)
        })
        .unwrap();
}

// ------------------------------------- a long name that once stopped every sync on a node

fn one_pod_one_policy(ns: &str, pod: &str, policy: &str) -> Snapshot {
    let wire = vec![
        ("Namespace", json!({"metadata": {"name": ns}})),
        (
            "Pod",
            json!({
                "metadata": {"name": pod, "namespace": ns, "labels": {"app": "web"}},
                "spec": {"nodeName": "n1", "containers": [{"ports": [{"name": "http", "containerPort": 80}]}]},
                "status": {"podIP": "10.244.1.10"},
            }),
        ),
        (
            "NetworkPolicy",
            json!({
                "metadata": {"name": policy, "namespace": ns},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": "http"}]}],
                },
            }),
        ),
    ];
    snapshot_of(&wire)
}

#[test]
fn a_182_character_policy_name_loads() {
    let name = ["a".repeat(60), "b".repeat(60), "c".repeat(60)].join(".");
    assert_eq!(name.len(), 182);
    let snap = one_pod_one_policy("x", "web", &name);
    let empty = one_pod_one_policy("x", "web", "p");
    let script = compile(&snap, "n1", &Options::default()).render();
    // The comments still say which policy it is.
    assert!(script.contains(&format!("\"x/{}", &name[..60])), "{script}");
    let ns = Netns::new("longname");
    check_pair(ns.as_ref(), &snap, &empty).unwrap();
    check_pair(ns.as_ref(), &empty, &snap).unwrap();
    // At every limit at once: a 63-character namespace, 253-character pod and policy.
    let long = format!("{}.{}", "p".repeat(126), "q".repeat(126));
    let big = one_pod_one_policy(&"n".repeat(63), &long, &long);
    check_pair(ns.as_ref(), &big, &snap).unwrap();
}

#[test]
fn quotes_and_non_ascii_names_render_and_load() {
    // The manifests source no longer lets these through, but rendering must not depend on
    // that: before, the log prefix was cut at a byte index (a panic inside 'é') and `"`
    // ended nft's quoted string.
    let mut snap = one_pod_one_policy("x", "web", "p");
    let odd = format!("{}\"$x\\ é{}", "é".repeat(55), "☃".repeat(30));
    snap.pods[0].name = odd.clone();
    snap.policies[0].name = odd.clone();
    snap.pods[0].namespace = "ns\"é".into();
    snap.policies[0].namespace = "ns\"é".into();
    let ns = Netns::new("odd");
    check_pair(ns.as_ref(), &snap, &one_pod_one_policy("x", "web", "p")).unwrap();
}

// ------------------------------------------------------- cluster policies at the limits

mod tiers;

/// Cluster policies with 253-character names and 100-character rule names, selecting a pod
/// with a 253-character name in a 63-character namespace (its deny and after-Admin chains
/// are hashed names), render within nft's limits, load, and change incrementally; a
/// cluster policy's sets never take the name of a NetworkPolicy's in a namespace called
/// like the policy kind's short name.
#[test]
fn cluster_policies_at_the_limits_load() {
    use twill_policy::model::{ClusterPolicyKind, Namespace};
    let long = format!("{}.{}", "c".repeat(126), "d".repeat(126));
    assert_eq!(long.len(), 253);
    let rule_name = "r".repeat(100);
    let mut policies = tiers::cluster_policies();
    for p in &mut policies {
        if p.kind != ClusterPolicyKind::BaselineAdminNetworkPolicy {
            p.name = format!("{}-{}", &long[..252 - p.name.len()], p.name);
            assert_eq!(p.name.len(), 253);
        }
        for r in p.ingress.iter_mut().chain(p.egress.iter_mut()) {
            r.name = rule_name.clone();
        }
    }
    let mut snap = tiers::world_with(policies.clone());
    // A pod at the limits, in a tenant namespace at the limits, on node n1.
    let big_ns = "n".repeat(63);
    let mut big = snap.pod("t1a/web").unwrap().clone();
    big.namespace = big_ns.clone();
    big.name = long.clone();
    big.ips = vec!["10.244.1.200".parse().unwrap()];
    let mut namespaces: Vec<Namespace> = snap.namespaces.values().cloned().collect();
    namespaces.push(Namespace::new(&big_ns, tiers::labels(&[("tenant", "t1")])));
    let mut pods = snap.pods.clone();
    pods.push(big);
    snap = Snapshot::new(namespaces, pods, snap.policies.clone())
        .with_cluster_policies(policies)
        .with_nodes(tiers::nodes());
    let rs = compile(&snap, "n1", &Options::default());
    let script = rs.render();
    assert_within_limits(&script);
    for c in &rs.chains {
        assert!(c.name.len() <= NAME_MAX, "{}", c.name);
    }
    let big_chains = rs
        .chains
        .iter()
        .filter(|c| c.pod == format!("{big_ns}/{long}"))
        .count();
    // Ingress: pod chain, Admin and Baseline deny, after-Admin; egress: pod chain, the two
    // deny chains, after-Admin.
    assert!(big_chains >= 6, "{script}");
    // The plain world (NetworkPolicy cnp/tenant-t1 and ClusterNetworkPolicy tenant-t1 in
    // one table): distinct sets for each.
    let plain = compile(&tiers::world(), "n1", &Options::default());
    let sets: Vec<&str> = plain.addr_sets.iter().map(|s| s.name.as_str()).collect();
    assert!(sets.contains(&"cidrs/cnp/tenant-t1/in0/v4"), "{sets:?}");
    assert!(sets.contains(&"cpeers/cnp/tenant-t1/in0/v4"), "{sets:?}");
    let ns = Netns::new("cluster");
    check_pair(ns.as_ref(), &snap, &tiers::world()).unwrap();
    check_pair(ns.as_ref(), &tiers::world(), &snap).unwrap();
}
