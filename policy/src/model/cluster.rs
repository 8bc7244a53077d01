//! Cluster-scoped policy (`policy.networking.k8s.io`): ClusterNetworkPolicy (v1alpha2,
//! tiers Admin and Baseline) and its predecessors AdminNetworkPolicy and
//! BaselineAdminNetworkPolicy (v1alpha1), all read into one model, [`ClusterPolicy`].
//!
//! Evaluation order for one pod and one direction: the Admin tier (every ClusterNetworkPolicy
//! of tier Admin and every AdminNetworkPolicy that selects the pod, by [`ClusterPolicy::order`],
//! each policy's rules in the order written), then NetworkPolicy, then the Baseline tier
//! (ClusterNetworkPolicy of tier Baseline, BaselineAdminNetworkPolicy), then the default:
//! allowed. The first rule that matches decides: Accept ends the evaluation of this direction
//! allowed, Deny ends it denied, Pass skips the rest of its tier.

use std::fmt;
use std::net::IpAddr;

use super::{LabelSelector, Labels, Peer, Pod, PolicyPort, PolicyType};

/// The tier of a cluster policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// Before NetworkPolicy: ClusterNetworkPolicy `tier: Admin`, AdminNetworkPolicy.
    Admin,
    /// After NetworkPolicy: ClusterNetworkPolicy `tier: Baseline`, BaselineAdminNetworkPolicy.
    Baseline,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        })
    }
}

/// What a matching rule does. v1alpha1's `Allow` is read as [`Action::Accept`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Allowed in this direction; no later rule of any tier is looked at.
    Accept,
    /// Denied; no later rule of any tier is looked at.
    Deny,
    /// The rest of this tier is skipped; evaluation goes on with the next tier.
    Pass,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Accept => "Accept",
            Action::Deny => "Deny",
            Action::Pass => "Pass",
        })
    }
}

/// The API kind a cluster policy was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClusterPolicyKind {
    ClusterNetworkPolicy,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
}

impl ClusterPolicyKind {
    /// The kind as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterPolicyKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            ClusterPolicyKind::AdminNetworkPolicy => "AdminNetworkPolicy",
            ClusterPolicyKind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
        }
    }

    /// Short name used in keys, chain comments and set names (`kubectl`'s short names).
    pub fn short(self) -> &'static str {
        match self {
            ClusterPolicyKind::ClusterNetworkPolicy => "cnp",
            ClusterPolicyKind::AdminNetworkPolicy => "anp",
            ClusterPolicyKind::BaselineAdminNetworkPolicy => "banp",
        }
    }
}

impl fmt::Display for ClusterPolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The pods a cluster policy applies to (`spec.subject`). hostNetwork pods are never
/// subjects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// Every pod of the namespaces the selector matches.
    Namespaces(LabelSelector),
    /// Pods matching `pods` in namespaces matching `namespaces`.
    Pods {
        namespaces: LabelSelector,
        pods: LabelSelector,
    },
}

impl Subject {
    /// Whether the subject selects `pod`, whose namespace has `ns_labels`.
    pub fn selects(&self, pod: &Pod, ns_labels: &Labels) -> bool {
        pod.is_policy_pod()
            && match self {
                Subject::Namespaces(ns) => ns.matches(ns_labels),
                Subject::Pods { namespaces, pods } => {
                    namespaces.matches(ns_labels) && pods.matches(&pod.labels)
                }
            }
    }
}

/// One ingress or egress rule of a cluster policy. It matches a connection when the peer
/// matches (`any_peer`, or one of `peers`, or, egress only, an address of one of the nodes
/// `nodes` selects) and the port matches (`ports` empty = every port and protocol).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterRule {
    /// `name` as written (may be empty; at most 100 characters).
    pub name: String,
    pub action: Action,
    /// Only for the "fail closed" reading of a Deny or Pass rule with a peer of an unknown
    /// kind (see the API's peer types): the rule is read as Deny with every peer. Never set
    /// for a rule as written.
    pub any_peer: bool,
    /// Pod peers as NetworkPolicy peers, always with an explicit namespace selector
    /// (`namespaces: X` = `Peer::Pods { pods: {}, namespaces: Some(X) }`), and networks as
    /// ipBlocks without excepts. An Accept rule's peers of unknown kind are left out (they
    /// match nothing).
    pub peers: Vec<Peer>,
    /// Egress `nodes` peers: the InternalIP and ExternalIP addresses of the matching nodes.
    pub nodes: Vec<LabelSelector>,
    /// As NetworkPolicy ports: `portNumber`/`tcp.destinationPort.number` = a one-port
    /// range, `portRange`/`range` = a range, `tcp: {}` without a port = all TCP ports, a
    /// named port (which names no protocol in these APIs) = one entry per protocol (TCP,
    /// UDP, SCTP) with that name.
    pub ports: Vec<PolicyPort>,
}

/// A cluster policy after defaulting and validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPolicy {
    pub kind: ClusterPolicyKind,
    /// `metadata.name`.
    pub name: String,
    pub tier: Tier,
    /// 0-1000, lower first. A BaselineAdminNetworkPolicy (which has none) counts as 1000.
    pub priority: u16,
    pub subject: Subject,
    pub ingress: Vec<ClusterRule>,
    pub egress: Vec<ClusterRule>,
}

impl ClusterPolicy {
    /// `<short kind>/<name>`, e.g. `cnp/deny-tenants`: unique in a snapshot.
    pub fn key(&self) -> String {
        format!("{}/{}", self.kind.short(), self.name)
    }

    /// Evaluation order within the tier: priority, then name, then kind (the API leaves
    /// policies of equal priority in an undefined order; this makes it deterministic, as
    /// kube-network-policies does by name).
    pub fn order(&self) -> (Tier, u16, &str, ClusterPolicyKind) {
        (self.tier, self.priority, &self.name, self.kind)
    }

    /// Rules for one direction, in the order written.
    pub fn rules(&self, t: PolicyType) -> &[ClusterRule] {
        match t {
            PolicyType::Ingress => &self.ingress,
            PolicyType::Egress => &self.egress,
        }
    }

    /// Whether the policy applies to `pod` (its subject selects it), whose namespace has
    /// `ns_labels` ([`super::Snapshot::namespace_labels`]).
    pub fn selects(&self, pod: &Pod, ns_labels: &Labels) -> bool {
        self.subject.selects(pod, ns_labels)
    }
}

/// A Node, for egress `nodes` peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub labels: Labels,
    /// `status.addresses` of type InternalIP and ExternalIP (others are not addresses
    /// traffic is judged by).
    pub addresses: Vec<IpAddr>,
}
