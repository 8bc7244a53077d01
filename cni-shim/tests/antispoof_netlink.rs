//! The anti-spoofing fast path against the kernel (root): elements added over netlink are the
//! very elements nft writes and reads (same key layout), the first pod creates the table
//! through nft, later pods do not touch the chain, GC rebuilds it, and DEL is idempotent.
//! Runs in a network namespace of its own (a thread that unshared it; nft children inherit it).

use std::process::Command;

use twill_cni::antispoof::{self, PodPort};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn nft(args: &[&str]) -> String {
    let out = Command::new("nft").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn pod(veth: &str, addrs: &[&str]) -> PodPort {
    PodPort {
        veth: veth.into(),
        addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
    }
}

#[test]
fn netlink_elements_match_nft_and_the_chain_is_left_alone() {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        eprintln!("skipping: needs root (a network namespace of its own)");
        return;
    }
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
        let a = pod("vethaaaa0001", &["10.244.1.5", "fd00:42:0:1::5"]);
        let b = pod("vethbbbb0002", &["10.244.1.6"]);
        // No table yet: DEL has nothing to remove, ADD falls back to nft and creates it.
        antispoof::remove(&a).unwrap();
        antispoof::add(&a).unwrap();
        let set4 = nft(&["list", "set", "bridge", "twill-antispoof", "src4"]);
        assert!(set4.contains("\"vethaaaa0001\" . 10.244.1.5"), "{set4}");
        // The chain emptied by hand: the next ADD (netlink only) must not rebuild it.
        nft(&["flush", "chain", "bridge", "twill-antispoof", "pods"]);
        antispoof::add(&b).unwrap();
        let chain = nft(&["list", "chain", "bridge", "twill-antispoof", "pods"]);
        assert!(!chain.contains("drop"), "{chain}");
        // nft reads what netlink wrote, and its own delete finds the element (same key).
        let ports = nft(&["list", "set", "bridge", "twill-antispoof", "ports"]);
        assert!(ports.contains("\"vethbbbb0002\""), "{ports}");
        let set4 = nft(&["list", "set", "bridge", "twill-antispoof", "src4"]);
        assert!(set4.contains("\"vethbbbb0002\" . 10.244.1.6"), "{set4}");
        nft(&[
            "delete",
            "element",
            "bridge",
            "twill-antispoof",
            "src4",
            "{ \"vethbbbb0002\" . 10.244.1.6 }",
        ]);
        antispoof::add(&b).unwrap();
        // GC rebuilds the chain and prunes veths that do not exist (none of these do).
        antispoof::prune().unwrap();
        let chain = nft(&["list", "chain", "bridge", "twill-antispoof", "pods"]);
        assert!(chain.contains("IPv4 source spoofing"), "{chain}");
        let all = nft(&["list", "table", "bridge", "twill-antispoof"]);
        assert!(!all.contains("veth"), "{all}");
        // DEL over netlink, twice: idempotent.
        antispoof::add(&a).unwrap();
        let set6 = nft(&["list", "set", "bridge", "twill-antispoof", "src6"]);
        assert!(set6.contains("\"vethaaaa0001\" . fd00:42:0:1::5"), "{set6}");
        antispoof::remove(&a).unwrap();
        antispoof::remove(&a).unwrap();
        let all = nft(&["list", "table", "bridge", "twill-antispoof"]);
        assert!(!all.contains("vethaaaa0001"), "{all}");
    })
    .join()
    .unwrap();
}
