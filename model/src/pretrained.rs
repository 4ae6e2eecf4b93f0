//! Moving a [`Huginn`] in and out of files: the reference Hugging Face layout (config.json +
//! safetensors with the reference key names) and Burn's own record format (burnpack).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::prelude::*;

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

        let wte = ckpt.read("transformer.wte.weight", &[v, h], AsStored)?;
        if ckpt.contains("lm_head.weight") {
            let head = ckpt.read("lm_head.weight", &[v, h], AsStored)?;
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
                        norms.push(ckpt.tensor(&format!("{p}.norm_{n}.weight"), [h], AsStored, device)?);
                    }
                    let mut norms = norms.into_iter();
                    Ok(config.block_from(
                        ckpt.tensor(&format!("{p}.attn.Wqkv.weight"), [3 * h, h], Transposed, device)?,
                        ckpt.tensor(&format!("{p}.attn.qk_bias"), [2, 1, nh, hd], AsStored, device)?,
                        ckpt.tensor(&format!("{p}.attn.proj.weight"), [h, h], Transposed, device)?,
                        ckpt.tensor(&format!("{p}.mlp.fc.weight"), [2 * i, h], Transposed, device)?,
                        ckpt.tensor(&format!("{p}.mlp.proj.weight"), [h, i], Transposed, device)?,
                        |_| norms.next().expect("four norms"),
                    ))
                })
                .collect()
        };
        let prelude = stack(&mut ckpt, STACKS[0], config.n_layers_in_prelude)?;
        let core_block = stack(&mut ckpt, STACKS[1], config.n_layers_in_recurrent_block)?;
        let coda = stack(&mut ckpt, STACKS[2], config.n_layers_in_coda)?;
        let adapter = ckpt.tensor("transformer.adapter.weight", [h, 2 * h], Transposed, device)?;
        let ln_f = ckpt.tensor("transformer.ln_f.weight", [h], AsStored, device)?;
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

    /// Writes `config.json` and float32 safetensors with the reference key names (both tied
    /// copies, as the reference's `state_dict` has them), sharded above `max_shard_bytes`.
    pub fn export_hf(&self, dir: impl AsRef<Path>, max_shard_bytes: usize) -> Result<(), WeightsError> {
        use Layout::{AsStored, Transposed};
        let dir = dir.as_ref();
        let mut entries = BTreeMap::new();
        let mut put = |key: String, entry: Entry| {
            entries.insert(key, entry);
        };
        put(
            "transformer.wte.weight".into(),
            Entry::from_tensor(self.wte.val(), AsStored),
        );
        put("lm_head.weight".into(), Entry::from_tensor(self.wte.val(), AsStored));
        put(
            "transformer.adapter.weight".into(),
            Entry::from_tensor(self.adapter.weight.val(), Transposed),
        );
        put(
            "transformer.ln_f.weight".into(),
            Entry::from_tensor(self.ln_f.weight.val(), AsStored),
        );
        for (prefix, blocks) in STACKS.iter().zip([&self.prelude, &self.core_block, &self.coda]) {
            for (l, b) in blocks.iter().enumerate() {
                let p = format!("{prefix}.{l}");
                for (n, norm) in [&b.norm_1, &b.norm_2, &b.norm_3, &b.norm_4].into_iter().enumerate() {
                    put(
                        format!("{p}.norm_{}.weight", n + 1),
                        Entry::from_tensor(norm.weight.val(), AsStored),
                    );
                }
                put(
                    format!("{p}.attn.Wqkv.weight"),
                    Entry::from_tensor(b.attn.wqkv.weight.val(), Transposed),
                );
                put(
                    format!("{p}.attn.qk_bias"),
                    Entry::from_tensor(b.attn.qk_bias.val(), AsStored),
                );
                put(
                    format!("{p}.attn.proj.weight"),
                    Entry::from_tensor(b.attn.proj.weight.val(), Transposed),
                );
                put(
                    format!("{p}.mlp.fc.weight"),
                    Entry::from_tensor(b.mlp.fc.weight.val(), Transposed),
                );
                put(
                    format!("{p}.mlp.proj.weight"),
                    Entry::from_tensor(b.mlp.proj.weight.val(), Transposed),
                );
            }
        }
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
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        config
            .init(device, 0)
            .try_load_file(path)
            .map_err(|e| WeightsError::Record {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
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
