//! The one error type of kv-core.

use thiserror::Error;

/// Everything a cache operation can refuse, with the numbers needed to fix the call.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum CacheError {
    /// Keys and values passed to one update disagree in shape.
    #[error(
        "keys have shape {keys:?} but values have shape {values:?}: both must be \
         [batch, kv_heads, new_tokens, head_dim] with equal sizes"
    )]
    KeyValueMismatch {
        /// Shape of the keys passed.
        keys: [usize; 4],
        /// Shape of the values passed.
        values: [usize; 4],
    },

    /// An update's batch, head count or head size differs from what the cache already holds.
    #[error(
        "update has shape {got:?} but the cache holds [batch={batch}, kv_heads={kv_heads}, _, \
         head_dim={head_dim}]"
    )]
    ShapeMismatch {
        /// Batch rows the cache holds.
        batch: usize,
        /// Key/value heads the cache holds.
        kv_heads: usize,
        /// Head size the cache holds.
        head_dim: usize,
        /// Shape of the update that was refused.
        got: [usize; 4],
    },

    /// An update carried no new tokens.
    #[error(
        "update carries 0 new tokens: pass keys/values shaped [batch, kv_heads, n >= 1, head_dim]"
    )]
    EmptyUpdate,

    /// A preallocated cache has no room left for the update.
    #[error(
        "cache is full: it has room for {capacity} positions, {held} are in use and {requested} \
         more were asked for (raise the capacity or crop first)"
    )]
    CapacityExceeded {
        /// Positions the cache can hold.
        capacity: usize,
        /// Positions already held.
        held: usize,
        /// Positions the update asked for.
        requested: usize,
    },

    /// More batch rows than a preallocated cache was built for.
    #[error("batch of {requested} rows exceeds the cache's maximum batch of {max_batch}")]
    BatchTooLarge {
        /// Rows the cache was built for.
        max_batch: usize,
        /// Rows asked for.
        requested: usize,
    },

    /// A write at an explicit `cache_position` would leave a hole.
    #[error(
        "write at cache_position {position} would leave a gap: only {held} positions are held, \
         so writes must start at or before {held}"
    )]
    PositionGap {
        /// Position asked for.
        position: usize,
        /// Positions held.
        held: usize,
    },

    /// A crop asks for positions that a windowed cache has already evicted.
    #[error(
        "cannot crop to {requested} positions: positions before {oldest_kept} were already \
         evicted, so the cache can only crop to {seen} or more"
    )]
    CropEvicted {
        /// Length asked for.
        requested: usize,
        /// Oldest position that is still held (past the sinks).
        oldest_kept: usize,
        /// Positions seen so far.
        seen: usize,
    },

    /// A batch index is out of range.
    #[error("batch index {index} is out of range for a batch of {batch} rows")]
    BatchIndexOutOfRange {
        /// Index asked for.
        index: usize,
        /// Rows held.
        batch: usize,
    },

    /// A batch selection with no rows.
    #[error("batch selection is empty: keep at least one row")]
    EmptyBatchSelection,

    /// Repeating batch rows zero times.
    #[error("repeat count must be at least 1, got 0")]
    ZeroRepeat,

    /// A block pool has fewer free blocks than an operation needs.
    #[error(
        "the block pool has {free} free blocks of {total} and this needs {needed}: give the pool \
         more blocks, or finish or preempt a sequence first"
    )]
    PoolExhausted {
        /// Blocks the operation needs.
        needed: usize,
        /// Blocks free.
        free: usize,
        /// Blocks in the pool.
        total: usize,
    },

    /// A paged store was asked about a sequence it does not hold.
    #[error("sequence {id} is not in the paged store (never added, or freed)")]
    UnknownSequence {
        /// The sequence's id.
        id: u64,
    },

    /// A paged cache was configured with blocks of no slots.
    #[error("a paged cache's block size must be at least 1")]
    ZeroBlockSize,

    /// A layer index past the model cache's layers.
    #[error("layer {layer} is out of range for a cache of {layers} layers")]
    LayerOutOfRange {
        /// Layer asked for.
        layer: usize,
        /// Layers held.
        layers: usize,
    },

    /// A legacy cache whose layers disagree with each other.
    #[error("legacy cache layer {layer} has {got} positions but layer 0 has {expected}")]
    LegacyLengthMismatch {
        /// Layer that disagrees.
        layer: usize,
        /// Positions in layer 0.
        expected: usize,
        /// Positions in this layer.
        got: usize,
    },

    /// Rows of an attention mask of different lengths, or a row longer than the mask.
    #[error("attention mask row {row} has {got} positions, expected {expected}")]
    MaskRowLength {
        /// Row that disagrees.
        row: usize,
        /// Positions every row must have.
        expected: usize,
        /// Positions this row has.
        got: usize,
    },

    /// Attention inputs whose shapes do not fit together.
    #[error(
        "attention shapes do not fit: query {query:?}, key {key:?}, value {value:?} (query heads \
         must be a multiple of key/value heads; batch, keys and head_dim must agree)"
    )]
    AttentionShape {
        /// `[batch, heads, queries, head_dim]`.
        query: [usize; 4],
        /// `[batch, kv_heads, keys, head_dim]`.
        key: [usize; 4],
        /// `[batch, kv_heads, keys, head_dim]`.
        value: [usize; 4],
    },

    /// Tensors handed to an [`crate::AttentionPlan`] made for other sizes.
    #[error(
        "the attention plan was made for {queries} queries over {keys} keys, but got query \
         {query:?} and key {key:?}: plan again for these keys"
    )]
    PlanShape {
        /// Queries the plan was made for.
        queries: usize,
        /// Key slots the plan was made for.
        keys: usize,
        /// `[batch, heads, queries, head_dim]` given.
        query: [usize; 4],
        /// `[batch, kv_heads, keys, head_dim]` given.
        key: [usize; 4],
    },

    /// A sink cache asked to re-rotate its keys was given no rotary table.
    #[error(
        "a sink cache that re-rotates keys at their rank in the cache needs the model's rotary \
         table; models with learned positions keep keys at their text positions"
    )]
    SinkNeedsRotary,
    /// A rotary table does not fit the heads it would rotate.
    #[error(
        "the rotary table rotates heads of {rotary} values, the cache holds heads of {head_dim}"
    )]
    RotaryHeadDim {
        /// The table's head size.
        rotary: usize,
        /// The cache's head size.
        head_dim: usize,
    },
    /// A key or value a quantized cache cannot hold: it keeps scales, minimums and recent
    /// tokens in f16.
    #[error(
        "a key or value of {value} is outside f16's range (±65504), in which a quantized cache \
         keeps its scales, minimums and recent tokens: use a full-precision cache for this model"
    )]
    OutOfHalfRange {
        /// The first value out of range (or NaN).
        value: f32,
    },
    /// Queries that do not match the keys and values of the same attention call.
    #[error(
        "queries of shape {queries:?} do not fit keys of shape {keys:?}: both are [batch, heads, \
         new, head_dim] with equal batch, new and head_dim, and the query heads a multiple of \
         the key/value heads"
    )]
    QueryShape {
        /// Shape of the queries passed.
        queries: [usize; 4],
        /// Shape of the keys passed.
        keys: [usize; 4],
    },
    /// A cache kind's name that is none of the kinds.
    #[error("unknown cache kind `{name}`: {forms}", forms = crate::CACHE_SPEC_FORMS)]
    UnknownCacheKind {
        /// The name given.
        name: String,
    },
    /// A cache kind with sizes that cannot work.
    #[error("cache `{spec}`: {reason}")]
    InvalidCacheSpec {
        /// The spec as written.
        spec: String,
        /// What is wrong, and how to write it.
        reason: String,
    },
    /// An attention plan with nothing to attend.
    #[error("an attention plan needs at least one query and one key, got {queries} and {keys}")]
    EmptyPlan {
        /// Queries asked for.
        queries: usize,
        /// Keys asked for.
        keys: usize,
    },
    /// A padding mask whose rows are not the batch's.
    #[error("the padding mask has {rows} rows for a batch of {batch}: give one row per batch row")]
    PaddingRows {
        /// Rows of the mask.
        rows: usize,
        /// Rows of the batch.
        batch: usize,
    },
    /// A cache configuration that cannot work, with the reason.
    #[error("invalid cache configuration: {0}")]
    InvalidConfig(String),
}

/// Result type of kv-core.
pub type Result<T, E = CacheError> = std::result::Result<T, E>;
