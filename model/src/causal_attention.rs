//! Causal attention with its own backward pass, for training on Flex.
//!
//! Burn 0.22's autodiff has no attention of its own: it records the backend-generic fallback
//! (scores, a materialised causal mask, mask fill, max, subtract, exp, sum, divide, product),
//! and every one of those element-wise passes over the `[B, H, S, S]` scores runs on one thread
//! in burn-flex, then again backward. At the benchmark's training shape that was two thirds of an
//! attention layer's forward and backward (measured). Here the scores and probabilities are two
//! products ([`crate::matmul`]) and one parallel softmax pass; backward is four products and one
//! parallel pass. Inference on Flex runs the same forward when queries and keys are one square
//! causal block (a prompt without a cache prefix, the no-gradient iterations of training); a
//! decoding step's few queries go to [`crate::cached_attention`], and every other backend and
//! case (a mask from the cache) keeps `burn::tensor::module::attention`. The lasting fix
//! is an attention backward in Burn's autodiff; ours stays this one operation.

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::prelude::*;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bytes, DType};

use crate::cached_attention;
use crate::flex::{f32_rows, f32_tensor, for_row_chunks, last_dim, runs_on_flex};
use crate::matmul::{ProductOps, product_into};
use crate::simd::{exp, vectorised};

/// Causal attention `softmax(q·kᵀ/√d + causal mask)·v` on `[B, H, S, D]` tensors with as many
/// queries as keys.
#[backend_extension(Flex, Autodiff)]
pub trait CausalAttentionOps: Backend {
    /// The attention output, `[B, H, S, D]`.
    fn causal_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>) -> FloatTensor<Self> {
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        Self::attention(q, k, v, None, None, options)
    }
}

/// The two row-wise kernels of the autodiff operation, on the backend it wraps.
pub trait CausalSoftmax: Backend {
    /// Row-wise softmax of `scale · scores` with column `j > i` of row `i` masked out.
    fn causal_softmax(scores: FloatTensor<Self>, scale: f32) -> FloatTensor<Self>;

    /// The scores' gradient from the probabilities `p` and their gradient `dp`:
    /// `scale · p ⊙ (dp − rowsum(p ⊙ dp))`.
    fn causal_softmax_backward(p: FloatTensor<Self>, dp: FloatTensor<Self>, scale: f32) -> FloatTensor<Self>;
}

/// Attention for [`crate::attention`]: the operation above where a Flex autodiff device trains
/// without a cache mask, [`cached_attention`] for a decoding step's few queries on Flex, Burn's
/// attention everywhere else.
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    options: AttentionModuleOptions,
) -> Tensor<4> {
    let device = q.device();
    let square = q.dims()[2] == k.dims()[2];
    let plain = options.scale.is_none() && options.softcap.is_none() && options.is_causal;
    if runs_on_flex(&device) && mask.is_none() && plain && square && q.dims()[2] > 1 && q.dtype() == DType::F32 {
        let out =
            <Dispatch as CausalAttentionOps>::causal_attention(q.into_dispatch(), k.into_dispatch(), v.into_dispatch());
        return Tensor::from_dispatch(out);
    }
    if cached_attention::fits(&q, &k, &v, mask.is_none(), &options) {
        return cached_attention::cached_attention(q, k, v, options.is_causal);
    }
    burn::tensor::module::attention(q, k, v, mask, None, options)
}

/// Rows per rayon task.
const ROWS_PER_TASK: usize = 16;

/// Without autodiff: the forward of the operation below, two products and the softmax pass.
///
/// The output is a `[B, H, S, D]` view of a `[B, S, H, D]` buffer: the attention layer swaps it
/// back to that layout, which is then contiguous (no copy before the output projection).
impl CausalAttentionOps for Flex {
    fn causal_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor) -> FlexTensor {
        let shape = q.shape();
        let [_, heads, s, d] = [shape[0], shape[1], shape[2], shape[3]];
        let h = heads * d;
        let (rows, _) = attend_into_rows(q, k, v);
        let strides = [s * h, d, h, 1].map(|stride| stride as isize);
        FlexTensor::new(
            Bytes::from_elems(rows),
            Layout::new(shape, strides.to_vec(), 0),
            DType::F32,
        )
    }
}

/// The causal attention of f32 heads `[B, H, S, d]` on Flex, written as `[B, S, H·d]` (head `j`
/// of position `i` is the `d` elements from `(b·S + i)·H·d + j·d`), and the probabilities
/// `[B, H, S, S]` (what backward needs).
pub(crate) fn attend_into_rows(q: FlexTensor, k: FlexTensor, v: FlexTensor) -> (Vec<f32>, FlexTensor) {
    let shape = q.shape();
    let [heads, s, d] = [shape[1], shape[2], shape[3]];
    let scale = 1.0 / (d as f32).sqrt();
    let scores = Flex::product(q, Flex::float_transpose(k));
    let p = Flex::causal_softmax(scores, scale);
    let h = heads * d;
    let rows = product_into(&p, &v, |index| (index / heads) * s * h + (index % heads) * d, h);
    (rows, p)
}

impl CausalSoftmax for Flex {
    fn causal_softmax(scores: FlexTensor, scale: f32) -> FlexTensor {
        let scores = scores.to_contiguous();
        let n = last_dim(&scores);
        let input = f32_rows(&scores).expect("contiguous f32 scores");
        let mut out = vec![0f32; input.len()];
        for_row_chunks(&mut out, n, ROWS_PER_TASK, |out, rows| {
            let input = &input[rows.start * n..rows.end * n];
            vectorised(
                #[inline(always)]
                || {
                    for ((row, out), x) in rows.zip(out.chunks_exact_mut(n)).zip(input.chunks_exact(n)) {
                        // Query `i` of its matrix sees keys 0..=i.
                        let visible = row % n + 1;
                        let max = x[..visible].iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
                        for (o, &s) in out[..visible].iter_mut().zip(&x[..visible]) {
                            *o = exp(s * scale - max);
                        }
                        let sum: f32 = out[..visible].iter().sum();
                        let inv = 1.0 / sum;
                        out[..visible].iter_mut().for_each(|o| *o *= inv);
                    }
                },
            )
        });
        f32_tensor(out, scores.shape())
    }

    fn causal_softmax_backward(p: FlexTensor, dp: FlexTensor, scale: f32) -> FlexTensor {
        let (p, dp) = (p.to_contiguous(), dp.to_contiguous());
        let n = last_dim(&p);
        let (p_rows, dp_rows) = (f32_rows(&p).expect("f32 p"), f32_rows(&dp).expect("f32 dp"));
        let mut out = vec![0f32; p_rows.len()];
        for_row_chunks(&mut out, n, ROWS_PER_TASK, |out, rows| {
            let span = rows.start * n..rows.end * n;
            let (p, dp) = (&p_rows[span.clone()], &dp_rows[span]);
            vectorised(
                #[inline(always)]
                || {
                    for ((out, p), dp) in out.chunks_exact_mut(n).zip(p.chunks_exact(n)).zip(dp.chunks_exact(n)) {
                        let dot: f32 = p.iter().zip(dp).map(|(p, d)| p * d).sum();
                        for ((o, &p), &d) in out.iter_mut().zip(p).zip(dp) {
                            *o = scale * p * (d - dot);
                        }
                    }
                },
            )
        });
        f32_tensor(out, p.shape())
    }
}

impl<B: CausalAttentionOps + CausalSoftmax + ProductOps, C: CheckpointStrategy> CausalAttentionOps for Autodiff<B, C> {
    fn causal_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct CausalAttention;

        impl<B: CausalSoftmax + ProductOps> Backward<B, 3> for CausalAttention {
            /// q, k, v and the probabilities, and the scale.
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, f32);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_q, node_k, node_v] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (q, k, v, p, scale) = ops.state;
                if let Some(node) = node_v {
                    grads.register::<B>(node.id, B::product(B::float_transpose(p.clone()), grad.clone()));
                }
                let dp = B::product(grad, B::float_transpose(v));
                let ds = B::causal_softmax_backward(p, dp, scale);
                if let Some(node) = node_q {
                    grads.register::<B>(node.id, B::product(ds.clone(), k));
                }
                if let Some(node) = node_k {
                    grads.register::<B>(node.id, B::product(B::float_transpose(ds), q));
                }
            }
        }

        let prepared = CausalAttention
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful();
        let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        match prepared {
            OpsKind::Tracked(prep) => {
                let scale = 1.0 / (q.shape()[3] as f32).sqrt();
                let scores = B::product(q.clone(), B::float_transpose(k.clone()));
                let p = B::causal_softmax(scores, scale);
                let out = B::product(p.clone(), v.clone());
                prep.finish((q, k, v, p, scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::causal_attention(q, k, v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn options() -> AttentionModuleOptions {
        AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        }
    }

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// Output and the gradients of q, k and v against Burn's attention (the recorded fallback),
    /// over more rows than one task takes so that the row index crosses matrices and tasks.
    #[test]
    fn matches_burns_attention_forward_and_backward() {
        let device = Device::flex().autodiff();
        let shape = [2, 3, 37, 8];
        let draw = || Tensor::<4>::random(shape, Distribution::Normal(0.0, 2.0), &device);
        let (q, k, v, weights) = (draw(), draw(), draw(), draw());
        let ours = [q.clone(), k.clone(), v.clone()].map(|t| t.require_grad());
        let theirs = [q, k, v].map(|t| t.require_grad());
        let [q1, k1, v1] = ours.clone();
        let [q2, k2, v2] = theirs.clone();
        let a = attention(q1, k1, v1, None, options());
        let b = burn::tensor::module::attention(q2, k2, v2, None, None, options());
        assert!(max_diff(a.clone(), b.clone()) < 1e-5, "forward");
        let (ga, gb) = ((a * weights.clone()).sum().backward(), (b * weights).sum().backward());
        for (name, (x, y)) in ["q", "k", "v"].iter().zip(ours.iter().zip(&theirs)) {
            let diff = max_diff(x.grad(&ga).unwrap(), y.grad(&gb).unwrap());
            assert!(diff < 1e-4, "gradient of {name}: {diff}");
        }
    }

    /// Constant inputs untracked by autodiff take Burn's attention through the same function.
    #[test]
    fn untracked_inputs_give_burns_result() {
        let device = Device::flex().autodiff();
        let q = Tensor::<4>::random([1, 2, 9, 4], Distribution::Default, &device);
        let a = attention(q.clone(), q.clone(), q.clone(), None, options());
        let b = burn::tensor::module::attention(q.clone(), q.clone(), q, None, None, options());
        assert!(max_diff(a, b) < 1e-6);
    }
}
