//! The batched applier: ops of one phase go to the kernel many to a datagram on a plain
//! (blocking) socket, and each request's acknowledgement is matched to it by sequence number.

use rtnetlink::packet_core::{ErrorMessage, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys as netlink_sys;

use super::request::{describe, request};
use super::{LinkMap, Netlink, NetlinkError, APPLY_BATCH, ENOENT, ESRCH};
use crate::reconcile::Op;

impl Netlink {
    /// Applies ops in order, carrying on past failures: one bad peer must not keep the others
    /// from being programmed. Failed ops are returned with their errors; the next resync
    /// retries them.
    ///
    /// Ops of one phase ([`Op::phase`]) go to the kernel [`APPLY_BATCH`] to a datagram on a
    /// plain socket, from a blocking thread: with 1000 peers that is a few dozen sends instead
    /// of 3000 round trips, and none of the per-request machinery of an async connection.
    pub async fn apply(&self, links: &LinkMap, ops: &[Op]) -> Vec<(Op, NetlinkError)> {
        if ops.is_empty() {
            return Vec::new();
        }
        let (links, owned, batcher) = (*links, ops.to_vec(), self.batcher.clone());
        let job = tokio::task::spawn_blocking(move || {
            let mut batcher = batcher.lock().unwrap_or_else(|p| p.into_inner());
            apply_batched(&mut batcher, &links, &owned)
        });
        match job.await {
            Ok(failed) => failed,
            Err(e) => ops
                .iter()
                .map(|op| {
                    let source = std::io::Error::other(e.to_string());
                    (
                        op.clone(),
                        NetlinkError::Io {
                            what: describe(op),
                            source,
                        },
                    )
                })
                .collect(),
        }
    }
}

/// [`Netlink::apply`] on the blocking thread: phase by phase, [`APPLY_BATCH`] requests at a
/// time. Deleting what is already gone is success (the effector is idempotent).
pub(super) fn apply_batched(
    batcher: &mut Batcher,
    links: &LinkMap,
    ops: &[Op],
) -> Vec<(Op, NetlinkError)> {
    let mut failed = Vec::new();
    for phase in ops.chunk_by(|a, b| a.phase() == b.phase()) {
        for chunk in phase.chunks(APPLY_BATCH) {
            let mut sent = Vec::with_capacity(chunk.len());
            let mut requests = Vec::with_capacity(chunk.len());
            for op in chunk {
                match request(links, op) {
                    Ok(r) => {
                        sent.push(op);
                        requests.push(r);
                    }
                    Err(e) => failed.push((op.clone(), e)),
                }
            }
            for (op, outcome) in sent.into_iter().zip(batcher.exchange(&mut requests)) {
                let delete = matches!(
                    op,
                    Op::DelRoute(_) | Op::DelNeighbour { .. } | Op::DelFdb { .. }
                );
                let error = match outcome {
                    Ok(()) => continue,
                    Err(Failure::Kernel(e)) => {
                        let errno = e.code.map(|c| -c.get());
                        if delete && errno.is_some_and(|c| c == ENOENT || c == ESRCH) {
                            continue;
                        }
                        NetlinkError::Request {
                            what: describe(op),
                            source: rtnetlink::Error::NetlinkError(e),
                        }
                    }
                    Err(Failure::Io(source)) => NetlinkError::Io {
                        what: describe(op),
                        source,
                    },
                };
                failed.push((op.clone(), error));
            }
        }
    }
    failed
}

/// Records the acknowledgements in one received datagram: request `i` of the batch was sent
/// with sequence number `base + i`. Anything else (a late answer to an earlier batch, a
/// second answer) is ignored. Returns how many requests got their answer.
pub(super) fn record_acks(
    datagram: &[u8],
    base: u32,
    outcomes: &mut [Option<Result<(), Failure>>],
) -> usize {
    let mut answered = 0;
    let mut buf = datagram;
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            break;
        }
        if let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len]) {
            let i = msg.header.sequence_number.wrapping_sub(base) as usize;
            if let (Some(slot @ None), NetlinkPayload::Error(e)) =
                (outcomes.get_mut(i), msg.payload)
            {
                *slot = Some(match e.code {
                    None => Ok(()),
                    Some(_) => Err(Failure::Kernel(e)),
                });
                answered += 1;
            }
        }
        // NLMSG_ALIGN: messages in a datagram start on 4-byte boundaries.
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    answered
}

/// Why one request of a batch failed.
pub(super) enum Failure {
    /// The kernel's NACK.
    Kernel(ErrorMessage),
    /// No acknowledgement: the send failed, or the acknowledgement was lost.
    Io(std::io::Error),
}

/// A plain (blocking) rtnetlink socket: requests are sent many to a datagram, which the
/// kernel handles in order within the `send`, queueing one acknowledgement per request.
pub(super) struct Batcher {
    socket: netlink_sys::Socket,
    /// Sequence number of the next request.
    seq: u32,
    recv: Vec<u8>,
    send: Vec<u8>,
}

impl Batcher {
    pub(super) fn open() -> std::io::Result<Batcher> {
        let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        // NACKs carry the request's header only, not the whole request.
        socket.set_cap_ack(true)?;
        // Acknowledgements are queued before `send` returns; a receive that would wait means
        // they were lost (the kernel drops what overflows the buffer), so never wait long.
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(1, 0),
        )
        .map_err(std::io::Error::from)?;
        Ok(Batcher {
            socket,
            seq: 1,
            recv: Vec::with_capacity(64 * 1024),
            send: Vec::new(),
        })
    }

    /// Sends `requests` as one datagram and returns each one's outcome, in order.
    fn exchange(
        &mut self,
        requests: &mut [NetlinkMessage<RouteNetlinkMessage>],
    ) -> Vec<Result<(), Failure>> {
        let n = requests.len();
        let base = self.seq;
        self.seq = base.wrapping_add(n as u32);
        self.send.clear();
        for (i, r) in requests.iter_mut().enumerate() {
            r.header.sequence_number = base.wrapping_add(i as u32);
            r.finalize();
            let start = self.send.len();
            self.send.resize(start + r.buffer_len(), 0);
            r.serialize(&mut self.send[start..]);
        }
        let mut outcomes: Vec<Option<Result<(), Failure>>> = (0..n).map(|_| None).collect();
        let mut pending = n;
        let mut lost = None;
        if n > 0 {
            if let Err(e) = self.socket.send(&self.send, 0) {
                lost = Some(e);
                pending = 0;
            }
        }
        while pending > 0 {
            self.recv.clear();
            if let Err(e) = self.socket.recv(&mut self.recv, 0) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // ENOBUFS (acknowledgements dropped) or the timeout: whatever is still
                // unanswered failed, and the next pass retries it.
                lost = Some(e);
                break;
            }
            pending -= record_acks(&self.recv, base, &mut outcomes);
        }
        let lost = lost.map(|e| (e.kind(), e.to_string()));
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(Failure::Io(match &lost {
                        Some((kind, text)) => std::io::Error::new(*kind, text.clone()),
                        None => std::io::Error::other("no acknowledgement"),
                    }))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroI32;

    use rtnetlink::packet_core::NetlinkHeader;

    use super::*;
    use crate::netlink::EEXIST;

    fn ack(seq: u32, errno: i32) -> Vec<u8> {
        let mut e = ErrorMessage::default();
        e.code = NonZeroI32::new(-errno);
        e.header = vec![0; 16];
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        let mut m = NetlinkMessage::<RouteNetlinkMessage>::new(header, NetlinkPayload::Error(e));
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    #[test]
    fn acknowledgements_are_matched_to_requests_by_sequence_number() {
        // A batch of four whose sequence numbers wrap around.
        let base = u32::MAX - 1;
        let mut outcomes: Vec<Option<Result<(), Failure>>> = (0..4).map(|_| None).collect();
        // One datagram holding several answers, out of order, with a late answer to an
        // earlier batch and a duplicate mixed in.
        let mut datagram = ack(base.wrapping_add(2), 0);
        datagram.extend(ack(base - 10, 0));
        datagram.extend(ack(base, ENOENT));
        datagram.extend(ack(base.wrapping_add(2), EEXIST));
        assert_eq!(record_acks(&datagram, base, &mut outcomes), 2);
        assert_eq!(record_acks(&ack(base + 1, 0), base, &mut outcomes), 1);
        assert!(
            matches!(&outcomes[0], Some(Err(Failure::Kernel(e))) if e.code.map(|c| c.get()) == Some(-ENOENT))
        );
        assert!(matches!(outcomes[1], Some(Ok(()))));
        assert!(matches!(outcomes[2], Some(Ok(()))));
        assert!(outcomes[3].is_none());
        // A truncated datagram is not misread.
        let partial = ack(base.wrapping_add(3), 0);
        assert_eq!(
            record_acks(&partial[..partial.len() - 4], base, &mut outcomes),
            0
        );
    }
}
