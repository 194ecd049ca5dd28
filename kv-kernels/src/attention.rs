//! Softmax attention of a block of query rows over one key head, on the host: the attention of
//! a prompt on a CPU backend.
//!
//! A prompt's attention is two products per query row with a softmax between them,
//! `o = softmax(s q Kᵀ) V`: the scores of the row against the keys it sees, then the weights
//! against the values, both through `gemm`, the softmax in vector registers with a polynomial
//! `exp` ([`crate::vector::exp`]). A tensor library's fused attention op on the CPU walks the
//! same rows with a scalar `exp`.
//!
//! Each query row sees one range of key slots (a causal prompt: the keys up to its own
//! position; a sliding window: the last `window` of those), and each row is computed over
//! exactly that range, never over keys it masks out. So a query's output does not depend on
//! which other queries share the call, bit for bit: a prompt cut into chunks (an engine's
//! chunked prefill) or blocks gives every position the numbers it gets in one piece. That
//! matters more than it seems: a model whose products round their activation rows to 8 bits
//! (Q4_1, Q8_0 weights) turns a last-bit difference in one layer into a different rounding,
//! and over 30 layers into logits that differ by tenths (measured on SmolLM2-135M: 0.5
//! between a prompt in one piece and in chunks of 16 when rows were blocked together, whose
//! sums over the union of their key ranges ran in a different order).
//!
//! What it costs: each row reads its keys and values itself (from cache: a head's keys for a
//! 512-token prompt are 128 KiB), instead of once per block of rows; one scores buffer of
//! `keys` floats per call, allocated by the caller and reused.

use std::ops::Range;

use crate::vector::exp_shifted;
use crate::Isa;

/// One key head's attention for a block of query rows.
///
/// Shapes (row-major, `d = head_dim`):
/// - `q`: `[rows, d]`; `k` and `v`: `[keys, d]`;
/// - `visible[r]`: the key slots row `r` sees, a non-empty range inside `0..keys`;
/// - `out`: row `r` at `out[r * out_stride..][..d]`, so the rows of one head can be written
///   straight into a `[seq, heads * d]` layout;
/// - `scores`: scratch, resized as needed.
///
/// Computes `out[r] = Σ_j p_rj v_j` over `j` in `visible[r]`, with `p_r = softmax(scale q_r kⱼᵀ)`.
///
/// # Panics
/// If a slice is shorter than its shape says, `visible` has not one range per query row, or a
/// range is empty or reaches past the keys.
///
/// ```
/// use kv_kernels::attention::attend;
///
/// // Two query rows over three keys (head_dim 2), causal: row 0 sees key 0, row 1 keys 0..2.
/// let q = [1.0, 0.0, 0.0, 1.0];
/// let k = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
/// let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
/// let mut out = [0.0; 4];
/// attend(kv_kernels::Isa::best(), &q, &k, &v, 2, &[0..1, 0..2], 1.0, &mut out, 2, &mut Vec::new());
/// assert_eq!(&out[..2], &[1.0, 2.0]); // one visible key: its value
/// let e = 1f32.exp();
/// let row1 = [(1.0 + 3.0 * e) / (1.0 + e), (2.0 + 4.0 * e) / (1.0 + e)];
/// assert!((out[2] - row1[0]).abs() < 1e-6 && (out[3] - row1[1]).abs() < 1e-6);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn attend(
    isa: Isa,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    head_dim: usize,
    visible: &[Range<usize>],
    scale: f32,
    out: &mut [f32],
    out_stride: usize,
    scores: &mut Vec<f32>,
) {
    assert!(
        visible.iter().all(|range| !range.is_empty()),
        "visible range empty in {visible:?}"
    );
    let rows = attend_partial(
        isa, q, k, v, head_dim, visible, scale, out, out_stride, scores,
    );
    for (r, row) in rows.into_iter().enumerate() {
        let inv = 1.0 / row.sum;
        out[r * out_stride..][..head_dim]
            .iter_mut()
            .for_each(|o| *o *= inv);
    }
}

/// What a query row's softmax needs besides its unnormalised output, over the keys one call
/// of [`attend_partial`] saw: the largest score and the sum of `exp(score - max)`. A row that
/// saw no key has `max = -inf` and `sum = 0`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowStats {
    /// Largest score.
    pub max: f32,
    /// Sum of `exp(score - max)`.
    pub sum: f32,
}

/// [`attend`] over a part of the keys, left unnormalised so that parts computed apart (on
/// different threads, over different key ranges) merge exactly ([`merge_parts`]): the
/// split-keys scheme of flash-decoding. Row `r` gets `Σ_j exp(s_rj - max_r) v_j` over `j` in
/// `visible[r]`, which may be empty here (then zeros), and its [`RowStats`].
///
/// # Panics
/// As [`attend`], but for empty ranges.
#[allow(clippy::too_many_arguments)]
pub fn attend_partial(
    isa: Isa,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    head_dim: usize,
    visible: &[Range<usize>],
    scale: f32,
    out: &mut [f32],
    out_stride: usize,
    scores: &mut Vec<f32>,
) -> Vec<RowStats> {
    let d = head_dim;
    let rows = visible.len();
    assert!(d > 0, "head_dim must be positive");
    assert_eq!(
        q.len(),
        rows * d,
        "q is [rows, head_dim]: one range per row"
    );
    assert_eq!(k.len(), v.len(), "k and v have the same shape");
    assert_eq!(k.len() % d, 0, "k is [keys, head_dim]");
    let keys = k.len() / d;
    if rows == 0 {
        return Vec::new();
    }
    assert!(out_stride >= d, "out rows hold head_dim values");
    assert!(
        out.len() >= (rows - 1) * out_stride + d,
        "out holds {rows} rows of stride {out_stride}"
    );
    for range in visible {
        assert!(
            range.start <= range.end && range.end <= keys,
            "visible range {range:?} of {keys} keys"
        );
    }
    // Each row over exactly the keys it sees, so that its result does not depend on which
    // other rows share the call (see the module docs).
    let mut stats = Vec::with_capacity(rows);
    for (r, range) in visible.iter().enumerate() {
        let out = &mut out[r * out_stride..][..d];
        if range.is_empty() {
            out.fill(0.0);
            stats.push(RowStats {
                max: f32::NEG_INFINITY,
                sum: 0.0,
            });
            continue;
        }
        let len = range.len();
        let (k, v) = (
            &k[range.start * d..range.end * d],
            &v[range.start * d..range.end * d],
        );
        let q = &q[r * d..(r + 1) * d];
        scores.clear();
        scores.resize(len, 0.0);
        // scores = scale · q kᵀ: `[1, len]`.
        // SAFETY: gemm reads the `1 x d` row `q` and the `d x len` matrix `kᵀ` (element
        // (i, j) at `k[j * d + i]`), both inside their slices (the asserts above keep the
        // range inside the keys), and writes the `1 x len` row `scores`, just sized to hold
        // it and borrowed mutably.
        unsafe {
            gemm::gemm(
                1,
                len,
                d,
                scores.as_mut_ptr(),
                1,
                len as isize,
                false,
                q.as_ptr(),
                1,
                d as isize,
                k.as_ptr(),
                d as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
        // Softmax weights, unnormalised (`exp(s - max)`).
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let sum = exp_shifted(isa, scores, max);
        stats.push(RowStats { max, sum });
        // out = weights · v: `[1, d]`.
        // SAFETY: gemm reads the `1 x len` row `scores` and the `len x d` matrix `v` (row
        // stride d), both inside their slices, and writes the `d` values of `out`, a slice
        // of exactly that length borrowed mutably.
        unsafe {
            gemm::gemm(
                1,
                d,
                len,
                out.as_mut_ptr(),
                1,
                d as isize,
                false,
                scores.as_ptr(),
                1,
                len as isize,
                v.as_ptr(),
                1,
                d as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    }
    stats
}

/// Merges parts of one row's attention computed over disjoint key ranges by
/// [`attend_partial`], each an unnormalised output `[head_dim]` with its [`RowStats`], into
/// the normalised output `out`: `Σ_p e^(max_p - M) out_p / Σ_p e^(max_p - M) sum_p` with `M`
/// the largest `max_p`. At least one part must have seen a key.
///
/// ```
/// use kv_kernels::attention::{merge_parts, RowStats};
///
/// // Two keys with equal scores seen by two parts: the mean of their values.
/// let one = RowStats { max: 0.5, sum: 1.0 };
/// let mut out = [0.0; 2];
/// merge_parts(&[(&[1.0, 2.0][..], one), (&[3.0, 4.0][..], one)], &mut out);
/// assert_eq!(out, [2.0, 3.0]);
/// ```
pub fn merge_parts(parts: &[(&[f32], RowStats)], out: &mut [f32]) {
    let top = parts
        .iter()
        .map(|(_, s)| s.max)
        .fold(f32::NEG_INFINITY, f32::max);
    assert!(top.is_finite(), "no part saw a key");
    out.fill(0.0);
    let mut total = 0.0;
    for (values, stats) in parts.iter().filter(|(_, s)| s.sum > 0.0) {
        let weight = (stats.max - top).exp();
        total += weight * stats.sum;
        for (o, x) in out.iter_mut().zip(values.iter()) {
            *o += weight * x;
        }
    }
    let inv = 1.0 / total;
    out.iter_mut().for_each(|o| *o *= inv);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The definition in f64: softmax over each row's visible keys, weights times values.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: usize,
        visible: &[Range<usize>],
        scale: f32,
    ) -> Vec<f32> {
        let mut out = Vec::new();
        for (r, range) in visible.iter().enumerate() {
            let qr = &q[r * d..][..d];
            let scores: Vec<f64> = range
                .clone()
                .map(|j| {
                    let kj = &k[j * d..][..d];
                    scale as f64
                        * qr.iter()
                            .zip(kj)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for c in 0..d {
                let value: f64 = range
                    .clone()
                    .zip(&weights)
                    .map(|(j, w)| w * v[j * d + c] as f64)
                    .sum();
                out.push((value / total) as f32);
            }
        }
        out
    }

    /// Deterministic values in [-2, 2).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Causal and sliding-window blocks, at any offset into the keys, with the output
        /// written at a stride: equal to the definition at every level.
        #[test]
        fn a_block_equals_the_definition(
            rows in 1usize..40,
            past in 0usize..50,
            d in prop::sample::select(vec![1usize, 8, 17, 64]),
            window in prop::option::of(1usize..30),
            seed in 0u64..1000,
        ) {
            let keys = past + rows;
            let visible: Vec<Range<usize>> = (0..rows)
                .map(|r| {
                    let end = past + r + 1;
                    end.saturating_sub(window.unwrap_or(end))..end
                })
                .collect();
            let q = values(rows * d, seed);
            let k = values(keys * d, seed + 1);
            let v = values(keys * d, seed + 2);
            let scale = 1.0 / (d as f32).sqrt();
            let expected = reference(&q, &k, &v, d, &visible, scale);
            let stride = d + 3;
            for isa in Isa::available() {
                let mut out = vec![f32::NAN; (rows - 1) * stride + d];
                attend(isa, &q, &k, &v, d, &visible, scale, &mut out, stride, &mut Vec::new());
                for r in 0..rows {
                    for c in 0..d {
                        let (got, want) = (out[r * stride + c], expected[r * d + c]);
                        prop_assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{isa}: row {r}, column {c}: {got} against {want}"
                        );
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Causal rows cut into key ranges (some rows seeing nothing in a range), each range
        /// attended apart and merged: equal to attending over all the keys at once.
        #[test]
        fn parts_over_key_ranges_merge_into_the_whole(
            rows in 1usize..6,
            past in 0usize..40,
            cuts in prop::collection::vec(0.0f64..1.0, 0..4),
            seed in 0u64..1000,
        ) {
            let d = 8;
            let keys = past + rows;
            let visible: Vec<Range<usize>> = (0..rows).map(|r| 0..past + r + 1).collect();
            let (q, k, v) = (values(rows * d, seed), values(keys * d, seed + 1), values(keys * d, seed + 2));
            let mut whole = vec![0.0; rows * d];
            attend(Isa::best(), &q, &k, &v, d, &visible, 0.3, &mut whole, d, &mut Vec::new());
            let mut bounds: Vec<usize> = cuts.iter().map(|c| (c * keys as f64) as usize).collect();
            bounds.extend([0, keys]);
            bounds.sort();
            let parts: Vec<(Vec<f32>, Vec<RowStats>)> = bounds
                .windows(2)
                .map(|w| {
                    let part: Vec<Range<usize>> = visible
                        .iter()
                        .map(|r| r.start.max(w[0])..r.end.min(w[1]).max(w[0]))
                        .collect();
                    let mut out = vec![f32::NAN; rows * d];
                    let stats = attend_partial(Isa::best(), &q, &k, &v, d, &part, 0.3, &mut out, d, &mut Vec::new());
                    (out, stats)
                })
                .collect();
            for r in 0..rows {
                let row: Vec<(&[f32], RowStats)> =
                    parts.iter().map(|(out, stats)| (&out[r * d..][..d], stats[r])).collect();
                let mut merged = vec![0.0; d];
                merge_parts(&row, &mut merged);
                for (got, want) in merged.iter().zip(&whole[r * d..][..d]) {
                    prop_assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{got} against {want}");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "visible range")]
    fn a_range_past_the_keys_is_refused() {
        let q = [0.0; 2];
        let k = [0.0; 4];
        let past_the_keys = [Range { start: 0, end: 3 }];
        attend(
            Isa::Scalar,
            &q,
            &k,
            &k,
            2,
            &past_the_keys,
            1.0,
            &mut [0.0; 2],
            2,
            &mut Vec::new(),
        );
    }
}
