//! The [`Enforcer`]: applies compiled rulesets through nft ([`twill_nft::Nft`]) and fails
//! closed; the ruleset markers that tell which ruleset the kernel holds; the start-up plan.
//!
//! Fail-closed design:
//! - The table is never deleted on exit or restart: after a restart the previous run's
//!   table (the last good state) stays enforced until the first sync replaces it.
//! - Every sync is one transaction: only the differences from the last applied ruleset
//!   when possible, else the whole table refilled in place (see README, Updates); if nft
//!   rejects the full ruleset, the transaction is rolled back by the kernel and the
//!   enforcer then installs
//!   the *isolation-only* table compiled from the same snapshot: every local pod that a
//!   policy isolates gets its map entry and a chain that only logs and drops, so new
//!   connections to/from selected pods are refused (established ones keep working through
//!   conntrack). Keeping the previous table instead would leave pods that became selected
//!   since then wide open, so we prefer a too-strict table over a too-open one.
//! - If even the isolation-only table cannot be applied, whatever is loaded stays (the
//!   last good full table, or an earlier isolation-only one), and the error is reported;
//!   the next sync retries.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use twill_nft::{Nft, NftRunner};

use crate::compile::{compile, DiffStats, Options, Ruleset, Stats, TableDef};
use crate::conntrack;
use crate::model::Snapshot;

/// FNV-1a (64 bits) over everything written into it.
struct Fnv(u64);

impl std::fmt::Write for Fnv {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        for b in s.bytes() {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        Ok(())
    }
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// A short fingerprint (FNV-1a, 64 bits, hex) of a rendered ruleset. The enforcer writes
/// it into the table (`twill-policy ruleset <id>`, the comment of the one element of set
/// `ruleset-id`), so anyone can tell cheaply, with `nft list table`, which ruleset the
/// kernel holds (the lab tests wait on it).
pub fn ruleset_id(script: &str) -> String {
    let mut h = Fnv(FNV_START);
    let _ = std::fmt::Write::write_str(&mut h, script);
    format!("{:016x}", h.0)
}

/// [`ruleset_id`] of `def.render()`, without building the script.
pub fn def_id(def: &TableDef) -> String {
    let mut h = Fnv(FNV_START);
    let _ = def.write_script(&mut h, "");
    format!("{:016x}", h.0)
}

/// The marker of a loaded ruleset: `twill-policy ruleset <id>` of `script`.
pub fn ruleset_marker(script: &str) -> String {
    marker_of(&ruleset_id(script))
}

fn marker_of(id: &str) -> String {
    format!("twill-policy ruleset {id}")
}

/// The element of set `ruleset-id` that stands for ruleset `id`: the 64-bit id as an IPv6
/// address (sets need a typed key), commented with the marker.
fn id_elem(id: &str) -> String {
    let n = u64::from_str_radix(id, 16).unwrap_or(0);
    std::net::Ipv6Addr::from(u128::from(n)).to_string()
}

/// The set whose one element names the loaded ruleset (see [`ruleset_id`]).
pub const RULESET_ID_SET: &str = "ruleset-id";

/// The `ruleset-id` set of a table holding ruleset `id`. The table's own comment cannot
/// be changed by a later transaction (the kernel keeps the first one), a set element
/// can; deleting the old element also makes every incremental transaction check, inside
/// the transaction, that the kernel still holds the ruleset it was computed against.
fn id_set(id: &str) -> String {
    format!(
        "\tset ruleset-id {{\n\t\ttype ipv6_addr\n\t\telements = {{ {} comment {:?} }}\n\t}}\n",
        id_elem(id),
        marker_of(id)
    )
}

/// `script` (from [`crate::compile::Ruleset::render`]) with the `ruleset-id` set naming
/// [`ruleset_id`] of it added as the table's first object.
pub fn mark(script: &str, table: &str) -> String {
    let head = format!("table inet {table} {{\n");
    match script.find(&head) {
        Some(i) => {
            let at = i + head.len();
            format!(
                "{}{}{}",
                &script[..at],
                id_set(&ruleset_id(script)),
                &script[at..]
            )
        }
        None => script.to_string(),
    }
}

/// The marked full script of `def` (same text as `mark(&def.render(), table)`), written
/// once.
pub fn marked_script(def: &TableDef, id: &str) -> String {
    let mut s = String::new();
    let _ = def.write_script(&mut s, &id_set(id));
    s
}

/// What `run` enforces before its first good snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartupPlan {
    /// A table from an earlier run exists (restart without reboot): it stays. It enforces
    /// the last known policy, and, if that run knew the pod subnets, isolates pods created
    /// since; total isolation instead would cut every pod's new connections for as long as
    /// the source is down, which a restart (upgrade, OOM kill) must not do.
    KeepPrevious,
    /// No table (fresh boot): isolate every address of the node's pod subnets.
    Isolate,
    /// No table and no pod subnets known: nothing can be isolated yet.
    Unprotected,
}

/// Decides what to enforce before the first good snapshot.
pub fn startup_plan(table_existed: bool, pod_cidrs: &[ipnet::IpNet]) -> StartupPlan {
    if table_existed {
        StartupPlan::KeepPrevious
    } else if pod_cidrs.is_empty() {
        StartupPlan::Unprotected
    } else {
        StartupPlan::Isolate
    }
}

/// What a sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The full ruleset is loaded (the table was replaced as a whole).
    Full,
    /// The full ruleset is loaded by one transaction that changed only what differs
    /// from the previously loaded ruleset.
    Incremental,
    /// Nothing changed since the last successful apply.
    Unchanged,
    /// The full ruleset failed; the isolation-only table is loaded.
    FailClosed { error: String },
    /// Both failed; the kernel keeps whatever was loaded before.
    Failed {
        error: String,
        fail_closed_error: String,
    },
}

/// Result of one sync.
#[derive(Debug, Clone)]
pub struct SyncReport {
    pub applied: Applied,
    pub stats: Stats,
    pub duration: Duration,
    /// Incremental: the chains added, refilled or deleted (their counters restart).
    pub changed_chains: Vec<String>,
    /// Incremental: set and map elements added or deleted.
    pub changed_elements: usize,
    /// Strict mode, after a ruleset change: the conntrack pass (flows cut), or why it
    /// failed.
    pub conntrack: Option<Result<conntrack::Pass, String>>,
}

/// What the enforcer believes the kernel holds.
#[derive(Debug)]
struct Loaded {
    def: TableDef,
    id: String,
}

/// Applies snapshots for one node.
#[derive(Debug)]
pub struct Enforcer {
    pub nft: Nft,
    pub node: String,
    pub opts: Options,
    /// The last successfully applied full ruleset.
    last: Option<Loaded>,
    /// The id of the ruleset the last apply loaded: the full one, or the isolation-only
    /// one after a rejected full ruleset; kept when nothing could be applied.
    loaded_id: Option<String>,
    /// When false, every change replaces the whole table.
    pub incremental: bool,
    /// Strict mode: after every sync that loads a new full ruleset, mark the conntrack
    /// entries (of this thread's network namespace) that it would not allow as new
    /// connections, which the table then drops, and unmark those it allows again
    /// ([`conntrack::cut_denied`]). Off in [`Enforcer::new`], so that a library
    /// caller never touches the conntrack table of a namespace it did not mean to; the
    /// daemon turns it on (`--strict-mode`, default true).
    pub strict: bool,
}

impl Enforcer {
    pub fn new(nft: Nft, node: &str, opts: Options) -> Enforcer {
        Enforcer {
            nft,
            node: node.to_string(),
            opts,
            last: None,
            loaded_id: None,
            incremental: true,
            strict: false,
        }
    }

    /// The full script for `snap`, marked with its [`ruleset_id`].
    pub fn script(&self, snap: &Snapshot) -> String {
        mark(
            &compile(snap, &self.node, &self.opts).render(),
            &self.opts.table,
        )
    }

    /// The isolation-only (fail-closed) script for `snap`.
    pub fn fail_closed_script(&self, snap: &Snapshot) -> String {
        self.fail_closed_marked(snap).0
    }

    /// The isolation-only script for `snap`, marked, and its [`ruleset_id`].
    fn fail_closed_marked(&self, snap: &Snapshot) -> (String, String) {
        let opts = Options {
            allow_rules: false,
            ..self.opts.clone()
        };
        let script = compile(snap, &self.node, &opts).render();
        let id = ruleset_id(&script);
        (mark(&script, &opts.table), id)
    }

    /// The id of the ruleset the last apply loaded (what the kernel should hold; the
    /// kernel's own copy is in set [`RULESET_ID_SET`]).
    pub fn loaded_id(&self) -> Option<&str> {
        self.loaded_id.as_deref()
    }

    /// The incremental transaction from `last` to `def` (id `id`), if one can do it:
    /// first delete the old id element (fails, and so aborts the whole transaction, if
    /// the kernel does not hold the ruleset we think it holds: table missing, replaced or
    /// changed by someone else), then the changes, then the new id element.
    fn incremental_script(&self, def: &TableDef, id: &str) -> Option<(String, DiffStats)> {
        let last = self.last.as_ref().filter(|_| self.incremental)?;
        let (body, st) = def.diff(&last.def)?;
        let t = &def.table;
        let script = format!(
            "delete element inet {t} ruleset-id {{ {} }}\n{body}add element inet {t} ruleset-id {{ {} comment {:?} }}\n",
            id_elem(&last.id),
            id_elem(id),
            marker_of(id)
        );
        Some((script, st))
    }

    /// The transaction that turns whatever table named `def.table` the kernel holds into
    /// `def` without deleting the table; None if there is no such table (or it cannot be
    /// listed).
    fn refill_script(&self, def: &TableDef, id: &str) -> Option<String> {
        let t = &def.table;
        // Without set elements (-t).
        let listing = self.nft.list_table("inet", t, false).ok()?;
        let keep_sets: std::collections::HashSet<&str> = def
            .sets
            .iter()
            .chain(&def.node_sets)
            .map(|s| s.name.as_str())
            .chain(def.maps.iter().map(|m| m.name.as_str()))
            .chain(["ruleset-id"])
            .collect();
        let keep_chains: std::collections::HashSet<&str> = def
            .chains
            .iter()
            .map(|c| c.name.as_str())
            .chain(["forward", "input", "unaddressed"])
            .chain(
                (!def.node_sets.is_empty())
                    .then_some(["unknown-ingress", "unknown-egress"])
                    .into_iter()
                    .flatten(),
            )
            .collect();
        let mut head = format!("add table inet {t}\nflush table inet {t}\n");
        let mut tail = String::new();
        for item in &listing.nftables {
            for (set, what) in [(&item.set, "set"), (&item.map, "map")] {
                if let Some(name) = set.as_ref().map(|s| s.name.as_str()) {
                    let _ = writeln!(head, "flush {what} inet {t} {name}");
                    if !keep_sets.contains(name) {
                        let _ = writeln!(tail, "delete {what} inet {t} {name}");
                    }
                }
            }
            if let Some(chain) = &item.chain {
                if !keep_chains.contains(chain.name.as_str()) {
                    let _ = writeln!(head, "delete chain inet {t} {}", chain.name);
                }
            }
            // Counters of kept pod chains keep counting; the others go once no rule
            // names them (`flush table` emptied every chain).
            if let Some(counter) = &item.counter {
                if !keep_chains.contains(counter.name.as_str()) {
                    let _ = writeln!(tail, "delete counter inet {t} {}", counter.name);
                }
            }
        }
        let mut s = head;
        s.push_str(&tail);
        let _ = def.write_body(&mut s, &id_set(id));
        s.push_str(&def.bridge);
        Some(s)
    }

    /// Makes the kernel enforce `snap`: with one transaction that changes only what
    /// differs from the last applied ruleset when possible, else by replacing the whole
    /// table; falls back to the isolation-only table when the full one is rejected.
    pub fn sync(&mut self, snap: &Snapshot) -> SyncReport {
        let start = Instant::now();
        let rs = compile(snap, &self.node, &self.opts);
        let stats = rs.stats();
        let compiled = start.elapsed();
        let def = rs.table_def();
        // Strict mode keeps the ruleset to judge established flows after the apply; else
        // it goes now (peak memory).
        let rs = self.strict.then_some(rs);
        let id = def_id(&def);
        tracing::debug!(
            "sync: compile {compiled:?}, table definition and id {:?}",
            start.elapsed() - compiled
        );
        let mut report = SyncReport {
            applied: Applied::Unchanged,
            stats,
            duration: Duration::ZERO,
            changed_chains: Vec::new(),
            changed_elements: 0,
            conntrack: None,
        };
        if self.last.as_ref().is_some_and(|l| l.id == id) {
            report.duration = start.elapsed();
            return report;
        }
        let t = Instant::now();
        if let Some((script, st)) = self.incremental_script(&def, &id) {
            let diffed = t.elapsed();
            let res = self.nft.apply(&script);
            tracing::debug!(
                "sync: diff {diffed:?}, incremental nft -f ({} bytes) {:?}",
                script.len(),
                t.elapsed() - diffed
            );
            match res {
                Ok(()) => {
                    self.loaded_id = Some(id.clone());
                    self.last = Some(Loaded { def, id });
                    report.applied = Applied::Incremental;
                    report.changed_chains = st.chains;
                    report.changed_elements = st.elements;
                    report.duration = start.elapsed();
                    report.conntrack = cut_flows(rs.as_ref());
                    return report;
                }
                Err(e) => {
                    tracing::warn!("incremental update rejected ({e}); replacing the whole table")
                }
            }
        }
        // The whole ruleset. If the table exists, refill it in place (flush its rules and
        // sets, delete what the new ruleset lacks, define the rest) so that its base
        // chains stay hooked: deleting and re-creating the table swaps the hooks, and on
        // kernel 6.18 a packet can pass between the old and new base chain (atomic_lab
        // saw 1 datagram in 1000 such replacements). Only when that is rejected (e.g. a
        // set changed type) is the table deleted and created again.
        if let Some(script) = self.refill_script(&def, &id) {
            match self.nft.apply(&script) {
                Ok(()) => {
                    self.loaded_id = Some(id.clone());
                    self.last = Some(Loaded { def, id });
                    report.applied = Applied::Full;
                    report.duration = start.elapsed();
                    report.conntrack = cut_flows(rs.as_ref());
                    return report;
                }
                Err(e) => tracing::warn!(
                    "refilling the table in place rejected ({e}); deleting and re-creating it"
                ),
            }
        }
        let script = marked_script(&def, &id);
        report.applied = match self.nft.apply(&script) {
            Ok(()) => {
                drop(script);
                self.loaded_id = Some(id.clone());
                self.last = Some(Loaded { def, id });
                Applied::Full
            }
            Err(e) => {
                self.last = None;
                drop(script);
                let (fail_closed, fail_closed_id) = self.fail_closed_marked(snap);
                match self.nft.apply(&fail_closed) {
                    Ok(()) => {
                        self.loaded_id = Some(fail_closed_id);
                        Applied::FailClosed {
                            error: e.to_string(),
                        }
                    }
                    Err(e2) => Applied::Failed {
                        error: e.to_string(),
                        fail_closed_error: e2.to_string(),
                    },
                }
            }
        };
        report.duration = start.elapsed();
        if report.applied == Applied::Full {
            report.conntrack = cut_flows(rs.as_ref());
        }
        report
    }

    /// Forces the next sync to replace the whole table even if nothing changed (periodic
    /// resync repairs drift, e.g. someone deleting the table or a chain by hand).
    pub fn invalidate(&mut self) {
        self.last = None;
    }
}

/// The strict-mode pass after `rs` was loaded (None when strict mode is off). The fail-closed
/// table is not followed by one: it only refuses new connections (README, Fail closed).
fn cut_flows(rs: Option<&Ruleset>) -> Option<Result<conntrack::Pass, String>> {
    rs.map(|rs| conntrack::cut_denied(rs).map_err(|e| format!("conntrack: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_keeps_an_earlier_table_else_isolates_known_subnets() {
        let cidrs: Vec<ipnet::IpNet> = vec!["10.244.1.0/24".parse().unwrap()];
        assert_eq!(startup_plan(true, &cidrs), StartupPlan::KeepPrevious);
        assert_eq!(startup_plan(true, &[]), StartupPlan::KeepPrevious);
        assert_eq!(startup_plan(false, &cidrs), StartupPlan::Isolate);
        assert_eq!(startup_plan(false, &[]), StartupPlan::Unprotected);
    }

    #[test]
    fn the_startup_table_isolates_every_address_of_the_pod_subnets() {
        // Startup isolation is the ruleset of an empty snapshot: no pod is known, so every
        // address of the node's subnets goes to the unknown-pod chains.
        let opts = Options {
            pod_cidrs: vec![
                "10.244.1.0/24".parse().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap(),
            ],
            ..Options::default()
        };
        let rs = compile(&Snapshot::default(), "n1", &opts);
        use crate::compile::Decision;
        use crate::model::PolicyType;
        use crate::model::Protocol;
        let d = |src: &str, dst: &str| {
            rs.decide(
                src.parse().unwrap(),
                dst.parse().unwrap(),
                Protocol::Tcp,
                80,
            )
        };
        assert_eq!(
            d("10.244.1.5", "10.244.2.7"),
            Decision::Drop(PolicyType::Egress)
        );
        assert_eq!(
            d("10.244.2.7", "10.244.1.5"),
            Decision::Drop(PolicyType::Ingress)
        );
        assert_eq!(
            d("fd00:10:244:1::9", "fd00:10:244:2::9"),
            Decision::Drop(PolicyType::Egress)
        );
        // Other nodes' subnets are theirs to police.
        assert_eq!(d("10.244.2.7", "10.244.3.9"), Decision::Accept);
    }
}
