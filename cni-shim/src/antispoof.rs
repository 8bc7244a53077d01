//! Per-pod anti-spoofing: table `bridge twill-antispoof`, kept by twill-cni because only the
//! CNI plugin knows which host-side veth carries which pod addresses. Frames entering the
//! bridge from a registered pod port must carry one of that pod's addresses as IPv4/ARP/IPv6
//! source (IPv6 link-local and unspecified allowed, for neighbour discovery and DAD), and no
//! pod may send router advertisements (CVE-2020-10749, towards other pods).
//!
//! ADD adds the pod's elements with one nf_tables netlink transaction ([`twill_nft::nfnl`]): no
//! `nft` process on the per-pod path. Only when that fails (the first pod on the node: no
//! table yet) does it run `nft` with the whole table: sets, chain rebuilt (flush + rules, the
//! same every time) and the pod's elements, in one transaction; elements of other pods are never
//! flushed. GC rebuilds the chain the same way, repairing rules changed by hand. The set names
//! are the rule layout's version: should the rules ever change incompatibly, new set names make
//! the fast path fail on an old table and fall back to the rebuild. DEL removes the pod's
//! elements when it knows them (`prevResult`); an element left behind only names a veth that no
//! longer exists (names are `veth` + 32 random bits, so reuse by another pod is not a practical
//! risk).

use std::net::IpAddr;

use serde_json::Value;
use twill_nft::listing::{Elem, Listing};
use twill_nft::{nfnl, Nft, NftError, NftRunner};

use crate::error::{code, CniError};

pub const TABLE: &str = twill_nft::tables::ANTISPOOF;

/// A pod's host-side port and addresses, from a CNI result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPort {
    pub veth: String,
    pub addrs: Vec<IpAddr>,
}

/// The host veth (an interface without `sandbox` that is not the bridge) and every address of
/// the result. `None` when the result has no such veth or no address.
pub fn pod_port(result: &Value, bridge: &str) -> Option<PodPort> {
    let veth = crate::result::host_interfaces(result)
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

/// The table, its sets and the chain, rebuilt (flush + rules); no elements. Pure.
///
/// The first rule accepts a pod's IPv4 frame from its own address with one lookup: that is
/// nearly every frame a pod sends, and without it each would take two (the port, then the
/// address). The verdict is the same: an `ifname . address` element exists only for a
/// registered port, and every other frame meets the rules below as before.
pub fn chain_script() -> String {
    let t = format!("bridge {TABLE}");
    let c = format!("{t} pods");
    format!(
        "add table {t} {{ comment \"twill-cni: pods send only from their own addresses\" ; }}\n\
         add set {t} ports {{ type ifname ; }}\n\
         add set {t} src4 {{ type ifname . ipv4_addr ; }}\n\
         add set {t} src6 {{ type ifname . ipv6_addr ; }}\n\
         add chain {c} {{ type filter hook prerouting priority -200 ; policy accept ; }}\n\
         flush chain {c}\n\
         add rule {c} ether type ip iifname . ip saddr @src4 accept\n\
         add rule {c} iifname != @ports accept\n\
         add rule {c} ether type arp iifname . arp saddr ip != @src4 counter drop comment \"ARP source spoofing\"\n\
         add rule {c} ether type ip iifname . ip saddr != @src4 counter drop comment \"IPv4 source spoofing\"\n\
         add rule {c} icmpv6 type nd-router-advert counter drop comment \"router advertisement from a pod (CVE-2020-10749)\"\n\
         add rule {c} ether type ip6 ip6 saddr {{ ::, fe80::/10 }} accept\n\
         add rule {c} ether type ip6 iifname . ip6 saddr != @src6 counter drop comment \"IPv6 source spoofing\"\n"
    )
}

/// The ADD transaction for `nft`: [`chain_script`] plus the pod's elements. Pure.
pub fn add_script(p: &PodPort) -> String {
    let t = format!("bridge {TABLE}");
    let mut s = chain_script();
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

/// Set keys as the kernel stores them: an `ifname` is IFNAMSIZ (16) bytes, NUL padded;
/// concatenations put each field at a 4-byte boundary (16 + 4 for IPv4, 16 + 16 for IPv6);
/// addresses in network order. `(ports, src4, src6)`. Pure.
pub fn keys(p: &PodPort) -> (Vec<u8>, Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut port = vec![0u8; 16];
    let n = p.veth.len().min(15);
    port[..n].copy_from_slice(&p.veth.as_bytes()[..n]);
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for a in &p.addrs {
        let mut k = port.clone();
        match a {
            IpAddr::V4(a) => {
                k.extend_from_slice(&a.octets());
                v4.push(k);
            }
            IpAddr::V6(a) => {
                k.extend_from_slice(&a.octets());
                v6.push(k);
            }
        }
    }
    (port, v4, v6)
}

/// The netlink messages that add the pod's elements: addresses first, the port last (in one
/// transaction, so the order only documents the intent). Pure.
pub fn add_messages(p: &PodPort) -> Vec<nfnl::Msg> {
    let (port, v4, v6) = keys(p);
    let mut out = Vec::new();
    for (set, k) in [("src4", v4), ("src6", v6), ("ports", vec![port])] {
        if !k.is_empty() {
            out.push(nfnl::set_elements(
                nfnl::NFT_MSG_NEWSETELEM,
                nfnl::NFPROTO_BRIDGE,
                TABLE,
                set,
                &k,
            ));
        }
    }
    out
}

/// The netlink messages that remove the pod's elements, idempotently: each element is added,
/// then deleted, in the same transaction (a plain delete of a missing element would fail the
/// whole transaction). Pure.
pub fn del_messages(p: &PodPort) -> Vec<nfnl::Msg> {
    let (port, v4, v6) = keys(p);
    let mut out = Vec::new();
    for (set, k) in [("ports", vec![port]), ("src4", v4), ("src6", v6)] {
        if !k.is_empty() {
            for msg in [nfnl::NFT_MSG_NEWSETELEM, nfnl::NFT_MSG_DELSETELEM] {
                out.push(nfnl::set_elements(
                    msg,
                    nfnl::NFPROTO_BRIDGE,
                    TABLE,
                    set,
                    &k,
                ));
            }
        }
    }
    out
}

/// Registers the pod's port and addresses: one netlink transaction when the table exists,
/// else (first pod on the node, or the fast path refused) the whole table through `nft`.
pub fn add(p: &PodPort) -> Result<(), CniError> {
    let fast = nfnl::Conn::open().and_then(|mut c| c.transaction(&add_messages(p)));
    match fast {
        Ok(()) => Ok(()),
        Err(e) => {
            if e.os_error() != Some(nix::libc::ENOENT) {
                crate::log::warn(&format!(
                    "anti-spoofing elements over netlink: {e}; using nft"
                ));
            }
            apply(&add_script(p))
        }
    }
}

/// Removes the pod's elements; a missing table means there is nothing to remove.
pub fn remove(p: &PodPort) -> Result<(), CniError> {
    match nfnl::Conn::open().and_then(|mut c| c.transaction(&del_messages(p))) {
        Ok(()) => Ok(()),
        Err(e) if e.os_error() == Some(nix::libc::ENOENT) => Ok(()),
        Err(e) => Err(CniError::new(
            code::IO_FAILURE,
            format!(
                "anti-spoofing rules: removing the elements of {}: {e}",
                p.veth
            ),
        )),
    }
}

/// The elements of veths that no longer exist (`exists` says which do), from the JSON listing
/// of the table, as one delete transaction; `None` when there is nothing to delete. Pure.
pub fn prune_script(listing: &Listing, exists: impl Fn(&str) -> bool) -> Option<String> {
    let t = format!("bridge {TABLE}");
    let mut s = String::new();
    for set in listing.sets() {
        for e in &set.elem {
            let (veth, text) = match e {
                Elem::Str(v) => (v, format!("\"{v}\"")),
                Elem::Concat { concat } => match concat.as_slice() {
                    [Elem::Str(v), Elem::Str(a)] => (v, format!("\"{v}\" . {a}")),
                    _ => continue,
                },
                _ => continue,
            };
            if crate::validate::ifname(veth).is_ok() && !exists(veth) {
                s += &format!("delete element {t} {} {{ {text} }}\n", set.name);
            }
        }
    }
    (!s.is_empty()).then_some(s)
}

/// GC: removes the elements of veths gone from this namespace (pods deleted without a DEL
/// that carried prevResult) and rebuilds the chain. Does nothing where the table does not
/// exist.
pub fn prune() -> Result<(), CniError> {
    prune_with(&Nft::default(), |v| {
        std::path::Path::new(&format!("/sys/class/net/{v}")).exists()
    })
}

/// [`prune`] through `nft`, with `exists` telling which veths exist.
pub fn prune_with(nft: &dyn NftRunner, exists: impl Fn(&str) -> bool) -> Result<(), CniError> {
    let listing = match nft.list_table("bridge", TABLE, true) {
        Ok(listing) => listing,
        // No table (or nft refused the listing): nothing to prune or repair.
        Err(NftError::Failed { .. }) => return Ok(()),
        // Not nft's JSON: nothing can be pruned, the chain is still rebuilt.
        Err(NftError::Listing { .. }) => Listing::default(),
        Err(e) => return Err(fail(e)),
    };
    // The chain is rebuilt in the same transaction: ADD no longer touches it once the table
    // exists, so GC is where rules changed by hand are repaired.
    let mut script = chain_script();
    if let Some(deletions) = prune_script(&listing, exists) {
        script += &deletions;
    }
    apply_with(nft, &script)
}

/// Runs `nft -f -` with `script`.
pub fn apply(script: &str) -> Result<(), CniError> {
    apply_with(&Nft::default(), script)
}

fn apply_with(nft: &dyn NftRunner, script: &str) -> Result<(), CniError> {
    nft.apply(script).map_err(fail)
}

/// The CNI error for a failed nft call: nft's own message when it ran.
fn fail(e: NftError) -> CniError {
    let m = match e {
        NftError::Failed { stderr, .. } => stderr,
        e => e.to_string(),
    };
    CniError::new(code::IO_FAILURE, format!("anti-spoofing rules: {m}"))
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
        let listing: Listing = serde_json::from_value(serde_json::json!({"nftables":[
            {"metainfo":{}},
            {"set":{"name":"ports","elem":["veth1","veth2"]}},
            {"set":{"name":"src4","elem":[{"concat":["veth1","10.244.1.5"]},{"concat":["veth2","10.244.1.6"]}]}},
            {"set":{"name":"src6"}}
        ]}))
        .unwrap();
        let s = prune_script(&listing, |v| v == "veth1").unwrap();
        assert_eq!(
            s,
            "delete element bridge twill-antispoof ports { \"veth2\" }\ndelete element bridge twill-antispoof src4 { \"veth2\" . 10.244.1.6 }\n"
        );
        assert!(prune_script(&listing, |_| true).is_none());
    }

    #[test]
    fn keys_are_laid_out_as_the_kernel_stores_them() {
        let (port, v4, v6) = keys(&pod_port(&result(), "cni0").unwrap());
        let mut name = b"veth0a1b2c3d".to_vec();
        name.resize(16, 0);
        assert_eq!(port, name);
        assert_eq!(v4, vec![[name.clone(), vec![10, 244, 1, 5]].concat()]);
        assert_eq!(v6.len(), 1);
        assert_eq!(v6[0].len(), 32);
        assert_eq!(&v6[0][16..18], &[0xfd, 0x00]);
        assert_eq!(v6[0][31], 5);
    }

    #[test]
    fn netlink_add_is_addresses_then_port_and_del_is_add_then_delete() {
        let p = pod_port(&result(), "cni0").unwrap();
        let kinds = |m: &[nfnl::Msg]| -> Vec<(u16, Vec<u8>)> {
            m.iter()
                .map(|m| {
                    let b = m.bytes(1);
                    let set = nfnl::attrs(&b[20..])
                        .find(|(t, _)| *t == nfnl::NFTA_SET_ELEM_LIST_SET)
                        .unwrap()
                        .1
                        .to_vec();
                    (u16::from_ne_bytes([b[4], b[5]]) & 0xff, set)
                })
                .collect()
        };
        let (new, del) = (nfnl::NFT_MSG_NEWSETELEM, nfnl::NFT_MSG_DELSETELEM);
        assert_eq!(
            kinds(&add_messages(&p)),
            vec![
                (new, b"src4\0".to_vec()),
                (new, b"src6\0".to_vec()),
                (new, b"ports\0".to_vec())
            ]
        );
        assert_eq!(
            kinds(&del_messages(&p)),
            vec![
                (new, b"ports\0".to_vec()),
                (del, b"ports\0".to_vec()),
                (new, b"src4\0".to_vec()),
                (del, b"src4\0".to_vec()),
                (new, b"src6\0".to_vec()),
                (del, b"src6\0".to_vec())
            ]
        );
    }

    /// A listing by nft 1.0.6 of the table with pods on veth0a1b2c3d (10.244.1.5,
    /// fd00:42:0:1::5) and veth9f8e7d6c (10.244.1.6).
    const LISTING: &str = include_str!("../../nft/tests/data/antispoof.json");

    #[test]
    fn prune_reads_a_real_listing() {
        let listing = Listing::parse(LISTING).unwrap();
        let s = prune_script(&listing, |v| v == "veth0a1b2c3d").unwrap();
        assert_eq!(
            s,
            "delete element bridge twill-antispoof ports { \"veth9f8e7d6c\" }\ndelete element bridge twill-antispoof src4 { \"veth9f8e7d6c\" . 10.244.1.6 }\n"
        );
        let s = prune_script(&listing, |_| false).unwrap();
        assert_eq!(s.lines().count(), 5);
        assert!(s.contains("src6 { \"veth0a1b2c3d\" . fd00:42:0:1::5 }"));
    }

    #[test]
    fn gc_rebuilds_the_chain_with_the_deletions_in_one_transaction() {
        let nft = twill_nft::RecordingNft::new();
        nft.reply(Ok(LISTING.to_string()));
        prune_with(&nft, |v| v == "veth0a1b2c3d").unwrap();
        let calls = nft.calls();
        assert_eq!(
            calls[0].args,
            ["-j", "list", "table", "bridge", "twill-antispoof"].map(String::from)
        );
        assert_eq!(
            nft.scripts(),
            [chain_script()
                + "delete element bridge twill-antispoof ports { \"veth9f8e7d6c\" }\n\
                   delete element bridge twill-antispoof src4 { \"veth9f8e7d6c\" . 10.244.1.6 }\n"]
        );
        // No table: nothing at all is applied.
        let nft = twill_nft::RecordingNft::new();
        nft.fail("Error: No such file or directory");
        prune_with(&nft, |_| false).unwrap();
        assert_eq!(nft.calls().len(), 1);
        // A rejected transaction is a CNI error with nft's message.
        let nft = twill_nft::RecordingNft::new();
        nft.reply(Ok(LISTING.to_string()))
            .fail("Error: Could not process rule");
        let e = prune_with(&nft, |_| true).unwrap_err();
        assert_eq!(e.msg, "anti-spoofing rules: Error: Could not process rule");
    }
}
