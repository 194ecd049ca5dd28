//! What it costs to split one product over the worker threads, apart from the product: a
//! share of trivial work handed to every worker and its result sent back, against the same
//! work on the calling thread. `cargo bench -p kv-kernels --bench handoff`.

use std::ops::Range;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use kv_kernels::Threads;

fn handoff(c: &mut Criterion) {
    let threads = Threads::global();
    let work = Arc::new(|range: Range<usize>| range.len());
    let mut group = c.benchmark_group("handoff");
    group.bench_function("calling thread only", |b| {
        b.iter(|| threads.split(1, 2, Arc::clone(&work) as Arc<_>))
    });
    group.bench_function(format!("split over {} threads", threads.count()), |b| {
        b.iter(|| threads.split(threads.count(), 1, Arc::clone(&work) as Arc<_>))
    });
    group.finish();
}

criterion_group!(benches, handoff);
criterion_main!(benches);
