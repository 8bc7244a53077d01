//! Prometheus metrics of `twill-policy run` (crate `prometheus-client`), served as text by
//! a tiny HTTP server on `--metrics-addr`.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `twill_policy_sync_duration_seconds` | histogram | compile + apply of one sync |
//! | `twill_policy_syncs_total{result}` | counter | syncs by result: full, incremental, unchanged, fail_closed, failed |
//! | `twill_policy_sync_errors_total{kind}` | counter | `apply` (full ruleset rejected), `fail_closed` (isolation-only table rejected too), `source` (reads with objects that could not be read) |
//! | `twill_policy_broken_namespaces` | gauge | namespaces failing closed because an object in them could not be read |
//! | `twill_policy_rules`, `_chains`, `_sets`, `_set_elements`, `_map_elements` | gauge | size of the ruleset of the last sync |
//! | `twill_policy_fail_closed` | gauge | 1 while the isolation-only table is loaded |
//! | `twill_policy_dropped_packets_total{namespace,pod,direction}` | counter | packets dropped by each pod chain; a pod's series go when it leaves the node |
//! | `twill_policy_last_good_snapshot_age_seconds` | gauge | seconds since the full ruleset of a snapshot read without errors was last confirmed loaded (computed at scrape; absent before the first) |
//!
//! Drops are the table's named counters (one per pod chain and direction, plus the
//! unknown-pod chains), read at scrape time with one netlink dump ([`crate::counters`]); syncs never
//! list the table, which at 10k pods costs nft a second of CPU. [`DropTracker`] keeps the
//! totals monotonic.
//!
//! The HTTP endpoints that serve them, and the sync loop's health, are in [`crate::http`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::enforce::{Applied, SyncReport};
use crate::model::Snapshot;

type Labels = Vec<(String, String)>;

/// All metrics of one enforcer.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub syncs: Family<Labels, Counter>,
    pub errors: Family<Labels, Counter>,
    pub rules: Gauge,
    pub chains: Gauge,
    pub sets: Gauge,
    pub set_elements: Gauge,
    pub map_elements: Gauge,
    pub fail_closed: Gauge,
    pub broken_namespaces: Gauge,
    pub drops: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// When the sync loop last confirmed that a good snapshot's full ruleset is loaded; written
/// by the loop ([`crate::http::Health::good`]), read by `/readyz`, `/status` and scrapes.
pub type LastGood = Arc<Mutex<Option<Instant>>>;

/// `twill_policy_last_good_snapshot_age_seconds`, computed at each scrape from [`LastGood`];
/// left out of the exposition until there is a first good snapshot (an age of 0 would read
/// as fresh).
#[derive(Debug)]
struct SnapshotAge(LastGood);

impl Collector for SnapshotAge {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let good = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(good) = good else {
            return Ok(());
        };
        let gauge = ConstGauge::new(good.elapsed().as_secs_f64());
        let metric = encoder.encode_descriptor(
            "last_good_snapshot_age_seconds",
            "Seconds since the full ruleset of a snapshot read without errors was last confirmed loaded",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

impl Metrics {
    /// Metrics whose snapshot age is never known (tests, one-shot commands).
    pub fn new() -> Metrics {
        Metrics::with_last_good(LastGood::default())
    }

    /// Metrics whose `last_good_snapshot_age_seconds` is computed from `last_good`.
    pub fn with_last_good(last_good: LastGood) -> Metrics {
        let mut registry = Registry::with_prefix("twill_policy");
        // 1 ms .. ~16 s
        let sync_duration = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let m = Metrics {
            sync_duration,
            syncs: Family::default(),
            errors: Family::default(),
            rules: Gauge::default(),
            chains: Gauge::default(),
            sets: Gauge::default(),
            set_elements: Gauge::default(),
            map_elements: Gauge::default(),
            fail_closed: Gauge::default(),
            broken_namespaces: Gauge::default(),
            drops: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "sync_duration_seconds",
            "Time to compile and apply one sync",
            m.sync_duration.clone(),
        );
        registry.register(
            "syncs",
            "Syncs by result (full, incremental, unchanged, fail_closed, failed)",
            m.syncs.clone(),
        );
        registry.register(
            "sync_errors",
            "Sync errors by kind (apply, fail_closed, source)",
            m.errors.clone(),
        );
        registry.register("rules", "Rules in the loaded ruleset", m.rules.clone());
        registry.register("chains", "Chains in the loaded ruleset", m.chains.clone());
        registry.register(
            "sets",
            "Sets and maps in the loaded ruleset",
            m.sets.clone(),
        );
        registry.register(
            "set_elements",
            "Elements (ranges and tuples) of the peer and named-port sets",
            m.set_elements.clone(),
        );
        registry.register(
            "map_elements",
            "Local pod addresses in the ingress/egress dispatch maps",
            m.map_elements.clone(),
        );
        registry.register(
            "fail_closed",
            "1 while the isolation-only (fail-closed) table is loaded",
            m.fail_closed.clone(),
        );
        registry.register(
            "broken_namespaces",
            "Namespaces failing closed because an object in them could not be read",
            m.broken_namespaces.clone(),
        );
        registry.register(
            "dropped_packets",
            "Packets dropped by a pod's policy chain",
            m.drops.clone(),
        );
        registry.register_collector(Box::new(SnapshotAge(last_good)));
        Metrics { registry, ..m }
    }

    /// Records what one sync reports it did: its duration, its result, the size of the
    /// ruleset it loaded, and its errors. Only updates the values served; the sync loop
    /// calls it with the report the enforcer returned.
    pub fn observe(&self, r: &SyncReport) {
        self.sync_duration.observe(r.duration.as_secs_f64());
        let result = match &r.applied {
            Applied::Full => "full",
            Applied::Incremental => "incremental",
            Applied::Unchanged => "unchanged",
            Applied::FailClosed { .. } => "fail_closed",
            Applied::Failed { .. } => "failed",
        };
        self.syncs.get_or_create(&label("result", result)).inc();
        match &r.applied {
            Applied::Full | Applied::Incremental | Applied::Unchanged => {
                let s = r.stats;
                self.rules.set(s.rules as i64);
                self.chains.set(s.chains as i64);
                self.sets.set(s.sets as i64);
                self.set_elements.set(s.set_elements as i64);
                self.map_elements.set(s.map_elements as i64);
                self.fail_closed.set(0);
            }
            Applied::FailClosed { .. } => {
                self.errors.get_or_create(&label("kind", "apply")).inc();
                self.fail_closed.set(1);
            }
            Applied::Failed { .. } => {
                self.errors.get_or_create(&label("kind", "apply")).inc();
                self.errors
                    .get_or_create(&label("kind", "fail_closed"))
                    .inc();
            }
        }
    }

    /// Records a source error: a read with objects that could not be read (or no snapshot
    /// at all).
    pub fn record_source_error(&self) {
        self.errors.get_or_create(&label("kind", "source")).inc();
    }

    /// Records a read of the source: the namespaces it left broken (a gauge), and a source
    /// error if any object could not be read (cluster-scoped ones included).
    pub fn record_source(&self, snap: &Snapshot) {
        self.broken_namespaces.set(snap.broken.len() as i64);
        if !snap.broken.is_empty()
            || !snap.unattributed.is_empty()
            || !snap.broken_cluster.is_empty()
        {
            self.record_source_error();
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        encode(&mut s, &self.registry).expect("writing to a String");
        s
    }
}

/// Drop counter of one pod chain: (namespace/pod or "unknown", direction) -> packets.
pub type DropCounts = BTreeMap<(String, String), u64>;

/// The drop counts in the table's named counters (name -> packets, see [`twill_nft::counters::read`]):
/// `pod-in/<ns>/<pod>` and `pod-out/<ns>/<pod>` per pod and direction, `unknown-ingress` and
/// `unknown-egress` for local addresses no pod is known for yet, `unaddressed` (direction
/// `any`) for traffic from the pod bridge that carries no pod address (link-local, group).
pub fn drop_counts(named: &BTreeMap<String, u64>) -> DropCounts {
    let mut out = DropCounts::new();
    for (name, &packets) in named {
        let (pod, dir) = if let Some(p) = name.strip_prefix("pod-in/") {
            (p, "ingress")
        } else if let Some(p) = name.strip_prefix("pod-out/") {
            (p, "egress")
        } else if let Some(d) = name.strip_prefix("unknown-") {
            ("unknown", d)
        } else if name == "unaddressed" {
            ("unaddressed", "any")
        } else {
            continue;
        };
        *out.entry((pod.to_string(), dir.to_string())).or_default() += packets;
    }
    out
}

/// Turns the counters' current values into monotonic drop totals, one series per pod and
/// direction, and removes a pod's series once its counter is gone.
///
/// The counters are named objects, so flushing and refilling a pod's chain (every
/// incremental update) keeps them counting; they vanish with their pod (its chain and
/// counter are deleted) and start from zero only when the whole table is deleted and
/// created again (the last-resort fallback), which shows as a value lower than the last one
/// read. A counter that vanished is forgotten with its series: a pod re-created with the
/// same name starts a new series from its new counter's value.
#[derive(Debug, Default)]
pub struct DropTracker {
    /// Counter values as last read.
    seen: DropCounts,
    /// The totals served, per (pod, direction): what the series hold.
    totals: DropCounts,
}

/// The labels of the drop series of `pod` ("namespace/name", or "unknown"/"unaddressed").
fn drop_labels(pod: &str, dir: &str) -> Labels {
    let (ns, name) = pod.split_once('/').unwrap_or(("", pod));
    vec![
        ("namespace".to_string(), ns.to_string()),
        ("pod".to_string(), name.to_string()),
        ("direction".to_string(), dir.to_string()),
    ]
}

impl DropTracker {
    /// Accounts the counters `now` read from the loaded table into `metrics`, and removes
    /// the series of counters that are no longer in the table.
    pub fn observe(&mut self, now: &DropCounts, metrics: &Metrics) {
        for ((pod, dir), &n) in now {
            let key = (pod.clone(), dir.clone());
            let delta = match self.seen.get(&key).copied() {
                Some(p) if n >= p => n - p,
                _ => n,
            };
            if delta > 0 {
                metrics
                    .drops
                    .get_or_create(&drop_labels(pod, dir))
                    .inc_by(delta);
                *self.totals.entry(key).or_default() += delta;
            }
        }
        for (pod, dir) in self.seen.keys().filter(|k| !now.contains_key(*k)) {
            metrics.drops.remove(&drop_labels(pod, dir));
            self.totals.remove(&(pod.clone(), dir.clone()));
        }
        self.seen = now.clone();
    }

    /// The `limit` pods ("namespace/name") with the most drops served, most first (ties
    /// by pod and direction); the unknown-pod and unaddressed counters are no pods.
    pub fn top(&self, limit: usize) -> Vec<(String, String, u64)> {
        let mut v: Vec<(String, String, u64)> = self
            .totals
            .iter()
            .filter(|((pod, _), n)| pod.contains('/') && **n > 0)
            .map(|((pod, dir), n)| (pod.clone(), dir.clone(), *n))
            .collect();
        v.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| (&a.0, &a.1).cmp(&(&b.0, &b.1))));
        v.truncate(limit);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::Stats;
    use std::time::Duration;

    #[test]
    fn a_cluster_scoped_object_that_cannot_be_read_is_a_source_error_and_breaks_no_namespace() {
        let m = Metrics::new();
        let mut s = Snapshot::default();
        m.record_source(&s);
        assert!(!m.render().contains("sync_errors_total{kind=\"source\"}"));
        s.broken_cluster = vec![crate::source::ObjectError::default()];
        m.record_source(&s);
        let text = m.render();
        assert!(
            text.contains("twill_policy_sync_errors_total{kind=\"source\"} 1"),
            "{text}"
        );
        assert!(text.contains("twill_policy_broken_namespaces 0"), "{text}");
    }

    #[test]
    fn text_exposition_has_every_metric() {
        let m = Metrics::new();
        m.observe(&SyncReport {
            applied: Applied::Full,
            stats: Stats {
                chains: 4,
                rules: 20,
                sets: 6,
                set_elements: 9,
                map_elements: 3,
            },
            duration: Duration::from_millis(30),
            changed_chains: vec![],
            changed_elements: 0,
            conntrack: None,
        });
        m.observe(&SyncReport {
            applied: Applied::FailClosed {
                error: "boom".into(),
            },
            stats: Stats::default(),
            duration: Duration::from_millis(2),
            changed_chains: vec![],
            changed_elements: 0,
            conntrack: None,
        });
        let broken = Snapshot::default().with_broken([
            ("x".to_string(), crate::source::ObjectError::default()),
            ("y".to_string(), crate::source::ObjectError::default()),
        ]);
        m.record_source(&broken);
        let mut t = DropTracker::default();
        let mut c = DropCounts::new();
        c.insert(("x/a".into(), "ingress".into()), 5);
        t.observe(&c, &m);
        c.insert(("x/a".into(), "ingress".into()), 7);
        t.observe(&c, &m);
        // Table deleted and created again: the counter starts from zero; totals keep growing.
        c.insert(("x/a".into(), "ingress".into()), 1);
        t.observe(&c, &m);
        let text = m.render();
        for want in [
            "# TYPE twill_policy_sync_duration_seconds histogram",
            "twill_policy_sync_duration_seconds_count 2",
            "twill_policy_sync_duration_seconds_bucket{le=\"0.05\"} 2",
            "twill_policy_sync_duration_seconds_bucket{le=\"0.025\"} 1",
            "twill_policy_syncs_total{result=\"full\"} 1",
            "twill_policy_syncs_total{result=\"fail_closed\"} 1",
            "twill_policy_sync_errors_total{kind=\"apply\"} 1",
            "twill_policy_sync_errors_total{kind=\"source\"} 1",
            "twill_policy_rules 20",
            "twill_policy_chains 4",
            "twill_policy_sets 6",
            "twill_policy_set_elements 9",
            "twill_policy_map_elements 3",
            "twill_policy_fail_closed 1",
            "twill_policy_broken_namespaces 2",
            "# TYPE twill_policy_dropped_packets counter",
            "twill_policy_dropped_packets_total{namespace=\"x\",pod=\"a\",direction=\"ingress\"} 8",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    fn report(applied: Applied, stats: Stats) -> SyncReport {
        SyncReport {
            applied,
            stats,
            duration: Duration::from_millis(3),
            changed_chains: vec![],
            changed_elements: 0,
            conntrack: None,
        }
    }

    #[test]
    fn observe_records_each_kind_of_sync() {
        let m = Metrics::new();
        let stats = |rules| Stats {
            rules,
            ..Stats::default()
        };
        let value = |text: &str, name: &str| -> Option<String> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_string))
        };
        m.observe(&report(Applied::Full, stats(10)));
        m.observe(&report(Applied::Incremental, stats(12)));
        m.observe(&report(Applied::Unchanged, stats(12)));
        let text = m.render();
        assert_eq!(value(&text, "twill_policy_rules").as_deref(), Some("12"));
        assert_eq!(
            value(&text, "twill_policy_fail_closed").as_deref(),
            Some("0")
        );
        assert!(!text.contains("twill_policy_sync_errors_total{"), "{text}");
        // A rejected ruleset: the isolation table is loaded, the last sizes stay.
        let error = "boom".to_string();
        m.observe(&report(Applied::FailClosed { error }, Stats::default()));
        let text = m.render();
        assert_eq!(value(&text, "twill_policy_rules").as_deref(), Some("12"));
        assert_eq!(
            value(&text, "twill_policy_fail_closed").as_deref(),
            Some("1")
        );
        // Both rejected: an error of each kind, and the fail-closed gauge as it was.
        let failed = Applied::Failed {
            error: "boom".into(),
            fail_closed_error: "bang".into(),
        };
        m.observe(&report(failed, Stats::default()));
        // Recovery clears the fail-closed gauge and takes the new sizes.
        m.observe(&report(Applied::Full, stats(7)));
        let text = m.render();
        for (name, want) in [
            ("twill_policy_syncs_total{result=\"full\"}", "2"),
            ("twill_policy_syncs_total{result=\"incremental\"}", "1"),
            ("twill_policy_syncs_total{result=\"unchanged\"}", "1"),
            ("twill_policy_syncs_total{result=\"fail_closed\"}", "1"),
            ("twill_policy_syncs_total{result=\"failed\"}", "1"),
            ("twill_policy_sync_errors_total{kind=\"apply\"}", "2"),
            ("twill_policy_sync_errors_total{kind=\"fail_closed\"}", "1"),
            ("twill_policy_sync_duration_seconds_count", "6"),
            ("twill_policy_rules", "7"),
            ("twill_policy_fail_closed", "0"),
        ] {
            assert_eq!(
                value(&text, name).as_deref(),
                Some(want),
                "{name} in:\n{text}"
            );
        }
    }

    fn drops(pairs: &[(&str, &str, u64)]) -> DropCounts {
        pairs
            .iter()
            .map(|(p, d, n)| ((p.to_string(), d.to_string()), *n))
            .collect()
    }

    #[test]
    fn a_pod_that_leaves_loses_its_series_and_a_new_one_starts_from_its_counter() {
        let m = Metrics::new();
        let mut t = DropTracker::default();
        t.observe(&drops(&[("x/a", "ingress", 5), ("x/b", "egress", 2)]), &m);
        t.observe(&drops(&[("x/a", "ingress", 9), ("x/b", "egress", 2)]), &m);
        let text = m.render();
        assert!(text.contains("twill_policy_dropped_packets_total{namespace=\"x\",pod=\"a\",direction=\"ingress\"} 9"), "{text}");
        assert_eq!(
            t.top(10),
            vec![
                ("x/a".to_string(), "ingress".to_string(), 9),
                ("x/b".to_string(), "egress".to_string(), 2)
            ]
        );
        // x/a leaves: its counter is gone from the table, and so is its series.
        t.observe(&drops(&[("x/b", "egress", 3)]), &m);
        let text = m.render();
        assert!(!text.contains("pod=\"a\""), "{text}");
        assert!(text.contains("twill_policy_dropped_packets_total{namespace=\"x\",pod=\"b\",direction=\"egress\"} 3"), "{text}");
        // Re-created with the same name: a new series from the new counter's value (lower
        // than the old total, which is no reset of a series that no longer exists).
        t.observe(&drops(&[("x/a", "ingress", 1), ("x/b", "egress", 3)]), &m);
        let text = m.render();
        assert!(text.contains("twill_policy_dropped_packets_total{namespace=\"x\",pod=\"a\",direction=\"ingress\"} 1"), "{text}");
        assert_eq!(t.top(1), vec![("x/b".to_string(), "egress".to_string(), 3)]);
        // Non-pod counters are served but are no pods in the top list.
        t.observe(&drops(&[("unknown", "egress", 50)]), &m);
        assert!(t.top(10).is_empty());
        assert!(m
            .render()
            .contains("pod=\"unknown\",direction=\"egress\"} 50"));
    }

    #[test]
    fn snapshot_age_is_absent_until_the_first_good_snapshot() {
        let last_good = LastGood::default();
        let m = Metrics::with_last_good(last_good.clone());
        assert!(
            !m.render().contains("last_good_snapshot_age"),
            "{}",
            m.render()
        );
        *last_good.lock().unwrap() = Some(Instant::now() - std::time::Duration::from_secs(42));
        let text = m.render();
        assert!(
            text.contains("# TYPE twill_policy_last_good_snapshot_age_seconds gauge"),
            "{text}"
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("twill_policy_last_good_snapshot_age_seconds "))
            .unwrap();
        let age: f64 = line.split(' ').nth(1).unwrap().parse().unwrap();
        assert!((42.0..100.0).contains(&age), "{line}");
    }

    #[test]
    fn drop_counts_from_named_counters() {
        let named: BTreeMap<String, u64> = [
            ("pod-in/x/a", 3),
            ("pod-out/y/b", 0),
            ("unknown-egress", 2),
            ("unaddressed", 4),
            ("something-else", 99),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let c = drop_counts(&named);
        assert_eq!(c.len(), 4, "{c:?}");
        assert_eq!(c[&("x/a".to_string(), "ingress".to_string())], 3);
        assert_eq!(c[&("y/b".to_string(), "egress".to_string())], 0);
        assert_eq!(c[&("unknown".to_string(), "egress".to_string())], 2);
        assert_eq!(c[&("unaddressed".to_string(), "any".to_string())], 4);
    }
}
