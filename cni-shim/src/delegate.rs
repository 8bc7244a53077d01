//! Running the delegate plugin (`invoke.DelegateAdd/Del` in libcni): found in `CNI_PATH`, run
//! with our environment and `CNI_COMMAND` set, config on stdin, result on stdout.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{code, CniError};
use crate::validate;

/// Find `plugin` in the colon-separated `cni_path`: first regular, executable file wins.
pub fn find_in_path(plugin: &str, cni_path: &str) -> Result<PathBuf, CniError> {
    validate::plugin_type(plugin)?;
    let dirs: Vec<&str> = cni_path.split(':').filter(|d| !d.is_empty()).collect();
    for d in &dirs {
        let p = Path::new(d).join(plugin);
        if let Ok(md) = std::fs::metadata(&p) {
            if md.is_file() && md.permissions().mode() & 0o111 != 0 {
                return Ok(p);
            }
        }
    }
    Err(CniError::new(
        code::DELEGATE_FAILED,
        format!(
            "failed to find plugin {plugin:?} in path [{}]",
            dirs.join(" ")
        ),
    )
    .with_details("set CNI_PATH to the directory holding the delegate plugin"))
}

/// Run `plugin` for `command` with `stdin`; its stdout on success. On failure the delegate's own
/// CNI error (code and details kept, message prefixed with `what`), or a plugin-specific error.
pub fn run(plugin: &Path, command: &str, stdin: &[u8], what: &str) -> Result<Vec<u8>, CniError> {
    run_env(plugin, command, stdin, what, &[])
}

/// [`run`] with extra environment variables (GC runs DEL for an attachment of its own choosing).
pub fn run_env(
    plugin: &Path,
    command: &str,
    stdin: &[u8],
    what: &str,
    env: &[(&str, &str)],
) -> Result<Vec<u8>, CniError> {
    let fail = |msg: String| CniError::new(code::DELEGATE_FAILED, format!("{what}: {msg}"));
    let mut child = Command::new(plugin)
        .envs(env.iter().copied())
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| fail(format!("failed to run {}: {e}", plugin.display())))?;
    let mut input = child.stdin.take().expect("stdin is piped");
    let writer = {
        let data = stdin.to_vec();
        std::thread::spawn(move || input.write_all(&data))
    };
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("failed to wait for {}: {e}", plugin.display())))?;
    // A plugin may exit without reading all of stdin; a broken pipe then is not our error.
    let _ = writer.join();
    if out.status.success() {
        return Ok(out.stdout);
    }
    match CniError::from_plugin_output(&out.stdout) {
        Some(mut e) => {
            e.msg = format!("{what}: {}", e.msg);
            Err(e)
        }
        None => Err(
            fail(format!("{} exited with {}", plugin.display(), out.status))
                .with_details(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        ),
    }
}

/// The spec versions the delegate supports (its VERSION output); empty if it cannot tell.
pub fn supported_versions(plugin: &Path, cni_version: &str) -> Vec<String> {
    let input = serde_json::json!({ "cniVersion": cni_version }).to_string();
    let Ok(out) = run(plugin, "VERSION", input.as_bytes(), "delegate VERSION") else {
        return Vec::new();
    };
    serde_json::from_slice::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| {
            v.get("supportedVersions")?.as_array().map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
        })
        .unwrap_or_default()
}
