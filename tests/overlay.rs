//! Lab tests of twilld in etcd mode: real etcd, real netlink,
//! real nft and iptables, every test in namespaces of its own. Root only; skipped with a message outside CI.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime};

use common::{cluster, log_times, subnet_key, wait_until, Cluster, DEADLINE, PREFIX};
use twill_formats::subnet_env::SubnetEnv;
use twill_lab::ping::Pinger;
use twill_lab::{Ipv4Net, Signal};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

fn subnet(env: &SubnetEnv) -> Ipv4Net {
    env.subnet_network().expect("FLANNEL_SUBNET")
}

fn expected_vxlan_lease(public: Ipv4Addr, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{public}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

fn assert_all_pods_reach_each_other(c: &Cluster, pods: &[(String, String, Ipv4Addr)]) {
    for (_, from_ns, _) in pods {
        for (to_name, _, to_ip) in pods {
            assert!(
                c.lab.wait_ping(from_ns, (*to_ip).into(), DEADLINE),
                "{from_ns} cannot reach {to_name} ({to_ip})"
            );
        }
    }
}

#[test]
fn vxlan_three_nodes_flannel_leases_entries_and_pod_reachability() {
    if !twill_lab::require_root() {
        return;
    }
    let nodes = ["n1", "n2", "n3"];
    let mut c = cluster("vx3", &nodes, VXLAN);
    let envs = c.start_all(&nodes);

    let subnets: Vec<Ipv4Net> = envs.values().map(subnet).collect();
    assert_eq!(
        subnets
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3,
        "subnets not distinct: {subnets:?}"
    );

    for n in nodes {
        let env = &envs[n];
        let s = subnet(env);
        assert!("10.244.0.0/16".parse::<Ipv4Net>().unwrap().contains(&s));
        assert_eq!(s.prefix_len(), 24);
        // subnet.env, byte for byte in Flannel's order.
        let text = std::fs::read_to_string(c.subnet_file(n)).unwrap();
        let first = Ipv4Addr::from(u32::from(s.network()) + 1);
        assert_eq!(text, format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={first}/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"));
        // The lease, byte for byte as Flannel writes it.
        let addr = c.lab.node(n).addr;
        let mac = c.mac(n, "flannel.1");
        assert_eq!(
            c.etcd_get(&subnet_key(&s)).as_deref(),
            Some(expected_vxlan_lease(addr, &mac).as_str())
        );
        // The device as Flannel makes it.
        let link = &c.ip_json(n, &["-d", "link", "show", "dev", "flannel.1"])[0];
        assert_eq!(link["mtu"], 1450);
        let info = &link["linkinfo"]["info_data"];
        assert_eq!(info["id"], 1);
        assert_eq!(info["local"], addr.to_string());
        assert_eq!(info["port"], 8472);
        assert_eq!(info["learning"], false);
        let addrs = c.ip_json(n, &["addr", "show", "dev", "flannel.1"]);
        let local: Vec<String> = addrs[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["family"] == "inet")
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect();
        assert_eq!(local, vec![format!("{}/32", s.network())]);
    }

    // Every node holds neighbour, FDB and route entries for both others, and nothing else.
    for n in nodes {
        c.wait_entries(n, "flannel.1", "entries for both peers", |e| {
            nodes.iter().filter(|m| **m != n).all(|m| {
                e.has_peer(
                    &subnet(&envs[*m]),
                    c.lab.node(m).addr,
                    &c.mac(m, "flannel.1"),
                )
            }) && e.routes.len() == 2
                && e.neighbours.len() == 2
                && e.fdb.len() == 2
        });
    }

    // Masquerade and forward rules in Flannel's iptables chains (EnableNFTables absent is
    // iptables mode; tests/iptables.rs holds the byte-for-byte and mode-switch checks).
    let save = |table: &str| {
        c.lab
            .exec_ok(&c.ns("n1"), &["iptables-save", "-t", table])
            .unwrap()
    };
    let (nat, filter) = (save("nat"), save("filter"));
    let s1 = subnet(&envs["n1"]);
    let masq = r#"-m comment --comment "flanneld masq""#;
    let fwd = r#"-m comment --comment "flanneld forward""#;
    for (rules, rule) in [
        (&nat, format!("-A POSTROUTING {masq} -j FLANNEL-POSTRTG")),
        (
            &nat,
            format!("-A FLANNEL-POSTRTG -s {s1} -d 10.244.0.0/16 {masq} -j RETURN"),
        ),
        (
            &nat,
            format!("-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d {s1} {masq} -j RETURN"),
        ),
        (
            &nat,
            format!("-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d {s1} {masq} -j RETURN"),
        ),
        (
            &nat,
            format!("-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 {masq} -j MASQUERADE"),
        ),
        (
            &nat,
            format!("-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 {masq} -j MASQUERADE"),
        ),
        (&filter, format!("-A FORWARD {fwd} -j FLANNEL-FWD")),
        (
            &filter,
            format!("-A FLANNEL-FWD -s 10.244.0.0/16 {fwd} -j ACCEPT"),
        ),
        (
            &filter,
            format!("-A FLANNEL-FWD -d 10.244.0.0/16 {fwd} -j ACCEPT"),
        ),
    ] {
        assert!(rules.contains(&rule), "missing {rule:?} in\n{rules}");
    }
    assert!(
        !c.lab
            .exec(&c.ns("n1"), &["nft", "list", "table", "ip", "flannel-ipv4"])
            .unwrap()
            .status
            .success(),
        "iptables mode also wrote nftables mode's table"
    );

    let pods: Vec<(String, String, Ipv4Addr)> = nodes
        .iter()
        .map(|n| {
            let name = format!("p{n}");
            let ip = c.pod(n, &name, &envs[*n]);
            (name.clone(), c.lab.pod(&name).netns.clone(), ip)
        })
        .collect();
    assert_all_pods_reach_each_other(&c, &pods);
}

#[test]
fn host_gw_three_nodes_route_via_peers_and_pods_reach_each_other() {
    if !twill_lab::require_root() {
        return;
    }
    let nodes = ["n1", "n2", "n3"];
    let mut c = cluster("hgw", &nodes, HOST_GW);
    let envs = c.start_all(&nodes);
    for n in nodes {
        let s = subnet(&envs[n]);
        assert_eq!(
            c.etcd_get(&subnet_key(&s)).as_deref(),
            Some(
                format!(
                    r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"host-gw"}}"#,
                    c.lab.node(n).addr
                )
                .as_str()
            )
        );
        assert!(std::fs::read_to_string(c.subnet_file(n))
            .unwrap()
            .contains("FLANNEL_MTU=1500\n"));
    }
    for n in nodes {
        c.wait_entries(n, "flannel.1", "host-gw routes", |e| {
            nodes.iter().filter(|m| **m != n).all(|m| {
                e.routes.contains(&format!(
                    "{} via {} dev eth0",
                    subnet(&envs[*m]),
                    c.lab.node(m).addr
                ))
            }) && e.routes.len() == 2
        });
    }
    let pods: Vec<(String, String, Ipv4Addr)> = nodes
        .iter()
        .map(|n| {
            let name = format!("h{n}");
            let ip = c.pod(n, &name, &envs[*n]);
            (name.clone(), c.lab.pod(&name).netns.clone(), ip)
        })
        .collect();
    assert_all_pods_reach_each_other(&c, &pods);
}

/// A node set up by hand exactly as flanneld would have set it up (its lease written into
/// etcd, flannel.1 configured with ip and bridge): twill nodes program it, and it reaches them.
#[test]
fn flannel_node_configured_by_hand_interoperates() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("flx", &["n1", "n2", "fl"], VXLAN);
    let envs = c.start_all(&["n1", "n2"]);

    // The Flannel node: subnet 10.244.200.0/24, its own VTEP MAC.
    let fl_addr = c.lab.node("fl").addr;
    let fl_subnet: Ipv4Net = "10.244.200.0/24".parse().unwrap();
    let fl_mac = "0e:fa:00:00:c8:01";
    c.lab.flannel_by_hand("fl", fl_subnet, fl_mac).unwrap();
    let grant = c.lab.etcdctl(&["lease", "grant", "86400"]).unwrap();
    let lease_id = grant
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    c.lab
        .etcdctl(&[
            "put",
            &format!("--lease={lease_id}"),
            &subnet_key(&fl_subnet),
            &expected_vxlan_lease(fl_addr, fl_mac),
        ])
        .unwrap();
    // What flanneld on that node would program for each twill peer, from their leases.
    for n in ["n1", "n2"] {
        let mac = c.mac(n, "flannel.1");
        c.lab
            .flannel_peer_by_hand("fl", subnet(&envs[n]), &mac, c.lab.node(n).addr)
            .unwrap();
    }
    let fl_pod = Ipv4Net::new("10.244.200.2".parse().unwrap(), 24).unwrap();
    c.lab.add_manual_pod("fl", "pfl", fl_pod).unwrap();

    for n in ["n1", "n2"] {
        c.wait_entries(n, "flannel.1", "the Flannel node's entries", |e| {
            e.has_peer(&fl_subnet, fl_addr, fl_mac)
        });
    }
    let mut pods: Vec<(String, String, Ipv4Addr)> = ["n1", "n2"]
        .iter()
        .map(|n| {
            let name = format!("q{n}");
            let ip = c.pod(n, &name, &envs[*n]);
            (name.clone(), c.lab.pod(&name).netns.clone(), ip)
        })
        .collect();
    pods.push(("pfl".into(), c.lab.pod("pfl").netns.clone(), fl_pod.addr()));
    assert_all_pods_reach_each_other(&c, &pods);
}

/// A lease appearing or vanishing in etcd is programmed or removed on every other node; the
/// times are printed (the budget lives in bench/, not here). Each is taken from twilld's own
/// log: from just before `etcdctl put`/`del` to the timestamp of the "reconciled dataplane"
/// line of the pass that applied the change on that node, so neither the test's polling
/// interval nor the polling's CPU use is in the number.
#[test]
fn lease_added_and_deleted_converges_on_every_node() {
    if !twill_lab::require_root() {
        return;
    }
    let nodes = ["n1", "n2", "n3"];
    let mut c = cluster("cvg", &nodes, VXLAN);
    c.start_all(&nodes);
    for n in nodes {
        c.wait_entries(n, "flannel.1", "initial peers", |e| e.routes.len() == 2);
    }
    let peer: Ipv4Net = "10.244.250.0/24".parse().unwrap();
    let peer_ip: Ipv4Addr = "198.18.0.250".parse().unwrap();
    let peer_mac = "0e:00:00:00:fa:01";
    // How long after `since` the pass that applied a change made then finished on `n`: the
    // first "reconciled dataplane" line logged after `since` (the entries can be seen just
    // before that line is written, so it is waited for).
    let applied = |c: &Cluster, n: &str, since: SystemTime| -> Duration {
        let mut at = None;
        wait_until(
            &format!("{n}: a pass logged after the change"),
            DEADLINE,
            || {
                at = log_times(&c.log(n), "reconciled dataplane")
                    .into_iter()
                    .find(|t| *t >= since);
                at.is_some()
            },
        );
        at.unwrap().duration_since(since).unwrap()
    };
    let t0 = SystemTime::now();
    c.lab
        .etcdctl(&[
            "put",
            &subnet_key(&peer),
            &expected_vxlan_lease(peer_ip, peer_mac),
        ])
        .unwrap();
    let mut added = Vec::new();
    for n in nodes {
        c.wait_entries(n, "flannel.1", "new peer programmed", |e| {
            e.has_peer(&peer, peer_ip, peer_mac)
        });
        added.push(applied(&c, n, t0));
    }
    let t1 = SystemTime::now();
    c.lab.etcdctl(&["del", &subnet_key(&peer)]).unwrap();
    let mut removed = Vec::new();
    for n in nodes {
        c.wait_entries(n, "flannel.1", "deleted peer removed", |e| {
            !e.mentions(&peer) && !e.fdb.iter().any(|f| f.starts_with(peer_mac))
        });
        removed.push(applied(&c, n, t1));
    }
    // Other peers are untouched throughout.
    for n in nodes {
        assert_eq!(c.entries(n, "flannel.1").routes.len(), 2);
    }
    println!(
        "convergence (etcdctl put/del to the pass that applied it, from twilld's log; includes etcdctl): add {:?} (per node {added:?}), delete {:?} (per node {removed:?})",
        added.iter().max().unwrap(),
        removed.iter().max().unwrap()
    );
}

/// kill -9 and restart of twilld during a continuous ping across nodes: no packet lost, same
/// subnet, same VTEP MAC.
#[test]
fn kill9_and_restart_is_hitless() {
    if !twill_lab::require_root() {
        return;
    }
    let nodes = ["n1", "n2"];
    let mut c = cluster("k9", &nodes, VXLAN);
    let envs = c.start_all(&nodes);
    for n in nodes {
        c.wait_entries(n, "flannel.1", "peer", |e| e.routes.len() == 1);
    }
    let ip1 = c.pod("n1", "k1", &envs["n1"]);
    let ip2 = c.pod("n2", "k2", &envs["n2"]);
    let k1 = c.lab.pod("k1").netns.clone();
    assert!(c.lab.wait_ping(&k1, ip2.into(), DEADLINE));
    let macs: Vec<String> = nodes.iter().map(|n| c.mac(n, "flannel.1")).collect();

    // A probe every 10 ms from before the first kill until well after the second restart;
    // every probe up to the last answered one must be answered.
    let ping = Pinger::start(
        &mut c.lab,
        &k1,
        "ping-k9",
        ip2.into(),
        "0.01",
        Duration::from_secs(600),
    );
    ping.wait_answered(&mut c.lab, 50);
    for n in nodes {
        c.kill(n, Signal::SIGKILL);
        c.start(n, &[]);
        c.wait_ready(n);
        // The restarted daemon's first pass (stale entries removed, every peer programmed)
        // runs after ready; it has applied the guard, as every first pass does, once this is
        // logged. Then 80 more probes (0.8 s) must get through as well.
        wait_until(
            &format!("first pass of the restarted twilld on {n}"),
            DEADLINE,
            || c.log(n).contains("underlay guard updated"),
        );
        let seen = ping.last_answered(&c.lab);
        ping.wait_answered(&mut c.lab, seen + 80);
    }
    let report = ping.stop(&mut c.lab);
    assert!(
        report.lost().is_empty(),
        "probes lost across restarts: {:?}\n{}",
        report.lost(),
        report.log
    );
    println!(
        "{} probes answered without a gap across both restarts ({})",
        report.last_answered(),
        report.summary
    );

    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(
            SubnetEnv::read(&c.subnet_file(n)).unwrap(),
            envs[*n],
            "subnet changed on {n}"
        );
        assert_eq!(c.mac(n, "flannel.1"), macs[i], "VTEP MAC changed on {n}");
    }
    assert!(c.lab.ping(&k1, ip1.into(), 1, Duration::from_secs(2)));
}

/// A peer's lease deleted while twilld on another node is stopped: on start its stale entries
/// are gone (flannel#2554).
#[test]
fn stale_peer_entries_are_removed_at_start() {
    if !twill_lab::require_root() {
        return;
    }
    let nodes = ["n1", "n2", "n3"];
    let mut c = cluster("gc", &nodes, VXLAN);
    let envs = c.start_all(&nodes);
    for n in nodes {
        c.wait_entries(n, "flannel.1", "peers", |e| e.routes.len() == 2);
    }
    c.kill("n1", Signal::SIGTERM);
    c.kill("n3", Signal::SIGKILL);
    let gone = subnet(&envs["n3"]);
    c.lab.etcdctl(&["del", &subnet_key(&gone)]).unwrap();
    // n1's kernel still holds n3's entries: nothing ran to remove them.
    assert!(c.entries("n1", "flannel.1").mentions(&gone));
    c.start("n1", &[]);
    c.wait_ready("n1");
    c.wait_entries("n1", "flannel.1", "stale peer removed at start", |e| {
        !e.mentions(&gone)
            && e.has_peer(
                &subnet(&envs["n2"]),
                c.lab.node("n2").addr,
                &c.mac("n2", "flannel.1"),
            )
    });
    c.wait_entries(
        "n2",
        "flannel.1",
        "deleted peer removed while running",
        |e| !e.mentions(&gone) && e.routes.len() == 1,
    );
    let keys = c.subnet_keys();
    assert!(!keys.contains(&subnet_key(&gone)), "{keys:?}");
    assert!(keys
        .iter()
        .all(|k| k.starts_with(&format!("{PREFIX}/subnets/"))));
}

/// Drift is repaired: a route deleted by hand comes back, and a deleted flannel.1 is recreated
/// with the same MAC and every peer entry, driven by netlink events (well before the periodic
/// resync would run).
#[test]
fn deleted_route_and_device_are_restored() {
    if !twill_lab::require_root() {
        return;
    }
    let nodes = ["n1", "n2", "n3"];
    let mut c = cluster("drift", &nodes, VXLAN);
    let envs = c.start_all(&nodes);
    // Every entry for both peers (a route can be in before another peer's FDB entry), so that
    // `full` is the complete state the repairs must bring back.
    let peers: Vec<(Ipv4Net, Ipv4Addr, String)> = ["n2", "n3"]
        .iter()
        .map(|m| (subnet(&envs[*m]), c.lab.node(m).addr, c.mac(m, "flannel.1")))
        .collect();
    c.wait_entries("n1", "flannel.1", "both peers", |e| {
        peers.iter().all(|(s, a, m)| e.has_peer(s, *a, m))
            && e.routes.len() == 2
            && e.neighbours.len() == 2
            && e.fdb.len() == 2
    });
    let full = c.entries("n1", "flannel.1");
    let mac = c.mac("n1", "flannel.1");
    let ns = c.ns("n1");

    let s2 = subnet(&envs["n2"]).to_string();
    c.lab.exec_ok(&ns, &["ip", "route", "del", &s2]).unwrap();
    let took = c.wait_entries("n1", "flannel.1", "route restored", |e| *e == full);
    println!("route restored after {took:?}");

    c.lab
        .exec_ok(&ns, &["ip", "link", "del", "flannel.1"])
        .unwrap();
    let took = c.wait_entries("n1", "flannel.1", "device and entries restored", |e| {
        *e == full
    });
    println!("flannel.1 and its entries restored after {took:?}");
    assert_eq!(c.mac("n1", "flannel.1"), mac);
    let addrs = c
        .lab
        .exec_ok(&ns, &["ip", "-4", "addr", "show", "dev", "flannel.1"])
        .unwrap();
    assert!(
        addrs.contains(&format!("inet {}/32", subnet(&envs["n1"]).network())),
        "{addrs}"
    );
    let p1 = c.pod("n1", "r1", &envs["n1"]);
    let p3 = c.pod("n3", "r3", &envs["n3"]);
    let _ = p1;
    assert!(c
        .lab
        .wait_ping(&c.lab.pod("r1").netns.clone(), p3.into(), DEADLINE));
}

/// `/healthz` and `/readyz` with flanneld's bodies: not ready while twilld waits for its
/// config, ready once rules are in and subnet.env is written.
#[test]
fn healthz_and_readyz_answer_like_flanneld() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("hz", &["n1"], VXLAN);
    c.lab
        .etcdctl(&["del", "/coreos.com/network/config"])
        .unwrap();
    c.start("n1", &["--healthz-port=8081", "--healthz-ip=127.0.0.1"]);
    let get = |c: &Cluster, path: &str| c.http_get("n1", 8081, path);
    let deadline = Instant::now() + DEADLINE;
    while !get(&c, "/healthz").contains("200 OK") {
        assert!(Instant::now() < deadline, "no /healthz:\n{}", c.log("n1"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(get(&c, "/healthz").ends_with("flanneld is running"));
    let not_ready = get(&c, "/readyz");
    assert!(
        not_ready.starts_with("HTTP/1.1 503") && not_ready.ends_with("flanneld is not ready yet"),
        "{not_ready}"
    );
    c.lab
        .etcdctl(&["put", "/coreos.com/network/config", VXLAN])
        .unwrap();
    c.wait_ready("n1");
    let ready = get(&c, "/readyz");
    assert!(
        ready.starts_with("HTTP/1.1 200") && ready.ends_with("flanneld is ready"),
        "{ready}"
    );
}
