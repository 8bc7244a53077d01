//! Conversions from netlink attributes: neighbour and FDB entries to addresses and MACs, dumped
//! routes to their table, addresses and [`RouteEntry`].

use std::net::IpAddr;

use ipnet::IpNet;
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteType,
};

use super::LinkMap;
use crate::model::RouteEntry;
use twill_formats::Mac;

pub(super) fn neighbour_ip_mac(m: &NeighbourMessage) -> (Option<IpAddr>, Option<Mac>) {
    let mut ip = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                ip = Some(IpAddr::V4(*v4))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                ip = Some(IpAddr::V6(*v6))
            }
            // FDB dumps carry NDA_DST raw, because the parser picks the address type from the
            // message family (AF_BRIDGE): map 4 or 16 bytes back to an IP.
            NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
                ip = ip_from_bytes(bytes)
            }
            NeighbourAttribute::LinkLayerAddress(b) => mac = Mac::from_slice(b),
            _ => {}
        }
    }
    (ip, mac)
}

pub(super) fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(b) = <[u8; 4]>::try_from(bytes) {
        Some(IpAddr::from(b))
    } else if let Ok(b) = <[u8; 16]>::try_from(bytes) {
        Some(IpAddr::from(b))
    } else {
        None
    }
}

pub(super) fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| {
            if let RouteAttribute::Table(t) = a {
                Some(*t)
            } else {
                None
            }
        })
        .unwrap_or(u32::from(m.header.table))
}

pub(super) fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A dumped route as a [`RouteEntry`], if it is a unicast gateway route on one of twill's links.
pub(super) fn route_entry(m: &RouteMessage, links: &LinkMap) -> Option<RouteEntry> {
    if m.header.kind != RouteType::Unicast {
        return None;
    }
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = route_addr(d),
            RouteAttribute::Gateway(g) => gateway = route_addr(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let dst = IpNet::new(dst?, m.header.destination_prefix_length).ok()?;
    Some(RouteEntry {
        dst,
        gateway: gateway?,
        link: links.role(oif?)?,
        onlink: m.header.flags.contains(RouteFlags::Onlink),
    })
}
