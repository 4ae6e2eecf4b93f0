//! RMSNorm as the reference computes it ("RMSNorm_llama"): normalise in f32, cast back to the
//! input's dtype, then scale by the learned weight. The operation, fused on Flex and composed
//! of tensor operations elsewhere, is [`rms_norm`].

use burn::module::Param;
use burn::prelude::*;

use crate::kernels::rms_norm::rms_norm;

#[derive(Module, Debug)]
pub struct RmsNorm {
    /// Learned per-channel scale, `[h]`.
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor<1>, eps: f64) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            eps,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        rms_norm(x, self.weight.val(), self.eps)
    }
}
