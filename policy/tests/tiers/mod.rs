//! A small hand-made world with cluster policies in both tiers and NetworkPolicies in
//! between, for the tests of the evaluator and the compiler (`compile.rs`), incremental
//! updates (`incremental.rs`) and names (`names.rs`).
//!
//! Namespaces `t1a`, `t1b` (label `tenant: t1`), `t2` (`tenant: t2`), `mon`
//! (`role: monitoring`) and `cnp` (a namespace named like the ClusterNetworkPolicy short
//! name, with a NetworkPolicy named like a ClusterNetworkPolicy). Each has pods `web`
//! (`app: web`, TCP port `http` 8080, UDP port `dns` 53) and `db` (`app: db`, TCP port
//! `http` 9090), dual-stack, `web` on node n1 and `db` on node n2. Nodes n1
//! (`role: worker`, 198.18.0.1) and n2 (`role: control`, 198.18.0.2).

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::net::IpAddr;

use twill_policy::model::{
    Action, ClusterPolicy, ClusterPolicyKind, ClusterRule, ContainerPort, IpBlock, LabelSelector,
    Labels, Namespace, NetworkPolicy, Node, Peer, Pod, PolicyPort, PolicyType, Port, Protocol,
    Rule, Snapshot, Subject, Tier,
};

pub const NAMESPACES: [&str; 5] = ["t1a", "t1b", "t2", "mon", "cnp"];
pub const PODS: [&str; 2] = ["web", "db"];
/// Addresses that belong to no pod: the nodes and two outside the cluster.
pub const OTHERS: [&str; 4] = ["198.18.0.1", "198.18.0.2", "203.0.113.5", "192.0.2.7"];
/// (protocol, port) probed between every pair.
pub const PROBES: [(Protocol, u16); 6] = [
    (Protocol::Tcp, 8080),
    (Protocol::Tcp, 9090),
    (Protocol::Tcp, 1500),
    (Protocol::Udp, 53),
    (Protocol::Udp, 5353),
    (Protocol::Sctp, 8080),
];

pub fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn sel(kv: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(kv),
        match_expressions: vec![],
    }
}

/// Pods matching `pods` in namespaces matching `namespaces`, as a cluster peer.
pub fn pods_peer(namespaces: LabelSelector, pods: LabelSelector) -> Peer {
    Peer::Pods {
        pods,
        namespaces: Some(namespaces),
    }
}

pub fn network(cidr: &str) -> Peer {
    Peer::IpBlock(IpBlock {
        cidr: cidr.parse().unwrap(),
        except: vec![],
    })
}

pub fn tcp(a: u16, b: u16) -> PolicyPort {
    PolicyPort {
        protocol: Protocol::Tcp,
        port: Some(Port::Range(a, b)),
    }
}

/// A named port as the cluster APIs have it: no protocol, so one entry per protocol.
pub fn named(n: &str) -> Vec<PolicyPort> {
    [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
        .into_iter()
        .map(|protocol| PolicyPort {
            protocol,
            port: Some(Port::Named(n.into())),
        })
        .collect()
}

pub fn crule(name: &str, action: Action, peers: Vec<Peer>, ports: Vec<PolicyPort>) -> ClusterRule {
    ClusterRule {
        name: name.into(),
        action,
        any_peer: false,
        peers,
        nodes: vec![],
        ports,
    }
}

pub fn nodes_rule(name: &str, action: Action, nodes: LabelSelector) -> ClusterRule {
    ClusterRule {
        nodes: vec![nodes],
        ..crule(name, action, vec![], vec![])
    }
}

pub fn cnp(
    name: &str,
    tier: Tier,
    priority: u16,
    subject: Subject,
    ingress: Vec<ClusterRule>,
    egress: Vec<ClusterRule>,
) -> ClusterPolicy {
    ClusterPolicy {
        kind: ClusterPolicyKind::ClusterNetworkPolicy,
        name: name.into(),
        tier,
        priority,
        subject,
        ingress,
        egress,
    }
}

pub fn pod_ip(ns: &str, pod: &str, v6: bool) -> IpAddr {
    let n = NAMESPACES.iter().position(|x| *x == ns).unwrap() as u8 + 1;
    let node = if pod == "web" { 1 } else { 2 };
    let host = n * 10 + PODS.iter().position(|x| *x == pod).unwrap() as u8;
    if v6 {
        format!("fd00:10:244:{node}::{host:x}").parse().unwrap()
    } else {
        format!("10.244.{node}.{host}").parse().unwrap()
    }
}

pub fn node_of(pod: &str) -> &'static str {
    if pod == "web" {
        "n1"
    } else {
        "n2"
    }
}

fn pods() -> Vec<Pod> {
    let mut out = Vec::new();
    for ns in NAMESPACES {
        for name in PODS {
            let (app, port) = if name == "web" {
                ("web", 8080)
            } else {
                ("db", 9090)
            };
            let mut ports = vec![ContainerPort {
                name: Some("http".into()),
                port,
                protocol: Protocol::Tcp,
            }];
            if name == "web" {
                ports.push(ContainerPort {
                    name: Some("dns".into()),
                    port: 53,
                    protocol: Protocol::Udp,
                });
            }
            out.push(Pod {
                namespace: ns.into(),
                name: name.into(),
                labels: labels(&[("app", app)]),
                node: Some(node_of(name).into()),
                ips: vec![pod_ip(ns, name, false), pod_ip(ns, name, true)],
                host_network: false,
                ports,
                phase: None,
                terminating: false,
            });
        }
    }
    out
}

pub fn nodes() -> Vec<Node> {
    vec![
        Node {
            name: "n1".into(),
            labels: labels(&[("role", "worker")]),
            addresses: vec!["198.18.0.1".parse().unwrap()],
        },
        Node {
            name: "n2".into(),
            labels: labels(&[("role", "control")]),
            addresses: vec!["198.18.0.2".parse().unwrap()],
        },
    ]
}

/// The cluster policies of the world, each exercising a part of the semantics.
pub fn cluster_policies() -> Vec<ClusterPolicy> {
    let every_ns = LabelSelector::default();
    let t1 = sel(&[("tenant", "t1")]);
    vec![
        // Admin: tenant t1 takes monitoring on its web port, passes its own tenant to the
        // NetworkPolicies, and denies everyone else; its egress may not reach a range of
        // ports in an outside network, passes the worker nodes, accepts DNS by name.
        cnp(
            "tenant-t1",
            Tier::Admin,
            10,
            Subject::Namespaces(t1.clone()),
            vec![
                crule(
                    "allow-monitoring",
                    Action::Accept,
                    vec![pods_peer(sel(&[("role", "monitoring")]), sel(&[]))],
                    named("http"),
                ),
                crule(
                    "pass-same-tenant",
                    Action::Pass,
                    vec![pods_peer(t1.clone(), sel(&[]))],
                    vec![],
                ),
                crule(
                    "deny-other-tenants",
                    Action::Deny,
                    vec![pods_peer(every_ns.clone(), sel(&[]))],
                    vec![],
                ),
            ],
            vec![
                crule(
                    "deny-outside-range",
                    Action::Deny,
                    vec![network("203.0.113.0/24")],
                    vec![tcp(1000, 2000)],
                ),
                nodes_rule("pass-workers", Action::Pass, sel(&[("role", "worker")])),
                crule(
                    "accept-dns",
                    Action::Accept,
                    vec![pods_peer(every_ns.clone(), sel(&[]))],
                    named("dns"),
                ),
            ],
        ),
        // Admin, earlier (priority 5) and of the v1alpha1 kind: db pods refuse tenant t2
        // on 9090.
        ClusterPolicy {
            kind: ClusterPolicyKind::AdminNetworkPolicy,
            ..cnp(
                "db-refuses-t2",
                Tier::Admin,
                5,
                Subject::Pods {
                    namespaces: every_ns.clone(),
                    pods: sel(&[("app", "db")]),
                },
                vec![crule(
                    "deny-t2",
                    Action::Deny,
                    vec![pods_peer(sel(&[("tenant", "t2")]), sel(&[]))],
                    vec![tcp(9090, 9090)],
                )],
                vec![],
            )
        },
        // Baseline (BANP): web pods of any namespace are welcome, the rest denied; no
        // egress to control-plane nodes.
        ClusterPolicy {
            kind: ClusterPolicyKind::BaselineAdminNetworkPolicy,
            ..cnp(
                "default",
                Tier::Baseline,
                1000,
                Subject::Namespaces(every_ns.clone()),
                vec![
                    crule(
                        "allow-web",
                        Action::Accept,
                        vec![pods_peer(every_ns.clone(), sel(&[("app", "web")]))],
                        vec![],
                    ),
                    crule(
                        "deny-rest",
                        Action::Deny,
                        vec![pods_peer(every_ns.clone(), sel(&[]))],
                        vec![],
                    ),
                ],
                vec![nodes_rule(
                    "deny-control",
                    Action::Deny,
                    sel(&[("role", "control")]),
                )],
            )
        },
        // Baseline, earlier (priority 50): monitoring may reach pod ports 8000-9000 and
        // nothing else (a Deny with a peer of unknown kind: every peer).
        cnp(
            "monitoring-egress",
            Tier::Baseline,
            50,
            Subject::Namespaces(sel(&[("role", "monitoring")])),
            vec![],
            vec![
                crule(
                    "pods-8000-9000",
                    Action::Accept,
                    vec![network("10.244.0.0/16"), network("fd00:10:244::/48")],
                    vec![tcp(8000, 9000)],
                ),
                ClusterRule {
                    any_peer: true,
                    ..crule("pass-dns", Action::Pass, vec![], named("dns"))
                },
                ClusterRule {
                    any_peer: true,
                    ..crule("unknown-peer", Action::Deny, vec![], vec![])
                },
            ],
        ),
    ]
}

/// NetworkPolicies in between: t1b's db takes only its namespace's web pods on 9090; in
/// namespace `cnp`, a policy named like the ClusterNetworkPolicy `tenant-t1` isolates
/// every pod for ingress, open to 10.0.0.0/8.
pub fn network_policies() -> Vec<NetworkPolicy> {
    vec![
        NetworkPolicy {
            namespace: "t1b".into(),
            name: "db-from-web".into(),
            pod_selector: sel(&[("app", "db")]),
            policy_types: vec![PolicyType::Ingress],
            ingress: vec![Rule {
                peers: vec![Peer::Pods {
                    pods: sel(&[("app", "web")]),
                    namespaces: None,
                }],
                ports: vec![tcp(9090, 9090)],
            }],
            egress: vec![],
        },
        NetworkPolicy {
            namespace: "cnp".into(),
            name: "tenant-t1".into(),
            pod_selector: sel(&[]),
            policy_types: vec![PolicyType::Ingress],
            ingress: vec![Rule {
                peers: vec![network("10.0.0.0/8")],
                ports: vec![],
            }],
            egress: vec![],
        },
    ]
}

pub fn namespaces() -> Vec<Namespace> {
    vec![
        Namespace::new("t1a", labels(&[("tenant", "t1")])),
        Namespace::new("t1b", labels(&[("tenant", "t1")])),
        Namespace::new("t2", labels(&[("tenant", "t2")])),
        Namespace::new("mon", labels(&[("role", "monitoring")])),
        Namespace::new("cnp", Labels::new()),
    ]
}

/// The whole world.
pub fn world() -> Snapshot {
    world_with(cluster_policies())
}

/// The world with other cluster policies.
pub fn world_with(policies: Vec<ClusterPolicy>) -> Snapshot {
    Snapshot::new(namespaces(), pods(), network_policies())
        .with_cluster_policies(policies)
        .with_nodes(nodes())
}
