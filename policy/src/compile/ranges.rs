//! Address range maths: families, addresses as numbers, and sets of addresses as sorted,
//! disjoint ranges (what the interval sets and the interpreter work on).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Family of an address.
    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
    pub(super) fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }
    pub(super) fn nft_proto(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
    pub(super) fn addr_type(self) -> &'static str {
        match self {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }
    pub(super) fn addr(self, v: u128) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
        }
    }
}

pub(super) const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

pub(super) fn ip_num(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// A set of addresses of one family as sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges(pub Vec<(u128, u128)>);

impl Ranges {
    pub(super) fn normalize(mut v: Vec<(u128, u128)>) -> Ranges {
        v.sort();
        let mut out: Vec<(u128, u128)> = Vec::with_capacity(v.len());
        for (a, b) in v {
            if let Some(last) = out.last_mut() {
                if a <= last.1.saturating_add(1) {
                    last.1 = last.1.max(b);
                    continue;
                }
            }
            out.push((a, b));
        }
        Ranges(out)
    }

    pub(super) fn subtract(&self, cut: &Ranges) -> Ranges {
        let mut out = Vec::new();
        for &(mut a, b) in &self.0 {
            let mut alive = true;
            for &(c, d) in &cut.0 {
                if d < a || c > b {
                    continue;
                }
                if c > a {
                    out.push((a, c - 1));
                }
                if d >= b {
                    alive = false;
                    break;
                }
                a = d + 1;
            }
            if alive {
                out.push((a, b));
            }
        }
        Ranges::normalize(out)
    }

    /// Whether `v` is in the set: a binary search, the ranges being sorted and disjoint
    /// (every `Ranges` is built by [`Ranges::normalize`] or from sorted, deduplicated
    /// single addresses).
    pub fn contains(&self, v: u128) -> bool {
        let i = self.0.partition_point(|&(a, _)| a <= v);
        i > 0 && v <= self.0[i - 1].1
    }

    pub(super) fn render(&self, fam: Family) -> Vec<String> {
        self.0
            .iter()
            .map(|&(a, b)| {
                let size = b - a;
                if size == 0 {
                    fam.addr(a).to_string()
                } else if size & size.wrapping_add(1) == 0 && a & size == 0 {
                    let bits = match fam {
                        Family::V4 => 32,
                        Family::V6 => 128,
                    };
                    format!("{}/{}", fam.addr(a), bits - size.count_ones())
                } else {
                    format!("{}-{}", fam.addr(a), fam.addr(b))
                }
            })
            .collect()
    }
}

pub(super) fn net_range(n: &ipnet::IpNet) -> (Family, (u128, u128)) {
    let fam = Family::of(n.addr());
    (fam, (ip_num(n.network()), ip_num(n.broadcast())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_contains_is_a_binary_search_over_sorted_disjoint_ranges() {
        // A deterministic scatter of ranges, overlapping and adjacent ones included.
        let mut raw = Vec::new();
        let mut x: u128 = 12345;
        for _ in 0..2000 {
            x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64);
            let a = x % 100_000;
            raw.push((a, a + x % 40));
        }
        let r = Ranges::normalize(raw.clone());
        // The invariant `contains` relies on.
        assert!(r.0.iter().all(|(a, b)| a <= b));
        assert!(
            r.0.windows(2).all(|w| w[0].1 + 1 < w[1].0),
            "sorted, disjoint, apart"
        );
        for v in 0..100_100 {
            let linear = raw.iter().any(|&(a, b)| a <= v && v <= b);
            assert_eq!(r.contains(v), linear, "{v}");
        }
        assert!(!Ranges::default().contains(0));
        let cut = r.subtract(&Ranges::normalize(vec![(500, 60_000)]));
        assert!(cut.0.windows(2).all(|w| w[0].1 + 1 < w[1].0));
        assert!(!cut.contains(500) && !cut.contains(60_000));
    }
}
