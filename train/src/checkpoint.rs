//! Training checkpoints that lose nothing and never tear.
//!
//! A checkpoint is a directory `checkpoints/step-NNNNNNNN/` holding the model (`model.bpk` and
//! its `config.json`), the optimizer's state (`optimizer.bpk`, moments and step counts keyed by
//! parameter id, which the model record keeps) and `state.json` (step, data position, tokens,
//! time). Everything random in a run (depth, initial state, data) is a pure function of the
//! run's seed and the step, so the step *is* the RNG state.
//!
//! It is written under a temporary name, every file synced, then renamed into place: a process
//! killed at any moment leaves either the complete directory or only a `.partial-*` one, which
//! the next start removes. The newest `keep` checkpoints are kept.

use std::path::{Path, PathBuf};

use burn::optim::ModuleOptimizer;
use burn::prelude::*;
use model::{Huginn, HuginnConfig};
use serde::{Deserialize, Serialize};

/// Where a run stands, saved with each checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Micro-batches drawn from the data so far (the data position).
    pub batches: u64,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// Training time so far, over all the run's processes.
    pub elapsed_seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |e| CheckpointError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

const MODEL: &str = "model.bpk";
const OPTIMIZER: &str = "optimizer.bpk";
const STATE: &str = "state.json";

/// The checkpoints of one run.
pub struct Checkpoints {
    dir: PathBuf,
    keep: usize,
}

impl Checkpoints {
    /// The checkpoints under `run_dir/checkpoints`, keeping the newest `keep` (at least one).
    /// Leftovers of an interrupted save are removed.
    pub fn open(run_dir: &Path, keep: usize) -> Result<Self, CheckpointError> {
        let dir = run_dir.join("checkpoints");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let path = entry.map_err(io(&dir))?.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".partial-"))
            {
                std::fs::remove_dir_all(&path).map_err(io(&path))?;
            }
        }
        Ok(Self { dir, keep: keep.max(1) })
    }

    /// The complete checkpoints, oldest first, with their steps.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let path = entry.map_err(io(&self.dir))?.path();
            let step = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("step-"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(step) = step {
                found.push((step, path));
            }
        }
        found.sort();
        Ok(found)
    }

    pub fn latest(&self) -> Result<Option<PathBuf>, CheckpointError> {
        Ok(self.list()?.pop().map(|(_, p)| p))
    }

    /// Saves a checkpoint atomically and prunes old ones; returns its directory.
    pub fn save(
        &self,
        model: &Huginn,
        optim: &ModuleOptimizer,
        state: &TrainState,
    ) -> Result<PathBuf, CheckpointError> {
        let name = format!("step-{:08}", state.step);
        let partial = self.dir.join(format!(".partial-{name}"));
        let done = self.dir.join(&name);
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
        }
        model.save_burn(&partial).map_err(|e| CheckpointError::Io {
            path: partial.clone(),
            reason: e.to_string(),
        })?;
        let optimizer = partial.join(OPTIMIZER);
        optim.save(&optimizer).map_err(|e| CheckpointError::Io {
            path: optimizer.clone(),
            reason: e.to_string(),
        })?;
        let json = serde_json::to_vec_pretty(state).expect("plain data serializes");
        std::fs::write(partial.join(STATE), json).map_err(io(&partial))?;
        for entry in std::fs::read_dir(&partial).map_err(io(&partial))? {
            let path = entry.map_err(io(&partial))?.path();
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io(&path))?;
        }
        if done.exists() {
            // The same step saved again (a resumed run reaching it): replace.
            std::fs::remove_dir_all(&done).map_err(io(&done))?;
        }
        std::fs::rename(&partial, &done).map_err(io(&done))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        let all = self.list()?;
        for (_, old) in all.iter().take(all.len().saturating_sub(self.keep)) {
            std::fs::remove_dir_all(old).map_err(io(old))?;
        }
        Ok(done)
    }
}

/// Loads a checkpoint directory: the model (on `device`), the optimizer state into `optim`
/// (built for that model), and the run state.
pub fn load(
    dir: &Path,
    device: &Device,
    optim: impl FnOnce(&Huginn) -> ModuleOptimizer,
) -> Result<(Huginn, ModuleOptimizer, TrainState), CheckpointError> {
    let corrupt = |path: &Path, reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let config = HuginnConfig::from_file(dir.join("config.json")).map_err(|e| corrupt(dir, e.to_string()))?;
    let model = Huginn::load_burn(&config, dir.join(MODEL), device).map_err(|e| corrupt(dir, e.to_string()))?;
    let path = dir.join(OPTIMIZER);
    let optimizer = optim(&model).load(&path).map_err(|e| corrupt(&path, e.to_string()))?;
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let state = serde_json::from_str(&text).map_err(|e| corrupt(&path, e.to_string()))?;
    Ok((model, optimizer, state))
}
