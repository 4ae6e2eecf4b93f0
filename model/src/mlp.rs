//! Gated MLP with one fused input matrix: `proj(SiLU(gate) ⊙ up)`, the gate being the FIRST
//! half of `fc`'s output.

use burn::nn::Linear;
use burn::prelude::*;

use crate::kernels::gate::gated_silu;
use crate::kernels::linear::linear;

#[derive(Module, Debug)]
pub struct GatedMlp {
    /// `[h, 2·I]` (Burn's `[in, out]` layout): columns `[gate | up]`.
    pub fc: Linear,
    /// `[I, h]`.
    pub proj: Linear,
}

impl GatedMlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        linear(&self.proj, gated_silu(linear(&self.fc, x)))
    }
}
