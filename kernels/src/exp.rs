//! `eˣ` for float32 in a form the compiler vectorizes: libm's `expf` is a call per
//! element, which no loop around it can widen.
//!
//! `eˣ = 2ⁿ · eʳ` with `n = round(x / ln 2)` and `r = x − n·ln 2` (in two parts, so that
//! `r` is exact), `|r| ≤ ln 2 / 2`; `eʳ` is a degree-6 polynomial (Taylor's, whose
//! truncation error there is below 2⁻²⁴), and `2ⁿ` is built in the exponent bits.
//! Results below the smallest normal float32 are 0 (so a masked score's `e^−∞` is
//! exactly 0), above the largest finite one +∞.

/// `eˣ`, within 3 ulp of the exact value (the tests measure it against `f64::exp`).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HI is exact for |n| < 2¹⁰.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // e^−87.34 is the smallest normal float32, e^88.72 the largest finite one.
    const SMALLEST: f32 = -87.336_55;
    const LARGEST: f32 = 88.722_83;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer (ties to even) in
    // plain float arithmetic, which vectorizes where `f32::round` is a call.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.5, 88.8);
    let n = (clamped * LOG2_E + ROUND) - ROUND;
    let r = (clamped - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2ⁿ in two factors, each a normal float32 for every n the clamp allows.
    let n = n as i32;
    let half = n >> 1;
    let value = p * pow2(half) * pow2(n - half);
    if x < SMALLEST {
        0.0
    } else if x > LARGEST {
        f32::INFINITY
    } else {
        value
    }
}

/// `2ᵏ` for `−126 ≤ k ≤ 127`.
#[inline(always)]
fn pow2(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::exp;

    /// ulp distance between `a` and the float32 nearest `exact`.
    fn ulps(a: f32, exact: f64) -> u32 {
        let b = exact as f32;
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_three_ulp_over_the_float32_range() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.0 {
            worst = worst.max(ulps(exp(x), f64::from(x).exp()));
            x += 0.001_37;
        }
        assert!(worst <= 3, "worst {worst} ulp");
    }

    #[test]
    fn exp_of_minus_infinity_is_zero_and_of_large_inputs_infinite() {
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(100.0).is_infinite());
    }
}
