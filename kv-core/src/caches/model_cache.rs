//! [`ModelCache`]: the per-layer caches of a whole model.

use std::marker::PhantomData;
use std::ops::Range;

use burn::tensor::{backend::Backend, Tensor};

use crate::{
    error::Result, AnyCache, AttentionPattern, CacheConfig, CacheError, DynamicCache, KeyRotation,
    KvCache, KvView, LayerShape, RotaryTable,
};

/// One cache per layer, kept in step: every layer sees the same positions.
///
/// The positions seen are those of layer 0 (all layers agree after each full forward pass), so
/// [`ModelCache::next_positions`] gives the `cache_position` of the next tokens.
///
/// ```
/// use burn::tensor::Tensor;
/// use burn_ndarray::NdArray;
/// use kv_core::{CacheConfig, LayerShape, ModelCache};
///
/// let device = Default::default();
/// let shape = LayerShape { kv_heads: 2, head_dim: 8 };
/// let mut cache = ModelCache::<NdArray>::new(&CacheConfig::Dynamic { capacity: 32 }, 4, shape, None, &device).unwrap();
/// for layer in 0..4 {
///     let k = Tensor::<NdArray, 4>::ones([1, 2, 3, 8], &device);
///     cache.update(layer, k.clone(), k).unwrap();
/// }
/// assert_eq!(cache.next_positions(1), 3..4);
/// ```
#[derive(Debug, Clone)]
pub struct ModelCache<B: Backend, C: KvCache<B> = AnyCache<B>> {
    layers: Vec<C>,
    backend: PhantomData<B>,
}

impl<B: Backend> ModelCache<B, AnyCache<B>> {
    /// `layers` caches of the kind `config` describes; `rotary` is the model's rotary table
    /// (see [`CacheConfig::build`]).
    pub fn new(
        config: &CacheConfig,
        layers: usize,
        shape: LayerShape,
        rotary: Option<&RotaryTable<B>>,
        device: &B::Device,
    ) -> Result<Self> {
        let layers = (0..layers)
            .map(|_| config.build(shape, rotary, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_layers(layers))
    }

    /// One cache per entry of `configs`, layer by layer: a hybrid cache, whose layers may be
    /// of different kinds (a ring on a model's sliding-window layers, a full cache on its
    /// global ones, as transformers' `HybridCache`).
    ///
    /// ```
    /// use burn_ndarray::NdArray;
    /// use kv_core::{CacheConfig, LayerShape, ModelCache};
    ///
    /// let device = Default::default();
    /// let shape = LayerShape { kv_heads: 1, head_dim: 8 };
    /// let full = CacheConfig::Dynamic { capacity: 16 };
    /// let ring = full.for_window(4).unwrap();
    /// let configs = [ring.clone(), ring, full];
    /// let cache = ModelCache::<NdArray>::per_layer(&configs, shape, None, &device).unwrap();
    /// assert_eq!(cache.layer(0).unwrap().max_len(), Some(4));
    /// # use kv_core::KvCache;
    /// assert_eq!(cache.layer(2).unwrap().max_len(), None);
    /// ```
    pub fn per_layer(
        configs: &[CacheConfig],
        shape: LayerShape,
        rotary: Option<&RotaryTable<B>>,
        device: &B::Device,
    ) -> Result<Self> {
        let layers = configs
            .iter()
            .map(|config| config.build(shape, rotary, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_layers(layers))
    }
}

impl<B: Backend, C: KvCache<B>> ModelCache<B, C> {
    /// A model cache over the given per-layer caches.
    pub fn from_layers(layers: Vec<C>) -> Self {
        Self {
            layers,
            backend: PhantomData,
        }
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The cache of `layer`.
    pub fn layer(&self, layer: usize) -> Result<&C> {
        let layers = self.layers.len();
        self.layers
            .get(layer)
            .ok_or(CacheError::LayerOutOfRange { layer, layers })
    }

    /// The cache of `layer`, mutably.
    pub fn layer_mut(&mut self, layer: usize) -> Result<&mut C> {
        let layers = self.layers.len();
        self.layers
            .get_mut(layer)
            .ok_or(CacheError::LayerOutOfRange { layer, layers })
    }

    /// All layers.
    pub fn layers(&self) -> &[C] {
        &self.layers
    }

    /// Appends to `layer`'s cache; see [`KvCache::update`].
    pub fn update(
        &mut self,
        layer: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<KvView<B>> {
        self.layer_mut(layer)?.update(keys, values)
    }

    /// Appends to `layer`'s cache and attends; see [`KvCache::update_and_attend`].
    pub fn update_and_attend(
        &mut self,
        layer: usize,
        queries: Tensor<B, 4>,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        self.layer_mut(layer)?
            .update_and_attend(queries, keys, values)
    }

    /// Whether the layers attend over their own storage; see [`KvCache::attends_in_place`].
    pub fn attends_in_place(&self) -> bool {
        self.layers.first().is_some_and(KvCache::attends_in_place)
    }

    /// Positions seen so far.
    pub fn seq_len(&self) -> usize {
        self.layers.first().map_or(0, KvCache::seq_len)
    }

    /// `cache_position` of the next `new` tokens: `seq_len..seq_len + new`.
    pub fn next_positions(&self, new: usize) -> Range<usize> {
        let start = self.seq_len();
        start..start + new
    }

    /// Which keys a query may see through these caches; see [`KvCache::attention_pattern`].
    pub fn attention_pattern(&self) -> AttentionPattern {
        self.layers
            .first()
            .map_or(AttentionPattern::Causal, KvCache::attention_pattern)
    }

    /// Who rotates the stored keys; see [`KvCache::key_rotation`].
    pub fn key_rotation(&self) -> KeyRotation {
        self.layers
            .first()
            .map_or(KeyRotation::AppliedByCaller, KvCache::key_rotation)
    }

    /// The most positions a layer holds, if bounded: the fewest over the layers that bound
    /// theirs, `None` when every layer grows (a hybrid cache's rings are bounded, its full
    /// layers may not be: the ring's bound is the answer).
    pub fn max_len(&self) -> Option<usize> {
        self.layers.iter().filter_map(KvCache::max_len).min()
    }

    /// Crops every layer; see [`KvCache::crop`].
    pub fn crop(&mut self, len: usize) -> Result<()> {
        self.layers.iter_mut().try_for_each(|layer| layer.crop(len))
    }

    /// Lets every layer crop up to `positions` of its latest positions; see
    /// [`KvCache::set_rewind`].
    pub fn set_rewind(&mut self, positions: usize) {
        self.layers
            .iter_mut()
            .for_each(|layer| layer.set_rewind(positions));
    }

    /// Keeps batch rows in every layer; see [`KvCache::select_batch`].
    pub fn select_batch(&mut self, indices: &[usize]) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(|layer| layer.select_batch(indices))
    }

    /// Repeats batch rows in every layer; see [`KvCache::repeat_batch`].
    pub fn repeat_batch(&mut self, times: usize) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(|layer| layer.repeat_batch(times))
    }

    /// Empties every layer.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(KvCache::reset)
    }

    /// Bytes held by all layers.
    pub fn memory_bytes(&self) -> usize {
        self.layers.iter().map(KvCache::memory_bytes).sum()
    }
}

impl<B: Backend> ModelCache<B, DynamicCache<B>> {
    /// A cache from the legacy format: one `(keys, values)` pair per layer, each
    /// `[batch, kv_heads, seq, head_dim]` (no copy).
    pub fn from_legacy(layers: Vec<(Tensor<B, 4>, Tensor<B, 4>)>) -> Result<Self> {
        let caches = layers
            .into_iter()
            .map(|(keys, values)| DynamicCache::from_tensors(keys, values))
            .collect::<Result<Vec<_>>>()?;
        if let Some(first) = caches.first() {
            let expected = first.seq_len();
            if let Some((layer, cache)) = caches
                .iter()
                .enumerate()
                .find(|(_, c)| c.seq_len() != expected)
            {
                return Err(CacheError::LegacyLengthMismatch {
                    layer,
                    expected,
                    got: cache.seq_len(),
                });
            }
        }
        Ok(Self::from_layers(caches))
    }

    /// The legacy format: one `(keys, values)` pair per layer, `[batch, kv_heads, seq, head_dim]`;
    /// empty when nothing has been cached.
    pub fn to_legacy(&self) -> Vec<(Tensor<B, 4>, Tensor<B, 4>)> {
        self.layers
            .iter()
            .filter_map(DynamicCache::to_tensors)
            .collect()
    }
}
