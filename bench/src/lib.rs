//! Helpers shared by twill's benchmarks: statistics and the results table format.

use std::time::Duration;

/// Median of a non-empty sample.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The p-th percentile (0..=100) by nearest rank.
pub fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let rank = ((p / 100.0) * xs.len() as f64).ceil().max(1.0) as usize;
    xs[rank.min(xs.len()) - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One row of the README's benchmark table.
pub fn table_row(
    bench: &str,
    twill: &str,
    peer: &str,
    ratio: f64,
    target: &str,
    verdict: bool,
) -> String {
    format!(
        "| {bench} | {twill} | {peer} | {ratio:.2} | {target} | {} |",
        if verdict { "met" } else { "missed" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(percentile((1..=100).map(f64::from).collect(), 99.0), 99.0);
        assert_eq!(percentile(vec![5.0], 50.0), 5.0);
    }
}
