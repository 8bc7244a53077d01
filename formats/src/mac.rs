//! MAC addresses as Flannel writes them (Go `net.HardwareAddr`): the VTEP MAC in VXLAN
//! `BackendData`, and the one MAC type twilld and the dataplane (`twill-backends`) share.

use std::fmt;
use std::str::FromStr;

/// A 48-bit MAC address. Displays as lowercase `aa:bb:cc:dd:ee:ff` (Go `net.HardwareAddr`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

/// Go `net.ParseMAC` error text (`address <s>: invalid MAC address`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("address {0}: invalid MAC address")]
pub struct MacParseError(pub String);

impl Mac {
    /// Random, locally administered unicast MAC, as Flannel makes for `flannel.N`
    /// (`b0 = (b0 & 0xfe) | 0x02`).
    pub fn random_local<R: rand::Rng + ?Sized>(rng: &mut R) -> Mac {
        let mut b = [0u8; 6];
        rng.fill(&mut b[..]);
        b[0] = (b[0] & 0xfe) | 0x02;
        Mac(b)
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// A MAC from a netlink attribute; `None` unless it is exactly six bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(bytes).ok().map(Mac)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    /// The same text as `Display`, so dataplane state prints readably in logs.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn hex2(s: &[u8]) -> Option<u8> {
    let h = |c: u8| (c as char).to_digit(16);
    Some((h(s[0])? * 16 + h(s[1])?) as u8)
}

impl FromStr for Mac {
    type Err = MacParseError;

    /// Go `net.ParseMAC` forms for 6 bytes: `aa:bb:cc:dd:ee:ff`, `aa-bb-...`, `aabb.ccdd.eeff`
    /// (either case). Go also takes 8- and 20-byte addresses; a VXLAN VTEP MAC cannot be one.
    fn from_str(s: &str) -> Result<Mac, MacParseError> {
        let err = || MacParseError(s.to_string());
        let b = s.as_bytes();
        let mut out = [0u8; 6];
        if b.len() == 17 && (b[2] == b':' || b[2] == b'-') {
            for (i, o) in out.iter_mut().enumerate() {
                let x = i * 3;
                if i < 5 && b[x + 2] != b[2] {
                    return Err(err());
                }
                *o = hex2(&b[x..x + 2]).ok_or_else(err)?;
            }
        } else if b.len() == 14 && b[4] == b'.' {
            for i in 0..3 {
                let x = i * 5;
                if i < 2 && b[x + 4] != b'.' {
                    return Err(err());
                }
                out[2 * i] = hex2(&b[x..x + 2]).ok_or_else(err)?;
                out[2 * i + 1] = hex2(&b[x + 2..x + 4]).ok_or_else(err)?;
            }
        } else {
            return Err(err());
        }
        Ok(Mac(out))
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn mac_display_parse_serde() {
        let m: Mac = "C6:D2:32:6f:8f:44".parse().unwrap();
        assert_eq!(m.0, [0xc6, 0xd2, 0x32, 0x6f, 0x8f, 0x44]);
        assert_eq!(m.to_string(), "c6:d2:32:6f:8f:44");
        assert_eq!("c6-d2-32-6f-8f-44".parse::<Mac>().unwrap(), m);
        assert_eq!("c6d2.326f.8f44".parse::<Mac>().unwrap(), m);
        for bad in [
            "",
            "c6:d2:32:6f:8f",
            "c6:d2:32:6f:8f:4g",
            "c6:d2-32:6f:8f:44",
            "c6:d2:32:6f:8f:44:",
            "00:00:00:00:00:00:00:01",
            "c6d2.326f-8f44",
            "+6:d2:32:6f:8f:44",
        ] {
            assert_eq!(
                bad.parse::<Mac>().unwrap_err().to_string(),
                format!("address {bad}: invalid MAC address")
            );
        }
        assert_eq!(serde_json::to_string(&m).unwrap(), r#""c6:d2:32:6f:8f:44""#);
        let back: Mac = serde_json::from_str(r#""c6:d2:32:6f:8f:44""#).unwrap();
        assert_eq!(back, m);
        assert!(serde_json::from_str::<Mac>(r#""nope""#).is_err());
    }

    #[test]
    fn random_local_mac_is_local_unicast() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let m = Mac::random_local(&mut rng);
            assert_eq!(m.0[0] & 0x01, 0, "{m}");
            assert_eq!(m.0[0] & 0x02, 0x02, "{m}");
        }
        let a = Mac::random_local(&mut rand::rngs::StdRng::seed_from_u64(1));
        let b = Mac::random_local(&mut rand::rngs::StdRng::seed_from_u64(1));
        assert_eq!(a, b);
    }

    #[test]
    fn from_slice_takes_exactly_six_bytes() {
        assert_eq!(
            Mac::from_slice(&[0x0e, 0xbe, 0, 0, 1, 2]),
            Some(Mac([0x0e, 0xbe, 0, 0, 1, 2]))
        );
        assert_eq!(Mac::from_slice(&[0x0e, 0xbe, 0, 0, 1]), None);
        assert_eq!(Mac::from_slice(&[0; 8]), None);
        assert_eq!(
            format!("{:?}", Mac([0x0e, 0xbe, 0, 0, 1, 2])),
            "0e:be:00:00:01:02"
        );
    }
}
