//! The MLP's gate, `silu(gate) · up` over the two halves of the first projection, as one backend
//! operation with its own backward pass.
//!
//! Written with tensor operations the gate is a chunk, a sigmoid and two products forward, and
//! about ten passes backward (the sigmoid again, its derivative, the products' gradients and the
//! chunk's concatenation). burn-flex 0.22 runs each of those passes on one thread, and its sigmoid
//! is a branchy scalar loop (7 ns an element here): at the benchmark's training shape the gate took
//! about a quarter of a training step, more than the two matrix products around it. On Flex this
//! is one pass each way, over both cores. Every other backend gets the tensor operations as before.
//! The lasting fix is parallel, vectorised element-wise kernels in burn-flex itself; ours stays
//! this one operation.

use burn::backend::TensorMetadata;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::prelude::*;
use burn::tensor::{DType, Slice};

use super::flex::{f32_rows, f32_tensor, for_row_chunks, last_dim, runs_on_flex, tensor_of, to_bf16, widened_rows};
use super::simd::{exp, vectorised};

/// `silu(x[.., :m]) · x[.., m:]` over the last dimension (width `2m`), and its gradient.
#[backend_extension(Flex, Autodiff)]
pub trait GateOps: Backend {
    /// The gate's output, width `m`.
    fn gated_silu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_forward::<Self>(x)
    }

    /// The gradient with respect to `x` (width `2m`) of the output's gradient `grad` (width `m`).
    fn gated_silu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_backward::<Self>(x, grad)
    }
}

/// The gate on a tensor of any backend: the fused operation where it exists (Flex, with or
/// without autodiff), the same composition of tensor operations elsewhere.
pub fn gated_silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if runs_on_flex(&x.device()) {
        Tensor::from_dispatch(<Dispatch as GateOps>::gated_silu(x.into_dispatch()))
    } else {
        let mut halves = x.chunk(2, D - 1);
        let up = halves.pop().expect("two halves");
        let gate = halves.pop().expect("two halves");
        burn::tensor::activation::silu(gate) * up
    }
}

fn halves<B: Backend>(x: FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let shape = x.shape();
    let last = shape.num_dims() - 1;
    let m = shape[last] / 2;
    let mut range = vec![Slice::full(); last + 1];
    range[last] = Slice::new(0, Some(m as isize), 1);
    let gate = B::float_slice(x.clone(), &range);
    range[last] = Slice::new(m as isize, Some(2 * m as isize), 1);
    (gate, B::float_slice(x, &range))
}

/// Rows per rayon task.
const ROWS_PER_TASK: usize = 64;

fn sigmoid(g: f32) -> f32 {
    // Branch-free: exp(-g) overflows to +inf for very negative g, giving 0 as it should.
    1.0 / (1.0 + exp(-g))
}

impl GateOps for Flex {
    /// f32, or bf16 rounded where the reference's `silu(gate) · up` rounds: after the SiLU and
    /// after the product.
    fn gated_silu(x: FlexTensor) -> FlexTensor {
        let dtype = x.dtype();
        let Some(input) = widened_rows(&x) else {
            return composed_forward::<Self>(x);
        };
        let width = last_dim(&x);
        let m = width / 2;
        let mut out = vec![0f32; input.len() / 2];
        for_row_chunks(&mut out, m, ROWS_PER_TASK, |out, rows| {
            let input = &input[rows.start * width..rows.end * width];
            vectorised(
                #[inline(always)]
                || {
                    for (out, x) in out.chunks_exact_mut(m).zip(input.chunks_exact(width)) {
                        let (gate, up) = x.split_at(m);
                        let triples = out.iter_mut().zip(gate).zip(up);
                        if dtype == DType::BF16 {
                            triples.for_each(|((o, &g), &u)| *o = to_bf16(g * sigmoid(g)) * u);
                        } else {
                            triples.for_each(|((o, &g), &u)| *o = g * sigmoid(g) * u);
                        }
                    }
                },
            )
        });
        let mut shape = x.shape();
        let last = shape.num_dims() - 1;
        shape[last] = m;
        tensor_of(out, shape, dtype)
    }

    fn gated_silu_backward(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let (Some(input), Some(grad_rows)) = (f32_rows(&x), f32_rows(&grad)) else {
            return composed_backward::<Self>(x, grad);
        };
        let width = last_dim(&x);
        let m = width / 2;
        let mut out = vec![0f32; input.len()];
        // Each output row pairs with one row of `x` and one of `grad`.
        for_row_chunks(&mut out, width, ROWS_PER_TASK, |out, rows| {
            let input = &input[rows.start * width..rows.end * width];
            let grad = &grad_rows[rows.start * m..rows.end * m];
            vectorised(
                #[inline(always)]
                || {
                    for ((out, x), grad) in out
                        .chunks_exact_mut(width)
                        .zip(input.chunks_exact(width))
                        .zip(grad.chunks_exact(m))
                    {
                        let (d_gate, d_up) = out.split_at_mut(m);
                        let (gate, up) = x.split_at(m);
                        for j in 0..m {
                            let (g, u, dy) = (gate[j], up[j], grad[j]);
                            let s = sigmoid(g);
                            d_up[j] = dy * g * s;
                            d_gate[j] = dy * u * s * (1.0 + g * (1.0 - s));
                        }
                    }
                },
            )
        });
        f32_tensor(out, x.shape())
    }
}

/// The gate written with backend operations: every backend's default, and Flex's for the tensors
/// its fast path does not take (f16, strided views, bf16 gradients).
fn composed_forward<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let (gate, up) = halves::<B>(x);
    B::float_mul(B::float_mul(gate.clone(), B::sigmoid(gate)), up)
}

/// The gate's gradient written with backend operations: `d up = dy · silu(gate)`,
/// `d gate = dy · up · s · (1 + gate · (1 - s))` with `s = sigmoid(gate)`.
fn composed_backward<B: Backend>(x: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
    let last = x.shape().num_dims() - 1;
    let (gate, up) = halves::<B>(x);
    let s = B::sigmoid(gate.clone());
    let silu = B::float_mul(gate.clone(), s.clone());
    let one_minus_s = B::float_add_scalar(B::float_neg(s.clone()), 1.0.into());
    let slope = B::float_mul(s, B::float_add_scalar(B::float_mul(gate, one_minus_s), 1.0.into()));
    let d_gate = B::float_mul(B::float_mul(grad.clone(), up), slope);
    let d_up = B::float_mul(grad, silu);
    B::float_cat(vec![d_gate, d_up], last)
}

impl<B: GateOps, C: CheckpointStrategy> GateOps for Autodiff<B, C> {
    fn gated_silu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GatedSilu;

        impl<B: GateOps> Backward<B, 1> for GatedSilu {
            type State = NodeId;

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let x = checkpointer.retrieve_node_output(ops.state);
                unary::<B, _>(ops.parents, ops.node, grads, |grad| B::gated_silu_backward(x, grad));
            }
        }

        match GatedSilu.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&x);
                prep.finish(state, B::gated_silu(x.into_primitive()))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gated_silu(x.into_primitive())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// The composition the fused operation replaces, with Burn's own autodiff.
    fn reference(x: Tensor<3>) -> Tensor<3> {
        let mut halves = x.chunk(2, 2);
        let up = halves.pop().unwrap();
        let gate = halves.pop().unwrap();
        burn::tensor::activation::silu(gate) * up
    }

    fn max_diff(a: Tensor<3>, b: Tensor<3>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// Forward and gradient against the composition, on one row (the serial path) and on more
    /// rows than one task takes (the parallel path), with values large enough to saturate the
    /// sigmoid both ways.
    #[test]
    fn matches_the_composition_forward_and_backward() {
        let device = Device::flex().autodiff();
        for rows in [1, 3 * ROWS_PER_TASK + 5] {
            let x = Tensor::<3>::random([1, rows, 2 * 24], Distribution::Normal(0.0, 6.0), &device);
            let weights = Tensor::<3>::random([1, rows, 24], Distribution::Default, &device);
            let (a, b) = (x.clone().require_grad(), x.require_grad());
            let (fused, composed) = (gated_silu(a.clone()), reference(b.clone()));
            // Values reach the hundreds (|x| up to ~30): f32 rounding is relative to them.
            let close = |a: Tensor<3>, b: Tensor<3>| {
                let scale = b.clone().abs().max().into_scalar::<f32>().max(1.0);
                max_diff(a, b) <= 2e-6 * scale
            };
            assert!(
                close(fused.clone().inner(), composed.clone().inner()),
                "{rows} rows: forward"
            );
            let grads_fused = (fused * weights.clone()).sum().backward();
            let grads_composed = (composed * weights).sum().backward();
            let (ga, gb) = (a.grad(&grads_fused).unwrap(), b.grad(&grads_composed).unwrap());
            assert!(close(ga, gb), "{rows} rows: gradient");
        }
    }

    /// bf16 is computed in f32 and rounded after the SiLU and after the product: within one
    /// bf16 step of the f32 gate of the same inputs, and of the composition (which also rounds
    /// the sigmoid). Strided tensors take the composed path: same results.
    #[test]
    fn bf16_rounds_as_the_reference_and_views_take_the_composed_path() {
        let device = Device::flex();
        let x = Tensor::<3>::random([2, 5, 16], Distribution::Normal(0.0, 3.0), &device);
        let bf16 = x.clone().cast(burn::tensor::FloatDType::BF16);
        let fused = gated_silu(bf16.clone());
        assert_eq!(fused.dtype(), DType::BF16);
        let fused = fused.cast(burn::tensor::FloatDType::F32);
        let exact = gated_silu(bf16.clone().cast(burn::tensor::FloatDType::F32));
        let composed = reference(bf16).cast(burn::tensor::FloatDType::F32);
        for other in [exact, composed] {
            let relative = ((fused.clone() - other.clone()).abs() / (other.abs() + 1e-3))
                .max()
                .into_scalar::<f32>();
            assert!(relative <= 1.0 / 64.0, "off by {relative} of the value");
        }
        let view = x.swap_dims(0, 1);
        assert!(max_diff(gated_silu(view.clone()), reference(view)) < 1e-6);
    }

    /// Inference tensors (no autodiff) reach the same kernel through the dispatch.
    #[test]
    fn plain_flex_matches_the_composition() {
        let device = Device::flex();
        let x = Tensor::<3>::random([4, 70, 2 * 40], Distribution::Normal(0.0, 2.0), &device);
        assert!(max_diff(gated_silu(x.clone()), reference(x)) < 1e-5);
    }
}
