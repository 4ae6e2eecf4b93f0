//! `--model ORG/NAME` against a loopback hub (`common::hub_server`): `HF_ENDPOINT` points the
//! `huginn` binary at it and `HF_HOME` at a fresh cache.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;

use common::hub_server::{COMMIT, Hub};
use common::{DEFAULT_IDS, folder};
use model::HuginnConfig;
use model::burn::prelude::Device;

const REPO: &str = "test-org/tiny-huginn";

/// The tiny test model in shards, with its text files and two files the loader never reads.
fn model_folder() -> tempfile::TempDir {
    let dir = folder(DEFAULT_IDS);
    let model = HuginnConfig::tiny(common::VOCAB, 32, 4, (1, 2, 1)).init(&Device::flex(), 5);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    model.export_hf(dir.path(), 40_000).unwrap();
    std::fs::write(dir.path().join("README.md"), "a model card").unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), "old weights").unwrap();
    dir
}

fn shards(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("model-"))
        .collect();
    names.sort();
    names
}

const GENERATE: &[&str] = &["generate", "--prompt", "Hi", "--steps", "3", "--max-new-tokens"];

fn generate(hub: &Hub, home: &Path, offline: bool, model: &str) -> Output {
    let mut args = GENERATE.to_vec();
    args.extend(["6", "--model", model]);
    hub.command(env!("CARGO_BIN_EXE_huginn"), home, offline)
        .args(&args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Fails unless `out` failed with one line of stderr containing `needle`.
fn one_line_error(out: &Output, needle: &str) {
    let (_, stderr) = text(out);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(needle) && stderr.trim().lines().count() == 1,
        "wanted one line with {needle:?}: {stderr}"
    );
}

#[test]
fn a_hub_name_is_fetched_once_then_read_from_the_cache_also_offline() {
    let dir = model_folder();
    let hub = Hub::start(&[(REPO, dir.path())]);
    let home = tempfile::tempdir().unwrap();
    let local = generate(&hub, home.path(), false, dir.path().to_str().unwrap());
    assert!(local.status.success(), "{}", text(&local).1);
    assert!(hub.requests().is_empty(), "a local folder makes no request");

    let out = generate(&hub, home.path(), false, REPO);
    assert!(out.status.success(), "{}", text(&out).1);
    assert_eq!(out.stdout, local.stdout, "the same model answers the same");
    // Only what the folder loader reads: no model card, no old-format weights.
    let fetched: BTreeSet<String> = hub
        .requests()
        .iter()
        .filter_map(|p| p.split_once(&format!("/resolve/{COMMIT}/")).map(|(_, f)| f.to_string()))
        .collect();
    let mut wanted: BTreeSet<String> = shards(dir.path()).into_iter().collect();
    wanted.extend(
        [
            "config.json",
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ]
        .map(String::from),
    );
    assert!(wanted.len() > 7, "the fixture has several shards");
    assert_eq!(fetched, wanted);
    let snapshot = home
        .path()
        .join("hub/models--test-org--tiny-huginn/snapshots")
        .join(COMMIT);
    assert!(snapshot.join("config.json").is_file());
    assert_eq!(
        std::fs::read_to_string(home.path().join("hub/models--test-org--tiny-huginn/refs/main")).unwrap(),
        COMMIT
    );

    let before = hub.requests().len();
    let again = generate(&hub, home.path(), false, REPO);
    assert_eq!(again.stdout, local.stdout, "{}", text(&again).1);
    assert_eq!(hub.requests().len(), before, "the second run makes no request");
    let offline = generate(&hub, home.path(), true, REPO);
    assert_eq!(offline.stdout, local.stdout, "{}", text(&offline).1);
    let pinned = generate(&hub, home.path(), true, &format!("{REPO}@{COMMIT}"));
    assert_eq!(pinned.stdout, local.stdout, "{}", text(&pinned).1);
    assert_eq!(hub.requests().len(), before);

    let empty = tempfile::tempdir().unwrap();
    one_line_error(&generate(&hub, empty.path(), true, REPO), "HF_HUB_OFFLINE is set");
    assert_eq!(hub.requests().len(), before, "offline mode makes no request");
}

#[test]
fn hf_token_is_sent_to_the_hub() {
    let dir = model_folder();
    let hub = Hub::start(&[(REPO, dir.path())]);
    let home = tempfile::tempdir().unwrap();
    let out = hub
        .command(env!("CARGO_BIN_EXE_huginn"), home.path(), false)
        .args(["depths", "--ids", "1,2", "--max-depth", "2", "--model", REPO])
        .env("HF_TOKEN", "hf_secret")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out).1);
    let state = hub.state.lock().unwrap();
    assert!(!state.requests.is_empty());
    for (path, auth) in &state.requests {
        assert_eq!(auth.as_deref(), Some("Bearer hf_secret"), "{path}");
    }
}

/// Fails if the cache holds a snapshot the loader would read: an offline run must fail, and
/// every snapshot file must have its full size.
fn nothing_complete_cached(hub: &Hub, home: &Path, dir: &Path) {
    one_line_error(&generate(hub, home, true, REPO), "HF_HUB_OFFLINE is set");
    let snapshot = home.join("hub/models--test-org--tiny-huginn/snapshots").join(COMMIT);
    for entry in std::fs::read_dir(&snapshot).into_iter().flatten() {
        let entry = entry.unwrap();
        let served = std::fs::metadata(dir.join(entry.file_name())).unwrap().len();
        assert_eq!(
            std::fs::metadata(entry.path()).unwrap().len(),
            served,
            "{:?}",
            entry.file_name()
        );
    }
}

#[test]
fn an_unknown_name_a_404_a_truncated_body_and_a_missing_shard_are_one_line_errors() {
    let dir = model_folder();
    let hub = Hub::start(&[(REPO, dir.path())]);
    let shard = shards(dir.path())[1].clone();

    let home = tempfile::tempdir().unwrap();
    one_line_error(
        &generate(&hub, home.path(), false, "test-org/no-such-model"),
        "test-org/no-such-model: no such folder, and the hub has no such model (HTTP 404",
    );
    // A hub that cannot be reached (a closed port): a mistyped local path reads as this too.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = hub
        .command(env!("CARGO_BIN_EXE_huginn"), home.path(), false)
        .args(["depths", "--ids", "1", "--model", "runs/final"])
        .env("HF_ENDPOINT", format!("http://{closed}"))
        .output()
        .unwrap();
    one_line_error(&out, "runs/final: no such folder, and the hub could not be asked");

    hub.faults(|f| {
        f.not_found.insert("tokenizer.json".into());
    });
    one_line_error(
        &generate(&hub, home.path(), false, REPO),
        &format!("{REPO}: the hub answered HTTP 404 for tokenizer.json"),
    );
    nothing_complete_cached(&hub, home.path(), dir.path());

    hub.faults(|f| {
        f.not_found.clear();
        f.truncated.insert(shard.clone());
    });
    one_line_error(
        &generate(&hub, home.path(), false, REPO),
        &format!("fetching {shard} failed"),
    );
    nothing_complete_cached(&hub, home.path(), dir.path());
    hub.faults(|f| {
        f.truncated.clear();
        f.short.insert(shard.clone());
    });
    one_line_error(
        &generate(&hub, home.path(), false, REPO),
        &format!("{shard} arrived incomplete"),
    );
    nothing_complete_cached(&hub, home.path(), dir.path());
    // The next run fetches what is missing and completes the snapshot.
    hub.faults(|f| f.short.clear());
    let resumed = generate(&hub, home.path(), false, REPO);
    let local = generate(&hub, home.path(), true, dir.path().to_str().unwrap());
    assert!(resumed.status.success(), "{}", text(&resumed).1);
    assert_eq!(resumed.stdout, local.stdout);

    let home = tempfile::tempdir().unwrap();
    std::fs::remove_file(dir.path().join(&shard)).unwrap();
    one_line_error(
        &generate(&hub, home.path(), false, REPO),
        &format!("model.safetensors.index.json names the shard {shard}, which the repository does not have"),
    );
    nothing_complete_cached(&hub, home.path(), dir.path());
}
