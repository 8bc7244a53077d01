//! The binary's compile and explain commands on a small manifests directory (no root).

use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_twill-policy"));
    c.arg("--manifests")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/manifests"))
        .env_remove("NODE_NAME");
    c
}

/// Namespace x with a policy the enforcer cannot read (a CIDR with prefix length 33).
const BAD_POLICY_X: &str = "kind: Namespace\nmetadata: {name: x}\n---\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/33}\n";

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
fn log_format_json_writes_json_lines_and_a_bad_format_is_named() {
    let dir = std::env::temp_dir().join(format!("twill-policy-cli-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("p.yaml"), BAD_POLICY_X).unwrap();
    let run = |format: &str| {
        Command::new(env!("CARGO_BIN_EXE_twill-policy"))
            .args(["--node-name", "n1", "--log-format", format, "--manifests"])
            .arg(&dir)
            .arg("compile")
            .output()
            .unwrap()
    };
    let out = run("json");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let warning = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("is not a CIDR"))
        })
        .unwrap_or_else(|| panic!("no line about the bad policy: {err}"));
    assert_eq!(warning["level"], "ERROR", "{warning}");
    assert!(warning["timestamp"].is_string() && warning["target"].is_string());

    let out = run("xml");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: --log-format: unknown log format \"xml\" (expected \"text\" or \"json\")\n"
    );
    assert!(out.stdout.is_empty());
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
fn invalid_object_fails_its_namespace_closed_and_is_reported_with_file_document_and_field() {
    let dir = std::env::temp_dir().join(format!("twill-policy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Namespace x has a policy the enforcer cannot read; y's policy is fine. One pod of
    // each on n1.
    std::fs::write(dir.join("p.yaml"), BAD_POLICY_X).unwrap();
    std::fs::write(
        dir.join("q.yaml"),
        "kind: Pod\nmetadata: {name: a, namespace: x}\nspec: {nodeName: n1}\nstatus: {podIP: 10.244.1.2}\n---\nkind: Pod\nmetadata: {name: b, namespace: y}\nspec: {nodeName: n1}\nstatus: {podIP: 10.244.1.3}\n---\nkind: NetworkPolicy\nmetadata: {name: q, namespace: y}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {}}]\n",
    )
    .unwrap();
    let cmd = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_twill-policy"))
            .args(["--node-name", "n1", "--manifests"])
            .arg(&dir)
            .args(args)
            .output()
            .unwrap()
    };
    let out = cmd(&["compile"]);
    let err = String::from_utf8_lossy(&out.stderr);
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{err}");
    // The error names the file, document, object, field and value, and what it costs.
    assert!(
        err.contains(
            r#"p.yaml: document 1: NetworkPolicy x/p: spec.ingress[0].from[0].ipBlock.cidr: "10.0.0.0/33" is not a CIDR; namespace x fails closed"#
        ),
        "{err}"
    );
    // x/a: drop-only chains both ways; y/b: its policy, which does not admit x/a.
    assert!(script.contains("10.244.1.2 : jump pod-in/x/a"), "{script}");
    assert!(script.contains("10.244.1.2 : jump pod-out/x/a"), "{script}");
    assert!(script.contains("10.244.1.3 : jump pod-in/y/b"), "{script}");
    assert!(!script.contains("10.244.1.2 : jump pod-in/y"), "{script}");
    let chain = |name: &str| {
        let start = script.find(&format!("chain {name} {{")).expect(name);
        let end = start + script[start..].find('}').unwrap();
        script[start..end].to_string()
    };
    assert!(!chain("pod-in/x/a").contains("return"), "{script}");
    assert!(!chain("pod-out/x/a").contains("return"), "{script}");
    assert!(chain("pod-in/y/b").contains("return"), "{script}");
    assert!(
        !script.contains("10.244.1.2,") && !script.contains("10.244.1.2 }"),
        "x/a must be in no peer set: {script}"
    );
    // explain says why.
    let out = cmd(&["explain", "--from", "y/b", "--to", "x/a", "--port", "80"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{s}");
    assert!(
        s.contains("ingress of x/a: namespace x fails closed (an object in it cannot be read: ")
            && s.contains("is not a CIDR"),
        "{s}"
    );
    let out = cmd(&["explain", "--from", "x/a", "--to", "y/b", "--port", "80"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{s}");
    assert!(s.contains("egress of x/a: namespace x fails closed"), "{s}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_metrics_addresses_and_nflog_groups_are_named_in_the_error() {
    for (args, flag, value) in [
        (
            vec!["run", "--metrics-addr", "bogus"],
            "--metrics-addr",
            "bogus",
        ),
        (
            vec!["run", "--metrics-addr", "9753"],
            "--metrics-addr",
            "9753",
        ),
        (
            vec!["--nflog-group", "65536", "compile"],
            "--nflog-group",
            "65536",
        ),
        (vec!["--nflog-group=-1", "compile"], "--nflog-group", "-1"),
    ] {
        let out = bin().args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(flag) && err.contains(&format!("'{value}'")),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn nflog_group_moves_every_log_statement_to_the_group() {
    let out = bin()
        .args(["--node-name", "n1", "--nflog-group", "100", "compile"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(
        s.contains("log prefix \"twill-policy drop ingress web/a: \" group 100"),
        "{s}"
    );
    assert!(!s.contains("level info"), "{s}");
}
