//! [`DynamicCache`]: grows without bound, written in place.

use burn::tensor::{backend::Backend, Tensor};

use crate::caches::buffer::{select_rows_checked, KvBuffer};
use crate::caches::kv_cache::check_update;
use crate::{error::Result, KeyPositions, KvCache, KvView};

/// Smallest buffer a [`DynamicCache`] allocates, in positions.
pub const MIN_CAPACITY: usize = 64;

/// A cache that keeps every position and grows as needed.
///
/// Storage is a buffer `[batch, kv_heads, capacity, head_dim]` whose capacity doubles when full,
/// so appending a token writes one slot in place and costs amortized O(1) in the length; a naive
/// `cat` would copy the whole history on every step instead.
///
/// ```
/// use burn::tensor::Tensor;
/// use burn_ndarray::NdArray;
/// use kv_core::{DynamicCache, KvCache};
///
/// let device = Default::default();
/// let mut cache = DynamicCache::<NdArray>::new();
/// // Prefill 5 positions, then decode one: [batch, kv_heads, new, head_dim].
/// let k = Tensor::<NdArray, 4>::ones([1, 2, 5, 8], &device);
/// cache.update(k.clone(), k).unwrap();
/// let k = Tensor::<NdArray, 4>::ones([1, 2, 1, 8], &device);
/// let view = cache.update(k.clone(), k).unwrap();
/// assert_eq!(view.keys.dims(), [1, 2, 6, 8]);
/// assert_eq!(cache.seq_len(), 6);
/// ```
#[derive(Debug, Clone)]
pub struct DynamicCache<B: Backend> {
    buffer: Option<KvBuffer<B>>,
    len: usize,
    capacity_hint: usize,
}

impl<B: Backend> Default for DynamicCache<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> DynamicCache<B> {
    /// An empty cache.
    pub fn new() -> Self {
        Self::with_capacity(MIN_CAPACITY)
    }

    /// An empty cache whose first allocation holds at least `positions` positions: pass
    /// `prompt + max_new_tokens` and generation never reallocates.
    pub fn with_capacity(positions: usize) -> Self {
        Self {
            buffer: None,
            len: 0,
            capacity_hint: positions.max(1),
        }
    }

    /// A cache holding `keys`/`values` `[batch, kv_heads, seq, head_dim]` (no copy): one layer
    /// of the legacy `(keys, values)` format.
    pub fn from_tensors(keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<Self> {
        let [_, _, len, _] = check_update(&keys, &values, None)?;
        Ok(Self {
            buffer: Some(KvBuffer::from_tensors(keys, values)),
            len,
            capacity_hint: MIN_CAPACITY,
        })
    }

    /// The held keys and values `[batch, kv_heads, seq, head_dim]`, or `None` when empty.
    pub fn to_tensors(&self) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let buffer = self.buffer.as_ref().filter(|_| self.len > 0)?;
        Some(buffer.read(0..buffer.dims()[0], 0..self.len))
    }

    /// Positions the current buffer can hold before it grows.
    pub fn capacity(&self) -> usize {
        self.buffer.as_ref().map_or(0, KvBuffer::capacity)
    }

    /// Writes keys/values `[batch, kv_heads, new, head_dim]` after the held positions without
    /// reading anything back: amortized O(1) per token. [`KvCache::update`] is this plus
    /// [`DynamicCache::view`].
    pub fn append(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<()> {
        let [batch, heads, new, head_dim] = check_update(&keys, &values, self.held_shape())?;
        let needed = self.len + new;
        let grown = capacity_for(self.capacity_hint, needed);
        let buffer = match self.buffer.take() {
            None => KvBuffer::zeros([batch, heads, grown, head_dim], &keys.device()),
            Some(buffer) if buffer.capacity() < needed => buffer.resized(batch, grown, self.len),
            Some(buffer) => buffer,
        };
        self.buffer = Some(buffer.write(self.len, keys, values));
        self.len = needed;
        Ok(())
    }

    /// What attention reads: the held positions, `[batch, kv_heads, seq, head_dim]`. On backends
    /// whose slices are copies (burn-ndarray) this copies `seq` positions unless the buffer is
    /// exactly full.
    pub fn view(&self) -> Option<KvView<B>> {
        let (keys, values) = self.to_tensors()?;
        Some(KvView {
            keys,
            values,
            positions: KeyPositions::Contiguous(0..self.len),
            query_rotary_positions: None,
        })
    }

    fn held_shape(&self) -> Option<[usize; 3]> {
        self.buffer.as_ref().map(|b| {
            let [batch, heads, _, head_dim] = b.dims();
            [batch, heads, head_dim]
        })
    }
}

impl<B: Backend> KvCache<B> for DynamicCache<B> {
    fn update(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<KvView<B>> {
        self.append(keys, values)?;
        Ok(self.view().expect("an append leaves at least one position"))
    }

    fn seq_len(&self) -> usize {
        self.len
    }

    fn held_len(&self) -> usize {
        self.len
    }

    fn max_len(&self) -> Option<usize> {
        None
    }

    fn crop(&mut self, len: usize) -> Result<()> {
        self.len = self.len.min(len);
        Ok(())
    }

    fn select_batch(&mut self, indices: &[usize]) -> Result<()> {
        select_rows_checked(&mut self.buffer, indices)
    }

    fn batch_size(&self) -> Option<usize> {
        self.held_shape().map(|[batch, _, _]| batch)
    }

    fn reset(&mut self) {
        self.buffer = None;
        self.len = 0;
    }

    fn memory_bytes(&self) -> usize {
        self.buffer.as_ref().map_or(0, KvBuffer::bytes)
    }
}

/// The slots a [`DynamicCache`] with capacity hint `hint` allocates to hold `positions`: the
/// hint (at least [`MIN_CAPACITY`]) while it suffices, then the next power of two, so the
/// capacity depends only on how many positions are held, not on how they arrived.
pub(crate) fn capacity_for(hint: usize, positions: usize) -> usize {
    let floor = hint.max(MIN_CAPACITY);
    if positions <= floor {
        floor
    } else {
        positions.next_power_of_two()
    }
}
