//! A training run: its configuration (`run.json`, and `run.toml` for `--config`), the loop,
//! evaluation at fixed depths, the metrics log and crash-safe checkpoints, all under one run
//! directory:
//!
//! ```text
//! RUN/run.json            the configuration, written once (what `Trainer::resume` reads)
//! RUN/run.toml            the same configuration as TOML (see `config_file`)
//! RUN/tokenizer.json      text runs: the tokenizer, trained or copied at the start
//! RUN/metrics.jsonl|csv   every record (see `metrics`)
//! RUN/checkpoints/step-N  the newest checkpoints (see `checkpoint`)
//! RUN/.lock               locked while a process trains in RUN (see `run_lock`)
//! RUN/final/              the model at the end, in the Hugging Face layout (`config.json` +
//!                         `model.safetensors`, and a text run's tokenizer with its config;
//!                         a fine-tuned run's also the chat template and generation config),
//!                         which `infer`, `analysis` and the reference load
//! ```
//!
//! `Trainer::resume` continues from the newest checkpoint bit-exactly: depth, initial state and
//! data are pure functions of `(seed, step)`, and the optimizer state is saved whole. Before
//! anything is allocated, a run's configuration is checked against its ranges (`limits`) and
//! its memory against the machine's (`memory`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use model::{DeviceSpec, Huginn, HuginnConfig};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointError, Checkpoints, Skipped, TrainState};
use crate::data::{DataConfig, Dataset, EvalSplit, TokenizerSource};
use crate::depth::DepthScheme;
use crate::limits::{self, *};
use crate::memory::{MemoryError, Shapes};
use crate::metrics::{MetricsError, MetricsLog, Record, write_atomically};
use crate::monitor::{evaluate_depths, monitors};
use crate::optim::{EllisAdamConfig, no_decay_group};
use crate::run_lock::{LockError, RunLock};
use crate::schedule::Schedule;
use crate::step::{MicroBatch, StepConfig, StepError, train_step_on};
use crate::text::TextError;

/// Safetensors shard size of the final model: one file for any model this crate trains, shards
/// (with an index) only for Huginn-scale ones.
const FINAL_SHARD_BYTES: usize = 2 << 30;

/// Which optimizer, with its hyperparameters (the learning rate comes from the schedule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum OptimizerConfig {
    /// The paper's Adam variant (`optim`): β = (0.9, 0.95), atan2, update clipping.
    EllisAdam {
        beta_1: f64,
        beta_2: f64,
        weight_decay: f64,
        update_clipping: bool,
    },
    /// Burn's AdamW.
    AdamW {
        beta_1: f32,
        beta_2: f32,
        epsilon: f32,
        weight_decay: f32,
    },
}

impl OptimizerConfig {
    /// The optimizer for `model`, with the paper's groups: no weight decay on norms and q/k
    /// biases.
    pub fn init(&self, model: &Huginn, peak_lr: f64) -> ModuleOptimizer {
        match *self {
            OptimizerConfig::EllisAdam {
                beta_1,
                beta_2,
                weight_decay,
                update_clipping,
            } => EllisAdamConfig::new(peak_lr)
                .with_beta_1(beta_1)
                .with_beta_2(beta_2)
                .with_weight_decay(weight_decay)
                .with_update_clipping(update_clipping)
                .init_grouped(model),
            OptimizerConfig::AdamW {
                beta_1,
                beta_2,
                epsilon,
                weight_decay,
            } => {
                let config = AdamWConfig::new()
                    .with_beta_1(beta_1)
                    .with_beta_2(beta_2)
                    .with_epsilon(epsilon);
                config.clone().with_weight_decay(weight_decay).init().with_group(
                    no_decay_group(model),
                    config.with_weight_decay(0.0).build(),
                    None,
                )
            }
        }
    }
}

/// Everything that defines a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub model: HuginnConfig,
    pub data: DataConfig,
    /// Seeds the initial weights, the depths, the initial states and the data.
    pub seed: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Rows per micro-batch, and micro-batches per optimizer step (gradient accumulation).
    pub batch_size: usize,
    pub accumulation: usize,
    pub depth: DepthScheme,
    pub optimizer: OptimizerConfig,
    pub schedule: Schedule,
    /// Global gradient-norm bound (the paper: 1).
    pub max_grad_norm: Option<f64>,
    pub eval_every: u64,
    /// Rows of each held-out split.
    pub eval_rows: usize,
    pub eval_depths: Vec<usize>,
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    /// The devices the run trains on, one backend, the first holding the model and optimizer;
    /// the micro-batches are spread over them and the numbers do not depend on how many there
    /// are. Empty: the one device the caller gives (`huginn-train --device`). `--devices` on a
    /// resume overrides it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceSpec>,
    /// Fine-tuning: the model folder or hub name whose weights the run starts from (`model`
    /// must be its shape; see `finetune`). None: fresh weights from `seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
}

impl RunConfig {
    /// Checks what the types do not, so that bad values from a file or a caller are one error
    /// here rather than a panic or a meaningless run later.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |reason: String| Err(TrainError::InvalidConfig(reason));
        self.check_ranges().map_err(TrainError::InvalidConfig)?;
        if self.steps == 0 || self.batch_size == 0 || self.accumulation == 0 {
            return bad("steps, batch_size and accumulation must be positive".into());
        }
        if self.eval_every == 0 || self.checkpoint_every == 0 || self.eval_rows == 0 {
            return bad("eval_every, checkpoint_every and eval_rows must be positive".into());
        }
        if self.eval_depths.contains(&0) {
            return bad("eval_depths must be positive".into());
        }
        match self.depth {
            DepthScheme::PoissonLognormalFilling { mean, backprop } | DepthScheme::Fixed { steps: mean, backprop }
                if mean == 0 || backprop == 0 =>
            {
                return bad("depth: the mean (or fixed) depth and backprop must be positive".into());
            }
            _ => {}
        }
        let peak = self.schedule.peak_lr();
        if !(peak.is_finite() && peak > 0.0) {
            return bad(format!("schedule.peak_lr must be a positive number, not {peak}"));
        }
        if let Schedule::Cosine { min_lr, .. } | Schedule::Trapezoid { min_lr, .. } = self.schedule
            && !(0.0..=peak).contains(&min_lr)
        {
            return bad(format!("schedule.min_lr must lie in [0, peak_lr], not {min_lr}"));
        }
        if let Some(norm) = self.max_grad_norm
            && !(norm.is_finite() && norm > 0.0)
        {
            return bad(format!(
                "max_grad_norm must be a positive number, not {norm} (leave it out to turn clipping off)"
            ));
        }
        let (beta_1, beta_2) = match self.optimizer {
            OptimizerConfig::EllisAdam { beta_1, beta_2, .. } => (beta_1, beta_2),
            OptimizerConfig::AdamW { beta_1, beta_2, .. } => (beta_1 as f64, beta_2 as f64),
        };
        if !((0.0..1.0).contains(&beta_1) && (0.0..1.0).contains(&beta_2)) {
            return bad(format!("optimizer betas must lie in [0, 1), not ({beta_1}, {beta_2})"));
        }
        if !self.devices.is_empty() {
            DeviceSpec::check_list(&self.devices).map_err(|e| TrainError::InvalidConfig(e.to_string()))?;
            self.check_split(self.devices.len())?;
        }
        self.model
            .validate()
            .map_err(|e| TrainError::InvalidConfig(format!("model: {e}")))
    }

    /// Every count within its range (see `limits`), every rate a number; the error names the
    /// field.
    fn check_ranges(&self) -> Result<(), String> {
        let (warmup, total, cooldown) = match self.schedule {
            Schedule::Constant { warmup, .. } => (warmup, 1, 0),
            Schedule::Cosine {
                warmup, total_steps, ..
            } => (warmup, total_steps, 0),
            Schedule::Trapezoid {
                warmup,
                total_steps,
                cooldown,
                ..
            } => (warmup, total_steps, cooldown),
        };
        let m = &self.model;
        let mut counts = vec![
            ("seed", self.seed, 0, MAX_SEED),
            ("steps", self.steps, 1, MAX_STEPS),
            ("batch_size", self.batch_size as u64, 1, MAX_BATCH),
            ("accumulation", self.accumulation as u64, 1, MAX_ACCUMULATION),
            ("eval_every", self.eval_every, 1, MAX_STEPS),
            ("checkpoint_every", self.checkpoint_every, 1, MAX_STEPS),
            ("eval_rows", self.eval_rows as u64, 1, MAX_EVAL_ROWS),
            ("keep_checkpoints", self.keep_checkpoints as u64, 0, MAX_KEEP),
            ("schedule.warmup", warmup, 0, MAX_STEPS),
            ("schedule.total_steps", total, 1, MAX_STEPS),
            ("schedule.cooldown", cooldown, 0, MAX_STEPS),
            ("model.n_embd", m.n_embd as u64, 1, MAX_WIDTH),
            ("model.n_heads", m.n_heads as u64, 1, MAX_HEADS),
            ("model.n_layers_in_prelude", m.n_layers_in_prelude as u64, 0, MAX_LAYERS),
            (
                "model.n_layers_in_recurrent_block",
                m.n_layers_in_recurrent_block as u64,
                1,
                MAX_LAYERS,
            ),
            ("model.n_layers_in_coda", m.n_layers_in_coda as u64, 0, MAX_LAYERS),
            ("model.vocab_size", m.vocab_size as u64, 1, MAX_VOCAB),
            ("model.block_size", m.block_size as u64, 1, MAX_SEQ_LEN),
        ];
        match self.depth {
            DepthScheme::PoissonLognormalFilling { mean, backprop } => {
                counts.push(("depth.mean", mean as u64, 1, MAX_MEAN_DEPTH));
                counts.push(("depth.backprop", backprop as u64, 1, MAX_MEAN_DEPTH));
            }
            DepthScheme::Fixed { steps, backprop } => {
                counts.push(("depth.steps", steps as u64, 1, MAX_MEAN_DEPTH));
                counts.push(("depth.backprop", backprop as u64, 1, MAX_MEAN_DEPTH));
            }
            DepthScheme::NonRecurrent => {}
        }
        match &self.data {
            DataConfig::Chains { curriculum, .. } | DataConfig::Pointers { curriculum, .. } => {
                counts.push(("data.curriculum", *curriculum, 0, MAX_STEPS));
            }
            DataConfig::Addition { max_digits, .. } => {
                counts.push(("data.max_digits", *max_digits as u64, 1, MAX_DIGITS));
            }
            DataConfig::Text { seq_len, tokenizer, .. } => {
                counts.push(("data.seq_len", *seq_len as u64, 1, MAX_SEQ_LEN));
                if let TokenizerSource::Train { vocab_size } = tokenizer {
                    counts.push(("data.tokenizer.vocab_size", *vocab_size as u64, 1, MAX_VOCAB));
                }
            }
            DataConfig::Chat { .. } => {}
        }
        for (field, value, lo, hi) in counts {
            limits::check(field, value, lo, hi)?;
        }
        for &depth in &self.eval_depths {
            limits::check("eval_depths", depth as u64, 1, MAX_EVAL_DEPTH)?;
        }
        let weight_decay = match self.optimizer {
            OptimizerConfig::EllisAdam { weight_decay, .. } => weight_decay,
            OptimizerConfig::AdamW { weight_decay, .. } => weight_decay as f64,
        };
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(format!(
                "optimizer.weight_decay = {weight_decay} must be a finite number of at least 0"
            ));
        }
        Ok(())
    }

    /// Refuses a run whose memory (see `memory`), on `devices`, with `data`, exceeds what the
    /// machine has available.
    pub fn check_memory(&self, data: &Dataset, devices: &[Device]) -> Result<(), MemoryError> {
        let backprop = match self.depth {
            DepthScheme::PoissonLognormalFilling { backprop, .. } | DepthScheme::Fixed { backprop, .. } => backprop,
            DepthScheme::NonRecurrent => 1,
        };
        let shapes = Shapes {
            model: &self.model,
            batch_size: self.batch_size,
            seq_len: data.context(),
            backprop,
            devices: devices.len(),
            eval_rows: self.eval_rows,
            eval_len: data.context(),
        };
        let cpu = [Device::flex(), Device::flex().autodiff()];
        let on_host = devices.iter().all(|d| cpu.contains(d));
        crate::memory::check("this run", shapes.host_bytes(on_host))
    }

    /// Whether the micro-batches of a step split evenly over `devices` devices: each device
    /// runs whole micro-batches, so that a micro-batch's rows and seeded initial state are the
    /// same however many devices share the step.
    pub fn check_split(&self, devices: usize) -> Result<(), TrainError> {
        match devices > 0 && self.accumulation.is_multiple_of(devices) {
            true => Ok(()),
            false if devices == 0 => Err(TrainError::InvalidConfig("a run needs a device".into())),
            false => Err(TrainError::InvalidConfig(format!(
                "the global batch ({} micro-batches of {} rows) does not split over {devices} devices: \
                 make accumulation a multiple of {devices}",
                self.accumulation, self.batch_size
            ))),
        }
    }

    /// Powers of two from 1 to four times the training mean depth.
    pub fn default_eval_depths(depth: &DepthScheme) -> Vec<usize> {
        let top = (4.0 * depth.mean_depth()).ceil() as usize;
        std::iter::successors(Some(1usize), |d| Some(d * 2))
            .take_while(|d| *d <= top.next_power_of_two())
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0} already holds a run; pass --resume to continue it or choose another directory")]
    Exists(PathBuf),
    #[error("{0} holds no run (no run.json)")]
    NoRun(PathBuf),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    BadRun { path: PathBuf, reason: String },
    /// (Not a `source`: the message says it, so error chains need not repeat it.)
    #[error("data: {0}")]
    Data(TextError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("the model's {what} is {model} but the data needs {data}")]
    Mismatch {
        what: &'static str,
        model: usize,
        data: usize,
    },
    #[error("step {step}: {source}; stopped. {}{}", match .checkpoint {
        Some(c) => format!("The last good checkpoint is {}", c.display()),
        None => "There is no checkpoint yet".to_string(),
    }, match .set_aside {
        Some(aside) => format!(" (the newest, whose weights this step started from, is moved to {})", aside.display()),
        None => String::new(),
    })]
    NonFinite {
        step: u64,
        source: StepError,
        checkpoint: Option<PathBuf>,
        /// The checkpoint of the weights that made this step non-finite, moved out of the way
        /// so that a resume starts from the one before.
        set_aside: Option<PathBuf>,
    },
}

impl From<TextError> for TrainError {
    fn from(error: TextError) -> Self {
        TrainError::Data(error)
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// A run in progress.
pub struct Trainer {
    pub config: RunConfig,
    dir: PathBuf,
    /// Where the steps run; the first holds the model, the optimizer and the evaluation.
    devices: Vec<Device>,
    model: Option<Huginn>,
    optim: ModuleOptimizer,
    state: TrainState,
    data: Dataset,
    eval: Option<Vec<EvalSplit>>,
    checkpoints: Checkpoints,
    log: MetricsLog,
    resumed_from: Option<PathBuf>,
    skipped: Vec<Skipped>,
    /// The resume's checkpoint predates checksums and was loaded unverified.
    unverified: bool,
    /// Held while the trainer lives: no second process trains in `dir`.
    _lock: RunLock,
}

impl Trainer {
    /// Starts a new run in `dir` (which must not hold one) on `device` (an autodiff device).
    pub fn create(dir: &Path, config: RunConfig, device: &Device) -> Result<Self, TrainError> {
        Self::create_on(dir, config, std::slice::from_ref(device))
    }

    /// Starts a new run in `dir` on `devices` (autodiff devices of one backend; the model lives
    /// on the first). Bad input is an error before anything is written.
    pub fn create_on(dir: &Path, config: RunConfig, devices: &[Device]) -> Result<Self, TrainError> {
        if dir.join("run.json").exists() {
            return Err(TrainError::Exists(dir.to_path_buf()));
        }
        config.validate()?;
        config.check_split(devices.len())?;
        let device = &devices[0];
        let toml = config.to_toml().map_err(TrainError::InvalidConfig)?;
        let data = Dataset::new(&config.data, None)?;
        check_fits(&config.model, &data)?;
        config.check_memory(&data, devices)?;
        let model = config.initial_model(device)?;
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let lock = RunLock::acquire(dir)?;
        // Checked again under the lock: another process may have started a run meanwhile.
        if dir.join("run.json").exists() {
            return Err(TrainError::Exists(dir.to_path_buf()));
        }
        if let Some(tokenizer) = data.tokenizer() {
            let path = dir.join("tokenizer.json");
            tokenizer.save(&path, true).map_err(|e| TrainError::Io {
                path,
                reason: e.to_string(),
            })?;
        }
        let path = dir.join("run.toml");
        write_atomically(&path, toml.as_bytes()).map_err(io_error(&path))?;
        // Written last: its presence is what marks the directory as holding a run.
        let json = serde_json::to_string_pretty(&config).expect("plain data serializes");
        let path = dir.join("run.json");
        write_atomically(&path, json.as_bytes()).map_err(io_error(&path))?;
        let optim = config.optimizer.init(&model, config.schedule.peak_lr());
        Self::assemble(dir, config, devices, data, (model, optim, TrainState::default()), lock)
    }

    /// Continues the run in `dir` from its newest checkpoint (or from the start when it was
    /// stopped before its first one).
    pub fn resume(dir: &Path, device: &Device) -> Result<Self, TrainError> {
        Self::resume_on(dir, std::slice::from_ref(device))
    }

    /// Continues the run in `dir` on `devices`, which need not be those it started on: the
    /// numbers do not depend on them.
    pub fn resume_on(dir: &Path, devices: &[Device]) -> Result<Self, TrainError> {
        if !dir.join("run.json").exists() {
            return Err(TrainError::NoRun(dir.to_path_buf()));
        }
        let lock = RunLock::acquire(dir)?;
        let config = Self::stored_config(dir)?;
        config.validate()?;
        config.check_split(devices.len())?;
        let device = &devices[0];
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = match tokenizer_path.exists() {
            true => Some(crate::text::load_tokenizer(&tokenizer_path)?),
            false => None,
        };
        let data = Dataset::new(&config.data, tokenizer)?;
        check_fits(&config.model, &data)?;
        config.check_memory(&data, devices)?;
        let peak = config.schedule.peak_lr();
        let checkpoints = Checkpoints::open(dir, config.keep_checkpoints)?;
        let (model, optim, state, resumed) =
            match checkpoints.load_newest(device, |m| config.optimizer.init(m, peak))? {
                Some(r) => (
                    r.model,
                    r.optimizer,
                    r.state,
                    Some((r.checkpoint, r.skipped, r.verified)),
                ),
                None => {
                    let model = config.initial_model(device)?;
                    let optim = config.optimizer.init(&model, peak);
                    (model, optim, TrainState::default(), None)
                }
            };
        let mut trainer = Self::assemble(dir, config, devices, data, (model, optim, state), lock)?;
        if let Some((checkpoint, skipped, verified)) = resumed {
            trainer.resumed_from = Some(checkpoint);
            trainer.skipped = skipped;
            trainer.unverified = !verified;
        }
        Ok(trainer)
    }

    /// The configuration of the run in `dir` (its `run.json`).
    pub fn stored_config(dir: &Path) -> Result<RunConfig, TrainError> {
        let path = dir.join("run.json");
        if !path.exists() {
            return Err(TrainError::NoRun(dir.to_path_buf()));
        }
        let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
        serde_json::from_str(&text).map_err(|e| TrainError::BadRun {
            path: path.clone(),
            reason: e.to_string(),
        })
    }

    fn assemble(
        dir: &Path,
        config: RunConfig,
        devices: &[Device],
        data: Dataset,
        (model, optim, state): (Huginn, ModuleOptimizer, TrainState),
        lock: RunLock,
    ) -> Result<Self, TrainError> {
        let checkpoints = Checkpoints::open(dir, config.keep_checkpoints)?;
        let log = MetricsLog::open(dir, state.step)?;
        Ok(Self {
            config,
            dir: dir.to_path_buf(),
            devices: devices.to_vec(),
            model: Some(model),
            optim,
            state,
            data,
            eval: None,
            checkpoints,
            log,
            resumed_from: None,
            skipped: Vec::new(),
            unverified: false,
            _lock: lock,
        })
    }

    /// The checkpoint a resumed run continues from (`None`: a new run, or a resume from the
    /// start).
    pub fn resumed_from(&self) -> Option<&Path> {
        self.resumed_from.as_deref()
    }

    /// Newer checkpoints a resume could not load, renamed out of the way.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// Whether the resume's checkpoint was written before checkpoints carried checksums, so
    /// its files could not be verified.
    pub fn resumed_unverified(&self) -> bool {
        self.unverified
    }

    pub fn state(&self) -> TrainState {
        self.state
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn data(&self) -> &Dataset {
        &self.data
    }

    /// The model as it stands, without autodiff (for evaluation and inference).
    pub fn model(&self) -> Huginn {
        self.model.as_ref().expect("the model is always put back").valid()
    }

    /// Trains until step `config.steps`, or until `stop_at` if that comes first (a planned
    /// interruption, as a test of resuming does); saves a checkpoint where it stops and, at the
    /// end, the final model in `RUN/final` in the Hugging Face layout.
    pub fn run(&mut self, stop_at: Option<u64>, progress: bool) -> Result<(), TrainError> {
        let end = stop_at.map_or(self.config.steps, |s| s.min(self.config.steps));
        let bar = progress_bar(progress, self.config.steps, self.state.step);
        let rows = self.config.batch_size;
        let tokens_per_step = (rows * self.data.max_len() * self.config.accumulation) as u64;
        while self.state.step < end {
            let started = Instant::now();
            let step = self.state.step;
            let depth = self.config.depth.sample(self.config.seed, step);
            let (data, seed, first) = (&self.data, self.config.seed, self.state.batches);
            let batch = |m: usize, device: &Device| {
                let b = data.train_batch(seed, first + m as u64, rows, device);
                MicroBatch {
                    inputs: b.inputs,
                    labels: b.labels,
                }
            };
            let lr = self.config.schedule.lr(step);
            let step_config = StepConfig {
                depth,
                lr,
                max_grad_norm: self.config.max_grad_norm,
                state_seed: self.config.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ step,
                state_scale: 1.0,
            };
            let model = self.model.take().expect("the model is always put back");
            let (model, report) = train_step_on(
                model,
                &mut self.optim,
                &self.devices,
                self.config.accumulation,
                &batch,
                step_config,
            );
            self.model = Some(model);
            let report = match report {
                Ok(report) => report,
                Err(source) => {
                    bar.abandon();
                    return Err(self.non_finite(step + 1, source));
                }
            };
            let seconds = started.elapsed().as_secs_f64();
            self.state.step += 1;
            self.state.batches += self.config.accumulation as u64;
            self.state.tokens += tokens_per_step;
            self.state.elapsed_seconds += seconds;
            let tokens_per_second = tokens_per_step as f64 / seconds.max(1e-9);
            self.write(&Record::Train {
                step: self.state.step,
                loss: report.loss,
                lr,
                grad_norm: report.grad_norm,
                recurrence: depth.total(),
                backprop: depth.with_grad,
                tokens_per_second,
                elapsed_seconds: self.state.elapsed_seconds,
            })?;
            bar.set_position(self.state.step);
            bar.set_message(format!(
                "loss {:.4} · r {:>2} · {:.0} tok/s",
                report.loss,
                depth.total(),
                tokens_per_second
            ));
            let at = self.state.step;
            if at.is_multiple_of(self.config.eval_every) || at == self.config.steps {
                for line in self.evaluate()? {
                    bar.println(line);
                }
            }
            if at.is_multiple_of(self.config.checkpoint_every) || at == end {
                self.save()?;
            }
        }
        bar.finish_and_clear();
        if self.state.step == self.config.steps {
            self.export_final()?;
        }
        Ok(())
    }

    /// Evaluates every held-out split at every evaluation depth and the monitors at the
    /// training mean depth; logs the records and returns a readable line per split.
    pub fn evaluate(&mut self) -> Result<Vec<String>, TrainError> {
        let model = self.model();
        let device = model.device();
        let splits = self
            .eval
            .get_or_insert_with(|| self.data.eval_splits(self.config.eval_rows, &device));
        let step = self.state.step;
        let mut records = Vec::new();
        let mut lines = Vec::new();
        for split in splits.iter() {
            let mut line = format!("step {step:>6} {:<10}", split.name);
            let depths = &self.config.eval_depths;
            for (&depth, e) in depths
                .iter()
                .zip(evaluate_depths(&model, &split.batch, depths, split.exact_match))
            {
                line += &match e.accuracy {
                    Some(a) => format!(" r{depth}:{:.1}%", 100.0 * a),
                    None => format!(" r{depth}:{:.3}", e.loss),
                };
                records.push(Record::Eval {
                    step,
                    split: split.name.to_string(),
                    depth,
                    loss: e.loss,
                    accuracy: e.accuracy,
                });
            }
            lines.push(line);
        }
        let depth = self.config.depth.mean_depth().round() as usize;
        let m = monitors(&model, splits[0].batch.inputs.clone(), depth);
        records.push(Record::Monitor {
            step,
            depth,
            relative_residual: m.relative_residual,
            token_correlation: m.token_correlation,
        });
        for r in &records {
            self.write(r)?;
        }
        Ok(lines)
    }

    fn write(&mut self, record: &Record) -> Result<(), TrainError> {
        self.log.write(record).map_err(io_error(&self.dir))
    }

    /// The error of a non-finite step `step`. Weights can go bad a step before the loss shows
    /// it, so nothing is saved now; and the weights this step started from made it
    /// non-finite, so a checkpoint of them is no good either: it is moved aside, and the one
    /// before is the last good one (which a resume then starts from).
    fn non_finite(&self, step: u64, source: StepError) -> TrainError {
        let set_aside = match self.checkpoints.list() {
            Ok(list) => match list.last() {
                Some((at, path)) if *at == self.state.step => self.checkpoints.set_aside(path, "non-finite").ok(),
                _ => None,
            },
            Err(_) => None,
        };
        TrainError::NonFinite {
            step,
            source,
            checkpoint: self.checkpoints.latest().ok().flatten(),
            set_aside,
        }
    }

    /// Saves a checkpoint, after making the log of the steps it covers durable; weights that
    /// are not all finite are not saved (the run stops as at a non-finite step).
    fn save(&mut self) -> Result<PathBuf, TrainError> {
        self.log.sync().map_err(io_error(&self.dir))?;
        let model = self.model.as_ref().expect("the model is always put back");
        match self.checkpoints.save(model, &self.optim, &self.state) {
            Err(CheckpointError::NonFinite { .. }) => Err(TrainError::NonFinite {
                step: self.state.step,
                source: StepError::NonFiniteWeights,
                checkpoint: self.checkpoints.latest()?,
                set_aside: None,
            }),
            saved => Ok(saved?),
        }
    }

    /// Writes `RUN/final`: the model in the Hugging Face layout and, for a text run, the
    /// tokenizer with its config, so every command opens the folder as it is. Written beside it
    /// and renamed into place: `final/` is absent or complete.
    fn export_final(&self) -> Result<(), TrainError> {
        let dir = self.dir.join("final");
        let partial = self.dir.join(".final.partial");
        let replaced = self.dir.join(".final.replaced");
        for leftover in [&partial, &replaced] {
            if leftover.exists() {
                std::fs::remove_dir_all(leftover).map_err(io_error(leftover))?;
            }
        }
        self.model()
            .export_hf(&partial, FINAL_SHARD_BYTES)
            .map_err(|e| TrainError::Io {
                path: partial.clone(),
                reason: e.to_string(),
            })?;
        if let Some(tokenizer) = self.data.tokenizer() {
            let path = partial.join("tokenizer.json");
            tokenizer.save(&path, true).map_err(|e| TrainError::Io {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let config = serde_json::json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": crate::text::END_OF_TEXT,
                "model_max_length": self.config.model.block_size,
            });
            let path = partial.join("tokenizer_config.json");
            let text = serde_json::to_string_pretty(&config).expect("plain data serializes");
            std::fs::write(&path, text).map_err(io_error(&path))?;
        }
        self.config.copy_init_text_files(&partial)?;
        checkpoint::sync_folder(&partial)?;
        model::pause::pause_point("final-before-rename");
        if dir.exists() {
            std::fs::rename(&dir, &replaced).map_err(io_error(&dir))?;
        }
        std::fs::rename(&partial, &dir).map_err(io_error(&dir))?;
        checkpoint::sync(&self.dir)?;
        if replaced.exists() {
            std::fs::remove_dir_all(&replaced).map_err(io_error(&replaced))?;
        }
        Ok(())
    }
}

fn check_fits(model: &HuginnConfig, data: &Dataset) -> Result<(), TrainError> {
    if model.vocab_size < data.vocab_size() {
        return Err(TrainError::Mismatch {
            what: "vocabulary",
            model: model.vocab_size,
            data: data.vocab_size(),
        });
    }
    if model.block_size < data.context() {
        return Err(TrainError::Mismatch {
            what: "context (block_size)",
            model: model.block_size,
            data: data.context(),
        });
    }
    Ok(())
}

fn progress_bar(visible: bool, steps: u64, position: u64) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps).with_position(position);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:30}] step {pos}/{len} · {msg} · ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}
