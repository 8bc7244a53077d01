//! Incremental updates (root): the Enforcer walks through every upstream scenario step
//! (and variants with pods removed and pod subnets on) in one network namespace, so every
//! sync after the first is one incremental transaction against a different ruleset; after
//! each, the table the kernel holds must equal (as `nft -j list table`, order-insensitive)
//! the table a full load of the same snapshot gives in a second namespace. Then the
//! fallbacks: a table changed by someone else, or deleted, is replaced as a whole.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use twill_nft::{Nft, NftRunner};
use twill_policy::compile::Options;
use twill_policy::enforce::{Applied, Enforcer};
use twill_policy::model::Snapshot;
use twill_policy_testkit::conformance::{load_scenarios, step_snapshot, SCENARIOS};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

struct Netns {
    name: String,
    nft: Nft,
    dir: PathBuf,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("twpinc-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let wrapper = dir.join("nft");
        std::fs::write(
            &wrapper,
            format!("#!/bin/sh\nexec ip netns exec {name} nft \"$@\"\n"),
        )
        .unwrap();
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        Netns {
            name,
            nft: Nft {
                bin: wrapper,
                timeout: Duration::from_secs(20),
            },
            dir,
        }
    }

    /// The table as JSON objects keyed by kind and name, without handles, set elements
    /// and chain order normalized (the kernel lists objects in creation order).
    fn table(&self) -> BTreeMap<String, Value> {
        let out = self
            .nft
            .run(&["-j", "list", "table", "inet", "twill-policy"], "")
            .unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        let mut objs: BTreeMap<String, Value> = BTreeMap::new();
        let mut rules: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for item in v["nftables"].as_array().unwrap() {
            let (kind, mut o) = match item.as_object().unwrap().iter().next() {
                Some((k, o)) => (k.clone(), o.clone()),
                None => continue,
            };
            if kind == "metainfo" {
                continue;
            }
            let o = o.as_object_mut().unwrap();
            o.remove("handle");
            if kind == "rule" {
                let chain = o["chain"].as_str().unwrap().to_string();
                rules
                    .entry(chain)
                    .or_default()
                    .push(Value::Object(o.clone()));
                continue;
            }
            if let Some(Value::Array(e)) = o.get_mut("elem") {
                e.sort_by_key(|x| x.to_string());
            }
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            objs.insert(format!("{kind} {name}"), Value::Object(o.clone()));
        }
        for (c, r) in rules {
            objs.insert(format!("rules of {c}"), Value::Array(r));
        }
        objs
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Panics, naming the objects that differ, unless `inc` holds the table `full` does.
fn assert_same_tables(step: usize, inc: &Netns, full: &Netns) {
    let (a, b) = (inc.table(), full.table());
    if a != b {
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let diff: Vec<String> = keys
            .into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| {
                format!(
                    "{k}:\n  incremental {:?}\n  full        {:?}",
                    a.get(k),
                    b.get(k)
                )
            })
            .collect();
        panic!("step {step}: tables differ:\n{}", diff.join("\n"));
    }
}

fn without_pod(snap: &Snapshot, key: &str) -> Snapshot {
    let mut s = snap.clone();
    s.pods.retain(|p| p.key() != key);
    s
}

#[test]
fn incremental_updates_equal_full_loads() {
    if !is_root() {
        eprintln!("skipping: needs root (network namespaces)");
        return;
    }
    let inc = Netns::new("inc");
    let full = Netns::new("full");
    let scenarios = load_scenarios(SCENARIOS).unwrap();
    let mut snaps = Vec::new();
    for sc in &scenarios {
        for step in &sc.steps {
            let s = step_snapshot(step).unwrap();
            snaps.push(without_pod(&s, "x/a"));
            snaps.push(s);
        }
    }
    let cidrs = vec![
        "10.244.1.0/24".parse().unwrap(),
        "fd00:10:244:1::/64".parse().unwrap(),
    ];
    let mut enf = Enforcer::new(inc.nft.clone(), "n1", Options::default());
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (i, snap) in snaps.iter().enumerate() {
        // A third of the way through, pod subnets come on (a fixed part of the table
        // changes: one full replacement, incremental again after it).
        if i == snaps.len() / 3 {
            enf.opts.pod_cidrs = cidrs.clone();
        }
        let r = enf.sync(snap);
        let kind = format!("{:?}", r.applied);
        assert!(
            matches!(
                r.applied,
                Applied::Full | Applied::Incremental | Applied::Unchanged
            ),
            "step {i}: {kind}"
        );
        if i > 0 && i != snaps.len() / 3 {
            assert_ne!(r.applied, Applied::Full, "step {i} was not incremental");
        }
        *counts.entry(kind).or_default() += 1;
        full.nft.apply(&enf.script(snap)).unwrap();
        assert_same_tables(i, &inc, &full);
    }
    eprintln!("{} syncs: {counts:?}", snaps.len());
    assert!(counts.get("Incremental").copied().unwrap_or(0) > snaps.len() / 2);

    // Someone else changed the table (here: the id element is gone): the incremental
    // transaction is rejected as a whole and the table is replaced.
    inc.nft
        .apply("flush set inet twill-policy ruleset-id\n")
        .unwrap();
    let r = enf.sync(&snaps[0]);
    assert_eq!(r.applied, Applied::Full);
    full.nft.apply(&enf.script(&snaps[0])).unwrap();
    assert_eq!(inc.table(), full.table());
    // The table was deleted: replaced as a whole too.
    inc.nft.apply("delete table inet twill-policy\n").unwrap();
    let r = enf.sync(&snaps[1]);
    assert_eq!(r.applied, Applied::Full);
    full.nft.apply(&enf.script(&snaps[1])).unwrap();
    assert_eq!(inc.table(), full.table());
    // And incremental again afterwards.
    assert_eq!(enf.sync(&snaps[2]).applied, Applied::Incremental);
}

mod tiers;

/// Cluster policies added one by one, reordered (priorities swapped), changed (a Deny
/// becomes a Pass: after-Admin chains come, deny chains go), with a pod gone, then removed
/// one by one: every sync after the first is one incremental transaction (new deny and
/// after-Admin chains exist before the rules that `goto` them, dead ones are flushed before
/// any is deleted) and leaves the table a full load of the same snapshot gives.
#[test]
fn incremental_updates_with_cluster_policies_equal_full_loads() {
    use twill_policy::model::Action;
    if !is_root() {
        eprintln!("skipping: needs root (network namespaces)");
        return;
    }
    let inc = Netns::new("tinc");
    let full = Netns::new("tfull");
    let all = tiers::cluster_policies();
    let mut snaps = Vec::new();
    for n in 0..=all.len() {
        snaps.push(tiers::world_with(all[..n].to_vec()));
    }
    let mut reordered = all.clone();
    let (p0, p1) = (reordered[0].priority, reordered[1].priority);
    reordered[0].priority = p1;
    reordered[1].priority = p0;
    snaps.push(tiers::world_with(reordered.clone()));
    let mut passing = reordered;
    for p in &mut passing {
        for r in p.ingress.iter_mut().chain(p.egress.iter_mut()) {
            if r.action == Action::Deny {
                r.action = Action::Pass;
            }
        }
    }
    snaps.push(tiers::world_with(passing));
    snaps.push(tiers::world());
    snaps.push(without_pod(&tiers::world(), "t1a/web"));
    for n in (0..all.len()).rev() {
        snaps.push(tiers::world_with(all[n..].to_vec()));
        snaps.push(tiers::world_with(all[..n].to_vec()));
    }
    let opts = Options {
        pod_cidrs: vec![
            "10.244.1.0/24".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        ],
        ..Options::default()
    };
    let mut enf = Enforcer::new(inc.nft.clone(), "n1", opts);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (i, snap) in snaps.iter().enumerate() {
        let r = enf.sync(snap);
        if i > 0 {
            assert!(
                matches!(r.applied, Applied::Incremental | Applied::Unchanged),
                "step {i}: {:?}",
                r.applied
            );
        }
        *counts.entry(format!("{:?}", r.applied)).or_default() += 1;
        full.nft.apply(&enf.script(snap)).unwrap();
        assert_same_tables(i, &inc, &full);
    }
    eprintln!("{} syncs: {counts:?}", snaps.len());
    assert!(counts.get("Incremental").copied().unwrap_or(0) >= snaps.len() / 2);
}
