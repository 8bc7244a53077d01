//! The `policy.networking.k8s.io` resources: served at their own versions with their kinds,
//! cluster-scoped, and made absent (404, as without their CRD) and present again by a test.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use twill_fake_apiserver::client::request;
use twill_fake_apiserver::{FakeApiServer, POLICY_GROUP};

/// The socket file, removed when the test ends, also when it fails.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl std::ops::Deref for SocketFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

/// A server on a Unix socket of its own, run on a thread of its own.
fn serve(name: &str) -> (FakeApiServer, SocketFile) {
    let path =
        std::env::temp_dir().join(format!("fake-apiserver-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let srv = FakeApiServer::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = rt.block_on(async { tokio::net::UnixListener::bind(&path).unwrap() });
    let s = srv.clone();
    std::thread::spawn(move || rt.block_on(s.serve_unix(listener)));
    (srv, SocketFile(path))
}

fn get(socket: &Path, path: &str) -> (u16, String) {
    request(socket, "GET", path, "", "").unwrap()
}

#[test]
fn policy_resources_are_served_at_their_versions_and_can_be_absent() {
    let (srv, sock) = serve("policy-group");
    let cnp = "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies";
    let anp = "/apis/policy.networking.k8s.io/v1alpha1/adminnetworkpolicies";
    let banp = "/apis/policy.networking.k8s.io/v1alpha1/baselineadminnetworkpolicies";
    let (code, body) = request(
        &sock,
        "POST",
        cnp,
        "application/json",
        &json!({"metadata": {"name": "deny"}, "spec": {"tier": "Admin", "priority": 1}})
            .to_string(),
    )
    .unwrap();
    assert_eq!(code, 201, "{body}");
    srv.put(
        POLICY_GROUP,
        "adminnetworkpolicies",
        "",
        json!({"metadata": {"name": "a"}}),
    );
    srv.put(
        POLICY_GROUP,
        "baselineadminnetworkpolicies",
        "",
        json!({"metadata": {"name": "default"}}),
    );
    for (path, kind, version) in [
        (cnp, "ClusterNetworkPolicy", "v1alpha2"),
        (anp, "AdminNetworkPolicy", "v1alpha1"),
        (banp, "BaselineAdminNetworkPolicy", "v1alpha1"),
    ] {
        let (code, body) = get(&sock, path);
        assert_eq!(code, 200, "{path}: {body}");
        let list: Value = serde_json::from_str(&body).unwrap();
        let api_version = format!("policy.networking.k8s.io/{version}");
        assert_eq!(list["kind"], format!("{kind}List"));
        assert_eq!(list["apiVersion"], api_version);
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{body}");
        assert_eq!(items[0]["kind"], kind);
        assert_eq!(items[0]["apiVersion"], api_version);
        assert!(
            items[0]["metadata"].get("namespace").is_none(),
            "cluster-scoped: {body}"
        );
    }
    // The wrong version is not served.
    let (code, _) = get(
        &sock,
        "/apis/policy.networking.k8s.io/v1alpha1/clusternetworkpolicies",
    );
    assert_eq!(code, 404);
    // Absent: 404 for lists, watches and objects, as without the CRD; the others still serve.
    srv.set_absent("clusternetworkpolicies", true);
    for path in [
        cnp.to_string(),
        format!("{cnp}?watch=true"),
        format!("{cnp}/deny"),
    ] {
        let (code, body) = get(&sock, &path);
        assert_eq!(
            (code, body.as_str()),
            (404, "404 page not found\n"),
            "{path}"
        );
    }
    assert_eq!(get(&sock, anp).0, 200);
    // Present again (through the control path), with the object it had.
    let (code, body) = request(
        &sock,
        "POST",
        "/fake/present/clusternetworkpolicies",
        "",
        "",
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, body) = get(&sock, &format!("{cnp}/deny"));
    assert_eq!(code, 200, "{body}");
    let (code, _) = request(&sock, "POST", "/fake/absent/clusternetworkpolicies", "", "").unwrap();
    assert_eq!(code, 200);
    assert_eq!(get(&sock, cnp).0, 404);
}
