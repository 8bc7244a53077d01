//! Runtime pieces that twilld and twill-policy share, so that each exists once.

pub mod backoff;
