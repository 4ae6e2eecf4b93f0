//! Causal attention with its own backward pass, for training on Flex.
//!
//! Burn 0.22's autodiff has no attention of its own: it records the backend-generic fallback
//! (scores, a materialised causal mask, mask fill, max, subtract, exp, sum, divide, product),
//! and every one of those element-wise passes over the `[B, H, S, S]` scores runs on one thread
//! in burn-flex, then again backward. At the benchmark's training shape that was two thirds of an
//! attention layer's forward and backward (measured). Here each block of queries of each head is
//! one task of the pool: its scores against the keys it sees, their softmax and its output rows
//! forward; backward, the scores' gradient and the queries' by blocks of queries, then the keys'
//! and values' by blocks of keys. Products over blocks skip most of the masked scores, which
//! whole-matrix products compute and the mask then drops. Inference on Flex runs the same
//! forward when queries and keys are one square causal block (a prompt without a cache prefix,
//! the no-gradient iterations of training); a decoding step's few queries go to
//! [`super::cached_attention`], and every other backend and case (a mask from the cache) keeps
//! `burn::tensor::module::attention`. The lasting fix
//! is an attention backward in Burn's autodiff; ours stays this one operation.

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::prelude::*;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bytes, DType, FloatDType, Shape};
use rayon::prelude::*;
use std::ops::Range;

use super::cached_attention;
use super::flex::{f32_rows, f32_tensor, runs_on_flex};
use super::matmul::{SendPtr, Strided, matrices, product_at};
use super::simd::{exp, vectorised};
use gemm::Parallelism::None as Serial;

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

/// The kernels of the autodiff operation, on the backend it wraps.
pub trait CausalKernels: Backend {
    /// The output (as [`CausalAttentionOps::causal_attention`]) and the probabilities
    /// `[B, H, S, S]` (zero above the diagonal), which backward needs.
    fn causal_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The gradients of q, k and v (`[B, H, S, D]` each) from the probabilities and the
    /// output's gradient.
    fn causal_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        p: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3];
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
    let whole = runs_on_flex(&device) && mask.is_none() && plain && square && q.dims()[2] > 1;
    if whole && q.dtype() == DType::F32 {
        let out =
            <Dispatch as CausalAttentionOps>::causal_attention(q.into_dispatch(), k.into_dispatch(), v.into_dispatch());
        return Tensor::from_dispatch(out);
    }
    // bf16 (inference): the same in f32, rounded once at the end, as a decoding step's
    // attention rounds; Burn's attention would run its bf16 operations one by one.
    if whole && q.dtype() == DType::BF16 && !device.is_autodiff() {
        let f32 = FloatDType::F32;
        return attention(q.cast(f32), k.cast(f32), v.cast(f32), None, options).cast(FloatDType::BF16);
    }
    if cached_attention::fits(&q, &k, &v, mask.is_none(), &options) {
        return cached_attention::cached_attention(q, k, v, options.is_causal);
    }
    burn::tensor::module::attention(q, k, v, mask, None, options)
}

/// Queries per block of the products. A block of queries is multiplied with the keys up to its
/// last only, so the products skip most of the scores the mask drops (three eighths of all at
/// 256 positions), and blocks are the tasks the pool shares.
const BLOCK: usize = 64;

/// Without autodiff: the forward below without keeping the probabilities' tensor.
///
/// The output is a `[B, H, S, D]` view of a `[B, S, H, D]` buffer: the attention layer swaps it
/// back to that layout, which is then contiguous (no copy before the output projection).
impl CausalAttentionOps for Flex {
    fn causal_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor) -> FlexTensor {
        Flex::causal_forward(q, k, v).0
    }
}

impl CausalKernels for Flex {
    fn causal_forward(q: FlexTensor, k: FlexTensor, v: FlexTensor) -> (FlexTensor, FlexTensor) {
        let shape = q.shape();
        let [_, heads, s, d] = [shape[0], shape[1], shape[2], shape[3]];
        let h = heads * d;
        let (rows, p) = attend_into_rows(q, k, v);
        let strides = [s * h, d, h, 1].map(|stride| stride as isize);
        let out = FlexTensor::new(
            Bytes::from_elems(rows),
            Layout::new(shape, strides.to_vec(), 0),
            DType::F32,
        );
        (out, p)
    }

    fn causal_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        p: FlexTensor,
        grad: FlexTensor,
    ) -> [FlexTensor; 3] {
        attend_backward(q, k, v, p, grad)
    }
}

/// The `(matrix, block)` tasks of `count` matrices of `s` rows, and the rows of each (with the
/// pool's other workers kept awake for them).
fn blocks(count: usize, s: usize) -> impl IndexedParallelIterator<Item = (usize, Range<usize>)> {
    super::threads::keep_warm();
    let per_matrix = s.div_ceil(BLOCK);
    (0..count * per_matrix).into_par_iter().map(move |task| {
        let block = task % per_matrix;
        (task / per_matrix, block * BLOCK..((block + 1) * BLOCK).min(s))
    })
}

/// The causal attention of f32 heads `[B, H, S, d]` (any strides) on Flex, written as
/// `[B, S, H·d]` (head `j` of position `i` is the `d` elements from `(b·S + i)·H·d + j·d`),
/// and the probabilities `[B, H, S, S]`, zero above the diagonal (what backward needs).
///
/// A task is a block of queries of one matrix: its scores against the keys up to its last
/// query, the softmax of each row over the keys it sees, and its rows of the output.
pub(crate) fn attend_into_rows(q: FlexTensor, k: FlexTensor, v: FlexTensor) -> (Vec<f32>, FlexTensor) {
    let shape = q.shape();
    let [b, heads, s, d] = [shape[0], shape[1], shape[2], shape[3]];
    let (h, count) = (heads * d, b * heads);
    let scale = 1.0 / (d as f32).sqrt();
    let (qs, ks, vs) = (matrices(&q), matrices(&k), matrices(&v));
    let (q_data, k_data, v_data) = (q.storage::<f32>(), k.storage::<f32>(), v.storage::<f32>());
    let mut p = Vec::<f32>::with_capacity(count * s * s);
    let mut out = Vec::<f32>::with_capacity(count * s * h);
    let (p_ptr, out_ptr) = (SendPtr(p.as_mut_ptr()), SendPtr(out.as_mut_ptr()));
    blocks(count, s).for_each(|(index, rows)| {
        let (qm, km, vm) = (qs[index], ks[index], vs[index]);
        let seen = rows.end;
        // SAFETY: each task writes rows `rows` of probability matrix `index` (all `s` columns:
        // zeros past `seen`, scores then probabilities before) and of head `index % heads` of
        // batch row `index / heads` of the output; no two tasks share either. The operands'
        // offsets and strides come from their layouts, so what gemm reads lies in their storage;
        // the probabilities it reads are the ones this task wrote.
        unsafe {
            let p_rows = p_ptr.get().add((index * s + rows.start) * s);
            for r in 0..rows.len() {
                std::ptr::write_bytes(p_rows.add(r * s + seen), 0, s - seen);
            }
            product_at(
                p_rows,
                s,
                (rows.len(), seen, d),
                qm.at(q_data, rows.start, 0),
                km.at(k_data, 0, 0).transposed(),
                Serial,
            );
            let block = std::slice::from_raw_parts_mut(p_rows, rows.len() * s);
            vectorised(
                #[inline(always)]
                || {
                    for (i, row) in rows.clone().zip(block.chunks_exact_mut(s)) {
                        let (visible, masked) = row[..seen].split_at_mut(i + 1);
                        masked.fill(0.0);
                        let max = visible.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
                        visible.iter_mut().for_each(|x| *x = exp(*x * scale - max));
                        let inv = 1.0 / visible.iter().sum::<f32>();
                        visible.iter_mut().for_each(|x| *x *= inv);
                    }
                },
            );
            let (batch, head) = (index / heads, index % heads);
            product_at(
                out_ptr.get().add((batch * s + rows.start) * h + head * d),
                h,
                (rows.len(), d, seen),
                Strided::row_major(p_rows, s),
                vm.at(v_data, 0, 0),
                Serial,
            );
        }
    });
    // SAFETY: the tasks wrote every element of both (all blocks of all matrices).
    unsafe {
        p.set_len(count * s * s);
        out.set_len(count * s * h);
    }
    (out, f32_tensor(p, Shape::new([b, heads, s, s])))
}

/// The gradients of q, k and v (contiguous `[B, H, S, d]`) of [`attend_into_rows`], from its
/// probabilities and the output's gradient as heads `[B, H, S, d]` (any strides).
///
/// Two passes. By blocks of queries: `dp = dO · vᵀ` over the keys the block sees, the scores'
/// gradient `ds = scale · p ⊙ (dp − rowsum(p ⊙ dp))` in place, `dq = ds · k`. Then by blocks of
/// keys, over the queries that see them: `dk = dsᵀ · q`, `dv = pᵀ · dO`.
pub(crate) fn attend_backward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    p: FlexTensor,
    grad: FlexTensor,
) -> [FlexTensor; 3] {
    let shape = q.shape();
    let [b, heads, s, d] = [shape[0], shape[1], shape[2], shape[3]];
    let count = b * heads;
    let scale = 1.0 / (d as f32).sqrt();
    let p = p.to_contiguous();
    let p_data = f32_rows(&p).unwrap_or(&[]);
    assert_eq!(p_data.len(), count * s * s, "probabilities of the attention's shape");
    let [qs, ks, vs, gs] = [&q, &k, &v, &grad].map(matrices);
    let [q_data, k_data, v_data, g_data] = [&q, &k, &v, &grad].map(|t| t.storage::<f32>());
    // The scores' gradient: each row is written up to the end of its block only (the keys it
    // sees and the masked rest of its diagonal block) and read no further, so the buffer is
    // only ever reached through pointers, never as a slice past what was written.
    let mut ds = Vec::<f32>::with_capacity(count * s * s);
    let mut dq = Vec::<f32>::with_capacity(count * s * d);
    let (ds_ptr, dq_ptr) = (SendPtr(ds.as_mut_ptr()), SendPtr(dq.as_mut_ptr()));
    blocks(count, s).for_each(|(index, rows)| {
        let (km, vm, gm) = (ks[index], vs[index], gs[index]);
        let seen = rows.end;
        // SAFETY: each task writes rows `rows` of matrix `index` of `ds` (their first `seen`
        // columns) and of `dq`, which no other task writes; it reads back only what it wrote.
        unsafe {
            let ds_rows = ds_ptr.get().add((index * s + rows.start) * s);
            product_at(
                ds_rows,
                s,
                (rows.len(), seen, d),
                gm.at(g_data, rows.start, 0),
                vm.at(v_data, 0, 0).transposed(),
                Serial,
            );
            let p_rows = &p_data[(index * s + rows.start) * s..];
            vectorised(
                #[inline(always)]
                || {
                    for (r, i) in rows.clone().enumerate() {
                        let row = std::slice::from_raw_parts_mut(ds_rows.add(r * s), seen);
                        let (visible, masked) = row.split_at_mut(i + 1);
                        masked.fill(0.0);
                        let p = &p_rows[r * s..r * s + i + 1];
                        let dot: f32 = p.iter().zip(visible.iter()).map(|(p, g)| p * g).sum();
                        visible
                            .iter_mut()
                            .zip(p)
                            .for_each(|(g, &p)| *g = scale * p * (*g - dot));
                    }
                },
            );
            product_at(
                dq_ptr.get().add((index * s + rows.start) * d),
                d,
                (rows.len(), d, seen),
                Strided::row_major(ds_rows, s),
                km.at(k_data, 0, 0),
                Serial,
            );
        }
    });
    let mut dk = Vec::<f32>::with_capacity(count * s * d);
    let mut dv = Vec::<f32>::with_capacity(count * s * d);
    let (dk_ptr, dv_ptr) = (SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
    blocks(count, s).for_each(|(index, keys)| {
        let (qm, gm) = (qs[index], gs[index]);
        // The queries that see these keys: from the first of them on.
        let from = keys.start;
        let at = (index * s + from) * s + from;
        // SAFETY: each task writes rows `keys` of matrix `index` of `dk` and `dv`, which no
        // other task writes. It reads `ds` and `p` at rows `from..s`, columns `keys`: every such
        // row's block ends at or after `keys.end`, so the first pass wrote them.
        unsafe {
            product_at(
                dk_ptr.get().add((index * s + from) * d),
                d,
                (keys.len(), d, s - from),
                Strided::row_major(ds_ptr.get().add(at), s).transposed(),
                qm.at(q_data, from, 0),
                Serial,
            );
            product_at(
                dv_ptr.get().add((index * s + from) * d),
                d,
                (keys.len(), d, s - from),
                Strided::row_major(p_data.as_ptr().add(at), s).transposed(),
                gm.at(g_data, from, 0),
                Serial,
            );
        }
    });
    // SAFETY: every block of every matrix of the three was written.
    unsafe {
        dq.set_len(count * s * d);
        dk.set_len(count * s * d);
        dv.set_len(count * s * d);
    }
    let shape = Shape::new([b, heads, s, d]);
    [dq, dk, dv].map(|values| f32_tensor(values, shape.clone()))
}

impl<B: CausalAttentionOps + CausalKernels, C: CheckpointStrategy> CausalAttentionOps for Autodiff<B, C> {
    fn causal_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct CausalAttention;

        impl<B: CausalKernels> Backward<B, 3> for CausalAttention {
            /// q, k, v and the probabilities.
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_q, node_k, node_v] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (q, k, v, p) = ops.state;
                let [dq, dk, dv] = B::causal_backward(q, k, v, p, grad);
                for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, grad);
                    }
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
                let (out, p) = B::causal_forward(q.clone(), k.clone(), v.clone());
                prep.finish((q, k, v, p), out)
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

    /// Output and the gradients of q, k and v against Burn's attention (the recorded fallback):
    /// one block of queries per matrix, and several with a partial last one.
    #[test]
    fn matches_burns_attention_forward_and_backward() {
        for shape in [[2, 3, 37, 8], [1, 2, 2 * BLOCK + 22, 8]] {
            matches_burns_attention(shape);
        }
    }

    fn matches_burns_attention(shape: [usize; 4]) {
        let device = Device::flex().autodiff();
        let draw = || Tensor::<4>::random(shape, Distribution::Normal(0.0, 2.0), &device);
        let (q, k, v, weights) = (draw(), draw(), draw(), draw());
        let ours = [q.clone(), k.clone(), v.clone()].map(|t| t.require_grad());
        let theirs = [q, k, v].map(|t| t.require_grad());
        let [q1, k1, v1] = ours.clone();
        let [q2, k2, v2] = theirs.clone();
        let a = attention(q1, k1, v1, None, options());
        let b = burn::tensor::module::attention(q2, k2, v2, None, None, options());
        assert!(max_diff(a.clone(), b.clone()) < 1e-5, "forward {shape:?}");
        let (ga, gb) = ((a * weights.clone()).sum().backward(), (b * weights).sum().backward());
        for (name, (x, y)) in ["q", "k", "v"].iter().zip(ours.iter().zip(&theirs)) {
            let diff = max_diff(x.grad(&ga).unwrap(), y.grad(&gb).unwrap());
            assert!(diff < 1e-4, "gradient of {name} {shape:?}: {diff}");
        }
    }

    /// A bf16 prompt's attention (inference) is computed in f32 and rounded once: bf16 out,
    /// within a rounding of the f32 attention of the same values.
    #[test]
    fn bf16_prompts_attend_in_f32_and_round_once() {
        let device = Device::flex();
        let shape = [1, 2, BLOCK + 9, 8];
        let draw = || Tensor::<4>::random(shape, Distribution::Normal(0.0, 2.0), &device).cast(FloatDType::BF16);
        let (q, k, v) = (draw(), draw(), draw());
        let got = attention(q.clone(), k.clone(), v.clone(), None, options());
        assert_eq!(got.dtype(), DType::BF16);
        let f32 = FloatDType::F32;
        let exact = burn::tensor::module::attention(q.cast(f32), k.cast(f32), v.cast(f32), None, None, options());
        let error = (got.cast(f32) - exact.clone()).abs();
        let allowed = exact.abs() / 256.0 + 1e-5;
        assert!(error.lower_equal(allowed).all().into_scalar::<bool>());
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
