//! How far a forward pass's activations go (recorded by [`model::probe`]), against the largest
//! value f16 holds: whether a model can run in f16 before anyone tries.

use model::{Huginn, probe};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::AnalysisError;

/// f16's largest finite value.
pub const F16_MAX: f32 = 65504.0;

/// Stages in the order a pass runs them.
const STAGES: [&str; 5] = ["embedding", "prelude", "core", "coda", "head"];

/// Points of a stage in the order a block computes them.
const POINTS: [&str; 10] = [
    "scaled embedding",
    "adapter output",
    "queries, keys and values",
    "attention output",
    "residual + attention",
    "MLP gate and up",
    "MLP hidden",
    "MLP output",
    "residual + MLP",
    "logits",
];

/// One point of the pass: the largest magnitude its finite values reached, in every layer and
/// iteration of its stage.
#[derive(Debug, Clone, PartialEq)]
pub struct PointRange {
    pub stage: &'static str,
    pub point: &'static str,
    pub largest: f32,
    pub not_finite: bool,
}

impl PointRange {
    pub fn fits_f16(&self) -> bool {
        !self.not_finite && self.largest <= F16_MAX
    }
}

/// Every point of one forward pass, in the order the pass reaches them.
#[derive(Debug, Clone)]
pub struct ActivationRanges {
    pub points: Vec<PointRange>,
}

/// `count` token ids drawn uniformly below `vocab`, reproducibly from `seed`.
pub fn random_ids(vocab: usize, count: usize, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let vocab = u32::try_from(vocab).unwrap_or(u32::MAX);
    (0..count).map(|_| rng.random_range(0..vocab)).collect()
}

/// Runs `ids` through `model` for `steps` recurrence steps from a zero state and records the
/// largest magnitude at every point of the pass.
pub fn activation_ranges(model: &Huginn, ids: &[u32], steps: usize) -> Result<ActivationRanges, AnalysisError> {
    let tokens = model.tokens(&[ids.to_vec()])?;
    let (forward, ranges) = probe::record(|| model.forward(tokens, steps));
    drop(forward);
    let rank = |list: &[&str], name: &str| list.iter().position(|n| *n == name).unwrap_or(list.len());
    let mut points: Vec<PointRange> = ranges
        .points
        .into_iter()
        .map(|((stage, point), range)| PointRange {
            stage,
            point,
            largest: range.largest,
            not_finite: range.not_finite,
        })
        .collect();
    points.sort_by_key(|p| (rank(&STAGES, p.stage), rank(&POINTS, p.point)));
    Ok(ActivationRanges { points })
}

impl ActivationRanges {
    /// Whether every point fits f16.
    pub fn fits_f16(&self) -> bool {
        self.points.iter().all(PointRange::fits_f16)
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<10} {:<26} {:>14} {:>12}  {}\n",
            "stage", "point", "largest |x|", "of f16 max", "fits f16"
        );
        for p in &self.points {
            let fits = match (p.not_finite, p.fits_f16()) {
                (true, _) => "no (not finite)",
                (false, true) => "yes",
                (false, false) => "no",
            };
            out += &format!(
                "{:<10} {:<26} {:>14.3} {:>11.2e}  {fits}\n",
                p.stage,
                p.point,
                p.largest,
                p.largest / F16_MAX
            );
        }
        out += &format!(
            "every activation fits f16: {}\n",
            if self.fits_f16() { "yes" } else { "no" }
        );
        out
    }

    pub fn json(&self, source: &str, dtype: &str) -> serde_json::Value {
        let points: Vec<_> = self
            .points
            .iter()
            .map(|p| {
                serde_json::json!({"stage": p.stage, "point": p.point, "largest": p.largest,
                                   "not_finite": p.not_finite, "fits_f16": p.fits_f16()})
            })
            .collect();
        serde_json::json!({"model": source, "dtype": dtype, "fits_f16": self.fits_f16(), "points": points})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::burn::prelude::*;
    use model::config::HuginnConfig;

    #[test]
    fn reports_every_stage_in_pass_order_and_flags_values_beyond_f16() {
        let device = Device::flex();
        let mut model = HuginnConfig::tiny(64, 32, 2, (1, 2, 1)).init(&device, 1);
        let ids = random_ids(64, 12, 5);
        assert_eq!(ids, random_ids(64, 12, 5));
        assert!(ids.iter().all(|&t| t < 64));
        let ranges = activation_ranges(&model, &ids, 4).unwrap();
        let stages: Vec<&str> = ranges.points.iter().map(|p| p.stage).collect();
        assert_eq!(stages.first(), Some(&"embedding"));
        assert_eq!(stages.last(), Some(&"head"));
        assert!(stages.windows(2).all(|w| rank(w[0]) <= rank(w[1])), "{stages:?}");
        assert!(ranges.fits_f16(), "{}", ranges.table());
        // Embeddings scaled far past f16's range: the table says so.
        model.wte = model.wte.map(|w| w.mul_scalar(1e6));
        let ranges = activation_ranges(&model, &ids, 4).unwrap();
        assert!(!ranges.fits_f16());
        assert!(ranges.table().contains("every activation fits f16: no"));
        // A token outside the vocabulary is refused, not run.
        assert!(activation_ranges(&model, &[64], 4).is_err());
    }

    fn rank(stage: &str) -> usize {
        STAGES.iter().position(|s| *s == stage).unwrap()
    }
}
