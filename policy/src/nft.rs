//! A small runner for the `nft` binary (stdin in, stdout and stderr captured, with a
//! timeout), and the [`Enforcer`] that applies compiled rulesets and fails closed.
//!
//! Fail-closed design:
//! - The table is never deleted on exit or restart: after a restart the previous run's
//!   table (the last good state) stays enforced until the first sync replaces it.
//! - Every sync replaces the whole table in one transaction; if nft rejects the full
//!   ruleset, the transaction is rolled back by the kernel and the enforcer then installs
//!   the *isolation-only* table compiled from the same snapshot: every local pod that a
//!   policy isolates gets its map entry and a chain that only logs and drops, so new
//!   connections to/from selected pods are refused (established ones keep working through
//!   conntrack). Keeping the previous table instead would leave pods that became selected
//!   since then wide open, so we prefer a too-strict table over a too-open one.
//! - If even the isolation-only table cannot be applied, whatever is loaded stays (the
//!   last good full table, or an earlier isolation-only one), and the error is reported;
//!   the next sync retries.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::compile::{compile, Options, Stats};
use crate::model::Snapshot;

/// Errors from running nft.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run {bin}: {err}")]
    Spawn { bin: String, err: std::io::Error },
    #[error("nft {args} failed ({status}): {stderr}")]
    Failed {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("nft {args} timed out after {timeout:?}")]
    Timeout { args: String, timeout: Duration },
}

/// Runs `nft`.
#[derive(Debug, Clone)]
pub struct Nft {
    pub bin: PathBuf,
    pub timeout: Duration,
}

impl Default for Nft {
    fn default() -> Self {
        Nft {
            bin: PathBuf::from("nft"),
            timeout: Duration::from_secs(30),
        }
    }
}

impl Nft {
    /// Runs `nft args...` with `stdin`, returning stdout. Non-zero exit is an error that
    /// carries nft's stderr.
    pub fn run(&self, args: &[&str], stdin: &str) -> Result<String, NftError> {
        let argstr = args.join(" ");
        let mut child = Command::new(&self.bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| NftError::Spawn {
                bin: self.bin.display().to_string(),
                err,
            })?;
        let mut sin = child.stdin.take().expect("piped");
        let input = stdin.to_string();
        let writer = std::thread::spawn(move || {
            let _ = sin.write_all(input.as_bytes());
        });
        let mut sout = child.stdout.take().expect("piped");
        let mut serr = child.stderr.take().expect("piped");
        let out_t = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = sout.read_to_string(&mut s);
            s
        });
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = serr.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(NftError::Timeout {
                        args: argstr,
                        timeout: self.timeout,
                    });
                }
            }
        };
        let _ = writer.join();
        let stdout = out_t.join().unwrap_or_default();
        let stderr = err_t.join().unwrap_or_default();
        if status.success() {
            Ok(stdout)
        } else {
            Err(NftError::Failed {
                args: argstr,
                status: status.to_string(),
                stderr: stderr.trim().to_string(),
            })
        }
    }

    /// Applies a script (`nft -f -`) as one transaction.
    pub fn apply(&self, script: &str) -> Result<(), NftError> {
        self.run(&["-f", "-"], script).map(|_| ())
    }

    /// Dry run (`nft -c -f -`): the kernel validates the transaction, nothing changes.
    pub fn check(&self, script: &str) -> Result<(), NftError> {
        self.run(&["-c", "-f", "-"], script).map(|_| ())
    }

    /// Applies a JSON batch (`nft -j -f -`).
    pub fn apply_json(&self, json: &str) -> Result<(), NftError> {
        self.run(&["-j", "-f", "-"], json).map(|_| ())
    }

    /// `nft list table inet NAME`, or None if the table does not exist.
    pub fn list_table(&self, table: &str) -> Result<Option<String>, NftError> {
        match self.run(&["list", "table", "inet", table], "") {
            Ok(s) => Ok(Some(s)),
            Err(NftError::Failed { stderr, .. }) if stderr.contains("No such file") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A short fingerprint (FNV-1a, 64 bits, hex) of a rendered ruleset. The enforcer writes
/// it into the table's comment (`twill-policy ruleset <id>`), so anyone can tell cheaply,
/// with `nft list table`, which ruleset the kernel holds (the lab tests wait on it).
pub fn ruleset_id(script: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in script.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The table comment that marks a loaded ruleset.
pub fn ruleset_marker(script: &str) -> String {
    format!("twill-policy ruleset {}", ruleset_id(script))
}

/// `script` (from [`crate::compile::Ruleset::render`]) with the table comment
/// [`ruleset_marker`] added as the table's first statement.
pub fn mark(script: &str, table: &str) -> String {
    let head = format!("table inet {table} {{\n");
    match script.find(&head) {
        Some(i) => {
            let at = i + head.len();
            format!(
                "{}\tcomment {:?}\n{}",
                &script[..at],
                ruleset_marker(script),
                &script[at..]
            )
        }
        None => script.to_string(),
    }
}

/// What a sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The full ruleset is loaded.
    Full,
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
}

/// Applies snapshots for one node.
#[derive(Debug)]
pub struct Enforcer {
    pub nft: Nft,
    pub node: String,
    pub opts: Options,
    /// Script of the last successful full apply.
    last: Option<String>,
}

impl Enforcer {
    pub fn new(nft: Nft, node: &str, opts: Options) -> Enforcer {
        Enforcer {
            nft,
            node: node.to_string(),
            opts,
            last: None,
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
        let opts = Options {
            allow_rules: false,
            ..self.opts.clone()
        };
        mark(&compile(snap, &self.node, &opts).render(), &opts.table)
    }

    /// Makes the kernel enforce `snap`; falls back to the isolation-only table when the
    /// full one is rejected. Forgets the unchanged-check so the next sync reapplies.
    pub fn sync(&mut self, snap: &Snapshot) -> SyncReport {
        let start = Instant::now();
        let rs = compile(snap, &self.node, &self.opts);
        let stats = rs.stats();
        let script = mark(&rs.render(), &self.opts.table);
        let applied = if self.last.as_deref() == Some(script.as_str()) {
            Applied::Unchanged
        } else {
            match self.nft.apply(&script) {
                Ok(()) => {
                    self.last = Some(script);
                    Applied::Full
                }
                Err(e) => {
                    self.last = None;
                    match self.nft.apply(&self.fail_closed_script(snap)) {
                        Ok(()) => Applied::FailClosed {
                            error: e.to_string(),
                        },
                        Err(e2) => Applied::Failed {
                            error: e.to_string(),
                            fail_closed_error: e2.to_string(),
                        },
                    }
                }
            }
        };
        SyncReport {
            applied,
            stats,
            duration: start.elapsed(),
        }
    }

    /// Forces the next sync to reapply even if nothing changed (periodic resync repairs
    /// drift, e.g. someone deleting the table by hand).
    pub fn invalidate(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_captures_stderr_and_times_out() {
        let sh = Nft {
            bin: "sh".into(),
            timeout: Duration::from_secs(5),
        };
        let e = sh
            .run(&["-c", "cat >/dev/null; echo oops >&2; exit 3"], "input")
            .unwrap_err();
        assert!(e.to_string().contains("oops"), "{e}");
        assert_eq!(sh.run(&["-c", "cat"], "hello").unwrap(), "hello");
        let slow = Nft {
            bin: "sleep".into(),
            timeout: Duration::from_millis(100),
        };
        assert!(matches!(
            slow.run(&["5"], ""),
            Err(NftError::Timeout { .. })
        ));
        let missing = Nft {
            bin: "/nonexistent/nft".into(),
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(missing.run(&[], ""), Err(NftError::Spawn { .. })));
    }
}
