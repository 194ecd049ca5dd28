//! The block pool and block tables under random sequences of operations, against a model of
//! what each sequence wrote: reference counts equal the table entries pointing at each block,
//! the free list holds exactly the unreferenced blocks, every cached hash names a block holding
//! the tokens it was computed from, every sequence reads back what it wrote, a mirror built
//! from the pool's events alone (as a router builds it) holds exactly the cached blocks, and
//! releasing everything leaves the pool as it started.

use std::collections::HashMap;

use kv_core::{BlockCopy, BlockEvent, BlockHash, BlockPool, BlockTable, CacheError, Reporting};
use proptest::prelude::*;

const EXTRA: &[u8] = b"test-model";

/// One operation on the live sequences (indices are taken modulo their number).
#[derive(Debug, Clone)]
enum Op {
    /// A new sequence with these tokens, starting from the cached prefix.
    Start(Vec<u32>),
    /// Append tokens to a sequence.
    Append(usize, Vec<u32>),
    /// Fork a sequence.
    Fork(usize),
    /// Truncate a sequence to this fraction of its length.
    Truncate(usize, f64),
    /// Release a sequence.
    Release(usize),
    /// Forget every cached block.
    Clear,
}

fn op() -> impl Strategy<Value = Op> {
    // Tokens from a tiny alphabet, so prompts share prefixes and blocks hash alike.
    let tokens = |max| prop::collection::vec(0u32..3, 1..max);
    prop_oneof![
        3 => tokens(20).prop_map(Op::Start),
        4 => (any::<usize>(), tokens(8)).prop_map(|(i, t)| Op::Append(i, t)),
        2 => any::<usize>().prop_map(Op::Fork),
        1 => (any::<usize>(), 0.0..1.0f64).prop_map(|(i, f)| Op::Truncate(i, f)),
        2 => any::<usize>().prop_map(Op::Release),
        1 => Just(Op::Clear),
    ]
}

/// A live sequence: its table and the token ids it holds.
struct Sequence {
    table: BlockTable,
    tokens: Vec<u32>,
}

/// The pool, its sequences, and what each block's slots hold (written by the test as a cache
/// would write keys and values).
struct World {
    pool: BlockPool,
    sequences: Vec<Sequence>,
    slots: Vec<Vec<Option<u32>>>,
    /// The tokens each registered hash was computed from.
    meaning: HashMap<BlockHash, Vec<u32>>,
    /// What a router knows from the pool's events: each cached block's parent and tokens.
    mirror: HashMap<BlockHash, (Option<BlockHash>, Vec<u32>)>,
}

impl World {
    fn new(blocks: usize, block_size: usize) -> Self {
        let mut pool = BlockPool::new(blocks, block_size);
        pool.record_events();
        Self {
            pool,
            sequences: Vec::new(),
            slots: vec![vec![None; block_size]; blocks],
            meaning: HashMap::new(),
            mirror: HashMap::new(),
        }
    }

    /// Appends `tokens` to sequence `i`: copies, then slot writes, then hash registration.
    /// Returns false (nothing changed) when the pool is exhausted.
    fn append(&mut self, i: usize, tokens: &[u32]) -> bool {
        let seq = &mut self.sequences[i];
        let before = (seq.table.clone(), self.pool.free_blocks());
        let copies = match seq.table.append(&mut self.pool, tokens.len()) {
            Ok(copies) => copies,
            Err(CacheError::PoolExhausted { .. }) => {
                assert_eq!((seq.table.clone(), self.pool.free_blocks()), before);
                return false;
            }
            Err(e) => panic!("{e}"),
        };
        for BlockCopy { from, to, slots } in copies {
            for s in 0..slots {
                self.slots[to.index()][s] = self.slots[from.index()][s];
            }
        }
        let block_size = self.pool.block_size();
        for (k, &token) in tokens.iter().enumerate() {
            let (block, slot) = seq.table.slot(seq.tokens.len() + k, block_size);
            self.slots[block.index()][slot] = Some(token);
        }
        seq.tokens.extend_from_slice(tokens);
        seq.table
            .register_full_blocks(&mut self.pool, &seq.tokens, EXTRA, Reporting::Reported);
        // Remember what each hash of this sequence means.
        let mut parent: Option<BlockHash> = None;
        for chunk in seq.tokens.chunks_exact(block_size) {
            let hash = BlockHash::new(parent.as_ref(), chunk, EXTRA);
            self.meaning.insert(hash, chunk.to_vec());
            parent = Some(hash);
        }
        true
    }

    fn apply(&mut self, op: Op) {
        let n = self.sequences.len();
        match op {
            Op::Start(tokens) => {
                let (table, cached) = BlockTable::from_cached_prefix(
                    &mut self.pool,
                    &tokens,
                    EXTRA,
                    tokens.len() - 1,
                );
                assert!(cached < tokens.len(), "the last token is always computed");
                assert_eq!(cached % self.pool.block_size(), 0);
                // What the cached blocks hold is the prompt's prefix.
                let seq = Sequence {
                    table,
                    tokens: tokens[..cached].to_vec(),
                };
                assert_eq!(self.read(&seq), seq.tokens);
                self.sequences.push(seq);
                if !self.append(n, &tokens[cached..]) {
                    let mut seq = self.sequences.pop().unwrap();
                    seq.table.release(&mut self.pool);
                }
            }
            Op::Append(i, tokens) if n > 0 => {
                self.append(i % n, &tokens);
            }
            Op::Fork(i) if n > 0 => {
                let seq = &self.sequences[i % n];
                let table = seq.table.fork(&mut self.pool);
                let tokens = seq.tokens.clone();
                self.sequences.push(Sequence { table, tokens });
            }
            Op::Truncate(i, fraction) if n > 0 => {
                let seq = &mut self.sequences[i % n];
                let len = (seq.tokens.len() as f64 * fraction) as usize;
                seq.table.truncate(&mut self.pool, len);
                seq.tokens.truncate(len);
            }
            Op::Release(i) if n > 0 => {
                let mut seq = self.sequences.swap_remove(i % n);
                seq.table.release(&mut self.pool);
            }
            Op::Clear => {
                self.pool.clear_cache();
            }
            _ => {}
        }
        self.follow_events();
    }

    /// Applies the pool's new events to the mirror, as a router would, checking each against
    /// what the mirror holds: a block is stored once, removed only when stored, and its hash
    /// is the one its parent and tokens give.
    fn follow_events(&mut self) {
        for event in self.pool.take_events() {
            match event {
                BlockEvent::Stored {
                    hash,
                    parent,
                    tokens,
                } => {
                    assert_eq!(hash, BlockHash::new(parent.as_ref(), &tokens, EXTRA));
                    assert_eq!(tokens, self.meaning[&hash]);
                    let old = self.mirror.insert(hash, (parent, tokens));
                    assert!(old.is_none(), "{hash:?} stored twice");
                }
                BlockEvent::Removed { hash } => {
                    assert!(self.mirror.remove(&hash).is_some(), "{hash:?} not stored");
                }
                BlockEvent::Cleared => self.mirror.clear(),
            }
        }
    }

    /// The tokens sequence `seq` reads back through its table.
    fn read(&self, seq: &Sequence) -> Vec<u32> {
        let block_size = self.pool.block_size();
        (0..seq.table.len())
            .map(|p| {
                let (block, slot) = seq.table.slot(p, block_size);
                self.slots[block.index()][slot].expect("a written slot")
            })
            .collect()
    }

    fn check(&self) {
        self.pool.audit().unwrap();
        let mut refs = vec![0u32; self.pool.num_blocks()];
        for seq in &self.sequences {
            assert_eq!(seq.table.len(), seq.tokens.len());
            assert_eq!(
                seq.table.blocks().len(),
                seq.tokens.len().div_ceil(self.pool.block_size())
            );
            for block in seq.table.blocks() {
                refs[block.index()] += 1;
            }
            assert_eq!(self.read(seq), seq.tokens, "a sequence reads what it wrote");
        }
        for (b, &count) in refs.iter().enumerate() {
            let id = kv_core::BlockId(b as u32);
            assert_eq!(self.pool.ref_count(id), count, "block {b}");
            if let Some(hash) = self.pool.hash_of(id) {
                let held: Vec<u32> = self.slots[b].iter().map(|s| s.unwrap()).collect();
                assert_eq!(
                    &held, &self.meaning[&hash],
                    "cached block {b} holds its tokens"
                );
            }
        }
        let unreferenced = refs.iter().filter(|&&c| c == 0).count();
        assert_eq!(self.pool.free_blocks(), unreferenced);
        let cached: std::collections::HashSet<BlockHash> = (0..self.pool.num_blocks())
            .filter_map(|b| self.pool.hash_of(kv_core::BlockId(b as u32)))
            .collect();
        let mirrored: std::collections::HashSet<BlockHash> = self.mirror.keys().copied().collect();
        assert_eq!(
            mirrored, cached,
            "the events' mirror holds exactly the cached blocks"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn pool_and_tables_keep_their_invariants(
        block_size in prop::sample::select(vec![1usize, 3, 4, 16]),
        blocks in 4usize..40,
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut world = World::new(blocks, block_size);
        for op in ops {
            world.apply(op);
            world.check();
        }
        for mut seq in std::mem::take(&mut world.sequences) {
            seq.table.release(&mut world.pool);
        }
        world.check();
        prop_assert_eq!(world.pool.free_blocks(), blocks, "nothing leaks");
    }
}

#[test]
fn a_repeated_prompt_starts_from_its_cached_blocks() {
    let mut world = World::new(16, 4);
    let prompt: Vec<u32> = (0..11).collect();
    world.apply(Op::Start(prompt.clone()));
    world.apply(Op::Release(0));
    let hits = world.pool.stats().hits;
    let (mut table, cached) =
        BlockTable::from_cached_prefix(&mut world.pool, &prompt, EXTRA, prompt.len() - 1);
    assert_eq!(cached, 8, "two full blocks of four");
    assert_eq!(world.pool.stats().hits, hits + 2);
    // A prompt of exactly two blocks recomputes its last token: only the first block is used.
    table.release(&mut world.pool);
    let (mut table, cached) =
        BlockTable::from_cached_prefix(&mut world.pool, &prompt[..8], EXTRA, 7);
    assert_eq!(cached, 4);
    table.release(&mut world.pool);
    // Another model's extra key shares nothing.
    let (table, cached) = BlockTable::from_cached_prefix(&mut world.pool, &prompt, b"other", 10);
    assert_eq!((cached, table.len()), (0, 0));
    world.check();
}

mod store {
    use burn::tensor::{Distribution, Tensor};
    use burn_ndarray::NdArray;
    use kv_core::{
        BlockEvent, BlockHash, BlockOrder, CacheError, KvDtype, KvMemory, LayerShape, PagedStore,
        SequenceId,
    };
    use kv_kernels::{attention, Isa};

    type B = NdArray<f32>;
    const SHAPE: LayerShape = LayerShape {
        kv_heads: 2,
        head_dim: 4,
    };

    fn random(n: usize) -> Tensor<B, 4> {
        Tensor::random([1, 2, n, 4], Distribution::Default, &Default::default())
    }

    /// Writes `n` new positions of `id` in both layers; returns what was written per layer.
    fn write(
        store: &mut PagedStore<B>,
        id: SequenceId,
        tokens: &[u32],
    ) -> Vec<(Tensor<B, 4>, Tensor<B, 4>)> {
        let start = store.len(id);
        store.reserve(id, tokens).unwrap();
        (0..2)
            .map(|layer| {
                let (k, v) = (random(tokens.len()), random(tokens.len()));
                store.write(layer, id, start, k.clone(), v.clone());
                (k, v)
            })
            .collect()
    }

    fn same(a: Tensor<B, 4>, b: Tensor<B, 4>) {
        a.into_data()
            .assert_approx_eq::<f32>(&b.into_data(), burn::tensor::Tolerance::absolute(0.0));
    }

    #[test]
    fn sequences_read_back_what_they_wrote_through_scattered_blocks() {
        for memory in [KvMemory::Device, KvMemory::Host(KvDtype::F32)] {
            read_back_through_scattered_blocks(memory);
        }
    }

    /// Attention over `id`'s keys in `layer` read in place through its block table equals
    /// attention over the same keys read out as one tensor, bit for bit, every head.
    fn host_attention_reads_what_was_written(store: &PagedStore<B>, layer: usize, id: SequenceId) {
        let kv = store.host_kv(layer, id).expect("a host store");
        let (k, v) = store.read(layer, id);
        let values = |t: Tensor<B, 4>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
        let (k, v) = (values(k), values(v));
        let (len, d) = (kv.len(), SHAPE.head_dim);
        let q = [0.3, -0.2, 0.5, 0.1];
        let all = 0..len;
        let visible = std::slice::from_ref(&all);
        for head in 0..SHAPE.kv_heads {
            let span = head * len * d..(head + 1) * len * d;
            let (mut dense, mut paged) = ([0.0; 4], [0.0; 4]);
            let isa = Isa::best();
            attention::attend(
                isa,
                &q,
                &k[span.clone()],
                &v[span],
                d,
                visible,
                0.5,
                &mut dense,
                d,
                &mut Vec::new(),
            );
            attention::attend_keys(
                isa,
                &q,
                kv.head(head),
                visible,
                0.5,
                &mut paged,
                d,
                &mut Vec::new(),
            );
            assert_eq!(
                dense.map(f32::to_bits),
                paged.map(f32::to_bits),
                "head {head}"
            );
        }
    }

    fn read_back_through_scattered_blocks(memory: KvMemory) {
        let mut store = PagedStore::<B>::new_in(
            memory,
            2,
            SHAPE,
            32,
            3,
            BlockOrder::Shuffled { seed: 9 },
            b"m",
            &Default::default(),
        );
        assert_eq!(store.memory(), memory);
        let (a, _) = store.add_sequence(&[1, 2, 3, 4, 5]);
        let first = write(&mut store, a, &[1, 2, 3, 4, 5]);
        let second = write(&mut store, a, &[6]);
        // A fork shares a's blocks; appending to the shared partly filled block copies it.
        let b = store.fork(a);
        let forked = write(&mut store, b, &[7]);
        let more = write(&mut store, a, &[8]);
        for layer in 0..2 {
            let (k, v) = store.read(layer, a);
            let expect = |i: usize| -> Vec<Tensor<B, 4>> {
                let pick = |w: &Vec<(Tensor<B, 4>, Tensor<B, 4>)>| {
                    if i == 0 {
                        w[layer].0.clone()
                    } else {
                        w[layer].1.clone()
                    }
                };
                vec![pick(&first), pick(&second), pick(&more)]
            };
            same(k, Tensor::cat(expect(0), 2));
            same(v, Tensor::cat(expect(1), 2));
            let (k, _) = store.read(layer, b);
            let want = Tensor::cat(
                vec![
                    first[layer].0.clone(),
                    second[layer].0.clone(),
                    forked[layer].0.clone(),
                ],
                2,
            );
            same(k, want);
            if memory == KvMemory::Host(KvDtype::F32) {
                host_attention_reads_what_was_written(&store, layer, a);
                host_attention_reads_what_was_written(&store, layer, b);
            } else {
                assert!(store.host_kv(layer, a).is_none());
            }
        }
        store.free(a);
        store.free(b);
        assert_eq!(store.pool().free_blocks(), 32);
        store.pool().audit().unwrap();
    }

    #[test]
    fn a_cached_prefix_is_read_not_recomputed_and_exhaustion_changes_nothing() {
        let mut store = PagedStore::<B>::new(
            2,
            SHAPE,
            4,
            4,
            BlockOrder::Ascending,
            b"m",
            &Default::default(),
        );
        let prompt: Vec<u32> = (10..19).collect(); // two full blocks and one more token
        let (a, cached) = store.add_sequence(&prompt);
        assert_eq!(cached, 0);
        let written = write(&mut store, a, &prompt);
        store.free(a);
        let (b, cached) = store.add_sequence(&prompt);
        assert_eq!(cached, 8);
        assert_eq!(store.stats().hits, 2);
        // b reads a's keys for the cached positions without anyone writing them again.
        write(&mut store, b, &prompt[8..]);
        let (k, _) = store.read(0, b);
        same(k.narrow(2, 0, 8), written[0].0.clone().narrow(2, 0, 8));
        // Three blocks are in use; asking for two more than the pool has left is refused.
        let free = store.pool().free_blocks();
        let error = store.reserve(b, &[0; 12]).unwrap_err();
        assert!(matches!(
            error,
            CacheError::PoolExhausted {
                needed: 3,
                free: 1,
                total: 4
            }
        ));
        assert_eq!((store.pool().free_blocks(), store.len(b)), (free, 9));
        store.free(b);
        assert!(matches!(
            store.reserve(b, &[1]),
            Err(CacheError::UnknownSequence { .. })
        ));
        assert_eq!(store.pool().free_blocks(), 4);
    }

    /// A speculative pass's blocks join the prefix cache only once kept: a prompt that begins
    /// with rejected guesses finds none of their blocks, the blocks past the kept positions
    /// are back in the pool at once, and the kept positions read back what the pass wrote.
    #[test]
    fn guesses_are_published_only_once_kept_and_rejected_blocks_come_back() {
        let mut store = PagedStore::<B>::new(
            2,
            SHAPE,
            8,
            4,
            BlockOrder::Ascending,
            b"m",
            &Default::default(),
        );
        store.record_events();
        let stored = |tokens: &[u32], parent: Option<BlockHash>| {
            let hash = BlockHash::new(parent.as_ref(), tokens, b"m");
            let event = BlockEvent::Stored {
                hash,
                parent,
                tokens: tokens.to_vec(),
            };
            (hash, event)
        };
        let prompt: Vec<u32> = (1..=6).collect();
        let (a, _) = store.add_sequence(&prompt);
        let written = write(&mut store, a, &prompt);
        assert_eq!(store.pool().cached_blocks(), 1); // 1 2 3 4
        let (first, event) = stored(&[1, 2, 3, 4], None);
        assert_eq!(store.take_events(), [event]);
        // Token 7 and guesses 8 9 10 11: positions 6..11, blocks 4..8 and 8..12.
        let pass = [7, 8, 9, 10, 11];
        store.reserve_unverified(a, &pass).unwrap();
        let guessed: Vec<_> = (0..2)
            .map(|layer| {
                let (k, v) = (random(5), random(5));
                store.write(layer, a, 6, k.clone(), v.clone());
                (k, v)
            })
            .collect();
        assert_eq!(
            (store.pool().free_blocks(), store.pool().cached_blocks()),
            (5, 1)
        );
        assert_eq!(store.take_events(), [], "guesses are never reported");
        // A prompt running through the guesses finds the one verified block only.
        let probe = |store: &mut PagedStore<B>, tokens: &[u32]| {
            let (id, cached) = store.add_sequence(&[tokens, &[0]].concat());
            store.free(id);
            cached
        };
        assert_eq!(probe(&mut store, &(1..=11).collect::<Vec<_>>()), 4);
        // Guess 8 kept, 9 10 11 rejected: the block of 9..12 goes back, 5 6 7 8 is published.
        store.truncate(a, 8);
        assert_eq!(store.len(a), 8);
        assert_eq!(
            (store.pool().free_blocks(), store.pool().cached_blocks()),
            (6, 2)
        );
        assert_eq!(store.take_events(), [stored(&[5, 6, 7, 8], Some(first)).1]);
        assert_eq!(probe(&mut store, &(1..=11).collect::<Vec<_>>()), 8);
        // The model's own token 20 follows; the rejected guesses' hash chain is never found.
        write(&mut store, a, &[20]);
        for layer in 0..2 {
            let (k, v) = store.read(layer, a);
            same(k.clone().narrow(2, 0, 6), written[layer].0.clone());
            same(k.narrow(2, 6, 2), guessed[layer].0.clone().narrow(2, 0, 2));
            same(v.narrow(2, 6, 2), guessed[layer].1.clone().narrow(2, 0, 2));
        }
        let mut ours: Vec<u32> = (1..=8).collect();
        ours.extend([20, 21, 22, 23, 24]);
        write(&mut store, a, &ours[9..]);
        assert_eq!(probe(&mut store, &ours), 12);
        assert_eq!(probe(&mut store, &(1..=13).collect::<Vec<_>>()), 8);
        store.free(a);
        assert_eq!(store.pool().free_blocks(), 8);
        store.pool().audit().unwrap();
    }
}
