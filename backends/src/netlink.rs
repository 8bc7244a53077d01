//! The effector: a thin, idempotent facade over rtnetlink. It observes the entries twill owns
//! and applies [`Op`]s; it never decides anything. Every write is a `replace`, so applying the
//! same op twice, or after a crash half-way through a batch, is harmless.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_core::{
    ErrorMessage, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
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
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys as netlink_sys;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::desired::Topology;
use crate::model::{DataplaneState, LinkRef, RouteEntry};
use crate::reconcile::Op;
use twill_formats::Mac;

/// Requests of one phase [`Netlink::apply`] sends in one datagram. The kernel handles them in
/// order within that one `send` and queues an acknowledgement for each; this many fit the
/// socket's receive buffer with room to spare.
pub const APPLY_BATCH: usize = 64;

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
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
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
    pub mac: Option<Mac>,
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
            LinkAttribute::Address(a) => st.mac = Mac::from_slice(&a),
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
    /// The plain socket [`Netlink::apply`] sends its batches on.
    batcher: Arc<Mutex<Batcher>>,
}

impl Netlink {
    /// Opens a connection; must be called inside a tokio runtime.
    pub fn connect() -> Result<Netlink, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        let batcher = Arc::new(Mutex::new(Batcher::open()?));
        Ok(Netlink { handle, batcher })
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
    /// Ops of one phase ([`Op::phase`]) go to the kernel [`APPLY_BATCH`] to a datagram on a
    /// plain socket, from a blocking thread: with 1000 peers that is a few dozen sends instead
    /// of 3000 round trips, and none of the per-request machinery of an async connection.
    pub async fn apply(&self, links: &LinkMap, ops: &[Op]) -> Vec<(Op, NetlinkError)> {
        if ops.is_empty() {
            return Vec::new();
        }
        let (links, owned, batcher) = (*links, ops.to_vec(), self.batcher.clone());
        let job = tokio::task::spawn_blocking(move || {
            let mut batcher = batcher.lock().unwrap_or_else(|p| p.into_inner());
            apply_batched(&mut batcher, &links, &owned)
        });
        match job.await {
            Ok(failed) => failed,
            Err(e) => ops
                .iter()
                .map(|op| {
                    let source = std::io::Error::other(e.to_string());
                    (
                        op.clone(),
                        NetlinkError::Io {
                            what: describe(op),
                            source,
                        },
                    )
                })
                .collect(),
        }
    }
}

/// `ip`/`bridge` commands with the effect of `op`, for error messages.
fn describe(op: &Op) -> String {
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

fn neighbour_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

/// The request that applies `op`: the message and flags rtnetlink's `add(..).replace()` and
/// `del(..)` builders send (every write a replace, so applying an op twice is harmless).
fn request(links: &LinkMap, op: &Op) -> Result<NetlinkMessage<RouteNetlinkMessage>, NetlinkError> {
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

/// [`Netlink::apply`] on the blocking thread: phase by phase, [`APPLY_BATCH`] requests at a
/// time. Deleting what is already gone is success (the effector is idempotent).
fn apply_batched(batcher: &mut Batcher, links: &LinkMap, ops: &[Op]) -> Vec<(Op, NetlinkError)> {
    let mut failed = Vec::new();
    for phase in ops.chunk_by(|a, b| a.phase() == b.phase()) {
        for chunk in phase.chunks(APPLY_BATCH) {
            let mut sent = Vec::with_capacity(chunk.len());
            let mut requests = Vec::with_capacity(chunk.len());
            for op in chunk {
                match request(links, op) {
                    Ok(r) => {
                        sent.push(op);
                        requests.push(r);
                    }
                    Err(e) => failed.push((op.clone(), e)),
                }
            }
            for (op, outcome) in sent.into_iter().zip(batcher.exchange(&mut requests)) {
                let delete = matches!(
                    op,
                    Op::DelRoute(_) | Op::DelNeighbour { .. } | Op::DelFdb { .. }
                );
                let error = match outcome {
                    Ok(()) => continue,
                    Err(Failure::Kernel(e)) => {
                        let errno = e.code.map(|c| -c.get());
                        if delete && errno.is_some_and(|c| c == ENOENT || c == ESRCH) {
                            continue;
                        }
                        NetlinkError::Request {
                            what: describe(op),
                            source: rtnetlink::Error::NetlinkError(e),
                        }
                    }
                    Err(Failure::Io(source)) => NetlinkError::Io {
                        what: describe(op),
                        source,
                    },
                };
                failed.push((op.clone(), error));
            }
        }
    }
    failed
}

/// Records the acknowledgements in one received datagram: request `i` of the batch was sent
/// with sequence number `base + i`. Anything else (a late answer to an earlier batch, a
/// second answer) is ignored. Returns how many requests got their answer.
fn record_acks(datagram: &[u8], base: u32, outcomes: &mut [Option<Result<(), Failure>>]) -> usize {
    let mut answered = 0;
    let mut buf = datagram;
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            break;
        }
        if let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len]) {
            let i = msg.header.sequence_number.wrapping_sub(base) as usize;
            if let (Some(slot @ None), NetlinkPayload::Error(e)) =
                (outcomes.get_mut(i), msg.payload)
            {
                *slot = Some(match e.code {
                    None => Ok(()),
                    Some(_) => Err(Failure::Kernel(e)),
                });
                answered += 1;
            }
        }
        // NLMSG_ALIGN: messages in a datagram start on 4-byte boundaries.
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    answered
}

/// Why one request of a batch failed.
enum Failure {
    /// The kernel's NACK.
    Kernel(ErrorMessage),
    /// No acknowledgement: the send failed, or the acknowledgement was lost.
    Io(std::io::Error),
}

/// A plain (blocking) rtnetlink socket: requests are sent many to a datagram, which the
/// kernel handles in order within the `send`, queueing one acknowledgement per request.
struct Batcher {
    socket: netlink_sys::Socket,
    /// Sequence number of the next request.
    seq: u32,
    recv: Vec<u8>,
    send: Vec<u8>,
}

impl Batcher {
    fn open() -> std::io::Result<Batcher> {
        let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        // NACKs carry the request's header only, not the whole request.
        socket.set_cap_ack(true)?;
        // Acknowledgements are queued before `send` returns; a receive that would wait means
        // they were lost (the kernel drops what overflows the buffer), so never wait long.
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(1, 0),
        )
        .map_err(std::io::Error::from)?;
        Ok(Batcher {
            socket,
            seq: 1,
            recv: Vec::with_capacity(64 * 1024),
            send: Vec::new(),
        })
    }

    /// Sends `requests` as one datagram and returns each one's outcome, in order.
    fn exchange(
        &mut self,
        requests: &mut [NetlinkMessage<RouteNetlinkMessage>],
    ) -> Vec<Result<(), Failure>> {
        let n = requests.len();
        let base = self.seq;
        self.seq = base.wrapping_add(n as u32);
        self.send.clear();
        for (i, r) in requests.iter_mut().enumerate() {
            r.header.sequence_number = base.wrapping_add(i as u32);
            r.finalize();
            let start = self.send.len();
            self.send.resize(start + r.buffer_len(), 0);
            r.serialize(&mut self.send[start..]);
        }
        let mut outcomes: Vec<Option<Result<(), Failure>>> = (0..n).map(|_| None).collect();
        let mut pending = n;
        let mut lost = None;
        if n > 0 {
            if let Err(e) = self.socket.send(&self.send, 0) {
                lost = Some(e);
                pending = 0;
            }
        }
        while pending > 0 {
            self.recv.clear();
            if let Err(e) = self.socket.recv(&mut self.recv, 0) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // ENOBUFS (acknowledgements dropped) or the timeout: whatever is still
                // unanswered failed, and the next pass retries it.
                lost = Some(e);
                break;
            }
            pending -= record_acks(&self.recv, base, &mut outcomes);
        }
        let lost = lost.map(|e| (e.kind(), e.to_string()));
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(Failure::Io(match &lost {
                        Some((kind, text)) => std::io::Error::new(*kind, text.clone()),
                        None => std::io::Error::other("no acknowledgement"),
                    }))
                })
            })
            .collect()
    }
}

fn is_errno(e: &rtnetlink::Error, codes: &[i32]) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.is_some_and(|c| codes.contains(&-c.get())))
}

fn neighbour_ip_mac(m: &NeighbourMessage) -> (Option<IpAddr>, Option<Mac>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroI32;

    use rtnetlink::packet_core::{NetlinkHeader, NLM_F_ACK, NLM_F_REQUEST};

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

    fn ack(seq: u32, errno: i32) -> Vec<u8> {
        let mut e = ErrorMessage::default();
        e.code = NonZeroI32::new(-errno);
        e.header = vec![0; 16];
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        let mut m = NetlinkMessage::<RouteNetlinkMessage>::new(header, NetlinkPayload::Error(e));
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    #[test]
    fn acknowledgements_are_matched_to_requests_by_sequence_number() {
        // A batch of four whose sequence numbers wrap around.
        let base = u32::MAX - 1;
        let mut outcomes: Vec<Option<Result<(), Failure>>> = (0..4).map(|_| None).collect();
        // One datagram holding several answers, out of order, with a late answer to an
        // earlier batch and a duplicate mixed in.
        let mut datagram = ack(base.wrapping_add(2), 0);
        datagram.extend(ack(base - 10, 0));
        datagram.extend(ack(base, ENOENT));
        datagram.extend(ack(base.wrapping_add(2), EEXIST));
        assert_eq!(record_acks(&datagram, base, &mut outcomes), 2);
        assert_eq!(record_acks(&ack(base + 1, 0), base, &mut outcomes), 1);
        assert!(
            matches!(&outcomes[0], Some(Err(Failure::Kernel(e))) if e.code.map(|c| c.get()) == Some(-ENOENT))
        );
        assert!(matches!(outcomes[1], Some(Ok(()))));
        assert!(matches!(outcomes[2], Some(Ok(()))));
        assert!(outcomes[3].is_none());
        // A truncated datagram is not misread.
        let partial = ack(base.wrapping_add(3), 0);
        assert_eq!(
            record_acks(&partial[..partial.len() - 4], base, &mut outcomes),
            0
        );
    }
}
