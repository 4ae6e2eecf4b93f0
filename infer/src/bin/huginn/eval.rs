//! `huginn eval`: tasks from local JSONL files (multiple choice, scored by log-likelihood; or
//! generation, scored by exact match) at each depth of `--depths` and under each exit of
//! `--exit`, printed as the paper's table (accuracy per depth) and written to `report.json`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use folder::ModelFolder;
use infer::adaptive::{AdaptiveConfig, MAX_STEPS};
use infer::eval::{self, Options, Outcome, Questions};
use infer::exit::Criterion;
use infer::limits::MAX_EXIT_THRESHOLD;
use infer::range;
use infer::strategy::Strategy;
use infer::warm_start::WarmStart;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Model folder, or ORG/NAME[@REVISION].
    #[arg(long)]
    pub model: PathBuf,
    /// Task files, JSONL, one question per line. Multiple choice: {"context", "choices",
    /// "gold"} in text (needs the folder's tokenizer) or {"context_ids", "choice_ids", "gold"}.
    /// Generation: {"prompt", "answer", "regex"?} or {"prompt_ids", "answer_ids"}.
    #[arg(long, required = true, value_delimiter = ',')]
    tasks: Vec<PathBuf>,
    /// Fixed recurrence depths, one shared run.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16,32")]
    depths: Vec<usize>,
    /// Exit criteria as CRITERION:THRESHOLD (e.g. kl:5e-4,latent-diff:0.03), each token at
    /// most --exit-steps steps.
    #[arg(long, value_delimiter = ',')]
    exit: Vec<String>,
    /// Most steps per token under an exit criterion (default: the deepest of --depths).
    #[arg(long)]
    exit_steps: Option<usize>,
    /// Questions per task (the first ones).
    #[arg(long)]
    limit: Option<usize>,
    /// Most rows (one per choice; each question's context runs once for all its choices)
    /// scored in one pass.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Put the folder's beginning-of-sequence token before each context (text tasks; lm-eval
    /// adds none by default).
    #[arg(long)]
    add_bos: bool,
    /// Generation tasks: most new tokens of an answer.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Generation tasks: text that ends an answer (comma separated; e.g. a newline).
    #[arg(long, value_delimiter = ',')]
    stop: Vec<String>,
    /// Generation tasks: send each prompt as a user message through the folder's chat template.
    #[arg(long)]
    chat: bool,
    /// Generation tasks with --chat: a system message before each prompt.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Where report.json goes.
    #[arg(long, default_value = "eval")]
    out: PathBuf,
}

/// The most rows of one pass: far beyond what helps, and a bound on the logits it holds.
const MAX_BATCH: usize = 4096;

pub fn run(folder: &ModelFolder, args: &EvalArgs) -> Result<()> {
    range::within("--batch", args.batch, 1, MAX_BATCH)?;
    if let Some(limit) = args.limit {
        range::within("--limit", limit, 1, usize::MAX)?;
    }
    for &depth in &args.depths {
        range::within("--depths", depth, 1, MAX_STEPS)?;
    }
    let context = folder.model.config().block_size;
    range::within("--max-new-tokens", args.max_new_tokens, 1, context)?;
    if args.stop.iter().any(String::is_empty) {
        bail!("--stop strings must not be empty");
    }
    let exit_steps = args.exit_steps.or(args.depths.iter().copied().max()).unwrap_or(32);
    range::within("--exit-steps", exit_steps, 1, MAX_STEPS)?;
    let exits = args
        .exit
        .iter()
        .map(|spec| exit_config(spec, exit_steps))
        .collect::<Result<Vec<_>>>()?;
    if args.depths.is_empty() && exits.is_empty() {
        bail!("nothing to evaluate: give --depths or --exit");
    }
    let options = Options {
        limit: args.limit,
        add_bos: args.add_bos,
        chat: args.chat,
        system: args.system.clone(),
        max_new: args.max_new_tokens,
        stop: args.stop.clone(),
    };
    // Every file is read and checked before any is scored.
    let tasks = args
        .tasks
        .iter()
        .map(|path| eval::read_task(path, folder, &options))
        .collect::<Result<Vec<_>, _>>()?;
    // Multiple-choice depths share one run per question; generation runs each depth.
    let total: usize = tasks
        .iter()
        .map(|t| match &t.questions {
            Questions::Choice(q) => q.len() * (usize::from(!args.depths.is_empty()) + exits.len()),
            Questions::Generate(q) => q.len() * (args.depths.len() + exits.len()),
        })
        .sum();
    let bar = progress(total as u64);
    let mut outcomes = Vec::new();
    for task in &tasks {
        bar.set_message(task.name.clone());
        let scored = eval::evaluate(folder, task, &args.depths, &exits, args.batch, &options, || bar.inc(1))?;
        outcomes.extend(scored);
    }
    bar.finish_and_clear();
    print_table(&outcomes);
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let path = args.out.join("report.json");
    let report = serde_json::json!({ "model": args.model, "results": outcomes });
    write_new(&path, &serde_json::to_string_pretty(&report)?)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// `CRITERION:THRESHOLD` as a recurrence that exits per token.
fn exit_config(spec: &str, max_steps: usize) -> Result<AdaptiveConfig> {
    let (name, threshold) = spec
        .split_once(':')
        .with_context(|| format!("--exit {spec:?}: write CRITERION:THRESHOLD, e.g. kl:5e-4"))?;
    let criterion = Criterion::from_str(name).map_err(|e| anyhow::anyhow!("--exit {spec:?}: {e}"))?;
    if criterion == Criterion::None {
        bail!("--exit {spec:?}: `none` never exits; use --depths for fixed depths");
    }
    let threshold: f64 = threshold
        .parse()
        .with_context(|| format!("--exit {spec:?}: {threshold:?} is not a number"))?;
    range::within_f64("--exit threshold", threshold, 0.0, MAX_EXIT_THRESHOLD)?;
    Ok(AdaptiveConfig {
        criterion,
        threshold,
        ..AdaptiveConfig::fixed(max_steps, WarmStart::Cold, Strategy::default())
    })
}

/// A bar on a terminal, nothing elsewhere (a log file gets the table only).
fn progress(total: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} questions · {elapsed} (eta {eta})")
            .expect("a valid template"),
    );
    bar
}

/// The paper's layout: a row per task and setting, accuracy with its standard error, the
/// steps the scored tokens took, and the time.
fn print_table(outcomes: &[Outcome]) {
    let task = outcomes.iter().map(|o| o.task.len()).max().unwrap_or(0).max(4);
    let setting = outcomes
        .iter()
        .map(|o| o.setting.to_string().chars().count())
        .max()
        .unwrap_or(0)
        .max(7);
    println!(
        "{:<task$} {:<setting$} {:>5} {:>15} {:>15} {:>8} {:>5} {:>9}",
        "task", "setting", "n", "acc", "acc_norm", "steps", "max", "seconds"
    );
    for o in outcomes {
        println!(
            "{:<task$} {:<setting$} {:>5} {:>8.4} ±{:.4} {:>8.4} ±{:.4} {:>8.2} {:>5} {:>9.2}",
            o.task,
            o.setting.to_string(),
            o.questions,
            o.acc,
            o.acc_stderr,
            o.acc_norm,
            o.acc_norm_stderr,
            o.mean_steps,
            o.max_steps,
            o.seconds
        );
    }
}

/// Writes `text` to `path`, which must not exist: an earlier report is never overwritten.
fn write_new(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| {
            format!(
                "writing {} (an earlier report is kept: choose another --out)",
                path.display()
            )
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}
