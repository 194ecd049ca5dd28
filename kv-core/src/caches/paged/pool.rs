//! The block pool: fixed-size blocks of cache slots handed out and taken back in O(1), shared
//! by reference count, and remembered by the hash of the tokens they hold so a later sequence
//! with the same prefix reuses them.
//!
//! The design is vLLM's (PagedAttention's block manager, and v1's prefix-caching `BlockPool`),
//! in the shape mistral.rs also follows:
//!
//! - **Blocks, not sequences, own storage.** A sequence holds a table of block ids; its `n`-th
//!   position lives in slot `n % block_size` of block `table[n / block_size]`. Memory lost to
//!   rounding is under one block per sequence, where a contiguous cache reserves its longest
//!   length for every sequence.
//! - **Sharing by reference count.** Forking a sequence (beams, several continuations of one
//!   prompt) copies its table and counts each block once more; nothing is copied until a
//!   sequence appends to a shared, partly filled last block (copy-on-write, done by the table).
//! - **Prefix caching.** A block that becomes full gets a [`BlockHash`] covering its parent's
//!   hash, its token ids and an extra key (a model fingerprint, a tenant's salt), so equal hashes
//!   mean equal contents at equal positions. A new sequence looks its full prompt blocks up and
//!   starts from the ones found.
//! - **One list for free and evictable.** A block whose count drops to zero keeps its contents
//!   and hash and joins the tail of the free list; allocation takes the head. The free list is
//!   thus the least-recently-used eviction order: a cached block stays reusable until every
//!   block freed before it has been reused, and a lookup that hits an idle block takes it out
//!   of the list in O(1) (the list is doubly linked through the block metadata).
//!
//! - **Events for routers.** A pool asked to [`BlockPool::record_events`] logs each block that
//!   becomes findable, each one whose contents are given up, and a clear of the whole cache
//!   ([`BlockEvent`]): what vLLM publishes as KV events, so a router in front of several
//!   replicas can send a prompt to the one that already holds its prefix.
//!
//! What it costs: a few words of metadata per block and one hash-map entry per cached block;
//! every operation is O(1) except hashing, which reads a block's token ids once. Recording
//! events copies each reported block's token ids once more.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::error::{CacheError, Result};

/// A block's index in its pool (and in the storage the pool describes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl BlockId {
    /// The index as a `usize`.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// What a full block holds, as a hash: SHA-256 over the parent block's hash (none for a
/// sequence's first block), the block's token ids and an extra key. Two blocks with equal
/// hashes hold the keys and values of the same tokens after the same prefix.
///
/// ```
/// use kv_core::BlockHash;
///
/// let first = BlockHash::new(None, &[1, 2, 3, 4], b"model-a");
/// let second = BlockHash::new(Some(&first), &[5, 6, 7, 8], b"model-a");
/// assert_eq!(second, BlockHash::new(Some(&first), &[5, 6, 7, 8], b"model-a"));
/// // The same tokens after another prefix, or for another model, are another block.
/// assert_ne!(second, BlockHash::new(None, &[5, 6, 7, 8], b"model-a"));
/// assert_ne!(first, BlockHash::new(None, &[1, 2, 3, 4], b"model-b"));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// The hash of a block holding `tokens` after the block hashed `parent`, under `extra`.
    pub fn new(parent: Option<&BlockHash>, tokens: &[u32], extra: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        match parent {
            Some(parent) => {
                hasher.update([1u8]);
                hasher.update(parent.0);
            }
            None => hasher.update([0u8]),
        }
        hasher.update((tokens.len() as u64).to_le_bytes());
        for token in tokens {
            hasher.update(token.to_le_bytes());
        }
        hasher.update((extra.len() as u64).to_le_bytes());
        hasher.update(extra);
        BlockHash(hasher.finalize().into())
    }
}

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "…")
    }
}

impl BlockHash {
    /// The hash's first eight bytes as a big-endian integer: the block's name in KV events
    /// (vLLM's events also name a block by 64 bits of its hash).
    ///
    /// ```
    /// use kv_core::BlockHash;
    ///
    /// let hash = BlockHash::new(None, &[1, 2], b"");
    /// assert_eq!(hash.short().to_be_bytes(), hash.0[..8]);
    /// ```
    pub fn short(&self) -> u64 {
        u64::from_be_bytes(self.0[..8].try_into().expect("32 bytes"))
    }
}

/// What the prefix cache did to its blocks, for a process that mirrors it: a router that sends
/// each prompt to the replica already holding its prefix. The three kinds are vLLM's KV events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockEvent {
    /// A full block became findable by `hash`: it holds `tokens` after the block hashed
    /// `parent` (none for a sequence's first block).
    Stored {
        /// The block's hash.
        hash: BlockHash,
        /// The hash of the block before it in its sequence.
        parent: Option<BlockHash>,
        /// The token ids it holds (`block_size` of them).
        tokens: Vec<u32>,
    },
    /// The block hashed `hash` is no longer cached: its slots went to another allocation.
    Removed {
        /// The hash it held.
        hash: BlockHash,
    },
    /// Every cached block was forgotten at once ([`BlockPool::clear_cache`]).
    Cleared,
}

/// Whether registering a block is reported in its pool's event log. A store with several layer
/// groups reports one (its full-attention group): a router needs each prefix once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporting {
    /// Registration and eviction log a [`BlockEvent`] (when the pool records them).
    Reported,
    /// Nothing is logged for this block.
    Silent,
}

/// The order new blocks join a pool's free list, and so the order they are handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockOrder {
    /// By id: a fresh pool hands out consecutive blocks, so a sequence's blocks usually follow
    /// each other in storage and attention reads them as one slice.
    #[default]
    Ascending,
    /// A fixed permutation from `seed`: every sequence's blocks are scattered, so attention
    /// always gathers them (tests use it to prove the gather path equal to the slice path).
    Shuffled {
        /// Seed of the permutation.
        seed: u64,
    },
}

/// Fisher-Yates with a SplitMix64 stream: a fixed permutation per seed, no dependency.
fn shuffle(ids: &mut [u32], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..ids.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        ids.swap(i, j);
    }
}

/// Counters of the prefix cache, since the pool was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Blocks looked up by hash.
    pub queries: u64,
    /// Lookups that found their block.
    pub hits: u64,
    /// Cached blocks whose contents were given up to a new allocation.
    pub evictions: u64,
}

/// One block's bookkeeping.
#[derive(Debug, Clone, Default)]
struct BlockMeta {
    /// Tables pointing at the block.
    refs: u32,
    /// Set once the block is full and registered; kept while it waits in the free list.
    hash: Option<BlockHash>,
    /// Whether the registration of `hash` was reported (so losing it is reported too).
    reported: bool,
    /// Neighbours in the free list (only meaningful while `refs == 0`).
    prev: Option<u32>,
    next: Option<u32>,
}

/// A pool of `num_blocks` blocks of `block_size` slots, after vLLM's prefix-caching block pool:
/// blocks shared by reference count, full blocks found again by [`BlockHash`], and one
/// doubly linked free list that is also the least-recently-used eviction order (a block freed
/// keeps its contents and hash until allocation reaches it). Every operation is O(1).
/// `docs/architecture.md` says where the design comes from and what it costs.
///
/// ```
/// use kv_core::{BlockHash, BlockPool};
///
/// let mut pool = BlockPool::new(4, 16);
/// let a = pool.allocate().unwrap();
/// let hash = BlockHash::new(None, &[7; 16], b"");
/// pool.register(a, hash);
/// pool.release(a); // idle, but still cached
/// assert_eq!(pool.free_blocks(), 4);
/// assert_eq!(pool.lookup(&hash), Some(a)); // reused, not recomputed
/// assert_eq!(pool.ref_count(a), 1);
/// ```
#[derive(Debug, Clone)]
pub struct BlockPool {
    block_size: usize,
    meta: Vec<BlockMeta>,
    /// Head (next to allocate, least recently freed) and tail of the free list.
    head: Option<u32>,
    tail: Option<u32>,
    free: usize,
    cached: HashMap<BlockHash, BlockId>,
    stats: PoolStats,
    /// The event log, while recording ([`BlockPool::record_events`]).
    events: Option<Vec<BlockEvent>>,
}

impl BlockPool {
    /// A pool with every block free, in id order (so a fresh pool hands out consecutive
    /// blocks).
    ///
    /// # Panics
    /// If `block_size` is 0 or `num_blocks` does not fit a `u32`.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "a block holds at least one slot");
        assert!(u32::try_from(num_blocks).is_ok(), "at most 2^32 - 1 blocks");
        let mut pool = Self {
            block_size,
            meta: Vec::new(),
            head: None,
            tail: None,
            free: 0,
            cached: HashMap::new(),
            stats: PoolStats::default(),
            events: None,
        };
        pool.grow(num_blocks, BlockOrder::Ascending);
        pool
    }

    /// Adds blocks until the pool holds `num_blocks`, joining the free list after those
    /// already free, in `order`; the storage the pool describes must grow alike. A smaller
    /// number changes nothing.
    pub fn grow(&mut self, num_blocks: usize, order: BlockOrder) {
        assert!(u32::try_from(num_blocks).is_ok(), "at most 2^32 - 1 blocks");
        let mut ids: Vec<u32> = (self.meta.len() as u32..num_blocks as u32).collect();
        if let BlockOrder::Shuffled { seed } = order {
            shuffle(&mut ids, seed);
        }
        self.meta
            .resize(num_blocks.max(self.meta.len()), BlockMeta::default());
        for id in ids {
            self.push_free(id);
        }
    }

    /// Slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.meta.len()
    }

    /// Blocks no table points at (cached ones included: they are reused last).
    pub fn free_blocks(&self) -> usize {
        self.free
    }

    /// Blocks holding a registered hash (in use or idle).
    pub fn cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// The prefix cache's counters.
    pub fn stats(&self) -> PoolStats {
        self.stats
    }

    /// Tables pointing at `id`.
    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.meta[id.index()].refs
    }

    /// The hash `id` was registered with, if it still holds it.
    pub fn hash_of(&self, id: BlockId) -> Option<BlockHash> {
        self.meta[id.index()].hash
    }

    /// Takes the least recently freed block, with one reference; a cached block taken this way
    /// is forgotten by the prefix cache.
    ///
    /// # Errors
    /// [`CacheError::PoolExhausted`] when every block is in use.
    pub fn allocate(&mut self) -> Result<BlockId> {
        let id = self.head.ok_or(CacheError::PoolExhausted {
            needed: 1,
            free: 0,
            total: self.num_blocks(),
        })?;
        self.unlink(id);
        let meta = &mut self.meta[id as usize];
        meta.refs = 1;
        if let Some(hash) = meta.hash.take() {
            let reported = std::mem::take(&mut meta.reported);
            self.cached.remove(&hash);
            self.stats.evictions += 1;
            if reported {
                self.log(BlockEvent::Removed { hash });
            }
        }
        Ok(BlockId(id))
    }

    /// `n` blocks at once, or none (the pool unchanged) when fewer are free.
    ///
    /// # Errors
    /// [`CacheError::PoolExhausted`] with the numbers.
    pub fn allocate_many(&mut self, n: usize) -> Result<Vec<BlockId>> {
        if n > self.free {
            return Err(CacheError::PoolExhausted {
                needed: n,
                free: self.free,
                total: self.num_blocks(),
            });
        }
        (0..n).map(|_| self.allocate()).collect()
    }

    /// One more table points at `id` (a fork).
    ///
    /// # Panics
    /// If `id` is free: only a block in use can be shared ([`BlockPool::lookup`] revives idle
    /// cached ones).
    pub fn retain(&mut self, id: BlockId) {
        let meta = &mut self.meta[id.index()];
        assert!(meta.refs > 0, "retain of free block {id:?}");
        meta.refs += 1;
    }

    /// One table fewer points at `id`; at zero the block joins the tail of the free list,
    /// keeping its contents and hash for the prefix cache.
    ///
    /// # Panics
    /// If `id` is already free (a double free).
    pub fn release(&mut self, id: BlockId) {
        let meta = &mut self.meta[id.index()];
        assert!(meta.refs > 0, "release of free block {id:?}");
        meta.refs -= 1;
        if meta.refs == 0 {
            self.push_free(id.0);
        }
    }

    /// Whether a block holding `hash` is cached, without taking it or counting a query.
    pub fn is_cached(&self, hash: &BlockHash) -> bool {
        self.cached.contains_key(hash)
    }

    /// The block holding `hash`, with one more reference (taken out of the free list if it was
    /// idle), or `None`. Counts a query, and a hit when found.
    pub fn lookup(&mut self, hash: &BlockHash) -> Option<BlockId> {
        self.stats.queries += 1;
        let id = *self.cached.get(hash)?;
        self.stats.hits += 1;
        if self.meta[id.index()].refs == 0 {
            self.unlink(id.0);
        }
        self.meta[id.index()].refs += 1;
        Some(id)
    }

    /// Records that full block `id` holds `hash`, so later lookups find it. When another
    /// block already holds the same hash (two sequences computed the same prefix at once),
    /// that one stays the cached copy and `id` stays unregistered; returns whether `id` was
    /// registered. Nothing is logged: [`BlockPool::register_reported`] is the same with an
    /// event.
    pub fn register(&mut self, id: BlockId, hash: BlockHash) -> bool {
        if self.cached.contains_key(&hash) {
            return false;
        }
        let meta = &mut self.meta[id.index()];
        let old = meta.hash.replace(hash);
        let was_reported = std::mem::replace(&mut meta.reported, false);
        if let Some(old) = old {
            self.cached.remove(&old);
            if was_reported {
                self.log(BlockEvent::Removed { hash: old });
            }
        }
        self.cached.insert(hash, id);
        true
    }

    /// [`BlockPool::register`], and when `reporting` says so, a [`BlockEvent::Stored`] for
    /// the block (`tokens` after `parent`) in the event log, and later a
    /// [`BlockEvent::Removed`] when its contents are given up.
    ///
    /// ```
    /// use kv_core::{BlockEvent, BlockHash, BlockPool, Reporting};
    ///
    /// let mut pool = BlockPool::new(1, 2);
    /// pool.record_events();
    /// let a = pool.allocate().unwrap();
    /// let hash = BlockHash::new(None, &[5, 6], b"");
    /// pool.register_reported(a, hash, None, &[5, 6], Reporting::Reported);
    /// pool.release(a);
    /// let _ = pool.allocate().unwrap(); // the only block: its contents are given up
    /// assert_eq!(
    ///     pool.take_events(),
    ///     [
    ///         BlockEvent::Stored { hash, parent: None, tokens: vec![5, 6] },
    ///         BlockEvent::Removed { hash },
    ///     ]
    /// );
    /// ```
    pub fn register_reported(
        &mut self,
        id: BlockId,
        hash: BlockHash,
        parent: Option<BlockHash>,
        tokens: &[u32],
        reporting: Reporting,
    ) -> bool {
        if !self.register(id, hash) {
            return false;
        }
        if reporting == Reporting::Reported {
            self.meta[id.index()].reported = true;
            if self.events.is_some() {
                self.log(BlockEvent::Stored {
                    hash,
                    parent,
                    tokens: tokens.to_vec(),
                });
            }
        }
        true
    }

    /// Forgets every cached hash, of idle blocks and of blocks in use alike (their contents
    /// stay where their tables read them; later prompts just cannot find them), and logs
    /// [`BlockEvent::Cleared`]. Returns how many blocks were forgotten.
    pub fn clear_cache(&mut self) -> usize {
        let forgotten = self.cached.len();
        for meta in &mut self.meta {
            meta.hash = None;
            meta.reported = false;
        }
        self.cached.clear();
        self.log(BlockEvent::Cleared);
        forgotten
    }

    /// Starts logging [`BlockEvent`]s (of blocks registered from now on).
    pub fn record_events(&mut self) {
        self.events.get_or_insert_with(Vec::new);
    }

    /// The events logged since the last call, oldest first (none unless recording).
    pub fn take_events(&mut self) -> Vec<BlockEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Appends `event` to the log while recording.
    fn log(&mut self, event: BlockEvent) {
        if let Some(events) = &mut self.events {
            events.push(event);
        }
    }

    /// Checks the pool's own invariants, for tests: the free list holds exactly the blocks
    /// with no reference, linked both ways, and every cached hash names a block that holds it.
    /// Returns what is wrong.
    pub fn audit(&self) -> std::result::Result<(), String> {
        let mut seen = vec![false; self.meta.len()];
        let mut count = 0;
        let mut prev = None;
        let mut at = self.head;
        while let Some(id) = at {
            let meta = &self.meta[id as usize];
            if seen[id as usize] {
                return Err(format!("free list loops at block {id}"));
            }
            seen[id as usize] = true;
            if meta.refs != 0 {
                return Err(format!("block {id} is free with {} references", meta.refs));
            }
            if meta.prev != prev {
                return Err(format!(
                    "block {id}'s back link is {:?}, not {prev:?}",
                    meta.prev
                ));
            }
            count += 1;
            prev = Some(id);
            at = meta.next;
        }
        if self.tail != prev {
            return Err(format!(
                "tail is {:?}, the list ends at {prev:?}",
                self.tail
            ));
        }
        if count != self.free {
            return Err(format!(
                "{count} blocks in the free list, {} counted",
                self.free
            ));
        }
        if let Some(id) = (0..self.meta.len()).find(|&i| !seen[i] && self.meta[i].refs == 0) {
            return Err(format!(
                "block {id} has no reference but is not in the free list"
            ));
        }
        for (hash, id) in &self.cached {
            if self.meta[id.index()].hash != Some(*hash) {
                return Err(format!(
                    "cached hash {hash:?} names block {id:?}, which holds another"
                ));
            }
        }
        let hashed = self.meta.iter().filter(|m| m.hash.is_some()).count();
        if hashed != self.cached.len() {
            return Err(format!(
                "{hashed} blocks hold a hash, {} are cached",
                self.cached.len()
            ));
        }
        Ok(())
    }

    /// Appends `id` to the tail of the free list.
    fn push_free(&mut self, id: u32) {
        let tail = self.tail;
        let meta = &mut self.meta[id as usize];
        meta.prev = tail;
        meta.next = None;
        match tail {
            Some(t) => self.meta[t as usize].next = Some(id),
            None => self.head = Some(id),
        }
        self.tail = Some(id);
        self.free += 1;
    }

    /// Takes `id` out of the free list.
    fn unlink(&mut self, id: u32) {
        let (prev, next) = {
            let meta = &mut self.meta[id as usize];
            (meta.prev.take(), meta.next.take())
        };
        match prev {
            Some(p) => self.meta[p as usize].next = next,
            None => self.head = next,
        }
        match next {
            Some(n) => self.meta[n as usize].prev = prev,
            None => self.tail = prev,
        }
        self.free -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_takes_the_least_recently_freed_block() {
        let mut pool = BlockPool::new(3, 4);
        let blocks = pool.allocate_many(3).unwrap();
        assert_eq!(blocks, [BlockId(0), BlockId(1), BlockId(2)]);
        assert!(matches!(
            pool.allocate(),
            Err(CacheError::PoolExhausted {
                needed: 1,
                free: 0,
                total: 3
            })
        ));
        pool.release(BlockId(2));
        pool.release(BlockId(0));
        assert_eq!(pool.allocate().unwrap(), BlockId(2));
        assert_eq!(pool.allocate().unwrap(), BlockId(0));
        pool.audit().unwrap();
    }

    #[test]
    fn an_idle_cached_block_is_revived_by_lookup_and_lost_to_reuse() {
        let mut pool = BlockPool::new(2, 4);
        let a = pool.allocate().unwrap();
        let hash = BlockHash::new(None, &[1, 2, 3, 4], b"");
        assert!(pool.register(a, hash));
        pool.release(a);
        assert_eq!(pool.lookup(&hash), Some(a));
        assert_eq!(pool.free_blocks(), 1);
        pool.release(a);
        // Two allocations reach the idle cached block last, and evict it.
        let _b = pool.allocate().unwrap();
        let c = pool.allocate().unwrap();
        assert_eq!(c, a);
        assert_eq!(pool.lookup(&hash), None);
        assert_eq!(
            pool.stats(),
            PoolStats {
                queries: 2,
                hits: 1,
                evictions: 1
            }
        );
        pool.audit().unwrap();
    }

    #[test]
    fn a_second_block_with_the_same_hash_stays_unregistered() {
        let mut pool = BlockPool::new(2, 1);
        let hash = BlockHash::new(None, &[9], b"");
        let (a, b) = (pool.allocate().unwrap(), pool.allocate().unwrap());
        assert!(pool.register(a, hash));
        assert!(!pool.register(b, hash));
        assert_eq!(pool.hash_of(b), None);
        pool.audit().unwrap();
    }
}
