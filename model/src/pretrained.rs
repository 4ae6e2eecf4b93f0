//! Moving a [`Huginn`] in and out of files: the reference Hugging Face layout (config.json +
//! safetensors with the reference key names) and Burn's own record format (burnpack).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::prelude::*;
use burn::store::{ModuleRecord, RecordError};
use burn::tensor::Gradients;

use crate::block::SandwichBlock;
use crate::checkpoint::{self, Checkpoint, Entry, Layout};
use crate::config::HuginnConfig;
use crate::error::WeightsError;
use crate::huginn::{Huginn, linear};
use crate::norm::RmsNorm;

pub const CONFIG_FILE: &str = "config.json";
/// Burn record of the weights, written beside `config.json` by [`Huginn::save_burn`].
pub const BURN_FILE: &str = "model.bpk";

/// The three stacks of blocks with their reference key prefixes.
const STACKS: [&str; 3] = ["transformer.prelude", "transformer.core_block", "transformer.coda"];

impl Huginn {
    /// Loads a Hugging Face style model folder: `config.json` plus `model.safetensors`, a
    /// sharded `model.safetensors.index.json`, or Burn's `model.bpk`.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &Device) -> Result<Self, WeightsError> {
        let dir = dir.as_ref();
        let config = HuginnConfig::from_file(dir.join(CONFIG_FILE))?;
        if dir.join(BURN_FILE).exists()
            && !dir.join(checkpoint::SINGLE_FILE).exists()
            && !dir.join(checkpoint::INDEX_FILE).exists()
        {
            return Self::load_burn(&config, dir.join(BURN_FILE), device);
        }
        Self::from_safetensors(&config, dir, device)
    }

    /// Loads reference-named safetensors weights (a file, or a folder with one file or shards)
    /// for `config`, cast to the device's float type. Skips the stored RoPE table and checks
    /// that a stored `lm_head.weight` equals the tied embedding.
    pub fn from_safetensors(
        config: &HuginnConfig,
        path: impl AsRef<Path>,
        device: &Device,
    ) -> Result<Self, WeightsError> {
        config.validate()?;
        let mut ckpt = Checkpoint::open(path)?;
        let (h, v, i) = (config.n_embd, config.vocab_size, config.intermediate_size);
        let (nh, hd) = (config.n_heads, config.head_dim());
        use Layout::{AsStored, Transposed};

        let wte = ckpt.read("transformer.wte.weight", &[v, h], "vocab_size, n_embd", AsStored)?;
        if ckpt.contains("lm_head.weight") {
            let head = ckpt.read("lm_head.weight", &[v, h], "vocab_size, n_embd", AsStored)?;
            let max_diff = max_abs_diff(&wte, &head);
            if max_diff > 0.0 {
                return Err(WeightsError::UntiedHead {
                    path: ckpt.path_of("lm_head.weight").to_path_buf(),
                    max_diff,
                });
            }
        }
        let wte = Tensor::from_data(wte, device);
        ckpt.skip("freqs_cis");

        let stack = |ckpt: &mut Checkpoint, prefix: &str, count: usize| -> Result<Vec<SandwichBlock>, WeightsError> {
            (0..count)
                .map(|l| {
                    let p = format!("{prefix}.{l}");
                    let mut norms = Vec::new();
                    for n in 1..=4 {
                        norms.push(ckpt.tensor(&format!("{p}.norm_{n}.weight"), [h], "n_embd", AsStored, device)?);
                    }
                    let mut norms = norms.into_iter();
                    Ok(config.block_from(
                        ckpt.tensor(
                            &format!("{p}.attn.Wqkv.weight"),
                            [3 * h, h],
                            "3·n_embd, n_embd",
                            Transposed,
                            device,
                        )?,
                        ckpt.tensor(
                            &format!("{p}.attn.qk_bias"),
                            [2, 1, nh, hd],
                            "2, 1, n_heads, n_embd / n_heads",
                            AsStored,
                            device,
                        )?,
                        ckpt.tensor(
                            &format!("{p}.attn.proj.weight"),
                            [h, h],
                            "n_embd, n_embd",
                            Transposed,
                            device,
                        )?,
                        ckpt.tensor(
                            &format!("{p}.mlp.fc.weight"),
                            [2 * i, h],
                            "2·intermediate_size, n_embd",
                            Transposed,
                            device,
                        )?,
                        ckpt.tensor(
                            &format!("{p}.mlp.proj.weight"),
                            [h, i],
                            "n_embd, intermediate_size",
                            Transposed,
                            device,
                        )?,
                        |_| norms.next().expect("four norms"),
                    ))
                })
                .collect()
        };
        let prelude = stack(&mut ckpt, STACKS[0], config.n_layers_in_prelude)?;
        let core_block = stack(&mut ckpt, STACKS[1], config.n_layers_in_recurrent_block)?;
        let coda = stack(&mut ckpt, STACKS[2], config.n_layers_in_coda)?;
        let adapter = ckpt.tensor(
            "transformer.adapter.weight",
            [h, 2 * h],
            "n_embd, 2·n_embd",
            Transposed,
            device,
        )?;
        let ln_f = ckpt.tensor("transformer.ln_f.weight", [h], "n_embd", AsStored, device)?;
        ckpt.finish()?;
        Ok(Self {
            wte: Param::from_tensor(wte),
            prelude,
            adapter: linear(adapter),
            core_block,
            coda,
            ln_f: RmsNorm::new(ln_f, config.norm_eps),
            config: config.clone(),
        })
    }

    /// Every parameter under its reference name (the tied embedding once, as
    /// `transformer.wte.weight`), with the layout the reference stores it in.
    pub fn reference_params(&self) -> Vec<(String, ParamRef<'_>)> {
        use Layout::Transposed;
        let mut out = vec![
            (
                "transformer.wte.weight".to_string(),
                ParamRef::Matrix(&self.wte, Layout::AsStored),
            ),
            (
                "transformer.adapter.weight".to_string(),
                ParamRef::Matrix(&self.adapter.weight, Transposed),
            ),
            (
                "transformer.ln_f.weight".to_string(),
                ParamRef::Vector(&self.ln_f.weight),
            ),
        ];
        for (prefix, blocks) in STACKS.iter().zip([&self.prelude, &self.core_block, &self.coda]) {
            for (l, b) in blocks.iter().enumerate() {
                let p = format!("{prefix}.{l}");
                for (n, norm) in [&b.norm_1, &b.norm_2, &b.norm_3, &b.norm_4].into_iter().enumerate() {
                    out.push((format!("{p}.norm_{}.weight", n + 1), ParamRef::Vector(&norm.weight)));
                }
                out.push((
                    format!("{p}.attn.Wqkv.weight"),
                    ParamRef::Matrix(&b.attn.wqkv.weight, Transposed),
                ));
                out.push((format!("{p}.attn.qk_bias"), ParamRef::Bias(&b.attn.qk_bias)));
                out.push((
                    format!("{p}.attn.proj.weight"),
                    ParamRef::Matrix(&b.attn.proj.weight, Transposed),
                ));
                out.push((
                    format!("{p}.mlp.fc.weight"),
                    ParamRef::Matrix(&b.mlp.fc.weight, Transposed),
                ));
                out.push((
                    format!("{p}.mlp.proj.weight"),
                    ParamRef::Matrix(&b.mlp.proj.weight, Transposed),
                ));
            }
        }
        out
    }

    /// Writes `config.json` and float32 safetensors with the reference key names (both tied
    /// copies, as the reference's `state_dict` has them), sharded above `max_shard_bytes`.
    pub fn export_hf(&self, dir: impl AsRef<Path>, max_shard_bytes: usize) -> Result<(), WeightsError> {
        let dir = dir.as_ref();
        let mut entries: BTreeMap<String, Entry> = self
            .reference_params()
            .into_iter()
            .map(|(key, param)| (key, param.entry()))
            .collect();
        entries.insert(
            "lm_head.weight".into(),
            Entry::from_tensor(self.wte.val(), Layout::AsStored),
        );
        checkpoint::write(dir, &entries, max_shard_bytes)?;
        write_config(dir, &self.config)
    }

    /// Writes `config.json` and the weights as a Burn record (`model.bpk`).
    pub fn save_burn(&self, dir: impl AsRef<Path>) -> Result<(), WeightsError> {
        let dir = dir.as_ref();
        let path = dir.join(BURN_FILE);
        std::fs::create_dir_all(dir).map_err(|e| WeightsError::Write {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        self.clone().save_file(&path).map_err(|e| WeightsError::Write {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_config(dir, &self.config)
    }

    /// Loads a Burn record written by [`Huginn::save_burn`] into a model of `config`.
    pub fn load_burn(config: &HuginnConfig, path: impl AsRef<Path>, device: &Device) -> Result<Self, WeightsError> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(WeightsError::Io {
                path: path.to_path_buf(),
                error: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let record_err = |e: RecordError| WeightsError::Record {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        // Read before the model is built, so that a corrupt file fails before every weight is
        // drawn at random only to be overwritten.
        let record = ModuleRecord::load(path).map_err(record_err)?;
        let model = config.init(device, 0).try_load_record(record).map_err(record_err)?;
        // A record holds whatever the saved model held, NaN included; safetensors weights are
        // checked for that as they are read, a record's only here.
        match model
            .reference_params()
            .into_iter()
            .find(|(_, param)| !param.is_finite())
        {
            Some((key, _)) => Err(WeightsError::NonFinite {
                path: path.to_path_buf(),
                key,
            }),
            None => Ok(model),
        }
    }
}

/// A parameter of the model, as the reference names and stores it.
pub enum ParamRef<'a> {
    Vector(&'a Param<Tensor<1>>),
    /// A matrix and how the reference stores it (linears are transposed: `[out, in]`).
    Matrix(&'a Param<Tensor<2>>, Layout),
    Bias(&'a Param<Tensor<4>>),
}

impl ParamRef<'_> {
    /// The value in the reference layout, ready to write.
    pub fn entry(&self) -> Entry {
        match self {
            ParamRef::Vector(p) => Entry::from_tensor(p.val(), Layout::AsStored),
            ParamRef::Matrix(p, layout) => Entry::from_tensor(p.val(), *layout),
            ParamRef::Bias(p) => Entry::from_tensor(p.val(), Layout::AsStored),
        }
    }

    /// Whether every value is finite (one boolean read back from the device).
    fn is_finite(&self) -> bool {
        match self {
            ParamRef::Vector(p) => p.val().is_finite().all().into_scalar(),
            ParamRef::Matrix(p, _) => p.val().is_finite().all().into_scalar(),
            ParamRef::Bias(p) => p.val().is_finite().all().into_scalar(),
        }
    }

    /// The gradient in the reference layout, flattened to host f32 (None if it has none).
    pub fn grad(&self, grads: &Gradients) -> Option<Vec<f32>> {
        let host = |data: TensorData| data.convert::<f32>().try_to_vec::<f32>().expect("f32 gradient");
        match self {
            ParamRef::Vector(p) => p.val().grad(grads).map(|g| host(g.into_data())),
            ParamRef::Matrix(p, Layout::Transposed) => p.val().grad(grads).map(|g| host(g.transpose().into_data())),
            ParamRef::Matrix(p, Layout::AsStored) => p.val().grad(grads).map(|g| host(g.into_data())),
            ParamRef::Bias(p) => p.val().grad(grads).map(|g| host(g.into_data())),
        }
    }
}

fn write_config(dir: &Path, config: &HuginnConfig) -> Result<(), WeightsError> {
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, config.to_json()).map_err(|e| WeightsError::Write {
        path,
        reason: e.to_string(),
    })
}

fn max_abs_diff(a: &TensorData, b: &TensorData) -> f32 {
    let (a, b) = (a.as_slice::<f32>().expect("f32"), b.as_slice::<f32>().expect("f32"));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
