//! Checks against golden fixtures: folders holding a reference `config.json`, `model.safetensors`
//! and the tensors the authors' PyTorch code computed (`expected.safetensors`). This module
//! checks the forward-pass tensors; the inference and training crates check `generate.json`
//! and `expected_train.safetensors` with the same [`Check`] records.
//!
//! Every tensor in `expected.safetensors` is either an input of the calls (ids, labels, `s0`,
//! the chunk split) or an output this module recomputes; anything else is reported as a
//! failed check, so a fixture with new content cannot pass silently.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::prelude::*;
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;

use crate::cache::{FullCache, NoCache};
use crate::config::HuginnConfig;
use crate::error::WeightsError;
use crate::huginn::{Huginn, InitialState};
use crate::kernels::cross_entropy::cross_entropy;

/// Absolute tolerance on float32 outputs (the fixtures' README: fp32 vs fp64 differ by ~2e-6).
pub const FORWARD_TOLERANCE: f64 = 1e-4;

/// The outcome of comparing one quantity with the reference.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub max_abs_err: f64,
    pub tolerance: f64,
    pub passed: bool,
    /// Why a check failed without a number (unknown tensor, shape mismatch, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Check {
    pub fn compare(name: impl Into<String>, got: &[f32], want: &[f32], tolerance: f64) -> Self {
        let name = name.into();
        if got.len() != want.len() {
            return Self::failed(name, format!("{} values, reference has {}", got.len(), want.len()));
        }
        let max_abs_err = got
            .iter()
            .zip(want)
            .map(|(g, w)| {
                if g.is_nan() != w.is_nan() {
                    f64::INFINITY
                } else {
                    (g - w).abs() as f64
                }
            })
            .filter(|e| !e.is_nan())
            .fold(0.0, f64::max);
        Self {
            name,
            max_abs_err,
            tolerance,
            passed: max_abs_err <= tolerance,
            note: None,
        }
    }

    /// Exact agreement of two id sequences (tokens, step counts); the error is the number of
    /// positions that differ.
    pub fn exact(name: impl Into<String>, what: &str, got: &[usize], want: &[usize]) -> Self {
        let name = name.into();
        let wrong = got.len().abs_diff(want.len()) + got.iter().zip(want).filter(|(g, w)| g != w).count();
        let note = (wrong > 0).then(|| format!("{what}: got {got:?}, reference {want:?}"));
        Self {
            name,
            max_abs_err: wrong as f64,
            tolerance: 0.0,
            passed: wrong == 0,
            note,
        }
    }

    pub fn failed(name: impl Into<String>, note: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            max_abs_err: f64::NAN,
            tolerance: 0.0,
            passed: false,
            note: Some(note.into()),
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = if self.passed { "ok  " } else { "FAIL" };
        match &self.note {
            Some(note) => write!(f, "{status} {:<34} {note}", self.name),
            None if self.tolerance == 0.0 => write!(f, "{status} {:<34} exact", self.name),
            None => write!(
                f,
                "{status} {:<34} max|err| {:.3e}  tol {:.0e}",
                self.name, self.max_abs_err, self.tolerance
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// A tensor of a fixture file, on the host.
#[derive(Debug, Clone)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub floats: Vec<f32>,
    pub ints: Vec<i64>,
}

impl HostTensor {
    pub fn float<const D: usize>(&self, device: &Device) -> Tensor<D> {
        Tensor::from_data(TensorData::new(self.floats.clone(), self.shape.clone()), device)
    }

    pub fn int<const D: usize>(&self, device: &Device) -> Tensor<D, Int> {
        Tensor::from_data(TensorData::new(self.ints.clone(), self.shape.clone()), device)
    }
}

/// Reads every tensor of a (small) safetensors file into host memory.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, HostTensor>, FixtureError> {
    let format = |reason: String| FixtureError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| format(e.to_string()))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| format(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in file.iter() {
        let data = view.data();
        let (floats, ints) = match view.dtype() {
            Dtype::F32 => (
                data.chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                vec![],
            ),
            Dtype::I64 => (
                vec![],
                data.chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            ),
            other => return Err(format(format!("tensor {name:?} has unsupported dtype {other:?}"))),
        };
        out.insert(
            name.to_string(),
            HostTensor {
                shape: view.shape().to_vec(),
                floats,
                ints,
            },
        );
    }
    Ok(out)
}

/// A fixture folder with its model loaded.
pub struct Fixture {
    pub dir: PathBuf,
    pub model: Huginn,
}

impl Fixture {
    pub fn open(dir: impl AsRef<Path>, device: &Device) -> Result<Self, FixtureError> {
        let dir = dir.as_ref().to_path_buf();
        let config = HuginnConfig::from_file(dir.join("config.json")).map_err(WeightsError::from)?;
        let model = Huginn::from_safetensors(&config, dir.join("model.safetensors"), device)?;
        Ok(Self { dir, model })
    }

    /// Recomputes every forward-pass tensor of `expected.safetensors`.
    pub fn check_forward(&self) -> Result<Vec<Check>, FixtureError> {
        let path = self.dir.join("expected.safetensors");
        let expected = read_tensors(&path)?;
        let missing = |name: &str| FixtureError::Format {
            path: path.clone(),
            reason: format!("missing input {name:?}"),
        };
        let device = self.model.device();
        let ids = expected
            .get("input_ids")
            .ok_or_else(|| missing("input_ids"))?
            .int::<2>(&device);
        let model = &self.model;
        let mut runs: HashMap<usize, (Vec<f32>, Vec<f32>)> = HashMap::new();
        let mut run = |steps: usize| -> (Vec<f32>, Vec<f32>) {
            runs.entry(steps)
                .or_insert_with(|| {
                    let out = model.forward(ids.clone(), steps);
                    (host(out.logits), host(out.latent))
                })
                .clone()
        };
        let mut checks = Vec::new();
        for (name, want) in &expected {
            let got: Result<Vec<f32>, String> = if INPUTS.contains(&name.as_str()) {
                continue;
            } else if name == "embeds_scaled" {
                Ok(host(model.embed(ids.clone())))
            } else if name == "e" {
                let [_, s] = ids.dims();
                Ok(host(model.embed_prelude(
                    ids.clone(),
                    &model.rotary(0, s),
                    &mut NoCache,
                )))
            } else if name == "logits_default_steps" {
                Ok(run(model.config().mean_recurrence).0)
            } else if let Some(n) = steps_of(name, "logits_steps") {
                Ok(run(n).0)
            } else if let Some(n) = steps_of(name, "latent_steps") {
                Ok(run(n).1)
            } else if let Some(n) = steps_of(name, "loss_steps") {
                let labels = expected
                    .get("labels")
                    .ok_or_else(|| missing("labels"))?
                    .int::<2>(&device);
                Ok(host(cross_entropy(model.forward(ids.clone(), n).logits, labels)))
            } else if let Some(n) = steps_of(name, "logits_s0_steps").or(steps_of(name, "latent_s0_steps")) {
                let s0 = expected.get("s0").ok_or_else(|| missing("s0"))?.float::<3>(&device);
                let out = model.forward_with(ids.clone(), n, &InitialState::Given(s0), 0, &mut NoCache, |_, _| {});
                Ok(host(if name.starts_with("logits") {
                    out.logits
                } else {
                    out.latent
                }))
            } else if let Some(n) = steps_of(name, "states_steps") {
                let mut states = Vec::new();
                model.forward_with(ids.clone(), n, &InitialState::Zeros, 0, &mut NoCache, |_, s| {
                    states.push(s.clone())
                });
                Ok(host(Tensor::stack::<4>(states, 0)))
            } else if let Some(n) = steps_of(name, "logits_cached_chunks_steps") {
                let split = expected.get("chunk_split").ok_or_else(|| missing("chunk_split"))?.ints[0] as usize;
                Ok(host(cached_chunks(model, &ids, split, n)))
            } else {
                Err("unknown tensor: this checker does not know how to recompute it".into())
            };
            checks.push(match got {
                Ok(got) => Check::compare(name, &got, &want.floats, FORWARD_TOLERANCE),
                Err(note) => Check::failed(name, note),
            });
        }
        Ok(checks)
    }
}

/// Gradient tolerance per tensor: `max |err| ≤ GRAD_RELATIVE · max |reference| + GRAD_ABSOLUTE`.
pub const GRAD_RELATIVE: f64 = 1e-3;
pub const GRAD_ABSOLUTE: f64 = 1e-6;

impl Fixture {
    /// Recomputes `expected_train.safetensors` (when the folder has one): for each recorded
    /// `(n, k)`, the loss of the truncated training forward from the recorded `s0` and the
    /// gradient of every parameter after `backward`.
    pub fn check_train(&self) -> Result<Vec<Check>, FixtureError> {
        let path = self.dir.join("expected_train.safetensors");
        if !path.exists() {
            return Ok(vec![]);
        }
        let expected = read_tensors(&path)?;
        let inputs = read_tensors(&self.dir.join("expected.safetensors"))?;
        let missing = |name: &str| FixtureError::Format {
            path: path.clone(),
            reason: format!("missing input {name:?}"),
        };
        let device = self.model.device().autodiff();
        let model = Huginn::from_safetensors(self.model.config(), self.dir.join("model.safetensors"), &device)?;
        let ids = inputs
            .get("input_ids")
            .ok_or_else(|| missing("input_ids"))?
            .int::<2>(&device);
        let labels = inputs.get("labels").ok_or_else(|| missing("labels"))?.int::<2>(&device);
        let s0 = inputs.get("s0").ok_or_else(|| missing("s0"))?.float::<3>(&device);

        let mut checks = Vec::new();
        let mut runs = std::collections::BTreeSet::new();
        for name in expected.keys() {
            match train_run_of(name) {
                Some(run) => {
                    runs.insert(run);
                }
                None => checks.push(Check::failed(
                    name,
                    "unknown tensor: this checker does not know how to recompute it",
                )),
            }
        }
        for (n, k) in runs {
            let tag = format!("n{n}_k{k}");
            let out = model.forward_truncated(ids.clone(), n, k, &InitialState::Given(s0.clone()));
            let loss = cross_entropy(out.logits, labels.clone());
            let grads = loss.backward();
            let loss_name = format!("train_loss_{tag}");
            if let Some(want) = expected.get(&loss_name) {
                checks.push(Check::compare(&loss_name, &host(loss), &want.floats, FORWARD_TOLERANCE));
            }
            let params = model.reference_params();
            for (param, p) in &params {
                let name = format!("grad_{tag}.{param}");
                let Some(want) = expected.get(&name) else { continue };
                let scale = want.floats.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
                checks.push(match p.grad(&grads) {
                    Some(got) => Check::compare(&name, &got, &want.floats, GRAD_RELATIVE * scale + GRAD_ABSOLUTE),
                    None => Check::failed(&name, "the parameter received no gradient"),
                });
            }
            let prefix = format!("grad_{tag}.");
            for name in expected.keys().filter(|k| k.starts_with(&prefix)) {
                if !params.iter().any(|(p, _)| name[prefix.len()..] == *p) {
                    checks.push(Check::failed(name, "no parameter of this model has that name"));
                }
            }
        }
        Ok(checks)
    }
}

/// `(n, k)` from `train_loss_n{n}_k{k}` or `grad_n{n}_k{k}.<parameter>`.
fn train_run_of(name: &str) -> Option<(usize, usize)> {
    let tag = name
        .strip_prefix("train_loss_")
        .or_else(|| name.strip_prefix("grad_")?.split_once('.').map(|(t, _)| t))?;
    let (n, k) = tag.strip_prefix('n')?.split_once("_k")?;
    Some((n.parse().ok()?, k.parse().ok()?))
}

/// Inputs of the recorded calls, not outputs to check.
const INPUTS: [&str; 4] = ["input_ids", "labels", "s0", "chunk_split"];

/// `N` from `"{prefix}{N}"`.
fn steps_of(name: &str, prefix: &str) -> Option<usize> {
    name.strip_prefix(prefix)?.parse().ok()
}

/// Prefill `ids[:, :split]`, then `ids[:, split:]` through the same cache; logits concatenated.
fn cached_chunks(model: &Huginn, ids: &Tensor<2, Int>, split: usize, steps: usize) -> Tensor<3> {
    let [_, len] = ids.dims();
    let mut cache = FullCache::new();
    let first = model.forward_with(
        ids.clone().narrow(1, 0, split),
        steps,
        &InitialState::Zeros,
        0,
        &mut cache,
        |_, _| {},
    );
    let rest = model.forward_with(
        ids.clone().narrow(1, split, len - split),
        steps,
        &InitialState::Zeros,
        split,
        &mut cache,
        |_, _| {},
    );
    Tensor::cat(vec![first.logits, rest.logits], 1)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data")
}
