//! The effector: a thin, idempotent facade over rtnetlink. It observes the entries twill owns
//! and applies [`Op`](crate::reconcile::Op)s; it never decides anything. Every write is a
//! `replace`, so applying the same op twice, or after a crash half-way through a batch, is
//! harmless.
//!
//! By job: `observe` reads the kernel's dumps into the model
//! ([`DataplaneState`](crate::model::DataplaneState), main-table routes); `request` turns an op into the netlink message that applies it; `apply`
//! sends those requests in batches on a plain socket and matches the acknowledgements;
//! `convert` maps netlink attributes to addresses, MACs and route entries; `devices` looks up
//! and sets up links, their addresses and the blackhole route.

mod apply;
mod convert;
mod devices;
mod observe;
mod request;

use std::sync::{Arc, Mutex};

use rtnetlink::Handle;

use crate::model::LinkRef;

pub use devices::LinkState;

use apply::Batcher;

/// Requests of one phase [`Netlink::apply`] sends in one datagram. The kernel handles them in
/// order within that one `send` and queues an acknowledgement for each; this many fit the
/// socket's receive buffer with room to spare.
pub const APPLY_BATCH: usize = 64;

/// errno values the callers care about.
pub const EEXIST: i32 = 17;
pub const ENOENT: i32 = 2;
pub const ESRCH: i32 = 3;
pub const ENETUNREACH: i32 = 101;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("{what}: {source}")]
    Request {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("opening a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl NetlinkError {
    /// The kernel's errno for a failed request (positive), if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Request {
                source: rtnetlink::Error::NetlinkError(e),
                ..
            } => e.code.map(|c| -c.get()),
            _ => None,
        }
    }
}

fn req(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Request { what, source }
}

/// The ifindex of each link role on this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkMap {
    pub vxlan4: Option<u32>,
    pub vxlan6: Option<u32>,
    pub external: u32,
}

impl LinkMap {
    pub fn index(&self, link: LinkRef) -> Option<u32> {
        match link {
            LinkRef::Vxlan4 => self.vxlan4,
            LinkRef::Vxlan6 => self.vxlan6,
            LinkRef::External => Some(self.external),
        }
    }

    pub fn role(&self, index: u32) -> Option<LinkRef> {
        if Some(index) == self.vxlan4 {
            Some(LinkRef::Vxlan4)
        } else if Some(index) == self.vxlan6 {
            Some(LinkRef::Vxlan6)
        } else if index == self.external {
            Some(LinkRef::External)
        } else {
            None
        }
    }

    fn vxlan_indexes(&self) -> impl Iterator<Item = u32> {
        self.vxlan4.into_iter().chain(self.vxlan6)
    }
}

/// A netlink connection in the network namespace of the thread that opened it.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    /// The plain socket [`Netlink::apply`] sends its batches on.
    batcher: Arc<Mutex<Batcher>>,
}

impl Netlink {
    /// Opens a connection; must be called inside a tokio runtime.
    pub fn connect() -> Result<Netlink, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        let batcher = Arc::new(Mutex::new(Batcher::open()?));
        Ok(Netlink { handle, batcher })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

fn is_errno(e: &rtnetlink::Error, codes: &[i32]) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.is_some_and(|c| codes.contains(&-c.get())))
}
