//! The decide step: from the local node and its peers' leases to the entries the kernel must
//! hold. Pure: no I/O, no clock; every test of dataplane behaviour starts here.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{
    BackendKind, DataplaneState, LinkRef, PeerFamily, PeerLease, RouteEntry, Skipped,
};

/// What is true about this node, as far as the dataplane is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub backend: BackendKind,
    /// The flannel `Network` and `IPv6Network`: twill only ever touches entries inside them.
    pub networks: Vec<IpNet>,
    /// This node's own leased subnets: never routed elsewhere.
    pub own_subnets: Vec<IpNet>,
    /// Prefixes connected on the external interface: a peer inside one is on-link (host-gw and
    /// DirectRouting need that).
    pub external_prefixes: Vec<IpNet>,
    /// Whether `flannel.<VNI>` / `flannel-v6.<VNI>` exist (VXLAN, per enabled family).
    pub vxlan4: bool,
    pub vxlan6: bool,
}

impl Topology {
    fn in_networks(&self, net: &IpNet) -> bool {
        self.networks.iter().any(|n| n.contains(net))
    }

    fn on_link(&self, ip: IpAddr) -> bool {
        self.external_prefixes.iter().any(|p| p.contains(&ip))
    }

    fn overlaps_own(&self, net: &IpNet) -> bool {
        self.own_subnets
            .iter()
            .any(|own| own.contains(net) || net.contains(own))
    }
}

/// Computes the desired dataplane. Peers are taken in name order, so when two leases claim
/// overlapping subnets the outcome is deterministic (the first keeps it, the second is skipped).
pub fn desired_state(topo: &Topology, peers: &[PeerLease]) -> (DataplaneState, Vec<Skipped>) {
    let mut state = DataplaneState::default();
    let mut skipped = Vec::new();
    let mut ordered: Vec<&PeerLease> = peers.iter().collect();
    ordered.sort_by(|a, b| a.name.cmp(&b.name));

    for peer in ordered {
        if peer.backend_type != topo.backend.lease_type() {
            skipped.push(Skipped {
                peer: peer.name.clone(),
                reason: format!(
                    "ignoring non-{} subnet: BackendType is {:?}",
                    topo.backend.lease_type(),
                    peer.backend_type
                ),
            });
            continue;
        }
        for family in [peer.v4.as_ref(), peer.v6.as_ref()].into_iter().flatten() {
            if let Err(reason) = add_family(topo, family, &mut state) {
                skipped.push(Skipped {
                    peer: peer.name.clone(),
                    reason: reason.to_string(),
                });
            }
        }
    }
    (state, skipped)
}

/// Why one family of a peer's lease is not programmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum FamilySkipped {
    #[error("subnet {0} is outside the flannel network")]
    OutsideNetwork(IpNet),
    #[error("subnet {0} overlaps this node's own subnet")]
    OverlapsOwn(IpNet),
    #[error("subnet {subnet} overlaps {existing}, already leased by another peer")]
    OverlapsPeer { subnet: IpNet, existing: IpNet },
    #[error("public IP {public_ip} does not match the family of {subnet}")]
    FamilyMismatch { public_ip: IpAddr, subnet: IpNet },
    #[error("host-gw needs L2 adjacency, but the public IP {public_ip} of subnet {subnet} is not on-link on the external interface")]
    NotOnLink { public_ip: IpAddr, subnet: IpNet },
    #[error("no VXLAN device for the family of {0} on this node")]
    NoVxlanDevice(IpNet),
    #[error("subnet {0} has no VtepMAC in its BackendData")]
    NoVtepMac(IpNet),
}

fn add_family(
    topo: &Topology,
    fam: &PeerFamily,
    state: &mut DataplaneState,
) -> Result<(), FamilySkipped> {
    let subnet = fam.subnet.trunc();
    if !topo.in_networks(&subnet) {
        return Err(FamilySkipped::OutsideNetwork(subnet));
    }
    if topo.overlaps_own(&subnet) {
        return Err(FamilySkipped::OverlapsOwn(subnet));
    }
    if let Some(existing) = overlapping(&state.routes, &subnet) {
        return Err(FamilySkipped::OverlapsPeer {
            subnet,
            existing: *existing,
        });
    }
    if subnet.addr().is_ipv4() != fam.public_ip.is_ipv4() {
        return Err(FamilySkipped::FamilyMismatch {
            public_ip: fam.public_ip,
            subnet,
        });
    }
    match topo.backend {
        BackendKind::HostGw => {
            if !topo.on_link(fam.public_ip) {
                return Err(FamilySkipped::NotOnLink {
                    public_ip: fam.public_ip,
                    subnet,
                });
            }
            direct_route(state, subnet, fam.public_ip);
        }
        BackendKind::Vxlan { direct_routing } => {
            if direct_routing && topo.on_link(fam.public_ip) {
                direct_route(state, subnet, fam.public_ip);
                return Ok(());
            }
            let link = if subnet.addr().is_ipv4() {
                LinkRef::Vxlan4
            } else {
                LinkRef::Vxlan6
            };
            let device_up = if link == LinkRef::Vxlan4 {
                topo.vxlan4
            } else {
                topo.vxlan6
            };
            if !device_up {
                return Err(FamilySkipped::NoVxlanDevice(subnet));
            }
            let Some(mac) = fam.vtep_mac else {
                return Err(FamilySkipped::NoVtepMac(subnet));
            };
            // Flannel's order per peer: neighbour, FDB, then the route that makes them used.
            let gateway = subnet.network();
            state.neighbours.insert((link, gateway), mac);
            state.fdb.insert((link, mac, fam.public_ip));
            state.routes.insert(
                subnet,
                RouteEntry {
                    dst: subnet,
                    gateway,
                    link,
                    onlink: true,
                },
            );
        }
    }
    Ok(())
}

/// The key of `routes` overlapping `subnet`, if any. The keys never overlap each other (a
/// subnet is only added after this check), so only the neighbours of `subnet` in key order
/// can: the last key not after it (which may contain it) and the first key not before it
/// (which it may contain). Two lookups instead of a scan: 1000 peers were a million checks.
fn overlapping<'a, V>(routes: &'a BTreeMap<IpNet, V>, subnet: &IpNet) -> Option<&'a IpNet> {
    let before = routes.range(..=subnet).next_back();
    let after = routes.range(subnet..).next();
    before
        .into_iter()
        .chain(after)
        .map(|(r, _)| r)
        .find(|r| r.contains(subnet) || subnet.contains(*r))
}

fn direct_route(state: &mut DataplaneState, subnet: IpNet, gateway: IpAddr) {
    state.routes.insert(
        subnet,
        RouteEntry {
            dst: subnet,
            gateway,
            link: LinkRef::External,
            onlink: false,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use twill_formats::Mac;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn mac(s: &str) -> Mac {
        s.parse().unwrap()
    }

    fn vxlan_topo(direct_routing: bool) -> Topology {
        Topology {
            backend: BackendKind::Vxlan { direct_routing },
            networks: vec![net("10.244.0.0/16"), net("fd00:42::/56")],
            own_subnets: vec![net("10.244.1.0/24"), net("fd00:42:0:1::/64")],
            external_prefixes: vec![net("198.18.0.0/24")],
            vxlan4: true,
            vxlan6: true,
        }
    }

    fn peer(name: &str, subnet: &str, public: &str, m: &str) -> PeerLease {
        PeerLease {
            name: name.into(),
            backend_type: "vxlan".into(),
            v4: Some(PeerFamily {
                subnet: net(subnet),
                public_ip: ip(public),
                vtep_mac: Some(mac(m)),
            }),
            v6: None,
        }
    }

    #[test]
    fn vxlan_peer_gets_neighbour_fdb_and_onlink_route() {
        let (state, skipped) = desired_state(
            &vxlan_topo(false),
            &[peer(
                "10.244.2.0-24",
                "10.244.2.0/24",
                "198.18.0.12",
                "0a:58:0a:f4:02:00",
            )],
        );
        assert!(skipped.is_empty());
        assert_eq!(
            state.neighbours.get(&(LinkRef::Vxlan4, ip("10.244.2.0"))),
            Some(&mac("0a:58:0a:f4:02:00"))
        );
        assert!(state.fdb.contains(&(
            LinkRef::Vxlan4,
            mac("0a:58:0a:f4:02:00"),
            ip("198.18.0.12")
        )));
        assert_eq!(
            state.routes[&net("10.244.2.0/24")],
            RouteEntry {
                dst: net("10.244.2.0/24"),
                gateway: ip("10.244.2.0"),
                link: LinkRef::Vxlan4,
                onlink: true
            }
        );
        assert_eq!(state.len(), 3);
    }

    #[test]
    fn direct_routing_uses_underlay_for_on_link_peers_only() {
        let peers = [
            peer(
                "10.244.2.0-24",
                "10.244.2.0/24",
                "198.18.0.12",
                "0a:00:00:00:00:02",
            ),
            peer(
                "10.244.3.0-24",
                "10.244.3.0/24",
                "198.19.5.1",
                "0a:00:00:00:00:03",
            ),
        ];
        let (state, skipped) = desired_state(&vxlan_topo(true), &peers);
        assert!(skipped.is_empty());
        assert_eq!(
            state.routes[&net("10.244.2.0/24")],
            RouteEntry {
                dst: net("10.244.2.0/24"),
                gateway: ip("198.18.0.12"),
                link: LinkRef::External,
                onlink: false
            }
        );
        assert_eq!(state.routes[&net("10.244.3.0/24")].link, LinkRef::Vxlan4);
        assert_eq!(state.neighbours.len(), 1);
        assert_eq!(state.fdb.len(), 1);
    }

    #[test]
    fn host_gw_routes_via_public_ip_and_names_off_link_peer() {
        let mut topo = vxlan_topo(false);
        topo.backend = BackendKind::HostGw;
        let mut a = peer(
            "10.244.2.0-24",
            "10.244.2.0/24",
            "198.18.0.12",
            "0a:00:00:00:00:02",
        );
        a.backend_type = "host-gw".into();
        a.v4.as_mut().unwrap().vtep_mac = None;
        let mut b = a.clone();
        b.name = "10.244.3.0-24".into();
        b.v4 = Some(PeerFamily {
            subnet: net("10.244.3.0/24"),
            public_ip: ip("198.19.0.7"),
            vtep_mac: None,
        });
        let (state, skipped) = desired_state(&topo, &[a, b]);
        assert_eq!(state.routes.len(), 1);
        assert_eq!(
            state.routes[&net("10.244.2.0/24")].gateway,
            ip("198.18.0.12")
        );
        assert!(state.neighbours.is_empty() && state.fdb.is_empty());
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].peer, "10.244.3.0-24");
        assert!(
            skipped[0].reason.contains("198.19.0.7"),
            "{}",
            skipped[0].reason
        );
        assert!(
            skipped[0].reason.contains("not on-link"),
            "{}",
            skipped[0].reason
        );
    }

    #[test]
    fn wrong_backend_type_is_ignored() {
        let mut p = peer(
            "10.244.2.0-24",
            "10.244.2.0/24",
            "198.18.0.12",
            "0a:00:00:00:00:02",
        );
        p.backend_type = "host-gw".into();
        let (state, skipped) = desired_state(&vxlan_topo(false), &[p]);
        assert!(state.is_empty());
        assert!(skipped[0].reason.contains("ignoring non-vxlan subnet"));
    }

    #[test]
    fn garbage_peers_are_skipped_without_disturbing_others() {
        let good = peer(
            "10.244.2.0-24",
            "10.244.2.0/24",
            "198.18.0.12",
            "0a:00:00:00:00:02",
        );
        let outside = peer(
            "10.9.0.0-24",
            "10.9.0.0/24",
            "198.18.0.13",
            "0a:00:00:00:00:03",
        );
        let own = peer(
            "10.244.1.0-24",
            "10.244.1.0/24",
            "198.18.0.14",
            "0a:00:00:00:00:04",
        );
        let overlapping = peer(
            "10.244.2.0-25",
            "10.244.2.0/25",
            "198.18.0.15",
            "0a:00:00:00:00:05",
        );
        let mut no_mac = peer(
            "10.244.6.0-24",
            "10.244.6.0/24",
            "198.18.0.16",
            "0a:00:00:00:00:06",
        );
        no_mac.v4.as_mut().unwrap().vtep_mac = None;
        let (state, skipped) = desired_state(
            &vxlan_topo(false),
            &[overlapping, good, outside, own, no_mac],
        );
        assert_eq!(
            state.routes.keys().collect::<Vec<_>>(),
            vec![&net("10.244.2.0/24")]
        );
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        // "10.244.2.0-24" sorts before "10.244.2.0-25": the /24 wins, deterministically.
        assert!(skipped
            .iter()
            .any(|s| s.peer == "10.244.2.0-25" && s.reason.contains("overlaps")));
        assert!(skipped
            .iter()
            .any(|s| s.peer == "10.9.0.0-24" && s.reason.contains("outside")));
        assert!(skipped
            .iter()
            .any(|s| s.peer == "10.244.1.0-24" && s.reason.contains("own subnet")));
        assert!(skipped
            .iter()
            .any(|s| s.peer == "10.244.6.0-24" && s.reason.contains("VtepMAC")));
    }

    #[test]
    fn dual_stack_peer_programs_both_devices() {
        let mut p = peer(
            "10.244.2.0-24&fd00:42:0:2::-64",
            "10.244.2.0/24",
            "198.18.0.12",
            "0a:00:00:00:00:02",
        );
        p.v6 = Some(PeerFamily {
            subnet: net("fd00:42:0:2::/64"),
            public_ip: ip("2001:db8::12"),
            vtep_mac: Some(mac("0a:00:00:00:06:02")),
        });
        let (state, skipped) = desired_state(&vxlan_topo(false), &[p]);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(state.routes.len(), 2);
        assert_eq!(
            state
                .neighbours
                .get(&(LinkRef::Vxlan6, ip("fd00:42:0:2::"))),
            Some(&mac("0a:00:00:00:06:02"))
        );
        assert!(state.fdb.contains(&(
            LinkRef::Vxlan6,
            mac("0a:00:00:00:06:02"),
            ip("2001:db8::12")
        )));
        assert_eq!(
            state.routes[&net("fd00:42:0:2::/64")].gateway,
            ip("fd00:42:0:2::")
        );
    }

    #[test]
    fn v6_family_without_v6_device_is_skipped() {
        let mut topo = vxlan_topo(false);
        topo.vxlan6 = false;
        let mut p = peer(
            "10.244.2.0-24&fd00:42:0:2::-64",
            "10.244.2.0/24",
            "198.18.0.12",
            "0a:00:00:00:00:02",
        );
        p.v6 = Some(PeerFamily {
            subnet: net("fd00:42:0:2::/64"),
            public_ip: ip("2001:db8::12"),
            vtep_mac: Some(mac("0a:00:00:00:06:02")),
        });
        let (state, skipped) = desired_state(&topo, &[p]);
        assert_eq!(state.routes.len(), 1);
        assert_eq!(skipped.len(), 1);
    }

    #[test]
    fn thousand_peers_scale_linearly_in_entries() {
        let topo = Topology {
            networks: vec![net("10.0.0.0/8")],
            own_subnets: vec![net("10.0.0.0/24")],
            ..vxlan_topo(false)
        };
        let peers: Vec<PeerLease> = (1..=1000u32)
            .map(|i| {
                let s = format!("10.{}.{}.0/24", i / 256, i % 256);
                peer(
                    &s,
                    &s,
                    "198.18.0.12",
                    &format!("0a:00:00:00:{:02x}:{:02x}", i / 256, i % 256),
                )
            })
            .collect();
        let (state, skipped) = desired_state(&topo, &peers);
        assert!(skipped.is_empty());
        assert_eq!(state.len(), 3000);
    }

    #[test]
    fn overlap_lookup_agrees_with_a_scan() {
        // Random subnets of random lengths (v4 and v6), added when they overlap nothing, as
        // add_family does; every candidate is checked against a linear scan.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut routes: BTreeMap<IpNet, ()> = BTreeMap::new();
        for _ in 0..5000 {
            let r = rand();
            let candidate = if r % 4 == 0 {
                let len = 56 + (r >> 8) as u8 % 17;
                IpNet::new(
                    std::net::Ipv6Addr::from(0xfd00_0042u128 << 96 | (rand() as u128) << 56).into(),
                    len,
                )
            } else {
                let len = 12 + (r >> 8) as u8 % 17;
                IpNet::new(
                    std::net::Ipv4Addr::from(0x0a00_0000 | (rand() as u32 & 0x00ff_ffff)).into(),
                    len,
                )
            }
            .unwrap()
            .trunc();
            let scan = routes
                .keys()
                .find(|k| k.contains(&candidate) || candidate.contains(*k));
            assert_eq!(overlapping(&routes, &candidate), scan, "{candidate}");
            if scan.is_none() {
                routes.insert(candidate, ());
            }
        }
        assert!(routes.len() > 100, "the test should build a crowded table");
    }

    #[test]
    fn mac_parses_and_prints_like_go() {
        assert_eq!(mac("C6:D2:32:6F:8F:44").to_string(), "c6:d2:32:6f:8f:44");
        assert!("c6:d2:32:6f:8f".parse::<Mac>().is_err());
        assert!("c6:d2:32:6f:8f:4g".parse::<Mac>().is_err());
    }
}
