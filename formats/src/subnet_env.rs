//! `subnet.env`: the file flanneld (and twilld) writes for the CNI plugin.
//!
//! This is the single parser/renderer of the format, shared by the daemon (writer, and reader at
//! startup for lease reuse) and the CNI plugin (reader). Format and order follow Flannel's
//! `WriteSubnetFile`:
//!
//! ```text
//! FLANNEL_NETWORK=10.244.0.0/16
//! FLANNEL_SUBNET=10.244.1.1/24
//! FLANNEL_IPV6_NETWORK=2001:cafe:42::/56
//! FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64
//! FLANNEL_MTU=1450
//! FLANNEL_IPMASQ=true
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::{Ipv4Net, Ipv6Net};

pub const FLANNEL_NETWORK: &str = "FLANNEL_NETWORK";
pub const FLANNEL_SUBNET: &str = "FLANNEL_SUBNET";
pub const FLANNEL_IPV6_NETWORK: &str = "FLANNEL_IPV6_NETWORK";
pub const FLANNEL_IPV6_SUBNET: &str = "FLANNEL_IPV6_SUBNET";
pub const FLANNEL_MTU: &str = "FLANNEL_MTU";
pub const FLANNEL_IPMASQ: &str = "FLANNEL_IPMASQ";

/// Contents of a `subnet.env` file. Every field is optional so partial files can be represented;
/// [`SubnetEnv::missing`] tells what a consumer such as the CNI plugin would reject.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`: the cluster network(s), network address form, deduplicated, in file order.
    pub networks: Vec<Ipv4Net>,
    /// `FLANNEL_SUBNET` exactly as written, e.g. `10.244.1.1/24` (host bits kept).
    pub subnet: Option<Ipv4Net>,
    /// `FLANNEL_IPV6_NETWORK`.
    pub ipv6_networks: Vec<Ipv6Net>,
    /// `FLANNEL_IPV6_SUBNET` exactly as written, e.g. `2001:cafe:42::1/64`.
    pub ipv6_subnet: Option<Ipv6Net>,
    /// `FLANNEL_MTU`.
    pub mtu: Option<u32>,
    /// `FLANNEL_IPMASQ`: `"true"` is true, any other value false (as Flannel reads it).
    pub ipmasq: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("line {line}: expected KEY=VALUE, got {text:?}")]
    MalformedLine { line: usize, text: String },
    #[error("line {line}: invalid {key} value {value:?}: {reason}")]
    InvalidValue {
        line: usize,
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("open {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<SubnetEnvError>,
    },
    #[error("failed to write {}: {op}: {source}", path.display())]
    Write {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
}

impl SubnetEnvError {
    /// True when the file does not exist (the daemon has not written it yet).
    pub fn is_not_found(&self) -> bool {
        matches!(self, SubnetEnvError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

fn push_unique<T: PartialEq>(v: &mut Vec<T>, item: T) {
    if !v.contains(&item) {
        v.push(item);
    }
}

fn ipv4_plus_one(ip: Ipv4Addr) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(ip).wrapping_add(1))
}

fn ipv6_plus_one(ip: Ipv6Addr) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(ip).wrapping_add(1))
}

/// Strip one pair of matching surrounding quotes (godotenv, which flanneld uses to read the file
/// back, accepts them).
fn unquote(v: &str) -> &str {
    let b = v.as_bytes();
    if b.len() >= 2 && (b[0] == b'"' || b[0] == b'\'') && b[b.len() - 1] == b[0] {
        &v[1..v.len() - 1]
    } else {
        v
    }
}

impl SubnetEnv {
    /// What twilld writes for its lease: `FLANNEL_SUBNET` is the lease's base address + 1 with
    /// the lease prefix length (`10.244.1.0/24` -> `10.244.1.1/24`), likewise for IPv6.
    pub fn for_lease(
        network: Option<Ipv4Net>,
        lease: Option<Ipv4Net>,
        ipv6_network: Option<Ipv6Net>,
        ipv6_lease: Option<Ipv6Net>,
        mtu: u32,
        ipmasq: bool,
    ) -> SubnetEnv {
        let subnet = lease.map(|l| {
            Ipv4Net::new(ipv4_plus_one(l.network()), l.prefix_len())
                .expect("prefix length comes from a valid Ipv4Net")
        });
        let ipv6_subnet = ipv6_lease.map(|l| {
            Ipv6Net::new(ipv6_plus_one(l.network()), l.prefix_len())
                .expect("prefix length comes from a valid Ipv6Net")
        });
        SubnetEnv {
            networks: network.map(|n| n.trunc()).into_iter().collect(),
            subnet,
            ipv6_networks: ipv6_network.map(|n| n.trunc()).into_iter().collect(),
            ipv6_subnet,
            mtu: Some(mtu),
            ipmasq: Some(ipmasq),
        }
    }

    /// Flannel's exact format and order, `KEY=value\n`, no quotes. Absent fields are omitted.
    pub fn render(&self) -> String {
        fn join<T: std::fmt::Display>(v: &[T]) -> String {
            v.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(",")
        }
        let mut out = String::new();
        if !self.networks.is_empty() {
            out.push_str(&format!("{FLANNEL_NETWORK}={}\n", join(&self.networks)));
        }
        if let Some(sn) = self.subnet {
            out.push_str(&format!("{FLANNEL_SUBNET}={sn}\n"));
        }
        if !self.ipv6_networks.is_empty() {
            out.push_str(&format!(
                "{FLANNEL_IPV6_NETWORK}={}\n",
                join(&self.ipv6_networks)
            ));
        }
        if let Some(sn) = self.ipv6_subnet {
            out.push_str(&format!("{FLANNEL_IPV6_SUBNET}={sn}\n"));
        }
        if let Some(mtu) = self.mtu {
            out.push_str(&format!("{FLANNEL_MTU}={mtu}\n"));
        }
        if let Some(m) = self.ipmasq {
            out.push_str(&format!("{FLANNEL_IPMASQ}={m}\n"));
        }
        out
    }

    /// Parse `KEY=VALUE` lines (split on the first `=`). Keys and values are trimmed, an
    /// `export ` prefix and one pair of surrounding quotes are tolerated, blank lines and `#`
    /// comments are skipped, unknown keys ignored, a repeated key overrides the earlier one.
    /// Network lists are comma separated.
    pub fn parse(text: &str) -> Result<SubnetEnv, SubnetEnvError> {
        let mut env = SubnetEnv::default();
        for (idx, raw) in text.lines().enumerate() {
            let line_no = idx + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(SubnetEnvError::MalformedLine {
                    line: line_no,
                    text: raw.to_string(),
                });
            };
            let key = key.trim();
            let key = key.strip_prefix("export ").map(str::trim).unwrap_or(key);
            let value = unquote(value.trim());
            let invalid = |key: &'static str, reason: String| SubnetEnvError::InvalidValue {
                line: line_no,
                key,
                value: value.to_string(),
                reason,
            };
            match key {
                FLANNEL_NETWORK => {
                    let mut nets = Vec::new();
                    for item in value.split(',') {
                        let n: Ipv4Net = item
                            .trim()
                            .parse()
                            .map_err(|e| invalid(FLANNEL_NETWORK, format!("{item:?}: {e}")))?;
                        push_unique(&mut nets, n.trunc());
                    }
                    env.networks = nets;
                }
                FLANNEL_IPV6_NETWORK => {
                    let mut nets = Vec::new();
                    for item in value.split(',') {
                        let n: Ipv6Net = item
                            .trim()
                            .parse()
                            .map_err(|e| invalid(FLANNEL_IPV6_NETWORK, format!("{item:?}: {e}")))?;
                        push_unique(&mut nets, n.trunc());
                    }
                    env.ipv6_networks = nets;
                }
                FLANNEL_SUBNET => {
                    env.subnet = Some(
                        value
                            .parse()
                            .map_err(|e| invalid(FLANNEL_SUBNET, format!("{e}")))?,
                    );
                }
                FLANNEL_IPV6_SUBNET => {
                    env.ipv6_subnet = Some(
                        value
                            .parse()
                            .map_err(|e| invalid(FLANNEL_IPV6_SUBNET, format!("{e}")))?,
                    );
                }
                FLANNEL_MTU => {
                    env.mtu = Some(
                        value
                            .parse::<u32>()
                            .map_err(|e| invalid(FLANNEL_MTU, format!("{e}")))?,
                    );
                }
                FLANNEL_IPMASQ => env.ipmasq = Some(value == "true"),
                _ => {}
            }
        }
        Ok(env)
    }

    /// Read and parse a file; errors name the path.
    pub fn read(path: &Path) -> Result<SubnetEnv, SubnetEnvError> {
        let text = fs::read_to_string(path).map_err(|source| SubnetEnvError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        SubnetEnv::parse(&text).map_err(|e| SubnetEnvError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Write atomically: parent directory created (0755), a temp file in the same directory
    /// written, fsynced and set to mode 0644 regardless of umask, renamed over `path`, then the
    /// directory fsynced. On any error the temp file is removed and an existing file is untouched.
    pub fn write_atomic(&self, path: &Path) -> Result<(), SubnetEnvError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let werr = |op: &'static str| {
            move |source: io::Error| SubnetEnvError::Write {
                path: path.to_path_buf(),
                op,
                source,
            }
        };
        let name = path
            .file_name()
            .ok_or_else(|| {
                werr("file name")(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "path has no file name",
                ))
            })?
            .to_string_lossy()
            .into_owned();
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(werr("create parent directory"))?;

        let tmp = dir.join(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)
                .map_err(werr("create temp file"))?;
            f.set_permissions(fs::Permissions::from_mode(0o644))
                .map_err(werr("chmod temp file"))?;
            f.write_all(self.render().as_bytes())
                .map_err(werr("write temp file"))?;
            f.sync_all().map_err(werr("fsync temp file"))?;
            drop(f);
            fs::rename(&tmp, path).map_err(werr("rename temp file"))?;
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
            return result;
        }
        // The rename happened; make it durable.
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(werr("fsync directory"))
    }

    /// `FLANNEL_SUBNET`'s network (`10.244.1.1/24` -> `10.244.1.0/24`), as the CNI plugin uses it.
    pub fn subnet_network(&self) -> Option<Ipv4Net> {
        self.subnet.map(|s| s.trunc())
    }

    /// `FLANNEL_IPV6_SUBNET`'s network (`2001:cafe:42::1/64` -> `2001:cafe:42::/64`).
    pub fn ipv6_subnet_network(&self) -> Option<Ipv6Net> {
        self.ipv6_subnet.map(|s| s.trunc())
    }

    /// Keys a consumer needs but the file lacks, in Flannel's CNI plugin order and wording:
    /// a network of either family, a subnet of either family, MTU and IPMASQ. Empty when complete.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if self.networks.is_empty() && self.ipv6_networks.is_empty() {
            m.extend([FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK]);
        }
        if self.subnet.is_none() && self.ipv6_subnet.is_none() {
            m.extend([FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET]);
        }
        if self.mtu.is_none() {
            m.push(FLANNEL_MTU);
        }
        if self.ipmasq.is_none() {
            m.push(FLANNEL_IPMASQ);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn v4(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn v6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    fn tempdir(tag: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "twcni-senv-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn golden_v4_only() {
        let env = SubnetEnv::for_lease(
            Some(v4("10.244.0.0/16")),
            Some(v4("10.244.1.0/24")),
            None,
            None,
            1450,
            true,
        );
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(env.subnet_network(), Some(v4("10.244.1.0/24")));
        assert_eq!(env.ipv6_subnet_network(), None);
        assert!(env.missing().is_empty());
    }

    #[test]
    fn golden_v6_only() {
        let env = SubnetEnv::for_lease(
            None,
            None,
            Some(v6("2001:cafe:42::/56")),
            Some(v6("2001:cafe:42::/64")),
            1430,
            false,
        );
        assert_eq!(
            env.render(),
            "FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n"
        );
        assert_eq!(env.ipv6_subnet_network(), Some(v6("2001:cafe:42::/64")));
        assert!(env.missing().is_empty());
    }

    #[test]
    fn golden_dual_stack() {
        let env = SubnetEnv::for_lease(
            Some(v4("10.244.0.0/16")),
            Some(v4("10.244.7.0/24")),
            Some(v6("2001:cafe:42::/56")),
            Some(v6("2001:cafe:42:7::/64")),
            1450,
            true,
        );
        let text = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42:7::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
        assert_eq!(env.render(), text);
        assert_eq!(SubnetEnv::parse(text).unwrap(), env);
    }

    #[test]
    fn for_lease_truncates_networks_and_handles_host_bits() {
        let env = SubnetEnv::for_lease(
            Some(v4("10.244.3.4/16")),
            Some(v4("10.244.1.9/24")),
            None,
            None,
            1500,
            false,
        );
        assert_eq!(env.networks, vec![v4("10.244.0.0/16")]);
        assert_eq!(env.subnet, Some(v4("10.244.1.1/24")));
    }

    #[test]
    fn parse_round_trip() {
        for env in [
            SubnetEnv::default(),
            SubnetEnv {
                networks: vec![v4("10.244.0.0/16"), v4("10.10.0.0/16")],
                subnet: Some(v4("10.244.1.1/24")),
                ipv6_networks: vec![v6("fd00::/48"), v6("fd01::/48")],
                ipv6_subnet: Some(v6("fd00:0:0:1::1/64")),
                mtu: Some(9000),
                ipmasq: Some(false),
            },
            SubnetEnv {
                mtu: Some(1450),
                ..Default::default()
            },
        ] {
            assert_eq!(SubnetEnv::parse(&env.render()).unwrap(), env);
        }
    }

    #[test]
    fn subnet_keeps_host_bits() {
        let env = SubnetEnv::parse("FLANNEL_SUBNET=10.244.1.1/24\n").unwrap();
        assert_eq!(env.subnet, Some(v4("10.244.1.1/24")));
        assert_eq!(env.subnet.unwrap().to_string(), "10.244.1.1/24");
        assert_eq!(env.subnet_network().unwrap().to_string(), "10.244.1.0/24");
    }

    #[test]
    fn comma_lists_dedup_and_truncate() {
        let env = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16,10.10.0.0/16, 10.244.0.0/16,10.244.5.5/16\nFLANNEL_IPV6_NETWORK=fd00::/48,fd00::1/48,fd01::/48\n",
        )
        .unwrap();
        assert_eq!(env.networks, vec![v4("10.244.0.0/16"), v4("10.10.0.0/16")]);
        assert_eq!(env.ipv6_networks, vec![v6("fd00::/48"), v6("fd01::/48")]);
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.244.0.0/16,10.10.0.0/16\nFLANNEL_IPV6_NETWORK=fd00::/48,fd01::/48\n"
        );
    }

    #[test]
    fn lenient_lines() {
        let text = "# written by flanneld\n\n  \nFOO=bar=baz\nexport FLANNEL_MTU = 1400 \r\nFLANNEL_SUBNET=\"10.1.2.1/24\"\nFLANNEL_IPMASQ=True\nFLANNEL_MTU=1450\n";
        let env = SubnetEnv::parse(text).unwrap();
        assert_eq!(env.mtu, Some(1450), "later key wins");
        assert_eq!(env.subnet, Some(v4("10.1.2.1/24")));
        assert_eq!(env.ipmasq, Some(false), "only exactly \"true\" is true");
        assert_eq!(env.missing(), vec![FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK]);
        assert_eq!(
            SubnetEnv::parse("FLANNEL_IPMASQ=true").unwrap().ipmasq,
            Some(true)
        );
    }

    #[test]
    fn malformed_lines_name_key_and_value() {
        let cases = [
            (
                "FLANNEL_NETWORK=10.244.0.0/16\ngarbage\n",
                "line 2",
                "garbage",
            ),
            (
                "FLANNEL_NETWORK=10.244.0.0\n",
                "FLANNEL_NETWORK",
                "10.244.0.0",
            ),
            (
                "FLANNEL_NETWORK=10.244.0.0/16,x\n",
                "FLANNEL_NETWORK",
                "\"x\"",
            ),
            ("FLANNEL_NETWORK=\n", "FLANNEL_NETWORK", "\"\""),
            (
                "FLANNEL_SUBNET=10.244.1.1/33\n",
                "FLANNEL_SUBNET",
                "10.244.1.1/33",
            ),
            (
                "FLANNEL_SUBNET=fd00::1/64\n",
                "FLANNEL_SUBNET",
                "fd00::1/64",
            ),
            (
                "FLANNEL_IPV6_NETWORK=10.0.0.0/8\n",
                "FLANNEL_IPV6_NETWORK",
                "10.0.0.0/8",
            ),
            ("FLANNEL_IPV6_SUBNET=zz\n", "FLANNEL_IPV6_SUBNET", "zz"),
            ("FLANNEL_MTU=-1\n", "FLANNEL_MTU", "-1"),
            ("FLANNEL_MTU=99999999999\n", "FLANNEL_MTU", "99999999999"),
            ("FLANNEL_MTU=abc\n", "FLANNEL_MTU", "abc"),
        ];
        for (text, key, value) in cases {
            let err = SubnetEnv::parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
            assert!(err.contains(value), "{text:?}: {err}");
        }
    }

    #[test]
    fn missing_lists_flannel_order() {
        assert_eq!(
            SubnetEnv::default().missing(),
            vec![
                FLANNEL_NETWORK,
                FLANNEL_IPV6_NETWORK,
                FLANNEL_SUBNET,
                FLANNEL_IPV6_SUBNET,
                FLANNEL_MTU,
                FLANNEL_IPMASQ
            ]
        );
        let v6only = SubnetEnv::parse("FLANNEL_IPV6_NETWORK=fd00::/48\nFLANNEL_IPV6_SUBNET=fd00::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n").unwrap();
        assert!(v6only.missing().is_empty());
    }

    #[test]
    fn write_atomic_creates_dir_mode_and_content() {
        let d = tempdir("write");
        let path = d.join("run/flannel/subnet.env");
        let env = SubnetEnv::for_lease(
            Some(v4("10.244.0.0/16")),
            Some(v4("10.244.1.0/24")),
            None,
            None,
            1450,
            true,
        );
        // A restrictive umask must not leak into the file mode.
        let old = set_umask(0o077);
        let r = env.write_atomic(&path);
        set_umask(old);
        r.unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), env.render());
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o644);
        assert_eq!(SubnetEnv::read(&path).unwrap(), env);
        // Overwrite.
        let env2 = SubnetEnv {
            mtu: Some(1400),
            ..env
        };
        env2.write_atomic(&path).unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap(), env2);
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("subnet.env")]);
        fs::remove_dir_all(&d).unwrap();
    }

    fn set_umask(mask: u32) -> u32 {
        use nix::sys::stat::{umask, Mode};
        umask(Mode::from_bits_truncate(mask)).bits()
    }

    #[test]
    fn write_atomic_error_leaves_no_temp_and_old_file() {
        let d = tempdir("err");
        // Parent is a regular file: creating the directory fails (works even as root).
        let blocker = d.join("blocker");
        fs::write(&blocker, "x").unwrap();
        let env = SubnetEnv {
            mtu: Some(1),
            ..Default::default()
        };
        let err = env.write_atomic(&blocker.join("subnet.env")).unwrap_err();
        assert!(err.to_string().contains("blocker"), "{err}");
        assert!(matches!(err, SubnetEnvError::Write { .. }));

        // Target is a non-empty directory: rename fails after the temp file was written.
        let target = d.join("subnet.env");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), "old").unwrap();
        let err = env.write_atomic(&target).unwrap_err();
        assert!(err.to_string().contains("rename"), "{err}");
        let mut names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec!["blocker", "subnet.env"], "no temp file left");
        assert_eq!(fs::read_to_string(target.join("keep")).unwrap(), "old");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn read_errors_name_path() {
        let d = tempdir("read");
        let p = d.join("nope.env");
        let err = SubnetEnv::read(&p).unwrap_err();
        assert!(err.is_not_found());
        assert!(err.to_string().contains("nope.env"), "{err}");
        assert!(err.to_string().contains("No such file"), "{err}");
        fs::write(&p, "FLANNEL_MTU=x\n").unwrap();
        let err = SubnetEnv::read(&p).unwrap_err();
        assert!(!err.is_not_found());
        let s = err.to_string();
        assert!(s.contains("nope.env") && s.contains("FLANNEL_MTU"), "{s}");
        fs::remove_dir_all(&d).unwrap();
    }
}
