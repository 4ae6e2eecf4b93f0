//! 8- and 4-bit weights for the linear layers (every projection of the prelude, the core, the
//! coda and the adapter), in blocks of [`GROUP`] values along a weight's output dimension with
//! one f16 scale each: Q8_0's layout, and its 4-bit sibling.
//!
//! A quantized weight is a Burn quantized tensor (`DType::QFloat`) inside the same `Linear`, so
//! the model's definition does not change: on the CubeCL backends (wgpu, CUDA) the values stay
//! packed on the device and Burn's matrix kernels read them as they are; on Flex each value is
//! one `i8` and [`crate::kernels::quantized_linear`] reads it in place. Embeddings, the tied head,
//! norms and biases stay in the float type: the head and the embedding run once per token, not
//! once per recurrence step, so their bytes are not what decoding waits on.
//!
//! The rounding is done here on the host, once, the same on every backend: a scale is the
//! block's largest magnitude over the largest level (127 or 7), rounded to f16, and a value is
//! `round(w / scale)`. A folder written by `huginn quantize` stores the levels and the scales
//! as they are (see [`QUANTIZED_SUFFIX`]), so a model loads bit for bit the same as it was
//! quantized.

use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue, QuantizedBytes, ScaleDtype};
use half::f16;
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::huginn::Huginn;
use crate::kernels::flex::runs_on_flex;

/// Values per scale, along a weight's output dimension (Burn's `[in, out]` layout).
pub const GROUP: usize = 32;

/// Key suffixes of a quantized weight in a folder: the levels (`i8`, or two 4-bit levels per
/// byte) and the scales (`f16`), both in Burn's `[in, out]` layout, under the reference name
/// without its `.weight`. Names the reference does not have, so no float loader misreads them.
pub const QUANTIZED_SUFFIX: &str = "qweight";
pub const SCALES_SUFFIX: &str = "qscales";

/// The bits of each weight value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum Bits {
    Eight,
    Four,
}

impl Bits {
    /// The largest level: values are integers in `-max..=max` (symmetric, so zero is exact).
    pub fn max_level(self) -> i8 {
        match self {
            Bits::Eight => 127,
            Bits::Four => 7,
        }
    }

    pub fn count(self) -> u8 {
        match self {
            Bits::Eight => 8,
            Bits::Four => 4,
        }
    }

    fn value(self) -> QuantValue {
        match self {
            Bits::Eight => QuantValue::Q8S,
            Bits::Four => QuantValue::Q4S,
        }
    }
}

impl TryFrom<u8> for Bits {
    type Error = String;
    fn try_from(bits: u8) -> Result<Self, String> {
        match bits {
            8 => Ok(Bits::Eight),
            4 => Ok(Bits::Four),
            other => Err(format!("{other}-bit weights are not supported (8 or 4)")),
        }
    }
}

impl From<Bits> for u8 {
    fn from(bits: Bits) -> u8 {
        bits.count()
    }
}

impl std::str::FromStr for Bits {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bits: u8 = text
            .parse()
            .map_err(|_| format!("{text:?} is not a bit width (8 or 4)"))?;
        Bits::try_from(bits)
    }
}

/// How a folder's linear weights are stored: `config.json`'s `"quantization"` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantization {
    pub bits: Bits,
    /// Values per scale; this build knows [`GROUP`].
    pub group_size: usize,
    /// The scales' type; this build knows `"f16"`.
    pub scale_dtype: String,
}

impl Quantization {
    pub fn new(bits: Bits) -> Self {
        Self {
            bits,
            group_size: GROUP,
            scale_dtype: "f16".into(),
        }
    }

    /// Refuses a scheme this build does not read, naming what it reads.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let field = |field: &str, reason: String| {
            Err(ConfigError::Field {
                field: format!("quantization.{field}"),
                reason,
            })
        };
        if self.group_size != GROUP {
            return field(
                "group_size",
                format!(
                    "{} is not supported (this build reads groups of {GROUP})",
                    self.group_size
                ),
            );
        }
        if self.scale_dtype != "f16" {
            return field(
                "scale_dtype",
                format!("{:?} is not supported (this build reads \"f16\")", self.scale_dtype),
            );
        }
        Ok(())
    }
}

/// A `[rows, cols]` weight (Burn's `[in, out]`) as levels and one scale per [`GROUP`] columns
/// of a row (the last group of a row may be shorter).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedMatrix {
    pub bits: Bits,
    pub rows: usize,
    pub cols: usize,
    /// `rows · cols` levels, row-major.
    pub levels: Vec<i8>,
    /// `rows · groups(cols)` scales, row-major.
    pub scales: Vec<f16>,
}

/// Groups in a row of `cols` values.
pub fn groups(cols: usize) -> usize {
    cols.div_ceil(GROUP)
}

impl QuantizedMatrix {
    /// Rounds `values` (`[rows, cols]`, row-major, finite).
    pub fn quantize(values: &[f32], rows: usize, cols: usize, bits: Bits) -> Self {
        assert_eq!(values.len(), rows * cols, "the values do not fill the matrix");
        let max = f32::from(bits.max_level());
        let mut levels = Vec::with_capacity(values.len());
        let mut scales = Vec::with_capacity(rows * groups(cols));
        for row in values.chunks_exact(cols.max(1)).take(rows) {
            for group in row.chunks(GROUP) {
                let peak = group.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = f16::from_f32(peak / max);
                let scale_f32 = scale.to_f32();
                // A block of zeros (or one whose scale underflows f16) keeps zero levels.
                let inverse = if scale_f32 > 0.0 { 1.0 / scale_f32 } else { 0.0 };
                levels.extend(group.iter().map(|v| (v * inverse).round().clamp(-max, max) as i8));
                scales.push(scale);
            }
        }
        Self {
            bits,
            rows,
            cols,
            levels,
            scales,
        }
    }

    /// The values the levels stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        let groups = groups(self.cols);
        let mut out = Vec::with_capacity(self.levels.len());
        for (r, row) in self.levels.chunks_exact(self.cols.max(1)).take(self.rows).enumerate() {
            for (g, group) in row.chunks(GROUP).enumerate() {
                let scale = self.scales[r * groups + g].to_f32();
                out.extend(group.iter().map(|&q| f32::from(q) * scale));
            }
        }
        out
    }

    /// Burn's scheme for these levels on `device`: `i8` per value on Flex (the only store it
    /// has), packed into `u32` words on the CubeCL backends.
    fn scheme(&self, device: &Device) -> QuantScheme {
        let store = if runs_on_flex(device) {
            QuantStore::Native
        } else {
            QuantStore::PackedU32(0)
        };
        QuantScheme::default()
            .with_value(self.bits.value())
            .with_store(store)
            .per_block([GROUP as u8], ScaleDtype::F16)
    }

    /// The weight as a quantized tensor on `device`.
    ///
    /// Flex takes the levels as they are. The CubeCL backends pack on the device: they get the
    /// dequantized values and round them again under the same scheme, which gives back the same
    /// levels and scales (each block's largest value is exactly `max · scale`).
    pub fn to_tensor(&self, device: &Device) -> Tensor<2> {
        let scheme = self.scheme(device);
        let shape = [self.rows, self.cols];
        if runs_on_flex(device) {
            let scales: Vec<f32> = self.scales.iter().map(|s| s.to_f32()).collect();
            let data = TensorData::quantized(self.levels.clone(), shape, scheme, &scales, None);
            return Tensor::from_data(data, device);
        }
        Tensor::<2>::from_data(TensorData::new(self.dequantize(), shape), device).quantize_dynamic(&scheme)
    }

    /// The levels and scales of a quantized tensor, `None` for a float one or one quantized
    /// under another scheme.
    pub fn from_tensor(tensor: Tensor<2>) -> Option<Self> {
        let DType::QFloat(scheme) = tensor.dtype() else {
            return None;
        };
        let bits = match scheme.value {
            QuantValue::Q8S => Bits::Eight,
            QuantValue::Q4S => Bits::Four,
            _ => return None,
        };
        let block = scheme.block_size()?;
        if block.to_dim_vec(2) != [1, GROUP as u8] || scheme.scale_dtype() != ScaleDtype::F16 {
            return None;
        }
        let [rows, cols] = tensor.dims();
        let data = tensor.into_data();
        let (levels, scales) = QuantizedBytes {
            bytes: data.into_bytes(),
            scheme,
            shape: [rows, cols].into(),
        }
        .into_vec_i8();
        if scales.global.is_some() || scales.block.len() != rows * groups(cols) {
            return None;
        }
        Some(Self {
            bits,
            rows,
            cols,
            levels,
            scales: scales.block.into_iter().map(f16::from_f32).collect(),
        })
    }

    /// The levels as stored in a folder: `i8` as they are for 8 bits; for 4 bits two levels a
    /// byte, each as `level + 8` (1..=15), the even column in the low nibble, each row padded
    /// to whole bytes.
    pub fn stored_levels(&self) -> (Vec<u8>, Vec<usize>) {
        match self.bits {
            Bits::Eight => (
                self.levels.iter().map(|&q| q as u8).collect(),
                vec![self.rows, self.cols],
            ),
            Bits::Four => {
                let width = self.cols.div_ceil(2);
                let mut bytes = Vec::with_capacity(self.rows * width);
                for row in self.levels.chunks_exact(self.cols.max(1)).take(self.rows) {
                    for pair in row.chunks(2) {
                        let low = (pair[0] + 8) as u8;
                        let high = pair.get(1).map_or(0, |&q| (q + 8) as u8);
                        bytes.push(low | (high << 4));
                    }
                }
                (bytes, vec![self.rows, width])
            }
        }
    }

    /// The shape [`Self::stored_levels`] writes for a `[rows, cols]` weight.
    pub fn stored_shape(bits: Bits, rows: usize, cols: usize) -> [usize; 2] {
        match bits {
            Bits::Eight => [rows, cols],
            Bits::Four => [rows, cols.div_ceil(2)],
        }
    }

    /// Reads back what [`Self::stored_levels`] wrote (of the stored shape) with its scales,
    /// checking every level and scale: a level outside `-max..=max`, or a scale that is not a
    /// finite non-negative number, is a corrupt file, reported as the reason.
    pub fn from_stored(bits: Bits, rows: usize, cols: usize, stored: &[u8], scales: Vec<f16>) -> Result<Self, String> {
        let max = bits.max_level();
        let levels: Vec<i8> = match bits {
            Bits::Eight => stored.iter().map(|&b| b as i8).collect(),
            Bits::Four => {
                let width = cols.div_ceil(2);
                let mut levels = Vec::with_capacity(rows * cols);
                for row in stored.chunks_exact(width.max(1)).take(rows) {
                    for (c, byte) in row.iter().enumerate() {
                        levels.push((byte & 0x0f) as i8 - 8);
                        if 2 * c + 1 < cols {
                            levels.push((byte >> 4) as i8 - 8);
                        } else if byte >> 4 != 0 {
                            return Err("a row's padding nibble is not zero".into());
                        }
                    }
                }
                levels
            }
        };
        if let Some(q) = levels.iter().find(|q| !(-max..=max).contains(*q)) {
            return Err(format!(
                "level {q} is outside -{max}..={max} of {}-bit weights",
                bits.count()
            ));
        }
        check_scales(&scales)?;
        Ok(Self {
            bits,
            rows,
            cols,
            levels,
            scales,
        })
    }
}

/// Every scale a finite non-negative number, or the first that is not, as the reason.
pub fn check_scales(scales: &[f16]) -> Result<(), String> {
    match scales.iter().find(|s| !s.is_finite() || s.to_f32() < 0.0) {
        Some(s) => Err(format!("scale {s} is not a finite non-negative number")),
        None => Ok(()),
    }
}

/// `weight` quantized to `bits` on its device (a float weight; a quantized one is returned as is).
pub fn quantize_weight(weight: Tensor<2>, bits: Bits) -> Tensor<2> {
    if matches!(weight.dtype(), DType::QFloat(_)) {
        return weight;
    }
    let [rows, cols] = weight.dims();
    let device = weight.device();
    let values: Vec<f32> = weight
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 after convert");
    QuantizedMatrix::quantize(&values, rows, cols, bits).to_tensor(&device)
}

impl Huginn {
    /// The model with every linear weight (prelude, adapter, core, coda) quantized to `bits`, one
    /// weight at a time, and the scheme recorded in its config. Weights already quantized stay
    /// as they are.
    pub fn quantize(mut self, bits: Bits) -> Self {
        let quantize = |layer: &mut Linear| {
            layer.weight = layer.weight.clone().map(|w| quantize_weight(w, bits));
        };
        quantize(&mut self.adapter);
        for block in self
            .prelude
            .iter_mut()
            .chain(&mut self.core_block)
            .chain(&mut self.coda)
        {
            for layer in [
                &mut block.attn.wqkv,
                &mut block.attn.proj,
                &mut block.mlp.fc,
                &mut block.mlp.proj,
            ] {
                quantize(layer);
            }
        }
        self.config.quantization = Some(Quantization::new(bits));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        // A deterministic spread of magnitudes, signs and a zero block.
        (0..rows * cols)
            .map(|i| {
                let x = ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32;
                if i < GROUP {
                    0.0
                } else {
                    (x - 0.5) * (1.0 + (i % 7) as f32)
                }
            })
            .collect()
    }

    #[test]
    fn rounding_error_is_at_most_half_a_step() {
        for bits in [Bits::Eight, Bits::Four] {
            for (rows, cols) in [(3, 32), (5, 70), (2, 1)] {
                let values = matrix(rows, cols, 7);
                let q = QuantizedMatrix::quantize(&values, rows, cols, bits);
                let back = q.dequantize();
                for (i, (v, b)) in values.iter().zip(&back).enumerate() {
                    let scale = q.scales[(i / cols) * groups(cols) + (i % cols) / GROUP].to_f32();
                    // Half a step, plus what rounding the scale to f16 moves the largest level.
                    let bound = 0.5 * scale + f32::from(bits.max_level()) * scale * 2f32.powi(-11) + 1e-7;
                    assert!((v - b).abs() <= bound, "{bits:?} [{rows}, {cols}] #{i}: {v} vs {b}");
                }
            }
        }
    }

    #[test]
    fn stored_levels_read_back_the_same() {
        for bits in [Bits::Eight, Bits::Four] {
            for (rows, cols) in [(3, 32), (4, 33), (1, 1)] {
                let q = QuantizedMatrix::quantize(&matrix(rows, cols, 3), rows, cols, bits);
                let (stored, shape) = q.stored_levels();
                assert_eq!(shape, QuantizedMatrix::stored_shape(bits, rows, cols));
                let back = QuantizedMatrix::from_stored(bits, rows, cols, &stored, q.scales.clone()).unwrap();
                assert_eq!(back, q);
            }
        }
    }

    #[test]
    fn corrupt_levels_and_scales_are_refused() {
        let q = QuantizedMatrix::quantize(&matrix(2, 64, 1), 2, 64, Bits::Eight);
        let (mut stored, _) = q.stored_levels();
        stored[5] = 0x80; // -128: outside the symmetric range
        let err = QuantizedMatrix::from_stored(Bits::Eight, 2, 64, &stored, q.scales.clone()).unwrap_err();
        assert!(err.contains("-128"), "{err}");
        let (stored, _) = q.stored_levels();
        for bad in [f16::NAN, f16::INFINITY, f16::from_f32(-0.5)] {
            let mut scales = q.scales.clone();
            scales[1] = bad;
            assert!(QuantizedMatrix::from_stored(Bits::Eight, 2, 64, &stored, scales).is_err());
        }
        let q4 = QuantizedMatrix::quantize(&matrix(1, 3, 1), 1, 3, Bits::Four);
        let (mut stored, _) = q4.stored_levels();
        stored[0] &= 0xf0; // nibble 0 is level -8
        assert!(QuantizedMatrix::from_stored(Bits::Four, 1, 3, &stored, q4.scales.clone()).is_err());
        let (mut stored, _) = q4.stored_levels();
        stored[1] |= 0x30; // padding nibble of an odd row
        assert!(QuantizedMatrix::from_stored(Bits::Four, 1, 3, &stored, q4.scales.clone()).is_err());
    }

    #[test]
    fn a_quantized_tensor_holds_the_levels_it_was_given() {
        let device = Device::flex();
        for bits in [Bits::Eight, Bits::Four] {
            let q = QuantizedMatrix::quantize(&matrix(6, 70, 9), 6, 70, bits);
            let tensor = q.to_tensor(&device);
            assert!(matches!(tensor.dtype(), DType::QFloat(_)));
            let dequantized: Vec<f32> = tensor
                .clone()
                .dequantize()
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .unwrap();
            assert_eq!(dequantized, q.dequantize());
            assert_eq!(QuantizedMatrix::from_tensor(tensor), Some(q));
        }
    }

    #[test]
    fn bit_widths_parse_and_unknown_ones_are_named() {
        assert_eq!("8".parse::<Bits>(), Ok(Bits::Eight));
        assert_eq!("4".parse::<Bits>(), Ok(Bits::Four));
        assert!("3".parse::<Bits>().unwrap_err().contains("3-bit"));
        let bad = Quantization {
            group_size: 64,
            ..Quantization::new(Bits::Eight)
        };
        assert!(bad.validate().unwrap_err().to_string().contains("groups of 32"));
    }
}
