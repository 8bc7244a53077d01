//! Kubernetes events on this node's Node object (`events.k8s.io/v1`, what `kubectl get
//! events` and `kubectl describe node` show), through kube's event `Recorder`, which also
//! folds a repeated event into a series (a PATCH) instead of a new object.
//!
//! Best effort, and never in the caller's way: events go through a bounded queue to one
//! publisher task; a full queue drops the event (logged), and a failed publish is logged
//! and forgotten. An API server that is down must not hold up the dataplane or the policy.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

/// Events queued beyond this are dropped: the API server is not keeping up.
const QUEUE: usize = 64;

/// The API server rejects an event whose note is longer (events.k8s.io/v1: at most 1 kB).
const MAX_NOTE: usize = 1024;

/// `Normal` or `Warning`, as `kubectl get events` shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

/// One event about this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeEvent {
    pub severity: Severity,
    /// PascalCase, e.g. `LeaseAcquired`.
    pub reason: &'static str,
    /// PascalCase, what was being done, e.g. `AcquireLease`.
    pub action: &'static str,
    /// The human-readable message.
    pub note: String,
    /// Another node the event concerns (a peer whose lease is skipped).
    pub related_node: Option<String>,
}

/// Where a program's events about its node go.
#[derive(Clone, Debug)]
pub struct NodeEvents {
    queue: Option<mpsc::Sender<NodeEvent>>,
}

impl NodeEvents {
    /// Starts the publisher task (inside a tokio runtime). `controller` names the program
    /// (`twilld`, `twill-policy`); the instance is `POD_NAME` when set (the DaemonSet pod),
    /// else the controller and node.
    pub fn start(client: kube::Client, controller: &str, node_name: &str) -> NodeEvents {
        let instance = std::env::var("POD_NAME")
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| format!("{controller}-{node_name}"));
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: controller.to_string(),
                instance: Some(instance),
            },
        );
        let regarding = node_reference(node_name);
        let (tx, mut rx) = mpsc::channel::<NodeEvent>(QUEUE);
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let reason = event.reason;
                if let Err(e) = recorder.publish(&to_kube(event), &regarding).await {
                    tracing::warn!(reason, error = %e, "publishing a Kubernetes event failed");
                }
            }
        });
        NodeEvents { queue: Some(tx) }
    }

    /// Publishes nothing: etcd mode, manifests mode, tests.
    pub fn disabled() -> NodeEvents {
        NodeEvents { queue: None }
    }

    /// Queues `event`; never blocks.
    pub fn publish(&self, event: NodeEvent) {
        let Some(queue) = &self.queue else {
            return;
        };
        if let Err(e) = queue.try_send(event) {
            let event = match e {
                mpsc::error::TrySendError::Full(ev) | mpsc::error::TrySendError::Closed(ev) => ev,
            };
            tracing::warn!(
                reason = event.reason,
                "Kubernetes event dropped: the API server is not keeping up"
            );
        }
    }
}

/// A Node as events refer to it. The uid is the node's name, as the kubelet's own node
/// events have it; `kubectl describe node` finds events by that.
fn node_reference(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(name.to_string()),
        uid: Some(name.to_string()),
        ..ObjectReference::default()
    }
}

/// `note` cut to [`MAX_NOTE`] bytes at a character boundary, ending in `…` when cut: a note
/// can quote what a peer wrote (a broken lease), and an over-long one would lose the event.
fn bounded_note(mut note: String) -> String {
    if note.len() > MAX_NOTE {
        let mut end = MAX_NOTE - '…'.len_utf8();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push('…');
    }
    note
}

fn to_kube(event: NodeEvent) -> Event {
    Event {
        type_: match event.severity {
            Severity::Normal => EventType::Normal,
            Severity::Warning => EventType::Warning,
        },
        reason: event.reason.to_string(),
        note: Some(bounded_note(event.note)),
        action: event.action.to_string(),
        secondary: event.related_node.as_deref().map(node_reference),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::events::v1::Event as KubeEvent;
    use kube::api::{Api, ListParams};
    use std::time::Duration;

    fn skipped(peer: &str) -> NodeEvent {
        NodeEvent {
            severity: Severity::Warning,
            reason: "PeerLeaseSkipped",
            action: "ProgramPeer",
            note: format!("lease of {peer} skipped: no public IP"),
            related_node: Some(peer.to_string()),
        }
    }

    #[test]
    fn a_peer_event_regards_this_node_and_relates_the_peer() {
        let e = to_kube(skipped("n2"));
        assert_eq!(e.type_, EventType::Warning);
        assert_eq!(e.reason, "PeerLeaseSkipped");
        assert_eq!(e.action, "ProgramPeer");
        let related = e.secondary.unwrap();
        assert_eq!(related.kind.as_deref(), Some("Node"));
        assert_eq!(related.name.as_deref(), Some("n2"));
        assert_eq!(node_reference("n1").uid.as_deref(), Some("n1"));
    }

    #[test]
    fn a_note_quoting_a_peer_is_bounded_to_what_the_api_server_takes() {
        assert_eq!(bounded_note("short".into()), "short");
        let long = bounded_note("é".repeat(2000));
        assert!(long.len() <= MAX_NOTE, "{}", long.len());
        assert!(long.ends_with('…'));
        let exact = "x".repeat(MAX_NOTE);
        assert_eq!(bounded_note(exact.clone()), exact);
    }

    #[tokio::test]
    async fn published_to_the_api_server_and_repeats_folded_into_a_series() {
        let srv = twill_fake_apiserver::FakeApiServer::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(srv.clone().serve_tcp(listener));
        let client = crate::kube::client(&crate::kube::ClientOptions {
            api_url: url,
            ..Default::default()
        })
        .await
        .unwrap();
        let events = NodeEvents::start(client.clone(), "twilld", "n1");
        let acquired = NodeEvent {
            severity: Severity::Normal,
            reason: "LeaseAcquired",
            action: "AcquireLease",
            note: "acquired 10.244.1.0/24".into(),
            related_node: None,
        };
        events.publish(acquired.clone());
        events.publish(skipped("n2"));
        events.publish(skipped("n3"));
        events.publish(acquired);

        let api: Api<KubeEvent> = Api::namespaced(client, "default");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let list = loop {
            let list = api.list(&ListParams::default()).await.unwrap().items;
            let folded = list
                .iter()
                .any(|e| e.series.as_ref().is_some_and(|s| s.count == 2));
            if list.len() == 3 && folded {
                break list;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "events not published: {list:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for e in &list {
            let regarding = e.regarding.as_ref().unwrap();
            assert_eq!(regarding.kind.as_deref(), Some("Node"));
            assert_eq!(regarding.name.as_deref(), Some("n1"));
            assert_eq!(e.reporting_controller.as_deref(), Some("twilld"));
        }
        let mut related: Vec<_> = list
            .iter()
            .filter(|e| e.reason.as_deref() == Some("PeerLeaseSkipped"))
            .map(|e| e.related.as_ref().unwrap().name.clone().unwrap())
            .collect();
        related.sort();
        assert_eq!(related, ["n2", "n3"]);
        NodeEvents::disabled().publish(skipped("n4"));
    }
}
