//! Runtime pieces that twilld and twill-policy share, so that each exists once: the retry
//! backoff and the Kubernetes client builder.

pub mod backoff;
pub mod kube;
