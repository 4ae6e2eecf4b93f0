//! End-to-end runs of the `huginn` binary: the fixture checker's verdicts and exit codes, the
//! depth report, and one-line errors for bad input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::{Dtype, TensorView};

mod common;

fn huginn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_huginn")).args(args).output().unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/reference")
        .join(case)
}

/// A copy of a fixture folder whose expected tensors `edit` may change.
fn edited_fixture(edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors", "generate.json"] {
        std::fs::copy(fixture("tiny-a").join(file), dir.path().join(file)).unwrap();
    }
    let bytes = std::fs::read(fixture("tiny-a").join("expected.safetensors")).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: BTreeMap<_, _> = parsed
        .iter()
        .map(|(k, v)| (k.to_string(), (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("expected.safetensors")).unwrap();
    dir
}

#[test]
fn check_fixture_passes_every_shipped_fixture_and_summarises_as_json() {
    let dirs: Vec<String> = ["tiny-a", "tiny-c", "tiny-d"]
        .iter()
        .map(|c| fixture(c).display().to_string())
        .collect();
    let mut args = vec!["check-fixture", "--json"];
    args.extend(dirs.iter().map(String::as_str));
    let out = huginn(&args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["forward"]["checked"], 54);
    assert_eq!(summary["forward"]["failed"], 0);
    assert!(summary["forward"]["max_abs_err"].as_f64().unwrap() < 1e-4);
    assert_eq!(summary["train"]["checked"], 80 + 80 + 152);
    assert_eq!(summary["train"]["failed"], 0);
    // Tokens and steps of the fixed-depth, warm-started, adaptive-exit (every cache strategy),
    // speculative, batched and diffusion-style runs (these also their sampled logits and
    // log-sum-exps), and the token-by-token adaptive forward: every run is reproduced.
    assert_eq!(summary["generate"]["checked"], 230 + 2 * 4);
    assert_eq!(summary["generate"]["failed"], 0);
    assert_eq!(summary["generate"]["unsupported"], serde_json::json!([]));
}

#[test]
fn check_fixture_fails_on_a_wrong_value() {
    let dir = edited_fixture(|t| {
        let logits = &mut t.get_mut("logits_steps4").unwrap().2;
        let v = f32::from_le_bytes(logits[..4].try_into().unwrap()) + 0.01;
        logits[..4].copy_from_slice(&v.to_le_bytes());
    });
    let out = huginn(&["check-fixture", dir.path().to_str().unwrap()]);
    let (stdout, _) = text(&out);
    assert!(!out.status.success());
    let line = stdout.lines().find(|l| l.contains("logits_steps4")).unwrap();
    assert!(line.starts_with("FAIL") && line.contains("1.000e-2"), "{line}");
    assert!(stdout.contains("1 failed"), "{stdout}");
}

#[test]
fn check_fixture_fails_on_a_wrong_generated_token() {
    let dir = edited_fixture(|_| {});
    let path = dir.path().join("generate.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let run = json["runs"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r["name"] == "fixed_steps8_generate_minimal");
    run.unwrap()["new_token_ids"][0][5] = 0.into();
    std::fs::write(&path, json.to_string()).unwrap();
    let out = huginn(&["check-fixture", dir.path().to_str().unwrap()]);
    let (stdout, _) = text(&out);
    assert!(!out.status.success());
    let line = stdout
        .lines()
        .find(|l| l.contains("fixed_steps8_generate_minimal tokens"))
        .unwrap();
    assert!(line.starts_with("FAIL") && line.contains("tokens: got"), "{line}");
}

#[test]
fn check_fixture_fails_on_a_tensor_it_cannot_recompute() {
    let dir = edited_fixture(|t| {
        let e = t["e"].clone();
        t.insert("hidden_states_of_the_future".into(), e);
    });
    let out = huginn(&["check-fixture", "--json", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let summary: serde_json::Value = serde_json::from_str(text(&out).0.trim()).unwrap();
    assert_eq!(summary["forward"]["failed"], 1);
    let out = huginn(&["check-fixture", dir.path().to_str().unwrap()]);
    assert!(text(&out).0.contains("FAIL hidden_states_of_the_future"));
}

#[test]
fn depths_reports_every_power_of_two() {
    let model = fixture("tiny-d");
    let out = huginn(&[
        "depths",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1,2,3",
        "--max-depth",
        "8",
        "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let depths: Vec<u64> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["depth"].as_u64().unwrap())
        .collect();
    assert_eq!(depths, [1, 2, 4, 8]);
}

#[test]
fn generate_reproduces_the_reference_greedy_run() {
    let model = fixture("tiny-a");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "53,24,127,32,87,94",
        "--steps",
        "8",
    ];
    let out = huginn(&[&args[..], &["--max-new-tokens", "12"]].concat());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    // generate.json: fixed_steps8_generate_minimal
    assert_eq!(stdout.trim(), "108,34,91,121,84,66,17,87,61,82,77,125");
    let adaptive = [
        "--steps",
        "32",
        "--criterion",
        "kl",
        "--exit-threshold",
        "0.0005",
        "--max-new-tokens",
        "12",
    ];
    let out = huginn(&[&args[..5], &adaptive[..]].concat());
    let (stdout, stderr) = text(&out);
    // generate.json: adaptive_kl_0.0005_cache-full
    assert_eq!(stdout.trim(), "108,34,18,43,108,34,18,43,108,34,31,46");
    assert!(
        stderr.contains("steps per token: 12,12,11,7,12,12,11,7,12,16,11,16"),
        "{stderr}"
    );
    // Sampling is seeded; a stop token ends generation after it is emitted.
    let sampled = [
        &args[..],
        &[
            "--temperature",
            "1.0",
            "--top-k",
            "20",
            "--seed",
            "7",
            "--max-new-tokens",
            "12",
        ],
    ]
    .concat();
    let (first, second) = (text(&huginn(&sampled)).0, text(&huginn(&sampled)).0);
    assert_eq!(first, second);
    assert_eq!(first.trim().split(',').count(), 12);
    let out = huginn(&[&args[..], &["--max-new-tokens", "12", "--stop-token", "121"]].concat());
    assert_eq!(text(&out).0.trim(), "108,34,91,121");
    let out = huginn(&[&args[..], &["--top-p", "1.5"]].concat());
    assert!(text(&out).1.contains("--top-p must be in (0, 1] (got 1.5)"));
    let out = huginn(&[&args[..], &["--cache", "latest-m7-sideways"]].concat());
    assert!(text(&out).1.contains("unknown cache strategy"));
    let out = huginn(&[&args[..], &["--max-new-tokens", "200"]].concat());
    assert!(text(&out).1.contains("more than the model's context of 128"));
}

#[test]
fn bad_input_is_a_one_line_error() {
    let model = fixture("tiny-a");
    let model = model.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--device", "tpu", "depths", "--ids", "1"], "unknown device \"tpu\""),
        (
            &["depths", "--model", model, "--ids", "1,128"],
            "token id 128 is outside the vocabulary of 128",
        ),
        (
            &["depths", "--model", "/nonexistent", "--ids", "1"],
            "/nonexistent/config.json",
        ),
        (&["depths", "--ids", "1", "--depths", "0"], "outside 1..=32"),
        (&["check-fixture", "/nonexistent"], "/nonexistent"),
    ];
    for (args, needle) in cases {
        let out = huginn(args);
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    if !model::Backend::Cuda.compiled() {
        let (_, stderr) = text(&huginn(&["--device", "cuda", "depths", "--ids", "1"]));
        assert_eq!(
            stderr.trim(),
            "error: the cuda backend is not compiled into this binary; rebuild with `--features cuda`"
        );
    }
}

/// Values that would run forever, never fire, or not fit are refused up front, with the limit.
/// Each command's help describes that command (a description once slipped onto its
/// neighbour, taking chat's negative-number parsing with it), and a negative `chat --steps` is
/// a bad value of `--steps`, not an unknown flag.
#[test]
fn each_command_s_help_is_its_own() {
    for (command, own, other) in [
        ("chat", "An interactive conversation", "Accuracy by recurrence depth"),
        ("eval", "Accuracy by recurrence depth", "An interactive conversation"),
    ] {
        let (stdout, _) = text(&huginn(&[command, "--help"]));
        assert!(stdout.contains(own) && !stdout.contains(other), "{command}: {stdout}");
    }
    let tiny = fixture("tiny-a");
    let out = huginn(&["chat", "--model", tiny.to_str().unwrap(), "--steps", "-1"]);
    let (_, stderr) = text(&out);
    assert!(stderr.contains("'-1' for '--steps"), "{stderr}");
}

#[test]
fn absurd_generation_flags_are_refused_with_the_limit() {
    let model = fixture("tiny-a");
    let model = model.to_str().unwrap();
    let ids: Vec<String> = (0..120).map(|i| (i % 100).to_string()).collect();
    let ids = ids.join(",");
    let generate = ["generate", "--model", model, "--ids", &ids];
    let cases: [(&[&str], &str); 7] = [
        (&["--steps", "99999999999"], "--steps must be in 1..=1024"),
        (&["--steps", "0"], "--steps must be in 1..=1024"),
        (
            &["--criterion", "kl", "--exit-threshold=-1"],
            "--exit-threshold must be a number in [0, 1000000] (got -1)",
        ),
        (
            &["--criterion", "kl", "--exit-threshold", "NaN"],
            "--exit-threshold must be a number in [0, 1000000] (got NaN)",
        ),
        (
            &["--max-new-tokens", "9"],
            "the prompt has 120 tokens and --max-new-tokens is 9: 129 positions, more than the model's context of 128",
        ),
        (
            &["--max-new-tokens", "18446744073709551615"],
            "more than the model's context of 128",
        ),
        (
            &["--max-new-tokens", "4", "--speculate", "8", "--draft-steps", "2"],
            "and a lookahead of 8: 132 positions",
        ),
    ];
    for (flags, needle) in cases {
        let args: Vec<&str> = generate.iter().chain(flags).copied().collect();
        let out = huginn(&args);
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "{flags:?}");
        assert!(stderr.contains(needle), "{flags:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{flags:?}: {stderr}");
    }
    let (_, stderr) = text(&huginn(&["depths", "--ids", "1", "--max-depth", "5000"]));
    assert!(stderr.contains("--max-depth must be in 1..=1024"), "{stderr}");
}

#[test]
fn speculative_generation_equals_greedy_at_the_verify_depth() {
    let model = fixture("tiny-a");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "53,24,127,32,87,94",
        "--steps",
        "8",
        "--max-new-tokens",
        "12",
    ];
    let plain = huginn(&args);
    for extra in [
        &["--speculate", "4", "--draft-steps", "2"][..],
        &["--speculate", "1"][..],
    ] {
        let out = huginn(&[&args[..], extra].concat());
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        assert_eq!(stdout, text(&plain).0, "{extra:?}");
        assert!(stderr.contains("steps between tokens: "), "{stderr}");
    }
    // Speculation is greedy at a fixed depth: other settings are refused.
    for (extra, reason) in [
        (
            &["--speculate", "4", "--temperature", "0.7"][..],
            "--speculate decodes greedily",
        ),
        (&["--speculate", "0"][..], "--speculate must be in 1..="),
        (&["--draft-steps", "2"][..], "--speculate"),
    ] {
        let out = huginn(&[&args[..], extra].concat());
        assert!(!out.status.success(), "{extra:?}");
        assert!(text(&out).1.contains(reason), "{extra:?}: {}", text(&out).1);
    }
}

#[test]
fn half_precision_runs_on_the_cpu_and_stays_close_to_f32() {
    let model = fixture("tiny-a");
    let args = |dtype: &'static str| {
        [
            "--dtype",
            dtype,
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            "53,24,127,32,87,94",
            "--steps",
            "8",
            "--max-new-tokens",
            "12",
        ]
        .map(str::to_string)
    };
    let tokens = |dtype: &'static str| {
        let out = Command::new(env!("CARGO_BIN_EXE_huginn"))
            .args(args(dtype))
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{dtype}: {stderr}");
        stdout.trim().split(',').map(str::to_string).collect::<Vec<_>>()
    };
    let full = tokens("f32");
    for dtype in ["bf16", "f16"] {
        let half = tokens(dtype);
        assert_eq!(half.len(), 12, "{dtype}");
        assert_eq!(half[..4], full[..4], "{dtype}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_huginn"))
        .args(["--dtype", "f8", "generate", "--ids", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).1.contains("expected f32, f16 or bf16"), "{}", text(&out).1);
}

/// A valid generation through every cache strategy with an exit criterion that stops early,
/// with prompts that end at and around the cache's 64-position blocks: each answers (an
/// early-exiting token once left `always-last-m4` reading a slot shorter than the positions:
/// "Can't narrow … Size=64", exit 101).
#[test]
fn early_exits_with_every_cache_strategy_cross_the_cache_blocks() {
    let model = fixture("tiny-a");
    let model = model.to_str().unwrap();
    for (cache, len, steps) in [
        ("always-last-m4", 64, "32"),
        ("always-last-m4-compress-anchor", 60, "5"),
        ("always-last-m4-compress-anchor", 64, "32"),
        ("latest-m4", 63, "32"),
        ("available-m4-compress-s4", 65, "32"),
    ] {
        let ids: Vec<String> = (0..len).map(|i| ((i * 37) % 128).to_string()).collect();
        let ids = ids.join(",");
        let args = [
            "generate",
            "--model",
            model,
            "--ids",
            &ids,
            "--cache",
            cache,
            "--criterion",
            "argmax-stability",
            "--exit-threshold",
            "1e-9",
            "--steps",
            steps,
            "--max-new-tokens",
            "12",
        ];
        let out = huginn(&args);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{cache} {len}: {stderr}");
        assert_eq!(stdout.trim().split(',').count(), 12, "{cache} {len}: {stdout}");
    }
}

/// A diffusion headway past the context is refused at once by name (it once claimed 8.5 GB
/// and aborted; 2^64 − 1 overflowed).
#[test]
fn a_headway_past_the_context_is_a_one_line_error() {
    let model = fixture("tiny-a");
    for headway in ["2147483647", "18446744073709551615", "126"] {
        let started = std::time::Instant::now();
        let out = huginn(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            "1,2,3",
            "--sampler",
            "diffusion",
            "--headway",
            headway,
        ]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{headway}: {stderr}");
        assert!(
            stderr.contains(&format!("--headway must be in 1..=125 (got {headway})")),
            "{stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(started.elapsed().as_secs() < 20);
    }
}

/// Every numeric flag of `generate`, `chat` and `depths` at and beyond its range (0, −1, huge,
/// 1e9, NaN, inf, 2^64 − 1, 2^32, fractions), each a real process on a tiny model, under a
/// 2 GiB address-space limit and a 60 s deadline: it answers (exit 0) or refuses with one line
/// (exit 1 for a value out of range, 2 for one that does not parse); never a panic (101), a
/// signal (an allocation abort), or a hang.
#[test]
fn numeric_generation_flags_answer_or_refuse_in_one_line() {
    use std::io::Write;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let tiny = fixture("tiny-a");
    let tiny = tiny.to_str().unwrap().to_string();
    let chat_dir = common::folder(common::DEFAULT_IDS);
    let chat_model = chat_dir.path().to_str().unwrap().to_string();
    let values = [
        "0",
        "-1",
        "1e9",
        "NaN",
        "inf",
        "18446744073709551615",
        "4294967296",
        "99999999999999999999999",
        "0.5",
        "-inf",
        "1e-300",
        "2147483647",
    ];
    // The flags, and what else each run needs.
    let generate = ["generate", "--model", &tiny, "--ids", "1,2,3", "--max-new-tokens", "3"];
    let diffusion = [
        &generate[..],
        &["--sampler", "diffusion", "--max-diffusion-steps", "20"],
    ]
    .concat();
    let speculate = [&generate[..], &["--speculate", "2"]].concat();
    let depths = ["depths", "--model", &tiny, "--ids", "1,2,3", "--max-depth", "4"];
    let chat = ["chat", "--model", &chat_model, "--max-new-tokens", "3"];
    let decoding = [
        "--steps",
        "--exit-threshold",
        "--temperature",
        "--top-k",
        "--top-p",
        "--min-p",
        "--repetition-penalty",
        "--seed",
        "--max-new-tokens",
    ];
    let mut cases: Vec<(Vec<String>, &str)> = Vec::new();
    let mut value = 0;
    let mut add = |base: &[&str], flag: &'static str, count: usize, cases: &mut Vec<(Vec<String>, &str)>| {
        for _ in 0..count {
            // The flag replaces the base's value for it.
            let mut args: Vec<String> = Vec::new();
            let mut skip = false;
            for arg in base {
                if std::mem::take(&mut skip) {
                    continue;
                }
                skip = *arg == flag;
                if !skip {
                    args.push(arg.to_string());
                }
            }
            args.extend([flag.to_string(), values[value % values.len()].to_string()]);
            if flag == "--exit-threshold" {
                args.extend(["--criterion".into(), "kl".into()]);
            }
            cases.push((args, flag));
            value += 1;
        }
    };
    for flag in decoding {
        add(&generate, flag, 3, &mut cases);
    }
    for flag in ["--ids", "--stop-token"] {
        add(&generate, flag, 2, &mut cases);
    }
    for flag in [
        "--headway",
        "--inner-recurrence",
        "--ema-embeds",
        "--state-noise-mixing",
        "--exit-t",
        "--max-wavefront",
        "--max-diffusion-steps",
        "--init-scale",
    ] {
        add(&diffusion, flag, 2, &mut cases);
    }
    for flag in ["--speculate", "--draft-steps", "--accept-threshold"] {
        add(&speculate, flag, 2, &mut cases);
    }
    for flag in ["--max-depth", "--depths", "--top", "--seed", "--ids"] {
        add(&depths, flag, 2, &mut cases);
    }
    for flag in ["--steps", "--temperature", "--top-k", "--max-new-tokens"] {
        add(&chat, flag, 2, &mut cases);
    }
    // The issue's own: a headway of 2^31 − 1 once reached 8.5 GB and aborted.
    for (flag, value) in [("--headway", "2147483647"), ("--headway", "18446744073709551615")] {
        let mut args: Vec<String> = diffusion.iter().map(|s| s.to_string()).collect();
        args.extend([flag.to_string(), value.to_string()]);
        cases.push((args, flag));
    }
    let run = |(args, flag): &(Vec<String>, &str)| {
        // `ulimit -v`: an allocation beyond 2 GiB fails (and aborts) instead of swapping.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("ulimit -v 2097152 && exec \"$0\" \"$@\"")
            .arg(env!("CARGO_BIN_EXE_huginn"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // One chat turn, then the end of input.
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"hello\n");
        drop(stdin);
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("{flag}: {args:?} ran past 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let (_, stderr) = text(&out);
        let code = out.status.code();
        assert!(
            matches!(code, Some(0..=2)),
            "{flag}: {args:?} ended with {:?}: {stderr}",
            out.status
        );
        if code != Some(0) {
            assert_eq!(stderr.trim().lines().count(), 1, "{flag}: {args:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        }
    };
    // Two at a time: the machine that runs the suite may have two cores.
    let (left, right) = cases.split_at(cases.len() / 2);
    std::thread::scope(|scope| {
        scope.spawn(|| left.iter().for_each(run));
        right.iter().for_each(run);
    });
}

/// Shapes and counts whose memory can be computed are checked against the machine's before
/// anything is allocated (they aborted with an allocation failure), and counts have ranges.
#[test]
fn bench_generate_refuses_what_the_machine_cannot_hold() {
    for (flags, needle) in [
        (&["--width", "65536"][..], "the model's weights would take"),
        (&["--layers", "1,1000000000,1"][..], "the model's weights would take"),
        (&["--vocab-size", "1000000000"][..], "the model's weights would take"),
        (&["--batch", "100000"][..], "--batch must be in 1..=4096 (got 100000)"),
        (&["--runs", "1000000000"][..], "--runs must be in 1..=1000"),
        (&["--steps", "-1"][..], "invalid value '-1' for '--steps <STEPS>'"),
        (
            // 2^21 positions × 4100 slots of 2 × 256 floats: 17 TiB.
            &["--prompt-len", "1048576", "--new-tokens", "1048576", "--steps", "1024"][..],
            "the benchmark's KV cache would take",
        ),
    ] {
        let started = std::time::Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_huginn-bench-generate"))
            .args(flags)
            .output()
            .unwrap();
        let (_, stderr) = text(&out);
        assert!(matches!(out.status.code(), Some(1 | 2)), "{flags:?}: {stderr}");
        assert!(stderr.contains(needle), "{flags:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{flags:?}: {stderr}");
        assert!(started.elapsed().as_secs() < 30, "{flags:?}");
    }
}

/// `huginn eval` on two task files (text through the folder's tokenizer, and token ids) at two
/// depths and one exit: the table on stdout, `report.json` with every task and setting, the
/// same accuracies as the library gives, and an existing report left as it is.
#[test]
fn eval_reports_accuracy_by_depth_and_never_overwrites_a_report() {
    let dir = common::folder(common::DEFAULT_IDS);
    let work = tempfile::tempdir().unwrap();
    let text_task = work.path().join("words.jsonl");
    std::fs::write(
        &text_task,
        [
            r#"{"context": "Hello", "choices": [" world", " there", "!"], "gold": 0}"#,
            r#"{"context": "One, two,", "choices": [" three", " four"], "gold": 0}"#,
            r#"{"context": "abc ", "choices": ["def", "xyz"], "gold": 1}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let id_task = work.path().join("ids.jsonl");
    std::fs::write(
        &id_task,
        r#"{"context_ids": [1, 2, 3], "choice_ids": [[4, 5], [6], [7, 8, 9]], "gold": 2}"#,
    )
    .unwrap();
    let out = work.path().join("out");
    let tasks = format!("{},{}", text_task.display(), id_task.display());
    let args = [
        "eval",
        "--model",
        dir.path().to_str().unwrap(),
        "--tasks",
        &tasks,
        "--depths",
        "1,3",
        "--exit",
        "kl:0.01",
        "--out",
        out.to_str().unwrap(),
    ];
    let run = huginn(&args);
    let (stdout, stderr) = text(&run);
    assert!(run.status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 1 + 2 * 3, "{stdout}");
    assert!(
        stdout.lines().nth(2).unwrap().starts_with("words") && stdout.contains("r=3"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 6);
    // The library's accuracy for the id task at depth 3.
    let folder = folder::ModelFolder::open(dir.path(), &model::burn::prelude::Device::flex()).unwrap();
    let options = infer::eval::Options::default();
    let task = infer::eval::read_task(&id_task, &folder, &options).unwrap();
    let outcomes = infer::eval::evaluate(&folder, &task, &[3], &[], 8, &options, || {}).unwrap();
    let at_three = results
        .iter()
        .find(|r| r["task"] == "ids" && r["setting"] == serde_json::json!({"kind": "depth", "steps": 3}))
        .unwrap();
    assert_eq!(at_three["acc"], serde_json::json!(outcomes[0].acc));
    assert_eq!(at_three["mean_steps"], serde_json::json!(3.0));
    let written = std::fs::read(out.join("report.json")).unwrap();
    let again = huginn(&args);
    let (_, stderr) = text(&again);
    assert!(!again.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("an earlier report is kept"), "{stderr}");
    assert_eq!(std::fs::read(out.join("report.json")).unwrap(), written);
}

/// A generation task (token ids): the answer the model itself gives at depth 3 matches there,
/// a changed one does not, and the steps per new token are the depth.
#[test]
fn eval_scores_generation_tasks_by_exact_match() {
    let dir = common::folder(common::DEFAULT_IDS);
    let folder = folder::ModelFolder::open(dir.path(), &model::burn::prelude::Device::flex()).unwrap();
    let config = infer::adaptive::AdaptiveConfig::fixed(3, Default::default(), Default::default());
    let decoding = infer::adaptive::Decoding {
        stop_tokens: folder.stop_tokens.clone(),
        ..Default::default()
    };
    let prompts = [vec![5u32, 6, 7], vec![8, 9]];
    let own = infer::adaptive::generate_batch_with(&folder.model, &prompts, 4, config, &decoding).unwrap();
    let right = &own[0].tokens[..1];
    let wrong = [(own[1].tokens[0] + 1) % 200];
    let work = tempfile::tempdir().unwrap();
    let task = work.path().join("gen.jsonl");
    let lines = [
        serde_json::json!({"prompt_ids": prompts[0], "answer_ids": right}).to_string(),
        serde_json::json!({"prompt_ids": prompts[1], "answer_ids": wrong}).to_string(),
    ];
    std::fs::write(&task, lines.join("\n")).unwrap();
    let out = work.path().join("out");
    let run = huginn(&[
        "eval",
        "--model",
        dir.path().to_str().unwrap(),
        "--tasks",
        task.to_str().unwrap(),
        "--depths",
        "3",
        "--max-new-tokens",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&run);
    assert!(run.status.success(), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let result = &report["results"][0];
    assert_eq!(
        (&result["acc"], &result["questions"]),
        (&serde_json::json!(0.5), &serde_json::json!(2)),
        "{stdout}"
    );
    assert_eq!(result["max_steps"], serde_json::json!(3));
}

/// A bad task file, or a bad flag, is one line naming it, before any scoring or writing.
#[test]
fn eval_refuses_bad_tasks_and_flags_in_one_line() {
    let dir = common::folder(common::DEFAULT_IDS);
    let work = tempfile::tempdir().unwrap();
    let task = work.path().join("bad.jsonl");
    std::fs::write(&task, "{\"context\": \"Hi\", \"choices\": [\" a\", \" b\"], \"gold\": 0}\n{\"context\": \"Hi\", \"choices\": [\" a\"], \"gold\": 0}\n").unwrap();
    let out = work.path().join("out");
    let model = dir.path().to_str().unwrap();
    let task = task.to_str().unwrap();
    let out_dir = out.to_str().unwrap();
    for (extra, expected) in [
        (&[][..], "bad.jsonl:2: 1 choice(s)"),
        (&["--depths", "0"][..], "--depths must be in 1..="),
        (&["--exit", "kl"][..], "write CRITERION:THRESHOLD"),
        (&["--exit", "soon:1"][..], "soon"),
        (&["--exit", "kl:-1"][..], "--exit threshold"),
        (&["--exit", "none:1"][..], "never exits"),
        (&["--batch", "0"][..], "--batch must be in 1..="),
        (&["--limit", "0"][..], "--limit must be in 1..="),
    ] {
        let mut args = vec!["eval", "--model", model, "--tasks", task, "--out", out_dir];
        args.extend_from_slice(extra);
        let run = huginn(&args);
        let (_, stderr) = text(&run);
        assert!(!run.status.success(), "{extra:?}");
        assert_eq!(stderr.trim().lines().count(), 1, "{extra:?}: {stderr}");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
        assert!(!out.exists(), "{extra:?} wrote a report");
    }
}

/// The task files shipped in `tasks/` read and score (here on the tiny fixture model).
#[test]
fn the_shipped_task_files_are_valid() {
    let dir = common::folder(common::DEFAULT_IDS);
    let work = tempfile::tempdir().unwrap();
    let tasks = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tasks");
    for entry in std::fs::read_dir(&tasks).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "jsonl") {
            continue;
        }
        let out = work.path().join(path.file_stem().unwrap());
        let run = huginn(&[
            "eval",
            "--model",
            dir.path().to_str().unwrap(),
            "--tasks",
            path.to_str().unwrap(),
            "--depths",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]);
        let (stdout, stderr) = text(&run);
        assert!(run.status.success(), "{}: {stderr}", path.display());
        assert!(stdout.lines().count() >= 2, "{stdout}");
    }
}

/// `huginn quantize` writes a folder that `generate` opens, text files included, and that
/// generates what rounding the float folder at load (`--quantize`) generates; a folder that
/// exists, a quantized source and a bad width are refused in one line.
#[test]
fn quantize_writes_a_folder_that_generates_what_rounding_at_load_generates() {
    let dir = common::folder(common::DEFAULT_IDS);
    let source = dir.path().to_str().unwrap();
    let work = tempfile::tempdir().unwrap();
    for bits in ["8", "4"] {
        let out = work.path().join(format!("q{bits}"));
        let out_arg = out.to_str().unwrap();
        let made = huginn(&["quantize", "--model", source, "--out", out_arg, "--bits", bits]);
        assert!(made.status.success(), "{:?}", text(&made));
        assert!(out.join("tokenizer.json").exists());
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(
            config["quantization"]["bits"],
            serde_json::json!(bits.parse::<u8>().unwrap())
        );
        let generate = |model: &str, extra: &[&str]| {
            let mut args = vec![
                "generate",
                "--model",
                model,
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "6",
            ];
            args.extend(extra);
            let out = huginn(&args);
            assert!(out.status.success(), "{:?}", text(&out));
            out.stdout
        };
        assert_eq!(
            generate(out_arg, &[]),
            generate(source, &["--quantize", bits]),
            "{bits} bits"
        );

        let again = huginn(&["quantize", "--model", source, "--out", out_arg, "--bits", bits]);
        let (_, stderr) = text(&again);
        assert!(!again.status.success() && stderr.contains("not empty"), "{stderr}");
        let twice = huginn(&[
            "quantize",
            "--model",
            out_arg,
            "--out",
            work.path().join("x").to_str().unwrap(),
            "--bits",
            "4",
        ]);
        let (_, stderr) = text(&twice);
        assert!(!twice.status.success() && stderr.contains("already holds"), "{stderr}");
    }
    let bad = huginn(&[
        "quantize",
        "--model",
        source,
        "--out",
        work.path().join("y").to_str().unwrap(),
        "--bits",
        "3",
    ]);
    let (_, stderr) = text(&bad);
    assert!(!bad.status.success() && stderr.contains("3-bit"), "{stderr}");
    assert!(!work.path().join("y").exists());
}

/// A `quantize` run killed while writing (a real process, SIGKILLed at the moment its folder
/// is complete but not yet renamed) leaves no OUT, only its temporary folder beside it; the
/// next run into that OUT writes it and removes what the killed run left, but not the folder
/// of a run still alive.
#[cfg(target_os = "linux")]
#[test]
fn quantize_killed_while_writing_leaves_no_output_and_the_next_run_cleans_up() {
    use std::io::{BufRead, BufReader};
    let dir = common::folder(common::DEFAULT_IDS);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("q");
    let args = [
        "quantize",
        "--model",
        dir.path().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--bits",
        "8",
    ];
    let mut killed = std::process::Command::new(env!("CARGO_BIN_EXE_huginn"))
        .args(args)
        .env("HUGINN_PAUSE_AT", "quantize-before-rename")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(killed.stderr.take().unwrap());
    let paused = stderr.lines().map_while(Result::ok).any(|l| l.contains("paused at"));
    assert!(paused, "the run reached its pause point");
    killed.kill().unwrap();
    killed.wait().unwrap();
    let abandoned = work.path().join(format!(".q.partial-{}", killed.id()));
    assert!(
        abandoned.join("config.json").exists(),
        "the killed run wrote its temporary folder"
    );
    assert!(!out.exists(), "no OUT from a killed run");

    let alive = work.path().join(format!(".q.partial-{}", std::process::id()));
    std::fs::create_dir(&alive).unwrap();
    let made = huginn(&args);
    assert!(made.status.success(), "{:?}", text(&made));
    assert!(out.join("config.json").exists());
    assert!(!abandoned.exists(), "the killed run's folder is removed");
    assert!(alive.exists(), "a live process's folder is kept");
}
