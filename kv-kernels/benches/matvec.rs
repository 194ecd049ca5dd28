//! One decode step's products at SmolLM2-135M's shapes, per format and instruction set, on
//! one thread and split over every core, and one prompt chunk's product (many activation rows
//! at once) per format: `cargo bench -p kv-kernels --bench matvec`.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kv_kernels::{Format, Isa, Matrix, Threads};

fn values(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

fn matvec(c: &mut Criterion) {
    // (name, rows = out features, cols = in features): the fused gate/up product, the down
    // projection (whose rows k-quants can hold: 1536 is six super-blocks) and the LM head of
    // SmolLM2-135M.
    let shapes = [
        ("gate_up", 3072, 576),
        ("down", 576, 1536),
        ("lm_head", 49152, 576),
    ];
    let threads = Threads::global();
    for (name, rows, cols) in shapes {
        let mut group = c.benchmark_group(format!("matvec/{name}"));
        let x = values(cols);
        for format in Format::ALL
            .into_iter()
            .filter(|f| cols % f.block_values() == 0)
        {
            let matrix =
                Arc::new(Matrix::from_f32(format, rows, cols, &values(rows * cols)).unwrap());
            group.throughput(Throughput::Bytes(matrix.byte_len() as u64));
            for isa in Isa::available() {
                let mut y = vec![0.0; rows];
                group.bench_function(BenchmarkId::new(format!("{format}/1-thread"), isa), |b| {
                    b.iter(|| matrix.matmul_with(isa, &x, 1, &mut y))
                });
            }
            group.bench_function(
                BenchmarkId::new(format!("{format}/{}-threads", threads.count()), Isa::best()),
                |b| b.iter(|| matrix.par_matmul(&x, 1, threads)),
            );
        }
        group.finish();
    }
}

/// A prompt chunk of [`PROMPT_ROWS`] tokens through a gate/up-shaped matrix 768 wide (so that
/// the k-quants hold its rows), one thread, the
/// best instruction set: the batched block kernels, and `gemm` for f16 and f32.
fn prompt(c: &mut Criterion) {
    const PROMPT_ROWS: usize = 128;
    let (rows, cols) = (3072, 768);
    let mut group = c.benchmark_group("prompt/gate_up_768");
    group.throughput(Throughput::Elements((PROMPT_ROWS * rows * cols) as u64));
    let x = values(PROMPT_ROWS * cols);
    for format in Format::ALL {
        let matrix = Matrix::from_f32(format, rows, cols, &values(rows * cols)).unwrap();
        let mut y = vec![0.0; PROMPT_ROWS * rows];
        group.bench_function(BenchmarkId::new(format.name(), PROMPT_ROWS), |b| {
            b.iter(|| matrix.matmul(&x, PROMPT_ROWS, &mut y))
        });
    }
    group.finish();
}

/// A speculative decoding pass: the token and a few guesses (2 to 9 activation rows) through a
/// gate/up-shaped matrix 768 wide, one thread, the best instruction set, beside one row. A
/// format whose few-row product costs about one row's pays little for verifying guesses.
fn verify(c: &mut Criterion) {
    let (rows, cols) = (3072, 768);
    let mut group = c.benchmark_group("verify/gate_up_768");
    for format in Format::ALL {
        let matrix = Matrix::from_f32(format, rows, cols, &values(rows * cols)).unwrap();
        for n in [1, 2, 5, 9] {
            let x = values(n * cols);
            let mut y = vec![0.0; n * rows];
            group.bench_function(BenchmarkId::new(format.name(), n), |b| {
                b.iter(|| matrix.matmul(&x, n, &mut y))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, matvec, prompt, verify);
criterion_main!(benches);
