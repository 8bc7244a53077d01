//! The etcd v3 subnet registry, with Flannel's key layout and semantics (§2): leases under
//! `<prefix>/subnets/<key>`, created with a create-if-absent transaction on a 24 h etcd lease,
//! renewed by re-granting and re-putting, and watched from a revision with resume and
//! re-list after compaction.

use std::path::Path;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;

use twill_formats::lease::{
    config_key_path, parse_subnet_key_path, subnet_key_path, LeaseAttrs, SubnetKey,
};

/// Flannel's `subnetTTL`.
pub const SUBNET_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("reading {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("subnet already exists")]
    AlreadyExists,
}

/// How to reach etcd: `--etcd-*` flags.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub keyfile: String,
    pub certfile: String,
    pub cafile: String,
    pub username: String,
    pub password: String,
}

/// One key under `<prefix>/subnets/`, parsed as far as it goes: a peer's garbage must reach
/// the daemon as a named, skippable record, never as an error that stops the watch.
#[derive(Clone, Debug)]
pub struct LeaseRecord {
    pub key: SubnetKey,
    pub attrs: Result<LeaseAttrs, String>,
    /// The etcd lease the key is attached to; 0 for a reservation.
    pub lease_id: i64,
}

/// A consistent listing of all subnet keys at `revision`.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    pub records: Vec<LeaseRecord>,
    pub revision: i64,
}

/// What the watch reports.
#[derive(Clone, Debug)]
pub enum RegistryEvent {
    /// A key was created or changed.
    Put(LeaseRecord),
    /// A key was deleted or its etcd lease expired.
    Delete(SubnetKey),
    /// The watch had to start over (compaction, or resuming failed): here is the whole state.
    /// The receiver replaces what it knows, which catches deletions it never saw as events.
    Resync(Listing),
}

#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    prefix: String,
}

fn read_file(path: &str) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(Path::new(path)).map_err(|source| RegistryError::File {
        path: path.to_string(),
        source,
    })
}

impl EtcdRegistry {
    /// Connects; TLS is used when both a key and a certificate file are given, as in Flannel.
    pub async fn connect(opts: &EtcdOptions) -> Result<EtcdRegistry, RegistryError> {
        let mut co = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
        if !opts.keyfile.is_empty() && !opts.certfile.is_empty() {
            let mut tls = TlsOptions::new().identity(Identity::from_pem(
                read_file(&opts.certfile)?,
                read_file(&opts.keyfile)?,
            ));
            if !opts.cafile.is_empty() {
                tls = tls.ca_certificate(Certificate::from_pem(read_file(&opts.cafile)?));
            }
            co = co.with_tls(tls);
        } else if opts.endpoints.iter().any(|e| e.starts_with("https://")) {
            tracing::warn!("https etcd endpoint without --etcd-certfile/--etcd-keyfile: connecting without client certificates");
        }
        if !opts.username.is_empty() {
            co = co.with_user(opts.username.clone(), opts.password.clone());
        }
        let client = Client::connect(&opts.endpoints, Some(co)).await?;
        Ok(EtcdRegistry {
            client,
            prefix: opts.prefix.clone(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix.trim_end_matches('/'))
    }

    /// `<prefix>/config`, if present.
    pub async fn network_config(&self) -> Result<Option<String>, RegistryError> {
        let resp = self
            .client
            .clone()
            .get(config_key_path(&self.prefix), None)
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    fn record(&self, key: &[u8], value: &[u8], lease_id: i64) -> Option<LeaseRecord> {
        let key = parse_subnet_key_path(&self.prefix, std::str::from_utf8(key).ok()?)?;
        let attrs = LeaseAttrs::from_json(value).map_err(|e| e.to_string());
        Some(LeaseRecord {
            key,
            attrs,
            lease_id,
        })
    }

    /// All subnet keys. Keys that are not subnets are skipped, as Flannel does.
    pub async fn list(&self) -> Result<Listing, RegistryError> {
        let resp = self
            .client
            .clone()
            .get(self.subnets_prefix(), Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let records = resp
            .kvs()
            .iter()
            .filter_map(|kv| self.record(kv.key(), kv.value(), kv.lease()))
            .collect();
        Ok(Listing { records, revision })
    }

    /// Create-if-absent on a fresh 24 h lease (`ttl` = None: a reservation, no lease).
    /// Returns the granted TTL. A lost race is [`RegistryError::AlreadyExists`].
    pub async fn create(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        ttl: Option<Duration>,
    ) -> Result<Option<Duration>, RegistryError> {
        let mut client = self.client.clone();
        let path = subnet_key_path(&self.prefix, key);
        let (opts, granted) = match ttl {
            Some(ttl) => {
                let grant = client.lease_grant(ttl.as_secs() as i64, None).await?;
                (
                    Some(PutOptions::new().with_lease(grant.id())),
                    Some((grant.id(), Duration::from_secs(grant.ttl() as u64))),
                )
            }
            None => (None, None),
        };
        let txn = Txn::new()
            .when([Compare::version(path.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(path, attrs.to_json(), opts)]);
        let resp = client.txn(txn).await?;
        if !resp.succeeded() {
            if let Some((id, _)) = granted {
                let _ = client.lease_revoke(id).await;
            }
            return Err(RegistryError::AlreadyExists);
        }
        Ok(granted.map(|(_, t)| t))
    }

    /// Flannel's update/renew: a new grant and a plain put (`ttl` = None keeps a reservation
    /// a reservation). Returns the granted TTL.
    pub async fn put(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        ttl: Option<Duration>,
    ) -> Result<Option<Duration>, RegistryError> {
        let mut client = self.client.clone();
        let path = subnet_key_path(&self.prefix, key);
        match ttl {
            Some(ttl) => {
                let grant = client.lease_grant(ttl.as_secs() as i64, None).await?;
                client
                    .put(
                        path,
                        attrs.to_json(),
                        Some(PutOptions::new().with_lease(grant.id())),
                    )
                    .await?;
                Ok(Some(Duration::from_secs(grant.ttl() as u64)))
            }
            None => {
                client.put(path, attrs.to_json(), None).await?;
                Ok(None)
            }
        }
    }

    pub async fn delete(&self, key: &SubnetKey) -> Result<(), RegistryError> {
        self.client
            .clone()
            .delete(subnet_key_path(&self.prefix, key), None)
            .await?;
        Ok(())
    }

    /// Watches `<prefix>/subnets/` from `after_revision + 1` until `events` is closed.
    /// Reconnects with exponential backoff (100 ms to 5 s) and resumes from the last revision
    /// seen; after a compaction (or when resuming is refused) it re-lists and sends
    /// [`RegistryEvent::Resync`].
    pub async fn watch(self, mut after_revision: i64, events: mpsc::Sender<RegistryEvent>) {
        let mut backoff = Duration::from_millis(100);
        let mut need_relist = false;
        while !events.is_closed() {
            if need_relist {
                match self.list().await {
                    Ok(listing) => {
                        after_revision = listing.revision;
                        if events.send(RegistryEvent::Resync(listing)).await.is_err() {
                            return;
                        }
                        need_relist = false;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "re-listing subnets failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(after_revision + 1);
            let mut stream = match self
                .client
                .clone()
                .watch(self.subnets_prefix(), Some(opts))
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "watching subnets failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        backoff = Duration::from_millis(100);
                        if resp.compact_revision() != 0 || resp.canceled() {
                            tracing::warn!(
                                compact_revision = resp.compact_revision(),
                                reason = resp.cancel_reason(),
                                "subnet watch cancelled (compaction); re-listing"
                            );
                            need_relist = true;
                            break;
                        }
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            after_revision = after_revision.max(kv.mod_revision());
                            let event = match ev.event_type() {
                                EventType::Put => self
                                    .record(kv.key(), kv.value(), kv.lease())
                                    .map(RegistryEvent::Put),
                                EventType::Delete => std::str::from_utf8(kv.key())
                                    .ok()
                                    .and_then(|k| parse_subnet_key_path(&self.prefix, k))
                                    .map(RegistryEvent::Delete),
                            };
                            if let Some(event) = event {
                                if events.send(event).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    Ok(None) => {
                        tracing::warn!("subnet watch closed by etcd; reconnecting");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "subnet watch failed; reconnecting");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        break;
                    }
                }
            }
        }
    }
}
