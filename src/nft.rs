//! A small runner for the `nft` binary: feeds a script on stdin and captures stderr, so a
//! rejected transaction comes back with nft's own message (nftables-rs drops it).

use std::io::Write;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("running nft: {0} (is the nftables package installed?)")]
    Spawn(std::io::Error),
    #[error("nft rejected the transaction: {stderr}")]
    Rejected { stderr: String },
}

/// Applies `script` (nft's own syntax) as one transaction: all of it, or none of it.
pub fn apply(script: &str) -> Result<(), NftError> {
    run(&["-f", "-"], Some(script)).map(|_| ())
}

/// Checks `script` without applying it (`nft -c`).
pub fn check(script: &str) -> Result<(), NftError> {
    run(&["-c", "-f", "-"], Some(script)).map(|_| ())
}

/// Runs nft with `args`, returning stdout.
pub fn run(args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NftError::Rejected {
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
