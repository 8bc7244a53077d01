//! Names: the per-lab unique prefix every namespace carries, the lab directory derived from it,
//! and the check every user-given name (lab, node, pod, process) passes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Result};

use crate::LAB_ROOT;

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub(crate) fn valid_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 24
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok {
        bail!("invalid {what} name {name:?}: use 1-24 chars [A-Za-z0-9_-], starting alphanumeric");
    }
    Ok(())
}

fn base36(mut n: u64, width: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut v = vec![b'0'; width];
    for slot in v.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(v).expect("ascii")
}

/// A fresh prefix `tw<pid:5><counter:2><random:1>-`: the pid (unique among live processes) and a
/// process-wide counter make it unique; the lab directory (created atomically) settles any rest.
pub(crate) fn gen_prefix() -> String {
    let pid = std::process::id() as u64;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) as u64;
    let r: u64 = rand::random::<u64>();
    format!(
        "tw{}{}{}-",
        base36(pid, 5),
        base36(n % (36 * 36), 2),
        base36(r, 1)
    )
}

/// Directory of the lab with this prefix: `/tmp/twill-lab-<prefix without trailing ->`.
pub(crate) fn lab_dir(prefix: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(format!("twill-lab-{}", prefix.trim_end_matches('-')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_unique_and_short() {
        let a = gen_prefix();
        let b = gen_prefix();
        assert_ne!(a, b);
        assert_eq!(a.len(), 11, "{a}");
        assert!(a.starts_with("tw") && a.ends_with('-'));
        assert!(lab_dir(&a)
            .to_string_lossy()
            .ends_with(a.trim_end_matches('-')));
    }

    #[test]
    fn base36_pads() {
        assert_eq!(base36(0, 3), "000");
        assert_eq!(base36(35, 2), "0z");
        assert_eq!(base36(36, 2), "10");
    }

    #[test]
    fn names() {
        assert!(valid_name("x", "n1").is_ok());
        assert!(valid_name("x", "").is_err());
        assert!(valid_name("x", "-a").is_err());
        assert!(valid_name("x", "a b").is_err());
        assert!(valid_name("x", "a/b").is_err());
    }
}
