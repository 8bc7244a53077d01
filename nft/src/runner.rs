//! The `nft` process runner: a script on stdin, stdout and stderr captured (so a rejected
//! transaction comes back with nft's own message), killed when its timeout expires so that a
//! hung nft cannot hang its caller. Effectors take a [`NftRunner`], which unit tests replace
//! with a [`RecordingNft`].

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::NftError;
use crate::listing::Listing;

/// Something that runs nft: the real process ([`Nft`]) or a test double ([`RecordingNft`]).
/// Every helper goes through [`NftRunner::run`].
pub trait NftRunner: Send + Sync + std::fmt::Debug {
    /// Runs `nft args...` with `stdin`, returning stdout. Non-zero exit is an error that
    /// carries nft's stderr.
    fn run(&self, args: &[&str], stdin: &str) -> Result<String, NftError>;

    /// Applies a script (`nft -f -`) as one transaction: all of it, or none of it.
    fn apply(&self, script: &str) -> Result<(), NftError> {
        self.run(&["-f", "-"], script).map(|_| ())
    }

    /// Dry run (`nft -c -f -`): the kernel validates the transaction, nothing changes.
    fn check(&self, script: &str) -> Result<(), NftError> {
        self.run(&["-c", "-f", "-"], script).map(|_| ())
    }

    /// `nft list tables`, nft's text (one `table FAMILY NAME` line per table).
    fn list_tables(&self) -> Result<String, NftError> {
        self.run(&["list", "tables"], "")
    }

    /// Whether table `FAMILY NAME` exists. Lists it without set elements (`-t`), which stays
    /// cheap at any size.
    fn table_exists(&self, family: &str, table: &str) -> Result<bool, NftError> {
        match self.run(&["-t", "list", "table", family, table], "") {
            Ok(_) => Ok(true),
            Err(e) if e.is_no_such_object() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The typed JSON listing of table `FAMILY NAME` (`nft -j list table`); with
    /// `elements == false` without set elements (`-t`).
    fn list_table(&self, family: &str, table: &str, elements: bool) -> Result<Listing, NftError> {
        let args: &[&str] = if elements {
            &["-j", "list", "table", family, table]
        } else {
            &["-t", "-j", "list", "table", family, table]
        };
        let out = self.run(args, "")?;
        Listing::parse(&out).map_err(|err| NftError::Listing {
            what: format!("table {family} {table}"),
            err,
        })
    }
}

/// Runs the `nft` binary.
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

impl NftRunner for Nft {
    fn run(&self, args: &[&str], stdin: &str) -> Result<String, NftError> {
        let argstr = args.join(" ");
        let mut child = Command::new(&self.bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A group of its own, so that a timeout kills whatever the child started too
            // (a grandchild holding the pipes would otherwise keep the readers waiting).
            .process_group(0)
            .spawn()
            .map_err(|err| NftError::Spawn {
                bin: self.bin.display().to_string(),
                err,
            })?;
        let mut sin = child.stdin.take().expect("piped");
        let mut sout = child.stdout.take().expect("piped");
        let mut serr = child.stderr.take().expect("piped");
        // Scoped threads: the script is written from the caller's buffer, not a copy (a
        // full policy table is several MiB), and a child that stops reading cannot block
        // the deadline check.
        let waited = std::thread::scope(|sc| {
            let writer = sc.spawn(move || {
                let _ = sin.write_all(stdin.as_bytes());
            });
            let out_t = sc.spawn(move || {
                let mut s = String::new();
                let _ = sout.read_to_string(&mut s);
                s
            });
            let err_t = sc.spawn(move || {
                let mut s = String::new();
                let _ = serr.read_to_string(&mut s);
                s
            });
            let deadline = Instant::now() + self.timeout;
            let status = loop {
                match child.try_wait() {
                    Ok(Some(st)) => break Some(st),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    _ => {
                        let _ = nix::sys::signal::killpg(
                            nix::unistd::Pid::from_raw(child.id() as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                        let _ = child.kill();
                        let _ = child.wait();
                        break None;
                    }
                }
            };
            let _ = writer.join();
            let stdout = out_t.join().unwrap_or_default();
            let stderr = err_t.join().unwrap_or_default();
            status.map(|st| (st, stdout, stderr))
        });
        let Some((status, stdout, stderr)) = waited else {
            return Err(NftError::Timeout {
                args: argstr,
                timeout: self.timeout,
            });
        };
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
}

/// One call a [`RecordingNft`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub args: Vec<String>,
    pub stdin: String,
}

/// A test double for [`NftRunner`]: records every call and answers from a queue of replies
/// (an empty stdout once the queue is empty), so a unit test can check what an effector asks
/// nft to do and feed it listings or failures.
#[derive(Debug, Default)]
pub struct RecordingNft {
    calls: Mutex<Vec<Call>>,
    replies: Mutex<VecDeque<Canned>>,
}

/// A queued answer of a [`RecordingNft`].
#[derive(Debug)]
enum Canned {
    Reply(Result<String, NftError>),
    /// nft's exit status 1 with this stderr, for whatever the call's arguments are.
    Fail(String),
}

impl RecordingNft {
    pub fn new() -> RecordingNft {
        RecordingNft::default()
    }

    /// Queues the answer to a later call.
    pub fn reply(&self, reply: Result<String, NftError>) -> &Self {
        self.queue(Canned::Reply(reply))
    }

    /// Queues a failure of a later call as nft reports one: exit status 1, `stderr`.
    pub fn fail(&self, stderr: &str) -> &Self {
        self.queue(Canned::Fail(stderr.to_string()))
    }

    fn queue(&self, canned: Canned) -> &Self {
        self.replies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(canned);
        self
    }

    /// The calls so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The stdin of every `-f -` call (an applied or checked script), in order.
    pub fn scripts(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.args.ends_with(&["-f".to_string(), "-".to_string()]))
            .map(|c| c.stdin)
            .collect()
    }
}

impl NftRunner for RecordingNft {
    fn run(&self, args: &[&str], stdin: &str) -> Result<String, NftError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Call {
                args: args.iter().map(|a| a.to_string()).collect(),
                stdin: stdin.to_string(),
            });
        let canned = self
            .replies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        match canned {
            None => Ok(String::new()),
            Some(Canned::Reply(reply)) => reply,
            Some(Canned::Fail(stderr)) => Err(NftError::Failed {
                args: args.join(" "),
                status: "exit status: 1".to_string(),
                stderr,
            }),
        }
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

    #[test]
    fn a_hung_child_is_killed_at_the_timeout_even_while_holding_its_pipes() {
        // The child's own child keeps stdout open; the runner must still return (at the
        // timeout, with the direct child killed), not wait for the pipe to close.
        let hung = Nft {
            bin: "sh".into(),
            timeout: Duration::from_millis(200),
        };
        let started = Instant::now();
        let e = hung.run(&["-c", "sleep 30 & wait"], "").unwrap_err();
        assert!(matches!(e, NftError::Timeout { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "nft -c sleep 30 & wait timed out after 200ms"
        );
        // Generous: the point is not waiting out the grandchild's 30 s.
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn missing_tables_are_told_apart_from_failures() {
        let fake = RecordingNft::new();
        fake.fail("Error: No such file or directory")
            .reply(Ok("table inet x {}".into()))
            .fail("Error: Operation not permitted");
        assert!(!fake.table_exists("inet", "x").unwrap());
        assert!(fake.table_exists("inet", "x").unwrap());
        assert!(fake.table_exists("inet", "x").is_err());
        assert_eq!(
            fake.calls()[0].args,
            ["-t", "list", "table", "inet", "x"].map(String::from)
        );
    }

    #[test]
    fn the_fake_records_scripts_and_listings_are_typed() {
        let fake = RecordingNft::new();
        fake.apply("add table inet t\n").unwrap();
        fake.check("add table inet u\n").unwrap();
        assert_eq!(fake.scripts(), ["add table inet t\n", "add table inet u\n"]);
        fake.reply(Ok("not json".into()));
        let e = fake.list_table("inet", "t", true).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("reading the listing of table inet t: "),
            "{e}"
        );
    }
}
