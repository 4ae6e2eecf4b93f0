//! `--model ORG/NAME[@REVISION]`: a model on the Hugging Face hub, fetched with `hf-hub` into
//! the standard cache (`~/.cache/huggingface/hub`, or `$HF_HOME/hub`) and opened from its
//! snapshot folder like any local folder.
//!
//! Only what [`ModelFolder::open`](crate::ModelFolder::open) reads is fetched: the
//! config, the weights (one file or the shards the index names), and the tokenizer, chat
//! template and generation files the repository has. Files it lacks are recorded the way the
//! Python client records them (`.no_exist/COMMIT/FILE`), and the branch's `refs/` entry is
//! written only once every file is in place, so a second run finds a complete snapshot without
//! any request, and a failed or interrupted download leaves nothing that reads as complete
//! (`hf-hub` keeps a partial blob as `.part`, resumed by the next run).
//!
//! Honoured: `HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN` (else the token file `huggingface-cli login`
//! writes), `HF_HUB_OFFLINE` (the cache only, never a request).

use std::collections::BTreeSet;
use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use model::checkpoint::{INDEX_FILE, SINGLE_FILE, read_index};
use model::pretrained::{BURN_FILE, CONFIG_FILE};
use thiserror::Error;

use crate::{CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};

/// Files the folder loader reads when they are there.
const OPTIONAL: [&str; 4] = [
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG_FILE,
];
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The `io::Error`s are not `source`s: `{:#}` would print their text twice.
#[derive(Debug, Error)]
pub enum HubError {
    #[error(
        "{name}: no such folder, and HF_HUB_OFFLINE is set but the Hugging Face cache ({cache}) has no complete copy of it"
    )]
    Offline { name: String, cache: PathBuf },
    #[error(
        "{name}: no such folder, and the hub has no such model (HTTP {status}; a gated or private one needs HF_TOKEN)"
    )]
    NoRepository { name: String, status: u16 },
    #[error("{name}: no such folder, and the hub could not be asked ({reason})")]
    Unreachable { name: String, reason: String },
    #[error("{name}: the hub answered HTTP {status} for {file}")]
    Status { name: String, file: String, status: u16 },
    #[error("{name}: not a model folder: the repository has no {CONFIG_FILE}")]
    NoConfig { name: String },
    #[error("{name}: the repository has no weights ({SINGLE_FILE}, {INDEX_FILE} or {BURN_FILE})")]
    NoWeights { name: String },
    #[error("{name}: {INDEX_FILE} names the shard {shard}, which the repository does not have")]
    MissingShard { name: String, shard: String },
    #[error("{name}: {file}: {reason}")]
    Invalid { name: String, file: String, reason: String },
    #[error("{name}: {file} arrived incomplete ({got} of {expected} bytes); run again to resume")]
    Incomplete {
        name: String,
        file: String,
        got: u64,
        expected: u64,
    },
    #[error("{name}: fetching {file} failed: {reason}")]
    Fetch { name: String, file: String, reason: String },
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
}

/// `ORG/NAME` or `ORG/NAME@REVISION` (a branch, tag or commit; `main` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubName {
    pub repo: String,
    pub revision: String,
}

impl HubName {
    /// `None` for anything that is not shaped like a hub name (an absolute path, `./x`, three
    /// parts), so that it stays a local path with the loader's own error.
    pub fn parse(spec: &str) -> Option<Self> {
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, revision)) => (repo, revision),
            None => (spec, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let part = |s: &str| {
            !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let revision_ok = !revision.is_empty()
            && !revision.contains("..")
            && revision
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        (part(org) && part(name) && revision_ok).then(|| Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    fn is_commit(&self) -> bool {
        self.revision.len() == 40 && self.revision.chars().all(|c| c.is_ascii_hexdigit())
    }
}

impl std::fmt::Display for HubName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.revision == "main" {
            write!(f, "{}", self.repo)
        } else {
            write!(f, "{}@{}", self.repo, self.revision)
        }
    }
}

/// Where and how the hub is reached, from the environment.
#[derive(Debug, Clone)]
pub struct Hub {
    pub cache: PathBuf,
    pub endpoint: String,
    token: Option<String>,
    pub offline: bool,
}

impl Hub {
    pub fn from_env() -> Self {
        let env = |key| std::env::var(key).ok().filter(|v| !v.is_empty());
        let cache = Cache::from_env();
        let offline =
            env("HF_HUB_OFFLINE").is_some_and(|v| ["1", "on", "yes", "true"].contains(&v.to_lowercase().as_str()));
        Self {
            token: env("HF_TOKEN").or_else(|| cache.token()),
            endpoint: env("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            cache: cache.path().clone(),
            offline,
        }
    }

    /// The snapshot folder of `name`, fetched unless the cache has it complete.
    pub fn snapshot(&self, name: &HubName) -> Result<PathBuf, HubError> {
        if let Some(dir) = self.cached(name) {
            return Ok(dir);
        }
        if self.offline {
            return Err(HubError::Offline {
                name: name.to_string(),
                cache: self.cache.clone(),
            });
        }
        self.fetch(name)
    }

    fn repo_dir(&self, name: &HubName) -> PathBuf {
        self.cache.join(Repo::model(name.repo.clone()).folder_name())
    }

    /// The snapshot `name` points at, if every file the loader reads is there or known absent.
    fn cached(&self, name: &HubName) -> Option<PathBuf> {
        let repo_dir = self.repo_dir(name);
        let commit = if name.is_commit() {
            name.revision.clone()
        } else {
            fs::read_to_string(repo_dir.join("refs").join(&name.revision))
                .ok()?
                .trim()
                .to_string()
        };
        let dir = repo_dir.join("snapshots").join(&commit);
        let absent = repo_dir.join(".no_exist").join(&commit);
        let weights = if dir.join(INDEX_FILE).is_file() {
            read_index(&dir.join(INDEX_FILE))
                .ok()?
                .into_values()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .all(|shard| dir.join(shard).is_file())
        } else {
            dir.join(SINGLE_FILE).is_file() || dir.join(BURN_FILE).is_file()
        };
        let optional = OPTIONAL
            .iter()
            .all(|f| dir.join(f).is_file() || absent.join(f).exists());
        (dir.join(CONFIG_FILE).is_file() && weights && optional).then_some(dir)
    }

    fn fetch(&self, name: &HubName) -> Result<PathBuf, HubError> {
        let display = name.to_string();
        let api = ApiBuilder::from_cache(Cache::new(self.cache.clone()))
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(std::io::stderr().is_terminal())
            .build()
            .map_err(|e| fetch_error(&display, "the client", e))?;
        let info = api
            .repo(Repo::with_revision(
                name.repo.clone(),
                RepoType::Model,
                name.revision.clone(),
            ))
            .info()
            .map_err(|e| match status_of(&e) {
                Some(status @ (401 | 403 | 404)) => HubError::NoRepository {
                    name: display.clone(),
                    status,
                },
                _ => HubError::Unreachable {
                    name: display.clone(),
                    reason: e.to_string(),
                },
            })?;
        // Every file comes from the commit the list describes, even if the branch moves meanwhile.
        let repo = api.repo(Repo::with_revision(
            name.repo.clone(),
            RepoType::Model,
            info.sha.clone(),
        ));
        let listed: BTreeSet<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        let fetcher = Fetcher {
            name: &display,
            api: &api,
            repo: &repo,
            dir: self.repo_dir(name).join("snapshots").join(&info.sha),
        };
        if !listed.contains(CONFIG_FILE) {
            return Err(HubError::NoConfig { name: display });
        }
        let weights: Vec<String> = if listed.contains(INDEX_FILE) {
            let index = fetcher.get(INDEX_FILE)?;
            let shards: BTreeSet<String> = read_index(&index)
                .map_err(|e| HubError::Invalid {
                    name: display.clone(),
                    file: INDEX_FILE.into(),
                    reason: e.to_string(),
                })?
                .into_values()
                .collect();
            if let Some(shard) = shards.iter().find(|s| !listed.contains(*s)) {
                return Err(HubError::MissingShard {
                    name: display,
                    shard: shard.clone(),
                });
            }
            shards.into_iter().collect()
        } else if let Some(file) = [SINGLE_FILE, BURN_FILE].into_iter().find(|f| listed.contains(*f)) {
            vec![file.to_string()]
        } else {
            return Err(HubError::NoWeights { name: display });
        };
        fetcher.get(CONFIG_FILE)?;
        let absent = self.repo_dir(name).join(".no_exist").join(&info.sha);
        for file in OPTIONAL {
            if listed.contains(file) {
                fetcher.get(file)?;
            } else {
                create_dir(&absent)?;
                write(&absent.join(file), "")?;
            }
        }
        for file in &weights {
            fetcher.get(file)?;
        }
        // Written last: the branch names this commit only once the snapshot is complete.
        if !name.is_commit() {
            let refs = self.repo_dir(name).join("refs");
            let target = refs.join(&name.revision);
            create_dir(target.parent().unwrap_or(&refs))?;
            write(&target, &info.sha)?;
        }
        Ok(fetcher.dir)
    }
}

struct Fetcher<'a> {
    name: &'a str,
    api: &'a Api,
    repo: &'a ApiRepo,
    dir: PathBuf,
}

impl Fetcher<'_> {
    /// One file into the snapshot, checked against the size the hub announced: a short body
    /// with a clean end is removed, not kept as the file.
    fn get(&self, file: &str) -> Result<PathBuf, HubError> {
        let path = self.dir.join(file);
        if path.is_file() {
            return Ok(path);
        }
        let error = |e| match status_of(&e) {
            Some(status) => HubError::Status {
                name: self.name.to_string(),
                file: file.to_string(),
                status,
            },
            None => fetch_error(self.name, file, e),
        };
        let expected = self.api.metadata(&self.repo.url(file)).map_err(error)?.size() as u64;
        let path = self.repo.download(file).map_err(error)?;
        let got = fs::metadata(&path).map_err(|e| io(&path, e))?.len();
        if got != expected {
            let blob = fs::canonicalize(&path).map_err(|e| io(&path, e))?;
            remove(&path)?;
            remove(&blob)?;
            return Err(HubError::Incomplete {
                name: self.name.to_string(),
                file: file.to_string(),
                got,
                expected,
            });
        }
        Ok(path)
    }
}

fn status_of(error: &ApiError) -> Option<u16> {
    match error {
        ApiError::RequestError(e) => match e.as_ref() {
            ureq::Error::StatusCode(status) => Some(*status),
            _ => None,
        },
        _ => None,
    }
}

fn fetch_error(name: &str, file: &str, error: ApiError) -> HubError {
    HubError::Fetch {
        name: name.to_string(),
        file: file.to_string(),
        reason: error.to_string(),
    }
}

/// `spec` itself when it is a folder here or not shaped like a hub name; else its snapshot.
pub fn resolve(spec: &Path) -> Result<PathBuf, HubError> {
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    match spec.to_str().and_then(HubName::parse) {
        Some(name) => Hub::from_env().snapshot(&name),
        None => Ok(spec.to_path_buf()),
    }
}

fn io(path: &Path, error: std::io::Error) -> HubError {
    HubError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn create_dir(dir: &Path) -> Result<(), HubError> {
    fs::create_dir_all(dir).map_err(|e| io(dir, e))
}

fn write(path: &Path, text: &str) -> Result<(), HubError> {
    fs::write(path, text).map_err(|e| io(path, e))
}

fn remove(path: &Path) -> Result<(), HubError> {
    fs::remove_file(path).map_err(|e| io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_names_and_paths() {
        let name = HubName::parse("tomg-group-umd/huginn-0125").unwrap();
        assert_eq!(
            (name.repo.as_str(), name.revision.as_str()),
            ("tomg-group-umd/huginn-0125", "main")
        );
        let name = HubName::parse("org/m.v2@refs/pr/1").unwrap();
        assert_eq!(name.revision, "refs/pr/1");
        for path in [
            "/abs/path",
            "./org/x",
            "a/b/c",
            "org/",
            "/x",
            "org/..",
            "a/b@",
            "a/b@../x",
            "model",
        ] {
            assert_eq!(HubName::parse(path), None, "{path}");
        }
    }
}
