//! The fake API server's HTTPS: a client trusting only the cluster CA gets answers over it,
//! and bad certificate files are refused naming the flag. Certificates come from the
//! `openssl` command (scripts/install-deps.sh installs it); the server listens on loopback.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use twill_fake_apiserver::{tls_acceptor, FakeApiServer};

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it: (ca.crt, server.crt, server.key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca_key, ca_crt, key, csr, crt, ext) = (
        p("ca.key"),
        p("ca.crt"),
        p("server.key"),
        p("server.csr"),
        p("server.crt"),
        p("server.ext"),
    );
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_crt,
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    openssl(&ca);
    let mut req = vec!["req"];
    req.extend(ec);
    req.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=apiserver"]);
    openssl(&req);
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &crt,
        "-days",
        "2",
        "-extfile",
        &ext,
    ]);
    (ca_crt.into(), crt.into(), key.into())
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
