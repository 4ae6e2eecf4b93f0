//! Whole runs on tiny models: resuming is bit-exact, checkpoints are complete and pruned, a
//! diverging run stops with its last good checkpoint, the final model is a Hugging Face folder,
//! a configuration file trains with flags overriding it, the CLI refuses bad input.

use std::path::Path;
use std::process::Command;

use burn::module::{ModuleMapper, Param};
use burn::prelude::*;
use model::{Huginn, HuginnConfig};
use train::chains;
use train::checkpoint::{self, CheckpointError, Checkpoints};
use train::data::DataConfig;
use train::depth::DepthScheme;
use train::metrics::{self, MetricsLog, Record};
use train::run::{OptimizerConfig, RunConfig, TrainError, Trainer};
use train::schedule::Schedule;

fn config(steps: u64, optimizer: OptimizerConfig, peak_lr: f64) -> RunConfig {
    let mut model = HuginnConfig::tiny(chains::VOCAB_SIZE, 16, 2, (1, 1, 1));
    model.block_size = chains::TRAIN_LEN;
    RunConfig {
        model,
        data: DataConfig::Chains { seed: 3, curriculum: 2 },
        seed: 9,
        steps,
        batch_size: 4,
        accumulation: 2,
        depth: DepthScheme::PoissonLognormalFilling { mean: 3, backprop: 2 },
        optimizer,
        schedule: Schedule::Cosine {
            peak_lr,
            warmup: 2,
            total_steps: steps,
            min_lr: peak_lr / 10.0,
        },
        max_grad_norm: Some(1.0),
        eval_every: 3,
        eval_rows: 8,
        eval_depths: vec![1, 4],
        checkpoint_every: 2,
        keep_checkpoints: 2,
        init_from: None,
        devices: Vec::new(),
    }
}

fn ellis() -> OptimizerConfig {
    OptimizerConfig::EllisAdam {
        beta_1: 0.9,
        beta_2: 0.95,
        weight_decay: 0.1,
        update_clipping: true,
    }
}

fn losses(dir: &Path) -> Vec<(u64, f64)> {
    metrics::read(&MetricsLog::jsonl_path(dir))
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Record::Train { step, loss, .. } => Some((step, loss)),
            _ => None,
        })
        .collect()
}

fn evals(dir: &Path) -> Vec<(u64, String, usize, f64)> {
    metrics::read(&MetricsLog::jsonl_path(dir))
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Record::Eval {
                step,
                split,
                depth,
                loss,
                ..
            } => Some((step, split, depth, loss)),
            _ => None,
        })
        .collect()
}

#[test]
fn resuming_continues_bit_exactly() {
    let device = Device::flex().autodiff();
    for optimizer in [
        ellis(),
        OptimizerConfig::AdamW {
            beta_1: 0.9,
            beta_2: 0.95,
            epsilon: 1e-8,
            weight_decay: 0.1,
        },
    ] {
        let straight = tempfile::tempdir().unwrap();
        let mut t = Trainer::create(straight.path(), config(8, optimizer.clone(), 3e-3), &device).unwrap();
        t.run(None, false).unwrap();
        let expected = losses(straight.path());
        assert_eq!(expected.len(), 8);
        assert!(straight.path().join("final/model.safetensors").exists());

        let split = tempfile::tempdir().unwrap();
        let mut t = Trainer::create(split.path(), config(8, optimizer.clone(), 3e-3), &device).unwrap();
        t.run(Some(4), false).unwrap();
        drop(t);
        // A crash after step 5 was logged but before its checkpoint: the log is cut back.
        let mut t = Trainer::resume(split.path(), &device).unwrap();
        assert_eq!(t.state().step, 4);
        t.run(Some(5), false).unwrap();
        drop(t);
        let checkpoints = Checkpoints::open(split.path(), 2).unwrap();
        std::fs::remove_dir_all(checkpoints.latest().unwrap().unwrap()).unwrap();
        let mut t = Trainer::resume(split.path(), &device).unwrap();
        assert_eq!(t.state().step, 4);
        t.run(None, false).unwrap();
        assert_eq!(losses(split.path()), expected, "{optimizer:?}");
        assert_eq!(evals(split.path()), evals(straight.path()));
        // Checkpoints: the newest two, complete.
        let kept: Vec<u64> = Checkpoints::open(split.path(), 2)
            .unwrap()
            .list()
            .unwrap()
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(kept, [6, 8]);
    }
}

#[test]
fn a_new_run_refuses_an_existing_directory_and_resume_needs_one() {
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::create(dir.path(), config(2, ellis(), 1e-3), &device).unwrap();
    t.run(None, false).unwrap();
    let err = Trainer::create(dir.path(), config(2, ellis(), 1e-3), &device)
        .err()
        .unwrap();
    assert!(matches!(err, TrainError::Exists(_)), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let err = Trainer::resume(empty.path(), &device).err().unwrap();
    assert!(err.to_string().ends_with("holds no run (no run.json)"), "{err}");
    // A leftover partial checkpoint (a kill mid-save) is ignored and removed.
    drop(t);
    let partial = dir.path().join("checkpoints/.partial-step-00000003");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("model.bpk"), b"torn").unwrap();
    let t = Trainer::resume(dir.path(), &device).unwrap();
    assert_eq!(t.state().step, 2);
    assert!(!partial.exists());
}

#[test]
fn a_diverging_run_stops_with_its_last_good_checkpoint() {
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(50, ellis(), 1e30);
    config.schedule = Schedule::Constant {
        peak_lr: 1e30,
        warmup: 0,
    };
    config.checkpoint_every = 1;
    let mut t = Trainer::create(dir.path(), config, &device).unwrap();
    let err = t.run(None, false).unwrap_err();
    let TrainError::NonFinite {
        step,
        checkpoint,
        set_aside,
        ..
    } = &err
    else {
        panic!("{err}");
    };
    let message = err.to_string();
    assert!(message.contains("non-finite"), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
    // The weights of step - 1 made this step non-finite: their checkpoint is moved aside, and
    // the one before is the last good one.
    let aside = set_aside.clone().unwrap_or_else(|| panic!("{message}"));
    assert!(aside.ends_with(format!("step-{:08}.non-finite", step - 1)), "{message}");
    match step - 2 {
        0 => assert!(checkpoint.is_none(), "{message}"),
        good => assert!(
            checkpoint.clone().unwrap().ends_with(format!("step-{good:08}")),
            "{message}"
        ),
    }
    // Every finite step was logged; none after.
    assert_eq!(losses(dir.path()).len() as u64, step - 1);
}

/// Multiplies every weight by a factor, into tensors of their own (not the lazily read bytes
/// of the checkpoint they came from, which the test replaces).
struct Scale(f64);

impl ModuleMapper for Scale {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let factor = self.0;
        param.map(|t| {
            let device = t.device();
            Tensor::from_data(t.into_data(), &device).mul_scalar(factor)
        })
    }
}

#[test]
fn a_checkpoint_is_good_only_if_its_weights_are_finite_and_make_a_finite_step() {
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(5, ellis(), 1e-3);
    config.checkpoint_every = 1;
    config.keep_checkpoints = 10;
    let mut t = Trainer::create(dir.path(), config.clone(), &device).unwrap();
    t.run(Some(3), false).unwrap();
    drop(t);
    let checkpoints = Checkpoints::open(dir.path(), 10).unwrap();
    let newest = checkpoints.latest().unwrap().unwrap();
    let peak = config.schedule.peak_lr();
    let (model, _, state) = checkpoint::load(&newest, &device, |m| config.optimizer.init(m, peak)).unwrap();
    let optim = config.optimizer.init(&model, peak);
    // Non-finite weights are never written.
    let err = checkpoints
        .save(&model.clone().map(&mut Scale(f64::NAN)), &optim, &state)
        .unwrap_err();
    assert!(matches!(err, CheckpointError::NonFinite { step: 3 }), "{err}");
    // Finite weights so large that the next step overflows, written intact as step 3's.
    checkpoints.save(&model.map(&mut Scale(1e30)), &optim, &state).unwrap();
    let err = Trainer::resume(dir.path(), &device)
        .unwrap()
        .run(None, false)
        .unwrap_err();
    let TrainError::NonFinite {
        step: 4,
        checkpoint: Some(good),
        set_aside: Some(aside),
        ..
    } = &err
    else {
        panic!("{err}");
    };
    assert!(good.ends_with("step-00000002"), "{err}");
    assert!(aside.ends_with("step-00000003.non-finite"), "{err}");
    // The next resume (a new process, as after the error) starts from the good one and trains
    // to the end.
    let resumed = Command::new(env!("CARGO_BIN_EXE_huginn-train"))
        .arg("--resume")
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("at step 2 from"), "{stderr}");
    assert_eq!(losses(dir.path()).len(), 5);
}

#[test]
fn a_second_trainer_in_the_same_directory_is_refused() {
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let first = Trainer::create(dir.path(), config(2, ellis(), 1e-3), &device).unwrap();
    let err = Trainer::resume(dir.path(), &device).err().unwrap();
    assert!(
        err.to_string().contains("is in use by another training process"),
        "{err}"
    );
    drop(first);
    Trainer::resume(dir.path(), &device).unwrap();
}

#[test]
fn the_final_model_is_a_hugging_face_folder() {
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::create(dir.path(), config(2, ellis(), 1e-3), &device).unwrap();
    t.run(None, false).unwrap();
    let folder = dir.path().join("final");
    assert!(folder.join("config.json").exists() && folder.join("model.safetensors").exists());
    let loaded = Huginn::from_pretrained(&folder, &Device::flex()).unwrap();
    let ids = loaded.tokens(&[vec![1, 2, 3, 4, 5]]).unwrap();
    let logits = |m: &Huginn| {
        m.forward(ids.clone(), 3)
            .logits
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    assert_eq!(logits(&loaded), logits(&t.model()));
}

/// A text run's `final/` is a whole Hugging Face folder: the weights, the tokenizer and its
/// config, opened and run as `huginn generate --model RUN/final --prompt …` does.
#[test]
fn a_text_run_final_folder_opens_with_its_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let flags = "--task text --vocab-size 300 --seq-len 32 --steps 2 --width 16 --heads 2 --layers 1,1,1 \
                 --batch-size 2 --eval-rows 2 --mean-depth 2 --backprop 1 --quiet --out";
    let status = Command::new(env!("CARGO_BIN_EXE_huginn-train"))
        .args(flags.split_whitespace())
        .arg(&out)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let folder = folder::ModelFolder::open(out.join("final"), &Device::flex()).unwrap();
    assert!(folder.tokenizer.is_some());
    let eos = folder
        .tokenizer
        .as_ref()
        .unwrap()
        .token_to_id(train::text::END_OF_TEXT)
        .unwrap();
    assert!(folder.stop_tokens.contains(&eos), "{:?}", folder.stop_tokens);
    let prompt = folder.encode("ROMEO:").unwrap();
    let generated = infer::greedy::generate(&folder.model, &prompt, 4, 2, infer::warm_start::WarmStart::Cold).unwrap();
    assert_eq!(generated.tokens.len(), 4);
    assert_eq!(
        std::fs::read(out.join("final/tokenizer.json")).unwrap(),
        std::fs::read(out.join("tokenizer.json")).unwrap()
    );
}

#[test]
fn a_config_file_trains_with_a_flag_overriding_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = config(50, ellis(), 1e-3);
    let path = dir.path().join("experiment.toml");
    std::fs::write(&path, file.to_toml().unwrap()).unwrap();
    let out = dir.path().join("run");
    let output = Command::new(env!("CARGO_BIN_EXE_huginn-train"))
        .arg("--config")
        .arg(&path)
        .args(["--steps", "2", "--quiet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // The flag changed the steps and the schedule's length; everything else is the file's.
    let expected = RunConfig {
        steps: 2,
        schedule: Schedule::Cosine {
            peak_lr: 1e-3,
            warmup: 2,
            total_steps: 2,
            min_lr: 1e-4,
        },
        ..file
    };
    assert_eq!(RunConfig::from_toml_file(&out.join("run.toml")).unwrap(), expected);
    let json: RunConfig = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(json, expected);
    assert_eq!(losses(&out).len(), 2);
    assert!(Huginn::from_pretrained(out.join("final"), &Device::flex()).is_ok());
}

#[test]
fn the_sample_config_is_the_default_run() {
    let print = |flags: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_huginn-train"))
            .args(flags)
            .arg("--print-config")
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/chains.toml");
    assert_eq!(print(&["--config", sample]), print(&[]));
    // The pointer-chains sample is the demo's recipe, written out as flags.
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/pointers.toml");
    let flags = [
        "--task",
        "pointers",
        "--layers",
        "1,1,1",
        "--mean-depth",
        "16",
        "--curriculum",
        "800",
        "--optimizer",
        "adamw",
        "--lr",
        "0.002",
        "--weight-decay",
        "0.01",
        "--eval-every",
        "500",
        "--checkpoint-every",
        "500",
    ];
    let printed = print(&["--config", sample]);
    assert_eq!(printed, print(&flags));
    assert!(printed.contains("kind = \"pointers\""), "{printed}");
}

#[test]
fn the_cli_trains_resumes_and_rejects_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let bin = env!("CARGO_BIN_EXE_huginn-train");
    let common = [
        "--width",
        "16",
        "--heads",
        "2",
        "--layers",
        "1,1,1",
        "--batch-size",
        "4",
        "--eval-rows",
        "8",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "2",
        "--quiet",
        "--mean-depth",
        "2",
        "--backprop",
        "1",
    ];
    let status = Command::new(bin)
        .args(["--task", "addition", "--max-digits", "2", "--steps", "3", "--out"])
        .arg(&out)
        .args(common)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let config: RunConfig = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(config.eval_depths, [1, 2, 4, 8, 16]);
    assert!(out.join("metrics.csv").exists() && out.join("final/config.json").exists());

    let again = Command::new(bin).arg("--out").arg(&out).args(common).output().unwrap();
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already holds a run; pass --resume"), "{stderr}");
    let resumed = Command::new(bin)
        .arg("--out")
        .arg(&out)
        .arg("--resume")
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));

    let typo = dir.path().join("typo.toml");
    std::fs::write(
        &typo,
        crate::config(2, ellis(), 1e-3)
            .to_toml()
            .unwrap()
            .replace("n_embd", "n_emdb"),
    )
    .unwrap();
    let mistyped = dir.path().join("mistyped.toml");
    std::fs::write(&mistyped, "steps = \"many\"\n").unwrap();
    let (typo, mistyped) = (typo.to_str().unwrap(), mistyped.to_str().unwrap());
    for (flags, message) in [
        (vec!["--config", typo], "typo.toml: unknown key `model.n_emdb`"),
        (
            vec!["--config", mistyped],
            "mistyped.toml: line 1: invalid type: string",
        ),
        (vec!["--config", typo, "--resume"], "cannot be used with"),
        (vec!["--layers", "1,0,1"], "the core needs at least one"),
        (vec!["--lr=-1"], "--lr must be a positive number"),
        (vec!["--device", "tpu"], "tpu"),
        (
            vec!["--task", "text", "--text-file", "/nonexistent.txt"],
            "/nonexistent.txt",
        ),
        (vec!["--width", "30", "--heads", "4"], "model shape"),
    ] {
        let output = Command::new(bin)
            .arg("--out")
            .arg(dir.path().join("bad"))
            .args(&flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(message),
            "{flags:?}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
}
