//! # kv-core
//!
//! Key/value caches for autoregressive transformers, generic over any burn [`Backend`]
//! and knowing nothing of models.
//!
//! A decoder that generates one token at a time would, without a cache, recompute the keys and
//! values of the whole prefix at every step. A cache stores each layer's keys and values once,
//! so each step feeds only the new token. Every kind here answers one vocabulary, the
//! [`KvCache`] trait, on tensors shaped `[batch, kv_heads, seq, head_dim]`:
//!
//! | operation | meaning |
//! |---|---|
//! | [`KvCache::update`] | append new keys/values, get back what attention reads ([`KvView`]) |
//! | [`KvCache::update_and_attend`] | append, then attend (over the cache's own storage where [`KvCache::attends_in_place`]) |
//! | [`KvCache::seq_len`] / [`KvCache::held_len`] / [`KvCache::max_len`] | positions seen / held / holdable |
//! | [`KvCache::crop`] | forget positions from a length on |
//! | [`KvCache::select_batch`] / [`KvCache::repeat_batch`] | reorder rows (beams) / fork continuations |
//! | [`KvCache::reset`] / [`KvCache::memory_bytes`] | empty / bytes held |
//!
//! Kinds: [`DynamicCache`] (grows, amortized O(1) append), [`StaticCache`] (preallocated,
//! written at `cache_position`), [`SlidingWindowCache`] (ring of the last W positions),
//! [`SinkCache`] (StreamingLLM sinks + window), [`QuantizedCache`] (KIVI int8/int4, attended over its codes),
//! [`PagedCache`] (vLLM's blocks and block tables: forked rows share blocks), and
//! [`AnyCache`] to choose at run time. [`ModelCache`] holds one per layer. The helpers a custom
//! loop needs are here too: [`attention_mask`], [`causal_mask`], [`AttentionMask`] (padding and
//! position ids), [`RotaryTable`], [`grouped_query_attention`], [`AttentionPlan`] (a prompt's
//! attention in blocks of queries that read only the keys they see, on one thread or many) and
//! the [`reference_attention`] that tests compare against. Paged storage for many sequences
//! (a [`BlockPool`] with prefix caching, a [`BlockTable`] per sequence) is here as parts too.
//!
//! [`Backend`]: burn::tensor::backend::Backend
//!
//! ```
//! use burn::tensor::{Distribution, Tensor};
//! use burn_ndarray::NdArray;
//! use kv_core::{attention_mask, grouped_query_attention, AttentionPattern, DynamicCache, KvCache};
//!
//! let device = Default::default();
//! let mut cache = DynamicCache::<NdArray>::new();
//! // Each step: project the new token to q/k/v, append k/v, attend over everything held.
//! for step in 0..4 {
//!     let q = Tensor::<NdArray, 4>::random([1, 4, 1, 16], Distribution::Default, &device);
//!     let k = Tensor::<NdArray, 4>::random([1, 2, 1, 16], Distribution::Default, &device);
//!     let v = Tensor::<NdArray, 4>::random([1, 2, 1, 16], Distribution::Default, &device);
//!     let view = cache.update(k, v).unwrap();
//!     let mask = attention_mask(step..step + 1, &view.positions, AttentionPattern::Causal, None, &device);
//!     let out = grouped_query_attention(q, view.keys, view.values, Some(mask), None).unwrap();
//!     assert_eq!(out.dims(), [1, 4, 1, 16]);
//! }
//! assert_eq!(cache.seq_len(), 4);
//! ```

#![warn(missing_docs)]

mod attention;
mod caches;
mod error;

pub use attention::gqa::{
    fold_mask_for_groups, grouped_query_attention, merge_partial_attention, partial_attention,
    reference_attention, repeat_kv, PartialAttention,
};
pub use attention::mask::{
    attention_mask, causal_mask, needed_attention_mask, padding_mask, window_mask, AttentionMask,
    AttentionPattern,
};
pub use attention::plan::{AttentionPlan, Execution, DEFAULT_BLOCK_QUERIES};
pub use attention::rotary::{rope_inverse_frequencies, HostAngles, RotaryAngles, RotaryTable};
pub use caches::any::{AnyCache, CacheConfig, LayerShape};
pub use caches::buffer::index_tensor;
pub use caches::dynamic::{DynamicCache, MIN_CAPACITY};
pub use caches::kind::{CacheKind, CacheSizes, CacheSpec, CACHE_SPEC_FORMS};
pub use caches::kv_cache::{KeyRotation, KvCache};
pub use caches::model_cache::ModelCache;
pub use caches::paged::cache::{PagedCache, PagedCacheConfig, DEFAULT_BLOCK_SIZE};
pub use caches::paged::pool::{
    BlockEvent, BlockHash, BlockId, BlockOrder, BlockPool, PoolStats, Reporting,
};
pub use caches::paged::storage::{HostKv, KvDtype, KvMemory};
pub use caches::paged::store::{LayerGroup, PagedStore, SequenceId};
pub use caches::paged::table::{BlockCopy, BlockTable};
pub use caches::quantized::{QuantBits, QuantizedCache, QuantizedCacheConfig};
pub use caches::sink::{SinkCache, SinkPositions};
pub use caches::sliding::SlidingWindowCache;
pub use caches::static_cache::{StaticCache, StaticCacheConfig};
pub use caches::view::{KeyPositions, KvView};
pub use error::{CacheError, Result};
pub use kv_kernels::attention::SoftCap;
