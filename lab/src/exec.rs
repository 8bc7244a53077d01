//! Commands inside a lab namespace: one-shot programs (`exec`, `exec_ok`) and pings. Every
//! client runs inside a lab namespace, never in the root namespace.

use std::net::IpAddr;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use crate::{run, Lab};

impl Lab {
    /// Runs `argv` inside one of the lab's namespaces (short or full name) and returns its output,
    /// whatever its exit status. Errors only if it cannot be started.
    pub fn exec(&self, netns: &str, argv: &[&str]) -> Result<Output> {
        self.exec_env(netns, argv, &[])
    }

    /// Like [`Lab::exec`] with extra environment variables.
    pub fn exec_env(&self, netns: &str, argv: &[&str], env: &[(&str, &str)]) -> Result<Output> {
        let ns = self.own_ns(netns)?;
        let (prog, args) = argv
            .split_first()
            .ok_or_else(|| anyhow!("exec: empty argv"))?;
        let what = format!("[{ns}] {}", run::render(prog, args));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns]).args(argv);
        cmd.envs(env.iter().copied());
        run::run(cmd, &what, None, None)
    }

    /// Runs `argv` inside a lab namespace; returns stdout on success, else an error with the
    /// command, its exit status, stderr and stdout.
    pub fn exec_ok(&self, netns: &str, argv: &[&str]) -> Result<String> {
        ns_exec_ok(&self.own_ns(netns)?, argv)
    }

    /// Pings `to` from a lab namespace: `count` echo requests, 0.2 s apart, giving up after
    /// `timeout`. True if the replies came (ping's exit status 0).
    pub fn ping(&self, from_netns: &str, to: IpAddr, count: u32, timeout: Duration) -> bool {
        let count = count.max(1).to_string();
        let deadline = timeout.as_secs().max(1).to_string();
        let to = to.to_string();
        self.exec(
            from_netns,
            &[
                "ping", "-n", "-q", "-c", &count, "-i", "0.2", "-W", "1", "-w", &deadline, &to,
            ],
        )
        .map(|o| o.status.success())
        .unwrap_or(false)
    }

    /// Retries [`Lab::ping`] (one echo each) until it succeeds or `timeout` passes.
    pub fn wait_ping(&self, from_netns: &str, to: IpAddr, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ping(from_netns, to, 1, Duration::from_secs(1)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }
}

/// Runs `argv` in namespace `ns`; stdout on success, else an error with status and stderr.
pub(crate) fn ns_exec_ok(ns: &str, argv: &[&str]) -> Result<String> {
    let what = format!("[{ns}] {}", argv.join(" "));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(argv);
    let out = run::check(&what, run::run(cmd, &what, None, None)?)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
