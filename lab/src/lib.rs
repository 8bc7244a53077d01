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
//! Rules this crate keeps (see DESIGN.md, "The lab"): the underlay is 198.18.0.0/24 inside the
//! lab only; the root namespace's links, routes and nftables are never touched (veth pairs are
//! created inside lab namespaces); every client (ping, etcdctl, CNI plugins) runs inside a lab
//! namespace.
//!
//! The library is synchronous: it drives `ip`, `etcd`, `etcdctl` and `ping` with
//! [`std::process::Command`].
#![warn(missing_docs)]

pub mod flannel;
pub mod ping;
pub mod probe;
pub mod quickstart;
mod run;
mod state;

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::killpg;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

pub use ipnet::Ipv4Net;
pub use nix::sys::signal::Signal;
pub use run::list_netns;
pub use state::{cleanup_stale, list_labs, state_path, LabInfo, LabOwner};

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

static COUNTER: AtomicU32 = AtomicU32::new(0);

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

/// What a CNI plugin was called with and returned for a pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniAttachment {
    /// The plugin binary that was executed.
    pub bin: PathBuf,
    /// The network configuration passed on stdin.
    pub netconf: String,
    /// The `CNI_CONTAINERID` used (needed for DEL).
    pub container_id: String,
    /// The plugin's result (parsed stdout of ADD).
    pub result: serde_json::Value,
}

/// A pod: a network namespace whose `eth0` is attached to a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pod {
    /// Short name given when it was added.
    pub name: String,
    /// Full network namespace name (`<prefix><name>`).
    pub netns: String,
    /// Short name of the node it is attached to.
    pub node: String,
    /// Its IPv4 address with prefix length.
    pub addr: Ipv4Net,
    /// Interface inside the pod (`eth0`).
    pub ifname: String,
    /// Host side of the veth pair, inside the node (manual pods only).
    pub host_veth: Option<String>,
    /// Set for pods added through a CNI plugin.
    pub cni: Option<CniAttachment>,
}

impl Pod {
    /// The pod's IPv4 address without prefix length.
    pub fn ip(&self) -> Ipv4Addr {
        self.addr.addr()
    }
}

/// Handle of a process started by [`Lab::spawn`]; only meaningful for the lab that returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcId(usize);

/// What is known about a spawned process, also across processes (state file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ProcRecord {
    pub(crate) name: String,
    pub(crate) netns: String,
    pub(crate) pid: u32,
    pub(crate) start_time: u64,
    pub(crate) log: PathBuf,
}

#[derive(Debug)]
struct Proc {
    rec: ProcRecord,
    /// `None` for processes of a lab loaded from a state file.
    child: Option<Child>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Reaps the process if it exited; true while it runs.
    fn poll(&mut self) -> bool {
        if self.status.is_some() {
            return false;
        }
        match &mut self.child {
            Some(c) => match c.try_wait() {
                Ok(Some(st)) => {
                    self.status = Some(st);
                    false
                }
                Ok(None) => true,
                Err(_) => false,
            },
            None => run::pid_alive(self.rec.pid, self.rec.start_time),
        }
    }

    /// True while the pid number is still held by this process (running or zombie), so
    /// signalling its process group cannot hit anyone else.
    fn group_safe(&self) -> bool {
        self.status.is_none() && run::pid_present(self.rec.pid, self.rec.start_time)
    }

    fn signal_group(&self, sig: Signal) -> Result<()> {
        if !self.group_safe() {
            bail!(
                "process {} ({}) is not running",
                self.rec.name,
                self.rec.pid
            );
        }
        killpg(Pid::from_raw(self.rec.pid as i32), sig)
            .with_context(|| format!("killpg({}, {sig})", self.rec.pid))
    }
}

/// A cluster in network namespaces. Owns everything it created; dropping it tears everything
/// down (processes, namespaces, the lab directory) unless it was [detached](Lab::persist).
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

fn valid_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 24
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok {
        bail!("invalid {what} name {name:?}: use 1-24 chars [A-Za-z0-9_-], starting alphanumeric");
    }
    Ok(())
}

fn base36(mut n: u64, width: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut v = vec![b'0'; width];
    for slot in v.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(v).expect("ascii")
}

/// A fresh prefix `tw<pid:5><counter:2><random:1>-`: the pid (unique among live processes) and a
/// process-wide counter make it unique; the lab directory (created atomically) settles any rest.
fn gen_prefix() -> String {
    let pid = std::process::id() as u64;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) as u64;
    let r: u64 = rand::random::<u64>();
    format!(
        "tw{}{}{}-",
        base36(pid, 5),
        base36(n % (36 * 36), 2),
        base36(r, 1)
    )
}

/// Directory of the lab with this prefix: `/tmp/twill-lab-<prefix without trailing ->`.
pub(crate) fn lab_dir(prefix: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(format!("twill-lab-{}", prefix.trim_end_matches('-')))
}

impl Lab {
    /// Creates a lab: a unique prefix (`tw…-`), its directory `/tmp/twill-lab-<prefix>/`, and the
    /// switch namespace `<prefix>sw` with `lo` up and bridge `br0` (198.18.0.1/24) up.
    /// `name` labels the lab (state file name, listings); it need not be unique among test labs.
    ///
    /// The first call in a process also removes stale labs left by dead processes
    /// ([`cleanup_stale`]), best effort.
    pub fn new(name: &str) -> Result<Lab> {
        valid_name("lab", name)?;
        static CLEANUP: std::sync::Once = std::sync::Once::new();
        CLEANUP.call_once(|| {
            if let Err(e) = cleanup_stale() {
                let _ = writeln!(std::io::stderr(), "twill-lab: {e:#}");
            }
        });
        let existing: HashSet<String> = list_netns()?.into_iter().collect();
        let mut attempt = 0;
        let (prefix, dir) = loop {
            attempt += 1;
            let prefix = gen_prefix();
            let dir = lab_dir(&prefix);
            if existing.iter().any(|n| n.starts_with(&prefix)) {
                continue;
            }
            match fs::create_dir(&dir) {
                Ok(()) => break (prefix, dir),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 50 => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
            }
        };
        let lab = Lab {
            name: name.to_string(),
            prefix,
            dir,
            nodes: Vec::new(),
            pods: Vec::new(),
            procs: Vec::new(),
            etcd: None,
            next_node: 1,
            next_pod: 1,
            detached: false,
            done: false,
        };
        // From here on, an early return drops `lab`, which removes whatever was made.
        state::write_owner_self(&lab.dir, name)?;
        let sw = lab.ns(SWITCH);
        run::ip(&["netns", "add", &sw])?;
        run::ip_batch(
            &sw,
            &[
                "link set lo up".into(),
                format!("link add {SWITCH_BRIDGE} type bridge"),
                format!("addr add {SWITCH_ADDR}/{UNDERLAY_PREFIX_LEN} dev {SWITCH_BRIDGE}"),
                format!("link set {SWITCH_BRIDGE} up"),
            ],
        )?;
        Ok(lab)
    }

    /// The lab's label given to [`Lab::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The unique prefix of every namespace of this lab (e.g. `tw01a2b03x-`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lab directory (`/tmp/twill-lab-<prefix>/`): logs, etcd data, per-node directories.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Full namespace name for a short name (`sw`, a node or a pod): `<prefix><short>`.
    /// A name that already carries the prefix is returned unchanged.
    pub fn ns(&self, short: &str) -> String {
        if short.starts_with(&self.prefix) {
            short.to_string()
        } else {
            format!("{}{}", self.prefix, short)
        }
    }

    /// Full name of the switch namespace (`<prefix>sw`).
    pub fn switch_ns(&self) -> String {
        self.ns(SWITCH)
    }

    /// All nodes, in order of creation.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// All pods, in order of creation.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The node named `name`. Panics if there is none (use [`Lab::try_node`] otherwise).
    pub fn node(&self, name: &str) -> &Node {
        self.try_node(name)
            .unwrap_or_else(|| panic!("lab {} has no node {name:?}", self.prefix))
    }

    /// The node named `name`, if any.
    pub fn try_node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The pod named `name`. Panics if there is none (use [`Lab::try_pod`] otherwise).
    pub fn pod(&self, name: &str) -> &Pod {
        self.try_pod(name)
            .unwrap_or_else(|| panic!("lab {} has no pod {name:?}", self.prefix))
    }

    /// The pod named `name`, if any.
    pub fn try_pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    fn node_checked(&self, name: &str) -> Result<Node> {
        self.try_node(name)
            .cloned()
            .ok_or_else(|| anyhow!("lab {} has no node {name:?}", self.prefix))
    }

    fn check_new_ns_name(&self, what: &str, name: &str) -> Result<()> {
        valid_name(what, name)?;
        if name == SWITCH || self.try_node(name).is_some() || self.try_pod(name).is_some() {
            bail!("lab {}: name {name:?} is already taken", self.prefix);
        }
        Ok(())
    }

    /// Resolves a short or full name to one of this lab's namespaces, refusing anything else
    /// (in particular the root namespace).
    fn own_ns(&self, netns: &str) -> Result<String> {
        let full = self.ns(netns);
        let short = &full[self.prefix.len()..];
        if short == SWITCH || self.try_node(short).is_some() || self.try_pod(short).is_some() {
            Ok(full)
        } else {
            bail!("{netns:?} is not a namespace of lab {}", self.prefix)
        }
    }

    // ---------------------------------------------------------------- nodes

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

    // ---------------------------------------------------------------- commands

    /// Runs `argv` inside one of the lab's namespaces (short or full name) and returns its output,
    /// whatever its exit status. Errors only if it cannot be started.
    pub fn exec(&self, netns: &str, argv: &[&str]) -> Result<Output> {
        self.exec_env(netns, argv, &[])
    }

    /// Like [`Lab::exec`] with extra environment variables.
    pub fn exec_env(&self, netns: &str, argv: &[&str], env: &[(&str, &str)]) -> Result<Output> {
        let ns = self.own_ns(netns)?;
        let (prog, args) = argv
            .split_first()
            .ok_or_else(|| anyhow!("exec: empty argv"))?;
        let what = format!("[{ns}] {}", run::render(prog, args));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns]).args(argv);
        cmd.envs(env.iter().copied());
        run::run(cmd, &what, None, None)
    }

    /// Runs `argv` inside a lab namespace; returns stdout on success, else an error with the
    /// command, its exit status, stderr and stdout.
    pub fn exec_ok(&self, netns: &str, argv: &[&str]) -> Result<String> {
        ns_exec_ok(&self.own_ns(netns)?, argv)
    }

    /// Pings `to` from a lab namespace: `count` echo requests, 0.2 s apart, giving up after
    /// `timeout`. True if the replies came (ping's exit status 0).
    pub fn ping(&self, from_netns: &str, to: IpAddr, count: u32, timeout: Duration) -> bool {
        let count = count.max(1).to_string();
        let deadline = timeout.as_secs().max(1).to_string();
        let to = to.to_string();
        self.exec(
            from_netns,
            &[
                "ping", "-n", "-q", "-c", &count, "-i", "0.2", "-W", "1", "-w", &deadline, &to,
            ],
        )
        .map(|o| o.status.success())
        .unwrap_or(false)
    }

    /// Retries [`Lab::ping`] (one echo each) until it succeeds or `timeout` passes.
    pub fn wait_ping(&self, from_netns: &str, to: IpAddr, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ping(from_netns, to, 1, Duration::from_secs(1)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    // ---------------------------------------------------------------- processes

    /// Starts `argv` inside a lab namespace (`ip netns exec`), in a process group of its own,
    /// with stdout and stderr appended to `<lab dir>/<name>.log`, stdin from /dev/null, and
    /// `env` added to the inherited environment. The lab stops it on teardown.
    pub fn spawn(
        &mut self,
        netns: &str,
        name: &str,
        argv: &[&str],
        env: &[(&str, &str)],
    ) -> Result<ProcId> {
        valid_name("process", name)?;
        let ns = self.own_ns(netns)?;
        if argv.is_empty() {
            bail!("spawn {name}: empty argv");
        }
        let log = self.dir.join(format!("{name}.log"));
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns])
            .args(argv)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning [{ns}] {}", argv.join(" ")))?;
        let pid = child.id();
        let start_time = run::proc_stat(pid).map(|(_, s)| s).unwrap_or(0);
        self.procs.push(Proc {
            rec: ProcRecord {
                name: name.to_string(),
                netns: ns,
                pid,
                start_time,
                log,
            },
            child: Some(child),
            status: None,
        });
        Ok(ProcId(self.procs.len() - 1))
    }

    fn proc(&self, id: ProcId) -> Result<&Proc> {
        self.procs
            .get(id.0)
            .ok_or_else(|| anyhow!("unknown process id {id:?}"))
    }

    fn proc_mut(&mut self, id: ProcId) -> Result<&mut Proc> {
        self.procs
            .get_mut(id.0)
            .ok_or_else(|| anyhow!("unknown process id {id:?}"))
    }

    /// Sends `signal` to the process group of a spawned process. Errors if it is not running.
    pub fn kill(&mut self, id: ProcId, signal: Signal) -> Result<()> {
        let p = self.proc_mut(id)?;
        p.poll();
        p.signal_group(signal)
    }

    /// True while the spawned process runs (reaps it once it exited).
    pub fn is_running(&mut self, id: ProcId) -> bool {
        self.proc_mut(id).map(|p| p.poll()).unwrap_or(false)
    }

    /// Waits up to `timeout` for a spawned process to exit; `Ok(None)` if it still runs.
    /// For processes of a lab loaded from a state file the exit status is unknown: errors once
    /// the process is gone.
    pub fn wait(&mut self, id: ProcId, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let p = self.proc_mut(id)?;
        loop {
            if !p.poll() {
                return p
                    .status
                    .map(Some)
                    .ok_or_else(|| anyhow!("{} exited; status unknown", p.rec.name));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM to the process group, then SIGKILL after `grace`; waits for the exit.
    pub fn stop(&mut self, id: ProcId, grace: Duration) -> Result<()> {
        let p = self.proc_mut(id)?;
        let errs = stop_procs(std::slice::from_mut(p), grace);
        if errs.is_empty() {
            Ok(())
        } else {
            bail!(errs.join("; "))
        }
    }

    /// Pid of a spawned process (the program itself: `ip netns exec` execs it).
    pub fn pid(&self, id: ProcId) -> Result<u32> {
        Ok(self.proc(id)?.rec.pid)
    }

    /// Path of a spawned process's log file.
    pub fn log_path(&self, id: ProcId) -> Result<PathBuf> {
        Ok(self.proc(id)?.rec.log.clone())
    }

    /// Contents of a spawned process's log so far (empty if unreadable).
    pub fn log(&self, id: ProcId) -> String {
        self.proc(id)
            .ok()
            .and_then(|p| fs::read(&p.rec.log).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Finds the most recently spawned process with this name.
    pub fn find_proc(&self, name: &str) -> Option<ProcId> {
        self.procs
            .iter()
            .rposition(|p| p.rec.name == name)
            .map(ProcId)
    }

    // ---------------------------------------------------------------- etcd

    /// Starts a real etcd (`/usr/bin/etcd`) in the switch namespace: clients on 198.18.0.1:2379
    /// and 127.0.0.1:2379, peer on 127.0.0.1:2380, data in `<lab dir>/etcd`, log in
    /// `<lab dir>/etcd.log`. Waits until `etcdctl endpoint health` (run in the switch) succeeds and
    /// returns the endpoint for nodes, [`ETCD_ENDPOINT`].
    pub fn start_etcd(&mut self) -> Result<String> {
        if let Some(id) = self.etcd {
            if self.is_running(id) {
                bail!("etcd is already running in lab {}", self.prefix);
            }
        }
        let data = self.dir.join("etcd");
        let data_s = data.to_string_lossy().into_owned();
        let client = format!("http://{SWITCH_ADDR}:2379,http://127.0.0.1:2379");
        let sw = self.switch_ns();
        let id = self.spawn(
            &sw,
            "etcd",
            &[
                "etcd",
                "--name",
                "sw",
                "--data-dir",
                &data_s,
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                ETCD_ENDPOINT,
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "sw=http://127.0.0.1:2380",
                "--initial-cluster-state",
                "new",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ],
            &[],
        )?;
        self.etcd = Some(id);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if !self.is_running(id) {
                bail!(
                    "etcd exited during start-up; log:\n{}",
                    tail(&self.log(id), 30)
                );
            }
            if self.etcdctl(&["endpoint", "health"]).is_ok() {
                return Ok(ETCD_ENDPOINT.to_string());
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd not healthy after 30s; log:\n{}",
                    tail(&self.log(id), 30)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The running etcd's process, if [`Lab::start_etcd`] was called (e.g. to SIGKILL it).
    pub fn etcd_proc(&self) -> Option<ProcId> {
        self.etcd
    }

    /// Stops etcd (SIGTERM, SIGKILL after 5 s), keeping its data directory.
    pub fn stop_etcd(&mut self) -> Result<()> {
        match self.etcd {
            Some(id) => self.stop(id, Duration::from_secs(5)),
            None => bail!("etcd was never started in lab {}", self.prefix),
        }
    }

    /// Stops etcd if it runs and starts it again on the same data directory.
    pub fn restart_etcd(&mut self) -> Result<String> {
        if let Some(id) = self.etcd {
            if self.is_running(id) {
                self.stop(id, Duration::from_secs(5))?;
            }
        }
        self.start_etcd()
    }

    /// Runs `ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:2379 ARGS` inside the switch namespace
    /// (dial timeout 2 s, command timeout 5 s) and returns stdout; the error includes stderr.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let mut argv = vec![
            "etcdctl",
            "--endpoints=127.0.0.1:2379",
            "--dial-timeout=2s",
            "--command-timeout=5s",
        ];
        argv.extend_from_slice(args);
        let ns = self.switch_ns();
        let what = format!("[{ns}] {}", argv.join(" "));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns])
            .args(&argv)
            .env("ETCDCTL_API", "3");
        let out = run::check(
            &what,
            run::run(cmd, &what, None, Some(Duration::from_secs(20)))?,
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    // ---------------------------------------------------------------- pods

    fn new_pod_ns(&mut self, pod: &str) -> Result<String> {
        let ns = self.ns(pod);
        run::ip(&["netns", "add", &ns])?;
        if let Err(e) = run::ip_batch(&ns, &["link set lo up".into()]) {
            let _ = run::ip(&["netns", "del", &ns]);
            return Err(e);
        }
        Ok(ns)
    }

    /// Adds a pod without CNI: namespace `<prefix><pod>`; in the node, bridge `cni0` with the
    /// gateway (first address of `addr`'s network) if absent, as the bridge plugin does with
    /// `isGateway`; a veth pair (host side `vp<n>` in the node, on `cni0`; `eth0` in the pod with
    /// `addr`) and a default route via the gateway. Routes between nodes are the caller's job.
    pub fn add_manual_pod(&mut self, node: &str, pod: &str, addr: Ipv4Net) -> Result<Pod> {
        self.check_new_ns_name("pod", pod)?;
        let node = self.node_checked(node)?;
        let gw = addr
            .hosts()
            .next()
            .ok_or_else(|| anyhow!("{addr}: network too small for a gateway"))?;
        if gw == addr.addr() {
            bail!("{addr}: pod address is the gateway address");
        }
        let gw_net = Ipv4Net::new(gw, addr.prefix_len())?;
        let host_veth = format!("vp{}", self.next_pod);
        self.next_pod += 1;
        let has_bridge = self
            .exec(&node.netns, &["ip", "link", "show", POD_BRIDGE])?
            .status
            .success();
        let mut lines = Vec::new();
        if !has_bridge {
            lines.push(format!("link add {POD_BRIDGE} type bridge"));
        }
        lines.push(format!("addr replace {gw_net} dev {POD_BRIDGE}"));
        lines.push(format!("link set {POD_BRIDGE} up"));
        run::ip_batch(&node.netns, &lines)?;
        let ns = self.new_pod_ns(pod)?;
        let res = run::ip_batch(
            &node.netns,
            &[
                format!("link add {host_veth} type veth peer name eth0 netns {ns}"),
                format!("link set {host_veth} master {POD_BRIDGE} up"),
            ],
        )
        .and_then(|()| {
            run::ip_batch(
                &ns,
                &[
                    format!("addr add {addr} dev eth0"),
                    "link set eth0 up".into(),
                    format!("route add default via {gw} dev eth0"),
                ],
            )
        });
        if let Err(e) = res {
            let _ = run::ip(&["netns", "del", &ns]);
            let _ = run::ip_batch(&node.netns, &[format!("link del {host_veth}")]);
            return Err(e);
        }
        let p = Pod {
            name: pod.to_string(),
            netns: ns,
            node: node.name.clone(),
            addr,
            ifname: "eth0".into(),
            host_veth: Some(host_veth),
            cni: None,
        };
        self.pods.push(p.clone());
        Ok(p)
    }

    fn cni_invoke(&self, command: &str, call: CniCall<'_>) -> Result<Vec<u8>> {
        let CniCall {
            node_ns,
            pod,
            pod_ns,
            container_id,
            bin,
            netconf,
        } = call;
        let mut cni_path = CNI_PLUGIN_DIR.to_string();
        if let Some(dir) = bin.parent().filter(|d| !d.as_os_str().is_empty()) {
            cni_path = format!("{}:{cni_path}", dir.display());
        }
        let what = format!("CNI {command} {} for {pod} in {node_ns}", bin.display());
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", node_ns])
            .arg(bin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", format!("/run/netns/{pod_ns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", cni_path)
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"),
            );
        let out = run::run(
            cmd,
            &what,
            Some(netconf.as_bytes()),
            Some(Duration::from_secs(60)),
        )?;
        Ok(run::check(&what, out)?.stdout)
    }

    /// Adds a pod through a CNI plugin: creates namespace `<prefix><pod>` and runs `cni_bin`
    /// inside the node's namespace with `CNI_COMMAND=ADD`, a unique `CNI_CONTAINERID`,
    /// `CNI_NETNS=/run/netns/<podns>`, `CNI_IFNAME=eth0`,
    /// `CNI_PATH=<dir of cni_bin>:/usr/lib/cni`, `CNI_ARGS` with `K8S_POD_NAME=<pod>`, and
    /// `netconf_json` on stdin. The pod's address is the first IPv4 address of the result.
    /// Put IPAM state under the node's directory (`"dataDir"`) so teardown removes it.
    pub fn add_cni_pod(
        &mut self,
        node: &str,
        pod: &str,
        cni_bin: &Path,
        netconf_json: &str,
    ) -> Result<Pod> {
        self.check_new_ns_name("pod", pod)?;
        let node = self.node_checked(node)?;
        let ns = self.new_pod_ns(pod)?;
        let container_id = format!("{}{}", self.prefix, pod);
        let res = self
            .cni_invoke(
                "ADD",
                CniCall {
                    node_ns: &node.netns,
                    pod,
                    pod_ns: &ns,
                    container_id: &container_id,
                    bin: cni_bin,
                    netconf: netconf_json,
                },
            )
            .and_then(|stdout| {
                let result: serde_json::Value =
                    serde_json::from_slice(&stdout).with_context(|| {
                        format!(
                            "CNI ADD result is not JSON: {}",
                            String::from_utf8_lossy(&stdout)
                        )
                    })?;
                let addr = cni_result_ipv4(&result)
                    .ok_or_else(|| anyhow!("no IPv4 address in CNI result {result}"))?;
                Ok((result, addr))
            });
        let (result, addr) = match res {
            Ok(v) => v,
            Err(e) => {
                let _ = run::ip(&["netns", "del", &ns]);
                return Err(e);
            }
        };
        let p = Pod {
            name: pod.to_string(),
            netns: ns,
            node: node.name.clone(),
            addr,
            ifname: "eth0".into(),
            host_veth: None,
            cni: Some(CniAttachment {
                bin: cni_bin.to_path_buf(),
                netconf: netconf_json.to_string(),
                container_id,
                result,
            }),
        };
        self.pods.push(p.clone());
        Ok(p)
    }

    /// Sets up `node` exactly as flanneld would with VXLAN: `flannel.1` (VNI 1, local = the
    /// node's underlay address, port 8472, no learning, MTU 1450) with `mac`, and the lease's
    /// base address `<subnet>.0/32`. For tests and benchmarks that need a Flannel node or the
    /// hand-made reference topology.
    pub fn flannel_by_hand(&self, node: &str, subnet: Ipv4Net, mac: &str) -> Result<()> {
        let n = self.node_checked(node)?;
        let ns = n.netns.clone();
        let local = n.addr.to_string();
        self.exec_ok(
            &ns,
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
                "eth0",
                "dstport",
                "8472",
                "nolearning",
            ],
        )?;
        self.exec_ok(
            &ns,
            &[
                "ip",
                "link",
                "set",
                "flannel.1",
                "address",
                mac,
                "mtu",
                "1450",
                "up",
            ],
        )?;
        self.exec_ok(
            &ns,
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

    /// Adds a pod whose network the caller attaches (with a CNI runtime of its own, say):
    /// creates namespace `<prefix><pod>` with `lo` up and calls `attach` with its full name;
    /// `attach` returns the pod's address. The namespace is removed again if `attach` fails.
    /// [`Lab::del_pod`] only deletes the namespace of such a pod: detaching is the caller's job.
    pub fn add_attached_pod(
        &mut self,
        node: &str,
        pod: &str,
        attach: impl FnOnce(&str) -> Result<Ipv4Net>,
    ) -> Result<Pod> {
        self.check_new_ns_name("pod", pod)?;
        let node = self.node_checked(node)?;
        let ns = self.new_pod_ns(pod)?;
        let addr = match attach(&ns) {
            Ok(a) => a,
            Err(e) => {
                let _ = run::ip(&["netns", "del", &ns]);
                return Err(e);
            }
        };
        let p = Pod {
            name: pod.to_string(),
            netns: ns,
            node: node.name.clone(),
            addr,
            ifname: "eth0".into(),
            host_veth: None,
            cni: None,
        };
        self.pods.push(p.clone());
        Ok(p)
    }

    /// Removes a pod. For a CNI pod, first runs the plugin with `CNI_COMMAND=DEL` (same config,
    /// with `prevResult` added as the CNI spec asks); then deletes the pod's namespace (and for a
    /// manual pod the host-side veth). The pod is forgotten even if DEL failed; the error is returned.
    pub fn del_pod(&mut self, pod: &str) -> Result<()> {
        let i = self
            .pods
            .iter()
            .position(|p| p.name == pod)
            .ok_or_else(|| anyhow!("lab {} has no pod {pod:?}", self.prefix))?;
        let p = self.pods.remove(i);
        let node_ns = self.ns(&p.node);
        let mut errs = Vec::new();
        if let Some(cni) = &p.cni {
            let conf = with_prev_result(&cni.netconf, &cni.result);
            if let Err(e) = self.cni_invoke(
                "DEL",
                CniCall {
                    node_ns: &node_ns,
                    pod: &p.name,
                    pod_ns: &p.netns,
                    container_id: &cni.container_id,
                    bin: &cni.bin,
                    netconf: &conf,
                },
            ) {
                errs.push(format!("{e:#}"));
            }
        }
        if let Err(e) = run::ip(&["netns", "del", &p.netns]) {
            errs.push(format!("{e:#}"));
        }
        if let Some(v) = &p.host_veth {
            // Usually gone with the pod's end already.
            let _ = run::ip_batch(&node_ns, &[format!("link del {v}")]);
        }
        if errs.is_empty() {
            Ok(())
        } else {
            bail!(errs.join("; "))
        }
    }

    // ---------------------------------------------------------------- teardown

    /// Removes everything: stops spawned processes (SIGTERM, SIGKILL after 3 s), kills whatever
    /// else runs in the lab's namespaces, deletes every namespace with the lab's prefix, removes
    /// the lab directory and, for a persisted lab, its state file. Keeps going after errors and
    /// reports all of them.
    pub fn teardown(mut self) -> Result<()> {
        let errs = self.teardown_inner();
        if errs.is_empty() {
            Ok(())
        } else {
            bail!("teardown of lab {}: {}", self.prefix, errs.join("; "))
        }
    }

    fn teardown_inner(&mut self) -> Vec<String> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let mut errs = stop_procs(&mut self.procs, Duration::from_secs(3));
        errs.extend(state::remove_prefix(&self.prefix, &self.dir));
        if self.detached {
            let sp = state_path(&self.name);
            if let Ok(s) = state::read_state(&self.name) {
                if s.prefix == self.prefix {
                    if let Err(e) = fs::remove_file(&sp) {
                        errs.push(format!("removing {}: {e}", sp.display()));
                    }
                }
            }
        }
        errs
    }

    /// Detaches the lab and writes its state to `/tmp/twill-lab-<name>.json` so another process
    /// can [`Lab::load`] it (`twill-lab exec`/`down`). Everything is left running. Fails if a
    /// different lab already uses that state file.
    pub fn persist(mut self) -> Result<PathBuf> {
        let path = state::write_state(&self.state())?;
        self.detached = true;
        Ok(path)
    }

    /// Loads a lab persisted under `name`. The result is detached: dropping it leaves the lab up;
    /// [`Lab::teardown`] removes it (and its state file); [`Lab::persist`] saves changes such as
    /// newly spawned processes.
    pub fn load(name: &str) -> Result<Lab> {
        let s = state::read_state(name)?;
        Ok(Lab {
            name: s.name,
            dir: lab_dir(&s.prefix),
            prefix: s.prefix,
            next_node: s.nodes.iter().map(|n| n.idx).max().unwrap_or(0) + 1,
            next_pod: s.next_pod,
            nodes: s.nodes,
            pods: s.pods,
            etcd: s
                .procs
                .iter()
                .rposition(|p| p.name == "etcd" && s.etcd)
                .map(ProcId),
            procs: s
                .procs
                .into_iter()
                .map(|rec| Proc {
                    rec,
                    child: None,
                    status: None,
                })
                .collect(),
            detached: true,
            done: false,
        })
    }

    fn state(&self) -> state::LabState {
        state::LabState {
            name: self.name.clone(),
            prefix: self.prefix.clone(),
            dir: self.dir.clone(),
            etcd: self.etcd.is_some(),
            nodes: self.nodes.clone(),
            pods: self.pods.clone(),
            procs: self.procs.iter().map(|p| p.rec.clone()).collect(),
            next_pod: self.next_pod,
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.detached || self.done {
            return;
        }
        if thread::panicking() {
            // The logs are about to be deleted: show their ends to whoever debugs the failure.
            for p in &self.procs {
                if let Ok(b) = fs::read(&p.rec.log) {
                    let s = String::from_utf8_lossy(&b);
                    let _ = writeln!(
                        std::io::stderr(),
                        "--- twill-lab {}: last lines of {} ({}) ---\n{}",
                        self.prefix,
                        p.rec.name,
                        p.rec.log.display(),
                        tail(&s, 20)
                    );
                }
            }
        }
        let errs = self.teardown_inner();
        if !errs.is_empty() {
            let _ = writeln!(
                std::io::stderr(),
                "twill-lab: teardown of {} reported: {}",
                self.prefix,
                errs.join("; ")
            );
        }
    }
}

/// Arguments of one CNI plugin invocation.
struct CniCall<'a> {
    node_ns: &'a str,
    pod: &'a str,
    pod_ns: &'a str,
    container_id: &'a str,
    bin: &'a Path,
    netconf: &'a str,
}

/// Stops processes: SIGTERM to every running group, wait up to `grace`, SIGKILL the rest, reap.
fn stop_procs(procs: &mut [Proc], grace: Duration) -> Vec<String> {
    let mut errs = Vec::new();
    let mut targets = Vec::new();
    for (i, p) in procs.iter_mut().enumerate() {
        // Only signal groups whose leader still holds its pid (running or zombie, not reaped).
        let alive = match &p.child {
            Some(_) => p.status.is_none() && run::pid_present(p.rec.pid, p.rec.start_time),
            None => run::pid_alive(p.rec.pid, p.rec.start_time),
        };
        if alive {
            let _ = killpg(Pid::from_raw(p.rec.pid as i32), Signal::SIGTERM);
            targets.push(i);
        }
    }
    let deadline = Instant::now() + grace;
    loop {
        let running = targets
            .iter()
            .any(|&i| run::pid_alive(procs[i].rec.pid, procs[i].rec.start_time));
        if !running || Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    for &i in &targets {
        let p = &mut procs[i];
        // Kill stragglers of the group (and the leader if it ignored SIGTERM); the leader is not
        // reaped yet, so the group id cannot belong to anyone else.
        if run::pid_present(p.rec.pid, p.rec.start_time) {
            let _ = killpg(Pid::from_raw(p.rec.pid as i32), Signal::SIGKILL);
        }
        match &mut p.child {
            Some(c) => match c.wait() {
                Ok(st) => p.status = Some(st),
                Err(e) => errs.push(format!("waiting for {}: {e}", p.rec.name)),
            },
            None => {
                let d = Instant::now() + Duration::from_secs(2);
                while run::pid_alive(p.rec.pid, p.rec.start_time) && Instant::now() < d {
                    thread::sleep(Duration::from_millis(20));
                }
                if run::pid_alive(p.rec.pid, p.rec.start_time) {
                    errs.push(format!("{} ({}) survived SIGKILL", p.rec.name, p.rec.pid));
                }
            }
        }
    }
    errs
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

/// Runs `argv` in namespace `ns`; stdout on success, else an error with status and stderr.
fn ns_exec_ok(ns: &str, argv: &[&str]) -> Result<String> {
    let what = format!("[{ns}] {}", argv.join(" "));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(argv);
    let out = run::check(&what, run::run(cmd, &what, None, None)?)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// First IPv4 address (with prefix length) in a CNI result: `ips[].address` (CNI ≥ 0.3) or
/// `ip4.ip` (CNI 0.2).
pub fn cni_result_ipv4(result: &serde_json::Value) -> Option<Ipv4Net> {
    let from_ips = result
        .get("ips")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str()?.parse::<Ipv4Net>().ok())
        .next();
    from_ips.or_else(|| result.get("ip4")?.get("ip")?.as_str()?.parse().ok())
}

/// `netconf` with `prevResult` set to `result` (for DEL), or `netconf` unchanged if it is not a
/// JSON object.
fn with_prev_result(netconf: &str, result: &serde_json::Value) -> String {
    match serde_json::from_str::<serde_json::Value>(netconf) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.insert("prevResult".into(), result.clone());
            serde_json::Value::Object(m).to_string()
        }
        _ => netconf.to_string(),
    }
}

/// Path of a binary built in this workspace: `$TWILL_BIN_DIR/<name>` if that variable is set,
/// else next to the current executable's cargo target directory (stepping out of `deps/` or
/// `examples/`), so integration tests find `twilld`/`twill-cni` built by
/// `cargo build --workspace --bins`.
pub fn bin_path(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("TWILL_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if matches!(
        dir.file_name().and_then(|n| n.to_str()),
        Some("deps" | "examples")
    ) {
        dir.pop();
    }
    dir.join(name)
}

/// Whether lab tests can run: true as root. Not root and `CI=true`: panics (CI must run them).
/// Not root otherwise: prints "skipping: lab tests need root" and returns false.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("lab tests need root, and CI=true: run the test suite as root in CI");
    }
    eprintln!("skipping: lab tests need root (network namespaces)");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_unique_and_short() {
        let a = gen_prefix();
        let b = gen_prefix();
        assert_ne!(a, b);
        assert_eq!(a.len(), 11, "{a}");
        assert!(a.starts_with("tw") && a.ends_with('-'));
        assert!(lab_dir(&a)
            .to_string_lossy()
            .ends_with(a.trim_end_matches('-')));
    }

    #[test]
    fn base36_pads() {
        assert_eq!(base36(0, 3), "000");
        assert_eq!(base36(35, 2), "0z");
        assert_eq!(base36(36, 2), "10");
    }

    #[test]
    fn names() {
        assert!(valid_name("x", "n1").is_ok());
        assert!(valid_name("x", "").is_err());
        assert!(valid_name("x", "-a").is_err());
        assert!(valid_name("x", "a b").is_err());
        assert!(valid_name("x", "a/b").is_err());
    }

    #[test]
    fn cni_results() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","ips":[{"address":"fd00::2/64"},{"address":"10.244.1.2/24","gateway":"10.244.1.1"}]}"#,
        )
        .unwrap();
        assert_eq!(cni_result_ipv4(&v), Some("10.244.1.2/24".parse().unwrap()));
        let v: serde_json::Value =
            serde_json::from_str(r#"{"cniVersion":"0.2.0","ip4":{"ip":"10.1.0.5/16"}}"#).unwrap();
        assert_eq!(cni_result_ipv4(&v), Some("10.1.0.5/16".parse().unwrap()));
        assert_eq!(cni_result_ipv4(&serde_json::json!({})), None);
    }

    #[test]
    fn prev_result_is_added() {
        let s = with_prev_result(r#"{"type":"bridge"}"#, &serde_json::json!({"ips":[]}));
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["prevResult"], serde_json::json!({"ips":[]}));
        assert_eq!(with_prev_result("nope", &serde_json::json!({})), "nope");
    }

    #[test]
    fn bin_path_uses_env_or_target_dir() {
        let p = bin_path("twilld");
        assert!(p.ends_with("twilld"));
        assert_ne!(
            p.parent()
                .and_then(|d| d.file_name())
                .and_then(|n| n.to_str()),
            Some("deps")
        );
    }
}
