//! RMS normalisation `x / √(mean(x²) + ε) · w` over the last dimension, and its gradient, as one
//! backend operation each way.
//!
//! Written with tensor operations, a norm is seven passes forward (square, mean, add, square
//! root, reciprocal and two products) and about fifteen backward, each a single-threaded pass in
//! burn-flex 0.22, and every sandwich block has four norms. On Flex this is one parallel pass
//! forward and one backward (which also reduces the weight's gradient over the rows, chunk by
//! chunk in row order so that the sum is the same on every run). Inference also takes bf16.
//! Other backends, and tensors the fast path does not take (f16; bf16 with autodiff), keep the
//! tensor operations (`composed`, [`rms_norm`]'s other path).

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

use super::flex::{f32_rows, f32_tensor, for_row_chunks, last_dim, runs_on_flex, tensor_of, to_bf16, widened_rows};
use super::simd::vectorised;

/// Rows per rayon task (a row is one token's `h` channels).
const ROWS_PER_TASK: usize = 32;

/// RMS normalisation over the last dimension, scaled by a weight of that width.
#[backend_extension(Flex, Autodiff)]
pub trait RmsNormOps: Backend {
    /// `x / √(mean(x²) + eps) · weight`, the shape of `x`.
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self>;
}

/// The gradient kernel of the autodiff operation, on the backend it wraps.
pub trait RmsNormBackward: Backend {
    /// The gradients of `x` and of `weight` from the output's gradient `grad`.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// `x / √(mean(x²) + eps) · weight` over the last dimension of `x`, as [`crate::norm::RmsNorm`]
/// computes it: the fused operation where it applies, the tensor operations elsewhere.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    fused_rms_norm(&x, &weight, eps).unwrap_or_else(|| composed(x, weight, eps))
}

/// The norm as tensor operations, as the reference's "RMSNorm_llama" computes it: normalise in
/// f32, cast back to the input's dtype, then scale by the weight. Every backend but Flex, and
/// half precision on Flex.
fn composed<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    let dtype = x.dtype();
    let x = if dtype == DType::F32 {
        x
    } else {
        x.cast(FloatDType::F32)
    };
    let inv_rms = x.clone().square().mean_dim(D - 1).add_scalar(eps).sqrt().recip();
    let normed = x * inv_rms;
    let normed = if dtype == DType::F32 {
        normed
    } else {
        normed.cast(FloatDType::from(dtype))
    };
    normed * weight.unsqueeze()
}

/// The fused operation, where `x` and `weight` are f32 on a Flex device (with or without
/// autodiff), or bf16 on Flex without autodiff; `None` elsewhere, for [`composed`].
fn fused_rms_norm<const D: usize>(x: &Tensor<D>, weight: &Tensor<1>, eps: f64) -> Option<Tensor<D>> {
    let device = x.device();
    // bf16 only without autodiff: the backward kernel takes f32.
    let dtype_fits = match x.dtype() {
        DType::F32 => true,
        DType::BF16 => !device.is_autodiff(),
        _ => false,
    };
    let fits = runs_on_flex(&device)
        && dtype_fits
        && weight.dtype() == x.dtype()
        && x.dims()[D - 1] > 0
        && weight.dims()[0] == x.dims()[D - 1];
    fits.then(|| {
        let out =
            <Dispatch as RmsNormOps>::rms_norm(x.clone().into_dispatch(), weight.clone().into_dispatch(), eps as f32);
        Tensor::from_dispatch(out)
    })
}

/// `1 / √(mean(x²) + eps)` of one row.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (mean_square + eps).sqrt()
}

/// A contiguous f32 copy (or the tensor itself) for the kernels; the public entry point only
/// sends f32 tensors here, so a failure is a broken invariant.
fn contiguous_f32(x: FlexTensor) -> FlexTensor {
    let x = x.to_contiguous();
    assert!(
        f32_rows(&x).is_some(),
        "the fused RMS norm takes f32 tensors with a non-empty last dimension"
    );
    x
}

impl RmsNormOps for Flex {
    /// f32, or bf16 (inference) rounded where the reference's `norm(x.float()).type_as(x) · w`
    /// rounds: after normalising and after the weight.
    fn rms_norm(x: FlexTensor, weight: FlexTensor, eps: f32) -> FlexTensor {
        let (x, weight) = (x.to_contiguous(), weight.to_contiguous());
        let dtype = x.dtype();
        let (Some(input), Some(w)) = (widened_rows(&x), widened_rows(&weight)) else {
            panic!("the fused RMS norm takes f32 or bf16 tensors with a non-empty last dimension");
        };
        let h = last_dim(&x);
        let mut out = vec![0f32; input.len()];
        for_row_chunks(&mut out, h, ROWS_PER_TASK, |out, rows| {
            let input = &input[rows.start * h..rows.end * h];
            vectorised(
                #[inline(always)]
                || {
                    for (out, x) in out.chunks_exact_mut(h).zip(input.chunks_exact(h)) {
                        let r = inv_rms(x, eps);
                        let pairs = out.iter_mut().zip(x).zip(w.iter());
                        if dtype == DType::BF16 {
                            pairs.for_each(|((o, &x), &w)| *o = to_bf16(x * r) * w);
                        } else {
                            pairs.for_each(|((o, &x), &w)| *o = x * r * w);
                        }
                    }
                },
            )
        });
        tensor_of(out, x.shape(), dtype)
    }
}

impl RmsNormBackward for Flex {
    /// With `r = inv_rms(x)`, `x̂ = x·r` and `g = grad·w`: `dx = r·(g − x̂·mean(g·x̂))` and
    /// `dw = Σ_rows grad·x̂`.
    fn rms_norm_backward(x: FlexTensor, weight: FlexTensor, grad: FlexTensor, eps: f32) -> (FlexTensor, FlexTensor) {
        let (x, weight, grad) = (contiguous_f32(x), contiguous_f32(weight), contiguous_f32(grad));
        let (input, w, dy) = (
            f32_rows(&x).expect("f32"),
            f32_rows(&weight).expect("f32"),
            f32_rows(&grad).expect("f32"),
        );
        let h = last_dim(&x);
        let mut dx = vec![0f32; input.len()];
        let partial_dw = for_row_chunks(&mut dx, h, ROWS_PER_TASK, |dx, rows| {
            let span = rows.start * h..rows.end * h;
            let mut dw = vec![0f32; h];
            vectorised(
                #[inline(always)]
                || {
                    for ((dx, x), dy) in dx
                        .chunks_exact_mut(h)
                        .zip(input[span.clone()].chunks_exact(h))
                        .zip(dy[span].chunks_exact(h))
                    {
                        let r = inv_rms(x, eps);
                        let mut dot = 0.0;
                        for (((&x, &dy), &w), dw) in x.iter().zip(dy).zip(w).zip(dw.iter_mut()) {
                            let normed = x * r;
                            *dw += dy * normed;
                            dot += dy * w * normed;
                        }
                        let mean = dot / h as f32;
                        for (((dx, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                            *dx = r * (dy * w - x * r * mean);
                        }
                    }
                },
            );
            dw
        });
        let mut dw = vec![0f32; h];
        for partial in partial_dw {
            dw.iter_mut().zip(partial).for_each(|(total, p)| *total += p);
        }
        (f32_tensor(dx, x.shape()), f32_tensor(dw, weight.shape()))
    }
}

impl<B: RmsNormOps + RmsNormBackward, C: CheckpointStrategy> RmsNormOps for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RmsNorm;

        impl<B: RmsNormBackward> Backward<B, 2> for RmsNorm {
            /// x, the weight and ε.
            type State = (FloatTensor<B>, FloatTensor<B>, f32);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_x, node_weight] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x, weight, eps) = ops.state;
                let (dx, dw) = B::rms_norm_backward(x, weight, grad, eps);
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, dx);
                }
                if let Some(node) = node_weight {
                    grads.register::<B>(node.id, dw);
                }
            }
        }

        let prepared = RmsNorm
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful();
        let (x, weight) = (x.into_primitive(), weight.into_primitive());
        match prepared {
            OpsKind::Tracked(prep) => {
                let out = B::rms_norm(x.clone(), weight.clone(), eps);
                prep.finish((x, weight, eps), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(x, weight, eps)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// Forward and both gradients against the tensor-operation norm with Burn's own autodiff, on
    /// one row (the serial path) and on more rows than one task takes (the parallel path, with a
    /// last chunk that is not full), with inputs of very different scales per row.
    #[test]
    fn matches_the_composition_forward_and_backward() {
        let device = Device::flex().autodiff();
        let h = 48;
        for rows in [1, 3 * ROWS_PER_TASK + 7] {
            let scale = Tensor::<3>::random([2, rows, 1], Distribution::Uniform(0.01, 30.0), &device);
            let x = Tensor::<3>::random([2, rows, h], Distribution::Normal(0.0, 1.0), &device) * scale;
            let weight = Tensor::<1>::random([h], Distribution::Normal(1.0, 0.5), &device);
            let upstream = Tensor::<3>::random([2, rows, h], Distribution::Default, &device);
            let (xa, wa) = (x.clone().require_grad(), weight.clone().require_grad());
            let (xb, wb) = (x.require_grad(), weight.require_grad());
            let fused = fused_rms_norm(&xa, &wa, 1e-6).expect("f32 on Flex takes the fused path");
            let composed = composed(xb.clone(), wb.clone(), 1e-6);
            assert!(max_diff(fused.clone(), composed.clone()) < 1e-5, "{rows} rows: forward");
            let grads_fused = (fused * upstream.clone()).sum().backward();
            let grads_composed = (composed * upstream).sum().backward();
            let dx_composed = xb.grad(&grads_composed).unwrap();
            // A row of scale 0.01 has gradients near 100: f32 resolves those to about 1e-5, so
            // the bound is relative to the largest gradient (and absolute below 1).
            let dx_scale = dx_composed.clone().abs().max().into_scalar::<f32>().max(1.0);
            let dx = max_diff(xa.grad(&grads_fused).unwrap(), dx_composed);
            let dw = max_diff(wa.grad(&grads_fused).unwrap(), wb.grad(&grads_composed).unwrap());
            assert!(
                dx < 1e-5 * dx_scale,
                "{rows} rows: gradient of x off by {dx} (largest {dx_scale})"
            );
            assert!(dw < 1e-3, "{rows} rows: gradient of the weight off by {dw}");
        }
    }

    /// The weight's gradient is a sum over rows in a fixed order: two runs agree to the bit.
    #[test]
    fn the_weight_gradient_is_reproducible() {
        let device = Device::flex().autodiff();
        let x = Tensor::<3>::random([4, 100, 32], Distribution::Normal(0.0, 3.0), &device);
        let weight = Tensor::<1>::random([32], Distribution::Default, &device);
        let gradient = || {
            let w = weight.clone().require_grad();
            let grads = fused_rms_norm(&x, &w, 1e-5).unwrap().sum().backward();
            w.grad(&grads).unwrap().into_data()
        };
        assert_eq!(gradient(), gradient());
    }

    /// bf16 with autodiff or with an f32 weight, a zero-width last dimension and non-Flex work
    /// are left to the caller; plain Flex (inference) fuses too, and so do tensors with no rows.
    #[test]
    fn only_f32_on_flex_and_bf16_inference_are_fused() {
        let device = Device::flex();
        let x = Tensor::<2>::random([3, 8], Distribution::Default, &device);
        let weight = Tensor::<1>::ones([8], &device);
        let bf16 = burn::tensor::FloatDType::BF16;
        assert!(fused_rms_norm(&x.clone().cast(bf16), &weight, 1e-6).is_none());
        let trained = Device::flex().autodiff();
        let x_trained = Tensor::<2>::random([3, 8], Distribution::Default, &trained).cast(bf16);
        let w_trained = Tensor::<1>::ones([8], &trained).cast(bf16);
        assert!(fused_rms_norm(&x_trained, &w_trained, 1e-6).is_none());
        let zero_width = Tensor::<2>::zeros([3, 0], &device);
        assert!(fused_rms_norm(&zero_width, &Tensor::<1>::zeros([0], &device), 1e-6).is_none());
        let no_rows = Tensor::<3>::zeros([2, 0, 8], &device);
        assert_eq!(fused_rms_norm(&no_rows, &weight, 1e-6).unwrap().dims(), [2, 0, 8]);
        let fused = fused_rms_norm(&x, &weight, 1e-6).unwrap();
        assert!(max_diff(fused, composed(x, weight, 1e-6)) < 1e-6);
    }

    /// bf16 inference rounds where the composition does (after normalising, after the weight):
    /// the two agree to within one bf16 step of values near 1 (their `1/rms` may differ in the
    /// last f32 bit, which can move a rounding).
    #[test]
    fn bf16_inference_matches_the_composition() {
        let device = Device::flex();
        let bf16 = burn::tensor::FloatDType::BF16;
        let x = Tensor::<3>::random([2, 40, 64], Distribution::Normal(0.0, 3.0), &device).cast(bf16);
        let weight = Tensor::<1>::random([64], Distribution::Normal(1.0, 0.2), &device).cast(bf16);
        let fused = fused_rms_norm(&x, &weight, 1e-6).unwrap();
        assert_eq!(fused.dtype(), DType::BF16);
        let composed = composed(x, weight, 1e-6);
        let f32 = burn::tensor::FloatDType::F32;
        let (fused, composed) = (fused.cast(f32), composed.cast(f32));
        let relative = ((fused - composed.clone()).abs() / (composed.abs() + 1e-3))
            .max()
            .into_scalar::<f32>();
        assert!(relative <= 1.0 / 128.0, "off by {relative} of the value");
    }
}
