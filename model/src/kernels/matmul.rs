//! Matrix products on Flex written straight into their output, with their own gradient.
//!
//! burn-flex 0.22 makes every product's output with `FlexTensor::empty`: a zeroed `Vec<u8>`, which
//! cubecl's `Bytes::from_bytes_vec` then copies whole into a 16-byte-aligned buffer (a `u8`
//! vector reports alignment 1), before `gemm` overwrites it. That zeroing and copy run on one
//! thread, on fresh pages, for every product: at the training benchmark's shape they were the
//! largest serial part of a step (`memmove`, `memset` and page faults, about a sixth of it), and
//! a `[2048, 256] · [256, 768]` product took twice as long as `gemm` itself. Here `gemm` writes
//! into a buffer that nobody touched before (`read_dst = false`: it never reads it), strided
//! operands (transposes, narrowed heads) are read in place, and autodiff records one operation
//! whose backward is two more of these products. bf16 products for inference are the f32 product
//! of their widened operands, rounded once. Other dtypes, broadcast batch dimensions and other
//! backends keep `Tensor::matmul`. The lasting fix is upstream, in `FlexTensor::empty`.

use std::ops::Range;

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
use burn::tensor::{Bytes, DType};
use gemm::Parallelism;
use half::bf16;
use rayon::prelude::*;

use super::flex::{Widen, f32_tensor, runs_on_flex};
use super::simd::vectorised;

/// Multiply-adds from which one product is split over the pool by `gemm` (burn-flex's bound).
const PARALLEL_MACS: usize = 192 * 192 * 192;

/// Products of at least [`SPLIT_MACS`] multiply-adds that have at most this many rows, or too
/// few multiply-adds for gemm's own split, are split into column blocks, one per thread,
/// instead.
const SPLIT_ROWS: usize = 128;
const SPLIT_MACS: usize = 1 << 20;

/// `lhs · rhs` over the last two dimensions, batched over the leading ones (the same on both).
#[backend_extension(Flex, Autodiff)]
pub trait ProductOps: Backend {
    fn product(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }
}

/// `lhs.matmul(rhs)`, through [`ProductOps`] where both are f32 on Flex with the same batch
/// dimensions (with or without autodiff), or both bf16 without autodiff (inference).
pub fn matmul<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
    let (a, b) = (lhs.dims(), rhs.dims());
    let device = lhs.device();
    let dtypes = match (lhs.dtype(), rhs.dtype()) {
        (DType::F32, DType::F32) => true,
        (DType::BF16, DType::BF16) => !device.is_autodiff(),
        _ => false,
    };
    let fits = runs_on_flex(&device) && dtypes && a[..D - 2] == b[..D - 2] && a[D - 1] == b[D - 2];
    if !fits {
        return lhs.matmul(rhs);
    }
    Tensor::from_dispatch(<Dispatch as ProductOps>::product(
        lhs.into_dispatch(),
        rhs.into_dispatch(),
    ))
}

/// A matrix of an operand: where it starts in its storage and its row and column strides.
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    pub offset: isize,
    pub row: isize,
    pub col: isize,
}

impl Operand {
    /// The matrix from element `(row, col)` on, in `data` (its storage), where gemm reads it.
    pub fn at(self, data: &[f32], row: usize, col: usize) -> Strided {
        let offset = self.offset + row as isize * self.row + col as isize * self.col;
        Strided {
            ptr: data.as_ptr().wrapping_offset(offset),
            row: self.row,
            col: self.col,
        }
    }
}

/// A strided f32 matrix as gemm reads it: its first element and its row and column strides.
#[derive(Clone, Copy)]
pub(crate) struct Strided {
    pub ptr: *const f32,
    pub row: isize,
    pub col: isize,
}

impl Strided {
    /// Rows `row` elements apart, columns adjacent.
    pub fn row_major(ptr: *const f32, row: usize) -> Self {
        Self {
            ptr,
            row: row as isize,
            col: 1,
        }
    }

    /// The same elements read as the transpose.
    pub fn transposed(self) -> Self {
        Self {
            ptr: self.ptr,
            row: self.col,
            col: self.row,
        }
    }
}

/// Where each matrix of a batched tensor `[.., m, k]` (any strides) lies in its storage, in the
/// row-major order of the batch dimensions.
pub(crate) fn matrices(t: &FlexTensor) -> Vec<Operand> {
    let shape = t.shape();
    let rank = shape.num_dims();
    let batch = &shape[..rank - 2];
    let (layout, strides) = (t.layout(), t.layout().strides());
    let count: usize = batch.iter().product();
    (0..count)
        .map(|index| {
            let mut rest = index;
            let mut offset = layout.start_offset() as isize;
            for (dim, &size) in batch.iter().enumerate().rev() {
                offset += (rest % size) as isize * strides[dim];
                rest /= size;
            }
            Operand {
                offset,
                row: strides[rank - 2],
                col: strides[rank - 1],
            }
        })
        .collect()
}

/// `dst = a · b` for strided f32 matrices `a` `[m, k]` and `b` `[k, n]`, into `m` rows
/// `dst_row` elements apart, which gemm writes without reading (zeros where `k` is 0).
///
/// # Safety
/// Every element of `a` and `b` must be initialised and stay unwritten while this runs; the
/// `m × n` elements of `dst` must be valid for writes and touched by no other thread.
pub(crate) unsafe fn product_at(
    dst: *mut f32,
    dst_row: usize,
    (m, n, k): (usize, usize, usize),
    a: Strided,
    b: Strided,
    parallelism: Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row as isize,
            false,
            a.ptr,
            a.col,
            a.row,
            b.ptr,
            b.col,
            b.row,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

impl ProductOps for Flex {
    /// bf16 operands are widened to f32 in one parallel vectorised pass each, multiplied as f32
    /// and the product rounded once: burn-flex does the same on one thread, element by element,
    /// which made bf16 prompts slower than f32 ones.
    fn product(lhs: FlexTensor, rhs: FlexTensor) -> FlexTensor {
        if lhs.dtype() == DType::BF16 && rhs.dtype() == DType::BF16 {
            let product = Self::product(widened(lhs), widened(rhs));
            return narrowed(product);
        }
        let (ls, rs) = (lhs.shape(), rhs.shape());
        let rank = ls.num_dims();
        let fits = lhs.dtype() == DType::F32
            && rhs.dtype() == DType::F32
            && rank >= 2
            && rs.num_dims() == rank
            && ls[..rank - 2] == rs[..rank - 2]
            && rs[rank - 2] == ls[rank - 1];
        if !fits {
            return Flex::float_matmul(lhs, rhs);
        }
        let (m, n) = (ls[rank - 2], rs[rank - 1]);
        let out = product_into(&lhs, &rhs, |index| index * m * n, n);
        let mut shape = ls.clone();
        shape[rank - 1] = n;
        f32_tensor(out, shape)
    }
}

/// The batched product of f32 `lhs` `[.., m, k]` and `rhs` `[.., k, n]` (the same batch
/// dimensions, any strides) as a new buffer of their `count·m·n` elements: matrix `i` of the
/// batch (in row-major order) from element `offset(i)`, its rows `row` elements apart. The
/// matrices must cover the buffer exactly once, as they are its only writes.
pub(crate) fn product_into(
    lhs: &FlexTensor,
    rhs: &FlexTensor,
    offset: impl Fn(usize) -> usize + Sync,
    row: usize,
) -> Vec<f32> {
    let (ls, rs) = (lhs.shape(), rhs.shape());
    let rank = ls.num_dims();
    let (m, k, n) = (ls[rank - 2], ls[rank - 1], rs[rank - 1]);
    let batch = &ls[..rank - 2];
    let count: usize = batch.iter().product();
    let len = count * m * n;
    if m > 0 && n > 0 {
        assert!(
            (0..count).all(|index| offset(index) + (m - 1) * row + n <= len),
            "a product's matrix lies outside its output"
        );
    }
    super::threads::keep_warm();
    let (lhs_data, rhs_data) = (lhs.storage::<f32>(), rhs.storage::<f32>());
    let (lhs_ops, rhs_ops) = (matrices(lhs), matrices(rhs));
    let mut out = Vec::<f32>::with_capacity(len);
    let out_ptr = SendPtr(out.as_mut_ptr());
    // Output matrix `index`, columns `cols` of it.
    let one = |index: usize, cols: Range<usize>, parallelism: Parallelism| {
        // SAFETY: the operands' offsets and strides come from their layouts, so every element
        // gemm reads lies in its storage (columns `cols` of the right operand are within its
        // `n`); output matrix `index` lies within `len` (the caller's layout) and no other call
        // writes its columns `cols`.
        unsafe {
            product_at(
                out_ptr.get().add(offset(index) + cols.start),
                row,
                (m, cols.len(), k),
                lhs_ops[index].at(lhs_data, 0, 0),
                rhs_ops[index].at(rhs_data, 0, cols.start),
                parallelism,
            );
        }
    };
    let macs = m * n * k;
    if count > 1 && macs < PARALLEL_MACS {
        (0..count)
            .into_par_iter()
            .for_each(|index| one(index, 0..n, Parallelism::None));
    } else if macs >= SPLIT_MACS && (m <= SPLIT_ROWS || macs < PARALLEL_MACS) {
        // Few rows (a prompt's), or a product gemm would run on one thread (the prompts of a
        // server's step: 8 × 32 rows of a narrow model): one column block per thread, each a
        // serial gemm. gemm's own split of such a product costs more in scheduling than it
        // gains. Each output's sum runs over `k` in the same order either way.
        let block = n.div_ceil(rayon::current_num_threads()).next_multiple_of(16);
        for index in 0..count {
            (0..n.div_ceil(block))
                .into_par_iter()
                .for_each(|b| one(index, b * block..((b + 1) * block).min(n), Parallelism::None));
        }
    } else {
        let parallelism = if macs >= PARALLEL_MACS {
            Parallelism::Rayon(0)
        } else {
            Parallelism::None
        };
        (0..count).for_each(|index| one(index, 0..n, parallelism));
    }
    // SAFETY: the matrices cover all `len` elements (the caller's layout places them without
    // gaps or overlap), each written whole by gemm (zeros when `k` is 0).
    unsafe { out.set_len(len) };
    out
}

/// Elements converted per task by [`widened`] and [`narrowed`]; smaller tensors stay on the
/// calling thread.
const CONVERT_CHUNK: usize = 1 << 16;

/// A bf16 tensor as a contiguous f32 one of the same values.
fn widened(x: FlexTensor) -> FlexTensor {
    let shape = x.shape();
    let x = x.to_contiguous();
    let values = x.as_slice::<bf16>().expect("contiguous bf16");
    let mut out = vec![0f32; values.len()];
    converted(&mut out, values, |out, values| {
        vectorised(
            #[inline(always)]
            || out.iter_mut().zip(values).for_each(|(o, v)| *o = v.widen()),
        )
    });
    f32_tensor(out, shape)
}

/// A contiguous f32 tensor rounded to the nearest bf16.
fn narrowed(x: FlexTensor) -> FlexTensor {
    let shape = x.shape();
    let values = x.as_slice::<f32>().expect("a product is contiguous");
    let mut out = vec![bf16::ZERO; values.len()];
    converted(&mut out, values, |out, values| {
        out.iter_mut().zip(values).for_each(|(o, &v)| *o = bf16::from_f32(v))
    });
    FlexTensor::new(Bytes::from_elems(out), Layout::contiguous(shape), DType::BF16)
}

/// `convert(out chunk, values chunk)` over chunks of [`CONVERT_CHUNK`] elements, in parallel
/// when there is more than one.
fn converted<I: Sync, O: Send>(out: &mut [O], values: &[I], convert: impl Fn(&mut [O], &[I]) + Sync) {
    if values.len() <= CONVERT_CHUNK {
        return convert(out, values);
    }
    out.par_chunks_mut(CONVERT_CHUNK)
        .zip(values.par_chunks(CONVERT_CHUNK))
        .for_each(|(out, values)| convert(out, values));
}

/// A raw output pointer the pool's tasks share; each writes its own matrix.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);

// SAFETY: the tasks write disjoint matrices of one allocation that outlives them.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

impl<B: ProductOps, C: CheckpointStrategy> ProductOps for Autodiff<B, C> {
    fn product(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Product;

        impl<B: ProductOps> Backward<B, 2> for Product {
            /// Both operands (each one's gradient needs the other).
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_lhs, node_rhs] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (lhs, rhs) = ops.state;
                if let Some(node) = node_lhs {
                    grads.register::<B>(node.id, B::product(grad.clone(), B::float_transpose(rhs)));
                }
                if let Some(node) = node_rhs {
                    grads.register::<B>(node.id, B::product(B::float_transpose(lhs), grad));
                }
            }
        }

        let prepared = Product
            .prepare::<C>([lhs.node(), rhs.node()])
            .compute_bound()
            .stateful();
        let (lhs, rhs) = (lhs.into_primitive(), rhs.into_primitive());
        match prepared {
            OpsKind::Tracked(prep) => {
                let out = B::product(lhs.clone(), rhs.clone());
                prep.finish((lhs, rhs), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::product(lhs, rhs)),
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

    /// Plain, transposed and narrowed (strided) operands, batched and not, small (one thread per
    /// matrix) and large (gemm over the pool), against burn-flex's product.
    #[test]
    fn matches_burns_product_on_strided_operands() {
        let device = Device::flex();
        for (m, k, n) in [(1, 1, 1), (7, 5, 3), (65, 33, 17), (64, 256, 770), (300, 200, 150)] {
            let a = Tensor::<2>::random([m, k], Distribution::Default, &device);
            let b = Tensor::<2>::random([k, n], Distribution::Default, &device);
            let want = a.clone().matmul(b.clone());
            assert!(max_diff(matmul(a.clone(), b.clone()), want.clone()) < 1e-4);
            let (at, bt) = (a.clone().transpose().into_data(), b.clone().transpose().into_data());
            let (at, bt) = (Tensor::<2>::from_data(at, &device), Tensor::<2>::from_data(bt, &device));
            assert!(max_diff(matmul(at.transpose(), bt.transpose()), want) < 1e-4);
        }
        let qkv = Tensor::<4>::random([2, 9, 3 * 4, 8], Distribution::Default, &device);
        let q = qkv.clone().narrow(2, 0, 4).swap_dims(1, 2);
        let k = qkv.narrow(2, 4, 4).swap_dims(1, 2);
        let got = matmul(q.clone(), k.clone().swap_dims(2, 3));
        assert_eq!(got.dims(), [2, 4, 9, 9]);
        assert!(max_diff(got, q.matmul(k.swap_dims(2, 3))) < 1e-5);
        let big = Tensor::<3>::random([2, 200, 100], Distribution::Default, &device);
        let w = Tensor::<3>::random([2, 100, 120], Distribution::Default, &device);
        assert!(max_diff(matmul(big.clone(), w.clone()), big.matmul(w)) < 1e-4);
    }

    /// bf16 operands (plain, transposed, batched, and one large enough to convert in parallel)
    /// give the f32 product of their values, rounded once to bf16.
    #[test]
    fn bf16_products_round_the_f32_product_once() {
        let device = Device::flex();
        let bf16 = burn::tensor::FloatDType::BF16;
        for (batch, m, k, n) in [(1, 3, 5, 7), (2, 65, 33, 17), (1, 64, 256, 1100)] {
            let a = Tensor::<3>::random([batch, m, k], Distribution::Default, &device).cast(bf16);
            let b = Tensor::<3>::random([batch, n, k], Distribution::Default, &device).cast(bf16);
            let got = matmul(a.clone(), b.clone().swap_dims(1, 2));
            assert_eq!(got.dtype(), DType::BF16);
            let exact = a
                .cast(burn::tensor::FloatDType::F32)
                .matmul(b.cast(burn::tensor::FloatDType::F32).swap_dims(1, 2));
            // One rounding to bf16: within half a unit of its last place (2⁻⁸ of the value).
            let error = (got.cast(burn::tensor::FloatDType::F32) - exact.clone()).abs();
            let allowed = exact.abs() / 256.0 + 1e-6;
            assert!(
                error.lower_equal(allowed).all().into_scalar::<bool>(),
                "{batch} × {m} × {k} × {n}"
            );
        }
    }

    /// An empty inner dimension (all zeros) and a broadcast batch (left to Burn).
    #[test]
    fn edge_shapes() {
        let device = Device::flex();
        let a = Tensor::<2>::zeros([3, 0], &device);
        let b = Tensor::<2>::zeros([0, 4], &device);
        let got = matmul(a, b);
        assert_eq!(got.dims(), [3, 4]);
        assert_eq!(got.abs().sum().into_scalar::<f32>(), 0.0);
        let x = Tensor::<3>::random([2, 3, 5], Distribution::Default, &device);
        let w = Tensor::<3>::random([1, 5, 4], Distribution::Default, &device);
        assert!(max_diff(matmul(x.clone(), w.clone()), x.matmul(w)) < 1e-6);
    }

    /// Both gradients against Burn's autodiff product, through a transposed operand.
    #[test]
    fn gradients_match_burns() {
        let device = Device::flex().autodiff();
        let a = Tensor::<3>::random([3, 40, 24], Distribution::Default, &device);
        let b = Tensor::<3>::random([3, 16, 24], Distribution::Default, &device);
        let upstream = Tensor::<3>::random([3, 40, 16], Distribution::Default, &device);
        let (a1, b1) = (a.clone().require_grad(), b.clone().require_grad());
        let (a2, b2) = (a.require_grad(), b.require_grad());
        let ours = matmul(a1.clone(), b1.clone().swap_dims(1, 2));
        let theirs = a2.clone().matmul(b2.clone().swap_dims(1, 2));
        assert!(max_diff(ours.clone().inner(), theirs.clone().inner()) < 1e-5);
        let g1 = (ours * upstream.clone()).sum().backward();
        let g2 = (theirs * upstream).sum().backward();
        assert!(max_diff(a1.grad(&g1).unwrap(), a2.grad(&g2).unwrap()) < 1e-5);
        assert!(max_diff(b1.grad(&g1).unwrap(), b2.grad(&g2).unwrap()) < 1e-5);
    }
}
