//! What `twill-policy run` answers on its status socket (`--status-socket`): `GET /status`
//! ([`PolicyStatus`], what `twilld status` shows) and `GET /endpoints` ([`Endpoints`], the
//! pods' addresses and the policies that select each local pod, which `twill-policy drops`
//! names denied packets with). Both come from what the daemon holds (the snapshot it last
//! enforced) and what the kernel holds at the time of the request (the ruleset id, the drop
//! counters), never from re-reading the source.
//!
//! Also the fail-closed state machine whose transitions become Kubernetes events.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use twill_nft::nfnl::{
    self, Conn, Msg, NFTA_DATA_VALUE, NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_TABLE,
};
use twill_nft::NftError;
use twill_runtime::events::{NodeEvent, Severity};
use twill_runtime::status::{PodDrops, PolicyStatus};

use crate::enforce::{Applied, RULESET_ID_SET};
use crate::model::{PolicyType, Snapshot, Tier};

/// Most pods listed in [`PolicyStatus::top_drops`].
pub const TOP_DROPS: usize = 10;

/// What the sync loop last enforced, for the status socket.
#[derive(Debug, Default, Clone)]
pub struct Enforced {
    /// The id of the ruleset the enforcer loaded (full or fail-closed).
    pub ruleset_id: Option<String>,
    /// The isolation-only table is loaded.
    pub fail_closed: bool,
    /// The snapshot that ruleset was compiled from.
    pub snapshot: Option<Arc<Snapshot>>,
}

impl Enforced {
    /// Takes what a sync of `snapshot` did; a sync that loaded nothing (both tables
    /// rejected) leaves the state as it was, since the kernel keeps what it had.
    pub fn record(
        &mut self,
        applied: &Applied,
        ruleset_id: Option<String>,
        snapshot: Arc<Snapshot>,
    ) {
        match applied {
            Applied::Full | Applied::Incremental | Applied::Unchanged => {
                self.fail_closed = false;
            }
            Applied::FailClosed { .. } => self.fail_closed = true,
            Applied::Failed { .. } => return,
        }
        self.ruleset_id = ruleset_id;
        self.snapshot = Some(snapshot);
    }
}

/// Whether a pod of `snap` is enforced on `node` (its chains are in this node's table).
fn local(node: &str, pod: &crate::model::Pod) -> bool {
    pod.node.as_deref() == Some(node) && pod.is_policy_pod() && !pod.ips.is_empty()
}

/// The pods enforced on `node` and all NetworkPolicies of `snap` (its cluster policies are
/// `snap.cluster_policies.len()`).
pub fn counts(snap: &Snapshot, node: &str) -> (usize, usize) {
    let pods = snap.pods.iter().filter(|p| local(node, p)).count();
    (pods, snap.policies.len())
}

/// [`PolicyStatus`] from the parts the daemon and the kernel hold.
#[allow(clippy::too_many_arguments)]
pub fn policy_status(
    node: &str,
    ready: bool,
    enforced: &Enforced,
    kernel_ruleset_id: Option<String>,
    last_good_age: Option<std::time::Duration>,
    top: Vec<(String, String, u64)>,
) -> PolicyStatus {
    let (pods, policies) = enforced
        .snapshot
        .as_deref()
        .map_or((0, 0), |s| counts(s, node));
    PolicyStatus {
        node: node.to_string(),
        ready,
        fail_closed: enforced.fail_closed,
        ruleset_id: enforced.ruleset_id.clone(),
        kernel_ruleset_id,
        last_good_snapshot_age_seconds: last_good_age.map(|a| a.as_secs_f64()),
        pods,
        policies,
        cluster_policies: enforced
            .snapshot
            .as_deref()
            .map_or(0, |s| s.cluster_policies.len()),
        top_drops: top
            .into_iter()
            .map(|(pod, direction, packets)| PodDrops {
                pod,
                direction,
                packets,
            })
            .collect(),
    }
}

/// The GETSETELEM dump request for the elements of set `set` of `inet <table>`.
fn set_elements_request(table: &str, set: &str) -> Msg {
    let mut m = Msg::nftables(
        nfnl::NFT_MSG_GETSETELEM,
        nfnl::NLM_F_REQUEST | nfnl::NLM_F_DUMP,
        nfnl::NFPROTO_INET,
    );
    m.str_attr(NFTA_SET_ELEM_LIST_TABLE, table)
        .str_attr(NFTA_SET_ELEM_LIST_SET, set);
    m
}

/// The keys of the elements in one NEWSETELEM message body.
fn element_keys(body: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (t, list) in nfnl::attrs(body) {
        if t != NFTA_SET_ELEM_LIST_ELEMENTS {
            continue;
        }
        for (t, elem) in nfnl::attrs(list) {
            if t != NFTA_LIST_ELEM {
                continue;
            }
            for (t, key) in nfnl::attrs(elem) {
                if t != NFTA_SET_ELEM_KEY {
                    continue;
                }
                out.extend(
                    nfnl::attrs(key)
                        .filter(|(t, _)| *t == NFTA_DATA_VALUE)
                        .map(|(_, v)| v.to_vec()),
                );
            }
        }
    }
    out
}

/// The ruleset id an element key of set `ruleset-id` stands for: the 64-bit id is the
/// low half of the IPv6 address (see [`crate::enforce::ruleset_id`]).
fn id_of_key(key: &[u8]) -> Option<String> {
    let b: [u8; 16] = key.try_into().ok()?;
    Some(format!("{:016x}", u128::from_be_bytes(b) as u64))
}

/// The id of the ruleset `inet <table>` holds, read from the kernel now (one netlink dump
/// of set `ruleset-id`); None when there is no such table or set, or not exactly one
/// element (a table someone else wrote).
pub fn kernel_ruleset_id(table: &str) -> Result<Option<String>, NftError> {
    let mut keys = Vec::new();
    let newsetelem = (nfnl::NFNL_SUBSYS_NFTABLES << 8) | nfnl::NFT_MSG_NEWSETELEM;
    let res = Conn::open()?.dump(
        &set_elements_request(table, RULESET_ID_SET),
        |kind, body| {
            if kind == newsetelem {
                keys.extend(element_keys(body));
            }
        },
    );
    match res {
        Err(e) if e.os_error() == Some(nix::libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
        Ok(()) if keys.len() == 1 => Ok(id_of_key(&keys[0])),
        Ok(()) => Ok(None),
    }
}

/// `GET /endpoints`: every pod the daemon knows with its addresses, and for the pods
/// enforced on this node the policies that select them in each direction and the cluster
/// policies that select them in each tier.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Endpoints {
    pub node: String,
    pub pods: Vec<EndpointPod>,
}

/// One pod of [`Endpoints`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct EndpointPod {
    /// `namespace/name`.
    pub pod: String,
    pub node: Option<String>,
    pub ips: Vec<IpAddr>,
    /// Enforced on this node (its table has the pod's chains).
    pub local: bool,
    /// `namespace/name` of the policies that select the pod for ingress (local pods only).
    pub ingress_policies: Vec<String>,
    pub egress_policies: Vec<String>,
    /// Keys (`cnp/name`, `anp/name`, `banp/default`) of the cluster policies of the Admin
    /// tier whose subject selects the pod, in evaluation order (local pods only). Left out
    /// of the JSON when empty, so clusters without cluster policies see what they did.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin_policies: Vec<String>,
    /// The same for the Baseline tier.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub baseline_policies: Vec<String>,
}

impl EndpointPod {
    /// The cluster policies of `tier` that select the pod.
    pub fn cluster_policies(&self, tier: Tier) -> &[String] {
        match tier {
            Tier::Admin => &self.admin_policies,
            Tier::Baseline => &self.baseline_policies,
        }
    }
}

/// [`Endpoints`] of `snap` as seen from `node`.
pub fn endpoints(snap: &Snapshot, node: &str) -> Endpoints {
    let pods = snap
        .pods
        .iter()
        .filter(|p| p.is_policy_pod() && !p.ips.is_empty())
        .map(|p| {
            let is_local = local(node, p);
            let selecting = |t: PolicyType| -> Vec<String> {
                if !is_local {
                    return Vec::new();
                }
                snap.policies
                    .iter()
                    .filter(|pol| pol.selects(p, t))
                    .map(|pol| pol.key())
                    .collect()
            };
            let cluster = |tier: Tier| -> Vec<String> {
                if !is_local || snap.cluster_policies.is_empty() {
                    return Vec::new();
                }
                let ns_labels = snap.namespace_labels(&p.namespace);
                snap.cluster_policies
                    .iter()
                    .filter(|pol| pol.tier == tier && pol.selects(p, &ns_labels))
                    .map(|pol| pol.key())
                    .collect()
            };
            EndpointPod {
                pod: p.key(),
                node: p.node.clone(),
                ips: p.ips.clone(),
                local: is_local,
                ingress_policies: selecting(PolicyType::Ingress),
                egress_policies: selecting(PolicyType::Egress),
                admin_policies: cluster(Tier::Admin),
                baseline_policies: cluster(Tier::Baseline),
            }
        })
        .collect();
    Endpoints {
        node: node.to_string(),
        pods,
    }
}

impl Endpoints {
    /// The pod that has `ip`, if any.
    pub fn by_ip(&self) -> BTreeMap<IpAddr, &EndpointPod> {
        self.pods
            .iter()
            .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p)))
            .collect()
    }

    /// The pod named `key` ("namespace/name").
    pub fn pod(&self, key: &str) -> Option<&EndpointPod> {
        self.pods.iter().find(|p| p.pod == key)
    }
}

/// The Kubernetes event of a sync that moved the node into or out of fail-closed
/// enforcement (`was`: the isolation-only table was loaded before the sync); None when the
/// sync changed nothing about it (a sync that loaded nothing keeps what the kernel has).
pub fn fail_closed_event(was: bool, applied: &Applied) -> Option<NodeEvent> {
    match applied {
        Applied::FailClosed { error } if !was => Some(NodeEvent {
            severity: Severity::Warning,
            reason: "FailClosedEntered",
            action: "EnforcePolicy",
            note: format!(
                "the full NetworkPolicy ruleset could not be applied ({error}); the isolation-only table is loaded: pods selected by a policy refuse new connections"
            ),
            related_node: None,
        }),
        Applied::Full | Applied::Incremental | Applied::Unchanged if was => Some(NodeEvent {
            severity: Severity::Normal,
            reason: "FailClosedLeft",
            action: "EnforcePolicy",
            note: "the full NetworkPolicy ruleset is enforced again".to_string(),
            related_node: None,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifests::parse_str;

    const WORLD: &str = r#"
kind: Namespace
metadata: {name: x}
---
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: n1}
status: {podIP: 10.244.1.2}
---
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: n2}
status: {podIP: 10.244.2.3}
---
kind: Pod
metadata: {name: h, namespace: x}
spec: {nodeName: n1, hostNetwork: true}
status: {podIP: 198.18.0.2}
---
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
---
kind: NetworkPolicy
metadata: {name: only-a, namespace: x}
spec: {podSelector: {matchLabels: {app: a}}, ingress: [{}]}
"#;

    #[test]
    fn endpoints_name_pods_by_address_and_the_policies_of_local_pods() {
        let snap = parse_str(WORLD, "world.yaml");
        let e = endpoints(&snap, "n1");
        // The hostNetwork pod is node traffic, no pod.
        assert_eq!(e.pods.len(), 2, "{e:?}");
        let a = e.pod("x/a").unwrap();
        assert!(a.local);
        assert_eq!(a.ingress_policies, vec!["x/deny-all", "x/only-a"]);
        assert_eq!(a.egress_policies, vec!["x/deny-all"]);
        let b = e.pod("x/b").unwrap();
        assert!(!b.local && b.ingress_policies.is_empty());
        let by_ip = e.by_ip();
        assert_eq!(by_ip[&"10.244.2.3".parse::<IpAddr>().unwrap()].pod, "x/b");
        assert_eq!(counts(&snap, "n1"), (1, 2));
        // Round trip through the JSON the socket serves.
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Endpoints>(&json).unwrap(), e);
    }

    #[test]
    fn endpoints_name_the_cluster_policies_of_each_tier_that_select_local_pods() {
        use crate::model::{
            ClusterPolicy, ClusterPolicyKind, LabelSelector, Labels, Subject, Tier,
        };
        let plain = endpoints(&parse_str(WORLD, "world.yaml"), "n1");
        // Without cluster policies the JSON is what it was.
        assert!(!serde_json::to_string(&plain).unwrap().contains("admin"));
        let cp = |kind, name: &str, tier, priority, subject| ClusterPolicy {
            kind,
            name: name.into(),
            tier,
            priority,
            subject,
            ingress: vec![],
            egress: vec![],
        };
        let app_a = LabelSelector {
            match_labels: Labels::from([("app".to_string(), "a".to_string())]),
            match_expressions: vec![],
        };
        let every = LabelSelector::default();
        let snap = parse_str(WORLD, "world.yaml").with_cluster_policies([
            cp(
                ClusterPolicyKind::ClusterNetworkPolicy,
                "late",
                Tier::Admin,
                20,
                Subject::Namespaces(every.clone()),
            ),
            cp(
                ClusterPolicyKind::AdminNetworkPolicy,
                "early",
                Tier::Admin,
                1,
                Subject::Pods {
                    namespaces: every.clone(),
                    pods: app_a,
                },
            ),
            cp(
                ClusterPolicyKind::BaselineAdminNetworkPolicy,
                "default",
                Tier::Baseline,
                1000,
                Subject::Namespaces(every),
            ),
        ]);
        let e = endpoints(&snap, "n1");
        let a = e.pod("x/a").unwrap();
        assert_eq!(a.admin_policies, vec!["anp/early", "cnp/late"]);
        assert_eq!(a.baseline_policies, vec!["banp/default"]);
        assert_eq!(a.cluster_policies(Tier::Baseline), ["banp/default"]);
        // Only local pods are listed with their policies; hostNetwork pods are never
        // subjects (and not endpoints at all).
        let b = e.pod("x/b").unwrap();
        assert!(b.admin_policies.is_empty() && b.baseline_policies.is_empty());
        assert!(e.pod("x/h").is_none());
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Endpoints>(&json).unwrap(), e);
    }

    #[test]
    fn status_reports_what_was_enforced_and_what_the_kernel_holds() {
        let snap = Arc::new(parse_str(WORLD, "world.yaml"));
        let mut enf = Enforced::default();
        enf.record(
            &Applied::Full,
            Some("00000000000000aa".into()),
            snap.clone(),
        );
        let s = policy_status(
            "n1",
            true,
            &enf,
            Some("00000000000000aa".into()),
            Some(std::time::Duration::from_millis(1500)),
            vec![("x/a".into(), "ingress".into(), 7)],
        );
        assert_eq!(s.ruleset_id, s.kernel_ruleset_id);
        assert_eq!((s.pods, s.policies, s.fail_closed), (1, 2, false));
        assert_eq!(s.cluster_policies, 0);
        assert_eq!(s.last_good_snapshot_age_seconds, Some(1.5));
        assert_eq!(
            s.top_drops,
            vec![PodDrops {
                pod: "x/a".into(),
                direction: "ingress".into(),
                packets: 7
            }]
        );
        let fc = Applied::FailClosed {
            error: "boom".into(),
        };
        enf.record(&fc, Some("00000000000000bb".into()), snap.clone());
        assert!(enf.fail_closed);
        // Both tables rejected: the kernel keeps the fail-closed one, and so does the state.
        let failed = Applied::Failed {
            error: "a".into(),
            fail_closed_error: "b".into(),
        };
        enf.record(&failed, None, snap.clone());
        assert!(enf.fail_closed);
        assert_eq!(enf.ruleset_id.as_deref(), Some("00000000000000bb"));
        enf.record(&Applied::Incremental, Some("cc".into()), snap);
        assert!(!enf.fail_closed);
    }

    #[test]
    fn fail_closed_events_once_per_transition() {
        let fc = Applied::FailClosed {
            error: "nft: boom".into(),
        };
        let failed = Applied::Failed {
            error: "a".into(),
            fail_closed_error: "b".into(),
        };
        let e = fail_closed_event(false, &fc).unwrap();
        assert_eq!(
            (e.reason, e.severity),
            ("FailClosedEntered", Severity::Warning)
        );
        assert!(e.note.contains("nft: boom"), "{}", e.note);
        assert_eq!(fail_closed_event(true, &fc), None);
        assert_eq!(fail_closed_event(true, &failed), None);
        assert_eq!(fail_closed_event(false, &failed), None);
        for ok in [Applied::Full, Applied::Incremental, Applied::Unchanged] {
            assert_eq!(fail_closed_event(false, &ok), None);
            let e = fail_closed_event(true, &ok).unwrap();
            assert_eq!((e.reason, e.severity), ("FailClosedLeft", Severity::Normal));
        }
    }

    #[test]
    fn ruleset_id_elements_are_read_back_as_ids() {
        // NEWSETELEM body: elements > element > key > value (16 bytes).
        let mut m = Msg::nftables(nfnl::NFT_MSG_NEWSETELEM, 0, nfnl::NFPROTO_INET);
        let key = u128::from(0x0123_4567_89ab_cdefu64).to_be_bytes();
        m.str_attr(NFTA_SET_ELEM_LIST_TABLE, "twill-policy").nest(
            NFTA_SET_ELEM_LIST_ELEMENTS,
            |m| {
                m.nest(NFTA_LIST_ELEM, |m| {
                    m.nest(NFTA_SET_ELEM_KEY, |m| {
                        m.attr(NFTA_DATA_VALUE, &key);
                    });
                });
            },
        );
        let body = m.bytes(1)[20..].to_vec();
        let keys = element_keys(&body);
        assert_eq!(keys.len(), 1);
        assert_eq!(id_of_key(&keys[0]).as_deref(), Some("0123456789abcdef"));
        assert_eq!(id_of_key(&[1, 2, 3]), None);
        let r = set_elements_request("t", "ruleset-id").bytes(1);
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), 0x0a0d);
    }
}
