//! Input validation done before anything touches disk or the kernel, and CNI version handling.

use std::path::Path;

use crate::error::{code, CniError};

/// Spec versions this plugin accepts in `cniVersion`.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST_VERSION: &str = "1.1.0";

/// `major.minor.patch` as a comparable tuple.
pub fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.');
    let t = (
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    );
    it.next().is_none().then_some(t)
}

/// True if `v` is a well-formed version at least `min`.
pub fn version_at_least(v: &str, min: &str) -> bool {
    matches!((parse_version(v), parse_version(min)), (Some(a), Some(b)) if a >= b)
}

/// Check the config's `cniVersion` is supported, and new enough for `command`
/// (CHECK needs 0.4.0, STATUS and GC need 1.1.0).
pub fn check_version(conf_version: &str, command: &str) -> Result<(), CniError> {
    if !SUPPORTED_VERSIONS.contains(&conf_version) {
        return Err(
            CniError::new(code::INCOMPATIBLE_VERSION, "incompatible CNI versions").with_details(
                format!(
                    "config is {conf_version:?}, plugin supports {:?}",
                    SUPPORTED_VERSIONS
                ),
            ),
        );
    }
    let min = match command {
        "CHECK" => "0.4.0",
        "STATUS" | "GC" => "1.1.0",
        _ => return Ok(()),
    };
    if !version_at_least(conf_version, min) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("config version does not allow {command}"),
        )
        .with_details(format!(
            "cniVersion {conf_version:?} is older than {min:?}, the first version with {command}"
        )));
    }
    Ok(())
}

/// The VERSION command's output.
pub fn version_json(requested: Option<&str>) -> String {
    let v = match requested {
        Some(v) if SUPPORTED_VERSIONS.contains(&v) => v,
        _ => LATEST_VERSION,
    };
    serde_json::json!({"cniVersion": v, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

/// CNI_CONTAINERID: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$` (it becomes a file name under dataDir).
pub fn container_id(id: &str) -> Result<(), CniError> {
    let ok = id
        .bytes()
        .enumerate()
        .all(|(i, b)| b.is_ascii_alphanumeric() || (i > 0 && matches!(b, b'_' | b'.' | b'-')));
    if id.is_empty() || !ok {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("invalid characters in CNI_CONTAINERID {id:?}"),
        )
        .with_details("must match ^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$"));
    }
    Ok(())
}

/// CNI_IFNAME: non-empty, at most 15 bytes, no '/', ':' or whitespace, not "." or "..".
pub fn ifname(name: &str) -> Result<(), CniError> {
    let bad = |why: &str| {
        Err(CniError::new(
            code::INVALID_ENV,
            format!("invalid CNI_IFNAME {name:?}: {why}"),
        ))
    };
    if name.is_empty() {
        return bad("interface name is empty");
    }
    if name.len() > 15 {
        return bad("interface name is longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("interface name is . or ..");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
    {
        return bad("interface name contains '/', ':', NUL or whitespace");
    }
    Ok(())
}

const NSFS_MAGIC: i64 = 0x6e73_6673;

/// CNI_NETNS must be an absolute path to an nsfs mount (a network namespace handle).
pub fn netns(path: &str) -> Result<(), CniError> {
    let bad = |why: String| {
        Err(CniError::new(
            code::INVALID_ENV,
            format!("invalid CNI_NETNS {path:?}: {why}"),
        ))
    };
    if path.is_empty() {
        return bad("empty".into());
    }
    if !path.starts_with('/') {
        return bad("not an absolute path".into());
    }
    match nix::sys::statfs::statfs(Path::new(path)) {
        Err(e) => bad(format!("{e}")),
        Ok(st) => {
            // f_type's C type differs between architectures.
            #[allow(clippy::unnecessary_cast)]
            let magic = st.filesystem_type().0 as i64;
            if magic != NSFS_MAGIC {
                bad(format!(
                    "not a namespace (filesystem magic {magic:#x}, want nsfs {NSFS_MAGIC:#x})"
                ))
            } else {
                Ok(())
            }
        }
    }
}

/// A delegate `type` must be a plain plugin file name (CVE-2021-20206: `../` ran any binary).
pub fn plugin_type(t: &str) -> Result<(), CniError> {
    if t.is_empty()
        || t == "."
        || t.contains('/')
        || t.contains("..")
        || t.contains('\0')
        || t.chars().any(char::is_whitespace)
    {
        return Err(CniError::new(
            code::INVALID_NETWORK_CONFIG,
            format!("invalid delegate plugin type {t:?}: must be a plain plugin name"),
        )
        .with_details("no '/', '..', NUL or whitespace allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        for v in SUPPORTED_VERSIONS {
            check_version(v, "ADD").unwrap();
            check_version(v, "DEL").unwrap();
        }
        for v in ["0.1.0", "0.2.0", "", "1.2.0", "x"] {
            let e = check_version(v, "ADD").unwrap_err();
            assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
            assert!(e.details.contains(&format!("{v:?}")), "{e}");
        }
        assert_eq!(check_version("0.3.1", "CHECK").unwrap_err().code, 1);
        check_version("0.4.0", "CHECK").unwrap();
        assert_eq!(check_version("1.0.0", "GC").unwrap_err().code, 1);
        assert_eq!(check_version("1.0.0", "STATUS").unwrap_err().code, 1);
        check_version("1.1.0", "STATUS").unwrap();
        assert!(version_at_least("1.10.0", "1.9.0"));
        assert!(!version_at_least("1.0", "0.1.0"));
    }

    #[test]
    fn version_output() {
        assert_eq!(
            version_json(Some("0.3.1")),
            r#"{"cniVersion":"0.3.1","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}"#
        );
        assert!(version_json(Some("9.9.9")).starts_with(r#"{"cniVersion":"1.1.0""#));
        assert!(version_json(None).starts_with(r#"{"cniVersion":"1.1.0""#));
    }

    #[test]
    fn container_ids() {
        for ok in ["a", "0abc", "abc_def.g-h", "f00dface1234"] {
            container_id(ok).unwrap();
        }
        for bad in [
            "", "-a", ".a", "_a", "a/b", "../x", "a b", "a:b", "é", "a\n",
        ] {
            let e = container_id(bad).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{bad:?}");
            assert!(e.msg.contains("CNI_CONTAINERID"), "{e}");
            assert!(e.msg.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn ifnames() {
        for ok in ["eth0", "a", "net1.100", "123456789012345"] {
            ifname(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "1234567890123456",
        ] {
            let e = ifname(bad).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{bad:?}");
            assert!(e.msg.contains("CNI_IFNAME"), "{e}");
        }
    }

    #[test]
    fn netns_paths() {
        netns("/proc/self/ns/net").unwrap();
        for bad in [
            "",
            "proc/self/ns/net",
            "/nonexistent/ns",
            "/proc/self/status",
            "/",
        ] {
            let e = netns(bad).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{bad:?}");
            assert!(e.msg.contains("CNI_NETNS"), "{e}");
        }
    }

    #[test]
    fn plugin_types() {
        for ok in ["bridge", "host-local", "my_plugin.v2"] {
            plugin_type(ok).unwrap();
        }
        for bad in ["", ".", "..", "../bin/sh", "/bin/sh", "a/b", "x..y", "a b"] {
            let e = plugin_type(bad).unwrap_err();
            assert_eq!(e.code, code::INVALID_NETWORK_CONFIG, "{bad:?}");
            assert!(e.msg.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
