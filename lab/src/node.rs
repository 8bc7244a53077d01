//! Nodes: network namespaces joined to the lab's underlay switch (`<prefix>sw`, bridge `br0`) by
//! a veth pair each, set up as a Kubernetes node needs (forwarding, loose `rp_filter`,
//! br_netfilter's sysctls).

use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::exec::ns_exec_ok;
use crate::{run, Ipv4Net, Lab, SWITCH_ADDR, SWITCH_BRIDGE, UNDERLAY_PREFIX_LEN};

/// A node: a network namespace attached to the lab's switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Short name given to [`Lab::add_node`] (e.g. `n1`).
    pub name: String,
    /// Full network namespace name (`<prefix><name>`).
    pub netns: String,
    /// Index from 1 in order of creation; determines address and switch port.
    pub idx: u32,
    /// Underlay address of `eth0` (198.18.0.<10+idx>).
    pub addr: Ipv4Addr,
    /// Underlay interface inside the node (`eth0`).
    pub ifname: String,
    /// Peer of `eth0` inside the switch namespace, enslaved to `br0` (`n<idx>`).
    pub switch_port: String,
    /// Per-node directory for subnet.env, CNI data dirs, host-local state (`<lab dir>/<name>/`).
    pub dir: PathBuf,
}

impl Node {
    /// This node's twilld status socket (`--status-socket`): lab nodes share one filesystem,
    /// so each node's daemons need sockets of their own, in the node's directory.
    pub fn twilld_socket(&self) -> PathBuf {
        self.dir.join("twilld.sock")
    }

    /// This node's twill-policy status socket (`run --status-socket`), as
    /// [`Node::twilld_socket`].
    pub fn policy_socket(&self) -> PathBuf {
        self.dir.join("policy.sock")
    }

    /// Underlay address with its prefix length (198.18.0.<10+idx>/24).
    pub fn underlay(&self) -> Ipv4Net {
        Ipv4Net::new(self.addr, UNDERLAY_PREFIX_LEN).expect("valid prefix length")
    }

    /// This node's subnet.env (where twilld is told to write it).
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    /// The network config a runtime passes the `flannel` plugin for Flannel's default conflist
    /// (its first entry, with the list's name and cniVersion injected), with every per-node
    /// file under this node's directory: subnet.env, the saved delegate configs and
    /// host-local's state.
    pub fn flannel_netconf(&self) -> String {
        serde_json::json!({
            "cniVersion": "0.3.1",
            "name": "cbr0",
            "type": "flannel",
            "delegate": {"hairpinMode": true, "isDefaultGateway": true},
            "subnetFile": self.subnet_file(),
            "dataDir": self.dir.join("cni-flannel"),
            "ipam": {"dataDir": self.dir.join("cni-ipam")},
        })
        .to_string()
    }
}

impl Lab {
    /// Adds a node: namespace `<prefix><name>`, `lo` up, veth `eth0` (in the node) ⇄ `n<idx>`
    /// (in the switch, enslaved to `br0`), `eth0` 198.18.0.<10+idx>/24 up, default route via
    /// 198.18.0.1 (so "default-route interface" selection works; the switch has no uplink),
    /// `net.ipv4.ip_forward=1`, loose `rp_filter`, br_netfilter's sysctls (loading the module
    /// if they are missing) and the per-node directory `<lab dir>/<name>/`.
    pub fn add_node(&mut self, name: &str) -> Result<Node> {
        self.check_new_ns_name("node", name)?;
        let idx = self.next_node;
        if idx + 10 > 254 {
            bail!("lab {}: too many nodes", self.prefix);
        }
        self.next_node += 1;
        let node = Node {
            name: name.to_string(),
            netns: self.ns(name),
            idx,
            addr: Ipv4Addr::new(198, 18, 0, 10 + idx as u8),
            ifname: "eth0".into(),
            switch_port: format!("n{idx}"),
            dir: self.dir.join(name),
        };
        fs::create_dir_all(&node.dir)
            .with_context(|| format!("creating {}", node.dir.display()))?;
        let sw = self.switch_ns();
        run::ip(&["netns", "add", &node.netns])?;
        run::ip_batch(
            &node.netns,
            &[
                "link set lo up".into(),
                format!(
                    "link add {} type veth peer name {} netns {sw}",
                    node.ifname, node.switch_port
                ),
                format!("addr add {} dev {}", node.underlay(), node.ifname),
                format!("link set {} up", node.ifname),
                format!("route add default via {SWITCH_ADDR} dev {}", node.ifname),
            ],
        )?;
        run::ip_batch(
            &sw,
            &[format!(
                "link set {} master {SWITCH_BRIDGE} up",
                node.switch_port
            )],
        )?;
        // rp_filter set rather than inherited: a new namespace copies the root namespace's
        // value, which differs between hosts (strict 1 would drop what a test sends on
        // purpose). Loose (2) is the common distribution default for nodes.
        ns_exec_ok(
            &node.netns,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=2",
                "net.ipv4.conf.default.rp_filter=2",
            ],
        )?;
        ensure_br_netfilter(&node.netns)?;
        self.nodes.push(node.clone());
        Ok(node)
    }
}

/// A node has br_netfilter, as Kubernetes nodes must: twilld in iptables mode (Flannel's
/// default) refuses to start without its sysctls, as flanneld does. They are per network
/// namespace on current kernels, so they are looked for inside `ns`; when missing the module
/// is loaded (`modprobe br_netfilter`, the one host-wide step, as twill-policy takes it).
fn ensure_br_netfilter(ns: &str) -> Result<()> {
    const SYSCTL: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    let present = |ns: &str| ns_exec_ok(ns, &["test", "-e", SYSCTL]).is_ok();
    if present(ns) {
        return Ok(());
    }
    let what = "modprobe br_netfilter".to_string();
    let mut cmd = Command::new("modprobe");
    cmd.arg("br_netfilter");
    run::check(&what, run::run(cmd, &what, None, None)?)?;
    if !present(ns) {
        bail!("{SYSCTL} still missing in {ns} after modprobe br_netfilter");
    }
    Ok(())
}
