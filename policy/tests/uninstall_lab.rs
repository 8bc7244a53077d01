//! `twill-policy uninstall`: removes the inet and bridge tables named by --table, and nothing
//! else (a node switching back to Flannel keeps Flannel's tables and twill's others until
//! `twilld --cleanup`).

mod common;

use common::policy_bin;
use twill_lab::Lab;

#[test]
fn uninstall_removes_its_own_tables_only() {
    if !twill_lab::require_root() {
        return;
    }
    let mut lab = Lab::new("poluninst").unwrap();
    let node = lab.add_node("n1").unwrap().netns;
    let dir = lab.dir().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("pods.yaml"),
        "kind: Namespace\nmetadata: {name: x}\n---\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec: {nodeName: n1}\nstatus: {phase: Running, podIPs: [{ip: 10.244.1.2}]}\n",
    )
    .unwrap();
    let bin = policy_bin();
    let bin = bin.to_str().unwrap();
    let dir = dir.to_str().unwrap();
    let run = |args: &[&str]| {
        let mut argv = vec![bin, "--manifests", dir, "--table", "pol-x"];
        argv.extend_from_slice(args);
        lab.exec_env(&node, &argv, &[("NODE_NAME", "n1")]).unwrap()
    };
    let out = run(&["--pod-cidr", "10.244.1.0/24", "apply"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Tables that are not this program's: Flannel's, twill's guard, a similar name.
    lab.exec_ok(
        &node,
        &[
            "nft",
            "add table ip flannel-ipv4; add table inet twill-underlay; add table inet pol-x2",
        ],
    )
    .unwrap();
    let tables = || lab.exec_ok(&node, &["nft", "list", "tables"]).unwrap();
    assert!(tables().contains("table inet pol-x\n") && tables().contains("table bridge pol-x\n"));

    let out = run(&["uninstall"]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("removed table inet pol-x") && said.contains("removed table bridge pol-x"),
        "{said}"
    );
    let left = tables();
    assert!(!left.contains(" pol-x\n"), "{left}");
    for t in [
        "table ip flannel-ipv4",
        "table inet twill-underlay",
        "table inet pol-x2",
    ] {
        assert!(left.contains(t), "{t} removed: {left}");
    }
    let again = run(&["uninstall"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing to remove"));
    lab.teardown().unwrap();
}
