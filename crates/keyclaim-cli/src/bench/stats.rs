//! Latency samples and their summaries.

use std::time::Duration;

use serde::Serialize;

/// Latency samples of one operation kind, in microseconds.
#[derive(Clone, Debug, Default)]
pub(crate) struct Samples(Vec<u32>);

impl Samples {
    pub(crate) fn record(&mut self, d: Duration) {
        self.0
            .push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
    }

    pub(crate) fn merge(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    pub(crate) fn summary(&self, elapsed: Duration) -> Summary {
        let mut v = self.0.clone();
        v.sort_unstable();
        let pct = |p: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            let idx = ((v.len() - 1) as f64 * p).round() as usize;
            f64::from(v[idx.min(v.len() - 1)]) / 1000.0
        };
        let secs = elapsed.as_secs_f64();
        Summary {
            ops: v.len() as u64,
            ops_per_sec: if secs > 0.0 {
                v.len() as f64 / secs
            } else {
                0.0
            },
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
        }
    }
}

/// Throughput and latency of one operation kind.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub(crate) struct Summary {
    pub(crate) ops: u64,
    pub(crate) ops_per_sec: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut s = Samples::default();
        for i in 1..=100 {
            s.record(Duration::from_micros(i * 1000));
        }
        let sum = s.summary(Duration::from_secs(2));
        assert_eq!(sum.ops, 100);
        assert!((sum.ops_per_sec - 50.0).abs() < 1e-9);
        assert!((sum.p50_ms - 51.0).abs() < 1.01, "{}", sum.p50_ms);
        assert!((sum.p99_ms - 99.0).abs() < 1.01, "{}", sum.p99_ms);
        assert_eq!(Samples::default().summary(Duration::ZERO).ops_per_sec, 0.0);
    }
}
