//! Moving a [`Huginn`] in and out of files: the reference Hugging Face layout (config.json +
//! safetensors with the reference key names) and Burn's own record format (burnpack).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::prelude::*;
use burn::store::{ModuleRecord, RecordError};
use burn::tensor::{DType, Gradients};
use half::f16;
use safetensors::Dtype;

use crate::block::SandwichBlock;
use crate::checkpoint::{self, Checkpoint, Entry, Layout};
use crate::config::HuginnConfig;
use crate::error::WeightsError;
use crate::huginn::{Huginn, linear};
use crate::norm::RmsNorm;
use crate::quantize::{Bits, QUANTIZED_SUFFIX, Quantization, QuantizedMatrix, SCALES_SUFFIX, check_scales, groups};

pub const CONFIG_FILE: &str = "config.json";
/// Burn record of the weights, written beside `config.json` by [`Huginn::save_burn`].
pub const BURN_FILE: &str = "model.bpk";

/// The three stacks of blocks with their reference key prefixes.
const STACKS: [&str; 3] = ["transformer.prelude", "transformer.core_block", "transformer.coda"];

impl Huginn {
    /// Loads a Hugging Face style model folder: `config.json` plus `model.safetensors`, a
    /// sharded `model.safetensors.index.json`, or Burn's `model.bpk`.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &Device) -> Result<Self, WeightsError> {
        Self::from_pretrained_quantized(dir, device, None)
    }

    /// [`Huginn::from_pretrained`], with a float folder's linear weights rounded to `quantize`
    /// bits as they are read, one tensor at a time (peak memory: the quantized model and one
    /// float tensor). A folder written by `huginn quantize` loads as it is stored; asking it for
    /// another width is refused, as rounding twice compounds the error.
    pub fn from_pretrained_quantized(
        dir: impl AsRef<Path>,
        device: &Device,
        quantize: Option<Bits>,
    ) -> Result<Self, WeightsError> {
        let dir = dir.as_ref();
        let config = HuginnConfig::from_file(dir.join(CONFIG_FILE))?;
        let quantize = match (config.quantization.as_ref().map(|q| q.bits), quantize) {
            (Some(stored), Some(asked)) if stored != asked => {
                return Err(WeightsError::Requantize {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "the folder holds {}-bit weights; rounding them to {} bits would round twice \
                         (quantize the float folder instead)",
                        stored.count(),
                        asked.count()
                    ),
                });
            }
            (Some(_), _) => None,
            (None, asked) => asked,
        };
        if dir.join(BURN_FILE).exists()
            && !dir.join(checkpoint::SINGLE_FILE).exists()
            && !dir.join(checkpoint::INDEX_FILE).exists()
        {
            let model = Self::load_burn(&config, dir.join(BURN_FILE), device)?;
            return Ok(match quantize {
                Some(bits) => model.quantize(bits),
                None => model,
            });
        }
        Self::from_safetensors_quantized(&config, dir, device, quantize)
    }

    /// Loads reference-named safetensors weights (a file, or a folder with one file or shards)
    /// for `config`, cast to the device's float type. Skips the stored RoPE table and checks
    /// that a stored `lm_head.weight` equals the tied embedding.
    pub fn from_safetensors(
        config: &HuginnConfig,
        path: impl AsRef<Path>,
        device: &Device,
    ) -> Result<Self, WeightsError> {
        Self::from_safetensors_quantized(config, path, device, None)
    }

    /// [`Huginn::from_safetensors`] with the linear weights rounded to `quantize` bits as they
    /// are read; a `config` with a quantization scheme reads the stored levels and scales.
    pub fn from_safetensors_quantized(
        config: &HuginnConfig,
        path: impl AsRef<Path>,
        device: &Device,
        quantize: Option<Bits>,
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

        // A linear's weight `[in, out]` from its reference key (`{base}.weight`, stored `[out, in]`).
        let stored = config.quantization.as_ref().map(|q| q.bits);
        let weight = |ckpt: &mut Checkpoint, base: &str, [out, inp]: [usize; 2], dims: &'static str| {
            if let Some(bits) = stored {
                return read_quantized(ckpt, base, bits, [inp, out], device);
            }
            let data = ckpt.read(&format!("{base}.weight"), &[out, inp], dims, Transposed)?;
            Ok::<_, WeightsError>(match quantize {
                Some(bits) => {
                    let values = data.try_into_vec::<f32>().expect("f32 as read");
                    QuantizedMatrix::quantize(&values, inp, out, bits).to_tensor(device)
                }
                None => Tensor::from_data(data, device),
            })
        };

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
                        weight(ckpt, &format!("{p}.attn.Wqkv"), [3 * h, h], "3·n_embd, n_embd")?,
                        ckpt.tensor(
                            &format!("{p}.attn.qk_bias"),
                            [2, 1, nh, hd],
                            "2, 1, n_heads, n_embd / n_heads",
                            AsStored,
                            device,
                        )?,
                        weight(ckpt, &format!("{p}.attn.proj"), [h, h], "n_embd, n_embd")?,
                        weight(ckpt, &format!("{p}.mlp.fc"), [2 * i, h], "2·intermediate_size, n_embd")?,
                        weight(ckpt, &format!("{p}.mlp.proj"), [h, i], "n_embd, intermediate_size")?,
                        |_| norms.next().expect("four norms"),
                    ))
                })
                .collect()
        };
        let prelude = stack(&mut ckpt, STACKS[0], config.n_layers_in_prelude)?;
        let core_block = stack(&mut ckpt, STACKS[1], config.n_layers_in_recurrent_block)?;
        let coda = stack(&mut ckpt, STACKS[2], config.n_layers_in_coda)?;
        let adapter = weight(&mut ckpt, "transformer.adapter", [h, 2 * h], "n_embd, 2·n_embd")?;
        let ln_f = ckpt.tensor("transformer.ln_f.weight", [h], "n_embd", AsStored, device)?;
        ckpt.finish()?;
        let mut config = config.clone();
        if let Some(bits) = quantize {
            config.quantization = Some(Quantization::new(bits));
        }
        Ok(Self {
            wte: Param::from_tensor(wte),
            prelude,
            adapter: linear(adapter),
            core_block,
            coda,
            ln_f: RmsNorm::new(ln_f, config.norm_eps),
            config,
            rotations: Default::default(),
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
    /// copies, as the reference's `state_dict` has them), sharded above `max_shard_bytes`. A
    /// quantized linear is written as its levels and scales ([`QUANTIZED_SUFFIX`],
    /// [`SCALES_SUFFIX`]), which only this crate reads.
    pub fn export_hf(&self, dir: impl AsRef<Path>, max_shard_bytes: usize) -> Result<(), WeightsError> {
        let dir = dir.as_ref();
        let mut entries = BTreeMap::new();
        for (key, param) in self.reference_params() {
            match param.quantized() {
                Some(matrix) => {
                    let base = key.strip_suffix(".weight").expect("a linear's key ends in .weight");
                    let (levels, shape) = matrix.stored_levels();
                    entries.insert(
                        format!("{base}.{QUANTIZED_SUFFIX}"),
                        Entry {
                            shape,
                            bytes: levels,
                            dtype: levels_dtype(matrix.bits),
                        },
                    );
                    entries.insert(
                        format!("{base}.{SCALES_SUFFIX}"),
                        Entry {
                            shape: vec![matrix.rows, groups(matrix.cols)],
                            bytes: matrix.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
                            dtype: Dtype::F16,
                        },
                    );
                }
                None => {
                    entries.insert(key, param.entry());
                }
            }
        }
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

    /// The levels and scales of a quantized matrix; `None` for a float parameter.
    pub fn quantized(&self) -> Option<QuantizedMatrix> {
        match self {
            ParamRef::Matrix(p, _) => QuantizedMatrix::from_tensor(p.val()),
            _ => None,
        }
    }

    /// Whether every value is finite (one boolean read back from the device).
    fn is_finite(&self) -> bool {
        match self {
            ParamRef::Vector(p) => p.val().is_finite().all().into_scalar(),
            ParamRef::Matrix(p, _) if matches!(p.val().dtype(), DType::QFloat(_)) => {
                p.val().dequantize().is_finite().all().into_scalar()
            }
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

/// How a folder stores levels of `bits` ([`QuantizedMatrix::stored_levels`]).
fn levels_dtype(bits: Bits) -> Dtype {
    match bits {
        Bits::Eight => Dtype::I8,
        Bits::Four => Dtype::U8,
    }
}

/// The levels and scales of the linear `base` in a quantized folder, checked, as a quantized
/// `[in, out]` tensor on `device`.
fn read_quantized(
    ckpt: &mut Checkpoint,
    base: &str,
    bits: Bits,
    [inp, out]: [usize; 2],
    device: &Device,
) -> Result<Tensor<2>, WeightsError> {
    let key = format!("{base}.{QUANTIZED_SUFFIX}");
    let shape = QuantizedMatrix::stored_shape(bits, inp, out);
    let levels = ckpt.raw(
        &key,
        &shape,
        "the linear's [in, out], out halved for 4 bits",
        levels_dtype(bits),
    )?;
    let scales_key = format!("{base}.{SCALES_SUFFIX}");
    let scales = ckpt.raw(
        &scales_key,
        &[inp, groups(out)],
        "the linear's [in, out / 32]",
        Dtype::F16,
    )?;
    let scales: Vec<f16> = scales
        .chunks_exact(2)
        .map(|b| f16::from_le_bytes([b[0], b[1]]))
        .collect();
    check_scales(&scales).map_err(|reason| WeightsError::Quantized {
        path: ckpt.path_of(&scales_key).to_path_buf(),
        key: scales_key.clone(),
        reason,
    })?;
    let matrix =
        QuantizedMatrix::from_stored(bits, inp, out, &levels, scales).map_err(|reason| WeightsError::Quantized {
            path: ckpt.path_of(&key).to_path_buf(),
            key,
            reason,
        })?;
    Ok(matrix.to_tensor(device))
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
