//! The text demo: a small recurrent-depth language model on the embedded Shakespeare slice,
//! with a byte-level BPE trained in-process. Shows validation loss against test-time depth,
//! samples text with per-token adaptive exit, and draws a prompt's latent trajectories.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use infer::adaptive::{AdaptiveConfig, Decoding, generate_batch_with};
use infer::exit::Criterion;
use infer::sampling::SamplingConfig;
use infer::strategy::Strategy;
use infer::warm_start::WarmStart;
use model::HuginnConfig;
use model::burn::prelude::*;
use serde_json::json;
use train::data::{DataConfig, Dataset, TokenizerSource};
use train::depth::DepthScheme;
use train::monitor::evaluate_depths;
use train::run::{OptimizerConfig, RunConfig, Trainer};
use train::schedule::Schedule;

use crate::report;

#[derive(Debug, Clone)]
pub struct TextDemo {
    pub seed: u64,
    pub steps: u64,
    pub width: usize,
    pub heads: usize,
    pub layers: (usize, usize, usize),
    pub mean_depth: usize,
    pub backprop: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub vocab_size: usize,
    pub lr: f64,
    pub eval_rows: usize,
    pub depths: Vec<usize>,
    pub prompt: String,
    pub sample_tokens: usize,
}

impl TextDemo {
    pub fn full() -> Self {
        Self {
            seed: 0,
            steps: 1200,
            width: 128,
            heads: 4,
            layers: (1, 2, 1),
            mean_depth: 4,
            backprop: 2,
            batch_size: 16,
            seq_len: 64,
            vocab_size: 1024,
            lr: 2e-3,
            eval_rows: 64,
            depths: vec![1, 2, 4, 8, 16, 32],
            prompt: "ROMEO. What light".to_string(),
            sample_tokens: 48,
        }
    }

    pub fn quick() -> Self {
        Self {
            steps: 10,
            width: 16,
            heads: 2,
            layers: (1, 1, 1),
            mean_depth: 2,
            backprop: 1,
            batch_size: 4,
            seq_len: 16,
            vocab_size: 300,
            eval_rows: 8,
            depths: vec![1, 2, 4, 8],
            sample_tokens: 8,
            ..Self::full()
        }
    }

    fn run_config(&self) -> RunConfig {
        let mut model = HuginnConfig::tiny(self.vocab_size, self.width, self.heads, self.layers);
        model.block_size = self.seq_len;
        model.mean_recurrence = self.mean_depth;
        model.mean_backprop_depth = self.backprop;
        let depth = DepthScheme::PoissonLognormalFilling {
            mean: self.mean_depth,
            backprop: self.backprop,
        };
        RunConfig {
            model,
            data: DataConfig::Text {
                files: vec![],
                field: "text".to_string(),
                tokenizer: TokenizerSource::Train {
                    vocab_size: self.vocab_size,
                },
                seq_len: self.seq_len,
            },
            seed: self.seed,
            steps: self.steps,
            batch_size: self.batch_size,
            accumulation: 1,
            eval_depths: RunConfig::default_eval_depths(&depth),
            depth,
            optimizer: OptimizerConfig::EllisAdam {
                beta_1: 0.9,
                beta_2: 0.95,
                weight_decay: 0.0,
                update_clipping: true,
            },
            schedule: Schedule::Cosine {
                peak_lr: self.lr,
                warmup: (self.steps / 20).max(1),
                total_steps: self.steps,
                min_lr: self.lr / 10.0,
            },
            max_grad_norm: Some(1.0),
            eval_every: (self.steps / 4).max(1),
            eval_rows: self.eval_rows,
            checkpoint_every: (self.steps / 4).max(1),
            keep_checkpoints: 1,
            init_from: None,
            devices: Vec::new(),
        }
    }
}

pub fn run(config: &TextDemo, out: &Path, device: &Device, progress: bool, started: Instant) -> Result<()> {
    let dir = out.join("recurrent");
    if progress {
        eprintln!(
            "training a language model on Shakespeare ({} steps) → {}",
            config.steps,
            dir.display()
        );
    }
    let mut trainer = Trainer::create(&dir, config.run_config(), &device.clone().autodiff())?;
    trainer.run(None, progress)?;
    let model = trainer.model();
    let data: &Dataset = trainer.data();
    let tokenizer = data.tokenizer().context("a text run has a tokenizer")?.clone();

    let validation = &data.eval_splits(config.eval_rows, &model.device())[0];
    let losses: Vec<(usize, f64)> = config
        .depths
        .iter()
        .zip(evaluate_depths(&model, &validation.batch, &config.depths, false))
        .map(|(d, e)| (*d, e.loss))
        .collect();

    // A sample with per-token adaptive exit and continuous CoT (warm start from the raw state).
    let prompt: Vec<u32> = tokenizer
        .encode(config.prompt.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?
        .get_ids()
        .to_vec();
    let exit = AdaptiveConfig {
        criterion: Criterion::Kl,
        threshold: 1e-3,
        max_steps: 32,
        warm_start: WarmStart::Raw,
        strategy: Strategy::default(),
    };
    let decoding = Decoding {
        sampling: SamplingConfig {
            temperature: 0.8,
            top_k: Some(40),
            seed: config.seed,
            ..SamplingConfig::default()
        },
        stop_tokens: vec![],
    };
    let max_new = config.sample_tokens.min(config.seq_len.saturating_sub(prompt.len()));
    let sample = generate_batch_with(&model, std::slice::from_ref(&prompt), max_new, exit, &decoding)?.remove(0);
    let text = tokenizer
        .decode(&sample.tokens, false)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    let mean_steps = sample.steps_per_token.iter().sum::<usize>() as f64 / sample.steps_per_token.len().max(1) as f64;

    let mut report = json!({
        "task": "text",
        "validation_loss_by_depth": losses.iter().map(|(d, l)| (d.to_string(), *l)).collect::<BTreeMap<_, _>>(),
        "train_mean_depth": config.run_config().depth.mean_depth(),
        "sample": {
            "prompt": config.prompt,
            "text": text,
            "criterion": "kl",
            "threshold": 1e-3,
            "steps_per_token": sample.steps_per_token,
            "mean_steps": mean_steps,
        },
    });
    report::text_figures(
        out,
        &model,
        &tokenizer,
        &prompt,
        &config.depths,
        &losses,
        progress,
        &mut report,
    )?;
    report["wall_seconds"] = json!(started.elapsed().as_secs_f64());
    report::write_json(out, &report)?;

    println!("\nvalidation loss by test-time depth r");
    for (d, loss) in &losses {
        println!("{d:>5} {loss:>8.4}");
    }
    println!(
        "\nsample (adaptive exit kl < 1e-3, mean {mean_steps:.1} steps per token):\n{}{text}",
        config.prompt
    );
    Ok(())
}
