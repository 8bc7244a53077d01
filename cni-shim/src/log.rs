//! The plugin's own log file. A CNI plugin's stdout carries its result and its stderr belongs
//! to the container runtime, so twill's plugin logs to a file named in its network config:
//!
//! ```json
//! {"type": "flannel", "logFile": "/var/log/twill-cni.log", "logFormat": "json", "logLevel": "info", ...}
//! ```
//!
//! Flannel's plugin ignores keys it does not know, so a conflist with these keys still works
//! under Flannel's plugin. Without `logFile` nothing is logged. Logging is best effort: a file
//! that cannot be opened or written never fails a command or changes its result or stdout.
//!
//! Every command (ADD, DEL, CHECK, GC, STATUS) writes one line: the command, `container_id`,
//! `netns`, `ifname`, `pod` ("namespace/name" from `CNI_ARGS`), the result's `addresses`,
//! `duration_ms` and, when it failed, `error` and `code`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use tracing::level_filters::LevelFilter;
use twill_logging::{EnvFilter, LogFormat};

use crate::error::CniError;
use crate::plugin::CniEnv;

/// The logging keys of the plugin's network config.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub file: PathBuf,
    pub format: LogFormat,
    pub level: LevelFilter,
    /// Values that were not understood and what was used instead; written to the log as its
    /// first lines, since failing the command over its log settings would be worse.
    pub problems: Vec<String>,
}

/// `logFile` is present but is no non-empty string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("logFile must be a non-empty string, got {0}; not logging")]
pub struct BadLogFile(pub String);

impl LogConfig {
    /// The logging keys of the network config on stdin: `Ok(None)` when there is no
    /// `logFile` (or stdin is no JSON object; the command itself reports that).
    pub fn from_netconf(stdin: &[u8]) -> Result<Option<LogConfig>, BadLogFile> {
        let Ok(Value::Object(conf)) = serde_json::from_slice::<Value>(stdin) else {
            return Ok(None);
        };
        let file = match conf.get("logFile") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) if !s.is_empty() => PathBuf::from(s),
            Some(other) => return Err(BadLogFile(other.to_string())),
        };
        let mut problems = Vec::new();
        let format = match conf.get("logFormat") {
            None | Some(Value::Null) => LogFormat::Text,
            Some(Value::String(s)) => s.parse().unwrap_or_else(|e| {
                problems.push(format!("logFormat: {e}; writing text"));
                LogFormat::Text
            }),
            Some(other) => {
                problems.push(format!(
                    "logFormat must be \"text\" or \"json\", got {other}; writing text"
                ));
                LogFormat::Text
            }
        };
        let level = match conf.get("logLevel") {
            None | Some(Value::Null) => LevelFilter::INFO,
            Some(Value::String(s)) => LevelFilter::from_str(s).unwrap_or_else(|_| {
                problems.push(format!(
                    "logLevel {s:?} is no level (error, warn, info, debug, trace or off); using info"
                ));
                LevelFilter::INFO
            }),
            Some(other) => {
                problems.push(format!(
                    "logLevel must be a string (error, warn, info, debug, trace or off), got {other}; using info"
                ));
                LevelFilter::INFO
            }
        };
        Ok(Some(LogConfig {
            file,
            format,
            level,
            problems,
        }))
    }
}

/// Opens the log for appending, creating it readable by root only (0600): pod names and
/// addresses are not for every local user.
pub fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// Starts logging as the network config on stdin asks. Returns whether a log is being
/// written; every problem goes to stderr (which the runtime may show) and never fails the
/// command.
pub fn start(stdin: &[u8]) -> bool {
    let config = match LogConfig::from_netconf(stdin) {
        Ok(Some(c)) => c,
        Ok(None) => return false,
        Err(e) => {
            eprintln!("twill-cni: {e}");
            return false;
        }
    };
    let file = match open(&config.file) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "twill-cni: logFile {:?} cannot be opened: {e}; not logging",
                config.file.display().to_string()
            );
            return false;
        }
    };
    let filter = EnvFilter::default().add_directive(config.level.into());
    if let Err(e) = twill_logging::init_writer(config.format, filter, Mutex::new(file)) {
        eprintln!("twill-cni: {e}; not logging");
        return false;
    }
    for problem in &config.problems {
        tracing::warn!("{problem}");
    }
    true
}

/// "namespace/name" from `CNI_ARGS` (`K8S_POD_NAMESPACE=...;K8S_POD_NAME=...`), when both are
/// there.
pub fn pod_from_cni_args(cni_args: &str) -> Option<String> {
    let (mut namespace, mut name) = (None, None);
    for pair in cni_args.split(';') {
        match pair.split_once('=') {
            Some(("K8S_POD_NAMESPACE", v)) if !v.is_empty() => namespace = Some(v),
            Some(("K8S_POD_NAME", v)) if !v.is_empty() => name = Some(v),
            _ => {}
        }
    }
    Some(format!("{}/{}", namespace?, name?))
}

/// The addresses (CIDR text) of a CNI result: `ips[].address` (CNI 0.3.0 and later) or
/// `ip4.ip` / `ip6.ip` (0.1.0, 0.2.0).
pub fn result_addresses(result: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(result) else {
        return Vec::new();
    };
    let text = |v: &Value| v.as_str().map(String::from);
    if let Some(ips) = v.get("ips").and_then(Value::as_array) {
        return ips
            .iter()
            .filter_map(|ip| text(ip.get("address")?))
            .collect();
    }
    ["ip4", "ip6"]
        .iter()
        .filter_map(|k| text(v.get(k)?.get("ip")?))
        .collect()
}

/// Writes the command's one line (a no-op when [`start`] installed no log). VERSION, which
/// carries no network config, is not logged.
pub fn command(
    env: &CniEnv,
    cni_args: Option<&str>,
    outcome: &Result<Option<Vec<u8>>, CniError>,
    elapsed: Duration,
) {
    let Some(command) = env.command.as_deref().filter(|c| *c != "VERSION") else {
        return;
    };
    let pod = cni_args.and_then(pod_from_cni_args);
    let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
    let (container_id, netns, ifname) = (
        nonempty(&env.container_id),
        nonempty(&env.netns),
        nonempty(&env.ifname),
    );
    // Milliseconds with microsecond precision.
    let duration_ms = (elapsed.as_micros() as f64) / 1000.0;
    match outcome {
        Ok(result) => {
            let addresses = result
                .as_deref()
                .map(result_addresses)
                .unwrap_or_default()
                .join(",");
            tracing::info!(
                command,
                container_id,
                netns,
                ifname,
                pod,
                addresses = (!addresses.is_empty()).then_some(addresses),
                duration_ms,
                "CNI {command} done"
            );
        }
        Err(e) => tracing::error!(
            command,
            container_id,
            netns,
            ifname,
            pod,
            duration_ms,
            code = e.code,
            error = %e,
            "CNI {command} failed"
        ),
    }
}

/// A warning for stderr (as before logs existed) and for the log file.
pub fn warn(message: &str) {
    eprintln!("twill-cni: {message}");
    tracing::warn!("{message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_log_file_means_no_log() {
        for stdin in [
            &br#"{"type":"flannel"}"#[..],
            br#"{"type":"flannel","logFile":null,"logFormat":"json"}"#,
            b"not json",
            b"[]",
        ] {
            assert_eq!(LogConfig::from_netconf(stdin), Ok(None));
        }
    }

    #[test]
    fn log_keys_are_read_and_defaulted() {
        let c = LogConfig::from_netconf(br#"{"logFile":"/var/log/twill-cni.log"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(c.file, PathBuf::from("/var/log/twill-cni.log"));
        assert_eq!((c.format, c.level), (LogFormat::Text, LevelFilter::INFO));
        assert!(c.problems.is_empty());
        let c =
            LogConfig::from_netconf(br#"{"logFile":"/l","logFormat":"json","logLevel":"debug"}"#)
                .unwrap()
                .unwrap();
        assert_eq!((c.format, c.level), (LogFormat::Json, LevelFilter::DEBUG));
    }

    #[test]
    fn bad_log_values_are_named_and_replaced() {
        let c = LogConfig::from_netconf(br#"{"logFile":"/l","logFormat":"xml","logLevel":"loud"}"#)
            .unwrap()
            .unwrap();
        assert_eq!((c.format, c.level), (LogFormat::Text, LevelFilter::INFO));
        assert_eq!(
            c.problems,
            [
                "logFormat: unknown log format \"xml\" (expected \"text\" or \"json\"); writing text",
                "logLevel \"loud\" is no level (error, warn, info, debug, trace or off); using info",
            ]
        );
        let c = LogConfig::from_netconf(br#"{"logFile":"/l","logFormat":1,"logLevel":[]}"#)
            .unwrap()
            .unwrap();
        assert_eq!(
            c.problems,
            [
                "logFormat must be \"text\" or \"json\", got 1; writing text",
                "logLevel must be a string (error, warn, info, debug, trace or off), got []; using info",
            ]
        );
        for bad in [r#"{"logFile":""}"#, r#"{"logFile":7}"#] {
            let e = LogConfig::from_netconf(bad.as_bytes()).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("logFile must be a non-empty string, got "),
                "{e}"
            );
        }
    }

    #[test]
    fn pod_comes_from_cni_args() {
        assert_eq!(
            pod_from_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1;K8S_POD_INFRA_CONTAINER_ID=abc"),
            Some("kube-system/coredns-1".into())
        );
        assert_eq!(pod_from_cni_args("K8S_POD_NAME=web"), None);
        assert_eq!(
            pod_from_cni_args("K8S_POD_NAMESPACE=;K8S_POD_NAME=web"),
            None
        );
        assert_eq!(pod_from_cni_args(""), None);
    }

    #[test]
    fn addresses_come_from_every_result_version() {
        let v1 = br#"{"cniVersion":"1.0.0","ips":[{"address":"10.244.1.2/24"},{"address":"fd00:1::2/64"}]}"#;
        assert_eq!(result_addresses(v1), ["10.244.1.2/24", "fd00:1::2/64"]);
        let v02 = br#"{"cniVersion":"0.2.0","ip4":{"ip":"10.244.1.3/24"}}"#;
        assert_eq!(result_addresses(v02), ["10.244.1.3/24"]);
        assert!(result_addresses(b"{}").is_empty());
        assert!(result_addresses(b"garbage").is_empty());
    }
}
