//! Evaluation of a model at fixed depths, and the paper's health monitors of the latent state.
//!
//! * **relative residual** `‖s_r − s_{r−1}‖ / ‖s_r‖`, averaged over tokens: how far the last
//!   recurrence step still moved the state (small = converged to a fixed point);
//! * **token correlation**: the mean cosine similarity between the final states of different
//!   positions of a row. The paper watched it during its failed runs: when it goes to 1, every
//!   token has the same state and the model has collapsed.

use burn::prelude::*;
use model::{Huginn, InitialState, NoCache, cross_entropy};
use serde::{Deserialize, Serialize};

use crate::batch::Batch;

/// Loss and (for tasks) exact-match accuracy on a batch at one depth, from a zero state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: Option<f64>,
}

/// Evaluates `batch` after `depth` recurrence steps with one forward pass.
pub fn evaluate(model: &Huginn, batch: &Batch, depth: usize, exact_match: bool) -> Evaluation {
    evaluate_depths(model, batch, &[depth], exact_match)[0]
}

/// Evaluates `batch` at each of `depths` (in that order) along one recurrence: the state after
/// `d` steps is read out through the coda as the recurrence passes it, so probing 1, 2, …, 64
/// costs 64 core steps, not 127.
pub fn evaluate_depths(model: &Huginn, batch: &Batch, depths: &[usize], exact_match: bool) -> Vec<Evaluation> {
    let [_, len] = batch.inputs.dims();
    let rotary = model.rotary(0, len);
    let e = model.embed_prelude(batch.inputs.clone(), &rotary, &mut NoCache);
    let s0 = model.initial_state(&e, &InitialState::Zeros);
    let mut found = vec![None; depths.len()];
    let mut read_out = |steps: usize, state: &Tensor<3>| {
        if depths.contains(&steps) {
            let logits = model.coda_head(state.clone(), &rotary, &mut NoCache);
            let evaluation = score(logits, batch, exact_match);
            for (slot, _) in depths.iter().enumerate().filter(|(_, d)| **d == steps) {
                found[slot] = Some(evaluation);
            }
        }
    };
    read_out(0, &s0);
    let deepest = depths.iter().copied().max().unwrap_or(0);
    model.recur(&e, s0, 0..deepest, &rotary, &mut NoCache, |i, state| {
        read_out(i + 1, state)
    });
    found.into_iter().map(|e| e.expect("every depth is reached")).collect()
}

/// Loss and exact match of `logits` against the batch's labels.
fn score(logits: Tensor<3>, batch: &Batch, exact_match: bool) -> Evaluation {
    let loss = cross_entropy(logits.clone(), batch.labels.clone()).into_scalar::<f32>() as f64;
    let accuracy = exact_match.then(|| {
        let predicted = logits.argmax(2).squeeze_dim::<2>(2);
        let scored = batch.labels.clone().not_equal_elem(-100);
        let wrong = predicted
            .not_equal(batch.labels.clone())
            .bool_and(scored)
            .int()
            .sum_dim(1);
        let rows = wrong.dims()[0];
        wrong.equal_elem(0).int().sum().into_scalar::<i64>() as f64 / rows as f64
    });
    Evaluation { loss, accuracy }
}

/// The latent-state monitors at one depth.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Monitors {
    pub relative_residual: f64,
    pub token_correlation: f64,
}

/// Runs `depth ≥ 1` steps on `inputs` from a zero state and measures the monitors.
pub fn monitors(model: &Huginn, inputs: Tensor<2, Int>, depth: usize) -> Monitors {
    let mut previous: Option<Tensor<3>> = None;
    let mut last: Option<Tensor<3>> = None;
    model.forward_with(inputs, depth.max(1), &InitialState::Zeros, 0, &mut NoCache, |_, s| {
        previous = last.take();
        last = Some(s.clone());
    });
    let last = last.expect("at least one step");
    let previous = previous.unwrap_or_else(|| last.zeros_like());
    let norm = |t: Tensor<3>| t.square().sum_dim(2).sqrt();
    let relative_residual = (norm(last.clone() - previous) / norm(last.clone()).clamp_min(1e-12))
        .mean()
        .into_scalar::<f32>() as f64;
    let [b, s, _] = last.dims();
    let unit = last.clone() / norm(last).clamp_min(1e-12);
    let similarity = unit.clone().matmul(unit.swap_dims(1, 2));
    // Off-diagonal mean: the diagonal holds s ones per row.
    let pairs = (b * s * (s - 1)).max(1) as f64;
    let total = similarity.sum().into_scalar::<f32>() as f64;
    let token_correlation = if s > 1 { (total - (b * s) as f64) / pairs } else { 1.0 };
    Monitors {
        relative_residual,
        token_correlation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::HuginnConfig;

    #[test]
    fn one_recurrence_reads_out_every_depth_as_separate_passes_do() {
        let device = Device::flex();
        let model = HuginnConfig::tiny(16, 16, 2, (1, 1, 1)).init(&device, 3);
        let inputs = model.tokens(&[vec![1, 2, 3, 4], vec![5, 6, 7, 8]]).unwrap();
        let labels = Tensor::from_data(TensorData::new(vec![-100i64, 3, 4, 5, -100, 7, 8, 9], [2, 4]), &device);
        let batch = Batch { inputs, labels };
        let depths = [4, 0, 1, 4, 2];
        let together = evaluate_depths(&model, &batch, &depths, true);
        for (&d, e) in depths.iter().zip(&together) {
            let alone = model.forward(batch.inputs.clone(), d).logits;
            let alone = score(alone, &batch, true);
            assert!((e.loss - alone.loss).abs() < 1e-6, "depth {d}: {e:?} {alone:?}");
            assert_eq!(e.accuracy, alone.accuracy);
        }
        assert_ne!(together[1].loss, together[0].loss, "depths differ");
    }

    #[test]
    fn monitors_match_their_definitions() {
        let device = Device::flex();
        let model = HuginnConfig::tiny(16, 16, 2, (1, 1, 1)).init(&device, 2);
        let inputs = model.tokens(&[vec![1, 2, 3, 4], vec![5, 6, 7, 8]]).unwrap();
        let m = monitors(&model, inputs.clone(), 3);
        // The same quantities from host-side vectors.
        let mut states = Vec::new();
        model.forward_with(inputs, 3, &InitialState::Zeros, 0, &mut NoCache, |_, s| {
            states.push(s.to_data().convert::<f32>().try_to_vec::<f32>().unwrap())
        });
        let (h, last, prev) = (16, &states[2], &states[1]);
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum::<f64>();
        let mut residual = 0.0;
        let mut cosines = Vec::new();
        for t in 0..8 {
            let s = &last[t * h..(t + 1) * h];
            let d: Vec<f32> = s.iter().zip(&prev[t * h..(t + 1) * h]).map(|(a, b)| a - b).collect();
            residual += (dot(&d, &d) / dot(s, s)).sqrt() / 8.0;
        }
        for row in 0..2 {
            for i in 0..4 {
                for j in 0..4 {
                    if i != j {
                        let (a, b) = (&last[(row * 4 + i) * h..][..h], &last[(row * 4 + j) * h..][..h]);
                        cosines.push(dot(a, b) / (dot(a, a) * dot(b, b)).sqrt());
                    }
                }
            }
        }
        let correlation = cosines.iter().sum::<f64>() / cosines.len() as f64;
        assert!((m.relative_residual - residual).abs() < 1e-4, "{m:?} {residual}");
        assert!((m.token_correlation - correlation).abs() < 1e-4, "{m:?} {correlation}");
        assert!(m.relative_residual > 0.0 && m.token_correlation < 1.0);
    }
}
