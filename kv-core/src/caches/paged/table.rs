//! A sequence's block table: which pool blocks hold its positions, in order.

use crate::error::{CacheError, Result};

use super::pool::{BlockHash, BlockId, BlockPool};

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
    blocks: Vec<BlockId>,
    /// Positions held.
    len: usize,
    /// Hashes of the first full blocks, in order (those registered or looked up so far).
    hashes: Vec<BlockHash>,
}

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

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The blocks, in position order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// The block and slot of position `position` (`< len`).
    pub fn slot(&self, position: usize, block_size: usize) -> (BlockId, usize) {
        (self.blocks[position / block_size], position % block_size)
    }

    /// Blocks needed to append `n` positions (a copy-on-write block included), without
    /// taking them.
    pub fn blocks_needed(&self, pool: &BlockPool, n: usize) -> usize {
        let block_size = pool.block_size();
        let grown = (self.len + n).div_ceil(block_size) - self.blocks.len();
        grown + usize::from(n > 0 && self.must_copy_last(pool))
    }

    /// Makes room for `n` more positions: a fresh copy of the last block when it is partly
    /// filled and shared or cached (its other holders keep theirs), then new blocks. Returns
    /// the copies the storage must make before writing. All or nothing: when the pool has too
    /// few free blocks, nothing changes.
    ///
    /// # Errors
    /// [`CacheError::PoolExhausted`] with the numbers.
    pub fn append(&mut self, pool: &mut BlockPool, n: usize) -> Result<Vec<BlockCopy>> {
        let needed = self.blocks_needed(pool, n);
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
        let total = (self.len + n).div_ceil(pool.block_size());
        let fresh = pool.allocate_many(total - self.blocks.len())?;
        self.blocks.extend(fresh);
        self.len += n;
        Ok(copies)
    }

    /// Registers the hashes of blocks that have become full, given every token id the table
    /// holds (`tokens.len() == len()`), so later sequences with this prefix find them.
    pub fn register_full_blocks(&mut self, pool: &mut BlockPool, tokens: &[u32], extra: &[u8]) {
        debug_assert_eq!(tokens.len(), self.len);
        let block_size = pool.block_size();
        let full = self.len / block_size;
        for i in self.hashes.len()..full {
            let hash = BlockHash::new(
                self.hashes.last(),
                &tokens[i * block_size..(i + 1) * block_size],
                extra,
            );
            pool.register(self.blocks[i], hash);
            self.hashes.push(hash);
        }
    }

    /// Another table over the same blocks (each referenced once more): a fork.
    pub fn fork(&self, pool: &mut BlockPool) -> Self {
        for &id in &self.blocks {
            pool.retain(id);
        }
        self.clone()
    }

    /// Forgets positions from `len` on, giving back the blocks no longer needed.
    pub fn truncate(&mut self, pool: &mut BlockPool, len: usize) {
        if len >= self.len {
            return;
        }
        let keep = len.div_ceil(pool.block_size());
        for id in self.blocks.drain(keep..).rev() {
            pool.release(id);
        }
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
