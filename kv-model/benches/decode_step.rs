//! One cached decode step of a model with SmolLM2-135M's shape (random weights), at positions
//! 10 and 1000, on both CPU backends (and on flex with f16 weights): the unit of
//! work generation repeats, and how its cost grows with the cache's length.
//!
//! `cargo bench -p kv-model --bench decode_step`

mod common;

use burn::tensor::backend::Backend;
use common::smollm2_shape;
use criterion::{criterion_group, criterion_main, Criterion};
use kv_core::CacheConfig;
use kv_model::{Logits, Transformer, WeightDtype};

fn bench_backend<B: Backend>(c: &mut Criterion, name: &str, weights: WeightDtype) {
    let device = Default::default();
    let model = Transformer::<B>::random(&smollm2_shape(), 1, &device)
        .and_then(|m| m.with_weight_dtype(weights))
        .expect("model");
    let mut group = c.benchmark_group("decode_step");
    group.sample_size(10);
    for position in [10usize, 1000] {
        let mut cache = model
            .new_cache(&CacheConfig::Dynamic { capacity: 1024 })
            .expect("cache");
        let prompt: Vec<u32> = (0..position).map(|i| (i * 31 % 49152) as u32).collect();
        model
            .forward(&[prompt], None, Some(&mut cache), Logits::Last)
            .expect("prefill");
        group.bench_function(format!("{name}/position_{position}"), |b| {
            b.iter(|| {
                let logits = model
                    .forward(&[vec![42]], None, Some(&mut cache), Logits::Last)
                    .expect("step");
                cache.crop(position).expect("crop back");
                logits.into_data()
            })
        });
    }
    group.finish();
}

fn decode_step(c: &mut Criterion) {
    bench_backend::<burn_ndarray::NdArray<f32>>(c, "ndarray", WeightDtype::F32);
    bench_backend::<burn_flex::Flex>(c, "flex", WeightDtype::F32);
    bench_backend::<burn_flex::Flex>(c, "flex-f16", WeightDtype::F16);
}

criterion_group!(benches, decode_step);
criterion_main!(benches);
