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
