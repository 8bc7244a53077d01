//! The table's named counters (`counter pod-in/<ns>/<pod> { }`), read straight from the kernel
//! with one nf_tables GETOBJ dump: the reader lives in [`twill_nft::counters`], shared with
//! twilld's underlay guard.

pub use twill_nft::counters::{parse_object, read, request};
