//! The diffusion-style ("wavefront") sampler of the reference's `generate_diffusion_style`
//! (follow-up work to the paper, arXiv:2510.14961). Instead of running `r` iterations on one
//! new token at a time, a wave of positions advances together: each wave runs
//! `inner_recurrence` core steps on every position in it, samples a guess for every position
//! after it, adds `headway` new positions at its front and freezes a prefix of positions whose
//! latent state has settled. Every weight read then serves the whole wave.
//!
//! The wave always starts at the last frozen token, whose state keeps iterating (it predicts the
//! next token); the positions behind it live only in the KV cache, with the entries of the last
//! wave they were in. After each wave the cache is rolled back to the frozen prefix, so the
//! positions still moving are recomputed by the next wave.
//!
//! The arithmetic follows the reference step by step, with three upstream faults fixed (each
//! is marked where it is fixed): guessed tokens come from the model's own vocabulary, the
//! `fixed` strategy rolls the cache back by the right count when the wave is at
//! `max_wavefront`, and a freeze never reaches back into the prompt. One behaviour differs on
//! purpose: a stop token ends the run as soon as it freezes (the reference looks for stop
//! tokens only after `num_steps` waves and returns the tokens frozen beyond them).

use std::ops::ControlFlow;
use std::str::FromStr;

use model::burn::prelude::*;
use model::burn::tensor::activation::relu;
use model::{Huginn, HuginnConfig, InitialState, InputError, NoCache};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::adaptive::{Decoding, MAX_STEPS};
use crate::cache::StrategyCache;
use crate::limits::{MAX_EXIT_THRESHOLD, kv_cache_bytes, positions};
use crate::range::{OutOfRange, within, within_f64};
use crate::sampling::Sampler;
use crate::strategy::{Compress, Lookup, Strategy};

/// When positions of the wave freeze (the reference's `freeze_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freeze {
    /// Freeze up to the last position whose state moved by less than `exit_t` (relative) since
    /// the previous wave.
    LatentDiff,
    /// The same on the change of that movement between waves (per position).
    LatentAcceleration1,
    /// The same on the second difference over three waves, aligned by position.
    LatentAcceleration2,
    /// Freeze up to the last position whose sampled token stayed the same for more than
    /// `num_steps / inner_recurrence` waves.
    TokenStability,
    /// After `num_steps / inner_recurrence` waves, freeze `headway` positions per wave.
    Fixed,
}

impl Freeze {
    pub fn name(self) -> &'static str {
        match self {
            Freeze::LatentDiff => "latent-diff",
            Freeze::LatentAcceleration1 => "latent-acceleration-1",
            Freeze::LatentAcceleration2 => "latent-acceleration-2",
            Freeze::TokenStability => "token-stability",
            Freeze::Fixed => "fixed",
        }
    }

    fn latent(self) -> bool {
        matches!(
            self,
            Freeze::LatentDiff | Freeze::LatentAcceleration1 | Freeze::LatentAcceleration2
        )
    }
}

impl FromStr for Freeze {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        [
            Freeze::LatentDiff,
            Freeze::LatentAcceleration1,
            Freeze::LatentAcceleration2,
            Freeze::TokenStability,
            Freeze::Fixed,
        ]
        .into_iter()
        .find(|f| f.name() == name)
        .ok_or_else(|| {
            format!(
                "unknown freeze strategy {name:?} (latent-diff, latent-acceleration-1, latent-acceleration-2, token-stability, fixed)"
            )
        })
    }
}

impl std::fmt::Display for Freeze {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The sampler's knobs, named and defaulted as the reference's keyword arguments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiffusionConfig {
    /// Recurrence of the prompt's pass; also the warm-up of `fixed` and the stability count of
    /// `token-stability`, both as `num_steps / inner_recurrence` waves.
    pub num_steps: usize,
    /// Core steps each wave runs on every position in it.
    pub inner_recurrence: usize,
    /// New positions the wave's front gains per wave (the first gets the sampled token, the
    /// others a random guess); at most the context left after the prompt.
    pub headway: usize,
    /// Weight of the previous wave's injection `e` in this wave's (an EMA over waves; 0: off).
    pub ema_embeds: f64,
    /// Share of fresh noise mixed into the states before each wave (0: off).
    pub state_noise_mixing: f64,
    /// Divide that share by 1 + the core steps a position has had.
    pub dampened_state_mixer: bool,
    /// Mix as `s·√(1−a) + √a·noise` instead of `s·(1−a) + a·noise`.
    pub sqrt_mixer: bool,
    pub freeze: Freeze,
    /// Threshold of the latent freeze strategies.
    pub exit_t: f64,
    /// Most positions in the wave; a full wave stops growing until positions freeze (0: no
    /// limit; a wave never outgrows the context, so a larger value is the same).
    pub max_wavefront: usize,
    /// Most waves, against settings that never freeze (the reference runs two more).
    pub max_diffusion_steps: usize,
    /// Run the prompt in one pass at `num_steps` first; otherwise the prompt is the first wave.
    pub full_prefill: bool,
    /// New positions start from the front of the wave's states instead of fresh noise.
    pub continuous_compute: bool,
    /// Scale of the random initial states and noise (the reference's `init_scale`; 0: zeros).
    pub init_scale: f64,
    /// Seeds the initial states, the noise and the guessed tokens.
    pub seed: u64,
    /// The KV-cache strategy.
    pub strategy: Strategy,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self {
            num_steps: 32,
            inner_recurrence: 4,
            headway: 1,
            ema_embeds: 0.1,
            state_noise_mixing: 0.5,
            dampened_state_mixer: true,
            sqrt_mixer: false,
            freeze: Freeze::LatentDiff,
            exit_t: 0.03,
            max_wavefront: 128,
            max_diffusion_steps: 4096,
            full_prefill: true,
            continuous_compute: false,
            init_scale: 1.0,
            seed: 0,
            strategy: Strategy {
                lookup: Lookup::LatestM,
                compress: Compress::Modulo(4),
            },
        }
    }
}

/// The most waves a run may ask for.
pub const MAX_DIFFUSION_STEPS: usize = 1 << 20;

/// The largest `init_scale`: the reference's is 1, and states a hundred times the trained scale
/// already drown the prompt's signal.
pub const MAX_INIT_SCALE: f64 = 100.0;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DiffusionError {
    #[error("invalid diffusion setting: {0}")]
    Config(String),
    #[error("invalid diffusion setting: {0}")]
    Range(#[from] OutOfRange),
    #[error(transparent)]
    Input(#[from] InputError),
}

impl DiffusionConfig {
    /// Checks the values a user can get wrong that do not depend on the model, before any work
    /// starts.
    pub fn validate(&self) -> Result<(), DiffusionError> {
        within("num_steps", self.num_steps, 1, MAX_STEPS)?;
        within("inner_recurrence", self.inner_recurrence, 1, MAX_STEPS)?;
        if self.headway == 0 {
            return Err(OutOfRange::new("headway", "at least 1", 0).into());
        }
        if self.max_wavefront == 1 {
            // One position is the last frozen token: it would never admit the next one.
            return Err(OutOfRange::new(
                "max_wavefront",
                "0 (no limit) or at least 2: a wave of one position never freezes",
                1,
            )
            .into());
        }
        within("max_diffusion_steps", self.max_diffusion_steps, 1, MAX_DIFFUSION_STEPS)?;
        within_f64("ema_embeds", self.ema_embeds, 0.0, 1.0)?;
        within_f64("state_noise_mixing", self.state_noise_mixing, 0.0, 1.0)?;
        within_f64("exit_t", self.exit_t, 0.0, MAX_EXIT_THRESHOLD)?;
        within_f64("init_scale", self.init_scale, 0.0, MAX_INIT_SCALE)?;
        Ok(())
    }

    /// [`Self::validate`], and the ranges that come from `model` and the request: the prompt
    /// and `max_new` tokens fit the context, and `headway` is at most the positions left after
    /// the prompt (a wave never reaches past the context, so a wider front is never run).
    pub fn check(&self, model: &HuginnConfig, prompt: usize, max_new: usize) -> Result<(), DiffusionError> {
        self.validate()?;
        let context = model.block_size;
        if prompt >= context {
            return Err(InputError::NoRoom {
                prompt,
                new: 1,
                context,
            }
            .into());
        }
        positions(model, prompt, max_new, 0)?;
        within("headway", self.headway, 1, context - prompt)?;
        if !self.full_prefill && self.max_wavefront > 0 && prompt > self.max_wavefront {
            return Err(DiffusionError::Config(format!(
                "without the prompt's pass the prompt ({prompt} tokens) must fit in max_wavefront ({})",
                self.max_wavefront
            )));
        }
        Ok(())
    }

    /// The most positions in one wave (before its front is added), and in the cache: every
    /// position up to the prompt, `max_new` tokens and a full wave beyond them, within the
    /// context.
    fn extent(&self, model: &HuginnConfig, prompt: usize, max_new: usize) -> Option<(usize, usize)> {
        let context = model.block_size;
        let wave = match self.max_wavefront {
            0 => context,
            most => most.min(context),
        };
        let positions = prompt.checked_add(max_new)?.checked_add(wave)?.min(context);
        Some((wave, positions))
    }

    /// The most bytes a run on `model` holds in its KV cache, `element_bytes` per number;
    /// `None` when that cannot be counted. Call after [`Self::check`].
    pub fn cache_bytes(
        &self,
        model: &HuginnConfig,
        prompt: usize,
        max_new: usize,
        element_bytes: usize,
    ) -> Option<usize> {
        let (_, positions) = self.extent(model, prompt, max_new)?;
        // The prompt's pass iterates `num_steps` times, each wave `inner_recurrence` times.
        let steps = self.num_steps.max(self.inner_recurrence);
        kv_cache_bytes(model, self.strategy, steps, positions, 1, element_bytes)
    }

    /// [`Self::cache_bytes`] and the wave's own tensors: its states, noise, injections and
    /// their EMA (a few `[1, L, h]`) and its logits `[1, L, V]`, on the device and copied to
    /// the host.
    pub fn memory_bytes(
        &self,
        model: &HuginnConfig,
        prompt: usize,
        max_new: usize,
        element_bytes: usize,
    ) -> Option<usize> {
        let (wave, _) = self.extent(model, prompt, max_new)?;
        let wave = wave.checked_add(self.headway)?;
        let tensors = wave.checked_mul(model.n_embd)?.checked_mul(8)?;
        let logits = wave.checked_mul(model.vocab_size)?.checked_mul(2)?;
        let numbers = tensors.checked_add(logits)?;
        self.cache_bytes(model, prompt, max_new, element_bytes)?
            .checked_add(numbers.checked_mul(element_bytes)?)
    }
}

/// What a run produced and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffusionGeneration {
    /// The frozen new tokens: freezes come in blocks, so possibly more than asked for (as the
    /// reference returns them); ends at the first stop token.
    pub tokens: Vec<u32>,
    /// Core steps run before each sampling: the prompt's pass, then each wave.
    pub steps_between_samplings: Vec<usize>,
    /// The first sampled row's chosen logit and log-sum-exp at each sampling (what the
    /// fixtures record).
    pub sampled: Vec<(f32, f32)>,
    pub stats: DiffusionStats,
}

/// The reference's summary counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct DiffusionStats {
    /// Core-block applications (each over the whole wave); the prompt's pass counts as one, as
    /// in the reference.
    pub core_forward_passes: usize,
    /// Positions times core steps.
    pub tokens_forward: usize,
    /// Cache positions rolled back.
    pub cache_clears: usize,
    /// Waves held at `max_wavefront`.
    pub standing_waves: usize,
    pub diffusion_steps: usize,
    /// Whether a stop token ended the run.
    pub stopped: bool,
}

/// Generates after `prompt` until at least `max_new` tokens are frozen, a stop token freezes,
/// the context is full or `max_diffusion_steps` waves have run. After the prompt's pass and
/// after every wave, `on_frozen` receives the block of newly frozen tokens (up to the stop
/// token; empty when the wave froze none) and may end the run: a caller whose client has gone
/// ends it there, a wave at most after it left.
pub fn generate(
    model: &Huginn,
    prompt: &[u32],
    max_new: usize,
    config: &DiffusionConfig,
    decoding: &Decoding,
    mut on_frozen: impl FnMut(&[u32]) -> ControlFlow<()>,
) -> Result<DiffusionGeneration, DiffusionError> {
    config.check(model.config(), prompt.len(), max_new)?;
    model.tokens(&[prompt.to_vec()])?;
    Wave::new(model, prompt, config, decoding).run(max_new, &mut on_frozen)
}

/// The state of one run, in the reference's bookkeeping: positions are absolute, and each
/// remembered tensor keeps the cache index the reference pairs it with.
struct Wave<'a> {
    model: &'a Huginn,
    config: &'a DiffusionConfig,
    stop_tokens: &'a [u32],
    sampler: Sampler,
    rng: ChaCha8Rng,
    draws: u64,
    cache: StrategyCache,
    prompt_len: usize,
    /// Frozen tokens, then the current guesses (the reference's `current_sequence`).
    sequence: Vec<u32>,
    frozen: usize,
    /// Positions in the cache (the reference's `_seen_tokens`).
    seen: usize,
    /// `[1, L, h]` states of positions `seen..seen + L`.
    states: Tensor<3>,
    /// Core steps each position has had.
    recurrence: Vec<usize>,
    /// Waves in which each position's token stayed what it was.
    stable: Vec<usize>,
    out: DiffusionGeneration,
}

/// A tensor with the cache index the reference remembers beside it.
struct Indexed {
    tensor: Tensor<3>,
    index: usize,
}

impl<'a> Wave<'a> {
    fn new(model: &'a Huginn, prompt: &[u32], config: &'a DiffusionConfig, decoding: &'a Decoding) -> Self {
        let device = model.device();
        let h = model.config().n_embd;
        Self {
            model,
            config,
            stop_tokens: &decoding.stop_tokens,
            sampler: Sampler::new(decoding.sampling),
            rng: ChaCha8Rng::seed_from_u64(config.seed ^ 0x5eed_d1ff),
            draws: 0,
            cache: StrategyCache::new(config.strategy, model),
            prompt_len: prompt.len(),
            sequence: prompt.to_vec(),
            frozen: prompt.len(),
            seen: 0,
            states: Tensor::zeros([1, 0, h], &device),
            recurrence: vec![0; model.config().block_size + config.headway + 1],
            stable: vec![0; model.config().block_size + config.headway + 1],
            out: DiffusionGeneration {
                tokens: vec![],
                steps_between_samplings: vec![],
                sampled: vec![],
                stats: DiffusionStats::default(),
            },
        }
    }

    /// Fresh states `[1, len, h]`: the reference's `initialize_state`, from its own seeded draw.
    fn fresh(&mut self, len: usize) -> Tensor<3> {
        let h = self.model.config().n_embd;
        let like = Tensor::zeros([1, len, h], (&self.model.device(), self.states.dtype()));
        if self.config.init_scale == 0.0 {
            return like;
        }
        self.draws += 1;
        let init = InitialState::LikeInit {
            seed: self
                .config
                .seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(self.draws),
            scale: self.config.init_scale,
        };
        self.model.initial_state(&like, &init)
    }

    fn run(
        mut self,
        max_new: usize,
        on_frozen: &mut impl FnMut(&[u32]) -> ControlFlow<()>,
    ) -> Result<DiffusionGeneration, DiffusionError> {
        let model = self.model;
        let config = self.config;
        let context = model.config().block_size;
        let p = self.prompt_len;
        // The injection of the previous wave, for the EMA.
        let mut old_embeds: Option<Indexed> = None;
        if config.full_prefill {
            let ids = model.tokens(&[self.sequence.clone()])?;
            let init = if config.init_scale == 0.0 {
                InitialState::Zeros
            } else {
                self.draws += 1;
                InitialState::LikeInit {
                    seed: config.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(self.draws),
                    scale: config.init_scale,
                }
            };
            self.cache.at(0);
            let out = model.forward_with(ids, config.num_steps, &init, 0, &mut self.cache, |_, _| {});
            self.seen = p;
            self.out.stats.core_forward_passes += 1;
            self.out.stats.tokens_forward += p;
            let logits = host_rows(out.logits.narrow(1, p - 1, 1));
            let token = self.sample(&logits, p)[0];
            self.out.steps_between_samplings.push(config.num_steps);
            self.sequence.push(token);
            self.frozen = p + 1;
            self.recurrence[..=p].iter_mut().for_each(|r| *r += config.num_steps);
            self.states = self.fresh(1);
            if self.emit(p, p + 1, on_frozen).is_break() {
                return Ok(self.out);
            }
        } else {
            self.states = self.fresh(p);
        }
        if config.ema_embeds > 0.0 {
            // As the reference: the whole sequence through the prelude, without the cache.
            let len = self.sequence.len();
            let ids = model.tokens(&[self.sequence.clone()])?;
            let tensor = model.embed_prelude(ids, &model.rotary(0, len), &mut NoCache);
            old_embeds = Some(Indexed { tensor, index: 0 });
        }
        let mut previous = config.freeze.latent().then(|| Indexed {
            tensor: self.states.clone(),
            index: 0,
        });
        let zeros = |like: &Tensor<3>| Tensor::zeros(like.dims(), (&like.device(), like.dtype()));
        let mut previous_delta = zeros(&self.states);
        let mut before_previous = Indexed {
            tensor: zeros(&self.states),
            index: 0,
        };
        let mut step = 0;
        while self.frozen - p < max_new && self.sequence.len() <= context {
            let c = self.seen;
            let len = self.states.dims()[1];
            let rotary = model.rotary(c, len);
            self.cache.at(c);
            let ids = model.tokens(&[self.sequence[c..c + len].to_vec()])?;
            let new_embeds = model.embed_prelude(ids, &rotary, &mut self.cache);
            self.seen = c + len;
            let embeds = match old_embeds.take() {
                Some(old) => {
                    let mixed = ema(new_embeds, &old, c, config.ema_embeds);
                    old_embeds = Some(Indexed {
                        tensor: mixed.clone(),
                        index: c,
                    });
                    mixed
                }
                None => new_embeds,
            };
            if config.state_noise_mixing > 0.0 {
                self.mix_noise(c, len);
            }
            for j in 0..config.inner_recurrence {
                let states = self.states.clone();
                self.states = model.core_step(states, &embeds, j, &rotary, &mut self.cache);
                self.recurrence[c..c + len].iter_mut().for_each(|r| *r += 1);
                self.out.stats.core_forward_passes += 1;
                self.out.stats.tokens_forward += len;
            }
            let logits = model.coda_head(self.states.clone(), &rotary, &mut self.cache);
            // Guesses for the positions after the frozen ones (and after the wave's first).
            let from = (self.frozen as i64 - 1 - c as i64).max(0) as usize;
            let guesses = self.sample(&host_rows(logits.narrow(1, from, len - from)), self.frozen);
            self.out.steps_between_samplings.push(config.inner_recurrence);
            let edits = self.sequence[..self.frozen]
                .iter()
                .chain(&guesses[..guesses.len() - 1])
                .copied();
            for (at, (now, edit)) in self.sequence.iter().zip(edits).enumerate() {
                self.stable[at] += usize::from(*now == edit);
            }
            self.sequence.truncate(self.frozen);
            self.sequence.extend_from_slice(&guesses);
            // Upstream draws these from 0..65510 whatever the vocabulary: fixed, the model's own.
            let vocab = model.config().vocab_size as u32;
            for _ in 1..config.headway {
                let guess = self.rng.random_range(0..vocab);
                self.sequence.push(guess);
            }
            let front = if config.continuous_compute && len >= config.headway {
                self.states.clone().narrow(1, len - config.headway, config.headway)
            } else {
                self.fresh(config.headway)
            };
            self.states = Tensor::cat(vec![self.states.clone(), front], 1);
            let extent = len + config.headway;
            let headway_in_step = if config.max_wavefront > 0 && extent > config.max_wavefront {
                self.states = self.states.clone().narrow(1, 0, config.max_wavefront);
                self.sequence.truncate(c + config.max_wavefront);
                self.out.stats.standing_waves += 1;
                config.max_wavefront - len
            } else {
                config.headway
            };
            let frozen_before = self.frozen;
            let freeze_at = match config.freeze {
                Freeze::LatentDiff | Freeze::LatentAcceleration1 | Freeze::LatentAcceleration2 => {
                    let prev = previous.as_ref().expect("latent strategies keep the previous states");
                    let criterion = match config.freeze {
                        Freeze::LatentDiff => match matched(&self.states, prev, c) {
                            Some((now, before)) => relative_norms(now.clone() - before, now),
                            None => vec![],
                        },
                        Freeze::LatentAcceleration1 => match matched(&self.states, prev, c) {
                            Some((now, before)) => {
                                let delta = now.clone() - before;
                                let n = delta.dims()[1].min(previous_delta.dims()[1]);
                                let acceleration =
                                    delta.clone().narrow(1, 0, n) - previous_delta.clone().narrow(1, 0, n);
                                previous_delta = delta;
                                relative_norms(acceleration, now.narrow(1, 0, n))
                            }
                            None => vec![],
                        },
                        _ => {
                            let start = c.max(prev.index).max(before_previous.index);
                            let end = (c + self.states.dims()[1])
                                .min(prev.index + prev.tensor.dims()[1])
                                .min(before_previous.index + before_previous.tensor.dims()[1]);
                            if end <= start {
                                vec![]
                            } else {
                                let at = |t: &Indexed| t.tensor.clone().narrow(1, start - t.index, end - start);
                                let now = self.states.clone().narrow(1, start - c, end - start);
                                let (prev, older) = (at(prev), at(&before_previous));
                                let acceleration = (now.clone() - prev.clone()) - (prev - older);
                                let norms = row_norms(now);
                                row_norms(acceleration)
                                    .into_iter()
                                    .zip(norms)
                                    .map(|(a, n)| a / (n + 1e-6))
                                    .collect()
                            }
                        }
                    };
                    criterion
                        .iter()
                        .rposition(|&v| v < config.exit_t as f32)
                        .map(|at| c + at + 1)
                }
                Freeze::TokenStability => {
                    let needed = config.num_steps / config.inner_recurrence;
                    self.stable.iter().rposition(|&s| s > needed).map(|at| at + 1)
                }
                Freeze::Fixed => None,
            };
            // Upstream could freeze back into the prompt when the prompt is the first wave (and
            // then resample it): a freeze that does not reach past the frozen tokens is none.
            let freeze_at = freeze_at.filter(|&k| k >= self.frozen);
            let clear = match (config.freeze, freeze_at) {
                (Freeze::Fixed, _) if step > config.num_steps / config.inner_recurrence => {
                    self.states =
                        self.states
                            .clone()
                            .narrow(1, headway_in_step, self.states.dims()[1] - headway_in_step);
                    self.frozen += headway_in_step;
                    // Upstream subtracts `headway` once more, which is `headway_in_step` except
                    // when the wave is at `max_wavefront`, where it then reads past the sequence.
                    len - headway_in_step
                }
                (_, Some(k)) => {
                    self.states = self
                        .states
                        .clone()
                        .narrow(1, k - c - 1, self.states.dims()[1] - (k - c - 1));
                    self.frozen = k;
                    self.sequence.len() - headway_in_step - k + 1
                }
                (_, None) => self.states.dims()[1] - headway_in_step,
            };
            self.seen -= clear;
            self.cache.truncate(self.seen);
            self.out.stats.cache_clears += clear;
            if config.freeze == Freeze::LatentAcceleration2
                && let Some(prev) = previous.take()
            {
                before_previous = prev;
            }
            if config.freeze.latent() {
                previous = Some(Indexed {
                    tensor: self.states.clone(),
                    index: c,
                });
            }
            step += 1;
            self.out.stats.diffusion_steps = step;
            if self.emit(frozen_before.max(p), self.frozen, on_frozen).is_break() || step >= config.max_diffusion_steps
            {
                break;
            }
        }
        Ok(self.out)
    }

    /// Samples one token per row of `logits`, with the first `history` tokens as the context.
    fn sample(&mut self, logits: &[Vec<f32>], history: usize) -> Vec<u32> {
        let tokens: Vec<u32> = logits
            .iter()
            .map(|row| self.sampler.sample(row, &self.sequence[..history]))
            .collect();
        let first = &logits[0];
        let top = first.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = top + first.iter().map(|&l| (l - top).exp()).sum::<f32>().ln();
        self.out.sampled.push((first[tokens[0] as usize], lse));
        tokens
    }

    /// Mixes fresh noise into the states of positions `c..c + len` (dampened by the core steps
    /// each position has had, when asked).
    fn mix_noise(&mut self, c: usize, len: usize) {
        let noise = self.fresh(len);
        let device = self.states.device();
        let mix = self.config.state_noise_mixing as f32;
        let shares: Vec<f32> = if self.config.dampened_state_mixer {
            self.recurrence[c..c + len]
                .iter()
                .map(|&r| mix / (1 + r) as f32)
                .collect()
        } else {
            vec![mix; len]
        };
        let share = Tensor::<1>::from_data(TensorData::new(shares, [len]), &device)
            .cast(self.states.dtype())
            .reshape([1, len, 1]);
        let states = self.states.clone();
        self.states = if self.config.sqrt_mixer {
            states * relu(share.clone().neg().add_scalar(1.0)).sqrt() + share.sqrt() * noise
        } else {
            states * share.clone().neg().add_scalar(1.0) + share * noise
        };
    }

    /// Hands the new tokens frozen at positions `from..to` (possibly none) to the caller, up
    /// to a stop token.
    fn emit(
        &mut self,
        from: usize,
        to: usize,
        on_frozen: &mut impl FnMut(&[u32]) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let mut block = &self.sequence[from..to];
        let stop = block.iter().position(|t| self.stop_tokens.contains(t));
        if let Some(at) = stop {
            block = &block[..=at];
            self.out.stats.stopped = true;
        }
        self.out.tokens.extend_from_slice(block);
        let flow = on_frozen(block);
        if stop.is_some() { ControlFlow::Break(()) } else { flow }
    }
}

/// `new·(1−w) + old·w` over the positions both cover (the reference's `ema_embeds`): `old`
/// belongs to the wave that started at `old.index`.
fn ema(new: Tensor<3>, old: &Indexed, c: usize, weight: f64) -> Tensor<3> {
    let [_, len, _] = new.dims();
    let mixed = new.mul_scalar(1.0 - weight);
    let skip = c - old.index;
    let old_len = old.tensor.dims()[1];
    let shared = old_len.saturating_sub(skip).min(len);
    if shared == 0 {
        return mixed;
    }
    let old = old.tensor.clone().narrow(1, skip, shared).mul_scalar(weight);
    if shared == len {
        return mixed + old;
    }
    let head = mixed.clone().narrow(1, 0, shared) + old;
    Tensor::cat(vec![head, mixed.narrow(1, shared, len - shared)], 1)
}

/// The states of this wave and of the previous one, paired as the reference pairs them: the
/// previous tensor is cut by the distance between the two waves' cache indices. (Upstream, the
/// previous tensor was already cut at its own freeze, so after a freeze the pairs are one
/// freeze apart; kept, since the reference's freezes are defined by it.)
/// `None` when they share no position.
fn matched(states: &Tensor<3>, previous: &Indexed, c: usize) -> Option<(Tensor<3>, Tensor<3>)> {
    let skip = c - previous.index;
    let n = previous.tensor.dims()[1].saturating_sub(skip).min(states.dims()[1]);
    (n > 0).then(|| {
        (
            states.clone().narrow(1, 0, n),
            previous.tensor.clone().narrow(1, skip, n),
        )
    })
}

/// `‖a‖ / ‖b‖` per position.
fn relative_norms(a: Tensor<3>, b: Tensor<3>) -> Vec<f32> {
    row_norms(a).into_iter().zip(row_norms(b)).map(|(a, b)| a / b).collect()
}

/// The Euclidean norm of each position's vector, on the host.
fn row_norms(t: Tensor<3>) -> Vec<f32> {
    let [_, n, _] = t.dims();
    if n == 0 {
        return vec![];
    }
    t.cast(model::burn::tensor::FloatDType::F32)
        .powi_scalar(2)
        .sum_dim(2)
        .sqrt()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 norms")
}

/// `[1, S, V]` logits as one host row per position.
fn host_rows(logits: Tensor<3>) -> Vec<Vec<f32>> {
    let vocab = logits.dims()[2];
    let flat: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 logits");
    flat.chunks(vocab).map(<[f32]>::to_vec).collect()
}
