//! `generate --sampler diffusion`: the wavefront sampler's flags (the reference's keyword
//! arguments, kebab-cased) and its run, streaming tokens as they freeze.

use std::io::Write;
use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::{Result, bail};
use folder::ModelFolder;
use infer::adaptive::{AdaptiveConfig, Decoding};
use infer::diffusion::{self, DiffusionConfig, DiffusionError, Freeze};
use infer::exit::Criterion;
use infer::strategy::Strategy;
use infer::text::TextStream;
use infer::warm_start::WarmStart;

use crate::decoding;

/// Which generation algorithm `generate` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SamplerKind {
    /// One token at a time, each with --steps recurrence steps (or fewer with --criterion).
    #[default]
    Sequential,
    /// The wavefront sampler: many positions advance together, each at its own depth, and
    /// settle ("freeze") when their latent state stops moving.
    Diffusion,
}

/// The wavefront sampler's knobs (used with `--sampler diffusion`; --steps is its `num_steps`,
/// --warm-start raw its `continuous_compute`, --cache defaults to latest-m4-compress-s4).
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Diffusion sampler (--sampler diffusion)")]
pub struct DiffusionArgs {
    /// New positions the wave gains per wave [default: 1].
    #[arg(long)]
    pub headway: Option<usize>,
    /// Core steps per wave on every position in it [default: 4].
    #[arg(long)]
    pub inner_recurrence: Option<usize>,
    /// Weight of the previous wave's injection in each wave's (0 turns the EMA off)
    /// [default: 0.1].
    #[arg(long)]
    pub ema_embeds: Option<f64>,
    /// Share of fresh noise mixed into the states before each wave (0 turns it off)
    /// [default: 0.5].
    #[arg(long)]
    pub state_noise_mixing: Option<f64>,
    /// Mix noise at a constant share, not divided by 1 + a position's core steps so far.
    #[arg(long)]
    pub constant_mixer: bool,
    /// Mix as s·√(1−a) + √a·noise.
    #[arg(long)]
    pub sqrt_mixer: bool,
    /// When positions freeze: latent-diff, latent-acceleration-1, latent-acceleration-2,
    /// token-stability or fixed [default: latent-diff].
    #[arg(long)]
    pub freeze_strategy: Option<Freeze>,
    /// Relative latent change under which a position freezes (latent strategies)
    /// [default: 0.03].
    #[arg(long)]
    pub exit_t: Option<f64>,
    /// Most positions in a wave (0: no limit) [default: 128].
    #[arg(long)]
    pub max_wavefront: Option<usize>,
    /// Most waves [default: 4096].
    #[arg(long)]
    pub max_diffusion_steps: Option<usize>,
    /// Make the prompt the first wave instead of running it in one pass first.
    #[arg(long)]
    pub no_full_prefill: bool,
    /// Scale of the random initial states and noise (0: zeros, deterministic); seeded by
    /// --seed [default: 1].
    #[arg(long)]
    pub init_scale: Option<f64>,
}

impl DiffusionArgs {
    /// Whether any of these flags was given (they need `--sampler diffusion`).
    pub fn any(&self) -> bool {
        let Self {
            headway,
            inner_recurrence,
            ema_embeds,
            state_noise_mixing,
            constant_mixer,
            sqrt_mixer,
            freeze_strategy,
            exit_t,
            max_wavefront,
            max_diffusion_steps,
            no_full_prefill,
            init_scale,
        } = self;
        headway.is_some()
            || inner_recurrence.is_some()
            || ema_embeds.is_some()
            || state_noise_mixing.is_some()
            || freeze_strategy.is_some()
            || exit_t.is_some()
            || max_wavefront.is_some()
            || max_diffusion_steps.is_some()
            || init_scale.is_some()
            || *constant_mixer
            || *sqrt_mixer
            || *no_full_prefill
    }

    /// The sampler's settings from these flags and the shared decoding ones (checked against
    /// the model and the prompt by [`DiffusionConfig::check`]); refuses the shared flags it
    /// has no use for.
    pub fn config(&self, shared: &AdaptiveConfig, cache: Option<Strategy>, seed: u64) -> Result<DiffusionConfig> {
        if shared.criterion != Criterion::None {
            bail!("--sampler diffusion freezes positions by --freeze-strategy: leave out --criterion");
        }
        if shared.warm_start == WarmStart::Normalized {
            bail!("--sampler diffusion carries raw states (--warm-start raw), not normalized ones");
        }
        let d = DiffusionConfig::default();
        let config = DiffusionConfig {
            num_steps: shared.max_steps,
            inner_recurrence: self.inner_recurrence.unwrap_or(d.inner_recurrence),
            headway: self.headway.unwrap_or(d.headway),
            ema_embeds: self.ema_embeds.unwrap_or(d.ema_embeds),
            state_noise_mixing: self.state_noise_mixing.unwrap_or(d.state_noise_mixing),
            dampened_state_mixer: !self.constant_mixer,
            sqrt_mixer: self.sqrt_mixer,
            freeze: self.freeze_strategy.unwrap_or(d.freeze),
            exit_t: self.exit_t.unwrap_or(d.exit_t),
            max_wavefront: self.max_wavefront.unwrap_or(d.max_wavefront),
            max_diffusion_steps: self.max_diffusion_steps.unwrap_or(d.max_diffusion_steps),
            full_prefill: !self.no_full_prefill,
            continuous_compute: shared.warm_start == WarmStart::Raw,
            init_scale: self.init_scale.unwrap_or(d.init_scale),
            seed,
            strategy: cache.unwrap_or(d.strategy),
        };
        Ok(config)
    }
}

/// The library's refusal, naming the flag of the setting it refuses.
pub fn named(e: DiffusionError) -> anyhow::Error {
    match e {
        DiffusionError::Range(range) => decoding::named(range),
        other => other.into(),
    }
}

/// Runs the sampler on `prompt`, writing at most `max_new` tokens to `out` as they freeze, and
/// the figures to stderr.
pub fn run(
    folder: &ModelFolder,
    prompt: &[u32],
    max_new: usize,
    config: &DiffusionConfig,
    decoding: &Decoding,
    out: &mut impl Write,
) -> Result<()> {
    let started = Instant::now();
    let mut text = folder
        .tokenizer
        .as_ref()
        .map(|t| TextStream::new(t, folder.stop_strings.clone()));
    let mut written = 0;
    let mut failure = None;
    let result = diffusion::generate(&folder.model, prompt, max_new, config, decoding, |block| {
        let mut write = || -> Result<bool> {
            for &token in block.iter().take(max_new - written) {
                match text.as_mut() {
                    Some(text) => {
                        let piece = text.push(token)?;
                        out.write_all(piece.text.as_bytes())?;
                        if piece.stopped {
                            return Ok(false);
                        }
                    }
                    None => write!(out, "{}{token}", if written == 0 { "" } else { "," })?,
                }
                written += 1;
            }
            out.flush()?;
            Ok(written < max_new)
        };
        match write() {
            Ok(true) => ControlFlow::Continue(()),
            Ok(false) => ControlFlow::Break(()),
            Err(err) => {
                failure = Some(err);
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(err) = failure {
        return Err(err);
    }
    if let Some(text) = text.as_mut() {
        out.write_all(text.finish()?.as_bytes())?;
    }
    writeln!(out)?;
    let seconds = started.elapsed().as_secs_f64();
    let stats = result.stats;
    eprintln!(
        "prompt {} tokens and {written} new in {seconds:.2} s: {:.1} tok/s · {} waves, {} core forward passes ({:.2} per token), {} positions × steps",
        prompt.len(),
        written as f64 / seconds.max(f64::MIN_POSITIVE),
        stats.diffusion_steps,
        stats.core_forward_passes,
        stats.core_forward_passes as f64 / result.tokens.len().max(1) as f64,
        stats.tokens_forward
    );
    if written < max_new && !stats.stopped {
        let why = if stats.diffusion_steps >= config.max_diffusion_steps {
            "--max-diffusion-steps was reached: the states did not settle (a larger --exit-t, greedy decoding or --freeze-strategy fixed freeze sooner)"
        } else {
            "the wave reached the end of the model's context"
        };
        eprintln!("only {written} of {max_new} tokens froze: {why}");
    }
    Ok(())
}
