//! Integration tests of the lab itself. They need root (network namespaces); without root they
//! are skipped, unless CI=true, where they fail.

use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use twill_lab::{list_netns, require_root, state_path, Ipv4Net, Lab, Signal};

macro_rules! need_root {
    () => {
        if !require_root() {
            return;
        }
    };
}

fn leftover_ns(prefix: &str) -> Vec<String> {
    list_netns()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn assert_gone(prefix: &str, dir: &Path) {
    assert_eq!(leftover_ns(prefix), Vec::<String>::new(), "namespaces left");
    assert!(!dir.exists(), "{} left", dir.display());
}

/// Tears the lab down, checking that teardown reports no error and leaves nothing behind.
fn finish(lab: Lab) {
    let prefix = lab.prefix().to_string();
    let dir = lab.dir().to_path_buf();
    lab.teardown().expect("clean teardown");
    assert_gone(&prefix, &dir);
}

/// Takes a persisted lab down when dropped, so a failing test leaves nothing behind.
struct DownOnDrop(String);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        if let Ok(lab) = Lab::load(&self.0) {
            let _ = lab.teardown();
        }
    }
}

fn ip(a: std::net::Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

#[test]
fn two_nodes_ping_over_the_switch() {
    need_root!();
    let mut lab = Lab::new("ping").unwrap();
    let n1 = lab.add_node("n1").unwrap();
    let n2 = lab.add_node("n2").unwrap();
    assert_eq!(n1.addr.to_string(), "198.18.0.11");
    assert_eq!(n2.addr.to_string(), "198.18.0.12");
    assert!(n1.netns.starts_with(lab.prefix()) && n1.netns.len() <= 20);
    assert!(lab.ping("n1", ip(n2.addr), 2, Duration::from_secs(5)));
    assert!(lab.ping("n2", ip(n1.addr), 1, Duration::from_secs(5)));
    // The switch answers too (the nodes' default gateway).
    assert!(lab.ping(
        "n1",
        "198.18.0.1".parse().unwrap(),
        1,
        Duration::from_secs(5)
    ));
    // Nothing answers outside the lab; nothing leaves it either (the switch has no uplink).
    assert!(!lab.ping(
        "n1",
        "198.18.0.99".parse().unwrap(),
        1,
        Duration::from_secs(1)
    ));
    // Default route and forwarding as promised.
    let routes = lab
        .exec_ok("n1", &["ip", "route", "show", "default"])
        .unwrap();
    assert!(routes.contains("via 198.18.0.1 dev eth0"), "{routes}");
    let fwd = lab
        .exec_ok("n1", &["sysctl", "-n", "net.ipv4.ip_forward"])
        .unwrap();
    assert_eq!(fwd.trim(), "1");
    assert!(n1.dir.is_dir());
    // Refuses namespaces that are not the lab's.
    assert!(lab.exec("somewhere-else", &["true"]).is_err());
    assert!(lab.add_node("n1").is_err(), "duplicate node name");
    finish(lab);
}

#[test]
fn etcd_put_get_and_restart() {
    need_root!();
    let mut lab = Lab::new("etcd").unwrap();
    let ep = lab.start_etcd().unwrap();
    assert_eq!(ep, "http://198.18.0.1:2379");
    lab.etcdctl(&[
        "put",
        "/coreos.com/network/config",
        r#"{"Network":"10.244.0.0/16"}"#,
    ])
    .unwrap();
    let got = lab
        .etcdctl(&["get", "--print-value-only", "/coreos.com/network/config"])
        .unwrap();
    assert_eq!(got.trim(), r#"{"Network":"10.244.0.0/16"}"#);
    // Reachable from a node over the underlay.
    lab.add_node("n1").unwrap();
    let out = lab
        .exec_ok(
            "n1",
            &[
                "etcdctl",
                "--endpoints",
                &ep,
                "get",
                "--print-value-only",
                "/coreos.com/network/config",
            ],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(out.contains("10.244.0.0/16"), "{out}");
    // Restart keeps the data; while stopped, etcdctl fails.
    lab.stop_etcd().unwrap();
    assert!(lab.etcdctl(&["get", "x"]).is_err());
    lab.restart_etcd().unwrap();
    let got = lab
        .etcdctl(&["get", "--print-value-only", "/coreos.com/network/config"])
        .unwrap();
    assert!(got.contains("10.244.0.0/16"));
    assert!(lab.log(lab.etcd_proc().unwrap()).contains("sw"));
    finish(lab);
}

#[test]
fn manual_pods_on_two_nodes_ping_with_hand_made_routes() {
    need_root!();
    let mut lab = Lab::new("pods").unwrap();
    lab.add_node("a").unwrap();
    lab.add_node("b").unwrap();
    let p1 = lab
        .add_manual_pod("a", "p1", "10.244.1.2/24".parse::<Ipv4Net>().unwrap())
        .unwrap();
    let p2 = lab
        .add_manual_pod("b", "p2", "10.244.2.2/24".parse().unwrap())
        .unwrap();
    let p3 = lab
        .add_manual_pod("a", "p3", "10.244.1.3/24".parse().unwrap())
        .unwrap();
    // Same node: through cni0.
    assert!(lab.ping("p1", ip(p3.ip()), 1, Duration::from_secs(5)));
    // Pod to its gateway.
    assert!(lab.ping(
        "p2",
        "10.244.2.1".parse().unwrap(),
        1,
        Duration::from_secs(5)
    ));
    // Across nodes only once routes exist (host-gw style, by hand).
    assert!(!lab.ping("p1", ip(p2.ip()), 1, Duration::from_secs(1)));
    lab.exec_ok(
        "a",
        &["ip", "route", "add", "10.244.2.0/24", "via", "198.18.0.12"],
    )
    .unwrap();
    lab.exec_ok(
        "b",
        &["ip", "route", "add", "10.244.1.0/24", "via", "198.18.0.11"],
    )
    .unwrap();
    assert!(lab.ping("p1", ip(p2.ip()), 2, Duration::from_secs(5)));
    assert!(lab.ping("p2", ip(p1.ip()), 1, Duration::from_secs(5)));
    lab.del_pod("p3").unwrap();
    assert!(lab.try_pod("p3").is_none());
    assert!(!leftover_ns(lab.prefix()).contains(&p3.netns));
    finish(lab);
}

#[test]
fn cni_bridge_pod_gets_an_address_and_is_deleted() {
    need_root!();
    let bridge = Path::new("/usr/lib/cni/bridge");
    if !bridge.exists() {
        eprintln!("skipping: /usr/lib/cni/bridge not installed");
        return;
    }
    let mut lab = Lab::new("cni").unwrap();
    let n1 = lab.add_node("n1").unwrap();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "cbr0",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "subnet": "10.244.7.0/24",
            "dataDir": n1.dir.join("ipam").to_string_lossy(),
        },
    })
    .to_string();
    let pod = lab
        .add_cni_pod("n1", "c1", bridge, &conf)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(pod.addr.network().to_string(), "10.244.7.0");
    assert!(lab.ping(
        "c1",
        "10.244.7.1".parse().unwrap(),
        1,
        Duration::from_secs(5)
    ));
    assert!(lab.ping("n1", ip(pod.ip()), 1, Duration::from_secs(5)));
    assert!(n1.dir.join("ipam/cbr0").join(pod.ip().to_string()).exists());
    lab.del_pod("c1").unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!n1.dir.join("ipam/cbr0").join(pod.ip().to_string()).exists());
    // A failing plugin: error names the command and the pod's namespace is not left behind.
    let err = lab
        .add_cni_pod("n1", "c2", bridge, "{not json")
        .unwrap_err();
    assert!(format!("{err:#}").contains("CNI ADD"), "{err:#}");
    assert!(!leftover_ns(lab.prefix()).contains(&lab.ns("c2")));
    finish(lab);
}

#[test]
fn spawned_processes_can_be_signalled_and_are_stopped_on_teardown() {
    need_root!();
    let mut lab = Lab::new("procs").unwrap();
    lab.add_node("n1").unwrap();
    let short = lab
        .spawn(
            "n1",
            "hello",
            &["sh", "-c", "echo hi $FOO; exit 7"],
            &[("FOO", "bar")],
        )
        .unwrap();
    let st = lab.wait(short, Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(st.code(), Some(7));
    assert_eq!(lab.log(short).trim(), "hi bar");
    assert!(lab.kill(short, Signal::SIGTERM).is_err(), "not running");

    let sleeper = lab.spawn("n1", "sleeper", &["sleep", "300"], &[]).unwrap();
    assert!(lab.is_running(sleeper));
    lab.kill(sleeper, Signal::SIGKILL).unwrap();
    let st = lab.wait(sleeper, Duration::from_secs(10)).unwrap().unwrap();
    assert!(!st.success());

    // A process group with a child: teardown stops both.
    let tree = lab
        .spawn(
            "n1",
            "tree",
            &["sh", "-c", "sleep 300 & sleep 300; wait"],
            &[],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let pid = lab.pid(tree).unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let ns = lab.ns("n1");
    finish(lab);
    // Killed members of the group are reparented and reaped by init; give it a moment.
    let mut members = String::from("?");
    for _ in 0..100 {
        let out = Command::new("pgrep")
            .args(["-g", &pid.to_string()])
            .output()
            .unwrap();
        members = String::from_utf8_lossy(&out.stdout).into_owned();
        if members.trim().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(members.trim(), "", "group {pid} still has processes");
    assert!(!list_netns().unwrap().contains(&ns));
}

#[test]
fn drop_removes_everything_even_when_the_test_panics() {
    need_root!();
    let mut seen = None;
    let res = catch_unwind(AssertUnwindSafe(|| {
        let mut lab = Lab::new("panics").unwrap();
        lab.add_node("n1").unwrap();
        lab.add_node("n2").unwrap();
        lab.add_manual_pod("n1", "p1", "10.244.1.2/24".parse().unwrap())
            .unwrap();
        let id = lab.spawn("n2", "sleeper", &["sleep", "300"], &[]).unwrap();
        seen = Some((
            lab.prefix().to_string(),
            lab.dir().to_path_buf(),
            lab.pid(id).unwrap(),
        ));
        assert_eq!(leftover_ns(lab.prefix()).len(), 4);
        panic!("deliberate panic inside a lab test");
    }));
    assert!(res.is_err());
    let (prefix, dir, pid) = seen.unwrap();
    assert_gone(&prefix, &dir);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || !stat.contains("(sleep)"),
        "sleeper survived: {stat}"
    );
}

#[test]
fn parallel_labs_do_not_collide() {
    need_root!();
    let handles: Vec<_> = (0..2)
        .map(|i| {
            std::thread::spawn(move || {
                let mut lab = Lab::new("par").unwrap();
                lab.add_node("n1").unwrap();
                let n2 = lab.add_node("n2").unwrap();
                lab.add_manual_pod("n1", "p", format!("10.244.{i}.2/24").parse().unwrap())
                    .unwrap();
                assert!(lab.ping("n1", ip(n2.addr), 1, Duration::from_secs(5)));
                let prefix = lab.prefix().to_string();
                finish(lab);
                prefix
            })
        })
        .collect();
    let prefixes: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_ne!(prefixes[0], prefixes[1]);
}

#[test]
fn persist_load_and_teardown() {
    need_root!();
    let name = format!("t-persist-{}", std::process::id());
    let _guard = DownOnDrop(name.clone());
    let mut lab = Lab::new(&name).unwrap();
    lab.add_node("n1").unwrap();
    lab.add_node("n2").unwrap();
    lab.spawn("n1", "sleeper", &["sleep", "300"], &[]).unwrap();
    let prefix = lab.prefix().to_string();
    let dir = lab.dir().to_path_buf();
    let path = lab.persist().unwrap();
    assert_eq!(path, state_path(&name));
    // Still up after the Lab value is gone.
    assert_eq!(leftover_ns(&prefix).len(), 3);
    let mut again = Lab::load(&name).unwrap();
    assert_eq!(again.prefix(), prefix);
    assert!(again.ping(
        "n1",
        "198.18.0.12".parse().unwrap(),
        1,
        Duration::from_secs(5)
    ));
    let sleeper = again.find_proc("sleeper").unwrap();
    assert!(again.is_running(sleeper));
    drop(again); // detached: dropping keeps it up
    assert_eq!(leftover_ns(&prefix).len(), 3);
    // A second lab cannot take the same state file.
    let other = Lab::new(&name).unwrap();
    assert!(other.persist().is_err());
    Lab::load(&name).unwrap().teardown().unwrap();
    assert_gone(&prefix, &dir);
    assert!(!path.exists());
}

fn cli(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_twill-lab"))
        .args(args)
        .output()
        .unwrap();
    eprintln!(
        "twill-lab {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn cli_up_exec_list_down() {
    need_root!();
    let name = format!("t-cli-{}", std::process::id());
    let _guard = DownOnDrop(name.clone());
    let up = cli(&["up", "--name", &name, "--nodes", "2"]);
    assert!(up.status.success());
    let res = catch_unwind(|| {
        let lab = Lab::load(&name).unwrap();
        assert_eq!(lab.nodes().len(), 2);
        let ping = cli(&[
            "exec",
            "--name",
            &name,
            "--node",
            "n1",
            "--",
            "ping",
            "-c1",
            "-W2",
            "198.18.0.12",
        ]);
        assert!(ping.status.success());
        let get = cli(&[
            "exec",
            "--name",
            &name,
            "--node",
            "n2",
            "--",
            "etcdctl",
            "--endpoints",
            "http://198.18.0.1:2379",
            "endpoint",
            "health",
        ]);
        assert!(get.status.success());
        let fail = cli(&["exec", "--name", &name, "--node", "n1", "--", "false"]);
        assert_eq!(fail.status.code(), Some(1));
        assert!(
            !cli(&["exec", "--name", &name, "--node", "nope", "--", "true"])
                .status
                .success()
        );
        let sp = cli(&[
            "spawn", "--name", &name, "--node", "n2", "--log", "sleeper", "--", "sleep", "300",
        ]);
        assert!(sp.status.success());
        assert!(Lab::load(&name).unwrap().find_proc("sleeper").is_some());
        let list = cli(&["list"]);
        assert!(String::from_utf8_lossy(&list.stdout).contains(lab.prefix()));
        assert!(
            !cli(&["up", "--name", &name]).status.success(),
            "name taken"
        );
        lab.prefix().to_string()
    });
    let down = cli(&["down", "--name", &name]);
    let prefix = res.unwrap();
    assert!(down.status.success());
    assert_eq!(leftover_ns(&prefix), Vec::<String>::new());
    assert!(!state_path(&name).exists());
    // Down again: nothing to do, not a crash.
    cli(&["down", "--name", &name]);
}

#[test]
fn stale_persisted_lab_is_cleaned_up() {
    need_root!();
    let name = format!("t-stale-{}", std::process::id());
    let mut lab = Lab::new(&name).unwrap();
    lab.add_node("n1").unwrap();
    let prefix = lab.prefix().to_string();
    let dir = lab.dir().to_path_buf();
    let path = lab.persist().unwrap();
    // Losing the state file makes the lab stale.
    std::fs::remove_file(&path).unwrap();
    let removed = twill_lab::cleanup_stale().unwrap();
    if !removed.contains(&prefix) {
        // Another test's cleanup_stale (first Lab::new) may have got there first.
        assert!(leftover_ns(&prefix).is_empty(), "{removed:?}");
    }
    assert_gone(&prefix, &dir);
}

/// Helper for `crashed_owner_is_cleaned_up`: creates a lab, prints its prefix, then waits to be
/// killed. Does nothing unless run by that test.
#[test]
#[ignore = "helper process for crashed_owner_is_cleaned_up"]
fn hold_lab_until_killed() {
    if std::env::var("TWILL_LAB_HOLD").as_deref() != Ok("1") {
        return;
    }
    let mut lab = Lab::new("crash").unwrap();
    lab.add_node("n1").unwrap();
    lab.spawn("n1", "sleeper", &["sleep", "300"], &[]).unwrap();
    println!("PREFIX={} DIR={}", lab.prefix(), lab.dir().display());
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn crashed_owner_is_cleaned_up() {
    need_root!();
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "hold_lab_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TWILL_LAB_HOLD", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut child = KillOnDrop(child);
    // The harness prints "test hold_lab_until_killed ... " on the same line.
    let line = BufReader::new(stdout)
        .lines()
        .find_map(|l| {
            l.ok()
                .and_then(|l| Some(l[l.find("PREFIX=")?..].to_string()))
        })
        .expect("helper printed its prefix");
    let mut parts = line.split_whitespace();
    let prefix = parts
        .next()
        .unwrap()
        .trim_start_matches("PREFIX=")
        .to_string();
    let dir = std::path::PathBuf::from(parts.next().unwrap().trim_start_matches("DIR="));
    assert_eq!(leftover_ns(&prefix).len(), 2);
    // While the owner lives, the lab is not stale.
    assert!(!twill_lab::cleanup_stale().unwrap().contains(&prefix));
    child.0.kill().unwrap(); // SIGKILL: no Drop runs
    child.0.wait().unwrap();
    // (A parallel test's cleanup_stale, e.g. in `twill-lab up`, may get there first.)
    twill_lab::cleanup_stale().unwrap();
    assert_gone(&prefix, &dir);
}
