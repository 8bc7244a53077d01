//! Cluster-scoped policy (`policy.networking.k8s.io`): ClusterNetworkPolicy (v1alpha2,
//! tiers Admin and Baseline) and its predecessors AdminNetworkPolicy and
//! BaselineAdminNetworkPolicy (v1alpha1), all read into one model, [`ClusterPolicy`].
//!
//! Evaluation order for one pod and one direction: the Admin tier (every ClusterNetworkPolicy
//! of tier Admin and every AdminNetworkPolicy that selects the pod, by [`ClusterPolicy::order`],
//! each policy's rules in the order written), then NetworkPolicy, then the Baseline tier
//! (ClusterNetworkPolicy of tier Baseline, BaselineAdminNetworkPolicy), then the default:
//! allowed. The first rule that matches decides: Accept ends the evaluation of this direction
//! allowed, Deny ends it denied, Pass skips the rest of its tier.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Map, Value};

use super::{
    check_labels, check_name, ferr, from_json_value, is_dns1123_subdomain, shown, FieldError,
    IpBlock, LabelSelector, Labels, ObjectMeta, Peer, Pod, PolicyPort, PolicyType, Port, Protocol,
    SUBDOMAIN,
};

/// The tier of a cluster policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// Before NetworkPolicy: ClusterNetworkPolicy `tier: Admin`, AdminNetworkPolicy.
    Admin,
    /// After NetworkPolicy: ClusterNetworkPolicy `tier: Baseline`, BaselineAdminNetworkPolicy.
    Baseline,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        })
    }
}

/// What a matching rule does. v1alpha1's `Allow` is read as [`Action::Accept`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Allowed in this direction; no later rule of any tier is looked at.
    Accept,
    /// Denied; no later rule of any tier is looked at.
    Deny,
    /// The rest of this tier is skipped; evaluation goes on with the next tier.
    Pass,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Accept => "Accept",
            Action::Deny => "Deny",
            Action::Pass => "Pass",
        })
    }
}

/// The API kind a cluster policy was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClusterPolicyKind {
    ClusterNetworkPolicy,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
}

impl ClusterPolicyKind {
    /// The kind as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterPolicyKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            ClusterPolicyKind::AdminNetworkPolicy => "AdminNetworkPolicy",
            ClusterPolicyKind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
        }
    }

    /// Short name used in keys, chain comments and set names (`kubectl`'s short names).
    pub fn short(self) -> &'static str {
        match self {
            ClusterPolicyKind::ClusterNetworkPolicy => "cnp",
            ClusterPolicyKind::AdminNetworkPolicy => "anp",
            ClusterPolicyKind::BaselineAdminNetworkPolicy => "banp",
        }
    }
}

impl fmt::Display for ClusterPolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The pods a cluster policy applies to (`spec.subject`). hostNetwork pods are never
/// subjects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// Every pod of the namespaces the selector matches.
    Namespaces(LabelSelector),
    /// Pods matching `pods` in namespaces matching `namespaces`.
    Pods {
        namespaces: LabelSelector,
        pods: LabelSelector,
    },
}

impl Subject {
    /// Whether the subject selects `pod`, whose namespace has `ns_labels`.
    pub fn selects(&self, pod: &Pod, ns_labels: &Labels) -> bool {
        pod.is_policy_pod()
            && match self {
                Subject::Namespaces(ns) => ns.matches(ns_labels),
                Subject::Pods { namespaces, pods } => {
                    namespaces.matches(ns_labels) && pods.matches(&pod.labels)
                }
            }
    }
}

/// One ingress or egress rule of a cluster policy. It matches a connection when the peer
/// matches (`any_peer`, or one of `peers`, or, egress only, an address of one of the nodes
/// `nodes` selects) and the port matches (`ports` empty = every port and protocol).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterRule {
    /// `name` as written (may be empty; at most 100 characters).
    pub name: String,
    pub action: Action,
    /// Only for the "fail closed" reading of a Deny or Pass rule with a peer of an unknown
    /// kind (see the API's peer types): the rule is read as Deny of all traffic (every
    /// peer; `peers`, `nodes` and `ports` empty). Never set for a rule as written.
    pub any_peer: bool,
    /// Pod peers as NetworkPolicy peers, always with an explicit namespace selector
    /// (`namespaces: X` = `Peer::Pods { pods: {}, namespaces: Some(X) }`), and networks as
    /// ipBlocks without excepts. An Accept rule's peers of unknown kind are left out (they
    /// match nothing).
    pub peers: Vec<Peer>,
    /// Egress `nodes` peers: the InternalIP and ExternalIP addresses of the matching nodes.
    pub nodes: Vec<LabelSelector>,
    /// As NetworkPolicy ports: `portNumber`/`tcp.destinationPort.number` = a one-port
    /// range, `portRange`/`range` = a range (the CRDs require a port: `tcp: {}` is refused),
    /// a named port (which names no protocol in these APIs) = one entry per protocol (TCP,
    /// UDP, SCTP) with that name. Empty = every port and protocol.
    pub ports: Vec<PolicyPort>,
}

/// A cluster policy after defaulting and validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPolicy {
    pub kind: ClusterPolicyKind,
    /// `metadata.name`.
    pub name: String,
    pub tier: Tier,
    /// 0-1000, lower first. A BaselineAdminNetworkPolicy (which has none) counts as 1000.
    pub priority: u16,
    pub subject: Subject,
    pub ingress: Vec<ClusterRule>,
    pub egress: Vec<ClusterRule>,
}

impl ClusterPolicy {
    /// `<short kind>/<name>`, e.g. `cnp/deny-tenants`: unique in a snapshot.
    pub fn key(&self) -> String {
        format!("{}/{}", self.kind.short(), self.name)
    }

    /// Evaluation order within the tier: priority, then name, then kind (the API leaves
    /// policies of equal priority in an undefined order; this makes it deterministic, as
    /// kube-network-policies does by name).
    pub fn order(&self) -> (Tier, u16, &str, ClusterPolicyKind) {
        (self.tier, self.priority, &self.name, self.kind)
    }

    /// Rules for one direction, in the order written.
    pub fn rules(&self, t: PolicyType) -> &[ClusterRule] {
        match t {
            PolicyType::Ingress => &self.ingress,
            PolicyType::Egress => &self.egress,
        }
    }

    /// Whether the policy applies to `pod` (its subject selects it), whose namespace has
    /// `ns_labels` ([`super::Snapshot::namespace_labels`]).
    pub fn selects(&self, pod: &Pod, ns_labels: &Labels) -> bool {
        self.subject.selects(pod, ns_labels)
    }
}

/// A Node, for egress `nodes` peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub labels: Labels,
    /// `status.addresses` of type InternalIP and ExternalIP (others are not addresses
    /// traffic is judged by).
    pub addresses: Vec<IpAddr>,
}

// ------------------------------------------------------------------ reading the API objects

/// The API group of the cluster policy kinds.
pub const GROUP: &str = "policy.networking.k8s.io";
/// `apiVersion` of ClusterNetworkPolicy.
pub const CNP_API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";
/// `apiVersion` of AdminNetworkPolicy and BaselineAdminNetworkPolicy.
pub const ANP_API_VERSION: &str = "policy.networking.k8s.io/v1alpha1";
/// The only name a BaselineAdminNetworkPolicy may have (the CRD's XValidation).
pub const BANP_NAME: &str = "default";
/// The priority a BaselineAdminNetworkPolicy (which has none) is ordered by.
pub const BANP_PRIORITY: u16 = 1000;

impl ClusterPolicyKind {
    /// The kind named `kind` as the API spells it.
    pub fn from_kind(kind: &str) -> Option<ClusterPolicyKind> {
        [
            ClusterPolicyKind::ClusterNetworkPolicy,
            ClusterPolicyKind::AdminNetworkPolicy,
            ClusterPolicyKind::BaselineAdminNetworkPolicy,
        ]
        .into_iter()
        .find(|k| k.as_str() == kind)
    }

    /// The `apiVersion` twill reads this kind in.
    pub fn api_version(self) -> &'static str {
        match self {
            ClusterPolicyKind::ClusterNetworkPolicy => CNP_API_VERSION,
            _ => ANP_API_VERSION,
        }
    }

    /// The API resource (plural) of this kind.
    pub fn plural(self) -> &'static str {
        match self {
            ClusterPolicyKind::ClusterNetworkPolicy => "clusternetworkpolicies",
            ClusterPolicyKind::AdminNetworkPolicy => "adminnetworkpolicies",
            ClusterPolicyKind::BaselineAdminNetworkPolicy => "baselineadminnetworkpolicies",
        }
    }

    /// The CRD's limits, which differ between v1alpha2 and v1alpha1.
    fn limits(self) -> Limits {
        match self {
            ClusterPolicyKind::ClusterNetworkPolicy => Limits {
                rules: 25,
                peers: 25,
                ports: 25,
            },
            _ => Limits {
                rules: 100,
                peers: 100,
                ports: 100,
            },
        }
    }

    /// The egress peer fields of this kind's CRD (ingress peers are `namespaces` and `pods`
    /// in all of them).
    fn egress_peer_fields(self) -> &'static [&'static str] {
        match self {
            ClusterPolicyKind::BaselineAdminNetworkPolicy => {
                &["namespaces", "pods", "nodes", "networks"]
            }
            _ => &["namespaces", "pods", "nodes", "networks", "domainNames"],
        }
    }
}

/// MaxItems of the CRD's lists: rules per direction, peers per rule, ports per rule.
struct Limits {
    rules: usize,
    peers: usize,
    ports: usize,
}

const INGRESS_PEER_FIELDS: &[&str] = &["namespaces", "pods"];

/// Peer kinds that name no pod, so a named port cannot apply to them (the CRDs' XValidation
/// on egress rules, over the peer fields each kind has).
const NON_POD_PEER_FIELDS: &[&str] = &["nodes", "networks", "domainNames"];

/// Logs `message` about `policy` once per process: parsing runs on every snapshot, and a
/// policy that is read the same way every time needs saying once.
fn warn_once(policy: &str, message: String) {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static WARNED: Mutex<Option<HashSet<(String, String)>>> = Mutex::new(None);
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned
        .get_or_insert_with(HashSet::new)
        .insert((policy.to_string(), message.clone()))
    {
        tracing::warn!(policy, "{message}");
    }
}

/// Deserializes `v` (found at `field`) as `T`, with the failing field's full path.
fn sub<T: serde::de::DeserializeOwned>(v: Value, field: &str) -> Result<T, FieldError> {
    from_json_value(v).map_err(|e| {
        let path = match (field.is_empty(), e.field.is_empty()) {
            (_, true) => field.to_string(),
            (true, false) => e.field,
            (false, false) => format!("{field}.{}", e.field),
        };
        ferr(path, e.message)
    })
}

/// An object (`{...}`) at `field`, without the fields set to null (which Kubernetes reads
/// as absent).
fn object(v: Value, field: &str) -> Result<Map<String, Value>, FieldError> {
    match v {
        Value::Object(m) => Ok(m.into_iter().filter(|(_, v)| !v.is_null()).collect()),
        other => Err(ferr(
            field,
            format!("must be an object, not {}", kind_of(&other)),
        )),
    }
}

/// A list at `field` (null or absent = empty).
fn list(v: Option<Value>, field: &str) -> Result<Vec<Value>, FieldError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(ferr(
            field,
            format!("must be a list, not {}", kind_of(&other)),
        )),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A string field.
fn string(v: Value, field: &str) -> Result<String, FieldError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(ferr(
            field,
            format!("must be a string, not {}", kind_of(&other)),
        )),
    }
}

/// An integer field in `min..=max`.
fn integer(v: Value, field: &str, min: i64, max: i64) -> Result<i64, FieldError> {
    match v.as_i64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        Some(n) => Err(ferr(field, format!("{n} must be between {min} and {max}"))),
        None => Err(ferr(field, format!("{v} is not an integer"))),
    }
}

fn port_number(v: Value, field: &str) -> Result<u16, FieldError> {
    integer(v, field, 1, 65535).map(|n| n as u16)
}

/// The only field of `m`, which must have exactly one (`one_of` lists them, for the
/// error when there are none).
fn only_field(
    m: Map<String, Value>,
    field: &str,
    one_of: &str,
) -> Result<(String, Value), FieldError> {
    if m.len() > 1 {
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        return Err(ferr(
            field,
            format!("must set exactly one field, not {}", keys.join(", ")),
        ));
    }
    m.into_iter()
        .next()
        .ok_or_else(|| ferr(field, format!("must set one of {one_of}")))
}

/// A list with `min..=max` items (the CRD's MinItems/MaxItems).
fn bounded(
    items: Vec<Value>,
    field: &str,
    min: usize,
    max: usize,
) -> Result<Vec<Value>, FieldError> {
    if items.len() < min {
        return Err(ferr(field, format!("must have at least {min} item(s)")));
    }
    if items.len() > max {
        return Err(ferr(
            field,
            format!("has {} items, at most {max} are allowed", items.len()),
        ));
    }
    Ok(items)
}

fn selector(v: Value, field: &str) -> Result<LabelSelector, FieldError> {
    let s: LabelSelector = sub(v, field)?;
    s.validate(field)?;
    Ok(s)
}

/// `pods` of a subject or peer (`NamespacedPod`): `podSelector` required, and in v1alpha1
/// `namespaceSelector` too (v1alpha2 defaults it to all namespaces).
fn namespaced_pod(
    v: Value,
    field: &str,
    kind: ClusterPolicyKind,
) -> Result<(LabelSelector, LabelSelector), FieldError> {
    let mut m = object(v, field)?;
    let namespaces = match m.remove("namespaceSelector") {
        Some(v) => selector(v, &format!("{field}.namespaceSelector"))?,
        None if kind == ClusterPolicyKind::ClusterNetworkPolicy => LabelSelector::default(),
        None => return Err(ferr(format!("{field}.namespaceSelector"), "required")),
    };
    let pods = match m.remove("podSelector") {
        Some(v) => selector(v, &format!("{field}.podSelector"))?,
        None => return Err(ferr(format!("{field}.podSelector"), "required")),
    };
    Ok((namespaces, pods))
}

/// A CIDR as the CRD's `isCIDR` (Go's `netip.ParsePrefix`) takes it: an address in its
/// usual form (no leading zeros in IPv4 fields, no IPv6 zone), `/`, and a decimal prefix
/// length without leading zeros; at most 43 characters. Host bits may be set and are
/// masked, as kube-network-policies (`net.ParseCIDR`) reads it.
pub fn parse_cidr_strict(s: &str) -> Option<IpNet> {
    if s.len() > 43 {
        return None;
    }
    let (addr, len) = s.split_once('/')?;
    let len_ok = !len.is_empty()
        && len.bytes().all(|b| b.is_ascii_digit())
        && (len == "0" || !len.starts_with('0'));
    if !len_ok {
        return None;
    }
    let ip: IpAddr = addr.parse().ok()?;
    IpNet::new(ip, len.parse().ok()?).ok().map(|n| n.trunc())
}

/// A domain name as the CRD's pattern allows it:
/// `^(\*\.)?([a-zA-z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.)+[a-zA-z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.?$`
/// (`A-z` as written there, which also takes `[ \ ] ^ _` and the backtick as a label's
/// first character): an optional `*.` prefix, at least two labels, an optional final dot.
pub fn is_domain_name(s: &str) -> bool {
    let s = s.strip_prefix("*.").unwrap_or(s);
    let s = s.strip_suffix('.').unwrap_or(s);
    let first_ok = |b: u8| (b'A'..=b'z').contains(&b) || b.is_ascii_digit();
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        match b {
            [] => false,
            [c] => first_ok(*c),
            [c, mid @ .., last] => {
                first_ok(*c)
                    && mid
                        .iter()
                        .all(|m| m.is_ascii_alphanumeric() || matches!(m, b'-' | b'_'))
                    && last.is_ascii_alphanumeric()
            }
        }
    };
    let labels: Vec<&str> = s.split('.').collect();
    labels.len() >= 2 && labels.iter().all(|l| label_ok(l))
}

/// What one peer adds to its rule.
enum PeerRead {
    Peers(Vec<Peer>),
    Nodes(LabelSelector),
    /// A peer that matches nothing here (domainNames).
    Nothing,
    /// A field this version of twill does not know: the rule fails closed.
    Unknown(String),
}

fn read_peer(
    v: Value,
    field: &str,
    kind: ClusterPolicyKind,
    known: &[&str],
) -> Result<PeerRead, FieldError> {
    let m = object(v, field)?;
    let (key, v) = only_field(m, field, &known.join(", "))?;
    if !known.contains(&key.as_str()) {
        return Ok(PeerRead::Unknown(key));
    }
    let f = format!("{field}.{key}");
    Ok(match key.as_str() {
        "namespaces" => PeerRead::Peers(vec![Peer::Pods {
            pods: LabelSelector::default(),
            namespaces: Some(selector(v, &f)?),
        }]),
        "pods" => {
            let (namespaces, pods) = namespaced_pod(v, &f, kind)?;
            PeerRead::Peers(vec![Peer::Pods {
                pods,
                namespaces: Some(namespaces),
            }])
        }
        "nodes" => PeerRead::Nodes(selector(v, &f)?),
        "networks" => {
            let items = bounded(list(Some(v), &f)?, &f, 1, 25)?;
            let mut seen = std::collections::HashSet::new();
            let mut peers = Vec::new();
            for (i, c) in items.into_iter().enumerate() {
                let cf = format!("{f}[{i}]");
                let s = string(c, &cf)?;
                let net = parse_cidr_strict(&s).ok_or_else(|| {
                    ferr(
                        &cf,
                        format!(
                            "{} is not a CIDR (address/prefix length, at most 43 characters)",
                            shown(&s)
                        ),
                    )
                })?;
                if !seen.insert(s.clone()) {
                    return Err(ferr(cf, format!("duplicate value {}", shown(&s))));
                }
                peers.push(Peer::IpBlock(IpBlock {
                    cidr: net,
                    except: Vec::new(),
                }));
            }
            PeerRead::Peers(peers)
        }
        "domainNames" => {
            let items = bounded(list(Some(v), &f)?, &f, 1, 25)?;
            let mut seen = std::collections::HashSet::new();
            for (i, d) in items.into_iter().enumerate() {
                let df = format!("{f}[{i}]");
                let s = string(d, &df)?;
                if !is_domain_name(&s) {
                    return Err(ferr(
                        df,
                        format!(
                            "{} is not a domain name (labels of A-Z, a-z, 0-9, '-', '_', an optional \"*.\" prefix)",
                            shown(&s)
                        ),
                    ));
                }
                if !seen.insert(s.clone()) {
                    return Err(ferr(df, format!("duplicate value {}", shown(&s))));
                }
            }
            PeerRead::Nothing
        }
        _ => unreachable!("every known peer field is handled above"),
    })
}

/// One `protocols` (v1alpha2) entry as policy ports.
fn read_protocol(v: Value, field: &str) -> Result<(Vec<PolicyPort>, bool), FieldError> {
    let m = object(v, field)?;
    let (key, v) = only_field(m, field, "tcp, udp, sctp, destinationNamedPort")?;
    let f = format!("{field}.{key}");
    let protocol = match key.as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        "destinationNamedPort" => return Ok((named_port(v, &f)?, true)),
        other => {
            return Err(ferr(
                field,
                format!(
                    "unknown field {} (want one of tcp, udp, sctp, destinationNamedPort)",
                    shown(other)
                ),
            ))
        }
    };
    let mut m = object(v, &f)?;
    let dp = m
        .remove("destinationPort")
        .ok_or_else(|| ferr(format!("{f}.destinationPort"), "required"))?;
    let df = format!("{f}.destinationPort");
    let (key, v) = only_field(object(dp, &df)?, &df, "number, range")?;
    let port = match key.as_str() {
        "number" => {
            let n = port_number(v, &format!("{df}.number"))?;
            Port::Range(n, n)
        }
        "range" => {
            let rf = format!("{df}.range");
            let (start, end) = port_range(v, &rf)?;
            if start >= end {
                return Err(ferr(
                    format!("{rf}.end"),
                    format!("{end} must be greater than start {start}"),
                ));
            }
            Port::Range(start, end)
        }
        other => {
            return Err(ferr(
                df,
                format!("unknown field {} (want number or range)", shown(other)),
            ))
        }
    };
    Ok((
        vec![PolicyPort {
            protocol,
            port: Some(port),
        }],
        false,
    ))
}

/// `start` and `end` of a port range, each required and 1-65535.
fn port_range(v: Value, field: &str) -> Result<(u16, u16), FieldError> {
    let mut m = object(v, field)?;
    let mut get = |k: &str| {
        let f = format!("{field}.{k}");
        m.remove(k)
            .ok_or_else(|| ferr(&f, "required"))
            .and_then(|v| port_number(v, &f))
    };
    Ok((get("start")?, get("end")?))
}

/// `protocol` of a v1alpha1 port (default TCP).
fn protocol_v1alpha1(m: &mut Map<String, Value>, field: &str) -> Result<Protocol, FieldError> {
    let f = format!("{field}.protocol");
    match m.remove("protocol") {
        None => Ok(Protocol::Tcp),
        Some(v) => match string(v, &f)?.as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(ferr(
                f,
                format!("{} is not one of TCP, UDP, SCTP", shown(other)),
            )),
        },
    }
}

/// One `ports` (v1alpha1) entry as policy ports.
fn read_port_v1alpha1(v: Value, field: &str) -> Result<(Vec<PolicyPort>, bool), FieldError> {
    let m = object(v, field)?;
    let (key, v) = only_field(m, field, "portNumber, namedPort, portRange")?;
    let f = format!("{field}.{key}");
    match key.as_str() {
        "portNumber" => {
            let mut m = object(v, &f)?;
            let protocol = protocol_v1alpha1(&mut m, &f)?;
            let pf = format!("{f}.port");
            let n = port_number(m.remove("port").ok_or_else(|| ferr(&pf, "required"))?, &pf)?;
            Ok((
                vec![PolicyPort {
                    protocol,
                    port: Some(Port::Range(n, n)),
                }],
                false,
            ))
        }
        "portRange" => {
            let mut m = object(v, &f)?;
            let protocol = protocol_v1alpha1(&mut m, &f)?;
            let (start, end) = port_range(Value::Object(m), &f)?;
            // The v1alpha1 CRD does not check the order (its docs say start < end); an
            // empty range would match nothing, and is refused rather than guessed at.
            if start > end {
                return Err(ferr(
                    format!("{f}.end"),
                    format!("{end} must not be less than start {start}"),
                ));
            }
            Ok((
                vec![PolicyPort {
                    protocol,
                    port: Some(Port::Range(start, end)),
                }],
                false,
            ))
        }
        "namedPort" => Ok((named_port(v, &f)?, true)),
        other => Err(ferr(
            field,
            format!(
                "unknown field {} (want one of portNumber, namedPort, portRange)",
                shown(other)
            ),
        )),
    }
}

/// A named port, which names no protocol: one policy port per protocol. The CRDs do not
/// check the name; one that no container port can have (see [`super::Pod::named_port`])
/// matches nothing. Empty is refused: it names nothing.
fn named_port(v: Value, field: &str) -> Result<Vec<PolicyPort>, FieldError> {
    let name = string(v, field)?;
    if name.is_empty() {
        return Err(ferr(field, "must not be empty"));
    }
    Ok(Protocol::ALL
        .into_iter()
        .map(|protocol| PolicyPort {
            protocol,
            port: Some(Port::Named(name.clone())),
        })
        .collect())
}

/// `Accept` (v1alpha2) / `Allow` (v1alpha1), `Deny`, and `Pass` where the kind has it.
fn read_action(
    v: Option<Value>,
    field: &str,
    kind: ClusterPolicyKind,
) -> Result<Action, FieldError> {
    let s = string(v.ok_or_else(|| ferr(field, "required"))?, field)?;
    let (accept, allowed) = match kind {
        ClusterPolicyKind::ClusterNetworkPolicy => ("Accept", "Accept, Deny, Pass"),
        ClusterPolicyKind::AdminNetworkPolicy => ("Allow", "Allow, Deny, Pass"),
        ClusterPolicyKind::BaselineAdminNetworkPolicy => ("Allow", "Allow, Deny"),
    };
    match s.as_str() {
        a if a == accept => Ok(Action::Accept),
        "Deny" => Ok(Action::Deny),
        "Pass" if kind != ClusterPolicyKind::BaselineAdminNetworkPolicy => Ok(Action::Pass),
        other => Err(ferr(
            field,
            format!("{} is not one of {allowed}", shown(other)),
        )),
    }
}

fn read_rule(
    v: Value,
    field: &str,
    kind: ClusterPolicyKind,
    dir: PolicyType,
    key: &str,
) -> Result<ClusterRule, FieldError> {
    let limits = kind.limits();
    let mut m = object(v, field)?;
    let name = match m.remove("name") {
        None => String::new(),
        Some(v) => string(v, &format!("{field}.name"))?,
    };
    if name.chars().count() > 100 {
        return Err(ferr(
            format!("{field}.name"),
            format!("{} is longer than 100 characters", shown(&name)),
        ));
    }
    let action = read_action(m.remove("action"), &format!("{field}.action"), kind)?;
    let (peer_key, known) = match dir {
        PolicyType::Ingress => ("from", INGRESS_PEER_FIELDS),
        PolicyType::Egress => ("to", kind.egress_peer_fields()),
    };
    let pf = format!("{field}.{peer_key}");
    let peer_values = match m.remove(peer_key) {
        None => return Err(ferr(pf, "required")),
        v => bounded(list(v, &pf)?, &pf, 1, limits.peers)?,
    };
    let (ports_key, ports) = match kind {
        ClusterPolicyKind::ClusterNetworkPolicy => ("protocols", m.remove("protocols")),
        _ => ("ports", m.remove("ports")),
    };
    let mut rule = ClusterRule {
        name,
        action,
        any_peer: false,
        peers: Vec::new(),
        nodes: Vec::new(),
        ports: Vec::new(),
    };
    let mut non_pod_peer = None;
    let mut unknown = Vec::new();
    for (i, p) in peer_values.into_iter().enumerate() {
        let f = format!("{pf}[{i}]");
        if let Value::Object(o) = &p {
            let set = |k: &&&str| known.contains(*k) && o.get(**k).is_some_and(|v| !v.is_null());
            if let Some(k) = NON_POD_PEER_FIELDS.iter().find(set) {
                non_pod_peer.get_or_insert(format!("{f}.{k}"));
            }
        }
        match read_peer(p, &f, kind, known)? {
            PeerRead::Peers(p) => rule.peers.extend(p),
            PeerRead::Nodes(s) => rule.nodes.push(s),
            PeerRead::Nothing => warn_once(
                key,
                format!("{f}.domainNames: domain name peers are not enforced by twill; this peer matches nothing"),
            ),
            PeerRead::Unknown(k) => unknown.push(format!("{f}.{k}")),
        }
    }
    let pf = format!("{field}.{ports_key}");
    if let Some(v) = ports.filter(|v| !v.is_null()) {
        let items = bounded(list(Some(v), &pf)?, &pf, 1, limits.ports)?;
        for (i, p) in items.into_iter().enumerate() {
            let f = format!("{pf}[{i}]");
            let (ports, named) = match kind {
                ClusterPolicyKind::ClusterNetworkPolicy => read_protocol(p, &f)?,
                _ => read_port_v1alpha1(p, &f)?,
            };
            if let (true, Some(peer)) = (named, &non_pod_peer) {
                return Err(ferr(
                    f,
                    format!("a named port cannot be used with {peer}: only pods have named ports"),
                ));
            }
            rule.ports.extend(ports);
        }
    }
    if !unknown.is_empty() {
        let what = unknown.join(", ");
        // The upstream API's "fail closed" reading of a peer of a kind this version does
        // not know: an Accept rule holding one matches no traffic at all (its known peers
        // included), and a Deny or Pass rule holding one is read as "Deny all" (every peer,
        // every port).
        if action == Action::Accept {
            warn_once(
                key,
                format!("{what}: unknown peer field; this {action} rule matches nothing"),
            );
            rule.peers.clear();
            rule.nodes.clear();
        } else {
            warn_once(
                key,
                format!(
                    "{what}: unknown peer field; this {action} rule is read as Deny of all traffic"
                ),
            );
            rule.action = Action::Deny;
            rule.any_peer = true;
            rule.peers.clear();
            rule.nodes.clear();
            rule.ports.clear();
        }
    }
    rule.peers = super::dedup_keep_first(rule.peers);
    rule.nodes = super::dedup_keep_first(rule.nodes);
    rule.ports = super::dedup_keep_first(rule.ports);
    Ok(rule)
}

fn read_subject(v: Option<Value>, kind: ClusterPolicyKind) -> Result<Subject, FieldError> {
    let field = "spec.subject";
    let m = object(v.ok_or_else(|| ferr(field, "required"))?, field)?;
    let (key, v) = only_field(m, field, "namespaces, pods")?;
    let f = format!("{field}.{key}");
    match key.as_str() {
        "namespaces" => Ok(Subject::Namespaces(selector(v, &f)?)),
        "pods" => {
            let (namespaces, pods) = namespaced_pod(v, &f, kind)?;
            Ok(Subject::Pods { namespaces, pods })
        }
        other => Err(ferr(
            field,
            format!("unknown field {} (want namespaces or pods)", shown(other)),
        )),
    }
}

/// Reads a ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`), AdminNetworkPolicy
/// or BaselineAdminNetworkPolicy (`policy.networking.k8s.io/v1alpha1`), chosen by `kind`,
/// with the validation their CRDs do (the error names the field and the value) and their
/// defaults (v1alpha1 port protocol TCP, v1alpha2 `pods.namespaceSelector` all namespaces).
///
/// A peer that sets a field this version does not know is read as the API asks ("fail
/// closed"): in an Accept rule it matches nothing, a Deny or Pass rule becomes Deny to every
/// peer ([`ClusterRule::any_peer`]). `domainNames` peers are checked but not enforced: they
/// match nothing. Both are logged once per policy.
pub fn cluster_policy_from_value(v: Value) -> Result<ClusterPolicy, FieldError> {
    let mut m = object(v, "")?;
    let kind_s = match m.remove("kind") {
        None => return Err(ferr("kind", "required")),
        Some(k) => string(k, "kind")?,
    };
    let kind = ClusterPolicyKind::from_kind(&kind_s).ok_or_else(|| {
        ferr(
            "kind",
            format!(
                "{} is not one of ClusterNetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy",
                shown(&kind_s)
            ),
        )
    })?;
    let version = match m.remove("apiVersion") {
        None => return Err(ferr("apiVersion", "required")),
        Some(v) => string(v, "apiVersion")?,
    };
    if version != kind.api_version() {
        return Err(ferr(
            "apiVersion",
            format!(
                "{} is not {} (the version of {kind} twill reads)",
                shown(&version),
                kind.api_version()
            ),
        ));
    }
    let meta: ObjectMeta = sub(m.remove("metadata").unwrap_or(Value::Null), "metadata")?;
    check_name("metadata.name", &meta.name, is_dns1123_subdomain, SUBDOMAIN)?;
    check_labels("metadata.labels", &meta.labels)?;
    if kind == ClusterPolicyKind::BaselineAdminNetworkPolicy && meta.name != BANP_NAME {
        return Err(ferr(
            "metadata.name",
            format!(
                "{} is not {BANP_NAME:?}: the cluster has one BaselineAdminNetworkPolicy, named {BANP_NAME:?}",
                shown(&meta.name)
            ),
        ));
    }
    let key = format!("{}/{}", kind.short(), meta.name);
    let mut spec = match m.remove("spec") {
        None | Some(Value::Null) => return Err(ferr("spec", "required")),
        Some(v) => object(v, "spec")?,
    };
    let tier = match kind {
        ClusterPolicyKind::ClusterNetworkPolicy => {
            let t = string(
                spec.remove("tier")
                    .ok_or_else(|| ferr("spec.tier", "required"))?,
                "spec.tier",
            )?;
            match t.as_str() {
                "Admin" => Tier::Admin,
                "Baseline" => Tier::Baseline,
                other => {
                    return Err(ferr(
                        "spec.tier",
                        format!("{} is not one of Admin, Baseline", shown(other)),
                    ))
                }
            }
        }
        ClusterPolicyKind::AdminNetworkPolicy => Tier::Admin,
        ClusterPolicyKind::BaselineAdminNetworkPolicy => Tier::Baseline,
    };
    let priority = match kind {
        ClusterPolicyKind::BaselineAdminNetworkPolicy => BANP_PRIORITY,
        _ => {
            let p = spec
                .remove("priority")
                .ok_or_else(|| ferr("spec.priority", "required"))?;
            integer(p, "spec.priority", 0, 1000)? as u16
        }
    };
    let subject = read_subject(spec.remove("subject"), kind)?;
    let limits = kind.limits();
    let mut rules = |dir: PolicyType| -> Result<Vec<ClusterRule>, FieldError> {
        let name = match dir {
            PolicyType::Ingress => "ingress",
            PolicyType::Egress => "egress",
        };
        let f = format!("spec.{name}");
        let items = bounded(list(spec.remove(name), &f)?, &f, 0, limits.rules)?;
        items
            .into_iter()
            .enumerate()
            .map(|(i, r)| read_rule(r, &format!("{f}[{i}]"), kind, dir, &key))
            .collect()
    };
    let ingress = rules(PolicyType::Ingress)?;
    let egress = rules(PolicyType::Egress)?;
    Ok(ClusterPolicy {
        kind,
        name: meta.name,
        tier,
        priority,
        subject,
        ingress,
        egress,
    })
}

/// Reads a Node (`v1`): name, labels, and the InternalIP and ExternalIP addresses of
/// `status.addresses` (other types, such as Hostname, are not addresses and are skipped).
/// `kind` and `apiVersion` are not looked at: the caller chose this reader by them.
pub fn node_from_value(v: Value) -> Result<Node, FieldError> {
    let mut m = object(v, "")?;
    let meta: ObjectMeta = sub(m.remove("metadata").unwrap_or(Value::Null), "metadata")?;
    check_name("metadata.name", &meta.name, is_dns1123_subdomain, SUBDOMAIN)?;
    check_labels("metadata.labels", &meta.labels)?;
    let mut status = match m.remove("status") {
        None | Some(Value::Null) => Map::new(),
        Some(v) => object(v, "status")?,
    };
    let mut addresses = Vec::new();
    let items = list(status.remove("addresses"), "status.addresses")?;
    for (i, a) in items.into_iter().enumerate() {
        let f = format!("status.addresses[{i}]");
        let mut a = object(a, &f)?;
        let t = match a.remove("type") {
            Some(t) => string(t, &format!("{f}.type"))?,
            None => return Err(ferr(format!("{f}.type"), "required")),
        };
        if t != "InternalIP" && t != "ExternalIP" {
            continue;
        }
        let af = format!("{f}.address");
        let s = string(
            a.remove("address").ok_or_else(|| ferr(&af, "required"))?,
            &af,
        )?;
        let ip: IpAddr = s
            .parse()
            .map_err(|_| ferr(&af, format!("{} is not an IP address", shown(&s))))?;
        if !addresses.contains(&ip) {
            addresses.push(ip);
        }
    }
    Ok(Node {
        name: meta.name,
        labels: meta.labels,
        addresses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cnp(spec: Value) -> Result<ClusterPolicy, FieldError> {
        cluster_policy_from_value(json!({
            "apiVersion": CNP_API_VERSION, "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "p"}, "spec": spec}))
    }

    fn anp(kind: &str, name: &str, spec: Value) -> Result<ClusterPolicy, FieldError> {
        cluster_policy_from_value(json!({
            "apiVersion": ANP_API_VERSION, "kind": kind,
            "metadata": {"name": name}, "spec": spec}))
    }

    fn ns_sel(k: &str, v: &str) -> LabelSelector {
        serde_json::from_value(json!({"matchLabels": {k: v}})).unwrap()
    }

    fn tcp(a: u16, b: u16) -> PolicyPort {
        PolicyPort {
            protocol: Protocol::Tcp,
            port: Some(Port::Range(a, b)),
        }
    }

    #[test]
    fn cluster_network_policy_is_read_with_every_peer_and_port_kind() {
        let p = cnp(json!({
            "tier": "Admin", "priority": 7,
            "subject": {"pods": {"podSelector": {"matchLabels": {"app": "db"}}}},
            "ingress": [
                {"name": "from-monitoring", "action": "Accept",
                 "from": [{"namespaces": {"matchLabels": {"team": "mon"}}},
                          {"pods": {"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {}}}],
                 "protocols": [{"tcp": {"destinationPort": {"number": 9090}}},
                               {"udp": {"destinationPort": {"range": {"start": 1000, "end": 2000}}}},
                               {"destinationNamedPort": "metrics"}]}],
            "egress": [
                {"action": "Deny", "to": [{"networks": ["10.0.0.1/8", "fd00::/64"]}, {"nodes": {}}]},
                {"action": "Pass", "to": [{"pods": {"podSelector": {"matchLabels": {"a": "b"}}}}]}]
        }))
        .unwrap();
        assert_eq!(p.key(), "cnp/p");
        assert_eq!((p.tier, p.priority), (Tier::Admin, 7));
        assert_eq!(
            p.subject,
            Subject::Pods {
                namespaces: LabelSelector::default(),
                pods: ns_sel("app", "db")
            }
        );
        let r = &p.ingress[0];
        assert_eq!(
            (r.name.as_str(), r.action, r.any_peer),
            ("from-monitoring", Action::Accept, false)
        );
        assert_eq!(
            r.peers,
            vec![
                Peer::Pods {
                    pods: LabelSelector::default(),
                    namespaces: Some(ns_sel("team", "mon"))
                },
                Peer::Pods {
                    pods: LabelSelector::default(),
                    namespaces: Some(ns_sel("team", "a"))
                },
            ]
        );
        let named = |protocol| PolicyPort {
            protocol,
            port: Some(Port::Named("metrics".into())),
        };
        assert_eq!(
            r.ports,
            vec![
                tcp(9090, 9090),
                PolicyPort {
                    protocol: Protocol::Udp,
                    port: Some(Port::Range(1000, 2000))
                },
                named(Protocol::Tcp),
                named(Protocol::Udp),
                named(Protocol::Sctp),
            ]
        );
        let e = &p.egress[0];
        assert_eq!(e.action, Action::Deny);
        let nets: Vec<String> = e
            .peers
            .iter()
            .map(|p| match p {
                Peer::IpBlock(b) => b.cidr.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "fd00::/64"]);
        assert_eq!(e.nodes, vec![LabelSelector::default()]);
        assert!(e.ports.is_empty());
        assert_eq!(p.egress[1].action, Action::Pass);
        assert_eq!(
            p.egress[1].peers,
            vec![Peer::Pods {
                pods: ns_sel("a", "b"),
                namespaces: Some(LabelSelector::default())
            }]
        );
        let b = cnp(json!({"tier": "Baseline", "priority": 1000, "subject": {"namespaces": {}}}))
            .unwrap();
        assert_eq!(b.tier, Tier::Baseline);
        assert_eq!(b.subject, Subject::Namespaces(LabelSelector::default()));
        assert!(b.ingress.is_empty() && b.egress.is_empty());
    }

    #[test]
    fn admin_and_baseline_admin_network_policies_are_read_as_cluster_policies() {
        let p = anp(
            "AdminNetworkPolicy",
            "a",
            json!({"priority": 3, "subject": {"namespaces": {}},
                "ingress": [{"action": "Allow", "from": [{"namespaces": {}}],
                    "ports": [{"portNumber": {"port": 53}}, {"portNumber": {"protocol": "UDP", "port": 53}},
                              {"portRange": {"start": 1, "end": 1}}, {"namedPort": "dns"}]}],
                "egress": [{"action": "Pass", "to": [{"networks": ["0.0.0.0/0"]}]}]}),
        )
        .unwrap();
        assert_eq!(
            (p.kind, p.tier, p.priority),
            (ClusterPolicyKind::AdminNetworkPolicy, Tier::Admin, 3)
        );
        assert_eq!(p.key(), "anp/a");
        let r = &p.ingress[0];
        assert_eq!(r.action, Action::Accept);
        assert_eq!(r.ports.len(), 6, "{:?}", r.ports);
        assert_eq!(r.ports[0], tcp(53, 53));
        assert_eq!(r.ports[1].protocol, Protocol::Udp);
        assert_eq!(r.ports[2], tcp(1, 1));
        assert_eq!(r.ports[3].port, Some(Port::Named("dns".into())));
        assert_eq!(p.egress[0].action, Action::Pass);

        let b = anp(
            "BaselineAdminNetworkPolicy",
            "default",
            json!({"subject": {"pods": {"namespaceSelector": {}, "podSelector": {}}},
                "egress": [{"action": "Deny", "to": [{"nodes": {"matchLabels": {"role": "cp"}}}]}]}),
        )
        .unwrap();
        assert_eq!(
            (b.kind, b.tier, b.priority),
            (
                ClusterPolicyKind::BaselineAdminNetworkPolicy,
                Tier::Baseline,
                BANP_PRIORITY
            )
        );
        assert_eq!(b.egress[0].nodes, vec![ns_sel("role", "cp")]);
        // The one name, no Pass, no domainNames; and v1alpha1 wants both selectors of `pods`.
        let e = anp(
            "BaselineAdminNetworkPolicy",
            "other",
            json!({"subject": {"namespaces": {}}}),
        )
        .unwrap_err();
        assert_eq!(e.field, "metadata.name");
        assert!(e.message.contains("\"other\""), "{e}");
        let e = anp(
            "BaselineAdminNetworkPolicy",
            "default",
            json!({"subject": {"namespaces": {}},
            "ingress": [{"action": "Pass", "from": [{"namespaces": {}}]}]}),
        )
        .unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            (
                "spec.ingress[0].action",
                "\"Pass\" is not one of Allow, Deny"
            )
        );
        let e = anp(
            "AdminNetworkPolicy",
            "a",
            json!({"priority": 1, "subject": {"pods": {"podSelector": {}}}}),
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.subject.pods.namespaceSelector");
        let e = anp(
            "AdminNetworkPolicy",
            "a",
            json!({"priority": 1, "subject": {"namespaces": {}},
            "ingress": [{"action": "Accept", "from": [{"namespaces": {}}]}]}),
        )
        .unwrap_err();
        assert_eq!(e.message, "\"Accept\" is not one of Allow, Deny, Pass");
    }

    #[test]
    fn validation_names_the_field_and_the_value() {
        let base = || json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}});
        let with = |k: &str, v: Value| {
            let mut s = base();
            s[k] = v;
            cnp(s).unwrap_err()
        };
        let egress = |rule: Value| with("egress", json!([rule]));
        let cases: Vec<(FieldError, &str, &str)> = vec![
            (with("tier", json!("admin")), "spec.tier", "\"admin\" is not one of Admin, Baseline"),
            (with("priority", json!(1001)), "spec.priority", "1001 must be between 0 and 1000"),
            (with("priority", json!(-1)), "spec.priority", "-1 must be between 0 and 1000"),
            (with("subject", json!({})), "spec.subject", "must set one of namespaces, pods"),
            (
                with("subject", json!({"namespaces": {}, "pods": {"podSelector": {}}})),
                "spec.subject",
                "must set exactly one field, not namespaces, pods",
            ),
            (with("subject", json!({"pods": {}})), "spec.subject.pods.podSelector", "required"),
            (
                with("ingress", json!(vec![json!({"action": "Deny", "from": [{"namespaces": {}}]}); 26])),
                "spec.ingress",
                "has 26 items, at most 25 are allowed",
            ),
            (
                with("ingress", json!([{"name": "x".repeat(101), "action": "Deny", "from": [{"namespaces": {}}]}])),
                "spec.ingress[0].name",
                "",
            ),
            (with("ingress", json!([{"action": "Allow", "from": [{"namespaces": {}}]}])), "spec.ingress[0].action", "\"Allow\" is not one of Accept, Deny, Pass"),
            (with("ingress", json!([{"action": "Deny"}])), "spec.ingress[0].from", "required"),
            (with("ingress", json!([{"action": "Deny", "from": []}])), "spec.ingress[0].from", "must have at least 1 item(s)"),
            (with("ingress", json!([{"action": "Deny", "from": [{}]}])), "spec.ingress[0].from[0]", "must set one of namespaces, pods"),
            (
                egress(json!({"action": "Deny", "to": [{"namespaces": {}, "networks": ["10.0.0.0/8"]}]})),
                "spec.egress[0].to[0]",
                "must set exactly one field, not namespaces, networks",
            ),
            (
                egress(json!({"action": "Deny", "to": [{"networks": ["010.0.0.0/8"]}]})),
                "spec.egress[0].to[0].networks[0]",
                "\"010.0.0.0/8\" is not a CIDR (address/prefix length, at most 43 characters)",
            ),
            (egress(json!({"action": "Deny", "to": [{"networks": []}]})), "spec.egress[0].to[0].networks", "must have at least 1 item(s)"),
            (
                egress(json!({"action": "Deny", "to": [{"networks": ["10.0.0.0/8", "10.0.0.0/8"]}]})),
                "spec.egress[0].to[0].networks[1]",
                "duplicate value \"10.0.0.0/8\"",
            ),
            (
                egress(json!({"action": "Accept", "to": [{"domainNames": ["*.example..com"]}]})),
                "spec.egress[0].to[0].domainNames[0]",
                "",
            ),
            (
                egress(json!({"action": "Deny", "to": [{"nodes": {}}], "protocols": [{"destinationNamedPort": "http"}]})),
                "spec.egress[0].protocols[0]",
                "a named port cannot be used with spec.egress[0].to[0].nodes: only pods have named ports",
            ),
            (
                egress(json!({"action": "Deny", "to": [{"namespaces": {}}], "protocols": [{"tcp": {}}]})),
                "spec.egress[0].protocols[0].tcp.destinationPort",
                "required",
            ),
            (
                egress(json!({"action": "Deny", "to": [{"namespaces": {}}], "protocols": [{"tcp": {"destinationPort": {"number": 0}}}]})),
                "spec.egress[0].protocols[0].tcp.destinationPort.number",
                "0 must be between 1 and 65535",
            ),
            (
                egress(json!({"action": "Deny", "to": [{"namespaces": {}}], "protocols": [{"udp": {"destinationPort": {"range": {"start": 80, "end": 80}}}}]})),
                "spec.egress[0].protocols[0].udp.destinationPort.range.end",
                "80 must be greater than start 80",
            ),
            (
                egress(json!({"action": "Deny", "to": [{"namespaces": {}}], "protocols": [{"tcp": {"destinationPort": {"number": 80}}, "udp": {"destinationPort": {"number": 80}}}]})),
                "spec.egress[0].protocols[0]",
                "must set exactly one field, not tcp, udp",
            ),
            (
                egress(json!({"action": "Deny", "to": [{"namespaces": {}}], "protocols": [{"icmp": {}}]})),
                "spec.egress[0].protocols[0]",
                "unknown field \"icmp\" (want one of tcp, udp, sctp, destinationNamedPort)",
            ),
            (
                egress(json!({"action": "Deny", "to": [{"namespaces": {"matchLabels": {"a": "b c"}}}]})),
                "spec.egress[0].to[0].namespaces.matchLabels[a]",
                "",
            ),
            (
                egress(json!({"action": "Deny", "to": [{"namespaces": {"matchLabels": 3}}]})),
                "spec.egress[0].to[0].namespaces.matchLabels",
                "",
            ),
        ];
        for (e, field, message) in cases {
            assert_eq!(e.field, field, "{e}");
            if !message.is_empty() {
                assert_eq!(e.message, message, "{e}");
            }
        }
        // Object-level fields.
        let obj = |v: Value| cluster_policy_from_value(v).unwrap_err();
        let e = obj(
            json!({"apiVersion": ANP_API_VERSION, "kind": "ClusterNetworkPolicy", "metadata": {"name": "p"}, "spec": base()}),
        );
        assert_eq!(e.field, "apiVersion");
        assert!(
            e.message.contains("v1alpha1") && e.message.contains("v1alpha2"),
            "{e}"
        );
        let e = obj(json!({"apiVersion": CNP_API_VERSION, "kind": "NetworkPolicy"}));
        assert_eq!(e.field, "kind");
        let e = obj(
            json!({"apiVersion": CNP_API_VERSION, "kind": "ClusterNetworkPolicy", "metadata": {"name": "P"}, "spec": base()}),
        );
        assert_eq!(
            (e.field.as_str(), e.message.contains("\"P\"")),
            ("metadata.name", true)
        );
        let e = obj(
            json!({"apiVersion": CNP_API_VERSION, "kind": "ClusterNetworkPolicy", "metadata": {"name": "p"}}),
        );
        assert_eq!((e.field.as_str(), e.message.as_str()), ("spec", "required"));
        // v1alpha1 ports.
        let anp_port = |port: Value| {
            anp(
                "AdminNetworkPolicy",
                "a",
                json!({"priority": 1, "subject": {"namespaces": {}},
                "egress": [{"action": "Deny", "to": [{"namespaces": {}}], "ports": [port]}]}),
            )
            .unwrap_err()
        };
        let e = anp_port(json!({"portNumber": {"protocol": "ICMP", "port": 1}}));
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            (
                "spec.egress[0].ports[0].portNumber.protocol",
                "\"ICMP\" is not one of TCP, UDP, SCTP"
            )
        );
        let e = anp_port(json!({"portRange": {"start": 90, "end": 80}}));
        assert_eq!(e.field, "spec.egress[0].ports[0].portRange.end");
        let e = anp_port(json!({"portNumber": {"protocol": "TCP"}}));
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("spec.egress[0].ports[0].portNumber.port", "required")
        );
        let e = anp("AdminNetworkPolicy", "a", json!({"priority": 1, "subject": {"namespaces": {}},
            "egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.0/8"]}], "ports": [{"namedPort": "dns"}]}]}))
        .unwrap_err();
        assert_eq!(e.field, "spec.egress[0].ports[0]");
        // 100 rules are fine in v1alpha1, 101 are not.
        let rules = |n| {
            json!(vec![
                json!({"action": "Deny", "from": [{"namespaces": {}}]});
                n
            ])
        };
        assert!(anp(
            "AdminNetworkPolicy",
            "a",
            json!({"priority": 1, "subject": {"namespaces": {}}, "ingress": rules(100)})
        )
        .is_ok());
        let e = anp(
            "AdminNetworkPolicy",
            "a",
            json!({"priority": 1, "subject": {"namespaces": {}}, "ingress": rules(101)}),
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.ingress");
    }

    #[test]
    fn unknown_peers_fail_closed_and_domain_names_match_nothing() {
        let spec = |action: &str, peers: Value| {
            json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
                "egress": [{"action": action, "to": peers, "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}]})
        };
        // Accept: the whole rule matches nothing, its known peers included.
        let p = cnp(spec(
            "Accept",
            json!([{"services": {}}, {"namespaces": {}}]),
        ))
        .unwrap();
        let r = &p.egress[0];
        assert_eq!(
            (r.action, r.any_peer, r.peers.len(), r.nodes.len()),
            (Action::Accept, false, 0, 0)
        );
        // Deny and Pass: "Deny all": every peer, every port.
        for action in ["Deny", "Pass"] {
            let p = cnp(spec(action, json!([{"services": {}}, {"namespaces": {}}]))).unwrap();
            let r = &p.egress[0];
            assert_eq!((r.action, r.any_peer), (Action::Deny, true), "{action}");
            assert!(r.peers.is_empty() && r.ports.is_empty(), "{action}: {r:?}");
        }
        // An egress-only field in an ingress peer is a field ingress peers do not know.
        let p = cnp(
            json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
            "ingress": [{"action": "Pass", "from": [{"networks": ["10.0.0.0/8"]}]}]}),
        )
        .unwrap();
        assert_eq!(
            (p.ingress[0].action, p.ingress[0].any_peer),
            (Action::Deny, true)
        );
        // domainNames: valid ones are read and match nothing.
        let p = cnp(spec(
            "Accept",
            json!([{"domainNames": ["*.example.com", "kubernetes.io."]}]),
        ))
        .unwrap();
        let r = &p.egress[0];
        assert!(
            r.peers.is_empty() && r.nodes.is_empty() && !r.any_peer,
            "{r:?}"
        );
        // BANP has no domainNames: unknown there.
        let b = anp(
            "BaselineAdminNetworkPolicy",
            "default",
            json!({"subject": {"namespaces": {}},
            "egress": [{"action": "Deny", "to": [{"domainNames": ["example.com"]}]}]}),
        )
        .unwrap();
        assert!(b.egress[0].any_peer);
        // ... also with a named port: the CRD's rule is about the fields the kind has.
        let b = anp("BaselineAdminNetworkPolicy", "default", json!({"subject": {"namespaces": {}},
            "egress": [{"action": "Deny", "to": [{"domainNames": ["example.com"]}], "ports": [{"namedPort": "dns"}]}]}))
        .unwrap();
        assert!(b.egress[0].any_peer);
        // A null field is an absent one, also for that rule.
        let p = cnp(
            json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
            "egress": [{"action": "Deny", "to": [{"nodes": null, "namespaces": {}}],
                "protocols": [{"destinationNamedPort": "http"}]}]}),
        )
        .unwrap();
        assert_eq!(p.egress[0].peers.len(), 1);
    }

    #[test]
    fn cidrs_and_domain_names_are_read_as_the_crd_checks_them() {
        let net = |s: &str| parse_cidr_strict(s).map(|n| n.to_string());
        assert_eq!(net("10.1.2.3/8").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(net("fd00::1/0").as_deref(), Some("::/0"));
        assert_eq!(net("0.0.0.0/0").as_deref(), Some("0.0.0.0/0"));
        // 43 characters is the CRD's maximum.
        assert_eq!(
            net("0000:0000:0000:0000:0000:0000:0000:0001/128").as_deref(),
            Some("::1/128")
        );
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/08",
            "010.0.0.0/8",
            "10.0.0.0/+8",
            "fe80::1%eth0/64",
            "fd00::/129",
            "10.0.0.0/",
            "/8",
            "a.b.c.d/8",
            "0000:0000:0000:0000:0000:ffff:255.255.255.255/128",
        ] {
            assert_eq!(net(bad), None, "{bad}");
        }
        for good in [
            "example.com",
            "*.example.com",
            "a.b.c.",
            "x_y.example.com",
            "1.2",
            "_a.com",
        ] {
            assert!(is_domain_name(good), "{good}");
        }
        for bad in [
            "com",
            "*.com",
            "*example.com",
            "a..com",
            "-a.com",
            "a-.com",
            "a.com..",
            "a b.com",
            "",
            "**.a.com",
        ] {
            assert!(!is_domain_name(bad), "{bad}");
        }
    }

    #[test]
    fn nodes_keep_internal_and_external_addresses() {
        let n = node_from_value(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "labels": {"role": "worker"}},
            "status": {"addresses": [
                {"type": "Hostname", "address": "n1"},
                {"type": "InternalIP", "address": "198.18.0.1"},
                {"type": "ExternalIP", "address": "fd00::1"},
                {"type": "InternalIP", "address": "198.18.0.1"}]}}))
        .unwrap();
        assert_eq!(n.name, "n1");
        assert_eq!(n.labels.get("role").map(String::as_str), Some("worker"));
        let want: Vec<IpAddr> = vec!["198.18.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        assert_eq!(n.addresses, want);
        assert!(node_from_value(json!({"metadata": {"name": "n2"}}))
            .unwrap()
            .addresses
            .is_empty());
        let e = node_from_value(json!({"metadata": {"name": "n1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "n1.local"}]}}))
        .unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            (
                "status.addresses[0].address",
                "\"n1.local\" is not an IP address"
            )
        );
        assert_eq!(
            node_from_value(json!({"metadata": {"name": "N"}}))
                .unwrap_err()
                .field,
            "metadata.name"
        );
    }
}
