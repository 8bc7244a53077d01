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
//! The table is rebuilt in one transaction (`add`, `delete`, define) in the same reconcile pass
//! as the dataplane, before the netlink operations, so a new peer is allowed before its FDB
//! entry exists and a departed one is refused from the same pass on.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::nft::{self, NftError};

pub const TABLE: &str = "twill-underlay";
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

fn elements<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    let v: Vec<String> = items.map(|i| i.to_string()).collect();
    if v.is_empty() {
        String::new()
    } else {
        format!(" elements = {{ {} }} ;", v.join(", "))
    }
}

/// The transaction that makes `inet twill-underlay` hold exactly the guard for `input`.
pub fn ruleset(input: &GuardInput) -> String {
    let v4 = |ip: &&IpAddr| ip.is_ipv4();
    let n4 = |n: &&IpNet| matches!(n, IpNet::V4(_));
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
        elements(input.peer_ips.iter().filter(v4))
    );
    let _ = writeln!(
        s,
        "add set {t} peers6 {{ type ipv6_addr ;{} }}",
        elements(input.peer_ips.iter().filter(|i| !v4(i)))
    );
    let _ = writeln!(
        s,
        "add set {t} peer_subnets4 {{ type ipv4_addr ; flags interval ;{} }}",
        elements(input.peer_subnets.iter().filter(n4).map(|n| n.trunc()))
    );
    let _ = writeln!(
        s,
        "add set {t} peer_subnets6 {{ type ipv6_addr ; flags interval ;{} }}",
        elements(
            input
                .peer_subnets
                .iter()
                .filter(|n| !n4(n))
                .map(|n| n.trunc())
        )
    );
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
                "add rule {t} prerouting iifname \"{POD_BRIDGE}\" {p} saddr != {{ {} }} counter drop comment \"pod source spoofing\"",
                own.join(", ")
            );
        }
        // Routed pod traffic on the underlay: only from peers' subnets.
        let _ = writeln!(
            s,
            "add rule {t} prerouting iifname \"{ext}\" {p} saddr {net} {p} saddr != @peer_subnets{sfx} counter drop comment \"pod source not leased to a peer\""
        );
        if let Some(port) = input.vxlan_port {
            let _ = writeln!(
                s,
                "add rule {t} input udp dport {port} {p} saddr != @peers{sfx} counter drop comment \"VXLAN from a non-peer (flannel#961)\""
            );
            let _ = writeln!(
                s,
                "add rule {t} forward {p} saddr {net} udp dport {port} counter drop comment \"pods never reach a VXLAN port\""
            );
        }
    }
    s
}

/// Applies the guard as one transaction.
pub fn apply(input: &GuardInput) -> Result<(), NftError> {
    nft::apply(&ruleset(input))
}

/// Whether the table exists (drift check).
pub fn installed() -> bool {
    nft::run(&["list", "table", "inet", TABLE], None).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

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
add chain inet twill-underlay prerouting { type filter hook prerouting priority raw ; policy accept ; }
add chain inet twill-underlay input { type filter hook input priority filter - 10 ; policy accept ; }
add chain inet twill-underlay forward { type filter hook forward priority filter - 10 ; policy accept ; }
add rule inet twill-underlay prerouting iifname \"cni0\" ip saddr != { 10.244.1.0/24 } counter drop comment \"pod source spoofing\"
add rule inet twill-underlay prerouting iifname \"eth0\" ip saddr 10.244.0.0/16 ip saddr != @peer_subnets4 counter drop comment \"pod source not leased to a peer\"
add rule inet twill-underlay input udp dport 8472 ip saddr != @peers4 counter drop comment \"VXLAN from a non-peer (flannel#961)\"
add rule inet twill-underlay forward ip saddr 10.244.0.0/16 udp dport 8472 counter drop comment \"pods never reach a VXLAN port\"
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
            "iifname \"cni0\" ip6 saddr != { fd00:42:0:1::/64, ::, fe80::/10 } counter drop"
        ));
    }

    #[test]
    fn no_peers_means_every_vxlan_packet_is_refused() {
        let mut i = input();
        i.peer_ips.clear();
        i.peer_subnets.clear();
        let s = ruleset(&i);
        assert!(s.contains("add set inet twill-underlay peers4 { type ipv4_addr ; }\n"));
        assert!(s.contains("udp dport 8472 ip saddr != @peers4 counter drop"));
    }
}
