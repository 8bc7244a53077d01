//! A minimal nf_tables netlink client: just enough for the hot paths that must not start an
//! `nft` process: the CNI plugin adding and removing a pod's anti-spoofing set elements on
//! every ADD/DEL, twill-policy reading its named counters at every scrape, and twill-policy's
//! strict mode dumping and marking conntrack entries (ctnetlink, the same framing).
//!
//! Starting `nft` costs a fork, an exec and nft's cache fill (which, with nft 1.0.6, reads
//! every element of every set in the table): several milliseconds per pod, and ~1 s at 10k
//! pods. One netlink round trip costs tens of microseconds. The wire format is the kernel's
//! uapi (`linux/netlink.h`, `linux/netfilter/nfnetlink.h`, `linux/netfilter/nf_tables.h`).
//! Rule and chain changes stay with `nft` (text syntax, checked by nft's parser).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use crate::error::NftError;
use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};

pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// Connection tracking (`linux/netfilter/nfnetlink_conntrack.h`); not batched.
pub const NFNL_SUBSYS_CTNETLINK: u16 = 1;
/// nfnetlink_log (`linux/netfilter/nfnetlink_log.h`): packets logged to an NFLOG group;
/// see [`crate::nflog`].
pub const NFNL_SUBSYS_ULOG: u16 = 4;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
pub const NFT_MSG_NEWSETELEM: u16 = 12;
pub const NFT_MSG_GETSETELEM: u16 = 13;
pub const NFT_MSG_DELSETELEM: u16 = 14;
pub const NFT_MSG_NEWOBJ: u16 = 18;
pub const NFT_MSG_GETOBJ: u16 = 19;

/// Stateful object attributes (`enum nft_object_attributes`) and the counter object's.
pub const NFTA_OBJ_TABLE: u16 = 1;
pub const NFTA_OBJ_NAME: u16 = 2;
pub const NFTA_OBJ_TYPE: u16 = 3;
pub const NFTA_OBJ_DATA: u16 = 4;
pub const NFT_OBJECT_COUNTER: u32 = 1;
pub const NFTA_COUNTER_PACKETS: u16 = 2;

pub const NFPROTO_INET: u8 = 1;
pub const NFPROTO_BRIDGE: u8 = 7;
/// Address families of ctnetlink's nfgenmsg (`AF_*`).
pub const AF_UNSPEC: u8 = 0;
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub const NLA_F_NESTED: u16 = 0x8000;
/// Attribute type bits (NLA_F_NESTED and NLA_F_NET_BYTEORDER masked off).
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;
/// struct nfgenmsg: family, version, resource id.
const NFGENMSG_LEN: usize = 4;

/// Set-element attributes (`enum nft_set_elem_list_attributes` and friends).
pub const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub const NFTA_LIST_ELEM: u16 = 1;
pub const NFTA_SET_ELEM_KEY: u16 = 1;
pub const NFTA_DATA_VALUE: u16 = 1;

/// How long a request waits for the kernel's answer.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One nfnetlink message under construction: header, nfgenmsg, then attributes.
#[derive(Clone, Debug)]
pub struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    /// An nf_tables message of type `msg` (e.g. [`NFT_MSG_NEWSETELEM`]) for `family`.
    pub fn nftables(msg: u16, flags: u16, family: u8) -> Msg {
        Msg::raw((NFNL_SUBSYS_NFTABLES << 8) | msg, flags, family, 0)
    }

    /// A message of type `msg` of nfnetlink subsystem `subsys` (e.g.
    /// [`NFNL_SUBSYS_CTNETLINK`]) for `family`.
    pub fn subsys(subsys: u16, msg: u16, flags: u16, family: u8) -> Msg {
        Msg::raw((subsys << 8) | msg, flags, family, 0)
    }

    /// Like [`Msg::subsys`] with the nfgenmsg resource id set (nfnetlink_log: the group).
    pub fn subsys_resource(subsys: u16, msg: u16, flags: u16, family: u8, res_id: u16) -> Msg {
        Msg::raw((subsys << 8) | msg, flags, family, res_id)
    }

    fn raw(kind: u16, flags: u16, family: u8, res_id: u16) -> Msg {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&[family, 0]);
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg { buf }
    }

    /// Appends an attribute.
    pub fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Msg {
        self.buf
            .extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// Appends a NUL-terminated string attribute.
    pub fn str_attr(&mut self, kind: u16, s: &str) -> &mut Msg {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(kind, &v)
    }

    /// Appends a nested attribute whose content `fill` writes.
    pub fn nest(&mut self, kind: u16, fill: impl FnOnce(&mut Msg)) -> &mut Msg {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        fill(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The message bytes with length and sequence number filled in.
    pub fn bytes(&self, seq: u32) -> Vec<u8> {
        let mut b = self.buf.clone();
        let len = b.len() as u32;
        b[0..4].copy_from_slice(&len.to_ne_bytes());
        b[8..12].copy_from_slice(&seq.to_ne_bytes());
        b
    }
}

/// The set-element message that adds (`NEWSETELEM`, create without exclusive: an element
/// already present is fine) or deletes (`DELSETELEM`) `keys` in `family table set`.
pub fn set_elements(msg: u16, family: u8, table: &str, set: &str, keys: &[Vec<u8>]) -> Msg {
    let flags = if msg == NFT_MSG_NEWSETELEM {
        NLM_F_REQUEST | NLM_F_CREATE
    } else {
        NLM_F_REQUEST
    };
    let mut m = Msg::nftables(msg, flags, family);
    m.str_attr(NFTA_SET_ELEM_LIST_TABLE, table)
        .str_attr(NFTA_SET_ELEM_LIST_SET, set)
        .nest(NFTA_SET_ELEM_LIST_ELEMENTS, |m| {
            for key in keys {
                m.nest(NFTA_LIST_ELEM, |m| {
                    m.nest(NFTA_SET_ELEM_KEY, |m| {
                        m.attr(NFTA_DATA_VALUE, key);
                    });
                });
            }
        });
    m
}

/// (type, payload) of each attribute in `buf`; stops at the first malformed one.
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((kind, payload))
    })
}

/// One received netlink message, with the sequence number of the request it answers.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// NLMSG_ERROR: errno 0 is an acknowledgement.
    Ack { seq: u32, errno: i32 },
    /// NLMSG_DONE: the end of a dump.
    Done { seq: u32 },
    /// Any other message: its type and the payload after the nfgenmsg header.
    Data { seq: u32, kind: u16, body: &'a [u8] },
}

impl Reply<'_> {
    pub fn seq(&self) -> u32 {
        match self {
            Reply::Ack { seq, .. } | Reply::Done { seq } | Reply::Data { seq, .. } => *seq,
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Splits one received buffer into messages.
pub fn replies(mut buf: &[u8]) -> io::Result<Vec<Reply<'_>>> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes(buf[8..12].try_into().unwrap());
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(invalid("truncated netlink message"));
        }
        let body = &buf[NLMSG_HDRLEN..len];
        buf = &buf[align4(len).min(buf.len())..];
        out.push(match kind {
            NLMSG_ERROR => {
                let errno = body
                    .get(..4)
                    .map(|e| i32::from_ne_bytes(e.try_into().unwrap()))
                    .ok_or_else(|| invalid("short netlink error"))?;
                Reply::Ack { seq, errno: -errno }
            }
            NLMSG_DONE => Reply::Done { seq },
            _ => Reply::Data {
                seq,
                kind,
                body: body.get(NFGENMSG_LEN..).unwrap_or(&[]),
            },
        });
    }
    Ok(out)
}

/// A NETLINK_NETFILTER socket in this thread's network namespace.
pub struct Conn {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open() -> Result<Conn, NftError> {
        Conn::open_socket().map_err(|err| NftError::Netlink { op: "open", err })
    }

    fn open_socket() -> io::Result<Conn> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        // A kernel that never answers must not hang a CNI ADD or a scrape.
        let timeout = nix::sys::time::TimeVal::new(RECEIVE_TIMEOUT.as_secs() as _, 0);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
        Ok(Conn {
            fd,
            seq: std::process::id().wrapping_mul(7919),
            buf: vec![0; 64 * 1024],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `msgs` as one nf_tables transaction (a batch: all or nothing) and waits for the
    /// kernel's verdict. The first error of the batch is returned with its OS error (e.g.
    /// ENOENT when the table or set does not exist, [`NftError::os_error`]).
    pub fn transaction(&mut self, msgs: &[Msg]) -> Result<(), NftError> {
        self.batch(NFNL_SUBSYS_NFTABLES, msgs)
            .map_err(|err| NftError::Netlink {
                op: "transaction",
                err,
            })
    }

    /// [`Conn::transaction`] for nfnetlink subsystem `subsys` (the batch-begin message's
    /// resource id).
    fn batch(&mut self, subsys: u16, msgs: &[Msg]) -> io::Result<()> {
        if msgs.is_empty() {
            return Ok(());
        }
        let begin = self.next_seq();
        let mut out = Msg::raw(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, subsys).bytes(begin);
        let mut last = begin;
        for (i, m) in msgs.iter().enumerate() {
            let mut m = m.clone();
            // Only the last message asks for an acknowledgement: errors are always reported,
            // in order, and the last message's answer comes after every earlier one.
            if i + 1 == msgs.len() {
                let flags = u16::from_ne_bytes([m.buf[6], m.buf[7]]) | NLM_F_ACK;
                m.buf[6..8].copy_from_slice(&flags.to_ne_bytes());
            }
            last = self.next_seq();
            out.extend(m.bytes(last));
        }
        let end = self.next_seq();
        out.extend(Msg::raw(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, subsys).bytes(end));
        send(self.fd.as_raw_fd(), &out, MsgFlags::empty())?;
        let mut verdict = BatchVerdict::new(begin, last);
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty())?;
            for r in replies(&self.buf[..n])? {
                if let Some(done) = verdict.feed(&r) {
                    return done;
                }
            }
        }
    }

    /// Sends `msgs` as plain requests (not a batch: each stands alone, as ctnetlink wants),
    /// each asking for an acknowledgement, a few dozen per datagram so that the answers
    /// fit the socket's receive buffer, and returns each message's errno (0 = done).
    pub fn requests(&mut self, msgs: &[Msg]) -> Result<Vec<i32>, NftError> {
        self.plain_requests(msgs).map_err(|err| NftError::Netlink {
            op: "requests",
            err,
        })
    }

    fn plain_requests(&mut self, msgs: &[Msg]) -> io::Result<Vec<i32>> {
        const CHUNK: usize = 64;
        let mut out = Vec::with_capacity(msgs.len());
        for chunk in msgs.chunks(CHUNK) {
            let first = self.seq.wrapping_add(1);
            let mut bytes = Vec::new();
            for m in chunk {
                let mut m = m.clone();
                let flags = u16::from_ne_bytes([m.buf[6], m.buf[7]]) | NLM_F_ACK;
                m.buf[6..8].copy_from_slice(&flags.to_ne_bytes());
                let seq = self.next_seq();
                bytes.extend(m.bytes(seq));
            }
            send(self.fd.as_raw_fd(), &bytes, MsgFlags::empty())?;
            let mut errnos: Vec<Option<i32>> = vec![None; chunk.len()];
            let mut left = chunk.len();
            while left > 0 {
                let n = recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty())?;
                for r in replies(&self.buf[..n])? {
                    if let Reply::Ack { seq, errno } = r {
                        let i = seq.wrapping_sub(first) as usize;
                        if let Some(slot @ None) = errnos.get_mut(i) {
                            *slot = Some(errno);
                            left -= 1;
                        }
                    }
                }
            }
            out.extend(errnos.into_iter().map(|e| e.unwrap_or(0)));
        }
        Ok(out)
    }

    /// Waits for the next datagram (up to the receive timeout) and calls `each` with every
    /// message in it; false when nothing arrived in time. For subscriptions such as an NFLOG
    /// group, where the kernel sends messages unasked. ENOBUFS (the kernel dropped messages
    /// because the socket's buffer was full) is an error with that [`NftError::os_error`];
    /// the socket stays usable.
    pub fn receive(&mut self, mut each: impl FnMut(&Reply)) -> Result<bool, NftError> {
        let err = |err| NftError::Netlink { op: "receive", err };
        let n = match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) => return Ok(false),
            Err(e) => return Err(err(e.into())),
        };
        for r in replies(&self.buf[..n]).map_err(err)? {
            each(&r);
        }
        Ok(true)
    }

    /// Runs a dump request and calls `each` with the type and body of every message it
    /// returns. Messages answering another request (another sequence number: a late answer
    /// to an earlier request on this socket) are skipped.
    pub fn dump(&mut self, request: &Msg, each: impl FnMut(u16, &[u8])) -> Result<(), NftError> {
        self.dump_messages(request, each)
            .map_err(|err| NftError::Netlink { op: "dump", err })
    }

    fn dump_messages(&mut self, request: &Msg, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let seq = self.next_seq();
        send(self.fd.as_raw_fd(), &request.bytes(seq), MsgFlags::empty())?;
        let fd = self.fd.as_raw_fd();
        let buf = &mut self.buf;
        loop {
            let n = recv(fd, buf, MsgFlags::empty())?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "netlink dump ended early",
                ));
            }
            for r in replies(&buf[..n])? {
                if let Some(done) = dump_step(seq, &r, &mut each) {
                    return done;
                }
            }
        }
    }
}

/// Collects the kernel's answers to one batch sent with sequence numbers `begin` (the
/// batch-begin message), `begin + 1 ..= last` (the messages; only `last` asks for an
/// acknowledgement) and `last + 1` (the batch end).
#[derive(Debug)]
struct BatchVerdict {
    begin: u32,
    last: u32,
    first_error: Option<i32>,
}

impl BatchVerdict {
    fn new(begin: u32, last: u32) -> BatchVerdict {
        BatchVerdict {
            begin,
            last,
            first_error: None,
        }
    }

    /// Takes one reply; the batch's outcome once it is known. An error against the
    /// batch-begin or batch-end message (unknown subsystem, malformed batch) is the whole
    /// batch's answer: the kernel processed none of the messages, so no acknowledgement of
    /// `last` follows. Replies to other requests are ignored.
    fn feed(&mut self, r: &Reply) -> Option<io::Result<()>> {
        let Reply::Ack { seq, errno } = *r else {
            return None;
        };
        // Offsets from `begin`, so that a sequence number wrapping past u32::MAX still counts.
        let at = seq.wrapping_sub(self.begin);
        let last = self.last.wrapping_sub(self.begin);
        if at > last + 1 {
            return None;
        }
        if at == 0 || at == last + 1 {
            return (errno != 0).then(|| Err(io::Error::from_raw_os_error(errno)));
        }
        if errno != 0 && self.first_error.is_none() {
            self.first_error = Some(errno);
        }
        (at == last).then(|| match self.first_error {
            None => Ok(()),
            Some(e) => Err(io::Error::from_raw_os_error(e)),
        })
    }
}

/// One reply to the dump request sent with `seq`: data goes to `each`; the dump's end or error
/// is its outcome. Replies with another sequence number are skipped.
fn dump_step(seq: u32, r: &Reply, each: &mut impl FnMut(u16, &[u8])) -> Option<io::Result<()>> {
    if r.seq() != seq {
        return None;
    }
    match *r {
        Reply::Done { .. } => Some(Ok(())),
        Reply::Ack { errno: 0, .. } => None,
        Reply::Ack { errno, .. } => Some(Err(io::Error::from_raw_os_error(errno))),
        Reply::Data { kind, body, .. } => {
            each(kind, body);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_element_message_layout() {
        let key = vec![1u8, 2, 3, 4, 5];
        let b = set_elements(
            NFT_MSG_NEWSETELEM,
            NFPROTO_BRIDGE,
            "t",
            "s",
            std::slice::from_ref(&key),
        )
        .bytes(9);
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), (10 << 8) | 12);
        assert_eq!(
            u16::from_ne_bytes([b[6], b[7]]),
            NLM_F_REQUEST | NLM_F_CREATE
        );
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 9);
        assert_eq!(b[16], NFPROTO_BRIDGE);
        let top: Vec<(u16, &[u8])> = attrs(&b[20..]).collect();
        assert_eq!(top[0], (NFTA_SET_ELEM_LIST_TABLE, &b"t\0"[..]));
        assert_eq!(top[1], (NFTA_SET_ELEM_LIST_SET, &b"s\0"[..]));
        assert_eq!(top[2].0, NFTA_SET_ELEM_LIST_ELEMENTS);
        // elements > element > key > value, each nested.
        let (k, elem) = attrs(top[2].1).next().unwrap();
        assert_eq!(k, NFTA_LIST_ELEM);
        let (k, keyattr) = attrs(elem).next().unwrap();
        assert_eq!(k, NFTA_SET_ELEM_KEY);
        assert_eq!(attrs(keyattr).next().unwrap(), (NFTA_DATA_VALUE, &key[..]));
        // The nested flag is on the wire.
        let raw_type = u16::from_ne_bytes([b[20 + 8 + 8 + 2], b[20 + 8 + 8 + 3]]);
        assert_eq!(raw_type, NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED);
    }

    #[test]
    fn replies_split_acks_errors_and_data() {
        let mut buf = Vec::new();
        let mut push = |kind: u16, seq: u32, body: &[u8]| {
            buf.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
            buf.extend_from_slice(&kind.to_ne_bytes());
            buf.extend_from_slice(&0u16.to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(body);
            buf.resize(align4(buf.len()), 0);
        };
        push(NLMSG_ERROR, 4, &(-2i32).to_ne_bytes());
        push(NLMSG_ERROR, 5, &0i32.to_ne_bytes());
        push((10 << 8) | NFT_MSG_NEWOBJ, 6, &[1, 0, 0, 0, 9, 9]);
        push(NLMSG_DONE, 6, &[0; 4]);
        let r = replies(&buf).unwrap();
        assert_eq!(
            r,
            vec![
                Reply::Ack { seq: 4, errno: 2 },
                Reply::Ack { seq: 5, errno: 0 },
                Reply::Data {
                    seq: 6,
                    kind: (10 << 8) | NFT_MSG_NEWOBJ,
                    body: &[9, 9]
                },
                Reply::Done { seq: 6 }
            ]
        );
        assert!(replies(&[0xff; 20]).is_err());
    }

    #[test]
    fn an_error_against_the_batch_begin_is_the_answer_at_once() {
        // Batch: begin 41, messages 42..=44 (44 asks for the ack), end 45.
        let mut v = BatchVerdict::new(41, 44);
        let e = v
            .feed(&Reply::Ack { seq: 41, errno: 22 })
            .unwrap()
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(22));
        let mut v = BatchVerdict::new(41, 44);
        assert!(v.feed(&Reply::Ack { seq: 45, errno: 22 }).unwrap().is_err());
        // An acknowledged begin (errno 0) decides nothing; nor does a reply to another request.
        let mut v = BatchVerdict::new(41, 44);
        assert!(v.feed(&Reply::Ack { seq: 41, errno: 0 }).is_none());
        assert!(v.feed(&Reply::Ack { seq: 7, errno: 2 }).is_none());
        assert!(v
            .feed(&Reply::Data {
                seq: 44,
                kind: 1,
                body: &[]
            })
            .is_none());
        // The first error of the messages wins, reported when the last one is answered.
        assert!(v.feed(&Reply::Ack { seq: 42, errno: 2 }).is_none());
        assert!(v.feed(&Reply::Ack { seq: 43, errno: 17 }).is_none());
        let e = v
            .feed(&Reply::Ack { seq: 44, errno: 0 })
            .unwrap()
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(2));
        let mut v = BatchVerdict::new(41, 44);
        assert!(v.feed(&Reply::Ack { seq: 44, errno: 0 }).unwrap().is_ok());
        // Sequence numbers wrapping past u32::MAX.
        let mut v = BatchVerdict::new(u32::MAX, 1);
        assert!(v.feed(&Reply::Ack { seq: 0, errno: 0 }).is_none());
        assert!(v.feed(&Reply::Ack { seq: 1, errno: 0 }).unwrap().is_ok());
    }

    #[test]
    fn a_dump_takes_only_the_replies_to_its_own_request() {
        let mut got = Vec::new();
        let mut each = |kind: u16, body: &[u8]| got.push((kind, body.to_vec()));
        // A late answer to an earlier request (seq 8): its data, error and end are skipped.
        assert!(dump_step(
            9,
            &Reply::Data {
                seq: 8,
                kind: 1,
                body: &[1]
            },
            &mut each
        )
        .is_none());
        assert!(dump_step(9, &Reply::Ack { seq: 8, errno: 2 }, &mut each).is_none());
        assert!(dump_step(9, &Reply::Done { seq: 8 }, &mut each).is_none());
        assert!(dump_step(
            9,
            &Reply::Data {
                seq: 9,
                kind: 2,
                body: &[2]
            },
            &mut each
        )
        .is_none());
        assert!(dump_step(9, &Reply::Done { seq: 9 }, &mut each)
            .unwrap()
            .is_ok());
        assert_eq!(got, [(2, vec![2])]);
        let e = dump_step(9, &Reply::Ack { seq: 9, errno: 2 }, &mut |_, _| {})
            .unwrap()
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(2));
    }

    #[test]
    fn the_kernel_refusing_the_batch_begin_is_reported_at_once() {
        // Root only (a netlink netfilter batch needs CAP_NET_ADMIN); in a network namespace of
        // this thread's own, so nothing outside it is touched.
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI runs as root: this test must not be skipped there"
            );
            eprintln!("skipping: needs root");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut conn = Conn::open().unwrap();
            // Resource id 200 is no nfnetlink subsystem: the kernel answers the batch-begin
            // message with EINVAL and processes nothing else.
            let msg = set_elements(NFT_MSG_NEWSETELEM, NFPROTO_BRIDGE, "t", "s", &[vec![0; 4]]);
            let started = std::time::Instant::now();
            let e = conn.batch(200, &[msg]).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(nix::libc::EINVAL), "{e}");
            assert!(
                started.elapsed() < RECEIVE_TIMEOUT,
                "waited out the receive timeout"
            );
            // The connection still works: a real transaction on a missing table is ENOENT.
            let msg = set_elements(NFT_MSG_NEWSETELEM, NFPROTO_BRIDGE, "t", "s", &[vec![0; 4]]);
            let e = conn.transaction(&[msg]).unwrap_err();
            assert_eq!(e.os_error(), Some(nix::libc::ENOENT), "{e}");
        })
        .join()
        .unwrap();
    }
}
