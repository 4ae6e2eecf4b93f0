//! Every numeric flag of `huginn-train` and `huginn-bench`, and every numeric field of a run's
//! configuration, at and beyond its range: 0, -1, 1e9, NaN, ±inf, past the type's limit, one
//! past the range's top, and sizes within range that the machine cannot hold. Each flag value
//! runs as a real process, which must exit with a one-line error (exit code 1 or 2, not a
//! panic's 101 nor a signal) within a few seconds and a bounded peak RSS, having trained
//! nothing; each configuration field is checked in-process.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use model::HuginnConfig;
use train::data::DataConfig;
use train::depth::DepthScheme;
use train::limits::*;
use train::run::{OptimizerConfig, RunConfig};
use train::schedule::Schedule;

const TRAIN: &str = env!("CARGO_BIN_EXE_huginn-train");
const BENCH: &str = env!("CARGO_BIN_EXE_huginn-bench");

/// How long a refusal may take, and the peak RSS it may reach.
const DEADLINE: Duration = Duration::from_secs(30);
const MAX_RSS: u64 = 1 << 30;

/// How a process ended.
struct Outcome {
    code: Option<i32>,
    signal: Option<i32>,
    stderr: String,
    peak_rss: u64,
}

/// Runs `bin` with `args`, killing it past [`DEADLINE`]; its peak RSS from `wait4`, which
/// also reaps it (hence no `Child::wait`).
#[allow(clippy::zombie_processes)]
fn run(bin: &str, args: &[String]) -> Outcome {
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr.reopen().unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let started = Instant::now();
    let (status, usage) = loop {
        let mut status = 0;
        // SAFETY: plain out-parameters for one child of this process, reaped here only.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let done = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if done == pid {
            break (status, usage);
        }
        if started.elapsed() > DEADLINE {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{bin} {args:?} still running after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Outcome {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        stderr: std::fs::read_to_string(stderr.path()).unwrap(),
        peak_rss: usage.ru_maxrss as u64 * 1024,
    }
}

/// `bin` with `args` ends in a clean one-line error containing `message`, quickly and small.
fn refused(bin: &str, args: &[String], message: &str) {
    let out = run(bin, args);
    let what = format!("{args:?}: {:?} {:?}\n{}", out.code, out.signal, out.stderr);
    assert!(matches!(out.code, Some(1 | 2)), "{what}");
    // Mesa's loader warns on stderr where XDG_RUNTIME_DIR is unset (CI sets one); not ours.
    let ours: Vec<&str> = out.stderr.lines().filter(|l| !l.contains("XDG_RUNTIME_DIR")).collect();
    assert_eq!(ours.len(), 1, "{what}");
    assert!(ours[0].contains(message), "{what}");
    assert!(out.peak_rss < MAX_RSS, "{what}: peak RSS {}", out.peak_rss);
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Values no count flag takes, and the first value past `hi`.
fn beyond(lo: u64, hi: u64) -> Vec<String> {
    let mut values = strings(&["-1", "1e9", "NaN", "inf", "-inf", "18446744073709551616", "0x10"]);
    if lo > 0 {
        values.push("0".into());
    }
    values.push((hi + 1).to_string());
    values
}

/// Each flag at each value beyond its range: clap's one-line "invalid value" naming it.
fn flags_beyond(bin: &str, flags: &[(&str, u64, u64)], out: &Path) {
    for &(flag, lo, hi) in flags {
        for value in beyond(lo, hi) {
            let args = [format!("--{flag}={value}"), "--out".into(), out.display().to_string()];
            let args = match bin == BENCH {
                true => args[..1].to_vec(),
                false => args.to_vec(),
            };
            refused(bin, &args, &format!("invalid value '{value}' for '--{flag}"));
        }
    }
    assert!(!out.exists(), "a refused run wrote {}", out.display());
}

#[test]
fn huginn_train_refuses_every_flag_beyond_its_range() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        ("vocab-size", 1, MAX_VOCAB),
        ("seq-len", 1, MAX_SEQ_LEN),
        ("curriculum", 0, MAX_STEPS),
        ("max-digits", 1, MAX_DIGITS),
        ("width", 1, MAX_WIDTH),
        ("heads", 1, MAX_HEADS),
        ("mean-depth", 1, MAX_MEAN_DEPTH),
        ("backprop", 1, MAX_MEAN_DEPTH),
        ("steps", 1, MAX_STEPS),
        ("batch-size", 1, MAX_BATCH),
        ("accumulation", 1, MAX_ACCUMULATION),
        ("warmup", 0, MAX_STEPS),
        ("cooldown", 0, MAX_STEPS),
        ("seed", 0, MAX_SEED),
        ("eval-every", 1, MAX_STEPS),
        ("eval-rows", 1, MAX_EVAL_ROWS),
        ("eval-depths", 1, MAX_EVAL_DEPTH),
        ("checkpoint-every", 1, MAX_STEPS),
        ("keep", 1, MAX_KEEP),
    ];
    flags_beyond(TRAIN, &flags, &dir.path().join("run"));
    let out = dir.path().join("run").display().to_string();
    let with_out = |args: &[&str]| [strings(args), strings(&["--out", &out])].concat();
    // Rates: finite and in range, the error naming the flag.
    for value in ["-1", "NaN", "inf", "-inf", "1e400"] {
        for flag in ["weight-decay", "max-grad-norm"] {
            refused(TRAIN, &with_out(&[&format!("--{flag}={value}")]), &format!("'--{flag}"));
        }
        refused(
            TRAIN,
            &with_out(&[&format!("--lr={value}")]),
            "--lr must be a positive number",
        );
        refused(
            TRAIN,
            &with_out(&[&format!("--min-lr-fraction={value}")]),
            "--min-lr-fraction must lie in [0, 1]",
        );
    }
    for layers in ["1,1000000000,1", "1,1025,1", "-1,1,1", "1,1", "1,nan,1"] {
        refused(TRAIN, &with_out(&[&format!("--layers={layers}")]), "'--layers");
    }
    // Within every range, beyond any machine (tens of terabytes and more): refused before anything is allocated.
    for args in [
        &["--width", "65536", "--heads", "1024", "--layers", "1024,1024,1024"][..],
        &["--batch-size", "65536", "--layers", "1,1024,1", "--backprop", "256"],
        &["--eval-rows", "65536", "--task", "addition", "--max-digits", "1000"],
        &["--task", "addition", "--max-digits", "1000", "--batch-size", "65536"],
    ] {
        refused(TRAIN, &with_out(args), "GiB, this machine has");
    }
    refused(
        TRAIN,
        &with_out(&["--task", "addition", "--max-digits", "0"]),
        "'--max-digits",
    );
    // An OS error is said once, not again as the error's source.
    let missing = with_out(&["--task", "text", "--text-file", "/nonexistent.txt"]);
    refused(TRAIN, &missing, "/nonexistent.txt: No such file");
    let stderr = run(TRAIN, &missing).stderr;
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
    assert!(!dir.path().join("run/run.json").exists());
}

#[test]
fn fine_tuning_refuses_a_model_whose_depth_is_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("model");
    std::fs::create_dir(&folder).unwrap();
    let mut config = HuginnConfig::tiny(32, 16, 2, (1, 1, 1));
    config.mean_recurrence = 1_000_000_000;
    std::fs::write(folder.join("config.json"), config.to_json()).unwrap();
    let args = strings(&["--task", "addition", "--init-from"]);
    let args = [args, vec![folder.display().to_string(), "--out".into()]].concat();
    let args = [args, vec![dir.path().join("run").display().to_string()]].concat();
    refused(
        TRAIN,
        &args,
        "config.json: mean_recurrence = 1000000000 is out of range",
    );
}

#[test]
fn huginn_bench_refuses_every_flag_beyond_its_range() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        ("handles", 1, 64),
        ("width", 1, MAX_WIDTH),
        ("heads", 1, MAX_HEADS),
        ("vocab-size", 1, MAX_VOCAB),
        ("mean-depth", 1, MAX_MEAN_DEPTH),
        ("backprop", 1, MAX_MEAN_DEPTH),
        ("seq-len", 1, MAX_SEQ_LEN),
        ("batch-size", 1, MAX_BATCH),
        ("steps", 1, MAX_STEPS),
        ("memory-depths", 1, MAX_EVAL_DEPTH),
        ("memory-steps", 1, MAX_STEPS),
    ];
    flags_beyond(BENCH, &flags, &dir.path().join("none"));
    for args in [
        &["--width", "65536", "--heads", "1024", "--layers", "1024,1024,1024"][..],
        &["--batch-size", "65536", "--seq-len", "65536"],
        &[
            "--vocab-size",
            "1048576",
            "--seq-len",
            "1048576",
            "--batch-size",
            "1024",
        ],
    ] {
        refused(BENCH, &strings(args), "GiB, this machine has");
    }
}

/// A valid configuration: the one each field is varied from.
fn config() -> RunConfig {
    let mut model = HuginnConfig::tiny(32, 16, 2, (1, 1, 1));
    model.block_size = 64;
    RunConfig {
        model,
        data: DataConfig::Addition {
            seed: 1,
            max_digits: 3,
            padded: false,
        },
        seed: 1,
        steps: 10,
        batch_size: 4,
        accumulation: 1,
        depth: DepthScheme::PoissonLognormalFilling { mean: 4, backprop: 2 },
        optimizer: OptimizerConfig::EllisAdam {
            beta_1: 0.9,
            beta_2: 0.95,
            weight_decay: 0.0,
            update_clipping: true,
        },
        schedule: Schedule::Cosine {
            peak_lr: 1e-3,
            warmup: 2,
            total_steps: 10,
            min_lr: 1e-4,
        },
        max_grad_norm: Some(1.0),
        eval_every: 5,
        eval_rows: 8,
        eval_depths: vec![1, 4],
        checkpoint_every: 5,
        keep_checkpoints: 2,
        devices: Vec::new(),
        init_from: None,
    }
}

/// A change to a configuration.
type Mutation = Box<dyn Fn(&mut RunConfig)>;

#[test]
fn every_configuration_field_beyond_its_range_is_an_error_naming_it() {
    config().validate().unwrap();
    let big = usize::MAX;
    let cases: Vec<(&str, Mutation)> = vec![
        ("seed", Box::new(|c| c.seed = u64::MAX)),
        ("steps", Box::new(|c| c.steps = u64::MAX)),
        ("batch_size", Box::new(move |c| c.batch_size = big)),
        ("accumulation", Box::new(|c| c.accumulation = 1_000_000_000)),
        ("eval_rows", Box::new(|c| c.eval_rows = 1_000_000_000)),
        ("eval_every", Box::new(|c| c.eval_every = u64::MAX)),
        ("checkpoint_every", Box::new(|c| c.checkpoint_every = 0)),
        ("keep_checkpoints", Box::new(move |c| c.keep_checkpoints = big)),
        ("eval_depths", Box::new(|c| c.eval_depths = vec![1, 1_000_000_000])),
        (
            "depth.mean",
            Box::new(|c| {
                c.depth = DepthScheme::PoissonLognormalFilling {
                    mean: 1_000_000_000,
                    backprop: 2,
                }
            }),
        ),
        (
            "depth.backprop",
            Box::new(move |c| {
                c.depth = DepthScheme::Fixed {
                    steps: 4,
                    backprop: big,
                }
            }),
        ),
        (
            "data.max_digits",
            Box::new(|c| {
                c.data = DataConfig::Addition {
                    seed: 1,
                    max_digits: 0,
                    padded: false,
                }
            }),
        ),
        (
            "schedule.warmup",
            Box::new(|c| {
                c.schedule = Schedule::Constant {
                    peak_lr: 1e-3,
                    warmup: u64::MAX,
                }
            }),
        ),
        ("model.n_embd", Box::new(|c| c.model.n_embd = 1 << 20)),
        ("model.vocab_size", Box::new(move |c| c.model.vocab_size = big)),
        ("model.block_size", Box::new(|c| c.model.block_size = 1_000_000_000_000)),
        (
            "model.n_layers_in_recurrent_block",
            Box::new(|c| c.model.n_layers_in_recurrent_block = 1_000_000_000),
        ),
        (
            "optimizer.weight_decay",
            Box::new(|c| {
                c.optimizer = OptimizerConfig::EllisAdam {
                    beta_1: 0.9,
                    beta_2: 0.95,
                    weight_decay: f64::NAN,
                    update_clipping: true,
                }
            }),
        ),
    ];
    for (field, set) in cases {
        let mut c = config();
        set(&mut c);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(&format!("{field} = ")), "{field}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
