//! Small helpers around `std::process::Command` and `/proc`.

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Renders a command line for error messages.
pub(crate) fn render(program: &str, args: &[&str]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        if a.is_empty() || a.contains(char::is_whitespace) {
            s.push_str(&format!("{a:?}"));
        } else {
            s.push_str(a);
        }
    }
    s
}

/// Runs `cmd`, feeding `stdin` (if any) and capturing stdout and stderr.
/// With a timeout, the process is killed (SIGKILL) when it runs longer and an error is returned.
pub(crate) fn run(
    mut cmd: Command,
    what: &str,
    stdin: Option<&[u8]>,
    timeout: Option<Duration>,
) -> Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            Some(thread::spawn(move || {
                // A child that exits without reading its stdin is not an error here.
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let mut out_pipe = child.stdout.take().expect("piped stdout");
    let mut err_pipe = child.stderr.take().expect("piped stderr");
    let out_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let status = match timeout {
        None => child
            .wait()
            .with_context(|| format!("waiting for {what}"))?,
        Some(t) => {
            let deadline = Instant::now() + t;
            loop {
                if let Some(st) = child.try_wait()? {
                    break st;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    // The readers are left detached: a grandchild may still hold the pipes.
                    bail!("{what} timed out after {t:?}");
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Turns a failed [`Output`] into an error naming the command, its status, stderr and stdout.
pub(crate) fn check(what: &str, out: Output) -> Result<Output> {
    if out.status.success() {
        return Ok(out);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut msg = format!("`{what}` failed ({})", out.status);
    if !stderr.trim().is_empty() {
        msg.push_str(&format!("; stderr: {}", stderr.trim()));
    }
    if !stdout.trim().is_empty() {
        msg.push_str(&format!("; stdout: {}", stdout.trim()));
    }
    Err(anyhow!(msg))
}

/// Runs `ip ARGS` in the root namespace (only for `ip netns ...` bookkeeping) and checks success.
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    let what = render("ip", args);
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let out = check(&what, run(cmd, &what, None, Some(Duration::from_secs(30)))?)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs several `ip` commands inside `netns` as one `ip -n NS -batch -`.
pub(crate) fn ip_batch(netns: &str, lines: &[String]) -> Result<()> {
    let what = format!("ip -n {netns} -batch - <<<{lines:?}");
    let mut cmd = Command::new("ip");
    cmd.args(["-n", netns, "-batch", "-"]);
    let input = lines.join("\n") + "\n";
    check(
        &what,
        run(
            cmd,
            &what,
            Some(input.as_bytes()),
            Some(Duration::from_secs(30)),
        )?,
    )?;
    Ok(())
}

/// Names of all network namespaces (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Pids of processes inside `netns` (`ip netns pids`).
pub(crate) fn netns_pids(netns: &str) -> Result<Vec<i32>> {
    let out = ip(&["netns", "pids", netns])?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// `(state, start time in clock ticks)` of a process from `/proc/<pid>/stat`.
pub(crate) fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); start time is field 22.
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// True if `pid` is a live (not zombie) process that started at `start_time`.
pub(crate) fn pid_alive(pid: u32, start_time: u64) -> bool {
    matches!(proc_stat(pid), Some((state, st)) if st == start_time && state != 'Z')
}

/// True if `pid` still holds its pid number (alive or zombie) and started at `start_time`.
pub(crate) fn pid_present(pid: u32, start_time: u64) -> bool {
    matches!(proc_stat(pid), Some((_, st)) if st == start_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_of_self() {
        let (state, start) = proc_stat(std::process::id()).unwrap();
        assert!(state == 'R' || state == 'S', "state {state}");
        assert!(pid_alive(std::process::id(), start));
        assert!(!pid_alive(std::process::id(), start + 1));
    }

    #[test]
    fn run_captures_and_times_out() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "cat; echo err >&2; exit 3"]);
        let out = run(cmd, "sh", Some(b"hello"), Some(Duration::from_secs(10))).unwrap();
        assert_eq!(out.stdout, b"hello");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(3));
        let e = check("sh", out).unwrap_err().to_string();
        assert!(e.contains("stderr: err"), "{e}");

        let mut cmd = Command::new("sleep");
        cmd.arg("10");
        let t = Instant::now();
        let e = run(cmd, "sleep", None, Some(Duration::from_millis(200))).unwrap_err();
        assert!(e.to_string().contains("timed out"));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn render_quotes() {
        assert_eq!(render("a", &["b c", "d"]), "a \"b c\" d");
    }
}
