//! twilld's core as a state machine: events in (lease events, netlink signals, ticks, timers,
//! the outcome of a lease write, a signal), commands out (reconcile the dataplane with this
//! peer list, check the underlay, renew, re-acquire, stop). It does no I/O and reads no clock:
//! the event loop passes the time in and carries the commands out, so unit tests drive it
//! without root, etcd or a kernel.

use std::time::{Duration, Instant};

use twill_backends::PeerLease;

use crate::registry::etcd::{LeaseRecord, RegistryEvent, SUBNET_TTL};
use crate::registry::kube::NodeEvent;
use twill_formats::lease::{LeaseAttrs, SubnetKey};
use twill_formats::net_conf::NetConfig;

use super::peers::PeerTable;

/// A lease event from either source.
#[derive(Clone, Debug)]
pub(super) enum LeaseEvent {
    Etcd(RegistryEvent),
    Node(NodeEvent),
}

impl From<RegistryEvent> for LeaseEvent {
    fn from(ev: RegistryEvent) -> LeaseEvent {
        LeaseEvent::Etcd(ev)
    }
}

impl From<NodeEvent> for LeaseEvent {
    fn from(ev: NodeEvent) -> LeaseEvent {
        LeaseEvent::Node(ev)
    }
}

/// What the netlink monitor reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NetlinkSignal {
    /// Something twill owns may have been removed (a device, a route, a neighbour).
    Changed,
    /// The event socket's buffer overran: events were lost, so anything may have changed.
    Overrun,
}

/// Why a write of the node's own lease failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum WriteError {
    /// The key exists (create-if-absent lost): another node holds the subnet.
    #[error("subnet already exists")]
    AlreadyExists,
    /// Anything else (etcd unreachable, a timeout); worth retrying.
    #[error("{0}")]
    Failed(String),
}

/// The outcome of a lease write: the TTL granted (`None` for a reservation), or the error.
pub(super) type WriteResult = Result<Option<Duration>, WriteError>;

#[derive(Clone, Debug)]
pub(super) enum Event {
    Lease(LeaseEvent),
    Netlink(NetlinkSignal),
    /// The periodic resync (`--resync-period`).
    Tick,
    /// A deadline from [`Core::next_deadline`] passed (a renewal or a re-acquire retry).
    Timer,
    Renewed(WriteResult),
    Reacquired(WriteResult),
    /// SIGTERM or SIGINT.
    Shutdown,
}

/// A write of the node's own lease.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct LeaseWrite {
    pub key: SubnetKey,
    pub attrs: LeaseAttrs,
    /// `None` keeps a reservation a reservation.
    pub ttl: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Command {
    /// Observe, decide, diff and apply toward these peers.
    Reconcile(Vec<PeerLease>),
    /// Re-read what events do not report (the external interface's addresses) and check the
    /// underlay guard's table for drift.
    CheckUnderlay,
    /// Renew the own lease: a new grant and a plain put.
    Renew(LeaseWrite),
    /// Create the own lease again, if the subnet is still free.
    Reacquire(LeaseWrite),
    Stop(Stop),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Stop {
    /// A signal: stop, leaving the dataplane as it is.
    Shutdown,
    /// Another node holds this node's subnet: stop rather than keep advertising it.
    Conflict(String),
}

/// The node's own lease, as held in etcd.
#[derive(Clone, Debug)]
pub(super) struct OwnLease {
    pub key: SubnetKey,
    pub attrs: LeaseAttrs,
    /// None for a reservation (no etcd lease, never expires).
    pub ttl: Option<Duration>,
}

/// The bounds of a retry backoff (`twill_runtime::backoff::retry_delays`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Retry {
    pub min: Duration,
    pub max: Duration,
}

type Delays = Box<dyn Iterator<Item = Duration> + Send>;

/// Where the own etcd lease stands.
enum Phase {
    /// Held; renewed at the instant (never for a reservation).
    Held { renew_at: Option<Instant> },
    /// A renewal is in flight; `lost` when the key was deleted meanwhile.
    Renewing { lost: bool },
    /// Lost; the next re-acquire attempt is due at the instant.
    Lost { retry_at: Instant },
    /// A re-acquire attempt is in flight.
    Reacquiring,
}

struct EtcdOwn {
    lease: OwnLease,
    /// `--subnet-lease-renew-margin`: renew this long before the TTL runs out.
    margin: Duration,
    renew_retry: Retry,
    reacquire_retry: Retry,
    phase: Phase,
    /// The delays of the current run of failures; `None` after a success.
    delays: Option<Delays>,
    /// Writes failed in a row.
    failures: u32,
}

enum Own {
    Etcd(Box<EtcdOwn>),
    /// Kubernetes mode: the node's name and its lease (the podCIDR and the annotations
    /// twilld wrote): nothing to renew, but annotations removed or changed by someone else
    /// are written back (re-acquired), as a deleted etcd lease is.
    Node(String, Box<EtcdOwn>),
}

pub(super) struct Core {
    table: PeerTable,
    own: Own,
    dirty: bool,
}

/// When to renew a lease granted `ttl` at `now`: `ttl − margin` (Flannel's renew margin), at
/// least a second on.
pub(super) fn renew_deadline(now: Instant, ttl: Duration, margin: Duration) -> Instant {
    now + ttl.saturating_sub(margin).max(Duration::from_secs(1))
}

impl Core {
    /// etcd mode, holding `own` since `now`.
    pub(super) fn etcd(
        config: NetConfig,
        own: OwnLease,
        margin: Duration,
        renew_retry: Retry,
        reacquire_retry: Retry,
        now: Instant,
    ) -> Core {
        let renew_at = own.ttl.map(|ttl| renew_deadline(now, ttl, margin));
        Core {
            table: PeerTable::new(config),
            own: Own::Etcd(Box::new(EtcdOwn {
                lease: own,
                margin,
                renew_retry,
                reacquire_retry,
                phase: Phase::Held { renew_at },
                delays: None,
                failures: 0,
            })),
            dirty: true,
        }
    }

    /// Kubernetes mode on node `node_name`, whose annotations hold `own` (no TTL).
    pub(super) fn kube(
        config: NetConfig,
        node_name: String,
        own: OwnLease,
        reacquire_retry: Retry,
    ) -> Core {
        Core {
            table: PeerTable::new(config),
            own: Own::Node(
                node_name,
                Box::new(EtcdOwn {
                    lease: own,
                    margin: Duration::ZERO,
                    renew_retry: reacquire_retry,
                    reacquire_retry,
                    phase: Phase::Held { renew_at: None },
                    delays: None,
                    failures: 0,
                }),
            ),
            dirty: true,
        }
    }

    /// The own lease's state machine, in either mode.
    fn own_mut(&mut self) -> &mut EtcdOwn {
        match &mut self.own {
            Own::Etcd(own) | Own::Node(_, own) => own,
        }
    }

    /// Whether the dataplane needs a pass. True at first: the first pass removes entries of
    /// peers that vanished while the daemon was down and programs every current peer.
    pub(super) fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The reconcile command, when a pass is due; it is then no longer due.
    pub(super) fn reconcile(&mut self) -> Option<Command> {
        std::mem::take(&mut self.dirty).then(|| Command::Reconcile(self.table.list()))
    }

    /// Peers left out of the dataplane, with why.
    pub(super) fn skipped(&self) -> &std::collections::BTreeMap<String, String> {
        self.table.skipped()
    }

    /// When [`Event::Timer`] is due next: a renewal, or a re-acquire retry.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let (Own::Etcd(own) | Own::Node(_, own)) = &self.own;
        match own.phase {
            Phase::Held { renew_at } => renew_at,
            Phase::Lost { retry_at } => Some(retry_at),
            Phase::Renewing { .. } | Phase::Reacquiring => None,
        }
    }

    pub(super) fn handle(&mut self, event: Event, now: Instant) -> Vec<Command> {
        let mut out = Vec::new();
        match event {
            Event::Lease(ev) => {
                self.dirty = true;
                self.lease_event(ev, &mut out);
            }
            Event::Netlink(NetlinkSignal::Changed) => self.dirty = true,
            Event::Netlink(NetlinkSignal::Overrun) => {
                tracing::warn!(
                    "netlink event socket overran (events lost); checking the whole dataplane"
                );
                out.push(Command::CheckUnderlay);
                self.dirty = true;
            }
            Event::Tick => {
                out.push(Command::CheckUnderlay);
                self.dirty = true;
            }
            Event::Timer => self.timer(now, &mut out),
            Event::Renewed(result) => self.renewed(result, now, &mut out),
            Event::Reacquired(result) => self.reacquired(result, now, &mut out),
            Event::Shutdown => out.push(Command::Stop(Stop::Shutdown)),
        }
        out
    }

    fn lease_event(&mut self, ev: LeaseEvent, out: &mut Vec<Command>) {
        match (ev, &self.own) {
            (LeaseEvent::Etcd(ev), Own::Etcd(_)) => self.registry_event(ev, out),
            (LeaseEvent::Node(ev), Own::Node(..)) => self.node_event(ev, out),
            (ev, _) => {
                tracing::warn!(event = ?ev, "lease event from the other mode's source; ignored")
            }
        }
    }

    /// One etcd event, handling this node's own key: a deleted or expired own lease is
    /// re-acquired if the subnet is still free; if another node has it, twilld stops rather
    /// than keep advertising a subnet it no longer holds.
    fn registry_event(&mut self, ev: RegistryEvent, out: &mut Vec<Command>) {
        let Own::Etcd(own) = &self.own else { return };
        let own_key = own.lease.key;
        match ev {
            RegistryEvent::Put(rec) if rec.key == own_key => self.own_put(&rec, out),
            RegistryEvent::Put(rec) => self.table.put(&rec),
            RegistryEvent::Delete(key) if key == own_key => self.own_lost(out),
            RegistryEvent::Delete(key) => self.table.delete(&key),
            RegistryEvent::Resync(listing) => {
                self.table.clear();
                let mut own_present = false;
                for rec in &listing.records {
                    if rec.key == own_key {
                        own_present = true;
                        self.own_put(rec, out);
                    } else {
                        self.table.put(rec);
                    }
                }
                if !own_present {
                    self.own_lost(out);
                }
            }
        }
    }

    fn own_put(&mut self, rec: &LeaseRecord, out: &mut Vec<Command>) {
        let Own::Etcd(own) = &self.own else { return };
        if let Ok(attrs) = &rec.attrs {
            if attrs.public_ip != own.lease.attrs.public_ip {
                out.push(Command::Stop(Stop::Conflict(format!(
                    "subnet {} is now leased to {} (this node is {}); refusing to keep advertising it",
                    own.lease.key, attrs.public_ip, own.lease.attrs.public_ip
                ))));
            }
        }
    }

    fn own_lost(&mut self, out: &mut Vec<Command>) {
        let own = self.own_mut();
        match own.phase {
            Phase::Held { .. } => {
                tracing::warn!(subnet = %own.lease.key.ipv4, "this node's lease was deleted or expired; re-acquiring the same subnet");
                own.delays = None;
                own.failures = 0;
                own.phase = Phase::Reacquiring;
                out.push(Command::Reacquire(own.reacquire_write()));
            }
            // The renewal's put writes the key again; if it fails, re-acquire then.
            Phase::Renewing { .. } => own.phase = Phase::Renewing { lost: true },
            Phase::Lost { .. } | Phase::Reacquiring => {}
        }
    }

    fn node_event(&mut self, ev: NodeEvent, out: &mut Vec<Command>) {
        match ev {
            NodeEvent::Put(name, rec) => self.node_put(&name, *rec, out),
            NodeEvent::Delete(name) => self.table.remove(&name),
            NodeEvent::Resync(nodes) => {
                self.table.clear();
                for (name, rec) in nodes {
                    self.node_put(&name, rec, out);
                }
            }
        }
    }

    /// Peers are the other nodes carrying Flannel's annotations, keyed by node name.
    fn node_put(
        &mut self,
        name: &str,
        rec: Option<Result<LeaseRecord, crate::registry::kube::NodeError>>,
        out: &mut Vec<Command>,
    ) {
        let Own::Node(own_name, own) = &self.own else {
            return;
        };
        if name == own_name {
            // This node's annotations as twilld wrote them, or someone removed or changed
            // them: then they are written back.
            let intact = matches!(&rec, Some(Ok(r)) if r.attrs.as_ref() == Ok(&own.lease.attrs));
            if !intact {
                tracing::warn!(node = %name, "this node's flannel annotations were removed or changed; writing them back");
                self.own_lost(out);
            }
            return;
        }
        match rec {
            None => self.table.remove(name),
            Some(Ok(rec)) => self.table.put_named(name, &rec),
            Some(Err(reason)) => {
                tracing::warn!(node = %name, %reason, "Error turning node to lease; skipping it");
                self.table.skip(name, reason.to_string());
            }
        }
    }

    fn timer(&mut self, now: Instant, out: &mut Vec<Command>) {
        let own = self.own_mut();
        match own.phase {
            Phase::Held { renew_at: Some(at) } if at <= now => {
                own.phase = Phase::Renewing { lost: false };
                out.push(Command::Renew(LeaseWrite {
                    key: own.lease.key,
                    attrs: own.lease.attrs.clone(),
                    ttl: own.lease.ttl,
                }));
            }
            Phase::Lost { retry_at } if retry_at <= now => {
                own.phase = Phase::Reacquiring;
                out.push(Command::Reacquire(own.reacquire_write()));
            }
            _ => {}
        }
    }

    fn renewed(&mut self, result: WriteResult, now: Instant, out: &mut Vec<Command>) {
        let own = self.own_mut();
        let Phase::Renewing { lost } = own.phase else {
            return;
        };
        match result {
            Ok(ttl) => {
                let renew_at = ttl.map(|t| renew_deadline(now, t, own.margin));
                if ttl.is_some() {
                    tracing::info!(subnet = %own.lease.key.ipv4, after_failures = own.failures, "renewed lease");
                }
                own.succeeded(renew_at);
            }
            Err(_) if lost => {
                own.phase = Phase::Held { renew_at: None };
                self.own_lost(out);
            }
            Err(e) => {
                // Flannel waits a minute; twill retries sooner (within 30 s, with jitter), so a
                // renewal that fell due during an etcd outage is made soon after etcd is back,
                // and not by every node at once.
                let retry = own.next_delay(own.renew_retry);
                tracing::warn!(error = %e, retry_in = ?retry, "renewing lease failed; retrying");
                own.phase = Phase::Held {
                    renew_at: Some(now + retry),
                };
            }
        }
    }

    fn reacquired(&mut self, result: WriteResult, now: Instant, out: &mut Vec<Command>) {
        let own = self.own_mut();
        if !matches!(own.phase, Phase::Reacquiring) {
            return;
        }
        match result {
            Ok(ttl) => {
                own.lease.ttl = ttl;
                tracing::info!(subnet = %own.lease.key.ipv4, "re-acquired lease");
                let renew_at = ttl.map(|t| renew_deadline(now, t, own.margin));
                own.succeeded(renew_at);
            }
            Err(WriteError::AlreadyExists) => out.push(Command::Stop(Stop::Conflict(format!(
                "Lease has been revoked and subnet {} was taken by another node. Shutting down daemon.",
                own.lease.key
            )))),
            Err(WriteError::Failed(e)) => {
                let retry = own.next_delay(own.reacquire_retry);
                tracing::warn!(error = %e, retry_in = ?retry, "re-acquiring lease failed; retrying");
                own.phase = Phase::Lost {
                    retry_at: now + retry,
                };
            }
        }
    }
}

impl EtcdOwn {
    fn reacquire_write(&self) -> LeaseWrite {
        LeaseWrite {
            key: self.lease.key,
            attrs: self.lease.attrs.clone(),
            ttl: self.lease.ttl.or(Some(SUBNET_TTL)),
        }
    }

    fn succeeded(&mut self, renew_at: Option<Instant>) {
        self.phase = Phase::Held { renew_at };
        self.delays = None;
        self.failures = 0;
    }

    /// The next delay of the current run of failures.
    fn next_delay(&mut self, retry: Retry) -> Duration {
        self.failures += 1;
        self.delays
            .get_or_insert_with(|| {
                Box::new(twill_runtime::backoff::retry_delays(retry.min, retry.max))
            })
            .next()
            .unwrap_or(retry.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::testing::{etcd_core, key, own_record, record, DAY, MARGIN, RETRY};
    use crate::registry::etcd::Listing;

    fn etcd(ev: RegistryEvent) -> Event {
        Event::Lease(LeaseEvent::Etcd(ev))
    }

    /// The lease of the peer 10.244.2.0/24 arrives.
    fn put_peer_2(core: &mut Core, now: Instant) -> Vec<Command> {
        core.handle(
            etcd(RegistryEvent::Put(record("10.244.2.0-24", "198.18.0.2", 2))),
            now,
        )
    }

    /// The peers' names in the reconcile command now due.
    fn reconciled(core: &mut Core) -> Vec<String> {
        match core.reconcile() {
            Some(Command::Reconcile(peers)) => peers.into_iter().map(|p| p.name).collect(),
            other => panic!("expected a reconcile, got {other:?}"),
        }
    }

    #[test]
    fn the_first_pass_is_due_at_once_and_then_only_after_an_event() {
        let now = Instant::now();
        let mut core = etcd_core(now, RETRY);
        assert_eq!(reconciled(&mut core), Vec::<String>::new());
        assert_eq!(core.reconcile(), None);
    }

    #[test]
    fn peers_added_and_removed_are_reconciled() {
        let now = Instant::now();
        let mut core = etcd_core(now, RETRY);
        core.reconcile();
        let added = put_peer_2(&mut core, now);
        assert!(added.is_empty(), "{added:?}");
        assert_eq!(reconciled(&mut core), ["10.244.2.0-24"]);
        core.handle(etcd(RegistryEvent::Delete(key("10.244.2.0-24"))), now);
        assert_eq!(reconciled(&mut core), Vec::<String>::new());
    }

    #[test]
    fn a_resync_replaces_the_peers_and_keeps_the_own_lease_out() {
        let now = Instant::now();
        let mut core = etcd_core(now, RETRY);
        put_peer_2(&mut core, now);
        let listing = Listing {
            records: vec![own_record(), record("10.244.3.0-24", "198.18.0.3", 3)],
            revision: 9,
        };
        let commands = core.handle(etcd(RegistryEvent::Resync(listing)), now);
        assert!(commands.is_empty(), "{commands:?}");
        assert_eq!(reconciled(&mut core), ["10.244.3.0-24"]);
    }

    #[test]
    fn a_peers_garbage_is_skipped_with_its_reason_and_the_others_stay() {
        let now = Instant::now();
        let mut core = etcd_core(now, RETRY);
        put_peer_2(&mut core, now);
        core.handle(
            etcd(RegistryEvent::Put(LeaseRecord {
                key: key("10.244.4.0-24"),
                attrs: Err(LeaseAttrs::from_json(b"not JSON").unwrap_err()),
                lease_id: 0,
            })),
            now,
        );
        // Outside the network: a value impossible for this network, named by field.
        core.handle(
            etcd(RegistryEvent::Put(record("10.9.5.0-24", "198.18.0.5", 5))),
            now,
        );
        assert_eq!(reconciled(&mut core), ["10.244.2.0-24"]);
        let skipped = core.skipped();
        assert!(
            skipped["10.244.4.0-24"].contains("bad lease JSON"),
            "{skipped:?}"
        );
        assert!(
            skipped["10.9.5.0-24"].contains("outside Network"),
            "{skipped:?}"
        );
        // Fixed garbage is programmed again and no longer counts as skipped.
        core.handle(
            etcd(RegistryEvent::Put(record("10.244.4.0-24", "198.18.0.4", 4))),
            now,
        );
        assert_eq!(reconciled(&mut core), ["10.244.2.0-24", "10.244.4.0-24"]);
        assert!(!core.skipped().contains_key("10.244.4.0-24"));
    }

    #[test]
    fn losing_the_own_lease_asks_for_one_reacquire() {
        let now = Instant::now();
        let mut core = etcd_core(now, RETRY);
        let own = own_record();
        let commands = core.handle(etcd(RegistryEvent::Delete(own.key)), now);
        assert_eq!(
            commands,
            [Command::Reacquire(LeaseWrite {
                key: own.key,
                attrs: own.attrs.clone().expect("own attrs"),
                ttl: Some(DAY),
            })]
        );
        assert_eq!(core.next_deadline(), None, "no renewal while re-acquiring");
        // An expiry reported again by a resync while the attempt runs asks for nothing more.
        let again = core.handle(etcd(RegistryEvent::Resync(Listing::default())), now);
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn a_resync_without_the_own_lease_asks_for_a_reacquire() {
        let now = Instant::now();
        let mut core = etcd_core(now, RETRY);
        let commands = core.handle(
            etcd(RegistryEvent::Resync(Listing {
                records: vec![record("10.244.2.0-24", "198.18.0.2", 2)],
                revision: 3,
            })),
            now,
        );
        assert!(
            matches!(commands.as_slice(), [Command::Reacquire(w)] if w.key == own_record().key),
            "{commands:?}"
        );
        assert_eq!(reconciled(&mut core), ["10.244.2.0-24"]);
    }

    #[test]
    fn a_reacquired_lease_is_renewed_by_the_configured_margin() {
        let now = Instant::now();
        let mut core = etcd_core(now, RETRY);
        core.handle(etcd(RegistryEvent::Delete(own_record().key)), now);
        let later = now + Duration::from_secs(5);
        let commands = core.handle(Event::Reacquired(Ok(Some(DAY))), later);
        assert!(commands.is_empty(), "{commands:?}");
        assert_eq!(core.next_deadline(), Some(later + DAY - MARGIN));
    }

    #[test]
    fn a_failed_reacquire_is_retried_after_a_jittered_backoff() {
        let now = Instant::now();
        let mut core = etcd_core(now, RETRY);
        core.handle(etcd(RegistryEvent::Delete(own_record().key)), now);
        let commands = core.handle(
            Event::Reacquired(Err(WriteError::Failed("etcd unreachable".into()))),
            now,
        );
        assert!(commands.is_empty(), "{commands:?}");
        let retry_at = core.next_deadline().expect("a retry is scheduled");
        assert!(
            retry_at >= now + RETRY.min && retry_at <= now + 2 * RETRY.min,
            "retry in {:?}",
            retry_at - now
        );
        assert!(core
            .handle(Event::Timer, retry_at - Duration::from_millis(1))
            .is_empty());
        let commands = core.handle(Event::Timer, retry_at);
        assert!(
            matches!(commands.as_slice(), [Command::Reacquire(_)]),
            "{commands:?}"
        );
    }

    /// The delays between eight failed re-acquire attempts of one core.
    fn reacquire_delays(now: Instant) -> Vec<Duration> {
        let mut core = etcd_core(now, RETRY);
        core.handle(etcd(RegistryEvent::Delete(own_record().key)), now);
        let mut at = now;
        let mut delays = Vec::new();
        for _ in 0..8 {
            core.handle(
                Event::Reacquired(Err(WriteError::Failed("etcd unreachable".into()))),
                at,
            );
            let next = core.next_deadline().expect("a retry is scheduled");
            delays.push(next - at);
            at = next;
            core.handle(Event::Timer, at);
        }
        delays
    }

    #[test]
    fn two_nodes_do_not_retry_etcd_in_lockstep() {
        let now = Instant::now();
        let (a, b) = (reacquire_delays(now), reacquire_delays(now));
        assert_ne!(a, b, "two nodes drew the same delays eight times in a row");
        assert!(a.iter().all(|d| *d <= 2 * RETRY.max), "{a:?}");
    }

    #[test]
    fn a_subnet_taken_by_another_node_stops_the_daemon() {
        let now = Instant::now();
        let mut core = etcd_core(now, RETRY);
        core.handle(etcd(RegistryEvent::Delete(own_record().key)), now);
        let commands = core.handle(Event::Reacquired(Err(WriteError::AlreadyExists)), now);
        assert_eq!(
            commands,
            [Command::Stop(Stop::Conflict(
                "Lease has been revoked and subnet 10.244.1.0-24 was taken by another node. Shutting down daemon."
                    .to_string()
            ))]
        );
    }

    #[test]
    fn the_own_key_leased_to_another_address_stops_the_daemon() {
        let now = Instant::now();
        let mut core = etcd_core(now, RETRY);
        let commands = core.handle(
            etcd(RegistryEvent::Put(record("10.244.1.0-24", "198.18.0.9", 9))),
            now,
        );
        assert!(
            matches!(commands.as_slice(), [Command::Stop(Stop::Conflict(m))] if m.contains("now leased to 198.18.0.9")),
            "{commands:?}"
        );
        // The own key with this node's address (its own write, echoed) is no conflict.
        assert!(core
            .handle(etcd(RegistryEvent::Put(own_record())), now)
            .is_empty());
    }

    #[test]
    fn renewals_fall_due_by_the_margin_and_failures_retry_with_jitter() {
        let now = Instant::now();
        let mut core = etcd_core(now, RETRY);
        let due = now + DAY - MARGIN;
        assert_eq!(core.next_deadline(), Some(due));
        assert!(core
            .handle(Event::Timer, due - Duration::from_secs(1))
            .is_empty());
        let commands = core.handle(Event::Timer, due);
        assert!(
            matches!(commands.as_slice(), [Command::Renew(w)] if w.ttl == Some(DAY)),
            "{commands:?}"
        );
        core.handle(
            Event::Renewed(Err(WriteError::Failed("etcd unreachable".into()))),
            due,
        );
        let retry_at = core.next_deadline().expect("a retry is scheduled");
        assert!(
            retry_at >= due + RETRY.min && retry_at <= due + 2 * RETRY.min,
            "retry in {:?}",
            retry_at - due
        );
        core.handle(Event::Timer, retry_at);
        core.handle(Event::Renewed(Ok(Some(DAY))), retry_at);
        assert_eq!(core.next_deadline(), Some(retry_at + DAY - MARGIN));
    }

    #[test]
    fn a_deletion_during_a_failed_renewal_asks_for_a_reacquire() {
        let now = Instant::now();
        let mut core = etcd_core(now, RETRY);
        let due = now + DAY - MARGIN;
        core.handle(Event::Timer, due);
        assert!(core
            .handle(etcd(RegistryEvent::Delete(own_record().key)), due)
            .is_empty());
        let commands = core.handle(
            Event::Renewed(Err(WriteError::Failed("etcd unreachable".into()))),
            due,
        );
        assert!(
            matches!(commands.as_slice(), [Command::Reacquire(_)]),
            "{commands:?}"
        );
    }

    #[test]
    fn a_netlink_overrun_forces_a_full_check_and_a_pass() {
        let now = Instant::now();
        let mut core = etcd_core(now, RETRY);
        core.reconcile();
        let commands = core.handle(Event::Netlink(NetlinkSignal::Overrun), now);
        assert_eq!(commands, [Command::CheckUnderlay]);
        assert!(core.reconcile().is_some(), "an overrun must cause a pass");
        assert!(core
            .handle(Event::Netlink(NetlinkSignal::Changed), now)
            .is_empty());
        assert!(core.reconcile().is_some(), "a change must cause a pass");
    }

    #[test]
    fn a_signal_stops() {
        let now = Instant::now();
        let mut core = etcd_core(now, RETRY);
        assert_eq!(
            core.handle(Event::Shutdown, now),
            [Command::Stop(Stop::Shutdown)]
        );
    }

    #[test]
    fn kubernetes_nodes_are_peers_by_name_without_the_own_node_or_renewals() {
        let now = Instant::now();
        let mut core = kube_core();
        assert_eq!(core.next_deadline(), None);
        let node = |ev| Event::Lease(LeaseEvent::Node(ev));
        let commands = core.handle(
            node(NodeEvent::Resync(vec![
                ("node-a".to_string(), Some(Ok(own_record()))),
                (
                    "node-b".to_string(),
                    Some(Ok(record("10.244.2.0-24", "198.18.0.2", 2))),
                ),
                (
                    "node-c".to_string(),
                    Some(Err(crate::registry::kube::NodeError::NoPodCidr(
                        "node-c".to_string(),
                    ))),
                ),
                ("node-d".to_string(), None),
            ])),
            now,
        );
        assert!(commands.is_empty(), "{commands:?}");
        assert_eq!(reconciled(&mut core), ["node-b"]);
        assert_eq!(
            core.skipped()["node-c"],
            "node \"node-c\" pod cidr not assigned"
        );
        core.handle(node(NodeEvent::Delete("node-b".to_string())), now);
        assert_eq!(reconciled(&mut core), Vec::<String>::new());
    }

    /// A core in Kubernetes mode on node-a, whose annotations hold [`own_record`].
    fn kube_core() -> Core {
        let own = own_record();
        Core::kube(
            crate::daemon::testing::config(),
            "node-a".to_string(),
            OwnLease {
                key: own.key,
                attrs: own.attrs.expect("own attrs"),
                ttl: None,
            },
            RETRY,
        )
    }

    #[test]
    fn kubernetes_annotations_removed_or_changed_are_written_back_once_and_retried() {
        let now = Instant::now();
        let mut core = kube_core();
        let node = |rec| {
            Event::Lease(LeaseEvent::Node(NodeEvent::Put(
                "node-a".to_string(),
                Box::new(rec),
            )))
        };
        // As written: nothing to do.
        assert!(core.handle(node(Some(Ok(own_record()))), now).is_empty());
        // Removed: re-acquired (the same key and attributes), once while in flight.
        let commands = core.handle(node(None), now);
        let own = own_record();
        assert!(
            matches!(&commands[..], [Command::Reacquire(w)] if w.key == own.key && Ok(&w.attrs) == own.attrs.as_ref()),
            "{commands:?}"
        );
        assert!(core
            .handle(
                node(Some(Ok(record("10.244.1.0-24", "198.18.0.9", 1)))),
                now
            )
            .is_empty());
        // A failed write is retried after a delay.
        core.handle(
            Event::Reacquired(Err(WriteError::Failed("API down".into()))),
            now,
        );
        let retry_at = core.next_deadline().expect("a retry is due");
        assert!(matches!(
            &core.handle(Event::Timer, retry_at)[..],
            [Command::Reacquire(_)]
        ));
        core.handle(Event::Reacquired(Ok(None)), retry_at);
        assert_eq!(core.next_deadline(), None);
        // Changed by someone else (another public IP): written back again.
        let changed = record("10.244.1.0-24", "198.18.0.9", 1);
        assert!(matches!(
            &core.handle(node(Some(Ok(changed))), now)[..],
            [Command::Reacquire(_)]
        ));
    }
}
