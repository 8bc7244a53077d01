//! Flannel's node state made by hand, and normalised snapshots of a node's observable state
//! for before/after comparisons (migrations between Flannel and twill).
//!
//! flanneld itself cannot run here (no Go toolchain or module proxy), so [`Lab::flannel_start`]
//! does, step by step and in flanneld's order, what flanneld v0.28.9 does when it starts on a
//! VXLAN node in etcd mode, following flannel's `pkg/subnet/etcd` (the lease), `pkg/backend/vxlan`
//! (the device and the peers) and `pkg/trafficmngr` (the rules): keep a compatible `flannel.1` (or create it), write the
//! lease again under a new 24 h etcd lease, address the device, install the masquerade and
//! forward rules of the configured mode after deleting the other mode's, write subnet.env,
//! program every peer (permanent neighbour, FDB entry, onlink route).
//! Stopping flanneld needs no counterpart: on SIGTERM v0.28.9 tears nothing down (its
//! traffic managers clean the other mode's rules at start, not their own at exit), so device,
//! entries, lease, subnet.env and rules all stay.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use crate::{run, Ipv4Net, Lab, Node};

/// Where flanneld puts its masquerade and forward rules (`EnableNFTables` in net-conf.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlannelRules {
    /// `EnableNFTables: true`: tables `ip flannel-ipv4` and `ip6 flannel-ipv6`.
    Nftables,
    /// The default: chains `nat FLANNEL-POSTRTG` and `filter FLANNEL-FWD`, jumped to from
    /// POSTROUTING and FORWARD.
    Iptables,
}

/// One lab node as flanneld runs it: VXLAN, VNI 1, port 8472, etcd mode, IPv4 only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlannelNode {
    /// Short name of the lab node.
    pub node: String,
    /// The flannel Network (net-conf.json `Network`).
    pub network: Ipv4Net,
    /// The node's lease.
    pub subnet: Ipv4Net,
    /// The VTEP MAC of `flannel.1`, advertised in the lease.
    pub vtep_mac: String,
    /// `--ip-masq` (kube-flannel.yml passes it): the masquerade rules.
    pub ip_masq: bool,
    /// Which rules flanneld writes.
    pub rules: FlannelRules,
    /// `--etcd-prefix`.
    pub etcd_prefix: String,
}

/// A peer as flanneld's lease watch sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlannelPeer {
    /// The peer's lease.
    pub subnet: Ipv4Net,
    /// Its VtepMAC.
    pub vtep_mac: String,
    /// Its PublicIP.
    pub public_ip: Ipv4Addr,
}

/// MTU of `flannel.1` and `FLANNEL_MTU` on a lab node: eth0's 1500 minus VXLAN's 50.
pub const FLANNEL_MTU: u32 = 1450;

/// The etcd key of a lease: `<prefix>/subnets/10.244.1.0-24`.
pub fn lease_key(prefix: &str, subnet: Ipv4Net) -> String {
    format!(
        "{}/subnets/{}-{}",
        prefix.trim_end_matches('/'),
        subnet.network(),
        subnet.prefix_len()
    )
}

/// The lease value flanneld writes for an IPv4 VXLAN node (Go's field order, `PublicIPv6`
/// always present).
pub fn lease_value(public_ip: Ipv4Addr, vtep_mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{vtep_mac}"}}}}"#
    )
}

/// subnet.env as flanneld writes it for an IPv4 node.
fn subnet_env_text(network: Ipv4Net, subnet: Ipv4Net, mtu: u32, ip_masq: bool) -> String {
    let first = Ipv4Addr::from(u32::from(subnet.network()) + 1);
    format!(
        "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={first}/{}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={ip_masq}\n",
        network.trunc(),
        subnet.prefix_len()
    )
}

/// flanneld's nftables transactions at start, in its order: both tables (Init), the postrtg
/// chain (masquerade, with `--ip-masq`), the forward chain; each chain added, flushed and
/// filled in one go.
fn nft_script(network: Ipv4Net, subnet: Ipv4Net, ip_masq: bool, fully_random: bool) -> String {
    let n = network.trunc();
    let p = subnet.trunc();
    let masq = if fully_random {
        "masquerade fully-random"
    } else {
        "masquerade"
    };
    let mut s = String::from(
        "add table ip flannel-ipv4 { comment \"rules for flannel-ipv4\" ; }\n\
         add table ip6 flannel-ipv6 { comment \"rules for flannel-ipv6\" ; }\n",
    );
    if ip_masq {
        let c = "ip flannel-ipv4 postrtg";
        s += &format!("add chain {c} {{ type nat hook postrouting priority srcnat ; comment \"chain to manage traffic masquerading by flannel\" ; }}\n");
        s += &format!("flush chain {c}\n");
        s += &format!("add rule {c} meta mark 0x4000 return\n");
        s += &format!("add rule {c} ip saddr {p} ip daddr {n} return\n");
        s += &format!("add rule {c} ip saddr {n} ip daddr {p} return\n");
        s += &format!("add rule {c} ip saddr != {p} ip daddr {n} return\n");
        s += &format!("add rule {c} ip saddr {n} ip daddr != 224.0.0.0/4 {masq}\n");
        s += &format!("add rule {c} ip saddr != {n} ip daddr {n} {masq}\n");
    }
    let c = "ip flannel-ipv4 forward";
    s += &format!("add chain {c} {{ type filter hook forward priority filter ; comment \"chain to accept flannel traffic\" ; }}\n");
    s += &format!("flush chain {c}\n");
    s += &format!("add rule {c} ip saddr {n} accept\n");
    s += &format!("add rule {c} ip daddr {n} accept\n");
    s
}

/// One iptables rule of flanneld's: table, chain, rule spec.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IptRule {
    /// `nat` or `filter`.
    pub table: &'static str,
    /// The chain it is appended to.
    pub chain: &'static str,
    /// The rule spec as iptables arguments.
    pub spec: Vec<String>,
}

impl IptRule {
    fn new(table: &'static str, chain: &'static str, spec: &[&str]) -> IptRule {
        IptRule {
            table,
            chain,
            spec: spec.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The rule as an iptables-restore line with `action` (`-A` or `-D`), arguments quoted
    /// where they hold spaces (the comments).
    pub fn line(&self, action: &str) -> String {
        let mut s = format!("{action} {}", self.chain);
        for a in &self.spec {
            if a.contains(' ') {
                s += &format!(" \"{a}\"");
            } else {
                s += &format!(" {a}");
            }
        }
        s
    }
}

/// flanneld's iptables rules (`masqRules` with `--ip-masq`, then `forwardRules`), each chain's
/// jump first.
fn iptables_rules(
    network: Ipv4Net,
    subnet: Ipv4Net,
    ip_masq: bool,
    random_fully: bool,
) -> Vec<IptRule> {
    let n = network.trunc().to_string();
    let p = subnet.trunc().to_string();
    let masq_c = ["-m", "comment", "--comment", "flanneld masq"];
    let fwd_c = ["-m", "comment", "--comment", "flanneld forward"];
    let masquerade: &[&str] = if random_fully {
        &["-j", "MASQUERADE", "--random-fully"]
    } else {
        &["-j", "MASQUERADE"]
    };
    let mut out = Vec::new();
    if ip_masq {
        let nat = |chain, parts: &[&[&str]]| IptRule::new("nat", chain, &parts.concat());
        let pc = "FLANNEL-POSTRTG";
        out.push(nat("POSTROUTING", &[&masq_c, &["-j", pc]]));
        out.push(nat(
            pc,
            &[
                &["-m", "mark", "--mark", "0x4000/0x4000"],
                &masq_c,
                &["-j", "RETURN"],
            ],
        ));
        out.push(nat(
            pc,
            &[&["-s", &p, "-d", &n], &masq_c, &["-j", "RETURN"]],
        ));
        out.push(nat(
            pc,
            &[&["-s", &n, "-d", &p], &masq_c, &["-j", "RETURN"]],
        ));
        out.push(nat(
            pc,
            &[&["!", "-s", &n, "-d", &p], &masq_c, &["-j", "RETURN"]],
        ));
        out.push(nat(
            pc,
            &[&["-s", &n, "!", "-d", "224.0.0.0/4"], &masq_c, masquerade],
        ));
        out.push(nat(pc, &[&["!", "-s", &n, "-d", &n], &masq_c, masquerade]));
    }
    let filter = |chain, parts: &[&[&str]]| IptRule::new("filter", chain, &parts.concat());
    out.push(filter("FORWARD", &[&fwd_c, &["-j", "FLANNEL-FWD"]]));
    out.push(filter(
        "FLANNEL-FWD",
        &[&["-s", &n], &fwd_c, &["-j", "ACCEPT"]],
    ));
    out.push(filter(
        "FLANNEL-FWD",
        &[&["-d", &n], &fwd_c, &["-j", "ACCEPT"]],
    ));
    out
}

/// The config Flannel's CNI plugin hands the bridge plugin for its default conflist (the
/// delegate it builds from subnet.env), with host-local's state under `ipam_dir` so the lab removes it.
pub fn flannel_delegate_netconf(
    network: Ipv4Net,
    subnet: Ipv4Net,
    mtu: u32,
    ip_masq: bool,
    ipam_dir: &Path,
) -> String {
    serde_json::json!({
        "cniVersion": "0.3.1",
        "hairpinMode": true,
        "ipMasq": !ip_masq,
        "ipam": {
            "dataDir": ipam_dir,
            "ranges": [[{"subnet": subnet.trunc().to_string()}]],
            "routes": [{"dst": network.trunc().to_string()}],
            "type": "host-local",
        },
        "isDefaultGateway": true,
        "isGateway": true,
        "mtu": mtu,
        "name": "cbr0",
        "type": "bridge",
    })
    .to_string()
}

/// A node's observable state, section by section, normalised so that two captures of an
/// unchanged node are equal: nft counters and iptables packet counts zeroed, iptables-save's
/// timestamp comments dropped, nft tables in a fixed order (nft lists them in creation order,
/// which a delete and re-create changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSnapshot {
    /// Section name (`nft`, `iptables nat`, `flannel.1`, `routes`, ...) to its text.
    pub sections: BTreeMap<String, String>,
}

impl NodeSnapshot {
    /// The headers of the nft tables present (`table ip flannel-ipv4`).
    pub fn nft_tables(&self) -> BTreeSet<String> {
        self.sections
            .get("nft")
            .map(|s| {
                s.lines()
                    .filter(|l| l.starts_with("table "))
                    .map(|l| l.trim_end_matches(" {").to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The text of the nft table with this header (`table ip flannel-ipv4`), if present.
    pub fn nft_table(&self, header: &str) -> Option<String> {
        nft_blocks(self.sections.get("nft")?)
            .into_iter()
            .find(|b| b.lines().next() == Some(&format!("{header} {{")))
    }

    /// Lines that differ, per section: `<section>: - line` (only in `self`) and
    /// `<section>: + line` (only in `other`). Empty when equal.
    pub fn diff(&self, other: &NodeSnapshot) -> Vec<String> {
        let names: BTreeSet<&String> = self.sections.keys().chain(other.sections.keys()).collect();
        let mut out = Vec::new();
        for name in names {
            let a = self.sections.get(name).map(String::as_str).unwrap_or("");
            let b = other.sections.get(name).map(String::as_str).unwrap_or("");
            if a == b {
                continue;
            }
            let al: Vec<&str> = a.lines().collect();
            let bl: Vec<&str> = b.lines().collect();
            out.extend(
                line_diff(&al, &bl)
                    .into_iter()
                    .map(|l| format!("{name}: {l}")),
            );
        }
        out
    }
}

impl fmt::Display for NodeSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, text) in &self.sections {
            writeln!(f, "=== {name}")?;
            writeln!(f, "{}", text.trim_end())?;
        }
        Ok(())
    }
}

/// A line diff by longest common subsequence: `- line` only in `a`, `+ line` only in `b`, in
/// order. Snapshots are a few hundred lines, so the quadratic table is small.
fn line_diff(a: &[&str], b: &[&str]) -> Vec<String> {
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push(format!("+ {}", b[j]));
            j += 1;
        } else {
            out.push(format!("- {}", a[i]));
            i += 1;
        }
    }
    out
}

/// Splits `nft list ruleset` output into its top-level `table ... { ... }` blocks.
fn nft_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if line.starts_with("table ") && !cur.is_empty() {
            blocks.push(std::mem::take(&mut cur));
        }
        if line.trim().is_empty() {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    if !cur.is_empty() {
        blocks.push(cur);
    }
    blocks
}

/// `nft list ruleset` with counters zeroed and tables sorted by header.
pub fn normalise_nft(text: &str) -> String {
    let mut blocks: Vec<String> = nft_blocks(text)
        .into_iter()
        .map(|b| {
            b.lines()
                .map(zero_nft_counters)
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        })
        .collect();
    blocks.sort();
    blocks.concat()
}

fn zero_nft_counters(line: &str) -> String {
    let words: Vec<&str> = line.split(' ').collect();
    let mut out = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        if words[i] == "packets" && i + 3 < words.len() && words[i + 2] == "bytes" {
            out.push("packets 0 bytes 0");
            i += 4;
        } else {
            out.push(words[i]);
            i += 1;
        }
    }
    out.join(" ")
}

/// iptables-save output without its comments and with chain counters zeroed.
fn normalise_iptables_save(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => format!("{} [0:0]", &l[..i]),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

impl Lab {
    fn node_ns(&self, node: &str) -> Result<String> {
        Ok(self.node_checked(node)?.netns)
    }

    /// Runs a program in a node with `stdin`; stdout on success.
    fn ns_stdin(&self, ns: &str, argv: &[&str], stdin: &str) -> Result<String> {
        let what = format!("[{ns}] {}", argv.join(" "));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(argv);
        let out = run::check(&what, run::run(cmd, &what, Some(stdin.as_bytes()), None)?)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sets up `node` exactly as flanneld would with VXLAN: `flannel.1` (VNI 1, local = the
    /// node's underlay address, port 8472, no learning, MTU 1450) with `mac`, up, and the
    /// lease's base address `<subnet>.0/32`. For tests and benchmarks that need a Flannel node
    /// or the hand-made reference topology.
    pub fn flannel_by_hand(&self, node: &str, subnet: Ipv4Net, mac: &str) -> Result<()> {
        let n = self.node_checked(node)?;
        self.create_flannel_device(&n, mac)?;
        self.exec_ok(&n.netns, &["ip", "link", "set", "flannel.1", "up"])?;
        self.exec_ok(
            &n.netns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{}/32", subnet.network()),
                "dev",
                "flannel.1",
            ],
        )?;
        Ok(())
    }

    /// What flanneld programs on `node` for one VXLAN peer, in Flannel's order: permanent
    /// neighbour, FDB entry, onlink route.
    pub fn flannel_peer_by_hand(
        &self,
        node: &str,
        peer_subnet: Ipv4Net,
        peer_mac: &str,
        peer_addr: Ipv4Addr,
    ) -> Result<()> {
        let ns = self.node_checked(node)?.netns.clone();
        let base = peer_subnet.network().to_string();
        self.exec_ok(
            &ns,
            &[
                "ip",
                "neigh",
                "replace",
                &base,
                "lladdr",
                peer_mac,
                "dev",
                "flannel.1",
                "nud",
                "permanent",
            ],
        )?;
        self.exec_ok(
            &ns,
            &[
                "bridge",
                "fdb",
                "replace",
                peer_mac,
                "dev",
                "flannel.1",
                "dst",
                &peer_addr.to_string(),
                "self",
                "permanent",
            ],
        )?;
        self.exec_ok(
            &ns,
            &[
                "ip",
                "route",
                "replace",
                &peer_subnet.trunc().to_string(),
                "via",
                &base,
                "dev",
                "flannel.1",
                "onlink",
            ],
        )?;
        Ok(())
    }

    /// Creates `flannel.1` on `node` as flanneld's VXLAN backend does: VNI 1, local = the
    /// node's underlay address on its underlay interface, port 8472, no learning, with `mac`
    /// and MTU [`FLANNEL_MTU`]. It is left down and without an address: what follows differs
    /// between [`Lab::flannel_start`] and [`Lab::flannel_by_hand`].
    fn create_flannel_device(&self, node: &Node, mac: &str) -> Result<()> {
        let local = node.addr.to_string();
        self.exec_ok(
            &node.netns,
            &[
                "ip",
                "link",
                "add",
                "flannel.1",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &local,
                "dev",
                &node.ifname,
                "dstport",
                "8472",
                "nolearning",
            ],
        )?;
        self.exec_ok(
            &node.netns,
            &[
                "ip",
                "link",
                "set",
                "flannel.1",
                "address",
                mac,
                "mtu",
                &FLANNEL_MTU.to_string(),
            ],
        )?;
        Ok(())
    }

    /// Does on `f.node` what flanneld does when it starts (see the module doc), with `peers`
    /// as its lease watch reports them. Running it again on a node that holds Flannel's state
    /// is flanneld restarting: the device is kept, the lease re-put, the rules re-applied.
    pub fn flannel_start(&self, f: &FlannelNode, peers: &[FlannelPeer]) -> Result<()> {
        let node = self.node_checked(&f.node)?;
        let ns = node.netns.clone();
        // 1. The device: kept when compatible, else (re)created with the VTEP MAC.
        if !self.flannel_device_compatible(&ns, node.addr)? {
            let _ = self.exec(&ns, &["ip", "link", "del", "flannel.1"]);
            self.create_flannel_device(&node, &f.vtep_mac)?;
            self.exec_ok(
                &ns,
                &["sysctl", "-qw", "net.ipv6.conf.flannel/1.accept_ra=0"],
            )?;
        }
        // 2. The lease: written again under a new 24 h etcd lease (the reuse path).
        self.flannel_put_lease(f, node.addr)?;
        // 3. The device's address (the subnet's base as a /32), up.
        let base = format!("{}/32", f.subnet.network());
        self.exec_ok(&ns, &["ip", "addr", "replace", &base, "dev", "flannel.1"])?;
        self.exec_ok(&ns, &["ip", "link", "set", "flannel.1", "up"])?;
        // 4. Rules: the other mode's go first, then this mode's.
        match f.rules {
            FlannelRules::Nftables => {
                // flanneld "tries" to delete the iptables chains nat FLANNEL-POSTRTG and (sic)
                // nat FLANNEL-FWD; a chain still jumped to cannot be deleted, and that is
                // ignored.
                for chain in ["FLANNEL-POSTRTG", "FLANNEL-FWD"] {
                    let _ = self.exec(&ns, &["iptables", "-t", "nat", "-F", chain]);
                    let _ = self.exec(&ns, &["iptables", "-t", "nat", "-X", chain]);
                }
                let fully_random = self
                    .ns_stdin(
                        &ns,
                        &["nft", "-c", "-f", "-"],
                        "add table ip flannel-ipv4\nadd chain ip flannel-ipv4 masqueradeTest { type nat hook postrouting priority srcnat ; }\nadd rule ip flannel-ipv4 masqueradeTest masquerade fully-random\n",
                    )
                    .is_ok();
                self.ns_stdin(
                    &ns,
                    &["nft", "-f", "-"],
                    &nft_script(f.network, f.subnet, f.ip_masq, fully_random),
                )?;
            }
            FlannelRules::Iptables => {
                self.delete_nft_tables(&ns, &["ip flannel-ipv4", "ip6 flannel-ipv6"])?;
                let rules = iptables_rules(f.network, f.subnet, f.ip_masq, true);
                // ClearChain: create the chain, or flush it.
                for (table, chain) in [("nat", "FLANNEL-POSTRTG"), ("filter", "FLANNEL-FWD")] {
                    if table == "nat" && !f.ip_masq {
                        continue;
                    }
                    if !self
                        .exec(&ns, &["iptables", "-t", table, "-F", chain])?
                        .status
                        .success()
                    {
                        self.exec_ok(&ns, &["iptables", "-t", table, "-N", chain])?;
                    }
                }
                // Bootstrap: a rule that exists is deleted before it is appended, so the block
                // ends up contiguous at the end of its chain.
                let mut by_table: BTreeMap<&str, Vec<String>> = BTreeMap::new();
                for r in &rules {
                    let lines = by_table.entry(r.table).or_default();
                    if self.iptables_rule_exists(&ns, r)? {
                        lines.push(r.line("-D"));
                    }
                    lines.push(r.line("-A"));
                }
                self.iptables_restore(&ns, &by_table)?;
            }
        }
        // 5. subnet.env, then 6. the peers (the backend's lease watch runs after it).
        write_file_0644(
            &node.subnet_file(),
            &subnet_env_text(f.network, f.subnet, FLANNEL_MTU, f.ip_masq),
        )?;
        for p in peers {
            self.flannel_peer_by_hand(&f.node, p.subnet, &p.vtep_mac, p.public_ip)?;
        }
        Ok(())
    }

    /// What flanneld's lease watch does on `node` when `peer`'s lease is removed: deletes its
    /// neighbour, FDB entry and route (each best effort, as flanneld does).
    pub fn flannel_peer_removed(&self, node: &str, peer: &FlannelPeer) -> Result<()> {
        let ns = self.node_ns(node)?;
        let base = peer.subnet.network().to_string();
        let subnet = peer.subnet.trunc().to_string();
        let ip = peer.public_ip.to_string();
        let _ = self.exec(&ns, &["ip", "neigh", "del", &base, "dev", "flannel.1"]);
        let _ = self.exec(
            &ns,
            &[
                "bridge",
                "fdb",
                "del",
                &peer.vtep_mac,
                "dev",
                "flannel.1",
                "dst",
                &ip,
                "self",
            ],
        );
        let _ = self.exec(
            &ns,
            &[
                "ip",
                "route",
                "del",
                &subnet,
                "via",
                &base,
                "dev",
                "flannel.1",
            ],
        );
        Ok(())
    }

    /// Writes `f`'s lease into etcd as flanneld does: `Grant(86400)`, then the value put with
    /// that lease.
    fn flannel_put_lease(&self, f: &FlannelNode, public_ip: Ipv4Addr) -> Result<()> {
        let grant = self.etcdctl(&["lease", "grant", "86400"])?;
        // "lease 694d8a2b3c4d5e6f granted with TTL(86400s)"
        let id = grant
            .split_whitespace()
            .nth(1)
            .ok_or_else(|| anyhow!("etcdctl lease grant printed {grant:?}"))?;
        self.etcdctl(&[
            "put",
            &format!("--lease={id}"),
            &lease_key(&f.etcd_prefix, f.subnet),
            &lease_value(public_ip, &f.vtep_mac),
        ])?;
        Ok(())
    }

    fn flannel_device_compatible(&self, ns: &str, local: Ipv4Addr) -> Result<bool> {
        let out = self.exec(ns, &["ip", "-d", "-j", "link", "show", "flannel.1"])?;
        if !out.status.success() {
            return Ok(false);
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| "parsing ip -d -j link show flannel.1")?;
        let info = &v[0]["linkinfo"];
        let data = &info["info_data"];
        Ok(info["info_kind"] == "vxlan"
            && data["id"] == 1
            && data["local"] == local.to_string()
            && data["port"] == 8472)
    }

    fn delete_nft_tables(&self, ns: &str, tables: &[&str]) -> Result<()> {
        let script: String = tables
            .iter()
            .map(|t| format!("add table {t}\ndelete table {t}\n"))
            .collect();
        self.ns_stdin(ns, &["nft", "-f", "-"], &script).map(|_| ())
    }

    fn iptables_rule_exists(&self, ns: &str, r: &IptRule) -> Result<bool> {
        let mut argv = vec!["iptables", "-t", r.table, "-C", r.chain];
        argv.extend(r.spec.iter().map(String::as_str));
        Ok(self.exec(ns, &argv)?.status.success())
    }

    fn iptables_restore(&self, ns: &str, by_table: &BTreeMap<&str, Vec<String>>) -> Result<()> {
        let mut payload = String::new();
        for (table, lines) in by_table {
            if lines.is_empty() {
                continue;
            }
            payload += &format!("*{table}\n");
            for l in lines {
                payload += l;
                payload.push('\n');
            }
            payload += "COMMIT\n";
        }
        if payload.is_empty() {
            return Ok(());
        }
        self.ns_stdin(ns, &["iptables-restore", "--noflush", "--wait"], &payload)
            .map(|_| ())
    }

    /// Captures `node`'s observable state, normalised (see [`NodeSnapshot`]): `nft list
    /// ruleset`, `iptables-save` of nat and filter, `flannel.1` (`ip -d -4 addr`, ifindex
    /// included: a re-created device differs), the main IPv4 routing table, the permanent
    /// neighbours and the FDB of `flannel.1`, subnet.env, and the value of etcd key
    /// `lease_key` if given (the value only: the etcd lease and its expiry are not part of it).
    pub fn node_snapshot(&self, node: &str, lease_key: Option<&str>) -> Result<NodeSnapshot> {
        let n = self.node_checked(node)?;
        let ns = n.netns.clone();
        let mut s = BTreeMap::new();
        let out = |argv: &[&str]| -> Result<String> {
            let o = self.exec(&ns, argv)?;
            Ok(if o.status.success() {
                String::from_utf8_lossy(&o.stdout).into_owned()
            } else {
                format!("(absent: {})\n", String::from_utf8_lossy(&o.stderr).trim())
            })
        };
        s.insert(
            "nft".into(),
            normalise_nft(&self.exec_ok(&ns, &["nft", "list", "ruleset"])?),
        );
        for table in ["nat", "filter"] {
            s.insert(
                format!("iptables {table}"),
                normalise_iptables_save(&self.exec_ok(&ns, &["iptables-save", "-t", table])?),
            );
        }
        s.insert(
            "flannel.1".into(),
            out(&["ip", "-d", "-4", "addr", "show", "dev", "flannel.1"])?,
        );
        s.insert(
            "routes".into(),
            out(&["ip", "-4", "route", "show", "table", "main"])?,
        );
        s.insert(
            "neighbours flannel.1".into(),
            out(&[
                "ip",
                "neigh",
                "show",
                "dev",
                "flannel.1",
                "nud",
                "permanent",
            ])?,
        );
        s.insert(
            "fdb flannel.1".into(),
            out(&["bridge", "fdb", "show", "dev", "flannel.1"])?,
        );
        s.insert(
            "subnet.env".into(),
            fs::read_to_string(n.subnet_file()).unwrap_or_else(|e| format!("(absent: {e})\n")),
        );
        if let Some(key) = lease_key {
            let v = self.etcdctl(&["get", key, "--print-value-only"])?;
            s.insert(format!("etcd {key}"), v);
        }
        Ok(NodeSnapshot { sections: s })
    }
}

/// Writes a file as flanneld writes subnet.env: temp file and rename, mode 0644.
fn write_file_0644(path: &Path, text: &str) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow!("bad file name {}", path.display()))?
    ));
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Why a node's snapshot is not what a test expected, for assertion messages.
fn explain_diff(before: &NodeSnapshot, after: &NodeSnapshot) -> String {
    let d = before.diff(after);
    if d.is_empty() {
        return "no difference".into();
    }
    d.join("\n")
}

/// Fails with the differing lines when two snapshots differ.
pub fn ensure_same(what: &str, before: &NodeSnapshot, after: &NodeSnapshot) -> Result<()> {
    if before != after {
        bail!(
            "{what}: the node's state differs:\n{}\n--- before\n{before}\n--- after\n{after}",
            explain_diff(before, after)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn lease_key_value_and_subnet_env_are_flannels() {
        let subnet = net("10.244.100.0/24");
        assert_eq!(
            lease_key("/coreos.com/network", subnet),
            "/coreos.com/network/subnets/10.244.100.0-24"
        );
        assert_eq!(
            lease_value("198.18.0.11".parse().unwrap(), "0e:fa:00:00:64:01"),
            r#"{"PublicIP":"198.18.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:fa:00:00:64:01"}}"#
        );
        assert_eq!(
            subnet_env_text(net("10.244.0.0/16"), subnet, 1450, true),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.100.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
    }

    #[test]
    fn iptables_rules_render_as_the_golden_iptables_save_lines() {
        let rules = iptables_rules(net("10.244.0.0/16"), net("10.244.1.0/24"), true, true);
        let lines: Vec<String> = rules.iter().map(|r| r.line("-A")).collect();
        assert_eq!(
            lines,
            [
                "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG",
                "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN",
                "-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN",
                "-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN",
                "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN",
                "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully",
                "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully",
                "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD",
                "-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
                "-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
            ]
        );
        assert_eq!(
            iptables_rules(net("10.244.0.0/16"), net("10.244.1.0/24"), false, true).len(),
            3
        );
    }

    #[test]
    fn nft_listing_is_normalised() {
        let a = "table ip b {\n\tchain c {\n\t\tcounter packets 3 bytes 180 drop\n\t}\n}\ntable inet a {\n}\n";
        let b = "table inet a {\n}\ntable ip b {\n\tchain c {\n\t\tcounter packets 0 bytes 0 drop\n\t}\n}\n";
        assert_eq!(normalise_nft(a), normalise_nft(b));
        let save = "# Generated by iptables-save v1.8.9 on Thu\n*nat\n:POSTROUTING ACCEPT [5:300]\nCOMMIT\n# Completed\n";
        assert_eq!(
            normalise_iptables_save(save),
            "*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"
        );
    }

    #[test]
    fn snapshot_diff_names_sections_and_lines() {
        let mut a = NodeSnapshot {
            sections: BTreeMap::new(),
        };
        a.sections.insert(
            "nft".into(),
            normalise_nft("table ip x {\n}\ntable inet twill-underlay {\n}\n"),
        );
        let mut b = a.clone();
        assert!(a.diff(&b).is_empty());
        b.sections
            .insert("nft".into(), normalise_nft("table ip x {\n}\n"));
        assert_eq!(
            a.diff(&b),
            ["nft: - table inet twill-underlay {", "nft: - }"]
        );
        assert_eq!(
            a.nft_tables(),
            BTreeSet::from(["table inet twill-underlay".to_string(), "table ip x".into()])
        );
        assert_eq!(a.nft_table("table ip x").unwrap(), "table ip x {\n}\n");
    }
}
