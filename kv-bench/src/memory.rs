//! Cache memory per kind for a model's shape: pure arithmetic
//! ([`kv_core::CacheConfig::predicted_bytes`]), cross-checked against real caches.

use burn::tensor::{backend::Backend, Tensor};
use kv_core::{
    CacheConfig, CacheError, CacheKind, CacheSizes, CacheSpec, KvCache, LayerGroup, LayerShape,
    PagedCacheConfig, SinkPositions,
};
use kv_model::ModelConfig;

/// Every cache kind with a label for the table: windows of `window` positions, `sinks` sinks, a
/// static cache of `max_len`, the quantized kinds with their defaults. A zero window or length
/// is refused.
pub fn kinds(
    window: usize,
    sinks: usize,
    max_len: usize,
) -> Result<Vec<(String, CacheConfig)>, CacheError> {
    let sizes = CacheSizes {
        capacity: 256,
        max_batch: 1,
        max_len,
        window,
        sinks,
        sink_positions: SinkPositions::TextPositions,
    };
    CacheKind::ALL
        .into_iter()
        .map(|kind| {
            let config = match CacheSpec::from(kind).config(&sizes)? {
                // A pool that starts at one block and doubles, as a paged cache grows when it is
                // not told its length (sized for `max_len`, it would hold what static holds).
                CacheConfig::Paged(paged) => CacheConfig::Paged(PagedCacheConfig {
                    initial_blocks: 1,
                    ..paged
                }),
                config => config,
            };
            let label = match &config {
                CacheConfig::Dynamic { .. } => kind.name().to_string(),
                CacheConfig::Static { max_len, .. } => format!("{kind} (max_len {max_len})"),
                CacheConfig::SlidingWindow { window } => format!("{kind} (window {window})"),
                CacheConfig::Sink { sinks, window, .. } => format!("{kind} ({sinks} + {window})"),
                CacheConfig::Quantized(q) => format!(
                    "{kind} (group {}, residual {})",
                    q.group_size, q.residual_len
                ),
                CacheConfig::Paged(p) => format!("{kind} (blocks of {})", p.block_size),
            };
            Ok((label, config))
        })
        .collect()
}

/// The seed's formula for an exact cache holding `positions`:
/// `2 x layers x kv_heads x head_dim x positions x batch x bytes`.
pub fn theoretical_bytes(config: &ModelConfig, batch: usize, positions: usize) -> usize {
    2 * config.num_layers * config.num_kv_heads * config.head_dim * positions * batch * 4
}

/// A model's cache bytes, its full-attention layers and its sliding-window layers apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerBytes {
    /// Bytes of the layers that attend over every position.
    pub full: usize,
    /// Bytes of the layers that attend over their window only.
    pub sliding: usize,
}

impl LayerBytes {
    /// Both together.
    pub fn total(&self) -> usize {
        self.full + self.sliding
    }
}

/// Bytes of the whole model's cache of `kind` after `positions` tokens, layer by layer as
/// `Transformer::new_cache` builds it: a sliding-window layer gets
/// [`CacheConfig::for_window`] of `kind` (a ring of its window where `kind` holds every
/// position). `None` where the model refuses the kind (a sink cache on a model with sliding
/// layers).
pub fn model_bytes(
    config: &ModelConfig,
    kind: &CacheConfig,
    batch: usize,
    positions: usize,
) -> Option<LayerBytes> {
    let shape = LayerShape {
        kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
    };
    let mut bytes = LayerBytes::default();
    for layer in 0..config.num_layers {
        match config.layer_window(layer) {
            None => bytes.full += kind.predicted_bytes(shape, batch, positions, 4),
            Some(window) => {
                bytes.sliding += kind
                    .for_window(window)?
                    .predicted_bytes(shape, batch, positions, 4)
            }
        }
    }
    Some(bytes)
}

/// Bytes one sequence of `positions` holds in the serving engine's paged pool (blocks of
/// `block_size`, [`kv_core::PagedStore`]) as it decodes: its layers in groups
/// ([`LayerGroup::split`]), a block holding the largest group's count of layers, a sliding
/// group only the blocks its window reaches ([`LayerGroup::decode_blocks`]).
pub fn engine_bytes(config: &ModelConfig, block_size: usize, positions: usize) -> LayerBytes {
    let windows: Vec<Option<usize>> = (0..config.num_layers)
        .map(|i| config.layer_window(i))
        .collect();
    let groups = LayerGroup::split(&windows);
    let per_block = groups.iter().map(|g| g.layers.len()).max().unwrap_or(0)
        * block_size
        * 2
        * config.num_kv_heads
        * config.head_dim
        * 4;
    let mut bytes = LayerBytes::default();
    for group in &groups {
        let held = group.decode_blocks(positions, block_size) * per_block;
        match group.window {
            None => bytes.full += held,
            Some(_) => bytes.sliding += held,
        }
    }
    bytes
}

/// Builds one real layer cache of each kind, appends `positions` tokens of zeros in chunks, and
/// returns the kinds whose reported bytes differ from the prediction: `(name, real, predicted)`.
pub fn cross_check<B: Backend>(
    config: &ModelConfig,
    kinds: &[(String, CacheConfig)],
    positions: usize,
    device: &B::Device,
) -> kv_core::Result<Vec<(String, usize, usize)>> {
    let shape = LayerShape {
        kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
    };
    let mut mismatches = Vec::new();
    for (name, kind) in kinds {
        let mut cache = kind.build::<B>(shape, None, device)?;
        let mut left = positions;
        let mut chunk = positions.div_ceil(3).max(1);
        while left > 0 {
            let n = chunk.min(left);
            let zeros = Tensor::<B, 4>::zeros([1, shape.kv_heads, n, shape.head_dim], device);
            cache.update(zeros.clone(), zeros)?;
            left -= n;
            chunk = 1; // then token by token, as decoding does
        }
        let predicted = kind.predicted_bytes(shape, 1, positions, 4);
        if cache.memory_bytes() != predicted {
            mismatches.push((name.clone(), cache.memory_bytes(), predicted));
        }
    }
    Ok(mismatches)
}
