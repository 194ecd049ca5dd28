//! The operation vocabulary every cache kind answers.

use burn::tensor::{backend::Backend, Tensor};

use crate::{
    error::Result, grouped_query_attention, needed_attention_mask, AttentionPattern, CacheError,
    KvView,
};

/// Who applies rotary position embeddings to the keys a cache stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRotation {
    /// The caller rotates keys at their absolute positions before [`KvCache::update`]. The
    /// cache stores them as given. Every kind but a [`crate::SinkCache`] built with a rotary
    /// table works this way.
    AppliedByCaller,
    /// The caller passes keys *before* rotation; the cache rotates them on read at their
    /// position inside the cache, and [`KvView::query_rotary_positions`] says where the
    /// queries must be rotated (StreamingLLM's scheme).
    AppliedByCache,
}

/// One layer's key/value cache.
///
/// Every kind answers the same operations; keys and values are `[batch, kv_heads, seq, head_dim]`.
/// The first update fixes `batch`, `kv_heads` and `head_dim` (until [`KvCache::reset`]).
pub trait KvCache<B: Backend> {
    /// Appends the keys and values of the next `new` positions (`[batch, kv_heads, new, head_dim]`)
    /// and returns what attention must read for the queries of those positions.
    fn update(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<KvView<B>>;

    /// Whether [`KvCache::update_and_attend`] reads this cache's own storage (a
    /// [`crate::QuantizedCache`] attends over its codes), so a caller should prefer it to
    /// [`KvCache::update`] and attention over the view.
    fn attends_in_place(&self) -> bool {
        false
    }

    /// Appends keys and values (`[batch, kv_heads, new, head_dim]`) and returns the attention
    /// of `queries` (`[batch, heads, new, head_dim]`, `heads` a multiple of `kv_heads`; query
    /// head `h` reads key/value head `h / (heads / kv_heads)`) over everything the cache then
    /// holds under its [`KvCache::attention_pattern`], with scores scaled by
    /// `1 / sqrt(head_dim)`: `[batch, heads, new, head_dim]`. No padding: every row holds
    /// tokens at every position.
    ///
    /// By default, [`KvCache::update`] and [`grouped_query_attention`] over its view; a kind
    /// whose storage attention can read directly overrides it (and says so in
    /// [`KvCache::attends_in_place`]). Meant for caches whose keys the caller rotates
    /// ([`KeyRotation::AppliedByCaller`]).
    ///
    /// ```
    /// use burn::tensor::{Distribution, Tensor};
    /// use burn_ndarray::NdArray;
    /// use kv_core::{DynamicCache, KvCache};
    ///
    /// let device = Default::default();
    /// let mut cache = DynamicCache::<NdArray>::new();
    /// let k = Tensor::<NdArray, 4>::random([1, 2, 5, 8], Distribution::Default, &device);
    /// let q = Tensor::<NdArray, 4>::random([1, 4, 5, 8], Distribution::Default, &device);
    /// let out = cache.update_and_attend(q, k.clone(), k).unwrap();
    /// assert_eq!(out.dims(), [1, 4, 5, 8]);
    /// ```
    fn update_and_attend(
        &mut self,
        queries: Tensor<B, 4>,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let past = self.seq_len();
        let new = keys.dims()[2];
        let device = keys.device();
        let view = self.update(keys, values)?;
        let mask = needed_attention_mask(
            past..past + new,
            &view.positions,
            self.attention_pattern(),
            None,
            &device,
        );
        grouped_query_attention(queries, view.keys, view.values, mask, None)
    }

    /// Positions seen so far: the absolute position the next token will take.
    fn seq_len(&self) -> usize;

    /// Positions currently held (what the next view reads besides the new tokens).
    /// Equals [`KvCache::seq_len`] for kinds that never evict.
    fn held_len(&self) -> usize;

    /// The most positions this cache will hold at once, if it is bounded.
    fn max_len(&self) -> Option<usize>;

    /// Forgets every position at or after `len`; a no-op when `len >= seq_len()`.
    ///
    /// # Errors
    /// [`crate::CacheError::CropEvicted`] where a ring has overwritten the positions `len`
    /// needs back and was not asked to keep them ([`KvCache::set_rewind`]).
    fn crop(&mut self, len: usize) -> Result<()>;

    /// Keeps what a later [`KvCache::crop`] of up to `positions` of the latest positions needs,
    /// where the kind would otherwise overwrite it (a ring that has wrapped keeps a log of the
    /// positions it evicts); 0 stops keeping it. Kinds that can always crop ignore it.
    /// Speculative decoding sets it to its most guesses a pass.
    fn set_rewind(&mut self, positions: usize) {
        let _ = positions;
    }

    /// Keeps the batch rows at `indices`, in that order; an index may repeat (beam search).
    fn select_batch(&mut self, indices: &[usize]) -> Result<()>;

    /// Repeats every batch row `times` times in place (row `r` becomes rows
    /// `r * times .. (r + 1) * times`): several continuations of one prompt.
    fn repeat_batch(&mut self, times: usize) -> Result<()> {
        if times == 0 {
            return Err(CacheError::ZeroRepeat);
        }
        let batch = self.batch_size().unwrap_or(0);
        let indices: Vec<usize> = (0..batch)
            .flat_map(|row| std::iter::repeat_n(row, times))
            .collect();
        if indices.is_empty() {
            return Ok(());
        }
        self.select_batch(&indices)
    }

    /// Batch rows held, once the first update has fixed it.
    fn batch_size(&self) -> Option<usize>;

    /// Forgets everything, keeping the configuration.
    fn reset(&mut self);

    /// Bytes of device memory the cache holds now (allocated buffers, packed where quantized).
    fn memory_bytes(&self) -> usize;

    /// Who rotates the stored keys.
    fn key_rotation(&self) -> KeyRotation {
        KeyRotation::AppliedByCaller
    }

    /// Which keys a query may see when attending through this cache: the pattern under which
    /// the cache's answer equals attention over the whole uncached sequence. A window or sink
    /// cache forgets keys, so it only matches attention that never looks at them.
    fn attention_pattern(&self) -> AttentionPattern {
        AttentionPattern::Causal
    }
}

/// Checks the shapes of one update and returns `[batch, kv_heads, new, head_dim]`.
pub(crate) fn check_update<B: Backend>(
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    held: Option<[usize; 3]>,
) -> Result<[usize; 4]> {
    let k = keys.dims();
    let v = values.dims();
    if k != v {
        return Err(CacheError::KeyValueMismatch { keys: k, values: v });
    }
    if k[2] == 0 {
        return Err(CacheError::EmptyUpdate);
    }
    if let Some([batch, kv_heads, head_dim]) = held {
        if k[0] != batch || k[1] != kv_heads || k[3] != head_dim {
            return Err(CacheError::ShapeMismatch {
                batch,
                kv_heads,
                head_dim,
                got: k,
            });
        }
    }
    Ok(k)
}

/// Checks batch indices against the rows held.
pub(crate) fn check_indices(indices: &[usize], batch: usize) -> Result<()> {
    if indices.is_empty() {
        return Err(CacheError::EmptyBatchSelection);
    }
    if let Some(&index) = indices.iter().find(|&&i| i >= batch) {
        return Err(CacheError::BatchIndexOutOfRange { index, batch });
    }
    Ok(())
}
