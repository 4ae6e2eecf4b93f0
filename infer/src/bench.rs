//! Generation speed of a model on its device: prefill and decode tokens/s, milliseconds per
//! core iteration and mean steps per token, the median of several runs after a warm-up run.
//! `huginn-bench-generate` prints these, and the GPU check reuses them.
//!
//! Timing needs no device synchronisation: every token reaches the host (to be sampled)
//! before the callback that stamps it runs.

use std::ops::ControlFlow;
use std::time::Instant;

use model::Huginn;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::adaptive::{AdaptiveConfig, Row, generate_rows};
use model::InputError;

/// What to generate: `batch` random prompts of `prompt_len` tokens, `new_tokens` each.
#[derive(Debug, Clone, Copy)]
pub struct GenerationBench {
    pub batch: usize,
    pub prompt_len: usize,
    /// At least 2: the first token ends the prefill, the others are decoding.
    pub new_tokens: usize,
    /// Timed runs after the warm-up run.
    pub runs: usize,
    pub config: AdaptiveConfig,
}

/// Medians over the timed runs: prefill over every run's prefill, the rest from the run with
/// the median decoding time.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GenerationFigures {
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    pub ms_per_core_iteration: f64,
    pub mean_steps_per_token: f64,
    /// Heap allocations per decoding core iteration, where the caller counts them.
    pub allocations_per_core_iteration: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("a benchmark needs a batch, a prompt, a run and at least 2 new tokens")]
    Empty,
    #[error(transparent)]
    Input(#[from] InputError),
}

/// One timed generation.
struct Run {
    prefill_seconds: f64,
    decode_seconds: f64,
    /// Core iterations the batch ran after the first token (each row's token takes its steps;
    /// the batch runs the most of them).
    decode_iterations: usize,
    decode_allocations: u64,
    mean_steps: f64,
}

/// Runs `bench` on `model`. `allocations`, when given, reads a process-wide allocation counter
/// (a counting global allocator is the binary's choice, not the library's).
pub fn measure_generation(
    model: &Huginn,
    bench: &GenerationBench,
    allocations: Option<&dyn Fn() -> u64>,
) -> Result<GenerationFigures, BenchError> {
    if bench.batch == 0 || bench.prompt_len == 0 || bench.new_tokens < 2 || bench.runs == 0 {
        return Err(BenchError::Empty);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let vocab = model.config().vocab_size as u32;
    let rows: Vec<Row> = (0..bench.batch)
        .map(|_| Row {
            prompt: (0..bench.prompt_len).map(|_| rng.random_range(0..vocab)).collect(),
            max_new: bench.new_tokens,
            ..Row::default()
        })
        .collect();
    let count = || allocations.map_or(0, |read| read());
    once(model, &rows, bench.config, &count)?;
    let mut runs = (0..bench.runs)
        .map(|_| once(model, &rows, bench.config, &count))
        .collect::<Result<Vec<_>, _>>()?;
    // Each figure is the median of its own runs (as the reference's benchmark takes them): a
    // prompt is one pass of about a tenth of a second, which one hiccup of the machine can double.
    let mut prefills: Vec<f64> = runs.iter().map(|run| run.prefill_seconds).collect();
    prefills.sort_by(f64::total_cmp);
    runs.sort_by(|a, b| a.decode_seconds.total_cmp(&b.decode_seconds));
    let median = &runs[runs.len() / 2];
    let prompt_tokens = (bench.batch * bench.prompt_len) as f64;
    let decoded = (bench.batch * (bench.new_tokens - 1)) as f64;
    Ok(GenerationFigures {
        prefill_tokens_per_second: prompt_tokens / prefills[prefills.len() / 2],
        decode_tokens_per_second: decoded / median.decode_seconds,
        ms_per_core_iteration: median.decode_seconds * 1e3 / median.decode_iterations as f64,
        mean_steps_per_token: median.mean_steps,
        allocations_per_core_iteration: allocations
            .map(|_| median.decode_allocations as f64 / median.decode_iterations as f64),
    })
}

fn once(model: &Huginn, rows: &[Row], config: AdaptiveConfig, count: &dyn Fn() -> u64) -> Result<Run, BenchError> {
    let started = Instant::now();
    let mut first = None;
    let mut allocations_at_first = 0;
    // Per generated position: the most steps any row took (what the batch ran).
    let mut iterations: Vec<usize> = Vec::new();
    let mut seen = vec![0usize; rows.len()];
    let out = generate_rows(model, rows, config, |b, _, steps, _| {
        first.get_or_insert_with(|| {
            allocations_at_first = count();
            Instant::now()
        });
        let i = seen[b];
        seen[b] += 1;
        if iterations.len() <= i {
            iterations.push(0);
        }
        iterations[i] = iterations[i].max(steps);
        ControlFlow::Continue(())
    })?;
    let done = Instant::now();
    let decode_allocations = count() - allocations_at_first;
    // `new_tokens ≥ 2` and no stop tokens: every row produced its first token.
    let first = first.unwrap_or(done);
    let steps: Vec<usize> = out.iter().flat_map(|g| g.steps_per_token.iter().copied()).collect();
    Ok(Run {
        prefill_seconds: (first - started).as_secs_f64(),
        decode_seconds: (done - first).as_secs_f64(),
        decode_iterations: iterations.iter().skip(1).sum::<usize>().max(1),
        decode_allocations,
        mean_steps: steps.iter().sum::<usize>() as f64 / steps.len().max(1) as f64,
    })
}

/// The wavefront sampler's median run on one random prompt (batch 1, as the sampler runs).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DiffusionFigures {
    pub prefill_tokens_per_second: f64,
    /// New tokens after the first (the prompt pass's) per second of the rest of the run.
    pub decode_tokens_per_second: f64,
    /// Core forward passes (each over a whole wave) per new token.
    pub core_passes_per_token: f64,
    /// Positions × core steps per new token (sequential decoding: its steps per token).
    pub position_steps_per_token: f64,
    pub waves: usize,
    /// Leading new tokens equal to sequential greedy decoding's at `num_steps`, of `compared`.
    pub agreeing_prefix: usize,
    pub compared: usize,
}

/// Times `config` on a random prompt of `prompt_len` tokens for `new_tokens` tokens (greedy),
/// the median of `runs` after a warm-up run, and compares its tokens with sequential greedy
/// decoding at the same depth.
pub fn measure_diffusion(
    model: &Huginn,
    prompt_len: usize,
    new_tokens: usize,
    runs: usize,
    config: &crate::diffusion::DiffusionConfig,
) -> Result<DiffusionFigures, crate::diffusion::DiffusionError> {
    use crate::diffusion;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let vocab = model.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..prompt_len).map(|_| rng.random_range(0..vocab)).collect();
    let decoding = crate::adaptive::Decoding::default();
    let once = || {
        let started = Instant::now();
        let mut first = None;
        let out = diffusion::generate(model, &prompt, new_tokens, config, &decoding, |_| {
            first.get_or_insert_with(Instant::now);
            ControlFlow::Continue(())
        })?;
        let done = Instant::now();
        let first = first.unwrap_or(done);
        Ok::<_, diffusion::DiffusionError>((first - started, done - first, out))
    };
    once()?;
    let mut timed = (0..runs.max(1)).map(|_| once()).collect::<Result<Vec<_>, _>>()?;
    timed.sort_by_key(|(_, decode, _)| *decode);
    let (prefill, decode, out) = timed.swap_remove(timed.len() / 2);
    let plain = crate::greedy::generate(
        model,
        &prompt,
        out.tokens.len(),
        config.num_steps,
        crate::warm_start::WarmStart::Cold,
    )?;
    let agreeing_prefix = out.tokens.iter().zip(&plain.tokens).take_while(|(a, b)| a == b).count();
    let made = out.tokens.len().max(1) as f64;
    Ok(DiffusionFigures {
        prefill_tokens_per_second: prompt_len as f64 / prefill.as_secs_f64(),
        decode_tokens_per_second: out.tokens.len().saturating_sub(1) as f64
            / decode.as_secs_f64().max(f64::MIN_POSITIVE),
        core_passes_per_token: out.stats.core_forward_passes as f64 / made,
        position_steps_per_token: out.stats.tokens_forward as f64 / made,
        waves: out.stats.diffusion_steps,
        agreeing_prefix,
        compared: out.tokens.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::Criterion;
    use crate::strategy::Strategy;
    use crate::warm_start::WarmStart;
    use model::HuginnConfig;
    use model::burn::prelude::*;

    fn bench(criterion: Criterion, batch: usize) -> GenerationBench {
        GenerationBench {
            batch,
            prompt_len: 5,
            new_tokens: 4,
            runs: 1,
            config: AdaptiveConfig {
                criterion,
                threshold: criterion.auto_threshold(),
                max_steps: 6,
                warm_start: WarmStart::Cold,
                strategy: Strategy::default(),
            },
        }
    }

    #[test]
    fn figures_are_finite_and_count_the_steps_run() {
        let model = HuginnConfig::tiny(40, 16, 2, (1, 1, 1)).init(&Device::flex(), 0);
        let counter = std::cell::Cell::new(0u64);
        let read = || {
            counter.set(counter.get() + 3);
            counter.get()
        };
        let figures = measure_generation(&model, &bench(Criterion::None, 2), Some(&read)).unwrap();
        assert_eq!(figures.mean_steps_per_token, 6.0);
        for value in [
            figures.prefill_tokens_per_second,
            figures.decode_tokens_per_second,
            figures.ms_per_core_iteration,
        ] {
            assert!(value.is_finite() && value > 0.0, "{figures:?}");
        }
        // Two reads per run, 3 apart, over 3 decoded tokens of 6 steps.
        assert_eq!(figures.allocations_per_core_iteration, Some(3.0 / 18.0));
        let adaptive = measure_generation(&model, &bench(Criterion::Kl, 1), None).unwrap();
        assert!(adaptive.mean_steps_per_token <= 6.0);
        assert_eq!(adaptive.allocations_per_core_iteration, None);
        let empty = GenerationBench {
            new_tokens: 1,
            ..bench(Criterion::None, 1)
        };
        assert!(matches!(
            measure_generation(&model, &empty, None),
            Err(BenchError::Empty)
        ));
    }
}
