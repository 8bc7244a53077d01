//! host-gw: routes to each peer's subnet via the peer's public IP on the external interface.
//! The routes themselves come from [`crate::desired`]; this module holds the backend's
//! start-up check.

use std::net::IpAddr;

use ipnet::IpNet;

/// Flannel's constructor check: host-gw cannot work behind NAT, because peers route to the
/// advertised public IP directly.
pub fn check_public_ip(public_ip: IpAddr, external_addresses: &[IpNet]) -> Result<(), BehindNat> {
    if external_addresses.iter().any(|a| a.addr() == public_ip) {
        Ok(())
    } else {
        Err(BehindNat)
    }
}

/// The public IP is not on the external interface (Flannel's text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("your PublicIP differs from interface IP, meaning that probably you're on a NAT, which is not supported by host-gw backend")]
pub struct BehindNat;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_ip_must_be_on_the_interface() {
        let addrs: Vec<IpNet> = vec!["198.18.0.11/24".parse().unwrap()];
        assert!(check_public_ip("198.18.0.11".parse().unwrap(), &addrs).is_ok());
        let err = check_public_ip("203.0.113.9".parse().unwrap(), &addrs).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("your PublicIP differs from interface IP"));
    }
}
