//! twilld's library: everything but the clap shell in `main.rs`, so that integration tests and
//! benchmarks can drive the same code.

pub mod alloc;
pub mod cleanup;
pub mod daemon;
pub mod flags;
pub mod health;
pub mod iface;
pub mod iptables;
pub mod masq;
pub mod metrics;
pub mod nft;
pub mod registry;
pub mod status;
pub mod status_command;
pub mod traffic;
pub mod underlay;
