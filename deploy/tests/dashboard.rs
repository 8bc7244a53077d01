//! deploy/grafana/twill.json, the Grafana dashboard for twilld's and twill-policy's metrics:
//! it imports as a dashboard (a Prometheus datasource input, a uid, panels with PromQL
//! targets), every metric name in every target's expression is one the programs really
//! export (read from their own `/metrics` text), and every family they export is on some
//! panel or listed below as deliberately left off.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::read;

/// Families exported but on no panel, with why. Empty: every family is drawn.
const LEFT_OFF: &[(&str, &str)] = &[];

/// The metric name prefixes of the two programs.
const PREFIXES: [&str; 2] = ["twilld_", "twill_policy_"];

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/twill.json")).expect("twill.json is JSON")
}

/// The families of a Prometheus/OpenMetrics text exposition (`# TYPE name type`), name ->
/// type.
fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            (name.to_string(), kind.to_string())
        })
        .collect()
}

/// Everything the programs export: family name -> type, from the text their `/metrics`
/// serve. A labelled family shows in the text only once it has a series, and twill-policy's
/// snapshot age only after a first good snapshot, so each family is given a value first,
/// through the calls the daemons make.
fn exported() -> BTreeMap<String, String> {
    let twilld = twill::metrics::Metrics::new();
    twilld.record_pass(&twill::metrics::PassReport {
        duration: 0.002,
        ok: true,
        applied: [("route_replace", 1)].into(),
        repaired: true,
        peers_known: 2,
        peers_programmed: 1,
        skipped: [("invalid_lease", 1)].into(),
    });
    twilld.record_repair(twill::metrics::Component::Masquerade);
    twilld.record_renewal(true);
    twilld.record_renewal(false);
    twilld.set_lease_expiry(Some(Instant::now() + Duration::from_secs(3600)));
    twilld.record_watch_restart();
    twilld.record_relist();
    twilld.record_guard_counters(&BTreeMap::new());
    let twilld = twilld.render();

    let last_good = Arc::new(Mutex::new(Some(Instant::now())));
    let policy = twill_policy::metrics::Metrics::with_last_good(last_good);
    policy.observe(&twill_policy::enforce::SyncReport {
        applied: twill_policy::enforce::Applied::Full,
        stats: twill_policy::compile::Stats::default(),
        duration: Duration::from_millis(3),
        changed_chains: vec![],
        changed_elements: 0,
        conntrack: None,
    });
    policy.record_source_error();
    let drops = [(("shop/web-1".to_string(), "ingress".to_string()), 1)].into();
    twill_policy::metrics::DropTracker::default().observe(&drops, &policy);
    let policy = policy.render();

    let mut all = families(&twilld);
    all.extend(families(&policy));
    assert!(all.keys().any(|f| f.starts_with("twilld_")), "{twilld}");
    assert!(
        all.keys().any(|f| f.starts_with("twill_policy_")),
        "{policy}"
    );
    all
}

/// The series names a family of `kind` exposes, in PromQL: counters as `_total`, histograms
/// as `_bucket`, `_sum` and `_count`, everything else under its own name.
fn series_names(family: &str, kind: &str) -> Vec<String> {
    match kind {
        "counter" => vec![format!("{family}_total")],
        "histogram" => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{family}{s}"))
            .collect(),
        _ => vec![family.to_string()],
    }
}

/// The twill metric names in a PromQL expression: identifiers with one of the programs'
/// prefixes (label names and values, functions and keywords have none).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_quotes = false;
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            in_quotes = !in_quotes;
        }
        if !in_quotes && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
            continue;
        }
        if PREFIXES.iter().any(|p| word.starts_with(p)) {
            out.push(std::mem::take(&mut word));
        }
        word.clear();
    }
    out
}

/// Every (panel title, expression) of the dashboard, rows' nested panels included.
fn targets(dash: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            walk(&p["panels"], out);
            if p["type"] == "row" {
                continue;
            }
            let title = p["title"].as_str().expect("a panel title").to_string();
            let ts = p["targets"].as_array();
            assert!(
                ts.is_some_and(|t| !t.is_empty()),
                "panel {title:?} has no targets"
            );
            for t in ts.into_iter().flatten() {
                assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
                let expr = t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{title}: no expr"));
                out.push((title.clone(), expr.to_string()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

#[test]
fn the_dashboard_is_importable() {
    let dash = dashboard();
    let inputs = dash["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"
            && i["type"] == "datasource"
            && i["pluginId"] == "prometheus"),
        "{inputs:?}"
    );
    assert!(dash["uid"]
        .as_str()
        .is_some_and(|u| !u.is_empty() && u.len() <= 40));
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    let panels = dash["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids must be unique");
    for p in panels {
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{} is wider than the grid", p["title"]);
        assert!(g["h"].as_u64().unwrap() > 0 && g["y"].as_u64().is_some());
    }
    assert!(!targets(&dash).is_empty());
}

#[test]
fn every_metric_on_a_panel_is_exported() {
    let exported = exported();
    let known: BTreeSet<String> = exported
        .iter()
        .flat_map(|(f, k)| series_names(f, k))
        .collect();
    for (title, expr) in targets(&dashboard()) {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "{title}: no twill metric in {expr:?}");
        for name in names {
            assert!(
                known.contains(&name),
                "panel {title:?} uses {name}, which neither program exports; exported: {known:?}"
            );
        }
    }
}

#[test]
fn every_exported_family_is_on_a_panel_or_left_off_on_purpose() {
    let exported = exported();
    let used: BTreeSet<String> = targets(&dashboard())
        .iter()
        .flat_map(|(_, e)| metric_names(e))
        .collect();
    for (family, kind) in &exported {
        let drawn = series_names(family, kind).iter().any(|s| used.contains(s));
        let left_off = LEFT_OFF.iter().any(|(f, _)| f == family);
        assert!(
            drawn || left_off,
            "{family} ({kind}) is on no panel of deploy/grafana/twill.json and not in LEFT_OFF"
        );
        assert!(
            !(drawn && left_off),
            "{family} is drawn, yet listed in LEFT_OFF"
        );
    }
    for (family, why) in LEFT_OFF {
        assert!(
            exported.contains_key(*family),
            "LEFT_OFF names {family}, which is not exported"
        );
        assert!(!why.is_empty());
    }
}

#[test]
fn metric_names_are_read_from_promql() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(twilld_reconcile_duration_seconds_bucket{instance=~"twilld_x"}[5m])))"#
        ),
        ["twilld_reconcile_duration_seconds_bucket"]
    );
    assert_eq!(
        metric_names("twilld_peers_known - twilld_peers_programmed"),
        ["twilld_peers_known", "twilld_peers_programmed"]
    );
    assert_eq!(
        metric_names(
            "topk(10, sum by (namespace, pod) (rate(twill_policy_dropped_packets_total[1m])))"
        ),
        ["twill_policy_dropped_packets_total"]
    );
    assert!(metric_names("up").is_empty());
}
