//! compile() against the evaluator on every upstream scenario (both families where the
//! scenario has no IPv4-only ipBlocks), golden files of the nft script for a few
//! scenarios, and (as root) loading each golden script into a throw-away netns.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use twill_policy::compile::{compile, Decision, Options};
use twill_policy::conformance::{
    ipv4_of, ipv6_of, load_scenarios, node_of, pairs, step_snapshot, step_uses_ips,
};
use twill_policy::eval::{allowed, Endpoint};

const SCENARIOS: &str = include_str!("data/netpol-scenarios.json");

fn split(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap()
}

#[test]
fn compiled_ruleset_agrees_with_evaluator_on_every_scenario() {
    let scenarios = load_scenarios(SCENARIOS).unwrap();
    let (mut checked, mut failures) = (0, Vec::new());
    for sc in &scenarios {
        for (si, step) in sc.steps.iter().enumerate() {
            let snap = step_snapshot(step).unwrap();
            let rulesets: BTreeMap<String, _> = ["n1", "n2", "n3"]
                .iter()
                .map(|n| (n.to_string(), compile(&snap, n, &Options::default())))
                .collect();
            let mut families: Vec<fn(&str, &str) -> std::net::IpAddr> = vec![ipv4_of];
            if !step_uses_ips(step) {
                families.push(ipv6_of);
            }
            for probe in &step.probes {
                for (s, d) in pairs() {
                    let want_denied = probe.expect_denied.contains(&format!("{s}->{d}"));
                    for ip_of in &families {
                        let (sip, dip) = (
                            ip_of(split(&s).0, split(&s).1),
                            ip_of(split(&d).0, split(&d).1),
                        );
                        let src_rs = &rulesets[&node_of(split(&s).0)];
                        let dst_rs = &rulesets[&node_of(split(&d).0)];
                        let got = src_rs.decide(sip, dip, probe.protocol, probe.port)
                            == Decision::Accept
                            && dst_rs.decide(sip, dip, probe.protocol, probe.port)
                                == Decision::Accept;
                        let oracle = allowed(
                            &snap,
                            &Endpoint::ip(&snap, sip),
                            &Endpoint::ip(&snap, dip),
                            probe.port,
                            probe.protocol,
                        )
                        .allowed;
                        checked += 1;
                        if got != oracle || (sip.is_ipv4() && got == want_denied) {
                            failures.push(format!(
                                "{} step {si} {}/{} {s}->{d} ({sip}->{dip}): compiled={got} evaluator={oracle} expected={}",
                                sc.id, probe.protocol, probe.port, !want_denied
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("compiled rulesets: {checked} (pair, family) checks agree");
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Scenarios whose node-n1 script is kept as a golden file.
const GOLDEN: [&str; 6] = ["S02", "S09", "S17", "S18", "S34", "S13-SCTP"];

fn golden_scripts() -> Vec<(String, String)> {
    let scenarios = load_scenarios(SCENARIOS).unwrap();
    GOLDEN
        .iter()
        .map(|id| {
            let sc = scenarios
                .iter()
                .find(|s| s.id == *id)
                .unwrap_or_else(|| panic!("no scenario {id}"));
            let snap = step_snapshot(&sc.steps[0]).unwrap();
            (
                id.to_string(),
                compile(&snap, "n1", &Options::default()).render(),
            )
        })
        .collect()
}

#[test]
fn golden_scripts_match() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (id, script) in golden_scripts() {
        let path = golden_dir().join(format!("{id}.nft"));
        if update {
            std::fs::write(&path, &script).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
        assert_eq!(
            script, want,
            "{id}: compile output changed (UPDATE_GOLDEN=1 to accept)"
        );
    }
}

#[test]
fn golden_scripts_load_into_nft() {
    if !nix_is_root() {
        eprintln!("skipping: loading rulesets needs root (a throw-away network namespace)");
        return;
    }
    for (id, script) in golden_scripts() {
        // A private network namespace per load: never the root namespace's nftables.
        let mut child = Command::new("unshare")
            .args([
                "-n",
                "sh",
                "-c",
                "nft -f - && nft list table inet twill-policy",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{id}: nft rejected the script: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
