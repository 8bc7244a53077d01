//! Prometheus metrics of `twill-policy run` (crate `prometheus-client`), served as text by
//! a tiny HTTP server on `--metrics-addr`.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `twill_policy_sync_duration_seconds` | histogram | compile + apply of one sync |
//! | `twill_policy_syncs_total{result}` | counter | syncs by result: full, incremental, unchanged, fail_closed, failed |
//! | `twill_policy_sync_errors_total{kind}` | counter | `apply` (full ruleset rejected), `fail_closed` (isolation-only table rejected too), `source` (invalid manifests) |
//! | `twill_policy_rules`, `_chains`, `_sets`, `_set_elements`, `_map_elements` | gauge | size of the ruleset of the last sync |
//! | `twill_policy_fail_closed` | gauge | 1 while the isolation-only table is loaded |
//! | `twill_policy_dropped_packets_total{namespace,pod,direction}` | counter | packets dropped by each pod chain |
//!
//! Drops are read from the table's own counters (`nft -t -j list table`). Every sync replaces
//! the table, which resets them, so [`DropTracker`] reads them right before each apply and
//! at scrape time and keeps monotonic totals (packets dropped between that last read and
//! the replacement are not counted).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::model::Snapshot;
use crate::nft::{Applied, Enforcer, Nft, SyncReport};

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
            "dropped_packets",
            "Packets dropped by a pod's policy chain",
            m.drops.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Records one sync.
    pub fn record_sync(&self, r: &SyncReport) {
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

    /// Records a source error (invalid manifests).
    pub fn record_source_error(&self) {
        self.errors.get_or_create(&label("kind", "source")).inc();
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        encode(&mut s, &self.registry).expect("writing to a String");
        s
    }
}

/// Drop counter of one pod chain: (namespace/pod or chain name, direction) -> packets.
pub type DropCounts = BTreeMap<(String, String), u64>;

/// Reads the drop counters of every pod chain from `nft -j list table inet <table>` output.
pub fn parse_drop_counters(json: &str) -> DropCounts {
    let mut out = DropCounts::new();
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return out;
    };
    let Some(items) = v.get("nftables").and_then(|x| x.as_array()) else {
        return out;
    };
    for item in items {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let Some(chain) = rule.get("chain").and_then(|c| c.as_str()) else {
            continue;
        };
        let (dir, pod) = if let Some(p) = chain.strip_prefix("pod-in/") {
            ("ingress", p)
        } else if let Some(p) = chain.strip_prefix("pod-out/") {
            ("egress", p)
        } else if let Some(p) = chain.strip_prefix("unknown-") {
            (p, "unknown")
        } else {
            continue;
        };
        let Some(expr) = rule.get("expr").and_then(|e| e.as_array()) else {
            continue;
        };
        let drops = expr.iter().any(|e| e.get("drop").is_some());
        let packets = expr
            .iter()
            .find_map(|e| e.get("counter")?.get("packets")?.as_u64());
        if let (true, Some(n)) = (drops, packets) {
            *out.entry((pod.to_string(), dir.to_string())).or_default() += n;
        }
    }
    out
}

/// Keeps monotonic drop totals although every sync resets the table's counters.
#[derive(Debug, Default)]
pub struct DropTracker {
    /// Counter values of the currently loaded table, as last read.
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

    /// An incremental update added, refilled or deleted these chains: their counters
    /// start again from zero, the others keep counting.
    pub fn chains_reset(&mut self, chains: &[String]) {
        for c in chains {
            let key = if let Some(p) = c.strip_prefix("pod-in/") {
                (p.to_string(), "ingress".to_string())
            } else if let Some(p) = c.strip_prefix("pod-out/") {
                (p.to_string(), "egress".to_string())
            } else {
                continue;
            };
            self.seen.remove(&key);
        }
    }

    /// The table was replaced: its counters start again from zero.
    pub fn table_replaced(&mut self) {
        self.seen.clear();
    }
}

/// Metrics plus what is needed to read the drop counters; shared by the sync loop and
/// the HTTP server.
#[derive(Debug)]
pub struct Shared {
    pub metrics: Metrics,
    pub nft: Nft,
    pub table: String,
    pub drops: Mutex<DropTracker>,
    /// The drop-counter thread of the last sync.
    pending: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Shared {
    pub fn new(nft: Nft, table: &str) -> Shared {
        Shared {
            metrics: Metrics::new(),
            nft,
            table: table.to_string(),
            drops: Mutex::new(DropTracker::default()),
            pending: Mutex::new(None),
        }
    }

    /// Reads the table's counters into the drop totals (holding the tracker lock).
    fn read_drops(&self, t: &mut DropTracker) {
        if let Ok(out) = self
            .nft
            // -t: without set elements (a large table lists in milliseconds).
            .run(&["-t", "-j", "list", "table", "inet", &self.table], "")
        {
            t.observe(&parse_drop_counters(&out), &self.metrics);
        }
    }

    /// Syncs `snap` through `enf` and records it. The drop counters are read by a listing
    /// started before the compile, on a thread of its own that accounts them and then
    /// forgets the counters the apply reset; the sync does not wait for it (`nft -t -j
    /// list table` takes 0.2-1 s at 110k set elements on a busy node, the incremental
    /// apply ~20 ms). nft dumps the table at its start, long before the apply; should the
    /// dump come after it, a refilled chain's few new drops are counted twice. Each
    /// listing thread first waits for the previous one, so accounting stays in order.
    pub fn sync(self: &Arc<Self>, enf: &mut Enforcer, snap: &Snapshot) -> SyncReport {
        let (tx, rx) = std::sync::mpsc::channel::<(Applied, Vec<String>)>();
        let me = Arc::clone(self);
        let prev = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let handle = std::thread::spawn(move || {
            let out = me
                .nft
                // -t: without set elements.
                .run(&["-t", "-j", "list", "table", "inet", &me.table], "");
            if let Some(p) = prev {
                let _ = p.join();
            }
            let reset = rx.recv().ok();
            let mut t = me.drops.lock().unwrap_or_else(|e| e.into_inner());
            if let Ok(out) = out {
                t.observe(&parse_drop_counters(&out), &me.metrics);
            }
            match reset {
                None | Some((Applied::Unchanged, _)) => {}
                Some((Applied::Incremental, chains)) => t.chains_reset(&chains),
                Some(_) => t.table_replaced(),
            }
        });
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        let r = enf.sync(snap);
        let _ = tx.send((r.applied.clone(), r.changed_chains.clone()));
        self.metrics.record_sync(&r);
        r
    }

    /// The exposition, with fresh drop counters.
    pub fn scrape(&self) -> String {
        {
            let mut t = self.drops.lock().unwrap_or_else(|e| e.into_inner());
            self.read_drops(&mut t);
        }
        self.metrics.render()
    }
}

/// Serves `GET /metrics` (and `/`) on `addr` from a background thread; other paths get 404.
pub fn serve(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                let mut reader = BufReader::new(match conn.try_clone() {
                    Ok(c) => c,
                    Err(_) => continue,
                });
                let mut request = String::new();
                if reader.read_line(&mut request).is_err() {
                    continue;
                }
                // Drain the headers.
                loop {
                    let mut l = String::new();
                    match reader.read_line(&mut l) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if l == "\r\n" || l == "\n" => break,
                        Ok(_) => {}
                    }
                }
                let path = request.split_whitespace().nth(1).unwrap_or("");
                let (status, ctype, body) = if path == "/metrics" || path == "/" {
                    (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        shared.scrape(),
                    )
                } else {
                    ("404 Not Found", "text/plain", "not found\n".to_string())
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
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
        m.record_sync(&SyncReport {
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
        });
        m.record_sync(&SyncReport {
            applied: Applied::FailClosed {
                error: "boom".into(),
            },
            stats: Stats::default(),
            duration: Duration::from_millis(2),
            changed_chains: vec![],
            changed_elements: 0,
        });
        m.record_source_error();
        let mut t = DropTracker::default();
        let mut c = DropCounts::new();
        c.insert(("x/a".into(), "ingress".into()), 5);
        t.observe(&c, &m);
        c.insert(("x/a".into(), "ingress".into()), 7);
        t.observe(&c, &m);
        // Table replaced: counters start from zero again; totals keep growing.
        t.table_replaced();
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
            "# TYPE twill_policy_dropped_packets counter",
            "twill_policy_dropped_packets_total{namespace=\"x\",pod=\"a\",direction=\"ingress\"} 8",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn drop_counters_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
 {"table": {"family": "inet", "name": "twill-policy", "handle": 1}},
 {"rule": {"family": "inet", "table": "twill-policy", "chain": "pod-in/x/a", "handle": 5,
   "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@s"}}, {"return": null}]}},
 {"rule": {"family": "inet", "table": "twill-policy", "chain": "pod-in/x/a", "handle": 6,
   "expr": [{"limit": {"rate": 5, "burst": 10, "per": "second"}}, {"log": {"prefix": "p"}}]}},
 {"rule": {"family": "inet", "table": "twill-policy", "chain": "pod-in/x/a", "handle": 7,
   "expr": [{"counter": {"packets": 3, "bytes": 180}}, {"drop": null}]}},
 {"rule": {"family": "inet", "table": "twill-policy", "chain": "pod-out/y/b", "handle": 9,
   "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}},
 {"rule": {"family": "inet", "table": "twill-policy", "chain": "unknown-egress", "handle": 11,
   "expr": [{"counter": {"packets": 2, "bytes": 0}}, {"drop": null}]}},
 {"rule": {"family": "inet", "table": "twill-policy", "chain": "forward", "handle": 10,
   "expr": [{"counter": {"packets": 99, "bytes": 0}}, {"drop": null}]}}]}"#;
        let c = parse_drop_counters(json);
        assert_eq!(c.len(), 3, "{c:?}");
        assert_eq!(c[&("x/a".to_string(), "ingress".to_string())], 3);
        assert_eq!(c[&("y/b".to_string(), "egress".to_string())], 0);
        assert_eq!(c[&("unknown".to_string(), "egress".to_string())], 2);
        assert!(parse_drop_counters("not json").is_empty());
    }

    #[test]
    fn http_server_serves_metrics_and_404() {
        use std::io::Read;
        let shared = Arc::new(Shared::new(
            Nft {
                bin: "false".into(),
                timeout: Duration::from_secs(2),
            },
            "t",
        ));
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
    }
}
