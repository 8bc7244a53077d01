//! The image runs as kube-flannel.yml says: the DaemonSet of
//! kube-flannel.yml, read from the file, runs from the image under test (env `TWILL_IMAGE`) on
//! each node of a 3-node lab through the lab's kubelet (`kubelet/`): init containers, then
//! containers, with the manifest's command, args, env, privileges and volumes, against the
//! fake API server over HTTPS with in-cluster credentials (`--kube-subnet-mgr`). Pods are
//! attached with the CNI plugin and conflist the init containers installed; traffic crosses
//! nodes; the example NetworkPolicy is enforced by the policy container; then a rolling
//! restart, one node at a time, under 10 ms pings between pods on different nodes, loses
//! nothing.
//!
//! Root and podman only. Without `TWILL_IMAGE` it skips, or fails with `CI=true`.

mod common;
mod kubelet;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kubelet::{DaemonSetPod, Kubelet, NodeCtx, RunningPod};
use serde_json::{json, Value};
use twill_fake_apiserver::client;
use twill_lab::ping::Pinger;
use twill_lab::Lab;

/// Where the fake API server listens (the lab's switch), as `KUBERNETES_SERVICE_HOST`/`_PORT`.
const API_HOST: &str = "198.18.0.1";
const API_PORT: u16 = 6443;
const NODES: [&str; 3] = ["n1", "n2", "n3"];
/// (pod, node, app label): the quick start's pods, so the example policy's matrix is the one
/// the quick start prints.
const PODS: [(&str, &str, &str); 6] = twill_lab::quickstart::PODS;
/// The namespace of the example policy and its pods.
const DEMO: &str = "demo";
/// Pings at 10 ms running through the rolling restart: (from, to), pods on different nodes,
/// none of them a web pod (the policy lets web pods accept TCP 80 only); together they cross
/// every pair of nodes.
const PINGS: [(&str, &str); 3] = [
    ("client-1", "client-2"),
    ("client-2", "other-3"),
    ("other-3", "client-1"),
];
/// How long the test waits for anything asynchronous: generous (a busy 2-core machine; only
/// a failure waits this long).
const DEADLINE: Duration = Duration::from_secs(90);

/// The image under test, or `None` to skip (panics with `CI=true`: CI must run this test).
fn image() -> Option<String> {
    match std::env::var("TWILL_IMAGE") {
        Ok(i) if !i.is_empty() => Some(i),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("TWILL_IMAGE is not set, and CI=true: build the image (scripts/test.sh does) and export its tag")
        }
        _ => {
            eprintln!(
                "skipping: TWILL_IMAGE names no image (build the Dockerfile and export its tag)"
            );
            None
        }
    }
}

fn sh(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A cluster CA and the API server's certificate for its lab address, in `dir`.
/// Returns (CA certificate PEM, server certificate path, server key path).
fn certificates(dir: &Path) -> (String, PathBuf, PathBuf) {
    let ip: std::net::IpAddr = API_HOST.parse().unwrap();
    let c = twill_fake_apiserver::test_certificates(dir, ip).unwrap_or_else(|e| panic!("{e:#}"));
    (
        std::fs::read_to_string(&c.ca_cert).unwrap(),
        c.server_cert,
        c.server_key,
    )
}

/// This process's hard limit of `resource` ("Max open files", ...) from /proc/self/limits:
/// runc cannot give a container more than the test has.
fn own_limit(resource: &str) -> String {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with(resource))
        .unwrap_or_else(|| panic!("/proc/self/limits has no {resource:?}"));
    line[resource.len()..]
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

struct Cluster {
    /// Dropped first: the containers go before their namespaces.
    kubelet: Kubelet,
    lab: Lab,
    socket: PathBuf,
    nodes: BTreeMap<String, NodeCtx>,
    pod: DaemonSetPod,
    running: BTreeMap<String, RunningPod>,
}

impl Cluster {
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        client::call(&self.socket, method, path, "application/json", &body)
    }

    /// What the DaemonSet controller, the scheduler and the kubelet do for one node: a new
    /// Pod object bound to it, then the pod run and waited on until ready.
    fn start_daemon_pod(&mut self, node: &str, seed: u64) -> Duration {
        let n = self.nodes[node].clone();
        let name = kubelet::pod_name(&self.pod.name, seed);
        let obj = self.kubelet.pod_object(&self.pod, &name, &n);
        self.call(
            "POST",
            &format!("/api/v1/namespaces/{}/pods", self.pod.namespace),
            obj,
        );
        let started = Instant::now();
        let running = self
            .kubelet
            .run_pod(&self.pod, &name, &n)
            .unwrap_or_else(|e| panic!("{e}"));
        self.kubelet
            .wait_ready(&self.pod, &running, &n, DEADLINE)
            .unwrap_or_else(|e| panic!("{e}"));
        self.running.insert(node.into(), running);
        started.elapsed()
    }

    /// Deletes the node's daemon pod as the kubelet does: containers stopped within the
    /// grace period, then the object removed.
    fn stop_daemon_pod(&mut self, node: &str) -> Duration {
        let running = self.running.remove(node).expect("running pod");
        let took = self
            .kubelet
            .stop_pod(&running, self.pod.termination_grace)
            .unwrap_or_else(|e| panic!("{e}"));
        self.call(
            "DELETE",
            &format!(
                "/api/v1/namespaces/{}/pods/{}",
                self.pod.namespace, running.name
            ),
            Value::Null,
        );
        took
    }

    fn logs(&self) -> String {
        self.running
            .values()
            .map(|r| self.kubelet.all_logs(r))
            .collect()
    }

    /// Whether a TCP connection from pod `from` to `to` port 80 gets "pong".
    fn connects(&self, from: &str, to: IpAddr) -> bool {
        let bin = twill_lab::bin_path("twill-lab");
        self.lab
            .exec(
                &self.lab.pod(from).netns,
                &[
                    bin.to_str().unwrap(),
                    "probe",
                    "--to",
                    &SocketAddr::new(to, 80).to_string(),
                ],
            )
            .expect("twill-lab probe")
            .status
            .success()
    }

    fn matrix(&self) -> Vec<Vec<bool>> {
        PODS.iter()
            .map(|(from, _, _)| {
                PODS.iter()
                    .map(|(to, _, _)| self.connects(from, IpAddr::V4(self.lab.pod(to).ip())))
                    .collect()
            })
            .collect()
    }

    /// Waits until the reachability matrix is `want`.
    fn wait_matrix(&self, what: &str, want: &[Vec<bool>]) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let got = self.matrix();
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: reachability (rows from, columns to, {PODS:?})\n got {got:?}\nwant {want:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

#[test]
fn the_image_runs_as_kube_flannel_yml_says() {
    if !twill_lab::require_root() {
        return;
    }
    let Some(image) = image() else { return };
    let test_start = Instant::now();
    sh(&["podman", "image", "exists", &image]);

    // The manifest: the DaemonSet's pod (strictly), the ConfigMaps it may mount, the
    // Namespace, the ServiceAccount it runs as.
    let docs = common::documents();
    let pod = kubelet::parse(common::find(&docs, "DaemonSet")).unwrap_or_else(|e| panic!("{e}"));
    let config_maps: BTreeMap<String, BTreeMap<String, String>> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .map(|d| {
            let data = d["data"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            (d["metadata"]["name"].as_str().unwrap().to_string(), data)
        })
        .collect();
    let sa = common::find(&docs, "ServiceAccount");
    assert_eq!(
        (
            sa["metadata"]["name"].as_str(),
            sa["metadata"]["namespace"].as_str()
        ),
        (
            Some(pod.service_account.as_str()),
            Some(pod.namespace.as_str())
        ),
        "the DaemonSet runs as a ServiceAccount the manifest creates"
    );

    // The lab, and the fake API server on HTTPS in the switch.
    let mut lab = Lab::new("dsl").expect("lab");
    let (ca_pem, crt, key) = certificates(lab.dir());
    let socket = lab.dir().join("api.sock");
    let sw = lab.switch_ns();
    lab.spawn(
        &sw,
        "apiserver",
        &[
            twill_lab::bin_path("twill-fake-apiserver")
                .to_str()
                .unwrap(),
            "--listen",
            &format!("{API_HOST}:{API_PORT}"),
            "--control-socket",
            socket.to_str().unwrap(),
            "--tls-cert",
            crt.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[],
    )
    .expect("spawn fake apiserver");
    let deadline = Instant::now() + DEADLINE;
    while client::request(&socket, "GET", "/api/v1/nodes", "", "").is_err() {
        assert!(Instant::now() < deadline, "fake API server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut nodes = BTreeMap::new();
    for n in NODES {
        let node = lab.add_node(n).expect("node");
        nodes.insert(
            n.to_string(),
            NodeCtx {
                name: n.into(),
                netns: node.netns.clone(),
                ip: node.addr.to_string(),
                host_root: node.dir.join("host"),
            },
        );
    }
    let ulimits = vec![
        format!("nofile={0}:{0}", own_limit("Max open files")),
        // Threads and processes: twilld and twill-policy need a few dozen.
        "nproc=4096:4096".to_string(),
    ];
    let kubelet = Kubelet::new(
        &image,
        lab.prefix(),
        API_HOST,
        API_PORT,
        ca_pem,
        format!("lab-token-{}", lab.prefix()),
        config_maps.clone(),
        ulimits,
    );
    let mut c = Cluster {
        kubelet,
        lab,
        socket,
        nodes,
        pod,
        running: BTreeMap::new(),
    };
    c.call(
        "POST",
        "/api/v1/namespaces",
        common::find(&docs, "Namespace").clone(),
    );
    for (i, n) in NODES.iter().enumerate() {
        let cidr = format!("10.244.{}.0/24", i + 1);
        let labels: BTreeMap<String, String> = [
            ("kubernetes.io/os", "linux"),
            ("kubernetes.io/arch", std::env::consts::ARCH),
            ("kubernetes.io/hostname", n),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert!(
            kubelet::selects(&c.pod.node_terms, &labels),
            "the DaemonSet's node affinity {:?} selects no Linux node",
            c.pod.node_terms
        );
        c.call(
            "POST",
            "/api/v1/nodes",
            json!({"metadata": {"name": n, "labels": labels},
                   "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}}),
        );
    }

    // The DaemonSet's pod on every node, until ready.
    for (i, n) in NODES.iter().enumerate() {
        let took = c.start_daemon_pod(n, i as u64 + 1);
        eprintln!("{n}: daemon pod ready {took:.1?} after its first init container started");
    }
    // In-cluster API access over HTTPS (the only listener the daemons can reach): twilld found
    // its node through POD_NAME/POD_NAMESPACE (the downward API; the manifest gives it no
    // NODE_NAME), twill-policy watches NetworkPolicies.
    let requests = c.call("GET", "/fake/requests", Value::Null);
    let daemons: Vec<&Value> = requests
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["userAgent"] != client::TEST_CLIENT)
        .collect();
    for r in c.running.values() {
        assert!(
            daemons.iter().any(|q| q["method"] == "GET"
                && q["resource"] == "pods"
                && q["namespace"] == c.pod.namespace
                && q["name"] == r.name.as_str()),
            "twilld never read its pod {}: {daemons:?}",
            r.name
        );
    }
    assert!(
        daemons
            .iter()
            .any(|q| q["resource"] == "networkpolicies" && q["query"]["watch"] == "true"),
        "twill-policy never watched NetworkPolicies: {daemons:?}"
    );
    let cni_conf = &config_maps["kube-flannel-cfg"]["cni-conf.json"];
    for (i, n) in NODES.iter().enumerate() {
        let node = &c.nodes[*n];
        let env = std::fs::read_to_string(node.host_path("/run/flannel/subnet.env")).unwrap();
        assert!(
            env.contains(&format!("FLANNEL_SUBNET=10.244.{}.1/24\n", i + 1)),
            "{n}: subnet.env from the podCIDR:\n{env}"
        );
        let installed =
            std::fs::read_to_string(node.host_path("/etc/cni/net.d/10-flannel.conflist")).unwrap();
        assert_eq!(
            &installed, cni_conf,
            "{n}: the conflist, as the ConfigMap has it"
        );
        for p in ["flannel", "bridge", "host-local", "portmap", "loopback"] {
            assert!(
                node.host_path(&format!("/opt/cni/bin/{p}")).is_file(),
                "{n}: the init containers installed no {p}"
            );
        }
    }
    // Which masquerade dataplane twilld chose.
    let n1 = c.nodes["n1"].netns.clone();
    let nft = c
        .lab
        .exec(&n1, &["nft", "list", "table", "ip", "flannel-ipv4"]);
    let nft_mode = nft.is_ok_and(|o| o.status.success());
    // Either iptables backend: the image's iptables may not be the host's.
    let ipt_mode = ["iptables-nft-save", "iptables-legacy-save"]
        .iter()
        .any(|save| {
            c.lab
                .exec(&n1, &[save, "-t", "nat"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("FLANNEL-POSTRTG"))
        });
    // The mode must be the one the manifest's net-conf.json asks for (Flannel's default,
    // iptables, when the key is false or absent), with nothing of the other mode.
    let net_conf: Value = serde_json::from_str(&config_maps["kube-flannel-cfg"]["net-conf.json"])
        .expect("the ConfigMap's net-conf.json is JSON");
    let want_nft = net_conf["EnableNFTables"].as_bool().unwrap_or(false);
    eprintln!("twilld masquerade mode observed: nftables table = {nft_mode}, iptables FLANNEL-POSTRTG = {ipt_mode}");
    assert_eq!(
        (nft_mode, ipt_mode),
        (want_nft, !want_nft),
        "net-conf.json's EnableNFTables is {want_nft}: (nftables table, iptables chain) present\n{}",
        c.logs()
    );

    // Pods, attached with what the init containers installed; each reported to the API
    // with its address (as the kubelet does), and serving "pong" on port 80.
    c.call(
        "POST",
        "/api/v1/namespaces",
        json!({"metadata": {"name": DEMO, "labels": {"kubernetes.io/metadata.name": DEMO}}}),
    );
    for (p, n, app) in PODS {
        let node = c.nodes[n].clone();
        let pod = c
            .lab
            .add_attached_pod(n, p, |netns| {
                let result =
                    Kubelet::cni_add(&node, DEMO, p, netns).map_err(|e| anyhow::anyhow!("{e}"))?;
                twill_lab::cni_result_ipv4(&result)
                    .ok_or_else(|| anyhow::anyhow!("no IPv4 address in {result}"))
            })
            .unwrap_or_else(|e| panic!("{p} on {n}: {e:#}"));
        let ip = pod.ip().to_string();
        c.call(
            "POST",
            &format!("/api/v1/namespaces/{DEMO}/pods"),
            json!({"metadata": {"name": p, "namespace": DEMO, "labels": {"app": app}},
                   "spec": {"nodeName": n, "containers": [{"name": "c"}]},
                   "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}),
        );
        let bin = twill_lab::bin_path("twill-lab");
        c.lab
            .spawn(
                &pod.netns,
                &format!("serve-{p}"),
                &[bin.to_str().unwrap(), "serve", "--port", "80"],
                &[],
            )
            .expect("serve");
    }
    let all = vec![vec![true; PODS.len()]; PODS.len()];
    c.wait_matrix("every pod reaches every pod before any policy", &all);

    // The example policy through the API: web pods accept TCP 80 only from client pods. A
    // pod talking to itself never leaves its namespace.
    let policy: Value = serde_saphyr::from_str(twill_lab::quickstart::POLICY).unwrap();
    c.call(
        "POST",
        &format!("/apis/networking.k8s.io/v1/namespaces/{DEMO}/networkpolicies"),
        policy,
    );
    let expected: Vec<Vec<bool>> = PODS
        .iter()
        .enumerate()
        .map(|(i, (_, _, from))| {
            PODS.iter()
                .enumerate()
                .map(|(j, (_, _, to))| i == j || *to != "web" || *from == "client")
                .collect()
        })
        .collect();
    c.wait_matrix("the example policy", &expected);

    // The rolling restart, one node at a time, under 10 ms pings across nodes.
    let pings: Vec<(String, Pinger)> = PINGS
        .iter()
        .map(|(from, to)| {
            let ip = c.lab.pod(to).ip().into();
            let ns = c.lab.pod(from).netns.clone();
            let name = format!("ping-{from}-{to}");
            // A bound on ping's own run, far beyond the test's.
            let ping = Pinger::start(&mut c.lab, &ns, &name, ip, "0.01", Duration::from_secs(900));
            (name, ping)
        })
        .collect();
    let restart_start = Instant::now();
    for (i, n) in NODES.iter().enumerate() {
        let stopped = c.stop_daemon_pod(n);
        let took = c.start_daemon_pod(n, 100 + i as u64);
        eprintln!("{n}: stopped in {stopped:.1?}, restarted and ready {took:.1?} after its first init container started");
    }
    // A last stretch after the last node's restart, so a late effect of it shows too.
    std::thread::sleep(Duration::from_secs(2));
    let restart_took = restart_start.elapsed();
    for (name, ping) in pings {
        // Probes still in flight when ping stops are not losses: what counts is every probe
        // before the last answered one.
        let report = ping.stop(&mut c.lab);
        let answered = report.last_answered();
        eprintln!("{name}: {answered} probes up to the last answered one over the rolling restart ({restart_took:.1?}); ping says {}", report.summary);
        assert!(
            answered > 100,
            "{name}: only {answered} pings answered\n{}",
            report.log
        );
        let lost = report.lost();
        assert!(
            lost.is_empty(),
            "{name}: lost {} of {answered} pings during the rolling restart (icmp_seq {lost:?})\n{}\n{}",
            lost.len(),
            report.log,
            c.logs()
        );
    }
    // The policy holds after the restart: allowed and denied paths as before.
    c.wait_matrix("the example policy after the rolling restart", &expected);
    eprintln!("test took {:.1?}", test_start.elapsed());
}

/// The manifest's DaemonSet, for the parser checks below.
fn daemonset() -> Value {
    common::find(&common::documents(), "DaemonSet").clone()
}

#[test]
fn the_kubelet_reads_every_field_of_the_daemonset() {
    let pod = kubelet::parse(&daemonset()).unwrap_or_else(|e| panic!("{e}"));
    let names = |cs: &[kubelet::Container]| cs.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&pod.init_containers),
        ["install-cni-plugin", "install-cni"]
    );
    assert_eq!(names(&pod.containers), ["kube-flannel", "twill-policy"]);
    let twilld = &pod.containers[0];
    assert_eq!(
        twilld.env[0],
        (
            "POD_NAME".to_string(),
            kubelet::EnvValue::Field(kubelet::PodField::Name)
        )
    );
    assert!(!twilld.privileged);
    assert_eq!(twilld.cap_add, ["NET_ADMIN", "NET_RAW"]);
    assert!(pod.containers[1].privileged);
    assert_eq!(
        pod.containers[1].readiness.as_ref().map(|p| p.port),
        Some(9754)
    );
    assert_eq!(
        pod.volumes["xtables-lock"],
        kubelet::Volume::HostPath {
            path: "/run/xtables.lock".into(),
            file_or_create: true
        }
    );
    assert_eq!(
        pod.volumes["twill-run"],
        kubelet::Volume::HostPath {
            path: "/run/twill".into(),
            file_or_create: false
        }
    );
}

#[test]
fn a_field_the_kubelet_does_not_know_fails_naming_it() {
    type Change = fn(&mut Value);
    let cases: [(&str, Change); 4] = [
        ("imagePullPolicy", |ds| {
            ds["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = json!("Always")
        }),
        ("resources.limits", |ds| {
            ds["spec"]["template"]["spec"]["containers"][1]["resources"]["limits"] =
                json!({"memory": "1Gi"})
        }),
        ("fieldPath", |ds| {
            ds["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["fieldRef"]
                ["fieldPath"] = json!("metadata.labels['app']")
        }),
        ("volumes[0]", |ds| {
            ds["spec"]["template"]["spec"]["volumes"][0] = json!({"name": "run", "emptyDir": {}})
        }),
    ];
    for (field, change) in cases {
        let mut ds = daemonset();
        change(&mut ds);
        let err = kubelet::parse(&ds).expect_err(field);
        assert!(err.contains(field), "{field}: {err}");
    }
}
