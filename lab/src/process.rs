//! Processes spawned inside lab namespaces: each in a process group of its own with a log file
//! in the lab directory, signalled by group, and stopped (SIGTERM, then SIGKILL) on teardown.
//! A process's record also survives in the state file, so another process can stop it.

use std::fs::{self, OpenOptions};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::killpg;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::names::valid_name;
use crate::{run, Lab, Signal};

/// Handle of a process started by [`Lab::spawn`]; only meaningful for the lab that returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcId(pub(crate) usize);

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
pub(crate) struct Proc {
    pub(crate) rec: ProcRecord,
    /// `None` for processes of a lab loaded from a state file.
    pub(crate) child: Option<Child>,
    pub(crate) status: Option<ExitStatus>,
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

impl Lab {
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
}

/// Stops processes: SIGTERM to every running group, wait up to `grace`, SIGKILL the rest, reap.
pub(crate) fn stop_procs(procs: &mut [Proc], grace: Duration) -> Vec<String> {
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
