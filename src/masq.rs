//! IP masquerade and forward rules in Flannel's nftables layout: tables `ip flannel-ipv4`
//! and `ip6 flannel-ipv6`, chains `postrtg` and `forward`. Each table is written in nft's text
//! syntax, not JSON, because nft 1.0.x drops table and chain comments given in JSON and the
//! listing must read exactly like Flannel's. Every chain is flushed and refilled in the same
//! transaction, so rules for a previous subnet vanish and a half-applied set never exists; a
//! chain the flags no longer ask for is deleted in it.
//!
//! The effectors are async (nft runs on the blocking pool, [`crate::nft::off_runtime`]) and
//! take the runner, so unit tests drive them with a recording fake.

use ipnet::IpNet;

use crate::iptables::Family;
use crate::nft::{off_runtime, NftError, NftRunner, SharedNft};

/// What the rules are built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasqInput {
    /// The flannel Network of this family.
    pub network: IpNet,
    /// This node's lease of this family.
    pub subnet: IpNet,
    /// `--ip-masq`: the postrtg chain.
    pub masquerade: bool,
    /// `--ip-masq-fully-random-disable` not given and the kernel supports it.
    pub fully_random: bool,
    /// `--iptables-forward-rules`: the forward chain.
    pub forward: bool,
}

fn family_names(net: &IpNet) -> (&'static str, &'static str, &'static str, &'static str) {
    match net {
        IpNet::V4(_) => ("ip", "flannel-ipv4", "ip", "224.0.0.0/4"),
        IpNet::V6(_) => ("ip6", "flannel-ipv6", "ip6", "ff00::/8"),
    }
}

/// The transaction that makes the table hold exactly Flannel's rules. Pure.
pub fn ruleset(input: &MasqInput) -> String {
    let (family, table, proto, multicast) = family_names(&input.network);
    let n = input.network.trunc();
    let p = input.subnet.trunc();
    let random = if input.fully_random {
        " fully-random"
    } else {
        ""
    };
    let mut s = format!("add table {family} {table} {{ comment \"rules for {table}\" ; }}\n");
    if input.masquerade {
        let chain = format!("{family} {table} postrtg");
        s += &format!(
            "add chain {chain} {{ type nat hook postrouting priority srcnat ; policy accept ; comment \"chain to manage traffic masquerading by flannel\" ; }}\n"
        );
        s += &format!("flush chain {chain}\n");
        // Flannel's order: keep marked (kube-proxy) traffic and pod-to-pod traffic
        // unmasqueraded, masquerade pods leaving the network and hosts entering it.
        s += &format!("add rule {chain} meta mark 0x4000 return\n");
        s += &format!("add rule {chain} {proto} saddr {p} {proto} daddr {n} return\n");
        s += &format!("add rule {chain} {proto} saddr {n} {proto} daddr {p} return\n");
        s += &format!("add rule {chain} {proto} saddr != {p} {proto} daddr {n} return\n");
        s += &format!(
            "add rule {chain} {proto} saddr {n} {proto} daddr != {multicast} masquerade{random}\n"
        );
        s += &format!(
            "add rule {chain} {proto} saddr != {n} {proto} daddr {n} masquerade{random}\n"
        );
    }
    if input.forward {
        let chain = format!("{family} {table} forward");
        s += &format!(
            "add chain {chain} {{ type filter hook forward priority filter ; policy accept ; comment \"chain to accept flannel traffic\" ; }}\n"
        );
        s += &format!("flush chain {chain}\n");
        s += &format!("add rule {chain} {proto} saddr {n} accept\n");
        s += &format!("add rule {chain} {proto} daddr {n} accept\n");
    }
    // A chain the flags no longer ask for goes in the same transaction (added first, so that
    // deleting it cannot fail when it is not there).
    for (wanted, name, hook) in [
        (
            input.masquerade,
            "postrtg",
            "type nat hook postrouting priority srcnat",
        ),
        (
            input.forward,
            "forward",
            "type filter hook forward priority filter",
        ),
    ] {
        if !wanted {
            let chain = format!("{family} {table} {name}");
            s += &format!(
                "add chain {chain} {{ {hook} ; }}\nflush chain {chain}\ndelete chain {chain}\n"
            );
        }
    }
    s
}

/// Number of rules [`ruleset`] puts in the table, to detect drift cheaply.
pub fn rule_count(input: &MasqInput) -> usize {
    usize::from(input.masquerade) * 6 + usize::from(input.forward) * 2
}

/// Whether this kernel and nft accept `masquerade fully-random` (Flannel probes the same way,
/// with a check-only transaction that changes nothing).
pub async fn fully_random_supported(nft: &SharedNft) -> bool {
    off_runtime(nft, |n| {
        n.check(
            "add table ip twill-masq-probe\nadd chain ip twill-masq-probe masqueradeTest { type nat hook postrouting priority srcnat ; }\nadd rule ip twill-masq-probe masqueradeTest masquerade fully-random\n",
        )
    })
    .await
    .is_ok()
}

/// Applies the rules of one family as one transaction.
pub async fn apply(nft: &SharedNft, input: &MasqInput) -> Result<(), NftError> {
    let script = ruleset(input);
    off_runtime(nft, move |n| n.apply(&script)).await
}

/// Flannel's nft table of `family` (`ip flannel-ipv4` / `ip6 flannel-ipv6`).
pub fn table(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip flannel-ipv4",
        Family::V6 => "ip6 flannel-ipv6",
    }
}

/// The transaction deleting the tables of `families` that `listing` (`nft list tables`)
/// shows; `None` when there are none.
pub fn deletion(listing: &str, families: &[Family]) -> Option<String> {
    let present: Vec<&str> = families
        .iter()
        .map(|f| table(*f))
        .filter(|t| listing.lines().any(|l| l.trim() == format!("table {t}")))
        .collect();
    (!present.is_empty()).then(|| {
        present
            .iter()
            .map(|t| format!("delete table {t}\n"))
            .collect()
    })
}

/// Deletes Flannel's nft tables of `families`: iptables mode's clean-up of nftables mode (as
/// Flannel's `NFTablesManager.CleanUp`), and in nftables mode the table of a family no longer
/// used. Returns the tables that were there.
pub async fn delete_tables(
    nft: &SharedNft,
    families: Vec<Family>,
) -> Result<Vec<&'static str>, NftError> {
    off_runtime(nft, move |n| delete_tables_with(n, &families)).await
}

fn delete_tables_with(
    nft: &dyn NftRunner,
    families: &[Family],
) -> Result<Vec<&'static str>, NftError> {
    let listing = nft.list_tables()?;
    match deletion(&listing, families) {
        Some(script) => {
            nft.apply(&script)?;
            Ok(families
                .iter()
                .map(|f| table(*f))
                .filter(|t| script.contains(t))
                .collect())
        }
        None => Ok(Vec::new()),
    }
}

/// Counts the rules currently in the family's table; `None` when the table is missing (or
/// cannot be listed).
pub async fn installed_rule_count(nft: &SharedNft, network: &IpNet) -> Option<usize> {
    let (family, table, _, _) = family_names(network);
    off_runtime(nft, move |n| n.list_table(family, table, true))
        .await
        .ok()
        .map(|listing| listing.rules().count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::recording;

    fn input(network: &str, subnet: &str) -> MasqInput {
        MasqInput {
            network: network.parse().unwrap(),
            subnet: subnet.parse().unwrap(),
            masquerade: true,
            fully_random: true,
            forward: true,
        }
    }

    #[test]
    fn ipv4_rules_are_flannels() {
        let s = ruleset(&input("10.244.0.0/16", "10.244.1.1/24"));
        let golden = "\
add table ip flannel-ipv4 { comment \"rules for flannel-ipv4\" ; }
add chain ip flannel-ipv4 postrtg { type nat hook postrouting priority srcnat ; policy accept ; comment \"chain to manage traffic masquerading by flannel\" ; }
flush chain ip flannel-ipv4 postrtg
add rule ip flannel-ipv4 postrtg meta mark 0x4000 return
add rule ip flannel-ipv4 postrtg ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
add rule ip flannel-ipv4 postrtg ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
add rule ip flannel-ipv4 postrtg ip saddr != 10.244.1.0/24 ip daddr 10.244.0.0/16 return
add rule ip flannel-ipv4 postrtg ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
add rule ip flannel-ipv4 postrtg ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
add chain ip flannel-ipv4 forward { type filter hook forward priority filter ; policy accept ; comment \"chain to accept flannel traffic\" ; }
flush chain ip flannel-ipv4 forward
add rule ip flannel-ipv4 forward ip saddr 10.244.0.0/16 accept
add rule ip flannel-ipv4 forward ip daddr 10.244.0.0/16 accept
";
        assert_eq!(s, golden);
        assert_eq!(rule_count(&input("10.244.0.0/16", "10.244.1.1/24")), 8);
    }

    #[test]
    fn ipv6_uses_ip6_table_and_ff00_multicast() {
        let mut i = input("fd00:42::/56", "fd00:42:0:1::/64");
        i.fully_random = false;
        let s = ruleset(&i);
        assert!(
            s.starts_with("add table ip6 flannel-ipv6 { comment \"rules for flannel-ipv6\" ; }\n")
        );
        assert!(s.contains("add rule ip6 flannel-ipv6 postrtg ip6 saddr fd00:42::/56 ip6 daddr != ff00::/8 masquerade\n"));
        assert!(!s.contains("fully-random"));
    }

    #[test]
    fn deletion_names_only_flannels_tables_present() {
        let all = Family::ALL;
        let listing = "table inet twill-underlay\ntable ip flannel-ipv4\ntable ip nat\n";
        assert_eq!(
            deletion(listing, &all).as_deref(),
            Some("delete table ip flannel-ipv4\n")
        );
        let both = "table ip6 flannel-ipv6\ntable ip flannel-ipv4\n";
        assert_eq!(
            deletion(both, &all).as_deref(),
            Some("delete table ip flannel-ipv4\ndelete table ip6 flannel-ipv6\n")
        );
        assert_eq!(
            deletion(both, &[Family::V6]).as_deref(),
            Some("delete table ip6 flannel-ipv6\n")
        );
        assert_eq!(deletion("table ip flannel-ipv4-other\n", &all), None);
    }

    #[test]
    fn chains_follow_flags() {
        let mut i = input("10.244.0.0/16", "10.244.1.0/24");
        i.masquerade = false;
        let s = ruleset(&i);
        assert!(
            !s.contains("add rule ip flannel-ipv4 postrtg")
                && s.contains("add rule ip flannel-ipv4 forward")
        );
        assert!(s.ends_with("add chain ip flannel-ipv4 postrtg { type nat hook postrouting priority srcnat ; }\nflush chain ip flannel-ipv4 postrtg\ndelete chain ip flannel-ipv4 postrtg\n"), "{s}");
        assert_eq!(rule_count(&i), 2);
        i.forward = false;
        let s = ruleset(&i);
        assert!(!s.contains("add rule"), "{s}");
        assert!(
            s.contains("delete chain ip flannel-ipv4 postrtg\n")
                && s.contains("delete chain ip flannel-ipv4 forward\n")
        );
    }

    #[tokio::test]
    async fn the_rule_count_comes_from_a_listing_of_the_familys_table() {
        let (fake, nft) = recording();
        // nft 1.0.6's listing of the table ruleset() writes for input(10.244.0.0/16, ...).
        fake.reply(Ok(include_str!("../nft/tests/data/masq-ipv4.json").into()));
        let network = net("10.244.0.0/16");
        assert_eq!(installed_rule_count(&nft, &network).await, Some(8));
        assert_eq!(
            fake.calls()[0].args,
            ["-j", "list", "table", "ip", "flannel-ipv4"].map(String::from)
        );
        // A missing table, or output that is not a listing, counts as missing.
        fake.fail("Error: No such file or directory");
        assert_eq!(installed_rule_count(&nft, &network).await, None);
        fake.reply(Ok("{}".into()));
        assert_eq!(installed_rule_count(&nft, &network).await, None);
    }

    #[tokio::test]
    async fn tables_are_deleted_only_when_listed() {
        let (fake, nft) = recording();
        fake.reply(Ok(
            "table ip flannel-ipv4\ntable inet twill-underlay\n".into()
        ));
        assert_eq!(
            delete_tables(&nft, Family::ALL.to_vec()).await.unwrap(),
            ["ip flannel-ipv4"]
        );
        assert_eq!(fake.scripts(), ["delete table ip flannel-ipv4\n"]);
        let (fake, nft) = recording();
        fake.reply(Ok("table ip nat\n".into()));
        assert!(delete_tables(&nft, Family::ALL.to_vec())
            .await
            .unwrap()
            .is_empty());
        assert_eq!(fake.calls().len(), 1);
    }

    #[tokio::test]
    async fn apply_and_probe_are_one_transaction_each() {
        let (fake, nft) = recording();
        let i = input("10.244.0.0/16", "10.244.1.1/24");
        apply(&nft, &i).await.unwrap();
        assert!(fully_random_supported(&nft).await);
        fake.fail("Error: syntax error");
        assert!(!fully_random_supported(&nft).await);
        let calls = fake.calls();
        assert_eq!(calls[0].stdin, ruleset(&i));
        assert_eq!(calls[1].args, ["-c", "-f", "-"]);
        assert!(calls[1].stdin.contains("masquerade fully-random"));
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
}
