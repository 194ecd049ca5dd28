//! [`PagedStore`]: the keys and values of many sequences, every layer, in one block pool: what
//! an engine that batches requests continuously keeps (one block table per sequence, shared by
//! all layers, as vLLM keeps them).

use std::collections::HashMap;

use burn::tensor::{backend::Backend, Tensor};

use crate::error::{CacheError, Result};
use crate::LayerShape;

use super::pool::{BlockOrder, BlockPool, PoolStats};
use super::storage::{HostKv, KvMemory, LayerStorage};
use super::table::BlockTable;

/// A sequence's handle in a [`PagedStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceId(pub u64);

/// One sequence: its table and the token ids its positions hold (for the prefix cache).
#[derive(Debug, Clone)]
struct Sequence {
    table: BlockTable,
    tokens: Vec<u32>,
}

/// Every layer's keys and values for many sequences in one pool of `num_blocks` blocks, sized
/// once. A sequence is added from its prompt (starting from the prompt's cached blocks), grows
/// by [`PagedStore::reserve`] (all or nothing: a caller that cannot reserve preempts someone),
/// is written and read layer by layer, and is freed; its full blocks stay cached for later
/// prompts until the pool needs them.
///
/// # Panics
/// [`PagedStore::reserve`] refuses an unknown id with an error; the other methods take ids the
/// caller holds from [`PagedStore::add_sequence`] or [`PagedStore::fork`] and panic on one that
/// was never added or was freed (a bug in the caller, not bad input), and
/// [`PagedStore::read`] on a sequence that holds no position yet.
///
/// ```
/// use burn::tensor::Tensor;
/// use burn_ndarray::NdArray;
/// use kv_core::{BlockOrder, LayerShape, PagedStore};
///
/// let device = Default::default();
/// let shape = LayerShape { kv_heads: 2, head_dim: 8 };
/// let mut store = PagedStore::<NdArray>::new(2, shape, 16, 4, BlockOrder::Ascending, b"m", &device);
/// let prompt = [1, 2, 3, 4, 5, 6];
/// let (a, cached) = store.add_sequence(&prompt);
/// assert_eq!(cached, 0);
/// store.reserve(a, &prompt).unwrap();
/// for layer in 0..2 {
///     let kv = Tensor::<NdArray, 4>::ones([1, 2, 6, 8], &device);
///     store.write(layer, a, 0, kv.clone(), kv);
/// }
/// store.free(a);
/// // The same prompt again: its first full block (4 positions) is cached.
/// let (b, cached) = store.add_sequence(&prompt);
/// assert_eq!(cached, 4);
/// # store.free(b);
/// ```
#[derive(Debug)]
pub struct PagedStore<B: Backend> {
    pool: BlockPool,
    /// Per layer, `[kv_heads, num_blocks * block_size, head_dim]` keys and values.
    layers: Vec<LayerStorage<B>>,
    memory: KvMemory,
    device: B::Device,
    sequences: HashMap<SequenceId, Sequence>,
    next_id: u64,
    /// The extra key of every block hash (a model fingerprint).
    extra: Vec<u8>,
}

impl<B: Backend> PagedStore<B> {
    /// A store of `num_blocks` blocks of `block_size` slots for `layers` layers of `shape`,
    /// handing blocks out in `order`; `extra` goes into every block hash (name the model, so
    /// two models never share blocks). Its keys and values are backend tensors
    /// ([`KvMemory::Device`]); [`PagedStore::new_in`] chooses.
    ///
    /// # Panics
    /// If `block_size` is 0.
    pub fn new(
        layers: usize,
        shape: LayerShape,
        num_blocks: usize,
        block_size: usize,
        order: BlockOrder,
        extra: &[u8],
        device: &B::Device,
    ) -> Self {
        Self::new_in(
            KvMemory::Device,
            layers,
            shape,
            num_blocks,
            block_size,
            order,
            extra,
            device,
        )
    }

    /// [`PagedStore::new`] with its keys and values kept in `memory`.
    ///
    /// ```
    /// use burn::tensor::Tensor;
    /// use burn_ndarray::NdArray;
    /// use kv_core::{BlockOrder, KvMemory, LayerShape, PagedStore};
    ///
    /// let device = Default::default();
    /// let shape = LayerShape { kv_heads: 1, head_dim: 2 };
    /// let mut store =
    ///     PagedStore::<NdArray>::new_in(KvMemory::Host, 1, shape, 8, 2, BlockOrder::Ascending, b"m", &device);
    /// let (id, _) = store.add_sequence(&[1, 2, 3]);
    /// store.reserve(id, &[1, 2, 3]).unwrap();
    /// let k = Tensor::<NdArray, 1>::from_floats([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &device).reshape([1, 1, 3, 2]);
    /// store.write(0, id, 0, k.clone(), k);
    /// // Attention reads key 2 where the pool holds it, through the block table.
    /// let kv = store.host_kv(0, id).unwrap();
    /// assert_eq!(kv.len(), 3);
    /// # let _ = kv.head(0);
    /// ```
    ///
    /// # Panics
    /// If `block_size` is 0.
    #[allow(clippy::too_many_arguments)]
    pub fn new_in(
        memory: KvMemory,
        layers: usize,
        shape: LayerShape,
        num_blocks: usize,
        block_size: usize,
        order: BlockOrder,
        extra: &[u8],
        device: &B::Device,
    ) -> Self {
        assert!(block_size > 0, "a block holds at least one slot");
        let mut pool = BlockPool::new(0, block_size);
        pool.grow(num_blocks, order);
        let dims = [shape.kv_heads, num_blocks * block_size, shape.head_dim];
        Self {
            pool,
            layers: (0..layers)
                .map(|_| LayerStorage::zeros(memory, dims, device))
                .collect(),
            memory,
            device: device.clone(),
            sequences: HashMap::new(),
            next_id: 0,
            extra: extra.to_vec(),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// The prefix cache's counters.
    pub fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Positions `id` holds.
    pub fn len(&self, id: SequenceId) -> usize {
        self.sequences[&id].table.len()
    }

    /// Whether `id` is held (added or forked, not freed).
    pub fn contains(&self, id: SequenceId) -> bool {
        self.sequences.contains_key(&id)
    }

    /// The block size.
    pub fn block_size(&self) -> usize {
        self.pool.block_size()
    }

    /// Sequences held.
    pub fn sequences(&self) -> usize {
        self.sequences.len()
    }

    /// Adds a sequence for `prompt`, starting from its longest run of cached full blocks (never
    /// its last token, whose logits must be computed): `(id, cached positions)`. The cached
    /// positions need no compute; the rest are [`PagedStore::reserve`]d and written.
    pub fn add_sequence(&mut self, prompt: &[u32]) -> (SequenceId, usize) {
        let (table, cached) = BlockTable::from_cached_prefix(
            &mut self.pool,
            prompt,
            &self.extra,
            prompt.len().saturating_sub(1),
        );
        let id = SequenceId(self.next_id);
        self.next_id += 1;
        let tokens = prompt[..cached].to_vec();
        self.sequences.insert(id, Sequence { table, tokens });
        (id, cached)
    }

    /// Blocks that reserving `n` more positions for `id` would take.
    pub fn blocks_needed(&self, id: SequenceId, n: usize) -> usize {
        self.sequences[&id].table.blocks_needed(&self.pool, n)
    }

    /// Makes room for `tokens` after `id`'s positions (copying a shared last block in every
    /// layer first) and records their ids; full blocks are registered for the prefix cache.
    /// All or nothing.
    ///
    /// # Errors
    /// [`CacheError::PoolExhausted`] with the numbers, the store unchanged.
    pub fn reserve(&mut self, id: SequenceId, tokens: &[u32]) -> Result<()> {
        let sequence = self
            .sequences
            .get_mut(&id)
            .ok_or(CacheError::UnknownSequence { id: id.0 })?;
        let copies = sequence.table.append(&mut self.pool, tokens.len())?;
        let size = self.pool.block_size();
        for copy in copies {
            for layer in &mut self.layers {
                layer.copy_slots(copy.from.index() * size, copy.to.index() * size, copy.slots);
            }
        }
        sequence.tokens.extend_from_slice(tokens);
        sequence
            .table
            .register_full_blocks(&mut self.pool, &sequence.tokens, &self.extra);
        Ok(())
    }

    /// Writes keys and values `[1, kv_heads, n, head_dim]` of `id`'s positions
    /// `start..start + n` (reserved) in `layer`, one slice per run of consecutive slots.
    pub fn write(
        &mut self,
        layer: usize,
        id: SequenceId,
        start: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) {
        let n = keys.dims()[2];
        let slots = self.slots(id, start..start + n);
        let storage = &mut self.layers[layer];
        let mut at = 0;
        while at < n {
            let mut end = at + 1;
            while end < n && slots[end] == slots[at] + (end - at) {
                end += 1;
            }
            storage.write(
                slots[at],
                keys.clone().narrow(2, at, end - at),
                values.clone().narrow(2, at, end - at),
            );
            at = end;
        }
    }

    /// `id`'s keys and values in `layer`: `[1, kv_heads, len, head_dim]`, one slice of the pool
    /// when its blocks are consecutive, else gathered (a copy; always one from host storage).
    /// Drop them before the next write.
    pub fn read(&self, layer: usize, id: SequenceId) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let storage = &self.layers[layer];
        let table = &self.sequences[&id].table;
        let blocks = table.blocks();
        let first = blocks[0].index();
        if blocks
            .iter()
            .enumerate()
            .all(|(i, b)| b.index() == first + i)
        {
            let start = first * self.pool.block_size();
            storage.read(start..start + table.len(), &self.device)
        } else {
            storage.gather(&self.slots(id, 0..table.len()), &self.device)
        }
    }

    /// `id`'s keys and values in `layer` where a [`KvMemory::Host`] store keeps them, for
    /// kv-kernels' attention to read in place through its block table; `None` for a device
    /// store.
    pub fn host_kv(&self, layer: usize, id: SequenceId) -> Option<HostKv<'_>> {
        let host = self.layers[layer].host()?;
        let table = &self.sequences[&id].table;
        let blocks = table.blocks().iter().map(|b| b.index()).collect();
        Some(HostKv::new(
            host,
            self.pool.block_size(),
            blocks,
            table.len(),
        ))
    }

    /// Where the keys and values are kept.
    pub fn memory(&self) -> KvMemory {
        self.memory
    }

    /// A new sequence sharing every block of `id` (a fork: several continuations, beams).
    pub fn fork(&mut self, id: SequenceId) -> SequenceId {
        let sequence = self.sequences[&id].clone();
        let table = sequence.table.fork(&mut self.pool);
        let new = SequenceId(self.next_id);
        self.next_id += 1;
        self.sequences.insert(
            new,
            Sequence {
                table,
                tokens: sequence.tokens,
            },
        );
        new
    }

    /// Gives `id`'s blocks back (its full blocks stay cached until reused).
    pub fn free(&mut self, id: SequenceId) {
        if let Some(mut sequence) = self.sequences.remove(&id) {
            sequence.table.release(&mut self.pool);
        }
    }

    /// Pool slots of `id`'s positions.
    fn slots(&self, id: SequenceId, positions: std::ops::Range<usize>) -> Vec<usize> {
        let size = self.pool.block_size();
        let table = &self.sequences[&id].table;
        positions
            .map(|p| {
                let (block, slot) = table.slot(p, size);
                block.index() * size + slot
            })
            .collect()
    }
}
