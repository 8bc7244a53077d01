//! The typed reader of `nft -j list ...` output (JSON schema 1, as nft 1.0.x prints it): the
//! objects twill's parsers look at (tables, chains, sets and maps with their elements, rules
//! with their comments and handles, named counters), each a struct with the fields they use.
//! Anything else in a listing (metainfo, other object kinds, fields not named here) is skipped.

use serde::Deserialize;

/// A whole listing: `{"nftables": [ {KIND: {...}}, ... ]}`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Listing {
    pub nftables: Vec<Item>,
}

/// One element of the `nftables` array: an object keyed by its kind. Exactly one field is set
/// for the kinds read here; all are `None` for kinds that are not (metainfo, flowtables...).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Item {
    pub table: Option<Table>,
    pub chain: Option<Chain>,
    pub set: Option<Set>,
    pub map: Option<Set>,
    pub rule: Option<Rule>,
    pub counter: Option<Counter>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Table {
    #[serde(default)]
    pub family: String,
    pub name: String,
    #[serde(default)]
    pub handle: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Chain {
    #[serde(default)]
    pub family: String,
    #[serde(default)]
    pub table: String,
    pub name: String,
    #[serde(default)]
    pub handle: u64,
    /// Base chains only.
    pub hook: Option<String>,
    pub prio: Option<i64>,
    pub policy: Option<String>,
}

/// A set, or a map (whose elements are `[key, value]` pairs, read as [`Elem::Other`]).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Set {
    #[serde(default)]
    pub family: String,
    #[serde(default)]
    pub table: String,
    pub name: String,
    #[serde(default)]
    pub handle: u64,
    /// The key type: a name (`"ipv4_addr"`) or, for concatenations, a list of names.
    #[serde(rename = "type")]
    pub key_type: Option<serde_json::Value>,
    #[serde(default)]
    pub flags: Vec<String>,
    /// Absent when the set is empty, or listed with `-t`.
    #[serde(default)]
    pub elem: Vec<Elem>,
}

/// A set element, in the shapes nft lists them.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Elem {
    /// An address, interface name or other value nft prints as a string.
    Str(String),
    /// A number (integer keys such as marks or ports).
    Num(u64),
    /// `{"prefix": {"addr": A, "len": N}}` in interval sets.
    Prefix { prefix: Prefix },
    /// `{"range": [A, B]}` in interval sets.
    Range { range: Vec<Elem> },
    /// `{"concat": [A, B, ...]}`: a concatenated key.
    Concat { concat: Vec<Elem> },
    /// Anything else: elements with a comment, timeout or counter (`{"elem": {...}}`), map
    /// entries (`[key, value]`).
    Other(serde_json::Value),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Prefix {
    pub addr: String,
    pub len: u8,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Rule {
    #[serde(default)]
    pub family: String,
    #[serde(default)]
    pub table: String,
    pub chain: String,
    #[serde(default)]
    pub handle: u64,
    pub comment: Option<String>,
}

/// A named counter object (`counter NAME { }`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Counter {
    #[serde(default)]
    pub family: String,
    #[serde(default)]
    pub table: String,
    pub name: String,
    #[serde(default)]
    pub handle: u64,
    #[serde(default)]
    pub packets: u64,
    #[serde(default)]
    pub bytes: u64,
}

impl Listing {
    /// Parses nft's JSON output.
    pub fn parse(json: &str) -> Result<Listing, serde_json::Error> {
        serde_json::from_str(json)
    }

    pub fn tables(&self) -> impl Iterator<Item = &Table> {
        self.each(|i| i.table.as_ref())
    }

    pub fn chains(&self) -> impl Iterator<Item = &Chain> {
        self.each(|i| i.chain.as_ref())
    }

    /// The sets, without the maps.
    pub fn sets(&self) -> impl Iterator<Item = &Set> {
        self.each(|i| i.set.as_ref())
    }

    pub fn maps(&self) -> impl Iterator<Item = &Set> {
        self.each(|i| i.map.as_ref())
    }

    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.each(|i| i.rule.as_ref())
    }

    pub fn counters(&self) -> impl Iterator<Item = &Counter> {
        self.each(|i| i.counter.as_ref())
    }

    /// The objects of one kind, in listing order.
    fn each<'a, T: 'a>(
        &'a self,
        kind: impl Fn(&'a Item) -> Option<&'a T>,
    ) -> impl Iterator<Item = &'a T> {
        self.nftables.iter().filter_map(kind)
    }

    /// The set named `name`, if listed.
    pub fn set(&self, name: &str) -> Option<&Set> {
        self.sets().find(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(name: &str) -> Listing {
        let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Listing::parse(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn strs(elems: &[Elem]) -> Vec<&str> {
        elems
            .iter()
            .map(|e| match e {
                Elem::Str(s) => s.as_str(),
                other => panic!("not a string element: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn unknown_kinds_and_fields_are_skipped() {
        let l = Listing::parse(
            r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"flowtable": {"name": "f"}},
                {"table": {"family": "inet", "name": "t", "handle": 3, "comment": "c"}}]}"#,
        )
        .unwrap();
        assert_eq!(l.nftables.len(), 3);
        assert_eq!(
            l.tables().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["t"]
        );
        assert_eq!(l.tables().next().unwrap().handle, 3);
        assert!(Listing::parse(r#"{"tables": []}"#).is_err());
        assert!(Listing::parse("").is_err());
    }

    #[test]
    fn element_shapes() {
        let l = Listing::parse(
            r#"{"nftables": [{"set": {"family": "inet", "table": "t", "name": "s",
                "elem": ["a", 7, {"prefix": {"addr": "10.0.0.0", "len": 8}},
                         {"range": ["10.0.0.1", "10.0.0.9"]}, {"concat": ["veth1", "10.0.0.2"]},
                         {"elem": {"val": "b", "comment": "c"}}]}}]}"#,
        )
        .unwrap();
        let s = l.set("s").unwrap();
        assert_eq!(s.elem[0], Elem::Str("a".into()));
        assert_eq!(s.elem[1], Elem::Num(7));
        assert_eq!(
            s.elem[2],
            Elem::Prefix {
                prefix: Prefix {
                    addr: "10.0.0.0".into(),
                    len: 8
                }
            }
        );
        assert!(matches!(&s.elem[3], Elem::Range { range } if range.len() == 2));
        assert!(matches!(&s.elem[4], Elem::Concat { concat } if concat.len() == 2));
        assert!(matches!(&s.elem[5], Elem::Other(_)));
    }

    // The listings under tests/data were captured with nft 1.0.6 in a scratch network
    // namespace from the scripts twill writes: the underlay guard (with a /32 in an interval
    // set), Flannel's ip table as masq writes it, the anti-spoofing table with two pods, and
    // twill-policy's golden S02-pod-cidrs table with and without elements (`-t`).

    #[test]
    fn the_underlay_guard_listing() {
        let l = data("underlay.json");
        assert_eq!(l.tables().next().unwrap().name, "twill-underlay");
        assert_eq!(
            strs(&l.set("peers4").unwrap().elem),
            ["198.18.0.12", "198.18.0.13"]
        );
        assert_eq!(strs(&l.set("peers6").unwrap().elem), ["2001:db8::12"]);
        let subnets = &l.set("peer_subnets4").unwrap();
        assert_eq!(subnets.flags, ["interval"]);
        // A single-address subnet is listed as a plain address, the others as prefixes.
        assert_eq!(
            subnets.elem,
            [
                Elem::Prefix {
                    prefix: Prefix {
                        addr: "10.244.2.0".into(),
                        len: 24
                    }
                },
                Elem::Prefix {
                    prefix: Prefix {
                        addr: "10.244.3.0".into(),
                        len: 24
                    }
                },
                Elem::Str("10.244.9.7".into()),
            ]
        );
        assert!(l.set("peer_subnets6").unwrap().elem.is_empty());
        let comments: Vec<&str> = l.rules().filter_map(|r| r.comment.as_deref()).collect();
        assert_eq!(
            comments,
            [
                "pod source spoofing",
                "pod source not leased to a peer",
                "VXLAN from a non-peer (flannel#961)",
                "pods never reach a VXLAN port"
            ]
        );
        let pre = l.chains().find(|c| c.name == "prerouting").unwrap();
        assert_eq!(
            (pre.hook.as_deref(), pre.prio),
            (Some("prerouting"), Some(-300))
        );
        assert!(l
            .rules()
            .all(|r| r.handle > 0 && r.table == "twill-underlay"));
    }

    #[test]
    fn the_masquerade_listing() {
        let l = data("masq-ipv4.json");
        let t = l.tables().next().unwrap();
        assert_eq!((t.family.as_str(), t.name.as_str()), ("ip", "flannel-ipv4"));
        assert_eq!(l.rules().count(), 8);
        assert_eq!(l.rules().filter(|r| r.chain == "postrtg").count(), 6);
        let chains: Vec<&str> = l.chains().map(|c| c.name.as_str()).collect();
        assert_eq!(chains, ["postrtg", "forward"]);
    }

    #[test]
    fn the_anti_spoofing_listing() {
        let l = data("antispoof.json");
        let mut ports = strs(&l.set("ports").unwrap().elem);
        ports.sort();
        assert_eq!(ports, ["veth0a1b2c3d", "veth9f8e7d6c"]);
        let src4 = &l.set("src4").unwrap();
        assert_eq!(
            src4.key_type,
            Some(serde_json::json!(["ifname", "ipv4_addr"]))
        );
        assert_eq!(
            src4.elem[0],
            Elem::Concat {
                concat: vec![
                    Elem::Str("veth0a1b2c3d".into()),
                    Elem::Str("10.244.1.5".into())
                ]
            }
        );
        assert_eq!(l.set("src6").unwrap().elem.len(), 1);
        assert_eq!(l.rules().filter(|r| r.chain == "pods").count(), 7);
    }

    #[test]
    fn the_policy_listing_with_and_without_elements() {
        let full = data("policy.json");
        let bare = data("policy-no-elements.json");
        for l in [&full, &bare] {
            let maps: Vec<&str> = l.maps().map(|m| m.name.as_str()).collect();
            assert_eq!(maps, ["ingress_v4", "ingress_v6", "egress_v4", "egress_v6"]);
            let counters: Vec<&str> = l.counters().map(|c| c.name.as_str()).collect();
            assert!(counters.contains(&"pod-in/x/a") && counters.contains(&"pod-out/x/c"));
            assert!(l
                .chains()
                .any(|c| c.name == "forward" && c.hook.as_deref() == Some("forward")));
            assert!(l
                .chains()
                .any(|c| c.name == "pod-in/x/a" && c.hook.is_none()));
            assert_eq!(l.rules().count(), full.rules().count());
        }
        // Map elements are [key, value] pairs; -t lists none.
        let m = full.maps().next().unwrap();
        assert_eq!(m.elem.len(), 3);
        assert!(m
            .elem
            .iter()
            .all(|e| matches!(e, Elem::Other(serde_json::Value::Array(_)))));
        assert!(bare.maps().all(|m| m.elem.is_empty()));
        assert!(full.counters().all(|c| c.packets == 0 && c.bytes == 0));
    }
}
