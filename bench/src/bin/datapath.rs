//! Datapath benchmark: pod-to-pod TCP throughput across two nodes (iperf3), through
//! twill (twilld with VXLAN and --ip-masq, pods attached by twill-cni) against the same
//! topology configured by hand with ip/bridge (flannel.1, neighbour, FDB, route, cni0, veths,
//! same MTUs), and the raw underlay between the nodes; rounds alternate, medians reported.
//!
//! The hand topology is measured in three arms, so that the cost of each layer shows:
//! bare (no nftables at all, so no conntrack either); plus Flannel's masquerade tables as
//! flanneld --ip-masq installs them in nftables mode (`twill::masq::ruleset`; twilld runs with
//! `EnableNFTables: true` so both sides hold the same tables; the NAT chain switches
//! conntrack on); plus twill's underlay guard (`twill::underlay::ruleset`). The target's peer
//! is the second: what a Flannel node with the same flags holds.
//!
//! Usage: datapath [--rounds R] [--seconds S]   (root; builds its own labs)

use std::time::Duration;

use anyhow::{bail, Context, Result};
use twill_bench::{median, table_row};
use twill_lab::{Ipv4Net, Lab};

/// nftables mode, so that twilld's node holds the very tables the hand topology's Flannel arm
/// loads (`twill::masq::ruleset`); without `EnableNFTables` twilld would use iptables chains.
const NET_CONF: &str =
    r#"{"Network":"10.244.0.0/16","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#;

/// Runs iperf3 from `client_ns` to `server_ip` (a server started in `server_ns`), in Gbit/s.
fn iperf(
    lab: &mut Lab,
    server_ns: &str,
    client_ns: &str,
    server_ip: &str,
    seconds: u32,
    tag: &str,
) -> Result<f64> {
    let server = lab.spawn(
        server_ns,
        &format!("iperf-s-{tag}"),
        &["iperf3", "-s", "-1"],
        &[],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let out = lab.exec_ok(
        client_ns,
        &["iperf3", "-c", server_ip, "-t", &seconds.to_string(), "-J"],
    )?;
    let _ = lab.wait(server, Duration::from_secs(5));
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("bits_per_second")?;
    Ok(bps / 1e9)
}

struct Twill {
    lab: Lab,
    pods: [(String, String); 2],
}

fn twill_cluster() -> Result<Twill> {
    let mut lab = Lab::new("bdt")?;
    let endpoint = lab.start_etcd()?;
    lab.etcdctl(&["put", "/coreos.com/network/config", NET_CONF])?;
    let twilld = twill_lab::bin_path("twilld").to_string_lossy().into_owned();
    let mut pods = Vec::new();
    for n in ["n1", "n2"] {
        let node = lab.add_node(n)?;
        let subnet_file = node.dir.join("subnet.env");
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
        let conf = node.flannel_netconf();
        let pod = lab.add_cni_pod(
            n,
            &format!("p{n}"),
            &twill_lab::bin_path("twill-cni"),
            &conf,
        )?;
        pods.push((pod.netns.clone(), pod.ip().to_string()));
    }
    let target = pods[1].1.clone();
    if !lab.wait_ping(&pods[0].0, target.parse()?, Duration::from_secs(20)) {
        bail!("twill pods cannot reach each other");
    }
    Ok(Twill {
        lab,
        pods: [pods[0].clone(), pods[1].clone()],
    })
}

/// The same topology by hand: what flanneld + the bridge plugin would leave in the kernel.
fn hand_cluster() -> Result<Twill> {
    let mut lab = Lab::new("bdh")?;
    let nodes = [lab.add_node("n1")?, lab.add_node("n2")?];
    let subnets: [Ipv4Net; 2] = ["10.244.1.0/24".parse()?, "10.244.2.0/24".parse()?];
    let macs = ["0e:00:00:00:01:00", "0e:00:00:00:02:00"];
    for (i, node) in nodes.iter().enumerate() {
        let j = 1 - i;
        lab.flannel_by_hand(&node.name, subnets[i], macs[i])?;
        lab.flannel_peer_by_hand(&node.name, subnets[j], macs[j], nodes[j].addr)?;
    }
    let mut pods = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let addr = Ipv4Net::new(
            std::net::Ipv4Addr::from(u32::from(subnets[i].network()) + 2),
            24,
        )?;
        let pod = lab.add_manual_pod(&node.name, &format!("h{}", node.name), addr)?;
        // The bridge plugin gives pods FLANNEL_MTU (1450) on both veth ends and on cni0.
        lab.exec_ok(&pod.netns, &["ip", "link", "set", "eth0", "mtu", "1450"])?;
        if let Some(host) = &pod.host_veth {
            lab.exec_ok(&node.netns, &["ip", "link", "set", host, "mtu", "1450"])?;
        }
        lab.exec_ok(&node.netns, &["ip", "link", "set", "cni0", "mtu", "1450"])?;
        pods.push((pod.netns.clone(), pod.ip().to_string()));
    }
    if !lab.wait_ping(&pods[0].0, pods[1].1.parse()?, Duration::from_secs(10)) {
        bail!("hand-made pods cannot reach each other");
    }
    Ok(Twill {
        lab,
        pods: [pods[0].clone(), pods[1].clone()],
    })
}

/// Applies an nft script inside `netns` (written to a file in the lab directory).
fn nft_in(lab: &Lab, netns: &str, tag: &str, script: &str) -> Result<()> {
    let path = lab.dir().join(format!("{netns}-{tag}.nft"));
    std::fs::write(&path, script)?;
    lab.exec_ok(netns, &["nft", "-f", path.to_str().unwrap()])?;
    Ok(())
}

/// The layers of the hand topology's arms, as nft scripts per node (Flannel's tables, the
/// guard), and the scripts that remove them.
fn hand_layers(hand: &Twill) -> Result<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    let subnets = ["10.244.1.0/24", "10.244.2.0/24"];
    for (i, n) in ["n1", "n2"].iter().enumerate() {
        let node = hand.lab.node(n);
        let peer = hand.lab.node(["n2", "n1"][i]);
        let flannel = twill::masq::ruleset(&twill::masq::MasqInput {
            network: "10.244.0.0/16".parse()?,
            subnet: subnets[i].parse()?,
            masquerade: true,
            fully_random: true,
            forward: true,
        });
        let guard = twill::underlay::ruleset(&twill::underlay::GuardInput {
            vxlan_port: Some(8472),
            external: node.ifname.clone(),
            networks: vec!["10.244.0.0/16".parse()?],
            own_subnets: vec![subnets[i].parse()?],
            peer_ips: [std::net::IpAddr::V4(peer.addr)].into_iter().collect(),
            peer_subnets: [subnets[1 - i].parse()?].into_iter().collect(),
        });
        out.push((node.netns.clone(), flannel, guard));
    }
    Ok(out)
}

fn main() -> Result<()> {
    if !twill_lab::require_root() {
        return Ok(());
    }
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: u32| -> u32 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (rounds, seconds) = (flag("--rounds", 5), flag("--seconds", 5));
    let mut twill = twill_cluster()?;
    let mut hand = hand_cluster()?;
    let layers = hand_layers(&hand)?;
    let no_flannel = "add table ip flannel-ipv4\ndelete table ip flannel-ipv4\n";
    let no_guard = "add table inet twill-underlay\ndelete table inet twill-underlay\n";
    // Per round: twill, hand bare, hand + Flannel's tables, hand + Flannel's + guard, underlay.
    let (mut t, mut bare, mut fl, mut fg, mut u) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut ratios = Vec::new();
    for r in 0..rounds {
        let [(c, _), (s, ip)] = twill.pods.clone();
        let tv = iperf(&mut twill.lab, &s, &c, &ip, seconds, &format!("t{r}"))?;
        let [(hc, _), (hs, hip)] = hand.pods.clone();
        let arm = |lab: &mut Lab, tag: &str, flannel: bool, guard: bool| -> Result<f64> {
            for (ns, fl_script, guard_script) in &layers {
                nft_in(
                    lab,
                    ns,
                    "flannel",
                    if flannel { fl_script } else { no_flannel },
                )?;
                nft_in(
                    lab,
                    ns,
                    "guard",
                    if guard { guard_script } else { no_guard },
                )?;
            }
            iperf(lab, &hs, &hc, &hip, seconds, &format!("{tag}{r}"))
        };
        let bv = arm(&mut hand.lab, "hb", false, false)?;
        let fv = arm(&mut hand.lab, "hf", true, false)?;
        let gv = arm(&mut hand.lab, "hg", true, true)?;
        let (n1, n2) = (
            hand.lab.node("n1").netns.clone(),
            hand.lab.node("n2").netns.clone(),
        );
        let n2ip = hand.lab.node("n2").addr.to_string();
        let uv = iperf(&mut hand.lab, &n2, &n1, &n2ip, seconds, &format!("u{r}"))?;
        eprintln!(
            "round {r}: twill {tv:.2} Gbit/s; by hand: bare {bv:.2}, + Flannel's tables {fv:.2}, + guard {gv:.2}; underlay {uv:.2} Gbit/s"
        );
        t.push(tv);
        bare.push(bv);
        fl.push(fv);
        fg.push(gv);
        u.push(uv);
        ratios.push(tv / fv);
    }
    let (tv, bv, fv, gv, uv) = (median(t), median(bare), median(fl), median(fg), median(u));
    let ratio = median(ratios);
    println!(
        "{}",
        table_row(
            &format!("pod-to-pod TCP across nodes, iperf3 {seconds} s (median of {rounds} rounds, ratio per round)"),
            &format!("{tv:.2} Gbit/s"),
            &format!("{fv:.2} Gbit/s (same topology by hand + Flannel's --ip-masq tables)"),
            ratio,
            "ratio ≥ 0.95",
            ratio >= 0.95
        )
    );
    println!(
        "{}",
        table_row(
            "pod-to-pod TCP vs the hand topology without any nftables (no conntrack)",
            &format!("{tv:.2} Gbit/s"),
            &format!("{bv:.2} Gbit/s (by hand, bare)"),
            tv / bv,
            "(reported)",
            true
        )
    );
    println!(
        "{}",
        table_row(
            "cost of the underlay guard alone: hand + Flannel's tables + guard vs without guard",
            &format!("{gv:.2} Gbit/s"),
            &format!("{fv:.2} Gbit/s"),
            gv / fv,
            "(reported)",
            true
        )
    );
    println!(
        "{}",
        table_row(
            "pod-to-pod TCP vs raw underlay (node to node)",
            &format!("{tv:.2} Gbit/s"),
            &format!("{uv:.2} Gbit/s (underlay veth)"),
            tv / uv,
            "(reported)",
            true
        )
    );
    twill.lab.teardown()?;
    hand.lab.teardown()?;
    Ok(())
}
