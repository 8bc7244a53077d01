//! Flannel's etcd lease format, byte for byte (`pkg/lease/lease.go`, `pkg/subnet/subnet.go`,
//! `pkg/subnet/etcd/registry.go`, `pkg/backend/vxlan/vxlan.go`), plus validation of peers' leases.
//!
//! Pure: no I/O, no clock.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use ipnet::{Ipv4Net, Ipv6Net};
use regex::Regex;

use crate::gocompat::{self, GoValue, SyntaxError, TypeError};
use crate::gojson;
use crate::mac::Mac;
use crate::net_conf::NetConfig;

/// Why a lease value, key or backend data could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("{0}")]
    Syntax(SyntaxError),
    /// Go `json.UnmarshalTypeError`.
    #[error("{0}")]
    Type(TypeError),
    /// A field's own parser failed (Go text, e.g. `invalid IP address format`); `field` names it.
    #[error("{message}")]
    Value {
        field: &'static str,
        message: String,
    },
    /// `kvToIPLease`: the etcd key does not name a subnet.
    #[error("failed to parse subnet key {0}")]
    NotASubnet(String),
}

impl LeaseError {
    /// The JSON field the error is about, when there is one.
    pub fn field(&self) -> Option<String> {
        match self {
            LeaseError::Type(t) => Some(t.field.clone()),
            LeaseError::Value { field, .. } => Some((*field).to_string()),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Subnet keys

/// The subnet part of an etcd key: `10.244.1.0-24` or `10.244.1.0-24&fc00:0:0:1::-64`.
/// Addresses are kept as written (not masked), as Flannel does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubnetKey {
    pub ipv4: Ipv4Net,
    pub ipv6: Option<Ipv6Net>,
}

impl SubnetKey {
    pub fn new(ipv4: Ipv4Net, ipv6: Option<Ipv6Net>) -> SubnetKey {
        SubnetKey { ipv4, ipv6 }
    }

    /// Flannel's `ParseSubnetKey`: the regex
    /// `(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$` (unanchored at the start, leftmost
    /// match), IPv4 prefix parsed with `ParseUint(.., 10, 5)` (so at most 31) and IPv6 prefix with
    /// `ParseUint(.., 10, 7)` (at most 127). `None` = "not a subnet".
    pub fn parse(s: &str) -> Option<SubnetKey> {
        let [g1, g2, g3, g4] = subnet_regex(s)?;
        let ip4 = gocompat::parse_ip(g1)?.to4()?;
        let len4 = parse_uint_bits(g2, 5)?;
        let ipv4 = Ipv4Net::new(ip4, len4).ok()?;
        let ipv6 = match g3 {
            "" => None,
            g3 => {
                let ip6 = gocompat::parse_ip(g3)?.to16();
                let len6 = parse_uint_bits(g4, 7)?;
                Some(Ipv6Net::new(ip6, len6).ok()?)
            }
        };
        Some(SubnetKey { ipv4, ipv6 })
    }

    /// Flannel's `EnableIPv6` for this lease: the key has a (non-empty) v6 part.
    pub fn has_ipv6(&self) -> bool {
        self.ipv6.is_some_and(|n| !ip6net_empty(n))
    }
}

fn ip6net_empty(n: Ipv6Net) -> bool {
    n.addr().is_unspecified() && n.prefix_len() == 0
}

/// `strconv.ParseUint(s, 10, bits)` for an all-digit string.
fn parse_uint_bits(s: &str, bits: u32) -> Option<u8> {
    let mut n: u64 = 0;
    for c in s.bytes() {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    if s.is_empty() || n >= 1 << bits {
        return None;
    }
    Some(n as u8)
}

/// Flannel's `subnetRegex`. `[0-9]` where Go writes `\d`: Go's `\d` is ASCII only, the regex
/// crate's is Unicode. Both engines report leftmost-first submatches in linear time, so a
/// garbage key in etcd costs microseconds, never a stalled watch.
fn subnet_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"([0-9]+\.[0-9]+.[0-9]+.[0-9]+)-([0-9]+)(?:&([a-f0-9:]+)-([0-9]+))?$")
            .expect("subnet regex")
    })
}

/// The four submatches of Flannel's subnet regex (group 3/4 empty when absent).
fn subnet_regex(s: &str) -> Option<[&str; 4]> {
    let caps = subnet_re().captures(s)?;
    let g = |i: usize| caps.get(i).map_or("", |m| m.as_str());
    Some([g(1), g(2), g(3), g(4)])
}

impl fmt::Display for SubnetKey {
    /// Flannel's `MakeSubnetKey`: `<ip>-<len>` and, when the v6 subnet is not empty,
    /// `&<ip6.String()>-<len>` (Go/Flannel IPv6 text, see [`gocompat::flannel_ip6_string`]).
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}-{}", self.ipv4.addr(), self.ipv4.prefix_len())?;
        if let Some(n6) = self.ipv6.filter(|n| !ip6net_empty(*n)) {
            write!(
                f,
                "&{}-{}",
                gocompat::flannel_ip6_string(n6.addr()),
                n6.prefix_len()
            )?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Key paths (Go `path.Join`)

/// Go `path.Clean`.
pub fn go_path_clean(p: &str) -> String {
    if p.is_empty() {
        return ".".to_string();
    }
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            c => parts.push(c),
        }
    }
    let body = parts.join("/");
    match (rooted, body.is_empty()) {
        (true, _) => format!("/{body}"),
        (false, true) => ".".to_string(),
        (false, false) => body,
    }
}

/// Go `path.Join`: non-empty elements joined by `/`, then cleaned; `""` when all are empty.
pub fn go_path_join(elems: &[&str]) -> String {
    let nonempty: Vec<&str> = elems.iter().copied().filter(|e| !e.is_empty()).collect();
    if nonempty.is_empty() {
        return String::new();
    }
    go_path_clean(&nonempty.join("/"))
}

/// `path.Join(prefix, "subnets")`: the etcd prefix Flannel lists (and watches) leases under.
pub fn subnets_prefix(prefix: &str) -> String {
    go_path_join(&[prefix, "subnets"])
}

/// `path.Join(prefix, "subnets", key)`.
pub fn subnet_key_path(prefix: &str, key: &SubnetKey) -> String {
    go_path_join(&[prefix, "subnets", &key.to_string()])
}

/// `path.Join(prefix, "config")`.
pub fn config_key_path(prefix: &str) -> String {
    go_path_join(&[prefix, "config"])
}

/// The subnet named by an etcd key found under [`subnets_prefix`]. Like Flannel, the regex runs
/// on the whole key; `None` = "not a subnet" (skipped).
pub fn parse_subnet_key_path(prefix: &str, path: &str) -> Option<SubnetKey> {
    if !path.starts_with(&subnets_prefix(prefix)) {
        return None;
    }
    SubnetKey::parse(path)
}

// ---------------------------------------------------------------------------------------------
// Lease attributes (the etcd value)

/// `lease.LeaseAttrs`. `backend_data`/`backend_v6_data` are Go `json.RawMessage`: `None` = absent
/// (omitted when written), `Some(Value::Null)` = a literal `null`.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseAttrs {
    pub public_ip: Ipv4Addr,
    pub public_ipv6: Option<Ipv6Addr>,
    pub backend_type: String,
    pub backend_data: Option<serde_json::Value>,
    pub backend_v6_data: Option<serde_json::Value>,
}

impl Default for LeaseAttrs {
    fn default() -> Self {
        LeaseAttrs {
            public_ip: Ipv4Addr::UNSPECIFIED,
            public_ipv6: None,
            backend_type: String::new(),
            backend_data: None,
            backend_v6_data: None,
        }
    }
}

const ATTRS_STRUCT: &str = "LeaseAttrs";

impl LeaseAttrs {
    /// Exactly Go's `json.Marshal(attrs)`: `PublicIP` always, `PublicIPv6` string or `null`,
    /// `BackendType`, `BackendData`, `BackendV6Data` omitted when empty.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(160);
        out.push_str("{\"PublicIP\":\"");
        out.push_str(&self.public_ip.to_string());
        out.push_str("\",\"PublicIPv6\":");
        match self.public_ipv6 {
            Some(a) => {
                out.push('"');
                out.push_str(&gocompat::flannel_ip6_string(a));
                out.push('"');
            }
            None => out.push_str("null"),
        }
        if !self.backend_type.is_empty() {
            out.push_str(",\"BackendType\":");
            gojson::encode_string(&self.backend_type, &mut out);
        }
        if let Some(d) = &self.backend_data {
            out.push_str(",\"BackendData\":");
            gojson::encode_value(d, &mut out);
        }
        if let Some(d) = &self.backend_v6_data {
            out.push_str(",\"BackendV6Data\":");
            gojson::encode_value(d, &mut out);
        }
        out.push('}');
        out
    }

    /// Go `json.Unmarshal` into `lease.LeaseAttrs` (case-insensitive keys, unknown ignored).
    pub fn from_json(bytes: &[u8]) -> Result<LeaseAttrs, LeaseError> {
        let root = gocompat::parse_bytes(bytes).map_err(LeaseError::Syntax)?;
        let mut a = LeaseAttrs::default();
        let pairs = match &root {
            GoValue::Null => return Ok(a),
            GoValue::Object(p) => p,
            other => {
                return Err(LeaseError::Type(TypeError::value(
                    other.kind(),
                    "lease.LeaseAttrs",
                )))
            }
        };
        let mut saved: Option<TypeError> = None;
        for (k, v) in pairs {
            if gocompat::fold_eq(k, "PublicIP") {
                a.public_ip =
                    gocompat::parse_ip4(&v.unmarshaler_text()).map_err(|m| LeaseError::Value {
                        field: "PublicIP",
                        message: m.to_string(),
                    })?;
            } else if gocompat::fold_eq(k, "PublicIPv6") {
                a.public_ipv6 = match v {
                    GoValue::Null => None,
                    v => Some(gocompat::parse_ip6(&v.unmarshaler_text()).map_err(|m| {
                        LeaseError::Value {
                            field: "PublicIPv6",
                            message: m.to_string(),
                        }
                    })?),
                };
            } else if gocompat::fold_eq(k, "BackendType") {
                match gocompat::decode_string(v, ATTRS_STRUCT, "BackendType") {
                    Ok(Some(s)) => a.backend_type = s,
                    Ok(None) => {}
                    Err(e) => {
                        saved.get_or_insert(e);
                    }
                }
            } else if gocompat::fold_eq(k, "BackendData") {
                a.backend_data = Some(v.to_value());
            } else if gocompat::fold_eq(k, "BackendV6Data") {
                a.backend_v6_data = Some(v.to_value());
            }
        }
        match saved {
            Some(e) => Err(LeaseError::Type(e)),
            None => Ok(a),
        }
    }
}

/// VXLAN `BackendData` (`vxlanLeaseAttrs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanBackendData {
    pub vni: u32,
    pub vtep_mac: Mac,
}

impl VxlanBackendData {
    /// `{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}`.
    pub fn to_json(&self) -> String {
        format!(r#"{{"VNI":{},"VtepMAC":"{}"}}"#, self.vni, self.vtep_mac)
    }

    /// The same object as a `serde_json::Value` (keys in Flannel's order), for `LeaseAttrs`.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::json!({"VNI": self.vni, "VtepMAC": self.vtep_mac.to_string()})
    }

    /// Go `json.Unmarshal` into `vxlanLeaseAttrs`; a missing `VtepMAC` is an error here (Flannel
    /// would go on with an empty MAC).
    pub fn from_json(v: &serde_json::Value) -> Result<VxlanBackendData, LeaseError> {
        const S: &str = "vxlanLeaseAttrs";
        let missing = || LeaseError::Value {
            field: "VtepMAC",
            message: "VtepMAC is missing".to_string(),
        };
        let g = GoValue::from_value(v);
        let pairs = match &g {
            GoValue::Null => return Err(missing()),
            GoValue::Object(p) => p,
            other => {
                return Err(LeaseError::Type(TypeError::value(
                    other.kind(),
                    "vxlan.vxlanLeaseAttrs",
                )))
            }
        };
        let mut vni = 0u32;
        let mut mac = None;
        let mut saved = None;
        for (k, v) in pairs {
            if gocompat::fold_eq(k, "VNI") {
                match gocompat::decode_uint(v, S, "VNI", "uint32") {
                    Ok(n) => vni = n.map_or(vni, |n| n as u32),
                    Err(e) => {
                        saved.get_or_insert(e);
                    }
                }
            } else if gocompat::fold_eq(k, "VtepMAC") {
                // hardwareAddr.UnmarshalJSON: must be a JSON string, then net.ParseMAC.
                let GoValue::String(s) = v else {
                    return Err(LeaseError::Value {
                        field: "VtepMAC",
                        message: "error parsing hardware addr".to_string(),
                    });
                };
                mac = Some(s.parse::<Mac>().map_err(|e| LeaseError::Value {
                    field: "VtepMAC",
                    message: e.to_string(),
                })?);
            }
        }
        if let Some(e) = saved {
            return Err(LeaseError::Type(e));
        }
        Ok(VxlanBackendData {
            vni,
            vtep_mac: mac.ok_or_else(missing)?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Leases

/// One subnet lease as read from etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub key: SubnetKey,
    pub attrs: LeaseAttrs,
    /// etcd lease ID; 0 = no lease = a reservation.
    pub etcd_lease_id: i64,
    /// Remaining TTL in seconds as reported by etcd `TimeToLive` (-1 when there is no lease).
    pub ttl_seconds: i64,
    /// etcd `ModRevision` of the key (Flannel's `Asof`).
    pub mod_revision: i64,
}

impl Lease {
    /// Flannel's `kvToIPLease` minus the clock: key and value of an etcd entry.
    pub fn from_kv(
        key: &str,
        value: &[u8],
        etcd_lease_id: i64,
        ttl_seconds: i64,
        mod_revision: i64,
    ) -> Result<Lease, LeaseError> {
        let k = SubnetKey::parse(key).ok_or_else(|| LeaseError::NotASubnet(key.to_string()))?;
        Ok(Lease {
            key: k,
            attrs: LeaseAttrs::from_json(value)?,
            etcd_lease_id,
            ttl_seconds,
            mod_revision,
        })
    }

    /// A subnet key without an etcd lease (`etcdctl put` without `--lease`).
    pub fn is_reservation(&self) -> bool {
        self.etcd_lease_id == 0
    }
}

/// A peer lease twill will not program, naming the key and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lease {key}: {field}: {reason}")]
pub struct InvalidLease {
    pub key: String,
    pub field: &'static str,
    pub reason: String,
}

/// What a valid peer lease gives the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerData {
    /// VXLAN data for the v4 device (vxlan backend, IPv4 enabled).
    pub vxlan: Option<VxlanBackendData>,
    /// VXLAN data for the v6 device (vxlan backend, the lease has a v6 subnet, IPv6 enabled).
    pub vxlan_v6: Option<VxlanBackendData>,
    /// Whether the v6 half of this lease is to be used.
    pub use_ipv6: bool,
}

fn bad_unicast_v4(a: Ipv4Addr) -> Option<&'static str> {
    if a.is_unspecified() {
        Some("is unspecified")
    } else if a.is_loopback() {
        Some("is a loopback address")
    } else if a.is_multicast() {
        Some("is a multicast address")
    } else if a.is_broadcast() {
        Some("is the broadcast address")
    } else {
        None
    }
}

fn bad_unicast_v6(a: Ipv6Addr) -> Option<&'static str> {
    if a.is_unspecified() {
        Some("is unspecified")
    } else if a.is_loopback() {
        Some("is a loopback address")
    } else if a.is_multicast() {
        Some("is a multicast address")
    } else if a.to_ipv4_mapped().is_some() {
        Some("is an IPv4-mapped address")
    } else {
        None
    }
}

/// Check a peer's lease against this node's config; errors name the key and the field. The
/// daemon skips such peers with a warning. Stricter than Flannel, which programs whatever it
/// is given (or ignores leases of another backend type, reported here as `BackendType`).
pub fn validate_peer(lease: &Lease, config: &NetConfig) -> Result<PeerData, InvalidLease> {
    let key = lease.key.to_string();
    let bad = |field: &'static str, reason: String| InvalidLease {
        key: key.clone(),
        field,
        reason,
    };
    let mut out = PeerData::default();
    if config.enable_ipv4 {
        let sn = lease.key.ipv4;
        if sn.addr() != sn.network() {
            return Err(bad("subnet", format!("{sn} has host bits set")));
        }
        if config.subnet_len != 0 && sn.prefix_len() != config.subnet_len {
            return Err(bad(
                "subnet",
                format!(
                    "prefix /{} does not match SubnetLen /{}",
                    sn.prefix_len(),
                    config.subnet_len
                ),
            ));
        }
        if let Some(net) = config.network {
            if !net.contains(&sn) {
                return Err(bad("subnet", format!("{sn} is outside Network {net}")));
            }
        }
        if let Some(why) = bad_unicast_v4(lease.attrs.public_ip) {
            return Err(bad("PublicIP", format!("{} {why}", lease.attrs.public_ip)));
        }
    }
    if let (true, Some(sn6)) = (
        config.enable_ipv6,
        lease.key.ipv6.filter(|_| lease.key.has_ipv6()),
    ) {
        if sn6.addr() != sn6.network() {
            return Err(bad("subnet", format!("{sn6} has host bits set")));
        }
        if config.ipv6_subnet_len != 0 && sn6.prefix_len() != config.ipv6_subnet_len {
            return Err(bad(
                "subnet",
                format!(
                    "IPv6 prefix /{} does not match IPv6SubnetLen /{}",
                    sn6.prefix_len(),
                    config.ipv6_subnet_len
                ),
            ));
        }
        if let Some(net) = config.ipv6_network {
            if !net.contains(&sn6) {
                return Err(bad("subnet", format!("{sn6} is outside IPv6Network {net}")));
            }
        }
        match lease.attrs.public_ipv6 {
            None => {
                return Err(bad(
                    "PublicIPv6",
                    "is missing for an IPv6 subnet".to_string(),
                ))
            }
            Some(a) => {
                if let Some(why) = bad_unicast_v6(a) {
                    return Err(bad("PublicIPv6", format!("{a} {why}")));
                }
            }
        }
        out.use_ipv6 = true;
    }
    let want = config.backend_type();
    if lease.attrs.backend_type != want {
        return Err(bad(
            "BackendType",
            format!("is {:?}, this node uses {want:?}", lease.attrs.backend_type),
        ));
    }
    if let Some(vx) = config.vxlan() {
        let check = |field: &'static str,
                     vni_field: &'static str,
                     mac_field: &'static str,
                     data: &Option<serde_json::Value>|
         -> Result<VxlanBackendData, InvalidLease> {
            let data = data
                .as_ref()
                .ok_or_else(|| bad(field, "is missing".to_string()))?;
            let d = VxlanBackendData::from_json(data).map_err(|e| {
                let f = match e.field().as_deref() {
                    Some("VNI") => vni_field,
                    Some("VtepMAC") => mac_field,
                    _ => field,
                };
                bad(f, e.to_string())
            })?;
            if d.vni != vx.vni {
                return Err(bad(
                    vni_field,
                    format!("{} does not match this node's VNI {}", d.vni, vx.vni),
                ));
            }
            if d.vtep_mac.is_zero() || d.vtep_mac.is_multicast() {
                return Err(bad(
                    mac_field,
                    format!("{} is not a unicast MAC", d.vtep_mac),
                ));
            }
            Ok(d)
        };
        if config.enable_ipv4 {
            out.vxlan = Some(check(
                "BackendData",
                "BackendData.VNI",
                "BackendData.VtepMAC",
                &lease.attrs.backend_data,
            )?);
        }
        if out.use_ipv6 {
            out.vxlan_v6 = Some(check(
                "BackendV6Data",
                "BackendV6Data.VNI",
                "BackendV6Data.VtepMAC",
                &lease.attrs.backend_v6_data,
            )?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> SubnetKey {
        SubnetKey::parse(s).unwrap_or_else(|| panic!("{s} should parse"))
    }

    #[test]
    fn subnet_key_roundtrip() {
        let k = key("10.244.1.0-24");
        assert_eq!(k.ipv4, "10.244.1.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(k.ipv6, None);
        assert_eq!(k.to_string(), "10.244.1.0-24");
        let k = key("10.244.1.0-24&fc00:0:0:1::-64");
        assert_eq!(k.ipv6, Some("fc00:0:0:1::/64".parse().unwrap()));
        assert!(k.has_ipv6());
        assert_eq!(k.to_string(), "10.244.1.0-24&fc00:0:0:1::-64");
        // Go's compressed form.
        let k = SubnetKey::new(
            "10.5.0.0/24".parse().unwrap(),
            Some("2001:db8:0:0:1:0:0:0/80".parse().unwrap()),
        );
        assert_eq!(k.to_string(), "10.5.0.0-24&2001:db8:0:0:1::-80");
        // An empty v6 net (::/0) is omitted like Flannel's IP6Net.Empty().
        let k = SubnetKey::new(
            "10.5.0.0/24".parse().unwrap(),
            Some("::/0".parse().unwrap()),
        );
        assert_eq!(k.to_string(), "10.5.0.0-24");
        assert!(!k.has_ipv6());
        // Host bits are kept, as Flannel does.
        assert_eq!(
            key("10.244.1.5-24").ipv4.addr(),
            "10.244.1.5".parse::<Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn subnet_key_follows_flannel_regex() {
        // Unanchored start: the whole etcd key parses.
        assert_eq!(
            key("/coreos.com/network/subnets/10.244.1.0-24").to_string(),
            "10.244.1.0-24"
        );
        assert_eq!(key("junk10.1.2.0-24").to_string(), "10.1.2.0-24");
        // Prefix length limits: ParseUint bit sizes 5 and 7.
        assert_eq!(key("10.0.0.0-31").ipv4.prefix_len(), 31);
        assert!(SubnetKey::parse("10.0.0.1-32").is_none());
        assert!(SubnetKey::parse("10.0.0.0-24&fc00::-128").is_none());
        assert_eq!(
            key("10.0.0.0-24&fc00::-127").ipv6.unwrap().prefix_len(),
            127
        );
        assert_eq!(key("10.0.0.0-024").ipv4.prefix_len(), 24);
        // Not subnets.
        for s in [
            "",
            "config",
            "10.244.1.0/24",
            "10.244.1.0-24/x",
            "10.244.1.0-",
            "10.244.1-24",
            "010.244.1.0-24",
            "10.244.1.256-24",
            "10.244.1.0-24&FC00::-64",
            "10.244.1.0-24&fc00::-",
            "10.244.1.0-24&:::-64",
            "10.244.1.0-99999999999999999999999",
        ] {
            assert!(SubnetKey::parse(s).is_none(), "{s:?}");
        }
        // `.` in the regex is any character; the IP parse then rejects it.
        assert!(SubnetKey::parse("10.244x1y0-24").is_none());
        // Leftmost match wins even when its IP does not parse (Go behaviour).
        assert!(SubnetKey::parse("1.2345.6.7.8-24").is_none());
        // v6 part optional: "&..." that does not match leaves the v4 match at the end only.
        assert!(SubnetKey::parse("10.0.0.0-24&zz-64").is_none());
        // Long garbage does not hang.
        let long = "1".repeat(5000);
        assert!(SubnetKey::parse(&long).is_none());
        // The fuzzer's find against the old hand-written backtracker (10 s for this key, from
        // digits that `\d+.\d+.\d+` can split in O(n^4) ways); also a seed of the lease_json
        // fuzz target, whose 10 s timeout guards the time.
        let garbage = format!(
            "\t{}.{}0{}2",
            "7".repeat(37),
            "7".repeat(200),
            "7".repeat(60)
        );
        assert!(SubnetKey::parse(&garbage).is_none());
        // Dashes give the backtracker more to try; the regex still finds the leftmost match.
        let dashes = format!("{}-{}10.1.2.0-24", "7.".repeat(200), "7-".repeat(200));
        assert_eq!(key(&dashes).to_string(), "10.1.2.0-24");
    }

    #[test]
    fn key_paths() {
        let k = key("10.244.1.0-24");
        assert_eq!(
            subnet_key_path("/coreos.com/network", &k),
            "/coreos.com/network/subnets/10.244.1.0-24"
        );
        assert_eq!(
            subnet_key_path("/coreos.com/network/", &k),
            "/coreos.com/network/subnets/10.244.1.0-24"
        );
        assert_eq!(
            subnet_key_path("//a//b/../c", &k),
            "/a/c/subnets/10.244.1.0-24"
        );
        assert_eq!(
            config_key_path("/coreos.com/network"),
            "/coreos.com/network/config"
        );
        assert_eq!(config_key_path(""), "config");
        assert_eq!(subnets_prefix("/x/"), "/x/subnets");
        assert_eq!(go_path_clean("a/../.."), "..");
        assert_eq!(go_path_clean("/../a/./b/"), "/a/b");
        assert_eq!(go_path_clean(""), ".");
        assert_eq!(go_path_join(&["", ""]), "");
        assert_eq!(
            parse_subnet_key_path(
                "/coreos.com/network",
                "/coreos.com/network/subnets/10.244.1.0-24"
            ),
            Some(k)
        );
        assert_eq!(
            parse_subnet_key_path("/coreos.com/network", "/other/subnets/10.244.1.0-24"),
            None
        );
        assert_eq!(
            parse_subnet_key_path("/coreos.com/network", "/coreos.com/network/subnets/junk"),
            None
        );
    }

    const V4_GOLDEN: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
    const DUAL_GOLDEN: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":"2001:db8::3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"},"BackendV6Data":{"VNI":1,"VtepMAC":"7a:11:22:33:44:55"}}"#;
    const HOSTGW_GOLDEN: &str =
        r#"{"PublicIP":"198.18.0.2","PublicIPv6":null,"BackendType":"host-gw"}"#;

    fn vx(mac: &str) -> VxlanBackendData {
        VxlanBackendData {
            vni: 1,
            vtep_mac: mac.parse().unwrap(),
        }
    }

    #[test]
    fn lease_attrs_golden_v4() {
        let a = LeaseAttrs {
            public_ip: "192.168.64.3".parse().unwrap(),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(vx("c6:d2:32:6f:8f:44").to_value()),
            backend_v6_data: None,
        };
        assert_eq!(a.to_json(), V4_GOLDEN);
        assert_eq!(LeaseAttrs::from_json(V4_GOLDEN.as_bytes()).unwrap(), a);
        assert_eq!(
            vx("c6:d2:32:6f:8f:44").to_json(),
            r#"{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}"#
        );
    }

    /// The lease's `BackendData` goes through the Go-JSON writer, whose number text is Go's
    /// `float64` text. The only numbers a lease twilld writes can carry are VXLAN VNIs (`u32`,
    /// exact in a float64), so its leases print every VNI as the integer Flannel writes, the
    /// same text `VxlanBackendData::to_json` formats directly.
    #[test]
    fn written_backend_data_prints_every_vni_as_an_integer() {
        for vni in [0, 1, 4096, crate::net_conf::MAX_VNI, u32::MAX] {
            let data = VxlanBackendData {
                vni,
                vtep_mac: "c6:d2:32:6f:8f:44".parse().unwrap(),
            };
            let a = LeaseAttrs {
                public_ip: "192.168.64.3".parse().unwrap(),
                backend_type: "vxlan".into(),
                backend_data: Some(data.to_value()),
                backend_v6_data: Some(data.to_value()),
                ..LeaseAttrs::default()
            };
            let text = data.to_json();
            assert!(text.starts_with(&format!("{{\"VNI\":{vni},")), "{text}");
            assert_eq!(
                a.to_json(),
                format!(
                    r#"{{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{text},"BackendV6Data":{text}}}"#
                )
            );
        }
    }

    #[test]
    fn lease_attrs_golden_dual_stack() {
        let a = LeaseAttrs {
            public_ip: "192.168.64.3".parse().unwrap(),
            public_ipv6: Some("2001:db8::3".parse().unwrap()),
            backend_type: "vxlan".into(),
            backend_data: Some(vx("c6:d2:32:6f:8f:44").to_value()),
            backend_v6_data: Some(vx("7a:11:22:33:44:55").to_value()),
        };
        assert_eq!(a.to_json(), DUAL_GOLDEN);
        let back = LeaseAttrs::from_json(DUAL_GOLDEN.as_bytes()).unwrap();
        assert_eq!(back, a);
        assert_eq!(
            VxlanBackendData::from_json(back.backend_v6_data.as_ref().unwrap()).unwrap(),
            vx("7a:11:22:33:44:55")
        );
    }

    #[test]
    fn lease_attrs_golden_host_gw_and_defaults() {
        let a = LeaseAttrs {
            public_ip: "198.18.0.2".parse().unwrap(),
            backend_type: "host-gw".into(),
            ..LeaseAttrs::default()
        };
        assert_eq!(a.to_json(), HOSTGW_GOLDEN);
        assert_eq!(LeaseAttrs::from_json(HOSTGW_GOLDEN.as_bytes()).unwrap(), a);
        assert_eq!(
            LeaseAttrs::default().to_json(),
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":null}"#
        );
        // A literal null RawMessage is kept and written back.
        let a = LeaseAttrs::from_json(br#"{"PublicIP":"1.2.3.4","BackendData":null}"#).unwrap();
        assert_eq!(a.backend_data, Some(serde_json::Value::Null));
        assert_eq!(
            a.to_json(),
            r#"{"PublicIP":"1.2.3.4","PublicIPv6":null,"BackendData":null}"#
        );
        assert_eq!(
            LeaseAttrs::from_json(b"null").unwrap(),
            LeaseAttrs::default()
        );
    }

    #[test]
    fn lease_attrs_go_json_decoding() {
        let a = LeaseAttrs::from_json(
            br#"{ "publicip": "10.0.0.1", "PUBLICIPV6": "fc00::1", "backendtype": "vxlan",
                  "backenddata": {"vni": 2, "vtepmac": "aa:bb:cc:dd:ee:ff"}, "Other": 1 }"#,
        )
        .unwrap();
        assert_eq!(a.public_ip, "10.0.0.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(a.public_ipv6, Some("fc00::1".parse().unwrap()));
        assert_eq!(a.backend_type, "vxlan");
        let d = VxlanBackendData::from_json(a.backend_data.as_ref().unwrap()).unwrap();
        assert_eq!(d.vni, 2);
        assert_eq!(d.vtep_mac.to_string(), "aa:bb:cc:dd:ee:ff");
        // Flannel's IP4 accepts a v4-mapped IPv6 text; IP6 accepts IPv4 (v4-mapped).
        let a = LeaseAttrs::from_json(br#"{"PublicIP":"::ffff:10.0.0.2","PublicIPv6":"10.0.0.3"}"#)
            .unwrap();
        assert_eq!(a.public_ip, "10.0.0.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(a.public_ipv6, Some("::ffff:10.0.0.3".parse().unwrap()));
        assert_eq!(
            a.to_json(),
            r#"{"PublicIP":"10.0.0.2","PublicIPv6":"10.0.0.3"}"#
        );
    }

    #[test]
    fn lease_attrs_errors() {
        let err = |s: &str| LeaseAttrs::from_json(s.as_bytes()).unwrap_err();
        assert_eq!(
            err(r#"{"PublicIP":"x"}"#).to_string(),
            "invalid IP address format"
        );
        assert_eq!(
            err(r#"{"PublicIP":"x"}"#).field().as_deref(),
            Some("PublicIP")
        );
        assert_eq!(
            err(r#"{"PublicIP":"fc00::1"}"#).to_string(),
            "invalid IPv4 address format"
        );
        assert_eq!(
            err(r#"{"PublicIP":null}"#).to_string(),
            "invalid IP address format"
        );
        assert_eq!(
            err(r#"{"PublicIPv6":"zz"}"#).to_string(),
            "invalid IP address format"
        );
        assert_eq!(
            err(r#"{"BackendType":1}"#).to_string(),
            "json: cannot unmarshal number into Go struct field LeaseAttrs.BackendType of type string"
        );
        assert_eq!(
            err("[1]").to_string(),
            "json: cannot unmarshal array into Go value of type lease.LeaseAttrs"
        );
        let e = err("{\"PublicIP\":");
        assert!(matches!(e, LeaseError::Syntax(_)), "{e:?}");
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn vxlan_backend_data_errors() {
        let err = |v: serde_json::Value| VxlanBackendData::from_json(&v).unwrap_err();
        let e = err(serde_json::json!({"VNI": "1", "VtepMAC": "aa:bb:cc:dd:ee:ff"}));
        assert_eq!(
            e.to_string(),
            "json: cannot unmarshal string into Go struct field vxlanLeaseAttrs.VNI of type uint32"
        );
        assert_eq!(e.field().as_deref(), Some("VNI"));
        assert_eq!(
            err(serde_json::json!({"VNI": 4294967296u64, "VtepMAC": "aa:bb:cc:dd:ee:ff"}))
                .to_string(),
            "json: cannot unmarshal number 4294967296 into Go struct field vxlanLeaseAttrs.VNI of type uint32"
        );
        assert_eq!(
            err(serde_json::json!({"VNI": 1, "VtepMAC": 5})).to_string(),
            "error parsing hardware addr"
        );
        assert_eq!(
            err(serde_json::json!({"VNI": 1, "VtepMAC": "zz"})).to_string(),
            "address zz: invalid MAC address"
        );
        assert_eq!(
            err(serde_json::json!({"VNI": 1})).to_string(),
            "VtepMAC is missing"
        );
        assert_eq!(
            err(serde_json::Value::Null).field().as_deref(),
            Some("VtepMAC")
        );
        assert_eq!(
            err(serde_json::json!("x")).to_string(),
            "json: cannot unmarshal string into Go value of type vxlan.vxlanLeaseAttrs"
        );
    }

    #[test]
    fn lease_from_kv() {
        let l = Lease::from_kv(
            "/coreos.com/network/subnets/10.244.1.0-24",
            V4_GOLDEN.as_bytes(),
            0x1234,
            86000,
            7,
        )
        .unwrap();
        assert_eq!(l.key.to_string(), "10.244.1.0-24");
        assert!(!l.is_reservation());
        let r = Lease::from_kv(
            "/x/subnets/10.244.2.0-24",
            HOSTGW_GOLDEN.as_bytes(),
            0,
            -1,
            1,
        )
        .unwrap();
        assert!(r.is_reservation());
        assert_eq!(
            Lease::from_kv("/x/subnets/bogus", b"{}", 0, -1, 1)
                .unwrap_err()
                .to_string(),
            "failed to parse subnet key /x/subnets/bogus"
        );
    }

    fn cfg(json: &str) -> NetConfig {
        NetConfig::parse_and_check(json).unwrap()
    }

    fn lease(k: &str, attrs: &str) -> Lease {
        Lease::from_kv(k, attrs.as_bytes(), 1, 100, 1).unwrap()
    }

    #[test]
    fn validate_peer_accepts_good_leases() {
        let c = cfg(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
        let p = validate_peer(&lease("10.244.7.0-24", V4_GOLDEN), &c).unwrap();
        assert_eq!(p.vxlan, Some(vx("c6:d2:32:6f:8f:44")));
        assert_eq!(p.vxlan_v6, None);
        assert!(!p.use_ipv6);
        let c = cfg(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:1::/48",
                "Backend":{"Type":"vxlan"}}"#,
        );
        let p = validate_peer(&lease("10.244.7.0-24&2001:db8:1:7::-64", DUAL_GOLDEN), &c).unwrap();
        assert!(p.use_ipv6);
        assert_eq!(p.vxlan_v6, Some(vx("7a:11:22:33:44:55")));
        // A v4-only peer in a dual-stack cluster is fine.
        let p = validate_peer(&lease("10.244.7.0-24", V4_GOLDEN), &c).unwrap();
        assert!(!p.use_ipv6);
        let c = cfg(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#);
        assert_eq!(
            validate_peer(&lease("10.244.7.0-24", HOSTGW_GOLDEN), &c).unwrap(),
            PeerData::default()
        );
    }

    #[test]
    fn validate_peer_rejects_impossible_values() {
        let c = cfg(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:1::/48",
                "Backend":{"Type":"vxlan","VNI":1}}"#,
        );
        let check = |k: &str, attrs: &str, field: &str, reason_part: &str| {
            let e = validate_peer(&lease(k, attrs), &c).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.reason.contains(reason_part), "{e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("lease {}: {field}: ", e.key)),
                "{e}"
            );
        };
        let vxd = r#""BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}"#;
        let pip = |ip: &str| format!(r#"{{"PublicIP":"{ip}",{vxd}}}"#);
        check(
            "10.244.7.0-25",
            &pip("198.18.0.2"),
            "subnet",
            "SubnetLen /24",
        );
        check(
            "10.245.7.0-24",
            &pip("198.18.0.2"),
            "subnet",
            "outside Network 10.244.0.0/16",
        );
        check("10.244.7.9-24", &pip("198.18.0.2"), "subnet", "host bits");
        check("10.244.7.0-24", &pip("0.0.0.0"), "PublicIP", "unspecified");
        check("10.244.7.0-24", &pip("127.0.0.1"), "PublicIP", "loopback");
        check("10.244.7.0-24", &pip("224.0.0.5"), "PublicIP", "multicast");
        check(
            "10.244.7.0-24",
            &pip("255.255.255.255"),
            "PublicIP",
            "broadcast",
        );
        check(
            "10.244.7.0-24",
            r#"{"PublicIP":"198.18.0.2","BackendType":"host-gw"}"#,
            "BackendType",
            r#"is "host-gw", this node uses "vxlan""#,
        );
        check(
            "10.244.7.0-24",
            r#"{"PublicIP":"198.18.0.2","BackendType":"vxlan"}"#,
            "BackendData",
            "is missing",
        );
        check(
            "10.244.7.0-24",
            r#"{"PublicIP":"198.18.0.2","BackendType":"vxlan","BackendData":{"VNI":2,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
            "BackendData.VNI",
            "does not match this node's VNI 1",
        );
        check(
            "10.244.7.0-24",
            r#"{"PublicIP":"198.18.0.2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#,
            "BackendData.VtepMAC",
            "invalid MAC address",
        );
        check(
            "10.244.7.0-24",
            r#"{"PublicIP":"198.18.0.2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"01:00:5e:00:00:01"}}"#,
            "BackendData.VtepMAC",
            "not a unicast MAC",
        );
        check(
            "10.244.7.0-24",
            r#"{"PublicIP":"198.18.0.2","BackendType":"vxlan","BackendData":{"VNI":1}}"#,
            "BackendData.VtepMAC",
            "missing",
        );
        // IPv6 half.
        check(
            "10.244.7.0-24&2001:db8:1:7::-64",
            &pip("198.18.0.2"),
            "PublicIPv6",
            "missing",
        );
        check(
            "10.244.7.0-24&2001:db8:2:7::-64",
            &pip("198.18.0.2"),
            "subnet",
            "outside IPv6Network",
        );
        check(
            "10.244.7.0-24&2001:db8:1:7::-80",
            &pip("198.18.0.2"),
            "subnet",
            "IPv6SubnetLen /64",
        );
        check(
            "10.244.7.0-24&2001:db8:1:7::1-64",
            &pip("198.18.0.2"),
            "subnet",
            "host bits",
        );
        let v6attrs = |ip6: &str, v6data: &str| {
            format!(r#"{{"PublicIP":"198.18.0.2","PublicIPv6":"{ip6}",{vxd}{v6data}}}"#)
        };
        check(
            "10.244.7.0-24&2001:db8:1:7::-64",
            &v6attrs("::1", ""),
            "PublicIPv6",
            "loopback",
        );
        check(
            "10.244.7.0-24&2001:db8:1:7::-64",
            &v6attrs("ff02::1", ""),
            "PublicIPv6",
            "multicast",
        );
        check(
            "10.244.7.0-24&2001:db8:1:7::-64",
            &v6attrs("10.1.1.1", ""),
            "PublicIPv6",
            "IPv4-mapped",
        );
        check(
            "10.244.7.0-24&2001:db8:1:7::-64",
            &v6attrs("2001:db8::9", ""),
            "BackendV6Data",
            "is missing",
        );
        check(
            "10.244.7.0-24&2001:db8:1:7::-64",
            &v6attrs(
                "2001:db8::9",
                r#","BackendV6Data":{"VNI":3,"VtepMAC":"c6:d2:32:6f:8f:44"}"#,
            ),
            "BackendV6Data.VNI",
            "does not match",
        );
    }
}
