//! The effector: a thin, idempotent facade over rtnetlink. It observes the entries twill owns
//! and applies [`Op`]s; it never decides anything. Every write is a `replace`, so applying the
//! same op twice, or after a crash half-way through a batch, is harmless.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::desired::Topology;
use crate::model::{DataplaneState, LinkRef, MacAddr, RouteEntry};
use crate::reconcile::Op;

/// Netlink requests of one phase kept in flight at once by [`Netlink::apply`].
pub const APPLY_CONCURRENCY: usize = 64;

/// errno values the callers care about.
pub const EEXIST: i32 = 17;
pub const ENOENT: i32 = 2;
pub const ESRCH: i32 = 3;
pub const ENETUNREACH: i32 = 101;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("{what}: {source}")]
    Request {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("opening a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

impl NetlinkError {
    /// The kernel's errno for a failed request (positive), if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Request {
                source: rtnetlink::Error::NetlinkError(e),
                ..
            } => e.code.map(|c| -c.get()),
            _ => None,
        }
    }
}

fn req(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Request { what, source }
}

/// The ifindex of each link role on this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkMap {
    pub vxlan4: Option<u32>,
    pub vxlan6: Option<u32>,
    pub external: u32,
}

impl LinkMap {
    pub fn index(&self, link: LinkRef) -> Option<u32> {
        match link {
            LinkRef::Vxlan4 => self.vxlan4,
            LinkRef::Vxlan6 => self.vxlan6,
            LinkRef::External => Some(self.external),
        }
    }

    pub fn role(&self, index: u32) -> Option<LinkRef> {
        if Some(index) == self.vxlan4 {
            Some(LinkRef::Vxlan4)
        } else if Some(index) == self.vxlan6 {
            Some(LinkRef::Vxlan6)
        } else if index == self.external {
            Some(LinkRef::External)
        } else {
            None
        }
    }

    fn vxlan_indexes(&self) -> impl Iterator<Item = u32> {
        self.vxlan4.into_iter().chain(self.vxlan6)
    }
}

/// What netlink says about one link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<MacAddr>,
    pub up: bool,
    pub kind: Option<String>,
    pub vxlan: Vec<InfoVxlan>,
}

fn link_state(msg: LinkMessage) -> LinkState {
    let mut st = LinkState {
        index: msg.header.index,
        name: String::new(),
        mtu: 0,
        mac: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        kind: None,
        vxlan: Vec::new(),
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => st.name = n,
            LinkAttribute::Mtu(m) => st.mtu = m,
            LinkAttribute::Address(a) => st.mac = MacAddr::from_slice(&a),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => st.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(v)) => st.vxlan = v,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    st
}

/// A netlink connection in the network namespace of the thread that opened it.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a connection; must be called inside a tokio runtime.
    pub fn connect() -> Result<Netlink, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkState>, NetlinkError> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.try_next().await {
            Ok(msg) => Ok(msg.map(link_state)),
            Err(e) if is_errno(&e, &[19 /* ENODEV */]) => Ok(None),
            Err(e) => Err(req(format!("looking up link {name}"))(e)),
        }
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkState>, NetlinkError> {
        let mut stream = self.handle.link().get().match_index(index).execute();
        match stream.try_next().await {
            Ok(msg) => Ok(msg.map(link_state)),
            Err(e) if is_errno(&e, &[19]) => Ok(None),
            Err(e) => Err(req(format!("looking up link #{index}"))(e)),
        }
    }

    pub async fn links(&self) -> Result<Vec<LinkState>, NetlinkError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(req("listing links"))?;
        Ok(msgs.into_iter().map(link_state).collect())
    }

    pub async fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(req(format!("deleting link #{index}")))
    }

    /// Sets MTU and brings the link up (RTM_SETLINK; idempotent).
    pub async fn set_mtu_up(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(req(format!("setting mtu {mtu} and up on link #{index}")))
    }

    /// Addresses on a link (or on every link with `None`), with prefix lengths.
    pub async fn addresses(&self, index: Option<u32>) -> Result<Vec<(u32, IpNet)>, NetlinkError> {
        let mut get = self.handle.address().get();
        if let Some(i) = index {
            get = get.set_link_index_filter(i);
        }
        let msgs: Vec<AddressMessage> = get
            .execute()
            .try_collect()
            .await
            .map_err(req("listing addresses"))?;
        let mut out = Vec::new();
        for m in msgs {
            if index.is_some_and(|i| i != m.header.index) {
                continue;
            }
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on
            // point-to-point links, so prefer the former.
            let mut local = None;
            let mut address = None;
            for a in &m.attributes {
                match a {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => address = Some(*ip),
                    _ => {}
                }
            }
            if let Some(ip) = local.or(address) {
                if let Ok(net) = IpNet::new(ip, m.header.prefix_len) {
                    out.push((m.header.index, net));
                }
            }
        }
        Ok(out)
    }

    /// Makes `want` the only address inside `scope` on the link: adds it (replace) and removes
    /// any other address inside the flannel networks, as Flannel does for flannel.<VNI>.
    pub async fn ensure_sole_address(
        &self,
        index: u32,
        want: IpNet,
        scope: &[IpNet],
    ) -> Result<(), NetlinkError> {
        for (_, addr) in self.addresses(Some(index)).await? {
            if addr != want && scope.iter().any(|s| s.contains(&addr.addr())) {
                let mut msgs = self
                    .handle
                    .address()
                    .get()
                    .set_link_index_filter(index)
                    .execute();
                while let Some(m) = msgs.try_next().await.map_err(req("listing addresses"))? {
                    let matches = m.header.prefix_len == addr.prefix_len()
                        && m.attributes.iter().any(|a| matches!(a, AddressAttribute::Local(ip) | AddressAttribute::Address(ip) if *ip == addr.addr()));
                    if matches && m.header.index == index {
                        self.handle
                            .address()
                            .del(m)
                            .execute()
                            .await
                            .map_err(req(format!(
                                "removing stale address {addr} from link #{index}"
                            )))?;
                        break;
                    }
                }
            }
        }
        self.handle
            .address()
            .add(index, want.addr(), want.prefix_len())
            .replace()
            .execute()
            .await
            .map_err(req(format!("adding address {want} to link #{index}")))
    }

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
                let msgs: Vec<NeighbourMessage> = self
                    .handle
                    .neighbours()
                    .get()
                    .set_address_family(family)
                    .execute()
                    .try_collect()
                    .await
                    .map_err(req("dumping neighbours"))?;
                for m in msgs {
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
            let fdb: Vec<NeighbourMessage> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(AddressFamily::Bridge)
                .execute()
                .try_collect()
                .await
                .map_err(req("dumping the FDB"))?;
            for m in fdb {
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

        for route in self.main_routes().await? {
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
        Ok(state)
    }

    async fn main_routes(&self) -> Result<Vec<RouteMessage>, NetlinkError> {
        let mut all = Vec::new();
        for family_msg in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(family_msg)
                .execute()
                .try_collect()
                .await
                .map_err(req("dumping routes"))?;
            all.extend(
                msgs.into_iter()
                    .filter(|m| route_table(m) == u32::from(RouteHeader::RT_TABLE_MAIN)),
            );
        }
        Ok(all)
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

    /// `ip route replace blackhole <subnet> metric 4294967295`: Flannel's
    /// `--ip-blackhole-route`, so traffic to the node's own subnet is dropped instead of
    /// leaving by the default route while the bridge's route is missing.
    pub async fn ensure_blackhole(&self, subnet: IpNet) -> Result<(), NetlinkError> {
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(subnet.addr(), subnet.prefix_len())
            .map_err(|e| NetlinkError::Invalid(format!("blackhole route {subnet}: {e:?}")))?
            .kind(RouteType::BlackHole)
            .protocol(RouteProtocol::Boot)
            // The worst metric: the bridge's connected route to the same subnet (metric 0)
            // must keep winning for addresses that are in use.
            .priority(u32::MAX)
            .build();
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(req(format!("ip route replace blackhole {subnet}")))
    }

    /// Applies ops in order, carrying on past failures: one bad peer must not keep the others
    /// from being programmed. Failed ops are returned with their errors; the next resync
    /// retries them.
    ///
    /// Ops of one phase ([`Op::phase`]) are pipelined on the socket, up to
    /// [`APPLY_CONCURRENCY`] in flight, instead of waiting for each acknowledgement in turn:
    /// with 1000 peers that is the difference between 3000 round trips and a few dozen.
    pub async fn apply(&self, links: &LinkMap, ops: &[Op]) -> Vec<(Op, NetlinkError)> {
        use futures::StreamExt;
        let mut failed = Vec::new();
        for phase in ops.chunk_by(|a, b| a.phase() == b.phase()) {
            let results: Vec<(Op, Result<(), NetlinkError>)> = futures::stream::iter(phase)
                .map(|op| async move { (op.clone(), self.apply_one(links, op).await) })
                .buffer_unordered(APPLY_CONCURRENCY)
                .collect()
                .await;
            failed.extend(
                results
                    .into_iter()
                    .filter_map(|(op, r)| r.err().map(|e| (op, e))),
            );
        }
        failed
    }

    async fn apply_one(&self, links: &LinkMap, op: &Op) -> Result<(), NetlinkError> {
        let index = |link: LinkRef| {
            links
                .index(link)
                .ok_or_else(|| NetlinkError::Invalid(format!("no device for {link:?}")))
        };
        match *op {
            Op::SetNeighbour { link, ip, mac } => self
                .handle
                .neighbours()
                .add(index(link)?, ip)
                .link_layer_address(&mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(req(format!(
                    "ip neigh replace {ip} lladdr {mac} nud permanent"
                ))),
            Op::SetFdb { link, mac, dst } => self
                .handle
                .neighbours()
                .add_bridge(index(link)?, &mac.0)
                .flags(NeighbourFlags::Own)
                .destination(dst)
                .replace()
                .execute()
                .await
                .map_err(req(format!(
                    "bridge fdb replace {mac} dst {dst} self permanent"
                ))),
            Op::SetRoute(r) => self
                .handle
                .route()
                .add(route_message(&r, index(r.link)?, RouteProtocol::Boot)?)
                .replace()
                .execute()
                .await
                .map_err(req(format!("ip route replace {} via {}", r.dst, r.gateway))),
            Op::DelRoute(r) => ignore_missing(
                self.handle
                    .route()
                    .del(route_message(&r, index(r.link)?, RouteProtocol::Unspec)?)
                    .execute()
                    .await,
            )
            .map_err(req(format!("ip route del {} via {}", r.dst, r.gateway))),
            Op::DelNeighbour { link, ip, .. } => {
                let mut msg = NeighbourMessage::default();
                msg.header.family = if ip.is_ipv4() {
                    AddressFamily::Inet
                } else {
                    AddressFamily::Inet6
                };
                msg.header.ifindex = index(link)?;
                msg.attributes
                    .push(NeighbourAttribute::Destination(match ip {
                        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
                    }));
                ignore_missing(self.handle.neighbours().del(msg).execute().await)
                    .map_err(req(format!("ip neigh del {ip}")))
            }
            Op::DelFdb { link, mac, dst } => {
                let mut msg = NeighbourMessage::default();
                msg.header.family = AddressFamily::Bridge;
                msg.header.ifindex = index(link)?;
                msg.header.flags = NeighbourFlags::Own;
                msg.header.state = NeighbourState::Permanent;
                msg.attributes
                    .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
                msg.attributes
                    .push(NeighbourAttribute::Destination(match dst {
                        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
                    }));
                ignore_missing(self.handle.neighbours().del(msg).execute().await)
                    .map_err(req(format!("bridge fdb del {mac} dst {dst}")))
            }
        }
    }
}

fn is_errno(e: &rtnetlink::Error, codes: &[i32]) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.is_some_and(|c| codes.contains(&-c.get())))
}

/// Deleting what is already gone is success: the effector is idempotent.
fn ignore_missing(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(e) if is_errno(&e, &[ENOENT, ESRCH]) => Ok(()),
        other => other,
    }
}

fn neighbour_ip_mac(m: &NeighbourMessage) -> (Option<IpAddr>, Option<MacAddr>) {
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
            NeighbourAttribute::LinkLayerAddress(b) => mac = MacAddr::from_slice(b),
            _ => {}
        }
    }
    (ip, mac)
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(b) = <[u8; 4]>::try_from(bytes) {
        Some(IpAddr::from(b))
    } else if let Ok(b) = <[u8; 16]>::try_from(bytes) {
        Some(IpAddr::from(b))
    } else {
        None
    }
}

fn route_table(m: &RouteMessage) -> u32 {
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

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A dumped route as a [`RouteEntry`], if it is a unicast gateway route on one of twill's links.
fn route_entry(m: &RouteMessage, links: &LinkMap) -> Option<RouteEntry> {
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

fn route_message(
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
