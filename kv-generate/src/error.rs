//! The error type of generation.

use kv_core::CacheError;
use kv_model::ModelError;

use crate::backend::BackendError;

/// Why generation could not run.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A sampling parameter is out of range.
    #[error("invalid sampling setting: {0}")]
    InvalidSampling(String),
    /// The request cannot be served as given (empty prompt, mismatched rows, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The prompt and the tokens to generate do not fit the chosen cache.
    #[error(
        "the prompt ({prompt} tokens) plus up to {new} new tokens does not fit a static cache of \
         {capacity} positions: give the cache more positions or generate fewer tokens"
    )]
    CacheTooSmall {
        /// Longest prompt, in tokens.
        prompt: usize,
        /// Tokens that may be generated.
        new: usize,
        /// Positions the cache holds.
        capacity: usize,
    },
    /// The prompt and the tokens to generate would take positions past those the model was
    /// built for, through a cache that keeps text positions.
    #[error(
        "the prompt ({prompt} tokens) plus up to {new} new tokens needs {} positions, past the \
         {max} the model was built for: lower the new tokens, shorten the prompt, or use a sink \
         cache, which re-rotates its keys and runs past the model's context",
        prompt + new - 1
    )]
    PastModelContext {
        /// Longest prompt, in tokens.
        prompt: usize,
        /// Tokens that may be generated.
        new: usize,
        /// Positions the model was built for.
        max: usize,
    },
    /// A request would not fit the engine's block pool even running alone.
    #[error(
        "the request needs {positions} positions ({blocks} blocks of {block_size}), more than \
         the engine's whole pool of {pool_blocks} blocks: shorten the prompt, generate fewer \
         tokens, or start the engine with a larger pool"
    )]
    LargerThanPool {
        /// Positions the prompt and the new tokens take.
        positions: usize,
        /// Blocks they take.
        blocks: usize,
        /// Blocks in the pool.
        pool_blocks: usize,
        /// Positions per block.
        block_size: usize,
    },
    /// The model failed (bad input, cache error, ...).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A backend was asked for that is not available.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl From<CacheError> for GenerateError {
    fn from(e: CacheError) -> Self {
        GenerateError::Model(ModelError::Cache(e))
    }
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, GenerateError>;
