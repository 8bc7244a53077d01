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

/// The median of `xs` and a 95% confidence interval for it, `(median, low, high)`, from order
/// statistics (distribution-free): the widest `k` with P(Binomial(n, 1/2) < k) <= 2.5% gives
/// `[x_(k), x_(n+1-k)]`. `None` below 6 samples, where no such interval exists.
pub fn median_ci(mut xs: Vec<f64>) -> Option<(f64, f64, f64)> {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = xs.len();
    // P(B <= j) for B ~ Binomial(n, 1/2), accumulated term by term.
    let mut term = 0.5f64.powi(n as i32);
    let mut below = 0.0;
    let mut k = 0;
    for j in 0..n {
        below += term;
        if below > 0.025 {
            break;
        }
        k = j + 1;
        term *= (n - j) as f64 / (j + 1) as f64;
    }
    (k >= 1).then(|| (median(xs.clone()), xs[k - 1], xs[n - k]))
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

    #[test]
    fn median_confidence_interval() {
        // Too few samples for a 95% interval.
        assert_eq!(median_ci(vec![1.0, 2.0, 3.0, 4.0, 5.0]), None);
        // n = 6: P(B = 0) = 1/64 <= 2.5%, so the extremes.
        assert_eq!(
            median_ci(vec![6.0, 1.0, 5.0, 2.0, 4.0, 3.0]),
            Some((3.5, 1.0, 6.0))
        );
        // n = 9: P(B <= 1) = 10/512 <= 2.5% < P(B <= 2), so x_(2) and x_(8).
        let nine: Vec<f64> = (1..=9).map(f64::from).collect();
        assert_eq!(median_ci(nine), Some((5.0, 2.0, 8.0)));
        // n = 31: k = 10 (P(B <= 9) = 1.5%, P(B <= 10) = 3.5%).
        let many: Vec<f64> = (1..=31).map(f64::from).collect();
        assert_eq!(median_ci(many), Some((16.0, 10.0, 22.0)));
    }
}
