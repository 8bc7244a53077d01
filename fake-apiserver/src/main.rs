//! `twill-fake-apiserver --listen 198.18.0.1:6443 [--control-socket PATH] [--tls-cert PEM
//! --tls-key PEM]`: the fake API server of [`twill_fake_apiserver`] as a process, so lab tests
//! can run it inside a lab namespace. With a certificate and key it serves HTTPS on `--listen`
//! (as in-cluster clients expect), else plain HTTP.
//! The control socket serves the same API (and `/fake/` controls) on a Unix socket, which a
//! test in the root namespace can reach without sending a packet anywhere.

use twill_fake_apiserver::FakeApiServer;

fn usage() -> ! {
    eprintln!(
        "usage: twill-fake-apiserver --listen ADDR:PORT [--control-socket PATH] [--tls-cert PEM --tls-key PEM]"
    );
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let mut listen = None;
    let mut socket = None;
    let mut tls_cert = None;
    let mut tls_key = None;
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
            "--tls-cert" => tls_cert = Some(std::path::PathBuf::from(v)),
            "--tls-key" => tls_key = Some(std::path::PathBuf::from(v)),
            _ => usage(),
        }
    }
    let listen = listen.unwrap_or_else(|| usage());
    let tls = match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => Some(twill_fake_apiserver::tls_acceptor(&cert, &key)?),
        (None, None) => None,
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    };
    let srv = FakeApiServer::new();
    let tcp = tokio::net::TcpListener::bind(&listen).await?;
    tracing::info!(%listen, https = tls.is_some(), "fake API server listening");
    if let Some(path) = socket {
        let _ = std::fs::remove_file(&path);
        let unix = tokio::net::UnixListener::bind(&path)?;
        tracing::info!(%path, "control socket");
        tokio::spawn(srv.clone().serve_unix(unix));
    }
    match tls {
        Some(tls) => srv.serve_tls(tcp, tls).await?,
        None => srv.serve_tcp(tcp).await?,
    }
    Ok(())
}
