//! The one retry backoff: exponential with jitter, so that nodes that lost etcd or the API
//! server together do not retry it in lockstep when it comes back.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// The delays between attempts after errors: `min` doubling up to `max`, each plus a random
/// jitter of up to itself, forever. Start a new iterator after a success to reset it.
pub fn retry_delays(min: Duration, max: Duration) -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_of_up_to_themselves() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let delays: Vec<Duration> = retry_delays(min, max).take(12).collect();
        let mut base = min;
        for d in &delays {
            assert!(
                *d >= base && *d <= base * 2,
                "{d:?} outside [{base:?}, {:?}]",
                base * 2
            );
            base = (base * 2).min(max);
        }
    }

    #[test]
    fn two_nodes_do_not_retry_in_lockstep() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let a: Vec<Duration> = retry_delays(min, max).take(8).collect();
        let b: Vec<Duration> = retry_delays(min, max).take(8).collect();
        assert_ne!(
            a, b,
            "two backoffs drew the same jitter eight times in a row"
        );
    }
}
