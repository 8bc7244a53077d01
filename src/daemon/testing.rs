//! What the daemon's unit tests share: a network config, lease records, a core in etcd mode.

use std::time::{Duration, Instant};

use crate::registry::etcd::LeaseRecord;
use twill_formats::lease::{LeaseAttrs, SubnetKey, VxlanBackendData};
use twill_formats::net_conf::NetConfig;
use twill_formats::Mac;

use super::core::{Core, OwnLease, Retry};

/// The renew margin the tests' cores use (not Flannel's default of an hour, so a fixed hour
/// shows).
pub(super) const MARGIN: Duration = Duration::from_secs(600);
pub(super) const DAY: Duration = Duration::from_secs(24 * 3600);
/// Flannel-like retry bounds for the core's own tests.
pub(super) const RETRY: Retry = Retry {
    min: Duration::from_secs(1),
    max: Duration::from_secs(30),
};

pub(super) fn config() -> NetConfig {
    NetConfig::parse_and_check(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
        .expect("test config is valid")
}

pub(super) fn key(subnet: &str) -> SubnetKey {
    SubnetKey::parse(subnet).expect("test key is valid")
}

fn attrs(public_ip: &str, mac_last: u8) -> LeaseAttrs {
    LeaseAttrs {
        public_ip: public_ip.parse().expect("test address is valid"),
        backend_type: "vxlan".to_string(),
        backend_data: Some(
            VxlanBackendData {
                vni: 1,
                vtep_mac: Mac([0x02, 0, 0, 0, 0, mac_last]),
            }
            .to_value(),
        ),
        ..LeaseAttrs::default()
    }
}

pub(super) fn record(subnet: &str, public_ip: &str, mac_last: u8) -> LeaseRecord {
    LeaseRecord {
        key: key(subnet),
        attrs: Ok(attrs(public_ip, mac_last)),
        lease_id: 7,
    }
}

/// This node's lease in the tests.
pub(super) fn own_record() -> LeaseRecord {
    record("10.244.1.0-24", "198.18.0.1", 1)
}

/// A core in etcd mode holding [`own_record`] for a day since `now`.
pub(super) fn etcd_core(now: Instant, retry: Retry) -> Core {
    let own = own_record();
    Core::etcd(
        config(),
        OwnLease {
            key: own.key,
            attrs: own.attrs.expect("own attrs"),
            ttl: Some(DAY),
        },
        MARGIN,
        retry,
        retry,
        now,
    )
}
