//! deploy/twill-cleanup.yml, the one-shot DaemonSet an operator applies after switching back to
//! Flannel: a valid DaemonSet (nothing lost in a round trip through the k8s-openapi type), in
//! Flannel's namespace, on the host network with NET_ADMIN, running `twilld --cleanup` from
//! the same image as kube-flannel.yml, with a command twilld's flag parser accepts.

mod common;

use clap::Parser;
use common::read;
use k8s_openapi::api::apps::v1::DaemonSet;
use serde_json::Value;

fn manifest() -> Value {
    serde_saphyr::from_str(&read("deploy/twill-cleanup.yml")).expect("YAML")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn is_a_daemonset_that_round_trips() {
    let doc = manifest();
    assert_eq!(doc["kind"], "DaemonSet");
    let typed: DaemonSet = serde_json::from_value(doc.clone()).expect("a DaemonSet");
    assert_eq!(
        serde_json::to_value(typed).unwrap(),
        doc,
        "a field the DaemonSet type does not know (misspelt or misplaced)"
    );
}

#[test]
fn runs_twilld_cleanup_on_the_host_network_from_twills_image() {
    let doc = manifest();
    assert_eq!(doc["metadata"]["namespace"], "kube-flannel");
    let pod = &doc["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostNetwork"], true,
        "the cleanup acts on the node's tables"
    );
    assert_eq!(
        pod["hostPID"], true,
        "the cleanup's refusal must see the node's twill daemons"
    );
    let init = &pod["initContainers"][0];
    let cmd = strings(&init["command"]);
    assert_eq!(cmd, ["/opt/bin/twilld", "--cleanup"]);
    let flags = twill::flags::Flags::try_parse_from(
        std::iter::once("twilld".to_string()).chain(cmd[1..].iter().cloned()),
    )
    .expect("twilld accepts the command");
    assert!(flags.cleanup);
    assert!(strings(&init["securityContext"]["capabilities"]["add"]).contains(&"NET_ADMIN".into()));

    // The same image kube-flannel.yml runs, which holds /opt/bin/twilld on a Debian base
    // (/bin/sleep for the container that keeps the pod Ready).
    let flannel_images: Vec<String> = read("kube-flannel.yml")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: ").map(String::from))
        .collect();
    assert!(!flannel_images.is_empty());
    for c in pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["containers"].as_array().unwrap())
    {
        let image = c["image"].as_str().unwrap().to_string();
        assert!(
            flannel_images.contains(&image),
            "{}: {image} is not kube-flannel.yml's image {flannel_images:?}",
            c["name"]
        );
    }
    let dockerfile = read("Dockerfile");
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    assert!(runtime.contains("debian:") && runtime.contains(" AS runtime"));
    assert!(runtime.contains(" /opt/bin/twilld\n"));
    assert_eq!(strings(&pod["containers"][0]["command"])[0], "/bin/sleep");
}
