//! A peer's lease (etcd key + JSON value) goes through parsing and peer validation without a
//! panic: garbage is an error naming the lease, never a crash of the daemon. Input: the key,
//! a NUL byte, the value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use twill_formats::net_conf::NetConfig;
use twill_formats::lease::{parse_subnet_key_path, validate_peer, Lease, LeaseAttrs};

const PREFIX: &str = "/coreos.com/network";

fuzz_target!(|data: &[u8]| {
    let (key, value) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"/coreos.com/network/subnets/10.244.1.0-24"[..], data),
    };
    let key = String::from_utf8_lossy(key);
    let _ = parse_subnet_key_path(PREFIX, &key);
    if let Ok(attrs) = LeaseAttrs::from_json(value) {
        // What twilld writes back must parse again.
        let again = LeaseAttrs::from_json(attrs.to_json().as_bytes()).expect("round trip");
        assert_eq!(again.public_ip, attrs.public_ip);
    }
    let configs = [
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
        r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:42::/56","Backend":{"Type":"vxlan"}}"#,
    ];
    if let Ok(lease) = Lease::from_kv(&key, value, 7, 100, 1) {
        for c in configs {
            let cfg = NetConfig::parse_and_check(c).unwrap();
            let _ = validate_peer(&lease, &cfg);
        }
    }
});
