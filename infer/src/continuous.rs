//! Continuous batching over the recurrence: sequences that each decode at their own depth
//! advance together, one core iteration per [`step`].
//!
//! At a step every sequence is at some stage of its current token: its chunk (the prompt, then
//! each new token) entering the prelude, core iteration `i`, or its exit. Sequences at the same
//! stage share one pass over that stage's weights whatever their iteration, position, exit
//! criterion, cache strategy or warm start; each attends through its own cache. A sequence that
//! exits runs the coda, samples, and enters the prelude with its next token at the next step,
//! while the others are still deep in theirs.
//!
//! Every sequence computes exactly what [`crate::adaptive`] computes for it alone: the same
//! operations on its rows, in kernels whose results do not depend on the other rows (on the
//! CPU: the projections sum each output in a fixed order whatever the rows beside it, as long
//! as the row count keeps the same kernel; attention, norms and the exit checks run per row).
//! So chunks share a pass only with chunks of their own length (see [`groups`]).

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

use model::burn::prelude::*;
use model::kernels::linear::SMALL_ROWS;
use model::{Huginn, InitialState, InputError, Rotary, RowPass};

use crate::adaptive::{AdaptiveConfig, Row};
use crate::cache::StrategyCache;
use crate::exit::ExitTracker;
use crate::sampling::Sampler;
use crate::warm_start::WarmStart;

/// One sequence being generated: its cache, where its recurrence stands, how it samples.
pub struct Sequence {
    config: AdaptiveConfig,
    cache: StrategyCache,
    /// Position of the first token of the chunk being run.
    position: usize,
    /// The state the next token's recurrence starts from (warm starts).
    carried: Option<Tensor<3>>,
    sampler: Sampler,
    /// The prompt and every token chosen so far (the repetition penalty reads it).
    history: Vec<u32>,
    max_new: usize,
    stop_tokens: Vec<u32>,
    generated: usize,
    stage: Stage,
}

enum Stage {
    /// Tokens whose recurrence starts at the next step.
    Feed(Vec<u32>),
    /// The core iterating on the chunk (boxed: tensors are large beside a token list).
    Recur(Box<Recurrence>),
    /// The chunk's recurrence has ended; the coda and the head give its logits.
    Exited(Box<Exit>),
    /// Generation has ended.
    Done,
}

struct Recurrence {
    rotary: Rotary,
    /// The input injection, `[1, S, h]`.
    e: Tensor<3>,
    /// The latent state after `steps` iterations.
    state: Tensor<3>,
    steps: usize,
    tracker: ExitTracker,
}

struct Exit {
    rotary: Rotary,
    state: Tensor<3>,
    steps: usize,
    /// The last position's logits at the exit step, where the criterion read them.
    logits: Option<Vec<f32>>,
}

/// A token a sequence chose at a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Chosen {
    pub id: u32,
    /// Recurrence steps it took.
    pub steps: usize,
    /// The logits it was drawn from (for its log probability).
    pub logits: Vec<f32>,
    /// Whether the sequence has ended with it (its length, or a stop token).
    pub last: bool,
}

impl Sequence {
    /// A sequence generating up to `row.max_new` tokens after `row.prompt` (which must fit the
    /// model's context with them).
    pub fn new(model: &Huginn, row: &Row, config: AdaptiveConfig) -> Result<Self, InputError> {
        let context = model.config().block_size;
        if row.prompt.is_empty() {
            return Err(InputError::Empty);
        }
        if row.prompt.len() + row.max_new > context {
            return Err(InputError::NoRoom {
                prompt: row.prompt.len(),
                new: row.max_new,
                context,
            });
        }
        Ok(Self {
            config,
            cache: StrategyCache::new(config.strategy, model),
            position: 0,
            carried: None,
            sampler: Sampler::new(row.decoding.sampling),
            history: row.prompt.clone(),
            max_new: row.max_new,
            stop_tokens: row.decoding.stop_tokens.clone(),
            generated: 0,
            stage: if row.max_new == 0 {
                Stage::Done
            } else {
                Stage::Feed(row.prompt.clone())
            },
        })
    }

    /// Whether generation has ended.
    pub fn done(&self) -> bool {
        matches!(self.stage, Stage::Done)
    }

    /// Ends generation now (its caller has what it wanted, or its client left).
    pub fn end(&mut self) {
        self.stage = Stage::Done;
    }

    /// Bytes its cache holds.
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Length of the chunk at the current stage (0 when done).
    fn chunk_len(&self) -> usize {
        match &self.stage {
            Stage::Feed(tokens) => tokens.len(),
            Stage::Recur(r) => r.e.dims()[1],
            Stage::Exited(x) => x.state.dims()[1],
            Stage::Done => 0,
        }
    }
}

/// Advances every sequence by one stage: new chunks through the prelude, then one core
/// iteration for every sequence recurring, the exit checks, and, for those that exit, the coda
/// and a sampled token. Returns per sequence the token it chose at this step, if any, or why it
/// failed (a failed sequence is done; the others go on).
pub fn step(model: &Huginn, sequences: &mut [&mut Sequence]) -> Vec<Result<Option<Chosen>, String>> {
    let mut out: Vec<Result<Option<Chosen>, String>> = sequences.iter().map(|_| Ok(None)).collect();
    let mut fail = |sequences: &mut [&mut Sequence], failures: Vec<(usize, String)>| {
        for (i, reason) in failures {
            sequences[i].end();
            out[i] = Err(reason);
        }
    };
    let failures = run_groups(
        sequences,
        |s| matches!(s.stage, Stage::Feed(_)),
        |group| feed(model, group),
    );
    fail(sequences, failures);
    let failures = run_groups(
        sequences,
        |s| matches!(s.stage, Stage::Recur(_)),
        |group| iterate(model, group),
    );
    fail(sequences, failures);
    let needs_logits = |s: &Sequence| matches!(&s.stage, Stage::Exited(exit) if exit.logits.is_none());
    let failures = run_groups(sequences, needs_logits, |group| exit_logits(model, group));
    fail(sequences, failures);
    for (i, sequence) in sequences.iter_mut().enumerate() {
        if matches!(sequence.stage, Stage::Exited(_)) && out[i].is_ok() {
            out[i] = Ok(Some(sequence.choose(model)));
        }
    }
    out
}

/// Runs `pass` over the sequences `selected` picks, in groups that share a pass (see
/// [`groups`]). A pass that panics is run again for each of its sequences alone, so that only
/// the one at fault fails. Returns the failures by index.
fn run_groups(
    sequences: &mut [&mut Sequence],
    selected: impl Fn(&Sequence) -> bool,
    mut pass: impl FnMut(&mut [&mut Sequence]),
) -> Vec<(usize, String)> {
    let picked: Vec<(usize, usize)> = (0..sequences.len())
        .filter(|&i| selected(sequences[i]))
        .map(|i| (i, sequences[i].chunk_len()))
        .collect();
    let mut failures = Vec::new();
    for group in groups(&picked) {
        let mut members = take(sequences, &group);
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| pass(&mut members))) {
            let reason = panic_message(panic.as_ref());
            if group.len() == 1 {
                failures.push((group[0], format!("the engine failed on this request: {reason}")));
                continue;
            }
            for (member, &i) in members.iter_mut().zip(&group) {
                if let Err(panic) = catch_unwind(AssertUnwindSafe(|| pass(std::slice::from_mut(member)))) {
                    let reason = panic_message(panic.as_ref());
                    failures.push((i, format!("the engine failed on this request: {reason}")));
                }
            }
        }
    }
    failures
}

/// Sequences `(index, chunk length)` in groups that can share a pass and still compute what
/// each computes alone: chunks of one length, whose products take the same kernel together as
/// alone. That is up to [`SMALL_ROWS`] rows in all for short chunks (the small-rows kernel),
/// and any number of chunks longer than that (`gemm`, each row's sums in the same order
/// whatever the others), up to [`MOST_ROWS`] rows per pass.
fn groups(picked: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let mut lengths: Vec<usize> = picked.iter().map(|&(_, len)| len).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let mut groups = Vec::new();
    for len in lengths {
        let members: Vec<usize> = picked.iter().filter(|&&(_, l)| l == len).map(|&(i, _)| i).collect();
        let per_pass = if len <= SMALL_ROWS {
            SMALL_ROWS / len
        } else {
            (MOST_ROWS / len).max(1)
        };
        groups.extend(members.chunks(per_pass).map(<[usize]>::to_vec));
    }
    groups
}

/// The most rows (tokens) of long chunks that share one pass: bounds its activations.
const MOST_ROWS: usize = 2048;

/// Mutable references to the sequences at `indices` (distinct, ascending).
fn take<'s, 'a>(sequences: &'s mut [&'a mut Sequence], indices: &[usize]) -> Vec<&'s mut Sequence> {
    let mut picked = Vec::with_capacity(indices.len());
    let mut rest: &'s mut [&'a mut Sequence] = sequences;
    let mut offset = 0;
    for &i in indices {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - offset);
        let (first, tail) = tail.split_first_mut().expect("index in range");
        picked.push(&mut **first);
        rest = tail;
        offset = i + 1;
    }
    picked
}

/// The group's chunks through embedding and prelude; each starts its recurrence.
fn feed(model: &Huginn, group: &mut [&mut Sequence]) {
    let chunks: Vec<Vec<u32>> = group
        .iter()
        .map(|s| match &s.stage {
            Stage::Feed(tokens) => tokens.clone(),
            _ => unreachable!("fed sequences are at their feed stage"),
        })
        .collect();
    let tokens = model
        .tokens(&chunks)
        .expect("chunks were checked against the model when admitted");
    let len = chunks[0].len();
    let rotaries: Vec<Rotary> = group.iter().map(|s| model.rotary(s.position, 1, len)).collect();
    for s in group.iter_mut() {
        s.cache.at(s.position);
    }
    let e = {
        let mut rows = passes(group, &rotaries);
        model.embed_prelude_rows(tokens, &mut rows)
    };
    let vocab = model.config().vocab_size;
    for ((b, s), rotary) in group.iter_mut().enumerate().zip(rotaries) {
        let e = e.clone().narrow(0, b, 1);
        let init = s.carried.take().map_or(InitialState::Zeros, InitialState::Given);
        let state = model.initial_state(&e, &init);
        let tracker = ExitTracker::new(s.config.criterion, s.config.threshold, vocab, &state);
        s.stage = Stage::Recur(Box::new(Recurrence {
            rotary,
            e,
            state,
            steps: 0,
            tracker,
        }));
    }
}

/// One core iteration for each sequence of the group, each at its own depth, then its exit
/// check.
fn iterate(model: &Huginn, group: &mut [&mut Sequence]) {
    let recurring = |s: &Sequence| match &s.stage {
        Stage::Recur(r) => (r.rotary.clone(), r.e.clone(), r.state.clone(), r.steps),
        _ => unreachable!("iterated sequences are recurring"),
    };
    let (rotaries, es, states, iterations): (Vec<_>, Vec<_>, Vec<_>, Vec<_>) =
        group
            .iter()
            .map(|s| recurring(s))
            .fold(Default::default(), |mut acc, (r, e, s, i)| {
                acc.0.push(r);
                acc.1.push(e);
                acc.2.push(s);
                acc.3.push(i);
                acc
            });
    let state = {
        let mut rows = passes(group, &rotaries);
        let e = Tensor::cat(es, 0);
        model.core_step_rows(Tensor::cat(states, 0), &e, &iterations, &mut rows)
    };
    // The criteria that read the prediction get it at every step, from the coda at this state
    // (which rewrites the chunk's coda entries: a position keeps those of its exit step).
    let reads_logits: Vec<bool> = group.iter().map(|s| s.config.criterion.needs_logits()).collect();
    let logits = if reads_logits.contains(&true) {
        let picked: Vec<usize> = (0..group.len()).filter(|&b| reads_logits[b]).collect();
        let states = picked.iter().map(|&b| state.clone().narrow(0, b, 1)).collect();
        let mut members = take(group, &picked);
        let rotaries: Vec<Rotary> = picked.iter().map(|&b| rotaries[b].clone()).collect();
        let mut rows = passes(&mut members, &rotaries);
        let logits = last_logits(model, model.coda_rows(Tensor::cat(states, 0), &mut rows));
        let mut by_row = vec![None; group.len()];
        for (b, l) in picked.into_iter().zip(logits) {
            by_row[b] = Some(l);
        }
        by_row
    } else {
        vec![None; group.len()]
    };
    for ((b, s), logits) in group.iter_mut().enumerate().zip(logits) {
        let max_steps = s.config.max_steps;
        let Stage::Recur(r) = &mut s.stage else {
            unreachable!("iterated sequences are recurring")
        };
        r.state = state.clone().narrow(0, b, 1);
        r.steps += 1;
        let (_, exit) = r.tracker.check(&r.state, logits.as_deref());
        if exit || r.steps == max_steps {
            s.stage = Stage::Exited(Box::new(Exit {
                rotary: r.rotary.clone(),
                state: r.state.clone(),
                steps: r.steps,
                logits,
            }));
        }
    }
}

/// The coda and head at the exit state, for sequences whose criterion did not read them.
fn exit_logits(model: &Huginn, group: &mut [&mut Sequence]) {
    let (rotaries, states): (Vec<Rotary>, Vec<Tensor<3>>) = group
        .iter()
        .map(|s| match &s.stage {
            Stage::Exited(x) => (x.rotary.clone(), x.state.clone()),
            _ => unreachable!("sequences without exit logits have exited"),
        })
        .unzip();
    let logits = {
        let mut rows = passes(group, &rotaries);
        last_logits(model, model.coda_rows(Tensor::cat(states, 0), &mut rows))
    };
    for (s, l) in group.iter_mut().zip(logits) {
        if let Stage::Exited(x) = &mut s.stage {
            x.logits = Some(l);
        }
    }
}

impl Sequence {
    /// After the exit: the state carried to the next token, then the token, sampled from the
    /// exit's logits.
    fn choose(&mut self, model: &Huginn) -> Chosen {
        let Stage::Exited(exit) = std::mem::replace(&mut self.stage, Stage::Done) else {
            unreachable!("a sequence chooses after its exit")
        };
        let len = exit.state.dims()[1];
        let last = exit.state.narrow(1, len - 1, 1);
        self.carried = match self.config.warm_start {
            WarmStart::Cold => None,
            WarmStart::Raw => Some(last),
            WarmStart::Normalized => Some(model.latent(last)),
        };
        self.position += len;
        let logits = exit.logits.expect("logits are computed before choosing");
        let id = self.sampler.sample(&logits, &self.history);
        self.history.push(id);
        self.generated += 1;
        let last = self.generated >= self.max_new || self.stop_tokens.contains(&id);
        if !last {
            self.stage = Stage::Feed(vec![id]);
        }
        Chosen {
            id,
            steps: exit.steps,
            logits,
            last,
        }
    }
}

/// The group's rows as one pass: each with its rotation and cache.
fn passes<'g>(group: &'g mut [&mut Sequence], rotaries: &[Rotary]) -> Vec<RowPass<'g>> {
    group
        .iter_mut()
        .zip(rotaries)
        .map(|(s, rotary)| RowPass {
            rotary: rotary.clone(),
            cache: &mut s.cache,
        })
        .collect()
}

/// The head's logits at each row's last position, on the host.
fn last_logits(model: &Huginn, coda: Tensor<3>) -> Vec<Vec<f32>> {
    let [batch, len, _] = coda.dims();
    let vocab = model.config().vocab_size;
    let last = coda.narrow(1, len - 1, 1);
    // The head only where a token is chosen, as generation alone computes it, and for at most
    // SMALL_ROWS rows at a time: one row alone takes the small-rows kernel.
    let mut out = Vec::with_capacity(batch);
    for start in (0..batch).step_by(SMALL_ROWS) {
        let rows = SMALL_ROWS.min(batch - start);
        let host = model
            .head(last.clone().narrow(0, start, rows))
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 logits");
        out.extend(host.chunks_exact(vocab).map(<[f32]>::to_vec));
    }
    out
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}

#[cfg(test)]
mod tests {
    use std::ops::ControlFlow;

    use model::HuginnConfig;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::adaptive::{Decoding, generate_rows};
    use crate::exit::Criterion;
    use crate::sampling::SamplingConfig;

    /// A request of random settings: prompt, length, depth, exit criterion and threshold,
    /// cache strategy, warm start, sampling.
    fn random_request(rng: &mut ChaCha8Rng, vocab: u32) -> (Row, AdaptiveConfig) {
        let criterion = Criterion::ALL[rng.random_range(0..Criterion::ALL.len())];
        let threshold = match criterion {
            Criterion::ArgmaxStability => rng.random_range(1..4) as f64,
            c => c.auto_threshold() * [0.1, 1.0, 30.0][rng.random_range(0..3)],
        };
        let strategies = [
            "full",
            "latest-m4",
            "always-last-m4-compress-s4",
            "compress-anchor",
            "skip",
        ];
        let config = AdaptiveConfig {
            criterion,
            threshold,
            max_steps: rng.random_range(1..12),
            warm_start: [WarmStart::Cold, WarmStart::Raw, WarmStart::Normalized][rng.random_range(0..3)],
            strategy: strategies[rng.random_range(0..strategies.len())].parse().unwrap(),
        };
        // Lengths that repeat, so that equal chunks join at the same step and share passes.
        let len = [1, 2, 3, 5, 12, 12, 17][rng.random_range(0..7)];
        let row = Row {
            prompt: (0..len).map(|_| rng.random_range(0..vocab)).collect(),
            max_new: [0, 3, 12, 20][rng.random_range(0..4)],
            decoding: Decoding {
                sampling: SamplingConfig {
                    temperature: [0.0, 0.7, 1.3][rng.random_range(0..3)],
                    seed: rng.random(),
                    ..SamplingConfig::default()
                },
                stop_tokens: vec![rng.random_range(0..vocab)],
            },
        };
        (row, config)
    }

    /// What `row` gets alone: per token its id, steps and the bits of its logits.
    fn alone(model: &Huginn, row: &Row, config: AdaptiveConfig) -> Vec<(u32, usize, Vec<u32>)> {
        let mut got = Vec::new();
        let rows = std::slice::from_ref(row);
        generate_rows(model, rows, config, |_, id, steps, logits| {
            got.push((id, steps, bits(logits)));
            ControlFlow::Continue(())
        })
        .unwrap();
        got
    }

    fn bits(logits: &[f32]) -> Vec<u32> {
        logits.iter().map(|l| l.to_bits()).collect()
    }

    /// Twenty-four requests of random settings, joining at random steps, some leaving early:
    /// each one's tokens, steps and logits (to the bit) are exactly those it gets alone. On a random model
    /// and on each of the reference's fixture models (trained weights' shapes and layouts).
    #[test]
    fn every_sequence_of_a_random_mix_gets_what_it_gets_alone() {
        let device = Device::flex();
        let model = HuginnConfig::tiny(64, 256, 4, (1, 2, 1)).init(&device, 61);
        random_mix(&model, 3);
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/reference");
        let mut cases: Vec<_> = std::fs::read_dir(&fixtures)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.join("config.json").exists())
            .collect();
        cases.sort();
        assert!(cases.len() >= 3, "fixture folders: {cases:?}");
        for (seed, case) in cases.iter().enumerate() {
            let fixture = model::fixture::Fixture::open(case, &device).unwrap();
            random_mix(&fixture.model, seed as u64 + 10);
        }
    }

    fn random_mix(model: &Huginn, seed: u64) {
        let vocab = model.config().vocab_size as u32;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let requests: Vec<(Row, AdaptiveConfig, usize)> = (0..24)
            .map(|_| {
                let (row, config) = random_request(&mut rng, vocab);
                (row, config, rng.random_range(0..12))
            })
            .collect();
        let leaves = |i: usize| if i % 7 == 3 { Some(2) } else { None };
        let mut running: Vec<(usize, Sequence)> = Vec::new();
        let mut got: Vec<Vec<(u32, usize, Vec<u32>)>> = vec![Vec::new(); requests.len()];
        // The most single-token chunks recurring at once: more than a pass of them must occur.
        let (mut most_at_once, mut most_decoding) = (0, 0);
        for tick in 0.. {
            for (i, (row, config, joins)) in requests.iter().enumerate() {
                if *joins == tick {
                    running.push((i, Sequence::new(model, row, *config).unwrap()));
                }
            }
            running.retain(|(_, s)| !s.done());
            if running.is_empty() && tick > 12 {
                break;
            }
            most_at_once = most_at_once.max(running.len());
            let decoding = running.iter().filter(|(_, s)| s.chunk_len() == 1).count();
            most_decoding = most_decoding.max(decoding);
            let mut sequences: Vec<&mut Sequence> = running.iter_mut().map(|(_, s)| s).collect();
            let chosen = step(model, &mut sequences);
            for ((i, sequence), chosen) in running.iter_mut().zip(chosen) {
                if let Some(token) = chosen.unwrap() {
                    got[*i].push((token.id, token.steps, bits(&token.logits)));
                    if leaves(*i) == Some(got[*i].len()) {
                        sequence.end();
                    }
                }
            }
        }
        assert!(most_at_once >= 12, "the mix ran {most_at_once} at once");
        assert!(
            most_decoding > SMALL_ROWS,
            "at most {most_decoding} single-token chunks at once"
        );
        for (i, (row, config, _)) in requests.iter().enumerate() {
            let mut want = alone(model, row, *config);
            if let Some(cut) = leaves(i) {
                want.truncate(cut);
            }
            assert!(got[i] == want, "request {i}: {config:?}");
        }
    }

    /// A pass that panics on one sequence (here: a token beyond the vocabulary, which admission
    /// would have refused) fails that sequence alone; the others sharing its pass go on and
    /// still get what they get alone.
    #[test]
    fn a_panic_in_a_shared_pass_fails_only_the_sequence_at_fault() {
        let model = HuginnConfig::tiny(64, 32, 4, (1, 2, 1)).init(&Device::flex(), 67);
        let config = AdaptiveConfig::fixed(3, WarmStart::Cold, "full".parse().unwrap());
        let rows: Vec<Row> = [vec![5, 9, 2], vec![30], vec![7, 7, 60, 12]]
            .into_iter()
            .map(|prompt| Row {
                prompt,
                max_new: 5,
                decoding: Decoding::default(),
            })
            .collect();
        let mut sequences: Vec<Sequence> = rows.iter().map(|r| Sequence::new(&model, r, config).unwrap()).collect();
        let mut got = vec![Vec::new(); rows.len()];
        let mut failed = vec![None; rows.len()];
        let mut broken = false;
        while !sequences.iter().all(Sequence::done) {
            // After its second token, sequence 1's next chunk is broken.
            if !broken && got[1].len() == 2 {
                assert!(matches!(sequences[1].stage, Stage::Feed(_)));
                sequences[1].stage = Stage::Feed(vec![9999]);
                broken = true;
            }
            let active: Vec<usize> = (0..rows.len()).filter(|&i| !sequences[i].done()).collect();
            let mut all: Vec<&mut Sequence> = sequences.iter_mut().filter(|s| !s.done()).collect();
            let results = step(&model, &mut all);
            for (i, result) in active.into_iter().zip(results) {
                match result {
                    Ok(Some(token)) => got[i].push((token.id, token.steps, bits(&token.logits))),
                    Ok(None) => {}
                    Err(reason) => failed[i] = Some(reason),
                }
            }
        }
        assert!(
            failed[1].as_deref().is_some_and(|r| r.contains("the engine failed")),
            "{failed:?}"
        );
        assert!(failed[0].is_none() && failed[2].is_none(), "{failed:?}");
        for i in [0, 2] {
            assert!(got[i] == alone(&model, &rows[i], config), "sequence {i}");
        }
    }
}
