//! The world of the upstream NetworkPolicy conformance tests and its machine-readable
//! scenarios ([`SCENARIOS`]: twill-policy's `tests/data/netpol-scenarios.json`).
//!
//! World: namespaces x, y, z labelled `{ns: <ns>, kubernetes.io/metadata.name: <ns>}`;
//! pods a, b, c in each, labelled `{pod: <name>}`, each exposing ports 80 and 81 for TCP,
//! UDP and SCTP, named `serve-<port>-<proto>`. Addresses (dual-stack):
//! x/a = 10.244.1.2 and fd00:10:244:1::2, x/b = .3, x/c = .4; y on 10.244.2.0/24 and z on
//! 10.244.3.0/24 likewise. Namespace x runs on node n1, y on n2, z on n3.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;

use twill_policy::model::{
    from_json_value, ContainerPort, Labels, Namespace, NetworkPolicyObject, Pod, Protocol, Snapshot,
};

/// Namespaces of the world.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// Pod names in each namespace.
pub const PODS: [&str; 3] = ["a", "b", "c"];

/// One probe: a protocol and port, and the `src->dst` pairs expected to be denied.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    pub protocol: Protocol,
    pub port: u16,
    pub expect_denied: Vec<String>,
}

/// One step: the complete set of active policies, label overrides, probes.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub policies: Vec<serde_json::Value>,
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, Labels>,
    #[serde(default)]
    pub pod_labels: BTreeMap<String, Labels>,
    pub probes: Vec<Probe>,
}

/// One upstream test case.
#[derive(Debug, Clone, Deserialize)]
pub struct Scenario {
    pub id: String,
    pub title: String,
    pub steps: Vec<Step>,
}

/// The upstream scenarios file (48 scenarios), read with [`load_scenarios`].
pub const SCENARIOS: &str = include_str!("../../tests/data/netpol-scenarios.json");

/// Parses the scenarios file.
pub fn load_scenarios(json: &str) -> Result<Vec<Scenario>> {
    serde_json::from_str(json).context("parsing netpol-scenarios.json")
}

fn idx(v: &[&str], s: &str) -> usize {
    v.iter().position(|x| *x == s).unwrap_or(0)
}

/// IPv4 address of `ns/pod` in the world.
pub fn ipv4_of(ns: &str, pod: &str) -> IpAddr {
    format!(
        "10.244.{}.{}",
        idx(&NAMESPACES, ns) + 1,
        idx(&PODS, pod) + 2
    )
    .parse()
    .unwrap()
}

/// IPv6 address of `ns/pod` in the world.
pub fn ipv6_of(ns: &str, pod: &str) -> IpAddr {
    format!(
        "fd00:10:244:{}::{}",
        idx(&NAMESPACES, ns) + 1,
        idx(&PODS, pod) + 2
    )
    .parse()
    .unwrap()
}

/// Node that runs namespace `ns`'s pods.
pub fn node_of(ns: &str) -> String {
    format!("n{}", idx(&NAMESPACES, ns) + 1)
}

/// The nine pods, with `pod_labels` replacing the default labels of the pods they name.
pub fn pods(pod_labels: &BTreeMap<String, Labels>) -> Vec<Pod> {
    let mut out = Vec::new();
    for ns in NAMESPACES {
        for name in PODS {
            let key = format!("{ns}/{name}");
            let labels = pod_labels
                .get(&key)
                .cloned()
                .unwrap_or_else(|| [("pod".to_string(), name.to_string())].into());
            let mut ports = Vec::new();
            for port in [80u16, 81] {
                for proto in Protocol::ALL {
                    ports.push(ContainerPort {
                        name: Some(format!("serve-{port}-{}", proto.nft())),
                        port,
                        protocol: proto,
                    });
                }
            }
            out.push(Pod {
                namespace: ns.into(),
                name: name.into(),
                labels,
                node: Some(node_of(ns)),
                ips: vec![ipv4_of(ns, name), ipv6_of(ns, name)],
                host_network: false,
                ports,
                phase: Some("Running".into()),
                terminating: false,
            });
        }
    }
    out
}

/// The three namespaces, with `ns_labels` replacing the default labels of those named.
pub fn namespaces(ns_labels: &BTreeMap<String, Labels>) -> Vec<Namespace> {
    NAMESPACES
        .iter()
        .map(|ns| {
            let labels = ns_labels
                .get(*ns)
                .cloned()
                .unwrap_or_else(|| [("ns".to_string(), ns.to_string())].into());
            Namespace::new(ns, labels)
        })
        .collect()
}

/// Substitutes `${ip:ns/pod}` with the pod's IPv4 address in a policy's JSON text.
pub fn substitute_ips(text: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("${ip:") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 5..];
        let end = after
            .find('}')
            .ok_or_else(|| anyhow!("unterminated ${{ip:"))?;
        let (ns, pod) = after[..end]
            .split_once('/')
            .ok_or_else(|| anyhow!("bad ${{ip:{}}}", &after[..end]))?;
        out.push_str(&ipv4_of(ns, pod).to_string());
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether the step refers to pod IPs (ipBlocks), which are IPv4 only in this world.
pub fn step_uses_ips(step: &Step) -> bool {
    step.policies
        .iter()
        .any(|p| p.to_string().contains("${ip:"))
}

/// The world as of `step`.
pub fn step_snapshot(step: &Step) -> Result<Snapshot> {
    let mut policies = Vec::new();
    for (i, p) in step.policies.iter().enumerate() {
        let text = substitute_ips(&p.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let obj: NetworkPolicyObject =
            from_json_value(v).map_err(|e| anyhow!("policy {i}: {e}"))?;
        policies.push(obj.into_model().map_err(|e| anyhow!("policy {i}: {e}"))?);
    }
    Ok(Snapshot::new(
        namespaces(&step.namespace_labels),
        pods(&step.pod_labels),
        policies,
    ))
}

/// All 72 ordered non-self pairs `(src, dst)` as `ns/pod` keys.
pub fn pairs() -> Vec<(String, String)> {
    let keys: Vec<String> = NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect();
    let mut out = Vec::new();
    for s in &keys {
        for d in &keys {
            if s != d {
                out.push((s.clone(), d.clone()));
            }
        }
    }
    out
}
