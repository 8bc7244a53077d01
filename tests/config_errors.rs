//! Lab test: every net-conf.json validation error of Flannel's CheckNetworkConfig reaches the
//! operator through twilld's log with Flannel's text, and twilld keeps retrying (as flanneld
//! does) instead of running with a bad config. Malformed JSON names the position.

mod common;

use std::time::{Duration, Instant};

use common::{cluster, PREFIX};
use twill_lab::Signal;

const CASES: &[(&str, &str)] = &[
    (
        r#"{"Backend":{"Type":"vxlan"}}"#,
        "please define a correct Network parameter in the flannel config",
    ),
    (
        r#"{"Network":"10.244.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#,
        "SubnetLen must be less than /31",
    ),
    (
        r#"{"Network":"10.244.0.0/16","SubnetLen":17,"Backend":{"Type":"vxlan"}}"#,
        "network must be able to accommodate at least four subnets",
    ),
    (
        r#"{"Network":"10.244.0.0/29","Backend":{"Type":"vxlan"}}"#,
        "network is too small. Minimum useful network prefix is /28",
    ),
    (
        r#"{"Network":"10.244.0.0/16","SubnetMin":"10.9.0.0","Backend":{"Type":"vxlan"}}"#,
        "SubnetMin is not in the range of the Network",
    ),
    (
        r#"{"Network":"10.244.0.0/16","SubnetMax":"10.9.0.0","Backend":{"Type":"vxlan"}}"#,
        "SubnetMax is not in the range of the Network",
    ),
    (
        r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.5","Backend":{"Type":"vxlan"}}"#,
        "SubnetMin is not on a SubnetLen boundary: 10.244.1.5",
    ),
    (
        r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.9.1","Backend":{"Type":"vxlan"}}"#,
        "SubnetMax is not on a SubnetLen boundary: 10.244.9.1",
    ),
    (
        r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
        "please define a correct IPv6Network parameter in the flannel config",
    ),
    (
        r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00::/56","IPv6SubnetLen":127,"Backend":{"Type":"vxlan"}}"#,
        "SubnetLen must be less than /127",
    ),
    (
        r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00::/125","Backend":{"Type":"vxlan"}}"#,
        "IPv6Network is too small. Minimum useful network prefix is /124",
    ),
    (
        r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00::/56","IPv6SubnetMin":"fd01::","Backend":{"Type":"vxlan"}}"#,
        "IPv6SubnetMin is not in the range of the IPv6Network",
    ),
    (
        r#"{"Network":"fd00::/56","Backend":{"Type":"vxlan"}}"#,
        "invalid IPv4 CIDR format",
    ),
    (
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"bogus"}}"#,
        "unknown backend type: bogus",
    ),
    (
        r#"{"Network":"10.244.0.0/16"}"#,
        "twill does not implement backend type \"udp\"",
    ),
    (
        "{\"Network\":\"10.244.0.0/16\",\n \"Backend\":{\"Type\":\"vxlan\"}",
        "line 2, column",
    ),
];

fn wait_for_log(c: &mut common::Cluster, node: &str, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = c.log(node);
        if log.contains(needle) {
            assert!(log.contains("Couldn't fetch network config"), "{log}");
            return;
        }
        assert!(
            c.lab.is_running(c.daemon(node)),
            "twilld exited instead of retrying:\n{log}"
        );
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in twilld's log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_config_error_is_reported_with_flannels_text_and_retried() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("cfg", &["n1"], "{}");
    c.lab
        .etcdctl(&["del", &format!("{PREFIX}/config")])
        .unwrap();
    c.start("n1", &[]);
    wait_for_log(
        &mut c,
        "n1",
        "flannel config not found in etcd store. Did you create your config using etcdv3 API?",
    );
    c.kill("n1", Signal::SIGKILL);

    for (config, expected) in CASES {
        c.lab
            .etcdctl(&["put", &format!("{PREFIX}/config"), config])
            .unwrap();
        c.start("n1", &[]);
        wait_for_log(&mut c, "n1", expected);
        c.kill("n1", Signal::SIGKILL);
        assert!(
            !c.subnet_file("n1").exists(),
            "subnet.env written for a bad config {config}"
        );
        assert!(
            c.subnet_keys().is_empty(),
            "a lease was taken with a bad config {config}"
        );
    }

    // Fixing the config while twilld retries is picked up without a restart.
    c.lab
        .etcdctl(&[
            "put",
            &format!("{PREFIX}/config"),
            "{\"Network\":\"10.244.0.0/16\"",
        ])
        .unwrap();
    c.start("n1", &[]);
    wait_for_log(&mut c, "n1", "line 1, column");
    c.lab
        .etcdctl(&[
            "put",
            &format!("{PREFIX}/config"),
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
        ])
        .unwrap();
    let env = c.wait_ready("n1");
    assert!(env.subnet.is_some());
}
