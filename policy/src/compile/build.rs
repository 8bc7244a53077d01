//! The builder: a snapshot and a node in, the [`Ruleset`] of the node's pods out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::rc::Rc;

use super::index::{candidates, label_index, LabelIndex};
use super::names::ident;
use super::ranges::{ip_num, net_range, Family, Ranges, FAMILIES};
use super::{
    AddrSet, ChainEnd, ChainKind, ChainRule, Options, PodChain, ProtoPorts, RuleVerdict, Ruleset,
    TupleSet,
};
use crate::model::{
    Action, ClusterRule, Labels, Peer, Pod, PolicyPort, PolicyType, Port, Protocol, Snapshot, Tier,
};

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
    /// As `peer_sets`, `tuple_names`, `distinct` and `templates`, for (cluster policy
    /// index, dir, rule index).
    cluster_sets: BTreeMap<(usize, PolicyType, usize), [Vec<String>; 2]>,
    cluster_tuples: BTreeMap<(usize, usize), [Option<String>; 2]>,
    cluster_distinct: HashMap<(usize, PolicyType), Rc<[usize]>>,
    cluster_templates: HashMap<(usize, PolicyType, usize), Rc<[ChainRule]>>,
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
            cluster_sets: BTreeMap::new(),
            cluster_tuples: BTreeMap::new(),
            cluster_distinct: HashMap::new(),
            cluster_templates: HashMap::new(),
        }
    }

    /// Peer addresses of a rule as per-family ranges.
    fn peer_ranges(&mut self, ns: &'a str, peers: &'a [Peer]) -> [Ranges; 2] {
        merged(&self.peer_parts(ns, peers))
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
                                Some(label_index(&self.pods, &self.namespaces[k].pods));
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
        let names = self.addr_sets_of(
            [("peers", "peer pods"), ("cidrs", "ipBlocks")],
            &[&pol.namespace, &pol.name],
            &format!("{}{ri}", dir_short(dir)),
            &format!("{} {dir}[{ri}]", pol.key()),
            &parts,
        );
        self.peer_sets.insert((pi, dir, ri), names.clone());
        names
    }

    /// The sets of peer addresses `parts` (hash set of single addresses, interval set of
    /// ranges, per family), named `<kind>/<objs>/<tail>/<v4|v6>` with `kinds` (set kind,
    /// comment word) for the hash and the interval set; a set with the same contents as
    /// one already made is reused instead.
    fn addr_sets_of(
        &mut self,
        kinds: [(&str, &str); 2],
        objs: &[&str],
        tail: &str,
        comment: &str,
        parts: &PeerParts,
    ) -> [Vec<String>; 2] {
        let mut names: [Vec<String>; 2] = [vec![], vec![]];
        for fam in FAMILIES {
            let (pods, blocks) = &parts[fam as usize];
            for (interval, r, (kind, what)) in [(false, pods, kinds[0]), (true, blocks, kinds[1])] {
                if r.0.is_empty() {
                    continue;
                }
                if let Some(name) = self.by_content.get(&(fam, interval, r.0.clone())) {
                    names[fam as usize].push(name.clone());
                    continue;
                }
                let name = ident(kind, objs, &format!("{tail}/{}", fam.suffix()));
                self.addr_sets.insert(
                    name.clone(),
                    AddrSet {
                        name: name.clone(),
                        family: fam,
                        interval,
                        ranges: r.clone(),
                        comment: format!("{comment} {what}"),
                    },
                );
                self.by_content
                    .insert((fam, interval, r.0.clone()), name.clone());
                names[fam as usize].push(name);
            }
        }
        names
    }

    /// Peer addresses of egress or ingress rule `ri` of cluster policy `ci`: its pod and
    /// network peers (as [`Builder::peer_parts`]) plus, egress, the addresses of the nodes
    /// its `nodes` peers select, with the pod addresses in the hash sets.
    fn cluster_parts(&mut self, ci: usize, dir: PolicyType, ri: usize) -> PeerParts {
        let snap = self.snap;
        let rule = &snap.cluster_policies[ci].rules(dir)[ri];
        // Cluster pod peers always name their namespaces: no policy namespace.
        let mut parts = (*self.peer_parts("", &rule.peers)).clone();
        if dir == PolicyType::Egress && !rule.nodes.is_empty() {
            for node in &snap.nodes {
                if !rule.nodes.iter().any(|sel| sel.matches(&node.labels)) {
                    continue;
                }
                for ip in &node.addresses {
                    let n = ip_num(*ip);
                    parts[Family::of(*ip) as usize].0 .0.push((n, n));
                }
            }
            for (single, _) in parts.iter_mut() {
                single.0.sort_unstable();
                single.0.dedup();
            }
        }
        parts
    }

    fn cluster_peer_set(&mut self, ci: usize, dir: PolicyType, ri: usize) -> [Vec<String>; 2] {
        if let Some(s) = self.cluster_sets.get(&(ci, dir, ri)) {
            return s.clone();
        }
        let snap = self.snap;
        let pol = &snap.cluster_policies[ci];
        let parts = self.cluster_parts(ci, dir, ri);
        // `cpeers`/`cnets`: never the name of a NetworkPolicy's set (`peers`/`cidrs`),
        // whatever the namespace is called.
        let names = self.addr_sets_of(
            [("cpeers", "peer pods and nodes"), ("cnets", "networks")],
            &[pol.kind.short(), &pol.name],
            &format!("{}{ri}", dir_short(dir)),
            &format!("{} {dir}[{ri}]", pol.key()),
            &parts,
        );
        self.cluster_sets.insert((ci, dir, ri), names.clone());
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
    /// pod among the rule's peers (all pods if the rule has no peers).
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
        let names = self.tuple_sets_of(
            "named",
            &[&pol.namespace, &pol.name],
            &format!("eg{ri}"),
            &format!("{} egress[{ri}] named ports", pol.key()),
            &rule.ports,
            peers,
        );
        self.tuple_names.insert((pi, ri), names.clone());
        names
    }

    /// [`Builder::tuple_set`] for egress rule `ri` of cluster policy `ci` (`any_peer`: every
    /// pod), in sets named `cnamed/...`.
    fn cluster_tuple_set(&mut self, ci: usize, ri: usize) -> [Option<String>; 2] {
        if let Some(s) = self.cluster_tuples.get(&(ci, ri)) {
            return s.clone();
        }
        let snap = self.snap;
        let pol = &snap.cluster_policies[ci];
        let rule = &pol.egress[ri];
        let peers = if rule.any_peer {
            None
        } else {
            let parts = self.cluster_parts(ci, PolicyType::Egress, ri);
            Some(merged(&parts))
        };
        let names = self.tuple_sets_of(
            "cnamed",
            &[pol.kind.short(), &pol.name],
            &format!("eg{ri}"),
            &format!("{} egress[{ri}] named ports", pol.key()),
            &rule.ports,
            peers,
        );
        self.cluster_tuples.insert((ci, ri), names.clone());
        names
    }

    /// The named ports of `ports` resolved against every destination pod whose address is
    /// in `peers` (None: every pod), as tuple sets `<kind>/<objs>/<tail>/<v4|v6>`. Each
    /// distinct (name, protocol) is looked up once in the named-port index: only the pods
    /// that have such a port are visited.
    fn tuple_sets_of(
        &mut self,
        kind: &str,
        objs: &[&str],
        tail: &str,
        comment: &str,
        ports: &[PolicyPort],
        peers: Option<[Ranges; 2]>,
    ) -> [Option<String>; 2] {
        let mut elems: [Vec<(IpAddr, Protocol, u16)>; 2] = [vec![], vec![]];
        let mut seen = HashSet::new();
        self.named_ports();
        let (index, pods) = (self.named_ports.as_ref().expect("built"), &self.pods);
        for pp in ports {
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
            let name = ident(kind, objs, &format!("{tail}/{}", fam.suffix()));
            self.tuple_sets.insert(
                name.clone(),
                TupleSet {
                    name: name.clone(),
                    family: fam,
                    elems: e,
                    comment: comment.to_string(),
                },
            );
            names[fam as usize] = Some(name);
        }
        names
    }

    /// Indices of the rules of policy `pi` in direction `dir` that are not exact repeats of
    /// an earlier one (500k copies of `{}` are one rule).
    fn distinct_rules(&mut self, pi: usize, dir: PolicyType) -> Rc<[usize]> {
        let snap = self.snap;
        self.distinct
            .entry((pi, dir))
            .or_insert_with(|| first_of_each(snap.policies[pi].rules(dir), |r| r))
            .clone()
    }

    /// The chain rules of rule `ri` of policy `pi` in direction `dir`, in the chain of
    /// `pod`: one per (peer set, protocol group), plus the egress named-port tuple sets.
    fn chain_rules(&mut self, pi: usize, dir: PolicyType, ri: usize, pod: &Pod) -> Rc<[ChainRule]> {
        let snap = self.snap;
        let pol = &snap.policies[pi];
        let rule = &pol.rules(dir)[ri];
        // Ingress named ports are resolved against the local pod; nothing else is per pod.
        let per_pod = dir == PolicyType::Ingress && has_named(&rule.ports);
        if !per_pod {
            if let Some(r) = self.templates.get(&(pi, dir, ri)) {
                return r.clone();
            }
        }
        let peer_sets = if rule.peers.is_empty() {
            vec![None]
        } else {
            set_conditions(&self.peer_set(pi, dir, ri))
        };
        let tuples = if dir == PolicyType::Egress && has_named(&rule.ports) {
            self.tuple_set(pi, ri)
        } else {
            [None, None]
        };
        let comment = format!("{} {dir}[{ri}]", pol.key());
        let rules: Rc<[ChainRule]> =
            rule_conditions(&peer_sets, &rule.ports, dir, pod, &tuples, &comment).into();
        if !per_pod {
            self.templates.insert((pi, dir, ri), rules.clone());
        }
        rules
    }

    /// Indices of the rules of cluster policy `ci` in direction `dir` that match
    /// differently from every earlier one (a later rule with the same match conditions
    /// never decides anything, whatever its action).
    fn cluster_distinct_rules(&mut self, ci: usize, dir: PolicyType) -> Rc<[usize]> {
        let snap = self.snap;
        self.cluster_distinct
            .entry((ci, dir))
            .or_insert_with(|| {
                first_of_each(snap.cluster_policies[ci].rules(dir), |r| {
                    (r.any_peer, &r.peers, &r.nodes, &r.ports)
                })
            })
            .clone()
    }

    /// The chain rules of rule `ri` of cluster policy `ci` in direction `dir`, in the chain
    /// of `pod`, with verdict `return` (the caller sets the verdict of the rule's action).
    /// A rule without peers (not `any_peer`) matches nothing: no chain rule.
    fn cluster_chain_rules(
        &mut self,
        ci: usize,
        dir: PolicyType,
        ri: usize,
        pod: &Pod,
    ) -> Rc<[ChainRule]> {
        let snap = self.snap;
        let pol = &snap.cluster_policies[ci];
        let rule: &ClusterRule = &pol.rules(dir)[ri];
        let per_pod = dir == PolicyType::Ingress && has_named(&rule.ports);
        if !per_pod {
            if let Some(r) = self.cluster_templates.get(&(ci, dir, ri)) {
                return r.clone();
            }
        }
        let peer_sets = if rule.any_peer {
            vec![None]
        } else {
            set_conditions(&self.cluster_peer_set(ci, dir, ri))
        };
        let tuples = if dir == PolicyType::Egress && has_named(&rule.ports) {
            self.cluster_tuple_set(ci, ri)
        } else {
            [None, None]
        };
        let comment = format!("{} {} {dir}[{ri}] {}", pol.tier, pol.key(), rule.action);
        // No peer set and no tuple set (a rule whose peers match nothing): no chain rule.
        let rules: Rc<[ChainRule]> =
            rule_conditions(&peer_sets, &rule.ports, dir, pod, &tuples, &comment).into();
        if !per_pod {
            self.cluster_templates.insert((ci, dir, ri), rules.clone());
        }
        rules
    }
}

/// Indices of the items whose `key` no earlier item has.
fn first_of_each<'r, T, K: std::hash::Hash + Eq>(
    items: &'r [T],
    key: impl Fn(&'r T) -> K,
) -> Rc<[usize]> {
    let mut seen = HashSet::with_capacity(items.len());
    (0..items.len())
        .filter(|&i| seen.insert(key(&items[i])))
        .collect()
}

fn dir_short(dir: PolicyType) -> &'static str {
    match dir {
        PolicyType::Ingress => "in",
        PolicyType::Egress => "eg",
    }
}

/// Peer addresses of both kinds merged, per family.
fn merged(parts: &PeerParts) -> [Ranges; 2] {
    let [(a4, b4), (a6, b6)] = parts;
    [
        Ranges::normalize(a4.0.iter().chain(&b4.0).copied().collect()),
        Ranges::normalize(a6.0.iter().chain(&b6.0).copied().collect()),
    ]
}

fn has_named(ports: &[PolicyPort]) -> bool {
    ports.iter().any(|p| matches!(p.port, Some(Port::Named(_))))
}

/// A rule's per-family peer sets as chain rule conditions.
fn set_conditions(names: &[Vec<String>; 2]) -> Vec<Option<(Family, String)>> {
    FAMILIES
        .iter()
        .flat_map(|f| names[*f as usize].iter().map(|n| Some((*f, n.clone()))))
        .collect()
}

/// The chain rules (verdict `return`) of a policy rule: one per (peer set condition,
/// protocol group of `ports`; named ports resolved against `pod` for ingress), plus one
/// per egress named-port tuple set.
fn rule_conditions(
    peer_sets: &[Option<(Family, String)>],
    ports: &[PolicyPort],
    dir: PolicyType,
    pod: &Pod,
    tuples: &[Option<String>; 2],
    comment: &str,
) -> Vec<ChainRule> {
    let mut rules = Vec::new();
    let dst = (dir == PolicyType::Ingress).then_some(pod);
    let chain_rule = |ps: &Option<(Family, String)>, pp: Option<ProtoPorts>| ChainRule {
        peer_set: ps.clone(),
        tuple_set: None,
        ports: pp,
        verdict: RuleVerdict::Return,
        comment: comment.to_string(),
    };
    match port_groups(ports, dst) {
        None => {
            for ps in peer_sets {
                rules.push(chain_rule(ps, None));
            }
        }
        Some(groups) => {
            for ps in peer_sets {
                for g in &groups {
                    rules.push(chain_rule(ps, Some(g.clone())));
                }
            }
        }
    }
    for f in FAMILIES {
        if let Some(n) = &tuples[f as usize] {
            rules.push(ChainRule {
                peer_set: None,
                tuple_set: Some((f, n.clone())),
                ports: None,
                verdict: RuleVerdict::Return,
                comment: comment.to_string(),
            });
        }
    }
    rules
}

/// Numeric port conditions of a rule, per protocol; named ports are resolved against
/// `dst` (ingress: the local pod) or skipped (`dst` None: egress, handled by tuple sets).
/// `None` = the rule has no ports (everything). `Some(empty)` = nothing numeric matches.
fn port_groups(ports: &[PolicyPort], dst: Option<&Pod>) -> Option<Vec<ProtoPorts>> {
    if ports.is_empty() {
        return None;
    }
    let mut by_proto: BTreeMap<Protocol, Option<Vec<(u16, u16)>>> = BTreeMap::new();
    for pp in ports {
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

/// Chain rules of one chain being built: the rules so far, and the match conditions
/// already in it (a rule with the same conditions as an earlier one is dead, whatever its
/// verdict, and so is everything after an unconditional rule).
#[derive(Default)]
struct ChainBuf {
    rules: Vec<ChainRule>,
    seen: HashSet<RuleKey>,
    /// An unconditional rule ended the chain.
    ended: bool,
}

impl ChainBuf {
    /// Adds `r` with `verdict` unless it is dead; false once the chain has ended.
    fn push(&mut self, r: &ChainRule, verdict: &RuleVerdict) -> bool {
        if self.ended {
            return false;
        }
        if self
            .seen
            .insert((r.peer_set.clone(), r.tuple_set.clone(), r.ports.clone()))
        {
            let mut r = r.clone();
            r.verdict = verdict.clone();
            self.ended = r.is_unconditional();
            self.rules.push(r);
        }
        !self.ended
    }

    fn has_goto(&self, target: &str) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(&r.verdict, RuleVerdict::Goto(t) if t == target))
    }
}

/// The chains of one local pod in one direction.
struct DirChains {
    /// Deny chains, the after-Admin chain, then the pod chain (targets of a `goto` come
    /// before the chains that name them).
    chains: Vec<PodChain>,
}

impl<'a> Builder<'a> {
    /// The chains of `pod` in direction `dir`: Admin rules, then the NetworkPolicy part
    /// (`selecting` isolates the pod: allow rules, then drop) or else the Baseline rules
    /// (then return). None when no packet could be dropped: the pod needs no chain.
    fn pod_chains(
        &mut self,
        pod: &Pod,
        dir: PolicyType,
        selecting: &[usize],
        cluster: &[usize],
    ) -> Option<DirChains> {
        let snap = self.snap;
        let kind = match dir {
            PolicyType::Ingress => "pod-in",
            PolicyType::Egress => "pod-out",
        };
        let objs = [pod.namespace.as_str(), pod.name.as_str()];
        let name = ident(kind, &objs, "");
        let deny_name = |tier: Tier| match tier {
            Tier::Admin => ident(kind, &objs, "admin-deny"),
            Tier::Baseline => ident(kind, &objs, "baseline-deny"),
        };
        let after_admin = ident(kind, &objs, "after-admin");
        let verdict = |tier: Tier, action: Action| match (tier, action) {
            (_, Action::Deny) => RuleVerdict::Goto(deny_name(tier)),
            (Tier::Admin, Action::Pass) => RuleVerdict::Goto(after_admin.clone()),
            _ => RuleVerdict::Return,
        };
        let mut admin = ChainBuf::default();
        'admin: for &ci in cluster {
            let pol = &snap.cluster_policies[ci];
            if pol.tier != Tier::Admin {
                continue;
            }
            for &ri in self.cluster_distinct_rules(ci, dir).iter() {
                let v = verdict(Tier::Admin, pol.rules(dir)[ri].action);
                for r in self.cluster_chain_rules(ci, dir, ri, pod).iter() {
                    if !admin.push(r, &v) {
                        break 'admin;
                    }
                }
            }
        }
        let passes = admin.has_goto(&after_admin);
        // The part after the Admin tier: reached when no Admin rule decided, or by a Pass.
        let mut rest = if passes {
            ChainBuf::default()
        } else {
            std::mem::take(&mut admin)
        };
        let rest_end = if !selecting.is_empty() {
            'np: for &pi in selecting {
                for &ri in self.distinct_rules(pi, dir).iter() {
                    for r in self.chain_rules(pi, dir, ri, pod).iter() {
                        if !rest.push(r, &RuleVerdict::Return) {
                            break 'np;
                        }
                    }
                }
            }
            ChainEnd::Drop
        } else {
            'baseline: for &ci in cluster {
                let pol = &snap.cluster_policies[ci];
                if pol.tier != Tier::Baseline {
                    continue;
                }
                for &ri in self.cluster_distinct_rules(ci, dir).iter() {
                    let v = verdict(Tier::Baseline, pol.rules(dir)[ri].action);
                    for r in self.cluster_chain_rules(ci, dir, ri, pod).iter() {
                        if !rest.push(r, &v) {
                            break 'baseline;
                        }
                    }
                }
            }
            // Returns after the last Deny change nothing: the chain returns anyway.
            while rest
                .rules
                .last()
                .is_some_and(|r| r.verdict == RuleVerdict::Return)
            {
                rest.rules.pop();
            }
            ChainEnd::Return
        };
        let (mut main, main_end, after) = if passes {
            let after_drops = rest_end == ChainEnd::Drop || !rest.rules.is_empty();
            if after_drops {
                let end = if admin.ended {
                    ChainEnd::Return
                } else {
                    ChainEnd::Goto(after_admin.clone())
                };
                (admin.rules, end, Some((rest.rules, rest_end)))
            } else {
                // Nothing after the Admin tier can drop: a Pass is a return.
                let mut rules = admin.rules;
                for r in &mut rules {
                    if r.verdict == RuleVerdict::Goto(after_admin.clone()) {
                        r.verdict = RuleVerdict::Return;
                    }
                }
                (rules, ChainEnd::Return, None)
            }
        } else {
            (rest.rules, rest_end, None)
        };
        if main_end == ChainEnd::Return {
            while main
                .last()
                .is_some_and(|r| r.verdict == RuleVerdict::Return)
            {
                main.pop();
            }
        }
        let drops = |rules: &[ChainRule], end: &ChainEnd| {
            *end == ChainEnd::Drop || rules.iter().any(|r| r.verdict != RuleVerdict::Return)
        };
        if !drops(&main, &main_end) {
            return None;
        }
        let pod_key = pod.key();
        let mut chains = Vec::new();
        for tier in [Tier::Admin, Tier::Baseline] {
            let target = RuleVerdict::Goto(deny_name(tier));
            let used = main
                .iter()
                .chain(after.iter().flat_map(|(r, _)| r))
                .any(|r| r.verdict == target);
            if used {
                chains.push(PodChain {
                    name: deny_name(tier),
                    pod: pod_key.clone(),
                    dir,
                    kind: ChainKind::Deny(tier),
                    rules: vec![],
                    end: ChainEnd::Drop,
                    counter: name.clone(),
                });
            }
        }
        if let Some((rules, end)) = after {
            chains.push(PodChain {
                name: after_admin.clone(),
                pod: pod_key.clone(),
                dir,
                kind: ChainKind::AfterAdmin,
                rules,
                end,
                counter: name.clone(),
            });
        }
        chains.push(PodChain {
            name: name.clone(),
            pod: pod_key,
            dir,
            kind: ChainKind::Pod,
            rules: main,
            end: main_end,
            counter: name,
        });
        Some(DirChains { chains })
    }
}

/// The drop-only chain of a pod direction: the fail-closed table, a broken namespace.
fn isolation_chain(pod: &Pod, dir: PolicyType) -> PodChain {
    let kind = match dir {
        PolicyType::Ingress => "pod-in",
        PolicyType::Egress => "pod-out",
    };
    let name = ident(kind, &[&pod.namespace, &pod.name], "");
    PodChain {
        name: name.clone(),
        pod: pod.key(),
        dir,
        kind: ChainKind::Pod,
        rules: vec![],
        end: ChainEnd::Drop,
        counter: name,
    }
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
        // Cluster policies that select the pod, in evaluation order (Admin tier first).
        let cluster: Vec<usize> = if broken || snap.cluster_policies.is_empty() {
            Vec::new()
        } else {
            let ns_labels = snap.namespace_labels(&pod.namespace);
            (0..snap.cluster_policies.len())
                .filter(|&i| snap.cluster_policies[i].selects(pod, &ns_labels))
                .collect()
        };
        for dir in [PolicyType::Ingress, PolicyType::Egress] {
            let pod_chains = if broken {
                vec![isolation_chain(pod, dir)]
            } else {
                let selecting: Vec<usize> = (0..snap.policies.len())
                    .filter(|&i| snap.policies[i].selects(pod, dir))
                    .collect();
                if selecting.is_empty() && cluster.is_empty() {
                    continue;
                }
                // The fail-closed table isolates every pod direction that has a chain in
                // the full table (its sets are left out below).
                if !opts.allow_rules && !selecting.is_empty() {
                    vec![isolation_chain(pod, dir)]
                } else {
                    match b.pod_chains(pod, dir, &selecting, &cluster) {
                        None => continue,
                        Some(_) if !opts.allow_rules => vec![isolation_chain(pod, dir)],
                        Some(d) => d.chains,
                    }
                }
            };
            let name = &pod_chains.last().expect("the pod chain is last").name;
            let map = match dir {
                PolicyType::Ingress => &mut ingress_map,
                PolicyType::Egress => &mut egress_map,
            };
            for ip in &ips {
                map.push((*ip, name.clone()));
            }
            chains.extend(pod_chains);
        }
    }
    // Without allow rules no chain names a set (cluster policies were compiled only to
    // learn which pods have a chain).
    let (addr_sets, tuple_sets) = if opts.allow_rules {
        (
            b.addr_sets.into_values().collect(),
            b.tuple_sets.into_values().collect(),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    Ruleset {
        table: opts.table.clone(),
        addr_sets,
        tuple_sets,
        chains,
        ingress_map,
        egress_map,
        log_rate: opts.log_rate.max(1),
        nflog_group: opts.nflog_group,
        pod_cidrs: opts.pod_cidrs.clone(),
        known_local,
        pod_bridge: opts.pod_bridge.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::compile::{Decision, COMMENT_MAX, LOG_PREFIX_MAX};
    use crate::model::{
        ContainerPort, LabelSelector, Namespace, NetworkPolicy, Operator, Requirement, Rule,
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
    fn denied_packets_go_to_the_nflog_group_when_one_is_set() {
        let snap = world(30, vec![policy("deny", vec![], vec![])]);
        let opts = Options {
            pod_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            ..Options::default()
        };
        let kernel_log = compile(&snap, "n1", &opts).render();
        let nflog = compile(
            &snap,
            "n1",
            &Options {
                nflog_group: Some(100),
                ..opts
            },
        )
        .render();
        let logs = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| l.contains(" log prefix "))
                .map(|l| l.trim().to_string())
                .collect()
        };
        let (k, n) = (logs(&kernel_log), logs(&nflog));
        // Pod chains (both directions), unknown-pod chains, unaddressed, non-IP frames.
        assert!(k.len() >= 6, "{kernel_log}");
        assert_eq!(k.len(), n.len());
        for (k, n) in k.iter().zip(&n) {
            assert!(k.ends_with(" level info"), "{k}");
            assert!(n.ends_with(" group 100"), "{n}");
            // The same rate limit and prefix (naming the chain's pod and direction).
            assert_eq!(
                k.trim_end_matches(" level info"),
                n.trim_end_matches(" group 100")
            );
        }
        assert!(n
            .iter()
            .any(|l| l.contains("log prefix \"twill-policy drop ingress x/p0: \"")));
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
