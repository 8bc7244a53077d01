//! Root-only: traffic that carries no pod address the enforcer knows cannot get around a
//! pod's policy (IPv6 link-local, IPv4/IPv6 multicast and broadcast, frames that are
//! neither ARP nor IP, forged source addresses), for ingress and egress isolation, on the same node and across nodes,
//! while IPv4 and IPv6 pod addresses keep working as the policies say.
//!
//! etcd on the switch; two nodes running twilld with dual-stack VXLAN and `--ip-masq`; pods
//! attached through twill-cni (bridge + host-local, both families); in every pod a server
//! that answers TCP on port 80 (both families, link-local included) and prints every UDP
//! datagram to its group and broadcast ports and every frame of an experimental EtherType it
//! sees. The test first shows each path open with no policy table (the paths exist), then
//! runs `twill-policy run --subnet-file` on both nodes and checks that each is closed, and
//! last removes the rules that close them by hand on n1 to show that those rules, and not
//! something else, are what closes them (the control).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use twill_formats::subnet_env::SubnetEnv;
use twill_lab::{Lab, ProcId};
use twill_policy::compile::{compile, Options};
use twill_policy::enforce::ruleset_marker;
use twill_policy::source::manifests::ManifestDir;
use twill_policy::source::Source;

mod common;
use common::{policy_bin, wait_for, workspace_bin};

const PY: &str = "/usr/bin/python3";
const ETCD_PREFIX: &str = "/coreos.com/network";
const DUAL: &str = r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:42::/56","Backend":{"Type":"vxlan"}}"#;
const NODES: [&str; 2] = ["n1", "n2"];
/// An EtherType for local experiments (IEEE 802): nothing in a pod handles it.
const ETHERTYPE: u16 = 0x88b5;
/// A source address no pod has (the benchmarking range, as every lab address).
const SPOOFED_SOURCE: &str = "198.19.255.1";

/// TCP "pong" on [::]:80 (IPv4 too); UDP on 5000 (broadcast), 5001 (239.1.1.1) and 5002
/// (ff02::1) and raw frames of [`ETHERTYPE`] on eth0, each printed as `got <payload>`.
const SERVER: &str = r#"
import socket, struct, sys, threading
ETHERTYPE = int(sys.argv[1])
def say(what):
    sys.stdout.write("got %s\n" % what); sys.stdout.flush()
def tcp():
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 80)); s.listen(64)
    while True:
        c, _ = s.accept()
        try:
            c.settimeout(2); c.recv(16); c.sendall(b"pong")
        except Exception:
            pass
        c.close()
def udp4(port, group):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    if group:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                     socket.inet_aton(group) + socket.inet_aton("0.0.0.0"))
    while True:
        d, _ = s.recvfrom(256); say(d.decode(errors="replace"))
def udp6(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind(("::", port))
    while True:
        d, _ = s.recvfrom(256); say(d.decode(errors="replace"))
def raw():
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE)); s.bind(("eth0", 0))
    while True:
        d = s.recv(2048); say(d[14:].split(b"\0")[0].decode(errors="replace"))
for f, a in ((tcp, ()), (udp4, (5000, None)), (udp4, (5001, "239.1.1.1")), (udp6, (5002,)), (raw, ())):
    threading.Thread(target=f, args=a, daemon=True).start()
threading.Event().wait()
"#;

/// `tcp HOST` exits 0 iff "pong" came back from HOST:80 within 1 s (HOST may carry a
/// `%eth0` scope); `send KIND TOKEN [ARGS]` sends TOKEN once: `bcast` to 255.255.255.255 and
/// the subnet's broadcast address, `mcast4` to 239.1.1.1, `mcast6` to ff02::1%eth0, `spoof`
/// as UDP to DST:5000 from the source address SRC (raw socket), `raw` as a frame of the
/// experimental EtherType to MAC.
const CLIENT: &str = r#"
import socket, sys
kind = sys.argv[1]
if kind == "tcp":
    try:
        fam, _, _, _, addr = socket.getaddrinfo(sys.argv[2], 80, type=socket.SOCK_STREAM)[0]
        s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(1); s.connect(addr)
        s.sendall(b"ping"); sys.exit(0 if s.recv(16) == b"pong" else 3)
    except Exception:
        sys.exit(1)
token = sys.argv[2].encode()
if kind == "bcast":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    for dst in ("255.255.255.255", sys.argv[3]):
        s.sendto(token, (dst, 5000))
elif kind == "mcast4":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    s.sendto(token, ("239.1.1.1", 5001))
elif kind == "mcast6":
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.sendto(token, ("ff02::1", 5002, 0, socket.if_nametoindex("eth0")))
elif kind == "spoof":
    import struct
    src, dst = sys.argv[3], sys.argv[4]
    udp = struct.pack("!HHHH", 40000, 5000, 8 + len(token), 0) + token
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.sendto(ip + udp, (dst, 0))
elif kind == "raw":
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(("eth0", 0))
    dst = bytes.fromhex(sys.argv[3].replace(":", ""))
    src = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
    s.send(dst + src + int(sys.argv[4]).to_bytes(2, "big") + token + b"\0" * 46)
"#;

const MANIFEST_POLICIES: &str = r#"
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: web-from-clients, namespace: t}
  spec:
    podSelector: {matchLabels: {app: web}}
    policyTypes: [Ingress]
    ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
      ports: [{port: 80, protocol: TCP}]
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: sealed-no-egress, namespace: t}
  spec:
    podSelector: {matchLabels: {app: sealed}}
    policyTypes: [Egress]
"#;

struct PodInfo {
    netns: String,
    node: &'static str,
    app: &'static str,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    link_local: Ipv6Addr,
    mac: String,
    server: ProcId,
}

struct World {
    lab: Lab,
    pods: BTreeMap<&'static str, PodInfo>,
    dir: PathBuf,
    policy: BTreeMap<&'static str, ProcId>,
    subnets: BTreeMap<&'static str, SubnetEnv>,
    sent: usize,
}

impl World {
    fn new() -> World {
        let mut lab = Lab::new("unaddr").expect("lab");
        let ep = lab.start_etcd().expect("etcd");
        lab.etcdctl(&["put", &format!("{ETCD_PREFIX}/config"), DUAL])
            .expect("put config");
        let twilld = workspace_bin("twilld");
        let mut daemons = BTreeMap::new();
        for n in NODES {
            let node = lab.add_node(n).expect("node");
            // The IPv6 underlay (documentation range) that flannel-v6.1 runs over.
            let v6 = format!("2001:db8::{}/64", 10 + node.idx);
            lab.exec_ok(
                &node.netns,
                &["ip", "-6", "addr", "add", &v6, "dev", "eth0", "nodad"],
            )
            .unwrap();
            lab.exec_ok(
                &node.netns,
                &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
            )
            .unwrap();
            let subnet_file = node.dir.join("subnet.env");
            let id = lab
                .spawn(
                    &node.netns,
                    &format!("twilld-{n}"),
                    &[
                        twilld.to_str().unwrap(),
                        &format!("--etcd-endpoints={ep}"),
                        "--ip-masq",
                        "--resync-period=3600",
                        "--subnet-file",
                        subnet_file.to_str().unwrap(),
                    ],
                    &[],
                )
                .expect("spawn twilld");
            daemons.insert(n, id);
        }
        let mut subnets = BTreeMap::new();
        for n in NODES {
            let f = lab.node(n).dir.join("subnet.env");
            wait_for(
                &format!("subnet.env of {n}"),
                || {
                    assert!(lab.is_running(daemons[n]), "{}", lab.log(daemons[n]));
                    std::fs::read_to_string(&f).is_ok_and(|s| s.contains("FLANNEL_IPV6_SUBNET="))
                },
                String::new,
            );
            subnets.insert(n, SubnetEnv::read(&f).expect("subnet.env"));
        }
        let cni = workspace_bin("twill-cni");
        let server_bin = PY;
        let mut pods = BTreeMap::new();
        for (name, node, app) in [
            ("web", "n1", "web"),
            ("client", "n1", "client"),
            ("other", "n1", "other"),
            ("open", "n1", "open"),
            ("sealed", "n1", "sealed"),
            ("client2", "n2", "client"),
            ("other2", "n2", "other"),
        ] {
            let ndir = lab.node(node).dir.clone();
            let netconf = json!({
                "cniVersion": "0.3.1",
                "name": "cbr0",
                "type": "flannel",
                "delegate": {"hairpinMode": true, "isDefaultGateway": true},
                "subnetFile": ndir.join("subnet.env"),
                "dataDir": ndir.join("flannel"),
                "ipam": {"dataDir": ndir.join("ipam")},
            })
            .to_string();
            let p = lab
                .add_cni_pod(node, name, &cni, &netconf)
                .unwrap_or_else(|e| panic!("CNI ADD {name} on {node}: {e:#}"));
            let v6 = p
                .cni
                .as_ref()
                .unwrap()
                .result
                .get("ips")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|ip| ip.get("address")?.as_str()?.split('/').next())
                .find_map(|a| a.parse::<Ipv6Addr>().ok())
                .unwrap_or_else(|| panic!("no IPv6 address for {name}"));
            let server = lab
                .spawn(
                    &p.netns,
                    &format!("srv-{name}"),
                    &[server_bin, "-c", SERVER, &ETHERTYPE.to_string()],
                    &[],
                )
                .expect("server");
            let link = lab
                .exec_ok(&p.netns, &["ip", "-o", "link", "show", "eth0"])
                .unwrap();
            let mac = link
                .split_whitespace()
                .skip_while(|w| *w != "link/ether")
                .nth(1)
                .expect("eth0 MAC")
                .to_string();
            pods.insert(
                name,
                PodInfo {
                    netns: p.netns.clone(),
                    node,
                    app,
                    v4: p.ip(),
                    v6,
                    link_local: Ipv6Addr::UNSPECIFIED,
                    mac,
                    server,
                },
            );
        }
        // Every address usable: duplicate address detection done (no "tentative").
        for (name, p) in pods.iter_mut() {
            wait_for(
                &format!("IPv6 addresses of {name}"),
                || {
                    let out = lab
                        .exec_ok(&p.netns, &["ip", "-6", "-o", "addr", "show", "dev", "eth0"])
                        .unwrap();
                    if out.contains("tentative") {
                        return false;
                    }
                    match out
                        .split_whitespace()
                        .filter_map(|w| w.split('/').next()?.parse::<Ipv6Addr>().ok())
                        .find(|a| a.segments()[0] & 0xffc0 == 0xfe80)
                    {
                        Some(ll) => {
                            p.link_local = ll;
                            out.contains(&p.v6.to_string())
                        }
                        None => false,
                    }
                },
                String::new,
            );
        }
        // twill-cni's anti-spoofing table and twilld's underlay guard would stop forged
        // sources before the policy sees them (a node may run Flannel, which has neither);
        // without them the policy table alone must hold. twilld runs with a long resync
        // period so that it does not put its table back during the test.
        for n in NODES {
            let netns = lab.node(n).netns.clone();
            wait_for(
                &format!("twilld's guard on {n} knowing its peer"),
                || {
                    let out = lab
                        .exec(&netns, &["nft", "list", "table", "inet", "twill-underlay"])
                        .unwrap();
                    let text = String::from_utf8_lossy(&out.stdout);
                    NODES
                        .iter()
                        .filter(|m| **m != n)
                        .all(|m| text.contains(&lab.node(m).addr.to_string()))
                },
                || {
                    let table = lab
                        .exec(&netns, &["nft", "list", "table", "inet", "twill-underlay"])
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default();
                    format!("{table}\ntwilld's log:\n{}", lab.log(daemons[n]))
                },
            );
            for (family, table) in [("bridge", "twill-antispoof"), ("inet", "twill-underlay")] {
                lab.exec_ok(
                    &lab.node(n).netns,
                    &["nft", "delete", "table", family, table],
                )
                .unwrap();
            }
        }
        let dir = lab.dir().join("manifests");
        std::fs::create_dir_all(&dir).unwrap();
        World {
            lab,
            pods,
            dir,
            policy: BTreeMap::new(),
            subnets,
            sent: 0,
        }
    }

    fn tcp_to(&self, from: &str, host: &str) -> bool {
        self.lab
            .exec(&self.pods[from].netns, &[PY, "-c", CLIENT, "tcp", host])
            .unwrap()
            .status
            .success()
    }

    fn link_local(&self, pod: &str) -> String {
        format!("{}%eth0", self.pods[pod].link_local)
    }

    /// Sends one datagram/frame of `kind` from `from` (to `to` for raw frames) and returns
    /// its token.
    fn send(&mut self, from: &str, kind: &str, to: &str) -> String {
        self.sent += 1;
        let token = format!("{kind}-{from}-{}", self.sent);
        let p = &self.pods[from];
        let bcast = {
            let env = &self.subnets[p.node];
            env.subnet_network()
                .unwrap()
                .trunc()
                .broadcast()
                .to_string()
        };
        let argv: Vec<String> = match kind {
            "bcast" => vec![kind.into(), token.clone(), bcast],
            "raw" => vec![
                kind.into(),
                token.clone(),
                self.pods[to].mac.clone(),
                ETHERTYPE.to_string(),
            ],
            "spoof" => vec![
                kind.into(),
                token.clone(),
                SPOOFED_SOURCE.into(),
                self.pods[to].v4.to_string(),
            ],
            _ => vec![kind.into(), token.clone()],
        };
        let mut cmd = vec![PY, "-c", CLIENT];
        cmd.extend(argv.iter().map(String::as_str));
        self.lab.exec_ok(&p.netns, &cmd).expect("send");
        token
    }

    fn received(&self, pod: &str, token: &str) -> bool {
        self.lab
            .log(self.pods[pod].server)
            .lines()
            .any(|l| l == format!("got {token}"))
    }

    fn manifests(&self) -> String {
        let mut items =
            vec![json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "t"}})];
        for (name, p) in &self.pods {
            items.push(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "t", "labels": {"app": p.app}},
                "spec": {"nodeName": p.node},
                "status": {"phase": "Running", "podIP": p.v4.to_string(),
                           "podIPs": [{"ip": p.v4.to_string()}, {"ip": p.v6.to_string()}]}}));
        }
        let policies: Value = serde_saphyr::from_str(MANIFEST_POLICIES).unwrap();
        items.extend(policies.as_array().unwrap().iter().cloned());
        json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
    }

    fn start_policy(&mut self) {
        std::fs::write(self.dir.join("world.json"), self.manifests()).unwrap();
        let bin = policy_bin();
        for n in NODES {
            let node = self.lab.node(n).clone();
            let subnet_file = node.dir.join("subnet.env");
            let id = self
                .lab
                .spawn(
                    &node.netns,
                    &format!("policy-{n}"),
                    &[
                        bin.to_str().unwrap(),
                        "--manifests",
                        self.dir.to_str().unwrap(),
                        "--node-name",
                        n,
                        "--subnet-file",
                        subnet_file.to_str().unwrap(),
                        "run",
                        "--poll-ms",
                        "100",
                        // No periodic resync during the test: it would put back the
                        // rules the control deletes by hand.
                        "--resync",
                        "3600",
                        "--status-socket",
                        node.dir.join("policy.sock").to_str().unwrap(),
                    ],
                    &[],
                )
                .expect("spawn twill-policy");
            self.policy.insert(n, id);
        }
        let snap = ManifestDir::new(&self.dir).snapshot().expect("manifests");
        for n in NODES {
            let env = &self.subnets[n];
            let mut pod_cidrs: Vec<ipnet::IpNet> = Vec::new();
            pod_cidrs.extend(env.subnet_network().map(ipnet::IpNet::V4));
            pod_cidrs.extend(env.ipv6_subnet_network().map(ipnet::IpNet::V6));
            pod_cidrs.sort();
            let opts = Options {
                pod_cidrs,
                ..Options::default()
            };
            let marker = ruleset_marker(&compile(&snap, n, &opts).render());
            let netns = self.lab.node(n).netns.clone();
            let id = self.policy[n];
            wait_for(
                &format!("{marker} on {n}"),
                || {
                    assert!(self.lab.is_running(id), "{}", self.lab.log(id));
                    let out = self
                        .lab
                        .exec(&netns, &["nft", "list", "table", "inet", "twill-policy"])
                        .unwrap();
                    String::from_utf8_lossy(&out.stdout).contains(&marker)
                },
                String::new,
            );
        }
    }

    /// Deletes, on `node`, every rule that closes a path this test probes: the jumps to
    /// `unaddressed` and the bridge table's non-IP drops.
    fn remove_protection(&self, node: &str) {
        let netns = &self.lab.node(node).netns;
        for (family, chain) in [("inet", "forward"), ("inet", "input")] {
            let listing = self
                .lab
                .exec_ok(
                    netns,
                    &["nft", "-a", "list", "chain", family, "twill-policy", chain],
                )
                .unwrap();
            for line in listing.lines().filter(|l| l.contains("jump unaddressed")) {
                let handle = line.rsplit("# handle ").next().unwrap().trim();
                self.lab
                    .exec_ok(
                        netns,
                        &[
                            "nft",
                            "delete",
                            "rule",
                            family,
                            "twill-policy",
                            chain,
                            "handle",
                            handle,
                        ],
                    )
                    .unwrap();
            }
        }
        for chain in ["forward", "input"] {
            self.lab
                .exec_ok(
                    netns,
                    &["nft", "flush", "chain", "bridge", "twill-policy", chain],
                )
                .unwrap();
        }
    }
}

/// Sends `kind` from `from` until `to` prints it (the path is open), up to 30 s.
fn assert_delivered(w: &mut World, from: &str, kind: &str, to: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let token = w.send(from, kind, to);
        let sent = Instant::now();
        while sent.elapsed() < Duration::from_secs(1) {
            if w.received(to, &token) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            Instant::now() < deadline,
            "{kind} from {from} never reached {to}"
        );
    }
}

/// Sends `kind` from `from` three times and checks, 2 s after the last, that `to` printed
/// none of them.
fn assert_dropped(w: &mut World, from: &str, kind: &str, to: &str) {
    let tokens: Vec<String> = (0..3)
        .map(|_| {
            let t = w.send(from, kind, to);
            std::thread::sleep(Duration::from_millis(200));
            t
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    for t in &tokens {
        assert!(!w.received(to, t), "{kind} from {from} reached {to}: {t}");
    }
}

fn assert_tcp(w: &World, from: &str, to: &str, open: bool) {
    if open {
        wait_for(
            &format!("TCP {from} -> {to}"),
            || w.tcp_to(from, to),
            String::new,
        );
    } else {
        // A denied connection must fail every time; three tries with 1 s timeouts.
        for _ in 0..3 {
            assert!(!w.tcp_to(from, to), "TCP {from} -> {to} connected");
        }
    }
}

#[test]
fn traffic_without_a_pod_address_cannot_get_around_policy() {
    if !twill_lab::require_root() {
        return;
    }
    let mut w = World::new();
    let web = |w: &World| w.pods["web"].v4.to_string();
    let web6 = |w: &World| w.pods["web"].v6.to_string();
    let open4 = w.pods["open"].v4.to_string();

    // No policy table yet: every path this test closes exists.
    assert_tcp(&w, "other", &w.link_local("web"), true);
    assert_tcp(&w, "sealed", &w.link_local("open"), true);
    assert_tcp(&w, "other2", &web6(&w), true);
    for kind in ["bcast", "mcast4", "mcast6", "raw"] {
        assert_delivered(&mut w, "other", kind, "web");
    }
    assert_delivered(&mut w, "sealed", "spoof", "open");

    w.start_policy();

    // What the policies allow still works, over both families, on the same node and
    // across nodes (IPv6 pods still reach each other: neighbour discovery passes).
    for from in ["client", "client2"] {
        assert_tcp(&w, from, &web(&w), true);
        assert_tcp(&w, from, &web6(&w), true);
    }
    assert_tcp(&w, "other", &open4, true);
    // Ingress isolation: denied by address, and now also by link-local address and by
    // group or non-IP traffic, from the same node and from the other one.
    for from in ["other", "other2"] {
        assert_tcp(&w, from, &web(&w), false);
        assert_tcp(&w, from, &web6(&w), false);
        assert_tcp(&w, from, &w.link_local("web"), false);
    }
    for kind in ["bcast", "mcast4", "mcast6", "raw"] {
        assert_dropped(&mut w, "other", kind, "web");
        assert_dropped(&mut w, "other2", kind, "web");
    }
    // Egress isolation: a pod with no egress reaches nobody, by any address.
    assert_tcp(&w, "sealed", &open4, false);
    assert_tcp(&w, "sealed", &w.link_local("open"), false);
    for kind in ["bcast", "mcast4", "mcast6", "raw", "spoof"] {
        assert_dropped(&mut w, "sealed", kind, "open");
    }

    // Control: without the rules that close these paths (deleted by hand on n1), the
    // same probes get through again while the address-based verdicts still hold.
    w.remove_protection("n1");
    assert_tcp(&w, "other", &w.link_local("web"), true);
    assert_tcp(&w, "sealed", &w.link_local("open"), true);
    assert_delivered(&mut w, "other", "raw", "web");
    assert_delivered(&mut w, "other", "bcast", "web");
    assert_delivered(&mut w, "sealed", "spoof", "open");
    assert_tcp(&w, "other", &web(&w), false);

    for (n, id) in &w.policy {
        let log = w.lab.log(*id);
        assert!(
            !log.contains("apply failed"),
            "twill-policy on {n} failed to apply:\n{log}"
        );
    }
    w.lab.teardown().expect("teardown");
}
