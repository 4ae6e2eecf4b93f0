//! `huginn-demo`: the paper's central claim on a laptop CPU in minutes. Trains a small
//! recurrent-depth model with randomized depth on k-hop pointer chains (or reversed-digit
//! addition, or k-hop variable chains), the same-size non-recurrent baseline on the same budget, then measures accuracy
//! against test-time depth (in distribution and on harder, held-out instances), zero-shot
//! adaptive exit by difficulty, and draws the latent dynamics. Everything lands in `--out` (default `runs/demo`): both training
//! runs, `report.json`, the plots and an `index.html` gallery.
//!
//! `--text` does the same for a small language model on the embedded Shakespeare slice;
//! `--quick` runs the whole pipeline on tiny sizes (wiring, not accuracy); `--seeds 0..5` runs
//! a reasoning task's demo once per seed and reports each depth's spread across them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use model::Backend;
use model::burn::prelude::Device;

mod addition;
mod common;
mod hops;
mod report;
mod seeds;
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
    /// Run the demo once per seed (`0..5`: seeds 0 to 5; `0,3,7`), each in `OUT/seed-N`, then
    /// report each depth's accuracy as mean, lowest and highest across them (`OUT/seeds.json`, a
    /// band plot, `OUT/index.html`) and in how many seeds depth paid off.
    #[arg(long, value_parser = parse_seed_list, conflicts_with_all = ["seed", "text"])]
    seeds: Option<SeedList>,
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

/// The seeds of `--seeds`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SeedList(Vec<u64>);

fn parse_seed_list(text: &str) -> Result<SeedList, String> {
    seeds::parse_seeds(text).map(SeedList)
}

fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let device = args.device.device()?;
    prepare(&args.out)?;
    let Some(SeedList(seeds)) = &args.seeds else {
        demo(&args, args.seed, &args.out, &device, started)?;
        eprintln!(
            "report: {} (open {} in a browser) · {:.0} s",
            args.out.join("report.json").display(),
            args.out.join("index.html").display(),
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    };
    for (i, &seed) in seeds.iter().enumerate() {
        let out = seeds::seed_dir(&args.out, seed);
        eprintln!("== seed {seed} ({} of {}) in {}", i + 1, seeds.len(), out.display());
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        demo(&args, Some(seed), &out, &device, Instant::now())?;
    }
    seeds::summarise(&args.out, seeds, started.elapsed().as_secs_f64())?;
    eprintln!(
        "across seeds: {} (open {} in a browser) · {:.0} s",
        args.out.join("seeds.json").display(),
        args.out.join("index.html").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One demo of `args`' task with `seed` (the task's own when `None`) into `out`.
fn demo(args: &Args, seed: Option<u64>, out: &Path, device: &Device, started: Instant) -> Result<()> {
    if args.text {
        let mut config = if args.quick {
            TextDemo::quick()
        } else {
            TextDemo::full()
        };
        config.seed = seed.unwrap_or(config.seed);
        config.steps = args.steps.unwrap_or(config.steps);
        config.mean_depth = args.mean_depth.map_or(config.mean_depth, |r| r as usize);
        text::run(&config, out, device, !args.quiet, started)?;
    } else if args.task == Task::Addition {
        let mut config = if args.quick {
            AdditionDemo::quick()
        } else {
            AdditionDemo::full()
        };
        config.recipe.seed = seed.unwrap_or(config.recipe.seed);
        config.recipe.steps = args.steps.unwrap_or(config.recipe.steps);
        config.recipe.mean_depth = args.mean_depth.map_or(config.recipe.mean_depth, |r| r as usize);
        addition::run(&config, out, device, !args.quiet, started)?;
    } else {
        let mut config = match args.task {
            Task::Chains => HopDemo::chains(),
            _ => HopDemo::pointers(),
        };
        if args.quick {
            config = config.quick();
        }
        let (seed, curriculum) = (seed.unwrap_or(config.recipe.seed), config.curriculum);
        config.recipe.seed = seed;
        config.recipe.steps = args.steps.unwrap_or(config.recipe.steps);
        config.recipe.mean_depth = args.mean_depth.map_or(config.recipe.mean_depth, |r| r as usize);
        let progress = !args.quiet;
        match args.task {
            Task::Chains => hops::run(
                &HopDemoTask::chains(seed, curriculum),
                &config,
                out,
                device,
                progress,
                started,
            )?,
            _ => hops::run(
                &HopDemoTask::pointers(seed, curriculum),
                &config,
                out,
                device,
                progress,
                started,
            )?,
        }
    }
    Ok(())
}

/// Whether `dir` holds a demo's output: one run's (finished or not), or a seed sweep's (whose
/// `seed-N` folders hold runs).
fn holds_demo(dir: &Path) -> bool {
    let run = |d: &Path| d.join("report.json").exists() || d.join("recurrent").join("run.json").exists();
    let seed_run = |entry: std::fs::DirEntry| {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        name.strip_prefix("seed-").is_some_and(|n| n.parse::<u64>().is_ok()) && run(&entry.path())
    };
    run(dir)
        || dir.join("seeds.json").exists()
        || std::fs::read_dir(dir).is_ok_and(|mut entries| entries.any(|e| e.is_ok_and(seed_run)))
}

/// Clears an earlier demo's output, refusing to touch a directory that holds something else.
fn prepare(out: &Path) -> Result<()> {
    if out.exists() {
        let ours = holds_demo(out);
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

    #[test]
    fn seeds_take_a_list_and_exclude_one_seed_and_text() {
        let args = Args::try_parse_from(["huginn-demo", "--seeds", "0..5"]).unwrap();
        assert_eq!(args.seeds, Some(SeedList(vec![0, 1, 2, 3, 4, 5])));
        for clash in [["--seed", "4"], ["--text", "--quick"]] {
            let err = Args::try_parse_from(["huginn-demo", "--seeds", "0..1", clash[0], clash[1]]).unwrap_err();
            assert!(err.to_string().contains("cannot be used with"), "{err}");
        }
        let err = Args::try_parse_from(["huginn-demo", "--seeds", "4"]).unwrap_err();
        assert!(err.to_string().contains("two seeds or more"), "{err}");
    }

    #[test]
    fn only_a_demo_s_own_output_is_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sweep");
        std::fs::create_dir_all(out.join("seed-3").join("recurrent")).unwrap();
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        assert!(prepare(&out).is_err(), "a folder of someone else's");
        assert!(out.join("notes.txt").exists());
        // A sweep killed during its first seed's training: its run.json marks it as a demo's.
        std::fs::write(out.join("seed-3").join("recurrent").join("run.json"), "{}").unwrap();
        prepare(&out).unwrap();
        assert!(std::fs::read_dir(&out).unwrap().next().is_none());
    }
}
