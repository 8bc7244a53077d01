//! Shared helpers for twilld's lab tests: a cluster of nodes in network namespaces with real
//! etcd, twilld started per node, and readers for the kernel state each node holds.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use twill_formats::subnet_env::SubnetEnv;
use twill_lab::{Ipv4Net, Lab, ProcId, Signal};

pub const PREFIX: &str = "/coreos.com/network";

/// How long a test waits for something asynchronous to happen (daemons converging, a process
/// starting or exiting, a log line): generous, since CI runs on a busy 2-core machine and only
/// a failure ever waits this long.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// How often a test polls for a state it waits for: each poll starts processes (`ip netns
/// exec`), so polling faster would take CPU from the daemons being waited for.
pub const POLL: Duration = Duration::from_millis(100);

pub struct Cluster {
    pub lab: Lab,
    pub daemons: BTreeMap<String, ProcId>,
    /// Daemons started so far: each start gets a log of its own.
    starts: usize,
}

/// Starts etcd, writes `config` to `<prefix>/config`, adds `nodes`.
pub fn cluster(name: &str, nodes: &[&str], config: &str) -> Cluster {
    let mut lab = Lab::new(name).expect("lab");
    lab.start_etcd().expect("etcd");
    lab.etcdctl(&["put", &format!("{PREFIX}/config"), config])
        .expect("put config");
    for n in nodes {
        lab.add_node(n).expect("node");
    }
    Cluster {
        lab,
        daemons: BTreeMap::new(),
        starts: 0,
    }
}

pub fn twilld_bin() -> String {
    twill_lab::bin_path("twilld").to_string_lossy().into_owned()
}

impl Cluster {
    pub fn subnet_file(&self, node: &str) -> PathBuf {
        self.lab.node(node).dir.join("subnet.env")
    }

    /// A cluster around a lab the caller built (no etcd, e.g. Kubernetes mode).
    pub fn from_lab(lab: Lab) -> Cluster {
        Cluster {
            lab,
            daemons: BTreeMap::new(),
            starts: 0,
        }
    }

    /// Starts twilld on `node` with the lab's flags plus `extra` (which may override the
    /// lab's `--resync-period=2`, `--ip-masq` and etcd endpoints).
    pub fn start(&mut self, node: &str, extra: &[&str]) -> ProcId {
        self.start_env(node, extra, &[])
    }

    /// [`Cluster::start`] with environment variables (e.g. `NODE_NAME`).
    pub fn start_env(&mut self, node: &str, extra: &[&str], env: &[(&str, &str)]) -> ProcId {
        let netns = self.lab.node(node).netns.clone();
        let subnet_file = self.subnet_file(node).to_string_lossy().into_owned();
        let bin = twilld_bin();
        // The lab's plain-HTTP etcd unless the caller names its own endpoints (TLS).
        let endpoints = if extra.iter().any(|a| a.starts_with("--etcd-endpoints")) {
            None
        } else {
            Some("--etcd-endpoints=http://198.18.0.1:2379")
        };
        // A 2 s resync unless the caller picks its own period.
        let resync = if extra.iter().any(|a| a.starts_with("--resync-period")) {
            None
        } else {
            Some("--resync-period=2")
        };
        let mut argv: Vec<&str> = vec![bin.as_str()];
        argv.extend(endpoints);
        // --ip-masq unless the caller sets it (clap refuses a flag given twice).
        if !extra.iter().any(|a| a.starts_with("--ip-masq=")) {
            argv.push("--ip-masq");
        }
        argv.extend(resync);
        argv.extend_from_slice(&["--subnet-file", subnet_file.as_str()]);
        // The node's own status socket (nodes share one filesystem) unless the caller picks one.
        let status_socket = self.lab.node(node).twilld_socket();
        let status_flag = format!("--status-socket={}", status_socket.display());
        if !extra.iter().any(|a| a.starts_with("--status-socket")) {
            argv.push(&status_flag);
        }
        argv.extend_from_slice(extra);
        let id = self
            .lab
            .spawn(
                &netns,
                &format!("twilld-{node}-{}", self.starts),
                &argv,
                &[&[("TWILL_LOG", "info")], env].concat(),
            )
            .expect("spawn twilld");
        self.daemons.insert(node.to_string(), id);
        self.starts += 1;
        id
    }

    /// Starts twilld on every node in `nodes` and waits until each is ready.
    pub fn start_all(&mut self, nodes: &[&str]) -> BTreeMap<String, SubnetEnv> {
        for n in nodes {
            self.start(n, &[]);
        }
        nodes
            .iter()
            .map(|n| (n.to_string(), self.wait_ready(n)))
            .collect()
    }

    pub fn daemon(&self, node: &str) -> ProcId {
        self.daemons[node]
    }

    /// Sends `signal` to twilld on `node` and waits until it has exited, so that nothing the
    /// test does next can race with it.
    pub fn kill(&mut self, node: &str, signal: Signal) {
        let id = self.daemon(node);
        self.lab.kill(id, signal).expect("kill");
        let status = self.lab.wait(id, DEADLINE).expect("wait for twilld");
        assert!(
            status.is_some(),
            "twilld on {node} still running {DEADLINE:?} after {signal}:\n{}",
            self.lab.log(id)
        );
    }

    pub fn log(&self, node: &str) -> String {
        self.lab.log(self.daemon(node))
    }

    /// Waits for subnet.env to appear and returns it (the daemon writes it when ready).
    /// Waits until the daemon started last on `node` reports ready (subnet.env written by
    /// this run: a file left by an earlier run does not count) and returns subnet.env.
    pub fn wait_ready(&mut self, node: &str) -> SubnetEnv {
        let path = self.subnet_file(node);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self
                .lab
                .log(self.daemon(node))
                .contains("wrote subnet.env; ready")
            {
                return SubnetEnv::read(&path).expect("subnet.env of a ready twilld");
            }
            let id = self.daemon(node);
            assert!(
                self.lab.is_running(id),
                "twilld on {node} exited:\n{}",
                self.lab.log(id)
            );
            assert!(
                Instant::now() < deadline,
                "twilld on {node} not ready in 60s:\n{}",
                self.lab.log(id)
            );
            std::thread::sleep(POLL);
        }
    }

    /// `GET path` from inside `node`'s namespace to 127.0.0.1:`port` (bash's /dev/tcp: no
    /// client in the root namespace); the whole answer, or "" when nothing answered.
    pub fn http_get(&self, node: &str, port: u16, path: &str) -> String {
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET {path} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' >&3 && cat <&3"
        );
        self.lab
            .exec(&self.ns(node), &["bash", "-c", &script])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    pub fn ns(&self, node: &str) -> String {
        self.lab.node(node).netns.clone()
    }

    pub fn ip_json(&self, node: &str, args: &[&str]) -> serde_json::Value {
        let ns = self.ns(node);
        let mut argv = vec!["ip", "-j"];
        argv.extend_from_slice(args);
        let out = self.lab.exec_ok(&ns, &argv).expect("ip -j");
        if out.trim().is_empty() {
            return serde_json::Value::Array(vec![]);
        }
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j {args:?}: {e}: {out}"))
    }

    pub fn bridge_json(&self, node: &str, args: &[&str]) -> serde_json::Value {
        let ns = self.ns(node);
        let mut argv = vec!["bridge", "-j"];
        argv.extend_from_slice(args);
        let out = self.lab.exec_ok(&ns, &argv).expect("bridge -j");
        if out.trim().is_empty() {
            return serde_json::Value::Array(vec![]);
        }
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bridge -j {args:?}: {e}: {out}"))
    }

    /// MAC of `dev` on `node`.
    pub fn mac(&self, node: &str, dev: &str) -> String {
        let v = self.ip_json(node, &["link", "show", "dev", dev]);
        v[0]["address"].as_str().expect("address").to_string()
    }

    /// What twill programmed toward peers on `node`: (routes "dst via gw dev", permanent
    /// neighbours "ip mac", fdb "mac dst") on flannel.1 / for the network.
    pub fn entries(&self, node: &str, dev: &str) -> Entries {
        let mut e = Entries::default();
        for r in self
            .ip_json(node, &["route", "show", "table", "main"])
            .as_array()
            .unwrap()
        {
            if let (Some(dst), Some(gw)) = (r["dst"].as_str(), r["gateway"].as_str()) {
                if dst.starts_with("10.") {
                    e.routes.insert(format!(
                        "{dst} via {gw} dev {}",
                        r["dev"].as_str().unwrap_or("?")
                    ));
                }
            }
        }
        if self
            .ip_json(node, &["link"])
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["ifname"] == dev)
        {
            for n in self
                .ip_json(node, &["neigh", "show", "dev", dev])
                .as_array()
                .unwrap()
            {
                let perm = n["state"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|x| x == "PERMANENT"));
                if perm {
                    e.neighbours.insert(format!(
                        "{} {}",
                        n["dst"].as_str().unwrap(),
                        n["lladdr"].as_str().unwrap_or("")
                    ));
                }
            }
            for f in self
                .bridge_json(node, &["fdb", "show", "dev", dev])
                .as_array()
                .unwrap()
            {
                if let Some(dst) = f["dst"].as_str() {
                    e.fdb
                        .insert(format!("{} {dst}", f["mac"].as_str().unwrap()));
                }
            }
        }
        e
    }

    /// Polls (every [`POLL`]) until `pred` holds for `node`'s entries; returns how long it
    /// took, to within a poll: not a measurement (lease_added_and_deleted_converges_on_every_node
    /// takes its times from twilld's log).
    pub fn wait_entries(
        &self,
        node: &str,
        dev: &str,
        what: &str,
        pred: impl Fn(&Entries) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let e = self.entries(node, dev);
            if pred(&e) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{what} on {node} not reached in {DEADLINE:?}; entries: {e:#?}\nlog:\n{}",
                self.log(node)
            );
            std::thread::sleep(POLL);
        }
    }

    pub fn etcd_get(&self, key: &str) -> Option<String> {
        let out = self
            .lab
            .etcdctl(&["get", key, "--print-value-only"])
            .expect("etcdctl get");
        let v = out.trim_end_matches('\n');
        (!v.is_empty()).then(|| v.to_string())
    }

    pub fn subnet_keys(&self) -> Vec<String> {
        let out = self
            .lab
            .etcdctl(&[
                "get",
                &format!("{PREFIX}/subnets/"),
                "--prefix",
                "--keys-only",
            ])
            .expect("keys");
        out.lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    /// A pod namespace on `node`'s subnet (bridge cni0 + veth, as the bridge plugin makes).
    pub fn pod(&mut self, node: &str, name: &str, env: &SubnetEnv) -> Ipv4Addr {
        let subnet = env.subnet_network().expect("FLANNEL_SUBNET");
        let ip = Ipv4Addr::from(u32::from(subnet.network()) + 2);
        let addr = Ipv4Net::new(ip, subnet.prefix_len()).unwrap();
        self.lab.add_manual_pod(node, name, addr).expect("pod");
        ip
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Entries {
    pub routes: BTreeSet<String>,
    pub neighbours: BTreeSet<String>,
    pub fdb: BTreeSet<String>,
}

impl Entries {
    pub fn has_peer(&self, subnet: &Ipv4Net, public: Ipv4Addr, mac: &str) -> bool {
        let base = subnet.network();
        self.routes
            .contains(&format!("{subnet} via {base} dev flannel.1"))
            && self.neighbours.contains(&format!("{base} {mac}"))
            && self.fdb.contains(&format!("{mac} {public}"))
    }

    pub fn mentions(&self, subnet: &Ipv4Net) -> bool {
        let base = subnet.network().to_string();
        self.routes
            .iter()
            .any(|r| r.starts_with(&format!("{subnet} ")))
            || self
                .neighbours
                .iter()
                .any(|n| n.starts_with(&format!("{base} ")))
    }
}

/// The etcd key of a subnet.
pub fn subnet_key(subnet: &Ipv4Net) -> String {
    format!(
        "{PREFIX}/subnets/{}-{}",
        subnet.network(),
        subnet.prefix_len()
    )
}

/// A number from the environment (test knobs like TWILL_ETCD_OUTAGE_SECS), else `default`.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Polls `pred` every [`POLL`] until it holds; panics naming `what` after `timeout`. Returns
/// how long it took (to within a poll).
pub fn wait_until(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) -> Duration {
    wait_for(what, timeout, || pred().then_some(()).ok_or(NotYet))
}

/// What [`wait_until`]'s predicate saw when false: nothing to say.
#[derive(Debug)]
pub struct NotYet;

impl std::fmt::Display for NotYet {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Ok(())
    }
}

/// Polls `check` every [`POLL`] until it returns `Ok`; after `timeout` panics with `what` and
/// the last error `check` gave (what it saw instead, any displayable error; an empty text
/// adds nothing). Returns how long it took.
pub fn wait_for<E: std::fmt::Display>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<(), E>,
) -> Duration {
    let start = Instant::now();
    loop {
        match check().map_err(|e| e.to_string()) {
            Ok(()) => return start.elapsed(),
            Err(e) => assert!(
                start.elapsed() < timeout,
                "{what}: not reached in {timeout:?}{}",
                if e.is_empty() {
                    String::new()
                } else {
                    format!(": {e}")
                }
            ),
        }
        std::thread::sleep(POLL);
    }
}

/// A log without its terminal colours.
pub fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(ch) = chars.next() {
        if ch == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// The timestamps of twilld's log lines that contain `message`, in log order (tracing's
/// `2026-01-02T03:04:05.678901Z`, UTC, at the start of each line).
pub fn log_times(log: &str, message: &str) -> Vec<SystemTime> {
    plain(log)
        .lines()
        .filter(|l| l.contains(message))
        .filter_map(|l| parse_timestamp(l.split_whitespace().next()?))
        .collect()
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC) as a `SystemTime`.
fn parse_timestamp(s: &str) -> Option<SystemTime> {
    s.parse::<jiff::Timestamp>().ok().map(SystemTime::from)
}
