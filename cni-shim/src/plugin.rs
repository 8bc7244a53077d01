//! The CNI commands: ADD, DEL, CHECK, STATUS, GC, VERSION.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::antispoof;
use crate::delegate;
use crate::error::{code, CniError};
use crate::netconf::{self, FlannelConf};
use crate::result::host_interfaces;
use crate::validate::{self, LATEST_VERSION, SUPPORTED_VERSIONS};
use twill_formats::gojson;
use twill_formats::subnet_env::{SubnetEnv, SubnetEnvError};

/// The CNI_* environment variables.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub path: Option<String>,
}

impl CniEnv {
    pub fn from_process() -> CniEnv {
        let get = |k: &str| std::env::var(k).ok();
        CniEnv {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            path: get("CNI_PATH"),
        }
    }
}

/// The `cniVersion` to put in an error reply: the config's if we support it, else the latest.
pub fn error_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(String::from))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_string())
}

fn nonempty(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

/// Run one CNI command. `Ok(Some(bytes))` is printed on stdout; errors become the error JSON.
/// A request that passed every check made before anything touches disk or the kernel.
#[derive(Debug)]
pub enum Prepared {
    /// VERSION's answer.
    Version(Vec<u8>),
    Command {
        command: String,
        conf: Box<FlannelConf>,
        container_id: String,
        cni_path: String,
    },
}

/// Validates the environment and stdin (the fuzzed surface: no writes, no delegate runs; the
/// netns check only looks at the path).
pub fn prepare(env: &CniEnv, stdin: &[u8]) -> Result<Prepared, CniError> {
    let Some(command) = nonempty(&env.command) else {
        return Err(CniError::new(
            code::INVALID_ENV,
            "required env variables [CNI_COMMAND] missing",
        ));
    };
    let needs_netns = matches!(command, "ADD" | "CHECK");
    let per_container = matches!(command, "ADD" | "DEL" | "CHECK");
    match command {
        "VERSION" => {
            let requested = serde_json::from_slice::<Value>(stdin)
                .ok()
                .and_then(|v| v.get("cniVersion")?.as_str().map(String::from));
            return Ok(Prepared::Version(
                validate::version_json(requested.as_deref()).into_bytes(),
            ));
        }
        "ADD" | "DEL" | "CHECK" | "STATUS" | "GC" => {}
        other => {
            return Err(
                CniError::new(code::INVALID_ENV, format!("unknown CNI_COMMAND {other:?}"))
                    .with_details("expected ADD, DEL, CHECK, STATUS, GC or VERSION"),
            )
        }
    }

    let mut missing = Vec::new();
    if per_container && nonempty(&env.container_id).is_none() {
        missing.push("CNI_CONTAINERID");
    }
    if needs_netns && nonempty(&env.netns).is_none() {
        missing.push("CNI_NETNS");
    }
    if per_container && nonempty(&env.ifname).is_none() {
        missing.push("CNI_IFNAME");
    }
    if nonempty(&env.path).is_none() {
        missing.push("CNI_PATH");
    }
    if !missing.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("required env variables [{}] missing", missing.join(" ")),
        ));
    }
    let cni_path = nonempty(&env.path).unwrap_or_default();
    let cid = nonempty(&env.container_id).unwrap_or_default();
    if per_container {
        validate::container_id(cid)?;
        validate::ifname(nonempty(&env.ifname).unwrap_or_default())?;
    }
    if needs_netns {
        validate::netns(nonempty(&env.netns).unwrap_or_default())?;
    }

    let conf = FlannelConf::parse(stdin)?;
    validate::check_version(&conf.cni_version, command)?;
    Ok(Prepared::Command {
        command: command.to_string(),
        conf: Box::new(conf),
        container_id: cid.to_string(),
        cni_path: cni_path.to_string(),
    })
}

pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<Vec<u8>>, CniError> {
    let (command, conf, cid, cni_path) = match prepare(env, stdin)? {
        Prepared::Version(v) => return Ok(Some(v)),
        Prepared::Command {
            command,
            conf,
            container_id,
            cni_path,
        } => (command, conf, container_id, cni_path),
    };
    let (cid, cni_path) = (cid.as_str(), cni_path.as_str());
    match command.as_str() {
        "ADD" => cmd_add(&conf, cid, cni_path).map(Some),
        "DEL" => cmd_del(&conf, cid, cni_path).map(|_| None),
        "CHECK" => cmd_check(&conf, cid, cni_path).map(|_| None),
        "STATUS" => cmd_status(&conf, cni_path).map(|_| None),
        _ => cmd_gc(&conf, cni_path).map(|_| None),
    }
}

/// Go's wording for common open(2) errors, as Flannel prints them.
fn go_io_text(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "no such file or directory".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// Read subnet.env with Flannel's error texts: missing file => try again later (11), unusable
/// contents => 100.
pub fn load_subnet_env(path: &Path) -> Result<SubnetEnv, CniError> {
    let wrap = |c: u32, inner: String| {
        CniError::new(
            c,
            format!(
                "failed to load flannel 'subnet.env' file: {inner}. Check the flannel pod log for this node."
            ),
        )
    };
    match SubnetEnv::read(path) {
        Err(SubnetEnvError::Read { source, .. }) => {
            let c = if source.kind() == io::ErrorKind::NotFound {
                code::TRY_AGAIN_LATER
            } else {
                code::IO_FAILURE
            };
            Err(wrap(
                c,
                format!("open {}: {}", path.display(), go_io_text(&source)),
            ))
        }
        Err(e) => Err(wrap(code::SUBNET_ENV_INVALID, e.to_string())),
        Ok(env) => {
            let m = env.missing();
            if m.is_empty() {
                Ok(env)
            } else {
                Err(wrap(
                    code::SUBNET_ENV_INVALID,
                    format!("{} is missing {}", path.display(), m.join(", ")),
                ))
            }
        }
    }
}

fn delegate_type(d: &Map<String, Value>) -> &str {
    d.get("type").and_then(Value::as_str).unwrap_or("bridge")
}

/// A saved delegate config whose flush to disk may still be running.
pub struct SavedConfig {
    pub path: PathBuf,
    flush: std::thread::JoinHandle<Result<(), CniError>>,
}

impl SavedConfig {
    /// Waits until the file and its directory entry are on disk.
    pub fn wait_durable(self) -> Result<PathBuf, CniError> {
        self.flush
            .join()
            .unwrap_or_else(|_| Err(CniError::new(code::IO_FAILURE, "fsync thread panicked")))?;
        Ok(self.path)
    }
}

/// Save the delegate config as `<dataDir>/<containerID>`: directory 0700, file 0600, written to
/// a temp file and renamed, so the file is complete, and visible to a DEL, before the delegate
/// runs: a plugin killed mid-ADD leaves a config that DEL can replay. The fsync of file and
/// directory (about 8 ms on this machine's ext4, a third of the bridge plugin's whole ADD) runs
/// on a thread while the delegate works; the caller waits for it with
/// [`SavedConfig::wait_durable`] before reporting success, so what survives a power loss is
/// the same as with a synchronous fsync.
pub fn save_scratch(data_dir: &Path, cid: &str, bytes: &[u8]) -> Result<SavedConfig, CniError> {
    let path = data_dir.join(cid);
    let err = {
        let path = path.clone();
        move |op: &str, e: io::Error| {
            CniError::new(
                code::IO_FAILURE,
                format!(
                    "failed to save delegate config {}: {op}: {e}",
                    path.display()
                ),
            )
        }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|e| err("create dataDir", e))?;
    let tmp = data_dir.join(format!(".{cid}.{}.tmp", std::process::id()));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| err("create", e))?;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| err("chmod", e))?;
        f.write_all(bytes).map_err(|e| err("write", e))?;
        fs::rename(&tmp, &path).map_err(|e| err("rename", e))
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let (file, dir) = (path.clone(), data_dir.to_path_buf());
    let flush = std::thread::spawn(move || {
        File::open(&file)
            .and_then(|f| f.sync_all())
            .map_err(|e| err("fsync", e))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err("fsync dataDir", e))
    });
    Ok(SavedConfig { path, flush })
}

fn cmd_add(conf: &FlannelConf, cid: &str, cni_path: &str) -> Result<Vec<u8>, CniError> {
    conf.validate_delegate()?;
    let env = load_subnet_env(&conf.subnet_file)?;
    let d = conf.delegate_config(&env)?;
    let bytes = gojson::to_string(&Value::Object(d.clone()));
    let plugin = delegate::find_in_path(delegate_type(&d), cni_path)?;
    let saved = save_scratch(&conf.data_dir, cid, bytes.as_bytes())?;
    let delegated = delegate::run(&plugin, "ADD", bytes.as_bytes(), "failed to delegate add");
    let durable = saved.wait_durable();
    match delegated {
        // The delegate succeeded: even if its result is unreadable, keep the saved config so
        // the runtime's DEL can undo the attachment.
        Ok(out) => {
            durable?;
            let bridge = d.get("bridge").and_then(Value::as_str).unwrap_or("cni0");
            refuse_router_advertisements(&out, bridge)?;
            guard_pod_port(&out, bridge)?;
            netconf::convert_result(&out, &conf.cni_version)
        }
        Err(e) => {
            let saved = durable.unwrap_or_else(|_| conf.data_dir.join(cid));
            if let Err(re) = fs::remove_file(&saved) {
                crate::log::warn(&format!("failed to remove {}: {re}", saved.display()));
            }
            Err(e)
        }
    }
}

/// CVE-2020-10749: a pod's router advertisements must never configure the host. Of the
/// host-side interfaces in the delegate's result (entries without a `sandbox`), the bridge and
/// its ports (the pods' veths: `/sys/class/net/<if>/master` is the bridge) get `accept_ra=0`
/// in this (the node's) namespace; nothing else is touched, whatever a delegate reports. A
/// host without IPv6 has nothing to protect. Any other failure fails the ADD; the runtime's DEL
/// then removes the attachment, so no pod runs on a host that would listen to it.
pub fn refuse_router_advertisements(result: &[u8], bridge: &str) -> Result<(), CniError> {
    let Ok(v) = serde_json::from_slice::<Value>(result) else {
        return Ok(());
    };
    for name in host_interfaces(&v)
        .iter()
        .filter(|n| *n == bridge || is_bridge_port(n, bridge))
    {
        let path = format!("/proc/sys/net/ipv6/conf/{name}/accept_ra");
        match fs::write(&path, b"0") {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(CniError::new(
                    code::IO_FAILURE,
                    format!("failed to set {path} to 0: {}", go_io_text(&e)),
                ))
            }
        }
    }
    Ok(())
}

/// Whether `name` is a port of `bridge` in this namespace.
pub fn is_bridge_port(name: &str, bridge: &str) -> bool {
    fs::read_link(format!("/sys/class/net/{name}/master"))
        .is_ok_and(|m| m.file_name().is_some_and(|f| f == bridge))
}

/// Per-pod anti-spoofing after ADD (see [`crate::antispoof`]), for a veth on the bridge only.
fn guard_pod_port(result: &[u8], bridge: &str) -> Result<(), CniError> {
    let Ok(v) = serde_json::from_slice::<Value>(result) else {
        return Ok(());
    };
    match antispoof::pod_port(&v, bridge) {
        Some(p) if is_bridge_port(&p.veth, bridge) => antispoof::add(&p),
        _ => Ok(()),
    }
}

/// Best effort after DEL: the pod's anti-spoofing elements, when the runtime passed
/// `prevResult` and this node has the pod bridge (never elsewhere, e.g. a test's root namespace).
fn forget_pod_port(conf: &FlannelConf, saved: &[u8]) {
    let bridge = serde_json::from_slice::<Value>(saved)
        .ok()
        .and_then(|d| d.get("bridge")?.as_str().map(String::from))
        .unwrap_or_else(|| "cni0".into());
    let Some(port) = conf
        .raw
        .get("prevResult")
        .and_then(|r| antispoof::pod_port(r, &bridge))
    else {
        return;
    };
    if !Path::new(&format!("/sys/class/net/{bridge}")).exists() {
        return;
    }
    if let Err(e) = antispoof::remove(&port) {
        crate::log::warn(&e.msg);
    }
}

/// Whether `name` is a scratch temp file (`.<id>.<pid>.tmp`) whose writer is gone.
fn dead_writer_temp(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else {
        return false;
    };
    match rest.rsplit_once('.').map(|(_, pid)| pid.parse::<u32>()) {
        Some(Ok(pid)) => !Path::new(&format!("/proc/{pid}")).exists(),
        _ => false,
    }
}

/// DEL of a stale attachment from its saved delegate config, outside any netns (the pod is
/// gone): the delegate releases its IPAM reservation. Flannel's scratch files do not record the
/// interface name; Kubernetes always uses `eth0`. An unreadable config is left for an operator.
fn gc_delete(path: &Path, cid: &str, cni_path: &str) -> Result<(), CniError> {
    let bytes = fs::read(path).map_err(|e| CniError::new(code::IO_FAILURE, e.to_string()))?;
    let typ = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("type")?.as_str().map(String::from))
        .ok_or_else(|| CniError::new(code::DECODE_FAILURE, "saved netconf has no type"))?;
    let plugin = delegate::find_in_path(&typ, cni_path)?;
    delegate::run_env(
        &plugin,
        "DEL",
        &bytes,
        "gc: failed to delegate del",
        &[
            ("CNI_CONTAINERID", cid),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
            ("CNI_PATH", cni_path),
        ],
    )
    .map(|_| ())
}

fn read_saved(conf: &FlannelConf, cid: &str) -> (PathBuf, io::Result<Vec<u8>>) {
    let path = conf.data_dir.join(cid);
    let r = fs::read(&path);
    (path, r)
}

fn cmd_del(conf: &FlannelConf, cid: &str, cni_path: &str) -> Result<(), CniError> {
    let (path, res) = read_saved(conf, cid);
    let bytes = match res {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(CniError::new(
                code::IO_FAILURE,
                format!("failed to read {}: {e}", path.display()),
            ))
        }
        Ok(b) => b,
    };
    let typ = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("type")?.as_str().map(String::from));
    let Some(typ) = typ else {
        // As Flannel: the interface stays until reboot, but DEL must not fail forever.
        crate::log::warn(&format!(
            "failed to parse saved netconf {}; leaving it in place",
            path.display()
        ));
        return Ok(());
    };
    let plugin = delegate::find_in_path(&typ, cni_path)?;
    delegate::run(&plugin, "DEL", &bytes, "failed to delegate del")?;
    forget_pod_port(conf, &bytes);
    if let Err(e) = fs::remove_file(&path) {
        crate::log::warn(&format!("failed to remove {}: {e}", path.display()));
    }
    Ok(())
}

fn cmd_check(conf: &FlannelConf, cid: &str, cni_path: &str) -> Result<(), CniError> {
    let (path, res) = read_saved(conf, cid);
    let bytes = res.map_err(|e| {
        let c = if e.kind() == io::ErrorKind::NotFound {
            code::UNKNOWN_CONTAINER
        } else {
            code::IO_FAILURE
        };
        CniError::new(
            c,
            format!(
                "unknown container {cid:?}: cannot read saved delegate config {}: {}",
                path.display(),
                go_io_text(&e)
            ),
        )
    })?;
    let mut saved: Map<String, Value> = serde_json::from_slice(&bytes).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            format!("saved delegate config {} is corrupt: {e}", path.display()),
        )
    })?;
    if let Some(prev) = conf.raw.get("prevResult") {
        let mut prev = prev.clone();
        netconf::fill_route_gateways(&mut prev);
        saved.insert("prevResult".into(), prev);
    }
    let typ = saved
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let plugin = delegate::find_in_path(&typ, cni_path)?;
    let input = gojson::to_string(&Value::Object(saved));
    delegate::run(
        &plugin,
        "CHECK",
        input.as_bytes(),
        "failed to delegate check",
    )?;
    Ok(())
}

fn delegate_supports(plugin: &Path, version: &str) -> bool {
    delegate::supported_versions(plugin, version)
        .iter()
        .any(|v| v == version)
}

fn cmd_status(conf: &FlannelConf, cni_path: &str) -> Result<(), CniError> {
    let not_ready = |e: CniError| {
        CniError::new(
            code::PLUGIN_NOT_AVAILABLE,
            format!("network not ready: {}", e.msg),
        )
        .with_details(e.details)
    };
    let env = load_subnet_env(&conf.subnet_file).map_err(not_ready)?;
    let d = conf.delegate_config(&env)?;
    let plugin = delegate::find_in_path(delegate_type(&d), cni_path).map_err(not_ready)?;
    if delegate_supports(&plugin, &conf.cni_version) {
        let input = gojson::to_string(&Value::Object(d));
        delegate::run(&plugin, "STATUS", input.as_bytes(), "delegate STATUS")?;
    }
    Ok(())
}

fn cmd_gc(conf: &FlannelConf, cni_path: &str) -> Result<(), CniError> {
    let valid = netconf::valid_attachment_ids(&conf.raw).ok_or_else(|| {
        CniError::new(
            code::INVALID_NETWORK_CONFIG,
            format!(
                "GC needs a list of {{containerID, ifname}} in {:?}",
                netconf::VALID_ATTACHMENTS
            ),
        )
        .with_details(format!(
            "got {:?}",
            conf.raw.get(netconf::VALID_ATTACHMENTS)
        ))
    })?;
    let mut errors = Vec::new();
    let entries: Vec<String> = match fs::read_dir(&conf.data_dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            errors.push(format!("read {}: {e}", conf.data_dir.display()));
            Vec::new()
        }
    };
    for name in netconf::gc_stale(&entries, &valid) {
        // A stale attachment (an ADD or DEL killed half-way, a DEL that never came) is
        // deleted through its saved delegate config, which releases its address even with
        // delegates too old to implement GC; the scratch file goes only once that worked.
        let p = conf.data_dir.join(name);
        if let Err(e) = gc_delete(&p, name, cni_path) {
            errors.push(format!("{}: {}", p.display(), e.msg));
            continue;
        }
        if let Err(e) = fs::remove_file(&p) {
            errors.push(format!("remove {}: {e}", p.display()));
        }
    }

    // Temp files of a scratch save whose writer died before its rename (an ADD killed
    // half-way): `.<containerID>.<pid>.tmp` with no such process left.
    for name in entries.iter().filter(|n| dead_writer_temp(n)) {
        let p = conf.data_dir.join(name);
        if let Err(e) = fs::remove_file(&p) {
            errors.push(format!("remove {}: {e}", p.display()));
        }
    }

    // Anti-spoofing elements of pods whose veth is gone, on a node that has the pod bridge.
    let bridge = conf
        .raw
        .get("delegate")
        .and_then(|d| d.get("bridge")?.as_str())
        .unwrap_or("cni0");
    if crate::validate::ifname(bridge).is_ok()
        && Path::new(&format!("/sys/class/net/{bridge}")).exists()
    {
        if let Err(e) = antispoof::prune() {
            errors.push(e.msg);
        }
    }

    let mut delegate_err = None;
    match load_subnet_env(&conf.subnet_file) {
        Err(e) => crate::log::warn(&format!("GC not forwarded to the delegate: {}", e.msg)),
        Ok(env) => {
            let mut d = conf.delegate_config(&env)?;
            if let Some(v) = conf.raw.get(netconf::VALID_ATTACHMENTS) {
                d.insert(netconf::VALID_ATTACHMENTS.into(), v.clone());
            }
            match delegate::find_in_path(delegate_type(&d), cni_path) {
                Err(e) => delegate_err = Some(e),
                Ok(plugin) => {
                    if delegate_supports(&plugin, &conf.cni_version) {
                        let input = gojson::to_string(&Value::Object(d));
                        if let Err(e) =
                            delegate::run(&plugin, "GC", input.as_bytes(), "delegate GC")
                        {
                            delegate_err = Some(e);
                        }
                    }
                }
            }
        }
    }
    if !errors.is_empty() {
        let mut msg = format!("GC failed: {}", errors.join("; "));
        if let Some(d) = delegate_err {
            msg.push_str(&format!("; {d}"));
        }
        return Err(CniError::new(code::IO_FAILURE, msg));
    }
    delegate_err.map_or(Ok(()), Err)
}

#[cfg(test)]
mod ra_tests {
    use super::*;

    #[test]
    fn only_temp_files_of_dead_writers_are_stale() {
        let me = std::process::id();
        assert!(!dead_writer_temp(&format!(".pod-a.{me}.tmp")));
        assert!(dead_writer_temp(".pod-a.4294967295.tmp"));
        assert!(!dead_writer_temp("pod-a"));
        assert!(!dead_writer_temp(".pod-a.tmp"));
    }
}
