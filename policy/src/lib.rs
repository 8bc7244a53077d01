pub mod compile;
pub mod conntrack;
pub mod counters;
pub mod enforce;
pub mod eval;
pub mod metrics;
pub mod model;
pub mod source;
