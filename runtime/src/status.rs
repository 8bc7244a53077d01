//! What `twilld status` shows: the JSON each daemon serves at `GET /status` on its local
//! socket (types shared by the server and the command, so both read one definition), and
//! the client that asks for it.
//!
//! The daemons answer from what they hold and what the kernel holds at the time of the
//! request, never by re-reading etcd or the Kubernetes API, so the command shows what this
//! node is doing, not what it should be doing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

/// twilld's status socket (`--status-socket`).
pub const TWILLD_SOCKET: &str = "/run/twill/twilld.sock";
/// twill-policy's status socket (`run --status-socket`).
pub const POLICY_SOCKET: &str = "/run/twill/policy.sock";

/// How long a status request may take, connect to last byte.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read: 5000 peers with their entries fit several times over.
pub const MAX_ANSWER: usize = 64 << 20;

/// twilld's state on this node.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TwilldStatus {
    pub node: String,
    /// `vxlan` or `host-gw`.
    pub backend: String,
    pub ready: bool,
    pub lease: Option<LeaseStatus>,
    pub peers: Vec<PeerStatus>,
    pub skipped_peers: Vec<SkippedPeer>,
    /// twill's entries in the kernel that belong to no peer.
    pub stale_kernel_entries: Vec<String>,
    /// `None` when the underlay guard is off.
    pub underlay_guard: Option<GuardStatus>,
    pub last_reconcile_age_seconds: Option<f64>,
}

/// This node's lease.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LeaseStatus {
    pub subnet: String,
    pub ipv6_subnet: Option<String>,
    pub public_ip: String,
    pub public_ipv6: Option<String>,
    pub vtep_mac: Option<String>,
    /// `None`: the lease does not expire (Kubernetes mode).
    pub expires_in_seconds: Option<i64>,
}

/// One peer: the kernel entries twilld wants for it and those the kernel holds, each as one
/// line of text (`route 10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink`,
/// `neighbor 10.244.2.0 lladdr 0a:58:0a:f4:02:00 dev flannel.1`,
/// `fdb 0a:58:0a:f4:02:00 dst 198.18.0.3 dev flannel.1`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub subnet: String,
    pub ipv6_subnet: Option<String>,
    pub public_ip: String,
    pub vtep_mac: Option<String>,
    pub desired: Vec<String>,
    pub kernel: Vec<String>,
}

impl PeerStatus {
    /// Desired entries the kernel does not hold.
    pub fn missing(&self) -> Vec<&str> {
        only_in(&self.desired, &self.kernel)
    }

    /// Entries the kernel holds for this peer that are not desired.
    pub fn unexpected(&self) -> Vec<&str> {
        only_in(&self.kernel, &self.desired)
    }

    pub fn in_sync(&self) -> bool {
        self.missing().is_empty() && self.unexpected().is_empty()
    }
}

fn only_in<'a>(these: &'a [String], not_in: &[String]) -> Vec<&'a str> {
    these
        .iter()
        .filter(|e| !not_in.contains(e))
        .map(String::as_str)
        .collect()
}

/// A peer's lease that is not programmed, and why.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SkippedPeer {
    /// The etcd subnet key or the node name.
    pub lease: String,
    pub reason: String,
}

/// The underlay guard's peer sets: wanted, and read from the kernel.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GuardStatus {
    pub desired_peers: Vec<String>,
    pub kernel_peers: Vec<String>,
    pub desired_peer_subnets: Vec<String>,
    pub kernel_peer_subnets: Vec<String>,
}

/// twill-policy's state on this node.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PolicyStatus {
    pub node: String,
    pub ready: bool,
    pub fail_closed: bool,
    /// The ruleset the enforcer loaded.
    pub ruleset_id: Option<String>,
    /// The ruleset id read from the kernel at request time.
    pub kernel_ruleset_id: Option<String>,
    pub last_good_snapshot_age_seconds: Option<f64>,
    pub pods: usize,
    pub policies: usize,
    /// Cluster-scoped policies (ClusterNetworkPolicy, AdminNetworkPolicy,
    /// BaselineAdminNetworkPolicy); absent from the JSON of a daemon without them.
    #[serde(default)]
    pub cluster_policies: usize,
    /// Most drops first, at most 10.
    pub top_drops: Vec<PodDrops>,
}

/// Packets a pod's policy dropped in one direction.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PodDrops {
    /// `namespace/name`.
    pub pod: String,
    /// `ingress` or `egress`.
    pub direction: String,
    pub packets: u64,
}

/// Why a status request failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{}: cannot connect: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no answer within {}s", socket.display(), FETCH_TIMEOUT.as_secs())]
    Timeout { socket: PathBuf },
    #[error("{}: HTTP: {source}", socket.display())]
    Http {
        socket: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{}: GET {path} answered {status}: {body}", socket.display())]
    Status {
        socket: PathBuf,
        path: String,
        status: u16,
        body: String,
    },
    #[error("{}: GET {path}: not the expected JSON: {source}", socket.display())]
    Decode {
        socket: PathBuf,
        path: String,
        source: serde_json::Error,
    },
}

/// `GET /status` over the unix socket at `socket`, decoded.
pub async fn fetch<T: serde::de::DeserializeOwned>(socket: &Path) -> Result<T, StatusError> {
    get_json(socket, "/status").await
}

/// `GET path` over the unix socket at `socket`, decoded as JSON; any status but 200 is an
/// error carrying the body.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    socket: &Path,
    path: &str,
) -> Result<T, StatusError> {
    let (status, body) = tokio::time::timeout(FETCH_TIMEOUT, get(socket, path))
        .await
        .map_err(|_| StatusError::Timeout {
            socket: socket.to_path_buf(),
        })??;
    if status != 200 {
        return Err(StatusError::Status {
            socket: socket.to_path_buf(),
            path: path.to_string(),
            status,
            body: String::from_utf8_lossy(&body).trim().to_string(),
        });
    }
    serde_json::from_slice(&body).map_err(|source| StatusError::Decode {
        socket: socket.to_path_buf(),
        path: path.to_string(),
        source,
    })
}

async fn get(socket: &Path, path: &str) -> Result<(u16, Bytes), StatusError> {
    let http = |source: Box<dyn std::error::Error + Send + Sync>| StatusError::Http {
        socket: socket.to_path_buf(),
        source,
    };
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| StatusError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(e.into()))?;
    // Drives the connection; it ends when the server closes it after the answer.
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|e| http(e.into()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| http(e.into()))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(http)?
        .to_bytes();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get as route_get;
    use axum::{Json, Router};

    fn peer(desired: &[&str], kernel: &[&str]) -> PeerStatus {
        PeerStatus {
            subnet: "10.244.2.0/24".into(),
            ipv6_subnet: None,
            public_ip: "198.18.0.3".into(),
            vtep_mac: None,
            desired: desired.iter().map(|s| s.to_string()).collect(),
            kernel: kernel.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_peer_is_in_sync_only_when_both_sides_hold_the_same_entries() {
        let p = peer(&["route a", "fdb b"], &["fdb b", "route a"]);
        assert!(p.in_sync());
        let p = peer(&["route a", "fdb b"], &["fdb b", "route c"]);
        assert_eq!(p.missing(), vec!["route a"]);
        assert_eq!(p.unexpected(), vec!["route c"]);
        assert!(!p.in_sync());
        assert!(!peer(&["route a"], &[]).in_sync());
    }

    fn policy_status() -> PolicyStatus {
        PolicyStatus {
            node: "n1".into(),
            ready: true,
            fail_closed: false,
            ruleset_id: Some("abc".into()),
            kernel_ruleset_id: Some("abc".into()),
            last_good_snapshot_age_seconds: Some(1.5),
            pods: 3,
            policies: 1,
            cluster_policies: 0,
            top_drops: vec![PodDrops {
                pod: "x/a".into(),
                direction: "ingress".into(),
                packets: 7,
            }],
        }
    }

    #[tokio::test]
    async fn fetches_over_a_unix_socket_and_names_the_socket_in_errors() {
        let dir = std::env::temp_dir().join(format!("twill-status-{}", std::process::id()));
        let socket = dir.join("sub/policy.sock");
        let listener = crate::http::bind_unix(&socket).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let router = Router::new()
            .route("/status", route_get(|| async { Json(policy_status()) }))
            .route("/broken", route_get(|| async { "not json" }));
        tokio::spawn(crate::http::serve_unix(
            listener,
            router,
            crate::http::DEADLINE,
        ));
        let got: PolicyStatus = fetch(&socket).await.unwrap();
        assert_eq!(got, policy_status());

        let e = get_json::<PolicyStatus>(&socket, "/nowhere")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("GET /nowhere answered 404"), "{e}");
        let e = get_json::<PolicyStatus>(&socket, "/broken")
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("GET /broken: not the expected JSON"),
            "{e}"
        );
        let absent = dir.join("absent.sock");
        let e = fetch::<PolicyStatus>(&absent).await.unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("{}: cannot connect", absent.display())),
            "{e}"
        );

        // A live socket is not taken over; a restarted daemon binds over its old, dead one.
        let e = crate::http::bind_unix(&socket).unwrap_err();
        assert!(
            e.to_string().contains("is served by a running process"),
            "{e}"
        );
        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        drop(crate::http::bind_unix(&stale).unwrap());
        // Something that is not a socket is left alone.
        let file = dir.join("plain");
        std::fs::write(&file, "x").unwrap();
        let e = crate::http::bind_unix(&file).unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
