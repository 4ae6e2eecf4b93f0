//! Causal self-attention with the reference's learned q/k bias (added before RoPE) and one
//! fused `Wqkv` projection whose output columns are `[q | k | v]`, each head-major.
//!
//! The tensor operations below are the definition, and the composed default of the fused
//! operations [`forward`](CausalSelfAttention::forward) tries first on Flex: the whole layer
//! between the projections when no cache keeps the keys ([`chunk_attention`]), and the biased,
//! rotated heads otherwise ([`rotated_heads`]).

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::ops::AttentionModuleOptions;
use rayon::prelude::*;

use crate::cache::{Attend, KvCache, LayerSlot};
use crate::kernels::causal_attention::attention;
use crate::kernels::chunk_attention::{chunk_attention, rotated_heads};
use crate::kernels::linear::linear;
use crate::probe;
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
        let nh = self.n_heads;
        let qkv = linear(&self.wqkv, x);
        probe::note("queries, keys and values", &qkv);
        if !cache.stores()
            && let Some(y) = chunk_attention(&qkv, &self.bias(), rotary, nh)
        {
            return linear(&self.proj, y);
        }
        linear(&self.proj, self.attend(qkv, rotary, slot, cache))
    }

    /// `x`: `[B, S, h]` holding `B` independent sequences, row `b` at its own positions, cache
    /// and unrolled layer `slot(b)`. The projections read their weights once for all rows;
    /// each row attends on its own, exactly as it would alone. The rows attend in parallel, one
    /// task of the pool each: a row's attention is a chain of small operations that alone
    /// leaves the other cores idle.
    pub fn forward_rows(
        &self,
        x: Tensor<3>,
        rows: &mut [RowPass<'_>],
        slot: impl Fn(usize) -> LayerSlot + Sync,
    ) -> Tensor<3> {
        let qkv = linear(&self.wqkv, x);
        probe::note("queries, keys and values", &qkv);
        let attended = rows
            .par_iter_mut()
            .enumerate()
            .map(|(b, row)| self.attend(qkv.clone().narrow(0, b, 1), &row.rotary, slot(b), &mut *row.cache))
            .collect();
        linear(&self.proj, Tensor::cat(attended, 0))
    }

    /// `[q | k | v]` rows `[B, S, 3h]` → the attended values `[B, S, h]`, before the output
    /// projection: biased and rotated queries and keys, keys and values stored in `cache`.
    fn attend(&self, qkv: Tensor<3>, rotary: &Rotary, slot: LayerSlot, cache: &mut dyn KvCache) -> Tensor<3> {
        let [b, s, h3] = qkv.dims();
        let h = h3 / 3;
        let (nh, hd) = (self.n_heads, h / self.n_heads);
        let bias = self.bias();
        let [q, k, v] = rotated_heads(&qkv, &bias, rotary, nh).unwrap_or_else(|| {
            // Queries and keys get their bias and rotation together, as `2·H` heads (queries
            // first): half the operations of doing each on its own.
            let qk = qkv.clone().narrow(2, 0, 2 * h).reshape([b, s, 2 * nh, hd]);
            let qk = qk + bias.reshape([1, 1, 2 * nh, hd]);
            let qk = rotary.apply(qk);
            let q = qk.clone().narrow(2, 0, nh).swap_dims(1, 2);
            let k = qk.narrow(2, nh, nh).swap_dims(1, 2);
            let v = qkv.narrow(2, 2 * h, h).reshape([b, s, nh, hd]).swap_dims(1, 2);
            [q, k, v]
        });

        let Attend { keys, values, mask } = cache.update(slot, k, v);
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            // Bottom-right aligned: a chunk appended to a cache sees all earlier positions;
            // a single query needs no mask at all.
            is_causal: mask.is_none() && s > 1,
        };
        let mask = mask.map(|m| m.expand([b, nh, s, keys.dims()[2]]));
        attention(q, keys, values, mask, options)
            .swap_dims(1, 2)
            .reshape([b, s, h])
    }

    /// The q/k bias as one `[2h]` vector (queries' then keys').
    fn bias(&self) -> Tensor<1> {
        let bias = self.qk_bias.val();
        let len = bias.shape().num_elements();
        bias.reshape([len])
    }
}

/// One sequence of a pass over independent sequences stacked along the batch (the server's
/// rows, each at its own position and depth): where its tokens sit and the cache it reads
/// and writes.
pub struct RowPass<'a> {
    /// Positions of the row's chunk, `[1, S]`.
    pub rotary: Rotary,
    pub cache: &'a mut (dyn KvCache + Send),
}
