//! Softmax attention of a block of query rows over one key head, on the host: the attention of
//! a prompt on a CPU backend.
//!
//! A prompt's attention is two products per query row with a softmax between them,
//! `o = softmax(s q Kᵀ) V`: the scores of the row against the keys it sees, then the weights
//! against the values, both in vector registers (AVX2, or AVX-512 where the CPU has it), as is
//! the softmax with a polynomial `exp` ([`crate::vector::exp`]). A tensor library's fused
//! attention op on the CPU walks the same rows with a scalar `exp`.
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
//! Rows still share loads where their numbers allow it: four rows at a time read each key and
//! value they all see once (a causal prompt's neighbouring rows see the same keys but their
//! last few), computing every score and output channel exactly as one row alone would. No
//! single matrix product covers a block, so the keys and values are read once per four rows
//! (from L2: a head's keys for a 512-token prompt are 128 KiB), not once per block. Scratch:
//! the scores of four rows, in a buffer the caller allocates and reuses.
//!
//! Keys need not be contiguous: [`HeadKeys::blocks`] reads a sequence's keys through its block
//! table, where a paged pool stores them (vLLM's paged attention), with no copy. A row's
//! scores are computed key by key and its output channels add their keys in order, so keys
//! that come in several pieces give the bits one contiguous piece gives.

use std::ops::Range;

use crate::vector::exp_shifted;
use crate::Isa;

/// Attention-logit soft-capping (Gemma 2's `attn_logit_softcapping`): each scaled score `s`
/// becomes `cap · tanh(s / cap)`, squashed into `(-cap, cap)` before the softmax. Scores well
/// inside the cap barely move; the largest ones can no longer swamp the rest.
///
/// ```
/// use kv_kernels::attention::SoftCap;
///
/// let cap = SoftCap::new(50.0).unwrap();
/// assert!((cap.apply(1.0) - 1.0).abs() < 1e-3);
/// assert!(cap.apply(1e6) <= 50.0);
/// assert_eq!(SoftCap::new(0.0), None); // a cap must be positive and finite
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoftCap(f32);

impl SoftCap {
    /// A cap of `cap`, if it is positive and finite.
    pub fn new(cap: f32) -> Option<Self> {
        (cap.is_finite() && cap > 0.0).then_some(Self(cap))
    }

    /// The cap.
    pub fn get(self) -> f32 {
        self.0
    }

    /// `cap · tanh(s / cap)`, in f32 as transformers computes it (divide, tanh, multiply).
    pub fn apply(self, s: f32) -> f32 {
        (s / self.0).tanh() * self.0
    }

    /// [`SoftCap::apply`] on every score of `scores`, to within a few units of `cap · 2⁻²³`
    /// (six millionths of a score at Gemma 2's cap of 50). `tanh(y) = (1 - e) / (1 + e)` with
    /// `e = exp(-2|y|)`, the sign put back, the exponentials through the vector `exp` of a
    /// softmax row ([`exp_shifted`]), 64 scores at a time. With the C library's scalar `tanh`
    /// a 512-token prompt's attention (head_dim 256) took 1.47x its time without the cap;
    /// this way 1.09x (`cargo bench -p kv-kernels --bench attention`).
    pub fn apply_all(self, isa: Isa, scores: &mut [f32]) {
        let cap = self.0;
        let mut e = [0.0f32; 64];
        for chunk in scores.chunks_mut(64) {
            let e = &mut e[..chunk.len()];
            for (e, s) in e.iter_mut().zip(chunk.iter()) {
                *e = -2.0 * (s / cap).abs();
            }
            exp_shifted(isa, e, 0.0);
            for (s, e) in chunk.iter_mut().zip(e.iter()) {
                let t = (1.0 - e) / (1.0 + e);
                *s = cap * t.copysign(*s);
            }
        }
    }
}

/// How a query row's dot products with its keys become the scores its softmax takes:
/// `scale · q·k`, then soft-capped where `cap` is set. An `f32` converts to a plain scale.
///
/// ```
/// use kv_kernels::attention::{Logits, SoftCap};
///
/// let plain: Logits = 0.125.into();
/// assert_eq!(plain, Logits { scale: 0.125, cap: None });
/// let gemma2 = Logits { scale: 0.0625, cap: SoftCap::new(50.0) };
/// assert_eq!(gemma2.score(16.0), SoftCap::new(50.0).unwrap().apply(1.0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Logits {
    /// Factor on every dot product (usually `head_dim^-1/2`).
    pub scale: f32,
    /// Soft-capping after the scale, if any.
    pub cap: Option<SoftCap>,
}

impl Logits {
    /// The score of one dot product `dot`.
    pub fn score(self, dot: f32) -> f32 {
        let s = self.scale * dot;
        self.cap.map_or(s, |cap| cap.apply(s))
    }

    /// Caps `scores` already scaled, where a cap is set.
    fn cap_all(self, isa: Isa, scores: &mut [f32]) {
        if let Some(cap) = self.cap {
            cap.apply_all(isa, scores);
        }
    }
}

impl From<f32> for Logits {
    fn from(scale: f32) -> Self {
        Self { scale, cap: None }
    }
}

/// One key head's attention for a block of query rows.
///
/// Shapes (row-major, `d = head_dim`):
/// - `q`: `[rows, d]`; `k` and `v`: `[keys, d]`;
/// - `visible[r]`: the key slots row `r` sees, a non-empty range inside `0..keys`;
/// - `out`: row `r` at `out[r * out_stride..][..d]`, so the rows of one head can be written
///   straight into a `[seq, heads * d]` layout;
/// - `scores`: scratch, resized as needed.
///
/// Computes `out[r] = Σ_j p_rj v_j` over `j` in `visible[r]`, with `p_r = softmax(s_r)` and
/// `s_rj` the [`Logits`] of `q_r kⱼᵀ` (`scale q_r kⱼᵀ`, soft-capped where a cap is set).
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
    logits: impl Into<Logits>,
    out: &mut [f32],
    out_stride: usize,
    scores: &mut Vec<f32>,
) {
    let keys = HeadKeys::contiguous(k, v, head_dim);
    attend_keys(isa, q, keys, visible, logits, out, out_stride, scores);
}

/// [`attend`] over keys wherever they are stored ([`HeadKeys`]): `visible[r]` names key
/// indices `0..keys.len()` of the sequence, whatever slots hold them.
///
/// ```
/// use kv_kernels::attention::{attend, attend_keys, HeadKeys};
/// use kv_kernels::Isa;
///
/// // Three keys of head_dim 2 in a pool of three blocks of 2 slots: the sequence holds
/// // blocks 2 and 0, so its keys sit in slots 4, 5 and 0 (slots 1 to 3 belong to others).
/// let k = [1.0, 1.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 1.0, 0.0, 0.0, 1.0];
/// let v = [3.0, 4.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 5.0, 6.0, 1.0, 2.0];
/// let keys = HeadKeys::blocks(&k, &v, 2, 2, &[2, 0]);
/// let (mut paged, mut dense) = ([0.0; 2], [0.0; 2]);
/// let q = [0.5, 1.0];
/// attend_keys(Isa::best(), &q, keys, &[0..3], 1.0, &mut paged, 2, &mut Vec::new());
/// // The same keys laid out one after another.
/// let (k3, v3) = ([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], [5.0, 6.0, 1.0, 2.0, 3.0, 4.0]);
/// attend(Isa::best(), &q, &k3, &v3, 2, &[0..3], 1.0, &mut dense, 2, &mut Vec::new());
/// assert_eq!(paged, dense);
/// ```
///
/// # Panics
/// As [`attend`].
#[allow(clippy::too_many_arguments)]
pub fn attend_keys(
    isa: Isa,
    q: &[f32],
    keys: HeadKeys<'_>,
    visible: &[Range<usize>],
    logits: impl Into<Logits>,
    out: &mut [f32],
    out_stride: usize,
    scores: &mut Vec<f32>,
) {
    assert!(
        visible.iter().all(|range| !range.is_empty()),
        "visible range empty in {visible:?}"
    );
    let head_dim = keys.d;
    let rows = attend_keys_partial(isa, q, keys, visible, logits, out, out_stride, scores);
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
    logits: impl Into<Logits>,
    out: &mut [f32],
    out_stride: usize,
    scores: &mut Vec<f32>,
) -> Vec<RowStats> {
    assert!(head_dim > 0, "head_dim must be positive");
    assert_eq!(k.len() % head_dim, 0, "k is [keys, head_dim]");
    let keys = HeadKeys::contiguous(k, v, head_dim);
    attend_keys_partial(isa, q, keys, visible, logits, out, out_stride, scores)
}

/// [`attend_partial`] over keys wherever they are stored ([`HeadKeys`]).
///
/// # Panics
/// As [`attend_partial`].
#[allow(clippy::too_many_arguments)]
pub fn attend_keys_partial(
    isa: Isa,
    q: &[f32],
    keys: HeadKeys<'_>,
    visible: &[Range<usize>],
    logits: impl Into<Logits>,
    out: &mut [f32],
    out_stride: usize,
    scores: &mut Vec<f32>,
) -> Vec<RowStats> {
    let logits = logits.into();
    let d = keys.d;
    let rows = visible.len();
    assert!(d > 0, "head_dim must be positive");
    assert_eq!(
        q.len(),
        rows * d,
        "q is [rows, head_dim]: one range per row"
    );
    let len = keys.len();
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
            range.start <= range.end && range.end <= len,
            "visible range {range:?} of {len} keys"
        );
    }
    // Each row over exactly the keys it sees, in an order no other row changes, so that its
    // result does not depend on which other rows share the call (see the module docs). Rows
    // go four at a time where they share keys: the shared keys are read once for the four.
    let mut stats = Vec::with_capacity(rows);
    let mut outs = out.chunks_mut(out_stride).map(|row| &mut row[..d]);
    let mut r = 0;
    while r < rows {
        let group = &visible[r..rows.min(r + GROUP_ROWS)];
        if let Some(shared) = shared_keys(group) {
            let q: [&[f32]; GROUP_ROWS] = std::array::from_fn(|i| &q[(r + i) * d..][..d]);
            let group: &[Range<usize>; GROUP_ROWS] = group.try_into().expect("a full group");
            let out = std::array::from_fn(|_| outs.next().expect("one output row per query"));
            stats.extend(attend_group(
                isa, q, keys, group, shared, logits, out, scores,
            ));
            r += GROUP_ROWS;
        } else {
            let out = outs.next().expect("one output row per query");
            let q = &q[r * d..(r + 1) * d];
            stats.push(attend_row(
                isa,
                q,
                keys,
                visible[r].clone(),
                logits,
                out,
                scores,
            ));
            r += 1;
        }
    }
    stats
}

/// Query rows attended together where they share keys ([`attend_group`]).
const GROUP_ROWS: usize = 4;

/// How a pool stores its key or value rows (`[rows, head_dim]`): as `f32`s, as `f16`s, or as
/// 8-bit integers with one scale per row (`x = q * scale`, the scale the row's largest
/// magnitude over 127). Attention widens a narrow run of rows to `f32` just before it reads it,
/// one block at a time, so a narrow pool is never widened whole.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    /// `f32` values.
    F32(&'a [f32]),
    /// `f16` values.
    F16(&'a [half::f16]),
    /// Symmetric 8-bit values and each row's scale.
    Int8 {
        /// The values, row after row.
        q: &'a [i8],
        /// One scale per row.
        scales: &'a [f32],
    },
}

impl<'a> Rows<'a> {
    /// Values held (rows times `head_dim`).
    fn values(&self) -> usize {
        match self {
            Rows::F32(x) => x.len(),
            Rows::F16(x) => x.len(),
            Rows::Int8 { q, .. } => q.len(),
        }
    }

    /// Rows `rows` (of `d` values) as `f32`s: a slice of the pool when it holds `f32`s, else
    /// widened into `scratch`.
    fn widen<'s>(&self, rows: Range<usize>, d: usize, scratch: &'s mut Vec<f32>) -> &'s [f32]
    where
        'a: 's,
    {
        let span = rows.start * d..rows.end * d;
        match *self {
            Rows::F32(x) => &x[span],
            Rows::F16(x) => {
                scratch.clear();
                scratch.resize(span.len(), 0.0);
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(&x[span], scratch);
                scratch
            }
            Rows::Int8 { q, scales } => {
                scratch.clear();
                for (row, &scale) in rows.clone().zip(&scales[rows]) {
                    let values = &q[row * d..(row + 1) * d];
                    scratch.extend(values.iter().map(|&v| v as f32 * scale));
                }
                scratch
            }
        }
    }
}

/// Which of a key head's two stores a pass reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Keys,
    Values,
}

/// One key head's keys and values where they are stored: `[keys, head_dim]` one after
/// another, or slots of a paged pool read through a sequence's block table; as `f32`s or
/// narrower ([`Rows`]).
#[derive(Debug, Clone, Copy)]
pub struct HeadKeys<'a> {
    k: Rows<'a>,
    v: Rows<'a>,
    d: usize,
    /// `None` for contiguous keys; else `(block_size, blocks)`: key `j` is in slot
    /// `j % block_size` of block `blocks[j / block_size]`.
    table: Option<(usize, &'a [usize])>,
}

impl<'a> HeadKeys<'a> {
    /// Keys `k` and values `v`, `[keys, head_dim]` each, key `j` in row `j`.
    ///
    /// # Panics
    /// If `head_dim` is 0, or `k` and `v` differ in length or are not whole rows.
    pub fn contiguous(k: &'a [f32], v: &'a [f32], head_dim: usize) -> Self {
        Self::stored(Rows::F32(k), Rows::F32(v), head_dim)
    }

    /// Keys and values stored as `k` and `v` ([`Rows`]), `[keys, head_dim]` each.
    ///
    /// # Panics
    /// As [`HeadKeys::contiguous`], and if an 8-bit store has not one scale per row.
    pub fn stored(k: Rows<'a>, v: Rows<'a>, head_dim: usize) -> Self {
        assert!(head_dim > 0, "head_dim must be positive");
        assert_eq!(k.values(), v.values(), "k and v have the same shape");
        assert_eq!(k.values() % head_dim, 0, "k is [keys, head_dim]");
        for rows in [k, v] {
            if let Rows::Int8 { q, scales } = rows {
                assert_eq!(q.len(), scales.len() * head_dim, "one scale per row");
            }
        }
        Self {
            k,
            v,
            d: head_dim,
            table: None,
        }
    }

    /// A sequence's keys in a pool of blocks of `block_size` slots, `k` and `v` being the
    /// pool's `[slots, head_dim]` for one head: key `j` is in slot `j % block_size` of block
    /// `blocks[j / block_size]` (the sequence's block table), so `blocks.len() * block_size`
    /// keys may be named.
    ///
    /// # Panics
    /// As [`HeadKeys::contiguous`], and if `block_size` is 0 or a block lies past the pool.
    pub fn blocks(
        k: &'a [f32],
        v: &'a [f32],
        head_dim: usize,
        block_size: usize,
        blocks: &'a [usize],
    ) -> Self {
        Self::stored(Rows::F32(k), Rows::F32(v), head_dim).through(block_size, blocks)
    }

    /// These keys read through a block table (see [`HeadKeys::blocks`]).
    ///
    /// # Panics
    /// If `block_size` is 0 or a block lies past the pool.
    pub fn through(self, block_size: usize, blocks: &'a [usize]) -> Self {
        assert!(block_size > 0, "a block holds at least one slot");
        let slots = self.k.values() / self.d;
        assert!(
            blocks.iter().all(|&b| (b + 1) * block_size <= slots),
            "a block of {blocks:?} lies past the pool's {slots} slots"
        );
        Self {
            table: Some((block_size, blocks)),
            ..self
        }
    }

    /// Keys that may be named.
    pub fn len(&self) -> usize {
        match self.table {
            None => self.k.values() / self.d,
            Some((size, blocks)) => size * blocks.len(),
        }
    }

    /// Whether no key may be named.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `f(rows)` over keys `range` (or their values) as runs of contiguous `f32` rows, in key
    /// order: one run for contiguous keys, one per block touched otherwise. A narrow store's
    /// run is widened into a scratch buffer first.
    fn each_run(self, side: Side, range: Range<usize>, mut f: impl FnMut(&[f32])) {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let rows = match side {
            Side::Keys => self.k,
            Side::Values => self.v,
        };
        // Contiguous keys are one block as long as the range, the first of the pool.
        const FIRST: &[usize] = &[0];
        let (size, blocks) = self.table.unwrap_or((range.end.max(1), FIRST));
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut at = range.start;
            while at < range.end {
                let (block, slot) = (at / size, at % size);
                let n = (size - slot).min(range.end - at);
                let first = blocks[block] * size + slot;
                f(rows.widen(first..first + n, self.d, &mut scratch));
                at += n;
            }
        });
    }
}

/// `f(rows, weights)` over the runs of `keys` (or their values) in `range`, `weights` the
/// matching stretch of `per_key` (one value per key of `range`).
fn for_runs<'w>(
    keys: HeadKeys<'_>,
    side: Side,
    range: Range<usize>,
    per_key: &'w mut [f32],
    mut f: impl FnMut(&[f32], &'w mut [f32]),
) {
    let d = keys.d;
    let mut rest = per_key;
    keys.each_run(side, range, |rows| {
        let (here, tail) = std::mem::take(&mut rest).split_at_mut(rows.len() / d);
        f(rows, here);
        rest = tail;
    });
}

/// The keys every row of a full group sees, if there are any (then no row's range is empty).
fn shared_keys(group: &[Range<usize>]) -> Option<Range<usize>> {
    let start = group.iter().map(|r| r.start).max()?;
    let end = group.iter().map(|r| r.end).min()?;
    (group.len() == GROUP_ROWS && start < end).then_some(start..end)
}

/// One query row over its keys `range` (unnormalised output into `out`).
fn attend_row(
    isa: Isa,
    q: &[f32],
    keys: HeadKeys<'_>,
    range: Range<usize>,
    logits: Logits,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) -> RowStats {
    let scale = logits.scale;
    out.fill(0.0);
    if range.is_empty() {
        return RowStats {
            max: f32::NEG_INFINITY,
            sum: 0.0,
        };
    }
    scores.clear();
    scores.resize(range.len(), 0.0);
    // scores = scale · q kᵀ: `[len]`.
    for_runs(keys, Side::Keys, range.clone(), &mut scores[..], |k, s| {
        row_scores(isa, q, k, scale, s)
    });
    logits.cap_all(isa, scores);
    // Softmax weights, unnormalised (`exp(s - max)`).
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let sum = exp_shifted(isa, scores, max);
    // out = weights · v: `[d]`.
    for_runs(keys, Side::Values, range, &mut scores[..], |v, w| {
        add_weighted(isa, w, v, out)
    });
    RowStats { max, sum }
}

/// [`attend_row`] for four rows whose key ranges all hold `shared`: each row's keys before
/// and after `shared` go through the one-row kernels, the shared ones through the four-row
/// kernels, which give each row the same bits (every score and every output channel is
/// computed from its own row's numbers, in the same order).
#[allow(clippy::too_many_arguments)]
fn attend_group(
    isa: Isa,
    q: [&[f32]; GROUP_ROWS],
    keys: HeadKeys<'_>,
    ranges: &[Range<usize>; GROUP_ROWS],
    shared: Range<usize>,
    logits: Logits,
    mut out: [&mut [f32]; GROUP_ROWS],
    scores: &mut Vec<f32>,
) -> [RowStats; GROUP_ROWS] {
    let scale = logits.scale;
    scores.clear();
    scores.resize(ranges.iter().map(|r| r.len()).sum(), 0.0);
    let mut weights: [&mut [f32]; GROUP_ROWS] = {
        let mut rest = &mut scores[..];
        std::array::from_fn(|i| {
            let (row, tail) = std::mem::take(&mut rest).split_at_mut(ranges[i].len());
            rest = tail;
            row
        })
    };
    // Where the shared keys sit in each row's scores.
    let inner = |i: usize| shared.start - ranges[i].start..shared.end - ranges[i].start;
    for i in 0..GROUP_ROWS {
        let (before, after) = (ranges[i].start..shared.start, shared.end..ranges[i].end);
        let (w, inner) = (&mut *weights[i], inner(i));
        let (w, rest) = w.split_at_mut(inner.end);
        for_runs(keys, Side::Keys, before, &mut w[..inner.start], |k, s| {
            row_scores(isa, q[i], k, scale, s)
        });
        for_runs(keys, Side::Keys, after, rest, |k, s| {
            row_scores(isa, q[i], k, scale, s)
        });
    }
    // The shared keys, run by run, four rows at once.
    let mut offset = 0;
    keys.each_run(Side::Keys, shared.clone(), |k| {
        let n = k.len() / keys.d;
        let mut parts = weights.iter_mut().enumerate().map(|(i, w)| {
            let at = inner(i).start + offset;
            &mut w[at..at + n]
        });
        let parts = std::array::from_fn(|_| parts.next().expect("four rows"));
        group_scores(isa, q, k, scale, parts);
        offset += n;
    });
    let stats = weights.each_mut().map(|w| {
        logits.cap_all(isa, w);
        let max = w.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let sum = exp_shifted(isa, w, max);
        RowStats { max, sum }
    });
    // Each row's channels sum its keys in order: those before the shared ones, the shared
    // ones (four rows at once), then those after.
    for i in 0..GROUP_ROWS {
        out[i].fill(0.0);
        let before = ranges[i].start..shared.start;
        let o = &mut *out[i];
        for_runs(
            keys,
            Side::Values,
            before,
            &mut weights[i][..inner(i).start],
            |v, w| add_weighted(isa, w, v, o),
        );
    }
    let mut offset = 0;
    keys.each_run(Side::Values, shared.clone(), |v| {
        let n = v.len() / keys.d;
        let parts: [&[f32]; GROUP_ROWS] = std::array::from_fn(|i| {
            let at = inner(i).start + offset;
            &weights[i][at..at + n]
        });
        group_add_weighted(isa, parts, v, out.each_mut().map(|o| &mut **o));
        offset += n;
    });
    for i in 0..GROUP_ROWS {
        let after = shared.end..ranges[i].end;
        let o = &mut *out[i];
        for_runs(
            keys,
            Side::Values,
            after,
            &mut weights[i][inner(i).end..],
            |v, w| add_weighted(isa, w, v, o),
        );
    }
    stats
}

/// Runs the AVX-512 or the AVX2 version of a kernel where `isa` asks for it and the CPU has
/// it, else the scalar `$scalar` (the reference the tests compare with).
macro_rules! by_level {
    ($isa:expr, $avx512:ident, $avx2:ident, ($($arg:expr),*), $scalar:block) => {
        match $isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni if Isa::Avx512Vnni.is_available() => {
                // SAFETY: the level's instructions (AVX-512F, AVX2, FMA) were detected here.
                unsafe { x86::$avx512($($arg),*) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512Vnni if Isa::Avx2.is_available() => {
                // SAFETY: AVX2 and FMA were detected on this CPU.
                unsafe { x86::$avx2($($arg),*) }
            }
            _ => $scalar,
        }
    };
}

/// `scores[j] = scale · (q · k_j)` for the `scores.len()` keys `k` (`[keys, d]`, `d = q.len()`).
///
/// Every level computes a score from its own query and key only, in one fixed order (AVX2:
/// eight partial sums over `d`, lane `l` taking dimensions `l, l + 8, ...`, added as `((s0 +
/// s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))`, then the dimensions past the last multiple of
/// eight in turn; AVX-512: sixteen partial sums, lane `l` first added to lane `l + 8`), so a
/// score does not depend on which keys share its pass.
fn row_scores(isa: Isa, q: &[f32], k: &[f32], scale: f32, scores: &mut [f32]) {
    debug_assert_eq!(k.len(), scores.len() * q.len());
    by_level!(
        isa,
        row_scores_avx512,
        row_scores_avx2,
        (q, k, scale, scores),
        {
            for (s, k) in scores.iter_mut().zip(k.chunks_exact(q.len())) {
                *s = scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>();
            }
        }
    )
}

/// `out += Σ_j weights[j] · v_j` for the `weights.len()` values `v` (`[keys, d]`, `d =
/// out.len()`): every output channel adds its products to what it holds in key order (the
/// vector level: one fused multiply-add per key), so a row's keys may come in several calls.
fn add_weighted(isa: Isa, weights: &[f32], v: &[f32], out: &mut [f32]) {
    debug_assert_eq!(v.len(), weights.len() * out.len());
    by_level!(
        isa,
        add_weighted_avx512,
        add_weighted_avx2,
        (weights, v, out),
        {
            for (w, v) in weights.iter().zip(v.chunks_exact(out.len())) {
                for (o, x) in out.iter_mut().zip(v) {
                    *o += w * x;
                }
            }
        }
    )
}

/// [`row_scores`] for four query rows over the same keys: the same scores, each key read once.
fn group_scores(
    isa: Isa,
    q: [&[f32]; GROUP_ROWS],
    k: &[f32],
    scale: f32,
    scores: [&mut [f32]; GROUP_ROWS],
) {
    by_level!(
        isa,
        group_scores_avx512,
        group_scores_avx2,
        (q, k, scale, scores),
        {
            for (q, s) in q.into_iter().zip(scores) {
                row_scores(isa, q, k, scale, s);
            }
        }
    )
}

/// [`add_weighted`] for four rows' weights over the same values: the same sums, each value
/// read once.
fn group_add_weighted(
    isa: Isa,
    weights: [&[f32]; GROUP_ROWS],
    v: &[f32],
    out: [&mut [f32]; GROUP_ROWS],
) {
    by_level!(
        isa,
        group_add_weighted_avx512,
        group_add_weighted_avx2,
        (weights, v, out),
        {
            for (w, o) in weights.into_iter().zip(out) {
                add_weighted(isa, w, v, o);
            }
        }
    )
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The two products of a query row on AVX2 vectors, and on AVX-512 vectors for the
    //! [`Isa::Avx512Vnni`](crate::Isa::Avx512Vnni) level. They replace one `gemm` call per row
    //! and product: `gemm` is built for matrices, and for a single row its dispatch and
    //! packing cost as much as the arithmetic (measured on SmolLM2-135M's 512-token prompt:
    //! attention was 31% of the prompt's time). A block of rows cannot share one `gemm` call
    //! instead: each row must see exactly its own keys, summed in an order no other row changes
    //! (see the module docs). Memory is read through bounds-checked slices; each unaligned
    //! load's comment says why it stays inside its slice.

    use std::arch::x86_64::*;

    /// The eight lanes' sum as [`reduce8`] adds each vector: `((l0 + l1) + (l2 + l3)) + ((l4
    /// + l5) + (l6 + l7))`.
    fn tree(l: [f32; 8]) -> f32 {
        ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
    }

    /// Sixteen lanes as [`reduce8_512`] adds them: lane `l` plus lane `l + 8`, then [`tree`].
    fn tree16(l: [f32; 16]) -> f32 {
        tree(std::array::from_fn(|i| l[i] + l[i + 8]))
    }

    /// Lane `t` of the result is [`tree`] of vector `t`'s lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn reduce8(v: [__m256; 8]) -> __m256 {
        // Pairs within each 128-bit half, then pairs of pairs: lane t of `low4` (t < 4) holds
        // (l0 + l1) + (l2 + l3) of vector t, lane t + 4 the same of vector t's upper half.
        let a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
        let b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
        let low = _mm256_permute2f128_ps(a, b, 0x20);
        let high = _mm256_permute2f128_ps(a, b, 0x31);
        _mm256_add_ps(low, high)
    }

    /// Lane `t` of the result is [`tree16`] of vector `t`'s lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx2")]
    fn reduce8_512(v: [__m512; 8]) -> __m256 {
        let mut folded = [_mm256_setzero_ps(); 8];
        for (f, x) in folded.iter_mut().zip(v) {
            let high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
            *f = _mm256_add_ps(_mm512_castps512_ps256(x), high);
        }
        reduce8(folded)
    }

    /// The dimensions past the last multiple of `lanes`, added in turn to `sum`.
    fn tail(q: &[f32], k: &[f32], lanes: usize, sum: f32) -> f32 {
        let body = q.len() - q.len() % lanes;
        q[body..]
            .iter()
            .zip(&k[body..])
            .fold(sum, |s, (a, b)| a.mul_add(*b, s))
    }

    /// Channels `from..` of an output row, one at a time, each the same chain of multiply-adds
    /// as in a vector lane.
    fn add_weighted_tail(weights: &[f32], v: &[f32], out: &mut [f32], from: usize) {
        let d = out.len();
        for (ch, o) in out.iter_mut().enumerate().skip(from) {
            *o = weights
                .iter()
                .zip(v.chunks_exact(d))
                .fold(*o, |s, (w, row)| w.mul_add(row[ch], s));
        }
    }

    // The kernels below come in two widths, AVX2 (eight lanes) and AVX-512 (sixteen), written
    // once each as a macro over the vector type's intrinsics: `$zero`, `$load`, `$store`,
    // `$set1` and `$fma`, with `$lanes` lanes; the scores also take `$reduce`, which turns
    // eight vectors into their eight lane sums ([`reduce8`], [`reduce8_512`]), and `$tree`,
    // the same sum over one stored vector.

    /// A key's `$lanes` partial sums over the query's first `d - d % $lanes` dimensions.
    macro_rules! partial {
        ($q:expr, $k:expr, $lanes:literal, $zero:ident, $load:ident, $fma:ident) => {{
            let mut acc = $zero();
            for (q, k) in $q.chunks_exact($lanes).zip($k.chunks_exact($lanes)) {
                // SAFETY: both chunks are `$lanes` floats, the width of the unaligned loads.
                let (q, k) = unsafe { ($load(q.as_ptr()), $load(k.as_ptr())) };
                acc = $fma(q, k, acc);
            }
            acc
        }};
    }

    /// One query row's scores: eight keys per pass (eight independent sums, then one
    /// transposing reduction), the last keys one at a time, each summed exactly as in a pass.
    macro_rules! row_scores {
        ($name:ident, $features:literal, $lanes:literal, $zero:ident, $load:ident,
         $store:ident, $fma:ident, $reduce:ident, $tree:ident) => {
            /// # Safety
            /// The CPU must have the instructions the function is compiled for.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(q: &[f32], k: &[f32], scale: f32, scores: &mut [f32]) {
                let d = q.len();
                let mut keys = k.chunks_exact(8 * d);
                let mut outs = scores.chunks_exact_mut(8);
                for (k8, out) in (&mut keys).zip(&mut outs) {
                    let mut acc = [$zero(); 8];
                    for (t, a) in acc.iter_mut().enumerate() {
                        *a = partial!(q, &k8[t * d..][..d], $lanes, $zero, $load, $fma);
                    }
                    let mut sums = [0.0f32; 8];
                    // SAFETY: `sums` is eight floats, the 32 bytes the unaligned store writes.
                    unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), $reduce(acc)) };
                    for (t, (o, s)) in out.iter_mut().zip(sums).enumerate() {
                        *o = tail(q, &k8[t * d..][..d], $lanes, s) * scale;
                    }
                }
                for (k, s) in keys.remainder().chunks_exact(d).zip(outs.into_remainder()) {
                    let mut lanes = [0.0f32; $lanes];
                    let acc = partial!(q, k, $lanes, $zero, $load, $fma);
                    // SAFETY: `lanes` holds one vector, what the unaligned store writes.
                    unsafe { $store(lanes.as_mut_ptr(), acc) };
                    *s = tail(q, k, $lanes, $tree(lanes)) * scale;
                }
            }
        };
    }

    /// Four query rows' scores over the same keys, two keys per pass: eight sums, each exactly
    /// the one-row kernel's, reduced by one `$reduce` (lane `2 r + t`: row `r`, key `t`).
    macro_rules! group_scores {
        ($name:ident, $features:literal, $lanes:literal, $zero:ident, $load:ident,
         $fma:ident, $reduce:ident, $row:ident) => {
            /// # Safety
            /// The CPU must have the instructions the function is compiled for.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(
                q: [&[f32]; 4],
                k: &[f32],
                scale: f32,
                mut scores: [&mut [f32]; 4],
            ) {
                let d = q[0].len();
                let body = d - d % $lanes;
                let keys = k.len() / d;
                let mut j = 0;
                while j + 2 <= keys {
                    let pair = [&k[j * d..][..d], &k[(j + 1) * d..][..d]];
                    let mut acc = [$zero(); 8];
                    for i in (0..body).step_by($lanes) {
                        // SAFETY: `i + $lanes <= body <= d`: each load reads one vector of a
                        // `d`-long row.
                        let kv = unsafe {
                            [
                                $load(pair[0][i..i + $lanes].as_ptr()),
                                $load(pair[1][i..i + $lanes].as_ptr()),
                            ]
                        };
                        for (r, q) in q.iter().enumerate() {
                            // SAFETY: as above.
                            let qv = unsafe { $load(q[i..i + $lanes].as_ptr()) };
                            acc[2 * r] = $fma(qv, kv[0], acc[2 * r]);
                            acc[2 * r + 1] = $fma(qv, kv[1], acc[2 * r + 1]);
                        }
                    }
                    let mut sums = [0.0f32; 8];
                    // SAFETY: `sums` is eight floats, the 32 bytes the unaligned store writes.
                    unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), $reduce(acc)) };
                    for (r, row) in scores.iter_mut().enumerate() {
                        for t in 0..2 {
                            row[j + t] = tail(q[r], pair[t], $lanes, sums[2 * r + t]) * scale;
                        }
                    }
                    j += 2;
                }
                if j < keys {
                    for (q, row) in q.iter().zip(scores.iter_mut()) {
                        // SAFETY: this function's CPU features are the one-row kernel's.
                        unsafe { $row(q, &k[j * d..], scale, &mut row[j..]) };
                    }
                }
            }
        };
    }

    /// One row's output channels, up to 64 per pass over the keys: independent chains of
    /// multiply-adds keep both FMA units busy. Each channel's chain is the same at any width,
    /// so both widths give the same bits.
    macro_rules! add_weighted {
        ($name:ident, $features:literal, $lanes:literal, $zero:ident, $load:ident,
         $store:ident, $set1:ident, $fma:ident) => {
            /// # Safety
            /// The CPU must have the instructions the function is compiled for.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(weights: &[f32], v: &[f32], out: &mut [f32]) {
                const CHAINS: usize = 64 / $lanes;
                let d = out.len();
                let mut c = 0;
                while c + $lanes <= d {
                    let width = ((d - c) / $lanes).min(CHAINS);
                    let mut acc = [$zero(); CHAINS];
                    for (t, a) in acc.iter_mut().enumerate().take(width) {
                        // SAFETY: `out[c + $lanes t..]` holds a vector inside `out`.
                        *a = unsafe { $load(out[c + $lanes * t..][..$lanes].as_ptr()) };
                    }
                    for (w, row) in weights.iter().zip(v.chunks_exact(d)) {
                        let w = $set1(*w);
                        let row = &row[c..c + $lanes * width];
                        for (t, a) in acc.iter_mut().enumerate().take(width) {
                            // SAFETY: `row[$lanes t..]` holds a vector inside `row` (t < width).
                            let x = unsafe { $load(row[$lanes * t..][..$lanes].as_ptr()) };
                            *a = $fma(w, x, *a);
                        }
                    }
                    for (t, a) in acc.iter().enumerate().take(width) {
                        // SAFETY: `out[c + $lanes t..]` holds a vector inside `out`.
                        unsafe { $store(out[c + $lanes * t..][..$lanes].as_mut_ptr(), *a) };
                    }
                    c += $lanes * width;
                }
                add_weighted_tail(weights, v, out, c);
            }
        };
    }

    /// Four rows' output channels over the same values, two vectors of channels per pass
    /// (eight chains), each channel's chain exactly the one-row kernel's.
    macro_rules! group_add_weighted {
        ($name:ident, $features:literal, $lanes:literal, $zero:ident, $load:ident,
         $store:ident, $set1:ident, $fma:ident) => {
            /// # Safety
            /// The CPU must have the instructions the function is compiled for.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(weights: [&[f32]; 4], v: &[f32], mut out: [&mut [f32]; 4]) {
                let d = out[0].len();
                let mut c = 0;
                while c + $lanes <= d {
                    let width = if c + 2 * $lanes <= d { 2 } else { 1 };
                    let mut acc = [$zero(); 8];
                    for (r, o) in out.iter().enumerate() {
                        for t in 0..width {
                            // SAFETY: `o[c + $lanes t..]` holds a vector inside `o`.
                            acc[2 * r + t] =
                                unsafe { $load(o[c + $lanes * t..][..$lanes].as_ptr()) };
                        }
                    }
                    for (j, row) in v.chunks_exact(d).enumerate() {
                        let row = &row[c..c + $lanes * width];
                        let mut x = [$zero(); 2];
                        for (t, x) in x.iter_mut().enumerate().take(width) {
                            // SAFETY: `row[$lanes t..]` holds a vector inside `row` (t < width).
                            *x = unsafe { $load(row[$lanes * t..][..$lanes].as_ptr()) };
                        }
                        for (r, w) in weights.iter().enumerate() {
                            let w = $set1(w[j]);
                            for t in 0..width {
                                acc[2 * r + t] = $fma(w, x[t], acc[2 * r + t]);
                            }
                        }
                    }
                    for (r, o) in out.iter_mut().enumerate() {
                        for t in 0..width {
                            let at = o[c + $lanes * t..][..$lanes].as_mut_ptr();
                            // SAFETY: `at` starts a vector inside `o`.
                            unsafe { $store(at, acc[2 * r + t]) };
                        }
                    }
                    c += $lanes * width;
                }
                for (w, o) in weights.iter().zip(out.iter_mut()) {
                    add_weighted_tail(w, v, o, c);
                }
            }
        };
    }

    row_scores!(
        row_scores_avx2,
        "avx2,fma",
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_fmadd_ps,
        reduce8,
        tree
    );
    group_scores!(
        group_scores_avx2,
        "avx2,fma",
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        reduce8,
        row_scores_avx2
    );
    add_weighted!(
        add_weighted_avx2,
        "avx2,fma",
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps
    );
    group_add_weighted!(
        group_add_weighted_avx2,
        "avx2,fma",
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps
    );

    // AVX-512: sixteen partial sums per key, folded to eight before the AVX2 level's
    // reduction (a different order from that level's, the same for every key of this one);
    // output channels equal the AVX2 level's bit for bit.
    row_scores!(
        row_scores_avx512,
        "avx512f,avx2,fma",
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_fmadd_ps,
        reduce8_512,
        tree16
    );
    group_scores!(
        group_scores_avx512,
        "avx512f,avx2,fma",
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        reduce8_512,
        row_scores_avx512
    );
    add_weighted!(
        add_weighted_avx512,
        "avx512f,avx2,fma",
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps
    );
    group_add_weighted!(
        group_add_weighted_avx512,
        "avx512f,avx2,fma",
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps
    );
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

    /// The definition in f64: softmax over each row's visible keys (scores soft-capped where
    /// `cap` is set), weights times values.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: usize,
        visible: &[Range<usize>],
        scale: f32,
        cap: Option<f32>,
    ) -> Vec<f32> {
        let mut out = Vec::new();
        for (r, range) in visible.iter().enumerate() {
            let qr = &q[r * d..][..d];
            let scores: Vec<f64> = range
                .clone()
                .map(|j| {
                    let kj = &k[j * d..][..d];
                    let s = scale as f64
                        * qr.iter()
                            .zip(kj)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>();
                    cap.map_or(s, |cap| cap as f64 * (s / cap as f64).tanh())
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

    /// The key slots of `rows` new positions after `past` cached ones: causal, or the last
    /// `window` of those.
    fn causal_rows(rows: usize, past: usize, window: Option<usize>) -> Vec<Range<usize>> {
        (0..rows)
            .map(|r| {
                let end = past + r + 1;
                end.saturating_sub(window.unwrap_or(end))..end
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Causal and sliding-window blocks, at any offset into the keys, with the output
        /// written at a stride, with and without soft-capping: equal to the definition at
        /// every level.
        #[test]
        fn a_block_equals_the_definition(
            rows in 1usize..40,
            past in 0usize..50,
            d in prop::sample::select(vec![1usize, 8, 17, 64]),
            window in prop::option::of(1usize..30),
            cap in prop::option::of(0.5f32..4.0),
            seed in 0u64..1000,
        ) {
            let keys = past + rows;
            let visible = causal_rows(rows, past, window);
            let q = values(rows * d, seed);
            let k = values(keys * d, seed + 1);
            let v = values(keys * d, seed + 2);
            let scale = 1.0 / (d as f32).sqrt();
            let expected = reference(&q, &k, &v, d, &visible, scale, cap);
            let logits = Logits { scale, cap: cap.and_then(SoftCap::new) };
            let stride = d + 3;
            for isa in Isa::available() {
                let mut out = vec![f32::NAN; (rows - 1) * stride + d];
                attend(isa, &q, &k, &v, d, &visible, logits, &mut out, stride, &mut Vec::new());
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// A row's output has the same bits whether it is attended alone or in a block with
        /// other rows, at every level: what lets a prompt run in chunks of any size (an
        /// engine's chunked prefill, a decode step) and still give each position one answer.
        #[test]
        fn a_row_alone_equals_the_row_in_a_block(
            rows in 1usize..20,
            past in 0usize..40,
            d in prop::sample::select(vec![3usize, 8, 17, 64, 72]),
            window in prop::option::of(1usize..30),
            cap in prop::option::of(0.5f32..4.0),
            seed in 0u64..1000,
        ) {
            let keys = past + rows;
            let visible = causal_rows(rows, past, window);
            let (q, k, v) = (values(rows * d, seed), values(keys * d, seed + 1), values(keys * d, seed + 2));
            let logits = Logits { scale: 0.125, cap: cap.and_then(SoftCap::new) };
            for isa in Isa::available() {
                let mut block = vec![0.0; rows * d];
                attend(isa, &q, &k, &v, d, &visible, logits, &mut block, d, &mut Vec::new());
                for (r, range) in visible.iter().enumerate() {
                    let mut alone = vec![0.0; d];
                    let q = &q[r * d..][..d];
                    attend(isa, q, &k, &v, d, std::slice::from_ref(range), logits, &mut alone, d, &mut Vec::new());
                    let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    prop_assert_eq!(bits(&alone), bits(&block[r * d..][..d]), "{} row {}", isa, r);
                }
            }
        }

        /// Keys read through a block table in a pool, in any order of blocks, give the bits
        /// of the same keys laid out one after another, at every level, alone and in blocks
        /// of rows: a paged sequence attends where its keys are stored and gets a dense
        /// cache's answer.
        #[test]
        fn keys_in_blocks_equal_contiguous_keys(
            rows in 1usize..12,
            past in 0usize..40,
            d in prop::sample::select(vec![3usize, 8, 17, 64]),
            block_size in prop::sample::select(vec![1usize, 3, 4, 16]),
            window in prop::option::of(1usize..30),
            seed in 0u64..1000,
        ) {
            let keys = past + rows;
            let visible = causal_rows(rows, past, window);
            let (q, k, v) = (values(rows * d, seed), values(keys * d, seed + 1), values(keys * d, seed + 2));
            // A pool twice the sequence's blocks, the sequence in every other block, last
            // first: no two of its blocks are neighbours in the pool.
            let blocks_needed = keys.div_ceil(block_size);
            let table: Vec<usize> = (0..blocks_needed).map(|i| 2 * (blocks_needed - 1 - i)).collect();
            let slots = 2 * blocks_needed * block_size;
            let (mut pool_k, mut pool_v) = (values(slots * d, seed + 3), values(slots * d, seed + 4));
            for j in 0..keys {
                let slot = table[j / block_size] * block_size + j % block_size;
                pool_k[slot * d..][..d].copy_from_slice(&k[j * d..][..d]);
                pool_v[slot * d..][..d].copy_from_slice(&v[j * d..][..d]);
            }
            let paged = HeadKeys::blocks(&pool_k, &pool_v, d, block_size, &table);
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            for isa in Isa::available() {
                let (mut dense_out, mut paged_out) = (vec![0.0; rows * d], vec![0.0; rows * d]);
                attend(isa, &q, &k, &v, d, &visible, 0.125, &mut dense_out, d, &mut Vec::new());
                attend_keys(isa, &q, paged, &visible, 0.125, &mut paged_out, d, &mut Vec::new());
                prop_assert_eq!(bits(&dense_out), bits(&paged_out), "{}", isa);
            }
        }

        /// Keys and values stored as `f16`s or 8-bit rows, read through a block table, give
        /// the bits of attention over their widened values stored as `f32`s: widening is
        /// exact and happens before the same kernels.
        #[test]
        fn narrow_stores_equal_their_widened_values(
            rows in 1usize..10,
            past in 0usize..40,
            d in prop::sample::select(vec![3usize, 8, 64]),
            block_size in prop::sample::select(vec![1usize, 4, 16]),
            seed in 0u64..1000,
        ) {
            let keys = past + rows;
            let visible = causal_rows(rows, past, None);
            let q = values(rows * d, seed);
            let blocks_needed = keys.div_ceil(block_size);
            let table: Vec<usize> = (0..blocks_needed).rev().collect();
            let slots = blocks_needed * block_size;
            let (k, v) = (values(slots * d, seed + 1), values(slots * d, seed + 2));
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let half_k: Vec<half::f16> = k.iter().map(|&x| half::f16::from_f32(x)).collect();
            let half_v: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            let quantize = |x: &[f32]| {
                let mut q = Vec::new();
                let mut scales = Vec::new();
                for row in x.chunks(d) {
                    let scale = row.iter().fold(0.0f32, |m, &x| m.max(x.abs())) / 127.0;
                    scales.push(scale);
                    q.extend(row.iter().map(|&x| if scale > 0.0 { (x / scale).round() as i8 } else { 0 }));
                }
                let wide: Vec<f32> = q.iter().enumerate().map(|(i, &v)| v as f32 * scales[i / d]).collect();
                (q, scales, wide)
            };
            let (qk, sk, wide_k) = quantize(&k);
            let (qv, sv, wide_v) = quantize(&v);
            let half_wide = |x: &[half::f16]| x.iter().map(|h| h.to_f32()).collect::<Vec<_>>();
            let (hk, hv) = (half_wide(&half_k), half_wide(&half_v));
            let cases = [
                (
                    HeadKeys::stored(Rows::F16(&half_k), Rows::F16(&half_v), d),
                    HeadKeys::contiguous(&hk, &hv, d),
                ),
                (
                    HeadKeys::stored(
                        Rows::Int8 { q: &qk, scales: &sk },
                        Rows::Int8 { q: &qv, scales: &sv },
                        d,
                    ),
                    HeadKeys::contiguous(&wide_k, &wide_v, d),
                ),
            ];
            for (narrow, wide) in cases {
                let (narrow, wide) = (narrow.through(block_size, &table), wide.through(block_size, &table));
                for isa in Isa::available() {
                    let (mut a, mut b) = (vec![0.0; rows * d], vec![0.0; rows * d]);
                    attend_keys(isa, &q, narrow, &visible, 0.125, &mut a, d, &mut Vec::new());
                    attend_keys(isa, &q, wide, &visible, 0.125, &mut b, d, &mut Vec::new());
                    prop_assert_eq!(bits(&a), bits(&b), "{}", isa);
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
