//! A pure reference evaluator of NetworkPolicy semantics, rule for rule as the NetworkPolicy API defines it,
//! and of the cluster-scoped tiers around it (ClusterNetworkPolicy, AdminNetworkPolicy,
//! BaselineAdminNetworkPolicy; see `crate::model::cluster`).
//!
//! It answers "may `from` open a connection to `to` on `port/proto`?" directly from the
//! objects, without any dataplane. `twill-policy explain` prints its reasons, and tests
//! use it as the oracle for the compiled nftables ruleset.
//!
//! Per direction: the Admin tier (the first matching rule of the Admin policies that select
//! the pod, by priority then name, decides: Accept allows, Deny denies, Pass skips the rest
//! of the tier), then NetworkPolicy (if one isolates the pod in this direction it decides),
//! then the Baseline tier (Accept and Pass allow, Deny denies), then the default: allowed.
//!
//! Rules implemented: per-direction isolation; union of all applicable policies; both
//! the source's egress and the destination's ingress must allow; empty `from`/`to` =
//! any peer, empty `ports` = any port and protocol; peer selectors (AND within one
//! peer, OR across peers, null namespaceSelector = the policy's namespace); ipBlock
//! with per-peer except, matching pod IPs too; named ports resolved against the
//! destination pod; endPort; hostNetwork pods are node traffic (never selected, never
//! matched by selectors); a pod's traffic to itself is never policed; a pod of a broken
//! namespace (an object in it could not be read) is isolated both ways and never matched
//! by a selector.

use std::net::IpAddr;

use std::fmt;

use crate::model::{
    Action, ClusterRule, Peer, Pod, PolicyPort, PolicyType, Port, Protocol, Rule, Snapshot, Tier,
};

/// One end of a connection: a pod (with the address it uses) or a bare address.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint<'a> {
    /// The pod, if the address belongs to one. hostNetwork pods count as no pod.
    pub pod: Option<&'a Pod>,
    /// The address used on the wire, if known. A pod endpoint without one uses its
    /// first address of the other end's family when ipBlocks are checked.
    pub ip: Option<IpAddr>,
}

impl<'a> Endpoint<'a> {
    /// A pod; its address is picked to match the other end's family (else its first).
    pub fn pod(pod: &'a Pod) -> Endpoint<'a> {
        Endpoint {
            pod: Some(pod),
            ip: None,
        }
    }

    /// A pod using a specific address (dual-stack).
    pub fn pod_ip(pod: &'a Pod, ip: IpAddr) -> Endpoint<'a> {
        Endpoint {
            pod: Some(pod),
            ip: Some(ip),
        }
    }

    /// An address; resolved to the pod that owns it, if any.
    pub fn ip(snap: &'a Snapshot, ip: IpAddr) -> Endpoint<'a> {
        Endpoint {
            pod: snap.pod_by_ip(ip),
            ip: Some(ip),
        }
    }

    fn policy_pod(&self) -> Option<&'a Pod> {
        self.pod.filter(|p| p.is_policy_pod())
    }

    fn describe(&self) -> String {
        match (self.pod, self.ip) {
            (Some(p), Some(ip)) => format!("{} ({ip})", p.key()),
            (Some(p), None) => p.key(),
            (None, Some(ip)) => ip.to_string(),
            (None, None) => "?".into(),
        }
    }
}

/// What decided one direction of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decider {
    /// Nothing applies (no pod-network pod at this end, a pod's traffic to itself), or
    /// nothing matched: the default, allowed.
    Default,
    /// The pod's namespace holds an object that cannot be read: denied (fail closed).
    BrokenNamespace,
    /// A NetworkPolicy isolates the pod in this direction: its allow rules decided.
    NetworkPolicy,
    /// The first matching rule of a cluster policy: `Accept` or `Deny` (a `Pass` never
    /// decides; it hands over to the next tier).
    ClusterRule {
        tier: Tier,
        /// [`crate::model::ClusterPolicy::key`], e.g. `cnp/deny-tenants`.
        policy: String,
        dir: PolicyType,
        /// Index of the rule in the policy's rules of this direction.
        index: usize,
        /// The rule's name (may be empty).
        name: String,
        action: Action,
    },
}

impl fmt::Display for Decider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decider::Default => f.write_str("default (allowed)"),
            Decider::BrokenNamespace => f.write_str("broken namespace (denied)"),
            Decider::NetworkPolicy => f.write_str("NetworkPolicy"),
            Decider::ClusterRule {
                tier,
                policy,
                dir,
                index,
                name,
                action,
            } => write!(f, "{tier} tier {policy} {dir}[{index}] {name:?}: {action}"),
        }
    }
}

/// The outcome for one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectionVerdict {
    pub allowed: bool,
    /// Whether a NetworkPolicy isolates the pod at this end in this direction.
    pub isolated: bool,
    /// Policies that isolate the pod in this direction (namespace/name).
    pub isolating: Vec<String>,
    /// The rules that allow the connection, as `namespace/name ingress[i]`.
    pub allowed_by: Vec<String>,
    /// The tier and rule that decided.
    pub decided_by: Decider,
}

impl DirectionVerdict {
    fn open() -> DirectionVerdict {
        DirectionVerdict {
            allowed: true,
            isolated: false,
            isolating: vec![],
            allowed_by: vec![],
            decided_by: Decider::Default,
        }
    }
}

/// The answer: allowed iff both the egress and ingress sides allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub egress: DirectionVerdict,
    pub ingress: DirectionVerdict,
    /// Human-readable lines explaining the outcome.
    pub reasons: Vec<String>,
}

/// Whether a rule's `ports` admit `port/proto` towards `dst` (named ports are looked up in
/// the destination pod's container ports: name, protocol and number must all match).
pub fn port_matches(pp: &PolicyPort, dst: Option<&Pod>, port: u16, proto: Protocol) -> bool {
    if pp.protocol != proto {
        return false;
    }
    match &pp.port {
        None => true,
        Some(Port::Range(a, b)) => (*a..=*b).contains(&port),
        Some(Port::Named(n)) => dst.and_then(|p| p.named_port(n, proto)) == Some(port),
    }
}

/// Whether a rule's `ports` admit `port/proto` towards `dst` (none = every port and
/// protocol).
fn ports_match(ports: &[PolicyPort], dst: Option<&Pod>, port: u16, proto: Protocol) -> bool {
    ports.is_empty() || ports.iter().any(|pp| port_matches(pp, dst, port, proto))
}

fn peer_matches(snap: &Snapshot, peer: &Peer, policy_ns: &str, ep: &Endpoint<'_>) -> bool {
    match peer {
        Peer::IpBlock(b) => {
            // ipBlocks match addresses, pod addresses included.
            match (ep.ip, ep.pod) {
                (Some(ip), _) => b.contains(ip),
                (None, Some(p)) => p.ips.iter().any(|ip| b.contains(*ip)),
                (None, None) => false,
            }
        }
        Peer::Pods { .. } => ep
            .policy_pod()
            .is_some_and(|p| snap.peer_selects_pod(peer, policy_ns, p)),
    }
}

/// Whether `rule` (of a policy in `policy_ns`) admits a connection whose remote end is
/// `peer`, towards destination pod `dst`, on `port/proto`.
pub fn rule_matches(
    snap: &Snapshot,
    rule: &Rule,
    policy_ns: &str,
    peer: &Endpoint<'_>,
    dst: Option<&Pod>,
    port: u16,
    proto: Protocol,
) -> bool {
    let peers_ok = rule.peers.is_empty()
        || rule
            .peers
            .iter()
            .any(|p| peer_matches(snap, p, policy_ns, peer));
    peers_ok && ports_match(&rule.ports, dst, port, proto)
}

/// Whether cluster rule `rule` of direction `dir` matches a connection whose remote end is
/// `peer`, towards destination pod `dst`, on `port/proto`: its peer matches (`any_peer`, a
/// pod or network peer, or, egress, an address of a node its `nodes` select; no peer at all
/// matches nothing) and its port matches (no ports = every port and protocol).
pub fn cluster_rule_matches(
    snap: &Snapshot,
    rule: &ClusterRule,
    dir: PolicyType,
    peer: &Endpoint<'_>,
    dst: Option<&Pod>,
    port: u16,
    proto: Protocol,
) -> bool {
    let node_ok = || {
        dir == PolicyType::Egress
            && peer.ip.is_some_and(|ip| {
                rule.nodes.iter().any(|sel| {
                    snap.nodes
                        .iter()
                        .any(|n| sel.matches(&n.labels) && n.addresses.contains(&ip))
                })
            })
    };
    // Cluster pod peers always name their namespaces, so the policy namespace is unused.
    let peers_ok =
        rule.any_peer || rule.peers.iter().any(|p| peer_matches(snap, p, "", peer)) || node_ok();
    peers_ok && ports_match(&rule.ports, dst, port, proto)
}

/// How one tier ended for a pod and direction.
enum TierOutcome {
    /// A rule accepted or denied.
    Decided(Decider),
    /// A rule passed: the rest of the tier is skipped.
    Passed,
    /// No rule of the tier matched.
    NoMatch,
}

#[allow(clippy::too_many_arguments)]
fn tier(
    snap: &Snapshot,
    tier: Tier,
    dir: PolicyType,
    pod: &Pod,
    remote: &Endpoint<'_>,
    dst: Option<&Pod>,
    port: u16,
    proto: Protocol,
    reasons: &mut Vec<String>,
) -> TierOutcome {
    let ns_labels = snap.namespace_labels(&pod.namespace);
    let mut selecting = Vec::new();
    for pol in snap
        .cluster_policies
        .iter()
        .filter(|p| p.tier == tier && p.selects(pod, &ns_labels))
    {
        selecting.push(pol.key());
        for (index, rule) in pol.rules(dir).iter().enumerate() {
            if !cluster_rule_matches(snap, rule, dir, remote, dst, port, proto) {
                continue;
            }
            let decider = Decider::ClusterRule {
                tier,
                policy: pol.key(),
                dir,
                index,
                name: rule.name.clone(),
                action: rule.action,
            };
            if rule.action == Action::Pass {
                reasons.push(format!(
                    "{dir} of {}: {decider} (rest of the {tier} tier skipped)",
                    pod.key()
                ));
                return TierOutcome::Passed;
            }
            reasons.push(format!("{dir} of {}: {decider}", pod.key()));
            return TierOutcome::Decided(decider);
        }
    }
    if !selecting.is_empty() {
        reasons.push(format!(
            "{dir} of {}: {tier} tier: selected by {}; no {dir} rule matches {} on {proto}/{port}",
            pod.key(),
            selecting.join(", "),
            remote.describe()
        ));
    }
    TierOutcome::NoMatch
}

#[allow(clippy::too_many_arguments)]
fn direction(
    snap: &Snapshot,
    dir: PolicyType,
    local: &Endpoint<'_>,
    remote: &Endpoint<'_>,
    dst: Option<&Pod>,
    port: u16,
    proto: Protocol,
    reasons: &mut Vec<String>,
) -> DirectionVerdict {
    let Some(pod) = local.policy_pod() else {
        return DirectionVerdict::open();
    };
    if let Some(errors) = snap.broken.get(&pod.namespace) {
        let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        reasons.push(format!(
            "{dir} of {}: namespace {} fails closed (an object in it cannot be read: {}): denied",
            pod.key(),
            pod.namespace,
            errors.join("; ")
        ));
        return DirectionVerdict {
            allowed: false,
            isolated: true,
            isolating: vec![],
            allowed_by: vec![],
            decided_by: Decider::BrokenNamespace,
        };
    }
    let decided = |decider: Decider| DirectionVerdict {
        allowed: matches!(
            decider,
            Decider::Default
                | Decider::ClusterRule {
                    action: Action::Accept,
                    ..
                }
        ),
        isolated: false,
        isolating: vec![],
        allowed_by: vec![],
        decided_by: decider,
    };
    let run_tier = |t: Tier, reasons: &mut Vec<String>| {
        tier(snap, t, dir, pod, remote, dst, port, proto, reasons)
    };
    if let TierOutcome::Decided(d) = run_tier(Tier::Admin, reasons) {
        return decided(d);
    }
    let mut isolating = Vec::new();
    let mut allowed_by = Vec::new();
    for pol in snap.policies.iter().filter(|p| p.selects(pod, dir)) {
        isolating.push(pol.key());
        for (i, rule) in pol.rules(dir).iter().enumerate() {
            if rule_matches(snap, rule, &pol.namespace, remote, dst, port, proto) {
                allowed_by.push(format!("{} {dir}[{i}]", pol.key()));
            }
        }
    }
    let isolated = !isolating.is_empty();
    let allowed = !isolated || !allowed_by.is_empty();
    if !isolated {
        if let TierOutcome::Decided(d) = run_tier(Tier::Baseline, reasons) {
            return decided(d);
        }
        reasons.push(format!(
            "{dir} of {}: not isolated (no NetworkPolicy selects it for {dir}): allowed",
            pod.key()
        ));
        return decided(Decider::Default);
    } else if allowed {
        reasons.push(format!(
            "{dir} of {}: isolated by {}; allowed by {}",
            pod.key(),
            isolating.join(", "),
            allowed_by.join(", ")
        ));
    } else {
        reasons.push(format!(
            "{dir} of {}: isolated by {}; no {dir} rule admits {} on {proto}/{port}: denied",
            pod.key(),
            isolating.join(", "),
            remote.describe()
        ));
    }
    DirectionVerdict {
        allowed,
        isolated,
        isolating,
        allowed_by,
        decided_by: Decider::NetworkPolicy,
    }
}

/// Evaluates a new connection from `from` to `to` on `port/proto`.
pub fn allowed(
    snap: &Snapshot,
    from: &Endpoint<'_>,
    to: &Endpoint<'_>,
    port: u16,
    proto: Protocol,
) -> Verdict {
    let mut reasons = Vec::new();
    if let (Some(a), Some(b)) = (from.policy_pod(), to.policy_pod()) {
        if a.namespace == b.namespace && a.name == b.name {
            let open = DirectionVerdict::open();
            return Verdict {
                allowed: true,
                egress: open.clone(),
                ingress: open,
                reasons: vec![format!(
                    "{} to itself: a pod's traffic to itself is never policed",
                    a.key()
                )],
            };
        }
    }
    // Resolve a missing address to one of the other end's family, for ipBlocks.
    let fam_fill = |ep: &Endpoint<'_>, other: &Endpoint<'_>| -> Option<IpAddr> {
        ep.ip.or_else(|| {
            let pod = ep.pod?;
            match other.ip {
                Some(o) => pod
                    .ips
                    .iter()
                    .copied()
                    .find(|ip| ip.is_ipv4() == o.is_ipv4()),
                None => pod.ips.first().copied(),
            }
        })
    };
    let from = Endpoint {
        pod: from.pod,
        ip: fam_fill(from, to),
    };
    let to = Endpoint {
        pod: to.pod,
        ip: fam_fill(to, &from),
    };
    let dst = to.policy_pod();
    let egress = direction(
        snap,
        PolicyType::Egress,
        &from,
        &to,
        dst,
        port,
        proto,
        &mut reasons,
    );
    let ingress = direction(
        snap,
        PolicyType::Ingress,
        &to,
        &from,
        dst,
        port,
        proto,
        &mut reasons,
    );
    if from.policy_pod().is_none() {
        reasons.insert(
            0,
            format!(
                "source {} is not a pod-network pod: no egress policy applies",
                from.describe()
            ),
        );
    }
    if to.policy_pod().is_none() {
        reasons.push(format!(
            "destination {} is not a pod-network pod: no ingress policy applies",
            to.describe()
        ));
    }
    let allowed = egress.allowed && ingress.allowed;
    reasons.push(format!(
        "verdict: {}",
        if allowed { "ALLOWED" } else { "DENIED" }
    ));
    Verdict {
        allowed,
        egress,
        ingress,
        reasons,
    }
}
