//! `twill-lab quickstart`: the README's first command. A 3-node cluster in network namespaces
//! with real etcd, twilld on every node (VXLAN, as kube-flannel.yml runs it), two pods per node
//! attached through twill-cni and the reference bridge + host-local plugins, the pod-to-pod
//! reachability matrix, then an example NetworkPolicy enforced by twill-policy and the matrix
//! again. The lab stays up for exploring; `twill-lab quickstart --down` removes it.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{bin_path, cleanup_stale, Lab};

/// The lab name the quick start persists its cluster under.
pub const NAME: &str = "quickstart";
const NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const NODES: [&str; 3] = ["n1", "n2", "n3"];
/// (pod, node, app label): a web server and a client per node, and one pod no policy allows.
pub const PODS: [(&str, &str, &str); 6] = [
    ("web-1", "n1", "web"),
    ("client-1", "n1", "client"),
    ("web-2", "n2", "web"),
    ("client-2", "n2", "client"),
    ("web-3", "n3", "web"),
    ("other-3", "n3", "other"),
];
/// The example NetworkPolicy: web pods accept TCP 80 only from client pods (namespace `demo`).
pub const POLICY: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-allow-clients
  namespace: demo
spec:
  podSelector:
    matchLabels:
      app: web
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app: client
    ports:
    - protocol: TCP
      port: 80
"#;

fn step(msg: &str) {
    println!("\n==> {msg}");
}

/// Removes the quick-start cluster, if one is up.
pub fn down() -> Result<()> {
    match Lab::load(NAME) {
        Ok(lab) => {
            lab.teardown()?;
            println!("quickstart cluster removed");
        }
        Err(_) => println!("no quickstart cluster is up"),
    }
    let _ = cleanup_stale();
    Ok(())
}

/// Builds the quick-start cluster, shows reachability before and after a policy, and leaves
/// it up. Fails if what it shows is not what twill promises.
pub fn up() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the quickstart needs root: it creates network namespaces");
    }
    let _ = cleanup_stale();
    if Lab::load(NAME).is_ok() {
        println!("a quickstart cluster is already up: removing it first");
        down()?;
    }
    for bin in ["twilld", "twill-cni", "twill-policy", "twill-lab"] {
        if !bin_path(bin).exists() {
            bail!(
                "{} is missing: build the workspace first (cargo build --workspace --bins)",
                bin_path(bin).display()
            );
        }
    }
    // Until persisted, any failure drops the lab, which removes everything made so far.
    let mut lab = Lab::new(NAME)?;

    step("etcd in the switch namespace, and Flannel's net-conf.json under /coreos.com/network/config");
    let endpoint = lab.start_etcd()?;
    lab.etcdctl(&["put", "/coreos.com/network/config", NET_CONF])?;
    println!("    etcd {endpoint}\n    config {NET_CONF}");

    step("3 nodes (namespaces on a switch, underlay 198.18.0.0/24), twilld on each");
    let twilld = bin_path("twilld").to_string_lossy().into_owned();
    for n in NODES {
        let node = lab.add_node(n)?;
        let subnet_file = node.dir.join("subnet.env").to_string_lossy().into_owned();
        let status_socket = node.twilld_socket().to_string_lossy().into_owned();
        lab.spawn(
            &node.netns,
            &format!("twilld-{n}"),
            &[
                &twilld,
                &format!("--etcd-endpoints={endpoint}"),
                "--ip-masq",
                "--subnet-file",
                &subnet_file,
                "--status-socket",
                &status_socket,
                &format!("--healthz-port={HEALTHZ_PORT}"),
            ],
            // The node name twilld reports (etcd mode has none of its own; a DaemonSet sets it).
            &[("NODE_NAME", n)],
        )?;
    }
    for n in NODES {
        let node = lab.node(n).clone();
        let env = wait_file(&node.dir.join("subnet.env"), Duration::from_secs(60)).with_context(
            || {
                format!(
                    "twilld on {n} did not write subnet.env; log:\n{}",
                    log_of(&lab, &format!("twilld-{n}"))
                )
            },
        )?;
        let subnet = env
            .lines()
            .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
            .unwrap_or("?");
        println!(
            "    {n}  eth0 {}  lease FLANNEL_SUBNET={subnet}",
            node.underlay()
        );
    }

    step("2 pods per node through twill-cni (Flannel's CNI config) and the bridge + host-local plugins");
    let cni = bin_path("twill-cni");
    let lab_bin = bin_path("twill-lab").to_string_lossy().into_owned();
    let mut ips: Vec<(&str, IpAddr)> = Vec::new();
    for (pod, n, _) in PODS {
        let conf = lab.node(n).flannel_netconf();
        let p = lab.add_cni_pod(n, pod, &cni, &conf)?;
        lab.spawn(
            &p.netns,
            &format!("serve-{pod}"),
            &[&lab_bin, "serve", "--port", "80"],
            &[],
        )?;
        println!("    {pod:<9} on {n}  {}", p.addr);
        ips.push((pod, IpAddr::V4(p.ip())));
    }

    step(
        "Reachability before any policy (TCP 80, every pod to every pod, across nodes over VXLAN)",
    );
    // subnet.env comes before twilld's first peer pass, and a server may not listen yet: wait
    // for the full matrix (every pod reaching every pod) rather than probe once.
    let all = vec![vec![true; ips.len()]; ips.len()];
    let before = matrix_until(&lab, &lab_bin, &ips, &all, Duration::from_secs(60))?;
    print!("{}", render(&ips, &before));

    step("twill-policy on every node, and a NetworkPolicy: web pods accept TCP 80 only from app=client");
    let manifests = lab.dir().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("cluster.yaml"), cluster_manifest(&ips))?;
    let policy_bin = bin_path("twill-policy").to_string_lossy().into_owned();
    let mdir = manifests.to_string_lossy().into_owned();
    for n in NODES {
        let ns = lab.node(n).netns.clone();
        // --subnet-file as kube-flannel.yml passes it: addresses of the node's subnet that
        // belong to no known pod are isolated.
        let subnet_file = lab.node(n).dir.join("subnet.env");
        lab.spawn(
            &ns,
            &format!("twill-policy-{n}"),
            &[
                &policy_bin,
                "run",
                "--manifests",
                &mdir,
                "--node-name",
                n,
                "--subnet-file",
                &subnet_file.to_string_lossy(),
                // Lab nodes share one filesystem: a status socket per node.
                "--status-socket",
                &lab.node(n).policy_socket().to_string_lossy(),
            ],
            &[],
        )?;
    }
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(manifests.join("policy.yaml"), POLICY)?;
    print!(
        "{}",
        POLICY
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    );
    // A pod talking to itself never leaves its namespace, so no policy applies to it.
    let expected: Vec<Vec<bool>> = PODS
        .iter()
        .enumerate()
        .map(|(i, (_, _, from_app))| {
            PODS.iter()
                .enumerate()
                .map(|(j, (_, _, to_app))| i == j || *to_app != "web" || *from_app == "client")
                .collect()
        })
        .collect();
    let after = matrix_until(&lab, &lab_bin, &ips, &expected, Duration::from_secs(60))?;

    step("Reachability with the policy (rows: from, columns: to)");
    print!("{}", render(&ips, &after));

    step("Node n1 as an operator sees it: `twilld status` asks both daemons over their sockets (exit 0: healthy), and their /metrics");
    let n1 = lab.node("n1").clone();
    let status = lab.exec(
        &n1.netns,
        &[
            &twilld,
            "status",
            "--twilld-socket",
            &n1.twilld_socket().to_string_lossy(),
            "--policy-socket",
            &n1.policy_socket().to_string_lossy(),
        ],
    )?;
    print!("{}", indent(&String::from_utf8_lossy(&status.stdout)));
    let ok_status = status.status.success();
    for (port, wanted) in [
        (HEALTHZ_PORT, "twilld_peers_"),
        (POLICY_METRICS_PORT, "twill_policy_dropped_packets_total{"),
    ] {
        let url = format!("http://127.0.0.1:{port}/metrics");
        let scrape = lab.exec_ok(&n1.netns, &["curl", "-sf", &url])?;
        println!("    $ curl -s {url} | grep {wanted}");
        for line in scrape.lines().filter(|l| l.starts_with(wanted)) {
            println!("    {line}");
        }
    }

    let ok_before = before.iter().all(|r| r.iter().all(|&x| x));
    let ok_after = after == expected;
    let path = lab.persist()?;
    println!();
    if !ok_status {
        println!(
            "UNEXPECTED: twilld status on n1 exited {} (problems listed above)",
            status.status
        );
    }
    if ok_before && ok_after {
        println!("Every pod reached every other pod across nodes. With the policy, the web pods accept connections only from the client pods (and from themselves: that traffic never leaves the pod); every other path is untouched.");
    } else {
        println!("UNEXPECTED: before all-reachable = {ok_before}, after matches the policy = {ok_after}; logs are in {}", path.display());
    }
    println!("\nThe cluster stays up. Try:");
    println!("  target/debug/twill-lab exec --name {NAME} --node n1 -- ip route           # routes to the other nodes' subnets via flannel.1");
    println!(
        "  target/debug/twill-lab exec --name {NAME} --node n1 -- bridge fdb show dev flannel.1"
    );
    println!(
        "  target/debug/twill-lab exec --name {NAME} --node n1 -- nft list table inet twill-policy"
    );
    println!("  target/debug/twill-lab exec --name {NAME} --node sw -- etcdctl get --prefix /coreos.com/network/subnets");
    println!("  target/debug/twill-lab exec --name {NAME} --node n1 -- target/debug/twilld status --output json --twilld-socket {} --policy-socket {}", n1.twilld_socket().display(), n1.policy_socket().display());
    println!("  target/debug/twill-lab exec --name {NAME} --node n1 -- curl -s 127.0.0.1:{HEALTHZ_PORT}/metrics   # twill-policy's: port {POLICY_METRICS_PORT}");
    println!("Remove it with: scripts/quickstart.sh down");
    if !(ok_before && ok_after && ok_status) {
        bail!("the quickstart did not show the expected reachability");
    }
    Ok(())
}

/// twilld's health port (`/healthz`, `/readyz`, `/metrics`) on each node, as kube-flannel.yml sets it.
const HEALTHZ_PORT: u16 = 8081;
/// twill-policy's default metrics port.
const POLICY_METRICS_PORT: u16 = 9753;

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

fn log_of(lab: &Lab, name: &str) -> String {
    lab.find_proc(name)
        .map(|id| lab.log(id))
        .unwrap_or_default()
}

fn wait_file(path: &Path, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("{} did not appear in {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The demo namespace and its pods as manifests for twill-policy's `--manifests` source.
fn cluster_manifest(ips: &[(&str, IpAddr)]) -> String {
    let mut s = String::from("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n");
    for ((pod, node, app), (_, ip)) in PODS.iter().zip(ips) {
        let _ = write!(
            s,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: demo\n  labels:\n    app: {app}\nspec:\n  nodeName: {node}\n  containers:\n  - name: main\n    ports:\n    - containerPort: 80\nstatus:\n  podIPs:\n  - ip: {ip}\n"
        );
    }
    s
}

/// Probes the matrix until it equals `expected` or `timeout` has passed; returns the last one.
fn matrix_until(
    lab: &Lab,
    lab_bin: &str,
    ips: &[(&str, IpAddr)],
    expected: &[Vec<bool>],
    timeout: Duration,
) -> Result<Vec<Vec<bool>>> {
    let deadline = Instant::now() + timeout;
    loop {
        let m = matrix(lab, lab_bin, ips)?;
        if m == expected || Instant::now() > deadline {
            return Ok(m);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Probes TCP 80 from every pod to every pod, in parallel.
fn matrix(lab: &Lab, lab_bin: &str, ips: &[(&str, IpAddr)]) -> Result<Vec<Vec<bool>>> {
    let jobs: Vec<(usize, usize, String, IpAddr)> = ips
        .iter()
        .enumerate()
        .flat_map(|(i, (from, _))| {
            ips.iter()
                .enumerate()
                .map(move |(j, (_, to))| (i, j, lab.ns(from), *to))
        })
        .collect();
    let results: Vec<(usize, usize, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(i, j, ns, to)| {
                s.spawn(move || {
                    let target = SocketAddr::new(*to, 80).to_string();
                    let ok = lab
                        .exec(
                            ns,
                            &[lab_bin, "probe", "--to", &target, "--timeout-ms", "1000"],
                        )
                        .map(|o| o.status.success())
                        .unwrap_or(false);
                    (*i, *j, ok)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread"))
            .collect()
    });
    let mut m = vec![vec![false; ips.len()]; ips.len()];
    for (i, j, ok) in results {
        m[i][j] = ok;
    }
    Ok(m)
}

fn render(ips: &[(&str, IpAddr)], m: &[Vec<bool>]) -> String {
    let mut s = format!("    {:<10}", "from \\ to");
    for (to, _) in ips {
        let _ = write!(s, "{to:>10}");
    }
    s.push('\n');
    for (i, (from, _)) in ips.iter().enumerate() {
        let _ = write!(s, "    {from:<10}");
        for ok in &m[i] {
            let _ = write!(s, "{:>10}", if *ok { "ok" } else { "-" });
        }
        s.push('\n');
    }
    s
}
