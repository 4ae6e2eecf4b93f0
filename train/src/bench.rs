//! Training throughput and memory of one model shape and depth scheme on one device or several:
//! the numbers `huginn-bench` reports. The steps are the training loop's own
//! (`step::train_step_on` on a fixed random batch per device), so what is measured is what a run
//! spends, minus data, evaluation and checkpoints.
//!
//! Memory is the process's peak resident set (`VmHWM`, Linux), which on the CPU backend is where
//! the tensors live; a device with its own memory (wgpu) also reports its allocator's pool, sampled
//! after every step. Peak RSS is per process, so each configuration is measured in a fresh one.

use std::time::Instant;

use burn::prelude::*;
use model::{HuginnConfig, peak_rss_bytes};
use serde::{Deserialize, Serialize};

use crate::depth::DepthScheme;
use crate::optim::EllisAdamConfig;
use crate::rng::SplitMix64;
use crate::step::{MicroBatch, StepConfig, StepError, train_step_on};

/// What to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchConfig {
    pub width: usize,
    pub heads: usize,
    /// Prelude, core and coda layers.
    pub layers: (usize, usize, usize),
    pub vocab_size: usize,
    pub seq_len: usize,
    pub batch_size: usize,
    pub depth: DepthScheme,
    /// Timed optimizer steps, after one untimed warm-up step (kernel compilation, allocator).
    pub steps: u64,
}

/// What one configuration measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    /// Training tokens (batch × sequence) per second over the timed steps.
    pub tokens_per_second: f64,
    pub seconds_per_step: f64,
    /// Mean total recurrence of the timed steps (the drawn depths of a random scheme).
    pub mean_depth: f64,
    /// Peak resident set of the process; `None` where the OS does not say (not Linux).
    pub peak_rss_bytes: Option<u64>,
    /// Most the device's memory pool held after any step; `None` where the backend keeps no
    /// pool of its own (the CPU backend: its tensors are in the RSS).
    pub device_reserved_bytes: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("model shape: {0}")]
    Model(model::ConfigError),
    #[error("step {step}: {source}")]
    Step { step: u64, source: StepError },
    #[error("the device failed: {0}")]
    Device(String),
    #[error("no device to measure on")]
    NoDevice,
}

/// Trains `config.steps + 1` steps on `devices` (autodiff devices; the model lives on the first)
/// and measures the last `config.steps`. Each step runs one micro-batch of `config.batch_size`
/// rows per device, so the tokens per step grow with the devices (weak scaling).
pub fn measure(config: &BenchConfig, devices: &[Device]) -> Result<BenchResult, BenchError> {
    let device = devices.first().ok_or(BenchError::NoDevice)?;
    let mut shape = HuginnConfig::tiny(config.vocab_size, config.width, config.heads, config.layers);
    shape.block_size = config.seq_len;
    shape.validate().map_err(BenchError::Model)?;
    let mut model = shape.init(device, 0);
    let mut optim = EllisAdamConfig::new(1e-4).init_grouped(&model);
    let batches: Vec<MicroBatch> = devices.iter().map(|d| random_batch(config, d)).collect();
    let batch = |i: usize, _: &Device| batches[i].clone();
    let mut device_reserved = None;
    let mut timed = 0.0;
    let mut depth_sum = 0;
    for step in 0..=config.steps {
        let depth = config.depth.sample(0, step);
        let step_config = StepConfig {
            depth,
            lr: 1e-4,
            max_grad_norm: Some(1.0),
            state_seed: step,
            state_scale: 1.0,
        };
        let started = Instant::now();
        let (next, report) = train_step_on(model, &mut optim, devices, devices.len(), &batch, step_config);
        model = next;
        report.map_err(|source| BenchError::Step { step, source })?;
        for device in devices {
            device
                .sync()
                .map_err(|e| BenchError::Device(e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")))?;
        }
        if step > 0 {
            timed += started.elapsed().as_secs_f64();
            depth_sum += depth.total();
        }
        if let Some(usage) = device.memory_pool_usage() {
            device_reserved = device_reserved.max(Some(usage.bytes_reserved));
        }
    }
    let steps = config.steps.max(1) as f64;
    let tokens = (devices.len() * config.batch_size * config.seq_len) as f64 * steps;
    Ok(BenchResult {
        tokens_per_second: tokens / timed.max(1e-9),
        seconds_per_step: timed / steps,
        mean_depth: depth_sum as f64 / steps,
        peak_rss_bytes: peak_rss_bytes(),
        device_reserved_bytes: device_reserved,
    })
}

/// Uniform random tokens, labels the inputs shifted by one: the speed of a step does not depend
/// on what the tokens are.
fn random_batch(config: &BenchConfig, device: &Device) -> MicroBatch {
    let mut rng = SplitMix64(7);
    let (rows, len) = (config.batch_size, config.seq_len);
    let tokens: Vec<i64> = (0..rows * (len + 1))
        .map(|_| rng.below(config.vocab_size as u64) as i64)
        .collect();
    let (mut inputs, mut labels) = (Vec::with_capacity(rows * len), Vec::with_capacity(rows * len));
    for row in tokens.chunks(len + 1) {
        inputs.extend_from_slice(&row[..len]);
        labels.extend_from_slice(&row[1..]);
    }
    MicroBatch {
        inputs: Tensor::from_data(TensorData::new(inputs, [rows, len]), device),
        labels: Tensor::from_data(TensorData::new(labels, [rows, len]), device),
    }
}
