//! # kv-bench
//!
//! Reproducible end-to-end benchmarks of kv-cache: the seed article's with/without-cache
//! experiment on any model and backend ([`compare`]), cache memory per kind from the model's
//! shape ([`memory`]), requests through the continuous-batching engine ([`throughput`]), and
//! the step-latency plot ([`plot`]). The `kv-bench` command line drives
//! them; the cache-operation micro-benchmarks live in `kv-core/benches` (criterion).

#![warn(missing_docs)]

pub mod bandwidth;
pub mod compare;
pub mod machine;
pub mod memory;
pub mod perplexity;
pub mod plot;
pub mod serve_load;
pub mod throughput;

pub use kv_generate::backend::BackendKind;

/// Mean and sample standard deviation (0 for fewer than two values).
///
/// ```
/// let (mean, std) = kv_bench::mean_std(&[1.0, 2.0, 3.0]);
/// assert_eq!((mean, std), (2.0, 1.0));
/// ```
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}
