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
use twill_policy::enforce::{startup_plan, Applied, Enforcer, StartupPlan, SyncReport};
use twill_policy::eval::{allowed, Endpoint};
use twill_policy::http::{serve, serve_health, Health, Shared, LIVE_BOUND};
use twill_policy::model::{Protocol, Snapshot};
use twill_policy::source::kube::{KubeApiSource, KubeOptions};
use twill_policy::source::manifests::ManifestDir;
use twill_policy::source::Source;

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

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Watch the source and keep the table in sync.
    Run {
        /// Full resync interval (repairs drift such as a table deleted by hand).
        #[arg(long, default_value = "60", value_name = "SECONDS")]
        resync: u64,
        /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9753); off by default.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
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
            error!(
                namespace = ns.as_str(),
                "invalid object: {err}; namespace {ns} fails closed"
            );
        }
    }
    for err in &snap.unattributed {
        error!("invalid manifest: {err}; its objects are not read (no namespace is known to depend on it)");
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

fn cmd_run(
    common: &Common,
    resync: u64,
    metrics_addr: Option<std::net::SocketAddr>,
    health_addr: std::net::SocketAddr,
    ready_max_age: Duration,
    poll: Duration,
) -> Result<()> {
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
    let mut shared = Shared::new(&common.table);
    shared.health = Health::new(LIVE_BOUND, ready_max_age);
    let shared = Arc::new(shared);
    // Not fatal: enforcement matters more than probes (a failing probe shows it).
    match serve_health(health_addr, shared.clone()) {
        Ok(local) => info!("health on http://{local}/healthz and /readyz"),
        Err(e) => error!("cannot serve /healthz and /readyz on {health_addr}: {e}"),
    }
    if let Some(addr) = metrics_addr {
        let local =
            serve(addr, shared.clone()).with_context(|| format!("serving metrics on {addr}"))?;
        info!("metrics on http://{local}/metrics");
    }
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
    let mut last_good: Option<Snapshot> = None;
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
            startup(&mut enf, table_existed, &mut startup_logged);
        }
        if changed {
            let t = Instant::now();
            match load(src.as_mut()) {
                Ok(s) => {
                    tracing::debug!("read the source in {:?}", t.elapsed());
                    shared.metrics.record_source(&s);
                    last_good = Some(s);
                    source_ok = true;
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
/// Logs the node's state whenever it changes (`logged` holds the last message).
fn startup(enf: &mut Enforcer, table_existed: bool, logged: &mut Option<String>) {
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
        StartupPlan::KeepPrevious => say(
            tracing::Level::WARN,
            format!(
                "no good snapshot yet: table inet {} from an earlier run stays (the last known policy) until there is one",
                enf.opts.table
            ),
        ),
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
        }
        StartupPlan::Unprotected => say(
            tracing::Level::ERROR,
            "no good snapshot yet and no pod subnets known (--pod-cidr, or --subnet-file not readable yet): this node's pods are NOT isolated".to_string(),
        ),
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
            health_addr,
            ready_max_age,
            poll_ms,
        } => cmd_run(
            &cli.common,
            *resync,
            *metrics_addr,
            *health_addr,
            Duration::from_secs(*ready_max_age),
            Duration::from_millis(*poll_ms),
        ),
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
