//! RMSNorm as the reference computes it ("RMSNorm_llama"): normalise in f32, cast back to the
//! input's dtype, then scale by the learned weight.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

use crate::kernels::rms_norm::fused_rms_norm;

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
        let weight = self.weight.val();
        fused_rms_norm(&x, &weight, self.eps).unwrap_or_else(|| self.composed(x))
    }

    /// The norm as tensor operations: every backend but Flex, and half precision on Flex.
    pub(crate) fn composed<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = if dtype == DType::F32 {
            x
        } else {
            x.cast(FloatDType::F32)
        };
        let inv_rms = x.clone().square().mean_dim(D - 1).add_scalar(self.eps).sqrt().recip();
        let normed = x * inv_rms;
        let normed = if dtype == DType::F32 {
            normed
        } else {
            normed.cast(FloatDType::from(dtype))
        };
        normed * self.weight.val().unsqueeze()
    }
}
