//! Shared helpers: fixture paths and readers, the CPU backend, comparisons.
#![allow(dead_code)]

mod fixtures;
pub mod reference;

pub use fixtures::*;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use kv_core::{AttentionMask, CacheConfig, ModelCache, QuantBits, QuantizedCacheConfig};
use kv_model::{load_model, Logits, Transformer};
use serde_json::Value;

/// The CPU backend most tests run on: burn-flex, the one the binaries choose by default.
/// (`--features cuda` or `wgpu` adds `tests/gpu.rs`, the reference checks on a GPU.)
pub type B = burn_flex::Flex;
/// burn-ndarray, the portable CPU backend: the transformers reference checks run on it too.
pub type Ndarray = burn_ndarray::NdArray<f32>;

pub fn device() -> burn::tensor::Device<B> {
    Default::default()
}

/// A fixture model on [`B`].
pub fn load(name: &str) -> Transformer<B> {
    load_on::<B>(name)
}

/// A fixture model on any backend, on its default device.
pub fn load_on<Bk: Backend>(name: &str) -> Transformer<Bk> {
    load_model::<Bk>(&fixtures().join(name), &Default::default())
        .unwrap()
        .model
}

/// `[batch, seq, vocab]` logits as host rows: `rows[b][s]`.
pub fn host_logits<Bk: Backend>(logits: Tensor<Bk, 3>) -> Vec<Vec<Vec<f32>>> {
    let [batch, seq, vocab] = logits.dims();
    let data = logits.to_data().to_vec::<f32>().unwrap();
    (0..batch)
        .map(|b| {
            (0..seq)
                .map(|s| data[(b * seq + s) * vocab..(b * seq + s + 1) * vocab].to_vec())
                .collect()
        })
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The largest [`max_abs_diff`] over rows of logits.
pub fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| max_abs_diff(x, y))
        .fold(0.0, f32::max)
}

pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy decoding without a cache: the whole sequence is recomputed every step.
pub fn greedy_uncached<Bk: Backend>(
    model: &Transformer<Bk>,
    prompt: &[u32],
    steps: usize,
) -> Vec<u32> {
    let mut tokens = prompt.to_vec();
    for _ in 0..steps {
        let logits = model
            .forward_uncached(&[tokens.clone()], None, Logits::Last)
            .unwrap();
        tokens.push(argmax(&host_logits(logits)[0][0]));
    }
    tokens[prompt.len()..].to_vec()
}

/// Greedy decoding through `cache`: the prompt once, then one token per step.
pub fn greedy_cached<Bk: Backend>(
    model: &Transformer<Bk>,
    cache: &mut ModelCache<Bk>,
    prompt: &[u32],
    steps: usize,
) -> Vec<u32> {
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    for _ in 0..steps {
        let logits = model
            .forward(&[input], None, Some(&mut *cache), Logits::Last)
            .unwrap();
        let next = argmax(&host_logits(logits)[0][0]);
        out.push(next);
        input = vec![next];
    }
    out
}

/// Cache kinds that reproduce full attention exactly over `len` positions: windows at least
/// as long as the sequence.
pub fn exact_cache_kinds(len: usize) -> Vec<CacheConfig> {
    vec![
        CacheConfig::Dynamic { capacity: 4 },
        CacheConfig::Static {
            max_batch: 2,
            max_len: len,
        },
        CacheConfig::SlidingWindow { window: len },
        CacheConfig::Sink {
            sinks: 4,
            window: len - 4,
            positions: kv_core::SinkPositions::TextPositions,
        },
        CacheConfig::Paged(kv_core::PagedCacheConfig {
            block_size: 3,
            initial_blocks: 2,
            order: kv_core::BlockOrder::Shuffled { seed: 11 },
        }),
        CacheConfig::Paged(kv_core::PagedCacheConfig {
            block_size: 16,
            initial_blocks: 4,
            order: kv_core::BlockOrder::Ascending,
        }),
    ]
}

pub fn int8_cache() -> CacheConfig {
    CacheConfig::Quantized(QuantizedCacheConfig {
        bits: QuantBits::Int8,
        group_size: 8,
        residual_len: 8,
    })
}

pub fn padding(mask: &Value) -> AttentionMask {
    let rows = mask
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64() == Some(1))
                .collect()
        })
        .collect();
    AttentionMask::from_rows(rows).unwrap()
}
