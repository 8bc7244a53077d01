//! The netlink reader of named counters against the kernel (root): counters of the asked
//! table only, with their packet counts, in this thread's own network namespace.

use std::process::Command;

use twill_nft::counters;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn reads_the_named_counters_of_one_table() {
    if !is_root() {
        if std::env::var_os("CI").is_some() {
            panic!("CI runs as root");
        }
        eprintln!("skipping: needs root (a network namespace of its own)");
        return;
    }
    // A thread of its own in a new network namespace: nft children inherit it.
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
        assert!(counters::read("twill-policy").unwrap().is_empty());
        let script = r#"
table inet twill-policy {
	counter pod-in/x/a {
		packets 7 bytes 700
	}
	counter unknown-egress {
		packets 3000000000 bytes 1
	}
	chain pod-in/x/a {
		counter name "pod-in/x/a" drop
	}
}
table inet other {
	counter pod-in/x/b {
		packets 5 bytes 5
	}
}
table ip twill-policy {
	counter pod-in/x/c {
		packets 9 bytes 9
	}
}
"#;
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
        let got = counters::read("twill-policy").unwrap();
        let want: std::collections::BTreeMap<String, u64> = [
            ("pod-in/x/a".to_string(), 7),
            ("unknown-egress".to_string(), 3_000_000_000),
        ]
        .into_iter()
        .collect();
        assert_eq!(got, want);
    })
    .join()
    .unwrap();
}
