//! Lab tests of lease handling in etcd mode: reservations, subnet.env reuse, and a node's own
//! lease disappearing or being taken while twilld runs.

mod common;

use std::time::Instant;

use common::{cluster, subnet_key, DEADLINE, POLL};
use twill_lab::{Ipv4Net, Signal};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

fn lease_id(c: &common::Cluster, key: &str) -> i64 {
    let out = c.lab.etcdctl(&["get", key, "-w", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["kvs"][0]["lease"].as_i64().unwrap_or(0)
}

#[test]
fn reservation_is_used_and_stays_a_reservation() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("rsv", &["n1", "n2"], VXLAN);
    let reserved: Ipv4Net = "10.244.77.0/24".parse().unwrap();
    let n1 = c.lab.node("n1").addr;
    // Flannel's Documentation/reservations.md: a subnet key written without an etcd lease.
    c.lab
        .etcdctl(&[
            "put",
            &subnet_key(&reserved),
            &format!(r#"{{"PublicIP":"{n1}","PublicIPv6":null,"BackendType":"vxlan"}}"#),
        ])
        .unwrap();
    c.start("n1", &[]);
    c.start("n2", &[]);
    let env1 = c.wait_ready("n1");
    let env2 = c.wait_ready("n2");
    assert_eq!(env1.subnet_network(), Some(reserved));
    assert_ne!(env2.subnet_network(), Some(reserved));
    // Still without an etcd lease (Flannel would attach a 24 h one; the docs mean it to stay).
    assert_eq!(lease_id(&c, &subnet_key(&reserved)), 0);
    assert!(c
        .etcd_get(&subnet_key(&reserved))
        .unwrap()
        .contains("VtepMAC"));
    let n2_key = subnet_key(&env2.subnet_network().unwrap());
    assert_ne!(
        lease_id(&c, &n2_key),
        0,
        "a normal lease has a 24 h etcd lease"
    );
    let ttl = c
        .lab
        .etcdctl(&[
            "lease",
            "timetolive",
            &format!("{:x}", lease_id(&c, &n2_key)),
        ])
        .unwrap();
    assert!(ttl.contains("granted with TTL(86400s)"), "{ttl}");
}

#[test]
fn subnet_env_brings_back_the_same_subnet_after_the_lease_is_gone() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("reuse", &["n1"], VXLAN);
    c.start("n1", &[]);
    let before = c.wait_ready("n1").subnet_network().unwrap();
    c.kill("n1", Signal::SIGKILL);
    c.lab.etcdctl(&["del", &subnet_key(&before)]).unwrap();
    c.start("n1", &[]);
    let after = c.wait_ready("n1");
    assert_eq!(after.subnet_network(), Some(before));
    assert!(c.etcd_get(&subnet_key(&before)).is_some());
}

/// The node's previous subnet (from subnet.env) is held by a key whose value is garbage: the
/// key still occupies the subnet, so twilld allocates another one at once instead of trying to
/// create that key again and again, and it leaves the garbage key alone.
#[test]
fn previous_subnet_held_by_an_unreadable_lease_is_not_retried_forever() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("garb", &["n1"], VXLAN);
    c.start("n1", &[]);
    let before = c.wait_ready("n1").subnet_network().unwrap();
    c.kill("n1", Signal::SIGKILL);
    let key = subnet_key(&before);
    c.lab.etcdctl(&["put", &key, "not json {"]).unwrap();
    c.start("n1", &[]);
    let after = c.wait_ready("n1").subnet_network().unwrap();
    assert_ne!(after, before);
    assert_eq!(c.etcd_get(&key).as_deref(), Some("not json {"));
    let log = c.log("n1");
    assert!(
        log.contains("unreadable lease; its subnet counts as taken"),
        "{log}"
    );
    assert!(!log.contains("lost a race"), "{log}");
}

#[test]
fn own_lease_deleted_while_running_is_reacquired() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("own", &["n1", "n2"], VXLAN);
    c.start("n1", &[]);
    c.start("n2", &[]);
    let s1 = c.wait_ready("n1").subnet_network().unwrap();
    c.wait_ready("n2");
    let key = subnet_key(&s1);
    let value = c.etcd_get(&key).unwrap();
    c.lab.etcdctl(&["del", &key]).unwrap();
    let deadline = Instant::now() + DEADLINE;
    while c.etcd_get(&key).as_deref() != Some(value.as_str()) {
        assert!(
            Instant::now() < deadline,
            "lease not re-acquired:\n{}",
            c.log("n1")
        );
        std::thread::sleep(POLL);
    }
    // twilld logs it once the create RPC has returned, which can be after the key is seen.
    let deadline = Instant::now() + DEADLINE;
    while !c.log("n1").contains("re-acquired lease") {
        assert!(
            Instant::now() < deadline,
            "key back but no \"re-acquired lease\" logged:\n{}",
            c.log("n1")
        );
        std::thread::sleep(POLL);
    }
    assert!(c.lab.is_running(c.daemon("n1")));
    let mac = c.mac("n1", "flannel.1");
    c.wait_entries("n2", "flannel.1", "n1 programmed again", |e| {
        e.has_peer(&s1, c.lab.node("n1").addr, &mac)
    });
}

#[test]
fn own_subnet_taken_by_another_node_stops_the_daemon() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("taken", &["n1"], VXLAN);
    c.start("n1", &[]);
    let s1 = c.wait_ready("n1").subnet_network().unwrap();
    let key = subnet_key(&s1);
    // Another node writes the same subnet with its own address (a transaction so the key is
    // never absent, as after a split brain).
    let other = r#"{"PublicIP":"198.18.0.99","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:99"}}"#;
    c.lab.etcdctl(&["put", &key, other]).unwrap();
    let id = c.daemon("n1");
    let status = c.lab.wait(id, DEADLINE).unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "twilld kept running:\n{}",
        c.log("n1")
    );
    let log = c.log("n1");
    assert!(
        log.contains(&format!(
            "subnet {} is now leased to 198.18.0.99",
            key.rsplit('/').next().unwrap()
        )),
        "{log}"
    );
    // It never overwrote the other node's lease.
    assert_eq!(c.etcd_get(&key).as_deref(), Some(other));
}

/// The watch resumes after etcd restarts, and when the revision it would resume from has been
/// compacted it re-lists: a peer added and one deleted meanwhile are both seen.
#[test]
fn watch_resumes_and_relists_after_compaction() {
    if !twill_lab::require_root() {
        return;
    }
    let mut c = cluster("cmp", &["n1"], VXLAN);
    c.start("n1", &[]);
    c.wait_ready("n1");
    let lease = |ip: &str, mac: &str| {
        format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        )
    };
    let gone: Ipv4Net = "10.244.201.0/24".parse().unwrap();
    let added: Ipv4Net = "10.244.202.0/24".parse().unwrap();
    c.lab
        .etcdctl(&[
            "put",
            &subnet_key(&gone),
            &lease("198.18.0.201", "0e:00:00:00:c9:01"),
        ])
        .unwrap();
    c.wait_entries("n1", "flannel.1", "first peer", |e| e.mentions(&gone));

    // Freeze twilld, restart etcd under it, change the peers and compact the history.
    let id = c.daemon("n1");
    c.lab.kill(id, Signal::SIGSTOP).unwrap();
    c.lab.stop_etcd().unwrap();
    c.lab.restart_etcd().unwrap();
    c.lab.etcdctl(&["del", &subnet_key(&gone)]).unwrap();
    c.lab
        .etcdctl(&[
            "put",
            &subnet_key(&added),
            &lease("198.18.0.202", "0e:00:00:00:ca:01"),
        ])
        .unwrap();
    let status = c
        .lab
        .etcdctl(&["endpoint", "status", "-w", "json"])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let rev = v[0]["Status"]["header"]["revision"].as_i64().unwrap();
    c.lab.etcdctl(&["compact", &rev.to_string()]).unwrap();
    c.lab.kill(id, Signal::SIGCONT).unwrap();

    c.wait_entries(
        "n1",
        "flannel.1",
        "deleted peer gone, new peer programmed",
        |e| {
            !e.mentions(&gone)
                && e.has_peer(&added, "198.18.0.202".parse().unwrap(), "0e:00:00:00:ca:01")
        },
    );
    assert!(c.log("n1").contains("re-listing"), "{}", c.log("n1"));
}
