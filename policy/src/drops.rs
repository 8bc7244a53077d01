//! `twill-policy drops`: who was denied, by what. Each packet a pod chain denied and sent to
//! the NFLOG group (`run --nflog-group N`) is described with the pods on both sides (from the
//! running daemon's `/endpoints`), the protocol and port, the direction, the pod whose policy
//! isolated it (named by the log prefix, `twill-policy drop <direction> <pod>: `) and the
//! policies that select that pod in that direction; or, for a packet a cluster policy's
//! Deny dropped (`twill-policy deny <Admin|Baseline> <direction> <pod>: `), the pod and the
//! cluster policies of that tier that select it.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use twill_nft::nflog::{parse_ip, LoggedPacket, Transport};

use crate::model::Tier;
use crate::status::Endpoints;

/// The group Calico and kube-router log to, `drops`' default.
pub const DEFAULT_GROUP: u16 = 100;

/// Prefix of every log statement twill-policy writes but the deny chains'.
const PREFIX: &str = "twill-policy drop ";
/// Prefix of the deny chains' log statements (a cluster policy's Deny).
const DENY_PREFIX: &str = "twill-policy deny ";

/// What a log prefix says about the packet: which chain denied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denier {
    /// The pod chain of `pod` ("namespace/name") in `direction` (ingress, egress).
    Pod { direction: String, pod: String },
    /// A Deny rule of a cluster policy of `tier` that selects `pod`, in `direction`.
    ClusterDeny {
        tier: Tier,
        direction: String,
        pod: String,
    },
    /// A local address no pod is known for yet (fail closed), in `direction`.
    UnknownPod { direction: String },
    /// Traffic from the pod bridge with no pod address (link-local, group).
    Unaddressed,
    /// A frame from a pod port that is neither ARP, IPv4 nor IPv6.
    NonIp,
}

/// Reads a twill-policy log prefix; None for any other (another program's rule in the group).
pub fn denier(prefix: &str) -> Option<Denier> {
    if let Some(rest) = prefix.strip_prefix(DENY_PREFIX) {
        let rest = rest.trim_end();
        let rest = rest.strip_suffix(':').unwrap_or(rest);
        let mut words = rest.splitn(3, ' ');
        let tier = match words.next()? {
            "Admin" => Tier::Admin,
            "Baseline" => Tier::Baseline,
            _ => return None,
        };
        let direction = words.next()?;
        if direction != "ingress" && direction != "egress" {
            return None;
        }
        return Some(Denier::ClusterDeny {
            tier,
            direction: direction.to_string(),
            pod: words.next()?.to_string(),
        });
    }
    let rest = prefix.strip_prefix(PREFIX)?.trim_end();
    let rest = rest.strip_suffix(':').unwrap_or(rest);
    match rest {
        "unaddressed" => return Some(Denier::Unaddressed),
        "non-IP frame" => return Some(Denier::NonIp),
        _ => {}
    }
    let (direction, who) = rest.split_once(' ')?;
    if direction != "ingress" && direction != "egress" {
        return None;
    }
    if who == "unknown pod" {
        return Some(Denier::UnknownPod {
            direction: direction.to_string(),
        });
    }
    Some(Denier::Pod {
        direction: direction.to_string(),
        pod: who.to_string(),
    })
}

/// One denied packet, described.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeniedPacket {
    /// ingress or egress (of the isolated pod); `any` for unaddressed and non-IP traffic.
    pub direction: String,
    /// The pod whose chain denied it ("namespace/name"); None for an address no pod is
    /// known for, and for unaddressed and non-IP traffic.
    pub isolated_pod: Option<String>,
    /// The policies that select the isolated pod in that direction ("namespace/name"); for
    /// a cluster policy's Deny, the cluster policies of its tier that select the pod
    /// (`cnp/name`).
    pub policies: Vec<String>,
    /// For a cluster policy's Deny: its tier (`Admin`, `Baseline`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// What denied it, in words (the log prefix without its decoration).
    pub rule: String,
    pub src: Option<IpAddr>,
    /// The pod that has the source address, if the daemon knows one.
    pub src_pod: Option<String>,
    pub src_port: Option<u16>,
    pub dst: Option<IpAddr>,
    pub dst_pod: Option<String>,
    pub dst_port: Option<u16>,
    /// TCP, UDP, SCTP, ICMP, ICMPv6, or the protocol number; None when the packet is not IP.
    pub protocol: Option<String>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    pub in_interface: Option<u32>,
    pub out_interface: Option<u32>,
    /// Why the packet's headers could not be read, if they could not.
    pub unreadable: Option<String>,
}

/// Describes `pkt` with the pods and policies of `endpoints`; None when its prefix is not
/// twill-policy's.
pub fn describe(pkt: &LoggedPacket, endpoints: &Endpoints) -> Option<DeniedPacket> {
    let denier = denier(&pkt.prefix)?;
    let by_ip = endpoints.by_ip();
    let pod_of = |ip: IpAddr| by_ip.get(&ip).map(|p| p.pod.clone());
    let (direction, isolated_pod, rule) = match &denier {
        Denier::Pod { direction, pod } => (
            direction.clone(),
            Some(pod.clone()),
            format!("{direction} of pod {pod}"),
        ),
        Denier::ClusterDeny {
            tier,
            direction,
            pod,
        } => (
            direction.clone(),
            Some(pod.clone()),
            format!("{direction} of pod {pod}: a Deny rule of the {tier} tier"),
        ),
        Denier::UnknownPod { direction } => (
            direction.clone(),
            None,
            format!("{direction} of a local pod address not known yet (fail closed)"),
        ),
        Denier::Unaddressed => (
            "any".to_string(),
            None,
            "from a pod, with no pod address a policy could judge".to_string(),
        ),
        Denier::NonIp => (
            "any".to_string(),
            None,
            "a frame from a pod port that is neither ARP, IPv4 nor IPv6".to_string(),
        ),
    };
    let tier = match &denier {
        Denier::ClusterDeny { tier, .. } => Some(*tier),
        _ => None,
    };
    let policies = match (
        &isolated_pod,
        endpoints.pod(isolated_pod.as_deref().unwrap_or("")),
        tier,
    ) {
        (Some(_), Some(p), Some(tier)) => p.cluster_policies(tier).to_vec(),
        (Some(_), Some(p), None) if direction == "ingress" => p.ingress_policies.clone(),
        (Some(_), Some(p), None) => p.egress_policies.clone(),
        _ => Vec::new(),
    };
    let mut d = DeniedPacket {
        direction,
        isolated_pod,
        policies,
        tier: tier.map(|t| t.to_string()),
        rule,
        src: None,
        src_pod: None,
        src_port: None,
        dst: None,
        dst_pod: None,
        dst_port: None,
        protocol: None,
        icmp_type: None,
        icmp_code: None,
        in_interface: pkt.physindev.or(pkt.indev),
        out_interface: pkt.physoutdev.or(pkt.outdev),
        unreadable: None,
    };
    if denier == Denier::NonIp {
        return Some(d);
    }
    match parse_ip(&pkt.payload) {
        Ok(ip) => {
            d.src = Some(ip.src);
            d.dst = Some(ip.dst);
            d.src_pod = pod_of(ip.src);
            d.dst_pod = pod_of(ip.dst);
            d.src_port = ip.sport();
            let (protocol, port, icmp) = match ip.transport {
                Transport::Tcp { dport, .. } => ("TCP".to_string(), Some(dport), None),
                Transport::Udp { dport, .. } => ("UDP".to_string(), Some(dport), None),
                Transport::Sctp { dport, .. } => ("SCTP".to_string(), Some(dport), None),
                Transport::Icmp { kind, code } => ("ICMP".to_string(), None, Some((kind, code))),
                Transport::Icmpv6 { kind, code } => {
                    ("ICMPv6".to_string(), None, Some((kind, code)))
                }
                Transport::Fragment(p) | Transport::Other(p) => (p.to_string(), None, None),
            };
            d.protocol = Some(protocol);
            d.dst_port = port;
            d.icmp_type = icmp.map(|i| i.0);
            d.icmp_code = icmp.map(|i| i.1);
        }
        Err(e) => d.unreadable = Some(e.to_string()),
    }
    Some(d)
}

/// `pod (address:port)`, or the address alone when no pod has it.
fn side(ip: Option<IpAddr>, pod: &Option<String>, port: Option<u16>) -> String {
    let addr = match (ip, port) {
        (Some(IpAddr::V6(a)), Some(p)) => format!("[{a}]:{p}"),
        (Some(a), Some(p)) => format!("{a}:{p}"),
        (Some(a), None) => a.to_string(),
        (None, _) => "?".to_string(),
    };
    match pod {
        Some(pod) => format!("{pod} ({addr})"),
        None => addr,
    }
}

impl DeniedPacket {
    /// One line: `DENIED ingress TCP/80 x/a (10.244.1.2:40000) -> x/b (10.244.1.3:80):
    /// x/b isolated by x/deny-all`.
    pub fn text(&self) -> String {
        let what = match (&self.protocol, self.dst_port, self.icmp_type) {
            (Some(p), Some(port), _) => format!("{p}/{port}"),
            (Some(p), None, Some(t)) => {
                format!("{p} type {t} code {}", self.icmp_code.unwrap_or(0))
            }
            (Some(p), None, None) if p.parse::<u8>().is_ok() => format!("protocol {p}"),
            (Some(p), None, None) => p.clone(),
            (None, _, _) => "non-IP".to_string(),
        };
        let by = match (&self.isolated_pod, self.policies.as_slice()) {
            (Some(pod), pols) if self.tier.is_some() => format!(
                "{pod} {} denied by the {} tier{}",
                self.direction,
                self.tier.as_deref().unwrap_or_default(),
                if pols.is_empty() {
                    " (no cluster policy selects it now)".to_string()
                } else {
                    format!(" ({})", pols.join(", "))
                }
            ),
            (Some(pod), []) => format!(
                "{pod} isolated for {} (no policy selects it now)",
                self.direction
            ),
            (Some(pod), pols) => format!(
                "{pod} isolated for {} by {}",
                self.direction,
                pols.join(", ")
            ),
            (None, _) => self.rule.clone(),
        };
        let mut line = format!(
            "DENIED {} {what} {} -> {}: {by}",
            self.direction,
            side(self.src, &self.src_pod, self.src_port),
            side(self.dst, &self.dst_pod, self.dst_port),
        );
        if let Some(why) = &self.unreadable {
            line.push_str(&format!(" (headers unreadable: {why})"));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::EndpointPod;

    fn endpoints() -> Endpoints {
        let pod = |key: &str, ip: &str, local: bool, ing: &[&str], eg: &[&str]| EndpointPod {
            pod: key.into(),
            node: Some(if local { "n1" } else { "n2" }.into()),
            ips: vec![ip.parse().unwrap()],
            local,
            ingress_policies: ing.iter().map(|s| s.to_string()).collect(),
            egress_policies: eg.iter().map(|s| s.to_string()).collect(),
            admin_policies: if local {
                vec!["anp/db".into(), "cnp/tenants".into()]
            } else {
                vec![]
            },
            baseline_policies: vec![],
        };
        Endpoints {
            node: "n1".into(),
            pods: vec![
                pod("x/a", "10.244.1.2", true, &[], &["x/no-egress"]),
                pod("x/b", "10.244.1.3", true, &["x/deny-all", "x/web"], &[]),
                pod("y/c", "fd00::3", false, &[], &[]),
            ],
        }
    }

    fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        p
    }

    fn logged(prefix: &str, payload: Vec<u8>) -> LoggedPacket {
        LoggedPacket {
            prefix: prefix.into(),
            hw_protocol: Some(0x0800),
            indev: Some(3),
            outdev: Some(3),
            physindev: Some(5),
            physoutdev: Some(6),
            payload,
        }
    }

    #[test]
    fn prefixes_name_the_chain_that_denied() {
        assert_eq!(
            denier("twill-policy drop ingress x/b: "),
            Some(Denier::Pod {
                direction: "ingress".into(),
                pod: "x/b".into()
            })
        );
        assert_eq!(
            denier("twill-policy drop egress unknown pod: "),
            Some(Denier::UnknownPod {
                direction: "egress".into()
            })
        );
        assert_eq!(
            denier("twill-policy drop unaddressed: "),
            Some(Denier::Unaddressed)
        );
        assert_eq!(
            denier("twill-policy drop non-IP frame: "),
            Some(Denier::NonIp)
        );
        assert_eq!(
            denier("twill-policy deny Baseline egress x/b: "),
            Some(Denier::ClusterDeny {
                tier: Tier::Baseline,
                direction: "egress".into(),
                pod: "x/b".into()
            })
        );
        assert_eq!(denier("twill-policy deny Middle egress x/b: "), None);
        assert_eq!(denier("twill-policy deny Admin sideways x/b: "), None);
        assert_eq!(denier("twill-policy deny Admin ingress"), None);
        assert_eq!(denier("calico-drop: "), None);
        assert_eq!(denier("twill-policy drop sideways x/b: "), None);
        assert_eq!(denier("twill-policy drop "), None);
    }

    #[test]
    fn a_denied_connection_names_both_pods_and_the_isolating_policies() {
        let d = describe(
            &logged(
                "twill-policy drop ingress x/b: ",
                tcp([10, 244, 1, 2], [10, 244, 1, 3], 40000, 80),
            ),
            &endpoints(),
        )
        .unwrap();
        assert_eq!(d.src_pod.as_deref(), Some("x/a"));
        assert_eq!(d.dst_pod.as_deref(), Some("x/b"));
        assert_eq!(d.policies, vec!["x/deny-all", "x/web"]);
        assert_eq!((d.in_interface, d.out_interface), (Some(5), Some(6)));
        assert_eq!(
            d.text(),
            "DENIED ingress TCP/80 x/a (10.244.1.2:40000) -> x/b (10.244.1.3:80): x/b isolated for ingress by x/deny-all, x/web"
        );
        // JSON round trip.
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<DeniedPacket>(&json).unwrap(), d);
    }

    #[test]
    fn a_cluster_deny_names_the_pod_and_the_cluster_policies_of_its_tier() {
        let d = describe(
            &logged(
                "twill-policy deny Admin ingress x/b: ",
                tcp([10, 244, 1, 2], [10, 244, 1, 3], 40000, 80),
            ),
            &endpoints(),
        )
        .unwrap();
        assert_eq!(d.isolated_pod.as_deref(), Some("x/b"));
        assert_eq!(d.tier.as_deref(), Some("Admin"));
        assert_eq!(d.policies, vec!["anp/db", "cnp/tenants"]);
        assert_eq!(
            d.text(),
            "DENIED ingress TCP/80 x/a (10.244.1.2:40000) -> x/b (10.244.1.3:80): x/b ingress denied by the Admin tier (anp/db, cnp/tenants)"
        );
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<DeniedPacket>(&json).unwrap(), d);
        // A NetworkPolicy drop's JSON has no tier.
        let np = describe(
            &logged(
                "twill-policy drop ingress x/b: ",
                tcp([10, 244, 1, 2], [10, 244, 1, 3], 40000, 80),
            ),
            &endpoints(),
        )
        .unwrap();
        assert!(!serde_json::to_string(&np).unwrap().contains("tier"));
        // The Baseline: no cluster policy of that tier selects x/b now.
        let d = describe(
            &logged(
                "twill-policy deny Baseline egress x/b: ",
                tcp([10, 244, 1, 3], [10, 244, 1, 2], 40000, 80),
            ),
            &endpoints(),
        )
        .unwrap();
        assert!(
            d.text().ends_with(
                "x/b egress denied by the Baseline tier (no cluster policy selects it now)"
            ),
            "{}",
            d.text()
        );
    }

    #[test]
    fn unknown_addresses_print_as_addresses_and_icmp_as_its_type() {
        let mut ping = tcp([10, 244, 1, 2], [10, 244, 9, 9], 0, 0);
        ping[9] = 1;
        ping[20] = 8;
        let d = describe(
            &logged("twill-policy drop egress x/a: ", ping),
            &endpoints(),
        )
        .unwrap();
        assert_eq!(
            d.text(),
            "DENIED egress ICMP type 8 code 0 x/a (10.244.1.2) -> 10.244.9.9: x/a isolated for egress by x/no-egress"
        );
        let d = describe(
            &logged(
                "twill-policy drop ingress unknown pod: ",
                tcp([10, 244, 1, 2], [10, 244, 1, 77], 1, 443),
            ),
            &endpoints(),
        )
        .unwrap();
        assert_eq!(d.isolated_pod, None);
        assert!(d.text().ends_with(
            "-> 10.244.1.77:443: ingress of a local pod address not known yet (fail closed)"
        ));
        // A payload that cannot be read still names what denied it.
        let d = describe(
            &logged("twill-policy drop ingress x/b: ", vec![0x45, 0]),
            &endpoints(),
        )
        .unwrap();
        assert!(d.text().contains("headers unreadable"), "{}", d.text());
        assert!(describe(&logged("other: ", vec![]), &endpoints()).is_none());
    }
}
