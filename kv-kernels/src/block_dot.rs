//! Row-by-row products for the formats a matrix keeps row-major (Q4_K, Q5_K, Q6_K), and for
//! the rows of Q4_0, Q5_0 and Q5_1 matrices outside whole groups of eight (which
//! [`crate::packed`] interleaves): each weight row's blocks against one row of 8-bit
//! activation blocks.
//!
//! Every kernel has the same shape as llama.cpp's `ggml_vec_dot_*` (written here from the
//! format definitions in [`crate::blocks`]): unpack a block's levels to bytes, multiply-add
//! them with the activation bytes into 32-bit integer sums, scale those by the weight and
//! activation scales into eight float lanes, and sum the lanes once per row. Levels centred
//! on zero (Q4_0, Q5_0, Q6_K) are made signed and meet the unsigned-by-signed byte
//! instructions with their signs moved onto the activations; levels above a minimum (Q5_1,
//! Q4_K, Q5_K) stay unsigned, and the minimum's share comes from the activation block's sum.
//! The integer sums are exact, so every level equals the scalar reference
//! ([`crate::blocks::WeightBlock::dot`]) up to the order of its float additions.
//!
//! Why row-major and not eight rows interleaved as Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 are:
//! a k-quant block carries 256 values per scale load, so the per-row bookkeeping that
//! interleaving saves is an eighth of what it is for 32-value blocks, and a prompt's products
//! over these formats go through `gemm` on rows widened in cache, not through these kernels.

use crate::blocks::{
    rows_scalar, BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8,
    WeightBlock, BLOCK,
};
use crate::isa::Isa;

/// Checks that `w` holds `out.len()` rows of the blocks `x` covers.
fn check<B: WeightBlock>(w: &[B], x: &[BlockQ8], out: &[f32]) {
    let per_row = x.len() * BLOCK / B::VALUES;
    assert_eq!(
        x.len() * BLOCK % B::VALUES,
        0,
        "activation blocks cover whole weight blocks"
    );
    assert_eq!(
        w.len(),
        per_row * out.len(),
        "weight rows against activation blocks"
    );
}

/// One public entry per format: the checks, then the level's kernel.
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident, $block:ty, $avx2:ident, $vnni:ident) => {
        $(#[$doc])*
        pub(crate) fn $name(isa: Isa, w: &[$block], x: &[BlockQ8], out: &mut [f32]) {
            check(w, x, out);
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 if isa.is_available() => {
                    // SAFETY: the level's instructions (avx2, fma, f16c) were detected on
                    // this CPU.
                    unsafe { x86::$avx2(w, x, out) }
                }
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Vnni if isa.is_available() => {
                    // SAFETY: the level's instructions (avx512vnni, avx512vl, avx2, fma,
                    // f16c) were detected on this CPU.
                    unsafe { x86::$vnni(w, x, out) }
                }
                _ => rows_scalar(w, x, out),
            }
        }
    };
}

dispatch!(
    /// Q4_0 rows: `Σ d·dx·Σ (q − 8) q_x`.
    q4_0_rows, BlockQ4_0, q4_0_avx2, q4_0_vnni
);
dispatch!(
    /// Q5_0 rows: `Σ d·dx·Σ (q − 16) q_x`.
    q5_0_rows, BlockQ5_0, q5_0_avx2, q5_0_vnni
);
dispatch!(
    /// Q5_1 rows: `Σ d·dx·Σ q q_x + m·s_x`.
    q5_1_rows, BlockQ5_1, q5_1_avx2, q5_1_vnni
);
dispatch!(
    /// Q4_K rows: `Σ_j d·sc_j·dx·Σ q q_x − dmin·m_j·s_x` over each 32-value sub-block.
    q4_k_rows, BlockQ4K, q4_k_avx2, q4_k_vnni
);
dispatch!(
    /// Q5_K rows, as Q4_K with five-bit levels.
    q5_k_rows, BlockQ5K, q5_k_avx2, q5_k_vnni
);
dispatch!(
    /// Q6_K rows: `Σ_i d·dx·sc_i·Σ (q − 32) q_x` over each 16-value sub-block.
    q6_k_rows, BlockQ6K, q6_k_avx2, q6_k_vnni
);

/// [`rows_batch_scalar`]'s layout through a format's batch kernels: `n` activation rows
/// (end to end in `x`) against the rows of `w`, output `(i, r)` at `out[i * stride + r]`, each
/// equal bit for bit to the one-row kernel's output for activation row `i` at the same level.
macro_rules! dispatch_batch {
    ($(#[$doc:meta])* $name:ident, $block:ty, $rows:ident, $avx2:ident, $vnni:ident) => {
        $(#[$doc])*
        pub(crate) fn $name(
            isa: Isa,
            w: &[$block],
            x: &[BlockQ8],
            n: usize,
            out: &mut [f32],
            stride: usize,
        ) {
            let rows = check_batch(w, x, n, out, stride);
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 if isa.is_available() => {
                    // SAFETY: the level's instructions (avx2, fma, f16c) were detected on
                    // this CPU.
                    unsafe { x86::$avx2(w, x, n, out, stride) }
                }
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Vnni if isa.is_available() => {
                    // SAFETY: the level's instructions (avx512vnni, avx512vl, avx2, fma,
                    // f16c) were detected on this CPU.
                    unsafe { x86::$vnni(w, x, n, out, stride) }
                }
                _ => rows_batch_scalar(isa, w, x, n, out, stride, rows, $rows),
            }
        }
    };
}

/// Checks a batch product's shapes; returns the weight rows.
fn check_batch<B: WeightBlock>(
    w: &[B],
    x: &[BlockQ8],
    n: usize,
    out: &[f32],
    stride: usize,
) -> usize {
    assert!(n > 0 && x.len().is_multiple_of(n), "{n} activation rows");
    let per_row = x.len() / n * BLOCK / B::VALUES;
    let rows = w.len() / per_row.max(1);
    assert_eq!(w.len(), rows * per_row, "whole weight rows");
    assert!(rows <= stride, "rows fit the stride");
    assert!(out.len() >= (n - 1) * stride + rows, "outputs inside out");
    rows
}

/// A batch product as `n` one-row products.
#[allow(clippy::too_many_arguments)]
fn rows_batch_scalar<B: WeightBlock>(
    isa: Isa,
    w: &[B],
    x: &[BlockQ8],
    n: usize,
    out: &mut [f32],
    stride: usize,
    rows: usize,
    one_row: fn(Isa, &[B], &[BlockQ8], &mut [f32]),
) {
    let x_row = x.len() / n;
    for i in 0..n {
        one_row(
            isa,
            w,
            &x[i * x_row..(i + 1) * x_row],
            &mut out[i * stride..i * stride + rows],
        );
    }
}

dispatch_batch!(
    /// Q4_K rows against several activation rows.
    q4_k_rows_batch, BlockQ4K, q4_k_rows, q4_k_batch_avx2, q4_k_batch_vnni
);
dispatch_batch!(
    /// Q5_K rows against several activation rows.
    q5_k_rows_batch, BlockQ5K, q5_k_rows, q5_k_batch_avx2, q5_k_batch_vnni
);
dispatch_batch!(
    /// Q6_K rows against several activation rows.
    q6_k_rows_batch, BlockQ6K, q6_k_rows, q6_k_batch_avx2, q6_k_batch_vnni
);

/// One widening entry per k-quant: values out as f32 for a prompt's `gemm`, vectorized (the
/// scalar [`WeightBlock::dequantize`] cost a prompt of 30 tokens as much as its products).
macro_rules! widen {
    ($(#[$doc:meta])* $name:ident, $block:ty, $avx2:ident) => {
        $(#[$doc])*
        pub(crate) fn $name(isa: Isa, blocks: &[$block], out: &mut [f32]) {
            assert_eq!(out.len(), blocks.len() * <$block>::VALUES, "values of the blocks");
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 | Isa::Avx512Vnni if Isa::Avx2.is_available() => {
                    // SAFETY: avx2, fma and f16c were detected on this CPU.
                    unsafe { x86::$avx2(blocks, out) }
                }
                _ => {
                    for (block, chunk) in blocks.iter().zip(out.chunks_exact_mut(<$block>::VALUES)) {
                        block.dequantize(chunk);
                    }
                }
            }
        }
    };
}

widen!(
    /// Q4_K blocks to f32.
    q4_k_widen, BlockQ4K, q4_k_widen_avx2
);
widen!(
    /// Q5_K blocks to f32.
    q5_k_widen, BlockQ5K, q5_k_widen_avx2
);
widen!(
    /// Q6_K blocks to f32.
    q6_k_widen, BlockQ6K, q6_k_widen_avx2
);

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The x86 kernels, each an `unsafe fn` only because it is compiled for instructions the
    //! caller must have detected; memory is read through bounds-checked slices.

    use std::arch::x86_64::*;

    use crate::blocks::k_quants::scale_mins;
    use crate::blocks::{
        BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8, BLOCK,
    };
    use crate::dot::x86::{
        bit_bytes, bytes, dot_u8_i8_avx2, hsum, prefetch, scale, sign_folded, PREFETCH_ROWS,
    };

    /// 32 bytes of a block's field.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load32(b: &[u8]) -> __m256i {
        let b: &[u8; 32] = b.try_into().expect("32 bytes");
        // SAFETY: `b` is 32 bytes, what the unaligned load reads.
        unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
    }

    /// A 4-bit block's 32 levels as bytes in value order (low nibbles, then high).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn nibbles(qs: &[u8; 16]) -> __m256i {
        // SAFETY: `qs` is 16 bytes, what the unaligned load reads.
        let packed = unsafe { _mm_loadu_si128(qs.as_ptr().cast()) };
        let mask = _mm_set1_epi8(0x0F);
        let low = _mm_and_si128(packed, mask);
        let high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
        _mm256_set_m128i(high, low)
    }

    /// Rows one after another: for each block `$block` gives the row's float lanes with the
    /// block added and a term added outside them; the lanes are summed once per row.
    macro_rules! rows {
        ($w:ident, $x:ident, $out:ident, |$wb:ident, $xs:ident, $acc:ident| $block:expr) => {{
            let per = blocks_per($w);
            let blocks = $w.len() / $out.len().max(1);
            for (row, o) in $w.chunks_exact(blocks.max(1)).zip($out.iter_mut()) {
                let size = std::mem::size_of_val(&row[0]);
                let base = row.as_ptr().cast::<i8>();
                // Rows lie end to end: fetch the same block `PREFETCH_ROWS` rows on.
                let ahead = PREFETCH_ROWS * size * blocks;
                let mut $acc = _mm256_setzero_ps();
                let mut extra = 0.0f32;
                for (b, ($wb, $xs)) in row.iter().zip($x.chunks_exact(per)).enumerate() {
                    for line in (0..size).step_by(64) {
                        prefetch(base, b * size + ahead + line);
                    }
                    let (lanes, e) = $block;
                    $acc = lanes;
                    extra += e;
                }
                *o = hsum($acc) + extra;
            }
        }};
    }

    /// Activation blocks per weight block.
    fn blocks_per<B: crate::blocks::WeightBlock>(_: &[B]) -> usize {
        B::VALUES / BLOCK
    }

    /// `acc + s · lanes(dot)`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn scaled(acc: __m256, s: f32, dot: __m256i) -> __m256 {
        _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(dot), acc)
    }

    /// One block of signed levels `w` against one activation block.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn signed_block(
        acc: __m256,
        w: __m256i,
        d: f32,
        xb: &BlockQ8,
        dot: impl Fn(__m256i, __m256i) -> __m256i,
    ) -> __m256 {
        let (a, b) = sign_folded(w, bytes(&xb.qs));
        scaled(acc, d * xb.d, dot(a, b))
    }

    /// The kernels of one format at both levels: `$body` is the block step, given a `dot`
    /// (unsigned bytes times signed bytes, summed in fours into 32-bit lanes).
    macro_rules! kernels {
        ($block:ty, $avx2:ident, $vnni:ident, |$wb:ident, $xs:ident, $acc:ident, $dot:ident| $body:expr) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn $avx2(w: &[$block], x: &[BlockQ8], out: &mut [f32]) {
                let $dot = |a, b| dot_u8_i8_avx2(a, b);
                rows!(w, x, out, |$wb, $xs, $acc| $body);
            }

            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
            pub(super) unsafe fn $vnni(w: &[$block], x: &[BlockQ8], out: &mut [f32]) {
                let $dot = |a, b| _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
                rows!(w, x, out, |$wb, $xs, $acc| $body);
            }
        };
        // A format whose block step is `$levels` (unpack the block) then `$dot_block` (meet
        // one activation row): the one-row kernels above, and batch kernels that unpack each
        // block once for up to `BATCH_ROWS` activation rows.
        (unpacked $block:ty, $avx2:ident, $vnni:ident, $batch_avx2:ident, $batch_vnni:ident,
         $levels:ident, $dot_block:ident) => {
            kernels!($block, $avx2, $vnni, |wb, xs, acc, dot| {
                $dot_block(&$levels(wb), xs, acc, dot)
            });

            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn $batch_avx2(
                w: &[$block],
                x: &[BlockQ8],
                n: usize,
                out: &mut [f32],
                stride: usize,
            ) {
                let dot = |a, b| dot_u8_i8_avx2(a, b);
                rows_batch!(w, x, n, out, stride, $levels, |u, xs, acc| $dot_block(
                    u, xs, acc, dot
                ));
            }

            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
            pub(super) unsafe fn $batch_vnni(
                w: &[$block],
                x: &[BlockQ8],
                n: usize,
                out: &mut [f32],
                stride: usize,
            ) {
                let dot = |a, b| _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
                rows_batch!(w, x, n, out, stride, $levels, |u, xs, acc| $dot_block(
                    u, xs, acc, dot
                ));
            }
        };
    }

    /// Activation rows one batch kernel pass takes per unpacked block (their lanes stay in
    /// registers beside the block's levels).
    const BATCH_ROWS: usize = 4;

    /// `rows!` for `n` activation rows (`x` holds them end to end): each weight block is
    /// unpacked once per `BATCH_ROWS` of them, and each activation row's lanes take the very
    /// steps `rows!` gives them, so every output equals the one-row kernel's bit for bit.
    /// Output `(i, r)` goes to `out[i * stride + r]`.
    macro_rules! rows_batch {
        ($w:ident, $x:ident, $n:ident, $out:ident, $stride:ident, $levels:ident,
         |$u:ident, $xs:ident, $acc:ident| $step:expr) => {{
            let per = blocks_per($w);
            let x_row = $x.len() / $n.max(1);
            let blocks = x_row / per;
            for (r, row) in $w.chunks_exact(blocks.max(1)).enumerate() {
                let size = std::mem::size_of_val(&row[0]);
                let base = row.as_ptr().cast::<i8>();
                let ahead = PREFETCH_ROWS * size * blocks;
                for first in (0..$n).step_by(BATCH_ROWS) {
                    let m = ($n - first).min(BATCH_ROWS);
                    let mut lanes = [_mm256_setzero_ps(); BATCH_ROWS];
                    let mut extra = [0.0f32; BATCH_ROWS];
                    for (b, wb) in row.iter().enumerate() {
                        if first == 0 {
                            for line in (0..size).step_by(64) {
                                prefetch(base, b * size + ahead + line);
                            }
                        }
                        let $u = &$levels(wb);
                        for i in 0..m {
                            let at = (first + i) * x_row + b * per;
                            let $xs = &$x[at..at + per];
                            let $acc = lanes[i];
                            let (v, e) = $step;
                            lanes[i] = v;
                            extra[i] += e;
                        }
                    }
                    for i in 0..m {
                        $out[(first + i) * $stride + r] = hsum(lanes[i]) + extra[i];
                    }
                }
            }
        }};
    }

    kernels!(BlockQ4_0, q4_0_avx2, q4_0_vnni, |wb, xs, acc, dot| {
        let w = _mm256_sub_epi8(nibbles(&wb.qs), _mm256_set1_epi8(8));
        (signed_block(acc, w, scale(wb.d), &xs[0], dot), 0.0)
    });

    kernels!(BlockQ5_0, q5_0_avx2, q5_0_vnni, |wb, xs, acc, dot| {
        // `q − 16` directly: a clear fifth bit leaves the nibble's top bits all ones
        // (`n | 0xF0` is `n − 16` as a signed byte), a set one leaves the nibble.
        let high = _mm256_andnot_si256(
            bit_bytes(u32::from_le_bytes(wb.qh)),
            _mm256_set1_epi8(0xF0u8 as i8),
        );
        let w = _mm256_or_si256(nibbles(&wb.qs), high);
        (signed_block(acc, w, scale(wb.d), &xs[0], dot), 0.0)
    });

    kernels!(BlockQ5_1, q5_1_avx2, q5_1_vnni, |wb, xs, acc, dot| {
        let high = _mm256_and_si256(bit_bytes(u32::from_le_bytes(wb.qh)), _mm256_set1_epi8(0x10));
        let w = _mm256_or_si256(nibbles(&wb.qs), high);
        let xb = &xs[0];
        (
            scaled(acc, scale(wb.d) * xb.d, dot(w, bytes(&xb.qs))),
            scale(wb.m) * xb.s,
        )
    });

    /// A Q4_K or Q5_K super-block unpacked: each 32-value sub-block's levels as bytes (value
    /// order), its 6-bit scale and minimum, and the block's two scales.
    struct ScaleMinLevels {
        q: [__m256i; 8],
        pairs: [(u8, u8); 8],
        d: f32,
        dmin: f32,
    }

    /// A Q4_K block's levels.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn q4_k_levels(wb: &BlockQ4K) -> ScaleMinLevels {
        let mask = _mm256_set1_epi8(0x0F);
        let mut q = [_mm256_setzero_si256(); 8];
        for c in 0..4 {
            let packed = load32(&wb.qs[32 * c..32 * c + 32]);
            q[2 * c] = _mm256_and_si256(packed, mask);
            q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
        }
        ScaleMinLevels {
            q,
            pairs: scale_mins(&wb.scales),
            d: scale(wb.d),
            dmin: scale(wb.dmin),
        }
    }

    /// A Q5_K block's levels: Q4_K's nibbles with their fifth bits from `qh`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn q5_k_levels(wb: &BlockQ5K) -> ScaleMinLevels {
        let mask = _mm256_set1_epi8(0x0F);
        let qh = load32(&wb.qh);
        let mut q = [_mm256_setzero_si256(); 8];
        for c in 0..4 {
            let packed = load32(&wb.qs[32 * c..32 * c + 32]);
            let low = [
                _mm256_and_si256(packed, mask),
                _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask),
            ];
            for (half, low) in low.into_iter().enumerate() {
                let j = 2 * c + half;
                let bit = _mm256_set1_epi8((1u8 << j) as i8);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                q[j] = _mm256_or_si256(low, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
            }
        }
        ScaleMinLevels {
            q,
            pairs: scale_mins(&wb.scales),
            d: scale(wb.d),
            dmin: scale(wb.dmin),
        }
    }

    /// An unpacked Q4_K or Q5_K block against its eight activation blocks `xs`: the lanes
    /// `acc` with `d·sc_j·dx·Σ q q_x` added per sub-block, and `−Σ dmin·m_j·s_x` apart.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn scale_min_dot(
        u: &ScaleMinLevels,
        xs: &[BlockQ8],
        acc: __m256,
        dot: impl Fn(__m256i, __m256i) -> __m256i,
    ) -> (__m256, f32) {
        let (mut acc, mut mins) = (acc, 0.0f32);
        for (j, (q, (sc, m))) in u.q.iter().zip(u.pairs).enumerate() {
            let xb = &xs[j];
            acc = scaled(acc, u.d * f32::from(sc) * xb.d, dot(*q, bytes(&xb.qs)));
            mins += u.dmin * f32::from(m) * xb.s;
        }
        (acc, -mins)
    }

    kernels!(unpacked BlockQ4K, q4_k_avx2, q4_k_vnni, q4_k_batch_avx2, q4_k_batch_vnni, q4_k_levels, scale_min_dot);

    kernels!(unpacked BlockQ5K, q5_k_avx2, q5_k_vnni, q5_k_batch_avx2, q5_k_batch_vnni, q5_k_levels, scale_min_dot);

    /// 32 byte levels `q` to f32 as `step · q − offset`, into `out` (32 values).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn store_levels(q: __m256i, step: f32, offset: f32, out: &mut [f32]) {
        let out: &mut [f32; 32] = out.try_into().expect("32 values");
        let (step, offset) = (_mm256_set1_ps(step), _mm256_set1_ps(offset));
        let halves = [_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)];
        for (h, half) in halves.into_iter().enumerate() {
            for (e, eight) in [half, _mm_srli_si128(half, 8)].into_iter().enumerate() {
                let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight));
                let v = _mm256_fmsub_ps(step, v, offset);
                let at = 16 * h + 8 * e;
                // SAFETY: `out[at..at + 8]` is inside the 32 values, the 32 bytes stored.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(at), v) }
            }
        }
    }

    /// The levels of a Q4_K or Q5_K super-block's sub-block `j` (32 bytes, value order), the
    /// fifth bits from `qh` when given.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn scale_min_levels(qs: &[u8; 128], qh: Option<&[u8; 32]>, j: usize) -> __m256i {
        let mask = _mm256_set1_epi8(0x0F);
        let packed = load32(&qs[32 * (j / 2)..32 * (j / 2) + 32]);
        let low = if j.is_multiple_of(2) {
            _mm256_and_si256(packed, mask)
        } else {
            _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask)
        };
        match qh {
            None => low,
            Some(qh) => {
                let bit = _mm256_set1_epi8((1u8 << j) as i8);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(load32(qh), bit), bit);
                _mm256_or_si256(low, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_k_widen_avx2(blocks: &[BlockQ4K], out: &mut [f32]) {
        for (wb, out) in blocks.iter().zip(out.chunks_exact_mut(256)) {
            let (d, dmin) = (scale(wb.d), scale(wb.dmin));
            for (j, (sc, m)) in scale_mins(&wb.scales).into_iter().enumerate() {
                let q = scale_min_levels(&wb.qs, None, j);
                let (step, min) = (d * f32::from(sc), dmin * f32::from(m));
                store_levels(q, step, min, &mut out[BLOCK * j..BLOCK * (j + 1)]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q5_k_widen_avx2(blocks: &[BlockQ5K], out: &mut [f32]) {
        for (wb, out) in blocks.iter().zip(out.chunks_exact_mut(256)) {
            let (d, dmin) = (scale(wb.d), scale(wb.dmin));
            for (j, (sc, m)) in scale_mins(&wb.scales).into_iter().enumerate() {
                let q = scale_min_levels(&wb.qs, Some(&wb.qh), j);
                let (step, min) = (d * f32::from(sc), dmin * f32::from(m));
                store_levels(q, step, min, &mut out[BLOCK * j..BLOCK * (j + 1)]);
            }
        }
    }

    /// A Q6_K half's four 32-value quarters as byte levels `0..64` (value order).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn q6_k_quarters(wb: &BlockQ6K, n: usize) -> [__m256i; 4] {
        let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x03));
        let ql0 = load32(&wb.ql[64 * n..64 * n + 32]);
        let ql1 = load32(&wb.ql[64 * n + 32..64 * n + 64]);
        let h = load32(&wb.qh[32 * n..32 * n + 32]);
        let high = |bits: __m256i| _mm256_slli_epi16(_mm256_and_si256(bits, m2), 4);
        [
            _mm256_or_si256(_mm256_and_si256(ql0, m4), high(h)),
            _mm256_or_si256(_mm256_and_si256(ql1, m4), high(_mm256_srli_epi16(h, 2))),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                high(_mm256_srli_epi16(h, 4)),
            ),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                high(_mm256_srli_epi16(h, 6)),
            ),
        ]
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q6_k_widen_avx2(blocks: &[BlockQ6K], out: &mut [f32]) {
        for (wb, out) in blocks.iter().zip(out.chunks_exact_mut(256)) {
            let d = scale(wb.d);
            for n in 0..2 {
                for (quarter, q) in q6_k_quarters(wb, n).into_iter().enumerate() {
                    // Levels stay unsigned bytes (below 64); the 32 comes off as an offset.
                    let k = 4 * n + quarter;
                    for half in 0..2 {
                        let step = d * f32::from(wb.scales[2 * k + half]);
                        let q16 = if half == 0 {
                            q
                        } else {
                            _mm256_permute2x128_si256(q, q, 0x11)
                        };
                        let at = BLOCK * k + 16 * half;
                        store_levels16(q16, step, 32.0 * step, &mut out[at..at + 16]);
                    }
                }
            }
        }
    }

    /// The first 16 byte levels of `q` to f32 as `step · q − offset`, into `out` (16 values).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn store_levels16(q: __m256i, step: f32, offset: f32, out: &mut [f32]) {
        let out: &mut [f32; 16] = out.try_into().expect("16 values");
        let (step, offset) = (_mm256_set1_ps(step), _mm256_set1_ps(offset));
        let low = _mm256_castsi256_si128(q);
        for (e, eight) in [low, _mm_srli_si128(low, 8)].into_iter().enumerate() {
            let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight));
            let v = _mm256_fmsub_ps(step, v, offset);
            // SAFETY: `out[8e..8e + 8]` is inside the 16 values, the 32 bytes stored.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * e), v) }
        }
    }

    /// A Q6_K super-block unpacked: each 32-value quarter's levels centred on zero as signed
    /// bytes, the sixteen 16-value sub-blocks' scales, and the block's scale.
    struct Q6KLevels {
        w: [__m256i; 8],
        scales: [i8; 16],
        d: f32,
    }

    /// A Q6_K block's levels: four low bits from `ql`, two high ones from `qh`, minus 32.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn q6_k_levels(wb: &BlockQ6K) -> Q6KLevels {
        let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x03));
        let high = |h: __m256i, shift: i32| {
            let bits = match shift {
                0 => h,
                2 => _mm256_srli_epi16(h, 2),
                4 => _mm256_srli_epi16(h, 4),
                _ => _mm256_srli_epi16(h, 6),
            };
            _mm256_slli_epi16(_mm256_and_si256(bits, m2), 4)
        };
        let mut w = [_mm256_setzero_si256(); 8];
        for n in 0..2 {
            let ql0 = load32(&wb.ql[64 * n..64 * n + 32]);
            let ql1 = load32(&wb.ql[64 * n + 32..64 * n + 64]);
            let h = load32(&wb.qh[32 * n..32 * n + 32]);
            let quarters = [
                _mm256_or_si256(_mm256_and_si256(ql0, m4), high(h, 0)),
                _mm256_or_si256(_mm256_and_si256(ql1, m4), high(h, 2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), high(h, 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), high(h, 6)),
            ];
            for (quarter, q) in quarters.into_iter().enumerate() {
                w[4 * n + quarter] = _mm256_sub_epi8(q, _mm256_set1_epi8(32));
            }
        }
        Q6KLevels {
            w,
            scales: wb.scales,
            d: scale(wb.d),
        }
    }

    /// An unpacked Q6_K block against its eight activation blocks `xs`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn q6_k_dot(
        u: &Q6KLevels,
        xs: &[BlockQ8],
        acc: __m256,
        dot: impl Fn(__m256i, __m256i) -> __m256i,
    ) -> (__m256, f32) {
        let mut acc = acc;
        for (k, w) in u.w.iter().enumerate() {
            let xb = &xs[k];
            let (a, b) = sign_folded(*w, bytes(&xb.qs));
            // Lanes 0-3 hold values 0-15 of the quarter, lanes 4-7 values 16-31: each half
            // takes its own sub-block's scale.
            let dd = u.d * xb.d;
            let scales = _mm256_setr_m128(
                _mm_set1_ps(dd * f32::from(u.scales[2 * k])),
                _mm_set1_ps(dd * f32::from(u.scales[2 * k + 1])),
            );
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot(a, b)), scales, acc);
        }
        (acc, 0.0)
    }

    kernels!(unpacked BlockQ6K, q6_k_avx2, q6_k_vnni, q6_k_batch_avx2, q6_k_batch_vnni, q6_k_levels, q6_k_dot);
}
