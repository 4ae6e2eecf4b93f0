//! The projections of a decoding step with 8- or 4-bit weights ([`crate::quantize`]): a few
//! rows times a quantized weight, reading the levels where they lie.
//!
//! burn-flex 0.22 multiplies by a quantized tensor by dequantizing all of it to a float copy
//! first, on every call: a decoding step would write and read a float matrix per projection,
//! more bytes than the float weight it replaces. Here a product of up to
//! [`SMALL_ROWS`] rows streams the `i8` levels once, in blocks over the rayon pool (see
//! [`in_blocks`]), each group of 32 levels scaled by `x · scale` and widened on the fly. Each
//! output's sum has one order, fixed by the weight's shape, whichever thread computes it, so a
//! row's result does not depend on the rows beside it. Larger products (prompts) dequantize once and use the float product;
//! other backends use Burn's quantized product.

use std::ops::Range;

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::{FlexQTensor, FlexTensor};
use burn::backend::ops::QTensorOps;
use burn::backend::tensor::{FloatTensor, QuantizedTensor};
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType, Shape};
use rayon::prelude::*;

use super::flex::{runs_on_flex, tensor_of, widened_rows, widens};
use super::linear::{SMALL_ROWS, in_blocks};
use crate::quantize::{GROUP, groups};

/// `x · w` over the last dimension of `x` (`[.., k]`) with `w` a quantized `[k, n]`.
#[backend_extension(Flex, Autodiff)]
pub trait QuantizedRowsOps: Backend {
    fn quantized_rows_matmul(x: FloatTensor<Self>, weight: QuantizedTensor<Self>) -> FloatTensor<Self> {
        composed::<Self>(x, weight)
    }

    /// The weight's values in f32.
    fn dequantized_f32(weight: QuantizedTensor<Self>) -> FloatTensor<Self> {
        Self::dequantize(weight, FloatDType::F32)
    }
}

/// `x · w` for a quantized `w` `[k, n]`: the kernel for a few rows on Flex without autodiff,
/// the dequantized weight's product elsewhere on Flex (a prompt's rows), Burn's quantized
/// product on the other backends.
pub fn quantized_product<const D: usize>(x: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    let [k, n] = weight.dims();
    let mut dims = x.dims();
    let rows = x.shape().num_elements().checked_div(k).unwrap_or(0);
    let device = x.device();
    if !runs_on_flex(&device) {
        dims[D - 1] = n;
        return x.reshape([rows, k]).matmul(weight).reshape(dims);
    }
    if !device.is_autodiff() && (1..=SMALL_ROWS).contains(&rows) && widens(x.dtype()) {
        return Tensor::from_dispatch(<Dispatch as QuantizedRowsOps>::quantized_rows_matmul(
            x.into_dispatch(),
            weight.into_dispatch(),
        ));
    }
    let dtype = float_dtype(x.dtype());
    let weight = Tensor::<2>::from_dispatch(<Dispatch as QuantizedRowsOps>::dequantized_f32(weight.into_dispatch()));
    super::linear::product(x, weight.cast(dtype))
}

/// The float type of activations of `dtype` (f32 for anything else).
fn float_dtype(dtype: DType) -> FloatDType {
    match dtype {
        DType::BF16 => FloatDType::BF16,
        DType::F16 => FloatDType::F16,
        _ => FloatDType::F32,
    }
}

/// The operation with backend operations: the weight dequantized, one matrix product.
fn composed<B: Backend>(x: FloatTensor<B>, weight: QuantizedTensor<B>) -> FloatTensor<B> {
    let shape = x.shape();
    let last = shape.num_dims() - 1;
    let (k, n) = (shape[last], weight.shape()[1]);
    let rows = shape.num_elements() / k.max(1);
    let dtype = float_dtype(x.dtype());
    let weight = B::dequantize(weight, dtype);
    let y = B::float_matmul(B::float_reshape(x, Shape::new([rows, k])), weight);
    let mut out = shape;
    out[last] = n;
    B::float_reshape(y, out)
}

impl QuantizedRowsOps for Flex {
    fn quantized_rows_matmul(x: FlexTensor, weight: FlexQTensor) -> FlexTensor {
        let x = x.to_contiguous();
        let dtype = x.dtype();
        let (k, n) = (weight.shape()[0], weight.shape()[1]);
        let out = match widened_rows(&x) {
            Some(x_rows) if reads_in_place(&weight) => {
                #[cfg(test)]
                tests::IN_PLACE.with(|count| count.set(count.get() + 1));
                let levels = &weight.tensor().storage::<i8>()[..k * n];
                multiply(&x_rows, levels, weight.scales(), k, n)
            }
            _ => return composed::<Self>(x, weight),
        };
        let mut shape = x.shape();
        let last = shape.num_dims() - 1;
        shape[last] = n;
        tensor_of(out, shape, dtype)
    }

    /// burn-flex's dequantization finds each value's block by division, on one thread; here
    /// each input channel's groups are scaled in one vectorised pass, rows spread over the pool.
    fn dequantized_f32(weight: FlexQTensor) -> FlexTensor {
        if !reads_in_place(&weight) {
            return Self::dequantize(weight, FloatDType::F32);
        }
        let (k, n) = (weight.shape()[0], weight.shape()[1]);
        let levels = &weight.tensor().storage::<i8>()[..k * n];
        let scales = weight.scales();
        let mut out = vec![0f32; k * n];
        let per_row = groups(n);
        out.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
            let levels = &levels[i * n..(i + 1) * n];
            let scales = &scales[i * per_row..(i + 1) * per_row];
            super::simd::vectorised(
                #[inline(always)]
                || {
                    for ((out, levels), &scale) in row.chunks_mut(GROUP).zip(levels.chunks(GROUP)).zip(scales) {
                        for (o, &q) in out.iter_mut().zip(levels) {
                            *o = f32::from(q) * scale;
                        }
                    }
                },
            )
        });
        super::flex::f32_tensor(out, weight.shape())
    }
}

/// Whether the kernel reads `weight` as it lies: a contiguous `[k, n]` of `i8` levels with one
/// scale per group of [`GROUP`] columns of a row, as [`crate::quantize`] makes them.
fn reads_in_place(weight: &FlexQTensor) -> bool {
    let (k, n) = (weight.shape()[0], weight.shape()[1]);
    let levels = weight.tensor();
    let grouped = match weight.dtype() {
        DType::QFloat(scheme) => {
            scheme.block_size().map(|b| b.to_dim_vec(2)) == Some(vec![1, GROUP as u8])
                && burn::tensor::quantization::global_scale_dtype(&scheme).is_none()
        }
        _ => false,
    };
    grouped
        && levels.dtype() == DType::I8
        && levels.is_contiguous()
        && levels.layout().start_offset() == 0
        && weight.scales().len() == k * groups(n)
}

/// The entry point turns autodiff away; the default keeps the trait whole.
impl<B: Backend, C: CheckpointStrategy> QuantizedRowsOps for Autodiff<B, C> {}

/// `x · w` for `x` `[rows, k]` (f32), `w` `[k, n]` given as levels with one scale per group of
/// [`GROUP`] columns of a row: `[rows, n]`, in column blocks of whole groups.
fn multiply(x: &[f32], levels: &[i8], scales: &[f32], k: usize, n: usize) -> Vec<f32> {
    let weight = Levels { levels, scales, k, n };
    in_blocks(x.len(), k, n, GROUP, size_of::<i8>(), |columns, channels, acc| {
        block_product(x, &weight, columns.start, channels, acc)
    })
}

/// A `[k, n]` weight's `i8` levels, row-major, with one scale per group of [`GROUP`] columns of
/// a row.
struct Levels<'a> {
    levels: &'a [i8],
    scales: &'a [f32],
    k: usize,
    n: usize,
}

/// `acc[r, j] = Σ_i x[r, i] · scale[i, g(j)] · level[i, start + j]` over `i` in `channels`, in
/// order, `acc` `[rows, width]` with `start` a group boundary; the widest SIMD the CPU has,
/// chosen at run time.
fn block_product(x: &[f32], weight: &Levels<'_>, start: usize, channels: Range<usize>, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { block_product_avx512(x, weight, start, channels, acc) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { block_product_avx2(x, weight, start, channels, acc) };
        }
    }
    block_product_with::<false>(x, weight, start, channels, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn block_product_avx512(x: &[f32], weight: &Levels<'_>, start: usize, channels: Range<usize>, acc: &mut [f32]) {
    block_product_with::<true>(x, weight, start, channels, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_product_avx2(x: &[f32], weight: &Levels<'_>, start: usize, channels: Range<usize>, acc: &mut [f32]) {
    block_product_with::<true>(x, weight, start, channels, acc)
}

/// The loop the SIMD variants compile: four input channels at a time, each group of 32 outputs
/// adding its four terms (`level · (x · scale)`) in channel order, then the remaining channels
/// one by one. `FMA` only where the CPU has it.
#[inline(always)]
fn block_product_with<const FMA: bool>(
    x: &[f32],
    weight: &Levels<'_>,
    start: usize,
    channels: Range<usize>,
    acc: &mut [f32],
) {
    let &Levels { levels, scales, k, n } = weight;
    let madd = |q: i8, a: f32, sum: f32| {
        if FMA {
            f32::from(q).mul_add(a, sum)
        } else {
            sum + f32::from(q) * a
        }
    };
    let rows = x.len() / k;
    let width = acc.len() / rows;
    let per_row = groups(n);
    let first = start / GROUP;
    let row_levels = |i: usize| &levels[i * n + start..i * n + start + width];
    let row_scales = |i: usize| &scales[i * per_row + first..i * per_row + first + width.div_ceil(GROUP)];
    // `x · scale` of the four channels for every group of the block, per row: computed once,
    // then read as a broadcast by the group loop.
    let spans = width.div_ceil(GROUP);
    let mut factors = vec![0f32; 4 * spans];
    let mut i = channels.start;
    while i + 4 <= channels.end {
        let (l0, l1, l2, l3) = (row_levels(i), row_levels(i + 1), row_levels(i + 2), row_levels(i + 3));
        let scales = [row_scales(i), row_scales(i + 1), row_scales(i + 2), row_scales(i + 3)];
        for (row, out) in acc.chunks_exact_mut(width).enumerate() {
            let v = &x[row * k + i..row * k + i + 4];
            for (c, factors) in factors.chunks_exact_mut(spans).enumerate() {
                for (f, &s) in factors.iter_mut().zip(scales[c]) {
                    *f = v[c] * s;
                }
            }
            let (f0, rest) = factors.split_at(spans);
            let (f1, rest) = rest.split_at(spans);
            let (f2, f3) = rest.split_at(spans);
            // Whole groups as fixed-length arrays, which the compiler unrolls into full-width
            // vectors (widening the levels a register at a time), then the short last group.
            let whole = out
                .chunks_exact_mut(GROUP)
                .zip(l0.chunks_exact(GROUP).zip(l1.chunks_exact(GROUP)))
                .zip(l2.chunks_exact(GROUP).zip(l3.chunks_exact(GROUP)));
            for (g, ((out, (q0, q1)), (q2, q3))) in whole.enumerate() {
                let (a0, a1, a2, a3) = (f0[g], f1[g], f2[g], f3[g]);
                let out: &mut [f32; GROUP] = out.try_into().expect("a whole group");
                let q: [&[i8; GROUP]; 4] = [q0, q1, q2, q3].map(|q| q.try_into().expect("a whole group"));
                for j in 0..GROUP {
                    let sum = madd(q[0][j], a0, out[j]);
                    let sum = madd(q[1][j], a1, sum);
                    let sum = madd(q[2][j], a2, sum);
                    out[j] = madd(q[3][j], a3, sum);
                }
            }
            let tail = width / GROUP * GROUP;
            let g = spans - 1;
            for j in tail..width {
                let sum = madd(l0[j], f0[g], out[j]);
                let sum = madd(l1[j], f1[g], sum);
                let sum = madd(l2[j], f2[g], sum);
                out[j] = madd(l3[j], f3[g], sum);
            }
        }
        i += 4;
    }
    for i in i..channels.end {
        let (l0, s0) = (row_levels(i), row_scales(i));
        for (row, out) in acc.chunks_exact_mut(width).enumerate() {
            let v = x[row * k + i];
            for (g, out) in out.chunks_mut(GROUP).enumerate() {
                let a = v * s0[g];
                for (o, &q) in out.iter_mut().zip(&l0[g * GROUP..]) {
                    *o = madd(q, a, *o);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::{Bits, QuantizedMatrix};
    use burn::tensor::Distribution;

    fn quantized(k: usize, n: usize, bits: Bits, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let w = Tensor::<2>::random([k, n], Distribution::Normal(0.0, 1.0), device);
        let values: Vec<f32> = w.into_data().try_into_vec().unwrap();
        let q = QuantizedMatrix::quantize(&values, k, n, bits);
        let dequantized = Tensor::from_data(TensorData::new(q.dequantize(), [k, n]), device);
        (q.to_tensor(device), dequantized)
    }

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a.cast(FloatDType::F32) - b.cast(FloatDType::F32))
            .abs()
            .max()
            .into_scalar::<f32>()
    }

    thread_local! {
        /// Products this thread ran in place (the kernel decides on the calling thread).
        pub(super) static IN_PLACE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// The weights [`crate::quantize`] makes are the ones the kernel reads in place (else the
    /// tests below would check the composed fallback), for a few rows and not for many.
    #[test]
    fn quantized_weights_are_read_in_place() {
        let device = Device::flex();
        for bits in [Bits::Eight, Bits::Four] {
            let (q, _) = quantized(64, 33, bits, &device);
            for (rows, kernel) in [(1, true), (SMALL_ROWS, true), (SMALL_ROWS + 1, false)] {
                let before = IN_PLACE.with(|count| count.get());
                let x = Tensor::<2>::random([rows, 64], Distribution::Normal(0.0, 1.0), &device);
                quantized_product(x, q.clone());
                assert_eq!(
                    IN_PLACE.with(|count| count.get()) > before,
                    kernel,
                    "{bits:?}, {rows} rows"
                );
            }
        }
    }

    /// A prompt's rows multiply by the weight dequantized here, exactly the values the levels
    /// stand for.
    #[test]
    fn the_dequantized_weight_is_what_the_levels_stand_for() {
        let device = Device::flex();
        for bits in [Bits::Eight, Bits::Four] {
            let values: Vec<f32> = Tensor::<2>::random([7, 75], Distribution::Normal(0.0, 1.0), &device)
                .into_data()
                .try_into_vec()
                .unwrap();
            let q = QuantizedMatrix::quantize(&values, 7, 75, bits);
            let fast = Tensor::<2>::from_dispatch(<Dispatch as QuantizedRowsOps>::dequantized_f32(
                q.to_tensor(&device).into_dispatch(),
            ));
            let fast: Vec<f32> = fast.into_data().try_into_vec().unwrap();
            assert_eq!(fast, q.dequantize());
        }
    }

    /// The kernel computes the product with the dequantized weight, for widths that are not
    /// whole groups, one block and many, and any number of rows it takes.
    #[test]
    fn matches_the_product_with_the_dequantized_weight() {
        let device = Device::flex();
        for bits in [Bits::Eight, Bits::Four] {
            // (1030, 2080): the input channels in two parts, the last not a multiple of four.
            for (k, n) in [(1, 1), (5, 7), (64, 33), (256, 768), (300, 1408), (1030, 2080)] {
                let (q, dequantized) = quantized(k, n, bits, &device);
                for rows in [1, 2, 3, SMALL_ROWS, SMALL_ROWS + 1, 20] {
                    let x = Tensor::<3>::random([1, rows, k], Distribution::Normal(0.0, 1.0), &device);
                    let fast = quantized_product(x.clone(), q.clone());
                    let reference = x.matmul(dequantized.clone().unsqueeze());
                    assert_eq!(fast.dims(), [1, rows, n]);
                    let bound = 1e-5 * (k as f32).sqrt() * 4.0;
                    assert!(max_diff(fast, reference) < bound, "{bits:?} k {k}, n {n}, rows {rows}");
                }
            }
        }
    }

    #[test]
    fn bf16_rows_round_once() {
        let device = Device::flex();
        let (q, dequantized) = quantized(96, 200, Bits::Eight, &device);
        let x = Tensor::<2>::random([2, 96], Distribution::Normal(0.0, 1.0), &device).cast(FloatDType::BF16);
        let fast = quantized_product(x.clone(), q);
        assert_eq!(fast.dtype(), DType::BF16);
        let reference = x.cast(FloatDType::F32).matmul(dequantized).cast(FloatDType::BF16);
        assert!(max_diff(fast, reference) < 0.05);
    }

    /// What the server's batching relies on: a row's product is the same bits whatever rows
    /// share it.
    #[test]
    fn a_row_s_product_does_not_depend_on_the_rows_beside_it() {
        let device = Device::flex();
        for (k, n) in [(64, 192), (256, 704), (704, 256), (1030, 2080)] {
            let (q, _) = quantized(k, n, Bits::Four, &device);
            for group in [2, 3, SMALL_ROWS] {
                let x = Tensor::<3>::random([group, 1, k], Distribution::Normal(0.0, 1.0), &device);
                let together: Vec<f32> = quantized_product(x.clone(), q.clone())
                    .into_data()
                    .try_into_vec()
                    .unwrap();
                for b in 0..group {
                    let alone: Vec<f32> = quantized_product(x.clone().narrow(0, b, 1), q.clone())
                        .into_data()
                        .try_into_vec()
                        .unwrap();
                    let beside = &together[b * n..(b + 1) * n];
                    assert!(
                        alone.iter().zip(beside).all(|(a, c)| a.to_bits() == c.to_bits()),
                        "k {k}, n {n}: row {b} of {group}"
                    );
                }
            }
        }
    }
}
