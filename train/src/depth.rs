//! How many recurrence steps a training step runs, and through how many of them gradients flow.
//!
//! The paper samples one depth per optimizer step for the whole batch ("lock-step"):
//! `poisson-lognormal-filling` draws a rate `τ ~ LogNormal(ln r̄ − σ²/2, σ)` (so `E[τ] = r̄`),
//! then `p = Poisson(τ) + 1` total steps, of which the last `min(k, p)` carry gradient and the
//! first `max(p − k, 0)` run without it (truncated backprop through depth).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, Poisson};
use serde::{Deserialize, Serialize};

/// Recurrence steps of one training step: `no_grad` steps outside the graph, then `with_grad`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Depth {
    pub no_grad: usize,
    pub with_grad: usize,
}

impl Depth {
    pub fn total(self) -> usize {
        self.no_grad + self.with_grad
    }
}

/// A depth sampling scheme (reference names).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "kebab-case")]
pub enum DepthScheme {
    /// The paper's: log-normal Poisson total depth with mean ≈ `mean + 1`, last `backprop`
    /// steps with gradient.
    PoissonLognormalFilling { mean: usize, backprop: usize },
    /// Always `steps`, the last `backprop` with gradient.
    Fixed { steps: usize, backprop: usize },
    /// One step with gradient: the fixed-depth baseline.
    NonRecurrent,
}

/// Spread of the log-normal rate (the reference's σ).
const LOGNORMAL_SIGMA: f64 = 0.5;

impl DepthScheme {
    /// The depth of optimizer step `step` for a run seeded with `seed`: a pure function of
    /// both, so a resumed run draws exactly what an uninterrupted one would.
    pub fn sample(&self, seed: u64, step: u64) -> Depth {
        match *self {
            DepthScheme::PoissonLognormalFilling { mean, backprop } => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step);
                let mu = (mean as f64).ln() - LOGNORMAL_SIGMA * LOGNORMAL_SIGMA / 2.0;
                let rate = LogNormal::new(mu, LOGNORMAL_SIGMA)
                    .expect("valid log-normal")
                    .sample(&mut rng);
                let total = Poisson::new(rate.max(1e-9)).expect("positive rate").sample(&mut rng) as usize + 1;
                split(total, backprop)
            }
            DepthScheme::Fixed { steps, backprop } => split(steps, backprop),
            DepthScheme::NonRecurrent => Depth {
                no_grad: 0,
                with_grad: 1,
            },
        }
    }
}

impl DepthScheme {
    /// The expected total depth (`mean + 1` for the paper's scheme: Poisson(τ) + 1).
    pub fn mean_depth(&self) -> f64 {
        match *self {
            DepthScheme::PoissonLognormalFilling { mean, .. } => mean as f64 + 1.0,
            DepthScheme::Fixed { steps, .. } => steps as f64,
            DepthScheme::NonRecurrent => 1.0,
        }
    }
}

fn split(total: usize, backprop: usize) -> Depth {
    let with_grad = backprop.min(total);
    Depth {
        no_grad: total - with_grad,
        with_grad,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// P(total = t): the Poisson pmf integrated over the log-normal rate (midpoint rule).
    fn exact_pmf(mean: f64, max_total: usize) -> Vec<f64> {
        let mu = mean.ln() - LOGNORMAL_SIGMA * LOGNORMAL_SIGMA / 2.0;
        let mut pmf = vec![0.0; max_total + 1];
        let n = 4000;
        for i in 0..n {
            let z = -6.0 + 12.0 * (i as f64 + 0.5) / n as f64;
            let weight = (-z * z / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt() * 12.0 / n as f64;
            let rate = (mu + LOGNORMAL_SIGMA * z).exp();
            let mut log_p = -rate;
            for (k, slot) in pmf.iter_mut().enumerate().skip(1) {
                if k > 1 {
                    log_p += rate.ln() - ((k - 1) as f64).ln();
                }
                *slot += weight * log_p.exp();
            }
        }
        pmf
    }

    #[test]
    fn poisson_lognormal_matches_the_papers_statistics() {
        let scheme = DepthScheme::PoissonLognormalFilling { mean: 32, backprop: 8 };
        let n = 200_000u64;
        let mut totals: Vec<usize> = (0..n).map(|step| scheme.sample(233, step).total()).collect();
        let mean = totals.iter().sum::<usize>() as f64 / n as f64;
        totals.sort_unstable();
        // Paper: mean ≈ 33, median 29, mode 24 (the pmf is flat within 0.3% over 22..=24).
        assert!((mean - 33.0).abs() < 0.3, "mean {mean}");
        assert_eq!(totals[n as usize / 2], 29);
        let exact = exact_pmf(32.0, 300);
        let exact_mean: f64 = exact.iter().enumerate().map(|(t, p)| t as f64 * p).sum();
        assert!((exact_mean - 33.0).abs() < 0.1, "{exact_mean}");
        let mode = (1..exact.len()).max_by(|a, b| exact[*a].total_cmp(&exact[*b])).unwrap();
        assert!((22..=24).contains(&mode), "mode {mode}");
        let mut counts = vec![0usize; 301];
        totals.iter().for_each(|t| counts[(*t).min(300)] += 1);
        for (t, (&c, &p)) in counts.iter().zip(&exact).enumerate() {
            let f = c as f64 / n as f64;
            assert!((f - p).abs() < 0.0025, "P(total = {t}): sampled {f}, exact {p}");
        }
    }

    #[test]
    fn truncation_keeps_at_most_k_steps_with_gradient() {
        let scheme = DepthScheme::PoissonLognormalFilling { mean: 32, backprop: 8 };
        for step in 0..2000 {
            let d = scheme.sample(1, step);
            assert!(d.total() >= 1);
            assert_eq!(d.with_grad, d.total().min(8));
        }
        assert_eq!(scheme.sample(5, 17), scheme.sample(5, 17));
        assert_ne!(
            (0..20).map(|s| scheme.sample(5, s)).collect::<Vec<_>>(),
            (0..20).map(|s| scheme.sample(6, s)).collect::<Vec<_>>()
        );
        assert_eq!(
            DepthScheme::Fixed { steps: 3, backprop: 8 }.sample(0, 0),
            Depth {
                no_grad: 0,
                with_grad: 3
            }
        );
        assert_eq!(
            DepthScheme::NonRecurrent.sample(0, 9),
            Depth {
                no_grad: 0,
                with_grad: 1
            }
        );
    }
}
