//! Element-wise loops of the fused kernels compiled for the widest SIMD the CPU has, chosen at
//! run time, and the `exp`, `atan` and dot product those loops can vectorise.
//!
//! The binaries are built for baseline x86-64 (they must run on other machines), where the
//! compiler vectorises a loop four lanes wide at most, and calls libm's scalar `expf` for every
//! `exp`: at the training benchmark's shape `expf` alone was about 6% of a step (the gate's
//! sigmoid and the softmax), and libm's `atan2f` was most of the optimizer's update.
//! [`vectorised`] runs a loop in a copy compiled for AVX-512 or AVX2+FMA when the CPU has them,
//! and [`exp`] and [`atan`] are branch-free arithmetic that such a loop keeps in vector
//! registers.

use super::flex::Widen;

/// Runs `body` compiled for AVX-512 or AVX2 with FMA where the CPU has them, as it is
/// elsewhere. The body must be a closure marked `#[inline(always)]`: only code inlined into the
/// functions below is compiled with their features (a closure left out of line is not).
#[inline(always)]
pub fn vectorised<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { with_avx512(body) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { with_avx2(body) };
        }
    }
    body()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn with_avx512<R>(body: impl FnOnce() -> R) -> R {
    body()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn with_avx2<R>(body: impl FnOnce() -> R) -> R {
    body()
}

/// `a · b` in sixteen lanes (a sum the compiler vectorises, in a fixed order), then the tail;
/// `b` widened from its element type.
#[inline(always)]
pub(crate) fn dot<E: Widen>(a: &[f32], b: &[E]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y.widen())
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l].widen();
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `eˣ` to within 2 ulp for `x` in [−87.3, 88.3] (Cephes' `expf`: `x = n·ln 2 + r`, a degree-6
/// polynomial for `eʳ`, `2ⁿ` from the exponent bits). Beyond that range the input is clamped:
/// the result saturates at about 1.2·10⁻³⁸ and 2.4·10³⁸ instead of reaching 0 and ∞, which
/// the softmax (arguments ≤ 0, divided by a sum ≥ 1) and the sigmoid (`1 / (1 + e⁻ᵍ)`) turn into
/// the same f32 results up to those magnitudes. NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: `n · LN2_HI` is exact for the `n` that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer in f32 arithmetic (no
    // rounding instruction needed, so the baseline build vectorises it too).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    // The same integer, read from the mantissa of `shifted` (an `as` cast saturates and maps
    // NaN to 0, which keeps the loop scalar).
    let n_bits = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // `n` is an integer in [−126, 127]: `2ⁿ` is its biased exponent shifted into place.
    // (Wrapping arithmetic: an overflow check, as debug builds add, keeps the loop scalar.)
    e_r * f32::from_bits((n_bits.wrapping_add(127) as u32) << 23)
}

/// `atan(z)` to within 3 ulp (Cephes' `atanf`: reduced to |z| ≤ tan(π/8) through
/// `atan(z) = π/4 + atan((z − 1)/(z + 1))` or `π/2 − atan(1/z)`, then an odd degree-9
/// polynomial), with selects instead of branches. `atan2(y, x)` for `x > 0` is `atan(y / x)`.
#[inline(always)]
pub fn atan(z: f32) -> f32 {
    use std::f32::consts::{FRAC_PI_2, FRAC_PI_4};
    const TAN_3PI_8: f32 = 2.414_213_5;
    const TAN_PI_8: f32 = 0.414_213_57;
    let a = z.abs();
    let (base, x) = if a > TAN_3PI_8 {
        (FRAC_PI_2, -1.0 / a)
    } else if a > TAN_PI_8 {
        (FRAC_PI_4, (a - 1.0) / (a + 1.0))
    } else {
        (0.0, a)
    };
    let x2 = x * x;
    let p = (((8.053_744_5e-2 * x2 - 0.138_776_86) * x2 + 0.199_777_11) * x2 - 0.333_329_5) * x2 * x + x;
    (base + p).copysign(z)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against libm over the range the kernels use, in ulp, and at the clamps.
    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0u32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(got.to_bits().abs_diff(want.to_bits()));
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1.3e-38 && exp(-1000.0) > 0.0);
        assert!(exp(1000.0) > 2.0e38 && exp(1000.0).is_finite());
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(
            vectorised(
                #[inline(always)]
                || exp(1.0)
            ),
            exp(1.0)
        );
    }

    /// Against libm across magnitudes (both signs, each reduction), in ulp, and the limits.
    #[test]
    fn atan_is_within_three_ulp_of_libm() {
        let mut worst = 0u32;
        for i in 0..=200_000 {
            let z = 10f32.powf(-6.0 + 12.0 * i as f32 / 200_000.0);
            for z in [z, -z] {
                worst = worst.max(atan(z).to_bits().abs_diff(z.atan().to_bits()));
            }
        }
        assert!(worst <= 3, "{worst} ulp");
        assert_eq!(atan(0.0), 0.0);
        assert_eq!(atan(f32::INFINITY), std::f32::consts::FRAC_PI_2);
        assert_eq!(atan(f32::NEG_INFINITY), -std::f32::consts::FRAC_PI_2);
        assert!(atan(f32::NAN).is_nan());
    }
}
