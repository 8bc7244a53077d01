//! The diff: desired against observed state, as a short ordered list of operations.
//!
//! Order matters for traffic, not for correctness (every op is idempotent): stale routes go
//! first so nothing is routed at an entry about to vanish; then neighbours and FDB entries are
//! added before the routes that make the kernel use them, which is Flannel's per-peer order.

use std::net::IpAddr;

use crate::model::{DataplaneState, LinkRef, RouteEntry};
use twill_formats::Mac;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    DelRoute(RouteEntry),
    DelNeighbour {
        link: LinkRef,
        ip: IpAddr,
        mac: Mac,
    },
    DelFdb {
        link: LinkRef,
        mac: Mac,
        dst: IpAddr,
    },
    /// `ip neigh replace … nud permanent`
    SetNeighbour {
        link: LinkRef,
        ip: IpAddr,
        mac: Mac,
    },
    /// `bridge fdb replace … self permanent`
    SetFdb {
        link: LinkRef,
        mac: Mac,
        dst: IpAddr,
    },
    /// `ip route replace …`
    SetRoute(RouteEntry),
}

impl Op {
    /// Ops of one phase are independent of each other and may be applied concurrently; a
    /// phase must finish before the next starts (a route only after its neighbour and FDB
    /// entries exist). [`diff`] emits ops sorted by phase.
    pub fn phase(&self) -> u8 {
        match self {
            Op::DelRoute(_) => 0,
            Op::DelNeighbour { .. } | Op::DelFdb { .. } => 1,
            Op::SetNeighbour { .. } | Op::SetFdb { .. } => 2,
            Op::SetRoute(_) => 3,
        }
    }
}

/// What must change so that `actual` becomes `desired`. Empty when they already agree, so a
/// periodic resync of a healthy node costs one dump and no writes.
pub fn diff(desired: &DataplaneState, actual: &DataplaneState) -> Vec<Op> {
    let mut ops = Vec::new();

    for (dst, route) in &actual.routes {
        // A changed route is replaced in place below; only routes with no desired
        // destination at all are deleted, so a peer's traffic never sees a gap.
        if !desired.routes.contains_key(dst) {
            ops.push(Op::DelRoute(*route));
        }
    }
    for (&(link, ip), &mac) in &actual.neighbours {
        if !desired.neighbours.contains_key(&(link, ip)) {
            ops.push(Op::DelNeighbour { link, ip, mac });
        }
    }
    for &(link, mac, dst) in actual.fdb.difference(&desired.fdb) {
        ops.push(Op::DelFdb { link, mac, dst });
    }
    for (&(link, ip), &mac) in &desired.neighbours {
        if actual.neighbours.get(&(link, ip)) != Some(&mac) {
            ops.push(Op::SetNeighbour { link, ip, mac });
        }
    }
    for &(link, mac, dst) in desired.fdb.difference(&actual.fdb) {
        ops.push(Op::SetFdb { link, mac, dst });
    }
    for (dst, route) in &desired.routes {
        if actual.routes.get(dst) != Some(route) {
            ops.push(Op::SetRoute(*route));
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn mac(last: u8) -> Mac {
        Mac([0x0a, 0, 0, 0, 0, last])
    }

    fn peer_state(entries: &[(&str, &str, u8)]) -> DataplaneState {
        let mut s = DataplaneState::default();
        for &(subnet, public, m) in entries {
            let dst = n(subnet);
            let gw = dst.network();
            s.neighbours.insert((LinkRef::Vxlan4, gw), mac(m));
            s.fdb.insert((LinkRef::Vxlan4, mac(m), ip(public)));
            s.routes.insert(
                dst,
                RouteEntry {
                    dst,
                    gateway: gw,
                    link: LinkRef::Vxlan4,
                    onlink: true,
                },
            );
        }
        s
    }

    #[test]
    fn ops_come_sorted_by_phase() {
        let old = peer_state(&[
            ("10.244.2.0/24", "198.18.0.12", 2),
            ("10.244.4.0/24", "198.18.0.14", 4),
        ]);
        let new = peer_state(&[
            ("10.244.2.0/24", "198.18.0.99", 9),
            ("10.244.3.0/24", "198.18.0.13", 3),
        ]);
        let phases: Vec<u8> = diff(&new, &old).iter().map(Op::phase).collect();
        assert!(phases.windows(2).all(|w| w[0] <= w[1]), "{phases:?}");
        assert_eq!(phases.first(), Some(&0));
        assert_eq!(phases.last(), Some(&3));
    }

    #[test]
    fn equal_states_need_nothing() {
        let s = peer_state(&[
            ("10.244.2.0/24", "198.18.0.12", 2),
            ("10.244.3.0/24", "198.18.0.13", 3),
        ]);
        assert!(diff(&s, &s).is_empty());
    }

    #[test]
    fn new_peer_adds_neighbour_then_fdb_then_route() {
        let ops = diff(
            &peer_state(&[("10.244.2.0/24", "198.18.0.12", 2)]),
            &DataplaneState::default(),
        );
        assert!(matches!(ops[0], Op::SetNeighbour { .. }));
        assert!(matches!(ops[1], Op::SetFdb { .. }));
        assert!(matches!(ops[2], Op::SetRoute(_)));
        assert_eq!(ops.len(), 3);
    }

    #[test]
    fn vanished_peer_is_removed_route_first() {
        let ops = diff(
            &DataplaneState::default(),
            &peer_state(&[("10.244.2.0/24", "198.18.0.12", 2)]),
        );
        assert!(matches!(ops[0], Op::DelRoute(_)));
        assert_eq!(ops.len(), 3);
        assert!(ops.iter().all(|o| matches!(
            o,
            Op::DelRoute(_) | Op::DelNeighbour { .. } | Op::DelFdb { .. }
        )));
    }

    #[test]
    fn peer_with_new_mac_and_ip_replaces_neighbour_and_fdb_but_keeps_route() {
        let old = peer_state(&[("10.244.2.0/24", "198.18.0.12", 2)]);
        let new = peer_state(&[("10.244.2.0/24", "198.18.0.99", 9)]);
        let ops = diff(&new, &old);
        assert_eq!(
            ops,
            vec![
                Op::DelFdb {
                    link: LinkRef::Vxlan4,
                    mac: mac(2),
                    dst: ip("198.18.0.12")
                },
                Op::SetNeighbour {
                    link: LinkRef::Vxlan4,
                    ip: ip("10.244.2.0"),
                    mac: mac(9)
                },
                Op::SetFdb {
                    link: LinkRef::Vxlan4,
                    mac: mac(9),
                    dst: ip("198.18.0.99")
                },
            ]
        );
    }

    #[test]
    fn changed_route_is_replaced_not_deleted() {
        let desired = peer_state(&[("10.244.2.0/24", "198.18.0.12", 2)]);
        let mut actual = desired.clone();
        let dst = n("10.244.2.0/24");
        actual.routes.insert(
            dst,
            RouteEntry {
                dst,
                gateway: ip("198.18.0.12"),
                link: LinkRef::External,
                onlink: false,
            },
        );
        let ops = diff(&desired, &actual);
        assert_eq!(ops, vec![Op::SetRoute(desired.routes[&dst])]);
    }

    #[test]
    fn partial_state_is_completed() {
        let desired = peer_state(&[("10.244.2.0/24", "198.18.0.12", 2)]);
        let mut actual = desired.clone();
        actual.fdb.clear();
        assert_eq!(
            diff(&desired, &actual),
            vec![Op::SetFdb {
                link: LinkRef::Vxlan4,
                mac: mac(2),
                dst: ip("198.18.0.12")
            }]
        );
    }
}
