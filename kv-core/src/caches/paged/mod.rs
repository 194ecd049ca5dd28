//! Paged storage: a pool of fixed-size blocks ([`pool`]), the block table of each sequence
//! ([`table`]), a layer cache on them that answers the [`crate::KvCache`] vocabulary
//! ([`cache`], `--cache paged[:BLOCK]` on the command lines), and every layer of many
//! sequences in one pool ([`store`], for an engine that batches requests continuously), kept
//! as backend tensors or in host memory that attention reads in place ([`storage`]). The
//! design follows vLLM's PagedAttention and its prefix cache; each module says what it takes
//! from there and what it costs.

pub mod cache;
pub mod pool;
pub mod storage;
pub mod store;
pub mod table;
