//! `compile(snapshot, node) -> Ruleset`: the nftables table that enforces the snapshot's
//! NetworkPolicies for the pods on one node. Pure: no I/O.
//!
//! Table `inet twill-policy` (name configurable):
//!
//! ```text
//! map ingress_v4/_v6 { ipv4_addr|ipv6_addr : verdict }  local pod IP -> jump pod-in/<ns>/<pod>
//! map egress_v4/_v6  { ...                 : verdict }  local pod IP -> jump pod-out/<ns>/<pod>
//! set peers/<ns>/<policy>/<in|eg><i>/<v4|v6>   hash set: addresses of the rule's selected
//!      pods, one per policy rule
//! set cidrs/<ns>/<policy>/<in|eg><i>/<v4|v6>   interval set: the rule's ipBlocks, each minus
//!      its own excepts
//! set named/<ns>/<policy>/eg<i>/<v4|v6>       addr . inet_proto . inet_service: egress
//!      named ports resolved against each destination pod
//! chain forward  hook forward priority filter (0): after DNAT (-100), before flannel's
//!      masquerade (srcnat 100); sees routed pod traffic and, with br_netfilter, bridged
//!      same-node traffic on cni0.
//!        ct mark & CUT_MARK != 0 drop (flows strict mode cut, see conntrack.rs);
//!        ct state established,related accept; ICMPv6 ND accept;
//!        ip saddr vmap @egress_v4; ip6 saddr vmap @egress_v6;
//!        ip daddr vmap @ingress_v4; ip6 daddr vmap @ingress_v6
//! chain input    hook input priority filter: pod -> own node is egress-policed the same
//!      way (the node is an address outside the pod network: ipBlocks or open rules).
//! chain pod-in/<ns>/<pod>, pod-out/<ns>/<pod>: one rule per (policy rule, family,
//!      protocol) that `return`s when it matches (repeats of an earlier rule, and rules
//!      after an unconditional `return`, left out), then a rate-limited log naming the pod
//!      and direction, then `counter name "<chain>" drop` (a named counter per pod chain,
//!      read by the metrics without listing the table).
//! ```
//!
//! Names over nft's 255 bytes (or with characters nft does not take unquoted) are shortened
//! with a hash (`ident`); comments and log prefixes are escaped and bounded ([`quoted`]).
//!
//! Node-originated traffic (OUTPUT path, e.g. kubelet probes) never meets these chains,
//! so it is always allowed. Per-packet cost: two map lookups, then only the rules of the
//! policies that select the pod at hand, each a set lookup; nothing walks all pods or all
//! policies. Changes are applied by [`TableDef::diff`] transactions (see `nft`).

mod build;
mod index;
mod interpret;
mod names;
mod ranges;
mod table;

use std::net::IpAddr;

pub use build::compile;
pub use interpret::Decision;
pub use names::{quoted, COMMENT_MAX, LOG_PREFIX_MAX, NAME_MAX};
pub use ranges::{Family, Ranges};
pub use table::{render_delete, ChainDef, DiffStats, MapDef, SetDef, TableDef};

use crate::model::{PolicyType, Protocol, Tier};
use ranges::FAMILIES;

/// Default table name.
pub const DEFAULT_TABLE: &str = "twill-policy";

/// A named interval set of addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrSet {
    pub name: String,
    pub family: Family,
    /// Interval set (ipBlocks); otherwise a hash set of single addresses (pod IPs), whose
    /// `ranges` are all one address wide and never merged.
    pub interval: bool,
    pub ranges: Ranges,
    pub comment: String,
}

/// A named set of (destination address, protocol, port) for egress named ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TupleSet {
    pub name: String,
    pub family: Family,
    pub elems: Vec<(IpAddr, Protocol, u16)>,
    pub comment: String,
}

/// Port condition of a chain rule: a protocol and its port ranges (empty = all ports).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProtoPorts {
    pub proto: Protocol,
    pub ranges: Vec<(u16, u16)>,
}

/// What a chain rule does when it matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RuleVerdict {
    /// `return`: allowed in this direction (a NetworkPolicy allow rule, a cluster policy's
    /// Accept, or a Baseline Pass).
    Return,
    /// `goto <chain>`: an Admin or Baseline Deny (the pod's deny chain of that tier) or an
    /// Admin Pass (the pod's chain after the Admin tier).
    Goto(String),
}

/// What a chain does with a packet no rule of it decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainEnd {
    /// A rate-limited log naming the pod and direction, then `counter name "<pod chain>"
    /// drop`: isolated by a NetworkPolicy, a deny chain, or a fail-closed chain.
    Drop,
    /// Nothing: the chain returns (no NetworkPolicy isolates the pod, the Baseline tier
    /// did not deny).
    Return,
    /// `goto <chain>`: the Admin rules of a pod chain hand over to its chain after an
    /// Admin Pass, which holds the NetworkPolicy and Baseline part.
    Goto(String),
}

/// The role of a chain of a local pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainKind {
    /// `pod-in/<ns>/<pod>`, `pod-out/...`: the verdict maps jump here; owns the pod's named
    /// drop counter.
    Pod,
    /// `.../admin-deny`, `.../baseline-deny`: a cluster policy's Deny in that tier (logs
    /// with its own prefix, counts with the pod chain's counter).
    Deny(Tier),
    /// `.../after-admin`: the NetworkPolicy and Baseline part, reached by an Admin Pass
    /// (and by the pod chain once its Admin rules did not decide).
    AfterAdmin,
}

/// One rule in a pod chain. All present conditions must hold; then `verdict`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRule {
    /// The remote address (source for ingress, destination for egress) is in this set.
    pub peer_set: Option<(Family, String)>,
    /// Destination address . protocol . port is in this set (egress named ports).
    pub tuple_set: Option<(Family, String)>,
    pub ports: Option<ProtoPorts>,
    pub verdict: RuleVerdict,
    /// Which policy rule this comes from, e.g. `x/allow-web ingress[0]` or
    /// `Admin cnp/deny-tenants egress[1] Deny`.
    pub comment: String,
}

impl ChainRule {
    /// No condition at all: the chain returns here, whatever the packet.
    pub fn is_unconditional(&self) -> bool {
        self.peer_set.is_none() && self.tuple_set.is_none() && self.ports.is_none()
    }
}

/// A chain of one local pod for one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodChain {
    pub name: String,
    pub pod: String,
    pub dir: PolicyType,
    pub kind: ChainKind,
    pub rules: Vec<ChainRule>,
    pub end: ChainEnd,
    /// The named counter a drop in this chain counts with: the pod chain's (same name as
    /// the pod chain), so drops are counted per pod and direction whichever tier dropped.
    pub counter: String,
}

impl PodChain {
    /// Lines of this chain in the table after its rules.
    fn end_lines(&self) -> usize {
        match self.end {
            ChainEnd::Drop => 2,
            ChainEnd::Goto(_) => 1,
            ChainEnd::Return => 0,
        }
    }
}

/// The compiled table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub table: String,
    pub addr_sets: Vec<AddrSet>,
    pub tuple_sets: Vec<TupleSet>,
    pub chains: Vec<PodChain>,
    /// Local pod address -> its ingress chain.
    pub ingress_map: Vec<(IpAddr, String)>,
    /// Local pod address -> its egress chain.
    pub egress_map: Vec<(IpAddr, String)>,
    /// Denied-packet log rate per pod chain, packets per second.
    pub log_rate: u32,
    /// [`Options::nflog_group`].
    pub nflog_group: Option<u16>,
    /// This node's pod subnets ([`Options::pod_cidrs`]); empty = no unknown-pod isolation.
    pub pod_cidrs: Vec<ipnet::IpNet>,
    /// Addresses of the local pods the snapshot knows (exempt from unknown-pod isolation).
    pub known_local: Vec<IpAddr>,
    /// [`Options::pod_bridge`].
    pub pod_bridge: String,
}

/// Sizes, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub chains: usize,
    pub rules: usize,
    pub sets: usize,
    pub set_elements: usize,
    pub map_elements: usize,
}

/// The conntrack mark bit of a flow that strict mode cut (`crate::conntrack`): the forward
/// and input chains drop every packet of such a flow, in both directions, before they
/// accept established traffic. Marking instead of deleting the entry keeps it in place, so
/// conntrack cannot pick the flow up again from a mid-stream packet of the other side
/// (which the policies may allow as a new connection). Nothing sets it without strict mode.
pub const CUT_MARK: u32 = 0x1000_0000;

/// Compile options.
#[derive(Debug, Clone)]
pub struct Options {
    pub table: String,
    /// Log rate per pod chain, packets per second.
    pub log_rate: u32,
    /// Where denied packets are logged: None, the kernel log (`level info`); Some(n),
    /// NFLOG group n (`group n`), where `twill-policy drops` reads them.
    pub nflog_group: Option<u16>,
    /// When false, emit only isolation (every isolated pod's chain just drops): the
    /// fail-closed table.
    pub allow_rules: bool,
    /// This node's pod subnets (FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET). When set, an address
    /// in them that belongs to no known local pod is isolated in both directions until a
    /// pod with that address appears in the snapshot: a new pod is isolated from its first
    /// packet, before the source has reported it (fail closed; see README).
    pub pod_cidrs: Vec<ipnet::IpNet>,
    /// The bridge the node's pods are attached to (Flannel's `cni0`). Traffic entering
    /// from it that carries no pod address a policy could judge (IPv6 link-local, group
    /// addresses) is dropped; see [`Ruleset::table_def`].
    pub pod_bridge: String,
}

/// Flannel's bridge: its CNI plugin delegates to `bridge` with this name.
pub const DEFAULT_POD_BRIDGE: &str = "cni0";

impl Default for Options {
    fn default() -> Self {
        Options {
            table: DEFAULT_TABLE.into(),
            log_rate: 5,
            nflog_group: None,
            allow_rules: true,
            pod_cidrs: Vec::new(),
            pod_bridge: DEFAULT_POD_BRIDGE.into(),
        }
    }
}

impl Ruleset {
    /// An address in this node's pod subnets that no known local pod has.
    pub fn is_unknown_local(&self, ip: IpAddr) -> bool {
        self.pod_cidrs.iter().any(|n| n.contains(&ip)) && !self.known_local.contains(&ip)
    }

    /// The end of every denied-packet `log` statement: where the packet goes.
    pub fn log_target(&self) -> String {
        match self.nflog_group {
            None => "level info".to_string(),
            Some(n) => format!("group {n}"),
        }
    }

    fn unknown_families(&self) -> Vec<Family> {
        FAMILIES
            .into_iter()
            .filter(|f| self.pod_cidrs.iter().any(|n| Family::of(n.addr()) == *f))
            .collect()
    }

    /// Sizes of the ruleset.
    pub fn stats(&self) -> Stats {
        let fams = self.unknown_families().len();
        let unknown_chains = if fams > 0 { 2 } else { 0 };
        Stats {
            chains: self.chains.len() + 2 + unknown_chains,
            rules: self
                .chains
                .iter()
                .map(|c| c.rules.len() + c.end_lines())
                .sum::<usize>()
                + 15
                + 3 * fams
                + 2 * unknown_chains,
            sets: self.addr_sets.len() + self.tuple_sets.len() + 4 + 2 * fams,
            set_elements: self
                .addr_sets
                .iter()
                .map(|s| s.ranges.0.len())
                .sum::<usize>()
                + self.tuple_sets.iter().map(|s| s.elems.len()).sum::<usize>()
                + if fams > 0 {
                    self.pod_cidrs.len() + self.known_local.len()
                } else {
                    0
                },
            map_elements: self.ingress_map.len() + self.egress_map.len(),
        }
    }
}
