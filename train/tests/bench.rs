//! `huginn-bench` on a tiny configuration: what it reports and in which form, never how fast.

use std::process::Command;

const TINY: [&str; 20] = [
    "--width",
    "16",
    "--heads",
    "2",
    "--layers",
    "1,1,1",
    "--vocab-size",
    "32",
    "--seq-len",
    "8",
    "--batch-size",
    "2",
    "--mean-depth",
    "2",
    "--backprop",
    "1",
    "--steps",
    "1",
    "--memory-depths",
    "2,6",
];

fn bench(flags: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_huginn-bench"))
        .args(flags)
        .output()
        .unwrap()
}

#[test]
fn the_bench_reports_speed_and_memory_of_each_configuration() {
    let output = bench(&[&TINY[..], &["--json"]].concat());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["tokens_per_step"], 16);
    assert_eq!(report["layers"], serde_json::json!([1, 1, 1]));
    let runs = report["runs"].as_array().unwrap();
    let labels: Vec<&str> = runs.iter().map(|r| r["depth"].as_str().unwrap()).collect();
    assert_eq!(labels, ["random r̄=2 k=1", "fixed r=2 k=1", "fixed r=6 k=1"]);
    assert_eq!(runs[2]["mean_depth"], 6.0);
    for run in runs {
        assert!(run["tokens_per_second"].as_f64().unwrap() > 0.0, "{run}");
        assert!(run["seconds_per_step"].as_f64().unwrap() > 0.0, "{run}");
        assert_eq!(
            run["peak_rss_bytes"].as_u64().is_some(),
            cfg!(target_os = "linux"),
            "{run}"
        );
        assert!(
            run["device_reserved_bytes"].is_null(),
            "the cpu backend has no pool: {run}"
        );
    }

    let output = bench(&TINY);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let table = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 6, "{table}");
    assert!(
        lines[0].starts_with("cpu · width 16 · heads 2 · layers 1,1,1"),
        "{table}"
    );
    for column in ["mean r", "s/step", "tokens/s", "peak RSS", "device pool"] {
        assert!(lines[1].contains(column), "{table}");
    }
    assert!(lines[4].starts_with("fixed r=6 k=1"), "{table}");
    assert!(lines[5].starts_with("memory r=6 vs r=2: peak RSS "), "{table}");
    assert!(
        lines[5].ends_with("no device pool reported by the cpu backend: RSS only"),
        "{table}"
    );
}

#[test]
fn the_bench_measures_tokens_per_second_per_device_count() {
    // The CPU backend has one device: two handles of it are two workers.
    let flags = [&TINY[..16], &["--devices", "cpu", "--handles", "2", "--json"]].concat();
    let output = bench(&flags);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["devices"], "cpu:0");
    let runs = report["runs"].as_array().unwrap();
    let column = |key: &str| runs.iter().map(|r| r[key].clone()).collect::<Vec<_>>();
    assert_eq!(column("depth"), ["cpu:0", "cpu:0,cpu:0"]);
    assert_eq!(column("workers"), [1, 2]);
    assert_eq!(column("tokens_per_step"), [16, 32]);
    assert_eq!(runs[0]["speedup"], 1.0);
    assert!(runs[1]["tokens_per_second"].as_f64().unwrap() > 0.0);

    let output = bench(&[&TINY[..16], &["--devices", "cpu", "--handles", "2"]].concat());
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(
        table.lines().next().unwrap().ends_with("= 16 tokens/step per device"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .last()
            .unwrap()
            .starts_with("tokens/s over one worker: 1 ×1.00, 2 ×"),
        "{table}"
    );
}

#[test]
fn the_bench_refuses_bad_input_in_one_line() {
    for (flags, message) in [
        (&["--width", "30", "--heads", "4"][..], "model shape"),
        (&["--memory-depths", "8,0"], "expected a whole number from 1 to 1024"),
        (&["--layers", "1,0,1"], "the core needs at least one"),
        (&["--devices", "cpu:3"], "no device cpu:3 on this machine"),
        (&["--devices", "cpu,cpu"], "device cpu:0 is listed twice"),
        (
            &["--handles", "2"],
            "--handles takes a positive count, and applies to --devices",
        ),
    ] {
        let output = bench(flags);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(message),
            "{flags:?}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}
