//! twill's Flannel-compatible CNI plugin (installed as `/opt/cni/bin/flannel`) and the shared
//! `subnet.env` parser/renderer.

pub mod antispoof;
pub mod delegate;
pub mod error;
pub mod gojson;
pub mod netconf;
pub mod plugin;
pub mod result;
pub mod subnet_env;
pub mod validate;
