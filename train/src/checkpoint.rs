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
//! the next start removes. The newest `keep` checkpoints are kept; an older one is first renamed
//! to `.pruning-*` and then deleted, so a kill while deleting never leaves a half-deleted
//! `step-*` behind. A checkpoint that does not load (damaged on disk) is skipped on resume for
//! the newest that does, and renamed to `step-N.unreadable` so it is kept but no longer counts.
//!
//! Damage that still parses is caught too: each checkpoint records in `checksums.json` the step
//! it belongs to and a CRC-32 of each of its files, checked before anything is loaded, so a
//! flipped byte, an edited `state.json` or a file copied from another checkpoint make it one
//! that does not load. And a checkpoint is only good if its weights are finite: weights that
//! are not are never saved, and are refused when read.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::module::{ModuleVisitor, Param};
use burn::optim::ModuleOptimizer;
use burn::prelude::*;
use model::{Huginn, HuginnConfig};
use serde::{Deserialize, Serialize};

use model::pause::pause_point;

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
    #[error("no checkpoint in {dir} loads ({reasons}); they are left as they are")]
    NoneLoads { dir: PathBuf, reasons: String },
    #[error("the weights of step {step} are not all finite; not saved")]
    NonFinite { step: u64 },
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
const CONFIG: &str = "config.json";
const CHECKSUMS: &str = "checksums.json";
/// The files `checksums.json` covers: all a checkpoint holds besides itself.
const FILES: [&str; 4] = [CONFIG, MODEL, OPTIMIZER, STATE];

/// `checksums.json`: the step a checkpoint's files belong to, and their CRC-32s.
#[derive(Debug, Serialize, Deserialize)]
struct Checksums {
    step: u64,
    crc32: BTreeMap<String, u32>,
}

/// The checkpoints of one run.
pub struct Checkpoints {
    dir: PathBuf,
    keep: usize,
}

impl Checkpoints {
    /// The checkpoints under `run_dir/checkpoints`, keeping the newest `keep` (at least one).
    /// Leftovers of an interrupted save or pruning are removed.
    pub fn open(run_dir: &Path, keep: usize) -> Result<Self, CheckpointError> {
        let dir = run_dir.join("checkpoints");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let path = entry.map_err(io(&dir))?.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".partial-") || n.starts_with(".pruning-"))
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
        if !all_finite(model) {
            return Err(CheckpointError::NonFinite { step: state.step });
        }
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
        pause_point("checkpoint-after-model");
        let optimizer = partial.join(OPTIMIZER);
        optim.save(&optimizer).map_err(|e| CheckpointError::Io {
            path: optimizer.clone(),
            reason: e.to_string(),
        })?;
        let json = serde_json::to_vec_pretty(state).expect("plain data serializes");
        std::fs::write(partial.join(STATE), json).map_err(io(&partial))?;
        std::fs::write(partial.join(CHECKSUMS), checksums(&partial, state.step)?).map_err(io(&partial))?;
        sync_folder(&partial)?;
        pause_point("checkpoint-before-rename");
        // The same step saved again (a resumed run reaching it): the old one is moved out of
        // the way first, so `done` is at every moment absent or complete.
        let replaced = done.exists().then(|| self.dir.join(format!(".pruning-{name}")));
        if let Some(replaced) = &replaced {
            self.discard(&done, replaced)?;
        }
        std::fs::rename(&partial, &done).map_err(io(&done))?;
        sync(&self.dir)?;
        pause_point("checkpoint-after-rename");
        if let Some(replaced) = &replaced {
            std::fs::remove_dir_all(replaced).map_err(io(replaced))?;
        }
        let all = self.list()?;
        for (_, old) in all.iter().take(all.len().saturating_sub(self.keep)) {
            let name = old.file_name().and_then(|n| n.to_str()).unwrap_or("step");
            let doomed = self.dir.join(format!(".pruning-{name}"));
            self.discard(old, &doomed)?;
            pause_point("prune-after-rename");
            std::fs::remove_dir_all(&doomed).map_err(io(&doomed))?;
        }
        Ok(done)
    }

    /// Renames `from` to `to` (a name `open` removes) and makes the rename durable.
    fn discard(&self, from: &Path, to: &Path) -> Result<(), CheckpointError> {
        if to.exists() {
            std::fs::remove_dir_all(to).map_err(io(to))?;
        }
        std::fs::rename(from, to).map_err(io(from))?;
        sync(&self.dir)
    }

    /// Renames the checkpoint `path` to `step-N.LABEL` (kept, but no longer a checkpoint);
    /// returns the new name.
    pub fn set_aside(&self, path: &Path, label: &str) -> Result<PathBuf, CheckpointError> {
        let aside = aside_name(path, label);
        std::fs::rename(path, &aside).map_err(io(path))?;
        sync(&self.dir)?;
        Ok(aside)
    }

    /// Loads the newest checkpoint that loads (see [`load`]), renaming each newer one that
    /// does not to `step-N.unreadable`. `None` when there is no checkpoint; an error, with every
    /// checkpoint left as it is, when none loads.
    pub fn load_newest(
        &self,
        device: &Device,
        optim: impl Fn(&Huginn) -> ModuleOptimizer,
    ) -> Result<Option<Resumed>, CheckpointError> {
        let all = self.list()?;
        // A run none of whose checkpoints has a checksum manifest was written before there
        // were any: its checkpoints load unverified, as they did then. In any other run a
        // checkpoint without one is damaged.
        let verified = all.iter().any(|(_, path)| path.join(CHECKSUMS).exists());
        let mut failures: Vec<(PathBuf, String)> = Vec::new();
        for (_, path) in all.iter().rev() {
            match load_checked(path, device, &optim, verified) {
                Ok((model, optimizer, state)) => {
                    if !verified {
                        add_checksums(path, state.step)?;
                    }
                    let mut skipped = Vec::new();
                    for (failed, reason) in failures {
                        let aside = aside_name(&failed, "unreadable");
                        std::fs::rename(&failed, &aside).map_err(io(&failed))?;
                        skipped.push(Skipped {
                            checkpoint: failed,
                            moved_to: aside,
                            reason,
                        });
                    }
                    if !skipped.is_empty() {
                        sync(&self.dir)?;
                    }
                    return Ok(Some(Resumed {
                        model,
                        optimizer,
                        state,
                        checkpoint: path.clone(),
                        skipped,
                        verified,
                    }));
                }
                Err(e) => failures.push((path.clone(), e.to_string())),
            }
        }
        if failures.is_empty() {
            return Ok(None);
        }
        Err(CheckpointError::NoneLoads {
            dir: self.dir.clone(),
            reasons: failures
                .into_iter()
                .map(|(_, reason)| reason)
                .collect::<Vec<_>>()
                .join("; "),
        })
    }
}

/// Syncs every file in `dir`, then `dir`'s own entries: before a rename makes the folder count,
/// so that what it holds survives a power loss.
pub(crate) fn sync_folder(dir: &Path) -> Result<(), CheckpointError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        sync(&entry.map_err(io(dir))?.path())?;
    }
    sync(dir)
}

/// Syncs one file or directory (a directory: its entries, as renames into it).
pub(crate) fn sync(path: &Path) -> Result<(), CheckpointError> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(io(path))
}

/// `step-N.LABEL` beside `path`, or `step-N.LABEL-K` if that is taken.
fn aside_name(path: &Path, label: &str) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("step");
    let mut aside = path.with_file_name(format!("{name}.{label}"));
    let mut k = 2;
    while aside.exists() {
        aside = path.with_file_name(format!("{name}.{label}-{k}"));
        k += 1;
    }
    aside
}

/// The CRC-32 of a file, read in blocks.
fn crc32(path: &Path) -> std::io::Result<u32> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut block = vec![0; 1 << 20];
    loop {
        match file.read(&mut block)? {
            0 => return Ok(hasher.finalize()),
            n => hasher.update(&block[..n]),
        }
    }
}

/// Whether every weight of `model` is finite (one boolean read back per parameter).
fn all_finite(model: &Huginn) -> bool {
    struct Finite(bool);
    impl ModuleVisitor for Finite {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0 = self.0 && param.val().is_finite().all().into_scalar();
        }
    }
    let mut finite = Finite(true);
    model.visit(&mut finite);
    finite.0
}

/// Checks the files of the checkpoint `dir` against its `checksums.json`, and that they are
/// of the step its name says.
/// `checksums.json` for the checkpoint files in `dir`, of step `step`.
fn checksums(dir: &Path, step: u64) -> Result<Vec<u8>, CheckpointError> {
    let mut sums = Checksums {
        step,
        crc32: BTreeMap::new(),
    };
    for file in FILES {
        let path = dir.join(file);
        sums.crc32.insert(file.to_string(), crc32(&path).map_err(io(&path))?);
    }
    Ok(serde_json::to_vec_pretty(&sums).expect("plain data serializes"))
}

/// Gives a checkpoint from before checksums, which has just loaded, its `checksums.json`
/// (written beside it and renamed, so it is absent or whole), so a later resume can verify it.
fn add_checksums(dir: &Path, step: u64) -> Result<(), CheckpointError> {
    let partial = dir.join(format!("{CHECKSUMS}.partial"));
    let file = std::fs::File::create(&partial).map_err(io(&partial))?;
    std::io::Write::write_all(&mut &file, &checksums(dir, step)?).map_err(io(&partial))?;
    file.sync_all().map_err(io(&partial))?;
    std::fs::rename(&partial, dir.join(CHECKSUMS)).map_err(io(&partial))?;
    sync(dir)
}

fn verify(dir: &Path, step: Option<u64>) -> Result<(), CheckpointError> {
    let corrupt = |path: &Path, reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let path = dir.join(CHECKSUMS);
    let text = std::fs::read_to_string(&path).map_err(|e| corrupt(&path, e.to_string()))?;
    let sums: Checksums = serde_json::from_str(&text).map_err(|e| corrupt(&path, e.to_string()))?;
    if step.is_some_and(|step| step != sums.step) {
        return Err(corrupt(
            &path,
            format!("records step {}, not the directory's", sums.step),
        ));
    }
    for file in FILES {
        let path = dir.join(file);
        let Some(&want) = sums.crc32.get(file) else {
            return Err(corrupt(&dir.join(CHECKSUMS), format!("records no checksum of {file}")));
        };
        let got = crc32(&path).map_err(|e| corrupt(&path, e.to_string()))?;
        if got != want {
            return Err(corrupt(
                &path,
                format!(
                    "CRC-32 {got:08x}, but checksums.json records {want:08x} for step {}: damaged, or \
                     not this checkpoint's",
                    sums.step
                ),
            ));
        }
    }
    Ok(())
}

/// What a resume starts from.
pub struct Resumed {
    pub model: Huginn,
    pub optimizer: ModuleOptimizer,
    pub state: TrainState,
    pub checkpoint: PathBuf,
    /// Newer checkpoints that did not load, each renamed out of the way.
    pub skipped: Vec<Skipped>,
    /// Whether the checkpoint's files matched its checksums; `false` for a run written before
    /// checkpoints carried them.
    pub verified: bool,
}

/// A checkpoint a resume could not load.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub checkpoint: PathBuf,
    pub moved_to: PathBuf,
    pub reason: String,
}

/// Loads a checkpoint directory, once its files match its checksums: the model (on `device`),
/// the optimizer state into `optim` (built for that model), and the run state.
pub fn load(
    dir: &Path,
    device: &Device,
    optim: impl FnOnce(&Huginn) -> ModuleOptimizer,
) -> Result<(Huginn, ModuleOptimizer, TrainState), CheckpointError> {
    load_checked(dir, device, optim, true)
}

/// [`load`], checking the files against their checksums only where `verify` says so.
fn load_checked(
    dir: &Path,
    device: &Device,
    optim: impl FnOnce(&Huginn) -> ModuleOptimizer,
    verify_checksums: bool,
) -> Result<(Huginn, ModuleOptimizer, TrainState), CheckpointError> {
    let corrupt = |path: &Path, reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let named = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.parse::<u64>().ok());
    if verify_checksums {
        verify(dir, named)?;
    }
    let config = HuginnConfig::from_file(dir.join(CONFIG)).map_err(|e| corrupt(dir, e.to_string()))?;
    let model = Huginn::load_burn(&config, dir.join(MODEL), device).map_err(|e| corrupt(dir, e.to_string()))?;
    let path = dir.join(OPTIMIZER);
    let optimizer = optim(&model).load(&path).map_err(|e| corrupt(&path, e.to_string()))?;
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| corrupt(&path, e.to_string()))?;
    if named.is_some_and(|step| step != state.step) {
        return Err(corrupt(
            &path,
            format!("holds step {}, not the directory's", state.step),
        ));
    }
    Ok((model, optimizer, state))
}
