//! `twilld --cleanup`: removes what twill adds to a node beyond Flannel's state, for switching
//! a node back to Flannel (README, "Switching back to Flannel").
//!
//! Flannel's start re-uses the lease, `flannel.1`, the peers' entries and its own rules, and it
//! knows nothing of twill's additions, all of them nftables tables:
//!
//! | table | written by | left behind under Flannel |
//! |---|---|---|
//! | `inet twill-underlay` | twilld | its peer sets go stale: VXLAN from a peer that joins later is dropped |
//! | `bridge twill-antispoof` | twill-cni | elements of pods deleted under Flannel's plugin (inert: keyed by veth name) |
//! | `inet twill-policy`, `bridge twill-policy` | twill-policy | the last verdicts, and new pods' addresses isolated |
//!
//! Only these four tables are removed, in one nft transaction. The lease, `flannel.1`, routes,
//! neighbours, FDB entries, subnet.env, Flannel's `ip flannel-ipv4` / `ip6 flannel-ipv6` tables
//! and iptables chains are Flannel-compatible state and are never touched. A twilld or
//! twill-policy still running in this network namespace would put its table back within a
//! resync period, so the cleanup refuses to run while one does. Sysctls twill set stay:
//! `accept_ra=0` on the pod bridge and veths (twill-cni, CVE-2020-10749) and
//! `bridge-nf-call-ip{,6}tables=1` (twill-policy) are safe under Flannel.

use std::fs;
use std::path::Path;

use crate::nft::{Nft, NftError, NftRunner};

/// twill-policy's table name (its `--table` default); it owns the name in both the `inet`
/// and the `bridge` family.
pub const POLICY_TABLE: &str = "twill-policy";

/// Every table twill creates, as (family, name).
pub const TWILL_TABLES: [(&str, &str); 4] = [
    ("inet", crate::underlay::TABLE),
    ("bridge", twill_nft::tables::ANTISPOOF),
    ("inet", POLICY_TABLE),
    ("bridge", POLICY_TABLE),
];

/// The programs whose tables these are and that re-create them while they run.
const TWILL_DAEMONS: [&str; 2] = ["twilld", "twill-policy"];

/// The tables of [`TWILL_TABLES`] present in `nft list tables` output, in that order.
pub fn present(listing: &str) -> Vec<(&'static str, &'static str)> {
    let listed: Vec<(&str, &str)> = listing
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next(), w.next()) {
                (Some("table"), Some(family), Some(name)) => Some((family, name)),
                _ => None,
            }
        })
        .collect();
    TWILL_TABLES
        .iter()
        .copied()
        .filter(|t| listed.contains(t))
        .collect()
}

/// One transaction deleting `tables`. Pure.
pub fn script(tables: &[(&str, &str)]) -> String {
    tables
        .iter()
        .map(|(family, name)| format!("delete table {family} {name}\n"))
        .collect()
}

/// Processes (pid, name) of twilld or twill-policy other than this one that share this
/// process's network namespace, read from `proc` (normally `/proc`). A process named
/// `flanneld` counts when its executable is twilld (the image's `/opt/bin/flanneld` link, for
/// a Flannel DaemonSet with only its image changed); when that cannot be read it is taken for
/// Flannel's own, which the switch back runs beside the cleanup. A twill daemon whose
/// namespace cannot be read (another container's process, without ptrace rights) counts as
/// running here, one that exited while the list was read does not: refusing wrongly costs a retry, deleting under a live daemon does not.
pub fn running_daemons(proc: &Path) -> Vec<(u32, String)> {
    let own_pid = std::process::id();
    let own_net = fs::read_link(proc.join("self/ns/net")).ok();
    let Ok(entries) = fs::read_dir(proc) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == own_pid {
            continue;
        }
        let Ok(comm) = fs::read_to_string(e.path().join("comm")) else {
            continue;
        };
        let comm = comm.trim();
        let is_twill = TWILL_DAEMONS.contains(&comm)
            || (comm == "flanneld"
                && fs::read_link(e.path().join("exe"))
                    .is_ok_and(|exe| exe.file_name().is_some_and(|n| n == "twilld")));
        if !is_twill {
            continue;
        }
        let net = match fs::read_link(e.path().join("ns/net")) {
            Ok(net) => Some(net),
            // Gone since it was listed, or a zombie: no daemon runs there any more.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(_) => None,
        };
        if net.is_none() || own_net.is_none() || net == own_net {
            out.push((pid, comm.to_string()));
        }
    }
    out.sort();
    out
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("{name} (pid {pid}) is running in this network namespace and would re-create its table; stop twill's daemons first (replace the DaemonSet with Flannel's manifest, or systemctl stop twilld twill-policy), then run twilld --cleanup again")]
    DaemonRunning { name: String, pid: u32 },
    #[error("listing nftables tables: {0}")]
    List(NftError),
    #[error("deleting twill's tables: {0}")]
    Delete(NftError),
}

/// Removes twill's tables from this network namespace; returns the ones it removed
/// (`inet twill-underlay`, ...), empty when there were none.
pub fn run() -> Result<Vec<String>, CleanupError> {
    if let Some((pid, name)) = running_daemons(Path::new("/proc")).into_iter().next() {
        return Err(CleanupError::DaemonRunning { name, pid });
    }
    delete_tables(&Nft::default())
}

/// The table removal of [`run`], through `nft` (synchronous: `--cleanup` runs before any
/// runtime starts).
fn delete_tables(nft: &dyn NftRunner) -> Result<Vec<String>, CleanupError> {
    let listing = nft.list_tables().map_err(CleanupError::List)?;
    let tables = present(&listing);
    if !tables.is_empty() {
        nft.apply(&script(&tables)).map_err(CleanupError::Delete)?;
    }
    Ok(tables
        .iter()
        .map(|(family, name)| format!("{family} {name}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "table ip flannel-ipv4\ntable ip6 flannel-ipv6\ntable inet twill-underlay\ntable bridge twill-antispoof\ntable ip nat\ntable inet twill-policy\ntable bridge twill-policy\ntable inet twill-policy-other\n";

    #[test]
    fn only_twills_own_tables_are_deleted() {
        let p = present(LISTING);
        assert_eq!(
            p,
            [
                ("inet", "twill-underlay"),
                ("bridge", "twill-antispoof"),
                ("inet", "twill-policy"),
                ("bridge", "twill-policy"),
            ]
        );
        let s = script(&p);
        assert_eq!(
            s,
            "delete table inet twill-underlay\ndelete table bridge twill-antispoof\ndelete table inet twill-policy\ndelete table bridge twill-policy\n"
        );
    }

    #[test]
    fn nothing_present_gives_an_empty_script() {
        let p = present("table ip flannel-ipv4\n");
        assert!(p.is_empty());
        assert_eq!(script(&p), "");
    }

    #[test]
    fn table_names_are_the_components_own() {
        assert_eq!(crate::underlay::TABLE, "twill-underlay");
        assert_eq!(twill_nft::tables::ANTISPOOF, "twill-antispoof");
    }

    #[test]
    fn the_present_tables_go_in_one_transaction() {
        let nft = twill_nft::RecordingNft::new();
        nft.reply(Ok(LISTING.into()));
        let removed = delete_tables(&nft).unwrap();
        assert_eq!(
            removed,
            [
                "inet twill-underlay",
                "bridge twill-antispoof",
                "inet twill-policy",
                "bridge twill-policy"
            ]
        );
        assert_eq!(nft.calls()[0].args, ["list", "tables"]);
        assert_eq!(nft.scripts(), [script(&present(LISTING))]);
        let nft = twill_nft::RecordingNft::new();
        nft.reply(Ok("table ip flannel-ipv4\n".into()));
        assert!(delete_tables(&nft).unwrap().is_empty());
        assert_eq!(nft.calls().len(), 1);
        let nft = twill_nft::RecordingNft::new();
        nft.reply(Ok(LISTING.into()))
            .fail("Error: Operation not permitted");
        let e = delete_tables(&nft).unwrap_err();
        assert_eq!(
            e.to_string(),
            "deleting twill's tables: nft -f - failed (exit status: 1): Error: Operation not permitted"
        );
    }

    #[test]
    fn daemons_are_found_by_name_or_executable_in_this_network_namespace() {
        let dir = std::env::temp_dir().join(format!("twill-cleanup-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let own_net = fs::read_link("/proc/self/ns/net").unwrap();
        let mk = |pid: u32, comm: &str, net: &Path| {
            let p = dir.join(pid.to_string());
            fs::create_dir_all(p.join("ns")).unwrap();
            fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
            std::os::unix::fs::symlink(net, p.join("ns/net")).unwrap();
        };
        fs::create_dir_all(dir.join("self/ns")).unwrap();
        std::os::unix::fs::symlink(&own_net, dir.join("self/ns/net")).unwrap();
        mk(10, "twilld", &own_net);
        mk(11, "twill-policy", Path::new("net:[1]"));
        mk(12, "bash", &own_net);
        mk(std::process::id(), "twilld", &own_net);
        assert_eq!(running_daemons(&dir), [(10, "twilld".to_string())]);
        // twilld under Flannel's name counts, Flannel's own flanneld does not; a twill daemon
        // whose namespace cannot be read counts, one that has exited does not.
        mk(20, "flanneld", &own_net);
        std::os::unix::fs::symlink("/opt/bin/twilld", dir.join("20/exe")).unwrap();
        mk(21, "flanneld", &own_net);
        std::os::unix::fs::symlink("/opt/bin/flanneld", dir.join("21/exe")).unwrap();
        // Unreadable here: not a link (a permission error cannot be staged as root).
        fs::create_dir_all(dir.join("22/ns/net")).unwrap();
        fs::write(dir.join("22/comm"), "twill-policy\n").unwrap();
        // Exited (or a zombie) while the list was read: its namespace link is gone.
        fs::create_dir_all(dir.join("23")).unwrap();
        fs::write(dir.join("23/comm"), "twilld\n").unwrap();
        assert_eq!(
            running_daemons(&dir),
            [
                (10, "twilld".to_string()),
                (20, "flanneld".to_string()),
                (22, "twill-policy".to_string())
            ]
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
