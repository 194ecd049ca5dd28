//! [`PagedStore`]: the keys and values of many sequences, every layer, in one block pool: what
//! an engine that batches requests continuously keeps (one block table per sequence, shared by
//! all layers, as vLLM keeps them).
//!
//! A model whose layers attend differently (Gemma's sliding-window and full layers) splits
//! them into [`LayerGroup`]s of equal size, each with its own block table per sequence, as
//! vLLM's hybrid allocator does: a block then holds one group's layers, so every group draws
//! from the one pool, and a sliding group gives back the blocks that slid wholly out of its
//! window. A sequence's memory then grows at the full layers' rate only. What it costs: a
//! group short of the common size leaves its missing members' slots unused, and the prefix
//! cache must find a sliding group's blocks of the last window before a cached prefix (not
//! those before it, which were given back), so a prefix may match shorter than with one table.

use std::collections::HashMap;

use burn::tensor::{backend::Backend, Tensor};

use crate::error::{CacheError, Result};
use crate::LayerShape;

use super::pool::{BlockEvent, BlockHash, BlockOrder, BlockPool, PoolStats, Reporting};
use super::storage::{HostKv, KvMemory, LayerStorage};
use super::table::BlockTable;

/// A sequence's handle in a [`PagedStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceId(pub u64);

/// Layers that share block tables, and the window they attend over: one group for a model
/// whose layers all see every position; for a hybrid model, groups of its sliding layers and
/// groups of its full ones ([`PagedStore::new_grouped`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerGroup {
    /// The layers, by index.
    pub layers: Vec<usize>,
    /// Positions each query of these layers sees (its own included), or `None` for all.
    pub window: Option<usize>,
}

impl LayerGroup {
    /// Blocks of `block_size` this group holds for one sequence of `positions` positions once
    /// it decodes one position a step: all of them, or a sliding group's from the block its
    /// last position's window starts in.
    ///
    /// ```
    /// use kv_core::LayerGroup;
    ///
    /// let sliding = LayerGroup { layers: vec![0], window: Some(512) };
    /// assert_eq!(sliding.decode_blocks(4096, 16), 32); // positions 3584..4096
    /// assert_eq!(sliding.decode_blocks(4100, 16), 33); // 3588..4100: from the block of 3584
    /// let full = LayerGroup { layers: vec![1], window: None };
    /// assert_eq!(full.decode_blocks(4096, 16), 256);
    /// ```
    pub fn decode_blocks(&self, positions: usize, block_size: usize) -> usize {
        let Some(last) = positions.checked_sub(1) else {
            return 0;
        };
        let first = self.window.map_or(0, |w| (last + 1).saturating_sub(w));
        last / block_size - first / block_size + 1
    }

    /// vLLM's grouping of `windows` (one per layer): layers of one window into groups of
    /// the common size, the smallest count of layers sharing a window, in layer order (the
    /// last group of a kind may come short).
    ///
    /// ```
    /// use kv_core::LayerGroup;
    ///
    /// // Gemma 3's pattern over 12 layers: five sliding (window 512) to one full.
    /// let windows: Vec<Option<usize>> =
    ///     (0..12).map(|i| if i % 6 == 5 { None } else { Some(512) }).collect();
    /// let groups = LayerGroup::split(&windows);
    /// assert_eq!(groups.len(), 6); // one full group of 2, five sliding groups of 2
    /// assert_eq!(groups[0], LayerGroup { layers: vec![5, 11], window: None });
    /// assert_eq!(groups[1], LayerGroup { layers: vec![0, 1], window: Some(512) });
    /// ```
    pub fn split(windows: &[Option<usize>]) -> Vec<Self> {
        let mut kinds: Vec<(Option<usize>, Vec<usize>)> = Vec::new();
        for (layer, &window) in windows.iter().enumerate() {
            match kinds.iter_mut().find(|(w, _)| *w == window) {
                Some((_, layers)) => layers.push(layer),
                None => kinds.push((window, vec![layer])),
            }
        }
        // Full layers first: their group is the one whose tables grow with the sequence.
        kinds.sort_by_key(|(window, _)| window.is_some());
        let size = kinds.iter().map(|(_, l)| l.len()).min().unwrap_or(1).max(1);
        kinds
            .into_iter()
            .flat_map(|(window, layers)| {
                layers
                    .chunks(size)
                    .map(|chunk| LayerGroup {
                        layers: chunk.to_vec(),
                        window,
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// One sequence: a table per layer group and the token ids its positions hold (for the
/// prefix cache).
#[derive(Debug, Clone)]
struct Sequence {
    tables: Vec<BlockTable>,
    tokens: Vec<u32>,
}

/// Which of a reserve's positions are read by queries to come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// The new positions are queries themselves (a forward pass): a sliding group keeps what
    /// the first one's window sees.
    FromTheFirst,
    /// The new positions are written from elsewhere: a sliding group keeps what the window
    /// of the position after the last one sees.
    AfterTheLast,
}

/// When a reserve's full blocks join the prefix cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Publish {
    /// At once: the tokens are the sequence's own.
    Now,
    /// At [`PagedStore::truncate`]: the tokens are guesses a pass will verify, and a block of
    /// guesses later rejected is rewritten with other tokens.
    WhenKept,
}

/// A group's window and the key its block hashes carry.
#[derive(Debug, Clone)]
struct Group {
    window: Option<usize>,
    /// The store's extra key and the group's index: groups never share a block.
    extra: Vec<u8>,
    /// Whether its blocks are reported in the pool's event log: the first full-attention
    /// group's are (the first group's when every group slides), so each prefix is reported
    /// once and never slides out of the routers' view while the sequence holds it.
    reporting: Reporting,
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
    /// Per member of a group, `[kv_heads, num_blocks * block_size, head_dim]` keys and values:
    /// a block's slots in member `m` hold layer `m` of the group that holds the block.
    members: Vec<LayerStorage<B>>,
    /// Each layer's group and member.
    layer_at: Vec<(usize, usize)>,
    groups: Vec<Group>,
    memory: KvMemory,
    device: B::Device,
    sequences: HashMap<SequenceId, Sequence>,
    next_id: u64,
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
    /// use kv_core::{BlockOrder, KvDtype, KvMemory, LayerShape, PagedStore};
    ///
    /// let device = Default::default();
    /// let shape = LayerShape { kv_heads: 1, head_dim: 2 };
    /// let mut store =
    ///     PagedStore::<NdArray>::new_in(KvMemory::Host(KvDtype::F32), 1, shape, 8, 2, BlockOrder::Ascending, b"m", &device);
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
        let group = LayerGroup {
            layers: (0..layers).collect(),
            window: None,
        };
        Self::new_grouped(
            memory,
            &[group],
            shape,
            num_blocks,
            block_size,
            order,
            extra,
            device,
        )
    }

    /// [`PagedStore::new_in`] for layers in `groups` ([`LayerGroup::split`]), each group with
    /// its own block table per sequence; a block holds the largest group's count of layers.
    ///
    /// ```
    /// use burn::tensor::Tensor;
    /// use burn_ndarray::NdArray;
    /// use kv_core::{BlockOrder, KvDtype, KvMemory, LayerGroup, LayerShape, PagedStore};
    ///
    /// let device = Default::default();
    /// let shape = LayerShape { kv_heads: 1, head_dim: 2 };
    /// // Layer 0 sees the last 2 positions, layer 1 every one.
    /// let groups = LayerGroup::split(&[Some(2), None]);
    /// let mut store = PagedStore::<NdArray>::new_grouped(
    ///     KvMemory::Host(KvDtype::F32), &groups, shape, 16, 2, BlockOrder::Ascending, b"m", &device,
    /// );
    /// let (id, _) = store.add_sequence(&[]);
    /// for position in 0..8 {
    ///     store.reserve(id, &[position as u32]).unwrap();
    ///     let kv = Tensor::<NdArray, 4>::ones([1, 1, 1, 2], &device);
    ///     store.write(0, id, position, kv.clone(), kv.clone());
    ///     store.write(1, id, position, kv.clone(), kv);
    /// }
    /// // The full layer holds 4 blocks; the sliding one only the block of positions 6..8,
    /// // all that position 7's window of 2 sees.
    /// assert_eq!(store.held_positions(1, id), 0..8);
    /// assert_eq!(store.held_positions(0, id), 6..8);
    /// assert_eq!(store.pool().free_blocks(), 16 - 4 - 1);
    /// ```
    ///
    /// # Panics
    /// If `block_size` is 0, or `groups` do not hold every layer `0..n` exactly once.
    #[allow(clippy::too_many_arguments)]
    pub fn new_grouped(
        memory: KvMemory,
        groups: &[LayerGroup],
        shape: LayerShape,
        num_blocks: usize,
        block_size: usize,
        order: BlockOrder,
        extra: &[u8],
        device: &B::Device,
    ) -> Self {
        assert!(block_size > 0, "a block holds at least one slot");
        let layers: usize = groups.iter().map(|g| g.layers.len()).sum();
        let mut layer_at = vec![None; layers];
        for (g, group) in groups.iter().enumerate() {
            for (m, &layer) in group.layers.iter().enumerate() {
                let at = layer_at.get_mut(layer).unwrap_or_else(|| {
                    panic!("layer {layer} of {groups:?} is past the {layers} layers grouped")
                });
                assert!(at.is_none(), "layer {layer} is in two groups of {groups:?}");
                *at = Some((g, m));
            }
        }
        let members = groups.iter().map(|g| g.layers.len()).max().unwrap_or(0);
        let mut pool = BlockPool::new(0, block_size);
        pool.grow(num_blocks, order);
        let dims = [shape.kv_heads, num_blocks * block_size, shape.head_dim];
        let reported = groups.iter().position(|g| g.window.is_none()).unwrap_or(0);
        let group_extra = |g: usize| {
            let mut key = extra.to_vec();
            if groups.len() > 1 {
                key.extend_from_slice(format!("/group {g}").as_bytes());
            }
            key
        };
        Self {
            pool,
            members: (0..members)
                .map(|_| LayerStorage::zeros(memory, dims, device))
                .collect(),
            layer_at: layer_at
                .into_iter()
                .map(|at| at.expect("each layer placed"))
                .collect(),
            groups: groups
                .iter()
                .enumerate()
                .map(|(g, group)| Group {
                    window: group.window,
                    extra: group_extra(g),
                    reporting: if g == reported {
                        Reporting::Reported
                    } else {
                        Reporting::Silent
                    },
                })
                .collect(),
            memory,
            device: device.clone(),
            sequences: HashMap::new(),
            next_id: 0,
        }
    }

    /// Layer groups, each with its own block tables (one for a store of [`PagedStore::new`]).
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// Blocks one sequence of `positions` positions takes if no group gives any back (its
    /// prompt in one piece): an upper bound, `groups × ⌈positions / block_size⌉`.
    pub fn blocks_for(&self, positions: usize) -> usize {
        self.groups.len() * positions.div_ceil(self.pool.block_size())
    }

    /// Blocks one sequence of `positions` positions holds once it decodes one position a
    /// step: every block of a full group, and of a sliding group those the last position's
    /// window reaches (`⌈(window - 1) / block_size⌉ + 1` at most).
    pub fn decode_blocks(&self, positions: usize) -> usize {
        let size = self.pool.block_size();
        self.groups
            .iter()
            .map(|g| {
                let group = LayerGroup {
                    layers: Vec::new(),
                    window: g.window,
                };
                group.decode_blocks(positions, size)
            })
            .sum()
    }

    /// Layers a block holds keys and values for (the largest group's count).
    pub fn layers_per_block(&self) -> usize {
        self.members.len()
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
        self.sequences[&id].tables[0].len()
    }

    /// The positions of `id` whose keys and values `layer` holds: every one, or for a layer
    /// of a sliding group those from the first block still in its window.
    pub fn held_positions(&self, layer: usize, id: SequenceId) -> std::ops::Range<usize> {
        let table = self.table(layer, id);
        table.first_held(self.pool.block_size())..table.len()
    }

    /// `id`'s table for `layer`'s group.
    fn table(&self, layer: usize, id: SequenceId) -> &BlockTable {
        &self.sequences[&id].tables[self.layer_at[layer].0]
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
    ///
    /// With several layer groups the run is the longest that every group can serve: a full
    /// group all its blocks up to it, a sliding group the blocks of the window before it.
    pub fn add_sequence(&mut self, prompt: &[u32]) -> (SequenceId, usize) {
        let max_tokens = prompt.len().saturating_sub(1);
        let size = self.pool.block_size();
        let mut tables: Vec<BlockTable> = Vec::with_capacity(self.groups.len());
        // Full groups take their longest runs (as one table would); the shortest bounds all.
        for group in self.groups.iter().filter(|g| g.window.is_none()) {
            let (table, _) =
                BlockTable::from_cached_prefix(&mut self.pool, prompt, &group.extra, max_tokens);
            tables.push(table);
        }
        let mut blocks = tables
            .iter()
            .map(|t| t.len() / size)
            .min()
            .unwrap_or(max_tokens / size);
        // Sliding groups: the longest run, at most that, whose window's blocks are cached.
        let sliding: Vec<&Group> = self.groups.iter().filter(|g| g.window.is_some()).collect();
        let chains: Vec<Vec<BlockHash>> = sliding
            .iter()
            .map(|g| hash_chain(&prompt[..blocks * size], size, &g.extra))
            .collect();
        let first_needed =
            |blocks: usize, window: usize| (blocks * size + 1).saturating_sub(window) / size;
        while blocks > 0
            && !sliding.iter().zip(&chains).all(|(g, chain)| {
                let first = first_needed(blocks, g.window.expect("sliding"));
                chain[first..blocks].iter().all(|h| self.pool.is_cached(h))
            })
        {
            blocks -= 1;
        }
        for table in &mut tables {
            table.truncate(&mut self.pool, blocks * size);
        }
        for (g, chain) in sliding.iter().zip(&chains) {
            let first = first_needed(blocks, g.window.expect("sliding"));
            let table = BlockTable::from_cached_window(&mut self.pool, &chain[..blocks], first)
                .expect("checked cached");
            tables.push(table);
        }
        // Back in group order: full groups came first above, as they come first in `groups`
        // whenever there are both (`LayerGroup::split`); otherwise one kind only.
        let order: Vec<usize> = (0..self.groups.len())
            .filter(|&g| self.groups[g].window.is_none())
            .chain((0..self.groups.len()).filter(|&g| self.groups[g].window.is_some()))
            .collect();
        let mut slots: Vec<Option<BlockTable>> = vec![None; self.groups.len()];
        for (table, g) in tables.into_iter().zip(order) {
            slots[g] = Some(table);
        }
        let tables = slots
            .into_iter()
            .map(|t| t.expect("one per group"))
            .collect();
        let cached = blocks * size;
        let id = SequenceId(self.next_id);
        self.next_id += 1;
        let tokens = prompt[..cached].to_vec();
        self.sequences.insert(id, Sequence { tables, tokens });
        (id, cached)
    }

    /// Blocks that reserving `n` more positions for `id` would take.
    pub fn blocks_needed(&self, id: SequenceId, n: usize) -> usize {
        self.sequences[&id]
            .tables
            .iter()
            .map(|t| t.blocks_needed(&self.pool, n))
            .sum()
    }

    /// Makes room for `tokens` after `id`'s positions (copying a shared last block in every
    /// layer first) and records their ids; full blocks are registered for the prefix cache.
    /// A sliding group first gives back the blocks no new position's window reaches. All or
    /// nothing (but for those blocks, which no later step needs).
    ///
    /// # Errors
    /// [`CacheError::PoolExhausted`] with the numbers, the store unchanged.
    pub fn reserve(&mut self, id: SequenceId, tokens: &[u32]) -> Result<()> {
        self.reserve_for(id, tokens, Reading::FromTheFirst, Publish::Now)
    }

    /// [`PagedStore::reserve`] for a speculative pass: `tokens` (the next token and the
    /// drafter's guesses after it) are reserved and recorded, but no block is registered for
    /// the prefix cache until [`PagedStore::truncate`] keeps its positions. A block holding a
    /// guess the model rejects has its slots rewritten by the tokens that replace it, so a
    /// later prompt must never find it under the guesses' hash (nor an operator's block events
    /// report it).
    ///
    /// ```
    /// use kv_core::{BlockOrder, LayerShape, PagedStore};
    /// use burn_ndarray::NdArray;
    ///
    /// let shape = LayerShape { kv_heads: 1, head_dim: 4 };
    /// let device = Default::default();
    /// let mut store = PagedStore::<NdArray>::new(1, shape, 8, 4, BlockOrder::Ascending, b"m", &device);
    /// let (id, _) = store.add_sequence(&[1, 2, 3]);
    /// store.reserve(id, &[1, 2, 3]).unwrap();
    /// store.reserve_unverified(id, &[4, 5, 6, 7]).unwrap(); // token 4, guesses 5 6 7
    /// assert_eq!((store.len(id), store.pool().cached_blocks()), (7, 0));
    /// store.truncate(id, 5); // guess 5 kept, 6 and 7 rejected
    /// assert_eq!((store.len(id), store.pool().cached_blocks()), (5, 1)); // 1 2 3 4 published
    /// # store.free(id);
    /// ```
    ///
    /// # Errors
    /// As [`PagedStore::reserve`].
    pub fn reserve_unverified(&mut self, id: SequenceId, tokens: &[u32]) -> Result<()> {
        self.reserve_for(id, tokens, Reading::FromTheFirst, Publish::WhenKept)
    }

    /// Keeps `id`'s first `len` positions (at least the last one a group gave back, as any
    /// position a pass has written is): the blocks past them go back to the pool, never
    /// published, and the full blocks among them join the prefix cache. After a speculative
    /// pass, `len` ends at the last accepted guess.
    ///
    /// # Panics
    /// If `id` is not held.
    pub fn truncate(&mut self, id: SequenceId, len: usize) {
        let sequence = self.sequences.get_mut(&id).expect("a held sequence");
        if len > sequence.tokens.len() {
            return;
        }
        sequence.tokens.truncate(len);
        for (table, group) in sequence.tables.iter_mut().zip(&self.groups) {
            table.truncate(&mut self.pool, len);
            table.register_full_blocks(
                &mut self.pool,
                &sequence.tokens,
                &group.extra,
                group.reporting,
            );
        }
    }

    /// [`PagedStore::reserve`] for positions whose keys come from elsewhere (a saved prefix
    /// put back) rather than from a forward pass over them: a sliding group takes blocks only
    /// for the positions the window of the position after them sees, and
    /// [`PagedStore::held_positions`] says which to write.
    ///
    /// # Errors
    /// As [`PagedStore::reserve`].
    pub fn reserve_restored(&mut self, id: SequenceId, tokens: &[u32]) -> Result<()> {
        self.reserve_for(id, tokens, Reading::AfterTheLast, Publish::Now)
    }

    fn reserve_for(
        &mut self,
        id: SequenceId,
        tokens: &[u32],
        reading: Reading,
        publish: Publish,
    ) -> Result<()> {
        let sequence = self
            .sequences
            .get_mut(&id)
            .ok_or(CacheError::UnknownSequence { id: id.0 })?;
        let start = sequence.tables[0].len();
        let first_query = match reading {
            Reading::FromTheFirst => start,
            Reading::AfterTheLast => start + tokens.len(),
        };
        // Per group, the first position a coming query sees.
        let first_needed: Vec<usize> = self
            .groups
            .iter()
            .map(|g| g.window.map_or(0, |w| (first_query + 1).saturating_sub(w)))
            .collect();
        for (table, &first) in sequence.tables.iter_mut().zip(&first_needed) {
            table.release_before(&mut self.pool, first);
        }
        let needed: usize = sequence
            .tables
            .iter()
            .zip(&first_needed)
            .map(|(t, &first)| t.blocks_needed_from(&self.pool, tokens.len(), first))
            .sum();
        if needed > self.pool.free_blocks() {
            return Err(CacheError::PoolExhausted {
                needed,
                free: self.pool.free_blocks(),
                total: self.pool.num_blocks(),
            });
        }
        let size = self.pool.block_size();
        sequence.tokens.extend_from_slice(tokens);
        let groups = sequence.tables.iter_mut().zip(&self.groups);
        for ((table, group), &first) in groups.zip(&first_needed) {
            let copies = table.append_from(&mut self.pool, tokens.len(), first)?;
            for copy in copies {
                for member in &mut self.members {
                    member.copy_slots(copy.from.index() * size, copy.to.index() * size, copy.slots);
                }
            }
            if publish == Publish::Now {
                table.register_full_blocks(
                    &mut self.pool,
                    &sequence.tokens,
                    &group.extra,
                    group.reporting,
                );
            }
        }
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
        let slots = self.slots(layer, id, start..start + n);
        let storage = &mut self.members[self.layer_at[layer].1];
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

    /// `id`'s keys and values in `layer` at [`PagedStore::held_positions`]:
    /// `[1, kv_heads, held, head_dim]`, one slice of the pool when its blocks are consecutive,
    /// else gathered (a copy; always one from host storage). Drop them before the next write.
    pub fn read(&self, layer: usize, id: SequenceId) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let storage = &self.members[self.layer_at[layer].1];
        let held = self.held_positions(layer, id);
        let blocks = self.table(layer, id).blocks();
        let first = blocks[0].index();
        let size = self.pool.block_size();
        if blocks
            .iter()
            .enumerate()
            .all(|(i, b)| b.index() == first + i)
        {
            // `held` starts at a block's first slot.
            let start = first * size;
            storage.read(start..start + held.len(), &self.device)
        } else {
            storage.gather(&self.slots(layer, id, held), &self.device)
        }
    }

    /// `id`'s keys and values in `layer` where a [`KvMemory::Host`] store keeps them, for
    /// kv-kernels' attention to read in place through its block table (key `i` is position
    /// `held_positions(layer, id).start + i`); `None` for a device store.
    pub fn host_kv(&self, layer: usize, id: SequenceId) -> Option<HostKv<'_>> {
        let host = self.members[self.layer_at[layer].1].host()?;
        let table = self.table(layer, id);
        let blocks = table.blocks().iter().map(|b| b.index()).collect();
        let held = self.held_positions(layer, id);
        Some(HostKv::new(
            host,
            self.pool.block_size(),
            blocks,
            held.len(),
        ))
    }

    /// Where the keys and values are kept.
    pub fn memory(&self) -> KvMemory {
        self.memory
    }

    /// A new sequence sharing every block of `id` (a fork: several continuations, beams).
    pub fn fork(&mut self, id: SequenceId) -> SequenceId {
        let sequence = self.sequences[&id].clone();
        let tables = sequence
            .tables
            .iter()
            .map(|t| t.fork(&mut self.pool))
            .collect();
        let new = SequenceId(self.next_id);
        self.next_id += 1;
        self.sequences.insert(
            new,
            Sequence {
                tables,
                tokens: sequence.tokens,
            },
        );
        new
    }

    /// Starts logging the prefix cache's [`BlockEvent`]s: the full-attention group's blocks
    /// as they become findable and as their contents are given up (see [`Reporting`]).
    pub fn record_events(&mut self) {
        self.pool.record_events();
    }

    /// The events logged since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<BlockEvent> {
        self.pool.take_events()
    }

    /// Forgets every cached prefix ([`BlockPool::clear_cache`]); sequences keep their blocks.
    /// Returns how many blocks were forgotten.
    pub fn clear_cache(&mut self) -> usize {
        self.pool.clear_cache()
    }

    /// Gives `id`'s blocks back (its full blocks stay cached until reused).
    pub fn free(&mut self, id: SequenceId) {
        if let Some(mut sequence) = self.sequences.remove(&id) {
            for table in &mut sequence.tables {
                table.release(&mut self.pool);
            }
        }
    }

    /// Pool slots of `id`'s positions in `layer` (held ones).
    fn slots(&self, layer: usize, id: SequenceId, positions: std::ops::Range<usize>) -> Vec<usize> {
        let size = self.pool.block_size();
        let table = self.table(layer, id);
        positions
            .map(|p| {
                let (block, slot) = table.slot(p, size);
                block.index() * size + slot
            })
            .collect()
    }
}

/// The hashes of `tokens`' full blocks of `size`, each chained to the one before.
fn hash_chain(tokens: &[u32], size: usize, extra: &[u8]) -> Vec<BlockHash> {
    let mut chain: Vec<BlockHash> = Vec::with_capacity(tokens.len() / size);
    for chunk in tokens.chunks_exact(size) {
        let hash = BlockHash::new(chain.last(), chunk, extra);
        chain.push(hash);
    }
    chain
}
