//! One attention head's keys and values held as KIVI holds them (8 or 4 bits, keys per channel,
//! values per token, the most recent tokens in half precision), and attention that reads them
//! without widening the whole history into a full-precision tensor first.
//!
//! Where the design comes from: KIVI (Liu et al., 2024) quantizes keys per channel over groups
//! of tokens, because their outliers sit in fixed channels, and values per token; the newest
//! tokens stay in full precision until a whole group has arrived. transformers' quantized
//! cache follows it, and so does this one, with two choices of its own:
//!
//! - **Scales, minimums and the recent tokens are f16.** At 2,048 positions of a head of 64
//!   channels, f32 scales and minimums and a 128-token f32 residual would be a quarter of the
//!   cache's bytes; in f16 they are an eighth. The minimum is rounded down and the scale up
//!   to f16, and the codes are computed from those stored values, so every element still
//!   dequantizes to within half a step of its value, plus the value's f16 rounding (a
//!   relative `2^-11`: tokens wait in the f16 residual before they are quantized); the
//!   residual is within that rounding, a quarter of an 8-bit step or less.
//! - **Attention dequantizes per head, into a buffer the caller reuses.** A step widens one
//!   head's history at a time (`2 x tokens x head_dim` f32, half a MiB at 2,048 tokens of 64
//!   channels, so it stays in the core's cache) and runs [`crate::attention::attend`] on it.
//!   The history is read from memory once, as bytes, instead of being widened into a fresh
//!   tensor of every layer and head, written out and read back. What it costs: the
//!   conversion (one multiply-add per element, in vector registers) on every step.
//!
//! A head's storage grows by appending; [`QuantizedKv::truncate`] and cloning serve a cache's
//! crop and batch selection.

use std::ops::Range;
use std::sync::Arc;

use half::f16;

use crate::attention::{self, Logits, RowStats};
use crate::{Isa, KernelError, Result};

/// Bits per quantized element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantBits {
    /// 256 levels, one byte per element.
    Int8,
    /// 16 levels, two elements per byte.
    Int4,
}

impl QuantBits {
    /// Highest code: `2^bits - 1`.
    pub fn max_code(self) -> u32 {
        match self {
            QuantBits::Int8 => 255,
            QuantBits::Int4 => 15,
        }
    }

    /// Elements per byte of codes.
    pub fn per_byte(self) -> usize {
        match self {
            QuantBits::Int8 => 1,
            QuantBits::Int4 => 2,
        }
    }
}

/// How a quantized cache quantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantizedCacheConfig {
    /// Bits per element.
    pub bits: QuantBits,
    /// Tokens per key group (keys are quantized per channel over this many tokens), and
    /// channels per value group (capped at `head_dim`; values are quantized per token).
    pub group_size: usize,
    /// Most recent positions kept in f16 (at least this many, fewer than
    /// `residual_len + group_size`).
    pub residual_len: usize,
}

impl Default for QuantizedCacheConfig {
    /// 4 bits, groups of 64, 128 recent tokens unquantized (transformers' defaults).
    fn default() -> Self {
        Self {
            bits: QuantBits::Int4,
            group_size: 64,
            residual_len: 128,
        }
    }
}

impl QuantizedCacheConfig {
    /// Channels per value group for heads of `head_dim` channels.
    pub fn value_group(&self, head_dim: usize) -> usize {
        self.group_size.min(head_dim)
    }

    /// Positions held as codes after `positions` appends (the rest are the residual).
    pub fn quantized_len(&self, positions: usize) -> usize {
        let (group, keep) = (self.group_size, self.residual_len);
        if positions >= keep + group {
            (positions - keep) / group * group
        } else {
            0
        }
    }

    /// Bytes one head of `head_dim` channels holds after `positions` appends: the codes, the
    /// f16 scales and minimums, and the f16 residual.
    ///
    /// ```
    /// use kv_kernels::quantized_kv::{QuantBits, QuantizedCacheConfig};
    ///
    /// let config = QuantizedCacheConfig { bits: QuantBits::Int8, group_size: 64, residual_len: 128 };
    /// // 2,048 positions of 64 channels: 1,920 quantized, 128 in f16.
    /// let bytes = config.bytes(64, 2048);
    /// let f32_bytes = 2 * 2048 * 64 * 4;
    /// assert!((bytes as f64) < 0.3 * f32_bytes as f64);
    /// ```
    pub fn bytes(&self, head_dim: usize, positions: usize) -> usize {
        let quantized = self.quantized_len(positions);
        let residual = positions - quantized;
        let half = std::mem::size_of::<f16>();
        let codes = 2 * quantized * head_dim / self.bits.per_byte();
        let key_params = 2 * (quantized / self.group_size) * head_dim * half;
        let value_params = 2 * quantized * (head_dim / self.value_group(head_dim)) * half;
        codes + key_params + value_params + 2 * residual * head_dim * half
    }

    /// Checks the configuration against a head size.
    pub fn check(&self, head_dim: usize) -> Result<()> {
        if self.group_size == 0 {
            return Err(KernelError::QuantizedConfig(
                "group_size must be at least 1".into(),
            ));
        }
        let group = self.value_group(head_dim);
        if head_dim == 0 || !head_dim.is_multiple_of(group) {
            return Err(KernelError::QuantizedConfig(format!(
                "head_dim {head_dim} is not a multiple of the value group size {group}: choose a \
                 group_size that divides head_dim"
            )));
        }
        if self.bits == QuantBits::Int4 && !head_dim.is_multiple_of(2) {
            return Err(KernelError::QuantizedConfig(format!(
                "int4 packs two channels per byte, so head_dim must be even, got {head_dim}"
            )));
        }
        Ok(())
    }
}

/// One head's keys and values: the oldest whole groups as codes, the newest in f16.
///
/// Codes come in blocks of `group_size` tokens, each immutable once made and shared by
/// reference, so cloning a head is cheap (a few pointers) and a clone can be read on other
/// threads while the original takes new tokens: the residual is copied on the next write.
///
/// Layouts (`d = head_dim`, `g = group_size`, `p = d / per_byte`): per block, key and value
/// codes `[g, p]`, key scales and minimums `[d]` (one per channel over the block's tokens),
/// value scales and minimums `[g, d / value_group]`; residual keys and values `[r, d]`. An
/// int4 byte holds channel `c` in its low nibble and channel `c + d / 2` in its high one.
///
/// ```
/// use kv_kernels::quantized_kv::{QuantBits, QuantizedCacheConfig, QuantizedKv};
///
/// let config = QuantizedCacheConfig { bits: QuantBits::Int8, group_size: 4, residual_len: 4 };
/// let mut head = QuantizedKv::new(config, 2).unwrap();
/// let keys: Vec<f32> = (0..20).map(|i| i as f32 / 10.0).collect(); // 10 tokens of 2 channels
/// head.append(&keys, &keys).unwrap();
/// assert_eq!((head.len(), head.quantized_len()), (10, 4));
/// let (mut k, mut v) = (Vec::new(), Vec::new());
/// head.dequantize(&mut k, &mut v);
/// assert!(k.iter().zip(&keys).all(|(a, b)| (a - b).abs() < 1e-2));
/// ```
#[derive(Debug, Clone)]
pub struct QuantizedKv {
    config: QuantizedCacheConfig,
    head_dim: usize,
    blocks: Vec<Arc<CodeBlock>>,
    residual_keys: Arc<Vec<f16>>,
    residual_values: Arc<Vec<f16>>,
}

/// `group_size` tokens as codes, with their scales and minimums.
#[derive(Debug)]
struct CodeBlock {
    /// `[g, p]`.
    key_codes: Vec<u8>,
    /// `[d]` each.
    key_scale: Vec<f16>,
    key_min: Vec<f16>,
    /// `[g, p]`.
    value_codes: Vec<u8>,
    /// `[g, d / value_group]` each.
    value_scale: Vec<f16>,
    value_min: Vec<f16>,
}

impl CodeBlock {
    /// Quantizes `keys` and `values` `[g, d]`: keys per channel over the block, values per
    /// token over groups of `value_group` channels.
    fn quantize(keys: &[f32], values: &[f32], config: &QuantizedCacheConfig, d: usize) -> Self {
        let bits = config.bits;
        let g = keys.len() / d;
        let mut block = CodeBlock {
            key_codes: Vec::with_capacity(g * d / bits.per_byte()),
            key_scale: Vec::with_capacity(d),
            key_min: Vec::with_capacity(d),
            value_codes: Vec::with_capacity(g * d / bits.per_byte()),
            value_scale: Vec::new(),
            value_min: Vec::new(),
        };
        let mut scale = vec![0.0f32; d];
        let mut min = vec![0.0f32; d];
        for c in 0..d {
            let column = (0..g).map(|t| keys[t * d + c]);
            let lo = column.clone().fold(f32::INFINITY, f32::min);
            let hi = column.fold(f32::NEG_INFINITY, f32::max);
            let (s, m) = group_parameters(lo, hi, bits);
            block.key_scale.push(s);
            block.key_min.push(m);
            (scale[c], min[c]) = (s.to_f32(), m.to_f32());
        }
        let mut codes = vec![0u8; d];
        for token in keys.chunks_exact(d) {
            for (c, code) in codes.iter_mut().enumerate() {
                *code = quantize(token[c], scale[c], min[c], bits);
            }
            pack_into(&codes, bits, &mut block.key_codes);
        }
        let vg = config.value_group(d);
        for token in values.chunks_exact(d) {
            for (group, codes) in token.chunks_exact(vg).zip(codes.chunks_exact_mut(vg)) {
                let lo = group.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = group.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let (s, m) = group_parameters(lo, hi, bits);
                block.value_scale.push(s);
                block.value_min.push(m);
                for (code, &x) in codes.iter_mut().zip(group) {
                    *code = quantize(x, s.to_f32(), m.to_f32(), bits);
                }
            }
            pack_into(&codes, bits, &mut block.value_codes);
        }
        block
    }

    fn bytes(&self) -> usize {
        let half = std::mem::size_of::<f16>();
        self.key_codes.len()
            + self.value_codes.len()
            + half
                * (self.key_scale.len()
                    + self.key_min.len()
                    + self.value_scale.len()
                    + self.value_min.len())
    }
}

/// Buffers [`QuantizedKv::attend`] widens a head into and scores in; reuse one across calls.
#[derive(Debug, Default)]
pub struct AttendScratch {
    keys: Vec<f32>,
    values: Vec<f32>,
    scores: Vec<f32>,
}

/// Query rows per call of [`crate::attention::attend_partial`]: bounds the scores buffer of a
/// long prompt (64 rows over 4,096 keys: 1 MiB).
const ROWS_PER_BLOCK: usize = 64;

impl QuantizedKv {
    /// An empty head of `head_dim` channels.
    pub fn new(config: QuantizedCacheConfig, head_dim: usize) -> Result<Self> {
        config.check(head_dim)?;
        Ok(Self {
            config,
            head_dim,
            blocks: Vec::new(),
            residual_keys: Arc::default(),
            residual_values: Arc::default(),
        })
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.quantized_len() + self.residual_len()
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens held as codes.
    pub fn quantized_len(&self) -> usize {
        self.blocks.len() * self.config.group_size
    }

    fn residual_len(&self) -> usize {
        self.residual_keys.len() / self.head_dim
    }

    /// Bytes held: codes, f16 parameters and residual.
    pub fn bytes(&self) -> usize {
        let half = std::mem::size_of::<f16>();
        self.blocks.iter().map(|b| b.bytes()).sum::<usize>()
            + half * (self.residual_keys.len() + self.residual_values.len())
    }

    /// Appends tokens: `keys` and `values` `[new, head_dim]`. Whenever the residual then holds
    /// `residual_len + group_size` or more, its oldest whole groups become codes.
    ///
    /// Refuses a value outside f16's range (or NaN), which the residual and the parameters
    /// could not hold, before storing anything.
    pub fn append(&mut self, keys: &[f32], values: &[f32]) -> Result<()> {
        let d = self.head_dim;
        if keys.len() != values.len() || !keys.len().is_multiple_of(d) {
            return Err(KernelError::QuantizedConfig(format!(
                "keys ({}) and values ({}) must be whole rows of head_dim {d}",
                keys.len(),
                values.len()
            )));
        }
        check_half_range(keys)?;
        check_half_range(values)?;
        Arc::make_mut(&mut self.residual_keys).extend(keys.iter().map(|&x| f16::from_f32(x)));
        Arc::make_mut(&mut self.residual_values).extend(values.iter().map(|&x| f16::from_f32(x)));
        self.flush();
        Ok(())
    }

    /// Turns the residual's oldest whole groups beyond `residual_len` into code blocks.
    fn flush(&mut self) {
        let (g, d) = (self.config.group_size, self.head_dim);
        let r = self.residual_len();
        if r < self.config.residual_len + g {
            return;
        }
        let count = (r - self.config.residual_len) / g * g;
        let widen = |x: &[f16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
        let keys = widen(&self.residual_keys[..count * d]);
        let values = widen(&self.residual_values[..count * d]);
        for (k, v) in keys.chunks_exact(g * d).zip(values.chunks_exact(g * d)) {
            let block = CodeBlock::quantize(k, v, &self.config, d);
            self.blocks.push(Arc::new(block));
        }
        Arc::make_mut(&mut self.residual_keys).drain(..count * d);
        Arc::make_mut(&mut self.residual_values).drain(..count * d);
    }

    /// Forgets every token at or after `len`. Tokens of a partly kept group return to the
    /// residual, dequantized (so within the bound they had, plus f16 rounding).
    pub fn truncate(&mut self, len: usize) {
        let (d, g) = (self.head_dim, self.config.group_size);
        let quantized = self.quantized_len();
        if len >= self.len() {
            return;
        }
        if len >= quantized {
            let keep = (len - quantized) * d;
            Arc::make_mut(&mut self.residual_keys).truncate(keep);
            Arc::make_mut(&mut self.residual_values).truncate(keep);
            return;
        }
        let kept = len / g * g;
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        self.widen(Isa::Scalar, kept..len, &mut keys, &mut values);
        self.residual_keys = Arc::new(keys.iter().map(|&x| f16::from_f32(x)).collect());
        self.residual_values = Arc::new(values.iter().map(|&x| f16::from_f32(x)).collect());
        self.blocks.truncate(kept / g);
    }

    /// Every token's keys and values as f32, `[len, head_dim]` each, into `keys` and `values`
    /// (resized).
    pub fn dequantize(&self, keys: &mut Vec<f32>, values: &mut Vec<f32>) {
        self.widen(Isa::best(), 0..self.len(), keys, values);
    }

    /// Tokens `range` widened to f32 into `keys` and `values`, `[range.len(), head_dim]` each.
    fn widen(&self, isa: Isa, range: Range<usize>, keys: &mut Vec<f32>, values: &mut Vec<f32>) {
        let d = self.head_dim;
        keys.resize(range.len() * d, 0.0);
        values.resize(range.len() * d, 0.0);
        let q = self.quantized_len();
        let codes = range.start.min(q)..range.end.min(q);
        let residual = range.start.max(q) - q..range.end.max(q) - q;
        let split = codes.len() * d;
        let (key_codes, key_residual) = keys.split_at_mut(split);
        let (value_codes, value_residual) = values.split_at_mut(split);
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512Vnni if Isa::Avx2.is_available() => {
                // SAFETY: AVX2, FMA and F16C were detected on this CPU.
                unsafe { self.widen_codes_avx2(codes.clone(), key_codes, value_codes) }
            }
            _ => self.widen_codes(codes.clone(), key_codes, value_codes),
        }
        if !residual.is_empty() {
            let slots = residual.start * d..residual.end * d;
            widen_half(&self.residual_keys[slots.clone()], key_residual);
            widen_half(&self.residual_values[slots], value_residual);
        }
    }

    /// [`QuantizedKv::widen_codes`] compiled for AVX2, where the loops vectorize.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen_codes_avx2(&self, tokens: Range<usize>, keys: &mut [f32], values: &mut [f32]) {
        self.widen_codes(tokens, keys, values)
    }

    /// Quantized tokens `tokens` as f32 into `keys` and `values` (`[tokens.len(), d]` each):
    /// `code * scale + min` per element. The loops are written so the compiler vectorizes
    /// them (whole rows, a block's key scales and minimums widened once per block).
    #[inline(always)]
    fn widen_codes(&self, tokens: Range<usize>, keys: &mut [f32], values: &mut [f32]) {
        let (d, g, bits) = (self.head_dim, self.config.group_size, self.config.bits);
        let vg = self.config.value_group(d);
        let row = d / bits.per_byte();
        let mut scale = vec![0.0f32; d];
        let mut min = vec![0.0f32; d];
        let mut current = usize::MAX;
        for (t, (k, v)) in tokens
            .clone()
            .zip(keys.chunks_exact_mut(d).zip(values.chunks_exact_mut(d)))
        {
            let (index, i) = (t / g, t % g);
            let block = &self.blocks[index];
            if index != current {
                current = index;
                widen_half(&block.key_scale, &mut scale);
                widen_half(&block.key_min, &mut min);
            }
            unpack_row(&block.key_codes[i * row..][..row], bits, k);
            for ((k, s), m) in k.iter_mut().zip(&scale).zip(&min) {
                *k = *k * s + m;
            }
            unpack_row(&block.value_codes[i * row..][..row], bits, v);
            let params = i * (d / vg)..(i + 1) * (d / vg);
            for ((v, s), m) in v
                .chunks_exact_mut(vg)
                .zip(&block.value_scale[params.clone()])
                .zip(&block.value_min[params])
            {
                let (s, m) = (s.to_f32(), m.to_f32());
                v.iter_mut().for_each(|v| *v = *v * s + m);
            }
        }
    }

    /// Softmax attention of query rows over this head's tokens: row `r` (`q[r * d..][..d]`)
    /// sees tokens `0..ends[r]`, and its output goes to `out[r * out_stride..][..d]`, with
    /// scores `logits` of `q . k` ([`Logits`]). Equals [`crate::attention::attend`] over the
    /// [`QuantizedKv::dequantize`]d keys and values.
    ///
    /// # Panics
    /// If an end is 0 or past [`QuantizedKv::len`], or a slice is shorter than its shape says.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        isa: Isa,
        q: &[f32],
        ends: &[usize],
        logits: impl Into<Logits>,
        out: &mut [f32],
        out_stride: usize,
        scratch: &mut AttendScratch,
    ) {
        assert!(ends.iter().all(|&e| e > 0), "every row sees a token");
        let keys = 0..self.len();
        let stats = self.attend_partial(isa, q, ends, keys, logits, out, out_stride, scratch);
        for (r, row) in stats.into_iter().enumerate() {
            let inv = 1.0 / row.sum;
            out[r * out_stride..][..self.head_dim]
                .iter_mut()
                .for_each(|o| *o *= inv);
        }
    }

    /// [`QuantizedKv::attend`] over the tokens `keys` only, unnormalised, as
    /// [`crate::attention::attend_partial`]: parts over disjoint ranges (on different threads)
    /// merge with [`crate::attention::merge_parts`]. Only the tokens in `keys` are widened.
    ///
    /// # Panics
    /// If `keys` or an end reaches past [`QuantizedKv::len`], or a slice is shorter than its
    /// shape says.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_partial(
        &self,
        isa: Isa,
        q: &[f32],
        ends: &[usize],
        keys: Range<usize>,
        logits: impl Into<Logits>,
        out: &mut [f32],
        out_stride: usize,
        scratch: &mut AttendScratch,
    ) -> Vec<RowStats> {
        let logits = logits.into();
        let d = self.head_dim;
        assert_eq!(
            q.len(),
            ends.len() * d,
            "q is [rows, head_dim]: one end per row"
        );
        let len = self.len();
        assert!(
            keys.end <= len && ends.iter().all(|&e| e <= len),
            "keys {keys:?} and ends {ends:?} reach past {len} tokens"
        );
        let end = ends.iter().copied().max().unwrap_or(0).min(keys.end);
        let widened = keys.start..end.max(keys.start);
        let AttendScratch {
            keys: k,
            values: v,
            scores,
        } = scratch;
        self.widen(isa, widened.clone(), k, v);
        let mut stats = Vec::with_capacity(ends.len());
        for (block, (q, ends)) in q
            .chunks(ROWS_PER_BLOCK * d)
            .zip(ends.chunks(ROWS_PER_BLOCK))
            .enumerate()
        {
            // Each row's tokens, as slots of the widened range.
            let visible: Vec<Range<usize>> = ends
                .iter()
                .map(|&e| 0..e.clamp(widened.start, widened.end) - widened.start)
                .collect();
            stats.extend(attention::attend_partial(
                isa,
                q,
                k,
                v,
                d,
                &visible,
                logits,
                &mut out[block * ROWS_PER_BLOCK * out_stride..],
                out_stride,
                scores,
            ));
        }
        stats
    }
}

/// Refuses values a [`QuantizedKv`] cannot hold: NaN, or beyond f16's range (±65504), where
/// its residual, scales and minimums would overflow.
///
/// ```
/// use kv_kernels::quantized_kv::check_half_range;
///
/// assert!(check_half_range(&[1.0, -65504.0]).is_ok());
/// assert!(check_half_range(&[1.0, 7e4]).is_err());
/// ```
pub fn check_half_range(values: &[f32]) -> Result<()> {
    let max = f16::MAX.to_f32();
    match values.iter().find(|x| x.is_nan() || x.abs() > max) {
        Some(&value) => Err(KernelError::OutOfHalfRange { value }),
        None => Ok(()),
    }
}

/// The stored scale and minimum of a group whose values span `lo..=hi`: the minimum rounded
/// down to f16 and the scale rounded up, so that `min + max_code * scale` still reaches `hi`
/// and every value lies within half a step of a code.
fn group_parameters(lo: f32, hi: f32, bits: QuantBits) -> (f16, f16) {
    let min = f16_at_most(lo);
    let scale = f16_at_least((hi - min.to_f32()) / bits.max_code() as f32);
    (scale, min)
}

/// `round((x - min) / scale)` within the codes; a constant group (scale 0) is all code 0.
fn quantize(x: f32, scale: f32, min: f32, bits: QuantBits) -> u8 {
    if scale == 0.0 {
        return 0;
    }
    ((x - min) / scale)
        .round()
        .clamp(0.0, bits.max_code() as f32) as u8
}

/// Appends one token's codes `[d]`, packed: int4 puts channel `c` in the low nibble of byte
/// `c` and channel `c + d / 2` in its high nibble, so unpacking writes two whole halves.
fn pack_into(codes: &[u8], bits: QuantBits, out: &mut Vec<u8>) {
    match bits {
        QuantBits::Int8 => out.extend_from_slice(codes),
        QuantBits::Int4 => {
            let (low, high) = codes.split_at(codes.len() / 2);
            out.extend(low.iter().zip(high).map(|(l, h)| l | (h << 4)));
        }
    }
}

/// One packed row of codes into f32 codes `[d]`.
#[inline(always)]
fn unpack_row(packed: &[u8], bits: QuantBits, out: &mut [f32]) {
    match bits {
        QuantBits::Int8 => out.iter_mut().zip(packed).for_each(|(o, &c)| *o = c as f32),
        QuantBits::Int4 => {
            let (low, high) = out.split_at_mut(packed.len());
            for ((l, h), &byte) in low.iter_mut().zip(high).zip(packed) {
                *l = (byte & 15) as f32;
                *h = (byte >> 4) as f32;
            }
        }
    }
}

/// f16 values into f32 (`out` as long as `values`), with F16C where the CPU has it.
#[inline(always)]
fn widen_half(values: &[f16], out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    values.convert_to_f32_slice(out);
}

/// The largest f16 at most `x` (`x` within f16's range).
fn f16_at_most(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() > x {
        step_down(h)
    } else {
        h
    }
}

/// The smallest f16 at least `x` (`x` within f16's range).
fn f16_at_least(x: f32) -> f16 {
    -f16_at_most(-x)
}

/// The f16 just below a finite `h`.
fn step_down(h: f16) -> f16 {
    let bits = h.to_bits();
    if bits & 0x7fff == 0 {
        f16::from_bits(0x8001) // below ±0: the negative subnormal nearest zero
    } else if bits & 0x8000 == 0 {
        f16::from_bits(bits - 1)
    } else {
        f16::from_bits(bits + 1)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Deterministic values in `[-amplitude, amplitude)`.
    fn values(len: usize, seed: u64, amplitude: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amplitude
            })
            .collect()
    }

    fn bits() -> impl Strategy<Value = QuantBits> {
        prop::sample::select(vec![QuantBits::Int8, QuantBits::Int4])
    }

    #[test]
    fn rounding_to_f16_goes_the_asked_way() {
        for x in [
            0.0f32, -0.0, 1e-9, -1e-9, 0.1, -0.1, 2.71, -65504.0, 65504.0, 1000.3,
        ] {
            let (down, up) = (f16_at_most(x).to_f32(), f16_at_least(x).to_f32());
            assert!(down <= x && x <= up, "{down} <= {x} <= {up}");
            assert!(
                up - down <= x.abs() * 2f32.powi(-9) + 1e-7,
                "{x}: {down}..{up}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every quantized element is within half a step of its value plus its f16 rounding
        /// (tokens wait in the f16 residual before they are quantized), the step being the
        /// range of its group over `max_code` (widened by the f16 rounding of the stored
        /// minimum and scale); every residual element within f16's rounding.
        #[test]
        fn dequantized_values_stay_within_half_a_step(
            bits in bits(),
            group in 1usize..9,
            residual in 0usize..9,
            chunks in prop::collection::vec(1usize..12, 1..6),
            d in prop::sample::select(vec![2usize, 4, 8, 16]),
            seed in 0u64..1000,
            amplitude in prop::sample::select(vec![1e-3f32, 1.0, 300.0]),
        ) {
            let group = if d.is_multiple_of(group.min(d)) { group } else { 1 };
            let config = QuantizedCacheConfig { bits, group_size: group, residual_len: residual };
            let mut head = QuantizedKv::new(config, d).unwrap();
            let (mut all_k, mut all_v) = (Vec::new(), Vec::new());
            for (i, &n) in chunks.iter().enumerate() {
                let k = values(n * d, seed + 2 * i as u64, amplitude);
                let v = values(n * d, seed + 2 * i as u64 + 1, amplitude);
                head.append(&k, &v).unwrap();
                all_k.extend(k);
                all_v.extend(v);
            }
            let len = all_k.len() / d;
            prop_assert_eq!(head.len(), len);
            prop_assert_eq!(head.quantized_len(), config.quantized_len(len));
            prop_assert_eq!(head.bytes(), config.bytes(d, len));
            let (mut k, mut v) = (Vec::new(), Vec::new());
            head.dequantize(&mut k, &mut v);
            let quantized = head.quantized_len();
            let vg = config.value_group(d);
            let step = |members: &mut dyn Iterator<Item = f32>| {
                let (lo, hi) = members.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)));
                // The minimum rounded down to f16, the scale rounded up (at worst to the
                // smallest f16 above it, 2^-24 apart where scales are subnormal).
                let widened = hi - lo + lo.abs().max(hi.abs()) * 2f32.powi(-10);
                widened / bits.max_code() as f32 * (1.0 + 2f32.powi(-9)) + 2f32.powi(-24)
            };
            for t in 0..len {
                for c in 0..d {
                    let (x, y) = (all_k[t * d + c], k[t * d + c]);
                    let (xv, yv) = (all_v[t * d + c], v[t * d + c]);
                    if t >= quantized {
                        prop_assert!((x - y).abs() <= x.abs() * 2f32.powi(-11) + 1e-7, "residual key {t},{c}: {x} {y}");
                        prop_assert!((xv - yv).abs() <= xv.abs() * 2f32.powi(-11) + 1e-7, "residual value {t},{c}");
                        continue;
                    }
                    let g0 = t / group * group;
                    let key_step = step(&mut (g0..g0 + group).map(|t| all_k[t * d + c]));
                    prop_assert!((x - y).abs() <= key_step / 2.0 + x.abs() * 2f32.powi(-11) + 2f32.powi(-25) + 1e-6 * x.abs(), "key {t},{c}: {x} {y} step {key_step}");
                    let c0 = c / vg * vg;
                    let value_step = step(&mut all_v[t * d + c0..t * d + c0 + vg].iter().copied());
                    prop_assert!((xv - yv).abs() <= value_step / 2.0 + xv.abs() * 2f32.powi(-11) + 2f32.powi(-25) + 1e-6 * xv.abs(), "value {t},{c}: {xv} {yv} step {value_step}");
                }
            }
        }

        /// Attention over the codes equals the plain kernel over the dequantized history, for
        /// causal rows at any offset, at every instruction-set level, and so do two parts over
        /// the keys merged.
        #[test]
        fn attention_over_codes_equals_attention_over_the_dequantized_history(
            bits in bits(),
            tokens in 1usize..150,
            rows in 1usize..5,
            cut in 0usize..150,
            seed in 0u64..1000,
        ) {
            let d = 16;
            let config = QuantizedCacheConfig { bits, group_size: 8, residual_len: 8 };
            let mut head = QuantizedKv::new(config, d).unwrap();
            head.append(&values(tokens * d, seed, 2.0), &values(tokens * d, seed + 1, 2.0)).unwrap();
            let (mut k, mut v) = (Vec::new(), Vec::new());
            head.dequantize(&mut k, &mut v);
            let q = values(rows * d, seed + 2, 2.0);
            let ends: Vec<usize> = (0..rows).map(|r| (tokens - (rows - 1 - r).min(tokens - 1)).max(1)).collect();
            let visible: Vec<Range<usize>> = ends.iter().map(|&e| 0..e).collect();
            let mut expected = vec![0.0; rows * d];
            attention::attend(Isa::Scalar, &q, &k, &v, d, &visible, 0.25, &mut expected, d, &mut Vec::new());
            for isa in Isa::available() {
                let mut out = vec![f32::NAN; rows * d];
                head.attend(isa, &q, &ends, 0.25, &mut out, d, &mut AttendScratch::default());
                for (got, want) in out.iter().zip(&expected) {
                    prop_assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{isa}: {got} against {want}");
                }
                // The same from two parts cut at `cut`, merged.
                let cut = cut.min(tokens);
                let mut parts = Vec::new();
                for keys in [0..cut, cut..tokens] {
                    let mut out = vec![f32::NAN; rows * d];
                    let stats = head.attend_partial(isa, &q, &ends, keys, 0.25, &mut out, d, &mut AttendScratch::default());
                    parts.push((out, stats));
                }
                for r in 0..rows {
                    let row: Vec<(&[f32], RowStats)> = parts.iter().map(|(o, s)| (&o[r * d..][..d], s[r])).collect();
                    let mut merged = vec![0.0; d];
                    attention::merge_parts(&row, &mut merged);
                    for (got, want) in merged.iter().zip(&expected[r * d..][..d]) {
                        prop_assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{isa} parts: {got} against {want}");
                    }
                }
            }
        }

        /// Truncating keeps exactly the first `len` tokens' values (those of a partly kept
        /// group, dequantized, back in the residual), and appending afterwards goes on.
        #[test]
        fn truncate_keeps_a_prefix(
            bits in bits(),
            tokens in 1usize..60,
            keep in 0usize..60,
            seed in 0u64..1000,
        ) {
            let d = 4;
            let config = QuantizedCacheConfig { bits, group_size: 4, residual_len: 3 };
            let mut head = QuantizedKv::new(config, d).unwrap();
            head.append(&values(tokens * d, seed, 1.0), &values(tokens * d, seed + 1, 1.0)).unwrap();
            let (mut before_k, mut before_v) = (Vec::new(), Vec::new());
            head.dequantize(&mut before_k, &mut before_v);
            head.truncate(keep);
            let kept = keep.min(tokens);
            prop_assert_eq!(head.len(), kept);
            let (mut k, mut v) = (Vec::new(), Vec::new());
            head.dequantize(&mut k, &mut v);
            for (got, want) in k.iter().zip(&before_k).chain(v.iter().zip(&before_v)) {
                prop_assert!((got - want).abs() <= want.abs() * 2f32.powi(-11) + 1e-7, "{got} {want}");
            }
            head.append(&values(5 * d, seed + 2, 1.0), &values(5 * d, seed + 3, 1.0)).unwrap();
            prop_assert_eq!(head.len(), kept + 5);
        }
    }

    #[test]
    fn values_past_f16_are_refused_before_anything_is_stored() {
        let config = QuantizedCacheConfig::default();
        let mut head = QuantizedKv::new(config, 2).unwrap();
        let err = head.append(&[1.0, 1e6], &[0.0, 0.0]).unwrap_err();
        assert_eq!(err, KernelError::OutOfHalfRange { value: 1e6 });
        assert!(head.append(&[f32::NAN, 0.0], &[0.0, 0.0]).is_err());
        assert!(head.is_empty());
    }

    #[test]
    fn configurations_that_cannot_pack_are_refused() {
        let int4 = QuantizedCacheConfig {
            bits: QuantBits::Int4,
            group_size: 1,
            residual_len: 0,
        };
        assert!(QuantizedKv::new(int4, 3).is_err());
        let zero = QuantizedCacheConfig {
            group_size: 0,
            ..int4
        };
        assert!(QuantizedKv::new(zero, 4).is_err());
        let ragged = QuantizedCacheConfig {
            group_size: 3,
            ..int4
        };
        assert!(QuantizedKv::new(ragged, 4).is_err());
    }
}
