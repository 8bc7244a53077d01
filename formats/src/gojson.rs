//! The one writer of Go `encoding/json` text, for the two ways Flannel's Go code marshals JSON:
//!
//! - [`to_string`]: a `map[string]interface{}` tree, which is how Flannel renders the CNI
//!   delegate config: object keys sorted; the one exception is `ipam.routes`, which Go marshals
//!   from `types.Route` structs, so their keys keep struct order (the order they were inserted
//!   into the `serde_json::Map`).
//! - [`encode_value`]: struct fields and `json.RawMessage` (the lease's `BackendData`), keys in
//!   the value's own order.
//!
//! Both escape strings as Go does ([`encode_string`]: `<`, `>`, `&`, U+2028 and U+2029 escaped,
//! lowercase hex) and print every number as Go prints a `float64` ([`write_number`]: JSON
//! numbers decode into `float64` in an `interface{}`).

use serde_json::{Map, Number, Value};

/// Serialize like Go's `json.Marshal` of a `map[string]interface{}` (keys sorted).
pub fn to_string(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v, Ctx::Normal);
    out
}

/// Append a compact JSON rendering of `v` with Go's escaping and number text, object keys in the
/// value's order (Go struct fields, or a `json.RawMessage` written back).
pub fn encode_value(v: &Value, out: &mut String) {
    write_value(out, v, Ctx::Document);
}

#[derive(Clone, Copy, PartialEq)]
enum Ctx {
    /// A `map[string]interface{}`: keys sorted.
    Normal,
    /// The value of key "ipam": its "routes" elements are structs.
    Ipam,
    /// Inside `ipam.routes`: Go structs, keys in insertion order.
    Struct,
    /// [`encode_value`]: every object in insertion order, all the way down.
    Document,
}

fn write_value(out: &mut String, v: &Value, ctx: Ctx) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => encode_string(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, e, ctx);
            }
            out.push(']');
        }
        Value::Object(m) => write_object(out, m, ctx),
    }
}

fn write_object(out: &mut String, m: &Map<String, Value>, ctx: Ctx) {
    let mut keys: Vec<&String> = m.keys().collect();
    if !matches!(ctx, Ctx::Struct | Ctx::Document) {
        keys.sort();
    }
    out.push('{');
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        encode_string(k, out);
        out.push(':');
        let child = match (ctx, k.as_str()) {
            (Ctx::Document, _) => Ctx::Document,
            (Ctx::Normal | Ctx::Ipam, "ipam") => Ctx::Ipam,
            (Ctx::Ipam, "routes") => Ctx::Struct,
            _ => Ctx::Normal,
        };
        write_value(out, &m[k], child);
    }
    out.push('}');
}

/// Go's `floatEncoder` for `float64` (encode.go): `strconv.AppendFloat(f, 'f', -1, 64)`, or
/// `'e'` below 1e-6 and from 1e21 on, with a two-digit negative exponent cut to one (`1e-07`
/// becomes `1e-7`). Every number goes through `f64`, as Go decodes JSON numbers into `float64`
/// (integers beyond 2^53 round as they do in Flannel).
pub fn write_number(out: &mut String, n: &Number) {
    let f = match (n.as_i64(), n.as_u64()) {
        // Exact in f64: print the integer as is (the common case, and no float text needed).
        (Some(i), _) if i.unsigned_abs() <= 1 << 53 => return out.push_str(&i.to_string()),
        (_, Some(u)) if u <= 1 << 53 => return out.push_str(&u.to_string()),
        _ => n.as_f64().unwrap_or(0.0),
    };
    out.push_str(&go_float64(f));
}

/// The text Go's `encoding/json` writes for a finite `float64`.
fn go_float64(f: f64) -> String {
    let abs = f.abs();
    if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
        // Rust's `{:e}` is the shortest round-trip form like Go's 'e' with precision -1, but
        // writes `1e21` and `1e-7` where Go writes `1e+21` and (after encode.go's clean-up)
        // `1e-7`.
        let s = format!("{f:e}");
        match s.split_once('e') {
            Some((mantissa, exp)) if !exp.starts_with('-') => format!("{mantissa}e+{exp}"),
            _ => s,
        }
    } else {
        // Rust's `Display` for f64 is the shortest round-trip digits without an exponent,
        // zero-padded, as Go's 'f' with precision -1 (`1400`, `0.000001`, `1152921504606847000`).
        format!("{f}")
    }
}

/// Appends `s` as a JSON string the way Go's `json.Marshal` writes it: HTML-safe escaping of
/// `<`, `>` and `&`, `\u2028`/`\u2029` escaped, lowercase hex.
pub fn encode_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_recursively_except_routes() {
        let v: Value = serde_json::from_str(
            r#"{"z":1,"a":{"y":true,"b":null},"ipam":{"type":"x","routes":[{"dst":"0.0.0.0/0","gw":"1.2.3.4"}],"ranges":[[{"subnet":"s","gateway":"g"}]]}}"#,
        )
        .unwrap();
        assert_eq!(
            to_string(&v),
            r#"{"a":{"b":null,"y":true},"ipam":{"ranges":[[{"gateway":"g","subnet":"s"}]],"routes":[{"dst":"0.0.0.0/0","gw":"1.2.3.4"}],"type":"x"},"z":1}"#
        );
    }

    #[test]
    fn go_string_escapes_and_numbers() {
        let v = json!({"s": "<a&b>\u{2028}\"\\\n\u{1}é", "f": 1400.0, "g": 1.5, "i": -3});
        assert_eq!(
            to_string(&v),
            r#"{"f":1400,"g":1.5,"i":-3,"s":"\u003ca\u0026b\u003e\u2028\"\\\n\u0001é"}"#
        );
    }

    #[test]
    fn go_string_encoder() {
        let mut s = String::new();
        encode_string("a<b>&\"\\\n\u{1}\u{2028}é", &mut s);
        assert_eq!(s, r#""a\u003cb\u003e\u0026\"\\\n\u0001\u2028é""#);
    }

    /// Go's outputs for these `float64` values (`json.Marshal(f)`, encode.go's floatEncoder).
    #[test]
    fn numbers_print_as_go_float64() {
        let cases: &[(&str, &str)] = &[
            ("0", "0"),
            ("-0.0", "-0"),
            ("1400.0", "1400"),
            ("1.5", "1.5"),
            ("0.1", "0.1"),
            ("-3", "-3"),
            ("1e2", "100"),
            ("0.000001", "0.000001"),
            ("0.00001", "0.00001"),
            ("1e-7", "1e-7"),
            ("1.5e-7", "1.5e-7"),
            ("-1.5e-7", "-1.5e-7"),
            ("1e-100", "1e-100"),
            ("5e-324", "5e-324"),
            ("1e20", "100000000000000000000"),
            ("1e21", "1e+21"),
            ("-1.5e21", "-1.5e+21"),
            ("1.7976931348623157e308", "1.7976931348623157e+308"),
            // Integral floats beyond 2^53: shortest digits, zero-padded (not the exact value).
            ("1152921504606846976.0", "1152921504606847000"),
            // Integers decode into float64 in Go: exact up to 2^53, rounded beyond.
            ("9007199254740992", "9007199254740992"),
            ("-9007199254740992", "-9007199254740992"),
            ("9007199254740993", "9007199254740992"),
            ("18446744073709551615", "18446744073709552000"),
            ("-9223372036854775808", "-9223372036854776000"),
        ];
        for (input, go) in cases {
            let v: Value = serde_json::from_str(input).unwrap();
            assert_eq!(to_string(&v), *go, "{input}");
            let mut out = String::new();
            encode_value(&v, &mut out);
            assert_eq!(out, *go, "{input} (encode_value)");
        }
    }

    #[test]
    fn encode_value_keeps_document_order_all_the_way_down() {
        let v: Value =
            serde_json::from_str(r#"{"z":1,"ipam":{"type":"x","a":[{"y":1,"b":2}]},"a":"<"}"#)
                .unwrap();
        let mut out = String::new();
        encode_value(&v, &mut out);
        assert_eq!(
            out,
            r#"{"z":1,"ipam":{"type":"x","a":[{"y":1,"b":2}]},"a":"\u003c"}"#
        );
    }
}
