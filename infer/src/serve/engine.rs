//! The server's engine: one thread owns the model and schedules the queued requests step by
//! step. At every step new requests join the running batch (up to `max_batch` and the KV-cache
//! budget), each running request advances one recurrence iteration at its own depth (see
//! [`continuous`]), and requests that ended, failed or whose client left are dropped with their
//! cache. Requests of any recurrence settings run together, and each gets exactly the tokens it
//! gets alone.
//!
//! Scoring requests (`logprobs` or `echo` without new tokens) are scored together in one padded
//! pass, and wavefront (diffusion) requests run alone, between two steps of the others.

use std::any::Any;
use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use model::HuginnConfig;

use super::running::Running;
use crate::adaptive::{AdaptiveConfig, Row};
use crate::cache::{BLOCK, bytes_per_position, float_bytes};
use crate::continuous::{self, Sequence};
use crate::diffusion::{self, DiffusionConfig};
use crate::exit::Criterion;
use crate::sampling::Sampler;
use crate::score::{self, Scores, TokenScore};
use crate::text::TextStream;
use crate::warm_start::WarmStart;
use folder::ModelFolder;

/// How the engine schedules work.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Most requests running together.
    pub max_batch: usize,
    /// Most requests waiting to start; more are refused (503).
    pub queue_capacity: usize,
    /// Most bytes of KV cache the running requests may hold together.
    pub kv_budget_bytes: usize,
    /// Most positions of a prompt in one step: a longer prompt runs each stage in windows,
    /// so that it holds up the running streams by one window's work per step.
    pub prefill_window: NonZeroUsize,
    /// Most steps a decoded token that has exited waits for others to exit with it, so that
    /// their coda and prelude passes are shared (0: tokens never wait).
    pub exit_wait: usize,
}

impl EngineLimits {
    /// The default `prefill_window`: large enough that a window's products run at full speed,
    /// small enough that one step of a long prompt's stays short beside decoding.
    pub const PREFILL_WINDOW: NonZeroUsize = NonZeroUsize::new(256).expect("not zero");

    /// The default `exit_wait`: a few steps, against a token's tens.
    pub const EXIT_WAIT: usize = 4;
}

/// One request, ready to run.
#[derive(Debug)]
pub struct Job {
    pub row: Row,
    pub config: AdaptiveConfig,
    /// Set for the wavefront sampler: the job then runs alone.
    pub diffusion: Option<DiffusionConfig>,
    /// Text that ends the sequence (left out of it), besides the folder's own.
    pub stop_strings: Vec<String>,
    /// Set when the request asks for log probabilities: each new token comes with its score,
    /// and the prompt's come first when asked for.
    pub scoring: Option<Scoring>,
    /// Where the request's tokens go; closed when its client has gone.
    pub events: mpsc::UnboundedSender<Event>,
}

/// A request for the log probabilities of its answer, and of its prompt when `prompt` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scoring {
    /// Most likely alternatives listed per token (`0..=score::MAX_TOP`).
    pub top: usize,
    pub prompt: bool,
}

impl Job {
    /// A scoring job of at most one new token: its prompt pass alone answers it.
    fn scores_only(&self) -> bool {
        self.scoring.is_some() && self.row.max_new <= 1
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` reached, or the model's context.
    Length,
    /// The wavefront sampler ran its `max_diffusion_steps` waves before `max_tokens` tokens
    /// froze: the positions' states did not settle, and the answer is what had frozen.
    NotConverged,
    /// The server is shutting down.
    Cancelled,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::NotConverged => "not_converged",
            Self::Cancelled => "cancelled",
        }
    }
}

/// What the engine tells a request, in order: tokens, then `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new token and the text it completes (possibly empty: half a character, a special
    /// token, or text held back while it may start a stop string).
    Token {
        id: u32,
        text: String,
        steps: usize,
        /// The token's log probability and alternatives, for a scoring request.
        score: Option<TokenScore>,
    },
    /// The end: `tail` is text held back until now (an unfinished stop string that never
    /// completed, the last bytes of a character).
    Done {
        finish: Finish,
        tail: String,
        steps_per_token: Vec<usize>,
    },
    /// The prompt's log probabilities (each token after the first), before any token, when a
    /// scoring request asks for them.
    Scored {
        prompt: Vec<TokenScore>,
    },
    Failed(String),
}

/// What the HTTP side and the engine thread both see.
#[derive(Default)]
pub(super) struct Shared {
    /// Requests admitted and not yet started.
    queued: AtomicUsize,
    /// Requests being decoded.
    running: AtomicUsize,
    /// Tokens generated since the start.
    pub(super) generated: AtomicUsize,
    /// KV-cache bytes the running requests hold.
    kv_bytes: AtomicUsize,
    /// KV-cache bytes reserved for them (what admission counted against the budget).
    kv_reserved: AtomicUsize,
    /// Set once: end everything now.
    cancel: AtomicBool,
    /// Set once the engine thread has ended, however it ended.
    stopped: AtomicBool,
}

/// The handle the HTTP side holds: submits jobs, reports load, stops the engine.
pub struct Engine {
    sender: mpsc::UnboundedSender<Job>,
    shared: Arc<Shared>,
    limits: EngineLimits,
    per_position: PositionBytes,
    context: usize,
    worker: Option<JoinHandle<()>>,
}

/// The KV cache of the running requests, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBytes {
    /// What their caches hold now.
    pub in_use: usize,
    /// What they may grow to, as admitted.
    pub reserved: usize,
    pub budget: usize,
}

/// Why a job was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The queue is full; try again later.
    Busy,
    /// The request alone needs more KV cache than the budget.
    TooLarge { needed: usize, budget: usize },
    /// The engine thread has ended.
    Stopped,
}

impl Engine {
    /// Starts the engine thread, which runs `folder`'s model until the engine is dropped.
    pub fn start(folder: Arc<ModelFolder>, limits: EngineLimits) -> Self {
        let per_position = PositionBytes::of(&folder);
        let context = folder.model.config().block_size;
        let (sender, receiver) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let worker = Worker {
            folder,
            receiver,
            waiting: VecDeque::new(),
            shared: shared.clone(),
            limits,
            per_position: per_position.clone(),
        };
        let worker = std::thread::Builder::new()
            .name("huginn-engine".into())
            .spawn(move || worker.run())
            .expect("spawning the engine thread");
        Self {
            sender,
            shared,
            limits,
            per_position,
            context,
            worker: Some(worker),
        }
    }

    /// Queues a job, or says why not.
    pub fn submit(&self, job: Job) -> Result<(), Refusal> {
        if !self.alive() {
            return Err(Refusal::Stopped);
        }
        let needed = self.per_position.row(&job);
        if needed > self.limits.kv_budget_bytes {
            return Err(Refusal::TooLarge {
                needed,
                budget: self.limits.kv_budget_bytes,
            });
        }
        let admitted = self
            .shared
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < self.limits.queue_capacity).then_some(q + 1)
            });
        if admitted.is_err() {
            return Err(Refusal::Busy);
        }
        self.sender.send(job).map_err(|_| {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            Refusal::Stopped
        })
    }

    /// Requests waiting to start.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }

    /// Requests being decoded.
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::Acquire)
    }

    /// Tokens generated since the start.
    pub fn generated(&self) -> usize {
        self.shared.generated.load(Ordering::Acquire)
    }

    /// KV-cache bytes held and reserved by the running requests, and the budget.
    pub fn kv_bytes(&self) -> KvBytes {
        KvBytes {
            in_use: self.shared.kv_bytes.load(Ordering::Acquire),
            reserved: self.shared.kv_reserved.load(Ordering::Acquire),
            budget: self.limits.kv_budget_bytes,
        }
    }

    /// Whether the engine thread is still running (it ends only when the engine is dropped,
    /// unless something in it failed beyond a single batch).
    pub fn alive(&self) -> bool {
        !self.shared.stopped.load(Ordering::Acquire)
    }

    /// The model's context length.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Ends every running and waiting request now (each gets `Done` with
    /// [`Finish::Cancelled`]); the engine stops taking jobs.
    pub fn cancel_all(&self) {
        self.shared.cancel.store(true, Ordering::Release);
    }

    /// Closes the queue: the engine finishes what it has, then its thread ends and later jobs
    /// are refused with [`Refusal::Stopped`].
    pub(crate) fn close(&mut self) {
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.sender, closed));
    }
}

impl Drop for Engine {
    /// Closes the queue and waits for the engine to finish what it has.
    fn drop(&mut self) {
        self.close();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// What a row's KV cache costs per position, for the model served.
#[derive(Debug, Clone)]
struct PositionBytes {
    model: HuginnConfig,
    element: usize,
}

impl PositionBytes {
    fn of(folder: &ModelFolder) -> Self {
        Self {
            model: folder.model.config().clone(),
            element: float_bytes(&folder.model.device()),
        }
    }

    fn per_position(&self, config: &AdaptiveConfig) -> usize {
        bytes_per_position(config.strategy, &self.model, config.max_steps, self.element)
    }

    fn row(&self, job: &Job) -> usize {
        if let Some(diffusion) = &job.diffusion {
            let (prompt, new) = (job.row.prompt.len(), job.row.max_new);
            return diffusion
                .cache_bytes(&self.model, prompt, new, self.element)
                .unwrap_or(usize::MAX);
        }
        // Each slot grows a block of positions at a time.
        let positions = (job.row.prompt.len() + job.row.max_new).div_ceil(BLOCK) * BLOCK;
        positions * self.per_position(&job.config)
    }

    /// A scoring batch holds no cache but the logits of every position of every padded row,
    /// in f32 on the device and again on the host: the budget bounds those.
    fn scoring(&self, jobs: &[Job]) -> usize {
        let width = jobs.iter().map(|j| j.row.prompt.len()).max().unwrap_or(0);
        let logits = jobs.len().saturating_mul(width).saturating_mul(self.model.vocab_size);
        logits.saturating_mul(2 * 4)
    }
}

struct Worker {
    folder: Arc<ModelFolder>,
    receiver: mpsc::UnboundedReceiver<Job>,
    /// Jobs taken off the channel that did not fit the last batch, oldest first.
    waiting: VecDeque<Job>,
    shared: Arc<Shared>,
    limits: EngineLimits,
    per_position: PositionBytes,
}

/// Marks the engine stopped and says so, however its thread ends (a panic included).
struct ExitGuard(Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Release);
        if std::thread::panicking() {
            tracing::error!("the engine thread panicked; the server can no longer answer requests");
        } else {
            tracing::info!("the engine stopped: its queue is closed");
        }
    }
}

impl Worker {
    /// The engine's loop: take what arrived, drop what was abandoned, admit what fits, and run
    /// one step of every running request; until the queue is closed and everything has ended.
    fn run(mut self) {
        let _exit = ExitGuard(self.shared.clone());
        // The engine's kernels split their work over a pool this thread works in, as a CLI
        // command's do on its main thread.
        let _pool = model::kernels::threads::join_a_new_pool();
        let folder = self.folder.clone();
        let mut running: Vec<Running<'_>> = Vec::new();
        while self.receive(running.is_empty()) {
            if self.shared.cancel.load(Ordering::Acquire) {
                self.cancel(&mut running);
                continue;
            }
            self.admit(&folder, &mut running);
            self.publish(&running);
            if !running.is_empty() {
                self.step(&folder, &mut running);
                self.retire(&mut running);
            }
        }
    }

    /// Takes the requests that ended out of the running batch, publishes the load without
    /// them, and only then sends their last events.
    fn retire(&self, running: &mut Vec<Running<'_>>) {
        let (mut ended, going): (Vec<_>, Vec<_>) = std::mem::take(running).into_iter().partition(Running::ended);
        *running = going;
        self.publish(running);
        for row in &mut ended {
            row.send_last();
        }
    }

    /// Takes the jobs that arrived, waiting for one when `idle` and none waits; drops waiting
    /// jobs whose client has left. `false` once the queue is closed and nothing is left.
    fn receive(&mut self, idle: bool) -> bool {
        if idle && self.waiting.is_empty() {
            match self.receiver.blocking_recv() {
                Some(job) => self.waiting.push_back(job),
                None => return false,
            }
        }
        while let Ok(job) = self.receiver.try_recv() {
            self.waiting.push_back(job);
        }
        let gone = self.waiting.iter().filter(|j| j.events.is_closed()).count();
        self.shared.queued.fetch_sub(gone, Ordering::AcqRel);
        self.waiting.retain(|j| !j.events.is_closed());
        true
    }

    /// Ends every running and waiting request as cancelled.
    fn cancel(&mut self, running: &mut Vec<Running<'_>>) {
        for row in running.iter_mut() {
            row.finish(Finish::Cancelled);
        }
        self.retire(running);
        self.shared.queued.fetch_sub(self.waiting.len(), Ordering::AcqRel);
        for job in self.waiting.drain(..) {
            let _ = job.events.send(Event::Done {
                finish: Finish::Cancelled,
                tail: String::new(),
                steps_per_token: Vec::new(),
            });
        }
    }

    /// Starts waiting jobs, oldest first, while they fit: at most `max_batch` running and
    /// their KV-cache reservations within the budget. The oldest job that does not fit waits
    /// for memory, and the ones behind it with it. Scoring and wavefront jobs run whole when
    /// they come first, between two steps of the others.
    fn admit<'f>(&mut self, folder: &'f ModelFolder, running: &mut Vec<Running<'f>>) {
        while let Some(first) = self.waiting.front() {
            if first.scores_only() || first.diffusion.is_some() {
                let first = self.waiting.pop_front().expect("a job waits");
                let batch = self.fill(first);
                self.shared.queued.fetch_sub(batch.len(), Ordering::AcqRel);
                self.shared
                    .running
                    .store(running.len() + batch.len(), Ordering::Release);
                let last = guarded(&batch, |batch| self.decode_alone(batch));
                // A client holding its answer must not scrape itself as still running.
                self.publish(running);
                for (job, event) in batch.iter().zip(last) {
                    let _ = job.events.send(event);
                }
                continue;
            }
            let needed = self.per_position.row(first);
            let reserved: usize = running.iter().map(|r| r.reserved).sum();
            if running.len() >= self.limits.max_batch || reserved + needed > self.limits.kv_budget_bytes {
                break;
            }
            let job = self.waiting.pop_front().expect("a job waits");
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            let events = job.events.clone();
            let started = catch_unwind(AssertUnwindSafe(|| {
                let scores = job.scoring.is_some_and(|s| s.prompt).then(|| self.prompt_scores(&job));
                Running::start(folder, job, needed, self.limits.prefill_window, scores)
            }));
            match started {
                Ok(Some(row)) if !row.ended() => running.push(row),
                Ok(Some(mut row)) => row.send_last(),
                Ok(None) => {}
                Err(panic) => {
                    let reason = panic_message(panic.as_ref());
                    tracing::error!("starting a request panicked: {reason}");
                    let _ = events.send(Event::Failed(format!("the engine failed on this request: {reason}")));
                }
            }
        }
    }

    /// One step of every running request (see [`continuous::step`]), each chosen token sent
    /// to its client. Requests whose client has left are dropped first.
    fn step(&self, folder: &ModelFolder, running: &mut [Running<'_>]) {
        for row in running.iter_mut().filter(|r| r.job.events.is_closed()) {
            row.sequence.end();
        }
        let mut active: Vec<&mut Running<'_>> = running.iter_mut().filter(|r| !r.ended()).collect();
        let mut sequences: Vec<&mut Sequence> = active.iter_mut().map(|r| &mut r.sequence).collect();
        let results = continuous::step(&folder.model, &mut sequences, self.limits.exit_wait);
        drop(sequences);
        for (row, result) in active.into_iter().zip(results) {
            match result {
                Err(reason) => {
                    tracing::error!("{reason}");
                    row.fail(reason);
                }
                Ok(None) => {}
                Ok(Some(chosen)) => {
                    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| row.deliver(chosen, &self.shared))) {
                        let reason = panic_message(panic.as_ref()).to_string();
                        row.fail(format!("the engine failed on this request: {reason}"));
                    }
                }
            }
        }
    }

    /// Publishes the running count and their KV cache, held and reserved.
    fn publish(&self, running: &[Running<'_>]) {
        self.shared.running.store(running.len(), Ordering::Release);
        let reserved = running.iter().map(|r| r.reserved).sum();
        self.shared.kv_reserved.store(reserved, Ordering::Release);
        let in_use = running.iter().map(|r| r.sequence.cache_bytes()).sum();
        self.shared.kv_bytes.store(in_use, Ordering::Release);
    }

    /// `first` and, for a scoring job, the waiting scoring jobs of the same settings that fit
    /// beside it in one pass.
    fn fill(&mut self, first: Job) -> Vec<Job> {
        let mut batch = vec![first];
        if !batch[0].scores_only() {
            return batch;
        }
        let mut i = 0;
        while i < self.waiting.len() && batch.len() < self.limits.max_batch {
            let same = self.waiting[i].config == batch[0].config
                && self.waiting[i].diffusion.is_none()
                && self.waiting[i].scores_only();
            if same {
                batch.push(self.waiting.remove(i).expect("index in range"));
                if self.per_position.scoring(&batch) > self.limits.kv_budget_bytes {
                    let job = batch.pop().expect("just pushed");
                    self.waiting.insert(i, job);
                    i += 1;
                }
            } else {
                i += 1;
            }
        }
        batch
    }

    /// A scoring batch, or one request through the wavefront sampler; each job's last event
    /// (`Done` or `Failed`), which the caller sends once the job no longer counts as running.
    fn decode_alone(&self, batch: &[Job]) -> Vec<Event> {
        if let [job] = batch
            && let Some(config) = &job.diffusion
        {
            return vec![self.decode_diffusion(job, config)];
        }
        self.score(batch)
    }
}

impl Worker {
    /// Scores the prompts of a batch of scoring jobs and draws each one's answer token, if it
    /// asked for one, from the prediction after its prompt (as generation draws its first).
    /// At a fixed depth from a cold start the prompts go through one padded pass; otherwise
    /// each is fed token by token with its own exits and warm starts.
    fn score(&self, batch: &[Job]) -> Vec<Event> {
        let results = self.score_prompts(batch);
        batch
            .iter()
            .zip(results)
            .map(|(job, result)| match result {
                Ok(scores) => self.answer(job, scores),
                Err(reason) => Event::Failed(reason),
            })
            .collect()
    }

    /// Sends `job`'s prompt scores and its answer token, if it asked for them, and returns its
    /// last event.
    fn answer(&self, job: &Job, mut scores: Scores) -> Event {
        let top = |job: &Job| job.scoring.map_or(0, |s| s.top);
        if job.scoring.is_some_and(|s| s.prompt) {
            for token in &mut scores.tokens {
                token.top.truncate(top(job));
            }
            let _ = job.events.send(Event::Scored { prompt: scores.tokens });
        }
        let mut steps_per_token = Vec::new();
        let mut finish = Finish::Length;
        let mut tail = String::new();
        if job.row.max_new > 0 {
            let decoding = &job.row.decoding;
            let token = Sampler::new(decoding.sampling).sample(&scores.next.logits, &job.row.prompt);
            let score = scores.next.score(token, top(job));
            self.shared.generated.fetch_add(1, Ordering::AcqRel);
            if decoding.stop_tokens.contains(&token) || self.folder.stop_tokens.contains(&token) {
                finish = Finish::Stop;
            }
            // The token's text as generation gives it: through the stop strings, an
            // unfinished character shown as such.
            let text = match &self.folder.tokenizer {
                Some(tokenizer) => {
                    let stops = self.folder.stop_strings.iter().chain(&job.stop_strings).cloned();
                    let mut stream = TextStream::new(tokenizer, stops);
                    let pushed = stream.push(token);
                    match pushed.and_then(|released| Ok((released, stream.finish()?))) {
                        Ok((released, rest)) => {
                            if released.stopped {
                                finish = Finish::Stop;
                            }
                            tail = rest;
                            released.text
                        }
                        Err(e) => return Event::Failed(e.to_string()),
                    }
                }
                None => token.to_string(),
            };
            steps_per_token.push(score.steps);
            let steps = score.steps;
            let _ = job.events.send(Event::Token {
                id: token,
                text,
                steps,
                score: Some(score),
            });
        }
        Event::Done {
            finish,
            tail,
            steps_per_token,
        }
    }

    /// The log probabilities of `job`'s prompt, as [`Self::score`] computes them for one job.
    fn prompt_scores(&self, job: &Job) -> Result<Vec<TokenScore>, String> {
        let scored = self.score_prompts(std::slice::from_ref(job)).pop().expect("one job");
        scored.map(|s| s.tokens)
    }

    /// Scores the jobs' prompts: at a fixed depth from a cold start in one padded pass, else
    /// each token by token with its own exits and warm starts (the jobs share one recurrence
    /// setting, as a batch does).
    fn score_prompts(&self, jobs: &[Job]) -> Vec<Result<Scores, String>> {
        let model = &self.folder.model;
        let top = |job: &Job| job.scoring.map_or(0, |s| s.top);
        let config = &jobs[0].config;
        if config.criterion == Criterion::None && config.warm_start == WarmStart::Cold {
            let rows: Vec<Vec<u32>> = jobs.iter().map(|job| job.row.prompt.clone()).collect();
            let most_top = jobs.iter().map(top).max().unwrap_or(0);
            return match score::at_depths(model, &rows, &[config.max_steps], most_top) {
                Ok(mut by_depth) => by_depth.pop().expect("one depth").into_iter().map(Ok).collect(),
                Err(e) => jobs.iter().map(|_| Err(e.to_string())).collect(),
            };
        }
        jobs.iter()
            .map(|job| {
                if self.shared.cancel.load(Ordering::Acquire) || job.events.is_closed() {
                    return Err("cancelled".to_string());
                }
                score::adaptive(model, &job.row.prompt, job.config, top(job)).map_err(|e| e.to_string())
            })
            .collect()
    }

    /// One request through the wavefront sampler (batch size 1, as the reference's): tokens
    /// stream as they freeze, each reported with the wave's core steps. A wave can freeze
    /// nothing, so the client's leaving and a cancellation are checked after every wave, not
    /// only when a token is sent.
    fn decode_diffusion(&self, job: &Job, config: &DiffusionConfig) -> Event {
        let folder = &self.folder;
        let mut decoding = job.row.decoding.clone();
        for &id in &folder.stop_tokens {
            if !decoding.stop_tokens.contains(&id) {
                decoding.stop_tokens.push(id);
            }
        }
        let mut text = folder.tokenizer.as_ref().map(|tokenizer| {
            let stops = folder.stop_strings.iter().chain(&job.stop_strings).cloned();
            TextStream::new(tokenizer, stops)
        });
        let (mut finish, mut failed, mut sent) = (Finish::Length, None, 0);
        let max_new = job.row.max_new;
        let result = diffusion::generate(&folder.model, &job.row.prompt, max_new, config, &decoding, |block| {
            if self.shared.cancel.load(Ordering::Acquire) {
                finish = Finish::Cancelled;
                return ControlFlow::Break(());
            }
            if job.events.is_closed() {
                return ControlFlow::Break(());
            }
            for &id in block {
                if sent == max_new {
                    return ControlFlow::Break(());
                }
                self.shared.generated.fetch_add(1, Ordering::AcqRel);
                if self.shared.cancel.load(Ordering::Acquire) {
                    finish = Finish::Cancelled;
                    return ControlFlow::Break(());
                }
                let mut stopped = decoding.stop_tokens.contains(&id);
                let piece = match &mut text {
                    Some(stream) => match stream.push(id) {
                        Ok(released) => {
                            stopped |= released.stopped;
                            released.text
                        }
                        Err(e) => {
                            failed = Some(e.to_string());
                            return ControlFlow::Break(());
                        }
                    },
                    None if sent == 0 => id.to_string(),
                    None => format!(",{id}"),
                };
                sent += 1;
                if stopped {
                    finish = Finish::Stop;
                }
                let steps = config.inner_recurrence;
                let token = Event::Token {
                    id,
                    text: piece,
                    steps,
                    score: None,
                };
                if job.events.send(token).is_err() || stopped {
                    return ControlFlow::Break(());
                }
            }
            if sent == max_new {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        match (result, failed) {
            (Err(e), _) => Event::Failed(e.to_string()),
            (Ok(_), Some(reason)) => Event::Failed(reason),
            (Ok(generation), None) => {
                let tail = match &mut text {
                    Some(stream) => match stream.finish() {
                        Ok(tail) => tail,
                        Err(e) => return Event::Failed(e.to_string()),
                    },
                    None => String::new(),
                };
                if finish == Finish::Length
                    && sent < max_new
                    && generation.stats.diffusion_steps >= config.max_diffusion_steps
                {
                    finish = Finish::NotConverged;
                }
                let mut steps = generation.steps_between_samplings;
                steps.truncate(sent);
                Event::Done {
                    finish,
                    tail,
                    steps_per_token: steps,
                }
            }
        }
    }
}

/// Runs `decode` on `batch`. A panic in it (a bug, a device fault) fails that batch's requests
/// and is logged, and the engine goes on with the next batch. A request that had already ended
/// has stopped listening, so its extra event is harmless.
fn guarded(batch: &[Job], decode: impl FnOnce(&[Job]) -> Vec<Event>) -> Vec<Event> {
    catch_unwind(AssertUnwindSafe(|| decode(batch))).unwrap_or_else(|panic| {
        let reason = panic_message(panic.as_ref());
        tracing::error!("decoding a batch of {} panicked: {reason}", batch.len());
        let failed = || Event::Failed(format!("the engine failed on this request: {reason}"));
        batch.iter().map(|_| failed()).collect()
    })
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::Strategy;
    use crate::warm_start::WarmStart;

    fn job() -> (Job, mpsc::UnboundedReceiver<Event>) {
        let (events, receiver) = mpsc::unbounded_channel();
        let job = Job {
            row: Row {
                prompt: vec![1, 2],
                max_new: 2,
                ..Row::default()
            },
            config: AdaptiveConfig::fixed(2, WarmStart::Cold, Strategy::default()),
            diffusion: None,
            stop_strings: Vec::new(),
            scoring: None,
            events,
        };
        (job, receiver)
    }

    /// Scoring batches are bounded by their logits (they hold no cache), generation by each
    /// request's cache at its full length.
    #[test]
    fn the_budget_counts_a_scoring_batch_s_logits_and_a_request_s_cache() {
        let model = model::HuginnConfig::tiny(100, 16, 4, (1, 2, 1));
        let bytes = PositionBytes { model, element: 4 };
        let (mut scoring, _events) = job();
        scoring.scoring = Some(Scoring { top: 1, prompt: true });
        scoring.row.max_new = 1;
        // Two rows of two positions, 100 logits each, 8 bytes per logit.
        let (mut other, _more) = job();
        other.scoring = scoring.scoring;
        other.row.max_new = 0;
        assert_eq!(bytes.scoring(&[scoring, other]), 2 * 2 * 100 * 8);
        let (generating, _rest) = job();
        assert_eq!(
            bytes.row(&generating),
            BLOCK * bytes.per_position(&AdaptiveConfig::fixed(2, WarmStart::Cold, Strategy::default()))
        );
    }

    #[test]
    fn a_panic_while_decoding_fails_that_batch_only() {
        let (batch, _receivers): (Vec<_>, Vec<_>) = (0..2).map(|_| job()).unzip();
        let last = guarded(&batch, |_| panic!("the device is lost"));
        assert_eq!(last.len(), batch.len());
        for event in last {
            match event {
                Event::Failed(reason) => assert!(reason.contains("the device is lost"), "{reason}"),
                other => panic!("{other:?}"),
            }
        }
        let done = || Event::Done {
            finish: Finish::Length,
            tail: String::new(),
            steps_per_token: vec![],
        };
        let last = guarded(&batch, |batch| batch.iter().map(|_| done()).collect());
        assert!(last.iter().all(|e| matches!(e, Event::Done { .. })));
    }

    #[test]
    fn the_engine_is_marked_stopped_however_its_thread_ends() {
        for panics in [false, true] {
            let shared = Arc::new(Shared::default());
            let exit = ExitGuard(shared.clone());
            let thread = std::thread::spawn(move || {
                let _exit = exit;
                assert!(!panics, "a bug in the engine");
            });
            assert_eq!(thread.join().is_err(), panics);
            assert!(shared.stopped.load(Ordering::Acquire));
        }
    }
}
