//! The peer table: the other nodes' leases as dataplane peers. A peer whose lease cannot be
//! used (bad JSON, values impossible for this network) is left out with its reason, so one
//! node's garbage only ever removes that node's entries.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use twill_backends::{PeerFamily, PeerLease};

use crate::registry::etcd::LeaseRecord;
use twill_formats::lease::{validate_peer, Lease, LeaseAttrs, SubnetKey};
use twill_formats::net_conf::NetConfig;

/// A lease record as a dataplane peer, or why it cannot be one (bad JSON, or values that are
/// impossible for this network: [`validate_peer`] names the key and the field).
pub(super) fn to_peer(rec: &LeaseRecord, config: &NetConfig) -> Result<PeerLease, String> {
    let attrs = rec
        .attrs
        .as_ref()
        .map_err(|e| format!("bad lease JSON: {e}"))?;
    let lease = record_to_lease(&rec.key, attrs, rec.lease_id);
    let data = validate_peer(&lease, config).map_err(|e| e.to_string())?;
    let v4 = config.enable_ipv4.then(|| PeerFamily {
        subnet: IpNet::V4(rec.key.ipv4),
        public_ip: IpAddr::V4(attrs.public_ip),
        vtep_mac: data.vxlan.map(|d| d.vtep_mac),
    });
    let v6 = match (data.use_ipv6, rec.key.ipv6, attrs.public_ipv6) {
        (true, Some(subnet), Some(ip)) => Some(PeerFamily {
            subnet: IpNet::V6(subnet),
            public_ip: IpAddr::V6(ip),
            vtep_mac: data.vxlan_v6.map(|d| d.vtep_mac),
        }),
        _ => None,
    };
    Ok(PeerLease {
        name: rec.key.to_string(),
        backend_type: attrs.backend_type.clone(),
        v4,
        v6,
    })
}

pub(super) fn record_to_lease(key: &SubnetKey, attrs: &LeaseAttrs, lease_id: i64) -> Lease {
    Lease {
        key: *key,
        attrs: attrs.clone(),
        etcd_lease_id: lease_id,
        ttl_seconds: -1,
        mod_revision: 0,
    }
}

/// The peers as the registry currently has them (without this node's own key), and the
/// leases left out with the reason why.
#[derive(Debug)]
pub(super) struct PeerTable {
    config: NetConfig,
    peers: BTreeMap<String, PeerLease>,
    skipped: BTreeMap<String, String>,
}

impl PeerTable {
    pub(super) fn new(config: NetConfig) -> PeerTable {
        PeerTable {
            config,
            peers: BTreeMap::new(),
            skipped: BTreeMap::new(),
        }
    }

    /// A peer's garbage is logged once, here, and only removes that peer's entries.
    pub(super) fn put(&mut self, rec: &LeaseRecord) {
        let name = rec.key.to_string();
        match to_peer(rec, &self.config) {
            Ok(peer) => self.insert(name, peer),
            Err(reason) => {
                // The etcd key too, as an operator finds the lease by it (`etcdctl get`).
                tracing::warn!(subnet = %rec.key.ipv4, key = %name, %reason, "skipping peer lease");
                self.skip(&name, reason);
            }
        }
    }

    /// A peer known by another name than its subnet (a Kubernetes node).
    pub(super) fn put_named(&mut self, name: &str, rec: &LeaseRecord) {
        match to_peer(rec, &self.config) {
            Ok(mut peer) => {
                peer.name = name.to_string();
                self.insert(name.to_string(), peer);
            }
            Err(reason) => {
                tracing::warn!(node = %name, %reason, "skipping peer");
                self.skip(name, reason);
            }
        }
    }

    /// Leaves `name` out of the dataplane because of `reason` (its entries go).
    pub(super) fn skip(&mut self, name: &str, reason: String) {
        self.peers.remove(name);
        self.skipped.insert(name.to_string(), reason);
    }

    fn insert(&mut self, name: String, peer: PeerLease) {
        self.skipped.remove(&name);
        self.peers.insert(name, peer);
    }

    pub(super) fn delete(&mut self, key: &SubnetKey) {
        self.remove(&key.to_string());
    }

    pub(super) fn remove(&mut self, name: &str) {
        self.peers.remove(name);
        self.skipped.remove(name);
    }

    pub(super) fn clear(&mut self) {
        self.peers.clear();
        self.skipped.clear();
    }

    pub(super) fn list(&self) -> Vec<PeerLease> {
        self.peers.values().cloned().collect()
    }

    /// The leases left out, by name, with why.
    pub(super) fn skipped(&self) -> &BTreeMap<String, String> {
        &self.skipped
    }
}
