//! What the model predicts for the next token as the recurrence deepens: one pass of the
//! recurrence, reading the coda's prediction after every step.

use model::burn::prelude::*;
use model::burn::tensor::activation::softmax;
use model::{Huginn, InitialState, NoCache};

/// The model's view of the next token after `depth` recurrence steps.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DepthPrediction {
    pub depth: usize,
    /// Most likely next tokens with their probabilities, best first.
    pub top: Vec<(u32, f32)>,
    /// Entropy of the next-token distribution (nats).
    pub entropy: f32,
    /// `‖s_i − s_{i−1}‖ / ‖s_i‖`: how far the latent state still moves.
    pub relative_residual: f32,
}

/// Runs `prompt` for `max_depth` steps from `init` and reports the last position's
/// prediction after each step listed in `depths` (all steps when empty).
pub fn predictions_by_depth(
    model: &Huginn,
    prompt: &[u32],
    max_depth: usize,
    depths: &[usize],
    init: &InitialState,
    top_k: usize,
) -> Result<Vec<DepthPrediction>, model::InputError> {
    let tokens = model.tokens(&[prompt.to_vec()])?;
    let len = prompt.len();
    let rotary = model.rotary(0, len);
    let e = model.embed_prelude(tokens, &rotary, &mut NoCache);
    let s0 = model.initial_state(&e, init);
    let mut out = Vec::new();
    let mut previous = s0.clone();
    model.recur(&e, s0, 0..max_depth, &rotary, &mut NoCache, |i, state| {
        let depth = i + 1;
        let residual = rel_residual(state, &previous);
        previous = state.clone();
        if !depths.is_empty() && !depths.contains(&depth) {
            return;
        }
        // The coda attends over every position, so it runs on the whole state.
        let logits = model
            .coda_head(state.clone(), &rotary, &mut NoCache)
            .narrow(1, len - 1, 1);
        let probs: Vec<f32> = softmax(logits.reshape([model.config().vocab_size]), 0)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 logits");
        out.push(DepthPrediction {
            depth,
            top: top_k_of(&probs, top_k),
            entropy: entropy(&probs),
            relative_residual: residual,
        });
    });
    Ok(out)
}

fn rel_residual(state: &Tensor<3>, previous: &Tensor<3>) -> f32 {
    let diff = (state.clone() - previous.clone())
        .square()
        .sum()
        .sqrt()
        .into_scalar::<f32>();
    let norm = state.clone().square().sum().sqrt().into_scalar::<f32>();
    diff / norm.max(f32::MIN_POSITIVE)
}

fn entropy(probs: &[f32]) -> f32 {
    -probs.iter().filter(|p| **p > 0.0).map(|p| p * p.ln()).sum::<f32>()
}

fn top_k_of(probs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut order: Vec<u32> = (0..probs.len() as u32).collect();
    order.sort_by(|a, b| probs[*b as usize].total_cmp(&probs[*a as usize]));
    order.into_iter().take(k).map(|i| (i, probs[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::HuginnConfig;

    #[test]
    fn predictions_match_full_forward_at_each_depth() {
        let device = Device::flex();
        let model = HuginnConfig::tiny(40, 16, 2, (1, 2, 1)).init(&device, 9);
        let prompt = [3, 1, 4, 1, 5];
        let preds = predictions_by_depth(&model, &prompt, 6, &[1, 3, 6], &InitialState::Zeros, 40).unwrap();
        assert_eq!(preds.iter().map(|p| p.depth).collect::<Vec<_>>(), [1, 3, 6]);
        for p in &preds {
            let logits = model.forward(model.tokens(&[prompt.to_vec()]).unwrap(), p.depth).logits;
            let probs: Vec<f32> = softmax(logits.narrow(1, 4, 1).reshape([40]), 0)
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap();
            let (best, prob) = p.top[0];
            let want_best = top_k_of(&probs, 1)[0].0;
            assert_eq!(best, want_best);
            assert!((prob - probs[best as usize]).abs() < 1e-5);
            let total: f32 = p.top.iter().map(|t| t.1).sum();
            assert!((total - 1.0).abs() < 1e-4, "top-40 of 40 sums to one");
            assert!(p.entropy > 0.0 && p.entropy <= (40f32).ln() + 1e-4);
        }
        assert!(predictions_by_depth(&model, &[99], 2, &[], &InitialState::Zeros, 1).is_err());
    }
}
