//! Runtime pieces that twilld and twill-policy share, so that each exists once: the retry
//! backoff, the Kubernetes client builder, the HTTP server of their endpoints, the status
//! JSON and its client, and Kubernetes events on the node.

pub mod backoff;
pub mod events;
pub mod http;
pub mod kube;
pub mod status;
