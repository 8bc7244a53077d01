//! Observation: the kernel's neighbour, FDB and route dumps read into the model, keeping only
//! the entries twill owns. Each dump is read message by message into the model rather than
//! collected first: with thousands of peers the parsed messages are several times the size of
//! the model, and twilld's memory is held to what it keeps.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{RouteAttribute, RouteHeader, RouteMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;

use super::convert::{neighbour_ip_mac, route_addr, route_entry, route_table};
use super::{req, LinkMap, Netlink, NetlinkError};
use crate::desired::Topology;
use crate::model::DataplaneState;

impl Netlink {
    /// Reads the entries twill owns: permanent neighbours on the VXLAN devices for addresses
    /// inside the networks, FDB entries on the VXLAN devices, and main-table gateway routes
    /// inside the networks (except to this node's own subnets) on twill's links.
    pub async fn observe(
        &self,
        links: &LinkMap,
        topo: &Topology,
    ) -> Result<DataplaneState, NetlinkError> {
        let mut state = DataplaneState::default();
        let vxlan: Vec<u32> = links.vxlan_indexes().collect();

        if !vxlan.is_empty() {
            for family in [AddressFamily::Inet, AddressFamily::Inet6] {
                let mut msgs = self
                    .handle
                    .neighbours()
                    .get()
                    .set_address_family(family)
                    .execute();
                while let Some(m) = msgs.try_next().await.map_err(req("dumping neighbours"))? {
                    let Some(link) = links
                        .role(m.header.ifindex)
                        .filter(|_| vxlan.contains(&m.header.ifindex))
                    else {
                        continue;
                    };
                    if m.header.state != NeighbourState::Permanent {
                        continue;
                    }
                    let (ip, mac) = neighbour_ip_mac(&m);
                    if let (Some(ip), Some(mac)) = (ip, mac) {
                        if topo.networks.iter().any(|n| n.contains(&ip)) {
                            state.neighbours.insert((link, ip), mac);
                        }
                    }
                }
            }
            let mut fdb = self
                .handle
                .neighbours()
                .get()
                .set_address_family(AddressFamily::Bridge)
                .execute();
            while let Some(m) = fdb.try_next().await.map_err(req("dumping the FDB"))? {
                if !vxlan.contains(&m.header.ifindex) {
                    continue;
                }
                let Some(link) = links.role(m.header.ifindex) else {
                    continue;
                };
                let (dst, mac) = neighbour_ip_mac(&m);
                if let (Some(dst), Some(mac)) = (dst, mac) {
                    state.fdb.insert((link, mac, dst));
                }
            }
        }

        for family_msg in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut routes = self.handle.route().get(family_msg).execute();
            while let Some(route) = routes.try_next().await.map_err(req("dumping routes"))? {
                if route_table(&route) != u32::from(RouteHeader::RT_TABLE_MAIN) {
                    continue;
                }
                let Some(entry) = route_entry(&route, links) else {
                    continue;
                };
                let owned = topo.networks.iter().any(|n| n.contains(&entry.dst))
                    && !topo
                        .own_subnets
                        .iter()
                        .any(|o| o.contains(&entry.dst) || entry.dst.contains(o));
                if owned {
                    state.routes.insert(entry.dst, entry);
                }
            }
        }
        Ok(state)
    }

    /// Main-table IPv4 routes as (destination, output ifindex): what interface selection needs
    /// for the default route and for `--iface-can-reach` (longest prefix match).
    pub async fn main_routes_v4_oif(&self) -> Result<Vec<(IpNet, u32)>, NetlinkError> {
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(req("dumping routes"))?;
        let mut out = Vec::new();
        for m in msgs
            .iter()
            .filter(|m| route_table(m) == u32::from(RouteHeader::RT_TABLE_MAIN))
        {
            let mut dst = Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            let mut oif = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = route_addr(d),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if let (Some(dst), Some(oif)) = (dst, oif) {
                if let Ok(net) = IpNet::new(dst, m.header.destination_prefix_length) {
                    out.push((net, oif));
                }
            }
        }
        Ok(out)
    }
}
