//! The evaluator against every scenario, step, probe and pair of the upstream
//! conformance suite (tests/data/netpol-scenarios.json).

use twill_policy::conformance::{load_scenarios, pairs, step_snapshot};
use twill_policy::eval::{allowed, Endpoint};

const SCENARIOS: &str = include_str!("data/netpol-scenarios.json");

#[test]
fn evaluator_passes_every_scenario_probe() {
    let scenarios = load_scenarios(SCENARIOS).unwrap();
    assert_eq!(scenarios.len(), 48);
    let (mut probes, mut checked, mut failures) = (0, 0, Vec::new());
    for sc in &scenarios {
        for (si, step) in sc.steps.iter().enumerate() {
            let snap = step_snapshot(step).unwrap();
            for probe in &step.probes {
                probes += 1;
                for (s, d) in pairs() {
                    let from = Endpoint::pod(snap.pod(&s).unwrap());
                    let to = Endpoint::pod(snap.pod(&d).unwrap());
                    let v = allowed(&snap, &from, &to, probe.port, probe.protocol);
                    let want_denied = probe.expect_denied.contains(&format!("{s}->{d}"));
                    checked += 1;
                    if v.allowed == want_denied {
                        failures.push(format!(
                            "{} step {si} {}/{} {s}->{d}: got allowed={} want {}; {:?}",
                            sc.id, probe.protocol, probe.port, v.allowed, !want_denied, v.reasons
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(probes, 65);
    assert_eq!(checked, 65 * 72);
    eprintln!("evaluator: {probes} probes, {checked} pairs, all as expected");
}
