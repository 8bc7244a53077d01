//! Where snapshots come from. Every source sits behind [`Source`], so `run` does not care
//! whether objects come from a directory of manifests or the Kubernetes API.

pub mod kube;
pub mod manifests;

use std::time::Duration;

use crate::model::Snapshot;

/// A problem with one object: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectError {
    /// File (manifests) or object reference (API).
    pub origin: String,
    /// Document index in a multi-document file, from 0.
    pub document: Option<usize>,
    /// Index in a `List`'s items.
    pub item: Option<usize>,
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
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Why a source could not produce a snapshot. The caller keeps enforcing the last good one.
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
    /// The complete current state, or every problem found (then nothing of it is used).
    fn snapshot(&mut self) -> Result<Snapshot, SourceError>;

    /// Waits up to `timeout` for a change; true if something may have changed.
    fn wait_change(&mut self, timeout: Duration) -> bool;
}
