//! Greedy generation with per-token adaptive exit through a cache keyed by (unrolled layer,
//! position), the reference's `generate_with_adaptive_compute` with the `full` lookup: a token
//! that exited early has no entry in the deeper iterations' slots, so later tokens attend there
//! only to the positions that reached them; each exit check rewrites the token's coda entries,
//! so a position keeps the coda entry of its exit step. This is the plain oracle for the
//! engine's strategies.

use std::collections::{BTreeMap, HashMap};

use model::burn::prelude::*;
use model::{Attend, Huginn, InitialState, InputError, KvCache, LayerSlot};

use crate::exit::{Criterion, ExitTracker, argmax};

/// Entries keyed by slot and position; writing a position again replaces its entry.
#[derive(Default)]
pub struct PositionCache {
    /// Position of the first token of the chunk being run.
    start: usize,
    slots: HashMap<LayerSlot, BTreeMap<usize, (Tensor<4>, Tensor<4>)>>,
}

impl PositionCache {
    /// Sets the position of the chunk the next calls belong to.
    pub fn at(&mut self, start: usize) {
        self.start = start;
    }

    /// Positions stored in `slot`.
    pub fn positions(&self, slot: LayerSlot) -> Vec<usize> {
        self.slots
            .get(&slot)
            .map(|s| s.keys().copied().collect())
            .unwrap_or_default()
    }
}

impl KvCache for PositionCache {
    fn update(&mut self, slot: LayerSlot, keys: Tensor<4>, values: Tensor<4>) -> Attend {
        let entries = self.slots.entry(slot).or_default();
        for j in 0..keys.dims()[2] {
            entries.insert(
                self.start + j,
                (keys.clone().narrow(2, j, 1), values.clone().narrow(2, j, 1)),
            );
        }
        // The chunk is always the latest positions, so bottom-right causal masking is right.
        let (keys, values): (Vec<_>, Vec<_>) = entries.values().cloned().unzip();
        Attend {
            keys: Tensor::cat(keys, 2),
            values: Tensor::cat(values, 2),
            mask: None,
        }
    }
}

/// How adaptive generation runs.
#[derive(Debug, Clone, Copy)]
pub struct AdaptiveConfig {
    pub criterion: Criterion,
    pub threshold: f64,
    /// Most recurrence steps per token.
    pub max_steps: usize,
    /// Start each new token from the previous token's raw final state.
    pub warm_start: bool,
}

/// New tokens, steps used for each, and the exit value after every step of every token.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveGeneration {
    pub tokens: Vec<u32>,
    pub steps_per_token: Vec<usize>,
    pub exit_values: Vec<Vec<f64>>,
}

pub fn generate(
    model: &Huginn,
    prompt: &[u32],
    max_new: usize,
    config: AdaptiveConfig,
) -> Result<AdaptiveGeneration, InputError> {
    let context = model.config().block_size;
    if prompt.len() + max_new > context {
        return Err(InputError::TooLong {
            len: prompt.len() + max_new,
            context,
        });
    }
    let vocab = model.config().vocab_size;
    let mut cache = PositionCache::default();
    let mut input = prompt.to_vec();
    let mut position = 0;
    let mut carried: Option<Tensor<3>> = None;
    let mut out = AdaptiveGeneration {
        tokens: vec![],
        steps_per_token: vec![],
        exit_values: vec![],
    };
    while out.tokens.len() < max_new {
        let len = input.len();
        let tokens = model.tokens(&[input.clone()])?;
        let rotary = model.rotary(position, 1, len);
        cache.at(position);
        let e = model.embed_prelude(tokens, &rotary, &mut cache);
        let init = carried.take().map_or(InitialState::Zeros, InitialState::Given);
        let mut state = model.initial_state(&e, &init);
        let mut tracker = ExitTracker::new(config.criterion, config.threshold, vocab, &state);
        let mut values = Vec::new();
        let mut logits = None;
        let mut steps = config.max_steps;
        for i in 0..config.max_steps {
            state = model.core_step(state, &e, i, &rotary, &mut cache);
            let last = if config.criterion.needs_logits() {
                let all = model.coda_head(state.clone(), &rotary, &mut cache);
                Some(host(all.narrow(1, len - 1, 1)))
            } else {
                None
            };
            let (value, exit) = tracker.check(&state, last.as_deref());
            values.push(value);
            logits = last;
            if exit {
                steps = i + 1;
                break;
            }
        }
        let logits = match logits {
            Some(l) => l,
            None => host(
                model
                    .coda_head(state.clone(), &rotary, &mut cache)
                    .narrow(1, len - 1, 1),
            ),
        };
        let next = argmax(&logits) as u32;
        out.tokens.push(next);
        out.steps_per_token.push(steps);
        out.exit_values.push(values);
        if config.warm_start {
            carried = Some(state.narrow(1, len - 1, 1));
        }
        position += len;
        input = vec![next];
    }
    Ok(out)
}

fn host(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 logits")
}
