//! Attention over many queries at once (a prompt), split into blocks of queries that each read
//! only the keys they can see.
//!
//! A causal prompt of `n` tokens hides the upper triangle of its `n x n` score matrix. A fused
//! attention kernel given the whole matrix and a mask still computes every score and then hides
//! half of them; cut into blocks of `b` queries, block `i` needs only the keys up to its last
//! query, so the work drops to about `(n / b + 1) / (2 n / b)` of the whole (56% for 512
//! queries in blocks of 64). The blocks are independent, so a CPU backend, whose attention
//! kernel runs on the calling thread, can also run them on several threads
//! ([`Execution::Parallel`]).

use std::ops::Range;

use burn::tensor::{backend::Backend, Bool, Tensor, TensorData};
use rayon::prelude::*;

use kv_kernels::attention::SoftCap;

use crate::attention::gqa::grouped_query_attention;
use crate::attention::mask::{mask_data, AttentionMask, AttentionPattern};
use crate::error::{CacheError, Result};
use crate::KeyPositions;

/// Queries per block of an [`AttentionPlan`] unless told otherwise: enough rows for the
/// attention kernel's matrix products to run at speed (times the query heads sharing a key head),
/// few enough that the blocks skip most of a causal prompt's hidden scores.
pub const DEFAULT_BLOCK_QUERIES: usize = 64;

/// Where the blocks of an [`AttentionPlan`] run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Execution {
    /// One block after another on the calling thread. For GPU backends, which queue the work
    /// on the device either way.
    #[default]
    Sequential,
    /// Blocks spread over rayon's global thread pool. For CPU backends (burn-flex,
    /// burn-ndarray), whose attention kernels run on the thread that calls them.
    Parallel,
}

/// One block of queries and the key slots it reads.
#[derive(Debug, Clone)]
struct QueryBlock<B: Backend> {
    /// Query rows (indices among the new tokens).
    queries: Range<usize>,
    /// Key slots some query of the block sees; every slot outside is hidden from all of them.
    keys: Range<usize>,
    /// `[batch, kv_heads, groups * queries, keys]` ([`crate::fold_mask_for_groups`]) over `keys`
    /// only, or `None` where the block sees every one of those keys.
    mask: Option<Tensor<B, 4, Bool>>,
}

/// Attention for `queries` new tokens over a cache's key slots, planned once per forward pass and
/// shared by every layer that sees the same keys.
///
/// The plan holds what the mask of [`crate::attention_mask`] would say, cut into blocks of
/// queries: for each block, the range of key slots any of its queries sees, and the mask within
/// that range if something there is still hidden. [`AttentionPlan::attend`] gives the same output
/// as [`grouped_query_attention`] with the whole mask, reading fewer keys.
///
/// ```
/// use burn::tensor::{Distribution, Tensor};
/// use burn_ndarray::NdArray;
/// use kv_core::{
///     attention_mask, grouped_query_attention, AttentionPattern, AttentionPlan, Execution,
///     KeyPositions,
/// };
///
/// let device = Default::default();
/// let q = Tensor::<NdArray, 4>::random([1, 4, 10, 8], Distribution::Default, &device);
/// let k = Tensor::<NdArray, 4>::random([1, 2, 10, 8], Distribution::Default, &device);
/// let v = Tensor::<NdArray, 4>::random([1, 2, 10, 8], Distribution::Default, &device);
/// let keys = KeyPositions::Contiguous(0..10);
///
/// // Blocks of 4 queries: the first reads 4 keys, the second 8, the last all 10.
/// let pattern = AttentionPattern::Causal;
/// let plan = AttentionPlan::<NdArray>::new(0..10, &keys, pattern, None, 4, [1, 2, 2], &device)
///     .unwrap();
/// assert_eq!(plan.key_reads(), 4 * 4 + 4 * 8 + 2 * 10);
/// let blocked = plan.attend(q.clone(), k.clone(), v.clone(), None, Execution::Parallel).unwrap();
///
/// let mask = attention_mask(0..10, &keys, AttentionPattern::Causal, None, &device);
/// let whole = grouped_query_attention(q, k, v, Some(mask), None).unwrap();
/// blocked.into_data().assert_approx_eq::<f32>(&whole.into_data(), Default::default());
/// ```
#[derive(Debug, Clone)]
pub struct AttentionPlan<B: Backend> {
    /// New tokens (query rows) the plan was made for.
    queries: usize,
    /// Key slots the plan was made for.
    keys: usize,
    blocks: Vec<QueryBlock<B>>,
}

impl<B: Backend> AttentionPlan<B> {
    /// Plans attention for the new tokens at cache positions `queries` over the key slots
    /// `keys`, under `pattern` and `padding` (as [`crate::attention_mask`]), in blocks of
    /// `block_queries` queries (at least 1).
    ///
    /// `[batch, kv_heads, groups]` is how [`grouped_query_attention`] will lay the queries
    /// out (`groups = heads / kv_heads`): each block's mask is folded for it once here.
    ///
    /// # Errors
    /// [`CacheError::EmptyPlan`] if there are no queries or no keys, [`CacheError::PaddingRows`]
    /// if `padding` has rows but not `batch` of them.
    pub fn new(
        queries: Range<usize>,
        keys: &KeyPositions,
        pattern: AttentionPattern,
        padding: Option<&AttentionMask>,
        block_queries: usize,
        [batch, kv_heads, groups]: [usize; 3],
        device: &B::Device,
    ) -> Result<Self> {
        if queries.is_empty() || keys.is_empty() {
            return Err(CacheError::EmptyPlan {
                queries: queries.len(),
                keys: keys.len(),
            });
        }
        let (hidden, [rows, _, n, s]) = mask_data(queries, keys, pattern, padding);
        if rows != 1 && rows != batch {
            return Err(CacheError::PaddingRows { rows, batch });
        }
        let line = |row: usize, query: usize| &hidden[(row * n + query) * s..][..s];
        let blocks = (0..n)
            .step_by(block_queries.max(1))
            .map(|start| {
                let block = start..(start + block_queries.max(1)).min(n);
                // The key slots any query of the block sees. `mask_data` leaves no query
                // without a visible key, so the range is never empty.
                let (mut first, mut end) = (s, 0);
                for row in 0..rows {
                    for query in block.clone() {
                        let line = line(row, query);
                        if let Some(seen) = line.iter().position(|&h| !h) {
                            first = first.min(seen);
                        }
                        if let Some(seen) = line.iter().rposition(|&h| !h) {
                            end = end.max(seen + 1);
                        }
                    }
                }
                let keys = first..end.max(first);
                // Laid out on the host as `grouped_query_attention` reads it, so no backend
                // has to expand and copy a strided view in every layer.
                let mut folded =
                    Vec::with_capacity(batch * kv_heads * groups * block.len() * keys.len());
                for b in 0..batch {
                    let row = if rows == 1 { 0 } else { b };
                    for _ in 0..kv_heads * groups {
                        for query in block.clone() {
                            folded.extend_from_slice(&line(row, query)[keys.clone()]);
                        }
                    }
                }
                let mask = folded.iter().any(|&h| h).then(|| {
                    let shape = [batch, kv_heads, groups * block.len(), keys.len()];
                    Tensor::from_data(TensorData::new(folded, shape), device)
                });
                QueryBlock {
                    queries: block,
                    keys,
                    mask,
                }
            })
            .collect();
        Ok(Self {
            queries: n,
            keys: s,
            blocks,
        })
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Query-key pairs the plan scores, summed over its blocks: `queries * keys` for a plan of
    /// one block, about half that for a long causal prompt.
    pub fn key_reads(&self) -> usize {
        self.blocks
            .iter()
            .map(|block| block.queries.len() * block.keys.len())
            .sum()
    }

    /// Attention of `q` `[batch, heads, queries, head_dim]` over `k` and `v`
    /// `[batch, kv_heads, keys, head_dim]`, block by block or on `execution`'s threads:
    /// `[batch, heads, queries, head_dim]`. Scores are soft-capped by `cap` where one is given.
    ///
    /// # Errors
    /// [`CacheError::PlanShape`] if the tensors do not have the plan's queries and keys;
    /// [`CacheError::AttentionShape`] as [`grouped_query_attention`].
    pub fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        cap: Option<SoftCap>,
        execution: Execution,
    ) -> Result<Tensor<B, 4>> {
        self.check(&q, &k, &v)?;
        let outputs = self.run_blocks(&q, &k, &v, cap, execution, |out| out)?;
        Ok(Tensor::cat(outputs, 2))
    }

    /// As [`AttentionPlan::attend`], with the heads laid side by side for the output
    /// projection: `[batch, queries, heads * head_dim]`. Each block moves its own rows into
    /// that order, on the thread that computed them.
    ///
    /// # Errors
    /// As [`AttentionPlan::attend`].
    pub fn attend_merged(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        cap: Option<SoftCap>,
        execution: Execution,
    ) -> Result<Tensor<B, 3>> {
        self.check(&q, &k, &v)?;
        let [batch, heads, _, head_dim] = q.dims();
        let outputs = self.run_blocks(&q, &k, &v, cap, execution, |out| {
            let queries = out.dims()[2];
            out.swap_dims(1, 2)
                .reshape([batch, queries, heads * head_dim])
        })?;
        Ok(Tensor::cat(outputs, 1))
    }

    fn check(&self, q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>) -> Result<()> {
        if q.dims()[2] != self.queries || k.dims()[2] != self.keys || v.dims()[2] != self.keys {
            return Err(CacheError::PlanShape {
                queries: self.queries,
                keys: self.keys,
                query: q.dims(),
                key: k.dims(),
            });
        }
        Ok(())
    }

    /// Each block's attention, passed through `finish`, in block order.
    fn run_blocks<const D: usize>(
        &self,
        q: &Tensor<B, 4>,
        k: &Tensor<B, 4>,
        v: &Tensor<B, 4>,
        cap: Option<SoftCap>,
        execution: Execution,
        finish: impl Fn(Tensor<B, 4>) -> Tensor<B, D> + Sync,
    ) -> Result<Vec<Tensor<B, D>>> {
        let narrow = |x: &Tensor<B, 4>, range: &Range<usize>| {
            if range.len() == x.dims()[2] {
                x.clone()
            } else {
                x.clone().narrow(2, range.start, range.len())
            }
        };
        let run = |block: &QueryBlock<B>| {
            grouped_query_attention(
                narrow(q, &block.queries),
                narrow(k, &block.keys),
                narrow(v, &block.keys),
                block.mask.clone(),
                cap,
            )
            .map(&finish)
        };
        match execution {
            Execution::Parallel if self.blocks.len() > 1 => self
                .blocks
                .par_iter()
                // One task per block: later blocks read more keys, and idle threads steal.
                .with_max_len(1)
                .map(run)
                .collect(),
            _ => self.blocks.iter().map(run).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor, Tolerance};
    use burn_ndarray::NdArray;

    use super::*;
    use crate::{attention_mask, reference_attention};

    type B = NdArray;

    /// A plan on the default device.
    fn plan(
        queries: Range<usize>,
        keys: &KeyPositions,
        pattern: AttentionPattern,
        padding: Option<&AttentionMask>,
        block_queries: usize,
        layout: [usize; 3],
    ) -> Result<AttentionPlan<B>> {
        AttentionPlan::new(
            queries,
            keys,
            pattern,
            padding,
            block_queries,
            layout,
            &Default::default(),
        )
    }

    fn random(shape: [usize; 4]) -> Tensor<B, 4> {
        Tensor::random(shape, Distribution::Default, &Default::default())
    }

    #[test]
    fn a_causal_prompt_reads_only_the_keys_at_or_before_each_block() {
        let keys = KeyPositions::Contiguous(0..512);
        let plan = plan(0..512, &keys, AttentionPattern::Causal, None, 64, [1, 3, 3]).unwrap();
        assert_eq!(plan.blocks(), 8);
        let ends: Vec<_> = plan.blocks.iter().map(|b| b.keys.clone()).collect();
        assert_eq!(ends, (1..=8).map(|i| 0..64 * i).collect::<Vec<_>>());
        // 1 + 2 + ... + 8 blocks of 64 x 64 scores, of 8 x 8 in the whole matrix.
        assert_eq!(plan.key_reads(), 36 * 64 * 64);
    }

    #[test]
    fn a_sliding_window_skips_keys_before_the_window_as_well() {
        let keys = KeyPositions::Contiguous(0..40);
        let pattern = AttentionPattern::SlidingWindow { window: 8 };
        let plan = plan(0..40, &keys, pattern, None, 10, [1, 1, 1]).unwrap();
        let ranges: Vec<_> = plan.blocks.iter().map(|b| b.keys.clone()).collect();
        // Queries 10..20 see keys 3..20, and so on.
        assert_eq!(ranges, vec![0..10, 3..20, 13..30, 23..40]);
    }

    #[test]
    fn one_decode_query_is_one_block_without_a_mask() {
        let keys = KeyPositions::Contiguous(0..20);
        let plan = plan(19..20, &keys, AttentionPattern::Causal, None, 64, [1, 2, 2]).unwrap();
        assert_eq!(plan.blocks(), 1);
        assert!(plan.blocks[0].mask.is_none());
        assert_eq!(plan.key_reads(), 20);
    }

    /// Every pattern, with and without padding and soft-capping, in both executions: the
    /// blocked output equals the textbook attention under the whole mask.
    #[test]
    fn blocks_give_the_attention_of_the_whole_mask() {
        let device = Default::default();
        let padding = AttentionMask::left_padded(&[13, 9], 13).unwrap();
        let patterns = [
            AttentionPattern::Causal,
            AttentionPattern::SlidingWindow { window: 5 },
            AttentionPattern::Sinks {
                sinks: 2,
                window: 4,
            },
        ];
        let caps = [None, SoftCap::new(0.5)];
        for (pattern, cap) in patterns.into_iter().flat_map(|p| caps.map(|c| (p, c))) {
            for padding in [None, Some(&padding)] {
                for block in [1, 4, 13, 64] {
                    let (q, k, v) = (
                        random([2, 6, 13, 8]),
                        random([2, 2, 13, 8]),
                        random([2, 2, 13, 8]),
                    );
                    let keys = KeyPositions::Contiguous(0..13);
                    let plan = plan(0..13, &keys, pattern, padding, block, [2, 2, 3]).unwrap();
                    let mask = attention_mask(0..13, &keys, pattern, padding, &device);
                    let expected =
                        reference_attention(q.clone(), k.clone(), v.clone(), Some(mask), cap)
                            .unwrap()
                            .into_data();
                    for execution in [Execution::Sequential, Execution::Parallel] {
                        let got = plan
                            .attend(q.clone(), k.clone(), v.clone(), cap, execution)
                            .unwrap();
                        got.clone()
                            .into_data()
                            .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-5));
                        let merged = plan
                            .attend_merged(q.clone(), k.clone(), v.clone(), cap, execution)
                            .unwrap();
                        let expected_merged = got.swap_dims(1, 2).reshape([2, 13, 6 * 8]);
                        merged
                            .into_data()
                            .assert_eq(&expected_merged.into_data(), true);
                    }
                }
            }
        }
    }

    #[test]
    fn keys_in_ring_order_after_cached_positions() {
        // A ring of 6 slots holding positions 6..12 in the order a sliding cache hands over,
        // and 3 new queries at 9..12.
        let device = Default::default();
        let keys = KeyPositions::Slots(vec![6, 7, 8, 9, 10, 11]);
        let pattern = AttentionPattern::SlidingWindow { window: 4 };
        let (q, k, v) = (
            random([1, 2, 3, 4]),
            random([1, 1, 6, 4]),
            random([1, 1, 6, 4]),
        );
        let plan = plan(9..12, &keys, pattern, None, 2, [1, 1, 2]).unwrap();
        let mask = attention_mask(9..12, &keys, pattern, None, &device);
        let expected =
            reference_attention(q.clone(), k.clone(), v.clone(), Some(mask), None).unwrap();
        let got = plan.attend(q, k, v, None, Execution::Parallel).unwrap();
        got.into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::absolute(1e-5));
    }

    #[test]
    fn no_queries_or_no_keys_is_an_error() {
        let causal = |queries: Range<usize>, keys: Range<usize>| {
            plan(
                queries,
                &KeyPositions::Contiguous(keys),
                AttentionPattern::Causal,
                None,
                4,
                [1, 1, 1],
            )
        };
        let err = causal(3..3, 0..3).unwrap_err();
        assert!(err.to_string().contains("at least one query"), "{err}");
        assert!(causal(0..1, 0..0).is_err());
    }

    #[test]
    fn a_padding_mask_for_another_batch_is_an_error() {
        let padding = AttentionMask::left_padded(&[3, 2, 1], 3).unwrap();
        let keys = KeyPositions::Contiguous(0..3);
        let err = plan(
            0..3,
            &keys,
            AttentionPattern::Causal,
            Some(&padding),
            4,
            [2, 1, 1],
        )
        .unwrap_err();
        assert!(err.to_string().contains("3 rows for a batch of 2"), "{err}");
    }

    #[test]
    fn tensors_of_another_size_are_an_error() {
        let keys = KeyPositions::Contiguous(0..8);
        let plan = plan(0..8, &keys, AttentionPattern::Causal, None, 4, [1, 1, 1]).unwrap();
        let err = plan
            .attend(
                random([1, 1, 8, 4]),
                random([1, 1, 9, 4]),
                random([1, 1, 9, 4]),
                None,
                Execution::Sequential,
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                CacheError::PlanShape {
                    queries: 8,
                    keys: 8,
                    ..
                }
            ),
            "{err}"
        );
    }
}
