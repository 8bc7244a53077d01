//! Datapath benchmark: pod-to-pod TCP (iperf3, one stream) through twill (twilld with VXLAN
//! and --ip-masq, pods attached by twill-cni, every protection on: the underlay guard
//! `inet twill-underlay` and the per-pod `bridge twill-antispoof`) against the same path built
//! by hand exactly as Flannel builds it: `flannel.1`, neighbour, FDB entry and route as
//! flanneld programs them, Flannel's `--ip-masq` tables in nftables mode
//! (`twill::masq::ruleset`; twilld runs with `EnableNFTables: true` so both hold the same
//! tables), and pods attached by the reference bridge plugin with the very delegate config
//! Flannel's CNI plugin hands it. Across nodes and on one node.
//!
//! **Rounds.** Runs on this shared machine drift together over tens of seconds (consecutive
//! runs' throughputs correlate at about 0.6), so each round compares twill with Flannel in an
//! ABBA block (BAAB in odd rounds), and the round's ratio is that of the pooled runs: a drift
//! linear over the block cancels. Every ratio reported is the median of per-round ratios.
//!
//! **CPU per gigabit.** Throughput alone hides a cost that an idle core absorbs, so each run
//! also measures softirq CPU time per gigabit received. The two nodes share one kernel, so the
//! benchmark gives each node a CPU of its own: the client runs on CPU 0 and the server on CPU 1
//! (`taskset`), and receive packet steering sends what node 1's underlay interface and the
//! client pod receive to CPU 0, what node 2's underlay interface and the server pods receive to
//! CPU 1. Node 2's whole packet path (decapsulation, forwarding, bridge, the pod's TCP receive
//! and the ACKs it sends back) then runs in softirq on CPU 1, and CPU 1's softirq time from
//! `/proc/stat` is the receiving node's. On one node, the node is both ends: both CPUs count.
//!
//! **Spread.** With `--rounds R` (the minimum, default 9) the run goes on, up to
//! `--max-rounds`, until the 95% confidence interval of each throughput ratio's median (from
//! order statistics, [`twill_bench::median_ci`]) is within ±0.02; the rows say how wide it ended.
//!
//! **Where the cost goes** (`--breakdown FILE`, `--breakdown-rounds N`): afterwards, the
//! hand-built path across nodes with one of twill's chains (or the anti-spoofing table, also
//! as it was before its one-lookup rule) added to Flannel's tables, with all of them, and with
//! no nftables at all (so no conntrack either). Each arm runs between two runs of Flannel's
//! tables alone, its peer; the arms' order rotates from round to round; the table goes to FILE.
//!
//! Usage: datapath [--rounds R] [--max-rounds M] [--seconds S] [--breakdown FILE
//! [--breakdown-rounds N]]
//! (root, at least 2 CPUs; builds its own labs)

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use twill_bench::{median, median_ci, table_row};
use twill_lab::{Ipv4Net, Lab};

const NETWORK: &str = "10.244.0.0/16";
/// nftables mode, so that twilld's node holds the very tables the hand topology loads
/// (`twill::masq::ruleset`); without `EnableNFTables` twilld would use iptables chains.
const NET_CONF: &str =
    r#"{"Network":"10.244.0.0/16","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#;
/// Flannel's VXLAN MTU on a 1500-byte underlay, which the bridge plugin gives pods and cni0.
const FLANNEL_MTU: u32 = 1450;
/// The CPU of node 1 (the client side) and of node 2 (the server side).
const CLIENT_CPU: u32 = 0;
const SERVER_CPU: u32 = 1;
/// A target ratio's median must be known to within this (95% confidence interval half-width).
const MAX_SPREAD: f64 = 0.02;
/// Throughput: at least this fraction of the hand-built path's.
const MIN_THROUGHPUT_RATIO: f64 = 0.98;
/// CPU per gigabit: at most this multiple of the hand-built path's (the same 2% the other way).
const MAX_CPU_RATIO: f64 = 1.02;

/// One iperf3 path: client pod namespace, server pod namespace and address.
#[derive(Clone)]
struct PodPath {
    client_ns: String,
    server_ns: String,
    server_ip: Ipv4Addr,
}

/// A lab with two nodes and three pods: `a` (client) and `b` on n1, `c` on n2.
struct Cluster {
    lab: Lab,
    across: PodPath,
    same_node: PodPath,
}

impl Cluster {
    /// The pod path of an arm: on one node, or across nodes.
    fn path(&self, same_node: bool) -> PodPath {
        if same_node {
            self.same_node.clone()
        } else {
            self.across.clone()
        }
    }
}

/// One iperf3 run: throughput, data moved and CPU time per CPU meanwhile.
#[derive(Clone, Copy, Debug)]
struct Sample {
    gbit_per_s: f64,
    gbit: f64,
    cpu: [CpuTime; 2],
}

/// A CPU's time in seconds, from `/proc/stat`: softirq alone, and all kernel time (system, irq,
/// softirq). TCP receive work runs in softirq or, when the reader holds the socket, in the
/// reader's system time, so the second shows the whole cost whichever way a packet went.
#[derive(Clone, Copy, Debug, Default)]
struct CpuTime {
    softirq: f64,
    kernel: f64,
}

/// CPU time of CPUs 0 and 1 so far.
fn cpu_times() -> Result<[CpuTime; 2]> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let user_hz =
        nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.context("CLK_TCK")? as f64;
    let mut out = [CpuTime::default(); 2];
    for (cpu, slot) in out.iter_mut().enumerate() {
        let line = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&format!("cpu{cpu}")))
            .with_context(|| format!("/proc/stat has no cpu{cpu}"))?;
        // cpuN user nice system idle iowait irq softirq ... (USER_HZ ticks)
        let ticks: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .take(7)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("/proc/stat: a cpu line's numbers")?;
        if ticks.len() < 7 {
            bail!("/proc/stat: short cpu line {line:?}");
        }
        *slot = CpuTime {
            softirq: ticks[6] / user_hz,
            kernel: (ticks[2] + ticks[5] + ticks[6]) / user_hz,
        };
    }
    Ok(out)
}

/// Runs iperf3 over `path` for `seconds`: the server on [`SERVER_CPU`], the client on
/// [`CLIENT_CPU`].
fn iperf(lab: &mut Lab, path: &PodPath, seconds: u32, tag: &str) -> Result<Sample> {
    let server_cpu = SERVER_CPU.to_string();
    let server = lab.spawn(
        &path.server_ns,
        &format!("iperf-s-{tag}"),
        &["taskset", "-c", &server_cpu, "iperf3", "-s", "-1"],
        &[],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_times()?;
    let out = lab.exec_ok(
        &path.client_ns,
        &[
            "taskset",
            "-c",
            &CLIENT_CPU.to_string(),
            "iperf3",
            "-c",
            &path.server_ip.to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
        ],
    )?;
    let after = cpu_times()?;
    let _ = lab.wait(server, Duration::from_secs(5));
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    let received = &v["end"]["sum_received"];
    let bps = received["bits_per_second"]
        .as_f64()
        .context("iperf3: no bits_per_second")?;
    let bytes = received["bytes"].as_f64().context("iperf3: no bytes")?;
    Ok(Sample {
        gbit_per_s: bps / 1e9,
        gbit: bytes * 8.0 / 1e9,
        cpu: [0, 1].map(|c| CpuTime {
            softirq: after[c].softirq - before[c].softirq,
            kernel: after[c].kernel - before[c].kernel,
        }),
    })
}

/// Receive packet steering: what `ifname` in `netns` receives is processed on `cpu`.
fn steer(lab: &Lab, netns: &str, ifname: &str, cpu: u32) -> Result<()> {
    let mask = format!("{:x}", 1u32 << cpu);
    let file = format!("/sys/class/net/{ifname}/queues/rx-0/rps_cpus");
    lab.exec_ok(netns, &["sh", "-c", &format!("echo {mask} > {file}")])
        .with_context(|| format!("steering {ifname} in {netns} to CPU {cpu}"))?;
    Ok(())
}

/// Gives node 1 (and the client pod) CPU 0 and node 2 (and the server pods) CPU 1; `pods` are
/// the client pod's and the servers' namespaces, in that order.
fn steer_cluster(lab: &Lab, client_ns: &str, server_nss: &[&str]) -> Result<()> {
    for (node, cpu) in [("n1", CLIENT_CPU), ("n2", SERVER_CPU)] {
        let n = lab.node(node);
        steer(lab, &n.netns, &n.ifname, cpu)?;
    }
    steer(lab, client_ns, "eth0", CLIENT_CPU)?;
    for ns in server_nss {
        steer(lab, ns, "eth0", SERVER_CPU)?;
    }
    Ok(())
}

/// A pod's network namespace and address.
type PodAddr = (String, Ipv4Addr);

/// Pods `a` and `b` on n1 and `c` on n2, attached by `attach`; waits until `a` reaches both.
fn finish_cluster(
    lab: Lab,
    attach: &mut dyn FnMut(&mut Lab, &str, &str) -> Result<PodAddr>,
) -> Result<Cluster> {
    let mut lab = lab;
    let (a_ns, _) = attach(&mut lab, "n1", "a")?;
    let (b_ns, b_ip) = attach(&mut lab, "n1", "b")?;
    let (c_ns, c_ip) = attach(&mut lab, "n2", "c")?;
    for ip in [b_ip, c_ip] {
        if !lab.wait_ping(&a_ns, ip.into(), Duration::from_secs(20)) {
            bail!("{}: pod a cannot reach {ip}", lab.name());
        }
    }
    steer_cluster(&lab, &a_ns, &[&b_ns, &c_ns])?;
    Ok(Cluster {
        across: PodPath {
            client_ns: a_ns.clone(),
            server_ns: c_ns,
            server_ip: c_ip,
        },
        same_node: PodPath {
            client_ns: a_ns,
            server_ns: b_ns,
            server_ip: b_ip,
        },
        lab,
    })
}

fn twill_cluster() -> Result<Cluster> {
    let mut lab = Lab::new("bdt")?;
    let endpoint = lab.start_etcd()?;
    lab.etcdctl(&["put", "/coreos.com/network/config", NET_CONF])?;
    let twilld = twill_lab::bin_path("twilld").to_string_lossy().into_owned();
    for n in ["n1", "n2"] {
        let node = lab.add_node(n)?;
        let subnet_file = node.subnet_file();
        let sf = subnet_file.to_string_lossy().into_owned();
        lab.spawn(
            &node.netns,
            &format!("twilld-{n}"),
            &[
                &twilld,
                &format!("--etcd-endpoints={endpoint}"),
                "--ip-masq",
                "--subnet-file",
                &sf,
            ],
            &[],
        )?;
        let mut waited = 0;
        while !subnet_file.exists() {
            if waited > 300 {
                bail!("twilld on {n} not ready");
            }
            std::thread::sleep(Duration::from_millis(100));
            waited += 1;
        }
    }
    let cni = twill_lab::bin_path("twill-cni");
    finish_cluster(lab, &mut |lab, node, pod| {
        let conf = lab.node(node).flannel_netconf();
        let p = lab.add_cni_pod(node, pod, &cni, &conf)?;
        Ok((p.netns.clone(), p.ip()))
    })
}

/// The same topology by hand: what flanneld + Flannel's CNI plugin (through the bridge plugin)
/// leave in the kernel, with Flannel's `--ip-masq` tables loaded.
fn hand_cluster() -> Result<Cluster> {
    let mut lab = Lab::new("bdh")?;
    let nodes = [lab.add_node("n1")?, lab.add_node("n2")?];
    let network: Ipv4Net = NETWORK.parse()?;
    let subnets = hand_subnets();
    let macs = ["0e:00:00:00:01:00", "0e:00:00:00:02:00"];
    for (i, node) in nodes.iter().enumerate() {
        let j = 1 - i;
        lab.flannel_by_hand(&node.name, subnets[i], macs[i])?;
        lab.flannel_peer_by_hand(&node.name, subnets[j], macs[j], nodes[j].addr)?;
    }
    let bridge = Path::new(twill_lab::CNI_PLUGIN_DIR).join("bridge");
    finish_cluster(lab, &mut |lab, node, pod| {
        let i = usize::from(node == "n2");
        let ipam_dir = lab.node(node).dir.join("cni-ipam");
        let conf = twill_lab::flannel::flannel_delegate_netconf(
            network,
            subnets[i],
            FLANNEL_MTU,
            true,
            &ipam_dir,
        );
        let p = lab.add_cni_pod(node, pod, &bridge, &conf)?;
        Ok((p.netns.clone(), p.ip()))
    })
}

fn hand_subnets() -> [Ipv4Net; 2] {
    [
        "10.244.1.0/24".parse().expect("subnet"),
        "10.244.2.0/24".parse().expect("subnet"),
    ]
}

/// Which part of the underlay guard a hand-built arm loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Guard {
    Off,
    All,
    /// Only the base chain of this index in [`base_chains`] (with the regular chains it jumps to).
    Only(usize),
}

/// Which anti-spoofing table a hand-built arm loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AntiSpoof {
    Off,
    /// As twill-cni writes it.
    On,
    /// Without its first rule (a pod's own IPv4 accepted with one lookup): as twill-cni wrote
    /// it before, when each frame took two lookups (the port, then the address). Kept to
    /// measure that rule in the same run.
    TwoLookups,
}

/// The rule [`AntiSpoof::TwoLookups`] leaves out.
fn one_lookup_rule() -> String {
    format!(
        "add rule bridge {} pods ether type ip iifname . ip saddr @src4 accept\n",
        twill_cni::antispoof::TABLE
    )
}

/// The nftables layers of a hand-built arm: Flannel's tables, the underlay guard (or one of its
/// base chains) and the anti-spoofing table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layers {
    flannel: bool,
    guard: Guard,
    antispoof: AntiSpoof,
}

impl Layers {
    const FLANNEL: Layers = Layers {
        flannel: true,
        guard: Guard::Off,
        antispoof: AntiSpoof::Off,
    };
    const NONE: Layers = Layers {
        flannel: false,
        ..Layers::FLANNEL
    };
    const ALL: Layers = Layers {
        flannel: true,
        guard: Guard::All,
        antispoof: AntiSpoof::On,
    };
}

/// The base chains (those on a hook) of a table script, in order.
fn base_chains(script: &str) -> Vec<String> {
    script
        .lines()
        .filter(|l| l.contains("{ type filter hook "))
        .filter_map(|l| l.strip_prefix("add chain ")?.split_whitespace().nth(2))
        .map(String::from)
        .collect()
}

/// What a node of the hand topology loads for each layer.
struct NodeScripts {
    netns: String,
    flannel: String,
    guard: String,
    antispoof: String,
}

/// The scripts for each hand node: Flannel's tables as flanneld --ip-masq writes them, the
/// underlay guard exactly as twilld builds it, and the anti-spoofing table exactly as twill-cni
/// builds it for the node's pods.
fn hand_scripts(hand: &Cluster) -> Result<Vec<NodeScripts>> {
    let subnets = hand_subnets();
    let mut out = Vec::new();
    for (i, n) in ["n1", "n2"].iter().enumerate() {
        let node = hand.lab.node(n);
        let peer = hand.lab.node(["n2", "n1"][i]);
        let flannel = twill::masq::ruleset(&twill::masq::MasqInput {
            network: NETWORK.parse()?,
            subnet: subnets[i].into(),
            masquerade: true,
            fully_random: true,
            forward: true,
        });
        let guard = twill::underlay::ruleset(&twill::underlay::GuardInput {
            vxlan_port: Some(8472),
            external: node.ifname.clone(),
            networks: vec![NETWORK.parse()?],
            own_subnets: vec![subnets[i].into()],
            peer_ips: [std::net::IpAddr::V4(peer.addr)].into_iter().collect(),
            peer_subnets: [subnets[1 - i].into()].into_iter().collect(),
        });
        let mut antispoof = format!(
            "add table bridge {t}\ndelete table bridge {t}\n",
            t = twill_cni::antispoof::TABLE
        );
        for pod in hand.lab.pods().iter().filter(|p| p.node == *n) {
            let result = &pod.cni.as_ref().context("hand pods are CNI pods")?.result;
            let port = twill_cni::antispoof::pod_port(result, twill_lab::POD_BRIDGE)
                .with_context(|| format!("no host veth in the result of pod {}", pod.name))?;
            antispoof += &twill_cni::antispoof::add_script(&port);
        }
        out.push(NodeScripts {
            netns: node.netns.clone(),
            flannel,
            guard,
            antispoof,
        });
    }
    Ok(out)
}

/// One transaction per node that makes its tables hold exactly `layers`.
fn apply_layers(lab: &Lab, scripts: &[NodeScripts], layers: Layers) -> Result<()> {
    let remove = |family: &str, table: &str| {
        format!("add table {family} {table}\ndelete table {family} {table}\n")
    };
    for node in scripts {
        let mut s = String::new();
        s += &if layers.flannel {
            node.flannel.clone()
        } else {
            remove("ip", "flannel-ipv4")
        };
        match layers.guard {
            Guard::Off => s += &remove("inet", twill::underlay::TABLE),
            Guard::All => s += &node.guard,
            Guard::Only(keep) => {
                s += &node.guard;
                for (i, chain) in base_chains(&node.guard).iter().enumerate() {
                    if i != keep {
                        let c = format!("inet {} {chain}", twill::underlay::TABLE);
                        let _ = writeln!(s, "flush chain {c}\ndelete chain {c}");
                    }
                }
            }
        }
        s += &match layers.antispoof {
            AntiSpoof::Off => remove("bridge", twill_cni::antispoof::TABLE),
            AntiSpoof::On => node.antispoof.clone(),
            AntiSpoof::TwoLookups => {
                let rule = one_lookup_rule();
                if !node.antispoof.contains(&rule) {
                    bail!("twill-cni's chain no longer starts with {rule:?}: update the benchmark");
                }
                node.antispoof.replace(&rule, "")
            }
        };
        let path = lab.dir().join(format!("{}-layers.nft", node.netns));
        std::fs::write(&path, &s)?;
        lab.exec_ok(&node.netns, &["nft", "-f", &path.to_string_lossy()])?;
    }
    Ok(())
}

/// Which lab an arm runs in and over which path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arm {
    Twill { same_node: bool },
    Hand { same_node: bool, layers: Layers },
}

/// Flannel's path by hand across nodes: the peer of every comparison across nodes.
const FLANNEL_ACROSS: Arm = Arm::Hand {
    same_node: false,
    layers: Layers::FLANNEL,
};

/// The breakdown's arms: the hand-built path across nodes with one layer added to Flannel's
/// tables (one arm per base chain of `guard`, a guard script, when it has several), with all
/// of twill's, and with no nftables at all.
fn breakdown_arms(guard: &str) -> Vec<(String, Layers)> {
    let f = Layers::FLANNEL;
    let mut out = vec![("no nftables at all".to_string(), Layers::NONE)];
    let chains = base_chains(guard);
    for (i, chain) in chains.iter().enumerate().filter(|_| chains.len() > 1) {
        out.push((
            format!("+ {} chain {chain}", twill::underlay::TABLE),
            Layers {
                guard: Guard::Only(i),
                ..f
            },
        ));
    }
    let t = twill_cni::antispoof::TABLE;
    out.extend([
        (
            format!("+ {} (whole table)", twill::underlay::TABLE),
            Layers {
                guard: Guard::All,
                ..f
            },
        ),
        (
            format!("+ {t}"),
            Layers {
                antispoof: AntiSpoof::On,
                ..f
            },
        ),
        (
            format!("+ {t} without its one-lookup rule (as before)"),
            Layers {
                antispoof: AntiSpoof::TwoLookups,
                ..f
            },
        ),
        ("+ both of twill's tables".to_string(), Layers::ALL),
    ]);
    out
}

/// What a comparison measures.
#[derive(Clone, Copy, Debug)]
enum Measure {
    /// Gbit/s.
    Throughput,
    /// Softirq ms per Gbit on the receiving side.
    ReceivingSoftirq,
    /// Kernel ms per Gbit on the receiving side.
    ReceivingKernel,
    /// Softirq ms per Gbit on node 1 (the client's).
    SendingSoftirq,
}

/// Runs of one arm pooled: mean throughput, or CPU time over all the data they moved.
fn pooled(samples: &[Sample], receiving: &[u32], m: Measure) -> f64 {
    let gbit: f64 = samples.iter().map(|s| s.gbit).sum();
    let cpu_ms_per_gbit = |time: fn(&CpuTime) -> f64, cpus: &[u32]| {
        let t: f64 = samples
            .iter()
            .map(|s| cpus.iter().map(|&c| time(&s.cpu[c as usize])).sum::<f64>())
            .sum();
        t * 1000.0 / gbit
    };
    match m {
        Measure::Throughput => {
            samples.iter().map(|s| s.gbit_per_s).sum::<f64>() / samples.len() as f64
        }
        Measure::ReceivingSoftirq => cpu_ms_per_gbit(|c| c.softirq, receiving),
        Measure::ReceivingKernel => cpu_ms_per_gbit(|c| c.kernel, receiving),
        Measure::SendingSoftirq => cpu_ms_per_gbit(|c| c.softirq, &[CLIENT_CPU]),
    }
}

/// One round of a comparison: the arm's runs and the peer's runs next to them.
struct Pair {
    arm: Vec<Sample>,
    peer: Vec<Sample>,
}

/// An arm against its peer, round by round; `receiving` are the CPUs of the receiving side
/// (node 2's across nodes, both on one node, where the node is both ends).
struct Comparison {
    receiving: &'static [u32],
    rounds: Vec<Pair>,
}

impl Comparison {
    fn new(receiving: &'static [u32]) -> Comparison {
        Comparison {
            receiving,
            rounds: Vec::new(),
        }
    }

    /// Per-round ratios of the arm to the peer.
    fn ratios(&self, m: Measure) -> Vec<f64> {
        self.rounds
            .iter()
            .map(|p| pooled(&p.arm, self.receiving, m) / pooled(&p.peer, self.receiving, m))
            .collect()
    }

    /// The median over rounds of the arm's (or the peer's) value.
    fn value(&self, m: Measure, of_peer: bool) -> f64 {
        median(
            self.rounds
                .iter()
                .map(|p| pooled(if of_peer { &p.peer } else { &p.arm }, self.receiving, m))
                .collect(),
        )
    }

    /// "median (±CI half-width)" of the per-round ratios.
    fn cell(&self, m: Measure) -> String {
        let r = self.ratios(m);
        format!("{:.3} (±{:.3})", median(r.clone()), spread(&r))
    }
}

/// Half-width of the 95% confidence interval of the median of `xs` (infinite when there are
/// too few samples to have one).
fn spread(xs: &[f64]) -> f64 {
    median_ci(xs.to_vec())
        .map(|(_, lo, hi)| (hi - lo) / 2.0)
        .unwrap_or(f64::INFINITY)
}

/// Both labs and the hand-built layers in force.
struct Bench {
    twill: Cluster,
    hand: Cluster,
    scripts: Vec<NodeScripts>,
    applied: Option<Layers>,
    seconds: u32,
    runs: usize,
}

impl Bench {
    /// One iperf3 run of `arm`.
    fn run(&mut self, name: &str, arm: Arm) -> Result<Sample> {
        self.runs += 1;
        let tag = self.runs.to_string();
        let sample = match arm {
            Arm::Twill { same_node } => {
                let path = self.twill.path(same_node);
                iperf(&mut self.twill.lab, &path, self.seconds, &tag)?
            }
            Arm::Hand { same_node, layers } => {
                if self.applied != Some(layers) {
                    apply_layers(&self.hand.lab, &self.scripts, layers)?;
                    self.applied = Some(layers);
                }
                let path = self.hand.path(same_node);
                iperf(&mut self.hand.lab, &path, self.seconds, &tag)?
            }
        };
        eprintln!(
            "{name}: {:.2} Gbit/s, softirq {:.1} ms/Gbit on CPU {SERVER_CPU}",
            sample.gbit_per_s,
            pooled(&[sample], &[SERVER_CPU], Measure::ReceivingSoftirq)
        );
        Ok(sample)
    }

    /// One round of twill's `arm` against Flannel's `peer` as an ABBA block (BAAB in odd
    /// rounds): runs of this shared machine drift together over tens of seconds, and a drift
    /// that is linear over the block cancels in the ratio of the pooled runs.
    fn abba(&mut self, round: u32, name: &str, arm: Arm, peer: Arm) -> Result<Pair> {
        let mut pair = Pair {
            arm: Vec::new(),
            peer: Vec::new(),
        };
        let order = if round.is_multiple_of(2) {
            [true, false, false, true]
        } else {
            [false, true, true, false]
        };
        for is_arm in order {
            if is_arm {
                pair.arm
                    .push(self.run(&format!("round {round} twill {name}"), arm)?);
            } else {
                let s = self.run(&format!("round {round} Flannel {name}"), peer)?;
                pair.peer.push(s);
            }
        }
        Ok(pair)
    }
}

fn main() -> Result<()> {
    if !twill_lab::require_root() {
        return Ok(());
    }
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let number = |name: &str, default: u32| -> Result<u32> {
        value(name).map_or(Ok(default), |v| {
            v.parse()
                .with_context(|| format!("{name}: {v:?} is not a number"))
        })
    };
    let min_rounds = number("--rounds", 9)?;
    let max_rounds = number("--max-rounds", 31)?.max(min_rounds);
    let seconds = number("--seconds", 4)?;
    let breakdown_out = value("--breakdown");
    let breakdown_rounds = number("--breakdown-rounds", 9)?;
    if std::thread::available_parallelism()?.get() < 2 {
        bail!("datapath needs 2 CPUs: one per node");
    }

    let twill = twill_cluster()?;
    let hand = hand_cluster()?;
    let scripts = hand_scripts(&hand)?;
    let mut bench = Bench {
        twill,
        hand,
        scripts,
        applied: None,
        seconds,
        runs: 0,
    };
    let both_cpus: &'static [u32] = &[CLIENT_CPU, SERVER_CPU];
    let mut across = Comparison::new(&[SERVER_CPU]);
    let mut same = Comparison::new(both_cpus);
    let same_node_peer = Arm::Hand {
        same_node: true,
        layers: Layers::FLANNEL,
    };
    let mut rounds = 0;
    while rounds < max_rounds {
        across.rounds.push(bench.abba(
            rounds,
            "across nodes",
            Arm::Twill { same_node: false },
            FLANNEL_ACROSS,
        )?);
        same.rounds.push(bench.abba(
            rounds,
            "on one node",
            Arm::Twill { same_node: true },
            same_node_peer,
        )?);
        rounds += 1;
        let spreads = [
            spread(&across.ratios(Measure::Throughput)),
            spread(&same.ratios(Measure::Throughput)),
        ];
        eprintln!(
            "after {rounds} rounds: spread of the throughput ratios' medians ±{:.3} across, ±{:.3} on one node",
            spreads[0], spreads[1]
        );
        if rounds >= min_rounds && spreads.iter().all(|s| *s < MAX_SPREAD) {
            break;
        }
    }

    for (cmp, what) in [(&across, "across nodes"), (&same, "on one node")] {
        let tput = cmp.ratios(Measure::Throughput);
        let (ratio, sp) = (median(tput.clone()), spread(&tput));
        println!(
            "{}",
            table_row(
                &format!("pod-to-pod TCP {what}, iperf3 {seconds} s, every protection on (median of {rounds} per-round ratios of ABBA blocks, 95% CI ±{sp:.3})"),
                &format!("{:.2} Gbit/s", cmp.value(Measure::Throughput, false)),
                &format!("{:.2} Gbit/s (Flannel's path by hand, with its --ip-masq tables)", cmp.value(Measure::Throughput, true)),
                ratio,
                "ratio ≥ 0.98, CI ±0.02",
                ratio >= MIN_THROUGHPUT_RATIO && sp < MAX_SPREAD,
            )
        );
        let side = if cmp.receiving.len() == 2 {
            "the node (both CPUs)"
        } else {
            "the receiving node"
        };
        for (m, label, target, limit) in [
            (
                Measure::ReceivingSoftirq,
                "softirq CPU",
                "ratio ≤ 1.02",
                Some(MAX_CPU_RATIO),
            ),
            (
                Measure::ReceivingKernel,
                "kernel CPU (system + irq + softirq)",
                "(reported)",
                None,
            ),
        ] {
            let r = cmp.ratios(m);
            let (ratio, sp) = (median(r.clone()), spread(&r));
            println!(
                "{}",
                table_row(
                    &format!("{label} per Gbit on {side}, pod to pod {what} (median of {rounds} per-round ratios, 95% CI ±{sp:.3})"),
                    &format!("{:.1} ms/Gbit", cmp.value(m, false)),
                    &format!("{:.1} ms/Gbit (Flannel's path by hand)", cmp.value(m, true)),
                    ratio,
                    target,
                    limit.is_none_or(|l| ratio <= l),
                )
            );
        }
    }

    if let Some(path) = breakdown_out {
        let arms = breakdown_arms(&bench.scripts[0].guard);
        let mut comparisons: Vec<Comparison> = arms
            .iter()
            .map(|_| Comparison::new(&[SERVER_CPU]))
            .collect();
        for r in 0..breakdown_rounds {
            // Every arm between two runs of Flannel's tables alone, which are its peer: the
            // arms' order rotates from round to round.
            let mut before =
                bench.run(&format!("breakdown {r}: Flannel's tables"), FLANNEL_ACROSS)?;
            for k in 0..arms.len() {
                let i = (k + r as usize) % arms.len();
                let (name, layers) = &arms[i];
                let arm = Arm::Hand {
                    same_node: false,
                    layers: *layers,
                };
                let x = bench.run(&format!("breakdown {r}: {name}"), arm)?;
                let after =
                    bench.run(&format!("breakdown {r}: Flannel's tables"), FLANNEL_ACROSS)?;
                comparisons[i].rounds.push(Pair {
                    arm: vec![x],
                    peer: vec![before, after],
                });
                before = after;
            }
        }
        let mut t = String::new();
        let _ = writeln!(
            t,
            "| hand-built Flannel path across nodes (each arm against Flannel's tables alone) | throughput ratio | softirq per Gbit, receiving node | kernel CPU per Gbit, receiving node | softirq per Gbit, sending node |"
        );
        let _ = writeln!(t, "|---|---|---|---|---|");
        let rows = arms
            .iter()
            .map(|(name, _)| name.as_str())
            .zip(comparisons.iter())
            .chain([(
                "twill itself (twilld and twill-cni; the ABBA blocks above)",
                &across,
            )]);
        for (name, cmp) in rows {
            let _ = writeln!(
                t,
                "| {name} | {} | {} | {} | {} |",
                cmp.cell(Measure::Throughput),
                cmp.cell(Measure::ReceivingSoftirq),
                cmp.cell(Measure::ReceivingKernel),
                cmp.cell(Measure::SendingSoftirq),
            );
        }
        let _ = writeln!(
            t,
            "\nEach cell: median of {breakdown_rounds} per-round ratios (95% CI half-width) of the arm to the two runs of Flannel's tables alone on either side of it; iperf3 {seconds} s per run; Flannel's tables alone: {:.2} Gbit/s, {:.1} ms/Gbit softirq on the receiving node.",
            across.value(Measure::Throughput, true),
            across.value(Measure::ReceivingSoftirq, true)
        );
        std::fs::write(&path, t).with_context(|| format!("writing {path}"))?;
    }
    bench.twill.lab.teardown()?;
    bench.hand.lab.teardown()?;
    Ok(())
}
