//! `cargo xtask …`: the project's entry points, each a sequence of cargo invocations. CI, the
//! benchmarks and the fixture check share one build (one profile, one feature set, wgpu
//! included), so nothing is compiled twice among them. `demo` builds only the backend it runs
//! on: a newcomer's first command compiles Burn without the GPU backend it does not use.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Features every CI step builds with: the wgpu backend is compiled in so its tests run (on
/// Mesa's lavapipe when the machine has no GPU).
const CI_FEATURES: &str = "model/wgpu";

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The main job: train a recurrent-depth model on k-hop pointer chains on this machine,
    /// with a non-recurrent baseline, and report accuracy against test-time depth with plots
    /// (`runs/demo/index.html`).
    Demo {
        /// Backend: cpu, wgpu or cuda (cuda is compiled in when asked for; it needs a network
        /// download at build time).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Tiny sizes: the whole pipeline in about a minute (wiring, not accuracy).
        #[arg(long)]
        quick: bool,
        /// The reasoning task: pointers, addition or chains.
        #[arg(long, default_value = "pointers")]
        task: String,
        /// A small language model on the embedded Shakespeare slice instead.
        #[arg(long)]
        text: bool,
        /// Output directory (default runs/demo, or runs/demo-text with --text).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seed of the run (default: the task's own).
        #[arg(long)]
        seed: Option<String>,
        /// One run per seed and each depth's spread across them (`0..5`: seeds 0 to 5).
        #[arg(long)]
        seeds: Option<String>,
    },
    /// Everything CI checks: formatting, clippy, the CUDA code's type-check, the test suite, the
    /// fixture check.
    Ci,
    /// Benchmarks, built with CI's features so nothing is compiled twice.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
    /// Check reference fixture folders (default: every folder under fixtures/reference).
    CheckFixture {
        dirs: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Cargo features to build with (e.g. model/wgpu).
        #[arg(long, default_value = "")]
        features: String,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Training tokens/s and peak memory of a model and depth on a device (huginn-bench; its
    /// flags: `cargo xtask bench train --help`).
    #[command(disable_help_flag = true)]
    Train {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Generation speed: prefill and decode tokens/s, ms per core iteration, KV bytes per token,
    /// peak memory (huginn-bench-generate; its flags: `cargo xtask bench generate --help`).
    #[command(disable_help_flag = true)]
    Generate {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Load test of `huginn serve`: N concurrent clients, throughput, latency percentiles,
    /// errors and peak memory (huginn-bench-serve; its flags: `cargo xtask bench serve --help`).
    #[command(disable_help_flag = true)]
    Serve {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = std::env::set_current_dir(workspace_root())
        .context("entering the workspace root")
        .and_then(|()| match cli.command {
            Task::Demo {
                device,
                quick,
                task,
                text,
                out,
                seed,
                seeds,
            } => {
                let out = out.unwrap_or_else(|| PathBuf::from(if text { "runs/demo-text" } else { "runs/demo" }));
                let mut flags = vec!["--task", &task];
                flags.extend(quick.then_some("--quick"));
                flags.extend(text.then_some("--text"));
                if let Some(seed) = &seed {
                    flags.extend(["--seed", seed]);
                }
                if let Some(seeds) = &seeds {
                    flags.extend(["--seeds", seeds]);
                }
                demo(&device, demo_features(&device), &out, &flags, false)
            }
            Task::Ci => ci(),
            Task::Bench {
                what: Bench::Train { args },
            } => bench("train", "huginn-bench", &args),
            Task::Bench {
                what: Bench::Generate { args },
            } => bench("infer", "huginn-bench-generate", &args),
            Task::Bench {
                what: Bench::Serve { args },
            } => bench("infer", "huginn-bench-serve", &args),
            Task::CheckFixture {
                dirs,
                json,
                device,
                features,
            } => check_fixture(&dirs, json, &device, &features),
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace of the `cargo xtask` that ran: `cargo run` sets `CARGO_MANIFEST_DIR` for the
/// process. The path compiled in is only the fallback, as it names whichever checkout last
/// built the binary where several share a target directory (a CI clone beside this one).
fn workspace_root() -> PathBuf {
    let manifest =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.parent().unwrap_or(Path::new(".")).to_path_buf()
}

/// Runs `cargo args…`, failing with the command line if it fails.
fn cargo(args: &[&str]) -> Result<()> {
    cargo_with(&[], args)
}

/// Runs `cargo args…` with the environment variables `env` set.
fn cargo_with(env: &[(&str, &std::ffi::OsStr)], args: &[&str]) -> Result<()> {
    let shown: Vec<String> = env
        .iter()
        .map(|(k, v)| format!("{k}={}", v.to_string_lossy()))
        .chain(["cargo".to_string()])
        .chain(args.iter().map(|a| a.to_string()))
        .collect();
    eprintln!("$ {}", shown.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .envs(env.iter().copied())
        .args(args)
        .status()
        .context("starting cargo")?;
    if !status.success() {
        bail!("`{}` failed ({status})", shown.join(" "));
    }
    Ok(())
}

/// Where the CUDA type-check builds: beside the test build's target directory, never in it, so
/// neither invalidates the other.
fn cuda_target_dir(target: Option<std::ffi::OsString>) -> PathBuf {
    match target {
        Some(mut dir) => {
            dir.push("-cuda");
            PathBuf::from(dir)
        }
        None => PathBuf::from("target/cuda-check"),
    }
}

/// Type-checks the code behind the `cuda` feature (model, infer, train), which no CI machine can
/// build: with `DOCS_RS=1` the build script of Burn's CUDA runtime skips its LLVM download,
/// which needs the network. About 5 minutes cold on 2 cores, seconds warm.
fn cuda_check() -> Result<()> {
    let target = cuda_target_dir(std::env::var_os("CARGO_TARGET_DIR"));
    let env = [("DOCS_RS", "1".as_ref()), ("CARGO_TARGET_DIR", target.as_os_str())];
    cargo_with(
        &env,
        &[
            "check",
            "-p",
            "infer",
            "-p",
            "train",
            "--features",
            "model/cuda",
            "--bins",
        ],
    )
}

/// Features for a run on `device`: always CI's (so the demo, the tests and the fixture check
/// share one build), plus the CUDA backend when asked for.
fn device_features(device: &str) -> &'static str {
    match device {
        "cuda" => "model/wgpu,model/cuda",
        _ => CI_FEATURES,
    }
}

/// Features for the demo alone: just the backend it runs on (the CPU one is always there).
fn demo_features(device: &str) -> &'static str {
    match device {
        "wgpu" => "model/wgpu",
        "cuda" => "model/cuda",
        _ => "",
    }
}

/// Builds `bin` of `package` with `features` in the foreground, cargo's own progress showing,
/// after saying what is being built and how long a first build takes. The `cargo run --quiet`
/// that follows then starts at once: a newcomer never watches a silent terminal for minutes.
fn build(what: &str, package: &str, features: &str, bin: &str) -> Result<()> {
    eprintln!("{}", build_notice(what, features));
    let mut args = vec!["build", "-p", package, "--bin", bin];
    if !features.is_empty() {
        args.extend(["--features", features]);
    }
    cargo(&args)
}

/// What a build is about to do. The minutes are the measured cold builds on the 2-core machine
/// (docs/backends.md, Build times): Burn on the CPU backend alone 14, with wgpu about 25.
fn build_notice(what: &str, features: &str) -> String {
    let burn = if features.contains("cuda") {
        "Burn with the CUDA backend (its build downloads CUDA's compiler: it needs the network)".to_string()
    } else if features.contains("wgpu") {
        "Burn with the wgpu backend, about 25 minutes on 2 cores".to_string()
    } else {
        "Burn, about 14 minutes on 2 cores".to_string()
    };
    format!("== building {what}: the first build compiles {burn}; later builds take seconds")
}

/// Runs `huginn-demo` on `device` into `out` with `flags` (task, sizes, seeds).
fn demo(device: &str, features: &str, out: &Path, flags: &[&str], quiet: bool) -> Result<()> {
    if !quiet {
        build("the demo", "analysis", features, "huginn-demo")?;
    }
    let out = out.display().to_string();
    let mut args = vec!["run", "--quiet", "-p", "analysis"];
    if !features.is_empty() {
        args.extend(["--features", features]);
    }
    args.extend(["--bin", "huginn-demo", "--", "--device", device, "--out", &out]);
    args.extend(flags);
    args.extend(quiet.then_some("--quiet"));
    cargo(&args)
}

/// Runs the benchmark binary `bin` of `package` with `args`.
fn bench(package: &str, bin: &str, args: &[String]) -> Result<()> {
    let features = device_features(if asks_for_cuda(args) { "cuda" } else { "cpu" });
    build(&format!("the benchmark ({bin})"), package, features, bin)?;
    let mut cargo_args = vec![
        "run",
        "--quiet",
        "-p",
        package,
        "--features",
        features,
        "--bin",
        bin,
        "--",
    ];
    cargo_args.extend(args.iter().map(String::as_str));
    cargo(&cargo_args)
}

/// Whether benchmark flags name a CUDA device: `--device cuda`, or `cuda:N` in `--devices`.
fn asks_for_cuda(args: &[String]) -> bool {
    let named = |flag: &str, value: &str| match flag {
        "--device" => value == "cuda",
        "--devices" => value.split(',').any(|d| d.split(':').next() == Some("cuda")),
        _ => false,
    };
    args.windows(2).any(|w| named(&w[0], &w[1]))
        || args
            .iter()
            .filter_map(|a| a.split_once('='))
            .any(|(flag, value)| named(flag, value))
}

fn fixture_dirs() -> Result<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("fixtures/reference")
        .context("listing fixtures/reference")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("expected.safetensors").exists())
        .collect();
    dirs.sort();
    Ok(dirs)
}

fn check_fixture(dirs: &[PathBuf], json: bool, device: &str, features: &str) -> Result<()> {
    let dirs = if dirs.is_empty() {
        fixture_dirs()?
    } else {
        dirs.to_vec()
    };
    let features = if features.is_empty() {
        device_features(device)
    } else {
        features
    };
    build("the fixture checker (huginn)", "infer", features, "huginn")?;
    let mut args = vec![
        "run",
        "--quiet",
        "-p",
        "infer",
        "--features",
        features,
        "--bin",
        "huginn",
        "--",
        "--device",
        device,
        "check-fixture",
    ];
    if json {
        args.push("--json");
    }
    let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    args.extend(dirs.iter().map(String::as_str));
    cargo(&args)
}

fn ci() -> Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    eprintln!(
        "{} (twice: clippy's check build, then the test build)",
        build_notice("the workspace", CI_FEATURES)
    );
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--features",
        CI_FEATURES,
        "--",
        "-D",
        "warnings",
    ])?;
    cuda_check()?;
    cargo(&["test", "--workspace", "--features", CI_FEATURES])?;
    // The wgpu parity runs as tests above (skipped, with the reason, where no adapter exists).
    check_fixture(&[], false, "cpu", CI_FEATURES)?;
    // The main job's whole pipeline on tiny sizes, every task and text.
    let scratch = std::env::temp_dir().join("huginn-ci-demo");
    // Pointers as a sweep of two seeds: each seed's whole demo, then the spread across them.
    demo(
        "cpu",
        CI_FEATURES,
        &scratch.join("pointers"),
        &["--quick", "--seeds", "0..1"],
        true,
    )?;
    for task in ["addition", "chains"] {
        demo(
            "cpu",
            CI_FEATURES,
            &scratch.join(task),
            &["--quick", "--task", task],
            true,
        )?;
    }
    demo("cpu", CI_FEATURES, &scratch.join("text"), &["--quick", "--text"], true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_benchmark_on_cuda_devices_builds_the_cuda_backend() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(asks_for_cuda(&args(&["--device", "cuda"])));
        assert!(asks_for_cuda(&args(&["--devices", "cuda:0,cuda:1"])));
        assert!(asks_for_cuda(&args(&["--devices=cuda"])));
        assert!(!asks_for_cuda(&args(&["--devices", "wgpu:0,wgpu:1", "--width", "64"])));
        assert!(!asks_for_cuda(&args(&["--device", "cpu"])));
    }

    #[test]
    fn the_cuda_check_builds_beside_the_test_build() {
        assert_eq!(
            cuda_target_dir(Some("/var/cache/huginn-rs/target".into())),
            PathBuf::from("/var/cache/huginn-rs/target-cuda")
        );
        assert_eq!(cuda_target_dir(None), PathBuf::from("target/cuda-check"));
    }

    #[test]
    fn a_build_says_what_it_builds_and_how_long_a_first_build_takes() {
        assert_eq!(
            build_notice("the demo", ""),
            "== building the demo: the first build compiles Burn, about 14 minutes on 2 cores; \
             later builds take seconds"
        );
        assert!(build_notice("the benchmark", CI_FEATURES).contains("wgpu backend, about 25 minutes"));
        assert!(build_notice("the demo", demo_features("cuda")).contains("needs the network"));
        for device in ["cpu", "wgpu", "cuda"] {
            assert!(build_notice("x", device_features(device)).starts_with("== building x: the first build"));
        }
    }
}
