//! twilld's Prometheus metrics (crate `prometheus-client`), served as `GET /metrics` on the
//! health server (`--healthz-ip:--healthz-port`).
//!
//! | metric | type | what |
//! |---|---|---|
//! | `twilld_peers_known` | gauge | other nodes' leases accepted as peers |
//! | `twilld_peers_programmed` | gauge | peers whose every desired kernel entry was in place after the last reconcile |
//! | `twilld_peer_leases_skipped{reason}` | gauge | leases skipped now, by reason code |
//! | `twilld_reconcile_duration_seconds` | histogram | one observe/decide/diff/apply pass |
//! | `twilld_reconciles_total{result}` | counter | passes by result: `ok`, `error` |
//! | `twilld_kernel_operations_total{kind}` | counter | netlink writes applied, by kind |
//! | `twilld_drift_repairs_total{component}` | counter | passes that put back what someone else removed or changed: `peers`, `masquerade`, `underlay_guard` |
//! | `twilld_lease_renewals_total`, `twilld_lease_renewal_failures_total` | counter | etcd lease renewals |
//! | `twilld_lease_expiry_seconds` | gauge | seconds until this node's lease expires, at scrape (absent when it does not expire) |
//! | `twilld_registry_watch_restarts_total`, `twilld_registry_relists_total` | counter | the lease watch |
//! | `twilld_underlay_guard_dropped_packets_total{rule}` | counter | packets dropped by the underlay guard's rules |
//!
//! The daemon records what happened where it happens (the event loop, the dataplane, the
//! watch); the core stays pure and reports counts instead. Values that mean "now" are computed
//! at scrape: the lease expiry from the deadline recorded at the last grant, the guard's drops
//! from its named counters, read with one netlink dump ([`twill_nft::counters`]).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use twill_backends::Op;

type Labels = Vec<(String, String)>;

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

/// A drift repair's component (the `component` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Peers,
    Masquerade,
    UnderlayGuard,
}

impl Component {
    fn label(self) -> &'static str {
        match self {
            Component::Peers => "peers",
            Component::Masquerade => "masquerade",
            Component::UnderlayGuard => "underlay_guard",
        }
    }
}

/// The `kind` label of a kernel operation.
pub fn op_kind(op: &Op) -> &'static str {
    match op {
        Op::DelRoute(_) => "route_delete",
        Op::SetRoute(_) => "route_replace",
        Op::DelNeighbour { .. } => "neighbor_delete",
        Op::SetNeighbour { .. } => "neighbor_replace",
        Op::DelFdb { .. } => "fdb_delete",
        Op::SetFdb { .. } => "fdb_replace",
    }
}

/// A skipped lease's reason as a snake_case code (the `reason` label): the reasons are
/// sentences naming values, which would make a series per lease.
pub fn reason_code(reason: &str) -> &'static str {
    let reason = reason.to_lowercase();
    REASON_CODES
        .iter()
        .find(|(needle, _)| reason.contains(needle))
        .map(|(_, code)| *code)
        .unwrap_or(OTHER_REASON)
}

/// The code of a reason none of [`REASON_CODES`] matches.
const OTHER_REASON: &str = "invalid_lease";

/// (text in the lower-cased reason, code), first match wins.
const REASON_CODES: [(&str, &str); 17] = [
    ("bad lease json", "bad_lease_json"),
    // validate_peer's "lease <key>: <field>: <reason>", by field.
    (": backendtype: ", "backend_type_mismatch"),
    (": backenddata", "bad_backend_data"),
    (": backendv6data", "bad_backend_data"),
    (": publicip: ", "bad_public_ip"),
    (": publicipv6: ", "bad_public_ip"),
    (": subnet: ", "bad_subnet"),
    // The decide step's reasons.
    ("ignoring non-", "backend_type_mismatch"),
    ("outside the flannel network", "outside_network"),
    ("overlaps this node's own subnet", "overlaps_own_subnet"),
    ("already leased by another peer", "overlaps_peer"),
    ("does not match the family", "family_mismatch"),
    ("not on-link", "not_on_link"),
    ("no vxlan device", "no_vxlan_device"),
    ("no vtepmac", "no_vtep_mac"),
    ("annotation", "bad_node_annotation"),
    ("pod cidr", "bad_pod_cidr"),
];

/// Every `kind` label of `twilld_kernel_operations_total`.
const OP_KINDS: [&str; 6] = [
    "route_replace",
    "route_delete",
    "neighbor_replace",
    "neighbor_delete",
    "fdb_replace",
    "fdb_delete",
];

/// What one reconcile pass did, as the dataplane reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PassReport {
    /// Seconds the pass took.
    pub duration: f64,
    /// Whether it finished (the kernel could be read and the ops sent).
    pub ok: bool,
    /// Ops applied (not failed), by kind label.
    pub applied: BTreeMap<&'static str, u64>,
    /// Whether the pass put back entries it had already programmed (removed or changed by
    /// someone else), as opposed to programming new peers.
    pub repaired: bool,
    /// Peers accepted and, of them, those with every desired entry in place after the pass.
    pub peers_known: usize,
    pub peers_programmed: usize,
    /// Leases skipped now, by reason code.
    pub skipped: BTreeMap<&'static str, i64>,
}

/// All of twilld's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    peers_known: Gauge,
    peers_programmed: Gauge,
    leases_skipped: Family<Labels, Gauge>,
    reconcile_duration: Histogram,
    reconciles: Family<Labels, Counter>,
    kernel_ops: Family<Labels, Counter>,
    drift_repairs: Family<Labels, Counter>,
    lease_renewals: Counter,
    lease_renewal_failures: Counter,
    lease_expiry: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    watch_restarts: Counter,
    relists: Counter,
    guard_drops: Family<Labels, Counter>,
    /// When this node's lease expires (`None`: it does not, or is not held).
    lease_expires_at: Mutex<Option<Instant>>,
    /// Whether the guard's counters are read at scrape (off in unit tests and tools).
    read_guard: bool,
    /// The guard's counters as last read: a whole-table replace resets them, so the totals
    /// served add what grew since (or all of it, after a reset).
    guard_last: Mutex<BTreeMap<String, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered; the guard's counters are not read (see [`Metrics::daemon`]).
    pub fn new() -> Metrics {
        Self::build(false)
    }

    /// The daemon's metrics: as [`Metrics::new`], and each scrape reads the underlay guard's
    /// counters from the kernel (this process's network namespace).
    pub fn daemon() -> Metrics {
        Self::build(true)
    }

    fn build(read_guard: bool) -> Metrics {
        let mut registry = Registry::with_prefix("twilld");
        let m = Metrics {
            registry: Registry::default(),
            peers_known: Gauge::default(),
            peers_programmed: Gauge::default(),
            leases_skipped: Family::default(),
            // 1 ms .. 10 s
            reconcile_duration: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            reconciles: Family::default(),
            kernel_ops: Family::default(),
            drift_repairs: Family::default(),
            lease_renewals: Counter::default(),
            lease_renewal_failures: Counter::default(),
            lease_expiry: Family::default(),
            watch_restarts: Counter::default(),
            relists: Counter::default(),
            guard_drops: Family::default(),
            lease_expires_at: Mutex::new(None),
            read_guard,
            guard_last: Mutex::new(BTreeMap::new()),
        };
        registry.register(
            "peers_known",
            "Other nodes' leases accepted as peers",
            m.peers_known.clone(),
        );
        registry.register(
            "peers_programmed",
            "Peers whose every desired kernel entry was in place after the last reconcile",
            m.peers_programmed.clone(),
        );
        registry.register(
            "peer_leases_skipped",
            "Peer leases skipped now, by reason",
            m.leases_skipped.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Time of one dataplane reconcile pass",
            prometheus_client::registry::Unit::Seconds,
            m.reconcile_duration.clone(),
        );
        registry.register(
            "reconciles",
            "Dataplane reconcile passes by result (ok, error)",
            m.reconciles.clone(),
        );
        registry.register(
            "kernel_operations",
            "Netlink writes applied, by kind",
            m.kernel_ops.clone(),
        );
        registry.register(
            "drift_repairs",
            "Passes that put back what someone else removed or changed, by component",
            m.drift_repairs.clone(),
        );
        registry.register(
            "lease_renewals",
            "Renewals of this node's etcd lease",
            m.lease_renewals.clone(),
        );
        registry.register(
            "lease_renewal_failures",
            "Failed renewals of this node's etcd lease",
            m.lease_renewal_failures.clone(),
        );
        registry.register_with_unit(
            "lease_expiry",
            "Seconds until this node's lease expires",
            prometheus_client::registry::Unit::Seconds,
            m.lease_expiry.clone(),
        );
        registry.register(
            "registry_watch_restarts",
            "Restarts of the lease watch after it failed",
            m.watch_restarts.clone(),
        );
        registry.register(
            "registry_relists",
            "Full re-lists of the leases",
            m.relists.clone(),
        );
        registry.register(
            "underlay_guard_dropped_packets",
            "Packets dropped by the underlay guard, by rule",
            m.guard_drops.clone(),
        );
        // Every known label value exists from the start at 0, so a scrape shows every series
        // (a rate over a series that appears late loses its first increase).
        for result in ["ok", "error"] {
            drop(m.reconciles.get_or_create(&label("result", result)));
        }
        for kind in OP_KINDS {
            drop(m.kernel_ops.get_or_create(&label("kind", kind)));
        }
        for c in [
            Component::Peers,
            Component::Masquerade,
            Component::UnderlayGuard,
        ] {
            drop(
                m.drift_repairs
                    .get_or_create(&label("component", c.label())),
            );
        }
        m.zero_skipped();
        for rule in crate::underlay::DROP_COUNTERS {
            drop(m.guard_drops.get_or_create(&label("rule", rule)));
        }
        Metrics { registry, ..m }
    }

    /// Every reason code's gauge at 0.
    fn zero_skipped(&self) {
        for (_, code) in REASON_CODES {
            self.leases_skipped
                .get_or_create(&label("reason", code))
                .set(0);
        }
        self.leases_skipped
            .get_or_create(&label("reason", OTHER_REASON))
            .set(0);
    }

    /// Records one reconcile pass.
    pub fn record_pass(&self, r: &PassReport) {
        self.reconcile_duration.observe(r.duration);
        let result = if r.ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&label("result", result))
            .inc();
        for (kind, n) in &r.applied {
            self.kernel_ops
                .get_or_create(&label("kind", kind))
                .inc_by(*n);
        }
        if r.repaired {
            self.record_repair(Component::Peers);
        }
        if r.ok {
            self.peers_known.set(r.peers_known as i64);
            self.peers_programmed.set(r.peers_programmed as i64);
            self.zero_skipped();
            for (code, n) in &r.skipped {
                self.leases_skipped
                    .get_or_create(&label("reason", code))
                    .set(*n);
            }
        }
    }

    /// Records a pass that put back what someone else removed or changed.
    pub fn record_repair(&self, component: Component) {
        self.drift_repairs
            .get_or_create(&label("component", component.label()))
            .inc();
    }

    /// Records a renewal's outcome.
    pub fn record_renewal(&self, ok: bool) {
        if ok {
            self.lease_renewals.inc();
        } else {
            self.lease_renewal_failures.inc();
        }
    }

    /// This node's lease now expires at `at` (`None`: it does not expire, or is not held).
    pub fn set_lease_expiry(&self, at: Option<Instant>) {
        *self
            .lease_expires_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = at;
    }

    pub fn record_watch_restart(&self) {
        self.watch_restarts.inc();
    }

    pub fn record_relist(&self) {
        self.relists.inc();
    }

    /// Adds the guard's counters as read from the kernel (counter name -> packets) to the
    /// totals served. A counter below its last reading was reset (the table was replaced
    /// whole), so all of it is new.
    pub fn record_guard_counters(&self, read: &BTreeMap<String, u64>) {
        let mut last = self.guard_last.lock().unwrap_or_else(|p| p.into_inner());
        for rule in crate::underlay::DROP_COUNTERS {
            let now = read.get(rule).copied().unwrap_or(0);
            let before = last.get(rule).copied().unwrap_or(0);
            let grown = if now >= before { now - before } else { now };
            // get_or_create also makes the series exist at 0, so a dashboard sees every rule.
            self.guard_drops
                .get_or_create(&label("rule", rule))
                .inc_by(grown);
            last.insert(rule.to_string(), now);
        }
    }

    /// The OpenMetrics text exposition, with the values that mean "now" computed first.
    pub fn render(&self) -> String {
        self.refresh_at_scrape(Instant::now());
        let mut s = String::new();
        encode(&mut s, &self.registry).expect("writing to a String");
        s
    }

    fn refresh_at_scrape(&self, now: Instant) {
        let expires = *self
            .lease_expires_at
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.lease_expiry.clear();
        if let Some(at) = expires {
            let left = at.saturating_duration_since(now).as_secs_f64();
            self.lease_expiry.get_or_create(&Vec::new()).set(left);
        }
        if self.read_guard {
            match twill_nft::counters::read(crate::underlay::TABLE) {
                Ok(read) => self.record_guard_counters(&read),
                Err(e) => tracing::debug!(error = %e, "reading the underlay guard's counters"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn every_contract_metric_is_registered_with_its_name() {
        let m = Metrics::new();
        // The one series absent until set: a lease that expires (etcd mode).
        m.set_lease_expiry(Some(Instant::now() + Duration::from_secs(60)));
        let text = m.render();
        for name in [
            "twilld_peers_known",
            "twilld_peers_programmed",
            "twilld_peer_leases_skipped",
            "twilld_reconcile_duration_seconds",
            "twilld_reconciles_total",
            "twilld_kernel_operations_total",
            "twilld_drift_repairs_total",
            "twilld_lease_renewals_total",
            "twilld_lease_renewal_failures_total",
            "twilld_lease_expiry_seconds",
            "twilld_registry_watch_restarts_total",
            "twilld_registry_relists_total",
            "twilld_underlay_guard_dropped_packets_total",
        ] {
            let family = name.trim_end_matches("_total");
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{name} missing in\n{text}"
            );
        }
    }

    #[test]
    fn a_pass_is_counted_by_result_kind_and_repair() {
        let m = Metrics::new();
        m.record_pass(&PassReport {
            duration: 0.002,
            ok: true,
            applied: [("route_replace", 2), ("fdb_replace", 1)].into(),
            repaired: true,
            peers_known: 3,
            peers_programmed: 2,
            skipped: [("not_on_link", 1)].into(),
        });
        let text = m.render();
        assert!(
            text.contains("twilld_reconciles_total{result=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("twilld_kernel_operations_total{kind=\"route_replace\"} 2\n"));
        assert!(text.contains("twilld_drift_repairs_total{component=\"peers\"} 1\n"));
        assert!(text.contains("twilld_peers_known 3\n"));
        assert!(text.contains("twilld_peers_programmed 2\n"));
        assert!(text.contains("twilld_peer_leases_skipped{reason=\"not_on_link\"} 1\n"));
        // A skipped reason that is gone is back at 0.
        m.record_pass(&PassReport {
            ok: true,
            ..Default::default()
        });
        assert!(m
            .render()
            .contains("twilld_peer_leases_skipped{reason=\"not_on_link\"} 0\n"));
    }

    #[test]
    fn the_lease_expiry_is_computed_at_scrape_and_absent_when_none() {
        let m = Metrics::new();
        assert!(line(&m.render(), "twilld_lease_expiry_seconds ").is_none());
        let now = Instant::now();
        m.set_lease_expiry(Some(now + Duration::from_secs(3600)));
        m.refresh_at_scrape(now + Duration::from_secs(600));
        let mut s = String::new();
        encode(&mut s, &m.registry).unwrap();
        assert_eq!(
            line(&s, "twilld_lease_expiry_seconds "),
            Some("twilld_lease_expiry_seconds 3000.0")
        );
    }

    #[test]
    fn guard_drops_stay_monotonic_across_a_table_replace() {
        let m = Metrics::new();
        let read = |n: u64| BTreeMap::from([(VXLAN.to_string(), n)]);
        const VXLAN: &str = crate::underlay::VXLAN_FROM_NON_PEER;
        m.record_guard_counters(&read(5));
        m.record_guard_counters(&read(7));
        // The table was replaced: the kernel counter restarted at 0 and counted 2 since.
        m.record_guard_counters(&read(2));
        let text = m.render();
        assert!(
            text.contains(
                "twilld_underlay_guard_dropped_packets_total{rule=\"vxlan_from_non_peer\"} 9\n"
            ),
            "{text}"
        );
        assert!(text.contains("{rule=\"pod_to_vxlan_port\"} 0\n"), "{text}");
    }

    #[test]
    fn reasons_become_codes() {
        assert_eq!(
            reason_code("host-gw needs L2 adjacency, but the public IP 1.2.3.4 of subnet 10.244.2.0/24 is not on-link on the external interface"),
            "not_on_link"
        );
        assert_eq!(reason_code("bad lease JSON: EOF"), "bad_lease_json");
        assert_eq!(
            reason_code(
                "lease 10.244.200.0-24: BackendType: is \"host-gw\", this node uses \"vxlan\""
            ),
            "backend_type_mismatch"
        );
        assert_eq!(
            reason_code(
                "lease 10.244.9.0-24: subnet: 10.244.9.0/24 is outside Network 10.244.0.0/16"
            ),
            "bad_subnet"
        );
        assert_eq!(
            reason_code("ignoring non-vxlan subnet: BackendType is \"host-gw\""),
            "backend_type_mismatch"
        );
        assert_eq!(
            reason_code("node \"c\" pod cidr not assigned"),
            "bad_pod_cidr"
        );
        assert_eq!(reason_code("something new"), "invalid_lease");
    }
}
