//! Reading a delegate's CNI result (the parts both the plugin and the anti-spoofing table use).

use serde_json::Value;

/// Host-side interface names in a CNI result, checked like `CNI_IFNAME` before they are used
/// in a path.
pub fn host_interfaces(result: &Value) -> Vec<String> {
    result
        .get("interfaces")
        .and_then(Value::as_array)
        .map(|ifs| {
            ifs.iter()
                .filter(|i| {
                    i.get("sandbox")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .is_empty()
                })
                .filter_map(|i| i.get("name").and_then(Value::as_str))
                .filter(|n| crate::validate::ifname(n).is_ok())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_side_interfaces_are_those_without_a_sandbox() {
        let r: Value = serde_json::from_str(
            r#"{"interfaces":[{"name":"cni0","mac":"aa"},{"name":"veth1234","mac":"bb"},
                {"name":"eth0","mac":"cc","sandbox":"/run/netns/p"},{"name":"../x"}]}"#,
        )
        .unwrap();
        assert_eq!(host_interfaces(&r), vec!["cni0", "veth1234"]);
        assert!(host_interfaces(&serde_json::json!({})).is_empty());
    }
}
