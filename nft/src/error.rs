//! The one error type of the nftables layer.

use std::time::Duration;

/// Errors from running `nft`, reading its listings, or talking nf_tables netlink.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The binary could not be started (or its pipes failed).
    #[error("cannot run {bin}: {err} (is the nftables package installed?)")]
    Spawn { bin: String, err: std::io::Error },
    /// nft exited non-zero; `stderr` is nft's own message.
    #[error("nft {args} failed ({status}): {stderr}")]
    Failed {
        args: String,
        status: String,
        stderr: String,
    },
    /// nft did not finish within the runner's timeout and was killed.
    #[error("nft {args} timed out after {timeout:?}")]
    Timeout { args: String, timeout: Duration },
    /// A listing (`nft -j list ...`) that is not nft's JSON.
    #[error("reading the listing of {what}: {err}")]
    Listing {
        what: String,
        err: serde_json::Error,
    },
    /// A netlink request failed; `op` says which (e.g. "transaction", "dump"). The kernel's
    /// errno, when it sent one, is [`NftError::os_error`].
    #[error("netfilter netlink {op}: {err}")]
    Netlink {
        op: &'static str,
        err: std::io::Error,
    },
    /// A blocking nft call run off an async runtime did not come back (its thread was
    /// cancelled at shutdown).
    #[error("nft call abandoned: {0}")]
    Abandoned(String),
}

impl NftError {
    /// The OS error number of a netlink failure (e.g. ENOENT: no such table or set).
    pub fn os_error(&self) -> Option<i32> {
        match self {
            NftError::Netlink { err, .. } => err.raw_os_error(),
            _ => None,
        }
    }

    /// Whether nft failed because the object it was asked about does not exist.
    pub fn is_no_such_object(&self) -> bool {
        match self {
            NftError::Failed { stderr, .. } => stderr.contains("No such file"),
            _ => self.os_error() == Some(nix::libc::ENOENT),
        }
    }
}
