//! How far 8- and 4-bit weights move a model's predictions, by recurrence depth.
//!
//! A looped model applies the same core weights `r` times, so a rounding error in them is
//! applied `r` times too: does the quantized model drift further from the float one the deeper
//! it recurs, or does the recurrence's contraction wash the error out? [`divergence_by_depth`]
//! runs the float model and its quantized copy on the same tokens at each depth and reports the
//! KL divergence of their next-token distributions, how often their top tokens agree, and each
//! one's perplexity on the tokens that follow.

use model::Huginn;
use serde::Serialize;

use crate::error::AnalysisError;

/// The float model against its quantized copy at one depth, over every position of the windows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DepthDivergence {
    pub depth: usize,
    /// Mean over positions of KL(float ‖ quantized), in nats.
    pub kl_mean: f64,
    /// The largest KL at any position.
    pub kl_max: f64,
    /// Fraction of positions where both predict the same top token.
    pub top1_agreement: f64,
    /// Perplexity of the next tokens under the float model and under the quantized one.
    pub perplexity_float: f64,
    pub perplexity_quantized: f64,
}

/// [`DepthDivergence`] at each of `depths`, over token windows of at least two tokens each (at
/// most the model's context).
pub fn divergence_by_depth(
    float: &Huginn,
    quantized: &Huginn,
    windows: &[Vec<u32>],
    depths: &[usize],
) -> Result<Vec<DepthDivergence>, AnalysisError> {
    if windows.is_empty() || windows.iter().any(|w| w.len() < 2) {
        return Err(AnalysisError::Invalid(
            "the divergence needs token windows of at least two tokens".into(),
        ));
    }
    depths
        .iter()
        .map(|&depth| {
            let mut sums = Sums::default();
            for window in windows {
                let p = log_probs(float, window, depth)?;
                let q = log_probs(quantized, window, depth)?;
                sums.add(&p, &q, window);
            }
            Ok(sums.finish(depth))
        })
        .collect()
}

#[derive(Default)]
struct Sums {
    kl: f64,
    kl_max: f64,
    agree: usize,
    positions: usize,
    nll_float: f64,
    nll_quantized: f64,
    predicted: usize,
}

impl Sums {
    /// `p`, `q`: log-probabilities `[positions][vocab]` of the float and quantized models.
    fn add(&mut self, p: &[Vec<f64>], q: &[Vec<f64>], tokens: &[u32]) {
        for (s, (lp, lq)) in p.iter().zip(q).enumerate() {
            let kl: f64 = lp.iter().zip(lq).map(|(a, b)| a.exp() * (a - b)).sum();
            self.kl += kl;
            self.kl_max = self.kl_max.max(kl);
            self.agree += usize::from(argmax(lp) == argmax(lq));
            self.positions += 1;
            if let Some(&next) = tokens.get(s + 1) {
                self.nll_float -= lp[next as usize];
                self.nll_quantized -= lq[next as usize];
                self.predicted += 1;
            }
        }
    }

    fn finish(self, depth: usize) -> DepthDivergence {
        let positions = self.positions as f64;
        let predicted = self.predicted as f64;
        DepthDivergence {
            depth,
            kl_mean: self.kl / positions,
            kl_max: self.kl_max,
            top1_agreement: self.agree as f64 / positions,
            perplexity_float: (self.nll_float / predicted).exp(),
            perplexity_quantized: (self.nll_quantized / predicted).exp(),
        }
    }
}

/// Log-softmax of the model's logits after `depth` recurrence steps, one row per position.
fn log_probs(model: &Huginn, tokens: &[u32], depth: usize) -> Result<Vec<Vec<f64>>, AnalysisError> {
    let ids = model.tokens(&[tokens.to_vec()])?;
    let logits: Vec<f32> = model
        .forward(ids, depth)
        .logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| AnalysisError::Invalid(format!("reading the logits: {e:?}")))?;
    let vocab = model.config().vocab_size;
    Ok(logits
        .chunks_exact(vocab)
        .map(|row| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let log_sum = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
            row.iter().map(|&v| v as f64 - log_sum).collect()
        })
        .collect())
}

fn argmax(row: &[f64]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |best, (i, &v)| if v > best.1 { (i, v) } else { best },
        )
        .0
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::burn::prelude::*;
    use model::{Bits, HuginnConfig};

    fn windows() -> Vec<Vec<u32>> {
        vec![
            (0..24).map(|i| (i * 7 + 3) % 64).collect(),
            (0..9).map(|i| (i * 5 + 1) % 64).collect(),
        ]
    }

    #[test]
    fn a_model_against_itself_diverges_nowhere() {
        let model = HuginnConfig::tiny(64, 64, 2, (1, 2, 1)).init(&Device::flex(), 3);
        for d in divergence_by_depth(&model, &model, &windows(), &[1, 4]).unwrap() {
            assert!(d.kl_mean.abs() < 1e-12 && d.kl_max.abs() < 1e-12, "{d:?}");
            assert_eq!(d.top1_agreement, 1.0);
            assert_eq!(d.perplexity_float, d.perplexity_quantized);
        }
    }

    /// Four bits move the predictions more than eight, at every depth.
    #[test]
    fn four_bits_diverge_more_than_eight() {
        let model = HuginnConfig::tiny(64, 64, 2, (1, 2, 1)).init(&Device::flex(), 3);
        let by = |bits| divergence_by_depth(&model, &model.clone().quantize(bits), &windows(), &[2, 8]).unwrap();
        for (eight, four) in by(Bits::Eight).iter().zip(by(Bits::Four)) {
            assert!(
                eight.kl_mean > 0.0 && four.kl_mean > 4.0 * eight.kl_mean,
                "{eight:?} {four:?}"
            );
        }
    }

    #[test]
    fn a_window_of_one_token_is_refused() {
        let model = HuginnConfig::tiny(64, 64, 2, (1, 2, 1)).init(&Device::flex(), 3);
        let err = divergence_by_depth(&model, &model, &[vec![1]], &[1]).unwrap_err();
        assert!(err.to_string().contains("at least two tokens"));
    }
}
