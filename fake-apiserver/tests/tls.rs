//! The fake API server's HTTPS: a client trusting only the cluster CA gets answers over it,
//! and bad certificate files are refused naming the flag. Certificates come from the
//! `openssl` command (scripts/install-deps.sh installs it); the server listens on loopback.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use twill_fake_apiserver::{test_certificates, tls_acceptor, FakeApiServer};

/// A CA and a server certificate for 127.0.0.1 signed by it: (ca.crt, server.crt, server.key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let c = test_certificates(dir, Ipv4Addr::LOCALHOST.into()).expect("certificates");
    (c.ca_cert, c.server_cert, c.server_key)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fake-apiserver-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test]
async fn https_answers_a_client_that_trusts_the_cluster_ca() {
    let dir = scratch("https");
    let (ca, crt, key) = certificates(&dir);
    let acceptor = tls_acceptor(&crt, &key).expect("acceptor");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(FakeApiServer::new().serve_tls(listener, acceptor));

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&ca).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    tls.write_all(b"GET /api/v1/nodes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"kind\":\"NodeList\""), "{answer}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_certificate_files_are_refused_naming_the_flag() {
    let dir = scratch("bad");
    let (ca, crt, key) = certificates(&dir);
    let missing = dir.join("missing.pem");
    let err = format!("{:#}", tls_acceptor(&missing, &key).err().unwrap());
    assert!(err.contains("--tls-cert"), "{err}");
    let err = format!("{:#}", tls_acceptor(&crt, &missing).err().unwrap());
    assert!(err.contains("--tls-key"), "{err}");
    // The CA's certificate with the server's key: not a pair.
    let err = format!("{:#}", tls_acceptor(&ca, &key).err().unwrap());
    assert!(err.contains("usable pair"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
