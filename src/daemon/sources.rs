//! Where leases live, as the event loop sees them: etcd ([`EtcdSource`]) or the Kubernetes API
//! ([`KubeSource`], `--kube-subnet-mgr`). A source lists the current state, streams changes,
//! and (etcd only) writes the node's own lease; what the events mean is the core's job.
//! Start-up before the loop differs more (etcd allocates a subnet, Kubernetes reads the
//! podCIDR) and lives in [`super::startup`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use tokio::sync::mpsc;

use crate::registry::etcd::{EtcdRegistry, RegistryError, RegistryEvent};
use crate::registry::kube::{KubeSubnetManager, NodeEvent};
use twill_formats::net_conf::NetConfig;
use twill_runtime::events::{NodeEvent as KubeEvent, NodeEvents, Severity};

use crate::metrics::Metrics;

use super::core::{LeaseEvent, LeaseWrite, WriteError, WriteResult};
use super::startup::list_with_retry;

/// A lease write in flight, owning what it needs so the loop can keep serving events.
pub(super) type WriteJob = Pin<Box<dyn Future<Output = WriteResult> + Send>>;

pub(super) trait LeaseSource {
    type Event: Into<LeaseEvent> + Send + 'static;
    /// The current state as one resync event; the watch is started and sends on `tx`.
    async fn start(&mut self, tx: mpsc::Sender<Self::Event>) -> anyhow::Result<LeaseEvent>;
    /// Renews the own lease (a new grant and a plain put).
    fn renew(&self, write: LeaseWrite) -> WriteJob;
    /// Creates the own lease again, if the subnet is still free.
    fn reacquire(&self, write: LeaseWrite) -> WriteJob;
}

/// etcd mode: Flannel's etcd registry.
pub(super) struct EtcdSource {
    pub registry: EtcdRegistry,
    pub metrics: Arc<Metrics>,
}

/// A registry write's outcome as the core sees it.
fn write_result(result: Result<Option<Duration>, RegistryError>) -> WriteResult {
    result.map_err(|e| match e {
        RegistryError::AlreadyExists => WriteError::AlreadyExists,
        e => WriteError::Failed(e.to_string()),
    })
}

impl LeaseSource for EtcdSource {
    type Event = RegistryEvent;

    async fn start(&mut self, tx: mpsc::Sender<RegistryEvent>) -> anyhow::Result<LeaseEvent> {
        let listing = list_with_retry(&self.registry).await;
        tokio::spawn(
            self.registry
                .clone()
                .watch(listing.revision, tx, self.metrics.clone()),
        );
        Ok(LeaseEvent::Etcd(RegistryEvent::Resync(listing)))
    }

    fn renew(&self, w: LeaseWrite) -> WriteJob {
        let registry = self.registry.clone();
        Box::pin(async move { write_result(registry.put(&w.key, &w.attrs, w.ttl).await) })
    }

    fn reacquire(&self, w: LeaseWrite) -> WriteJob {
        let registry = self.registry.clone();
        Box::pin(async move { write_result(registry.create(&w.key, &w.attrs, w.ttl).await) })
    }
}

/// Kubernetes mode: peers are the other nodes carrying Flannel's annotations, keyed by node
/// name; the watch's re-lists replace the table, so no deletion is missed. The lease is the
/// node's podCIDR and the annotations twilld wrote: nothing to renew; re-acquiring writes the
/// annotations back as start-up does, with the events `LeaseLost` and `LeaseReacquired`.
pub(super) struct KubeSource {
    pub ksm: KubeSubnetManager,
    pub config: NetConfig,
    pub metrics: Arc<Metrics>,
    pub events: NodeEvents,
    /// Set from the first attempt of a re-acquire until one succeeds, so a run of failed
    /// attempts is one `LeaseLost`.
    pub lost: Arc<AtomicBool>,
}

impl LeaseSource for KubeSource {
    type Event = NodeEvent;

    async fn start(&mut self, tx: mpsc::Sender<NodeEvent>) -> anyhow::Result<LeaseEvent> {
        // The watcher's first complete listing is waited for, so the first pass programs
        // every peer instead of removing entries a restart should keep; anything before it is
        // replaced by it.
        let (itx, mut irx) = mpsc::channel(4096);
        tokio::spawn(
            self.ksm
                .clone()
                .watch(self.config.clone(), itx, self.metrics.clone()),
        );
        let first = loop {
            match irx.recv().await {
                Some(ev @ NodeEvent::Resync(_)) => break ev,
                Some(_) => continue,
                None => bail!("the node watch stopped"),
            }
        };
        tokio::spawn(async move {
            while let Some(ev) = irx.recv().await {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        });
        Ok(LeaseEvent::Node(first))
    }

    fn renew(&self, _: LeaseWrite) -> WriteJob {
        Box::pin(async {
            Err(WriteError::Failed(
                "Kubernetes mode holds no etcd lease".into(),
            ))
        })
    }

    fn reacquire(&self, w: LeaseWrite) -> WriteJob {
        let (ksm, config) = (self.ksm.clone(), self.config.clone());
        let (events, lost) = (self.events.clone(), self.lost.clone());
        Box::pin(async move {
            if !lost.swap(true, Ordering::SeqCst) {
                events.publish(KubeEvent {
                    severity: Severity::Warning,
                    reason: "LeaseLost",
                    action: "WatchLease",
                    note: format!(
                        "the flannel annotations of this node (subnet {}) were removed or changed; writing them back",
                        w.key.ipv4
                    ),
                    related_node: None,
                });
            }
            match ksm.acquire(&config, &w.attrs).await {
                Ok(key) if key == w.key => {
                    lost.store(false, Ordering::SeqCst);
                    tracing::info!(node = %ksm.node_name, subnet = %key.ipv4, "wrote this node's flannel annotations back");
                    events.publish(KubeEvent {
                        severity: Severity::Normal,
                        reason: "LeaseReacquired",
                        action: "AcquireLease",
                        note: format!("wrote the flannel annotations of subnet {} back", key.ipv4),
                        related_node: None,
                    });
                    Ok(None)
                }
                Ok(key) => Err(WriteError::Failed(format!(
                    "the node's podCIDR is now {key}, not {}; restart twilld to take it",
                    w.key
                ))),
                Err(e) => Err(WriteError::Failed(format!("{e:#}"))),
            }
        })
    }
}
