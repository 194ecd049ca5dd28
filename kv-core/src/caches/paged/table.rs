//! A sequence's block table: which pool blocks hold its positions, in order.

use crate::error::{CacheError, Result};

use super::pool::{BlockHash, BlockId, BlockPool, Reporting};

/// A copy the storage must make before new slots are written: the first `slots` slots of
/// block `from` into block `to` (copy-on-write of a shared, partly filled last block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    /// The shared block.
    pub from: BlockId,
    /// The sequence's own new block.
    pub to: BlockId,
    /// Slots filled in `from`.
    pub slots: usize,
}

/// The blocks of one sequence: position `p` lives in slot `p % block_size` of block
/// `blocks[p / block_size]`.
///
/// A table of sliding-window layers gives back the blocks that have slid wholly out of its
/// window ([`BlockTable::release_before`], vLLM's sliding-window manager): its first
/// [`BlockTable::first_held`] positions are then not held, and [`BlockTable::blocks`] starts
/// after them.
///
/// A table holds one reference to each of its blocks; it must be given back with
/// [`BlockTable::release`] (a table dropped without it leaks its blocks, which
/// [`BlockPool::audit`] does not see, so the pool's owner keeps tables and releases them).
///
/// ```
/// use kv_core::{BlockPool, BlockTable};
///
/// let mut pool = BlockPool::new(8, 4);
/// let mut prompt = BlockTable::new();
/// prompt.append(&mut pool, 6).unwrap(); // two blocks, the second half full
/// let mut fork = prompt.fork(&mut pool); // shares both
/// let copies = fork.append(&mut pool, 1).unwrap(); // writes into a block it shares: copy first
/// assert_eq!(copies.len(), 1);
/// assert_eq!(copies[0].slots, 2);
/// assert_eq!(prompt.blocks()[0], fork.blocks()[0]); // the full block stays shared
/// prompt.release(&mut pool);
/// fork.release(&mut pool);
/// assert_eq!(pool.free_blocks(), 8);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    /// One entry per block of positions `0..len`; the first `dropped` were given back and
    /// stand for nothing ([`NOT_HELD`]).
    blocks: Vec<BlockId>,
    /// Leading blocks given back (slid out of a window, or never taken from the cache).
    dropped: usize,
    /// Positions held.
    len: usize,
    /// Hashes of the first full blocks, in order (those registered or looked up so far).
    hashes: Vec<BlockHash>,
}

/// The entry of a block a table no longer holds.
const NOT_HELD: BlockId = BlockId(u32::MAX);

impl BlockTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// A table starting with the longest run of `tokens`' full blocks the pool has cached
    /// (under `extra`), at most `max_tokens` positions of them: `(table, cached positions)`.
    /// A caller that needs the logits of a prompt's last token passes `prompt.len() - 1`, so
    /// that token is computed even when its block is cached.
    pub fn from_cached_prefix(
        pool: &mut BlockPool,
        tokens: &[u32],
        extra: &[u8],
        max_tokens: usize,
    ) -> (Self, usize) {
        let block_size = pool.block_size();
        let mut table = Self::new();
        for chunk in tokens[..max_tokens.min(tokens.len())].chunks_exact(block_size) {
            let hash = BlockHash::new(table.hashes.last(), chunk, extra);
            let Some(id) = pool.lookup(&hash) else {
                break;
            };
            table.blocks.push(id);
            table.hashes.push(hash);
            table.len += block_size;
        }
        let cached = table.len;
        (table, cached)
    }

    /// A table over the blocks whose hashes are `hashes` (a prefix's chain, in order), taking
    /// from the pool's cache only those from block `first` on: the blocks a sliding window
    /// still sees past the prefix. Returns `None`, taking nothing, if one of them is not
    /// cached.
    pub fn from_cached_window(
        pool: &mut BlockPool,
        hashes: &[BlockHash],
        first: usize,
    ) -> Option<Self> {
        let first = first.min(hashes.len());
        if !hashes[first..].iter().all(|hash| pool.is_cached(hash)) {
            return None;
        }
        let mut blocks = vec![NOT_HELD; first];
        for hash in &hashes[first..] {
            blocks.push(pool.lookup(hash).expect("checked cached"));
        }
        Some(Self {
            blocks,
            dropped: first,
            len: hashes.len() * pool.block_size(),
            hashes: hashes.to_vec(),
        })
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The blocks held, in position order: those of positions `first_held..len`.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks[self.dropped..]
    }

    /// The first position whose block is held (0 unless blocks were given back with
    /// [`BlockTable::release_before`]).
    pub fn first_held(&self, block_size: usize) -> usize {
        (self.dropped * block_size).min(self.len)
    }

    /// The block and slot of position `position` (`first_held..len`).
    pub fn slot(&self, position: usize, block_size: usize) -> (BlockId, usize) {
        let block = position / block_size;
        debug_assert!(block >= self.dropped, "position {position} was given back");
        (self.blocks[block], position % block_size)
    }

    /// Gives back the blocks whose every position lies before `position` (a sliding window's
    /// keys that no later query sees): returns how many. Their hashes stay in the table, so
    /// later full blocks still chain to them.
    ///
    /// ```
    /// use kv_core::{BlockPool, BlockTable};
    ///
    /// let mut pool = BlockPool::new(8, 4);
    /// let mut table = BlockTable::new();
    /// table.append(&mut pool, 10).unwrap(); // blocks of positions 0..4, 4..8, 8..10
    /// assert_eq!(table.release_before(&mut pool, 7), 1); // 0..4 only: 4..8 holds 7
    /// assert_eq!((table.first_held(4), table.blocks().len()), (4, 2));
    /// assert_eq!(pool.free_blocks(), 6);
    /// ```
    pub fn release_before(&mut self, pool: &mut BlockPool, position: usize) -> usize {
        let whole = (position.min(self.len) / pool.block_size()).min(self.blocks.len());
        let released = whole.saturating_sub(self.dropped);
        for entry in &mut self.blocks[self.dropped..whole] {
            pool.release(std::mem::replace(entry, NOT_HELD));
        }
        self.dropped = self.dropped.max(whole);
        released
    }

    /// Blocks needed to append `n` positions (a copy-on-write block included), without
    /// taking them.
    pub fn blocks_needed(&self, pool: &BlockPool, n: usize) -> usize {
        self.blocks_needed_from(pool, n, 0)
    }

    /// [`BlockTable::blocks_needed`] for [`BlockTable::append_from`].
    pub fn blocks_needed_from(&self, pool: &BlockPool, n: usize, first_needed: usize) -> usize {
        let block_size = pool.block_size();
        let grown = (self.len + n).div_ceil(block_size) - self.blocks.len();
        let skipped = self.skippable(block_size, n, first_needed);
        grown - skipped + usize::from(n > 0 && self.must_copy_last(pool))
    }

    /// New whole blocks of `n` appended positions that lie before `first_needed` and can be
    /// left out: only where every block so far was given back and the last one is full.
    fn skippable(&self, block_size: usize, n: usize, first_needed: usize) -> usize {
        if self.dropped < self.blocks.len() || !self.len.is_multiple_of(block_size) {
            return 0;
        }
        let before = first_needed.min(self.len + n) / block_size;
        before.saturating_sub(self.blocks.len())
    }

    /// Makes room for `n` more positions: a fresh copy of the last block when it is partly
    /// filled and shared or cached (its other holders keep theirs), then new blocks. Returns
    /// the copies the storage must make before writing. All or nothing: when the pool has too
    /// few free blocks, nothing changes.
    ///
    /// # Errors
    /// [`CacheError::PoolExhausted`] with the numbers.
    pub fn append(&mut self, pool: &mut BlockPool, n: usize) -> Result<Vec<BlockCopy>> {
        self.append_from(pool, n, 0)
    }

    /// [`BlockTable::append`] for positions of which only those from `first_needed` on will
    /// be read (a sliding window's, past a prefix restored from elsewhere): whole new blocks
    /// before it are left out, as if given back at once, where the table holds no block yet.
    ///
    /// ```
    /// use kv_core::{BlockPool, BlockTable};
    ///
    /// let mut pool = BlockPool::new(8, 4);
    /// let mut table = BlockTable::new();
    /// table.append_from(&mut pool, 10, 7).unwrap(); // positions 0..10, 7..10 to be read
    /// assert_eq!((table.first_held(4), table.blocks().len()), (4, 2)); // blocks 4..8, 8..10
    /// assert_eq!(pool.free_blocks(), 6);
    /// ```
    ///
    /// # Errors
    /// As [`BlockTable::append`].
    pub fn append_from(
        &mut self,
        pool: &mut BlockPool,
        n: usize,
        first_needed: usize,
    ) -> Result<Vec<BlockCopy>> {
        let needed = self.blocks_needed_from(pool, n, first_needed);
        if needed > pool.free_blocks() {
            return Err(CacheError::PoolExhausted {
                needed,
                free: pool.free_blocks(),
                total: pool.num_blocks(),
            });
        }
        let mut copies = Vec::new();
        if n > 0 && self.must_copy_last(pool) {
            let from = *self.blocks.last().expect("a partly filled block");
            let to = pool.allocate()?;
            copies.push(BlockCopy {
                from,
                to,
                slots: self.len % pool.block_size(),
            });
            pool.release(from);
            *self.blocks.last_mut().expect("checked") = to;
        }
        let skipped = self.skippable(pool.block_size(), n, first_needed);
        self.blocks.extend(std::iter::repeat_n(NOT_HELD, skipped));
        self.dropped += skipped;
        let total = (self.len + n).div_ceil(pool.block_size());
        let fresh = pool.allocate_many(total - self.blocks.len())?;
        self.blocks.extend(fresh);
        self.len += n;
        Ok(copies)
    }

    /// Registers the hashes of blocks that have become full, given every token id the table
    /// holds (`tokens.len() == len()`), so later sequences with this prefix find them (blocks
    /// given back only extend the chain of hashes). `reporting` says whether the pool logs
    /// them ([`BlockPool::register_reported`]).
    pub fn register_full_blocks(
        &mut self,
        pool: &mut BlockPool,
        tokens: &[u32],
        extra: &[u8],
        reporting: Reporting,
    ) {
        debug_assert_eq!(tokens.len(), self.len);
        let block_size = pool.block_size();
        let full = self.len / block_size;
        for i in self.hashes.len()..full {
            let parent = self.hashes.last().copied();
            let held = &tokens[i * block_size..(i + 1) * block_size];
            let hash = BlockHash::new(parent.as_ref(), held, extra);
            if i >= self.dropped {
                pool.register_reported(self.blocks[i], hash, parent, held, reporting);
            }
            self.hashes.push(hash);
        }
    }

    /// Another table over the same blocks (each referenced once more): a fork.
    pub fn fork(&self, pool: &mut BlockPool) -> Self {
        for &id in self.blocks() {
            pool.retain(id);
        }
        self.clone()
    }

    /// Forgets positions from `len` on, giving back the blocks no longer needed. `len` is 0 or
    /// at least [`BlockTable::first_held`]: positions given back cannot become the last ones.
    pub fn truncate(&mut self, pool: &mut BlockPool, len: usize) {
        if len >= self.len {
            return;
        }
        debug_assert!(
            len == 0 || len >= self.first_held(pool.block_size()),
            "truncating to {len} positions, before the first held one"
        );
        let keep = len.div_ceil(pool.block_size());
        for id in self.blocks.drain(keep.max(self.dropped)..).rev() {
            pool.release(id);
        }
        self.blocks.truncate(keep);
        self.dropped = self.dropped.min(keep);
        self.hashes.truncate(len / pool.block_size());
        self.len = len;
    }

    /// Gives every block back, the last first (so a prompt's first blocks, the likeliest to be
    /// shared again, are the last evicted).
    pub fn release(&mut self, pool: &mut BlockPool) {
        self.truncate(pool, 0);
    }

    /// Whether writing after the last position needs a copy of the last block first: it is
    /// partly filled and another table holds it, or it carries a hash (a cached block's
    /// contents must not change; after a truncation into it, it does).
    fn must_copy_last(&self, pool: &BlockPool) -> bool {
        let partial = !self.len.is_multiple_of(pool.block_size());
        partial
            && self
                .blocks
                .last()
                .is_some_and(|&id| pool.ref_count(id) > 1 || pool.hash_of(id).is_some())
    }
}
