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
//! | `twill_policy_dropped_packets_total{namespace,pod,direction}` | counter | packets dropped by each pod chain |
//!
//! Drops are the table's named counters (one per pod chain and direction, plus the
//! unknown-pod chains), read at scrape time with one netlink dump ([`counters`]); syncs never
//! list the table, which at 10k pods costs nft a second of CPU. [`DropTracker`] keeps the
//! totals monotonic.
//!
//! [`Health`] is the sync loop's liveness and readiness, served as `/healthz` and `/readyz`
//! by [`serve_health`] (on by default) and by the metrics server.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::counters;
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

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

impl Metrics {
    pub fn new() -> Metrics {
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
    /// error if any object could not be read.
    pub fn record_source(&self, snap: &Snapshot) {
        self.broken_namespaces.set(snap.broken.len() as i64);
        if !snap.broken.is_empty() || !snap.unattributed.is_empty() {
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

/// The drop counts in the table's named counters (name -> packets, see [`counters::read`]):
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

/// Turns the counters' current values into monotonic drop totals.
///
/// The counters are named objects, so flushing and refilling a pod's chain (every
/// incremental update) keeps them counting; they vanish with their pod and start from zero
/// only when the whole table is deleted and created again (the last-resort fallback), which
/// shows as a value lower than the last one read.
#[derive(Debug, Default)]
pub struct DropTracker {
    /// Counter values as last read.
    seen: DropCounts,
}

impl DropTracker {
    /// Accounts the counters `now` read from the loaded table into `metrics`.
    pub fn observe(&mut self, now: &DropCounts, metrics: &Metrics) {
        for ((pod, dir), &n) in now {
            let prev = self.seen.get(&(pod.clone(), dir.clone())).copied();
            let delta = match prev {
                Some(p) if n >= p => n - p,
                _ => n,
            };
            if delta > 0 {
                let (ns, name) = pod.split_once('/').unwrap_or(("", pod));
                let labels = vec![
                    ("namespace".to_string(), ns.to_string()),
                    ("pod".to_string(), name.to_string()),
                    ("direction".to_string(), dir.clone()),
                ];
                metrics.drops.get_or_create(&labels).inc_by(delta);
            }
        }
        self.seen = now.clone();
    }
}

/// Default [`Health::live_bound`]: longer than the slowest pass of the loop (a source read,
/// then up to five nft runs of at most 30 s each).
pub const LIVE_BOUND: Duration = Duration::from_secs(300);
/// Default [`Health::ready_max_age`].
pub const READY_MAX_AGE: Duration = Duration::from_secs(120);

/// Liveness and readiness of the sync loop, written by the loop, read by the HTTP server.
#[derive(Debug)]
pub struct Health {
    /// When the loop last came round.
    beat: Mutex<Instant>,
    /// When the loop last confirmed that the full ruleset of the source's newest state (read
    /// without errors) is loaded.
    good: Mutex<Option<Instant>>,
    /// `/healthz` fails when the loop has not come round for this long (stuck).
    pub live_bound: Duration,
    /// `/readyz` fails when the last confirmation is older than this (or there was none).
    pub ready_max_age: Duration,
}

impl Health {
    pub fn new(live_bound: Duration, ready_max_age: Duration) -> Health {
        Health {
            beat: Mutex::new(Instant::now()),
            good: Mutex::new(None),
            live_bound,
            ready_max_age,
        }
    }

    /// The loop came round.
    pub fn beat(&self) {
        *self.beat.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// The source's newest state (read without errors) is what the kernel enforces.
    pub fn good(&self) {
        *self.good.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// `(status, body)` of `/healthz` now.
    pub fn healthz(&self) -> (u16, String) {
        let beat = *self.beat.lock().unwrap_or_else(|e| e.into_inner());
        healthz(beat.elapsed(), self.live_bound)
    }

    /// `(status, body)` of `/readyz` now.
    pub fn readyz(&self) -> (u16, String) {
        let good = *self.good.lock().unwrap_or_else(|e| e.into_inner());
        readyz(good.map(|g| g.elapsed()), self.ready_max_age)
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new(LIVE_BOUND, READY_MAX_AGE)
    }
}

/// `/healthz`: 200 while the sync loop came round less than `bound` ago, else 503.
pub fn healthz(beat_age: Duration, bound: Duration) -> (u16, String) {
    let (age, bound_s) = (beat_age.as_secs_f64(), bound.as_secs_f64());
    if beat_age < bound {
        (
            200,
            format!("ok: sync loop came round {age:.1}s ago (bound {bound_s:.0}s)\n"),
        )
    } else {
        (
            503,
            format!("stuck: sync loop last came round {age:.1}s ago, bound {bound_s:.0}s\n"),
        )
    }
}

/// `/readyz`: 200 when a good snapshot's full ruleset was confirmed loaded less than
/// `max_age` ago, else 503. The body says the age and the bound.
pub fn readyz(good_age: Option<Duration>, max_age: Duration) -> (u16, String) {
    let max = max_age.as_secs_f64();
    match good_age {
        Some(a) if a < max_age => (
            200,
            format!(
                "ready: good snapshot enforced, confirmed {:.1}s ago (max age {max:.0}s)\n",
                a.as_secs_f64()
            ),
        ),
        Some(a) => (
            503,
            format!(
                "not ready: good snapshot last confirmed {:.1}s ago, older than max age {max:.0}s\n",
                a.as_secs_f64()
            ),
        ),
        None => (
            503,
            format!("not ready: no good snapshot applied yet (max age {max:.0}s)\n"),
        ),
    }
}

/// Metrics plus the drop-counter tracker; shared by the sync loop and the HTTP server.
#[derive(Debug)]
pub struct Shared {
    pub metrics: Metrics,
    pub table: String,
    pub drops: Mutex<DropTracker>,
    pub health: Health,
}

impl Shared {
    pub fn new(table: &str) -> Shared {
        Shared {
            metrics: Metrics::new(),
            table: table.to_string(),
            drops: Mutex::new(DropTracker::default()),
            health: Health::default(),
        }
    }

    /// The exposition, with fresh drop counters (one netlink dump of the table's counter
    /// objects; a failure is logged and the last totals are served).
    pub fn scrape(&self) -> String {
        match counters::read(&self.table) {
            Ok(named) => {
                let mut t = self.drops.lock().unwrap_or_else(|e| e.into_inner());
                t.observe(&drop_counts(&named), &self.metrics);
            }
            Err(e) => tracing::warn!(table = self.table, "reading drop counters: {e}"),
        }
        self.metrics.render()
    }
}

/// Longest request head (request line and headers) that is read: 8 KiB.
const MAX_HEAD: usize = 8 << 10;

/// How long a client has to send its request head, and then to take the response.
const DEADLINE: Duration = Duration::from_secs(3);

/// Reads a request head from `conn`: up to its blank line, at most `MAX_HEAD` bytes,
/// until `deadline` (the whole request, not each read: a client sending a byte now and
/// then cannot hold the server). Returns the bytes and whether the head is complete.
fn read_head(conn: &mut TcpStream, deadline: Instant) -> (Vec<u8>, bool) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return (buf, true);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if buf.len() >= MAX_HEAD || left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return (buf, false);
        }
        let want = (MAX_HEAD - buf.len()).min(chunk.len());
        match conn.read(&mut chunk[..want]) {
            Ok(0) | Err(_) => return (buf, false),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Writes `data` to `conn` until `deadline` (a client that does not read is dropped).
fn write_until(conn: &mut TcpStream, mut data: &[u8], deadline: Instant) {
    while !data.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_write_timeout(Some(left)).is_err() {
            return;
        }
        match conn.write(data) {
            Ok(0) | Err(_) => return,
            Ok(n) => data = &data[n..],
        }
    }
}

/// Answers one connection: the request head is read within [`DEADLINE`] and
/// [`MAX_HEAD`] bytes, the response written within another [`DEADLINE`]. `/healthz` and
/// `/readyz` always; `/metrics` only if `metrics`.
fn handle(mut conn: TcpStream, shared: &Shared, deadline: Duration, metrics: bool) {
    let (head, complete) = read_head(&mut conn, Instant::now() + deadline);
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let probe = match path {
        "/healthz" => Some(shared.health.healthz()),
        "/readyz" => Some(shared.health.readyz()),
        _ => None,
    };
    let (status, ctype, body) = if !complete {
        (
            "400 Bad Request",
            "text/plain",
            "request head too long or too slow\n".to_string(),
        )
    } else if let Some((code, body)) = probe {
        let status = if code == 200 {
            "200 OK"
        } else {
            "503 Service Unavailable"
        };
        (status, "text/plain", body)
    } else if metrics && (path == "/metrics" || path == "/") {
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.scrape(),
        )
    } else {
        ("404 Not Found", "text/plain", "not found\n".to_string())
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    write_until(&mut conn, reply.as_bytes(), Instant::now() + deadline);
}

/// Serves `GET /metrics` (and `/`), `/healthz` and `/readyz` on `addr` from a background
/// thread; other paths get 404. One connection at a time, each bounded in size and time
/// (see [`handle`]).
pub fn serve(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    serve_with(addr, shared, DEADLINE, true)
}

/// Serves only `GET /healthz` and `/readyz` on `addr` (no metrics: it is on by default, and
/// the metrics name pods), from a thread of its own so a slow scrape cannot fail a probe.
pub fn serve_health(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    serve_with(addr, shared, DEADLINE, false)
}

fn serve_with(
    addr: SocketAddr,
    shared: Arc<Shared>,
    deadline: Duration,
    metrics: bool,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name(if metrics { "metrics" } else { "health" }.into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                handle(conn, &shared, deadline, metrics);
            }
        })?;
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::Stats;
    use std::time::Duration;

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

    #[test]
    fn request_heads_are_bounded_in_size_and_time() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // A request line with no end: read_line kept it all in memory.
        let flood = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            let _ = c.write_all(&vec![b'A'; 1 << 20]);
        });
        let (mut conn, _) = listener.accept().unwrap();
        let (head, complete) = read_head(&mut conn, Instant::now() + Duration::from_secs(10));
        assert_eq!((head.len(), complete), (MAX_HEAD, false));
        drop(conn);
        flood.join().unwrap();
        // A byte every 20 ms: the 5 s read timeout was renewed by every byte; the deadline
        // is for the whole head.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let trickle = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(addr).unwrap();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    if c.write_all(b"x").is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let (mut conn, _) = listener.accept().unwrap();
        let (head, complete) = read_head(&mut conn, Instant::now() + Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(!complete);
        assert!(!head.is_empty() && head.len() < 100, "{}", head.len());
        trickle.join().unwrap();
    }

    #[test]
    fn slow_or_huge_requests_do_not_hold_the_server() {
        use std::io::Read;
        let shared = Arc::new(Shared::new("t"));
        let addr = serve_with(
            "127.0.0.1:0".parse().unwrap(),
            shared,
            Duration::from_millis(300),
            true,
        )
        .unwrap();
        // A client that connects and says nothing, then one that sends 1 MiB of header.
        let _idle = TcpStream::connect(addr).unwrap();
        let mut huge = TcpStream::connect(addr).unwrap();
        let _ = huge.write_all(b"GET /metrics HTTP/1.1\r\nX: ");
        let _ = huge.write_all(&vec![b'a'; 1 << 20]);
        let mut s = String::new();
        let _ = huge.read_to_string(&mut s);
        assert!(s.is_empty() || s.starts_with("HTTP/1.1 400"), "{s}");
        // Both are given up on; the next client is served.
        let mut c = TcpStream::connect(addr).unwrap();
        write!(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK"), "{s}");
    }

    #[test]
    fn health_and_readiness_decisions() {
        let b = Duration::from_secs(300);
        let (code, body) = healthz(Duration::from_secs(2), b);
        assert_eq!(code, 200, "{body}");
        assert!(
            body.contains("2.0s ago") && body.contains("bound 300s"),
            "{body}"
        );
        let (code, body) = healthz(Duration::from_secs(301), b);
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("301.0s") && body.contains("300s"), "{body}");

        let max = Duration::from_secs(120);
        let (code, body) = readyz(None, max);
        assert_eq!(code, 503, "{body}");
        assert!(
            body.contains("no good snapshot") && body.contains("max age 120s"),
            "{body}"
        );
        let (code, body) = readyz(Some(Duration::from_millis(1500)), max);
        assert_eq!(code, 200, "{body}");
        assert!(
            body.contains("1.5s ago") && body.contains("max age 120s"),
            "{body}"
        );
        let (code, body) = readyz(Some(Duration::from_secs(120)), max);
        assert_eq!(code, 503, "{body}");
        assert!(
            body.contains("120.0s ago") && body.contains("older than"),
            "{body}"
        );
    }

    #[test]
    fn health_server_serves_probes_but_not_metrics() {
        use std::io::Read;
        let mut sh = Shared::new("t");
        sh.health = Health::new(Duration::from_secs(300), Duration::from_secs(120));
        let shared = Arc::new(sh);
        let addr = serve_health("127.0.0.1:0".parse().unwrap(), shared.clone()).unwrap();
        let get = |path: &str| {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).unwrap();
            s
        };
        let r = get("/healthz");
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        let r = get("/readyz");
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("max age 120s"), "{r}");
        shared.health.good();
        let r = get("/readyz");
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(get("/metrics").starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn http_server_serves_metrics_and_404() {
        use std::io::Read;
        let shared = Arc::new(Shared::new("t"));
        shared.metrics.rules.set(42);
        let addr = serve("127.0.0.1:0".parse().unwrap(), shared).unwrap();
        let get = |path: &str| {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).unwrap();
            s
        };
        let ok = get("/metrics");
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("twill_policy_rules 42"), "{ok}");
        assert!(get("/nope").starts_with("HTTP/1.1 404"));
        assert!(get("/healthz").starts_with("HTTP/1.1 200 OK"));
        assert!(get("/readyz").starts_with("HTTP/1.1 503"));
    }
}
