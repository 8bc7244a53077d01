//! The underlay guard: twill's own nftables table `inet twill-underlay`, next to Flannel's
//! (whose `ip flannel-ipv4` / `ip6 flannel-ipv6` layout stays exactly Flannel's).
//!
//! - **Encapsulated traffic only from peers.** UDP to the VXLAN port is accepted on input only
//!   from the public IPs of current peer leases (sets `peers4` / `peers6`). The kernel's VXLAN
//!   device accepts packets from any source, so without this anyone who can reach the node can
//!   inject frames with spoofed pod sources (flannel#961, wontfix upstream).
//! - **Routed pod traffic only from peers' subnets.** A packet that arrives on the external
//!   interface with a source inside the flannel Network (host-gw, VXLAN DirectRouting) must
//!   come from a subnet currently leased to a peer (sets `peer_subnets4` / `peer_subnets6`).
//!   There is no L2 check: host-gw needs a shared segment, on which an attacker can forge the
//!   peer router's MAC as easily as its IP, so a MAC binding would promise more than it gives.
//! - **Pods never reach a VXLAN port.** Forwarded UDP from the Network to the VXLAN port is
//!   dropped (it would be masqueraded to the node's own, allowed, address on the way out), and
//!   a pod's UDP to its own node's VXLAN port fails the peer check on input.
//! - **Pods send only from their node's subnet.** Packets entering from the pod bridge `cni0`
//!   with a source outside this node's subnet (IPv6: or link-local, or unspecified for DAD) are dropped in prerouting.
//!   Per-pod binding (a pod spoofing a neighbour on the same node) is not done here.
//!
//! **Why the VXLAN checks are on `input` and `forward`.** Those hooks come after every
//! destination translation. A Service can translate a packet to a node's VXLAN port (a
//! NodePort or ClusterIP whose hand-written endpoint is `<node IP>:8472`); in `prerouting` the
//! packet still shows the Service's address and port, so a check there would let a non-peer's
//! or a pod's datagram through to the VXLAN socket (`tests/security.rs` sends both through
//! such a translation). The source checks do not depend on the destination and stay in
//! `prerouting` at the raw priority, before conntrack. Each packet crosses two of the three
//! chains (prerouting, then input or forward); `bench/datapath --breakdown` measures each.
//!
//! The guard is updated in the same reconcile pass as the dataplane, before the FDB entries
//! and routes that let a peer's traffic in are programmed (twilld runs nft alongside the
//! deletions and neighbour entries), so a new peer is allowed before its FDB entry exists and
//! a departed one is refused from the same pass on. The first apply, a structural change (external interface,
//! Networks, own subnets, VXLAN port) and a repair after drift rebuild the whole table in one
//! transaction (`add`, `delete`, define); when only peers come and go, [`update`] emits one
//! transaction of element deltas against the last applied input instead (removals and
//! additions together), which costs nft far less than re-loading 2000 elements. A delta that
//! nft rejects (the sets were changed behind twill's back) is replaced by the whole table.
//!
//! The effectors ([`apply_update`], [`drifted`]) are async (nft runs on the blocking pool,
//! [`crate::nft::off_runtime`]) and take the runner, so unit tests drive them with a fake.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::IpAddr;

use ipnet::IpNet;
use twill_nft::listing::{Elem, Listing};

use crate::nft::{off_runtime, NftError, NftRunner, SharedNft};

pub const TABLE: &str = "twill-underlay";
/// The named counters of the guard's drop rules, one per rule (both families share it); the
/// names are the `rule` label of `twilld_underlay_guard_dropped_packets_total`.
pub const VXLAN_FROM_NON_PEER: &str = "vxlan_from_non_peer";
pub const NOT_LEASED: &str = "pod_source_not_leased";
pub const SPOOFING: &str = "pod_source_spoofing";
pub const POD_TO_VXLAN_PORT: &str = "pod_to_vxlan_port";
pub const DROP_COUNTERS: [&str; 4] = [VXLAN_FROM_NON_PEER, NOT_LEASED, SPOOFING, POD_TO_VXLAN_PORT];

/// The bridge Flannel's CNI config gives the bridge plugin.
pub const POD_BRIDGE: &str = "cni0";

/// What the guard is built from. Pure data, so the ruleset is golden-tested.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuardInput {
    /// The VXLAN UDP port (Backend.Port, 8472 when 0); `None` for host-gw.
    pub vxlan_port: Option<u16>,
    /// The external interface's name.
    pub external: String,
    /// The flannel Networks (one per family).
    pub networks: Vec<IpNet>,
    /// This node's subnets.
    pub own_subnets: Vec<IpNet>,
    /// Current peers' public IPs.
    pub peer_ips: BTreeSet<IpAddr>,
    /// Current peers' subnets.
    pub peer_subnets: BTreeSet<IpNet>,
}

/// The contents of the four peer sets exactly as nft is given them (subnets truncated to
/// their network address), so element deltas match what the last transaction put there.
#[derive(Debug, Default, PartialEq, Eq)]
struct Sets {
    peers4: BTreeSet<IpAddr>,
    peers6: BTreeSet<IpAddr>,
    peer_subnets4: BTreeSet<IpNet>,
    peer_subnets6: BTreeSet<IpNet>,
}

impl Sets {
    fn of(input: &GuardInput) -> Sets {
        let (peers4, peers6) = input.peer_ips.iter().partition(|ip| ip.is_ipv4());
        let (peer_subnets4, peer_subnets6) = input
            .peer_subnets
            .iter()
            .map(IpNet::trunc)
            .partition(|n| matches!(n, IpNet::V4(_)));
        Sets {
            peers4,
            peers6,
            peer_subnets4,
            peer_subnets6,
        }
    }
}

fn list<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

fn elements<T: std::fmt::Display>(items: &BTreeSet<T>) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!(" elements = {{ {} }} ;", list(items.iter()))
    }
}

/// Whether `a` and `b` give the same table apart from the peer sets' contents.
pub fn same_structure(a: &GuardInput, b: &GuardInput) -> bool {
    a.vxlan_port == b.vxlan_port
        && a.external == b.external
        && a.networks == b.networks
        && a.own_subnets == b.own_subnets
}

/// One nft transaction taking the guard from what was last applied to `next`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// Nothing to do.
    Unchanged,
    /// The whole table ([`ruleset`]): first apply, state unknown, or a structural change.
    Whole(String),
    /// Only element deletions and additions in the peer sets; if nft rejects it, the table no
    /// longer holds what was applied and the caller applies [`ruleset`] instead.
    Delta(String),
}

/// The transaction from `prev` (the input last applied successfully; `None` when unknown:
/// never applied, failed, or drifted) to `next`.
pub fn update(prev: Option<&GuardInput>, next: &GuardInput) -> Update {
    let Some(prev) = prev.filter(|p| same_structure(p, next)) else {
        return Update::Whole(ruleset(next));
    };
    let (old, new) = (Sets::of(prev), Sets::of(next));
    if old == new {
        return Update::Unchanged;
    }
    let mut deletes = String::new();
    let mut adds = String::new();
    fn delta<T: Ord + std::fmt::Display>(
        deletes: &mut String,
        adds: &mut String,
        set: &str,
        old: &BTreeSet<T>,
        new: &BTreeSet<T>,
    ) {
        let t = format!("inet {TABLE}");
        let gone: Vec<&T> = old.difference(new).collect();
        if !gone.is_empty() {
            let _ = writeln!(
                deletes,
                "delete element {t} {set} {{ {} }}",
                list(gone.iter())
            );
        }
        let came: Vec<&T> = new.difference(old).collect();
        if !came.is_empty() {
            let _ = writeln!(adds, "add element {t} {set} {{ {} }}", list(came.iter()));
        }
    }
    delta(&mut deletes, &mut adds, "peers4", &old.peers4, &new.peers4);
    delta(&mut deletes, &mut adds, "peers6", &old.peers6, &new.peers6);
    let (o4, n4) = (&old.peer_subnets4, &new.peer_subnets4);
    delta(&mut deletes, &mut adds, "peer_subnets4", o4, n4);
    let (o6, n6) = (&old.peer_subnets6, &new.peer_subnets6);
    delta(&mut deletes, &mut adds, "peer_subnets6", o6, n6);
    // Deletions first: an interval set refuses a new subnet overlapping one still in it.
    Update::Delta(deletes + &adds)
}

/// The transaction that makes `inet twill-underlay` hold exactly the guard for `input`.
pub fn ruleset(input: &GuardInput) -> String {
    let sets = Sets::of(input);
    let mut s = String::new();
    let t = format!("inet {TABLE}");
    // `add` + `delete` + define: the whole table is replaced atomically, whatever was there.
    let _ = writeln!(s, "add table {t}");
    let _ = writeln!(s, "delete table {t}");
    let _ = writeln!(
        s,
        "add table {t} {{ comment \"twill: underlay traffic only from current peers; pods neither reach the VXLAN port nor spoof\" ; }}"
    );
    let _ = writeln!(
        s,
        "add set {t} peers4 {{ type ipv4_addr ;{} }}",
        elements(&sets.peers4)
    );
    let _ = writeln!(
        s,
        "add set {t} peers6 {{ type ipv6_addr ;{} }}",
        elements(&sets.peers6)
    );
    let _ = writeln!(
        s,
        "add set {t} peer_subnets4 {{ type ipv4_addr ; flags interval ;{} }}",
        elements(&sets.peer_subnets4)
    );
    let _ = writeln!(
        s,
        "add set {t} peer_subnets6 {{ type ipv6_addr ; flags interval ;{} }}",
        elements(&sets.peer_subnets6)
    );
    // One named counter per drop rule (both families share it), so the drops are read at
    // scrape time with one netlink dump of the table's counter objects.
    for counter in DROP_COUNTERS {
        let _ = writeln!(s, "add counter {t} {counter}");
    }
    let _ = writeln!(
        s,
        "add chain {t} prerouting {{ type filter hook prerouting priority raw ; policy accept ; }}"
    );
    let _ = writeln!(
        s,
        "add chain {t} input {{ type filter hook input priority filter - 10 ; policy accept ; }}"
    );
    let _ = writeln!(
        s,
        "add chain {t} forward {{ type filter hook forward priority filter - 10 ; policy accept ; }}"
    );
    let ext = &input.external;
    for net in &input.networks {
        let (p, sfx) = match net {
            IpNet::V4(_) => ("ip", "4"),
            IpNet::V6(_) => ("ip6", "6"),
        };
        let net = net.trunc();
        // Pods: only their node's subnet (IPv6 also link-local, for neighbour discovery).
        let own: Vec<String> = input
            .own_subnets
            .iter()
            .filter(|o| o.addr().is_ipv4() == net.addr().is_ipv4())
            .map(|o| o.trunc().to_string())
            .chain((sfx == "6").then(|| "::, fe80::/10".to_string()))
            .collect();
        if !own.is_empty() {
            let _ = writeln!(
                s,
                "add rule {t} prerouting iifname \"{POD_BRIDGE}\" {p} saddr != {{ {} }} counter name \"{SPOOFING}\" drop comment \"pod source spoofing\"",
                own.join(", ")
            );
        }
        // Routed pod traffic on the underlay: only from peers' subnets.
        let _ = writeln!(
            s,
            "add rule {t} prerouting iifname \"{ext}\" {p} saddr {net} {p} saddr != @peer_subnets{sfx} counter name \"{NOT_LEASED}\" drop comment \"pod source not leased to a peer\""
        );
        if let Some(port) = input.vxlan_port {
            let _ = writeln!(
                s,
                "add rule {t} input udp dport {port} {p} saddr != @peers{sfx} counter name \"{VXLAN_FROM_NON_PEER}\" drop comment \"VXLAN from a non-peer (flannel#961)\""
            );
            let _ = writeln!(
                s,
                "add rule {t} forward {p} saddr {net} udp dport {port} counter name \"{POD_TO_VXLAN_PORT}\" drop comment \"pods never reach a VXLAN port\""
            );
        }
    }
    s
}

/// Applies the guard as one transaction.
fn apply(nft: &dyn NftRunner, input: &GuardInput) -> Result<(), NftError> {
    nft.apply(&ruleset(input))
}

/// Applies `update`, computed for `next`, and returns `next` (what the table now holds). A
/// delta nft rejects (the sets no longer hold what was applied: flushed or edited by hand) is
/// replaced by the whole table in the same call.
pub async fn apply_update(
    nft: &SharedNft,
    update: Update,
    next: GuardInput,
) -> Result<GuardInput, NftError> {
    off_runtime(nft, move |n| {
        apply_update_with(n, &update, &next).map(|()| next)
    })
    .await
}

fn apply_update_with(
    nft: &dyn NftRunner,
    update: &Update,
    next: &GuardInput,
) -> Result<(), NftError> {
    match update {
        Update::Unchanged => Ok(()),
        Update::Whole(script) => nft.apply(script),
        Update::Delta(script) => nft.apply(script).or_else(|e| {
            tracing::warn!(error = %e, "underlay guard delta rejected (sets changed outside twill?); replacing the whole table");
            apply(nft, next)
        }),
    }
}

/// The peer sets' elements and the number of rules in a listing of the table
/// (`nft -j list table inet twill-underlay`); `None` if an element is not of the sets' types.
fn listed(listing: &Listing) -> Option<(Sets, usize)> {
    let mut sets = Sets::default();
    // Plain addresses, or prefixes in the interval sets (where a single-address subnet is
    // listed as a plain address).
    let net = |e: &Elem| -> Option<IpNet> {
        match e {
            Elem::Str(a) => Some(IpNet::from(a.parse::<IpAddr>().ok()?)),
            Elem::Prefix { prefix } => IpNet::new(prefix.addr.parse().ok()?, prefix.len).ok(),
            _ => None,
        }
    };
    let addr = |e: &Elem| match e {
        Elem::Str(a) => a.parse::<IpAddr>().ok(),
        _ => None,
    };
    for set in listing.sets() {
        let elems = &set.elem;
        match set.name.as_str() {
            "peers4" => sets.peers4 = elems.iter().map(addr).collect::<Option<_>>()?,
            "peers6" => sets.peers6 = elems.iter().map(addr).collect::<Option<_>>()?,
            "peer_subnets4" => sets.peer_subnets4 = elems.iter().map(net).collect::<Option<_>>()?,
            "peer_subnets6" => sets.peer_subnets6 = elems.iter().map(net).collect::<Option<_>>()?,
            _ => {}
        }
    }
    Some((sets, listing.rules().count()))
}

/// Whether `listing` shows the table exactly as applying `applied` left it: the same peer set
/// elements and the same number of rules.
fn matches(listing: &Listing, applied: &GuardInput) -> bool {
    let rules = ruleset(applied)
        .lines()
        .filter(|l| l.starts_with("add rule "))
        .count();
    listed(listing) == Some((Sets::of(applied), rules))
}

/// Drift check: whether the table no longer holds what applying `applied` made it hold
/// (removed, a set's elements or the rules changed by hand, or it cannot be listed). Deltas
/// rely on the sets holding exactly what was applied, so a drifted table is replaced whole.
pub async fn drifted(nft: &SharedNft, applied: &GuardInput) -> bool {
    match off_runtime(nft, |n| n.list_table("inet", TABLE, true)).await {
        Ok(listing) => !matches(&listing, applied),
        Err(_) => true,
    }
}

/// The guard's peer sets as the kernel holds them now (public IPs of both families, subnets
/// of both families); `None` when the table cannot be listed (it is missing).
pub async fn kernel_sets(nft: &SharedNft) -> Option<(BTreeSet<IpAddr>, BTreeSet<IpNet>)> {
    let listing = off_runtime(nft, |n| n.list_table("inet", TABLE, true))
        .await
        .ok()?;
    let (sets, _) = listed(&listing)?;
    Some((
        sets.peers4.into_iter().chain(sets.peers6).collect(),
        sets.peer_subnets4
            .into_iter()
            .chain(sets.peer_subnets6)
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::recording;

    fn input() -> GuardInput {
        GuardInput {
            vxlan_port: Some(8472),
            external: "eth0".into(),
            networks: vec!["10.244.0.0/16".parse().unwrap()],
            own_subnets: vec!["10.244.1.0/24".parse().unwrap()],
            peer_ips: [
                "198.18.0.12".parse().unwrap(),
                "198.18.0.13".parse().unwrap(),
            ]
            .into_iter()
            .collect(),
            peer_subnets: [
                "10.244.2.0/24".parse().unwrap(),
                "10.244.3.0/24".parse().unwrap(),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn vxlan_guard_golden() {
        let golden = "\
add table inet twill-underlay
delete table inet twill-underlay
add table inet twill-underlay { comment \"twill: underlay traffic only from current peers; pods neither reach the VXLAN port nor spoof\" ; }
add set inet twill-underlay peers4 { type ipv4_addr ; elements = { 198.18.0.12, 198.18.0.13 } ; }
add set inet twill-underlay peers6 { type ipv6_addr ; }
add set inet twill-underlay peer_subnets4 { type ipv4_addr ; flags interval ; elements = { 10.244.2.0/24, 10.244.3.0/24 } ; }
add set inet twill-underlay peer_subnets6 { type ipv6_addr ; flags interval ; }
add counter inet twill-underlay vxlan_from_non_peer
add counter inet twill-underlay pod_source_not_leased
add counter inet twill-underlay pod_source_spoofing
add counter inet twill-underlay pod_to_vxlan_port
add chain inet twill-underlay prerouting { type filter hook prerouting priority raw ; policy accept ; }
add chain inet twill-underlay input { type filter hook input priority filter - 10 ; policy accept ; }
add chain inet twill-underlay forward { type filter hook forward priority filter - 10 ; policy accept ; }
add rule inet twill-underlay prerouting iifname \"cni0\" ip saddr != { 10.244.1.0/24 } counter name \"pod_source_spoofing\" drop comment \"pod source spoofing\"
add rule inet twill-underlay prerouting iifname \"eth0\" ip saddr 10.244.0.0/16 ip saddr != @peer_subnets4 counter name \"pod_source_not_leased\" drop comment \"pod source not leased to a peer\"
add rule inet twill-underlay input udp dport 8472 ip saddr != @peers4 counter name \"vxlan_from_non_peer\" drop comment \"VXLAN from a non-peer (flannel#961)\"
add rule inet twill-underlay forward ip saddr 10.244.0.0/16 udp dport 8472 counter name \"pod_to_vxlan_port\" drop comment \"pods never reach a VXLAN port\"
";
        assert_eq!(ruleset(&input()), golden);
    }

    #[test]
    fn host_gw_has_no_vxlan_rules_and_ipv6_allows_link_local() {
        let mut i = input();
        i.vxlan_port = None;
        i.networks.push("fd00:42::/56".parse().unwrap());
        i.own_subnets.push("fd00:42:0:1::/64".parse().unwrap());
        i.peer_ips.insert("2001:db8::12".parse().unwrap());
        let s = ruleset(&i);
        assert!(!s.contains("udp dport"));
        assert!(s.contains("peers6 { type ipv6_addr ; elements = { 2001:db8::12 } ; }"));
        assert!(s.contains(
            "iifname \"cni0\" ip6 saddr != { fd00:42:0:1::/64, ::, fe80::/10 } counter name \"pod_source_spoofing\" drop"
        ));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn first_apply_and_unknown_state_replace_the_whole_table() {
        assert_eq!(update(None, &input()), Update::Whole(ruleset(&input())));
        assert_eq!(update(Some(&input()), &input()), Update::Unchanged);
    }

    #[test]
    fn structural_changes_replace_the_whole_table() {
        let changes: [fn(&mut GuardInput); 5] = [
            |i| i.external = "eth1".into(),
            |i| i.vxlan_port = Some(4789),
            |i| i.vxlan_port = None,
            |i| i.networks.push(net("fd00:42::/56")),
            |i| i.own_subnets = vec![net("10.244.9.0/24")],
        ];
        for change in changes {
            let mut next = input();
            change(&mut next);
            next.peer_ips.insert(ip("198.18.0.14"));
            assert_eq!(update(Some(&input()), &next), Update::Whole(ruleset(&next)));
        }
    }

    #[test]
    fn peer_changes_are_one_transaction_of_deletions_then_additions() {
        let mut next = input();
        next.peer_ips.remove(&ip("198.18.0.12"));
        next.peer_subnets.remove(&net("10.244.2.0/24"));
        next.peer_ips.insert(ip("198.18.0.14"));
        next.peer_ips.insert(ip("198.18.0.15"));
        next.peer_subnets.insert(net("10.244.4.0/24"));
        next.peer_subnets.insert(net("10.244.5.0/24"));
        next.peer_ips.insert(ip("2001:db8::14"));
        next.peer_subnets.insert(net("fd00:42:0:4::/64"));
        let golden = "\
delete element inet twill-underlay peers4 { 198.18.0.12 }
delete element inet twill-underlay peer_subnets4 { 10.244.2.0/24 }
add element inet twill-underlay peers4 { 198.18.0.14, 198.18.0.15 }
add element inet twill-underlay peers6 { 2001:db8::14 }
add element inet twill-underlay peer_subnets4 { 10.244.4.0/24, 10.244.5.0/24 }
add element inet twill-underlay peer_subnets6 { fd00:42:0:4::/64 }
";
        assert_eq!(update(Some(&input()), &next), Update::Delta(golden.into()));
        // And back: exactly the reverse.
        let back = "\
delete element inet twill-underlay peers4 { 198.18.0.14, 198.18.0.15 }
delete element inet twill-underlay peers6 { 2001:db8::14 }
delete element inet twill-underlay peer_subnets4 { 10.244.4.0/24, 10.244.5.0/24 }
delete element inet twill-underlay peer_subnets6 { fd00:42:0:4::/64 }
add element inet twill-underlay peers4 { 198.18.0.12 }
add element inet twill-underlay peer_subnets4 { 10.244.2.0/24 }
";
        assert_eq!(update(Some(&next), &input()), Update::Delta(back.into()));
    }

    #[test]
    fn deltas_name_subnets_as_applied() {
        // A subnet written with host bits is applied truncated; the delta names it so, and a
        // spelling that truncates to what is there is no change at all.
        let mut prev = input();
        prev.peer_subnets.insert(net("10.244.7.9/24"));
        let mut same = input();
        same.peer_subnets.insert(net("10.244.7.0/24"));
        assert_eq!(update(Some(&prev), &same), Update::Unchanged);
        assert_eq!(
            update(Some(&prev), &input()),
            Update::Delta(
                "delete element inet twill-underlay peer_subnets4 { 10.244.7.0/24 }\n".into()
            )
        );
        assert!(
            ruleset(&prev).contains("elements = { 10.244.2.0/24, 10.244.3.0/24, 10.244.7.0/24 }")
        );
    }

    /// Replays a delta on the sets it was computed from: every deleted element must be there,
    /// every added one must not, and the result must be the target's sets.
    fn replay(mut sets: Sets, delta: &str) -> Sets {
        for line in delta.lines() {
            let (op, rest) = line.split_once(" element inet twill-underlay ").unwrap();
            let (set, body) = rest.split_once(' ').unwrap();
            let items = body
                .trim_start_matches("{ ")
                .trim_end_matches(" }")
                .split(", ");
            for item in items {
                let present = match set {
                    "peers4" | "peers6" => {
                        let s = if set == "peers4" {
                            &mut sets.peers4
                        } else {
                            &mut sets.peers6
                        };
                        if op == "delete" {
                            s.remove(&ip(item))
                        } else {
                            !s.insert(ip(item))
                        }
                    }
                    _ => {
                        let s = if set == "peer_subnets4" {
                            &mut sets.peer_subnets4
                        } else {
                            &mut sets.peer_subnets6
                        };
                        if op == "delete" {
                            s.remove(&net(item))
                        } else {
                            !s.insert(net(item))
                        }
                    }
                };
                assert!(
                    present == (op == "delete"),
                    "{op} of {item} in {set} is not exact"
                );
            }
        }
        sets
    }

    #[test]
    fn deltas_are_exact_over_random_peer_churn() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next_rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut prev = input();
        for _ in 0..200 {
            let mut next = prev.clone();
            for _ in 0..(next_rand() % 20) {
                let i = (next_rand() % 64) as u32;
                let (v4, v6, s4, s6) = (
                    IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + i)),
                    IpAddr::from(std::net::Ipv6Addr::from(0x2001_0db8u128 << 96 | i as u128)),
                    IpNet::new(std::net::Ipv4Addr::from(0x0af4_0000 + (i << 8)).into(), 24)
                        .unwrap(),
                    IpNet::new(
                        std::net::Ipv6Addr::from(0xfd00_0042u128 << 96 | (i as u128) << 64).into(),
                        64,
                    )
                    .unwrap(),
                );
                if next_rand() % 2 == 0 {
                    next.peer_ips.extend([v4, v6]);
                    next.peer_subnets.extend([s4, s6]);
                } else {
                    next.peer_ips.retain(|a| *a != v4 && *a != v6);
                    next.peer_subnets.retain(|n| *n != s4 && *n != s6);
                }
            }
            match update(Some(&prev), &next) {
                Update::Unchanged => assert_eq!(Sets::of(&prev), Sets::of(&next)),
                Update::Delta(d) => {
                    let lines: Vec<&str> = d.lines().collect();
                    let first_add = lines
                        .iter()
                        .position(|l| l.starts_with("add"))
                        .unwrap_or(lines.len());
                    assert!(
                        lines[first_add..]
                            .iter()
                            .all(|l| l.starts_with("add element")),
                        "{d}"
                    );
                    assert_eq!(replay(Sets::of(&prev), &d), Sets::of(&next), "{d}");
                }
                Update::Whole(_) => panic!("peer churn replaced the whole table"),
            }
            prev = next;
        }
    }

    /// A listing by nft 1.0.6 of the guard for [`listed_input`] (rule expressions elided).
    const LISTING: &str = r#"{"nftables": [
{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
{"table": {"family": "inet", "name": "twill-underlay", "handle": 2}},
{"set": {"family": "inet", "name": "peers4", "table": "twill-underlay", "type": "ipv4_addr", "handle": 1, "elem": ["198.18.0.12", "198.18.0.13"]}},
{"set": {"family": "inet", "name": "peers6", "table": "twill-underlay", "type": "ipv6_addr", "handle": 2, "elem": ["2001:db8::12"]}},
{"set": {"family": "inet", "name": "peer_subnets4", "table": "twill-underlay", "type": "ipv4_addr", "handle": 3, "flags": ["interval"], "elem": [{"prefix": {"addr": "10.244.2.0", "len": 24}}, {"prefix": {"addr": "10.244.3.0", "len": 24}}, "10.244.9.7"]}},
{"set": {"family": "inet", "name": "peer_subnets6", "table": "twill-underlay", "type": "ipv6_addr", "handle": 4, "flags": ["interval"]}},
{"chain": {"family": "inet", "table": "twill-underlay", "name": "prerouting", "handle": 5, "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"}},
{"rule": {"family": "inet", "table": "twill-underlay", "chain": "prerouting", "handle": 7, "comment": "pod source spoofing", "expr": []}},
{"rule": {"family": "inet", "table": "twill-underlay", "chain": "prerouting", "handle": 8, "comment": "pod source not leased to a peer", "expr": []}},
{"rule": {"family": "inet", "table": "twill-underlay", "chain": "input", "handle": 9, "comment": "VXLAN from a non-peer (flannel#961)", "expr": []}},
{"rule": {"family": "inet", "table": "twill-underlay", "chain": "forward", "handle": 10, "comment": "pods never reach a VXLAN port", "expr": []}}
]}"#;

    fn listed_input() -> GuardInput {
        let mut i = input();
        i.peer_ips.insert(ip("2001:db8::12"));
        i.peer_subnets.insert(net("10.244.9.7/32"));
        i
    }

    /// [`matches`] of a JSON listing; text that is no listing matches nothing.
    fn listing_matches(json: &str, applied: &GuardInput) -> bool {
        Listing::parse(json).is_ok_and(|l| matches(&l, applied))
    }

    #[test]
    fn a_listing_of_what_was_applied_is_no_drift() {
        assert!(listing_matches(LISTING, &listed_input()));
    }

    #[test]
    fn elements_or_rules_changed_by_hand_are_drift() {
        // The table holds fewer or more elements, or fewer rules, than were applied.
        let mut more = listed_input();
        more.peer_ips.insert(ip("198.18.0.14"));
        assert!(!listing_matches(LISTING, &more));
        let mut fewer = listed_input();
        fewer.peer_subnets.remove(&net("10.244.3.0/24"));
        assert!(!listing_matches(LISTING, &fewer));
        let flushed = LISTING.replace(r#""elem": ["198.18.0.12", "198.18.0.13"]"#, r#""x": 0"#);
        assert!(!listing_matches(&flushed, &listed_input()));
        let rule_gone = LISTING.replace(
            r#"{"rule": {"family": "inet", "table": "twill-underlay", "chain": "input", "handle": 9, "comment": "VXLAN from a non-peer (flannel#961)", "expr": []}},"#,
            "",
        );
        assert_ne!(rule_gone, LISTING);
        assert!(!listing_matches(&rule_gone, &listed_input()));
        assert!(!listing_matches("", &listed_input()));
        let range = LISTING.replace(
            r#""10.244.9.7""#,
            r#"{"range": ["10.244.9.7", "10.244.9.9"]}"#,
        );
        assert!(!listing_matches(&range, &listed_input()));
    }

    #[test]
    fn no_peers_means_every_vxlan_packet_is_refused() {
        let mut i = input();
        i.peer_ips.clear();
        i.peer_subnets.clear();
        let s = ruleset(&i);
        assert!(s.contains("add set inet twill-underlay peers4 { type ipv4_addr ; }\n"));
        assert!(s.contains(
            "udp dport 8472 ip saddr != @peers4 counter name \"vxlan_from_non_peer\" drop"
        ));
    }

    #[test]
    fn a_real_listing_of_the_guard_is_no_drift() {
        // nft 1.0.6's listing of ruleset(&listed_input()) (tests/data of the nft crate).
        let real = include_str!("../nft/tests/data/underlay.json");
        assert!(listing_matches(real, &listed_input()));
        let mut more = listed_input();
        more.peer_ips.insert(ip("198.18.0.14"));
        assert!(!listing_matches(real, &more));
    }

    #[tokio::test]
    async fn drift_is_judged_on_a_listing_of_the_table() {
        let (fake, nft) = recording();
        fake.reply(Ok(LISTING.into()));
        assert!(!drifted(&nft, &listed_input()).await);
        assert_eq!(
            fake.calls()[0].args,
            ["-j", "list", "table", "inet", "twill-underlay"].map(String::from)
        );
        // No table (nft fails) is drift.
        fake.fail("Error: No such file or directory");
        assert!(drifted(&nft, &listed_input()).await);
    }

    #[tokio::test]
    async fn a_rejected_delta_is_replaced_by_the_whole_table() {
        let (fake, nft) = recording();
        let mut next = input();
        next.peer_ips.insert(ip("198.18.0.14"));
        let Update::Delta(delta) = update(Some(&input()), &next) else {
            panic!("a peer change is a delta");
        };
        fake.fail("Error: Could not process rule: No such file or directory");
        let applied = apply_update(&nft, Update::Delta(delta.clone()), next.clone())
            .await
            .unwrap();
        assert_eq!(applied, next);
        assert_eq!(fake.scripts(), [delta, ruleset(&next)]);
        // Unchanged runs nothing; a failed whole table is the error.
        let (fake, nft) = recording();
        apply_update(&nft, Update::Unchanged, next.clone())
            .await
            .unwrap();
        assert!(fake.calls().is_empty());
        fake.reply(Err(NftError::Timeout {
            args: "-f -".into(),
            timeout: std::time::Duration::from_secs(30),
        }));
        let e = apply_update(&nft, Update::Whole(ruleset(&next)), next)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "nft -f - timed out after 30s");
    }
}
