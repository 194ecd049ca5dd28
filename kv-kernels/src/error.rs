//! What can go wrong building a matrix or a quantized cache head.

use thiserror::Error;

use crate::matrix::Format;

/// A matrix or quantized head that cannot be built from what was given.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum KernelError {
    /// A block format needs rows that are whole blocks.
    #[error("{format} stores rows in blocks of {block} values, but a row has {cols}: use a format whose blocks divide it (f32 or f16 always do)")]
    RaggedBlocks {
        /// The format asked for.
        format: Format,
        /// Values per block of that format.
        block: usize,
        /// The row width given.
        cols: usize,
    },
    /// Data of the wrong size for the shape.
    #[error("a {rows}x{cols} {format} matrix needs {expected} {what}, got {found}")]
    Length {
        /// The format.
        format: Format,
        /// Rows asked for.
        rows: usize,
        /// Columns asked for.
        cols: usize,
        /// `values` or `bytes`.
        what: &'static str,
        /// What the shape needs.
        expected: usize,
        /// What was given.
        found: usize,
    },
    /// [`crate::Matrix::stack`] with no parts.
    #[error("no matrices to stack")]
    NothingToStack,
    /// [`crate::Matrix::stack`] over parts of different widths.
    #[error("cannot stack a matrix {other} wide onto one {first} wide: stacked matrices share their input")]
    MismatchedWidths {
        /// The first part's width.
        first: usize,
        /// The first width that differs.
        other: usize,
    },
    /// A quantized cache's configuration that cannot hold heads of this size, or keys and
    /// values that are not whole rows.
    #[error("quantized cache: {0}")]
    QuantizedConfig(String),
    /// A key or value a quantized cache cannot store: its scales, minimums and recent tokens
    /// are f16.
    #[error("a key or value of {value} is outside f16's range (±65504), in which a quantized cache keeps its scales, minimums and recent tokens: use a full-precision cache for this model")]
    OutOfHalfRange {
        /// The first value out of range (or NaN).
        value: f32,
    },
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, KernelError>;
