//! [`QuantizedCache`]: KIVI-style int8/int4 keys and values with a full-precision residual.

use burn::tensor::{backend::Backend, DType, Int, IntDType, Tensor};

use crate::cache::{check_indices, check_update};
use crate::{error::Result, CacheError, KeyPositions, KvCache, KvView};

/// Bits per quantized element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

/// How a [`QuantizedCache`] quantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizedCacheConfig {
    /// Bits per element.
    pub bits: QuantBits,
    /// Tokens per key group (keys are quantized per channel over this many tokens), and
    /// channels per value group (capped at `head_dim`; values are quantized per token).
    pub group_size: usize,
    /// Most recent positions kept in full precision (at least this many, fewer than
    /// `residual_len + group_size`).
    pub residual_len: usize,
}

impl Default for QuantizedCacheConfig {
    /// 4 bits, groups of 64, 128 recent tokens in full precision (transformers' defaults).
    fn default() -> Self {
        Self {
            bits: QuantBits::Int4,
            group_size: 64,
            residual_len: 128,
        }
    }
}

/// Packed codes `[batch, kv_heads, tokens, head_dim / per_byte]` (u8) with the `scale` and `min`
/// of each group.
#[derive(Debug, Clone)]
struct Packed<B: Backend> {
    codes: Tensor<B, 4, Int>,
    scale: Tensor<B, 4>,
    min: Tensor<B, 4>,
}

impl<B: Backend> Packed<B> {
    fn cat(self, other: Self) -> Self {
        Self {
            codes: Tensor::cat(vec![self.codes, other.codes], 2),
            scale: Tensor::cat(vec![self.scale, other.scale], 2),
            min: Tensor::cat(vec![self.min, other.min], 2),
        }
    }

    fn select_rows(self, index: Tensor<B, 1, Int>) -> Self {
        Self {
            codes: self.codes.select(0, index.clone()),
            scale: self.scale.select(0, index.clone()),
            min: self.min.select(0, index),
        }
    }

    fn bytes(&self) -> usize {
        let count = |dims: [usize; 4]| dims.iter().product::<usize>();
        count(self.codes.dims()) * self.codes.dtype().size()
            + count(self.scale.dims()) * self.scale.dtype().size()
            + count(self.min.dims()) * self.min.dtype().size()
    }
}

/// Quantizes `x` `[.., group, ..]` whose groups run along `axis` of a 5-D view: returns codes
/// shaped like `x`, and `scale`/`min` with `axis` reduced to 1.
fn quantize_groups<B: Backend>(
    x: Tensor<B, 5>,
    axis: usize,
    bits: QuantBits,
) -> (Tensor<B, 5>, Tensor<B, 5>, Tensor<B, 5>) {
    let min = x.clone().min_dim(axis);
    let max = x.clone().max_dim(axis);
    let scale = (max - min.clone()).div_scalar(bits.max_code() as f32);
    // A constant group has scale 0: every code is 0 and dequantizes to `min` exactly.
    let scale = scale.clone().mask_fill(scale.equal_elem(0.0), 1.0);
    let codes = (x - min.clone())
        .div(scale.clone())
        .round()
        .clamp(0.0, bits.max_code() as f32);
    (codes, scale, min)
}

/// Float codes `[b, h, t, d]` to packed u8 `[b, h, t, d / per_byte]`, or i32 elements
/// holding the same byte values on a backend without 8-bit integers (WGSL, so burn-wgpu):
/// the numbers are the same, the codes then take four times the memory.
fn pack<B: Backend>(codes: Tensor<B, 4>, bits: QuantBits) -> Tensor<B, 4, Int> {
    let dtype = if B::supports_dtype(&codes.device(), DType::U8) {
        IntDType::U8
    } else {
        IntDType::I32
    };
    let codes = codes.int().cast(dtype);
    match bits {
        QuantBits::Int8 => codes,
        // Channel `c < d / 2` in the low nibble of byte `c`, channel `c + d / 2` in its high
        // nibble: unpacking is then two whole halves side by side, which CPU backends copy in
        // runs, where interleaved pairs would be written one element at a time.
        QuantBits::Int4 => {
            let half = codes.dims()[3] / 2;
            let low = codes.clone().narrow(3, 0, half);
            let high = codes.narrow(3, half, half);
            low + high.mul_scalar(16)
        }
    }
}

/// Packed u8 `[b, h, t, d / per_byte]` back to float codes `[b, h, t, d]`.
fn unpack<B: Backend>(packed: Tensor<B, 4, Int>, bits: QuantBits) -> Tensor<B, 4> {
    match bits {
        QuantBits::Int8 => packed.float(),
        QuantBits::Int4 => {
            let low = packed.clone().remainder_scalar(16);
            let high = packed.div_scalar(16);
            Tensor::cat(vec![low, high], 3).float()
        }
    }
}

/// A cache that stores old keys and values in 8 or 4 bits (KIVI).
///
/// Keys are quantized per channel over groups of `group_size` tokens (their outliers sit in
/// fixed channels); values per token over groups of `group_size` channels (capped at
/// `head_dim`). Quantization is asymmetric: `code = round((x - min) / scale)` with
/// `scale = (max - min) / (2^bits - 1)` for each group. **Error bound:** every element of a
/// quantized group dequantizes to within `scale / 2 = (max - min) / (2 * (2^bits - 1))` of its
/// value (plus f32 rounding); the most recent `residual_len` or more tokens are exact.
///
/// New tokens enter the full-precision residual; whenever it holds `residual_len + group_size`
/// or more, its oldest whole groups are quantized and appended to the packed history.
/// [`KvCache::memory_bytes`] counts the packed codes (one byte for two int4 elements), the f32
/// scales and minimums, and the residual. Each update dequantizes the history for attention,
/// trading compute for memory.
///
/// ```
/// use burn::tensor::Tensor;
/// use burn_ndarray::NdArray;
/// use kv_core::{KvCache, QuantBits, QuantizedCache, QuantizedCacheConfig};
///
/// let device = Default::default();
/// let config = QuantizedCacheConfig { bits: QuantBits::Int4, group_size: 8, residual_len: 8 };
/// let mut cache = QuantizedCache::<NdArray>::new(config).unwrap();
/// let k = Tensor::<NdArray, 4>::ones([1, 2, 64, 16], &device);
/// let view = cache.update(k.clone(), k).unwrap();
/// assert_eq!(view.keys.dims(), [1, 2, 64, 16]);
/// assert_eq!(cache.quantized_len(), 56);
/// ```
#[derive(Debug, Clone)]
pub struct QuantizedCache<B: Backend> {
    config: QuantizedCacheConfig,
    /// `[batch, kv_heads, head_dim]`, fixed by the first update.
    shape: Option<[usize; 3]>,
    /// Keys: codes per token, `scale`/`min` `[b, h, groups, head_dim]`.
    keys: Option<Packed<B>>,
    /// Values: codes per token, `scale`/`min` `[b, h, tokens, head_dim / value_group]`.
    values: Option<Packed<B>>,
    quantized_len: usize,
    /// Recent keys and values in full precision, `[b, h, r, head_dim]`.
    residual: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl<B: Backend> QuantizedCache<B> {
    /// An empty cache.
    pub fn new(config: QuantizedCacheConfig) -> Result<Self> {
        if config.group_size == 0 {
            return Err(CacheError::InvalidConfig(
                "group_size must be at least 1".into(),
            ));
        }
        Ok(Self {
            config,
            shape: None,
            keys: None,
            values: None,
            quantized_len: 0,
            residual: None,
        })
    }

    /// How it quantizes.
    pub fn config(&self) -> QuantizedCacheConfig {
        self.config
    }

    /// Positions held in quantized form.
    pub fn quantized_len(&self) -> usize {
        self.quantized_len
    }

    fn residual_len(&self) -> usize {
        self.residual.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    fn value_group(&self, head_dim: usize) -> usize {
        self.config.group_size.min(head_dim)
    }

    fn check_head_dim(&self, head_dim: usize) -> Result<()> {
        let group = self.value_group(head_dim);
        if !head_dim.is_multiple_of(group) {
            return Err(CacheError::InvalidConfig(format!(
                "head_dim {head_dim} is not a multiple of the value group size {group}: choose a \
                 group_size that divides head_dim"
            )));
        }
        if self.config.bits == QuantBits::Int4 && !head_dim.is_multiple_of(2) {
            return Err(CacheError::InvalidConfig(format!(
                "int4 packs two channels per byte, so head_dim must be even, got {head_dim}"
            )));
        }
        Ok(())
    }

    /// Quantizes `keys`/`values` `[b, h, n * group_size, d]`.
    fn quantize(&self, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> (Packed<B>, Packed<B>) {
        let [b, h, t, d] = keys.dims();
        let g = self.config.group_size;
        let bits = self.config.bits;
        let (codes, scale, min) = quantize_groups(keys.reshape([b, h, t / g, g, d]), 3, bits);
        let keys = Packed {
            codes: pack(codes.reshape([b, h, t, d]), bits),
            scale: scale.reshape([b, h, t / g, d]),
            min: min.reshape([b, h, t / g, d]),
        };
        let vg = self.value_group(d);
        let (codes, scale, min) = quantize_groups(values.reshape([b, h, t, d / vg, vg]), 4, bits);
        let values = Packed {
            codes: pack(codes.reshape([b, h, t, d]), bits),
            scale: scale.reshape([b, h, t, d / vg]),
            min: min.reshape([b, h, t, d / vg]),
        };
        (keys, values)
    }

    /// The whole quantized history, dequantized: keys and values `[b, h, quantized_len, d]`.
    fn dequantize(&self) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let (keys, values) = (self.keys.as_ref()?, self.values.as_ref()?);
        let [b, h, d] = self.shape?;
        let (t, g, vg, bits) = (
            self.quantized_len,
            self.config.group_size,
            self.value_group(d),
            self.config.bits,
        );
        // Scales and minimums are repeated to the codes' shape before the products: CPU
        // backends multiply equal shapes on their contiguous fast path, and a broadcast on
        // their element-by-element strided one (several times slower here).
        let per_key_group =
            |x: &Tensor<B, 4>| x.clone().reshape([b, h, t / g, 1, d]).repeat_dim(3, g);
        let k = unpack(keys.codes.clone(), bits).reshape([b, h, t / g, g, d]);
        let k = k * per_key_group(&keys.scale) + per_key_group(&keys.min);
        let per_value_group =
            |x: &Tensor<B, 4>| x.clone().reshape([b, h, t, d / vg, 1]).repeat_dim(4, vg);
        let v = unpack(values.codes.clone(), bits).reshape([b, h, t, d / vg, vg]);
        let v = v * per_value_group(&values.scale) + per_value_group(&values.min);
        Some((k.reshape([b, h, t, d]), v.reshape([b, h, t, d])))
    }

    /// Quantizes the residual's oldest whole groups beyond the `residual_len` most recent.
    fn flush(&mut self) {
        let g = self.config.group_size;
        let r = self.residual_len();
        if r < self.config.residual_len + g {
            return;
        }
        let count = (r - self.config.residual_len) / g * g;
        let (keys, values) = self.residual.take().expect("residual is not empty");
        let (qk, qv) = self.quantize(
            keys.clone().narrow(2, 0, count),
            values.clone().narrow(2, 0, count),
        );
        self.keys = Some(match self.keys.take() {
            Some(old) => old.cat(qk),
            None => qk,
        });
        self.values = Some(match self.values.take() {
            Some(old) => old.cat(qv),
            None => qv,
        });
        self.quantized_len += count;
        self.residual = (count < r).then(|| {
            (
                keys.narrow(2, count, r - count),
                values.narrow(2, count, r - count),
            )
        });
    }
}

impl<B: Backend> KvCache<B> for QuantizedCache<B> {
    fn update(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<KvView<B>> {
        let [b, h, _, d] = check_update(&keys, &values, self.shape)?;
        if self.shape.is_none() {
            self.check_head_dim(d)?;
            self.shape = Some([b, h, d]);
        }
        self.residual = Some(match self.residual.take() {
            Some((old_k, old_v)) => (
                Tensor::cat(vec![old_k, keys], 2),
                Tensor::cat(vec![old_v, values], 2),
            ),
            None => (keys, values),
        });
        self.flush();
        let (keys, values) = match (self.dequantize(), self.residual.clone()) {
            (Some((qk, qv)), Some((rk, rv))) => {
                (Tensor::cat(vec![qk, rk], 2), Tensor::cat(vec![qv, rv], 2))
            }
            (Some(quantized), None) => quantized,
            (None, Some(residual)) => residual,
            (None, None) => unreachable!("an update of at least one token was just stored"),
        };
        Ok(KvView {
            keys,
            values,
            positions: KeyPositions::Contiguous(0..self.seq_len()),
            query_rotary_positions: None,
        })
    }

    fn seq_len(&self) -> usize {
        self.quantized_len + self.residual_len()
    }

    fn held_len(&self) -> usize {
        self.seq_len()
    }

    fn max_len(&self) -> Option<usize> {
        None
    }

    fn crop(&mut self, len: usize) -> Result<()> {
        let total = self.seq_len();
        if len >= total {
            return Ok(());
        }
        if len >= self.quantized_len {
            let keep = len - self.quantized_len;
            self.residual = self
                .residual
                .take()
                .filter(|_| keep > 0)
                .map(|(k, v)| (k.narrow(2, 0, keep), v.narrow(2, 0, keep)));
            return Ok(());
        }
        // Keep whole groups packed; the partial group's tokens return to the residual,
        // dequantized (so within the error bound, as before).
        let g = self.config.group_size;
        let kept = len / g * g;
        let (dk, dv) = self.dequantize().expect("quantized history is not empty");
        self.residual = (len > kept).then(|| {
            (
                dk.narrow(2, kept, len - kept),
                dv.narrow(2, kept, len - kept),
            )
        });
        if kept == 0 {
            self.keys = None;
            self.values = None;
        } else {
            let keys = self.keys.take().expect("quantized keys");
            let values = self.values.take().expect("quantized values");
            self.keys = Some(Packed {
                codes: keys.codes.narrow(2, 0, kept),
                scale: keys.scale.narrow(2, 0, kept / g),
                min: keys.min.narrow(2, 0, kept / g),
            });
            self.values = Some(Packed {
                codes: values.codes.narrow(2, 0, kept),
                scale: values.scale.narrow(2, 0, kept),
                min: values.min.narrow(2, 0, kept),
            });
        }
        self.quantized_len = kept;
        Ok(())
    }

    fn select_batch(&mut self, indices: &[usize]) -> Result<()> {
        let Some([batch, h, d]) = self.shape else {
            return Ok(());
        };
        check_indices(indices, batch)?;
        let device = match (&self.residual, &self.keys) {
            (Some((k, _)), _) => k.device(),
            (None, Some(keys)) => keys.scale.device(),
            (None, None) => return Ok(()),
        };
        let index = crate::buffer::index_tensor::<B>(indices, &device);
        self.keys = self.keys.take().map(|p| p.select_rows(index.clone()));
        self.values = self.values.take().map(|p| p.select_rows(index.clone()));
        self.residual = self
            .residual
            .take()
            .map(|(k, v)| (k.select(0, index.clone()), v.select(0, index)));
        self.shape = Some([indices.len(), h, d]);
        Ok(())
    }

    fn batch_size(&self) -> Option<usize> {
        self.shape.map(|[batch, _, _]| batch)
    }

    fn reset(&mut self) {
        self.shape = None;
        self.keys = None;
        self.values = None;
        self.quantized_len = 0;
        self.residual = None;
    }

    fn memory_bytes(&self) -> usize {
        let packed = |p: &Option<Packed<B>>| p.as_ref().map_or(0, Packed::bytes);
        let residual = self.residual.as_ref().map_or(0, |(k, v)| {
            let elements: usize = k.dims().iter().product();
            elements * (k.dtype().size() + v.dtype().size())
        });
        packed(&self.keys) + packed(&self.values) + residual
    }
}
