//! `twill-lab`: a cluster of "nodes" built out of network namespaces, for integration tests, the
//! quick-start demo and benchmarks.
//!
//! A [`Lab`] owns a *switch* namespace (`<prefix>sw`) holding the bridge `br0` (198.18.0.1/24),
//! node namespaces joined to it by veth pairs (`eth0` in the node, `n<idx>` on the switch,
//! node address 198.18.0.<10+idx>/24), optionally a real etcd listening on the switch, pods
//! (namespaces attached by hand or through a real CNI plugin) and processes spawned inside any of
//! its namespaces. Everything it creates carries a per-lab unique prefix and is removed when the
//! `Lab` is dropped (also while a test panics) or by [`Lab::teardown`], which reports every error.
//!
//! Rules this crate keeps: the underlay is 198.18.0.0/24 inside the lab only; the root
//! namespace's links, routes and nftables are never touched (veth pairs are created inside lab
//! namespaces); every client (ping, etcdctl, CNI plugins) runs inside a lab namespace.
//!
//! The library is synchronous: it drives `ip`, `etcd`, `etcdctl` and `ping` with
//! [`std::process::Command`].
//!
//! Modules by job (the items are re-exported here): `names` (unique prefixes, name checks),
//! `lifecycle` (creating, persisting, loading and tearing down a [`Lab`], also on drop),
//! `node` (nodes and the underlay switch), `exec` (commands inside a lab namespace),
//! `process` (spawned processes), `etcd`, `pod` (pods and their CNI attachments), `state`
//! (state files, stale labs), `run` (running `ip` and other programs), `harness` (helpers for
//! tests: [`bin_path`], [`require_root`]), and the public [`flannel`], [`ping`], [`probe`] and
//! [`quickstart`].
#![warn(missing_docs)]

mod etcd;
mod exec;
pub mod flannel;
mod harness;
mod lifecycle;
mod names;
mod node;
pub mod ping;
mod pod;
pub mod probe;
mod process;
pub mod quickstart;
mod run;
mod state;

use std::net::Ipv4Addr;
use std::path::PathBuf;

pub use harness::{bin_path, require_root};
pub use ipnet::Ipv4Net;
pub use nix::sys::signal::Signal;
pub use node::Node;
pub use pod::{cni_result_ipv4, CniAttachment, Pod};
pub use process::ProcId;
pub use run::list_netns;
pub use state::{cleanup_stale, list_labs, state_path, LabInfo, LabOwner};

pub(crate) use names::lab_dir;
pub(crate) use process::ProcRecord;

use process::Proc;

/// Short name of the switch namespace (the full name is `<prefix>sw`).
pub const SWITCH: &str = "sw";
/// Name of the bridge inside the switch namespace.
pub const SWITCH_BRIDGE: &str = "br0";
/// Address of the switch's bridge: the nodes' default gateway and etcd's address.
pub const SWITCH_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Prefix length of the underlay network 198.18.0.0/24.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// The etcd client endpoint reachable from every node once [`Lab::start_etcd`] succeeded.
pub const ETCD_ENDPOINT: &str = "http://198.18.0.1:2379";
/// Directory of the reference CNI plugins (Debian's `containernetworking-plugins`).
pub const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";
/// Name of the pod bridge that [`Lab::add_manual_pod`] creates in a node (as the bridge plugin does).
pub const POD_BRIDGE: &str = "cni0";

/// Directory holding lab directories (`twill-lab-<prefix>`) and state files.
pub(crate) const LAB_ROOT: &str = "/tmp";

/// A cluster in network namespaces. Owns everything it created; dropping it tears everything
/// down (processes, namespaces, the lab directory) unless it was [detached](Lab::persist).
///
/// Its methods live with their job: `lifecycle`, `node`, `exec`, `process`, `etcd`, `pod` and
/// [`flannel`]; the fields are private to this crate's modules.
#[derive(Debug)]
pub struct Lab {
    name: String,
    prefix: String,
    dir: PathBuf,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    procs: Vec<Proc>,
    etcd: Option<ProcId>,
    next_node: u32,
    next_pod: u32,
    /// A lab loaded from / persisted to a state file: Drop leaves it alone.
    detached: bool,
    done: bool,
}
