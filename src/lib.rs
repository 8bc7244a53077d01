//! twilld's library: everything but the clap shell in `main.rs`, so that integration tests and
//! benchmarks can drive the same code.

pub mod alloc;
pub mod config;
pub mod registry;
