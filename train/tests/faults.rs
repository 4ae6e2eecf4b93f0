//! Fault injection on real `huginn-train` processes: each run is SIGKILLed at a named moment of a
//! checkpoint write, a pruning, a log write or the final export (`HUGINN_PAUSE_AT`, see
//! `model::pause`), or has a checkpoint damaged on disk, and is then resumed to the end. The
//! result is compared with the same run done straight through:
//! - the final model is byte-identical;
//! - every logged line is byte-identical, but for the two wall-clock fields
//!   (`tokens_per_second`, `elapsed_seconds`), which no two runs share;
//! - the bytes logged before the kill, up to the checkpoint resumed from, are kept unchanged;
//! - every checkpoint left loads, and one that does not (torn, a byte flipped, a file from
//!   another checkpoint) is skipped with a message;
//! - a damaged metrics log is rebuilt from the other, and no row is lost;
//! - a second trainer on the same run directory is refused while the first lives, killed or not.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use burn::prelude::*;
use train::checkpoint::{self, Checkpoints};
use train::metrics::MetricsLog;
use train::run::RunConfig;

const BIN: &str = env!("CARGO_BIN_EXE_huginn-train");

/// 12 steps of a tiny addition model; checkpoints at 3, 6, 9, 12, the newest two kept, so
/// pruning happens at steps 9 and 12.
fn flags(out: &Path) -> Vec<String> {
    let flags = "--task addition --max-digits 2 --steps 12 --width 16 --heads 2 --layers 1,1,1 \
                 --batch-size 4 --eval-rows 8 --eval-every 4 --checkpoint-every 3 --keep 2 \
                 --mean-depth 2 --backprop 1 --quiet --out";
    let mut flags: Vec<String> = flags.split_whitespace().map(String::from).collect();
    flags.push(out.display().to_string());
    flags
}

fn run(args: &[String]) -> Output {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn resume(dir: &Path) -> String {
    let out = run(&["--resume".to_string(), "--out".into(), dir.display().to_string()]);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The run done straight through, once for all tests.
fn straight() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        run(&flags(&dir.path().join("run")));
        dir
    })
    .path()
    .join("run")
    .leak()
}

/// Starts a new run that stops at `point` (its `nth` time), and SIGKILLs it there.
fn killed_at(point: &str, nth: usize) -> tempfile::TempDir {
    let (dir, mut child) = paused_at(point, nth);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    dir
}

/// Starts a new run and returns it waiting at `point` (its `nth` time), alive.
fn paused_at(point: &str, nth: usize) -> (tempfile::TempDir, Child) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(flags(&dir.path().join("run")))
        .env("HUGINN_PAUSE_AT", format!("{point}:{nth}"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wanted = format!("paused at {point}");
    loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) if line == wanted => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                panic!("the run never reached {point}:{nth} ({e}); status {:?}", child.wait());
            }
        }
    }
    (dir, child)
}

fn jsonl(dir: &Path) -> Vec<u8> {
    std::fs::read(MetricsLog::jsonl_path(dir)).unwrap()
}

fn csv(dir: &Path) -> Vec<u8> {
    std::fs::read(MetricsLog::csv_path(dir)).unwrap()
}

/// A JSON line with the values of the wall-clock fields blanked.
fn without_clock(line: &str) -> String {
    let mut line = line.to_string();
    for field in ["\"tokens_per_second\":", "\"elapsed_seconds\":"] {
        if let Some(start) = line.find(field).map(|i| i + field.len()) {
            let end = line[start..].find([',', '}']).map_or(line.len(), |e| start + e);
            line.replace_range(start..end, "_");
        }
    }
    line
}

/// CSV row with the wall-clock columns (8th and 9th) blanked.
fn csv_without_clock(line: &str) -> String {
    let mut cells: Vec<&str> = line.split(',').collect();
    if cells.len() > 8 && cells[0] == "train" {
        cells[7] = "_";
        cells[8] = "_";
    }
    cells.join(",")
}

/// The first lines of `bytes` whose records are of steps up to `step` (the CSV header
/// counted), as bytes.
fn kept_prefix(bytes: &[u8], step: u64, csv: bool) -> &[u8] {
    let mut end = 0;
    for (i, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        if !line.ends_with(b"\n") {
            break;
        }
        let text = String::from_utf8_lossy(line);
        let line_step = if csv {
            if i == 0 {
                0
            } else {
                text.split(',').nth(1).unwrap().parse::<u64>().unwrap()
            }
        } else {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            v["step"].as_u64().unwrap()
        };
        if line_step > step {
            break;
        }
        end += line.len();
    }
    &bytes[..end]
}

/// The step a resume reports starting from (0 from the start).
fn resumed_step(stderr: &str) -> u64 {
    let line = stderr.lines().find(|l| l.starts_with("resuming")).unwrap();
    match line.split(" at step ").nth(1) {
        Some(rest) => rest.split_whitespace().next().unwrap().parse().unwrap(),
        None => 0,
    }
}

/// Every checkpoint of `dir` loads, and nothing half-written is left.
fn checkpoints_load(dir: &Path) -> Vec<u64> {
    let config: RunConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap();
    let device = Device::flex().autodiff();
    let peak = config.schedule.peak_lr();
    let list = Checkpoints::open(dir, config.keep_checkpoints).unwrap().list().unwrap();
    for (step, path) in &list {
        let (_, _, state) = checkpoint::load(path, &device, |m| config.optimizer.init(m, peak)).unwrap();
        assert_eq!(state.step, *step);
    }
    let leftovers: Vec<PathBuf> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with('.')
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    list.into_iter().map(|(s, _)| s).collect()
}

/// Resumes the killed run in `dir` to the end and checks it against the straight run.
fn resumes_to_the_straight_result(dir: &Path) -> String {
    let (before_jsonl, before_csv) = (jsonl(dir), csv(dir));
    let stderr = resume(dir);
    let from = resumed_step(&stderr);
    let want = straight();
    assert_eq!(
        std::fs::read(dir.join("final/model.safetensors")).unwrap(),
        std::fs::read(want.join("final/model.safetensors")).unwrap(),
        "the final model"
    );
    for (got, want, clock) in [
        (jsonl(dir), jsonl(want), without_clock as fn(&str) -> String),
        (csv(dir), csv(want), csv_without_clock),
    ] {
        let got = String::from_utf8(got).unwrap();
        let want = String::from_utf8(want).unwrap();
        let got: Vec<String> = got.lines().map(clock).collect();
        let want: Vec<String> = want.lines().map(clock).collect();
        assert_eq!(got, want);
    }
    // What was logged before the kill, up to the checkpoint, is still there byte for byte.
    assert!(jsonl(dir).starts_with(kept_prefix(&before_jsonl, from, false)));
    assert!(csv(dir).starts_with(kept_prefix(&before_csv, from, true)));
    assert_eq!(checkpoints_load(dir), [9, 12]);
    stderr
}

/// Each run killed at `(point, nth)` resumes from step `from` to the straight run's result.
fn each_killed_and_resumed(cases: &[(&str, usize, u64)]) {
    for &(point, nth, from) in cases {
        let dir = killed_at(point, nth);
        let run = dir.path().join("run");
        let stderr = resumes_to_the_straight_result(&run);
        assert_eq!(resumed_step(&stderr), from, "{point}: {stderr}");
    }
}

#[test]
fn killed_while_writing_a_checkpoint() {
    each_killed_and_resumed(&[
        ("checkpoint-after-model", 2, 3),
        ("checkpoint-before-rename", 2, 3),
        ("checkpoint-after-rename", 2, 6),
    ]);
}

#[test]
fn killed_while_pruning_or_logging_or_exporting() {
    each_killed_and_resumed(&[
        // Step 9's checkpoint is in place, step 3's renamed for deletion and not yet deleted.
        ("prune-after-rename", 1, 9),
        // The 5th record (step 4's first evaluation): its JSON line written, its CSV row not.
        ("metrics-between-files", 5, 3),
        // Every step done, the final folder written beside its place.
        ("final-before-rename", 1, 12),
    ]);
}

#[test]
fn a_damaged_newest_checkpoint_is_skipped_for_the_one_before() {
    // Killed right after step 9's checkpoint: it and step 6's are on disk.
    let dir = killed_at("prune-after-rename", 1);
    let run = dir.path().join("run");
    let newest = run.join("checkpoints/step-00000009");
    let model = newest.join("model.bpk");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    // An empty step directory (what deleting without renaming first could leave).
    std::fs::create_dir(run.join("checkpoints/step-00000010")).unwrap();
    let stderr = resumes_to_the_straight_result(&run);
    assert_eq!(resumed_step(&stderr), 6, "{stderr}");
    for step in ["step-00000010", "step-00000009"] {
        let line = stderr
            .lines()
            .find(|l| l.contains(step))
            .unwrap_or_else(|| panic!("{stderr}"));
        assert!(
            line.starts_with("skipped a checkpoint that does not load: ")
                && line.ends_with(&format!(
                    "; moved it to {}",
                    run.join("checkpoints").join(format!("{step}.unreadable")).display()
                )),
            "{line}"
        );
    }
    // The damaged bytes are kept, aside.
    assert_eq!(
        std::fs::read(run.join("checkpoints/step-00000009.unreadable/model.bpk"))
            .unwrap()
            .len(),
        bytes.len() / 2
    );
}

#[test]
fn no_loadable_checkpoint_is_an_error_that_changes_nothing() {
    let dir = killed_at("checkpoint-after-rename", 2);
    let run = dir.path().join("run");
    for step in ["step-00000003", "step-00000006"] {
        std::fs::write(run.join("checkpoints").join(step).join("state.json"), b"{").unwrap();
    }
    let (before_jsonl, before_csv) = (jsonl(&run), csv(&run));
    let out = Command::new(BIN)
        .arg("--resume")
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no checkpoint in") && stderr.contains("they are left as they are"),
        "{stderr}"
    );
    // Mesa's loader warns on stderr where XDG_RUNTIME_DIR is unset (CI sets one); not ours.
    let ours = stderr.lines().filter(|l| !l.contains("XDG_RUNTIME_DIR")).count();
    assert_eq!(ours, 1, "{stderr}");
    assert_eq!((jsonl(&run), csv(&run)), (before_jsonl, before_csv));
    assert!(run.join("checkpoints/step-00000006").exists());
}

/// Damage done to a run directory (or its checkpoints) on disk.
type Damage = dyn Fn(&Path);

/// The run killed right after step 9's checkpoint (steps 6 and 9 on disk), copied into a fresh
/// directory for each of `damages`, damaged so, and resumed: step 9's checkpoint is skipped
/// with a one-line message and the run ends as the straight one.
fn skipped_after(damages: &[(&str, &Damage)]) {
    let killed = killed_at("prune-after-rename", 1);
    for (what, damage) in damages {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        copy_dir(&killed.path().join("run"), &run);
        damage(&run.join("checkpoints"));
        let stderr = resumes_to_the_straight_result(&run);
        assert_eq!(resumed_step(&stderr), 6, "{what}: {stderr}");
        let line = stderr
            .lines()
            .find(|l| l.contains("step-00000009"))
            .unwrap_or_else(|| panic!("{what}: {stderr}"));
        assert!(
            line.starts_with("skipped a checkpoint that does not load: ") && line.ends_with("step-00000009.unreadable"),
            "{what}: {line}"
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        match path.is_dir() {
            true => copy_dir(&path, &target),
            false => {
                std::fs::copy(&path, &target).unwrap();
            }
        }
    }
}

/// Step 9's checkpoint in the checkpoints folder `c`.
fn newest(c: &Path) -> PathBuf {
    c.join("step-00000009")
}

/// Flips every bit of the byte at the middle of `path` (a weight, a moment: still a file that
/// parses).
fn flip_middle_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_checkpoint_whose_files_do_not_match_their_checksums_is_skipped() {
    skipped_after(&[
        ("a byte flipped in model.bpk", &|c| {
            flip_middle_byte(&newest(c).join("model.bpk"))
        }),
        ("a byte flipped in optimizer.bpk", &|c| {
            flip_middle_byte(&newest(c).join("optimizer.bpk"))
        }),
        ("model.bpk of step 6", &|c| {
            std::fs::copy(c.join("step-00000006/model.bpk"), newest(c).join("model.bpk")).unwrap();
        }),
        ("state.json edited", &|c| {
            let path = newest(c).join("state.json");
            let text = std::fs::read_to_string(&path).unwrap();
            let edited = text.replace("\"batches\": 9", "\"batches\": 10");
            assert_ne!(text, edited);
            std::fs::write(&path, edited).unwrap();
        }),
        ("checksums.json removed", &|c| {
            std::fs::remove_file(newest(c).join("checksums.json")).unwrap();
        }),
    ]);
}

/// A run written before checkpoints carried checksums (none of its checkpoints has a
/// `checksums.json`) still resumes, from its newest checkpoint, unverified and saying so; the
/// checkpoints it writes from then on carry checksums.
#[test]
fn a_run_from_before_checksums_resumes_unverified_and_says_so() {
    let killed = killed_at("prune-after-rename", 1);
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    copy_dir(&killed.path().join("run"), &run);
    for entry in std::fs::read_dir(run.join("checkpoints")).unwrap() {
        let manifest = entry.unwrap().path().join("checksums.json");
        if manifest.exists() {
            std::fs::remove_file(manifest).unwrap();
        }
    }
    let stderr = resumes_to_the_straight_result(&run);
    assert_eq!(resumed_step(&stderr), 9, "{stderr}");
    assert!(stderr.contains("predate checksums"), "{stderr}");
    assert!(!stderr.contains("skipped a checkpoint"), "{stderr}");
}

#[test]
fn a_damaged_metrics_log_is_rebuilt_from_the_other_and_no_row_is_lost() {
    // Killed after step 9's checkpoint: the logs hold steps 1..=9 and two evaluations.
    let killed = killed_at("prune-after-rename", 1);
    let cases: [(&str, &Damage); 3] = [
        ("metrics.jsonl emptied", &|run| {
            std::fs::write(MetricsLog::jsonl_path(run), b"").unwrap()
        }),
        ("metrics.jsonl cut to 5 lines", &|run| {
            let text = std::fs::read_to_string(MetricsLog::jsonl_path(run)).unwrap();
            let cut: String = text.split_inclusive('\n').take(5).collect();
            std::fs::write(MetricsLog::jsonl_path(run), cut).unwrap();
        }),
        ("metrics.csv cut in the middle of a row", &|run| {
            let bytes = std::fs::read(MetricsLog::csv_path(run)).unwrap();
            std::fs::write(MetricsLog::csv_path(run), &bytes[..bytes.len() / 2]).unwrap();
        }),
    ];
    for (what, damage) in cases {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        copy_dir(&killed.path().join("run"), &run);
        let intact = (jsonl(&run), csv(&run));
        damage(&run);
        // Both logs end as the straight run's, and what either held before is kept.
        let stderr = resumes_to_the_straight_result(&run);
        assert_eq!(resumed_step(&stderr), 9, "{what}: {stderr}");
        assert!(jsonl(&run).starts_with(&intact.0), "{what}");
        assert!(csv(&run).starts_with(&intact.1), "{what}");
    }
}

#[test]
fn a_second_trainer_on_the_same_run_is_refused_until_the_first_is_gone() {
    // The first trainer, alive, waiting after step 6's checkpoint.
    let (dir, mut first) = paused_at("checkpoint-after-rename", 2);
    let run = dir.path().join("run");
    let (before_jsonl, before_csv) = (jsonl(&run), csv(&run));
    let second = Command::new(BIN)
        .arg("--resume")
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is in use by another training process"), "{stderr}");
    let ours = stderr.lines().filter(|l| !l.contains("XDG_RUNTIME_DIR")).count();
    assert_eq!(ours, 1, "{stderr}");
    assert_eq!((jsonl(&run), csv(&run)), (before_jsonl, before_csv));
    // Killed, it leaves nothing held: a resume goes through to the straight result.
    first.kill().unwrap();
    first.wait().unwrap();
    resumes_to_the_straight_result(&run);
}
