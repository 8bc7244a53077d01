//! The nft table IR: the table as named sets, maps and chains with their rule lines,
//! rendered as one replacing script or diffed into an incremental transaction.

use std::fmt::Write as _;

use super::names::{quoted, COMMENT_MAX, LOG_PREFIX_MAX};
use super::ranges::{Family, FAMILIES};
use super::{ChainEnd, ChainKind, RuleVerdict, Ruleset, CUT_MARK};
use crate::model::PolicyType;

impl Ruleset {
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
            let mut rules = Vec::with_capacity(c.rules.len() + c.end_lines());
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
                match &r.verdict {
                    RuleVerdict::Return => line.push_str("return"),
                    RuleVerdict::Goto(target) => {
                        let _ = write!(line, "goto {target}");
                    }
                }
                let _ = write!(line, " comment {}", quoted(&r.comment, COMMENT_MAX));
                rules.push(line);
            }
            match &c.end {
                ChainEnd::Drop => {
                    // Deny chains log with their own prefix, so that `drops` can tell a
                    // cluster policy's Deny from a NetworkPolicy's isolation.
                    let what = match c.kind {
                        ChainKind::Deny(tier) => format!("deny {tier}"),
                        ChainKind::Pod | ChainKind::AfterAdmin => "drop".to_string(),
                    };
                    let prefix = quoted(
                        &format!("twill-policy {what} {} {}: ", c.dir, c.pod),
                        LOG_PREFIX_MAX,
                    );
                    rules.push(format!(
                        "limit rate {}/second burst {} packets log prefix {prefix} {}",
                        self.log_rate,
                        self.log_rate * 2,
                        self.log_target()
                    ));
                    // A named counter (the pod chain's): it survives the chain being
                    // flushed and refilled, so drop totals need no listing before each
                    // update.
                    rules.push(format!("counter name {:?} drop", c.counter));
                }
                ChainEnd::Goto(target) => rules.push(format!("goto {target}")),
                ChainEnd::Return => {}
            }
            let comment = match c.kind {
                ChainKind::Pod => format!("{} of pod {}", c.dir, c.pod),
                ChainKind::Deny(tier) => format!("{} of pod {}: {tier} tier Deny", c.dir, c.pod),
                ChainKind::AfterAdmin => format!(
                    "{} of pod {} after the Admin tier: NetworkPolicy, Baseline tier",
                    c.dir, c.pod
                ),
            };
            chains.push(ChainDef {
                name: c.name.clone(),
                comment,
                counter: c.kind == ChainKind::Pod,
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
                    "\t\tlimit rate {}/second burst {} packets log prefix \"twill-policy drop {dir} unknown pod: \" {}",
                    self.log_rate,
                    self.log_rate * 2,
                    self.log_target()
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
            "\t\tlimit rate {}/second burst {} packets log prefix \"twill-policy drop unaddressed: \" {}",
            self.log_rate,
            self.log_rate * 2,
            self.log_target()
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
            "\t\tlimit rate {}/second burst {} packets log prefix \"twill-policy drop non-IP frame: \" {}",
            self.log_rate,
            self.log_rate * 2,
            self.log_target()
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
    /// Whether the chain owns a named counter of its name (pod chains; the deny and
    /// after-Admin chains count with their pod chain's).
    pub counter: bool,
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
            if c.counter {
                writeln!(w, "\tcounter {} {{\n\t}}", c.name)?;
            }
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
    /// overlaps), new chains (empty, so that every `goto` target exists before a rule names
    /// it), flush and refill of changed chains and fill of new ones (their rules may name
    /// new sets and are all in place before any map element jumps to them), map elements
    /// (deletions, then additions), then dead chains (all flushed, then all deleted: a dead
    /// pod chain may `goto` a dead deny chain; nothing jumps to them any more) with the
    /// counters of the pod chains among them, and last dead sets (no rule names them any
    /// more).
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
                    if c.counter {
                        let _ = writeln!(out, "add counter inet {t} {}", c.name);
                    }
                    let _ = writeln!(
                        out,
                        "add chain inet {t} {} {{ comment {}; }}",
                        c.name,
                        quoted(&c.comment, COMMENT_MAX)
                    );
                    fill.push(c);
                }
                Some(o) if o.comment != c.comment || o.counter != c.counter => return None,
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
        // Dead chains, then dead sets. A dead pod chain may `goto` a dead deny or
        // after-Admin chain: every dead chain is flushed before any is deleted.
        let new_chains: HashSet<&str> = self.chains.iter().map(|c| c.name.as_str()).collect();
        let dead: Vec<&ChainDef> = old
            .chains
            .iter()
            .filter(|c| !new_chains.contains(c.name.as_str()))
            .collect();
        for c in &dead {
            let _ = writeln!(out, "flush chain inet {t} {}", c.name);
            st.chains.push(c.name.clone());
        }
        for c in &dead {
            let _ = writeln!(out, "delete chain inet {t} {}", c.name);
            if c.counter {
                let _ = writeln!(out, "delete counter inet {t} {}", c.name);
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
