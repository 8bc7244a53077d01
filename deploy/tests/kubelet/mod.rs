//! The lab's kubelet: runs the pod of kube-flannel.yml's DaemonSet on a lab node as a kubelet
//! with a CRI runtime would, with podman, and attaches pods with the CNI plugins and config
//! that pod installed, as the runtime would.
//!
//! - [`parse`] reads the DaemonSet strictly: every field must be one this module knows what
//!   to do with (or knows to have no effect in a lab of untainted, roomy nodes); anything else
//!   is an error naming the field, so a manifest change cannot go untested silently.
//! - A node's host filesystem is the real host's except for the paths a node keeps state in:
//!   every hostPath volume and the runtime's `/var/lib/cni` live under the node's directory
//!   (`<node dir>/host/<path>`). `/lib/modules` is the exception: the real one, read-only
//!   (modules are the kernel's, which the nodes share), where the host has one.
//! - API access is what a kubelet gives a pod: `KUBERNETES_SERVICE_HOST`/`_PORT` and a
//!   service-account volume (`token`, `ca.crt`, `namespace`) at
//!   `/var/run/secrets/kubernetes.io/serviceaccount`.
//! - Containers are created with `podman run` in the node's network namespace
//!   (`hostNetwork: true`); unprivileged ones get containerd's default capability set plus
//!   `capabilities.add`, privileged ones `--privileged`.
//! - [`Kubelet::cni_add`] runs the conflist the init containers put in the node's
//!   `/etc/cni/net.d` with the plugins in the node's `/opt/cni/bin`, each plugin inside a private
//!   mount namespace where those node paths (and `/run`, `/var/lib/cni`) are the node's, so the
//!   plugins' default paths (`/run/flannel/subnet.env`, `/var/lib/cni/...`) are the node's and
//!   the real host paths are never written.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// A parse error: names the field (path in the manifest) and what is wrong with it.
pub type Res<T> = Result<T, String>;

/// Reads one JSON object strictly: every key must be taken ([`Fields::end`] fails on the
/// rest), so a field this kubelet does not know fails the test instead of being ignored.
struct Fields<'a> {
    at: String,
    map: &'a Map<String, Value>,
    taken: BTreeSet<&'static str>,
}

impl<'a> Fields<'a> {
    fn new(v: &'a Value, at: &str) -> Res<Fields<'a>> {
        match v.as_object() {
            Some(map) => Ok(Fields {
                at: at.to_string(),
                map,
                taken: BTreeSet::new(),
            }),
            None => Err(format!("{at}: expected an object, found {v}")),
        }
    }

    fn path(&self, k: &str) -> String {
        format!("{}.{k}", self.at)
    }

    fn opt(&mut self, k: &'static str) -> Option<&'a Value> {
        self.taken.insert(k);
        self.map.get(k)
    }

    fn req(&mut self, k: &'static str) -> Res<&'a Value> {
        let at = self.path(k);
        self.opt(k).ok_or_else(|| format!("{at}: required"))
    }

    fn opt_str(&mut self, k: &'static str) -> Res<Option<&'a str>> {
        let at = self.path(k);
        match self.opt(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(format!("{at}: expected a string, found {v}")),
        }
    }

    fn str(&mut self, k: &'static str) -> Res<&'a str> {
        let at = self.path(k);
        self.opt_str(k)?.ok_or_else(|| format!("{at}: required"))
    }

    fn opt_bool(&mut self, k: &'static str) -> Res<Option<bool>> {
        let at = self.path(k);
        match self.opt(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(format!("{at}: expected true or false, found {v}")),
        }
    }

    fn opt_u64(&mut self, k: &'static str) -> Res<Option<u64>> {
        let at = self.path(k);
        match self.opt(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("{at}: expected a non-negative integer, found {v}")),
        }
    }

    /// An optional list (empty when absent).
    fn list(&mut self, k: &'static str) -> Res<Vec<(String, &'a Value)>> {
        let at = self.path(k);
        match self.opt(k) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => Ok(a
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("{at}[{i}]"), v))
                .collect()),
            Some(v) => Err(format!("{at}: expected a list, found {v}")),
        }
    }

    /// An optional list of strings (empty when absent).
    fn strings(&mut self, k: &'static str) -> Res<Vec<String>> {
        self.list(k)?
            .into_iter()
            .map(|(at, v)| {
                v.as_str()
                    .map(String::from)
                    .ok_or_else(|| format!("{at}: expected a string, found {v}"))
            })
            .collect()
    }

    /// An optional string-to-string map (empty when absent).
    fn string_map(&mut self, k: &'static str) -> Res<BTreeMap<String, String>> {
        let at = self.path(k);
        match self.opt(k) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(key, v)| match v {
                    Value::String(s) => Ok((key.clone(), s.clone())),
                    v => Err(format!("{at}.{key}: expected a string, found {v}")),
                })
                .collect(),
            Some(v) => Err(format!("{at}: expected a map, found {v}")),
        }
    }

    /// Fails on the first key nobody took.
    fn end(self) -> Res<()> {
        match self.map.keys().find(|k| !self.taken.contains(k.as_str())) {
            None => Ok(()),
            Some(k) => Err(format!(
                "{}.{k}: the lab's kubelet (deploy/tests/kubelet) does not know this field; \
                 teach it what the field means before shipping it",
                self.at
            )),
        }
    }
}

/// A pod field the downward API fills an env variable with.
#[derive(Debug, Clone, PartialEq)]
pub enum PodField {
    Name,
    Namespace,
    NodeName,
    /// `status.podIP` (the node's address: hostNetwork).
    PodIp,
    /// `status.hostIP`.
    HostIp,
    ServiceAccountName,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EnvValue {
    Literal(String),
    Field(PodField),
}

#[derive(Debug, Clone, PartialEq)]
pub struct VolumeMount {
    pub volume: String,
    pub path: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Volume {
    /// A node path; `file_or_create` (type FileOrCreate) makes an empty file if it is missing,
    /// else (type unset or DirectoryOrCreate) a missing path becomes a directory, as container
    /// runtimes do.
    HostPath { path: String, file_or_create: bool },
    /// The keys of a ConfigMap as files (read-only, as the kubelet mounts them).
    ConfigMap { name: String },
}

/// An httpGet probe. `host` unset means the pod's IP (the node's: hostNetwork).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpGet {
    pub host: Option<String>,
    pub path: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Container {
    pub name: String,
    pub image: String,
    /// Replaces the image's ENTRYPOINT when set.
    pub command: Option<Vec<String>>,
    pub args: Vec<String>,
    pub env: Vec<(String, EnvValue)>,
    pub privileged: bool,
    pub cap_add: Vec<String>,
    pub mounts: Vec<VolumeMount>,
    pub readiness: Option<HttpGet>,
    pub liveness: Option<HttpGet>,
}

/// One node-selector requirement of the pod's required node affinity.
#[derive(Debug, Clone, PartialEq)]
pub struct Requirement {
    pub key: String,
    pub operator: String,
    pub values: Vec<String>,
}

/// What the kubelet needs of the DaemonSet's pod template.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonSetPod {
    /// The DaemonSet's name: pods are `<name>-<5 random characters>`.
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// Required node affinity: any term whose requirements all hold selects a node.
    pub node_terms: Vec<Vec<Requirement>>,
    pub service_account: String,
    pub termination_grace: Duration,
    pub init_containers: Vec<Container>,
    pub containers: Vec<Container>,
    pub volumes: BTreeMap<String, Volume>,
}

/// containerd's default capabilities for an unprivileged container (its `oci` spec
/// defaults, the same set Docker uses): the base that `capabilities.add` adds to.
pub const DEFAULT_CAPS: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// The pod template of a DaemonSet (`apps/v1`), strictly.
pub fn parse(ds: &Value) -> Res<DaemonSetPod> {
    let mut top = Fields::new(ds, "DaemonSet")?;
    let api = top.str("apiVersion")?;
    if api != "apps/v1" {
        return Err(format!(
            "DaemonSet.apiVersion: {api:?}, expected \"apps/v1\""
        ));
    }
    top.str("kind")?;
    let mut meta = Fields::new(top.req("metadata")?, "DaemonSet.metadata")?;
    let name = meta.str("name")?.to_string();
    let namespace = meta.str("namespace")?.to_string();
    // The DaemonSet's own labels select nothing: only the template's reach pods.
    meta.string_map("labels")?;
    meta.end()?;
    let mut spec = Fields::new(top.req("spec")?, "DaemonSet.spec")?;
    let mut selector = Fields::new(spec.req("selector")?, "DaemonSet.spec.selector")?;
    let match_labels = selector.string_map("matchLabels")?;
    selector.end()?;
    if let Some(strategy) = spec.opt("updateStrategy") {
        // The default (RollingUpdate, maxUnavailable 1, maxSurge 0) is what the test does.
        let mut s = Fields::new(strategy, "DaemonSet.spec.updateStrategy")?;
        let kind = s.opt_str("type")?.unwrap_or("RollingUpdate");
        if kind != "RollingUpdate" {
            return Err(format!(
                "DaemonSet.spec.updateStrategy.type: {kind:?}; the lab only rolls one node at a time (RollingUpdate)"
            ));
        }
        s.end()?;
    }
    let mut template = Fields::new(spec.req("template")?, "DaemonSet.spec.template")?;
    let mut tmeta = Fields::new(
        template.req("metadata")?,
        "DaemonSet.spec.template.metadata",
    )?;
    let labels = tmeta.string_map("labels")?;
    tmeta.end()?;
    for (k, v) in &match_labels {
        if labels.get(k) != Some(v) {
            return Err(format!(
                "DaemonSet.spec.selector.matchLabels.{k}={v} does not select the template's labels {labels:?}"
            ));
        }
    }
    let pod = parse_pod_spec(template.req("spec")?, &name, &namespace, labels)?;
    template.end()?;
    spec.end()?;
    top.end()?;
    Ok(pod)
}

fn parse_pod_spec(
    v: &Value,
    name: &str,
    namespace: &str,
    labels: BTreeMap<String, String>,
) -> Res<DaemonSetPod> {
    let at = "DaemonSet.spec.template.spec";
    let mut spec = Fields::new(v, at)?;
    if spec.opt_bool("hostNetwork")? != Some(true) {
        return Err(format!(
            "{at}.hostNetwork: the lab runs the pod in the node's network namespace only (hostNetwork: true)"
        ));
    }
    // Scheduling order and eviction among pods competing for a full node: the lab's nodes
    // have room, so it changes nothing here.
    spec.opt_str("priorityClassName")?;
    // The lab's nodes carry no taints, so tolerations change nothing; check their form.
    for (tat, t) in spec.list("tolerations")? {
        let mut t = Fields::new(t, &tat)?;
        let op = t.opt_str("operator")?.unwrap_or("Equal");
        if !matches!(op, "Exists" | "Equal") {
            return Err(format!("{tat}.operator: {op:?}, expected Exists or Equal"));
        }
        let effect = t.opt_str("effect")?.unwrap_or("");
        if !matches!(effect, "" | "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
            return Err(format!("{tat}.effect: {effect:?}"));
        }
        t.opt_str("key")?;
        t.opt_str("value")?;
        t.opt_u64("tolerationSeconds")?;
        t.end()?;
    }
    let mut node_terms = Vec::new();
    if let Some(aff) = spec.opt("affinity") {
        let mut aff = Fields::new(aff, &format!("{at}.affinity"))?;
        let mut na = Fields::new(
            aff.req("nodeAffinity")?,
            &format!("{at}.affinity.nodeAffinity"),
        )?;
        let mut req = Fields::new(
            na.req("requiredDuringSchedulingIgnoredDuringExecution")?,
            &format!("{at}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"),
        )?;
        for (tat, term) in req.list("nodeSelectorTerms")? {
            let mut term = Fields::new(term, &tat)?;
            let mut reqs = Vec::new();
            for (eat, e) in term.list("matchExpressions")? {
                let mut e = Fields::new(e, &eat)?;
                let r = Requirement {
                    key: e.str("key")?.to_string(),
                    operator: e.str("operator")?.to_string(),
                    values: e.strings("values")?,
                };
                if !matches!(
                    r.operator.as_str(),
                    "In" | "NotIn" | "Exists" | "DoesNotExist"
                ) {
                    return Err(format!("{eat}.operator: {:?} is not supported", r.operator));
                }
                e.end()?;
                reqs.push(r);
            }
            term.end()?;
            node_terms.push(reqs);
        }
        req.end()?;
        na.end()?;
        aff.end()?;
    }
    for (k, v) in spec.string_map("nodeSelector")? {
        node_terms = if node_terms.is_empty() {
            vec![vec![]]
        } else {
            node_terms
        };
        for term in &mut node_terms {
            term.push(Requirement {
                key: k.clone(),
                operator: "In".into(),
                values: vec![v.clone()],
            });
        }
    }
    let service_account = spec.opt_str("serviceAccountName")?.unwrap_or("default");
    let termination_grace =
        Duration::from_secs(spec.opt_u64("terminationGracePeriodSeconds")?.unwrap_or(30));
    let mut volumes = BTreeMap::new();
    for (vat, vol) in spec.list("volumes")? {
        let mut vf = Fields::new(vol, &vat)?;
        let vname = vf.str("name")?.to_string();
        let parsed = match (vf.opt("hostPath"), vf.opt("configMap")) {
            (Some(h), None) => {
                let mut h = Fields::new(h, &format!("{vat}.hostPath"))?;
                let path = h.str("path")?.to_string();
                let file_or_create = match h.opt_str("type")?.unwrap_or("") {
                    "" | "DirectoryOrCreate" => false,
                    "FileOrCreate" => true,
                    other => {
                        return Err(format!(
                            "{vat}.hostPath.type: {other:?} is not supported (\"\", DirectoryOrCreate or FileOrCreate)"
                        ))
                    }
                };
                if !path.starts_with('/') {
                    return Err(format!("{vat}.hostPath.path: {path:?} is not absolute"));
                }
                h.end()?;
                Volume::HostPath {
                    path,
                    file_or_create,
                }
            }
            (None, Some(c)) => {
                let mut c = Fields::new(c, &format!("{vat}.configMap"))?;
                let cname = c.str("name")?.to_string();
                c.end()?;
                Volume::ConfigMap { name: cname }
            }
            _ => {
                return Err(format!(
                    "{vat}: exactly one of hostPath or configMap (the volume kinds the lab knows)"
                ))
            }
        };
        vf.end()?;
        if volumes.insert(vname.clone(), parsed).is_some() {
            return Err(format!("{vat}.name: {vname:?} appears twice"));
        }
    }
    let mut init_containers = Vec::new();
    for (cat, c) in spec.list("initContainers")? {
        init_containers.push(parse_container(c, &cat, &volumes)?);
    }
    let mut containers = Vec::new();
    for (cat, c) in spec.list("containers")? {
        containers.push(parse_container(c, &cat, &volumes)?);
    }
    if containers.is_empty() {
        return Err(format!("{at}.containers: none"));
    }
    spec.end()?;
    Ok(DaemonSetPod {
        name: name.to_string(),
        namespace: namespace.to_string(),
        labels,
        node_terms,
        service_account: service_account.to_string(),
        termination_grace,
        init_containers,
        containers,
        volumes,
    })
}

fn parse_container(v: &Value, at: &str, volumes: &BTreeMap<String, Volume>) -> Res<Container> {
    let mut c = Fields::new(v, at)?;
    let name = c.str("name")?.to_string();
    let image = c.str("image")?.to_string();
    let command = match c.opt("command") {
        None => None,
        Some(_) => Some(c.strings("command")?),
    };
    let args = c.strings("args")?;
    // hostNetwork: a container port is the node's port; the list only names ports (for
    // probes) and documents them.
    let mut port_names = BTreeMap::new();
    for (pat, p) in c.list("ports")? {
        let mut p = Fields::new(p, &pat)?;
        let number = p
            .opt_u64("containerPort")?
            .ok_or_else(|| format!("{pat}.containerPort: required"))?;
        if let Some(n) = p.opt_str("name")? {
            port_names.insert(n.to_string(), number);
        }
        let proto = p.opt_str("protocol")?.unwrap_or("TCP");
        if !matches!(proto, "TCP" | "UDP" | "SCTP") {
            return Err(format!("{pat}.protocol: {proto:?}"));
        }
        p.end()?;
    }
    let readiness = match c.opt("readinessProbe") {
        Some(p) => Some(parse_probe(
            p,
            &format!("{at}.readinessProbe"),
            &port_names,
        )?),
        None => None,
    };
    let liveness = match c.opt("livenessProbe") {
        Some(p) => Some(parse_probe(p, &format!("{at}.livenessProbe"), &port_names)?),
        None => None,
    };
    if let Some(r) = c.opt("resources") {
        // Requests are what the scheduler reserves; with room on every node they change
        // nothing. Limits would constrain the container: not modelled, so refused.
        let mut r = Fields::new(r, &format!("{at}.resources"))?;
        r.string_map("requests")?;
        r.end()?;
    }
    let (mut privileged, mut cap_add) = (false, vec![]);
    if let Some(s) = c.opt("securityContext") {
        let mut s = Fields::new(s, &format!("{at}.securityContext"))?;
        privileged = s.opt_bool("privileged")?.unwrap_or(false);
        if let Some(caps) = s.opt("capabilities") {
            let mut caps = Fields::new(caps, &format!("{at}.securityContext.capabilities"))?;
            cap_add = caps.strings("add")?;
            caps.end()?;
        }
        s.end()?;
    }
    let mut env = Vec::new();
    for (eat, e) in c.list("env")? {
        let mut e = Fields::new(e, &eat)?;
        let ename = e.str("name")?.to_string();
        let value = match (e.opt_str("value")?, e.opt("valueFrom")) {
            (Some(v), None) => EnvValue::Literal(v.to_string()),
            (None, Some(from)) => {
                let mut from = Fields::new(from, &format!("{eat}.valueFrom"))?;
                let mut fr =
                    Fields::new(from.req("fieldRef")?, &format!("{eat}.valueFrom.fieldRef"))?;
                let field = match fr.str("fieldPath")? {
                    "metadata.name" => PodField::Name,
                    "metadata.namespace" => PodField::Namespace,
                    "spec.nodeName" => PodField::NodeName,
                    "spec.serviceAccountName" => PodField::ServiceAccountName,
                    "status.podIP" => PodField::PodIp,
                    "status.hostIP" => PodField::HostIp,
                    other => {
                        return Err(format!(
                            "{eat}.valueFrom.fieldRef.fieldPath: {other:?} is not supported"
                        ))
                    }
                };
                if let Some(v) = fr.opt_str("apiVersion")? {
                    if v != "v1" {
                        return Err(format!("{eat}.valueFrom.fieldRef.apiVersion: {v:?}"));
                    }
                }
                fr.end()?;
                from.end()?;
                EnvValue::Field(field)
            }
            _ => return Err(format!("{eat}: exactly one of value or valueFrom")),
        };
        e.end()?;
        env.push((ename, value));
    }
    let mut mounts = Vec::new();
    for (mat, m) in c.list("volumeMounts")? {
        let mut m = Fields::new(m, &mat)?;
        let volume = m.str("name")?.to_string();
        if !volumes.contains_key(&volume) {
            return Err(format!("{mat}.name: no volume {volume:?} in the pod"));
        }
        let path = m.str("mountPath")?.to_string();
        let read_only = m.opt_bool("readOnly")?.unwrap_or(false);
        m.end()?;
        mounts.push(VolumeMount {
            volume,
            path,
            read_only,
        });
    }
    c.end()?;
    Ok(Container {
        name,
        image,
        command,
        args,
        env,
        privileged,
        cap_add,
        mounts,
        readiness,
        liveness,
    })
}

fn parse_probe(v: &Value, at: &str, port_names: &BTreeMap<String, u64>) -> Res<HttpGet> {
    let mut p = Fields::new(v, at)?;
    // The schedule: the lab polls until ready (within its deadline) rather than on the
    // kubelet's timetable; with a healthy program the outcome is the same.
    for k in [
        "initialDelaySeconds",
        "periodSeconds",
        "failureThreshold",
        "successThreshold",
        "timeoutSeconds",
    ] {
        p.opt_u64(k)?;
    }
    let mut h = Fields::new(p.req("httpGet")?, &format!("{at}.httpGet"))?;
    let path = h.opt_str("path")?.unwrap_or("/").to_string();
    let host = h.opt_str("host")?.map(String::from);
    let scheme = h.opt_str("scheme")?.unwrap_or("HTTP");
    if scheme != "HTTP" {
        return Err(format!("{at}.httpGet.scheme: {scheme:?} (only HTTP)"));
    }
    let port = match h.req("port")? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => port_names.get(s).copied().or_else(|| s.parse::<u64>().ok()),
        _ => None,
    }
    .and_then(|n| u16::try_from(n).ok())
    .ok_or_else(|| format!("{at}.httpGet.port: not a port number or a named container port"))?;
    h.end()?;
    p.end()?;
    Ok(HttpGet { host, path, port })
}

/// Whether a node with `labels` is selected by the pod's required node affinity.
pub fn selects(terms: &[Vec<Requirement>], labels: &BTreeMap<String, String>) -> bool {
    terms.is_empty()
        || terms.iter().any(|term| {
            term.iter().all(|r| {
                let v = labels.get(&r.key);
                match r.operator.as_str() {
                    "In" => v.is_some_and(|v| r.values.contains(v)),
                    "NotIn" => v.is_none_or(|v| !r.values.contains(v)),
                    "Exists" => v.is_some(),
                    "DoesNotExist" => v.is_none(),
                    _ => false,
                }
            })
        })
}

/// Host paths shared with the real host rather than kept per node: the kernel's modules
/// (the nodes share one kernel), always read-only. A host without the path (a kernel with
/// everything built in) gets the node's own empty directory, as a runtime would create it.
const SHARED_HOST_PATHS: [&str; 1] = ["/lib/modules"];

/// Node paths the lab's CNI runtime shows plugins as the node's own: the node's `/run` (which
/// holds `/run/flannel`, `/run/xtables.lock` and the pods' netns pins), the plugin and config
/// directories, and the runtime's `/var/lib/cni` (IPAM and plugin state).
const NODE_RUNTIME_PATHS: [&str; 4] = ["/run", "/opt/cni/bin", "/etc/cni/net.d", "/var/lib/cni"];

/// One lab node as the kubelet sees it.
#[derive(Debug, Clone)]
pub struct NodeCtx {
    pub name: String,
    /// Full name of the node's network namespace.
    pub netns: String,
    /// The node's address (its pods' `status.podIP` and `status.hostIP`: hostNetwork).
    pub ip: String,
    /// `<node dir>/host`: the node's own copy of every per-node host path.
    pub host_root: PathBuf,
}

impl NodeCtx {
    /// Where node path `path` lives on the real host.
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.host_root.join(path.trim_start_matches('/'))
    }
}

/// A pod the kubelet runs: its name and its containers' podman names.
#[derive(Debug, Clone)]
pub struct RunningPod {
    pub name: String,
    /// (container name, podman container name), in start order.
    pub containers: Vec<(String, String)>,
}

/// The kubelets of every lab node (one podman). Removes every container it created when
/// dropped, also when a test fails.
pub struct Kubelet {
    /// The image every container runs (the manifest's image is replaced by the one under test).
    pub image: String,
    /// Unique per lab: podman container names start with it.
    pub prefix: String,
    /// `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`.
    pub api_host: String,
    pub api_port: u16,
    /// The service-account volume's contents.
    pub ca_cert_pem: String,
    pub token: String,
    /// ConfigMaps by name: key -> contents.
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
    /// Resource limits for every container (runc cannot raise them above the test's own).
    pub ulimits: Vec<String>,
    created: Vec<String>,
    attempts: usize,
}

/// `podman` with the runtime settings that work on this kind of machine: runc (crun refuses
/// hybrid cgroup hierarchies) and cgroupfs.
fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    c
}

fn run(mut cmd: Command, what: &str) -> Res<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    Ok(out)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A DaemonSet pod name: `<daemonset>-` and 5 characters from the alphabet Kubernetes uses
/// for generated names.
pub fn pod_name(daemonset: &str, seed: u64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = seed
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    let mut s = format!("{daemonset}-");
    for _ in 0..5 {
        // xorshift: enough to make names differ between restarts.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push(ALPHABET[(x % ALPHABET.len() as u64) as usize] as char);
    }
    s
}

impl Kubelet {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        image: &str,
        prefix: &str,
        api_host: &str,
        api_port: u16,
        ca_cert_pem: String,
        token: String,
        config_maps: BTreeMap<String, BTreeMap<String, String>>,
        ulimits: Vec<String>,
    ) -> Kubelet {
        Kubelet {
            image: image.into(),
            prefix: prefix.into(),
            api_host: api_host.into(),
            api_port,
            ca_cert_pem,
            token,
            config_maps,
            ulimits,
            created: vec![],
            attempts: 0,
        }
    }

    /// The API object of a pod the DaemonSet controller made and the scheduler bound to
    /// `node`, with the status the kubelet reports for a running hostNetwork pod.
    pub fn pod_object(&self, pod: &DaemonSetPod, name: &str, node: &NodeCtx) -> Value {
        let containers: Vec<Value> = pod
            .containers
            .iter()
            .map(|c| json!({"name": c.name, "image": c.image}))
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": pod.namespace, "labels": pod.labels},
            "spec": {"nodeName": node.name, "hostNetwork": true,
                     "serviceAccountName": pod.service_account, "containers": containers},
            "status": {"phase": "Running", "hostIP": node.ip, "podIP": node.ip,
                       "podIPs": [{"ip": node.ip}]},
        })
    }

    /// Volumes of pod `name` on `node` as podman `-v` sources: creates the node's hostPath
    /// paths (a directory, or an empty file for FileOrCreate), writes ConfigMap keys and the
    /// service account's files. Returns volume name -> (source, always read-only).
    fn volumes(
        &self,
        pod: &DaemonSetPod,
        name: &str,
        node: &NodeCtx,
    ) -> Res<BTreeMap<String, (PathBuf, bool)>> {
        let pod_dir = node.host_root.parent().unwrap().join("pods").join(name);
        let mut out = BTreeMap::new();
        for (vname, v) in &pod.volumes {
            let entry = match v {
                Volume::HostPath { path, .. }
                    if SHARED_HOST_PATHS.contains(&path.as_str()) && Path::new(path).is_dir() =>
                {
                    (PathBuf::from(path), true)
                }
                Volume::HostPath {
                    path,
                    file_or_create,
                } => {
                    let p = node.host_path(path);
                    if *file_or_create {
                        std::fs::create_dir_all(p.parent().unwrap())
                            .map_err(|e| format!("{}: {e}", p.display()))?;
                        std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&p)
                            .map_err(|e| format!("{}: {e}", p.display()))?;
                    } else if !p.exists() {
                        std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                    }
                    (p, false)
                }
                Volume::ConfigMap { name: cm } => {
                    let data = self.config_maps.get(cm).ok_or_else(|| {
                        format!("volume {vname}: no ConfigMap {cm:?} in the manifest")
                    })?;
                    let dir = pod_dir.join("configmap").join(vname);
                    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                    for (k, body) in data {
                        std::fs::write(dir.join(k), body)
                            .map_err(|e| format!("{}/{k}: {e}", dir.display()))?;
                    }
                    (dir, true)
                }
            };
            out.insert(vname.clone(), entry);
        }
        let sa = pod_dir.join("serviceaccount");
        std::fs::create_dir_all(&sa).map_err(|e| format!("{}: {e}", sa.display()))?;
        for (f, body) in [
            ("token", self.token.as_str()),
            ("ca.crt", self.ca_cert_pem.as_str()),
            ("namespace", pod.namespace.as_str()),
        ] {
            std::fs::write(sa.join(f), body).map_err(|e| format!("{}/{f}: {e}", sa.display()))?;
        }
        out.insert(String::new(), (sa, true));
        Ok(out)
    }

    fn env_value(pod: &DaemonSetPod, name: &str, node: &NodeCtx, v: &EnvValue) -> String {
        match v {
            EnvValue::Literal(s) => s.clone(),
            EnvValue::Field(PodField::Name) => name.to_string(),
            EnvValue::Field(PodField::Namespace) => pod.namespace.clone(),
            EnvValue::Field(PodField::NodeName) => node.name.clone(),
            EnvValue::Field(PodField::ServiceAccountName) => pod.service_account.clone(),
            EnvValue::Field(PodField::PodIp | PodField::HostIp) => node.ip.clone(),
        }
    }

    /// `podman run` arguments for one container of pod `name` on `node`.
    fn run_args(
        &self,
        pod: &DaemonSetPod,
        name: &str,
        node: &NodeCtx,
        c: &Container,
        vols: &BTreeMap<String, (PathBuf, bool)>,
        podman_name: &str,
    ) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--name".into(),
            podman_name.into(),
            "--pull".into(),
            "never".into(),
            "--network".into(),
            format!("ns:/var/run/netns/{}", node.netns),
            // hostNetwork pods see the node's host name.
            "--hostname".into(),
            node.name.clone(),
        ];
        for u in &self.ulimits {
            a.push("--ulimit".into());
            a.push(u.clone());
        }
        if c.privileged {
            a.push("--privileged".into());
        } else {
            a.push("--cap-drop=all".into());
            let mut caps: BTreeSet<String> = DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
            caps.extend(c.cap_add.iter().cloned());
            for cap in caps {
                a.push(format!("--cap-add={cap}"));
            }
        }
        // What the kubelet puts in every pod's environment: the API service, then the
        // container's own variables (which win).
        let mut env = vec![
            ("KUBERNETES_SERVICE_HOST".to_string(), self.api_host.clone()),
            (
                "KUBERNETES_SERVICE_PORT".to_string(),
                self.api_port.to_string(),
            ),
            (
                "KUBERNETES_SERVICE_PORT_HTTPS".to_string(),
                self.api_port.to_string(),
            ),
            (
                "KUBERNETES_PORT".to_string(),
                format!("tcp://{}:{}", self.api_host, self.api_port),
            ),
        ];
        for (k, v) in &c.env {
            env.push((k.clone(), Self::env_value(pod, name, node, v)));
        }
        for (k, v) in env {
            a.push("--env".into());
            a.push(format!("{k}={v}"));
        }
        for m in &c.mounts {
            let (src, forced_ro) = &vols[&m.volume];
            let ro = if m.read_only || *forced_ro { ":ro" } else { "" };
            a.push("--volume".into());
            a.push(format!("{}:{}{ro}", src.display(), m.path));
        }
        let (sa, _) = &vols[""];
        a.push("--volume".into());
        a.push(format!(
            "{}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
            sa.display()
        ));
        if let Some(cmd) = &c.command {
            a.push(format!(
                "--entrypoint={}",
                serde_json::to_string(cmd).expect("JSON")
            ));
        }
        a.push(self.image.clone());
        a.extend(c.args.iter().cloned());
        a
    }

    /// Runs the pod on `node` as a kubelet would: volumes, then each init container to
    /// completion in order (a non-zero exit is an error carrying its log), then every
    /// container, detached. Does not wait for readiness ([`Kubelet::wait_ready`]).
    pub fn run_pod(&mut self, pod: &DaemonSetPod, name: &str, node: &NodeCtx) -> Res<RunningPod> {
        let vols = self.volumes(pod, name, node)?;
        self.attempts += 1;
        let mut running = RunningPod {
            name: name.into(),
            containers: vec![],
        };
        for c in &pod.init_containers {
            let pname = format!("{}{}-{}-{}", self.prefix, node.name, self.attempts, c.name);
            let args = self.run_args(pod, name, node, c, &vols, &pname);
            self.created.push(pname.clone());
            let mut cmd = podman();
            cmd.arg("run").args(&args);
            let out = run(cmd, &format!("init container {}", c.name))?;
            let log = text(&out);
            let mut rm = podman();
            rm.args(["rm", "--force", &pname]);
            let _ = run(rm, "podman rm");
            if !out.status.success() {
                return Err(format!(
                    "init container {} of {name} on {} exited with {}:\n{log}",
                    c.name, node.name, out.status
                ));
            }
        }
        for c in &pod.containers {
            let pname = format!("{}{}-{}-{}", self.prefix, node.name, self.attempts, c.name);
            let args = self.run_args(pod, name, node, c, &vols, &pname);
            self.created.push(pname.clone());
            let mut cmd = podman();
            cmd.args(["run", "--detach"]).args(&args);
            let out = run(cmd, &format!("container {}", c.name))?;
            if !out.status.success() {
                return Err(format!(
                    "container {} of {name} on {}: podman run failed:\n{}",
                    c.name,
                    node.name,
                    text(&out)
                ));
            }
            running.containers.push((c.name.clone(), pname));
        }
        Ok(running)
    }

    /// A container's log so far.
    pub fn logs(&self, podman_name: &str) -> String {
        let mut cmd = podman();
        cmd.args(["logs", podman_name]);
        run(cmd, "podman logs")
            .map(|o| text(&o))
            .unwrap_or_else(|e| e)
    }

    /// Every container's log, headed by its name.
    pub fn all_logs(&self, p: &RunningPod) -> String {
        p.containers
            .iter()
            .map(|(c, pn)| format!("--- {c} ({pn}) ---\n{}", self.logs(pn)))
            .collect()
    }

    fn is_running(&self, podman_name: &str) -> bool {
        let mut cmd = podman();
        cmd.args(["inspect", "--format", "{{.State.Running}}", podman_name]);
        run(cmd, "podman inspect")
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
            .unwrap_or(false)
    }

    /// One httpGet probe from the node (the kubelet's place): 200-399 is success.
    pub fn probe(node: &NodeCtx, p: &HttpGet) -> bool {
        let host = p.host.clone().unwrap_or_else(|| node.ip.clone());
        let url = format!("http://{host}:{}{}", p.port, p.path);
        let out = Command::new("ip")
            .args(["netns", "exec", &node.netns, "curl", "--silent", "--output"])
            .args([
                "/dev/null",
                "--write-out",
                "%{http_code}",
                "--max-time",
                "2",
                &url,
            ])
            .stdin(Stdio::null())
            .output();
        out.ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u16>()
                    .ok()
            })
            .is_some_and(|code| (200..400).contains(&code))
    }

    /// Waits until every container of `running` with a readiness probe passes it (and its
    /// liveness probe), failing with the pod's logs if a container exits or `deadline` passes.
    pub fn wait_ready(
        &self,
        pod: &DaemonSetPod,
        running: &RunningPod,
        node: &NodeCtx,
        deadline: Duration,
    ) -> Res<Duration> {
        let start = Instant::now();
        let mut pending: Vec<&Container> = pod
            .containers
            .iter()
            .filter(|c| c.readiness.is_some() || c.liveness.is_some())
            .collect();
        loop {
            for (c, pn) in &running.containers {
                if !self.is_running(pn) {
                    return Err(format!(
                        "container {c} of {} on {} is not running\n{}",
                        running.name,
                        node.name,
                        self.all_logs(running)
                    ));
                }
            }
            pending.retain(|c| {
                ![&c.readiness, &c.liveness]
                    .into_iter()
                    .flatten()
                    .all(|p| Self::probe(node, p))
            });
            if pending.is_empty() {
                return Ok(start.elapsed());
            }
            if start.elapsed() > deadline {
                let names: Vec<&str> = pending.iter().map(|c| c.name.as_str()).collect();
                return Err(format!(
                    "{} on {}: {names:?} not ready after {deadline:?}\n{}",
                    running.name,
                    node.name,
                    self.all_logs(running)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops a pod as the kubelet does on deletion: SIGTERM to every container, SIGKILL after
    /// the grace period, then removes the containers. A container that had to be killed
    /// (exit code 137) is an error carrying its log: it ignored SIGTERM for the whole grace
    /// period. Returns how long the stop took.
    pub fn stop_pod(&mut self, running: &RunningPod, grace: Duration) -> Res<Duration> {
        let start = Instant::now();
        let names: Vec<&str> = running.containers.iter().map(|(_, p)| p.as_str()).collect();
        let mut stop = podman();
        stop.args(["stop", "--time", &grace.as_secs().to_string()])
            .args(&names);
        let out = run(stop, "podman stop")?;
        if !out.status.success() {
            return Err(format!("podman stop {names:?}: {}", text(&out)));
        }
        let took = start.elapsed();
        for (c, pn) in &running.containers {
            let mut inspect = podman();
            inspect.args(["inspect", "--format", "{{.State.ExitCode}}", pn]);
            let code = run(inspect, "podman inspect")?;
            let code = String::from_utf8_lossy(&code.stdout).trim().to_string();
            if code == "137" {
                return Err(format!(
                    "container {c} of {} ignored SIGTERM: killed after the {grace:?} grace period\n{}",
                    running.name,
                    self.logs(pn)
                ));
            }
        }
        let mut rm = podman();
        rm.args(["rm"]).args(&names);
        let out = run(rm, "podman rm")?;
        if !out.status.success() {
            return Err(format!("podman rm {names:?}: {}", text(&out)));
        }
        self.created.retain(|c| !names.contains(&c.as_str()));
        Ok(took)
    }

    /// Attaches pod netns `pod_netns` (pod `pod` of namespace `namespace`) on `node` as the
    /// container runtime would: the first config file (by name) in the node's
    /// `/etc/cni/net.d`, a conflist whose plugins from the node's `/opt/cni/bin` run in
    /// order, each given the previous one's result. Returns the final result.
    pub fn cni_add(node: &NodeCtx, namespace: &str, pod: &str, pod_netns: &str) -> Res<Value> {
        let confdir = node.host_path("/etc/cni/net.d");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&confdir)
            .map_err(|e| format!("{}: {e}", confdir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|x| x.to_str()),
                    Some("conf" | "conflist" | "json")
                )
            })
            .collect();
        files.sort();
        let file = files
            .first()
            .ok_or_else(|| format!("{}: no CNI config installed", confdir.display()))?;
        let raw = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let list: Value =
            serde_json::from_str(&raw).map_err(|e| format!("{}: {e}", file.display()))?;
        let plugins = list["plugins"]
            .as_array()
            .ok_or_else(|| format!("{}: not a conflist (no plugins)", file.display()))?;
        let pin = node.host_path(&format!("/run/netns/{pod}"));
        std::fs::create_dir_all(pin.parent().unwrap())
            .map_err(|e| format!("{}: {e}", pin.display()))?;
        std::fs::write(&pin, "").map_err(|e| format!("{}: {e}", pin.display()))?;
        let container_id = format!("{pod_netns}-sandbox");
        let mut prev: Option<Value> = None;
        for plugin in plugins {
            let mut conf = plugin.clone();
            let obj = conf
                .as_object_mut()
                .ok_or_else(|| format!("{}: a plugin is not an object", file.display()))?;
            obj.insert("name".into(), list["name"].clone());
            obj.insert("cniVersion".into(), list["cniVersion"].clone());
            // No pod asks for host ports, so no runtimeConfig is passed for the
            // "portMappings" capability (the runtime passes only what a pod uses).
            if let Some(p) = &prev {
                obj.insert("prevResult".into(), p.clone());
            }
            let kind = conf["type"]
                .as_str()
                .ok_or_else(|| format!("{}: a plugin has no type", file.display()))?
                .to_string();
            let out =
                Self::exec_plugin(node, pod, pod_netns, &container_id, namespace, &kind, &conf)?;
            prev = Some(out);
        }
        prev.ok_or_else(|| format!("{}: empty plugin list", file.display()))
    }

    /// Runs `/opt/cni/bin/<kind>` with `CNI_COMMAND=ADD` in the node's network namespace and a
    /// private mount namespace showing the node's runtime paths.
    fn exec_plugin(
        node: &NodeCtx,
        pod: &str,
        pod_netns: &str,
        container_id: &str,
        namespace: &str,
        kind: &str,
        conf: &Value,
    ) -> Res<Value> {
        // Each node path is bound over itself if the host has it, else the node's copy of its
        // nearest existing ancestor (never `/`) is bound there: mount points are never created
        // on the real host.
        let mut binds: Vec<(PathBuf, PathBuf)> = Vec::new();
        for p in NODE_RUNTIME_PATHS {
            let mut target = PathBuf::from(p);
            while !target.is_dir() {
                target = target.parent().unwrap().to_path_buf();
            }
            if target == Path::new("/") {
                return Err(format!("{p}: no ancestor of it on this host but /"));
            }
            let src = node.host_path(target.to_str().unwrap());
            std::fs::create_dir_all(node.host_path(p)).map_err(|e| format!("{p}: {e}"))?;
            if !binds.iter().any(|(_, t)| target.starts_with(t)) {
                binds.retain(|(_, t)| !t.starts_with(&target));
                binds.push((src, target));
            }
        }
        // Pin the pod's netns where the node's runtime would keep it, before /run is replaced.
        let mut script = String::from("set -e\nmount --bind \"/run/netns/$1\" \"$2\"\n");
        for (src, dst) in &binds {
            script.push_str(&format!(
                "mount --rbind '{}' '{}'\n",
                src.display(),
                dst.display()
            ));
        }
        script.push_str("shift 2\nexec \"$@\"\n");
        let pin = node.host_path(&format!("/run/netns/{pod}"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.netns])
            .args(["unshare", "--mount", "--propagation", "private", "--"])
            .args(["sh", "-c", &script, "sh", pod_netns])
            .arg(&pin)
            .arg(format!("/opt/cni/bin/{kind}"))
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", format!("/run/netns/{pod}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container_id}"
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("CNI {kind}: {e}"))?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .map_err(|e| format!("CNI {kind} stdin: {e}"))?;
        let out = child
            .wait_with_output()
            .map_err(|e| format!("CNI {kind}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "CNI ADD {kind} for {pod} on {} failed ({}): {}",
                node.name,
                out.status,
                text(&out)
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "CNI ADD {kind} for {pod}: result is not JSON ({e}): {}",
                text(&out)
            )
        })
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if self.created.is_empty() {
            return;
        }
        let mut rm = podman();
        rm.args(["rm", "--force", "--ignore", "--time", "0"])
            .args(&self.created);
        match run(rm, "podman rm") {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("kubelet cleanup: podman rm: {}", text(&o)),
            Err(e) => eprintln!("kubelet cleanup: {e}"),
        }
    }
}
