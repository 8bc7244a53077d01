//! Policy-at-scale benchmark: a generated cluster of 10k pods, 1k NetworkPolicies,
//! 100 namespaces (100 nodes of 100 pods; every namespace has one pod on the measured
//! node n1) and 100 cluster policies (ClusterNetworkPolicy, both tiers, mixed priorities:
//! cluster-wide DNS and monitoring exceptions, blocked networks, node access, one
//! "pass within the tenant, deny the rest" policy per tenant, policies that select groups
//! of namespaces, named ports, a Baseline tier of defaults). Measures, in one run on one
//! machine:
//!
//! - compile time of n1's ruleset (pure, in process; median of 5);
//! - `nft -f` time of that ruleset in a throw-away lab node (median of 5 replacements);
//! - `twill-policy apply` end to end (read the manifests, compile, nft) and its peak RSS;
//! - p99 of "policy change -> enforced": `twill-policy run --poll-ms 100` on the node, 20
//!   policy files rewritten one after the other, time from the rename to the daemon's
//!   "applied ruleset" log line (printed after nft returns);
//! - the same p99 for changes to cluster policies (policies over groups of namespaces, one
//!   after the other: every rule's action flipped, the priority moved by 500; a change
//!   that would leave n1's ruleset as it was is skipped for the next policy);
//! - pod-to-pod TCP throughput (iperf3, two pods on n1's bridge, both selected by
//!   policies) with the ruleset against the same node without it (both with Flannel's
//!   masquerade tables, as twilld installs them in nftables mode), and against a node with no
//!   table at all;
//! - new TCP connections per second between the same pods, in the same three arms;
//! - p99 of "policy change -> the established flow is cut" (strict mode, the default):
//!   after the throughput arms (whose connections leave ~10^5 TIME_WAIT entries in the
//!   node's conntrack table for the pass to judge), a fresh `twill-policy run`; per round,
//!   the server's policy admits the client on port 5401, the client opens a TCP connection
//!   there and exchanges a byte every 2 ms, the port is removed from the policy, and the
//!   time from the rename to the send of the first byte that gets no answer is taken.
//!
//! Prints markdown rows in the format of `twill_bench::table_row`. Needs root and a
//! release build: `cargo build --release -p twill-policy -p twill-bench &&
//! target/release/policy_scale`.
//!
//! Usage: policy_scale [--pods N] [--policies N] [--namespaces N] [--changes N] [--seconds S]
//! [--rounds N (throughput rounds, default 5)] [--cuts N (flow-cut rounds, default 20)]
//! [--cluster-policies N (default 100; 0 leaves them out)]
//! Internal (run inside lab pods): policy_scale conn-server PORT | conn-client IP PORT SECONDS
//! | echo-server PORT | flow-client IP PORT

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use twill_bench::{median, ms, percentile, table_row};
use twill_lab::Lab;
use twill_nft::{Nft, NftRunner};
use twill_policy::compile::{compile, Options};
use twill_policy::enforce::ruleset_marker;
use twill_policy::model::cluster::cluster_policy_from_value;
use twill_policy::source::manifests::ManifestDir;
use twill_policy::source::Source;

const PODS_PER_NODE: usize = 100;
const IPERF_PORT: u16 = 5201;
const CONN_PORT: u16 = 5301;
/// The port of the long-lived flow that a policy change cuts.
const CUT_PORT: u16 = 5401;

struct Scale {
    pods: usize,
    policies: usize,
    namespaces: usize,
    changes: usize,
    seconds: u64,
    /// Throughput / connection-rate rounds (with and without the table), median taken.
    rounds: usize,
    /// Flow-cut rounds (policy change -> established flow cut).
    cuts: usize,
    /// ClusterNetworkPolicies on top of the NetworkPolicies (at least 16 unless 0: the
    /// cluster-wide ones and one per tenant come first).
    cluster_policies: usize,
}

/// Pod `p`: namespace `p % NS`, app `a<(p / NS) % 10>`, node `(p % NS + 13 * (p / NS)) %
/// nodes + 1` (13 is coprime to 100: each namespace has one pod on every node), address
/// 10.244.<node>.<2 + index on the node>.
struct Gen {
    ns: usize,
    nodes: usize,
}

impl Gen {
    fn node_of(&self, p: usize) -> usize {
        (p % self.ns + 13 * (p / self.ns)) % self.nodes + 1
    }
}

struct World {
    namespaces: Value,
    pods: Value,
    /// Per namespace: its policies.
    policies: Vec<Vec<Value>>,
    /// ClusterNetworkPolicies, in one file.
    cluster: Vec<Value>,
    /// Node objects (for the cluster policies' nodes peers).
    nodes: Value,
    client: (String, String, String),
    server: (String, String, String),
}

fn ns_name(i: usize) -> String {
    format!("ns{i:03}")
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

fn generate(s: &Scale) -> World {
    let g = Gen {
        ns: s.namespaces,
        nodes: s.pods.div_ceil(PODS_PER_NODE),
    };
    assert!(g.nodes <= 250, "at most 250 nodes (10.244.<node>.0/24)");
    let namespaces: Vec<Value> = (0..s.namespaces)
        .map(|i| {
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns_name(i),
                "labels": {"team": format!("t{}", i % 10), "tier": if i % 3 == 0 {"prod"} else {"dev"}}}})
        })
        .collect();
    let mut on_node = vec![0usize; g.nodes + 1];
    let mut pods = Vec::new();
    let (mut client, mut server) = (None, None);
    for p in 0..s.pods {
        let node = g.node_of(p);
        let idx = on_node[node];
        on_node[node] += 1;
        assert!(idx < 250);
        let ip = format!("10.244.{node}.{}", idx + 2);
        let ns = ns_name(p % s.namespaces);
        let name = format!("pod{p:05}");
        let mut labels =
            json!({"app": format!("a{}", (p / s.namespaces) % 10), "v": format!("{}", p % 3)});
        if node == 1 && idx == 0 {
            labels["bench"] = json!("client");
            client = Some((ns.clone(), name.clone(), ip.clone()));
        } else if node == 1 && idx == 1 {
            labels["bench"] = json!("server");
            server = Some((ns.clone(), name.clone(), ip.clone()));
        }
        pods.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": format!("n{node}"), "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090},
                {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]}}));
    }
    let client = client.expect("client pod");
    let server = server.expect("server pod");
    let per_ns = s.policies / s.namespaces;
    let mut policies = vec![Vec::new(); s.namespaces];
    for (i, list) in policies.iter_mut().enumerate() {
        let ns = ns_name(i);
        for j in 0..per_ns {
            let app = format!("a{}", j % 10);
            let spec = match j % 10 {
                0 => json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
                1..=5 => json!({"podSelector": {"matchLabels": {"app": app}},
                    "ingress": [
                        {"from": [{"podSelector": {"matchLabels": {"app": format!("a{}", (j + 1) % 10)}}}],
                         "ports": [{"port": 8080}, {"port": "metrics"}]},
                        {"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", (i + j) % 10)}},
                                   "podSelector": {"matchExpressions": [{"key": "v", "operator": "In", "values": ["0", "1"]}]}}],
                         "ports": [{"port": "http"}]}]}),
                6 => json!({"podSelector": {"matchLabels": {"app": app}},
                    "ingress": [{"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": [format!("192.168.{}.0/24", i % 256)]}}],
                                 "ports": [{"port": 8000, "endPort": 8100}]}]}),
                7 => {
                    json!({"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Egress"],
                    "egress": [
                        {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "a1"}}}], "ports": [{"port": 8080}]},
                        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.0.0/16"]}}], "ports": [{"port": 53, "protocol": "UDP"}]},
                        {"ports": [{"port": "dns", "protocol": "UDP"}]}]})
                }
                8 => json!({"podSelector": {"matchLabels": {"app": app}},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"tier": "prod"}}}], "ports": [{"port": 9090}]}]}),
                _ => {
                    json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": [app]}]},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"v": "2"}}}]}]})
                }
            };
            list.push(policy(&ns, &format!("p{j}"), spec));
        }
    }
    // Two of the 1000 are the benchmark's own: the server accepts the client on the
    // benchmark ports, the client may send there (in case an egress policy selects it).
    let si: usize = server.0[2..].parse().unwrap();
    let ci: usize = client.0[2..].parse().unwrap();
    policies[si][per_ns - 1] = policy(
        &server.0,
        &format!("p{}", per_ns - 1),
        json!({"podSelector": {"matchLabels": {"bench": "server"}},
            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"bench": "client"}}}],
                         "ports": [{"port": IPERF_PORT}, {"port": CONN_PORT}, {"port": CUT_PORT}]}]}),
    );
    let k = if ci == si { per_ns - 2 } else { per_ns - 1 };
    policies[ci][k] = policy(
        &client.0,
        &format!("p{k}"),
        json!({"podSelector": {"matchLabels": {"bench": "client"}}, "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"v": "1"}}}]}],
            "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"bench": "server"}}}],
                        "ports": [{"port": IPERF_PORT}, {"port": CONN_PORT}, {"port": CUT_PORT}]}]}),
    );
    let nodes: Vec<Value> = (1..=g.nodes)
        .map(|k| {
            json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": format!("n{k}"), "labels": {"kubernetes.io/os": "linux",
                    "topology.kubernetes.io/zone": format!("z{}", k % 3)}},
                "status": {"addresses": [
                    {"type": "InternalIP", "address": format!("198.19.{}.{}", k / 250, k % 250 + 1)},
                    {"type": "Hostname", "address": format!("n{k}")}]}})
        })
        .collect();
    World {
        namespaces: json!({"apiVersion": "v1", "kind": "List", "items": namespaces}),
        pods: json!({"apiVersion": "v1", "kind": "List", "items": pods}),
        policies,
        cluster: cluster_policies(s.cluster_policies),
        nodes: json!({"apiVersion": "v1", "kind": "List", "items": nodes}),
        client,
        server,
    }
}

fn cnp(name: &str, tier: &str, priority: usize, spec: Value) -> Value {
    let mut spec = spec;
    spec["tier"] = json!(tier);
    spec["priority"] = json!(priority);
    json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
           "metadata": {"name": name}, "spec": spec})
}

/// One timed cluster policy change: every rule's action flipped (Deny to Accept, Accept
/// and Pass to Deny) and the priority moved by half the range.
fn flip(policy: &mut Value) {
    for direction in ["ingress", "egress"] {
        if let Some(rules) = policy["spec"][direction].as_array_mut() {
            for rule in rules {
                let flipped = if rule["action"] == "Deny" {
                    "Accept"
                } else {
                    "Deny"
                };
                rule["action"] = json!(flipped);
            }
        }
    }
    let prio = policy["spec"]["priority"].as_u64().unwrap_or(0);
    policy["spec"]["priority"] = json!((prio + 500) % 1000);
}

/// The first cluster policy of the "group" kind, whose changes the benchmark times.
const FIRST_GROUP_POLICY: usize = 15;

/// `n` ClusterNetworkPolicies in the shapes a cluster admin writes (tenants are the 10
/// `team` labels of the namespaces): five cluster-wide ones (DNS, monitoring, blocked
/// networks, node access, the benchmark pair's exception), one per tenant ("pass within
/// the tenant, deny other tenants"), then, in turn, policies over groups of namespaces
/// (port ranges, networks), named-port ones over pods, and Baseline defaults.
fn cluster_policies(n: usize) -> Vec<Value> {
    if n == 0 {
        return Vec::new();
    }
    assert!(
        n > FIRST_GROUP_POLICY,
        "--cluster-policies: 0 or more than {FIRST_GROUP_POLICY}"
    );
    let all = json!({"namespaces": {}});
    let tcp = |port: u16| json!({"tcp": {"destinationPort": {"number": port}}});
    let bench_ports = json!([tcp(IPERF_PORT), tcp(CONN_PORT)]);
    let mut out = vec![
        cnp(
            "cluster-dns",
            "Admin",
            1,
            json!({"subject": all,
            "egress": [{"name": "dns", "action": "Accept",
                "to": [{"pods": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns000"}},
                                 "podSelector": {"matchLabels": {"app": "a0"}}}}],
                "protocols": [{"udp": {"destinationPort": {"number": 53}}}, {"tcp": {"destinationPort": {"number": 53}}}]}]}),
        ),
        cnp(
            "monitoring",
            "Admin",
            2,
            json!({"subject": all,
            "ingress": [{"name": "scrape", "action": "Accept",
                "from": [{"pods": {"namespaceSelector": {"matchLabels": {"tier": "prod"}},
                                   "podSelector": {"matchLabels": {"app": "a8"}}}}],
                "protocols": [{"destinationNamedPort": "metrics"}]}]}),
        ),
        cnp(
            "blocked-networks",
            "Admin",
            3,
            json!({"subject": all,
            "egress": [{"name": "documentation-ranges", "action": "Deny",
                "to": [{"networks": ["203.0.113.0/24", "198.51.100.0/24", "2001:db8::/32"]}]}]}),
        ),
        cnp(
            "node-access",
            "Admin",
            4,
            json!({"subject": all,
            "egress": [{"name": "kubelet", "action": "Accept",
                        "to": [{"nodes": {"matchLabels": {"kubernetes.io/os": "linux"}}}],
                        "protocols": [{"tcp": {"destinationPort": {"number": 10250}}}]},
                       {"name": "no-other-node-ports", "action": "Deny",
                        "to": [{"nodes": {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "Exists"}]}}]}]}),
        ),
        // The benchmark's own traffic crosses tenants: an admin exception, after the
        // cluster-wide rules above have been looked at. The port of the flow that a
        // NetworkPolicy change cuts is passed on to NetworkPolicy, which decides it.
        cnp(
            "bench-pair",
            "Admin",
            20,
            json!({"subject": {"pods": {"namespaceSelector": {},
                "podSelector": {"matchExpressions": [{"key": "bench", "operator": "Exists"}]}}},
            "ingress": [{"name": "from-client", "action": "Accept",
                         "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"bench": "client"}}}}],
                         "protocols": bench_ports},
                        {"name": "cut-port-to-networkpolicy", "action": "Pass",
                         "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"bench": "client"}}}}],
                         "protocols": [tcp(CUT_PORT)]}],
            "egress": [{"name": "to-server", "action": "Accept",
                        "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"bench": "server"}}}}],
                        "protocols": bench_ports},
                       {"name": "cut-port-to-networkpolicy", "action": "Pass",
                        "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"bench": "server"}}}}],
                        "protocols": [tcp(CUT_PORT)]}]}),
        ),
    ];
    for t in 0..10 {
        let team = json!({"matchLabels": {"team": format!("t{t}")}});
        out.push(cnp(&format!("tenant-t{t}"), "Admin", 100 + t, json!({"subject": {"namespaces": team},
            "ingress": [{"name": "pass-within-tenant", "action": "Pass", "from": [{"namespaces": team}]},
                        {"name": "deny-other-tenants", "action": "Deny", "from": [{"namespaces": {}}]}],
            "egress": [{"name": "pass-within-tenant", "action": "Pass", "to": [{"namespaces": team}]},
                       {"name": "deny-other-tenants", "action": "Deny", "to": [{"namespaces": {}}]}]})));
    }
    let mut i = out.len();
    while out.len() < n {
        let (a, b) = (i % 10, (i * 3 + 1) % 10);
        let group = json!({"matchExpressions": [
            {"key": "team", "operator": "In", "values": [format!("t{a}"), format!("t{b}")]},
            {"key": "tier", "operator": "In", "values": [if i % 2 == 0 {"dev"} else {"prod"}]}]});
        let p = match i % 5 {
            // Groups of namespaces: priorities interleaved with the tenant policies.
            0 | 1 => cnp(
                &format!("group-{i}"),
                "Admin",
                50 + (i * 37) % 150,
                json!({"subject": {"namespaces": group},
                "ingress": [{"name": "no-nodeports-from-prod-a9", "action": "Deny",
                    "from": [{"pods": {"namespaceSelector": {"matchLabels": {"tier": "prod"}},
                                       "podSelector": {"matchLabels": {"app": "a9"}}}}],
                    "protocols": [{"tcp": {"destinationPort": {"range": {"start": 30000, "end": 32767}}}}]}],
                "egress": [{"name": "pass-https-to-private", "action": "Pass",
                    "to": [{"networks": [format!("10.{}.0.0/16", i % 200), "172.16.0.0/12"]}],
                    "protocols": [{"tcp": {"destinationPort": {"number": 443}}}]}]}),
            ),
            // Named ports over pods of a group.
            2 => cnp(
                &format!("named-{i}"),
                "Admin",
                300 + i % 100,
                json!({"subject": {"pods": {"namespaceSelector": group,
                    "podSelector": {"matchLabels": {"app": format!("a{}", i % 10)}}}},
                "ingress": [{"name": "http-from-neighbours", "action": "Accept",
                    "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": format!("a{}", (i + 1) % 10)}}}}],
                    "protocols": [{"destinationNamedPort": "http"}]}]}),
            ),
            // Baseline defaults: apply where no NetworkPolicy decides.
            _ => cnp(
                &format!("baseline-{i}"),
                "Baseline",
                i % 1000,
                json!({"subject": {"namespaces": group},
                "ingress": [{"name": "deny-from-dev", "action": "Deny",
                    "from": [{"namespaces": {"matchLabels": {"tier": "dev"}}}]}],
                "egress": [{"name": "deny-to-home-networks", "action": "Deny",
                    "to": [{"networks": ["192.168.0.0/16"]}, {"nodes": {"matchLabels": {"topology.kubernetes.io/zone": format!("z{}", i % 3)}}}]}]}),
            ),
        };
        out.push(p);
        i += 1;
    }
    out
}

fn write_atomic(path: &Path, v: &Value) -> Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, serde_json::to_vec(v)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn policies_file(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("policies-{}.json", ns_name(i)))
}

fn list(items: &[Value]) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

fn cluster_file(dir: &Path) -> PathBuf {
    dir.join("cluster-policies.json")
}

fn write_world(dir: &Path, w: &World) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    write_atomic(&dir.join("namespaces.json"), &w.namespaces)?;
    write_atomic(&dir.join("pods.json"), &w.pods)?;
    write_atomic(&dir.join("nodes.json"), &w.nodes)?;
    write_atomic(&cluster_file(dir), &list(&w.cluster))?;
    for (i, p) in w.policies.iter().enumerate() {
        write_atomic(&policies_file(dir, i), &list(p))?;
    }
    Ok(())
}

/// `script` run by a shell inside `netns` through `ip netns exec`.
fn nft_in(lab: &Lab, netns: &str) -> Result<Nft> {
    let wrapper = lab.dir().join(format!("nft-{netns}"));
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec ip netns exec {netns} nft \"$@\"\n"),
    )?;
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    Ok(Nft {
        bin: wrapper,
        timeout: Duration::from_secs(120),
    })
}

fn policy_bin() -> PathBuf {
    twill_lab::bin_path("twill-policy")
}

/// Runs argv in `netns` under a Python wrapper reporting the child's peak RSS (KiB).
fn run_with_maxrss(lab: &Lab, netns: &str, argv: &[&str]) -> Result<(Duration, u64, String)> {
    const WRAP: &str = "import resource, subprocess, sys\nr = subprocess.run(sys.argv[1:], stderr=subprocess.PIPE, text=True)\nsys.stderr.write(r.stderr)\nprint(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\nsys.exit(r.returncode)";
    let mut full = vec!["/usr/bin/python3", "-c", WRAP];
    full.extend_from_slice(argv);
    let start = Instant::now();
    let out = lab.exec(netns, &full)?;
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        bail!("{argv:?} failed: {stderr}");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let kib = stdout.lines().last().unwrap_or("").trim().parse()?;
    Ok((took, kib, stderr))
}

fn iperf(lab: &Lab, client_ns: &str, server_ip: &str, secs: u64) -> Result<f64> {
    let out = lab.exec_ok(
        client_ns,
        &[
            "iperf3",
            "-c",
            server_ip,
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ],
    )?;
    let v: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second")
}

fn conn_rate(lab: &Lab, client_ns: &str, server_ip: &str, secs: u64) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let out = lab.exec_ok(
        client_ns,
        &[
            exe.to_str().unwrap(),
            "conn-client",
            server_ip,
            &CONN_PORT.to_string(),
            &secs.to_string(),
        ],
    )?;
    Ok(out.trim().parse::<f64>()? / secs as f64)
}

fn conn_server(port: u16) -> Result<()> {
    let l = TcpListener::bind(("0.0.0.0", port))?;
    for c in l.incoming() {
        drop(c);
    }
    Ok(())
}

/// Connects and closes in a loop on 2 threads for `secs`; prints the number of
/// connections that completed.
fn conn_client(ip: &str, port: u16, secs: u64) -> Result<()> {
    let addr: SocketAddr = format!("{ip}:{port}").parse()?;
    let end = Instant::now() + Duration::from_secs(secs);
    let threads: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < end {
                    if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                        // Wait for the server's close so the server side is done too.
                        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                        let mut b = [0u8; 1];
                        let _ = s.read(&mut b);
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    println!("{total}");
    Ok(())
}

/// TCP echo on `port`, one thread per connection.
fn echo_server(port: u16) -> Result<()> {
    let l = TcpListener::bind(("0.0.0.0", port))?;
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        std::thread::spawn(move || {
            let mut b = [0u8; 64];
            while let Ok(n @ 1..) = c.read(&mut b) {
                if c.write_all(&b[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Opens one TCP connection, prints `connected`, then sends a byte every 2 ms and waits
/// for its echo; when one gets no answer in 2 s, prints `cut <send time, ns since the
/// epoch>` and exits.
fn flow_client(ip: &str, port: u16) -> Result<()> {
    let addr: SocketAddr = format!("{ip}:{port}").parse()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    println!("connected");
    std::io::stdout().flush()?;
    let mut b = [0u8; 1];
    loop {
        let sent = unix_ns();
        let answered = s.write_all(b"p").is_ok() && matches!(s.read(&mut b), Ok(1));
        if !answered {
            println!("cut {sent}");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("conn-server") => return conn_server(args[2].parse()?),
        Some("conn-client") => return conn_client(&args[2], args[3].parse()?, args[4].parse()?),
        Some("echo-server") => return echo_server(args[2].parse()?),
        Some("flow-client") => return flow_client(&args[2], args[3].parse()?),
        _ => {}
    }
    let mut s = Scale {
        pods: 10_000,
        policies: 1000,
        namespaces: 100,
        changes: 20,
        seconds: 5,
        rounds: 5,
        cuts: 20,
        cluster_policies: 100,
    };
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let v: usize = it
            .next()
            .with_context(|| format!("{a} needs a value"))?
            .parse()?;
        match a.as_str() {
            "--pods" => s.pods = v,
            "--policies" => s.policies = v,
            "--namespaces" => s.namespaces = v,
            "--changes" => s.changes = v,
            "--seconds" => s.seconds = v as u64,
            "--rounds" => s.rounds = v.max(1),
            "--cuts" => s.cuts = v.max(1),
            "--cluster-policies" => s.cluster_policies = v,
            _ => bail!("unknown argument {a}"),
        }
    }
    if !twill_lab::require_root() {
        bail!("needs root (lab namespaces)");
    }
    let bin = policy_bin();
    if !bin.exists() {
        bail!(
            "{} missing: cargo build --release -p twill-policy",
            bin.display()
        );
    }
    let mut lab = Lab::new("polscale")?;
    let dir = lab.dir().join("manifests");
    let w = generate(&s);
    write_world(&dir, &w)?;

    // Source read + compile, in process.
    let t = Instant::now();
    let snap = ManifestDir::new(&dir)
        .snapshot()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let read = t.elapsed();
    if snap.cluster_policies.len() != w.cluster.len() || !snap.broken_cluster.is_empty() {
        bail!(
            "{} of {} cluster policies read: {:?}",
            snap.cluster_policies.len(),
            w.cluster.len(),
            snap.broken_cluster
        );
    }
    let opts = Options::default();
    let mut compiles = Vec::new();
    let mut rs = compile(&snap, "n1", &opts);
    for _ in 0..5 {
        let t = Instant::now();
        rs = compile(&snap, "n1", &opts);
        let _ = rs.render();
        compiles.push(ms(t.elapsed()));
    }
    let stats = rs.stats();
    let script = twill_policy::enforce::mark(&rs.render(), &opts.table);
    let compile_ms = median(compiles);
    eprintln!(
        "world: {} pods, {} policies, {} cluster policies, {} nodes, {} namespaces; read {:?}; n1 ruleset: {stats:?}; script {} KiB; bench VmHWM {} MiB",
        snap.pods.len(),
        snap.policies.len(),
        snap.cluster_policies.len(),
        snap.nodes.len(),
        snap.namespaces.len(),
        read,
        script.len() / 1024,
        vm_hwm_kib() / 1024
    );

    // The node and two pods on its bridge.
    let node = lab.add_node("n1")?;
    let c = lab.add_manual_pod("n1", "c", format!("{}/24", w.client.2).parse()?)?;
    let sv = lab.add_manual_pod("n1", "s", format!("{}/24", w.server.2).parse()?)?;
    eprintln!(
        "client {}/{} {}, server {}/{} {}",
        w.client.0, w.client.1, w.client.2, w.server.0, w.server.1, w.server.2
    );

    // `twill-policy <cmd>` on the node's manifests, timed, with its peak RSS.
    let run_policy = |cmd: &str| {
        run_with_maxrss(
            &lab,
            &node.netns,
            &[
                bin.to_str().unwrap(),
                "--manifests",
                dir.to_str().unwrap(),
                "--node-name",
                "n1",
                cmd,
            ],
        )
    };
    // End to end through the binary (also turns on bridge-nf-call-iptables in the node).
    let (e2e, rss_kib, log) = run_policy("apply")?;
    eprintln!(
        "twill-policy apply: {e2e:?}, peak RSS {} MiB; {}",
        rss_kib / 1024,
        log.lines().last().unwrap_or("")
    );

    // The daemon's own memory: compile only (the apply above includes the nft child).
    let (_, compile_rss_kib, _) = run_policy("compile")?;

    // nft apply alone.
    let nft = nft_in(&lab, &node.netns)?;
    let mut applies = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        nft.apply(&script)?;
        applies.push(ms(t.elapsed()));
    }
    let apply_ms = median(applies);

    // Policy change -> enforced, with the daemon.
    let id = lab.spawn(
        &node.netns,
        "twill-policy",
        &[
            bin.to_str().unwrap(),
            "--manifests",
            dir.to_str().unwrap(),
            "--node-name",
            "n1",
            "run",
            "--poll-ms",
            "100",
        ],
        &[("RUST_LOG", "info,twill_policy=debug")],
    )?;
    let applied = |lab: &Lab| lab.log(id).matches("applied ruleset").count();
    let deadline = Instant::now() + Duration::from_secs(120);
    while applied(&lab) == 0 && !lab.log(id).contains("twill-policy running") {
        if Instant::now() > deadline {
            bail!("twill-policy run did not start: {}", lab.log(id));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its first sync: the table is already this one (same script), so it may say nothing;
    // give it a moment.
    std::thread::sleep(Duration::from_secs(2));
    let mut lat = Vec::new();
    let mut policies = w.policies.clone();
    for i in 0..s.changes {
        let nsi = (i * 7) % s.namespaces;
        // Toggle the namespace's default-deny policy between deny-all and one ipBlock.
        let open = policies[nsi][0]["spec"].get("ingress").is_none();
        policies[nsi][0]["spec"] = if open {
            json!({"podSelector": {}, "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"ipBlock": {"cidr": format!("203.0.113.{}/32", i % 250)}}]}]})
        } else {
            json!({"podSelector": {}, "policyTypes": ["Ingress"]})
        };
        let before = applied(&lab);
        let t = Instant::now();
        write_atomic(&policies_file(&dir, nsi), &list(&policies[nsi]))?;
        loop {
            if applied(&lab) > before {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("change {i} not applied in 60 s: {}", lab.log(id));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        lat.push(ms(t.elapsed()));
        std::thread::sleep(Duration::from_millis(200));
    }
    // Cluster policy change -> enforced: policies over groups of namespaces (each of
    // which has a pod on n1) one after the other, each changed by `flip`. A change that
    // leaves n1's ruleset as it was (checked in process, outside the timing) is skipped
    // for the next policy: every timed change is one n1 has to apply.
    let mut cluster = w.cluster.clone();
    let mut cluster_lat = Vec::new();
    let over_namespaces: Vec<usize> = (FIRST_GROUP_POLICY..cluster.len())
        .filter(|&j| cluster[j]["spec"]["subject"].get("namespaces").is_some())
        .collect();
    let n1_marker = |cluster: &[Value]| -> Result<String> {
        let parsed = cluster
            .iter()
            .map(|v| cluster_policy_from_value(v.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let snap = snap.clone().with_cluster_policies(parsed);
        Ok(ruleset_marker(&compile(&snap, "n1", &opts).render()))
    };
    let mut marker = n1_marker(&cluster)?;
    let mut next = 0;
    let changes = if over_namespaces.is_empty() {
        0
    } else {
        s.changes
    };
    for i in 0..changes {
        let mut tried = 0;
        loop {
            let j = over_namespaces[(next * 7) % over_namespaces.len()];
            next += 1;
            let mut changed = cluster.clone();
            flip(&mut changed[j]);
            let m = n1_marker(&changed)?;
            if m != marker {
                (cluster, marker) = (changed, m);
                break;
            }
            tried += 1;
            if tried == over_namespaces.len() {
                bail!("no cluster policy change alters n1's ruleset");
            }
        }
        let before = applied(&lab);
        let t = Instant::now();
        write_atomic(&cluster_file(&dir), &list(&cluster))?;
        loop {
            if applied(&lab) > before {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!(
                    "cluster policy change {i} not applied in 60 s: {}",
                    lab.log(id)
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        cluster_lat.push(ms(t.elapsed()));
        std::thread::sleep(Duration::from_millis(200));
    }
    // The kernel holds exactly the last state.
    let snap2 = ManifestDir::new(&dir)
        .snapshot()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let marker = ruleset_marker(&compile(&snap2, "n1", &opts).render());
    let listed = nft.run(&["list", "table", "inet", "twill-policy"], "")?;
    if !listed.contains(&marker) {
        bail!("the table does not hold the last change ({marker})");
    }
    // The daemon's own account of each sync (compile + nft) and source read.
    for l in lab.log(id).lines() {
        if l.contains("applied ruleset") || l.contains("read the source") || l.contains("sync: ") {
            eprintln!("daemon: {}", l.trim());
        }
    }
    lab.stop(id, Duration::from_secs(3))?;
    let p99 = percentile(lat.clone(), 99.0);
    let p50 = median(lat.clone());
    let cluster_p99 = (!cluster_lat.is_empty()).then(|| {
        (
            percentile(cluster_lat.clone(), 99.0),
            median(cluster_lat.clone()),
        )
    });

    // Throughput and connection rate, with the ruleset and without any table.
    let srv = lab.spawn(
        &sv.netns,
        "iperf3",
        &["iperf3", "-s", "-p", &IPERF_PORT.to_string()],
        &[],
    )?;
    let exe = std::env::current_exe()?;
    let csrv = lab.spawn(
        &sv.netns,
        "conn-server",
        &[exe.to_str().unwrap(), "conn-server", &CONN_PORT.to_string()],
        &[],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let server_ip = w.server.2.clone();
    // Three arms, interleaved per round: the policy table on a node as twilld leaves it
    // (Flannel's masquerade and forward tables in nftables mode, kube-flannel.yml's
    // --ip-masq), that node
    // without the policy table (the peer of the target), and the bare node without any
    // nftables table. Flannel's NAT chain switches conntrack on for every packet, as
    // kube-proxy does on any Kubernetes node; the bare arm shows that cost on its own.
    let flannel = twill::masq::ruleset(&twill::masq::MasqInput {
        network: "10.244.0.0/16".parse()?,
        subnet: "10.244.1.0/24".parse()?,
        masquerade: true,
        fully_random: true,
        forward: true,
    });
    let no_flannel = "add table ip flannel-ipv4\ndelete table ip flannel-ipv4\n";
    let no_policy = twill_policy::compile::render_delete(&opts.table);
    let mut with = (Vec::new(), Vec::new());
    let mut flannel_only = (Vec::new(), Vec::new());
    let mut bare = (Vec::new(), Vec::new());
    for round in 0..s.rounds {
        for (arm, setup) in [
            (&mut with, [flannel.as_str(), script.as_str()]),
            (&mut flannel_only, [flannel.as_str(), no_policy.as_str()]),
            (&mut bare, [no_flannel, no_policy.as_str()]),
        ] {
            for step in setup {
                nft.apply(step)?;
            }
            arm.0.push(iperf(&lab, &c.netns, &server_ip, s.seconds)?);
            arm.1.push(conn_rate(&lab, &c.netns, &server_ip, 3)?);
        }
        eprintln!(
            "round {round}: policy+flannel {:.2} Gbit/s {:.0} conn/s; flannel only {:.2} Gbit/s {:.0} conn/s; no tables {:.2} Gbit/s {:.0} conn/s",
            with.0[round] / 1e9,
            with.1[round],
            flannel_only.0[round] / 1e9,
            flannel_only.1[round],
            bare.0[round] / 1e9,
            bare.1[round]
        );
    }
    // A denied flow really is denied with the table (the client is isolated for egress).
    nft.apply(&script)?;
    let denied = lab
        .exec(
            &c.netns,
            &[
                "iperf3",
                "-c",
                &server_ip,
                "-p",
                "8080",
                "-t",
                "1",
                "--connect-timeout",
                "1000",
            ],
        )?
        .status
        .success();
    if denied {
        bail!("client -> server:8080 got through although no policy allows it");
    }
    lab.stop(srv, Duration::from_secs(2))?;
    lab.stop(csrv, Duration::from_secs(2))?;

    // Policy change -> the established flow is cut (strict mode, on by default), with the
    // conntrack table full of the connections the arms above left in TIME_WAIT.
    let esrv = lab.spawn(
        &sv.netns,
        "echo-server",
        &[exe.to_str().unwrap(), "echo-server", &CUT_PORT.to_string()],
        &[],
    )?;
    let id = lab.spawn(
        &node.netns,
        "twill-policy-strict",
        &[
            bin.to_str().unwrap(),
            "--manifests",
            dir.to_str().unwrap(),
            "--node-name",
            "n1",
            "run",
            "--poll-ms",
            "100",
        ],
        &[],
    )?;
    let passes = |lab: &Lab| lab.log(id).matches("conntrack: cut").count();
    let deadline = Instant::now() + Duration::from_secs(120);
    while passes(&lab) == 0 {
        if Instant::now() > deadline {
            bail!("twill-policy run (strict) never synced: {}", lab.log(id));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let si: usize = w.server.0[2..].parse()?;
    let per_ns = s.policies / s.namespaces;
    let server_policy = |ports: Value| {
        let mut p = policies[si].clone();
        p[per_ns - 1]["spec"]["ingress"][0]["ports"] = ports;
        list(&p)
    };
    let open =
        server_policy(json!([{"port": IPERF_PORT}, {"port": CONN_PORT}, {"port": CUT_PORT}]));
    let tight = server_policy(json!([{"port": IPERF_PORT}, {"port": CONN_PORT}]));
    let mut cuts = Vec::new();
    for round in 0..s.cuts {
        if round > 0 {
            let before = passes(&lab);
            write_atomic(&policies_file(&dir, si), &open)?;
            let t = Instant::now();
            while passes(&lab) == before {
                if t.elapsed() > Duration::from_secs(60) {
                    bail!("reopening not applied in 60 s: {}", lab.log(id));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let name = format!("flow-client-{round}");
        let fc = lab.spawn(
            &c.netns,
            &name,
            &[
                exe.to_str().unwrap(),
                "flow-client",
                &server_ip,
                &CUT_PORT.to_string(),
            ],
            &[],
        )?;
        let t = Instant::now();
        while !lab.log(fc).contains("connected") {
            if t.elapsed() > Duration::from_secs(30) || lab.log(fc).contains("cut ") {
                bail!("the flow to be cut never worked: {}", lab.log(fc));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
        let changed = unix_ns();
        write_atomic(&policies_file(&dir, si), &tight)?;
        let cut_at = loop {
            if let Some(ns) = lab
                .log(fc)
                .lines()
                .find_map(|l| l.strip_prefix("cut ")?.trim().parse::<u128>().ok())
            {
                break ns;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!(
                    "round {round}: the flow was not cut in 60 s: {}",
                    lab.log(id)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if cut_at < changed {
            bail!("round {round}: the flow stopped before the policy changed");
        }
        cuts.push((cut_at - changed) as f64 / 1e6);
        lab.stop(fc, Duration::from_secs(2))?;
    }
    // The daemon's account of its conntrack passes (entries judged, cut, duration).
    for l in lab.log(id).lines().filter(|l| l.contains("conntrack: ")) {
        eprintln!("daemon (strict): {}", l.trim());
    }
    lab.stop(id, Duration::from_secs(3))?;
    lab.stop(esrv, Duration::from_secs(2))?;
    let cut_p99 = percentile(cuts.clone(), 99.0);
    let cut_p50 = median(cuts.clone());
    // The target ratios are medians of per-round ratios: the arms of one round run back to
    // back, so a round's ratio is not moved by the machine's speed drifting between rounds.
    let per_round = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(x, y)| x / y).collect());
    let (t_ratio, c_ratio) = (
        per_round(&with.0, &flannel_only.0),
        per_round(&with.1, &flannel_only.1),
    );
    let (tw, tn, tb) = (
        median(with.0) / 1e9,
        median(flannel_only.0) / 1e9,
        median(bare.0) / 1e9,
    );
    let (cw, cn, cb) = (median(with.1), median(flannel_only.1), median(bare.1));

    let scale = format!(
        "{}k pods / {} policies / {} cluster policies / {} ns",
        s.pods / 1000,
        s.policies,
        s.cluster_policies,
        s.namespaces
    );
    // Rows only, as every benchmark prints them: bench/run.sh writes the one header above all.
    println!(
        "{}",
        table_row(
            &format!(
                "policy compile, {scale} (node n1: {} chains, {} rules, {} set elements)",
                stats.chains, stats.rules, stats.set_elements
            ),
            &format!("{compile_ms:.0} ms"),
            "limit 1000 ms",
            compile_ms / 1000.0,
            "< 1",
            compile_ms < 1000.0
        )
    );
    println!(
        "{}",
        table_row(
            &format!("policy nft apply, {scale} (one transaction)"),
            &format!("{apply_ms:.0} ms"),
            "limit 1000 ms",
            apply_ms / 1000.0,
            "< 1",
            apply_ms < 1000.0
        )
    );
    println!(
        "{}",
        table_row(
            &format!("twill-policy apply end to end (read manifests + compile + nft), {scale}"),
            &format!("{:.0} ms", ms(e2e)),
            "limit 1000 ms",
            ms(e2e) / 1000.0,
            "< 1",
            ms(e2e) < 1000.0
        )
    );
    let rss_mib = compile_rss_kib as f64 / 1024.0;
    println!(
        "{}",
        table_row(
            &format!(
                "twill-policy peak RSS (read + compile), {scale}; with the nft child: {} MiB",
                rss_kib / 1024
            ),
            &format!("{rss_mib:.0} MiB"),
            "flannel manifest limit 50 MiB",
            rss_mib / 50.0,
            "< 1",
            rss_mib < 50.0
        )
    );
    println!(
        "{}",
        table_row(
            &format!(
                "policy change -> enforced, p99 of {} (manifests, --poll-ms 100), {scale}",
                s.changes
            ),
            &format!("{p99:.0} ms (p50 {p50:.0})"),
            "limit 1000 ms",
            p99 / 1000.0,
            "< 1",
            p99 < 1000.0
        )
    );
    if let Some((cp99, cp50)) = cluster_p99 {
        println!(
            "{}",
            table_row(
                &format!(
                    "cluster policy change -> enforced, p99 of {} (manifests, --poll-ms 100), {scale}",
                    s.changes
                ),
                &format!("{cp99:.0} ms (p50 {cp50:.0})"),
                "limit 1000 ms",
                cp99 / 1000.0,
                "< 1",
                cp99 < 1000.0
            )
        );
    }
    println!(
        "{}",
        table_row(
            &format!(
                "policy change -> the established flow is cut (strict mode), p99 of {} (manifests, --poll-ms 100), {scale}",
                s.cuts
            ),
            &format!("{cut_p99:.0} ms (p50 {cut_p50:.0})"),
            "limit 1000 ms",
            cut_p99 / 1000.0,
            "< 1",
            cut_p99 < 1000.0
        )
    );
    println!(
        "{}",
        table_row(
            &format!(
                "pod-to-pod TCP throughput (iperf3, same node; median of {} per-round ratios), {scale} vs the same node without the policy table (Flannel's masq tables in both)", s.rounds
            ),
            &format!("{tw:.2} Gbit/s"),
            &format!("{tn:.2} Gbit/s"),
            t_ratio,
            ">= 0.95",
            t_ratio >= 0.95
        )
    );
    println!(
        "{}",
        table_row(
            &format!("pod-to-pod TCP throughput, {scale} vs a node without any nftables table (no conntrack)"),
            &format!("{tw:.2} Gbit/s"),
            &format!("{tb:.2} Gbit/s"),
            tw / tb,
            "(reported)",
            true
        )
    );
    println!(
        "{}",
        table_row(
            &format!(
                "new TCP connections/s (connect+close, 2 threads; median of {} per-round ratios), {scale} vs the same node without the policy table", s.rounds
            ),
            &format!("{cw:.0}/s"),
            &format!("{cn:.0}/s"),
            c_ratio,
            ">= 0.90",
            c_ratio >= 0.90
        )
    );
    println!(
        "{}",
        table_row(
            &format!("new TCP connections/s, {scale} vs a node without any nftables table (no conntrack)"),
            &format!("{cw:.0}/s"),
            &format!("{cb:.0}/s"),
            cw / cb,
            "(reported)",
            true
        )
    );
    lab.teardown()?;
    Ok(())
}
