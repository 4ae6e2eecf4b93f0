//! The generation engine: the reference's `generate_with_adaptive_compute` for batches of
//! rows, through a [`StrategyCache`]. Each token iterates the core until its row's exit
//! criterion fires (or the most steps); each exit check rewrites the token's coda entries, so a
//! position keeps the coda entry of its exit step. Rows sample and end on their own.

use std::ops::ControlFlow;

use model::burn::prelude::*;
use model::{Huginn, InitialState, InputError, Rotary};

use crate::cache::{StrategyCache, row_index};
use crate::exit::{Criterion, ExitTracker};
use crate::sampling::{Sampler, SamplingConfig};
use crate::strategy::Strategy;
use crate::warm_start::WarmStart;

/// How adaptive generation runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConfig {
    pub criterion: Criterion,
    pub threshold: f64,
    /// Most recurrence steps per token.
    pub max_steps: usize,
    /// Where each new token's recurrence starts.
    pub warm_start: WarmStart,
    pub strategy: Strategy,
}

impl AdaptiveConfig {
    /// Every token gets exactly `steps` recurrence steps (the criterion that never exits).
    pub fn fixed(steps: usize, warm_start: WarmStart, strategy: Strategy) -> Self {
        Self {
            criterion: Criterion::None,
            threshold: 0.0,
            max_steps: steps,
            warm_start,
            strategy,
        }
    }
}

/// New tokens, steps used for each, and the exit value after every step of every token.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveGeneration {
    pub tokens: Vec<u32>,
    pub steps_per_token: Vec<usize>,
    pub exit_values: Vec<Vec<f64>>,
}

/// Adaptive generation for one prompt.
pub fn generate(
    model: &Huginn,
    prompt: &[u32],
    max_new: usize,
    config: AdaptiveConfig,
) -> Result<AdaptiveGeneration, InputError> {
    let mut rows = generate_batch(model, &[prompt.to_vec()], max_new, config)?;
    Ok(rows.pop().expect("one row"))
}

/// Adaptive generation for a batch of prompts of equal length, as the reference batches: every
/// row checks its own exit and takes its token from its own exit step, while the batch keeps
/// iterating until every row has exited (so a row's cache holds entries beyond its exit).
/// Greedy, no stop tokens.
pub fn generate_batch(
    model: &Huginn,
    prompts: &[Vec<u32>],
    max_new: usize,
    config: AdaptiveConfig,
) -> Result<Vec<AdaptiveGeneration>, InputError> {
    generate_batch_with(model, prompts, max_new, config, &Decoding::default())
}

/// The id fed at padding positions; any id works, padding is never attended to.
const PAD_TOKEN: u32 = 0;

/// How tokens are chosen and when a sequence ends.
#[derive(Debug, Clone, Default)]
pub struct Decoding {
    pub sampling: SamplingConfig,
    /// A row ends after emitting one of these (the token is kept).
    pub stop_tokens: Vec<u32>,
}

/// [`generate_batch`] with sampling and stop tokens; each row samples with its own generator
/// (seed + row index) and ends on its own.
pub fn generate_batch_with(
    model: &Huginn,
    prompts: &[Vec<u32>],
    max_new: usize,
    config: AdaptiveConfig,
    decoding: &Decoding,
) -> Result<Vec<AdaptiveGeneration>, InputError> {
    generate_rows(model, &rows_of(prompts, max_new, decoding), config, |_, _, _, _| {
        ControlFlow::Continue(())
    })
}

/// [`generate_batch_with`] for one prompt, handing each token to `on_token(token, steps)` as
/// soon as it is chosen (to print it, or to end the sequence on what it spells: `Break` ends
/// it after that token).
pub fn generate_streaming(
    model: &Huginn,
    prompt: &[u32],
    max_new: usize,
    config: AdaptiveConfig,
    decoding: &Decoding,
    mut on_token: impl FnMut(u32, usize) -> ControlFlow<()>,
) -> Result<AdaptiveGeneration, InputError> {
    let rows = rows_of(&[prompt.to_vec()], max_new, decoding);
    let mut rows = generate_rows(model, &rows, config, |_, token, steps, _| on_token(token, steps))?;
    Ok(rows.pop().expect("one row"))
}

/// [`generate_streaming`] with a callback that can fail (writing the token out, say): its
/// first error ends generation and is returned.
pub fn try_generate_streaming<E: From<InputError>>(
    model: &Huginn,
    prompt: &[u32],
    max_new: usize,
    config: AdaptiveConfig,
    decoding: &Decoding,
    mut on_token: impl FnMut(u32, usize) -> Result<ControlFlow<()>, E>,
) -> Result<AdaptiveGeneration, E> {
    let mut failed = None;
    let generation = generate_streaming(model, prompt, max_new, config, decoding, |token, steps| {
        on_token(token, steps).unwrap_or_else(|err| {
            failed = Some(err);
            ControlFlow::Break(())
        })
    })?;
    failed.map_or(Ok(generation), Err)
}

/// One sequence of a batch: its prompt, how many tokens it may add and how it picks them.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub prompt: Vec<u32>,
    pub max_new: usize,
    pub decoding: Decoding,
}

/// The most recurrence steps per token any command or request may ask for: a bound on absurd
/// values (a trained model's latent state settles within tens of steps, and a full cache grows
/// with the depth), refused with this number in the message.
pub const MAX_STEPS: usize = 1024;

/// Generation for rows that each sample, stop and end on their own: a row ends after
/// `max_new` tokens, a stop token, or `Break` from `on_token(row, token, steps, logits)` (the
/// logits the token was drawn from, for its log probability), and then
/// leaves the batch at once with its cache entries, so the others run on without it. Ragged
/// prompts are left-padded and masked, so with a fixed depth each row computes what it would
/// alone. With an exit criterion every row exits on its own, but the batch iterates each token
/// until its last row exits, and those extra steps stay in the cache that the row's later
/// tokens read (as the reference's batched generation).
pub fn generate_rows(
    model: &Huginn,
    rows: &[Row],
    config: AdaptiveConfig,
    on_token: impl FnMut(usize, u32, usize, &[f32]) -> ControlFlow<()>,
) -> Result<Vec<AdaptiveGeneration>, InputError> {
    let context = model.config().block_size;
    if let Some(row) = rows.iter().find(|r| r.prompt.len() + r.max_new > context) {
        return Err(InputError::NoRoom {
            prompt: row.prompt.len(),
            new: row.max_new,
            context,
        });
    }
    // Ragged prompts are left-padded; padding is masked out and positions count from each
    // row's first real token, so every row computes what it would alone.
    let width = rows.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    let pads: Vec<usize> = rows.iter().map(|r| width - r.prompt.len()).collect();
    let mut session = Session::new(model, config);
    session.cache.pad(pads.clone());
    let input = rows
        .iter()
        .zip(&pads)
        .map(|(r, &pad)| [vec![PAD_TOKEN; pad], r.prompt.clone()].concat())
        .collect();
    decode(&mut session, rows, input, on_token)
}

/// The generation loop over `session`: runs `input` (per row, what its cache still lacks of
/// its prompt), then samples and feeds one token per row at a time.
fn decode(
    session: &mut Session<'_>,
    rows: &[Row],
    mut input: Vec<Vec<u32>>,
    mut on_token: impl FnMut(usize, u32, usize, &[f32]) -> ControlFlow<()>,
) -> Result<Vec<AdaptiveGeneration>, InputError> {
    let mut samplers: Vec<Sampler> = rows.iter().map(|r| Sampler::new(r.decoding.sampling)).collect();
    let mut history: Vec<Vec<u32>> = rows.iter().map(|r| r.prompt.clone()).collect();
    let mut out = vec![
        AdaptiveGeneration {
            tokens: vec![],
            steps_per_token: vec![],
            exit_values: vec![]
        };
        rows.len()
    ];
    // The rows still running, by their index in `rows`.
    let mut active: Vec<usize> = (0..rows.len()).filter(|&b| rows[b].max_new > 0).collect();
    if active.len() < rows.len() {
        session.retain(&active);
        input = active.iter().map(|&b| std::mem::take(&mut input[b])).collect();
    }
    while !active.is_empty() {
        let exits = session.chunk(&input)?;
        let mut keep = Vec::with_capacity(active.len());
        input.clear();
        for (i, (b, exited)) in active.iter().copied().zip(exits).enumerate() {
            let next = samplers[b].sample(&exited.logits, &history[b]);
            history[b].push(next);
            let row = &mut out[b];
            row.tokens.push(next);
            row.steps_per_token.push(exited.steps);
            row.exit_values.push(exited.values);
            let flow = on_token(b, next, exited.steps, &exited.logits);
            let ended =
                row.tokens.len() >= rows[b].max_new || rows[b].decoding.stop_tokens.contains(&next) || flow.is_break();
            if !ended {
                keep.push(i);
                input.push(vec![next]);
            }
        }
        if keep.len() < active.len() && !keep.is_empty() {
            session.retain(&keep);
        }
        active = keep.iter().map(|&i| active[i]).collect();
    }
    Ok(out)
}

/// A conversation with one model whose cache outlives each turn: a turn gives the whole token
/// sequence so far (say, the chat template's rendering of every message), and only what
/// differs from the cached tokens runs again. A changed earlier token rolls the cache back to
/// the last shared one. After a rollback a warm-started recurrence starts its next token cold
/// (the carried state belonged to the dropped tokens).
pub struct Conversation<'a> {
    session: Session<'a>,
    /// The tokens whose keys and values the cache holds, in order.
    cached: Vec<u32>,
}

impl<'a> Conversation<'a> {
    pub fn new(model: &'a Huginn, config: AdaptiveConfig) -> Self {
        Self {
            session: Session::new(model, config),
            cached: Vec::new(),
        }
    }

    /// The tokens the cache holds.
    pub fn cached(&self) -> &[u32] {
        &self.cached
    }

    /// Generates up to `max_new` tokens after `tokens`, reusing the cache for their longest
    /// prefix shared with [`Self::cached`]. Returns the generation and how many tokens were
    /// reused.
    pub fn reply(
        &mut self,
        tokens: &[u32],
        max_new: usize,
        decoding: &Decoding,
        mut on_token: impl FnMut(u32, usize) -> ControlFlow<()>,
    ) -> Result<(AdaptiveGeneration, usize), InputError> {
        if tokens.is_empty() {
            return Err(InputError::Empty);
        }
        let context = self.session.model.config().block_size;
        if tokens.len() + max_new > context {
            return Err(InputError::NoRoom {
                prompt: tokens.len(),
                new: max_new,
                context,
            });
        }
        // At least the last token runs again: its logits choose the first new token.
        let shared = self.cached.iter().zip(tokens).take_while(|(a, b)| a == b).count();
        let reused = shared.min(tokens.len() - 1);
        if reused < self.cached.len() {
            self.session.rollback(reused);
            self.cached.truncate(reused);
        }
        if max_new == 0 {
            let empty = AdaptiveGeneration {
                tokens: vec![],
                steps_per_token: vec![],
                exit_values: vec![],
            };
            return Ok((empty, reused));
        }
        let row = Row {
            prompt: tokens.to_vec(),
            max_new,
            decoding: decoding.clone(),
        };
        let input = vec![tokens[reused..].to_vec()];
        let mut out = decode(&mut self.session, &[row], input, |_, token, steps, _| {
            on_token(token, steps)
        })?;
        let generation = out.pop().expect("one row");
        // The last new token was chosen but never fed: the cache ends before it.
        self.cached = tokens.to_vec();
        self.cached
            .extend_from_slice(&generation.tokens[..generation.tokens.len() - 1]);
        Ok((generation, reused))
    }
}

/// Rows for prompts that share one decoding; row b samples with seed + b.
fn rows_of(prompts: &[Vec<u32>], max_new: usize, decoding: &Decoding) -> Vec<Row> {
    prompts
        .iter()
        .enumerate()
        .map(|(b, prompt)| Row {
            prompt: prompt.clone(),
            max_new,
            decoding: Decoding {
                sampling: SamplingConfig {
                    seed: decoding.sampling.seed.wrapping_add(b as u64),
                    ..decoding.sampling
                },
                stop_tokens: decoding.stop_tokens.clone(),
            },
        })
        .collect()
}

/// The reference's `forward_with_adaptive_compute`: the given tokens fed one at a time, each
/// iterated until its exit; returns per position the steps used and the logits.
pub fn forward_token_by_token(
    model: &Huginn,
    tokens: &[u32],
    config: AdaptiveConfig,
) -> Result<Vec<Predicted>, InputError> {
    if tokens.len() > model.config().block_size {
        return Err(InputError::TooLong {
            len: tokens.len(),
            context: model.config().block_size,
        });
    }
    let mut session = Session::new(model, config);
    let mut out = Vec::with_capacity(tokens.len());
    for &token in tokens {
        let done = session.chunk(&[vec![token]])?.pop().expect("one row");
        out.push((done.steps, done.logits));
    }
    Ok(out)
}

/// A prediction: the recurrence steps it took and its logits.
pub type Predicted = (usize, Vec<f32>);

/// What generation computes for `prompt` followed by each of `rests` fed as its answer: the
/// prompt as one chunk (its last position's prediction is the first returned), then each token
/// of a rest alone, each iterated until its exit. The prompt runs once; each rest goes on from
/// a copy of the session it left, so each computes exactly what it would alone. Returns, per
/// rest, the steps and logits of every prediction, the last one after the rest's last token.
pub fn forward_after_prompt(
    model: &Huginn,
    prompt: &[u32],
    rests: &[Vec<u32>],
    config: AdaptiveConfig,
) -> Result<Vec<Vec<Predicted>>, InputError> {
    let context = model.config().block_size;
    if let Some(rest) = rests.iter().find(|r| prompt.len() + r.len() > context) {
        return Err(InputError::TooLong {
            len: prompt.len() + rest.len(),
            context,
        });
    }
    let mut session = Session::new(model, config);
    let first = session.chunk(&[prompt.to_vec()])?.pop().expect("one row");
    rests
        .iter()
        .map(|rest| {
            let mut session = session.clone();
            let mut out = vec![(first.steps, first.logits.clone())];
            for &token in rest {
                let done = session.chunk(&[vec![token]])?.pop().expect("one row");
                out.push((done.steps, done.logits));
            }
            Ok(out)
        })
        .collect()
}

/// One row's outcome for a chunk: the step it exited at, its last position's logits there,
/// and the criterion's value after every step it ran.
struct RowExit {
    steps: usize,
    logits: Vec<f32>,
    values: Vec<f64>,
}

#[derive(Clone)]
struct Exited {
    steps: usize,
    logits: Option<Vec<f32>>,
    state: Tensor<3>,
}

/// A sequence (or batch) being extended chunk by chunk through one cache. A clone goes on
/// from the same point without disturbing the original.
#[derive(Clone)]
struct Session<'a> {
    model: &'a Huginn,
    config: AdaptiveConfig,
    cache: StrategyCache,
    position: usize,
    carried: Option<Tensor<3>>,
}

impl<'a> Session<'a> {
    /// Forgets every position from `len` on (a conversation's earlier turn changed there).
    fn rollback(&mut self, len: usize) {
        self.cache.truncate(len);
        self.position = len;
        self.carried = None;
    }

    /// Keeps only the batch rows `keep`: the others' cache entries, padding and carried states
    /// go.
    fn retain(&mut self, keep: &[usize]) {
        self.cache.retain_rows(keep);
        if let Some(carried) = self.carried.take() {
            let index = row_index(keep, &carried.device());
            self.carried = Some(carried.select(0, index));
        }
    }

    fn new(model: &'a Huginn, config: AdaptiveConfig) -> Self {
        Self {
            model,
            config,
            cache: StrategyCache::new(config.strategy, model),
            position: 0,
            carried: None,
        }
    }

    /// Runs the next chunk (one row per batch row, equal lengths) with per-row exits.
    fn chunk(&mut self, input: &[Vec<u32>]) -> Result<Vec<RowExit>, InputError> {
        let (model, config) = (self.model, self.config);
        let batch = input.len();
        let len = input[0].len();
        let vocab = model.config().vocab_size;
        let tokens = model.tokens(input)?;
        // Each row's columns left of its padding are not tokens: positions count from its
        // first real token, and its exit criteria read its real columns only.
        let row_pads = self.cache.pads();
        let pads: Vec<usize> = (0..batch)
            .map(|b| {
                row_pads
                    .get(b)
                    .map_or(0, |p| p.saturating_sub(self.position).min(len - 1))
            })
            .collect();
        let rotary = if row_pads.iter().all(|p| *p == 0) {
            model.rotary(self.position, len)
        } else {
            let positions: Vec<i64> = (0..batch)
                .flat_map(|b| {
                    let pad = row_pads[b];
                    (self.position..self.position + len).map(move |c| c.saturating_sub(pad) as i64)
                })
                .collect();
            model.rotary_at(Tensor::from_data(
                TensorData::new(positions, [batch, len]),
                &model.device(),
            ))
        };
        let cache = &mut self.cache;
        cache.at(self.position);
        let e = model.embed_prelude(tokens, &rotary, cache);
        let init = self.carried.take().map_or(InitialState::Zeros, InitialState::Given);
        let mut state = model.initial_state(&e, &init);
        let row = |t: &Tensor<3>, b: usize| t.clone().narrow(0, b, 1).narrow(1, pads[b], len - pads[b]);
        let mut trackers: Vec<ExitTracker> = (0..batch)
            .map(|b| ExitTracker::new(config.criterion, config.threshold, vocab, &row(&state, b)))
            .collect();
        let mut values = vec![Vec::new(); batch];
        // Per row: the step it exited at, its logits there (logit criteria) and its state.
        let mut exits: Vec<Option<Exited>> = vec![None; batch];
        for i in 0..config.max_steps {
            state = model.core_step(state, &e, i, &rotary, cache);
            let logits = config
                .criterion
                .needs_logits()
                .then(|| host(last_logits(model, state.clone(), &rotary, cache, len)));
            for b in 0..batch {
                if exits[b].is_some() {
                    continue;
                }
                let row_logits = logits.as_ref().map(|l| l[b * vocab..(b + 1) * vocab].to_vec());
                let (value, exit) = trackers[b].check(&row(&state, b), row_logits.as_deref());
                values[b].push(value);
                if exit || i + 1 == config.max_steps {
                    exits[b] = Some(Exited {
                        steps: i + 1,
                        logits: row_logits,
                        state: state.clone().narrow(0, b, 1),
                    });
                }
            }
            if exits.iter().all(Option::is_some) {
                break;
            }
        }
        let exits: Vec<_> = exits
            .into_iter()
            .map(|e| e.expect("every row exits by max_steps"))
            .collect();
        // Each row continues from the state it exited with.
        let exit_state = Tensor::cat(exits.iter().map(|e| e.state.clone()).collect(), 0);
        // Logits for criteria that do not read them: from the exit states, in one coda pass.
        let coda_logits = (!config.criterion.needs_logits())
            .then(|| host(last_logits(model, exit_state.clone(), &rotary, cache, len)));
        let last = |t: Tensor<3>| t.narrow(1, len - 1, 1);
        self.carried = match config.warm_start {
            WarmStart::Cold => None,
            WarmStart::Raw => Some(last(exit_state)),
            WarmStart::Normalized => Some(model.latent(last(exit_state))),
        };
        self.position += len;
        Ok(exits
            .into_iter()
            .zip(values)
            .enumerate()
            .map(|(b, (exited, values))| RowExit {
                steps: exited.steps,
                logits: exited.logits.unwrap_or_else(|| {
                    coda_logits.as_ref().expect("coda ran for latent criteria")[b * vocab..(b + 1) * vocab].to_vec()
                }),
                values,
            })
            .collect())
    }
}

/// The logits at the chunk's last position: the coda over every position (later positions
/// attend to their keys and values), the head only where a token is chosen.
fn last_logits(model: &Huginn, state: Tensor<3>, rotary: &Rotary, cache: &mut StrategyCache, len: usize) -> Tensor<3> {
    model.head(model.coda(state, rotary, cache).narrow(1, len - 1, 1))
}

fn host(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 logits")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::BLOCK;
    use model::HuginnConfig;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn fixed(steps: usize) -> AdaptiveConfig {
        AdaptiveConfig::fixed(steps, WarmStart::Cold, Strategy::default())
    }

    #[test]
    fn streaming_sees_every_token_as_it_comes_and_can_end_the_sequence() {
        let model = HuginnConfig::tiny(64, 32, 4, (1, 2, 1)).init(&Device::flex(), 43);
        let prompt = [3, 14, 15, 9];
        let config = fixed(3);
        let whole = generate(&model, &prompt, 8, config).unwrap();
        let mut seen = Vec::new();
        let streamed = generate_streaming(&model, &prompt, 8, config, &Decoding::default(), |token, steps| {
            seen.push((token, steps));
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(streamed, whole);
        assert_eq!(seen, whole.tokens.iter().map(|t| (*t, 3)).collect::<Vec<_>>());
        let mut count = 0;
        let cut = generate_streaming(&model, &prompt, 8, config, &Decoding::default(), |_, _| {
            count += 1;
            if count == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!(cut.tokens, whole.tokens[..3]);
        // A failing callback ends generation with its error.
        let mut calls = 0;
        let err = try_generate_streaming(&model, &prompt, 8, config, &Decoding::default(), |_, _| {
            calls += 1;
            if calls == 2 {
                Err(InputError::Empty)
            } else {
                Ok(ControlFlow::Continue(()))
            }
        })
        .unwrap_err();
        assert_eq!((err, calls), (InputError::Empty, 2));
        assert!(generate(&model, &prompt, 0, config).unwrap().tokens.is_empty());
    }

    /// Each turn of a conversation equals generating from its whole token sequence afresh,
    /// whether the cache is reused (the sequence extends the last) or rolled back (an earlier
    /// token changed).
    #[test]
    fn a_conversation_reuses_its_cache_and_equals_fresh_generation() {
        let model = HuginnConfig::tiny(64, 32, 4, (1, 2, 1)).init(&Device::flex(), 53);
        let config = fixed(3);
        let mut chat = Conversation::new(&model, config);
        let reply = |chat: &mut Conversation, tokens: &[u32]| {
            chat.reply(tokens, 5, &Decoding::default(), |_, _| ControlFlow::Continue(()))
                .unwrap()
        };
        let first = vec![5, 9, 2, 44, 17];
        let (out, reused) = reply(&mut chat, &first);
        assert_eq!(reused, 0);
        assert_eq!(out, generate(&model, &first, 5, config).unwrap());
        assert_eq!(chat.cached(), [&first[..], &out.tokens[..4]].concat());
        // The next turn extends the conversation: everything cached is reused.
        let second = [&first[..], &out.tokens[..], &[3, 8]].concat();
        let (again, reused) = reply(&mut chat, &second);
        assert_eq!(reused, first.len() + 4);
        assert_eq!(again, generate(&model, &second, 5, config).unwrap());
        // An edited earlier token: the cache rolls back to the tokens before it.
        let mut edited = second.clone();
        edited[2] = 60;
        let (edit, reused) = reply(&mut chat, &edited);
        assert_eq!(reused, 2);
        assert_eq!(edit, generate(&model, &edited, 5, config).unwrap());
        // The same sequence again: all but its last token are reused.
        let (same, reused) = reply(&mut chat, &edited);
        assert_eq!((same, reused), (edit, edited.len() - 1));
        assert!(matches!(
            chat.reply(&[1; 250], 10, &Decoding::default(), |_, _| ControlFlow::Continue(())),
            Err(InputError::NoRoom { .. })
        ));
    }

    /// Rows that end early (their length, or their caller) leave the batch with their cache;
    /// the rows left run on exactly as they would alone, warm-started or not.
    #[test]
    fn rows_that_end_leave_the_batch_and_the_rest_run_on_as_alone() {
        let model = HuginnConfig::tiny(64, 32, 4, (1, 2, 1)).init(&Device::flex(), 47);
        let prompts = [vec![5, 9, 2, 44], vec![30, 1], vec![7, 7, 60, 12, 3], vec![8, 1, 1]];
        for warm_start in [WarmStart::Cold, WarmStart::Raw] {
            let config = AdaptiveConfig::fixed(3, warm_start, Strategy::default());
            let rows: Vec<Row> = prompts
                .iter()
                .zip([2, 7, 6, 0])
                .map(|(prompt, max_new)| Row {
                    prompt: prompt.clone(),
                    max_new,
                    decoding: Decoding::default(),
                })
                .collect();
            let mut seen = [0; 4];
            let out = generate_rows(&model, &rows, config, |b, _, _, _| {
                seen[b] += 1;
                // The caller ends row 2 after its third token.
                if b == 2 && seen[b] == 3 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .unwrap();
            assert_eq!(seen, [2, 7, 3, 0]);
            for ((row, got), len) in rows.iter().zip(&out).zip([2, 7, 3, 0]) {
                let alone = generate(&model, &row.prompt, 7, config).unwrap();
                assert_eq!(got.tokens, alone.tokens[..len], "{:?} {warm_start:?}", row.prompt);
            }
        }
    }

    /// Every cache strategy under every exit criterion, with prompts around the cache's block
    /// boundaries (slots grow 64 positions at a time; here also 4, to cross many): no panic,
    /// and the same tokens and steps as through a cache that never grows. An early-exiting
    /// token once left a slot shorter than the positions read from it ("Can't narrow").
    #[test]
    fn every_strategy_and_criterion_crosses_block_boundaries() {
        let model = HuginnConfig::tiny(64, 32, 4, (1, 2, 1)).init(&Device::flex(), 59);
        let context = model.config().block_size;
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let prompt: Vec<u32> = (0..65).map(|_| rng.random_range(0..64)).collect();
        let mut strategies = vec![];
        for lookup in ["full", "latest-m4", "available-m4", "always-last-m4", "skip"] {
            for compress in ["", "-compress-s4", "-compress-anchor"] {
                strategies.push(format!("{lookup}{compress}").parse::<Strategy>().unwrap());
            }
        }
        for (block, lengths) in [(4, &[1, 3, 4, 5][..]), (BLOCK, &[59, 60, 62, 63, 64, 65][..])] {
            for strategy in &strategies {
                for criterion in Criterion::ALL {
                    let threshold = match criterion {
                        Criterion::ArgmaxStability => 1e-9,
                        _ => criterion.auto_threshold(),
                    };
                    let config = AdaptiveConfig {
                        criterion,
                        threshold,
                        // Beyond the 8 iterations compress-anchor keeps apart.
                        max_steps: 9,
                        warm_start: WarmStart::Cold,
                        strategy: *strategy,
                    };
                    for &len in lengths {
                        let run = |block| {
                            let rows = [Row {
                                prompt: prompt[..len].to_vec(),
                                max_new: 4,
                                decoding: Decoding::default(),
                            }];
                            let mut session = Session {
                                cache: StrategyCache::with_block(config.strategy, &model, block),
                                ..Session::new(&model, config)
                            };
                            let input = vec![rows[0].prompt.clone()];
                            decode(&mut session, &rows, input, |_, _, _, _| ControlFlow::Continue(()))
                                .unwrap()
                                .pop()
                                .unwrap()
                        };
                        let grown = run(block);
                        let whole = run(context);
                        assert_eq!(
                            (&grown.tokens, &grown.steps_per_token),
                            (&whole.tokens, &whole.steps_per_token),
                            "{strategy} {} prompt {len} block {block}",
                            criterion.name()
                        );
                    }
                }
            }
        }
    }

    /// Left-padded rows compute exactly what they compute alone (the reference attends to
    /// padding; here it is masked and positions count from each row's first token).
    #[test]
    fn padded_batch_rows_equal_the_same_prompts_alone() {
        let model = HuginnConfig::tiny(64, 32, 4, (1, 2, 1)).init(&Device::flex(), 41);
        let prompts = [vec![5, 9, 2, 44, 17, 3, 8], vec![30, 1], vec![7, 7, 60, 12]];
        let config = fixed(4);
        let batch = generate_batch(&model, &prompts, 6, config).unwrap();
        for (prompt, row) in prompts.iter().zip(&batch) {
            let alone = generate(&model, prompt, 6, config).unwrap();
            assert_eq!(row.tokens, alone.tokens, "prompt {prompt:?}");
        }
        // And the logits of the prompt pass, row by row.
        let mut session = Session::new(&model, config);
        session.cache.pad(vec![0, 5, 3]);
        let padded: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| [vec![PAD_TOKEN; 7 - p.len()], p.clone()].concat())
            .collect();
        let rows = session.chunk(&padded).unwrap();
        for (prompt, row) in prompts.iter().zip(rows) {
            let mut alone = Session::new(&model, config);
            let want = alone.chunk(std::slice::from_ref(prompt)).unwrap().pop().unwrap().logits;
            let diff = row
                .logits
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff < 1e-5, "prompt {prompt:?}: {diff}");
        }
    }
}
