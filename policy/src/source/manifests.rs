//! A directory of YAML/JSON manifests: `*.yaml`, `*.yml`, `*.json` directly in the
//! directory (hidden files skipped), each possibly multi-document, holding Namespace,
//! Pod and NetworkPolicy objects, the cluster-scoped ClusterNetworkPolicy,
//! AdminNetworkPolicy, BaselineAdminNetworkPolicy and Node, or `List`s of them (`List`,
//! `PodList`, ...). Other kinds are ignored. An object with the same kind and
//! namespace/name as an earlier one replaces it (as an update would). A cluster-scoped
//! object that cannot be read breaks no namespace: its error goes to
//! [`Snapshot::broken_cluster`] (see [`Snapshot::keep_readable_cluster_policies`]). Changes are found by polling names, sizes and
//! modification times (every second in `run`).
//!
//! Limits: a file larger than [`MAX_FILE_BYTES`] is not read, and YAML aliases may expand
//! a file by at most [`ALIAS_ALLOWANCE`] nodes beyond its size in bytes, over all its
//! documents (each document is parsed on its own, so the parser's own per-parse limits
//! would allow that much again for every `---`). Either is an error naming the file (and
//! the document). An object that cannot be read breaks its namespace; an error that names
//! no namespace breaks those the file covers (see `Parsed::new`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use super::{ObjectError, Source, SourceError};
use crate::model::cluster::{cluster_policy_from_value, node_from_value};
use crate::model::{
    from_json_value, ClusterPolicy, ClusterPolicyKind, Namespace, NamespaceObject, NetworkPolicy,
    NetworkPolicyObject, Node, Pod, PodObject, Snapshot,
};

/// The largest manifest file that is read, YAML or JSON: 256 MiB, well above a
/// `kubectl get pods -o json` list of 10k pods.
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// How many nodes YAML aliases may add to a file, beyond its size in bytes. Without
/// aliases a document cannot have more nodes (scalars, sequences, mappings) than bytes, so
/// this is what alias expansion may add in all of a file's documents together. Anchors in
/// real manifests stand for a few labels or ports; an alias bomb needs millions.
pub const ALIAS_ALLOWANCE: usize = 100_000;

/// Nodes (scalars, arrays, objects; not keys) of a parsed document.
fn value_nodes(v: &Value) -> usize {
    let mut n = 0;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        n += 1;
        match v {
            Value::Array(a) => stack.extend(a),
            Value::Object(o) => stack.extend(o.values()),
            _ => {}
        }
    }
    n
}

/// Objects parsed from manifests.
#[derive(Debug, Default, Clone)]
struct Objects {
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    policies: Vec<NetworkPolicy>,
    cluster_policies: Vec<ClusterPolicy>,
    nodes: Vec<Node>,
}

impl Objects {
    fn extend(&mut self, o: Objects) {
        self.namespaces.extend(o.namespaces);
        self.pods.extend(o.pods);
        self.policies.extend(o.policies);
        self.cluster_policies.extend(o.cluster_policies);
        self.nodes.extend(o.nodes);
    }
}

/// The kinds of `List` read (their items may be of any kind read).
const LIST_KINDS: &[&str] = &[
    "List",
    "NamespaceList",
    "PodList",
    "NetworkPolicyList",
    "ClusterNetworkPolicyList",
    "AdminNetworkPolicyList",
    "BaselineAdminNetworkPolicyList",
    "NodeList",
];

/// Whether `kind` is a cluster-scoped kind that is read (its errors break no namespace).
fn is_cluster_kind(kind: &str) -> bool {
    kind == "Node" || ClusterPolicyKind::from_kind(kind).is_some()
}

/// Whether `e` is about a cluster-scoped object (`object` is `Kind name` of such a kind):
/// it goes to [`Snapshot::broken_cluster`], not to any namespace.
fn is_cluster_error(e: &ObjectError) -> bool {
    e.object
        .split_once(' ')
        .is_some_and(|(kind, _)| is_cluster_kind(kind))
}

/// What an object is (`Kind namespace/name`, `?` for what cannot be read) and the namespace
/// an error in it breaks: a Namespace's own name, else `metadata.namespace` (`default` when
/// absent or empty, as the API server defaults it). None when that cannot be read (then the
/// error is the file's, see [`ManifestDir`]).
fn identify(kind: &str, v: &Value) -> (String, Option<String>) {
    let meta = v.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty());
    if kind == "Namespace" {
        return (
            format!("Namespace {}", name.unwrap_or("?")),
            name.map(String::from),
        );
    }
    if is_cluster_kind(kind) {
        return (format!("{kind} {}", name.unwrap_or("?")), None);
    }
    let namespace = match meta {
        None | Some(Value::Null) => Some("default"),
        Some(Value::Object(m)) => match m.get("namespace") {
            None | Some(Value::Null) => Some("default"),
            Some(Value::String(s)) if s.is_empty() => Some("default"),
            Some(Value::String(s)) => Some(s.as_str()),
            Some(_) => None,
        },
        Some(_) => None,
    };
    (
        format!(
            "{kind} {}/{}",
            namespace.unwrap_or("?"),
            name.unwrap_or("?")
        ),
        namespace.map(String::from),
    )
}

fn add_object(
    mut v: Value,
    objs: &mut Objects,
    origin: &str,
    document: usize,
    item: Option<usize>,
    errors: &mut Vec<ObjectError>,
) {
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or_default();
    let (object, namespace) = match kind {
        "Namespace" | "Pod" | "NetworkPolicy" => identify(kind, &v),
        k if is_cluster_kind(k) => identify(kind, &v),
        // A List's own errors, or a document without kind: whose objects are they?
        _ => (String::new(), None),
    };
    let err = |field: String, message: String| ObjectError {
        origin: origin.to_string(),
        document: Some(document),
        item,
        object: object.clone(),
        namespace: namespace.clone(),
        field,
        message,
    };
    match kind {
        "" => errors.push(err("kind".into(), "missing".into())),
        k if LIST_KINDS.contains(&k) => {
            if item.is_some() {
                errors.push(err("kind".into(), "a List inside a List".into()));
                return;
            }
            // Items are moved out, not cloned: a 10k-pod list is most of the memory.
            let items = match v.get_mut("items").map(Value::take) {
                Some(Value::Array(items)) => items,
                Some(Value::Null) | None => return,
                Some(_) => {
                    errors.push(err("items".into(), "must be a list".into()));
                    return;
                }
            };
            for (i, it) in items.into_iter().enumerate() {
                add_object(it, objs, origin, document, Some(i), errors);
            }
        }
        "Namespace" => match from_json_value::<NamespaceObject>(v).and_then(|o| o.into_model()) {
            Ok(n) => objs.namespaces.push(n),
            Err(e) => errors.push(err(e.field, e.message)),
        },
        "Pod" => match from_json_value::<PodObject>(v).and_then(|o| o.into_model()) {
            Ok(p) => objs.pods.push(p),
            Err(e) => errors.push(err(e.field, e.message)),
        },
        "NetworkPolicy" => {
            match from_json_value::<NetworkPolicyObject>(v).and_then(|o| o.into_model()) {
                Ok(p) => objs.policies.push(p),
                Err(e) => errors.push(err(e.field, e.message)),
            }
        }
        "Node" => match node_from_value(v) {
            Ok(n) => objs.nodes.push(n),
            Err(e) => errors.push(err(e.field, e.message)),
        },
        k if ClusterPolicyKind::from_kind(k).is_some() => match cluster_policy_from_value(v) {
            Ok(p) => objs.cluster_policies.push(p),
            Err(e) => errors.push(err(e.field, e.message)),
        },
        _ => {}
    }
}

/// Splits YAML text into documents at `---` / `...` marker lines (column 0), keeping
/// empty documents so that indices count every document, as `kubectl` users see them.
/// Returns (first line number from 1, text) per document.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = vec![(1, String::new())];
    for (i, line) in text.lines().enumerate() {
        let marker = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if marker {
            docs.push((i + 2, line[3..].to_string() + "\n"));
        } else if line == "..." {
            docs.push((i + 2, String::new()));
        } else {
            let d = &mut docs.last_mut().expect("non-empty").1;
            d.push_str(line);
            d.push('\n');
        }
    }
    // A leading `---` opens the first document; drop the empty one before it.
    if docs.len() > 1 && is_blank(&docs[0].1) && text.trim_start().starts_with("---") {
        docs.remove(0);
    }
    docs
}

fn is_blank(doc: &str) -> bool {
    doc.lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#') || l.trim() == "%YAML 1.2")
}

/// Parses one manifest file's text (YAML, which includes JSON) into `objs`. Booleans are
/// only `true`/`false` (so `name: y` or `on` stay strings, as in YAML 1.2).
///
/// The documents together may have at most `text.len() + ALIAS_ALLOWANCE` nodes. Each
/// document may replay at most what is left of that in alias events, so a bomb stops
/// inside the parser before its tree is built; a document that fails after it may have
/// replayed aliases is charged the whole amount it was allowed. Going over is an error
/// naming the document, and the rest of the file is not read.
fn parse_text(text: &str, origin: &str, objs: &mut Objects, errors: &mut Vec<ObjectError>) {
    let budget = text.len().saturating_add(ALIAS_ALLOWANCE);
    let mut used = 0usize;
    for (i, (line, doc)) in split_documents(text).into_iter().enumerate() {
        if is_blank(&doc) {
            continue;
        }
        let err = |message: String| ObjectError {
            origin: origin.to_string(),
            document: Some(i),
            item: None,
            object: String::new(),
            namespace: None,
            field: String::new(),
            message,
        };
        let replay = ALIAS_ALLOWANCE.min(budget - used);
        // Both are #[non_exhaustive]: set from their defaults.
        let mut alias_limits = serde_saphyr::options::AliasLimits::default();
        alias_limits.max_total_replayed_events = replay;
        let opts = serde_saphyr::options! {
            strict_booleans: true,
            alias_limits: alias_limits,
        };
        let v: Value = match serde_saphyr::from_str_with_options(&doc, opts) {
            Ok(v) => v,
            Err(e) => {
                let e = e.to_string();
                if e.contains("alias replay limit") {
                    errors.push(err(format!(
                        "invalid YAML (document starts at line {line}): {e}: YAML aliases may add at most {ALIAS_ALLOWANCE} nodes to a file, over all its documents; the rest of the file is not read"
                    )));
                    return;
                }
                errors.push(err(format!(
                    "invalid YAML (document starts at line {line}): {e}"
                )));
                // Without a `*` there is no alias, hence nothing replayed.
                if doc.contains('*') {
                    used += replay;
                }
                continue;
            }
        };
        used = used.saturating_add(value_nodes(&v));
        if used > budget {
            errors.push(err(format!(
                "YAML aliases expand the file to more than {budget} nodes (its {} bytes plus {ALIAS_ALLOWANCE}) by the document starting at line {line}; the rest of the file is not read",
                text.len()
            )));
            return;
        }
        match v {
            Value::Null => {}
            Value::Object(_) => add_object(v, objs, origin, i, None, errors),
            _ => errors.push(err("not a mapping".into())),
        }
    }
}

/// Parses a `.json` file: one JSON value, or several one after the other (document `i`
/// is the i-th value). serde_json, not the YAML parser: large `kubectl get -o json`
/// lists (10k pods) exceed the YAML parser's node budget and parse faster this way.
fn parse_json(text: &str, origin: &str, objs: &mut Objects, errors: &mut Vec<ObjectError>) {
    for (i, doc) in serde_json::Deserializer::from_str(text)
        .into_iter::<JsonDoc>()
        .enumerate()
    {
        match doc {
            Ok(doc) => doc.add_to(objs, origin, i, errors),
            Err(e) => {
                errors.push(ObjectError {
                    origin: origin.to_string(),
                    document: Some(i),
                    item: None,
                    object: String::new(),
                    namespace: None,
                    field: String::new(),
                    message: format!("invalid JSON: {e}"),
                });
                break;
            }
        }
    }
}

/// One top-level JSON document, read as a stream: the elements of its `items` are converted
/// to model objects one at a time, as they are parsed, so a 10k-pod list never exists as one
/// `Value` tree (that tree used to be most of twill-policy's peak memory). Whether they were
/// list items is only known at the end (`kubectl` writes `items` before `kind`).
enum JsonDoc {
    Null,
    NotAnObject,
    Object {
        /// Every member but `items`.
        rest: serde_json::Map<String, Value>,
        items: Option<JsonItems>,
    },
}

/// The `items` member, already converted (origin and document are filled in later).
enum JsonItems {
    Converted(Box<Objects>, Vec<ObjectError>),
    NotAList,
}

impl JsonDoc {
    fn add_to(
        self,
        objs: &mut Objects,
        origin: &str,
        document: usize,
        errors: &mut Vec<ObjectError>,
    ) {
        let (rest, items) = match self {
            JsonDoc::Null => return,
            JsonDoc::NotAnObject => {
                errors.push(ObjectError {
                    origin: origin.to_string(),
                    document: Some(document),
                    item: None,
                    object: String::new(),
                    namespace: None,
                    field: String::new(),
                    message: "not an object".into(),
                });
                return;
            }
            JsonDoc::Object { rest, items } => (rest, items),
        };
        let kind = rest.get("kind").and_then(Value::as_str).unwrap_or_default();
        if !LIST_KINDS.contains(&kind) {
            // Not a list: the object as a whole (an `items` member means nothing to it).
            return add_object(Value::Object(rest), objs, origin, document, None, errors);
        }
        match items {
            None => {}
            Some(JsonItems::NotAList) => errors.push(ObjectError {
                origin: origin.to_string(),
                document: Some(document),
                item: None,
                object: String::new(),
                namespace: None,
                field: "items".into(),
                message: "must be a list".into(),
            }),
            Some(JsonItems::Converted(o, errs)) => {
                objs.extend(*o);
                errors.extend(errs.into_iter().map(|e| ObjectError {
                    origin: origin.to_string(),
                    document: Some(document),
                    ..e
                }));
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for JsonDoc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = JsonDoc;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_unit<E>(self) -> Result<JsonDoc, E> {
                Ok(JsonDoc::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<JsonDoc, E> {
                Ok(JsonDoc::NotAnObject)
            }
            fn visit_i64<E>(self, _: i64) -> Result<JsonDoc, E> {
                Ok(JsonDoc::NotAnObject)
            }
            fn visit_u64<E>(self, _: u64) -> Result<JsonDoc, E> {
                Ok(JsonDoc::NotAnObject)
            }
            fn visit_f64<E>(self, _: f64) -> Result<JsonDoc, E> {
                Ok(JsonDoc::NotAnObject)
            }
            fn visit_str<E>(self, _: &str) -> Result<JsonDoc, E> {
                Ok(JsonDoc::NotAnObject)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<JsonDoc, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(JsonDoc::NotAnObject)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<JsonDoc, A::Error> {
                let mut rest = serde_json::Map::new();
                let mut items = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "items" {
                        items = Some(map.next_value::<JsonItems>()?);
                    } else {
                        let v = map.next_value::<Value>()?;
                        rest.insert(key, v);
                    }
                }
                Ok(JsonDoc::Object { rest, items })
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> serde::Deserialize<'de> for JsonItems {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = JsonItems;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of objects")
            }
            fn visit_unit<E>(self) -> Result<JsonItems, E> {
                Ok(JsonItems::Converted(Box::default(), Vec::new()))
            }
            fn visit_bool<E>(self, _: bool) -> Result<JsonItems, E> {
                Ok(JsonItems::NotAList)
            }
            fn visit_i64<E>(self, _: i64) -> Result<JsonItems, E> {
                Ok(JsonItems::NotAList)
            }
            fn visit_u64<E>(self, _: u64) -> Result<JsonItems, E> {
                Ok(JsonItems::NotAList)
            }
            fn visit_f64<E>(self, _: f64) -> Result<JsonItems, E> {
                Ok(JsonItems::NotAList)
            }
            fn visit_str<E>(self, _: &str) -> Result<JsonItems, E> {
                Ok(JsonItems::NotAList)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<JsonItems, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(JsonItems::NotAList)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<JsonItems, A::Error> {
                let (mut objs, mut errors) = (Objects::default(), Vec::new());
                let mut i = 0;
                while let Some(item) = seq.next_element::<Value>()? {
                    add_object(item, &mut objs, "", 0, Some(i), &mut errors);
                    i += 1;
                }
                Ok(JsonItems::Converted(Box::new(objs), errors))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses manifest text into a snapshot (for tests and tools), as [`ManifestDir`] does
/// for a file read for the first time.
pub fn parse_str(text: &str, origin: &str) -> Snapshot {
    let mut objs = Objects::default();
    let mut errors = Vec::new();
    parse_text(text, origin, &mut objs, &mut errors);
    let p = Parsed::new((0, None, 0), objs, errors, None);
    snapshot_of(std::iter::once(&p))
}

/// The namespaces `objs` has objects in.
fn namespaces_of(objs: &Objects) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = objs.namespaces.iter().map(|n| n.name.clone()).collect();
    out.extend(objs.pods.iter().map(|p| p.namespace.clone()));
    out.extend(objs.policies.iter().map(|p| p.namespace.clone()));
    out
}

/// The snapshot of some parsed files.
fn snapshot_of<'a>(files: impl IntoIterator<Item = &'a Parsed> + Clone) -> Snapshot {
    let all = |f: &dyn Fn(&'a Parsed) -> usize| files.clone().into_iter().map(f).sum::<usize>();
    let mut objs = Objects {
        namespaces: Vec::with_capacity(all(&|p| p.objs.namespaces.len())),
        pods: Vec::with_capacity(all(&|p| p.objs.pods.len())),
        policies: Vec::with_capacity(all(&|p| p.objs.policies.len())),
        cluster_policies: Vec::new(),
        nodes: Vec::new(),
    };
    let (mut broken, mut unattributed, mut broken_cluster) = (Vec::new(), Vec::new(), Vec::new());
    for p in files {
        objs.namespaces.extend(p.objs.namespaces.iter().cloned());
        objs.pods.extend(p.objs.pods.iter().cloned());
        objs.policies.extend(p.objs.policies.iter().cloned());
        objs.cluster_policies
            .extend(p.objs.cluster_policies.iter().cloned());
        objs.nodes.extend(p.objs.nodes.iter().cloned());
        broken.extend(p.broken.iter().cloned());
        unattributed.extend(p.unattributed.iter().cloned());
        broken_cluster.extend(p.broken_cluster.iter().cloned());
    }
    let mut s = Snapshot::new(objs.namespaces, objs.pods, objs.policies)
        .with_broken(broken)
        .with_cluster_policies(objs.cluster_policies)
        .with_nodes(objs.nodes);
    s.unattributed = unattributed;
    s.broken_cluster = broken_cluster;
    s
}

/// What identifies one version of a file: size, modification time, inode.
type FileKey = (u64, Option<SystemTime>, u64);

/// One file's parse result, kept until the file changes.
#[derive(Debug)]
struct Parsed {
    key: FileKey,
    /// The objects used: this version's, or if it has errors that name no namespace, those
    /// of the file's last version without such errors (if there was one).
    objs: Objects,
    /// Whether `objs` are those of a version without errors that name no namespace.
    whole: bool,
    /// Errors by the namespace they break.
    broken: Vec<(String, ObjectError)>,
    /// Errors that broke no namespace.
    unattributed: Vec<ObjectError>,
    /// Errors of cluster-scoped objects ([`Snapshot::broken_cluster`]).
    broken_cluster: Vec<ObjectError>,
}

impl Parsed {
    /// Attributes the `errors` of one version of a file whose objects are `now`; `previous`
    /// is what the file's cache held before.
    ///
    /// An object whose namespace can be read breaks that namespace only. An error that
    /// names no namespace (YAML or JSON that does not parse, a document without `kind`, a
    /// bad `List`, a file that cannot be read) loses an unknown part of the file: the file's
    /// last version without such errors keeps being used (if there was one), and every
    /// namespace that version or the readable part of this one has objects in is broken,
    /// since the lost part may have changed any of their objects. A file that never had a
    /// version without such errors and holds nothing readable breaks nothing: it counts as
    /// not written yet (its errors go to [`Snapshot::unattributed`]). Other files, and the
    /// namespaces they alone cover, are unaffected. Errors of cluster-scoped objects that
    /// were identified (`Kind name`) go to [`Snapshot::broken_cluster`] and lose nothing
    /// else.
    fn new(
        key: FileKey,
        now: Objects,
        errors: Vec<ObjectError>,
        previous: Option<Parsed>,
    ) -> Parsed {
        let (broken_cluster, errors): (Vec<ObjectError>, Vec<ObjectError>) =
            errors.into_iter().partition(is_cluster_error);
        let whole_now = errors.iter().all(|e| e.namespace.is_some());
        let mut covered = BTreeSet::new();
        if !whole_now {
            covered = namespaces_of(&now);
            if let Some(p) = &previous {
                covered.extend(namespaces_of(&p.objs));
                // Namespaces the previous version broke: their bad objects are in no
                // version's objects, and the lost part may still hold them.
                covered.extend(p.broken.iter().map(|(ns, _)| ns.clone()));
            }
        }
        let (objs, whole) = match previous {
            _ if whole_now => (now, true),
            Some(p) if p.whole => (p.objs, true),
            _ => (now, false),
        };
        let (mut broken, mut unattributed) = (Vec::new(), Vec::new());
        for e in errors {
            match e.namespace.clone() {
                Some(ns) => broken.push((ns, e)),
                None if covered.is_empty() => unattributed.push(e),
                None => broken.extend(covered.iter().map(|ns| (ns.clone(), e.clone()))),
            }
        }
        Parsed {
            key,
            objs,
            whole,
            broken,
            unattributed,
            broken_cluster,
        }
    }
}

/// Reads a directory of manifests. Each file's parsed objects are cached by size,
/// modification time and inode: a snapshot re-reads only files that changed.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    seen: Vec<(PathBuf, FileKey)>,
    cache: std::collections::HashMap<PathBuf, Parsed>,
    /// How often `wait_change` looks.
    pub poll: Duration,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> ManifestDir {
        ManifestDir {
            dir: dir.into(),
            seen: Vec::new(),
            cache: std::collections::HashMap::new(),
            poll: Duration::from_secs(1),
        }
    }

    fn files(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default();
            if !name.starts_with('.') && matches!(ext, "yaml" | "yml" | "json") && p.is_file() {
                out.push(p);
            }
        }
        out.sort();
        Ok(out)
    }

    fn fingerprint(&self) -> Vec<(PathBuf, FileKey)> {
        self.files()
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let key = file_key(&p);
                (p, key)
            })
            .collect()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn file_key(p: &Path) -> FileKey {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(p) {
        Ok(m) => (m.len(), m.modified().ok(), m.ino()),
        Err(_) => (0, None, 0),
    }
}

/// Why a manifest file was not read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    /// Its size in bytes, over [`MAX_FILE_BYTES`].
    #[error(
        "file is {0} bytes, more than the {max} ({mib} MiB) a manifest file may have; not read",
        max = MAX_FILE_BYTES,
        mib = MAX_FILE_BYTES >> 20
    )]
    TooBig(u64),
}

/// Reads a file of at most [`MAX_FILE_BYTES`].
fn read_capped(f: &Path) -> Result<String, ReadError> {
    use std::io::Read;
    let file = std::fs::File::open(f)?;
    let len = file.metadata()?.len();
    if len > MAX_FILE_BYTES {
        return Err(ReadError::TooBig(len));
    }
    let mut text = String::with_capacity(len as usize);
    // The file may have grown since: never read more than the cap (plus one byte to tell).
    file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(ReadError::TooBig(text.len() as u64));
    }
    Ok(text)
}

/// Reads and parses one file.
fn parse_file(f: &Path) -> (Objects, Vec<ObjectError>) {
    let origin = f.display().to_string();
    let mut objs = Objects::default();
    let mut errors = Vec::new();
    match read_capped(f) {
        Ok(text) if f.extension().is_some_and(|e| e == "json") => {
            parse_json(&text, &origin, &mut objs, &mut errors)
        }
        Ok(text) => parse_text(&text, &origin, &mut objs, &mut errors),
        Err(e) => errors.push(ObjectError {
            origin,
            message: e.to_string(),
            ..ObjectError::default()
        }),
    }
    (objs, errors)
}

impl Source for ManifestDir {
    fn snapshot(&mut self) -> Result<Snapshot, SourceError> {
        self.seen = self.fingerprint();
        let files = self.files().map_err(|e| SourceError {
            errors: vec![ObjectError {
                origin: self.dir.display().to_string(),
                document: None,
                item: None,
                object: String::new(),
                namespace: None,
                field: String::new(),
                message: format!("cannot read directory: {e}"),
            }],
        })?;
        let mut cache = std::collections::HashMap::with_capacity(files.len());
        for f in files {
            // The key is taken before reading: a write during the read changes the key
            // again, so the file is read once more next time.
            let key = file_key(&f);
            let parsed = match self.cache.remove(&f) {
                Some(p) if p.key == key && key.1.is_some() => p,
                previous => {
                    let (objs, errors) = parse_file(&f);
                    Parsed::new(key, objs, errors, previous)
                }
            };
            cache.insert(f, parsed);
        }
        self.cache = cache;
        // In file order, so that a later object replaces an earlier one.
        let mut files: Vec<&Parsed> = Vec::with_capacity(self.cache.len());
        let mut names: Vec<&PathBuf> = self.cache.keys().collect();
        names.sort();
        files.extend(names.into_iter().map(|n| &self.cache[n]));
        Ok(snapshot_of(files))
    }

    fn wait_change(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.fingerprint() != self.seen {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            std::thread::sleep(self.poll.min(deadline - now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every distinct error of a snapshot, in file, document and item order.
    fn errs(s: Snapshot) -> SourceError {
        let mut errors: Vec<ObjectError> = s.broken.into_values().flatten().collect();
        errors.extend(s.unattributed);
        errors.sort_by(|a, b| {
            (&a.origin, a.document, a.item, &a.field)
                .cmp(&(&b.origin, b.document, b.item, &b.field))
        });
        errors.dedup();
        SourceError { errors }
    }

    /// The snapshot, which must have no errors.
    fn ok(s: Snapshot) -> Snapshot {
        assert!(s.broken.is_empty() && s.unattributed.is_empty(), "{s:?}");
        s
    }

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: x, labels: {pod: a}}
  spec:
    nodeName: n1
    containers:
    - name: c
      ports: [{name: http, containerPort: 80}]
  status: {podIPs: [{ip: 10.244.1.2}]}
- kind: Service
  metadata: {name: ignored}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec:
  podSelector: {}
  egress:
  - ports: [{port: http}]
"#;

    #[test]
    fn multi_document_and_lists() {
        let s = ok(parse_str(GOOD, "good.yaml"));
        assert_eq!(s.namespaces["x"].labels["team"], "a");
        assert_eq!(s.namespaces["x"].labels["kubernetes.io/metadata.name"], "x");
        assert_eq!(s.pods.len(), 1);
        assert_eq!(
            s.pods[0].ips,
            vec!["10.244.1.2".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(s.policies.len(), 1);
        // policyTypes defaulted to Ingress + Egress because there are egress rules.
        assert_eq!(s.policies[0].policy_types.len(), 2);
    }

    #[test]
    fn errors_name_file_document_item_and_field() {
        let bad = GOOD
            .replace("containerPort: 80", "containerPort: 0")
            .replace(
                "- ports: [{port: http}]",
                "- ports: [{port: http, protocol: ICMP}]",
            );
        let e = errs(parse_str(&bad, "bad.yaml"));
        let msgs: Vec<String> = e.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(e.errors.len(), 2, "{msgs:?}");
        assert_eq!(e.errors[0].document, Some(2));
        assert_eq!(e.errors[0].item, Some(0));
        assert_eq!(
            e.errors[0].field,
            "spec.containers[0].ports[0].containerPort"
        );
        assert_eq!(e.errors[1].document, Some(3));
        assert_eq!(e.errors[1].field, "spec.egress[0].ports[0].protocol");
        assert!(
            msgs[1].starts_with(
                "bad.yaml: document 3: NetworkPolicy x/p: spec.egress[0].ports[0].protocol: "
            ),
            "{msgs:?}"
        );
        // The object's namespace is the one each error breaks.
        assert_eq!(e.errors[0].namespace.as_deref(), Some("x"));
        assert!(
            msgs[0].contains("containerPort: 0 must be between"),
            "{msgs:?}"
        );
        let e = errs(parse_str("kind: [", "syntax.yaml"));
        assert!(e.errors[0].message.contains("invalid YAML"), "{e}");
    }

    fn parse_json_str(text: &str) -> (Objects, Vec<ObjectError>) {
        let (mut objs, mut errors) = (Objects::default(), Vec::new());
        parse_json(text, "x.json", &mut objs, &mut errors);
        (objs, errors)
    }

    #[test]
    fn json_files_are_parsed_as_json_without_the_yaml_node_budget() {
        let dir = std::env::temp_dir().join(format!("twill-policy-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // 20k pods: well over the YAML parser's 250k-node budget.
        let items: Vec<Value> = (0..20_000)
            .map(|i| {
                serde_json::json!({"kind": "Pod", "metadata": {"name": format!("p{i}"), "namespace": "x",
                    "labels": {"app": "a", "n": i.to_string()}},
                    "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
                    "status": {"podIPs": [{"ip": format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)}]}})
            })
            .collect();
        let list = serde_json::json!({"kind": "List", "items": items});
        std::fs::write(dir.join("pods.json"), list.to_string()).unwrap();
        std::fs::write(
            dir.join("more.json"),
            r#"{"kind":"Namespace","metadata":{"name":"x"}} {"kind":"Namespace","metadata":{"name":"y"}}"#,
        )
        .unwrap();
        let s = ManifestDir::new(&dir).snapshot().unwrap();
        assert_eq!(s.pods.len(), 20_000);
        assert_eq!(s.namespaces.len(), 2);
        // Streamed list items keep their file, document, item and field in errors; `items`
        // may come before `kind` (as kubectl writes it).
        let e = parse_json_str(
            r#"{"kind":"Namespace","metadata":{"name":"z"}}
{"items":[{"kind":"Namespace","metadata":{"name":"q"}},{"kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"ports":[{"containerPort":0}]}]}}],"kind":"List"}
{"kind":"List","items":7}
[1]
{"items":[{"kind":"Namespace","metadata":{"name":"ignored"}}],"kind":"Namespace","metadata":{"name":"w"}}"#,
        );
        let msgs: Vec<String> = e.1.iter().map(|e| e.to_string()).collect();
        assert_eq!(e.1.len(), 3, "{msgs:?}");
        assert_eq!(
            (e.1[0].document, e.1[0].item),
            (Some(1), Some(1)),
            "{msgs:?}"
        );
        assert_eq!(e.1[0].field, "spec.containers[0].ports[0].containerPort");
        assert!(
            msgs[0].starts_with("x.json: document 1: items[1]: Pod default/p: spec."),
            "{msgs:?}"
        );
        assert_eq!((e.1[1].document, e.1[1].field.as_str()), (Some(2), "items"));
        assert_eq!(e.1[1].message, "must be a list");
        assert_eq!(
            (e.1[2].document, e.1[2].message.as_str()),
            (Some(3), "not an object")
        );
        let names: Vec<&str> = e.0.namespaces.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["z", "q", "w"]);
        std::fs::write(
            dir.join("more.json"),
            r#"{"kind":"Namespace","metadata":{"name":"x"}} {oops"#,
        )
        .unwrap();
        let e = errs(ManifestDir::new(&dir).snapshot().unwrap());
        assert_eq!(e.errors.len(), 1, "{e}");
        assert_eq!(e.errors[0].document, Some(1), "{e}");
        assert!(e.errors[0].message.contains("invalid JSON"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A ConfigMap whose `data` nests `levels` aliases ten wide: 10^levels scalars.
    fn laughs(levels: usize) -> String {
        let mut doc = String::from("kind: ConfigMap\nmetadata: {name: lol}\ndata:\n");
        doc.push_str("  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..levels {
            let prev = format!("*l{}", i - 1);
            doc.push_str(&format!("  l{i}: &l{i} [{}]\n", vec![prev; 10].join(", ")));
        }
        doc
    }

    #[test]
    fn yaml_alias_expansion_is_bounded_per_file() {
        // One document expanding to 10^7 scalars (the parser's default allowed 10^6 replayed
        // events in every document).
        let e = errs(parse_str(&laughs(7), "bomb.yaml"));
        assert_eq!(e.errors.len(), 1, "{e}");
        assert_eq!(e.errors[0].origin, "bomb.yaml");
        assert_eq!(e.errors[0].document, Some(0));
        assert!(e.errors[0].message.contains("alias replay limit"), "{e}");
        assert!(
            e.errors[0]
                .message
                .contains("at most 100000 nodes to a file"),
            "{e}"
        );
        // Documents that each stay well inside a per-document limit (11k nodes from 0.5 kB)
        // add up over the file: 200 of them were 2.2M nodes. The one that goes over the
        // file's allowance is named and the rest of the file is not read.
        let doc = laughs(4);
        let file = vec![doc.as_str(); 200].join("---\n");
        let e = errs(parse_str(&file, "many.yaml"));
        assert_eq!(e.errors.len(), 1, "{e}");
        let d = e.errors[0].document.unwrap();
        assert!((5..15).contains(&d), "{e}");
        assert!(
            e.errors[0]
                .message
                .contains("the rest of the file is not read"),
            "{e}"
        );
        // Documents that fail after replaying aliases count as having used what they were
        // allowed: 200 of them do not replay 200 times 11k events.
        let bad = format!("{doc}metadata: {{name: again}}\n");
        let file = vec![bad.as_str(); 200].join("---\n");
        let e = errs(parse_str(&file, "bad.yaml"));
        assert!(e.errors.len() < 10, "{} errors", e.errors.len());
        let last = e.errors.last().unwrap();
        assert!(
            last.message.contains("the rest of the file is not read"),
            "{e}"
        );
        // Anchors as real manifests use them are fine, any number of documents.
        let doc = "kind: Namespace\nmetadata:\n  name: NAME\n  labels: &l {team: a, env: prod}\n  annotations: *l\n";
        let file: Vec<String> = (0..2000)
            .map(|i| doc.replace("NAME", &format!("n{i}")))
            .collect();
        let s = ok(parse_str(&file.join("---\n"), "ok.yaml"));
        assert_eq!(s.namespaces.len(), 2000);
        assert_eq!(s.namespaces["n7"].labels["env"], "prod");
    }

    #[test]
    fn files_over_the_size_cap_are_not_read() {
        let dir = std::env::temp_dir().join(format!("twill-policy-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), GOOD).unwrap();
        // Sparse: nothing is written to disk, and nothing of it is read.
        let big = std::fs::File::create(dir.join("big.json")).unwrap();
        big.set_len(MAX_FILE_BYTES + 1).unwrap();
        let mut src = ManifestDir::new(&dir);
        let e = errs(src.snapshot().unwrap());
        assert_eq!(e.errors.len(), 1, "{e}");
        assert!(e.errors[0].origin.ends_with("big.json"), "{e}");
        assert_eq!(e.errors[0].document, None);
        assert!(
            e.errors[0]
                .message
                .starts_with("file is 268435457 bytes, more than the 268435456 (256 MiB)"),
            "{e}"
        );
        // Back to a good state once the file is gone.
        std::fs::remove_file(dir.join("big.json")).unwrap();
        assert_eq!(src.snapshot().unwrap().pods.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn directory_source_polls_for_changes() {
        let dir = std::env::temp_dir().join(format!("twill-policy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.join(".hidden.yaml"), "kind: [").unwrap();
        std::fs::write(dir.join("notes.txt"), "kind: [").unwrap();
        let mut src = ManifestDir::new(&dir);
        src.poll = Duration::from_millis(20);
        let s = src.snapshot().unwrap();
        assert_eq!(s.pods.len(), 1);
        assert!(!src.wait_change(Duration::from_millis(50)));
        std::fs::write(dir.join("b.yml"), "kind: Namespace\nmetadata: {name: y}\n").unwrap();
        assert!(src.wait_change(Duration::from_secs(2)));
        assert_eq!(src.snapshot().unwrap().namespaces.len(), 2);
        std::fs::write(dir.join("b.yml"), "kind: Namespace\nmetadata: {nam: y}\n").unwrap();
        assert!(src.wait_change(Duration::from_secs(2)));
        let e = errs(src.snapshot().unwrap());
        assert!(e.errors[0].origin.ends_with("b.yml"));
        assert_eq!(e.errors[0].field, "metadata.name");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    const CLUSTER: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: deny-tenants}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {tenant: a}}}
  ingress:
  - {name: no-b, action: Deny, from: [{namespaces: {matchLabels: {tenant: b}}}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: policy.networking.k8s.io/v1alpha1
  kind: AdminNetworkPolicy
  metadata: {name: dns}
  spec:
    priority: 1
    subject: {namespaces: {}}
    egress: [{action: Allow, to: [{networks: [10.96.0.10/32]}], ports: [{portNumber: {protocol: UDP, port: 53}}]}]
- apiVersion: policy.networking.k8s.io/v1alpha2
  kind: ClusterNetworkPolicy
  metadata: {name: broken}
  spec: {tier: Admin, priority: 1001, subject: {namespaces: {}}}
- apiVersion: v1
  kind: Node
  metadata: {name: n1, labels: {role: worker}}
  status: {addresses: [{type: InternalIP, address: 198.18.0.1}, {type: Hostname, address: n1}]}
- apiVersion: v1
  kind: Node
  metadata: {name: n2}
  status: {addresses: [{type: InternalIP, address: not-an-ip}]}
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicyList
items:
- apiVersion: policy.networking.k8s.io/v1alpha1
  kind: BaselineAdminNetworkPolicy
  metadata: {name: default}
  spec:
    subject: {namespaces: {}}
    ingress: [{action: Deny, from: [{namespaces: {}}]}]
"#;

    #[test]
    fn cluster_policies_and_nodes_are_read_and_their_errors_break_no_namespace() {
        let s = parse_str(&format!("{GOOD}---\n{CLUSTER}"), "m.yaml");
        assert!(s.broken.is_empty() && s.unattributed.is_empty(), "{s:?}");
        let keys: Vec<String> = s.cluster_policies.iter().map(|p| p.key()).collect();
        // In evaluation order: Admin tier by priority, then Baseline.
        assert_eq!(keys, ["anp/dns", "cnp/deny-tenants", "banp/default"]);
        assert_eq!(s.nodes.len(), 1);
        assert_eq!(s.nodes[0].name, "n1");
        let e: Vec<String> = s.broken_cluster.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            e,
            [
                "m.yaml: document 5: items[1]: ClusterNetworkPolicy broken: spec.priority: 1001 must be between 0 and 1000",
                r#"m.yaml: document 5: items[3]: Node n2: status.addresses[0].address: "not-an-ip" is not an IP address"#,
            ]
        );
        assert!(s.broken_cluster.iter().all(|e| e.namespace.is_none()));
        // The same as JSON, item by item from a streamed list.
        let list = serde_json::json!({"kind": "List", "items": [
            {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
             "metadata": {"name": "c"}, "spec": {"tier": "Baseline", "priority": 0, "subject": {"namespaces": {}}}},
            {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
             "metadata": {"name": "d"}, "spec": {"tier": "Middle", "priority": 0, "subject": {"namespaces": {}}}},
            {"kind": "Node", "metadata": {"name": "n3"}}]});
        let (objs, errors) = parse_json_str(&list.to_string());
        assert_eq!(objs.cluster_policies.len(), 1);
        assert_eq!(objs.nodes.len(), 1);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].object, "ClusterNetworkPolicy d");
        assert!(is_cluster_error(&errors[0]));
    }

    #[test]
    fn a_broken_cluster_policy_file_keeps_namespaces_and_other_files_whole() {
        let dir = std::env::temp_dir().join(format!("twill-policy-cnp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.join("c.yaml"), CLUSTER).unwrap();
        let mut src = ManifestDir::new(&dir);
        let s = src.snapshot().unwrap();
        assert_eq!(s.cluster_policies.len(), 3);
        assert_eq!(s.broken_cluster.len(), 2);
        assert!(s.broken.is_empty());
        // The good CNP turns bad: it is reported, nothing else changes.
        std::fs::write(
            dir.join("c.yaml"),
            CLUSTER.replace("priority: 10\n", "priority: -3\n"),
        )
        .unwrap();
        let s = src.snapshot().unwrap();
        let keys: Vec<String> = s.cluster_policies.iter().map(|p| p.key()).collect();
        assert_eq!(keys, ["anp/dns", "banp/default"]);
        assert_eq!(s.broken_cluster.len(), 3);
        assert_eq!(
            s.broken_cluster[0].object,
            "ClusterNetworkPolicy deny-tenants"
        );
        assert!(s.broken.is_empty() && s.unattributed.is_empty(), "{s:?}");
        assert_eq!(s.pods.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn broken_names(s: &Snapshot) -> Vec<&str> {
        s.broken.keys().map(String::as_str).collect()
    }

    #[test]
    fn a_bad_object_breaks_only_its_namespace() {
        let text = r#"
kind: Namespace
metadata: {name: a}
---
kind: List
items:
- kind: NetworkPolicy
  metadata: {name: bad, namespace: a}
  spec: {ingress: [{from: [{ipBlock: {cidr: not-a-cidr}}]}]}
- kind: NetworkPolicy
  metadata: {name: good, namespace: b}
  spec: {podSelector: {}}
- kind: Pod
  metadata: {name: p}
  spec: {containers: [{ports: [{containerPort: 70000}]}]}
- kind: Namespace
  metadata: {name: c, labels: [oops]}
"#;
        let s = parse_str(text, "m.yaml");
        // The bad policy breaks a; the bad pod (no namespace: `default`) breaks default; a
        // Namespace with unreadable labels breaks itself. b keeps its good policy.
        assert_eq!(broken_names(&s), ["a", "c", "default"]);
        let e = &s.broken["a"][0];
        assert_eq!((e.document, e.item), (Some(1), Some(0)));
        assert_eq!(e.object, "NetworkPolicy a/bad");
        assert_eq!(e.field, "spec.ingress[0].from[0].ipBlock.cidr");
        assert_eq!(
            e.to_string(),
            r#"m.yaml: document 1: items[0]: NetworkPolicy a/bad: spec.ingress[0].from[0].ipBlock.cidr: "not-a-cidr" is not a CIDR"#
        );
        assert_eq!(s.broken["default"][0].object, "Pod default/p");
        assert!(s.broken["default"][0].message.contains("70000"), "{s:?}");
        assert_eq!(s.broken["c"][0].object, "Namespace c");
        assert_eq!(s.policies.len(), 1);
        assert_eq!(s.policies[0].key(), "b/good");
        assert!(s.unattributed.is_empty());
        // A namespace that cannot be read (metadata.namespace: 7) names no namespace: it is
        // the file's error, and breaks every namespace the file has objects in.
        let s = parse_str(
            &format!("{text}- kind: NetworkPolicy\n  metadata: {{name: n, namespace: 7}}\n"),
            "m.yaml",
        );
        assert_eq!(broken_names(&s), ["a", "b", "c", "default"]);
        for ns in ["a", "b"] {
            assert!(
                s.broken[ns].iter().any(|e| e.object == "NetworkPolicy ?/n"),
                "{ns}: {:?}",
                s.broken[ns]
            );
        }
    }

    #[test]
    fn a_file_that_cannot_be_read_keeps_its_last_objects_and_fails_their_namespaces_closed() {
        let dir = std::env::temp_dir().join(format!("twill-policy-attr-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let a = "kind: NetworkPolicy\nmetadata: {name: deny, namespace: a}\nspec: {podSelector: {}}\n---\nkind: Pod\nmetadata: {name: p, namespace: a}\nstatus: {podIP: 10.0.0.1}\n";
        let b =
            "kind: NetworkPolicy\nmetadata: {name: deny, namespace: b}\nspec: {podSelector: {}}\n";
        std::fs::write(dir.join("a.yaml"), a).unwrap();
        std::fs::write(dir.join("b.yaml"), b).unwrap();
        let mut src = ManifestDir::new(&dir);
        let s = ok(src.snapshot().unwrap());
        assert_eq!(s.policies.len(), 2);
        // a.yaml loses a document to a syntax error and gains an object in c: its last
        // good objects stay, and a and c (covered then or now) fail closed; b is untouched.
        let broken_a = "kind: NetworkPolicy\nmetadata: {name: x, namespace: c}\nspec: {podSelector: {}}\n---\nkind: [\n";
        std::fs::write(dir.join("a.yaml"), broken_a).unwrap();
        let s = src.snapshot().unwrap();
        assert_eq!(broken_names(&s), ["a", "c"]);
        assert!(s.broken["a"][0].message.contains("invalid YAML"), "{s:?}");
        assert_eq!(s.broken["a"][0].document, Some(1));
        let keys: Vec<String> = s.policies.iter().map(|p| p.key()).collect();
        assert_eq!(keys, ["a/deny", "b/deny"]);
        assert_eq!(s.pods.len(), 1);
        // Changed again, still unreadable: still the last good version's objects.
        std::fs::write(dir.join("a.yaml"), format!("{broken_a}\n")).unwrap();
        let s = src.snapshot().unwrap();
        assert_eq!(broken_names(&s), ["a", "c"]);
        assert_eq!(s.pods.len(), 1);
        // Fixed: everything opens again.
        std::fs::write(dir.join("a.yaml"), a).unwrap();
        ok(src.snapshot().unwrap());
        // A namespace whose only object in the file was already bad stays broken when the
        // file then stops parsing.
        let only_bad = format!("{a}---\nkind: NetworkPolicy\nmetadata: {{name: q, namespace: q}}\nspec: {{ingress: [{{ports: [{{port: 0}}]}}]}}\n");
        std::fs::write(dir.join("a.yaml"), &only_bad).unwrap();
        assert_eq!(broken_names(&src.snapshot().unwrap()), ["q"]);
        std::fs::write(dir.join("a.yaml"), format!("{only_bad}---\nkind: [\n")).unwrap();
        assert_eq!(broken_names(&src.snapshot().unwrap()), ["a", "q"]);
        std::fs::write(dir.join("a.yaml"), a).unwrap();
        ok(src.snapshot().unwrap());
        // A new file that never parsed and holds nothing readable is as if not written
        // yet: nothing is broken, the error is reported.
        std::fs::write(dir.join("z.json"), "{oops").unwrap();
        let s = src.snapshot().unwrap();
        assert!(s.broken.is_empty(), "{s:?}");
        assert_eq!(s.unattributed.len(), 1);
        assert!(s.unattributed[0].message.contains("invalid JSON"));
        // Read for the first time with a readable part: the namespaces of that part fail.
        let mut fresh = ManifestDir::new(&dir);
        std::fs::write(dir.join("a.yaml"), broken_a).unwrap();
        let s = fresh.snapshot().unwrap();
        assert_eq!(broken_names(&s), ["c"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unreadable_files_say_why() {
        let e = read_capped(Path::new("/nonexistent/twill-policy-manifest.yaml")).unwrap_err();
        assert!(matches!(e, ReadError::Io(_)), "{e:?}");
        assert!(e.to_string().starts_with("cannot read: "), "{e}");
        assert_eq!(
            ReadError::TooBig(MAX_FILE_BYTES + 1).to_string(),
            "file is 268435457 bytes, more than the 268435456 (256 MiB) a manifest file may \
             have; not read"
        );
    }
}
