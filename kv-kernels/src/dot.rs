//! Row-by-row dot products of weight rows with one activation row, one function per weight
//! format, each with a scalar reference and x86 versions chosen by [`Isa`].
//!
//! Why hand-written: no maintained crate multiplies by ggml's block layouts (the point is to
//! read the file's own bytes, not a widened copy), and `gemm`, which burn's CPU backends use,
//! has no f16-weight/f32-activation or 8-bit path. The x86 functions follow the textbook
//! pattern (widen 4-bit levels to bytes, multiply-add bytes to 32-bit sums, scale by the two
//! block scales, accumulate in f32), the same arithmetic ggml's `ggml_vec_dot_q4_1_q8_1`
//! performs, written here from the format definitions.
//!
//! The `*_rows` functions take `out.len()` weight rows laid end to end in `w` and write one dot
//! per row; the `*_group` functions take the blocks of one group of eight interleaved rows
//! (see [`crate::packed`]) and write eight dots, one vector instruction serving all eight rows.
//! Matrices store the block formats as groups, so the group kernels carry the products and
//! the row kernels serve a group's rows one at a time (a range cutting through a group, the
//! tail rows). The `*_group_batch` functions take several activation rows (a prompt) and pass
//! over each group's blocks once per [`BATCH`] of them: the same arithmetic per output, a
//! quarter of the weight loads and (Q4_1) of the nibble unpacking. Callers (the [`crate::Matrix`] methods) check the lengths; the functions assert
//! them.

use half::f16;

use crate::blocks::{rows_scalar, BlockQ4_1, BlockQ8, BlockQ8_0, BLOCK};
use crate::isa::Isa;
use crate::packed::{Interleave, Q4_0x8, Q4_1x8, Q5_0x8, Q5_1x8, Q8_0x8, GROUP};

/// `out[r] = Σ_b d_w d_x Σ q_w q_x + m_w s_x` over row `r`'s Q4_1 blocks and `x`'s blocks.
pub fn q4_1_rows(isa: Isa, w: &[BlockQ4_1], x: &[BlockQ8], out: &mut [f32]) {
    assert_eq!(
        w.len(),
        x.len() * out.len(),
        "Q4_1 rows against activation blocks"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.is_available() => {
            // SAFETY: the level's instructions (avx2, fma, f16c) were detected on this CPU.
            unsafe { x86::q4_1_rows_avx2(w, x, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if isa.is_available() => {
            // SAFETY: the level's instructions (avx512vnni, avx512vl, avx2, f16c) were detected.
            unsafe { x86::q4_1_rows_vnni(w, x, out) }
        }
        _ => q4_1_rows_scalar(w, x, out),
    }
}

/// `out[r] = Σ_b d_w d_x Σ q_w q_x` over row `r`'s Q8_0 blocks and `x`'s blocks.
pub fn q8_0_rows(isa: Isa, w: &[BlockQ8_0], x: &[BlockQ8], out: &mut [f32]) {
    assert_eq!(
        w.len(),
        x.len() * out.len(),
        "Q8_0 rows against activation blocks"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.is_available() => {
            // SAFETY: avx2, fma and f16c were detected on this CPU.
            unsafe { x86::q8_0_rows_avx2(w, x, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if isa.is_available() => {
            // SAFETY: avx512vnni, avx512vl, avx2 and f16c were detected on this CPU.
            unsafe { x86::q8_0_rows_vnni(w, x, out) }
        }
        _ => q8_0_rows_scalar(w, x, out),
    }
}

/// `out[r] = Σ_i w[r, i] x[i]` for f16 weight rows and an f32 activation row.
pub fn f16_rows(isa: Isa, w: &[f16], x: &[f32], out: &mut [f32]) {
    assert_eq!(
        w.len(),
        x.len() * out.len(),
        "f16 rows against the activation row"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if Isa::Avx2.is_available() => {
            // SAFETY: avx2, fma and f16c were detected on this CPU.
            unsafe { x86::f16_rows_avx2(w, x, out) }
        }
        _ => {
            for (row, o) in w.chunks_exact(x.len()).zip(out.iter_mut()) {
                *o = row.iter().zip(x).map(|(w, x)| w.to_f32() * x).sum();
            }
        }
    }
}

/// `out[i * stride + r] = Σ_c w[r, c] x[i, c]` for f32 or f16 weight rows `w` against `n`
/// activation rows (`x` is `[n, cols]`, `n` small: a speculative pass's token and guesses).
///
/// Each eight weights are loaded (and widened from f16) once for up to three activation rows,
/// where [`f32_rows`] and [`f16_rows`] called per activation row load them `n` times. Every
/// output takes the one-row kernel's steps in the same order (four accumulators over 32
/// columns, the same reduction), so it equals that row computed alone bit for bit.
pub fn dense_rows_batch<T: DenseWeight>(
    isa: Isa,
    w: &[T],
    x: &[f32],
    n: usize,
    out: &mut [f32],
    stride: usize,
) {
    let cols = x.len() / n.max(1);
    let rows = w.len() / cols.max(1);
    assert_eq!(x.len(), n * cols, "x is [n, cols]");
    assert_eq!(w.len(), rows * cols, "w is [rows, cols]");
    assert!(
        n == 0 || out.len() >= (n - 1) * stride + rows,
        "out holds n rows of `stride`"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if Isa::Avx2.is_available() => {
            let mut first = 0;
            while first < n {
                let count = (n - first).min(3);
                let xs = &x[first * cols..(first + count) * cols];
                let o = &mut out[first * stride..];
                // SAFETY: avx2, fma and f16c were detected on this CPU; the asserts above keep
                // `w` at `rows * cols`, `xs` at `count * cols` and `o` long enough.
                unsafe {
                    match count {
                        3 => x86::dense_rows_batch_avx2::<T, 3>(w, xs, cols, o, stride),
                        2 => x86::dense_rows_batch_avx2::<T, 2>(w, xs, cols, o, stride),
                        _ => x86::dense_rows_batch_avx2::<T, 1>(w, xs, cols, o, stride),
                    }
                }
                first += count;
            }
        }
        _ => {
            for i in 0..n {
                let xi = &x[i * cols..(i + 1) * cols];
                for (r, row) in w.chunks_exact(cols.max(1)).enumerate() {
                    out[i * stride + r] = row.iter().zip(xi).map(|(w, x)| w.to_f32() * x).sum();
                }
            }
        }
    }
}

/// A weight element [`dense_rows_batch`] reads: f32, or f16 widened on load.
pub trait DenseWeight: Copy {
    /// The value as f32.
    fn to_f32(self) -> f32;
    /// Eight values from `p` as f32 lanes.
    ///
    /// # Safety
    /// `p` points at eight readable values; the CPU has avx and f16c.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl DenseWeight for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller gives eight readable floats.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl DenseWeight for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::{_mm256_cvtph_ps, _mm_loadu_si128};
        // SAFETY: the caller gives eight readable halves (16 bytes) and a CPU with f16c.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

/// `out[r] = Σ_i w[r, i] x[i]` for f32 weight rows.
pub fn f32_rows(isa: Isa, w: &[f32], x: &[f32], out: &mut [f32]) {
    assert_eq!(
        w.len(),
        x.len() * out.len(),
        "f32 rows against the activation row"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if Isa::Avx2.is_available() => {
            // SAFETY: avx2 and fma were detected on this CPU.
            unsafe { x86::f32_rows_avx2(w, x, out) }
        }
        _ => {
            for (row, o) in w.chunks_exact(x.len()).zip(out.iter_mut()) {
                *o = row.iter().zip(x).map(|(w, x)| w * x).sum();
            }
        }
    }
}

/// [`q4_1_rows`] for the eight interleaved rows of one group (`groups` holds the group's blocks
/// in column order): `out[r]` for row `r` of the group.
pub fn q4_1_group(isa: Isa, groups: &[Q4_1x8], x: &[BlockQ8], out: &mut [f32]) {
    assert_eq!(
        groups.len(),
        x.len(),
        "Q4_1 group blocks against activation blocks"
    );
    assert_eq!(out.len(), GROUP, "one output per row of the group");
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.is_available() => {
            // SAFETY: the level's instructions (avx2, fma, f16c) were detected on this CPU.
            unsafe { x86::q4_1_group_avx2(groups, x, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if isa.is_available() => {
            // SAFETY: the level's instructions (avx512vnni, avx512vl, avx2, f16c) were detected.
            unsafe { x86::q4_1_group_vnni(groups, x, out) }
        }
        _ => each_row(groups, out, |row, o| q4_1_rows_scalar(row, x, o)),
    }
}

/// [`q8_0_rows`] for the eight interleaved rows of one group.
pub fn q8_0_group(isa: Isa, groups: &[Q8_0x8], x: &[BlockQ8], out: &mut [f32]) {
    assert_eq!(
        groups.len(),
        x.len(),
        "Q8_0 group blocks against activation blocks"
    );
    assert_eq!(out.len(), GROUP, "one output per row of the group");
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.is_available() => {
            // SAFETY: avx2, fma and f16c were detected on this CPU.
            unsafe { x86::q8_0_group_avx2(groups, x, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if isa.is_available() => {
            // SAFETY: avx512vnni, avx512vl, avx2 and f16c were detected on this CPU.
            unsafe { x86::q8_0_group_vnni(groups, x, out) }
        }
        _ => each_row(groups, out, |row, o| q8_0_rows_scalar(row, x, o)),
    }
}

/// Activation rows one pass of a `*_group_batch` kernel multiplies by a group: the group's
/// weight bytes are loaded (and Q4_1's levels unpacked) once for all of them, which is what
/// makes a prompt's products cheaper per row than a decode step's.
pub const BATCH: usize = 4;

/// [`q4_1_group`] against `n` activation rows (`x` holds `n` rows of `groups.len()` blocks):
/// `out[i * stride + r]` is the group's row `r` against activation row `i`. Each output is
/// computed with the same operations in the same order as [`q4_1_group`], so the results are
/// equal bit for bit; only the loads are shared.
pub fn q4_1_group_batch(
    isa: Isa,
    groups: &[Q4_1x8],
    x: &[BlockQ8],
    n: usize,
    out: &mut [f32],
    stride: usize,
) {
    let blocks = groups.len();
    group_batch(groups, x, n, out, stride, |rows, o| {
        let xs = rows.map(|i| row_of(x, blocks, i));
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if isa.is_available() => {
                // SAFETY: the level's instructions (avx2, fma, f16c) were detected on this CPU.
                unsafe { x86::q4_1_group_batch_avx2(groups, xs, o) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni if isa.is_available() => {
                // SAFETY: the level's instructions (avx512vnni, avx512vl, avx2, f16c) were
                // detected on this CPU.
                unsafe { x86::q4_1_group_batch_vnni(groups, xs, o) }
            }
            _ => {
                for (x, o) in xs.iter().zip(o.iter_mut()) {
                    q4_1_group(isa, groups, x, o);
                }
            }
        }
    });
}

/// The kernels of a format whose unsigned levels sit above an offset or a minimum, eight
/// interleaved rows at a time: centred on an offset (Q4_0: `x = d (q − 8)`, Q5_0:
/// `x = d (q − 16)`), the offset comes off once per row, `Σ d·dx·Σ q q_x − offset·Σ d·s_x`;
/// above a minimum (Q5_1: `x = d q + m`), the minimum is added, `Σ d·dx·Σ q q_x + Σ m·s_x`.
macro_rules! unsigned_levels {
    ($group:ident, $batch:ident, $g:ty, $name:literal,
     $avx2:ident, $vnni:ident, $batch_avx2:ident, $batch_vnni:ident) => {
        #[doc = concat!("[`crate::blocks::Block", $name, "`] rows for the eight interleaved rows of one group.")]
        pub fn $group(isa: Isa, groups: &[$g], x: &[BlockQ8], out: &mut [f32]) {
            assert_eq!(
                groups.len(),
                x.len(),
                concat!($name, " group blocks against activation blocks")
            );
            assert_eq!(out.len(), GROUP, "one output per row of the group");
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 if isa.is_available() => {
                    // SAFETY: the level's instructions (avx2, fma, f16c) were detected on this
                    // CPU.
                    unsafe { x86::$avx2(groups, x, out) }
                }
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Vnni if isa.is_available() => {
                    // SAFETY: the level's instructions (avx512vnni, avx512vl, avx2, f16c) were
                    // detected on this CPU.
                    unsafe { x86::$vnni(groups, x, out) }
                }
                _ => each_row(groups, out, |row, o| rows_scalar(row, x, o)),
            }
        }

        #[doc = concat!("[`", stringify!($group), "`] against `n` activation rows, as [`q4_1_group_batch`].")]
        pub fn $batch(
            isa: Isa,
            groups: &[$g],
            x: &[BlockQ8],
            n: usize,
            out: &mut [f32],
            stride: usize,
        ) {
            let blocks = groups.len();
            group_batch(groups, x, n, out, stride, |rows, o| {
                let xs = rows.map(|i| row_of(x, blocks, i));
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 if isa.is_available() => {
                        // SAFETY: the level's instructions (avx2, fma, f16c) were detected on
                        // this CPU.
                        unsafe { x86::$batch_avx2(groups, xs, o) }
                    }
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512Vnni if isa.is_available() => {
                        // SAFETY: the level's instructions (avx512vnni, avx512vl, avx2, f16c)
                        // were detected on this CPU.
                        unsafe { x86::$batch_vnni(groups, xs, o) }
                    }
                    _ => {
                        for (x, o) in xs.iter().zip(o.iter_mut()) {
                            $group(isa, groups, x, o);
                        }
                    }
                }
            });
        }
    };
}

unsigned_levels!(
    q5_0_group,
    q5_0_group_batch,
    Q5_0x8,
    "Q5_0",
    q5_0_group_avx2,
    q5_0_group_vnni,
    q5_0_group_batch_avx2,
    q5_0_group_batch_vnni
);
unsigned_levels!(
    q4_0_group,
    q4_0_group_batch,
    Q4_0x8,
    "Q4_0",
    q4_0_group_avx2,
    q4_0_group_vnni,
    q4_0_group_batch_avx2,
    q4_0_group_batch_vnni
);
unsigned_levels!(
    q5_1_group,
    q5_1_group_batch,
    Q5_1x8,
    "Q5_1",
    q5_1_group_avx2,
    q5_1_group_vnni,
    q5_1_group_batch_avx2,
    q5_1_group_batch_vnni
);

/// [`q8_0_group`] against `n` activation rows, as [`q4_1_group_batch`]; `sums` is
/// [`block_sums`] at the same `isa` (each activation block's `Σ qs` where the VNNI kernel needs
/// them, empty elsewhere).
pub fn q8_0_group_batch(
    isa: Isa,
    groups: &[Q8_0x8],
    x: &[BlockQ8],
    sums: &[i32],
    n: usize,
    out: &mut [f32],
    stride: usize,
) {
    let blocks = groups.len();
    group_batch(groups, x, n, out, stride, |rows, o| {
        let xs = rows.map(|i| row_of(x, blocks, i));
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if isa.is_available() => {
                // SAFETY: avx2, fma and f16c were detected on this CPU.
                unsafe { x86::q8_0_group_batch_avx2(groups, xs, o) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni if isa.is_available() => {
                assert_eq!(
                    sums.len(),
                    x.len(),
                    "a sum per activation block (block_sums)"
                );
                let sums = rows.map(|i| &sums[i * blocks..(i + 1) * blocks]);
                // SAFETY: avx512vnni, avx512vl, avx2 and f16c were detected on this CPU.
                unsafe { x86::q8_0_group_batch_vnni(groups, xs, sums, o) }
            }
            _ => {
                for (x, o) in xs.iter().zip(o.iter_mut()) {
                    q8_0_group(isa, groups, x, o);
                }
            }
        }
    });
}

/// `Σ qs` of each activation block, for [`q8_0_group_batch`] at `isa`: only the VNNI kernel
/// reads them (it multiplies unsigned by signed bytes, and takes `128 Σ qs` back off), so the
/// other levels get an empty list and skip the pass over the activations.
pub fn block_sums(isa: Isa, x: &[BlockQ8]) -> Vec<i32> {
    if isa != Isa::Avx512Vnni || !isa.is_available() {
        return Vec::new();
    }
    x.iter()
        .map(|b| b.qs.iter().map(|&q| i32::from(q)).sum())
        .collect()
}

/// The shared frame of the batch kernels: `n` activation rows in passes of [`BATCH`] through
/// `pass` (given the pass's activation row indices), the last `n % BATCH` rows one pass each
/// with the rest of the batch repeating the pass's first row (computed and dropped: a short
/// pass costs what a full one does, and the tail is at most three rows a product).
fn group_batch<G>(
    groups: &[G],
    x: &[BlockQ8],
    n: usize,
    out: &mut [f32],
    stride: usize,
    mut pass: impl FnMut([usize; BATCH], &mut [[f32; GROUP]; BATCH]),
) {
    let blocks = groups.len();
    assert_eq!(
        x.len(),
        n * blocks,
        "n activation rows of the group's blocks"
    );
    assert!(
        stride >= GROUP,
        "stride {stride} below a group's {GROUP} rows"
    );
    if n == 0 {
        return;
    }
    assert!(
        out.len() >= (n - 1) * stride + GROUP,
        "out holds n rows of stride {stride}"
    );
    for first in (0..n).step_by(BATCH) {
        let rows = (n - first).min(BATCH);
        let indices = std::array::from_fn(|k| first + if k < rows { k } else { 0 });
        let mut o = [[0.0; GROUP]; BATCH];
        pass(indices, &mut o);
        for (k, o) in o.iter().take(rows).enumerate() {
            out[(first + k) * stride..][..GROUP].copy_from_slice(o);
        }
    }
}

/// Activation row `i` of `x` (rows of `blocks` blocks).
fn row_of(x: &[BlockQ8], blocks: usize, i: usize) -> &[BlockQ8] {
    &x[i * blocks..(i + 1) * blocks]
}

/// The scalar reference on a group: each row unpacked, then the row kernel.
fn each_row<G: Interleave>(
    groups: &[G],
    out: &mut [f32],
    mut row_kernel: impl FnMut(&[G::Block], &mut [f32]),
) {
    for (r, o) in out.iter_mut().enumerate() {
        let row: Vec<G::Block> = groups.iter().map(|g| g.unpack(r)).collect();
        row_kernel(&row, std::slice::from_mut(o));
    }
}

fn q4_1_rows_scalar(w: &[BlockQ4_1], x: &[BlockQ8], out: &mut [f32]) {
    for (row, o) in w.chunks_exact(x.len()).zip(out.iter_mut()) {
        *o = row
            .iter()
            .zip(x)
            .map(|(wb, xb)| {
                let dot: i32 = (0..BLOCK / 2)
                    .map(|j| {
                        i32::from(wb.qs[j] & 0x0F) * i32::from(xb.qs[j])
                            + i32::from(wb.qs[j] >> 4) * i32::from(xb.qs[j + BLOCK / 2])
                    })
                    .sum();
                wb.d.to_f32() * xb.d * dot as f32 + wb.m.to_f32() * xb.s
            })
            .sum();
    }
}

fn q8_0_rows_scalar(w: &[BlockQ8_0], x: &[BlockQ8], out: &mut [f32]) {
    for (row, o) in w.chunks_exact(x.len()).zip(out.iter_mut()) {
        *o = row
            .iter()
            .zip(x)
            .map(|(wb, xb)| {
                let dot: i32 = wb
                    .qs
                    .iter()
                    .zip(&xb.qs)
                    .map(|(&a, &b)| i32::from(a) * i32::from(b))
                    .sum();
                wb.d.to_f32() * xb.d * dot as f32
            })
            .sum();
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! The x86 versions. Each is an `unsafe fn` only because it is compiled for instructions
    //! the caller must have detected; memory is read through bounds-checked slices, except
    //! where a comment says why an unaligned vector load stays inside its slice.

    use std::arch::x86_64::*;

    use half::f16;

    use crate::blocks::{BlockQ4_1, BlockQ8, BlockQ8_0};
    use crate::packed::{Q4_0x8, Q4_1x8, Q5_0x8, Q5_1x8, Q8_0x8};

    /// An f16 scale to f32 with F16C (half's own conversion checks the CPU on every call).
    #[inline]
    #[target_feature(enable = "f16c")]
    pub(crate) fn scale(h: f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h.to_bits()))))
    }

    /// The sum of a vector's eight lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pair = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
    }

    /// A Q4_1 block's 32 levels as bytes in value order (low nibbles, then high).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn levels(block: &BlockQ4_1) -> __m256i {
        // SAFETY: `qs` is 16 bytes, exactly what the unaligned load reads.
        let packed = unsafe { _mm_loadu_si128(block.qs.as_ptr().cast()) };
        let mask = _mm_set1_epi8(0x0F);
        let low = _mm_and_si128(packed, mask);
        let high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
        _mm256_set_m128i(high, low)
    }

    /// An activation or Q8_0 block's 32 signed bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) fn bytes(qs: &[i8; 32]) -> __m256i {
        // SAFETY: `qs` is 32 bytes, exactly what the unaligned load reads.
        unsafe { _mm256_loadu_si256(qs.as_ptr().cast()) }
    }

    /// Unsigned `a` times signed `b`, bytes summed in fours into 32-bit lanes (AVX2: through
    /// 16-bit pair sums, which cannot saturate for 4-bit or sign-folded 8-bit inputs).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) fn dot_u8_i8_avx2(a: __m256i, b: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    }

    /// Byte `j` all ones where bit `j` of `bits` is set, zero elsewhere.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) fn bit_bytes(bits: u32) -> __m256i {
        let v = _mm256_set1_epi32(bits as i32);
        // Byte j takes byte j / 8 of the word (each 128-bit half shuffles its own copy).
        let spread = _mm256_shuffle_epi8(
            v,
            _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                3, 3, 3, 3,
            ),
        );
        // Set every bit but bit j % 8; the byte is all ones exactly when that bit was set.
        let others = _mm256_set1_epi64x(0x7FBF_DFEF_F7FB_FDFE);
        _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
    }

    /// How far ahead of the rows being read the kernels ask for weight bytes, in rows. The
    /// weights stream from memory once per step (a model is larger than the caches); the
    /// hardware prefetcher alone left a core waiting on loads. Measured on SmolLM2-135M's Q4_1
    /// decode (2 threads, AMD EPYC): 120 tok/s without, 135-141 with 1 to 8 rows ahead.
    pub(crate) const PREFETCH_ROWS: usize = 2;

    /// Starts loading the cache line at `base + offset` into the nearest cache.
    #[inline(always)]
    pub(crate) fn prefetch(base: *const i8, offset: usize) {
        // SAFETY: a prefetch is a hint: it never faults and changes no memory, whatever the
        // address, which is computed with wrapping arithmetic (no out-of-bounds pointer is
        // ever dereferenced).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(offset)) }
    }

    /// Two weight rows per pass share each activation block's load and scale. `$block` gives
    /// a block's `(scale, integer dots as floats)`, `$extra` a term added outside the vector.
    macro_rules! two_rows {
        ($w:ident, $x:ident, $out:ident, |$wb:ident, $xb:ident| $block:expr, $extra:expr) => {{
            let blocks = $x.len();
            let mut rows = $w.chunks_exact(blocks);
            let mut outs = $out.iter_mut();
            loop {
                match (rows.next(), outs.next()) {
                    (Some(r0), Some(o0)) => {
                        let second = match (rows.next(), outs.next()) {
                            (Some(r1), Some(o1)) => Some((r1, o1)),
                            _ => None,
                        };
                        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                        let (mut extra0, mut extra1) = (0.0f32, 0.0f32);
                        // Rows lie end to end: fetch the same blocks `PREFETCH_ROWS` rows on.
                        let row_bytes = std::mem::size_of_val(r0);
                        let base = r0.as_ptr().cast::<i8>();
                        let ahead = PREFETCH_ROWS * row_bytes;
                        for (b, $xb) in $x.iter().enumerate() {
                            let at = b * std::mem::size_of_val(&r0[0]) + ahead;
                            prefetch(base, at);
                            prefetch(base, at + row_bytes);
                            let $wb = &r0[b];
                            let ((s, v), e) = ($block, $extra);
                            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(s), v, acc0);
                            extra0 += e;
                            if let Some((r1, _)) = &second {
                                let $wb = &r1[b];
                                let ((s, v), e) = ($block, $extra);
                                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(s), v, acc1);
                                extra1 += e;
                            }
                        }
                        *o0 = hsum(acc0) + extra0;
                        if let Some((_, o1)) = second {
                            *o1 = hsum(acc1) + extra1;
                        }
                    }
                    _ => break,
                }
            }
        }};
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_1_rows_avx2(w: &[BlockQ4_1], x: &[BlockQ8], out: &mut [f32]) {
        two_rows!(
            w,
            x,
            out,
            |wb, xb| (
                scale(wb.d) * xb.d,
                _mm256_cvtepi32_ps(dot_u8_i8_avx2(levels(wb), bytes(&xb.qs)))
            ),
            scale(wb.m) * xb.s
        );
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q4_1_rows_vnni(w: &[BlockQ4_1], x: &[BlockQ8], out: &mut [f32]) {
        two_rows!(
            w,
            x,
            out,
            |wb, xb| (
                scale(wb.d) * xb.d,
                _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(
                    _mm256_setzero_si256(),
                    levels(wb),
                    bytes(&xb.qs)
                ))
            ),
            scale(wb.m) * xb.s
        );
    }

    /// Signed-by-signed bytes through the unsigned-by-signed instructions: `|a|` times `b`
    /// with `a`'s sign moved onto it.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) fn sign_folded(a: __m256i, b: __m256i) -> (__m256i, __m256i) {
        (_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_0_rows_avx2(w: &[BlockQ8_0], x: &[BlockQ8], out: &mut [f32]) {
        two_rows!(
            w,
            x,
            out,
            |wb, xb| {
                let (a, b) = sign_folded(bytes(&wb.qs), bytes(&xb.qs));
                (scale(wb.d) * xb.d, _mm256_cvtepi32_ps(dot_u8_i8_avx2(a, b)))
            },
            0.0
        );
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q8_0_rows_vnni(w: &[BlockQ8_0], x: &[BlockQ8], out: &mut [f32]) {
        two_rows!(
            w,
            x,
            out,
            |wb, xb| {
                let (a, b) = sign_folded(bytes(&wb.qs), bytes(&xb.qs));
                (
                    scale(wb.d) * xb.d,
                    _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)),
                )
            },
            0.0
        );
    }

    /// Starts loading every cache line of `bytes` bytes at `base + offset`.
    #[inline(always)]
    fn prefetch_span(base: *const i8, offset: usize, bytes: usize) {
        for line in (0..bytes).step_by(64) {
            prefetch(base, offset + line);
        }
    }

    /// Four activation bytes `qs[at..at + 4]` in every 32-bit lane.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn broadcast4(qs: &[i8; 32], at: usize) -> __m256i {
        let four: [i8; 4] = qs[at..at + 4].try_into().expect("four bytes");
        _mm256_set1_epi32(i32::from_le_bytes(four.map(|b| b as u8)))
    }

    /// 32 bytes of a group's interleaved values: four bytes of each of its eight rows.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn chunk<T>(qs: &[T], at: usize) -> __m256i {
        let bytes = &qs[at..at + 32 / std::mem::size_of::<T>()];
        // SAFETY: `bytes` is 32 bytes (T is one byte wide here), what the unaligned load reads.
        unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
    }

    /// A group's eight f16 scales as eight f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn scales(d: &[f16; 8]) -> __m256 {
        // SAFETY: `d` is eight halves, the 16 bytes the unaligned load reads.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(d.as_ptr().cast()) })
    }

    /// Eight Q4_1 rows at once: per block, the eight rows' integer dots (lane `r` = row `r`)
    /// come from eight byte multiply-adds `$dot(acc, levels, activations)`, then scale by the
    /// eight steps times the activation's scale; the minimums add `m_r s_x`.
    macro_rules! q4_1_group {
        ($groups:ident, $x:ident, $out:ident, $dot:expr) => {{
            let mask = _mm256_set1_epi8(0x0F);
            let (mut acc, mut acc_min) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let base = $groups.as_ptr().cast::<i8>();
            let ahead = std::mem::size_of_val($groups);
            for (b, (g, xb)) in $groups.iter().zip($x).enumerate() {
                prefetch_span(base, b * std::mem::size_of::<Q4_1x8>() + ahead, 160);
                // Four independent sums: one chain of eight multiply-adds would wait on
                // each one's latency when the weights are already in cache (prompts).
                let mut dots = [_mm256_setzero_si256(); 4];
                for j in 0..4 {
                    let packed = chunk(&g.qs, 32 * j);
                    let low = _mm256_and_si256(packed, mask);
                    let high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
                    let (a, b) = (2 * (j % 2), 2 * (j % 2) + 1);
                    dots[a] = $dot(dots[a], low, broadcast4(&xb.qs, 4 * j));
                    dots[b] = $dot(dots[b], high, broadcast4(&xb.qs, 16 + 4 * j));
                }
                let dots = _mm256_add_epi32(
                    _mm256_add_epi32(dots[0], dots[1]),
                    _mm256_add_epi32(dots[2], dots[3]),
                );
                let step = _mm256_mul_ps(scales(&g.d), _mm256_set1_ps(xb.d));
                acc = _mm256_fmadd_ps(step, _mm256_cvtepi32_ps(dots), acc);
                acc_min = _mm256_fmadd_ps(scales(&g.m), _mm256_set1_ps(xb.s), acc_min);
            }
            let sums = _mm256_add_ps(acc, acc_min);
            let out: &mut [f32; 8] = $out.try_into().expect("eight outputs");
            // SAFETY: `out` is eight floats, the 32 bytes the unaligned store writes.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sums) }
        }};
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_1_group_avx2(groups: &[Q4_1x8], x: &[BlockQ8], out: &mut [f32]) {
        q4_1_group!(groups, x, out, |acc, a, b| _mm256_add_epi32(
            acc,
            dot_u8_i8_avx2(a, b)
        ));
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q4_1_group_vnni(groups: &[Q4_1x8], x: &[BlockQ8], out: &mut [f32]) {
        q4_1_group!(groups, x, out, |acc, a, b| _mm256_dpbusd_epi32(acc, a, b));
    }

    /// A five-bit group's 32-byte chunk `j` as two vectors of levels (`0..32`), one row per
    /// 32-bit lane: the low nibbles (values `4j..4j + 4` of each row) and the high ones
    /// (values `16 + 4j..`), each with its fifth bits from the group's regrouped words.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn five_bit_levels(qs: &[u8; 128], qh: &[u32; 8], j: usize) -> (__m256i, __m256i) {
        let (mask, fifth) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x10));
        let packed = chunk(qs, 32 * j);
        let low = _mm256_and_si256(packed, mask);
        let high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
        (
            _mm256_or_si256(low, _mm256_and_si256(bit_bytes(qh[j]), fifth)),
            _mm256_or_si256(high, _mm256_and_si256(bit_bytes(qh[4 + j]), fifth)),
        )
    }

    /// [`five_bit_levels`] of a Q5_0 group.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn q5_0_levels(g: &Q5_0x8, j: usize) -> (__m256i, __m256i) {
        five_bit_levels(&g.qs, &g.qh, j)
    }

    /// [`five_bit_levels`] of a Q5_1 group.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn q5_1_levels(g: &Q5_1x8, j: usize) -> (__m256i, __m256i) {
        five_bit_levels(&g.qs, &g.qh, j)
    }

    /// A Q4_0 group's 32-byte chunk `j` as two vectors of levels (`0..16`), one row per
    /// 32-bit lane: the low nibbles (values `4j..4j + 4` of each row) and the high ones.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn q4_0_levels(g: &Q4_0x8, j: usize) -> (__m256i, __m256i) {
        let mask = _mm256_set1_epi8(0x0F);
        let packed = chunk(&g.qs, 32 * j);
        (
            _mm256_and_si256(packed, mask),
            _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask),
        )
    }

    /// Eight rows of an unsigned-level format at once, as [`q4_1_group!`] with `$levels`
    /// giving a chunk's levels. Each block adds `$term(group, steps)` (eight lanes) times the
    /// activation's sum into a second accumulator, and `$finish(acc, that)` makes the result:
    /// for a centred format the steps, and `acc − offset · Σ d_r s_x`; for a minimum, the
    /// minimums, and `acc + Σ m_r s_x`.
    macro_rules! levels_group {
        ($groups:ident, $x:ident, $out:ident, $dot:expr, $levels:ident, $term:expr, $finish:expr) => {{
            let (mut acc, mut acc_offset) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let base = $groups.as_ptr().cast::<i8>();
            let ahead = std::mem::size_of_val($groups);
            let size = std::mem::size_of_val(&$groups[0]);
            for (b, (g, xb)) in $groups.iter().zip($x).enumerate() {
                prefetch_span(base, b * size + ahead, size);
                let mut dots = [_mm256_setzero_si256(); 4];
                for j in 0..4 {
                    let (low, high) = $levels(g, j);
                    let (a, b) = (2 * (j % 2), 2 * (j % 2) + 1);
                    dots[a] = $dot(dots[a], low, broadcast4(&xb.qs, 4 * j));
                    dots[b] = $dot(dots[b], high, broadcast4(&xb.qs, 16 + 4 * j));
                }
                let dots = _mm256_add_epi32(
                    _mm256_add_epi32(dots[0], dots[1]),
                    _mm256_add_epi32(dots[2], dots[3]),
                );
                let d = scales(&g.d);
                acc = _mm256_fmadd_ps(
                    _mm256_mul_ps(d, _mm256_set1_ps(xb.d)),
                    _mm256_cvtepi32_ps(dots),
                    acc,
                );
                acc_offset = _mm256_fmadd_ps($term(g, d), _mm256_set1_ps(xb.s), acc_offset);
            }
            let sums = $finish(acc, acc_offset);
            let out: &mut [f32; 8] = $out.try_into().expect("eight outputs");
            // SAFETY: `out` is eight floats, the 32 bytes the unaligned store writes.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sums) }
        }};
    }

    /// [`levels_group!`] for [`super::BATCH`] activation rows at once: the group's levels
    /// are unpacked once per block and meet every row.
    macro_rules! levels_group_batch {
        ($groups:ident, $xs:ident, $out:ident, $dot:expr, $levels:ident, $term:expr, $finish:expr) => {{
            const ROWS: usize = super::BATCH;
            let mut acc = [_mm256_setzero_ps(); ROWS];
            let mut acc_offset = [_mm256_setzero_ps(); ROWS];
            for (b, g) in $groups.iter().enumerate() {
                let mut low = [_mm256_setzero_si256(); 4];
                let mut high = [_mm256_setzero_si256(); 4];
                for j in 0..4 {
                    (low[j], high[j]) = $levels(g, j);
                }
                let d = scales(&g.d);
                let term = $term(g, d);
                for r in 0..ROWS {
                    let xb = &$xs[r][b];
                    let mut dots = [_mm256_setzero_si256(); 4];
                    for j in 0..4 {
                        let (a, b) = (2 * (j % 2), 2 * (j % 2) + 1);
                        dots[a] = $dot(dots[a], low[j], broadcast4(&xb.qs, 4 * j));
                        dots[b] = $dot(dots[b], high[j], broadcast4(&xb.qs, 16 + 4 * j));
                    }
                    let dots = _mm256_add_epi32(
                        _mm256_add_epi32(dots[0], dots[1]),
                        _mm256_add_epi32(dots[2], dots[3]),
                    );
                    let step = _mm256_mul_ps(d, _mm256_set1_ps(xb.d));
                    acc[r] = _mm256_fmadd_ps(step, _mm256_cvtepi32_ps(dots), acc[r]);
                    acc_offset[r] = _mm256_fmadd_ps(term, _mm256_set1_ps(xb.s), acc_offset[r]);
                }
            }
            for r in 0..ROWS {
                let sums = $finish(acc[r], acc_offset[r]);
                // SAFETY: `out[r]` is eight floats, the 32 bytes the unaligned store writes.
                unsafe { _mm256_storeu_ps($out[r].as_mut_ptr(), sums) }
            }
        }};
    }

    /// The four kernels of an unsigned-level format (see [`levels_group!`] for `$term` and
    /// `$finish`): one row and a batch of rows, AVX2 and VNNI.
    macro_rules! levels_kernels {
        ($g:ty, $levels:ident, $term:expr, $finish:expr, $avx2:ident, $vnni:ident, $batch_avx2:ident, $batch_vnni:ident) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn $avx2(groups: &[$g], x: &[BlockQ8], out: &mut [f32]) {
                levels_group!(
                    groups,
                    x,
                    out,
                    |acc, a, b| _mm256_add_epi32(acc, dot_u8_i8_avx2(a, b)),
                    $levels,
                    $term,
                    $finish
                );
            }

            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
            pub(super) unsafe fn $vnni(groups: &[$g], x: &[BlockQ8], out: &mut [f32]) {
                levels_group!(
                    groups,
                    x,
                    out,
                    |acc, a, b| _mm256_dpbusd_epi32(acc, a, b),
                    $levels,
                    $term,
                    $finish
                );
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn $batch_avx2(
                groups: &[$g],
                xs: [&[BlockQ8]; super::BATCH],
                out: &mut [[f32; 8]; super::BATCH],
            ) {
                levels_group_batch!(
                    groups,
                    xs,
                    out,
                    |acc, a, b| _mm256_add_epi32(acc, dot_u8_i8_avx2(a, b)),
                    $levels,
                    $term,
                    $finish
                );
            }

            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
            pub(super) unsafe fn $batch_vnni(
                groups: &[$g],
                xs: [&[BlockQ8]; super::BATCH],
                out: &mut [[f32; 8]; super::BATCH],
            ) {
                levels_group_batch!(
                    groups,
                    xs,
                    out,
                    |acc, a, b| _mm256_dpbusd_epi32(acc, a, b),
                    $levels,
                    $term,
                    $finish
                );
            }
        };
    }

    levels_kernels!(
        Q5_0x8,
        q5_0_levels,
        // Centred: the steps meet the activation sums, and the offset comes off.
        |_: &Q5_0x8, d: __m256| d,
        |acc: __m256, steps: __m256| _mm256_fnmadd_ps(_mm256_set1_ps(16.0), steps, acc),
        q5_0_group_avx2,
        q5_0_group_vnni,
        q5_0_group_batch_avx2,
        q5_0_group_batch_vnni
    );
    levels_kernels!(
        Q4_0x8,
        q4_0_levels,
        // Centred: the steps meet the activation sums, and the offset comes off.
        |_: &Q4_0x8, d: __m256| d,
        |acc: __m256, steps: __m256| _mm256_fnmadd_ps(_mm256_set1_ps(8.0), steps, acc),
        q4_0_group_avx2,
        q4_0_group_vnni,
        q4_0_group_batch_avx2,
        q4_0_group_batch_vnni
    );
    levels_kernels!(
        Q5_1x8,
        q5_1_levels,
        // Above a minimum: the minimums meet the activation sums, and are added.
        |g: &Q5_1x8, _: __m256| scales(&g.m),
        |acc: __m256, minimums: __m256| _mm256_add_ps(acc, minimums),
        q5_1_group_avx2,
        q5_1_group_vnni,
        q5_1_group_batch_avx2,
        q5_1_group_batch_vnni
    );

    /// Eight Q8_0 rows at once, as [`q4_1_group!`] without minimums; signed weights meet the
    /// unsigned-by-signed instructions through [`sign_folded`].
    macro_rules! q8_0_group {
        ($groups:ident, $x:ident, $out:ident, $dot:expr) => {{
            let mut acc = _mm256_setzero_ps();
            let base = $groups.as_ptr().cast::<i8>();
            let ahead = std::mem::size_of_val($groups);
            for (b, (g, xb)) in $groups.iter().zip($x).enumerate() {
                prefetch_span(base, b * std::mem::size_of::<Q8_0x8>() + ahead, 272);
                // Four independent sums, as in `q4_1_group!`.
                let mut dots = [_mm256_setzero_si256(); 4];
                for j in 0..8 {
                    let (w, a) = sign_folded(chunk(&g.qs, 32 * j), broadcast4(&xb.qs, 4 * j));
                    dots[j % 4] = $dot(dots[j % 4], w, a);
                }
                let dots = _mm256_add_epi32(
                    _mm256_add_epi32(dots[0], dots[1]),
                    _mm256_add_epi32(dots[2], dots[3]),
                );
                let step = _mm256_mul_ps(scales(&g.d), _mm256_set1_ps(xb.d));
                acc = _mm256_fmadd_ps(step, _mm256_cvtepi32_ps(dots), acc);
            }
            let out: &mut [f32; 8] = $out.try_into().expect("eight outputs");
            // SAFETY: `out` is eight floats, the 32 bytes the unaligned store writes.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), acc) }
        }};
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_0_group_avx2(groups: &[Q8_0x8], x: &[BlockQ8], out: &mut [f32]) {
        q8_0_group!(groups, x, out, |acc, a, b| _mm256_add_epi32(
            acc,
            dot_u8_i8_avx2(a, b)
        ));
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q8_0_group_vnni(groups: &[Q8_0x8], x: &[BlockQ8], out: &mut [f32]) {
        q8_0_group!(groups, x, out, |acc, a, b| _mm256_dpbusd_epi32(acc, a, b));
    }

    /// [`q4_1_group!`] for [`super::BATCH`] activation rows at once: the group's levels are
    /// unpacked once per block and meet every row; each row's sums take the same steps, in the
    /// same order, as the one-row kernel.
    macro_rules! q4_1_group_batch {
        ($groups:ident, $xs:ident, $out:ident, $dot:expr) => {{
            const ROWS: usize = super::BATCH;
            let mask = _mm256_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); ROWS];
            let mut acc_min = [_mm256_setzero_ps(); ROWS];
            for (b, g) in $groups.iter().enumerate() {
                let mut low = [_mm256_setzero_si256(); 4];
                let mut high = [_mm256_setzero_si256(); 4];
                for j in 0..4 {
                    let packed = chunk(&g.qs, 32 * j);
                    low[j] = _mm256_and_si256(packed, mask);
                    high[j] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
                }
                let (d, m) = (scales(&g.d), scales(&g.m));
                for r in 0..ROWS {
                    let xb = &$xs[r][b];
                    let mut dots = [_mm256_setzero_si256(); 4];
                    for j in 0..4 {
                        let (a, b) = (2 * (j % 2), 2 * (j % 2) + 1);
                        dots[a] = $dot(dots[a], low[j], broadcast4(&xb.qs, 4 * j));
                        dots[b] = $dot(dots[b], high[j], broadcast4(&xb.qs, 16 + 4 * j));
                    }
                    let dots = _mm256_add_epi32(
                        _mm256_add_epi32(dots[0], dots[1]),
                        _mm256_add_epi32(dots[2], dots[3]),
                    );
                    let step = _mm256_mul_ps(d, _mm256_set1_ps(xb.d));
                    acc[r] = _mm256_fmadd_ps(step, _mm256_cvtepi32_ps(dots), acc[r]);
                    acc_min[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xb.s), acc_min[r]);
                }
            }
            for r in 0..ROWS {
                // SAFETY: `out[r]` is eight floats, the 32 bytes the unaligned store writes.
                unsafe { _mm256_storeu_ps($out[r].as_mut_ptr(), _mm256_add_ps(acc[r], acc_min[r])) }
            }
        }};
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_1_group_batch_avx2(
        groups: &[Q4_1x8],
        xs: [&[BlockQ8]; super::BATCH],
        out: &mut [[f32; 8]; super::BATCH],
    ) {
        q4_1_group_batch!(groups, xs, out, |acc, a, b| _mm256_add_epi32(
            acc,
            dot_u8_i8_avx2(a, b)
        ));
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q4_1_group_batch_vnni(
        groups: &[Q4_1x8],
        xs: [&[BlockQ8]; super::BATCH],
        out: &mut [[f32; 8]; super::BATCH],
    ) {
        q4_1_group_batch!(groups, xs, out, |acc, a, b| _mm256_dpbusd_epi32(acc, a, b));
    }

    /// [`q8_0_group!`] for [`super::BATCH`] activation rows at once, as
    /// [`q4_1_group_batch!`], with the signs folded onto the activations (the VNNI level
    /// below offsets the weights instead).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_0_group_batch_avx2(
        groups: &[Q8_0x8],
        xs: [&[BlockQ8]; super::BATCH],
        out: &mut [[f32; 8]; super::BATCH],
    ) {
        const ROWS: usize = super::BATCH;
        let mut acc = [_mm256_setzero_ps(); ROWS];
        for (b, g) in groups.iter().enumerate() {
            let mut w = [_mm256_setzero_si256(); 8];
            for (j, w) in w.iter_mut().enumerate() {
                *w = chunk(&g.qs, 32 * j);
            }
            let d = scales(&g.d);
            for r in 0..ROWS {
                let xb = &xs[r][b];
                let mut dots = [_mm256_setzero_si256(); 4];
                for j in 0..8 {
                    let (w, a) = sign_folded(w[j], broadcast4(&xb.qs, 4 * j));
                    dots[j % 4] = _mm256_add_epi32(dots[j % 4], dot_u8_i8_avx2(w, a));
                }
                let dots = _mm256_add_epi32(
                    _mm256_add_epi32(dots[0], dots[1]),
                    _mm256_add_epi32(dots[2], dots[3]),
                );
                let step = _mm256_mul_ps(d, _mm256_set1_ps(xb.d));
                acc[r] = _mm256_fmadd_ps(step, _mm256_cvtepi32_ps(dots), acc[r]);
            }
        }
        for r in 0..ROWS {
            // SAFETY: `out[r]` is eight floats, the 32 bytes the unaligned store writes.
            unsafe { _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]) }
        }
    }

    /// The VNNI kernel takes signed weights as unsigned by adding 128 to each (one `xor` per
    /// 32 bytes, shared by the batch's rows) instead of moving signs onto the activations (one
    /// `sign` per multiply-add and row): `Σ (w + 128) a = Σ w a + 128 Σ a`, and `Σ a` is the
    /// activation block's sum, so the integer dot is exact as before. (AVX2's 16-bit pair sums
    /// could saturate on `255 × 127` pairs; that level keeps the sign folding.)
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q8_0_group_batch_vnni(
        groups: &[Q8_0x8],
        xs: [&[BlockQ8]; super::BATCH],
        sums: [&[i32]; super::BATCH],
        out: &mut [[f32; 8]; super::BATCH],
    ) {
        const ROWS: usize = super::BATCH;
        let flip = _mm256_set1_epi8(i8::MIN);
        let mut acc = [_mm256_setzero_ps(); ROWS];
        for (b, g) in groups.iter().enumerate() {
            let mut w = [_mm256_setzero_si256(); 8];
            for (j, w) in w.iter_mut().enumerate() {
                *w = _mm256_xor_si256(chunk(&g.qs, 32 * j), flip);
            }
            let d = scales(&g.d);
            for r in 0..ROWS {
                let xb = &xs[r][b];
                let mut dots = [_mm256_setzero_si256(); 4];
                for j in 0..8 {
                    dots[j % 4] = _mm256_dpbusd_epi32(dots[j % 4], w[j], broadcast4(&xb.qs, 4 * j));
                }
                let dots = _mm256_add_epi32(
                    _mm256_add_epi32(dots[0], dots[1]),
                    _mm256_add_epi32(dots[2], dots[3]),
                );
                let dots = _mm256_sub_epi32(dots, _mm256_set1_epi32(128 * sums[r][b]));
                let step = _mm256_mul_ps(d, _mm256_set1_ps(xb.d));
                acc[r] = _mm256_fmadd_ps(step, _mm256_cvtepi32_ps(dots), acc[r]);
            }
        }
        for r in 0..ROWS {
            // SAFETY: `out[r]` is eight floats, the 32 bytes the unaligned store writes.
            unsafe { _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]) }
        }
    }

    /// [`super::dense_rows_batch`] for `R` activation rows (`x` is `[R, cols]`, `w` whole
    /// rows of `cols`): the steps of [`f32_rows_avx2`] / [`f16_rows_avx2`] for each activation
    /// row, each eight weights loaded once for all `R`.
    ///
    /// # Safety
    /// avx2, fma and f16c are available; `x.len() == R * cols`, `w.len()` a multiple of `cols`,
    /// `out.len() >= (R - 1) * stride + w.len() / cols`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dense_rows_batch_avx2<T: super::DenseWeight, const R: usize>(
        w: &[T],
        x: &[f32],
        cols: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        let body = cols - cols % 32;
        let xp = x.as_ptr();
        for (r, row) in w.chunks_exact(cols).enumerate() {
            let wp = row.as_ptr();
            let mut acc = [[_mm256_setzero_ps(); 4]; R];
            for i in (0..body).step_by(32) {
                for k in 0..4 {
                    let at = i + 8 * k;
                    // SAFETY: `at + 8 <= body <= cols`: eight values of this row, and eight of
                    // each activation row `j < R` at `j * cols + at`.
                    let wv = unsafe { T::load8(wp.add(at)) };
                    for (j, a) in acc.iter_mut().enumerate() {
                        let xv = unsafe { _mm256_loadu_ps(xp.add(j * cols + at)) };
                        a[k] = _mm256_fmadd_ps(wv, xv, a[k]);
                    }
                }
            }
            for (j, a) in acc.iter().enumerate() {
                let sum = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
                let xj = &x[j * cols..(j + 1) * cols];
                let tail: f32 = row[body..]
                    .iter()
                    .zip(&xj[body..])
                    .map(|(w, x)| w.to_f32() * x)
                    .sum();
                out[j * stride + r] = hsum(sum) + tail;
            }
        }
    }

    /// Four accumulators of eight lanes: 32 products per pass keep the FMA units busy.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn f16_rows_avx2(w: &[f16], x: &[f32], out: &mut [f32]) {
        let n = x.len();
        let body = n - n % 32;
        let ahead = PREFETCH_ROWS * n * 2;
        for (row, o) in w.chunks_exact(n).zip(out.iter_mut()) {
            let base = row.as_ptr().cast::<i8>();
            let mut acc = [_mm256_setzero_ps(); 4];
            for i in (0..body).step_by(32) {
                prefetch(base, 2 * i + ahead); // 32 halves: one 64-byte line
                for (k, a) in acc.iter_mut().enumerate() {
                    let at = i + 8 * k;
                    let (wr, xr) = (&row[at..at + 8], &x[at..at + 8]);
                    // SAFETY: `wr` is 8 halves (16 bytes) and `xr` 8 floats (32 bytes), the
                    // widths the two unaligned loads read.
                    let (wv, xv) = unsafe {
                        (
                            _mm256_cvtph_ps(_mm_loadu_si128(wr.as_ptr().cast())),
                            _mm256_loadu_ps(xr.as_ptr()),
                        )
                    };
                    *a = _mm256_fmadd_ps(wv, xv, *a);
                }
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let tail: f32 = row[body..]
                .iter()
                .zip(&x[body..])
                .map(|(w, x)| w.to_f32() * x)
                .sum();
            *o = hsum(sum) + tail;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn f32_rows_avx2(w: &[f32], x: &[f32], out: &mut [f32]) {
        let n = x.len();
        let body = n - n % 32;
        let ahead = PREFETCH_ROWS * n * 4;
        for (row, o) in w.chunks_exact(n).zip(out.iter_mut()) {
            let base = row.as_ptr().cast::<i8>();
            let mut acc = [_mm256_setzero_ps(); 4];
            for i in (0..body).step_by(32) {
                // 32 floats: two 64-byte lines.
                prefetch(base, 4 * i + ahead);
                prefetch(base, 4 * i + ahead + 64);
                for (k, a) in acc.iter_mut().enumerate() {
                    let at = i + 8 * k;
                    let (wr, xr) = (&row[at..at + 8], &x[at..at + 8]);
                    // SAFETY: both slices are 8 floats, the width of the unaligned loads.
                    let (wv, xv) =
                        unsafe { (_mm256_loadu_ps(wr.as_ptr()), _mm256_loadu_ps(xr.as_ptr())) };
                    *a = _mm256_fmadd_ps(wv, xv, *a);
                }
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let tail: f32 = row[body..].iter().zip(&x[body..]).map(|(w, x)| w * x).sum();
            *o = hsum(sum) + tail;
        }
    }
}
