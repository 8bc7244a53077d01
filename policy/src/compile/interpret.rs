//! The ruleset's packet interpreter: what the compiled table does with the first packet of
//! a flow, without the kernel. Strict mode asks it which tracked flows to cut
//! (`crate::conntrack`); the tests check `compile` against the evaluator with it.

use std::net::IpAddr;

use super::ranges::{ip_num, Family};
use super::{ChainEnd, PodChain, RuleVerdict, Ruleset};
use crate::model::{PolicyType, Protocol};

/// What the compiled ruleset would do with the first packet of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Accept,
    /// Dropped by the chain of the pod in this direction.
    Drop(PolicyType),
}

impl Ruleset {
    fn chain(&self, name: &str) -> Option<&PodChain> {
        self.chains.iter().find(|c| c.name == name)
    }

    fn set_has(&self, name: &str, ip: IpAddr) -> bool {
        self.addr_sets
            .iter()
            .find(|s| s.name == name)
            .is_some_and(|s| s.ranges.contains(ip_num(ip)))
    }

    /// Runs `chain` as nft does: the first matching rule's verdict (`return`: allowed;
    /// `goto`: the target chain decides), else the chain's end. True = the packet returns
    /// (allowed in this direction), false = dropped.
    fn run_chain(
        &self,
        chain: &PodChain,
        remote: IpAddr,
        dst: IpAddr,
        l4: Option<(Protocol, u16)>,
    ) -> bool {
        let matched = chain.rules.iter().find(|r| {
            let peer_ok = match &r.peer_set {
                None => true,
                Some((f, n)) => *f == Family::of(remote) && self.set_has(n, remote),
            };
            let tuple_ok = match &r.tuple_set {
                None => true,
                Some((f, n)) => {
                    *f == Family::of(dst)
                        && l4.is_some_and(|(proto, port)| {
                            self.tuple_sets
                                .iter()
                                .any(|s| &s.name == n && s.elems.contains(&(dst, proto, port)))
                        })
                }
            };
            // A rule with ports (or a named port) names its protocol: ICMP and other
            // port-less protocols only match rules without ports.
            let ports_ok = match &r.ports {
                None => true,
                Some(pp) => l4.is_some_and(|(proto, port)| {
                    pp.proto == proto
                        && (pp.ranges.is_empty()
                            || pp.ranges.iter().any(|(a, b)| (*a..=*b).contains(&port)))
                }),
            };
            peer_ok && tuple_ok && ports_ok
        });
        let goto = |target: &str| {
            let next = self.chain(target).expect("goto names a chain of the table");
            self.run_chain(next, remote, dst, l4)
        };
        match matched.map(|r| &r.verdict) {
            Some(RuleVerdict::Return) => true,
            Some(RuleVerdict::Goto(target)) => goto(target),
            None => match &chain.end {
                ChainEnd::Drop => false,
                ChainEnd::Return => true,
                ChainEnd::Goto(target) => goto(target),
            },
        }
    }

    /// Interprets the forward chain for a new connection `src -> dst` (the nft semantics
    /// of this table, without the kernel): egress of the source, then ingress of the
    /// destination. Used by tests to check compile() against the evaluator.
    pub fn decide(&self, src: IpAddr, dst: IpAddr, proto: Protocol, port: u16) -> Decision {
        self.decide_packet(src, dst, Some((proto, port)), false)
    }

    /// [`Ruleset::decide`] for the first packet of any flow: `l4` is the protocol and
    /// destination port of a TCP/UDP/SCTP packet, None for other protocols (ICMP, ...),
    /// which only rules without ports match. `to_node`: the packet is addressed to this
    /// node itself, so the input chain judges it, which applies only the source's side
    /// (unknown-pod isolation and egress); else the forward chain, both sides.
    pub fn decide_packet(
        &self,
        src: IpAddr,
        dst: IpAddr,
        l4: Option<(Protocol, u16)>,
        to_node: bool,
    ) -> Decision {
        if self.is_unknown_local(src) {
            return Decision::Drop(PolicyType::Egress);
        }
        if !to_node && self.is_unknown_local(dst) {
            return Decision::Drop(PolicyType::Ingress);
        }
        if let Some((_, c)) = self.egress_map.iter().find(|(ip, _)| *ip == src) {
            let chain = self.chain(c).expect("map points at a chain");
            if !self.run_chain(chain, dst, dst, l4) {
                return Decision::Drop(PolicyType::Egress);
            }
        }
        if to_node {
            return Decision::Accept;
        }
        if let Some((_, c)) = self.ingress_map.iter().find(|(ip, _)| *ip == dst) {
            let chain = self.chain(c).expect("map points at a chain");
            if !self.run_chain(chain, src, dst, l4) {
                return Decision::Drop(PolicyType::Ingress);
            }
        }
        Decision::Accept
    }
}
