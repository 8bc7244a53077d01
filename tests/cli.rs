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
