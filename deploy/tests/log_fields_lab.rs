//! The three programs' JSON logs speak one vocabulary. twilld (two nodes, real etcd, one
//! peer lease it must skip), twill-policy (manifests mode, one pod under a policy) and the CNI
//! plugin (a real ADD and DEL through the reference plugins) run in a lab with
//! `--log-format json` (the plugin with `"logFormat": "json"`); every line each writes must be
//! one JSON object with `timestamp`, `level`, `target` and `message`, use the shared field
//! names (`node`, `peer`, `subnet`, `pod`, `policy`) where it names those things, and never a
//! synonym such as `peer_ip`, `pod_name` or `lease`.
//!
//! Root only (skips with a message otherwise; fails with CI=true). Needs the workspace's
//! binaries: `cargo build -p twill -p twill-policy -p twill-cni --bins`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use twill_lab::{Lab, ProcId};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// A peer lease twilld must refuse (its PublicIP is no address): the skip is logged.
const BAD_LEASE_SUBNET: &str = "10.244.99.0";
/// Generous: only a failure waits this long (a busy 2-core machine).
const DEADLINE: Duration = Duration::from_secs(90);

/// Keys every line carries.
const LINE_KEYS: [&str; 4] = ["timestamp", "level", "target", "message"];
/// Names that mean one of the shared fields but are not its name (node, peer, subnet, pod,
/// policy), which no program may use. (`namespace` alone names a namespace, which is no
/// synonym; a pod or policy split into `namespace` and `name` is caught by `name`.)
const SYNONYMS: [&str; 13] = [
    "node_name",
    "nodename",
    "peer_ip",
    "peer_addr",
    "peer_address",
    "pod_name",
    "pod_namespace",
    "name",
    "policy_name",
    "network_policy",
    "lease",
    "cidr",
    "subnet_cidr",
];

fn bin(name: &str) -> PathBuf {
    let b = twill_lab::bin_path(name);
    assert!(
        b.exists(),
        "{} missing: cargo build -p twill -p twill-policy -p twill-cni --bins",
        b.display()
    );
    b
}

/// Every line of `text`, parsed as a JSON object, after checking the line keys and that no
/// synonym is used. `who` names the program in failures.
fn json_lines(who: &str, text: &str) -> Vec<Map<String, Value>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let obj = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => m,
            other => panic!("{who}: a log line is no JSON object ({other:?}): {line:?}"),
        };
        for key in LINE_KEYS {
            assert!(obj.contains_key(key), "{who}: no {key:?} in {line}");
        }
        for key in SYNONYMS {
            assert!(
                !obj.contains_key(key),
                "{who}: {key:?} is a synonym of a shared field name (node, peer, subnet, pod, policy): {line}"
            );
        }
        out.push(obj);
    }
    assert!(!out.is_empty(), "{who} wrote no log lines");
    out
}

/// The keys used across `lines`.
fn keys(lines: &[Map<String, Value>]) -> BTreeSet<String> {
    lines.iter().flat_map(|l| l.keys().cloned()).collect()
}

/// Waits until `done` holds, failing with `what` and the process's log if `id` exits or the
/// deadline passes.
fn wait(lab: &mut Lab, id: ProcId, what: &str, mut done: impl FnMut(&Lab) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done(lab) {
        assert!(lab.is_running(id), "exited before {what}:\n{}", lab.log(id));
        assert!(
            Instant::now() < deadline,
            "no {what} in {DEADLINE:?}:\n{}",
            lab.log(id)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn write_manifests(dir: &Path, pod_ip: &str) {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "web1", "namespace": "default", "labels": {"app": "web"}},
         "spec": {"nodeName": "n1"},
         "status": {"podIP": pod_ip, "podIPs": [{"ip": pod_ip}]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "web-deny-ingress", "namespace": "default"},
         "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}},
    ]});
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("objects.json"), list.to_string()).unwrap();
}

#[test]
fn json_logs_of_all_three_programs_share_field_names() {
    if !twill_lab::require_root() {
        return;
    }
    let (twilld_bin, policy_bin, cni_bin) = (bin("twilld"), bin("twill-policy"), bin("twill-cni"));
    let mut lab = Lab::new("logf").expect("lab");
    let endpoint = lab.start_etcd().expect("etcd");
    lab.etcdctl(&["put", &format!("{PREFIX}/config"), CONFIG])
        .expect("config");
    lab.etcdctl(&[
        "put",
        &format!("{PREFIX}/subnets/{BAD_LEASE_SUBNET}-24"),
        r#"{"PublicIP":"not-an-address","BackendType":"vxlan"}"#,
    ])
    .expect("bad lease");

    let mut twilld = Vec::new();
    for n in ["n1", "n2"] {
        let node = lab.add_node(n).expect("node");
        let socket = lab.dir().join(format!("twilld-{n}.sock"));
        let id = lab
            .spawn(
                &node.netns,
                &format!("twilld-{n}"),
                &[
                    twilld_bin.to_str().unwrap(),
                    &format!("--etcd-endpoints={endpoint}"),
                    "--subnet-file",
                    node.subnet_file().to_str().unwrap(),
                    "--resync-period=2",
                    "--log-format=json",
                ],
                // Each node's twilld its own status socket (the lab's nodes share one
                // filesystem).
                &[
                    ("TWILL_LOG", "info"),
                    ("FLANNELD_STATUS_SOCKET", socket.to_str().unwrap()),
                ],
            )
            .expect("spawn twilld");
        twilld.push(id);
    }
    for (n, &id) in ["n1", "n2"].iter().zip(&twilld) {
        let env = lab.node(n).subnet_file();
        wait(&mut lab, id, "subnet.env", |_| {
            std::fs::read_to_string(&env).is_ok_and(|s| s.contains("FLANNEL_SUBNET="))
        });
    }
    wait(&mut lab, twilld[0], "log of the skipped lease", |lab| {
        lab.log(twilld[0]).contains(BAD_LEASE_SUBNET)
    });

    // The CNI plugin: a real ADD and DEL on n1 (CNI_ARGS name the pod default/web1).
    let node1 = lab.node("n1").clone();
    let cni_log = node1.dir.join("cni.log");
    let mut netconf: Value = serde_json::from_str(&node1.flannel_netconf()).unwrap();
    netconf["logFile"] = cni_log.to_str().unwrap().into();
    netconf["logFormat"] = "json".into();
    let pod = lab
        .add_cni_pod("n1", "web1", &cni_bin, &netconf.to_string())
        .expect("CNI ADD");
    let pod_ip = pod.ip().to_string();

    // twill-policy on n1 enforcing a policy on that pod.
    let manifests = lab.dir().join("manifests");
    write_manifests(&manifests, &pod_ip);
    let policy_socket = lab.dir().join("policy-n1.sock");
    let policy = lab
        .spawn(
            &node1.netns,
            "policy-n1",
            &[
                policy_bin.to_str().unwrap(),
                "--manifests",
                manifests.to_str().unwrap(),
                "--node-name",
                "n1",
                "--subnet-file",
                node1.subnet_file().to_str().unwrap(),
                "--log-format",
                "json",
                "run",
                "--poll-ms",
                "200",
                "--metrics-addr",
                "127.0.0.1:9753",
                "--status-socket",
                policy_socket.to_str().unwrap(),
            ],
            &[],
        )
        .expect("spawn twill-policy");
    let netns = node1.netns.clone();
    wait(&mut lab, policy, "twill-policy's table", |lab| {
        lab.exec(&netns, &["nft", "list", "table", "inet", "twill-policy"])
            .is_ok_and(|o| o.status.success())
    });
    wait(&mut lab, policy, "a line naming the node", |lab| {
        lab.log(policy).contains(r#""node":"n1""#)
    });

    lab.del_pod("web1").expect("CNI DEL");
    for id in twilld.iter().chain([&policy]) {
        lab.stop(*id, Duration::from_secs(10)).expect("stop");
    }

    let twilld_lines: Vec<_> = twilld
        .iter()
        .flat_map(|&id| json_lines("twilld", &lab.log(id)))
        .collect();
    let used = keys(&twilld_lines);
    assert!(
        used.contains("subnet"),
        "twilld never named a subnet: {used:?}"
    );
    let skipped = twilld_lines
        .iter()
        .find(|l| {
            l.values()
                .any(|v| v.as_str().is_some_and(|s| s.contains(BAD_LEASE_SUBNET)))
        })
        .expect("the skipped lease's line");
    assert!(
        ["subnet", "node", "peer"]
            .iter()
            .any(|k| skipped.contains_key(*k)),
        "the skipped lease is named by none of subnet, node, peer: {skipped:?}"
    );

    let policy_lines = json_lines("twill-policy", &lab.log(policy));
    assert!(
        policy_lines
            .iter()
            .any(|l| l.get("node") == Some(&json!("n1"))),
        "twill-policy never named its node: {policy_lines:?}"
    );

    let cni_lines = json_lines("twill-cni", &std::fs::read_to_string(&cni_log).unwrap());
    let commands: Vec<_> = cni_lines
        .iter()
        .filter_map(|l| Some((l.get("command")?.as_str()?, l.get("pod")?.as_str()?)))
        .collect();
    assert_eq!(
        commands,
        [("ADD", "default/web1"), ("DEL", "default/web1")],
        "{cni_lines:?}"
    );
    assert!(
        cni_lines[0]["addresses"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{pod_ip}/"))),
        "{cni_lines:?}"
    );

    lab.teardown().expect("teardown");
}
