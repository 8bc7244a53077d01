//! `twilld status`: asks this node's running daemons over their local sockets (twilld's
//! `--status-socket`, twill-policy's `run --status-socket`) what they hold and what the kernel
//! holds, and prints it as a table (default) or as one JSON object. Like `calicoctl node
//! status` or `cilium status`, it exits 0 when the node is healthy, 1 when any problem is
//! found (each named in the output), 2 on a usage error.
//!
//! Nothing is recomputed here: the daemons answer from their state and a kernel dump made at
//! the request ([`crate::status`]). The judgement ([`problems`]) and the table ([`table`])
//! are pure.

use std::fmt::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use serde::Serialize;
use twill_runtime::status::{PolicyStatus, TwilldStatus};

/// A lease with less time left than this is a problem: twilld renews it at least a minute
/// (the smallest `--subnet-lease-renew-margin`) before it runs out.
pub const LEASE_EXPIRY_WARNING_SECONDS: i64 = 60;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// `twilld status`'s command line.
#[derive(Parser, Debug)]
#[command(
    name = "twilld status",
    about = "Show what twilld and twill-policy on this node hold, next to what the kernel holds; exit 1 when the node is not healthy"
)]
pub struct StatusArgs {
    /// table (default) or json.
    #[arg(long, value_enum, default_value = "table")]
    pub output: Output,
    /// twilld's status socket.
    #[arg(long, default_value = twill_runtime::status::TWILLD_SOCKET)]
    pub twilld_socket: PathBuf,
    /// twill-policy's status socket; empty: twill-policy is not asked (not deployed here).
    #[arg(long, default_value = twill_runtime::status::POLICY_SOCKET)]
    pub policy_socket: String,
}

/// What the command found: each daemon's answer, or why there is none.
#[derive(Debug)]
pub struct Findings {
    pub twilld: Result<TwilldStatus, String>,
    /// `None`: twill-policy was not asked.
    pub policy: Option<Result<PolicyStatus, String>>,
}

/// The `--output json` object.
#[derive(Serialize)]
struct JsonReport<'a> {
    twilld: Option<&'a TwilldStatus>,
    policy: Option<&'a PolicyStatus>,
    problems: &'a [String],
}

/// Runs the command with `args` (after `twilld status`); the exit code.
pub fn main(args: impl IntoIterator<Item = String>) -> ExitCode {
    let args = match StatusArgs::try_parse_from(
        std::iter::once("twilld status".to_string()).chain(args),
    ) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(2),
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("twilld status: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let findings = runtime.block_on(async {
        let twilld = twill_runtime::status::fetch::<TwilldStatus>(&args.twilld_socket)
            .await
            .map_err(|e| e.to_string());
        let policy = if args.policy_socket.is_empty() {
            None
        } else {
            Some(
                twill_runtime::status::fetch::<PolicyStatus>(args.policy_socket.as_ref())
                    .await
                    .map_err(|e| e.to_string()),
            )
        };
        Findings { twilld, policy }
    });
    let problems = problems(&findings);
    match args.output {
        Output::Table => print!("{}", printable(&table(&findings, &problems))),
        Output::Json => {
            let report = JsonReport {
                twilld: findings.twilld.as_ref().ok(),
                policy: findings.policy.as_ref().and_then(|p| p.as_ref().ok()),
                problems: &problems,
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&report).expect("status serializes")
            );
        }
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Every problem found, each one line naming what is wrong. Empty: healthy.
pub fn problems(f: &Findings) -> Vec<String> {
    let mut out = Vec::new();
    match &f.twilld {
        Err(e) => out.push(format!("twilld unreachable: {e}")),
        Ok(t) => {
            if !t.ready {
                out.push("twilld not ready".to_string());
            }
            if let Some(left) = t.lease.as_ref().and_then(|l| l.expires_in_seconds) {
                if left < LEASE_EXPIRY_WARNING_SECONDS {
                    out.push(format!("lease expires in {left}s"));
                }
            }
            for p in t.peers.iter().filter(|p| !p.in_sync()) {
                let mut what = Vec::new();
                if !p.missing().is_empty() {
                    what.push(format!("missing {}", p.missing().join(", ")));
                }
                if !p.unexpected().is_empty() {
                    what.push(format!("unexpected {}", p.unexpected().join(", ")));
                }
                out.push(format!(
                    "peer {} ({}) out of sync: {}",
                    p.subnet,
                    p.public_ip,
                    what.join("; ")
                ));
            }
            for s in &t.skipped_peers {
                out.push(format!("peer lease {} skipped: {}", s.lease, s.reason));
            }
            if !t.stale_kernel_entries.is_empty() {
                out.push(format!(
                    "stale kernel entries: {}",
                    t.stale_kernel_entries.join(", ")
                ));
            }
            if let Some(g) = &t.underlay_guard {
                if let Some(diff) = set_difference(&g.desired_peers, &g.kernel_peers) {
                    out.push(format!("underlay guard peer set differs: {diff}"));
                }
                if let Some(diff) = set_difference(&g.desired_peer_subnets, &g.kernel_peer_subnets)
                {
                    out.push(format!("underlay guard peer subnet set differs: {diff}"));
                }
            }
        }
    }
    match &f.policy {
        None => {}
        Some(Err(e)) => out.push(format!("twill-policy unreachable: {e}")),
        Some(Ok(p)) => {
            if !p.ready {
                out.push("twill-policy not ready".to_string());
            }
            if p.fail_closed {
                out.push("twill-policy fails closed (isolation-only ruleset loaded)".to_string());
            }
            if p.ruleset_id != p.kernel_ruleset_id {
                out.push(format!(
                    "twill-policy ruleset {} is not the kernel's ({})",
                    p.ruleset_id.as_deref().unwrap_or("none"),
                    p.kernel_ruleset_id.as_deref().unwrap_or("none")
                ));
            }
        }
    }
    out
}

/// `None` when `wanted` and `held` hold the same elements, else what differs.
fn set_difference(wanted: &[String], held: &[String]) -> Option<String> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|w| !held.contains(w))
        .map(String::as_str)
        .collect();
    let extra: Vec<&str> = held
        .iter()
        .filter(|h| !wanted.contains(h))
        .map(String::as_str)
        .collect();
    if missing.is_empty() && extra.is_empty() {
        return None;
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("kernel lacks {}", missing.join(", ")));
    }
    if !extra.is_empty() {
        parts.push(format!("kernel also holds {}", extra.join(", ")));
    }
    Some(parts.join("; "))
}

fn or_dash(s: Option<&str>) -> &str {
    s.unwrap_or("-")
}

/// Rows as columns padded to the widest cell.
fn columns(rows: &[Vec<String>]) -> String {
    let mut widths = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if widths.len() <= i {
                widths.push(0);
            }
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::from("  ");
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// The table `twilld status` prints.
/// `text` with every control character but the newline escaped (`\u{1b}`): lease keys,
/// skip reasons and error texts carry what a peer or a broken lease wrote, and must not
/// drive the operator's terminal.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

pub fn table(f: &Findings, problems: &[String]) -> String {
    let mut s = String::new();
    match &f.twilld {
        Err(e) => {
            let _ = writeln!(s, "twilld: unreachable: {e}");
        }
        Ok(t) => twilld_table(&mut s, t),
    }
    match &f.policy {
        None => {
            let _ = writeln!(s, "\ntwill-policy: not asked");
        }
        Some(Err(e)) => {
            let _ = writeln!(s, "\ntwill-policy: unreachable: {e}");
        }
        Some(Ok(p)) => policy_table(&mut s, p),
    }
    if problems.is_empty() {
        let _ = writeln!(s, "\nHealthy.");
    } else {
        let _ = writeln!(s, "\nProblems ({}):", problems.len());
        for p in problems {
            let _ = writeln!(s, "  - {p}");
        }
    }
    s
}

fn twilld_table(s: &mut String, t: &TwilldStatus) {
    let age = t
        .last_reconcile_age_seconds
        .map(|a| format!("last reconcile {a:.1}s ago"))
        .unwrap_or_else(|| "no reconcile yet".to_string());
    let ready = if t.ready { "ready" } else { "NOT READY" };
    let _ = writeln!(
        s,
        "twilld on node {} (backend {}): {ready}, {age}",
        t.node, t.backend
    );
    match &t.lease {
        None => {
            let _ = writeln!(s, "Lease: none");
        }
        Some(l) => {
            let expiry = match l.expires_in_seconds {
                Some(secs) => format!("expires in {secs}s"),
                None => "does not expire".to_string(),
            };
            let _ = writeln!(
                s,
                "Lease: subnet {}, IPv6 subnet {}, public IP {}, public IPv6 {}, VTEP MAC {}, {expiry}",
                l.subnet,
                or_dash(l.ipv6_subnet.as_deref()),
                l.public_ip,
                or_dash(l.public_ipv6.as_deref()),
                or_dash(l.vtep_mac.as_deref()),
            );
        }
    }
    let _ = writeln!(s, "\nPeers ({}):", t.peers.len());
    if !t.peers.is_empty() {
        let mut rows = vec![row(&[
            "SUBNET",
            "IPV6 SUBNET",
            "PUBLIC IP",
            "VTEP MAC",
            "ENTRIES",
            "SYNC",
            "MISSING / UNEXPECTED",
        ])];
        for p in &t.peers {
            let mut detail = Vec::new();
            detail.extend(p.missing().iter().map(|m| format!("missing: {m}")));
            detail.extend(p.unexpected().iter().map(|u| format!("unexpected: {u}")));
            rows.push(vec![
                p.subnet.clone(),
                or_dash(p.ipv6_subnet.as_deref()).to_string(),
                p.public_ip.clone(),
                or_dash(p.vtep_mac.as_deref()).to_string(),
                format!("{}/{}", p.kernel.len(), p.desired.len()),
                if p.in_sync() {
                    "in sync"
                } else {
                    "OUT OF SYNC"
                }
                .to_string(),
                detail.join("; "),
            ]);
        }
        s.push_str(&columns(&rows));
    }
    let _ = writeln!(s, "\nSkipped leases ({}):", t.skipped_peers.len());
    if !t.skipped_peers.is_empty() {
        let mut rows = vec![row(&["LEASE", "REASON"])];
        rows.extend(
            t.skipped_peers
                .iter()
                .map(|p| vec![p.lease.clone(), p.reason.clone()]),
        );
        s.push_str(&columns(&rows));
    }
    let _ = writeln!(
        s,
        "\nStale kernel entries ({}):",
        t.stale_kernel_entries.len()
    );
    for e in &t.stale_kernel_entries {
        let _ = writeln!(s, "  {e}");
    }
    match &t.underlay_guard {
        None => {
            let _ = writeln!(s, "\nUnderlay guard: off");
        }
        Some(g) => {
            let peers_match = set_difference(&g.desired_peers, &g.kernel_peers).is_none();
            let subnets_match =
                set_difference(&g.desired_peer_subnets, &g.kernel_peer_subnets).is_none();
            let verdict = if peers_match && subnets_match {
                "the kernel's sets match"
            } else {
                "the kernel's sets DIFFER"
            };
            let _ = writeln!(
                s,
                "\nUnderlay guard: {} peers, {} peer subnets; {verdict}",
                g.desired_peers.len(),
                g.desired_peer_subnets.len()
            );
            let _ = writeln!(s, "  peers: {}", g.desired_peers.join(", "));
            if !peers_match {
                let _ = writeln!(s, "  kernel peers: {}", g.kernel_peers.join(", "));
            }
            if !subnets_match {
                let _ = writeln!(
                    s,
                    "  peer subnets: {}\n  kernel peer subnets: {}",
                    g.desired_peer_subnets.join(", "),
                    g.kernel_peer_subnets.join(", ")
                );
            }
        }
    }
}

fn policy_table(s: &mut String, p: &PolicyStatus) {
    let ready = if p.ready { "ready" } else { "NOT READY" };
    let _ = writeln!(s, "\ntwill-policy on node {}: {ready}", p.node);
    let held = match (&p.ruleset_id, &p.kernel_ruleset_id) {
        (Some(a), Some(b)) if a == b => "the kernel holds it".to_string(),
        (_, Some(b)) => format!("the kernel holds {b} instead"),
        (_, None) => "the kernel holds none".to_string(),
    };
    let _ = writeln!(
        s,
        "Ruleset: {} ({held}); fail-closed: {}; last good snapshot: {}; {} pods, {} policies{}",
        or_dash(p.ruleset_id.as_deref()),
        if p.fail_closed { "YES" } else { "no" },
        p.last_good_snapshot_age_seconds
            .map(|a| format!("{a:.1}s ago"))
            .unwrap_or_else(|| "none".to_string()),
        p.pods,
        p.policies,
        match p.cluster_policies {
            0 => String::new(),
            n => format!(", {n} cluster policies"),
        }
    );
    let _ = writeln!(s, "Top drops ({}):", p.top_drops.len());
    if !p.top_drops.is_empty() {
        let mut rows = vec![row(&["POD", "DIRECTION", "PACKETS"])];
        rows.extend(
            p.top_drops
                .iter()
                .map(|d| vec![d.pod.clone(), d.direction.clone(), d.packets.to_string()]),
        );
        s.push_str(&columns(&rows));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_peer_cannot_drive_the_terminal() {
        assert_eq!(
            super::printable("lease 10.1.0.0-24\u{1b}[2J\r: bad\nnext"),
            "lease 10.1.0.0-24\\u{1b}[2J\\r: bad\nnext"
        );
    }

    use super::*;
    use twill_runtime::status::{GuardStatus, LeaseStatus, PeerStatus, PodDrops, SkippedPeer};

    fn peer(subnet: &str, desired: &[&str], kernel: &[&str]) -> PeerStatus {
        PeerStatus {
            subnet: subnet.into(),
            ipv6_subnet: None,
            public_ip: "198.18.0.12".into(),
            vtep_mac: Some("0a:00:00:00:00:02".into()),
            desired: desired.iter().map(|s| s.to_string()).collect(),
            kernel: kernel.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn healthy_twilld() -> TwilldStatus {
        let route = "route 10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink";
        TwilldStatus {
            node: "n1".into(),
            backend: "vxlan".into(),
            ready: true,
            lease: Some(LeaseStatus {
                subnet: "10.244.1.0/24".into(),
                ipv6_subnet: None,
                public_ip: "198.18.0.11".into(),
                public_ipv6: None,
                vtep_mac: Some("0a:00:00:00:00:01".into()),
                expires_in_seconds: Some(80000),
            }),
            peers: vec![peer("10.244.2.0/24", &[route], &[route])],
            skipped_peers: vec![],
            stale_kernel_entries: vec![],
            underlay_guard: Some(GuardStatus {
                desired_peers: vec!["198.18.0.12".into()],
                kernel_peers: vec!["198.18.0.12".into()],
                desired_peer_subnets: vec!["10.244.2.0/24".into()],
                kernel_peer_subnets: vec!["10.244.2.0/24".into()],
            }),
            last_reconcile_age_seconds: Some(1.5),
        }
    }

    fn healthy_policy() -> PolicyStatus {
        PolicyStatus {
            node: "n1".into(),
            ready: true,
            fail_closed: false,
            ruleset_id: Some("abc".into()),
            kernel_ruleset_id: Some("abc".into()),
            last_good_snapshot_age_seconds: Some(2.0),
            pods: 3,
            policies: 1,
            cluster_policies: 0,
            top_drops: vec![PodDrops {
                pod: "default/web".into(),
                direction: "ingress".into(),
                packets: 12,
            }],
        }
    }

    #[test]
    fn a_healthy_node_has_no_problems_and_its_table_shows_everything() {
        let f = Findings {
            twilld: Ok(healthy_twilld()),
            policy: Some(Ok(healthy_policy())),
        };
        let problems = problems(&f);
        assert!(problems.is_empty(), "{problems:?}");
        let t = table(&f, &problems);
        for needle in [
            "twilld on node n1 (backend vxlan): ready, last reconcile 1.5s ago",
            "Lease: subnet 10.244.1.0/24, IPv6 subnet -, public IP 198.18.0.11, public IPv6 -, VTEP MAC 0a:00:00:00:00:01, expires in 80000s",
            "10.244.2.0/24  -            198.18.0.12  0a:00:00:00:00:02  1/1      in sync",
            "Underlay guard: 1 peers, 1 peer subnets; the kernel's sets match",
            "Ruleset: abc (the kernel holds it); fail-closed: no; last good snapshot: 2.0s ago; 3 pods, 1 policies",
            "default/web  ingress    12",
            "Healthy.",
        ] {
            assert!(t.contains(needle), "{needle:?} not in\n{t}");
        }
        // Cluster policies are counted when there are any.
        let mut policy = healthy_policy();
        policy.cluster_policies = 2;
        let f = Findings {
            twilld: Ok(healthy_twilld()),
            policy: Some(Ok(policy)),
        };
        let t = table(&f, &problems);
        assert!(
            t.contains("; 3 pods, 1 policies, 2 cluster policies\n"),
            "{t}"
        );
    }

    #[test]
    fn every_kind_of_problem_is_named() {
        let mut t = healthy_twilld();
        t.ready = false;
        t.lease.as_mut().unwrap().expires_in_seconds = Some(30);
        t.peers[0].kernel.clear();
        t.peers[0]
            .kernel
            .push("route 10.244.2.0/24 via 198.18.0.12 dev eth0".into());
        t.skipped_peers.push(SkippedPeer {
            lease: "10.244.4.0-24".into(),
            reason: "host-gw needs L2 adjacency".into(),
        });
        t.stale_kernel_entries
            .push("fdb 0a:00:00:00:00:09 dst 198.18.0.99 dev flannel.1".into());
        t.underlay_guard.as_mut().unwrap().kernel_peers.clear();
        let mut p = healthy_policy();
        p.ready = false;
        p.fail_closed = true;
        p.kernel_ruleset_id = Some("old".into());
        let f = Findings {
            twilld: Ok(t),
            policy: Some(Ok(p)),
        };
        assert_eq!(
            problems(&f),
            vec![
                "twilld not ready",
                "lease expires in 30s",
                "peer 10.244.2.0/24 (198.18.0.12) out of sync: missing route 10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink; unexpected route 10.244.2.0/24 via 198.18.0.12 dev eth0",
                "peer lease 10.244.4.0-24 skipped: host-gw needs L2 adjacency",
                "stale kernel entries: fdb 0a:00:00:00:00:09 dst 198.18.0.99 dev flannel.1",
                "underlay guard peer set differs: kernel lacks 198.18.0.12",
                "twill-policy not ready",
                "twill-policy fails closed (isolation-only ruleset loaded)",
                "twill-policy ruleset abc is not the kernel's (old)",
            ]
        );
        let table = table(&f, &problems(&f));
        assert!(table.contains("OUT OF SYNC"), "{table}");
        assert!(table.contains("the kernel's sets DIFFER"), "{table}");
        assert!(table.contains("Problems (9):"), "{table}");
    }

    #[test]
    fn unreachable_daemons_are_problems_and_an_unasked_policy_is_not() {
        let f = Findings {
            twilld: Err("/run/twill/twilld.sock: cannot connect: No such file".into()),
            policy: Some(Err("/run/twill/policy.sock: cannot connect".into())),
        };
        assert_eq!(
            problems(&f),
            vec![
                "twilld unreachable: /run/twill/twilld.sock: cannot connect: No such file",
                "twill-policy unreachable: /run/twill/policy.sock: cannot connect",
            ]
        );
        let f = Findings {
            twilld: Ok(healthy_twilld()),
            policy: None,
        };
        assert!(problems(&f).is_empty());
        assert!(table(&f, &[]).contains("twill-policy: not asked"));
    }

    #[test]
    fn usage_errors_are_rejected_by_the_parser() {
        assert!(StatusArgs::try_parse_from(["twilld status", "--output", "yaml"]).is_err());
        assert!(StatusArgs::try_parse_from(["twilld status", "extra"]).is_err());
        let a = StatusArgs::try_parse_from(["twilld status", "--output", "json"]).unwrap();
        assert_eq!(a.output, Output::Json);
        assert_eq!(a.twilld_socket, PathBuf::from("/run/twill/twilld.sock"));
        let a = StatusArgs::try_parse_from(["twilld status", "--policy-socket", ""]).unwrap();
        assert_eq!(a.policy_socket, "");
    }
}
