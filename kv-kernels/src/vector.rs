//! Element-wise functions over f32 slices, in vector registers where the CPU has them: the
//! `exp` of a softmax row and the gated products of a Llama MLP (SiLU) and a Gemma one
//! (GELU, tanh form). A CPU tensor backend
//! calls the C library's scalar `expf` once per value; these take eight values per step with
//! a polynomial (Cody and Waite's reduction, Cephes' coefficients), written with intrinsics
//! because the compiler leaves the scalar loop scalar.

use crate::Isa;

/// Replaces each `x` of `row` by `exp(x - max)` and returns their sum. `max` must be at least
/// every value of `row`, so every result lies in `[0, 1]`.
pub fn exp_shifted(isa: Isa, row: &mut [f32], max: f32) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if Isa::Avx2.is_available() => {
            // SAFETY: avx2 and fma were detected on this CPU.
            unsafe { x86::exp_shifted_avx2(row, max) }
        }
        _ => row.iter_mut().fold(0.0, |sum, x| {
            *x = exp(*x - max);
            sum + *x
        }),
    }
}

/// `eˣ` for `x <= 0` (a softmax's shifted scores), within 2 ulp of `f32::exp` down to
/// `x = -87` and `0` below (where the true value is under `f32`'s normal range anyway).
///
/// Cody and Waite's reduction: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, `n` an integer, so
/// `eˣ = 2ⁿ eʳ`; `eʳ` from a degree-6 polynomial (Cephes' `expf` coefficients, a minimax fit
/// on that interval) and `2ⁿ` written straight into the exponent bits.
///
/// ```
/// use kv_kernels::vector::exp;
///
/// for x in [-80.0f32, -10.5, -1.0, -1e-3, 0.0] {
///     assert!((exp(x) - x.exp()).abs() <= 2.0 * f32::EPSILON * x.exp());
/// }
/// assert_eq!(exp(-200.0), 0.0);
/// ```
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let under = x < EXP_LOWEST;
    let x = x.max(EXP_LOWEST);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = EXP_POLY.iter().fold(0.0, |p, &c| p * r + c);
    let e_r = 1.0 + r + r * r * p;
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if under {
        0.0
    } else {
        e_r * two_n
    }
}

/// ln 2 in two parts, the first with few enough bits that `n * LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// The polynomial's coefficients, highest degree first: `eʳ ≈ 1 + r + r² p(r)`.
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];
/// Below this, 2ⁿ would leave the normal range; the result is flushed to zero instead.
const EXP_LOWEST: f32 = -87.0;

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! [`super::exp_shifted`] and [`super::silu_mul`] eight values at a time: [`super::exp`]'s
    //! steps on AVX2 vectors (the multiply-adds fused, so results may differ from the scalar
    //! reference in the last bit).

    use std::arch::x86_64::*;

    use super::{exp, Gate, EXP_LOWEST, EXP_POLY, GELU_CUBIC, GELU_SCALE, LN2_HI, LN2_LO};

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted_avx2(row: &mut [f32], max: f32) -> f32 {
        let shift = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        let mut chunks = row.chunks_exact_mut(8);
        for chunk in &mut chunks {
            // SAFETY: the chunk holds eight f32s; unaligned loads and stores are allowed.
            let x = _mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), shift);
            let e = exp8(x);
            _mm256_storeu_ps(chunk.as_mut_ptr(), e);
            sum = _mm256_add_ps(sum, e);
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds eight f32s.
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        let mut total: f32 = lanes.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp(*x - max);
            total += *x;
        }
        total
    }

    /// `out = g * sigmoid(s(g)) * up` for `gate`'s `g`, `s` the gate's argument
    /// ([`super::Gate::argument`]).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; the three slices have one length (checked by the
    /// caller).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gated_avx2(kind: Gate, gate: &[f32], up: &[f32], out: &mut [f32]) {
        let one = _mm256_set1_ps(1.0);
        let sign = _mm256_set1_ps(-0.0);
        let (cubic, scale) = (_mm256_set1_ps(GELU_CUBIC), _mm256_set1_ps(GELU_SCALE));
        let whole = gate.len() / 8 * 8;
        for i in (0..whole).step_by(8) {
            // SAFETY: `i + 8 <= whole <= len` for all three slices.
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            let s = match kind {
                Gate::Silu => g,
                // 2 sqrt(2/pi) (g + 0.044715 g³) = g (scale + scale * cubic * g²)
                Gate::GeluTanh => _mm256_mul_ps(
                    _mm256_mul_ps(g, scale),
                    _mm256_fmadd_ps(_mm256_mul_ps(g, g), cubic, one),
                ),
            };
            // t = e^-|s| <= 1, so nothing overflows: sigmoid(s) is 1 / (1 + t) for s >= 0
            // and t / (1 + t) below.
            let t = exp8(_mm256_or_ps(s, sign));
            let negative = _mm256_cmp_ps::<_CMP_LT_OQ>(s, _mm256_setzero_ps());
            let numerator = _mm256_blendv_ps(one, t, negative);
            let sigmoid = _mm256_div_ps(numerator, _mm256_add_ps(one, t));
            let o = _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), u);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), o);
        }
        for ((o, g), u) in out[whole..]
            .iter_mut()
            .zip(&gate[whole..])
            .zip(&up[whole..])
        {
            *o = kind.reference(*g) * u;
        }
    }

    /// `eˣ` of eight values `x <= 0` (see [`super::exp`]).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let lowest = _mm256_set1_ps(EXP_LOWEST);
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lowest);
        let x = _mm256_max_ps(x, lowest);
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let p = EXP_POLY.iter().fold(_mm256_setzero_ps(), |p, &c| {
            _mm256_fmadd_ps(p, r, _mm256_set1_ps(c))
        });
        let e_r = _mm256_fmadd_ps(
            _mm256_mul_ps(r, r),
            p,
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
        let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(exponent));
        _mm256_andnot_ps(under, _mm256_mul_ps(e_r, two_n))
    }
}

/// The activation of a gated MLP's gate, written as `g * sigmoid(s(g))`: SiLU is `s(g) = g`,
/// and GELU's tanh form `0.5 g (1 + tanh(u))` with `u = sqrt(2/pi) (g + 0.044715 g³)` is
/// `g * sigmoid(2u)`, so both share one vector kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// `g / (1 + e⁻ᵍ)` (Llama's SwiGLU).
    Silu,
    /// `0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g³)))` (Gemma's GeGLU, `gelu_pytorch_tanh`).
    GeluTanh,
}

/// `2 sqrt(2/pi)`, and the cubic term's 0.044715: `s(g) = GELU_SCALE g (1 + GELU_CUBIC g²)`.
const GELU_SCALE: f32 = 2.0 * 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

impl Gate {
    /// The activation of one value, with the C library's `exp` and `tanh`: the reference the
    /// vector kernels are checked against.
    pub fn reference(self, g: f32) -> f32 {
        match self {
            Gate::Silu => g / (1.0 + (-g).exp()),
            Gate::GeluTanh => {
                let inner = (g + GELU_CUBIC * g * g * g) * (2.0 / std::f32::consts::PI).sqrt();
                0.5 * g * (1.0 + inner.tanh())
            }
        }
    }
}

/// `out[i] = act(gate[i]) * up[i]`: the gated product of an MLP whose gate goes through
/// `kind`. The scalar level is the reference ([`Gate::reference`]); the vector one stays
/// within a few ulp of it.
///
/// ```
/// use kv_kernels::{vector::{gated, Gate}, Isa};
///
/// let (gate, up) = ([-2.0, 0.0, 3.0], [1.0, 5.0, 2.0]);
/// let mut out = [0.0; 3];
/// gated(Isa::best(), Gate::GeluTanh, &gate, &up, &mut out);
/// for i in 0..3 {
///     assert!((out[i] - Gate::GeluTanh.reference(gate[i]) * up[i]).abs() < 1e-6);
/// }
/// ```
///
/// # Panics
/// If the three slices differ in length.
pub fn gated(isa: Isa, kind: Gate, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(
        gate.len() == up.len() && up.len() == out.len(),
        "gate, up and out of {}, {} and {} values",
        gate.len(),
        up.len(),
        out.len()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if Isa::Avx2.is_available() => {
            // SAFETY: avx2 and fma were detected on this CPU.
            unsafe { x86::gated_avx2(kind, gate, up, out) }
        }
        _ => {
            for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
                *o = kind.reference(*g) * u;
            }
        }
    }
}

/// `out[i] = silu(gate[i]) * up[i]`, with `silu(g) = g / (1 + e⁻ᵍ)`: [`gated`] with
/// [`Gate::Silu`], the gated product of a Llama MLP.
///
/// ```
/// use kv_kernels::{vector::silu_mul, Isa};
///
/// let (gate, up) = ([-2.0, 0.0, 3.0], [1.0, 5.0, 2.0]);
/// let mut out = [0.0; 3];
/// silu_mul(Isa::best(), &gate, &up, &mut out);
/// let silu = |g: f32| g / (1.0 + (-g).exp());
/// for i in 0..3 {
///     assert!((out[i] - silu(gate[i]) * up[i]).abs() < 1e-6);
/// }
/// ```
///
/// # Panics
/// If the three slices differ in length.
pub fn silu_mul(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    gated(isa, Gate::Silu, gate, up, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_std_at_every_level() {
        for isa in Isa::available() {
            let mut x: Vec<f32> = (0..20_000).map(|i| -(i as f32) * 87.0 / 20_000.0).collect();
            let expected: Vec<f32> = x.iter().map(|x| x.exp()).collect();
            let sum = exp_shifted(isa, &mut x, 0.0);
            for (got, want) in x.iter().zip(&expected) {
                assert!(
                    (got - want).abs() <= 2.0 * f32::EPSILON * want,
                    "{isa}: {got} against {want}"
                );
            }
            let want: f64 = expected.iter().map(|&e| e as f64).sum();
            assert!(
                ((sum as f64 - want) / want).abs() < 1e-5,
                "{isa}: sum {sum}"
            );
        }
        assert_eq!(exp(-87.5), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn gelu_tanh_gate_is_the_reference_at_every_level() {
        let gate: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) * 0.01).collect();
        let up: Vec<f32> = gate.iter().map(|g| 1.5 - g.sin()).collect();
        // The exact values, in f64.
        let want: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| {
                let g = g as f64;
                let inner = (g + 0.044_715 * g * g * g) * (2.0 / std::f64::consts::PI).sqrt();
                0.5 * g * (1.0 + inner.tanh()) * u as f64
            })
            .collect();
        for isa in Isa::available() {
            let mut got = vec![0.0; gate.len()];
            gated(isa, Gate::GeluTanh, &gate, &up, &mut got);
            for ((g, w), x) in got.iter().zip(&want).zip(&gate) {
                // Within 8 ulp, or 1e-6 where the result nears zero (for g < -3 the scalar
                // reference's `1 + tanh(u)` keeps few bits; the sigmoid form keeps them all).
                let tolerance = (8.0 * f32::EPSILON as f64 * w.abs()).max(1e-6);
                assert!(
                    (*g as f64 - w).abs() <= tolerance,
                    "{isa}: gelu at {x}: {g} against {w}"
                );
            }
        }
    }

    #[test]
    fn silu_mul_is_the_reference_at_every_level() {
        let gate: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) * 0.05).collect();
        let up: Vec<f32> = gate.iter().map(|g| 1.5 - g.sin()).collect();
        let mut want = vec![0.0; gate.len()];
        silu_mul(Isa::Scalar, &gate, &up, &mut want);
        for isa in Isa::available() {
            let mut got = vec![0.0; gate.len()];
            silu_mul(isa, &gate, &up, &mut got);
            for ((g, w), x) in got.iter().zip(&want).zip(&gate) {
                assert!(
                    (g - w).abs() <= 4.0 * f32::EPSILON * w.abs() + 1e-30,
                    "{isa}: silu_mul at {x}: {g} against {w}"
                );
            }
        }
    }
}
