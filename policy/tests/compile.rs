//! compile() against the evaluator on every upstream scenario (both families where the
//! scenario has no IPv4-only ipBlocks), golden files of the nft script for a few
//! scenarios, and (as root) loading each golden script into a throw-away netns.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use twill_policy::compile::{compile, Decision, Options};
use twill_policy::eval::{allowed, Endpoint};
use twill_policy_testkit::conformance::{
    ipv4_of, ipv6_of, load_scenarios, node_of, pairs, step_snapshot, step_uses_ips, SCENARIOS,
};

fn split(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap()
}

#[test]
fn compiled_ruleset_agrees_with_evaluator_on_every_scenario() {
    let scenarios = load_scenarios(SCENARIOS).unwrap();
    let (mut checked, mut failures) = (0, Vec::new());
    for sc in &scenarios {
        for (si, step) in sc.steps.iter().enumerate() {
            let snap = step_snapshot(step).unwrap();
            let rulesets: BTreeMap<String, _> = ["n1", "n2", "n3"]
                .iter()
                .map(|n| (n.to_string(), compile(&snap, n, &Options::default())))
                .collect();
            let mut families: Vec<fn(&str, &str) -> std::net::IpAddr> = vec![ipv4_of];
            if !step_uses_ips(step) {
                families.push(ipv6_of);
            }
            for probe in &step.probes {
                for (s, d) in pairs() {
                    let want_denied = probe.expect_denied.contains(&format!("{s}->{d}"));
                    for ip_of in &families {
                        let (sip, dip) = (
                            ip_of(split(&s).0, split(&s).1),
                            ip_of(split(&d).0, split(&d).1),
                        );
                        let src_rs = &rulesets[&node_of(split(&s).0)];
                        let dst_rs = &rulesets[&node_of(split(&d).0)];
                        let got = src_rs.decide(sip, dip, probe.protocol, probe.port)
                            == Decision::Accept
                            && dst_rs.decide(sip, dip, probe.protocol, probe.port)
                                == Decision::Accept;
                        let oracle = allowed(
                            &snap,
                            &Endpoint::ip(&snap, sip),
                            &Endpoint::ip(&snap, dip),
                            probe.port,
                            probe.protocol,
                        )
                        .allowed;
                        checked += 1;
                        if got != oracle || (sip.is_ipv4() && got == want_denied) {
                            failures.push(format!(
                                "{} step {si} {}/{} {s}->{d} ({sip}->{dip}): compiled={got} evaluator={oracle} expected={}",
                                sc.id, probe.protocol, probe.port, !want_denied
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("compiled rulesets: {checked} (pair, family) checks agree");
}

/// A namespace with an object that cannot be read fails closed: its pods are isolated both
/// ways and matched by no selector, and the compiled rulesets still agree with the
/// evaluator on every pair; the other namespaces keep their verdicts.
#[test]
fn broken_namespaces_fail_closed_in_compile_and_evaluator_alike() {
    use twill_policy::source::ObjectError;
    let scenarios = load_scenarios(SCENARIOS).unwrap();
    let (mut checked, mut failures) = (0, Vec::new());
    for sc in &scenarios {
        for (si, step) in sc.steps.iter().enumerate() {
            let whole = step_snapshot(step).unwrap();
            for broken in ["x", "y", "z"] {
                let snap = whole.clone().with_broken([(
                    broken.to_string(),
                    ObjectError {
                        origin: "test".into(),
                        message: "unreadable".into(),
                        ..ObjectError::default()
                    },
                )]);
                let rulesets: BTreeMap<String, _> = ["n1", "n2", "n3"]
                    .iter()
                    .map(|n| (n.to_string(), compile(&snap, n, &Options::default())))
                    .collect();
                for probe in &step.probes {
                    for (s, d) in pairs() {
                        let (sip, dip) = (
                            ipv4_of(split(&s).0, split(&s).1),
                            ipv4_of(split(&d).0, split(&d).1),
                        );
                        let src_rs = &rulesets[&node_of(split(&s).0)];
                        let dst_rs = &rulesets[&node_of(split(&d).0)];
                        let got = src_rs.decide(sip, dip, probe.protocol, probe.port)
                            == Decision::Accept
                            && dst_rs.decide(sip, dip, probe.protocol, probe.port)
                                == Decision::Accept;
                        let ep = |ip| Endpoint::ip(&snap, ip);
                        let oracle =
                            allowed(&snap, &ep(sip), &ep(dip), probe.port, probe.protocol).allowed;
                        let whole_ep = |ip| Endpoint::ip(&whole, ip);
                        let before = allowed(
                            &whole,
                            &whole_ep(sip),
                            &whole_ep(dip),
                            probe.port,
                            probe.protocol,
                        )
                        .allowed;
                        let touches = split(&s).0 == broken || split(&d).0 == broken;
                        // Closed if it touches the broken namespace (but for a pod's
                        // traffic to itself, never policed), else unchanged.
                        let want = if touches { s == d } else { before };
                        checked += 1;
                        if got != oracle || oracle != want {
                            failures.push(format!(
                                "{} step {si} {broken} broken {}/{} {s}->{d}: compiled={got} evaluator={oracle} want={want}",
                                sc.id, probe.protocol, probe.port
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("broken namespaces: {checked} pair checks agree");
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Scenarios whose node-n1 script is kept as a golden file.
const GOLDEN: [&str; 6] = ["S02", "S09", "S17", "S18", "S34", "S13-SCTP"];

/// Options with node n1's pod subnets (unknown-pod isolation on).
fn n1_cidrs() -> Options {
    Options {
        pod_cidrs: vec![
            "10.244.1.0/24".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        ],
        ..Options::default()
    }
}

fn golden_scripts() -> Vec<(String, String)> {
    let scenarios = load_scenarios(SCENARIOS).unwrap();
    let s02 = step_snapshot(&scenarios.iter().find(|s| s.id == "S02").unwrap().steps[0]).unwrap();
    let with_cidrs = (
        "S02-pod-cidrs".to_string(),
        compile(&s02, "n1", &n1_cidrs()).render(),
    );
    GOLDEN
        .iter()
        .map(|id| {
            let sc = scenarios
                .iter()
                .find(|s| s.id == *id)
                .unwrap_or_else(|| panic!("no scenario {id}"));
            let snap = step_snapshot(&sc.steps[0]).unwrap();
            (
                id.to_string(),
                compile(&snap, "n1", &Options::default()).render(),
            )
        })
        .chain(std::iter::once(with_cidrs))
        .chain(["n1", "n2"].into_iter().map(|n| {
            // Cluster policies in both tiers (deny and after-Admin chains, node, network
            // and named-port sets), unknown-pod isolation on.
            (
                format!("tiers-{n}"),
                compile(&tiers::world(), n, &n1_cidrs()).render(),
            )
        }))
        .collect()
}

#[test]
fn unknown_local_addresses_are_isolated_until_known() {
    let scenarios = load_scenarios(SCENARIOS).unwrap();
    // S05: x is isolated for ingress, open to every namespace; y and z are not selected.
    let snap = step_snapshot(&scenarios.iter().find(|s| s.id == "S05").unwrap().steps[0]).unwrap();
    let rs = compile(&snap, "n1", &n1_cidrs());
    let (xa, xb) = (ipv4_of("x", "a"), ipv4_of("x", "b"));
    let ya = ipv4_of("y", "a");
    let newcomer: std::net::IpAddr = "10.244.1.77".parse().unwrap();
    let newcomer6: std::net::IpAddr = "fd00:10:244:1::77".parse().unwrap();
    use twill_policy::model::{PolicyType, Protocol};
    // Known pods keep their verdicts.
    assert_eq!(rs.decide(ya, xa, Protocol::Tcp, 80), Decision::Accept);
    assert_eq!(rs.decide(xb, xa, Protocol::Tcp, 80), Decision::Accept);
    // A local address no pod has yet: isolated both ways, whatever the policies say.
    assert_eq!(
        rs.decide(newcomer, xa, Protocol::Tcp, 80),
        Decision::Drop(PolicyType::Egress)
    );
    assert_eq!(
        rs.decide(ya, newcomer, Protocol::Udp, 81),
        Decision::Drop(PolicyType::Ingress)
    );
    assert_eq!(
        rs.decide(ipv6_of("y", "a"), newcomer6, Protocol::Tcp, 80),
        Decision::Drop(PolicyType::Ingress)
    );
    // Other nodes' subnets are not this node's business.
    let remote: std::net::IpAddr = "10.244.2.77".parse().unwrap();
    assert_eq!(rs.decide(remote, ya, Protocol::Tcp, 80), Decision::Accept);
    let script = rs.render();
    for want in [
        "ip saddr @node_pods_v4 ip saddr != @known_pods_v4 jump unknown-egress",
        "ip daddr @node_pods_v4 ip daddr != @known_pods_v4 jump unknown-ingress",
        "ip6 saddr @node_pods_v6 ip6 saddr != @known_pods_v6 jump unknown-egress",
        "elements = { 10.244.1.2, 10.244.1.3, 10.244.1.4 }",
        "log prefix \"twill-policy drop egress unknown pod: \"",
    ] {
        assert!(script.contains(want), "missing {want:?}:\n{script}");
    }
    // Without pod subnets nothing of it is emitted.
    let plain = compile(&snap, "n1", &Options::default());
    assert!(!plain.render().contains("unknown"));
    assert_eq!(
        plain.decide(newcomer, xb, Protocol::Tcp, 80),
        Decision::Accept
    );
    // Known pods: the same verdicts with and without unknown-pod isolation.
    for (s, d) in pairs() {
        let (sip, dip) = (
            ipv4_of(split(&s).0, split(&s).1),
            ipv4_of(split(&d).0, split(&d).1),
        );
        assert_eq!(
            rs.decide(sip, dip, Protocol::Tcp, 80),
            plain.decide(sip, dip, Protocol::Tcp, 80),
            "{s}->{d}"
        );
    }
}

#[test]
fn golden_scripts_match() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (id, script) in golden_scripts() {
        let path = golden_dir().join(format!("{id}.nft"));
        if update {
            std::fs::write(&path, &script).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
        assert_eq!(
            script, want,
            "{id}: compile output changed (UPDATE_GOLDEN=1 to accept)"
        );
    }
}

#[test]
fn golden_scripts_load_into_nft() {
    if !nix_is_root() {
        eprintln!("skipping: loading rulesets needs root (a throw-away network namespace)");
        return;
    }
    for (id, script) in golden_scripts() {
        // A private network namespace per load: never the root namespace's nftables.
        let mut child = Command::new("unshare")
            .args([
                "-n",
                "sh",
                "-c",
                "nft -f - && nft list table inet twill-policy",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{id}: nft rejected the script: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

mod tiers;

/// Every (source, destination) of the tiers world: each pod in both families, and the
/// addresses that are no pod's (IPv4).
fn tiers_endpoints() -> Vec<(String, std::net::IpAddr, Option<&'static str>)> {
    let mut out = Vec::new();
    for ns in tiers::NAMESPACES {
        for pod in tiers::PODS {
            for v6 in [false, true] {
                out.push((
                    format!("{ns}/{pod}"),
                    tiers::pod_ip(ns, pod, v6),
                    Some(tiers::node_of(pod)),
                ));
            }
        }
    }
    for ip in tiers::OTHERS {
        out.push((ip.to_string(), ip.parse().unwrap(), None));
    }
    out
}

/// The compiled rulesets (source node's egress, destination node's ingress) agree with
/// the evaluator on every pair, port and protocol of a world with Admin Accept, Deny and
/// Pass, NetworkPolicies in between, Baseline Accept, Pass and Deny, node and network
/// peers, named ports and ranges; with each cluster policy left out in turn; and with a
/// broken namespace (its pods isolated both ways whatever the tiers say).
#[test]
fn compiled_tiers_agree_with_evaluator_on_every_pair() {
    use twill_policy::source::ObjectError;
    let all = tiers::cluster_policies();
    let mut worlds = vec![tiers::world()];
    for i in 0..all.len() {
        let mut some = all.clone();
        some.remove(i);
        worlds.push(tiers::world_with(some));
    }
    for broken in ["t1a", "mon"] {
        worlds.push(tiers::world().with_broken([(
            broken.to_string(),
            ObjectError {
                origin: "test".into(),
                message: "unreadable".into(),
                ..ObjectError::default()
            },
        )]));
    }
    let eps = tiers_endpoints();
    let (mut checked, mut failures) = (0, Vec::new());
    for (wi, snap) in worlds.iter().enumerate() {
        let rulesets: BTreeMap<&str, _> = ["n1", "n2"]
            .into_iter()
            .map(|n| (n, compile(snap, n, &Options::default())))
            .collect();
        for (s, sip, snode) in &eps {
            for (d, dip, dnode) in &eps {
                // A pod's traffic to itself never leaves it (never policed).
                if s == d || sip.is_ipv4() != dip.is_ipv4() || (snode.is_none() && dnode.is_none())
                {
                    continue;
                }
                for (proto, port) in tiers::PROBES {
                    let egress_ok = snode.is_none_or(|n| {
                        rulesets[n].decide(*sip, *dip, proto, port) == Decision::Accept
                    });
                    let ingress_ok = dnode.is_none_or(|n| {
                        rulesets[n].decide(*sip, *dip, proto, port) == Decision::Accept
                    });
                    let got = egress_ok && ingress_ok;
                    let v = allowed(
                        snap,
                        &Endpoint::ip(snap, *sip),
                        &Endpoint::ip(snap, *dip),
                        port,
                        proto,
                    );
                    checked += 1;
                    if got != v.allowed {
                        failures.push(format!(
                            "world {wi} {s} ({sip}) -> {d} ({dip}) {proto}/{port}: compiled={got} evaluator={}: {}",
                            v.allowed,
                            v.reasons.join(" | ")
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked}:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("tiers: {checked} (pair, port) checks agree");
}

/// What decided, for connections that show each part of the tier semantics (the
/// evaluator; the test above holds the compiled rulesets to it).
#[test]
fn tiers_decide_in_order_admin_networkpolicy_baseline_default() {
    use twill_policy::eval::Decider;
    use twill_policy::model::{Action, PolicyType, Protocol, Tier};
    let snap = tiers::world();
    let ip = |s: &str| -> std::net::IpAddr {
        match s.split_once('/') {
            Some((ns, pod)) => tiers::pod_ip(ns, pod, false),
            None => s.parse().unwrap(),
        }
    };
    let rule = |tier, policy: &str, dir, index, name: &str, action| Decider::ClusterRule {
        tier,
        policy: policy.into(),
        dir,
        index,
        name: name.into(),
        action,
    };
    use PolicyType::{Egress, Ingress};
    use Protocol::{Tcp, Udp};
    use Tier::{Admin, Baseline};
    // (from, to, protocol, port, allowed, the direction that decided, what decided it)
    let cases = [
        // Admin Deny after an Accept and a Pass that do not match.
        (
            "t2/web",
            "t1a/web",
            Tcp,
            8080,
            false,
            Ingress,
            rule(
                Admin,
                "cnp/tenant-t1",
                Ingress,
                2,
                "deny-other-tenants",
                Action::Deny,
            ),
        ),
        // Admin Accept on a named port (t1a/web's http is 8080).
        (
            "mon/web",
            "t1a/web",
            Tcp,
            8080,
            true,
            Ingress,
            rule(
                Admin,
                "cnp/tenant-t1",
                Ingress,
                0,
                "allow-monitoring",
                Action::Accept,
            ),
        ),
        // ... and t1a/db's http is 9090, but the Baseline denies monitoring's egress
        // beyond 9000 (a Deny with a peer of unknown kind: every peer).
        (
            "mon/web",
            "t1a/db",
            Tcp,
            9090,
            false,
            Egress,
            rule(
                Baseline,
                "cnp/monitoring-egress",
                Egress,
                2,
                "unknown-peer",
                Action::Deny,
            ),
        ),
        // Priority: the AdminNetworkPolicy (5) before the ClusterNetworkPolicy (10).
        (
            "t2/web",
            "t1b/db",
            Tcp,
            9090,
            false,
            Ingress,
            rule(
                Admin,
                "anp/db-refuses-t2",
                Ingress,
                0,
                "deny-t2",
                Action::Deny,
            ),
        ),
        // Admin Pass, then the NetworkPolicy that isolates t1b/db decides.
        (
            "t1a/web",
            "t1b/db",
            Tcp,
            9090,
            false,
            Ingress,
            Decider::NetworkPolicy,
        ),
        (
            "t1b/web",
            "t1b/db",
            Tcp,
            9090,
            true,
            Ingress,
            Decider::NetworkPolicy,
        ),
        // Admin Pass, no NetworkPolicy: the Baseline decides.
        (
            "t1a/db",
            "t1b/web",
            Tcp,
            8080,
            false,
            Ingress,
            rule(
                Baseline,
                "banp/default",
                Ingress,
                1,
                "deny-rest",
                Action::Deny,
            ),
        ),
        (
            "t1a/web",
            "t1b/web",
            Tcp,
            8080,
            true,
            Ingress,
            rule(
                Baseline,
                "banp/default",
                Ingress,
                0,
                "allow-web",
                Action::Accept,
            ),
        ),
        // Networks with a port range.
        (
            "t1a/web",
            "203.0.113.5",
            Tcp,
            1500,
            false,
            Egress,
            rule(
                Admin,
                "cnp/tenant-t1",
                Egress,
                0,
                "deny-outside-range",
                Action::Deny,
            ),
        ),
        (
            "t1a/web",
            "203.0.113.5",
            Tcp,
            2500,
            true,
            Egress,
            Decider::Default,
        ),
        // Nodes: a control-plane node is denied by the Baseline; a worker is passed by the
        // Admin tier and allowed by default.
        (
            "t1a/web",
            "198.18.0.2",
            Tcp,
            8080,
            false,
            Egress,
            rule(
                Baseline,
                "banp/default",
                Egress,
                0,
                "deny-control",
                Action::Deny,
            ),
        ),
        (
            "t1a/web",
            "198.18.0.1",
            Tcp,
            8080,
            true,
            Egress,
            Decider::Default,
        ),
        // A NetworkPolicy in a namespace named cnp, named like a ClusterNetworkPolicy.
        (
            "t2/db",
            "cnp/web",
            Tcp,
            8080,
            true,
            Ingress,
            Decider::NetworkPolicy,
        ),
        // A source that is no pod matches no ingress peer: not even the Baseline's Deny.
        (
            "192.0.2.7",
            "t2/web",
            Tcp,
            8080,
            true,
            Ingress,
            Decider::Default,
        ),
        // An egress named port names no protocol: UDP 53 is t2/web's dns.
        (
            "t1a/web",
            "t2/web",
            Udp,
            53,
            true,
            Egress,
            rule(
                Admin,
                "cnp/tenant-t1",
                Egress,
                2,
                "accept-dns",
                Action::Accept,
            ),
        ),
    ];
    let rulesets: BTreeMap<&str, _> = ["n1", "n2"]
        .into_iter()
        .map(|n| (n, compile(&snap, n, &Options::default())))
        .collect();
    for (from, to, proto, port, want, dir, decider) in cases {
        let v = allowed(
            &snap,
            &Endpoint::ip(&snap, ip(from)),
            &Endpoint::ip(&snap, ip(to)),
            port,
            proto,
        );
        let side = match dir {
            Egress => &v.egress,
            Ingress => &v.ingress,
        };
        let what = format!("{from} -> {to} {proto}/{port}: {}", v.reasons.join(" | "));
        assert_eq!(v.allowed, want, "{what}");
        assert_eq!(side.decided_by, decider, "{what}");
        // The compiled tables of the nodes involved say the same.
        let node = |e: &str| e.split_once('/').map(|(_, pod)| tiers::node_of(pod));
        let got = [node(from), node(to)]
            .into_iter()
            .flatten()
            .all(|n| rulesets[n].decide(ip(from), ip(to), proto, port) == Decision::Accept);
        assert_eq!(got, want, "compiled: {what}");
    }
    // explain's reason names the tier, the policy, the rule and its action.
    let v = allowed(
        &snap,
        &Endpoint::ip(&snap, ip("t2/web")),
        &Endpoint::ip(&snap, ip("t1a/web")),
        8080,
        Tcp,
    );
    assert!(
        v.reasons.contains(
            &"ingress of t1a/web: Admin tier cnp/tenant-t1 ingress[2] \"deny-other-tenants\": Deny"
                .to_string()
        ),
        "{:?}",
        v.reasons
    );
}

/// The fail-closed table isolates (a chain that only drops) exactly the pod directions
/// that have a chain in the full table, and names no set.
#[test]
fn fail_closed_tiers_isolate_every_pod_with_a_chain() {
    use twill_policy::compile::{ChainEnd, ChainKind};
    let snap = tiers::world();
    for node in ["n1", "n2"] {
        let full = compile(&snap, node, &Options::default());
        let closed = compile(
            &snap,
            node,
            &Options {
                allow_rules: false,
                ..Options::default()
            },
        );
        let pod_chains = |rs: &twill_policy::compile::Ruleset| -> Vec<String> {
            rs.chains
                .iter()
                .filter(|c| c.kind == ChainKind::Pod)
                .map(|c| c.name.clone())
                .collect()
        };
        assert!(!pod_chains(&full).is_empty());
        assert_eq!(pod_chains(&closed), pod_chains(&full), "{node}");
        assert!(closed
            .chains
            .iter()
            .all(|c| c.kind == ChainKind::Pod && c.rules.is_empty() && c.end == ChainEnd::Drop));
        assert!(closed.addr_sets.is_empty() && closed.tuple_sets.is_empty());
        assert_eq!(closed.ingress_map, full.ingress_map);
        assert_eq!(closed.egress_map, full.egress_map);
    }
    // A world whose cluster policies only Accept and Pass: no chain but those of the
    // NetworkPolicies (a chain that could only return is left out).
    let open = tiers::world_with(
        tiers::cluster_policies()
            .into_iter()
            .map(|mut p| {
                for r in p.ingress.iter_mut().chain(p.egress.iter_mut()) {
                    if r.action == twill_policy::model::Action::Deny {
                        r.action = twill_policy::model::Action::Pass;
                    }
                }
                p
            })
            .collect(),
    );
    let rs = compile(&open, "n1", &Options::default());
    let names: Vec<&str> = rs.chains.iter().map(|c| c.name.as_str()).collect();
    // Only the NetworkPolicies' chains (cnp/web ingress) are left on n1.
    assert_eq!(names, ["pod-in/cnp/web"], "{}", rs.render());
}

/// The incremental transaction between tables with and without cluster policies: a deny
/// or after-Admin chain is created before any rule names it, and dead chains are all
/// flushed before any is deleted (a dead pod chain may `goto` a dead deny chain). The
/// root test in `incremental.rs` applies such transactions; this checks their order
/// without root.
#[test]
fn tier_chains_exist_before_their_gotos_and_die_after_them() {
    let without = compile(&tiers::world_with(vec![]), "n2", &Options::default()).table_def();
    let with = compile(&tiers::world(), "n2", &Options::default()).table_def();
    let (up, _) = with.diff(&without).expect("incremental");
    let lines: Vec<&str> = up.lines().collect();
    let mut gotos = 0;
    for (i, l) in lines.iter().enumerate() {
        for target in l.split("goto ").skip(1) {
            let target = target.split_whitespace().next().unwrap();
            gotos += 1;
            let created = lines[..i]
                .iter()
                .any(|p| p.starts_with(&format!("add chain inet twill-policy {target} ")));
            assert!(created, "line {i} names {target} before it exists:\n{up}");
        }
    }
    assert!(gotos > 0, "{up}");
    let (down, _) = without.diff(&with).expect("incremental");
    let down_lines: Vec<&str> = down.lines().collect();
    let last_flush = down_lines
        .iter()
        .rposition(|l| l.starts_with("flush chain"))
        .unwrap();
    let first_delete = down_lines
        .iter()
        .position(|l| l.starts_with("delete chain"))
        .unwrap();
    assert!(last_flush < first_delete, "{down}");
    assert!(down.contains("delete chain inet twill-policy pod-in/t1a/db/admin-deny\n"));
    // Deny and after-Admin chains own no counter: only pod chains' counters go.
    assert!(!down.contains("delete counter inet twill-policy pod-in/t1a/db/admin-deny"));
    assert!(down.contains("delete counter inet twill-policy pod-in/t1a/db\n"));
}
