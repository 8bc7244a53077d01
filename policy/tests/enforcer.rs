//! The enforcer's fail-closed path, with a fake `nft` that rejects full rulesets.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use twill_nft::Nft;
use twill_policy::compile::Options;
use twill_policy::enforce::{Applied, Enforcer};
use twill_policy_testkit::conformance::{load_scenarios, step_snapshot, SCENARIOS};

fn fake_nft(dir: &std::path::Path, reject_full: bool) -> Nft {
    let script = dir.join("nft");
    let reject = if reject_full {
        r#"case "$input" in *"return comment"*) echo "Error: Could not process rule: No space left on device" >&2; exit 1;; esac"#
    } else {
        ""
    };
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ninput=$(cat)\n{reject}\nprintf '%s\\n' \"$input\" > {}/applied.nft\n",
            dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    Nft {
        bin: script,
        timeout: Duration::from_secs(10),
    }
}

#[test]
fn failed_apply_installs_isolation_only_table() {
    let dir = std::env::temp_dir().join(format!("twill-policy-enf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sc = load_scenarios(SCENARIOS).unwrap();
    // S03: x/a is isolated for ingress and allows only x/b.
    let snap = step_snapshot(&sc.iter().find(|s| s.id == "S03").unwrap().steps[0]).unwrap();

    let mut ok = Enforcer::new(fake_nft(&dir, false), "n1", Options::default());
    assert_eq!(ok.sync(&snap).applied, Applied::Full);
    let full = std::fs::read_to_string(dir.join("applied.nft")).unwrap();
    assert!(
        full.contains("return comment \"x/x-a-allows-x-b ingress[0]\""),
        "{full}"
    );
    assert_eq!(ok.sync(&snap).applied, Applied::Unchanged);

    let mut bad = Enforcer::new(fake_nft(&dir, true), "n1", Options::default());
    let r = bad.sync(&snap);
    match &r.applied {
        Applied::FailClosed { error } => assert!(error.contains("No space left"), "{error}"),
        other => panic!("{other:?}"),
    }
    let closed = std::fs::read_to_string(dir.join("applied.nft")).unwrap();
    assert!(closed.contains("10.244.1.2 : jump pod-in/x/a"), "{closed}");
    assert!(!closed.contains("return"), "{closed}");
    assert!(
        closed.contains("counter name \"pod-in/x/a\" drop"),
        "{closed}"
    );
    // A failed sync is retried next time, not skipped as unchanged.
    assert!(matches!(
        bad.sync(&snap).applied,
        Applied::FailClosed { .. }
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}
