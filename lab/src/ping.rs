//! A continuous ping between lab namespaces, read by sequence number: the tool the lab tests
//! use to show that nothing was lost while something changed (a restart, a migration).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::{Lab, ProcId, Signal};

/// How long [`Pinger`] waits for ping to answer or to stop: generous, since only a failure
/// waits this long.
const DEADLINE: Duration = Duration::from_secs(30);

/// How often [`Pinger::wait_answered`] reads ping's log.
const POLL: Duration = Duration::from_millis(100);

/// A continuous ping from a lab namespace: one probe every `interval` until stopped. iputils
/// prints (and flushes) a line per reply, so which probes were answered is read from its log
/// by `icmp_seq`: a reply that comes late is still counted, unlike ping's own summary, which
/// counts a reply to the last probe as lost when it arrives after ping has stopped waiting.
pub struct Pinger {
    id: ProcId,
    to: IpAddr,
}

impl Pinger {
    /// Starts pinging `to` from `netns` every `interval` (ping's `-i`, e.g. "0.01"); the
    /// process stops itself after `limit` at the latest (a bound, not a test deadline: the
    /// test stops it with [`Pinger::stop`] long before).
    pub fn start(
        lab: &mut Lab,
        netns: &str,
        name: &str,
        to: IpAddr,
        interval: &str,
        limit: Duration,
    ) -> Pinger {
        let limit = limit.as_secs().max(1).to_string();
        let to_s = to.to_string();
        let id = lab
            .spawn(
                netns,
                name,
                &["ping", "-n", "-i", interval, "-W", "1", "-w", &limit, &to_s],
                &[],
            )
            .expect("spawn ping");
        Pinger { id, to }
    }

    /// The sequence numbers of the probes answered so far.
    pub fn answered(&self, lab: &Lab) -> BTreeSet<u64> {
        lab.log(self.id)
            .lines()
            .filter(|l| l.contains(" bytes from "))
            .filter_map(|l| l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok())
            .collect()
    }

    /// The highest sequence number answered so far (0 before any reply).
    pub fn last_answered(&self, lab: &Lab) -> u64 {
        self.answered(lab).last().copied().unwrap_or(0)
    }

    /// Waits until probe `seq` or a later one has been answered (so traffic has flowed up to
    /// that point); panics after `DEADLINE` (30 s) or if ping stopped.
    pub fn wait_answered(&self, lab: &mut Lab, seq: u64) {
        let start = Instant::now();
        while self.last_answered(lab) < seq {
            assert!(
                lab.is_running(self.id),
                "ping to {} stopped before probe {seq} was answered:\n{}",
                self.to,
                lab.log(self.id)
            );
            assert!(
                start.elapsed() < DEADLINE,
                "ping to {}: probe {seq} not answered in {DEADLINE:?}:\n{}",
                self.to,
                lab.log(self.id)
            );
            std::thread::sleep(POLL);
        }
    }

    /// Stops ping (SIGINT, as Ctrl-C) and returns what it saw. It must still have been
    /// running: one that reached its own limit would have left the end of the test unwatched.
    pub fn stop(self, lab: &mut Lab) -> PingReport {
        assert!(
            lab.is_running(self.id),
            "ping to {} ended before the test stopped it:\n{}",
            self.to,
            lab.log(self.id)
        );
        lab.kill(self.id, Signal::SIGINT).expect("SIGINT ping");
        let status = lab.wait(self.id, DEADLINE).expect("wait for ping");
        assert!(status.is_some(), "ping did not stop on SIGINT");
        let log = lab.log(self.id);
        PingReport {
            answered: self.answered(lab),
            summary: log
                .lines()
                .find(|l| l.contains("packets transmitted"))
                .unwrap_or("")
                .to_string(),
            log,
        }
    }
}

/// What a stopped [`Pinger`] saw.
pub struct PingReport {
    /// Sequence numbers of the answered probes.
    pub answered: BTreeSet<u64>,
    /// ping's own summary line ("N packets transmitted, M received, ...").
    pub summary: String,
    /// ping's whole output, for failure messages.
    pub log: String,
}

impl PingReport {
    /// The probes sent before the last answered one that got no answer: none when not a
    /// packet was lost while ping ran (the probes after the last answer were in flight when
    /// ping was stopped).
    pub fn lost(&self) -> Vec<u64> {
        let last = self.answered.last().copied().unwrap_or(0);
        (1..last).filter(|s| !self.answered.contains(s)).collect()
    }

    /// The highest sequence number answered (0 when none was).
    pub fn last_answered(&self) -> u64 {
        self.answered.last().copied().unwrap_or(0)
    }
}
