//! The lab's lifecycle: creating a [`Lab`] (prefix, directory, switch), looking up what it holds,
//! persisting it to a state file and loading it back, and tearing everything down, explicitly
//! or on drop (also while a test panics).

use std::collections::HashSet;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::names::{gen_prefix, valid_name};
use crate::process::{stop_procs, Proc};
use crate::{
    cleanup_stale, lab_dir, list_netns, run, state, state_path, Lab, Node, Pod, ProcId, SWITCH,
    SWITCH_ADDR, SWITCH_BRIDGE, UNDERLAY_PREFIX_LEN,
};

impl Lab {
    /// Creates a lab: a unique prefix (`tw…-`), its directory `/tmp/twill-lab-<prefix>/`, and the
    /// switch namespace `<prefix>sw` with `lo` up and bridge `br0` (198.18.0.1/24) up.
    /// `name` labels the lab (state file name, listings); it need not be unique among test labs.
    ///
    /// The first call in a process also removes stale labs left by dead processes
    /// ([`cleanup_stale`]), best effort.
    pub fn new(name: &str) -> Result<Lab> {
        valid_name("lab", name)?;
        static CLEANUP: std::sync::Once = std::sync::Once::new();
        CLEANUP.call_once(|| {
            if let Err(e) = cleanup_stale() {
                let _ = writeln!(std::io::stderr(), "twill-lab: {e:#}");
            }
        });
        let existing: HashSet<String> = list_netns()?.into_iter().collect();
        let mut attempt = 0;
        let (prefix, dir) = loop {
            attempt += 1;
            let prefix = gen_prefix();
            let dir = lab_dir(&prefix);
            if existing.iter().any(|n| n.starts_with(&prefix)) {
                continue;
            }
            match fs::create_dir(&dir) {
                Ok(()) => break (prefix, dir),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 50 => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
            }
        };
        let lab = Lab {
            name: name.to_string(),
            prefix,
            dir,
            nodes: Vec::new(),
            pods: Vec::new(),
            procs: Vec::new(),
            etcd: None,
            next_node: 1,
            next_pod: 1,
            detached: false,
            done: false,
        };
        // From here on, an early return drops `lab`, which removes whatever was made.
        state::write_owner_self(&lab.dir, name)?;
        let sw = lab.ns(SWITCH);
        run::ip(&["netns", "add", &sw])?;
        run::ip_batch(
            &sw,
            &[
                "link set lo up".into(),
                format!("link add {SWITCH_BRIDGE} type bridge"),
                format!("addr add {SWITCH_ADDR}/{UNDERLAY_PREFIX_LEN} dev {SWITCH_BRIDGE}"),
                format!("link set {SWITCH_BRIDGE} up"),
            ],
        )?;
        Ok(lab)
    }

    /// The lab's label given to [`Lab::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The unique prefix of every namespace of this lab (e.g. `tw01a2b03x-`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lab directory (`/tmp/twill-lab-<prefix>/`): logs, etcd data, per-node directories.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Full namespace name for a short name (`sw`, a node or a pod): `<prefix><short>`.
    /// A name that already carries the prefix is returned unchanged.
    pub fn ns(&self, short: &str) -> String {
        if short.starts_with(&self.prefix) {
            short.to_string()
        } else {
            format!("{}{}", self.prefix, short)
        }
    }

    /// Full name of the switch namespace (`<prefix>sw`).
    pub fn switch_ns(&self) -> String {
        self.ns(SWITCH)
    }

    /// All nodes, in order of creation.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// All pods, in order of creation.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The node named `name`. Panics if there is none (use [`Lab::try_node`] otherwise).
    pub fn node(&self, name: &str) -> &Node {
        self.try_node(name)
            .unwrap_or_else(|| panic!("lab {} has no node {name:?}", self.prefix))
    }

    /// The node named `name`, if any.
    pub fn try_node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The pod named `name`. Panics if there is none (use [`Lab::try_pod`] otherwise).
    pub fn pod(&self, name: &str) -> &Pod {
        self.try_pod(name)
            .unwrap_or_else(|| panic!("lab {} has no pod {name:?}", self.prefix))
    }

    /// The pod named `name`, if any.
    pub fn try_pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    pub(crate) fn node_checked(&self, name: &str) -> Result<Node> {
        self.try_node(name)
            .cloned()
            .ok_or_else(|| anyhow!("lab {} has no node {name:?}", self.prefix))
    }

    pub(crate) fn check_new_ns_name(&self, what: &str, name: &str) -> Result<()> {
        valid_name(what, name)?;
        if name == SWITCH || self.try_node(name).is_some() || self.try_pod(name).is_some() {
            bail!("lab {}: name {name:?} is already taken", self.prefix);
        }
        Ok(())
    }

    /// Resolves a short or full name to one of this lab's namespaces, refusing anything else
    /// (in particular the root namespace).
    pub(crate) fn own_ns(&self, netns: &str) -> Result<String> {
        let full = self.ns(netns);
        let short = &full[self.prefix.len()..];
        if short == SWITCH || self.try_node(short).is_some() || self.try_pod(short).is_some() {
            Ok(full)
        } else {
            bail!("{netns:?} is not a namespace of lab {}", self.prefix)
        }
    }

    /// Removes everything: stops spawned processes (SIGTERM, SIGKILL after 3 s), kills whatever
    /// else runs in the lab's namespaces, deletes every namespace with the lab's prefix, removes
    /// the lab directory and, for a persisted lab, its state file. Keeps going after errors and
    /// reports all of them.
    pub fn teardown(mut self) -> Result<()> {
        let errs = self.teardown_inner();
        if errs.is_empty() {
            Ok(())
        } else {
            bail!("teardown of lab {}: {}", self.prefix, errs.join("; "))
        }
    }

    fn teardown_inner(&mut self) -> Vec<String> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let mut errs = stop_procs(&mut self.procs, Duration::from_secs(3));
        errs.extend(state::remove_prefix(&self.prefix, &self.dir));
        if self.detached {
            let sp = state_path(&self.name);
            if let Ok(s) = state::read_state(&self.name) {
                if s.prefix == self.prefix {
                    if let Err(e) = fs::remove_file(&sp) {
                        errs.push(format!("removing {}: {e}", sp.display()));
                    }
                }
            }
        }
        errs
    }

    /// Detaches the lab and writes its state to `/tmp/twill-lab-<name>.json` so another process
    /// can [`Lab::load`] it (`twill-lab exec`/`down`). Everything is left running. Fails if a
    /// different lab already uses that state file.
    pub fn persist(mut self) -> Result<PathBuf> {
        let path = state::write_state(&self.state())?;
        self.detached = true;
        Ok(path)
    }

    /// Loads a lab persisted under `name`. The result is detached: dropping it leaves the lab up;
    /// [`Lab::teardown`] removes it (and its state file); [`Lab::persist`] saves changes such as
    /// newly spawned processes.
    pub fn load(name: &str) -> Result<Lab> {
        let s = state::read_state(name)?;
        Ok(Lab {
            name: s.name,
            dir: lab_dir(&s.prefix),
            prefix: s.prefix,
            next_node: s.nodes.iter().map(|n| n.idx).max().unwrap_or(0) + 1,
            next_pod: s.next_pod,
            nodes: s.nodes,
            pods: s.pods,
            etcd: s
                .procs
                .iter()
                .rposition(|p| p.name == "etcd" && s.etcd)
                .map(ProcId),
            procs: s
                .procs
                .into_iter()
                .map(|rec| Proc {
                    rec,
                    child: None,
                    status: None,
                })
                .collect(),
            detached: true,
            done: false,
        })
    }

    fn state(&self) -> state::LabState {
        state::LabState {
            name: self.name.clone(),
            prefix: self.prefix.clone(),
            dir: self.dir.clone(),
            etcd: self.etcd.is_some(),
            nodes: self.nodes.clone(),
            pods: self.pods.clone(),
            procs: self.procs.iter().map(|p| p.rec.clone()).collect(),
            next_pod: self.next_pod,
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.detached || self.done {
            return;
        }
        if thread::panicking() {
            // The logs are about to be deleted: show their ends to whoever debugs the failure.
            for p in &self.procs {
                if let Ok(b) = fs::read(&p.rec.log) {
                    let s = String::from_utf8_lossy(&b);
                    let _ = writeln!(
                        std::io::stderr(),
                        "--- twill-lab {}: last lines of {} ({}) ---\n{}",
                        self.prefix,
                        p.rec.name,
                        p.rec.log.display(),
                        tail(&s, 20)
                    );
                }
            }
        }
        let errs = self.teardown_inner();
        if !errs.is_empty() {
            let _ = writeln!(
                std::io::stderr(),
                "twill-lab: teardown of {} reported: {}",
                self.prefix,
                errs.join("; ")
            );
        }
    }
}

pub(crate) fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
