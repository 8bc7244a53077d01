//! Root-only: `twill-policy run` before its first good snapshot.
//!
//! - `closed_from_the_first_second`: a node with two pods on its bridge and a manifests
//!   directory that cannot give a snapshot (it cannot be listed): the pods cannot open new
//!   connections (startup isolation of the node's pod subnet), /readyz says 503; once the
//!   manifests are there the same path opens and /readyz says 200. Then twill-policy is
//!   restarted with the directory unreadable again: the table of the earlier run stays (same
//!   ruleset id, path still open) instead of total isolation.
//! - `unreachable_api_backs_off_without_spinning`: `run` against a Kubernetes API URL where
//!   nothing listens (127.0.0.1 inside the node's namespace): every error is logged, the
//!   delays between attempts grow, the process uses almost no CPU, /healthz is 200 and
//!   /readyz 503; once the fake API server starts on that port it becomes ready.
//!
//! Everything runs inside lab namespaces; HTTP clients and the fake API server run on
//! threads that entered the node's namespace (setns), never in the root namespace.

use std::time::{Duration, Instant};

use serde_json::json;
use twill_fake_apiserver::FakeApiServer;
use twill_lab::Lab;

mod common;
use common::{connects, http_get, node_with_pods_a_and_b, policy_bin, serve_api_in, wait_for};

const HEALTH: &str = "127.0.0.1:9754";

fn bin() -> String {
    policy_bin().display().to_string()
}

/// `GET path` on the health address inside `netns`: (status code, body), None if refused.
fn get(netns: &str, path: &str) -> Option<(u16, String)> {
    http_get(netns, HEALTH, path)
}

fn table(lab: &Lab, netns: &str) -> String {
    let out = lab
        .exec(netns, &["nft", "list", "table", "inet", "twill-policy"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

const GOOD: &str = "\
kind: Namespace
metadata: {name: x}
---
kind: Pod
metadata: {name: a, namespace: x}
spec: {nodeName: n1}
status: {podIPs: [{ip: 10.244.1.2}]}
---
kind: Pod
metadata: {name: b, namespace: x}
spec: {nodeName: n1}
status: {podIPs: [{ip: 10.244.1.3}]}
";

#[test]
fn closed_from_the_first_second() {
    if !twill_lab::require_root() {
        return;
    }
    let mut lab = Lab::new("polstart").unwrap();
    let (node, a, _b) = node_with_pods_a_and_b(&mut lab);

    // No good snapshot: the manifests directory cannot be listed yet. (A file that
    // cannot be parsed only breaks its own namespaces; a directory that cannot be read
    // gives no snapshot at all.)
    let dir = lab.dir().join("manifests");
    let bin = bin();
    let socket = node.dir.join("policy.sock");
    let argv = [
        bin.as_str(),
        "--manifests",
        dir.to_str().unwrap(),
        "--pod-cidr",
        "10.244.1.0/24",
        "run",
        "--poll-ms",
        "200",
        "--status-socket",
        socket.to_str().unwrap(),
    ];
    let id = lab
        .spawn(&node.netns, "policy-1", &argv, &[("NODE_NAME", "n1")])
        .unwrap();
    wait_for(
        "the startup isolation table",
        || table(&lab, &node.netns).contains("chain unknown-ingress"),
        || format!("{}\n{}", table(&lab, &node.netns), lab.log(id)),
    );
    assert!(lab.log(id).contains("startup isolation"), "{}", lab.log(id));
    assert!(
        lab.log(id).contains("cannot read directory"),
        "{}",
        lab.log(id)
    );
    for _ in 0..3 {
        assert!(
            !connects(&lab, &a.netns, "10.244.1.3"),
            "a -> b open before the first good snapshot:\n{}",
            table(&lab, &node.netns)
        );
    }
    let (code, body) = get(&node.netns, "/readyz").expect("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no good snapshot"), "{body}");
    let (code, body) = get(&node.netns, "/healthz").expect("/healthz");
    assert_eq!(code, 200, "{body}");

    // The manifests are fixed: a and b are known pods no policy selects, so a -> b opens.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pods.yaml"), GOOD).unwrap();
    wait_for(
        "a -> b open after the first good snapshot",
        || connects(&lab, &a.netns, "10.244.1.3"),
        || format!("{}\n{}", table(&lab, &node.netns), lab.log(id)),
    );
    wait_for(
        "/readyz 200",
        || get(&node.netns, "/readyz").is_some_and(|(c, _)| c == 200),
        || format!("{:?}", get(&node.netns, "/readyz")),
    );
    let (_, body) = get(&node.netns, "/readyz").unwrap();
    assert!(body.contains("max age 120s"), "{body}");
    assert!(
        lab.log(id).contains("first good snapshot enforced"),
        "{}",
        lab.log(id)
    );

    // Restart without reboot while the manifests cannot be read again: the earlier run's
    // table (the last known policy) stays rather than total isolation.
    lab.stop(id, Duration::from_secs(5)).unwrap();
    let before = table(&lab, &node.netns);
    let marker = before
        .lines()
        .find(|l| l.contains("twill-policy ruleset"))
        .expect("ruleset id")
        .to_string();
    std::fs::rename(&dir, lab.dir().join("manifests.away")).unwrap();
    let id = lab
        .spawn(&node.netns, "policy-2", &argv, &[("NODE_NAME", "n1")])
        .unwrap();
    wait_for(
        "the earlier table kept",
        || lab.log(id).contains("from an earlier run stays"),
        || lab.log(id),
    );
    assert!(table(&lab, &node.netns).contains(&marker));
    assert!(connects(&lab, &a.netns, "10.244.1.3"));
    assert_eq!(get(&node.netns, "/readyz").unwrap().0, 503);
    lab.teardown().unwrap();
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); `rest` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz: f64 = String::from_utf8(
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    ticks as f64 / hz
}

/// Seconds of the day of every log line containing `needle` (timestamps of the default
/// tracing format, ANSI colours stripped).
fn times_of(log: &str, needle: &str) -> Vec<f64> {
    let mut out = Vec::new();
    let mut last = 0.0;
    for line in log.lines().filter(|l| l.contains(needle)) {
        let plain: String = {
            let mut s = String::new();
            let mut esc = false;
            for c in line.chars() {
                match (esc, c) {
                    (false, '\x1b') => esc = true,
                    (true, 'm') => esc = false,
                    (true, _) => {}
                    (false, c) => s.push(c),
                }
            }
            s
        };
        let Some(t) = plain
            .split_whitespace()
            .next()
            .and_then(|w| w.split_once('T'))
        else {
            continue;
        };
        let hms: Vec<f64> =
            t.1.trim_end_matches('Z')
                .split(':')
                .filter_map(|x| x.parse().ok())
                .collect();
        if hms.len() != 3 {
            continue;
        }
        let mut secs = hms[0] * 3600.0 + hms[1] * 60.0 + hms[2];
        while secs < last {
            secs += 86400.0; // past midnight
        }
        last = secs;
        out.push(secs);
    }
    out
}

#[test]
fn unreachable_api_backs_off_without_spinning() {
    if !twill_lab::require_root() {
        return;
    }
    let mut lab = Lab::new("polapi").unwrap();
    let node = lab.add_node("n1").unwrap();
    let bin = bin();
    let id = lab
        .spawn(
            &node.netns,
            "policy",
            &[
                bin.as_str(),
                "--kube-api-url",
                "http://127.0.0.1:16443",
                "--pod-cidr",
                "10.244.1.0/24",
                "run",
                "--status-socket",
                node.dir.join("policy.sock").to_str().unwrap(),
            ],
            &[("NODE_NAME", "n1"), ("NO_COLOR", "1")],
        )
        .unwrap();
    let pid = lab.pid(id).unwrap();
    // Four errors of one watch: three delays, each drawn from a doubling range.
    wait_for(
        "four failed Pod watches",
        || times_of(&lab.log(id), "kind=\"Pod\"").len() >= 4,
        || lab.log(id),
    );
    let t = times_of(&lab.log(id), "kind=\"Pod\"");
    let gaps: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps[2] > gaps[0],
        "delays do not grow: {gaps:?}\n{}",
        lab.log(id)
    );
    assert!(gaps[0] >= 0.3, "retried at once: {gaps:?}\n{}", lab.log(id));
    assert!(
        lab.log(id).contains("Connection refused"),
        "the cause is not logged:\n{}",
        lab.log(id)
    );
    // Almost no CPU while it cannot reach the API (it used to spin at 100%).
    let c0 = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(5));
    let used = cpu_seconds(pid) - c0;
    assert!(used < 0.5, "{used:.2} s of CPU in 5 s\n{}", lab.log(id));
    eprintln!("CPU over 5 s while the API is unreachable: {used:.2} s");
    assert!(lab.is_running(id), "{}", lab.log(id));
    let (code, body) = get(&node.netns, "/healthz").expect("/healthz");
    assert_eq!(code, 200, "{body}");
    let (code, body) = get(&node.netns, "/readyz").expect("/readyz");
    assert_eq!(code, 503, "{body}");
    // The startup isolation is in place meanwhile.
    assert!(table(&lab, &node.netns).contains("chain unknown-ingress"));

    // The API comes up on that port: the source lists, the loop applies, /readyz says 200.
    let srv = FakeApiServer::new();
    srv.put("", "namespaces", "", json!({"metadata": {"name": "x"}}));
    srv.put(
        "",
        "pods",
        "x",
        json!({"metadata": {"name": "a", "namespace": "x"},
               "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
               "status": {"phase": "Running", "podIP": "10.244.1.2",
                          "podIPs": [{"ip": "10.244.1.2"}]}}),
    );
    serve_api_in(&node.netns, &srv, "127.0.0.1:16443");
    // The next attempt comes after at most ~13 s (the fifth delay); 60 s is generous.
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&node.netns, "/readyz").map(|(c, _)| c) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "not ready: {:?}\n{}",
            get(&node.netns, "/readyz"),
            lab.log(id)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        lab.log(id).contains("first good snapshot enforced"),
        "{}",
        lab.log(id)
    );
    assert!(!srv.requests().is_empty());
    lab.teardown().unwrap();
}
