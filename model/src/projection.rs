//! Dense projections (`Wqkv`, the attention and MLP outputs, the adapter, the head) for the
//! decoding case of a single row.
//!
//! On the CPU backend a product with one row (`[1, 1, h]`, every decoding step of a lone
//! prompt) takes the `gemm` crate's matrix-vector path, which is 2.4–2.9× slower than its
//! two-row kernel at the widths of small models: at h = 256, `[1,256]·[256,1408]` takes
//! 102 µs and `[2,256]·[256,1408]` 39 µs. Sending the row twice (a zero-copy `expand`) and
//! keeping the first result is therefore faster, and the row's values are the same. Other
//! devices get the plain product.

use burn::nn::Linear;
use burn::prelude::*;

/// `linear(x)` for `x: [B, S, in]`.
pub fn project(linear: &Linear, x: Tensor<3>) -> Tensor<3> {
    as_two_rows(x, |x| linear.forward(x))
}

/// Applies the row-wise `f` to `x: [B, S, in]`, running a single row (B·S = 1) on the CPU
/// backend as two identical rows.
pub fn as_two_rows(x: Tensor<3>, f: impl FnOnce(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
    let [b, s, h] = x.dims();
    if b * s == 1 && x.device() == Device::flex() {
        f(x.expand([1, 2, h])).narrow(1, 0, 1)
    } else {
        f(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::tensor::Distribution;

    #[test]
    fn a_single_row_gets_the_same_values_as_in_a_batch() {
        let device = Device::flex();
        let linear = LinearConfig::new(64, 96).init(&device);
        let rows = Tensor::<3>::random([1, 3, 64], Distribution::Default, &device);
        let batched = project(&linear, rows.clone());
        for i in 0..3 {
            let single = project(&linear, rows.clone().narrow(1, i, 1));
            assert_eq!(single.dims(), [1, 1, 96]);
            let diff = (single - batched.clone().narrow(1, i, 1))
                .abs()
                .max()
                .into_scalar::<f32>();
            assert!(diff < 1e-6, "row {i}: {diff}");
        }
    }
}
