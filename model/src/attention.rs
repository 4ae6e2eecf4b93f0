//! Causal self-attention with the reference's learned q/k bias (added before RoPE) and one
//! fused `Wqkv` projection whose output columns are `[q | k | v]`, each head-major.

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::cache::{Attend, KvCache, LayerSlot};
use crate::rope::Rotary;

#[derive(Module, Debug)]
pub struct CausalSelfAttention {
    /// `[h, 3h]`.
    pub wqkv: Linear,
    /// `[2, 1, H, d]`: `[0]` is added to the queries, `[1]` to the keys.
    pub qk_bias: Param<Tensor<4>>,
    /// `[h, h]`.
    pub proj: Linear,
    pub n_heads: usize,
}

impl CausalSelfAttention {
    /// `x`: `[B, S, h]` → `[B, S, h]`.
    pub fn forward(&self, x: Tensor<3>, rotary: &Rotary, slot: LayerSlot, cache: &mut dyn KvCache) -> Tensor<3> {
        let [b, s, h] = x.dims();
        let (nh, hd) = (self.n_heads, h / self.n_heads);
        let mut qkv = self.wqkv.forward(x).chunk(3, 2);
        let v = qkv.pop().expect("v").reshape([b, s, nh, hd]);
        let k = qkv.pop().expect("k").reshape([b, s, nh, hd]);
        let q = qkv.pop().expect("q").reshape([b, s, nh, hd]);
        let bias = self.qk_bias.val();
        let q = q + bias.clone().narrow(0, 0, 1);
        let k = k + bias.narrow(0, 1, 1);
        let q = rotary.apply(q).swap_dims(1, 2);
        let k = rotary.apply(k).swap_dims(1, 2);
        let v = v.swap_dims(1, 2);

        let Attend { keys, values, mask } = cache.update(slot, k, v);
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            // Bottom-right aligned: a chunk appended to a cache sees all earlier positions;
            // a single query needs no mask at all.
            is_causal: mask.is_none() && s > 1,
        };
        let mask = mask.map(|m| m.expand([b, nh, s, keys.dims()[2]]));
        let y = attention(q, keys, values, mask, None, options);
        self.proj.forward(y.swap_dims(1, 2).reshape([b, s, h]))
    }
}
