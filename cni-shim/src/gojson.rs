//! JSON serialization byte-compatible with Go's `encoding/json` for `map[string]interface{}`
//! trees, which is how Flannel renders the delegate config: object keys sorted, `<`, `>`, `&`,
//! U+2028 and U+2029 escaped, integral floats printed without a fraction. The one exception is
//! `ipam.routes`, which Go marshals from `types.Route` structs: their keys keep struct order
//! (the order they were inserted into the `serde_json::Map`).

use serde_json::{Map, Number, Value};

/// Serialize like Go's `json.Marshal`.
pub fn to_string(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v, Ctx::Normal);
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Ctx {
    Normal,
    /// The value of key "ipam": its "routes" elements are structs.
    Ipam,
    /// Inside `ipam.routes`: keep insertion order.
    Struct,
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
    if ctx != Ctx::Struct {
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
            (_, "ipam") if ctx != Ctx::Struct => Ctx::Ipam,
            (Ctx::Ipam, "routes") => Ctx::Struct,
            _ => Ctx::Normal,
        };
        write_value(out, &m[k], child);
    }
    out.push('}');
}

fn write_number(out: &mut String, n: &Number) {
    if n.is_f64() {
        let f = n.as_f64().unwrap_or(0.0);
        // Go decodes JSON numbers into float64 and prints integral values without a fraction.
        if f.fract() == 0.0 && f.abs() < 1e21 {
            out.push_str(&format!("{f:.0}"));
            return;
        }
    }
    out.push_str(&n.to_string());
}

/// Appends `s` as a JSON string the way Go's `json.Marshal` writes it: HTML-safe escaping of
/// `<`, `>` and `&`, `\u2028`/`\u2029` escaped, lowercase hex. twilld's lease JSON uses it too.
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
}
