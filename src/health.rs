//! `/healthz` and `/readyz` on `--healthz-ip:--healthz-port`, with flanneld's bodies (two
//! fixed answers, any method), and twill's `GET /metrics` ([`crate::metrics`]), on axum
//! through twill-runtime's bounded server (the connection is closed after each response).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// Set once rules are installed and subnet.env is written.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Tells systemd the daemon is up (`sd_notify READY=1`, as flanneld does after start-up), so
/// `Type=notify` units order dependants after the network is ready. A no-op outside systemd.
pub fn notify_systemd_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = std::path::PathBuf::from(path);
    let sent = std::os::unix::net::UnixDatagram::unbound().and_then(|sock| {
        // A leading '@' names a socket in the abstract namespace.
        match path.to_str().and_then(|p| p.strip_prefix('@')) {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
                sock.send_to_addr(b"READY=1", &addr)
            }
            None => sock.send_to(b"READY=1", &path),
        }
    });
    if let Err(e) = sent {
        tracing::warn!(socket = %path.display(), error = %e, "sd_notify READY=1 failed");
    }
}

/// Status line and body for a request path. Pure.
pub fn respond(path: &str, ready: bool) -> (u16, &'static str) {
    match path {
        "/healthz" => (200, "flanneld is running"),
        "/readyz" if ready => (200, "flanneld is ready"),
        "/readyz" => (503, "flanneld is not ready yet"),
        _ => (404, "404 page not found"),
    }
}

/// Serves `/healthz` and `/readyz` (any method), `GET /metrics`, and flanneld's 404 for
/// other paths on `addr` with twill-runtime's bounded HTTP server.
pub async fn serve(
    addr: SocketAddr,
    readiness: Readiness,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    twill_runtime::http::serve(
        listener,
        router(readiness, metrics),
        twill_runtime::http::DEADLINE,
    )
    .await;
    Ok(())
}

/// `/healthz` and `/readyz` with flanneld's bodies, `/metrics`; other paths get flanneld's 404.
fn router(readiness: Readiness, metrics: Arc<Metrics>) -> Router {
    let answer = |path: &'static str| {
        move |State(readiness): State<Readiness>| async move {
            reply(respond(path, readiness.is_ready()))
        }
    };
    Router::new()
        .route("/healthz", any(answer("/healthz")))
        .route("/readyz", any(answer("/readyz")))
        // The guard's counters are read over netlink at scrape.
        .route(
            "/metrics",
            twill_runtime::http::metrics_handler(move || metrics.render()),
        )
        .fallback(|| async { reply(respond("", false)) })
        .with_state(readiness)
}

fn reply((code, body): (u16, &'static str)) -> Response {
    let status = StatusCode::from_u16(code).expect("a status respond() gives");
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_notify_sends_ready_to_the_socket() {
        let dir = std::env::temp_dir().join(format!("twill-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify_systemd_ready();
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 32];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn served_with_flanneld_bodies_and_content_type() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let readiness = Readiness::default();
        tokio::spawn(twill_runtime::http::serve(
            listener,
            router(readiness.clone(), Arc::new(Metrics::new())),
            twill_runtime::http::DEADLINE,
        ));
        let get = |path: &'static str| async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!("POST {path}?x=1 HTTP/1.1\r\nHost: x\r\n\r\n");
            c.write_all(request.as_bytes()).await.unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).await.unwrap();
            s
        };
        let r = get("/readyz").await;
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nflanneld is not ready yet"), "{r}");
        assert!(
            r.to_ascii_lowercase()
                .contains("content-type: text/plain; charset=utf-8\r\n"),
            "{r}"
        );
        readiness.set_ready();
        let r = get("/readyz").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nflanneld is ready"), "{r}");
        let r = get("/healthz").await;
        assert!(r.ends_with("\r\n\r\nflanneld is running"), "{r}");
        let r = get("/nowhere").await;
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n404 page not found"), "{r}");
    }

    #[tokio::test]
    async fn metrics_are_served_as_openmetrics_text() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        metrics.record_renewal(true);
        tokio::spawn(twill_runtime::http::serve(
            listener,
            router(Readiness::default(), metrics),
            twill_runtime::http::DEADLINE,
        ));
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut r = String::new();
        c.read_to_string(&mut r).await.unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.to_ascii_lowercase().contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
            ),
            "{r}"
        );
        assert!(r.contains("\ntwilld_lease_renewals_total 1\n"), "{r}");
        assert!(r.ends_with("# EOF\n"), "{r}");
    }

    #[test]
    fn bodies_match_flanneld() {
        assert_eq!(respond("/healthz", false), (200, "flanneld is running"));
        assert_eq!(
            respond("/readyz", false),
            (503, "flanneld is not ready yet")
        );
        assert_eq!(respond("/readyz", true), (200, "flanneld is ready"));
        assert_eq!(respond("/metrics", true).0, 404);
    }
}
