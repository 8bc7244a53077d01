//! Lab ownership, state files and removal of labs by prefix.
//!
//! Every lab directory `/tmp/twill-lab-<prefix>/` holds `owner.json`: either the pid (and start
//! time) of the process owning the lab, or the state file of a persisted lab. [`cleanup_stale`]
//! removes labs whose owner is gone.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::{lab_dir, run, Node, Pod, ProcRecord, LAB_ROOT, SWITCH};

const OWNER_FILE: &str = "owner.json";
/// A lab directory without owner file younger than this may be in creation right now.
const CREATION_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OwnerFile {
    name: String,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    start_time: Option<u64>,
    #[serde(default)]
    persisted: Option<PathBuf>,
}

/// What a persisted lab's state file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LabState {
    pub(crate) name: String,
    pub(crate) prefix: String,
    #[serde(default)]
    pub(crate) dir: PathBuf,
    #[serde(default)]
    pub(crate) etcd: bool,
    #[serde(default)]
    pub(crate) nodes: Vec<Node>,
    #[serde(default)]
    pub(crate) pods: Vec<Pod>,
    #[serde(default)]
    pub(crate) procs: Vec<ProcRecord>,
    #[serde(default = "one")]
    pub(crate) next_pod: u32,
}

fn one() -> u32 {
    1
}

/// Path of the state file of a lab persisted under `name`: `/tmp/twill-lab-<name>.json`.
pub fn state_path(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(format!("twill-lab-{name}.json"))
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn write_owner(dir: &Path, owner: &OwnerFile) -> Result<()> {
    write_atomic(&dir.join(OWNER_FILE), &serde_json::to_vec_pretty(owner)?)
}

/// Records the current process as owner of the lab in `dir`.
pub(crate) fn write_owner_self(dir: &Path, name: &str) -> Result<()> {
    let pid = std::process::id();
    write_owner(
        dir,
        &OwnerFile {
            name: name.to_string(),
            pid: Some(pid),
            start_time: run::proc_stat(pid).map(|(_, s)| s),
            persisted: None,
        },
    )
}

pub(crate) fn read_state(name: &str) -> Result<LabState> {
    let path = state_path(name);
    let data = fs::read(&path).with_context(|| format!("no lab {name:?} ({})", path.display()))?;
    serde_json::from_slice(&data).with_context(|| format!("parsing {}", path.display()))
}

/// Writes the state file and marks the lab directory as persisted.
pub(crate) fn write_state(s: &LabState) -> Result<PathBuf> {
    let path = state_path(&s.name);
    if let Ok(old) = read_state(&s.name) {
        if old.prefix != s.prefix && lab_dir(&old.prefix).exists() {
            bail!(
                "a lab named {:?} is already up (prefix {}); take it down first",
                s.name,
                old.prefix
            );
        }
    }
    write_atomic(&path, &serde_json::to_vec_pretty(s)?)?;
    write_owner(
        &lab_dir(&s.prefix),
        &OwnerFile {
            name: s.name.clone(),
            pid: None,
            start_time: None,
            persisted: Some(path.clone()),
        },
    )?;
    Ok(path)
}

/// Who owns a lab directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabOwner {
    /// A process (a test, a benchmark); `alive` is false once it is gone.
    Process {
        /// Pid of the owner.
        pid: u32,
        /// Whether that process (same pid and start time) still runs.
        alive: bool,
    },
    /// Persisted with [`crate::Lab::persist`] to this state file.
    Persisted {
        /// The state file.
        state_file: PathBuf,
        /// Whether the state file still exists and names this lab.
        valid: bool,
    },
    /// No readable owner file.
    Unknown,
}

/// A lab found on this machine by [`list_labs`].
#[derive(Debug, Clone)]
pub struct LabInfo {
    /// The label given to `Lab::new` (empty if unknown).
    pub name: String,
    /// Its namespace prefix.
    pub prefix: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its owner.
    pub owner: LabOwner,
    /// Its namespaces that currently exist.
    pub namespaces: Vec<String>,
}

impl LabInfo {
    /// True if the lab's owner is gone and it can be removed.
    pub fn is_stale(&self) -> bool {
        match &self.owner {
            LabOwner::Process { alive, .. } => !alive,
            LabOwner::Persisted { valid, .. } => !valid,
            LabOwner::Unknown => fs::metadata(&self.dir)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > CREATION_GRACE),
        }
    }
}

/// All labs with a directory under /tmp, whoever owns them.
pub fn list_labs() -> Result<Vec<LabInfo>> {
    let all_ns = run::list_netns()?;
    let mut labs = Vec::new();
    for entry in fs::read_dir(LAB_ROOT)? {
        let Ok(entry) = entry else { continue };
        let fname = entry.file_name().to_string_lossy().into_owned();
        let Some(p) = fname.strip_prefix("twill-lab-tw") else {
            continue;
        };
        if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let prefix = format!("tw{p}-");
        let dir = entry.path();
        let owner_file: Option<OwnerFile> = fs::read(dir.join(OWNER_FILE))
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok());
        let (name, owner) = match owner_file {
            Some(o) => {
                let owner = match (o.pid, &o.persisted) {
                    (_, Some(sf)) => LabOwner::Persisted {
                        state_file: sf.clone(),
                        valid: read_state(&o.name).is_ok_and(|s| s.prefix == prefix),
                    },
                    (Some(pid), None) => LabOwner::Process {
                        pid,
                        alive: match o.start_time {
                            Some(st) => run::pid_alive(pid, st),
                            None => run::proc_stat(pid).is_some(),
                        },
                    },
                    (None, None) => LabOwner::Unknown,
                };
                (o.name, owner)
            }
            None => (String::new(), LabOwner::Unknown),
        };
        let namespaces = all_ns
            .iter()
            .filter(|n| n.starts_with(&prefix))
            .cloned()
            .collect();
        labs.push(LabInfo {
            name,
            prefix,
            dir,
            owner,
            namespaces,
        });
    }
    labs.sort_by(|a, b| a.prefix.cmp(&b.prefix));
    Ok(labs)
}

/// Removes labs whose owner is gone (owning process dead, or persisted lab whose state file no
/// longer names it): their processes, namespaces and directories. Returns the prefixes removed.
/// Safe to call while other labs (in this or other processes) are in use.
pub fn cleanup_stale() -> Result<Vec<String>> {
    // Two processes removing the same crashed lab at once would each meet the other's
    // half-done removal (a namespace already unmounted, a directory half gone) as an error.
    let _lock = cleanup_lock()?;
    let mut removed = Vec::new();
    let mut errs = Vec::new();
    for lab in list_labs()? {
        if !lab.is_stale() {
            continue;
        }
        errs.extend(remove_prefix(&lab.prefix, &lab.dir));
        removed.push(lab.prefix);
    }
    if errs.is_empty() {
        Ok(removed)
    } else {
        bail!("cleanup_stale: {}", errs.join("; "))
    }
}

/// Holds an exclusive lock on `/tmp/twill-lab.lock` until dropped.
fn cleanup_lock() -> Result<Flock<fs::File>> {
    let path = Path::new(LAB_ROOT).join("twill-lab.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("locking {}: {e}", path.display()))
}

/// Kills every process inside namespaces starting with `prefix`, deletes those namespaces (the
/// switch last) and removes `dir`. Returns the errors met (it keeps going).
pub(crate) fn remove_prefix(prefix: &str, dir: &Path) -> Vec<String> {
    let mut errs = Vec::new();
    let mut nss: Vec<String> = match run::list_netns() {
        Ok(v) => v.into_iter().filter(|n| n.starts_with(prefix)).collect(),
        Err(e) => {
            errs.push(format!("{e:#}"));
            Vec::new()
        }
    };
    let switch = format!("{prefix}{SWITCH}");
    nss.sort_by_key(|n| *n == switch);
    for ns in &nss {
        if let Ok(pids) = run::netns_pids(ns) {
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    for ns in &nss {
        if let Err(e) = run::ip(&["netns", "del", ns]) {
            let still_there = run::list_netns().map_or(true, |v| v.contains(ns));
            if still_there {
                errs.push(format!("{e:#}"));
            }
        }
    }
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            errs.push(format!("removing {}: {e}", dir.display()))
        }
        _ => {}
    }
    errs
}
