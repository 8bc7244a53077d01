//! Migration in place, both ways: a node in exactly the state Flannel leaves
//! is switched to twill and back to that state while one of its pods pings a pod on a twill
//! peer every 10 ms. No probe may be lost (a restart of Flannel itself loses none: it keeps
//! device, entries and lease), and afterwards the node's state must equal what it was under
//! Flannel, with nothing of twill's left.
//!
//! flanneld cannot run here (no Go toolchain or module proxy to build it), so "the state
//! Flannel leaves" and "Flannel starting" are made by hand, step for step, from
//! flannel's source (`pkg/subnet/etcd`, `pkg/backend/vxlan`, `pkg/trafficmngr`): see
//! `twill_lab::flannel`.
//! Flannel's CNI plugin is likewise played by the reference bridge plugin called with the
//! delegate config Flannel's plugin hands it (and, for DEL, the config it saved).
//!
//! Both rule modes are tested: Flannel's nftables tables (`EnableNFTables: true`) and its
//! iptables chains (`EnableNFTables: false`, Flannel's default); net-conf.json says the same
//! mode to twilld, which writes Flannel's rules in it. `flannel_state_by_hand_matches_the_spec_in_both_modes`
//! checks the Flannel-state helper itself against the spec's goldens (no twilld involved).

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use twill_lab::flannel::{
    ensure_same, flannel_delegate_netconf, lease_key, lease_value, FlannelNode, FlannelPeer,
    FlannelRules, NodeSnapshot, FLANNEL_MTU,
};
use twill_lab::ping::Pinger;
use twill_lab::{Ipv4Net, Lab, Pod};

/// twill's own tables, as `nft list` headers, sorted.
const TWILL_TABLES: [&str; 4] = [
    "table bridge twill-antispoof",
    "table bridge twill-policy",
    "table inet twill-policy",
    "table inet twill-underlay",
];

/// The reference bridge plugin, which Flannel's CNI plugin delegates to.
const BRIDGE: &str = "/usr/lib/cni/bridge";

fn network() -> Ipv4Net {
    "10.244.0.0/16".parse().unwrap()
}

/// A node running Flannel (by hand) with this subnet and VTEP MAC. The subnets are outside
/// the first 100 free ones a twilld allocator picks from, so they never collide.
fn flannel_node(node: &str, subnet: &str, mac: &str) -> FlannelNode {
    FlannelNode {
        node: node.into(),
        network: network(),
        subnet: subnet.parse().unwrap(),
        vtep_mac: mac.into(),
        ip_masq: true,
        rules: FlannelRules::Nftables,
        etcd_prefix: PREFIX.into(),
    }
}

fn peer_of(c: &Cluster, f: &FlannelNode) -> FlannelPeer {
    FlannelPeer {
        subnet: f.subnet,
        vtep_mac: f.vtep_mac.clone(),
        public_ip: c.lab.node(&f.node).addr,
    }
}

/// A pod attached the way Flannel's CNI plugin attaches it: the bridge plugin with Flannel's
/// delegate config (`runtime_ips` asks host-local for given addresses).
fn flannel_pod(c: &mut Cluster, f: &FlannelNode, name: &str, runtime_ips: &[IpAddr]) -> Pod {
    let ipam_dir = c.lab.node(&f.node).dir.join("cni-ipam");
    let mut conf: serde_json::Value = serde_json::from_str(&flannel_delegate_netconf(
        f.network,
        f.subnet,
        FLANNEL_MTU,
        f.ip_masq,
        &ipam_dir,
    ))
    .unwrap();
    if !runtime_ips.is_empty() {
        conf["runtimeConfig"] = serde_json::json!({ "ips": runtime_ips });
    }
    c.lab
        .add_cni_pod(&f.node, name, Path::new(BRIDGE), &conf.to_string())
        .unwrap_or_else(|e| panic!("pod {name} on {}: {e:#}", f.node))
}

/// A pod attached by twill-cni (installed as Flannel's plugin) with Flannel's conflist.
fn twill_pod(c: &mut Cluster, node: &str, name: &str) -> Pod {
    let conf = c.lab.node(node).flannel_netconf();
    let bin = twill_lab::bin_path("twill-cni");
    assert!(
        bin.exists(),
        "{} missing: cargo build --workspace --bins",
        bin.display()
    );
    c.lab
        .add_cni_pod(node, name, &bin, &conf)
        .unwrap_or_else(|e| panic!("pod {name} on {node}: {e:#}"))
}

fn snapshot(c: &Cluster, f: &FlannelNode) -> NodeSnapshot {
    c.lab
        .node_snapshot(&f.node, Some(&lease_key(PREFIX, f.subnet)))
        .expect("snapshot")
}

/// The packet count of the rule carrying `comment` in `table` on `node`: its own counter, or
/// the named counter it counts into.
fn rule_packets(c: &Cluster, node: &str, family: &str, table: &str, comment: &str) -> u64 {
    let listing = c
        .lab
        .exec_ok(&c.ns(node), &["nft", "list", "table", family, table])
        .unwrap_or_default();
    let Some(rule) = listing.lines().find(|l| l.contains(comment)) else {
        return 0;
    };
    // A named counter (`counter name "x"`) keeps its packets in the object `counter x { }`.
    let counted = match rule.split("counter name \"").nth(1) {
        Some(rest) => {
            let name = rest.split('"').next().unwrap_or_default();
            let object = format!("counter {name} {{");
            let mut lines = listing.lines().skip_while(|l| l.trim() != object);
            lines.nth(1).unwrap_or_default()
        }
        None => rule,
    };
    counted
        .split("packets ")
        .nth(1)
        .and_then(|p| p.split(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// Runs `twill-policy apply` once on `node` for these pods (namespace `default`, no
/// policy: every pod open), creating its tables as a running twill-policy would.
fn twill_policy_apply(c: &Cluster, node: &str, pods: &[&Pod]) {
    let dir = c.lab.node(node).dir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let mut yaml = String::from("kind: Namespace\nmetadata: {name: default}\n");
    for p in pods {
        yaml += &format!(
            "---\nkind: Pod\nmetadata: {{name: {}, namespace: default}}\nspec: {{nodeName: {node}}}\nstatus: {{phase: Running, podIPs: [{{ip: {}}}]}}\n",
            p.name,
            p.ip()
        );
    }
    std::fs::write(dir.join("pods.yaml"), yaml).unwrap();
    let bin = twill_lab::bin_path("twill-policy");
    assert!(
        bin.exists(),
        "{} missing: cargo build --workspace --bins",
        bin.display()
    );
    let subnet_file = c.lab.node(node).subnet_file();
    let out = c
        .lab
        .exec_env(
            &c.ns(node),
            &[
                bin.to_str().unwrap(),
                "--manifests",
                dir.to_str().unwrap(),
                "--subnet-file",
                subnet_file.to_str().unwrap(),
                "apply",
            ],
            &[("NODE_NAME", node)],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "twill-policy apply on {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Node `a` starts in Flannel's nftables-mode state with a pod `pa`; `b` runs twilld with a
/// pod `pb`; `pa` pings `pb` every 10 ms from before the switch to twill until after the
/// switch back. Under twill, `a` adopts Flannel's lease, device and rules and gains twill's
/// tables (guard, anti-spoofing from a pod added by twill-cni, policy). Back under Flannel,
/// before the cleanup, the control shows why the cleanup exists: a node `c` that joins under
/// Flannel cannot reach `a` (the stale guard drops its VXLAN) and a new pod on `a` is isolated
/// (the stale policy table), while a new pod at a deleted twill-cni pod's address is not
/// dropped (anti-spoofing elements are keyed by veth). `twilld --cleanup` repairs both, and
/// once `c` has left and the new pods are gone the node's state equals the first snapshot.
#[test]
fn nft_mode_flannel_to_twill_and_back_loses_nothing_and_leaves_nothing() {
    if !twill_lab::require_root() {
        return;
    }
    migrate_and_back(FlannelRules::Nftables);
}

/// The same migration with Flannel's iptables chains (`nat FLANNEL-POSTRTG`,
/// `filter FLANNEL-FWD`), the mode Flannel's own manifest runs.
#[test]
fn iptables_mode_flannel_to_twill_and_back_loses_nothing_and_leaves_nothing() {
    if !twill_lab::require_root() {
        return;
    }
    migrate_and_back(FlannelRules::Iptables);
}

/// The migration of the test above with Flannel's rules in `mode` (net-conf.json's
/// `EnableNFTables` follows it, so twilld writes the same mode).
fn migrate_and_back(mode: FlannelRules) {
    let started = Instant::now();
    let config = format!(
        r#"{{"Network":"10.244.0.0/16","EnableNFTables":{},"Backend":{{"Type":"vxlan"}}}}"#,
        mode == FlannelRules::Nftables
    );
    let mut c = cluster("migr", &["a", "b", "c"], &config);
    let flannel_node = |node: &str, subnet: &str, mac: &str| FlannelNode {
        rules: mode,
        ..flannel_node(node, subnet, mac)
    };
    let twilld = twilld_bin();

    // b: a twill node.
    c.start("b", &[]);
    let env_b = c.wait_ready("b");
    let peer_b = FlannelPeer {
        subnet: env_b.subnet_network().expect("b's FLANNEL_SUBNET"),
        vtep_mac: c.mac("b", "flannel.1"),
        public_ip: c.lab.node("b").addr,
    };
    let pb = twill_pod(&mut c, "b", "pb");

    // a: Flannel's state, one pod attached by Flannel's plugin.
    let fl_a = flannel_node("a", "10.244.200.0/24", "0e:fa:00:00:c8:01");
    let a_addr = c.lab.node("a").addr;
    c.lab
        .flannel_start(&fl_a, std::slice::from_ref(&peer_b))
        .unwrap();
    let pa = flannel_pod(&mut c, &fl_a, "pa", &[]);
    c.wait_entries("b", "flannel.1", "a's Flannel lease", |e| {
        e.has_peer(&fl_a.subnet, a_addr, &fl_a.vtep_mac)
    });
    assert!(
        c.lab.wait_ping(&pa.netns, pb.ip().into(), DEADLINE),
        "pa -> pb under Flannel"
    );
    let under_flannel = snapshot(&c, &fl_a);
    eprintln!("a under Flannel:\n{under_flannel}");
    let flannel_rules = match mode {
        FlannelRules::Nftables => under_flannel
            .nft_table("table ip flannel-ipv4")
            .unwrap_or_default(),
        FlannelRules::Iptables => under_flannel.sections["iptables nat"].clone(),
    };
    assert!(
        flannel_rules.contains("masquerade") || flannel_rules.contains("MASQUERADE"),
        "{under_flannel}"
    );

    let ping = Pinger::start(
        &mut c.lab,
        &pa.netns,
        "fastping",
        pb.ip().into(),
        "0.01",
        Duration::from_secs(900),
    );
    ping.wait_answered(&mut c.lab, 50);

    // ---- Flannel -> twill: flanneld stops (tearing nothing down: its rules stay), twilld
    // starts with its flags over Flannel's whole state.
    let switch = Instant::now();
    c.start("a", &[]);
    let env_a = c.wait_ready("a");
    eprintln!(
        "a: twilld ready {:?} after Flannel stopped",
        switch.elapsed()
    );
    // Traffic flowed after the switch too (every probe before the last answered one is
    // checked for loss at the end).
    let next = ping.last_answered(&c.lab) + 20;
    ping.wait_answered(&mut c.lab, next);
    assert_eq!(
        env_a.subnet_network(),
        Some(fl_a.subnet),
        "a kept its lease"
    );
    let a_key = lease_key(PREFIX, fl_a.subnet);
    assert_eq!(
        c.etcd_get(&a_key).as_deref(),
        Some(lease_value(a_addr, &fl_a.vtep_mac).as_str()),
        "a's lease as Flannel wrote it"
    );
    assert_eq!(
        c.subnet_keys()
            .iter()
            .filter(|k| c
                .etcd_get(k)
                .is_some_and(|v| v.contains(&format!("\"{a_addr}\""))))
            .count(),
        1,
        "one lease for a: {:?}",
        c.subnet_keys()
    );
    wait_until("a's underlay guard with b in it", DEADLINE, || {
        c.lab
            .exec_ok(
                &c.ns("a"),
                &["nft", "list", "set", "inet", "twill-underlay", "peers4"],
            )
            .is_ok_and(|s| s.contains(&peer_b.public_ip.to_string()))
    });
    let pa2 = twill_pod(&mut c, "a", "pa2");
    twill_policy_apply(&c, "a", &[&pa, &pa2]);
    assert!(c.lab.wait_ping(&pa2.netns, pb.ip().into(), DEADLINE));
    let under_twill = snapshot(&c, &fl_a);
    // twill adopted flannel.1 (same ifindex, MAC, attributes), the lease, the entries, the
    // subnet.env and Flannel's table; it added its own tables and has no iptables rules.
    let mut same = under_twill.clone();
    same.sections.remove("nft");
    let mut flannel_rest = under_flannel.clone();
    flannel_rest.sections.remove("nft");
    ensure_same("a under twill, all but nftables", &flannel_rest, &same).unwrap();
    assert_eq!(
        under_twill.nft_table("table ip flannel-ipv4"),
        under_flannel.nft_table("table ip flannel-ipv4"),
        "twilld's masquerade/forward table is Flannel's"
    );
    // twill's tables beside Flannel's. Flannel's empty `ip6 flannel-ipv6` (nftables mode
    // creates both tables even for IPv4 only) is gone: twilld keeps a family's table only for
    // an enabled family, and Flannel's start makes it again.
    let mut expected: std::collections::BTreeSet<String> = under_flannel
        .nft_tables()
        .into_iter()
        .filter(|t| t != "table ip6 flannel-ipv6")
        .collect();
    expected.extend(TWILL_TABLES.map(String::from));
    assert_eq!(under_twill.nft_tables(), expected, "tables under twill");

    // The cleanup refuses while twilld runs here (it would put its guard back), and changes
    // nothing.
    let refused = c.lab.exec(&c.ns("a"), &[&twilld, "--cleanup"]).unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("twilld (pid") && said.contains("is running"),
        "twilld --cleanup beside a running twilld: {said}"
    );
    assert_eq!(
        snapshot(&c, &fl_a),
        under_twill,
        "a refused cleanup changed a"
    );

    // ---- twill -> Flannel: twilld stops, flanneld starts (lease, device, rules, peers).
    c.kill("a", twill_lab::Signal::SIGTERM);
    c.lab
        .flannel_start(&fl_a, std::slice::from_ref(&peer_b))
        .unwrap();
    let next = ping.last_answered(&c.lab) + 20;
    ping.wait_answered(&mut c.lab, next);
    // pa2 is deleted by Flannel's plugin: DEL of the bridge plugin with the delegate config
    // twill-cni saved in Flannel's format, with no word to twill's anti-spoofing table.
    let saved = c
        .lab
        .node("a")
        .dir
        .join("cni-flannel")
        .join(format!("{}pa2", c.lab.prefix()));
    let saved =
        std::fs::read_to_string(&saved).unwrap_or_else(|e| panic!("{}: {e}", saved.display()));
    c.lab
        .del_cni_pod_with("pa2", Path::new(BRIDGE), &saved)
        .unwrap();
    let back_before_cleanup = snapshot(&c, &fl_a);
    let left: Vec<String> = back_before_cleanup
        .nft_tables()
        .difference(&under_flannel.nft_tables())
        .cloned()
        .collect();
    assert_eq!(
        left, TWILL_TABLES,
        "Flannel's start leaves twill's tables (the gap the cleanup closes)"
    );

    // The control: what those tables do to a node running Flannel.
    // c joins under Flannel: b (twill) programs it, a's flanneld programs it, but a's stale
    // guard drops c's VXLAN.
    let fl_c = flannel_node("c", "10.244.201.0/24", "0e:fa:00:00:c9:01");
    let peer_a = peer_of(&c, &fl_a);
    let peer_c = peer_of(&c, &fl_c);
    c.lab
        .flannel_start(&fl_c, &[peer_a.clone(), peer_b.clone()])
        .unwrap();
    c.lab
        .flannel_peer_by_hand("a", fl_c.subnet, &fl_c.vtep_mac, peer_c.public_ip)
        .unwrap();
    let pc = flannel_pod(&mut c, &fl_c, "pc", &[]);
    c.wait_entries("b", "flannel.1", "c's lease", |e| {
        e.has_peer(&fl_c.subnet, peer_c.public_ip, &fl_c.vtep_mac)
    });
    assert!(
        c.lab.wait_ping(&pb.netns, pc.ip().into(), DEADLINE),
        "pb -> pc (c works with the twill node)"
    );
    let guard_rule = "VXLAN from a non-peer";
    let dropped_before = rule_packets(&c, "a", "inet", "twill-underlay", guard_rule);
    assert!(
        !c.lab
            .ping(&pa.netns, pc.ip().into(), 3, Duration::from_secs(3)),
        "pa -> pc answered although a's stale guard should drop c's VXLAN"
    );
    let dropped = rule_packets(&c, "a", "inet", "twill-underlay", guard_rule) - dropped_before;
    assert!(dropped > 0, "a's guard dropped nothing from c");
    // A new pod at pa2's address: not dropped (the stale anti-spoofing elements name pa2's
    // veth, which is gone; the stale policy table knows the address as pa2's, open).
    let pa3 = flannel_pod(&mut c, &fl_a, "pa3", &[pa2.ip().into()]);
    assert_eq!(pa3.ip(), pa2.ip(), "host-local gave pa3 pa2's address");
    assert!(
        c.lab.wait_ping(&pa3.netns, pb.ip().into(), DEADLINE),
        "pa3 (pa2's address) -> pb under Flannel with twill's stale tables"
    );
    // A new pod at a new address: isolated by the stale policy table.
    let pa4 = flannel_pod(&mut c, &fl_a, "pa4", &[]);
    assert!(
        !c.lab
            .ping(&pa4.netns, pb.ip().into(), 3, Duration::from_secs(3)),
        "pa4 (new address) -> pb answered although the stale policy table isolates it"
    );

    // ---- The cleanup an operator runs when switching back.
    let out = c
        .lab
        .exec(&c.ns("a"), &[&twilld, "--cleanup"])
        .expect("twilld --cleanup");
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "twilld --cleanup failed: {said}");
    for t in [
        "inet twill-underlay",
        "bridge twill-antispoof",
        "inet twill-policy",
        "bridge twill-policy",
    ] {
        assert!(said.contains(t), "cleanup did not report {t}: {said}");
    }
    assert!(
        c.lab.wait_ping(&pa.netns, pc.ip().into(), DEADLINE),
        "pa -> pc after the cleanup"
    );
    assert!(
        c.lab.wait_ping(&pa4.netns, pb.ip().into(), DEADLINE),
        "pa4 -> pb after the cleanup"
    );
    let answered_after_cleanup = ping.last_answered(&c.lab) + 20;
    ping.wait_answered(&mut c.lab, answered_after_cleanup);
    // Run again: nothing left to remove, still success.
    let again = c.lab.exec(&c.ns("a"), &[&twilld, "--cleanup"]).unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing to remove"));

    // c leaves (its lease deleted: flanneld on a removes its entries, twilld on b too) and
    // the new pods go; then a is exactly as it was under Flannel.
    c.lab
        .etcdctl(&["del", &lease_key(PREFIX, fl_c.subnet)])
        .unwrap();
    c.lab.flannel_peer_removed("a", &peer_c).unwrap();
    c.wait_entries("b", "flannel.1", "c's lease gone", |e| {
        !e.mentions(&fl_c.subnet)
    });
    c.lab.del_pod("pa3").unwrap();
    c.lab.del_pod("pa4").unwrap();
    let back = snapshot(&c, &fl_a);
    ensure_same("a back under Flannel", &under_flannel, &back).unwrap();
    assert!(
        !back.nft_tables().iter().any(|t| t.contains("twill")),
        "{back}"
    );

    let report = ping.stop(&mut c.lab);
    eprintln!(
        "pa -> pb every 10 ms across both switches: {} ({} answered); test took {:?}",
        report.summary,
        report.answered.len(),
        started.elapsed()
    );
    assert!(
        report.lost().is_empty(),
        "probes lost across the migration: {:?}\n{}",
        report.lost(),
        report.summary
    );
    assert!(
        report.last_answered() >= answered_after_cleanup,
        "{}",
        report.summary
    );
}

/// The Flannel state the migration test starts from is Flannel's: the spec's golden rules in
/// both modes (nftables listing, iptables-save lines), and flanneld's restart (stop, start)
/// gives back the same node state. No twilld is involved.
#[test]
fn flannel_state_by_hand_matches_the_spec_in_both_modes() {
    if !twill_lab::require_root() {
        return;
    }
    let mut lab = Lab::new("flstate").unwrap();
    lab.start_etcd().unwrap();
    lab.add_node("a").unwrap();
    let peer = FlannelPeer {
        subnet: "10.244.7.0/24".parse().unwrap(),
        vtep_mac: "0e:fa:00:00:07:01".into(),
        public_ip: "198.18.0.99".parse().unwrap(),
    };
    let mut f = flannel_node("a", "10.244.1.0/24", "0e:fa:00:00:01:01");
    let key = lease_key(PREFIX, f.subnet);

    lab.flannel_start(&f, std::slice::from_ref(&peer)).unwrap();
    let nft = lab.node_snapshot("a", Some(&key)).unwrap();
    let table = nft
        .nft_table("table ip flannel-ipv4")
        .expect("ip flannel-ipv4");
    let golden_nft = "\
table ip flannel-ipv4 {
	comment \"rules for flannel-ipv4\"
	chain postrtg {
		comment \"chain to manage traffic masquerading by flannel\"
		type nat hook postrouting priority srcnat; policy accept;
		meta mark 0x00004000 return
		ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
		ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
		ip saddr != 10.244.1.0/24 ip daddr 10.244.0.0/16 return
		ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
		ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
	}

	chain forward {
		comment \"chain to accept flannel traffic\"
		type filter hook forward priority filter; policy accept;
		ip saddr 10.244.0.0/16 accept
		ip daddr 10.244.0.0/16 accept
	}
}
";
    assert_eq!(
        table,
        twill_lab::flannel::normalise_nft(golden_nft),
        "Flannel's nftables table"
    );
    assert!(nft.nft_tables().contains("table ip6 flannel-ipv6"));
    assert_eq!(
        nft.sections[&format!("etcd {key}")].trim_end(),
        lease_value(lab.node("a").addr, &f.vtep_mac)
    );
    assert_eq!(
        nft.sections["subnet.env"],
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
    );
    for (section, line) in [
        (
            "routes",
            "10.244.7.0/24 via 10.244.7.0 dev flannel.1 onlink",
        ),
        (
            "neighbours flannel.1",
            "10.244.7.0 lladdr 0e:fa:00:00:07:01 PERMANENT",
        ),
        (
            "fdb flannel.1",
            "0e:fa:00:00:07:01 dst 198.18.0.99 self permanent",
        ),
        (
            "flannel.1",
            "vxlan id 1 local 198.18.0.11 dev eth0 srcport 0 0 dstport 8472 nolearning",
        ),
        ("flannel.1", "inet 10.244.1.0/32 scope global flannel.1"),
    ] {
        assert!(
            nft.sections[section].contains(line),
            "{section} lacks {line:?}:\n{nft}"
        );
    }
    // A restart (flanneld removes nothing when it stops): the same state, nothing doubled.
    lab.flannel_start(&f, std::slice::from_ref(&peer)).unwrap();
    ensure_same(
        "Flannel restarted (nftables)",
        &nft,
        &lab.node_snapshot("a", Some(&key)).unwrap(),
    )
    .unwrap();

    // iptables mode: flanneld restarted from nftables mode into iptables mode (its start
    // removes the other mode's tables).
    f.rules = FlannelRules::Iptables;
    lab.flannel_start(&f, std::slice::from_ref(&peer)).unwrap();
    let ipt = lab.node_snapshot("a", Some(&key)).unwrap();
    let rules = |s: &NodeSnapshot, table: &str| -> Vec<String> {
        s.sections[&format!("iptables {table}")]
            .lines()
            .filter(|l| l.starts_with("-A"))
            .map(String::from)
            .collect()
    };
    assert_eq!(
        rules(&ipt, "nat"),
        [
            "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG",
            "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN",
            "-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN",
            "-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN",
            "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN",
            "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully",
            "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully",
        ]
    );
    assert_eq!(
        rules(&ipt, "filter"),
        [
            "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD",
            "-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
            "-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
        ]
    );
    assert!(
        ipt.nft_table("table ip flannel-ipv4").is_none(),
        "iptables mode keeps no nftables table:\n{ipt}"
    );
    // A restart in iptables mode (the rules stay through the stop): still one copy of each
    // rule, in order.
    lab.flannel_start(&f, std::slice::from_ref(&peer)).unwrap();
    ensure_same(
        "Flannel started twice (iptables)",
        &ipt,
        &lab.node_snapshot("a", Some(&key)).unwrap(),
    )
    .unwrap();
    lab.teardown().unwrap();
}
