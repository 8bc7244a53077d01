//! The world of the upstream network-policy-api conformance tests (ClusterNetworkPolicy,
//! AdminNetworkPolicy, BaselineAdminNetworkPolicy) and its scenarios
//! ([`CLUSTER_SCENARIOS`]: twill-policy's `tests/data/cnp-scenarios.json`).
//!
//! The file holds the world of upstream's `conformance/base/manifests.yaml` (five
//! namespaces `network-policy-conformance-*` labelled `conformance-house`, two StatefulSet
//! pods in four of them, two hostNetwork pods `centaur-0/1` in the fifth, their labels and
//! named container ports, the ports their servers listen on) and every upstream test as
//! steps: the complete objects in force at that step, namespace label changes, and the
//! probes upstream makes with the result it asserts. Where pods run and which addresses
//! they have is not in the file: a [`Placement`] says so, [`Placement::pure`] for the
//! evaluator tests, the lab's own for the lab test. hostNetwork pods have their node's
//! address; a probe to one of them is a probe to that node.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use twill_policy::model::cluster::{cluster_policy_from_value, node_from_value};
use twill_policy::model::{
    from_json_value, Labels, NamespaceObject, NetworkPolicyObject, PodObject, Protocol, Snapshot,
};

/// The scenarios file, read with [`load_cluster_conformance`].
pub const CLUSTER_SCENARIOS: &str = include_str!("../../tests/data/cnp-scenarios.json");

/// A port a server listens on.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct Server {
    pub protocol: Protocol,
    pub port: u16,
}

/// One pod of the world as upstream's manifests create it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorldPod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub host_network: bool,
    /// Container ports as written in the pod spec (`containerPort`, `protocol`, `name`).
    pub ports: Vec<Value>,
}

impl WorldPod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The namespaces, pods and servers every scenario runs against.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct World {
    /// The ports upstream's suite picks at run time for hostNetwork servers
    /// (`HostNetworkPorts`), fixed here to the values its older manifests used.
    pub host_network_ports: Vec<u16>,
    /// Namespace name -> labels (with `kubernetes.io/metadata.name`).
    pub namespaces: BTreeMap<String, Labels>,
    pub pods: Vec<WorldPod>,
    /// What every pod (not hostNetwork) serves.
    pub pod_servers: Vec<Server>,
    /// What the hostNetwork pods serve, on their node's address.
    pub host_network_servers: Vec<Server>,
    /// Labels every node carries (upstream's node peers select `kubernetes.io/os: linux`).
    pub node_labels: Labels,
}

/// One probe: a connection from a pod to a pod (or, for a hostNetwork pod, its node).
#[derive(Debug, Clone, Deserialize)]
pub struct ClusterProbe {
    /// `namespace/pod` of the client.
    pub from: String,
    /// `namespace/pod` of the server.
    pub to: String,
    pub protocol: Protocol,
    pub port: u16,
    /// Upstream's expectation.
    pub allowed: bool,
}

/// One step: the objects in force, namespace label changes, the probes.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStep {
    /// The upstream subtest (`t.Run`) this step belongs to; "(part N)" when the subtest
    /// changes the world halfway.
    pub title: String,
    /// Complete objects (cluster policies and NetworkPolicies) as applied at this step;
    /// `${cidr:ns/pod}` stands for the pod's address as a host prefix.
    pub objects: Vec<Value>,
    /// Namespaces whose labels differ from the world's at this step.
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, Labels>,
    pub probes: Vec<ClusterProbe>,
}

/// One upstream conformance test.
#[derive(Debug, Clone, Deserialize)]
pub struct ClusterScenario {
    /// Upstream's `ShortName`.
    pub id: String,
    /// Upstream's `Description`.
    pub title: String,
    /// `conformance/tests/<file>@<commit>` it was translated from.
    pub upstream: String,
    /// The base manifests the test applies.
    pub manifests: Vec<String>,
    pub steps: Vec<ClusterStep>,
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
pub struct ClusterConformance {
    pub world: World,
    pub scenarios: Vec<ClusterScenario>,
}

/// Parses the scenarios file.
pub fn load_cluster_conformance(json: &str) -> Result<ClusterConformance> {
    serde_json::from_str(json).context("parsing cnp-scenarios.json")
}

/// Where every pod runs and which addresses pods and nodes have.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// `namespace/pod` -> (node name, address). hostNetwork pods have their node's address.
    pub pods: BTreeMap<String, (String, IpAddr)>,
    /// Node name -> its InternalIP.
    pub nodes: BTreeMap<String, IpAddr>,
}

impl Placement {
    /// The evaluator's placement: nodes n1-n3 at 198.18.0.1-3; the pods that are not
    /// hostNetwork spread over them in file order, node `n<k>` giving addresses from
    /// 10.244.<k>.0/24; hostNetwork pods on n1, n2, ... in file order.
    pub fn pure(world: &World) -> Placement {
        let nodes: Vec<(String, IpAddr)> = (1..=3u8)
            .map(|k| (format!("n{k}"), IpAddr::V4(Ipv4Addr::new(198, 18, 0, k))))
            .collect();
        let mut pods = BTreeMap::new();
        let (mut next_pod, mut next_host) = (0usize, 0usize);
        for p in &world.pods {
            let (node, ip) = if p.host_network {
                let n = &nodes[next_host % nodes.len()];
                next_host += 1;
                n.clone()
            } else {
                let k = next_pod % nodes.len();
                let host = 2 + next_pod / nodes.len();
                next_pod += 1;
                let ip = IpAddr::V4(Ipv4Addr::new(10, 244, k as u8 + 1, host as u8));
                (nodes[k].0.clone(), ip)
            };
            pods.insert(p.key(), (node, ip));
        }
        Placement {
            pods,
            nodes: nodes.into_iter().collect(),
        }
    }

    /// The address of `ns/pod`.
    pub fn ip(&self, key: &str) -> Result<IpAddr> {
        self.pods
            .get(key)
            .map(|(_, ip)| *ip)
            .ok_or_else(|| anyhow!("no pod {key} in the placement"))
    }
}

/// Replaces every `${cidr:ns/pod}` in `text` with the pod's address as a /32 or /128.
pub fn substitute_cidrs(text: &str, placement: &Placement) -> Result<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("${cidr:") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "${cidr:".len()..];
        let end = after
            .find('}')
            .ok_or_else(|| anyhow!("unterminated ${{cidr: in {text}"))?;
        let ip = placement.ip(&after[..end])?;
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        out.push_str(&format!("{ip}/{bits}"));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl World {
    /// The pod `ns/name`.
    pub fn pod(&self, key: &str) -> Option<&WorldPod> {
        self.pods.iter().find(|p| p.key() == key)
    }

    /// Every object of `step` as the API would serve it: namespaces (with the step's
    /// labels), pods (spec.nodeName, status.podIPs from `placement`), nodes, then the
    /// step's policies with their `${cidr:..}` filled in.
    pub fn objects(&self, step: &ClusterStep, placement: &Placement) -> Result<Vec<Value>> {
        let mut items = Vec::new();
        for (ns, labels) in &self.namespaces {
            let labels = step.namespace_labels.get(ns).unwrap_or(labels);
            items.push(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": labels}}));
        }
        for p in &self.pods {
            let (node, ip) = placement
                .pods
                .get(&p.key())
                .ok_or_else(|| anyhow!("pod {} has no place", p.key()))?;
            let containers: Vec<Value> = p
                .ports
                .iter()
                .enumerate()
                .map(|(i, port)| json!({"name": format!("c{i}"), "ports": [port]}))
                .collect();
            items.push(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
                "spec": {"nodeName": node, "hostNetwork": p.host_network, "containers": containers},
                "status": {"phase": "Running", "podIP": ip.to_string(),
                           "podIPs": [{"ip": ip.to_string()}]}}));
        }
        for (name, ip) in &placement.nodes {
            let mut labels = self.node_labels.clone();
            labels.insert("kubernetes.io/hostname".into(), name.clone());
            items.push(json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": labels},
                "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()},
                                         {"type": "Hostname", "address": name}]}}));
        }
        for o in &step.objects {
            let text = substitute_cidrs(&o.to_string(), placement)?;
            items.push(serde_json::from_str(&text)?);
        }
        Ok(items)
    }

    /// The snapshot of `step`: every object of [`World::objects`] read by twill-policy's
    /// own parsers (cluster policies and nodes by `cluster_policy_from_value` and
    /// `node_from_value`).
    pub fn snapshot(&self, step: &ClusterStep, placement: &Placement) -> Result<Snapshot> {
        let (mut namespaces, mut pods, mut policies, mut cluster, mut nodes) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for o in self.objects(step, placement)? {
            let kind = o["kind"].as_str().unwrap_or_default().to_string();
            let name = o["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let what = || format!("{kind} {name}");
            match kind.as_str() {
                "Namespace" => namespaces.push(
                    from_json_value::<NamespaceObject>(o)
                        .and_then(|n| n.into_model())
                        .map_err(|e| anyhow!("{}: {e}", what()))?,
                ),
                "Pod" => pods.push(
                    from_json_value::<PodObject>(o)
                        .and_then(|p| p.into_model())
                        .map_err(|e| anyhow!("{}: {e}", what()))?,
                ),
                "NetworkPolicy" => policies.push(
                    from_json_value::<NetworkPolicyObject>(o)
                        .and_then(|p| p.into_model())
                        .map_err(|e| anyhow!("{}: {e}", what()))?,
                ),
                "Node" => nodes.push(node_from_value(o).map_err(|e| anyhow!("{}: {e}", what()))?),
                "ClusterNetworkPolicy" | "AdminNetworkPolicy" | "BaselineAdminNetworkPolicy" => {
                    cluster
                        .push(cluster_policy_from_value(o).map_err(|e| anyhow!("{}: {e}", what()))?)
                }
                other => bail!("{}: unexpected kind {other}", what()),
            }
        }
        Ok(Snapshot::new(namespaces, pods, policies)
            .with_cluster_policies(cluster)
            .with_nodes(nodes))
    }
}
