//! Plain data for the objects the enforcer reads: Namespaces, Pods and
//! `networking.k8s.io/v1` NetworkPolicies, with the Kubernetes JSON/YAML shapes
//! (hand-written serde structs, no k8s-openapi), label selectors with their exact
//! semantics, and the defaulting and validation the API server would do.
//!
//! Wire objects ([`NamespaceObject`], [`PodObject`], [`NetworkPolicyObject`]) are
//! converted into the plain types with [`NamespaceObject::into_model`] and friends;
//! those conversions apply API-server defaulting (policyTypes, protocol TCP,
//! namespace `default`, the `kubernetes.io/metadata.name` label) and validation,
//! reporting the offending field as a path such as `spec.ingress[0].ports[1].port`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};

use crate::source::ObjectError;

pub mod cluster;

pub use cluster::{Action, ClusterPolicy, ClusterPolicyKind, ClusterRule, Node, Subject, Tier};

/// Labels of an object. Ordered, so output is deterministic.
pub type Labels = BTreeMap<String, String>;

/// The immutable label the API server puts on every namespace.
pub const NS_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A validation error: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the field, e.g. `spec.ingress[0].from[1].ipBlock.cidr`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn ferr(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

// ------------------------------------------------------------------ names, as the API server checks them

/// `s` for an error message: quoted, and cut after 80 characters (a manifest's name can be
/// megabytes long).
fn shown(s: &str) -> String {
    match s.char_indices().nth(80) {
        None => format!("{s:?}"),
        Some((i, _)) => format!("{:?}... ({} bytes)", &s[..i], s.len()),
    }
}

/// RFC 1123 label (namespace names): at most 63 of `a-z 0-9 -`, alphanumeric at both ends.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// RFC 1123 subdomain (pod and NetworkPolicy names, label key prefixes): at most 253
/// characters, dot-separated parts of `a-z 0-9 -`, each alphanumeric at both ends.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// A label value (and the name part of a label key when not empty): at most 63 of
/// `A-Z a-z 0-9 - _ .`, alphanumeric at both ends; the empty value is valid.
pub fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    b.is_empty()
        || (b.len() <= 63
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric())
}

/// A label key (qualified name): an optional DNS subdomain prefix and `/`, then a
/// non-empty name of at most 63 (as [`is_label_value`]).
pub fn is_label_key(s: &str) -> bool {
    let name = match s.split_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty() || !is_dns1123_subdomain(prefix) {
                return false;
            }
            name
        }
        None => s,
    };
    !name.is_empty() && is_label_value(name)
}

/// `metadata.name` checked with `valid` (`what` names the rule in the error).
fn check_name(field: &str, s: &str, valid: fn(&str) -> bool, what: &str) -> Result<(), FieldError> {
    if s.is_empty() {
        return Err(ferr(field, "required"));
    }
    if !valid(s) {
        return Err(ferr(field, format!("{} is not a valid {what}", shown(s))));
    }
    Ok(())
}

/// `metadata.namespace` when given (empty = `default`).
fn check_namespace(s: &str) -> Result<(), FieldError> {
    if !s.is_empty() && !is_dns1123_label(s) {
        return Err(ferr(
            "metadata.namespace",
            format!(
                "{} is not a valid namespace name (RFC 1123 label: at most 63 of a-z, 0-9, '-')",
                shown(s)
            ),
        ));
    }
    Ok(())
}

/// Label keys and values, as the API server validates them (`field` is e.g.
/// `metadata.labels`).
fn check_labels(field: &str, labels: &Labels) -> Result<(), FieldError> {
    for (k, v) in labels {
        check_label_key(field, k)?;
        if !is_label_value(v) {
            return Err(ferr(
                format!("{field}[{k}]"),
                format!(
                    "{} is not a valid label value (at most 63 of A-Z, a-z, 0-9, '-', '_', '.', alphanumeric at both ends)",
                    shown(v)
                ),
            ));
        }
    }
    Ok(())
}

fn check_label_key(field: &str, k: &str) -> Result<(), FieldError> {
    if !is_label_key(k) {
        return Err(ferr(
            field,
            format!(
                "{} is not a valid label key ([DNS subdomain prefix '/'] name of at most 63 of A-Z, a-z, 0-9, '-', '_', '.')",
                shown(k)
            ),
        ));
    }
    Ok(())
}

const SUBDOMAIN: &str = "name (RFC 1123 subdomain: at most 253 of a-z, 0-9, '-', '.')";

/// Deserializes `null` as the type's default (Kubernetes treats null and absent alike).
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

// ------------------------------------------------------------------ selectors

/// Operator of a label selector requirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    /// A set: `In`/`NotIn` look a label value up in O(log n), however many values a
    /// policy lists (repeated values collapse).
    #[serde(default, deserialize_with = "nullable")]
    pub values: BTreeSet<String>,
}

impl Requirement {
    /// Whether `labels` satisfy this requirement. `NotIn` and `DoesNotExist` match
    /// objects that lack the key.
    pub fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.key);
        match self.operator {
            Operator::In => v.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => v.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => v.is_some(),
            Operator::DoesNotExist => v.is_none(),
        }
    }
}

/// A Kubernetes label selector. The empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: Labels,
    #[serde(default, deserialize_with = "nullable")]
    pub match_expressions: Vec<Requirement>,
}

impl LabelSelector {
    /// matchLabels AND matchExpressions; empty matches all.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// True for `{}`: selects every object.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    fn validate(&self, field: &str) -> Result<(), FieldError> {
        check_labels(&format!("{field}.matchLabels"), &self.match_labels)?;
        for (i, r) in self.match_expressions.iter().enumerate() {
            let f = format!("{field}.matchExpressions[{i}]");
            if r.key.is_empty() {
                return Err(ferr(format!("{f}.key"), "must not be empty"));
            }
            // Keys are checked; values are not: the API server keeps serving selectors
            // stored before it checked matchExpressions values (it ratchets the check on
            // update), so rejecting them here would drop a policy the cluster has. A value
            // no label can have simply never matches.
            check_label_key(&format!("{f}.key"), &r.key)?;
            match r.operator {
                Operator::In | Operator::NotIn if r.values.is_empty() => {
                    return Err(ferr(
                        format!("{f}.values"),
                        "must be non-empty for In and NotIn",
                    ))
                }
                Operator::Exists | Operator::DoesNotExist if !r.values.is_empty() => {
                    return Err(ferr(
                        format!("{f}.values"),
                        "must be empty for Exists and DoesNotExist",
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn join(values: &BTreeSet<String>) -> String {
    values
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("{}");
        }
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            parts.push(match r.operator {
                Operator::In => format!("{} in ({})", r.key, join(&r.values)),
                Operator::NotIn => format!("{} notin ({})", r.key, join(&r.values)),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        write!(f, "{{{}}}", parts.join(", "))
    }
}

// ------------------------------------------------------------------ common wire pieces

/// `metadata` of any object (only the fields we use).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub namespace: String,
    #[serde(default, deserialize_with = "nullable")]
    pub labels: Labels,
    /// `metadata.deletionTimestamp`: set once deletion began (the pod is terminating).
    #[serde(default)]
    pub deletion_timestamp: Option<serde::de::IgnoredAny>,
}

/// Transport protocols NetworkPolicy knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// All three, in a fixed order.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// nft's name (`tcp`, `udp`, `sctp`).
    pub fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// A protocol name other than TCP, UDP or SCTP (any case).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol {0:?} (want TCP, UDP or SCTP)")]
pub struct UnknownProtocol(pub String);

impl std::str::FromStr for Protocol {
    type Err = UnknownProtocol;
    fn from_str(s: &str) -> Result<Self, UnknownProtocol> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            _ => Err(UnknownProtocol(s.to_string())),
        }
    }
}

// ------------------------------------------------------------------ Namespace

/// A namespace: name and labels (always including `kubernetes.io/metadata.name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

impl Namespace {
    /// A namespace with the labels the API server gives it, plus `labels`.
    pub fn new(name: &str, labels: Labels) -> Namespace {
        let mut labels = labels;
        labels.insert(NS_NAME_LABEL.into(), name.into());
        Namespace {
            name: name.into(),
            labels,
        }
    }
}

/// Wire shape of a Namespace.
#[derive(Debug, Clone, Deserialize)]
pub struct NamespaceObject {
    #[serde(default)]
    pub metadata: ObjectMeta,
}

impl NamespaceObject {
    /// Validates and defaults (adds `kubernetes.io/metadata.name`).
    pub fn into_model(self) -> Result<Namespace, FieldError> {
        check_name(
            "metadata.name",
            &self.metadata.name,
            is_dns1123_label,
            "namespace name (RFC 1123 label: at most 63 of a-z, 0-9, '-')",
        )?;
        check_labels("metadata.labels", &self.metadata.labels)?;
        Ok(Namespace::new(&self.metadata.name, self.metadata.labels))
    }
}

// ------------------------------------------------------------------ Pod

/// A named or numbered container port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

/// A pod, as far as policy cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// `status.podIPs` (falls back to `status.podIP`).
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    pub ports: Vec<ContainerPort>,
    /// `status.phase`, if given. Succeeded/Failed pods have released their IPs.
    pub phase: Option<String>,
    /// `metadata.deletionTimestamp` is set: the pod is being deleted, and its address may
    /// already have been handed to a new pod (which then owns it, see [`Snapshot::new`]).
    pub terminating: bool,
}

impl Pod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether this pod takes part in policy as a pod: not hostNetwork (whose traffic is
    /// node traffic) and not terminated (whose IP may already belong to someone else).
    pub fn is_policy_pod(&self) -> bool {
        !self.host_network && !matches!(self.phase.as_deref(), Some("Succeeded") | Some("Failed"))
    }

    /// The number of the container port named `name` with `proto`, if any.
    pub fn named_port(&self, name: &str, proto: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.protocol == proto && p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPortWire {
    #[serde(default)]
    name: Option<String>,
    container_port: i64,
    #[serde(default)]
    protocol: Option<Protocol>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerWire {
    #[serde(default, deserialize_with = "nullable")]
    ports: Vec<ContainerPortWire>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpecWire {
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    host_network: bool,
    #[serde(default, deserialize_with = "nullable")]
    containers: Vec<ContainerWire>,
    #[serde(default, deserialize_with = "nullable")]
    init_containers: Vec<ContainerWire>,
}

#[derive(Debug, Clone, Deserialize)]
struct PodIpWire {
    ip: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatusWire {
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs", deserialize_with = "nullable")]
    pod_ips: Vec<PodIpWire>,
    #[serde(default)]
    phase: Option<String>,
}

/// Wire shape of a Pod.
#[derive(Debug, Clone, Deserialize)]
pub struct PodObject {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PodSpecWire,
    #[serde(default)]
    status: PodStatusWire,
}

impl PodObject {
    /// Validates and defaults (namespace `default`, container port protocol TCP).
    pub fn into_model(self) -> Result<Pod, FieldError> {
        let m = self.metadata;
        check_name("metadata.name", &m.name, is_dns1123_subdomain, SUBDOMAIN)?;
        check_namespace(&m.namespace)?;
        check_labels("metadata.labels", &m.labels)?;
        // Deduplicated through a set (a Vec::contains per address made a long podIPs list
        // quadratic); first occurrence order is kept, status.podIP first.
        let mut ips = Vec::new();
        let mut seen = HashSet::new();
        for (i, p) in self.status.pod_ips.iter().enumerate() {
            let ip = p.ip.parse().map_err(|_| {
                ferr(
                    format!("status.podIPs[{i}].ip"),
                    format!("{:?} is not an IP address", p.ip),
                )
            })?;
            if seen.insert(ip) {
                ips.push(ip);
            }
        }
        // An empty podIP is an absent one (Go's `omitempty` writes them alike).
        if let Some(s) = self.status.pod_ip.as_ref().filter(|s| !s.is_empty()) {
            let ip: IpAddr = s
                .parse()
                .map_err(|_| ferr("status.podIP", format!("{s:?} is not an IP address")))?;
            if seen.insert(ip) {
                ips.insert(0, ip);
            }
        }
        let mut ports = Vec::new();
        for (kind, list) in [
            ("containers", &self.spec.containers),
            ("initContainers", &self.spec.init_containers),
        ] {
            for (ci, c) in list.iter().enumerate() {
                for (pi, p) in c.ports.iter().enumerate() {
                    let f = format!("spec.{kind}[{ci}].ports[{pi}]");
                    let port = u16::try_from(p.container_port)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| {
                            ferr(
                                format!("{f}.containerPort"),
                                format!("{} must be between 1 and 65535", p.container_port),
                            )
                        })?;
                    if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty()) {
                        if !is_port_name(n) {
                            return Err(ferr(
                                format!("{f}.name"),
                                format!("{} is not a valid port name (IANA_SVC_NAME)", shown(n)),
                            ));
                        }
                    }
                    ports.push(ContainerPort {
                        name: p.name.clone().filter(|n| !n.is_empty()),
                        port,
                        protocol: p.protocol.unwrap_or(Protocol::Tcp),
                    });
                }
            }
        }
        Ok(Pod {
            namespace: if m.namespace.is_empty() {
                "default".into()
            } else {
                m.namespace
            },
            name: m.name,
            labels: m.labels,
            node: self.spec.node_name.filter(|n| !n.is_empty()),
            ips,
            host_network: self.spec.host_network,
            ports,
            phase: self.status.phase,
            terminating: m.deletion_timestamp.is_some(),
        })
    }
}

// ------------------------------------------------------------------ NetworkPolicy

/// `Ingress` or `Egress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyType {
    Ingress,
    Egress,
}

impl fmt::Display for PolicyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyType::Ingress => "ingress",
            PolicyType::Egress => "egress",
        })
    }
}

/// `port` of a NetworkPolicyPort: a number or a container port name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PortValue {
    Number(i64),
    Name(String),
}

impl fmt::Display for PortValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortValue::Number(n) => write!(f, "{n}"),
            PortValue::Name(s) => f.write_str(s),
        }
    }
}

/// A validated port: a number (with optional inclusive range end) or a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Port {
    Range(u16, u16),
    Named(String),
}

/// One entry of a rule's `ports` (protocol defaulted to TCP; `port: None` = all ports).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PolicyPort {
    pub protocol: Protocol,
    pub port: Option<Port>,
}

impl fmt::Display for PolicyPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            None => write!(f, "all {} ports", self.protocol),
            Some(Port::Range(a, b)) if a == b => write!(f, "{}/{a}", self.protocol),
            Some(Port::Range(a, b)) => write!(f, "{}/{a}-{b}", self.protocol),
            Some(Port::Named(n)) => write!(f, "{}/{n}", self.protocol),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicyPortWire {
    #[serde(default)]
    protocol: Option<Protocol>,
    #[serde(default)]
    port: Option<PortValue>,
    #[serde(default)]
    end_port: Option<i64>,
}

/// `ipBlock`, with host bits masked off the CIDR and the excepts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IpBlock {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

impl IpBlock {
    /// In the CIDR and in none of the excepts.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
struct IpBlockWire {
    cidr: String,
    #[serde(default, deserialize_with = "nullable")]
    except: Vec<String>,
}

/// One peer (`from`/`to` entry).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Pods matching `pods` in namespaces matching `namespaces`; `namespaces: None`
    /// means the policy's own namespace.
    Pods {
        pods: LabelSelector,
        namespaces: Option<LabelSelector>,
    },
    IpBlock(IpBlock),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PeerWire {
    #[serde(default)]
    pod_selector: Option<LabelSelector>,
    #[serde(default)]
    namespace_selector: Option<LabelSelector>,
    #[serde(default)]
    ip_block: Option<IpBlockWire>,
}

/// One ingress or egress rule. Empty `peers` = all peers, empty `ports` = all ports
/// and protocols. [`NetworkPolicyObject::into_model`] keeps only the first of identical
/// peers and of identical ports (peers are OR-ed, ports too: a repeat adds nothing).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PolicyPort>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct IngressRuleWire {
    #[serde(default, deserialize_with = "nullable")]
    from: Vec<PeerWire>,
    #[serde(default, deserialize_with = "nullable")]
    ports: Vec<PolicyPortWire>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct EgressRuleWire {
    #[serde(default, deserialize_with = "nullable")]
    to: Vec<PeerWire>,
    #[serde(default, deserialize_with = "nullable")]
    ports: Vec<PolicyPortWire>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicySpecWire {
    #[serde(default, deserialize_with = "nullable")]
    pod_selector: LabelSelector,
    #[serde(default, deserialize_with = "nullable")]
    policy_types: Vec<PolicyType>,
    #[serde(default, deserialize_with = "nullable")]
    ingress: Vec<IngressRuleWire>,
    #[serde(default, deserialize_with = "nullable")]
    egress: Vec<EgressRuleWire>,
}

/// A NetworkPolicy after defaulting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: LabelSelector,
    /// Defaulted: never empty.
    pub policy_types: Vec<PolicyType>,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

impl NetworkPolicy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the policy has `t` in its (defaulted) policyTypes.
    pub fn has_type(&self, t: PolicyType) -> bool {
        self.policy_types.contains(&t)
    }

    /// Rules for one direction.
    pub fn rules(&self, t: PolicyType) -> &[Rule] {
        match t {
            PolicyType::Ingress => &self.ingress,
            PolicyType::Egress => &self.egress,
        }
    }

    /// Whether this policy applies to `pod` in direction `t`: same namespace, podSelector
    /// matches, `t` in policyTypes, and `pod` is a policy pod (not hostNetwork).
    pub fn selects(&self, pod: &Pod, t: PolicyType) -> bool {
        pod.is_policy_pod()
            && pod.namespace == self.namespace
            && self.has_type(t)
            && self.pod_selector.matches(&pod.labels)
    }
}

/// Wire shape of a NetworkPolicy.
#[derive(Debug, Clone, Deserialize)]
pub struct NetworkPolicyObject {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PolicySpecWire,
}

/// An IPv4 address the way Kubernetes' `netutils.ParseIPSloppy` reads it: four decimal
/// fields of 0-255, leading zeros allowed and read as decimal (`010.1.2.3` is 10.1.2.3).
fn parse_ipv4_sloppy(s: &str) -> Option<std::net::Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut fields = s.split('.');
    for o in &mut octets {
        let f = fields.next()?;
        if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // Leading zeros do not count against the value: "0000255" is 255.
        let digits = f.trim_start_matches('0');
        *o = if digits.is_empty() {
            0
        } else {
            digits.parse().ok()?
        };
    }
    fields.next().is_none().then(|| octets.into())
}

/// A CIDR the way the API server validates `ipBlock.cidr` and `except` (Kubernetes'
/// `netutils.ParseCIDRSloppy`, i.e. Go's `net.ParseCIDR` before Go 1.17): host bits may be
/// set (`10.0.0.1/24` is 10.0.0.0/24), IPv4 octets may have leading zeros (decimal), the
/// prefix length is decimal and may have leading zeros too. Anything the API server stores
/// must be read here, or a valid object would break its namespace.
pub fn parse_cidr_sloppy(s: &str) -> Option<IpNet> {
    let (addr, len) = s.split_once('/')?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len = len.trim_start_matches('0');
    let len: u8 = if len.is_empty() { 0 } else { len.parse().ok()? };
    let ip: IpAddr = match addr.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => IpAddr::V4(parse_ipv4_sloppy(addr)?),
    };
    IpNet::new(ip, len).ok().map(|n| n.trunc())
}

fn parse_net(s: &str, field: &str) -> Result<IpNet, FieldError> {
    parse_cidr_sloppy(s.trim()).ok_or_else(|| ferr(field, format!("{s:?} is not a CIDR")))
}

fn convert_peer(p: PeerWire, field: &str) -> Result<Peer, FieldError> {
    match (p.pod_selector, p.namespace_selector, p.ip_block) {
        (None, None, None) => Err(ferr(
            field,
            "must specify one of podSelector, namespaceSelector or ipBlock",
        )),
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => Err(ferr(
            format!("{field}.ipBlock"),
            "may not be combined with podSelector or namespaceSelector",
        )),
        (None, None, Some(b)) => {
            let cf = format!("{field}.ipBlock.cidr");
            let cidr = parse_net(&b.cidr, &cf)?;
            let mut except = Vec::new();
            for (i, e) in b.except.iter().enumerate() {
                let ef = format!("{field}.ipBlock.except[{i}]");
                let e = parse_net(e, &ef)?;
                let same_family = matches!(
                    (cidr, e),
                    (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
                );
                if !same_family || !cidr.contains(&e) || e.prefix_len() < cidr.prefix_len() {
                    return Err(ferr(ef, format!("{e} must be within the cidr {cidr}")));
                }
                except.push(e);
            }
            Ok(Peer::IpBlock(IpBlock { cidr, except }))
        }
        (pods, namespaces, None) => {
            if let Some(s) = &pods {
                s.validate(&format!("{field}.podSelector"))?;
            }
            if let Some(s) = &namespaces {
                s.validate(&format!("{field}.namespaceSelector"))?;
            }
            Ok(Peer::Pods {
                pods: pods.unwrap_or_default(),
                namespaces,
            })
        }
    }
}

fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn convert_port(p: PolicyPortWire, field: &str) -> Result<PolicyPort, FieldError> {
    let protocol = p.protocol.unwrap_or(Protocol::Tcp);
    let num = |n: i64, f: &str| {
        u16::try_from(n)
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| ferr(f, format!("{n} must be between 1 and 65535")))
    };
    let port = match (p.port, p.end_port) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(ferr(
                format!("{field}.endPort"),
                "may not be set without port",
            ))
        }
        (Some(PortValue::Number(n)), end) => {
            let a = num(n, &format!("{field}.port"))?;
            let b = match end {
                None => a,
                Some(e) => {
                    let b = num(e, &format!("{field}.endPort"))?;
                    if b < a {
                        return Err(ferr(
                            format!("{field}.endPort"),
                            format!("{b} must be greater than or equal to port {a}"),
                        ));
                    }
                    b
                }
            };
            Some(Port::Range(a, b))
        }
        (Some(PortValue::Name(s)), end) => {
            if end.is_some() {
                return Err(ferr(
                    format!("{field}.endPort"),
                    "may not be set when port is a name",
                ));
            }
            if !is_port_name(&s) {
                return Err(ferr(
                    format!("{field}.port"),
                    format!("{} is not a valid port name (IANA_SVC_NAME)", shown(&s)),
                ));
            }
            Some(Port::Named(s))
        }
    };
    Ok(PolicyPort { protocol, port })
}

fn convert_rule(
    peers: Vec<PeerWire>,
    ports: Vec<PolicyPortWire>,
    field: &str,
    peer_key: &str,
) -> Result<Rule, FieldError> {
    let peers = peers
        .into_iter()
        .enumerate()
        .map(|(i, p)| convert_peer(p, &format!("{field}.{peer_key}[{i}]")))
        .collect::<Result<_, _>>()?;
    let ports = ports
        .into_iter()
        .enumerate()
        .map(|(i, p)| convert_port(p, &format!("{field}.ports[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(Rule {
        peers: dedup_keep_first(peers),
        ports: dedup_keep_first(ports),
    })
}

/// `v` without the repeats of earlier elements, in first-occurrence order. Linear: 55k
/// copies of `{namespaceSelector: {}}` (one 1.5 MB object) become one peer before anything
/// expands them.
pub fn dedup_keep_first<T: Hash + Eq>(v: Vec<T>) -> Vec<T> {
    let keep: Vec<bool> = {
        let mut seen = HashSet::with_capacity(v.len());
        v.iter().map(|x| seen.insert(x)).collect()
    };
    v.into_iter()
        .zip(keep)
        .filter_map(|(x, k)| k.then_some(x))
        .collect()
}

impl NetworkPolicyObject {
    /// Validates and applies API-server defaulting: namespace `default`; policyTypes
    /// `[Ingress]` plus `Egress` if there are egress rules; protocol TCP; CIDRs masked.
    pub fn into_model(self) -> Result<NetworkPolicy, FieldError> {
        let m = self.metadata;
        check_name("metadata.name", &m.name, is_dns1123_subdomain, SUBDOMAIN)?;
        check_namespace(&m.namespace)?;
        check_labels("metadata.labels", &m.labels)?;
        let s = self.spec;
        s.pod_selector.validate("spec.podSelector")?;
        let mut policy_types = s.policy_types;
        if policy_types.is_empty() {
            policy_types.push(PolicyType::Ingress);
            if !s.egress.is_empty() {
                policy_types.push(PolicyType::Egress);
            }
        }
        policy_types.sort();
        policy_types.dedup();
        let ingress = s
            .ingress
            .into_iter()
            .enumerate()
            .map(|(i, r)| convert_rule(r.from, r.ports, &format!("spec.ingress[{i}]"), "from"))
            .collect::<Result<_, _>>()?;
        let egress = s
            .egress
            .into_iter()
            .enumerate()
            .map(|(i, r)| convert_rule(r.to, r.ports, &format!("spec.egress[{i}]"), "to"))
            .collect::<Result<_, _>>()?;
        Ok(NetworkPolicy {
            namespace: if m.namespace.is_empty() {
                "default".into()
            } else {
                m.namespace
            },
            name: m.name,
            pod_selector: s.pod_selector,
            policy_types,
            ingress,
            egress,
        })
    }
}

/// Deserializes a wire object from JSON, reporting the failing field path.
pub fn from_json_value<T: serde::de::DeserializeOwned>(
    v: serde_json::Value,
) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        ferr(
            if path == "." { String::new() } else { path },
            e.into_inner().to_string(),
        )
    })
}

// ------------------------------------------------------------------ Snapshot

/// Everything the enforcer knows at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// By name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Sorted by namespace/name. Addresses are owned (see [`Snapshot::new`]): no address
    /// is in the `ips` of two pods that take part in policy.
    pub pods: Vec<Pod>,
    /// Sorted by namespace/name; one per key (a later object replaces an earlier one).
    pub policies: Vec<NetworkPolicy>,
    /// Namespaces holding an object the source could not read (a Namespace, Pod or
    /// NetworkPolicy, or a manifest file whose objects were in it), with those errors.
    /// They fail closed: their pods are isolated both ways, whatever their policies say,
    /// and no policy matches them as peers (see [`Snapshot::is_broken`]). Every other
    /// namespace is enforced as usual.
    pub broken: BTreeMap<String, Vec<ObjectError>>,
    /// Errors that could not be tied to any namespace and broke none (a manifest file
    /// that is not read at all and never was); reported, nothing else.
    pub unattributed: Vec<ObjectError>,
    /// ClusterNetworkPolicies, AdminNetworkPolicies and the BaselineAdminNetworkPolicy,
    /// sorted by [`ClusterPolicy::order`] (tier, priority, name, kind); one per key.
    pub cluster_policies: Vec<ClusterPolicy>,
    /// Nodes (for egress `nodes` peers), sorted by name.
    pub nodes: Vec<Node>,
    /// Cluster-scoped objects (cluster policies, Nodes) that could not be read. They break
    /// no namespace; see [`Snapshot::keep_readable_cluster_policies`].
    pub broken_cluster: Vec<ObjectError>,
}

/// Why an address belongs to nobody: the pods that claim it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressConflict {
    pub ip: IpAddr,
    /// `namespace/name` of every claimant of the winning class (all non-terminating ones,
    /// or with none of those all terminating ones).
    pub pods: Vec<String>,
}

/// Decides who owns each address claimed by more than one pod that takes part in policy
/// (hostNetwork and Succeeded/Failed pods claim nothing): a pod that is not terminating
/// wins over terminating ones (whose address the IPAM may have handed on already); if
/// that leaves more than one claimant, nobody owns it. The address is removed from the
/// `ips` of every pod that does not own it, so a deleted pod's verdict never passes to
/// the pod that has its address now, and a contested address matches no peer and has no
/// pod chain (on a node with pod subnets it is an unknown address: isolated).
pub fn resolve_addresses(pods: &mut [Pod]) -> Vec<AddressConflict> {
    // ip -> (non-terminating claimants, terminating claimants), as indices.
    let mut claims: HashMap<IpAddr, (Vec<usize>, Vec<usize>)> = HashMap::new();
    for (i, p) in pods.iter().enumerate() {
        if !p.is_policy_pod() {
            continue;
        }
        for ip in &p.ips {
            let c = claims.entry(*ip).or_default();
            if p.terminating {
                c.1.push(i);
            } else {
                c.0.push(i);
            }
        }
    }
    let mut conflicts = Vec::new();
    let mut lose: Vec<(usize, IpAddr)> = Vec::new();
    for (ip, (live, terminating)) in claims {
        if live.len() + terminating.len() < 2 {
            continue;
        }
        let winners = if live.is_empty() { &terminating } else { &live };
        if winners.len() > 1 {
            let mut names: Vec<String> = winners.iter().map(|&i| pods[i].key()).collect();
            names.sort();
            conflicts.push(AddressConflict { ip, pods: names });
            lose.extend(live.iter().chain(&terminating).map(|&i| (i, ip)));
        } else {
            lose.extend(
                terminating
                    .iter()
                    .filter(|&&i| i != winners[0])
                    .map(|&i| (i, ip)),
            );
        }
    }
    for (i, ip) in lose {
        pods[i].ips.retain(|a| *a != ip);
    }
    conflicts.sort_by_key(|c| c.ip);
    conflicts
}

impl Snapshot {
    /// Builds a snapshot; duplicates (same kind and key) keep the last one, as an update
    /// would. Addresses claimed by several pods are resolved by [`resolve_addresses`]; the
    /// conflicts are logged.
    pub fn new(
        namespaces: impl IntoIterator<Item = Namespace>,
        pods: impl IntoIterator<Item = Pod>,
        policies: impl IntoIterator<Item = NetworkPolicy>,
    ) -> Snapshot {
        let namespaces = namespaces
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect();
        let pods: BTreeMap<(String, String), Pod> = pods
            .into_iter()
            .map(|p| ((p.namespace.clone(), p.name.clone()), p))
            .collect();
        let policies: BTreeMap<(String, String), NetworkPolicy> = policies
            .into_iter()
            .map(|p| ((p.namespace.clone(), p.name.clone()), p))
            .collect();
        let mut pods: Vec<Pod> = pods.into_values().collect();
        for c in resolve_addresses(&mut pods) {
            tracing::warn!(
                ip = %c.ip,
                pods = ?c.pods,
                "address claimed by more than one pod; it belongs to none of them (fail closed)"
            );
        }
        Snapshot {
            namespaces,
            pods,
            policies: policies.into_values().collect(),
            broken: BTreeMap::new(),
            unattributed: Vec::new(),
            cluster_policies: Vec::new(),
            nodes: Vec::new(),
            broken_cluster: Vec::new(),
        }
    }

    /// Sets the cluster policies; a later one with the same key replaces an earlier one.
    pub fn with_cluster_policies(
        mut self,
        policies: impl IntoIterator<Item = ClusterPolicy>,
    ) -> Self {
        let by_key: BTreeMap<String, ClusterPolicy> =
            policies.into_iter().map(|p| (p.key(), p)).collect();
        let mut policies: Vec<ClusterPolicy> = by_key.into_values().collect();
        policies.sort_by(|a, b| a.order().cmp(&b.order()));
        self.cluster_policies = policies;
        self
    }

    /// Sets the nodes; a later one with the same name replaces an earlier one.
    pub fn with_nodes(mut self, nodes: impl IntoIterator<Item = Node>) -> Self {
        let by_name: BTreeMap<String, Node> =
            nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
        self.nodes = by_name.into_values().collect();
        self
    }

    /// Keeps the last readable version of every cluster-scoped object that could not be
    /// read now: for each error in [`Snapshot::broken_cluster`] naming a cluster policy or
    /// Node (`object` = `Kind name`), the object of that kind and name in `previous` (the
    /// snapshot enforced last) replaces whatever this snapshot has under that name. So a
    /// broken edit never opens what the last readable version denied and never stops
    /// anyone else's policy; one that was never readable is left out. Errors that name no
    /// object (`?`) keep nothing: there is nothing to tie them to.
    pub fn keep_readable_cluster_policies(&mut self, previous: &Snapshot) {
        let mut policies: BTreeMap<String, ClusterPolicy> =
            std::mem::take(&mut self.cluster_policies)
                .into_iter()
                .map(|p| (p.key(), p))
                .collect();
        let mut nodes: BTreeMap<String, Node> = std::mem::take(&mut self.nodes)
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect();
        for e in &self.broken_cluster {
            let Some((kind, name)) = e.object.split_once(' ') else {
                continue;
            };
            if name == "?" || name.is_empty() {
                continue;
            }
            if kind == "Node" {
                nodes.remove(name);
                if let Some(n) = previous.nodes.iter().find(|n| n.name == name) {
                    nodes.insert(n.name.clone(), n.clone());
                }
            } else if let Some(kind) = ClusterPolicyKind::from_kind(kind) {
                let key = format!("{}/{name}", kind.short());
                policies.remove(&key);
                if let Some(p) = previous
                    .cluster_policies
                    .iter()
                    .find(|p| p.kind == kind && p.name == name)
                {
                    policies.insert(key, p.clone());
                }
            }
        }
        *self = std::mem::take(self)
            .with_cluster_policies(policies.into_values())
            .with_nodes(nodes.into_values());
    }

    /// Marks the namespaces of `errors` broken (see [`Snapshot::broken`]).
    pub fn with_broken(mut self, errors: impl IntoIterator<Item = (String, ObjectError)>) -> Self {
        for (ns, e) in errors {
            self.broken.entry(ns).or_default().push(e);
        }
        self
    }

    /// Whether namespace `ns` holds an object that could not be read (fail closed).
    pub fn is_broken(&self, ns: &str) -> bool {
        self.broken.contains_key(ns)
    }

    /// Labels of namespace `ns`; a namespace we were not told about has only its name label.
    pub fn namespace_labels(&self, ns: &str) -> Labels {
        match self.namespaces.get(ns) {
            Some(n) => n.labels.clone(),
            None => Namespace::new(ns, Labels::new()).labels,
        }
    }

    /// The pod `namespace/name`.
    pub fn pod(&self, key: &str) -> Option<&Pod> {
        let (ns, name) = key.split_once('/')?;
        self.pods
            .iter()
            .find(|p| p.namespace == ns && p.name == name)
    }

    /// The policy pod (not hostNetwork, not terminated) that owns `ip`, if any.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.pods
            .iter()
            .find(|p| p.is_policy_pod() && p.ips.contains(&ip))
    }

    /// Whether `peer` (of a policy in namespace `policy_ns`) selects `pod` by labels.
    /// ipBlock peers are about addresses, not pods: false here.
    /// Pods of a broken namespace are never selected: we may not know their namespace's
    /// labels, and a rule we could not read must not open anything toward them.
    pub fn peer_selects_pod(&self, peer: &Peer, policy_ns: &str, pod: &Pod) -> bool {
        if !pod.is_policy_pod() || self.is_broken(&pod.namespace) {
            return false;
        }
        match peer {
            Peer::IpBlock(_) => false,
            Peer::Pods { pods, namespaces } => {
                let ns_ok = match namespaces {
                    None => pod.namespace == policy_ns,
                    Some(sel) => sel.matches(&self.namespace_labels(&pod.namespace)),
                };
                ns_ok && pods.matches(&pod.labels)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(json: &str) -> LabelSelector {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn selector_semantics() {
        let l = labels(&[("app", "web"), ("tier", "fe")]);
        assert!(sel("{}").matches(&l));
        assert!(sel(r#"{"matchLabels": null}"#).matches(&Labels::new()));
        assert!(sel(r#"{"matchLabels": {"app": "web"}}"#).matches(&l));
        assert!(!sel(r#"{"matchLabels": {"app": "db"}}"#).matches(&l));
        let e = |op: &str, vals: &str| {
            sel(&format!(
                r#"{{"matchExpressions": [{{"key": "env", "operator": "{op}", "values": {vals}}}]}}"#
            ))
        };
        // NotIn and DoesNotExist match objects lacking the key.
        assert!(e("NotIn", r#"["prod"]"#).matches(&l));
        assert!(e("DoesNotExist", "[]").matches(&l));
        assert!(!e("In", r#"["prod"]"#).matches(&l));
        assert!(!e("Exists", "[]").matches(&l));
        let l2 = labels(&[("env", "prod")]);
        assert!(!e("NotIn", r#"["prod"]"#).matches(&l2));
        assert!(e("In", r#"["dev", "prod"]"#).matches(&l2));
        assert!(e("Exists", "null").matches(&l2));
        // matchLabels AND matchExpressions
        let both = sel(
            r#"{"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["be"]}]}"#,
        );
        assert!(!both.matches(&l));
    }

    fn policy(json: &str) -> Result<NetworkPolicy, FieldError> {
        from_json_value::<NetworkPolicyObject>(serde_json::from_str(json).unwrap())?.into_model()
    }

    #[test]
    fn policy_defaulting() {
        let p =
            policy(r#"{"metadata": {"name": "p"}, "spec": {"podSelector": {}, "egress": [{}]}}"#)
                .unwrap();
        assert_eq!(p.namespace, "default");
        assert_eq!(
            p.policy_types,
            vec![PolicyType::Ingress, PolicyType::Egress]
        );
        let p = policy(
            r#"{"metadata": {"name": "p", "namespace": "x"}, "spec": {"podSelector": {}, "egress": [], "ingress": [{"ports": [{"port": 80}, {"port": "http", "protocol": "UDP"}, {"protocol": "SCTP"}, {"port": 1000, "endPort": 2000}]}]}}"#,
        )
        .unwrap();
        assert_eq!(p.policy_types, vec![PolicyType::Ingress]);
        let ports = &p.ingress[0].ports;
        assert_eq!(ports[0].protocol, Protocol::Tcp);
        assert_eq!(ports[0].port, Some(Port::Range(80, 80)));
        assert_eq!(ports[1].port, Some(Port::Named("http".into())));
        assert_eq!(ports[1].protocol, Protocol::Udp);
        assert_eq!(ports[2].port, None);
        assert_eq!(ports[3].port, Some(Port::Range(1000, 2000)));
    }

    #[test]
    fn peers_and_ipblocks() {
        let p = policy(
            r#"{"metadata": {"name": "p", "namespace": "x"}, "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "10.244.1.7/4", "except": ["10.244.1.8/32"]}}, {"podSelector": {}}, {"namespaceSelector": {}, "podSelector": {"matchLabels": {"a": "b"}}}]}]}}"#,
        )
        .unwrap();
        let peers = &p.egress[0].peers;
        match &peers[0] {
            Peer::IpBlock(b) => {
                assert_eq!(b.cidr.to_string(), "0.0.0.0/4");
                assert!(b.contains("10.244.1.7".parse().unwrap()));
                assert!(!b.contains("10.244.1.8".parse().unwrap()));
                assert!(!b.contains("::1".parse().unwrap()));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            &peers[1],
            Peer::Pods {
                namespaces: None,
                ..
            }
        ));
        assert!(matches!(
            &peers[2],
            Peer::Pods {
                namespaces: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            (
                r#"{"metadata": {"name": "p"}, "spec": {"ingress": [{"from": [{}]}]}}"#,
                "spec.ingress[0].from[0]",
            ),
            (
                r#"{"metadata": {"name": "p"}, "spec": {"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]}}"#,
                "spec.ingress[0].from[0].ipBlock.except[0]",
            ),
            (
                r#"{"metadata": {"name": "p"}, "spec": {"egress": [{"ports": [{"port": 80, "endPort": 79}]}]}}"#,
                "spec.egress[0].ports[0].endPort",
            ),
            (
                r#"{"metadata": {"name": "p"}, "spec": {"egress": [{"ports": [{"port": 70000}]}]}}"#,
                "spec.egress[0].ports[0].port",
            ),
            (
                r#"{"metadata": {"name": "p"}, "spec": {"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}}"#,
                "spec.podSelector.matchExpressions[0].values",
            ),
            (
                r#"{"metadata": {"name": "p"}, "spec": {"egress": [{"ports": [{"protocol": "ICMP"}]}]}}"#,
                "spec.egress[0].ports[0].protocol",
            ),
        ];
        for (json, field) in cases {
            let e = policy(json).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
        }
    }

    #[test]
    fn in_and_notin_values_are_a_set() {
        // 100k values (every one twice): a Vec::contains per label lookup made matching
        // 100k label sets cost 1e10 comparisons.
        let values: Vec<String> = (0..100_000).map(|i| format!("v{}", i % 50_000)).collect();
        let s = sel(&serde_json::json!({"matchExpressions": [
            {"key": "env", "operator": "In", "values": values},
            {"key": "tier", "operator": "NotIn", "values": values}]})
        .to_string());
        assert_eq!(s.match_expressions[0].values.len(), 50_000);
        let hits = (0..100_000)
            .filter(|i| s.matches(&labels(&[("env", &format!("v{i}")), ("tier", "x")])))
            .count();
        assert_eq!(hits, 50_000);
        assert!(!s.matches(&labels(&[("env", "v1"), ("tier", "v2")])));
        let small = sel(
            r#"{"matchExpressions": [{"key": "a", "operator": "In", "values": ["z", "b", "z"]}]}"#,
        );
        assert_eq!(small.to_string(), "{a in (b,z)}");
    }

    #[test]
    fn repeated_peers_and_ports_are_kept_once() {
        // 55k copies of one peer and 50k of one port (one 1.5 MB object) are one peer and
        // one port after conversion; distinct ones keep their first-occurrence order.
        let mut from = vec![serde_json::json!({"namespaceSelector": {}}); 55_000];
        from.push(serde_json::json!({"ipBlock": {"cidr": "10.0.0.1/8"}}));
        from.push(serde_json::json!({"namespaceSelector": {}, "podSelector": {}}));
        from.push(serde_json::json!({"ipBlock": {"cidr": "10.0.0.0/8"}}));
        let mut ports = vec![serde_json::json!({"port": "http"}); 50_000];
        ports.push(serde_json::json!({"port": 80}));
        ports.push(serde_json::json!({"port": 80, "protocol": "TCP", "endPort": 80}));
        ports.push(serde_json::json!({"port": "http", "protocol": "UDP"}));
        let p = policy(
            &serde_json::json!({"metadata": {"name": "p"}, "spec": {"ingress": [{"from": from, "ports": ports}]}})
                .to_string(),
        )
        .unwrap();
        let r = &p.ingress[0];
        assert_eq!(r.peers.len(), 2, "{:?}", r.peers);
        assert!(matches!(r.peers[0], Peer::Pods { .. }));
        assert!(matches!(r.peers[1], Peer::IpBlock(_)));
        assert_eq!(r.ports.len(), 3, "{:?}", r.ports);
        assert_eq!(r.ports[0].port, Some(Port::Named("http".into())));
        assert_eq!(r.ports[1].port, Some(Port::Range(80, 80)));
        assert_eq!(r.ports[2].protocol, Protocol::Udp);
    }

    #[test]
    fn pod_ips_are_deduplicated_in_linear_time() {
        // 40k podIPs, each twice: quadratic with Vec::contains (8e8 comparisons).
        let ips: Vec<serde_json::Value> = (0..80_000u32)
            .map(|i| serde_json::json!({"ip": std::net::Ipv4Addr::from(0x0a00_0000 + i % 40_000).to_string()}))
            .collect();
        let v = serde_json::json!({"metadata": {"name": "a"},
            "status": {"podIP": "10.0.0.7", "podIPs": ips}});
        let p = from_json_value::<PodObject>(v)
            .unwrap()
            .into_model()
            .unwrap();
        assert_eq!(p.ips.len(), 40_000);
        assert_eq!(p.ips[0], "10.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(p.ips[7], "10.0.0.7".parse::<IpAddr>().unwrap());
        let v = serde_json::json!({"metadata": {"name": "a"},
            "status": {"podIP": "fd00::1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.1"}]}});
        let p = from_json_value::<PodObject>(v)
            .unwrap()
            .into_model()
            .unwrap();
        let want: Vec<IpAddr> = vec!["fd00::1".parse().unwrap(), "10.0.0.1".parse().unwrap()];
        assert_eq!(p.ips, want);
    }

    #[test]
    fn pod_wire() {
        let v = serde_json::json!({
            "metadata": {"name": "a", "namespace": "x", "labels": {"pod": "a"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}
        });
        let p = from_json_value::<PodObject>(v)
            .unwrap()
            .into_model()
            .unwrap();
        assert_eq!(p.ips.len(), 2);
        assert_eq!(p.named_port("http", Protocol::Tcp), Some(8080));
        assert_eq!(p.named_port("http", Protocol::Udp), None);
        assert_eq!(p.node.as_deref(), Some("n1"));
        let v = serde_json::json!({"metadata": {"name": "a"}, "status": {"podIP": ""}});
        let p = from_json_value::<PodObject>(v)
            .unwrap()
            .into_model()
            .unwrap();
        assert!(p.ips.is_empty());
        // `status.podIP` (spelled so, not podIp) alone is the pod's address.
        let v = serde_json::json!({"metadata": {"name": "a"}, "status": {"podIP": "10.0.0.9"}});
        let p = from_json_value::<PodObject>(v)
            .unwrap()
            .into_model()
            .unwrap();
        assert_eq!(p.ips, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn names_and_labels_are_validated_as_the_api_server_does() {
        let l60 = ["a".repeat(60), "b".repeat(60), "c".repeat(60)].join(".");
        let ok = |meta: &str| policy(&format!(r#"{{"metadata": {meta}, "spec": {{}}}}"#));
        assert!(ok(&format!(
            r#"{{"name": "{l60}", "namespace": "{}"}}"#,
            "n".repeat(63)
        ))
        .is_ok());
        let max = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        assert_eq!(max.len(), 253);
        assert!(ok(&format!(r#"{{"name": "{max}"}}"#)).is_ok());
        let err = |meta: &str| ok(meta).unwrap_err();
        let e = err(&format!(r#"{{"name": "{max}x"}}"#));
        assert_eq!(e.field, "metadata.name");
        for bad in ["Web", "a_b", "-a", "a-", "a..b", ".a", "é", "a\"b", "a/b"] {
            let e = err(&format!(r#"{{"name": {bad:?}}}"#));
            assert_eq!(e.field, "metadata.name", "{bad}");
            assert!(e.message.contains(&format!("{bad:?}")), "{e}");
        }
        let e = err(&format!(
            r#"{{"name": "p", "namespace": "{}"}}"#,
            "n".repeat(64)
        ));
        assert_eq!(e.field, "metadata.namespace");
        let e = err(r#"{"name": "p", "namespace": "a.b"}"#);
        assert_eq!(e.field, "metadata.namespace");
        // Label keys and values, on objects and in selectors.
        for (k, v, key_ok, value_ok) in [
            ("app", "", true, true),
            ("example.com/App_1.x", "V-1_x.y", true, true),
            (
                &*format!("{}/{}", max, "k".repeat(63)),
                &*"v".repeat(63),
                true,
                true,
            ),
            (&*"k".repeat(64), "v", false, true),
            ("app", &*"v".repeat(64), true, false),
            ("/app", "v", false, true),
            ("a/b/c", "v", false, true),
            ("Example.com/app", "v", false, true),
            ("app", "-v", true, false),
            ("app", "v\"", true, false),
            ("", "v", false, true),
        ] {
            let good = key_ok && value_ok;
            let meta = format!(r#"{{"name": "p", "labels": {{{k:?}: {v:?}}}}}"#);
            assert_eq!(ok(&meta).is_ok(), good, "{k} {v}");
            let sel = format!(
                r#"{{"metadata": {{"name": "p"}}, "spec": {{"podSelector": {{"matchLabels": {{{k:?}: {v:?}}}}}}}}}"#
            );
            let r = policy(&sel);
            assert_eq!(r.is_ok(), good, "{k} {v}");
            if let Err(e) = r {
                assert!(e.field.starts_with("spec.podSelector.matchLabels"), "{e}");
            }
            let expr = format!(
                r#"{{"metadata": {{"name": "p"}}, "spec": {{"ingress": [{{"from": [{{"namespaceSelector": {{"matchExpressions": [{{"key": {k:?}, "operator": "In", "values": [{v:?}]}}]}}}}]}}]}}}}"#
            );
            // matchExpressions values are not checked (see LabelSelector::validate).
            let r = policy(&expr);
            assert_eq!(r.is_ok(), key_ok, "{k} {v}");
            if let Err(e) = r {
                assert!(
                    e.field.starts_with(
                        "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0]"
                    ),
                    "{e}"
                );
            }
        }
        // Namespaces and pods.
        let ns = |name: &str| {
            from_json_value::<NamespaceObject>(serde_json::json!({"metadata": {"name": name}}))
                .unwrap()
                .into_model()
        };
        assert!(ns(&"n".repeat(63)).is_ok());
        assert_eq!(ns(&"n".repeat(64)).unwrap_err().field, "metadata.name");
        assert_eq!(ns("a.b").unwrap_err().field, "metadata.name");
        let pod = |v: serde_json::Value| from_json_value::<PodObject>(v).unwrap().into_model();
        assert!(pod(serde_json::json!({"metadata": {"name": max}})).is_ok());
        let e = pod(serde_json::json!({"metadata": {"name": "p", "labels": {"a": "b c"}}}))
            .unwrap_err();
        assert_eq!(e.field, "metadata.labels[a]");
        let e = pod(serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"ports": [{"containerPort": 80, "name": "http"}, {"containerPort": 81, "name": "HTTP"}]}
        ]}}))
        .unwrap_err();
        assert_eq!(e.field, "spec.containers[0].ports[1].name");
        // A huge value is shown cut.
        let e = ns(&"x".repeat(1 << 20)).unwrap_err();
        assert!(e.to_string().len() < 300, "{e}");
    }

    #[test]
    fn cidrs_are_read_like_the_api_server() {
        let net = |s: &str| parse_cidr_sloppy(s).map(|n| n.to_string());
        // Host bits set: masked. Leading zeros in IPv4 octets and prefix: decimal.
        assert_eq!(net("10.0.0.1/24").as_deref(), Some("10.0.0.0/24"));
        assert_eq!(net("010.001.0.9/016").as_deref(), Some("10.1.0.0/16"));
        assert_eq!(net("0000255.0.0.0/8").as_deref(), Some("255.0.0.0/8"));
        assert_eq!(net("fd00::1/64").as_deref(), Some("fd00::/64"));
        assert_eq!(net("0.0.0.0/0").as_deref(), Some("0.0.0.0/0"));
        // What the API server refuses too.
        for bad in [
            "not-a-cidr",
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/",
            "256.0.0.0/8",
            "10.0.0/8",
            "10.0.0.0.0/8",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "fd00::/129",
            "0x0a.0.0.0/8",
            "1.2.3.4/8/8",
            "fe80::1%eth0/64",
        ] {
            assert_eq!(net(bad), None, "{bad}");
        }
        // In a policy: cidr and except both, and the error names field and value.
        let p = policy(
            r#"{"metadata": {"name": "p"}, "spec": {"ingress": [{"from": [{"ipBlock": {"cidr": "010.0.0.1/8", "except": ["010.1.0.0/16"]}}]}]}}"#,
        )
        .unwrap();
        match &p.ingress[0].peers[0] {
            Peer::IpBlock(b) => {
                assert_eq!(b.cidr.to_string(), "10.0.0.0/8");
                assert_eq!(b.except[0].to_string(), "10.1.0.0/16");
            }
            other => panic!("{other:?}"),
        }
        let e = policy(
            r#"{"metadata": {"name": "p"}, "spec": {"ingress": [{"from": [{"ipBlock": {"cidr": "not-a-cidr"}}]}]}}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.ingress[0].from[0].ipBlock.cidr");
        assert_eq!(e.message, r#""not-a-cidr" is not a CIDR"#);
    }

    fn pod(key: &str, ip: &str, terminating: bool) -> Pod {
        let (ns, name) = key.split_once('/').unwrap();
        let v = serde_json::json!({"metadata": {"name": name, "namespace": ns,
            "deletionTimestamp": if terminating { serde_json::json!("2026-12-02T00:00:00Z") } else { serde_json::Value::Null }},
            "status": {"podIP": ip}});
        from_json_value::<PodObject>(v)
            .unwrap()
            .into_model()
            .unwrap()
    }

    #[test]
    fn an_address_has_at_most_one_owner() {
        assert!(pod("a/p", "10.0.0.1", true).terminating);
        assert!(!pod("a/p", "10.0.0.1", false).terminating);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let owner = |pods: Vec<Pod>, addr: &str| {
            let s = Snapshot::new(vec![], pods, vec![]);
            s.pod_by_ip(ip(addr)).map(|p| p.key())
        };
        // A terminating pod's address handed to a new pod: the new pod owns it, whatever
        // the names' order.
        for (old, new) in [("a/p1", "b/p2"), ("b/p2", "a/p1")] {
            let s = Snapshot::new(
                vec![],
                vec![pod(old, "10.0.0.1", true), pod(new, "10.0.0.1", false)],
                vec![],
            );
            assert_eq!(s.pod_by_ip(ip("10.0.0.1")).unwrap().key(), new);
            assert!(s.pod(old).unwrap().ips.is_empty(), "{s:?}");
            assert_eq!(s.pod(new).unwrap().ips, vec![ip("10.0.0.1")]);
        }
        // A terminating pod alone keeps its address (it still runs until it is gone).
        assert_eq!(
            owner(vec![pod("a/p1", "10.0.0.1", true)], "10.0.0.1").as_deref(),
            Some("a/p1")
        );
        // Two live pods, or two terminating ones (and no live one): nobody.
        assert_eq!(
            owner(
                vec![
                    pod("a/p1", "10.0.0.1", false),
                    pod("b/p2", "10.0.0.1", false)
                ],
                "10.0.0.1"
            ),
            None
        );
        assert_eq!(
            owner(
                vec![
                    pod("a/p1", "10.0.0.1", true),
                    pod("b/p2", "10.0.0.1", true),
                    pod("c/p3", "10.0.0.2", false)
                ],
                "10.0.0.1"
            ),
            None
        );
        // Two live and one terminating: nobody, and every claimant loses it.
        let mut pods = vec![
            pod("a/p1", "10.0.0.1", false),
            pod("b/p2", "10.0.0.1", false),
            pod("c/p3", "10.0.0.1", true),
        ];
        let c = resolve_addresses(&mut pods);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].pods, ["a/p1", "b/p2"]);
        assert!(pods.iter().all(|p| p.ips.is_empty()));
        // Pods that take no part in policy claim nothing: a Succeeded pod or a
        // hostNetwork pod does not take a live pod's address away.
        let mut done = pod("a/p1", "10.0.0.1", false);
        done.phase = Some("Succeeded".into());
        let mut host = pod("a/h", "10.0.0.1", false);
        host.host_network = true;
        assert_eq!(
            owner(vec![done, host, pod("b/p2", "10.0.0.1", false)], "10.0.0.1").as_deref(),
            Some("b/p2")
        );
        // Dual-stack: only the contested address is taken away.
        let mut two = pod("a/p1", "10.0.0.1", false);
        two.ips.push(ip("fd00::1"));
        let s = Snapshot::new(vec![], vec![two, pod("b/p2", "fd00::1", false)], vec![]);
        assert_eq!(s.pod("a/p1").unwrap().ips, vec![ip("10.0.0.1")]);
        assert!(s.pod_by_ip(ip("fd00::1")).is_none());
    }

    #[test]
    fn pods_of_broken_namespaces_are_never_peers() {
        let s = Snapshot::new(
            vec![Namespace::new("a", Labels::new())],
            vec![
                pod("a/p1", "10.0.0.1", false),
                pod("b/p2", "10.0.0.2", false),
            ],
            vec![],
        )
        .with_broken([("b".to_string(), ObjectError::default())]);
        // Even selectors that match a namespace lacking a label (NotIn, DoesNotExist), and
        // the empty selector: b's labels may be unknown.
        for ns_sel in [
            "{}",
            r#"{"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}"#,
            r#"{"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["x"]}]}"#,
        ] {
            let peer = Peer::Pods {
                pods: LabelSelector::default(),
                namespaces: Some(sel(ns_sel)),
            };
            assert!(s.peer_selects_pod(&peer, "a", s.pod("a/p1").unwrap()));
            assert!(
                !s.peer_selects_pod(&peer, "a", s.pod("b/p2").unwrap()),
                "{ns_sel}"
            );
        }
        let own = Peer::Pods {
            pods: LabelSelector::default(),
            namespaces: None,
        };
        assert!(!s.peer_selects_pod(&own, "b", s.pod("b/p2").unwrap()));
        assert!(s.is_broken("b") && !s.is_broken("a"));
    }

    #[test]
    fn broken_cluster_policies_keep_their_last_readable_version() {
        let cnp = |name: &str, priority: u16| {
            cluster::cluster_policy_from_value(serde_json::json!({
                "apiVersion": cluster::CNP_API_VERSION, "kind": "ClusterNetworkPolicy",
                "metadata": {"name": name},
                "spec": {"tier": "Admin", "priority": priority, "subject": {"namespaces": {}},
                    "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}}))
            .unwrap()
        };
        let node = |name: &str, ip: &str| Node {
            name: name.into(),
            labels: Labels::new(),
            addresses: vec![ip.parse().unwrap()],
        };
        let broken = |object: &str| ObjectError {
            object: object.into(),
            field: "spec.priority".into(),
            message: "1001 must be between 0 and 1000".into(),
            ..ObjectError::default()
        };
        let previous = Snapshot::default()
            .with_cluster_policies([cnp("deny", 5), cnp("other", 1)])
            .with_nodes([node("n1", "198.18.0.1")]);
        // `deny` broke (and a manifest also has a readable duplicate of it at priority 9),
        // `new` never was readable, `other` was deleted, n1 broke, n2 is new.
        let mut now = Snapshot::default()
            .with_cluster_policies([cnp("deny", 9), cnp("fine", 3)])
            .with_nodes([node("n1", "198.18.0.9"), node("n2", "198.18.0.2")]);
        now.broken_cluster = vec![
            broken("ClusterNetworkPolicy deny"),
            broken("ClusterNetworkPolicy new"),
            broken("AdminNetworkPolicy fine"),
            broken("Node n1"),
            broken("ClusterNetworkPolicy ?"),
        ];
        now.keep_readable_cluster_policies(&previous);
        let keys: Vec<(String, u16)> = now
            .cluster_policies
            .iter()
            .map(|p| (p.key(), p.priority))
            .collect();
        // In evaluation order; `fine` (a CNP) is untouched by an AdminNetworkPolicy's error.
        assert_eq!(
            keys,
            [("cnp/fine".to_string(), 3), ("cnp/deny".to_string(), 5)]
        );
        assert_eq!(
            now.nodes,
            vec![node("n1", "198.18.0.1"), node("n2", "198.18.0.2")]
        );
        assert_eq!(now.broken_cluster.len(), 5, "the errors are still reported");
        // A node never readable is left out; the rest of the snapshot is as it was.
        let mut now = Snapshot::default().with_nodes([node("n2", "198.18.0.2")]);
        now.broken_cluster = vec![broken("Node n3")];
        now.keep_readable_cluster_policies(&Snapshot::default());
        assert_eq!(now.nodes, vec![node("n2", "198.18.0.2")]);
    }

    #[test]
    fn protocols_parse_in_any_case_and_others_are_named_in_the_error() {
        assert_eq!("udp".parse::<Protocol>(), Ok(Protocol::Udp));
        assert_eq!("Sctp".parse::<Protocol>(), Ok(Protocol::Sctp));
        let e = "icmp".parse::<Protocol>().unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"unknown protocol "icmp" (want TCP, UDP or SCTP)"#
        );
    }
}
