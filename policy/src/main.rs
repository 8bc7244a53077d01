//! `twill-policy`: enforces Kubernetes NetworkPolicy for the pods on this node with one
//! nftables table (`inet twill-policy`), beside twilld.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tracing::{error, info, warn};

use twill_nft::{Nft, NftRunner};
use twill_policy::compile::{compile, Options, DEFAULT_POD_BRIDGE, DEFAULT_TABLE};
use twill_policy::drops::{describe, DEFAULT_GROUP};
use twill_policy::enforce::{startup_plan, Applied, Enforcer, StartupPlan, SyncReport};
use twill_policy::eval::{allowed, Endpoint};
use twill_policy::http::{serve, serve_health, serve_status, Health, Shared, LIVE_BOUND};
use twill_policy::model::{Protocol, Snapshot};
use twill_policy::source::kube::{KubeApiSource, KubeOptions};
use twill_policy::source::manifests::ManifestDir;
use twill_policy::source::Source;
use twill_policy::status::{fail_closed_event, Endpoints};
use twill_runtime::events::NodeEvents;

#[derive(Parser, Debug)]
#[command(name = "twill-policy", version, about)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug)]
struct Common {
    /// Directory of YAML/JSON manifests (Namespace, Pod, NetworkPolicy, List).
    #[arg(long, global = true, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// Kubernetes API server URL (used when --manifests is not given; default in-cluster).
    #[arg(long, global = true, env = "KUBE_API_URL", default_value = "")]
    kube_api_url: String,
    /// kubeconfig file (used when --manifests is not given; default in-cluster).
    #[arg(long, global = true, env = "KUBECONFIG", default_value = "")]
    kubeconfig: String,
    /// This node's name (pods with this spec.nodeName are enforced here).
    #[arg(long, global = true, env = "NODE_NAME")]
    node_name: Option<String>,
    /// nftables table (family inet) owned by this program.
    #[arg(long, global = true, default_value = DEFAULT_TABLE)]
    table: String,
    /// Path of the nft binary.
    #[arg(long, global = true, default_value = "nft")]
    nft: PathBuf,
    /// Denied-packet log rate per pod and direction (packets/second).
    #[arg(long, global = true, default_value_t = 5)]
    log_rate: u32,
    /// Send denied packets to this NFLOG group (0-65535; Calico and kube-router use 100)
    /// instead of the kernel log, for `twill-policy drops` to read; same rate limit and
    /// prefix. `drops` listens on it (default 100).
    #[arg(long, global = true, value_name = "N")]
    nflog_group: Option<u16>,
    /// This node's pod subnet (repeatable): addresses in it that belong to no known pod
    /// are isolated until the source reports the pod (new pods fail closed).
    #[arg(long, global = true, value_name = "CIDR")]
    pod_cidr: Vec<ipnet::IpNet>,
    /// Flannel's subnet.env: FLANNEL_SUBNET (and FLANNEL_IPV6_SUBNET) are used as
    /// --pod-cidr, re-read before every sync.
    #[arg(long, global = true, value_name = "PATH")]
    subnet_file: Option<PathBuf>,
    /// The bridge the node's pods are attached to (the CNI bridge; Flannel's is cni0).
    /// Traffic from it that carries no pod address (IPv6 link-local, multicast,
    /// broadcast) is dropped: no pod's policy could judge it.
    #[arg(long, global = true, default_value = DEFAULT_POD_BRIDGE, value_parser = interface_name)]
    pod_bridge: String,
    /// Strict mode (as kube-network-policies' --strict-mode): after every sync that loads
    /// a new ruleset, mark the conntrack entries of this node's pods that it would not
    /// allow as new connections (the table drops marked flows), so tightening a policy
    /// also cuts established flows.
    /// --strict-mode=false: established flows go on until they end.
    #[arg(long, global = true, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    strict_mode: bool,
    /// Log line format on stderr: text (human-readable) or json (one object per line with
    /// timestamp, level, target, message and the event's fields).
    #[arg(long, global = true, default_value = "text", value_name = "FORMAT")]
    log_format: String,
}

/// A value of --pod-bridge that is no interface name.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an interface name (1-15 bytes, no '/', quotes or whitespace)")]
struct BadInterfaceName(String);

/// A Linux interface name: 1 to 15 bytes, no '/', no whitespace, not "." or "..", and
/// nothing nft would need to escape.
fn interface_name(s: &str) -> Result<String, BadInterfaceName> {
    let bad = s.is_empty()
        || s.len() > 15
        || s == "."
        || s == ".."
        || s.chars()
            .any(|c| c == '/' || c == '"' || c == '\\' || c.is_whitespace() || c.is_control());
    if bad {
        Err(BadInterfaceName(s.to_string()))
    } else {
        Ok(s.to_string())
    }
}

/// Where `run` serves its metrics: `--metrics-addr ADDR`, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetricsAddr {
    Off,
    On(std::net::SocketAddr),
}

/// A value of --metrics-addr: `off`, or an address and port.
fn metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr::Off);
    }
    s.parse()
        .map(MetricsAddr::On)
        .map_err(|_| "want ADDRESS:PORT (e.g. 0.0.0.0:9753) or off".to_string())
}

/// How `drops` prints each denied packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Watch the source and keep the table in sync.
    Run {
        /// Full resync interval (repairs drift such as a table deleted by hand).
        #[arg(long, default_value = "60", value_name = "SECONDS")]
        resync: u64,
        /// Serve Prometheus metrics on this address; `off` serves none. The DaemonSet is
        /// hostNetwork, so Prometheus scrapes the node's address.
        #[arg(long, default_value = "0.0.0.0:9753", value_name = "ADDR", value_parser = metrics_addr)]
        metrics_addr: MetricsAddr,
        /// Serve GET /status and /endpoints (JSON, for `twilld status` and `twill-policy
        /// drops`) on this unix socket, root only; empty: none.
        #[arg(long, default_value = twill_runtime::status::POLICY_SOCKET, value_name = "PATH")]
        status_socket: PathBuf,
        /// Serve /healthz and /readyz (no metrics) on this address. Loopback by default: the
        /// DaemonSet is hostNetwork and its probes set host 127.0.0.1, so pods cannot reach it.
        #[arg(long, default_value = "127.0.0.1:9754", value_name = "ADDR")]
        health_addr: std::net::SocketAddr,
        /// /readyz fails once the last confirmed enforcement of a good snapshot is older.
        #[arg(long, default_value = "120", value_name = "SECONDS")]
        ready_max_age: u64,
        /// How often the manifests directory is checked for changes.
        #[arg(long, default_value = "1000", value_name = "MS")]
        poll_ms: u64,
    },
    /// Sync once, then exit (non-zero if the full ruleset could not be applied).
    Apply {
        /// Dry run: have the kernel validate the transaction (nft -c), change nothing.
        #[arg(long)]
        check: bool,
    },
    /// Print the nft script that would be applied; change nothing.
    Compile {
        /// Print the isolation-only table used when an apply fails.
        #[arg(long)]
        fail_closed: bool,
    },
    /// Remove this program's tables (inet and bridge, named by --table) and exit, for
    /// switching a node back to Flannel after twill-policy stopped. `twilld --cleanup` removes
    /// the default-named tables together with twill's others; this covers a custom --table.
    Uninstall,
    /// Print the packets this node's policies deny, as they are denied, with the pods on
    /// both sides and the policies that isolate them (needs `run --nflog-group`).
    Drops {
        /// Stop after this many packets (default: run until interrupted).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// One line of text per packet, or one JSON object per line.
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
        /// The status socket of the running `twill-policy run` (pods and policies).
        #[arg(long, default_value = twill_runtime::status::POLICY_SOCKET, value_name = "PATH")]
        status_socket: PathBuf,
    },
    /// Which policies allow or deny a connection, and why.
    Explain {
        /// Source: NS/POD or an IP address.
        #[arg(long)]
        from: String,
        /// Destination: NS/POD or an IP address.
        #[arg(long)]
        to: String,
        /// Destination port, optionally with protocol: 80, 53/UDP, 9000/sctp.
        #[arg(long)]
        port: String,
    },
}

fn source(common: &Common) -> Result<Box<dyn Source>> {
    source_polling(common, Duration::from_secs(1), Duration::from_secs(60))
}

/// The source; `poll` is the manifests directory's check interval, `initial` how long a
/// Kubernetes API snapshot waits for the initial lists.
fn source_polling(common: &Common, poll: Duration, initial: Duration) -> Result<Box<dyn Source>> {
    match &common.manifests {
        Some(dir) => {
            let mut m = ManifestDir::new(dir);
            m.poll = poll.max(Duration::from_millis(10));
            Ok(Box::new(m))
        }
        None => {
            let mut k = KubeApiSource::start(KubeOptions {
                api_url: common.kube_api_url.clone(),
                kubeconfig: common.kubeconfig.clone(),
                ..KubeOptions::default()
            });
            k.initial_timeout = initial;
            Ok(Box::new(k))
        }
    }
}

fn node(common: &Common) -> Result<String> {
    common
        .node_name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| anyhow!("node name required: --node-name or NODE_NAME"))
}

fn options(common: &Common) -> Result<Options> {
    Ok(Options {
        table: common.table.clone(),
        log_rate: common.log_rate,
        nflog_group: common.nflog_group,
        allow_rules: true,
        pod_cidrs: pod_cidrs(common)?,
        pod_bridge: common.pod_bridge.clone(),
    })
}

/// --pod-cidr plus the subnets in --subnet-file.
fn pod_cidrs(common: &Common) -> Result<Vec<ipnet::IpNet>> {
    let mut out = common.pod_cidr.clone();
    if let Some(path) = &common.subnet_file {
        let env = twill_formats::subnet_env::SubnetEnv::read(path)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        out.extend(env.subnet_network().map(ipnet::IpNet::V4));
        out.extend(env.ipv6_subnet_network().map(ipnet::IpNet::V6));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The log fields `pod` and `policy` ("namespace/name") of an object named `Kind
/// namespace/name` (as [`twill_policy::source::ObjectError::object`] has it).
fn object_fields(object: &str) -> (Option<&str>, Option<&str>) {
    match object.split_once(' ') {
        Some(("Pod", key)) => (Some(key), None),
        Some(("NetworkPolicy", key)) => (None, Some(key)),
        _ => (None, None),
    }
}

/// Reads the source and logs every object it could not read: each one fails its namespace
/// closed, every other namespace is enforced as read.
fn load(src: &mut dyn Source) -> Result<Snapshot> {
    let snap = src.snapshot().map_err(|e| {
        for err in &e.errors {
            error!("cannot read the source: {err}");
        }
        anyhow!(
            "{} error(s) reading the source; nothing applied",
            e.errors.len()
        )
    })?;
    for (ns, errors) in &snap.broken {
        for err in errors {
            let (pod, policy) = object_fields(&err.object);
            error!(
                namespace = ns.as_str(),
                pod, policy, "invalid object: {err}; namespace {ns} fails closed"
            );
        }
    }
    for err in &snap.unattributed {
        error!("invalid manifest: {err}; its objects are not read (no namespace is known to depend on it)");
    }
    for err in &snap.broken_cluster {
        error!(
            object = err.object.as_str(),
            "invalid cluster-scoped object: {err}; its last readable version stays in force (one never readable is left out)"
        );
    }
    Ok(snap)
}

/// Makes bridged IPv4/IPv6 traffic (same-node pods on cni0) traverse the inet hooks:
/// loads br_netfilter if its sysctls are missing, then sets bridge-nf-call-iptables and
/// bridge-nf-call-ip6tables to 1. Failures are logged loudly; enforcement of routed
/// traffic still works without it.
fn ensure_br_netfilter() {
    let dir = std::path::Path::new("/proc/sys/net/bridge");
    if !dir.join("bridge-nf-call-iptables").exists() {
        info!("br_netfilter sysctls missing; running modprobe br_netfilter");
        match std::process::Command::new("modprobe")
            .arg("br_netfilter")
            .output()
        {
            Ok(o) if o.status.success() => info!("loaded br_netfilter"),
            Ok(o) => error!(
                "modprobe br_netfilter failed ({}): {}; same-node pod traffic across the bridge will NOT be policed",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => error!(
                "cannot run modprobe br_netfilter: {e}; same-node pod traffic across the bridge will NOT be policed"
            ),
        }
    }
    for name in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
        let path = dir.join(name);
        let before = std::fs::read_to_string(&path).map(|s| s.trim().to_string());
        match before {
            Ok(v) if v == "1" => info!("net.bridge.{name} = 1 (already)"),
            Ok(v) => match std::fs::write(&path, "1\n") {
                Ok(()) => info!("net.bridge.{name}: {v} -> 1"),
                Err(e) => error!(
                    "cannot set net.bridge.{name}=1: {e}; same-node bridged traffic will NOT be policed"
                ),
            },
            Err(e) => error!(
                "net.bridge.{name} unavailable ({e}); same-node bridged traffic will NOT be policed"
            ),
        }
    }
}

/// Logs the strict-mode conntrack pass of a sync.
fn log_conntrack(r: &SyncReport) {
    match &r.conntrack {
        None => {}
        Some(Ok(p)) if p.failed == 0 => info!(
            flows = p.flows,
            cut = p.cut,
            restored = p.restored,
            "conntrack: cut {} flow(s) the new ruleset denies in {:?}",
            p.cut,
            p.duration
        ),
        Some(Ok(p)) => warn!(
            flows = p.flows,
            cut = p.cut,
            restored = p.restored,
            failed = p.failed,
            "conntrack: cut {} flow(s) in {:?}; {} update(s) failed: {}",
            p.cut,
            p.duration,
            p.failed,
            p.first_error.as_deref().unwrap_or("")
        ),
        Some(Err(e)) => {
            error!("{e}; established flows the new ruleset denies were not cut")
        }
    }
}

/// Logs what a sync reports it did (its conntrack pass, what it loaded, its errors).
fn log_sync(r: &SyncReport) {
    log_conntrack(r);
    let s = r.stats;
    match &r.applied {
        Applied::Full => {
            info!(
                chains = s.chains,
                rules = s.rules,
                sets = s.sets,
                set_elements = s.set_elements,
                map_elements = s.map_elements,
                "applied ruleset in {:?}",
                r.duration
            );
        }
        Applied::Incremental => {
            info!(
                chains = s.chains,
                rules = s.rules,
                sets = s.sets,
                set_elements = s.set_elements,
                map_elements = s.map_elements,
                changed_chains = r.changed_chains.len(),
                changed_elements = r.changed_elements,
                "applied ruleset incrementally in {:?}",
                r.duration
            );
        }
        Applied::Unchanged => {}
        Applied::FailClosed { error } => {
            error!("apply failed: {error}; installed the fail-closed table (selected pods refuse new connections)");
        }
        Applied::Failed {
            error,
            fail_closed_error,
        } => {
            error!("apply failed: {error}; fail-closed table also failed: {fail_closed_error}; the previously loaded table stays");
        }
    }
}

/// Whether the sync left the full ruleset loaded (not the isolation-only table, not an
/// older table).
fn full_ruleset_loaded(r: &SyncReport) -> bool {
    matches!(
        r.applied,
        Applied::Full | Applied::Incremental | Applied::Unchanged
    )
}

/// Longest wait of the run loop between two passes, so that /healthz sees it come round.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// As PID 1 of a container (kube-flannel.yml runs it so), a signal without a handler is
/// ignored: the kubelet's SIGTERM would do nothing and the container would be killed only at
/// the end of the grace period (30 s per node and rollout). So SIGTERM and SIGINT are taken
/// on a thread of their own and end the process as their default action would elsewhere:
/// at once, leaving the loaded table in place (the next run takes it over).
fn exit_on_sigterm() -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    // Blocked before any other thread exists, so every thread inherits the mask and only
    // the waiting thread takes these signals.
    set.thread_block().context("blocking SIGTERM and SIGINT")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || match set.wait() {
            Ok(sig) => {
                info!("{sig}: exiting; the loaded nftables table stays in place");
                std::process::exit(0);
            }
            Err(e) => error!("waiting for SIGTERM: {e}"),
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// The options of `run`.
struct RunOptions {
    resync: u64,
    metrics_addr: MetricsAddr,
    status_socket: PathBuf,
    health_addr: std::net::SocketAddr,
    ready_max_age: Duration,
    poll: Duration,
}

/// Kubernetes events on this node (Kubernetes-API mode only; none from manifests), and the
/// runtime their publisher task runs on, which must live as long as they are published.
fn node_events(common: &Common, node: &str) -> (NodeEvents, Option<tokio::runtime::Runtime>) {
    if common.manifests.is_some() {
        return (NodeEvents::disabled(), None);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("events")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the events runtime: {e}; no Kubernetes events");
            return (NodeEvents::disabled(), None);
        }
    };
    let client = runtime.block_on(twill_runtime::kube::client(
        &twill_runtime::kube::ClientOptions {
            api_url: common.kube_api_url.clone(),
            kubeconfig: common.kubeconfig.clone(),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(30)),
        },
    ));
    match client {
        Ok(client) => {
            let _enter = runtime.enter();
            let events = NodeEvents::start(client, "twill-policy", node);
            (events, Some(runtime))
        }
        Err(e) => {
            error!(
                node,
                "Kubernetes client for events: {e}; no Kubernetes events"
            );
            (NodeEvents::disabled(), None)
        }
    }
}

/// Records what a sync of `snap` loaded for `/status`, and publishes the event of a move into
/// or out of fail-closed enforcement.
fn record_sync(
    shared: &Shared,
    enf: &Enforcer,
    r: &SyncReport,
    snap: Arc<Snapshot>,
    events: &NodeEvents,
) {
    let mut enforced = shared.enforced.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(event) = fail_closed_event(enforced.fail_closed, &r.applied) {
        info!(node = enf.node, reason = event.reason, "{}", event.note);
        events.publish(event);
    }
    enforced.record(&r.applied, enf.loaded_id().map(str::to_string), snap);
}

fn cmd_run(common: &Common, run: RunOptions) -> Result<()> {
    let RunOptions {
        resync,
        metrics_addr,
        status_socket,
        health_addr,
        ready_max_age,
        poll,
    } = run;
    exit_on_sigterm()?;
    let node = node(common)?;
    // Short: the loop must not sit in a snapshot while the lists are missing (each list
    // that arrives wakes it anyway).
    let mut src = source_polling(common, poll, Duration::from_secs(5))?;
    ensure_br_netfilter();
    let nft = Nft {
        bin: common.nft.clone(),
        ..Nft::default()
    };
    let mut shared = Shared::with_health(&common.table, Health::new(LIVE_BOUND, ready_max_age));
    shared.node = node.clone();
    let shared = Arc::new(shared);
    // Not fatal: enforcement matters more than probes (a failing probe shows it).
    match serve_health(health_addr, shared.clone()) {
        Ok(local) => info!("health on http://{local}/healthz and /readyz"),
        Err(e) => error!("cannot serve /healthz and /readyz on {health_addr}: {e}"),
    }
    if let MetricsAddr::On(addr) = metrics_addr {
        // Not fatal since metrics are on by default: a port taken on the node must not keep
        // the node's pods from being enforced (the error says why there are no metrics).
        match serve(addr, shared.clone()) {
            Ok(local) => info!("metrics on http://{local}/metrics"),
            Err(e) => {
                error!("cannot serve metrics on {addr}: {e}; --metrics-addr picks another address")
            }
        }
    }
    if !status_socket.as_os_str().is_empty() {
        // Not fatal either: the status command is for people, enforcement for pods.
        match serve_status(&status_socket, shared.clone()) {
            Ok(()) => info!("status on unix:{}", status_socket.display()),
            Err(e) => error!("cannot serve /status on {}: {e}", status_socket.display()),
        }
    }
    let (events, _events_runtime) = node_events(common, &node);
    let mut subnet_error = None;
    let opts = match options(common) {
        Ok(o) => o,
        Err(e) => {
            // subnet.env not written yet (twilld starting): unknown-pod isolation comes
            // with the first successful read (re-tried every pass).
            warn!("{e:#}; unknown pod addresses are not isolated until it can be read");
            subnet_error = Some(format!("{e:#}"));
            Options {
                table: common.table.clone(),
                log_rate: common.log_rate,
                nflog_group: common.nflog_group,
                allow_rules: true,
                pod_cidrs: common.pod_cidr.clone(),
                pod_bridge: common.pod_bridge.clone(),
            }
        }
    };
    let mut enf = Enforcer::new(nft, &node, opts);
    enf.strict = common.strict_mode;
    info!(node, table = common.table, pod_cidrs = ?enf.opts.pod_cidrs, strict_mode = enf.strict, "twill-policy running");
    // A table from an earlier run (restart without reboot) holds the last known policy.
    let table_existed = match enf.nft.table_exists("inet", &common.table) {
        Ok(b) => b,
        Err(e) => {
            error!(
                "cannot tell whether table inet {} exists: {e}",
                common.table
            );
            false
        }
    };
    let resync = Duration::from_secs(resync.max(1));
    let mut last_good: Option<Arc<Snapshot>> = None;
    // Whether the last read of the source succeeded (its newest state is `last_good`).
    let mut source_ok = false;
    let mut last_full = Instant::now();
    let mut changed = true;
    // What was last logged about the node's state before the first good snapshot.
    let mut startup_logged: Option<String> = None;
    loop {
        shared.health.beat();
        if common.subnet_file.is_some() {
            match pod_cidrs(common) {
                Ok(c) => {
                    subnet_error = None;
                    if c != enf.opts.pod_cidrs {
                        info!(pod_cidrs = ?c, "node pod subnets changed");
                        enf.opts.pod_cidrs = c;
                    }
                }
                Err(e) => {
                    // Logged when it changes, not every pass (twilld may take a while).
                    let msg = format!("{e:#}");
                    if subnet_error.as_ref() != Some(&msg) {
                        warn!("{msg}; keeping pod subnets {:?}", enf.opts.pod_cidrs);
                        subnet_error = Some(msg);
                    }
                }
            }
        }
        if last_good.is_none() {
            // No good snapshot yet (fresh boot, API unreachable, broken manifests): close
            // the node's pods before anything else, and again every pass (the subnet file
            // may have appeared, an isolation may have failed).
            if let Some(r) = startup(&mut enf, table_existed, &mut startup_logged) {
                record_sync(&shared, &enf, &r, Arc::new(Snapshot::default()), &events);
            }
        }
        if changed {
            let t = Instant::now();
            match load(src.as_mut()) {
                Ok(mut s) => {
                    tracing::debug!("read the source in {:?}", t.elapsed());
                    shared.metrics.record_source(&s);
                    // A cluster policy or Node that cannot be read now keeps the version
                    // last enforced; such a snapshot is enforced but is not a good one.
                    source_ok = s.broken_cluster.is_empty();
                    if let Some(previous) = &last_good {
                        s.keep_readable_cluster_policies(previous);
                    }
                    last_good = Some(Arc::new(s));
                }
                Err(e) => {
                    shared.metrics.record_source_error();
                    source_ok = false;
                    if last_good.is_some() {
                        warn!("{e}; keeping the last good state")
                    } else {
                        warn!("{e}; no good snapshot yet")
                    }
                }
            }
        }
        if last_full.elapsed() >= resync {
            enf.invalidate();
            last_full = Instant::now();
        }
        let Some(s) = &last_good else {
            changed = src.wait_change(Duration::from_secs(1));
            continue;
        };
        // The named drop counters survive the update and are read at scrape time: nothing
        // reads the table here.
        let r = enf.sync(s);
        shared.metrics.observe(&r);
        log_sync(&r);
        record_sync(&shared, &enf, &r, s.clone(), &events);
        if !full_ruleset_loaded(&r) {
            // Retry soon: the next pass reapplies since nothing was recorded as loaded.
            changed = src.wait_change(Duration::from_secs(1));
            continue;
        }
        if startup_logged.take().is_some() {
            info!("first good snapshot enforced: the node's pods are under their policies");
        }
        if source_ok {
            shared.health.good();
        }
        changed = src.wait_change(resync.saturating_sub(last_full.elapsed()).min(HEARTBEAT));
    }
}

/// Before the first good snapshot: keeps a table left by an earlier run, or installs the
/// startup isolation table (every address of the node's pod subnets is an unknown pod:
/// new connections to and from it are dropped), or warns that nothing can be isolated.
/// Logs the node's state whenever it changes (`logged` holds the last message). Returns the
/// report of the isolation table's sync, if it ran one.
fn startup(
    enf: &mut Enforcer,
    table_existed: bool,
    logged: &mut Option<String>,
) -> Option<SyncReport> {
    let mut say = |level: tracing::Level, msg: String| {
        if logged.as_ref() != Some(&msg) {
            match level {
                tracing::Level::ERROR => error!("{msg}"),
                tracing::Level::WARN => warn!("{msg}"),
                _ => info!("{msg}"),
            }
            *logged = Some(msg);
        }
    };
    match startup_plan(table_existed, &enf.opts.pod_cidrs) {
        StartupPlan::KeepPrevious => {
            say(
            tracing::Level::WARN,
            format!(
                "no good snapshot yet: table inet {} from an earlier run stays (the last known policy) until there is one",
                enf.opts.table
            ),
        );
            None
        }
        StartupPlan::Isolate => {
            let r = enf.sync(&Snapshot::default());
            match &r.applied {
                Applied::FailClosed { error } | Applied::Failed { error, .. } => say(
                    tracing::Level::ERROR,
                    format!("no good snapshot yet and the startup isolation table was rejected: {error}; retrying"),
                ),
                _ => say(
                    tracing::Level::WARN,
                    format!(
                        "no good snapshot yet: startup isolation, every pod address in {:?} refuses new connections until there is one",
                        enf.opts.pod_cidrs
                    ),
                ),
            }
            Some(r)
        }
        StartupPlan::Unprotected => {
            say(
            tracing::Level::ERROR,
            "no good snapshot yet and no pod subnets known (--pod-cidr, or --subnet-file not readable yet): this node's pods are NOT isolated".to_string(),
        );
            None
        }
    }
}

fn cmd_apply(common: &Common, check: bool) -> Result<()> {
    let node = node(common)?;
    let snap = load(source(common)?.as_mut())?;
    let nft = Nft {
        bin: common.nft.clone(),
        ..Nft::default()
    };
    if check {
        let script = compile(&snap, &node, &options(common)?).render();
        nft.check(&script).context("nft -c rejected the ruleset")?;
        println!("ruleset OK (dry run, nothing changed)");
        return Ok(());
    }
    ensure_br_netfilter();
    let mut enf = Enforcer::new(nft, &node, options(common)?);
    enf.strict = common.strict_mode;
    let r = enf.sync(&snap);
    log_sync(&r);
    if full_ruleset_loaded(&r) {
        Ok(())
    } else {
        bail!("the full ruleset could not be applied")
    }
}

fn cmd_compile(common: &Common, fail_closed: bool) -> Result<()> {
    let node = node(common)?;
    let snap = load(source(common)?.as_mut())?;
    let opts = Options {
        allow_rules: !fail_closed,
        ..options(common)?
    };
    print!("{}", compile(&snap, &node, &opts).render());
    Ok(())
}

/// Deletes the inet and bridge tables named by --table (whichever exist) in one transaction.
fn cmd_uninstall(common: &Common) -> Result<()> {
    let nft = Nft {
        bin: common.nft.clone(),
        ..Nft::default()
    };
    let table = &common.table;
    let existed = [
        ("inet", nft.table_exists("inet", table)?),
        ("bridge", nft.table_exists("bridge", table)?),
    ];
    nft.apply(&twill_policy::compile::render_delete(table))
        .with_context(|| format!("deleting tables inet {table} and bridge {table}"))?;
    for (family, was) in existed {
        if was {
            info!("removed table {family} {table}");
        } else {
            info!("no table {family} {table}; nothing to remove");
        }
    }
    Ok(())
}

/// How often `drops` asks the daemon for its pods again (pods come and go).
const ENDPOINTS_REFRESH: Duration = Duration::from_secs(5);
/// How soon `drops` asks again when a packet has an address no known pod has.
const ENDPOINTS_RETRY: Duration = Duration::from_secs(1);

/// The running daemon's `/endpoints`; on failure a warning (once per failure text) and the
/// last known ones stay.
fn fetch_endpoints(
    rt: &tokio::runtime::Runtime,
    socket: &std::path::Path,
    last_error: &mut Option<String>,
) -> Option<Endpoints> {
    match rt.block_on(twill_runtime::status::get_json::<Endpoints>(
        socket,
        "/endpoints",
    )) {
        Ok(e) => {
            *last_error = None;
            Some(e)
        }
        Err(e) => {
            let msg = e.to_string();
            if last_error.as_ref() != Some(&msg) {
                eprintln!("warning: {msg}; addresses are printed without pod names");
                *last_error = Some(msg);
            }
            None
        }
    }
}

/// `drops`: binds the NFLOG group, then prints each packet a twill-policy rule denied.
fn cmd_drops(
    common: &Common,
    count: Option<u64>,
    output: Output,
    socket: &std::path::Path,
) -> Result<()> {
    let group = common.nflog_group.unwrap_or(DEFAULT_GROUP);
    let mut listener = twill_nft::nflog::Listener::bind(group).map_err(|e| {
        if e.os_error() == Some(nix::libc::EBUSY) {
            anyhow!("NFLOG group {group} is bound by another process (another `twill-policy drops`, or a logging daemon such as ulogd)")
        } else {
            anyhow!("binding NFLOG group {group}: {e}")
        }
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime for the status socket client")?;
    let mut last_error = None;
    let mut endpoints = fetch_endpoints(&rt, socket, &mut last_error).unwrap_or_default();
    let mut fetched = Instant::now();
    eprintln!(
        "listening on NFLOG group {group} (twill-policy run --nflog-group {group}); pods from {}",
        socket.display()
    );
    let mut printed = 0u64;
    while count.is_none_or(|c| printed < c) {
        let mut packets = Vec::new();
        match listener.receive(|p| packets.push(p)) {
            Ok(_) => {}
            Err(e) if e.os_error() == Some(nix::libc::ENOBUFS) => {
                eprintln!("warning: the kernel dropped log messages (receive buffer full)");
            }
            Err(e) => return Err(anyhow!("reading NFLOG group {group}: {e}")),
        }
        if fetched.elapsed() >= ENDPOINTS_REFRESH {
            if let Some(e) = fetch_endpoints(&rt, socket, &mut last_error) {
                endpoints = e;
            }
            fetched = Instant::now();
        }
        for p in packets {
            let p = match p {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("warning: unreadable NFLOG message: {e}");
                    continue;
                }
            };
            let Some(mut d) = describe(&p, &endpoints) else {
                continue;
            };
            // An address no pod is known for may be a pod that started since the last ask.
            let unknown = (d.src.is_some() && d.src_pod.is_none())
                || (d.dst.is_some() && d.dst_pod.is_none());
            if unknown && fetched.elapsed() >= ENDPOINTS_RETRY {
                if let Some(e) = fetch_endpoints(&rt, socket, &mut last_error) {
                    endpoints = e;
                    d = describe(&p, &endpoints).unwrap_or(d);
                }
                fetched = Instant::now();
            }
            match output {
                Output::Text => println!("{}", d.text()),
                Output::Json => println!("{}", serde_json::to_string(&d)?),
            }
            printed += 1;
            if count.is_some_and(|c| printed >= c) {
                break;
            }
        }
    }
    Ok(())
}

fn endpoint<'a>(snap: &'a Snapshot, s: &str) -> Result<Endpoint<'a>> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Endpoint::ip(snap, ip));
    }
    let pod = snap
        .pod(s)
        .ok_or_else(|| anyhow!("no pod {s:?} (want NAMESPACE/POD or an IP address)"))?;
    Ok(Endpoint::pod(pod))
}

fn parse_port(s: &str) -> Result<(u16, Protocol)> {
    let (n, p) = match s.split_once('/') {
        Some((n, p)) => (n, p.parse::<Protocol>()?),
        None => (s, Protocol::Tcp),
    };
    let n: u16 = n
        .parse()
        .ok()
        .filter(|n| *n != 0)
        .ok_or_else(|| anyhow!("bad port {n:?}"))?;
    Ok((n, p))
}

fn cmd_explain(common: &Common, from: &str, to: &str, port: &str) -> Result<bool> {
    let snap = load(source(common)?.as_mut())?;
    let (port, proto) = parse_port(port)?;
    let v = allowed(
        &snap,
        &endpoint(&snap, from)?,
        &endpoint(&snap, to)?,
        port,
        proto,
    );
    println!("{from} -> {to} {proto}/{port}");
    for r in &v.reasons {
        println!("  {r}");
    }
    // With cluster policies, which tier decided each side is worth a line of its own.
    if !snap.cluster_policies.is_empty() {
        println!(
            "  decided by: egress {}; ingress {}",
            v.egress.decided_by, v.ingress.decided_by
        );
    }
    Ok(v.allowed)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match cli.common.log_format.parse::<twill_logging::LogFormat>() {
        Ok(format) => format,
        Err(e) => {
            eprintln!("error: --log-format: {e}");
            return ExitCode::FAILURE;
        }
    };
    // RUST_LOG (tracing's directive syntax) overrides the default level.
    if let Err(e) =
        twill_logging::init_stderr(format, twill_logging::env_filter("RUST_LOG", "info"))
    {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let res = match &cli.cmd {
        Cmd::Run {
            resync,
            metrics_addr,
            status_socket,
            health_addr,
            ready_max_age,
            poll_ms,
        } => cmd_run(
            &cli.common,
            RunOptions {
                resync: *resync,
                metrics_addr: *metrics_addr,
                status_socket: status_socket.clone(),
                health_addr: *health_addr,
                ready_max_age: Duration::from_secs(*ready_max_age),
                poll: Duration::from_millis(*poll_ms),
            },
        ),
        Cmd::Drops {
            count,
            output,
            status_socket,
        } => cmd_drops(&cli.common, *count, *output, status_socket),
        Cmd::Apply { check } => cmd_apply(&cli.common, *check),
        Cmd::Compile { fail_closed } => cmd_compile(&cli.common, *fail_closed),
        Cmd::Uninstall => cmd_uninstall(&cli.common),
        Cmd::Explain { from, to, port } => match cmd_explain(&cli.common, from, to, port) {
            // explain exits 0 when allowed, 1 when denied, 2 on error.
            Ok(true) => return ExitCode::SUCCESS,
            Ok(false) => return ExitCode::from(1),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(2);
            }
        },
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_objects_are_logged_with_the_pod_or_policy_field() {
        assert_eq!(object_fields("Pod x/a"), (Some("x/a"), None));
        assert_eq!(
            object_fields("NetworkPolicy x/deny"),
            (None, Some("x/deny"))
        );
        assert_eq!(object_fields("Namespace x"), (None, None));
        assert_eq!(object_fields(""), (None, None));
    }

    #[test]
    fn metrics_addresses_or_off() {
        assert_eq!(metrics_addr("off"), Ok(MetricsAddr::Off));
        assert_eq!(
            metrics_addr("0.0.0.0:9753"),
            Ok(MetricsAddr::On("0.0.0.0:9753".parse().unwrap()))
        );
        assert_eq!(
            metrics_addr("[::1]:9"),
            Ok(MetricsAddr::On("[::1]:9".parse().unwrap()))
        );
        for bad in ["", "Off", "9753", "localhost:9753", "1.2.3.4"] {
            assert!(metrics_addr(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn interface_names_are_checked_and_bad_ones_named() {
        assert_eq!(interface_name("cni0").unwrap(), "cni0");
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "with space",
            "quote\"",
            "sixteen-bytes-xx",
        ] {
            let e = interface_name(bad).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "{bad:?} is not an interface name (1-15 bytes, no '/', quotes or whitespace)"
                )
            );
        }
    }
}
