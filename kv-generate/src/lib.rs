//! # kv-generate
//!
//! The generation engine of kv-cache, over any burn backend:
//!
//! - [`Sampler`] / [`SamplingConfig`]: greedy, temperature, top-k, top-p, min-p, repetition,
//!   frequency and presence penalties, seeded.
//! - [`Generator`]: batched generation (left padding, per-row positions; finished rows leave
//!   the batch), EOS and stop strings, streaming text ([`TextStream`]), with no cache or any
//!   kv-core cache ([`CacheChoice`]), and prompt-cache reuse ([`Generator::prefill`],
//!   [`Generator::continue_from`]).
//! - [`beam`]: beam search as transformers defines it ([`Generator::beam_search`]), the cache
//!   reordered by row selection each step.
//! - [`engine`]: many requests at once, batched continuously over a paged KV cache with
//!   prefix caching, chunked prefill and preemption (vLLM's scheduler).
//! - [`backend`]: the backends a binary was built with (`ndarray`, `flex`, `cuda`, `wgpu`),
//!   and [`backend::OnBackend`], which runs a command's work on the one chosen at run time.
//! - [`cli`]: what both commands' command lines share (token ids, cache requests, the model).
//!
//! The `kv-generate` command line is built on these; see its `--help`.

#![warn(missing_docs)]

pub mod backend;
pub mod beam;
pub mod cli;
pub mod engine;
mod error;
mod generate;
mod sampling;
pub mod speculative;
mod stream;

pub use beam::{BeamGeneration, BeamSearchConfig, EarlyStopping, Hypothesis};
pub use error::{GenerateError, Result};
pub use generate::{
    CacheChoice, EosPolicy, FinishReason, Generation, GenerationConfig, Generator, OnText,
    PromptCache, RowOutput, Timings,
};
pub use sampling::{argmax, Sampler, SamplingConfig, TokenLogprobs};
pub use stream::{StopStrings, TextStream};

/// `docs/guide.md`, whose code blocks run as doc tests.
#[doc = include_str!("../../docs/guide.md")]
#[cfg(doctest)]
pub struct GuideDoctests;
