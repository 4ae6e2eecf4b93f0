//! Greedy generation with per-token adaptive exit through a cache keyed by (unrolled layer,
//! position), the reference's `generate_with_adaptive_compute` with the `full` lookup: a token
//! that exited early has no entry in the deeper iterations' slots, so later tokens attend there
//! only to the positions that reached them; each exit check rewrites the token's coda entries,
//! so a position keeps the coda entry of its exit step. This is the plain oracle for the
//! engine's strategies.

use std::collections::BTreeMap;

use model::burn::prelude::*;
use model::{Attend, Huginn, InitialState, InputError, KvCache, LayerSlot};

use crate::exit::{Criterion, ExitTracker, argmax};
use crate::greedy::WarmStart;
use crate::strategy::{Layout, Strategy};

/// Entries keyed by unrolled layer (the reference's `step_idx`) and position; writing a position
/// again replaces its entry. Reads follow a [`Strategy`].
pub struct PositionCache {
    strategy: Strategy,
    layout: Layout,
    /// Position of the first token of the chunk being run.
    start: usize,
    slots: BTreeMap<i64, BTreeMap<usize, (Tensor<4>, Tensor<4>)>>,
}

impl PositionCache {
    pub fn new(strategy: Strategy, model: &Huginn) -> Self {
        let config = model.config();
        let layout = Layout {
            prelude: config.n_layers_in_prelude,
            core: config.n_layers_in_recurrent_block,
        };
        Self {
            strategy,
            layout,
            start: 0,
            slots: BTreeMap::new(),
        }
    }

    /// Sets the position of the chunk the next calls belong to.
    pub fn at(&mut self, start: usize) {
        self.start = start;
    }

    /// Drops every entry at position `len` or later (rollback after speculation).
    pub fn truncate(&mut self, len: usize) {
        for entries in self.slots.values_mut() {
            entries.retain(|p, _| *p < len);
        }
    }
}

impl KvCache for PositionCache {
    fn update(&mut self, slot: LayerSlot, keys: Tensor<4>, values: Tensor<4>) -> Attend {
        let sigma = self
            .strategy
            .compress(slot.reference_index(self.layout.prelude, self.layout.core), self.layout);
        let entries = self.slots.entry(sigma).or_default();
        let len = keys.dims()[2];
        for j in 0..len {
            entries.insert(
                self.start + j,
                (keys.clone().narrow(2, j, 1), values.clone().narrow(2, j, 1)),
            );
        }
        // Every position has a first-layer entry: it lists the positions seen so far.
        let last = self.start + len;
        let positions: Vec<usize> = match self.slots.get(&0) {
            Some(first) => first.keys().copied().filter(|p| *p < last).collect(),
            None => (self.start..last).collect(),
        };
        // As the reference: when every position has σ, σ is read as is; the strategy decides
        // only for positions that lack it (this matters for `always-last`).
        let complete = positions.iter().all(|p| self.slots[&sigma].contains_key(p));
        let mut picked_keys = Vec::new();
        let mut picked_values = Vec::new();
        for p in positions {
            let from = if complete {
                Some(sigma)
            } else {
                let has: Vec<i64> = self
                    .slots
                    .iter()
                    .filter(|(_, e)| e.contains_key(&p))
                    .map(|(s, _)| *s)
                    .collect();
                self.strategy.lookup(sigma, &has, self.layout)
            };
            if let Some(from) = from {
                let (k, v) = &self.slots[&from][&p];
                picked_keys.push(k.clone());
                picked_values.push(v.clone());
            }
        }
        // The chunk is always the latest positions, so bottom-right causal masking is right.
        Attend {
            keys: Tensor::cat(picked_keys, 2),
            values: Tensor::cat(picked_values, 2),
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
    /// Where each new token's recurrence starts.
    pub warm_start: WarmStart,
    pub strategy: Strategy,
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
    let mut cache = PositionCache::new(config.strategy, model);
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
        carried = match config.warm_start {
            WarmStart::Cold => None,
            WarmStart::Raw => Some(state.narrow(1, len - 1, 1)),
            WarmStart::Normalized => Some(model.latent(state.narrow(1, len - 1, 1))),
        };
        position += len;
        input = vec![next];
    }
    Ok(out)
}

fn host(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 logits")
}
