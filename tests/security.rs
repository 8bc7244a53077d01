//! Lab tests of the underlay guard (`inet twill-underlay`): VXLAN accepted only from
//! current peers (flannel#961), pods kept off every VXLAN port and unable to spoof their
//! source, routed pod traffic only from peers' subnets. Each attack is also shown to work
//! without twill's table, the way a Flannel node is exposed. Root only; skipped outside CI.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::Duration;

use common::{cluster, Cluster};
use twill_formats::subnet_env::SubnetEnv;
use twill_lab::{Ipv4Net, Signal};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
const LISTEN: u16 = 7777;

/// Runs `f` on a thread that has entered the network namespace `ns` (sockets it creates stay
/// in that namespace); the test process itself never leaves the root namespace.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread in namespace")
}

/// A UDP socket on `LISTEN` inside `ns`.
fn listener(ns: &str) -> UdpSocket {
    in_ns(ns, || UdpSocket::bind(("0.0.0.0", LISTEN)).expect("bind"))
}

/// How long a datagram the test expects to be dropped is waited for: one that gets through
/// arrives within milliseconds (the positive checks next to each negative one show it).
const DROPPED_WAIT: Duration = Duration::from_millis(1500);

/// Whether `sock` receives a datagram carrying `token` (others are skipped) within `wait`.
fn received_within(sock: &UdpSocket, token: &[u8], wait: Duration) -> bool {
    let deadline = std::time::Instant::now() + wait;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        sock.set_read_timeout(Some(left)).unwrap();
        match sock.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == token => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

/// A datagram that must arrive: waited for up to [`common::DEADLINE`] (delivery is
/// asynchronous, and slow on a busy machine).
fn received(sock: &UdpSocket, token: &[u8]) -> bool {
    received_within(sock, token, common::DEADLINE)
}

/// A datagram that must be dropped: true if it did not arrive within [`DROPPED_WAIT`].
fn dropped(sock: &UdpSocket, token: &[u8]) -> bool {
    !received_within(sock, token, DROPPED_WAIT)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A VXLAN payload (8-byte header, VNI) carrying Ethernet + IPv4 + UDP to `dst:LISTEN` from
/// `src` (any address: that is the point), built by hand.
fn vxlan_payload(vni: u32, dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, data: &[u8]) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    p.extend_from_slice(&dst_mac);
    p.extend_from_slice(&[0x02, 0xde, 0xad, 0xbe, 0xef, 0x01]);
    p.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + data.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&LISTEN.to_be_bytes());
    p.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    p
}

/// Sends `payload` over UDP from namespace `ns` (bound to `from` if given) to `to`.
fn send_from(ns: &str, from: Option<Ipv4Addr>, to: SocketAddr, payload: Vec<u8>) {
    in_ns(ns, move || {
        let s = UdpSocket::bind((from.unwrap_or(Ipv4Addr::UNSPECIFIED), 0)).expect("bind");
        // Several copies: the first may wait for ARP.
        for _ in 0..3 {
            let _ = s.send_to(&payload, to);
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

fn subnet(env: &SubnetEnv) -> Ipv4Net {
    env.subnet_network().unwrap()
}

fn host(net: &Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

/// The elements of one of `node`'s guard sets, sorted (subnets as `addr/len`); `None` when
/// the set cannot be listed.
fn guard_set(c: &Cluster, node: &str, set: &str) -> Option<Vec<String>> {
    let out = c
        .lab
        .exec(
            &c.ns(node),
            &["nft", "-j", "list", "set", "inet", "twill-underlay", set],
        )
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let mut have: Vec<String> = v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["set"]["elem"].as_array())
        .flatten()
        .filter_map(|e| match (e.as_str(), &e["prefix"]) {
            (Some(s), _) => Some(s.to_string()),
            (None, p) => Some(format!("{}/{}", p["addr"].as_str()?, p["len"])),
        })
        .collect();
    have.sort();
    Some(have)
}

/// Waits until `node`'s guard set `set` holds exactly `want`.
fn wait_set(c: &Cluster, node: &str, set: &str, want: &[String]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut want = want.to_vec();
    want.sort();
    loop {
        let have = guard_set(c, node, set);
        if have.as_ref() == Some(&want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "guard set {set} on {node} never held {want:?} (has {have:?}):\n{}",
            c.log(node)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `node`'s guard lists exactly `peers` in `peers4`.
fn wait_guard(c: &Cluster, node: &str, peers: &[Ipv4Addr]) {
    let want: Vec<String> = peers.iter().map(|p| p.to_string()).collect();
    wait_set(c, node, "peers4", &want);
}

/// flannel#961: a VXLAN packet from a host that holds no lease, with a spoofed pod source,
/// reaches a pod on a Flannel node; on a twill node it is dropped, while the same packet from
/// a peer still arrives.
#[test]
fn vxlan_injected_from_a_non_peer_is_dropped_flannel_accepts_it() {
    if !twill_lab::require_root() {
        return;
    }
    // n3 is the attacker: on the same underlay, no twilld, no lease.
    let mut c = cluster("inj", &["n1", "n2", "n3"], VXLAN);
    let envs = c.start_all(&["n1", "n2"]);
    let (e1, e2) = (envs["n1"].clone(), envs["n2"].clone());
    let (a1, a2) = (c.lab.node("n1").addr, c.lab.node("n2").addr);
    wait_guard(&c, "n1", &[a2]);
    let target = c.pod("n1", "victim", &e1);
    let victim_ns = c.lab.pod("victim").netns.clone();
    let sock = listener(&victim_ns);
    let vtep = parse_mac(&c.mac("n1", "flannel.1"));
    let spoofed = host(&subnet(&e2), 77);
    let attacker = c.ns("n3");
    let peer = c.ns("n2");

    // The packet, sent from `ns` to n1's `port`.
    let inject_to = |port: u16, ns: &str, token: &[u8]| {
        let to: SocketAddr = (a1, port).into();
        send_from(ns, None, to, vxlan_payload(1, vtep, spoofed, target, token));
    };
    let inject = |ns: &str, token: &[u8]| inject_to(8472, ns, token);

    inject(&attacker, b"twill-1");
    assert!(
        dropped(&sock, b"twill-1"),
        "VXLAN from a non-peer reached the pod"
    );
    inject(&peer, b"peer");
    assert!(
        received(&sock, b"peer"),
        "the same packet from a peer did not arrive: the probe is broken"
    );
    // Through a destination translation to the VXLAN port, as a NodePort Service whose
    // hand-written endpoint is the node's VXLAN port makes one: the guard must judge the
    // translated packet.
    service_to_vxlan_port(&c, "n1", None, NODE_PORT, a1);
    let via_service = |ns: &str, token: &[u8]| inject_to(NODE_PORT, ns, token);
    via_service(&attacker, b"twill-nodeport");
    assert!(
        dropped(&sock, b"twill-nodeport"),
        "VXLAN from a non-peer reached the pod through a NodePort translated to the VXLAN port"
    );
    via_service(&peer, b"peer-nodeport");
    assert!(
        received(&sock, b"peer-nodeport"),
        "a peer's packet through the translation did not arrive: the probe is broken"
    );
    let drops = c
        .lab
        .exec_ok(
            &c.ns("n1"),
            &[
                "nft",
                "list",
                "counter",
                "inet",
                "twill-underlay",
                "vxlan_from_non_peer",
            ],
        )
        .unwrap();
    assert!(!drops.contains("packets 0 "), "{drops}");

    // Flannel's node: the same devices and entries, no twill table.
    c.kill("n1", Signal::SIGKILL);
    c.lab
        .exec_ok(
            &c.ns("n1"),
            &["nft", "delete", "table", "inet", "twill-underlay"],
        )
        .unwrap();
    inject(&attacker, b"flannel");
    assert!(
        received(&sock, b"flannel"),
        "without the guard the injected packet should arrive (flannel#961)"
    );

    // twilld back: the guard is rebuilt and the attack fails again.
    c.start("n1", &[]);
    c.wait_ready("n1");
    wait_guard(&c, "n1", &[a2]);
    inject(&attacker, b"twill-2");
    assert!(dropped(&sock, b"twill-2"), "guard not rebuilt on restart");
}

/// A port no VXLAN device uses, that the Service translations below send to a VXLAN port.
const NODE_PORT: u16 = 30472;
/// A Service address no pod or node holds.
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// What kube-proxy programs in `node` for a Service whose endpoint, written by hand, is a
/// node's VXLAN port: UDP to `port` (on `daddr`, or on any address for a NodePort) is
/// translated to `to`:8472 in prerouting, at the destination-NAT priority.
fn service_to_vxlan_port(
    c: &Cluster,
    node: &str,
    daddr: Option<Ipv4Addr>,
    port: u16,
    to: Ipv4Addr,
) {
    let daddr = daddr.map(|a| format!("ip daddr {a} ")).unwrap_or_default();
    let script = format!(
        "add table ip svc ; add chain ip svc pre {{ type nat hook prerouting priority dstnat ; }} ; \
         add rule ip svc pre {daddr}udp dport {port} dnat to {to}:8472"
    );
    c.lab.exec_ok(&c.ns(node), &["nft", &script]).unwrap();
}

/// Pods cannot use any node's VXLAN port (their own node's or a peer's) to inject frames, and
/// cannot send with a source outside their node's subnet (another node's pod, an outside
/// host). Without the guard each of these works.
#[test]
fn pods_cannot_reach_vxlan_ports_nor_spoof_their_source() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("pod", &["n1", "n2"], VXLAN);
    let envs = c.start_all(&["n1", "n2"]);
    let (e1, e2) = (envs["n1"].clone(), envs["n2"].clone());
    let (a1, a2) = (c.lab.node("n1").addr, c.lab.node("n2").addr);
    wait_guard(&c, "n1", &[a2]);
    wait_guard(&c, "n2", &[a1]);
    let p1 = c.pod("n1", "evil", &e1);
    let p2 = c.pod("n2", "victim", &e2);
    let evil = c.lab.pod("evil").netns.clone();
    let victim = c.lab.pod("victim").netns.clone();
    let sock1 = listener(&evil);
    let sock2 = listener(&victim);
    assert!(c.lab.wait_ping(&evil, p2.into(), common::DEADLINE));
    let mac1 = parse_mac(&c.mac("n1", "flannel.1"));
    let mac2 = parse_mac(&c.mac("n2", "flannel.1"));
    // A source on the victim's own node, so nothing but the guard could refuse it there.
    let spoofed = host(&subnet(&e2), 99);
    let other_node_src = host(&subnet(&e2), 98);
    c.lab
        .exec_ok(
            &evil,
            &[
                "ip",
                "addr",
                "add",
                &format!("{other_node_src}/32"),
                "dev",
                "eth0",
            ],
        )
        .unwrap();

    // Service addresses translated to a peer's and to the own node's VXLAN port.
    service_to_vxlan_port(&c, "n1", Some(SERVICE_IP), NODE_PORT, a2);
    service_to_vxlan_port(&c, "n1", Some(SERVICE_IP), NODE_PORT + 1, a1);

    // Which attacks got through; each packet is waited for up to `wait`.
    let attacks = |tag: &str, wait: Duration| -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let t = format!("{tag}-service-peer-port");
        send_from(
            &evil,
            None,
            (SERVICE_IP, NODE_PORT).into(),
            vxlan_payload(1, mac2, spoofed, p2, t.as_bytes()),
        );
        out.push((
            "VXLAN to a peer's port through a Service translated to it".into(),
            received_within(&sock2, t.as_bytes(), wait),
        ));
        let t = format!("{tag}-service-own-port");
        send_from(
            &evil,
            None,
            (SERVICE_IP, NODE_PORT + 1).into(),
            vxlan_payload(1, mac1, spoofed, p1, t.as_bytes()),
        );
        out.push((
            "VXLAN to its own node's port through a Service translated to it".into(),
            received_within(&sock1, t.as_bytes(), wait),
        ));
        let t = format!("{tag}-peer-port");
        send_from(
            &evil,
            None,
            (a2, 8472).into(),
            vxlan_payload(1, mac2, spoofed, p2, t.as_bytes()),
        );
        out.push((
            "VXLAN to a peer's port".into(),
            received_within(&sock2, t.as_bytes(), wait),
        ));
        let t = format!("{tag}-own-port");
        send_from(
            &evil,
            None,
            (a1, 8472).into(),
            vxlan_payload(1, mac1, spoofed, p1, t.as_bytes()),
        );
        out.push((
            "VXLAN to its own node's port".into(),
            received_within(&sock1, t.as_bytes(), wait),
        ));
        let t = format!("{tag}-spoof");
        send_from(
            &evil,
            Some(other_node_src),
            (p2, LISTEN).into(),
            t.as_bytes().to_vec(),
        );
        out.push((
            "another node's pod address as source".into(),
            received_within(&sock2, t.as_bytes(), wait),
        ));
        out
    };

    for (what, got) in attacks("twill", DROPPED_WAIT) {
        assert!(!got, "with twill's guard, a pod succeeded: {what}");
    }
    // A pod's own address still works (the guard is not simply dropping the pod).
    send_from(&evil, Some(p1), (p2, LISTEN).into(), b"honest".to_vec());
    assert!(received(&sock2, b"honest"));

    for n in ["n1", "n2"] {
        c.kill(n, Signal::SIGKILL);
        c.lab
            .exec_ok(
                &c.ns(n),
                &["nft", "delete", "table", "inet", "twill-underlay"],
            )
            .unwrap();
    }
    for (what, got) in attacks("flannel", common::DEADLINE) {
        assert!(
            got,
            "without the guard this should work (Flannel's exposure): {what}"
        );
    }
}

/// An `nft` for twilld's PATH that runs the real one and then appends the arguments of the
/// call to `log` (one line per finished call): how the test knows that twilld's resync has
/// run its drift check (`nft -j list table inet twill-underlay`, made nowhere else), rather
/// than sleeping and hoping. Returns the PATH to start twilld with.
fn nft_recorder(c: &Cluster, log: &std::path::Path) -> String {
    let real = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("nft");
    let dir = c.lab.dir().join(format!(
        "nft-recorder-{}",
        log.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("nft");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n{real} \"$@\"\nrc=$?\necho \"$*\" >> '{}'\nexit $rc\n",
            log.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// How many drift checks (finished `nft` listings of the guard table) `log` records.
fn drift_checks(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.trim() == "-j list table inet twill-underlay")
        .count()
}

/// Waits until `log` records at least `n` drift checks.
fn wait_drift_checks(c: &Cluster, node: &str, log: &std::path::Path, n: usize) {
    let deadline = std::time::Instant::now() + common::DEADLINE;
    while drift_checks(log) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{node}: {} drift checks in {:?}, waiting for {n}:\n{}",
            drift_checks(log),
            common::DEADLINE,
            c.log(node)
        );
        std::thread::sleep(common::POLL);
    }
}

/// Peers coming and going update the guard by element deltas (a lease's subnet enters and
/// leaves the interval set exactly). When the sets no longer hold what twilld applied (here
/// `peers4` flushed by hand), the resync's drift check notices and the whole table is
/// re-applied; and a delta that nft refuses because of such a change (a departed peer's element
/// already gone) is replaced by the whole table in the same pass.
#[test]
fn guard_follows_peer_churn_and_replaces_a_set_changed_by_hand() {
    if !twill_lab::require_root() {
        return;
    }
    const DRIFT: &str = "underlay guard table was removed or changed";
    const REJECTED: &str = "underlay guard delta rejected";
    let mut c = cluster("gdl", &["n1", "n2"], VXLAN);
    let checks = c.lab.dir().join("n1-nft-0.log");
    let path = nft_recorder(&c, &checks);
    c.start_env("n1", &[], &[("PATH", &path)]);
    c.start("n2", &[]);
    let s2 = subnet(&c.wait_ready("n2")).to_string();
    c.wait_ready("n1");
    let a2 = c.lab.node("n2").addr.to_string();
    wait_set(&c, "n1", "peers4", std::slice::from_ref(&a2));
    wait_set(&c, "n1", "peer_subnets4", std::slice::from_ref(&s2));

    // Two more peers (no daemons: leases only), then one of them leaves.
    let lease = |ip: &str, mac: &str| {
        format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        )
    };
    let key = |net: &str| format!("{}/subnets/{}", common::PREFIX, net.replace('/', "-"));
    let (x, y) = ("198.18.0.200", "198.18.0.201");
    let (sx, sy) = ("10.244.200.0/24", "10.244.201.0/24");
    c.lab
        .etcdctl(&["put", &key(sx), &lease(x, "0a:00:00:00:02:00")])
        .unwrap();
    c.lab
        .etcdctl(&["put", &key(sy), &lease(y, "0a:00:00:00:02:01")])
        .unwrap();
    wait_set(&c, "n1", "peers4", &[a2.clone(), x.into(), y.into()]);
    wait_set(
        &c,
        "n1",
        "peer_subnets4",
        &[s2.clone(), sx.into(), sy.into()],
    );
    c.lab.etcdctl(&["del", &key(sy)]).unwrap();
    wait_set(&c, "n1", "peers4", &[a2.clone(), x.into()]);
    wait_set(&c, "n1", "peer_subnets4", &[s2.clone(), sx.into()]);
    // Two drift checks of the table as the churn left it (2 s resync in the lab): both find
    // it as applied. A check finishes its listing before the next can start, so once a third
    // has listed, the second's verdict is in the log.
    let settled = drift_checks(&checks);
    wait_drift_checks(&c, "n1", &checks, settled + 3);
    let log = c.log("n1");
    assert!(
        !log.contains(REJECTED) && !log.contains(DRIFT),
        "peer churn alone should never need the whole table:\n{log}"
    );

    let flush = |c: &Cluster| {
        c.lab
            .exec_ok(
                &c.ns("n1"),
                &["nft", "flush", "set", "inet", "twill-underlay", "peers4"],
            )
            .unwrap();
    };
    // Someone flushes peers4: the next resync's drift check puts every peer back.
    flush(&c);
    wait_set(&c, "n1", "peers4", &[a2.clone(), x.into()]);
    assert_eq!(c.log("n1").matches(DRIFT).count(), 1, "{}", c.log("n1"));
    assert!(!c.log("n1").contains(REJECTED), "{}", c.log("n1"));

    // Now the delta path alone, with no resync that could notice the flush first: n1
    // restarted with a resync period of an hour. Its interval's first tick comes right after
    // the first pass (which applies the whole table); once that drift check has listed the
    // table, the next is an hour away. Then peers4 is flushed and x leaves: deleting x from
    // the set fails, and the whole table takes the delta's place.
    c.kill("n1", Signal::SIGTERM);
    let checks = c.lab.dir().join("n1-nft-1.log");
    let path = nft_recorder(&c, &checks);
    c.start_env("n1", &["--resync-period=3600"], &[("PATH", &path)]);
    c.wait_ready("n1");
    wait_drift_checks(&c, "n1", &checks, 1);
    wait_set(&c, "n1", "peers4", &[a2.clone(), x.into()]);
    flush(&c);
    c.lab.etcdctl(&["del", &key(sx)]).unwrap();
    wait_set(&c, "n1", "peers4", std::slice::from_ref(&a2));
    wait_set(&c, "n1", "peer_subnets4", std::slice::from_ref(&s2));
    let log = c.log("n1");
    assert!(
        log.contains(REJECTED),
        "the flushed set should have made the delta fail:\n{log}"
    );
    assert!(
        !log.contains(DRIFT) && drift_checks(&checks) == 1,
        "a resync ran its drift check after the flush, so the delta was not what repaired it:\n{log}"
    );
}

/// host-gw: a packet arriving on the underlay with a pod-network source that is not leased
/// to any peer is dropped; a peer's pods still get through.
#[test]
fn host_gw_refuses_pod_sources_not_leased_to_a_peer() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("hgs", &["n1", "n2", "n3"], HOST_GW);
    let envs = c.start_all(&["n1", "n2"]);
    let (e1, e2) = (envs["n1"].clone(), envs["n2"].clone());
    wait_guard(&c, "n1", &[c.lab.node("n2").addr]);
    let p1 = c.pod("n1", "victim", &e1);
    let p2 = c.pod("n2", "friend", &e2);
    let victim = c.lab.pod("victim").netns.clone();
    let friend = c.lab.pod("friend").netns.clone();
    // n2's route to n1's pods is programmed by n2, independently of n1's guard.
    assert!(
        c.lab.wait_ping(&friend, p1.into(), common::DEADLINE),
        "a peer's pod cannot reach the victim"
    );
    let sock = listener(&victim);
    send_from(&friend, Some(p2), (p1, LISTEN).into(), b"peer".to_vec());
    assert!(received(&sock, b"peer"), "a peer's pod must get through");

    // n3 (no lease) claims a pod address nobody leased and routes to n1's pods via n1.
    let a1 = c.lab.node("n1").addr;
    let n3 = c.ns("n3");
    c.lab
        .exec_ok(
            &n3,
            &["ip", "addr", "add", "10.244.250.5/32", "dev", "eth0"],
        )
        .unwrap();
    c.lab
        .exec_ok(
            &n3,
            &[
                "ip",
                "route",
                "add",
                &subnet(&e1).to_string(),
                "via",
                &a1.to_string(),
            ],
        )
        .unwrap();
    let from: Ipv4Addr = "10.244.250.5".parse().unwrap();
    send_from(&n3, Some(from), (p1, LISTEN).into(), b"rogue".to_vec());
    assert!(
        dropped(&sock, b"rogue"),
        "an unleased pod source got through"
    );

    c.kill("n1", Signal::SIGKILL);
    c.lab
        .exec_ok(
            &c.ns("n1"),
            &["nft", "delete", "table", "inet", "twill-underlay"],
        )
        .unwrap();
    send_from(&n3, Some(from), (p1, LISTEN).into(), b"flannel".to_vec());
    assert!(
        received(&sock, b"flannel"),
        "without the guard it should arrive"
    );
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a certificate signed by it (P-256), with `ext` (SANs, key usage) as extensions.
fn issue(dir: &std::path::Path, ca: &str, name: &str, cn: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

fn new_ca(dir: &std::path::Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-days",
            "1",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
}

/// etcd with TLS and client-certificate authentication, certificates made by the test:
/// twilld with --etcd-cafile/--etcd-certfile/--etcd-keyfile gets its lease and programs its
/// peer; a twilld whose client certificate comes from another CA is refused and never ready.
#[test]
fn etcd_over_tls_with_client_certificates() {
    if !twill_lab::require_root() {
        return;
    }
    let (mut lab, pki) = tls_lab("tls");
    issue(
        &pki,
        "ca",
        "client",
        "twilld",
        "extendedKeyUsage=clientAuth\n",
    );
    issue(
        &pki,
        "rogue-ca",
        "rogue",
        "twilld",
        "extendedKeyUsage=clientAuth\n",
    );
    let p = |f: &str| pki.join(f).to_string_lossy().into_owned();
    let sw = lab.switch_ns();
    let etcd = spawn_tls_etcd(&mut lab, &pki, true);
    let etcdctl = |lab: &twill_lab::Lab, key: &str, args: &[&str]| {
        let (cert, k) = (p(&format!("{key}.crt")), p(&format!("{key}.key")));
        let ca = p("ca.crt");
        let mut argv = vec![
            "etcdctl",
            "--endpoints=https://127.0.0.1:2379",
            "--cacert",
            &ca,
            "--cert",
            &cert,
            "--key",
            &k,
            "--dial-timeout=2s",
        ];
        argv.extend_from_slice(args);
        lab.exec_env(&sw, &argv, &[("ETCDCTL_API", "3")]).unwrap()
    };
    wait_until_ok(
        || {
            etcdctl(&lab, "client", &["endpoint", "health"])
                .status
                .success()
        },
        &lab,
        etcd,
    );
    assert!(
        !etcdctl(&lab, "rogue", &["endpoint", "health"])
            .status
            .success(),
        "etcd accepted a certificate from another CA"
    );
    let put = etcdctl(
        &lab,
        "client",
        &["put", &format!("{}/config", common::PREFIX), VXLAN],
    );
    assert!(put.status.success());
    lab.add_node("n1").unwrap();
    lab.add_node("n2").unwrap();
    let mut c = Cluster::from_lab(lab);
    let tls = |who: &str| {
        vec![
            "--etcd-endpoints=https://198.18.0.1:2379".to_string(),
            format!("--etcd-cafile={}", p("ca.crt")),
            format!("--etcd-certfile={}", p(&format!("{who}.crt"))),
            format!("--etcd-keyfile={}", p(&format!("{who}.key"))),
        ]
    };
    for n in ["n1", "n2"] {
        let args = tls("client");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.start(n, &args);
    }
    let e1 = c.wait_ready("n1");
    let e2 = c.wait_ready("n2");
    let (s2, a2, mac2) = (subnet(&e2), c.lab.node("n2").addr, c.mac("n2", "flannel.1"));
    c.wait_entries("n1", "flannel.1", "peer over TLS", |e| {
        e.has_peer(&s2, a2, &mac2)
    });
    assert_ne!(subnet(&e1), s2);

    // A client certificate from another CA: refused, never ready, and says why.
    c.kill("n2", Signal::SIGKILL);
    let args = tls("rogue");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.start("n2", &args);
    assert_refused_by_etcd(&c, "n2");
}

/// A lab named `name` and its `pki` directory: CAs `ca` and `rogue-ca`, and etcd's
/// certificate `server` from `ca` for 198.18.0.1 and 127.0.0.1.
fn tls_lab(name: &str) -> (twill_lab::Lab, std::path::PathBuf) {
    let lab = twill_lab::Lab::new(name).expect("lab");
    let pki = lab.dir().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    new_ca(&pki, "ca");
    new_ca(&pki, "rogue-ca");
    issue(
        &pki,
        "ca",
        "server",
        "etcd",
        "subjectAltName=IP:198.18.0.1,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    );
    (lab, pki)
}

/// Starts etcd in the switch namespace serving https on 198.18.0.1 and 127.0.0.1 with
/// `pki`'s `server.crt`, requiring client certificates from `ca` if `client_cert_auth`.
fn spawn_tls_etcd(
    lab: &mut twill_lab::Lab,
    pki: &std::path::Path,
    client_cert_auth: bool,
) -> twill_lab::ProcId {
    let p = |f: &str| pki.join(f).to_string_lossy().into_owned();
    let data = lab.dir().join("etcd-tls").to_string_lossy().into_owned();
    let sw = lab.switch_ns();
    let (cert, key, ca) = (p("server.crt"), p("server.key"), p("ca.crt"));
    let mut argv = vec![
        "etcd",
        "--name",
        "sw",
        "--data-dir",
        &data,
        "--listen-client-urls",
        "https://198.18.0.1:2379,https://127.0.0.1:2379",
        "--advertise-client-urls",
        "https://198.18.0.1:2379",
        "--listen-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-advertise-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-cluster",
        "sw=http://127.0.0.1:2380",
        "--cert-file",
        &cert,
        "--key-file",
        &key,
        "--logger",
        "zap",
        "--log-outputs",
        "stderr",
    ];
    if client_cert_auth {
        argv.extend(["--trusted-ca-file", &ca, "--client-cert-auth"]);
    }
    lab.spawn(&sw, "etcd-tls", &argv, &[]).unwrap()
}

/// etcd with TLS but no client-certificate authentication, and twilld given only
/// --etcd-cafile (no client certificate and key): it verifies the server against that CA
/// and gets its lease; given a CA that did not sign the server's certificate, it refuses
/// the server and is never ready. (Flannel ignores --etcd-cafile without a client
/// identity; twill used to as well.)
#[test]
fn etcd_over_tls_with_only_a_ca_file() {
    if !twill_lab::require_root() {
        return;
    }
    let (mut lab, pki) = tls_lab("tlsca");
    let p = |f: &str| pki.join(f).to_string_lossy().into_owned();
    let sw = lab.switch_ns();
    let etcd = spawn_tls_etcd(&mut lab, &pki, false);
    let etcdctl = |lab: &twill_lab::Lab, args: &[&str]| {
        let ca = p("ca.crt");
        let mut argv = vec![
            "etcdctl",
            "--endpoints=https://127.0.0.1:2379",
            "--cacert",
            &ca,
            "--dial-timeout=2s",
        ];
        argv.extend_from_slice(args);
        lab.exec_env(&sw, &argv, &[("ETCDCTL_API", "3")]).unwrap()
    };
    wait_until_ok(
        || etcdctl(&lab, &["endpoint", "health"]).status.success(),
        &lab,
        etcd,
    );
    let put = etcdctl(&lab, &["put", &format!("{}/config", common::PREFIX), VXLAN]);
    assert!(put.status.success());
    lab.add_node("n1").unwrap();
    lab.add_node("n2").unwrap();
    let mut c = Cluster::from_lab(lab);
    let ca_only = |ca: &str| {
        vec![
            "--etcd-endpoints=https://198.18.0.1:2379".to_string(),
            format!("--etcd-cafile={}", p(ca)),
        ]
    };
    let args = ca_only("ca.crt");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.start("n1", &args);
    c.wait_ready("n1");

    // The server's certificate is not from this CA: refused, never ready, and says why.
    let args = ca_only("rogue-ca.crt");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.start("n2", &args);
    assert_refused_by_etcd(&c, "n2");
}

/// `node`'s twilld logs an etcd error twice (it retries every second: it was refused, and it
/// stayed refused) and is never ready.
fn assert_refused_by_etcd(c: &Cluster, node: &str) {
    let deadline = std::time::Instant::now() + common::DEADLINE;
    while etcd_errors(&c.log(node)) < 2 {
        let log = c.log(node);
        assert!(!log.contains("wrote subnet.env; ready"), "{log}");
        assert!(
            std::time::Instant::now() < deadline,
            "no etcd error logged twice:\n{log}"
        );
        std::thread::sleep(common::POLL);
    }
    let log = c.log(node);
    assert!(!log.contains("wrote subnet.env; ready"), "{log}");
}

/// How many errors naming etcd (the connection or the request it refused) `log` has.
fn etcd_errors(log: &str) -> usize {
    common::plain(log)
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("etcd"))
        .count()
}

fn wait_until_ok(mut f: impl FnMut() -> bool, lab: &twill_lab::Lab, etcd: twill_lab::ProcId) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "TLS etcd not healthy:\n{}",
            lab.log(etcd)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
