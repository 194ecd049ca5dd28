//! One prompt through a model with SmolLM2-135M's shape (random weights) into an empty cache,
//! computed in one piece on the calling thread (`Execution::Sequential`) and cut into
//! attention blocks and runs of positions on rayon's threads (`Execution::Parallel`, what the
//! binaries use on CPU backends): 128 tokens on burn-ndarray, 512 on burn-flex.
//!
//! `cargo bench -p kv-model --bench prefill`

mod common;

use burn::tensor::backend::Backend;
use common::smollm2_shape;
use criterion::{criterion_group, criterion_main, Criterion};
use kv_core::{CacheConfig, Execution};
use kv_model::{Logits, Transformer};

fn bench_backend<B: Backend>(c: &mut Criterion, name: &str, tokens: usize) {
    let device = Default::default();
    let model = Transformer::<B>::random(&smollm2_shape(), 1, &device).expect("model");
    let prompt: Vec<u32> = (0..tokens)
        .map(|i| (i * 7919 % 49000 + 100) as u32)
        .collect();
    let mut group = c.benchmark_group("prefill");
    group.sample_size(10);
    for execution in [Execution::Sequential, Execution::Parallel] {
        let model = model.clone().with_execution(execution);
        group.bench_function(format!("{name}/{tokens}_tokens/{execution:?}"), |b| {
            b.iter(|| {
                let mut cache = model
                    .new_cache(&CacheConfig::Dynamic { capacity: tokens })
                    .expect("cache");
                model
                    .forward(
                        std::slice::from_ref(&prompt),
                        None,
                        Some(&mut cache),
                        Logits::Last,
                    )
                    .expect("prefill")
                    .into_data()
            })
        });
    }
    group.finish();
}

fn prefill(c: &mut Criterion) {
    bench_backend::<burn_ndarray::NdArray<f32>>(c, "ndarray", 128);
    bench_backend::<burn_flex::Flex>(c, "flex", 512);
}

criterion_group!(benches, prefill);
criterion_main!(benches);
