//! The reference-fixture checker behind `huginn check-fixture` (and `cargo xtask check-fixture`):
//! runs every check this build knows for a fixture folder and summarises them.

use std::path::Path;

use model::burn::prelude::Device;
use model::fixture::{Check, Fixture, FixtureError};
use serde::Serialize;
use serde_json::Value;

use crate::diffusion::{self, DiffusionConfig};
use crate::exit::Criterion;
use crate::strategy::Strategy;
use crate::warm_start::WarmStart;
use crate::{adaptive, speculative};

/// Everything checked for one fixture folder.
#[derive(Debug, Serialize)]
pub struct FixtureReport {
    pub dir: String,
    pub forward: Vec<Check>,
    /// Truncated-backprop loss and gradients (`expected_train.safetensors`).
    pub train: Vec<Check>,
    /// Generation runs of `generate.json` reproduced (tokens and steps per token).
    pub generate: Vec<Check>,
    /// Generation runs of `generate.json` this build cannot reproduce yet.
    pub generate_unsupported: Vec<String>,
}

/// The `--json` summary over all folders.
#[derive(Debug, Serialize, PartialEq)]
pub struct Summary {
    pub forward: ForwardSummary,
    pub generate: GenerateSummary,
    pub train: TrainSummary,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct TrainSummary {
    pub checked: usize,
    pub failed: usize,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ForwardSummary {
    pub checked: usize,
    pub failed: usize,
    pub max_abs_err: f64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct GenerateSummary {
    pub checked: usize,
    pub failed: usize,
    pub unsupported: Vec<String>,
}

pub fn check_dir(dir: &Path, device: &Device) -> Result<FixtureReport, FixtureError> {
    let fixture = Fixture::open(dir, device)?;
    let (generate, generate_unsupported) = check_generation(&fixture, dir)?;
    Ok(FixtureReport {
        dir: dir.display().to_string(),
        forward: fixture.check_forward()?,
        train: fixture.check_train()?,
        generate,
        generate_unsupported,
    })
}

/// Reproduces the runs of `generate.json` this build supports (fixed-depth greedy decoding,
/// cold or warm-started, through the full cache); names the others. Runs marked `robust` are
/// checked in full, the others over their `reliable_prefix_tokens`.
fn check_generation(fixture: &Fixture, dir: &Path) -> Result<(Vec<Check>, Vec<String>), FixtureError> {
    let path = dir.join("generate.json");
    if !path.exists() {
        return Ok((vec![], vec![]));
    }
    check_runs(fixture, &path)
}

/// [`check_dir`]'s generation checks for one file in `generate.json`'s format (runs recorded
/// with the reference for the fixture's model): the checks, and the runs not reproduced.
pub fn check_runs(fixture: &Fixture, path: &Path) -> Result<(Vec<Check>, Vec<String>), FixtureError> {
    let format = |reason: String| FixtureError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| format(e.to_string()))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
    let case = json["case"].as_str().unwrap_or("?");
    let runs = json["runs"]
        .as_array()
        .ok_or_else(|| format("no \"runs\" list".into()))?;
    let (mut checks, mut unsupported) = (Vec::new(), Vec::new());
    for run in runs {
        let name = run["name"]
            .as_str()
            .ok_or_else(|| format("a run without a \"name\"".into()))?;
        let name = format!("{case}/{name}");
        let Some(plan) = Plan::of(run, &json) else {
            unsupported.push(name);
            continue;
        };
        let want: Vec<Vec<usize>> = rows(&run["new_token_ids"]);
        let reliable = if run["robust"].as_bool() == Some(true) {
            usize::MAX
        } else {
            run["reliable_prefix_tokens"].as_u64().unwrap_or(0) as usize
        };
        // Steps: per token and row for adaptive runs ([token][row] in batches), and the core
        // steps run between consecutive token choices for every kind of run.
        let steps_per_row: Vec<Vec<usize>> = match &run["steps_per_token"] {
            Value::Array(a) if a.first().is_some_and(Value::is_array) => transpose(&rows(&run["steps_per_token"])),
            Value::Array(_) => vec![ids(&run["steps_per_token"])],
            _ => vec![],
        };
        let between_want = ids(&run["core_steps_between_sampled_tokens"]);
        let result = match plan.mode {
            Mode::Adaptive(config) => adaptive::generate_batch(&fixture.model, &plan.prompts, plan.max_new, config)
                .map(|rows| {
                    let steps: Vec<Vec<usize>> = rows.iter().map(|r| r.steps_per_token.clone()).collect();
                    let between = (0..steps[0].len())
                        .map(|t| steps.iter().map(|r| r[t]).max().unwrap_or(0))
                        .collect();
                    (
                        rows.into_iter().map(|r| r.tokens).collect::<Vec<_>>(),
                        steps,
                        between,
                        None,
                    )
                })
                .map_err(|e| e.to_string()),
            Mode::Speculative(config) => speculative::generate(&fixture.model, &plan.prompts[0], plan.max_new, config)
                .map(|g| (vec![g.tokens], vec![], g.steps_between_tokens, None))
                .map_err(|e| e.to_string()),
            Mode::Diffusion(config) => diffusion::generate(
                &fixture.model,
                &plan.prompts[0],
                plan.max_new,
                &config,
                &adaptive::Decoding::default(),
                |_| std::ops::ControlFlow::Continue(()),
            )
            .map_err(|e| e.to_string())
            .map(|g| (vec![g.tokens], vec![], g.steps_between_samplings, Some(g.sampled))),
        };
        match result {
            Ok((tokens, steps, between, sampled)) => {
                let batched = tokens.len() > 1;
                for (b, (got, want)) in tokens.iter().zip(&want).enumerate() {
                    let row = if batched { format!(" row {b}") } else { String::new() };
                    let got: Vec<usize> = got.iter().map(|&t| t as usize).collect();
                    let n = reliable.min(got.len()).min(want.len());
                    checks.push(Check::exact(
                        format!("{name}{row} tokens"),
                        "tokens",
                        &got[..n],
                        &want[..n],
                    ));
                    if let (Some(got), Some(want)) = (steps.get(b), steps_per_row.get(b)) {
                        let n = n.min(want.len());
                        checks.push(Check::exact(
                            format!("{name}{row} steps"),
                            "steps",
                            &got[..n],
                            &want[..n],
                        ));
                    }
                }
                if !between_want.is_empty() && steps_per_row.is_empty() {
                    let n = reliable.min(between.len()).min(between_want.len());
                    checks.push(Check::exact(
                        format!("{name} steps"),
                        "steps",
                        &between[..n],
                        &between_want[..n],
                    ));
                }
                // The chosen logit and the log-sum-exp at every sampling: the numbers behind
                // the tokens, which catch a different cache read even where the argmax agrees.
                if let Some(sampled) = sampled.filter(|_| reliable == usize::MAX) {
                    let floats = |key: &str| -> Vec<f32> {
                        run[key]
                            .as_array()
                            .map(|a| a.iter().filter_map(|v| v.as_f64().map(|v| v as f32)).collect())
                            .unwrap_or_default()
                    };
                    let (logit, lse): (Vec<f32>, Vec<f32>) = sampled.into_iter().unzip();
                    for (key, got) in [("sampled_logit", logit), ("sampled_logsumexp", lse)] {
                        let want = floats(key);
                        if !want.is_empty() {
                            let tolerance = model::fixture::FORWARD_TOLERANCE;
                            checks.push(Check::compare(format!("{name} {key}"), &got, &want, tolerance));
                        }
                    }
                }
            }
            Err(err) => checks.push(Check::failed(name, err)),
        }
    }
    check_token_by_token(fixture, &json, case, &mut checks, &mut unsupported);
    Ok((checks, unsupported))
}

/// `forward_with_adaptive_compute`: the prompt fed token by token with exits, per criterion:
/// steps and argmax per position, and the first logits of the last position.
fn check_token_by_token(
    fixture: &Fixture,
    json: &Value,
    case: &str,
    checks: &mut Vec<Check>,
    unsupported: &mut Vec<String>,
) {
    let Some(results) = json["forward_with_adaptive_compute"]["results"].as_object() else {
        return;
    };
    let prompt: Vec<u32> = ids(&json["prompt_ids"][0]).into_iter().map(|t| t as u32).collect();
    for (criterion_name, result) in results {
        let name = format!("{case}/forward_with_adaptive_compute/{criterion_name}");
        let Ok(criterion) = criterion_name.parse::<Criterion>() else {
            unsupported.push(name);
            continue;
        };
        let config = adaptive::AdaptiveConfig {
            criterion,
            threshold: criterion.auto_threshold(),
            max_steps: fixture.model.config().mean_recurrence,
            warm_start: WarmStart::Cold,
            strategy: Strategy::default(),
        };
        let robust = result["robust"].as_bool() == Some(true);
        let reliable = if robust {
            usize::MAX
        } else {
            result["reliable_prefix_positions"].as_u64().unwrap_or(0) as usize
        };
        match adaptive::forward_token_by_token(&fixture.model, &prompt, config) {
            Ok(positions) => {
                let steps: Vec<usize> = positions.iter().map(|(s, _)| *s).collect();
                let argmax: Vec<usize> = positions.iter().map(|(_, l)| crate::exit::argmax(l)).collect();
                let want_steps = ids(&result["compute_steps"]);
                let want_argmax = ids(&result["argmax_per_position"][0]);
                let n = reliable.min(steps.len()).min(want_steps.len());
                checks.push(Check::exact(
                    format!("{name} steps"),
                    "steps",
                    &steps[..n],
                    &want_steps[..n],
                ));
                let n = n.min(want_argmax.len());
                checks.push(Check::exact(
                    format!("{name} argmax"),
                    "argmax",
                    &argmax[..n],
                    &want_argmax[..n],
                ));
                let want_logits: Vec<f32> = result["logits_last_position_first8"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_f64().map(|v| v as f32)).collect())
                    .unwrap_or_default();
                if robust && !want_logits.is_empty() {
                    let got = &positions.last().expect("a prompt").1[..want_logits.len()];
                    checks.push(Check::compare(
                        format!("{name} logits"),
                        got,
                        &want_logits,
                        model::fixture::FORWARD_TOLERANCE,
                    ));
                }
            }
            Err(err) => checks.push(Check::failed(name, err.to_string())),
        }
    }
}

/// A run this build reproduces.
struct Plan {
    prompts: Vec<Vec<u32>>,
    max_new: usize,
    mode: Mode,
}

enum Mode {
    /// Adaptive exit through the position-keyed cache (`generate_with_adaptive_compute`);
    /// fixed-depth decoding (`generate_minimal`, the HF loop) is the criterion `none`.
    Adaptive(adaptive::AdaptiveConfig),
    /// Self-speculative decoding (`generate_speculative`).
    Speculative(speculative::SpeculativeConfig),
    /// The wavefront sampler (`generate_diffusion_style`).
    Diffusion(DiffusionConfig),
}

impl Plan {
    fn of(run: &Value, json: &Value) -> Option<Self> {
        let function = run["function"].as_str()?;
        let kwargs = run["kwargs"].as_object()?;
        let strategy: Strategy = match kwargs.get("cache_lookup_strategy") {
            None => Strategy::default(),
            Some(name) => name.as_str()?.parse().ok()?,
        };
        if run.get("error").is_some() {
            return None;
        }
        // The reference's dispatcher sends any of these to `generate_diffusion_style`.
        let diffusion_keys = ["headway", "state_noise_mixing", "inner_recurrence", "freeze_strategy"];
        if function.ends_with(".generate_diffusion_style") || diffusion_keys.iter().any(|k| kwargs.contains_key(*k)) {
            return Some(Self {
                prompts: Self::prompts(run, json)?,
                max_new: Self::max_new(kwargs, json)?,
                mode: Mode::Diffusion(diffusion_config(kwargs)?),
            });
        }
        let steps = kwargs.get("num_steps")?.as_u64()? as usize;
        let continuous = kwargs.get("continuous_compute").and_then(Value::as_bool) == Some(true);
        let mode = if function.ends_with(".generate_speculative") {
            let known = [
                "draft_steps",
                "lookahead_for_draft",
                "verification_threshold",
                "num_steps",
                "init_scale",
                "cache_lookup_strategy",
                "max_new_tokens",
            ];
            if kwargs.keys().any(|k| !known.contains(&k.as_str())) || strategy != Strategy::default() {
                return None;
            }
            Mode::Speculative(speculative::SpeculativeConfig {
                draft_steps: kwargs.get("draft_steps")?.as_u64()? as usize,
                lookahead: kwargs.get("lookahead_for_draft")?.as_u64()? as usize,
                verify_steps: steps,
                threshold: kwargs
                    .get("verification_threshold")
                    .and_then(Value::as_f64)
                    .unwrap_or(1.0),
            })
        } else if function.ends_with(".generate_with_adaptive_compute") {
            let criterion: Criterion = kwargs.get("criterion")?.as_str()?.parse().ok()?;
            let threshold = match kwargs.get("exit_threshold") {
                None => criterion.auto_threshold(),
                Some(v) if v == "auto" => criterion.auto_threshold(),
                Some(v) => v.as_f64()?,
            };
            let known = [
                "criterion",
                "exit_threshold",
                "init_scale",
                "cache_lookup_strategy",
                "num_steps",
                "continuous_compute",
                "max_new_tokens",
            ];
            if kwargs.keys().any(|k| !known.contains(&k.as_str())) {
                return None;
            }
            // The reference's adaptive generator carries the raw state.
            let warm_start = if continuous { WarmStart::Raw } else { WarmStart::Cold };
            Mode::Adaptive(adaptive::AdaptiveConfig {
                criterion,
                threshold,
                max_steps: steps,
                warm_start,
                strategy,
            })
        } else if function.ends_with(".generate_minimal") || function.ends_with(".generate") {
            if kwargs.contains_key("criterion") || kwargs.contains_key("exit_threshold") {
                return None;
            }
            let warm = if continuous {
                WarmStart::Normalized
            } else {
                WarmStart::Cold
            };
            Mode::Adaptive(adaptive::AdaptiveConfig::fixed(steps, warm, strategy))
        } else {
            return None;
        };
        Some(Self {
            prompts: Self::prompts(run, json)?,
            max_new: Self::max_new(kwargs, json)?,
            mode,
        })
    }

    fn prompts(run: &Value, json: &Value) -> Option<Vec<Vec<u32>>> {
        let prompts: Vec<Vec<u32>> = rows(&json[run["prompt"].as_str()?])
            .into_iter()
            .map(|r| r.into_iter().map(|t| t as u32).collect())
            .collect();
        Some(prompts)
    }

    fn max_new(kwargs: &serde_json::Map<String, Value>, json: &Value) -> Option<usize> {
        Some(kwargs.get("max_new_tokens").or(json.get("max_new_tokens"))?.as_u64()? as usize)
    }
}

/// The sampler's settings from a run's keyword arguments (the reference's defaults for the
/// others); `None` for an argument this build does not know or a run it cannot reproduce:
/// random initial states and noise come from torch's generator, so only `init_scale = 0` runs
/// (with one prompt) can be compared.
fn diffusion_config(kwargs: &serde_json::Map<String, Value>) -> Option<DiffusionConfig> {
    let mut config = DiffusionConfig::default();
    for (key, value) in kwargs {
        let count = || value.as_u64().map(|v| v as usize);
        match key.as_str() {
            "max_new_tokens" => {}
            "num_steps" => config.num_steps = count()?,
            "inner_recurrence" => config.inner_recurrence = count()?,
            "headway" => config.headway = count()?,
            "max_wavefront" => config.max_wavefront = count()?,
            "max_diffusion_steps" => config.max_diffusion_steps = count()?,
            "ema_embeds" => config.ema_embeds = value.as_f64()?,
            "state_noise_mixing" => config.state_noise_mixing = value.as_f64()?,
            "exit_t" => config.exit_t = value.as_f64()?,
            "init_scale" => config.init_scale = value.as_f64()?,
            "dampened_state_mixer" => config.dampened_state_mixer = value.as_bool()?,
            "sqrt_mixer" => config.sqrt_mixer = value.as_bool()?,
            "full_prefill" => config.full_prefill = value.as_bool()?,
            "continuous_compute" => config.continuous_compute = value.as_bool()?,
            "freeze_strategy" => config.freeze = value.as_str()?.parse().ok()?,
            "cache_lookup_strategy" => config.strategy = value.as_str()?.parse().ok()?,
            _ => return None,
        }
    }
    // Guessed tokens (headway > 1) are random too.
    (config.init_scale == 0.0 && config.headway == 1).then_some(config)
}

fn rows(value: &Value) -> Vec<Vec<usize>> {
    value
        .as_array()
        .map(|a| a.iter().map(ids).collect())
        .unwrap_or_default()
}

fn transpose(rows: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let width = rows.first().map_or(0, Vec::len);
    (0..width).map(|c| rows.iter().map(|r| r[c]).collect()).collect()
}

fn ids(value: &Value) -> Vec<usize> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64().map(|v| v as usize)).collect())
        .unwrap_or_default()
}

impl Summary {
    pub fn of(reports: &[FixtureReport]) -> Self {
        let forward: Vec<&Check> = reports.iter().flat_map(|r| &r.forward).collect();
        Self {
            forward: ForwardSummary {
                checked: forward.len(),
                failed: forward.iter().filter(|c| !c.passed).count(),
                max_abs_err: forward
                    .iter()
                    .map(|c| c.max_abs_err)
                    .filter(|e| e.is_finite())
                    .fold(0.0, f64::max),
            },
            train: TrainSummary {
                checked: reports.iter().map(|r| r.train.len()).sum(),
                failed: reports.iter().flat_map(|r| &r.train).filter(|c| !c.passed).count(),
            },
            generate: GenerateSummary {
                checked: reports.iter().map(|r| r.generate.len()).sum(),
                failed: reports.iter().flat_map(|r| &r.generate).filter(|c| !c.passed).count(),
                unsupported: reports.iter().flat_map(|r| r.generate_unsupported.clone()).collect(),
            },
        }
    }

    pub fn passed(&self) -> bool {
        self.forward.failed == 0 && self.train.failed == 0 && self.generate.failed == 0
    }
}
