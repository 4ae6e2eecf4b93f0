//! `--model ORG/NAME` against a loopback hub: a server started here serves model folders in the
//! hub's URL layout (the file list at `/api/models/ORG/NAME/revision/REV`, files at
//! `/ORG/NAME/resolve/REV/FILE` with the `etag`, `x-repo-commit` and range headers `hf-hub`
//! reads), `HF_ENDPOINT` points the `huginn` binary at it and `HF_HOME` at a fresh cache.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use common::{DEFAULT_IDS, folder};
use model::HuginnConfig;
use model::burn::prelude::Device;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const REPO: &str = "test-org/tiny-huginn";

/// What the server does wrong, per file name.
#[derive(Default)]
struct Faults {
    /// Listed, but answered with 404.
    not_found: BTreeSet<String>,
    /// Sent with the full `Content-Length` but only half the bytes, then the connection closes.
    truncated: BTreeSet<String>,
    /// Sent as half the bytes with a matching `Content-Length`: a clean end, the wrong size.
    short: BTreeSet<String>,
}

#[derive(Default)]
struct State {
    repos: BTreeMap<String, PathBuf>,
    faults: Faults,
    /// Each request's path and `Authorization` header.
    requests: Vec<(String, Option<String>)>,
}

struct Hub {
    endpoint: String,
    state: Arc<Mutex<State>>,
}

impl Hub {
    fn start(repos: &[(&str, &Path)]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            repos: repos.iter().map(|(r, d)| (r.to_string(), d.to_path_buf())).collect(),
            ..State::default()
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || answer(stream, &state));
            }
        });
        Self { endpoint, state }
    }

    fn requests(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn faults(&self, edit: impl FnOnce(&mut Faults)) {
        edit(&mut self.state.lock().unwrap().faults);
    }

    /// `huginn ARGS` with this hub and the cache in `home`.
    fn huginn(&self, home: &Path, offline: bool, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_huginn"));
        command
            .args(args)
            .env("HF_ENDPOINT", &self.endpoint)
            .env("HF_HOME", home)
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_OFFLINE");
        if offline {
            command.env("HF_HUB_OFFLINE", "1");
        }
        command.output().unwrap()
    }
}

fn answer(stream: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let (mut range_start, mut auth) = (None, None);
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        if header.trim().is_empty() {
            break;
        }
        let (key, value) = header.split_once(':').unwrap();
        match key.to_ascii_lowercase().as_str() {
            "range" => range_start = value.trim().strip_prefix("bytes=").map(str::to_string),
            "authorization" => auth = Some(value.trim().to_string()),
            _ => {}
        }
    }
    let mut state = state.lock().unwrap();
    state.requests.push((path.clone(), auth));
    let mut stream = stream;
    let reply = |stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8], sent: usize| {
        let mut head = format!(
            "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(&body[..sent]);
    };
    let not_found = |stream: &mut TcpStream| reply(stream, "404 Not Found", &[], b"", 0);
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some((repo, _revision)) = rest.split_once("/revision/") else {
            return not_found(&mut stream);
        };
        let Some(dir) = state.repos.get(repo) else {
            return not_found(&mut stream);
        };
        let siblings: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| serde_json::json!({"rfilename": e.unwrap().file_name().to_string_lossy()}))
            .collect();
        let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
        return reply(&mut stream, "200 OK", &[], body.as_bytes(), body.len());
    }
    let Some((repo, file)) = path.trim_start_matches('/').split_once("/resolve/") else {
        return not_found(&mut stream);
    };
    let file = file.split_once('/').map_or("", |(_rev, f)| f).to_string();
    let Some(bytes) = state.repos.get(repo).and_then(|d| std::fs::read(d.join(&file)).ok()) else {
        return not_found(&mut stream);
    };
    if state.faults.not_found.contains(&file) {
        return not_found(&mut stream);
    }
    let (start, end) = match range_start.as_deref().and_then(|r| r.split_once('-')) {
        Some((a, b)) => (a.parse().unwrap(), b.parse().map_or(bytes.len(), |b: usize| b + 1)),
        None => (0, bytes.len()),
    };
    let mut body = &bytes[start..end.min(bytes.len())];
    let probe = end - start == 1;
    if state.faults.short.contains(&file) && !probe {
        body = &body[..body.len() / 2];
    }
    let sent = if state.faults.truncated.contains(&file) && !probe {
        body.len() / 2
    } else {
        body.len()
    };
    let headers = [
        ("etag", format!("\"{:016x}\"", content_hash(&bytes))),
        ("x-repo-commit", COMMIT.to_string()),
        ("content-range", format!("bytes {start}-{}/{}", end - 1, bytes.len())),
    ];
    reply(&mut stream, "206 Partial Content", &headers, body, sent);
}

/// The blob name `hf-hub` stores the file under (the hub's is a SHA-256 for weights).
fn content_hash(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

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
    hub.huginn(home, offline, &args)
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
    let out = Command::new(env!("CARGO_BIN_EXE_huginn"))
        .args(["depths", "--ids", "1,2", "--max-depth", "2", "--model", REPO])
        .env("HF_ENDPOINT", &hub.endpoint)
        .env("HF_HOME", home.path())
        .env("HF_TOKEN", "hf_secret")
        .env_remove("HF_HUB_OFFLINE")
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
