//! [`AnyCache`]: one type for every kind, chosen at run time, and [`CacheConfig`] to build it.

use burn::tensor::{backend::Backend, Tensor};

use crate::{
    error::Result, AttentionPattern, CacheError, DynamicCache, KeyRotation, KvCache, KvView,
    PagedCache, PagedCacheConfig, QuantizedCache, QuantizedCacheConfig, RotaryTable, SinkCache,
    SinkPositions, SlidingWindowCache, StaticCache, StaticCacheConfig,
};

/// Which cache kind to build, with its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheConfig {
    /// [`DynamicCache`], preallocating `capacity` positions.
    Dynamic {
        /// First allocation, in positions (it grows past this as needed).
        capacity: usize,
    },
    /// [`StaticCache`] of `max_batch x max_len`.
    Static {
        /// Most batch rows.
        max_batch: usize,
        /// Most positions.
        max_len: usize,
    },
    /// [`SlidingWindowCache`].
    SlidingWindow {
        /// Positions kept.
        window: usize,
    },
    /// [`SinkCache`].
    Sink {
        /// First positions kept forever.
        sinks: usize,
        /// Last positions kept.
        window: usize,
        /// Whether the cache re-rotates its keys at their rank in the cache (StreamingLLM, with
        /// the model's own rotary table) or keeps them at their text positions.
        positions: SinkPositions,
    },
    /// [`QuantizedCache`].
    Quantized(QuantizedCacheConfig),
    /// [`PagedCache`].
    Paged(PagedCacheConfig),
}

/// The per-layer shape a [`CacheConfig`] needs to preallocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    /// Key/value heads.
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
}

impl CacheConfig {
    /// Bytes one layer's cache of this kind holds after `positions` positions of `batch` rows
    /// were appended (in any chunks), computed from its layout without building it:
    /// `float_bytes` per stored float (4 for f32), one byte per quantized code byte.
    ///
    /// The exact kinds hold `2 x batch x kv_heads x head_dim x float_bytes` per slot, over
    /// the capacity hint or `positions` rounded up to the next power of two (dynamic), `max_len` (static) or the
    /// window (sliding, sink). The quantized kind holds its oldest whole groups as codes plus an
    /// f16 scale and minimum per group, and the rest in f16, whatever `float_bytes` is.
    ///
    /// ```
    /// use kv_core::{CacheConfig, LayerShape};
    ///
    /// let shape = LayerShape { kv_heads: 3, head_dim: 64 };
    /// let sliding = CacheConfig::SlidingWindow { window: 256 };
    /// assert_eq!(sliding.predicted_bytes(shape, 1, 10_000, 4), 2 * 3 * 64 * 256 * 4);
    /// ```
    pub fn predicted_bytes(
        &self,
        shape: LayerShape,
        batch: usize,
        positions: usize,
        float_bytes: usize,
    ) -> usize {
        let LayerShape { kv_heads, head_dim } = shape;
        let per_slot = 2 * batch * kv_heads * head_dim * float_bytes;
        if positions == 0 && !matches!(self, CacheConfig::Static { .. }) {
            return 0;
        }
        match *self {
            CacheConfig::Dynamic { capacity } => {
                per_slot * crate::caches::dynamic::capacity_for(capacity, positions)
            }
            CacheConfig::Static { max_batch, max_len } => {
                2 * max_batch * kv_heads * head_dim * float_bytes * max_len
            }
            CacheConfig::SlidingWindow { window } => per_slot * window,
            CacheConfig::Sink { sinks, window, .. } => per_slot * (sinks + window),
            // Codes and f16 parameters and residual, whatever the model's float size.
            CacheConfig::Quantized(config) => batch * kv_heads * config.bytes(head_dim, positions),
            // The whole pool: its first size, doubled until every row's blocks fit.
            CacheConfig::Paged(config) => {
                let needed = batch * positions.div_ceil(config.block_size);
                let mut blocks = config.initial_blocks.max(1);
                while blocks < needed {
                    blocks *= 2;
                }
                2 * kv_heads * head_dim * float_bytes * blocks * config.block_size
            }
        }
    }

    /// Whether the positions a model encodes through this cache stay inside the cache (a sink
    /// cache that re-rotates its keys at their rank), so a text may run past the model's
    /// context; every other kind gives the model text positions.
    ///
    /// ```
    /// use kv_core::{CacheConfig, SinkPositions};
    ///
    /// let sink = CacheConfig::Sink { sinks: 4, window: 60, positions: SinkPositions::CacheRanks };
    /// assert!(sink.bounds_positions());
    /// assert!(!CacheConfig::Dynamic { capacity: 64 }.bounds_positions());
    /// ```
    pub fn bounds_positions(&self) -> bool {
        matches!(
            self,
            CacheConfig::Sink {
                positions: SinkPositions::CacheRanks,
                ..
            }
        )
    }

    /// The cache a layer that attends over only its last `window` positions (a model's
    /// sliding-window layer) gets when `self` is asked for: the kinds that hold every position
    /// (dynamic, static) become a ring of `window` slots, as transformers' hybrid cache gives
    /// such layers, since nothing older is ever read; a sliding ring narrower than `window`
    /// stays as it is and a wider one is narrowed; the quantized and paged kinds are kept (the
    /// layer's mask hides what it does not see). `None` for a sink cache, whose sinks a
    /// windowed layer could never see: it would not compute the model.
    ///
    /// ```
    /// use kv_core::CacheConfig;
    ///
    /// let full = CacheConfig::Dynamic { capacity: 64 };
    /// assert_eq!(full.for_window(512), Some(CacheConfig::SlidingWindow { window: 512 }));
    /// let narrow = CacheConfig::SlidingWindow { window: 128 };
    /// assert_eq!(narrow.for_window(512), Some(narrow.clone()));
    /// ```
    pub fn for_window(&self, window: usize) -> Option<CacheConfig> {
        match self {
            CacheConfig::Dynamic { .. } | CacheConfig::Static { .. } => {
                Some(CacheConfig::SlidingWindow { window })
            }
            CacheConfig::SlidingWindow { window: own } => Some(CacheConfig::SlidingWindow {
                window: window.min(*own),
            }),
            CacheConfig::Sink { .. } => None,
            CacheConfig::Quantized(_) | CacheConfig::Paged(_) => Some(self.clone()),
        }
    }

    /// Builds one layer's cache. `rotary` is the model's rotary table, which a sink cache
    /// that re-rotates its keys ([`SinkPositions::CacheRanks`]) needs; other kinds ignore it.
    ///
    /// ```
    /// use burn_ndarray::NdArray;
    /// use kv_core::{CacheConfig, KeyRotation, KvCache, LayerShape, RotaryTable, SinkPositions};
    ///
    /// let device = Default::default();
    /// let shape = LayerShape { kv_heads: 2, head_dim: 8 };
    /// let rope = RotaryTable::<NdArray>::new(8, 10_000.0, &device).unwrap();
    /// let sink = CacheConfig::Sink { sinks: 4, window: 60, positions: SinkPositions::CacheRanks };
    /// let cache = sink.build(shape, Some(&rope), &device).unwrap();
    /// assert_eq!(cache.key_rotation(), KeyRotation::AppliedByCache);
    /// assert!(sink.build::<NdArray>(shape, None, &device).is_err()); // no table to rotate with
    /// ```
    pub fn build<B: Backend>(
        &self,
        shape: LayerShape,
        rotary: Option<&RotaryTable<B>>,
        device: &B::Device,
    ) -> Result<AnyCache<B>> {
        Ok(match *self {
            CacheConfig::Dynamic { capacity } => {
                AnyCache::Dynamic(DynamicCache::with_capacity(capacity))
            }
            CacheConfig::Static { max_batch, max_len } => AnyCache::Static(StaticCache::new(
                StaticCacheConfig {
                    max_batch,
                    kv_heads: shape.kv_heads,
                    max_len,
                    head_dim: shape.head_dim,
                },
                device,
            )?),
            CacheConfig::SlidingWindow { window } => {
                AnyCache::SlidingWindow(SlidingWindowCache::new(window)?)
            }
            CacheConfig::Sink {
                sinks,
                window,
                positions: SinkPositions::TextPositions,
            } => AnyCache::Sink(SinkCache::new(sinks, window)?),
            CacheConfig::Sink {
                sinks,
                window,
                positions: SinkPositions::CacheRanks,
            } => {
                let rotary = rotary.ok_or(CacheError::SinkNeedsRotary)?;
                if rotary.head_dim() != shape.head_dim {
                    return Err(CacheError::RotaryHeadDim {
                        rotary: rotary.head_dim(),
                        head_dim: shape.head_dim,
                    });
                }
                AnyCache::Sink(SinkCache::with_rotary(sinks, window, rotary.clone())?)
            }
            CacheConfig::Quantized(config) => AnyCache::Quantized(QuantizedCache::new(config)?),
            CacheConfig::Paged(config) => {
                if config.block_size == 0 {
                    return Err(CacheError::ZeroBlockSize);
                }
                AnyCache::Paged(PagedCache::new(config))
            }
        })
    }
}

/// Any cache kind behind one type, for code that picks the kind at run time.
#[derive(Debug, Clone)]
pub enum AnyCache<B: Backend> {
    /// See [`DynamicCache`].
    Dynamic(DynamicCache<B>),
    /// See [`StaticCache`].
    Static(StaticCache<B>),
    /// See [`SlidingWindowCache`].
    SlidingWindow(SlidingWindowCache<B>),
    /// See [`SinkCache`].
    Sink(SinkCache<B>),
    /// See [`QuantizedCache`].
    Quantized(QuantizedCache<B>),
    /// See [`PagedCache`].
    Paged(PagedCache<B>),
}

macro_rules! each_kind {
    ($self:expr, $cache:ident => $body:expr) => {
        match $self {
            AnyCache::Dynamic($cache) => $body,
            AnyCache::Static($cache) => $body,
            AnyCache::SlidingWindow($cache) => $body,
            AnyCache::Sink($cache) => $body,
            AnyCache::Quantized($cache) => $body,
            AnyCache::Paged($cache) => $body,
        }
    };
}

impl<B: Backend> KvCache<B> for AnyCache<B> {
    fn update(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<KvView<B>> {
        each_kind!(self, c => c.update(keys, values))
    }
    fn attends_in_place(&self) -> bool {
        each_kind!(self, c => c.attends_in_place())
    }
    fn update_and_attend(
        &mut self,
        queries: Tensor<B, 4>,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        each_kind!(self, c => c.update_and_attend(queries, keys, values))
    }
    fn seq_len(&self) -> usize {
        each_kind!(self, c => c.seq_len())
    }
    fn held_len(&self) -> usize {
        each_kind!(self, c => c.held_len())
    }
    fn max_len(&self) -> Option<usize> {
        each_kind!(self, c => c.max_len())
    }
    fn crop(&mut self, len: usize) -> Result<()> {
        each_kind!(self, c => c.crop(len))
    }
    fn set_rewind(&mut self, positions: usize) {
        each_kind!(self, c => c.set_rewind(positions))
    }
    fn select_batch(&mut self, indices: &[usize]) -> Result<()> {
        each_kind!(self, c => c.select_batch(indices))
    }
    fn repeat_batch(&mut self, times: usize) -> Result<()> {
        each_kind!(self, c => c.repeat_batch(times))
    }
    fn batch_size(&self) -> Option<usize> {
        each_kind!(self, c => c.batch_size())
    }
    fn reset(&mut self) {
        each_kind!(self, c => c.reset())
    }
    fn memory_bytes(&self) -> usize {
        each_kind!(self, c => c.memory_bytes())
    }
    fn key_rotation(&self) -> KeyRotation {
        each_kind!(self, c => c.key_rotation())
    }

    fn attention_pattern(&self) -> AttentionPattern {
        each_kind!(self, c => c.attention_pattern())
    }
}
