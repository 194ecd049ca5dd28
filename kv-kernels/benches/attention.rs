//! A prompt's attention for one key head, as a Gemma 2 layer computes it: 512 causal query
//! rows over 512 keys of head_dim 256, plain and with the scores soft-capped
//! (`cap · tanh(s / cap)`, one scalar `tanh` per score). `cargo bench -p kv-kernels --bench
//! attention`.

use std::ops::Range;

use criterion::{criterion_group, criterion_main, Criterion};
use kv_kernels::attention::{attend, Logits, SoftCap};
use kv_kernels::Isa;

/// Deterministic values in [-1, 1).
fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len as u32)
        .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2000) as f32 / 1000.0 - 1.0)
        .collect()
}

fn prompt_attention(c: &mut Criterion) {
    let (rows, d) = (512, 256);
    let (q, k, v) = (
        values(rows * d, 1),
        values(rows * d, 2),
        values(rows * d, 3),
    );
    let visible: Vec<Range<usize>> = (0..rows).map(|r| 0..r + 1).collect();
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0.0; rows * d];
    let mut scores = Vec::new();
    let mut group = c.benchmark_group("prompt attention, 512 rows, head_dim 256");
    let cases = [
        ("plain", Logits { scale, cap: None }),
        (
            "soft-capped at 50",
            Logits {
                scale,
                cap: SoftCap::new(50.0),
            },
        ),
    ];
    for (name, logits) in cases {
        group.bench_function(name, |b| {
            b.iter(|| {
                attend(
                    Isa::best(),
                    &q,
                    &k,
                    &v,
                    d,
                    &visible,
                    logits,
                    &mut out,
                    d,
                    &mut scores,
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, prompt_attention);
criterion_main!(benches);
