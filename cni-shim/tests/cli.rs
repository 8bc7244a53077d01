//! The built `twill-cni` binary against a fake delegate plugin (a shell script that records its
//! stdin and environment). Needs no privileges: CNI_NETNS is this process's own namespace handle
//! and the fake delegate touches no kernel state.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::RwLock;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_twill-cni");
const SUBNET_ENV: &str =
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
const GOLDEN: &str = r#"{"cniVersion":"0.3.1","hairpinMode":true,"ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}],"type":"host-local"},"isDefaultGateway":true,"isGateway":true,"mtu":1450,"name":"cbr0","type":"bridge"}"#;

/// Writing an executable while another thread forks can make exec fail with ETXTBSY; scripts are
/// written under the write lock, processes spawned under the read lock.
static SPAWN: RwLock<()> = RwLock::new(());

const FAKE: &str = r#"#!/bin/sh
out="$FAKE_OUT"
cat > "$out/$CNI_COMMAND.stdin"
env | grep '^CNI_' | sort > "$out/$CNI_COMMAND.env"
if [ -n "$FAKE_FAIL" ] && [ "$CNI_COMMAND" = "$FAKE_FAIL" ]; then
  echo '{"cniVersion":"0.3.1","code":7,"msg":"fake failure","details":"from fake"}'
  exit 1
fi
case "$CNI_COMMAND" in
ADD) echo '{"cniVersion":"0.3.1","interfaces":[{"name":"eth0"}],"ips":[{"version":"4","address":"10.244.1.2/24","gateway":"10.244.1.1","interface":0}]}';;
VERSION) echo "{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[$FAKE_VERSIONS]}";;
esac
exit 0
"#;

struct Fixture {
    dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

struct Out {
    code: i32,
    stdout: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {:?}", self.stdout))
    }
    fn err_code(&self) -> u64 {
        assert_eq!(self.code, 1, "{}", self.stdout);
        self.json()["code"].as_u64().unwrap()
    }
}

impl Fixture {
    fn new() -> Fixture {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "twcni{}-cli{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("out")).unwrap();
        fs::write(dir.join("subnet.env"), SUBNET_ENV).unwrap();
        let bin = dir.join("bin");
        fs::create_dir_all(&bin).unwrap();
        {
            let _w = SPAWN.write().unwrap();
            for name in ["bridge", "other"] {
                let p = bin.join(name);
                fs::write(&p, FAKE).unwrap();
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        Fixture { dir }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn conf(&self, version: &str, extra: &str) -> String {
        format!(
            r#"{{"cniVersion":"{version}","name":"cbr0","type":"flannel","delegate":{{"hairpinMode":true,"isDefaultGateway":true}},"subnetFile":"{}","dataDir":"{}"{extra}}}"#,
            self.dir.join("subnet.env").display(),
            self.data().display()
        )
    }

    fn run(&self, cmd: &str, cid: &str, stdin: &str, env: &[(&str, &str)]) -> Out {
        let bin = self.dir.join("bin");
        let _r = SPAWN.read().unwrap();
        let mut c = Command::new(BIN);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", cid)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_NETNS", "/proc/self/ns/net")
            .env("CNI_PATH", format!("/nonexistent:{}", bin.display()))
            .env("FAKE_OUT", self.dir.join("out"))
            .env("FAKE_VERSIONS", r#""0.3.1","1.0.0""#);
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let o = child.wait_with_output().unwrap();
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8(o.stdout).unwrap(),
        }
    }

    fn recorded(&self, what: &str) -> Option<String> {
        fs::read_to_string(self.dir.join("out").join(what)).ok()
    }
}

#[test]
fn add_saves_golden_bytes_and_passes_result_through() {
    let f = Fixture::new();
    let out = f.run("ADD", "ctr1", &f.conf("0.3.1", ""), &[]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert_eq!(out.json()["ips"][0]["address"], "10.244.1.2/24");
    assert_eq!(out.json()["cniVersion"], "0.3.1");
    let saved = fs::read_to_string(f.data().join("ctr1")).unwrap();
    assert_eq!(saved, GOLDEN);
    assert_eq!(f.recorded("ADD.stdin").unwrap(), GOLDEN);
    let env = f.recorded("ADD.env").unwrap();
    assert!(env.contains("CNI_COMMAND=ADD\n"), "{env}");
    assert!(env.contains("CNI_CONTAINERID=ctr1\n"), "{env}");
    assert!(env.contains("CNI_IFNAME=eth0\n"), "{env}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(f.data()).unwrap().mode() & 0o777, 0o700);
    assert_eq!(
        fs::metadata(f.data().join("ctr1")).unwrap().mode() & 0o777,
        0o600
    );
    // No temp file left behind.
    assert_eq!(fs::read_dir(f.data()).unwrap().count(), 1);
}

#[test]
fn add_converts_result_to_requested_version() {
    let f = Fixture::new();
    let out = f.run("ADD", "ctr1", &f.conf("1.0.0", ""), &[]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    let v = out.json();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert!(v["ips"][0].get("version").is_none(), "{v}");
}

#[test]
fn add_delegate_failure_removes_saved_file_and_returns_its_error() {
    let f = Fixture::new();
    let out = f.run("ADD", "ctr1", &f.conf("0.3.1", ""), &[("FAKE_FAIL", "ADD")]);
    assert_eq!(out.err_code(), 7);
    let v = out.json();
    assert_eq!(v["msg"], "failed to delegate add: fake failure");
    assert_eq!(v["details"], "from fake");
    assert!(!f.data().join("ctr1").exists());
}

#[test]
fn del_replays_saved_config_and_is_idempotent() {
    let f = Fixture::new();
    assert_eq!(f.run("ADD", "ctr1", &f.conf("0.3.1", ""), &[]).code, 0);
    // DEL does not read subnet.env.
    fs::remove_file(f.dir.join("subnet.env")).unwrap();
    // A failing delegate DEL keeps the file for the retry.
    let out = f.run("DEL", "ctr1", &f.conf("0.3.1", ""), &[("FAKE_FAIL", "DEL")]);
    assert_eq!(out.err_code(), 7);
    assert!(f.data().join("ctr1").exists());
    let out = f.run("DEL", "ctr1", &f.conf("0.3.1", ""), &[("CNI_NETNS", "")]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert_eq!(out.stdout, "");
    assert_eq!(f.recorded("DEL.stdin").unwrap(), GOLDEN);
    assert!(!f.data().join("ctr1").exists());
    fs::remove_file(f.dir.join("out/DEL.stdin")).unwrap();
    let out = f.run("DEL", "ctr1", &f.conf("0.3.1", ""), &[]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(
        f.recorded("DEL.stdin").is_none(),
        "no delegate call without saved config"
    );
}

#[test]
fn del_with_unparsable_saved_config_succeeds_and_keeps_it() {
    let f = Fixture::new();
    fs::create_dir_all(f.data()).unwrap();
    fs::write(f.data().join("ctr1"), "{not json").unwrap();
    let out = f.run("DEL", "ctr1", &f.conf("0.3.1", ""), &[]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(f.data().join("ctr1").exists());
    assert!(f.recorded("DEL.stdin").is_none());
}

#[test]
fn check_forwards_prev_result_and_reports_unknown_container() {
    let f = Fixture::new();
    let prev = r#","prevResult":{"cniVersion":"1.0.0","ips":[]}"#;
    let out = f.run("CHECK", "ctr1", &f.conf("1.0.0", prev), &[]);
    assert_eq!(out.err_code(), 3);
    assert!(out.json()["msg"].as_str().unwrap().contains("\"ctr1\""));
    assert_eq!(f.run("ADD", "ctr1", &f.conf("1.0.0", ""), &[]).code, 0);
    let out = f.run("CHECK", "ctr1", &f.conf("1.0.0", prev), &[]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    let sent: Value = serde_json::from_str(&f.recorded("CHECK.stdin").unwrap()).unwrap();
    assert_eq!(sent["prevResult"]["cniVersion"], "1.0.0");
    assert_eq!(sent["ipam"]["ranges"][0][0]["subnet"], "10.244.1.0/24");
}

#[test]
fn status_reports_missing_subnet_env_and_forwards_when_supported() {
    let f = Fixture::new();
    let out = f.run("STATUS", "", &f.conf("1.1.0", ""), &[]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(
        f.recorded("STATUS.stdin").is_none(),
        "fake delegate lacks 1.1.0"
    );
    let out = f.run(
        "STATUS",
        "",
        &f.conf("1.1.0", ""),
        &[("FAKE_VERSIONS", r#""1.0.0","1.1.0""#)],
    );
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(f.recorded("STATUS.stdin").unwrap().contains("\"bridge\""));
    let out = f.run(
        "STATUS",
        "",
        &f.conf("1.1.0", ""),
        &[("FAKE_VERSIONS", r#""1.1.0""#), ("FAKE_FAIL", "STATUS")],
    );
    assert_eq!(out.err_code(), 7);
    fs::remove_file(f.dir.join("subnet.env")).unwrap();
    let out = f.run("STATUS", "", &f.conf("1.1.0", ""), &[]);
    assert_eq!(out.err_code(), 50);
    assert!(out.json()["msg"].as_str().unwrap().contains("subnet.env"));
    assert_eq!(f.run("STATUS", "", &f.conf("1.0.0", ""), &[]).err_code(), 1);
}

#[test]
fn gc_removes_only_stale_saved_configs_and_forwards() {
    let f = Fixture::new();
    for id in ["keep", "stale1", "stale2"] {
        assert_eq!(f.run("ADD", id, &f.conf("1.1.0", ""), &[]).code, 0);
    }
    fs::write(f.data().join(".tmpfile"), "x").unwrap();
    let va = r#","cni.dev/valid-attachments":[{"containerID":"keep","ifname":"eth0"}]"#;
    let out = f.run(
        "GC",
        "",
        &f.conf("1.1.0", va),
        &[("FAKE_VERSIONS", r#""1.1.0""#)],
    );
    assert_eq!(out.code, 0, "{}", out.stdout);
    let mut left: Vec<String> = fs::read_dir(f.data())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, vec![".tmpfile", "keep"]);
    let sent: Value = serde_json::from_str(&f.recorded("GC.stdin").unwrap()).unwrap();
    assert_eq!(sent["cni.dev/valid-attachments"][0]["containerID"], "keep");
    assert_eq!(sent["cniVersion"], "1.1.0");
    // Without the list GC refuses rather than deleting everything.
    assert_eq!(f.run("GC", "", &f.conf("1.1.0", ""), &[]).err_code(), 7);
    assert!(f.data().join("keep").exists());
}

#[test]
fn version_command() {
    let f = Fixture::new();
    let out = f.run("VERSION", "", r#"{"cniVersion":"1.0.0"}"#, &[]);
    assert_eq!(out.code, 0);
    assert_eq!(
        out.stdout,
        r#"{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}"#
    );
}

#[test]
fn bad_inputs_fail_with_codes_and_touch_nothing() {
    let f = Fixture::new();
    let good = f.conf("0.3.1", "");
    type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, u64, &'a str);
    let cases: Vec<Case> = vec![
        (
            "ADD",
            good.clone(),
            vec![("CNI_CONTAINERID", "../../etc/x")],
            4,
            "CNI_CONTAINERID",
        ),
        (
            "DEL",
            good.clone(),
            vec![("CNI_CONTAINERID", "a/b")],
            4,
            "CNI_CONTAINERID",
        ),
        (
            "ADD",
            good.clone(),
            vec![("CNI_CONTAINERID", "")],
            4,
            "CNI_CONTAINERID",
        ),
        (
            "ADD",
            good.clone(),
            vec![("CNI_IFNAME", "eth0/x")],
            4,
            "CNI_IFNAME",
        ),
        (
            "ADD",
            good.clone(),
            vec![("CNI_IFNAME", "0123456789abcdef")],
            4,
            "CNI_IFNAME",
        ),
        (
            "ADD",
            good.clone(),
            vec![("CNI_NETNS", "/tmp")],
            4,
            "CNI_NETNS",
        ),
        (
            "ADD",
            good.clone(),
            vec![("CNI_NETNS", "/nonexistent")],
            4,
            "CNI_NETNS",
        ),
        ("ADD", good.clone(), vec![("CNI_NETNS", "")], 4, "CNI_NETNS"),
        ("ADD", good.clone(), vec![("CNI_PATH", "")], 4, "CNI_PATH"),
        ("BOGUS", good.clone(), vec![], 4, "BOGUS"),
        ("ADD", "{".into(), vec![], 6, "failed to load netconf"),
        (
            "ADD",
            f.conf("0.2.0", ""),
            vec![],
            1,
            "incompatible CNI versions",
        ),
        (
            "ADD",
            good.replace(r#""hairpinMode""#, r#""type":"../../bin/sh","hairpinMode""#),
            vec![],
            7,
            "../../bin/sh",
        ),
        (
            "ADD",
            good.replace(r#""hairpinMode""#, r#""name":"x","hairpinMode""#),
            vec![],
            2,
            "'delegate' dictionary must not have 'name' field, it'll be set by flannel",
        ),
        (
            "ADD",
            good.replace(r#""hairpinMode""#, r#""ipam":{},"hairpinMode""#),
            vec![],
            2,
            "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel",
        ),
        (
            "ADD",
            good.replace(r#""hairpinMode""#, r#""type":"missing","hairpinMode""#),
            vec![],
            101,
            "failed to find plugin \"missing\"",
        ),
    ];
    for (cmd, conf, env, code, text) in cases {
        let out = f.run(cmd, "ctr1", &conf, &env);
        assert_eq!(out.err_code(), code, "{cmd} {env:?}: {}", out.stdout);
        let v = out.json();
        let text_out = format!(
            "{} {}",
            v["msg"].as_str().unwrap(),
            v["details"].as_str().unwrap()
        );
        assert!(text_out.contains(text), "{cmd} {env:?}: {}", out.stdout);
        assert!(!f.data().exists(), "{cmd} {env:?} created dataDir");
        assert!(
            f.recorded("ADD.stdin").is_none(),
            "{cmd} {env:?} ran the delegate"
        );
    }
}

#[test]
fn subnet_env_problems_use_flannel_texts() {
    let f = Fixture::new();
    fs::write(f.dir.join("subnet.env"), "FLANNEL_SUBNET=10.244.1.1/24\n").unwrap();
    let out = f.run("ADD", "ctr1", &f.conf("0.3.1", ""), &[]);
    assert_eq!(out.err_code(), 100);
    let msg = out.json()["msg"].as_str().unwrap().to_string();
    assert!(
        msg.ends_with("subnet.env is missing FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_MTU, FLANNEL_IPMASQ. Check the flannel pod log for this node."),
        "{msg}"
    );
    fs::remove_file(f.dir.join("subnet.env")).unwrap();
    let out = f.run("ADD", "ctr1", &f.conf("0.3.1", ""), &[]);
    assert_eq!(out.err_code(), 11);
    let msg = out.json()["msg"].as_str().unwrap().to_string();
    assert_eq!(
        msg,
        format!(
            "failed to load flannel 'subnet.env' file: open {}: no such file or directory. Check the flannel pod log for this node.",
            f.dir.join("subnet.env").display()
        )
    );
    assert!(!f.data().exists());
}
