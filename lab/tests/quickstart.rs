//! The README's first command must keep working: run the quick start as a user would (it fails
//! unless the matrices are what twill promises), then take it down and check nothing is left.

use std::process::Command;

#[test]
fn quickstart_shows_reachability_and_policy_then_tears_down() {
    if !twill_lab::require_root() {
        return;
    }
    if twill_lab::Lab::load(twill_lab::quickstart::NAME).is_ok() {
        eprintln!("skipping: a quickstart cluster is up on this machine; not touching it");
        return;
    }
    let bin = twill_lab::bin_path("twill-lab");
    for needed in ["twilld", "twill-cni", "twill-policy", "twill-lab"] {
        assert!(
            twill_lab::bin_path(needed).exists(),
            "{needed} not built: run cargo build --workspace --bins first"
        );
    }
    let up = Command::new(&bin).arg("quickstart").output().unwrap();
    let out = String::from_utf8_lossy(&up.stdout);
    let down = Command::new(&bin)
        .args(["quickstart", "--down"])
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "quickstart failed:\n{out}\n{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(
        out.contains("Every pod reached every other pod across nodes"),
        "{out}"
    );
    // Node n1 as an operator sees it: both daemons answer and the node is healthy, and the
    // metrics scraped from the real daemons show the peers and the web pods' drops.
    assert!(out.contains("    Healthy.\n"), "{out}");
    assert!(out.contains("twilld_peers_programmed 2"), "{out}");
    assert!(
        out.contains("twill_policy_dropped_packets_total{namespace=\"demo\",pod=\"web"),
        "{out}"
    );
    assert!(down.status.success());
    assert!(twill_lab::Lab::load(twill_lab::quickstart::NAME).is_err());
}
