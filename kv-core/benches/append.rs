//! Appending one token to a cache that already holds 16, 1024 or 4096 positions, for every kind
//! and for the naive `cat` that copies the whole history each step.
//!
//! Shapes are those of SmolLM2-135M's layers: `[1, 3 kv_heads, seq, 64 head_dim]`, f32.
//! `update` is append + the read of what attention needs; `append` is the write alone;
//! `attend` is a decode step's whole use of the cache (`update_and_attend` with the 9 query
//! heads of SmolLM2-135M), which the quantized kinds answer over their codes.

use std::time::Duration;

use burn::tensor::{Distribution, Tensor};
use burn_ndarray::NdArray;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kv_core::{CacheConfig, DynamicCache, KvCache, LayerShape, QuantBits, QuantizedCacheConfig};

type B = NdArray<f32>;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const LENGTHS: [usize; 3] = [16, 1024, 4096];

fn random(seq: usize) -> Tensor<B, 4> {
    Tensor::random(
        [1, KV_HEADS, seq, HEAD_DIM],
        Distribution::Default,
        &Default::default(),
    )
}

fn kinds() -> Vec<(&'static str, CacheConfig)> {
    let quantized = |bits| {
        CacheConfig::Quantized(QuantizedCacheConfig {
            bits,
            group_size: 64,
            residual_len: 128,
        })
    };
    vec![
        ("dynamic", CacheConfig::Dynamic { capacity: 64 }),
        (
            "static",
            CacheConfig::Static {
                max_batch: 1,
                max_len: 8192,
            },
        ),
        ("sliding", CacheConfig::SlidingWindow { window: 8192 }),
        (
            "sink",
            CacheConfig::Sink {
                sinks: 4,
                window: 8188,
                positions: kv_core::SinkPositions::TextPositions,
            },
        ),
        ("int8", quantized(QuantBits::Int8)),
        ("int4", quantized(QuantBits::Int4)),
    ]
}

fn update(c: &mut Criterion) {
    let shape = LayerShape {
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
    };
    let token = random(1);
    let mut group = c.benchmark_group("update_one_token");
    for len in LENGTHS {
        let prefix = random(len);
        for (name, config) in kinds() {
            let mut cache = config.build::<B>(shape, None, &Default::default()).unwrap();
            cache.update(prefix.clone(), prefix.clone()).unwrap();
            group.bench_with_input(BenchmarkId::new(name, len), &len, |b, &len| {
                b.iter(|| {
                    let view = cache.update(token.clone(), token.clone()).unwrap();
                    drop(view);
                    cache.crop(len).unwrap();
                })
            });
        }
        group.bench_with_input(BenchmarkId::new("naive_cat", len), &len, |b, _| {
            b.iter(|| {
                let keys = Tensor::cat(vec![prefix.clone(), token.clone()], 2);
                let values = Tensor::cat(vec![prefix.clone(), token.clone()], 2);
                (keys, values)
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("attend_one_token");
    let query = Tensor::<B, 4>::random(
        [1, 3 * KV_HEADS, 1, HEAD_DIM],
        Distribution::Default,
        &Default::default(),
    );
    for len in LENGTHS {
        let prefix = random(len);
        for (name, config) in kinds()
            .into_iter()
            .filter(|(name, _)| ["dynamic", "int8", "int4"].contains(name))
        {
            let mut cache = config.build::<B>(shape, None, &Default::default()).unwrap();
            cache.update(prefix.clone(), prefix.clone()).unwrap();
            group.bench_with_input(BenchmarkId::new(name, len), &len, |b, &len| {
                b.iter(|| {
                    let out = cache
                        .update_and_attend(query.clone(), token.clone(), token.clone())
                        .unwrap();
                    cache.crop(len).unwrap();
                    out
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("append_one_token");
    for len in LENGTHS {
        let prefix = random(len);
        let mut cache = DynamicCache::<B>::new();
        cache.append(prefix.clone(), prefix.clone()).unwrap();
        group.bench_with_input(BenchmarkId::new("dynamic", len), &len, |b, &len| {
            b.iter(|| {
                cache.append(token.clone(), token.clone()).unwrap();
                cache.crop(len).unwrap();
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(30);
    targets = update
}
criterion_main!(benches);
