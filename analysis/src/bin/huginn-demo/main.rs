//! `huginn-demo`: the paper's central claim on a laptop CPU in minutes. Trains a small
//! recurrent-depth model with randomized depth on k-hop pointer chains (or reversed-digit
//! addition, or k-hop variable chains), the same-size non-recurrent baseline on the same budget, then measures accuracy
//! against test-time depth (in distribution and on harder, held-out instances), zero-shot
//! adaptive exit by difficulty, and draws the latent dynamics. Everything lands in `--out` (default `runs/demo`): both training
//! runs, `report.json`, the plots and an `index.html` gallery.
//!
//! `--text` does the same for a small language model on the embedded Shakespeare slice;
//! `--quick` runs the whole pipeline on tiny sizes (wiring, not accuracy).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use model::Backend;

mod addition;
mod common;
mod hops;
mod report;
mod text;

use addition::AdditionDemo;
use hops::{HopDemo, HopDemoTask};
use text::TextDemo;

#[derive(Parser, Debug)]
#[command(
    name = "huginn-demo",
    version,
    about = "Train a recurrent-depth model and watch depth pay off."
)]
struct Args {
    /// Where the runs, plots and report go (replaced if it holds an earlier demo).
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: Backend,
    /// Tiny sizes: the whole pipeline in about a minute (wiring, not accuracy).
    #[arg(long)]
    quick: bool,
    /// The reasoning task: k-hop pointer chains (deeper chains than trained are answered by
    /// iterating longer), reversed-digit addition (one pass is not enough in distribution; no
    /// depth-hard split), or k-hop variable chains (built to need depth, not learned within the
    /// CPU budget). docs/results.md compares them.
    #[arg(long, value_enum, default_value_t = Task::Pointers)]
    task: Task,
    /// A small language model on the embedded Shakespeare slice instead of a reasoning task.
    #[arg(long)]
    text: bool,
    /// Override the number of training steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Override the training mean depth r̄ (iterations are Poisson-lognormal around r̄ + 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    mean_depth: Option<u64>,
    /// Seed of the weights, the data and the depth draws. Default: the task's own (4 for
    /// pointer chains, chosen from the seed sweep in docs/results.md; 0 for the others).
    #[arg(long)]
    seed: Option<u64>,
    /// Hide progress bars.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Task {
    Pointers,
    Addition,
    Chains,
}

fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let device = args.device.device()?;
    prepare(&args.out)?;
    if args.text {
        let mut config = if args.quick {
            TextDemo::quick()
        } else {
            TextDemo::full()
        };
        config.seed = args.seed.unwrap_or(config.seed);
        config.steps = args.steps.unwrap_or(config.steps);
        config.mean_depth = args.mean_depth.map_or(config.mean_depth, |r| r as usize);
        text::run(&config, &args.out, &device, !args.quiet, started)?;
    } else if args.task == Task::Addition {
        let mut config = if args.quick {
            AdditionDemo::quick()
        } else {
            AdditionDemo::full()
        };
        config.recipe.seed = args.seed.unwrap_or(config.recipe.seed);
        config.recipe.steps = args.steps.unwrap_or(config.recipe.steps);
        config.recipe.mean_depth = args.mean_depth.map_or(config.recipe.mean_depth, |r| r as usize);
        addition::run(&config, &args.out, &device, !args.quiet, started)?;
    } else {
        let mut config = match args.task {
            Task::Chains => HopDemo::chains(),
            _ => HopDemo::pointers(),
        };
        if args.quick {
            config = config.quick();
        }
        let (seed, curriculum) = (args.seed.unwrap_or(config.recipe.seed), config.curriculum);
        config.recipe.seed = seed;
        config.recipe.steps = args.steps.unwrap_or(config.recipe.steps);
        config.recipe.mean_depth = args.mean_depth.map_or(config.recipe.mean_depth, |r| r as usize);
        let (out, progress) = (&args.out, !args.quiet);
        match args.task {
            Task::Chains => hops::run(
                &HopDemoTask::chains(seed, curriculum),
                &config,
                out,
                &device,
                progress,
                started,
            )?,
            _ => hops::run(
                &HopDemoTask::pointers(seed, curriculum),
                &config,
                out,
                &device,
                progress,
                started,
            )?,
        }
    }
    eprintln!(
        "report: {} (open {} in a browser) · {:.0} s",
        args.out.join("report.json").display(),
        args.out.join("index.html").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Clears an earlier demo's output, refusing to touch a directory that holds something else.
fn prepare(out: &Path) -> Result<()> {
    if out.exists() {
        let ours = out.join("report.json").exists() || out.join("recurrent").join("run.json").exists();
        let empty = std::fs::read_dir(out)?.next().is_none();
        anyhow::ensure!(
            ours || empty,
            "{} exists and does not hold a demo; choose another --out",
            out.display()
        );
        std::fs::remove_dir_all(out)?;
    }
    std::fs::create_dir_all(out)?;
    Ok(())
}

fn main() -> ExitCode {
    infer::cli::main(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse_and_out_of_range_depths_are_refused() {
        let args = Args::try_parse_from(["huginn-demo", "--mean-depth", "12", "--steps", "950"]).unwrap();
        assert_eq!(
            (args.mean_depth, args.steps, args.task),
            (Some(12), Some(950), Task::Pointers)
        );
        assert!(Args::try_parse_from(["huginn-demo", "--mean-depth", "-3"]).is_err());
        for bad in ["0", "65", "six"] {
            let err = Args::try_parse_from(["huginn-demo", "--mean-depth", bad]).unwrap_err();
            assert!(err.to_string().contains("--mean-depth"), "{err}");
        }
    }
}
