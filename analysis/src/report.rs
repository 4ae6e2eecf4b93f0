//! The report of one training run: every figure of this crate for the run's final model on one
//! prompt, plus its training curves, written to a folder with an `index.html` gallery (each
//! image with a caption) and a `report.json` with the numbers behind them.
//!
//! ```text
//! OUT/trajectories.png|svg   per-token PCA trajectories of a few tokens, motifs in the titles
//! OUT/convergence.png|svg    distance to s* per token and iteration (log colour)
//! OUT/exit-steps.png|svg     steps-to-exit histograms under the exit criteria
//! OUT/exit-steps-warm-start.png|svg   the same in token-by-token generation, cold and warm
//! OUT/depth.png|svg          final accuracy (or loss) against test-time depth, per split
//! OUT/training.png|svg       loss and accuracy over training, per split and depth
//! OUT/capture.*, OUT/pca.safetensors, OUT/report.json, OUT/index.html
//! ```
//!
//! The last two figures need `RUN/metrics.jsonl` with evaluation and training records; the
//! others need only `RUN/final/` (any model folder `Huginn::from_pretrained` reads).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use infer::adaptive::{AdaptiveConfig, forward_token_by_token};
use infer::exit::Criterion;
use infer::strategy::Strategy;
use infer::warm_start::WarmStart;
use model::Huginn;
use model::burn::prelude::*;
use serde::Serialize;
use train::data::DataConfig;

use crate::capture::{Capture, CaptureOptions, Init};
use crate::curves::{Metric, TrainingCurves};
use crate::dynamics::{self, Dynamics, Motif, classify};
use crate::exits::{ExitRule, exit_steps};
use crate::pca::{Pca, PcaOptions};
use crate::plot::Images;
use crate::plot::depth::{Colours, plot_depth_curves};
use crate::plot::heatmap::plot_convergence;
use crate::plot::histogram::{mean, plot_exit_histogram};
use crate::plot::training::plot_training_curves;
use crate::plot::trajectories::{TokenTrajectory, component_pairs, plot_trajectories};
use crate::prompt::Prompt;
use crate::{AnalysisError, host_f32};

/// The prompt of a report.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Text, tokenized with the run's `tokenizer.json`.
    Text(String),
    Ids(Vec<u32>),
    /// The run's own: the first test example of a task run, a fixed line of a text run.
    Default,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReportOptions {
    pub prompt: PromptInput,
    /// `R`: iterations captured.
    pub steps: usize,
    /// The longer run that defines `s*`.
    pub reference_steps: usize,
    pub init: Init,
    pub components: usize,
    /// Tokens drawn in the trajectory figure.
    pub shown: usize,
    /// Fit the PCA on at most this many states.
    pub pca_rows: usize,
}

impl Default for ReportOptions {
    fn default() -> Self {
        Self {
            prompt: PromptInput::Default,
            steps: 64,
            reference_steps: 256,
            init: Init::Random { seed: 0, scale: 1.0 },
            components: 6,
            shown: 6,
            pca_rows: 20_000,
        }
    }
}

/// `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub run: PathBuf,
    pub prompt: Prompt,
    pub steps: usize,
    pub reference_steps: usize,
    pub init: Init,
    pub pca: PcaSummary,
    pub dynamics: DynamicsSummary,
    /// Per token, `‖ln_f(s_R) − s*‖`.
    pub final_distance: Vec<f32>,
    pub exits: Vec<ExitSummary>,
    /// Steps to exit in token-by-token generation, cold and warm-started.
    pub warm_start_exits: Vec<ExitSummary>,
    /// Accuracy (or loss, for runs without accuracy) against depth at the last evaluation.
    pub depth_curves: Vec<DepthCurve>,
    pub figures: Vec<FigureEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PcaSummary {
    pub components: usize,
    pub samples: usize,
    pub explained_ratio: Vec<f32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DynamicsSummary {
    pub counts: BTreeMap<Motif, usize>,
    pub tokens: Vec<TokenDynamics>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenDynamics {
    pub position: usize,
    pub label: String,
    #[serde(flatten)]
    pub dynamics: Dynamics,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExitSummary {
    pub rule: String,
    pub mean: f64,
    pub min: usize,
    pub max: usize,
    pub steps: Vec<usize>,
}

impl ExitSummary {
    fn of(rule: String, steps: Vec<usize>) -> Self {
        Self {
            rule,
            mean: mean(&steps),
            min: steps.iter().copied().min().unwrap_or(0),
            max: steps.iter().copied().max().unwrap_or(0),
            steps,
        }
    }
}

/// Steps per token of the prompt fed token by token (the reference's
/// `forward_with_adaptive_compute`) under the KL and latent-diff rules, each cold and warm.
fn warm_start_exits(model: &Huginn, tokens: &[u32], max_steps: usize) -> Result<Vec<ExitSummary>, AnalysisError> {
    let mut out = Vec::new();
    for (criterion, threshold) in [(Criterion::Kl, 5e-4), (Criterion::LatentDiff, 0.03)] {
        for (warm_start, name) in [(WarmStart::Cold, "cold"), (WarmStart::Raw, "warm")] {
            let config = AdaptiveConfig {
                criterion,
                threshold,
                max_steps,
                warm_start,
                strategy: Strategy::default(),
            };
            let steps = forward_token_by_token(model, tokens, config)?
                .into_iter()
                .map(|(steps, _)| steps)
                .collect();
            out.push(ExitSummary::of(
                format!("{} < {threshold}, {name}", criterion.name()),
                steps,
            ));
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct DepthCurve {
    pub label: String,
    pub metric: &'static str,
    pub points: Vec<(usize, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FigureEntry {
    pub name: String,
    pub png: String,
    pub svg: String,
    pub caption: String,
}

/// Writes the report of the run in `run` into `out`, computing on `device`.
pub fn write_report(
    run: &Path,
    out: &Path,
    options: &ReportOptions,
    device: &Device,
    progress: &ProgressBar,
) -> Result<Report, AnalysisError> {
    let final_dir = run.join("final");
    if !final_dir.is_dir() {
        return Err(AnalysisError::format(
            run,
            "no final/ model folder: is this a finished training run?",
        ));
    }
    std::fs::create_dir_all(out).map_err(AnalysisError::io(out))?;
    let model = Huginn::from_pretrained(&final_dir, device)?;
    let prompt = run_prompt(run, &options.prompt)?;
    progress.set_message("capture");
    let capture = Capture::run(
        &model,
        &final_dir.display().to_string(),
        prompt,
        &CaptureOptions {
            steps: options.steps,
            init: options.init,
            raw: false,
            reference_steps: Some(options.reference_steps),
        },
        progress,
    )?;
    capture.save(&out.join("capture"))?;

    progress.set_message("pca");
    let rows = capture.iterations() * capture.positions();
    let pca = Pca::fit(
        capture.latents_tensor(device),
        &PcaOptions {
            components: options.components.min(capture.width()).min(rows - 1),
            subsample: Some(options.pca_rows),
            ..PcaOptions::default()
        },
    )?;
    pca.save(&out.join("pca.safetensors"))?;
    let trajectories = project_capture(&pca, &capture, device)?;
    let labels: Vec<String> = (0..capture.positions()).map(|t| capture.meta.prompt.label(t)).collect();
    let motifs: Vec<Dynamics> = trajectories.iter().map(|p| classify(p)).collect();
    let counted = dynamics::counts(motifs.iter().map(|d| d.motif));
    let count_text = dynamics::summary(&counted);
    let counts: BTreeMap<Motif, usize> = counted.into_iter().collect();

    progress.set_message("figures");
    let mut figures = Vec::new();
    let shown = select_tokens(&motifs, options.shown);
    let tokens: Vec<TokenTrajectory> = shown
        .iter()
        .map(|&t| TokenTrajectory {
            label: labels[t].clone(),
            points: trajectories[t].clone(),
            dynamics: Some(motifs[t]),
        })
        .collect();
    let k = pca.components.len();
    let pairs = component_pairs(k);
    let explained: f32 = pca.explained_ratio().iter().sum();
    let images = plot_trajectories(
        &out.join("trajectories"),
        &format!("Latent trajectories in PCA space ({count_text})"),
        &tokens,
        &pairs,
    )?;
    figures.push(entry(
        "trajectories",
        images,
        format!(
            "Trajectories of {} of {} tokens over {} iterations, projected on the first {k} principal components of all \
             tokens' normalised states ln_f(s_i) (together {:.1}% of their variance); colour runs from the first \
             iteration (dark) to the last (bright) on a logarithmic scale, log(1 + i), so that the first iterations, \
             where the state moves, get most of the colours; the circle marks the start, the square the end, \
             arrowheads the direction of the first moves, the cross each trajectory's centre of mass. Each panel is \
             titled with the token and its position in the prompt. Motifs over all tokens: {count_text}.",
            tokens.len(),
            capture.positions(),
            capture.meta.steps,
            100.0 * explained
        ),
    ));

    let distances = capture.distances_to_target();
    let images = plot_convergence(
        &out.join("convergence"),
        &format!("Distance to the state after {} iterations", options.reference_steps),
        &labels,
        &distances,
    )?;
    figures.push(entry(
        "convergence",
        images,
        format!(
            "‖ln_f(s_i) − s*‖ for every token (rows) and iteration (columns), log colour scale; s* is the normalised \
             state after {} iterations from the same initial state.",
            options.reference_steps
        ),
    ));

    let exits: Vec<ExitSummary> = ExitRule::DEFAULTS
        .iter()
        .map(|&rule| ExitSummary::of(rule.label(), exit_steps(&capture, rule)))
        .collect();
    let series: Vec<(String, Vec<usize>)> = exits.iter().map(|e| (e.rule.clone(), e.steps.clone())).collect();
    let images = plot_exit_histogram(&out.join("exit-steps"), "Steps to exit per token", "tokens", &series)?;
    figures.push(entry(
        "exit-steps",
        images,
        format!(
            "Steps each of the {} prompt tokens needs before an exit criterion fires (teacher-forced, all positions in \
             one pass, at most {}); a token that never exits counts {}.",
            capture.positions(),
            capture.meta.steps,
            capture.meta.steps
        ),
    ));

    let warm_start_exits = warm_start_exits(&model, &capture.meta.prompt.tokens, capture.meta.steps)?;
    let series: Vec<(String, Vec<usize>)> = warm_start_exits
        .iter()
        .map(|e| (e.rule.clone(), e.steps.clone()))
        .collect();
    let images = plot_exit_histogram(
        &out.join("exit-steps-warm-start"),
        "Steps to exit per token, with and without warm start",
        "tokens",
        &series,
    )?;
    figures.push(entry(
        "exit-steps-warm-start",
        images,
        format!(
            "The prompt fed token by token as in generation (infer's adaptive exit, at most {} steps), each token's \
             recurrence starting from zeros (cold) or from the previous token's final state (warm, continuous CoT).",
            capture.meta.steps
        ),
    ));

    let mut depth_curves = Vec::new();
    let metrics = run.join("metrics.jsonl");
    if metrics.is_file() {
        let curves = TrainingCurves::read(&metrics)?;
        let metric = if curves.has_accuracy() {
            Metric::Accuracy
        } else {
            Metric::Loss
        };
        let by_depth = curves.by_depth(metric);
        if !by_depth.is_empty() {
            let images = plot_depth_curves(
                &out.join("depth"),
                &format!("Final {} against test-time depth", metric.name()),
                metric.name(),
                &by_depth,
                Colours::Categorical,
            )?;
            figures.push(entry(
                "depth",
                images,
                format!(
                    "Held-out {} at the last evaluation, against the number of recurrence iterations used at test \
                     time, one curve per split.",
                    metric.name()
                ),
            ));
            depth_curves = by_depth
                .into_iter()
                .map(|(label, points)| DepthCurve {
                    label,
                    metric: metric.name(),
                    points,
                })
                .collect();
        }
        if !(curves.train_loss.is_empty() && curves.eval.is_empty()) {
            let images = plot_training_curves(&out.join("training"), "Training curves", &curves)?;
            figures.push(entry(
                "training",
                images,
                "Training loss and held-out loss (and accuracy, where scored) over optimizer steps, at every \
                 evaluated depth."
                    .to_string(),
            ));
        }
    }

    let report = Report {
        run: run.to_path_buf(),
        steps: capture.meta.steps,
        reference_steps: options.reference_steps,
        init: options.init,
        pca: PcaSummary {
            components: k,
            samples: pca.samples,
            explained_ratio: pca.explained_ratio(),
        },
        dynamics: DynamicsSummary {
            counts,
            tokens: motifs
                .iter()
                .enumerate()
                .map(|(t, d)| TokenDynamics {
                    position: t,
                    label: labels[t].clone(),
                    dynamics: *d,
                })
                .collect(),
        },
        final_distance: distances.iter().map(|row| row[capture.meta.steps]).collect(),
        exits,
        warm_start_exits,
        depth_curves,
        figures,
        prompt: capture.meta.prompt.clone(),
    };
    let json = serde_json::to_string_pretty(&report).expect("plain data serializes");
    let path = out.join("report.json");
    std::fs::write(&path, json).map_err(AnalysisError::io(&path))?;
    let path = out.join("index.html");
    std::fs::write(&path, gallery(&report)).map_err(AnalysisError::io(&path))?;
    progress.finish_and_clear();
    Ok(report)
}

/// Every token's trajectory in the basis: `[S][R+1][k]`.
pub fn project_capture(pca: &Pca, capture: &Capture, device: &Device) -> Result<Vec<Vec<Vec<f32>>>, AnalysisError> {
    let k = pca.components.len();
    let coords = host_f32(pca.project(capture.latents_tensor(device))?);
    let s = capture.positions();
    Ok((0..s)
        .map(|t| {
            (0..capture.iterations())
                .map(|i| coords[(i * s + t) * k..(i * s + t + 1) * k].to_vec())
                .collect()
        })
        .collect())
}

/// Up to `n` positions to draw: one of each motif present first (the one that moves most,
/// the clearest example), then evenly spread positions; in prompt order.
pub fn select_tokens(dynamics: &[Dynamics], n: usize) -> Vec<usize> {
    let mut chosen: Vec<usize> = Vec::new();
    for motif in Motif::ALL {
        let best = (0..dynamics.len())
            .filter(|&t| dynamics[t].motif == motif)
            .max_by(|&a, &b| dynamics[a].motion.total_cmp(&dynamics[b].motion));
        if let Some(t) = best
            && chosen.len() < n
        {
            chosen.push(t);
        }
    }
    let len = dynamics.len();
    let mut i = 0;
    while chosen.len() < n.min(len) {
        // Positions 0, len/n', 2·len/n', … then whatever is left.
        let t = (i * len / n.min(len).max(1)) % len;
        let t = (t..len)
            .chain(0..t)
            .find(|c| !chosen.contains(c))
            .expect("fewer chosen than positions");
        chosen.push(t);
        i += 1;
    }
    chosen.sort_unstable();
    chosen
}

/// The prompt a report runs on, with token text from the run's tokenizer or task.
fn run_prompt(run: &Path, input: &PromptInput) -> Result<Prompt, AnalysisError> {
    let tokenizer = run.join("tokenizer.json");
    let tokenizer = tokenizer.is_file().then_some(tokenizer);
    match input {
        PromptInput::Text(text) => match &tokenizer {
            Some(path) => Prompt::from_text(text, path),
            None => Err(AnalysisError::Invalid(format!(
                "{} has no tokenizer.json to tokenize a text prompt; give token ids",
                run.display()
            ))),
        },
        PromptInput::Ids(ids) => {
            let mut prompt = Prompt::from_ids(ids.clone());
            if let Some(path) = &tokenizer {
                prompt.decode_with(path)?;
            }
            Ok(prompt)
        }
        PromptInput::Default => default_prompt(run, tokenizer.as_deref()),
    }
}

/// The first test example of a task run (with its tokens named), or a line of verse for a
/// text run, read from `RUN/run.json`'s `data`.
fn default_prompt(run: &Path, tokenizer: Option<&Path>) -> Result<Prompt, AnalysisError> {
    let path = run.join("run.json");
    let json = std::fs::read_to_string(&path).map_err(|_| {
        AnalysisError::Invalid(format!(
            "{} has no run.json to choose a prompt from; give one",
            run.display()
        ))
    })?;
    let value: serde_json::Value = serde_json::from_str(&json).map_err(|e| AnalysisError::format(&path, e))?;
    let data: DataConfig = serde_json::from_value(value.get("data").cloned().unwrap_or_default())
        .map_err(|e| AnalysisError::format(&path, format!("data: {e}")))?;
    match data {
        DataConfig::Addition {
            seed,
            max_digits,
            padded,
        } => {
            let task = train::addition::AdditionTask {
                seed,
                max_digits,
                padded,
            };
            let tokens = task.example(train::addition::Split::Test, 0).tokens;
            let names = tokens.iter().map(|&t| addition_name(t)).collect();
            Ok(named(tokens, names))
        }
        DataConfig::Chains { seed, .. } => Ok(hop_prompt(&train::chains::ChainTask { seed })),
        DataConfig::Pointers { seed, .. } => Ok(hop_prompt(&train::pointers::PointerTask { seed })),
        DataConfig::Text { .. } | DataConfig::Chat { .. } => match tokenizer {
            Some(path) => Prompt::from_text("To be, or not to be, that is the question:", path),
            None => Err(AnalysisError::Invalid(format!(
                "{} is a text run without tokenizer.json; give token ids",
                run.display()
            ))),
        },
    }
}

/// The first test question of a hop task, with its tokens named.
fn hop_prompt<T: train::hops::HopTask>(task: &T) -> Prompt {
    let tokens = task.example(train::hops::Split::Test, 0).tokens;
    let names = tokens.iter().map(|&t| T::token_name(t)).collect();
    named(tokens, names)
}

fn named(tokens: Vec<u32>, names: Vec<String>) -> Prompt {
    let mut prompt = Prompt::from_ids(tokens);
    prompt.token_text = Some(names);
    prompt
}

fn addition_name(t: u32) -> String {
    use train::addition::{EQUALS, NEWLINE, PLUS};
    match t {
        0..=9 => t.to_string(),
        PLUS => "+".into(),
        EQUALS => "=".into(),
        NEWLINE => "\n".into(),
        _ => "<pad>".into(),
    }
}

fn entry(name: &str, images: Images, caption: String) -> FigureEntry {
    let file = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    FigureEntry {
        name: name.to_string(),
        png: file(&images.png),
        svg: file(&images.svg),
        caption,
    }
}

/// `index.html`: every figure (linking to its SVG) with its caption, and the headline numbers.
fn gallery(report: &Report) -> String {
    let mut html = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>Latent dynamics report</title>\n\
         <style>body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}\
         figure{margin:2em 0}img{max-width:100%;border:1px solid #ddd}figcaption{margin-top:.5em;color:#333}\
         code{background:#f4f4f4;padding:0 .2em}</style>\n</head>\n<body>\n",
    );
    let prompt = match &report.prompt.token_text {
        Some(texts) => texts.concat(),
        None => format!("{:?}", report.prompt.tokens),
    };
    let _ = writeln!(
        html,
        "<h1>Latent dynamics of <code>{}</code></h1>",
        escape(&report.run.display().to_string())
    );
    let _ = writeln!(
        html,
        "<p>Prompt ({} tokens): <code>{}</code>. {} iterations captured, s* after {}; numbers in \
         <a href=\"report.json\">report.json</a>.</p>",
        report.prompt.len(),
        escape(&prompt),
        report.steps,
        report.reference_steps
    );
    for figure in &report.figures {
        let _ = writeln!(
            html,
            "<figure id=\"{name}\">\n<a href=\"{svg}\"><img src=\"{png}\" alt=\"{name}\"></a>\n<figcaption>{caption}\
             </figcaption>\n</figure>",
            name = escape(&figure.name),
            svg = escape(&figure.svg),
            png = escape(&figure.png),
            caption = escape(&figure.caption)
        );
    }
    html.push_str("</body>\n</html>\n");
    html
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(motif: Motif, motion: f64) -> Dynamics {
        Dynamics {
            motif,
            motion,
            steadiness: 1.0,
            straightness: 0.0,
            radius: 0.0,
            turns: 0.0,
        }
    }

    #[test]
    fn selects_one_of_each_motif_then_spreads() {
        let f = Motif::FixedPoint;
        let dynamics = [
            d(f, 0.0),
            d(f, 0.0),
            d(Motif::Orbit, 1.0),
            d(f, 0.0),
            d(Motif::Orbit, 2.0),
            d(f, 0.0),
        ];
        // The fixed point that moves most is the last of equals; the orbit moving most is 4.
        assert_eq!(select_tokens(&dynamics, 3), [0, 4, 5]);
        assert_eq!(select_tokens(&dynamics, 2), [4, 5]);
        assert_eq!(select_tokens(&dynamics, 10), [0, 1, 2, 3, 4, 5]);
        assert_eq!(select_tokens(&dynamics, 0), Vec::<usize>::new());
    }

    #[test]
    fn addition_tokens_have_names_and_html_is_escaped() {
        assert_eq!(addition_name(7), "7");
        assert_eq!(addition_name(train::addition::PLUS), "+");
        assert_eq!(escape("<a & \"b\">"), "&lt;a &amp; &quot;b&quot;&gt;");
    }
}
