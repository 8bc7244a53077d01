//! Root-only: the upstream NetworkPolicy conformance scenarios (S01-S40 and their UDP
//! variants, in `tests/data/netpol-scenarios.json`) on a real twill cluster in the lab.
//!
//! etcd on the switch; three nodes running twilld (VXLAN, --ip-masq) as
//! tests/common/mod.rs does for twilld's own tests; the nine pods x/a .. z/c attached
//! through the CNI plugin (twill-cni delegating to bridge + host-local) and spread so that
//! every node holds one pod of every namespace (same-node pairs are bridged on cni0,
//! the others cross VXLAN); TCP and UDP servers on ports 80 and 81 in every pod;
//! `twill-policy run --manifests DIR` on every node. Each scenario step is written to DIR
//! as one JSON List (namespaces with their labels, pods with spec.nodeName and the
//! status.podIPs CNI gave them, the step's policies); the test then waits until every
//! node's table carries the ruleset id of that step (the table comment the enforcer
//! writes), probes the full 9x9 matrix in parallel (1 s timeouts), and compares it with
//! the expected one. Updates (S19-S23, S32, S35) are file rewrites: nothing restarts.
//!
//! SCTP probes are skipped: this kernel has no SCTP sockets. SCTP rules are covered by
//! the compile and golden tests (tests/compile.rs).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use twill_formats::subnet_env::SubnetEnv;
use twill_lab::{Lab, ProcId};
use twill_policy::compile::{compile, Options};
use twill_policy::enforce::ruleset_marker;
use twill_policy::model::Protocol;
use twill_policy::source::manifests::ManifestDir;
use twill_policy::source::Source;
use twill_policy_testkit::conformance::{load_scenarios, Step, NAMESPACES, PODS, SCENARIOS};

const PY: &str = "/usr/bin/python3";
const ETCD_PREFIX: &str = "/coreos.com/network";
const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// TCP and UDP servers on ports 80 and 81 that answer "pong".
const SERVER: &str = r#"
import socket, threading
def tcp(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(128)
    while True:
        c, _ = s.accept()
        def serve(c):
            try:
                c.settimeout(2); c.recv(16); c.sendall(b"pong")
            except Exception:
                pass
            c.close()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
    while True:
        d, a = s.recvfrom(64); s.sendto(b"pong", a)
for p in (80, 81):
    threading.Thread(target=tcp, args=(p,), daemon=True).start()
    threading.Thread(target=udp, args=(p,), daemon=True).start()
threading.Event().wait()
"#;

/// Probes every `ip` argument on one port/protocol in parallel; prints `ip ok|fail`.
/// TCP: connect + "ping"/"pong" within 1 s. UDP: "ping" twice (0.5 s apart), "pong"
/// back within 1.2 s in all.
const PROBER: &str = r#"
import socket, sys, threading, time
port, proto, ips = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
res = {}
def probe(ip):
    try:
        if proto == "TCP":
            s = socket.create_connection((ip, port), timeout=1)
            s.settimeout(1); s.sendall(b"ping"); ok = s.recv(16) == b"pong"
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect((ip, port)); ok = False
            for wait in (0.5, 0.7):
                s.send(b"ping"); s.settimeout(wait)
                try:
                    ok = s.recv(16) == b"pong"
                    break
                except socket.timeout:
                    pass
        s.close()
    except Exception:
        ok = False
    res[ip] = ok
ts = [threading.Thread(target=probe, args=(ip,)) for ip in ips]
for t in ts: t.start()
for t in ts: t.join()
for ip in ips: print(ip, "ok" if res[ip] else "fail")
"#;

struct PodInfo {
    netns: String,
    ip: Ipv4Addr,
    node: String,
}

struct World {
    lab: Lab,
    /// "x/a" -> pod
    pods: BTreeMap<String, PodInfo>,
    dir: PathBuf,
    policy_procs: BTreeMap<String, ProcId>,
    twilld: BTreeMap<String, ProcId>,
}

fn keys() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

fn policy_bin() -> PathBuf {
    let bin = twill_lab::bin_path("twill-policy");
    if bin.exists() {
        bin
    } else {
        env!("CARGO_BIN_EXE_twill-policy").into()
    }
}

impl World {
    fn new(name: &str) -> World {
        let mut lab = Lab::new(name).expect("lab");
        let ep = lab.start_etcd().expect("etcd");
        lab.etcdctl(&["put", &format!("{ETCD_PREFIX}/config"), VXLAN])
            .expect("put config");
        let twilld_bin = twill_lab::bin_path("twilld");
        assert!(
            twilld_bin.exists(),
            "{} missing: cargo build --workspace --bins",
            twilld_bin.display()
        );
        let mut twilld = BTreeMap::new();
        for n in NODES {
            lab.add_node(n).expect("node");
            let node = lab.node(n).clone();
            let subnet_file = node.dir.join("subnet.env");
            let id = lab
                .spawn(
                    &node.netns,
                    &format!("twilld-{n}"),
                    &[
                        twilld_bin.to_str().unwrap(),
                        &format!("--etcd-endpoints={ep}"),
                        "--ip-masq",
                        "--subnet-file",
                        subnet_file.to_str().unwrap(),
                    ],
                    &[("TWILL_LOG", "info")],
                )
                .expect("spawn twilld");
            twilld.insert(n.to_string(), id);
        }
        for n in NODES {
            let f = lab.node(n).dir.join("subnet.env");
            let deadline = Instant::now() + Duration::from_secs(60);
            while !std::fs::read_to_string(&f).is_ok_and(|s| s.contains("FLANNEL_SUBNET=")) {
                let id = twilld[n];
                assert!(lab.is_running(id), "twilld on {n} exited:\n{}", lab.log(id));
                assert!(Instant::now() < deadline, "twilld on {n} not ready");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let cni = twill_lab::bin_path("twill-cni");
        assert!(cni.exists(), "{} missing", cni.display());
        let mut pods = BTreeMap::new();
        for (i, key) in keys().into_iter().enumerate() {
            let node = NODES[i % 3];
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
            let short = key.replace('/', "");
            let p = lab
                .add_cni_pod(node, &short, &cni, &netconf)
                .unwrap_or_else(|e| panic!("CNI ADD {key} on {node}: {e:#}"));
            lab.spawn(&p.netns, &format!("srv-{short}"), &[PY, "-c", SERVER], &[])
                .expect("server");
            pods.insert(
                key,
                PodInfo {
                    netns: p.netns.clone(),
                    ip: p.ip(),
                    node: node.to_string(),
                },
            );
        }
        let dir = lab.dir().join("manifests");
        std::fs::create_dir_all(&dir).unwrap();
        World {
            lab,
            pods,
            dir,
            policy_procs: BTreeMap::new(),
            twilld,
        }
    }

    fn start_policy(&mut self, extra: &dyn Fn(&str) -> Vec<String>) {
        let bin = policy_bin();
        for n in NODES {
            let netns = self.lab.node(n).netns.clone();
            let mut argv: Vec<String> = vec![
                bin.to_str().unwrap().into(),
                "--manifests".into(),
                self.dir.to_str().unwrap().into(),
                "--node-name".into(),
                n.into(),
                "run".into(),
                "--poll-ms".into(),
                "50".into(),
                "--metrics-addr".into(),
                "127.0.0.1:9753".into(),
                // Lab nodes share one filesystem: a status socket per node.
                "--status-socket".into(),
                self.lab
                    .node(n)
                    .dir
                    .join("policy.sock")
                    .to_str()
                    .unwrap()
                    .into(),
            ];
            argv.extend(extra(n));
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let id = self
                .lab
                .spawn(&netns, &format!("policy-{n}"), &argv, &[])
                .expect("spawn twill-policy");
            self.policy_procs.insert(n.to_string(), id);
        }
    }

    /// The manifests of a step: namespaces, pods (with the lab's addresses), policies.
    fn manifests(&self, step: &Step) -> Value {
        self.manifests_with(step, true)
    }

    fn manifests_with(&self, step: &Step, with_pods: bool) -> Value {
        let mut items = Vec::new();
        for ns in NAMESPACES {
            let labels = step
                .namespace_labels
                .get(ns)
                .cloned()
                .unwrap_or_else(|| [("ns".to_string(), ns.to_string())].into());
            items.push(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": labels}}));
        }
        for (key, p) in self.pods.iter().filter(|_| with_pods) {
            let (ns, name) = key.split_once('/').unwrap();
            let labels = step
                .pod_labels
                .get(key)
                .cloned()
                .unwrap_or_else(|| [("pod".to_string(), name.to_string())].into());
            let mut containers = Vec::new();
            for port in [80, 81] {
                for proto in ["TCP", "UDP", "SCTP"] {
                    let lower = proto.to_ascii_lowercase();
                    containers.push(json!({"name": format!("cont-{port}-{lower}"),
                        "ports": [{"name": format!("serve-{port}-{lower}"),
                                   "containerPort": port, "protocol": proto}]}));
                }
            }
            items.push(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {"nodeName": p.node, "containers": containers},
                "status": {"phase": "Running", "podIP": p.ip.to_string(),
                           "podIPs": [{"ip": p.ip.to_string()}]}}));
        }
        for pol in &step.policies {
            let text = self.substitute_ips(&pol.to_string());
            items.push(serde_json::from_str(&text).unwrap());
        }
        json!({"apiVersion": "v1", "kind": "List", "items": items})
    }

    fn substitute_ips(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (key, p) in &self.pods {
            out = out.replace(&format!("${{ip:{key}}}"), &p.ip.to_string());
        }
        assert!(!out.contains("${ip:"), "unresolved pod IP in {out}");
        out
    }

    /// Replaces the manifests atomically (write beside, rename in).
    fn write(&self, doc: &Value) {
        let tmp = self.lab.dir().join("world.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
        std::fs::rename(&tmp, self.dir.join("world.json")).unwrap();
    }

    /// Waits until every node's table carries the ruleset compiled from the manifests
    /// now in the directory; returns how long that took.
    fn wait_applied(&mut self, opts: &dyn Fn(&str) -> Options) -> Duration {
        let start = Instant::now();
        let snap = ManifestDir::new(&self.dir)
            .snapshot()
            .unwrap_or_else(|e| panic!("manifests invalid: {e}"));
        for n in NODES {
            let marker = ruleset_marker(&compile(&snap, n, &opts(n)).render());
            let netns = self.lab.node(n).netns.clone();
            loop {
                let out = self
                    .lab
                    .exec(&netns, &["nft", "list", "table", "inet", "twill-policy"])
                    .unwrap();
                if String::from_utf8_lossy(&out.stdout).contains(&marker) {
                    break;
                }
                let id = self.policy_procs[n];
                assert!(
                    self.lab.is_running(id),
                    "twill-policy on {n} exited:\n{}",
                    self.lab.log(id)
                );
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "{n} did not apply {marker} in 60 s:\n{}",
                    self.lab.log(id)
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        start.elapsed()
    }

    /// Probes all 72 non-self pairs on `port`/`proto`; returns the denied `src->dst` pairs.
    fn matrix(&self, port: u16, proto: Protocol) -> BTreeSet<String> {
        let by_ip: BTreeMap<String, &String> = self
            .pods
            .iter()
            .map(|(k, p)| (p.ip.to_string(), k))
            .collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .pods
                .iter()
                .map(|(src, p)| {
                    let targets: Vec<String> = self
                        .pods
                        .iter()
                        .filter(|(k, _)| *k != src)
                        .map(|(_, q)| q.ip.to_string())
                        .collect();
                    let by_ip = &by_ip;
                    s.spawn(move || {
                        let out = Command::new("ip")
                            .args(["netns", "exec", &p.netns, PY, "-c", PROBER])
                            .arg(port.to_string())
                            .arg(proto.to_string())
                            .args(&targets)
                            .output()
                            .expect("prober");
                        let text = String::from_utf8_lossy(&out.stdout).to_string();
                        assert!(
                            out.status.success(),
                            "prober in {src}: {}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                        let mut denied = Vec::new();
                        let mut seen = 0;
                        for l in text.lines() {
                            let (ip, r) = l.split_once(' ').unwrap();
                            seen += 1;
                            if r != "ok" {
                                denied.push(format!("{src}->{}", by_ip[ip]));
                            }
                        }
                        assert_eq!(seen, 8, "prober output from {src}: {text}");
                        denied
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        })
    }

    fn metrics(&self, node: &str) -> String {
        let netns = &self.lab.node(node).netns;
        self.lab
            .exec_ok(
                netns,
                &[
                    PY,
                    "-c",
                    "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9753/metrics', timeout=5).read().decode())",
                ],
            )
            .expect("metrics")
    }
}

fn diff(want: &BTreeSet<String>, got: &BTreeSet<String>) -> String {
    let open: Vec<&String> = want.difference(got).collect();
    let closed: Vec<&String> = got.difference(want).collect();
    format!("connected but should be denied: {open:?}; blocked but should connect: {closed:?}")
}

fn scenarios() -> Vec<twill_policy_testkit::conformance::Scenario> {
    load_scenarios(SCENARIOS).unwrap()
}

#[test]
fn upstream_conformance_scenarios_in_a_three_node_lab() {
    if !twill_lab::require_root() {
        return;
    }
    let t0 = Instant::now();
    let mut w = World::new("conf");
    // Each node's pod subnet, as twill-policy reads it from subnet.env (--subnet-file).
    let subnet_file = |lab: &Lab, n: &str| lab.node(n).dir.join("subnet.env");
    let cidrs: BTreeMap<String, ipnet::IpNet> = NODES
        .iter()
        .map(|n| {
            let env = SubnetEnv::read(&subnet_file(&w.lab, n)).unwrap();
            (
                n.to_string(),
                ipnet::IpNet::V4(env.subnet_network().unwrap()),
            )
        })
        .collect();
    let opts = |n: &str| Options {
        pod_cidrs: vec![cidrs[n]],
        ..Options::default()
    };
    let files: BTreeMap<String, String> = NODES
        .iter()
        .map(|n| {
            (
                n.to_string(),
                subnet_file(&w.lab, n).to_string_lossy().into_owned(),
            )
        })
        .collect();
    w.start_policy(&|n| vec!["--subnet-file".into(), files[n].clone()]);
    let empty = Step {
        policies: vec![],
        namespace_labels: BTreeMap::new(),
        pod_labels: BTreeMap::new(),
        probes: vec![],
    };
    // The pods exist (CNI gave them addresses) but the source does not list them yet:
    // they are isolated from their first packet, although no policy exists.
    w.write(&w.manifests_with(&empty, false));
    w.wait_applied(&opts);
    let d = w.matrix(80, Protocol::Tcp);
    assert_eq!(
        d.len(),
        72,
        "pods unknown to the source must be isolated; open: {d:?}"
    );
    eprintln!("pods not yet in the source: all 72 pairs blocked (fail closed)");
    w.write(&w.manifests(&empty));
    w.wait_applied(&opts);
    // Before any policy every pod reaches every other one (wait for VXLAN/ARP to settle).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = w.matrix(80, Protocol::Tcp);
        if d.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "no policy, still blocked: {d:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("lab ready in {:?}", t0.elapsed());

    let mut failures = Vec::new();
    let mut applied = Vec::new();
    let (mut matrices, mut skipped_sctp) = (0, 0);
    for sc in scenarios() {
        for (si, step) in sc.steps.iter().enumerate() {
            w.write(&w.manifests(step));
            let took = w.wait_applied(&opts);
            applied.push(took.as_secs_f64());
            for probe in &step.probes {
                let what = format!("{} step {si} {}/{}", sc.id, probe.protocol, probe.port);
                if probe.protocol == Protocol::Sctp {
                    eprintln!(
                        "{what}: SKIPPED: this kernel has no SCTP sockets (no sctp module), so \
                         SCTP cannot be probed; SCTP rules are checked by tests/compile.rs"
                    );
                    skipped_sctp += 1;
                    continue;
                }
                let want: BTreeSet<String> = probe.expect_denied.iter().cloned().collect();
                let mut got = w.matrix(probe.port, probe.protocol);
                matrices += 1;
                // As upstream, a mismatch is re-probed before it counts; twice here, since on
                // two shared cores a probe's 1 s can pass before an allowed peer is scheduled.
                for _ in 0..2 {
                    if got == want {
                        break;
                    }
                    eprintln!("{what}: mismatch, re-probing: {}", diff(&want, &got));
                    std::thread::sleep(Duration::from_secs(1));
                    got = w.matrix(probe.port, probe.protocol);
                    matrices += 1;
                }
                let ok = got == want;
                eprintln!(
                    "{what}: {} ({} denied) [enforced {:.0} ms after the write]",
                    if ok { "ok" } else { "MISMATCH" },
                    got.len(),
                    took.as_secs_f64() * 1000.0
                );
                if !ok {
                    failures.push(format!("{what} ({}): {}", sc.title, diff(&want, &got)));
                }
            }
        }
    }
    // Nothing restarted: the same twilld and twill-policy processes ran throughout.
    for n in NODES {
        for id in [w.policy_procs[n], w.twilld[n]] {
            assert!(w.lab.is_running(id), "{n}: {}", w.lab.log(id));
        }
    }
    // Metrics: syncs recorded, drops counted per pod and direction.
    let m = w.metrics("n1");
    assert!(
        m.contains("twill_policy_sync_duration_seconds_count"),
        "{m}"
    );
    assert!(m.contains("twill_policy_dropped_packets_total{"), "{m}");
    assert!(m.contains("twill_policy_rules "), "{m}");
    applied.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "{matrices} matrices probed, {skipped_sctp} SCTP probes skipped; write -> enforced on all 3 nodes: median {:.0} ms, max {:.0} ms; total {:?}",
        applied[applied.len() / 2] * 1000.0,
        applied.last().unwrap() * 1000.0,
        t0.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    w.lab.teardown().unwrap();
}
