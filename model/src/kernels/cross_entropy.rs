//! The training loss, mean next-token cross-entropy, as one Flex operation each way.
//!
//! Composed (`composed`, what [`cross_entropy`] runs off Flex), the loss is a log-softmax over
//! the `[B·S, V]` logits (max, subtract, exp, sum, log, subtract), a gather, a mask and two
//! sums, and its backward as many passes again: at the training benchmark's shape, 4M logits streamed a dozen
//! times, each on one thread in burn-flex 0.22 while the other core idled. Here one parallel
//! pass computes each row's log-sum-exp and its label's term (rows summed chunk by chunk in row
//! order, in f64), and backward is one parallel pass writing `(softmax − onehot) · g / count`.
//! A label outside the vocabulary (other than the ignored `-100`) makes the loss NaN, which a
//! training step refuses, instead of reading out of bounds.

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, FloatDType, Shape};

use super::flex::{f32_rows, f32_tensor, for_row_chunks, last_dim, runs_on_flex};
use super::simd::{exp, vectorised};

/// The label of positions the loss ignores.
const IGNORED: f32 = -100.0;

/// Rows per rayon task (a row is one position's `V` logits).
const ROWS_PER_TASK: usize = 8;

/// Mean cross-entropy of `logits` `[N, V]` against `labels` `[N]` (as floats, `-100` ignored),
/// `[1]`.
#[backend_extension(Flex, Autodiff)]
pub trait CrossEntropyOps: Backend {
    fn cross_entropy(logits: FloatTensor<Self>, labels: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The gradient kernel, on the backend the autodiff operation wraps.
pub trait CrossEntropyBackward: Backend {
    /// `d logits` for the loss's gradient `grad` (`[1]`).
    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// Mean next-token cross-entropy over positions whose label is not `-100` (the reference does
/// NOT shift labels: the caller aligns them). `logits` `[B, S, V]`, `labels` `[B, S]` → `[1]`.
pub fn cross_entropy(logits: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
    let [b, s, v] = logits.dims();
    let (logits, labels) = (logits.reshape([b * s, v]), labels.reshape([b * s]));
    fused_cross_entropy(&logits, &labels).unwrap_or_else(|| composed(logits, labels))
}

/// [`cross_entropy`] with tensor operations, for every backend: `logits` `[N, V]`, `labels`
/// `[N]`.
fn composed(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    let n = labels.dims()[0];
    let labels = labels.reshape([n, 1]);
    let keep = labels.clone().not_equal_elem(-100);
    let safe = labels.mask_fill(keep.clone().bool_not(), 0);
    let logp = log_softmax(logits.cast(FloatDType::F32), 1).gather(1, safe);
    let keep = keep.float();
    let count = keep.clone().sum();
    (logp * keep).sum().neg() / count
}

/// The fused loss where the logits are f32 on Flex; `None` elsewhere.
fn fused_cross_entropy(logits: &Tensor<2>, labels: &Tensor<1, Int>) -> Option<Tensor<1>> {
    let fits = runs_on_flex(&logits.device()) && logits.dtype() == DType::F32 && logits.dims()[1] > 0;
    fits.then(|| {
        let labels = labels.clone().float().cast(FloatDType::F32);
        Tensor::from_dispatch(<Dispatch as CrossEntropyOps>::cross_entropy(
            logits.clone().into_dispatch(),
            labels.into_dispatch(),
        ))
    })
}

/// The label of a row as an index into its `v` logits: `None` when ignored, `Err` when it is
/// not a position of the vocabulary.
fn label_index(label: f32, v: usize) -> Result<Option<usize>, ()> {
    if label == IGNORED {
        Ok(None)
    } else if label >= 0.0 && label < v as f32 && label.fract() == 0.0 {
        Ok(Some(label as usize))
    } else {
        Err(())
    }
}

/// `max` and `ln Σ exp(x − max)` of a row.
#[inline(always)]
fn log_sum_exp(x: &[f32]) -> (f32, f32) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f32 = x.iter().map(|&v| exp(v - max)).sum();
    (max, sum.ln())
}

impl CrossEntropyOps for Flex {
    fn cross_entropy(logits: FlexTensor, labels: FlexTensor) -> FlexTensor {
        let (logits, labels) = (logits.to_contiguous(), labels.to_contiguous());
        let v = last_dim(&logits);
        let (x, labels) = (
            f32_rows(&logits).expect("f32 logits"),
            f32_rows(&labels).expect("f32 labels"),
        );
        // One slot per row: its loss term, 0 for an ignored row, NaN for a label outside the
        // vocabulary.
        let mut terms = vec![0f32; labels.len()];
        for_row_chunks(&mut terms, 1, ROWS_PER_TASK, |terms, rows| {
            vectorised(
                #[inline(always)]
                || {
                    for (term, row) in terms.iter_mut().zip(rows) {
                        let x = &x[row * v..(row + 1) * v];
                        *term = match label_index(labels[row], v) {
                            Ok(None) => 0.0,
                            Ok(Some(label)) => {
                                let (max, lse) = log_sum_exp(x);
                                max + lse - x[label]
                            }
                            Err(()) => f32::NAN,
                        };
                    }
                },
            )
        });
        let sum: f64 = terms.iter().map(|&t| t as f64).sum();
        let count = labels.iter().filter(|&&l| l != IGNORED).count();
        f32_tensor(vec![(sum / count as f64) as f32], Shape::new([1]))
    }
}

impl CrossEntropyBackward for Flex {
    fn cross_entropy_backward(logits: FlexTensor, labels: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let (logits, labels, grad) = (logits.to_contiguous(), labels.to_contiguous(), grad.to_contiguous());
        let v = last_dim(&logits);
        let (x, labels) = (
            f32_rows(&logits).expect("f32 logits"),
            f32_rows(&labels).expect("f32 labels"),
        );
        let count = labels.iter().filter(|&&l| l != IGNORED).count();
        let scale = f32_rows(&grad).expect("f32 gradient")[0] / count as f32;
        let mut dx = vec![0f32; x.len()];
        for_row_chunks(&mut dx, v, ROWS_PER_TASK, |dx, rows| {
            vectorised(
                #[inline(always)]
                || {
                    for (dx, row) in dx.chunks_exact_mut(v).zip(rows) {
                        let x = &x[row * v..(row + 1) * v];
                        match label_index(labels[row], v) {
                            Ok(None) => {}
                            Ok(Some(label)) => {
                                let (max, lse) = log_sum_exp(x);
                                let shift = max + lse;
                                for (d, &x) in dx.iter_mut().zip(x) {
                                    *d = exp(x - shift) * scale;
                                }
                                dx[label] -= scale;
                            }
                            Err(()) => dx.fill(f32::NAN),
                        }
                    }
                },
            )
        });
        f32_tensor(dx, logits.shape())
    }
}

impl<B: CrossEntropyOps + CrossEntropyBackward, C: CheckpointStrategy> CrossEntropyOps for Autodiff<B, C> {
    fn cross_entropy(logits: FloatTensor<Self>, labels: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct CrossEntropy;

        impl<B: CrossEntropyBackward> Backward<B, 1> for CrossEntropy {
            /// The logits and the labels.
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_logits] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (logits, labels) = ops.state;
                if let Some(node) = node_logits {
                    grads.register::<B>(node.id, B::cross_entropy_backward(logits, labels, grad));
                }
            }
        }

        let labels = labels.into_primitive();
        let prepared = CrossEntropy.prepare::<C>([logits.node()]).compute_bound().stateful();
        let logits = logits.into_primitive();
        match prepared {
            OpsKind::Tracked(prep) => {
                let out = B::cross_entropy(logits.clone(), labels.clone());
                prep.finish((logits, labels), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::cross_entropy(logits, labels)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// Loss and gradient against the tensor operations, with ignored positions and logits of a
    /// large spread; a label outside the vocabulary gives NaN rather than a read out of bounds.
    #[test]
    fn matches_the_composed_loss_and_gradient() {
        let device = Device::flex().autodiff();
        let (n, v) = (37, 50);
        let logits = Tensor::<2>::random([n, v], Distribution::Normal(0.0, 8.0), &device);
        let labels: Vec<i64> = (0..n as i64)
            .map(|i| if i % 5 == 3 { -100 } else { (i * 7) % v as i64 })
            .collect();
        let labels = Tensor::<1, Int>::from_data(TensorData::new(labels, [n]), &device);
        let (a, b) = (logits.clone().require_grad(), logits.require_grad());
        let fused = fused_cross_entropy(&a, &labels).expect("f32 on Flex");
        let composed = composed(b.clone(), labels.clone());
        let (f, c) = (
            fused.clone().into_scalar::<f32>(),
            composed.clone().into_scalar::<f32>(),
        );
        assert!((f - c).abs() < 1e-5 * c.abs().max(1.0), "{f} vs {c}");
        let (ga, gb) = (fused.mul_scalar(3.0).backward(), composed.mul_scalar(3.0).backward());
        let diff = (a.grad(&ga).unwrap() - b.grad(&gb).unwrap())
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(diff < 1e-6, "{diff}");
        let bad = Tensor::<1, Int>::from_data(TensorData::new(vec![v as i64; n], [n]), &device);
        assert!(fused_cross_entropy(&a, &bad).unwrap().into_scalar::<f32>().is_nan());
    }
}
