//! The flags `generate` and `chat` share: recurrence, cache, sampling, stops and length, with
//! defaults from the folder's `generation_config.json`.

use anyhow::{Result, bail};
use folder::ModelFolder;
use infer::adaptive::{AdaptiveConfig, Decoding};
use infer::exit::Criterion;
use infer::limits::{self, check_recurrence};
use infer::range::OutOfRange;
use infer::sampling::SamplingConfig;
use infer::serve::api::fresh_seed;
use infer::strategy::Strategy;
use infer::warm_start::WarmStart;

#[derive(clap::Args, Debug)]
pub struct DecodingArgs {
    /// Recurrence steps per token (the most, with an exit criterion).
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Exit criterion: none, kl, minp-kl, entropy-diff, latent-diff, cosine, argmax-stability.
    #[arg(long, default_value = "none")]
    pub criterion: Criterion,
    /// Exit threshold (default: the criterion's "auto" value from the reference).
    #[arg(long)]
    pub exit_threshold: Option<f64>,
    /// KV-cache strategy by its reference name: full, latest-m4, available-m4,
    /// always-last-m4, skip, optionally with -compress-sK, -compress-rK or -compress-anchor
    /// (default: full; for --sampler diffusion, latest-m4-compress-s4).
    #[arg(long)]
    pub cache: Option<Strategy>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub min_p: Option<f32>,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler (and of the diffusion sampler's noise); without it one is drawn
    /// at random and printed to stderr, so that the run can be repeated.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Text that ends generation, left out of the output (needs the folder's tokenizer).
    /// Repeatable.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Token ids that end generation, comma separated, besides the folder's own.
    #[arg(long, value_delimiter = ',')]
    pub stop_token: Vec<u32>,
    /// Most new tokens (default: generation_config.json's max_new_tokens or max_length,
    /// else 16).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Where each new token's recurrence starts.
    #[arg(long, value_enum, default_value_t = WarmStart::Cold)]
    pub warm_start: WarmStart,
}

impl DecodingArgs {
    /// Checks the flags, adds the stop tokens and strings to `folder`, and returns the engine's
    /// settings.
    pub fn resolve(&self, folder: &mut ModelFolder) -> Result<(AdaptiveConfig, Decoding)> {
        let seed = self.seed.unwrap_or_else(fresh_seed);
        let defaults = SamplingConfig::from_generation_config(&folder.generation, seed);
        let sampling = SamplingConfig {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.or(defaults.top_k),
            top_p: self.top_p.or(defaults.top_p),
            min_p: self.min_p.or(defaults.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(defaults.repetition_penalty),
            seed,
        };
        sampling.check(folder.model.config().vocab_size).map_err(|e| {
            // A value not given here came from the folder's generation_config.json.
            let given = match e.name.as_str() {
                "temperature" => self.temperature.is_some(),
                "top_k" => self.top_k.is_some(),
                "top_p" => self.top_p.is_some(),
                "min_p" => self.min_p.is_some(),
                _ => self.repetition_penalty.is_some(),
            };
            let name = if given {
                flag(&e.name)
            } else {
                format!("{} in generation_config.json", e.name)
            };
            e.named(name)
        })?;
        if !self.stop.is_empty() && folder.tokenizer.is_none() {
            bail!("--stop needs a tokenizer (tokenizer.json in the model folder); --stop-token takes ids");
        }
        let vocab = folder.model.config().vocab_size;
        if let Some(id) = self.stop_token.iter().find(|&&id| id as usize >= vocab) {
            bail!("--stop-token {id} is outside the vocabulary of {vocab}");
        }
        let config = AdaptiveConfig {
            criterion: self.criterion,
            threshold: self.exit_threshold.unwrap_or(self.criterion.auto_threshold()),
            max_steps: self.steps,
            warm_start: self.warm_start,
            strategy: self.cache.unwrap_or_default(),
        };
        check_recurrence(&config).map_err(named)?;
        folder.add_stop_tokens(self.stop_token.iter().copied());
        folder.add_stop_strings(self.stop.iter().cloned());
        let decoding = Decoding {
            sampling,
            stop_tokens: folder.stop_tokens.clone(),
        };
        Ok((config, decoding))
    }

    /// Prints a drawn seed to stderr when the run's draws depend on it (sampling, or the
    /// diffusion sampler's `noise`), so that the run can be repeated with `--seed`.
    pub fn report_seed(&self, decoding: &Decoding, noise: bool) {
        let seed = decoding.sampling.seed;
        if self.seed.is_none() && (decoding.sampling.temperature > 0.0 || noise) {
            eprintln!("seed: {seed} (drawn; --seed {seed} repeats this run)");
        }
    }

    /// New tokens after a prompt of `len` tokens, as asked or defaulted (at most the room left
    /// when the default comes from `generation_config.json`), refused when there are none.
    pub fn max_new(&self, folder: &ModelFolder, len: usize) -> Result<usize> {
        let room = folder.model.config().block_size.saturating_sub(len);
        match (self.max_new_tokens, folder.generation.max_new_tokens(len)) {
            (Some(0), _) => bail!("--max-new-tokens must be at least 1"),
            (Some(n), _) => Ok(n),
            (None, Some(0)) => bail!(
                "generation_config.json leaves no new tokens after a prompt of {len} (its max_new_tokens or max_length); give --max-new-tokens"
            ),
            (None, Some(n)) => Ok(n.min(room)),
            (None, None) => Ok(16),
        }
    }

    /// [`Self::max_new`], refused when the prompt and it do not fit the context (`extra`
    /// positions besides, as speculative decoding's lookahead).
    pub fn fitting_max_new(&self, folder: &ModelFolder, len: usize, extra: usize) -> Result<usize> {
        let context = folder.model.config().block_size;
        let max_new = self.max_new(folder, len)?;
        if limits::positions(folder.model.config(), len, max_new, extra).is_err() {
            let lookahead = if extra > 0 {
                format!(" and a lookahead of {extra}")
            } else {
                String::new()
            };
            let needed = len.saturating_add(max_new).saturating_add(extra);
            bail!(
                "the prompt has {len} tokens and --max-new-tokens is {max_new}{lookahead}: {needed} positions, more than the model's context of {context}"
            );
        }
        Ok(max_new)
    }
}

/// The flag that sets the library's setting `name`.
pub fn flag(name: &str) -> String {
    match name {
        "num_steps" => "--steps".into(),
        "lookahead" => "--speculate".into(),
        "max_new_tokens" => "--max-new-tokens".into(),
        other => format!("--{}", other.replace('_', "-")),
    }
}

/// A library range error under its flag's name.
pub fn named(e: OutOfRange) -> anyhow::Error {
    let name = flag(&e.name);
    e.named(name).into()
}
