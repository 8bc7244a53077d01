//! Reads the named counter objects of one nftables table (`counter pod-in/<ns>/<pod> { }` in
//! twill-policy's table, `counter vxlan_from_non_peer { }` in twilld's underlay guard)
//! straight from the kernel with a single nf_tables GETOBJ dump over netlink ([`crate::nfnl`]).
//!
//! Why not `nft -j list counters table inet T`: nft 1.0.6 fills its whole cache before any
//! listing, set elements included, so at 10k pods (110k set elements) every listing costs
//! 0.5-1 s of CPU and holds the nfnetlink mutex, while this dump walks only the counter
//! objects (a few hundred) and takes well under a millisecond.

use std::collections::BTreeMap;

use crate::nfnl::{
    self, attrs, Msg, NFTA_COUNTER_PACKETS, NFTA_OBJ_DATA, NFTA_OBJ_NAME, NFTA_OBJ_TABLE,
    NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER,
};
use crate::NftError;

/// The GETOBJ dump request for the counters of `inet <table>`.
pub fn request(table: &str) -> Msg {
    let mut m = Msg::nftables(
        nfnl::NFT_MSG_GETOBJ,
        nfnl::NLM_F_REQUEST | nfnl::NLM_F_DUMP,
        nfnl::NFPROTO_INET,
    );
    m.str_attr(NFTA_OBJ_TABLE, table)
        .attr(NFTA_OBJ_TYPE, &NFT_OBJECT_COUNTER.to_be_bytes());
    m
}

/// (name, packets) of one NEWOBJ message body (after nfgenmsg), if it is a counter.
pub fn parse_object(body: &[u8]) -> Option<(String, u64)> {
    let (mut name, mut packets, mut counter) = (None, None, false);
    for (t, p) in attrs(body) {
        match t {
            NFTA_OBJ_NAME => {
                let p = p.split(|&c| c == 0).next().unwrap_or(p);
                name = Some(String::from_utf8_lossy(p).into_owned());
            }
            NFTA_OBJ_TYPE => {
                counter = p
                    .get(..4)
                    .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
                    == Some(NFT_OBJECT_COUNTER)
            }
            NFTA_OBJ_DATA => {
                packets = attrs(p)
                    .find(|(t, _)| *t == NFTA_COUNTER_PACKETS)
                    .and_then(|(_, v)| Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?)))
            }
            _ => {}
        }
    }
    counter.then_some((name?, packets?))
}

/// Packets counted by each named counter of `inet <table>` in this thread's network
/// namespace; empty when the table does not exist.
pub fn read(table: &str) -> Result<BTreeMap<String, u64>, NftError> {
    let mut out = BTreeMap::new();
    let mut conn = nfnl::Conn::open()?;
    let newobj = (nfnl::NFNL_SUBSYS_NFTABLES << 8) | nfnl::NFT_MSG_NEWOBJ;
    conn.dump(&request(table), |kind, body| {
        if kind == newobj {
            if let Some((name, packets)) = parse_object(body) {
                out.insert(name, packets);
            }
        }
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter_obj(name: &str, packets: u64, kind: u32) -> Vec<u8> {
        let mut m = Msg::nftables(nfnl::NFT_MSG_NEWOBJ, 0, nfnl::NFPROTO_INET);
        m.str_attr(NFTA_OBJ_TABLE, "twill-policy")
            .str_attr(NFTA_OBJ_NAME, name)
            .attr(NFTA_OBJ_TYPE, &kind.to_be_bytes())
            .nest(NFTA_OBJ_DATA, |m| {
                m.attr(1, &99u64.to_be_bytes()) // bytes
                    .attr(NFTA_COUNTER_PACKETS, &packets.to_be_bytes());
            });
        m.bytes(1)[20..].to_vec()
    }

    #[test]
    fn request_is_a_filtered_getobj_dump() {
        let r = request("twill-policy").bytes(7);
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), 0x0a13);
        assert_eq!(u16::from_ne_bytes([r[6], r[7]]), 0x301);
        assert_eq!(r[16], nfnl::NFPROTO_INET);
        let a: Vec<(u16, Vec<u8>)> = attrs(&r[20..]).map(|(t, p)| (t, p.to_vec())).collect();
        assert_eq!(
            a,
            vec![
                (NFTA_OBJ_TABLE, b"twill-policy\0".to_vec()),
                (NFTA_OBJ_TYPE, vec![0, 0, 0, 1]),
            ]
        );
    }

    #[test]
    fn counters_are_parsed_and_other_objects_skipped() {
        assert_eq!(
            parse_object(&counter_obj("pod-in/x/a", 3, NFT_OBJECT_COUNTER)),
            Some(("pod-in/x/a".into(), 3))
        );
        assert_eq!(
            parse_object(&counter_obj("pod-out/y/b", 1 << 40, NFT_OBJECT_COUNTER)),
            Some(("pod-out/y/b".into(), 1 << 40))
        );
        assert_eq!(parse_object(&counter_obj("quota-x", 5, 2)), None);
        assert_eq!(parse_object(&[0xff; 12]), None);
    }
}
