//! `huginn-gpu-check` end to end on the CPU with tiny shapes: every stage runs in its own
//! process and lands in one report, and a failing stage is reported without stopping the rest.

use std::path::PathBuf;
use std::process::Command;

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/reference")
        .join(case)
}

fn check(fixtures: &[PathBuf], out: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_huginn-gpu-check"))
        .args([
            "--device",
            "cpu",
            "--small",
            "--train-steps",
            "2",
            "--scale-steps",
            "1",
            "--runs",
            "1",
        ])
        .args(["--new-tokens", "3", "--steps", "4", "--prompt-len", "8", "--out"])
        .arg(out)
        .arg("--fixtures")
        .args(fixtures)
        .output()
        .unwrap()
}

#[test]
fn every_stage_reports_and_a_failed_one_does_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let out = check(&[fixture("tiny-a")], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("0 failed"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("gpu-check.json")).unwrap()).unwrap();
    assert_eq!(report["device"], "cpu");
    assert!(report["parity"]["generate"]["checked"].as_u64().unwrap() > 0);
    assert_eq!(report["parity"]["train"]["failed"], 0);
    // The CPU takes bf16, the narrowest type tried first.
    assert_eq!(report["generate"]["dtype"], "bf16");
    assert_eq!(report["generate"]["figures"]["mean_steps_per_token"], 4.0);
    let limit = report["generate"]["limit_tokens_per_second"].as_f64().unwrap();
    assert!(limit.is_finite() && limit > 0.0);
    // 8 and 4 bits: fewer bytes per iteration, a higher limit.
    for bits in ["8", "4"] {
        let quantized = &report["quantized"][bits];
        assert_eq!(quantized["bits"], bits.parse::<u64>().unwrap(), "{quantized}");
        assert!(
            quantized["limit_tokens_per_second"].as_f64().unwrap() > limit,
            "{quantized}"
        );
    }
    assert!(stdout.contains("4-bit linears"), "{stdout}");
    assert!(report["train"]["result"]["tokens_per_second"].as_f64().unwrap() > 0.0);
    // The CPU backend has one device: the scaling stage trains on it and says so.
    assert_eq!(report["scale"]["devices"], 1);
    assert_eq!(report["scale"]["runs"][0]["speedup"], 1.0);
    assert!(
        stdout.contains("scale: one cpu device on this machine, nothing to scale"),
        "{stdout}"
    );

    // A folder that is not a fixture: parity fails with its reason, the rest still run.
    let dir = tempfile::tempdir().unwrap();
    let out = check(&[dir.path().join("missing")], dir.path());
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success());
    assert!(stdout.contains("parity: FAILED"), "{stdout}");
    assert!(stdout.contains("generate (bf16"), "{stdout}");
    assert!(stderr.contains("missing"), "{stderr}");
    assert!(
        stderr.lines().last().unwrap().starts_with("error: failed: parity"),
        "{stderr}"
    );
}
