//! What the fused Flex operations ([`super::gate`], [`super::rms_norm`],
//! [`super::causal_attention`]) share: telling a Flex device apart, reading a tensor's rows as
//! f32, and running a kernel over chunks of rows on burn-flex's rayon pool.
//!
//! The training crate's fused optimizer update uses the first and last of these too.
//!
//! Inference kernels also take bf16 (`--dtype bf16`): they read it widened to f32, compute in
//! f32 and round their output back once, where burn-flex's bf16 operations would round after
//! every operation and make full-size f32 copies of their operands on the way.
//!
//! They exist because burn-flex 0.22 runs each element-wise operation as its own single-threaded
//! pass: a composition of ten such passes leaves the second core idle and streams the tensor ten
//! times. The lasting fix is upstream, in burn-flex's kernels.

use std::borrow::Cow;
use std::ops::Range;

use burn::backend::DispatchDevice;
use burn::backend::TensorMetadata;
use burn::backend::flex::{FlexTensor, Layout};
use burn::prelude::*;
use burn::tensor::{Bytes, DType, Shape};
use half::bf16;
use rayon::prelude::*;

/// Whether tensors on `device` (with or without autodiff) live on burn-flex.
pub fn runs_on_flex(device: &Device) -> bool {
    matches!(device.as_dispatch().clone().inner(), DispatchDevice::Flex(_))
}

/// The tensor's elements as one contiguous f32 slice, or `None` where a fast path does not apply
/// (another dtype, a strided view, an empty last dimension).
pub(crate) fn f32_rows(x: &FlexTensor) -> Option<&[f32]> {
    if x.dtype() != DType::F32 || last_dim(x) == 0 {
        return None;
    }
    x.as_slice::<f32>()
}

pub(crate) fn last_dim(x: &FlexTensor) -> usize {
    let shape = x.shape();
    shape[shape.num_dims() - 1]
}

/// A contiguous f32 Flex tensor of `shape` over `values`.
pub fn f32_tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(values), Layout::contiguous(shape), DType::F32)
}

/// An element a kernel reads as f32.
pub(crate) trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for bf16 {
    /// bf16 is the top half of an f32: a shift, which vectorises (half's `to_f32` is the same
    /// value).
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// Whether the inference kernels take `dtype` (f32, or bf16 widened).
pub(crate) fn widens(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16)
}

/// [`f32_rows`] for f32 or bf16: the elements as f32, borrowed, or widened into a copy.
pub(crate) fn widened_rows(x: &FlexTensor) -> Option<Cow<'_, [f32]>> {
    if last_dim(x) == 0 {
        return None;
    }
    match x.dtype() {
        DType::F32 => x.as_slice::<f32>().map(Cow::Borrowed),
        DType::BF16 => x
            .as_slice::<bf16>()
            .map(|values| Cow::Owned(values.iter().map(|v| v.widen()).collect())),
        _ => None,
    }
}

/// A contiguous Flex tensor of `shape` and `dtype` (f32, or bf16 rounded to nearest) over
/// f32 `values`.
pub(crate) fn tensor_of(values: Vec<f32>, shape: Shape, dtype: DType) -> FlexTensor {
    if dtype == DType::BF16 {
        let values: Vec<bf16> = values.into_iter().map(bf16::from_f32).collect();
        FlexTensor::new(Bytes::from_elems(values), Layout::contiguous(shape), DType::BF16)
    } else {
        f32_tensor(values, shape)
    }
}

/// `x` rounded to the nearest bf16, as f32: where a kernel on bf16 rounds an intermediate
/// result as the reference's separate bf16 operations do.
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Runs `body(out_rows, rows)` over chunks of `rows_per_task` rows of `out` (`rows` is the
/// chunk's range of row indices, for the caller to take the matching rows of its inputs), in
/// parallel when there is more than one chunk: a decoding step's one row would spend longer
/// waking the pool than computing. Returns what each chunk's `body` returned, in row order, so
/// that a reduction over them is the same whichever thread ran which chunk.
pub(crate) fn for_row_chunks<T: Send>(
    out: &mut [f32],
    out_width: usize,
    rows_per_task: usize,
    body: impl Fn(&mut [f32], Range<usize>) -> T + Sync,
) -> Vec<T> {
    let rows = out.len() / out_width;
    let range = |chunk: usize| chunk * rows_per_task..((chunk + 1) * rows_per_task).min(rows);
    if rows > rows_per_task {
        super::threads::keep_warm();
        out.par_chunks_mut(rows_per_task * out_width)
            .enumerate()
            .map(|(chunk, out)| body(out, range(chunk)))
            .collect()
    } else {
        vec![body(out, 0..rows)]
    }
}
