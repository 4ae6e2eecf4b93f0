//! Self-speculative decoding (the reference's `generate_speculative`): the same model drafts
//! `lookahead` tokens with few recurrence steps, then verifies them in ONE forward pass at the
//! full depth; the longest agreeing prefix is kept, the first disagreement is replaced by the
//! verifier's own token, and the cache is rolled back to what was kept. Greedy speculative
//! output therefore equals plain greedy output at the verification depth.

use model::{Huginn, InitialState, InputError};

use crate::cache::StrategyCache;
use crate::exit::argmax;
use crate::strategy::Strategy;

#[derive(Debug, Clone, Copy)]
pub struct SpeculativeConfig {
    /// Recurrence steps per drafted token.
    pub draft_steps: usize,
    /// Tokens drafted per round.
    pub lookahead: usize,
    /// Recurrence steps of the verifying pass (and of the prompt).
    pub verify_steps: usize,
    /// 1 (or more): accept a draft when it is the verifier's argmax; below 1: when its verifier
    /// probability is at least `threshold` times the verifier's top probability.
    pub threshold: f64,
}

/// New tokens (possibly a few more than asked for: a round's accepted tokens are kept whole)
/// and the recurrence steps run between consecutive token choices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeculativeGeneration {
    pub tokens: Vec<u32>,
    pub steps_between_tokens: Vec<usize>,
}

pub fn generate(
    model: &Huginn,
    prompt: &[u32],
    max_new: usize,
    config: SpeculativeConfig,
) -> Result<SpeculativeGeneration, InputError> {
    let context = model.config().block_size;
    let longest = prompt.len() + max_new + config.lookahead;
    if longest > context {
        return Err(InputError::TooLong { len: longest, context });
    }
    let mut cache = StrategyCache::new(Strategy::default(), model);
    let run = |cache: &mut StrategyCache, tokens: &[u32], start: usize, steps: usize| {
        cache.at(start);
        let ids = model.tokens(&[tokens.to_vec()])?;
        let out = model.forward_with(ids, steps, &InitialState::Zeros, start, cache, |_, _| {});
        let vocab = model.config().vocab_size;
        let flat: Vec<f32> = out
            .logits
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 logits");
        Ok::<_, InputError>(flat.chunks(vocab).map(<[f32]>::to_vec).collect::<Vec<_>>())
    };
    let mut out = SpeculativeGeneration {
        tokens: vec![],
        steps_between_tokens: vec![],
    };
    let prefill = run(&mut cache, prompt, 0, config.verify_steps)?;
    out.tokens.push(argmax(prefill.last().expect("a prompt")) as u32);
    out.steps_between_tokens.push(config.verify_steps);
    // Positions in the cache; the last chosen token is never in it yet.
    let mut cached = prompt.len();
    let mut pending_steps = 0;
    while out.tokens.len() < max_new {
        let last = *out.tokens.last().expect("one token");
        let mut drafts = Vec::with_capacity(config.lookahead);
        for j in 0..config.lookahead {
            let feed = if j == 0 { last } else { drafts[j - 1] };
            let logits = run(&mut cache, &[feed], cached + j, config.draft_steps)?;
            drafts.push(argmax(&logits[0]) as u32);
            out.steps_between_tokens.push(pending_steps + config.draft_steps);
            pending_steps = 0;
        }
        cache.truncate(cached);
        let mut input = vec![last];
        input.extend_from_slice(&drafts[..drafts.len() - 1]);
        let verified = run(&mut cache, &input, cached, config.verify_steps)?;
        let mut kept = drafts.len();
        for (i, (logits, &draft)) in verified.iter().zip(&drafts).enumerate() {
            if !accepts(logits, draft, config.threshold) {
                kept = i;
                break;
            }
        }
        out.tokens.extend_from_slice(&drafts[..kept]);
        if kept < drafts.len() {
            out.tokens.push(argmax(&verified[kept]) as u32);
            out.steps_between_tokens.push(config.verify_steps);
            cached += 1 + kept;
        } else {
            pending_steps = config.verify_steps;
            cached += drafts.len();
        }
        cache.truncate(cached);
    }
    Ok(out)
}

fn accepts(logits: &[f32], draft: u32, threshold: f64) -> bool {
    if threshold >= 1.0 {
        return argmax(logits) == draft as usize;
    }
    // p(draft) / p(top) = exp(logit(draft) − logit(top)).
    let top = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    ((logits[draft as usize] - top) as f64).exp() >= threshold
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::greedy;
    use crate::warm_start::WarmStart;
    use model::HuginnConfig;
    use model::burn::prelude::Device;

    #[test]
    fn greedy_speculative_output_equals_plain_greedy_at_the_verify_depth() {
        let model = HuginnConfig::tiny(50, 32, 4, (1, 2, 1)).init(&Device::flex(), 31);
        let prompt = [4, 8, 15, 16, 23];
        for (draft_steps, lookahead) in [(1, 2), (2, 4), (6, 3)] {
            let config = SpeculativeConfig {
                draft_steps,
                lookahead,
                verify_steps: 6,
                threshold: 1.0,
            };
            let spec = generate(&model, &prompt, 10, config).unwrap();
            let plain = greedy::generate(&model, &prompt, spec.tokens.len(), 6, WarmStart::Cold).unwrap();
            assert_eq!(spec.tokens, plain.tokens, "draft {draft_steps}, lookahead {lookahead}");
        }
    }
}
