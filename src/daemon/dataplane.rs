//! The node's dataplane: the devices it owns (checked and recreated), the entries toward its
//! peers (observe, decide, diff, apply) and the underlay guard (`inet twill-underlay`), plus the
//! netlink monitor that reports drift. The underlay guard's nft calls are made from here only;
//! the masquerade/forward rules ([`crate::traffic::TrafficManager`]) are started in
//! [`super::startup`] and checked on a task of their own.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use futures::StreamExt;
use ipnet::IpNet;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use tokio::sync::mpsc;
use tokio::time::Instant;

use twill_backends::netlink::{LinkMap, Netlink};
use twill_backends::vxlan::{self, VxlanSpec, ENCAP_OVERHEAD};
use twill_backends::{desired_state, diff, BackendKind, DataplaneState, Op, PeerLease, Topology};

use crate::flags::Flags;
use crate::iface::ExternalInterface;
use twill_formats::lease::{LeaseAttrs, SubnetKey, VxlanBackendData};
use twill_formats::net_conf::{BackendConfig, NetConfig};
use twill_formats::Mac;

use crate::metrics::{op_kind, reason_code, Component, PassReport};
use crate::status::{LinkNames, PassSnapshot};

use super::core::NetlinkSignal;
use super::event_loop::DataplaneEffects;
use super::Observability;

/// Per-family view of the node's addresses.
#[derive(Clone, Debug)]
pub(super) struct PublicAddrs {
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}

/// An underlay guard transaction in flight: the input it applied, or why it failed.
type GuardJob = tokio::task::JoinHandle<Result<crate::underlay::GuardInput, crate::nft::NftError>>;

/// The node's dataplane: the devices it owns and the entries toward its peers.
pub(super) struct Dataplane {
    nl: Netlink,
    kind: BackendKind,
    ext: ExternalInterface,
    vni: u32,
    vxlan4: Option<VxlanSpec>,
    vxlan6: Option<VxlanSpec>,
    links: LinkMap,
    topo: Topology,
    pub(super) mtu: u32,
    blackhole: bool,
    own_subnets: Vec<IpNet>,
    /// Shared with the netlink monitor so it can tell our devices' events from others'.
    pub(super) watched: Arc<[AtomicU32; 2]>,
    last_skipped: BTreeSet<(String, String)>,
    /// The underlay guard's template (peers filled in per pass) and the input last applied
    /// successfully; `None` when the table's state is unknown (never applied, a failure,
    /// drift), so the next pass replaces the whole table.
    guard: crate::underlay::GuardInput,
    guard_applied: Option<crate::underlay::GuardInput>,
    nft: crate::nft::SharedNft,
    /// The last pass's desired entries and the ops that failed in it: an entry the last pass
    /// already wanted (and did not fail to set) that must be set again was removed or changed
    /// by someone else, a drift repair.
    last_desired: Arc<DataplaneState>,
    last_failed: Vec<Op>,
    obs: Observability,
}

impl Dataplane {
    pub(super) fn new(
        nl: Netlink,
        config: &NetConfig,
        ext: ExternalInterface,
        public: &PublicAddrs,
        flags: &Flags,
        obs: Observability,
    ) -> anyhow::Result<Dataplane> {
        let mut networks = Vec::new();
        if config.enable_ipv4 {
            networks.extend(config.network.map(IpNet::V4));
        }
        if config.enable_ipv6 {
            networks.extend(config.ipv6_network.map(IpNet::V6));
        }
        let (kind, vni, mtu, vxlan4, vxlan6) = match &config.backend {
            BackendConfig::Vxlan(vx) => {
                let mtu = vx.mtu.unwrap_or(ext.mtu).saturating_sub(ENCAP_OVERHEAD);
                let spec = |ipv6: bool, local: IpAddr| VxlanSpec {
                    name: vxlan::device_name(vx.vni, ipv6),
                    vni: vx.vni,
                    local,
                    external_index: ext.index,
                    port: vx.port,
                    gbp: vx.gbp,
                    learning: vx.learning,
                    mtu,
                    mac: Mac::default(),
                };
                let v4 = config
                    .enable_ipv4
                    .then(|| spec(false, IpAddr::V4(public.v4)));
                let v6 = public.v6.filter(|_| config.enable_ipv6).map(|a| {
                    // An IPv6 underlay carries 20 more bytes of outer header, and the
                    // kernel refuses a VXLAN MTU above the lower device's minus 70.
                    // FLANNEL_MTU stays Flannel's (−50); IPv6 pods learn the smaller path
                    // MTU from the node.
                    let mut s = spec(true, IpAddr::V6(a));
                    s.mtu = s
                        .mtu
                        .min(ext.mtu.saturating_sub(vxlan::ENCAP_OVERHEAD_IPV6));
                    s
                });
                (
                    BackendKind::Vxlan {
                        direct_routing: vx.direct_routing,
                    },
                    vx.vni,
                    mtu,
                    v4,
                    v6,
                )
            }
            BackendConfig::HostGw => {
                twill_backends::hostgw::check_public_ip(IpAddr::V4(public.v4), &ext.addrs)
                    .map_err(|e| anyhow!(e))?;
                (BackendKind::HostGw, 0, ext.mtu, None, None)
            }
        };
        let guard = crate::underlay::GuardInput {
            vxlan_port: vxlan4.as_ref().or(vxlan6.as_ref()).map(|v| {
                if v.port == 0 {
                    8472
                } else {
                    v.port
                }
            }),
            external: ext.name.clone(),
            networks: networks.clone(),
            ..Default::default()
        };
        let topo = Topology {
            backend: kind,
            networks,
            own_subnets: Vec::new(),
            external_prefixes: ext.prefixes.clone(),
            vxlan4: vxlan4.is_some(),
            vxlan6: vxlan6.is_some(),
        };
        Ok(Dataplane {
            nl,
            kind,
            links: LinkMap {
                vxlan4: None,
                vxlan6: None,
                external: ext.index,
            },
            ext,
            vni,
            vxlan4,
            vxlan6,
            topo,
            mtu,
            blackhole: flags.ip_blackhole_route,
            own_subnets: Vec::new(),
            watched: Arc::new([AtomicU32::new(0), AtomicU32::new(0)]),
            last_skipped: BTreeSet::new(),
            guard,
            guard_applied: None,
            nft: crate::nft::runner(),
            last_desired: Arc::default(),
            last_failed: Vec::new(),
            obs,
        })
    }

    /// Creates (or keeps) the VXLAN devices before the lease is taken, as Flannel does, so
    /// the lease can advertise their MACs.
    pub(super) async fn prepare_devices(
        &mut self,
        previous: (Option<Mac>, Option<Mac>),
    ) -> anyhow::Result<()> {
        let mut rng = rand::rng();
        for (spec, prev) in [
            (self.vxlan4.as_mut(), previous.0),
            (self.vxlan6.as_mut(), previous.1),
        ] {
            let Some(spec) = spec else { continue };
            let existing = self.nl.link_by_name(&spec.name).await?;
            spec.mac = match existing
                .as_ref()
                .filter(|l| vxlan::incompatibility(spec, l).is_none())
                .and_then(|l| l.mac)
            {
                Some(mac) => mac,
                None => prev.unwrap_or_else(|| Mac::random_local(&mut rng)),
            };
        }
        self.ensure_devices(false).await
    }

    pub(super) fn set_own(&mut self, key: &SubnetKey) {
        self.own_subnets = std::iter::once(IpNet::V4(key.ipv4))
            .chain(key.ipv6.map(IpNet::V6))
            .collect();
        self.topo.own_subnets = self.own_subnets.clone();
        self.guard.own_subnets = self.own_subnets.clone();
    }

    /// Makes sure each VXLAN device exists (recreating a deleted or altered one with the same
    /// MAC) and, once the lease is known, carries its address.
    async fn ensure_devices(&mut self, with_address: bool) -> anyhow::Result<()> {
        let networks = self.topo.networks.clone();
        for (i, spec) in [self.vxlan4.clone(), self.vxlan6.clone()]
            .into_iter()
            .enumerate()
        {
            let Some(spec) = spec else { continue };
            let address = if with_address {
                self.own_subnets
                    .iter()
                    .find(|s| s.addr().is_ipv4() == (i == 0))
                    .map(|s| {
                        IpNet::new(s.network(), if i == 0 { 32 } else { 128 })
                            .expect("host prefix is valid")
                    })
            } else {
                None
            };
            let dev = vxlan::ensure_device(&self.nl, &spec, address, &networks).await?;
            if !dev.reused && with_address {
                tracing::warn!(device = %spec.name, "VXLAN device was missing or altered; recreated it");
            }
            if dev.mac != spec.mac {
                tracing::warn!(device = %spec.name, kept = %dev.mac, "device MAC differs from the advertised one");
            }
            if i == 0 {
                self.links.vxlan4 = Some(dev.index);
            } else {
                self.links.vxlan6 = Some(dev.index);
            }
            self.watched[i].store(dev.index, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The netlink connection, for the status server's kernel reads.
    pub(super) fn netlink(&self) -> Netlink {
        self.nl.clone()
    }

    /// The IPv4 VXLAN device's MAC (the lease's VtepMAC), if any.
    pub(super) fn vtep_mac(&self) -> Option<Mac> {
        self.vxlan4.as_ref().or(self.vxlan6.as_ref()).map(|s| s.mac)
    }

    pub(super) async fn address_devices(&mut self) -> anyhow::Result<()> {
        self.ensure_devices(true).await
    }

    /// The attributes this node advertises.
    pub(super) fn lease_attrs(&self, public: &PublicAddrs) -> LeaseAttrs {
        let data = |spec: &Option<VxlanSpec>| {
            spec.as_ref().map(|s| {
                VxlanBackendData {
                    vni: self.vni,
                    vtep_mac: s.mac,
                }
                .to_value()
            })
        };
        LeaseAttrs {
            public_ip: public.v4,
            public_ipv6: public.v6,
            backend_type: self.kind.lease_type().to_string(),
            backend_data: data(&self.vxlan4),
            backend_v6_data: data(&self.vxlan6),
        }
    }

    /// Cheap check used on every pass: are our devices still there, unchanged?
    async fn devices_intact(&self) -> anyhow::Result<bool> {
        for (spec, index) in [
            (&self.vxlan4, self.links.vxlan4),
            (&self.vxlan6, self.links.vxlan6),
        ] {
            let Some(spec) = spec else { continue };
            match self.nl.link_by_name(&spec.name).await? {
                Some(link)
                    if Some(link.index) == index
                        && link.up
                        && vxlan::incompatibility(spec, &link).is_none() => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Observe, decide, diff, apply; the pass is recorded in the metrics and the status
    /// board. `table_skipped` are the leases the peer table left out (unreadable), by name.
    async fn reconcile(
        &mut self,
        peers: &[PeerLease],
        table_skipped: &BTreeMap<String, String>,
    ) -> anyhow::Result<usize> {
        let started = Instant::now();
        let outcome = self.pass(peers, table_skipped).await;
        let mut report = match &outcome {
            Ok(report) => report.clone(),
            Err(_) => PassReport::default(),
        };
        report.duration = started.elapsed().as_secs_f64();
        self.obs.metrics.record_pass(&report);
        release_freed_memory();
        outcome.map(|r| r.applied.values().sum::<u64>() as usize)
    }

    async fn pass(
        &mut self,
        peers: &[PeerLease],
        table_skipped: &BTreeMap<String, String>,
    ) -> anyhow::Result<PassReport> {
        let started = Instant::now();
        let mut repaired = false;
        if !self.devices_intact().await? {
            self.ensure_devices(true).await?;
            // Devices exist from start-up on: one missing or altered now was touched by hand.
            repaired = true;
        }
        let (desired, skipped) = desired_state(&self.topo, peers);
        let desired = Arc::new(desired);
        let skipped_now: BTreeSet<(String, String)> =
            skipped.into_iter().map(|s| (s.peer, s.reason)).collect();
        // The underlay guard's input: a new peer is allowed before its FDB entry exists.
        let skipped_peers: BTreeSet<&str> = skipped_now.iter().map(|(p, _)| p.as_str()).collect();
        let mut guard = self.guard.clone();
        for p in peers
            .iter()
            .filter(|p| !skipped_peers.contains(p.name.as_str()))
        {
            for fam in p.v4.iter().chain(p.v6.iter()) {
                guard.peer_ips.insert(fam.public_ip);
                guard.peer_subnets.insert(fam.subnet);
            }
        }
        let all_skipped = merge_skipped(table_skipped, &skipped_now);
        for (peer, reason) in all_skipped.difference(&self.last_skipped) {
            // The peer table logged its own skips when it made them.
            if !table_skipped.contains_key(peer) {
                match SubnetKey::parse(peer) {
                    Some(key) => {
                        tracing::warn!(subnet = %key.ipv4, %reason, "not programming peer")
                    }
                    None => tracing::warn!(node = %peer, %reason, "not programming peer"),
                }
            }
            self.obs.peer_skipped(peer, reason);
        }
        self.last_skipped = all_skipped;
        let decided = Instant::now();
        // The guard's nft transaction runs on a blocking thread while the entries are read
        // and diffed and the ops that let no traffic in are applied (deletions, VXLAN
        // neighbours: without FDB entry and route they carry nothing); FDB entries and routes,
        // which do let a peer's traffic in, wait for it.
        let guard_job = self.start_guard(guard.clone());
        let programmed = self.program(&desired, guard_job).await;
        let guarded = Instant::now();
        let (ops, failed) = programmed?;
        tracing::debug!(
            peers = peers.len(),
            ops = ops.len(),
            decide = ?decided - started,
            program = ?guarded - decided,
            "reconcile pass timings"
        );
        if self.blackhole {
            for subnet in &self.own_subnets {
                if let Err(e) = self.nl.ensure_blackhole(*subnet).await {
                    tracing::warn!(error = %e, "blackhole route");
                }
            }
        }
        repaired |= ops
            .iter()
            .any(|op| was_programmed(op, &self.last_desired) && !self.last_failed.contains(op));
        let mut applied: BTreeMap<&'static str, u64> = BTreeMap::new();
        for op in ops.iter().filter(|op| !failed.contains(op)) {
            *applied.entry(op_kind(op)).or_default() += 1;
        }
        let accepted: Vec<&PeerLease> = peers
            .iter()
            .filter(|p| !skipped_peers.contains(p.name.as_str()))
            .collect();
        let programmed = accepted
            .iter()
            .filter(|p| !failed.iter().any(|op| op_touches(op, p)))
            .count();
        let mut skipped_by_code: BTreeMap<&'static str, BTreeSet<&str>> = BTreeMap::new();
        for (peer, reason) in &self.last_skipped {
            skipped_by_code
                .entry(reason_code(reason))
                .or_default()
                .insert(peer);
        }
        let report = PassReport {
            duration: 0.0,
            ok: true,
            applied,
            repaired,
            peers_known: accepted.len(),
            peers_programmed: programmed,
            skipped: skipped_by_code
                .into_iter()
                .map(|(code, peers)| (code, peers.len() as i64))
                .collect(),
        };
        self.obs.status.record_pass(PassSnapshot {
            peers: peers.to_vec(),
            desired: Arc::clone(&desired),
            skipped: self.last_skipped.iter().cloned().collect(),
            guard: Some(guard),
            links: self.links,
            topo: self.topo.clone(),
            names: self.link_names(),
        });
        self.last_desired = desired;
        self.last_failed = failed;
        Ok(report)
    }

    /// The devices' names, for the status's one-line entries.
    fn link_names(&self) -> LinkNames {
        LinkNames {
            vxlan4: self.vxlan4.as_ref().map(|s| s.name.clone()),
            vxlan6: self.vxlan6.as_ref().map(|s| s.name.clone()),
            external: self.ext.name.clone(),
        }
    }

    /// Reads the entries, diffs them against `desired` and applies the ops, those letting a
    /// peer's traffic in (FDB entries, routes) only after `guard_job` finished. The guard job
    /// is always awaited, whatever fails, so its outcome is recorded. Returns the ops and
    /// those of them that failed.
    async fn program(
        &mut self,
        desired: &DataplaneState,
        guard_job: Option<GuardJob>,
    ) -> anyhow::Result<(Vec<Op>, Vec<Op>)> {
        let observed = self
            .nl
            .observe(&self.links, &self.topo)
            .await
            .map(|actual| diff(desired, &actual));
        // The ops are split, not copied: with thousands of peers a copy of every op held
        // hundreds of KiB more at the pass's peak.
        let (observed, (gated, early)): (_, (Vec<Op>, Vec<Op>)) = match observed {
            Ok(ops) => (
                Ok(()),
                ops.into_iter()
                    .partition(|op| matches!(op, Op::SetFdb { .. } | Op::SetRoute(_))),
            ),
            Err(e) => (Err(e), Default::default()),
        };
        let started = Instant::now();
        let mut failed = self.nl.apply(&self.links, &early).await;
        let early_done = Instant::now();
        if let Some(job) = guard_job {
            self.finish_guard(job).await;
        }
        let guard_done = Instant::now();
        failed.extend(self.nl.apply(&self.links, &gated).await);
        tracing::debug!(
            early = ?early_done - started,
            guard_wait = ?guard_done - early_done,
            gated = ?guard_done.elapsed(),
            "programming timings"
        );
        observed?;
        let mut ops = early;
        ops.extend(gated);
        for (op, err) in &failed {
            tracing::warn!(?op, error = %err, "dataplane operation failed; will retry on the next pass");
        }
        if !ops.is_empty() {
            tracing::info!(
                applied = ops.len() - failed.len(),
                failed = failed.len(),
                entries = desired.len(),
                "reconciled dataplane"
            );
        }
        Ok((ops, failed.into_iter().map(|(op, _)| op).collect()))
    }

    /// Starts bringing the underlay guard to `guard` on a task of its own (nft runs off the runtime):
    /// element deltas when only peers changed, else the whole table; a rejected delta is
    /// replaced by the whole table in the same job. Until [`Self::finish_guard`] records the
    /// outcome the table's state is unknown, so a pass that never gets there leaves the next
    /// one to replace the whole table.
    fn start_guard(&mut self, guard: crate::underlay::GuardInput) -> Option<GuardJob> {
        use crate::underlay::{self, Update};
        let update = underlay::update(self.guard_applied.as_ref(), &guard);
        if update == Update::Unchanged {
            return None;
        }
        self.guard_applied = None;
        let nft = self.nft.clone();
        Some(tokio::spawn(async move {
            underlay::apply_update(&nft, update, guard).await
        }))
    }

    /// Waits for the guard job and records what the table now holds; a failure is retried
    /// (as a whole table) on the next pass.
    async fn finish_guard(&mut self, job: GuardJob) {
        match job.await {
            Ok(Ok(guard)) => {
                tracing::info!(
                    peers = guard.peer_ips.len(),
                    "underlay guard updated (inet twill-underlay)"
                );
                self.guard_applied = Some(guard);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "underlay guard not applied; retrying on the next pass")
            }
            Err(e) => {
                tracing::warn!(error = %e, "underlay guard job failed; retrying on the next pass")
            }
        }
    }

    /// Drift check on the resync tick: a table removed or changed by hand (its sets no longer
    /// what deltas would start from, rules missing) is replaced whole on the next pass.
    async fn check_guard(&mut self) {
        let drifted = match &self.guard_applied {
            Some(applied) => crate::underlay::drifted(&self.nft, applied).await,
            None => false,
        };
        if drifted {
            tracing::warn!("underlay guard table was removed or changed; re-applying it whole");
            self.obs.metrics.record_repair(Component::UnderlayGuard);
            self.guard_applied = None;
        }
    }

    async fn refresh_external(&mut self) {
        match self.nl.addresses(Some(self.ext.index)).await {
            Ok(addrs) => {
                self.topo.external_prefixes = addrs.into_iter().map(|(_, a)| a.trunc()).collect()
            }
            Err(e) => tracing::warn!(error = %e, "reading external interface addresses"),
        }
    }
}

impl DataplaneEffects for Dataplane {
    async fn reconcile(
        &mut self,
        peers: &[PeerLease],
        table_skipped: &BTreeMap<String, String>,
    ) -> anyhow::Result<usize> {
        Dataplane::reconcile(self, peers, table_skipped).await
    }

    async fn check_underlay(&mut self) {
        self.refresh_external().await;
        self.check_guard().await;
    }
}

/// Gives the memory a pass freed back to the kernel. A pass holds the kernel's dumps of every
/// route, neighbour and FDB entry, the desired state and the ops at once (several MiB with
/// thousands of peers) and frees them at its end; glibc keeps such freed memory in its arenas
/// (one per thread that allocated) instead of returning it, so the daemon's resident size
/// stayed at its largest pass's. `malloc_trim` returns the free pages of every arena; it takes
/// well under a millisecond next to the pass's milliseconds.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it takes no
    // pointer and may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The leases left out of the dataplane, by name: the peer table's (unreadable) and the
/// decide step's (impossible here), one reason per lease (a lease skipped for both families
/// keeps its reasons joined).
fn merge_skipped(
    table: &BTreeMap<String, String>,
    decided: &BTreeSet<(String, String)>,
) -> BTreeSet<(String, String)> {
    let mut by_peer: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (peer, reason) in table.iter().chain(decided.iter().map(|(p, r)| (p, r))) {
        by_peer.entry(peer).or_default().push(reason);
    }
    by_peer
        .into_iter()
        .map(|(peer, reasons)| (peer.to_string(), reasons.join("; ")))
        .collect()
}

/// Whether `op` sets an entry `previous` (the last pass's desired state) already held as
/// it is now wanted: then the kernel lost it since, a repair.
fn was_programmed(op: &Op, previous: &DataplaneState) -> bool {
    match op {
        Op::SetRoute(r) => previous.routes.get(&r.dst) == Some(r),
        Op::SetNeighbour { link, ip, mac } => previous.neighbours.get(&(*link, *ip)) == Some(mac),
        Op::SetFdb { link, mac, dst } => previous.fdb.contains(&(*link, *mac, *dst)),
        Op::DelRoute(_) | Op::DelNeighbour { .. } | Op::DelFdb { .. } => false,
    }
}

/// Whether `op` writes one of `peer`'s entries (its subnets' routes and gateways, its VTEPs).
fn op_touches(op: &Op, peer: &PeerLease) -> bool {
    let families = || peer.v4.iter().chain(peer.v6.iter());
    match op {
        Op::SetRoute(r) | Op::DelRoute(r) => families().any(|f| f.subnet.trunc() == r.dst),
        Op::SetNeighbour { ip, .. } | Op::DelNeighbour { ip, .. } => {
            families().any(|f| f.subnet.network() == *ip)
        }
        Op::SetFdb { dst, .. } | Op::DelFdb { dst, .. } => families().any(|f| f.public_ip == *dst),
    }
}

/// What a netlink event means to the reconciler: something twill owns may have been removed
/// (a device, a route, a neighbour; `watched` holds our devices' indexes), or the socket
/// overran and events were lost. Anything else is none of its business.
fn classify(
    payload: &NetlinkPayload<RouteNetlinkMessage>,
    watched: &[AtomicU32; 2],
) -> Option<NetlinkSignal> {
    use RouteNetlinkMessage as M;
    let ours = |index: u32| watched.iter().any(|w| w.load(Ordering::Relaxed) == index);
    let changed = match payload {
        NetlinkPayload::Overrun(_) => return Some(NetlinkSignal::Overrun),
        NetlinkPayload::InnerMessage(M::DelLink(_)) => true,
        NetlinkPayload::InnerMessage(M::NewLink(l)) => {
            ours(l.header.index)
                && !l
                    .header
                    .flags
                    .contains(rtnetlink::packet_route::link::LinkFlags::Up)
        }
        NetlinkPayload::InnerMessage(M::DelRoute(_)) => true,
        NetlinkPayload::InnerMessage(M::DelNeighbour(n)) => ours(n.header.ifindex),
        _ => false,
    };
    changed.then_some(NetlinkSignal::Changed)
}

/// Listens to rtnetlink and reports when something twill owns may have been removed, so drift
/// is repaired at once instead of at the next periodic resync, and when the socket overran
/// (ENOBUFS), so the whole dataplane is checked. If the socket fails, the monitor opens a new
/// one after a backoff and reports an overrun (events were lost meanwhile): the daemon keeps
/// running on its periodic resync in between rather than stopping over a lost event socket.
pub(super) fn spawn_netlink_monitor(
    watched: Arc<[AtomicU32; 2]>,
) -> anyhow::Result<mpsc::Receiver<NetlinkSignal>> {
    let (tx, rx) = mpsc::channel(64);
    let mut messages = open_netlink_monitor()?;
    tokio::spawn(async move {
        loop {
            if !forward_netlink_signals(&mut messages, &watched, &tx).await {
                return;
            }
            let mut delays = twill_runtime::backoff::retry_delays(
                Duration::from_millis(200),
                Duration::from_secs(10),
            );
            messages = loop {
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(retry_in = ?delay, "the netlink event socket closed; opening a new one");
                tokio::time::sleep(delay).await;
                match open_netlink_monitor() {
                    Ok(m) => break m,
                    Err(e) => tracing::warn!(error = %e, "opening the netlink event socket failed"),
                }
            };
            if tx.send(NetlinkSignal::Overrun).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

type NetlinkMessages = futures::channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// The rtnetlink message types [`classify`] can act on; the monitor's socket filter lets only
/// these through.
const MONITORED_TYPES: [u16; 4] = [
    libc::RTM_NEWLINK,
    libc::RTM_DELLINK,
    libc::RTM_DELROUTE,
    libc::RTM_DELNEIGH,
];

/// A classic BPF program for the monitor's socket: keep a message whose `nlmsg_type` is one of
/// [`MONITORED_TYPES`], drop any other in the kernel. The groups the monitor joins also carry
/// a message for every route, neighbour and FDB entry added, 3 per peer that twilld programs
/// itself: without the filter each of them was received, parsed (with all its attributes)
/// and queued only for [`classify`] to ignore it (15000 messages for 5000 peers), and they
/// could fill the socket's buffer, an overrun that asks for a full check.
fn monitor_filter() -> Vec<socket2::SockFilter> {
    use socket2::SockFilter;
    // `nlmsg_type`, after the 4-byte `nlmsg_len` of the message header.
    const NLMSG_TYPE_OFFSET: u32 = 4;
    // BPF loads a half-word in network byte order, so the type is compared in that order.
    let load_type = SockFilter::new(
        (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16,
        0,
        0,
        NLMSG_TYPE_OFFSET,
    );
    let n = MONITORED_TYPES.len();
    let mut program = vec![load_type];
    for (i, ty) in MONITORED_TYPES.iter().enumerate() {
        // On a match, jump over the remaining comparisons and the drop to the keep.
        let to_keep = (n - i) as u8;
        program.push(SockFilter::new(
            (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            to_keep,
            0,
            u32::from(ty.to_be()),
        ));
    }
    program.push(SockFilter::new(
        (libc::BPF_RET | libc::BPF_K) as u16,
        0,
        0,
        0,
    ));
    program.push(SockFilter::new(
        (libc::BPF_RET | libc::BPF_K) as u16,
        0,
        0,
        u32::MAX,
    ));
    program
}

/// A multicast rtnetlink socket joined to the groups that tell of removed links, routes and
/// neighbours, filtered to the messages that can matter ([`monitor_filter`]); its connection
/// runs on a task of its own.
fn open_netlink_monitor() -> anyhow::Result<NetlinkMessages> {
    use rtnetlink::sys::AsyncSocket;
    use rtnetlink::MulticastGroup as G;
    let (mut conn, _handle, messages) =
        rtnetlink::new_multicast_connection(&[G::Link, G::Ipv4Route, G::Ipv6Route, G::Neigh])?;
    socket2::SockRef::from(conn.socket_mut().socket_ref())
        .attach_filter(&monitor_filter())
        .map_err(|e| anyhow!("filtering the netlink event socket: {e}"))?;
    tokio::spawn(conn);
    Ok(messages)
}

/// Forwards what the socket's messages mean until the socket ends (returns true) or the loop
/// stopped listening (returns false).
async fn forward_netlink_signals(
    messages: &mut NetlinkMessages,
    watched: &[AtomicU32; 2],
    tx: &mpsc::Sender<NetlinkSignal>,
) -> bool {
    while let Some((msg, _)) = messages.next().await {
        let open = match classify(&msg.payload, watched) {
            // A change already queued causes a pass too: a full queue loses nothing.
            Some(NetlinkSignal::Changed) => !matches!(
                tx.try_send(NetlinkSignal::Changed),
                Err(mpsc::error::TrySendError::Closed(_))
            ),
            // An overrun asks for more than a pass: it must not be dropped.
            Some(NetlinkSignal::Overrun) => tx.send(NetlinkSignal::Overrun).await.is_ok(),
            None => true,
        };
        if !open {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::link::LinkMessage;
    use rtnetlink::packet_route::neighbour::NeighbourMessage;

    fn watched(indexes: [u32; 2]) -> [AtomicU32; 2] {
        indexes.map(AtomicU32::new)
    }

    /// Root only: in a network namespace of this test's own thread (`ip`, run from that
    /// thread, works in it too), so nothing outside it is touched.
    #[test]
    fn the_monitor_receives_removals_but_not_the_additions_twilld_makes() {
        if !twill_lab::require_root() {
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let ip = |args: &str| {
                let out = std::process::Command::new("ip")
                    .args(args.split_whitespace())
                    .output()
                    .expect("running ip");
                assert!(out.status.success(), "ip {args}: {out:?}");
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let received = runtime.block_on(async {
                let mut messages = open_netlink_monitor().expect("the monitor's socket");
                ip("link add tw0 type veth peer name tw1");
                ip("link set tw0 up");
                ip("addr add 198.18.5.1/24 dev tw0");
                ip("route add 10.9.0.0/24 via 198.18.5.2 dev tw0");
                ip("neigh add 198.18.5.9 lladdr 0e:00:00:00:00:01 dev tw0 nud permanent");
                ip("neigh del 198.18.5.9 dev tw0");
                ip("route del 10.9.0.0/24");
                // The kernel sends in order: once the route's removal is here, every earlier
                // message that passed the filter is too. Generous: the machine is shared.
                let mut received = Vec::new();
                let deadline = Duration::from_secs(20);
                tokio::time::timeout(deadline, async {
                    while let Some((msg, _)) = messages.next().await {
                        let done = matches!(
                            msg.payload,
                            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(_))
                        );
                        received.push(msg.payload);
                        if done {
                            return;
                        }
                    }
                    panic!("the monitor's socket closed");
                })
                .await
                .unwrap_or_else(|_| panic!("no route removal within {deadline:?}: {received:?}"));
                received
            });
            let kind = |p: &NetlinkPayload<RouteNetlinkMessage>| match p {
                NetlinkPayload::InnerMessage(m) => {
                    let debug = format!("{m:?}");
                    debug.split('(').next().unwrap_or_default().to_string()
                }
                other => format!("{other:?}"),
            };
            let kinds: Vec<String> = received.iter().map(kind).collect();
            assert!(
                received.iter().any(|p| matches!(
                    p,
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(_))
                )),
                "the neighbour's removal was filtered out: {kinds:?}"
            );
            assert!(
                received.iter().any(|p| matches!(
                    p,
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(_))
                )),
                "the links' changes were filtered out: {kinds:?}"
            );
            assert!(
                !received.iter().any(|p| matches!(
                    p,
                    NetlinkPayload::InnerMessage(
                        RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::NewNeighbour(_)
                    )
                )),
                "additions reached the monitor: {kinds:?}"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn an_overrun_of_the_event_socket_asks_for_a_full_check() {
        assert_eq!(
            classify(&NetlinkPayload::Overrun(Vec::new()), &watched([7, 0])),
            Some(NetlinkSignal::Overrun)
        );
    }

    #[test]
    fn removals_of_what_twill_owns_are_changes_and_others_events_are_not() {
        let w = watched([7, 0]);
        let del_link =
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(LinkMessage::default()));
        assert_eq!(classify(&del_link, &w), Some(NetlinkSignal::Changed));
        let mut ours = NeighbourMessage::default();
        ours.header.ifindex = 7;
        let mut theirs = NeighbourMessage::default();
        theirs.header.ifindex = 9;
        assert_eq!(
            classify(
                &NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(ours)),
                &w
            ),
            Some(NetlinkSignal::Changed)
        );
        assert_eq!(
            classify(
                &NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(theirs)),
                &w
            ),
            None
        );
        let mut up = LinkMessage::default();
        up.header.index = 7;
        up.header.flags = rtnetlink::packet_route::link::LinkFlags::Up;
        assert_eq!(
            classify(
                &NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(up)),
                &w
            ),
            None
        );
    }
}
