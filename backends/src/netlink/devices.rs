//! Links and their addresses: lookups by name or index, MTU and up, the one address
//! `flannel.<VNI>` holds, and the blackhole route for the node's own subnet.

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteProtocol, RouteType};
use rtnetlink::{LinkUnspec, RouteMessageBuilder};
use std::net::IpAddr;

use super::{is_errno, req, Netlink, NetlinkError};
use twill_formats::Mac;

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

impl Netlink {
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
    /// any other address inside the flannel networks, as Flannel does for `flannel.<VNI>`.
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
}
