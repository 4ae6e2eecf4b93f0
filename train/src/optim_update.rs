//! The update of [`crate::optim`]'s rule as two parallel passes over a parameter on Flex.
//!
//! Written with tensor operations the update is about fifteen element-wise passes per parameter
//! (moments, the clipping ratio's mean, `atan2`, decay), each a single-threaded pass in
//! burn-flex 0.22 with a fresh output: a tenth of a training step at the benchmark's shape, with
//! the second core idle. Here the first pass updates both moments in place and sums the clipping
//! ratio (per chunk, added in chunk order, so the sum does not depend on the pool), the second
//! writes the parameter in place; both loops are vectorised ([`model::kernels::simd`], with its `atan`
//! for libm's scalar `atan2f`). Buffers another tensor still shares are copied first, as Burn
//! would. Other backends and dtypes keep the tensor operations.

use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, backend_extension};
use burn::prelude::*;
use burn::tensor::DType;
use model::kernels::flex::{f32_tensor, runs_on_flex};
use model::kernels::simd::{atan, vectorised};
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// The scalars of one update of one parameter (see [`crate::optim`] for the rule).
#[derive(Debug, Clone, Copy)]
pub struct Scalars {
    pub beta_1: f32,
    pub beta_2: f32,
    /// Floor of the second moment, `ε²`.
    pub floor: f32,
    /// `lr_t / (1 − β1^t)`, before update clipping.
    pub step: f32,
    /// `√(1 − β2^t)`, which divides `√v`.
    pub v_correction: f32,
    /// The decay factor `1 − (lr_t / lr_peak)·wd`.
    pub decay: f32,
    pub update_clipping: bool,
}

/// The fused update, for the parameter's backend.
#[backend_extension(Flex)]
pub trait EllisAdamOps: Backend {
    /// The new parameter and moments from the parameter, its gradient and the old moments
    /// (ignored on the first step). The scalars are [`Scalars`]'s fields, in order.
    #[allow(clippy::too_many_arguments)]
    fn ellis_adam_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        beta_1: f32,
        beta_2: f32,
        floor: f32,
        step: f32,
        v_correction: f32,
        decay: f32,
        update_clipping: bool,
        first: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Whether [`fused_update`] takes these: the parameter and gradient f32 on Flex without
/// autodiff (as optimizers see them), and the moments, if any, alike.
pub fn fits_fused<const D: usize>(param: &Tensor<D>, grad: &Tensor<D>, moments: Option<[&Tensor<D>; 2]>) -> bool {
    let device = param.device();
    let like = |t: &Tensor<D>| t.dtype() == DType::F32 && t.dims() == param.dims() && !t.device().is_autodiff();
    runs_on_flex(&device) && like(param) && like(grad) && moments.is_none_or(|[m, v]| like(m) && like(v))
}

/// The new parameter and moments (`None` moments: the first step). Takes the tensors so that
/// buffers nothing else holds are updated in place; call it where [`fits_fused`] holds.
pub fn fused_update<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moments: Option<[Tensor<D>; 2]>,
    s: Scalars,
) -> [Tensor<D>; 3] {
    let first = moments.is_none();
    let [m, v] = moments.unwrap_or_else(|| [grad.clone(), grad.clone()]);
    let (p, m, v) = <Dispatch as EllisAdamOps>::ellis_adam_update(
        param.into_dispatch(),
        grad.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        s.beta_1,
        s.beta_2,
        s.floor,
        s.step,
        s.v_correction,
        s.decay,
        s.update_clipping,
        first,
    );
    [
        Tensor::from_dispatch(p),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    ]
}

/// `t` with its elements in one run of its buffer (a copy only for a strided view).
fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.layout().contiguous_offsets().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The elements of a [`contiguous`] tensor, writable: in place when nothing else holds its
/// buffer, in a copy of it otherwise (`storage_mut` copies a shared buffer first, as Burn would).
fn elements(t: &mut FlexTensor) -> &mut [f32] {
    let (start, end) = t.layout().contiguous_offsets().expect("contiguous");
    &mut t.storage_mut::<f32>()[start..end]
}

impl EllisAdamOps for Flex {
    fn ellis_adam_update(
        param: FlexTensor,
        grad: FlexTensor,
        moment_1: FlexTensor,
        moment_2: FlexTensor,
        beta_1: f32,
        beta_2: f32,
        floor: f32,
        step: f32,
        v_correction: f32,
        decay: f32,
        update_clipping: bool,
        first: bool,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let shape = param.shape();
        let grad = grad.to_contiguous();
        let g = grad.as_slice::<f32>().expect("contiguous f32 gradient");
        let (mut m, mut v) = if first {
            (
                f32_tensor(g.to_vec(), shape.clone()),
                f32_tensor(g.to_vec(), shape.clone()),
            )
        } else {
            (contiguous(moment_1), contiguous(moment_2))
        };
        let (ms, vs) = (elements(&mut m), elements(&mut v));
        let ratio_sums: Vec<f64> = ms
            .par_chunks_mut(CHUNK)
            .zip(vs.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .map(|((m, v), g)| {
                vectorised(
                    #[inline(always)]
                    || {
                        for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
                            let square = g * g;
                            if first {
                                *v = square.max(floor);
                            } else {
                                *m = *m * beta_1 + g * (1.0 - beta_1);
                                *v = (*v * beta_2 + square * (1.0 - beta_2)).max(floor);
                            }
                        }
                    },
                );
                g.iter().zip(v.iter()).map(|(&g, &v)| (g * g / v) as f64).sum::<f64>()
            })
            .collect();
        let count = g.len().max(1) as f64;
        let rms = (ratio_sums.iter().sum::<f64>() / count).sqrt() as f32;
        let step = if update_clipping { step / rms.max(1.0) } else { step };
        let mut param = contiguous(param);
        let (ms, vs) = (elements(&mut m), elements(&mut v));
        elements(&mut param)
            .par_chunks_mut(CHUNK)
            .zip(ms.par_chunks(CHUNK))
            .zip(vs.par_chunks(CHUNK))
            .for_each(|((p, m), v)| {
                // `atan2(m, √v̂)` is `atan(m / √v̂)`: the second moment is at least `ε²`.
                vectorised(
                    #[inline(always)]
                    || {
                        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                            *p = *p * decay - atan(m / (v.sqrt() / v_correction)) * step;
                        }
                    },
                )
            });
        (param, m, v)
    }
}
