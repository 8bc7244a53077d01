//! Fault-injection lab tests: etcd outage with changes, compaction and a renewal due
//! during it; a peer re-created with a new MAC and public IP; twilld killed at random points of
//! its start-up; subnet.env's directory read-only or full. Root only; skipped outside CI.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime};

use common::{
    cluster, log_times, plain, subnet_key, wait_until, Cluster, Entries, DEADLINE, PREFIX,
};
use twill_lab::ping::Pinger;
use twill_lab::{Ipv4Net, Signal};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

fn subnet_of(c: &mut Cluster, node: &str) -> Ipv4Net {
    c.wait_ready(node).subnet_network().unwrap()
}

fn lease_id(c: &Cluster, key: &str) -> i64 {
    let out = c.lab.etcdctl(&["get", key, "-w", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["kvs"][0]["lease"].as_i64().unwrap_or(0)
}

fn revision(c: &Cluster) -> i64 {
    let out = c.lab.etcdctl(&["get", "x", "-w", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["header"]["revision"].as_i64().unwrap()
}

fn fake_lease(public: Ipv4Addr, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{public}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

/// The public IPs in `node`'s underlay guard.
fn guard_peers(c: &Cluster, node: &str) -> BTreeSet<String> {
    let out = c
        .lab
        .exec_ok(
            &c.ns(node),
            &[
                "nft",
                "-j",
                "list",
                "set",
                "inet",
                "twill-underlay",
                "peers4",
            ],
        )
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["set"]["elem"].as_array())
        .flatten()
        .filter_map(|e| e.as_str().map(String::from))
        .collect()
}

/// etcd unavailable for TWILL_ETCD_OUTAGE_SECS (default 120, at least 70) while a pod pings a
/// pod on the other node every 200 ms. First half: etcd stopped (connections refused). Second
/// half: etcd back but n1 cut off from it (packets dropped), while a peer lease is added,
/// another deleted, and etcd compacted past n1's watch revision. n1 renews its lease every
/// minute (`--subnet-lease-renew-margin=1439`), so a renewal falls due during the outage.
/// Checked: no ping lost and n1's entries untouched during the outage; n1 retried with
/// backoff; afterwards it catches up on both changes (through the compaction) and its lease
/// is re-granted (a new etcd lease, 24 h TTL).
#[test]
fn etcd_outage_keeps_traffic_then_catches_up_and_renews() {
    if !twill_lab::require_root() {
        return;
    }
    let outage: u64 = common::env_number("TWILL_ETCD_OUTAGE_SECS", 120);
    assert!(outage >= 70, "the outage must cover a renewal (>= 70 s)");
    let mut c = cluster("eout", &["n1", "n2"], VXLAN);
    let gone: Ipv4Net = "10.244.201.0/24".parse().unwrap();
    let gone_ip: Ipv4Addr = "198.18.0.201".parse().unwrap();
    c.lab
        .etcdctl(&[
            "put",
            &subnet_key(&gone),
            &fake_lease(gone_ip, "0a:00:00:00:02:01"),
        ])
        .unwrap();
    c.start("n1", &["--subnet-lease-renew-margin=1439"]);
    c.start("n2", &[]);
    let s1 = subnet_of(&mut c, "n1");
    let e2 = c.wait_ready("n2");
    let s2 = e2.subnet_network().unwrap();
    let a2 = c.lab.node("n2").addr;
    let mac2 = c.mac("n2", "flannel.1");
    c.wait_entries("n1", "flannel.1", "n2 and the doomed peer", |e| {
        e.has_peer(&s2, a2, &mac2) && e.has_peer(&gone, gone_ip, "0a:00:00:00:02:01")
    });
    let env1 = c.wait_ready("n1");
    let p1 = c.pod("n1", "p1", &env1);
    let p2 = c.pod("n2", "p2", &e2);
    let _ = p1;
    let p1ns = c.lab.pod("p1").netns.clone();
    assert!(c.lab.wait_ping(&p1ns, p2.into(), DEADLINE));
    let key1 = subnet_key(&s1);
    let lease_before = lease_id(&c, &key1);
    let entries_before = c.entries("n1", "flannel.1");

    // A probe every 200 ms from before the outage until after the catch-up and the renewal.
    let pinger = Pinger::start(
        &mut c.lab,
        &p1ns,
        "ping-outage",
        p2.into(),
        "0.2",
        Duration::from_secs(outage + 600),
    );
    pinger.wait_answered(&mut c.lab, 1);
    let t0 = Instant::now();

    // First half: etcd stopped.
    c.lab.stop_etcd().unwrap();
    std::thread::sleep(Duration::from_secs(outage / 2));
    assert_eq!(
        c.entries("n1", "flannel.1"),
        entries_before,
        "entries changed while etcd was down"
    );

    // Second half: etcd back, n1 cut off; changes and a compaction happen meanwhile.
    let n1ns = c.ns("n1");
    c.lab
        .exec_ok(
            &n1ns,
            &[
                "nft",
                "add table inet twtest-cut; add chain inet twtest-cut out { type filter hook output priority 0 ; } ; add rule inet twtest-cut out ip daddr 198.18.0.1 tcp dport 2379 drop",
            ],
        )
        .unwrap();
    c.lab.start_etcd().unwrap();
    let new: Ipv4Net = "10.244.202.0/24".parse().unwrap();
    let new_ip: Ipv4Addr = "198.18.0.202".parse().unwrap();
    c.lab
        .etcdctl(&[
            "put",
            &subnet_key(&new),
            &fake_lease(new_ip, "0a:00:00:00:02:02"),
        ])
        .unwrap();
    c.lab.etcdctl(&["del", &subnet_key(&gone)]).unwrap();
    let rev = revision(&c);
    c.lab.etcdctl(&["compact", &rev.to_string()]).unwrap();
    let rest = Duration::from_secs(outage).saturating_sub(t0.elapsed());
    std::thread::sleep(rest);
    assert_eq!(
        c.entries("n1", "flannel.1"),
        entries_before,
        "entries changed while cut off"
    );
    c.lab
        .exec_ok(&n1ns, &["nft", "delete", "table", "inet", "twtest-cut"])
        .unwrap();
    let outage_len = t0.elapsed();

    // Catch-up: the change made during the outage, seen through the compaction.
    let caught_up = c.wait_entries("n1", "flannel.1", "caught up after the outage", |e| {
        e.has_peer(&new, new_ip, "0a:00:00:00:02:02")
            && !e.mentions(&gone)
            && e.has_peer(&s2, a2, &mac2)
            && e.fdb.len() == 2
    });
    wait_until("guard follows the leases", DEADLINE, || {
        guard_peers(&c, "n1") == [a2.to_string(), new_ip.to_string()].into()
    });
    // Renewal: failed during the outage, made once etcd was reachable again. twilld retries
    // a failed renewal after at most 30 s, and an attempt made just before the cut was lifted
    // can take up to two 10 s request timeouts to fail first.
    let renewed = wait_until(
        "lease renewed after the outage",
        Duration::from_secs(75),
        || lease_id(&c, &key1) != lease_before,
    );
    let log = plain(&c.log("n1"));
    assert!(
        log.contains("renewing lease failed"),
        "no renewal fell due during the outage:\n{log}"
    );
    // The watch's retries back off (100 ms doubling to 5 s, each plus a jitter of up to
    // itself): over the outage the delays grow past 2.5 s and never exceed 10 s.
    let watch_delays = watch_retry_delays(&log);
    let longest = watch_delays.iter().max().copied().unwrap_or_default();
    assert!(
        longest > Duration::from_millis(2500) && longest <= Duration::from_secs(10),
        "no backoff up to 5 s (plus jitter) in the watch: {watch_delays:?}\n{log}"
    );
    let ttl = c
        .lab
        .etcdctl(&["lease", "timetolive", &format!("{:x}", lease_id(&c, &key1))])
        .unwrap();
    assert!(ttl.contains("granted with TTL(86400s)"), "{ttl}");
    assert!(c.lab.is_running(c.daemon("n1")));

    // Not a single ping lost during the outage and the catch-up: a few more probes after
    // it, then every probe up to the last answered one must have been answered.
    let seen = pinger.last_answered(&c.lab);
    pinger.wait_answered(&mut c.lab, seen + 5);
    let report = pinger.stop(&mut c.lab);
    assert!(
        report.lost().is_empty(),
        "probes lost: {:?} ({})",
        report.lost(),
        report.summary
    );
    eprintln!(
        "outage {outage_len:?}; caught up {caught_up:?} and renewed {renewed:?} after it; {} probes answered without a gap ({})",
        report.last_answered(),
        report.summary
    );
}

/// A peer's lease deleted and re-created with a new VTEP MAC and public IP: both nodes
/// reprogram it, and no neighbour, FDB entry or guard element of the old identity stays.
#[test]
fn peer_recreated_with_new_mac_and_ip_leaves_nothing_stale() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("recr", &["n1", "n2"], VXLAN);
    c.start("n1", &[]);
    c.start("n2", &[]);
    c.wait_ready("n1");
    c.wait_ready("n2");
    let peer: Ipv4Net = "10.244.210.0/24".parse().unwrap();
    let (old_ip, old_mac) = ("198.18.0.210", "0a:00:00:00:21:00");
    let (new_ip, new_mac) = ("198.18.0.211", "0a:00:00:00:21:01");
    c.lab
        .etcdctl(&[
            "put",
            &subnet_key(&peer),
            &fake_lease(old_ip.parse().unwrap(), old_mac),
        ])
        .unwrap();
    for n in ["n1", "n2"] {
        c.wait_entries(n, "flannel.1", "old identity", |e| {
            e.has_peer(&peer, old_ip.parse().unwrap(), old_mac)
        });
    }
    c.lab.etcdctl(&["del", &subnet_key(&peer)]).unwrap();
    c.lab
        .etcdctl(&[
            "put",
            &subnet_key(&peer),
            &fake_lease(new_ip.parse().unwrap(), new_mac),
        ])
        .unwrap();
    let stale = |e: &Entries| {
        e.fdb
            .iter()
            .any(|f| f.contains(old_mac) || f.ends_with(old_ip))
            || e.neighbours.iter().any(|n| n.contains(old_mac))
    };
    for n in ["n1", "n2"] {
        let t = c.wait_entries(n, "flannel.1", "new identity, nothing stale", |e| {
            e.has_peer(&peer, new_ip.parse().unwrap(), new_mac) && !stale(e)
        });
        // The kernel's whole view, not only permanent entries.
        let neigh = c
            .lab
            .exec_ok(&c.ns(n), &["ip", "neigh", "show", "dev", "flannel.1"])
            .unwrap();
        let fdb = c
            .lab
            .exec_ok(&c.ns(n), &["bridge", "fdb", "show", "dev", "flannel.1"])
            .unwrap();
        assert!(
            !neigh.contains(old_mac) && !fdb.contains(old_mac) && !fdb.contains(old_ip),
            "{neigh}\n{fdb}"
        );
        let g = guard_peers(&c, n);
        assert!(g.contains(new_ip) && !g.contains(old_ip), "{g:?}");
        eprintln!("{n} reprogrammed in {t:?}");
    }
}

/// Everything twilld makes on a node, with counters and timestamps left out.
fn node_state(c: &Cluster, node: &str) -> String {
    let ns = c.ns(node);
    let e = c.entries(node, "flannel.1");
    let link = c.ip_json(node, &["-d", "addr", "show", "dev", "flannel.1"]);
    let l = &link[0];
    let env = std::fs::read_to_string(c.subnet_file(node)).unwrap_or_default();
    let mut tables: String = c
        .lab
        .exec_ok(
            &ns,
            &["nft", "-s", "list", "table", "inet", "twill-underlay"],
        )
        .unwrap_or_else(|e| format!("inet twill-underlay: {e}"));
    // Flannel's iptables chains (iptables mode, the default), without iptables-save's
    // timestamps and counters.
    for table in ["nat", "filter"] {
        let save = c
            .lab
            .exec_ok(&ns, &["iptables-save", "-t", table])
            .unwrap_or_else(|e| format!("iptables-save -t {table}: {e}"));
        for line in save.lines().filter(|l| l.contains("FLANNEL")) {
            tables += line;
            tables.push('\n');
        }
    }
    let lease = c
        .subnet_keys()
        .iter()
        .map(|k| format!("{k}={}", c.etcd_get(k).unwrap_or_default()))
        .collect::<Vec<_>>()
        .join("\n");
    // IPv4 only: the kernel's link-local IPv6 address is not twilld's and flips "tentative".
    let v4: Vec<&serde_json::Value> = l["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["family"] == "inet")
        .collect();
    format!(
        "{e:#?}\nmac {} mtu {} info {} addrs {v4:?}\n{env}\n{tables}\n{lease}",
        l["address"], l["mtu"], l["linkinfo"]["info_data"]
    )
}

/// twilld SIGKILLed at random points of its start-up, TWILL_KILL_POINTS (default 50) slots of
/// them, each kill followed by a normal start: the node ends in the same state as after an
/// undisturbed start, every time (devices, entries, subnet.env, nft tables, leases).
///
/// Where the kill points land is made certain rather than left to timing: odd slots draw from
/// 0 to the time a clean start took to program its peer and guard (anywhere in start-up,
/// including the first pass after ready); even slots must land before ready, drawn from 0 to
/// the time the clean start took to be ready. Its log, final once it is dead, tells whether
/// it had reported ready; an even slot whose kill came after ready (a restart can be quicker
/// than the first start) counts as a kill point like any other, and the slot is tried again
/// with half the window, until a kill lands before ready (at 0 it must).
#[test]
fn twilld_killed_at_random_start_up_points_converges_every_time() {
    if !twill_lab::require_root() {
        return;
    }
    let points: usize = common::env_number("TWILL_KILL_POINTS", 50);
    let mut c = cluster("kill", &["n1", "n2"], VXLAN);
    c.start("n2", &[]);
    let s2 = subnet_of(&mut c, "n2");
    let a2 = c.lab.node("n2").addr;
    let mac2 = c.mac("n2", "flannel.1");
    let t = Instant::now();
    let started = SystemTime::now();
    c.start("n1", &[]);
    c.wait_ready("n1");
    let converge = |c: &Cluster| {
        c.wait_entries("n1", "flannel.1", "peer programmed", |e| {
            e.has_peer(&s2, a2, &mac2)
        });
        wait_until("guard", DEADLINE, || {
            guard_peers(c, "n1").contains(&a2.to_string())
        });
    };
    converge(&c);
    // The clean start's times from its own log (not the test's polling): ready, and the end of
    // the first pass (guard applied, then the peer's entries).
    let log = c.log("n1");
    let after_start = |message: &str| {
        log_times(&log, message)
            .first()
            .unwrap_or_else(|| panic!("no {message:?} in the clean start's log:\n{log}"))
            .duration_since(started)
            .unwrap()
    };
    let ready = after_start("wrote subnet.env; ready");
    let clean = after_start("underlay guard updated").max(after_start("reconciled dataplane"));
    let reference = node_state(&c, "n1");
    c.kill("n1", Signal::SIGKILL);

    let mut seed: u64 = std::env::var("TWILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| t.elapsed().as_nanos() as u64 | 1);
    eprintln!("TWILL_SEED={seed}; clean start: ready after {ready:?}, converged after {clean:?}");
    let (mut killed_before_ready, mut killed_after_ready) = (0, 0);
    let mut kill = 0;
    for slot in 0..points {
        let before_ready_slot = slot % 2 == 0;
        let mut window = if before_ready_slot { ready } else { clean };
        loop {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = Duration::from_micros(seed % (window.as_micros() as u64).max(1));
            c.start("n1", &[]);
            std::thread::sleep(at);
            c.kill("n1", Signal::SIGKILL);
            // Its log goes straight to a file, so once it has exited the log is final: did it
            // report ready before the kill?
            let was_ready = c.log("n1").contains("wrote subnet.env; ready");
            if was_ready {
                killed_after_ready += 1;
            } else {
                killed_before_ready += 1;
            }
            c.start("n1", &[]);
            c.wait_ready("n1");
            converge(&c);
            let state = node_state(&c, "n1");
            assert_eq!(
                state, reference,
                "kill {kill} (slot {slot}) at {at:?}, ready: {was_ready} (TWILL_SEED above)"
            );
            c.kill("n1", Signal::SIGKILL);
            kill += 1;
            if !(before_ready_slot && was_ready) {
                break;
            }
            window /= 2;
        }
    }
    eprintln!(
        "{kill} kill points in {points} slots: {killed_before_ready} before ready, {killed_after_ready} after"
    );
    // Every even slot ended with a kill before ready.
    assert!(killed_before_ready >= points.div_ceil(2));
}

/// subnet.env's directory read-only, or full: twilld stops with an error naming the file and
/// the cause, and leaves no partial file (an existing subnet.env stays byte for byte, no temp
/// file remains). The directory is a tmpfs mounted in twilld's own mount namespace.
#[test]
fn subnet_env_dir_read_only_or_full_gives_a_clear_error_and_no_partial_file() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("senv", &["n1"], VXLAN);
    let ns = c.ns("n1");
    let dir = c.lab.node("n1").dir.join("ro");
    let d = dir.to_string_lossy().into_owned();
    let old = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.9.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
    let twilld = common::twilld_bin();
    for (case, setup, cause) in [
        ("ro", format!("mount -t tmpfs -o ro,size=64k tmpfs {d}"), "Read-only file system"),
        (
            "full",
            format!(
                "mount -t tmpfs -o size=4k tmpfs {d} && printf '{}' > {d}/subnet.env && (dd if=/dev/zero of={d}/fill bs=1k count=64 2>/dev/null; true)",
                old.replace('\n', "\\n")
            ),
            "No space left on device",
        ),
    ] {
        let script = format!(
            "mkdir -p {d} && {setup} && {{ {twilld} --etcd-endpoints=http://198.18.0.1:2379 --ip-masq --subnet-file {d}/subnet.env; echo exit=$?; echo files:; ls -A {d}; echo content:; cat {d}/subnet.env; }}"
        );
        let id = c
            .lab
            .spawn(&ns, &format!("senv-{case}"), &["sh", "-c", &script], &[("TWILL_LOG", "info")])
            .unwrap();
        c.lab.wait(id, Duration::from_secs(60)).unwrap();
        let log = c.lab.log(id);
        assert!(log.contains("exit=1"), "{case}: {log}");
        assert!(log.contains(&format!("{d}/subnet.env")) && log.contains(cause), "{case}: no clear error:\n{log}");
        let files = log.split("files:\n").nth(1).unwrap().split("content:").next().unwrap();
        assert!(!files.contains(".tmp"), "{case}: temp file left: {files}");
        let content = log.split("content:\n").nth(1).unwrap_or("");
        if case == "full" {
            assert!(content.starts_with(old), "{case}: subnet.env changed:\n{content}");
        } else {
            assert!(!files.contains("subnet.env"), "{case}: {files}");
        }
        // No daemon left: the next case starts from scratch.
        let _ = c.lab.etcdctl(&["del", &format!("{PREFIX}/subnets/"), "--prefix"]);
    }
}

/// twill-policy SIGKILLed and restarted again and again (also during its own start-up) under a
/// default-deny policy, while a pod on another node pings the isolated pod every 50 ms: not a
/// single reply gets through at any point (fail closed), and the pod is isolated at the end.
#[test]
fn twill_policy_killed_and_restarted_stays_closed() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("pkill", &["n1", "n2"], VXLAN);
    let envs = c.start_all(&["n1", "n2"]);
    let (e1, e2) = (envs["n1"].clone(), envs["n2"].clone());
    let victim = c.pod("n1", "victim", &e1);
    c.pod("n2", "client", &e2);
    let client = c.lab.pod("client").netns.clone();
    assert!(c.lab.wait_ping(&client, victim.into(), DEADLINE));

    let dir = c.lab.dir().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("cluster.yaml"),
        format!(
            "kind: Namespace\nmetadata: {{name: x}}\n---\nkind: Pod\nmetadata: {{name: victim, namespace: x}}\nspec: {{nodeName: n1}}\nstatus: {{phase: Running, podIPs: [{{ip: {victim}}}]}}\n---\nkind: NetworkPolicy\nmetadata: {{name: deny, namespace: x}}\nspec: {{podSelector: {{}}}}\n"
        ),
    )
    .unwrap();
    let bin = twill_lab::bin_path("twill-policy");
    let bin = bin.to_str().unwrap().to_string();
    let n1 = c.ns("n1");
    let dir_s = dir.to_str().unwrap().to_string();
    let spawn = |c: &mut Cluster, i: usize| {
        c.lab
            .spawn(
                &n1,
                &format!("twill-policy-{i}"),
                &[&bin, "--manifests", &dir_s, "run"],
                &[("NODE_NAME", "n1")],
            )
            .unwrap()
    };
    let mut policy = spawn(&mut c, 0);
    wait_until("victim isolated", DEADLINE, || {
        c.lab
            .exec_ok(&n1, &["nft", "list", "table", "inet", "twill-policy"])
            .is_ok_and(|s| s.contains("jump pod-in/x/victim"))
    });
    assert!(!c
        .lab
        .ping(&client, victim.into(), 3, Duration::from_secs(2)));

    // A probe every 50 ms from before the first kill until after the last restart.
    let pinger = Pinger::start(
        &mut c.lab,
        &client,
        "ping-isolated",
        victim.into(),
        "0.05",
        Duration::from_secs(300),
    );
    let mut seed = Instant::now().elapsed().as_nanos() as u64 | 1;
    let mut restarts = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(12) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        c.lab.kill(policy, Signal::SIGKILL).unwrap();
        assert!(
            c.lab.wait(policy, DEADLINE).unwrap().is_some(),
            "twill-policy survived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(seed % 300));
        restarts += 1;
        policy = spawn(&mut c, restarts);
        // Sometimes killed during its start-up, sometimes after it settled.
        std::thread::sleep(Duration::from_millis((seed >> 16) % 1000));
    }
    let report = pinger.stop(&mut c.lab);
    assert!(
        report.answered.is_empty(),
        "replies got through: {:?} ({})",
        report.answered,
        report.summary
    );
    let summary = report.summary;
    wait_until("still isolated", DEADLINE, || {
        c.lab
            .exec_ok(&n1, &["nft", "list", "table", "inet", "twill-policy"])
            .is_ok_and(|s| s.contains("jump pod-in/x/victim"))
    });
    assert!(!c
        .lab
        .ping(&client, victim.into(), 3, Duration::from_secs(2)));
    eprintln!("{restarts} kills and restarts; ping: {summary}");
}

/// Peer leases with garbage BackendData (and worse) next to good ones: each is skipped with its
/// key named; the good peers' entries stay, a good lease written after the garbage is
/// programmed, and no garbage address enters the underlay guard.
#[test]
fn garbage_peer_leases_never_affect_other_peers() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("garb", &["n1", "n2"], VXLAN);
    c.start("n1", &[]);
    c.start("n2", &[]);
    c.wait_ready("n1");
    let s2 = c.wait_ready("n2").subnet_network().unwrap();
    let (a2, mac2) = (c.lab.node("n2").addr, c.mac("n2", "flannel.1"));
    c.wait_entries("n1", "flannel.1", "n2", |e| e.has_peer(&s2, a2, &mac2));
    let before = c.entries("n1", "flannel.1");
    let garbage = [
        (
            "10.244.220.0/24",
            r#"{"PublicIP":"198.18.0.220","BackendType":"vxlan","BackendData":"x"}"#,
        ),
        (
            "10.244.221.0/24",
            r#"{"PublicIP":"198.18.0.221","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz:zz"}}"#,
        ),
        (
            "10.244.222.0/24",
            r#"{"PublicIP":"198.18.0.222","BackendType":"vxlan","BackendData":{"VNI":99,"VtepMAC":"0a:00:00:00:22:02"}}"#,
        ),
        (
            "10.244.223.0/24",
            r#"{"PublicIP":"198.18.0.223","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"ff:ff:ff:ff:ff:ff"}}"#,
        ),
        (
            "10.244.224.0/24",
            r#"{"PublicIP":"198.18.0.224","BackendType":"vxlan"}"#,
        ),
        ("10.244.225.0/24", "not json at all"),
        (
            "10.244.226.0/24",
            r#"{"PublicIP":"0.0.0.0","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:00:00:00:22:06"}}"#,
        ),
    ];
    for (net, value) in garbage {
        let net: Ipv4Net = net.parse().unwrap();
        c.lab.etcdctl(&["put", &subnet_key(&net), value]).unwrap();
    }
    let good: Ipv4Net = "10.244.230.0/24".parse().unwrap();
    let good_ip: Ipv4Addr = "198.18.0.230".parse().unwrap();
    c.lab
        .etcdctl(&[
            "put",
            &subnet_key(&good),
            &fake_lease(good_ip, "0a:00:00:00:23:00"),
        ])
        .unwrap();
    c.wait_entries("n1", "flannel.1", "good peer after garbage", |e| {
        e.has_peer(&good, good_ip, "0a:00:00:00:23:00")
            && e.has_peer(&s2, a2, &mac2)
            && e.routes.len() == 2
            && e.fdb.len() == 2
    });
    let after = c.entries("n1", "flannel.1");
    assert!(before.routes.is_subset(&after.routes) && before.fdb.is_subset(&after.fdb));
    wait_until("guard: only real peers", DEADLINE, || {
        guard_peers(&c, "n1") == [a2.to_string(), good_ip.to_string()].into()
    });
    let log = plain(&c.log("n1"));
    for (net, _) in garbage {
        let key = net.replace('/', "-");
        assert!(
            log.contains(&key),
            "garbage lease {key} not named in the log:\n{log}"
        );
    }
    assert!(c.lab.is_running(c.daemon("n1")));
}

/// The `retry_in` delays of the subnet watch's failures in twilld's log (`Duration`'s Debug
/// text: `812.5ms`, `5.2s`).
fn watch_retry_delays(log: &str) -> Vec<Duration> {
    log.lines()
        .filter(|l| l.contains("subnet"))
        .filter_map(|l| l.split("retry_in=").nth(1)?.split_whitespace().next())
        .filter_map(|d| {
            let (number, scale) = if let Some(ms) = d.strip_suffix("ms") {
                (ms, 1e-3)
            } else if let Some(us) = d.strip_suffix("µs") {
                (us, 1e-6)
            } else if let Some(ns) = d.strip_suffix("ns") {
                (ns, 1e-9)
            } else {
                (d.strip_suffix('s')?, 1.0)
            };
            Some(Duration::from_secs_f64(number.parse::<f64>().ok()? * scale))
        })
        .collect()
}
