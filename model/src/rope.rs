//! Rotary position embeddings on ADJACENT pairs `(x_{2j}, x_{2j+1})` (Meta-LLaMA complex
//! style, not GPT-NeoX's rotate-half), with `inv_freq_j = θ^{-2j/d}`, all computed in f32 as
//! the reference does.
//!
//! Like the reference's `freqs_cis`, the model keeps a table of every position of its context
//! ([`crate::Huginn::rotary`], computed at its first use); a pass takes its chunk's positions
//! from it and shares them with every attention layer.

use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

/// The rotation for one chunk of tokens, `[B, S, 1, d]` tables in f32 laid out per channel so
/// that rotating is `x·cos + swap(x)·sin`, where `swap` exchanges the two members of each pair:
/// `cos = (c₀, c₀, c₁, c₁, …)` and `sin = (−s₀, s₀, −s₁, s₁, …)`. This takes four tensor
/// operations per application instead of the eleven of splitting the pairs apart and stacking
/// them again, and every value is the same (`a − b·s` is `a + b·(−s)` exactly).
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl Rotary {
    /// Rotation for explicit positions `[B, S]` (rows may start at different offsets, as in a
    /// left-padded batch).
    pub fn new(positions: Tensor<2, Int>, head_dim: usize, theta: f64) -> Self {
        let device = positions.device();
        let [batch, len] = positions.dims();
        let half = head_dim / 2;
        // The reference: 1 / theta ** (arange(0, d, 2).float() / d), in f32.
        let inv_freq: Vec<f32> = (0..half)
            .map(|j| 1.0 / (theta as f32).powf((2 * j) as f32 / head_dim as f32))
            .collect();
        let inv_freq = Tensor::<1>::from_data(TensorData::new(inv_freq, [half]), (&device, DType::F32));
        let t = positions.float().cast(FloatDType::F32).reshape([batch, len, 1, 1]);
        let angles = t * inv_freq.reshape([1, 1, 1, half]);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let shape = [batch, len, 1, head_dim];
        Self {
            cos: Tensor::stack::<5>(vec![cos.clone(), cos], 4).reshape(shape),
            sin: Tensor::stack::<5>(vec![sin.clone().neg(), sin], 4).reshape(shape),
        }
    }

    /// Rotation for positions `start..start + len`, the same for every row of a batch.
    pub fn contiguous(start: usize, batch: usize, len: usize, head_dim: usize, theta: f64, device: &Device) -> Self {
        let positions = Tensor::<1, Int>::arange(start as i64..(start + len) as i64, device)
            .reshape([1, len])
            .expand([batch, len]);
        Self::new(positions, head_dim, theta)
    }

    /// Positions `start..start + len` of a rotation for positions from 0 (`[1, S, 1, d]`), one
    /// table shared by every row of a batch: the values [`Self::contiguous`] computes for them,
    /// since each entry is computed from its own position alone.
    pub fn positions(&self, start: usize, len: usize) -> Self {
        Self {
            cos: self.cos.clone().narrow(1, start, len),
            sin: self.sin.clone().narrow(1, start, len),
        }
    }

    pub fn device(&self) -> Device {
        self.cos.device()
    }

    /// The tables `[B or 1, S, 1, d]`: `y = x·cos + pair-swapped(x)·sin` (for fused kernels).
    pub(crate) fn tables(&self) -> (&Tensor<4>, &Tensor<4>) {
        (&self.cos, &self.sin)
    }

    /// The same rotation outside any autodiff graph (for gradient-free iterations).
    pub fn without_autodiff(&self) -> Self {
        Self {
            cos: self.cos.clone().without_autodiff(),
            sin: self.sin.clone().without_autodiff(),
        }
    }

    /// Rotates `x` of shape `[B, S, H, d]`; computed in f32, returned in `x`'s dtype.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let dtype = x.dtype();
        let [b, s, h, d] = x.dims();
        let x = if dtype == DType::F32 {
            x
        } else {
            x.cast(FloatDType::F32)
        };
        let swapped = x.clone().reshape([b, s, h, d / 2, 2]).flip([4]).reshape([b, s, h, d]);
        let y = x * self.cos.clone() + swapped * self.sin.clone();
        if dtype == DType::F32 {
            y
        } else {
            y.cast(FloatDType::from(dtype))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_adjacent_pairs() {
        let device = Device::flex();
        // One head of width 4: pairs (x0, x1) and (x2, x3); position 1.
        let rot = Rotary::contiguous(1, 1, 1, 4, 100.0, &device);
        let x = Tensor::<1>::from_floats([1.0, 2.0, 3.0, 4.0], &device).reshape([1, 1, 1, 4]);
        let y: Vec<f32> = rot.apply(x).into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        let (a0, a1) = (1.0f64, 1.0 / 100f64.powf(0.5));
        let want = [
            a0.cos() - 2.0 * a0.sin(),
            2.0 * a0.cos() + a0.sin(),
            3.0 * a1.cos() - 4.0 * a1.sin(),
            4.0 * a1.cos() + 3.0 * a1.sin(),
        ];
        for (got, want) in y.iter().zip(want) {
            assert!((*got as f64 - want).abs() < 1e-6, "{y:?} vs {want:?}");
        }
    }

    /// A window of the whole context's table is, bit for bit, the rotation computed for the
    /// window's positions alone.
    #[test]
    fn a_window_of_the_table_is_the_window_s_rotation() {
        let device = Device::flex();
        let table = Rotary::contiguous(0, 1, 300, 16, 50000.0, &device);
        for (start, len) in [(0, 1), (5, 32), (17, 1), (250, 50), (299, 1)] {
            let alone = Rotary::contiguous(start, 1, len, 16, 50000.0, &device);
            let window = table.positions(start, len);
            for (a, b) in [(&alone.cos, &window.cos), (&alone.sin, &window.sin)] {
                assert_eq!(a.dims(), b.dims());
                let (a, b): (Vec<f32>, Vec<f32>) = (
                    a.clone().into_data().try_into_vec().unwrap(),
                    b.clone().into_data().try_into_vec().unwrap(),
                );
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{start}..+{len}"
                );
            }
        }
    }

    #[test]
    fn position_zero_is_identity() {
        let device = Device::flex();
        let rot = Rotary::contiguous(0, 1, 1, 8, 50000.0, &device);
        let x = Tensor::<4>::random([1, 1, 2, 8], burn::tensor::Distribution::Default, &device);
        let diff = (rot.apply(x.clone()) - x).abs().max().into_scalar::<f32>();
        assert!(diff < 1e-7);
    }
}
