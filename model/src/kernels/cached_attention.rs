//! Attention of a decoding step's few queries over the cached keys and values, reading the cache
//! where it lies.
//!
//! A cache hands out its keys as a narrowed view of a longer buffer (`[B, H, ..len, d]` of
//! `[B, H, capacity, d]`), and burn-flex 0.22's attention first copies every operand into a
//! contiguous tensor: for one query that copy costs more than the attention itself (measured:
//! 15% of a batch-1 decoding step, against about 1% for the attention). Each head's keys are
//! contiguous rows within the view, so here they are read in place (bf16 widened on the fly:
//! burn-flex also copies bf16 operands to f32 first). Inference only (no autodiff), f32 or bf16
//! on Flex, no mask; everything else keeps Burn's attention. The lasting fix is a stride-aware
//! attention in burn-flex.

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::ops::AttentionModuleOptions;
use half::bf16;
use rayon::prelude::*;

use super::flex::{Widen, runs_on_flex, tensor_of, widened_rows, widens};
use super::simd::dot;

/// The most queries per head the in-place kernel takes (a decoding step has one; speculative
/// verification a few). Longer chunks are prefill, where Burn's blocked products win.
pub const FEW_QUERIES: usize = 8;

/// Multiply-adds below which one thread does every head: waking a sleeping worker costs more.
const SERIAL_MACS: usize = 1 << 17;

/// The same where the other workers are kept polling ([`super::threads::keep_warm`]), so that
/// handing them heads costs little: a decoding step's attention over a short cache.
const SERIAL_MACS_WARM: usize = 1 << 14;

/// `softmax(q·kᵀ/√d)·v` on `[B, H, S, d]` queries and `[B, H, T, d]` keys and values, causal
/// bottom-right aligned (query `i` sees keys up to `T - S + i`) when `causal`.
#[backend_extension(Flex, Autodiff)]
pub trait CachedAttentionOps: Backend {
    fn cached_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
    ) -> FloatTensor<Self> {
        Self::attention(q, k, v, None, None, unscaled(causal))
    }
}

/// Burn's options for this operation: the default `1/√d` scale, no soft cap.
fn unscaled(causal: bool) -> AttentionModuleOptions {
    AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: causal,
    }
}

/// Whether [`cached_attention`] takes these operands.
pub fn fits(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, mask_free: bool, options: &AttentionModuleOptions) -> bool {
    let device = q.device();
    let [_, heads, queries, _] = q.dims();
    mask_free
        && options.scale.is_none()
        && options.softcap.is_none()
        && !device.is_autodiff()
        && runs_on_flex(&device)
        && widens(q.dtype())
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && k.dims()[1] == heads
        && (1..=FEW_QUERIES).contains(&queries)
}

/// The attention, with the keys and values read in place; see [`fits`].
pub fn cached_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, causal: bool) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as CachedAttentionOps>::cached_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        causal,
    ))
}

/// A `[B, H, T, d]` operand read in place: rows of `d` contiguous elements.
struct Rows<'a, E> {
    data: &'a [E],
    start: usize,
    strides: [usize; 3],
}

impl<'a, E: Widen> Rows<'a, E> {
    /// `x`'s rows over its storage `data`; `None` where the last dimension is not contiguous or
    /// a stride is negative.
    fn new(x: &FlexTensor, data: &'a [E]) -> Option<Self> {
        let layout = x.layout();
        let strides = layout.strides();
        if strides[3] != 1 || strides[..3].iter().any(|&s| s < 0) {
            return None;
        }
        Some(Self {
            data,
            start: layout.start_offset(),
            strides: [strides[0] as usize, strides[1] as usize, strides[2] as usize],
        })
    }

    fn row(&self, b: usize, h: usize, t: usize, width: usize) -> &'a [E] {
        let at = self.start + b * self.strides[0] + h * self.strides[1] + t * self.strides[2];
        &self.data[at..at + width]
    }
}

impl CachedAttentionOps for Flex {
    fn cached_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor, causal: bool) -> FlexTensor {
        let q = q.to_contiguous();
        let dtype = q.dtype();
        let same = k.dtype() == dtype && v.dtype() == dtype;
        let out = match (widened_rows(&q), dtype) {
            (Some(queries), DType::F32) if same => Rows::new(&k, k.storage::<f32>())
                .zip(Rows::new(&v, v.storage::<f32>()))
                .map(|(keys, values)| attend(&q, &queries, &k, keys, &v, values, causal)),
            (Some(queries), DType::BF16) if same => Rows::new(&k, k.storage::<bf16>())
                .zip(Rows::new(&v, v.storage::<bf16>()))
                .map(|(keys, values)| attend(&q, &queries, &k, keys, &v, values, causal)),
            _ => None,
        };
        let Some(out) = out else {
            return <Self as burn::backend::ops::ModuleOps<Self>>::attention(q, k, v, None, None, unscaled(causal));
        };
        let mut shape = q.shape();
        shape[3] = v.shape()[3];
        tensor_of(out, shape, dtype)
    }
}

/// The attention of the (widened) `queries` of `q` over the keys and values read in place, in
/// f32: the output `[B, H, S, d_v]`.
fn attend<E: Widen>(
    q: &FlexTensor,
    queries: &[f32],
    k: &FlexTensor,
    keys: Rows<'_, E>,
    v: &FlexTensor,
    values: Rows<'_, E>,
    causal: bool,
) -> Vec<f32> {
    let ([batch, heads, seq_q, dim], seq_kv, dim_v) = {
        let s = q.shape();
        ([s[0], s[1], s[2], s[3]], k.shape()[2], v.shape()[3])
    };
    let scale = 1.0 / (dim as f32).sqrt();
    let mut out = vec![0f32; batch * heads * seq_q * dim_v];
    let head = |(index, out): (usize, &mut [f32])| {
        let (b, h) = (index / heads, index % heads);
        let mut scores = vec![0f32; seq_kv];
        let q_head = &queries[index * seq_q * dim..(index + 1) * seq_q * dim];
        for (i, (query, out)) in q_head.chunks_exact(dim).zip(out.chunks_exact_mut(dim_v)).enumerate() {
            // Keys this query sees: all, or up to its own position when causal.
            let seen = if causal {
                (seq_kv + i + 1).saturating_sub(seq_q)
            } else {
                seq_kv
            };
            if seen == 0 {
                continue; // fully masked: zeros, as Burn's attention gives
            }
            let scores = &mut scores[..seen];
            for (t, s) in scores.iter_mut().enumerate() {
                *s = dot(query, keys.row(b, h, t, dim)) * scale;
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for (t, &p) in scores.iter().enumerate() {
                let p = p / sum;
                for (o, &x) in out.iter_mut().zip(values.row(b, h, t, dim_v)) {
                    *o += p * x.widen();
                }
            }
        }
    };
    let head_len = seq_q * dim_v;
    let macs = batch * heads * seq_q * seq_kv * (dim + dim_v);
    let warm = macs >= SERIAL_MACS_WARM && super::threads::keep_warm();
    if head_len == 0 || macs < if warm { SERIAL_MACS_WARM } else { SERIAL_MACS } {
        out.chunks_exact_mut(head_len.max(1)).enumerate().for_each(head);
    } else {
        out.par_chunks_exact_mut(head_len).enumerate().for_each(head);
    }
    out
}

/// Gradients never reach this operation ([`fits`] turns autodiff away); the default keeps the
/// trait whole.
impl<B: Backend, C: CheckpointStrategy> CachedAttentionOps for Autodiff<B, C> {}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// Against Burn's attention, over keys narrowed from a longer buffer (the cache's view),
    /// causal and not, one query and several, a head width that is not a multiple of 16.
    #[test]
    fn matches_burn_attention_on_cache_views() {
        let device = Device::flex();
        for (dim, seq_q, seq_kv, causal) in [(64, 1, 37, false), (24, 3, 20, true), (16, 8, 8, true), (5, 2, 9, true)] {
            let buffer = |width| Tensor::<4>::random([2, 3, 50, width], Distribution::Normal(0.0, 1.0), &device);
            let (k, v) = (buffer(dim).narrow(2, 0, seq_kv), buffer(dim + 3).narrow(2, 0, seq_kv));
            let q = Tensor::<4>::random([2, 3, seq_q, dim], Distribution::Normal(0.0, 1.0), &device);
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: causal,
            };
            assert!(fits(&q, &k, &v, true, &options));
            let fast = cached_attention(q.clone(), k.clone(), v.clone(), causal);
            let reference = burn::tensor::module::attention(q, k, v, None, None, options);
            assert_eq!(fast.dims(), reference.dims());
            let diff: f32 = (fast - reference).abs().max().into_scalar();
            assert!(diff < 1e-5, "d {dim}, {seq_q} queries over {seq_kv}: off by {diff}");
        }
    }

    #[test]
    fn prefill_masks_and_gradients_keep_burn_attention() {
        let device = Device::flex();
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        let q = |s| Tensor::<4>::zeros([1, 2, s, 8], &device);
        let k = Tensor::<4>::zeros([1, 2, 16, 8], &device);
        assert!(!fits(&q(FEW_QUERIES + 1), &k, &k, true, &options));
        assert!(!fits(&q(1), &k, &k, false, &options));
        let trained = Device::flex().autodiff();
        let keys = Tensor::zeros([1, 2, 16, 8], &trained);
        assert!(!fits(
            &Tensor::zeros([1, 2, 1, 8], &trained),
            &keys,
            &keys,
            true,
            &options
        ));
        let mixed = k.clone().cast(burn::tensor::FloatDType::BF16);
        assert!(!fits(&q(1), &mixed, &mixed, true, &options));
    }

    /// bf16 operands: the same attention as f32 on the same (rounded) values, rounded once.
    #[test]
    fn bf16_matches_f32_of_the_same_values() {
        let device = Device::flex();
        let bf16 = burn::tensor::FloatDType::BF16;
        let draw = |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device).cast(bf16);
        let (k, v) = (
            draw([2, 3, 40, 24]).narrow(2, 0, 33),
            draw([2, 3, 40, 24]).narrow(2, 0, 33),
        );
        let q = draw([2, 3, 2, 24]);
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        assert!(fits(&q, &k, &v, true, &options));
        let half = cached_attention(q.clone(), k.clone(), v.clone(), true);
        assert_eq!(half.dtype(), DType::BF16);
        let f32 = burn::tensor::FloatDType::F32;
        let exact = cached_attention(q.cast(f32), k.cast(f32), v.cast(f32), true);
        let diff: f32 = (half.cast(f32) - exact.clone()).abs().max().into_scalar();
        let scale: f32 = exact.abs().max().into_scalar();
        assert!(diff <= scale / 256.0, "off by {diff} (largest {scale})");
    }
}
