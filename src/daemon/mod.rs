//! twilld's daemon: start-up in Flannel's order, then one event loop that owns the dataplane.
//!
//! - `startup`: config, external interface, backend device, lease, device address,
//!   masquerade rules, subnet.env, for etcd and Kubernetes mode.
//! - `core`: the state machine: lease events, netlink signals, ticks, timers and signals in;
//!   commands (reconcile with these peers, renew, re-acquire, stop) out. No I/O.
//! - `peers`: the peer table (other nodes' leases as dataplane peers, garbage skipped).
//! - `sources`: where leases live (etcd, the Kubernetes API), behind `LeaseSource`.
//! - `dataplane`: devices, observe/decide/diff/apply, the underlay guard, the netlink monitor.
//! - `event_loop`: feeds the core and carries out its commands.
//!
//! What the daemon shows of itself ([`Observability`]): metrics, the status board, and
//! Kubernetes events on its node (`--kube-subnet-mgr` only).
//!
//! Nothing is torn down on exit, so restarts are hitless.

mod core;
mod dataplane;
mod event_loop;
mod peers;
mod sources;
mod startup;
#[cfg(test)]
mod testing;

pub use startup::run;

use std::sync::Arc;
use std::time::Instant;

use twill_runtime::events::{NodeEvent, NodeEvents, Severity};

use crate::metrics::Metrics;
use crate::status::StatusBoard;

/// Where the daemon records what it does: metrics, the status board, node events.
#[derive(Clone)]
pub(crate) struct Observability {
    pub metrics: Arc<Metrics>,
    pub status: Arc<StatusBoard>,
    pub events: NodeEvents,
}

impl Observability {
    /// This node's lease now expires at `at` (`None`: it does not).
    pub(crate) fn lease_expires(&self, at: Option<Instant>) {
        self.metrics.set_lease_expiry(at);
        self.status.set_lease_expiry(at);
    }

    /// A peer's lease became skipped, or its reason changed.
    pub(crate) fn peer_skipped(&self, peer: &str, reason: &str) {
        self.events.publish(NodeEvent {
            severity: Severity::Warning,
            reason: "PeerLeaseSkipped",
            action: "ProgramPeer",
            note: format!("not programming the lease of {peer}: {reason}"),
            related_node: Some(peer.to_string()),
        });
    }
}
