//! `twill-fake-apiserver --listen 198.18.0.1:6443 [--control-socket PATH]`: the fake API server
//! of [`twill_fake_apiserver`] as a process, so lab tests can run it inside a lab namespace.
//! The control socket serves the same API (and `/fake/` controls) on a Unix socket, which a
//! test in the root namespace can reach without sending a packet anywhere.

use twill_fake_apiserver::FakeApiServer;

fn usage() -> ! {
    eprintln!("usage: twill-fake-apiserver --listen ADDR:PORT [--control-socket PATH]");
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let mut listen = None;
    let mut socket = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let (k, v) = match a.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let v = v.or_else(|| args.next()).unwrap_or_else(|| usage());
        match k.as_str() {
            "--listen" => listen = Some(v),
            "--control-socket" => socket = Some(v),
            _ => usage(),
        }
    }
    let listen = listen.unwrap_or_else(|| usage());
    let srv = FakeApiServer::new();
    let tcp = tokio::net::TcpListener::bind(&listen).await?;
    tracing::info!(%listen, "fake API server listening");
    if let Some(path) = socket {
        let _ = std::fs::remove_file(&path);
        let unix = tokio::net::UnixListener::bind(&path)?;
        tracing::info!(%path, "control socket");
        tokio::spawn(srv.clone().serve_unix(unix));
    }
    srv.serve_tcp(tcp).await?;
    Ok(())
}
