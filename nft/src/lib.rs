//! twill's one nftables layer, shared by twilld (masquerade tables, underlay guard, cleanup),
//! the CNI plugin (anti-spoofing table) and twill-policy (the enforcer and its counters):
//!
//! - [`runner`]: the `nft` process runner, with a timeout and a configurable binary, behind the
//!   [`NftRunner`] trait so that effectors can be unit-tested with [`RecordingNft`];
//! - [`listing`]: the typed reader of `nft -j list ...` output;
//! - [`counters`]: a table's named counters, read with one netlink dump;
//! - [`nfnl`]: a minimal nf_tables (and ctnetlink) netlink client for the hot paths that must
//!   not start a process;
//! - [`nflog`]: an nfnetlink_log client (bind a group, parse the packets it logs);
//! - [`tables`]: names of twill's tables that more than their writer needs;
//! - [`NftError`]: the one error type of all three.

pub mod counters;
pub mod error;
pub mod listing;
pub mod nflog;
pub mod nfnl;
pub mod runner;
pub mod tables;

pub use error::NftError;
pub use listing::Listing;
pub use runner::{Nft, NftRunner, RecordingNft};
