//! flanneld's command line, flag for flag (flanneld's `main.go` flag set), plus twill's own
//! additions. Every flag also comes from `FLANNELD_<UPPER_SNAKE>` when not given on the command
//! line, and Go's single-dash spelling (`-iface=eth0`) is accepted, so existing unit files and
//! manifests work unchanged.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use clap::{ArgAction, Parser};

/// Go's `strconv.ParseBool`, which is what flanneld's boolean flags and env values accept.
pub fn parse_go_bool(s: &str) -> Result<bool, InvalidBool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        other => Err(InvalidBool(other.to_string())),
    }
}

/// A boolean flag's value that Go's `strconv.ParseBool` does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid boolean value {0:?}")]
pub struct InvalidBool(pub String);

/// A flag value out of the range Flannel accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagsError {
    #[error("Invalid subnet-lease-renew-margin option, out of acceptable range: {0}")]
    RenewMarginOutOfRange(i64),
    #[error("--log-format: {0}")]
    LogFormat(#[from] twill_logging::UnknownLogFormat),
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "twilld",
    version,
    about = "Flannel-compatible node daemon (etcd or Kubernetes leases, VXLAN and host-gw)"
)]
pub struct Flags {
    /// A comma-delimited list of etcd endpoints.
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: String,
    /// etcd prefix.
    #[arg(
        long,
        env = "FLANNELD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,
    /// SSL key file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE", default_value = "")]
    pub etcd_keyfile: String,
    /// SSL certification file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE", default_value = "")]
    pub etcd_certfile: String,
    /// SSL Certificate Authority file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE", default_value = "")]
    pub etcd_cafile: String,
    /// Username for BasicAuth to etcd.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME", default_value = "")]
    pub etcd_username: String,
    /// Password for BasicAuth to etcd.
    #[arg(
        long,
        env = "FLANNELD_ETCD_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub etcd_password: String,

    /// Contact the Kubernetes API for subnet assignment instead of etcd.
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", value_parser = parse_go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", action = ArgAction::Set)]
    pub kube_subnet_mgr: bool,
    /// Kubernetes API server URL. Does not need to be specified if flannel is running in a pod.
    #[arg(long, env = "FLANNELD_KUBE_API_URL", default_value = "")]
    pub kube_api_url: String,
    /// kubeconfig file location. Does not need to be specified if flannel is running in a pod.
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE", default_value = "")]
    pub kubeconfig_file: String,
    /// Kubernetes annotation prefix.
    #[arg(
        long,
        env = "FLANNELD_KUBE_ANNOTATION_PREFIX",
        default_value = "flannel.alpha.coreos.com"
    )]
    pub kube_annotation_prefix: String,
    /// Path to the network configuration file to use (Kubernetes mode).
    #[arg(
        long,
        env = "FLANNELD_NET_CONFIG_PATH",
        default_value = "/etc/kube-flannel/net-conf.json"
    )]
    pub net_config_path: PathBuf,

    /// Interface to use (IP or name) for inter-host communication. Can be specified multiple times.
    #[arg(long, env = "FLANNELD_IFACE")]
    pub iface: Vec<String>,
    /// Regex expression to match the first interface to use (IP or name). Can be specified multiple times.
    #[arg(long, env = "FLANNELD_IFACE_REGEX")]
    pub iface_regex: Vec<String>,
    /// Detect interface to use (IP or name) for inter-host communication based on which will be used for the provided IP.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<IpAddr>,
    /// IP accessible by other nodes for inter-host communication.
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// IPv6 accessible by other nodes for inter-host communication.
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<Ipv6Addr>,

    /// Filename where env variables (subnet, MTU, ...) will be written to.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// Subnet lease renewal margin, in minutes, ranging from 1 to 1439.
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60)]
    pub subnet_lease_renew_margin: i64,

    /// Setup IP masquerade rule for traffic destined outside of overlay network.
    #[arg(long, env = "FLANNELD_IP_MASQ", value_parser = parse_go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", action = ArgAction::Set)]
    pub ip_masq: bool,
    /// Disable fully random source port allocation when masquerading.
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", value_parser = parse_go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", action = ArgAction::Set)]
    pub ip_masq_fully_random_disable: bool,
    /// Resync period for the masquerade and forward rules, in seconds.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5)]
    pub iptables_resync: u64,
    /// Add default accept rules to the FORWARD chain.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", value_parser = parse_go_bool, num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", action = ArgAction::Set)]
    pub iptables_forward_rules: bool,
    /// Add a blackhole route for the node's own subnet.
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", value_parser = parse_go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", action = ArgAction::Set)]
    pub ip_blackhole_route: bool,

    /// The IP address on which to listen for the healthz server.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,
    /// The port on which to listen for healthz; 0 disables it.
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,
    /// Set the NetworkUnavailable node condition to False when the network is up (Kubernetes mode).
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", value_parser = parse_go_bool, num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", action = ArgAction::Set)]
    pub set_node_network_unavailable: bool,

    /// Log verbosity (klog's -v): 0 info, 1-3 debug, 4+ trace.
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", default_value_t = 0)]
    pub verbosity: u8,

    /// twill: log line format, `text` (human-readable, the default) or `json` (one object per
    /// line with timestamp, level, target, message and the event's fields).
    #[arg(long, env = "FLANNELD_LOG_FORMAT", default_value = "text")]
    pub log_format: String,

    /// twill: period of the full dataplane resync (seconds). Drift such as a deleted route or
    /// flannel.<VNI> is repaired within this time even if no netlink event is seen.
    #[arg(long, env = "TWILL_RESYNC_PERIOD", default_value_t = 10)]
    pub resync_period: u64,

    /// twill: the unix socket serving `GET /status` (root only) for `twilld status`; empty
    /// disables it. Each twilld on a machine needs its own.
    #[arg(long, env = "FLANNELD_STATUS_SOCKET", default_value = twill_runtime::status::TWILLD_SOCKET)]
    pub status_socket: String,

    /// twill: remove what twill adds beyond Flannel's state from this node's network
    /// namespace (nftables tables inet twill-underlay, bridge twill-antispoof, inet and bridge
    /// twill-policy), then exit. For switching back to Flannel, after twill's daemons stopped;
    /// Flannel's lease, flannel.<VNI>, routes, neighbours, FDB entries, subnet.env and rules
    /// are left alone. Every other flag is ignored.
    #[arg(long)]
    pub cleanup: bool,
}

/// Rewrites Go-style single-dash long flags (`-iface=eth0`, `-ip-masq`) to clap's `--` form.
/// Single-letter flags (`-v`) are left alone.
pub fn normalize_go_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let name_len = a
                .trim_start_matches('-')
                .split('=')
                .next()
                .map_or(0, str::len);
            if i > 0 && a.starts_with('-') && !a.starts_with("--") && name_len > 1 {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

impl Flags {
    pub fn parse_from_env_and_args() -> Flags {
        Flags::parse_from(normalize_go_args(std::env::args()))
    }

    /// Flannel's range check for the renew margin.
    pub fn check(&self) -> Result<(), FlagsError> {
        if !(1..=1439).contains(&self.subnet_lease_renew_margin) {
            return Err(FlagsError::RenewMarginOutOfRange(
                self.subnet_lease_renew_margin,
            ));
        }
        Ok(())
    }

    /// The `--log-format` value, or an error naming the flag and the value.
    pub fn log_format(&self) -> Result<twill_logging::LogFormat, FlagsError> {
        Ok(self.log_format.parse()?)
    }

    pub fn etcd_endpoint_list(&self) -> Vec<String> {
        self.etcd_endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Flags {
        let argv = std::iter::once("twilld")
            .chain(args.iter().copied())
            .map(String::from);
        Flags::try_parse_from(normalize_go_args(argv)).unwrap()
    }

    #[test]
    fn the_status_socket_defaults_to_run_twill_and_empty_disables_it() {
        assert_eq!(parse(&[]).status_socket, "/run/twill/twilld.sock");
        assert_eq!(
            parse(&["--status-socket=/tmp/n1/twilld.sock"]).status_socket,
            "/tmp/n1/twilld.sock"
        );
        assert_eq!(parse(&["--status-socket="]).status_socket, "");
    }

    #[test]
    fn defaults_are_flannels() {
        let f = parse(&[]);
        assert_eq!(
            f.etcd_endpoints,
            "http://127.0.0.1:4001,http://127.0.0.1:2379"
        );
        assert_eq!(f.etcd_prefix, "/coreos.com/network");
        assert_eq!(f.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(f.subnet_lease_renew_margin, 60);
        assert_eq!(f.kube_annotation_prefix, "flannel.alpha.coreos.com");
        assert_eq!(
            f.net_config_path,
            PathBuf::from("/etc/kube-flannel/net-conf.json")
        );
        assert!(!f.ip_masq && f.iptables_forward_rules && f.set_node_network_unavailable);
        assert_eq!(f.iptables_resync, 5);
        assert_eq!(f.healthz_port, 0);
        assert_eq!(f.healthz_ip.to_string(), "0.0.0.0");
        assert_eq!(f.resync_period, 10);
        assert!(!f.cleanup);
        assert!(parse(&["--cleanup"]).cleanup);
    }

    #[test]
    fn go_style_flags_and_bools() {
        let f = parse(&[
            "-ip-masq",
            "-iface=eth1",
            "--iface",
            "198.18.0.5",
            "--iptables-forward-rules=false",
            "-v=2",
        ]);
        assert!(f.ip_masq);
        assert_eq!(f.iface, vec!["eth1", "198.18.0.5"]);
        assert!(!f.iptables_forward_rules);
        assert_eq!(f.verbosity, 2);
        let f = parse(&["--kube-subnet-mgr=T"]);
        assert!(f.kube_subnet_mgr);
    }

    #[test]
    fn renew_margin_range() {
        assert!(parse(&["--subnet-lease-renew-margin=0"])
            .check()
            .unwrap_err()
            .to_string()
            .contains("out of acceptable range: 0"));
        assert!(parse(&["--subnet-lease-renew-margin=1439"]).check().is_ok());
        assert!(parse(&["--subnet-lease-renew-margin=1440"])
            .check()
            .is_err());
    }

    #[test]
    fn log_format_is_text_json_or_a_named_error() {
        use twill_logging::LogFormat;
        assert_eq!(parse(&[]).log_format().unwrap(), LogFormat::Text);
        assert_eq!(
            parse(&["--log-format=json"]).log_format().unwrap(),
            LogFormat::Json
        );
        assert_eq!(
            parse(&["-log-format=json"]).log_format().unwrap(),
            LogFormat::Json
        );
        assert_eq!(
            parse(&["-log-format", "text"]).log_format().unwrap(),
            LogFormat::Text
        );
        assert_eq!(
            parse(&["--log-format=xml"])
                .log_format()
                .unwrap_err()
                .to_string(),
            "--log-format: unknown log format \"xml\" (expected \"text\" or \"json\")"
        );
    }

    #[test]
    fn endpoints_are_comma_split() {
        let f = parse(&["--etcd-endpoints=http://198.18.0.1:2379, http://198.18.0.2:2379"]);
        assert_eq!(
            f.etcd_endpoint_list(),
            vec!["http://198.18.0.1:2379", "http://198.18.0.2:2379"]
        );
    }

    #[test]
    fn go_bool_accepts_what_strconv_does() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_go_bool(t), Ok(true));
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_go_bool(f), Ok(false));
        }
        assert!(parse_go_bool("yes").is_err());
    }
}
