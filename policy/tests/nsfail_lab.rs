//! Root-only: `twill-policy run` on one lab node with five pods on its cni0 bridge, in two
//! namespaces. An object the enforcer cannot read costs only its own namespace: its pods
//! refuse new connections both ways while a policy change in the other namespace still takes
//! effect, and they open again once the object is fixed. A terminating pod's address handed to
//! a new pod in another namespace carries the new pod's verdict, not the old one's.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use twill_lab::Lab;

mod common;
use common::{connects, serve};

/// (key, lab pod, address). x/p1 and y/p2 are two pods with one address: only one lab pod
/// (`pr`) has it.
const PODS: [(&str, &str, &str); 4] = [
    ("x/a", "na", "10.244.1.2"),
    ("x/b", "nb", "10.244.1.3"),
    ("y/c", "nc", "10.244.1.4"),
    ("y/d", "nd", "10.244.1.5"),
];
const REUSED: &str = "10.244.1.6";

fn pod(key: &str, ip: &str, extra_meta: &str) -> String {
    let (ns, name) = key.split_once('/').unwrap();
    format!(
        "kind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{pod: {name}}}{extra_meta}}}\nspec: {{nodeName: n1}}\nstatus: {{podIP: {ip}}}\n---\n"
    )
}

/// Both namespaces open to everyone by policy (x: ingress from anywhere; y: nothing).
const X_OPEN: &str = "kind: NetworkPolicy\nmetadata: {name: open, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{}]\n";

/// Waits (30 s) until `from -> to` connects (`want`) or is refused for three probes in a row.
fn expect(lab: &Lab, id: twill_lab::ProcId, from: &str, to: &str, want: bool, why: &str) {
    let to_ip: IpAddr = match PODS.iter().find(|p| p.0 == to) {
        Some(p) => p.2.parse().unwrap(),
        None => to.parse().unwrap(),
    };
    let short = PODS.iter().find(|p| p.0 == from).map_or(from, |p| p.1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut in_a_row = 0;
    loop {
        if connects(lab, &lab.pod(short).netns, to_ip) == want {
            in_a_row += 1;
            // A refusal may be a lost probe only if it is not repeated; a connection is proof.
            if want || in_a_row == 3 {
                eprintln!(
                    "{from} -> {to}: {} ({why})",
                    if want { "connects" } else { "refused" }
                );
                return;
            }
        } else {
            in_a_row = 0;
        }
        assert!(
            Instant::now() < deadline,
            "{from} -> {to} should {} ({why}); log:\n{}",
            if want { "connect" } else { "be refused" },
            lab.log(id)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    // Written aside and renamed: the source never reads half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[test]
fn a_bad_object_closes_only_its_namespace_and_a_reused_address_gets_its_own_verdict() {
    if !twill_lab::require_root() {
        return;
    }
    let mut lab = Lab::new("polns").unwrap();
    let node = lab.add_node("n1").unwrap();
    for (_, short, ip) in PODS.iter().chain([&("y/p2", "pr", REUSED)]) {
        lab.add_manual_pod("n1", short, format!("{ip}/24").parse().unwrap())
            .unwrap();
        let ns = lab.pod(short).netns.clone();
        serve(&mut lab, &ns, &format!("server-{short}"), 80);
    }
    let dir = lab.dir().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let pods: String = PODS.iter().map(|(k, _, ip)| pod(k, ip, "")).collect();
    write(&dir, "pods.yaml", &pods);
    write(&dir, "x-open.yaml", X_OPEN);
    let bin = env!("CARGO_BIN_EXE_twill-policy");
    let id = lab
        .spawn(
            &node.netns,
            "twill-policy",
            &[
                bin,
                "--manifests",
                dir.to_str().unwrap(),
                "--pod-cidr",
                "10.244.1.0/24",
                "run",
                "--poll-ms",
                "100",
                "--status-socket",
                node.dir.join("policy.sock").to_str().unwrap(),
            ],
            &[("NODE_NAME", "n1")],
        )
        .unwrap();
    expect(&lab, id, "y/c", "x/a", true, "x is open");
    expect(
        &lab,
        id,
        "x/a",
        "y/c",
        true,
        "nothing isolates x/a's egress",
    );
    expect(&lab, id, "y/c", "y/d", true, "y is open");

    // An ipBlock the API server would refuse too breaks namespace x; in the same change, y
    // isolates y/d. x's pods refuse new connections both ways; y's change takes effect.
    let bad = "kind: NetworkPolicy\nmetadata: {name: bad, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: nobody}}\n  ingress: [{from: [{ipBlock: {cidr: not-a-cidr}}]}]\n";
    write(&dir, "x-bad.yaml", bad);
    write(
        &dir,
        "y-deny.yaml",
        "kind: NetworkPolicy\nmetadata: {name: deny-d, namespace: y}\nspec: {podSelector: {matchLabels: {pod: d}}}\n",
    );
    expect(&lab, id, "y/c", "y/d", false, "y's new policy is enforced");
    expect(&lab, id, "y/c", "x/a", false, "x fails closed (ingress)");
    expect(&lab, id, "x/a", "y/c", false, "x fails closed (egress)");
    expect(&lab, id, "x/b", "x/a", false, "x fails closed (within x)");
    expect(&lab, id, "y/d", "y/c", true, "y keeps working");
    let log = lab.log(id);
    assert!(
        log.contains(r#"NetworkPolicy x/bad: spec.ingress[0].from[0].ipBlock.cidr: "not-a-cidr" is not a CIDR; namespace x fails closed"#),
        "{log}"
    );
    // A further change in y still takes effect while x is broken.
    std::fs::remove_file(dir.join("y-deny.yaml")).unwrap();
    expect(
        &lab,
        id,
        "y/c",
        "y/d",
        true,
        "y's policy removed while x is broken",
    );

    // Fixed, with a CIDR the API server accepts (leading zeros, host bits): x opens again.
    write(
        &dir,
        "x-bad.yaml",
        &bad.replace("not-a-cidr", "010.0.0.1/8"),
    );
    expect(&lab, id, "y/c", "x/a", true, "x fixed");
    expect(&lab, id, "x/a", "y/c", true, "x fixed");

    // x/p1 is terminating and had REUSED (open, by x's policy). While it is the only pod with
    // that address, the address has its verdict.
    let p1 = pod(
        "x/p1",
        REUSED,
        ", deletionTimestamp: '2026-12-02T00:00:00Z'",
    );
    write(&dir, "reused.yaml", &p1);
    expect(&lab, id, "y/c", REUSED, true, "x/p1 alone owns the address");
    // y/p2 gets the address, and y denies p2 all ingress: p2's verdict, not p1's. (x/p1
    // sorts first: "first pod wins" would have kept p1's open verdict.)
    let p2 = pod("y/p2", REUSED, "");
    let deny_p2 = "kind: NetworkPolicy\nmetadata: {name: deny-p2, namespace: y}\nspec: {podSelector: {matchLabels: {pod: p2}}}\n";
    write(&dir, "reused.yaml", &format!("{p1}{p2}{deny_p2}"));
    expect(&lab, id, "y/c", REUSED, false, "y/p2's verdict (denied)");
    // Control: without y's policy, p2's verdict is open.
    write(&dir, "reused.yaml", &format!("{p1}{p2}"));
    expect(&lab, id, "y/c", REUSED, true, "y/p2's verdict (open)");
    // Two live pods claim it: nobody owns it, and on a node with pod subnets an address
    // nobody owns is isolated.
    write(
        &dir,
        "reused.yaml",
        &format!("{}{p2}", pod("x/p1", REUSED, "")),
    );
    expect(&lab, id, "y/c", REUSED, false, "contested address isolated");
    assert!(
        lab.log(id).contains("address claimed by more than one pod"),
        "{}",
        lab.log(id)
    );
    assert!(lab.is_running(id), "{}", lab.log(id));
    lab.teardown().unwrap();
}
