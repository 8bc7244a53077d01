//! twilld's start-up, in Flannel's start-up order: config, external
//! interface, backend device, lease, device address, masquerade rules, subnet.env, then the
//! event loop. etcd mode ([`run`]) allocates a subnet; Kubernetes mode ([`run_kube`]) reads
//! the node's podCIDR.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use ipnet::IpNet;
use rand::Rng;
use twill_backends::netlink::Netlink;
use twill_formats::subnet_env::SubnetEnv;
use twill_formats::Mac;
use twill_runtime::backoff::retry_delays;

use crate::alloc::{plan_acquire, AcquireDecision, AcquireInput, RACE_RETRIES};
use crate::flags::Flags;
use crate::health::{self, Readiness};
use crate::iface::{self, Selection};
use crate::masq::MasqInput;
use crate::registry::etcd::{
    EtcdOptions, EtcdRegistry, LeaseRecord, Listing, RegistryError, SUBNET_TTL,
};
use crate::traffic::{self, TrafficManager};
use twill_formats::lease::{Lease, LeaseAttrs, SubnetKey, VxlanBackendData};
use twill_formats::net_conf::NetConfig;

use super::core::{Core, OwnLease, Retry};
use super::dataplane::{spawn_netlink_monitor, Dataplane, PublicAddrs};
use super::event_loop::event_loop;
use super::peers::record_to_lease;
use super::sources::{EtcdSource, KubeSource, LeaseSource};
use super::Observability;
use crate::metrics::Metrics;
use crate::status::{OwnLeaseView, StatusBoard, StatusServer};
use twill_runtime::events::{NodeEvent as KubeEvent, NodeEvents, Severity};

/// Start-up retries (connecting to etcd, acquiring a lease) after errors: 1 s doubling to 5 s,
/// plus jitter.
const STARTUP_RETRY: Retry = Retry {
    min: Duration::from_secs(1),
    max: Duration::from_secs(5),
};
/// Renewal retries after errors: 1 s doubling to 15 s, each plus a jitter of up to itself, so
/// a renewal is retried at most 30 s after it failed.
const RENEW_RETRY: Retry = Retry {
    min: Duration::from_secs(1),
    max: Duration::from_secs(15),
};
/// Re-acquire retries after errors (a lost lease is urgent: another node may take the subnet):
/// 1 s doubling to 5 s, plus jitter, so at most 10 s apart.
const REACQUIRE_RETRY: Retry = Retry {
    min: Duration::from_secs(1),
    max: Duration::from_secs(5),
};

/// twilld: start up, then serve events until a signal or a conflict.
pub async fn run(flags: Flags) -> anyhow::Result<()> {
    flags.check().map_err(|e| anyhow!(e))?;
    if flags.kube_subnet_mgr {
        return run_kube(flags).await;
    }
    let previous = match SubnetEnv::read(&flags.subnet_file) {
        Ok(env) => Some(env),
        Err(e) => {
            tracing::info!(file = %flags.subnet_file.display(), reason = %e, "no previous subnet.env to reuse");
            None
        }
    };

    let obs = observability(NodeEvents::disabled());
    let readiness = start_health(&flags, &obs);
    let registry = connect_etcd(&flags).await;
    let config = fetch_config(&registry).await;
    tracing::info!(backend = config.backend_type(), network = ?config.network, ipv6_network = ?config.ipv6_network, "network config");
    traffic::check_br_netfilter(&config)?;

    let (mut dataplane, public) = build_dataplane(&flags, &config, &obs).await?;

    // The VTEP MAC: the existing device's (restarts keep it), else the one our previous lease
    // advertised (peers' entries stay valid), else a new random one.
    let listing = list_with_retry(&registry).await;
    let previous_macs = previous_vtep_macs(&listing, public.v4);
    dataplane.prepare_devices(previous_macs).await?;

    let own = acquire(&registry, &config, &public, &dataplane, previous.as_ref()).await?;
    tracing::info!(subnet = %own.key.ipv4, "acquired lease");
    // etcd mode knows no node name: NODE_NAME when set (as in Flannel's DaemonSet), else the
    // host name.
    let node = std::env::var("NODE_NAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|n| n.trim().to_string())
        .unwrap_or_else(|| public.v4.to_string());
    let expires_at = own.ttl.map(|t| std::time::Instant::now() + t);
    show_lease(
        &obs, &node, &config, &own.key, &public, &dataplane, expires_at,
    );
    let traffic = bring_up(&flags, &config, &own.key, &mut dataplane, &readiness).await?;
    start_status(&flags, &obs, &readiness, &dataplane);

    let core = Core::etcd(
        config,
        own,
        Duration::from_secs(flags.subnet_lease_renew_margin as u64 * 60),
        RENEW_RETRY,
        REACQUIRE_RETRY,
        std::time::Instant::now(),
    );
    let source = EtcdSource {
        registry,
        metrics: obs.metrics.clone(),
    };
    run_loop(&flags, core, source, dataplane, traffic, obs).await
}

/// The metrics and the status board, with `events` (disabled in etcd mode).
fn observability(events: NodeEvents) -> Observability {
    Observability {
        metrics: Arc::new(Metrics::daemon()),
        status: Arc::new(StatusBoard::default()),
        events,
    }
}

/// Puts the lease just acquired on the status board and in the metrics.
fn show_lease(
    obs: &Observability,
    node: &str,
    config: &NetConfig,
    key: &SubnetKey,
    public: &PublicAddrs,
    dataplane: &Dataplane,
    expires_at: Option<std::time::Instant>,
) {
    obs.status.set_node(node, config.backend_type());
    obs.status.set_lease(OwnLeaseView {
        key: *key,
        public_ip: std::net::IpAddr::V4(public.v4),
        public_ipv6: public.v6.map(std::net::IpAddr::V6),
        vtep_mac: dataplane.vtep_mac(),
        expires_at,
    });
    obs.lease_expires(expires_at);
}

/// Serves `GET /status` on `--status-socket` (unless empty) on a task of its own; a socket
/// that cannot be bound is logged, and the daemon runs on without it.
fn start_status(flags: &Flags, obs: &Observability, readiness: &Readiness, dataplane: &Dataplane) {
    if flags.status_socket.is_empty() {
        return;
    }
    let server = StatusServer {
        board: obs.status.clone(),
        readiness: readiness.clone(),
        nl: dataplane.netlink(),
        nft: crate::nft::runner(),
    };
    let path = std::path::PathBuf::from(&flags.status_socket);
    tokio::spawn(async move {
        if let Err(e) = server.serve(&path).await {
            tracing::error!(socket = %path.display(), error = %e, "status socket not served");
        }
    });
}

/// Kubernetes mode (`--kube-subnet-mgr`): the lease is the node's podCIDR, its attributes
/// are node annotations, peers come from a node watch. No etcd, no renewal.
async fn run_kube(flags: Flags) -> anyhow::Result<()> {
    use crate::registry::kube::{self, Annotations, KubeSubnetManager};
    let annotations = Annotations::new(&flags.kube_annotation_prefix).map_err(|e| anyhow!(e))?;
    let client = kube::client(&flags.kube_api_url, &flags.kubeconfig_file)
        .await
        .context("Failed to create SubnetManager")?;
    let node_name = kube::node_name(&client)
        .await
        .context("Failed to create SubnetManager")?;
    let text = std::fs::read_to_string(&flags.net_config_path).map_err(|e| {
        anyhow!(
            "Failed to create SubnetManager: failed to read net conf: open {}: {}",
            flags.net_config_path.display(),
            go_io_error(&e)
        )
    })?;
    let config = NetConfig::parse(&text)
        .map_err(|e| anyhow!("Failed to create SubnetManager: error parsing subnet config: {e}"))?;
    let ksm = KubeSubnetManager {
        client,
        node_name,
        annotations,
    };
    tracing::info!(node = %ksm.node_name, backend = config.backend_type(), network = ?config.network, "Kubernetes subnet manager");
    let obs = observability(NodeEvents::start(
        ksm.client.clone(),
        "twilld",
        &ksm.node_name,
    ));
    let readiness = start_health(&flags, &obs);
    traffic::check_br_netfilter(&config)?;

    let node = ksm.own_node().await?;
    // node-public-ip(v6) annotations replace --public-ip(v6) (and so select the interface).
    let mut flags = flags;
    let node_ann = node.metadata.annotations.clone().unwrap_or_default();
    if let Some(ip) = node_ann.get(&ksm.annotations.node_public_ip) {
        flags.public_ip =
            Some(ip.parse().with_context(|| {
                format!("annotation {}: {ip:?}", ksm.annotations.node_public_ip)
            })?);
    }
    if let Some(ip) = node_ann.get(&ksm.annotations.node_public_ipv6) {
        flags.public_ipv6 =
            Some(ip.parse().with_context(|| {
                format!("annotation {}: {ip:?}", ksm.annotations.node_public_ipv6)
            })?);
    }
    let (mut dataplane, public) = build_dataplane(&flags, &config, &obs).await?;
    // MAC persistence: the VtepMAC this node's annotation advertises is reused, as Flannel does.
    let (m4, m6) = kube::previous_vtep_macs(&node, &ksm.annotations);
    dataplane.prepare_devices((m4, m6)).await?;
    let mut attrs = dataplane.lease_attrs(&public);
    attrs.public_ipv6 = public.v6;
    let key = ksm.acquire(&config, &attrs).await?;
    tracing::info!(node = %ksm.node_name, subnet = %key.ipv4, "acquired lease (podCIDR)");
    obs.events.publish(KubeEvent {
        severity: Severity::Normal,
        reason: "LeaseAcquired",
        action: "AcquireLease",
        note: format!(
            "subnet {}, public IP {}, backend {}",
            key.ipv4,
            public.v4,
            config.backend_type()
        ),
        related_node: None,
    });
    show_lease(
        &obs,
        &ksm.node_name,
        &config,
        &key,
        &public,
        &dataplane,
        None,
    );
    let traffic = bring_up(&flags, &config, &key, &mut dataplane, &readiness).await?;
    start_status(&flags, &obs, &readiness, &dataplane);
    if flags.set_node_network_unavailable {
        if let Err(e) = ksm.set_network_available().await {
            tracing::warn!(error = %e, "setting NetworkUnavailable=False failed");
        }
    }
    let own = OwnLease {
        key,
        attrs,
        ttl: None,
    };
    let core = Core::kube(config.clone(), ksm.node_name.clone(), own, REACQUIRE_RETRY);
    let source = KubeSource {
        ksm,
        config,
        metrics: obs.metrics.clone(),
        events: obs.events.clone(),
        lost: Default::default(),
    };
    run_loop(&flags, core, source, dataplane, traffic, obs).await
}

/// The event loop with the real effects: the netlink monitor, the signals, and the
/// masquerade/forward rules checked on a task of their own (an iptables process waiting on
/// the xtables lock must not hold up peer programming).
async fn run_loop<S: LeaseSource>(
    flags: &Flags,
    core: Core,
    source: S,
    dataplane: Dataplane,
    traffic: TrafficManager,
    obs: Observability,
) -> anyhow::Result<()> {
    let netlink = spawn_netlink_monitor(dataplane.watched.clone())?;
    let _traffic_resync = DropAbort(traffic.spawn_resync(
        Duration::from_secs(flags.iptables_resync),
        obs.metrics.clone(),
    ));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
    };
    let resync_period = Duration::from_secs(flags.resync_period.max(1));
    event_loop(
        core,
        source,
        dataplane,
        netlink,
        resync_period,
        shutdown,
        obs,
    )
    .await
}

/// Aborts a background task when the owner goes (the event loop returning stops the resync).
struct DropAbort(tokio::task::JoinHandle<()>);

impl Drop for DropAbort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn start_health(flags: &Flags, obs: &Observability) -> Readiness {
    let readiness = Readiness::default();
    if flags.healthz_port > 0 {
        let addr = std::net::SocketAddr::new(flags.healthz_ip, flags.healthz_port);
        let r = readiness.clone();
        let metrics = obs.metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = health::serve(addr, r, metrics).await {
                tracing::error!(%addr, error = %e, "healthz server stopped");
            }
        });
    }
    readiness
}

/// External interface and public addresses, then the (not yet created) dataplane.
async fn build_dataplane(
    flags: &Flags,
    config: &NetConfig,
    obs: &Observability,
) -> anyhow::Result<(Dataplane, PublicAddrs)> {
    let nl = Netlink::connect().context("opening a netlink socket")?;
    let snapshot = iface::snapshot(&nl).await?;
    let ext = iface::select(
        &snapshot,
        &Selection {
            iface: &flags.iface,
            iface_regex: &flags.iface_regex,
            iface_can_reach: flags.iface_can_reach,
            public_ip: flags.public_ip,
        },
    )
    .map_err(|e| anyhow!(e))?;
    let public = PublicAddrs {
        v4: ext.public_ip,
        v6: if config.enable_ipv6 {
            Some(flags.public_ipv6.or_else(|| ext.global_ipv6()).ok_or_else(|| {
                anyhow!("EnableIPv6 is set but interface {} has no global IPv6 address (use --public-ipv6)", ext.name)
            })?)
        } else {
            None
        },
    };
    tracing::info!(iface = %ext.name, iface_addr = %ext.iface_addr, public_ip = %public.v4, public_ipv6 = ?public.v6, "using interface");
    let dataplane = Dataplane::new(nl, config, ext, &public, flags, obs.clone())?;
    Ok((dataplane, public))
}

/// After the lease: device address, the other traffic manager's rules removed and this one's
/// masquerade/forward rules installed, subnet.env, ready.
async fn bring_up(
    flags: &Flags,
    config: &NetConfig,
    key: &SubnetKey,
    dataplane: &mut Dataplane,
    readiness: &Readiness,
) -> anyhow::Result<TrafficManager> {
    dataplane.set_own(key);
    dataplane.address_devices().await?;

    let traffic =
        TrafficManager::start(traffic::Mode::of(config), masq_inputs(config, key, flags)).await?;

    let env = SubnetEnv::for_lease(
        config.enable_ipv4.then_some(config.network).flatten(),
        Some(key.ipv4),
        config.enable_ipv6.then_some(config.ipv6_network).flatten(),
        key.ipv6,
        dataplane.mtu,
        flags.ip_masq,
    );
    env.write_atomic(&flags.subnet_file)
        .with_context(|| format!("writing {}", flags.subnet_file.display()))?;
    readiness.set_ready();
    health::notify_systemd_ready();
    tracing::info!(file = %flags.subnet_file.display(), "wrote subnet.env; ready");
    Ok(traffic)
}

async fn connect_etcd(flags: &Flags) -> EtcdRegistry {
    let opts = EtcdOptions {
        endpoints: flags.etcd_endpoint_list(),
        prefix: flags.etcd_prefix.clone(),
        keyfile: flags.etcd_keyfile.clone(),
        certfile: flags.etcd_certfile.clone(),
        cafile: flags.etcd_cafile.clone(),
        username: flags.etcd_username.clone(),
        password: flags.etcd_password.clone(),
    };
    let mut delays = retry_delays(STARTUP_RETRY.min, STARTUP_RETRY.max);
    loop {
        match EtcdRegistry::connect(&opts).await {
            Ok(r) => return r,
            Err(e) => {
                let retry = delays.next().unwrap_or(STARTUP_RETRY.max);
                tracing::error!(endpoints = %flags.etcd_endpoints, error = %e, retry_in = ?retry, "failed to connect to etcd; retrying");
                tokio::time::sleep(retry).await;
            }
        }
    }
}

/// Flannel retries every second until a valid config appears, logging why it cannot use it.
async fn fetch_config(registry: &EtcdRegistry) -> NetConfig {
    loop {
        match registry.network_config().await {
            Ok(Some(text)) => match NetConfig::parse_and_check(&text) {
                Ok(cfg) => return cfg,
                Err(e) => tracing::error!("Couldn't fetch network config: {e}"),
            },
            Ok(None) => tracing::error!(
                "Couldn't fetch network config: flannel config not found in etcd store. Did you create your config using etcdv3 API?"
            ),
            Err(e) => tracing::error!("Couldn't fetch network config: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The subnet listing, retried (200 ms doubling to 5 s, with jitter) until etcd answers.
pub(super) async fn list_with_retry(registry: &EtcdRegistry) -> Listing {
    let mut delays = retry_delays(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match registry.list().await {
            Ok(l) => return l,
            Err(e) => {
                let retry = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in = ?retry, "listing subnets failed; retrying");
                tokio::time::sleep(retry).await;
            }
        }
    }
}

/// The VtepMACs (v4, v6) of a lease this node held before, found by its public IP.
fn previous_vtep_macs(
    listing: &Listing,
    public_v4: std::net::Ipv4Addr,
) -> (Option<Mac>, Option<Mac>) {
    let own = listing
        .records
        .iter()
        .find_map(|r| r.attrs.as_ref().ok().filter(|a| a.public_ip == public_v4));
    let mac = |data: Option<&serde_json::Value>| {
        data.and_then(|d| VxlanBackendData::from_json(d).ok())
            .map(|d| d.vtep_mac)
    };
    match own {
        Some(a) => (
            mac(a.backend_data.as_ref()),
            mac(a.backend_v6_data.as_ref()),
        ),
        None => (None, None),
    }
}

/// Every subnet key as a lease for the allocation decision. A key whose value cannot be read
/// still occupies its subnet (creating it again would fail), so it counts as taken, with
/// empty attributes that never match this node's public IP. Dropping it instead made a node
/// whose previous subnet held garbage try to re-create that key forever.
fn leases_for_allocation(records: &[LeaseRecord]) -> Vec<Lease> {
    records
        .iter()
        .map(|r| match &r.attrs {
            Ok(a) => record_to_lease(&r.key, a, r.lease_id),
            Err(e) => {
                tracing::warn!(subnet = %r.key.ipv4, error = %e, "unreadable lease; its subnet counts as taken");
                record_to_lease(&r.key, &LeaseAttrs::default(), r.lease_id)
            }
        })
        .collect()
}

/// Flannel's tryAcquireLease, retrying lost races instead of exiting.
async fn acquire(
    registry: &EtcdRegistry,
    config: &NetConfig,
    public: &PublicAddrs,
    dataplane: &Dataplane,
    previous: Option<&SubnetEnv>,
) -> anyhow::Result<OwnLease> {
    let mut rng = rand::rng();
    let mut attempt = 0usize;
    let mut delays = retry_delays(STARTUP_RETRY.min, STARTUP_RETRY.max);
    loop {
        attempt += 1;
        let listing = list_with_retry(registry).await;
        let leases = leases_for_allocation(&listing.records);
        let input = AcquireInput {
            config,
            existing: &leases,
            public_ip: public.v4,
            previous_subnet: previous.and_then(|p| p.subnet_network()),
            previous_ipv6_subnet: previous.and_then(|p| p.ipv6_subnet_network()),
        };
        let plan = plan_acquire(&input, &mut rng).map_err(|e| anyhow!("{e}"))?;
        let mut attrs = dataplane.lease_attrs(public);
        for stale in &plan.delete_first {
            tracing::info!(subnet = %stale.ipv4, "deleting this node's incompatible previous lease");
            if let Err(e) = registry.delete(stale).await {
                tracing::warn!(subnet = %stale.ipv4, error = %e, "deleting old lease failed");
            }
        }
        let result = match &plan.decision {
            AcquireDecision::ReuseOwn {
                key,
                is_reservation,
            } => {
                attrs.public_ipv6 = public.v6;
                let ttl = if *is_reservation {
                    None
                } else {
                    Some(SUBNET_TTL)
                };
                registry
                    .put(key, &attrs, ttl)
                    .await
                    .map(|granted| (*key, ttl.and(granted)))
            }
            AcquireDecision::ReusePrevious(key) | AcquireDecision::Allocate(key) => registry
                .create(key, &attrs, Some(SUBNET_TTL))
                .await
                .map(|granted| (*key, granted)),
        };
        let created = matches!(
            plan.decision,
            AcquireDecision::ReusePrevious(_) | AcquireDecision::Allocate(_)
        );
        match result {
            Ok((key, ttl)) if created => match registry.earlier_overlapping(&key).await {
                Ok(None) => return Ok(OwnLease { key, attrs, ttl }),
                Ok(Some(earlier)) => {
                    tracing::warn!(subnet = %key.ipv4, held_by = %earlier, attempt, "another node created a lease sharing this subnet first; giving it up and trying again");
                    if let Err(e) = registry.delete(&key).await {
                        tracing::warn!(subnet = %key.ipv4, error = %e, "deleting the lease given up failed");
                    }
                }
                Err(e) => {
                    // The lease is ours but could not be checked: give it up rather than
                    // risk sharing a subnet, and start again.
                    tracing::warn!(subnet = %key.ipv4, error = %e, "checking the new lease failed; giving it up and trying again");
                    let _ = registry.delete(&key).await;
                    tokio::time::sleep(delays.next().unwrap_or(STARTUP_RETRY.max)).await;
                }
            },
            Ok((key, ttl)) => return Ok(OwnLease { key, attrs, ttl }),
            Err(RegistryError::AlreadyExists) => {
                tracing::warn!(attempt, "lost a race for a subnet; trying again");
                if attempt.is_multiple_of(RACE_RETRIES) {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(100..1000))).await;
                }
            }
            Err(e) => {
                let retry = delays.next().unwrap_or(STARTUP_RETRY.max);
                tracing::warn!(error = %e, retry_in = ?retry, "acquiring a lease failed; retrying");
                tokio::time::sleep(retry).await;
            }
        }
    }
}

/// One input per enabled family that wants masquerade or forward rules; `fully_random` is
/// what the flags ask for (the traffic manager probes whether the mode supports it).
fn masq_inputs(config: &NetConfig, key: &SubnetKey, flags: &Flags) -> Vec<MasqInput> {
    let fully_random = flags.ip_masq && !flags.ip_masq_fully_random_disable;
    let mut out = Vec::new();
    if !flags.ip_masq && !flags.iptables_forward_rules {
        return out;
    }
    if let (true, Some(network)) = (config.enable_ipv4, config.network) {
        out.push(MasqInput {
            network: IpNet::V4(network),
            subnet: IpNet::V4(key.ipv4),
            masquerade: flags.ip_masq,
            fully_random,
            forward: flags.iptables_forward_rules,
        });
    }
    if let (true, Some(network), Some(subnet)) = (config.enable_ipv6, config.ipv6_network, key.ipv6)
    {
        out.push(MasqInput {
            network: IpNet::V6(network),
            subnet: IpNet::V6(subnet),
            masquerade: flags.ip_masq,
            fully_random,
            forward: flags.iptables_forward_rules,
        });
    }
    out
}
/// Go's text for an I/O error (`no such file or directory`), as in Flannel's messages.
fn go_io_error(e: &std::io::Error) -> String {
    let text = match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None => e.to_string(),
    };
    let mut c = text.chars();
    c.next()
        .map(|f| f.to_lowercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}
