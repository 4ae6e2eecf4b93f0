//! Continuous batching over the recurrence: sequences that each decode at their own depth
//! advance together, one core iteration per [`step`].
//!
//! At a step every sequence is at some stage of its current token: its chunk (the prompt, then
//! each new token) entering the prelude, core iteration `i`, or its exit. Sequences at the same
//! stage share one pass over that stage's weights whatever their iteration, position, exit
//! criterion, cache strategy or warm start; each attends through its own cache. A sequence that
//! exits runs the coda, samples, and enters the prelude with its next token at the next step,
//! while the others are still deep in theirs (a decoded token may first wait a few steps for
//! others to exit with it, so that they share those passes: see [`released`]).
//!
//! Every sequence computes exactly what [`crate::adaptive`] computes for it alone: the same
//! operations on its rows, in kernels whose results do not depend on the other rows (on the
//! CPU: the projections sum each output in a fixed order whatever the rows beside it, as long
//! as the row count keeps the same kernel; attention, norms and the exit checks run per row).
//! So chunks share a pass only with chunks of their own length (see [`groups`]).
//!
//! A long prompt runs each stage a window of positions at a time (at most the sequence's
//! `window`, one window per step), so that it holds up the others' steps by one window's work,
//! not the whole prompt's. Every iteration still covers all of the prompt's positions before the
//! next begins, so windows compute what the whole chunk computes (a window reads the earlier
//! windows' entries of the same iteration from the cache, as the whole chunk's causal attention
//! reads them); only the rounding differs, since a window attends through the kernel for a
//! chunk after a cache prefix.

use std::any::Any;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};

use model::burn::prelude::*;
use model::kernels::linear::SMALL_ROWS;
use model::{Huginn, InitialState, InputError, RowPass};

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
    /// Most positions of a chunk in one pass.
    window: usize,
    stage: Stage,
}

enum Stage {
    /// Tokens entering the prelude.
    Feed(Box<Feed>),
    /// The core iterating on the chunk (boxed: tensors are large beside a token list).
    Recur(Box<Recurrence>),
    /// The chunk's recurrence has ended; the coda and the head give its logits.
    Exited(Box<Exit>),
    /// Generation has ended.
    Done,
}

struct Feed {
    tokens: Vec<u32>,
    /// The input injection of the windows fed so far.
    embedded: Windows,
}

struct Recurrence {
    /// The input injection, `[1, S, h]`.
    e: Tensor<3>,
    /// The latent state after `steps` iterations.
    state: Tensor<3>,
    steps: usize,
    tracker: ExitTracker,
    /// The next iteration's state, window by window.
    next: Windows,
}

struct Exit {
    state: Tensor<3>,
    steps: usize,
    /// The last position's logits at the exit step, where the criterion read them.
    logits: Option<Vec<f32>>,
    /// Positions the coda has covered.
    coda: usize,
    /// Steps a decoded token has waited here for others to exit (see [`released`]).
    waited: usize,
}

/// A chunk's pass through one stage, made a window of positions at a time.
#[derive(Default)]
struct Windows {
    /// Positions covered.
    done: usize,
    /// The stage's output at them, window by window.
    parts: Vec<Tensor<3>>,
}

impl Windows {
    /// Adds the output at the next window; returns the whole chunk's once it is complete.
    fn push(&mut self, part: Tensor<3>, len: usize) -> Option<Tensor<3>> {
        self.done += part.dims()[1];
        self.parts.push(part);
        (self.done == len).then(|| Tensor::cat(std::mem::take(&mut self.parts), 1))
    }
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
    /// model's context with them), whose chunks run at most `window` positions per pass.
    pub fn new(model: &Huginn, row: &Row, config: AdaptiveConfig, window: NonZeroUsize) -> Result<Self, InputError> {
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
            window: window.get(),
            stage: if row.max_new == 0 {
                Stage::Done
            } else {
                Stage::feed(row.prompt.clone())
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

    /// The positions of the chunk the current stage's next pass covers (empty when done): the
    /// next of equal windows (within one position) of at most `window` positions.
    fn window(&self) -> Range<usize> {
        let (len, done) = self.progress();
        let windows = len.div_ceil(self.window).max(1);
        // The first `len % windows` windows hold one position more than the others.
        let (small, larger) = (len / windows, len % windows);
        let size = if done < larger * (small + 1) { small + 1 } else { small };
        done..len.min(done + size)
    }

    /// The current chunk's length and the positions its current stage has covered.
    fn progress(&self) -> (usize, usize) {
        match &self.stage {
            Stage::Feed(feed) => (feed.tokens.len(), feed.embedded.done),
            Stage::Recur(r) => (r.e.dims()[1], r.next.done),
            Stage::Exited(x) => (x.state.dims()[1], x.coda),
            Stage::Done => (0, 0),
        }
    }

    /// Length of the current stage's next pass (0 when done).
    fn chunk_len(&self) -> usize {
        self.window().len()
    }
}

impl Stage {
    fn feed(tokens: Vec<u32>) -> Self {
        Stage::Feed(Box::new(Feed {
            tokens,
            embedded: Windows::default(),
        }))
    }
}

/// Advances every sequence by one stage: new chunks through the prelude, then one core
/// iteration for every sequence recurring, the exit checks, and, for those that exit, the coda
/// and a sampled token. A decoded token that has exited waits up to `exit_wait` steps for
/// others to exit with it (see [`released`]). Returns per sequence the token it chose at this
/// step, if any, or why it failed (a failed sequence is done; the others go on).
pub fn step(model: &Huginn, sequences: &mut [&mut Sequence], exit_wait: usize) -> Vec<Result<Option<Chosen>, String>> {
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
    let release = released(sequences, exit_wait);
    let leaves = |s: &Sequence| matches!(&s.stage, Stage::Exited(_)) && (release || !decoding(s));
    let needs_logits = |s: &Sequence| leaves(s) && matches!(&s.stage, Stage::Exited(exit) if exit.logits.is_none());
    let failures = run_groups(sequences, needs_logits, |group| exit_logits(model, group));
    fail(sequences, failures);
    for (i, sequence) in sequences.iter_mut().enumerate() {
        // (A chunk whose coda has windows left chooses at a later step.)
        if leaves(sequence) && out[i].is_ok() && matches!(&sequence.stage, Stage::Exited(exit) if exit.logits.is_some())
        {
            out[i] = Ok(Some(sequence.choose(model)));
        } else if let Stage::Exited(exit) = &mut sequence.stage {
            exit.waited += 1;
        }
    }
    out
}

/// Whether a sequence is decoding: its chunk is one token.
fn decoding(s: &Sequence) -> bool {
    matches!(s.stage, Stage::Recur(_) | Stage::Exited(_)) && s.progress().0 == 1
}

/// Whether the decoded tokens that have exited leave now (coda, head, choice, and their next
/// token's prelude at the next step) or wait for more to join them. Decoding reads every stage's
/// weights once per pass however few rows it has, so a stage's pass for one or two tokens costs
/// nearly what it costs for all of them: when the running tokens exit at different depths, each
/// step would pay for a prelude and a coda pass besides the core's. So exited tokens leave
/// together, once they are at least half of the decoding tokens or one of them has waited
/// `exit_wait` steps (0: none waits). Tokens in lockstep (a fixed depth) and a token alone never wait.
/// Prompts never wait (their passes are their own). When a token leaves changes nothing it
/// computes.
fn released(sequences: &[&mut Sequence], exit_wait: usize) -> bool {
    let (mut exited, mut all, mut longest) = (0, 0, 0);
    for s in sequences.iter().filter(|s| decoding(s)) {
        all += 1;
        if let Stage::Exited(exit) = &s.stage {
            exited += 1;
            longest = longest.max(exit.waited);
        }
    }
    2 * exited >= all || longest >= exit_wait
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

/// The group's next windows through embedding and prelude; a chunk whose last window it was
/// starts its recurrence.
fn feed(model: &Huginn, group: &mut [&mut Sequence]) {
    let windows = windows(group);
    let chunks: Vec<Vec<u32>> = group
        .iter()
        .zip(&windows)
        .map(|(s, window)| match &s.stage {
            Stage::Feed(feed) => feed.tokens[window.clone()].to_vec(),
            _ => unreachable!("fed sequences are at their feed stage"),
        })
        .collect();
    let tokens = model
        .tokens(&chunks)
        .expect("chunks were checked against the model when admitted");
    let e = {
        let mut rows = passes(model, group, &windows);
        model.embed_prelude_rows(tokens, &mut rows)
    };
    let vocab = model.config().vocab_size;
    for (b, s) in group.iter_mut().enumerate() {
        let Stage::Feed(feed) = &mut s.stage else {
            unreachable!("fed sequences are at their feed stage")
        };
        let Some(e) = feed.embedded.push(e.clone().narrow(0, b, 1), feed.tokens.len()) else {
            continue;
        };
        let init = s.carried.take().map_or(InitialState::Zeros, InitialState::Given);
        let state = model.initial_state(&e, &init);
        let tracker = ExitTracker::new(s.config.criterion, s.config.threshold, vocab, &state);
        s.stage = Stage::Recur(Box::new(Recurrence {
            e,
            state,
            steps: 0,
            tracker,
            next: Windows::default(),
        }));
    }
}

/// One core iteration over the next window of each sequence of the group, each at its own
/// depth; a sequence whose iteration that completes then checks its exit.
fn iterate(model: &Huginn, group: &mut [&mut Sequence]) {
    let windows = windows(group);
    let (es, states, iterations) = group.iter().zip(&windows).fold(
        (Vec::new(), Vec::new(), Vec::new()),
        |(mut es, mut states, mut iterations), (s, window)| {
            let Stage::Recur(r) = &s.stage else {
                unreachable!("iterated sequences are recurring")
            };
            es.push(r.e.clone().narrow(1, window.start, window.len()));
            states.push(r.state.clone().narrow(1, window.start, window.len()));
            iterations.push(r.steps);
            (es, states, iterations)
        },
    );
    let state = {
        let mut rows = passes(model, group, &windows);
        model.core_step_rows(Tensor::cat(states, 0), &Tensor::cat(es, 0), &iterations, &mut rows)
    };
    // The criteria that read the prediction get it at every step, from the coda at this state
    // (which rewrites the chunk's coda entries: a position keeps those of its exit step).
    let reads_logits: Vec<usize> = (0..group.len())
        .filter(|&b| group[b].config.criterion.needs_logits())
        .collect();
    let mut logits = vec![None; group.len()];
    if !reads_logits.is_empty() {
        let states = reads_logits.iter().map(|&b| state.clone().narrow(0, b, 1)).collect();
        let ends: Vec<bool> = reads_logits
            .iter()
            .map(|&b| last_window(&*group[b], &windows[b]))
            .collect();
        let coda_windows: Vec<Range<usize>> = reads_logits.iter().map(|&b| windows[b].clone()).collect();
        let mut members = take(group, &reads_logits);
        let mut rows = passes(model, &mut members, &coda_windows);
        let coda = model.coda_rows(Tensor::cat(states, 0), &mut rows);
        for (b, l) in reads_logits.into_iter().zip(logits_at_ends(model, &coda, &ends)) {
            logits[b] = l;
        }
    }
    for ((b, s), logits) in group.iter_mut().enumerate().zip(logits) {
        let max_steps = s.config.max_steps;
        let Stage::Recur(r) = &mut s.stage else {
            unreachable!("iterated sequences are recurring")
        };
        let Some(next) = r.next.push(state.clone().narrow(0, b, 1), r.e.dims()[1]) else {
            continue;
        };
        r.next = Windows::default();
        r.state = next;
        r.steps += 1;
        let (_, exit) = r.tracker.check(&r.state, logits.as_deref());
        if exit || r.steps == max_steps {
            s.stage = Stage::Exited(Box::new(Exit {
                state: r.state.clone(),
                steps: r.steps,
                coda: if logits.is_some() { r.state.dims()[1] } else { 0 },
                logits,
                waited: 0,
            }));
        }
    }
}

/// The coda over the next window of each exited sequence whose criterion did not read it; at
/// the last window, the head.
fn exit_logits(model: &Huginn, group: &mut [&mut Sequence]) {
    let windows = windows(group);
    let states: Vec<Tensor<3>> = group
        .iter()
        .zip(&windows)
        .map(|(s, window)| match &s.stage {
            Stage::Exited(x) => x.state.clone().narrow(1, window.start, window.len()),
            _ => unreachable!("sequences without exit logits have exited"),
        })
        .collect();
    let ends: Vec<bool> = group.iter().zip(&windows).map(|(s, w)| last_window(s, w)).collect();
    let coda = {
        let mut rows = passes(model, group, &windows);
        model.coda_rows(Tensor::cat(states, 0), &mut rows)
    };
    let logits = logits_at_ends(model, &coda, &ends);
    for ((s, window), l) in group.iter_mut().zip(&windows).zip(logits) {
        if let Stage::Exited(x) = &mut s.stage {
            x.coda = window.end;
            x.logits = l;
        }
    }
}

/// The head's logits at the last position of the coda's rows whose window ended their chunk.
fn logits_at_ends(model: &Huginn, coda: &Tensor<3>, ends: &[bool]) -> Vec<Option<Vec<f32>>> {
    let at_end: Vec<usize> = (0..ends.len()).filter(|&b| ends[b]).collect();
    let mut logits = vec![None; ends.len()];
    if at_end.is_empty() {
        return logits;
    }
    let picked = Tensor::cat(at_end.iter().map(|&b| coda.clone().narrow(0, b, 1)).collect(), 0);
    for (b, l) in at_end.into_iter().zip(last_logits(model, picked)) {
        logits[b] = Some(l);
    }
    logits
}

/// Whether `window` ends the sequence's current chunk.
fn last_window(s: &Sequence, window: &Range<usize>) -> bool {
    window.end == s.progress().0
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
            self.stage = Stage::feed(vec![id]);
        }
        Chosen {
            id,
            steps: exit.steps,
            logits,
            last,
        }
    }
}

/// Each sequence's next window.
fn windows(group: &[&mut Sequence]) -> Vec<Range<usize>> {
    group.iter().map(|s| s.window()).collect()
}

/// The group's windows as one pass: each row with its positions and cache.
fn passes<'g>(model: &Huginn, group: &'g mut [&mut Sequence], windows: &[Range<usize>]) -> Vec<RowPass<'g>> {
    group
        .iter_mut()
        .zip(windows)
        .map(|(s, window)| {
            let start = s.position + window.start;
            s.cache.at(start);
            RowPass {
                rotary: model.rotary(start, window.len()),
                cache: &mut s.cache,
            }
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

    /// What `row` gets alone through [`step`], its chunks `window` positions at a time.
    fn alone_in_windows(
        model: &Huginn,
        row: &Row,
        config: AdaptiveConfig,
        window: usize,
    ) -> Vec<(u32, usize, Vec<u32>)> {
        let mut sequence = Sequence::new(model, row, config, NonZeroUsize::new(window).unwrap()).unwrap();
        let mut got = Vec::new();
        while !sequence.done() {
            if let Some(token) = step(model, &mut [&mut sequence], EXIT_WAIT).remove(0).unwrap() {
                got.push((token.id, token.steps, bits(&token.logits)));
            }
        }
        got
    }

    fn bits(logits: &[f32]) -> Vec<u32> {
        logits.iter().map(|l| l.to_bits()).collect()
    }

    /// Wider than any prompt of [`random_request`]: chunks run whole.
    const WHOLE: usize = 64;

    /// The server's default wait of an exited token.
    const EXIT_WAIT: usize = crate::serve::engine::EngineLimits::EXIT_WAIT;

    /// Twenty-four requests of random settings, joining at random steps, some leaving early:
    /// each one's tokens, steps and logits (to the bit) are exactly those it gets alone. On a random model
    /// and on each of the reference's fixture models (trained weights' shapes and layouts).
    #[test]
    fn every_sequence_of_a_random_mix_gets_what_it_gets_alone() {
        let device = Device::flex();
        let model = HuginnConfig::tiny(64, 256, 4, (1, 2, 1)).init(&device, 61);
        random_mix(&model, 3, WHOLE);
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
            random_mix(&fixture.model, seed as u64 + 10, WHOLE);
        }
    }

    /// With prompts fed a few positions at a time, a random mix still gets what each request
    /// gets alone (in the same windows), to the bit.
    #[test]
    fn windowed_prompts_do_not_depend_on_the_company_either() {
        let model = HuginnConfig::tiny(64, 256, 4, (1, 2, 1)).init(&Device::flex(), 62);
        random_mix(&model, 5, 5);
    }

    /// A prompt fed in windows computes what it computes whole, up to rounding: greedy tokens and
    /// steps equal, logits within a bound, for every cache strategy and warm start, on a random
    /// model and a fixture's.
    #[test]
    fn a_prompt_in_windows_computes_what_it_computes_whole() {
        let device = Device::flex();
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/reference/tiny-a");
        let models = [
            HuginnConfig::tiny(64, 256, 4, (1, 2, 1)).init(&device, 63),
            model::fixture::Fixture::open(&fixture, &device).unwrap().model,
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for model in &models {
            let vocab = model.config().vocab_size as u32;
            for strategy in ["full", "latest-m4", "always-last-m4-compress-s4", "skip"] {
                for warm_start in [WarmStart::Cold, WarmStart::Normalized] {
                    let config = AdaptiveConfig::fixed(rng.random_range(2..6), warm_start, strategy.parse().unwrap());
                    let row = Row {
                        prompt: (0..23).map(|_| rng.random_range(0..vocab)).collect(),
                        max_new: 4,
                        decoding: Decoding::default(),
                    };
                    let whole = alone(model, &row, config);
                    for window in [1, 4, 7, 22] {
                        let windowed = alone_in_windows(model, &row, config, window);
                        assert_eq!(windowed.len(), whole.len());
                        for ((id, steps, logits), (want_id, want_steps, want)) in windowed.iter().zip(&whole) {
                            assert_eq!(
                                (id, steps),
                                (want_id, want_steps),
                                "{strategy} {warm_start:?} window {window}"
                            );
                            let most = want.iter().map(|&l| f32::from_bits(l).abs()).fold(1.0, f32::max);
                            for (got, want) in logits.iter().zip(want) {
                                let (got, want) = (f32::from_bits(*got), f32::from_bits(*want));
                                assert!(
                                    (got - want).abs() <= 1e-4 * most,
                                    "{strategy} window {window}: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// A long prompt fed in windows holds the others up by a window per step: a stream decoding
    /// beside it gets a token at every step of the prompt's prefill, which takes a step per
    /// window of each stage.
    #[test]
    fn a_long_prompt_holds_up_the_others_one_window_per_step() {
        let model = HuginnConfig::tiny(64, 32, 4, (1, 2, 1)).init(&Device::flex(), 64);
        let full = "full".parse().unwrap();
        let row = |len: usize, max_new: usize| Row {
            prompt: (0..len as u32).map(|i| i % 64).collect(),
            max_new,
            decoding: Decoding::default(),
        };
        let window = NonZeroUsize::new(8).unwrap();
        let (stream_row, long_row) = (row(3, 60), row(40, 1));
        let mut stream = Sequence::new(
            &model,
            &stream_row,
            AdaptiveConfig::fixed(1, WarmStart::Cold, full),
            window,
        )
        .unwrap();
        let long_config = AdaptiveConfig::fixed(3, WarmStart::Cold, full);
        let mut long = Sequence::new(&model, &long_row, long_config, window).unwrap();
        let (mut steps, mut streamed) = (0, 0);
        let mut first = None;
        while first.is_none() {
            let chosen = step(&model, &mut [&mut stream, &mut long], EXIT_WAIT);
            steps += 1;
            streamed += chosen[0].as_ref().unwrap().is_some() as usize;
            first = chosen[1].clone().unwrap();
        }
        // Five windows for the prelude, each of three iterations and the coda; the prelude's
        // last window shares its step with the core's first, and the exit's with the coda's.
        assert_eq!(steps, 5 * 5 - 2, "steps to the long prompt's first token");
        assert_eq!(streamed, steps, "the stream got a token at every step");
        let token = first.unwrap();
        assert_eq!(token.steps, 3);
        let whole = alone(&model, &long_row, long_config);
        assert_eq!(token.id, whole[0].0);
    }

    /// A decoded token that exits before the others waits for them (here: until it has waited
    /// four steps, or half the tokens have exited), and computes what it computes alone; with
    /// no wait allowed it leaves at once.
    #[test]
    fn a_token_that_exits_early_waits_for_others_to_exit_with_it() {
        let model = HuginnConfig::tiny(64, 32, 4, (1, 2, 1)).init(&Device::flex(), 65);
        let window = NonZeroUsize::new(WHOLE).unwrap();
        let rows: Vec<Row> = (0..4)
            .map(|i| Row {
                prompt: vec![10 + i],
                max_new: 2,
                decoding: Decoding::default(),
            })
            .collect();
        let configs: Vec<AdaptiveConfig> = [2, 9, 9, 9]
            .into_iter()
            .map(|steps| AdaptiveConfig::fixed(steps, WarmStart::Cold, "full".parse().unwrap()))
            .collect();
        let run = |exit_wait: usize| {
            let mut sequences: Vec<Sequence> = rows
                .iter()
                .zip(&configs)
                .map(|(row, config)| Sequence::new(&model, row, *config, window).unwrap())
                .collect();
            let mut chosen_at = vec![Vec::new(); 4];
            let mut got = vec![Vec::new(); 4];
            for at in 1..=9 {
                let mut all: Vec<&mut Sequence> = sequences.iter_mut().collect();
                for (i, token) in step(&model, &mut all, exit_wait).into_iter().enumerate() {
                    if let Some(token) = token.unwrap() {
                        chosen_at[i].push(at);
                        got[i].push((token.id, token.steps, bits(&token.logits)));
                    }
                }
            }
            (chosen_at, got)
        };
        // The 2-step token exits at step 2 and waits four steps; its next exits at step 8 and
        // waits for the others, which exit at step 9.
        let (chosen_at, got) = run(4);
        assert_eq!(chosen_at, [vec![6, 9], vec![9], vec![9], vec![9]]);
        assert_eq!(got[0], alone(&model, &rows[0], configs[0]));
        let (chosen_at, got_at_once) = run(0);
        assert_eq!(chosen_at, [vec![2, 4], vec![9], vec![9], vec![9]]);
        assert_eq!(got_at_once, got);
    }

    fn random_mix(model: &Huginn, seed: u64, window: usize) {
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
        // The most rows of short chunks of one length at once: more than a pass of them must occur.
        let (mut most_at_once, mut most_short) = (0, 0);
        for tick in 0.. {
            for (i, (row, config, joins)) in requests.iter().enumerate() {
                if *joins == tick {
                    let window = NonZeroUsize::new(window).unwrap();
                    running.push((i, Sequence::new(model, row, *config, window).unwrap()));
                }
            }
            running.retain(|(_, s)| !s.done());
            if running.is_empty() && tick > 12 {
                break;
            }
            most_at_once = most_at_once.max(running.len());
            for len in 1..=SMALL_ROWS {
                let rows = len * running.iter().filter(|(_, s)| s.chunk_len() == len).count();
                most_short = most_short.max(rows);
            }
            let mut sequences: Vec<&mut Sequence> = running.iter_mut().map(|(_, s)| s).collect();
            let chosen = step(model, &mut sequences, EXIT_WAIT);
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
            most_short > SMALL_ROWS,
            "at most {most_short} rows of short chunks of one length at once"
        );
        for (i, (row, config, _)) in requests.iter().enumerate() {
            let mut want = if window >= WHOLE {
                alone(model, row, *config)
            } else {
                alone_in_windows(model, row, *config, window)
            };
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
        let mut sequences: Vec<Sequence> = rows
            .iter()
            .map(|r| Sequence::new(&model, r, config, NonZeroUsize::new(WHOLE).unwrap()).unwrap())
            .collect();
        let mut got = vec![Vec::new(); rows.len()];
        let mut failed = vec![None; rows.len()];
        let mut broken = false;
        while !sequences.iter().all(Sequence::done) {
            // After its second token, sequence 1's next chunk is broken.
            if !broken && got[1].len() == 2 {
                assert!(matches!(sequences[1].stage, Stage::Feed(_)));
                sequences[1].stage = Stage::feed(vec![9999]);
                broken = true;
            }
            let active: Vec<usize> = (0..rows.len()).filter(|&i| !sequences[i].done()).collect();
            let mut all: Vec<&mut Sequence> = sequences.iter_mut().filter(|s| !s.done()).collect();
            let results = step(&model, &mut all, EXIT_WAIT);
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
