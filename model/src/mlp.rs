//! Gated MLP with one fused input matrix: `proj(SiLU(gate) ⊙ up)`, the gate being the FIRST
//! half of `fc`'s output.

use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::activation::silu;

#[derive(Module, Debug)]
pub struct GatedMlp {
    /// `[h, 2·I]` (Burn's `[in, out]` layout): columns `[gate | up]`.
    pub fc: Linear,
    /// `[I, h]`.
    pub proj: Linear,
}

impl GatedMlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let mut halves = self.fc.forward(x).chunk(2, 2);
        let up = halves.pop().expect("two halves");
        let gate = halves.pop().expect("two halves");
        self.proj.forward(silu(gate) * up)
    }
}
