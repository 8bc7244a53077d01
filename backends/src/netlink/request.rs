//! Request building: each op as the netlink message and flags rtnetlink's builders send for it.

use std::net::IpAddr;

use rtnetlink::packet_core::{
    NetlinkMessage, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol, RouteScope, RouteType};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::RouteMessageBuilder;

use super::{LinkMap, NetlinkError};
use crate::model::{LinkRef, RouteEntry};
use crate::reconcile::Op;
use twill_formats::Mac;

/// `ip`/`bridge` commands with the effect of `op`, for error messages.
pub(super) fn describe(op: &Op) -> String {
    match op {
        Op::SetNeighbour { ip, mac, .. } => {
            format!("ip neigh replace {ip} lladdr {mac} nud permanent")
        }
        Op::SetFdb { mac, dst, .. } => format!("bridge fdb replace {mac} dst {dst} self permanent"),
        Op::SetRoute(r) => format!("ip route replace {} via {}", r.dst, r.gateway),
        Op::DelRoute(r) => format!("ip route del {} via {}", r.dst, r.gateway),
        Op::DelNeighbour { ip, .. } => format!("ip neigh del {ip}"),
        Op::DelFdb { mac, dst, .. } => format!("bridge fdb del {mac} dst {dst}"),
    }
}

pub(super) fn neighbour_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

/// The request that applies `op`: the message and flags rtnetlink's `add(..).replace()` and
/// `del(..)` builders send (every write a replace, so applying an op twice is harmless).
pub(super) fn request(
    links: &LinkMap,
    op: &Op,
) -> Result<NetlinkMessage<RouteNetlinkMessage>, NetlinkError> {
    const REPLACE: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE;
    const DELETE: u16 = NLM_F_REQUEST | NLM_F_ACK;
    let index = |link: LinkRef| {
        links
            .index(link)
            .ok_or_else(|| NetlinkError::Invalid(format!("no device for {link:?}")))
    };
    let neighbour = |family, link, state| -> Result<NeighbourMessage, NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family;
        msg.header.ifindex = index(link)?;
        msg.header.state = state;
        msg.header.kind = RouteType::Unspec;
        Ok(msg)
    };
    // The FDB entry as both its add and its delete name it: bridge family, self, MAC -> VTEP.
    let fdb = |link, mac: Mac, dst: IpAddr| -> Result<NeighbourMessage, NetlinkError> {
        let mut msg = neighbour(AddressFamily::Bridge, link, NeighbourState::Permanent)?;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        msg.attributes
            .push(NeighbourAttribute::Destination(neighbour_address(dst)));
        Ok(msg)
    };
    let ip_family = |ip: IpAddr| {
        if ip.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        }
    };
    let (msg, flags) = match *op {
        Op::SetNeighbour { link, ip, mac } => {
            let mut msg = neighbour(ip_family(ip), link, NeighbourState::Permanent)?;
            msg.attributes
                .push(NeighbourAttribute::Destination(neighbour_address(ip)));
            msg.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
            (RouteNetlinkMessage::NewNeighbour(msg), REPLACE)
        }
        Op::SetFdb { link, mac, dst } => (
            RouteNetlinkMessage::NewNeighbour(fdb(link, mac, dst)?),
            REPLACE,
        ),
        Op::SetRoute(r) => {
            let msg = route_message(&r, index(r.link)?, RouteProtocol::Boot)?;
            (RouteNetlinkMessage::NewRoute(msg), REPLACE)
        }
        Op::DelRoute(r) => {
            let msg = route_message(&r, index(r.link)?, RouteProtocol::Unspec)?;
            (RouteNetlinkMessage::DelRoute(msg), DELETE)
        }
        Op::DelNeighbour { link, ip, .. } => {
            let mut msg = NeighbourMessage::default();
            msg.header.family = ip_family(ip);
            msg.header.ifindex = index(link)?;
            msg.attributes
                .push(NeighbourAttribute::Destination(neighbour_address(ip)));
            (RouteNetlinkMessage::DelNeighbour(msg), DELETE)
        }
        Op::DelFdb { link, mac, dst } => (
            RouteNetlinkMessage::DelNeighbour(fdb(link, mac, dst)?),
            DELETE,
        ),
    };
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = flags;
    Ok(req)
}

pub(super) fn route_message(
    r: &RouteEntry,
    oif: u32,
    protocol: RouteProtocol,
) -> Result<RouteMessage, NetlinkError> {
    let bad = |e| NetlinkError::Invalid(format!("route {} via {}: {e:?}", r.dst, r.gateway));
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(r.dst.addr(), r.dst.prefix_len())
        .map_err(bad)?
        .gateway(r.gateway)
        .map_err(bad)?
        .output_interface(oif)
        .protocol(protocol)
        .scope(RouteScope::Universe);
    if r.onlink {
        b = b.onlink();
    }
    Ok(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::convert::neighbour_ip_mac;
    use crate::netlink::LinkMap;
    use rtnetlink::packet_core::NetlinkPayload;
    use rtnetlink::packet_route::neighbour::NeighbourState;
    use twill_formats::Mac;

    fn links() -> LinkMap {
        LinkMap {
            vxlan4: Some(7),
            vxlan6: Some(8),
            external: 2,
        }
    }

    fn inner(m: NetlinkMessage<RouteNetlinkMessage>) -> (u16, RouteNetlinkMessage) {
        match m.payload {
            NetlinkPayload::InnerMessage(i) => (m.header.flags, i),
            other => panic!("not a request: {other:?}"),
        }
    }

    /// The batched requests are the messages rtnetlink's builders sent one at a time, with
    /// the same flags (`replace()`: request, ack, replace, create; `del()`: request, ack).
    #[tokio::test]
    async fn requests_are_what_the_rtnetlink_builders_send() {
        let (_conn, handle, _) = rtnetlink::new_connection().unwrap();
        let replace = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE;
        let delete = NLM_F_REQUEST | NLM_F_ACK;
        let mac = Mac([0x0e, 0xbe, 0, 0, 1, 2]);
        let v4: IpAddr = "10.244.2.0".parse().unwrap();
        let v6: IpAddr = "fd00:42:0:2::".parse().unwrap();
        let dst: IpAddr = "198.18.0.12".parse().unwrap();

        for (ip, link, index) in [(v4, LinkRef::Vxlan4, 7), (v6, LinkRef::Vxlan6, 8)] {
            let mut b = handle
                .neighbours()
                .add(index, ip)
                .link_layer_address(&mac.0)
                .state(NeighbourState::Permanent)
                .replace();
            let want = RouteNetlinkMessage::NewNeighbour(b.message_mut().clone());
            let op = Op::SetNeighbour { link, ip, mac };
            assert_eq!(inner(request(&links(), &op).unwrap()), (replace, want));
        }

        let mut b = handle
            .neighbours()
            .add_bridge(7, &mac.0)
            .flags(NeighbourFlags::Own)
            .destination(dst)
            .replace();
        let want = RouteNetlinkMessage::NewNeighbour(b.message_mut().clone());
        let op = Op::SetFdb {
            link: LinkRef::Vxlan4,
            mac,
            dst,
        };
        assert_eq!(inner(request(&links(), &op).unwrap()), (replace, want));

        let route = RouteEntry {
            dst: "10.244.2.0/24".parse().unwrap(),
            gateway: v4,
            link: LinkRef::Vxlan4,
            onlink: true,
        };
        let msg = route_message(&route, 7, RouteProtocol::Boot).unwrap();
        let mut b = handle.route().add(msg).replace();
        let want = RouteNetlinkMessage::NewRoute(b.message_mut().clone());
        let op = Op::SetRoute(route);
        assert_eq!(inner(request(&links(), &op).unwrap()), (replace, want));
        let mut b = handle
            .route()
            .del(route_message(&route, 7, RouteProtocol::Unspec).unwrap());
        let want = RouteNetlinkMessage::DelRoute(b.message_mut().clone());
        assert_eq!(
            inner(request(&links(), &Op::DelRoute(route)).unwrap()),
            (delete, want)
        );

        let (flags, msg) = inner(
            request(
                &links(),
                &Op::DelFdb {
                    link: LinkRef::Vxlan4,
                    mac,
                    dst,
                },
            )
            .unwrap(),
        );
        assert_eq!(flags, delete);
        let RouteNetlinkMessage::DelNeighbour(m) = msg else {
            panic!("{msg:?}")
        };
        assert_eq!(
            (m.header.family, m.header.ifindex, m.header.flags),
            (AddressFamily::Bridge, 7, NeighbourFlags::Own)
        );
        assert_eq!(neighbour_ip_mac(&m), (Some(dst), Some(mac)));

        let op = Op::DelNeighbour {
            link: LinkRef::Vxlan6,
            ip: v6,
            mac,
        };
        let (flags, msg) = inner(request(&links(), &op).unwrap());
        assert_eq!(flags, delete);
        let RouteNetlinkMessage::DelNeighbour(m) = msg else {
            panic!("{msg:?}")
        };
        assert_eq!(
            (m.header.family, m.header.ifindex),
            (AddressFamily::Inet6, 8)
        );
        assert_eq!(neighbour_ip_mac(&m), (Some(v6), None));

        // A role without a device is refused before anything is sent.
        let none = LinkMap {
            vxlan6: None,
            ..links()
        };
        assert!(matches!(request(&none, &op), Err(NetlinkError::Invalid(_))));
    }
}
