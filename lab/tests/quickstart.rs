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
    assert!(down.status.success());
    assert!(twill_lab::Lab::load(twill_lab::quickstart::NAME).is_err());
}
