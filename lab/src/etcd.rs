//! etcd: one real etcd in the switch namespace, reachable from every node at
//! [`ETCD_ENDPOINT`], and `etcdctl` run beside it.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::lifecycle::tail;
use crate::{run, Lab, ProcId, ETCD_ENDPOINT, SWITCH_ADDR};

impl Lab {
    /// Starts a real etcd (`/usr/bin/etcd`) in the switch namespace: clients on 198.18.0.1:2379
    /// and 127.0.0.1:2379, peer on 127.0.0.1:2380, data in `<lab dir>/etcd`, log in
    /// `<lab dir>/etcd.log`. Waits until `etcdctl endpoint health` (run in the switch) succeeds and
    /// returns the endpoint for nodes, [`ETCD_ENDPOINT`].
    pub fn start_etcd(&mut self) -> Result<String> {
        if let Some(id) = self.etcd {
            if self.is_running(id) {
                bail!("etcd is already running in lab {}", self.prefix);
            }
        }
        let data = self.dir.join("etcd");
        let data_s = data.to_string_lossy().into_owned();
        let client = format!("http://{SWITCH_ADDR}:2379,http://127.0.0.1:2379");
        let sw = self.switch_ns();
        let id = self.spawn(
            &sw,
            "etcd",
            &[
                "etcd",
                "--name",
                "sw",
                "--data-dir",
                &data_s,
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                ETCD_ENDPOINT,
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "sw=http://127.0.0.1:2380",
                "--initial-cluster-state",
                "new",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ],
            &[],
        )?;
        self.etcd = Some(id);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if !self.is_running(id) {
                bail!(
                    "etcd exited during start-up; log:\n{}",
                    tail(&self.log(id), 30)
                );
            }
            if self.etcdctl(&["endpoint", "health"]).is_ok() {
                return Ok(ETCD_ENDPOINT.to_string());
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd not healthy after 30s; log:\n{}",
                    tail(&self.log(id), 30)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The running etcd's process, if [`Lab::start_etcd`] was called (e.g. to SIGKILL it).
    pub fn etcd_proc(&self) -> Option<ProcId> {
        self.etcd
    }

    /// Stops etcd (SIGTERM, SIGKILL after 5 s), keeping its data directory.
    pub fn stop_etcd(&mut self) -> Result<()> {
        match self.etcd {
            Some(id) => self.stop(id, Duration::from_secs(5)),
            None => bail!("etcd was never started in lab {}", self.prefix),
        }
    }

    /// Stops etcd if it runs and starts it again on the same data directory.
    pub fn restart_etcd(&mut self) -> Result<String> {
        if let Some(id) = self.etcd {
            if self.is_running(id) {
                self.stop(id, Duration::from_secs(5))?;
            }
        }
        self.start_etcd()
    }

    /// Runs `ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:2379 ARGS` inside the switch namespace
    /// (dial timeout 2 s, command timeout 5 s) and returns stdout; the error includes stderr.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let mut argv = vec![
            "etcdctl",
            "--endpoints=127.0.0.1:2379",
            "--dial-timeout=2s",
            "--command-timeout=5s",
        ];
        argv.extend_from_slice(args);
        let ns = self.switch_ns();
        let what = format!("[{ns}] {}", argv.join(" "));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns])
            .args(&argv)
            .env("ETCDCTL_API", "3");
        let out = run::check(
            &what,
            run::run(cmd, &what, None, Some(Duration::from_secs(20)))?,
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
