//! Lab tests of twilld's traffic managers: `EnableNFTables` false or absent
//! (Flannel's default) puts Flannel's iptables chains in place, byte for byte as
//! `iptables-save` shows Flannel's (Flannel's e2e/rules.go); a rule deleted by hand
//! comes back; switching the mode removes the other mode's rules; masquerade really happens.
//! Root only; everything inside the lab's namespaces (`ip netns exec NS iptables-save`).

mod common;

use std::time::Duration;

use common::{cluster, wait_until, Cluster, DEADLINE, PREFIX};
use twill_lab::{Ipv4Net, Signal};

const IPTABLES_MODE: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const NFTABLES_MODE: &str =
    r#"{"Network":"10.244.0.0/16","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#;

/// Flannel's `nat` rules for Network `n` and pod subnet `p` as `iptables-save` lists them
/// (Flannel's e2e/rules.go), with the chain's declaration line.
fn golden_nat(n: &str, p: &str) -> Vec<String> {
    let c = r#"-m comment --comment "flanneld masq""#;
    vec![
        ":FLANNEL-POSTRTG - [0:0]".to_string(),
        format!("-A POSTROUTING {c} -j FLANNEL-POSTRTG"),
        format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {p} -d {n} {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {n} -d {p} {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG ! -s {n} -d {p} {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {n} ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully"),
        format!("-A FLANNEL-POSTRTG ! -s {n} -d {n} {c} -j MASQUERADE --random-fully"),
    ]
}

fn golden_filter(n: &str) -> Vec<String> {
    let c = r#"-m comment --comment "flanneld forward""#;
    vec![
        ":FLANNEL-FWD - [0:0]".to_string(),
        format!("-A FORWARD {c} -j FLANNEL-FWD"),
        format!("-A FLANNEL-FWD -s {n} {c} -j ACCEPT"),
        format!("-A FLANNEL-FWD -d {n} {c} -j ACCEPT"),
    ]
}

/// The lines of `iptables-save -t table` in `node` that mention Flannel's chains, in order.
fn flannel_lines(c: &Cluster, node: &str, table: &str) -> Vec<String> {
    c.lab
        .exec_ok(&c.ns(node), &["iptables-save", "-t", table])
        .unwrap()
        .lines()
        .filter(|l| l.contains("FLANNEL"))
        .map(String::from)
        .collect()
}

fn has_nft_table(c: &Cluster, node: &str) -> bool {
    c.lab
        .exec(&c.ns(node), &["nft", "list", "table", "ip", "flannel-ipv4"])
        .unwrap()
        .status
        .success()
}

/// Restarts twilld on `node` with `config` in etcd and waits until it is ready.
fn restart_with(c: &mut Cluster, node: &str, config: &str, extra: &[&str]) {
    c.kill(node, Signal::SIGTERM);
    c.lab
        .etcdctl(&["put", &format!("{PREFIX}/config"), config])
        .unwrap();
    c.start(node, extra);
    c.wait_ready(node);
}

/// Counters in the switch's namespace of echo requests from the node (`node`) and from the
/// Network (`pods`), read by [`switch_counter`].
fn add_switch_counters(c: &Cluster, node_addr: std::net::Ipv4Addr) {
    c.lab
        .exec_ok(
            &c.lab.switch_ns(),
            &[
                "nft",
                &format!(
                    "add table ip seen\nadd chain ip seen in {{ type filter hook input priority 0 ; }}\nadd rule ip seen in ip saddr {node_addr} icmp type echo-request counter comment \"node\"\nadd rule ip seen in ip saddr 10.244.0.0/16 icmp type echo-request counter comment \"pods\"\n"
                ),
            ],
        )
        .unwrap();
}

/// Packets the switch (198.18.0.1, outside the Network, no route back to it) receives from
/// `source`, counted by a table in the switch's own namespace.
fn switch_counter(c: &Cluster, source: &str) -> u64 {
    let out = c
        .lab
        .exec_ok(
            &c.lab.switch_ns(),
            &["nft", "-j", "list", "table", "ip", "seen"],
        )
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("rule"))
        .filter(|r| r["comment"] == source)
        .flat_map(|r| r["expr"].as_array().unwrap().iter())
        .filter_map(|e| e["counter"]["packets"].as_u64())
        .sum()
}

/// One node in iptables mode from a state Flannel could have left: its chains for a previous
/// Network/Subnet, and nftables mode's table. Then drift repair, masquerade seen from outside,
/// and the switch to nftables mode and back.
#[test]
fn iptables_mode_is_flannels_chains_repaired_and_switched_with_nftables_mode() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("ipt", &["n1"], IPTABLES_MODE);
    let ns = c.ns("n1");
    // What Flannel in iptables mode left for an earlier Network (10.99.0.0/16, subnet
    // 10.99.5.0/24), what its nftables mode left, and the subnet.env naming them.
    let stale = format!(
        "*nat\n:FLANNEL-POSTRTG - [0:0]\n{}\nCOMMIT\n*filter\n:FLANNEL-FWD - [0:0]\n{}\nCOMMIT\n",
        golden_nat("10.99.0.0/16", "10.99.5.0/24")[1..].join("\n"),
        golden_filter("10.99.0.0/16")[1..].join("\n"),
    );
    let out = c
        .lab
        .exec(
            &ns,
            &[
                "sh",
                "-c",
                &format!("printf '%s' '{stale}' | iptables-restore --noflush"),
            ],
        )
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    c.lab
        .exec_ok(
            &ns,
            &[
                "nft",
                "add table ip flannel-ipv4 { comment \"rules for flannel-ipv4\" ; }",
            ],
        )
        .unwrap();
    std::fs::write(
        c.subnet_file("n1"),
        "FLANNEL_NETWORK=10.99.0.0/16\nFLANNEL_SUBNET=10.99.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )
    .unwrap();

    c.start("n1", &["--iptables-resync=1"]);
    let env = c.wait_ready("n1");
    let p: Ipv4Net = env.subnet_network().unwrap();
    let p = p.to_string();
    let n = "10.244.0.0/16";
    assert_eq!(flannel_lines(&c, "n1", "nat"), golden_nat(n, &p));
    assert_eq!(flannel_lines(&c, "n1", "filter"), golden_filter(n));
    assert!(!has_nft_table(&c, "n1"), "nftables mode's table left");

    // Drift: a rule deleted by hand is back within a few resyncs, the chain in order again.
    let masq_all = golden_nat(n, &p)[6].clone();
    let delete = masq_all.replacen("-A ", "-D ", 1);
    c.lab
        .exec_ok(&ns, &["sh", "-c", &format!("iptables -t nat {delete}")])
        .unwrap();
    assert_ne!(flannel_lines(&c, "n1", "nat"), golden_nat(n, &p));
    let took = wait_until("the deleted rule to be restored", DEADLINE, || {
        flannel_lines(&c, "n1", "nat") == golden_nat(n, &p)
    });
    eprintln!("rule restored after {took:?}");
    // Repaired once, and no churn after it: every `-C` matches what the restore installed
    // (Flannel's rule-check churn, flannel#1317/#2145, would re-apply on every resync).
    let repairs = |c: &Cluster| {
        c.log("n1")
            .matches("iptables rules missing; re-applying the whole set")
            .count()
    };
    wait_until("the repair's log line", DEADLINE, || repairs(&c) >= 1);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(repairs(&c), 1, "{}", c.log("n1"));

    // Masquerade: a pod reaching the switch (outside the Network) shows up there as the node.
    let pod_ip = c.pod("n1", "p1", &env);
    let pod_ns = c.lab.pod("p1").netns.clone();
    let node_addr = c.lab.node("n1").addr;
    add_switch_counters(&c, node_addr);
    assert!(
        c.lab
            .wait_ping(&pod_ns, twill_lab::SWITCH_ADDR.into(), DEADLINE),
        "pod {pod_ip} cannot reach the switch through masquerade"
    );
    assert!(switch_counter(&c, "node") > 0);
    assert_eq!(
        switch_counter(&c, "pods"),
        0,
        "pod address {pod_ip} seen outside"
    );

    // nftables mode: Flannel's tables, no iptables chain left in either table.
    restart_with(&mut c, "n1", NFTABLES_MODE, &[]);
    assert_eq!(flannel_lines(&c, "n1", "nat"), Vec::<String>::new());
    assert_eq!(flannel_lines(&c, "n1", "filter"), Vec::<String>::new());
    assert!(has_nft_table(&c, "n1"));
    assert!(c
        .log("n1")
        .contains("removed iptables chains twilld does not use"));
    assert!(c.lab.ping(
        &pod_ns,
        twill_lab::SWITCH_ADDR.into(),
        1,
        Duration::from_secs(5)
    ));

    // And back: the table goes, the chains are Flannel's again.
    restart_with(&mut c, "n1", IPTABLES_MODE, &[]);
    assert!(!has_nft_table(&c, "n1"));
    assert_eq!(flannel_lines(&c, "n1", "nat"), golden_nat(n, &p));
    assert_eq!(flannel_lines(&c, "n1", "filter"), golden_filter(n));
    assert!(c.lab.ping(
        &pod_ns,
        twill_lab::SWITCH_ADDR.into(),
        1,
        Duration::from_secs(5)
    ));
}

/// Without `--ip-masq` nothing masquerades: a previous run's FLANNEL-POSTRTG is removed (Flannel
/// would leave it working), the forward chain stays; `--iptables-forward-rules=false` removes
/// that too. The same in nftables mode for its `postrtg` chain.
#[test]
fn iptables_parts_not_wanted_are_removed() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("iptp", &["n1"], IPTABLES_MODE);
    c.start("n1", &[]);
    let env = c.wait_ready("n1");
    let p = env.subnet_network().unwrap().to_string();
    assert_eq!(
        flannel_lines(&c, "n1", "nat"),
        golden_nat("10.244.0.0/16", &p)
    );
    c.kill("n1", Signal::SIGTERM);
    c.start("n1", &["--ip-masq=false"]);
    c.wait_ready("n1");
    assert_eq!(flannel_lines(&c, "n1", "nat"), Vec::<String>::new());
    assert_eq!(
        flannel_lines(&c, "n1", "filter"),
        golden_filter("10.244.0.0/16")
    );
    // The control for the masquerade check above: unmasqueraded, the pod's own address
    // reaches the switch, which has no route back to it.
    let pod_ip = c.pod("n1", "p1", &env);
    let pod_ns = c.lab.pod("p1").netns.clone();
    add_switch_counters(&c, c.lab.node("n1").addr);
    assert!(!c.lab.ping(
        &pod_ns,
        twill_lab::SWITCH_ADDR.into(),
        2,
        Duration::from_secs(3)
    ));
    assert!(
        switch_counter(&c, "pods") > 0,
        "{pod_ip} not seen at the switch"
    );
    assert_eq!(switch_counter(&c, "node"), 0);
    c.kill("n1", Signal::SIGTERM);
    c.start("n1", &["--ip-masq=false", "--iptables-forward-rules=false"]);
    c.wait_ready("n1");
    assert_eq!(flannel_lines(&c, "n1", "filter"), Vec::<String>::new());

    // nftables mode likewise: the masquerade chain goes when --ip-masq does.
    let chains = |c: &Cluster| {
        let out = c
            .lab
            .exec_ok(&c.ns("n1"), &["nft", "list", "table", "ip", "flannel-ipv4"])
            .unwrap();
        ["postrtg", "forward"]
            .into_iter()
            .filter(|ch| out.contains(&format!("chain {ch} {{")))
            .collect::<Vec<_>>()
    };
    restart_with(&mut c, "n1", NFTABLES_MODE, &[]);
    assert_eq!(chains(&c), ["postrtg", "forward"]);
    c.kill("n1", Signal::SIGTERM);
    c.start("n1", &["--ip-masq=false"]);
    c.wait_ready("n1");
    assert_eq!(chains(&c), ["forward"]);
}

/// iptables mode on a node without the iptables binaries: twilld stops before it reports ready,
/// with an error naming the package (its PATH holds only `ip`, which the lab starts it with,
/// and `nft`).
#[test]
fn iptables_mode_without_iptables_names_the_package() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("ipte", &["n1"], IPTABLES_MODE);
    let bin = c.lab.dir().join("no-iptables-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["ip", "nft"] {
        let path = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .map(|d| std::path::Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no {tool}"));
        std::os::unix::fs::symlink(path, bin.join(tool)).unwrap();
    }
    let id = c.start_env("n1", &[], &[("PATH", bin.to_str().unwrap())]);
    let status = c.lab.wait(id, DEADLINE).unwrap();
    let log = c.log("n1");
    assert!(status.is_some_and(|s| !s.success()), "{status:?}\n{log}");
    assert!(
        log.contains("iptables: not found (iptables mode, EnableNFTables false or absent in the network config, needs the iptables package)"),
        "{log}"
    );
    assert!(!log.contains("wrote subnet.env; ready"), "{log}");
}
