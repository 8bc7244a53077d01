//! Flannel's formats, byte for byte, with no I/O beyond reading and writing a path the caller
//! names: shared by twilld, the CNI plugin (twill-cni), the dataplane (twill-backends) and the
//! policy enforcer, so none of them depends on another's crate for them.
//!
//! | module | format |
//! | --- | --- |
//! | [`net_conf`] | `net-conf.json`, decoded as Go `encoding/json` does and checked as Flannel's `CheckNetworkConfig` |
//! | [`gocompat`] | Go `encoding/json` decoding semantics and Go's IP text, used by the parsers here |
//! | [`gojson`] | the one writer of Go `encoding/json` text (CNI delegate config, lease attributes) |
//! | [`lease`] | the etcd lease: subnet keys, `LeaseAttrs`, VXLAN `BackendData`, peer validation |
//! | [`mac`] | [`Mac`], the one MAC address type (Go `net.HardwareAddr` text) |
//! | [`subnet_env`] | `subnet.env`, the file the daemon writes for the CNI plugin |

pub mod gocompat;
pub mod gojson;
pub mod lease;
pub mod mac;
pub mod net_conf;
pub mod subnet_env;

pub use mac::Mac;
