//! External interface and public IP selection, as flanneld does it: `--iface` entries in
//! order (name or IP), then `--iface-regex` (matched against addresses first, then names), then
//! `--iface-can-reach`, else the interface holding `--public-ip`, else the default route's.
//! The choice is a pure function of a snapshot of links, addresses and routes.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use regex::Regex;

use twill_backends::netlink::{Netlink, NetlinkError};

/// One link as the selection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfaceInfo {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub addrs: Vec<IpNet>,
}

/// A snapshot of the node's interfaces and IPv4 routes (main table).
#[derive(Clone, Debug, Default)]
pub struct NetSnapshot {
    pub links: Vec<IfaceInfo>,
    /// (destination, output ifindex) for main-table IPv4 routes; the default route is /0.
    pub routes_v4: Vec<(IpNet, u32)>,
}

/// The chosen external interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalInterface {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// The interface's own IPv4 address.
    pub iface_addr: Ipv4Addr,
    /// What peers use to reach this node: `--public-ip`, or the interface address.
    pub public_ip: Ipv4Addr,
    /// The interface's addresses with their prefix lengths (both families).
    pub addrs: Vec<IpNet>,
    /// Connected prefixes on the interface (for on-link checks).
    pub prefixes: Vec<IpNet>,
}

impl ExternalInterface {
    /// The first global IPv6 address (not link-local), for the v6 tunnel endpoint.
    pub fn global_ipv6(&self) -> Option<std::net::Ipv6Addr> {
        self.addrs.iter().find_map(|a| match a.addr() {
            IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) != 0xfe80 && !v6.is_loopback() => {
                Some(v6)
            }
            _ => None,
        })
    }
}

pub struct Selection<'a> {
    pub iface: &'a [String],
    pub iface_regex: &'a [String],
    pub iface_can_reach: Option<IpAddr>,
    pub public_ip: Option<Ipv4Addr>,
}

pub const NO_MATCH: &str =
    "Failed to find interface to use that matches the interfaces and/or regexes provided";

/// The first usable IPv4 address: global unicast before link-local.
fn first_v4(link: &IfaceInfo) -> Option<Ipv4Addr> {
    let v4 = || {
        link.addrs.iter().filter_map(|a| match a.addr() {
            IpAddr::V4(v4) if !v4.is_loopback() => Some(v4),
            _ => None,
        })
    };
    v4().find(|a| !a.is_link_local()).or_else(|| v4().next())
}

fn found(link: &IfaceInfo, public_ip: Option<Ipv4Addr>) -> Option<ExternalInterface> {
    let iface_addr = first_v4(link)?;
    Some(ExternalInterface {
        index: link.index,
        name: link.name.clone(),
        mtu: link.mtu,
        iface_addr,
        public_ip: public_ip.unwrap_or(iface_addr),
        addrs: link.addrs.clone(),
        prefixes: link.addrs.iter().map(|a| a.trunc()).collect(),
    })
}

fn link_with_addr(snap: &NetSnapshot, ip: IpAddr) -> Option<&IfaceInfo> {
    snap.links
        .iter()
        .find(|l| l.addrs.iter().any(|a| a.addr() == ip))
}

/// Why no external interface was picked; the texts are Flannel's where it has one.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("invalid --iface-regex {pattern:?}: {error}")]
    InvalidRegex {
        pattern: String,
        error: regex::Error,
    },
    /// `--iface`, `--iface-regex` or `--iface-can-reach` was given and nothing matched.
    #[error("{NO_MATCH}")]
    NoMatch,
    #[error("failed to get interface for public IP {0}: no interface holds that address")]
    NoInterfaceForPublicIp(Ipv4Addr),
    #[error("failed to get default interface: no default route (use --iface or --public-ip)")]
    NoDefaultRoute,
    #[error("failed to get default interface: link #{0} has no IPv4 address")]
    DefaultLinkWithoutIpv4(u32),
}

/// Picks the external interface; errors carry Flannel's texts.
pub fn select(snap: &NetSnapshot, sel: &Selection) -> Result<ExternalInterface, SelectError> {
    let explicit =
        !sel.iface.is_empty() || !sel.iface_regex.is_empty() || sel.iface_can_reach.is_some();
    for want in sel.iface {
        let link = match want.parse::<IpAddr>() {
            Ok(ip) => link_with_addr(snap, ip),
            Err(_) => snap.links.iter().find(|l| &l.name == want),
        };
        match link.and_then(|l| found(l, sel.public_ip)) {
            Some(mut ext) => {
                if let Ok(IpAddr::V4(ip)) = want.parse::<IpAddr>() {
                    ext.iface_addr = ip;
                    ext.public_ip = sel.public_ip.unwrap_or(ip);
                }
                return Ok(ext);
            }
            None => tracing::warn!(iface = %want, "could not use interface"),
        }
    }
    for pattern in sel.iface_regex {
        let re = Regex::new(pattern).map_err(|error| SelectError::InvalidRegex {
            pattern: pattern.clone(),
            error,
        })?;
        for link in &snap.links {
            if let Some(a) = link
                .addrs
                .iter()
                .find(|a| a.addr().is_ipv4() && re.is_match(&a.addr().to_string()))
            {
                if let (Some(mut ext), IpAddr::V4(ip)) = (found(link, sel.public_ip), a.addr()) {
                    ext.iface_addr = ip;
                    ext.public_ip = sel.public_ip.unwrap_or(ip);
                    return Ok(ext);
                }
            }
        }
        if let Some(ext) = snap
            .links
            .iter()
            .filter(|l| re.is_match(&l.name))
            .find_map(|l| found(l, sel.public_ip))
        {
            return Ok(ext);
        }
    }
    if let Some(target) = sel.iface_can_reach {
        let best = snap
            .routes_v4
            .iter()
            .filter(|(dst, _)| dst.contains(&target))
            .max_by_key(|(dst, _)| dst.prefix_len());
        if let Some(ext) = best
            .and_then(|(_, oif)| snap.links.iter().find(|l| l.index == *oif))
            .and_then(|l| found(l, sel.public_ip))
        {
            return Ok(ext);
        }
    }
    if explicit {
        return Err(SelectError::NoMatch);
    }
    if let Some(public) = sel.public_ip {
        return link_with_addr(snap, IpAddr::V4(public))
            .and_then(|l| found(l, Some(public)))
            .ok_or(SelectError::NoInterfaceForPublicIp(public));
    }
    let default_oif = snap
        .routes_v4
        .iter()
        .find(|(dst, _)| dst.prefix_len() == 0)
        .map(|(_, oif)| *oif)
        .ok_or(SelectError::NoDefaultRoute)?;
    snap.links
        .iter()
        .find(|l| l.index == default_oif)
        .and_then(|l| found(l, None))
        .ok_or(SelectError::DefaultLinkWithoutIpv4(default_oif))
}

/// Reads links, addresses and IPv4 main-table routes through netlink.
pub async fn snapshot(nl: &Netlink) -> Result<NetSnapshot, NetlinkError> {
    let links = nl.links().await?;
    let addrs = nl.addresses(None).await?;
    let routes_v4 = nl.main_routes_v4_oif().await?;
    Ok(NetSnapshot {
        links: links
            .into_iter()
            .map(|l| IfaceInfo {
                index: l.index,
                addrs: addrs
                    .iter()
                    .filter(|(i, _)| *i == l.index)
                    .map(|(_, a)| *a)
                    .collect(),
                name: l.name,
                mtu: l.mtu,
            })
            .collect(),
        routes_v4,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> NetSnapshot {
        NetSnapshot {
            links: vec![
                IfaceInfo {
                    index: 1,
                    name: "lo".into(),
                    mtu: 65536,
                    addrs: vec!["127.0.0.1/8".parse().unwrap()],
                },
                IfaceInfo {
                    index: 2,
                    name: "eth0".into(),
                    mtu: 1500,
                    addrs: vec!["198.18.0.11/24".parse().unwrap()],
                },
                IfaceInfo {
                    index: 3,
                    name: "eth1".into(),
                    mtu: 9000,
                    addrs: vec![
                        "169.254.3.3/16".parse().unwrap(),
                        "198.19.7.11/24".parse().unwrap(),
                    ],
                },
            ],
            routes_v4: vec![
                ("0.0.0.0/0".parse().unwrap(), 2),
                ("198.18.0.0/24".parse().unwrap(), 2),
                ("198.19.7.0/24".parse().unwrap(), 3),
                ("198.19.0.0/16".parse().unwrap(), 2),
            ],
        }
    }

    fn sel<'a>(iface: &'a [String], regex: &'a [String]) -> Selection<'a> {
        Selection {
            iface,
            iface_regex: regex,
            iface_can_reach: None,
            public_ip: None,
        }
    }

    #[test]
    fn default_route_interface_without_options() {
        let ext = select(&snap(), &sel(&[], &[])).unwrap();
        assert_eq!(
            (
                ext.name.as_str(),
                ext.public_ip.to_string().as_str(),
                ext.mtu
            ),
            ("eth0", "198.18.0.11", 1500)
        );
    }

    #[test]
    fn iface_by_name_or_ip_in_order_and_global_address_preferred() {
        let ext = select(&snap(), &sel(&["nope".into(), "eth1".into()], &[])).unwrap();
        assert_eq!(ext.name, "eth1");
        assert_eq!(ext.iface_addr.to_string(), "198.19.7.11");
        let ext = select(&snap(), &sel(&["198.18.0.11".into()], &[])).unwrap();
        assert_eq!(ext.name, "eth0");
    }

    #[test]
    fn regex_matches_addresses_then_names() {
        let ext = select(&snap(), &sel(&[], &[r"^198\.19\.".into()])).unwrap();
        assert_eq!(ext.name, "eth1");
        let ext = select(&snap(), &sel(&[], &["^eth0$".into()])).unwrap();
        assert_eq!(ext.name, "eth0");
    }

    #[test]
    fn can_reach_uses_longest_prefix() {
        let mut s = sel(&[], &[]);
        s.iface_can_reach = Some("198.19.7.200".parse().unwrap());
        assert_eq!(select(&snap(), &s).unwrap().name, "eth1");
        s.iface_can_reach = Some("198.19.8.1".parse().unwrap());
        assert_eq!(select(&snap(), &s).unwrap().name, "eth0");
    }

    #[test]
    fn nothing_matched_is_flannels_error() {
        assert_eq!(
            select(&snap(), &sel(&["wlan9".into()], &[]))
                .unwrap_err()
                .to_string(),
            NO_MATCH
        );
        assert_eq!(
            select(&snap(), &sel(&[], &["^zz".into()]))
                .unwrap_err()
                .to_string(),
            NO_MATCH
        );
    }

    #[test]
    fn public_ip_selects_the_interface_holding_it_or_overrides_advertised_ip() {
        let mut s = sel(&[], &[]);
        s.public_ip = Some("198.19.7.11".parse().unwrap());
        assert_eq!(select(&snap(), &s).unwrap().name, "eth1");
        s.public_ip = Some("203.0.113.1".parse().unwrap());
        assert!(select(&snap(), &s)
            .unwrap_err()
            .to_string()
            .contains("203.0.113.1"));
        let iface = ["eth0".to_string()];
        let mut s = sel(&iface, &[]);
        s.public_ip = Some("203.0.113.1".parse().unwrap());
        let ext = select(&snap(), &s).unwrap();
        assert_eq!(
            (ext.iface_addr.to_string(), ext.public_ip.to_string()),
            ("198.18.0.11".into(), "203.0.113.1".into())
        );
    }
}
