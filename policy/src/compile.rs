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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::rc::Rc;

use crate::model::{
    LabelSelector, Labels, Operator, Peer, Pod, PolicyType, Port, Protocol, Rule, Snapshot,
};

/// Default table name.
pub const DEFAULT_TABLE: &str = "twill-policy";

/// Address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Family of an address.
    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }
    fn nft_proto(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
    fn addr_type(self) -> &'static str {
        match self {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }
    fn addr(self, v: u128) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
        }
    }
}

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

fn ip_num(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// A set of addresses of one family as sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges(pub Vec<(u128, u128)>);

impl Ranges {
    fn normalize(mut v: Vec<(u128, u128)>) -> Ranges {
        v.sort();
        let mut out: Vec<(u128, u128)> = Vec::with_capacity(v.len());
        for (a, b) in v {
            if let Some(last) = out.last_mut() {
                if a <= last.1.saturating_add(1) {
                    last.1 = last.1.max(b);
                    continue;
                }
            }
            out.push((a, b));
        }
        Ranges(out)
    }

    fn subtract(&self, cut: &Ranges) -> Ranges {
        let mut out = Vec::new();
        for &(mut a, b) in &self.0 {
            let mut alive = true;
            for &(c, d) in &cut.0 {
                if d < a || c > b {
                    continue;
                }
                if c > a {
                    out.push((a, c - 1));
                }
                if d >= b {
                    alive = false;
                    break;
                }
                a = d + 1;
            }
            if alive {
                out.push((a, b));
            }
        }
        Ranges::normalize(out)
    }

    /// Whether `v` is in the set: a binary search, the ranges being sorted and disjoint
    /// (every `Ranges` is built by [`Ranges::normalize`] or from sorted, deduplicated
    /// single addresses).
    pub fn contains(&self, v: u128) -> bool {
        let i = self.0.partition_point(|&(a, _)| a <= v);
        i > 0 && v <= self.0[i - 1].1
    }

    fn render(&self, fam: Family) -> Vec<String> {
        self.0
            .iter()
            .map(|&(a, b)| {
                let size = b - a;
                if size == 0 {
                    fam.addr(a).to_string()
                } else if size & size.wrapping_add(1) == 0 && a & size == 0 {
                    let bits = match fam {
                        Family::V4 => 32,
                        Family::V6 => 128,
                    };
                    format!("{}/{}", fam.addr(a), bits - size.count_ones())
                } else {
                    format!("{}-{}", fam.addr(a), fam.addr(b))
                }
            })
            .collect()
    }
}

fn net_range(n: &ipnet::IpNet) -> (Family, (u128, u128)) {
    let fam = Family::of(n.addr());
    (fam, (ip_num(n.network()), ip_num(n.broadcast())))
}

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

/// One allow rule in a pod chain. All present conditions must hold; then `return`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRule {
    /// The remote address (source for ingress, destination for egress) is in this set.
    pub peer_set: Option<(Family, String)>,
    /// Destination address . protocol . port is in this set (egress named ports).
    pub tuple_set: Option<(Family, String)>,
    pub ports: Option<ProtoPorts>,
    /// Which policy rule this comes from, e.g. `x/allow-web ingress[0]`.
    pub comment: String,
}

impl ChainRule {
    /// No condition at all: the chain returns here, whatever the packet.
    pub fn is_unconditional(&self) -> bool {
        self.peer_set.is_none() && self.tuple_set.is_none() && self.ports.is_none()
    }
}

/// The chain of one local pod for one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodChain {
    pub name: String,
    pub pod: String,
    pub dir: PolicyType,
    pub rules: Vec<ChainRule>,
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
            allow_rules: true,
            pod_cidrs: Vec::new(),
            pod_bridge: DEFAULT_POD_BRIDGE.into(),
        }
    }
}

/// Longest name of an nft object (chain, set, counter): the kernel's NFT_NAME_MAXLEN is 256
/// bytes with the terminating NUL.
pub const NAME_MAX: usize = 255;
/// Longest comment nft accepts (NFTNL_UDATA_COMMENT_MAXLEN), in bytes: "comment too long,
/// 128 characters maximum allowed".
pub const COMMENT_MAX: usize = 128;
/// Longest log prefix (the kernel's NF_LOG_PREFIXLEN is 128 bytes with the NUL).
pub const LOG_PREFIX_MAX: usize = 127;

/// Hex digits of the SHA-256 prefix in a hashed name (128 bits: no tenant can make two of
/// its names collide, which would break the whole table).
const HASH_HEX: usize = 32;

/// Whether `s` may stand as one `/`-separated part of an nft identifier as it is: nft's
/// unquoted names are a letter then letters, digits, `/ - _ .` (every Kubernetes name is
/// made of these; `/` is our separator, so not inside a part).
fn plain_part(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The nft name `<kind>/<objs joined by '/'>[/<tail>]` of the object that belongs to the
/// Kubernetes objects named `objs` (namespace, pod or policy), e.g. `pod-in/x/web` or
/// `peers/x/allow-web/in0/v4`. `kind` and `tail` are ours (a letter first, nft's
/// characters only).
///
/// Unchanged when every part is plain and the whole fits in [`NAME_MAX`] - 1 bytes. Otherwise
/// (a 253-character pod name in a 63-character namespace is 325 bytes; a manifest may hold
/// any UTF-8) the name is a readable head (the same text, other characters as `_`, cut or
/// padded with `_` to a fixed width) then `/<tail>`, `-` and 128 bits of SHA-256 over the
/// length-prefixed parts: exactly [`NAME_MAX`] bytes, so never equal to an unchanged name,
/// stable across syncs, and distinct for distinct objects.
fn ident(kind: &str, objs: &[&str], tail: &str) -> String {
    let tail_len = if tail.is_empty() { 0 } else { tail.len() + 1 };
    let len = kind.len() + objs.iter().map(|o| o.len() + 1).sum::<usize>() + tail_len;
    if len < NAME_MAX && objs.iter().all(|o| plain_part(o)) {
        let mut s = String::with_capacity(len);
        s.push_str(kind);
        for o in objs {
            s.push('/');
            s.push_str(o);
        }
        if !tail.is_empty() {
            s.push('/');
            s.push_str(tail);
        }
        return s;
    }
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in std::iter::once(&kind).chain(objs).chain([&tail]) {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let head_len = NAME_MAX - 1 - HASH_HEX - tail_len;
    let mut s = String::with_capacity(NAME_MAX);
    s.push_str(kind);
    for o in objs {
        if s.len() >= head_len {
            break;
        }
        s.push('/');
        s.extend(o.chars().map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        }));
    }
    // ASCII only, so any byte index is a char boundary.
    s.truncate(head_len);
    while s.len() < head_len {
        s.push('_');
    }
    if !tail.is_empty() {
        s.push('/');
        s.push_str(tail);
    }
    s.push('-');
    for b in &digest[..HASH_HEX / 2] {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `s` as an nft quoted string (with its quotes) of at most `max` bytes inside them, for
/// comments and log prefixes, whatever UTF-8 a manifest holds. nft's quoted strings have no
/// escapes (a `"` ends them) and a log prefix expands `$name` as a variable, so everything but
/// printable ASCII, and `"`, `\` and `$`, is written `\u{hex}` (ASCII, no quote, no dollar;
/// control characters cannot forge log lines). Too long, the middle is cut (on an escape's
/// boundary) and replaced by `..`: the start (direction, namespace) and the end (rule index,
/// the end of the name) stay readable. Plain text renders as `{:?}` does.
pub fn quoted(s: &str, max: usize) -> String {
    if s.len() <= max
        && s.bytes()
            .all(|b| (b' '..=b'~').contains(&b) && !matches!(b, b'"' | b'\\' | b'$'))
    {
        return format!("\"{s}\"");
    }
    let unit = |c: char| -> String {
        match c {
            ' '..='~' if !matches!(c, '"' | '\\' | '$') => c.to_string(),
            _ => format!("\\u{{{:x}}}", c as u32),
        }
    };
    let units: Vec<String> = s.chars().map(unit).collect();
    let total: usize = units.iter().map(String::len).sum();
    let mut out = String::with_capacity(total.min(max) + 2);
    out.push('"');
    if total <= max {
        units.iter().for_each(|u| out.push_str(u));
    } else {
        let budget = max.saturating_sub(2);
        let tail_budget = budget / 4;
        let mut tail = Vec::new();
        let mut tail_len = 0;
        for u in units.iter().rev() {
            if tail_len + u.len() > tail_budget {
                break;
            }
            tail_len += u.len();
            tail.push(u.as_str());
        }
        let mut head_len = 0;
        for u in &units[..units.len() - tail.len()] {
            if head_len + u.len() > budget - tail_len {
                break;
            }
            head_len += u.len();
            out.push_str(u);
        }
        out.push_str("..");
        tail.iter().rev().for_each(|u| out.push_str(u));
    }
    out.push('"');
    out
}

/// Local pods: policy pods on `node` with addresses, first by key wins an address.
fn local_pods<'a>(snap: &'a Snapshot, node: &str) -> Vec<&'a Pod> {
    snap.pods
        .iter()
        .filter(|p| p.is_policy_pod() && p.node.as_deref() == Some(node) && !p.ips.is_empty())
        .collect()
}

/// (family, interval, contents) of a peer set.
type ContentKey = (Family, bool, Vec<(u128, u128)>);

/// Peer addresses of a rule per family: (pod addresses, ipBlock ranges); see
/// [`Builder::peer_parts`].
type PeerParts = [(Ranges, Ranges); 2];

/// What makes two chain rules the same rule (the comment aside).
type RuleKey = (
    Option<(Family, String)>,
    Option<(Family, String)>,
    Option<ProtoPorts>,
);

/// A namespace that has policy pods.
struct NsPods<'a> {
    labels: Labels,
    /// Indices into [`Builder::pods`].
    pods: Vec<usize>,
    /// Built on first use.
    index: Option<LabelIndex<'a>>,
}

/// The pods of a namespace by label: key -> (the pods that have it, value -> the pods
/// with that value). Lets a selector look only at the pods that can match it.
type LabelIndex<'a> = HashMap<&'a str, (Vec<usize>, HashMap<&'a str, Vec<usize>>)>;

fn label_index<'a>(pods: &[&'a Pod], ns: &NsPods) -> LabelIndex<'a> {
    let mut index: LabelIndex<'a> = HashMap::new();
    for &i in &ns.pods {
        for (k, v) in &pods[i].labels {
            let (with_key, by_value) = index.entry(k.as_str()).or_default();
            with_key.push(i);
            by_value.entry(v.as_str()).or_default().push(i);
        }
    }
    index
}

/// The pods of a namespace that `sel` can match, as lists of indices: those with one of its
/// matchLabels pairs, with one of the values of an `In`, or with the key of an `Exists`,
/// whichever are fewest. None: `sel` has no such requirement (any pod can match).
fn candidates<'i>(index: &'i LabelIndex, sel: &LabelSelector) -> Option<Vec<&'i [usize]>> {
    let mut best: Option<(usize, Vec<&'i [usize]>)> = None;
    let mut consider = |lists: Vec<&'i [usize]>| {
        let n = lists.iter().map(|l| l.len()).sum();
        if best.as_ref().is_none_or(|(m, _)| n < *m) {
            best = Some((n, lists));
        }
    };
    for (k, v) in &sel.match_labels {
        let list = index.get(k.as_str()).and_then(|(_, by)| by.get(v.as_str()));
        consider(list.map(Vec::as_slice).into_iter().collect());
    }
    for r in &sel.match_expressions {
        let Some((with_key, by_value)) = index.get(r.key.as_str()) else {
            if matches!(r.operator, Operator::In | Operator::Exists) {
                consider(vec![]);
            }
            continue;
        };
        match r.operator {
            Operator::Exists => consider(vec![with_key]),
            // A pod has one value per key, so the lists do not overlap. Not worth more
            // lookups than there are pods with the key.
            Operator::In if r.values.len() <= with_key.len() => consider(
                r.values
                    .iter()
                    .filter_map(|v| by_value.get(v.as_str()).map(Vec::as_slice))
                    .collect(),
            ),
            _ => {}
        }
    }
    best.map(|(_, lists)| lists)
}

/// Named container ports: (name, protocol) -> (pod index, number), for each policy pod
/// the first port of that name and protocol (as [`Pod::named_port`] finds it).
type NamedPorts<'a> = HashMap<(&'a str, Protocol), Vec<(usize, u16)>>;

struct Builder<'a> {
    snap: &'a Snapshot,
    addr_sets: BTreeMap<String, AddrSet>,
    tuple_sets: BTreeMap<String, TupleSet>,
    /// (policy index, dir, rule index) -> per-family peer set names.
    peer_sets: BTreeMap<(usize, PolicyType, usize), [Vec<String>; 2]>,
    /// Identical peer sets are emitted once: (family, interval, contents) -> set name.
    by_content: BTreeMap<ContentKey, String>,
    tuple_names: BTreeMap<(usize, usize), [Option<String>; 2]>,
    /// Policy pods (not hostNetwork, not terminated), in snapshot order.
    pods: Vec<&'a Pod>,
    /// Namespaces that have policy pods, sorted by name, with their labels and pods (built
    /// once per compile: a peer selector only looks at the pods of the namespaces it
    /// selects, not at every pod).
    namespaces: Vec<NsPods<'a>>,
    /// Namespace name -> index into `namespaces`.
    ns_index: BTreeMap<&'a str, usize>,
    /// Expanded peers by (policy namespace, peers): a peer list that several rules or
    /// policies of a namespace share is expanded once.
    parts: HashMap<(&'a str, &'a [Peer]), Rc<PeerParts>>,
    /// Selection marks over `pods` for one expansion: `mark[i] == stamp` = selected. A new
    /// stamp per expansion, so the marks are never cleared.
    mark: Vec<u32>,
    stamp: u32,
    /// Pods looked at while expanding peers: the work done, which tests keep linear.
    #[cfg_attr(not(test), allow(dead_code))]
    visits: usize,
    /// Built on first use (egress named ports).
    named_ports: Option<NamedPorts<'a>>,
    /// Per (policy index, dir): the rules that are not repeats of an earlier rule of the
    /// same policy and direction (a repeat compiles to the same chain rules).
    distinct: HashMap<(usize, PolicyType), Rc<[usize]>>,
    /// Chain rules of (policy index, dir, rule index) when they do not depend on the local
    /// pod (all but ingress rules with named ports), compiled once for every pod chain.
    templates: HashMap<(usize, PolicyType, usize), Rc<[ChainRule]>>,
}

impl<'a> Builder<'a> {
    fn new(snap: &'a Snapshot) -> Builder<'a> {
        // Pods of broken namespaces are never peers (see `Snapshot::peer_selects_pod`).
        let pods: Vec<&Pod> = snap
            .pods
            .iter()
            .filter(|p| p.is_policy_pod() && !snap.is_broken(&p.namespace))
            .collect();
        let mut by_ns: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, p) in pods.iter().enumerate() {
            by_ns.entry(p.namespace.as_str()).or_default().push(i);
        }
        let mut namespaces = Vec::with_capacity(by_ns.len());
        let mut ns_index = BTreeMap::new();
        for (n, pods) in by_ns {
            ns_index.insert(n, namespaces.len());
            namespaces.push(NsPods {
                labels: snap.namespace_labels(n),
                pods,
                index: None,
            });
        }
        Builder {
            snap,
            addr_sets: BTreeMap::new(),
            tuple_sets: BTreeMap::new(),
            peer_sets: BTreeMap::new(),
            by_content: BTreeMap::new(),
            tuple_names: BTreeMap::new(),
            mark: vec![0; pods.len()],
            stamp: 0,
            visits: 0,
            pods,
            namespaces,
            ns_index,
            parts: HashMap::new(),
            named_ports: None,
            distinct: HashMap::new(),
            templates: HashMap::new(),
        }
    }

    /// Peer addresses of a rule as per-family ranges.
    fn peer_ranges(&mut self, ns: &'a str, peers: &'a [Peer]) -> [Ranges; 2] {
        let parts = self.peer_parts(ns, peers);
        let [(a4, b4), (a6, b6)] = &*parts;
        [
            Ranges::normalize(a4.0.iter().chain(&b4.0).copied().collect()),
            Ranges::normalize(a6.0.iter().chain(&b6.0).copied().collect()),
        ]
    }

    /// Peer addresses of a rule per family, as (pod addresses: sorted single addresses,
    /// ipBlocks: normalized ranges). Kept apart so that pod addresses go into hash sets:
    /// nft (1.0.6) reads every element of every interval set of the table before any
    /// element change, which made a one-element update cost as much as listing 110k
    /// elements; ipBlock sets are small.
    ///
    /// Linear in the peers and in the pods they look at: repeated peers are skipped, a pod
    /// already selected is neither matched again nor collected twice, a namespace whose
    /// pods are all selected is not visited again, and once every pod is selected only
    /// ipBlocks are left to read. (Each distinct selector still looks at the not yet
    /// selected pods of the namespaces it selects.)
    fn peer_parts(&mut self, ns: &'a str, peers: &'a [Peer]) -> Rc<PeerParts> {
        if let Some(p) = self.parts.get(&(ns, peers)) {
            return p.clone();
        }
        if self.stamp == u32::MAX {
            self.mark.iter_mut().for_each(|m| *m = 0);
            self.stamp = 0;
        }
        self.stamp += 1;
        let stamp = self.stamp;
        let mut v: [Vec<(u128, u128)>; 2] = [vec![], vec![]];
        let mut selected: Vec<usize> = Vec::new();
        // Selected pods per namespace.
        let mut ns_count = vec![0usize; self.namespaces.len()];
        let mut seen = HashSet::new();
        for peer in peers {
            if !seen.insert(peer) {
                continue;
            }
            match peer {
                Peer::IpBlock(b) => {
                    let (fam, r) = net_range(&b.cidr);
                    let mut cut = Vec::new();
                    for e in &b.except {
                        cut.push(net_range(e).1);
                    }
                    let block = Ranges(vec![r]).subtract(&Ranges::normalize(cut));
                    v[fam as usize].extend(block.0);
                }
                Peer::Pods { .. } if selected.len() == self.pods.len() => {}
                Peer::Pods { pods, namespaces } => {
                    let targets: Vec<usize> = match namespaces {
                        None => self.ns_index.get(ns).copied().into_iter().collect(),
                        Some(sel) => (0..self.namespaces.len())
                            .filter(|&k| {
                                ns_count[k] < self.namespaces[k].pods.len()
                                    && sel.matches(&self.namespaces[k].labels)
                            })
                            .collect(),
                    };
                    let all = pods.is_empty();
                    for k in targets {
                        if ns_count[k] == self.namespaces[k].pods.len() {
                            continue;
                        }
                        if !all && self.namespaces[k].index.is_none() {
                            self.namespaces[k].index =
                                Some(label_index(&self.pods, &self.namespaces[k]));
                        }
                        let n = &self.namespaces[k];
                        let lists = match n.index.as_ref().and_then(|ix| candidates(ix, pods)) {
                            Some(lists) => lists,
                            None => vec![n.pods.as_slice()],
                        };
                        for list in lists {
                            self.visits += list.len();
                            for &i in list {
                                if self.mark[i] != stamp
                                    && (all || pods.matches(&self.pods[i].labels))
                                {
                                    self.mark[i] = stamp;
                                    ns_count[k] += 1;
                                    selected.push(i);
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut pods_v: [Vec<(u128, u128)>; 2] = [vec![], vec![]];
        for i in selected {
            for ip in &self.pods[i].ips {
                let n = ip_num(*ip);
                pods_v[Family::of(*ip) as usize].push((n, n));
            }
        }
        let [a, b] = v;
        let [mut pa, mut pb] = pods_v;
        pa.sort_unstable();
        pa.dedup();
        pb.sort_unstable();
        pb.dedup();
        let parts = Rc::new([
            (Ranges(pa), Ranges::normalize(a)),
            (Ranges(pb), Ranges::normalize(b)),
        ]);
        self.parts.insert((ns, peers), parts.clone());
        parts
    }

    fn peer_set(&mut self, pi: usize, dir: PolicyType, ri: usize) -> [Vec<String>; 2] {
        if let Some(s) = self.peer_sets.get(&(pi, dir, ri)) {
            return s.clone();
        }
        let snap = self.snap;
        let pol = &snap.policies[pi];
        let parts = self.peer_parts(&pol.namespace, &pol.rules(dir)[ri].peers);
        let short = match dir {
            PolicyType::Ingress => "in",
            PolicyType::Egress => "eg",
        };
        let mut names: [Vec<String>; 2] = [vec![], vec![]];
        for fam in FAMILIES {
            let (pods, blocks) = &parts[fam as usize];
            for (interval, r, kind) in [(false, pods, "peers"), (true, blocks, "cidrs")] {
                if r.0.is_empty() {
                    continue;
                }
                if let Some(name) = self.by_content.get(&(fam, interval, r.0.clone())) {
                    names[fam as usize].push(name.clone());
                    continue;
                }
                let name = ident(
                    kind,
                    &[&pol.namespace, &pol.name],
                    &format!("{short}{ri}/{}", fam.suffix()),
                );
                self.addr_sets.insert(
                    name.clone(),
                    AddrSet {
                        name: name.clone(),
                        family: fam,
                        interval,
                        ranges: r.clone(),
                        comment: format!(
                            "{} {dir}[{ri}] {}",
                            pol.key(),
                            if interval { "ipBlocks" } else { "peer pods" }
                        ),
                    },
                );
                self.by_content
                    .insert((fam, interval, r.0.clone()), name.clone());
                names[fam as usize].push(name);
            }
        }
        self.peer_sets.insert((pi, dir, ri), names.clone());
        names
    }

    /// The named ports of every policy pod, indexed once per compile.
    fn named_ports(&mut self) -> &NamedPorts<'a> {
        let pods = &self.pods;
        self.named_ports.get_or_insert_with(|| {
            let mut index: NamedPorts<'a> = HashMap::new();
            for (i, pod) in pods.iter().enumerate() {
                for p in &pod.ports {
                    let Some(name) = p.name.as_deref() else {
                        continue;
                    };
                    let list = index.entry((name, p.protocol)).or_default();
                    // The pod's first port of this name and protocol wins.
                    if list.last().is_none_or(|(j, _)| *j != i) {
                        list.push((i, p.port));
                    }
                }
            }
            index
        })
    }

    /// Egress named ports of rule `ri` of policy `pi`, resolved against every destination
    /// pod among the rule's peers (all pods if the rule has no peers). Each distinct
    /// (name, protocol) is looked up once in the named-port index: only the pods that have
    /// such a port are visited.
    fn tuple_set(&mut self, pi: usize, ri: usize) -> [Option<String>; 2] {
        if let Some(s) = self.tuple_names.get(&(pi, ri)) {
            return s.clone();
        }
        let snap = self.snap;
        let pol = &snap.policies[pi];
        let rule = &pol.egress[ri];
        let peers = if rule.peers.is_empty() {
            None
        } else {
            Some(self.peer_ranges(&pol.namespace, &rule.peers))
        };
        let mut elems: [Vec<(IpAddr, Protocol, u16)>; 2] = [vec![], vec![]];
        let mut seen = HashSet::new();
        self.named_ports();
        let (index, pods) = (self.named_ports.as_ref().expect("built"), &self.pods);
        for pp in &rule.ports {
            let Some(Port::Named(n)) = &pp.port else {
                continue;
            };
            let key = (n.as_str(), pp.protocol);
            if !seen.insert(key) {
                continue;
            }
            for &(i, num) in index.get(&key).into_iter().flatten() {
                for ip in &pods[i].ips {
                    let fam = Family::of(*ip);
                    if peers
                        .as_ref()
                        .is_none_or(|p| p[fam as usize].contains(ip_num(*ip)))
                    {
                        elems[fam as usize].push((*ip, pp.protocol, num));
                    }
                }
            }
        }
        let mut names = [None, None];
        for fam in FAMILIES {
            let mut e = std::mem::take(&mut elems[fam as usize]);
            e.sort();
            e.dedup();
            if e.is_empty() {
                continue;
            }
            let name = ident(
                "named",
                &[&pol.namespace, &pol.name],
                &format!("eg{ri}/{}", fam.suffix()),
            );
            self.tuple_sets.insert(
                name.clone(),
                TupleSet {
                    name: name.clone(),
                    family: fam,
                    elems: e,
                    comment: format!("{} egress[{ri}] named ports", pol.key()),
                },
            );
            names[fam as usize] = Some(name);
        }
        self.tuple_names.insert((pi, ri), names.clone());
        names
    }

    /// Indices of the rules of policy `pi` in direction `dir` that are not exact repeats of
    /// an earlier one (500k copies of `{}` are one rule).
    fn distinct_rules(&mut self, pi: usize, dir: PolicyType) -> Rc<[usize]> {
        let snap = self.snap;
        self.distinct
            .entry((pi, dir))
            .or_insert_with(|| {
                let rules = snap.policies[pi].rules(dir);
                let mut seen = HashSet::with_capacity(rules.len());
                (0..rules.len())
                    .filter(|&i| seen.insert(&rules[i]))
                    .collect()
            })
            .clone()
    }

    /// The chain rules of rule `ri` of policy `pi` in direction `dir`, in the chain of
    /// `pod`: one per (peer set, protocol group), plus the egress named-port tuple sets.
    fn chain_rules(&mut self, pi: usize, dir: PolicyType, ri: usize, pod: &Pod) -> Rc<[ChainRule]> {
        let snap = self.snap;
        let pol = &snap.policies[pi];
        let rule = &pol.rules(dir)[ri];
        let has_named = rule
            .ports
            .iter()
            .any(|p| matches!(p.port, Some(Port::Named(_))));
        // Ingress named ports are resolved against the local pod; nothing else is per pod.
        let per_pod = dir == PolicyType::Ingress && has_named;
        if !per_pod {
            if let Some(r) = self.templates.get(&(pi, dir, ri)) {
                return r.clone();
            }
        }
        let comment = format!("{} {dir}[{ri}]", pol.key());
        let peer_sets: Vec<Option<(Family, String)>> = if rule.peers.is_empty() {
            vec![None]
        } else {
            let names = self.peer_set(pi, dir, ri);
            FAMILIES
                .iter()
                .flat_map(|f| names[*f as usize].iter().map(|n| Some((*f, n.clone()))))
                .collect()
        };
        let mut rules = Vec::new();
        let dst = (dir == PolicyType::Ingress).then_some(pod);
        match port_groups(rule, dst) {
            None => {
                for ps in &peer_sets {
                    rules.push(ChainRule {
                        peer_set: ps.clone(),
                        tuple_set: None,
                        ports: None,
                        comment: comment.clone(),
                    });
                }
            }
            Some(groups) => {
                for ps in &peer_sets {
                    for g in &groups {
                        rules.push(ChainRule {
                            peer_set: ps.clone(),
                            tuple_set: None,
                            ports: Some(g.clone()),
                            comment: comment.clone(),
                        });
                    }
                }
            }
        }
        if dir == PolicyType::Egress && has_named {
            let names = self.tuple_set(pi, ri);
            for f in FAMILIES {
                if let Some(n) = &names[f as usize] {
                    rules.push(ChainRule {
                        peer_set: None,
                        tuple_set: Some((f, n.clone())),
                        ports: None,
                        comment: comment.clone(),
                    });
                }
            }
        }
        let rules: Rc<[ChainRule]> = rules.into();
        if !per_pod {
            self.templates.insert((pi, dir, ri), rules.clone());
        }
        rules
    }
}

/// Numeric port conditions of a rule, per protocol; named ports are resolved against
/// `dst` (ingress: the local pod) or skipped (`dst` None: egress, handled by tuple sets).
/// `None` = the rule has no ports (everything). `Some(empty)` = nothing numeric matches.
fn port_groups(rule: &Rule, dst: Option<&Pod>) -> Option<Vec<ProtoPorts>> {
    if rule.ports.is_empty() {
        return None;
    }
    let mut by_proto: BTreeMap<Protocol, Option<Vec<(u16, u16)>>> = BTreeMap::new();
    for pp in &rule.ports {
        let range = match &pp.port {
            None => None,
            Some(Port::Range(a, b)) => Some((*a, *b)),
            Some(Port::Named(n)) => match dst.and_then(|p| p.named_port(n, pp.protocol)) {
                Some(num) => Some((num, num)),
                None => continue,
            },
        };
        let e = by_proto.entry(pp.protocol).or_insert_with(|| Some(vec![]));
        match (e.as_mut(), range) {
            (_, None) => *e = None,
            (Some(v), Some(r)) => v.push(r),
            (None, Some(_)) => {}
        }
    }
    Some(
        by_proto
            .into_iter()
            .map(|(proto, r)| {
                let ranges = match r {
                    None => vec![],
                    Some(v) => {
                        let n = Ranges::normalize(
                            v.into_iter().map(|(a, b)| (a as u128, b as u128)).collect(),
                        );
                        n.0.into_iter().map(|(a, b)| (a as u16, b as u16)).collect()
                    }
                };
                ProtoPorts { proto, ranges }
            })
            .collect(),
    )
}

/// Compiles the ruleset for the pods on `node`.
pub fn compile(snap: &Snapshot, node: &str, opts: &Options) -> Ruleset {
    let mut b = Builder::new(snap);
    let mut chains = Vec::new();
    let mut ingress_map = Vec::new();
    let mut egress_map = Vec::new();
    let mut seen_ips = HashSet::new();
    let mut known_local: Vec<IpAddr> = Vec::new();
    if !opts.pod_cidrs.is_empty() {
        known_local = local_pods(snap, node)
            .iter()
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        known_local.sort();
        known_local.dedup();
    }
    for pod in local_pods(snap, node) {
        let ips: Vec<IpAddr> = pod
            .ips
            .iter()
            .copied()
            .filter(|ip| seen_ips.insert(*ip))
            .collect();
        // A pod of a broken namespace fails closed: isolated both ways by a chain that
        // only drops, as in the fail-closed table, whatever its policies say.
        let broken = snap.is_broken(&pod.namespace);
        for dir in [PolicyType::Ingress, PolicyType::Egress] {
            let selecting: Vec<usize> = (0..snap.policies.len())
                .filter(|&i| !broken && snap.policies[i].selects(pod, dir))
                .collect();
            if selecting.is_empty() && !broken {
                continue;
            }
            let kind = match dir {
                PolicyType::Ingress => "pod-in",
                PolicyType::Egress => "pod-out",
            };
            let name = ident(kind, &[&pod.namespace, &pod.name], "");
            let mut rules: Vec<ChainRule> = Vec::new();
            if opts.allow_rules && !broken {
                // A chain rule identical to an earlier one of the chain (but for its
                // comment) is left out, and so is everything after an unconditional
                // `return`: neither can change what the chain does.
                let mut seen: HashSet<RuleKey> = HashSet::new();
                'chain: for pi in selecting {
                    for &ri in b.distinct_rules(pi, dir).iter() {
                        for r in b.chain_rules(pi, dir, ri, pod).iter() {
                            if !seen.insert((
                                r.peer_set.clone(),
                                r.tuple_set.clone(),
                                r.ports.clone(),
                            )) {
                                continue;
                            }
                            rules.push(r.clone());
                            if r.is_unconditional() {
                                break 'chain;
                            }
                        }
                    }
                }
            }
            let map = match dir {
                PolicyType::Ingress => &mut ingress_map,
                PolicyType::Egress => &mut egress_map,
            };
            for ip in &ips {
                map.push((*ip, name.clone()));
            }
            chains.push(PodChain {
                name,
                pod: pod.key(),
                dir,
                rules,
            });
        }
    }
    Ruleset {
        table: opts.table.clone(),
        addr_sets: b.addr_sets.into_values().collect(),
        tuple_sets: b.tuple_sets.into_values().collect(),
        chains,
        ingress_map,
        egress_map,
        log_rate: opts.log_rate.max(1),
        pod_cidrs: opts.pod_cidrs.clone(),
        known_local,
        pod_bridge: opts.pod_bridge.clone(),
    }
}

/// What the compiled ruleset would do with the first packet of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Accept,
    /// Dropped by the chain of the pod in this direction.
    Drop(PolicyType),
}

impl Ruleset {
    fn chain(&self, name: &str) -> Option<&PodChain> {
        self.chains.iter().find(|c| c.name == name)
    }

    fn set_has(&self, name: &str, ip: IpAddr) -> bool {
        self.addr_sets
            .iter()
            .find(|s| s.name == name)
            .is_some_and(|s| s.ranges.contains(ip_num(ip)))
    }

    fn run_chain(
        &self,
        chain: &PodChain,
        remote: IpAddr,
        dst: IpAddr,
        l4: Option<(Protocol, u16)>,
    ) -> bool {
        chain.rules.iter().any(|r| {
            let peer_ok = match &r.peer_set {
                None => true,
                Some((f, n)) => *f == Family::of(remote) && self.set_has(n, remote),
            };
            let tuple_ok = match &r.tuple_set {
                None => true,
                Some((f, n)) => {
                    *f == Family::of(dst)
                        && l4.is_some_and(|(proto, port)| {
                            self.tuple_sets
                                .iter()
                                .any(|s| &s.name == n && s.elems.contains(&(dst, proto, port)))
                        })
                }
            };
            // A rule with ports (or a named port) names its protocol: ICMP and other
            // port-less protocols only match rules without ports.
            let ports_ok = match &r.ports {
                None => true,
                Some(pp) => l4.is_some_and(|(proto, port)| {
                    pp.proto == proto
                        && (pp.ranges.is_empty()
                            || pp.ranges.iter().any(|(a, b)| (*a..=*b).contains(&port)))
                }),
            };
            peer_ok && tuple_ok && ports_ok
        })
    }

    /// Interprets the forward chain for a new connection `src -> dst` (the nft semantics
    /// of this table, without the kernel): egress of the source, then ingress of the
    /// destination. Used by tests to check compile() against the evaluator.
    pub fn decide(&self, src: IpAddr, dst: IpAddr, proto: Protocol, port: u16) -> Decision {
        self.decide_packet(src, dst, Some((proto, port)), false)
    }

    /// [`Ruleset::decide`] for the first packet of any flow: `l4` is the protocol and
    /// destination port of a TCP/UDP/SCTP packet, None for other protocols (ICMP, ...),
    /// which only rules without ports match. `to_node`: the packet is addressed to this
    /// node itself, so the input chain judges it, which applies only the source's side
    /// (unknown-pod isolation and egress); else the forward chain, both sides.
    pub fn decide_packet(
        &self,
        src: IpAddr,
        dst: IpAddr,
        l4: Option<(Protocol, u16)>,
        to_node: bool,
    ) -> Decision {
        if self.is_unknown_local(src) {
            return Decision::Drop(PolicyType::Egress);
        }
        if !to_node && self.is_unknown_local(dst) {
            return Decision::Drop(PolicyType::Ingress);
        }
        if let Some((_, c)) = self.egress_map.iter().find(|(ip, _)| *ip == src) {
            let chain = self.chain(c).expect("map points at a chain");
            if !self.run_chain(chain, dst, dst, l4) {
                return Decision::Drop(PolicyType::Egress);
            }
        }
        if to_node {
            return Decision::Accept;
        }
        if let Some((_, c)) = self.ingress_map.iter().find(|(ip, _)| *ip == dst) {
            let chain = self.chain(c).expect("map points at a chain");
            if !self.run_chain(chain, src, dst, l4) {
                return Decision::Drop(PolicyType::Ingress);
            }
        }
        Decision::Accept
    }

    /// An address in this node's pod subnets that no known local pod has.
    pub fn is_unknown_local(&self, ip: IpAddr) -> bool {
        self.pod_cidrs.iter().any(|n| n.contains(&ip)) && !self.known_local.contains(&ip)
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
            rules: self.chains.iter().map(|c| c.rules.len() + 2).sum::<usize>()
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

    /// The nft script that replaces the table atomically: `add table; delete table;
    /// table { ... }` (nft -f applies a file as one transaction).
    pub fn render(&self) -> String {
        self.table_def().render()
    }

    /// The table as named objects (sets, maps, chains with their rule lines) that both the
    /// full script and the incremental transactions ([`TableDef::diff`]) are written from.
    pub fn table_def(&self) -> TableDef {
        let mut sets = Vec::with_capacity(self.addr_sets.len() + self.tuple_sets.len());
        for set in &self.addr_sets {
            sets.push(SetDef {
                name: set.name.clone(),
                decl: if set.interval {
                    vec![
                        format!("type {}", set.family.addr_type()),
                        "flags interval".into(),
                        format!("comment {}", quoted(&set.comment, COMMENT_MAX)),
                    ]
                } else {
                    vec![
                        format!("type {}", set.family.addr_type()),
                        format!("comment {}", quoted(&set.comment, COMMENT_MAX)),
                    ]
                },
                elems: set.ranges.render(set.family),
            });
        }
        for set in &self.tuple_sets {
            sets.push(SetDef {
                name: set.name.clone(),
                decl: vec![
                    format!(
                        "type {} . inet_proto . inet_service",
                        set.family.addr_type()
                    ),
                    format!("comment {}", quoted(&set.comment, COMMENT_MAX)),
                ],
                elems: set
                    .elems
                    .iter()
                    .map(|(ip, p, n)| format!("{ip} . {} . {n}", p.nft()))
                    .collect(),
            });
        }
        let mut maps = Vec::with_capacity(4);
        for (dir, map) in [("ingress", &self.ingress_map), ("egress", &self.egress_map)] {
            for fam in FAMILIES {
                maps.push(MapDef {
                    name: format!("{dir}_{}", fam.suffix()),
                    decl: format!("type {} : verdict", fam.addr_type()),
                    elems: map
                        .iter()
                        .filter(|(ip, _)| Family::of(*ip) == fam)
                        .map(|(ip, c)| (ip.to_string(), format!("jump {c}")))
                        .collect(),
                });
            }
        }
        let mut chains = Vec::with_capacity(self.chains.len());
        for c in &self.chains {
            let mut rules = Vec::with_capacity(c.rules.len() + 2);
            for r in &c.rules {
                let mut line = String::new();
                let addr_key = match c.dir {
                    PolicyType::Ingress => "saddr",
                    PolicyType::Egress => "daddr",
                };
                if let Some((f, n)) = &r.peer_set {
                    let _ = write!(line, "{} {addr_key} @{n} ", f.nft_proto());
                }
                if let Some((f, n)) = &r.tuple_set {
                    let _ = write!(
                        line,
                        "{} daddr . meta l4proto . th dport @{n} ",
                        f.nft_proto()
                    );
                }
                if let Some(pp) = &r.ports {
                    let _ = write!(line, "meta l4proto {} ", pp.proto.nft());
                    let ports: Vec<String> = pp
                        .ranges
                        .iter()
                        .map(|(a, b)| {
                            if a == b {
                                a.to_string()
                            } else {
                                format!("{a}-{b}")
                            }
                        })
                        .collect();
                    match ports.len() {
                        0 => {}
                        1 => {
                            let _ = write!(line, "th dport {} ", ports[0]);
                        }
                        _ => {
                            let _ = write!(line, "th dport {{ {} }} ", ports.join(", "));
                        }
                    }
                }
                let _ = write!(line, "return comment {}", quoted(&r.comment, COMMENT_MAX));
                rules.push(line);
            }
            let prefix = quoted(
                &format!("twill-policy drop {} {}: ", c.dir, c.pod),
                LOG_PREFIX_MAX,
            );
            rules.push(format!(
                "limit rate {}/second burst {} packets log prefix {prefix} level info",
                self.log_rate,
                self.log_rate * 2
            ));
            // A named counter (same name as the chain): it survives the chain being
            // flushed and refilled, so drop totals need no listing before each update.
            rules.push(format!("counter name {:?} drop", c.name));
            chains.push(ChainDef {
                name: c.name.clone(),
                comment: format!("{} of pod {}", c.dir, c.pod),
                rules,
            });
        }
        let unknown = self.unknown_families();
        let mut node_sets = Vec::new();
        for fam in &unknown {
            let f = fam.suffix();
            node_sets.push(SetDef {
                name: format!("node_pods_{f}"),
                decl: vec![
                    format!("type {}", fam.addr_type()),
                    "flags interval".into(),
                    "comment \"this node's pod subnets\"".into(),
                ],
                elems: self
                    .pod_cidrs
                    .iter()
                    .filter(|n| Family::of(n.addr()) == *fam)
                    .map(|n| n.trunc().to_string())
                    .collect(),
            });
            node_sets.push(SetDef {
                name: format!("known_pods_{f}"),
                decl: vec![
                    format!("type {}", fam.addr_type()),
                    "comment \"addresses of the local pods the source knows\"".into(),
                ],
                elems: self
                    .known_local
                    .iter()
                    .filter(|ip| Family::of(**ip) == *fam)
                    .map(|ip| ip.to_string())
                    .collect(),
            });
        }
        let mut s = String::new();
        if !unknown.is_empty() {
            for dir in ["ingress", "egress"] {
                let _ = writeln!(s, "\tcounter unknown-{dir} {{\n\t}}");
                let _ = writeln!(s, "\tchain unknown-{dir} {{");
                let _ = writeln!(
                    s,
                    "\t\tcomment \"{dir} of a local pod address not known yet (fail closed)\""
                );
                let _ = writeln!(
                    s,
                    "\t\tlimit rate {}/second burst {} packets log prefix \"twill-policy drop {dir} unknown pod: \" level info",
                    self.log_rate,
                    self.log_rate * 2
                );
                let _ = writeln!(s, "\t\tcounter name \"unknown-{dir}\" drop");
                let _ = writeln!(s, "\t}}");
            }
        }
        // A pod can send from any source address (raw sockets need only CAP_NET_RAW, which
        // container runtimes grant by default); one outside this node's pod subnets is in
        // no egress map, so its traffic would leave the egress policy unjudged.
        let spoof_rules = |s: &mut String| {
            for fam in &unknown {
                let (p, f) = (fam.nft_proto(), fam.suffix());
                let _ = writeln!(
                    s,
                    "\t\tiifname {:?} {p} saddr != @node_pods_{f} jump unaddressed",
                    self.pod_bridge
                );
            }
        };
        let unknown_rules = |s: &mut String, daddr: bool| {
            for fam in &unknown {
                let (p, f) = (fam.nft_proto(), fam.suffix());
                let _ = writeln!(
                    s,
                    "\t\t{p} saddr @node_pods_{f} {p} saddr != @known_pods_{f} jump unknown-egress"
                );
                if daddr {
                    let _ = writeln!(
                        s,
                        "\t\t{p} daddr @node_pods_{f} {p} daddr != @known_pods_{f} jump unknown-ingress"
                    );
                }
            }
        };
        // Neighbour discovery to the node (from any interface: the underlay's router
        // too). Between pods only what hosts send: solicitations, advertisements, and the
        // MLD reports a bridge with multicast snooping needs to deliver them; router
        // advertisements and redirects come from routers, and a pod sending them would
        // redirect its neighbours' traffic.
        let nd = "icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect, mld-listener-query, mld-listener-report, mld-listener-done, mld2-listener-report } accept";
        let nd_between_pods = "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld-listener-done, mld2-listener-report } accept";
        let br = &self.pod_bridge;
        let _ = writeln!(s, "\tcounter unaddressed {{\n\t}}");
        let _ = writeln!(s, "\tchain unaddressed {{");
        let _ = writeln!(
            s,
            "\t\tcomment \"from a pod, with no pod address a policy could judge: link-local, group\""
        );
        let _ = writeln!(
            s,
            "\t\tlimit rate {}/second burst {} packets log prefix \"twill-policy drop unaddressed: \" level info",
            self.log_rate,
            self.log_rate * 2
        );
        let _ = writeln!(s, "\t\tcounter name \"unaddressed\" drop");
        let _ = writeln!(s, "\t}}");
        let cut = format!("ct mark & {CUT_MARK:#010x} != 0 drop");
        let _ = writeln!(s, "\tchain forward {{");
        let _ = writeln!(
            s,
            "\t\ttype filter hook forward priority filter; policy accept;"
        );
        let _ = writeln!(s, "\t\t{cut}");
        let _ = writeln!(s, "\t\tct state established,related accept");
        let _ = writeln!(s, "\t\t{nd_between_pods}");
        // The verdict maps know pod addresses only. A pod can also address its
        // neighbours on the bridge by link-local address, by a group (multicast, or the
        // broadcast MAC) or from its own link-local address: no map would match, and no
        // pod's policy would judge the packet. None of that is pod-to-pod traffic
        // Kubernetes promises, so it is dropped. Routed traffic never carries such
        // addresses.
        for m in [
            "ip6 saddr fe80::/10",
            "ip6 daddr fe80::/10",
            "ip daddr { 224.0.0.0/4, 255.255.255.255 }",
            "ip6 daddr ff00::/8",
            "meta pkttype { broadcast, multicast }",
        ] {
            let _ = writeln!(s, "\t\tiifname {br:?} {m} jump unaddressed");
        }
        spoof_rules(&mut s);
        unknown_rules(&mut s, true);
        let _ = writeln!(s, "\t\tip saddr vmap @egress_v4");
        let _ = writeln!(s, "\t\tip6 saddr vmap @egress_v6");
        let _ = writeln!(s, "\t\tip daddr vmap @ingress_v4");
        let _ = writeln!(s, "\t\tip6 daddr vmap @ingress_v6");
        let _ = writeln!(s, "\t}}");
        let _ = writeln!(s, "\tchain input {{");
        let _ = writeln!(
            s,
            "\t\ttype filter hook input priority filter; policy accept;"
        );
        let _ = writeln!(s, "\t\t{cut}");
        let _ = writeln!(s, "\t\tct state established,related accept");
        let _ = writeln!(s, "\t\tiifname \"lo\" accept");
        let _ = writeln!(s, "\t\t{nd}");
        // A pod reaching its node from its link-local address would bypass its egress map.
        let _ = writeln!(s, "\t\tiifname {br:?} ip6 saddr fe80::/10 jump unaddressed");
        spoof_rules(&mut s);
        unknown_rules(&mut s, false);
        let _ = writeln!(s, "\t\tip saddr vmap @egress_v4");
        let _ = writeln!(s, "\t\tip6 saddr vmap @egress_v6");
        let _ = writeln!(s, "\t}}");
        // Frames that are neither ARP nor IP never reach the inet hooks (br_netfilter
        // passes only IPv4 and IPv6, and not even those when VLAN-tagged), so a pod could
        // send them to its neighbours unjudged. The bridge family sees every frame; this
        // kernel has no bridge meta (no `meta ibrname`), so pod ports are recognised as
        // the bridge ports that are veths, which is what the bridge plugin creates.
        let mut bridge = String::new();
        let _ = writeln!(bridge, "add table bridge {}", self.table);
        let _ = writeln!(bridge, "flush table bridge {}", self.table);
        let _ = writeln!(bridge, "table bridge {} {{", self.table);
        let _ = writeln!(bridge, "\tchain non-ip {{");
        let _ = writeln!(
            bridge,
            "\t\tcomment \"frames from a pod port that are neither ARP, IPv4 nor IPv6 (VLAN-tagged included)\""
        );
        let _ = writeln!(
            bridge,
            "\t\tlimit rate {}/second burst {} packets log prefix \"twill-policy drop non-IP frame: \" level info",
            self.log_rate,
            self.log_rate * 2
        );
        let _ = writeln!(bridge, "\t\tcounter drop");
        let _ = writeln!(bridge, "\t}}");
        for hook in ["forward", "input"] {
            let _ = writeln!(bridge, "\tchain {hook} {{");
            let _ = writeln!(
                bridge,
                "\t\ttype filter hook {hook} priority filter; policy accept;"
            );
            let _ = writeln!(
                bridge,
                "\t\tmeta iifkind \"veth\" ether type != {{ arp, ip, ip6 }} jump non-ip"
            );
            let _ = writeln!(bridge, "\t}}");
        }
        let _ = writeln!(bridge, "}}");
        TableDef {
            table: self.table.clone(),
            sets,
            maps,
            chains,
            node_sets,
            tail: s,
            bridge,
        }
    }
}

/// A named set as written into the script: declaration lines and elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDef {
    pub name: String,
    /// `type ...`, `flags ...`, `comment ...`.
    pub decl: Vec<String>,
    pub elems: Vec<String>,
}

/// A verdict map: declaration and (key, verdict) elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapDef {
    pub name: String,
    pub decl: String,
    pub elems: Vec<(String, String)>,
}

/// A regular (pod) chain: comment and rule lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainDef {
    pub name: String,
    pub comment: String,
    pub rules: Vec<String>,
}

/// The whole table as named objects. `tail` is the fixed part (unknown-pod chains and the
/// base chains), which only changes with the table's shape (pod subnets' families, log
/// rate); incremental updates never touch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDef {
    pub table: String,
    pub sets: Vec<SetDef>,
    pub maps: Vec<MapDef>,
    pub chains: Vec<ChainDef>,
    /// node_pods_*/known_pods_* (unknown-pod isolation).
    pub node_sets: Vec<SetDef>,
    pub tail: String,
    /// The commands that (re)define table `bridge <table>`: static, refilled in place
    /// with every whole-table sync, untouched by incremental ones.
    pub bridge: String,
}

/// What an incremental transaction changes, for logs and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Set and map elements added or deleted.
    pub elements: usize,
    /// Chains added, flushed and refilled, or deleted.
    pub chains: Vec<String>,
    /// Sets added or deleted.
    pub sets: usize,
}

impl TableDef {
    fn write_set(w: &mut impl std::fmt::Write, set: &SetDef) -> std::fmt::Result {
        writeln!(w, "\tset {} {{", set.name)?;
        for d in &set.decl {
            writeln!(w, "\t\t{d}")?;
        }
        if !set.elems.is_empty() {
            write!(w, "\t\telements = {{ ")?;
            for (i, e) in set.elems.iter().enumerate() {
                if i > 0 {
                    w.write_str(", ")?;
                }
                w.write_str(e)?;
            }
            writeln!(w, " }}")?;
        }
        writeln!(w, "\t}}")
    }

    /// Writes the full script (see [`Ruleset::render`]) into `w`; `inner` is written
    /// right after the table's opening line (the ruleset id set, [`crate::enforce::mark`]).
    pub fn write_script(&self, w: &mut impl std::fmt::Write, inner: &str) -> std::fmt::Result {
        let t = &self.table;
        writeln!(
            w,
            "# generated by twill-policy; replaced as a whole on every sync"
        )?;
        writeln!(w, "add table inet {t}")?;
        writeln!(w, "delete table inet {t}")?;
        self.write_body(w, inner)?;
        w.write_str(&self.bridge)
    }

    /// The `table inet T { ... }` block of the full script (after the commands that
    /// clear the old table).
    pub fn write_body(&self, w: &mut impl std::fmt::Write, inner: &str) -> std::fmt::Result {
        let t = &self.table;
        writeln!(w, "table inet {t} {{")?;
        w.write_str(inner)?;
        for set in &self.sets {
            Self::write_set(w, set)?;
        }
        for m in &self.maps {
            writeln!(w, "\tmap {} {{", m.name)?;
            writeln!(w, "\t\t{}", m.decl)?;
            if !m.elems.is_empty() {
                write!(w, "\t\telements = {{ ")?;
                for (i, (k, v)) in m.elems.iter().enumerate() {
                    if i > 0 {
                        w.write_str(",\n\t\t\t     ")?;
                    }
                    write!(w, "{k} : {v}")?;
                }
                writeln!(w, " }}")?;
            }
            writeln!(w, "\t}}")?;
        }
        for c in &self.chains {
            writeln!(w, "\tcounter {} {{\n\t}}", c.name)?;
            writeln!(w, "\tchain {} {{", c.name)?;
            writeln!(w, "\t\tcomment {}", quoted(&c.comment, COMMENT_MAX))?;
            for r in &c.rules {
                writeln!(w, "\t\t{r}")?;
            }
            writeln!(w, "\t}}")?;
        }
        for set in &self.node_sets {
            Self::write_set(w, set)?;
        }
        w.write_str(&self.tail)?;
        writeln!(w, "}}")
    }

    /// The full script.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = self.write_script(&mut s, "");
        s
    }

    /// The commands that turn the loaded table `old` into `self` inside one transaction
    /// (the caller wraps them with its own first and last commands), or None when the
    /// change needs a full replacement (another table, another fixed part, a set whose
    /// type changed, a chain whose comment changed).
    ///
    /// Order matters inside the transaction: new sets (with their elements) first, then
    /// element changes of kept sets (deletions before additions: interval sets reject
    /// overlaps), new chains (empty), flush and refill of changed chains and fill of new
    /// ones (their rules may name new sets and are all in place before any map element
    /// jumps to them), map elements (deletions, then additions), then dead chains
    /// (flushed, then deleted: nothing jumps to them any more) with their counters, and last
    /// dead sets (no rule
    /// names them any more).
    pub fn diff(&self, old: &TableDef) -> Option<(String, DiffStats)> {
        use std::collections::{HashMap, HashSet};
        if self.table != old.table || self.tail != old.tail || self.bridge != old.bridge {
            return None;
        }
        let t = &self.table;
        let mut st = DiffStats::default();
        let mut out = String::new();
        let old_sets: HashMap<&str, &SetDef> = old
            .sets
            .iter()
            .chain(&old.node_sets)
            .map(|s| (s.name.as_str(), s))
            .collect();
        let new_sets: Vec<&SetDef> = self.sets.iter().chain(&self.node_sets).collect();
        let new_names: HashSet<&str> = new_sets.iter().map(|s| s.name.as_str()).collect();
        let elems_cmd = |out: &mut String, verb: &str, name: &str, elems: &[&str]| {
            if elems.is_empty() {
                return;
            }
            let _ = write!(out, "{verb} element inet {t} {name} {{ ");
            for (i, e) in elems.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(e);
            }
            out.push_str(" }\n");
        };
        // New sets and element changes of kept ones.
        for set in &new_sets {
            match old_sets.get(set.name.as_str()) {
                None => {
                    let _ = write!(out, "add set inet {t} {} {{ ", set.name);
                    for d in &set.decl {
                        let _ = write!(out, "{d}; ");
                    }
                    out.push_str("}\n");
                    let e: Vec<&str> = set.elems.iter().map(String::as_str).collect();
                    elems_cmd(&mut out, "add", &set.name, &e);
                    st.sets += 1;
                    st.elements += e.len();
                }
                Some(o) if o.decl != set.decl => return None,
                Some(o) if o.elems == set.elems => {}
                Some(o) => {
                    let before: HashSet<&str> = o.elems.iter().map(String::as_str).collect();
                    let after: HashSet<&str> = set.elems.iter().map(String::as_str).collect();
                    let del: Vec<&str> = o
                        .elems
                        .iter()
                        .map(String::as_str)
                        .filter(|e| !after.contains(e))
                        .collect();
                    let add: Vec<&str> = set
                        .elems
                        .iter()
                        .map(String::as_str)
                        .filter(|e| !before.contains(e))
                        .collect();
                    elems_cmd(&mut out, "delete", &set.name, &del);
                    elems_cmd(&mut out, "add", &set.name, &add);
                    st.elements += del.len() + add.len();
                }
            }
        }
        // Chains: new ones created empty, then every new or changed chain (re)filled.
        let old_chains: HashMap<&str, &ChainDef> =
            old.chains.iter().map(|c| (c.name.as_str(), c)).collect();
        let mut fill = Vec::new();
        for c in &self.chains {
            match old_chains.get(c.name.as_str()) {
                None => {
                    let _ = writeln!(out, "add counter inet {t} {}", c.name);
                    let _ = writeln!(
                        out,
                        "add chain inet {t} {} {{ comment {}; }}",
                        c.name,
                        quoted(&c.comment, COMMENT_MAX)
                    );
                    fill.push(c);
                }
                Some(o) if o.comment != c.comment => return None,
                Some(o) if o.rules == c.rules => {}
                Some(_) => {
                    let _ = writeln!(out, "flush chain inet {t} {}", c.name);
                    fill.push(c);
                }
            }
        }
        for c in fill {
            for r in &c.rules {
                let _ = writeln!(out, "add rule inet {t} {} {r}", c.name);
            }
            st.chains.push(c.name.clone());
        }
        // Map elements.
        if self.maps.len() != old.maps.len() {
            return None;
        }
        for (m, o) in self.maps.iter().zip(&old.maps) {
            if m.name != o.name || m.decl != o.decl {
                return None;
            }
            if m.elems == o.elems {
                continue;
            }
            let before: HashMap<&str, &str> = o
                .elems
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let after: HashMap<&str, &str> = m
                .elems
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let del: Vec<&str> = o
                .elems
                .iter()
                .filter(|(k, v)| after.get(k.as_str()) != Some(&v.as_str()))
                .map(|(k, _)| k.as_str())
                .collect();
            let add: Vec<String> = m
                .elems
                .iter()
                .filter(|(k, v)| before.get(k.as_str()) != Some(&v.as_str()))
                .map(|(k, v)| format!("{k} : {v}"))
                .collect();
            elems_cmd(&mut out, "delete", &m.name, &del);
            let add_ref: Vec<&str> = add.iter().map(String::as_str).collect();
            elems_cmd(&mut out, "add", &m.name, &add_ref);
            st.elements += del.len() + add.len();
        }
        // Dead chains, then dead sets.
        let new_chains: HashSet<&str> = self.chains.iter().map(|c| c.name.as_str()).collect();
        for c in &old.chains {
            if !new_chains.contains(c.name.as_str()) {
                let _ = writeln!(out, "flush chain inet {t} {}", c.name);
                let _ = writeln!(out, "delete chain inet {t} {}", c.name);
                let _ = writeln!(out, "delete counter inet {t} {}", c.name);
                st.chains.push(c.name.clone());
            }
        }
        for s in old.sets.iter().chain(&old.node_sets) {
            if !new_names.contains(s.name.as_str()) {
                let _ = writeln!(out, "delete set inet {t} {}", s.name);
                st.sets += 1;
            }
        }
        Some((out, st))
    }
}

/// The script that removes the tables (if present).
pub fn render_delete(table: &str) -> String {
    format!(
        "add table inet {table}\ndelete table inet {table}\nadd table bridge {table}\ndelete table bridge {table}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        ContainerPort, LabelSelector, Namespace, NetworkPolicy, Operator, PolicyPort, Requirement,
    };

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// `n` pods spread over namespaces x, y and z, labelled `app: a0|a1|a2`, each with a
    /// TCP port `http` (8080); every tenth pod is on node n1.
    fn world(n: u32, policies: Vec<NetworkPolicy>) -> Snapshot {
        let nss = ["x", "y", "z"];
        let pods = (0..n).map(|i| Pod {
            namespace: nss[i as usize % 3].into(),
            name: format!("p{i}"),
            labels: labels(&[("app", &format!("a{}", i / 3 % 3))]),
            node: Some(if i % 10 == 0 { "n1" } else { "n2" }.into()),
            ips: vec![IpAddr::V4(Ipv4Addr::from(0x0af4_0000 + i))],
            host_network: false,
            ports: vec![ContainerPort {
                name: Some("http".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            phase: None,
            terminating: false,
        });
        Snapshot::new(
            nss.iter().map(|n| Namespace::new(n, Labels::new())),
            pods,
            policies,
        )
    }

    fn policy(name: &str, ingress: Vec<Rule>, egress: Vec<Rule>) -> NetworkPolicy {
        NetworkPolicy {
            namespace: "x".into(),
            name: name.into(),
            pod_selector: LabelSelector::default(),
            policy_types: vec![PolicyType::Ingress, PolicyType::Egress],
            ingress,
            egress,
        }
    }

    fn every_pod() -> Peer {
        Peer::Pods {
            pods: LabelSelector::default(),
            namespaces: Some(LabelSelector::default()),
        }
    }

    fn app(v: &str) -> LabelSelector {
        LabelSelector {
            match_labels: labels(&[("app", v)]),
            match_expressions: vec![],
        }
    }

    fn rule(peers: Vec<Peer>, ports: Vec<PolicyPort>) -> Rule {
        Rule { peers, ports }
    }

    fn tcp(p: u16) -> PolicyPort {
        PolicyPort {
            protocol: Protocol::Tcp,
            port: Some(Port::Range(p, p)),
        }
    }

    fn named(n: &str) -> PolicyPort {
        PolicyPort {
            protocol: Protocol::Tcp,
            port: Some(Port::Named(n.into())),
        }
    }

    fn render(snap: &Snapshot) -> String {
        compile(snap, "n1", &Options::default()).render()
    }

    #[test]
    fn repeated_peers_are_expanded_once() {
        // 50k copies of `{namespaceSelector: {}}` over 3000 pods: 1.5e8 (pod, peer) visits
        // and as many set entries before; now every pod is looked at once.
        let peers = vec![every_pod(); 50_000];
        let snap = world(
            3000,
            vec![policy("p", vec![rule(peers.clone(), vec![])], vec![])],
        );
        let one = world(
            3000,
            vec![policy("p", vec![rule(vec![every_pod()], vec![])], vec![])],
        );
        assert_eq!(render(&snap), render(&one));
        let mut b = Builder::new(&snap);
        let parts = b.peer_parts("x", &snap.policies[0].ingress[0].peers);
        assert_eq!(parts[0].0 .0.len(), 3000);
        assert!(b.visits <= 3000, "{} pods visited", b.visits);
        // Once every pod is selected, further (even distinct) selectors are not expanded.
        let mut peers = vec![every_pod()];
        peers.extend((0..10_000).map(|i| Peer::Pods {
            pods: app(&format!("nope{i}")),
            namespaces: Some(LabelSelector::default()),
        }));
        let snap = world(3000, vec![policy("p", vec![rule(peers, vec![])], vec![])]);
        let mut b = Builder::new(&snap);
        b.peer_parts("x", &snap.policies[0].ingress[0].peers);
        assert!(b.visits <= 3000, "{} pods visited", b.visits);
        // Selected pods are not collected again by an overlapping peer, and a namespace whose
        // pods are all selected is not visited again.
        let peers = vec![
            Peer::Pods {
                pods: LabelSelector::default(),
                namespaces: None,
            },
            Peer::Pods {
                pods: app("a0"),
                namespaces: None,
            },
            Peer::Pods {
                pods: app("a1"),
                namespaces: Some(LabelSelector::default()),
            },
        ];
        let snap = world(300, vec![policy("p", vec![rule(peers, vec![])], vec![])]);
        let mut b = Builder::new(&snap);
        let parts = b.peer_parts("x", &snap.policies[0].ingress[0].peers);
        // All 100 of x, plus the a1 pods of y and z.
        let want = snap
            .pods
            .iter()
            .filter(|p| p.namespace == "x" || p.labels["app"] == "a1")
            .count();
        assert_eq!(parts[0].0 .0.len(), want);
        // x once; then in y and z only the a1 pods (label index).
        let a1_elsewhere = snap
            .pods
            .iter()
            .filter(|p| p.namespace != "x" && p.labels["app"] == "a1")
            .count();
        assert_eq!(b.visits, 100 + a1_elsewhere);
    }

    fn req(key: &str, operator: Operator, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn selectors_look_only_at_the_pods_they_can_match() {
        // 20k distinct selectors that match no pod: 20k times every pod before; the label
        // index answers each with a lookup.
        let peers: Vec<Peer> = (0..20_000)
            .map(|i| Peer::Pods {
                pods: app(&format!("nope{i}")),
                namespaces: Some(LabelSelector::default()),
            })
            .collect();
        let snap = world(3000, vec![policy("p", vec![rule(peers, vec![])], vec![])]);
        let mut b = Builder::new(&snap);
        let parts = b.peer_parts("x", &snap.policies[0].ingress[0].peers);
        assert!(parts[0].0 .0.is_empty());
        assert_eq!(b.visits, 0);
        // The index only narrows the pods looked at: every kind of requirement selects
        // exactly what the selector matches.
        let mut snap = world(600, vec![]);
        for (i, p) in snap.pods.iter_mut().enumerate() {
            if i % 4 != 0 {
                p.labels.insert("tier".into(), format!("t{}", i % 5));
            }
        }
        use Operator::*;
        let sels = [
            vec![req("app", In, &["a0", "a2", "zz"])],
            vec![req("app", In, &["zz"])],
            vec![req("nokey", In, &["a"])],
            vec![req("tier", Exists, &[])],
            vec![req("nokey", Exists, &[])],
            vec![req("tier", DoesNotExist, &[])],
            vec![req("tier", NotIn, &["t1", "t2"])],
            vec![req("app", In, &["a1"]), req("tier", NotIn, &["t3"])],
            vec![req("tier", Exists, &[]), req("app", In, &["a0", "a1"])],
        ];
        let mut peers = Vec::new();
        for m in sels {
            for labels in [Labels::new(), labels(&[("app", "a2")])] {
                peers.push(vec![Peer::Pods {
                    pods: LabelSelector {
                        match_labels: labels,
                        match_expressions: m.clone(),
                    },
                    namespaces: Some(LabelSelector::default()),
                }]);
            }
        }
        let mut b = Builder::new(&snap);
        for ps in &peers {
            let got = b.peer_parts("x", ps);
            let Peer::Pods { pods: sel, .. } = &ps[0] else {
                unreachable!()
            };
            let mut want: Vec<(u128, u128)> = snap
                .pods
                .iter()
                .filter(|p| sel.matches(&p.labels))
                .map(|p| (ip_num(p.ips[0]), ip_num(p.ips[0])))
                .collect();
            want.sort();
            assert_eq!(got[0].0 .0, want, "{sel}");
        }
    }

    #[test]
    fn identical_peer_lists_share_one_expansion() {
        let peers = vec![Peer::Pods {
            pods: app("a0"),
            namespaces: Some(LabelSelector::default()),
        }];
        let rules: Vec<Rule> = (0..1000)
            .map(|i| rule(peers.clone(), vec![tcp(1000 + i)]))
            .collect();
        let snap = world(3000, vec![policy("p", rules, vec![])]);
        let rs = compile(&snap, "n1", &Options::default());
        // One set for the 1000 rules that name the same peers.
        assert_eq!(rs.addr_sets.len(), 1, "{:?}", rs.addr_sets);
        let mut b = Builder::new(&snap);
        for ri in 0..1000 {
            b.peer_set(0, PolicyType::Ingress, ri);
        }
        assert_eq!(b.parts.len(), 1);
        assert!(b.visits <= 3000, "{} pods visited", b.visits);
    }

    #[test]
    fn ranges_contains_is_a_binary_search_over_sorted_disjoint_ranges() {
        // A deterministic scatter of ranges, overlapping and adjacent ones included.
        let mut raw = Vec::new();
        let mut x: u128 = 12345;
        for _ in 0..2000 {
            x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64);
            let a = x % 100_000;
            raw.push((a, a + x % 40));
        }
        let r = Ranges::normalize(raw.clone());
        // The invariant `contains` relies on.
        assert!(r.0.iter().all(|(a, b)| a <= b));
        assert!(
            r.0.windows(2).all(|w| w[0].1 + 1 < w[1].0),
            "sorted, disjoint, apart"
        );
        for v in 0..100_100 {
            let linear = raw.iter().any(|&(a, b)| a <= v && v <= b);
            assert_eq!(r.contains(v), linear, "{v}");
        }
        assert!(!Ranges::default().contains(0));
        let cut = r.subtract(&Ranges::normalize(vec![(500, 60_000)]));
        assert!(cut.0.windows(2).all(|w| w[0].1 + 1 < w[1].0));
        assert!(!cut.contains(500) && !cut.contains(60_000));
    }

    #[test]
    fn repeated_named_ports_resolve_once() {
        // 50k copies of `{port: http}` over 3000 pods: 1.5e8 (port, pod) lookups and set
        // elements before; now one index lookup.
        let ports = vec![named("http"); 50_000];
        let peers = vec![Peer::Pods {
            pods: app("a1"),
            namespaces: Some(LabelSelector::default()),
        }];
        let snap = world(
            3000,
            vec![policy(
                "p",
                vec![],
                vec![rule(vec![], ports.clone()), rule(peers.clone(), ports)],
            )],
        );
        let one = world(
            3000,
            vec![policy(
                "p",
                vec![],
                vec![
                    rule(vec![], vec![named("http")]),
                    rule(peers, vec![named("http")]),
                ],
            )],
        );
        let rs = compile(&snap, "n1", &Options::default());
        assert_eq!(rs.render(), render(&one));
        assert_eq!(rs.tuple_sets.len(), 2);
        assert_eq!(rs.tuple_sets[0].elems.len(), 3000);
        let a1 = snap.pods.iter().filter(|p| p.labels["app"] == "a1").count();
        assert_eq!(rs.tuple_sets[1].elems.len(), a1);
        // The index keeps each pod's first port of a name and protocol, as named_port does.
        let mut snap = world(
            30,
            vec![policy("p", vec![], vec![rule(vec![], vec![named("http")])])],
        );
        for p in &mut snap.pods {
            p.ports.insert(
                0,
                ContainerPort {
                    name: Some("http".into()),
                    port: 9090,
                    protocol: Protocol::Udp,
                },
            );
            p.ports.push(ContainerPort {
                name: Some("http".into()),
                port: 9999,
                protocol: Protocol::Tcp,
            });
        }
        let rs = compile(&snap, "n1", &Options::default());
        assert!(rs.tuple_sets[0]
            .elems
            .iter()
            .all(|e| e.1 == Protocol::Tcp && e.2 == 8080));
        assert_eq!(rs.tuple_sets[0].elems.len(), 30);
    }

    fn chain_rules_of(rs: &Ruleset) -> Vec<usize> {
        rs.chains.iter().map(|c| c.rules.len()).collect()
    }

    #[test]
    fn repeated_rules_compile_to_one_chain_rule() {
        // 500k `{}` ingress rules: 500k returns in every pod chain before.
        let snap = world(
            300,
            vec![policy("p", vec![rule(vec![], vec![]); 500_000], vec![])],
        );
        let rs = compile(&snap, "n1", &Options::default());
        let one = world(300, vec![policy("p", vec![rule(vec![], vec![])], vec![])]);
        assert_eq!(rs.render(), render(&one));
        assert!(
            chain_rules_of(&rs).iter().all(|n| *n <= 1),
            "{:?}",
            chain_rules_of(&rs)
        );
        // Distinct rules that compile to the same chain rule (their selectors pick the same
        // pods, so they share one set): one chain rule, with the first rule's comment.
        let rules: Vec<Rule> = (0..20_000)
            .map(|i| {
                let mut sel = app("a0");
                sel.match_expressions.push(Requirement {
                    key: "k".into(),
                    operator: Operator::NotIn,
                    values: [format!("v{i}")].into(),
                });
                rule(
                    vec![Peer::Pods {
                        pods: sel,
                        namespaces: None,
                    }],
                    vec![tcp(80)],
                )
            })
            .collect();
        let snap = world(300, vec![policy("p", rules, vec![])]);
        let rs = compile(&snap, "n1", &Options::default());
        let ingress: Vec<&PodChain> = rs
            .chains
            .iter()
            .filter(|c| c.dir == PolicyType::Ingress)
            .collect();
        assert!(!ingress.is_empty());
        for c in ingress {
            assert_eq!(c.rules.len(), 1, "{:?}", c.rules);
            assert_eq!(c.rules[0].comment, "x/p ingress[0]");
        }
        assert_eq!(rs.addr_sets.len(), 1);
    }

    #[test]
    fn duplicate_and_dead_chain_rules_are_dropped() {
        let udp80 = PolicyPort {
            protocol: Protocol::Udp,
            port: Some(Port::Range(80, 80)),
        };
        let p1 = policy(
            "p1",
            vec![
                rule(vec![], vec![tcp(80)]),
                rule(vec![], vec![udp80.clone()]),
                rule(vec![], vec![tcp(80), tcp(80)]),
            ],
            vec![],
        );
        // The same rules again in another policy, then an open rule, then dead ones.
        let p2 = policy(
            "p2",
            vec![
                rule(vec![], vec![udp80]),
                rule(vec![], vec![]),
                rule(vec![], vec![tcp(81)]),
            ],
            vec![],
        );
        let p3 = policy("p3", vec![rule(vec![every_pod()], vec![tcp(82)])], vec![]);
        let snap = world(30, vec![p1, p2, p3]);
        let rs = compile(&snap, "n1", &Options::default());
        let c = rs
            .chains
            .iter()
            .find(|c| c.dir == PolicyType::Ingress)
            .unwrap();
        let got: Vec<(&str, Option<Protocol>)> = c
            .rules
            .iter()
            .map(|r| (r.comment.as_str(), r.ports.as_ref().map(|p| p.proto)))
            .collect();
        assert_eq!(
            got,
            [
                ("x/p1 ingress[0]", Some(Protocol::Tcp)),
                ("x/p1 ingress[1]", Some(Protocol::Udp)),
                ("x/p2 ingress[1]", None),
            ]
        );
        assert!(c.rules[2].is_unconditional());
        // What the chain does is unchanged: everything is allowed in.
        let (src, dst) = (snap.pods[1].ips[0], snap.pods[0].ips[0]);
        assert_eq!(rs.decide(src, dst, Protocol::Sctp, 9), Decision::Accept);
    }

    #[test]
    fn idents_of_long_or_odd_names_are_bounded_distinct_and_stable() {
        // Plain names are kept as they are.
        assert_eq!(
            ident("pod-in", &["x", "web-1.a_b"], ""),
            "pod-in/x/web-1.a_b"
        );
        assert_eq!(ident("peers", &["x", "p"], "in0/v4"), "peers/x/p/in0/v4");
        let long = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        let ns = "n".repeat(63);
        let names = [
            ident("pod-in", &[&ns, &long], ""),
            ident("pod-out", &[&ns, &long], ""),
            ident("pod-in", &[&ns, &format!("{long}c")], ""),
            ident("pod-in", &["a/b", "c"], ""),
            ident("pod-in", &["a", "b/c"], ""),
            ident("pod-in", &["x", "é\"$ \n"], ""),
            ident("pod-in", &["x", "_\u{301}"], ""),
            ident("peers", &[&ns, &long], "in12/v6"),
            ident("pod-in", &["x", ""], ""),
        ];
        for n in &names {
            assert_eq!(n.len(), NAME_MAX, "{n}");
            assert!(n.starts_with(|c: char| c.is_ascii_alphabetic()), "{n}");
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b)),
                "{n}"
            );
        }
        let distinct: HashSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), names.len());
        // Readable: the namespace and the start of the name, and the tail.
        assert!(names[0].starts_with(&format!("pod-in/{ns}/aaaa")));
        assert!(names[7].contains("/in12/v6-"));
        // Stable across calls (and so across syncs).
        assert_eq!(ident("pod-in", &[&ns, &long], ""), names[0]);
        // The longest plain name is kept; one byte more is hashed.
        let fit = "a".repeat(NAME_MAX - 1 - "pod-in/x/".len());
        assert_eq!(ident("pod-in", &["x", &fit], "").len(), NAME_MAX - 1);
        assert_eq!(
            ident("pod-in", &["x", &format!("{fit}a")], "").len(),
            NAME_MAX
        );
    }

    #[test]
    fn quoted_strings_are_escaped_bounded_and_cut_on_char_boundaries() {
        for s in [
            "x/allow-web ingress[0]",
            "twill-policy drop ingress x/a: ",
            "",
        ] {
            assert_eq!(quoted(s, COMMENT_MAX), format!("{s:?}"));
        }
        assert_eq!(
            quoted("a\"b\\c$d\né", COMMENT_MAX),
            "\"a\\u{22}b\\u{5c}c\\u{24}d\\u{a}\\u{e9}\""
        );
        // At the limit: kept; one more: the middle is cut, the end kept.
        let at = format!("x/{} ingress[7]", "p".repeat(COMMENT_MAX - 13));
        assert_eq!(at.len(), COMMENT_MAX);
        assert_eq!(quoted(&at, COMMENT_MAX), format!("{at:?}"));
        let over = format!("x/{} ingress[7]", "p".repeat(300));
        let q = quoted(&over, COMMENT_MAX);
        assert!(q.len() <= COMMENT_MAX + 2, "{q}");
        assert!(
            q.starts_with("\"x/ppp") && q.ends_with("pp ingress[7]\""),
            "{q}"
        );
        assert!(q.contains(".."));
        // Non-ASCII and escapes of every width: never more than max, never a cut escape.
        for c in ['é', '☃', '😀', '"', '\u{0}'] {
            for n in 0..200 {
                let s: String = std::iter::repeat_n(c, n).collect();
                for max in [LOG_PREFIX_MAX, COMMENT_MAX, 10, 3] {
                    let q = quoted(&s, max);
                    let inner = &q[1..q.len() - 1];
                    assert!(inner.len() <= max, "{c:?} x{n} max {max}: {q}");
                    assert!(inner.is_ascii() && !inner.contains(['"', '$']), "{q}");
                    let unit = format!("\\u{{{:x}}}", c as u32);
                    assert!(
                        inner.split("..").all(|part| part.len() % unit.len() == 0),
                        "{q}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_over_long_policy_name_renders_within_nft_limits() {
        // A 182-character policy name (three 60-character labels) selecting a pod: its
        // comment once made nft reject every sync on the node.
        let name = ["a".repeat(60), "b".repeat(60), "c".repeat(60)].join(".");
        let snap = world(
            30,
            vec![policy(
                &name,
                vec![rule(vec![every_pod()], vec![tcp(80)])],
                vec![],
            )],
        );
        let script = render(&snap);
        for line in script.lines() {
            for (i, part) in line.split('"').enumerate() {
                if i % 2 == 1 {
                    let limit = if line.contains("log prefix") {
                        LOG_PREFIX_MAX
                    } else {
                        COMMENT_MAX
                    };
                    assert!(part.len() <= limit, "{line}");
                }
            }
        }
        assert!(script.contains(&format!("x/{}", &name[..40])), "{script}");
    }
}
