//! Per-token adaptive exit: after each recurrence step a criterion compares the model's state or
//! prediction with the previous step's and decides whether this token has converged. The
//! criteria and their "auto" thresholds are the reference's (HEAD of the authors' code).

use std::str::FromStr;

use model::burn::prelude::*;

/// An exit criterion (reference names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Criterion {
    /// Never exit early.
    None,
    /// `KL(p_{i−1} ‖ p_i)`, starting from the uniform distribution.
    Kl,
    /// The same KL after min-p filtering (probabilities below `0.1·max` set to `1/V`).
    MinpKl,
    /// `|H(p_i) − H(p_{i−1})|`, starting from `H = 100`.
    EntropyDiff,
    /// `‖s_i − s_{i−1}‖ / ‖s_i‖` per position (raw states), mean over positions.
    LatentDiff,
    /// `1 − mean_pos cos(s_i, s_{i−1})`.
    Cosine,
    /// Consecutive steps with an unchanged argmax; exits when it reaches the threshold.
    ArgmaxStability,
}

impl Criterion {
    /// The reference's `"auto"` threshold.
    pub fn auto_threshold(self) -> f64 {
        match self {
            Criterion::None => 0.0,
            Criterion::Kl | Criterion::EntropyDiff | Criterion::Cosine => 1e-3,
            Criterion::MinpKl => 1e-5,
            Criterion::LatentDiff => 0.03,
            Criterion::ArgmaxStability => 5.0,
        }
    }

    /// Whether the criterion reads the prediction (so the coda runs at every check).
    pub fn needs_logits(self) -> bool {
        matches!(
            self,
            Criterion::Kl | Criterion::MinpKl | Criterion::EntropyDiff | Criterion::ArgmaxStability
        )
    }
}

impl Criterion {
    pub const ALL: [Criterion; 7] = [
        Criterion::None,
        Criterion::Kl,
        Criterion::MinpKl,
        Criterion::EntropyDiff,
        Criterion::LatentDiff,
        Criterion::Cosine,
        Criterion::ArgmaxStability,
    ];

    /// The reference's name.
    pub fn name(self) -> &'static str {
        match self {
            Criterion::None => "none",
            Criterion::Kl => "kl",
            Criterion::MinpKl => "minp-kl",
            Criterion::EntropyDiff => "entropy-diff",
            Criterion::LatentDiff => "latent-diff",
            Criterion::Cosine => "cosine",
            Criterion::ArgmaxStability => "argmax-stability",
        }
    }
}

impl FromStr for Criterion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Criterion::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("unknown exit criterion {s:?}"))
    }
}

/// The running state of one criterion over the steps of one token.
pub struct ExitTracker {
    criterion: Criterion,
    threshold: f64,
    prev_logp: Vec<f64>,
    prev_entropy: f64,
    prev_state: Option<Tensor<3>>,
    prev_argmax: Option<usize>,
    stable: usize,
}

impl ExitTracker {
    /// Starts tracking a token whose recurrence begins at `s0` over a vocabulary of `vocab`.
    pub fn new(criterion: Criterion, threshold: f64, vocab: usize, s0: &Tensor<3>) -> Self {
        Self {
            criterion,
            threshold,
            prev_logp: vec![-(vocab as f64).ln(); vocab],
            prev_entropy: 100.0,
            prev_state: Some(s0.clone()),
            prev_argmax: None,
            stable: 0,
        }
    }

    /// Feeds the state after a step and (for logit criteria) the last position's logits;
    /// returns the exit value and whether it says "exit".
    pub fn check(&mut self, state: &Tensor<3>, logits: Option<&[f32]>) -> (f64, bool) {
        let previous = self.prev_state.replace(state.clone()).expect("tracker holds a state");
        let value = match self.criterion {
            Criterion::None => 0.0,
            Criterion::Kl => self.kl(logits.expect("kl reads logits"), false),
            Criterion::MinpKl => self.kl(logits.expect("minp-kl reads logits"), true),
            Criterion::EntropyDiff => {
                let logp = log_softmax(logits.expect("entropy-diff reads logits"));
                let entropy = -logp.iter().map(|lp| lp.exp() * (lp.exp() + 1e-10).ln()).sum::<f64>();
                let value = (entropy - self.prev_entropy).abs();
                self.prev_entropy = entropy;
                value
            }
            Criterion::LatentDiff => {
                let diff = (state.clone() - previous).square().sum_dim(2).sqrt();
                let norm = state.clone().square().sum_dim(2).sqrt();
                (diff / norm).mean().into_scalar::<f32>() as f64
            }
            Criterion::Cosine => {
                let dot = (state.clone() * previous.clone()).sum_dim(2);
                let norms = state.clone().square().sum_dim(2).sqrt() * previous.square().sum_dim(2).sqrt();
                1.0 - (dot / norms).mean().into_scalar::<f32>() as f64
            }
            Criterion::ArgmaxStability => {
                let logits = logits.expect("argmax-stability reads logits");
                let best = argmax(logits);
                self.stable = if self.prev_argmax == Some(best) {
                    self.stable + 1
                } else {
                    0
                };
                self.prev_argmax = Some(best);
                self.stable as f64
            }
        };
        let exit = match self.criterion {
            Criterion::None => false,
            Criterion::ArgmaxStability => value >= self.threshold,
            _ => value < self.threshold,
        };
        (value, exit)
    }

    fn kl(&mut self, logits: &[f32], min_p: bool) -> f64 {
        let mut logp = log_softmax(logits);
        if min_p {
            let vocab = logp.len() as f64;
            let max = logp.iter().cloned().fold(f64::NEG_INFINITY, f64::max).exp();
            let probs: Vec<f64> = logp
                .iter()
                .map(|lp| if lp.exp() < 0.1 * max { 1.0 / vocab } else { lp.exp() })
                .collect();
            let total: f64 = probs.iter().sum();
            logp = probs.iter().map(|p| (p / total).ln()).collect();
        }
        let value = self
            .prev_logp
            .iter()
            .zip(&logp)
            .map(|(prev, cur)| prev.exp() * (prev - cur))
            .sum();
        self.prev_logp = logp;
        value
    }
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + logits.iter().map(|l| (*l as f64 - max).exp()).sum::<f64>().ln();
    logits.iter().map(|l| *l as f64 - lse).collect()
}

/// Index of the first maximum (as `torch.argmax` picks).
pub fn argmax<T: PartialOrd>(values: &[T]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_auto_thresholds_are_the_references() {
        assert_eq!("minp-kl".parse(), Ok(Criterion::MinpKl));
        assert!("kl-ish".parse::<Criterion>().is_err());
        assert_eq!(Criterion::Kl.auto_threshold(), 1e-3);
        assert_eq!(Criterion::LatentDiff.auto_threshold(), 0.03);
        assert_eq!(Criterion::ArgmaxStability.auto_threshold(), 5.0);
    }

    #[test]
    fn kl_starts_from_uniform_and_vanishes_at_a_fixed_point() {
        let s = Tensor::<3>::zeros([1, 1, 4], &Device::flex());
        let mut t = ExitTracker::new(Criterion::Kl, 1e-3, 3, &s);
        let (first, exit) = t.check(&s, Some(&[0.0, 0.0, 0.0]));
        assert!(first.abs() < 1e-12 && exit, "uniform after uniform");
        let (second, _) = t.check(&s, Some(&[5.0, 0.0, 0.0]));
        assert!(second > 0.1);
        let (third, exit) = t.check(&s, Some(&[5.0, 0.0, 0.0]));
        assert!(third.abs() < 1e-12 && exit);
    }

    #[test]
    fn argmax_stability_counts_unchanged_steps() {
        let s = Tensor::<3>::zeros([1, 1, 4], &Device::flex());
        let mut t = ExitTracker::new(Criterion::ArgmaxStability, 2.0, 2, &s);
        let values: Vec<(f64, bool)> = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]
            .iter()
            .map(|l| t.check(&s, Some(l)))
            .collect();
        assert_eq!(
            values,
            [(0.0, false), (1.0, false), (0.0, false), (1.0, false), (2.0, true)]
        );
    }
}
