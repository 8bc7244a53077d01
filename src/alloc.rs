//! Subnet acquisition in etcd mode: the decision half of Flannel's `tryAcquireLease`
//! (`pkg/subnet/etcd/local_manager.go`), as a pure function of the listed leases.
//!
//! Order, as in Flannel:
//! 1. the first lease whose `PublicIP` is ours: reuse it if config-compatible, else delete it;
//! 2. the previous subnet from `subnet.env`, if no lease holds it and it is config-compatible;
//! 3. a random free subnet among the first 100 free ones from `SubnetMin` to `SubnetMax`
//!    (IPv6 chosen independently when enabled), else `out of subnets`.
//!
//! The caller executes the plan (delete, then put / create-if-absent). When the create loses a
//! race (key already exists), the caller re-lists and calls [`plan_acquire`] again, pausing
//! briefly after every [`RACE_RETRIES`] lost races. Flannel gives up after [`RACE_RETRIES`]
//! with [`AllocError::MaxRetries`]'s text and exits; retrying is compatible, and every key in
//! the listing (a garbage value included) counts as taken, so a race is only lost to a node
//! that created its key after the listing. The plan is deterministic given the rng.
//!
//! The free-subnet scan jumps over each taken range instead of testing every candidate against
//! every lease (Flannel's way): a lease whose key covers much of the range (a leftover /8 v6
//! key when subnets are /64) would otherwise mean 2^32 steps before `out of subnets`.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use twill_formats::lease::{Lease, SubnetKey};
use twill_formats::net_conf::NetConfig;

/// `raceRetries` in Flannel.
pub const RACE_RETRIES: usize = 10;
/// Free candidates collected before picking one at random.
pub const MAX_CANDIDATES: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Flannel's text.
    #[error("out of subnets")]
    OutOfSubnets,
    /// Flannel's text, after [`RACE_RETRIES`] lost races.
    #[error("max retries reached trying to acquire a subnet")]
    MaxRetries,
    /// The config was not passed through [`NetConfig::check`], or IPv4 is disabled (etcd subnet
    /// keys always carry an IPv4 subnet).
    #[error("cannot allocate subnets: {0}")]
    BadConfig(&'static str),
}

/// What [`plan_acquire`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct AcquireInput<'a> {
    /// A checked config ([`NetConfig::check`]).
    pub config: &'a NetConfig,
    /// Every lease under `<prefix>/subnets`, in etcd key order.
    pub existing: &'a [Lease],
    pub public_ip: Ipv4Addr,
    /// `FLANNEL_SUBNET` from the previous `subnet.env` (the network, e.g. `10.5.72.0/24`).
    pub previous_subnet: Option<Ipv4Net>,
    /// `FLANNEL_IPV6_SUBNET` from the previous `subnet.env`.
    pub previous_ipv6_subnet: Option<Ipv6Net>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcquireDecision {
    /// Our lease (matched by PublicIP) is compatible: put our attrs on it again. A reservation
    /// (no etcd lease) should stay without TTL.
    ReuseOwn {
        key: SubnetKey,
        is_reservation: bool,
    },
    /// The subnet from `subnet.env` is free: create it.
    ReusePrevious(SubnetKey),
    /// A newly picked subnet: create it.
    Allocate(SubnetKey),
}

impl AcquireDecision {
    pub fn key(&self) -> &SubnetKey {
        match self {
            AcquireDecision::ReuseOwn { key, .. } => key,
            AcquireDecision::ReusePrevious(k) | AcquireDecision::Allocate(k) => k,
        }
    }

    /// Whether the key must be created with a create-if-absent transaction (which can lose a
    /// race), rather than put over our own existing key.
    pub fn creates(&self) -> bool {
        !matches!(self, AcquireDecision::ReuseOwn { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquirePlan {
    pub decision: AcquireDecision,
    /// Our own old lease, incompatible with the config: delete before acting on `decision`.
    pub delete_first: Vec<SubnetKey>,
}

fn v6_empty(n: Option<Ipv6Net>) -> bool {
    n.is_none_or(|n| n.addr().is_unspecified() && n.prefix_len() == 0)
}

/// Flannel's `isSubnetConfigCompat`: inside [SubnetMin, SubnetMax] and prefix == SubnetLen.
pub fn is_subnet_config_compat(config: &NetConfig, sn: Ipv4Net) -> bool {
    let (Some(min), Some(max)) = (config.subnet_min, config.subnet_max) else {
        return false;
    };
    sn.addr() >= min && sn.addr() <= max && sn.prefix_len() == config.subnet_len
}

/// Flannel's `isIPv6SubnetConfigCompat`: with IPv6 disabled the lease must have no v6 part;
/// enabled, it must have one inside [IPv6SubnetMin, IPv6SubnetMax] with prefix IPv6SubnetLen.
pub fn is_ipv6_subnet_config_compat(config: &NetConfig, sn6: Option<Ipv6Net>) -> bool {
    if !config.enable_ipv6 {
        return v6_empty(sn6);
    }
    let (Some(sn6), Some(min), Some(max)) = (sn6, config.ipv6_subnet_min, config.ipv6_subnet_max)
    else {
        return false;
    };
    !v6_empty(Some(sn6))
        && sn6.addr() >= min
        && sn6.addr() <= max
        && sn6.prefix_len() == config.ipv6_subnet_len
}

/// Flannel's `IP4Net.Overlaps`: equal under the shorter of the two masks.
fn overlaps4(a: Ipv4Net, b: Ipv4Net) -> bool {
    let len = a.prefix_len().min(b.prefix_len());
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(a.addr()) & mask == u32::from(b.addr()) & mask
}

fn overlaps6(a: Ipv6Net, b: Ipv6Net) -> bool {
    let len = a.prefix_len().min(b.prefix_len());
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    u128::from(a.addr()) & mask == u128::from(b.addr()) & mask
}

/// Addresses in a subnet of prefix `len` out of `bits` (saturating at `u128::MAX` for a /0 of
/// IPv6, which then holds a single candidate).
fn block_size(bits: u32, len: u8) -> u128 {
    1u128
        .checked_shl(bits - u32::from(len).min(bits))
        .unwrap_or(u128::MAX)
}

/// The first [`MAX_CANDIDATES`] subnets (as start addresses of `size`-address blocks stepped
/// from `min`, as Flannel's `sn.Next()` does, up to a start of `max`) that overlap none of
/// `taken` (inclusive address ranges, in any order). Each taken range is passed in one jump,
/// so the cost is O(L log L + candidates), whatever the size of the range. `min` is on a
/// block boundary (the config check refuses a SubnetMin that is not).
fn free_blocks(min: u128, max: u128, size: u128, mut taken: Vec<(u128, u128)>) -> Vec<u128> {
    taken.sort_unstable();
    let mut taken = taken.into_iter().peekable();
    let mut free = Vec::new();
    let mut ip = min;
    while ip <= max && free.len() < MAX_CANDIDATES {
        let last = ip.saturating_add(size - 1);
        // A range ending before this block ends before every later block too.
        while taken.next_if(|&(_, end)| end < ip).is_some() {}
        // Sorted by start: if the first remaining range starts after this block, none touches it.
        let next = match taken.peek() {
            Some(&(start, end)) if start <= last => {
                // Taken: the first block that starts after `end`.
                ((end - ip) / size + 1)
                    .checked_mul(size)
                    .and_then(|step| ip.checked_add(step))
            }
            _ => {
                free.push(ip);
                ip.checked_add(size)
            }
        };
        match next {
            Some(n) => ip = n,
            None => break,
        }
    }
    free
}

/// Decide which subnet to take. See the module docs for the rules.
pub fn plan_acquire<R: rand::Rng + ?Sized>(
    input: &AcquireInput,
    rng: &mut R,
) -> Result<AcquirePlan, AllocError> {
    let config = input.config;
    if !config.enable_ipv4 {
        return Err(AllocError::BadConfig("etcd mode needs EnableIPv4"));
    }
    let (Some(min), Some(max)) = (config.subnet_min, config.subnet_max) else {
        return Err(AllocError::BadConfig(
            "SubnetMin/SubnetMax not set (config not checked)",
        ));
    };
    if config.subnet_len == 0 || config.subnet_len > 32 {
        return Err(AllocError::BadConfig(
            "SubnetLen not set (config not checked)",
        ));
    }
    let v6_range = if config.enable_ipv6 {
        match (config.ipv6_subnet_min, config.ipv6_subnet_max) {
            (Some(a), Some(b)) if (1..=128).contains(&config.ipv6_subnet_len) => Some((a, b)),
            _ => {
                return Err(AllocError::BadConfig(
                    "IPv6SubnetMin/IPv6SubnetMax/IPv6SubnetLen not set (config not checked)",
                ))
            }
        }
    } else {
        None
    };

    let mut delete_first = Vec::new();
    // 1. Our own lease, by public IP (only the first match, as Flannel's findLeaseByIP).
    if let Some(own) = input
        .existing
        .iter()
        .find(|l| l.attrs.public_ip == input.public_ip)
    {
        if is_subnet_config_compat(config, own.key.ipv4)
            && is_ipv6_subnet_config_compat(config, own.key.ipv6)
        {
            return Ok(AcquirePlan {
                decision: AcquireDecision::ReuseOwn {
                    key: own.key,
                    is_reservation: own.is_reservation(),
                },
                delete_first,
            });
        }
        delete_first.push(own.key);
    }
    // Like Flannel, the rest decides on the list as it was read: the lease deleted above still
    // counts as taken.

    // 2. The previous subnet from subnet.env.
    if let Some(prev) = input.previous_subnet.map(|p| p.trunc()) {
        let prev6 = input.previous_ipv6_subnet.map(|p| p.trunc());
        let held = input.existing.iter().any(|l| {
            overlaps4(l.key.ipv4, prev)
                || match (prev6, l.key.ipv6) {
                    (Some(p6), Some(l6)) => {
                        config.enable_ipv6 && !v6_empty(Some(l6)) && overlaps6(l6, p6)
                    }
                    _ => false,
                }
        });
        if !held
            && is_subnet_config_compat(config, prev)
            && is_ipv6_subnet_config_compat(config, prev6)
        {
            let ipv6 = if config.enable_ipv6 { prev6 } else { None };
            return Ok(AcquirePlan {
                decision: AcquireDecision::ReusePrevious(SubnetKey::new(prev, ipv6)),
                delete_first,
            });
        }
    }

    // 3. Allocate.
    let len = config.subnet_len;
    let taken4 = input
        .existing
        .iter()
        .map(|l| {
            let n = l.key.ipv4.trunc();
            (
                u128::from(u32::from(n.network())),
                u128::from(u32::from(n.broadcast())),
            )
        })
        .collect();
    let cands: Vec<Ipv4Net> = free_blocks(
        u128::from(u32::from(min)),
        u128::from(u32::from(max)),
        block_size(32, len),
        taken4,
    )
    .into_iter()
    .map(|ip| Ipv4Net::new(Ipv4Addr::from(ip as u32), len).expect("len <= 32"))
    .collect();
    let mut cands6: Vec<Ipv6Net> = Vec::new();
    if let Some((min6, max6)) = v6_range {
        let len6 = config.ipv6_subnet_len;
        // Leases without a v6 part do not block v6 subnets (Flannel would dereference a nil
        // IP here).
        let taken6 = input
            .existing
            .iter()
            .filter_map(|l| l.key.ipv6.filter(|n| !v6_empty(Some(*n))))
            .map(|n| {
                let n = n.trunc();
                (u128::from(n.network()), u128::from(n.broadcast()))
            })
            .collect();
        cands6 = free_blocks(
            u128::from(min6),
            u128::from(max6),
            block_size(128, len6),
            taken6,
        )
        .into_iter()
        .map(|ip| Ipv6Net::new(Ipv6Addr::from(ip), len6).expect("len <= 128"))
        .collect();
    }
    if cands.is_empty() || (v6_range.is_some() && cands6.is_empty()) {
        return Err(AllocError::OutOfSubnets);
    }
    let sn = cands[rng.random_range(0..cands.len())];
    let sn6 = if v6_range.is_some() {
        Some(cands6[rng.random_range(0..cands6.len())])
    } else {
        None
    };
    Ok(AcquirePlan {
        decision: AcquireDecision::Allocate(SubnetKey::new(sn, sn6)),
        delete_first,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rand::rngs::StdRng;
    use rand::Rng;
    use rand::SeedableRng;

    use super::*;
    use twill_formats::lease::LeaseAttrs;

    /// The scan as Flannel writes it: every block against every range.
    fn free_blocks_naive(min: u128, max: u128, size: u128, taken: &[(u128, u128)]) -> Vec<u128> {
        let mut free = Vec::new();
        let mut ip = min;
        while ip <= max && free.len() < MAX_CANDIDATES {
            let last = ip + size - 1;
            if !taken.iter().any(|&(a, b)| a <= last && b >= ip) {
                free.push(ip);
            }
            ip += size;
        }
        free
    }

    #[test]
    fn free_blocks_matches_the_block_by_block_scan() {
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..2000 {
            let size = 1u128 << rng.random_range(0..4);
            let min = size * rng.random_range(0..4);
            let max = min + size * rng.random_range(0..200);
            let taken: Vec<(u128, u128)> = (0..rng.random_range(0..12))
                .map(|_| {
                    // Aligned CIDR blocks of any size, as lease keys are, inside and around the range.
                    let bsize = 1u128 << rng.random_range(0..8);
                    let start = bsize * rng.random_range(0..(max + 64) / bsize + 1);
                    (start, start + bsize - 1)
                })
                .collect();
            assert_eq!(
                free_blocks(min, max, size, taken.clone()),
                free_blocks_naive(min, max, size, &taken),
                "min {min} max {max} size {size} taken {taken:?}"
            );
        }
    }

    #[test]
    fn a_key_covering_the_whole_range_is_passed_in_one_step() {
        // /64 subnets of a /32: 2^32 candidates, all inside one leftover /8 key. Block by block
        // this takes minutes; here it is one jump.
        let size = block_size(128, 64);
        let min = 0xfc00_0000u128 << 96;
        let max = min + (u128::from(u32::MAX) << 64);
        let all = (
            0xfc00u128 << 112,
            (0xfc00u128 << 112) | ((1u128 << 120) - 1),
        );
        assert!(free_blocks(min, max, size, vec![all]).is_empty());
        // And the block after a taken range is found.
        let first = (min, min + 5 * size - 1);
        assert_eq!(free_blocks(min, max, size, vec![first])[0], min + 5 * size);
    }

    fn cfg(json: &str) -> NetConfig {
        NetConfig::parse_and_check(json).unwrap()
    }

    fn v4cfg() -> NetConfig {
        cfg(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
    }

    fn dualcfg() -> NetConfig {
        cfg(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48",
                "Backend":{"Type":"vxlan"}}"#,
        )
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn lease(key: &str, public_ip: &str, etcd_lease_id: i64) -> Lease {
        Lease {
            key: SubnetKey::parse(key).unwrap(),
            attrs: LeaseAttrs {
                public_ip: ip(public_ip),
                backend_type: "vxlan".into(),
                ..LeaseAttrs::default()
            },
            etcd_lease_id,
            ttl_seconds: if etcd_lease_id == 0 { -1 } else { 86400 },
            mod_revision: 1,
        }
    }

    fn input<'a>(config: &'a NetConfig, existing: &'a [Lease], me: &str) -> AcquireInput<'a> {
        AcquireInput {
            config,
            existing,
            public_ip: ip(me),
            previous_subnet: None,
            previous_ipv6_subnet: None,
        }
    }

    fn rng(seed: u64) -> StdRng {
        StdRng::seed_from_u64(seed)
    }

    #[test]
    fn reuses_own_compatible_lease() {
        let c = v4cfg();
        let ls = [
            lease("10.244.3.0-24", "198.18.0.3", 5),
            lease("10.244.9.0-24", "198.18.0.9", 6),
        ];
        let p = plan_acquire(&input(&c, &ls, "198.18.0.9"), &mut rng(1)).unwrap();
        assert_eq!(
            p,
            AcquirePlan {
                decision: AcquireDecision::ReuseOwn {
                    key: SubnetKey::parse("10.244.9.0-24").unwrap(),
                    is_reservation: false
                },
                delete_first: vec![]
            }
        );
        assert!(!p.decision.creates());
    }

    #[test]
    fn reuses_own_reservation() {
        let c = v4cfg();
        let ls = [lease("10.244.200.0-24", "198.18.0.9", 0)];
        let p = plan_acquire(&input(&c, &ls, "198.18.0.9"), &mut rng(1)).unwrap();
        assert_eq!(
            p.decision,
            AcquireDecision::ReuseOwn {
                key: SubnetKey::parse("10.244.200.0-24").unwrap(),
                is_reservation: true
            }
        );
    }

    #[test]
    fn reuse_wins_over_previous_subnet() {
        let c = v4cfg();
        let ls = [lease("10.244.9.0-24", "198.18.0.9", 6)];
        let mut i = input(&c, &ls, "198.18.0.9");
        i.previous_subnet = Some("10.244.5.0/24".parse().unwrap());
        let p = plan_acquire(&i, &mut rng(1)).unwrap();
        assert_eq!(p.decision.key().to_string(), "10.244.9.0-24");
    }

    #[test]
    fn incompatible_own_lease_is_deleted_and_still_counts_as_taken() {
        let c = v4cfg();
        // Prefix differs from SubnetLen.
        let ls = [lease("10.244.8.0-23", "198.18.0.9", 6)];
        let mut i = input(&c, &ls, "198.18.0.9");
        i.previous_subnet = Some("10.244.8.0/24".parse().unwrap());
        for seed in 0..30 {
            let p = plan_acquire(&i, &mut rng(seed)).unwrap();
            assert_eq!(
                p.delete_first,
                vec![SubnetKey::parse("10.244.8.0-23").unwrap()]
            );
            let AcquireDecision::Allocate(k) = p.decision else {
                panic!("{p:?}")
            };
            assert!(!overlaps4(k.ipv4, "10.244.8.0/23".parse().unwrap()), "{k}");
        }
        // Outside [SubnetMin, SubnetMax]: the first /24 is never handed out.
        let ls = [lease("10.244.0.0-24", "198.18.0.9", 6)];
        let p = plan_acquire(&input(&c, &ls, "198.18.0.9"), &mut rng(2)).unwrap();
        assert_eq!(
            p.delete_first,
            vec![SubnetKey::parse("10.244.0.0-24").unwrap()]
        );
        assert!(matches!(p.decision, AcquireDecision::Allocate(_)));
        // A v6 part while IPv6 is disabled is incompatible.
        let ls = [lease("10.244.4.0-24&fc00:0:0:4::-64", "198.18.0.9", 6)];
        let p = plan_acquire(&input(&c, &ls, "198.18.0.9"), &mut rng(2)).unwrap();
        assert_eq!(p.delete_first.len(), 1);
        // ... and a missing v6 part while IPv6 is enabled.
        let d = dualcfg();
        let ls = [lease("10.244.4.0-24", "198.18.0.9", 6)];
        let p = plan_acquire(&input(&d, &ls, "198.18.0.9"), &mut rng(2)).unwrap();
        assert_eq!(p.delete_first.len(), 1);
        assert_ne!(p.decision.key().ipv4.to_string(), "10.244.4.0/24");
    }

    #[test]
    fn only_first_lease_with_our_ip_is_considered() {
        let c = v4cfg();
        let ls = [
            lease("10.244.0.0-24", "198.18.0.9", 6),
            lease("10.244.7.0-24", "198.18.0.9", 7),
        ];
        let p = plan_acquire(&input(&c, &ls, "198.18.0.9"), &mut rng(3)).unwrap();
        assert_eq!(
            p.delete_first,
            vec![SubnetKey::parse("10.244.0.0-24").unwrap()]
        );
        assert!(matches!(p.decision, AcquireDecision::Allocate(_)));
    }

    #[test]
    fn previous_subnet_reused_when_free_and_compatible() {
        let c = v4cfg();
        let ls = [lease("10.244.3.0-24", "198.18.0.3", 5)];
        let mut i = input(&c, &ls, "198.18.0.9");
        // subnet.env holds 10.244.72.1/24; the caller passes the network, host bits are dropped anyway.
        i.previous_subnet = Some("10.244.72.1/24".parse().unwrap());
        let p = plan_acquire(&i, &mut rng(4)).unwrap();
        assert_eq!(
            p.decision,
            AcquireDecision::ReusePrevious(SubnetKey::parse("10.244.72.0-24").unwrap())
        );
        assert!(p.decision.creates());
        assert!(p.delete_first.is_empty());
    }

    #[test]
    fn previous_subnet_not_reused_when_taken_or_incompatible() {
        let c = v4cfg();
        let taken = [lease("10.244.72.0-24", "198.18.0.3", 5)];
        let reserved = [lease("10.244.72.0-24", "198.18.0.3", 0)];
        for (ls, prev) in [
            (&taken[..], "10.244.72.0/24"),
            (&reserved[..], "10.244.72.0/24"),
            (&[][..], "10.245.72.0/24"), // outside Network
            (&[][..], "10.244.72.0/25"), // wrong prefix
            (&[][..], "10.244.0.0/24"),  // below SubnetMin
        ] {
            let mut i = input(&c, ls, "198.18.0.9");
            i.previous_subnet = Some(prev.parse().unwrap());
            let p = plan_acquire(&i, &mut rng(5)).unwrap();
            assert!(
                matches!(p.decision, AcquireDecision::Allocate(_)),
                "{prev}: {p:?}"
            );
            assert_ne!(p.decision.key().ipv4, "10.244.72.0/24".parse().unwrap());
        }
        // IPv6 disabled but subnet.env still has a v6 subnet: Flannel's compat check refuses it.
        let mut i = input(&c, &[], "198.18.0.9");
        i.previous_subnet = Some("10.244.72.0/24".parse().unwrap());
        i.previous_ipv6_subnet = Some("fc00:0:0:72::/64".parse().unwrap());
        assert!(matches!(
            plan_acquire(&i, &mut rng(5)).unwrap().decision,
            AcquireDecision::Allocate(_)
        ));
    }

    #[test]
    fn previous_dual_stack_subnet() {
        let d = dualcfg();
        let mut i = input(&d, &[], "198.18.0.9");
        i.previous_subnet = Some("10.244.72.0/24".parse().unwrap());
        i.previous_ipv6_subnet = Some("fc00:0:0:72::/64".parse().unwrap());
        assert_eq!(
            plan_acquire(&i, &mut rng(6)).unwrap().decision,
            AcquireDecision::ReusePrevious(
                SubnetKey::parse("10.244.72.0-24&fc00:0:0:72::-64").unwrap()
            )
        );
        // Without the v6 half it is not compatible.
        i.previous_ipv6_subnet = None;
        assert!(matches!(
            plan_acquire(&i, &mut rng(6)).unwrap().decision,
            AcquireDecision::Allocate(_)
        ));
        // v6 half held by another node: allocate instead of duplicating it.
        let ls = [lease("10.244.9.0-24&fc00:0:0:72::-64", "198.18.0.3", 5)];
        let mut i = input(&d, &ls, "198.18.0.9");
        i.previous_subnet = Some("10.244.72.0/24".parse().unwrap());
        i.previous_ipv6_subnet = Some("fc00:0:0:72::/64".parse().unwrap());
        let p = plan_acquire(&i, &mut rng(6)).unwrap();
        assert!(matches!(p.decision, AcquireDecision::Allocate(_)), "{p:?}");
    }

    #[test]
    fn allocation_is_deterministic_given_rng_and_in_bounds() {
        let c = v4cfg();
        let a = plan_acquire(&input(&c, &[], "198.18.0.9"), &mut rng(42)).unwrap();
        let b = plan_acquire(&input(&c, &[], "198.18.0.9"), &mut rng(42)).unwrap();
        assert_eq!(a, b);
        let mut seen = BTreeSet::new();
        for seed in 0..2000 {
            let p = plan_acquire(&input(&c, &[], "198.18.0.9"), &mut rng(seed)).unwrap();
            let k = *p.decision.key();
            assert_eq!(k.ipv4.prefix_len(), 24);
            assert_eq!(k.ipv6, None);
            seen.insert(u32::from(k.ipv4.addr()));
        }
        // Uniform over the first 100 free subnets: 10.244.1.0 .. 10.244.100.0.
        assert_eq!(seen.len(), 100);
        assert_eq!(*seen.first().unwrap(), u32::from(ip("10.244.1.0")));
        assert_eq!(*seen.last().unwrap(), u32::from(ip("10.244.100.0")));
    }

    #[test]
    fn subnet_min_max_bounds() {
        let c = cfg(
            r#"{"Network":"10.0.0.0/16","SubnetLen":26,"SubnetMin":"10.0.5.64",
                "SubnetMax":"10.0.5.192","Backend":{"Type":"host-gw"}}"#,
        );
        let mut seen = BTreeSet::new();
        for seed in 0..200 {
            let p = plan_acquire(&input(&c, &[], "198.18.0.9"), &mut rng(seed)).unwrap();
            seen.insert(p.decision.key().to_string());
        }
        let want: BTreeSet<String> = ["10.0.5.64-26", "10.0.5.128-26", "10.0.5.192-26"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn exhaustion_gives_out_of_subnets() {
        let c = cfg(r#"{"Network":"10.0.0.0/28","Backend":{"Type":"host-gw"}}"#);
        // /28 → /30 subnets 10.0.0.4, .8, .12 usable.
        let ls = [
            lease("10.0.0.4-30", "198.18.0.1", 1),
            lease("10.0.0.8-30", "198.18.0.2", 2),
            lease("10.0.0.12-30", "198.18.0.3", 0), // reservation
        ];
        let e = plan_acquire(&input(&c, &ls, "198.18.0.9"), &mut rng(1)).unwrap_err();
        assert_eq!(e, AllocError::OutOfSubnets);
        assert_eq!(e.to_string(), "out of subnets");
        // One free → always that one.
        for seed in 0..20 {
            let p = plan_acquire(&input(&c, &ls[..2], "198.18.0.9"), &mut rng(seed)).unwrap();
            assert_eq!(p.decision.key().to_string(), "10.0.0.12-30");
        }
        // SubnetMin above SubnetMax: nothing to pick.
        let c = cfg(
            r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.9.0","SubnetMax":"10.0.8.0",
                "Backend":{"Type":"host-gw"}}"#,
        );
        assert_eq!(
            plan_acquire(&input(&c, &[], "198.18.0.9"), &mut rng(1)),
            Err(AllocError::OutOfSubnets)
        );
    }

    #[test]
    fn reservations_never_taken_by_another_node() {
        let c = cfg(
            r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.0","SubnetMax":"10.0.4.0",
                "Backend":{"Type":"host-gw"}}"#,
        );
        let ls = [
            lease("10.0.1.0-24", "198.18.0.1", 0),
            lease("10.0.2.0-24", "198.18.0.2", 0),
            lease("10.0.3.0-24", "198.18.0.3", 0),
        ];
        for seed in 0..50 {
            let mut i = input(&c, &ls, "198.18.0.9");
            i.previous_subnet = Some("10.0.2.0/24".parse().unwrap());
            let p = plan_acquire(&i, &mut rng(seed)).unwrap();
            assert_eq!(
                p.decision,
                AcquireDecision::Allocate(SubnetKey::parse("10.0.4.0-24").unwrap())
            );
            assert!(p.delete_first.is_empty());
        }
        // Overlapping with a reservation of another prefix also counts.
        let ls = [lease("10.0.0.0-22", "198.18.0.1", 0)];
        let p = plan_acquire(&input(&c, &ls, "198.18.0.9"), &mut rng(1)).unwrap();
        assert_eq!(p.decision.key().to_string(), "10.0.4.0-24");
    }

    #[test]
    fn dual_stack_allocation_independent_and_v4_only_leases_do_not_block_v6() {
        let d = dualcfg();
        let ls = [
            lease("10.244.1.0-24", "198.18.0.1", 1), // v4-only
            lease("10.244.2.0-24&fc00:0:0:1::-64", "198.18.0.2", 2),
        ];
        let mut pairs = BTreeSet::new();
        for seed in 0..300 {
            let p = plan_acquire(&input(&d, &ls, "198.18.0.9"), &mut rng(seed)).unwrap();
            let AcquireDecision::Allocate(k) = p.decision else {
                panic!()
            };
            let k6 = k.ipv6.unwrap();
            assert_eq!(k6.prefix_len(), 64);
            assert_ne!(k6, "fc00:0:0:1::/64".parse().unwrap());
            assert!(k6.addr() >= "fc00:0:0:2::".parse::<Ipv6Addr>().unwrap());
            assert!(k6.addr() <= "fc00:0:0:65::".parse::<Ipv6Addr>().unwrap());
            assert!(!["10.244.1.0/24", "10.244.2.0/24"].contains(&k.ipv4.to_string().as_str()));
            pairs.insert((k.ipv4, k6));
        }
        // Independent picks: not a fixed v4→v6 mapping.
        let v4s: BTreeSet<_> = pairs.iter().map(|p| p.0).collect();
        assert!(pairs.len() > v4s.len());
    }

    #[test]
    fn v6_exhaustion() {
        let d = cfg(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/124",
                "Backend":{"Type":"host-gw"}}"#,
        );
        // /124 → /126: ::4, ::8, ::c.
        let ls = [
            lease("10.244.1.0-24&fc00::4-126", "198.18.0.1", 1),
            lease("10.244.2.0-24&fc00::8-126", "198.18.0.2", 1),
            lease("10.244.3.0-24&fc00::c-126", "198.18.0.3", 0),
        ];
        assert_eq!(
            plan_acquire(&input(&d, &ls, "198.18.0.9"), &mut rng(1)),
            Err(AllocError::OutOfSubnets)
        );
    }

    #[test]
    fn top_of_address_space_does_not_wrap() {
        let c =
            cfg(r#"{"Network":"255.255.255.0/24","SubnetLen":26,"Backend":{"Type":"host-gw"}}"#);
        let mut seen = BTreeSet::new();
        for seed in 0..100 {
            let p = plan_acquire(&input(&c, &[], "198.18.0.9"), &mut rng(seed)).unwrap();
            seen.insert(p.decision.key().to_string());
        }
        assert_eq!(seen.len(), 3);
        assert!(seen.contains("255.255.255.192-26"));
    }

    #[test]
    fn re_planning_after_a_lost_race_avoids_the_winner() {
        let c = cfg(
            r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.0","SubnetMax":"10.0.2.0",
                "Backend":{"Type":"host-gw"}}"#,
        );
        let first = plan_acquire(&input(&c, &[], "198.18.0.9"), &mut rng(9)).unwrap();
        // Someone else created that key first; the re-list now shows it.
        let winner = Lease {
            key: *first.decision.key(),
            ..lease("10.0.1.0-24", "198.18.0.4", 3)
        };
        let ls = [winner];
        let second = plan_acquire(&input(&c, &ls, "198.18.0.9"), &mut rng(9)).unwrap();
        assert_ne!(second.decision.key(), first.decision.key());
        assert_eq!(
            AllocError::MaxRetries.to_string(),
            "max retries reached trying to acquire a subnet"
        );
    }

    #[test]
    fn unchecked_config_is_an_error() {
        let c =
            NetConfig::parse(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"host-gw"}}"#).unwrap();
        assert!(matches!(
            plan_acquire(&input(&c, &[], "198.18.0.9"), &mut rng(1)),
            Err(AllocError::BadConfig(_))
        ));
        let c = cfg(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48",
                       "Backend":{"Type":"host-gw"}}"#,
        );
        assert!(matches!(
            plan_acquire(&input(&c, &[], "198.18.0.9"), &mut rng(1)),
            Err(AllocError::BadConfig(_))
        ));
    }
}
