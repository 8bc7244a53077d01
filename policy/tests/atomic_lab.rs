//! Root-only: table replacement is atomic. A client pod sends UDP datagrams and TCP SYNs
//! to a server pod on the same node (bridged on cni0) without pause while the enforcer
//! replaces the table 1000 times, alternating between two policy sets that both deny
//! that flow (for different reasons: A isolates the server's ingress to another pod; B
//! opens only port 81 on the server and isolates the client's egress to port 81). Any
//! intermediate state of a non-atomic replacement (table deleted, map entry or chain
//! missing, set empty) would let a packet of the flow through; the server counts every
//! datagram and connection it gets, and must count zero. The updates alternate between a
//! whole-table replacement and an incremental transaction (A <-> B changes map elements,
//! chains and sets in one `nft -f`), so both paths are held to it.
//!
//! Controls in the same run show the probe would notice: a deliberately non-atomic
//! replacement (delete the table, pause, load it again) lets packets through, and so does
//! a policy that allows the flow.

use std::path::Path;
use std::time::{Duration, Instant};

use twill_lab::Lab;
use twill_nft::{Nft, NftRunner};
use twill_policy::compile::Options;
use twill_policy::enforce::{Applied, Enforcer};
use twill_policy::model::Snapshot;
use twill_policy::source::manifests::ManifestDir;
use twill_policy::source::Source;

const PY: &str = "/usr/bin/python3";
const UPDATES: usize = 1000;

/// Counts UDP datagrams and TCP connections on port 80; prints `got udp|tcp N` lines.
const SERVER: &str = r#"
import socket, threading, sys
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 80)); s.listen(128); n = 0
    while True:
        c, _ = s.accept(); c.close(); n += 1
        print("got tcp", n, flush=True)
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 80)); n = 0
    while True:
        s.recvfrom(64); n += 1
        print("got udp", n, flush=True)
threading.Thread(target=tcp, daemon=True).start()
udp()
"#;

/// Sends a UDP datagram every 0.5 ms and a TCP SYN (non-blocking connect, 20 ms) in a loop.
const CLIENT: &str = r#"
import socket, threading, time, sys
ip = sys.argv[1]
def tcp():
    while True:
        s = socket.socket(); s.setblocking(False)
        try:
            s.connect((ip, 80))
        except BlockingIOError:
            pass
        time.sleep(0.02); s.close()
threading.Thread(target=tcp, daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); n = 0
while True:
    u.sendto(b"probe", (ip, 80)); n += 1
    if n % 2000 == 0:
        print("sent", n, flush=True)
    time.sleep(0.0005)
"#;

const WORLD: &str = r#"
kind: List
items:
- {kind: Namespace, metadata: {name: x}}
- kind: Pod
  metadata: {name: c, namespace: x, labels: {pod: c}}
  spec: {nodeName: n1}
  status: {podIPs: [{ip: 10.244.1.2}]}
- kind: Pod
  metadata: {name: s, namespace: x, labels: {pod: s}}
  spec: {nodeName: n1}
  status: {podIPs: [{ip: 10.244.1.3}]}
- kind: Pod
  metadata: {name: other, namespace: x, labels: {pod: other}}
  spec: {nodeName: n2}
  status: {podIPs: [{ip: 10.244.2.9}]}
"#;

/// A: the server accepts only `other`.
const POLICY_A: &str = r#"
kind: NetworkPolicy
metadata: {name: s-in, namespace: x}
spec:
  podSelector: {matchLabels: {pod: s}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: other}}}]}]
"#;

/// B: the server accepts anyone on 81 only; the client may send only to 81.
const POLICY_B: &str = r#"
kind: NetworkPolicy
metadata: {name: s-in, namespace: x}
spec:
  podSelector: {matchLabels: {pod: s}}
  ingress: [{ports: [{port: 81}, {port: 81, protocol: UDP}]}]
---
kind: NetworkPolicy
metadata: {name: c-out, namespace: x}
spec:
  podSelector: {matchLabels: {pod: c}}
  policyTypes: [Egress]
  egress: [{ports: [{port: 81}, {port: 81, protocol: UDP}]}]
"#;

/// C (control): the flow is allowed.
const POLICY_OPEN: &str = r#"
kind: NetworkPolicy
metadata: {name: s-in, namespace: x}
spec:
  podSelector: {matchLabels: {pod: s}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]
"#;

fn snapshot(dir: &Path, policy: &str) -> Snapshot {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("world.yaml"), WORLD).unwrap();
    std::fs::write(dir.join("policy.yaml"), policy).unwrap();
    ManifestDir::new(dir).snapshot().unwrap()
}

fn received(log: &str) -> usize {
    log.lines().filter(|l| l.starts_with("got ")).count()
}

#[test]
fn a_thousand_table_replacements_never_let_a_denied_packet_through() {
    if !twill_lab::require_root() {
        return;
    }
    let mut lab = Lab::new("atomic").unwrap();
    let node = lab.add_node("n1").unwrap();
    let c = lab
        .add_manual_pod("n1", "c", "10.244.1.2/24".parse().unwrap())
        .unwrap();
    let s = lab
        .add_manual_pod("n1", "s", "10.244.1.3/24".parse().unwrap())
        .unwrap();
    let dir = lab.dir().to_path_buf();
    let a = snapshot(&dir.join("a"), POLICY_A);
    let b = snapshot(&dir.join("b"), POLICY_B);
    let open = snapshot(&dir.join("open"), POLICY_OPEN);

    // First apply through the binary: it also turns on bridge-nf-call-iptables in the node.
    let bin = env!("CARGO_BIN_EXE_twill-policy");
    let a_dir = dir.join("a");
    lab.exec_ok(
        &node.netns,
        &[
            bin,
            "--manifests",
            a_dir.to_str().unwrap(),
            "--node-name",
            "n1",
            "apply",
        ],
    )
    .unwrap();
    // Then the Enforcer itself, with nft run inside the node's namespace.
    let wrapper = dir.join("nft-in-node");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec ip netns exec {} nft \"$@\"\n", node.netns),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let nft = Nft {
        bin: wrapper.clone(),
        timeout: Duration::from_secs(10),
    };
    let mut enf = Enforcer::new(nft.clone(), "n1", Options::default());
    assert_eq!(enf.sync(&a).applied, Applied::Full);

    let srv = lab
        .spawn(&s.netns, "server", &[PY, "-c", SERVER], &[])
        .unwrap();
    let cli = lab
        .spawn(
            &c.netns,
            "client",
            &[PY, "-c", CLIENT, &s.ip().to_string()],
            &[],
        )
        .unwrap();
    // The client is running and sending.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.log(cli).contains("sent") {
        assert!(Instant::now() < deadline, "client: {}", lab.log(cli));
        std::thread::sleep(Duration::from_millis(50));
    }

    let start = Instant::now();
    for i in 0..UPDATES {
        // Alternately a whole-table replacement and an incremental transaction (only the
        // changed sets, chains and map elements): both must be atomic.
        let mode = std::env::var("ATOMIC_MODE").unwrap_or_default();
        let snap = if i % 2 == 0 { &b } else { &a };
        let full = match mode.as_str() {
            "inc" => false,
            "full" => true,
            _ => i % 2 == 0,
        };
        let want = if full {
            enf.invalidate();
            Applied::Full
        } else {
            Applied::Incremental
        };
        let r = enf.sync(snap);
        assert_eq!(r.applied, want, "update {i}");
    }
    let took = start.elapsed();
    // Let in-flight packets land.
    std::thread::sleep(Duration::from_millis(300));
    let got = received(&lab.log(srv));
    let sent: usize = lab
        .log(cli)
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("sent ")?.trim().parse().ok())
        .unwrap_or(0);
    eprintln!(
        "{UPDATES} replacements in {took:?} ({:.1} ms each); client sent >= {sent} datagrams (plus SYNs every 20 ms); server got {got}",
        took.as_secs_f64() * 1000.0 / UPDATES as f64
    );
    assert!(
        sent > 1000,
        "the probe must run throughout: {}",
        lab.log(cli)
    );
    assert_eq!(
        got,
        0,
        "packets got through during atomic replacements:\n{}",
        lab.log(srv)
    );

    // Control 1: a non-atomic replacement (delete, pause, reload) lets the probe through. The
    // gap is long enough for the client to be scheduled in it on a loaded machine; the server
    // may log what arrived a little later.
    let script = enf.script(&a);
    nft.apply("delete table inet twill-policy\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    nft.apply(&script).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let leaked = loop {
        let n = received(&lab.log(srv));
        if n > 0 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("control: non-atomic replacement with a 500 ms gap let {leaked} packets through");
    assert!(
        leaked > 0,
        "the probe did not notice a 500 ms window without the table"
    );
    // Control 2: a policy that allows the flow.
    enf.invalidate();
    assert_eq!(enf.sync(&open).applied, Applied::Full);
    let deadline = Instant::now() + Duration::from_secs(5);
    while received(&lab.log(srv)) < leaked + 10 {
        assert!(Instant::now() < deadline, "allowed flow not received");
        std::thread::sleep(Duration::from_millis(50));
    }
    lab.teardown().unwrap();
}
