//! Flannel's iptables traffic manager (`EnableNFTables` false or absent, the default):
//! masquerade rules in `nat FLANNEL-POSTRTG`, forward rules in `filter FLANNEL-FWD`, each
//! chain entered by one jump at the end of `POSTROUTING` / `FORWARD`, rules commented
//! `flanneld masq` / `flanneld forward`, for IPv4 (iptables) and IPv6 (ip6tables).
//!
//! The rule sets are pure ([`masq_rules`], [`forward_rules`], [`restore_payload`],
//! [`removal_payload`]) and golden-tested against Flannel's `iptables-save` text. The effector
//! runs `iptables-restore --noflush --wait` / `iptables -w -C` as child processes with a
//! timeout (a hung binary or a held xtables lock cannot stall the daemon), on tokio's process
//! support, so nothing here blocks the async runtime.
//!
//! One transaction per family and table makes a chain hold exactly Flannel's rules: declaring
//! the chain (`:FLANNEL-POSTRTG - [0:0]`) creates it, or with `--noflush` flushes it, and the
//! jump is deleted (when present) and appended again, as Flannel's `-D` before `-A` does. Rules
//! of a previous Network or Subnet therefore cannot survive an apply: Flannel deletes them by
//! reading the previous values from subnet.env, which the flush makes unnecessary here.

use std::process::Stdio;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Flannel's NAT chain (table `nat`).
pub const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
/// Flannel's forward chain (table `filter`).
pub const FORWARD_CHAIN: &str = "FLANNEL-FWD";
const MASQ_COMMENT: &str = "flanneld masq";
const FORWARD_COMMENT: &str = "flanneld forward";
/// kube-proxy's masquerade mark (Flannel's `trafficmngr.KubeProxyMark`): traffic kube-proxy
/// marked is left for kube-proxy's own masquerade rule.
const KUBE_PROXY_MARK: &str = "0x4000/0x4000";

/// How long one iptables process may run. `--wait` waits for the xtables lock without a
/// bound; past this the child is killed and the operation reported failed (retried on the
/// next resync).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// An address family, with its binaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    /// `iptables` / `ip6tables`.
    pub fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    pub fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    pub fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    fn multicast(self) -> &'static str {
        match self {
            Family::V4 => "224.0.0.0/4",
            Family::V6 => "ff00::/8",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// One of Flannel's two chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    /// `nat FLANNEL-POSTRTG`, entered from `POSTROUTING` (`--ip-masq`).
    Masq,
    /// `filter FLANNEL-FWD`, entered from `FORWARD` (`--iptables-forward-rules`).
    Forward,
}

impl Part {
    pub const ALL: [Part; 2] = [Part::Masq, Part::Forward];

    pub fn table(self) -> &'static str {
        match self {
            Part::Masq => "nat",
            Part::Forward => "filter",
        }
    }

    pub fn chain(self) -> &'static str {
        match self {
            Part::Masq => MASQ_CHAIN,
            Part::Forward => FORWARD_CHAIN,
        }
    }

    /// The built-in chain holding the jump into [`Part::chain`].
    pub fn parent(self) -> &'static str {
        match self {
            Part::Masq => "POSTROUTING",
            Part::Forward => "FORWARD",
        }
    }
}

/// One rule: Flannel's `IPTablesRule` (table, chain, and the spec that follows `-A <chain>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub table: &'static str,
    pub chain: &'static str,
    pub spec: Vec<String>,
}

impl Rule {
    fn new(table: &'static str, chain: &'static str, spec: &[&str]) -> Rule {
        Rule {
            table,
            chain,
            spec: spec.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The rule as `iptables-save` prints it and `iptables-restore` reads it, with `op`
    /// (`-A` or `-D`): the comment is quoted, as both tools write it.
    pub fn line(&self, op: &str) -> String {
        let mut s = format!("{op} {}", self.chain);
        let mut after_comment = false;
        for word in &self.spec {
            s.push(' ');
            if after_comment {
                s.push('"');
                s.push_str(word);
                s.push('"');
            } else {
                s.push_str(word);
            }
            after_comment = word == "--comment";
        }
        s
    }

    /// Arguments of `iptables` that check this rule exists (`-w -t T -C CHAIN spec`): one word
    /// per argument, so the comment needs no quoting.
    pub fn check_args(&self) -> Vec<String> {
        let mut args = vec![
            "-w".to_string(),
            "-t".to_string(),
            self.table.to_string(),
            "-C".to_string(),
            self.chain.to_string(),
        ];
        args.extend(self.spec.iter().cloned());
        args
    }

    /// Whether this is the jump from the built-in chain into Flannel's chain.
    fn is_jump(&self) -> bool {
        self.chain == "POSTROUTING" || self.chain == "FORWARD"
    }
}

/// Flannel's `masqRules` / `masqIP6Rules`, in its order: the jump from `POSTROUTING`, then
/// `FLANNEL-POSTRTG` (keep kube-proxy's marked traffic and pod-to-pod traffic, masquerade pods
/// leaving the Network except to multicast, and hosts entering it).
pub fn masq_rules(network: IpNet, subnet: IpNet, random_fully: bool) -> Vec<Rule> {
    let family = Family::of(&network);
    let n = network.trunc().to_string();
    let p = subnet.trunc().to_string();
    let masquerade: &[&str] = if random_fully {
        &["MASQUERADE", "--random-fully"]
    } else {
        &["MASQUERADE"]
    };
    fn with<'a>(matches: &[&'a str], target: &[&'a str]) -> Vec<&'a str> {
        let mut v = matches.to_vec();
        v.extend(["-m", "comment", "--comment", MASQ_COMMENT, "-j"]);
        v.extend(target);
        v
    }
    vec![
        Rule::new("nat", "POSTROUTING", &with(&[], &[MASQ_CHAIN])),
        Rule::new(
            "nat",
            MASQ_CHAIN,
            &with(&["-m", "mark", "--mark", KUBE_PROXY_MARK], &["RETURN"]),
        ),
        Rule::new("nat", MASQ_CHAIN, &with(&["-s", &p, "-d", &n], &["RETURN"])),
        Rule::new("nat", MASQ_CHAIN, &with(&["-s", &n, "-d", &p], &["RETURN"])),
        Rule::new(
            "nat",
            MASQ_CHAIN,
            &with(&["!", "-s", &n, "-d", &p], &["RETURN"]),
        ),
        Rule::new(
            "nat",
            MASQ_CHAIN,
            &with(&["-s", &n, "!", "-d", family.multicast()], masquerade),
        ),
        Rule::new(
            "nat",
            MASQ_CHAIN,
            &with(&["!", "-s", &n, "-d", &n], masquerade),
        ),
    ]
}

/// Flannel's `forwardRules`: the jump from `FORWARD`, then accept from and to the Network.
pub fn forward_rules(network: IpNet) -> Vec<Rule> {
    let n = network.trunc().to_string();
    let c = FORWARD_COMMENT;
    vec![
        Rule::new(
            "filter",
            "FORWARD",
            &["-m", "comment", "--comment", c, "-j", FORWARD_CHAIN],
        ),
        Rule::new(
            "filter",
            FORWARD_CHAIN,
            &["-s", &n, "-m", "comment", "--comment", c, "-j", "ACCEPT"],
        ),
        Rule::new(
            "filter",
            FORWARD_CHAIN,
            &["-d", &n, "-m", "comment", "--comment", c, "-j", "ACCEPT"],
        ),
    ]
}

/// What one family holds in iptables mode: each wanted part with its rules (jump first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyRules {
    pub family: Family,
    pub parts: Vec<(Part, Vec<Rule>)>,
}

impl FamilyRules {
    /// The rules of `network` (this node's lease `subnet`): masquerade when `masquerade`,
    /// forward accepts when `forward`.
    pub fn new(
        network: IpNet,
        subnet: IpNet,
        masquerade: bool,
        forward: bool,
        random_fully: bool,
    ) -> FamilyRules {
        let mut parts = Vec::new();
        if masquerade {
            parts.push((Part::Masq, masq_rules(network, subnet, random_fully)));
        }
        if forward {
            parts.push((Part::Forward, forward_rules(network)));
        }
        FamilyRules {
            family: Family::of(&network),
            parts,
        }
    }

    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.parts.iter().flat_map(|(_, r)| r.iter())
    }

    /// The parts this family does not want (to be removed if a previous run left them).
    pub fn unwanted(&self) -> Vec<Part> {
        Part::ALL
            .into_iter()
            .filter(|p| !self.parts.iter().any(|(q, _)| q == p))
            .collect()
    }
}

/// `iptables-restore --noflush` input that makes every part's chain hold exactly its rules,
/// one `*table` block per part (nat before filter, as Flannel applies masq before forward).
/// `jump_present(part)` says whether the part's jump is in the built-in chain now; if it is it
/// is deleted before being appended, so the jump ends up last in the chain, as Flannel's
/// `-D` before `-A` leaves it.
pub fn restore_payload(rules: &FamilyRules, jump_present: impl Fn(Part) -> bool) -> String {
    let mut s = String::new();
    for (part, part_rules) in &rules.parts {
        s += &format!("*{}\n:{} - [0:0]\n", part.table(), part.chain());
        for rule in part_rules {
            if rule.is_jump() && jump_present(*part) {
                s += &rule.line("-D");
                s.push('\n');
            }
            s += &rule.line("-A");
            s.push('\n');
        }
        s += "COMMIT\n";
    }
    s
}

/// `iptables-restore --noflush` input that removes `part`'s chain and every rule that jumps to
/// it, from the current `iptables-save -t <table>` text; `None` when neither is there.
pub fn removal_payload(part: Part, save: &str) -> Option<String> {
    let chain = part.chain();
    let declared = save
        .lines()
        .any(|l| l.strip_prefix(':').and_then(|r| r.split(' ').next()) == Some(chain));
    let jumps: Vec<&str> = save
        .lines()
        .filter(|l| l.starts_with("-A ") && jumps_to(l, chain))
        .filter(|l| l.split(' ').nth(1) != Some(chain))
        .collect();
    if !declared && jumps.is_empty() {
        return None;
    }
    let mut s = format!("*{}\n", part.table());
    for j in jumps {
        s += "-D";
        s += &j[2..];
        s.push('\n');
    }
    if declared {
        s += &format!("-F {chain}\n-X {chain}\n");
    }
    s += "COMMIT\n";
    Some(s)
}

/// Whether an `iptables-save` rule line jumps or goes to `chain`.
fn jumps_to(line: &str, chain: &str) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .any(|w| matches!(w[0], "-j" | "-g") && w[1] == chain)
}

/// Version `(major, minor, patch)` from `iptables --version` (`iptables v1.8.9 (nf_tables)`).
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut it = v.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .ok()
    });
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

/// What this family's iptables supports: `--random-fully` and `iptables-restore --wait` both
/// came with iptables 1.6.2 (go-iptables' `HasRandomFully`, Flannel's `ipTablesHasWaitSupport`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Support {
    pub random_fully: bool,
    pub restore_wait: bool,
}

impl Support {
    pub fn of_version(v: (u32, u32, u32)) -> Support {
        let modern = v >= (1, 6, 2);
        Support {
            random_fully: modern,
            restore_wait: modern,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("{command}: not found (iptables mode, EnableNFTables false or absent in the network config, needs the iptables package)")]
    NotInstalled { command: String },
    #[error("{command}: {error}")]
    Io {
        command: String,
        error: std::io::Error,
    },
    #[error("{command}: no answer after {after:?}; killed")]
    TimedOut { command: String, after: Duration },
    #[error("{command}: {status}: {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{command}: cannot read a version in {output:?}")]
    Version { command: String, output: String },
}

/// What a finished child printed.
struct Finished {
    /// The command line, for errors.
    command: String,
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    /// The error for a command that did not succeed.
    fn failed(self) -> IptablesError {
        IptablesError::Failed {
            command: self.command,
            status: self.status,
            stderr: self.stderr,
        }
    }
}

/// Runs `program args` with `stdin`, killed after [`COMMAND_TIMEOUT`].
async fn run(
    program: &str,
    args: &[String],
    stdin: Option<&str>,
) -> Result<Finished, IptablesError> {
    run_within(COMMAND_TIMEOUT, program, args, stdin).await
}

async fn run_within(
    timeout: Duration,
    program: &str,
    args: &[String],
    stdin: Option<&str>,
) -> Result<Finished, IptablesError> {
    let command = std::iter::once(program.to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                IptablesError::NotInstalled {
                    command: program.to_string(),
                }
            } else {
                IptablesError::Io {
                    command: command.clone(),
                    error,
                }
            }
        })?;
    let io = |error| IptablesError::Io {
        command: command.clone(),
        error,
    };
    let work = async {
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes()).await.map_err(io)?;
            drop(pipe);
        }
        child.wait_with_output().await.map_err(io)
    };
    let out =
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| IptablesError::TimedOut {
                command: command.clone(),
                after: timeout,
            })??;
    Ok(Finished {
        command,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Runs a command that must succeed, returning its stdout.
async fn run_ok(
    program: &str,
    args: &[String],
    stdin: Option<&str>,
) -> Result<String, IptablesError> {
    let out = run(program, args, stdin).await?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(out.failed())
    }
}

/// Probes `iptables --version` / `ip6tables --version`.
pub async fn probe(family: Family) -> Result<Support, IptablesError> {
    let out = run_ok(family.iptables(), &["--version".to_string()], None).await?;
    let v = parse_version(&out).ok_or_else(|| IptablesError::Version {
        command: format!("{} --version", family.iptables()),
        output: out.trim().to_string(),
    })?;
    Ok(Support::of_version(v))
}

/// Whether `rule` is in place (`iptables -w -C`). Exit status 1 is iptables' "no such rule
/// or chain"; status 2 naming a missing chain is a jump whose target chain is not there (so
/// the rule cannot be either): "Chain '...' does not exist" from the nf_tables backend,
/// "Couldn't load target" from the legacy one.
pub async fn rule_present(family: Family, rule: &Rule) -> Result<bool, IptablesError> {
    let args = rule.check_args();
    let out = run(family.iptables(), &args, None).await?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        Some(2)
            if out.stderr.contains("does not exist")
                || out.stderr.contains("Couldn't load target") =>
        {
            Ok(false)
        }
        _ => Err(out.failed()),
    }
}

/// The rules of `rules` that are not in place, in order.
pub async fn missing(rules: &FamilyRules) -> Result<Vec<Rule>, IptablesError> {
    let mut out = Vec::new();
    for rule in rules.rules() {
        if !rule_present(rules.family, rule).await? {
            out.push(rule.clone());
        }
    }
    Ok(out)
}

fn restore_args(support: Support) -> Vec<String> {
    let mut args = vec!["--noflush".to_string()];
    if support.restore_wait {
        args.push("--wait".to_string());
    }
    args
}

/// Makes the family's chains hold exactly `rules` (see [`restore_payload`]).
pub async fn apply(rules: &FamilyRules, support: Support) -> Result<(), IptablesError> {
    let mut jumps = Vec::new();
    for (part, part_rules) in &rules.parts {
        if let Some(jump) = part_rules.iter().find(|r| r.is_jump()) {
            if rule_present(rules.family, jump).await? {
                jumps.push(*part);
            }
        }
    }
    let payload = restore_payload(rules, |p| jumps.contains(&p));
    run_ok(
        rules.family.restore(),
        &restore_args(support),
        Some(&payload),
    )
    .await
    .map(|_| ())
}

/// Removes `parts` (chain and the jumps into it) from `family`. Returns the parts that were
/// there. A family whose iptables is not installed has nothing to remove.
pub async fn remove(family: Family, parts: &[Part]) -> Result<Vec<Part>, IptablesError> {
    let mut removed = Vec::new();
    let mut support = None;
    for &part in parts {
        let args = vec!["-t".to_string(), part.table().to_string()];
        let save = match run_ok(family.save(), &args, None).await {
            Ok(s) => s,
            Err(IptablesError::NotInstalled { .. }) => return Ok(removed),
            Err(e) => return Err(e),
        };
        if let Some(payload) = removal_payload(part, &save) {
            let support = match support {
                Some(s) => s,
                None => *support.insert(probe(family).await?),
            };
            run_ok(family.restore(), &restore_args(support), Some(&payload)).await?;
            removed.push(part);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn save_lines(rules: &[Rule]) -> String {
        rules
            .iter()
            .map(|r| r.line("-A") + "\n")
            .collect::<String>()
    }

    /// Flannel's rules as its e2e/rules.go expects them in `iptables-save`, byte for byte.
    #[test]
    fn masq_rules_are_flannels_iptables_save_text() {
        let rules = masq_rules(net("10.244.0.0/16"), net("10.244.1.1/24"), true);
        assert_eq!(
            save_lines(&rules),
            r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
"#
        );
    }

    #[test]
    fn forward_rules_are_flannels_iptables_save_text() {
        assert_eq!(
            save_lines(&forward_rules(net("10.244.0.0/16"))),
            r#"-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
"#
        );
    }

    #[test]
    fn ipv6_uses_ff00_multicast_and_random_fully_follows_support() {
        let rules = masq_rules(net("fd00:42::/56"), net("fd00:42:0:1::1/64"), false);
        let text = save_lines(&rules);
        assert!(text.contains(
            "-A FLANNEL-POSTRTG -s fd00:42::/56 ! -d ff00::/8 -m comment --comment \"flanneld masq\" -j MASQUERADE\n"
        ));
        assert!(text.contains("-A FLANNEL-POSTRTG -s fd00:42:0:1::/64 -d fd00:42::/56 "));
        assert!(!text.contains("--random-fully"));
    }

    #[test]
    fn check_args_are_one_word_per_argument() {
        let rules = forward_rules(net("10.244.0.0/16"));
        assert_eq!(
            rules[1].check_args(),
            [
                "-w",
                "-t",
                "filter",
                "-C",
                "FLANNEL-FWD",
                "-s",
                "10.244.0.0/16",
                "-m",
                "comment",
                "--comment",
                "flanneld forward",
                "-j",
                "ACCEPT"
            ]
        );
    }

    #[test]
    fn restore_payload_declares_chains_and_moves_existing_jumps_last() {
        let rules = FamilyRules::new(net("10.244.0.0/16"), net("10.244.1.0/24"), true, true, true);
        let payload = restore_payload(&rules, |p| p == Part::Masq);
        let golden = r#"*nat
:FLANNEL-POSTRTG - [0:0]
-D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
COMMIT
*filter
:FLANNEL-FWD - [0:0]
-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
COMMIT
"#;
        assert_eq!(payload, golden);
        assert_eq!(rules.rules().count(), 10);
        assert!(rules.unwanted().is_empty());
    }

    #[test]
    fn parts_follow_flags() {
        let n = net("10.244.0.0/16");
        let s = net("10.244.1.0/24");
        let only_forward = FamilyRules::new(n, s, false, true, true);
        assert_eq!(only_forward.unwanted(), [Part::Masq]);
        let payload = restore_payload(&only_forward, |_| false);
        assert!(payload.starts_with("*filter\n") && !payload.contains("nat"));
        let nothing = FamilyRules::new(n, s, false, false, true);
        assert_eq!(nothing.unwanted(), Part::ALL);
        assert_eq!(restore_payload(&nothing, |_| false), "");
    }

    #[test]
    fn removal_deletes_every_jump_then_the_chain() {
        let save = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Thu Dec  3 05:34:18 2026
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FLANNEL-POSTRTG - [0:0]
:KUBE-POSTROUTING - [0:0]
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
COMMIT
"#;
        assert_eq!(
            removal_payload(Part::Masq, save).unwrap(),
            r#"*nat
-D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-F FLANNEL-POSTRTG
-X FLANNEL-POSTRTG
COMMIT
"#
        );
        // KUBE-POSTROUTING is not Flannel's; a table without Flannel's chain needs nothing.
        assert_eq!(removal_payload(Part::Forward, save), None);
        assert_eq!(
            removal_payload(Part::Masq, "*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"),
            None
        );
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_hung_command_is_killed_and_named() {
        let started = std::time::Instant::now();
        let err = block_on(run_within(
            Duration::from_millis(200),
            "sleep",
            &["30".to_string()],
            None,
        ))
        .err()
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(20), "not killed");
        assert_eq!(err.to_string(), "sleep 30: no answer after 200ms; killed");
    }

    #[test]
    fn a_missing_binary_names_the_package() {
        let err = block_on(run("twill-no-such-iptables", &[], None))
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "twill-no-such-iptables: not found (iptables mode, EnableNFTables false or absent in the network config, needs the iptables package)"
        );
    }

    #[test]
    fn a_failure_names_the_command_and_its_stderr() {
        let err = block_on(run_ok(
            "sh",
            &["-c".to_string(), "cat >&2; exit 3".to_string()],
            Some("iptables-restore: line 2 failed\n"),
        ))
        .err()
        .unwrap();
        assert_eq!(
            err.to_string(),
            "sh -c cat >&2; exit 3: exit status: 3: iptables-restore: line 2 failed"
        );
    }

    #[test]
    fn versions() {
        assert_eq!(
            parse_version("iptables v1.8.9 (nf_tables)\n"),
            Some((1, 8, 9))
        );
        assert_eq!(parse_version("ip6tables v1.6.1"), Some((1, 6, 1)));
        assert_eq!(parse_version("iptables v1.8"), Some((1, 8, 0)));
        assert_eq!(parse_version("command not understood"), None);
        assert!(!Support::of_version((1, 6, 1)).random_fully);
        assert!(Support::of_version((1, 6, 2)).random_fully);
        assert!(Support::of_version((1, 8, 9)).restore_wait);
    }
}
