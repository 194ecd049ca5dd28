//! The block formats: ggml's weight blocks exactly as GGUF files store them, and the 8-bit
//! activation blocks a row is quantized to before it meets them.
//!
//! A weight block keeps its scales (and minimums) in half precision, as the file does, so a
//! loaded matrix is the file's bytes, not a widened copy. There are two families:
//!
//! - [`legacy`]: ggml's first formats, blocks of [`BLOCK`] = 32 values with one scale
//!   (Q4_0, Q5_0, Q8_0) or a scale and a minimum (Q4_1, Q5_1);
//! - [`k_quants`]: super-blocks of [`QK_K`] = 256 values cut into sub-blocks with their own
//!   6- or 8-bit scales (Q4_K, Q5_K, Q6_K), what llama.cpp's `Q4_K_M`-style presets write.
//!
//! Activations meet every weight format as [`BlockQ8`]: 32 values in signed bytes with an
//! `f32` scale and sum. Those are made fresh for each product and never stored, so they keep
//! their scale and sum in `f32` (llama.cpp's `block_q8_1` rounds both to `f16`): the only
//! rounding an activation takes is to 8 bits. A k-quant sub-block of 32 values meets one
//! activation block; a Q6_K pair of 16-value sub-blocks meets one activation block too, so a
//! single activation format serves every kernel (llama.cpp pairs the k-quants with a
//! 256-value `block_q8_K` instead).

use crate::isa::Isa;
use bytemuck::{Pod, Zeroable};

pub mod k_quants;
pub mod legacy;

pub use k_quants::{BlockQ4K, BlockQ5K, BlockQ6K, QK_K};
pub use legacy::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0};

/// Values per activation block, and per block of the legacy formats.
pub const BLOCK: usize = 32;

/// A ggml weight block: [`WeightBlock::VALUES`] consecutive values of one row, laid out
/// byte for byte as ggml defines it, with ggml's dequantization and a reference quantizer.
///
/// `dot` is the scalar reference of the format's product with activations: it computes
/// exactly what the vector kernels compute (the same integer dots, the same scale products),
/// so every instruction level agrees with it up to the order of float sums.
pub trait WeightBlock: Pod + std::fmt::Debug + PartialEq + Send + Sync {
    /// Values per block.
    const VALUES: usize;

    /// Quantizes `values` (`VALUES` long).
    fn quantize(values: &[f32]) -> Self;

    /// The values this block stands for, into `out` (`VALUES` long).
    fn dequantize(&self, out: &mut [f32]);

    /// `Σ w x` over the block and its `VALUES / 32` activation blocks.
    fn dot(&self, x: &[BlockQ8]) -> f32;

    /// `out[r] = Σ_b w x` over row `r`'s blocks (rows end to end in `w`) and the activation
    /// row `x`, on the given instruction level. The default is the scalar reference.
    fn rows(isa: Isa, w: &[Self], x: &[BlockQ8], out: &mut [f32]) {
        let _ = isa;
        rows_scalar(w, x, out);
    }

    /// [`WeightBlock::rows`] for `n` activation rows (end to end in `x`), output `(i, r)` at
    /// `out[i * stride + r]`, each equal bit for bit to what [`WeightBlock::rows`] gives
    /// activation row `i` alone (a speculative pass must score its first position exactly as
    /// a one-token step does). The default runs [`WeightBlock::rows`] once per activation row;
    /// the k-quants unpack each block once for several.
    fn rows_batch(isa: Isa, w: &[Self], x: &[BlockQ8], n: usize, out: &mut [f32], stride: usize) {
        let x_row = x.len() / n.max(1);
        let rows = w.len() * Self::VALUES / BLOCK / x_row.max(1);
        for i in 0..n {
            Self::rows(
                isa,
                w,
                &x[i * x_row..(i + 1) * x_row],
                &mut out[i * stride..i * stride + rows],
            );
        }
    }

    /// Every value of `blocks`, into `out` (`VALUES` per block), on the given instruction
    /// level: how a prompt's product widens rows for `gemm`. The default is
    /// [`WeightBlock::dequantize`] block by block.
    fn widen(isa: Isa, blocks: &[Self], out: &mut [f32]) {
        let _ = isa;
        for (block, chunk) in blocks.iter().zip(out.chunks_exact_mut(Self::VALUES)) {
            block.dequantize(chunk);
        }
    }
}

/// Blocks read from a file's bytes (copied into a vector of the block's alignment, so a
/// tensor at any offset of a file can be read), and their values appended to `out`.
///
/// # Panics
/// If `bytes` is not whole blocks.
pub fn dequantize_bytes<B: WeightBlock>(bytes: &[u8], out: &mut Vec<f32>) {
    let blocks: Vec<B> = bytemuck::pod_collect_to_vec(bytes);
    let start = out.len();
    out.resize(start + blocks.len() * B::VALUES, 0.0);
    for (block, chunk) in blocks.iter().zip(out[start..].chunks_exact_mut(B::VALUES)) {
        block.dequantize(chunk);
    }
}

/// [`WeightBlock::rows`] in plain Rust.
pub(crate) fn rows_scalar<B: WeightBlock>(w: &[B], x: &[BlockQ8], out: &mut [f32]) {
    let per = B::VALUES / BLOCK;
    let blocks = x.len() / per;
    for (row, o) in w.chunks_exact(blocks.max(1)).zip(out.iter_mut()) {
        *o = row
            .iter()
            .zip(x.chunks_exact(per))
            .map(|(wb, xs)| wb.dot(xs))
            .sum();
    }
}

/// 32 activations as signed bytes times a scale, with the block's sum: the partner of both
/// weight formats (`x = d * q`; `s = d * Σq`, which a Q4_1 product needs for its minimum).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ8 {
    /// The scale: the block's largest magnitude over 127.
    pub d: f32,
    /// `d` times the sum of `qs`.
    pub s: f32,
    /// 32 values in `-127..=127`.
    pub qs: [i8; BLOCK],
}

impl BlockQ8 {
    /// 32 activations to bytes: the largest magnitude maps to 127 and each value rounds to
    /// the nearest step, ties to even (the rounding vector instructions do, so the x86 path
    /// of [`quantize_row`] gives these bytes exactly), with the scale kept in `f32`.
    pub fn quantize(values: &[f32; BLOCK]) -> Self {
        let amax = values.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let qs = values.map(|x| (x * id).round_ties_even() as i8);
        let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
        Self {
            d,
            s: d * sum as f32,
            qs,
        }
    }
}

/// Quantizes a row whose length is a multiple of [`BLOCK`] into activation blocks
/// ([`BlockQ8::quantize`] on each, with vector instructions where the CPU has them).
///
/// # Panics
/// If `row.len()` is not a multiple of [`BLOCK`] (matrices check their widths when built).
pub fn quantize_row(row: &[f32], out: &mut Vec<BlockQ8>) {
    quantize_row_with(Isa::best(), row, out);
}

/// [`quantize_row`] on a given instruction set (tests compare each with [`Isa::Scalar`]).
///
/// # Panics
/// As [`quantize_row`].
pub fn quantize_row_with(isa: Isa, row: &[f32], out: &mut Vec<BlockQ8>) {
    assert!(
        row.len().is_multiple_of(BLOCK),
        "row of {} values",
        row.len()
    );
    out.clear();
    let blocks = row
        .chunks_exact(BLOCK)
        .map(|chunk| chunk.try_into().expect("chunks of BLOCK"));
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if isa.is_available() => {
            // SAFETY: avx2 (which both levels include) was detected on this CPU.
            out.extend(blocks.map(|b| unsafe { x86::quantize_avx2(b) }));
        }
        _ => out.extend(blocks.map(BlockQ8::quantize)),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! [`BlockQ8::quantize`] in AVX2: the same operations on eight values at a time. A
    //! prompt quantizes every activation row of every product (about a tenth of a prompt's
    //! time in scalar code, most of it in `roundf`).

    use std::arch::x86_64::*;

    use super::{BlockQ8, BLOCK};

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_avx2(values: &[f32; BLOCK]) -> BlockQ8 {
        // SAFETY: `values` is 32 floats; each load reads 8 of them at offsets 0, 8, 16, 24.
        let v: [__m256; 4] =
            std::array::from_fn(|i| unsafe { _mm256_loadu_ps(values.as_ptr().add(8 * i)) });
        let sign = _mm256_set1_ps(-0.0);
        let abs = |x| _mm256_andnot_ps(sign, x);
        let m = _mm256_max_ps(
            _mm256_max_ps(abs(v[0]), abs(v[1])),
            _mm256_max_ps(abs(v[2]), abs(v[3])),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let q: [__m256i; 4] = std::array::from_fn(|i| {
            let scaled = _mm256_mul_ps(v[i], id);
            let rounded =
                _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(scaled);
            _mm256_cvtps_epi32(rounded)
        });
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let sum = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256(sum, 1),
        );
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b10_11_00_01)));
        // Packing narrows within 128-bit halves; the permute puts the 4-byte runs back in
        // value order.
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let mut qs = [0i8; BLOCK];
        // SAFETY: `qs` is 32 bytes, what the unaligned store writes.
        unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), bytes) };
        BlockQ8 {
            d,
            s: d * sum as f32,
            qs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_ggml() {
        assert_eq!(std::mem::size_of::<BlockQ4_1>(), 20);
        assert_eq!(std::mem::size_of::<BlockQ8_0>(), 34);
    }

    #[test]
    fn q4_1_round_trip_is_within_half_a_step() {
        let values: [f32; BLOCK] = std::array::from_fn(|i| (i as f32 * 0.37).sin() * 3.0);
        let block = BlockQ4_1::quantize(&values);
        let mut back = [0.0; BLOCK];
        block.dequantize(&mut back);
        let step = block.d.to_f32();
        for (a, b) in values.iter().zip(&back) {
            // Half a step, plus the f16 rounding of the minimum and step.
            assert!(
                (a - b).abs() <= 0.5 * step + 0.01,
                "{a} vs {b}, step {step}"
            );
        }
    }

    #[test]
    fn q8_sum_matches_its_values() {
        let values: [f32; BLOCK] = std::array::from_fn(|i| i as f32 - 10.0);
        let block = BlockQ8::quantize(&values);
        let sum: f32 = block.qs.iter().map(|&q| block.d * f32::from(q)).sum();
        assert!((block.s - sum).abs() < 1e-3);
        assert_eq!(block.qs[31], 127);
    }

    #[test]
    fn zero_block_quantizes_to_zero() {
        let zeros = [0.0; BLOCK];
        assert_eq!(BlockQ8::quantize(&zeros).qs, [0; BLOCK]);
        let mut back = [1.0; BLOCK];
        BlockQ4_1::quantize(&zeros).dequantize(&mut back);
        assert_eq!(back, [0.0; BLOCK]);
    }
}
