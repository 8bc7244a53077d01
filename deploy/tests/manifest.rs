//! What operators apply, checked against the code:
//! - every document of kube-flannel.yml is a valid Kubernetes object: parsed into the
//!   k8s-openapi type of its kind and serialized back, nothing may be lost (a misspelt or
//!   misplaced field would be);
//! - it has Flannel's objects and names, so it replaces Flannel's manifest in place;
//! - its RBAC rules are exactly the API calls twilld and twill-policy make, plus creating and
//!   patching events.k8s.io events;
//! - twill-policy's metrics port is declared, and both containers share the host's
//!   /run/twill for the status sockets;
//! - every path and command it names exists in the Dockerfile's runtime stage, and so does
//!   `/opt/bin/flanneld` (what Flannel's own DaemonSet runs);
//! - the Dockerfile's build fetches nothing but Debian packages and crates;
//! - its net-conf.json and cni-conf.json pass twill's own parsers, and the args pass twilld's
//!   flag parser;
//! - the systemd units and the drop-in CNI config agree with the same parsers.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::Value;

mod common;
use common::{documents, find, read};

/// The first place where `typed` (after a round trip through the k8s-openapi type) lacks or
/// changes something `raw` has.
fn first_loss(raw: &Value, typed: &Value, path: &str) -> Option<String> {
    match (raw, typed) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(k, v)| match b.get(k) {
            None => Some(format!("{path}.{k} is not a field of this kind")),
            Some(w) => first_loss(v, w, &format!("{path}.{k}")),
        }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| first_loss(v, w, &format!("{path}[{i}]"))),
        (Value::String(a), Value::Number(n)) | (Value::Number(n), Value::String(a))
            if a == &n.to_string() =>
        {
            None
        }
        (a, b) if a == b => None,
        (a, b) => Some(format!("{path}: {a} became {b}")),
    }
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> Value {
    let typed: T =
        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{}: {e}", doc["kind"]));
    serde_json::to_value(typed).unwrap()
}

fn typed(doc: &Value) -> Value {
    match doc["kind"].as_str().unwrap() {
        "Namespace" => round_trip::<Namespace>(doc),
        "ClusterRole" => round_trip::<ClusterRole>(doc),
        "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(doc),
        "ServiceAccount" => round_trip::<ServiceAccount>(doc),
        "ConfigMap" => round_trip::<ConfigMap>(doc),
        "DaemonSet" => round_trip::<DaemonSet>(doc),
        other => panic!("unexpected kind {other} in kube-flannel.yml"),
    }
}

#[test]
fn every_document_is_a_valid_kubernetes_object() {
    let docs = documents();
    assert_eq!(docs.len(), 6);
    for doc in &docs {
        let back = typed(doc);
        if let Some(loss) = first_loss(doc, &back, doc["kind"].as_str().unwrap()) {
            panic!("{loss}");
        }
    }
}

#[test]
fn the_round_trip_catches_a_typo() {
    let mut ds = find(&documents(), "DaemonSet").clone();
    ds["spec"]["template"]["spec"]["hostNetwrok"] = Value::Bool(true);
    assert!(first_loss(&ds, &typed(&ds), "DaemonSet")
        .unwrap()
        .contains("hostNetwrok"));
}

#[test]
fn objects_and_names_are_flannels() {
    let docs = documents();
    let names: BTreeSet<(String, String, String)> = docs
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_string(),
                d["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                d["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String, String)> = [
        ("Namespace", "", "kube-flannel"),
        ("ClusterRole", "", "flannel"),
        ("ClusterRoleBinding", "", "flannel"),
        ("ServiceAccount", "kube-flannel", "flannel"),
        ("ConfigMap", "kube-flannel", "kube-flannel-cfg"),
        ("DaemonSet", "kube-flannel", "kube-flannel-ds"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(names, want);
    let ds = find(&docs, "DaemonSet");
    assert_eq!(ds["spec"]["selector"]["matchLabels"]["app"], "flannel");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], "flannel");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    let twilld = &pod["containers"][0];
    assert_eq!(twilld["name"], "kube-flannel");
    assert_eq!(twilld["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(twilld["livenessProbe"]["httpGet"]["path"], "/healthz");
}

/// (API group, resource, verb) triples the ClusterRole grants.
fn granted(docs: &[Value]) -> BTreeSet<(String, String, String)> {
    let role = find(docs, "ClusterRole");
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    out.insert((
                        g.as_str().unwrap().into(),
                        r.as_str().unwrap().into(),
                        v.as_str().unwrap().into(),
                    ));
                }
            }
        }
    }
    out
}

/// The API group of a resource the programs use (the code lists resources without groups).
fn api_group(resource: &str) -> &'static str {
    match resource {
        "networkpolicies" => "networking.k8s.io",
        "clusternetworkpolicies" | "adminnetworkpolicies" | "baselineadminnetworkpolicies" => {
            "policy.networking.k8s.io"
        }
        "events" => "events.k8s.io",
        _ => "",
    }
}

/// What both programs' Kubernetes events need (twill-runtime's `NodeEvents`, through kube's
/// events Recorder: it creates an event, then patches its count when it repeats).
const EVENT_VERBS: &[(&str, &str)] = &[("events", "create"), ("events", "patch")];

#[test]
fn rbac_covers_every_api_call_the_programs_make() {
    let docs = documents();
    let granted = granted(&docs);
    let used = twill::registry::kube::API_VERBS
        .iter()
        .chain(twill_policy::source::kube::API_VERBS.iter())
        .chain(EVENT_VERBS.iter());
    let mut wanted = BTreeSet::new();
    for (resource, verb) in used {
        let want = (
            api_group(resource).to_string(),
            resource.to_string(),
            verb.to_string(),
        );
        assert!(
            granted.contains(&want),
            "kube-flannel.yml's ClusterRole lacks {want:?}; granted: {granted:?}"
        );
        wanted.insert(want);
    }
    // Nothing more: every grant beyond what the programs use widens what a compromised
    // node can do.
    let extra: Vec<_> = granted.difference(&wanted).collect();
    assert!(extra.is_empty(), "granted but never used: {extra:?}");
    let binding = find(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], "flannel");
    assert_eq!(binding["subjects"][0]["name"], "flannel");
    assert_eq!(binding["subjects"][0]["namespace"], "kube-flannel");
}

/// Files the Dockerfile's runtime stage holds: its COPY destinations, the symlinks its RUN
/// lines make (`ln -s TARGET LINK`, kept only when TARGET is there), what its apt packages
/// install that the manifest and the programs call, and the base image's shell tools.
/// (scripts/image-build.sh checks the built image itself; this is the check that needs no
/// image build.)
fn runtime_files() -> BTreeSet<String> {
    let dockerfile = read("Dockerfile");
    let stage = dockerfile.rsplit("\nFROM ").next().unwrap();
    assert!(
        stage.contains(" AS runtime"),
        "the last stage must be the runtime stage"
    );
    let mut files: BTreeSet<String> = ["/bin/sh", "/bin/cp", "/bin/mv"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for line in stage.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"COPY") {
            let args: Vec<&str> = words[1..]
                .iter()
                .filter(|w| !w.starts_with("--"))
                .copied()
                .collect();
            let (dest, srcs) = args.split_last().unwrap();
            for src in srcs {
                let name = src.rsplit('/').next().unwrap();
                files.insert(if dest.ends_with('/') {
                    format!("{dest}{name}")
                } else {
                    dest.to_string()
                });
            }
        }
        if line.contains("apt-get install") {
            if line.contains("nftables") {
                files.insert("/usr/sbin/nft".into());
            }
            if line.contains("kmod") {
                files.insert("/usr/sbin/modprobe".into());
            }
            if words.contains(&"iptables") {
                for f in [
                    "iptables-restore",
                    "ip6tables-restore",
                    "iptables",
                    "ip6tables",
                ] {
                    files.insert(format!("/usr/sbin/{f}"));
                }
            }
        }
        for i in (0..words.len().saturating_sub(3)).filter(|&i| words[i..i + 2] == ["ln", "-s"]) {
            let (target, link) = (words[i + 2], words[i + 3]);
            let dir = link.rsplit_once('/').unwrap().0;
            let resolved = if target.starts_with('/') {
                target.to_string()
            } else {
                format!("{dir}/{target}")
            };
            if files.contains(&resolved) {
                files.insert(link.to_string());
            }
        }
    }
    files
}

fn words_of(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .flat_map(|s| {
                    s.as_str()
                        .unwrap()
                        .split_whitespace()
                        .map(String::from)
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_path_and_command_exists_in_the_image() {
    let files = runtime_files();
    for f in [
        "/opt/bin/twilld",
        "/opt/bin/twill-policy",
        // Flannel's own DaemonSet runs these: changing only its image to twill's must work.
        "/opt/bin/flanneld",
        "/opt/bin/install-conf",
        "/flannel",
        "/usr/sbin/nft",
        // twilld's iptables mode (net-conf.json "EnableNFTables": false, as kube-flannel.yml).
        "/usr/sbin/iptables-restore",
        "/usr/sbin/ip6tables-restore",
        "/opt/bin/install-cni.sh",
    ] {
        assert!(
            files.contains(f),
            "{f} missing from the runtime stage: {files:?}"
        );
    }
    for p in ["bridge", "host-local", "portmap", "loopback"] {
        assert!(
            files.contains(&format!("/opt/cni/plugins/{p}")),
            "plugin {p} missing"
        );
        assert!(read("deploy/install-cni.sh").contains(p));
    }
    let docs = documents();
    let pod = &find(&docs, "DaemonSet")["spec"]["template"]["spec"];
    let containers = pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["containers"].as_array().unwrap());
    for c in containers {
        let cmd = words_of(&c["command"]);
        assert!(
            files.contains(&cmd[0]),
            "{}: command {} not in the image",
            c["name"],
            cmd[0]
        );
        // Image paths the container reads (not the hostPath mounts it writes to).
        for w in cmd.iter().chain(words_of(&c["args"]).iter()) {
            let w = w.trim_end_matches(';');
            if w == "/flannel" || w.starts_with("/opt/bin/") {
                assert!(files.contains(w), "{}: {w} not in the image", c["name"]);
            }
        }
    }
    let dockerfile = read("Dockerfile");
    assert!(
        dockerfile.contains("--locked"),
        "the build must use Cargo.lock"
    );
    for from in dockerfile.lines().filter(|l| l.starts_with("FROM ")) {
        let image = from.split_whitespace().nth(1).unwrap();
        let tag = image.rsplit(':').next().unwrap();
        assert!(
            image.contains(':') && tag != "latest" && tag.chars().any(|c| c.is_ascii_digit()),
            "unpinned base image {image}"
        );
    }
}

/// The Dockerfile's instructions with continuation lines joined, comments left out.
fn dockerfile_instructions() -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in read("Dockerfile").lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => cur.push_str(part),
            None => {
                cur.push_str(line);
                if !cur.trim().is_empty() {
                    out.push(cur.trim().to_string());
                }
                cur.clear();
            }
        }
    }
    out
}

#[test]
fn the_build_fetches_only_debian_packages_and_crates() {
    // Builds here reach Debian's archive and crates.io and nothing else (scripts/image-build.sh
    // runs this Dockerfile as it is), and a user's build should need no more than that either.
    let instructions = dockerfile_instructions();
    assert!(instructions.iter().any(|i| i.starts_with("RUN ")));
    for i in &instructions {
        assert!(!i.starts_with("ADD "), "ADD can fetch URLs; use COPY: {i}");
        let words: Vec<&str> = i
            .split(|c: char| c.is_whitespace() || c == ';' || c == '&' || c == '|')
            .collect();
        for fetcher in ["curl", "wget", "git", "rustup", "pip", "pip3", "npm", "go"] {
            assert!(
                !words.contains(&fetcher),
                "the Dockerfile runs {fetcher}: only apt-get and cargo may fetch: {i}"
            );
        }
        if i.contains("cargo build") {
            assert!(i.contains("--locked"), "cargo build without --locked: {i}");
        }
    }
    // The line continuation handling above is what the scan relies on.
    assert!(instructions
        .iter()
        .any(|i| i.contains("apt-get update") && i.contains("apt-get install")));
}

#[test]
fn configmap_and_args_pass_twills_parsers() {
    let docs = documents();
    let cm = find(&docs, "ConfigMap");
    let net_conf = cm["data"]["net-conf.json"].as_str().unwrap();
    let cfg = twill_formats::net_conf::NetConfig::parse(net_conf).expect("net-conf.json");
    assert_eq!(cfg.backend_type(), "vxlan");
    assert_eq!(cfg.network.unwrap().to_string(), "10.244.0.0/16");

    let cni_conf: Value =
        serde_json::from_str(cm["data"]["cni-conf.json"].as_str().unwrap()).unwrap();
    let dropin: Value = serde_json::from_str(&read("deploy/cni/10-flannel.conflist")).unwrap();
    // Equal to the drop-in, which the CNI plugin's own test (cni-shim/tests/deploy_conflist.rs)
    // passes through its parser and delegate checks.
    assert_eq!(
        cni_conf, dropin,
        "deploy/cni/10-flannel.conflist differs from the ConfigMap's"
    );

    let ds = find(&docs, "DaemonSet");
    let twilld = &ds["spec"]["template"]["spec"]["containers"][0];
    let argv: Vec<String> = std::iter::once("twilld".to_string())
        .chain(words_of(&twilld["args"]))
        .collect();
    let flags = <twill::flags::Flags as clap::Parser>::try_parse_from(
        twill::flags::normalize_go_args(argv),
    )
    .expect("twilld args");
    assert!(flags.ip_masq && flags.kube_subnet_mgr);
    assert_eq!(flags.healthz_port, 8081);
    assert_eq!(twilld["ports"][0]["containerPort"], 8081);
}

#[test]
fn systemd_units_run_the_installed_programs_with_valid_flags() {
    let unit = read("deploy/systemd/twilld.service");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let argv: Vec<String> = exec.split_whitespace().map(String::from).collect();
    assert_eq!(argv[0], "/usr/local/bin/twilld");
    let flags = <twill::flags::Flags as clap::Parser>::try_parse_from(
        twill::flags::normalize_go_args(argv),
    )
    .expect("twilld.service flags");
    assert!(flags.ip_masq);
    for var in unit
        .lines()
        .filter_map(|l| l.trim_start_matches("#   ").split('=').next())
        .filter(|v| v.starts_with("FLANNELD_"))
    {
        let flag = format!(
            "--{}",
            var.trim_start_matches("FLANNELD_")
                .to_lowercase()
                .replace('_', "-")
        );
        let help = <twill::flags::Flags as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        assert!(
            help.contains(&flag),
            "{var} in twilld.service matches no flag {flag}"
        );
    }
    let policy = read("deploy/systemd/twill-policy.service");
    let exec = policy
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    assert!(exec.starts_with("/usr/local/bin/twill-policy $TWILL_POLICY_SOURCE "));
    let argv: Vec<String> = exec.split_whitespace().skip(2).map(String::from).collect();
    check_policy_args(&argv);
    // twilld writes subnet.env under its RuntimeDirectory, kept across restarts.
    assert!(unit.contains("RuntimeDirectory=flannel"));
}

/// twill-policy's flags named in `args` exist (as clap fields of its CLI), and `args` turn on
/// unknown-pod isolation from twilld's subnet.env and serve health on loopback port 9754.
/// Returns the health address.
fn check_policy_args(args: &[String]) -> String {
    let main = read("policy/src/main.rs");
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let field = a[2..].split('=').next().unwrap().replace('-', "_");
        assert!(
            main.contains(&format!("    {field}: ")),
            "twill-policy has no flag {a} (no field {field} in policy/src/main.rs)"
        );
    }
    let run = args.iter().position(|a| a == "run").expect("run");
    assert!(
        args[..run].contains(&"--subnet-file=/run/flannel/subnet.env".to_string()),
        "{args:?}"
    );
    let health = args[run..]
        .iter()
        .find_map(|a| a.strip_prefix("--health-addr="))
        .expect("--health-addr");
    assert_eq!(health, "127.0.0.1:9754");
    health.to_string()
}

#[test]
fn twill_policy_reads_the_subnet_file_and_is_probed() {
    let docs = documents();
    let pod = &find(&docs, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true, "probes on host 127.0.0.1 need it");
    let c = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "twill-policy")
        .expect("twill-policy container");
    let health = check_policy_args(&words_of(&c["args"]));
    let (host, port) = health.split_once(':').unwrap();
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["host"], host, "{probe}");
        assert_eq!(get["port"].to_string(), port, "{probe}");
    }
    // /run/flannel from the host (where twilld writes subnet.env), read-only.
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/run/flannel")
        .expect("/run/flannel mounted in twill-policy");
    assert_eq!(mount["readOnly"], true);
    let vol = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(vol["hostPath"]["path"], "/run/flannel");
    let twilld = &pod["containers"][0];
    assert!(twilld["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == mount["name"] && m["mountPath"] == "/run/flannel"));
}

/// The container of the DaemonSet named `name`.
fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn events_are_the_only_rbac_rule_beyond_flannels_and_policys() {
    let docs = documents();
    let role = find(&docs, "ClusterRole");
    let events: Vec<&Value> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == "events")
        })
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["apiGroups"], serde_json::json!(["events.k8s.io"]));
    assert_eq!(events[0]["resources"], serde_json::json!(["events"]));
    assert_eq!(events[0]["verbs"], serde_json::json!(["create", "patch"]));
}

#[test]
fn twill_policy_metrics_port_is_declared_and_served() {
    let docs = documents();
    let pod = &find(&docs, "DaemonSet")["spec"]["template"]["spec"];
    let c = container(pod, "twill-policy");
    let ports = c["ports"].as_array().expect("twill-policy declares ports");
    let metrics = ports
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a port named metrics");
    assert_eq!(metrics["containerPort"], 9753);
    assert_eq!(metrics["protocol"], "TCP");
    // The port the program listens on is the one declared (on every address: hostNetwork,
    // so Prometheus scrapes the node's IP).
    let args = words_of(&c["args"]);
    let addr = args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-addr="))
        .expect("--metrics-addr");
    let addr: std::net::SocketAddr = addr.parse().expect("--metrics-addr is an address");
    assert_eq!(addr.port(), 9753);
    assert!(addr.ip().is_unspecified(), "{addr}");
}

#[test]
fn both_daemons_share_the_status_socket_directory() {
    let docs = documents();
    let pod = &find(&docs, "DaemonSet")["spec"]["template"]["spec"];
    let dir = std::path::Path::new(twill_runtime::status::TWILLD_SOCKET)
        .parent()
        .unwrap();
    assert_eq!(
        Some(dir),
        std::path::Path::new(twill_runtime::status::POLICY_SOCKET).parent(),
        "both sockets in one directory"
    );
    let vol = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["hostPath"]["path"] == dir.to_str().unwrap())
        .unwrap_or_else(|| panic!("no hostPath volume for {}", dir.display()));
    assert_eq!(vol["hostPath"]["type"], "DirectoryOrCreate");
    for name in ["kube-flannel", "twill-policy"] {
        let mounted = container(pod, name)["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| {
                m["name"] == vol["name"]
                    && m["mountPath"] == dir.to_str().unwrap()
                    && m["readOnly"] != true
            });
        assert!(mounted, "{name} must mount {} writable", dir.display());
    }
}

#[test]
fn twill_policy_knows_its_pod_for_events() {
    let docs = documents();
    let pod = &find(&docs, "DaemonSet")["spec"]["template"]["spec"];
    let env = container(pod, "twill-policy")["env"].as_array().unwrap();
    for (var, field) in [
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAME", "metadata.name"),
    ] {
        let e = env
            .iter()
            .find(|e| e["name"] == var)
            .unwrap_or_else(|| panic!("twill-policy has no {var}"));
        assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], field, "{var}");
    }
}
