//! Flannel's plugin config, and the delegate config built from it exactly as
//! `flannel-io/cni-plugin` does (`doCmdAdd` / `getDelegateIPAM`).

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde_json::{json, Map, Value};

use crate::error::{code, CniError};
use crate::validate;
use twill_formats::subnet_env::SubnetEnv;

pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";
pub const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";

/// The `flannel` plugin's network config (one entry of a conflist, as the runtime passes it).
#[derive(Debug, Clone, PartialEq)]
pub struct FlannelConf {
    pub name: String,
    pub cni_version: String,
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
    pub delegate: Option<Map<String, Value>>,
    pub ipam: Option<Map<String, Value>>,
    pub runtime_config: Option<Map<String, Value>>,
    /// The whole input, for keys such as `prevResult` and `cni.dev/valid-attachments`.
    pub raw: Map<String, Value>,
}

fn decode_err(msg: String) -> CniError {
    CniError::new(
        code::DECODE_FAILURE,
        format!("failed to load netconf: {msg}"),
    )
}

fn opt_object(raw: &Map<String, Value>, key: &str) -> Result<Option<Map<String, Value>>, CniError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m.clone())),
        Some(v) => Err(decode_err(format!("{key:?} must be an object, got {v}"))),
    }
}

fn opt_string(raw: &Map<String, Value>, key: &str) -> Result<Option<String>, CniError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(decode_err(format!("{key:?} must be a string, got {v}"))),
    }
}

impl FlannelConf {
    /// Decode the stdin config. Type errors are decode failures (code 6).
    pub fn parse(bytes: &[u8]) -> Result<FlannelConf, CniError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| decode_err(e.to_string()))?;
        let Value::Object(raw) = v else {
            return Err(decode_err("config is not a JSON object".into()));
        };
        let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
        Ok(FlannelConf {
            name: opt_string(&raw, "name")?.unwrap_or_default(),
            cni_version: opt_string(&raw, "cniVersion")?.unwrap_or_default(),
            subnet_file: nonempty(opt_string(&raw, "subnetFile")?)
                .unwrap_or_else(|| DEFAULT_SUBNET_FILE.into())
                .into(),
            data_dir: nonempty(opt_string(&raw, "dataDir")?)
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into())
                .into(),
            delegate: opt_object(&raw, "delegate")?,
            ipam: opt_object(&raw, "ipam")?,
            runtime_config: opt_object(&raw, "runtimeConfig")?,
            raw,
        })
    }

    /// Flannel's checks on `delegate`, plus a safe plugin name (CVE-2021-20206).
    pub fn validate_delegate(&self) -> Result<(), CniError> {
        let Some(d) = &self.delegate else {
            return Ok(());
        };
        match d.get("type") {
            None => {}
            Some(Value::String(t)) => validate::plugin_type(t)?,
            Some(v) => {
                return Err(CniError::new(
                    code::INVALID_NETWORK_CONFIG,
                    "'delegate' dictionary, if present, must have (string) 'type' field",
                )
                .with_details(format!("delegate.type = {v}")))
            }
        }
        for key in ["name", "ipam"] {
            if let Some(v) = d.get(key) {
                return Err(CniError::new(
                    code::UNSUPPORTED_FIELD,
                    format!("'delegate' dictionary must not have '{key}' field, it'll be set by flannel"),
                )
                .with_details(format!("delegate.{key} = {v}")));
            }
        }
        Ok(())
    }

    /// Build the delegate config (Flannel's ADD step 3). `env` must be complete
    /// (`SubnetEnv::missing()` empty).
    pub fn delegate_config(&self, env: &SubnetEnv) -> Result<Map<String, Value>, CniError> {
        self.validate_delegate()?;
        let mut d = self.delegate.clone().unwrap_or_default();
        if let Some(rc) = &self.runtime_config {
            d.insert("runtimeConfig".into(), Value::Object(rc.clone()));
        }
        d.insert("name".into(), Value::String(self.name.clone()));
        if !d.contains_key("type") {
            d.insert("type".into(), json!("bridge"));
        }
        if !d.contains_key("ipMasq") {
            // If flannel is not masquerading, the bridge should.
            d.insert("ipMasq".into(), json!(!env.ipmasq.unwrap_or(false)));
        }
        if !d.contains_key("mtu") {
            d.insert("mtu".into(), json!(env.mtu));
        }
        if d.get("type") == Some(&json!("bridge")) && !d.contains_key("isGateway") {
            d.insert("isGateway".into(), json!(true));
        }
        if !self.cni_version.is_empty() {
            d.insert("cniVersion".into(), json!(self.cni_version));
        }
        d.insert("ipam".into(), Value::Object(self.delegate_ipam(env)?));
        Ok(d)
    }

    fn delegate_ipam(&self, env: &SubnetEnv) -> Result<Map<String, Value>, CniError> {
        let mut ipam = self.ipam.clone().unwrap_or_default();
        if !ipam.contains_key("type") {
            ipam.insert("type".into(), json!("host-local"));
        }
        let mut ranges = Vec::new();
        if let Some(sn) = env.subnet_network() {
            ranges.push(json!([{"subnet": sn.to_string()}]));
        }
        if let Some(sn) = env.ipv6_subnet_network() {
            ranges.push(json!([{"subnet": sn.to_string()}]));
        }
        ipam.insert("ranges".into(), Value::Array(ranges));

        let mut routes = match ipam.get("routes") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(normalize_route)
                .collect::<Result<Vec<_>, RouteError>>()
                .map_err(|e| {
                    CniError::new(
                        code::INVALID_NETWORK_CONFIG,
                        format!("failed to assemble Delegate IPAM: failed to read IPAM routes: failed to parse ipam.routes: {e}"),
                    )
                })?,
            Some(v) => {
                return Err(CniError::new(
                    code::INVALID_NETWORK_CONFIG,
                    format!("failed to assemble Delegate IPAM: failed to read IPAM routes: failed to parse ipam.routes: not a list: {v}"),
                ))
            }
        };
        for n in &env.networks {
            routes.push(route_dst(n.to_string()));
        }
        for n in &env.ipv6_networks {
            routes.push(route_dst(n.to_string()));
        }
        ipam.insert("routes".into(), Value::Array(routes));
        Ok(ipam)
    }
}

fn route_dst(dst: String) -> Value {
    let mut m = Map::new();
    m.insert("dst".into(), Value::String(dst));
    Value::Object(m)
}

/// Why an `ipam.routes` entry cannot be re-encoded.
#[derive(Debug, thiserror::Error)]
enum RouteError {
    #[error("route {0} is not an object")]
    NotAnObject(Value),
    #[error("route {0} has no string \"dst\"")]
    NoDst(Value),
    #[error("route dst {dst:?}: {error}")]
    Dst {
        dst: String,
        error: ipnet::AddrParseError,
    },
    #[error("route gw {0} is not a string")]
    GwNotString(Value),
    #[error("route gw {gw:?}: {error}")]
    Gw {
        gw: String,
        error: std::net::AddrParseError,
    },
    #[error("route {field} {value} is not a number")]
    NotANumber { field: &'static str, value: Value },
    #[error("route {field} {value} is not an integer")]
    NotAnInteger { field: &'static str, value: Value },
}

/// Re-encode one input route the way Go's `types.Route` round-trips it: known fields only,
/// in struct order `dst, gw, mtu, advmss, priority, table, scope`, zero ints omitted.
fn normalize_route(v: &Value) -> Result<Value, RouteError> {
    let Value::Object(r) = v else {
        return Err(RouteError::NotAnObject(v.clone()));
    };
    let dst = r
        .get("dst")
        .and_then(Value::as_str)
        .ok_or_else(|| RouteError::NoDst(v.clone()))?;
    let net: IpNet = dst.parse().map_err(|error| RouteError::Dst {
        dst: dst.to_string(),
        error,
    })?;
    let mut out = Map::new();
    out.insert("dst".into(), Value::String(net.to_string()));
    if let Some(gw) = r.get("gw").filter(|g| !g.is_null()) {
        let s = gw
            .as_str()
            .ok_or_else(|| RouteError::GwNotString(gw.clone()))?;
        let ip: IpAddr = s.parse().map_err(|error| RouteError::Gw {
            gw: s.to_string(),
            error,
        })?;
        out.insert("gw".into(), Value::String(ip.to_string()));
    }
    let int = |k: &'static str| -> Result<Option<i64>, RouteError> {
        match r.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => {
                let f = x.as_f64().ok_or_else(|| RouteError::NotANumber {
                    field: k,
                    value: x.clone(),
                })?;
                if f.fract() != 0.0 {
                    return Err(RouteError::NotAnInteger {
                        field: k,
                        value: x.clone(),
                    });
                }
                Ok(Some(f as i64))
            }
        }
    };
    for k in ["mtu", "advmss", "priority"] {
        if let Some(n) = int(k)?.filter(|n| *n != 0) {
            out.insert(k.into(), json!(n));
        }
    }
    for k in ["table", "scope"] {
        if let Some(n) = int(k)? {
            out.insert(k.into(), json!(n));
        }
    }
    Ok(Value::Object(out))
}

/// Give gateway-less routes in a prevResult the gateway of their family's IP config.
///
/// Flannel's IPAM routes carry no `gw`, so host-local reports them without one, while the
/// bridge plugin installs them via the bridge gateway. The reference bridge's CHECK then looks
/// for a kernel route with no gateway and never finds it. The delegate's CHECK gets a
/// prevResult that names the gateway the route really uses, so CHECK still verifies every route.
pub fn fill_route_gateways(prev: &mut Value) {
    let gw_of = |v6: bool| -> Option<Value> {
        prev.get("ips")?.as_array()?.iter().find_map(|ip| {
            let addr = ip.get("address")?.as_str()?;
            let gw = ip.get("gateway")?.as_str()?;
            (addr.contains(':') == v6).then(|| Value::String(gw.to_string()))
        })
    };
    let (gw4, gw6) = (gw_of(false), gw_of(true));
    let Some(Value::Array(routes)) = prev.get_mut("routes") else {
        return;
    };
    for r in routes.iter_mut().filter_map(Value::as_object_mut) {
        if r.get("gw").is_some_and(|g| !g.is_null()) {
            continue;
        }
        let v6 = match r.get("dst").and_then(Value::as_str) {
            Some(d) => d.contains(':'),
            None => continue,
        };
        if let Some(gw) = if v6 { &gw6 } else { &gw4 } {
            r.insert("gw".into(), gw.clone());
        }
    }
}

/// The container IDs listed in `cni.dev/valid-attachments` (GC input). `None` if the key is
/// absent or malformed.
pub fn valid_attachment_ids(raw: &Map<String, Value>) -> Option<Vec<String>> {
    let list = raw.get(VALID_ATTACHMENTS)?.as_array()?;
    list.iter()
        .map(|a| {
            a.get("containerID")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .collect()
}

/// Names under dataDir that GC removes: well-formed container IDs not in `valid`.
pub fn gc_stale<'a>(entries: &'a [String], valid: &[String]) -> Vec<&'a str> {
    entries
        .iter()
        .filter(|e| validate::container_id(e).is_ok() && !valid.contains(e))
        .map(String::as_str)
        .collect()
}

/// Convert a plugin Result to `target` spec version, if needed. 0.3.x/0.4.0 IP configs carry
/// `"version":"4"|"6"`; 1.x dropped it. Everything else is the same shape.
pub fn convert_result(result: &[u8], target: &str) -> Result<Vec<u8>, CniError> {
    let mut v: Value = serde_json::from_slice(result).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            format!("failed to decode delegate result: {e}"),
        )
    })?;
    let Some(obj) = v.as_object_mut() else {
        return Err(CniError::new(
            code::DECODE_FAILURE,
            "delegate result is not a JSON object",
        ));
    };
    if obj.get("cniVersion").and_then(Value::as_str) == Some(target) {
        return Ok(result.to_vec());
    }
    let legacy = !validate::version_at_least(target, "1.0.0");
    if let Some(Value::Array(ips)) = obj.get_mut("ips") {
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            if legacy {
                let fam = ip.get("address").and_then(Value::as_str).map(|a| {
                    if a.contains(':') {
                        "6"
                    } else {
                        "4"
                    }
                });
                if let (Some(f), false) = (fam, ip.contains_key("version")) {
                    ip.insert("version".into(), json!(f));
                }
            } else {
                ip.remove("version");
            }
        }
    }
    obj.insert("cniVersion".into(), json!(target));
    Ok(serde_json::to_vec(&v).expect("serializing a Value cannot fail"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use twill_formats::gojson;

    const DEFAULT_PLUGIN: &str = r#"{"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true},"name":"cbr0","cniVersion":"0.3.1"}"#;

    fn env(text: &str) -> SubnetEnv {
        SubnetEnv::parse(text).unwrap()
    }
    const V4: &str =
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    fn build(conf: &str, env_text: &str) -> Result<String, CniError> {
        let c = FlannelConf::parse(conf.as_bytes())?;
        Ok(gojson::to_string(&Value::Object(
            c.delegate_config(&env(env_text))?,
        )))
    }

    #[test]
    fn golden_default_conflist() {
        assert_eq!(
            build(DEFAULT_PLUGIN, V4).unwrap(),
            r#"{"cniVersion":"0.3.1","hairpinMode":true,"ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}],"type":"host-local"},"isDefaultGateway":true,"isGateway":true,"mtu":1450,"name":"cbr0","type":"bridge"}"#
        );
    }

    #[test]
    fn golden_dual_stack() {
        let e = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";
        assert_eq!(
            build(DEFAULT_PLUGIN, e).unwrap(),
            r#"{"cniVersion":"0.3.1","hairpinMode":true,"ipMasq":true,"ipam":{"ranges":[[{"subnet":"10.244.1.0/24"}],[{"subnet":"2001:cafe:42:1::/64"}]],"routes":[{"dst":"10.244.0.0/16"},{"dst":"2001:cafe:42::/56"}],"type":"host-local"},"isDefaultGateway":true,"isGateway":true,"mtu":1450,"name":"cbr0","type":"bridge"}"#
        );
    }

    #[test]
    fn golden_v6_only_and_multi_network() {
        let e = "FLANNEL_IPV6_NETWORK=fd00::/48,fd01::/48\nFLANNEL_IPV6_SUBNET=fd00:0:0:5::1/64\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=true\n";
        assert_eq!(
            build(r#"{"name":"n","cniVersion":"1.0.0","type":"flannel"}"#, e).unwrap(),
            r#"{"cniVersion":"1.0.0","ipMasq":false,"ipam":{"ranges":[[{"subnet":"fd00:0:0:5::/64"}]],"routes":[{"dst":"fd00::/48"},{"dst":"fd01::/48"}],"type":"host-local"},"isGateway":true,"mtu":1400,"name":"n","type":"bridge"}"#
        );
    }

    #[test]
    fn delegate_overrides_ipam_base_and_runtime_config() {
        let conf = r#"{"name":"n","cniVersion":"1.1.0","type":"flannel",
            "delegate":{"type":"ipvlan","master":"eth0","mtu":1400.0,"ipMasq":true},
            "ipam":{"type":"static","dataDir":"/x","ranges":[["ignored"]],"routes":[{"scope":0,"gw":"10.0.0.1","dst":"192.168.0.1/24","mtu":0,"extra":1}]},
            "runtimeConfig":{"portMappings":[]}}"#;
        assert_eq!(
            build(conf, V4).unwrap(),
            r#"{"cniVersion":"1.1.0","ipMasq":true,"ipam":{"dataDir":"/x","ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"192.168.0.1/24","gw":"10.0.0.1","scope":0},{"dst":"10.244.0.0/16"}],"type":"static"},"master":"eth0","mtu":1400,"name":"n","runtimeConfig":{"portMappings":[]},"type":"ipvlan"}"#
        );
    }

    /// The delegate config is where floats reach the Go-JSON writer: any number the user put in
    /// `delegate` (Flannel decodes it into `interface{}`, i.e. `float64`) is written back with
    /// Go's float64 text.
    #[test]
    fn delegate_numbers_are_written_as_go_writes_float64() {
        let conf = r#"{"name":"n","cniVersion":"1.0.0","type":"flannel","delegate":{"type":"bridge",
            "mtu":1400.0,"a":0.000001,"b":1e-7,"c":1e20,"d":1e21,"e":9007199254740993}}"#;
        let out = build(conf, V4).unwrap();
        for want in [
            r#""mtu":1400,"#,
            r#""a":0.000001,"#,
            r#""b":1e-7,"#,
            r#""c":100000000000000000000,"#,
            r#""d":1e+21,"#,
            r#""e":9007199254740992,"#,
        ] {
            assert!(out.contains(want), "{want} in {out}");
        }
    }

    #[test]
    fn bridge_keeps_explicit_is_gateway_and_no_cni_version() {
        let conf = r#"{"name":"n","delegate":{"isGateway":false,"bridge":"mynet0"}}"#;
        let out = build(conf, V4).unwrap();
        assert!(out.contains(r#""isGateway":false"#), "{out}");
        assert!(!out.contains("cniVersion"), "{out}");
        assert!(out.contains(r#""bridge":"mynet0""#), "{out}");
    }

    #[test]
    fn delegate_errors() {
        let cases = [
            (
                r#"{"delegate":{"name":"x"}}"#,
                2,
                "'delegate' dictionary must not have 'name' field, it'll be set by flannel",
            ),
            (
                r#"{"delegate":{"ipam":{}}}"#,
                2,
                "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel",
            ),
            (
                r#"{"delegate":{"type":5}}"#,
                7,
                "'delegate' dictionary, if present, must have (string) 'type' field",
            ),
            (
                r#"{"delegate":{"type":"../../bin/sh"}}"#,
                7,
                "invalid delegate plugin type \"../../bin/sh\"",
            ),
            (r#"{"delegate":{"type":"/bin/sh"}}"#, 7, "\"/bin/sh\""),
            (
                r#"{"ipam":{"routes":[{"gw":"1.2.3.4"}]}}"#,
                7,
                "failed to parse ipam.routes",
            ),
            (r#"{"ipam":{"routes":[{"dst":"bogus"}]}}"#, 7, "\"bogus\""),
            (
                r#"{"ipam":{"routes":"x"}}"#,
                7,
                "failed to parse ipam.routes",
            ),
        ];
        for (conf, code, msg) in cases {
            let e = build(conf, V4).unwrap_err();
            assert_eq!(e.code, code, "{conf}: {e}");
            assert!(e.msg.contains(msg), "{conf}: {e}");
        }
    }

    #[test]
    fn parse_errors_and_defaults() {
        for bad in [
            "",
            "[]",
            "{",
            r#"{"name":3}"#,
            r#"{"delegate":"x"}"#,
            r#"{"subnetFile":1}"#,
        ] {
            assert_eq!(
                FlannelConf::parse(bad.as_bytes()).unwrap_err().code,
                6,
                "{bad}"
            );
        }
        let c = FlannelConf::parse(br#"{"subnetFile":"","dataDir":null}"#).unwrap();
        assert_eq!(c.subnet_file, PathBuf::from(DEFAULT_SUBNET_FILE));
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        let c = FlannelConf::parse(br#"{"subnetFile":"/a","dataDir":"/b"}"#).unwrap();
        assert_eq!(c.subnet_file, PathBuf::from("/a"));
        assert_eq!(c.data_dir, PathBuf::from("/b"));
    }

    #[test]
    fn gc_selection() {
        let raw: Map<String, Value> = serde_json::from_str(
            r#"{"cni.dev/valid-attachments":[{"containerID":"keep1","ifname":"eth0"},{"containerID":"keep2","ifname":"eth0"}]}"#,
        )
        .unwrap();
        let valid = valid_attachment_ids(&raw).unwrap();
        let entries: Vec<String> = ["keep1", "stale", "keep2", ".tmp.x", "lock", "-bad"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(gc_stale(&entries, &valid), vec!["stale", "lock"]);
        assert_eq!(valid_attachment_ids(&Map::new()), None);
        let bad: Map<String, Value> =
            serde_json::from_str(r#"{"cni.dev/valid-attachments":[{"ifname":"eth0"}]}"#).unwrap();
        assert_eq!(valid_attachment_ids(&bad), None);
    }

    #[test]
    fn route_gateways_filled_per_family() {
        let mut prev = json!({
            "ips": [
                {"address": "10.244.3.2/24", "gateway": "10.244.3.1"},
                {"address": "2001:db8::2/64", "gateway": "2001:db8::1"}
            ],
            "routes": [
                {"dst": "10.244.0.0/16"},
                {"dst": "2001:db8::/56"},
                {"dst": "0.0.0.0/0", "gw": "10.244.3.254"}
            ]
        });
        fill_route_gateways(&mut prev);
        assert_eq!(prev["routes"][0]["gw"], "10.244.3.1");
        assert_eq!(prev["routes"][1]["gw"], "2001:db8::1");
        assert_eq!(prev["routes"][2]["gw"], "10.244.3.254");
        let mut none = json!({"routes": [{"dst": "10.0.0.0/8"}]});
        fill_route_gateways(&mut none);
        assert!(none["routes"][0].get("gw").is_none());
    }

    #[test]
    fn result_conversion() {
        let r10 = br#"{"cniVersion":"1.0.0","ips":[{"address":"10.244.1.2/24","gateway":"10.244.1.1","interface":2},{"address":"fd00::2/64"}]}"#;
        assert_eq!(convert_result(r10, "1.0.0").unwrap(), r10.to_vec());
        let v: Value = serde_json::from_slice(&convert_result(r10, "0.3.1").unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["ips"][0]["version"], "4");
        assert_eq!(v["ips"][1]["version"], "6");
        let back: Value = serde_json::from_slice(
            &convert_result(&serde_json::to_vec(&v).unwrap(), "1.1.0").unwrap(),
        )
        .unwrap();
        assert_eq!(back["cniVersion"], "1.1.0");
        assert!(back["ips"][0].get("version").is_none());
        assert_eq!(convert_result(b"nope", "1.0.0").unwrap_err().code, 6);
    }
}
