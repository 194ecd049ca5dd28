//! [`StaticCache`]: preallocated once, written at explicit `cache_position`s.

use burn::tensor::{backend::Backend, Tensor};

use crate::caches::buffer::KvBuffer;
use crate::caches::kv_cache::{check_indices, check_update};
use crate::{error::Result, CacheError, KeyPositions, KvCache, KvView};

/// The fixed shape of a [`StaticCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticCacheConfig {
    /// Most batch rows it will hold.
    pub max_batch: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Most positions it will hold.
    pub max_len: usize,
    /// Size of one head.
    pub head_dim: usize,
}

/// A cache preallocated to `[max_batch, kv_heads, max_len, head_dim]` that never reallocates:
/// the per-layer `cache_k`/`cache_v` buffers of a classic implementation, written at
/// `start_pos` by [`StaticCache::write_at`] (or at the end by [`KvCache::update`]).
///
/// ```
/// use burn::tensor::Tensor;
/// use burn_ndarray::NdArray;
/// use kv_core::{KvCache, StaticCache, StaticCacheConfig};
///
/// let device = Default::default();
/// let config = StaticCacheConfig { max_batch: 1, kv_heads: 2, max_len: 4, head_dim: 8 };
/// let mut cache = StaticCache::<NdArray>::new(config, &device).unwrap();
/// let k = Tensor::<NdArray, 4>::ones([1, 2, 4, 8], &device);
/// cache.update(k.clone(), k).unwrap();
/// let one = Tensor::<NdArray, 4>::ones([1, 2, 1, 8], &device);
/// // Full: the error says how much room there was and how much was asked.
/// assert!(cache.update(one.clone(), one).is_err());
/// ```
#[derive(Debug, Clone)]
pub struct StaticCache<B: Backend> {
    config: StaticCacheConfig,
    buffer: Option<KvBuffer<B>>,
    batch: Option<usize>,
    len: usize,
}

impl<B: Backend> StaticCache<B> {
    /// Allocates the whole cache now.
    pub fn new(config: StaticCacheConfig, device: &B::Device) -> Result<Self> {
        let StaticCacheConfig {
            max_batch,
            kv_heads,
            max_len,
            head_dim,
        } = config;
        if max_batch == 0 || kv_heads == 0 || max_len == 0 || head_dim == 0 {
            return Err(CacheError::InvalidConfig(format!(
                "static cache sizes must be positive, got {config:?}"
            )));
        }
        Ok(Self {
            config,
            buffer: Some(KvBuffer::zeros(
                [max_batch, kv_heads, max_len, head_dim],
                device,
            )),
            batch: None,
            len: 0,
        })
    }

    /// The shape it was built with.
    pub fn config(&self) -> StaticCacheConfig {
        self.config
    }

    /// Writes keys/values `[batch, kv_heads, new, head_dim]` at positions
    /// `position..position + new` and forgets anything held after them.
    ///
    /// `position` may rewind (overwrite) but not skip: it must be at most [`KvCache::seq_len`].
    pub fn write_at(
        &mut self,
        position: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<KvView<B>> {
        let StaticCacheConfig {
            max_batch,
            kv_heads,
            max_len,
            head_dim,
        } = self.config;
        let held = self.batch.map(|batch| [batch, kv_heads, head_dim]);
        let [batch, heads, new, dim] = check_update(&keys, &values, held)?;
        if heads != kv_heads || dim != head_dim {
            return Err(CacheError::ShapeMismatch {
                batch: self.batch.unwrap_or(batch),
                kv_heads,
                head_dim,
                got: keys.dims(),
            });
        }
        if batch > max_batch {
            return Err(CacheError::BatchTooLarge {
                max_batch,
                requested: batch,
            });
        }
        if position > self.len {
            return Err(CacheError::PositionGap {
                position,
                held: self.len,
            });
        }
        if position + new > max_len {
            return Err(CacheError::CapacityExceeded {
                capacity: max_len,
                held: position,
                requested: new,
            });
        }
        let buffer = self
            .buffer
            .take()
            .expect("static buffer is allocated at construction");
        let buffer = buffer.write(position, keys, values);
        self.batch = Some(batch);
        self.len = position + new;
        let (keys, values) = buffer.read(0..batch, 0..self.len);
        self.buffer = Some(buffer);
        Ok(KvView {
            keys,
            values,
            positions: KeyPositions::Contiguous(0..self.len),
            query_rotary_positions: None,
        })
    }

    fn buffer(&self) -> &KvBuffer<B> {
        self.buffer
            .as_ref()
            .expect("static buffer is allocated at construction")
    }
}

impl<B: Backend> KvCache<B> for StaticCache<B> {
    fn update(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<KvView<B>> {
        self.write_at(self.len, keys, values)
    }

    fn seq_len(&self) -> usize {
        self.len
    }

    fn held_len(&self) -> usize {
        self.len
    }

    fn max_len(&self) -> Option<usize> {
        Some(self.config.max_len)
    }

    fn crop(&mut self, len: usize) -> Result<()> {
        self.len = self.len.min(len);
        Ok(())
    }

    fn select_batch(&mut self, indices: &[usize]) -> Result<()> {
        let Some(batch) = self.batch else {
            return Ok(());
        };
        check_indices(indices, batch)?;
        if indices.len() > self.config.max_batch {
            return Err(CacheError::BatchTooLarge {
                max_batch: self.config.max_batch,
                requested: indices.len(),
            });
        }
        // Keep the buffer at max_batch rows: the rows past the selection are filler.
        let mut rows = indices.to_vec();
        rows.resize(self.config.max_batch, 0);
        let buffer = self
            .buffer
            .take()
            .expect("static buffer is allocated at construction");
        self.buffer = Some(buffer.select_rows(&rows));
        self.batch = Some(indices.len());
        Ok(())
    }

    fn batch_size(&self) -> Option<usize> {
        self.batch
    }

    fn reset(&mut self) {
        self.batch = None;
        self.len = 0;
    }

    fn memory_bytes(&self) -> usize {
        self.buffer().bytes()
    }
}
