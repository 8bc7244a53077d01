//! An nfnetlink_log (NFLOG) client: binds a log group, asks for the packets' first bytes,
//! and parses what the kernel sends for each packet an `nft ... log group N` rule logged: the
//! rule's prefix, the interfaces, and the IPv4/IPv6 header with ports or ICMP type.
//!
//! The wire format is the kernel's uapi (`linux/netfilter/nfnetlink_log.h`): configuration
//! messages carry the group in nfgenmsg's resource id; packet messages carry the attributes
//! below. Every parser here takes kernel data as untrusted: a truncated or malformed
//! attribute or header is an error naming what is wrong, never a panic.

use std::net::IpAddr;

use crate::error::NftError;
use crate::nfnl::{Conn, Msg, Reply, AF_UNSPEC, NFNL_SUBSYS_ULOG, NLM_F_REQUEST};

pub const NFULNL_MSG_PACKET: u16 = 0;
pub const NFULNL_MSG_CONFIG: u16 = 1;
/// Configuration attributes (`enum nfulnl_attr_config`).
pub const NFULA_CFG_CMD: u16 = 1;
pub const NFULA_CFG_MODE: u16 = 2;
/// Configuration commands (`enum nfulnl_msg_config_cmds`).
pub const NFULNL_CFG_CMD_BIND: u8 = 1;
pub const NFULNL_CFG_CMD_UNBIND: u8 = 2;
/// Copy the packet's first bytes (`NFULNL_COPY_PACKET`).
pub const NFULNL_COPY_PACKET: u8 = 2;
/// Packet attributes (`enum nfulnl_attr_type`).
pub const NFULA_PACKET_HDR: u16 = 1;
pub const NFULA_IFINDEX_INDEV: u16 = 4;
pub const NFULA_IFINDEX_OUTDEV: u16 = 5;
pub const NFULA_IFINDEX_PHYSINDEV: u16 = 6;
pub const NFULA_IFINDEX_PHYSOUTDEV: u16 = 7;
pub const NFULA_PAYLOAD: u16 = 9;
pub const NFULA_PREFIX: u16 = 10;

/// Bytes of each packet asked for: enough for an IPv6 header, a few extension headers and
/// the transport ports or ICMP type.
pub const COPY_RANGE: u32 = 256;

/// What is wrong with a message or packet the kernel sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("netlink attribute at byte {offset}: {why}")]
    Attribute { offset: usize, why: String },
    #[error("NFLOG attribute {kind}: {len} bytes, want {want}")]
    AttributeLength { kind: u16, len: usize, want: usize },
    #[error("NFLOG packet without {0}")]
    Missing(&'static str),
    #[error("NFLOG prefix is not UTF-8 text")]
    Prefix,
    #[error("logged packet: {0}")]
    Payload(String),
}

/// (type, payload) of every attribute in `buf`, or an error at the first truncated or
/// malformed one (the lenient [`crate::nfnl::attrs`] just stops there).
pub fn checked_attrs(buf: &[u8]) -> Result<Vec<(u16, &[u8])>, ParseError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let rest = &buf[at..];
        let bad = |why: String| ParseError::Attribute { offset: at, why };
        if rest.len() < 4 {
            return Err(bad(format!("{} trailing bytes, no header", rest.len())));
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 {
            return Err(bad(format!("length {len} is shorter than its header")));
        }
        if len > rest.len() {
            return Err(bad(format!(
                "length {len} runs past the message ({} bytes left)",
                rest.len()
            )));
        }
        out.push((kind, &rest[4..len]));
        at += ((len + 3) & !3).min(rest.len());
    }
    Ok(out)
}

/// One packet an NFLOG rule logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedPacket {
    /// The rule's `log prefix`.
    pub prefix: String,
    /// Link-layer protocol (ethertype) of the packet, when the kernel gave it.
    pub hw_protocol: Option<u16>,
    pub indev: Option<u32>,
    pub outdev: Option<u32>,
    /// The bridge ports, when the packet was bridged (br_netfilter).
    pub physindev: Option<u32>,
    pub physoutdev: Option<u32>,
    /// The first [`COPY_RANGE`] bytes of the packet from its network header.
    pub payload: Vec<u8>,
}

fn be32(kind: u16, p: &[u8]) -> Result<u32, ParseError> {
    let b: [u8; 4] = p.try_into().map_err(|_| ParseError::AttributeLength {
        kind,
        len: p.len(),
        want: 4,
    })?;
    Ok(u32::from_be_bytes(b))
}

/// Parses the body (after nfgenmsg) of an `NFULNL_MSG_PACKET` message.
pub fn parse_packet(body: &[u8]) -> Result<LoggedPacket, ParseError> {
    let mut prefix = None;
    let mut pkt = LoggedPacket {
        prefix: String::new(),
        hw_protocol: None,
        indev: None,
        outdev: None,
        physindev: None,
        physoutdev: None,
        payload: Vec::new(),
    };
    let mut payload = None;
    for (kind, p) in checked_attrs(body)? {
        match kind {
            NFULA_PACKET_HDR => {
                // struct nfulnl_msg_packet_hdr { __be16 hw_protocol; __u8 hook; __u8 _pad; }
                if p.len() != 4 {
                    return Err(ParseError::AttributeLength {
                        kind,
                        len: p.len(),
                        want: 4,
                    });
                }
                pkt.hw_protocol = Some(u16::from_be_bytes([p[0], p[1]]));
            }
            NFULA_IFINDEX_INDEV => pkt.indev = Some(be32(kind, p)?),
            NFULA_IFINDEX_OUTDEV => pkt.outdev = Some(be32(kind, p)?),
            NFULA_IFINDEX_PHYSINDEV => pkt.physindev = Some(be32(kind, p)?),
            NFULA_IFINDEX_PHYSOUTDEV => pkt.physoutdev = Some(be32(kind, p)?),
            NFULA_PREFIX => {
                // NUL-terminated.
                let text = p.split(|&c| c == 0).next().unwrap_or(p);
                prefix = Some(
                    std::str::from_utf8(text)
                        .map_err(|_| ParseError::Prefix)?
                        .to_string(),
                );
            }
            NFULA_PAYLOAD => payload = Some(p.to_vec()),
            _ => {}
        }
    }
    pkt.prefix = prefix.ok_or(ParseError::Missing("a prefix (NFULA_PREFIX)"))?;
    pkt.payload = payload.ok_or(ParseError::Missing("a payload (NFULA_PAYLOAD)"))?;
    Ok(pkt)
}

/// The transport of a logged IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp {
        sport: u16,
        dport: u16,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    Icmp {
        kind: u8,
        code: u8,
    },
    Icmpv6 {
        kind: u8,
        code: u8,
    },
    /// A later fragment (no transport header) of protocol `0`.
    Fragment(u8),
    /// Any other protocol number.
    Other(u8),
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Tcp { dport, .. } => write!(f, "TCP/{dport}"),
            Transport::Udp { dport, .. } => write!(f, "UDP/{dport}"),
            Transport::Sctp { dport, .. } => write!(f, "SCTP/{dport}"),
            Transport::Icmp { kind, code } => write!(f, "ICMP type {kind} code {code}"),
            Transport::Icmpv6 { kind, code } => write!(f, "ICMPv6 type {kind} code {code}"),
            Transport::Fragment(p) => write!(f, "fragment of protocol {p}"),
            Transport::Other(p) => write!(f, "protocol {p}"),
        }
    }
}

/// The addresses and transport of a logged IPv4 or IPv6 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPacket {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub transport: Transport,
}

impl IpPacket {
    /// The source port (TCP, UDP, SCTP).
    pub fn sport(&self) -> Option<u16> {
        match self.transport {
            Transport::Tcp { sport, .. }
            | Transport::Udp { sport, .. }
            | Transport::Sctp { sport, .. } => Some(sport),
            _ => None,
        }
    }
}

fn payload_err(what: String) -> ParseError {
    ParseError::Payload(what)
}

/// The first `n` bytes of the `name` header `l4`.
fn head<'a>(l4: &'a [u8], n: usize, name: &str) -> Result<&'a [u8], ParseError> {
    l4.get(..n).ok_or_else(|| {
        payload_err(format!(
            "{name} header truncated: {} bytes, want {n}",
            l4.len()
        ))
    })
}

/// The transport of protocol `proto` whose header starts at `l4`.
fn transport(proto: u8, l4: &[u8]) -> Result<Transport, ParseError> {
    // Source and destination port: the first 4 bytes of TCP, UDP and SCTP.
    let ports = |name: &str| {
        head(l4, 4, name).map(|b| {
            (
                u16::from_be_bytes([b[0], b[1]]),
                u16::from_be_bytes([b[2], b[3]]),
            )
        })
    };
    // Type and code: the first 2 bytes of ICMP and ICMPv6.
    let icmp = |name: &str| head(l4, 2, name).map(|b| (b[0], b[1]));
    Ok(match proto {
        6 => ports("TCP").map(|(sport, dport)| Transport::Tcp { sport, dport })?,
        17 => ports("UDP").map(|(sport, dport)| Transport::Udp { sport, dport })?,
        132 => ports("SCTP").map(|(sport, dport)| Transport::Sctp { sport, dport })?,
        1 => icmp("ICMP").map(|(kind, code)| Transport::Icmp { kind, code })?,
        58 => icmp("ICMPv6").map(|(kind, code)| Transport::Icmpv6 { kind, code })?,
        p => Transport::Other(p),
    })
}

/// Parses the network header of a logged packet (IPv4 or IPv6, by its version nibble),
/// following IPv6 extension headers to the transport.
pub fn parse_ip(payload: &[u8]) -> Result<IpPacket, ParseError> {
    let Some(&first) = payload.first() else {
        return Err(payload_err("empty".into()));
    };
    match first >> 4 {
        4 => {
            if payload.len() < 20 {
                return Err(payload_err(format!(
                    "IPv4 header truncated: {} bytes, want 20",
                    payload.len()
                )));
            }
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 || ihl > payload.len() {
                return Err(payload_err(format!(
                    "IPv4 header length {ihl} (of {} bytes)",
                    payload.len()
                )));
            }
            let src = IpAddr::from(<[u8; 4]>::try_from(&payload[12..16]).expect("4 bytes"));
            let dst = IpAddr::from(<[u8; 4]>::try_from(&payload[16..20]).expect("4 bytes"));
            let proto = payload[9];
            let frag_offset = u16::from_be_bytes([payload[6], payload[7]]) & 0x1fff;
            let transport = if frag_offset != 0 {
                Transport::Fragment(proto)
            } else {
                transport(proto, &payload[ihl..])?
            };
            Ok(IpPacket {
                src,
                dst,
                transport,
            })
        }
        6 => {
            if payload.len() < 40 {
                return Err(payload_err(format!(
                    "IPv6 header truncated: {} bytes, want 40",
                    payload.len()
                )));
            }
            let src = IpAddr::from(<[u8; 16]>::try_from(&payload[8..24]).expect("16 bytes"));
            let dst = IpAddr::from(<[u8; 16]>::try_from(&payload[24..40]).expect("16 bytes"));
            let mut next = payload[6];
            let mut at = 40;
            // Hop-by-hop, routing, fragment, destination options; bounded by the payload.
            loop {
                let rest = &payload[at..];
                match next {
                    0 | 43 | 60 => {
                        let Some(h) = rest.get(..2) else {
                            return Err(payload_err(format!(
                                "IPv6 extension header {next} truncated"
                            )));
                        };
                        let len = (usize::from(h[1]) + 1) * 8;
                        if len > rest.len() {
                            return Err(payload_err(format!(
                                "IPv6 extension header {next}: length {len} runs past the packet"
                            )));
                        }
                        next = h[0];
                        at += len;
                    }
                    44 => {
                        let Some(h) = rest.get(..8) else {
                            return Err(payload_err("IPv6 fragment header truncated".to_string()));
                        };
                        let offset = u16::from_be_bytes([h[2], h[3]]) >> 3;
                        if offset != 0 {
                            return Ok(IpPacket {
                                src,
                                dst,
                                transport: Transport::Fragment(h[0]),
                            });
                        }
                        next = h[0];
                        at += 8;
                    }
                    p => {
                        return Ok(IpPacket {
                            src,
                            dst,
                            transport: transport(p, rest)?,
                        })
                    }
                }
            }
        }
        v => Err(payload_err(format!("IP version {v}, not 4 or 6"))),
    }
}

/// The configuration message that runs `cmd` (bind or unbind) on `group`.
pub fn command(group: u16, cmd: u8) -> Msg {
    let mut m = Msg::subsys_resource(
        NFNL_SUBSYS_ULOG,
        NFULNL_MSG_CONFIG,
        NLM_F_REQUEST,
        AF_UNSPEC,
        group,
    );
    m.attr(NFULA_CFG_CMD, &[cmd]);
    m
}

/// The configuration message that asks for the first `range` bytes of each packet of `group`.
pub fn copy_packet(group: u16, range: u32) -> Msg {
    // struct nfulnl_msg_config_mode { __be32 copy_range; __u8 copy_mode; __u8 _pad; }
    let mut mode = range.to_be_bytes().to_vec();
    mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    let mut m = Msg::subsys_resource(
        NFNL_SUBSYS_ULOG,
        NFULNL_MSG_CONFIG,
        NLM_F_REQUEST,
        AF_UNSPEC,
        group,
    );
    m.attr(NFULA_CFG_MODE, &mode);
    m
}

/// A socket bound to one NFLOG group in this thread's network namespace; unbound on drop.
pub struct Listener {
    conn: Conn,
    group: u16,
}

impl Listener {
    /// Binds `group` and asks for the first [`COPY_RANGE`] bytes of each packet. Fails with
    /// EBUSY when another process has the group.
    pub fn bind(group: u16) -> Result<Listener, NftError> {
        let mut conn = Conn::open()?;
        let errnos = conn.requests(&[
            command(group, NFULNL_CFG_CMD_BIND),
            copy_packet(group, COPY_RANGE),
        ])?;
        for (what, errno) in ["bind", "copy mode"].into_iter().zip(errnos) {
            if errno != 0 {
                return Err(NftError::Netlink {
                    op: if what == "bind" {
                        "NFLOG group bind"
                    } else {
                        "NFLOG copy mode"
                    },
                    err: std::io::Error::from_raw_os_error(errno),
                });
            }
        }
        Ok(Listener { conn, group })
    }

    /// Waits up to the socket's receive timeout and calls `each` with every logged packet
    /// (or the error parsing it) that arrived; false when nothing did.
    pub fn receive(
        &mut self,
        mut each: impl FnMut(Result<LoggedPacket, ParseError>),
    ) -> Result<bool, NftError> {
        let packet = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET;
        self.conn.receive(|r| {
            if let Reply::Data { kind, body, .. } = r {
                if *kind == packet {
                    each(parse_packet(body));
                }
            }
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self
            .conn
            .requests(&[command(self.group, NFULNL_CFG_CMD_UNBIND)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An attribute as the kernel writes it (length, type, payload, padding).
    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(payload);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v
    }

    fn ipv4_tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        p
    }

    fn packet_body(prefix: &str, payload: &[u8]) -> Vec<u8> {
        let mut b = attr(NFULA_PACKET_HDR, &[0x08, 0x00, 1, 0]);
        b.extend(attr(NFULA_IFINDEX_INDEV, &7u32.to_be_bytes()));
        b.extend(attr(NFULA_IFINDEX_PHYSINDEV, &9u32.to_be_bytes()));
        let mut pre = prefix.as_bytes().to_vec();
        pre.push(0);
        b.extend(attr(NFULA_PREFIX, &pre));
        b.extend(attr(NFULA_PAYLOAD, payload));
        b
    }

    #[test]
    fn a_logged_tcp_packet_is_parsed() {
        let payload = ipv4_tcp([10, 244, 1, 2], [10, 244, 1, 3], 40000, 80);
        let p = parse_packet(&packet_body("twill-policy drop ingress x/b: ", &payload)).unwrap();
        assert_eq!(p.prefix, "twill-policy drop ingress x/b: ");
        assert_eq!(p.hw_protocol, Some(0x0800));
        assert_eq!((p.indev, p.outdev, p.physindev), (Some(7), None, Some(9)));
        let ip = parse_ip(&p.payload).unwrap();
        assert_eq!(ip.src, "10.244.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(ip.dst, "10.244.1.3".parse::<IpAddr>().unwrap());
        assert_eq!(
            ip.transport,
            Transport::Tcp {
                sport: 40000,
                dport: 80
            }
        );
        assert_eq!(ip.transport.to_string(), "TCP/80");
    }

    #[test]
    fn ipv4_icmp_udp_and_fragments() {
        let mut icmp = ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], 0, 0);
        icmp[9] = 1;
        icmp[20] = 8;
        icmp[21] = 0;
        assert_eq!(
            parse_ip(&icmp).unwrap().transport,
            Transport::Icmp { kind: 8, code: 0 }
        );
        let mut udp = ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], 5353, 53);
        udp[9] = 17;
        assert_eq!(
            parse_ip(&udp).unwrap().transport,
            Transport::Udp {
                sport: 5353,
                dport: 53
            }
        );
        let mut frag = udp.clone();
        frag[6] = 0x00;
        frag[7] = 0x10;
        assert_eq!(parse_ip(&frag).unwrap().transport, Transport::Fragment(17));
        // Options: IHL 6 moves the transport header by 4 bytes.
        let mut opts = ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], 0, 0);
        opts[0] = 0x46;
        opts.splice(20..20, [1, 1, 1, 1]);
        opts[24..28].copy_from_slice(&[0x1f, 0x90, 0x00, 0x50]);
        assert_eq!(
            parse_ip(&opts).unwrap().transport,
            Transport::Tcp {
                sport: 8080,
                dport: 80
            }
        );
    }

    fn ipv6(next: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, rest.len() as u8, next, 64];
        p.extend_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(rest);
        p
    }

    #[test]
    fn ipv6_with_extension_headers() {
        let ip = parse_ip(&ipv6(58, &[128, 0, 0, 0])).unwrap();
        assert_eq!(ip.src, "fd00::1".parse::<IpAddr>().unwrap());
        assert_eq!(ip.transport, Transport::Icmpv6 { kind: 128, code: 0 });
        // Hop-by-hop (8 bytes) then TCP.
        let mut rest = vec![6, 0, 0, 0, 0, 0, 0, 0];
        rest.extend_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
        assert_eq!(
            parse_ip(&ipv6(0, &rest)).unwrap().transport,
            Transport::Tcp {
                sport: 40000,
                dport: 443
            }
        );
        // A later fragment carries no transport header.
        let frag = [17, 0, 0x00, 0x08, 0, 0, 0, 1];
        assert_eq!(
            parse_ip(&ipv6(44, &frag)).unwrap().transport,
            Transport::Fragment(17)
        );
    }

    #[test]
    fn hostile_payloads_are_errors_not_panics() {
        let good = ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], 1, 2);
        for n in 0..good.len() {
            // Every truncation: an error before the ports are complete, never a panic.
            let r = parse_ip(&good[..n]);
            if n < 24 {
                assert!(r.is_err(), "{n} bytes: {r:?}");
            }
        }
        let mut bad_ihl = good.clone();
        bad_ihl[0] = 0x43;
        assert_eq!(
            parse_ip(&bad_ihl).unwrap_err().to_string(),
            "logged packet: IPv4 header length 12 (of 40 bytes)"
        );
        let mut huge_ihl = good[..24].to_vec();
        huge_ihl[0] = 0x4f;
        assert!(parse_ip(&huge_ihl).is_err());
        assert_eq!(
            parse_ip(&[0x50; 40]).unwrap_err().to_string(),
            "logged packet: IP version 5, not 4 or 6"
        );
        // An extension header whose length runs past the packet, and a chain of them that
        // ends in the middle of a header.
        assert!(parse_ip(&ipv6(60, &[6, 200, 0, 0, 0, 0, 0, 0])).is_err());
        assert!(parse_ip(&ipv6(0, &[0, 0, 0, 0, 0, 0, 0, 0, 43])).is_err());
        let v6 = ipv6(6, &[0, 1, 0, 2]);
        for n in 0..v6.len() {
            assert!(parse_ip(&v6[..n]).is_err(), "{n} bytes");
        }
    }

    #[test]
    fn hostile_messages_are_errors_not_panics() {
        let payload = ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], 1, 2);
        let body = packet_body("p: ", &payload);
        // Every truncation of a good message that cuts an attribute is an error.
        for n in 1..body.len() {
            let r = parse_packet(&body[..n]);
            assert!(r.is_err(), "{n} bytes parsed: {r:?}");
        }
        // Length shorter than its header, longer than the message.
        let mut short = body.clone();
        short[0..2].copy_from_slice(&2u16.to_ne_bytes());
        assert_eq!(
            parse_packet(&short).unwrap_err().to_string(),
            "netlink attribute at byte 0: length 2 is shorter than its header"
        );
        let mut long = body.clone();
        long[0..2].copy_from_slice(&0xfff0u16.to_ne_bytes());
        assert!(matches!(
            parse_packet(&long),
            Err(ParseError::Attribute { offset: 0, .. })
        ));
        // An interface index of the wrong size.
        let mut b = attr(NFULA_IFINDEX_OUTDEV, &[1, 2]);
        b.extend(attr(NFULA_PREFIX, b"p\0"));
        assert_eq!(
            parse_packet(&b).unwrap_err(),
            ParseError::AttributeLength {
                kind: NFULA_IFINDEX_OUTDEV,
                len: 2,
                want: 4
            }
        );
        // No prefix, no payload, a prefix that is not UTF-8.
        assert_eq!(
            parse_packet(&attr(NFULA_PAYLOAD, &payload)).unwrap_err(),
            ParseError::Missing("a prefix (NFULA_PREFIX)")
        );
        assert_eq!(
            parse_packet(&attr(NFULA_PREFIX, b"p\0")).unwrap_err(),
            ParseError::Missing("a payload (NFULA_PAYLOAD)")
        );
        assert_eq!(
            parse_packet(&attr(NFULA_PREFIX, &[0xff, 0xfe, 0])).unwrap_err(),
            ParseError::Prefix
        );
        // Random bytes never panic.
        let mut x: u32 = 0x1234_5678;
        for _ in 0..2000 {
            let len = (x % 96) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = parse_packet(&bytes);
            let _ = parse_ip(&bytes);
        }
    }

    #[test]
    fn configuration_messages() {
        let b = command(100, NFULNL_CFG_CMD_BIND).bytes(3);
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), (4 << 8) | 1);
        // nfgenmsg: family, version, resource id (the group, big-endian).
        assert_eq!(&b[16..20], &[0, 0, 0, 100]);
        assert_eq!(&b[20..25], &[5, 0, 1, 0, NFULNL_CFG_CMD_BIND]);
        let b = copy_packet(100, 256).bytes(4);
        assert_eq!(&b[20..24], &[10, 0, 2, 0]);
        assert_eq!(&b[24..30], &[0, 0, 1, 0, NFULNL_COPY_PACKET, 0]);
    }
}
