//! What the policy lab tests share: where the workspace's binaries are, one poll loop, and a
//! TCP "pong" server and client inside pod namespaces (`twill-lab serve`, `twill-lab probe`).

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use twill_lab::{Lab, Node, Pod, ProcId};

pub mod twill_cluster;

/// How long a lab test waits for anything asynchronous.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A binary of this workspace (`cargo build --workspace --bins` builds them before the tests).
pub fn workspace_bin(name: &str) -> PathBuf {
    let b = twill_lab::bin_path(name);
    assert!(
        b.exists(),
        "{} missing: cargo build --workspace --bins",
        b.display()
    );
    b
}

/// twill-policy: the workspace's build, else the one cargo built for this test.
pub fn policy_bin() -> PathBuf {
    let b = twill_lab::bin_path("twill-policy");
    if b.exists() {
        b
    } else {
        env!("CARGO_BIN_EXE_twill-policy").into()
    }
}

/// Polls `ok` every 100 ms until it holds; after [`DEADLINE`] panics with `what` and
/// `show()` (a table or log that tells why).
pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool, show: impl Fn() -> String) {
    let deadline = Instant::now() + DEADLINE;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}\n{}",
            show()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `twill-lab serve` in `netns`: "pong" on TCP and UDP `port`.
pub fn serve(lab: &mut Lab, netns: &str, name: &str, port: u16) -> ProcId {
    let bin = workspace_bin("twill-lab");
    lab.spawn(
        netns,
        name,
        &[bin.to_str().unwrap(), "serve", "--port", &port.to_string()],
        &[],
    )
    .expect("spawn twill-lab serve")
}

/// Node n1 with pods a (10.244.1.2) and b (10.244.1.3) on its bridge, b serving "pong" on
/// port 80: the world of the single-node lab tests. Returns once a -> b connects (the
/// control: with no table the path is open).
pub fn node_with_pods_a_and_b(lab: &mut Lab) -> (Node, Pod, Pod) {
    let node = lab.add_node("n1").unwrap();
    let a = lab
        .add_manual_pod("n1", "a", "10.244.1.2/24".parse().unwrap())
        .unwrap();
    let b = lab
        .add_manual_pod("n1", "b", "10.244.1.3/24".parse().unwrap())
        .unwrap();
    serve(lab, &b.netns, "server-b", 80);
    wait_for(
        "a -> b before twill-policy",
        || connects(lab, &a.netns, "10.244.1.3"),
        String::new,
    );
    (node, a, b)
}

/// Whether a new TCP connection from `netns` to `to` (an IP address) port 80 gets "pong"
/// within 1 s.
pub fn connects(lab: &Lab, netns: &str, to: impl ToString) -> bool {
    let ip: IpAddr = to.to_string().parse().expect("an IP address");
    let bin = workspace_bin("twill-lab");
    lab.exec(
        netns,
        &[
            bin.to_str().unwrap(),
            "probe",
            "--to",
            &SocketAddr::new(ip, 80).to_string(),
        ],
    )
    .expect("twill-lab probe")
    .status
    .success()
}

/// Runs `f` on a thread that has entered network namespace `netns` (HTTP clients and servers
/// of a lab node, never in the root namespace).
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// `GET path` on `addr` inside `netns`: (status code, body), None if refused or cut short.
pub fn http_get(netns: &str, addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let (addr, path) = (addr.to_string(), path.to_string());
    in_netns(netns, move || {
        let mut c = std::net::TcpStream::connect(addr.as_str()).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut s = String::new();
        c.read_to_string(&mut s).ok()?;
        let code = s.split_whitespace().nth(1)?.parse().ok()?;
        let body = s.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((code, body))
    })
}

/// Serves `srv` on `addr` (e.g. 127.0.0.1:16443) inside `netns`, from a thread of its own,
/// for as long as the test runs.
pub fn serve_api_in(netns: &str, srv: &twill_fake_apiserver::FakeApiServer, addr: &str) {
    let (netns, srv, addr) = (netns.to_string(), srv.clone(), addr.to_string());
    std::thread::spawn(move || {
        in_netns(&netns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind(addr.as_str()).await.unwrap();
                srv.serve_tcp(l).await.unwrap();
            });
        })
    });
}
