//! The projections of a decoding step (a few rows times a weight matrix) as one backend operation
//! on Flex, over both cores.
//!
//! burn-flex 0.22 hands every product to `gemm`, on one thread below 192³ multiply-adds, which is
//! every product of batch-1 decoding: one core streams the weights while the other idles. bf16
//! weights fare worse still, as burn-flex widens both operands to f32 copies on every call (and
//! the tied head's `wteᵀ`, a transposed view, was first copied whole, every token). Here a
//! product of up to [`SMALL_ROWS`] rows reads the weight matrix once where it lies, in blocks
//! spread over the rayon pool ([`in_blocks`]), widening bf16 on the fly (half the bytes of f32
//! to stream). Each output's sum has one order, fixed by the weight's shape, whichever thread
//! computes it, so results depend neither on the other rows nor on the pool's size. Larger products, gradients and other backends keep
//! [`super::matmul`]'s product. The lasting fix is upstream, in burn-flex's matmul.

use std::ops::Range;

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::{DType, Shape};
use half::bf16;
use rayon::prelude::*;

use super::flex::{Widen, runs_on_flex, tensor_of, widened_rows, widens};
use super::simd::{dot, vectorised};

/// The most rows the kernel takes; products with more rows are `gemm`'s, whose packed
/// micro-kernels win once a weight block is reused across many rows.
pub const SMALL_ROWS: usize = 8;

/// Multiply-adds below which one thread does the whole product (waking the pool costs more).
const SERIAL_MACS: usize = 1 << 16;

/// `x · w` over the last dimension of `x` (`[.., k]`) with `w` `[k, n]`: a linear layer without
/// its bias.
#[backend_extension(Flex, Autodiff)]
pub trait SmallRowsOps: Backend {
    fn small_rows_matmul(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::<Self>(x, weight)
    }
}

/// `layer.forward(x)` through [`product`].
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let weight = layer.weight.val();
    if x.dims()[D - 1] != weight.dims()[0] {
        return layer.forward(x);
    }
    let y = product(x, weight);
    match &layer.bias {
        Some(bias) => y + bias.val().unsqueeze(),
        None => y,
    }
}

/// `x · w` over the last dimension of `x` (`[.., k]`) with `w` `[k, n]`: the small-rows kernel
/// where it applies (inference, no autodiff, on Flex, f32 or bf16, at most [`SMALL_ROWS`] rows;
/// `w` contiguous or the transpose of a contiguous `[n, k]`), one `[rows, k] · [k, n]` product
/// through [`super::matmul`] elsewhere. A quantized `w` goes to [`super::quantized_linear`].
pub fn product<const D: usize>(x: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    if matches!(weight.dtype(), DType::QFloat(_)) {
        return super::quantized_linear::quantized_product(x, weight);
    }
    let [k, n] = weight.dims();
    let mut dims = x.dims();
    assert_eq!(dims[D - 1], k, "the product's inner dimensions differ");
    let rows = x.shape().num_elements().checked_div(k).unwrap_or(0);
    let device = x.device();
    let fits = runs_on_flex(&device)
        && !device.is_autodiff()
        && (1..=SMALL_ROWS).contains(&rows)
        && widens(x.dtype())
        && weight.dtype() == x.dtype();
    if fits {
        return Tensor::from_dispatch(<Dispatch as SmallRowsOps>::small_rows_matmul(
            x.into_dispatch(),
            weight.into_dispatch(),
        ));
    }
    dims[D - 1] = n;
    super::matmul::matmul(x.reshape([rows, k]), weight).reshape(dims)
}

/// The operation with backend operations: rows flattened, one matrix product.
fn composed<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>) -> FloatTensor<B> {
    let shape = x.shape();
    let last = shape.num_dims() - 1;
    let (k, n) = (shape[last], weight.shape()[1]);
    let rows = shape.num_elements() / k.max(1);
    let y = B::float_matmul(B::float_reshape(x, Shape::new([rows, k])), weight);
    let mut out = shape;
    out[last] = n;
    B::float_reshape(y, out)
}

impl SmallRowsOps for Flex {
    fn small_rows_matmul(x: FlexTensor, weight: FlexTensor) -> FlexTensor {
        let x = x.to_contiguous();
        let columns = holds_columns(&weight);
        let weight = if columns { weight } else { weight.to_contiguous() };
        let dtype = x.dtype();
        let (k, n) = (weight.shape()[0], weight.shape()[1]);
        // The weight's elements: `[k, n]` row-major, or `[n, k]` row-major where it holds columns.
        let span = weight.layout().start_offset()..weight.layout().start_offset() + k * n;
        let out = match widened_rows(&x) {
            Some(_) if weight.dtype() != dtype => None,
            Some(x_rows) if dtype == DType::F32 => {
                Some(multiply(&x_rows, &weight.storage::<f32>()[span], k, n, columns))
            }
            Some(x_rows) if dtype == DType::BF16 => {
                Some(multiply(&x_rows, &weight.storage::<bf16>()[span], k, n, columns))
            }
            _ => None,
        };
        let Some(out) = out else {
            return composed::<Self>(x, weight);
        };
        let mut shape = x.shape();
        let last = shape.num_dims() - 1;
        shape[last] = n;
        tensor_of(out, shape, dtype)
    }
}

/// Whether `weight` `[k, n]` is the transpose of a contiguous `[n, k]` (the tied head's `wteᵀ`):
/// its columns are contiguous rows of storage.
fn holds_columns(weight: &FlexTensor) -> bool {
    let k = weight.shape()[0];
    k > 1 && weight.layout().strides() == [1, k as isize]
}

/// [`linear`] turns autodiff away; the default (the backend's matrix product, which records its
/// gradient) keeps the trait whole.
impl<B: Backend, C: CheckpointStrategy> SmallRowsOps for Autodiff<B, C> {}

/// `x · w` for `x` `[rows, k]` (f32) and `w` `[k, n]`, given row-major, or as its transpose
/// `[n, k]` row-major where `columns`: `[rows, n]`.
fn multiply<W: Widen>(x: &[f32], w: &[W], k: usize, n: usize, columns: bool) -> Vec<f32> {
    if columns {
        // Each column is one contiguous dot product: column blocks alone read it in long runs.
        return in_blocks(x.len(), k, n, 16, 0, |cols, _, acc| {
            block_dots(x, &w[cols.start * k..cols.end * k], k, acc)
        });
    }
    // Column blocks a multiple of 16 columns (one AVX-512 register).
    in_blocks(x.len(), k, n, 16, size_of::<W>(), |cols, channels, acc| {
        block_product(x, w, k, n, cols.start, channels, acc)
    })
}

/// Weight bytes a part of the input channels holds at least (see [`in_blocks`]): enough that
/// its partial sums (a `[rows, n]` of f32) are small beside the weights it reads.
const PART_BYTES: usize = 1 << 20;

/// Fewest parts of a weight read in place whose product is split over the pool: enough for two
/// tasks per thread on up to four cores without splitting rows into column blocks. A
/// `[512, 512]` f32 weight (1 MiB, one part by size) split into four column blocks was read in
/// runs of 512 bytes: decoding at h = 512 streamed 15-19 GB/s, and 23 with eight parts.
const MIN_PARTS: usize = 8;

/// Most bytes the parts' partial sums take together at [`SMALL_ROWS`] rows.
const PARTIAL_BYTES: usize = 4 << 20;

/// Most columns of a block: its accumulator at [`SMALL_ROWS`] rows (256 KiB) stays in a core's
/// L2 cache, which the kernels read and write once per four input channels.
const BLOCK_COLUMNS: usize = 8192;

/// A `[rows, n]` product of `rows · k` inputs (`inputs` values) with a `[k, n]` row-major weight
/// of `weight_bytes` per element (0 for one read by columns), computed in blocks spread over the
/// rayon pool: `block(columns, channels, acc)` fills `acc` `[rows, columns.len()]` with the sums
/// over `channels` (a multiple of four long, but the last), `columns` a multiple of `align`
/// wide (but the last).
///
/// A weight row is read in runs of a block's width. Split into one block per thread, a few
/// thousand columns make runs of a page or less, too short for the CPU's stream prefetchers,
/// and reading them ran at a third to half of the memory's speed (a `[5280, 5280]` of 8-bit
/// levels: 7-9 GB/s). So a weight is also split along its input channels into parts (by size,
/// and at least [`MIN_PARTS`] where the pool takes it), each as few blocks as the accumulators
/// allow, which read whole rows back to back (16-20 GB/s); the parts' sums are added in order. The parts depend on the weight's shape only:
/// every output's sum has one order, whatever the rows beside it or the pool's size. Waking
/// the pool costs more than a product below [`SERIAL_MACS`], which runs on the calling thread.
pub(super) fn in_blocks(
    inputs: usize,
    k: usize,
    n: usize,
    align: usize,
    weight_bytes: usize,
    block: impl Fn(Range<usize>, Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
    let rows = inputs.checked_div(k).unwrap_or(0);
    if rows == 0 || n == 0 {
        return vec![0.0; rows * n];
    }
    // Shape only (not the rows, not the pool), so that every output's order stays fixed.
    let fewest = if weight_bytes > 0 && k * n >= SERIAL_MACS {
        MIN_PARTS
    } else {
        1
    };
    let by_size = (k * n * weight_bytes / PART_BYTES).max(fewest);
    let by_partials = (PARTIAL_BYTES / (SMALL_ROWS * n * size_of::<f32>())).max(1);
    let per_part = k.div_ceil(by_size.min(by_partials)).next_multiple_of(4);
    let parts = k.div_ceil(per_part);
    let tasks = ((rows * k * n) / SERIAL_MACS).clamp(1, 2 * rayon::current_num_threads());
    if tasks > 1 {
        super::threads::keep_warm();
    }
    let column_blocks = n.div_ceil(BLOCK_COLUMNS).max(tasks.div_ceil(parts));
    let width = n.div_ceil(column_blocks).next_multiple_of(align).min(n);
    let blocks = n.div_ceil(width);
    let sums: Vec<(usize, Vec<f32>)> = (0..parts * blocks)
        .into_par_iter()
        .with_max_len(1)
        .map(|task| {
            let (part, b) = (task / blocks, task % blocks);
            let columns = b * width..((b + 1) * width).min(n);
            let channels = part * per_part..((part + 1) * per_part).min(k);
            let mut acc = vec![0f32; rows * columns.len()];
            let start = columns.start;
            block(columns, channels, &mut acc);
            (start, acc)
        })
        .collect();
    // In task order: part by part, so each output adds its parts' sums in channel order.
    let mut out = vec![0f32; rows * n];
    for (task, (start, acc)) in sums.into_iter().enumerate() {
        let width = acc.len() / rows;
        for (row, values) in acc.chunks_exact(width).enumerate() {
            let out = &mut out[row * n + start..row * n + start + width];
            if task < blocks {
                out.copy_from_slice(values);
            } else {
                out.iter_mut().zip(values).for_each(|(o, v)| *o += v);
            }
        }
    }
    out
}

/// `acc[r, j] = x[r] · w[j]` for the `width` rows `w[j]` of `k` weights (one output column each),
/// `acc` `[rows, width]`: a dot product in sixteen lanes, in the widest SIMD the CPU has.
fn block_dots<W: Widen>(x: &[f32], w: &[W], k: usize, acc: &mut [f32]) {
    let width = w.len() / k;
    vectorised(
        #[inline(always)]
        || {
            for (j, column) in w.chunks_exact(k).enumerate() {
                for (row, x) in x.chunks_exact(k).enumerate() {
                    acc[row * width + j] = dot(x, column);
                }
            }
        },
    )
}

/// `acc[r, j] = Σ_i x[r, i] · w[i, start + j]` over `i` in `channels`, in order, `acc`
/// `[rows, width]`; the widest SIMD the CPU has, chosen at run time.
fn block_product<W: Widen>(
    x: &[f32],
    w: &[W],
    k: usize,
    n: usize,
    start: usize,
    channels: Range<usize>,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { block_product_avx512(x, w, k, n, start, channels, acc) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { block_product_avx2(x, w, k, n, start, channels, acc) };
        }
    }
    block_product_with::<W, false>(x, w, k, n, start, channels, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn block_product_avx512<W: Widen>(
    x: &[f32],
    w: &[W],
    k: usize,
    n: usize,
    start: usize,
    channels: Range<usize>,
    acc: &mut [f32],
) {
    block_product_with::<W, true>(x, w, k, n, start, channels, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_product_avx2<W: Widen>(
    x: &[f32],
    w: &[W],
    k: usize,
    n: usize,
    start: usize,
    channels: Range<usize>,
    acc: &mut [f32],
) {
    block_product_with::<W, true>(x, w, k, n, start, channels, acc)
}

/// The loop the SIMD variants compile: four input channels at a time, each output adding its
/// four terms in channel order (four weight rows streamed at once, a quarter of the
/// accumulator traffic), then the remaining channels one by one. `FMA` only where the CPU has
/// it (a software `fma` is slow).
#[inline(always)]
fn block_product_with<W: Widen, const FMA: bool>(
    x: &[f32],
    w: &[W],
    k: usize,
    n: usize,
    start: usize,
    channels: Range<usize>,
    acc: &mut [f32],
) {
    let madd = |v: W, scale: f32, a: f32| {
        if FMA {
            v.widen().mul_add(scale, a)
        } else {
            a + v.widen() * scale
        }
    };
    let rows = x.len() / k;
    let width = acc.len() / rows;
    let weights = |i: usize| &w[i * n + start..i * n + start + width];
    let mut i = channels.start;
    while i + 4 <= channels.end {
        let (w0, w1, w2, w3) = (weights(i), weights(i + 1), weights(i + 2), weights(i + 3));
        for (row, out) in acc.chunks_exact_mut(width).enumerate() {
            let s = &x[row * k + i..row * k + i + 4];
            for j in 0..width {
                let a = madd(w0[j], s[0], out[j]);
                let a = madd(w1[j], s[1], a);
                let a = madd(w2[j], s[2], a);
                out[j] = madd(w3[j], s[3], a);
            }
        }
        i += 4;
    }
    for i in i..channels.end {
        let w0 = weights(i);
        for (row, out) in acc.chunks_exact_mut(width).enumerate() {
            let scale = x[row * k + i];
            for (o, &v) in out.iter_mut().zip(w0) {
                *o = madd(v, scale, *o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::tensor::{Distribution, FloatDType};

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a.cast(FloatDType::F32) - b.cast(FloatDType::F32))
            .abs()
            .max()
            .into_scalar::<f32>()
    }

    #[test]
    fn matches_the_matrix_product_for_every_small_shape() {
        let device = Device::flex();
        // Widths that are not multiples of a SIMD register, one block and many blocks; the
        // input channels in parts (the last not a multiple of four), and columns in blocks too.
        for (k, n) in [
            (1, 1),
            (5, 7),
            (64, 33),
            (256, 768),
            (300, 1408),
            (1030, 600),
            (262, 9000),
        ] {
            let layer = LinearConfig::new(k, n).with_bias(true).init(&device);
            for rows in [1, 2, 3, SMALL_ROWS] {
                let x = Tensor::<3>::random([1, rows, k], Distribution::Normal(0.0, 1.0), &device);
                let fast = linear(&layer, x.clone());
                let reference = layer.forward(x);
                assert_eq!(fast.dims(), reference.dims());
                let scale = (k as f32).sqrt();
                assert!(max_diff(fast, reference) < 1e-5 * scale, "k {k}, n {n}, rows {rows}");
            }
        }
    }

    #[test]
    fn bf16_weights_match_their_f32_values() {
        let device = Device::flex();
        let (k, n) = (96, 200);
        let layer = LinearConfig::new(k, n).with_bias(false).init(&device);
        let layer_bf16 = Linear {
            weight: layer.weight.clone().map(|w| w.cast(FloatDType::BF16)),
            bias: None,
        };
        let x = Tensor::<2>::random([2, k], Distribution::Normal(0.0, 1.0), &device).cast(FloatDType::BF16);
        let fast = linear(&layer_bf16, x.clone());
        assert_eq!(fast.dtype(), DType::BF16);
        // The same rounded inputs in f32: the kernel accumulates in f32 and rounds once.
        let reference = x
            .cast(FloatDType::F32)
            .matmul(layer_bf16.weight.val().cast(FloatDType::F32));
        let reference = reference.cast(FloatDType::BF16);
        assert!(max_diff(fast, reference) < 0.02);
    }

    /// A transposed `[n, k]` table (the tied head's `wteᵀ`, here also a view into a larger one)
    /// is read in place, in f32 and in bf16.
    #[test]
    fn transposed_weights_match_the_matrix_product() {
        let device = Device::flex();
        for (k, n) in [(5, 7), (64, 33), (256, 300)] {
            let whole = Tensor::<2>::random([n + 3, k], Distribution::Normal(0.0, 1.0), &device);
            let table = whole.narrow(0, 3, n);
            for rows in [1, 3, SMALL_ROWS] {
                let x = Tensor::<2>::random([rows, k], Distribution::Normal(0.0, 1.0), &device);
                let fast = product(x.clone(), table.clone().transpose());
                let reference = x.clone().matmul(table.clone().transpose());
                assert!(
                    max_diff(fast, reference) < 1e-5 * (k as f32).sqrt(),
                    "k {k}, n {n}, rows {rows}"
                );
                let bf16 = FloatDType::BF16;
                let (x, table) = (x.cast(bf16), table.clone().cast(bf16));
                let fast = product(x.clone(), table.clone().transpose());
                assert_eq!(fast.dtype(), DType::BF16);
                let reference = x.cast(FloatDType::F32).matmul(table.cast(FloatDType::F32).transpose());
                let scale = reference.clone().abs().max().into_scalar::<f32>();
                assert!(
                    max_diff(fast, reference) <= scale / 128.0,
                    "bf16: k {k}, n {n}, rows {rows}"
                );
            }
        }
    }

    /// A row's product is the same bits whatever rows share the product: up to [`SMALL_ROWS`]
    /// rows here, larger products in `gemm`, whose sums run over the inner dimension in the
    /// same order for every row. The server's engine relies on it to run requests together
    /// with the answers each gets alone.
    #[test]
    fn a_row_s_product_does_not_depend_on_the_rows_beside_it() {
        let device = Device::flex();
        let shapes = [
            (64, 192, false),
            (256, 704, false),
            (704, 256, false),
            (512, 1536, false),
            (1030, 600, false),
            (256, 2048, true),
        ];
        for (k, n, transposed) in shapes {
            // The tied head multiplies by `wteᵀ`, a transposed view.
            let w = match transposed {
                false => Tensor::<2>::random([k, n], Distribution::Normal(0.0, 1.0), &device),
                true => Tensor::<2>::random([n, k], Distribution::Normal(0.0, 1.0), &device).transpose(),
            };
            for (rows, group) in [(1, SMALL_ROWS), (1, 3), (2, 4), (9, 2), (32, 3), (33, 8), (64, 8)] {
                let x = Tensor::<3>::random([group, rows, k], Distribution::Normal(0.0, 1.0), &device);
                let together = product(x.clone(), w.clone());
                for b in 0..group {
                    let alone: Vec<f32> = product(x.clone().narrow(0, b, 1), w.clone())
                        .into_data()
                        .try_to_vec()
                        .unwrap();
                    let beside: Vec<f32> = together.clone().narrow(0, b, 1).into_data().try_to_vec().unwrap();
                    let same = alone.iter().zip(&beside).all(|(a, c)| a.to_bits() == c.to_bits());
                    assert!(same, "k {k}, n {n}: row block {b} of {group} blocks of {rows} rows");
                }
            }
        }
    }

    #[test]
    fn larger_products_and_gradients_keep_the_matrix_product() {
        let device = Device::flex();
        let layer = LinearConfig::new(16, 8).init(&device);
        let many = Tensor::<2>::random([SMALL_ROWS + 1, 16], Distribution::Normal(0.0, 1.0), &device);
        assert!(max_diff(linear(&layer, many.clone()), layer.forward(many)) == 0.0);
        let empty = Tensor::<2>::zeros([0, 16], &device);
        assert_eq!(linear(&layer, empty).dims(), [0, 8]);
    }
}
