//! CNI benchmark: ADD and DEL latency through twill-cni against invoking the bridge
//! plugin directly with the very delegate config twill-cni saved, pod by pod, alternating, in
//! the same run; p50 and p99 over N pods (default 200).
//!
//! Both plugins are started the same way (fork, setns into the node namespace, a private
//! mount namespace with the node's /sys as `ip netns exec` gives, exec), so the ratio shows
//! twill-cni's own cost: reading subnet.env, building and saving the delegate config, the
//! extra exec of the delegate, and registering the pod's anti-spoofing elements.
//!
//! Usage: cni_latency [--pods N] [--cni PATH]   (root; builds its own lab)

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use twill_bench::{ms, percentile, table_row};
use twill_lab::Lab;

const CNI_DIR: &str = "/usr/lib/cni";

/// Runs a CNI plugin with the node's network namespace, timing only the plugin process.
fn invoke(
    node_ns: &Path,
    bin: &Path,
    cmd: &str,
    id: &str,
    pod_ns: &str,
    conf: &str,
) -> Result<(Duration, String)> {
    let ns_file = std::fs::File::open(node_ns)?;
    let bin_dir = bin
        .parent()
        .context("plugin dir")?
        .to_string_lossy()
        .into_owned();
    let mut command = Command::new(bin);
    command
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", format!("/run/netns/{pod_ns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", format!("{bin_dir}:{CNI_DIR}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // As `ip netns exec` does, and as a runtime on a real node has it: /sys shows the node's
    // interfaces (twill-cni reads /sys/class/net/<veth>/master before registering the pod's
    // anti-spoofing elements; with the root namespace's /sys it would skip that step).
    let (sysfs, sys) = (c"sysfs", c"/sys");
    // SAFETY: between fork and exec only raw syscalls run (setns, unshare, mount, umount2),
    // all async-signal-safe; the C strings were built before the fork.
    unsafe {
        command.pre_exec(move || {
            use nix::libc;
            nix::sched::setns(ns_file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            let check = |rc: libc::c_int| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_SLAVE | libc::MS_REC,
                std::ptr::null(),
            ))?;
            check(libc::umount2(sys.as_ptr(), libc::MNT_DETACH))?;
            check(libc::mount(
                sysfs.as_ptr(),
                sys.as_ptr(),
                sysfs.as_ptr(),
                0,
                std::ptr::null(),
            ))
        });
    }
    let start = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.as_bytes())?;
    let out = child.wait_with_output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "{} {cmd} failed: {}{}",
            bin.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn main() -> Result<()> {
    if !twill_lab::require_root() {
        return Ok(());
    }
    let args: Vec<String> = std::env::args().collect();
    let pods: usize = args
        .iter()
        .position(|a| a == "--pods")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);

    let mut lab = Lab::new("bcni")?;
    let node = lab.add_node("n1")?;
    let node_ns = Path::new("/run/netns").join(&node.netns);
    let dir = node.dir.clone();
    // A /21 lease: room for both plugins' pods in one host-local range.
    std::fs::write(
        dir.join("subnet.env"),
        "FLANNEL_NETWORK=10.0.0.0/8\nFLANNEL_SUBNET=10.1.0.1/21\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )?;
    let flannel_conf = format!(
        r#"{{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","delegate":{{"hairpinMode":true,"isDefaultGateway":true}},"subnetFile":"{}","dataDir":"{}","ipam":{{"dataDir":"{}"}}}}"#,
        dir.join("subnet.env").display(),
        dir.join("flannel").display(),
        dir.join("ipam").display()
    );
    // --cni PATH: the plugin binary to measure (bench/run.sh passes the static build that
    // images ship); default the workspace's own build.
    let twill = args
        .iter()
        .position(|a| a == "--cni")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| twill_lab::bin_path("twill-cni"));
    let bridge = Path::new(CNI_DIR).join("bridge");

    // Warm up: one pod through each, which also creates cni0, and gives us the delegate
    // config twill-cni saved: the bridge plugin gets exactly those bytes.
    let mut delegate_conf = String::new();
    let mut add = (Vec::new(), Vec::new());
    let mut del = (Vec::new(), Vec::new());
    let mut names = Vec::new();
    for i in 0..=pods {
        let (a, b) = (format!("ta{i}"), format!("tb{i}"));
        for p in [&a, &b] {
            Command::new("ip")
                .args(["netns", "add", &format!("{}{p}", lab.prefix())])
                .status()?;
        }
        let pa = format!("{}{a}", lab.prefix());
        let pb = format!("{}{b}", lab.prefix());
        if delegate_conf.is_empty() {
            invoke(&node_ns, &twill, "ADD", &pa, &pa, &flannel_conf)?;
            delegate_conf = std::fs::read_to_string(dir.join("flannel").join(&pa))?;
            invoke(&node_ns, &bridge, "ADD", &pb, &pb, &delegate_conf)?;
            names.push((pa, pb));
            continue;
        }
        let (ta, tb) = if i % 2 == 0 {
            let ta = invoke(&node_ns, &twill, "ADD", &pa, &pa, &flannel_conf)?.0;
            (
                ta,
                invoke(&node_ns, &bridge, "ADD", &pb, &pb, &delegate_conf)?.0,
            )
        } else {
            let tb = invoke(&node_ns, &bridge, "ADD", &pb, &pb, &delegate_conf)?.0;
            (
                invoke(&node_ns, &twill, "ADD", &pa, &pa, &flannel_conf)?.0,
                tb,
            )
        };
        add.0.push(ms(ta));
        add.1.push(ms(tb));
        names.push((pa, pb));
    }
    // twill-cni really registered every pod's port for anti-spoofing (the production path).
    let ports = lab.exec_ok(
        &node.netns,
        &[
            "nft",
            "-j",
            "list",
            "set",
            "bridge",
            "twill-antispoof",
            "ports",
        ],
    )?;
    let registered = ports.matches("\"veth").count();
    if registered < pods + 1 {
        bail!(
            "only {registered} of {} pod ports registered for anti-spoofing",
            pods + 1
        );
    }
    for (i, (pa, pb)) in names.iter().enumerate() {
        // Alternate which goes first, so neither always runs right after the other's
        // kernel work (veth teardown) settles.
        let (ta, tb) = if i % 2 == 0 {
            let ta = invoke(&node_ns, &twill, "DEL", pa, pa, &flannel_conf)?.0;
            (
                ta,
                invoke(&node_ns, &bridge, "DEL", pb, pb, &delegate_conf)?.0,
            )
        } else {
            let tb = invoke(&node_ns, &bridge, "DEL", pb, pb, &delegate_conf)?.0;
            (
                invoke(&node_ns, &twill, "DEL", pa, pa, &flannel_conf)?.0,
                tb,
            )
        };
        if i > 0 {
            del.0.push(ms(ta));
            del.1.push(ms(tb));
        }
        for p in [pa, pb] {
            Command::new("ip").args(["netns", "del", p]).status()?;
        }
    }
    let leftover = std::fs::read_dir(dir.join("flannel"))?.count();
    if leftover != 0 {
        bail!("{leftover} saved configs left after DEL");
    }
    lab.teardown()?;

    for (what, (t, b)) in [("ADD", add), ("DEL", del)] {
        for (label, p) in [("p50", 50.0), ("p99", 99.0)] {
            let (tv, bv) = (percentile(t.clone(), p), percentile(b.clone(), p));
            let target_ok = label != "p50" || tv / bv <= 1.10;
            println!(
                "{}",
                table_row(
                    &format!("CNI {what} latency {label}, {pods} pods"),
                    &format!("{tv:.1} ms (twill-cni + bridge)"),
                    &format!("{bv:.1} ms (bridge alone)"),
                    tv / bv,
                    if label == "p50" {
                        "ratio ≤ 1.10"
                    } else {
                        "(reported)"
                    },
                    target_ok
                )
            );
        }
    }
    Ok(())
}
