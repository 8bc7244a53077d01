//! Plain data shared by the pure core and the effector. Entries name links by role
//! ([`LinkRef`]), not by ifindex, so the desired state can be computed and tested without a
//! kernel; the effector maps roles to indexes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use twill_formats::Mac;

/// The links twill programs, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkRef {
    /// `flannel.<VNI>`, the IPv4 VXLAN device.
    Vxlan4,
    /// `flannel-v6.<VNI>`, the IPv6 VXLAN device.
    Vxlan6,
    /// The external (underlay) interface: host-gw and DirectRouting routes leave through it.
    External,
}

/// Which dataplane the node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Vxlan { direct_routing: bool },
    HostGw,
}

impl BackendKind {
    /// The `BackendType` string peers must advertise to be programmed by this backend.
    pub fn lease_type(&self) -> &'static str {
        match self {
            BackendKind::Vxlan { .. } => "vxlan",
            BackendKind::HostGw => "host-gw",
        }
    }
}

/// One address family of a peer's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerFamily {
    /// The peer's pod subnet, e.g. 10.244.2.0/24.
    pub subnet: IpNet,
    /// The peer's public (underlay) address: VXLAN tunnel endpoint or host-gw gateway.
    pub public_ip: IpAddr,
    /// The peer's VTEP MAC for this family (VXLAN only).
    pub vtep_mac: Option<Mac>,
}

/// A peer's lease as the dataplane sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerLease {
    /// The registry key, e.g. `10.244.2.0-24`: used in logs so an operator can find the lease.
    pub name: String,
    pub backend_type: String,
    pub v4: Option<PeerFamily>,
    pub v6: Option<PeerFamily>,
}

/// A peer (or one family of it) left out of the desired state, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub peer: String,
    pub reason: String,
}

/// A route twill owns in the main table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteEntry {
    pub dst: IpNet,
    pub gateway: IpAddr,
    pub link: LinkRef,
    /// `onlink`: the gateway is not on a connected prefix (VXLAN: the peer's subnet base).
    pub onlink: bool,
}

/// The kernel state twill owns: the desired one, or the one observed through netlink
/// (filtered to twill's links and to addresses inside the flannel Network).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataplaneState {
    /// Permanent neighbour (ARP/NDP) entries: (link, IP) → MAC.
    pub neighbours: BTreeMap<(LinkRef, IpAddr), Mac>,
    /// FDB entries on VXLAN devices: (link, MAC, remote VTEP IP).
    pub fdb: BTreeSet<(LinkRef, Mac, IpAddr)>,
    /// Routes keyed by destination (the main table holds one route per destination here).
    pub routes: BTreeMap<IpNet, RouteEntry>,
}

impl DataplaneState {
    pub fn is_empty(&self) -> bool {
        self.neighbours.is_empty() && self.fdb.is_empty() && self.routes.is_empty()
    }

    /// Number of entries, for logs and metrics.
    pub fn len(&self) -> usize {
        self.neighbours.len() + self.fdb.len() + self.routes.len()
    }
}
