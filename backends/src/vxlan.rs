//! `flannel.<VNI>` and `flannel-v6.<VNI>`: the VXLAN devices, created or reused as Flannel does.
//!
//! A device that already exists with a compatible configuration is kept as it is, MAC and
//! entries included, so a restarted daemon does not disturb traffic; an incompatible one is
//! deleted and recreated.

use std::net::IpAddr;

use ipnet::IpNet;
use rtnetlink::packet_route::link::InfoVxlan;
use rtnetlink::LinkVxlan;

use crate::netlink::{LinkState, Netlink, NetlinkError, EEXIST};
use twill_formats::Mac;

/// The kernel's VXLAN port when none is configured (IANA's is 4789; Linux and Flannel use 8472).
pub const KERNEL_DEFAULT_PORT: u16 = 8472;
/// Outer IPv4 + UDP + VXLAN + inner Ethernet headers, subtracted from the underlay MTU.
pub const ENCAP_OVERHEAD: u32 = 50;
/// The same over an IPv6 underlay (40-byte outer header instead of 20).
pub const ENCAP_OVERHEAD_IPV6: u32 = 70;

/// `flannel.<VNI>` (IPv4) or `flannel-v6.<VNI>` (IPv6).
pub fn device_name(vni: u32, ipv6: bool) -> String {
    if ipv6 {
        format!("flannel-v6.{vni}")
    } else {
        format!("flannel.{vni}")
    }
}

/// How a VXLAN device must be configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    /// The tunnel's local address: the node's public IP of that family.
    pub local: IpAddr,
    /// ifindex of the external interface (`dev`).
    pub external_index: u32,
    /// 0 means the kernel default, 8472.
    pub port: u16,
    pub gbp: bool,
    pub learning: bool,
    pub mtu: u32,
    /// The MAC to create the device with (a restarted node keeps the one it advertised).
    pub mac: Mac,
}

impl VxlanSpec {
    fn effective_port(&self) -> u16 {
        if self.port == 0 {
            KERNEL_DEFAULT_PORT
        } else {
            self.port
        }
    }
}

/// Why an existing link cannot be reused for `spec`, or `None` if it can. The fields compared
/// are Flannel's (type, VNI, underlay device, local address, port, GBP, no l2miss, no group),
/// plus learning, which twill also configures.
pub fn incompatibility(spec: &VxlanSpec, link: &LinkState) -> Option<String> {
    if link.kind.as_deref() != Some("vxlan") {
        return Some(format!(
            "{} is a {} link, not vxlan",
            spec.name,
            link.kind.as_deref().unwrap_or("unknown")
        ));
    }
    let mut vni = None;
    let mut dev = None;
    let mut local = None;
    let mut port = None;
    let mut gbp = false;
    let mut learning = None;
    let mut l2miss = false;
    let mut group = false;
    for attr in &link.vxlan {
        match attr {
            InfoVxlan::Id(v) => vni = Some(*v),
            InfoVxlan::Link(i) => dev = Some(*i),
            InfoVxlan::Local(a) => local = Some(IpAddr::V4(*a)),
            InfoVxlan::Local6(a) => local = Some(IpAddr::V6(*a)),
            InfoVxlan::Port(p) => port = Some(*p),
            InfoVxlan::Gbp => gbp = true,
            InfoVxlan::Learning(l) => learning = Some(*l),
            InfoVxlan::L2Miss(m) => l2miss = *m,
            InfoVxlan::Group(g) => group = !g.is_unspecified(),
            InfoVxlan::Group6(g) => group = group || !g.is_unspecified(),
            _ => {}
        }
    }
    let mismatch =
        |what: &str, have: String, want: String| Some(format!("{what} is {have}, want {want}"));
    if vni != Some(spec.vni) {
        return mismatch("vni", format!("{vni:?}"), spec.vni.to_string());
    }
    if dev != Some(spec.external_index) {
        return mismatch(
            "underlay device index",
            format!("{dev:?}"),
            spec.external_index.to_string(),
        );
    }
    if local != Some(spec.local) {
        return mismatch(
            "local address",
            format!("{local:?}"),
            spec.local.to_string(),
        );
    }
    if port.unwrap_or(KERNEL_DEFAULT_PORT) != spec.effective_port() {
        return mismatch(
            "port",
            format!("{port:?}"),
            spec.effective_port().to_string(),
        );
    }
    if gbp != spec.gbp {
        return mismatch("gbp", gbp.to_string(), spec.gbp.to_string());
    }
    if learning.unwrap_or(true) != spec.learning {
        return mismatch(
            "learning",
            format!("{learning:?}"),
            spec.learning.to_string(),
        );
    }
    if l2miss {
        return Some("l2miss is on".into());
    }
    if group {
        return Some("a multicast group is set".into());
    }
    None
}

/// A device ready for entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanDevice {
    pub index: u32,
    pub mac: Mac,
    /// True when an existing compatible device was kept.
    pub reused: bool,
}

/// Makes sure the device exists as `spec` says, is up with the right MTU, and carries
/// `address` (the lease's base as /32 or /128) as its only address inside `networks`.
/// An existing compatible device keeps its MAC, which is returned for the lease.
pub async fn ensure_device(
    nl: &Netlink,
    spec: &VxlanSpec,
    address: Option<IpNet>,
    networks: &[IpNet],
) -> Result<VxlanDevice, NetlinkError> {
    let mut reused = false;
    let existing = nl.link_by_name(&spec.name).await?;
    let link = match existing {
        Some(link) => match incompatibility(spec, &link) {
            None => {
                reused = true;
                link
            }
            Some(why) => {
                tracing::warn!(device = %spec.name, %why, "device exists with incompatible configuration; recreating it");
                nl.delete_link(link.index).await?;
                create(nl, spec).await?
            }
        },
        None => create(nl, spec).await?,
    };
    nl.set_mtu_up(link.index, spec.mtu).await?;
    if let Some(addr) = address {
        nl.ensure_sole_address(link.index, addr, networks).await?;
    }
    disable_accept_ra(&spec.name);
    let now = nl.link_by_index(link.index).await?.ok_or_else(|| {
        NetlinkError::Invalid(format!("{} vanished while being configured", spec.name))
    })?;
    let mac = now
        .mac
        .ok_or_else(|| NetlinkError::Invalid(format!("{} has no MAC address", spec.name)))?;
    if !reused && mac != spec.mac {
        // Flannel's check for udev/systemd MACAddressPolicy=random rewriting the MAC.
        return Err(NetlinkError::Invalid(format!(
            "{}'s mac address wanted: {}, but got: {}",
            spec.name, spec.mac, mac
        )));
    }
    Ok(VxlanDevice {
        index: link.index,
        mac,
        reused,
    })
}

async fn create(nl: &Netlink, spec: &VxlanSpec) -> Result<LinkState, NetlinkError> {
    let mut b = LinkVxlan::new(&spec.name, spec.vni)
        .dev(spec.external_index)
        .learning(spec.learning);
    b = match spec.local {
        IpAddr::V4(a) => b.local(a),
        IpAddr::V6(a) => b.local6(a),
    };
    if spec.port != 0 {
        b = b.port(spec.port);
    }
    if spec.gbp {
        b = b.gbp();
    }
    let msg = b.address(spec.mac.0.to_vec()).mtu(spec.mtu).build();
    match nl.handle().link().add(msg).execute().await {
        Ok(()) => {}
        Err(rtnetlink::Error::NetlinkError(e)) if e.code.is_some_and(|c| -c.get() == EEXIST) => {
            // Created concurrently (or by a previous attempt): fall through and read it.
        }
        Err(e) => {
            return Err(NetlinkError::Request {
                what: format!("creating vxlan device {}", spec.name),
                source: e,
            })
        }
    }
    nl.link_by_name(&spec.name)
        .await?
        .ok_or_else(|| NetlinkError::Invalid(format!("{} missing right after creation", spec.name)))
}

/// Flannel sets `net/ipv6/conf/<dev>/accept_ra = 0`: router advertisements arriving through
/// the overlay must never configure the host.
fn disable_accept_ra(dev: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{dev}/accept_ra");
    if std::path::Path::new(&path).exists() {
        if let Err(e) = std::fs::write(&path, "0") {
            tracing::warn!(%path, error = %e, "could not disable accept_ra");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn spec() -> VxlanSpec {
        VxlanSpec {
            name: "flannel.1".into(),
            vni: 1,
            local: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11)),
            external_index: 2,
            port: 0,
            gbp: false,
            learning: false,
            mtu: 1450,
            mac: Mac([0x0a, 0, 0, 0, 0, 1]),
        }
    }

    fn link(attrs: Vec<InfoVxlan>) -> LinkState {
        LinkState {
            index: 5,
            name: "flannel.1".into(),
            mtu: 1450,
            mac: None,
            up: true,
            kind: Some("vxlan".into()),
            vxlan: attrs,
        }
    }

    fn good_attrs() -> Vec<InfoVxlan> {
        vec![
            InfoVxlan::Id(1),
            InfoVxlan::Link(2),
            InfoVxlan::Local(Ipv4Addr::new(198, 18, 0, 11)),
            InfoVxlan::Learning(false),
            InfoVxlan::Port(8472),
            InfoVxlan::UDPCsum(true),
        ]
    }

    #[test]
    fn names_follow_flannel() {
        assert_eq!(device_name(1, false), "flannel.1");
        assert_eq!(device_name(4096, true), "flannel-v6.4096");
    }

    #[test]
    fn compatible_device_is_reused_with_default_port() {
        assert_eq!(incompatibility(&spec(), &link(good_attrs())), None);
    }

    #[test]
    fn each_changed_field_makes_it_incompatible() {
        type Mutation = Box<dyn Fn(&mut Vec<InfoVxlan>)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|a| a[0] = InfoVxlan::Id(2)), "vni"),
            (Box::new(|a| a[1] = InfoVxlan::Link(3)), "underlay"),
            (
                Box::new(|a| a[2] = InfoVxlan::Local(Ipv4Addr::new(198, 18, 0, 99))),
                "local",
            ),
            (Box::new(|a| a[3] = InfoVxlan::Learning(true)), "learning"),
            (Box::new(|a| a[4] = InfoVxlan::Port(4789)), "port"),
            (Box::new(|a| a.push(InfoVxlan::Gbp)), "gbp"),
            (Box::new(|a| a.push(InfoVxlan::L2Miss(true))), "l2miss"),
            (
                Box::new(|a| a.push(InfoVxlan::Group(Ipv4Addr::new(239, 1, 1, 1)))),
                "group",
            ),
        ];
        for (mutate, word) in cases {
            let mut attrs = good_attrs();
            mutate(&mut attrs);
            let why = incompatibility(&spec(), &link(attrs)).expect(word);
            assert!(why.contains(word), "{why} should mention {word}");
        }
        let mut not_vxlan = link(good_attrs());
        not_vxlan.kind = Some("veth".into());
        assert!(incompatibility(&spec(), &not_vxlan)
            .unwrap()
            .contains("not vxlan"));
    }
}
