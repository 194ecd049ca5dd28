//! # kv-bench
//!
//! Benchmarks of kv-cache. The cache-operation benchmarks live in `kv-core/benches`; this crate
//! will hold the end-to-end `kv-bench` command line.

pub use kv_generate::backend::BackendKind;
