//! The built `twill-cni` with the real reference plugins (`/usr/lib/cni`: bridge, host-local),
//! run inside network namespaces this test creates (`twcni<pid>...`), never in the root
//! namespace. Needs root: skipped with a message otherwise, unless CI=true, where it fails.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_twill-cni");
const CNI_PATH: &str = "/usr/lib/cni";

fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        if !Path::new(CNI_PATH).join("bridge").exists() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "{CNI_PATH}/bridge missing"
            );
            eprintln!("SKIP {test}: {CNI_PATH}/bridge not installed (containernetworking-plugins)");
            return false;
        }
        return true;
    }
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "{test} needs root (CI=true)"
    );
    eprintln!("SKIP {test}: needs root to create network namespaces");
    false
}

fn sh(args: &[&str]) -> (bool, String) {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// A named network namespace, deleted on drop (also when the test panics).
struct Ns(String);

impl Ns {
    fn new(name: String) -> Ns {
        let _ = sh(&["ip", "netns", "del", &name]);
        let (ok, out) = sh(&["ip", "netns", "add", &name]);
        assert!(ok, "ip netns add {name}: {out}");
        Ns(name)
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
    /// Links in the namespace other than lo.
    fn links(&self) -> Vec<String> {
        let (ok, out) = sh(&["ip", "-n", &self.0, "-o", "link", "show"]);
        assert!(ok, "{out}");
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_string())
            .filter(|n| n != "lo")
            .collect()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.0]);
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("twcni{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct Node {
    dir: TempDir,
    ns: Ns,
}

impl Node {
    fn new(tag: &str, subnet_env: &str) -> Node {
        let dir = TempDir::new(tag);
        fs::write(dir.0.join("subnet.env"), subnet_env).unwrap();
        let ns = Ns::new(format!("twcni{}{tag}", std::process::id()));
        Node { dir, ns }
    }

    fn data(&self) -> PathBuf {
        self.dir.0.join("data")
    }
    fn ipam(&self) -> PathBuf {
        self.dir.0.join("ipam")
    }

    /// Flannel's default conflist plugin entry as the runtime passes it (name and cniVersion
    /// injected), with every per-node path (subnet.env, data dirs) under the test's directory.
    fn conf(&self, delegate: &str) -> String {
        format!(
            r#"{{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","delegate":{delegate},"subnetFile":"{}","dataDir":"{}","ipam":{{"dataDir":"{}"}}}}"#,
            self.dir.0.join("subnet.env").display(),
            self.data().display(),
            self.ipam().display()
        )
    }

    /// Starts twill-cni in this node with `conf` on its stdin and `cni_args` as CNI_ARGS;
    /// `output` is where its stdout and stderr go.
    #[allow(clippy::too_many_arguments)]
    fn spawn_cni(
        &self,
        cmd: &str,
        cid: &str,
        ifname: &str,
        netns: &str,
        conf: &str,
        cni_args: &str,
        output: fn() -> Stdio,
    ) -> std::process::Child {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns.0, BIN])
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", cid)
            .env("CNI_IFNAME", ifname)
            .env("CNI_NETNS", netns)
            .env("CNI_PATH", CNI_PATH)
            .env("CNI_ARGS", cni_args)
            .stdin(Stdio::piped())
            .stdout(output())
            .stderr(output())
            // A process group of its own: the delegates it starts stay in it, so a test that
            // kills the plugin can wait for them (see `wait_group_gone`).
            .process_group(0)
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.as_bytes())
            .unwrap();
        child
    }

    fn cni(&self, cmd: &str, cid: &str, ifname: &str, netns: &str, conf: &str) -> (i32, Value) {
        self.cni_for_pod(cmd, cid, ifname, netns, conf, "")
    }

    /// As [`Node::cni`], with `cni_args` as CNI_ARGS (the kubelet's pod namespace and name).
    fn cni_for_pod(
        &self,
        cmd: &str,
        cid: &str,
        ifname: &str,
        netns: &str,
        conf: &str,
        cni_args: &str,
    ) -> (i32, Value) {
        let child = self.spawn_cni(cmd, cid, ifname, netns, conf, cni_args, Stdio::piped);
        let o = child.wait_with_output().unwrap();
        let code = o.status.code().unwrap_or(-1);
        let stdout = String::from_utf8_lossy(&o.stdout);
        let v = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout).unwrap_or_else(|e| {
                panic!(
                    "{cmd} {cid}: {e}: {stdout:?} stderr {}",
                    String::from_utf8_lossy(&o.stderr)
                )
            })
        };
        if code != 0 {
            eprintln!(
                "{cmd} {cid} exit {code}: {stdout} stderr: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        (code, v)
    }

    /// host-local reservations left (files named by address).
    fn reservations(&self) -> Vec<String> {
        match fs::read_dir(self.ipam().join("cbr0")) {
            Err(_) => Vec::new(),
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                .collect(),
        }
    }

    fn veths(&self) -> Vec<String> {
        let (ok, out) = sh(&["ip", "-n", &self.ns.0, "-o", "link", "show", "type", "veth"]);
        assert!(ok, "{out}");
        out.lines().map(String::from).collect()
    }

    /// Waits (up to 30 s) until `n` veths are left on the node and returns them. `ip netns del`
    /// returns before the kernel has torn the namespace down (that runs later, on a work
    /// queue), so a pod's host-side veth can outlive its namespace by a moment; GC must not
    /// run in that moment if the test expects the veth's elements to go.
    fn wait_for_veths(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let veths = self.veths();
            if veths.len() == n || Instant::now() > deadline {
                return veths;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// subnet.env of a node holding 10.244.1.0/24 (gateway 10.244.1.1) in 10.244.0.0/16.
const SUBNET_ENV_1: &str =
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

const DEFAULT_DELEGATE: &str = r#"{"hairpinMode":true,"isDefaultGateway":true}"#;

fn result_addr(v: &Value) -> Ipv4Net {
    v["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address in {v}"))
        .parse()
        .unwrap()
}

#[test]
fn add_then_double_del_with_reference_plugins() {
    if !root_or_skip("add_then_double_del_with_reference_plugins") {
        return;
    }
    let node = Node::new("a", SUBNET_ENV_1);
    let pod = Ns::new(format!("twcni{}pa", std::process::id()));
    let conf = node.conf(DEFAULT_DELEGATE);

    let (code, res) = node.cni("ADD", "pod-a", "eth0", &pod.path(), &conf);
    assert_eq!(code, 0, "{res}");
    let addr = result_addr(&res);
    let subnet: Ipv4Net = "10.244.1.0/24".parse().unwrap();
    assert!(subnet.contains(&addr.addr()), "{addr}");
    assert_ne!(
        addr.addr(),
        Ipv4Addr::new(10, 244, 1, 1),
        "gateway reserved"
    );
    assert_eq!(res["ips"][0]["gateway"], "10.244.1.1");
    let (_, pod_addrs) = sh(&[
        "ip", "-n", &pod.0, "-4", "-o", "addr", "show", "dev", "eth0",
    ]);
    assert!(pod_addrs.contains(&addr.to_string()), "{pod_addrs}");
    let (_, mtu) = sh(&["ip", "-n", &pod.0, "-o", "link", "show", "dev", "eth0"]);
    assert!(mtu.contains("mtu 1450"), "{mtu}");
    let (_, routes) = sh(&["ip", "-n", &pod.0, "-4", "route"]);
    assert!(routes.contains("10.244.0.0/16 via 10.244.1.1"), "{routes}");
    assert!(routes.contains("default via 10.244.1.1"), "{routes}");
    assert!(node.data().join("pod-a").exists());
    assert_eq!(node.reservations(), vec![addr.addr().to_string()]);
    assert_eq!(node.veths().len(), 1);

    for _ in 0..2 {
        let (code, res) = node.cni("DEL", "pod-a", "eth0", &pod.path(), &conf);
        assert_eq!(code, 0, "{res}");
        assert_eq!(res, Value::Null);
    }
    assert!(!node.data().join("pod-a").exists());
    assert!(node.reservations().is_empty(), "{:?}", node.reservations());
    assert!(node.veths().is_empty(), "{:?}", node.veths());
    assert!(pod.links().is_empty(), "{:?}", pod.links());
}

#[test]
fn concurrent_adds_get_distinct_addresses() {
    if !root_or_skip("concurrent_adds_get_distinct_addresses") {
        return;
    }
    const N: usize = 200;
    let node = Node::new(
        "c",
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.4.1/22\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    );
    let pods: Vec<Ns> = (0..N)
        .map(|i| Ns::new(format!("twcni{}c{i}", std::process::id())))
        .collect();
    let conf = node.conf(DEFAULT_DELEGATE);
    let subnet: Ipv4Net = "10.244.4.0/22".parse().unwrap();

    let results: Vec<(i32, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (node, conf) = (&node, &conf);
                s.spawn(move || node.cni("ADD", &format!("ctr{i}"), "eth0", &p.path(), conf))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut addrs = HashSet::new();
    for (i, (code, res)) in results.iter().enumerate() {
        assert_eq!(*code, 0, "ADD ctr{i}: {res}");
        let a = result_addr(res).addr();
        assert!(subnet.contains(&a), "{a}");
        addrs.insert(a);
    }
    assert_eq!(addrs.len(), N, "addresses are distinct");
    assert_eq!(node.reservations().len(), N);
    assert_eq!(node.veths().len(), N);

    std::thread::scope(|s| {
        for (i, p) in pods.iter().enumerate() {
            let (node, conf) = (&node, &conf);
            s.spawn(move || {
                let (code, res) = node.cni("DEL", &format!("ctr{i}"), "eth0", &p.path(), conf);
                assert_eq!(code, 0, "DEL ctr{i}: {res}");
            });
        }
    });
    assert!(node.reservations().is_empty(), "{:?}", node.reservations());
    assert!(node.veths().is_empty());
    assert_eq!(fs::read_dir(node.data()).unwrap().count(), 0);
}

#[test]
fn bad_inputs_create_nothing() {
    if !root_or_skip("bad_inputs_create_nothing") {
        return;
    }
    let node = Node::new(
        "b",
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.2.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    );
    let pod = Ns::new(format!("twcni{}pb", std::process::id()));
    let good = node.conf(DEFAULT_DELEGATE);
    let pp = pod.path();
    let cases: Vec<(&str, &str, String, String, u64)> = vec![
        ("../../etc/passwd", "eth0", pp.clone(), good.clone(), 4),
        ("ok", "eth0/../x", pp.clone(), good.clone(), 4),
        ("ok", "this-is-too-long0", pp.clone(), good.clone(), 4),
        ("ok", "eth0", "/tmp".into(), good.clone(), 4),
        (
            "ok",
            "eth0",
            "/run/netns/twcni-does-not-exist".into(),
            good.clone(),
            4,
        ),
        (
            "ok",
            "eth0",
            pp.clone(),
            node.conf(r#"{"type":"../../../bin/true"}"#),
            7,
        ),
        ("ok", "eth0", pp.clone(), node.conf(r#"{"name":"x"}"#), 2),
        ("ok", "eth0", pp.clone(), node.conf(r#"{"ipam":{}}"#), 2),
        ("ok", "eth0", pp.clone(), good.replace("0.3.1", "0.1.0"), 1),
    ];
    for (cid, ifname, netns, conf, want) in cases {
        let (code, res) = node.cni("ADD", cid, ifname, &netns, &conf);
        assert_eq!(code, 1, "{cid} {ifname} {netns}: {res}");
        assert_eq!(res["code"], want, "{cid} {ifname} {netns}: {res}");
        assert!(!node.data().exists());
        assert!(!node.ipam().exists());
        assert!(node.ns.links().is_empty(), "{:?}", node.ns.links());
        assert!(pod.links().is_empty(), "{:?}", pod.links());
    }
}

#[test]
fn dual_stack_add_check_del_with_reference_plugins() {
    if !root_or_skip("dual_stack_add_check_del_with_reference_plugins") {
        return;
    }
    let node = Node::new(
        "d",
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_IPV6_NETWORK=2001:db8:42::/56\nFLANNEL_IPV6_SUBNET=2001:db8:42:3::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    );
    let pod = Ns::new(format!("twcni{}pd", std::process::id()));
    let conf = node
        .conf(DEFAULT_DELEGATE)
        .replace(r#""cniVersion":"0.3.1""#, r#""cniVersion":"1.0.0""#);

    let (code, res) = node.cni("ADD", "pod-d", "eth0", &pod.path(), &conf);
    assert_eq!(code, 0, "{res}");
    assert_eq!(res["cniVersion"], "1.0.0");
    let ips: Vec<&str> = res["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap())
        .collect();
    assert_eq!(ips.len(), 2, "{res}");
    assert!(ips[0].starts_with("10.244.3."), "{ips:?}");
    assert!(ips[1].starts_with("2001:db8:42:3::"), "{ips:?}");
    let (_, routes6) = sh(&["ip", "-n", &pod.0, "-6", "route"]);
    assert!(
        routes6.contains("2001:db8:42::/56 via 2001:db8:42:3::1"),
        "{routes6}"
    );

    // CHECK replays the saved config with the runtime's prevResult to the real bridge.
    let mut with_prev: Value = serde_json::from_str(&conf).unwrap();
    with_prev["prevResult"] = res.clone();
    let with_prev = with_prev.to_string();
    let (code, out) = node.cni("CHECK", "pod-d", "eth0", &pod.path(), &with_prev);
    assert_eq!(code, 0, "{out}");

    for _ in 0..2 {
        let (code, out) = node.cni("DEL", "pod-d", "eth0", &pod.path(), &conf);
        assert_eq!(code, 0, "{out}");
    }
    let (code, out) = node.cni("CHECK", "pod-d", "eth0", &pod.path(), &with_prev);
    assert_eq!(code, 1);
    assert_eq!(out["code"], 3, "{out}");
    assert!(node.reservations().is_empty(), "{:?}", node.reservations());
    assert!(node.veths().is_empty());
}

fn sysctl(ns: &str, key: &str) -> String {
    let (ok, out) = sh(&["ip", "netns", "exec", ns, "sysctl", "-n", key]);
    assert!(ok, "sysctl {key}: {out}");
    out.trim().to_string()
}

/// CVE-2020-10749: router advertisements from pods never configure the host. The node's
/// namespace starts with accept_ra=1 (the kernel default), so the zeros below are twill-cni's.
#[test]
fn host_side_bridge_and_veth_refuse_router_advertisements() {
    if !root_or_skip("host_side_bridge_and_veth_refuse_router_advertisements") {
        return;
    }
    let node = Node::new(
        "ra",
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    );
    assert_eq!(sysctl(&node.ns.0, "net.ipv6.conf.default.accept_ra"), "1");
    let pod = Ns::new(format!("twcni{}pra", std::process::id()));
    let conf = node.conf(DEFAULT_DELEGATE);
    let (code, res) = node.cni("ADD", "pod-ra", "eth0", &pod.path(), &conf);
    assert_eq!(code, 0, "{res}");
    let host: Vec<&str> = res["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i.get("sandbox").is_none_or(|s| s == ""))
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert!(host.contains(&"cni0") && host.len() == 2, "{res}");
    for ifname in host {
        assert_eq!(
            sysctl(&node.ns.0, &format!("net.ipv6.conf.{ifname}.accept_ra")),
            "0",
            "{ifname}"
        );
    }
    let (code, _) = node.cni("DEL", "pod-ra", "eth0", &pod.path(), &conf);
    assert_eq!(code, 0);
}

/// A tiny xorshift, seeded from the clock and printed, so a failing run can be replayed with
/// TWILL_SEED.
fn rng() -> impl FnMut() -> u64 {
    let mut x: u64 = std::env::var("TWILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("TWILL_SEED={x}");
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Runs twill-cni in the node and SIGKILLs it after `delay` (it may finish first).
/// Then waits until the delegates it had started (bridge, host-local) have finished too: a
/// runtime that kills the plugin does not kill those, and they go on changing the node.
fn cni_killed(node: &Node, cmd: &str, cid: &str, netns: &str, conf: &str, delay: Duration) {
    let mut child = node.spawn_cni(cmd, cid, "eth0", netns, conf, "", Stdio::null);
    std::thread::sleep(delay);
    let _ = child.kill();
    let _ = child.wait();
    wait_group_gone(child.id());
}

/// Waits (up to 30 s) until no live process is left in process group `pgid`.
fn wait_group_gone(pgid: u32) {
    let in_group = || -> Vec<String> {
        let Ok(dir) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| {
            let stat = fs::read_to_string(e.ok()?.path().join("stat")).ok()?;
            // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after the last ')'.
            let (head, rest) = stat.rsplit_once(')')?;
            let mut fields = rest.split_whitespace();
            let state = fields.next()?;
            let pgrp: u32 = fields.nth(1)?.parse().ok()?;
            (pgrp == pgid && state != "Z").then(|| head.to_string() + ")")
        })
        .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = in_group();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "delegates of a killed plugin still running after 30 s: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The CNI plugin SIGKILLed at random points of ADD and of DEL (the runtime then drops the
/// pod's namespace, as it does after a failed ADD): once GC has run with the attachments that
/// are still valid, no address, scratch file or host-side veth of a dead pod is left, and the
/// valid pod keeps its address.
#[test]
fn cni_killed_mid_add_and_mid_del_leaks_nothing_after_gc() {
    if !root_or_skip("cni_killed_mid_add_and_mid_del_leaks_nothing_after_gc") {
        return;
    }
    const ROUNDS: usize = 40;
    let node = Node::new(
        "k",
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.6.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    );
    let conf = node.conf(DEFAULT_DELEGATE);
    let keeper = Ns::new(format!("twcni{}kk", std::process::id()));
    let (code, res) = node.cni("ADD", "keeper", "eth0", &keeper.path(), &conf);
    assert_eq!(code, 0, "{res}");
    let kept = result_addr(&res).addr().to_string();
    let mut next = rng();
    for i in 0..ROUNDS {
        let pod = Ns::new(format!("twcni{}k{i}", std::process::id()));
        let cid = format!("killed-{i}");
        if i % 2 == 0 {
            // Killed somewhere in ADD (0-40 ms covers validation, scratch save, the delegate).
            let d = Duration::from_micros(next() % 40_000);
            cni_killed(&node, "ADD", &cid, &pod.path(), &conf, d);
        } else {
            let (code, res) = node.cni("ADD", &cid, "eth0", &pod.path(), &conf);
            assert_eq!(code, 0, "{res}");
            let d = Duration::from_micros(next() % 20_000);
            cni_killed(&node, "DEL", &cid, &pod.path(), &conf, d);
        }
        drop(pod);
    }
    let left = node.wait_for_veths(1);
    assert_eq!(left.len(), 1, "veths of deleted pods never went: {left:?}");
    let gc_conf = conf.replacen("\"0.3.1\"", "\"1.1.0\"", 1).replacen(
        "\"type\":\"flannel\"",
        r#""type":"flannel","cni.dev/valid-attachments":[{"containerID":"keeper","ifname":"eth0"}]"#,
        1,
    );
    let (code, res) = node.cni("GC", "", "", "", &gc_conf);
    assert_eq!(code, 0, "{res}");
    assert_eq!(node.reservations(), vec![kept], "addresses left after GC");
    let scratch: Vec<String> = fs::read_dir(node.data())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(scratch, vec!["keeper".to_string()]);
    assert_eq!(node.veths().len(), 1, "{:?}", node.veths());
    let (code, _) = node.cni("DEL", "keeper", "eth0", &keeper.path(), &conf);
    assert_eq!(code, 0);
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = fs::File::open(&path).unwrap();
        nix::sched::setns(
            std::os::fd::AsFd::as_fd(&file),
            nix::sched::CloneFlags::CLONE_NEWNET,
        )
        .unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// Whether a datagram sent from `from_ns` (bound to `src`) reaches `to:7777` in `to_ns`.
fn udp_arrives(
    from_ns: &str,
    src: Ipv4Addr,
    to_ns: &str,
    to: Ipv4Addr,
    token: &'static [u8],
) -> bool {
    let sock = in_ns(to_ns, || {
        std::net::UdpSocket::bind(("0.0.0.0", 7777)).unwrap()
    });
    sock.set_read_timeout(Some(Duration::from_millis(1000)))
        .unwrap();
    in_ns(from_ns, move || {
        let s = std::net::UdpSocket::bind((src, 0)).unwrap();
        for _ in 0..3 {
            let _ = s.send_to(token, (to, 7777));
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut buf = [0u8; 64];
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        if &buf[..n] == token {
            return true;
        }
    }
    false
}

/// Per-pod anti-spoofing (table `bridge twill-antispoof`): a pod that takes a neighbour pod's
/// address on the same bridge cannot send with it; its own address works; without the table
/// the spoofed packet arrives. DEL (with prevResult) removes the pod's elements.
#[test]
fn pod_cannot_send_with_a_neighbour_pods_address() {
    if !root_or_skip("pod_cannot_send_with_a_neighbour_pods_address") {
        return;
    }
    let node = Node::new(
        "as",
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    );
    let conf = node.conf(DEFAULT_DELEGATE);
    let pods: Vec<Ns> = ["a", "b", "c"]
        .iter()
        .map(|p| Ns::new(format!("twcni{}as{p}", std::process::id())))
        .collect();
    let mut addrs = Vec::new();
    let mut results = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        let (code, res) = node.cni("ADD", &format!("as-{i}"), "eth0", &p.path(), &conf);
        assert_eq!(code, 0, "{res}");
        addrs.push(result_addr(&res).addr());
        results.push(res);
    }
    let (a, c) = (&pods[0].0, &pods[2].0);
    // a takes b's address as a second address.
    let (ok, out) = sh(&[
        "ip",
        "-n",
        a,
        "addr",
        "add",
        &format!("{}/32", addrs[1]),
        "dev",
        "eth0",
    ]);
    assert!(ok, "{out}");
    assert!(
        udp_arrives(a, addrs[0], c, addrs[2], b"own"),
        "own address must work"
    );
    assert!(
        !udp_arrives(a, addrs[1], c, addrs[2], b"spoof"),
        "spoofed source arrived"
    );
    let (ok, table) = sh(&[
        "ip",
        "netns",
        "exec",
        &node.ns.0,
        "nft",
        "list",
        "table",
        "bridge",
        "twill-antispoof",
    ]);
    assert!(ok && table.contains("IPv4 source spoofing"), "{table}");

    // DEL with prevResult forgets that pod's elements (and only those).
    let with_prev = conf.replacen(
        "\"type\":\"flannel\"",
        &format!("\"type\":\"flannel\",\"prevResult\":{}", results[2]),
        1,
    );
    let (code, _) = node.cni("DEL", "as-2", "eth0", &pods[2].path(), &with_prev);
    assert_eq!(code, 0);
    let (_, table) = sh(&[
        "ip",
        "netns",
        "exec",
        &node.ns.0,
        "nft",
        "list",
        "set",
        "bridge",
        "twill-antispoof",
        "src4",
    ]);
    assert!(
        !table.contains(&addrs[2].to_string()) && table.contains(&addrs[0].to_string()),
        "{table}"
    );

    // b vanishes without a DEL (its namespace, and so its veth, just gone): GC prunes its
    // elements and keeps a's.
    let (ok, out) = sh(&["ip", "netns", "del", &pods[1].0]);
    assert!(ok, "{out}");
    let left = node.wait_for_veths(1);
    assert_eq!(left.len(), 1, "b's veth never went: {left:?}");
    let gc_conf = conf.replacen("\"0.3.1\"", "\"1.1.0\"", 1).replacen(
        "\"type\":\"flannel\"",
        r#""type":"flannel","cni.dev/valid-attachments":[{"containerID":"as-0","ifname":"eth0"}]"#,
        1,
    );
    let (code, res) = node.cni("GC", "", "", "", &gc_conf);
    assert_eq!(code, 0, "{res}");
    let (_, table) = sh(&[
        "ip",
        "netns",
        "exec",
        &node.ns.0,
        "nft",
        "list",
        "set",
        "bridge",
        "twill-antispoof",
        "src4",
    ]);
    assert!(
        !table.contains(&format!("{} ", addrs[1])) && table.contains(&addrs[0].to_string()),
        "{table}"
    );

    // Without the table (Flannel's node): the spoofed packet reaches b's neighbour.
    let (ok, out) = sh(&[
        "ip",
        "netns",
        "exec",
        &node.ns.0,
        "nft",
        "delete",
        "table",
        "bridge",
        "twill-antispoof",
    ]);
    assert!(ok, "{out}");
    let (code, res) = node.cni("ADD", "as-3", "eth0", &pods[2].path(), &conf);
    assert_eq!(code, 0, "{res}");
    let c_addr = result_addr(&res).addr();
    let (ok, out) = sh(&[
        "ip",
        "netns",
        "exec",
        &node.ns.0,
        "nft",
        "delete",
        "table",
        "bridge",
        "twill-antispoof",
    ]);
    assert!(ok, "{out}");
    assert!(
        udp_arrives(a, addrs[1], c, c_addr, b"flannel"),
        "without the table it should arrive"
    );
    node.cni("DEL", "as-0", "eth0", &pods[0].path(), &conf);
    node.cni("DEL", "as-3", "eth0", &pods[2].path(), &conf);
}

/// `conf` with the plugin's logging keys added (`logFile` and, when given, `logFormat`).
fn with_log(conf: &str, file: &Path, format: Option<&str>) -> String {
    let mut v: Value = serde_json::from_str(conf).unwrap();
    v["logFile"] = file.display().to_string().into();
    if let Some(f) = format {
        v["logFormat"] = f.into();
    }
    v.to_string()
}

/// Every line of the JSON log, parsed.
fn json_log(path: &Path) -> Vec<serde_json::Map<String, Value>> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| match serde_json::from_str(l) {
            Ok(Value::Object(m)) => m,
            other => panic!("log line {l:?} is no JSON object: {other:?}"),
        })
        .collect()
}

#[test]
fn log_file_has_one_json_line_per_command_with_reference_plugins() {
    if !root_or_skip("log_file_has_one_json_line_per_command_with_reference_plugins") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let node = Node::new("lj", SUBNET_ENV_1);
    let pod = Ns::new(format!("twcni{}plj", std::process::id()));
    let log = node.dir.0.join("cni.log");
    let conf = with_log(&node.conf(DEFAULT_DELEGATE), &log, Some("json"));
    let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=c-log";

    let (code, res) = node.cni_for_pod("ADD", "c-log", "eth0", &pod.path(), &conf, args);
    assert_eq!(code, 0, "{res}");
    let addr = result_addr(&res);
    let (code, res) = node.cni_for_pod("CHECK", "c-unknown", "eth0", &pod.path(), &conf, "");
    assert_ne!(code, 0, "CHECK of an unknown container must fail: {res}");
    let check_error = res["msg"].as_str().unwrap().to_string();
    let (code, res) = node.cni_for_pod("DEL", "c-log", "eth0", &pod.path(), &conf, args);
    assert_eq!(code, 0, "{res}");

    let mode = fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the log is root's only");
    // One line per command (warnings, e.g. of the anti-spoofing fast path, may come between).
    let lines: Vec<_> = json_log(&log)
        .into_iter()
        .filter(|l| l.contains_key("command"))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for l in &lines {
        for key in [
            "timestamp",
            "level",
            "target",
            "message",
            "command",
            "duration_ms",
        ] {
            assert!(l.contains_key(key), "{key} missing in {l:?}");
        }
        assert!(l["duration_ms"].as_f64().unwrap() > 0.0, "{l:?}");
    }
    let (add, check, del) = (&lines[0], &lines[1], &lines[2]);
    assert_eq!(add["level"], "INFO");
    assert_eq!(add["command"], "ADD");
    assert_eq!(add["message"], "CNI ADD done");
    assert_eq!(add["container_id"], "c-log");
    assert_eq!(add["netns"], pod.path().as_str());
    assert_eq!(add["ifname"], "eth0");
    assert_eq!(add["pod"], "shop/web-1");
    assert_eq!(add["addresses"], addr.to_string().as_str());
    assert!(!add.contains_key("error"), "{add:?}");

    assert_eq!(check["level"], "ERROR");
    assert_eq!(check["command"], "CHECK");
    assert_eq!(check["container_id"], "c-unknown");
    assert!(!check.contains_key("pod"), "no CNI_ARGS, no pod: {check:?}");
    assert!(
        check["error"].as_str().unwrap().contains(&check_error),
        "{check:?} vs {check_error}"
    );
    assert!(check["code"].as_u64().is_some(), "{check:?}");

    assert_eq!(del["command"], "DEL");
    assert_eq!(del["pod"], "shop/web-1");
    assert!(!del.contains_key("addresses"), "{del:?}");
    assert!(node.reservations().is_empty());
}

#[test]
fn an_unwritable_or_misconfigured_log_never_changes_the_command() {
    if !root_or_skip("an_unwritable_or_misconfigured_log_never_changes_the_command") {
        return;
    }
    let node = Node::new("lx", SUBNET_ENV_1);
    let pod = Ns::new(format!("twcni{}plx", std::process::id()));
    // A directory that does not exist: the log cannot be opened.
    let unopenable = node.dir.0.join("missing").join("cni.log");
    let conf = with_log(&node.conf(DEFAULT_DELEGATE), &unopenable, Some("json"));
    let (code, res) = node.cni("ADD", "c-nolog", "eth0", &pod.path(), &conf);
    assert_eq!(code, 0, "{res}");
    let addr = result_addr(&res);
    assert_eq!(res["ips"].as_array().unwrap().len(), 1, "{res}");
    assert_eq!(node.reservations(), vec![addr.addr().to_string()]);
    let (code, res) = node.cni("DEL", "c-nolog", "eth0", &pod.path(), &conf);
    assert_eq!((code, res), (0, Value::Null));
    assert!(!unopenable.exists() && !unopenable.parent().unwrap().exists());

    // An unknown logFormat: the command works, the log is text and says why.
    let log = node.dir.0.join("text.log");
    let conf = with_log(&node.conf(DEFAULT_DELEGATE), &log, Some("xml"));
    let (code, res) = node.cni("ADD", "c-text", "eth0", &pod.path(), &conf);
    assert_eq!(code, 0, "{res}");
    let addr = result_addr(&res);
    let (code, _) = node.cni("DEL", "c-text", "eth0", &pod.path(), &conf);
    assert_eq!(code, 0);
    let text = fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains(r#"logFormat: unknown log format "xml""#),
        "{text}"
    );
    assert!(
        lines[1].contains("CNI ADD done") && lines[1].contains(&addr.to_string()),
        "{text}"
    );
    assert!(lines[1].contains("container_id=\"c-text\""), "{text}");
    assert!(lines[3].contains("CNI DEL done"), "{text}");
    assert!(
        lines
            .iter()
            .all(|l| serde_json::from_str::<Value>(l).is_err()),
        "{text}"
    );
}
