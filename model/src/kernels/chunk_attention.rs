//! Attention of a chunk that attends to itself only (no cache: training, and whole-sequence
//! passes), from the fused projection's output to the output projection's input, as one Flex
//! operation each way.
//!
//! Composed, the input stage is a split of `qkv` into three views, the q/k bias, the rotation
//! (a copy to swap each pair, two products and a sum), a heads-first copy of each of q, k and v,
//! and after attention a copy back to `[B, S, H·d]`; backward, Burn's autodiff turns each of the
//! three splits into a zeroed full-size tensor and a copy into it, then sums them. In burn-flex
//! 0.22 these are single-threaded passes with fresh outputs, and they were most of what kept the
//! second core idle in a training step once the products and the norms were parallel. Here one
//! parallel pass builds the rotated heads, attention is [`super::causal_attention`]'s products
//! and softmax, the last product writes the `[B, S, H·d]` layout directly, and backward ends in
//! one pass that rotates the query and key gradients back into a single `qkv` gradient and
//! sums the bias gradient chunk by chunk in row order (the same on every run).
//!
//! The composed default of both operations here is the attention layer's own tensor path, in
//! [`crate::attention`]: the model's definition, which the tests below compare them with.

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::prelude::*;
use burn::tensor::{DType, Shape};
use rayon::prelude::*;

use super::causal_attention::{attend_backward, attend_into_rows};
use super::flex::{f32_rows, f32_tensor, runs_on_flex, tensor_of, to_bf16, widened_rows, widens};
use crate::rope::Rotary;

/// Causal self-attention of `qkv` `[B, S, 3·H·d]` (queries, keys, values, head by head): the
/// bias `[2·H·d]` added to queries and keys, both rotated by the tables `cos`, `sin`
/// `[B or 1, S, 1, d]` (`y = x·cos + pair-swapped(x)·sin`), and the output `[B, S, H·d]`.
#[backend_extension(Flex, Autodiff)]
pub trait ChunkAttentionOps: Backend {
    fn chunk_attention(
        qkv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;
}

/// The kernels of the operation, on the backend the autodiff operation wraps.
pub trait ChunkAttentionKernels: Backend {
    /// The output and what backward needs: rotated queries, keys and values `[B, H, S, d]`
    /// and the probabilities `[B, H, S, S]`.
    fn chunk_attention_forward(
        qkv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
    ) -> (FloatTensor<Self>, [FloatTensor<Self>; 4]);

    /// The gradients of `qkv` and of the bias from the output's gradient.
    fn chunk_attention_backward(
        saved: [FloatTensor<Self>; 4],
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// The operation where it applies: f32 on Flex, a chunk of more than one position, even head
/// width; `None` elsewhere (the caller composes it).
pub fn chunk_attention(qkv: &Tensor<3>, bias: &Tensor<1>, rotary: &Rotary, heads: usize) -> Option<Tensor<3>> {
    let (cos, sin) = rotary.tables();
    let fits = qkv.dims()[1] > 1 && qkv.dtype() == DType::F32 && fused_input_fits(qkv, bias, rotary, heads);
    fits.then(|| {
        Tensor::from_dispatch(<Dispatch as ChunkAttentionOps>::chunk_attention(
            qkv.clone().into_dispatch(),
            bias.clone().into_dispatch(),
            cos.clone().into_dispatch(),
            sin.clone().into_dispatch(),
            heads,
        ))
    })
}

/// What the fused input stage takes: Flex, `qkv` and the bias of one dtype, `heads` of even
/// width, a bias for queries and keys, and f32 rotation tables for the chunk's positions, of one
/// row or the batch's. Callers say which dtypes they take.
fn fused_input_fits(qkv: &Tensor<3>, bias: &Tensor<1>, rotary: &Rotary, heads: usize) -> bool {
    let [b, s, width] = qkv.dims();
    let (cos, sin) = rotary.tables();
    runs_on_flex(&qkv.device())
        && heads > 0
        && width % (3 * heads) == 0
        && (width / (3 * heads)).is_multiple_of(2)
        && bias.dims()[0] == 2 * width / 3
        && cos.dims()[1] == s
        && [1, b].contains(&cos.dims()[0])
        && bias.dtype() == qkv.dtype()
        && [cos.dtype(), sin.dtype()].iter().all(|&d| d == DType::F32)
}

/// Positions per rayon task of the element-wise passes.
const ROWS_PER_TASK: usize = 16;

/// The rotation tables as `[Bc, S, d]` rows, `Bc` 1 (shared by the batch) or `B`, read as
/// slices once: a pass looks them up at every position of every head.
struct Tables<'a> {
    cos: &'a [f32],
    sin: &'a [f32],
    shared: bool,
}

impl<'a> Tables<'a> {
    /// Over contiguous f32 tables (see [`contiguous_tables`]).
    fn new(cos: &'a FlexTensor, sin: &'a FlexTensor) -> Self {
        Self {
            cos: f32_rows(cos).expect("f32 cos"),
            sin: f32_rows(sin).expect("f32 sin"),
            shared: cos.shape()[0] == 1,
        }
    }

    /// The tables of batch row `b`, position `s`, each `d` long.
    fn at(&self, b: usize, s: usize, len: usize, d: usize) -> (&'a [f32], &'a [f32]) {
        let row = if self.shared { s } else { b * len + s };
        let span = row * d..(row + 1) * d;
        (&self.cos[span.clone()], &self.sin[span])
    }
}

/// The tables laid out as [`Tables`] reads them.
fn contiguous_tables(cos: FlexTensor, sin: FlexTensor) -> (FlexTensor, FlexTensor) {
    (cos.to_contiguous(), sin.to_contiguous())
}

/// Multiply-adds under which [`heads_first`] runs on the calling thread (a decoding step's few
/// positions would spend longer waking the pool).
const SERIAL_ELEMENTS: usize = 1 << 14;

/// Queries and keys (biased and rotated) and values of `qkv` `[B, S, 3·H·d]`, each heads first,
/// `[B, H, S, d]`, in one pass over `qkv` per part. bf16 (inference) is rounded where the
/// reference rounds: after the bias, and after the rotation (computed in f32).
fn heads_first(qkv: FlexTensor, bias: FlexTensor, tables: &Tables<'_>, heads: usize) -> [FlexTensor; 3] {
    let (qkv, bias) = (qkv.to_contiguous(), bias.to_contiguous());
    let shape = qkv.shape();
    let (b, s, h) = (shape[0], shape[1], shape[2] / 3);
    let d = h / heads;
    let dtype = qkv.dtype();
    let (x, bias) = (
        widened_rows(&qkv).expect("f32 or bf16 qkv"),
        widened_rows(&bias).expect("f32 or bf16 bias"),
    );
    let add = |a: f32, b: f32| if dtype == DType::BF16 { to_bf16(a + b) } else { a + b };
    let mut parts = [vec![0f32; b * h * s], vec![0f32; b * h * s], vec![0f32; b * h * s]];
    for (part, out) in parts.iter_mut().enumerate() {
        let head = |(bj, out): (usize, &mut [f32])| {
            let (bi, j) = (bj / heads, bj % heads);
            let column = part * h + j * d;
            for (pos, out) in out.chunks_exact_mut(d).enumerate() {
                let src = &x[(bi * s + pos) * 3 * h + column..][..d];
                if part == 2 {
                    out.copy_from_slice(src);
                    continue;
                }
                let bias = &bias[column..column + d];
                let (cos, sin) = tables.at(bi, pos, s, d);
                for e in 0..d {
                    let partner = e ^ 1;
                    out[e] = add(src[e], bias[e]) * cos[e] + add(src[partner], bias[partner]) * sin[e];
                }
            }
        };
        if out.len() < SERIAL_ELEMENTS {
            out.chunks_mut(s * d).enumerate().for_each(head);
        } else {
            super::threads::keep_warm();
            out.par_chunks_mut(s * d).enumerate().for_each(head);
        }
    }
    parts.map(|p| tensor_of(p, Shape::new([b, heads, s, d]), dtype))
}

/// Queries, keys and values `[B, H, S, d]` of `qkv` for inference with a cache (no autodiff):
/// the composed path's split, bias, rotation and head layout as one pass. `None` where
/// [`chunk_attention`]'s conditions (but for the chunk's length) do not hold, or with autodiff.
pub fn rotated_heads(qkv: &Tensor<3>, bias: &Tensor<1>, rotary: &Rotary, heads: usize) -> Option<[Tensor<4>; 3]> {
    let (cos, sin) = rotary.tables();
    let fits = !qkv.device().is_autodiff() && widens(qkv.dtype()) && fused_input_fits(qkv, bias, rotary, heads);
    fits.then(|| {
        let (q, k, v) = <Dispatch as RotatedHeadsOps>::rotated_heads(
            qkv.clone().into_dispatch(),
            bias.clone().into_dispatch(),
            cos.clone().into_dispatch(),
            sin.clone().into_dispatch(),
            heads,
        );
        [q, k, v].map(Tensor::from_dispatch)
    })
}

/// [`rotated_heads`]'s operation (inference only: no gradient).
#[backend_extension(Flex)]
pub trait RotatedHeadsOps: Backend {
    fn rotated_heads(
        qkv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

impl RotatedHeadsOps for Flex {
    fn rotated_heads(
        qkv: FlexTensor,
        bias: FlexTensor,
        cos: FlexTensor,
        sin: FlexTensor,
        heads: usize,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (cos, sin) = contiguous_tables(cos, sin);
        let [q, k, v] = heads_first(qkv, bias, &Tables::new(&cos, &sin), heads);
        (q, k, v)
    }
}

impl ChunkAttentionKernels for Flex {
    fn chunk_attention_forward(
        qkv: FlexTensor,
        bias: FlexTensor,
        cos: FlexTensor,
        sin: FlexTensor,
        heads: usize,
    ) -> (FlexTensor, [FlexTensor; 4]) {
        let shape = qkv.shape();
        let (b, s, h) = (shape[0], shape[1], shape[2] / 3);
        let (cos, sin) = contiguous_tables(cos, sin);
        let [q, k, v] = heads_first(qkv, bias, &Tables::new(&cos, &sin), heads);
        let (out, p) = attend_into_rows(q.clone(), k.clone(), v.clone());
        (f32_tensor(out, Shape::new([b, s, h])), [q, k, v, p])
    }

    fn chunk_attention_backward(
        saved: [FlexTensor; 4],
        cos: FlexTensor,
        sin: FlexTensor,
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let [q, k, v, p] = saved;
        let (cos, sin) = contiguous_tables(cos, sin);
        let tables = Tables::new(&cos, &sin);
        let [b, heads, s, d] = [q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]];
        let h = heads * d;
        // The output's gradient as heads `[B, H, S, d]`, a view of `[B, S, H·d]`.
        let grad = Flex::float_reshape(grad.to_contiguous(), Shape::new([b, s, heads, d]));
        let grad = Flex::float_swap_dims(grad, 1, 2);
        let [dq, dk, dv] = attend_backward(q, k, v, p, grad);
        let (dq, dk, dv) = (
            f32_rows(&dq).expect("f32"),
            f32_rows(&dk).expect("f32"),
            f32_rows(&dv).expect("f32"),
        );
        // One pass back to `[B, S, 3·H·d]`: query and key gradients rotated back (the transpose
        // of the rotation: `dx[e] = dy[e]·cos[e] + dy[e^1]·sin[e^1]`), values copied; each task
        // also sums its rows' query and key gradients for the bias.
        super::threads::keep_warm();
        let mut dqkv = vec![0f32; b * s * 3 * h];
        let partial_bias: Vec<Vec<f32>> = dqkv
            .par_chunks_mut(ROWS_PER_TASK * 3 * h)
            .enumerate()
            .map(|(chunk, out)| {
                let mut bias = vec![0f32; 2 * h];
                for (r, out) in out.chunks_exact_mut(3 * h).enumerate() {
                    let row = chunk * ROWS_PER_TASK + r;
                    let (bi, pos) = (row / s, row % s);
                    let (cos, sin) = tables.at(bi, pos, s, d);
                    for j in 0..heads {
                        let at = ((bi * heads + j) * s + pos) * d;
                        for (part, dy) in [dq, dk].into_iter().enumerate() {
                            let dy = &dy[at..at + d];
                            let column = part * h + j * d;
                            for e in 0..d {
                                let partner = e ^ 1;
                                let dx = dy[e] * cos[e] + dy[partner] * sin[partner];
                                out[column + e] = dx;
                                bias[column + e] += dx;
                            }
                        }
                        out[2 * h + j * d..2 * h + (j + 1) * d].copy_from_slice(&dv[at..at + d]);
                    }
                }
                bias
            })
            .collect();
        let mut dbias = vec![0f32; 2 * h];
        for partial in partial_bias {
            dbias.iter_mut().zip(partial).for_each(|(total, p)| *total += p);
        }
        (
            f32_tensor(dqkv, Shape::new([b, s, 3 * h])),
            f32_tensor(dbias, Shape::new([2 * h])),
        )
    }
}

impl ChunkAttentionOps for Flex {
    fn chunk_attention(
        qkv: FlexTensor,
        bias: FlexTensor,
        cos: FlexTensor,
        sin: FlexTensor,
        heads: usize,
    ) -> FlexTensor {
        Flex::chunk_attention_forward(qkv, bias, cos, sin, heads).0
    }
}

impl<B: ChunkAttentionOps + ChunkAttentionKernels, C: CheckpointStrategy> ChunkAttentionOps for Autodiff<B, C> {
    fn chunk_attention(
        qkv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ChunkAttention;

        impl<B: ChunkAttentionKernels> Backward<B, 2> for ChunkAttention {
            /// Rotated queries, keys, values and the probabilities; the rotation tables.
            type State = ([FloatTensor<B>; 4], FloatTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_qkv, node_bias] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (saved, cos, sin) = ops.state;
                let (dqkv, dbias) = B::chunk_attention_backward(saved, cos, sin, grad);
                if let Some(node) = node_qkv {
                    grads.register::<B>(node.id, dqkv);
                }
                if let Some(node) = node_bias {
                    grads.register::<B>(node.id, dbias);
                }
            }
        }

        // The tables are constants: positions, not parameters.
        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        let prepared = ChunkAttention
            .prepare::<C>([qkv.node(), bias.node()])
            .compute_bound()
            .stateful();
        let (qkv, bias) = (qkv.into_primitive(), bias.into_primitive());
        match prepared {
            OpsKind::Tracked(prep) => {
                let (out, saved) = B::chunk_attention_forward(qkv, bias, cos.clone(), sin.clone(), heads);
                prep.finish((saved, cos, sin), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::chunk_attention(qkv, bias, cos, sin, heads)),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::module::Param;
    use burn::tensor::Distribution;

    use crate::attention::CausalSelfAttention;
    use crate::cache::{FullCache, LayerSlot, NoCache};
    use crate::rope::Rotary;
    use burn::prelude::*;

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    fn layer(device: &Device, h: usize, heads: usize) -> CausalSelfAttention {
        let d = h / heads;
        CausalSelfAttention {
            wqkv: crate::huginn::linear(Tensor::random([h, 3 * h], Distribution::Normal(0.0, 0.3), device)),
            qk_bias: Param::from_tensor(Tensor::random(
                [1, 2 * heads, 1, d],
                Distribution::Normal(0.0, 0.5),
                device,
            )),
            proj: crate::huginn::linear(Tensor::random([h, h], Distribution::Normal(0.0, 0.3), device)),
            n_heads: heads,
        }
    }

    /// Within f32's rounding of the values' size: gradients summed over every position reach a
    /// few hundred with random inputs, where a fixed 1e-4 fails now and then.
    fn close<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> bool {
        let size = a.clone().abs().max().into_scalar::<f32>();
        max_diff(a, b) <= 1e-4 + 2e-6 * size
    }

    /// The fused operation (a cache that keeps nothing) against the composed attention (a cache
    /// that keeps everything, on its first chunk): output and every gradient, with the rotation
    /// shared by the batch and given per row.
    #[test]
    fn matches_the_composed_attention_forward_and_backward() {
        // One block of queries per head, and three (the attention's blocks are 64 rows).
        for s in [37, 150] {
            matches_the_composed_attention(s);
        }
    }

    fn matches_the_composed_attention(s: usize) {
        let device = Device::flex().autodiff();
        let (b, h, heads) = (2, 24, 3);
        let attention = layer(&device, h, heads);
        let x = Tensor::<3>::random([b, s, h], Distribution::Normal(0.0, 1.0), &device);
        let upstream = Tensor::<3>::random([b, s, h], Distribution::Default, &device);
        let shared = Rotary::contiguous(0, b, s, h / heads, 10_000.0, &device);
        let offsets = Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 5], [b, 1]), &device);
        let per_row = Rotary::new(
            Tensor::arange(0..s as i64, &device).reshape([1, s]) + offsets,
            h / heads,
            50.0,
        );
        for rotary in [shared, per_row] {
            let slot = LayerSlot::Prelude(0);
            let (x1, x2) = (x.clone().require_grad(), x.clone().require_grad());
            let fused = attention.forward(x1.clone(), &rotary, slot, &mut NoCache);
            let composed = attention.forward(x2.clone(), &rotary, slot, &mut FullCache::new());
            assert!(max_diff(fused.clone().inner(), composed.clone().inner()) < 1e-5);
            let g1 = (fused * upstream.clone()).sum().backward();
            let g2 = (composed * upstream.clone()).sum().backward();
            assert!(close(x1.grad(&g1).unwrap(), x2.grad(&g2).unwrap()));
            let bias = |g| attention.qk_bias.grad(g).unwrap();
            assert!(close(bias(&g1), bias(&g2)));
            let wqkv = |g| attention.wqkv.weight.grad(g).unwrap();
            assert!(close(wqkv(&g1), wqkv(&g2)));
        }
    }

    /// Inference with a cache (the heads made in one pass) against the composed path (autodiff
    /// turns that pass away), over a prompt and then one decoding step.
    #[test]
    fn inference_heads_match_the_composed_path_with_a_cache() {
        let tracked = Device::flex().autodiff();
        let attention = layer(&tracked, 32, 2);
        let plain = attention.valid();
        let slot = LayerSlot::Core { iteration: 0, layer: 0 };
        let (mut composed_cache, mut fused_cache) = (FullCache::new(), FullCache::new());
        for (start, len) in [(0, 19), (19, 1)] {
            let x = Tensor::<3>::random([2, len, 32], Distribution::Normal(0.0, 1.0), &tracked);
            let rotary = Rotary::contiguous(start, 2, len, 16, 10_000.0, &tracked);
            let composed = attention.forward(x.clone(), &rotary, slot, &mut composed_cache);
            let fused = plain.forward(x.inner(), &rotary.without_autodiff(), slot, &mut fused_cache);
            assert!(max_diff(composed.inner(), fused) < 1e-5, "chunk at {start}");
        }
    }

    /// bf16 heads (inference) against the f32 heads of the same bf16 inputs: the bias add and
    /// the rotation each round once, so they agree to within two bf16 steps of the value.
    #[test]
    fn bf16_heads_round_as_the_reference() {
        let device = Device::flex();
        let (b, s, h, heads) = (2, 5, 32, 2);
        let bf16 = burn::tensor::FloatDType::BF16;
        let qkv = Tensor::<3>::random([b, s, 3 * h], Distribution::Normal(0.0, 2.0), &device).cast(bf16);
        let bias = Tensor::<1>::random([2 * h], Distribution::Normal(0.0, 0.5), &device).cast(bf16);
        let rotary = Rotary::contiguous(7, b, s, h / heads, 10_000.0, &device);
        let half = super::rotated_heads(&qkv, &bias, &rotary, heads).expect("bf16 is fused");
        let f32 = burn::tensor::FloatDType::F32;
        let exact = super::rotated_heads(&qkv.cast(f32), &bias.cast(f32), &rotary, heads).expect("f32 is fused");
        for (half, exact) in half.into_iter().zip(exact) {
            assert_eq!(half.dtype(), burn::tensor::DType::BF16);
            let scale = exact.clone().abs().max().into_scalar::<f32>();
            assert!(max_diff(half.cast(f32), exact) <= scale / 128.0);
        }
    }

    /// Without autodiff the operation gives the composed attention's output.
    #[test]
    fn untracked_forward_matches() {
        let device = Device::flex();
        let attention = layer(&device, 32, 2);
        let x = Tensor::<3>::random([1, 19, 32], Distribution::Normal(0.0, 1.0), &device);
        let rotary = Rotary::contiguous(3, 1, 19, 16, 10_000.0, &device);
        let slot = LayerSlot::Coda(0);
        let fused = attention.forward(x.clone(), &rotary, slot, &mut NoCache);
        let composed = attention.forward(x, &rotary, slot, &mut FullCache::new());
        assert!(max_diff(fused, composed) < 1e-5);
    }
}
