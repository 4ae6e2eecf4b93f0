//! Gated MLP with one fused input matrix: `proj(SiLU(gate) ⊙ up)`, the gate being the FIRST
//! half of `fc`'s output.

use burn::nn::Linear;
use burn::prelude::*;

use crate::kernels::gate::gated_silu;
use crate::kernels::linear::linear;
use crate::probe;

#[derive(Module, Debug)]
pub struct GatedMlp {
    /// `[h, 2·I]` (Burn's `[in, out]` layout): columns `[gate | up]`.
    pub fc: Linear,
    /// `[I, h]`.
    pub proj: Linear,
}

impl GatedMlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate_up = linear(&self.fc, x);
        probe::note("MLP gate and up", &gate_up);
        let hidden = gated_silu(gate_up);
        probe::note("MLP hidden", &hidden);
        linear(&self.proj, hidden)
    }
}
