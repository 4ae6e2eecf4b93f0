//! `huginn-analysis` end to end on a tiny model: every subcommand, the report of a hand-made
//! run directory, and one-line errors on bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use analysis::capture::Capture;
use analysis::pca::Pca;
use common::{check_saved, decode_png};
use model::HuginnConfig;
use model::burn::prelude::Device;

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_huginn-analysis"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    stderr
}

/// The one-line error of a failing command.
fn fails(args: &[&str]) -> String {
    let out = cli(args);
    assert!(!out.status.success(), "{args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.starts_with("error: ") && stderr.trim_end().lines().count() == 1,
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// A tiny random model saved in `dir/model`.
fn tiny_model(dir: &Path) -> std::path::PathBuf {
    let model = dir.join("model");
    HuginnConfig::tiny(32, 16, 2, (1, 2, 1))
        .init(&Device::flex(), 3)
        .save_burn(&model)
        .unwrap();
    model
}

/// A run directory as `huginn-train` leaves it: a tiny addition model in `final/`, the data
/// part of `run.json`, and a metrics log with training and evaluation records.
fn tiny_run(dir: &Path) {
    let model = HuginnConfig::tiny(train::addition::VOCAB_SIZE, 16, 2, (1, 2, 1)).init(&Device::flex(), 3);
    model.save_burn(dir.join("final")).unwrap();
    let run = r#"{"data": {"kind": "addition", "seed": 1, "max_digits": 3, "padded": false}}"#;
    std::fs::write(dir.join("run.json"), run).unwrap();
    let mut metrics = String::new();
    for step in 1..=6u64 {
        metrics.push_str(&format!(
            "{{\"kind\":\"train\",\"step\":{step},\"loss\":{},\"lr\":0.001,\"grad_norm\":1.0,\"recurrence\":4,\
             \"backprop\":2,\"tokens_per_second\":100.0,\"elapsed_seconds\":{step}.0}}\n",
            3.0 / step as f64
        ));
        if step % 3 == 0 {
            for depth in [1, 2, 4, 8] {
                for split in ["test", "harder"] {
                    let accuracy = (step * depth) as f64 / 60.0;
                    metrics.push_str(&format!(
                        "{{\"kind\":\"eval\",\"step\":{step},\"split\":\"{split}\",\"depth\":{depth},\"loss\":{},\
                         \"accuracy\":{accuracy}}}\n",
                        2.0 / depth as f64
                    ));
                }
            }
            metrics.push_str(&format!(
                "{{\"kind\":\"monitor\",\"step\":{step},\"depth\":4,\"relative_residual\":0.1,\"token_correlation\":0.2}}\n"
            ));
        }
    }
    std::fs::write(dir.join("metrics.jsonl"), metrics).unwrap();
}

#[test]
fn report_writes_every_figure_a_gallery_and_the_numbers() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let run = dir.join("run");
    tiny_run(&run);
    let run_s = run.to_str().unwrap();
    let stderr = ok(&[
        "report",
        run_s,
        "--steps",
        "12",
        "--reference-steps",
        "40",
        "--shown",
        "3",
    ]);
    assert!(stderr.contains("wrote 6 figures"), "{stderr}");
    let out = run.join("report");
    for name in [
        "trajectories",
        "convergence",
        "exit-steps",
        "exit-steps-warm-start",
        "depth",
        "training",
    ] {
        let (w, h, _) = decode_png(&out.join(format!("{name}.png")));
        check_saved(&out.join(name), (w, h));
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    // The default prompt: the run's first test example of addition, with named tokens.
    let example = train::addition::AdditionTask {
        seed: 1,
        max_digits: 3,
        padded: false,
    }
    .example(train::addition::Split::Test, 0);
    let tokens: Vec<u64> = report["prompt"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(tokens, example.tokens.iter().map(|&t| t as u64).collect::<Vec<_>>());
    assert!(
        report["prompt"]["token_text"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "+")
    );
    let s = tokens.len() as u64;
    let counts = report["dynamics"]["counts"].as_object().unwrap();
    assert_eq!(counts.values().map(|c| c.as_u64().unwrap()).sum::<u64>(), s);
    assert_eq!(report["dynamics"]["tokens"].as_array().unwrap().len() as u64, s);
    assert_eq!(report["pca"]["components"], 6);
    let ratios = report["pca"]["explained_ratio"].as_array().unwrap();
    assert!(ratios.windows(2).all(|w| w[0].as_f64() >= w[1].as_f64()));
    assert_eq!(report["exits"].as_array().unwrap().len(), 4);
    for exit in report["exits"].as_array().unwrap() {
        let steps = exit["steps"].as_array().unwrap();
        assert_eq!(steps.len() as u64, s);
        assert!(steps.iter().all(|x| (1..=12).contains(&x.as_u64().unwrap())));
    }
    // KL and latent-diff, each cold and warm: the first token has no previous state to start
    // from, so both start it alike.
    let warm = report["warm_start_exits"].as_array().unwrap();
    assert_eq!(warm.len(), 4);
    for pair in warm.chunks(2) {
        assert!(pair[0]["rule"].as_str().unwrap().ends_with("cold"));
        assert!(pair[1]["rule"].as_str().unwrap().ends_with("warm"));
        assert_eq!(pair[0]["steps"][0], pair[1]["steps"][0]);
        for exit in pair {
            let steps = exit["steps"].as_array().unwrap();
            assert_eq!(steps.len() as u64, s);
            assert!(steps.iter().all(|x| (1..=12).contains(&x.as_u64().unwrap())));
        }
    }
    assert_eq!(report["final_distance"].as_array().unwrap().len() as u64, s);
    let depth = &report["depth_curves"][0];
    assert_eq!(depth["metric"], "accuracy");
    assert_eq!(depth["points"][3], serde_json::json!([8, 48.0 / 60.0]));
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    for figure in report["figures"].as_array().unwrap() {
        for key in ["png", "svg"] {
            assert!(html.contains(figure[key].as_str().unwrap()));
        }
        assert!(!figure["caption"].as_str().unwrap().is_empty());
        assert!(html.contains("<figcaption>"));
    }
    // The stored capture and basis are usable on their own.
    let capture = Capture::load(&out.join("capture")).unwrap();
    assert_eq!((capture.meta.steps, capture.meta.reference_steps), (12, Some(40)));
    assert_eq!(Pca::load(&out.join("pca.safetensors")).unwrap().components.len(), 6);
}

#[test]
fn subcommands_capture_fit_and_draw() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let run = dir.join("run");
    tiny_run(&run);
    let model = run.join("final");
    let (model_s, d) = (model.to_str().unwrap(), dir.to_str().unwrap());
    let a = format!("{d}/a");
    let b = format!("{d}/b");
    ok(&[
        "capture",
        "--model",
        model_s,
        "--ids",
        "1,2,10,3,4,11",
        "--steps",
        "10",
        "--reference-steps",
        "30",
        "--out",
        &a,
    ]);
    ok(&[
        "capture",
        "--model",
        model_s,
        "--ids",
        "5,6,10,7,11",
        "--steps",
        "10",
        "--zeros",
        "--raw",
        "--out",
        &b,
    ]);
    let capture = Capture::load(Path::new(&b)).unwrap();
    assert!(capture.raw.is_some() && capture.reference.is_none());
    let basis = format!("{d}/basis.safetensors");
    let stderr = ok(&[
        "pca",
        &a,
        &format!("{b}.safetensors"),
        "--components",
        "4",
        "--out",
        &basis,
    ]);
    assert!(stderr.contains("explained"), "{stderr}");
    assert_eq!(Pca::load(Path::new(&basis)).unwrap().samples, 11 * 6 + 11 * 5);
    let traj = format!("{d}/traj");
    let stderr = ok(&[
        "plot-trajectories",
        &a,
        "--basis",
        &basis,
        "--tokens",
        "0,2,5",
        "--out",
        &traj,
    ]);
    assert!(stderr.contains("fixed point"), "{stderr}");
    let (w, h, _) = decode_png(Path::new(&format!("{traj}.png")));
    assert_eq!((w, h), (2 * 330 + 120, 3 * 290 + 44), "3 tokens × 2 pairs");
    check_saved(Path::new(&traj), (w, h));
    let own = format!("{d}/own");
    ok(&["plot-trajectories", &b, "--out", &own]);
    let heat = format!("{d}/heat");
    ok(&["heatmap", &a, "--out", &heat]);
    let (w, h, _) = decode_png(Path::new(&format!("{heat}.png")));
    let svg = check_saved(Path::new(&heat), (w, h));
    assert!(svg.contains("after 30 iterations"));
    let curves = format!("{d}/curves");
    ok(&["training-curves", run.to_str().unwrap(), "--out", &curves]);
    for base in [curves.clone(), format!("{curves}-depth")] {
        let (w, h, _) = decode_png(Path::new(&format!("{base}.png")));
        check_saved(Path::new(&base), (w, h));
    }
}

#[test]
fn bad_input_is_a_one_line_error() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let run = dir.join("run");
    tiny_run(&run);
    let model = run.join("final");
    let (model_s, d) = (model.to_str().unwrap(), dir.to_str().unwrap());
    let out = format!("{d}/x");
    let err = fails(&[
        "capture",
        "--model",
        &format!("{d}/missing"),
        "--ids",
        "1",
        "--out",
        &out,
    ]);
    assert!(err.contains("missing"), "{err}");
    let err = fails(&["capture", "--model", model_s, "--ids", "1,99", "--out", &out]);
    assert!(err.contains("99"), "{err}");
    let err = fails(&["capture", "--model", model_s, "--prompt", "hello", "--out", &out]);
    assert!(err.contains("tokenizer"), "{err}");
    let err = fails(&[
        "capture",
        "--model",
        model_s,
        "--ids",
        "1",
        "--steps",
        "8",
        "--reference-steps",
        "4",
        "--out",
        &out,
    ]);
    assert!(err.contains("at least as long"), "{err}");
    let err = fails(&["report", d]);
    assert!(err.contains("final/"), "{err}");
    let err = fails(&["heatmap", &format!("{d}/nothing"), "--out", &out]);
    assert!(err.contains("nothing.json"), "{err}");
    let err = fails(&["--device", "cuda", "heatmap", "x", "--out", &out]);
    assert!(err.contains("cuda"), "{err}");
    std::fs::write(dir.join("empty.jsonl"), "").unwrap();
    let err = fails(&["training-curves", &format!("{d}/empty.jsonl"), "--out", &out]);
    assert!(err.contains("no training or evaluation records"), "{err}");
}

/// Every numeric flag beyond its range, and a capture whose states cannot fit the machine, is a
/// one-line error before any work (the values that once aborted on allocation or ran for
/// minutes: 10^9 steps, 2^64 − 1, NaN, an infinite scale).
#[test]
fn numeric_flags_beyond_their_range_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let model = model.to_str().unwrap();
    let out = dir.path().join("capture");
    let out = out.to_str().unwrap();
    let capture = |flag: &str, value: &str| {
        vec!["capture", "--model", model, "--ids", "1,2,3", "--out", out, flag, value]
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let mut cases = Vec::new();
    for value in ["0", "1025", "1000000000", "18446744073709551615", "-1", "NaN"] {
        cases.push(capture("--steps", value));
    }
    for value in ["0", "4097", "18446744073709551615"] {
        cases.push(capture("--reference-steps", value));
    }
    for value in ["-1", "101", "NaN", "inf", "1e300"] {
        cases.push(capture("--init-scale", value));
    }
    for (flag, value) in [
        ("--components", "0"),
        ("--components", "65"),
        ("--power-iterations", "65"),
        ("--subsample", "1"),
    ] {
        cases.push(
            ["pca", "x.safetensors", "--out", out, flag, value]
                .map(str::to_string)
                .to_vec(),
        );
    }
    for (flag, value) in [("--shown", "0"), ("--shown", "1000000000"), ("--components", "0")] {
        cases.push(
            ["plot-trajectories", "x", "--out", out, flag, value]
                .map(str::to_string)
                .to_vec(),
        );
    }
    for (flag, value) in [("--steps", "0"), ("--reference-steps", "1000000000"), ("--shown", "65")] {
        cases.push(["report", "run", flag, value].map(str::to_string).to_vec());
    }
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let stderr = fails(&args);
        let flag = args
            .iter()
            .find(|a| a.starts_with("--") && !["--model", "--ids", "--out"].contains(a));
        assert!(stderr.contains(flag.unwrap()), "{args:?}: {stderr}");
    }
    assert!(!Path::new(out).with_extension("safetensors").exists());
}

/// `eval-plots` draws a `huginn eval` report (two tasks, depths and exits) as accuracy against
/// depth and against mean steps, and refuses a report it cannot trust in one line.
#[test]
fn eval_plots_draw_a_report_and_refuse_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let depth = |task: &str, steps: u64, acc: f64| {
        serde_json::json!({"task": task, "setting": {"kind": "depth", "steps": steps}, "acc": acc,
            "mean_steps": steps as f64})
    };
    let exit = serde_json::json!({"task": "hard", "acc": 0.7, "mean_steps": 9.5,
        "setting": {"kind": "exit", "criterion": "kl", "threshold": 0.001, "max_steps": 32}});
    let results = vec![
        depth("easy", 1, 0.3),
        depth("easy", 8, 0.9),
        depth("hard", 8, 0.6),
        depth("hard", 32, 0.75),
        exit,
    ];
    let report = dir.path().join("report.json");
    std::fs::write(&report, serde_json::json!({"results": results}).to_string()).unwrap();
    let out = dir.path().join("plots/eval");
    ok(&["eval-plots", report.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let svg = check_saved(&dir.path().join("plots/eval-compute"), (860, 540));
    assert!(
        svg.contains("hard: exit kl &lt; 1e-3") || svg.contains("hard: exit kl < 1e-3"),
        "the exit is labelled"
    );
    check_saved(&dir.path().join("plots/eval-depth"), (860, 540));

    let bad = [
        (
            serde_json::json!({"results": [depth("easy", 1, 1.5)]}),
            "`acc` is not a number in [0, 1]",
        ),
        (
            serde_json::json!({"results": [{"task": "easy", "setting": {"kind": "depth", "steps": 0}, "acc": 0.5, "mean_steps": 1.0}]}),
            "`steps` of at least 1",
        ),
        (serde_json::json!({"results": []}), "no results"),
        (serde_json::json!({"accuracy": 1}), "not a huginn eval report"),
    ];
    for (content, expected) in bad {
        std::fs::write(&report, content.to_string()).unwrap();
        let err = fails(&["eval-plots", report.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(err.contains(expected) && err.contains("report.json"), "{err}");
    }
}

/// `activation-ranges` on a saved model: the table of every point ending in the f16 verdict,
/// the same as JSON; bad requests in one line.
#[test]
fn activation_ranges_reports_every_point_and_refuses_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let model = model.to_str().unwrap();
    let out = cli(&["activation-ranges", "--model", model, "--tokens", "9", "--steps", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    for point in [
        "scaled embedding",
        "adapter output",
        "MLP hidden",
        "residual + MLP",
        "logits",
    ] {
        assert!(table.contains(point), "{point} missing:\n{table}");
    }
    assert!(table.trim_end().ends_with("every activation fits f16: yes"), "{table}");
    let out = cli(&["activation-ranges", "--model", model, "--ids", "1,2,3", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["fits_f16"], true);
    assert_eq!(json["points"][0]["stage"], "embedding");
    for (args, expected) in [
        (vec!["activation-ranges"], "--model"),
        (
            vec!["activation-ranges", "--model", model, "--huginn-0125"],
            "--huginn-0125",
        ),
        (vec!["activation-ranges", "--model", model, "--dtype", "f16"], "f16"),
        (vec!["activation-ranges", "--model", model, "--ids", "1,32"], "32"),
        (vec!["activation-ranges", "--model", model, "--steps", "0"], "--steps"),
        (
            vec!["activation-ranges", "--model", model, "--tokens", "4097"],
            "--tokens",
        ),
        // quantization-error against a half type: another device's, and only f16 or bf16.
        (
            vec![
                "quantization-error",
                "--model",
                model,
                "--ids",
                "1,2,3",
                "--dtype",
                "f16",
            ],
            "--device wgpu",
        ),
        (
            vec![
                "quantization-error",
                "--model",
                model,
                "--ids",
                "1,2,3",
                "--dtype",
                "f32",
            ],
            "f32",
        ),
        (
            vec![
                "quantization-error",
                "--model",
                model,
                "--ids",
                "1,2,3",
                "--dtype",
                "f16",
                "--bits",
                "8",
            ],
            "--bits",
        ),
    ] {
        let err = fails(&args);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}
