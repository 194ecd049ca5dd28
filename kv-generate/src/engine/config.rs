//! [`EngineConfig`]: how the engine schedules and stores, with the defaults every front end
//! (kv-generate's library, kv-serve, kv-bench) takes.

use kv_core::{BlockOrder, KvDtype};

/// Positions the default pool holds over every request (16 Ki; about 740 MB of f32 keys and
/// values for SmolLM2-135M).
pub const DEFAULT_POOL_TOKENS: usize = 16 * 1024;

/// Requests running at once by default.
pub const DEFAULT_MAX_RUNNING: usize = 16;

/// Tokens one step feeds by default. 128 measured the same throughput as 256 with a shorter
/// inter-token tail at 8 concurrent requests, and 64 lost throughput (docs/benchmarks.md,
/// "Serving").
pub const DEFAULT_TOKEN_BUDGET: usize = 128;

/// Most prompt tokens one step feeds while a request decodes, by default: see
/// [`EngineConfig::prefill_while_decoding`].
/// At 8 concurrent requests of 128 + 128 tokens (SmolLM2 Q4_1, two cores) 32 cut the
/// inter-token p99 from 110-133 ms to 71 ms for 12% of the throughput; 16 reached 48 ms, level
/// with llama-server's 46, for 15% and a longer time to first token (docs/benchmarks.md,
/// "Decode-first steps").
pub const DEFAULT_PREFILL_WHILE_DECODING: usize = 32;

/// How large the engine's block pool is, set once when the engine starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSize {
    /// This many blocks.
    Blocks(usize),
    /// Room for this many positions (rounded up to whole blocks).
    Tokens(usize),
    /// At most this many bytes of keys and values.
    Bytes(usize),
}

/// How the engine schedules and stores.
///
/// ```
/// use kv_generate::engine::{EngineConfig, PoolSize, DEFAULT_TOKEN_BUDGET};
///
/// let config = EngineConfig { pool: PoolSize::Tokens(4096), ..EngineConfig::default() };
/// assert_eq!(config.token_budget, DEFAULT_TOKEN_BUDGET);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// The pool of key/value blocks shared by every request.
    pub pool: PoolSize,
    /// Positions per block (vLLM's default is 16).
    pub block_size: usize,
    /// Most requests running at once (admitted, holding blocks).
    pub max_running: usize,
    /// Most tokens one step feeds: one per decoding sequence, the rest for prompt chunks.
    pub token_budget: usize,
    /// Most prompt tokens a step feeds while any running request decodes (decode-first steps,
    /// Sarathi-Serve's stall-free batching): a step's time grows with the prompt chunk it
    /// carries, and every decoder waits that long for its next token. A step with no decoder
    /// feeds prompts up to the token budget.
    pub prefill_while_decoding: usize,
    /// The order blocks are handed out in ([`BlockOrder::Shuffled`] tests that nothing relies
    /// on consecutive blocks).
    pub block_order: BlockOrder,
    /// What the pool stores keys and values as (vLLM's `--kv-cache-dtype`): narrower types fit
    /// more positions in the same bytes. Anything but `f32` needs a model computed on the host.
    pub kv_dtype: KvDtype,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            pool: PoolSize::Tokens(DEFAULT_POOL_TOKENS),
            block_size: kv_core::DEFAULT_BLOCK_SIZE,
            max_running: DEFAULT_MAX_RUNNING,
            token_budget: DEFAULT_TOKEN_BUDGET,
            prefill_while_decoding: DEFAULT_PREFILL_WHILE_DECODING,
            block_order: BlockOrder::Ascending,
            kv_dtype: KvDtype::F32,
        }
    }
}
