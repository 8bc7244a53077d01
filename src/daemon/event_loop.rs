//! The event loop: it feeds the core lease events, netlink signals, resync ticks, timers,
//! the outcomes of lease writes and signals, and carries out the commands that come back. One
//! task owns the dataplane; a lease write runs beside the loop, so a slow or failing etcd holds
//! up neither reconciling nor shutting down. The effects sit behind [`LeaseSource`] and
//! [`DataplaneEffects`], so tests drive the loop with fakes.

use std::future::Future;
use std::time::Duration;

use anyhow::bail;
use tokio::sync::mpsc;
use tokio::time::Instant;
use twill_backends::PeerLease;

use super::core::{Command, Core, Event, NetlinkSignal, Stop, WriteResult};
use super::sources::{LeaseSource, WriteJob};

/// A lease-event burst is taken as over once the watch has been quiet this long...
const LEASE_BURST_QUIET: Duration = Duration::from_millis(10);
/// ...or after this long at most, so a steady trickle of events still gets programmed.
const LEASE_BURST_MAX: Duration = Duration::from_millis(100);
/// A burst of kernel events settles this long into one pass.
const NETLINK_SETTLE: Duration = Duration::from_millis(20);

/// What the loop asks of the dataplane.
pub(super) trait DataplaneEffects {
    /// Observe, decide, diff, apply toward `peers`; the number of ops.
    async fn reconcile(&mut self, peers: &[PeerLease]) -> anyhow::Result<usize>;
    /// Re-reads the external interface's addresses and checks the underlay guard for drift.
    async fn check_underlay(&mut self);
}

/// Which lease write is in flight, so its outcome goes back to the core as the right event.
enum WriteKind {
    Renew,
    Reacquire,
}

/// Runs until `shutdown` completes (Ok) or the core stops on a conflict or a source fails
/// (Err). `netlink` carries the netlink monitor's signals.
pub(super) async fn event_loop<S: LeaseSource, D: DataplaneEffects>(
    mut core: Core,
    mut source: S,
    mut dataplane: D,
    mut netlink: mpsc::Receiver<NetlinkSignal>,
    resync_period: Duration,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel::<S::Event>(4096);
    let first = source.start(tx).await?;
    let mut commands = core.handle(Event::Lease(first), std::time::Instant::now());
    let mut resync = tokio::time::interval(resync_period);
    let mut write: Option<(WriteKind, WriteJob)> = None;
    let far_future = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    tokio::pin!(shutdown);

    loop {
        if let Some(stop) = execute(commands.drain(..), &mut dataplane, &source, &mut write).await
        {
            return stop;
        }
        if core.is_dirty() {
            // Coalesce a burst of lease events (1000 leases arrive as a few dozen watch
            // responses) into one pass: keep draining until the watch is quiet for
            // LEASE_BURST_QUIET, but never wait longer than LEASE_BURST_MAX.
            let burst_deadline = Instant::now() + LEASE_BURST_MAX;
            loop {
                while let Ok(ev) = rx.try_recv() {
                    commands.extend(core.handle(Event::Lease(ev.into()), std::time::Instant::now()));
                }
                let quiet_until = (Instant::now() + LEASE_BURST_QUIET).min(burst_deadline);
                match tokio::time::timeout_at(quiet_until, rx.recv()).await {
                    Ok(Some(ev)) => commands
                        .extend(core.handle(Event::Lease(ev.into()), std::time::Instant::now())),
                    Ok(None) => bail!("the registry watch stopped"),
                    Err(_) => break,
                }
            }
            commands.extend(core.reconcile());
            continue;
        }
        let deadline = core
            .next_deadline()
            .map(Instant::from_std)
            .unwrap_or(far_future);
        let event = tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { bail!("the registry watch stopped") };
                Event::Lease(ev.into())
            }
            signal = netlink.recv() => match signal {
                Some(NetlinkSignal::Changed) => {
                    tokio::time::sleep(NETLINK_SETTLE).await;
                    Event::Netlink(NetlinkSignal::Changed)
                }
                Some(signal) => Event::Netlink(signal),
                None => bail!("the netlink monitor stopped"),
            },
            _ = resync.tick() => Event::Tick,
            _ = tokio::time::sleep_until(deadline) => Event::Timer,
            result = in_flight(&mut write) => result,
            () = &mut shutdown => Event::Shutdown,
        };
        commands = core.handle(event, std::time::Instant::now());
    }
}

/// The outcome of the lease write in flight as the core's event; pending while none is.
async fn in_flight(write: &mut Option<(WriteKind, WriteJob)>) -> Event {
    let Some((kind, job)) = write else {
        return std::future::pending().await;
    };
    let result: WriteResult = job.await;
    let kind = std::mem::replace(kind, WriteKind::Renew);
    *write = None;
    match kind {
        WriteKind::Renew => Event::Renewed(result),
        WriteKind::Reacquire => Event::Reacquired(result),
    }
}

/// Carries out `commands`; `Some` when the loop must return.
async fn execute<S: LeaseSource, D: DataplaneEffects>(
    commands: impl Iterator<Item = Command>,
    dataplane: &mut D,
    source: &S,
    write: &mut Option<(WriteKind, WriteJob)>,
) -> Option<anyhow::Result<()>> {
    for command in commands {
        match command {
            Command::Reconcile(peers) => {
                if let Err(e) = dataplane.reconcile(&peers).await {
                    tracing::warn!(error = %e, "reconcile failed; retrying on the next pass");
                }
            }
            Command::CheckUnderlay => dataplane.check_underlay().await,
            // The core asks for one write at a time (it waits for each outcome).
            Command::Renew(w) => *write = Some((WriteKind::Renew, source.renew(w))),
            Command::Reacquire(w) => *write = Some((WriteKind::Reacquire, source.reacquire(w))),
            Command::Stop(Stop::Shutdown) => {
                tracing::info!("shutting down; the dataplane stays as it is");
                return Some(Ok(()));
            }
            Command::Stop(Stop::Conflict(reason)) => return Some(Err(anyhow::anyhow!(reason))),
        }
    }
    None
}
