//! Runtime pieces that twilld and twill-policy share, so that each exists once: the retry
//! backoff, the Kubernetes client builder and the HTTP server of their endpoints.

pub mod backoff;
pub mod http;
pub mod kube;
