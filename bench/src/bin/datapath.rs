//! Datapath benchmark: pod-to-pod TCP (iperf3, one stream) through twill (twilld with VXLAN
//! and --ip-masq, pods attached by twill-cni, every protection on: the underlay guard
//! `inet twill-underlay` and the per-pod `bridge twill-antispoof`) against the same path built
//! by hand exactly as Flannel builds it: `flannel.1`, neighbour, FDB entry and route as
//! flanneld programs them, Flannel's `--ip-masq` tables in nftables mode
//! (`twill::masq::ruleset`; twilld runs with `EnableNFTables: true` so both hold the same
//! tables), and pods attached by the reference bridge plugin with the very delegate config
//! Flannel's CNI plugin hands it. Across nodes and on one node; arms alternate within each
//! round (their order rotates from round to round) and every ratio is the median of per-round
//! ratios, so slow drifts of this shared machine cancel.
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
//! `--max-rounds`, until the 95% confidence interval of each target ratio's median (from order
//! statistics, [`twill_bench::median_ci`]) is within ±0.02; the rows say how wide it ended.
//!
//! **Where the cost goes** (`--breakdown FILE`): more arms in the hand-built topology, each
//! adding one of twill's chains (or the anti-spoofing table) to Flannel's tables, plus all of
//! them and none (no nftables at all, so no conntrack either); each is compared with Flannel's
//! tables alone in the same round, and the table goes to FILE.
//!
//! Usage: datapath [--rounds R] [--max-rounds M] [--seconds S] [--breakdown FILE]
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

/// One iperf3 run: throughput, data moved and CPU time per CPU meanwhile.
#[derive(Clone, Copy, Debug)]
struct Sample {
    gbit_per_s: f64,
    gbit: f64,
    cpu: [CpuTime; 2],
}

impl Sample {
    /// Softirq milliseconds per gigabit on the CPUs in `cpus`.
    fn softirq_ms_per_gbit(&self, cpus: &[u32]) -> f64 {
        let s: f64 = cpus.iter().map(|&c| self.cpu[c as usize].softirq).sum();
        s * 1000.0 / self.gbit
    }

    /// Kernel (system, irq and softirq) milliseconds per gigabit on the CPUs in `cpus`.
    fn kernel_ms_per_gbit(&self, cpus: &[u32]) -> f64 {
        let s: f64 = cpus.iter().map(|&c| self.cpu[c as usize].kernel).sum();
        s * 1000.0 / self.gbit
    }
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

/// The nftables layers of a hand-built arm: Flannel's tables, the underlay guard (or one of its
/// base chains) and the anti-spoofing table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layers {
    flannel: bool,
    guard: Guard,
    antispoof: bool,
}

impl Layers {
    const FLANNEL: Layers = Layers {
        flannel: true,
        guard: Guard::Off,
        antispoof: false,
    };
    const NONE: Layers = Layers {
        flannel: false,
        ..Layers::FLANNEL
    };
    const ALL: Layers = Layers {
        flannel: true,
        guard: Guard::All,
        antispoof: true,
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
        s += &if layers.antispoof {
            node.antispoof.clone()
        } else {
            remove("bridge", twill_cni::antispoof::TABLE)
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

/// The arms' names and definitions; the first four are always run, the others with
/// `breakdown` (one per base chain of `guard`, a guard script).
fn arms(breakdown: bool, guard: &str) -> Vec<(String, Arm)> {
    let hand = |layers| Arm::Hand {
        same_node: false,
        layers,
    };
    let mut out = vec![
        (TWILL_ACROSS.to_string(), Arm::Twill { same_node: false }),
        (FLANNEL_ACROSS.to_string(), hand(Layers::FLANNEL)),
        (TWILL_SAME.to_string(), Arm::Twill { same_node: true }),
        (
            FLANNEL_SAME.to_string(),
            Arm::Hand {
                same_node: true,
                layers: Layers::FLANNEL,
            },
        ),
    ];
    if breakdown {
        let f = Layers::FLANNEL;
        out.push(("no nftables at all".into(), hand(Layers::NONE)));
        let chains = base_chains(guard);
        // One arm per base chain, when there are several (one chain is the whole table).
        for (i, chain) in chains.iter().enumerate().filter(|_| chains.len() > 1) {
            out.push((
                format!("+ {} chain {chain}", twill::underlay::TABLE),
                hand(Layers {
                    guard: Guard::Only(i),
                    ..f
                }),
            ));
        }
        out.push((
            format!("+ {} (whole table)", twill::underlay::TABLE),
            hand(Layers {
                guard: Guard::All,
                ..f
            }),
        ));
        out.push((
            format!("+ {}", twill_cni::antispoof::TABLE),
            hand(Layers {
                antispoof: true,
                ..f
            }),
        ));
        out.push(("+ both of twill's tables".into(), hand(Layers::ALL)));
    }
    out
}

const TWILL_ACROSS: &str = "twill across nodes";
const FLANNEL_ACROSS: &str = "Flannel by hand across nodes";
const TWILL_SAME: &str = "twill on one node";
const FLANNEL_SAME: &str = "Flannel by hand on one node";

/// The receiving side's CPUs: node 2's across nodes, the one node's (both) on one node.
fn receiving_cpus(arm: Arm) -> &'static [u32] {
    let same = matches!(
        arm,
        Arm::Twill { same_node: true }
            | Arm::Hand {
                same_node: true,
                ..
            }
    );
    if same {
        &[CLIENT_CPU, SERVER_CPU]
    } else {
        &[SERVER_CPU]
    }
}

/// Per-round samples of every arm, by arm index.
struct Runs {
    arms: Vec<(String, Arm)>,
    samples: Vec<Vec<Sample>>,
}

impl Runs {
    fn index(&self, name: &str) -> usize {
        self.arms
            .iter()
            .position(|(n, _)| *n == name)
            .expect("known arm")
    }

    /// Per-round ratios of `f(arm)` to `f(peer)`.
    fn ratios(&self, arm: &str, peer: &str, f: impl Fn(&Sample, Arm) -> f64) -> Vec<f64> {
        let (a, p) = (self.index(arm), self.index(peer));
        let (arm_def, peer_def) = (self.arms[a].1, self.arms[p].1);
        self.samples[a]
            .iter()
            .zip(&self.samples[p])
            .map(|(x, y)| f(x, arm_def) / f(y, peer_def))
            .collect()
    }

    fn throughput_ratios(&self, arm: &str, peer: &str) -> Vec<f64> {
        self.ratios(arm, peer, |s, _| s.gbit_per_s)
    }

    fn receiving_cpu_ratios(&self, arm: &str, peer: &str) -> Vec<f64> {
        self.ratios(arm, peer, |s, a| s.softirq_ms_per_gbit(receiving_cpus(a)))
    }

    fn receiving_kernel_ratios(&self, arm: &str, peer: &str) -> Vec<f64> {
        self.ratios(arm, peer, |s, a| s.kernel_ms_per_gbit(receiving_cpus(a)))
    }

    fn sending_cpu_ratios(&self, arm: &str, peer: &str) -> Vec<f64> {
        self.ratios(arm, peer, |s, _| s.softirq_ms_per_gbit(&[CLIENT_CPU]))
    }

    fn median_of(&self, arm: &str, f: impl Fn(&Sample, Arm) -> f64) -> f64 {
        let i = self.index(arm);
        let def = self.arms[i].1;
        median(self.samples[i].iter().map(|s| f(s, def)).collect())
    }

    fn gbit_per_s(&self, arm: &str) -> f64 {
        self.median_of(arm, |s, _| s.gbit_per_s)
    }

    fn receiving_ms_per_gbit(&self, arm: &str) -> f64 {
        self.median_of(arm, |s, a| s.softirq_ms_per_gbit(receiving_cpus(a)))
    }

    fn receiving_kernel_ms_per_gbit(&self, arm: &str) -> f64 {
        self.median_of(arm, |s, a| s.kernel_ms_per_gbit(receiving_cpus(a)))
    }
}

/// Half-width of the 95% confidence interval of the median of `xs` (infinite when there are
/// too few samples to have one).
fn spread(xs: &[f64]) -> f64 {
    median_ci(xs.to_vec())
        .map(|(_, lo, hi)| (hi - lo) / 2.0)
        .unwrap_or(f64::INFINITY)
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
    let seconds = number("--seconds", 5)?;
    let breakdown_out = value("--breakdown");
    if std::thread::available_parallelism()?.get() < 2 {
        bail!("datapath needs 2 CPUs: one per node");
    }

    let mut twill = twill_cluster()?;
    let mut hand = hand_cluster()?;
    let scripts = hand_scripts(&hand)?;
    let arms = arms(breakdown_out.is_some(), &scripts[0].guard);
    let mut runs = Runs {
        samples: vec![Vec::new(); arms.len()],
        arms: arms.clone(),
    };
    let mut applied: Option<Layers> = None;
    let mut rounds = 0;
    while rounds < max_rounds {
        let r = rounds as usize;
        // Rotate the order, so that no arm always runs right after the same other one.
        for k in 0..arms.len() {
            let i = (k + r) % arms.len();
            let (name, arm) = (&arms[i].0, arms[i].1);
            let tag = format!("{i}-{r}");
            let sample = match arm {
                Arm::Twill { same_node } => {
                    let path = if same_node {
                        twill.same_node.clone()
                    } else {
                        twill.across.clone()
                    };
                    iperf(&mut twill.lab, &path, seconds, &tag)?
                }
                Arm::Hand { same_node, layers } => {
                    if applied != Some(layers) {
                        apply_layers(&hand.lab, &scripts, layers)?;
                        applied = Some(layers);
                    }
                    let path = if same_node {
                        hand.same_node.clone()
                    } else {
                        hand.across.clone()
                    };
                    iperf(&mut hand.lab, &path, seconds, &tag)?
                }
            };
            eprintln!(
                "round {r} {name}: {:.2} Gbit/s, softirq {:.1} ms/Gbit on the receiving side",
                sample.gbit_per_s,
                sample.softirq_ms_per_gbit(receiving_cpus(arm))
            );
            runs.samples[i].push(sample);
        }
        rounds += 1;
        let spreads = [
            spread(&runs.throughput_ratios(TWILL_ACROSS, FLANNEL_ACROSS)),
            spread(&runs.throughput_ratios(TWILL_SAME, FLANNEL_SAME)),
        ];
        eprintln!(
            "after {rounds} rounds: spread of the throughput ratios' medians ±{:.3} across, ±{:.3} same node",
            spreads[0], spreads[1]
        );
        if rounds >= min_rounds && spreads.iter().all(|s| *s < MAX_SPREAD) {
            break;
        }
    }

    for (arm, peer, what) in [
        (TWILL_ACROSS, FLANNEL_ACROSS, "across nodes"),
        (TWILL_SAME, FLANNEL_SAME, "on one node"),
    ] {
        let tput = runs.throughput_ratios(arm, peer);
        let (ratio, sp) = (median(tput.clone()), spread(&tput));
        println!(
            "{}",
            table_row(
                &format!("pod-to-pod TCP {what}, iperf3 {seconds} s, every protection on (median of {rounds} per-round ratios, 95% CI ±{sp:.3})"),
                &format!("{:.2} Gbit/s", runs.gbit_per_s(arm)),
                &format!("{:.2} Gbit/s (Flannel's path by hand, with its --ip-masq tables)", runs.gbit_per_s(peer)),
                ratio,
                "ratio ≥ 0.98, CI ±0.02",
                ratio >= MIN_THROUGHPUT_RATIO && sp < MAX_SPREAD,
            )
        );
        let cpu = runs.receiving_cpu_ratios(arm, peer);
        let (ratio, sp) = (median(cpu.clone()), spread(&cpu));
        let side = if arm == TWILL_SAME {
            "the node (both CPUs)"
        } else {
            "the receiving node"
        };
        println!(
            "{}",
            table_row(
                &format!("softirq CPU per Gbit on {side}, pod to pod {what} (median of {rounds} per-round ratios, 95% CI ±{sp:.3})"),
                &format!("{:.1} ms/Gbit", runs.receiving_ms_per_gbit(arm)),
                &format!("{:.1} ms/Gbit (Flannel's path by hand)", runs.receiving_ms_per_gbit(peer)),
                ratio,
                "ratio ≤ 1.02",
                ratio <= MAX_CPU_RATIO,
            )
        );
        let kernel = runs.receiving_kernel_ratios(arm, peer);
        let (ratio, sp) = (median(kernel.clone()), spread(&kernel));
        println!(
            "{}",
            table_row(
                &format!("kernel CPU (system + irq + softirq) per Gbit on {side}, pod to pod {what} (median of {rounds} per-round ratios, 95% CI ±{sp:.3})"),
                &format!("{:.1} ms/Gbit", runs.receiving_kernel_ms_per_gbit(arm)),
                &format!("{:.1} ms/Gbit (Flannel's path by hand)", runs.receiving_kernel_ms_per_gbit(peer)),
                ratio,
                "(reported)",
                true,
            )
        );
    }

    if let Some(path) = breakdown_out {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "| hand-built Flannel path across nodes (each arm against Flannel's tables alone) | throughput ratio | softirq per Gbit, receiving node | kernel CPU per Gbit, receiving node | softirq per Gbit, sending node |"
        );
        let _ = writeln!(t, "|---|---|---|---|---|");
        let peer = FLANNEL_ACROSS;
        let cell = |xs: Vec<f64>| format!("{:.3} (±{:.3})", median(xs.clone()), spread(&xs));
        let breakdown_arms = arms.iter().skip(4).map(|(name, _)| name.as_str());
        for name in breakdown_arms.chain([TWILL_ACROSS]) {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} |",
                if name == TWILL_ACROSS {
                    "twill itself (twilld and twill-cni), for comparison"
                } else {
                    name
                },
                cell(runs.throughput_ratios(name, peer)),
                cell(runs.receiving_cpu_ratios(name, peer)),
                cell(runs.receiving_kernel_ratios(name, peer)),
                cell(runs.sending_cpu_ratios(name, peer)),
            );
        }
        let _ = writeln!(
            t,
            "\nEach cell: median of {rounds} per-round ratios against Flannel's tables alone in the same round (95% CI half-width); iperf3 {seconds} s per arm; Flannel's tables alone: {:.2} Gbit/s, {:.1} ms/Gbit softirq on the receiving node.",
            runs.gbit_per_s(peer),
            runs.receiving_ms_per_gbit(peer)
        );
        std::fs::write(&path, t).with_context(|| format!("writing {path}"))?;
    }
    twill.lab.teardown()?;
    hand.lab.teardown()?;
    Ok(())
}
