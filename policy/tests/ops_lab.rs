//! Root-only: operating twill-policy with a real `twill-policy run` on a lab node.
//!
//! - Metrics on the default port (scraped inside the node's namespace): a denied connection
//!   is counted for the pod whose policy denied it, and its series goes with the pod.
//! - `/status` on the status socket: the ruleset id the daemon loaded is the one `nft list
//!   table` shows, and the top drops follow the counters.
//! - `twill-policy drops` on the NFLOG group prints a denied TCP connect and ping with the
//!   pods on both sides and the isolating policy.
//! - In Kubernetes-API mode, a rejected ruleset (a wrapper around nft rejects full rulesets
//!   while a flag file exists) and the recovery reach the fake API server as one
//!   `FailClosedEntered` and one `FailClosedLeft` event on the node.
//! - With the metrics port taken on the node, `run` logs it and enforces all the same.
//!
//! HTTP clients and the fake API server run on threads that entered the node's namespace
//! (setns), never in the root namespace.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use twill_fake_apiserver::FakeApiServer;
use twill_lab::Lab;
use twill_runtime::status::PolicyStatus;

mod common;
use common::{
    connects, http_get, in_netns, node_with_pods_a_and_b, policy_bin, serve_api_in, wait_for,
};

/// The body of `GET /metrics` on the default metrics port inside `netns`, None if refused.
fn scrape(netns: &str) -> Option<String> {
    http_get(netns, "127.0.0.1:9753", "/metrics")
        .filter(|(code, _)| *code == 200)
        .map(|(_, body)| body)
}

/// The value of the series `name` (with its labels, as exposed) in `text`.
fn value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn status(socket: &Path) -> Option<PolicyStatus> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(twill_runtime::status::fetch(socket)).ok()
}

/// The ruleset id in the marker of `inet twill-policy` in `netns`, as `nft list table` shows it.
fn listed_ruleset_id(lab: &Lab, netns: &str) -> Option<String> {
    let out = lab
        .exec(netns, &["nft", "list", "table", "inet", "twill-policy"])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let at = text.find("twill-policy ruleset ")? + "twill-policy ruleset ".len();
    Some(text[at..at + 16].to_string())
}

fn write(dir: &Path, name: &str, text: &str) {
    // Written aside and renamed: the source never reads half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

const PODS: &str = "\
kind: Namespace
metadata: {name: x}
---
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: n1}
status: {podIP: 10.244.1.2}
";

const POD_B: &str = "\
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: n1}
status: {podIP: 10.244.1.3}
---
kind: NetworkPolicy
metadata: {name: deny-b, namespace: x}
spec: {podSelector: {matchLabels: {app: b}}, policyTypes: [Ingress]}
";

const DROPS_B: &str =
    "twill_policy_dropped_packets_total{namespace=\"x\",pod=\"b\",direction=\"ingress\"}";

/// Starts `twill-policy GLOBAL... run RUN... --status-socket <node dir>/policy.sock` on `node`
/// (node name n1); returns its process and its status socket.
fn spawn_policy(
    lab: &mut Lab,
    node: &twill_lab::Node,
    global: &[&str],
    run: &[&str],
) -> (twill_lab::ProcId, std::path::PathBuf) {
    let socket = node.dir.join("policy.sock");
    let bin = policy_bin().display().to_string();
    let mut argv = vec![bin.as_str()];
    argv.extend_from_slice(global);
    argv.push("run");
    argv.extend_from_slice(run);
    argv.extend(["--status-socket", socket.to_str().unwrap()]);
    let id = lab
        .spawn(&node.netns, "twill-policy", &argv, &[("NODE_NAME", "n1")])
        .unwrap();
    (id, socket)
}

/// The JSON lines `twill-policy drops --output json` printed so far.
fn drop_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn metrics_status_and_nflog_drops_name_the_denied_pods() {
    if !twill_lab::require_root() {
        return;
    }
    let mut lab = Lab::new("polops").unwrap();
    let (node, a, _b) = node_with_pods_a_and_b(&mut lab);
    let dir = lab.dir().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    write(&dir, "pods.yaml", PODS);
    write(&dir, "b.yaml", POD_B);
    let (id, socket) = spawn_policy(
        &mut lab,
        &node,
        &[
            "--manifests",
            dir.to_str().unwrap(),
            "--pod-cidr",
            "10.244.1.0/24",
            "--nflog-group",
            "100",
        ],
        &["--poll-ms", "100"],
    );
    let sock = socket.to_str().unwrap();
    let bin = policy_bin().display().to_string();
    // Ready, and the ruleset the daemon loaded is the one the kernel holds.
    let mut first = None;
    wait_for(
        "/status: ready, ruleset id in the kernel",
        || {
            first = status(&socket).filter(|s| {
                s.ready && s.ruleset_id.is_some() && s.ruleset_id == s.kernel_ruleset_id
            });
            first.is_some()
        },
        || format!("{:?}\n{}", status(&socket), lab.log(id)),
    );
    let first = first.unwrap();
    assert_eq!(first.node, "n1");
    assert!(!first.fail_closed);
    assert_eq!((first.pods, first.policies), (2, 1), "{first:?}");
    assert_eq!(
        listed_ruleset_id(&lab, &node.netns),
        first.ruleset_id,
        "nft list table and /status disagree"
    );
    let text = scrape(&node.netns).expect("metrics on the default port 9753");
    assert!(
        value(&text, "twill_policy_last_good_snapshot_age_seconds").is_some(),
        "{text}"
    );

    // The reader, on the daemon's group, with the daemon's pods.
    let reader = lab
        .spawn(
            &node.netns,
            "drops",
            &[
                &bin,
                "--nflog-group",
                "100",
                "drops",
                "--output",
                "json",
                "--status-socket",
                sock,
            ],
            &[],
        )
        .unwrap();
    wait_for(
        "the reader to bind the group",
        || lab.log(reader).contains("listening on NFLOG group 100"),
        || lab.log(reader),
    );

    // A denied TCP connect and a denied ping from x/a to x/b.
    assert!(!connects(&lab, &a.netns, "10.244.1.3"), "x/b is isolated");
    assert!(!lab.ping(
        &a.netns,
        "10.244.1.3".parse().unwrap(),
        1,
        Duration::from_secs(1)
    ));
    let mut tcp = None;
    let mut ping = None;
    wait_for(
        "the reader to print the denied TCP connect and ping",
        || {
            let lines = drop_lines(&lab.log(reader));
            tcp = lines.iter().find(|l| l["protocol"] == "TCP").cloned();
            ping = lines.iter().find(|l| l["protocol"] == "ICMP").cloned();
            tcp.is_some() && ping.is_some()
        },
        || format!("reader:\n{}\ndaemon:\n{}", lab.log(reader), lab.log(id)),
    );
    for (line, what) in [(tcp.unwrap(), "TCP"), (ping.unwrap(), "ping")] {
        eprintln!("{what}: {line}");
        assert_eq!(line["src_pod"], "x/a", "{line}");
        assert_eq!(line["dst_pod"], "x/b", "{line}");
        assert_eq!(line["src"], "10.244.1.2", "{line}");
        assert_eq!(line["direction"], "ingress", "{line}");
        assert_eq!(line["isolated_pod"], "x/b", "{line}");
        assert_eq!(line["policies"], json!(["x/deny-b"]), "{line}");
        if what == "TCP" {
            assert_eq!(line["dst_port"], 80, "{line}");
        } else {
            assert_eq!(line["icmp_type"], 8, "{line}");
        }
    }

    // Counted for x/b's ingress, in the metrics and in /status's top drops.
    let mut counted = 0.0;
    wait_for(
        "x/b's drops in /metrics",
        || {
            counted = scrape(&node.netns)
                .and_then(|t| value(&t, DROPS_B))
                .unwrap_or(0.0);
            counted >= 2.0
        },
        || scrape(&node.netns).unwrap_or_default(),
    );
    let s = status(&socket).unwrap();
    let top = s
        .top_drops
        .iter()
        .find(|d| d.pod == "x/b" && d.direction == "ingress")
        .unwrap_or_else(|| panic!("x/b not in the top drops: {s:?}"));
    assert!(top.packets as f64 >= counted, "{s:?} vs {counted}");
    eprintln!(
        "x/b ingress drops: {counted} in /metrics, {} in /status",
        top.packets
    );
    // What a scrape and a status request cost here (reported, not asserted: timings are
    // not stable on this machine).
    let t = std::time::Instant::now();
    for _ in 0..20 {
        scrape(&node.netns).expect("scrape");
    }
    let per_scrape = t.elapsed() / 20;
    let t = std::time::Instant::now();
    for _ in 0..20 {
        status(&socket).expect("status");
    }
    eprintln!(
        "GET /metrics {per_scrape:?}, GET /status {:?} (mean of 20, client included)",
        t.elapsed() / 20
    );

    // The text form, and --count: a second reader (one process per group) prints one line
    // and exits.
    lab.stop(reader, Duration::from_secs(5)).unwrap();
    let text_reader = lab
        .spawn(
            &node.netns,
            "drops-text",
            &[
                &bin,
                "--nflog-group",
                "100",
                "drops",
                "--count",
                "1",
                "--status-socket",
                sock,
            ],
            &[],
        )
        .unwrap();
    wait_for(
        "the text reader to bind the group",
        || {
            lab.log(text_reader)
                .contains("listening on NFLOG group 100")
        },
        || lab.log(text_reader),
    );
    assert!(!connects(&lab, &a.netns, "10.244.1.3"), "x/b is isolated");
    let text_log = lab.log_path(text_reader).unwrap();
    wait_for(
        "the text reader to print one line and exit",
        || !lab.is_running(text_reader),
        || std::fs::read_to_string(&text_log).unwrap_or_default(),
    );
    let log = lab.log(text_reader);
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("DENIED")).collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].starts_with("DENIED ingress TCP/80 x/a (10.244.1.2:")
            && lines[0].ends_with(" -> x/b (10.244.1.3:80): x/b isolated for ingress by x/deny-b"),
        "{log}"
    );

    // x/b leaves the node: its series goes, and the kernel holds the new ruleset.
    std::fs::remove_file(dir.join("b.yaml")).unwrap();
    wait_for(
        "x/b's series to go",
        || scrape(&node.netns).is_some_and(|t| !t.contains("pod=\"b\"")),
        || scrape(&node.netns).unwrap_or_default(),
    );
    let after = status(&socket).unwrap();
    assert_ne!(after.ruleset_id, first.ruleset_id);
    assert_eq!(after.ruleset_id, after.kernel_ruleset_id, "{after:?}");
    assert_eq!(listed_ruleset_id(&lab, &node.netns), after.ruleset_id);
    assert!(after.top_drops.iter().all(|d| d.pod != "x/b"), "{after:?}");
    assert!(lab.is_running(id), "{}", lab.log(id));
    lab.teardown().unwrap();
}

/// An nft that runs the real one, except that while `flag` exists it rejects every script
/// with allow rules (`return comment`), as a kernel short of memory would: the enforcer
/// falls back to the isolation-only table.
fn rejecting_nft(dir: &Path, flag: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("nft-wrapper");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ninput=$(cat)\nif [ -e {flag} ]; then\n  case \"$input\" in *\"return comment\"*) echo \"Error: Could not process rule: No space left on device\" >&2; exit 1;; esac\nfi\nprintf '%s\\n' \"$input\" | exec nft \"$@\"\n",
            flag = flag.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// The reasons of the events on node `n1` in the fake API server, oldest first, with their
/// series counts.
fn node_events(netns: &str, url: &str) -> Vec<(String, i32)> {
    use k8s_openapi::api::events::v1::Event;
    let url = url.to_string();
    in_netns(netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let client = twill_runtime::kube::client(&twill_runtime::kube::ClientOptions {
                api_url: url,
                ..Default::default()
            })
            .await
            .unwrap();
            let api: kube::Api<Event> = kube::Api::namespaced(client, "default");
            let mut list = api
                .list(&kube::api::ListParams::default())
                .await
                .unwrap()
                .items;
            list.sort_by_key(|e| {
                e.metadata
                    .resource_version
                    .clone()
                    .unwrap_or_default()
                    .parse::<u64>()
                    .unwrap_or(0)
            });
            list.into_iter()
                .filter(|e| {
                    e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("n1")
                        && e.reporting_controller.as_deref() == Some("twill-policy")
                })
                .map(|e| {
                    (
                        e.reason.unwrap_or_default(),
                        e.series.map_or(1, |s| s.count),
                    )
                })
                .collect()
        })
    })
}

#[test]
fn fail_closed_entered_and_left_are_events_on_the_node() {
    if !twill_lab::require_root() {
        return;
    }
    let mut lab = Lab::new("polevt").unwrap();
    let node = lab.add_node("n1").unwrap();
    let srv = FakeApiServer::new();
    srv.put("", "namespaces", "", json!({"metadata": {"name": "x"}}));
    srv.put(
        "",
        "pods",
        "x",
        json!({"metadata": {"name": "a", "namespace": "x", "labels": {"app": "a"}},
               "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
               "status": {"phase": "Running", "podIP": "10.244.1.2",
                          "podIPs": [{"ip": "10.244.1.2"}]}}),
    );
    let policy = |port: u16| {
        json!({"metadata": {"name": "web", "namespace": "x"},
               "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": port}]}]}})
    };
    srv.put("networking.k8s.io", "networkpolicies", "x", policy(80));
    serve_api_in(&node.netns, &srv, "127.0.0.1:16444");
    let url = "http://127.0.0.1:16444";
    let flag = lab.dir().join("reject-full-rulesets");
    let nft = rejecting_nft(lab.dir(), &flag);
    let (id, socket) = spawn_policy(
        &mut lab,
        &node,
        &[
            "--kube-api-url",
            url,
            "--nft",
            nft.to_str().unwrap(),
            "--pod-cidr",
            "10.244.1.0/24",
        ],
        &[],
    );
    let ready = |want_fail_closed: bool| {
        move |s: &Option<PolicyStatus>| {
            s.as_ref().is_some_and(|s| {
                s.fail_closed == want_fail_closed
                    && s.ruleset_id.is_some()
                    && s.ruleset_id == s.kernel_ruleset_id
            })
        }
    };
    wait_for(
        "the full ruleset",
        || ready(false)(&status(&socket)),
        || format!("{:?}\n{}", status(&socket), lab.log(id)),
    );
    assert!(node_events(&node.netns, url).is_empty());

    // Full rulesets rejected from now on; a policy change makes the loop apply one.
    std::fs::write(&flag, "").unwrap();
    srv.put("networking.k8s.io", "networkpolicies", "x", policy(81));
    wait_for(
        "the isolation-only table",
        || ready(true)(&status(&socket)),
        || format!("{:?}\n{}", status(&socket), lab.log(id)),
    );
    // The loop retries every second while it is fail-closed: several syncs, one event.
    let syncs = |text: &str| value(text, "twill_policy_syncs_total{result=\"fail_closed\"}");
    wait_for(
        "three fail-closed syncs",
        || scrape(&node.netns).and_then(|t| syncs(&t)).unwrap_or(0.0) >= 3.0,
        || scrape(&node.netns).unwrap_or_default(),
    );
    wait_for(
        "FailClosedEntered",
        || !node_events(&node.netns, url).is_empty(),
        || lab.log(id),
    );
    assert_eq!(
        node_events(&node.netns, url),
        vec![("FailClosedEntered".to_string(), 1)]
    );

    // Accepted again: the next retry loads the full ruleset.
    std::fs::remove_file(&flag).unwrap();
    wait_for(
        "the full ruleset again",
        || ready(false)(&status(&socket)),
        || format!("{:?}\n{}", status(&socket), lab.log(id)),
    );
    wait_for(
        "FailClosedLeft",
        || node_events(&node.netns, url).len() >= 2,
        || format!("{:?}\n{}", node_events(&node.netns, url), lab.log(id)),
    );
    // Unchanged syncs afterwards publish nothing more.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        node_events(&node.netns, url),
        vec![
            ("FailClosedEntered".to_string(), 1),
            ("FailClosedLeft".to_string(), 1)
        ]
    );
    assert!(lab.is_running(id), "{}", lab.log(id));
    lab.teardown().unwrap();
}

#[test]
fn a_taken_metrics_port_does_not_stop_enforcement() {
    if !twill_lab::require_root() {
        return;
    }
    let mut lab = Lab::new("polport").unwrap();
    let node = lab.add_node("n1").unwrap();
    // Something else on the node has the default metrics port.
    let _taken = in_netns(&node.netns, || {
        std::net::TcpListener::bind("0.0.0.0:9753").expect("bind 9753")
    });
    let dir = lab.dir().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    write(&dir, "pods.yaml", PODS);
    let (id, socket) = spawn_policy(
        &mut lab,
        &node,
        &["--manifests", dir.to_str().unwrap()],
        &[],
    );
    wait_for(
        "the ruleset loaded without metrics",
        || status(&socket).is_some_and(|s| s.ready && s.ruleset_id == s.kernel_ruleset_id),
        || lab.log(id),
    );
    assert!(
        lab.log(id)
            .contains("cannot serve metrics on 0.0.0.0:9753: Address already in use"),
        "{}",
        lab.log(id)
    );
    assert!(lab.is_running(id), "{}", lab.log(id));
    lab.teardown().unwrap();
}
