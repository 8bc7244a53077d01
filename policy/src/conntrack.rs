//! Strict mode: tightening a policy also cuts the established flows it no longer allows.
//!
//! The table accepts `ct state established,related` before any policy, so a ruleset only
//! judges the first packet of a flow. After a sync that changed the ruleset, the enforcer
//! dumps the conntrack table (one ctnetlink dump over [`twill_nft::nfnl`]), asks the new
//! ruleset ([`Ruleset::decide_packet`]) what it would do with the first packet of every
//! flow of this node's pods, and sets [`CUT_MARK`] on the entries it would drop; the
//! table drops every packet of a marked entry, in both directions, before it accepts
//! established traffic. Entries marked earlier that the new ruleset allows again are
//! unmarked (a policy opened again restores the flow).
//!
//! Why not delete the entries: the next packet of a deleted TCP flow makes conntrack pick
//! the flow up again (`nf_conntrack_tcp_loose`), in whichever direction that packet goes.
//! A server pushing data to a client whose connection was cut then opens a "new" flow
//! server -> client, which the policies may well allow, and the client's packets pass as
//! its replies: strict_lab saw such a flow survive the cut. A marked entry stays in
//! place, so there is nothing to pick up; it ends with the flow's conntrack timeout.
//!
//! Which packet the table judged: the forward and input hooks run after DNAT (kube-proxy,
//! prerouting at −100) and before SNAT (Flannel's masquerade, postrouting), so they saw
//! the original source and the DNAT target, which is the *reply* tuple's source, with the
//! reply tuple's source port as destination port. Without NAT that is the original
//! destination and port, so one rule covers both.
//!
//! [`flows_to_cut`] and [`plan`] are the pure decision (flows in, flows to mark out); [`cut_denied`]
//! is the effector.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use twill_nft::nfnl::{self, attrs, Msg, AF_INET, AF_INET6, AF_UNSPEC, NLA_F_NESTED};

use crate::compile::{Decision, Ruleset, CUT_MARK};
use crate::model::Protocol;

const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_MARK: u16 = 8;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_MARK_MASK: u16 = 21;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

const ENOENT: i32 = nix::libc::ENOENT;

/// One direction of a conntrack entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Ports (TCP, UDP, SCTP, ...), 0 when the protocol has none.
    pub sport: u16,
    pub dport: u16,
    /// ICMP/ICMPv6 type.
    pub icmp_type: Option<u8>,
}

/// One conntrack entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub orig: Tuple,
    pub reply: Tuple,
    /// The entry's id (CTA_ID).
    pub id: Option<u32>,
    /// The conntrack mark (CTA_MARK).
    pub mark: u32,
    /// CTA_ZONE, network order, as received.
    pub zone: Option<[u8; 2]>,
    /// The CTA_TUPLE_ORIG payload as the kernel sent it; sent back verbatim to name the
    /// entry in an update (every protocol's key attributes, ICMP id included, without
    /// parsing them all).
    pub raw_orig: Vec<u8>,
}

impl Flow {
    /// What the table judged on the flow's first packet: source, destination after DNAT,
    /// and the protocol with the destination port after DNAT (None for protocols
    /// without ports, which only port-less policy rules match).
    pub fn judged(&self) -> (IpAddr, IpAddr, Option<(Protocol, u16)>) {
        let l4 = match self.orig.proto {
            IPPROTO_TCP => Some((Protocol::Tcp, self.reply.sport)),
            IPPROTO_UDP => Some((Protocol::Udp, self.reply.sport)),
            IPPROTO_SCTP => Some((Protocol::Sctp, self.reply.sport)),
            _ => None,
        };
        (self.orig.src, self.reply.src, l4)
    }

    /// IPv6 neighbour discovery (ICMPv6 types 133-137), which the table accepts before any
    /// policy. (The kernel does not track it; this keeps the pass right if it ever does.)
    fn is_neighbour_discovery(&self) -> bool {
        self.orig.proto == IPPROTO_ICMPV6 && matches!(self.orig.icmp_type, Some(133..=137))
    }
}

/// What one pass changes: entries to mark as cut, marked entries to restore.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan<'a> {
    pub cut: Vec<&'a Flow>,
    pub restore: Vec<&'a Flow>,
}

/// [`flows_to_cut`] without the entries already marked, and the marked entries the
/// ruleset allows again.
pub fn plan<'a>(rs: &Ruleset, node_addrs: &HashSet<IpAddr>, flows: &'a [Flow]) -> Plan<'a> {
    let denied: HashSet<*const Flow> = flows_to_cut(rs, node_addrs, flows)
        .into_iter()
        .map(|f| f as *const Flow)
        .collect();
    let mut p = Plan::default();
    for f in flows {
        match (denied.contains(&(f as *const Flow)), f.mark & CUT_MARK != 0) {
            (true, false) => p.cut.push(f),
            (false, true) => p.restore.push(f),
            _ => {}
        }
    }
    p
}

/// The entries of `flows` that the ruleset `rs` would not let start now: for every flow
/// whose judged source or destination is one of this node's pods (an address of a local
/// pod, or in the node's pod subnets, where unknown addresses are isolated), the verdict
/// of the hook that judged its first packet. `node_addrs` are this node's own addresses:
/// a flow from one of them is node traffic (OUTPUT path, never policed: kubelet probes);
/// a flow to one of them met the input chain (the source's egress side only).
pub fn flows_to_cut<'a>(
    rs: &Ruleset,
    node_addrs: &HashSet<IpAddr>,
    flows: &'a [Flow],
) -> Vec<&'a Flow> {
    let local: HashSet<IpAddr> = rs
        .ingress_map
        .iter()
        .chain(&rs.egress_map)
        .map(|(ip, _)| *ip)
        .chain(rs.known_local.iter().copied())
        .collect();
    let is_local = |ip: &IpAddr| local.contains(ip) || rs.pod_cidrs.iter().any(|n| n.contains(ip));
    // Flows that differ only in the source port get the same verdict: a busy pair of pods
    // leaves thousands of entries (TIME_WAIT) that need one decision.
    let mut verdicts = HashMap::new();
    flows
        .iter()
        .filter(|f| {
            let (src, dst, l4) = f.judged();
            if node_addrs.contains(&src) || f.is_neighbour_discovery() {
                return false;
            }
            if !is_local(&src) && !is_local(&dst) {
                return false;
            }
            let to_node = node_addrs.contains(&dst);
            *verdicts
                .entry((src, dst, l4, to_node))
                .or_insert_with(|| rs.decide_packet(src, dst, l4, to_node) != Decision::Accept)
        })
        .collect()
}

fn ip_of(v: &[u8]) -> Option<IpAddr> {
    match v.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(v).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(v).ok()?))),
        _ => None,
    }
}

fn be16(v: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?))
}

/// A CTA_TUPLE_ORIG/REPLY payload.
pub fn parse_tuple(payload: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst, mut proto) = (None, None, None);
    let (mut sport, mut dport, mut icmp_type) = (0, 0, None);
    for (t, v) in attrs(payload) {
        match t {
            CTA_TUPLE_IP => {
                for (t, v) in attrs(v) {
                    match t {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = ip_of(v),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = ip_of(v),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (t, v) in attrs(v) {
                    match t {
                        CTA_PROTO_NUM => proto = v.first().copied(),
                        CTA_PROTO_SRC_PORT => sport = be16(v).unwrap_or(0),
                        CTA_PROTO_DST_PORT => dport = be16(v).unwrap_or(0),
                        CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => {
                            icmp_type = v.first().copied()
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Tuple {
        src: src?,
        dst: dst?,
        proto: proto?,
        sport,
        dport,
        icmp_type,
    })
}

/// One IPCTNL_MSG_CT_NEW message body (after nfgenmsg) of a dump.
pub fn parse_flow(body: &[u8]) -> Option<Flow> {
    let (mut orig, mut reply, mut raw_orig) = (None, None, None);
    let (mut id, mut zone, mut mark) = (None, None, None);
    for (t, v) in attrs(body) {
        match t {
            CTA_TUPLE_ORIG => {
                orig = parse_tuple(v);
                raw_orig = Some(v.to_vec());
            }
            CTA_TUPLE_REPLY => reply = parse_tuple(v),
            CTA_ID => {
                id = v
                    .get(..4)
                    .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
            }
            CTA_ZONE => zone = v.get(..2).map(|b| [b[0], b[1]]),
            CTA_MARK => {
                mark = v
                    .get(..4)
                    .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
            }
            _ => {}
        }
    }
    Some(Flow {
        orig: orig?,
        reply: reply?,
        id,
        mark: mark.unwrap_or(0),
        zone,
        raw_orig: raw_orig?,
    })
}

/// The dump request for every conntrack entry of both families.
pub fn dump_request() -> Msg {
    Msg::subsys(
        nfnl::NFNL_SUBSYS_CTNETLINK,
        IPCTNL_MSG_CT_GET,
        nfnl::NLM_F_REQUEST | nfnl::NLM_F_DUMP,
        AF_UNSPEC,
    )
}

/// The request that sets (`cut`) or clears [`CUT_MARK`] in `flow`'s entry (named by its
/// original tuple and zone), leaving the other mark bits alone: an update of an existing
/// entry (IPCTNL_MSG_CT_NEW without NLM_F_CREATE; "no such entry" if it is gone).
pub fn mark_request(flow: &Flow, cut: bool) -> Msg {
    let family = if flow.orig.src.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    };
    let mut m = Msg::subsys(
        nfnl::NFNL_SUBSYS_CTNETLINK,
        IPCTNL_MSG_CT_NEW,
        nfnl::NLM_F_REQUEST,
        family,
    );
    m.attr(CTA_TUPLE_ORIG | NLA_F_NESTED, &flow.raw_orig);
    if let Some(zone) = flow.zone {
        m.attr(CTA_ZONE, &zone);
    }
    // new mark = (old & !mask) ^ mark
    let mark = if cut { CUT_MARK } else { 0 };
    m.attr(CTA_MARK, &mark.to_be_bytes())
        .attr(CTA_MARK_MASK, &CUT_MARK.to_be_bytes());
    m
}

/// Every conntrack entry of this thread's network namespace.
pub fn dump() -> io::Result<Vec<Flow>> {
    let mut conn = nfnl::Conn::open().map_err(io::Error::other)?;
    let mut out = Vec::new();
    let new = (nfnl::NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW;
    conn.dump(&dump_request(), |kind, body| {
        if kind == new {
            if let Some(f) = parse_flow(body) {
                out.push(f);
            }
        }
    })
    .map_err(io::Error::other)?;
    Ok(out)
}

/// This network namespace's own addresses (every interface).
pub fn node_addrs() -> io::Result<HashSet<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addrs
        .filter_map(|a| {
            let a = a.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

/// What one conntrack pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    /// Entries in the conntrack table.
    pub flows: usize,
    /// Entries marked as cut (denied by the new ruleset).
    pub cut: usize,
    /// Marked entries the new ruleset allows again, unmarked.
    pub restored: usize,
    /// Updates the kernel refused (other than "no such entry": the flow ended on its
    /// own), with the first error.
    pub failed: usize,
    pub first_error: Option<String>,
    /// Dump, decision and updates.
    pub duration: Duration,
}

/// Marks the conntrack entries of this namespace that `rs` would not allow as new
/// connections, and unmarks the marked ones it allows.
pub fn cut_denied(rs: &Ruleset) -> io::Result<Pass> {
    let start = Instant::now();
    let node = node_addrs()?;
    let flows = dump()?;
    let p = plan(rs, &node, &flows);
    let msgs: Vec<Msg> = p
        .cut
        .iter()
        .map(|f| mark_request(f, true))
        .chain(p.restore.iter().map(|f| mark_request(f, false)))
        .collect();
    let errnos = nfnl::Conn::open()
        .and_then(|mut c| c.requests(&msgs))
        .map_err(io::Error::other)?;
    let (cut, restored) = errnos.split_at(p.cut.len());
    let failed: Vec<i32> = errnos
        .iter()
        .copied()
        .filter(|e| *e != 0 && *e != ENOENT)
        .collect();
    Ok(Pass {
        flows: flows.len(),
        cut: cut.iter().filter(|e| **e == 0).count(),
        restored: restored.iter().filter(|e| **e == 0).count(),
        failed: failed.len(),
        first_error: failed
            .first()
            .map(|e| io::Error::from_raw_os_error(*e).to_string()),
        duration: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{compile, Options};
    use crate::source::manifests::parse_str;

    /// Pods x/a (10.244.1.2, port http 80) and x/b (10.244.1.3) on n1, y/c (10.244.2.2)
    /// on n2; x/a admits TCP 81 from x/b and ICMP (no ports) from y/c.
    const WORLD: &str = r#"
kind: List
items:
- kind: Namespace
  metadata: {name: x}
- kind: Namespace
  metadata: {name: y}
- kind: Pod
  metadata: {name: a, namespace: x, labels: {pod: a}}
  spec: {nodeName: n1, containers: [{name: s, ports: [{name: http, containerPort: 80}]}]}
  status: {podIPs: [{ip: 10.244.1.2}]}
- kind: Pod
  metadata: {name: b, namespace: x, labels: {pod: b}}
  spec: {nodeName: n1}
  status: {podIPs: [{ip: 10.244.1.3}]}
- kind: Pod
  metadata: {name: c, namespace: y, labels: {pod: c}}
  spec: {nodeName: n2}
  status: {podIPs: [{ip: 10.244.2.2}]}
- kind: NetworkPolicy
  apiVersion: networking.k8s.io/v1
  metadata: {name: a, namespace: x}
  spec:
    podSelector: {matchLabels: {pod: a}}
    ingress:
    - from: [{podSelector: {matchLabels: {pod: b}}}]
      ports: [{port: 81}]
    - from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: c}}}]
- kind: NetworkPolicy
  apiVersion: networking.k8s.io/v1
  metadata: {name: b-egress, namespace: x}
  spec:
    podSelector: {matchLabels: {pod: b}}
    policyTypes: [Egress]
    egress:
    - ports: [{port: 81}]
"#;

    fn ruleset(pod_cidrs: &[&str]) -> Ruleset {
        let snap = parse_str(WORLD, "world.yaml");
        let opts = Options {
            pod_cidrs: pod_cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            ..Options::default()
        };
        compile(&snap, "n1", &opts)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A flow `src:sport -> dst:dport`, answered by `backend:bport` (DNAT when it differs).
    fn flow(
        proto: u8,
        src: &str,
        sport: u16,
        dst: &str,
        dport: u16,
        backend: &str,
        bport: u16,
    ) -> Flow {
        Flow {
            orig: Tuple {
                src: ip(src),
                dst: ip(dst),
                proto,
                sport,
                dport,
                icmp_type: None,
            },
            reply: Tuple {
                src: ip(backend),
                dst: ip(src),
                proto,
                sport: bport,
                dport: sport,
                icmp_type: None,
            },
            id: Some(7),
            mark: 0,
            zone: None,
            raw_orig: Vec::new(),
        }
    }

    fn direct(proto: u8, src: &str, dst: &str, dport: u16) -> Flow {
        flow(proto, src, 40000, dst, dport, dst, dport)
    }

    fn cut(rs: &Ruleset, node: &[&str], flows: &[Flow]) -> Vec<Flow> {
        let node = node.iter().map(|s| ip(s)).collect();
        flows_to_cut(rs, &node, flows)
            .into_iter()
            .cloned()
            .collect()
    }

    #[test]
    fn denied_flows_of_local_pods_are_cut_and_allowed_ones_kept() {
        let rs = ruleset(&[]);
        let keep = [
            direct(IPPROTO_TCP, "10.244.1.3", "10.244.1.2", 81), // b -> a 81: allowed
            direct(IPPROTO_TCP, "10.244.2.2", "10.244.1.2", 80), // c -> a: any port
            direct(IPPROTO_ICMP, "10.244.2.2", "10.244.1.2", 0), // c -> a: ICMP too
            direct(IPPROTO_UDP, "10.244.2.2", "10.244.1.3", 53), // b admits anything
            direct(IPPROTO_TCP, "192.0.2.1", "192.0.2.2", 80),   // no local pod
        ];
        let deny = [
            direct(IPPROTO_TCP, "10.244.1.3", "10.244.1.2", 80), // b -> a 80: ingress of a
            direct(IPPROTO_UDP, "10.244.1.3", "10.244.1.2", 81), // UDP 81: not TCP
            direct(IPPROTO_ICMP, "10.244.1.3", "10.244.1.2", 0), // b's rule has ports
            direct(IPPROTO_TCP, "10.244.1.3", "192.0.2.9", 443), // b's egress: 81 only
            direct(IPPROTO_TCP, "192.0.2.9", "10.244.1.2", 81),  // a admits b and c only
        ];
        let flows: Vec<Flow> = keep.iter().chain(&deny).cloned().collect();
        assert_eq!(cut(&rs, &[], &flows), deny.to_vec());
    }

    #[test]
    fn nat_is_judged_after_dnat_and_before_snat() {
        let rs = ruleset(&[]);
        // b -> service 10.96.0.10:80, DNAT to a:81: the table saw a:81, allowed.
        let to_81 = flow(
            IPPROTO_TCP,
            "10.244.1.3",
            40000,
            "10.96.0.10",
            80,
            "10.244.1.2",
            81,
        );
        // The same service port DNATed to a:80: denied although the service port is 81.
        let mut to_80 = flow(
            IPPROTO_TCP,
            "10.244.1.3",
            40001,
            "10.96.0.10",
            81,
            "10.244.1.2",
            80,
        );
        // Masqueraded on the way out (reply goes to the node's address): still b's flow.
        to_80.reply.dst = ip("198.18.0.1");
        assert_eq!(cut(&rs, &[], &[to_81, to_80.clone()]), vec![to_80]);
    }

    #[test]
    fn node_traffic_is_never_cut_and_pod_to_node_meets_egress_only() {
        let rs = ruleset(&["10.244.1.0/24"]);
        let node = ["198.18.0.1", "10.244.1.1"];
        let keep = [
            // kubelet probe from the node (and from cni0's address) to isolated a.
            direct(IPPROTO_TCP, "198.18.0.1", "10.244.1.2", 80),
            direct(IPPROTO_TCP, "10.244.1.1", "10.244.1.2", 80),
            // a (no egress policy) -> the node: input chain, egress side only.
            direct(IPPROTO_TCP, "10.244.1.2", "10.244.1.1", 10250),
            // b -> the node on 81: b's egress allows it.
            direct(IPPROTO_TCP, "10.244.1.3", "198.18.0.1", 81),
        ];
        let deny = [
            direct(IPPROTO_TCP, "10.244.1.3", "198.18.0.1", 10250), // b's egress: 81 only
            direct(IPPROTO_TCP, "10.244.1.9", "10.244.2.2", 80),    // unknown local pod
            direct(IPPROTO_UDP, "10.244.2.2", "10.244.1.9", 53),    // to an unknown pod
            direct(IPPROTO_TCP, "10.244.1.9", "198.18.0.1", 22),    // unknown pod -> node
        ];
        let flows: Vec<Flow> = keep.iter().chain(&deny).cloned().collect();
        assert_eq!(cut(&rs, &node, &flows), deny.to_vec());
    }

    #[test]
    fn marked_entries_are_marked_once_and_restored_when_allowed_again() {
        let rs = ruleset(&[]);
        let mark = |mut f: Flow, m: u32| {
            f.mark = m;
            f
        };
        let denied = direct(IPPROTO_TCP, "10.244.1.3", "10.244.1.2", 80);
        let allowed = direct(IPPROTO_TCP, "10.244.1.3", "10.244.1.2", 81);
        let flows = [
            mark(denied.clone(), 0x5),            // to cut (other bits kept)
            mark(denied.clone(), CUT_MARK | 0x5), // already cut
            mark(allowed.clone(), CUT_MARK),      // allowed again: restore
            mark(allowed.clone(), 0x5),           // allowed, not marked
        ];
        let p = plan(&rs, &HashSet::new(), &flows);
        assert_eq!(p.cut, vec![&flows[0]]);
        assert_eq!(p.restore, vec![&flows[2]]);
    }

    #[test]
    fn neighbour_discovery_is_never_cut() {
        let rs = ruleset(&["fd00:1::/64"]);
        let mut nd = direct(IPPROTO_ICMPV6, "fd00:1::9", "fd00:1::1", 0);
        nd.orig.icmp_type = Some(135);
        let mut echo = nd.clone();
        echo.orig.icmp_type = Some(128);
        assert_eq!(cut(&rs, &[], &[nd, echo.clone()]), vec![echo]);
    }

    #[test]
    fn dumped_entries_parse_and_updates_send_the_tuple_back() {
        let tuple = |m: &mut Msg, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16| {
            m.nest(CTA_TUPLE_IP, |m| {
                m.attr(CTA_IP_V4_SRC, &src).attr(CTA_IP_V4_DST, &dst);
            })
            .nest(CTA_TUPLE_PROTO, |m| {
                m.attr(CTA_PROTO_NUM, &[IPPROTO_TCP])
                    .attr(CTA_PROTO_SRC_PORT, &sport.to_be_bytes())
                    .attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes());
            });
        };
        let mut m = Msg::subsys(nfnl::NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW, 0, AF_INET);
        m.nest(CTA_TUPLE_ORIG, |m| {
            tuple(m, [10, 244, 1, 3], [10, 96, 0, 10], 40000, 80)
        })
        .nest(CTA_TUPLE_REPLY, |m| {
            tuple(m, [10, 244, 1, 2], [10, 244, 1, 3], 81, 40000)
        })
        .attr(CTA_ID, &0x0102_0304u32.to_be_bytes())
        .attr(CTA_MARK, &0x0000_0011u32.to_be_bytes())
        .attr(CTA_ZONE, &[0, 5]);
        let bytes = m.bytes(1);
        let f = parse_flow(&bytes[20..]).unwrap();
        assert_eq!(f.orig.src, ip("10.244.1.3"));
        assert_eq!((f.orig.dst, f.orig.dport), (ip("10.96.0.10"), 80));
        assert_eq!(
            f.judged(),
            (
                ip("10.244.1.3"),
                ip("10.244.1.2"),
                Some((Protocol::Tcp, 81))
            )
        );
        assert_eq!(
            (f.id, f.zone, f.mark),
            (Some(0x0102_0304), Some([0, 5]), 0x11)
        );

        let d = mark_request(&f, true).bytes(2);
        assert_eq!(
            u16::from_ne_bytes([d[4], d[5]]),
            (1 << 8) | IPCTNL_MSG_CT_NEW
        );
        // An update: no NLM_F_CREATE, so a vanished entry is not created again.
        assert_eq!(u16::from_ne_bytes([d[6], d[7]]), nfnl::NLM_F_REQUEST);
        assert_eq!(d[16], AF_INET);
        let a: Vec<(u16, &[u8])> = attrs(&d[20..]).collect();
        assert_eq!(a[0], (CTA_TUPLE_ORIG, &f.raw_orig[..]));
        assert_eq!(a[1], (CTA_ZONE, &[0u8, 5][..]));
        assert_eq!(a[2], (CTA_MARK, &CUT_MARK.to_be_bytes()[..]));
        assert_eq!(a[3], (CTA_MARK_MASK, &CUT_MARK.to_be_bytes()[..]));
        let d = mark_request(&f, false).bytes(3);
        let a: Vec<(u16, &[u8])> = attrs(&d[20..]).collect();
        assert_eq!(a[2], (CTA_MARK, &[0u8; 4][..]));
        assert_eq!(a[3], (CTA_MARK_MASK, &CUT_MARK.to_be_bytes()[..]));
        assert!(parse_flow(&[0xff; 8]).is_none());
    }
}
