//! The Kubernetes subnet manager (`--kube-subnet-mgr`): the
//! node's lease is its `spec.podCIDR(s)`, its attributes are Flannel's node annotations (patched
//! on `nodes/<name>/status` only when they differ), peers come from a watch on all nodes.
//!
//! The pure half (annotation names, node → lease, the annotation patch) is separate from the
//! API calls so it can be tested without a server.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use futures::StreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use twill_runtime::backoff::retry_delays;

use crate::registry::etcd::LeaseRecord;
use twill_formats::gojson;
use twill_formats::lease::{LeaseAttrs, SubnetKey, VxlanBackendData};
use twill_formats::net_conf::NetConfig;

/// Every Kubernetes API call twilld makes, as (resource, verb): the one place the RBAC test
/// (`tests/kube.rs`) compares with the `flannel` ClusterRole in kube-flannel.yml.
pub const API_VERBS: &[(&str, &str)] = &[
    ("pods", "get"),
    ("nodes", "get"),
    ("nodes", "list"),
    ("nodes", "watch"),
    ("nodes/status", "patch"),
    // Events on the node (LeaseAcquired, LeaseLost, ...): kube's Recorder creates an event
    // and patches it when it repeats.
    ("events", "create"),
    ("events", "patch"),
];

/// Flannel's annotation names under a prefix (`--kube-annotation-prefix`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Annotations {
    pub subnet_kube_managed: String,
    pub backend_type: String,
    pub backend_data: String,
    pub backend_v6_data: String,
    pub backend_public_ip: String,
    pub backend_public_ipv6: String,
    pub backend_public_ip_overwrite: String,
    pub backend_public_ipv6_overwrite: String,
    pub node_public_ip: String,
    pub node_public_ipv6: String,
}

impl Annotations {
    /// Flannel's `newAnnotations`: at most one slash; no slash → append `/`; a slash but no
    /// trailing `/` or `-` → append `-`.
    pub fn new(prefix: &str) -> Result<Annotations, PrefixError> {
        let slashes = prefix.matches('/').count();
        if slashes > 1 {
            return Err(PrefixError);
        }
        let p = if slashes == 0 {
            format!("{prefix}/")
        } else if !prefix.ends_with('/') && !prefix.ends_with('-') {
            format!("{prefix}-")
        } else {
            prefix.to_string()
        };
        let n = |s: &str| format!("{p}{s}");
        Ok(Annotations {
            subnet_kube_managed: n("kube-subnet-manager"),
            backend_type: n("backend-type"),
            backend_data: n("backend-data"),
            backend_v6_data: n("backend-v6-data"),
            backend_public_ip: n("public-ip"),
            backend_public_ipv6: n("public-ipv6"),
            backend_public_ip_overwrite: n("public-ip-overwrite"),
            backend_public_ipv6_overwrite: n("public-ipv6-overwrite"),
            node_public_ip: n("node-public-ip"),
            node_public_ipv6: n("node-public-ipv6"),
        })
    }
}

fn annotations(node: &Node) -> BTreeMap<String, String> {
    node.metadata.annotations.clone().unwrap_or_default()
}

/// `--kube-annotation-prefix` with more than one slash (Flannel's text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("subnet/kube: prefix can contain at most single slash")]
pub struct PrefixError;

/// Why a node cannot be read as a lease (its pod CIDRs or its annotations).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("node \"{0}\" pod cidr not assigned")]
    NoPodCidr(String),
    #[error("node \"{name}\" has more than two pod CIDRs: {cidrs:?}")]
    TooManyPodCidrs { name: String, cidrs: Vec<String> },
    #[error("node \"{name}\": pod CIDR {cidr:?}: {error}")]
    BadPodCidr {
        name: String,
        cidr: String,
        error: ipnet::AddrParseError,
    },
    #[error("no public-ip annotation")]
    NoPublicIp,
    #[error("public-ip annotation: {0}")]
    BadPublicIp(std::net::AddrParseError),
    #[error("public-ipv6 annotation: {0}")]
    BadPublicIpv6(std::net::AddrParseError),
    #[error("no IPv4 pod CIDR")]
    NoIpv4PodCidr,
}

/// The node's pod CIDRs: `spec.podCIDRs` (1 or 2, one per family), else `spec.podCIDR`.
pub fn pod_cidrs(node: &Node) -> Result<(Option<Ipv4Net>, Option<Ipv6Net>), NodeError> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let spec = node.spec.clone().unwrap_or_default();
    let mut list: Vec<String> = spec.pod_cidrs.unwrap_or_default();
    if list.is_empty() {
        list.extend(spec.pod_cidr.filter(|c| !c.is_empty()));
    }
    if list.is_empty() {
        return Err(NodeError::NoPodCidr(name));
    }
    if list.len() > 2 {
        return Err(NodeError::TooManyPodCidrs { name, cidrs: list });
    }
    let (mut v4, mut v6) = (None, None);
    for c in &list {
        match c.parse::<IpNet>() {
            Ok(IpNet::V4(n)) => v4 = Some(n.trunc()),
            Ok(IpNet::V6(n)) => v6 = Some(n.trunc()),
            Err(error) => {
                return Err(NodeError::BadPodCidr {
                    name,
                    cidr: c.clone(),
                    error,
                })
            }
        }
    }
    Ok((v4, v6))
}

/// A node as a peer lease record, the way Flannel's `nodeToLease` reads it. `None` when the
/// node is not managed by a Flannel-compatible daemon (no `kube-subnet-manager: "true"`);
/// `Err` when its annotations or pod CIDR cannot be used.
pub fn node_to_record(
    node: &Node,
    ann: &Annotations,
    config: &NetConfig,
) -> Option<Result<LeaseRecord, NodeError>> {
    let a = annotations(node);
    if a.get(&ann.subnet_kube_managed).map(String::as_str) != Some("true") {
        return None;
    }
    Some((|| {
        let (v4, v6) = pod_cidrs(node)?;
        let raw = |k: &str| -> Option<Value> {
            a.get(k)
                .map(|s| serde_json::from_str(s).unwrap_or(Value::Null))
        };
        let public_ip: Ipv4Addr = if config.enable_ipv4 {
            a.get(&ann.backend_public_ip)
                .ok_or(NodeError::NoPublicIp)?
                .parse()
                .map_err(NodeError::BadPublicIp)?
        } else {
            Ipv4Addr::UNSPECIFIED
        };
        let public_ipv6: Option<Ipv6Addr> = match a.get(&ann.backend_public_ipv6) {
            Some(s) if config.enable_ipv6 => Some(s.parse().map_err(NodeError::BadPublicIpv6)?),
            _ => None,
        };
        let ipv4 = match v4 {
            Some(n) => n,
            None if !config.enable_ipv4 => Ipv4Net::default(),
            None => return Err(NodeError::NoIpv4PodCidr),
        };
        Ok(LeaseRecord {
            key: SubnetKey::new(ipv4, if config.enable_ipv6 { v6 } else { None }),
            attrs: Ok(LeaseAttrs {
                public_ip,
                public_ipv6,
                backend_type: a.get(&ann.backend_type).cloned().unwrap_or_default(),
                backend_data: raw(&ann.backend_data),
                backend_v6_data: raw(&ann.backend_v6_data).filter(|_| config.enable_ipv6),
            }),
            lease_id: 0,
        })
    })())
}

/// The annotations this node must carry, Flannel's `AcquireLease`: backend type and data,
/// public IP (or the `public-ip-overwrite` value when set), `kube-subnet-manager: "true"`, and
/// the v6 variants when IPv6 is enabled. Returns only those that differ from `current`: the
/// body of the strategic-merge patch, or `None` when nothing needs patching.
pub fn annotation_patch(
    current: &BTreeMap<String, String>,
    ann: &Annotations,
    attrs: &LeaseAttrs,
    ipv4: bool,
    ipv6: bool,
) -> Option<Value> {
    // Flannel writes the annotation as the marshalled BackendData's bytes: Go-JSON text.
    let json_text = |d: &Option<Value>| {
        let mut out = String::new();
        gojson::encode_value(d.as_ref().unwrap_or(&Value::Null), &mut out);
        out
    };
    let mut want: Vec<(String, String)> = vec![
        (ann.backend_type.clone(), attrs.backend_type.clone()),
        (ann.subnet_kube_managed.clone(), "true".into()),
    ];
    if ipv4 {
        want.push((ann.backend_data.clone(), json_text(&attrs.backend_data)));
        let ip = match current.get(&ann.backend_public_ip_overwrite) {
            Some(o) if !o.is_empty() => o.clone(),
            _ => attrs.public_ip.to_string(),
        };
        want.push((ann.backend_public_ip.clone(), ip));
    }
    if ipv6 {
        want.push((
            ann.backend_v6_data.clone(),
            json_text(&attrs.backend_v6_data),
        ));
        let ip = match current.get(&ann.backend_public_ipv6_overwrite) {
            Some(o) if !o.is_empty() => o.clone(),
            _ => attrs.public_ipv6.map(|a| a.to_string()).unwrap_or_default(),
        };
        want.push((ann.backend_public_ipv6.clone(), ip));
    }
    let diff: serde_json::Map<String, Value> = want
        .into_iter()
        .filter(|(k, v)| current.get(k) != Some(v))
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    (!diff.is_empty()).then(|| json!({"metadata": {"annotations": diff}}))
}

/// The VtepMACs (v4, v6) this node advertised before, from its own annotations.
pub fn previous_vtep_macs(
    node: &Node,
    ann: &Annotations,
) -> (Option<twill_formats::Mac>, Option<twill_formats::Mac>) {
    let a = annotations(node);
    let mac = |k: &str| {
        a.get(k)
            .and_then(|s| serde_json::from_str::<Value>(s).ok())
            .and_then(|v| VxlanBackendData::from_json(&v).ok())
            .map(|d| d.vtep_mac)
    };
    (mac(&ann.backend_data), mac(&ann.backend_v6_data))
}

/// What the node watch reports to the daemon.
#[derive(Debug, Clone)]
pub enum NodeEvent {
    /// A node was added or changed (its name, and its lease record when it is a usable
    /// Flannel node, or why not).
    Put(String, Box<Option<Result<LeaseRecord, NodeError>>>),
    Delete(String),
    /// The watch (re)listed: the complete set of nodes. Nodes not in it are gone, even if their
    /// deletion was never seen as an event.
    Resync(Vec<(String, Option<Result<LeaseRecord, NodeError>>)>),
}

/// The API client and the node this daemon runs on.
/// First delay before retrying a failed node watch (doubling, with jitter).
const WATCH_RETRY_MIN: Duration = Duration::from_millis(800);
/// Longest delay before retrying a failed node watch (before jitter).
const WATCH_RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct KubeSubnetManager {
    pub client: Client,
    pub node_name: String,
    pub annotations: Annotations,
}

/// A client from `--kubeconfig-file` and/or `--kube-api-url`, else the in-cluster config
/// (as client-go's `BuildConfigFromFlags`), with kube's default timeouts.
pub async fn client(
    api_url: &str,
    kubeconfig: &str,
) -> Result<Client, twill_runtime::kube::ClientError> {
    twill_runtime::kube::client(&twill_runtime::kube::ClientOptions {
        api_url: api_url.to_string(),
        kubeconfig: kubeconfig.to_string(),
        ..Default::default()
    })
    .await
}

/// `NODE_NAME`, else the node of pod `POD_NAMESPACE/POD_NAME`.
pub async fn node_name(client: &Client) -> anyhow::Result<String> {
    if let Some(n) = std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()) {
        return Ok(n);
    }
    let (pod, ns) = match (std::env::var("POD_NAME"), std::env::var("POD_NAMESPACE")) {
        (Ok(p), Ok(n)) if !p.is_empty() && !n.is_empty() => (p, n),
        _ => anyhow::bail!("env variables POD_NAME and POD_NAMESPACE must be set"),
    };
    let p = Api::<Pod>::namespaced(client.clone(), &ns)
        .get(&pod)
        .await?;
    p.spec
        .and_then(|s| s.node_name)
        .ok_or_else(|| anyhow::anyhow!("pod {ns}/{pod} has no spec.nodeName"))
}

impl KubeSubnetManager {
    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// The own node, waiting for it as Flannel does (poll every 3 s, give up after 30 s).
    pub async fn own_node(&self) -> anyhow::Result<Node> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.nodes().get(&self.node_name).await {
                Ok(n) => return Ok(n),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    anyhow::bail!("waiting for node {}: {e}", self.node_name)
                }
                Err(e) => {
                    tracing::warn!(node = %self.node_name, error = %e, "node not available yet; retrying in 3s");
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
            }
        }
    }

    /// Flannel's `AcquireLease`: the lease is the pod CIDR(s); the annotations are patched on
    /// `nodes/<name>/status` if any differs; then the containment check against the config.
    pub async fn acquire(
        &self,
        config: &NetConfig,
        attrs: &LeaseAttrs,
    ) -> anyhow::Result<SubnetKey> {
        let node = self.own_node().await?;
        let (v4, v6) = pod_cidrs(&node)?;
        if let Some(patch) = annotation_patch(
            &annotations(&node),
            &self.annotations,
            attrs,
            config.enable_ipv4,
            config.enable_ipv6,
        ) {
            tracing::info!(node = %self.node_name, %patch, "updating node annotations");
            self.nodes()
                .patch_status(
                    &self.node_name,
                    &PatchParams::default(),
                    &Patch::Strategic(patch),
                )
                .await?;
        }
        let name = &self.node_name;
        if config.enable_ipv4 {
            let cidr =
                v4.ok_or_else(|| anyhow::anyhow!("node \"{name}\" pod cidr not assigned"))?;
            if let Some(net) = config.network {
                if !net.contains(&cidr) {
                    anyhow::bail!("subnet \"{net}\" specified in the flannel net config doesn't contain \"{cidr}\" PodCIDR of the \"{name}\" node");
                }
            }
        }
        let v6 = if config.enable_ipv6 {
            let cidr =
                v6.ok_or_else(|| anyhow::anyhow!("node \"{name}\" pod cidrv6 not assigned"))?;
            if let Some(net) = config.ipv6_network {
                if !net.contains(&cidr) {
                    anyhow::bail!("subnet \"{net}\" specified in the flannel net config doesn't contain \"{cidr}\" IPv6 PodCIDR of the \"{name}\" node");
                }
            }
            Some(cidr)
        } else {
            None
        };
        Ok(SubnetKey::new(v4.unwrap_or_default(), v6))
    }

    /// `NetworkUnavailable=False`, reason `FlannelIsUp` (strategic merge on `type`).
    pub async fn set_network_available(&self) -> anyhow::Result<()> {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let patch = json!({"status": {"conditions": [{
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "FlannelIsUp",
            "message": "Flannel is running on this node",
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }]}});
        self.nodes()
            .patch_status(
                &self.node_name,
                &PatchParams::default(),
                &Patch::Strategic(patch),
            )
            .await?;
        Ok(())
    }

    /// Watches all nodes until `events` closes. kube's watcher re-watches from the last
    /// resourceVersion (or bookmark) when a stream ends and re-lists on 410 Gone; every
    /// re-list reaches the daemon as one [`NodeEvent::Resync`], so a deletion missed while
    /// the watch was down still removes the node. Each failure (the watcher then restarts)
    /// and each re-list after the first is counted in `metrics`.
    pub async fn watch(
        self,
        config: NetConfig,
        events: mpsc::Sender<NodeEvent>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) {
        let ann = self.annotations.clone();
        let to = |n: &Node| {
            (
                n.metadata.name.clone().unwrap_or_default(),
                node_to_record(n, &ann, &config),
            )
        };
        // twill-runtime's backoff, reset only by progress (a complete list or a change), as
        // twill-policy's watchers do. kube's default_backoff() (0.8 s to 30 s, with jitter
        // too) is reset by every item the watcher yields, and a failing initial list yields
        // Event::Init before each error, so it retried an unreachable API every ~1 s.
        let mut stream = watcher(self.nodes(), watcher::Config::default()).boxed();
        let mut delays = retry_delays(WATCH_RETRY_MIN, WATCH_RETRY_MAX);
        let mut init: Vec<(String, Option<Result<LeaseRecord, NodeError>>)> = Vec::new();
        let mut listed_once = false;
        while let Some(ev) = stream.next().await {
            let out = match ev {
                Ok(watcher::Event::Init) => {
                    if std::mem::replace(&mut listed_once, true) {
                        metrics.record_relist();
                    }
                    init.clear();
                    None
                }
                Ok(watcher::Event::InitApply(n)) => {
                    init.push(to(&n));
                    None
                }
                Ok(watcher::Event::InitDone) => Some(NodeEvent::Resync(std::mem::take(&mut init))),
                Ok(watcher::Event::Apply(n)) => {
                    let (name, rec) = to(&n);
                    Some(NodeEvent::Put(name, Box::new(rec)))
                }
                Ok(watcher::Event::Delete(n)) => {
                    Some(NodeEvent::Delete(n.metadata.name.unwrap_or_default()))
                }
                Err(e) => {
                    metrics.record_watch_restart();
                    let delay = delays.next().unwrap_or(WATCH_RETRY_MAX);
                    tracing::warn!(error = %e, "node watch failed; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    None
                }
            };
            if out.is_some() {
                delays = retry_delays(WATCH_RETRY_MIN, WATCH_RETRY_MAX);
            }
            if let Some(out) = out {
                if events.send(out).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rules() {
        let a = Annotations::new("flannel.alpha.coreos.com").unwrap();
        assert_eq!(a.backend_data, "flannel.alpha.coreos.com/backend-data");
        assert_eq!(
            a.node_public_ipv6,
            "flannel.alpha.coreos.com/node-public-ipv6"
        );
        let a = Annotations::new("example.com/twill").unwrap();
        assert_eq!(a.backend_type, "example.com/twill-backend-type");
        let a = Annotations::new("example.com/twill-").unwrap();
        assert_eq!(a.backend_type, "example.com/twill-backend-type");
        assert!(Annotations::new("a/b/c").is_err());
    }

    #[test]
    fn patch_only_what_differs() {
        let ann = Annotations::new("flannel.alpha.coreos.com").unwrap();
        let attrs = LeaseAttrs {
            public_ip: "198.18.0.11".parse().unwrap(),
            backend_type: "vxlan".into(),
            backend_data: Some(json!({"VNI":1,"VtepMAC":"0a:58:0a:f4:01:00"})),
            ..Default::default()
        };
        let p = annotation_patch(&BTreeMap::new(), &ann, &attrs, true, false).unwrap();
        assert_eq!(
            p,
            json!({"metadata":{"annotations":{
                "flannel.alpha.coreos.com/backend-type":"vxlan",
                "flannel.alpha.coreos.com/kube-subnet-manager":"true",
                "flannel.alpha.coreos.com/backend-data":"{\"VNI\":1,\"VtepMAC\":\"0a:58:0a:f4:01:00\"}",
                "flannel.alpha.coreos.com/public-ip":"198.18.0.11"}}})
        );
        let current: BTreeMap<String, String> = p["metadata"]["annotations"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        assert_eq!(annotation_patch(&current, &ann, &attrs, true, false), None);
        let mut over = current.clone();
        over.insert(
            ann.backend_public_ip_overwrite.clone(),
            "203.0.113.9".into(),
        );
        assert_eq!(
            annotation_patch(&over, &ann, &attrs, true, false),
            Some(
                json!({"metadata":{"annotations":{"flannel.alpha.coreos.com/public-ip":"203.0.113.9"}}})
            )
        );
        // host-gw advertises `null` backend data, as Go marshals a nil RawMessage.
        let hg = LeaseAttrs {
            backend_type: "host-gw".into(),
            backend_data: None,
            ..attrs
        };
        let p = annotation_patch(&BTreeMap::new(), &ann, &hg, true, false).unwrap();
        assert_eq!(
            p["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"],
            "null"
        );
    }

    #[test]
    fn nodes_become_records() {
        let ann = Annotations::new("flannel.alpha.coreos.com").unwrap();
        let cfg =
            NetConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n2", "annotations": {
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"12:c6:65:89:b4:e3\"}",
                "flannel.alpha.coreos.com/public-ip": "198.18.0.12"}},
            "spec": {"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24"]}
        }))
        .unwrap();
        let rec = node_to_record(&node, &ann, &cfg).unwrap().unwrap();
        assert_eq!(rec.key.to_string(), "10.244.2.0-24");
        let attrs = rec.attrs.unwrap();
        assert_eq!(attrs.public_ip.to_string(), "198.18.0.12");
        assert_eq!(
            previous_vtep_macs(&node, &ann).0.unwrap().to_string(),
            "12:c6:65:89:b4:e3"
        );
        let plain: Node = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
        assert!(node_to_record(&plain, &ann, &cfg).is_none());
        let no_cidr: Node = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
        assert_eq!(
            pod_cidrs(&no_cidr).unwrap_err().to_string(),
            "node \"x\" pod cidr not assigned"
        );
    }
}
