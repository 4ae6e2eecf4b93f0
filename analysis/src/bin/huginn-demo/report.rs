//! The demo's pictures and pages: the analysis report of the trained model (trajectories,
//! convergence, exit steps, training curves) in `analysis/`, plus the demo's own figures
//! (accuracy against depth for both models and every difficulty, exit-step histograms) and an
//! `index.html` that shows them all with the measured table.

use std::fmt::Write as _;
use std::path::Path;

use analysis::curves::TrainingCurves;
use analysis::plot::depth::{Colours, plot_depth_curves};
use analysis::plot::histogram::plot_exit_histogram;
use analysis::plot::training::plot_training_curves;
use analysis::report::{PromptInput, ReportOptions, write_report};
use anyhow::{Context, Result};
use indicatif::ProgressBar;
use model::Huginn;
use serde_json::{Value, json};
use tokenizers::Tokenizer;

use crate::common::{Accuracies, ExitResult};

/// A figure of the gallery: file stem (PNG and SVG beside each other) and caption.
struct Figure {
    stem: String,
    caption: String,
}

fn series(depths: &[usize], values: &[f64]) -> Vec<(usize, f64)> {
    depths.iter().copied().zip(values.iter().copied()).collect()
}

/// The analysis report of `out/recurrent` in `out/analysis`, with `prompt`.
fn analysis_report(out: &Path, model: &Huginn, prompt: PromptInput, progress: bool) -> Result<Value> {
    let bar = if progress {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    let options = ReportOptions {
        prompt,
        ..ReportOptions::default()
    };
    let report = write_report(
        &out.join("recurrent"),
        &out.join("analysis"),
        &options,
        &model.device(),
        &bar,
    )
    .context("analysing the trained model")?;
    bar.finish_and_clear();
    Ok(json!({
        "dynamics": report.dynamics.counts,
        "pca_explained_ratio": report.pca.explained_ratio,
        "exit_steps": report.exits.iter().map(|e| json!({"rule": e.rule, "mean": e.mean, "min": e.min, "max": e.max})).collect::<Vec<_>>(),
        "final_distance_max": report.final_distance.iter().cloned().fold(0.0f32, f32::max),
        "figures": report.figures.iter().map(|f| format!("analysis/{}", f.png)).collect::<Vec<_>>(),
    }))
}

/// What names a task's figures.
pub struct Figures {
    pub title: &'static str,
    /// The difficulty knob ("hops", "carry chain").
    pub level: &'static str,
    /// The trained and the harder split.
    pub trained: String,
    pub harder: String,
    /// The prompt whose latent dynamics are drawn.
    pub prompt: Vec<u32>,
}

pub fn task_figures(
    names: &Figures,
    out: &Path,
    model: &Huginn,
    accuracies: &Accuracies,
    exits: &[ExitResult],
    progress: bool,
    report: &mut Value,
) -> Result<()> {
    let (depths, accuracy, baseline) = (accuracies.depths, &accuracies.recurrent, &accuracies.baseline);
    let level_accuracy = &accuracies.by_level;
    let plots = out.join("plots");
    let mut figures = Vec::new();
    plot_depth_curves(
        &plots.join("accuracy-by-depth"),
        "Exact-match accuracy against test-time recurrence",
        "accuracy",
        &[
            (
                format!("recurrent, {} (trained)", names.trained),
                series(depths, &accuracy[0]),
            ),
            (
                format!("recurrent, {} (harder)", names.harder),
                series(depths, &accuracy[1]),
            ),
            (
                format!("non-recurrent baseline, {}", names.trained),
                series(depths, &baseline[0]),
            ),
            (
                format!("non-recurrent baseline, {}", names.harder),
                series(depths, &baseline[1]),
            ),
        ],
        Colours::Categorical,
    )?;
    figures.push(Figure {
        stem: "plots/accuracy-by-depth".into(),
        caption: "Accuracy against the number of recurrence steps at test time. The recurrent model \
                  is trained with randomized depth, the same-size baseline at depth 1."
            .into(),
    });
    let by_level: Vec<(String, Vec<(usize, f64)>)> = level_accuracy
        .iter()
        .map(|(h, a)| (format!("{} {h}", names.level), series(depths, a)))
        .collect();
    plot_depth_curves(
        &plots.join("accuracy-by-difficulty"),
        &format!("Accuracy against recurrence, one curve per {}", names.level),
        "accuracy",
        &by_level,
        Colours::Ordered,
    )?;
    figures.push(Figure {
        stem: "plots/accuracy-by-difficulty".into(),
        caption: format!(
            "Accuracy against recurrence for each difficulty level ({}).",
            names.level
        ),
    });
    let histograms: Vec<(String, Vec<usize>)> = exits
        .iter()
        .map(|e| (format!("{} < {}", e.criterion.name(), e.threshold), e.all_steps.clone()))
        .collect();
    plot_exit_histogram(
        &plots.join("exit-steps"),
        "Recurrence steps used per answer under zero-shot adaptive exit",
        "answers",
        &histograms,
    )?;
    figures.push(Figure {
        stem: "plots/exit-steps".into(),
        caption: "How many steps each answer takes before the exit criterion fires, over all \
                  difficulty levels; the mean is in the legend."
            .into(),
    });
    for (run, title) in [("recurrent", "Recurrent model"), ("baseline", "Non-recurrent baseline")] {
        let curves = TrainingCurves::read(&out.join(run)).context("reading the training metrics")?;
        plot_training_curves(
            &plots.join(format!("training-{run}")),
            &format!("{title}: training"),
            &curves,
        )?;
        figures.push(Figure {
            stem: format!("plots/training-{run}"),
            caption: format!("{title}: training loss and held-out evaluations at several depths."),
        });
    }

    report["analysis"] = analysis_report(out, model, PromptInput::Ids(names.prompt.clone()), progress)?;
    report["figures"] = json!(figures.iter().map(|f| format!("{}.png", f.stem)).collect::<Vec<_>>());
    write_index(
        out,
        names.title,
        &table(names, depths, accuracy, baseline, exits),
        &figures,
    )
}

fn table(
    names: &Figures,
    depths: &[usize],
    accuracy: &[Vec<f64>; 2],
    baseline: &[Vec<f64>; 2],
    exits: &[ExitResult],
) -> String {
    let mut html = format!(
        "<table><tr><th>r</th><th>recurrent, {0}</th><th>recurrent, {1}</th>\
         <th>baseline, {0}</th><th>baseline, {1}</th></tr>",
        names.trained, names.harder
    );
    for (i, d) in depths.iter().enumerate() {
        let _ = write!(
            html,
            "<tr><td>{d}</td><td>{:.1}%</td><td>{:.1}%</td><td>{:.1}%</td><td>{:.1}%</td></tr>",
            100.0 * accuracy[0][i],
            100.0 * accuracy[1][i],
            100.0 * baseline[0][i],
            100.0 * baseline[1][i]
        );
    }
    let _ = write!(
        html,
        "</table><table><tr><th>exit rule</th><th>accuracy</th><th>mean steps</th><th>mean steps by {}</th><th>Spearman ρ</th></tr>",
        names.level
    );
    for e in exits {
        let by_hops: Vec<String> = e.steps_by_level.iter().map(|(h, m)| format!("{h}: {m:.1}")).collect();
        let _ = write!(
            html,
            "<tr><td>{} &lt; {}</td><td>{:.1}%</td><td>{:.1}</td><td>{}</td><td>{:.2}</td></tr>",
            e.criterion.name(),
            e.threshold,
            100.0 * e.accuracy,
            e.mean_steps,
            by_hops.join(", "),
            e.spearman
        );
    }
    html.push_str("</table>");
    html
}

#[allow(clippy::too_many_arguments)]
pub fn text_figures(
    out: &Path,
    model: &Huginn,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    depths: &[usize],
    losses: &[(usize, f64)],
    progress: bool,
    report: &mut Value,
) -> Result<()> {
    let plots = out.join("plots");
    plot_depth_curves(
        &plots.join("loss-by-depth"),
        "Validation loss against test-time recurrence",
        "cross-entropy (nats per token)",
        &[("validation".to_string(), losses.to_vec())],
        Colours::Categorical,
    )?;
    let curves = TrainingCurves::read(&out.join("recurrent")).context("reading the training metrics")?;
    plot_training_curves(&plots.join("training"), "Language model: training", &curves)?;
    let figures = vec![
        Figure {
            stem: "plots/loss-by-depth".into(),
            caption: format!(
                "Validation loss at depths {depths:?}: more iterations at test time lower the loss up \
                 to around the training mean and hold it beyond."
            ),
        },
        Figure {
            stem: "plots/training".into(),
            caption: "Training loss and validation loss at several depths.".into(),
        },
    ];
    let text = tokenizer
        .decode(prompt, false)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    report["analysis"] = analysis_report(out, model, PromptInput::Text(text), progress)?;
    report["figures"] = json!(figures.iter().map(|f| format!("{}.png", f.stem)).collect::<Vec<_>>());
    let sample = report["sample"]["text"].as_str().unwrap_or_default().to_string();
    let table = format!(
        "<p>Sample with per-token adaptive exit (KL &lt; 10⁻³, continuous CoT):</p><pre>{}{}</pre>",
        escape(report["sample"]["prompt"].as_str().unwrap_or_default()),
        escape(&sample)
    );
    write_index(
        out,
        "A small recurrent-depth language model on Shakespeare",
        &table,
        &figures,
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// `out/index.html`: the measured table, every figure with its caption, and a link to the
/// analysis report's own gallery.
fn write_index(out: &Path, title: &str, table: &str, figures: &[Figure]) -> Result<()> {
    let mut html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>\
         body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}\
         figure{{margin:2em 0}}img{{max-width:100%;border:1px solid #eee}}</style></head><body>\
         <h1>{title}</h1>{table}"
    );
    for f in figures {
        let _ = write!(
            html,
            "<figure><a href=\"{0}.svg\"><img src=\"{0}.png\" alt=\"{1}\"></a><figcaption>{1}</figcaption></figure>",
            f.stem,
            escape(&f.caption)
        );
    }
    html.push_str(
        "<p>Latent dynamics of the trained model (PCA trajectories, convergence heat map, exit steps \
         per token): <a href=\"analysis/index.html\">analysis/index.html</a>. All numbers: \
         <a href=\"report.json\">report.json</a>.</p></body></html>",
    );
    let path = out.join("index.html");
    std::fs::write(&path, html).with_context(|| format!("writing {}", path.display()))
}

pub fn write_json(out: &Path, report: &Value) -> Result<()> {
    let path = out.join("report.json");
    let text = serde_json::to_string_pretty(report).expect("JSON values serialize");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}
