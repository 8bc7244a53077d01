//! Helpers for the tests that use the lab: where the workspace's binaries are, and whether
//! root-only tests can run.

use std::path::{Path, PathBuf};

/// Path of a binary built in this workspace: `$TWILL_BIN_DIR/<name>` if that variable is set,
/// else next to the current executable's cargo target directory (stepping out of `deps/` or
/// `examples/`), so integration tests find `twilld`/`twill-cni` built by
/// `cargo build --workspace --bins`.
pub fn bin_path(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("TWILL_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if matches!(
        dir.file_name().and_then(|n| n.to_str()),
        Some("deps" | "examples")
    ) {
        dir.pop();
    }
    dir.join(name)
}

/// Whether lab tests can run: true as root. Not root and `CI=true`: panics (CI must run them).
/// Not root otherwise: prints "skipping: lab tests need root" and returns false.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("lab tests need root, and CI=true: run the test suite as root in CI");
    }
    eprintln!("skipping: lab tests need root (network namespaces)");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bin_path_uses_env_or_target_dir() {
        let p = bin_path("twilld");
        assert!(p.ends_with("twilld"));
        assert_ne!(
            p.parent()
                .and_then(|d| d.file_name())
                .and_then(|n| n.to_str()),
            Some("deps")
        );
    }
}
