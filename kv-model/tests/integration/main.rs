//! kv-model's integration tests, one module per concern, in one test binary: as separate
//! files under `tests/` each would be a crate of its own, compiling the transformer for every
//! backend again (most of a cold test build's time). The GPU tests stay in `tests/gpu.rs`,
//! built only with `--features cuda` or `wgpu`.

#[path = "../common/mod.rs"]
mod common;

mod errors;
mod gemma3;
mod gguf;
mod large_model;
mod properties;
mod ragged;
mod sink;
mod smollm2;
mod transformers_reference;
mod weight_dtype;
mod weight_formats;
