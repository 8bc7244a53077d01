//! Go compatibility helpers shared by the net-conf.json and lease codecs: a JSON tree that keeps
//! object keys in document order, duplicates included ([`GoValue`]), Go's case folding of keys
//! ([`fold_eq`]), Go's typed decoding errors ([`TypeError`]), and Go's (and Flannel's) IP
//! parsing and printing. Writing Go JSON is [`crate::gojson`].

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A JSON value whose objects keep every key in document order.
#[derive(Debug, Clone, PartialEq)]
pub enum GoValue {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<GoValue>),
    Object(Vec<(String, GoValue)>),
}

impl GoValue {
    /// Go's name for the JSON kind in `UnmarshalTypeError.Value`.
    pub fn kind(&self) -> &'static str {
        match self {
            GoValue::Null => "null",
            GoValue::Bool(_) => "bool",
            GoValue::Number(_) => "number",
            GoValue::String(_) => "string",
            GoValue::Array(_) => "array",
            GoValue::Object(_) => "object",
        }
    }

    /// Compact JSON text of this value as it was written, as near as a parsed value allows:
    /// numbers keep their own text (`1.0` stays `1.0`; serde's text is the source's for the
    /// forms people write), strings get Go's escaping, keys keep document order.
    pub fn to_json_text(&self) -> String {
        let mut out = String::new();
        self.write_json_text(&mut out);
        out
    }

    fn write_json_text(&self, out: &mut String) {
        match self {
            GoValue::Null => out.push_str("null"),
            GoValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            GoValue::Number(n) => out.push_str(&n.to_string()),
            GoValue::String(s) => crate::gojson::encode_string(s, out),
            GoValue::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write_json_text(out);
                }
                out.push(']');
            }
            GoValue::Object(pairs) => {
                out.push('{');
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    crate::gojson::encode_string(k, out);
                    out.push(':');
                    v.write_json_text(out);
                }
                out.push('}');
            }
        }
    }

    /// The text Flannel's IP types see in `UnmarshalJSON` after `bytes.Trim(j, "\"")`: Go
    /// hands them the value's own bytes (for strings: the decoded content; escapes are not
    /// reproduced).
    pub fn unmarshaler_text(&self) -> String {
        match self {
            GoValue::String(s) => s.trim_matches('"').to_string(),
            other => other.to_json_text(),
        }
    }

    /// Convert to a `serde_json::Value` (a repeated key keeps its last value, like Go's
    /// `map[string]interface{}`).
    pub fn to_value(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            GoValue::Null => Value::Null,
            GoValue::Bool(b) => Value::Bool(*b),
            GoValue::Number(n) => Value::Number(n.clone()),
            GoValue::String(s) => Value::String(s.clone()),
            GoValue::Array(a) => Value::Array(a.iter().map(GoValue::to_value).collect()),
            GoValue::Object(pairs) => {
                let mut m = serde_json::Map::new();
                for (k, v) in pairs {
                    m.insert(k.clone(), v.to_value());
                }
                Value::Object(m)
            }
        }
    }

    /// Build from a `serde_json::Value`.
    pub fn from_value(v: &serde_json::Value) -> GoValue {
        use serde_json::Value;
        match v {
            Value::Null => GoValue::Null,
            Value::Bool(b) => GoValue::Bool(*b),
            Value::Number(n) => GoValue::Number(n.clone()),
            Value::String(s) => GoValue::String(s.clone()),
            Value::Array(a) => GoValue::Array(a.iter().map(GoValue::from_value).collect()),
            Value::Object(m) => GoValue::Object(
                m.iter()
                    .map(|(k, v)| (k.clone(), GoValue::from_value(v)))
                    .collect(),
            ),
        }
    }
}

impl<'de> Deserialize<'de> for GoValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = GoValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<GoValue, E> {
                Ok(GoValue::Null)
            }
            fn visit_none<E>(self) -> Result<GoValue, E> {
                Ok(GoValue::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<GoValue, E> {
                Ok(GoValue::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<GoValue, E> {
                Ok(GoValue::Number(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<GoValue, E> {
                Ok(GoValue::Number(n.into()))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<GoValue, E> {
                serde_json::Number::from_f64(n)
                    .map(GoValue::Number)
                    .ok_or_else(|| E::custom("number out of range"))
            }
            fn visit_str<E>(self, s: &str) -> Result<GoValue, E> {
                Ok(GoValue::String(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<GoValue, E> {
                Ok(GoValue::String(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<GoValue, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = seq.next_element()? {
                    v.push(x);
                }
                Ok(GoValue::Array(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<GoValue, A::Error> {
                let mut v = Vec::new();
                while let Some((k, x)) = map.next_entry::<String, GoValue>()? {
                    v.push((k, x));
                }
                Ok(GoValue::Object(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Malformed JSON, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub message: String,
    /// 1-based.
    pub line: usize,
    /// 1-based (bytes).
    pub column: usize,
    /// 0-based byte offset into the input.
    pub offset: usize,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "invalid JSON at line {}, column {} (byte offset {}): {}",
            self.line, self.column, self.offset, self.message
        )
    }
}

impl std::error::Error for SyntaxError {}

/// Parse JSON text into a [`GoValue`].
pub fn parse(text: &str) -> Result<GoValue, SyntaxError> {
    parse_bytes(text.as_bytes())
}

/// Parse JSON bytes into a [`GoValue`].
pub fn parse_bytes(bytes: &[u8]) -> Result<GoValue, SyntaxError> {
    serde_json::from_slice::<GoValue>(bytes).map_err(|e| {
        let (line, column) = (e.line(), e.column());
        let full = e.to_string();
        let suffix = format!(" at line {line} column {column}");
        let message = full.strip_suffix(&suffix).unwrap_or(&full).to_string();
        let line_start: usize = bytes
            .split(|b| *b == b'\n')
            .take(line.saturating_sub(1))
            .map(|l| l.len() + 1)
            .sum();
        let offset = (line_start + column.saturating_sub(1)).min(bytes.len());
        SyntaxError {
            message,
            line,
            column,
            offset,
        }
    })
}

/// Go's `*json.UnmarshalTypeError`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeError {
    /// `"string"`, `"number"`, `"number -1"`, `"bool"`, `"object"`, `"array"`.
    pub value: String,
    /// Go struct type name (`""` for an anonymous struct); unused when `field` is empty.
    pub struct_name: String,
    /// JSON field name; empty = the whole value.
    pub field: String,
    /// Go type, e.g. `uint`, `subnet.Config`.
    pub go_type: String,
}

impl TypeError {
    pub fn field(value: impl Into<String>, st: &str, field: &str, go_type: &str) -> Self {
        TypeError {
            value: value.into(),
            struct_name: st.to_string(),
            field: field.to_string(),
            go_type: go_type.to_string(),
        }
    }
    pub fn value(value: impl Into<String>, go_type: &str) -> Self {
        TypeError::field(value, "", "", go_type)
    }
}

impl fmt::Display for TypeError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.field.is_empty() && self.struct_name.is_empty() {
            write!(
                f,
                "json: cannot unmarshal {} into Go value of type {}",
                self.value, self.go_type
            )
        } else {
            write!(
                f,
                "json: cannot unmarshal {} into Go struct field {}.{} of type {}",
                self.value, self.struct_name, self.field, self.go_type
            )
        }
    }
}

impl std::error::Error for TypeError {}

fn fold_char(c: char) -> char {
    if c.is_ascii() {
        return c.to_ascii_uppercase();
    }
    // unicode.ToUpper(unicode.ToLower(r)) for the runes that fold into ASCII letters.
    match c {
        '\u{212A}' => 'K', // Kelvin sign
        '\u{017F}' => 'S', // long s
        '\u{0130}' | '\u{0131}' => 'I',
        other => {
            let mut lower = other.to_lowercase();
            let l = match (lower.next(), lower.next()) {
                (Some(l), None) => l,
                _ => other,
            };
            let mut upper = l.to_uppercase();
            match (upper.next(), upper.next()) {
                (Some(u), None) => u,
                _ => l,
            }
        }
    }
}

/// Go `encoding/json` key matching: `key` names `field` when they are equal after Go's
/// case folding.
pub fn fold_eq(key: &str, field: &str) -> bool {
    key.chars().map(fold_char).eq(field.chars().map(fold_char))
}

/// Decode into a Go `bool`; `Ok(None)` for null (field untouched).
pub fn decode_bool(v: &GoValue, st: &str, field: &str) -> Result<Option<bool>, TypeError> {
    match v {
        GoValue::Null => Ok(None),
        GoValue::Bool(b) => Ok(Some(*b)),
        other => Err(TypeError::field(other.kind(), st, field, "bool")),
    }
}

/// Decode into a Go `string`.
pub fn decode_string(v: &GoValue, st: &str, field: &str) -> Result<Option<String>, TypeError> {
    match v {
        GoValue::Null => Ok(None),
        GoValue::String(s) => Ok(Some(s.clone())),
        other => Err(TypeError::field(other.kind(), st, field, "string")),
    }
}

/// Decode into a Go unsigned integer type named `go_type` (`uint`, `uint32`, ...).
pub fn decode_uint(
    v: &GoValue,
    st: &str,
    field: &str,
    go_type: &str,
) -> Result<Option<u64>, TypeError> {
    let max = match go_type {
        "uint8" => u64::from(u8::MAX),
        "uint16" => u64::from(u16::MAX),
        "uint32" => u64::from(u32::MAX),
        _ => u64::MAX,
    };
    match v {
        GoValue::Null => Ok(None),
        GoValue::Number(n) => match n.as_u64() {
            Some(x) if x <= max => Ok(Some(x)),
            _ => Err(TypeError::field(format!("number {n}"), st, field, go_type)),
        },
        other => Err(TypeError::field(other.kind(), st, field, go_type)),
    }
}

/// Decode into a Go signed integer type named `go_type` (`int` is 64-bit).
pub fn decode_int(
    v: &GoValue,
    st: &str,
    field: &str,
    go_type: &str,
) -> Result<Option<i64>, TypeError> {
    let (min, max) = match go_type {
        "int8" => (i64::from(i8::MIN), i64::from(i8::MAX)),
        "int16" => (i64::from(i16::MIN), i64::from(i16::MAX)),
        "int32" => (i64::from(i32::MIN), i64::from(i32::MAX)),
        _ => (i64::MIN, i64::MAX),
    };
    match v {
        GoValue::Null => Ok(None),
        GoValue::Number(n) => match n.as_i64() {
            Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
            _ => Err(TypeError::field(format!("number {n}"), st, field, go_type)),
        },
        other => Err(TypeError::field(other.kind(), st, field, go_type)),
    }
}

/// An address as Go's `net.ParseIP` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoIp {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

impl GoIp {
    /// Go `net.IP.To4()`: IPv4, or the IPv4 inside a v4-mapped IPv6 address.
    pub fn to4(self) -> Option<Ipv4Addr> {
        match self {
            GoIp::V4(a) => Some(a),
            GoIp::V6(a) => a.to_ipv4_mapped(),
        }
    }
    /// Go `net.IP.To16()`: IPv4 becomes v4-mapped.
    pub fn to16(self) -> Ipv6Addr {
        match self {
            GoIp::V4(a) => a.to_ipv6_mapped(),
            GoIp::V6(a) => a,
        }
    }
}

/// Go `net.ParseIP` (dotted IPv4 without leading zeros, or IPv6 without zone).
pub fn parse_ip(s: &str) -> Option<GoIp> {
    if s.contains(':') {
        s.parse::<Ipv6Addr>().ok().map(GoIp::V6)
    } else {
        s.parse::<Ipv4Addr>().ok().map(GoIp::V4)
    }
}

/// Flannel `ip.ParseIP4`.
pub fn parse_ip4(s: &str) -> Result<Ipv4Addr, &'static str> {
    parse_ip(s)
        .ok_or("invalid IP address format")?
        .to4()
        .ok_or("invalid IPv4 address format")
}

/// Flannel `ip.ParseIP6` (IPv4 input becomes v4-mapped).
pub fn parse_ip6(s: &str) -> Result<Ipv6Addr, &'static str> {
    parse_ip(s)
        .map(GoIp::to16)
        .ok_or("invalid IP address format")
}

/// Go `net.ParseCIDR`: address and prefix length (not masked); error `invalid CIDR address: s`.
/// A 4-in-6 address keeps IPv6 family (mask up to 128), as in Go.
pub fn parse_cidr(s: &str) -> Result<(GoIp, u8), String> {
    let bad = || format!("invalid CIDR address: {s}");
    let (addr, mask) = s.split_once('/').ok_or_else(bad)?;
    let ip = parse_ip(addr).ok_or_else(bad)?;
    let bits = match ip {
        GoIp::V4(_) => 32,
        GoIp::V6(_) => 128,
    };
    if mask.is_empty() || !mask.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    // dtoi: leading zeros allowed; big values rejected.
    let n = mask
        .bytes()
        .try_fold(0u32, |n, b| {
            let n = n * 10 + u32::from(b - b'0');
            (n < 0xFF_FFFF).then_some(n)
        })
        .ok_or_else(bad)?;
    if n > bits {
        return Err(bad());
    }
    Ok((ip, n as u8))
}

/// Go `net.IP.String()` of a 16-byte IP: v4-mapped addresses print dotted.
pub fn go_ip_string(a: Ipv6Addr) -> String {
    match a.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => a.to_string(),
    }
}

/// Flannel's `ip.IP6.String()`: the address goes through `big.Int.Bytes()`, so a value that
/// fits in exactly 4 bytes (2^24 ≤ v < 2^32) also prints as dotted IPv4; else
/// [`go_ip_string`].
pub fn flannel_ip6_string(a: Ipv6Addr) -> String {
    let v = u128::from(a);
    if (1u128 << 24..1u128 << 32).contains(&v) {
        Ipv4Addr::from(v as u32).to_string()
    } else {
        go_ip_string(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn flannel_ip6_string_quirks() {
        assert_eq!(flannel_ip6_string(v6("fc00:0:0:1::")), "fc00:0:0:1::");
        assert_eq!(
            flannel_ip6_string(v6("2001:db8::1:0:0:1")),
            "2001:db8::1:0:0:1"
        );
        assert_eq!(flannel_ip6_string(v6("::")), "::");
        assert_eq!(flannel_ip6_string(v6("::1")), "::1");
        // big.Int.Bytes() of length 4 → printed as IPv4.
        assert_eq!(flannel_ip6_string(v6("::a00:1")), "10.0.0.1");
        assert_eq!(flannel_ip6_string(v6("::ff:ffff")), "::ff:ffff");
        assert_eq!(flannel_ip6_string(v6("::1:0:0")), "::1:0:0");
        // v4-mapped → dotted (Go), unlike Rust's "::ffff:1.2.3.4".
        assert_eq!(go_ip_string(v6("::ffff:1.2.3.4")), "1.2.3.4");
        assert_eq!(flannel_ip6_string(v6("::ffff:1.2.3.4")), "1.2.3.4");
        assert_eq!(go_ip_string(v6("::1.2.3.4")), "::102:304");
    }
}
