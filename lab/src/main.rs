//! `twill-lab`: bring a namespace cluster up for a demo, run commands in it, take it down.

use std::os::unix::process::CommandExt as _;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use twill_lab::{cleanup_stale, list_labs, state_path, Lab, LabOwner, SWITCH};

/// Build a multi-node cluster out of network namespaces (underlay 198.18.0.0/24, etcd on the switch).
#[derive(Parser, Debug)]
#[command(name = "twill-lab", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a switch, etcd and N nodes, leave them up and write /tmp/twill-lab-<name>.json.
    Up {
        /// Lab name (used by the other subcommands).
        #[arg(long, default_value = "demo")]
        name: String,
        /// Number of nodes (named n1, n2, ...).
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Do not start etcd.
        #[arg(long)]
        no_etcd: bool,
    },
    /// Remove everything of a lab (processes, namespaces, files), then any stale test labs.
    Down {
        /// Lab name given to `up`.
        #[arg(long, default_value = "demo", conflicts_with = "stale")]
        name: String,
        /// Only remove stale labs (owner process dead or state file gone).
        #[arg(long)]
        stale: bool,
    },
    /// Run a command inside a node (or `sw`, or a pod) of a lab, with this terminal.
    Exec {
        /// Lab name.
        #[arg(long, default_value = "demo")]
        name: String,
        /// Node, pod, or `sw` for the switch.
        #[arg(long)]
        node: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Start a background process inside a node of a lab; `down` stops it.
    Spawn {
        /// Lab name.
        #[arg(long, default_value = "demo")]
        name: String,
        /// Node, pod, or `sw`.
        #[arg(long)]
        node: String,
        /// Process name; its output goes to <lab dir>/<log>.log.
        #[arg(long)]
        log: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// List labs on this machine (persisted ones and test labs).
    List,
    /// The quick start: a 3-node cluster with etcd, twilld, pods through twill-cni, the
    /// reachability matrix, an example NetworkPolicy and the matrix again. Stays up.
    Quickstart {
        /// Remove the quickstart cluster instead.
        #[arg(long)]
        down: bool,
    },
    /// Answer "pong" on TCP and UDP PORT (run inside a pod namespace).
    Serve {
        #[arg(long)]
        port: u16,
    },
    /// Exit 0 if TO (IP:PORT) answers "pong" over TCP (or UDP with --udp) within the timeout.
    Probe {
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long)]
        udp: bool,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("twill-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Up {
            name,
            nodes,
            no_etcd,
        } => up(&name, nodes, !no_etcd).map(|()| ExitCode::SUCCESS),
        Cmd::Down { name, stale } => down(&name, stale),
        Cmd::Exec { name, node, cmd } => exec(&name, &node, &cmd),
        Cmd::Spawn {
            name,
            node,
            log,
            cmd,
        } => {
            let mut lab = Lab::load(&name)?;
            let ns = resolve(&lab, &node)?;
            let argv: Vec<&str> = cmd.iter().map(String::as_str).collect();
            let id = lab.spawn(&ns, &log, &argv, &[])?;
            println!(
                "started {log} (pid {}) in {ns}; log: {}",
                lab.pid(id)?,
                lab.log_path(id)?.display()
            );
            lab.persist()?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::List => list().map(|()| ExitCode::SUCCESS),
        Cmd::Quickstart { down } => {
            if down {
                twill_lab::quickstart::down()?;
            } else {
                twill_lab::quickstart::up()?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Serve { port } => {
            twill_lab::probe::serve(port)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Probe {
            to,
            udp,
            timeout_ms,
        } => {
            let ok = twill_lab::probe::probe(to, udp, std::time::Duration::from_millis(timeout_ms));
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn up(name: &str, nodes: u32, etcd: bool) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`up` needs root (it creates network namespaces)");
    }
    if nodes == 0 || nodes > 200 {
        bail!("--nodes must be between 1 and 200");
    }
    let _ = cleanup_stale();
    if let Ok(old) = Lab::load(name) {
        bail!(
            "a lab named {name:?} is already up (prefix {}); run `twill-lab down --name {name}` first",
            old.prefix()
        );
    }
    // Until persisted, a failure drops the lab, which removes everything made so far.
    let mut lab = Lab::new(name)?;
    let endpoint = if etcd { Some(lab.start_etcd()?) } else { None };
    for i in 1..=nodes {
        lab.add_node(&format!("n{i}"))?;
    }
    println!(
        "lab {name}: prefix {}, dir {}",
        lab.prefix(),
        lab.dir().display()
    );
    println!("  switch  {:<16} br0 198.18.0.1/24", lab.switch_ns());
    if let Some(ep) = &endpoint {
        println!("  etcd    {ep} (log {}/etcd.log)", lab.dir().display());
    }
    for n in lab.nodes() {
        println!(
            "  node    {:<16} {} {}  dir {}",
            n.netns,
            n.ifname,
            n.underlay(),
            n.dir.display()
        );
    }
    let path = lab.persist()?;
    println!("state: {}", path.display());
    println!("try:   twill-lab exec --name {name} --node n1 -- ping -c1 198.18.0.12");
    println!("down:  twill-lab down --name {name}");
    Ok(())
}

fn down(name: &str, stale_only: bool) -> Result<ExitCode> {
    let mut code = ExitCode::SUCCESS;
    if !stale_only {
        match Lab::load(name) {
            Ok(lab) => {
                let prefix = lab.prefix().to_string();
                match lab.teardown() {
                    Ok(()) => println!("lab {name} ({prefix}) removed"),
                    Err(e) => {
                        eprintln!("twill-lab: {e:#}");
                        code = ExitCode::FAILURE;
                    }
                }
            }
            Err(e) => {
                let path = state_path(name);
                if path.exists() {
                    // Unreadable state: remove it so it does not block `up`; stale cleanup below
                    // removes the lab itself once its state file no longer names it.
                    eprintln!("twill-lab: {e:#}; removing {}", path.display());
                    std::fs::remove_file(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                } else {
                    eprintln!("twill-lab: no lab named {name:?} is up");
                }
            }
        }
    }
    match cleanup_stale() {
        Ok(v) => {
            for p in v {
                println!("removed stale lab {p}");
            }
        }
        Err(e) => {
            eprintln!("twill-lab: {e:#}");
            code = ExitCode::FAILURE;
        }
    }
    Ok(code)
}

fn resolve(lab: &Lab, node: &str) -> Result<String> {
    if node == SWITCH || lab.try_node(node).is_some() || lab.try_pod(node).is_some() {
        return Ok(lab.ns(node));
    }
    let names: Vec<&str> = std::iter::once(SWITCH)
        .chain(lab.nodes().iter().map(|n| n.name.as_str()))
        .chain(lab.pods().iter().map(|p| p.name.as_str()))
        .collect();
    bail!(
        "lab {} has no node or pod {node:?} (have: {})",
        lab.name(),
        names.join(", ")
    )
}

fn exec(name: &str, node: &str, cmd: &[String]) -> Result<ExitCode> {
    let lab = Lab::load(name)?;
    let ns = resolve(&lab, node)?;
    // Replace this process: the terminal, signals and exit status go straight to the command.
    let err = Command::new("ip")
        .args(["netns", "exec", &ns])
        .args(cmd)
        .exec();
    Err(err).context("executing ip netns exec")
}

fn list() -> Result<()> {
    let labs = list_labs()?;
    if labs.is_empty() {
        println!("no labs");
        return Ok(());
    }
    println!("{:<12} {:<16} {:<28} NAMESPACES", "PREFIX", "NAME", "OWNER");
    for l in labs {
        let owner = match &l.owner {
            LabOwner::Process { pid, alive } => {
                format!("pid {pid}{}", if *alive { "" } else { " (dead: stale)" })
            }
            LabOwner::Persisted { state_file, valid } => format!(
                "{}{}",
                state_file.display(),
                if *valid { "" } else { " (gone: stale)" }
            ),
            LabOwner::Unknown => "unknown".into(),
        };
        println!(
            "{:<12} {:<16} {:<28} {}",
            l.prefix,
            l.name,
            owner,
            l.namespaces.len()
        );
    }
    Ok(())
}
