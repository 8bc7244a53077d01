//! Per-pod anti-spoofing: table `bridge twill-antispoof`, kept by twill-cni because only the
//! CNI plugin knows which host-side veth carries which pod addresses. Frames entering the
//! bridge from a registered pod port must carry one of that pod's addresses as IPv4/ARP/IPv6
//! source (IPv6 link-local and unspecified allowed, for neighbour discovery and DAD), and no
//! pod may send router advertisements (CVE-2020-10749, towards other pods).
//!
//! ADD rebuilds the chain (flush + rules, the same every time) and adds the pod's elements in
//! one nft transaction; elements of other pods are never flushed. DEL removes the pod's elements
//! when it knows them (`prevResult`); an element left behind only names a veth that no longer
//! exists (names are `veth` + 32 random bits, so reuse by another pod is not a practical risk).

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::error::{code, CniError};

pub const TABLE: &str = "twill-antispoof";

/// A pod's host-side port and addresses, from a CNI result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPort {
    pub veth: String,
    pub addrs: Vec<IpAddr>,
}

/// The host veth (an interface without `sandbox` that is not the bridge) and every address of
/// the result. `None` when the result has no such veth or no address.
pub fn pod_port(result: &Value, bridge: &str) -> Option<PodPort> {
    let veth = crate::plugin::host_interfaces(result)
        .into_iter()
        .find(|n| n != bridge)?;
    let addrs: Vec<IpAddr> = result
        .get("ips")?
        .as_array()?
        .iter()
        .filter_map(|ip| ip.get("address")?.as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect();
    (!addrs.is_empty()).then_some(PodPort { veth, addrs })
}

fn elements(p: &PodPort) -> (String, String, String) {
    let v4: Vec<String> = p
        .addrs
        .iter()
        .filter(|a| a.is_ipv4())
        .map(|a| format!("\"{}\" . {a}", p.veth))
        .collect();
    let v6: Vec<String> = p
        .addrs
        .iter()
        .filter(|a| a.is_ipv6())
        .map(|a| format!("\"{}\" . {a}", p.veth))
        .collect();
    (format!("\"{}\"", p.veth), v4.join(", "), v6.join(", "))
}

/// The ADD transaction. Pure.
pub fn add_script(p: &PodPort) -> String {
    let t = format!("bridge {TABLE}");
    let c = format!("{t} pods");
    let mut s = format!(
        "add table {t} {{ comment \"twill-cni: pods send only from their own addresses\" ; }}\n\
         add set {t} ports {{ type ifname ; }}\n\
         add set {t} src4 {{ type ifname . ipv4_addr ; }}\n\
         add set {t} src6 {{ type ifname . ipv6_addr ; }}\n\
         add chain {c} {{ type filter hook prerouting priority -200 ; policy accept ; }}\n\
         flush chain {c}\n\
         add rule {c} iifname != @ports accept\n\
         add rule {c} ether type arp iifname . arp saddr ip != @src4 counter drop comment \"ARP source spoofing\"\n\
         add rule {c} ether type ip iifname . ip saddr != @src4 counter drop comment \"IPv4 source spoofing\"\n\
         add rule {c} icmpv6 type nd-router-advert counter drop comment \"router advertisement from a pod (CVE-2020-10749)\"\n\
         add rule {c} ether type ip6 ip6 saddr {{ ::, fe80::/10 }} accept\n\
         add rule {c} ether type ip6 iifname . ip6 saddr != @src6 counter drop comment \"IPv6 source spoofing\"\n"
    );
    let (port, v4, v6) = elements(p);
    if !v4.is_empty() {
        s += &format!("add element {t} src4 {{ {v4} }}\n");
    }
    if !v6.is_empty() {
        s += &format!("add element {t} src6 {{ {v6} }}\n");
    }
    // The port last: until it is registered, the port is not checked at all, and it must not
    // be checked before its addresses are allowed.
    s += &format!("add element {t} ports {{ {port} }}\n");
    s
}

/// The DEL transaction: idempotent (each element is added, then deleted). Pure.
pub fn del_script(p: &PodPort) -> String {
    let t = format!("bridge {TABLE}");
    let mut s = format!(
        "add table {t}\nadd set {t} ports {{ type ifname ; }}\nadd set {t} src4 {{ type ifname . ipv4_addr ; }}\nadd set {t} src6 {{ type ifname . ipv6_addr ; }}\n"
    );
    let (port, v4, v6) = elements(p);
    s += &format!("add element {t} ports {{ {port} }}\ndelete element {t} ports {{ {port} }}\n");
    for (set, e) in [("src4", v4), ("src6", v6)] {
        if !e.is_empty() {
            s += &format!("add element {t} {set} {{ {e} }}\ndelete element {t} {set} {{ {e} }}\n");
        }
    }
    s
}

/// The elements of veths that no longer exist (`exists` says which do), from the JSON listing
/// of the table, as one delete transaction; `None` when there is nothing to delete. Pure.
pub fn prune_script(listing: &Value, exists: impl Fn(&str) -> bool) -> Option<String> {
    let t = format!("bridge {TABLE}");
    let mut s = String::new();
    for item in listing.get("nftables")?.as_array()? {
        let Some(set) = item.get("set") else { continue };
        let Some(name) = set.get("name").and_then(Value::as_str) else {
            continue;
        };
        for e in set
            .get("elem")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (veth, text) = match e {
                Value::String(v) => (v.clone(), format!("\"{v}\"")),
                _ => match e.get("concat").and_then(Value::as_array).map(Vec::as_slice) {
                    Some([Value::String(v), Value::String(a)]) => {
                        (v.clone(), format!("\"{v}\" . {a}"))
                    }
                    _ => continue,
                },
            };
            if crate::validate::ifname(&veth).is_ok() && !exists(&veth) {
                s += &format!("delete element {t} {name} {{ {text} }}\n");
            }
        }
    }
    (!s.is_empty()).then_some(s)
}

/// GC: removes the elements of veths gone from this namespace (pods deleted without a DEL
/// that carried prevResult). Does nothing where the table does not exist.
pub fn prune() -> Result<(), CniError> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "bridge", TABLE])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| CniError::new(code::IO_FAILURE, format!("running nft: {e}")))?;
    if !out.status.success() {
        return Ok(());
    }
    let listing: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    match prune_script(&listing, |v| {
        std::path::Path::new(&format!("/sys/class/net/{v}")).exists()
    }) {
        Some(script) => apply(&script),
        None => Ok(()),
    }
}

/// Runs `nft -f -` with `script`.
pub fn apply(script: &str) -> Result<(), CniError> {
    let fail = |m: String| CniError::new(code::IO_FAILURE, format!("anti-spoofing rules: {m}"));
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            fail(format!(
                "running nft: {e} (is the nftables package installed?)"
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| fail(format!("writing to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("waiting for nft: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result() -> Value {
        serde_json::from_str(
            r#"{"interfaces":[{"name":"cni0"},{"name":"veth0a1b2c3d"},{"name":"eth0","sandbox":"/run/netns/p"}],
                "ips":[{"address":"10.244.1.5/24","interface":2},{"address":"fd00:42:0:1::5/64","interface":2}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn the_pod_port_is_the_non_bridge_host_interface() {
        let p = pod_port(&result(), "cni0").unwrap();
        assert_eq!(p.veth, "veth0a1b2c3d");
        assert_eq!(p.addrs.len(), 2);
        assert!(pod_port(&serde_json::json!({"interfaces":[{"name":"eth0"}]}), "cni0").is_none());
    }

    #[test]
    fn add_registers_addresses_before_the_port() {
        let s = add_script(&pod_port(&result(), "cni0").unwrap());
        let src4 = s
            .find("add element bridge twill-antispoof src4 { \"veth0a1b2c3d\" . 10.244.1.5 }")
            .unwrap();
        let src6 = s
            .find("add element bridge twill-antispoof src6 { \"veth0a1b2c3d\" . fd00:42:0:1::5 }")
            .unwrap();
        let port = s
            .find("add element bridge twill-antispoof ports { \"veth0a1b2c3d\" }")
            .unwrap();
        assert!(src4 < port && src6 < port);
        assert!(s.contains("flush chain bridge twill-antispoof pods\n"));
        assert!(s.contains("icmpv6 type nd-router-advert counter drop"));
    }

    #[test]
    fn prune_deletes_only_elements_of_vanished_veths() {
        let listing = serde_json::json!({"nftables":[
            {"metainfo":{}},
            {"set":{"name":"ports","elem":["veth1","veth2"]}},
            {"set":{"name":"src4","elem":[{"concat":["veth1","10.244.1.5"]},{"concat":["veth2","10.244.1.6"]}]}},
            {"set":{"name":"src6"}}
        ]});
        let s = prune_script(&listing, |v| v == "veth1").unwrap();
        assert_eq!(
            s,
            "delete element bridge twill-antispoof ports { \"veth2\" }\ndelete element bridge twill-antispoof src4 { \"veth2\" . 10.244.1.6 }\n"
        );
        assert!(prune_script(&listing, |_| true).is_none());
    }

    #[test]
    fn del_is_idempotent_add_then_delete() {
        let s = del_script(&pod_port(&result(), "cni0").unwrap());
        assert!(s.contains("add element bridge twill-antispoof ports { \"veth0a1b2c3d\" }\ndelete element bridge twill-antispoof ports { \"veth0a1b2c3d\" }\n"));
        assert!(!s.contains("flush"));
    }
}
