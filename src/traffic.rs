//! The traffic manager: Flannel's masquerade and forward rules in the mode net-conf.json's
//! `EnableNFTables` picks, as Flannel's `main.go` does at start-up.
//!
//! - iptables mode (`EnableNFTables` false or absent, Flannel's default and kube-flannel.yml's
//!   setting): [`crate::iptables`], chains `FLANNEL-POSTRTG` / `FLANNEL-FWD`, checked with
//!   `-C` every `--iptables-resync` seconds and re-applied whole when a rule is missing.
//! - nftables mode (`EnableNFTables: true`): [`crate::masq`], tables `ip flannel-ipv4` /
//!   `ip6 flannel-ipv6`, checked by rule count on the same period (Flannel has no resync here).
//!
//! At start the other mode's rules are removed, so a node switched between modes (or from
//! Flannel to twill in either mode) keeps nothing stale. Flannel's nftables mode tries to
//! delete `nat FLANNEL-POSTRTG` and `nat FLANNEL-FWD` (sic: its forward chain lives in
//! `filter`, so it stays); twill removes what iptables mode installs: `nat FLANNEL-POSTRTG`,
//! `filter FLANNEL-FWD` and their jumps, for both families. In either mode a chain that is not
//! wanted (`--ip-masq` off, `--iptables-forward-rules=false`) or a family not enabled is
//! removed too, where Flannel would leave a previous run's rules working.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};

use crate::iptables::{self, Family, FamilyRules, IptablesError, Part, Support};
use crate::masq::{self, MasqInput};
use crate::nft::SharedNft;
use twill_formats::net_conf::NetConfig;

/// Which traffic manager runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Nftables,
}

impl Mode {
    pub fn of(config: &NetConfig) -> Mode {
        if config.enable_nftables {
            Mode::Nftables
        } else {
            Mode::Iptables
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        })
    }
}

/// Start-up step 5, iptables mode only: Flannel exits when br_netfilter's sysctls are missing
/// (without the module, bridged pod traffic bypasses iptables; kubeadm stopped checking for it
/// in Kubernetes 1.30). Only "does not exist" counts, as Flannel's `os.IsNotExist`.
pub fn check_br_netfilter(config: &NetConfig) -> anyhow::Result<()> {
    check_br_netfilter_in(Path::new("/proc/sys"), config)
}

fn check_br_netfilter_in(sysctl: &Path, config: &NetConfig) -> anyhow::Result<()> {
    if Mode::of(config) != Mode::Iptables {
        return Ok(());
    }
    for (enabled, name) in [
        (config.enable_ipv4, "bridge-nf-call-iptables"),
        (config.enable_ipv6, "bridge-nf-call-ip6tables"),
    ] {
        let path = sysctl.join("net/bridge").join(name);
        if let (true, Err(e)) = (enabled, std::fs::metadata(&path)) {
            if e.kind() == std::io::ErrorKind::NotFound {
                return Err(anyhow!(
                    "Failed to check br_netfilter: stat {}: no such file or directory",
                    path.display()
                ));
            }
        }
    }
    Ok(())
}

/// The rules a running daemon keeps in place.
pub struct TrafficManager {
    /// iptables mode: each family's rules and what its iptables supports.
    iptables: Vec<(FamilyRules, Support)>,
    /// nftables mode: each family's table input.
    nftables: Vec<MasqInput>,
    nft: SharedNft,
}

impl TrafficManager {
    /// Removes the other mode's rules (and, in iptables mode, unwanted parts), then installs
    /// `inputs` (one per enabled family that wants masquerade or forward rules;
    /// `fully_random` there means "wanted": the mode's support is probed here).
    pub async fn start(mode: Mode, inputs: Vec<MasqInput>) -> anyhow::Result<TrafficManager> {
        tracing::info!(%mode, "starting the traffic manager; cleaning up the other mode's rules");
        let nft = crate::nft::runner();
        match mode {
            Mode::Iptables => Self::start_iptables(nft, inputs).await,
            Mode::Nftables => Self::start_nftables(nft, inputs).await,
        }
    }

    async fn start_iptables(
        nft: SharedNft,
        inputs: Vec<MasqInput>,
    ) -> anyhow::Result<TrafficManager> {
        delete_nft_tables_logged(&nft, Family::ALL.to_vec()).await;
        let mut out = Vec::new();
        for family in Family::ALL {
            let Some(input) = inputs.iter().find(|i| Family::of(&i.network) == family) else {
                remove_logged(family, &Part::ALL).await;
                continue;
            };
            let support = iptables::probe(family)
                .await
                .context("installing the masquerade and forward rules")?;
            let rules = FamilyRules::new(
                input.network,
                input.subnet,
                input.masquerade,
                input.forward,
                input.fully_random && support.random_fully,
            );
            remove_logged(family, &rules.unwanted()).await;
            iptables::apply(&rules, support)
                .await
                .with_context(|| format!("installing the iptables rules for {}", input.network))?;
            tracing::info!(%family, network = %input.network, rules = rules.rules().count(), "iptables rules in place");
            out.push((rules, support));
        }
        Ok(TrafficManager {
            iptables: out,
            nftables: Vec::new(),
            nft,
        })
    }

    async fn start_nftables(
        nft: SharedNft,
        mut inputs: Vec<MasqInput>,
    ) -> anyhow::Result<TrafficManager> {
        for family in Family::ALL {
            remove_logged(family, &Part::ALL).await;
        }
        let unused: Vec<Family> = Family::ALL
            .into_iter()
            .filter(|f| !inputs.iter().any(|i| Family::of(&i.network) == *f))
            .collect();
        delete_nft_tables_logged(&nft, unused).await;
        if inputs.iter().any(|i| i.fully_random) {
            let supported = masq::fully_random_supported(&nft).await;
            for i in &mut inputs {
                i.fully_random &= supported;
            }
        }
        for input in &inputs {
            masq::apply(&nft, input)
                .await
                .with_context(|| format!("installing the nftables rules for {}", input.network))?;
            tracing::info!(network = %input.network, "nftables rules in place");
        }
        Ok(TrafficManager {
            iptables: Vec::new(),
            nftables: inputs,
            nft,
        })
    }

    /// One drift check: a missing rule (iptables) or a changed rule count (nftables) re-applies
    /// the family's whole set. Whether something had drifted (a repair was needed).
    pub async fn resync(&self) -> bool {
        let mut drifted = false;
        for (rules, support) in &self.iptables {
            match iptables::missing(rules).await {
                Ok(missing) if missing.is_empty() => {}
                Ok(missing) => {
                    drifted = true;
                    tracing::warn!(family = %rules.family, missing = missing.len(), first = %missing[0].line("-A"), "iptables rules missing; re-applying the whole set");
                    if let Err(e) = iptables::apply(rules, *support).await {
                        tracing::warn!(error = %e, "re-applying the iptables rules failed; retrying on the next resync");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "checking the iptables rules failed"),
            }
        }
        for input in &self.nftables {
            let count = masq::installed_rule_count(&self.nft, &input.network).await;
            if count != Some(masq::rule_count(input)) {
                drifted = true;
                tracing::warn!(network = %input.network, "masquerade/forward tables drifted; re-applying");
                if let Err(e) = masq::apply(&self.nft, input).await {
                    tracing::warn!(error = %e, "re-applying the nftables rules failed");
                }
            }
        }
        drifted
    }

    /// Runs [`TrafficManager::resync`] every `period`, on a task of its own (a slow iptables
    /// never holds up the dataplane's event loop); each check that found drift is counted as
    /// a masquerade repair in `metrics`.
    pub fn spawn_resync(
        self,
        period: Duration,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period.max(Duration::from_secs(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if self.resync().await {
                    metrics.record_repair(crate::metrics::Component::Masquerade);
                }
            }
        })
    }
}

/// Removes `parts` of `family`, logging what went; failures are logged, not fatal (the rules
/// left behind are the other mode's or unwanted ones, and the wanted ones still go in).
async fn remove_logged(family: Family, parts: &[Part]) {
    if parts.is_empty() {
        return;
    }
    match iptables::remove(family, parts).await {
        Ok(gone) if gone.is_empty() => {}
        Ok(gone) => {
            let chains: Vec<&str> = gone.iter().map(|p| p.chain()).collect();
            tracing::info!(%family, ?chains, "removed iptables chains twilld does not use");
        }
        Err(e @ IptablesError::NotInstalled { .. }) => {
            tracing::debug!(%family, error = %e, "no iptables: no iptables chains to remove")
        }
        Err(e) => tracing::warn!(%family, error = %e, "could not remove iptables chains"),
    }
}

/// Deletes Flannel's nft tables of `families`, logging what went; failures are logged, not
/// fatal.
async fn delete_nft_tables_logged(nft: &SharedNft, families: Vec<Family>) {
    if families.is_empty() {
        return;
    }
    match masq::delete_tables(nft, families).await {
        Ok(gone) if gone.is_empty() => {}
        Ok(gone) => tracing::info!(tables = ?gone, "deleted nft tables twilld does not use"),
        Err(e) => tracing::warn!(error = %e, "could not delete Flannel's nft tables"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> NetConfig {
        NetConfig::parse(json).unwrap()
    }

    fn sysctl_dir(name: &str, files: &[&str]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("twill-brnf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("net/bridge")).unwrap();
        for f in files {
            std::fs::write(dir.join("net/bridge").join(f), "1\n").unwrap();
        }
        dir
    }

    #[test]
    fn mode_follows_enable_nftables_default_iptables() {
        let base = r#""Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}"#;
        assert_eq!(Mode::of(&config(&format!("{{{base}}}"))), Mode::Iptables);
        assert_eq!(
            Mode::of(&config(&format!(r#"{{{base},"EnableNFTables":false}}"#))),
            Mode::Iptables
        );
        assert_eq!(
            Mode::of(&config(&format!(r#"{{{base},"enablenftables":true}}"#))),
            Mode::Nftables
        );
    }

    #[test]
    fn br_netfilter_missing_fails_iptables_mode_like_flannel() {
        let v4 = config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
        let empty = sysctl_dir("empty", &[]);
        let err = check_br_netfilter_in(&empty, &v4).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "Failed to check br_netfilter: stat {}/net/bridge/bridge-nf-call-iptables: no such file or directory",
                empty.display()
            )
        );
        // nftables mode does not check.
        let nft = config(
            r#"{"Network":"10.244.0.0/16","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#,
        );
        assert!(check_br_netfilter_in(&empty, &nft).is_ok());
        // Only enabled families are checked.
        let v4_only = sysctl_dir("v4", &["bridge-nf-call-iptables"]);
        assert!(check_br_netfilter_in(&v4_only, &v4).is_ok());
        let dual = config(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan"}}"#,
        );
        let err = check_br_netfilter_in(&v4_only, &dual)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("bridge-nf-call-ip6tables: no such file or directory"),
            "{err}"
        );
        let both = sysctl_dir(
            "both",
            &["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"],
        );
        assert!(check_br_netfilter_in(&both, &dual).is_ok());
        for d in [empty, v4_only, both] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}
