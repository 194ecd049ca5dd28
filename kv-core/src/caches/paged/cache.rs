//! [`PagedCache`]: one layer's keys and values in a pool of fixed-size blocks, answering the
//! [`KvCache`] vocabulary (each batch row a sequence with its own [`BlockTable`]).

use burn::tensor::{backend::Backend, Tensor};

use crate::caches::buffer::KvBuffer;
use crate::caches::kv_cache::{check_indices, check_update};
use crate::error::Result;
use crate::{KeyPositions, KvCache, KvView};

use super::pool::{BlockOrder, BlockPool};
use super::table::{BlockCopy, BlockTable};

/// Slots per block unless told otherwise (vLLM's default).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The sizes of a [`PagedCache`]'s pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedCacheConfig {
    /// Slots per block (16 is vLLM's default; 1 makes every position its own block).
    pub block_size: usize,
    /// Blocks allocated at the first update; the pool doubles when they run out.
    pub initial_blocks: usize,
    /// The order blocks are handed out in.
    pub order: BlockOrder,
}

impl Default for PagedCacheConfig {
    fn default() -> Self {
        Self {
            block_size: DEFAULT_BLOCK_SIZE,
            initial_blocks: 64,
            order: BlockOrder::Ascending,
        }
    }
}

impl PagedCacheConfig {
    /// A pool with room for `rows` sequences of `positions` positions each, in blocks of
    /// `block_size` (a `block_size` of 0 is refused when the cache is built).
    pub fn for_sequences(block_size: usize, rows: usize, positions: usize) -> Self {
        Self {
            block_size,
            initial_blocks: (rows * positions.div_ceil(block_size.max(1))).max(1),
            order: BlockOrder::Ascending,
        }
    }
}

/// A layer cache whose positions live in blocks of a pool, as vLLM's PagedAttention keeps them.
///
/// Storage is one pair of tensors `[1, kv_heads, blocks * block_size, head_dim]`; block `b` is
/// slots `b * block_size .. (b + 1) * block_size` of every head. Each batch row is a sequence
/// with a [`BlockTable`]. Rows forked by [`KvCache::select_batch`] (beams, continuations of one
/// prompt) share their blocks, so a prefix is held once however many rows continue it; a row
/// that appends to a shared, partly filled block copies that block first.
///
/// What attention reads is built from the table: a row whose blocks are consecutive in the pool
/// (a fresh pool hands them out in order) reads one slice of the storage, with no copy; any
/// other row gathers its slots. Drop the view before the next update: a view shares the
/// storage, and a write while it lives copies the whole pool.
///
/// ```
/// use burn::tensor::Tensor;
/// use burn_ndarray::NdArray;
/// use kv_core::{KvCache, PagedCache, PagedCacheConfig};
///
/// let device = Default::default();
/// let mut cache = PagedCache::<NdArray>::new(PagedCacheConfig::for_sequences(4, 1, 32));
/// let k = Tensor::<NdArray, 4>::ones([1, 2, 6, 8], &device); // 6 positions: two blocks
/// cache.update(k.clone(), k).unwrap();
/// cache.select_batch(&[0, 0, 0]).unwrap(); // three rows sharing those blocks
/// assert_eq!(cache.used_blocks(), 2);
/// let k = Tensor::<NdArray, 4>::ones([3, 2, 1, 8], &device);
/// let view = cache.update(k.clone(), k).unwrap();
/// assert_eq!(view.keys.dims(), [3, 2, 7, 8]);
/// assert_eq!(cache.used_blocks(), 4); // the full block shared; each row its own last block
/// ```
#[derive(Debug, Clone)]
pub struct PagedCache<B: Backend> {
    config: PagedCacheConfig,
    pool: BlockPool,
    /// One table per batch row.
    tables: Vec<BlockTable>,
    /// `[1, kv_heads, blocks * block_size, head_dim]`, once the first update fixed the shape.
    storage: Option<KvBuffer<B>>,
    /// `[batch, kv_heads, head_dim]` once fixed.
    shape: Option<[usize; 3]>,
}

impl<B: Backend> PagedCache<B> {
    /// An empty cache; the pool is allocated at the first update.
    ///
    /// # Panics
    /// If `config.block_size` is 0.
    pub fn new(config: PagedCacheConfig) -> Self {
        assert!(config.block_size > 0, "a block holds at least one slot");
        Self {
            config,
            pool: BlockPool::new(0, config.block_size),
            tables: Vec::new(),
            storage: None,
            shape: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> PagedCacheConfig {
        self.config
    }

    /// The pool (its blocks, free list and counters).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Each batch row's table.
    pub fn tables(&self) -> &[BlockTable] {
        &self.tables
    }

    /// Blocks some row holds.
    pub fn used_blocks(&self) -> usize {
        self.pool.num_blocks() - self.pool.free_blocks()
    }

    /// Bytes of the blocks some row holds: what the rows cost, where
    /// [`KvCache::memory_bytes`] counts the whole pool.
    pub fn used_bytes(&self) -> usize {
        match self.shape {
            Some([_, kv_heads, head_dim]) => {
                let element = self
                    .storage
                    .as_ref()
                    .map_or(4, |s| s.bytes() / s.dims().iter().product::<usize>() / 2);
                2 * self.used_blocks() * self.config.block_size * kv_heads * head_dim * element
            }
            None => 0,
        }
    }

    /// Makes sure `needed` more blocks can be allocated, growing the pool (and its storage) to
    /// the next power-of-two multiple of the initial size.
    fn reserve(&mut self, needed: usize, [kv_heads, head_dim]: [usize; 2], device: &B::Device) {
        if needed <= self.pool.free_blocks() && self.storage.is_some() {
            return;
        }
        let used = self.used_blocks();
        let mut blocks = self
            .pool
            .num_blocks()
            .max(self.config.initial_blocks.max(1));
        while blocks - used < needed {
            blocks *= 2;
        }
        let slots = blocks * self.config.block_size;
        let held = self.pool.num_blocks() * self.config.block_size;
        self.storage = Some(match self.storage.take() {
            None => KvBuffer::zeros([1, kv_heads, slots, head_dim], device),
            Some(storage) => storage.resized(1, slots, held),
        });
        self.pool.grow(blocks, self.config.order);
    }

    /// Copies a shared block's filled slots into a row's own new block.
    fn copy_block(&mut self, copy: BlockCopy) {
        let size = self.config.block_size;
        let storage = self.storage.take().expect("storage exists once a row does");
        let from: Vec<usize> = (0..copy.slots)
            .map(|s| copy.from.index() * size + s)
            .collect();
        // `gather_slots` selects into new tensors, so the write below owns the storage alone.
        let (keys, values) = storage.gather_slots(0..1, &from);
        self.storage = Some(storage.write(copy.to.index() * size, keys, values));
    }

    /// Pool slots of `row`'s positions `positions`, in order.
    fn physical_slots(&self, row: usize, positions: std::ops::Range<usize>) -> Vec<usize> {
        let size = self.config.block_size;
        positions
            .map(|p| {
                let (block, slot) = self.tables[row].slot(p, size);
                block.index() * size + slot
            })
            .collect()
    }

    /// What attention reads for row `row`: `[1, kv_heads, len, head_dim]`, one slice when the
    /// row's blocks follow each other in the pool, else gathered slot by slot.
    fn read_row(&self, row: usize) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let storage = self
            .storage
            .as_ref()
            .expect("storage exists once a row does");
        let table = &self.tables[row];
        let blocks = table.blocks();
        let first = blocks[0].index();
        if blocks
            .iter()
            .enumerate()
            .all(|(i, b)| b.index() == first + i)
        {
            let start = first * self.config.block_size;
            storage.read(0..1, start..start + table.len())
        } else {
            storage.gather_slots(0..1, &self.physical_slots(row, 0..table.len()))
        }
    }

    /// The whole pool's keys and values, `[1, kv_heads, blocks * block_size, head_dim]`
    /// (handles, not copies), once the first update has allocated it. Drop them before the
    /// next update, or it copies the pool.
    pub fn pool_tensors(&self) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let storage = self.storage.as_ref()?;
        Some(storage.read(0..1, 0..storage.capacity()))
    }
}

impl<B: Backend> KvCache<B> for PagedCache<B> {
    fn update(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<KvView<B>> {
        let [batch, kv_heads, new, head_dim] = check_update(&keys, &values, self.shape)?;
        let device = keys.device();
        if self.shape.is_none() {
            self.tables = vec![BlockTable::new(); batch];
            self.shape = Some([batch, kv_heads, head_dim]);
        }
        // Room for every row's new positions, then each row's copies and writes.
        let needed: usize = self
            .tables
            .iter()
            .map(|t| t.blocks_needed(&self.pool, new))
            .sum();
        self.reserve(needed, [kv_heads, head_dim], &device);
        for row in 0..batch {
            let start = self.tables[row].len();
            let copies = self.tables[row].append(&mut self.pool, new)?;
            for copy in copies {
                self.copy_block(copy);
            }
            let slots = self.physical_slots(row, start..start + new);
            let (row_keys, row_values) = (
                keys.clone().narrow(0, row, 1),
                values.clone().narrow(0, row, 1),
            );
            // One write per run of consecutive pool slots (one in all when the row's new
            // blocks follow each other in the pool).
            let mut at = 0;
            while at < new {
                let mut end = at + 1;
                while end < new && slots[end] == slots[at] + (end - at) {
                    end += 1;
                }
                let storage = self.storage.take().expect("reserved above");
                self.storage = Some(storage.write(
                    slots[at],
                    row_keys.clone().narrow(2, at, end - at),
                    row_values.clone().narrow(2, at, end - at),
                ));
                at = end;
            }
        }
        let len = self.tables[0].len();
        let (keys, values) = if batch == 1 {
            self.read_row(0)
        } else {
            let (k, v): (Vec<_>, Vec<_>) = (0..batch).map(|row| self.read_row(row)).unzip();
            (Tensor::cat(k, 0), Tensor::cat(v, 0))
        };
        Ok(KvView {
            keys,
            values,
            positions: KeyPositions::Contiguous(0..len),
            query_rotary_positions: None,
        })
    }

    fn seq_len(&self) -> usize {
        self.tables.first().map_or(0, BlockTable::len)
    }

    fn held_len(&self) -> usize {
        self.seq_len()
    }

    fn max_len(&self) -> Option<usize> {
        None
    }

    fn crop(&mut self, len: usize) -> Result<()> {
        for table in &mut self.tables {
            table.truncate(&mut self.pool, len);
        }
        Ok(())
    }

    fn select_batch(&mut self, indices: &[usize]) -> Result<()> {
        let Some([batch, kv_heads, head_dim]) = self.shape else {
            return Ok(());
        };
        check_indices(indices, batch)?;
        let forked: Vec<BlockTable> = indices
            .iter()
            .map(|&row| self.tables[row].fork(&mut self.pool))
            .collect();
        for mut table in std::mem::replace(&mut self.tables, forked) {
            table.release(&mut self.pool);
        }
        self.shape = Some([indices.len(), kv_heads, head_dim]);
        Ok(())
    }

    fn batch_size(&self) -> Option<usize> {
        self.shape.map(|[batch, _, _]| batch)
    }

    fn reset(&mut self) {
        for mut table in std::mem::take(&mut self.tables) {
            table.release(&mut self.pool);
        }
        self.pool = BlockPool::new(0, self.config.block_size);
        self.storage = None;
        self.shape = None;
    }

    fn memory_bytes(&self) -> usize {
        self.storage.as_ref().map_or(0, KvBuffer::bytes)
    }
}
