//! The binary's compile and explain commands on a small manifests directory (no root).

use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_twill-policy"));
    c.arg("--manifests")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/manifests"))
        .env_remove("NODE_NAME");
    c
}

#[test]
fn compile_prints_the_table_for_this_node_only() {
    let out = bin()
        .args(["--node-name", "n1", "compile"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("10.244.1.2 : jump pod-in/web/a"), "{s}");
    assert!(s.contains("10.244.1.3 : jump pod-in/web/b"), "{s}");
    assert!(!s.contains("10.244.2.2 :"), "db/c is on n2: {s}");
    assert!(s.contains("meta l4proto tcp th dport 8080 return"), "{s}");
    let out = bin()
        .args(["compile", "--fail-closed"])
        .env("NODE_NAME", "n1")
        .output()
        .unwrap();
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(
        s.contains("jump pod-in/web/a") && !s.contains(" return "),
        "{s}"
    );
    let out = bin().arg("compile").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NODE_NAME"));
}

#[test]
fn explain_gives_the_reasons() {
    let out = bin()
        .args([
            "explain", "--from", "web/b", "--to", "web/a", "--port", "8080",
        ])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{s}");
    assert!(
        s.contains("allowed by web/allow-client-to-web ingress[0]"),
        "{s}"
    );
    let out = bin()
        .args([
            "explain", "--from", "db/c", "--to", "web/a", "--port", "8080/TCP",
        ])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{s}");
    assert!(
        s.contains("isolated by web/allow-client-to-web, web/default-deny"),
        "{s}"
    );
    assert!(s.contains("DENIED"), "{s}");
    let out = bin()
        .args([
            "explain",
            "--from",
            "web/a",
            "--to",
            "192.0.2.1",
            "--port",
            "53/udp",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn invalid_manifest_is_reported_with_file_document_and_field() {
    let dir = std::env::temp_dir().join(format!("twill-policy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("p.yaml"),
        "kind: Namespace\nmetadata: {name: x}\n---\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/33}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_twill-policy"))
        .args(["--node-name", "n1", "--manifests"])
        .arg(&dir)
        .arg("compile")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("p.yaml: document 1: spec.ingress[0].from[0].ipBlock.cidr"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
