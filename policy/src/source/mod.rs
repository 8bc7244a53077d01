//! Where snapshots come from. Every source sits behind [`Source`], so `run` does not care
//! whether objects come from a directory of manifests or the Kubernetes API.

pub mod kube;
pub mod manifests;

use std::time::Duration;

use crate::model::Snapshot;

/// A problem with one object: where it is and what is wrong.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectError {
    /// File (manifests) or object reference (API).
    pub origin: String,
    /// Document index in a multi-document file, from 0.
    pub document: Option<usize>,
    /// Index in a `List`'s items.
    pub item: Option<usize>,
    /// The object as `Kind namespace/name` (`Namespace name`), as far as it could be read;
    /// empty when not known.
    pub object: String,
    /// The namespace this error breaks (fails closed), when it could be read: the object's
    /// `metadata.namespace` (`default` when empty), or a Namespace's own name.
    pub namespace: Option<String>,
    /// Field path, e.g. `spec.ingress[0].ports[0].port`; empty when not known.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ObjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(d) = self.document {
            write!(f, ": document {d}")?;
        }
        if let Some(i) = self.item {
            write!(f, ": items[{i}]")?;
        }
        if !self.object.is_empty() && self.object != self.origin {
            write!(f, ": {}", self.object)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Why a source could produce no snapshot at all (the manifest directory cannot be listed,
/// the API has not answered yet). The caller keeps enforcing the last good one. Objects that
/// cannot be read are not this: they break their namespace ([`Snapshot::broken`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    pub errors: Vec<ObjectError>,
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<String> = self.errors.iter().map(|e| e.to_string()).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for SourceError {}

/// A provider of snapshots.
pub trait Source {
    /// The current state: every object that could be read, and per namespace the errors of
    /// those that could not ([`Snapshot::broken`]). An error only when nothing can be read.
    fn snapshot(&mut self) -> Result<Snapshot, SourceError>;

    /// Waits up to `timeout` for a change; true if something may have changed.
    fn wait_change(&mut self, timeout: Duration) -> bool;
}
