//! The etcd v3 subnet registry, with Flannel's key layout and semantics: leases under
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
use twill_runtime::backoff::retry_delays;

use twill_formats::lease::{
    config_key_path, parse_subnet_key_path, subnet_key_path, LeaseAttrs, LeaseError, SubnetKey,
};

/// First delay before re-watching or re-listing after an error (Flannel's).
const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest delay before re-watching or re-listing (Flannel's cap, before jitter).
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);

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
    pub attrs: Result<LeaseAttrs, LeaseError>,
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

/// The TLS set up for etcd, decided from the `--etcd-*` flags alone.
#[derive(Debug, PartialEq, Eq)]
pub enum TlsPlan<'a> {
    /// No TLS options.
    None,
    /// A client identity (`--etcd-certfile` and `--etcd-keyfile`), and the server verified
    /// against `--etcd-cafile` if given: Flannel's one TLS case.
    Identity {
        cert: &'a str,
        key: &'a str,
        ca: Option<&'a str>,
    },
    /// https endpoints and `--etcd-cafile` without a client identity: the server is verified
    /// against that CA. Flannel ignores the CA here (with no identity it passes etcd's client
    /// no TLS config, which dials https endpoints verifying against the system's roots only),
    /// so an operator's private CA was never trusted; twill trusts it.
    ServerOnly { ca: &'a str },
}

fn has_https_endpoint(opts: &EtcdOptions) -> bool {
    opts.endpoints.iter().any(|e| e.starts_with("https://"))
}

/// Which TLS `connect` sets up for `opts`.
pub fn tls_plan(opts: &EtcdOptions) -> TlsPlan<'_> {
    let given = |s: &str| !s.is_empty();
    if given(&opts.keyfile) && given(&opts.certfile) {
        TlsPlan::Identity {
            cert: &opts.certfile,
            key: &opts.keyfile,
            ca: given(&opts.cafile).then_some(opts.cafile.as_str()),
        }
    } else if given(&opts.cafile) && has_https_endpoint(opts) {
        TlsPlan::ServerOnly { ca: &opts.cafile }
    } else {
        TlsPlan::None
    }
}

fn read_file(path: &str) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(Path::new(path)).map_err(|source| RegistryError::File {
        path: path.to_string(),
        source,
    })
}

impl EtcdRegistry {
    /// Connects, with the TLS [`tls_plan`] decides from the flags.
    pub async fn connect(opts: &EtcdOptions) -> Result<EtcdRegistry, RegistryError> {
        let mut co = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
        match tls_plan(opts) {
            TlsPlan::Identity { cert, key, ca } => {
                let mut tls = TlsOptions::new()
                    .identity(Identity::from_pem(read_file(cert)?, read_file(key)?));
                if let Some(ca) = ca {
                    tls = tls.ca_certificate(Certificate::from_pem(read_file(ca)?));
                }
                co = co.with_tls(tls);
            }
            TlsPlan::ServerOnly { ca } => {
                co = co.with_tls(
                    TlsOptions::new().ca_certificate(Certificate::from_pem(read_file(ca)?)),
                );
            }
            TlsPlan::None => {
                if has_https_endpoint(opts) {
                    tracing::warn!("https etcd endpoint without --etcd-certfile/--etcd-keyfile: connecting without client certificates");
                }
            }
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
        let attrs = LeaseAttrs::from_json(value);
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

    /// A subnet key created before `own` that shares one of its subnets, if any. Dual-stack
    /// keys join both families' subnets (`10.244.9.0-24&fd00:42:0:5::-64`), so two nodes that
    /// picked the same IPv4 subnet but different IPv6 ones create different keys, and
    /// create-if-absent lets both through; the later creator must yield.
    pub async fn earlier_overlapping(
        &self,
        own: &SubnetKey,
    ) -> Result<Option<SubnetKey>, RegistryError> {
        let resp = self
            .client
            .clone()
            .get(self.subnets_prefix(), Some(GetOptions::new().with_prefix()))
            .await?;
        let keys: Vec<(SubnetKey, i64)> = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let path = std::str::from_utf8(kv.key()).ok()?;
                Some((
                    parse_subnet_key_path(&self.prefix, path)?,
                    kv.create_revision(),
                ))
            })
            .collect();
        Ok(earlier_overlapping(&keys, own))
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
    /// Reconnects with exponential backoff (100 ms to 5 s, Flannel's, plus jitter so nodes
    /// that lost etcd together do not come back in lockstep) and resumes from the last
    /// revision seen; after a compaction (or when resuming is refused) it re-lists and sends
    /// [`RegistryEvent::Resync`]. Each reconnect and re-list is counted in `metrics`.
    pub async fn watch(
        self,
        mut after_revision: i64,
        events: mpsc::Sender<RegistryEvent>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) {
        let mut delays = retry_delays(WATCH_RETRY_MIN, WATCH_RETRY_MAX);
        let mut need_relist = false;
        while !events.is_closed() {
            if need_relist {
                metrics.record_relist();
                match self.list().await {
                    Ok(listing) => {
                        after_revision = listing.revision;
                        if events.send(RegistryEvent::Resync(listing)).await.is_err() {
                            return;
                        }
                        need_relist = false;
                    }
                    Err(e) => {
                        let backoff = delays.next().unwrap_or(WATCH_RETRY_MAX);
                        tracing::warn!(error = %e, retry_in = ?backoff, "re-listing subnets failed");
                        tokio::time::sleep(backoff).await;
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
                    metrics.record_watch_restart();
                    let backoff = delays.next().unwrap_or(WATCH_RETRY_MAX);
                    tracing::warn!(error = %e, retry_in = ?backoff, "watching subnets failed");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        delays = retry_delays(WATCH_RETRY_MIN, WATCH_RETRY_MAX);
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
                        metrics.record_watch_restart();
                        tracing::warn!("subnet watch closed by etcd; reconnecting");
                        break;
                    }
                    Err(e) => {
                        metrics.record_watch_restart();
                        let backoff = delays.next().unwrap_or(WATCH_RETRY_MAX);
                        tracing::warn!(error = %e, retry_in = ?backoff, "subnet watch failed; reconnecting");
                        tokio::time::sleep(backoff).await;
                        break;
                    }
                }
            }
        }
    }
}

/// Among `keys` (each with its etcd create revision), one created before `own` whose IPv4 or
/// IPv6 subnet overlaps own's. Pure. `None` when `own` is not among them (it is gone; the
/// caller's lease handling takes over from there).
pub fn earlier_overlapping(keys: &[(SubnetKey, i64)], own: &SubnetKey) -> Option<SubnetKey> {
    let (_, own_revision) = keys.iter().find(|(k, _)| k == own)?;
    let overlaps = |k: &SubnetKey| {
        let v4 = k.ipv4.contains(&own.ipv4) || own.ipv4.contains(&k.ipv4);
        let v6 = match (k.ipv6, own.ipv6) {
            (Some(a), Some(b)) => a.contains(&b) || b.contains(&a),
            _ => false,
        };
        v4 || v6
    };
    keys.iter()
        .filter(|(k, revision)| k != own && revision < own_revision && overlaps(k))
        .map(|(k, _)| *k)
        .min_by_key(|k| k.ipv4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_later_of_two_keys_sharing_a_subnet_yields() {
        let key = |s: &str| SubnetKey::parse(s).unwrap();
        let n1 = key("10.244.9.0-24&fd00:42:0:a::-64");
        let n2 = key("10.244.9.0-24&fd00:42:0:b::-64");
        let n3 = key("10.244.7.0-24&fd00:42:0:a::-64");
        let other = key("10.244.1.0-24&fd00:42:0:c::-64");
        let keys = [(n1, 5), (n2, 6), (other, 2)];
        assert_eq!(earlier_overlapping(&keys, &n2), Some(n1));
        assert_eq!(earlier_overlapping(&keys, &n1), None);
        // The IPv6 half alone is a collision too.
        assert_eq!(earlier_overlapping(&[(n1, 5), (n3, 9)], &n3), Some(n1));
        // Single-stack keys are unique by create-if-absent; disjoint ones never yield.
        assert_eq!(earlier_overlapping(&[(other, 2), (n2, 6)], &n2), None);
        // A key no longer in etcd is not judged here.
        assert_eq!(earlier_overlapping(&[(n1, 5)], &n2), None);
    }

    fn opts(endpoint: &str, cert: &str, key: &str, ca: &str) -> EtcdOptions {
        EtcdOptions {
            endpoints: vec![endpoint.to_string()],
            certfile: cert.to_string(),
            keyfile: key.to_string(),
            cafile: ca.to_string(),
            ..EtcdOptions::default()
        }
    }

    #[test]
    fn a_ca_alone_verifies_https_servers() {
        let o = opts("https://198.18.0.1:2379", "", "", "/pki/ca.crt");
        assert_eq!(tls_plan(&o), TlsPlan::ServerOnly { ca: "/pki/ca.crt" });
        // Half a client identity is no identity: the CA is still used.
        let o = opts("https://198.18.0.1:2379", "/pki/c.crt", "", "/pki/ca.crt");
        assert_eq!(tls_plan(&o), TlsPlan::ServerOnly { ca: "/pki/ca.crt" });
    }

    #[test]
    fn a_client_identity_with_or_without_a_ca() {
        let o = opts("https://e:2379", "/pki/c.crt", "/pki/c.key", "/pki/ca.crt");
        assert_eq!(
            tls_plan(&o),
            TlsPlan::Identity {
                cert: "/pki/c.crt",
                key: "/pki/c.key",
                ca: Some("/pki/ca.crt")
            }
        );
        let o = opts("https://e:2379", "/pki/c.crt", "/pki/c.key", "");
        assert_eq!(
            tls_plan(&o),
            TlsPlan::Identity {
                cert: "/pki/c.crt",
                key: "/pki/c.key",
                ca: None
            }
        );
    }

    #[test]
    fn no_tls_options_for_plain_endpoints_or_no_files() {
        // A CA with only http endpoints: nothing to verify (etcd's client refuses TLS
        // options for http URLs).
        let o = opts("http://198.18.0.1:2379", "", "", "/pki/ca.crt");
        assert_eq!(tls_plan(&o), TlsPlan::None);
        let o = opts("https://198.18.0.1:2379", "", "", "");
        assert_eq!(tls_plan(&o), TlsPlan::None);
        let o = opts("http://198.18.0.1:2379", "", "", "");
        assert_eq!(tls_plan(&o), TlsPlan::None);
    }
}
