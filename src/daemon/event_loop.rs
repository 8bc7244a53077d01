//! The event loop: it feeds the core lease events, netlink signals, resync ticks, timers,
//! the outcomes of lease writes and signals, and carries out the commands that come back. One
//! task owns the dataplane; a lease write runs beside the loop, so a slow or failing etcd holds
//! up neither reconciling nor shutting down. The effects sit behind [`LeaseSource`] and
//! [`DataplaneEffects`], so tests drive the loop with fakes.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use anyhow::bail;
use tokio::sync::mpsc;
use tokio::time::Instant;
use twill_backends::PeerLease;

use super::core::{Command, Core, Event, NetlinkSignal, Stop, WriteResult};
use super::sources::{LeaseSource, WriteJob};
use super::Observability;

/// A lease-event burst is taken as over once the watch has been quiet this long...
const LEASE_BURST_QUIET: Duration = Duration::from_millis(10);
/// ...or after this long at most, so a steady trickle of events still gets programmed.
const LEASE_BURST_MAX: Duration = Duration::from_millis(100);
/// A burst of kernel events settles this long into one pass.
const NETLINK_SETTLE: Duration = Duration::from_millis(20);

/// What the loop asks of the dataplane.
pub(super) trait DataplaneEffects {
    /// Observe, decide, diff, apply toward `peers` (`table_skipped`: the leases the peer
    /// table left out, for the metrics and the status); the number of ops applied.
    async fn reconcile(
        &mut self,
        peers: &[PeerLease],
        table_skipped: &BTreeMap<String, String>,
    ) -> anyhow::Result<usize>;
    /// Re-reads the external interface's addresses and checks the underlay guard for drift.
    async fn check_underlay(&mut self);
}

/// Which lease write is in flight, so its outcome goes back to the core as the right event.
enum WriteKind {
    Renew,
    Reacquire,
}

/// Runs until `shutdown` completes (Ok) or the core stops on a conflict or a source fails
/// (Err). `netlink` carries the netlink monitor's signals; the outcomes of lease writes are
/// recorded in `obs` (renewals, the lease's expiry).
pub(super) async fn event_loop<S: LeaseSource, D: DataplaneEffects>(
    mut core: Core,
    mut source: S,
    mut dataplane: D,
    mut netlink: mpsc::Receiver<NetlinkSignal>,
    resync_period: Duration,
    shutdown: impl Future<Output = ()>,
    obs: Observability,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel::<S::Event>(4096);
    let first = source.start(tx).await?;
    let mut commands = core.handle(Event::Lease(first), std::time::Instant::now());
    let mut resync = tokio::time::interval(resync_period);
    let mut write: Option<(WriteKind, WriteJob)> = None;
    let far_future = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    tokio::pin!(shutdown);

    loop {
        let skipped = core.skipped();
        if let Some(stop) = execute(
            commands.drain(..),
            skipped,
            &mut dataplane,
            &source,
            &mut write,
        )
        .await
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
                    commands
                        .extend(core.handle(Event::Lease(ev.into()), std::time::Instant::now()));
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
            result = in_flight(&mut write) => {
                record_write(&result, &obs);
                result
            }
            () = &mut shutdown => Event::Shutdown,
        };
        commands = core.handle(event, std::time::Instant::now());
    }
}

/// Records a lease write's outcome: a renewal counted, the expiry of a granted lease.
fn record_write(event: &Event, obs: &Observability) {
    let now = std::time::Instant::now();
    match event {
        Event::Renewed(result) => {
            obs.metrics.record_renewal(result.is_ok());
            if let Ok(ttl) = result {
                obs.lease_expires(ttl.map(|t| now + t));
            }
        }
        Event::Reacquired(Ok(ttl)) => obs.lease_expires(ttl.map(|t| now + t)),
        _ => {}
    }
}

/// The outcome of the lease write in flight as the core's event; pending while none is.
async fn in_flight(write: &mut Option<(WriteKind, WriteJob)>) -> Event {
    // Polled through a reference, so a write outlives a select that another branch won.
    let Some((kind, job)) = write.as_mut() else {
        return std::future::pending().await;
    };
    let result: WriteResult = job.await;
    let event = match kind {
        WriteKind::Renew => Event::Renewed(result),
        WriteKind::Reacquire => Event::Reacquired(result),
    };
    *write = None;
    event
}

/// Carries out `commands`; `Some` when the loop must return.
async fn execute<S: LeaseSource, D: DataplaneEffects>(
    commands: impl Iterator<Item = Command>,
    table_skipped: &BTreeMap<String, String>,
    dataplane: &mut D,
    source: &S,
    write: &mut Option<(WriteKind, WriteJob)>,
) -> Option<anyhow::Result<()>> {
    for command in commands {
        match command {
            Command::Reconcile(peers) => {
                if let Err(e) = dataplane.reconcile(&peers, table_skipped).await {
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use tokio::sync::oneshot;

    use super::*;
    use crate::daemon::core::{LeaseEvent, LeaseWrite, Retry, WriteError};
    use crate::daemon::testing::{etcd_core, own_record, record, DAY};
    use crate::registry::etcd::{Listing, RegistryEvent};

    /// Short retries, so a test sees several attempts quickly.
    const FAST_RETRY: Retry = Retry {
        min: Duration::from_millis(10),
        max: Duration::from_millis(40),
    };
    /// Generous: the machine is shared, and a pass normally takes milliseconds.
    const DEADLINE: Duration = Duration::from_secs(20);

    /// An etcd stand-in: the listing it starts with, the watch's sender for the test to push
    /// events with, and the outcomes of re-acquire attempts (`None`: the attempt never ends,
    /// as a create against a hung etcd).
    #[derive(Clone, Default)]
    struct FakeSource {
        watch: Arc<Mutex<Option<mpsc::Sender<RegistryEvent>>>>,
        reacquire_outcomes: Arc<Mutex<VecDeque<Option<WriteResult>>>>,
        reacquires: Arc<Mutex<Vec<LeaseWrite>>>,
    }

    impl FakeSource {
        fn with_reacquire_outcomes(outcomes: Vec<Option<WriteResult>>) -> FakeSource {
            let source = FakeSource::default();
            *source.reacquire_outcomes.lock().unwrap() = outcomes.into();
            source
        }

        async fn send(&self, ev: RegistryEvent) {
            let tx = self
                .watch
                .lock()
                .unwrap()
                .clone()
                .expect("the loop started");
            tx.send(ev).await.expect("the loop is running");
        }

        fn reacquire_attempts(&self) -> usize {
            self.reacquires.lock().unwrap().len()
        }

        async fn wait_attempts(&self, attempts: usize) {
            tokio::time::timeout(DEADLINE, async {
                while self.reacquire_attempts() < attempts {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("no {attempts} re-acquire attempts within {DEADLINE:?}"));
        }
    }

    impl LeaseSource for FakeSource {
        type Event = RegistryEvent;

        async fn start(&mut self, tx: mpsc::Sender<RegistryEvent>) -> anyhow::Result<LeaseEvent> {
            *self.watch.lock().unwrap() = Some(tx);
            Ok(LeaseEvent::Etcd(RegistryEvent::Resync(Listing {
                records: vec![own_record(), record("10.244.2.0-24", "198.18.0.2", 2)],
                revision: 1,
            })))
        }

        fn renew(&self, w: LeaseWrite) -> WriteJob {
            Box::pin(async move { Ok(w.ttl) })
        }

        fn reacquire(&self, w: LeaseWrite) -> WriteJob {
            self.reacquires.lock().unwrap().push(w);
            match self.reacquire_outcomes.lock().unwrap().pop_front() {
                Some(Some(result)) => Box::pin(async move { result }),
                Some(None) | None => Box::pin(std::future::pending()),
            }
        }
    }

    /// Records each pass's peers and counts underlay checks.
    struct FakeDataplane {
        passes: mpsc::UnboundedSender<Vec<String>>,
        underlay_checks: Arc<Mutex<usize>>,
    }

    impl DataplaneEffects for FakeDataplane {
        async fn reconcile(
            &mut self,
            peers: &[PeerLease],
            _: &BTreeMap<String, String>,
        ) -> anyhow::Result<usize> {
            let _ = self
                .passes
                .send(peers.iter().map(|p| p.name.clone()).collect());
            Ok(0)
        }

        async fn check_underlay(&mut self) {
            *self.underlay_checks.lock().unwrap() += 1;
        }
    }

    /// The loop running on fakes, and the handles a test drives it with.
    struct Harness {
        source: FakeSource,
        passes: mpsc::UnboundedReceiver<Vec<String>>,
        underlay_checks: Arc<Mutex<usize>>,
        netlink: mpsc::Sender<NetlinkSignal>,
        sigterm: Option<oneshot::Sender<()>>,
        running: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    impl Harness {
        fn start(source: FakeSource) -> Harness {
            let (passes_tx, passes) = mpsc::unbounded_channel();
            let underlay_checks = Arc::new(Mutex::new(0));
            let (netlink, netlink_rx) = mpsc::channel(8);
            let (sigterm, sigterm_rx) = oneshot::channel::<()>();
            let dataplane = FakeDataplane {
                passes: passes_tx,
                underlay_checks: underlay_checks.clone(),
            };
            let core = etcd_core(std::time::Instant::now(), FAST_RETRY);
            let running = tokio::spawn(event_loop(
                core,
                source.clone(),
                dataplane,
                netlink_rx,
                Duration::from_secs(3600),
                async move {
                    let _ = sigterm_rx.await;
                },
                Observability {
                    metrics: Default::default(),
                    status: Default::default(),
                    events: twill_runtime::events::NodeEvents::disabled(),
                },
            ));
            Harness {
                source,
                passes,
                underlay_checks,
                netlink,
                sigterm: Some(sigterm),
                running,
            }
        }

        /// Waits for a pass programming exactly `peers`.
        async fn pass_with(&mut self, peers: &[&str]) {
            let wanted: Vec<String> = peers.iter().map(|p| p.to_string()).collect();
            tokio::time::timeout(DEADLINE, async {
                while let Some(pass) = self.passes.recv().await {
                    if pass == wanted {
                        return;
                    }
                }
                panic!("the loop stopped before a pass with {wanted:?}");
            })
            .await
            .unwrap_or_else(|_| panic!("no pass with {wanted:?} within {DEADLINE:?}"));
        }

        /// Sends SIGTERM's stand-in and returns what the loop returned.
        async fn stop(mut self) -> anyhow::Result<()> {
            self.sigterm.take().expect("stopped once").send(()).ok();
            tokio::time::timeout(DEADLINE, self.running)
                .await
                .expect("the loop did not stop on SIGTERM")
                .expect("the loop panicked")
        }
    }

    #[tokio::test]
    async fn a_hanging_reacquire_holds_up_neither_reconciling_nor_sigterm() {
        let mut h = Harness::start(FakeSource::with_reacquire_outcomes(vec![None]));
        h.pass_with(&["10.244.2.0-24"]).await;
        h.source.send(RegistryEvent::Delete(own_record().key)).await;
        h.source
            .send(RegistryEvent::Put(record("10.244.3.0-24", "198.18.0.3", 3)))
            .await;
        h.pass_with(&["10.244.2.0-24", "10.244.3.0-24"]).await;
        assert_eq!(h.source.reacquire_attempts(), 1);
        h.stop().await.expect("SIGTERM is a clean stop");
    }

    #[tokio::test]
    async fn a_lost_lease_is_reacquired_after_failures_with_the_configured_ttl() {
        let failed = || Some(Err(WriteError::Failed("etcd unreachable".to_string())));
        let source =
            FakeSource::with_reacquire_outcomes(vec![failed(), failed(), Some(Ok(Some(DAY)))]);
        let mut h = Harness::start(source);
        h.pass_with(&["10.244.2.0-24"]).await;
        h.source.send(RegistryEvent::Delete(own_record().key)).await;
        h.source.wait_attempts(3).await;
        // The lease is held again: a further deletion is a new loss, and asks again.
        h.source.send(RegistryEvent::Delete(own_record().key)).await;
        // A fourth attempt, after the lease was lost again.
        h.source.wait_attempts(4).await;
        let writes = h.source.reacquires.lock().unwrap().clone();
        assert!(writes
            .iter()
            .all(|w| w.key == own_record().key && w.ttl == Some(DAY)));
        h.stop().await.expect("SIGTERM is a clean stop");
    }

    #[tokio::test]
    async fn a_netlink_overrun_checks_the_underlay_and_reconciles() {
        let mut h = Harness::start(FakeSource::default());
        h.pass_with(&["10.244.2.0-24"]).await;
        let checks_before = *h.underlay_checks.lock().unwrap();
        h.netlink.send(NetlinkSignal::Overrun).await.unwrap();
        h.pass_with(&["10.244.2.0-24"]).await;
        assert!(*h.underlay_checks.lock().unwrap() > checks_before);
        h.stop().await.expect("SIGTERM is a clean stop");
    }

    #[tokio::test]
    async fn a_subnet_taken_by_another_node_stops_the_loop_with_an_error() {
        let source =
            FakeSource::with_reacquire_outcomes(vec![Some(Err(WriteError::AlreadyExists))]);
        let mut h = Harness::start(source);
        h.pass_with(&["10.244.2.0-24"]).await;
        h.source.send(RegistryEvent::Delete(own_record().key)).await;
        let result = tokio::time::timeout(DEADLINE, &mut h.running)
            .await
            .expect("the loop stops on a conflict")
            .expect("the loop panicked");
        let error = result.expect_err("a conflict is an error");
        assert!(
            error.to_string().contains("was taken by another node"),
            "{error}"
        );
    }
}
