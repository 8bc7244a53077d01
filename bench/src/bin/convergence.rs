//! Convergence benchmark: N peer leases (default 1000) put into etcd, time until all their
//! entries (neighbour, FDB, route per peer) are programmed on one node by twilld, against
//! `ip -batch` + `bridge -batch` applying the same 3N entries in a fresh namespace, in the
//! same run. Also twilld's RSS holding N peers, and the same convergence while twilld's
//! `/metrics` is scraped every 100 ms, against the unscraped rounds' own spread: scrapes must
//! not slow the dataplane. And twilld's RSS after a node "reboots" into the cluster: each
//! unscraped round then stops twilld, deletes its device (and with it every entry) and starts
//! it again with the N leases already in etcd, so one pass lists and programs them all.
//!
//! The targets depend on the number of peers ([`Targets::for_peers`]): up to 1000 peers, time
//! ≤ 2 × the batch peer and < 1000 ms, RSS < 20 MiB; above 1000 peers (5000 peers),
//! time ≤ 1.5 × the batch peer and < 1000 ms, RSS < 25 MiB. The time's verdict is on the
//! median of the rounds; the RSS's (both) on the worst round (a limit is about the worst
//! case), with the median shown beside it.
//!
//! Usage: convergence [--peers N] [--rounds R]   (root; builds its own lab)
//! Internal: convergence put-leases ENDPOINT PREFIX N   (run inside the lab's switch namespace)
//! Internal: convergence scrape ADDR MS   (run inside the node's namespace: GET /metrics every
//! MS milliseconds until killed; exits non-zero on any answer but 200)

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use twill_bench::{median, ms, table_row};
use twill_lab::{Lab, ProcId};

/// The targets for one number of peers.
#[derive(Debug, PartialEq)]
struct Targets {
    /// Which peer counts these targets are for, as the rows name it.
    applies_to: &'static str,
    /// Largest median ratio of twilld's time to the batch peer's.
    max_ratio: f64,
    /// twilld's median time must stay under this.
    max_ms: f64,
    /// twilld's RSS in every round must stay under this.
    max_rss_mib: f64,
}

impl Targets {
    /// The original targets up to 1000 peers; one step up in scale, the tighter ones above.
    fn for_peers(n: u32) -> Targets {
        if n <= 1000 {
            Targets {
                applies_to: "up to 1000 peers",
                max_ratio: 2.0,
                max_ms: 1000.0,
                max_rss_mib: 20.0,
            }
        } else {
            Targets {
                applies_to: "above 1000 peers",
                max_ratio: 1.5,
                max_ms: 1000.0,
                max_rss_mib: 25.0,
            }
        }
    }
}

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;

fn peer(i: u32) -> (Ipv4Addr, Ipv4Addr, String) {
    // Subnets 10.1.0.0/24 upward; public IPs 198.19.x.y (never reached: only programmed).
    let subnet = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + (i << 8));
    let public = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 1)) + i);
    let mac = format!("0e:be:00:00:{:02x}:{:02x}", i >> 8, i & 0xff);
    (subnet, public, mac)
}

fn lease_json(public: Ipv4Addr, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{public}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

/// Puts N leases through etcd transactions of 100 puts (etcd's default limit is 128 ops).
fn put_leases(endpoint: &str, prefix: &str, n: u32) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut client = etcd_client::Client::connect([endpoint], None).await?;
        let ids: Vec<u32> = (0..n).collect();
        for chunk in ids.chunks(100) {
            let ops: Vec<etcd_client::TxnOp> = chunk
                .iter()
                .map(|&i| {
                    let (subnet, public, mac) = peer(i);
                    etcd_client::TxnOp::put(
                        format!("{prefix}/subnets/{subnet}-24"),
                        lease_json(public, &mac),
                        None,
                    )
                })
                .collect();
            client.txn(etcd_client::Txn::new().and_then(ops)).await?;
        }
        Ok::<_, anyhow::Error>(())
    })
}

fn count_routes(lab: &Lab, ns: &str) -> Result<usize> {
    let out = lab.exec_ok(ns, &["ip", "-4", "route", "show", "dev", "flannel.1"])?;
    Ok(out.lines().filter(|l| l.contains(" via ")).count())
}

fn count_entries(lab: &Lab, ns: &str) -> Result<(usize, usize, usize)> {
    let neigh = lab
        .exec_ok(
            ns,
            &[
                "ip",
                "-4",
                "neigh",
                "show",
                "dev",
                "flannel.1",
                "nud",
                "permanent",
            ],
        )?
        .lines()
        .count();
    let fdb = lab
        .exec_ok(ns, &["bridge", "fdb", "show", "dev", "flannel.1"])?
        .lines()
        .filter(|l| l.contains(" dst "))
        .count();
    Ok((neigh, fdb, count_routes(lab, ns)?))
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

/// twilld's health port in the bench lab (inside the node's namespace).
const HEALTHZ_PORT: &str = "8471";

/// `GET /metrics` on `addr` every `every`, until killed; an answer other than 200 ends it with
/// an error, so a bench that claims to scrape really does.
fn scrape(addr: &str, every: Duration) -> Result<()> {
    use std::io::{Read, Write};
    loop {
        let mut c =
            std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        let mut answer = String::new();
        c.read_to_string(&mut answer)?;
        if !answer.starts_with("HTTP/1.1 200") || !answer.contains("twilld_peers_known") {
            bail!(
                "GET /metrics on {addr}: {}",
                answer.lines().next().unwrap_or("")
            );
        }
        std::thread::sleep(every);
    }
}

/// One round of twilld: fresh lab, one node, N leases, time to all entries, with `/metrics`
/// scraped every 100 ms throughout when `scraped`. Returns (time, rss KiB).
fn round_twilld(n: u32, scraped: bool) -> Result<Round> {
    let mut lab = Lab::new("bcv")?;
    lab.start_etcd()?;
    lab.etcdctl(&["put", &format!("{PREFIX}/config"), CONFIG])?;
    let node = lab.add_node("n1")?;
    let subnet_file = node.dir.join("subnet.env").to_string_lossy().into_owned();
    let bin = twill_lab::bin_path("twilld").to_string_lossy().into_owned();
    let argv: Vec<String> = vec![
        bin,
        "--etcd-endpoints=http://198.18.0.1:2379".into(),
        "--ip-masq".into(),
        "--subnet-file".into(),
        subnet_file.clone(),
        format!("--healthz-port={HEALTHZ_PORT}"),
        "--status-socket".into(),
        node.dir.join("twilld.sock").to_string_lossy().into_owned(),
    ];
    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
    let id = lab.spawn(&node.netns, "twilld", &args, &[("TWILL_LOG", "warn")])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::path::Path::new(&subnet_file).exists() {
        if Instant::now() > deadline || !lab.is_running(id) {
            bail!("twilld not ready: {}", lab.log(id));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let me = std::env::current_exe()?.to_string_lossy().into_owned();
    let scraper = if scraped {
        let addr = format!("127.0.0.1:{HEALTHZ_PORT}");
        Some(lab.spawn(&node.netns, "scraper", &[&me, "scrape", &addr, "100"], &[])?)
    } else {
        None
    };
    let sw = lab.switch_ns();
    // Watch route additions with `ip monitor` (one process, event-driven) rather than polling
    // with a new `ip` per check, which would steal CPU from the daemon being measured.
    let mut monitor = std::process::Command::new("ip")
        .args(["-n", &node.netns, "monitor", "route"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let reader = BufReader::new(monitor.stdout.take().context("monitor stdout")?);
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let want = n as usize;
    std::thread::spawn(move || {
        let mut seen = 0usize;
        for line in reader.lines().map_while(Result::ok) {
            if line.contains(" via ")
                && line.contains("dev flannel.1")
                && !line.starts_with("Deleted")
            {
                seen += 1;
                if seen == want {
                    let _ = tx.send(Instant::now());
                    return;
                }
            }
        }
    });
    lab.exec_ok(
        &sw,
        &[
            &me,
            "put-leases",
            "http://127.0.0.1:2379",
            PREFIX,
            &n.to_string(),
        ],
    )?;
    let put_done = start.elapsed();
    let converged = rx.recv_timeout(Duration::from_secs(60));
    let _ = monitor.kill();
    let _ = monitor.wait();
    let Ok(at) = converged else {
        bail!(
            "not converged in 60 s: {:?}\n{}",
            count_entries(&lab, &node.netns)?,
            lab.log(id)
        );
    };
    let took = at - start;
    eprintln!("  etcd puts took {:.1} ms of that", ms(put_done));
    let (neigh, fdb, routes) = count_entries(&lab, &node.netns)?;
    if (neigh, fdb, routes) != (n as usize, n as usize, n as usize) {
        bail!("incomplete dataplane: neigh {neigh} fdb {fdb} routes {routes}");
    }
    let rss = rss_kib(lab.pid(id)?)?;
    if let Some(scraper) = scraper {
        if !lab.is_running(scraper) {
            bail!("the /metrics scraper stopped: {}", lab.log(scraper));
        }
    }
    let rss_at_start = if scraped {
        None
    } else {
        Some(rss_after_start(&mut lab, id, &node.netns, &argv, n)?)
    };
    lab.teardown()?;
    Ok(Round {
        took,
        rss,
        rss_at_start,
    })
}

/// A node that reboots into a cluster of `n` peers: twilld stopped, its device (and with it
/// every neighbour, FDB entry and route on it) gone, twilld started again with the `n` leases
/// already in etcd, so its first pass lists them all and programs every entry at once. Returns
/// twilld's RSS once all entries are there and the pass has ended.
fn rss_after_start(lab: &mut Lab, old: ProcId, ns: &str, argv: &[String], n: u32) -> Result<u64> {
    lab.stop(old, Duration::from_secs(5))?;
    lab.exec_ok(ns, &["ip", "link", "del", "flannel.1"])?;
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let id = lab.spawn(ns, "twilld-start", &argv, &[("TWILL_LOG", "warn")])?;
    let n = n as usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Until twilld has made its device again, there is nothing to count.
    while count_entries(lab, ns).ok() != Some((n, n, n)) {
        if Instant::now() > deadline || !lab.is_running(id) {
            bail!(
                "twilld started with {n} leases did not program them: {}",
                lab.log(id)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The pass ends (and gives its memory back) right after its last entry.
    std::thread::sleep(Duration::from_millis(500));
    rss_kib(lab.pid(id)?)
}

/// What one twilld round measured: convergence time, RSS holding the peers, and the RSS after a
/// start with the leases already in etcd (unscraped rounds only).
struct Round {
    took: Duration,
    rss: u64,
    rss_at_start: Option<u64>,
}

/// One round of the peer: the same entries through `ip -batch` and `bridge -batch`.
fn round_batch(n: u32) -> Result<Duration> {
    let mut lab = Lab::new("bcb")?;
    let node = lab.add_node("n1")?;
    let ns = node.netns.clone();
    // flannel.1 as flanneld makes it; its own subnet (10.0.0.0/24) is outside every peer's.
    lab.flannel_by_hand("n1", "10.0.0.0/24".parse()?, "0e:be:ff:ff:ff:ff")?;
    let mut ip_batch = String::new();
    let mut bridge_batch = String::new();
    let mut routes = String::new();
    for i in 0..n {
        let (subnet, public, mac) = peer(i);
        writeln!(
            ip_batch,
            "neigh replace {subnet} lladdr {mac} dev flannel.1 nud permanent"
        )?;
        writeln!(
            bridge_batch,
            "fdb replace {mac} dev flannel.1 dst {public} self permanent"
        )?;
        writeln!(
            routes,
            "route replace {subnet}/24 via {subnet} dev flannel.1 onlink"
        )?;
    }
    ip_batch.push_str(&routes);
    let ipf = lab.dir().join("ip.batch");
    let brf = lab.dir().join("bridge.batch");
    std::fs::write(&ipf, &ip_batch)?;
    std::fs::write(&brf, &bridge_batch)?;
    let start = Instant::now();
    lab.exec_ok(&ns, &["bridge", "-batch", &brf.to_string_lossy()])?;
    lab.exec_ok(&ns, &["ip", "-batch", &ipf.to_string_lossy()])?;
    let took = start.elapsed();
    let (neigh, fdb, r) = count_entries(&lab, &ns)?;
    if (neigh, fdb, r) != (n as usize, n as usize, n as usize) {
        bail!("batch peer incomplete: neigh {neigh} fdb {fdb} routes {r}");
    }
    lab.teardown()?;
    Ok(took)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("put-leases") {
        return put_leases(&args[2], &args[3], args[4].parse()?);
    }
    if args.get(1).map(String::as_str) == Some("scrape") {
        return scrape(&args[2], Duration::from_millis(args[3].parse()?));
    }
    if !twill_lab::require_root() {
        return Ok(());
    }
    let flag = |name: &str, default: u32| -> u32 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let n = flag("--peers", 1000);
    let rounds = flag("--rounds", 5);
    let mut ratios = Vec::new();
    let mut twill_ms = Vec::new();
    let mut batch_ms = Vec::new();
    let mut rss = Vec::new();
    let mut scraped_ratios = Vec::new();
    let mut rss_at_start = Vec::new();
    for r in 0..rounds {
        let plain = round_twilld(n, false)?;
        let (t, kib) = (plain.took, plain.rss);
        rss_at_start.extend(plain.rss_at_start.map(|k| k as f64));
        let s = round_twilld(n, true)?.took;
        let b = round_batch(n)?;
        eprintln!(
            "round {r}: twilld {:.1} ms (rss {kib} KiB; after a start with the leases: {:?} KiB), scraped every 100 ms {:.1} ms, ip/bridge -batch {:.1} ms",
            ms(t),
            plain.rss_at_start,
            ms(s),
            ms(b)
        );
        ratios.push(ms(t) / ms(b));
        scraped_ratios.push(ms(s) / ms(b));
        twill_ms.push(ms(t));
        batch_ms.push(ms(b));
        rss.push(kib as f64);
    }
    // The noise: how far the unscraped rounds' own ratios stray from their median.
    let plain_ratio = median(ratios.clone());
    let spread = ratios
        .iter()
        .map(|r| (r / plain_ratio - 1.0).abs())
        .fold(0.0, f64::max);
    let scraped_ratio = median(scraped_ratios);
    let worst_rss_mib = rss.iter().copied().fold(0.0, f64::max) / 1024.0;
    let (t, b, ratio, rss_mib) = (
        median(twill_ms),
        median(batch_ms),
        median(ratios),
        median(rss) / 1024.0,
    );
    let targets = Targets::for_peers(n);
    println!(
        "{}",
        table_row(
            &format!("convergence, {n} peer leases to all entries (median of {rounds})"),
            &format!("{t:.0} ms"),
            &format!("{b:.0} ms (ip -batch + bridge -batch)"),
            ratio,
            &format!(
                "ratio ≤ {} and < {:.0} ms ({})",
                targets.max_ratio, targets.max_ms, targets.applies_to
            ),
            ratio <= targets.max_ratio && t < targets.max_ms
        )
    );
    println!(
        "{}",
        table_row(
            &format!(
                "twilld RSS holding {n} peers, worst of {rounds} rounds (median {rss_mib:.1} MiB)"
            ),
            &format!("{worst_rss_mib:.1} MiB"),
            &format!(
                "{:.0} MiB (limit {})",
                targets.max_rss_mib, targets.applies_to
            ),
            worst_rss_mib / targets.max_rss_mib,
            "ratio < 1",
            worst_rss_mib < targets.max_rss_mib
        )
    );
    let worst_start_mib = rss_at_start.iter().copied().fold(0.0, f64::max) / 1024.0;
    let median_start_mib = median(rss_at_start) / 1024.0;
    println!(
        "{}",
        table_row(
            &format!(
                "twilld RSS after starting with {n} leases already in etcd (a node reboot: all entries in one pass), worst of {rounds} (median {median_start_mib:.1} MiB)"
            ),
            &format!("{worst_start_mib:.1} MiB"),
            &format!(
                "{:.0} MiB (limit {})",
                targets.max_rss_mib, targets.applies_to
            ),
            worst_start_mib / targets.max_rss_mib,
            "ratio < 1",
            worst_start_mib < targets.max_rss_mib
        )
    );
    let change = scraped_ratio / plain_ratio;
    println!(
        "{}",
        table_row(
            &format!(
                "convergence with /metrics scraped every 100 ms, vs unscraped (median of {rounds})"
            ),
            &format!("{scraped_ratio:.2} × batch"),
            &format!(
                "{plain_ratio:.2} × batch unscraped; noise ±{:.0}%",
                spread * 100.0
            ),
            change,
            "within the noise",
            (change - 1.0).abs() <= spread
        )
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_targets_by_number_of_peers() {
        let original = Targets::for_peers(1000);
        assert_eq!((original.max_ratio, original.max_rss_mib), (2.0, 20.0));
        assert_eq!(Targets::for_peers(10), original);
        let issue_16 = Targets::for_peers(5000);
        assert_eq!(
            (issue_16.max_ratio, issue_16.max_ms, issue_16.max_rss_mib),
            (1.5, 1000.0, 25.0)
        );
        assert_eq!(Targets::for_peers(1001), issue_16);
    }
}
