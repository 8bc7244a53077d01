//! A twill cluster in the lab for the conformance tests: etcd on the switch, nodes running
//! twilld (VXLAN, --ip-masq), pods attached through twill-cni, `twill-policy run
//! --manifests` on every node, Python servers and a parallel prober inside the pods.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use twill_formats::subnet_env::SubnetEnv;
use twill_lab::{Lab, ProcId};
use twill_policy::compile::{compile, Options};
use twill_policy::enforce::ruleset_marker;
use twill_policy::model::Snapshot;
use twill_policy::source::manifests::ManifestDir;
use twill_policy::source::Source;

pub const PY: &str = "/usr/bin/python3";
const ETCD_PREFIX: &str = "/coreos.com/network";
const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// TCP and UDP servers answering "pong" on the `PROTO:PORT[:ADDR]` arguments (TCP or UDP;
/// ADDR defaults to 0.0.0.0). A UDP server on a node that pods reach at the node's address
/// must bind that address (as upstream's hostNetwork servers do with
/// `--udp-listen-addresses $(HOST_IP)`): bound to 0.0.0.0 it would answer from the bridge's
/// address, which the pod's connected socket does not accept.
pub const SERVER: &str = r#"
import socket, sys, threading
def tcp(port, addr):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(128)
    while True:
        c, _ = s.accept()
        def serve(c):
            try:
                c.settimeout(2); c.recv(16); c.sendall(b"pong")
            except Exception:
                pass
            c.close()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
def udp(port, addr):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((addr, port))
    while True:
        d, a = s.recvfrom(64); s.sendto(b"pong", a)
for arg in sys.argv[1:]:
    proto, port, addr = (arg.split(":") + ["0.0.0.0"])[:3]
    threading.Thread(target={"TCP": tcp, "UDP": udp}[proto], args=(int(port), addr), daemon=True).start()
threading.Event().wait()
"#;

/// Probes every `PROTO:IP:PORT` argument in parallel; prints `arg ok|fail` per argument.
/// TCP: connect + "ping"/"pong" within 1 s. UDP: "ping" twice (0.5 s apart), "pong" back
/// within 1.2 s in all.
const PROBER: &str = r#"
import socket, sys, threading
res = {}
def probe(arg):
    proto, ip, port = arg.split(":")
    port = int(port)
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
    res[arg] = ok
ts = [threading.Thread(target=probe, args=(a,)) for a in sys.argv[1:]]
for t in ts: t.start()
for t in ts: t.join()
for a in sys.argv[1:]: print(a, "ok" if res[a] else "fail")
"#;

/// Starts etcd, writes the VXLAN network config, adds `nodes` running twilld and waits
/// until each has written its subnet.env; returns the twilld processes by node.
pub fn start_twilld_nodes(lab: &mut Lab, nodes: &[&str]) -> BTreeMap<String, ProcId> {
    let ep = lab.start_etcd().expect("etcd");
    lab.etcdctl(&["put", &format!("{ETCD_PREFIX}/config"), VXLAN])
        .expect("put config");
    let twilld_bin = super::workspace_bin("twilld");
    let mut twilld = BTreeMap::new();
    for &n in nodes {
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
    for &n in nodes {
        let f = lab.node(n).dir.join("subnet.env");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&f).is_ok_and(|s| s.contains("FLANNEL_SUBNET=")) {
            let id = twilld[n];
            assert!(lab.is_running(id), "twilld on {n} exited:\n{}", lab.log(id));
            assert!(Instant::now() < deadline, "twilld on {n} not ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    twilld
}

/// The netconf kube-flannel.yml gives the CNI plugin, with the node's own files.
pub fn flannel_netconf(node_dir: &Path) -> String {
    json!({
        "cniVersion": "0.3.1",
        "name": "cbr0",
        "type": "flannel",
        "delegate": {"hairpinMode": true, "isDefaultGateway": true},
        "subnetFile": node_dir.join("subnet.env"),
        "dataDir": node_dir.join("flannel"),
        "ipam": {"dataDir": node_dir.join("ipam")},
    })
    .to_string()
}

/// Attaches pod `short` to `node` through twill-cni and starts [`SERVER`] in it on
/// `servers` (`PROTO:PORT`); returns the pod.
pub fn add_serving_pod(
    lab: &mut Lab,
    node: &str,
    short: &str,
    servers: &[String],
) -> twill_lab::Pod {
    let cni = super::workspace_bin("twill-cni");
    let netconf = flannel_netconf(&lab.node(node).dir.clone());
    let pod = lab
        .add_cni_pod(node, short, &cni, &netconf)
        .unwrap_or_else(|e| panic!("CNI ADD {short} on {node}: {e:#}"));
    serve_in(lab, &pod.netns.clone(), &format!("srv-{short}"), servers);
    pod
}

/// Starts [`SERVER`] in `netns` on `servers` (`PROTO:PORT[:ADDR]`).
pub fn serve_in(lab: &mut Lab, netns: &str, name: &str, servers: &[String]) -> ProcId {
    let mut argv = vec![PY, "-c", SERVER];
    argv.extend(servers.iter().map(String::as_str));
    lab.spawn(netns, name, &argv, &[]).expect("server")
}

/// `twill-policy --manifests DIR --node-name N run --poll-ms 50` on `node`, with a status
/// socket of its own (lab nodes share one filesystem) and `extra` arguments after `run`.
pub fn spawn_policy_run(lab: &mut Lab, node: &str, manifests: &Path, extra: &[String]) -> ProcId {
    let bin = super::policy_bin();
    let n = lab.node(node).clone();
    let mut argv: Vec<String> = vec![
        bin.to_str().unwrap().into(),
        "--manifests".into(),
        manifests.to_str().unwrap().into(),
        "--node-name".into(),
        node.into(),
        "run".into(),
        "--poll-ms".into(),
        "50".into(),
        "--metrics-addr".into(),
        "127.0.0.1:9753".into(),
        "--status-socket".into(),
        n.policy_socket().to_str().unwrap().into(),
    ];
    argv.extend(extra.iter().cloned());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    lab.spawn(&n.netns, &format!("policy-{node}"), &argv, &[])
        .expect("spawn twill-policy")
}

/// Waits until every node's table carries the ruleset compiled (with `opts(node)`) from
/// the manifests now in `manifests`; returns the snapshot read and how long that took.
pub fn wait_applied(
    lab: &mut Lab,
    manifests: &Path,
    procs: &BTreeMap<String, ProcId>,
    opts: &dyn Fn(&str) -> Options,
) -> (Snapshot, Duration) {
    let start = Instant::now();
    let snap = ManifestDir::new(manifests)
        .snapshot()
        .unwrap_or_else(|e| panic!("manifests invalid: {e}"));
    for (n, &id) in procs {
        let marker = ruleset_marker(&compile(&snap, n, &opts(n)).render());
        let netns = lab.node(n).netns.clone();
        loop {
            let out = lab
                .exec(&netns, &["nft", "list", "table", "inet", "twill-policy"])
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains(&marker) {
                break;
            }
            assert!(
                lab.is_running(id),
                "twill-policy on {n} exited:\n{}",
                lab.log(id)
            );
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{n} did not apply {marker} in 60 s:\n{}",
                lab.log(id)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    (snap, start.elapsed())
}

/// Each node's compile options as its `twill-policy run --subnet-file` has them: the pod
/// CIDR from the subnet.env twilld wrote there.
pub fn subnet_file_options(lab: &Lab, nodes: &[&str]) -> BTreeMap<String, Options> {
    nodes
        .iter()
        .map(|&n| {
            let env = SubnetEnv::read(&lab.node(n).dir.join("subnet.env")).unwrap();
            let opts = Options {
                pod_cidrs: vec![ipnet::IpNet::V4(env.subnet_network().unwrap())],
                ..Options::default()
            };
            (n.to_string(), opts)
        })
        .collect()
}

/// Runs [`PROBER`] once per client netns, all at once: `targets` maps a client netns to
/// its `PROTO:IP:PORT` targets; returns, per netns, whether each target answered.
pub fn probe_all(
    targets: &BTreeMap<String, Vec<String>>,
) -> BTreeMap<String, BTreeMap<String, bool>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|(netns, list)| {
                s.spawn(move || {
                    let out = Command::new("ip")
                        .args(["netns", "exec", netns, PY, "-c", PROBER])
                        .args(list)
                        .output()
                        .expect("prober");
                    let text = String::from_utf8_lossy(&out.stdout).to_string();
                    assert!(
                        out.status.success(),
                        "prober in {netns}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    let got: BTreeMap<String, bool> = text
                        .lines()
                        .filter_map(|l| l.split_once(' '))
                        .map(|(t, r)| (t.to_string(), r == "ok"))
                        .collect();
                    assert!(
                        list.iter().all(|t| got.contains_key(t)),
                        "prober output in {netns}: {text}"
                    );
                    (netns.clone(), got)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The manifests directory of a lab: `<lab dir>/manifests`, created.
pub fn manifests_dir(lab: &Lab) -> PathBuf {
    let dir = lab.dir().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Replaces `dir/world.json` with `doc`, atomically (written beside, renamed in).
pub fn write_manifests(lab: &Lab, dir: &Path, doc: &serde_json::Value) {
    let tmp = lab.dir().join("world.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
    std::fs::rename(&tmp, dir.join("world.json")).unwrap();
}

/// Ends a conformance lab run: every process of `procs` (twilld and twill-policy, by node)
/// still runs, so nothing restarted; prints `what` with the median and longest write -> enforced time of
/// `applied` (seconds) and the run's total since `t0`; fails with every line of `failures`;
/// tears the lab down.
pub fn finish(
    mut lab: Lab,
    procs: [&BTreeMap<String, ProcId>; 2],
    what: &str,
    mut applied: Vec<f64>,
    t0: Instant,
    failures: &[String],
) {
    for (node, &id) in procs.into_iter().flatten() {
        assert!(lab.is_running(id), "{node}: {}", lab.log(id));
    }
    applied.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "{what}; write -> enforced on all nodes: median {:.0} ms, max {:.0} ms; total {:?}",
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
    lab.teardown().unwrap();
}
