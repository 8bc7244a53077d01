pub mod compile;
pub mod conntrack;
pub mod counters;
pub mod eval;
pub mod metrics;
pub mod model;
pub mod nft;
pub mod source;
