//! The HTTP endpoints of `twill-policy run`: `/healthz` and `/readyz` (the sync loop's
//! [`Health`]) and `/metrics` (the [`Shared`] metrics' exposition) over TCP, and `/status`
//! and `/endpoints` ([`crate::status`]) on the local unix socket, on axum through
//! twill-runtime's bounded server.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::any;
use axum::Router;
use twill_runtime::http::{
    bind_unix, metrics_handler, serve as serve_router, serve_unix, DEADLINE,
};
use twill_runtime::status::PolicyStatus;

use crate::metrics::{drop_counts, DropTracker, LastGood, Metrics};
use crate::status::{endpoints, kernel_ruleset_id, policy_status, Endpoints, Enforced, TOP_DROPS};
use twill_nft::counters;

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
    /// without errors) is loaded (shared with the metrics' snapshot age).
    good: LastGood,
    /// `/healthz` fails when the loop has not come round for this long (stuck).
    pub live_bound: Duration,
    /// `/readyz` fails when the last confirmation is older than this (or there was none).
    pub ready_max_age: Duration,
}

impl Health {
    pub fn new(live_bound: Duration, ready_max_age: Duration) -> Health {
        Health {
            beat: Mutex::new(Instant::now()),
            good: LastGood::default(),
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

    /// How long ago the last good snapshot was confirmed loaded (None: never).
    pub fn good_age(&self) -> Option<Duration> {
        self.good
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|g| g.elapsed())
    }

    /// `(status, body)` of `/healthz` now.
    pub fn healthz(&self) -> (u16, String) {
        let beat = *self.beat.lock().unwrap_or_else(|e| e.into_inner());
        healthz(beat.elapsed(), self.live_bound)
    }

    /// `(status, body)` of `/readyz` now.
    pub fn readyz(&self) -> (u16, String) {
        readyz(self.good_age(), self.ready_max_age)
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

/// Metrics plus the drop-counter tracker, health and what was enforced; shared by the
/// sync loop and the HTTP servers.
#[derive(Debug)]
pub struct Shared {
    pub metrics: Metrics,
    pub table: String,
    /// This node's name (`/status`, `/endpoints`).
    pub node: String,
    pub drops: Mutex<DropTracker>,
    pub health: Health,
    /// What the sync loop last enforced.
    pub enforced: Mutex<Enforced>,
}

impl Shared {
    pub fn new(table: &str) -> Shared {
        Shared::with_health(table, Health::default())
    }

    /// Shared state whose metrics' snapshot age follows `health`'s good snapshots.
    pub fn with_health(table: &str, health: Health) -> Shared {
        Shared {
            metrics: Metrics::with_last_good(health.good.clone()),
            table: table.to_string(),
            node: String::new(),
            drops: Mutex::new(DropTracker::default()),
            health,
            enforced: Mutex::new(Enforced::default()),
        }
    }

    /// The drop tracker after reading the table's counters now (one netlink dump of its
    /// counter objects; a failure is logged and the last totals stay).
    fn fresh_drops(&self) -> MutexGuard<'_, DropTracker> {
        let mut t = self.drops.lock().unwrap_or_else(|e| e.into_inner());
        match counters::read(&self.table) {
            Ok(named) => t.observe(&drop_counts(&named), &self.metrics),
            Err(e) => tracing::warn!(table = self.table, "reading drop counters: {e}"),
        }
        t
    }

    /// The exposition, with fresh drop counters.
    pub fn scrape(&self) -> String {
        drop(self.fresh_drops());
        self.metrics.render()
    }

    /// `/status`: what was enforced, the ruleset id the kernel holds now, and the pods with
    /// the most drops by the counters read now.
    pub fn status(&self) -> PolicyStatus {
        let top = self.fresh_drops().top(TOP_DROPS);
        let kernel_id = kernel_ruleset_id(&self.table).unwrap_or_else(|e| {
            tracing::warn!(table = self.table, "reading the kernel's ruleset id: {e}");
            None
        });
        let enforced = self
            .enforced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        policy_status(
            &self.node,
            self.health.readyz().0 == 200,
            &enforced,
            kernel_id,
            self.health.good_age(),
            top,
        )
    }

    /// `/endpoints`: the pods of the snapshot last enforced (none before the first).
    pub fn endpoints(&self) -> Endpoints {
        let snap = self
            .enforced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot
            .clone();
        match snap {
            Some(s) => endpoints(&s, &self.node),
            None => Endpoints {
                node: self.node.clone(),
                pods: Vec::new(),
            },
        }
    }
}

/// `answer` as JSON, computed off the async threads (it reads the kernel).
async fn blocking_json<T: serde::Serialize + Send + 'static>(
    shared: Arc<Shared>,
    answer: fn(&Shared) -> T,
) -> axum::response::Response {
    match tokio::task::spawn_blocking(move || answer(&shared)).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("status failed: {e}\n"),
        )
            .into_response(),
    }
}

/// `/status` and `/endpoints` as JSON (any method); other paths get 404.
fn status_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/status",
            any(|State(shared): State<Arc<Shared>>| blocking_json(shared, Shared::status)),
        )
        .route(
            "/endpoints",
            any(|State(shared): State<Arc<Shared>>| blocking_json(shared, Shared::endpoints)),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                [(header::CONTENT_TYPE, "text/plain")],
                "not found\n",
            )
        })
        .with_state(shared)
}

/// Serves `/status` and `/endpoints` on the unix socket `path` (created 0600, a stale one
/// replaced) from a thread with a small tokio runtime of its own. Binds here, so a bad path
/// is the caller's error.
pub fn serve_status(path: &Path, shared: Arc<Shared>) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = {
        let _enter = runtime.enter();
        bind_unix(path)?
    };
    std::thread::Builder::new()
        .name("status".into())
        .spawn(move || runtime.block_on(serve_unix(listener, status_router(shared), DEADLINE)))?;
    Ok(())
}

/// Answers `/healthz` and `/readyz` always (any method), `/metrics` and `/` only if
/// `metrics`; other paths get 404.
fn router(shared: Arc<Shared>, metrics: bool) -> Router {
    let probe = |answer: fn(&Health) -> (u16, String)| {
        move |State(shared): State<Arc<Shared>>| async move {
            let (code, body) = answer(&shared.health);
            let status = if code == 200 {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
        }
    };
    let mut router = Router::new()
        .route("/healthz", any(probe(Health::healthz)))
        .route("/readyz", any(probe(Health::readyz)));
    if metrics {
        // One netlink dump of the table's counters per render; at most one a second.
        let scraped = shared.clone();
        let scrape = metrics_handler(move || scraped.scrape());
        router = router.route("/metrics", scrape.clone()).route("/", scrape);
    }
    router
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                [(header::CONTENT_TYPE, "text/plain")],
                "not found\n",
            )
        })
        .with_state(shared)
}

/// Serves `GET /metrics` (and `/`), `/healthz` and `/readyz` on `addr` from a background
/// thread; other paths get 404. Each connection is bounded in size and time
/// (twill-runtime's HTTP server) and answered in a task of its own.
pub fn serve(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    serve_with(addr, shared, DEADLINE, true)
}

/// Serves only `GET /healthz` and `/readyz` on `addr` (no metrics: it is on by default, and
/// the metrics name pods), from a thread of its own so a slow scrape cannot fail a probe.
pub fn serve_health(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    serve_with(addr, shared, DEADLINE, false)
}

/// Binds `addr` here (so a bad address is the caller's error), then serves from a thread
/// with a small tokio runtime of its own: the sync loop is synchronous.
fn serve_with(
    addr: SocketAddr,
    shared: Arc<Shared>,
    deadline: Duration,
    metrics: bool,
) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(if metrics { "metrics" } else { "health" }.into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => serve_router(listener, router(shared, metrics), deadline).await,
                    Err(e) => tracing::error!("serving HTTP on {local}: {e}"),
                }
            })
        })?;
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpStream;
    use std::time::Duration;

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
        // Given up on: closed without a response, or with hyper's 431 (the hand-written
        // server said 400).
        assert!(s.is_empty() || s.starts_with("HTTP/1.1 431"), "{s}");
        // Both are given up on; the next client is served.
        let mut c = TcpStream::connect(addr).unwrap();
        write!(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK"), "{s}");
    }

    #[test]
    fn status_socket_serves_status_and_endpoints_as_json() {
        let dir = std::env::temp_dir().join(format!("twill-policy-status-{}", std::process::id()));
        let path = dir.join("policy.sock");
        let mut sh = Shared::new("twill-policy-test-no-such-table");
        sh.node = "n1".into();
        let shared = Arc::new(sh);
        serve_status(&path, shared.clone()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let status: PolicyStatus = rt.block_on(twill_runtime::status::fetch(&path)).unwrap();
        assert_eq!(status.node, "n1");
        assert!(!status.ready && !status.fail_closed);
        assert_eq!(status.ruleset_id, None);
        assert_eq!(status.last_good_snapshot_age_seconds, None);
        let e: Endpoints = rt
            .block_on(twill_runtime::status::get_json(&path, "/endpoints"))
            .unwrap();
        assert_eq!(
            e,
            Endpoints {
                node: "n1".into(),
                pods: vec![]
            }
        );
        let missing = rt.block_on(twill_runtime::status::get_json::<Endpoints>(&path, "/nope"));
        assert!(
            matches!(
                missing,
                Err(twill_runtime::status::StatusError::Status { status: 404, .. })
            ),
            "{missing:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
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

    /// `GET path` on `addr`: the whole response, read until the server closes.
    fn get(addr: SocketAddr, path: &str) -> String {
        use std::io::Read;
        let mut c = TcpStream::connect(addr).unwrap();
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn health_server_serves_probes_but_not_metrics() {
        let mut sh = Shared::new("t");
        sh.health = Health::new(Duration::from_secs(300), Duration::from_secs(120));
        let shared = Arc::new(sh);
        let addr = serve_health("127.0.0.1:0".parse().unwrap(), shared.clone()).unwrap();
        let get = |path: &str| get(addr, path);
        let r = get("/healthz");
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(
            r.to_ascii_lowercase()
                .contains("content-type: text/plain\r\n"),
            "{r}"
        );
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
        let shared = Arc::new(Shared::new("t"));
        shared.metrics.rules.set(42);
        let addr = serve("127.0.0.1:0".parse().unwrap(), shared).unwrap();
        let get = |path: &str| get(addr, path);
        let ok = get("/metrics");
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("twill_policy_rules 42"), "{ok}");
        assert!(
            ok.to_ascii_lowercase().contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
            ),
            "{ok}"
        );
        assert!(get("/").starts_with("HTTP/1.1 200 OK"));
        let missing = get("/nope");
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        assert!(missing.ends_with("\r\n\r\nnot found\n"), "{missing}");
        assert!(get("/healthz").starts_with("HTTP/1.1 200 OK"));
        assert!(get("/readyz").starts_with("HTTP/1.1 503"));
    }
}
