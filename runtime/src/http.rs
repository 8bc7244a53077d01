//! The one HTTP server of twilld's and twill-policy's endpoints: an axum router, one task
//! per connection (a slow or hostile client holds only its own), each connection bounded:
//! its request head within [`MAX_HEAD`] bytes and the given deadline, the whole exchange
//! within twice that, one request per connection (`Connection: close`, as the probes and
//! the tests that read a response to its end expect).

use std::path::Path;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, UnixListener};

/// Longest request head (request line and headers) that is read: 8 KiB (also hyper's
/// smallest buffer limit).
pub const MAX_HEAD: usize = 8 << 10;

/// How long a client has to send its request head, and then to take the response.
pub const DEADLINE: Duration = Duration::from_secs(3);

/// Serves `router` on `listener` until accepting fails for good; `deadline` bounds each
/// request head and (doubled) each whole connection.
pub async fn serve(listener: TcpListener, router: Router, deadline: Duration) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => spawn_connection(stream, router.clone(), deadline),
            Err(e) => accept_failed(e).await,
        }
    }
}

/// Content type of prometheus-client's text encoding (OpenMetrics), which Prometheus reads.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a rendered `/metrics` answer is served again before it is rendered anew.
pub const METRICS_MAX_AGE: Duration = Duration::from_secs(1);

/// The `GET /metrics` handler of both daemons: `render` (which may read kernel counters over
/// netlink) runs on the blocking pool, one render at a time and at most once per
/// [`METRICS_MAX_AGE`]; requests in between get the last answer. The metrics ports listen on
/// node addresses that pods can reach, so a pod flooding them costs the daemon at most one
/// render a second instead of a netlink dump and a blocking thread per request.
pub fn metrics_handler<S>(
    render: impl Fn() -> String + Send + Sync + 'static,
) -> axum::routing::MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    use axum::body::Bytes;
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    use std::sync::Arc;
    use std::time::Instant;
    let render = Arc::new(render);
    let last = Arc::new(tokio::sync::Mutex::new(None::<(Instant, Bytes)>));
    axum::routing::get(move || {
        let (render, last) = (render.clone(), last.clone());
        async move {
            // Waiting requests queue here, not on blocking threads.
            let mut last = last.lock().await;
            if let Some((at, text)) = last.as_ref() {
                if at.elapsed() < METRICS_MAX_AGE {
                    return ([(header::CONTENT_TYPE, OPENMETRICS)], text.clone()).into_response();
                }
            }
            match tokio::task::spawn_blocking(move || render()).await {
                Ok(text) => {
                    let text = Bytes::from(text);
                    *last = Some((Instant::now(), text.clone()));
                    ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response()
                }
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    format!("rendering the metrics failed: {e}\n"),
                )
                    .into_response(),
            }
        }
    })
}

/// Binds a unix socket for a local endpoint (the status sockets): creates the parent
/// directory (0755), removes a stale socket file left by an earlier run (one nothing answers
/// on), binds, and makes
/// the socket 0600 so only root on this node can ask. A path that holds something other
/// than a socket is an error, not removed.
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        // A socket someone still answers on belongs to a running daemon: taking it over
        // would leave that daemon unreachable, so a second daemon on the same path fails.
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is served by a running process", path.display()),
                ));
            }
            std::fs::remove_file(path)?
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Like [`serve`], over a unix socket.
pub async fn serve_unix(listener: UnixListener, router: Router, deadline: Duration) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => spawn_connection(stream, router.clone(), deadline),
            Err(e) => accept_failed(e).await,
        }
    }
}

/// One task per connection, bounded as the module says.
fn spawn_connection<S>(stream: S, router: Router, deadline: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    tokio::spawn(async move {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .keep_alive(false)
            .max_buf_size(MAX_HEAD)
            .header_read_timeout(deadline)
            .serve_connection(TokioIo::new(stream), service);
        // A client that sends its head in time but then does not read is dropped too.
        let _ = tokio::time::timeout(deadline * 2, conn).await;
    });
}

/// Out of file descriptors and the like: the next accept may succeed.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "accepting an HTTP connection failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::any;
    use std::io::{Read, Write};

    fn start(deadline: Duration) -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let router = Router::new().route("/x", any(|| async { "x here\n" }));
                serve(listener, router, deadline).await
            });
        });
        addr
    }

    fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn metrics_are_rendered_at_most_once_per_max_age_however_often_asked() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let renders = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = renders.clone();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let router: Router = Router::new().route(
                    "/metrics",
                    metrics_handler(move || {
                        let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                        format!("renders_total {n}\n")
                    }),
                );
                serve(listener, router, DEADLINE).await
            });
        });
        let start = std::time::Instant::now();
        let answers: Vec<String> = (0..50).map(|_| get(addr, "/metrics")).collect();
        let elapsed = start.elapsed();
        for a in &answers {
            assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
            assert!(a.to_ascii_lowercase().contains(OPENMETRICS), "{a}");
        }
        // One render per started second at most (plus the first).
        let most = elapsed.as_secs() as usize + 1;
        let done = renders.load(Ordering::SeqCst);
        assert!(done >= 1 && done <= most, "{done} renders in {elapsed:?}");
        assert!(
            answers[0].ends_with("\r\n\r\nrenders_total 1\n"),
            "{}",
            answers[0]
        );
        // After the max age a new render is made.
        std::thread::sleep(METRICS_MAX_AGE + Duration::from_millis(100));
        let again = get(addr, "/metrics");
        assert!(
            again.ends_with(&format!("renders_total {}\n", done + 1)),
            "{again}"
        );
    }

    #[test]
    fn one_request_per_connection_then_closed() {
        let addr = start(DEADLINE);
        let r = get(addr, "/x");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.to_ascii_lowercase().contains("connection: close"), "{r}");
        assert!(r.ends_with("\r\n\r\nx here\n"), "{r}");
        assert!(get(addr, "/y").starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn slow_or_huge_heads_are_dropped_and_do_not_hold_the_server() {
        let addr = start(Duration::from_millis(300));
        // Says nothing; sends a byte every 20 ms; sends 1 MiB of header.
        let idle = std::net::TcpStream::connect(addr).unwrap();
        // Gives up (false) only if the server keeps it for 30 s; it should close it in 0.6 s.
        let trickle = std::thread::spawn(move || {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            let _ = c.write_all(b"GET /x HTTP/1.1\r\n");
            let give_up = std::time::Instant::now() + Duration::from_secs(30);
            while std::time::Instant::now() < give_up {
                if c.write_all(b"x").is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        });
        let mut huge = std::net::TcpStream::connect(addr).unwrap();
        let _ = huge.write_all(b"GET /x HTTP/1.1\r\nX: ");
        let _ = huge.write_all(&vec![b'a'; 1 << 20]);
        let mut s = String::new();
        let _ = huge.read_to_string(&mut s);
        assert!(!s.contains("200 OK"), "{s}");
        // Meanwhile others are served.
        assert!(get(addr, "/x").starts_with("HTTP/1.1 200 OK"));
        // The idle client is closed after its deadline (read returns 0 or an error).
        let mut idle = idle;
        idle.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(matches!(idle.read(&mut buf), Ok(0) | Err(_)));
        // The trickling client's connection is closed too (its writes start failing).
        assert!(
            trickle.join().unwrap(),
            "a client sending a byte every 20 ms was kept for 30 s"
        );
    }
}
