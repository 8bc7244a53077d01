//! `net-conf.json`: Flannel's network configuration (`pkg/subnet/config.go`), decoded with Go
//! `encoding/json` semantics and checked exactly as Flannel's `CheckNetworkConfig` does.
//!
//! Go-JSON rules copied here: object keys match struct fields case-insensitively, unknown keys are
//! ignored, a repeated key overwrites the earlier one, `null` leaves plain fields untouched, type
//! mismatches are remembered and reported after decoding (`json: cannot unmarshal string into Go
//! struct field Config.SubnetLen of type uint`), while the IP types' own parsers abort at once with
//! their bare error (`invalid CIDR address: foo`, `invalid IPv4 CIDR format`, ...).
//!
//! Everything here is pure: no I/O.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::gocompat::{self, GoValue, SyntaxError, TypeError};

/// Backend types twill implements.
pub const SUPPORTED_BACKENDS: &[&str] = &["vxlan", "host-gw"];
/// Backend types Flannel registers (`main.go` imports) that twill does not implement.
pub const UNSUPPORTED_FLANNEL_BACKENDS: &[&str] = &[
    "udp",
    "wireguard",
    "ipip",
    "ipsec",
    "alloc",
    "extension",
    "tencent-vpc",
];
/// `pkg/backend/vxlan/vxlan.go` `defaultVNI`.
pub const DEFAULT_VNI: u32 = 1;
/// Largest VNI the kernel accepts (`VXLAN_N_VID - 1`).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// Why a `net-conf.json` was rejected. `Display` is Flannel's text wherever Flannel has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Malformed JSON (names line, column and byte offset).
    #[error("{0}")]
    Syntax(SyntaxError),
    /// Go `*json.UnmarshalTypeError`, e.g. a string where `SubnetLen` wants a number.
    #[error("{0}")]
    Type(TypeError),
    /// Error of one of Flannel's IP types' `UnmarshalJSON` (bare Go text; `field` is the key).
    #[error("{message}")]
    Value {
        field: &'static str,
        message: String,
    },
    /// `Backend` could not be decoded into `struct { Type string }`.
    #[error("error decoding Backend property of config: {0}")]
    BackendDecode(TypeError),
    /// `pkg/backend/manager.go`: type not registered in Flannel either.
    #[error("unknown backend type: {0}")]
    UnknownBackend(String),
    /// A backend Flannel has but twill does not implement.
    #[error("twill does not implement backend type \"{0}\" (twill supports: vxlan, host-gw)")]
    UnsupportedBackend(String),
    /// `Backend` of type vxlan with a mistyped key (Flannel: `error decoding VXLAN backend config: ...`).
    #[error("error decoding VXLAN backend config: {0}")]
    VxlanType(TypeError),
    /// vxlan value outside what the kernel accepts (twill-only check; Flannel fails later in netlink).
    #[error("error decoding VXLAN backend config: {field} {message}")]
    VxlanRange {
        field: &'static str,
        message: String,
    },
    /// A `CheckNetworkConfig` error (exact Flannel text).
    #[error("{0}")]
    Check(String),
}

impl ConfigError {
    /// The `net-conf.json` key the error is about, when there is one.
    pub fn field(&self) -> Option<String> {
        match self {
            ConfigError::Type(t) | ConfigError::BackendDecode(t) | ConfigError::VxlanType(t) => {
                Some(t.field.clone())
            }
            ConfigError::Value { field, .. } | ConfigError::VxlanRange { field, .. } => {
                Some((*field).to_string())
            }
            _ => None,
        }
    }
}

/// The parsed network configuration (`subnet.Config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub enable_ipv4: bool,
    pub enable_ipv6: bool,
    pub enable_nftables: bool,
    pub network: Option<Ipv4Net>,
    /// 0 = not given (filled in by [`NetConfig::check`]); values above 255 saturate to 255.
    pub subnet_len: u8,
    pub subnet_min: Option<Ipv4Addr>,
    pub subnet_max: Option<Ipv4Addr>,
    pub ipv6_network: Option<Ipv6Net>,
    pub ipv6_subnet_len: u8,
    pub ipv6_subnet_min: Option<Ipv6Addr>,
    pub ipv6_subnet_max: Option<Ipv6Addr>,
    pub backend: BackendConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    Vxlan(VxlanConfig),
    HostGw,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    /// 0 = kernel default 8472.
    pub port: u16,
    /// `None` = external interface MTU (an explicit 0 is treated as not given).
    pub mtu: Option<u32>,
    pub gbp: bool,
    pub learning: bool,
    pub direct_routing: bool,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        VxlanConfig {
            vni: DEFAULT_VNI,
            port: 0,
            mtu: None,
            gbp: false,
            learning: false,
            direct_routing: false,
        }
    }
}

const CONFIG_STRUCT: &str = "Config";

impl NetConfig {
    /// Flannel's `ParseConfig` plus backend selection: Go-JSON decoding, no defaults beyond
    /// `EnableIPv4 = true`. Kube mode uses only this.
    pub fn parse(json: &str) -> Result<NetConfig, ConfigError> {
        let root = gocompat::parse(json).map_err(ConfigError::Syntax)?;
        let mut cfg = NetConfig {
            enable_ipv4: true,
            enable_ipv6: false,
            enable_nftables: false,
            network: None,
            subnet_len: 0,
            subnet_min: None,
            subnet_max: None,
            ipv6_network: None,
            ipv6_subnet_len: 0,
            ipv6_subnet_min: None,
            ipv6_subnet_max: None,
            backend: BackendConfig::HostGw,
        };
        let mut saved: Option<TypeError> = None;
        let mut backend: Option<&GoValue> = None;
        match &root {
            GoValue::Null => {}
            GoValue::Object(pairs) => {
                for (key, value) in pairs {
                    cfg.decode_field(key, value, &mut saved, &mut backend)?;
                }
            }
            other => {
                saved = Some(TypeError::value(other.kind(), "subnet.Config"));
            }
        }
        if let Some(e) = saved {
            return Err(ConfigError::Type(e));
        }
        let backend_type = parse_backend_type(backend)?;
        let lowered = backend_type.to_lowercase();
        cfg.backend = match lowered.as_str() {
            "vxlan" => BackendConfig::Vxlan(parse_vxlan(backend)?),
            "host-gw" => BackendConfig::HostGw,
            t if UNSUPPORTED_FLANNEL_BACKENDS.contains(&t) => {
                return Err(ConfigError::UnsupportedBackend(lowered));
            }
            _ => return Err(ConfigError::UnknownBackend(lowered)),
        };
        Ok(cfg)
    }

    fn decode_field<'a>(
        &mut self,
        key: &str,
        value: &'a GoValue,
        saved: &mut Option<TypeError>,
        backend: &mut Option<&'a GoValue>,
    ) -> Result<(), ConfigError> {
        let mut keep = |r: Result<(), TypeError>| {
            if let Err(e) = r {
                saved.get_or_insert(e);
            }
        };
        let f = |name: &'static str| gocompat::fold_eq(key, name);
        if f("EnableIPv4") {
            keep(
                gocompat::decode_bool(value, CONFIG_STRUCT, "EnableIPv4").map(|b| {
                    if let Some(b) = b {
                        self.enable_ipv4 = b;
                    }
                }),
            );
        } else if f("EnableIPv6") {
            keep(
                gocompat::decode_bool(value, CONFIG_STRUCT, "EnableIPv6").map(|b| {
                    if let Some(b) = b {
                        self.enable_ipv6 = b;
                    }
                }),
            );
        } else if f("EnableNFTables") {
            keep(
                gocompat::decode_bool(value, CONFIG_STRUCT, "EnableNFTables").map(|b| {
                    if let Some(b) = b {
                        self.enable_nftables = b;
                    }
                }),
            );
        } else if f("SubnetLen") {
            keep(
                gocompat::decode_uint(value, CONFIG_STRUCT, "SubnetLen", "uint").map(|n| {
                    if let Some(n) = n {
                        self.subnet_len = n.min(255) as u8;
                    }
                }),
            );
        } else if f("IPv6SubnetLen") {
            keep(
                gocompat::decode_uint(value, CONFIG_STRUCT, "IPv6SubnetLen", "uint").map(|n| {
                    if let Some(n) = n {
                        self.ipv6_subnet_len = n.min(255) as u8;
                    }
                }),
            );
        } else if f("Network") {
            self.network = Some(unmarshal_ip4net(value, "Network")?);
        } else if f("IPv6Network") {
            self.ipv6_network = Some(unmarshal_ip6net(value, "IPv6Network")?);
        } else if f("SubnetMin") {
            self.subnet_min = Some(unmarshal_ip4(value, "SubnetMin")?);
        } else if f("SubnetMax") {
            self.subnet_max = Some(unmarshal_ip4(value, "SubnetMax")?);
        } else if f("IPv6SubnetMin") {
            // *ip.IP6: null sets the pointer to nil.
            self.ipv6_subnet_min = match value {
                GoValue::Null => None,
                v => Some(unmarshal_ip6(v, "IPv6SubnetMin")?),
            };
        } else if f("IPv6SubnetMax") {
            self.ipv6_subnet_max = match value {
                GoValue::Null => None,
                v => Some(unmarshal_ip6(v, "IPv6SubnetMax")?),
            };
        } else if f("Backend") {
            // json.RawMessage takes any value, null included.
            *backend = Some(value);
        }
        // BackendType is `json:"-"`; everything else is ignored.
        Ok(())
    }

    /// Flannel's `CheckNetworkConfig` (etcd mode only): fills SubnetLen/Min/Max defaults and
    /// validates, with Flannel's exact error texts.
    pub fn check(&mut self) -> Result<(), ConfigError> {
        let err = |s: &str| Err(ConfigError::Check(s.to_string()));
        if self.enable_ipv4 {
            let net = match self.network {
                Some(n) if !(n.addr().is_unspecified() && n.prefix_len() == 0) => n,
                _ => return err("please define a correct Network parameter in the flannel config"),
            };
            let plen = u32::from(net.prefix_len());
            if self.subnet_len > 0 {
                if self.subnet_len > 30 {
                    return err("SubnetLen must be less than /31");
                }
                if u32::from(self.subnet_len) < plen + 2 {
                    return err("network must be able to accommodate at least four subnets");
                }
            } else if plen > 28 {
                return err("network is too small. Minimum useful network prefix is /28");
            } else if plen <= 22 {
                self.subnet_len = 24;
            } else {
                self.subnet_len = (plen + 2) as u8;
            }
            let size: u32 = 1 << (32 - u32::from(self.subnet_len));
            let net_ip = u32::from(net.addr());
            match self.subnet_min {
                Some(m) if !m.is_unspecified() => {
                    if !net.contains(&m) {
                        return err("SubnetMin is not in the range of the Network");
                    }
                }
                _ => self.subnet_min = Some(Ipv4Addr::from(net_ip.wrapping_add(size))),
            }
            match self.subnet_max {
                Some(m) if !m.is_unspecified() => {
                    if !net.contains(&m) {
                        return err("SubnetMax is not in the range of the Network");
                    }
                }
                _ => {
                    let next = net_ip.wrapping_add(1u32.checked_shl(32 - plen).unwrap_or(0));
                    self.subnet_max = Some(Ipv4Addr::from(next.wrapping_sub(size)));
                }
            }
            let mask = u32::MAX << (32 - u32::from(self.subnet_len));
            for (name, ip) in [
                ("SubnetMin", self.subnet_min),
                ("SubnetMax", self.subnet_max),
            ] {
                let ip = ip.expect("set above");
                if u32::from(ip) & mask != u32::from(ip) {
                    return Err(ConfigError::Check(format!(
                        "{name} is not on a SubnetLen boundary: {ip}"
                    )));
                }
            }
        }
        if self.enable_ipv6 {
            let net = match self.ipv6_network {
                Some(n) if !(n.addr().is_unspecified() && n.prefix_len() == 0) => n,
                _ => {
                    return err(
                        "please define a correct IPv6Network parameter in the flannel config",
                    )
                }
            };
            let plen = u32::from(net.prefix_len());
            if self.ipv6_subnet_len > 0 {
                if self.ipv6_subnet_len > 126 {
                    return err("SubnetLen must be less than /127");
                }
                if u32::from(self.ipv6_subnet_len) < plen + 2 {
                    return err("network must be able to accommodate at least four subnets");
                }
            } else if plen > 124 {
                return err("IPv6Network is too small. Minimum useful network prefix is /124");
            } else if plen <= 62 {
                self.ipv6_subnet_len = 64;
            } else {
                self.ipv6_subnet_len = (plen + 2) as u8;
            }
            let size: u128 = 1 << (128 - u32::from(self.ipv6_subnet_len));
            let net_ip = u128::from(net.addr());
            match self.ipv6_subnet_min {
                Some(m) if !m.is_unspecified() => {
                    if !net.contains(&m) {
                        return err("IPv6SubnetMin is not in the range of the IPv6Network");
                    }
                }
                _ => self.ipv6_subnet_min = Some(Ipv6Addr::from(net_ip.wrapping_add(size))),
            }
            match self.ipv6_subnet_max {
                Some(m) if !m.is_unspecified() => {
                    if !net.contains(&m) {
                        return err("IPv6SubnetMax is not in the range of the IPv6Network");
                    }
                }
                _ => {
                    let next = net_ip.wrapping_add(1u128.checked_shl(128 - plen).unwrap_or(0));
                    self.ipv6_subnet_max = Some(Ipv6Addr::from(next.wrapping_sub(size)));
                }
            }
            let mask = u128::MAX << (128 - u32::from(self.ipv6_subnet_len));
            for (name, ip) in [
                ("IPv6SubnetMin", self.ipv6_subnet_min),
                ("IPv6SubnetMax", self.ipv6_subnet_max),
            ] {
                let ip = ip.expect("set above");
                if u128::from(ip) & mask != u128::from(ip) {
                    return Err(ConfigError::Check(format!(
                        "{name} is not on a SubnetLen boundary: {}",
                        gocompat::flannel_ip6_string(ip)
                    )));
                }
            }
        }
        Ok(())
    }

    /// `parse` then `check` (etcd mode's `GetNetworkConfig`).
    pub fn parse_and_check(json: &str) -> Result<NetConfig, ConfigError> {
        let mut cfg = NetConfig::parse(json)?;
        cfg.check()?;
        Ok(cfg)
    }

    /// `"vxlan"` or `"host-gw"`: the `BackendType` twill advertises in its lease.
    pub fn backend_type(&self) -> &'static str {
        match self.backend {
            BackendConfig::Vxlan(_) => "vxlan",
            BackendConfig::HostGw => "host-gw",
        }
    }

    /// The VXLAN settings, when the backend is vxlan.
    pub fn vxlan(&self) -> Option<&VxlanConfig> {
        match &self.backend {
            BackendConfig::Vxlan(v) => Some(v),
            BackendConfig::HostGw => None,
        }
    }
}

/// `parseBackendType`: absent → "udp"; otherwise `Backend.Type` (Go-JSON).
fn parse_backend_type(backend: Option<&GoValue>) -> Result<String, ConfigError> {
    let Some(v) = backend else {
        return Ok("udp".to_string());
    };
    match v {
        GoValue::Null => Ok(String::new()),
        GoValue::Object(pairs) => {
            let mut ty = String::new();
            let mut saved = None;
            for (k, v) in pairs {
                if gocompat::fold_eq(k, "Type") {
                    match gocompat::decode_string(v, "", "Type") {
                        Ok(Some(s)) => ty = s,
                        Ok(None) => {}
                        Err(e) => {
                            saved.get_or_insert(e);
                        }
                    }
                }
            }
            match saved {
                Some(e) => Err(ConfigError::BackendDecode(e)),
                None => Ok(ty),
            }
        }
        other => Err(ConfigError::BackendDecode(TypeError::value(
            other.kind(),
            "struct { Type string }",
        ))),
    }
}

/// `parseVXLANConfig` with Go-JSON semantics, then twill's range checks.
fn parse_vxlan(backend: Option<&GoValue>) -> Result<VxlanConfig, ConfigError> {
    const S: &str = "VXLANConfig";
    let mut vni: i64 = i64::from(DEFAULT_VNI);
    let mut port: i64 = 0;
    let mut mtu: Option<i64> = None;
    let mut out = VxlanConfig::default();
    let mut saved: Option<TypeError> = None;
    let pairs: &[(String, GoValue)] = match backend {
        Some(GoValue::Object(p)) => p,
        Some(GoValue::Null) | None => &[],
        Some(other) => {
            return Err(ConfigError::VxlanType(TypeError::value(
                other.kind(),
                "vxlan.VXLANConfig",
            )))
        }
    };
    for (k, v) in pairs {
        let r: Result<(), TypeError> = if gocompat::fold_eq(k, "vni") {
            gocompat::decode_int(v, S, "vni", "int").map(|n| vni = n.unwrap_or(vni))
        } else if gocompat::fold_eq(k, "port") {
            gocompat::decode_int(v, S, "port", "int").map(|n| port = n.unwrap_or(port))
        } else if gocompat::fold_eq(k, "mtu") {
            gocompat::decode_int(v, S, "mtu", "int").map(|n| mtu = n.or(mtu))
        } else if gocompat::fold_eq(k, "gbp") {
            gocompat::decode_bool(v, S, "gbp").map(|b| out.gbp = b.unwrap_or(out.gbp))
        } else if gocompat::fold_eq(k, "learning") {
            gocompat::decode_bool(v, S, "learning")
                .map(|b| out.learning = b.unwrap_or(out.learning))
        } else if gocompat::fold_eq(k, "directRouting") {
            gocompat::decode_bool(v, S, "directRouting")
                .map(|b| out.direct_routing = b.unwrap_or(out.direct_routing))
        } else {
            Ok(())
        };
        if let Err(e) = r {
            saved.get_or_insert(e);
        }
    }
    if let Some(e) = saved {
        return Err(ConfigError::VxlanType(e));
    }
    out.vni = u32::try_from(vni)
        .ok()
        .filter(|v| *v <= MAX_VNI)
        .ok_or_else(|| ConfigError::VxlanRange {
            field: "VNI",
            message: format!("{vni} is out of range (0..={MAX_VNI})"),
        })?;
    out.port = u16::try_from(port).map_err(|_| ConfigError::VxlanRange {
        field: "Port",
        message: format!("{port} is out of range (0..=65535)"),
    })?;
    out.mtu = match mtu {
        None | Some(0) => None,
        Some(m) => Some(u32::try_from(m).map_err(|_| ConfigError::VxlanRange {
            field: "MTU",
            message: format!("{m} is out of range"),
        })?),
    };
    Ok(out)
}

fn value_err(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Value {
        field,
        message: message.into(),
    }
}

/// `ip.IP4Net.UnmarshalJSON`: `net.ParseCIDR` of the raw text with quotes trimmed; the result is
/// the network (host bits masked off), IPv6 CIDRs give `invalid IPv4 CIDR format`.
fn unmarshal_ip4net(v: &GoValue, field: &'static str) -> Result<Ipv4Net, ConfigError> {
    let raw = v.unmarshaler_text();
    match gocompat::parse_cidr(&raw) {
        Err(e) => Err(value_err(field, e)),
        Ok((ip, len)) => match ip {
            gocompat::GoIp::V4(a) if len <= 32 => {
                Ok(Ipv4Net::new(a, len).expect("len checked").trunc())
            }
            // IPv6 (and 4-in-6 with a /33+ mask, which Flannel turns into a nonsense IP4Net).
            _ => Err(value_err(field, "invalid IPv4 CIDR format")),
        },
    }
}

/// `ip.IP6Net.UnmarshalJSON`: `net.ParseCIDR`, masked. Flannel accepts an IPv4 CIDR here and
/// stores it as a v4-mapped network; twill rejects it (`invalid IPv6 CIDR format`).
fn unmarshal_ip6net(v: &GoValue, field: &'static str) -> Result<Ipv6Net, ConfigError> {
    let raw = v.unmarshaler_text();
    match gocompat::parse_cidr(&raw) {
        Err(e) => Err(value_err(field, e)),
        Ok((gocompat::GoIp::V6(a), len)) => Ok(Ipv6Net::new(a, len).expect("len checked").trunc()),
        Ok((gocompat::GoIp::V4(_), _)) => Err(value_err(field, "invalid IPv6 CIDR format")),
    }
}

/// `ip.ParseIP4` on the raw text: `invalid IP address format` / `invalid IPv4 address format`.
fn unmarshal_ip4(v: &GoValue, field: &'static str) -> Result<Ipv4Addr, ConfigError> {
    gocompat::parse_ip4(&v.unmarshaler_text()).map_err(|e| value_err(field, e))
}

/// `ip.ParseIP6` on the raw text: any IP (IPv4 becomes v4-mapped), else `invalid IP address format`.
fn unmarshal_ip6(v: &GoValue, field: &'static str) -> Result<Ipv6Addr, ConfigError> {
    gocompat::parse_ip6(&v.unmarshaler_text()).map_err(|e| value_err(field, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(json: &str) -> String {
        NetConfig::parse(json).unwrap_err().to_string()
    }

    fn check_err(json: &str) -> String {
        NetConfig::parse_and_check(json).unwrap_err().to_string()
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn kube_flannel_default_config() {
        let c = NetConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableNFTables":false,"Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert!(c.enable_ipv4);
        assert!(!c.enable_ipv6);
        assert!(!c.enable_nftables);
        assert_eq!(c.network, Some("10.244.0.0/16".parse().unwrap()));
        assert_eq!(c.subnet_len, 0);
        assert_eq!(c.subnet_min, None);
        assert_eq!(c.backend, BackendConfig::Vxlan(VxlanConfig::default()));
        assert_eq!(c.backend_type(), "vxlan");
        assert_eq!(c.vxlan().unwrap().vni, 1);
    }

    #[test]
    fn keys_are_case_insensitive_and_unknown_keys_ignored() {
        let c = NetConfig::parse(
            r#"{"network":"10.1.0.0/16","SUBNETLEN":26,"enableipv6":true,
                "ipv6network":"fc00::/48","Whatever":[1,2,{"x":null}],"BackendType":"udp",
                "backend":{"type":"VXLAN","vni":4,"PORT":4789,"Mtu":1400,"gbp":true,
                           "LEARNING":true,"directrouting":true,"Extra":1}}"#,
        )
        .unwrap();
        assert_eq!(c.network, Some("10.1.0.0/16".parse().unwrap()));
        assert_eq!(c.subnet_len, 26);
        assert!(c.enable_ipv6);
        assert_eq!(c.ipv6_network, Some("fc00::/48".parse().unwrap()));
        assert_eq!(
            c.backend,
            BackendConfig::Vxlan(VxlanConfig {
                vni: 4,
                port: 4789,
                mtu: Some(1400),
                gbp: true,
                learning: true,
                direct_routing: true
            })
        );
    }

    #[test]
    fn go_unicode_case_folding() {
        // Kelvin sign folds to K, long s to S (Go's foldName).
        assert!(gocompat::fold_eq("\u{212A}ind", "kind"));
        assert!(gocompat::fold_eq("\u{017F}ubnetLen", "SubnetLen"));
        assert!(!gocompat::fold_eq("SubnetLen2", "SubnetLen"));
        let c = NetConfig::parse(
            r#"{"Network":"10.0.0.0/8","\u017FubnetLen":20,"Backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_len, 20);
    }

    #[test]
    fn repeated_keys_last_wins() {
        let c = NetConfig::parse(
            r#"{"Network":"10.0.0.0/8","network":"10.9.0.0/16","Backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(c.network, Some("10.9.0.0/16".parse().unwrap()));
        let c = NetConfig::parse(
            r#"{"Network":"10.0.0.0/8","Backend":{"Type":"udp"},"backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(c.backend, BackendConfig::HostGw);
    }

    #[test]
    fn defaults_enable_ipv4_true_and_null_is_noop() {
        let c = NetConfig::parse(
            r#"{"EnableIPv4":null,"SubnetLen":null,"Backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        assert!(c.enable_ipv4);
        assert_eq!(c.subnet_len, 0);
        let c = NetConfig::parse(r#"{"EnableIPv4":false,"Backend":{"Type":"host-gw"}}"#).unwrap();
        assert!(!c.enable_ipv4);
    }

    #[test]
    fn type_mismatch_errors_name_field_go_style() {
        assert_eq!(
            parse_err(r#"{"SubnetLen":"24"}"#),
            "json: cannot unmarshal string into Go struct field Config.SubnetLen of type uint"
        );
        assert_eq!(
            parse_err(r#"{"SubnetLen":-1}"#),
            "json: cannot unmarshal number -1 into Go struct field Config.SubnetLen of type uint"
        );
        assert_eq!(
            parse_err(r#"{"IPv6SubnetLen":1.5}"#),
            "json: cannot unmarshal number 1.5 into Go struct field Config.IPv6SubnetLen of type uint"
        );
        assert_eq!(
            parse_err(r#"{"EnableIPv6":"true"}"#),
            "json: cannot unmarshal string into Go struct field Config.EnableIPv6 of type bool"
        );
        assert_eq!(
            parse_err(r#"{"enableipv4":1}"#),
            "json: cannot unmarshal number into Go struct field Config.EnableIPv4 of type bool"
        );
        assert_eq!(
            parse_err(r#"{"EnableNFTables":{}}"#),
            "json: cannot unmarshal object into Go struct field Config.EnableNFTables of type bool"
        );
        assert_eq!(
            parse_err(r#"{"SubnetLen":[24]}"#),
            "json: cannot unmarshal array into Go struct field Config.SubnetLen of type uint"
        );
        let e = NetConfig::parse(r#"{"SubnetLen":"24"}"#).unwrap_err();
        assert_eq!(e.field().as_deref(), Some("SubnetLen"));
    }

    #[test]
    fn first_type_error_reported_but_ip_errors_abort_first() {
        // Type errors are remembered; the first one wins.
        assert_eq!(
            parse_err(r#"{"EnableIPv6":1,"SubnetLen":"x"}"#),
            "json: cannot unmarshal number into Go struct field Config.EnableIPv6 of type bool"
        );
        // An IP parser error aborts decoding even after a remembered type error.
        assert_eq!(
            parse_err(r#"{"EnableIPv6":1,"Network":"bogus"}"#),
            "invalid CIDR address: bogus"
        );
    }

    #[test]
    fn top_level_not_an_object() {
        assert_eq!(
            parse_err("[]"),
            "json: cannot unmarshal array into Go value of type subnet.Config"
        );
        assert_eq!(
            parse_err(r#""x""#),
            "json: cannot unmarshal string into Go value of type subnet.Config"
        );
        // null decodes to the defaults: EnableIPv4, Backend absent → udp.
        assert_eq!(
            parse_err("null"),
            "twill does not implement backend type \"udp\" (twill supports: vxlan, host-gw)"
        );
    }

    #[test]
    fn malformed_json_names_position() {
        let e = NetConfig::parse("{\n  \"Network\": \"10.0.0.0/8\",\n  x\n}").unwrap_err();
        let ConfigError::Syntax(s) = &e else {
            panic!("{e:?}")
        };
        assert_eq!((s.line, s.column), (3, 3));
        assert_eq!(s.offset, 31);
        assert_eq!(
            &"{\n  \"Network\": \"10.0.0.0/8\",\n  x\n}"[s.offset..s.offset + 1],
            "x"
        );
        let msg = e.to_string();
        assert!(msg.contains("line 3, column 3 (byte offset 31)"), "{msg}");
        assert!(!msg.contains("at line 3 column 3"), "{msg}");
        let e = NetConfig::parse(r#"{"Network": "10.0.0.0/8""#).unwrap_err();
        assert!(e.to_string().contains("EOF"), "{e}");
        assert!(matches!(NetConfig::parse(""), Err(ConfigError::Syntax(_))));
        assert!(matches!(
            NetConfig::parse(r#"{"a":1} x"#),
            Err(ConfigError::Syntax(_))
        ));
    }

    #[test]
    fn network_parsing_errors_and_host_bits() {
        assert_eq!(
            parse_err(r#"{"Network":"10.0.0.0"}"#),
            "invalid CIDR address: 10.0.0.0"
        );
        assert_eq!(
            parse_err(r#"{"Network":"10.0.0.0/33"}"#),
            "invalid CIDR address: 10.0.0.0/33"
        );
        assert_eq!(
            parse_err(r#"{"Network":"fc00::/48"}"#),
            "invalid IPv4 CIDR format"
        );
        assert_eq!(parse_err(r#"{"Network":16}"#), "invalid CIDR address: 16");
        // Go quotes the number's own bytes, not its float64 text ("1" for 1.0).
        assert_eq!(parse_err(r#"{"Network":1.0}"#), "invalid CIDR address: 1.0");
        assert_eq!(
            parse_err(r#"{"Network":[1.0]}"#),
            "invalid CIDR address: [1.0]"
        );
        assert_eq!(
            parse_err(r#"{"Network":1e-7}"#),
            "invalid CIDR address: 1e-7"
        );
        assert_eq!(
            parse_err(r#"{"Network":null}"#),
            "invalid CIDR address: null"
        );
        assert_eq!(
            parse_err(r#"{"Network":"010.0.0.0/8"}"#),
            "invalid CIDR address: 010.0.0.0/8"
        );
        let e = NetConfig::parse(r#"{"Network":"x"}"#).unwrap_err();
        assert_eq!(e.field().as_deref(), Some("Network"));
        // net.ParseCIDR returns the network: host bits are masked off.
        let c = NetConfig::parse(r#"{"Network":"10.244.7.9/16","Backend":{"Type":"host-gw"}}"#)
            .unwrap();
        assert_eq!(c.network.unwrap().to_string(), "10.244.0.0/16");
        // dtoi accepts leading zeros in the mask.
        let c =
            NetConfig::parse(r#"{"Network":"10.0.0.0/08","Backend":{"Type":"host-gw"}}"#).unwrap();
        assert_eq!(c.network.unwrap().to_string(), "10.0.0.0/8");
        let c =
            NetConfig::parse(r#"{"IPv6Network":"fc00:0:0:1::5/48","Backend":{"Type":"host-gw"}}"#)
                .unwrap();
        assert_eq!(c.ipv6_network.unwrap().to_string(), "fc00::/48");
        assert_eq!(
            parse_err(r#"{"IPv6Network":"10.0.0.0/8"}"#),
            "invalid IPv6 CIDR format"
        );
        assert_eq!(
            parse_err(r#"{"IPv6Network":"fc00::"}"#),
            "invalid CIDR address: fc00::"
        );
    }

    #[test]
    fn subnet_min_max_parsing() {
        assert_eq!(
            parse_err(r#"{"SubnetMin":"x"}"#),
            "invalid IP address format"
        );
        assert_eq!(
            parse_err(r#"{"SubnetMax":"fc00::1"}"#),
            "invalid IPv4 address format"
        );
        assert_eq!(
            parse_err(r#"{"SubnetMin":null}"#),
            "invalid IP address format"
        );
        assert_eq!(
            parse_err(r#"{"IPv6SubnetMin":"zz"}"#),
            "invalid IP address format"
        );
        let c = NetConfig::parse(
            r#"{"SubnetMin":"::ffff:10.0.5.0","IPv6SubnetMin":null,"IPv6SubnetMax":"10.0.0.1",
                "Backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_min, Some(v4("10.0.5.0")));
        assert_eq!(c.ipv6_subnet_min, None);
        assert_eq!(c.ipv6_subnet_max, Some(v6("::ffff:10.0.0.1")));
    }

    #[test]
    fn backend_selection() {
        // Absent Backend → "udp" (Flannel's code), which twill does not implement.
        assert_eq!(
            parse_err(r#"{"Network":"10.0.0.0/8"}"#),
            "twill does not implement backend type \"udp\" (twill supports: vxlan, host-gw)"
        );
        for t in UNSUPPORTED_FLANNEL_BACKENDS {
            let e = NetConfig::parse(&format!(r#"{{"Backend":{{"Type":"{t}"}}}}"#)).unwrap_err();
            assert_eq!(e, ConfigError::UnsupportedBackend(t.to_string()));
        }
        assert_eq!(
            parse_err(r#"{"Backend":{"Type":"WireGuard"}}"#),
            "twill does not implement backend type \"wireguard\" (twill supports: vxlan, host-gw)"
        );
        assert_eq!(
            parse_err(r#"{"Backend":{"Type":"Foo"}}"#),
            "unknown backend type: foo"
        );
        assert_eq!(parse_err(r#"{"Backend":{}}"#), "unknown backend type: ");
        assert_eq!(parse_err(r#"{"Backend":null}"#), "unknown backend type: ");
        assert_eq!(
            parse_err(r#"{"Backend":{"Type":null}}"#),
            "unknown backend type: "
        );
        assert_eq!(
            parse_err(r#"{"Backend":{"Type":5}}"#),
            "error decoding Backend property of config: json: cannot unmarshal number into Go struct field .Type of type string"
        );
        assert_eq!(
            parse_err(r#"{"Backend":"vxlan"}"#),
            "error decoding Backend property of config: json: cannot unmarshal string into Go value of type struct { Type string }"
        );
        let c = NetConfig::parse(r#"{"Backend":{"TYPE":"Host-GW","VNI":"ignored"}}"#).unwrap();
        assert_eq!(c.backend, BackendConfig::HostGw);
        assert_eq!(c.backend_type(), "host-gw");
        assert!(c.vxlan().is_none());
    }

    #[test]
    fn vxlan_keys_and_errors() {
        let c = NetConfig::parse(r#"{"Backend":{"Type":"vxlan","VNI":null,"MTU":0}}"#).unwrap();
        assert_eq!(c.vxlan().unwrap(), &VxlanConfig::default());
        assert_eq!(
            parse_err(r#"{"Backend":{"Type":"vxlan","VNI":"1"}}"#),
            "error decoding VXLAN backend config: json: cannot unmarshal string into Go struct field VXLANConfig.vni of type int"
        );
        assert_eq!(
            parse_err(r#"{"Backend":{"Type":"vxlan","Port":1.5}}"#),
            "error decoding VXLAN backend config: json: cannot unmarshal number 1.5 into Go struct field VXLANConfig.port of type int"
        );
        assert_eq!(
            parse_err(r#"{"Backend":{"Type":"vxlan","DirectRouting":"yes"}}"#),
            "error decoding VXLAN backend config: json: cannot unmarshal string into Go struct field VXLANConfig.directRouting of type bool"
        );
        assert_eq!(
            parse_err(r#"{"Backend":{"Type":"vxlan","GBP":1}}"#),
            "error decoding VXLAN backend config: json: cannot unmarshal number into Go struct field VXLANConfig.gbp of type bool"
        );
        assert_eq!(
            parse_err(r#"{"Backend":{"Type":"vxlan","Learning":[]}}"#),
            "error decoding VXLAN backend config: json: cannot unmarshal array into Go struct field VXLANConfig.learning of type bool"
        );
        assert_eq!(
            parse_err(r#"{"Backend":{"Type":"vxlan","mtu":{}}}"#),
            "error decoding VXLAN backend config: json: cannot unmarshal object into Go struct field VXLANConfig.mtu of type int"
        );
        assert_eq!(
            parse_err(r#"{"Backend":{"Type":"vxlan","VNI":16777216}}"#),
            "error decoding VXLAN backend config: VNI 16777216 is out of range (0..=16777215)"
        );
        assert_eq!(
            parse_err(r#"{"Backend":{"Type":"vxlan","VNI":-1}}"#),
            "error decoding VXLAN backend config: VNI -1 is out of range (0..=16777215)"
        );
        assert_eq!(
            parse_err(r#"{"Backend":{"Type":"vxlan","Port":65536}}"#),
            "error decoding VXLAN backend config: Port 65536 is out of range (0..=65535)"
        );
        assert_eq!(
            parse_err(r#"{"Backend":{"Type":"vxlan","MTU":-5}}"#),
            "error decoding VXLAN backend config: MTU -5 is out of range"
        );
        let e = NetConfig::parse(r#"{"Backend":{"Type":"vxlan","VNI":"1"}}"#).unwrap_err();
        assert_eq!(e.field().as_deref(), Some("vni"));
        let c =
            NetConfig::parse(r#"{"Backend":{"Type":"vxlan","VNI":16777215,"Port":8472}}"#).unwrap();
        assert_eq!(c.vxlan().unwrap().vni, MAX_VNI);
        assert_eq!(c.vxlan().unwrap().port, 8472);
    }

    #[test]
    fn check_defaults_v4() {
        let c =
            NetConfig::parse_and_check(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
                .unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Some(v4("10.244.1.0")));
        assert_eq!(c.subnet_max, Some(v4("10.244.255.0")));
        // /22 still gives /24
        let c =
            NetConfig::parse_and_check(r#"{"Network":"10.0.0.0/22","Backend":{"Type":"host-gw"}}"#)
                .unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Some(v4("10.0.1.0")));
        assert_eq!(c.subnet_max, Some(v4("10.0.3.0")));
        // /23 → /25; /28 → /30
        let c =
            NetConfig::parse_and_check(r#"{"Network":"10.0.0.0/23","Backend":{"Type":"host-gw"}}"#)
                .unwrap();
        assert_eq!(c.subnet_len, 25);
        assert_eq!(c.subnet_max, Some(v4("10.0.1.128")));
        let c =
            NetConfig::parse_and_check(r#"{"Network":"10.0.0.0/28","Backend":{"Type":"host-gw"}}"#)
                .unwrap();
        assert_eq!(c.subnet_len, 30);
        assert_eq!(c.subnet_min, Some(v4("10.0.0.4")));
        assert_eq!(c.subnet_max, Some(v4("10.0.0.12")));
        // Given SubnetLen and bounds; 0.0.0.0 means "not given".
        let c = NetConfig::parse_and_check(
            r#"{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0",
                "SubnetMax":"0.0.0.0","Backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_min, Some(v4("10.10.0.0")));
        assert_eq!(c.subnet_max, Some(v4("10.255.240.0")));
        // Top of the address space does not overflow.
        let c =
            NetConfig::parse_and_check(r#"{"Network":"128.0.0.0/1","Backend":{"Type":"host-gw"}}"#)
                .unwrap();
        assert_eq!(c.subnet_max, Some(v4("255.255.255.0")));
    }

    #[test]
    fn check_errors_v4() {
        let hg = r#""Backend":{"Type":"host-gw"}"#;
        let cases: &[(&str, &str)] = &[
            (
                "",
                "please define a correct Network parameter in the flannel config",
            ),
            (
                r#""Network":"0.0.0.0/0","#,
                "please define a correct Network parameter in the flannel config",
            ),
            (
                r#""Network":"10.0.0.0/8","SubnetLen":31,"#,
                "SubnetLen must be less than /31",
            ),
            (
                r#""Network":"10.0.0.0/16","SubnetLen":17,"#,
                "network must be able to accommodate at least four subnets",
            ),
            (
                r#""Network":"10.0.0.0/29","#,
                "network is too small. Minimum useful network prefix is /28",
            ),
            (
                r#""Network":"10.0.0.0/16","SubnetMin":"10.1.0.0","#,
                "SubnetMin is not in the range of the Network",
            ),
            (
                r#""Network":"10.0.0.0/16","SubnetMax":"11.0.0.0","#,
                "SubnetMax is not in the range of the Network",
            ),
            (
                r#""Network":"10.0.0.0/16","SubnetMin":"10.0.1.1","#,
                "SubnetMin is not on a SubnetLen boundary: 10.0.1.1",
            ),
            (
                r#""Network":"10.0.0.0/16","SubnetMax":"10.0.200.128","#,
                "SubnetMax is not on a SubnetLen boundary: 10.0.200.128",
            ),
        ];
        for (body, want) in cases {
            assert_eq!(&check_err(&format!("{{{body}{hg}}}")), want, "{body}");
        }
        // SubnetLen given: 30 is fine; /16 with 18 is fine (four subnets).
        assert!(NetConfig::parse_and_check(&format!(
            r#"{{"Network":"10.0.0.0/16","SubnetLen":18,{hg}}}"#
        ))
        .is_ok());
        // Large SubnetLen values saturate but still fail like Flannel.
        assert_eq!(
            check_err(&format!(
                r#"{{"Network":"10.0.0.0/8","SubnetLen":4294967296,{hg}}}"#
            )),
            "SubnetLen must be less than /31"
        );
        // EnableIPv4 false skips the v4 checks.
        assert!(NetConfig::parse_and_check(&format!(r#"{{"EnableIPv4":false,{hg}}}"#)).is_ok());
    }

    #[test]
    fn check_defaults_v6() {
        let c = NetConfig::parse_and_check(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:cafe:42::/56",
                "Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(c.ipv6_subnet_len, 64);
        assert_eq!(c.ipv6_subnet_min, Some(v6("2001:cafe:42:1::")));
        assert_eq!(c.ipv6_subnet_max, Some(v6("2001:cafe:42:ff::")));
        let c = NetConfig::parse_and_check(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/120",
                "Backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(c.ipv6_subnet_len, 122);
        assert_eq!(c.ipv6_subnet_min, Some(v6("fc00::40")));
        assert_eq!(c.ipv6_subnet_max, Some(v6("fc00::c0")));
        // /62 gives /64
        let c = NetConfig::parse_and_check(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/62",
                "IPv6SubnetMin":"::","Backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(c.ipv6_subnet_len, 64);
        assert_eq!(c.ipv6_subnet_min, Some(v6("fc00:0:0:1::")));
        assert_eq!(c.ipv6_subnet_max, Some(v6("fc00:0:0:3::")));
    }

    #[test]
    fn check_errors_v6() {
        let pre = r#""EnableIPv4":false,"EnableIPv6":true,"Backend":{"Type":"host-gw"}"#;
        let cases: &[(&str, &str)] = &[
            (
                "",
                "please define a correct IPv6Network parameter in the flannel config",
            ),
            (
                r#","IPv6Network":"::/0""#,
                "please define a correct IPv6Network parameter in the flannel config",
            ),
            (
                r#","IPv6Network":"fc00::/48","IPv6SubnetLen":127"#,
                "SubnetLen must be less than /127",
            ),
            (
                r#","IPv6Network":"fc00::/48","IPv6SubnetLen":49"#,
                "network must be able to accommodate at least four subnets",
            ),
            (
                r#","IPv6Network":"fc00::/125""#,
                "IPv6Network is too small. Minimum useful network prefix is /124",
            ),
            (
                r#","IPv6Network":"fc00::/48","IPv6SubnetMin":"fc01::""#,
                "IPv6SubnetMin is not in the range of the IPv6Network",
            ),
            (
                r#","IPv6Network":"fc00::/48","IPv6SubnetMax":"fd00::""#,
                "IPv6SubnetMax is not in the range of the IPv6Network",
            ),
            (
                r#","IPv6Network":"fc00::/48","IPv6SubnetMin":"fc00:0:0:1::1""#,
                "IPv6SubnetMin is not on a SubnetLen boundary: fc00:0:0:1::1",
            ),
            (
                r#","IPv6Network":"fc00::/48","IPv6SubnetMax":"fc00:0:0:ff:8000::""#,
                "IPv6SubnetMax is not on a SubnetLen boundary: fc00:0:0:ff:8000::",
            ),
        ];
        for (body, want) in cases {
            assert_eq!(&check_err(&format!("{{{pre}{body}}}")), want, "{body}");
        }
        // v4 errors come first in dual stack.
        assert_eq!(
            check_err(r#"{"EnableIPv6":true,"Backend":{"Type":"host-gw"}}"#),
            "please define a correct Network parameter in the flannel config"
        );
    }
}
