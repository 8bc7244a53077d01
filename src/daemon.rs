//! twilld's start-up and event loop, in Flannel's start-up order (§ start-up order): config,
//! external interface, backend device, lease, device address, masquerade rules, subnet.env,
//! then the watch. Leases come from a [`LeaseSource`]: etcd ([`EtcdSource`]) or the
//! Kubernetes API ([`KubeSource`], `--kube-subnet-mgr`). From then on one task owns the dataplane: every lease event, netlink event
//! and resync tick marks it dirty, and a dirty dataplane is reconciled (observe, decide, diff,
//! apply). Nothing is torn down on exit, so restarts are hitless.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use ipnet::IpNet;
use rand::Rng;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use twill_backends::netlink::{LinkMap, Netlink};
use twill_backends::vxlan::{self, VxlanSpec, ENCAP_OVERHEAD};
use twill_backends::{
    desired_state, diff, BackendKind, MacAddr, Op, PeerFamily, PeerLease, Topology,
};
use twill_cni::subnet_env::SubnetEnv;

use crate::alloc::{plan_acquire, AcquireDecision, AcquireInput};
use crate::config::{BackendConfig, NetConfig};
use crate::flags::Flags;
use crate::health::{self, Readiness};
use crate::iface::{self, ExternalInterface, Selection};
use crate::masq::MasqInput;
use crate::registry::etcd::{
    EtcdOptions, EtcdRegistry, LeaseRecord, Listing, RegistryError, RegistryEvent, SUBNET_TTL,
};
use crate::registry::lease::{validate_peer, Lease, LeaseAttrs, Mac, SubnetKey, VxlanBackendData};
use crate::traffic::{self, TrafficManager};

use crate::alloc::RACE_RETRIES;

/// A lease-event burst is taken as over once the watch has been quiet this long...
const LEASE_BURST_QUIET: Duration = Duration::from_millis(10);
/// ...or after this long at most, so a steady trickle of events still gets programmed.
const LEASE_BURST_MAX: Duration = Duration::from_millis(100);

/// The node's own lease, as held in etcd.
#[derive(Clone, Debug)]
struct OwnLease {
    key: SubnetKey,
    attrs: LeaseAttrs,
    /// None for a reservation (no etcd lease, never expires).
    ttl: Option<Duration>,
    renew_at: Option<Instant>,
}

/// Per-family view of the node's addresses.
#[derive(Clone, Debug)]
struct PublicAddrs {
    v4: std::net::Ipv4Addr,
    v6: Option<Ipv6Addr>,
}

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

    let readiness = start_health(&flags);
    let registry = connect_etcd(&flags).await;
    let config = fetch_config(&registry).await;
    tracing::info!(backend = config.backend_type(), network = ?config.network, ipv6_network = ?config.ipv6_network, "network config");
    traffic::check_br_netfilter(&config)?;

    let (mut dataplane, public) = build_dataplane(&flags, &config).await?;

    // The VTEP MAC: the existing device's (restarts keep it), else the one our previous lease
    // advertised (peers' entries stay valid), else a new random one.
    let listing = list_with_retry(&registry).await;
    let previous_macs = previous_vtep_macs(&listing, public.v4);
    dataplane.prepare_devices(previous_macs).await?;

    let own = acquire(&registry, &config, &public, &dataplane, previous.as_ref()).await?;
    tracing::info!(subnet = %own.key, "acquired lease");
    let traffic = bring_up(&flags, &config, &own.key, &mut dataplane, &readiness).await?;

    let source = EtcdSource {
        registry,
        own,
        margin: Duration::from_secs(flags.subnet_lease_renew_margin as u64 * 60),
        renew_failures: 0,
    };
    event_loop(flags, config, source, dataplane, traffic).await
}

/// Kubernetes mode (`--kube-subnet-mgr`, §3): the lease is the node's podCIDR, its attributes
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
    let readiness = start_health(&flags);
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
    let (mut dataplane, public) = build_dataplane(&flags, &config).await?;
    // MAC persistence: the VtepMAC this node's annotation advertises is reused (§4).
    let (m4, m6) = kube::previous_vtep_macs(&node, &ksm.annotations);
    dataplane
        .prepare_devices((m4.map(|m| MacAddr(m.0)), m6.map(|m| MacAddr(m.0))))
        .await?;
    let mut attrs = dataplane.lease_attrs(&public);
    attrs.public_ipv6 = public.v6;
    let key = ksm.acquire(&config, &attrs).await?;
    tracing::info!(subnet = %key, "acquired lease (podCIDR)");
    let traffic = bring_up(&flags, &config, &key, &mut dataplane, &readiness).await?;
    if flags.set_node_network_unavailable {
        if let Err(e) = ksm.set_network_available().await {
            tracing::warn!(error = %e, "setting NetworkUnavailable=False failed");
        }
    }
    let source = KubeSource { ksm };
    event_loop(flags, config, source, dataplane, traffic).await
}

fn start_health(flags: &Flags) -> Readiness {
    let readiness = Readiness::default();
    if flags.healthz_port > 0 {
        let addr = std::net::SocketAddr::new(flags.healthz_ip, flags.healthz_port);
        let r = readiness.clone();
        tokio::spawn(async move {
            if let Err(e) = health::serve(addr, r).await {
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
    let dataplane = Dataplane::new(nl, config, ext, &public, flags)?;
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
    loop {
        match EtcdRegistry::connect(&opts).await {
            Ok(r) => return r,
            Err(e) => {
                tracing::error!(endpoints = %flags.etcd_endpoints, error = %e, "failed to connect to etcd; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
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

async fn list_with_retry(registry: &EtcdRegistry) -> Listing {
    let mut backoff = Duration::from_millis(200);
    loop {
        match registry.list().await {
            Ok(l) => return l,
            Err(e) => {
                tracing::warn!(error = %e, "listing subnets failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The VtepMACs (v4, v6) of a lease this node held before, found by its public IP.
fn previous_vtep_macs(
    listing: &Listing,
    public_v4: std::net::Ipv4Addr,
) -> (Option<MacAddr>, Option<MacAddr>) {
    let own = listing
        .records
        .iter()
        .find_map(|r| r.attrs.as_ref().ok().filter(|a| a.public_ip == public_v4));
    let mac = |data: Option<&serde_json::Value>| {
        data.and_then(|d| VxlanBackendData::from_json(d).ok())
            .map(|d| MacAddr(d.vtep_mac.0))
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
                tracing::warn!(subnet = %r.key, error = %e, "unreadable lease; its subnet counts as taken");
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
            tracing::info!(subnet = %stale, "deleting this node's incompatible previous lease");
            if let Err(e) = registry.delete(stale).await {
                tracing::warn!(subnet = %stale, error = %e, "deleting old lease failed");
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
        match result {
            Ok((key, ttl)) => {
                return Ok(OwnLease {
                    renew_at: ttl.map(|t| renew_deadline(t, None)),
                    key,
                    attrs,
                    ttl,
                });
            }
            Err(RegistryError::AlreadyExists) => {
                tracing::warn!(attempt, "lost a race for a subnet; trying again");
                if attempt.is_multiple_of(RACE_RETRIES) {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(100..1000))).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "acquiring a lease failed; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// When to renew a lease granted `ttl` ago: `ttl − margin` (Flannel's renew margin).
fn renew_deadline(ttl: Duration, margin: Option<Duration>) -> Instant {
    let margin = margin.unwrap_or(Duration::from_secs(3600));
    Instant::now() + ttl.saturating_sub(margin).max(Duration::from_secs(1))
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

/// An underlay guard transaction in flight: the input it applied, or why it failed.
type GuardJob = tokio::task::JoinHandle<Result<crate::underlay::GuardInput, crate::nft::NftError>>;

/// The node's dataplane: the devices it owns and the entries toward its peers.
struct Dataplane {
    nl: Netlink,
    kind: BackendKind,
    ext: ExternalInterface,
    vni: u32,
    vxlan4: Option<VxlanSpec>,
    vxlan6: Option<VxlanSpec>,
    links: LinkMap,
    topo: Topology,
    mtu: u32,
    blackhole: bool,
    own_subnets: Vec<IpNet>,
    /// Shared with the netlink monitor so it can tell our devices' events from others'.
    watched: Arc<[AtomicU32; 2]>,
    last_skipped: BTreeSet<(String, String)>,
    /// The underlay guard's template (peers filled in per pass) and the input last applied
    /// successfully; `None` when the table's state is unknown (never applied, a failure,
    /// drift), so the next pass replaces the whole table.
    guard: crate::underlay::GuardInput,
    guard_applied: Option<crate::underlay::GuardInput>,
    nft: crate::nft::SharedNft,
}

impl Dataplane {
    fn new(
        nl: Netlink,
        config: &NetConfig,
        ext: ExternalInterface,
        public: &PublicAddrs,
        flags: &Flags,
    ) -> anyhow::Result<Dataplane> {
        let mut networks = Vec::new();
        if config.enable_ipv4 {
            networks.extend(config.network.map(IpNet::V4));
        }
        if config.enable_ipv6 {
            networks.extend(config.ipv6_network.map(IpNet::V6));
        }
        let (kind, vni, mtu, vxlan4, vxlan6) = match &config.backend {
            BackendConfig::Vxlan(vx) => {
                let mtu = vx.mtu.unwrap_or(ext.mtu).saturating_sub(ENCAP_OVERHEAD);
                let spec = |ipv6: bool, local: IpAddr| VxlanSpec {
                    name: vxlan::device_name(vx.vni, ipv6),
                    vni: vx.vni,
                    local,
                    external_index: ext.index,
                    port: vx.port,
                    gbp: vx.gbp,
                    learning: vx.learning,
                    mtu,
                    mac: MacAddr::default(),
                };
                let v4 = config
                    .enable_ipv4
                    .then(|| spec(false, IpAddr::V4(public.v4)));
                let v6 = public.v6.filter(|_| config.enable_ipv6).map(|a| {
                    // An IPv6 underlay carries 20 more bytes of outer header, and the
                    // kernel refuses a VXLAN MTU above the lower device's minus 70.
                    // FLANNEL_MTU stays Flannel's (−50); IPv6 pods learn the smaller path
                    // MTU from the node.
                    let mut s = spec(true, IpAddr::V6(a));
                    s.mtu = s
                        .mtu
                        .min(ext.mtu.saturating_sub(vxlan::ENCAP_OVERHEAD_IPV6));
                    s
                });
                (
                    BackendKind::Vxlan {
                        direct_routing: vx.direct_routing,
                    },
                    vx.vni,
                    mtu,
                    v4,
                    v6,
                )
            }
            BackendConfig::HostGw => {
                twill_backends::hostgw::check_public_ip(IpAddr::V4(public.v4), &ext.addrs)
                    .map_err(|e| anyhow!(e))?;
                (BackendKind::HostGw, 0, ext.mtu, None, None)
            }
        };
        let guard = crate::underlay::GuardInput {
            vxlan_port: vxlan4.as_ref().or(vxlan6.as_ref()).map(|v| {
                if v.port == 0 {
                    8472
                } else {
                    v.port
                }
            }),
            external: ext.name.clone(),
            networks: networks.clone(),
            ..Default::default()
        };
        let topo = Topology {
            backend: kind,
            networks,
            own_subnets: Vec::new(),
            external_prefixes: ext.prefixes.clone(),
            vxlan4: vxlan4.is_some(),
            vxlan6: vxlan6.is_some(),
        };
        Ok(Dataplane {
            nl,
            kind,
            links: LinkMap {
                vxlan4: None,
                vxlan6: None,
                external: ext.index,
            },
            ext,
            vni,
            vxlan4,
            vxlan6,
            topo,
            mtu,
            blackhole: flags.ip_blackhole_route,
            own_subnets: Vec::new(),
            watched: Arc::new([AtomicU32::new(0), AtomicU32::new(0)]),
            last_skipped: BTreeSet::new(),
            guard,
            guard_applied: None,
            nft: crate::nft::runner(),
        })
    }

    /// Creates (or keeps) the VXLAN devices before the lease is taken, as Flannel does, so
    /// the lease can advertise their MACs.
    async fn prepare_devices(
        &mut self,
        previous: (Option<MacAddr>, Option<MacAddr>),
    ) -> anyhow::Result<()> {
        let mut rng = rand::rng();
        for (spec, prev) in [
            (self.vxlan4.as_mut(), previous.0),
            (self.vxlan6.as_mut(), previous.1),
        ] {
            let Some(spec) = spec else { continue };
            let existing = self.nl.link_by_name(&spec.name).await?;
            spec.mac = match existing
                .as_ref()
                .filter(|l| vxlan::incompatibility(spec, l).is_none())
                .and_then(|l| l.mac)
            {
                Some(mac) => mac,
                None => prev.unwrap_or_else(|| {
                    let mut b: [u8; 6] = rng.random();
                    b[0] = (b[0] & 0xfe) | 0x02;
                    MacAddr(b)
                }),
            };
        }
        self.ensure_devices(false).await
    }

    fn set_own(&mut self, key: &SubnetKey) {
        self.own_subnets = std::iter::once(IpNet::V4(key.ipv4))
            .chain(key.ipv6.map(IpNet::V6))
            .collect();
        self.topo.own_subnets = self.own_subnets.clone();
        self.guard.own_subnets = self.own_subnets.clone();
    }

    /// Makes sure each VXLAN device exists (recreating a deleted or altered one with the same
    /// MAC) and, once the lease is known, carries its address.
    async fn ensure_devices(&mut self, with_address: bool) -> anyhow::Result<()> {
        let networks = self.topo.networks.clone();
        for (i, spec) in [self.vxlan4.clone(), self.vxlan6.clone()]
            .into_iter()
            .enumerate()
        {
            let Some(spec) = spec else { continue };
            let address = if with_address {
                self.own_subnets
                    .iter()
                    .find(|s| s.addr().is_ipv4() == (i == 0))
                    .map(|s| {
                        IpNet::new(s.network(), if i == 0 { 32 } else { 128 })
                            .expect("host prefix is valid")
                    })
            } else {
                None
            };
            let dev = vxlan::ensure_device(&self.nl, &spec, address, &networks).await?;
            if !dev.reused && with_address {
                tracing::warn!(device = %spec.name, "VXLAN device was missing or altered; recreated it");
            }
            if dev.mac != spec.mac {
                tracing::warn!(device = %spec.name, kept = %dev.mac, "device MAC differs from the advertised one");
            }
            if i == 0 {
                self.links.vxlan4 = Some(dev.index);
            } else {
                self.links.vxlan6 = Some(dev.index);
            }
            self.watched[i].store(dev.index, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn address_devices(&mut self) -> anyhow::Result<()> {
        self.ensure_devices(true).await
    }

    /// The attributes this node advertises.
    fn lease_attrs(&self, public: &PublicAddrs) -> LeaseAttrs {
        let data = |spec: &Option<VxlanSpec>| {
            spec.as_ref().map(|s| {
                VxlanBackendData {
                    vni: self.vni,
                    vtep_mac: Mac(s.mac.0),
                }
                .to_value()
            })
        };
        LeaseAttrs {
            public_ip: public.v4,
            public_ipv6: public.v6,
            backend_type: self.kind.lease_type().to_string(),
            backend_data: data(&self.vxlan4),
            backend_v6_data: data(&self.vxlan6),
        }
    }

    /// Cheap check used on every pass: are our devices still there, unchanged?
    async fn devices_intact(&self) -> anyhow::Result<bool> {
        for (spec, index) in [
            (&self.vxlan4, self.links.vxlan4),
            (&self.vxlan6, self.links.vxlan6),
        ] {
            let Some(spec) = spec else { continue };
            match self.nl.link_by_name(&spec.name).await? {
                Some(link)
                    if Some(link.index) == index
                        && link.up
                        && vxlan::incompatibility(spec, &link).is_none() => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Observe, decide, diff, apply.
    async fn reconcile(&mut self, peers: &[PeerLease]) -> anyhow::Result<usize> {
        let started = Instant::now();
        if !self.devices_intact().await? {
            self.ensure_devices(true).await?;
        }
        let (desired, skipped) = desired_state(&self.topo, peers);
        let skipped_now: BTreeSet<(String, String)> =
            skipped.into_iter().map(|s| (s.peer, s.reason)).collect();
        for (peer, reason) in skipped_now.difference(&self.last_skipped) {
            tracing::warn!(lease = %peer, %reason, "not programming peer");
        }
        self.last_skipped = skipped_now;
        // The underlay guard's input: a new peer is allowed before its FDB entry exists.
        let skipped_peers: BTreeSet<&str> =
            self.last_skipped.iter().map(|(p, _)| p.as_str()).collect();
        let mut guard = self.guard.clone();
        for p in peers
            .iter()
            .filter(|p| !skipped_peers.contains(p.name.as_str()))
        {
            for fam in p.v4.iter().chain(p.v6.iter()) {
                guard.peer_ips.insert(fam.public_ip);
                guard.peer_subnets.insert(fam.subnet);
            }
        }
        let decided = Instant::now();
        // The guard's nft transaction runs on a blocking thread while the entries are read
        // and diffed and the ops that let no traffic in are applied (deletions, VXLAN
        // neighbours: without FDB entry and route they carry nothing); FDB entries and routes,
        // which do let a peer's traffic in, wait for it.
        let guard_job = self.start_guard(guard);
        let programmed = self.program(&desired, guard_job).await;
        let guarded = Instant::now();
        let ops = programmed?;
        tracing::debug!(
            peers = peers.len(),
            ops,
            decide = ?decided - started,
            program = ?guarded - decided,
            "reconcile pass timings"
        );
        if self.blackhole {
            for subnet in &self.own_subnets {
                if let Err(e) = self.nl.ensure_blackhole(*subnet).await {
                    tracing::warn!(error = %e, "blackhole route");
                }
            }
        }
        Ok(ops)
    }

    /// Reads the entries, diffs them against `desired` and applies the ops, those letting a
    /// peer's traffic in (FDB entries, routes) only after `guard_job` finished. The guard job
    /// is always awaited, whatever fails, so its outcome is recorded.
    async fn program(
        &mut self,
        desired: &twill_backends::DataplaneState,
        guard_job: Option<GuardJob>,
    ) -> anyhow::Result<usize> {
        let ops = self
            .nl
            .observe(&self.links, &self.topo)
            .await
            .map(|actual| diff(desired, &actual));
        let (gated, early): (Vec<Op>, Vec<Op>) = match &ops {
            Ok(ops) => ops
                .iter()
                .cloned()
                .partition(|op| matches!(op, Op::SetFdb { .. } | Op::SetRoute(_))),
            Err(_) => Default::default(),
        };
        let started = Instant::now();
        let mut failed = self.nl.apply(&self.links, &early).await;
        let early_done = Instant::now();
        if let Some(job) = guard_job {
            self.finish_guard(job).await;
        }
        let guard_done = Instant::now();
        failed.extend(self.nl.apply(&self.links, &gated).await);
        tracing::debug!(
            early = ?early_done - started,
            guard_wait = ?guard_done - early_done,
            gated = ?guard_done.elapsed(),
            "programming timings"
        );
        let ops = ops?;
        for (op, err) in &failed {
            tracing::warn!(?op, error = %err, "dataplane operation failed; will retry on the next pass");
        }
        if !ops.is_empty() {
            tracing::info!(
                applied = ops.len() - failed.len(),
                failed = failed.len(),
                entries = desired.len(),
                "reconciled dataplane"
            );
        }
        Ok(ops.len())
    }

    /// Starts bringing the underlay guard to `guard` on a task of its own (nft runs off the runtime):
    /// element deltas when only peers changed, else the whole table; a rejected delta is
    /// replaced by the whole table in the same job. Until [`Self::finish_guard`] records the
    /// outcome the table's state is unknown, so a pass that never gets there leaves the next
    /// one to replace the whole table.
    fn start_guard(&mut self, guard: crate::underlay::GuardInput) -> Option<GuardJob> {
        use crate::underlay::{self, Update};
        let update = underlay::update(self.guard_applied.as_ref(), &guard);
        if update == Update::Unchanged {
            return None;
        }
        self.guard_applied = None;
        let nft = self.nft.clone();
        Some(tokio::spawn(async move {
            underlay::apply_update(&nft, update, guard).await
        }))
    }

    /// Waits for the guard job and records what the table now holds; a failure is retried
    /// (as a whole table) on the next pass.
    async fn finish_guard(&mut self, job: GuardJob) {
        match job.await {
            Ok(Ok(guard)) => {
                tracing::info!(
                    peers = guard.peer_ips.len(),
                    "underlay guard updated (inet twill-underlay)"
                );
                self.guard_applied = Some(guard);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "underlay guard not applied; retrying on the next pass")
            }
            Err(e) => {
                tracing::warn!(error = %e, "underlay guard job failed; retrying on the next pass")
            }
        }
    }

    /// Drift check on the resync tick: a table removed or changed by hand (its sets no longer
    /// what deltas would start from, rules missing) is replaced whole on the next pass.
    async fn check_guard(&mut self) {
        let drifted = match &self.guard_applied {
            Some(applied) => crate::underlay::drifted(&self.nft, applied).await,
            None => false,
        };
        if drifted {
            tracing::warn!("underlay guard table was removed or changed; re-applying it whole");
            self.guard_applied = None;
        }
    }

    async fn refresh_external(&mut self) {
        match self.nl.addresses(Some(self.ext.index)).await {
            Ok(addrs) => {
                self.topo.external_prefixes = addrs.into_iter().map(|(_, a)| a.trunc()).collect()
            }
            Err(e) => tracing::warn!(error = %e, "reading external interface addresses"),
        }
    }
}

/// A lease record as a dataplane peer, or why it cannot be one (bad JSON, or values that are
/// impossible for this network: [`validate_peer`] names the key and the field).
fn to_peer(rec: &LeaseRecord, config: &NetConfig) -> Result<PeerLease, String> {
    let attrs = rec
        .attrs
        .as_ref()
        .map_err(|e| format!("bad lease JSON: {e}"))?;
    let lease = record_to_lease(&rec.key, attrs, rec.lease_id);
    let data = validate_peer(&lease, config).map_err(|e| e.to_string())?;
    let v4 = config.enable_ipv4.then(|| PeerFamily {
        subnet: IpNet::V4(rec.key.ipv4),
        public_ip: IpAddr::V4(attrs.public_ip),
        vtep_mac: data.vxlan.map(|d| MacAddr(d.vtep_mac.0)),
    });
    let v6 = match (data.use_ipv6, rec.key.ipv6, attrs.public_ipv6) {
        (true, Some(subnet), Some(ip)) => Some(PeerFamily {
            subnet: IpNet::V6(subnet),
            public_ip: IpAddr::V6(ip),
            vtep_mac: data.vxlan_v6.map(|d| MacAddr(d.vtep_mac.0)),
        }),
        _ => None,
    };
    Ok(PeerLease {
        name: rec.key.to_string(),
        backend_type: attrs.backend_type.clone(),
        v4,
        v6,
    })
}

fn record_to_lease(key: &SubnetKey, attrs: &LeaseAttrs, lease_id: i64) -> Lease {
    Lease {
        key: *key,
        attrs: attrs.clone(),
        etcd_lease_id: lease_id,
        ttl_seconds: -1,
        mod_revision: 0,
    }
}

/// The peers as the registry currently has them (without this node's own key).
struct PeerTable {
    config: NetConfig,
    peers: BTreeMap<String, PeerLease>,
}

impl PeerTable {
    fn new(config: NetConfig) -> PeerTable {
        PeerTable {
            config,
            peers: BTreeMap::new(),
        }
    }

    /// A peer's garbage is logged once, here, and only removes that peer's entries.
    fn put(&mut self, rec: &LeaseRecord) {
        let name = rec.key.to_string();
        match to_peer(rec, &self.config) {
            Ok(peer) => {
                self.peers.insert(name, peer);
            }
            Err(reason) => {
                tracing::warn!(lease = %name, %reason, "skipping peer lease");
                self.peers.remove(&name);
            }
        }
    }

    fn delete(&mut self, key: &SubnetKey) {
        self.peers.remove(&key.to_string());
    }

    /// A peer known by another name than its subnet (a Kubernetes node).
    fn put_named(&mut self, name: &str, rec: &LeaseRecord) {
        match to_peer(rec, &self.config) {
            Ok(mut peer) => {
                peer.name = name.to_string();
                self.peers.insert(name.to_string(), peer);
            }
            Err(reason) => {
                tracing::warn!(node = %name, %reason, "skipping peer");
                self.peers.remove(name);
            }
        }
    }

    fn remove(&mut self, name: &str) {
        self.peers.remove(name);
    }

    fn clear(&mut self) {
        self.peers.clear();
    }

    fn list(&self) -> Vec<PeerLease> {
        self.peers.values().cloned().collect()
    }
}

/// Listens to rtnetlink and pokes the reconciler when something twill owns may have been
/// removed (a device, a route, a neighbour): drift is repaired at once instead of at the next
/// periodic resync.
fn spawn_netlink_monitor(poke: Arc<Notify>, watched: Arc<[AtomicU32; 2]>) -> anyhow::Result<()> {
    use rtnetlink::packet_core::NetlinkPayload;
    use rtnetlink::packet_route::RouteNetlinkMessage as M;
    use rtnetlink::MulticastGroup as G;
    let (conn, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[G::Link, G::Ipv4Route, G::Ipv6Route, G::Neigh])?;
    tokio::spawn(conn);
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let relevant = match &msg.payload {
                NetlinkPayload::InnerMessage(M::DelLink(_)) => true,
                NetlinkPayload::InnerMessage(M::NewLink(l)) => {
                    watched
                        .iter()
                        .any(|w| w.load(Ordering::Relaxed) == l.header.index)
                        && !l
                            .header
                            .flags
                            .contains(rtnetlink::packet_route::link::LinkFlags::Up)
                }
                NetlinkPayload::InnerMessage(M::DelRoute(_)) => true,
                NetlinkPayload::InnerMessage(M::DelNeighbour(n)) => watched
                    .iter()
                    .any(|w| w.load(Ordering::Relaxed) == n.header.ifindex),
                _ => false,
            };
            if relevant {
                poke.notify_one();
            }
        }
    });
    Ok(())
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

/// Where leases live, as the event loop sees it: a full listing into the peer table, a stream
/// of events, and (etcd only) renewal of the node's own lease. The two implementations are
/// [`EtcdSource`] and [`KubeSource`]; start-up before the loop differs more (etcd allocates a
/// subnet, Kubernetes reads the podCIDR) and lives in [`run`] and [`run_kube`].
trait LeaseSource {
    type Event: Send + 'static;
    /// Fills `table` with the current peers and starts the watch, sending its events on `tx`.
    async fn start(
        &mut self,
        table: &mut PeerTable,
        tx: mpsc::Sender<Self::Event>,
    ) -> anyhow::Result<()>;
    /// Applies one watch event to `table`; an error stops the daemon.
    async fn handle(&mut self, ev: Self::Event, table: &mut PeerTable) -> anyhow::Result<()>;
    /// When the own lease must be renewed next (never for Kubernetes).
    fn renew_at(&self) -> Option<Instant>;
    async fn renew(&mut self);
}

/// etcd mode: Flannel's etcd registry, own lease renewed, re-acquired when deleted.
struct EtcdSource {
    registry: EtcdRegistry,
    own: OwnLease,
    margin: Duration,
    /// Renewal attempts failed in a row (the retry backoff).
    renew_failures: u32,
}

impl LeaseSource for EtcdSource {
    type Event = RegistryEvent;

    async fn start(
        &mut self,
        table: &mut PeerTable,
        tx: mpsc::Sender<RegistryEvent>,
    ) -> anyhow::Result<()> {
        if let Some(ttl) = self.own.ttl {
            self.own.renew_at = Some(renew_deadline(ttl, Some(self.margin)));
        }
        let listing = list_with_retry(&self.registry).await;
        for rec in listing.records.iter().filter(|r| r.key != self.own.key) {
            table.put(rec);
        }
        tokio::spawn(self.registry.clone().watch(listing.revision, tx));
        Ok(())
    }

    async fn handle(&mut self, ev: RegistryEvent, table: &mut PeerTable) -> anyhow::Result<()> {
        handle_event(ev, &self.registry, &mut self.own, table).await
    }

    fn renew_at(&self) -> Option<Instant> {
        self.own.renew_at
    }

    async fn renew(&mut self) {
        let own = &mut self.own;
        match self.registry.put(&own.key, &own.attrs, own.ttl).await {
            Ok(Some(ttl)) => {
                own.renew_at = Some(renew_deadline(ttl, Some(self.margin)));
                tracing::info!(subnet = %own.key, after_failures = self.renew_failures, "renewed lease");
            }
            Ok(None) => own.renew_at = None,
            Err(e) => {
                // Flannel waits a minute; twill retries sooner (1 s doubling to 30 s), so a
                // renewal that fell due during an etcd outage is made soon after etcd is back.
                self.renew_failures += 1;
                let retry = Duration::from_secs(1 << self.renew_failures.min(5))
                    .min(Duration::from_secs(30));
                tracing::warn!(error = %e, retry_in = ?retry, "renewing lease failed; retrying");
                own.renew_at = Some(Instant::now() + retry);
                return;
            }
        }
        self.renew_failures = 0;
    }
}

/// Kubernetes mode: peers are the other nodes carrying Flannel's annotations, keyed by node
/// name; the watch's re-lists replace the table, so no deletion is missed.
struct KubeSource {
    ksm: crate::registry::kube::KubeSubnetManager,
}

impl KubeSource {
    fn apply(&self, table: &mut PeerTable, name: &str, rec: Option<Result<LeaseRecord, String>>) {
        if name == self.ksm.node_name {
            return;
        }
        match rec {
            None => table.remove(name),
            Some(Ok(rec)) => table.put_named(name, &rec),
            Some(Err(reason)) => {
                tracing::warn!(node = %name, %reason, "Error turning node to lease; skipping it");
                table.remove(name);
            }
        }
    }
}

impl LeaseSource for KubeSource {
    type Event = crate::registry::kube::NodeEvent;

    async fn start(
        &mut self,
        table: &mut PeerTable,
        tx: mpsc::Sender<Self::Event>,
    ) -> anyhow::Result<()> {
        // The watcher's first event is the complete listing: wait for it, so the first pass
        // programs every peer instead of removing entries a restart should keep.
        let (itx, mut irx) = mpsc::channel(4096);
        tokio::spawn(self.ksm.clone().watch(table.config.clone(), itx));
        loop {
            let Some(ev) = irx.recv().await else {
                bail!("the node watch stopped")
            };
            let first = matches!(ev, crate::registry::kube::NodeEvent::Resync(_));
            self.handle(ev, table).await?;
            if first {
                break;
            }
        }
        tokio::spawn(async move {
            while let Some(ev) = irx.recv().await {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        });
        Ok(())
    }

    async fn handle(&mut self, ev: Self::Event, table: &mut PeerTable) -> anyhow::Result<()> {
        use crate::registry::kube::NodeEvent;
        match ev {
            NodeEvent::Put(name, rec) => self.apply(table, &name, *rec),
            NodeEvent::Delete(name) => table.remove(&name),
            NodeEvent::Resync(nodes) => {
                table.clear();
                for (name, rec) in nodes {
                    self.apply(table, &name, rec);
                }
            }
        }
        Ok(())
    }

    fn renew_at(&self) -> Option<Instant> {
        None
    }

    async fn renew(&mut self) {}
}

async fn event_loop<S: LeaseSource>(
    flags: Flags,
    config: NetConfig,
    mut source: S,
    mut dataplane: Dataplane,
    traffic: TrafficManager,
) -> anyhow::Result<()> {
    let mut table = PeerTable::new(config);
    let (tx, mut rx) = mpsc::channel::<S::Event>(4096);
    source.start(&mut table, tx).await?;

    let poke = Arc::new(Notify::new());
    spawn_netlink_monitor(poke.clone(), dataplane.watched.clone())?;
    let mut resync = tokio::time::interval(Duration::from_secs(flags.resync_period.max(1)));
    // The masquerade/forward rules are checked on a task of their own: an iptables process
    // waiting on the xtables lock must not hold up peer programming.
    let _traffic_resync =
        DropAbort(traffic.spawn_resync(Duration::from_secs(flags.iptables_resync)));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let far_future = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);

    // The first pass happens right away: it removes entries of peers that vanished while the
    // daemon was down and programs every current peer.
    let mut dirty = true;
    loop {
        if dirty {
            // Coalesce a burst of lease events (1000 leases arrive as a few dozen watch
            // responses) into one pass: keep draining until the watch is quiet for
            // LEASE_BURST_QUIET, but never wait longer than LEASE_BURST_MAX.
            let burst_deadline = tokio::time::Instant::now() + LEASE_BURST_MAX;
            loop {
                while let Ok(ev) = rx.try_recv() {
                    source.handle(ev, &mut table).await?;
                }
                let quiet_until =
                    (tokio::time::Instant::now() + LEASE_BURST_QUIET).min(burst_deadline);
                match tokio::time::timeout_at(quiet_until, rx.recv()).await {
                    Ok(Some(ev)) => source.handle(ev, &mut table).await?,
                    Ok(None) => bail!("the registry watch stopped"),
                    Err(_) => break,
                }
            }
            if let Err(e) = dataplane.reconcile(&table.list()).await {
                tracing::warn!(error = %e, "reconcile failed; retrying on the next pass");
            }
            dirty = false;
        }
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { bail!("the registry watch stopped") };
                source.handle(ev, &mut table).await?;
                dirty = true;
            }
            _ = poke.notified() => {
                // Let a burst of kernel events settle into one pass.
                tokio::time::sleep(Duration::from_millis(20)).await;
                dirty = true;
            }
            _ = resync.tick() => {
                dataplane.refresh_external().await;
                dataplane.check_guard().await;
                dirty = true;
            }
            _ = tokio::time::sleep_until(source.renew_at().unwrap_or(far_future)) => {
                source.renew().await;
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    tracing::info!("shutting down; the dataplane stays as it is");
    Ok(())
}

/// Aborts a background task when the owner goes (the event loop returning stops the resync).
struct DropAbort(tokio::task::JoinHandle<()>);

impl Drop for DropAbort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Applies one registry event to the peer table, handling this node's own key: a deleted or
/// expired own lease is re-acquired if the subnet is still free; if another node has it,
/// twilld stops rather than keep advertising a subnet it no longer holds.
async fn handle_event(
    ev: RegistryEvent,
    registry: &EtcdRegistry,
    own: &mut OwnLease,
    table: &mut PeerTable,
) -> anyhow::Result<()> {
    match ev {
        RegistryEvent::Put(rec) if rec.key == own.key => {
            if let Ok(attrs) = &rec.attrs {
                if attrs.public_ip != own.attrs.public_ip {
                    bail!(
                        "subnet {} is now leased to {} (this node is {}); refusing to keep advertising it",
                        own.key,
                        attrs.public_ip,
                        own.attrs.public_ip
                    );
                }
            }
        }
        RegistryEvent::Put(rec) => table.put(&rec),
        RegistryEvent::Delete(key) if key == own.key => reacquire(registry, own).await?,
        RegistryEvent::Delete(key) => table.delete(&key),
        RegistryEvent::Resync(listing) => {
            table.clear();
            let mut own_present = false;
            for rec in &listing.records {
                if rec.key == own.key {
                    own_present = true;
                    Box::pin(handle_event(
                        RegistryEvent::Put(rec.clone()),
                        registry,
                        own,
                        table,
                    ))
                    .await?;
                } else {
                    table.put(rec);
                }
            }
            if !own_present {
                reacquire(registry, own).await?;
            }
        }
    }
    Ok(())
}

async fn reacquire(registry: &EtcdRegistry, own: &mut OwnLease) -> anyhow::Result<()> {
    tracing::warn!(subnet = %own.key, "this node's lease was deleted or expired; re-acquiring the same subnet");
    loop {
        match registry
            .create(&own.key, &own.attrs, own.ttl.or(Some(SUBNET_TTL)))
            .await
        {
            Ok(ttl) => {
                own.ttl = ttl;
                own.renew_at = ttl.map(|t| renew_deadline(t, None));
                tracing::info!(subnet = %own.key, "re-acquired lease");
                return Ok(());
            }
            Err(RegistryError::AlreadyExists) => {
                bail!("Lease has been revoked and subnet {} was taken by another node. Shutting down daemon.", own.key)
            }
            Err(e) => {
                tracing::warn!(error = %e, "re-acquiring lease failed; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
