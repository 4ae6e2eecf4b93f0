//! A loopback Hugging Face hub for tests: it serves model folders in the hub's URL layout (the
//! file list at `/api/models/ORG/NAME/revision/REV`, files at `/ORG/NAME/resolve/REV/FILE` with
//! the `etag`, `x-repo-commit` and range headers `hf-hub` reads), records every request, and
//! answers with the faults it is told to (the train tests include it too).
#![allow(dead_code)] // each test file uses its own part

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

/// The commit every served repository is at.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// What the server does wrong, per file name.
#[derive(Default)]
pub struct Faults {
    /// Listed, but answered with 404.
    pub not_found: BTreeSet<String>,
    /// Sent with the full `Content-Length` but only half the bytes, then the connection closes.
    pub truncated: BTreeSet<String>,
    /// Sent as half the bytes with a matching `Content-Length`: a clean end, the wrong size.
    pub short: BTreeSet<String>,
}

#[derive(Default)]
pub struct State {
    repos: BTreeMap<String, PathBuf>,
    faults: Faults,
    /// Each request's path and `Authorization` header.
    pub requests: Vec<(String, Option<String>)>,
}

pub struct Hub {
    pub endpoint: String,
    pub state: Arc<Mutex<State>>,
}

impl Hub {
    pub fn start(repos: &[(&str, &Path)]) -> Self {
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

    pub fn requests(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }

    pub fn faults(&self, edit: impl FnOnce(&mut Faults)) {
        edit(&mut self.state.lock().unwrap().faults);
    }

    /// `program` with this hub and the cache in `home`.
    pub fn command(&self, program: &str, home: &Path, offline: bool) -> Command {
        let mut command = Command::new(program);
        command
            .env("HF_ENDPOINT", &self.endpoint)
            .env("HF_HOME", home)
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_OFFLINE");
        if offline {
            command.env("HF_HUB_OFFLINE", "1");
        }
        command
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
