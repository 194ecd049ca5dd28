//! [`QuantizedCache`]: KIVI-style int8/int4 keys and values with an f16 residual, kept in host
//! memory where attention reads the codes directly.
//!
//! Each head's storage and the attention that reads it are kv-kernels'
//! [`QuantizedKv`](kv_kernels::quantized_kv::QuantizedKv), whose module docs say where the
//! layout comes from and what it costs. This type puts it behind the [`KvCache`] vocabulary:
//! tensors in, tensors out, one `QuantizedKv` per batch row and key/value head.
//!
//! Where the codes live: in host memory, on every backend. A CPU backend (the case this cache
//! is built for: a long context on a machine whose memory is the limit) then attends over
//! them in place through [`KvCache::update_and_attend`], reading a quarter (int8) or an eighth
//! (int4) of the bytes a full-precision cache would. On a GPU backend each layer's step
//! downloads the new queries, keys and values (a few KiB) and uploads the attention output;
//! the history never crosses.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use kv_kernels::attention::{merge_parts, RowStats};
use kv_kernels::quantized_kv::{check_half_range, AttendScratch, QuantizedKv};
use kv_kernels::{Isa, KernelError, Threads};

use crate::caches::kv_cache::{check_indices, check_update};
use crate::{error::Result, CacheError, KeyPositions, KvCache, KvView};

pub use kv_kernels::quantized_kv::{QuantBits, QuantizedCacheConfig};

/// A cache that stores old keys and values in 8 or 4 bits (KIVI).
///
/// Keys are quantized per channel over groups of `group_size` tokens (their outliers sit in
/// fixed channels); values per token over groups of `group_size` channels (capped at
/// `head_dim`). Quantization is asymmetric: `code = round((x - min) / scale)` with
/// `scale = (max - min) / (2^bits - 1)` for each group, scale and minimum stored in f16.
/// **Error bound:** every element of a quantized group dequantizes to within half a step
/// (`(max - min) / (2 * (2^bits - 1))`, the stored f16 scale) plus its own f16 rounding (a
/// relative `2^-11`); the most recent `residual_len` or more tokens are within that f16
/// rounding.
///
/// New tokens enter the f16 residual; whenever it holds `residual_len + group_size` or more,
/// its oldest whole groups are quantized. [`KvCache::memory_bytes`] counts the codes (one byte
/// for two int4 elements), the f16 scales and minimums, and the residual.
/// [`KvCache::update_and_attend`] attends over the codes one head at a time;
/// [`KvCache::update`] widens the whole history into f32 tensors (for callers that need the
/// keys and values themselves).
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
/// // Attention of 6 query heads (3 per key/value head) for one new token, over the codes.
/// let q = Tensor::<NdArray, 4>::ones([1, 6, 1, 16], &device);
/// let k = Tensor::<NdArray, 4>::ones([1, 2, 1, 16], &device);
/// let out = cache.update_and_attend(q, k.clone(), k).unwrap();
/// assert_eq!(out.dims(), [1, 6, 1, 16]);
/// ```
#[derive(Debug, Clone)]
pub struct QuantizedCache<B: Backend> {
    config: QuantizedCacheConfig,
    /// `[batch, kv_heads, head_dim]`, fixed by the first update.
    shape: Option<[usize; 3]>,
    /// One per batch row and key/value head, row-major (`heads[b * kv_heads + h]`).
    heads: Vec<QuantizedKv>,
    /// Where views and attention outputs are made, from the first update.
    device: Option<B::Device>,
}

thread_local! {
    /// The buffer each thread widens one head's keys into while attending: reused across
    /// heads, layers and steps, so the caches themselves hold only codes.
    static SCRATCH: RefCell<AttendScratch> = RefCell::new(AttendScratch::default());
}

/// Fewest keys each thread takes when attention over the codes is split by keys: below
/// this a hand-off costs more than it saves.
const MIN_KEYS_PER_THREAD: usize = 128;

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
            heads: Vec::new(),
            device: None,
        })
    }

    /// How it quantizes.
    pub fn config(&self) -> QuantizedCacheConfig {
        self.config
    }

    /// Positions held in quantized form.
    pub fn quantized_len(&self) -> usize {
        self.heads.first().map_or(0, QuantizedKv::quantized_len)
    }

    /// Appends `keys`/`values` `[batch, kv_heads, new, head_dim]` to each head's storage.
    fn append(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<()> {
        let [b, h, new, d] = check_update(&keys, &values, self.shape)?;
        if self.shape.is_none() {
            let head = QuantizedKv::new(self.config, d).map_err(invalid)?;
            self.heads = vec![head; b * h];
            self.shape = Some([b, h, d]);
            self.device = Some(keys.device());
        }
        let (keys, values) = (host(keys), host(values));
        let rows = new * d;
        // Checked for every head before any is written, so a refused update leaves the
        // cache as it was.
        check_half_range(&keys)
            .and(check_half_range(&values))
            .map_err(invalid)?;
        for (head, (k, v)) in self
            .heads
            .iter_mut()
            .zip(keys.chunks_exact(rows).zip(values.chunks_exact(rows)))
        {
            head.append(k, v).map_err(invalid)?;
        }
        Ok(())
    }

    fn device(&self) -> &B::Device {
        self.device.as_ref().expect("set by the first update")
    }
}

/// A tensor's values on the host, row-major.
fn host<B: Backend>(x: Tensor<B, 4>) -> Vec<f32> {
    x.into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 after convert")
}

fn invalid(e: KernelError) -> CacheError {
    match e {
        KernelError::OutOfHalfRange { value } => CacheError::OutOfHalfRange { value },
        other => CacheError::InvalidConfig(other.to_string()),
    }
}

impl<B: Backend> KvCache<B> for QuantizedCache<B> {
    fn update(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<KvView<B>> {
        self.append(keys, values)?;
        let [b, h, d] = self.shape.expect("set by append");
        let len = self.seq_len();
        let mut all_keys = Vec::with_capacity(b * h * len * d);
        let mut all_values = Vec::with_capacity(b * h * len * d);
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for head in &self.heads {
            head.dequantize(&mut k, &mut v);
            all_keys.extend_from_slice(&k);
            all_values.extend_from_slice(&v);
        }
        let tensor = |values: Vec<f32>| {
            Tensor::from_data(TensorData::new(values, [b, h, len, d]), self.device())
        };
        Ok(KvView {
            keys: tensor(all_keys),
            values: tensor(all_values),
            positions: KeyPositions::Contiguous(0..len),
            query_rotary_positions: None,
        })
    }

    fn attends_in_place(&self) -> bool {
        true
    }

    /// Attends over the codes. The keys are cut into ranges over kv-kernels' threads (the
    /// workers of the matrix products, idle during attention), each widening its range of
    /// every head into a buffer of its own and attending there; the parts merge exactly
    /// (flash-decoding's split, as the dense decode path does).
    fn update_and_attend(
        &mut self,
        queries: Tensor<B, 4>,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let [batch, q_heads, new, d] = queries.dims();
        let [kb, kv_heads, kn, kd] = keys.dims();
        if [batch, new, d] != [kb, kn, kd] || kv_heads == 0 || q_heads % kv_heads != 0 {
            return Err(CacheError::QueryShape {
                queries: queries.dims(),
                keys: keys.dims(),
            });
        }
        let past = self.seq_len();
        self.append(keys, values)?;
        let groups = q_heads / kv_heads;
        // Rows of one key/value head: its `groups` query heads, each with `new` positions;
        // position `i` sees keys `0..past + i + 1`.
        let ends: Vec<usize> = (0..groups)
            .flat_map(|_| (0..new).map(|i| past + i + 1))
            .collect();
        let per_head = groups * new * d;
        let (isa, scale) = (Isa::best(), 1.0 / (d as f32).sqrt());
        let task = {
            // Cheap clones (shared code blocks), which the worker threads may read while
            // this cache takes the next update.
            let heads = self.heads.clone();
            let q = host(queries);
            Arc::new(move |keys: Range<usize>| {
                SCRATCH.with_borrow_mut(|scratch| {
                    let mut out = vec![0.0f32; q.len()];
                    let mut stats = Vec::with_capacity(heads.len() * ends.len());
                    for (head, (q, out)) in heads
                        .iter()
                        .zip(q.chunks_exact(per_head).zip(out.chunks_exact_mut(per_head)))
                    {
                        stats.extend(head.attend_partial(
                            isa,
                            q,
                            &ends,
                            keys.clone(),
                            scale,
                            out,
                            d,
                            scratch,
                        ));
                    }
                    (out, stats)
                })
            })
        };
        let parts = Threads::global().split(past + new, MIN_KEYS_PER_THREAD, task);
        let mut out = vec![0.0f32; batch * q_heads * new * d];
        for (row, merged) in out.chunks_exact_mut(d).enumerate() {
            let row_parts: Vec<(&[f32], RowStats)> = parts
                .iter()
                .map(|(_, (values, stats))| (&values[row * d..][..d], stats[row]))
                .collect();
            merge_parts(&row_parts, merged);
        }
        Ok(Tensor::from_data(
            TensorData::new(out, [batch, q_heads, new, d]),
            self.device(),
        ))
    }

    fn seq_len(&self) -> usize {
        self.heads.first().map_or(0, QuantizedKv::len)
    }

    fn held_len(&self) -> usize {
        self.seq_len()
    }

    fn max_len(&self) -> Option<usize> {
        None
    }

    fn crop(&mut self, len: usize) -> Result<()> {
        self.heads.iter_mut().for_each(|head| head.truncate(len));
        Ok(())
    }

    fn select_batch(&mut self, indices: &[usize]) -> Result<()> {
        let Some([batch, h, d]) = self.shape else {
            return Ok(());
        };
        check_indices(indices, batch)?;
        self.heads = indices
            .iter()
            .flat_map(|&row| self.heads[row * h..(row + 1) * h].iter().cloned())
            .collect();
        self.shape = Some([indices.len(), h, d]);
        Ok(())
    }

    fn batch_size(&self) -> Option<usize> {
        self.shape.map(|[batch, _, _]| batch)
    }

    fn reset(&mut self) {
        self.shape = None;
        self.heads.clear();
        self.device = None;
    }

    fn memory_bytes(&self) -> usize {
        self.heads.iter().map(QuantizedKv::bytes).sum()
    }
}
