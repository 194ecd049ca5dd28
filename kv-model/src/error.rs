//! The one error type of this crate: every variant names the file, tensor or value at fault.

use std::path::PathBuf;

use crate::placement::WeightDtype;
use kv_core::CacheError;

/// Why loading or running a model failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A JSON file is not valid JSON or lacks a field.
    #[error("{path}: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A configuration value is missing, or the model cannot be built with it.
    #[error("{source_name}: {message}")]
    Config {
        /// Where the configuration came from (a file, or "random model").
        source_name: String,
        /// What is wrong, and what would fix it.
        message: String,
    },
    /// The architecture is not one this crate implements.
    #[error(
        "{source_name}: unsupported architecture `{architecture}` (supported: {})",
        crate::config::SUPPORTED_MODEL_TYPES
    )]
    UnsupportedArchitecture {
        /// Where the configuration came from.
        source_name: String,
        /// The `model_type` or `general.architecture` found.
        architecture: String,
    },
    /// A GGUF file is malformed: bad magic, unknown version, truncated, or inconsistent.
    #[error("{path}: not a valid GGUF file: {message}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the byte offset where known.
        message: String,
    },
    /// A safetensors file is malformed.
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A tensor is stored in a data type this crate cannot read.
    #[error("{path}: tensor `{tensor}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype found.
        dtype: String,
    },
    /// A tensor the model needs is not in the weights.
    #[error("{source_name}: missing tensor `{tensor}`")]
    MissingTensor {
        /// Where the weights came from.
        source_name: String,
        /// The tensor's name (Hugging Face naming).
        tensor: String,
    },
    /// A tensor's shape disagrees with the configuration.
    #[error(
        "{source_name}: tensor `{tensor}` has shape {found:?}, the config implies {expected:?}"
    )]
    TensorShape {
        /// Where the weights came from.
        source_name: String,
        /// The tensor.
        tensor: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
    /// A token id is not below the vocabulary size.
    #[error("token id {id} at batch row {row}, position {position} is out of range for a vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Batch row.
        row: usize,
        /// Index in the row.
        position: usize,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A position is past those the model was built for: GPT-2's learned table ends there,
    /// and a rotary model was never trained on larger rotations.
    #[error(
        "position {position} is past the {max} positions the model was built for \
         (max_position_embeddings, n_positions); shorten the sequence, or use a sink cache \
         that re-rotates its keys, whose positions stay inside the model's"
    )]
    SequenceTooLong {
        /// The first position that does not fit.
        position: usize,
        /// Positions the model has.
        max: usize,
    },
    /// A piece of a ragged batch names positions its sequence has not reserved in the paged
    /// store.
    #[error(
        "piece {piece} writes positions {start}..{end} of its sequence, which holds only {held}: \
         reserve them in the paged store (PagedStore::reserve) before the forward pass"
    )]
    UnreservedPositions {
        /// Index of the piece in the batch.
        piece: usize,
        /// First position the piece writes.
        start: usize,
        /// One past its last.
        end: usize,
        /// Positions the sequence holds.
        held: usize,
    },
    /// Two pieces of a ragged batch name the same sequence.
    #[error(
        "pieces {first} and {piece} of the batch both extend sequence {sequence}: give each \
         sequence's new tokens as one piece"
    )]
    RepeatedSequence {
        /// The earlier piece.
        first: usize,
        /// The later one.
        piece: usize,
        /// The sequence's id.
        sequence: u64,
    },
    /// A sink cache asked to re-rotate its keys serves a model with learned positions.
    #[error(
        "`{model_type}` has learned positions, so a sink cache cannot re-rotate its keys: keep \
         them at their text positions (SinkPositions::TextPositions), which end at the model's \
         {max_positions}"
    )]
    SinkNeedsRotary {
        /// The model's `model_type`.
        model_type: String,
        /// Positions the model has.
        max_positions: usize,
    },
    /// A cache that re-rotates its keys holds more positions than the model was built for.
    #[error(
        "a sink cache of {held} positions rotates keys up to position {}, past the {max} \
         positions the model was built for: keep sinks + window at most {max}",
        held - 1
    )]
    CacheLongerThanModel {
        /// Positions the cache holds (sinks + window).
        held: usize,
        /// Positions the model was built for.
        max: usize,
    },
    /// Padded rows through a sink cache that re-rotates its keys: padding would take sink
    /// slots and shift every rank.
    #[error(
        "a sink cache that re-rotates its keys serves rows of one length: run padded rows \
         one at a time"
    )]
    PaddedSink,
    /// A forward pass with no tokens (no rows, or rows of length 0).
    #[error("no tokens: pass at least one id per row")]
    NoTokens,
    /// Rows of one forward pass with different lengths.
    #[error("row {row} has {len} tokens, row 0 has {first}: pad rows to one length")]
    RaggedRows {
        /// The first row that differs.
        row: usize,
        /// Its length.
        len: usize,
        /// Row 0's length.
        first: usize,
    },
    /// An attention mask whose shape is not `[batch, past + new]`.
    #[error("attention mask is {rows}x{len}, expected {batch}x{expected} (batch x past+new)")]
    MaskShape {
        /// The mask's rows.
        rows: usize,
        /// The mask's positions.
        len: usize,
        /// The batch passed.
        batch: usize,
        /// Positions seen plus new.
        expected: usize,
    },
    /// A sink cache for a model that attends over a sliding window of its own.
    #[error(
        "a sink cache cannot serve `{model_type}`: its sliding-window layers never see the \
         first positions a sink cache keeps; use dynamic (those layers get rings of their \
         window) or sliding"
    )]
    SinkWithModelWindow {
        /// The model's type.
        model_type: String,
    },
    /// The backend cannot compute with the requested weight element type.
    #[error("{dtype} weights need a backend with {dtype} arithmetic (flex or cuda); {backend} has none: use f32 weights")]
    UnsupportedWeightDtype {
        /// The requested element type.
        dtype: WeightDtype,
        /// The backend's name.
        backend: String,
    },
    /// A weight matrix could not be stored in the format asked for.
    #[error("{source_name}: tensor `{tensor}`: {source}")]
    Kernel {
        /// The weights' source.
        source_name: String,
        /// The tensor.
        tensor: String,
        /// What the kernel crate said.
        source: kv_kernels::KernelError,
    },
    /// A tokenizer could not be built or used.
    #[error("tokenizer ({source_name}): {message}")]
    Tokenizer {
        /// Where the tokenizer came from.
        source_name: String,
        /// What failed.
        message: String,
    },
    /// Fetching the default model failed.
    #[error("fetching {what}: {message}")]
    Fetch {
        /// What was being fetched.
        what: String,
        /// What went wrong, and what to do about it.
        message: String,
    },
    /// A cache operation failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    /// An [`ModelError::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }

    /// A [`ModelError::Config`].
    pub(crate) fn config(source_name: impl Into<String>, message: impl Into<String>) -> Self {
        ModelError::Config {
            source_name: source_name.into(),
            message: message.into(),
        }
    }
}
