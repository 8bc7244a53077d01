//! twilld's `GET /status` on its local socket (`--status-socket`): what the daemon holds (its
//! lease, each peer's desired entries from the last pass, the skipped leases, the underlay
//! guard's wanted sets) next to what the kernel holds at the time of the request (one netlink
//! dump through the backends' observe, the guard's nft sets). Nothing is re-read from etcd or
//! the Kubernetes API, and a mismatch is shown as it is: the status is built by the pure
//! [`build`], which attributes every kernel entry to its peer or lists it as stale.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ipnet::IpNet;
use twill_backends::model::RouteEntry;
use twill_backends::netlink::{LinkMap, Netlink};
use twill_backends::{DataplaneState, LinkRef, PeerLease, Topology};
use twill_formats::lease::SubnetKey;
use twill_formats::Mac;
use twill_runtime::status::{GuardStatus, LeaseStatus, PeerStatus, SkippedPeer, TwilldStatus};

use crate::health::Readiness;
use crate::underlay::GuardInput;

/// The devices' names, for the entries' `dev` field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkNames {
    pub vxlan4: Option<String>,
    pub vxlan6: Option<String>,
    pub external: String,
}

impl LinkNames {
    fn of(&self, link: LinkRef) -> &str {
        match link {
            LinkRef::Vxlan4 => self.vxlan4.as_deref().unwrap_or("?"),
            LinkRef::Vxlan6 => self.vxlan6.as_deref().unwrap_or("?"),
            LinkRef::External => &self.external,
        }
    }
}

/// What one reconcile pass worked from and decided.
#[derive(Clone, Debug)]
pub struct PassSnapshot {
    pub peers: Vec<PeerLease>,
    pub desired: Arc<DataplaneState>,
    /// Leases left out, with why.
    pub skipped: Vec<(String, String)>,
    /// The guard's wanted input (`None`: the guard is off).
    pub guard: Option<GuardInput>,
    pub links: LinkMap,
    pub topo: Topology,
    pub names: LinkNames,
}

/// This node's own lease, as held.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnLeaseView {
    pub key: SubnetKey,
    pub public_ip: IpAddr,
    pub public_ipv6: Option<IpAddr>,
    pub vtep_mac: Option<Mac>,
    /// When it expires; `None` when it does not (a reservation, Kubernetes mode).
    pub expires_at: Option<Instant>,
}

#[derive(Default)]
struct Board {
    node: String,
    backend: String,
    lease: Option<OwnLeaseView>,
    pass: Option<Arc<PassSnapshot>>,
    pass_at: Option<Instant>,
}

/// What the daemon holds for the status, written by start-up, the event loop and the
/// dataplane, read by the status server.
#[derive(Default)]
pub struct StatusBoard(Mutex<Board>);

impl StatusBoard {
    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_node(&self, node: &str, backend: &str) {
        let mut b = self.board();
        b.node = node.to_string();
        b.backend = backend.to_string();
    }

    pub fn set_lease(&self, lease: OwnLeaseView) {
        self.board().lease = Some(lease);
    }

    /// The lease now expires at `at` (`None`: it does not).
    pub fn set_lease_expiry(&self, at: Option<Instant>) {
        if let Some(lease) = self.board().lease.as_mut() {
            lease.expires_at = at;
        }
    }

    pub fn record_pass(&self, pass: PassSnapshot) {
        let mut b = self.board();
        b.pass = Some(Arc::new(pass));
        b.pass_at = Some(Instant::now());
    }
}

/// What the kernel holds for the guard: its peer sets (`None`: the table is missing).
pub type GuardKernel = Option<(BTreeSet<IpAddr>, BTreeSet<IpNet>)>;

/// What the daemon holds, as the status shows it.
#[derive(Clone, Copy, Debug)]
pub struct Held<'a> {
    pub node: &'a str,
    pub backend: &'a str,
    pub ready: bool,
    pub lease: Option<&'a OwnLeaseView>,
    /// The last pass and its age in seconds.
    pub pass: Option<(&'a PassSnapshot, f64)>,
}

/// The status from what the daemon holds and what the kernel holds (`kernel`: twill's
/// entries as observed; `guard_kernel`: the guard's sets). Pure.
pub fn build(
    held: Held<'_>,
    kernel: &DataplaneState,
    guard_kernel: GuardKernel,
    now: Instant,
) -> TwilldStatus {
    let Held {
        node,
        backend,
        ready,
        lease,
        pass,
    } = held;
    let lease = lease.map(|l| LeaseStatus {
        subnet: l.key.ipv4.to_string(),
        ipv6_subnet: l.key.ipv6.map(|n| n.to_string()),
        public_ip: l.public_ip.to_string(),
        public_ipv6: l.public_ipv6.map(|a| a.to_string()),
        vtep_mac: l.vtep_mac.map(|m| m.to_string()),
        // Negative once past: an expired lease is shown as such.
        expires_in_seconds: l.expires_at.map(|at| {
            if at >= now {
                at.duration_since(now).as_secs() as i64
            } else {
                -(now.duration_since(at).as_secs() as i64)
            }
        }),
    });
    let Some((pass, age)) = pass else {
        return TwilldStatus {
            node: node.to_string(),
            backend: backend.to_string(),
            ready,
            lease,
            peers: Vec::new(),
            skipped_peers: Vec::new(),
            stale_kernel_entries: entries(kernel, &LinkNames::default())
                .into_iter()
                .map(|(_, line)| line)
                .collect(),
            underlay_guard: None,
            last_reconcile_age_seconds: None,
        };
    };
    let skipped: BTreeMap<&str, &str> = pass
        .skipped
        .iter()
        .map(|(p, r)| (p.as_str(), r.as_str()))
        .collect();
    // Each entry's owner: a route by its destination, a VXLAN neighbour by its gateway (the
    // subnet's network address), an FDB entry by its MAC or its remote VTEP.
    let mut by_key: BTreeMap<Key, usize> = BTreeMap::new();
    for (i, p) in pass.peers.iter().enumerate() {
        for f in p.v4.iter().chain(p.v6.iter()) {
            by_key.entry(Key::Subnet(f.subnet.trunc())).or_insert(i);
            by_key.entry(Key::Gateway(f.subnet.network())).or_insert(i);
            by_key.entry(Key::Vtep(f.public_ip)).or_insert(i);
            if let Some(mac) = f.vtep_mac {
                by_key.entry(Key::Mac(mac)).or_insert(i);
            }
        }
    }
    let mut desired: Vec<Vec<String>> = vec![Vec::new(); pass.peers.len()];
    let mut held: Vec<Vec<String>> = vec![Vec::new(); pass.peers.len()];
    for (keys, line) in entries(&pass.desired, &pass.names) {
        if let Some(i) = keys.iter().find_map(|k| by_key.get(k)) {
            desired[*i].push(line);
        }
    }
    let mut stale = Vec::new();
    for (keys, line) in entries(kernel, &pass.names) {
        match keys.iter().find_map(|k| by_key.get(k)) {
            Some(i) => held[*i].push(line),
            None => stale.push(line),
        }
    }
    let mut peers = Vec::new();
    for (i, p) in pass.peers.iter().enumerate() {
        let (want, have) = (
            std::mem::take(&mut desired[i]),
            std::mem::take(&mut held[i]),
        );
        // A lease skipped whole is listed with its reason, not as a peer, unless the kernel
        // still holds something for it.
        if want.is_empty() && have.is_empty() && skipped.contains_key(p.name.as_str()) {
            continue;
        }
        let first = p.v4.as_ref().or(p.v6.as_ref());
        peers.push(PeerStatus {
            subnet: first.map(|f| f.subnet.to_string()).unwrap_or_default(),
            ipv6_subnet: p
                .v6
                .as_ref()
                .filter(|_| p.v4.is_some())
                .map(|f| f.subnet.to_string()),
            public_ip: first.map(|f| f.public_ip.to_string()).unwrap_or_default(),
            vtep_mac: first.and_then(|f| f.vtep_mac).map(|m| m.to_string()),
            desired: want,
            kernel: have,
        });
    }
    let underlay_guard = pass.guard.as_ref().map(|g| {
        let (kernel_peers, kernel_subnets) = guard_kernel.unwrap_or_default();
        GuardStatus {
            desired_peers: g.peer_ips.iter().map(|a| a.to_string()).collect(),
            kernel_peers: kernel_peers.iter().map(|a| a.to_string()).collect(),
            desired_peer_subnets: g
                .peer_subnets
                .iter()
                .map(|n| n.trunc())
                .collect::<BTreeSet<_>>()
                .iter()
                .map(|n| n.to_string())
                .collect(),
            kernel_peer_subnets: kernel_subnets.iter().map(|n| n.to_string()).collect(),
        }
    });
    TwilldStatus {
        node: node.to_string(),
        backend: backend.to_string(),
        ready,
        lease,
        peers,
        skipped_peers: pass
            .skipped
            .iter()
            .map(|(lease, reason)| SkippedPeer {
                lease: lease.clone(),
                reason: reason.clone(),
            })
            .collect(),
        stale_kernel_entries: stale,
        underlay_guard,
        last_reconcile_age_seconds: Some(age),
    }
}

/// What ties an entry to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Subnet(IpNet),
    Gateway(IpAddr),
    Vtep(IpAddr),
    Mac(Mac),
}

/// Each entry as one line of text, with the keys that tie it to a peer.
fn entries(state: &DataplaneState, names: &LinkNames) -> Vec<(Vec<Key>, String)> {
    let mut out = Vec::new();
    for r in state.routes.values() {
        out.push((vec![Key::Subnet(r.dst)], route_line(r, names)));
    }
    for (&(link, ip), mac) in &state.neighbours {
        let line = format!("neighbor {ip} lladdr {mac} dev {}", names.of(link));
        out.push((vec![Key::Gateway(ip)], line));
    }
    for &(link, mac, dst) in &state.fdb {
        let line = format!("fdb {mac} dst {dst} dev {}", names.of(link));
        out.push((vec![Key::Mac(mac), Key::Vtep(dst)], line));
    }
    out
}

fn route_line(r: &RouteEntry, names: &LinkNames) -> String {
    let onlink = if r.onlink { " onlink" } else { "" };
    format!(
        "route {} via {} dev {}{onlink}",
        r.dst,
        r.gateway,
        names.of(r.link)
    )
}

/// What the status server needs: the board, readiness, and the effectors it reads the kernel
/// with.
#[derive(Clone)]
pub struct StatusServer {
    pub board: Arc<StatusBoard>,
    pub readiness: Readiness,
    pub nl: Netlink,
    pub nft: crate::nft::SharedNft,
}

impl StatusServer {
    /// Answers one request: the board and the kernel as they are now.
    pub async fn status(&self) -> Result<TwilldStatus, String> {
        let (node, backend, lease, pass, pass_at) = {
            let b = self.board.board();
            (
                b.node.clone(),
                b.backend.clone(),
                b.lease.clone(),
                b.pass.clone(),
                b.pass_at,
            )
        };
        let now = Instant::now();
        let (kernel, guard_kernel) = match &pass {
            Some(p) => {
                let kernel = self
                    .nl
                    .observe(&p.links, &p.topo)
                    .await
                    .map_err(|e| format!("reading the kernel's entries: {e}"))?;
                let guard = match p.guard {
                    Some(_) => crate::underlay::kernel_sets(&self.nft).await,
                    None => None,
                };
                (kernel, guard)
            }
            None => (DataplaneState::default(), None),
        };
        let age = pass_at.map(|at| now.duration_since(at).as_secs_f64());
        let held = Held {
            node: &node,
            backend: &backend,
            ready: self.readiness.is_ready(),
            lease: lease.as_ref(),
            pass: pass.as_deref().zip(age),
        };
        Ok(build(held, &kernel, guard_kernel, now))
    }

    /// Serves `GET /status` on the unix socket at `path` until the process ends.
    pub async fn serve(self, path: &Path) -> std::io::Result<()> {
        let listener = twill_runtime::http::bind_unix(path)?;
        tracing::info!(socket = %path.display(), "serving /status");
        let router = Router::new().route("/status", get(answer)).with_state(self);
        twill_runtime::http::serve_unix(listener, router, twill_runtime::http::DEADLINE).await;
        Ok(())
    }
}

async fn answer(State(server): State<StatusServer>) -> Response {
    match server.status().await {
        Ok(status) => Json(status).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twill_backends::{desired_state, BackendKind, PeerFamily};

    fn mac(last: u8) -> Mac {
        Mac([0x0a, 0, 0, 0, 0, last])
    }

    fn peer(n: u8) -> PeerLease {
        PeerLease {
            name: format!("10.244.{n}.0-24"),
            backend_type: "vxlan".into(),
            v4: Some(PeerFamily {
                subnet: format!("10.244.{n}.0/24").parse().unwrap(),
                public_ip: format!("198.18.0.{n}").parse().unwrap(),
                vtep_mac: Some(mac(n)),
            }),
            v6: None,
        }
    }

    fn snapshot(peers: Vec<PeerLease>) -> PassSnapshot {
        let topo = Topology {
            backend: BackendKind::Vxlan {
                direct_routing: false,
            },
            networks: vec!["10.244.0.0/16".parse().unwrap()],
            own_subnets: vec!["10.244.1.0/24".parse().unwrap()],
            external_prefixes: vec!["198.18.0.0/24".parse().unwrap()],
            vxlan4: true,
            vxlan6: false,
        };
        let (desired, skipped) = desired_state(&topo, &peers);
        let mut guard = GuardInput::default();
        for p in &peers {
            let f = p.v4.as_ref().unwrap();
            guard.peer_ips.insert(f.public_ip);
            guard.peer_subnets.insert(f.subnet);
        }
        PassSnapshot {
            peers,
            desired: Arc::new(desired),
            skipped: skipped.into_iter().map(|s| (s.peer, s.reason)).collect(),
            guard: Some(guard),
            links: LinkMap::default(),
            topo,
            names: LinkNames {
                vxlan4: Some("flannel.1".into()),
                vxlan6: None,
                external: "eth0".into(),
            },
        }
    }

    fn status(pass: &PassSnapshot, kernel: &DataplaneState, guard: GuardKernel) -> TwilldStatus {
        let held = Held {
            node: "n1",
            backend: "vxlan",
            ready: true,
            lease: None,
            pass: Some((pass, 1.0)),
        };
        build(held, kernel, guard, Instant::now())
    }

    fn guard_of(pass: &PassSnapshot) -> GuardKernel {
        let g = pass.guard.as_ref().unwrap();
        Some((g.peer_ips.clone(), g.peer_subnets.clone()))
    }

    #[test]
    fn a_kernel_holding_the_desired_entries_is_in_sync_with_flannels_entry_text() {
        let pass = snapshot(vec![peer(2), peer(3)]);
        let s = status(&pass, &pass.desired, guard_of(&pass));
        assert_eq!(s.peers.len(), 2);
        assert!(s.peers.iter().all(|p| p.in_sync()), "{s:#?}");
        assert_eq!(
            s.peers[0].desired,
            vec![
                "route 10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink",
                "neighbor 10.244.2.0 lladdr 0a:00:00:00:00:02 dev flannel.1",
                "fdb 0a:00:00:00:00:02 dst 198.18.0.2 dev flannel.1",
            ]
        );
        assert!(s.stale_kernel_entries.is_empty());
        let g = s.underlay_guard.unwrap();
        assert_eq!(g.desired_peers, g.kernel_peers);
        assert_eq!(g.desired_peers, vec!["198.18.0.2", "198.18.0.3"]);
    }

    #[test]
    fn a_missing_route_a_changed_fdb_and_a_stranger_entry_are_shown() {
        let pass = snapshot(vec![peer(2), peer(3)]);
        let mut kernel = (*pass.desired).clone();
        kernel.routes.remove(&"10.244.2.0/24".parse().unwrap());
        kernel
            .fdb
            .remove(&(LinkRef::Vxlan4, mac(3), "198.18.0.3".parse().unwrap()));
        kernel
            .fdb
            .insert((LinkRef::Vxlan4, mac(3), "198.18.0.99".parse().unwrap()));
        let stranger: IpNet = "10.244.9.0/24".parse().unwrap();
        kernel.routes.insert(
            stranger,
            RouteEntry {
                dst: stranger,
                gateway: "10.244.9.0".parse().unwrap(),
                link: LinkRef::Vxlan4,
                onlink: true,
            },
        );
        let s = status(&pass, &kernel, None);
        assert_eq!(
            s.peers[0].missing(),
            vec!["route 10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink"]
        );
        assert!(s.peers[0].unexpected().is_empty());
        assert_eq!(
            s.peers[1].missing(),
            vec!["fdb 0a:00:00:00:00:03 dst 198.18.0.3 dev flannel.1"]
        );
        assert_eq!(
            s.peers[1].unexpected(),
            vec!["fdb 0a:00:00:00:00:03 dst 198.18.0.99 dev flannel.1"]
        );
        assert_eq!(
            s.stale_kernel_entries,
            vec!["route 10.244.9.0/24 via 10.244.9.0 dev flannel.1 onlink"]
        );
        // The guard's table is missing: its kernel sets are empty, not hidden.
        let g = s.underlay_guard.unwrap();
        assert!(g.kernel_peers.is_empty() && !g.desired_peers.is_empty());
    }

    #[test]
    fn a_skipped_lease_is_listed_with_its_reason_and_not_as_a_peer() {
        let mut bad = peer(4);
        bad.backend_type = "host-gw".into();
        let pass = snapshot(vec![peer(2), bad]);
        let s = status(&pass, &pass.desired, guard_of(&pass));
        assert_eq!(s.peers.len(), 1);
        assert_eq!(s.skipped_peers.len(), 1);
        assert_eq!(s.skipped_peers[0].lease, "10.244.4.0-24");
        assert!(s.skipped_peers[0].reason.contains("BackendType"), "{s:#?}");
    }

    #[test]
    fn the_lease_expiry_counts_down_and_goes_negative_once_past() {
        let now = Instant::now();
        let lease = OwnLeaseView {
            key: SubnetKey::new("10.244.1.0/24".parse().unwrap(), None),
            public_ip: "198.18.0.11".parse().unwrap(),
            public_ipv6: None,
            vtep_mac: Some(mac(1)),
            expires_at: Some(now + std::time::Duration::from_secs(90)),
        };
        let held = Held {
            node: "n1",
            backend: "vxlan",
            ready: false,
            lease: Some(&lease),
            pass: None,
        };
        let s = build(held, &DataplaneState::default(), None, now);
        let l = s.lease.unwrap();
        assert_eq!(l.expires_in_seconds, Some(90));
        assert_eq!(l.subnet, "10.244.1.0/24");
        assert_eq!(l.vtep_mac.as_deref(), Some("0a:00:00:00:00:01"));
        let later = now + std::time::Duration::from_secs(100);
        let s = build(held, &DataplaneState::default(), None, later);
        assert_eq!(s.lease.unwrap().expires_in_seconds, Some(-10));
    }
}
