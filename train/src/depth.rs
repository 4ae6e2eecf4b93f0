//! How many recurrence steps a training step runs, and through how many of them gradients flow.
//!
//! The paper samples one depth per optimizer step for the whole batch ("lock-step"):
//! `poisson-lognormal-filling` draws a rate `τ ~ LogNormal(ln r̄ − σ²/2, σ)` (so `E[τ] = r̄`),
//! then `p = Poisson(τ) + 1` total steps, of which the last `min(k, p)` carry gradient and the
//! first `max(p − k, 0)` run without it (truncated backprop through depth).

use rand::SeedableRng;
use rand::rngs::StdRng;
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
                let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step);
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

    #[test]
    fn poisson_lognormal_matches_the_papers_statistics() {
        let scheme = DepthScheme::PoissonLognormalFilling { mean: 32, backprop: 8 };
        let n = 200_000u64;
        let mut totals: Vec<usize> = (0..n).map(|step| scheme.sample(233, step).total()).collect();
        let mean = totals.iter().sum::<usize>() as f64 / n as f64;
        totals.sort_unstable();
        let median = totals[n as usize / 2];
        let mut counts = vec![0usize; totals.last().unwrap() + 1];
        totals.iter().for_each(|t| counts[*t] += 1);
        let mode = (0..counts.len()).max_by_key(|&t| counts[t]).unwrap();
        assert!((mean - 33.1).abs() < 0.3, "mean {mean}");
        assert_eq!(median, 29);
        assert!((23..=25).contains(&mode), "mode {mode}");
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
