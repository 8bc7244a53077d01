//! twilld's command line as a process (no root, no network): FLANNELD_* environment fallbacks,
//! Go-style flags, and flag validation errors.

use std::process::Command;

fn twilld() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_twilld"));
    c.env_clear().env("PATH", "/usr/bin:/bin");
    c
}

#[test]
fn env_fallback_is_used_when_the_flag_is_absent() {
    let out = twilld()
        .env("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Invalid subnet-lease-renew-margin option, out of acceptable range: 0"),
        "{err}"
    );
}

#[test]
fn the_flag_wins_over_the_environment() {
    let out = twilld()
        .env("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "60")
        .arg("-subnet-lease-renew-margin=2000")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("out of acceptable range: 2000"));
}

#[test]
fn go_booleans_from_the_environment() {
    // A value strconv.ParseBool rejects is an error naming the variable's flag.
    let out = twilld().env("FLANNELD_IP_MASQ", "yes").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ip-masq") && err.contains("yes"), "{err}");
}

#[test]
fn version_and_help() {
    let out = twilld().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("twilld "));
    let help = twilld().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--etcd-endpoints",
        "--kube-subnet-mgr",
        "--iface-regex",
        "--ip-masq",
        "--healthz-port",
        "--subnet-file",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help");
    }
    assert!(
        text.contains("FLANNELD_ETCD_ENDPOINTS"),
        "env fallbacks are documented in --help"
    );
}

#[test]
fn log_format_json_writes_json_lines_and_a_bad_format_exits_1_naming_it() {
    // A flag error found after logging starts is one JSON line.
    let out = twilld()
        .args(["-log-format=json", "-subnet-lease-renew-margin=0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?} in {err}")))
        .collect();
    let line = lines
        .iter()
        .find(|l| l["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .contains("out of acceptable range: 0"),
        "{line}"
    );

    for (args, env) in [
        (vec!["--log-format=xml"], None),
        (vec![], Some(("FLANNELD_LOG_FORMAT", "xml"))),
    ] {
        let mut cmd = twilld();
        cmd.args(&args);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?} {env:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "twilld: --log-format: unknown log format \"xml\" (expected \"text\" or \"json\")\n"
        );
    }
}
