//! Capture: one prompt run for `R` recurrence steps through the model's own loop (its `recur`
//! observe hook; the loop is never copied), keeping for every position and iteration
//! `i = 0..=R` the normalised state `ln_f(s_i)` (and optionally the raw `s_i`), the coda's
//! read-out of every state ([`Outputs`]), and optionally `s* = ln_f(s_N)` of a much longer run
//! from the same `s_0`: the reference the convergence heat map measures distances to.
//!
//! Stored as `<base>.safetensors` (the arrays) next to `<base>.json` (what was run: model,
//! prompt, its tokens as text, R, initial state).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use model::burn::prelude::*;
use model::{Huginn, InitialState, NoCache};
use serde::{Deserialize, Serialize};

use crate::outputs::{Outputs, read_out};
use crate::prompt::Prompt;
use crate::store::{self, Stored, Values};
use crate::{AnalysisError, host_f32, with_suffix};

/// Where the latent state starts (the storable side of [`InitialState`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Init {
    Zeros,
    /// The reference's seeded "like-init" (the paper's trajectories start from random states).
    Random {
        seed: u64,
        scale: f64,
    },
}

impl Init {
    pub fn state(&self) -> InitialState {
        match *self {
            Init::Zeros => InitialState::Zeros,
            Init::Random { seed, scale } => InitialState::LikeInit { seed, scale },
        }
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureOptions {
    /// `R`: recurrence steps recorded.
    pub steps: usize,
    pub init: Init,
    /// Keep the raw states `s_i` as well (twice the memory and file size).
    pub raw: bool,
    /// Also run on to this many steps (at least `R`) and keep `ln_f` of that state as `s*`.
    pub reference_steps: Option<usize>,
}

/// The sidecar: what a capture is of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureMeta {
    /// The model folder it was run on.
    pub model: String,
    pub prompt: Prompt,
    pub steps: usize,
    pub init: Init,
    pub reference_steps: Option<usize>,
    /// The model's width `h` and vocabulary `V`.
    pub width: usize,
    pub vocab: usize,
}

/// One recorded run. Arrays are flattened row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Capture {
    pub meta: CaptureMeta,
    /// `[R+1, S, h]`: `ln_f(s_i)`; iteration 0 is the initial state.
    pub latents: Vec<f32>,
    /// `[R+1, S, h]`: `s_i`, when asked for.
    pub raw: Option<Vec<f32>>,
    /// `[S, h]`: `ln_f(s_N)` after `reference_steps` steps, when asked for.
    pub reference: Option<Vec<f32>>,
    pub outputs: Outputs,
}

/// Bytes of logits (with their three temporaries) one read-out batch may hold: bounds device
/// memory for large vocabularies and long prompts.
const READOUT_BYTES: usize = 1 << 30;

impl Capture {
    /// Runs `prompt` through `model` (loaded from `model_name`, recorded in the sidecar),
    /// advancing `progress` once per recurrence step.
    pub fn run(
        model: &Huginn,
        model_name: &str,
        prompt: Prompt,
        options: &CaptureOptions,
        progress: &ProgressBar,
    ) -> Result<Self, AnalysisError> {
        let tokens = model.tokens(std::slice::from_ref(&prompt.tokens))?;
        let steps = options.steps;
        if let Some(n) = options.reference_steps
            && n < steps
        {
            return Err(AnalysisError::Invalid(format!(
                "the reference run ({n} steps) must be at least as long as the capture ({steps})"
            )));
        }
        let config = model.config();
        let len = prompt.len();
        progress.set_length((steps + 1 + options.reference_steps.map_or(0, |n| n - steps)) as u64);
        let rotary = model.rotary(0, len);
        let e = model.embed_prelude(tokens, &rotary, &mut NoCache);
        let s0 = model.initial_state(&e, &options.init.state());
        let mut recorder = Recorder {
            model,
            batch: (READOUT_BYTES / (16 * len * config.vocab_size)).clamp(1, 32),
            keep_raw: options.raw,
            pending: Vec::new(),
            before: None,
            latents: Vec::new(),
            raw: Vec::new(),
            outputs: Outputs::default(),
            progress,
        };
        recorder.push(&s0);
        let last = model.recur(&e, s0, 0..steps, &rotary, &mut NoCache, |_, s| recorder.push(s));
        recorder.flush();
        let reference = options.reference_steps.map(|n| {
            let s = model.recur(&e, last, steps..n, &rotary, &mut NoCache, |_, _| progress.inc(1));
            host_f32(model.latent(s))
        });
        Ok(Self {
            meta: CaptureMeta {
                model: model_name.to_string(),
                prompt,
                steps,
                init: options.init,
                reference_steps: options.reference_steps,
                width: config.n_embd,
                vocab: config.vocab_size,
            },
            latents: recorder.latents,
            raw: options.raw.then_some(recorder.raw),
            reference,
            outputs: recorder.outputs,
        })
    }

    /// `S`: prompt positions.
    pub fn positions(&self) -> usize {
        self.meta.prompt.len()
    }

    /// `R + 1`: recorded iterations, the initial state included.
    pub fn iterations(&self) -> usize {
        self.meta.steps + 1
    }

    pub fn width(&self) -> usize {
        self.meta.width
    }

    /// `ln_f(s_i)` at position `t`.
    pub fn latent(&self, i: usize, t: usize) -> &[f32] {
        let h = self.width();
        let start = (i * self.positions() + t) * h;
        &self.latents[start..start + h]
    }

    /// All normalised states as one `[(R+1)·S, h]` matrix on `device` (row `i·S + t`).
    pub fn latents_tensor(&self, device: &Device) -> Tensor<2> {
        let rows = self.iterations() * self.positions();
        Tensor::from_data(TensorData::new(self.latents.clone(), [rows, self.width()]), device)
    }

    /// `s*` at position `t`: the reference run's state, or the last iterate without one.
    pub fn target(&self, t: usize) -> &[f32] {
        match &self.reference {
            Some(r) => &r[t * self.width()..(t + 1) * self.width()],
            None => self.latent(self.meta.steps, t),
        }
    }

    /// `‖ln_f(s_i) − s*‖` for every position (rows) and iteration (columns): the numbers of
    /// the convergence heat map.
    pub fn distances_to_target(&self) -> Vec<Vec<f32>> {
        (0..self.positions())
            .map(|t| {
                let target = self.target(t);
                (0..self.iterations())
                    .map(|i| {
                        let d: f64 = self
                            .latent(i, t)
                            .iter()
                            .zip(target)
                            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                            .sum();
                        d.sqrt() as f32
                    })
                    .collect()
            })
            .collect()
    }

    /// Writes `<base>.safetensors` and `<base>.json`.
    pub fn save(&self, base: &Path) -> Result<(), AnalysisError> {
        let (r, s, h) = (self.meta.steps, self.positions(), self.width());
        let o = &self.outputs;
        let mut arrays = vec![
            ("latents", vec![r + 1, s, h], Values::F32(&self.latents)),
            ("tokens", vec![s], Values::U32(&self.meta.prompt.tokens)),
            ("entropy", vec![r + 1, s], Values::F32(&o.entropy)),
            ("top1", vec![r + 1, s], Values::U32(&o.top1)),
            ("top1_prob", vec![r + 1, s], Values::F32(&o.top1_prob)),
            ("kl", vec![r, s], Values::F32(&o.kl)),
            ("residual", vec![r, s], Values::F32(&o.residual)),
        ];
        if let Some(raw) = &self.raw {
            arrays.push(("raw", vec![r + 1, s, h], Values::F32(raw)));
        }
        if let Some(reference) = &self.reference {
            arrays.push(("reference", vec![s, h], Values::F32(reference)));
        }
        store::write(&with_suffix(base, ".safetensors"), &arrays, HashMap::new())?;
        let json = serde_json::to_string_pretty(&self.meta).expect("plain data serializes");
        let path = with_suffix(base, ".json");
        std::fs::write(&path, json).map_err(AnalysisError::io(path))
    }

    /// Reads a capture back from its base path (or either of its two files' paths).
    pub fn load(path: &Path) -> Result<Self, AnalysisError> {
        let base = capture_base(path);
        let json_path = with_suffix(&base, ".json");
        let json = std::fs::read_to_string(&json_path).map_err(AnalysisError::io(&json_path))?;
        let meta: CaptureMeta = serde_json::from_str(&json).map_err(|e| AnalysisError::format(&json_path, e))?;
        let stored = Stored::open(&with_suffix(&base, ".safetensors"))?;
        let (r, s, h) = (meta.steps, meta.prompt.len(), meta.width);
        let optional = |name: &str, shape: &[usize]| -> Result<Option<Vec<f32>>, AnalysisError> {
            stored
                .contains(name)
                .then(|| stored.f32_shaped(name, shape))
                .transpose()
        };
        Ok(Self {
            latents: stored.f32_shaped("latents", &[r + 1, s, h])?,
            raw: optional("raw", &[r + 1, s, h])?,
            reference: optional("reference", &[s, h])?,
            outputs: Outputs {
                entropy: stored.f32_shaped("entropy", &[r + 1, s])?,
                top1: stored.u32_shaped("top1", &[r + 1, s])?,
                top1_prob: stored.f32_shaped("top1_prob", &[r + 1, s])?,
                kl: stored.f32_shaped("kl", &[r, s])?,
                residual: stored.f32_shaped("residual", &[r, s])?,
            },
            meta,
        })
    }
}

/// `cap` for `cap`, `cap.json` and `cap.safetensors`.
fn capture_base(path: &Path) -> PathBuf {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json" | "safetensors") => path.with_extension(""),
        _ => path.to_path_buf(),
    }
}

/// Collects states as the loop produces them and reads them out in batches.
struct Recorder<'a> {
    model: &'a Huginn,
    batch: usize,
    keep_raw: bool,
    pending: Vec<Tensor<3>>,
    /// The last read-out iteration's raw state and log-probabilities.
    before: Option<(Tensor<3>, Tensor<3>)>,
    latents: Vec<f32>,
    raw: Vec<f32>,
    outputs: Outputs,
    progress: &'a ProgressBar,
}

impl Recorder<'_> {
    fn push(&mut self, state: &Tensor<3>) {
        self.pending.push(state.clone());
        if self.pending.len() == self.batch {
            self.flush();
        }
        self.progress.inc(1);
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let states = Tensor::cat(std::mem::take(&mut self.pending), 0);
        let k = states.dims()[0];
        self.latents.extend(host_f32(self.model.latent(states.clone())));
        if self.keep_raw {
            self.raw.extend(host_f32(states.clone()));
        }
        let last = states.clone().narrow(0, k - 1, 1);
        let r = read_out(self.model, states, self.before.take());
        let o = &mut self.outputs;
        o.entropy.extend(r.entropy);
        o.top1.extend(r.top1);
        o.top1_prob.extend(r.top1_prob);
        o.kl.extend(r.kl);
        o.residual.extend(r.residual);
        self.before = Some((last, r.last_logp));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::HuginnConfig;

    fn tiny() -> Huginn {
        HuginnConfig::tiny(30, 16, 2, (1, 2, 1)).init(&Device::flex(), 5)
    }

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    fn softmax(logits: &[f32]) -> Vec<f64> {
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = logits.iter().map(|l| (*l as f64 - max).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|x| x / z).collect()
    }

    #[test]
    fn records_every_iteration_as_a_plain_forward_pass_does() {
        let model = tiny();
        let ids = vec![3, 1, 4, 1, 5];
        let init = Init::Random { seed: 9, scale: 1.0 };
        let options = CaptureOptions {
            steps: 6,
            init,
            raw: true,
            reference_steps: Some(20),
        };
        let c = Capture::run(
            &model,
            "tiny",
            Prompt::from_ids(ids.clone()),
            &options,
            &ProgressBar::hidden(),
        )
        .unwrap();
        let (s, h, v) = (5, 16, 30);
        assert_eq!((c.positions(), c.iterations(), c.width()), (s, 7, h));
        assert_eq!(c.latents.len(), 7 * s * h);
        let tokens = model.tokens(std::slice::from_ref(&ids)).unwrap();
        let forward = |n: usize| model.forward_with(tokens.clone(), n, &init.state(), 0, &mut NoCache, |_, _| {});
        let mut prev_p: Option<Vec<Vec<f64>>> = None;
        for i in 0..=6 {
            let f = forward(i);
            assert!(
                close(&c.latents[i * s * h..(i + 1) * s * h], &host_f32(f.latent), 1e-5),
                "latent {i}"
            );
            let raw = &c.raw.as_ref().unwrap()[i * s * h..(i + 1) * s * h];
            assert!(close(raw, &host_f32(f.state), 1e-5), "raw {i}");
            let logits = host_f32(f.logits);
            let p: Vec<Vec<f64>> = logits.chunks(v).map(softmax).collect();
            for t in 0..s {
                let entropy: f64 = -p[t].iter().map(|q| q * q.ln()).sum::<f64>();
                assert!(
                    (c.outputs.entropy[i * s + t] as f64 - entropy).abs() < 1e-4,
                    "entropy {i} {t}"
                );
                let best = (0..v).max_by(|&a, &b| p[t][a].total_cmp(&p[t][b])).unwrap();
                assert_eq!(c.outputs.top1[i * s + t] as usize, best);
                assert!((c.outputs.top1_prob[i * s + t] as f64 - p[t][best]).abs() < 1e-5);
                if let Some(prev) = &prev_p {
                    let kl: f64 = (0..v).map(|j| prev[t][j] * (prev[t][j] / p[t][j]).ln()).sum();
                    assert!((c.outputs.kl[(i - 1) * s + t] as f64 - kl).abs() < 1e-4, "kl {i} {t}");
                    let (a, b) = (c.latent(i, t), c.latent(i - 1, t));
                    assert!(c.outputs.residual[(i - 1) * s + t] > 0.0);
                    assert_ne!(a, b);
                }
            }
            prev_p = Some(p);
        }
        let reference = host_f32(forward(20).latent);
        assert!(close(c.reference.as_ref().unwrap(), &reference, 1e-5));
        let d = c.distances_to_target();
        assert_eq!((d.len(), d[0].len()), (s, 7));
        for t in 0..s {
            let want: f32 = c
                .latent(3, t)
                .iter()
                .zip(&reference[t * h..(t + 1) * h])
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f32>()
                .sqrt();
            assert!((d[t][3] - want).abs() < 1e-5);
        }
    }

    #[test]
    fn read_out_batches_do_not_change_the_numbers() {
        let model = tiny();
        let ids = vec![7, 8, 9];
        let tokens = model.tokens(std::slice::from_ref(&ids)).unwrap();
        let rotary = model.rotary(0, 3);
        let e = model.embed_prelude(tokens, &rotary, &mut NoCache);
        let s0 = model.initial_state(&e, &InitialState::LikeInit { seed: 1, scale: 1.0 });
        let record = |batch: usize| {
            let progress = ProgressBar::hidden();
            let mut r = Recorder {
                model: &model,
                batch,
                keep_raw: false,
                pending: Vec::new(),
                before: None,
                latents: Vec::new(),
                raw: Vec::new(),
                outputs: Outputs::default(),
                progress: &progress,
            };
            r.push(&s0);
            model.recur(&e, s0.clone(), 0..7, &rotary, &mut NoCache, |_, s| r.push(s));
            r.flush();
            (r.latents, r.outputs)
        };
        let (one_latents, one) = record(1);
        let (all_latents, all) = record(32);
        let (three_latents, three) = record(3);
        assert_eq!(one.kl.len(), 7 * 3);
        assert_eq!(one.entropy.len(), 8 * 3);
        for (a, b) in [(&one, &all), (&three, &all)] {
            assert!(close(&a.entropy, &b.entropy, 1e-5));
            assert!(close(&a.kl, &b.kl, 1e-5));
            assert!(close(&a.residual, &b.residual, 1e-5));
            assert!(close(&a.top1_prob, &b.top1_prob, 1e-5));
            assert_eq!(a.top1, b.top1);
        }
        assert!(close(&one_latents, &all_latents, 1e-6) && close(&three_latents, &all_latents, 1e-6));
    }

    #[test]
    fn saves_and_loads_and_rejects_bad_requests() {
        let model = tiny();
        let options = CaptureOptions {
            steps: 3,
            init: Init::Zeros,
            raw: false,
            reference_steps: None,
        };
        let mut prompt = Prompt::from_ids(vec![1, 2]);
        prompt.token_text = Some(vec!["a".into(), "b".into()]);
        let c = Capture::run(&model, "tiny", prompt, &options, &ProgressBar::hidden()).unwrap();
        assert!(c.raw.is_none() && c.reference.is_none());
        // Without a reference, the target is the last iterate.
        assert!(c.distances_to_target().iter().all(|row| row[3] == 0.0));
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        let base = dir.join("run.v1");
        c.save(&base).unwrap();
        assert!(dir.join("run.v1.safetensors").is_file() && dir.join("run.v1.json").is_file());
        assert_eq!(Capture::load(&base).unwrap(), c);
        assert_eq!(Capture::load(&dir.join("run.v1.safetensors")).unwrap(), c);
        let json = std::fs::read_to_string(dir.join("run.v1.json")).unwrap();
        assert!(
            json.contains("\"token_text\"") && json.contains("\"model\": \"tiny\""),
            "{json}"
        );

        let long = CaptureOptions {
            reference_steps: Some(2),
            ..options.clone()
        };
        let err = Capture::run(&model, "tiny", Prompt::from_ids(vec![1]), &long, &ProgressBar::hidden()).unwrap_err();
        assert!(matches!(err, AnalysisError::Invalid(_)), "{err}");
        let err = Capture::run(
            &model,
            "tiny",
            Prompt::from_ids(vec![99]),
            &options,
            &ProgressBar::hidden(),
        )
        .unwrap_err();
        assert!(matches!(err, AnalysisError::Input(_)), "{err}");
        let err = Capture::load(&dir.join("missing")).unwrap_err();
        assert!(matches!(err, AnalysisError::Io { .. }), "{err}");
    }
}
