//! twill's Flannel-compatible CNI plugin (installed as `/opt/cni/bin/flannel`). The formats it
//! shares with twilld (`subnet.env`, the Go-JSON writer) are in `twill-formats`.

pub mod antispoof;
pub mod delegate;
pub mod error;
pub mod log;
pub mod netconf;
pub mod plugin;
pub mod result;
pub mod validate;
